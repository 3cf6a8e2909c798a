//! The Internet checksum (RFC 1071) and its incremental update (RFC 1624).
//!
//! A checksum is computed in two steps: [`sum`] accumulates 16-bit big-endian words into a
//! `u32` (several partial sums may be added together, e.g. the pseudo-header's and the
//! segment's), then [`fold`] folds the carries back into 16 bits. The field value on the wire
//! is the complement of the folded sum: [`compute`] does both.
//!
//! For NAT the packet path does not recompute: [`update_u16`] / [`update_u32`] patch a
//! checksum for one rewritten field per RFC 1624 eqn. 3, `HC' = ~(~HC + ~m + m')`.
//! UDP differs in one way: a checksum field of 0 means "no checksum" (do not update it) and a
//! computed 0 is sent as 0xffff; [`update_udp_u16`] / [`update_udp_u32`] handle that.

use std::net::Ipv4Addr;

/// Ones'-complement sum of `data` as big-endian 16-bit words; an odd final byte is padded
/// with a zero low byte. The result is folded to at most 0xffff, so that many sums can be
/// added in a `u32` without overflow.
///
/// Only the last of several concatenated parts may have an odd length.
#[inline]
pub fn sum(data: &[u8]) -> u32 {
    // 32-bit words: the ones'-complement sum does not depend on the word size (RFC 1071
    // §2(B)), so folding the wide sum gives the 16-bit one in half the additions.
    let mut acc: u64 = 0;
    let mut words = data.chunks_exact(4);
    for w in &mut words {
        acc += u64::from(u32::from_be_bytes([w[0], w[1], w[2], w[3]]));
    }
    match *words.remainder() {
        [a, b, c] => acc += u64::from(u16::from_be_bytes([a, b])) + (u64::from(c) << 8),
        [a, b] => acc += u64::from(u16::from_be_bytes([a, b])),
        [a] => acc += u64::from(a) << 8,
        _ => {}
    }
    u32::from(fold_wide(acc))
}

/// Folds a ones'-complement sum of 32-bit words into 16 bits: 64 → 33 → 32 bits, then
/// [`fold`]'s two steps. A fixed number of steps, no loop.
#[inline(always)]
fn fold_wide(acc: u64) -> u16 {
    let acc = (acc & 0xffff_ffff) + (acc >> 32);
    let acc = (acc & 0xffff_ffff) + (acc >> 32);
    fold(acc as u32)
}

/// Folds the carries of a ones'-complement sum into 16 bits (end-around carry). Does not
/// complement.
#[inline]
pub fn fold(sum: u32) -> u16 {
    // Two steps always suffice: the first leaves at most 0x1fffe, the second at most
    // 0xffff.
    let sum = (sum & 0xffff) + (sum >> 16);
    ((sum & 0xffff) + (sum >> 16)) as u16
}

/// Sum of the IPv4 pseudo-header used by TCP, UDP (RFC 768/9293): source, destination, zero,
/// protocol, and the L4 length (header plus payload).
pub fn pseudo_header_v4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, length: u16) -> u32 {
    let (s, d) = (u32::from(src), u32::from(dst));
    (s >> 16) + (s & 0xffff) + (d >> 16) + (d & 0xffff) + u32::from(protocol) + u32::from(length)
}

/// The checksum field value for `data` with an initial partial sum (0, or a pseudo-header
/// sum): `!fold(initial + sum(data))`. `data` must hold the checksum field zeroed.
///
/// Verifying is the same call over the data *with* the checksum in place: the result is 0
/// when the checksum is right.
#[inline]
pub fn compute(initial: u32, data: &[u8]) -> u16 {
    !fold(initial + sum(data))
}

/// Whether an IPv4 header without options verifies, checksum in place: `compute(0, header)
/// == 0`. The packet path's copy: five 32-bit additions it inlines, where `sum` over a
/// slice is a call. The words are read in the CPU's byte order (RFC 1071 §2(B)): a sum
/// that verifies folds to 0xffff, which reads the same in either.
#[inline(always)]
pub fn ipv4_header_verifies(header: &[u8; 20]) -> bool {
    let word = |at: usize| {
        let w = [header[at], header[at + 1], header[at + 2], header[at + 3]];
        u64::from(u32::from_ne_bytes(w))
    };
    fold_wide(word(0) + word(4) + word(8) + word(12) + word(16)) == 0xffff
}

/// RFC 1624 eqn. 3: the checksum after one 16-bit word of the covered data changed from
/// `old` to `new`.
///
/// Equal to a full recompute unless the covered data becomes all zeros (then it gives 0
/// where 0xffff is right); that cannot happen to an IPv4 header (version 4) nor to a
/// TCP/UDP checksum (the pseudo-header holds the protocol).
pub fn update_u16(checksum: u16, old: u16, new: u16) -> u16 {
    !fold(u32::from(!checksum) + u32::from(!old) + u32::from(new))
}

