//! A small packet builder for tests, the benchmark generator and the lab: complete Ethernet
//! frames as `Vec<u8>`, every length and checksum right.
//!
//! ```
//! use dataplane::wire::build::{self, FrameBuilder};
//! use dataplane::wire::{MacAddr, TcpFlags};
//!
//! let (a, b) = (MacAddr([2, 0, 0, 0, 0, 1]), MacAddr([2, 0, 0, 0, 0, 2]));
//! let syn = build::tcp_v4(a, b, "10.0.0.1:40000".parse().unwrap(),
//!                         "10.96.0.10:80".parse().unwrap(), TcpFlags::SYN, b"");
//! let tagged = FrameBuilder::new(a, b).vlan(100).ttl(1).udp_v4(
//!     "10.0.0.1:5000".parse().unwrap(), "10.96.0.10:53".parse().unwrap(), b"q");
//! assert_eq!(tagged.len(), syn.len() - 20 + 8 + 4 + 1);
//! ```

use super::ethernet::{self, EthernetFrame, MacAddr};
use super::icmp::{self, IcmpPacket};
use super::ipv4::{self, Ipv4Packet};
use super::sctp::{self, SctpPacket};
use super::tcp::{self, TcpFlags, TcpPacket};
use super::udp::{self, UdpPacket};
use super::vxlan::{self, VxlanPacket};
use super::{arp, ArpPacket};
use std::net::{Ipv4Addr, SocketAddrV4};

/// Minimum Ethernet frame length without FCS.
pub const MIN_FRAME_LEN: usize = 60;

/// Layer 2 and IPv4 knobs shared by every frame; the L4 methods build the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameBuilder {
    /// Ethernet source.
    pub src_mac: MacAddr,
    /// Ethernet destination.
    pub dst_mac: MacAddr,
    /// An 802.1Q tag with this VLAN id (PCP 0).
    pub vlan: Option<u16>,
    /// Pad frames to the 60-byte Ethernet minimum, as a NIC would.
    pub pad: bool,
    /// IPv4 TTL (64).
    pub ttl: u8,
    /// IPv4 identification (0).
    pub ident: u16,
    /// IPv4 Don't Fragment (false).
    pub dont_frag: bool,
    /// IPv4 DSCP/ECN byte (0).
    pub dscp_ecn: u8,
    /// IPv4 options, already padded to a multiple of 4 (none).
    pub ip_options: Vec<u8>,
    /// TCP sequence number (0x1000).
    pub tcp_seq: u32,
    /// TCP acknowledgment number (0).
    pub tcp_ack: u32,
    /// TCP window (65535).
    pub tcp_window: u16,
}

impl FrameBuilder {
    /// Defaults: untagged, unpadded, TTL 64, ident 0, no DF, no options.
    pub fn new(src_mac: MacAddr, dst_mac: MacAddr) -> Self {
        FrameBuilder {
            src_mac,
            dst_mac,
            vlan: None,
            pad: false,
            ttl: 64,
            ident: 0,
            dont_frag: false,
            dscp_ecn: 0,
            ip_options: Vec::new(),
            tcp_seq: 0x1000,
            tcp_ack: 0,
            tcp_window: 0xffff,
        }
    }

    /// Tag frames with this VLAN id.
    pub fn vlan(mut self, vid: u16) -> Self {
        self.vlan = Some(vid & 0x0fff);
        self
    }

    /// Pad frames to 60 bytes.
    pub fn pad(mut self, pad: bool) -> Self {
        self.pad = pad;
        self
    }

    /// Sets the TTL.
    pub fn ttl(mut self, ttl: u8) -> Self {
        self.ttl = ttl;
        self
    }

    /// Sets the IP identification.
    pub fn ident(mut self, ident: u16) -> Self {
        self.ident = ident;
        self
    }

    /// Sets Don't Fragment.
    pub fn dont_frag(mut self, df: bool) -> Self {
        self.dont_frag = df;
        self
    }

    /// Sets DSCP/ECN.
    pub fn dscp_ecn(mut self, value: u8) -> Self {
        self.dscp_ecn = value;
        self
    }

