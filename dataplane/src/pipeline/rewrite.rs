//! In-place header surgery: L4 tuple extraction, NAT rewrites with incremental checksums,
//! ICMP errors and echo replies built over the received frame, VXLAN encapsulation.
//! Every function takes byte slices already validated by the caller's `new_checked` views.

use std::net::Ipv4Addr;

use crate::maglev::fmix64;
use crate::wire::checksum;
use crate::wire::ethernet::{self, EthernetFrame, MacAddr};
use crate::wire::icmp::{self, IcmpPacket};
use crate::wire::ipv4::{self, Ipv4Packet};
use crate::wire::{tcp, udp, vxlan, SctpPacket, TcpPacket, UdpPacket};

/// Bytes VXLAN adds in front of the inner Ethernet frame: outer Ethernet, IPv4, UDP, VXLAN.
pub const VXLAN_OVERHEAD: usize = ethernet::HEADER_LEN + ipv4::HEADER_LEN + 8 + 8;

/// What the pipeline needs from the transport header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    /// TCP, UDP or SCTP ports (and TCP flags).
    Ports {
        sport: u16,
        dport: u16,
        tcp_flags: Option<u8>,
    },
    /// ICMP echo request (`request`) or reply: the identifier serves as both ports.
    Echo { ident: u16, request: bool },
    /// ICMP dest-unreachable or time-exceeded (embeds an original packet).
    IcmpError,
    /// Anything else, or a non-first fragment: no transport header to look at.
    Other,
}

/// Parses the transport header of an IPv4 packet's payload. An error when a TCP, UDP,
/// SCTP or ICMP header is truncated in a first (or unfragmented) packet.
#[inline(always)]
pub fn parse_l4(protocol: u8, first_fragment: bool, payload: &[u8]) -> crate::wire::Result<L4> {
    if !first_fragment {
        return Ok(L4::Other);
    }
    Ok(match protocol {
        ipv4::PROTO_TCP => {
            let t = TcpPacket::new_checked(payload)?;
            L4::Ports {
                sport: t.src_port(),
                dport: t.dst_port(),
                tcp_flags: Some(t.flags().bits() as u8),
            }
        }
        ipv4::PROTO_UDP => {
            let u = UdpPacket::new_checked(payload)?;
            L4::Ports {
                sport: u.src_port(),
                dport: u.dst_port(),
                tcp_flags: None,
            }
        }
        ipv4::PROTO_SCTP => {
            let s = SctpPacket::new_checked(payload)?;
            L4::Ports {
                sport: s.src_port(),
                dport: s.dst_port(),
                tcp_flags: None,
            }
        }
        ipv4::PROTO_ICMP => {
            let m = IcmpPacket::new_checked(payload)?;
            match m.msg_type() {
                icmp::TYPE_ECHO_REQUEST | icmp::TYPE_ECHO_REPLY => L4::Echo {
                    ident: m.echo_ident(),
                    request: m.msg_type() == icmp::TYPE_ECHO_REQUEST,
                },
                _ if m.is_error() => L4::IcmpError,
                _ => L4::Other,
            }
        }
        _ => L4::Other,
    })
}