/// RFC 1624 eqn. 3 for a 32-bit field (an IPv4 address, both halves 16-bit aligned).
pub fn update_u32(checksum: u16, old: u32, new: u32) -> u16 {
    let acc = u32::from(!checksum)
        + u32::from(!(old >> 16) as u16)
        + u32::from(!(old as u16))
        + (new >> 16)
        + (new & 0xffff);
    !fold(acc)
}

/// Several rewritten fields' RFC 1624 changes, summed once and applied to every checksum
/// that covers them (NAT: the addresses change the IPv4 header's checksum and, through
/// the pseudo-header, the transport's, which also covers the ports). Applying the sum is
/// [`update_u16`] for all fields at once: `HC' = ~(~HC + Σ(~m + m'))`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Delta(u32);

impl Delta {
    /// Adds a 16-bit field changed from `old` to `new`.
    #[inline]
    pub fn u16(self, old: u16, new: u16) -> Delta {
        Delta(self.0 + u32::from(!old) + u32::from(new))
    }

    /// Adds a 32-bit field (an IPv4 address, both halves 16-bit aligned).
    #[inline]
    pub fn u32(self, old: u32, new: u32) -> Delta {
        self.u16((old >> 16) as u16, (new >> 16) as u16)
            .u16(old as u16, new as u16)
    }

    /// Both sets of changes.
    #[inline]
    pub fn plus(self, other: Delta) -> Delta {
        Delta(self.0 + other.0)
    }

    /// The checksum after the changes (same caveat as [`update_u16`] about all-zero data).
    #[inline]
    pub fn apply(self, checksum: u16) -> u16 {
        // At most a few dozen 17-bit terms: no overflow before the fold.
        !fold(u32::from(!checksum) + self.0)
    }

    /// [`Delta::apply`] for a UDP checksum: 0 ("none") stays 0, 0 becomes 0xffff.
    #[inline]
    pub fn apply_udp(self, checksum: u16) -> u16 {
        if checksum == 0 {
            return 0;
        }
        udp_nonzero(self.apply(checksum))
    }
}

/// [`update_u16`] for a UDP checksum: 0 ("none") stays 0, a result of 0 becomes 0xffff.
pub fn update_udp_u16(checksum: u16, old: u16, new: u16) -> u16 {
    if checksum == 0 {
        return 0;
    }
    udp_nonzero(update_u16(checksum, old, new))
}

/// [`update_u32`] for a UDP checksum: 0 ("none") stays 0, a result of 0 becomes 0xffff.
pub fn update_udp_u32(checksum: u16, old: u32, new: u32) -> u16 {
    if checksum == 0 {
        return 0;
    }
    udp_nonzero(update_u32(checksum, old, new))
}