    /// Sets IPv4 options, padded with End-of-Option-List (0) to a multiple of 4. Panics past
    /// 40 bytes.
    pub fn ip_options(mut self, options: &[u8]) -> Self {
        let mut o = options.to_vec();
        o.resize(options.len().div_ceil(4) * 4, 0);
        assert!(o.len() <= 40, "IPv4 options are at most 40 bytes");
        self.ip_options = o;
        self
    }

    /// Sets the TCP sequence and acknowledgment numbers.
    pub fn tcp_seq(mut self, seq: u32, ack: u32) -> Self {
        self.tcp_seq = seq;
        self.tcp_ack = ack;
        self
    }

    /// An Ethernet frame around `payload`.
    pub fn ethernet(&self, ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let header_len = match self.vlan {
            Some(_) => ethernet::VLAN_HEADER_LEN,
            None => ethernet::HEADER_LEN,
        };
        let mut buf = vec![0; header_len + payload.len()];
        let mut f = EthernetFrame::new_unchecked(&mut buf[..]);
        f.set_dst_addr(self.dst_mac);
        f.set_src_addr(self.src_mac);
        if let Some(vid) = self.vlan {
            f.set_vlan_tci(vid);
        }
        f.set_ethertype(ethertype);
        f.payload_mut().copy_from_slice(payload);
        if self.pad && buf.len() < MIN_FRAME_LEN {
            buf.resize(MIN_FRAME_LEN, 0);
        }
        buf
    }

    /// An IPv4 packet (no Ethernet) around an L4 segment whose checksum is already right.
    pub fn ipv4_packet(&self, src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, l4: &[u8]) -> Vec<u8> {
        let header_len = ipv4::HEADER_LEN + self.ip_options.len();
        let total = header_len + l4.len();
        let total_len = u16::try_from(total).expect("IPv4 packet larger than 64 KiB");
        let mut buf = vec![0; total];
        let mut p = Ipv4Packet::new_unchecked(&mut buf[..]);
        p.set_version(4);
        p.set_header_len(header_len);
        p.set_dscp_ecn(self.dscp_ecn);
        p.set_total_len(total_len);
        p.set_ident(self.ident);
        p.set_dont_frag(self.dont_frag);
        p.set_ttl(self.ttl);
        p.set_protocol(protocol);
        p.set_src(src);
        p.set_dst(dst);
        p.options_mut().copy_from_slice(&self.ip_options);
        p.payload_mut().copy_from_slice(l4);
        p.fill_checksum();
        buf
    }

    /// An Ethernet frame carrying an IPv4 packet around `l4`.
    pub fn ipv4(&self, src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, l4: &[u8]) -> Vec<u8> {
        self.ethernet(
            ethernet::ETHERTYPE_IPV4,
            &self.ipv4_packet(src, dst, protocol, l4),
        )
    }

    /// A TCP segment with a 20-byte header.
    pub fn tcp_v4(
        &self,
        src: SocketAddrV4,
        dst: SocketAddrV4,
        flags: TcpFlags,
        payload: &[u8],
    ) -> Vec<u8> {
        let mut seg = vec![0; tcp::HEADER_LEN + payload.len()];
        let mut t = TcpPacket::new_unchecked(&mut seg[..]);
        t.set_src_port(src.port());
        t.set_dst_port(dst.port());
        t.set_seq_number(self.tcp_seq);
        t.set_ack_number(self.tcp_ack);
        t.set_header_len(tcp::HEADER_LEN);
        t.set_flags(flags);
        t.set_window_len(self.tcp_window);
        t.payload_mut().copy_from_slice(payload);
        t.fill_checksum(*src.ip(), *dst.ip());
        self.ipv4(*src.ip(), *dst.ip(), ipv4::PROTO_TCP, &seg)
    }

    /// A UDP datagram with its checksum.
    pub fn udp_v4(&self, src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
        let seg = udp_datagram(src, dst, payload, true);
        self.ipv4(*src.ip(), *dst.ip(), ipv4::PROTO_UDP, &seg)
    }

