//! Maglev consistent hashing (Eisenbud et al., NSDI '16, §3.4).
//!
//! Every gateway that sees the same backend set builds the same table: each backend's
//! permutation comes from two fixed, seedless hashes of its `ip:port`, never from process
//! state, and ties are broken by the caller's stable backend order. Golden tests pin the
//! table so a change of hash or of the fill order is a visible, deliberate break.

use std::net::Ipv4Addr;

/// Default table size: a prime, ≥ 100 × backends for sets up to ~160 backends.
pub const DEFAULT_TABLE_SIZE: u32 = 16381;

/// Finalizer of MurmurHash3 (fmix64): a cheap, well-studied 64-bit mixer with full
/// avalanche. Fixed forever: the flow → backend mapping of a fleet depends on it.
#[inline]
pub fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

fn backend_key(addr: Ipv4Addr, port: u16) -> u64 {
    (u64::from(u32::from(addr)) << 16) | u64::from(port)
}

/// The two independent hashes of a backend: `offset` and `skip` of its permutation.
fn permutation(addr: Ipv4Addr, port: u16, size: u32) -> (u32, u32) {
    let key = backend_key(addr, port);
    let h1 = fmix64(key ^ 0x6d61_676c_6576_3031); // "maglev01"
    let h2 = fmix64(key.rotate_left(29) ^ 0x7365_7276_6761_7465); // "servgate"
    let m = u64::from(size);
    let offset = (h1 % m) as u32;
    let skip = (h2 % (m - 1)) as u32 + 1;
    (offset, skip)
}

/// A Maglev lookup table: `size` slots (a prime), each the index of a backend in the
/// slice the table was built from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MaglevTable {
    slots: Box<[u32]>,
}

impl MaglevTable {
    /// Builds the table for `backends` (in the caller's stable order) with `size` slots.
    /// `size` must be a prime larger than the number of backends; the compiler validates
    /// the configured size. An empty backend list gives an empty table.
    pub fn build(backends: &[(Ipv4Addr, u16)], size: u32) -> MaglevTable {
        let weights: Vec<u32> = vec![1; backends.len()];
        MaglevTable::build_weighted(backends, &weights, size)
    }

    /// Weighted Maglev: in each round a backend claims up to its weight in slots, so
    /// shares are proportional to weights (weight 0 excludes a backend).
    pub fn build_weighted(backends: &[(Ipv4Addr, u16)], weights: &[u32], size: u32) -> MaglevTable {
        assert_eq!(backends.len(), weights.len(), "one weight per backend");
        let active: Vec<usize> = (0..backends.len()).filter(|&i| weights[i] > 0).collect();
        if active.is_empty() || size < 2 {
            return MaglevTable::default();
        }
        let size_usize = size as usize;
        let perms: Vec<(u32, u32)> = active
            .iter()
            .map(|&i| permutation(backends[i].0, backends[i].1, size))
            .collect();
        let mut next = vec![0u32; active.len()];
        let mut slots = vec![u32::MAX; size_usize];
        let mut filled = 0usize;
        'fill: loop {
            for (n, &index) in active.iter().enumerate() {
                for _ in 0..weights[index] {
                    let (offset, skip) = perms[n];
                    let mut candidate;
                    loop {
                        candidate = ((u64::from(offset)
                            + u64::from(skip) * u64::from(next[n]))
                            % u64::from(size)) as usize;
                        next[n] += 1;
                        if slots[candidate] == u32::MAX {
                            break;
                        }
                    }
                    slots[candidate] = index as u32;
                    filled += 1;
                    if filled == size_usize {
                        break 'fill;
                    }
                }
            }
        }
        MaglevTable {
            slots: slots.into_boxed_slice(),
        }
    }

    /// The backend index for a flow hash, or `None` when the table is empty.
    #[inline]
    pub fn lookup(&self, flow_hash: u64) -> Option<u32> {
        if self.slots.is_empty() {
            return None;
        }
        let slot = (flow_hash % self.slots.len() as u64) as usize;
        self.slots.get(slot).copied()
    }

    pub fn size(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The raw slots, for tests and the admin API.
    pub fn slots(&self) -> &[u32] {
        &self.slots
    }
}

/// True when `n` is prime (table sizes are validated with it).
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u32;
    while d.saturating_mul(d) <= n {
        if n % d == 0 {
            return false;
        }
        d += 1;
    }
    true
}