/// A computed UDP checksum of 0 is transmitted as 0xffff (RFC 768): 0 means "none".
pub fn udp_nonzero(checksum: u16) -> u16 {
    if checksum == 0 {
        0xffff
    } else {
        checksum
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sum_handles_odd_length() {
        assert_eq!(sum(&[]), 0);
        assert_eq!(sum(&[0x12]), 0x1200);
        assert_eq!(sum(&[0x12, 0x34, 0x56]), 0x1234 + 0x5600);
        // Carries are folded.
        assert_eq!(fold(sum(&[0xff, 0xff, 0x00, 0x02])), 0x0002);
    }

    #[test]
    fn rfc1071_example() {
        // RFC 1071 section 3: 00 01 f2 03 f4 f5 f6 f7 sums to ddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(sum(&data)), 0xddf2);
        assert_eq!(compute(0, &data), !0xddf2);
    }

    #[test]
    fn ipv4_header_known_checksum() {
        // A classic example header, checksum 0xb861.
        let mut h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(compute(0, &h), 0xb861);
        h[10..12].copy_from_slice(&0xb861u16.to_be_bytes());
        assert_eq!(compute(0, &h), 0);
    }

    #[test]
    fn rfc1624_examples() {
        // Section 4: HC = 0xdd2f, m = 0x5555 -> m' = 0x3285. Eqn. 3 gives 0x0000 (eqn. 2
        // would give the wrong 0xffff).
        assert_eq!(update_u16(0xdd2f, 0x5555, 0x3285), 0x0000);
        // Undoing the change gives the original back.
        assert_eq!(update_u16(0x0000, 0x3285, 0x5555), 0xdd2f);
        // No change, no effect.
        assert_eq!(update_u16(0x1234, 0xabcd, 0xabcd), 0x1234);
    }

    #[test]
    fn udp_zero_checksum_is_left_alone() {
        assert_eq!(update_udp_u16(0, 0x1111, 0x2222), 0);
        assert_eq!(update_udp_u32(0, 0x0a00_0001, 0x0a00_0002), 0);
        // The RFC 1624 case that yields 0 is sent as 0xffff for UDP.
        assert_eq!(update_udp_u16(0xdd2f, 0x5555, 0x3285), 0xffff);
        assert_eq!(udp_nonzero(0), 0xffff);
        assert_eq!(udp_nonzero(7), 7);
    }

    #[test]
    fn pseudo_header_sums_words() {
        let s = pseudo_header_v4(
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::new(10, 0, 0, 2),
            6,
            20,
        );
        assert_eq!(s, 0x0a00 + 0x0001 + 0x0a00 + 0x0002 + 6 + 20);
    }

    /// Rewrites a 16-bit word at `at` (even offset) and returns the new data.
    fn rewrite(data: &[u8], at: usize, new: &[u8]) -> Vec<u8> {
        let mut out = data.to_vec();
        out[at..at + new.len()].copy_from_slice(new);
        out
    }

    /// RFC 1071's definition, word by word: what [`sum`] must equal.
    fn reference_sum(data: &[u8]) -> u32 {
        let mut acc: u64 = 0;
        for pair in data.chunks(2) {
            acc += u64::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
        }
        while acc > 0xffff {
            acc = (acc & 0xffff) + (acc >> 16);
        }
        acc as u32
    }

    proptest! {
        #[test]
        fn ipv4_header_verifies_as_compute_does(
            mut header in any::<[u8; 20]>(),
            fix in any::<bool>(),
        ) {
            if fix {
                header[10..12].copy_from_slice(&[0, 0]);
                let c = compute(0, &header);
                header[10..12].copy_from_slice(&c.to_be_bytes());
            }
            prop_assert_eq!(ipv4_header_verifies(&header), compute(0, &header) == 0);
        }

        #[test]
        fn wide_sum_equals_16_bit_sum(data in proptest::collection::vec(any::<u8>(), 0..1600)) {
            prop_assert_eq!(sum(&data), reference_sum(&data));
        }

        #[test]
        fn incremental_u16_matches_recompute(
            mut data in proptest::collection::vec(any::<u8>(), 4..200),
            word in any::<usize>(),
            new in any::<u16>(),
        ) {
            // Checksum field at 0..2, rewritten word somewhere else, even offset.
            data[0] = 0;
            data[1] = 0;
            let hc = compute(0, &data);
            data[0..2].copy_from_slice(&hc.to_be_bytes());
            let words = data.len() / 2;
            let at = 2 * (1 + word % (words - 1));
            let old = u16::from_be_bytes([data[at], data[at + 1]]);
            let updated = update_u16(hc, old, new);
            let mut changed = rewrite(&data, at, &new.to_be_bytes());
            changed[0..2].copy_from_slice(&[0, 0]);
            // The one case eqn. 3 can't get right: all-zero data (see `update_u16`).
            prop_assume!(changed.iter().any(|&b| b != 0));
            prop_assert_eq!(updated, compute(0, &changed), "equals a full recompute");
            changed[0..2].copy_from_slice(&updated.to_be_bytes());
            prop_assert_eq!(compute(0, &changed), 0, "incremental result verifies");
        }

        #[test]
        fn incremental_u32_matches_recompute_with_pseudo_header(
            src in any::<u32>(), dst in any::<u32>(), new_dst in any::<u32>(),
            mut seg in proptest::collection::vec(any::<u8>(), 8..300),
        ) {
            // A UDP-like segment: checksum at 6..8, pseudo-header over the addresses.
            let len = seg.len() as u16;
            seg[6] = 0;
            seg[7] = 0;
            let ph = |d: u32| pseudo_header_v4(src.into(), d.into(), 17, len);
            let hc = compute(ph(dst), &seg);
            let updated = update_u32(hc, dst, new_dst);
            prop_assert_eq!(updated, compute(ph(new_dst), &seg));
            seg[6..8].copy_from_slice(&updated.to_be_bytes());
            prop_assert_eq!(compute(ph(new_dst), &seg), 0);
            // The UDP flavour agrees except that 0 is spelled 0xffff.
            prop_assert_eq!(update_udp_u32(udp_nonzero(hc), dst, new_dst), udp_nonzero(updated));
        }

        #[test]
        fn one_delta_for_several_fields_verifies(
            src in any::<u32>(), dst in any::<u32>(), new_src in any::<u32>(),
            new_dst in any::<u32>(), new_port in any::<u16>(),
            mut seg in proptest::collection::vec(any::<u8>(), 8..300),
        ) {
            // NAT of both addresses and the destination port (at 2..4) of a UDP-like
            // segment, checksum at 6..8: one delta gives a checksum that verifies.
            let len = seg.len() as u16;
            seg[6] = 0;
            seg[7] = 0;
            let ph = |s: u32, d: u32| pseudo_header_v4(s.into(), d.into(), 17, len);
            let hc = compute(ph(src, dst), &seg);
            let old_port = u16::from_be_bytes([seg[2], seg[3]]);
            let delta = Delta::default()
                .u32(src, new_src)
                .u32(dst, new_dst)
                .u16(old_port, new_port);
            let updated = delta.apply(hc);
            seg[2..4].copy_from_slice(&new_port.to_be_bytes());
            seg[6..8].copy_from_slice(&updated.to_be_bytes());
            prop_assert_eq!(compute(ph(new_src, new_dst), &seg), 0);
            // Field by field gives the same result.
            let stepwise = update_u16(update_u32(update_u32(hc, src, new_src), dst, new_dst), old_port, new_port);
            prop_assert_eq!(updated, stepwise);
        }
    }
}
