//! Zero-copy header views for the packet path, in the style of smoltcp's `wire`.
//!
//! Every header is a view `Packet<T: AsRef<[u8]>> { buffer: T }` over bytes owned elsewhere
//! (an mbuf's data room, a `Vec<u8>` in a test). Getters need `AsRef<[u8]>`, setters
//! `AsMut<[u8]>`. Field offsets live in a private `mod field` per file.
//!
//! - `new_checked(buffer)` is for received bytes: it verifies lengths (and the few fields that
//!   decide where the other fields are) once, after which no getter can panic.
//! - `new_unchecked(buffer)` is for buffers the caller has just sized itself (building a
//!   packet); an accessor on a too-short buffer panics.
//!
//! [`checksum`] holds the Internet checksum, including RFC 1624 incremental updates for
//! DNAT/SNAT rewrites, and [`build`] makes complete, valid frames for tests, the benchmark
//! generator and the lab.

pub mod arp;
pub mod build;
pub mod checksum;
pub mod ethernet;
pub mod icmp;
pub mod ipv4;
pub mod sctp;
pub mod tcp;
pub mod udp;
pub mod vxlan;

pub use arp::ArpPacket;
pub use ethernet::{EthernetFrame, MacAddr};
pub use icmp::IcmpPacket;
pub use ipv4::Ipv4Packet;
pub use sctp::SctpPacket;
pub use tcp::{TcpFlags, TcpPacket};
pub use udp::UdpPacket;
pub use vxlan::VxlanPacket;

/// A byte range of a header field.
pub(crate) type Field = core::ops::Range<usize>;

/// Why a buffer is not a valid header view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Error {
    /// The buffer is shorter than the header, or than a length field says it is.
    #[error("truncated packet")]
    Truncated,
    /// A field has a value that makes the header meaningless (bad version, IHL < 5, ...).
    #[error("malformed packet")]
    Malformed,
}