    /// An SCTP packet with these chunks (see [`sctp_init_chunk`], [`sctp_data_chunk`]).
    pub fn sctp_v4(
        &self,
        src: SocketAddrV4,
        dst: SocketAddrV4,
        verification_tag: u32,
        chunks: &[u8],
    ) -> Vec<u8> {
        let mut seg = vec![0; sctp::HEADER_LEN + chunks.len()];
        let mut s = SctpPacket::new_unchecked(&mut seg[..]);
        s.set_src_port(src.port());
        s.set_dst_port(dst.port());
        s.set_verification_tag(verification_tag);
        s.payload_mut().copy_from_slice(chunks);
        s.fill_checksum();
        self.ipv4(*src.ip(), *dst.ip(), ipv4::PROTO_SCTP, &seg)
    }

    /// An ICMP echo request (or reply).
    pub fn icmp_echo_v4(
        &self,
        src: Ipv4Addr,
        dst: Ipv4Addr,
        request: bool,
        ident: u16,
        seq_no: u16,
        payload: &[u8],
    ) -> Vec<u8> {
        let mut msg = vec![0; icmp::HEADER_LEN + payload.len()];
        let mut m = IcmpPacket::new_unchecked(&mut msg[..]);
        m.set_msg_type(if request {
            icmp::TYPE_ECHO_REQUEST
        } else {
            icmp::TYPE_ECHO_REPLY
        });
        m.set_echo_ident(ident);
        m.set_echo_seq_no(seq_no);
        m.payload_mut().copy_from_slice(payload);
        m.fill_checksum();
        self.ipv4(src, dst, ipv4::PROTO_ICMP, &msg)
    }

    /// An ICMP error (dest-unreachable, time-exceeded) about `original`, an IPv4 packet: it
    /// embeds the original header and the first 8 bytes of its payload. `mtu` fills the
    /// next-hop MTU field (use 0 except for frag-needed).
    pub fn icmp_error_v4(
        &self,
        src: Ipv4Addr,
        dst: Ipv4Addr,
        (msg_type, code): (u8, u8),
        mtu: u16,
        original: &[u8],
    ) -> Vec<u8> {
        let orig = Ipv4Packet::new_unchecked(original);
        let quoted = original.len().min(orig.header_len() + 8);
        let mut msg = vec![0; icmp::HEADER_LEN + quoted];
        let mut m = IcmpPacket::new_unchecked(&mut msg[..]);
        m.set_msg_type(msg_type);
        m.set_msg_code(code);
        m.set_next_hop_mtu(mtu);
        m.payload_mut().copy_from_slice(&original[..quoted]);
        m.fill_checksum();
        self.ipv4(src, dst, ipv4::PROTO_ICMP, &msg)
    }

    /// An ARP packet (`arp::OP_REQUEST` or `arp::OP_REPLY`) in an Ethernet frame.
    pub fn arp(
        &self,
        operation: u16,
        (sender_hw, sender_ip): (MacAddr, Ipv4Addr),
        (target_hw, target_ip): (MacAddr, Ipv4Addr),
    ) -> Vec<u8> {
        let mut pkt = [0; arp::HEADER_LEN];
        let mut a = ArpPacket::new_unchecked(&mut pkt[..]);
        a.init_ethernet_ipv4();
        a.set_operation(operation);
        a.set_sender_hw(sender_hw);
        a.set_sender_ip(sender_ip);
        a.set_target_hw(target_hw);
        a.set_target_ip(target_ip);
        self.ethernet(ethernet::ETHERTYPE_ARP, &pkt)
    }

    /// `inner_frame` in VXLAN (`vni`) in UDP (`src_port` -> 4789, checksum 0 as RFC 7348
    /// recommends for IPv4) in IPv4, with this builder's MACs and knobs for the outer frame.
    pub fn vxlan_encap(
        &self,
        outer_src_ip: Ipv4Addr,
        outer_dst_ip: Ipv4Addr,
        src_port: u16,
        vni: u32,
        inner_frame: &[u8],
    ) -> Vec<u8> {
        let mut vx = vec![0; vxlan::HEADER_LEN + inner_frame.len()];
        let mut v = VxlanPacket::new_unchecked(&mut vx[..]);
        v.init(vni);
        v.payload_mut().copy_from_slice(inner_frame);
        let src = SocketAddrV4::new(outer_src_ip, src_port);
        let dst = SocketAddrV4::new(outer_dst_ip, vxlan::VXLAN_PORT);
        let seg = udp_datagram(src, dst, &vx, false);
        self.ipv4(outer_src_ip, outer_dst_ip, ipv4::PROTO_UDP, &seg)
    }
}