/// The flow hash Maglev and the VXLAN entropy port use: two rounds of `fmix64` over the
/// 5-tuple with a fixed salt, so every gateway computes the same value for the same flow.
#[inline]
pub fn flow_hash(protocol: u8, src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> u64 {
    let addrs = (u64::from(u32::from(src)) << 32) | u64::from(u32::from(dst));
    let rest = (u64::from(sport) << 32) | (u64::from(dport) << 16) | u64::from(protocol);
    fmix64(addrs ^ fmix64(rest ^ 0x7365_7276_6761_7465))
}

/// Rewrites the source and/or destination address:port of the IPv4 packet in `ip` (which
/// starts at the IPv4 header and was validated), patching the IPv4 checksum and the L4
/// checksum incrementally (TCP, UDP honouring "no checksum"); SCTP's CRC32c is recomputed.
/// ICMP echo: the "port" is the identifier. Other protocols: addresses only.
pub fn nat(ip: &mut [u8], src: Option<(Ipv4Addr, u16)>, dst: Option<(Ipv4Addr, u16)>) {
    translate(ip, src, dst, false);
}

/// What forwarding does to a packet: [`nat`] (when `src` or `dst` is given) and the TTL
/// decrement, with the IPv4 checksum patched once for both. The caller has checked that
/// the TTL is above 1.
pub fn forward_rewrite(ip: &mut [u8], src: Option<(Ipv4Addr, u16)>, dst: Option<(Ipv4Addr, u16)>) {
    translate(ip, src, dst, true);
}

/// [`forward_rewrite`] of a packet the fast path has checked: IPv4 without options, not a
/// fragment, TTL above 1, carrying a whole TCP or UDP header. The same changes, read and
/// written at fixed offsets instead of through the header views.
///
/// The checksum arithmetic runs on 16-bit words in the CPU's byte order, fields and
/// checksums alike: the ones'-complement sum does not depend on byte order (RFC 1071
/// §2(B)), so no field is byte-swapped on the way in or out.
#[inline(always)]
pub fn forward_rewrite_whole(
    ip: &mut [u8],
    src: Option<(Ipv4Addr, u16)>,
    dst: Option<(Ipv4Addr, u16)>,
) {
    let Some((h, l4)) = ip.split_first_chunk_mut::<{ ipv4::HEADER_LEN }>() else {
        return;
    };
    let word = |b: &[u8], at: usize| u16::from_ne_bytes([b[at], b[at + 1]]);
    let quad = |b: &[u8], at: usize| u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    let protocol = h[9];
    let ttl = h[8];
    h[8] = ttl.saturating_sub(1);
    // TTL and protocol share a 16-bit word of the header.
    let header = checksum::Delta::default().u16(word(&[ttl, protocol], 0), word(h, 8));
    let mut addresses = checksum::Delta::default();
    if let Some((a, _)) = src {
        let new = a.octets();
        addresses = addresses.u32(quad(h, 12), u32::from_ne_bytes(new));
        h[12..16].copy_from_slice(&new);
    }
    if let Some((a, _)) = dst {
        let new = a.octets();
        addresses = addresses.u32(quad(h, 16), u32::from_ne_bytes(new));
        h[16..20].copy_from_slice(&new);
    }
    let ip_checksum = header.plus(addresses).apply(word(h, 10));
    h[10..12].copy_from_slice(&ip_checksum.to_ne_bytes());
    if src.is_none() && dst.is_none() {
        return;
    }
    // Ports at 0 and 2 for both; the checksum at 16 (TCP) or 6 (UDP).
    let (ports, at) = match protocol {
        ipv4::PROTO_TCP => match l4.first_chunk_mut::<{ tcp::HEADER_LEN }>() {
            Some(t) => (&mut t[..], 16),
            None => return,
        },
        ipv4::PROTO_UDP => match l4.first_chunk_mut::<{ udp::HEADER_LEN }>() {
            Some(u) => (&mut u[..], 6),
            None => return,
        },
        _ => return,
    };
    let mut change = addresses;
    if let Some((_, new)) = src {
        let new = new.to_be_bytes();
        change = change.u16(word(ports, 0), u16::from_ne_bytes(new));
        ports[0..2].copy_from_slice(&new);
    }
    if let Some((_, new)) = dst {
        let new = new.to_be_bytes();
        change = change.u16(word(ports, 2), u16::from_ne_bytes(new));
        ports[2..4].copy_from_slice(&new);
    }
    // Byte order does not matter to UDP's "no checksum" (0) and "computed 0" (0xffff)
    // either: both are the same in either order.
    let new = l4_checksum_after(protocol, change, word(ports, at));
    ports[at..at + 2].copy_from_slice(&new.to_ne_bytes());
}

/// Applies `change` to the TCP or UDP checksum at `l4[at..at + 2]` (UDP's "no checksum"
/// stays 0). The caller has checked that the field is within `l4`.
pub(super) fn patch_l4_checksum(l4: &mut [u8], at: usize, protocol: u8, change: checksum::Delta) {
    let new = l4_checksum_after(protocol, change, u16::from_be_bytes([l4[at], l4[at + 1]]));
    l4[at..at + 2].copy_from_slice(&new.to_be_bytes());
}

/// A TCP or UDP checksum `old` after `change` (UDP's "no checksum" stays 0), in whichever
/// byte order both were read.
#[inline(always)]
fn l4_checksum_after(protocol: u8, change: checksum::Delta, old: u16) -> u16 {
    if protocol == ipv4::PROTO_UDP {
        change.apply_udp(old)
    } else {
        change.apply(old)
    }
}

fn translate(
    ip: &mut [u8],
    src: Option<(Ipv4Addr, u16)>,
    dst: Option<(Ipv4Addr, u16)>,
    decrement_ttl: bool,
) {
    let mut p = Ipv4Packet::new_unchecked(&mut *ip);
    let protocol = p.protocol();
    // TTL and protocol share a 16-bit word of the header (not of the pseudo-header).
    let mut header = checksum::Delta::default();
    if decrement_ttl {
        let ttl = p.ttl();
        let next = ttl.saturating_sub(1);
        header = header.u16(
            u16::from_be_bytes([ttl, protocol]),
            u16::from_be_bytes([next, protocol]),
        );
        p.set_ttl(next);
    }
    // The addresses' change sum patches the IPv4 checksum; extended with the ports', it
    // patches the transport checksum (which covers the addresses through the
    // pseudo-header). Each checksum is patched once.
    let mut addresses = checksum::Delta::default();
    if let Some((a, _)) = src {
        addresses = addresses.u32(u32::from(p.src()), u32::from(a));
        p.set_src(a);
    }
    if let Some((a, _)) = dst {
        addresses = addresses.u32(u32::from(p.dst()), u32::from(a));
        p.set_dst(a);
    }
    p.set_checksum(header.plus(addresses).apply(p.checksum()));
    let translated = src.is_some() || dst.is_some();
    if !translated || (p.is_fragment() && p.frag_offset() != 0) {
        return;
    }
    let seg = p.payload_mut();
    match protocol {
        ipv4::PROTO_TCP => {
            let Ok(mut t) = TcpPacket::new_checked(seg) else {
                return;
            };
            let mut change = addresses;
            if let Some((_, port)) = src {
                change = change.u16(t.src_port(), port);
                t.set_src_port(port);
            }
            if let Some((_, port)) = dst {
                change = change.u16(t.dst_port(), port);
                t.set_dst_port(port);
            }
            t.set_checksum(change.apply(t.checksum()));
        }
        ipv4::PROTO_UDP => {
            let Ok(mut u) = UdpPacket::new_checked(seg) else {
                return;
            };
            let mut change = addresses;
            if let Some((_, port)) = src {
                change = change.u16(u.src_port(), port);
                u.set_src_port(port);
            }
            if let Some((_, port)) = dst {
                change = change.u16(u.dst_port(), port);
                u.set_dst_port(port);
            }
            u.set_checksum(change.apply_udp(u.checksum()));
        }
        ipv4::PROTO_SCTP => {
            let Ok(mut s) = SctpPacket::new_checked(seg) else {
                return;
            };
            if let Some((_, port)) = src {
                s.set_src_port(port);
            }
            if let Some((_, port)) = dst {
                s.set_dst_port(port);
            }
            if src.is_some() || dst.is_some() {
                s.fill_checksum();
            }
        }
        ipv4::PROTO_ICMP => {
            let Ok(mut m) = IcmpPacket::new_checked(seg) else {
                return;
            };
            if matches!(
                m.msg_type(),
                icmp::TYPE_ECHO_REQUEST | icmp::TYPE_ECHO_REPLY
            ) {
                let new_ident = match (src, dst, m.msg_type()) {
                    (Some((_, port)), _, icmp::TYPE_ECHO_REQUEST) => Some(port),
                    (_, Some((_, port)), icmp::TYPE_ECHO_REPLY) => Some(port),
                    _ => None,
                };
                if let Some(ident) = new_ident {
                    let c = checksum::update_u16(m.checksum(), m.echo_ident(), ident);
                    m.set_echo_ident(ident);
                    m.set_checksum(c);
                }
            }
        }
        _ => {}
    }
}

/// Turns the frame (Ethernet header of `l2` bytes, then the IPv4 packet that caused the
/// error) into an ICMP error from `src` to the offender's source quoting its IP header and
/// 8 bytes of payload (RFC 792 / 1812). The Ethernet header (and tag) stays; MACs are
/// the caller's. Returns false when the frame cannot be resized.
pub fn build_icmp_error(
    frame: &mut impl crate::frame::Frame,
    l2: usize,
    src: Ipv4Addr,
    (msg_type, code): (u8, u8),
    mtu: u16,
) -> bool {
    let (dst, quoted) = {
        let p = Ipv4Packet::new_unchecked(&frame.data()[l2..]);
        let quoted = (p.header_len() + 8).min(usize::from(p.total_len()));
        (p.src(), quoted)
    };
    const NEW: usize = ipv4::HEADER_LEN + icmp::HEADER_LEN;
    let need = l2 + NEW + quoted;
    if frame.len() < need && !frame.resize(need) {
        return false;
    }
    let data = frame.data_mut();
    data.copy_within(l2..l2 + quoted, l2 + NEW);
    {
        let mut e = EthernetFrame::new_unchecked(&mut data[..]);
        e.set_ethertype(ethernet::ETHERTYPE_IPV4);
    }
    let mut p = Ipv4Packet::new_unchecked(&mut data[l2..need]);
    p.set_version(4);
    p.set_header_len(ipv4::HEADER_LEN);
    p.set_dscp_ecn(0);
    p.set_total_len((NEW + quoted) as u16);
    p.set_ident(0);
    p.clear_flags();
    p.set_ttl(64);
    p.set_protocol(ipv4::PROTO_ICMP);
    p.set_src(src);
    p.set_dst(dst);
    p.fill_checksum();
    let mut m = IcmpPacket::new_unchecked(p.payload_mut());
    m.set_msg_type(msg_type);
    m.set_msg_code(code);
    m.clear_rest_of_header();
    m.set_next_hop_mtu(mtu);
    m.fill_checksum();
    frame.resize(need)
}

/// Turns an ICMP echo request (validated) into the reply in place: addresses swapped,
/// type 0, TTL 64, checksums patched.
pub fn echo_reply(ip: &mut [u8]) {
    let mut p = Ipv4Packet::new_unchecked(&mut *ip);
    let (src, dst) = (p.src(), p.dst());
    p.set_src(dst);
    p.set_dst(src);
    p.set_ttl(64);
    p.fill_checksum();
    let mut m = IcmpPacket::new_unchecked(p.payload_mut());
    let old = u16::from_be_bytes([m.msg_type(), m.msg_code()]);
    let new = u16::from_be_bytes([icmp::TYPE_ECHO_REPLY, m.msg_code()]);
    m.set_msg_type(icmp::TYPE_ECHO_REPLY);
    let c = checksum::update_u16(m.checksum(), old, new);
    m.set_checksum(c);
}

/// Bytes of an [`EncapTemplate`]: the outer headers and the inner Ethernet addresses.
pub const ENCAP_TEMPLATE_LEN: usize = VXLAN_OVERHEAD + 12;

/// What a VXLAN hop sends every packet with.
pub struct EncapHop {
    /// The outer next hop's MAC (zero while it is unresolved).
    pub next_hop_mac: MacAddr,
    /// The out-port's MAC: outer and inner source.
    pub src_mac: MacAddr,
    /// The remote VTEP's MAC: the inner destination.
    pub inner_dst_mac: MacAddr,
    pub local_vtep: Ipv4Addr,
    pub remote_vtep: Ipv4Addr,
    pub udp_port: u16,
    pub vni: u32,
}

/// A VXLAN hop's rewrite string (VPP's term): the outer Ethernet, IPv4, UDP and VXLAN
/// headers and the inner MACs, built once per adjacency. Per packet, [`Self::encapsulate`]
/// copies it and patches only what depends on the packet: the outer TOS, DF, lengths,
/// IPv4 checksum (from a precomputed sum of the fixed words) and the entropy port.
#[derive(Clone, Copy, Debug)]
pub struct EncapTemplate {
    bytes: [u8; ENCAP_TEMPLATE_LEN],
    /// Ones'-complement sum of the outer IPv4 header words that never change.
    fixed_sum: u32,
}

impl EncapTemplate {
    pub fn new(hop: &EncapHop) -> EncapTemplate {
        let mut b = [0u8; ENCAP_TEMPLATE_LEN];
        let (local, remote) = (u32::from(hop.local_vtep), u32::from(hop.remote_vtep));
        let version_ihl = 0x4500u16;
        let ttl_protocol = (64u16 << 8) | u16::from(ipv4::PROTO_UDP);
        b[0..6].copy_from_slice(hop.next_hop_mac.as_bytes());
        b[6..12].copy_from_slice(hop.src_mac.as_bytes());
        b[12..14].copy_from_slice(&ethernet::ETHERTYPE_IPV4.to_be_bytes());
        // 14..26: version/IHL, TOS, length, ident 0, flags, TTL 64, UDP, checksum.
        b[14..16].copy_from_slice(&version_ihl.to_be_bytes());
        b[22..24].copy_from_slice(&ttl_protocol.to_be_bytes());
        b[26..30].copy_from_slice(&local.to_be_bytes());
        b[30..34].copy_from_slice(&remote.to_be_bytes());
        // 34..42: entropy port, VXLAN port, length, checksum 0 (allowed for VXLAN over
        // IPv4, RFC 7348 §5).
        b[36..38].copy_from_slice(&hop.udp_port.to_be_bytes());
        b[42..46].copy_from_slice(&(u32::from(vxlan::FLAG_I) << 24).to_be_bytes());
        b[46..50].copy_from_slice(&((hop.vni & 0x00ff_ffff) << 8).to_be_bytes());
        b[50..56].copy_from_slice(hop.inner_dst_mac.as_bytes());
        b[56..62].copy_from_slice(hop.src_mac.as_bytes());
        let fixed_sum = u32::from(version_ihl)
            + u32::from(ttl_protocol)
            + (local >> 16)
            + (local & 0xffff)
            + (remote >> 16)
            + (remote & 0xffff);
        EncapTemplate {
            bytes: b,
            fixed_sum,
        }
    }

    /// Prepends the outer headers to `frame` and sets its (now inner) Ethernet addresses.
    /// The inner IPv4 header is at `inner_ip` and the frame ends with it: DF and DSCP/ECN
    /// are copied from it. The outer UDP source port is 49152 + `entropy` % 16384 (the
    /// inner flow's hash: stable per flow and direction). Returns false without headroom
    /// or when the result would exceed 64 KiB.
    #[inline]
    pub fn encapsulate(
        &self,
        frame: &mut impl crate::frame::Frame,
        inner_ip: usize,
        entropy: u64,
    ) -> bool {
        let Some(ip) = frame
            .data()
            .get(inner_ip..)
            .and_then(|d| d.first_chunk::<{ ipv4::HEADER_LEN }>())
        else {
            return false;
        };
        let tos = ip[1];
        let flags: u16 = if ip[6] & 0x40 != 0 { 0x4000 } else { 0 };
        let ip_len = VXLAN_OVERHEAD - ethernet::HEADER_LEN + frame.len();
        let (Ok(ip_len), Ok(udp_len)) = (
            u16::try_from(ip_len),
            u16::try_from(ip_len - ipv4::HEADER_LEN),
        ) else {
            return false;
        };
        if !frame.prepend(VXLAN_OVERHEAD) {
            return false;
        }
        // One copy of the whole template, then the patches: each written once, and the
        // checksum summed from values, never read back from the frame (reading bytes just
        // written narrower defeats store-to-load forwarding).
        let Some(out) = frame.data_mut().first_chunk_mut::<ENCAP_TEMPLATE_LEN>() else {
            return false;
        };
        *out = self.bytes;
        let ip_checksum =
            !checksum::fold(self.fixed_sum + u32::from(tos) + u32::from(ip_len) + u32::from(flags));
        let source_port = 49152 + (entropy % 16384) as u16;
        out[15] = tos;
        out[16..18].copy_from_slice(&ip_len.to_be_bytes());
        out[20..22].copy_from_slice(&flags.to_be_bytes());
        out[24..26].copy_from_slice(&ip_checksum.to_be_bytes());
        out[34..36].copy_from_slice(&source_port.to_be_bytes());
        out[38..40].copy_from_slice(&udp_len.to_be_bytes());
        true
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddrV4};

    use proptest::prelude::*;

    use super::*;
    use crate::wire::build::FrameBuilder;
    use crate::wire::TcpFlags;

    fn endpoint() -> impl Strategy<Value = (Ipv4Addr, u16)> {
        (any::<u32>(), any::<u16>()).prop_map(|(a, p)| (Ipv4Addr::from(a), p))
    }

    proptest! {
        /// The fast path's fixed-offset rewrite changes exactly the bytes the general one
        /// does, and both leave every checksum right (verified by recomputing).
        #[test]
        fn whole_rewrite_equals_the_general_one(
            udp in any::<bool>(),
            src in endpoint(),
            dst in endpoint(),
            ttl in 2u8..=255,
            payload in proptest::collection::vec(any::<u8>(), 0..64),
            new_src in proptest::option::of(endpoint()),
            new_dst in proptest::option::of(endpoint()),
        ) {
            let b = FrameBuilder::new(MacAddr([2; 6]), MacAddr([4; 6])).ttl(ttl);
            let (s, d) = (SocketAddrV4::new(src.0, src.1), SocketAddrV4::new(dst.0, dst.1));
            let frame = if udp {
                b.udp_v4(s, d, &payload)
            } else {
                b.tcp_v4(s, d, TcpFlags::ACK, &payload)
            };
            let mut general = frame[ethernet::HEADER_LEN..].to_vec();
            let mut whole = general.clone();
            forward_rewrite(&mut general, new_src, new_dst);
            forward_rewrite_whole(&mut whole, new_src, new_dst);
            prop_assert_eq!(&general, &whole);

            let p = Ipv4Packet::new_checked(&whole[..]).unwrap();
            prop_assert!(p.verify_checksum());
            prop_assert_eq!(p.ttl(), ttl - 1);
            let pseudo = checksum::pseudo_header_v4(
                p.src(),
                p.dst(),
                p.protocol(),
                p.payload().len() as u16,
            );
            let l4_checksum = checksum::compute(pseudo, p.payload());
            // A UDP checksum of 0 would mean "none"; builders always fill one in.
            prop_assert!(l4_checksum == 0 || (udp && l4_checksum == 0xffff));
        }
    }
}