/// Result of building a header view.
pub type Result<T> = core::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    //! Arbitrary bytes through every `new_checked`, then through every accessor: nothing
    //! may panic.
    use super::*;
    use proptest::prelude::*;
    use std::net::Ipv4Addr;

    fn touch_ethernet(bytes: &[u8]) {
        if let Ok(f) = EthernetFrame::new_checked(bytes) {
            let _ = (
                f.dst_addr(),
                f.src_addr(),
                f.ethertype(),
                f.vlan_id(),
                f.vlan_tci(),
            );
            let _ = (f.header_len(), f.payload().len());
        }
    }

    fn touch_arp(bytes: &[u8]) {
        if let Ok(p) = ArpPacket::new_checked(bytes) {
            let _ = (p.hardware_type(), p.protocol_type(), p.hardware_len());
            let _ = (p.protocol_len(), p.operation());
            let _ = (p.sender_hw(), p.sender_ip(), p.target_hw(), p.target_ip());
        }
    }

    fn touch_ipv4(bytes: &[u8]) {
        if let Ok(p) = Ipv4Packet::new_checked(bytes) {
            let _ = (
                p.version(),
                p.header_len(),
                p.dscp_ecn(),
                p.total_len(),
                p.ident(),
            );
            let _ = (
                p.dont_frag(),
                p.more_frags(),
                p.frag_offset(),
                p.is_fragment(),
            );
            let _ = (p.ttl(), p.protocol(), p.checksum(), p.src(), p.dst());
            let _ = (p.verify_checksum(), p.options().len(), p.payload().len());
        }
    }

    fn touch_l4(bytes: &[u8]) {
        let (a, b) = (Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2));
        if let Ok(p) = UdpPacket::new_checked(bytes) {
            let _ = (p.src_port(), p.dst_port(), p.len(), p.checksum());
            let _ = (p.payload().len(), p.verify_checksum(a, b));
        }
        if let Ok(p) = TcpPacket::new_checked(bytes) {
            let _ = (p.src_port(), p.dst_port(), p.seq_number(), p.ack_number());
            let _ = (p.header_len(), p.flags(), p.window_len(), p.checksum());
            let _ = (p.urgent_at(), p.options().len(), p.payload().len());
            let _ = p.verify_checksum(a, b);
        }
        if let Ok(p) = IcmpPacket::new_checked(bytes) {
            let _ = (p.msg_type(), p.msg_code(), p.checksum(), p.echo_ident());
            let _ = (p.echo_seq_no(), p.next_hop_mtu(), p.is_error());
            let _ = (p.payload().len(), p.verify_checksum());
        }
        if let Ok(p) = SctpPacket::new_checked(bytes) {
            let _ = (
                p.src_port(),
                p.dst_port(),
                p.verification_tag(),
                p.checksum(),
            );
            let _ = (p.compute_checksum(), p.verify_checksum(), p.payload().len());
        }
        if let Ok(p) = VxlanPacket::new_checked(bytes) {
            let _ = (p.flags(), p.vni(), p.payload().len());
        }
    }

    fn touch_all(bytes: &[u8]) {
        touch_ethernet(bytes);
        touch_arp(bytes);
        touch_ipv4(bytes);
        touch_l4(bytes);
    }

    /// DNAT the way the packet path does it: rewrite destination address and port, patch
    /// the IPv4 and L4 checksums incrementally (RFC 1624), and compare with a full
    /// recompute.
    fn dnat_incremental(frame: &mut [u8], new_dst: Ipv4Addr, new_port: u16) {
        let eth_len = EthernetFrame::new_checked(&*frame).unwrap().header_len();
        let mut ip = Ipv4Packet::new_checked(&mut frame[eth_len..]).unwrap();
        let (old_dst, proto) = (ip.dst(), ip.protocol());
        ip.set_dst(new_dst);
        let (old, new) = (u32::from(old_dst), u32::from(new_dst));
        ip.set_checksum(checksum::update_u32(ip.checksum(), old, new));
        match proto {
            ipv4::PROTO_TCP => {
                let mut t = TcpPacket::new_checked(ip.payload_mut()).unwrap();
                let c = checksum::update_u32(t.checksum(), old, new);
                let c = checksum::update_u16(c, t.dst_port(), new_port);
                t.set_dst_port(new_port);
                t.set_checksum(c);
            }
            ipv4::PROTO_UDP => {
                let mut u = UdpPacket::new_checked(ip.payload_mut()).unwrap();
                let c = checksum::update_udp_u32(u.checksum(), old, new);
                let c = checksum::update_udp_u16(c, u.dst_port(), new_port);
                u.set_dst_port(new_port);
                u.set_checksum(c);
            }
            _ => unreachable!(),
        }
    }

    proptest! {
        #[test]
        fn dnat_incremental_matches_full_build(
            tcp in any::<bool>(),
            src in any::<u32>(), sport in any::<u16>(),
            dst in any::<u32>(), dport in any::<u16>(),
            new_dst in any::<u32>(), new_port in any::<u16>(),
            payload in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let b = build::FrameBuilder::new(MacAddr([2, 0, 0, 0, 0, 1]), MacAddr([2, 0, 0, 0, 0, 2]));
            let s = std::net::SocketAddrV4::new(src.into(), sport);
            let make = |d: u32, p: u16| {
                let d = std::net::SocketAddrV4::new(d.into(), p);
                if tcp { b.tcp_v4(s, d, TcpFlags::ACK, &payload) } else { b.udp_v4(s, d, &payload) }
            };
            let mut frame = make(dst, dport);
            dnat_incremental(&mut frame, new_dst.into(), new_port);
            prop_assert_eq!(frame, make(new_dst, new_port));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            touch_all(&bytes);
        }

        #[test]
        fn mutated_valid_frames_never_panic(
            which in 0usize..5,
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8),
            cut in any::<usize>(),
        ) {
            let b = build::FrameBuilder::new(MacAddr([2, 0, 0, 0, 0, 1]), MacAddr([2, 0, 0, 0, 0, 2]));
            let (s, d) = ("10.0.0.1:1000".parse().unwrap(), "10.0.0.2:80".parse().unwrap());
            let mut frame = match which {
                0 => b.tcp_v4(s, d, TcpFlags::SYN, b"hello"),
                1 => b.udp_v4(s, d, b"hello"),
                2 => b.sctp_v4(s, d, 0, &build::sctp_init_chunk(7)),
                3 => b.icmp_echo_v4(*s.ip(), *d.ip(), true, 1, 2, b"ping"),
                _ => build::arp_request(MacAddr([2, 0, 0, 0, 0, 1]), *s.ip(), *d.ip()),
            };
            for (at, x) in flips {
                let n = frame.len();
                frame[at % n] ^= x;
            }
            frame.truncate(cut % (frame.len() + 1));
            // Walk the layers the way the pipeline does: every offset into the frame.
            for start in 0..frame.len() {
                touch_all(&frame[start..]);
            }
        }
    }
}