fn udp_datagram(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8], checksum: bool) -> Vec<u8> {
    let len = udp::HEADER_LEN + payload.len();
    let mut seg = vec![0; len];
    let mut u = UdpPacket::new_unchecked(&mut seg[..]);
    u.set_src_port(src.port());
    u.set_dst_port(dst.port());
    u.set_len(u16::try_from(len).expect("UDP datagram larger than 64 KiB"));
    u.payload_mut().copy_from_slice(payload);
    if checksum {
        u.fill_checksum(*src.ip(), *dst.ip());
    }
    seg
}

/// An SCTP INIT chunk: this initiate tag (also the initial TSN), a_rwnd 65536, 10/10
/// streams, no parameters.
pub fn sctp_init_chunk(initiate_tag: u32) -> Vec<u8> {
    let mut c = Vec::with_capacity(20);
    c.extend_from_slice(&[sctp::CHUNK_INIT, 0]);
    c.extend_from_slice(&20u16.to_be_bytes());
    c.extend_from_slice(&initiate_tag.to_be_bytes());
    c.extend_from_slice(&65536u32.to_be_bytes());
    c.extend_from_slice(&10u16.to_be_bytes());
    c.extend_from_slice(&10u16.to_be_bytes());
    c.extend_from_slice(&initiate_tag.to_be_bytes());
    c
}

/// An SCTP DATA chunk (flags B|E: one unfragmented message), padded to 4 bytes.
pub fn sctp_data_chunk(tsn: u32, stream_id: u16, ppid: u32, data: &[u8]) -> Vec<u8> {
    let len = 16 + data.len();
    let mut c = Vec::with_capacity(len.div_ceil(4) * 4);
    c.extend_from_slice(&[sctp::CHUNK_DATA, 0x03]);
    c.extend_from_slice(
        &u16::try_from(len)
            .expect("DATA chunk too long")
            .to_be_bytes(),
    );
    c.extend_from_slice(&tsn.to_be_bytes());
    c.extend_from_slice(&stream_id.to_be_bytes());
    c.extend_from_slice(&0u16.to_be_bytes()); // stream sequence number
    c.extend_from_slice(&ppid.to_be_bytes());
    c.extend_from_slice(data);
    c.resize(len.div_ceil(4) * 4, 0);
    c
}

/// A TCP frame with default knobs.
pub fn tcp_v4(
    src_mac: MacAddr,
    dst_mac: MacAddr,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    flags: TcpFlags,
    payload: &[u8],
) -> Vec<u8> {
    FrameBuilder::new(src_mac, dst_mac).tcp_v4(src, dst, flags, payload)
}

/// A UDP frame with default knobs.
pub fn udp_v4(
    src_mac: MacAddr,
    dst_mac: MacAddr,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    payload: &[u8],
) -> Vec<u8> {
    FrameBuilder::new(src_mac, dst_mac).udp_v4(src, dst, payload)
}

/// An SCTP frame with default knobs.
pub fn sctp_v4(
    src_mac: MacAddr,
    dst_mac: MacAddr,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    verification_tag: u32,
    chunks: &[u8],
) -> Vec<u8> {
    FrameBuilder::new(src_mac, dst_mac).sctp_v4(src, dst, verification_tag, chunks)
}

/// An ICMP echo request frame with default knobs.
pub fn icmp_echo_v4(
    src_mac: MacAddr,
    dst_mac: MacAddr,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    ident: u16,
    seq_no: u16,
    payload: &[u8],
) -> Vec<u8> {
    FrameBuilder::new(src_mac, dst_mac).icmp_echo_v4(src, dst, true, ident, seq_no, payload)
}

/// A broadcast ARP request "who has `target_ip`? tell `sender_ip`".
pub fn arp_request(sender_mac: MacAddr, sender_ip: Ipv4Addr, target_ip: Ipv4Addr) -> Vec<u8> {
    FrameBuilder::new(sender_mac, MacAddr::BROADCAST).arp(
        arp::OP_REQUEST,
        (sender_mac, sender_ip),
        (MacAddr::ZERO, target_ip),
    )
}

