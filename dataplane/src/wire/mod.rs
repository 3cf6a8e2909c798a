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
    /// A valid header of a kind this code does not handle (e.g. ARP for non-Ethernet/IPv4).
    #[error("unsupported packet")]
    Unsupported,
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

    proptest! {
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