/// A unicast ARP reply "`sender_ip` is at `sender_mac`" to the requester.
pub fn arp_reply(
    sender_mac: MacAddr,
    sender_ip: Ipv4Addr,
    target_mac: MacAddr,
    target_ip: Ipv4Addr,
) -> Vec<u8> {
    FrameBuilder::new(sender_mac, target_mac).arp(
        arp::OP_REPLY,
        (sender_mac, sender_ip),
        (target_mac, target_ip),
    )
}

/// `inner_frame` encapsulated in VXLAN/UDP/IPv4/Ethernet with default knobs.
pub fn vxlan_encap(
    outer_src_mac: MacAddr,
    outer_dst_mac: MacAddr,
    outer_src_ip: Ipv4Addr,
    outer_dst_ip: Ipv4Addr,
    src_port: u16,
    vni: u32,
    inner_frame: &[u8],
) -> Vec<u8> {
    FrameBuilder::new(outer_src_mac, outer_dst_mac).vxlan_encap(
        outer_src_ip,
        outer_dst_ip,
        src_port,
        vni,
        inner_frame,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Error, Result};

    const A: MacAddr = MacAddr([2, 0, 0, 0, 0, 1]);
    const B: MacAddr = MacAddr([2, 0, 0, 0, 0, 2]);

    fn sock(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    /// Parses Ethernet + IPv4 and checks the IP header; returns the L4 bytes.
    fn ip_payload(frame: &[u8], protocol: u8) -> Result<(Ipv4Packet<&[u8]>, &[u8])> {
        let eth = EthernetFrame::new_checked(frame)?;
        assert_eq!(eth.ethertype(), ethernet::ETHERTYPE_IPV4);
        let ip = Ipv4Packet::new_checked(&frame[eth.header_len()..])?;
        assert!(ip.verify_checksum());
        assert_eq!(ip.protocol(), protocol);
        let l4 = &frame[eth.header_len() + ip.header_len()..][..ip.payload().len()];
        Ok((ip, l4))
    }

    #[test]
    fn tcp_frame() {
        let f = tcp_v4(
            A,
            B,
            sock("10.0.0.1:40000"),
            sock("10.96.0.10:80"),
            TcpFlags::SYN,
            b"x",
        );
        assert_eq!(f.len(), 14 + 20 + 20 + 1);
        let (ip, l4) = ip_payload(&f, ipv4::PROTO_TCP).unwrap();
        let t = TcpPacket::new_checked(l4).unwrap();
        assert_eq!(
            (t.src_port(), t.dst_port(), t.flags()),
            (40000, 80, TcpFlags::SYN)
        );
        assert!(t.verify_checksum(ip.src(), ip.dst()));
        assert_eq!(t.payload(), b"x");
        let eth = EthernetFrame::new_checked(&f[..]).unwrap();
        assert_eq!((eth.src_addr(), eth.dst_addr()), (A, B));
    }

    #[test]
    fn udp_frame_with_knobs() {
        let b = FrameBuilder::new(A, B)
            .vlan(42)
            .ttl(3)
            .ident(77)
            .dont_frag(true)
            .dscp_ecn(0xb8)
            .ip_options(&[1, 1])
            .pad(true);
        let f = b.udp_v4(sock("10.0.0.1:5000"), sock("10.0.0.2:53"), b"q");
        assert_eq!(f.len(), MIN_FRAME_LEN); // 18 + 24 + 9 = 51, padded
        let eth = EthernetFrame::new_checked(&f[..]).unwrap();
        assert_eq!(eth.vlan_id(), Some(42));
        let (ip, l4) = ip_payload(&f, ipv4::PROTO_UDP).unwrap();
        assert_eq!((ip.ttl(), ip.ident(), ip.dont_frag()), (3, 77, true));
        assert_eq!(ip.dscp_ecn(), 0xb8);
        assert_eq!(ip.options(), &[1, 1, 0, 0]);
        assert_eq!(ip.payload().len(), 9); // the padding is not in the payload
        let u = UdpPacket::new_checked(l4).unwrap();
        assert_ne!(u.checksum(), 0);
        assert!(u.verify_checksum(ip.src(), ip.dst()));
        assert_eq!(u.payload(), b"q");
    }

    #[test]
    fn sctp_frames() {
        let (s, d) = (sock("10.0.0.1:4068"), sock("10.0.0.2:3868"));
        for (tag, chunk) in [
            (0, sctp_init_chunk(0x1234)),
            (9, sctp_data_chunk(1, 0, 46, b"abc")),
        ] {
            let f = sctp_v4(A, B, s, d, tag, &chunk);
            let (_, l4) = ip_payload(&f, ipv4::PROTO_SCTP).unwrap();
            let p = SctpPacket::new_checked(l4).unwrap();
            assert!(p.verify_checksum());
            assert_eq!(p.verification_tag(), tag);
            assert_eq!(p.payload(), &chunk[..]);
            assert_eq!(p.payload().len() % 4, 0);
        }
    }

    #[test]
    fn icmp_frames() {
        let (s, d) = (Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2));
        let f = icmp_echo_v4(A, B, s, d, 7, 8, b"ping");
        let (_, l4) = ip_payload(&f, ipv4::PROTO_ICMP).unwrap();
        let m = IcmpPacket::new_checked(l4).unwrap();
        assert_eq!((m.msg_type(), m.echo_ident(), m.echo_seq_no()), (8, 7, 8));
        assert!(m.verify_checksum());

        let b = FrameBuilder::new(A, B);
        let orig = b.udp_v4(sock("10.0.0.1:5000"), sock("10.0.0.2:53"), &[0; 100]);
        let orig_ip = &orig[14..];
        let code = (icmp::TYPE_DEST_UNREACHABLE, icmp::CODE_FRAG_NEEDED);
        let f = b.icmp_error_v4(d, s, code, 1400, orig_ip);
        let (_, l4) = ip_payload(&f, ipv4::PROTO_ICMP).unwrap();
        let m = IcmpPacket::new_checked(l4).unwrap();
        assert!(m.is_error() && m.verify_checksum());
        assert_eq!(m.next_hop_mtu(), 1400);
        assert_eq!(m.payload(), &orig_ip[..28]);
    }

    #[test]
    fn arp_frames() {
        let (s, d) = (Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2));
        let req = arp_request(A, s, d);
        let eth = EthernetFrame::new_checked(&req[..]).unwrap();
        assert!(eth.dst_addr().is_broadcast());
        assert_eq!(eth.ethertype(), ethernet::ETHERTYPE_ARP);
        let a = ArpPacket::new_checked(eth.payload()).unwrap();
        assert_eq!(a.operation(), arp::OP_REQUEST);
        assert_eq!((a.sender_hw(), a.sender_ip(), a.target_ip()), (A, s, d));

        let rep = arp_reply(B, d, A, s);
        let eth = EthernetFrame::new_checked(&rep[..]).unwrap();
        assert_eq!(eth.dst_addr(), A);
        let a = ArpPacket::new_checked(eth.payload()).unwrap();
        assert_eq!(a.operation(), arp::OP_REPLY);
        assert_eq!((a.sender_hw(), a.sender_ip()), (B, d));
        assert_eq!((a.target_hw(), a.target_ip()), (A, s));
    }

    #[test]
    fn vxlan_frame() {
        let inner = tcp_v4(
            A,
            B,
            sock("10.244.1.5:40000"),
            sock("10.244.2.7:8080"),
            TcpFlags::SYN,
            b"",
        );
        let outer = vxlan_encap(
            B,
            A,
            Ipv4Addr::new(192, 168, 0, 1),
            Ipv4Addr::new(192, 168, 0, 2),
            54321,
            100,
            &inner,
        );
        assert_eq!(outer.len(), inner.len() + 14 + 20 + 8 + 8);
        let (ip, l4) = ip_payload(&outer, ipv4::PROTO_UDP).unwrap();
        let u = UdpPacket::new_checked(l4).unwrap();
        assert_eq!((u.src_port(), u.dst_port(), u.checksum()), (54321, 4789, 0));
        assert!(u.verify_checksum(ip.src(), ip.dst()));
        let v = VxlanPacket::new_checked(u.payload()).unwrap();
        assert_eq!(v.vni(), 100);
        assert_eq!(v.payload(), &inner[..]);
    }

    #[test]
    fn truncated_builder_output_is_rejected() {
        let f = udp_v4(A, B, sock("10.0.0.1:1"), sock("10.0.0.2:2"), b"abc");
        assert_eq!(
            ip_payload(&f[..f.len() - 1], 17).unwrap_err(),
            Error::Truncated
        );
    }
}
