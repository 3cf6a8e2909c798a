//! Katran-style behaviour tables: {description, input frame built with `wire::build`,
//! expected verdict, expected output checked field by field, every checksum verified}.
//! Stateful scenarios (conntrack, affinity, snapshot changes) run as sequences of
//! such steps through one `Pipeline`.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;

use ipnet::Ipv4Net;

use super::*;
use crate::conntrack::{ConntrackConfig, SECOND};
use crate::frame::VecFrame;
use crate::maglev::MaglevTable;
use crate::snapshot::{
    Backend, BackendSet, EndpointState, Frontend, FrontendKey, FrontendKind, InternalPolicy,
    PodCidrRoute, Protocol, ServicePortName, Snapshot,
};
use crate::stats::{DropReason, WorkerStats};
use crate::wire::build::{self, FrameBuilder};
use crate::wire::ethernet::MacAddr;
use crate::wire::{
    arp, icmp, ipv4, ArpPacket, EthernetFrame, IcmpPacket, Ipv4Packet, SctpPacket, TcpFlags,
    TcpPacket, UdpPacket, VxlanPacket,
};

// ----- Topology ----------------------------------------------------------------------------

pub(super) const UPLINK: u16 = 0;
pub(super) const CLUSTER: u16 = 1;
pub(super) const UPLINK_EXC: u16 = 10;
pub(super) const UPLINK_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x01]);
pub(super) const CLUSTER_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 1, 0x01]);
pub(super) const ROUTER_MAC: MacAddr = MacAddr([0x02, 0xee, 0, 0, 0, 0xfe]);
pub(super) const CROUTER_MAC: MacAddr = MacAddr([0x02, 0xee, 0, 0, 1, 0xfe]);
pub(super) const NODE2_MAC: MacAddr = MacAddr([0x02, 0xaa, 0, 0, 0, 0x02]);
pub(super) const NODE2_VXLAN_MAC: MacAddr = MacAddr([0x02, 0xbb, 0, 0, 0, 0x02]);
pub(super) const CLIENT_MAC: MacAddr = MacAddr([0x02, 0xcc, 0, 0, 0, 0x07]);

pub(super) fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}
pub(super) fn sa(s: &str) -> SocketAddrV4 {
    s.parse().unwrap()
}
fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

pub(super) const VNI: u32 = 1;

/// Uplink 192.0.2.1/24 (port 0, exception tap 10, default route via 192.0.2.254), cluster
/// 10.0.0.1/24 (port 1, VTEP; 10.244.0.0/16 via 10.0.0.254). Node VTEPs 10.0.0.2, 10.0.0.3.
pub(super) fn config(worker_index: usize, workers: usize) -> PipelineConfig {
    PipelineConfig {
        ports: vec![
            PortConfig {
                id: UPLINK,
                mac: UPLINK_MAC,
                addresses: vec![net("192.0.2.1/24")],
                role: PortRole::Uplink,
                mtu: 1500,
                exception_port: Some(UPLINK_EXC),
            },
            PortConfig {
                id: CLUSTER,
                mac: CLUSTER_MAC,
                addresses: vec![net("10.0.0.1/24")],
                role: PortRole::Cluster,
                mtu: 1500,
                exception_port: None,
            },
        ],
        routes: vec![
            RouteConfig {
                prefix: net("0.0.0.0/0"),
                via: Some(ip("192.0.2.254")),
                port: UPLINK,
            },
            RouteConfig {
                prefix: net("10.244.0.0/16"),
                via: Some(ip("10.0.0.254")),
                port: CLUSTER,
            },
        ],
        static_neighbors: vec![
            (UPLINK, ip("192.0.2.254"), ROUTER_MAC),
            (CLUSTER, ip("10.0.0.254"), CROUTER_MAC),
            (CLUSTER, ip("10.0.0.2"), NODE2_MAC),
        ],
        vxlan: Some(VxlanConfig {
            udp_port: 4789,
            vni: VNI,
            local_vtep: ip("10.0.0.1"),
        }),
        snat_addresses: vec![],
        snat_port_range: 32768..=60999,
        conntrack: ConntrackConfig {
            capacity: 1024,
            ..ConntrackConfig::default()
        },
        affinity_capacity: 256,
        icmp_errors_per_second: 100,
        worker_index,
        workers,
        neighbor_timeout_ms: 30_000,
        routable_prefixes: vec![],
        reassemble_fragments: true,
    }
}

pub(super) fn pipeline() -> Pipeline {
    Pipeline::new(config(0, 1)).unwrap()
}

/// [`config`] of a gateway that lets uplinks reach the pod CIDRs (`edge.routable_prefixes`),
/// for the tests of routing itself.
pub(super) fn routed_config() -> PipelineConfig {
    PipelineConfig {
        routable_prefixes: vec![net("10.244.0.0/16"), net("10.245.0.0/16")],
        ..config(0, 1)
    }
}

pub(super) fn routed_pipeline() -> Pipeline {
    Pipeline::new(routed_config()).unwrap()
}

// ----- Snapshots -----------------------------------------------------------------------------

pub(super) fn set_of(backends: &[(&str, u16, EndpointState, Option<&str>)]) -> Arc<BackendSet> {
    let mut bs: Vec<Backend> = backends
        .iter()
        .map(|(a, p, s, n)| Backend {
            addr: ip(a),
            port: *p,
            state: *s,
            node: n.map(Arc::from),
        })
        .collect();
    bs.sort_by_key(|b| (b.addr, b.port));
    let mut usable: Vec<u32> = (0..bs.len() as u32)
        .filter(|&i| bs[i as usize].state == EndpointState::Ready)
        .collect();
    if usable.is_empty() {
        usable = (0..bs.len() as u32)
            .filter(|&i| bs[i as usize].state == EndpointState::ServingTerminating)
            .collect();
    }
    let pairs: Vec<(Ipv4Addr, u16)> = usable
        .iter()
        .map(|&i| (bs[i as usize].addr, bs[i as usize].port))
        .collect();
    Arc::new(BackendSet {
        maglev: MaglevTable::build(&pairs, 251),
        backends: bs,
        usable,
    })
}

/// `set`'s endpoints, all ready but `which`, which is in `state`.
fn with_state(set: &BackendSet, which: SocketAddrV4, state: EndpointState) -> Arc<BackendSet> {
    let addrs: Vec<(String, u16)> = set
        .backends
        .iter()
        .map(|b| (b.addr.to_string(), b.port))
        .collect();
    set_of(
        &addrs
            .iter()
            .map(|(a, port)| {
                let s = if SocketAddrV4::new(ip(a), *port) == which {
                    state
                } else {
                    EndpointState::Ready
                };
                (a.as_str(), *port, s, None)
            })
            .collect::<Vec<_>>(),
    )
}

pub(super) fn ready(a: &str, p: u16) -> (&str, u16, EndpointState, Option<&str>) {
    (a, p, EndpointState::Ready, None)
}

pub(super) struct Fe {
    pub kind: FrontendKind,
    pub addr: &'static str,
    pub protocol: Protocol,
    pub port: u16,
    pub set: Arc<BackendSet>,
    pub masquerade: bool,
    pub source_ranges: Vec<Ipv4Net>,
    pub affinity: Option<u32>,
    pub internal: InternalPolicy,
    /// The Service's name (default `svc{id}`): frontends of one Service port share it.
    pub service: Option<&'static str>,
}

pub(super) fn fe(
    kind: FrontendKind,
    addr: &'static str,
    protocol: Protocol,
    port: u16,
    set: &Arc<BackendSet>,
) -> Fe {
    Fe {
        kind,
        addr,
        protocol,
        port,
        set: set.clone(),
        masquerade: kind != FrontendKind::ClusterIp,
        source_ranges: vec![],
        affinity: None,
        internal: InternalPolicy::Cluster,
        service: None,
    }
}

pub(super) fn snapshot(generation: u64, fes: Vec<Fe>) -> Snapshot {
    let mut s = Snapshot {
        generation,
        node_port_addresses: vec![ip("192.0.2.1")],
        service_cidr: Some(net("10.96.0.0/12")),
        pod_routes: vec![
            PodCidrRoute {
                vtep_mac: None,
                cidr: net("10.245.2.0/24"),
                vtep: ip("10.0.0.2"),
                vni: VNI,
                node: Some(Arc::from("node-2")),
            },
            PodCidrRoute {
                vtep_mac: None,
                cidr: net("10.245.3.0/24"),
                vtep: ip("10.0.0.3"),
                vni: VNI,
                node: Some(Arc::from("node-3")),
            },
        ],
        ..Snapshot::default()
    };
    for (id, f) in fes.into_iter().enumerate() {
        let frontend = Arc::new(Frontend {
            id: id as u32,
            service: ServicePortName {
                namespace: Arc::from("default"),
                name: f
                    .service
                    .map_or_else(|| Arc::from(format!("svc{id}").as_str()), Arc::from),
                port_name: Arc::from(""),
                protocol: f.protocol,
            },
            kind: f.kind,
            addr: if f.kind == FrontendKind::NodePort {
                Ipv4Addr::UNSPECIFIED
            } else {
                ip(f.addr)
            },
            protocol: f.protocol,
            port: f.port,
            backends: f.set,
            masquerade: f.masquerade,
            source_ranges: f.source_ranges,
            affinity_timeout_secs: f.affinity,
            internal_policy: f.internal,
        });
        if f.kind == FrontendKind::NodePort {
            s.node_ports.insert((f.protocol, f.port), frontend);
        } else {
            s.service_addresses.insert(frontend.addr, f.kind);
            s.frontends.insert(
                FrontendKey {
                    addr: frontend.addr,
                    protocol: f.protocol,
                    port: f.port,
                },
                frontend,
            );
        }
        s.frontend_count += 1;
    }
    // Every backend is listed by its Service's slices, as the compiler sees them.
    let mut listed = std::collections::HashSet::new();
    for f in s.frontends.values().chain(s.node_ports.values()) {
        for b in &f.backends.backends {
            if listed.insert((f.protocol, b.addr, b.port)) {
                s.backend_presence.add(f.protocol, b.addr, b.port);
            }
        }
    }
    s.index_counters();
    s
}

pub(super) fn empty_snapshot() -> Snapshot {
    snapshot(1, vec![])
}

// ----- Frames in, fields out -------------------------------------------------------------

/// A client frame arriving on the uplink from the router.
pub(super) fn from_router() -> FrameBuilder {
    FrameBuilder::new(ROUTER_MAC, UPLINK_MAC)
}

/// A frame arriving on the cluster port from the cluster router.
pub(super) fn from_cluster() -> FrameBuilder {
    FrameBuilder::new(CROUTER_MAC, CLUSTER_MAC)
}

pub(super) struct Run {
    pub verdict: Verdict,
    pub out: Vec<u8>,
}

pub(super) fn run(
    p: &mut Pipeline,
    snap: &Snapshot,
    port: u16,
    input: &[u8],
    now: Tick,
    stats: &mut WorkerStats,
) -> Run {
    let mut frame = VecFrame::new(input);
    // As a worker does: the burst prefetch's hash goes back with the frame (in debug
    // builds the fast path asserts that it is the key's).
    let hash = p.prefetch_burst(port, std::iter::once(frame.data())).get(0);
    let verdict = p.process_hashed(&mut frame, port, snap, now, stats, hash);
    Run {
        verdict,
        out: frame.into_vec(),
    }
}

/// The fields of an output frame, after verifying every checksum in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Out {
    pub eth_src: MacAddr,
    pub eth_dst: MacAddr,
    pub vlan: Option<u16>,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub ttl: u8,
    pub protocol: u8,
    pub df: bool,
    pub ip_len: usize,
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u16,
    pub icmp: Option<(u8, u8, u16)>,
    /// For ICMP errors: the quoted packet (IP header + 8 bytes).
    pub quoted: Vec<u8>,
    pub payload: Vec<u8>,
}

pub(super) fn parse(out: &[u8]) -> Out {
    let eth = EthernetFrame::new_checked(out).expect("ethernet");
    assert_eq!(eth.ethertype(), ethernet::ETHERTYPE_IPV4, "IPv4 out");
    let ipp = Ipv4Packet::new_checked(eth.payload()).expect("ipv4");
    assert!(ipp.verify_checksum(), "IPv4 header checksum");
    assert_eq!(
        eth.header_len() + usize::from(ipp.total_len()),
        out.len(),
        "frame length matches IPv4 total length"
    );
    let (src, dst) = (ipp.src(), ipp.dst());
    let mut o = Out {
        eth_src: eth.src_addr(),
        eth_dst: eth.dst_addr(),
        vlan: eth.vlan_id(),
        src,
        dst,
        ttl: ipp.ttl(),
        protocol: ipp.protocol(),
        df: ipp.dont_frag(),
        ip_len: usize::from(ipp.total_len()),
        sport: 0,
        dport: 0,
        tcp_flags: 0,
        icmp: None,
        quoted: vec![],
        payload: vec![],
    };
    match ipp.protocol() {
        ipv4::PROTO_TCP => {
            let t = TcpPacket::new_checked(ipp.payload()).unwrap();
            assert!(t.verify_checksum(src, dst), "TCP checksum");
            o.sport = t.src_port();
            o.dport = t.dst_port();
            o.tcp_flags = t.flags().bits();
            o.payload = t.payload().to_vec();
        }
        ipv4::PROTO_UDP => {
            let u = UdpPacket::new_checked(ipp.payload()).unwrap();
            assert!(u.verify_checksum(src, dst), "UDP checksum");
            o.sport = u.src_port();
            o.dport = u.dst_port();
            o.payload = u.payload().to_vec();
        }
        ipv4::PROTO_SCTP => {
            let s = SctpPacket::new_checked(ipp.payload()).unwrap();
            assert!(s.verify_checksum(), "SCTP CRC32c");
            o.sport = s.src_port();
            o.dport = s.dst_port();
        }
        ipv4::PROTO_ICMP => {
            let m = IcmpPacket::new_checked(ipp.payload()).unwrap();
            assert!(m.verify_checksum(), "ICMP checksum");
            o.icmp = Some((m.msg_type(), m.msg_code(), m.next_hop_mtu()));
            if m.is_error() {
                o.quoted = m.payload().to_vec();
                let q = Ipv4Packet::new_checked(&o.quoted[..]);
                // The quoted header's total_len describes the original packet.
                let q = q.unwrap_or_else(|_| Ipv4Packet::new_unchecked(&o.quoted[..]));
                assert!(q.verify_checksum(), "quoted IPv4 header checksum");
            } else {
                o.sport = m.echo_ident();
                o.dport = m.echo_ident();
            }
        }
        _ => {}
    }
    o
}

/// (src, dst, sport, dport) of the packet quoted by an ICMP error.
pub(super) fn quoted_tuple(q: &[u8]) -> (Ipv4Addr, Ipv4Addr, u16, u16) {
    let p = Ipv4Packet::new_unchecked(q);
    let l4 = &q[p.header_len()..];
    (
        p.src(),
        p.dst(),
        u16::from_be_bytes([l4[0], l4[1]]),
        u16::from_be_bytes([l4[2], l4[3]]),
    )
}

fn assert_drop(stats: &WorkerStats, reason: DropReason, n: u64) {
    assert_eq!(stats.drops_of(reason), n, "drops of {reason:?}");
}

// ----- L2 / L3 tables --------------------------------------------------------------------

#[test]
fn arp_table() {
    let snap = snapshot(
        1,
        vec![
            fe(
                FrontendKind::LoadBalancer,
                "198.51.100.10",
                Protocol::Tcp,
                80,
                &set_of(&[ready("10.244.1.5", 8080)]),
            ),
            fe(
                FrontendKind::ClusterIp,
                "10.96.0.10",
                Protocol::Tcp,
                80,
                &set_of(&[ready("10.244.1.5", 8080)]),
            ),
        ],
    );
    struct Case {
        desc: &'static str,
        port: u16,
        mac: MacAddr,
        input: Vec<u8>,
        verdict: Verdict,
        /// (sender hw, sender ip) of the reply, for answered requests.
        reply_from: Option<(MacAddr, Ipv4Addr)>,
    }
    let req = |from: &str, target: &str| build::arp_request(CLIENT_MAC, ip(from), ip(target));
    let cases = vec![
        Case {
            desc: "request for the uplink address",
            port: UPLINK,
            mac: UPLINK_MAC,
            input: req("192.0.2.7", "192.0.2.1"),
            verdict: Verdict::Transmit { port: UPLINK },
            reply_from: Some((UPLINK_MAC, ip("192.0.2.1"))),
        },
        Case {
            desc: "request for the cluster address on the cluster port",
            port: CLUSTER,
            mac: CLUSTER_MAC,
            input: req("10.0.0.7", "10.0.0.1"),
            verdict: Verdict::Transmit { port: CLUSTER },
            reply_from: Some((CLUSTER_MAC, ip("10.0.0.1"))),
        },
        Case {
            desc: "request for an LB VIP on the uplink",
            port: UPLINK,
            mac: UPLINK_MAC,
            input: req("192.0.2.7", "198.51.100.10"),
            verdict: Verdict::Transmit { port: UPLINK },
            reply_from: Some((UPLINK_MAC, ip("198.51.100.10"))),
        },
        Case {
            desc: "request for an LB VIP on the cluster port: not ours to answer",
            port: CLUSTER,
            mac: CLUSTER_MAC,
            input: req("10.0.0.7", "198.51.100.10"),
            verdict: Verdict::Drop(DropReason::ArpIgnored),
            reply_from: None,
        },
        Case {
            desc: "request for a ClusterIP: never answered",
            port: UPLINK,
            mac: UPLINK_MAC,
            input: req("192.0.2.7", "10.96.0.10"),
            verdict: Verdict::Drop(DropReason::ArpIgnored),
            reply_from: None,
        },
        Case {
            desc: "request for the cluster address on the uplink: not this port's",
            port: UPLINK,
            mac: UPLINK_MAC,
            input: req("192.0.2.7", "10.0.0.1"),
            verdict: Verdict::Drop(DropReason::ArpIgnored),
            reply_from: None,
        },
        Case {
            desc: "tagged request: answered with the tag kept",
            port: UPLINK,
            mac: UPLINK_MAC,
            input: FrameBuilder::new(CLIENT_MAC, MacAddr::BROADCAST)
                .vlan(42)
                .arp(
                    arp::OP_REQUEST,
                    (CLIENT_MAC, ip("192.0.2.7")),
                    (MacAddr::ZERO, ip("192.0.2.1")),
                ),
            verdict: Verdict::Transmit { port: UPLINK },
            reply_from: Some((UPLINK_MAC, ip("192.0.2.1"))),
        },
        Case {
            desc: "truncated ARP",
            port: UPLINK,
            mac: UPLINK_MAC,
            input: req("192.0.2.7", "192.0.2.1")[..30].to_vec(),
            verdict: Verdict::Drop(DropReason::Malformed),
            reply_from: None,
        },
    ];
    for c in cases {
        let mut p = pipeline();
        let mut stats = WorkerStats::default();
        let r = run(&mut p, &snap, c.port, &c.input, 0, &mut stats);
        assert_eq!(r.verdict, c.verdict, "{}", c.desc);
        if let Some((hw, addr)) = c.reply_from {
            let eth = EthernetFrame::new_checked(&r.out[..]).unwrap();
            let in_eth = EthernetFrame::new_checked(&c.input[..]).unwrap();
            assert_eq!(eth.dst_addr(), CLIENT_MAC, "{}", c.desc);
            assert_eq!(eth.src_addr(), c.mac, "{}", c.desc);
            assert_eq!(eth.vlan_id(), in_eth.vlan_id(), "{}: tag kept", c.desc);
            let a = ArpPacket::new_checked(eth.payload()).unwrap();
            let q = ArpPacket::new_checked(in_eth.payload()).unwrap();
            assert_eq!(a.operation(), arp::OP_REPLY, "{}", c.desc);
            assert_eq!((a.sender_hw(), a.sender_ip()), (hw, addr), "{}", c.desc);
            assert_eq!(
                (a.target_hw(), a.target_ip()),
                (CLIENT_MAC, q.sender_ip()),
                "{}",
                c.desc
            );
            // The requester is learned (a request aimed at us).
            assert_eq!(
                p.neighbor(c.port, q.sender_ip()),
                Some(CLIENT_MAC),
                "{}",
                c.desc
            );
        }
        if let Verdict::Drop(reason) = c.verdict {
            assert_drop(&stats, reason, 1);
        }
    }
}

#[test]
fn arp_reply_resolves_a_held_next_hop() {
    let snap = empty_snapshot();
    let mut p = pipeline();
    let mut stats = WorkerStats::default();
    // 192.0.2.50 is on the uplink subnet, MAC unknown: held.
    let input = from_router().udp_v4(sa("10.244.9.9:5000"), sa("192.0.2.50:53"), b"q");
    let r = run(&mut p, &snap, CLUSTER, &input, 0, &mut stats);
    // Frames from the cluster side carry the cluster router's MAC as destination? No: the
    // frame came in on the cluster port addressed to the uplink MAC → not for us.
    assert_eq!(r.verdict, Verdict::Drop(DropReason::NotForUs));
    let input = from_cluster().udp_v4(sa("10.244.9.9:5000"), sa("192.0.2.50:53"), b"q");
    let r = run(&mut p, &snap, CLUSTER, &input, 0, &mut stats);
    assert_eq!(
        r.verdict,
        Verdict::HoldForNeighbor {
            port: UPLINK,
            next_hop: ip("192.0.2.50")
        }
    );
    let o = parse(&r.out);
    assert_eq!(o.eth_src, UPLINK_MAC);
    assert_eq!(o.ttl, 63);
    // Housekeeping ARPs for it (once per second at most).
    let mut sent: Vec<(u16, Vec<u8>)> = vec![];
    p.housekeeping(10, &mut |port, f| sent.push((port, f.to_vec())));
    p.housekeeping(20, &mut |port, f| sent.push((port, f.to_vec())));
    let reqs: Vec<_> = sent
        .iter()
        .filter(|(_, f)| {
            let a = ArpPacket::new_checked(&f[14..]).unwrap();
            a.target_ip() == ip("192.0.2.50")
        })
        .collect();
    assert_eq!(reqs.len(), 1, "one request within a second");
    let (port, f) = reqs[0];
    assert_eq!(*port, UPLINK);
    let e = EthernetFrame::new_checked(&f[..]).unwrap();
    assert_eq!(e.dst_addr(), MacAddr::BROADCAST);
    assert_eq!(e.src_addr(), UPLINK_MAC);
    let a = ArpPacket::new_checked(e.payload()).unwrap();
    assert_eq!(a.operation(), arp::OP_REQUEST);
    assert_eq!(
        (a.sender_hw(), a.sender_ip()),
        (UPLINK_MAC, ip("192.0.2.1"))
    );
    // The reply is learned, reported to the other workers and handed to the kernel.
    let host = MacAddr([0x02, 0xdd, 0, 0, 0, 0x50]);
    let reply = build::arp_reply(host, ip("192.0.2.50"), UPLINK_MAC, ip("192.0.2.1"));
    let r = run(&mut p, &snap, UPLINK, &reply, 30, &mut stats);
    assert_eq!(r.verdict, Verdict::ToException { port: UPLINK_EXC });
    assert_eq!(p.neighbor(UPLINK, ip("192.0.2.50")), Some(host));
    let learned: Vec<_> = p.take_learned().collect();
    assert_eq!(learned, vec![(UPLINK, ip("192.0.2.50"), host)]);
    assert_eq!(p.take_learned().count(), 0);
    // Now the destination resolves.
    let r = run(&mut p, &snap, CLUSTER, &input, 40, &mut stats);
    assert_eq!(r.verdict, Verdict::Transmit { port: UPLINK });
    assert_eq!(parse(&r.out).eth_dst, host);
    // A reply on the cluster port (no exception port) is consumed as arp_ignored; a
    // sender off the port's subnets is not learned.
    let reply = build::arp_reply(host, ip("172.16.0.1"), CLUSTER_MAC, ip("10.0.0.1"));
    let r = run(&mut p, &snap, CLUSTER, &reply, 50, &mut stats);
    assert_eq!(r.verdict, Verdict::Drop(DropReason::ArpIgnored));
    assert_eq!(p.neighbor(CLUSTER, ip("172.16.0.1")), None);
    // Another worker's learning lands in the table without being re-reported.
    p.learn_neighbor(CLUSTER, ip("10.0.0.77"), host, 60);
    assert_eq!(p.neighbor(CLUSTER, ip("10.0.0.77")), Some(host));
    assert_eq!(p.take_learned().count(), 0);
}

/// Runs housekeeping at `now` until the neighbor sweep has covered the whole table;
/// returns the ARP requests it emitted.
fn arp_requests_of_a_full_sweep(p: &mut Pipeline, now: Tick) -> usize {
    let mut n = 0;
    for _ in 0..NEIGHBOR_CAPACITY / NEIGHBOR_SWEEP_BUDGET {
        p.housekeeping(now, &mut |_, _| n += 1);
    }
    n
}

#[test]
fn neighbor_ageing_refreshes_then_forgets() {
    let snap = empty_snapshot();
    let mut p = pipeline();
    let mut stats = WorkerStats::default();
    let host = MacAddr([0x02, 0xdd, 0, 0, 0, 0x51]);
    let reply = build::arp_reply(host, ip("192.0.2.51"), UPLINK_MAC, ip("192.0.2.1"));
    run(&mut p, &snap, UPLINK, &reply, 0, &mut stats);
    let input = from_cluster().udp_v4(sa("10.244.9.9:5000"), sa("192.0.2.51:53"), b"q");
    let count = arp_requests_of_a_full_sweep;
    // In use and aged past the timeout: refreshed by a request, still usable.
    let r = run(&mut p, &snap, CLUSTER, &input, 29_000, &mut stats);
    assert_eq!(r.verdict, Verdict::Transmit { port: UPLINK });
    assert_eq!(count(&mut p, 31_000), 1);
    assert_eq!(p.neighbor(UPLINK, ip("192.0.2.51")), Some(host));
    // No answer within the grace period: forgotten.
    run(&mut p, &snap, CLUSTER, &input, 35_000, &mut stats);
    count(&mut p, 36_000);
    assert_eq!(p.neighbor(UPLINK, ip("192.0.2.51")), None);
    // Static neighbors never age.
    count(&mut p, 10_000_000);
    assert_eq!(p.neighbor(UPLINK, ip("192.0.2.254")), Some(ROUTER_MAC));
}

/// Egress copies a destination's L2 (next-hop MAC, VTEP MAC) into the route cache: the
/// copy must follow ARP and VTEP MAC changes, and keep its neighbor marked as in use.
#[test]
fn cached_l2_follows_neighbor_and_vtep_changes() {
    let snap = empty_snapshot();
    let mut p = routed_pipeline();
    let mut stats = WorkerStats::default();
    let first = MacAddr([0x02, 0xdd, 0, 0, 0, 0x51]);
    let second = MacAddr([0x02, 0xdd, 0, 0, 0, 0x52]);
    let arp_from = |mac| build::arp_reply(mac, ip("192.0.2.51"), UPLINK_MAC, ip("192.0.2.1"));
    run(&mut p, &snap, UPLINK, &arp_from(first), 0, &mut stats);
    let input = from_cluster().udp_v4(sa("10.244.9.9:5000"), sa("192.0.2.51:53"), b"q");
    for _ in 0..2 {
        let r = run(&mut p, &snap, CLUSTER, &input, 0, &mut stats);
        assert_eq!(r.verdict, Verdict::Transmit { port: UPLINK });
        assert_eq!(parse(&r.out).eth_dst, first);
    }
    run(&mut p, &snap, UPLINK, &arp_from(second), 10, &mut stats);
    let r = run(&mut p, &snap, CLUSTER, &input, 20, &mut stats);
    assert_eq!(
        parse(&r.out).eth_dst,
        second,
        "the new MAC, not the cached one"
    );
    // Packets through the cached copy keep the neighbor in use: aged past the timeout, it
    // is refreshed by a request instead of being freed.
    run(&mut p, &snap, CLUSTER, &input, 29_000, &mut stats);
    assert_eq!(arp_requests_of_a_full_sweep(&mut p, 31_000), 1);
    assert_eq!(p.neighbor(UPLINK, ip("192.0.2.51")), Some(second));

    // The inner destination MAC toward node-2 follows what its VTEP last sent from.
    let to_pod = from_router().tcp_v4(
        sa("203.0.113.5:4000"),
        sa("10.245.2.9:80"),
        TcpFlags::SYN,
        b"",
    );
    let inner_dst = |p: &mut Pipeline, stats: &mut WorkerStats| {
        let r = run(p, &snap, UPLINK, &to_pod, 40_000, stats);
        assert_eq!(r.verdict, Verdict::Transmit { port: CLUSTER });
        parse(&r.out[50..]).eth_dst
    };
    // node-2's VTEP sends a frame whose inner source is `mac`.
    let node2_sends_from = |p: &mut Pipeline, stats: &mut WorkerStats, mac| {
        let dns = FrameBuilder::new(mac, CLUSTER_MAC).udp_v4(
            sa("10.245.2.9:5353"),
            sa("8.8.8.8:53"),
            b"d",
        );
        run(p, &snap, CLUSTER, &from_node2(&dns), 40_000, stats);
    };
    node2_sends_from(&mut p, &mut stats, NODE2_VXLAN_MAC);
    assert_eq!(inner_dst(&mut p, &mut stats), NODE2_VXLAN_MAC);
    assert_eq!(inner_dst(&mut p, &mut stats), NODE2_VXLAN_MAC);
    let moved = MacAddr([0x02, 0xbb, 0, 0, 0, 0x09]);
    node2_sends_from(&mut p, &mut stats, moved);
    assert_eq!(inner_dst(&mut p, &mut stats), moved);
}

#[test]
fn l3_table() {
    let snap = empty_snapshot();
    struct Case {
        desc: &'static str,
        port: u16,
        input: Vec<u8>,
        verdict: Verdict,
        check: Box<dyn Fn(&Out)>,
    }
    let none = || Box::new(|_: &Out| {}) as Box<dyn Fn(&Out)>;
    let udp_in = from_router().udp_v4(sa("203.0.113.5:4000"), sa("10.244.1.5:53"), b"q");
    let mut bad_sum = udp_in.clone();
    bad_sum[14 + 10] ^= 0xff;
    let mut bad_version = udp_in.clone();
    bad_version[14] = 0x65;
    let cases = vec![
        Case {
            desc: "routed UDP: TTL and checksum updated, MACs rewritten",
            port: UPLINK,
            input: udp_in.clone(),
            verdict: Verdict::Transmit { port: CLUSTER },
            check: Box::new(|o| {
                assert_eq!((o.eth_src, o.eth_dst), (CLUSTER_MAC, CROUTER_MAC));
                assert_eq!((o.src, o.dst), (ip("203.0.113.5"), ip("10.244.1.5")));
                assert_eq!((o.sport, o.dport, o.ttl), (4000, 53, 63));
            }),
        },
        Case {
            desc: "routed TCP with a VLAN tag: tag kept",
            port: UPLINK,
            input: from_router().vlan(7).tcp_v4(
                sa("203.0.113.5:4000"),
                sa("10.244.1.5:22"),
                TcpFlags::ACK,
                b"x",
            ),
            verdict: Verdict::Transmit { port: CLUSTER },
            check: Box::new(|o| {
                assert_eq!(o.vlan, Some(7));
                assert_eq!(o.ttl, 63);
                assert_eq!(o.eth_dst, CROUTER_MAC);
            }),
        },
        Case {
            desc: "default route toward the uplink router",
            port: CLUSTER,
            input: from_cluster().udp_v4(sa("10.244.1.5:53"), sa("8.8.8.8:53"), b"r"),
            verdict: Verdict::Transmit { port: UPLINK },
            check: Box::new(|o| {
                assert_eq!((o.eth_src, o.eth_dst), (UPLINK_MAC, ROUTER_MAC));
                assert_eq!(o.ttl, 63);
            }),
        },
        Case {
            desc: "IPv4 options: forwarded untouched (L4 found through the IHL)",
            port: UPLINK,
            input: from_router().ip_options(&[0x94, 0x04, 0, 0]).udp_v4(
                sa("203.0.113.5:4000"),
                sa("10.244.1.5:53"),
                b"opt",
            ),
            verdict: Verdict::Transmit { port: CLUSTER },
            check: Box::new(|o| {
                assert_eq!(o.ip_len, 24 + 8 + 3);
                assert_eq!((o.dport, o.ttl), (53, 63));
                assert_eq!(o.payload, b"opt");
            }),
        },
        Case {
            desc: "Ethernet padding is trimmed",
            port: UPLINK,
            input: from_router()
                .pad(true)
                .udp_v4(sa("203.0.113.5:4000"), sa("10.244.1.5:53"), b""),
            verdict: Verdict::Transmit { port: CLUSTER },
            check: Box::new(|o| assert_eq!(o.ip_len, 28)),
        },
        Case {
            desc: "bad IPv4 header checksum",
            port: UPLINK,
            input: bad_sum,
            verdict: Verdict::Drop(DropReason::BadChecksum),
            check: none(),
        },
        Case {
            desc: "not version 4",
            port: UPLINK,
            input: bad_version,
            verdict: Verdict::Drop(DropReason::Malformed),
            check: none(),
        },
        Case {
            desc: "truncated IPv4",
            port: UPLINK,
            input: udp_in[..30].to_vec(),
            verdict: Verdict::Drop(DropReason::Malformed),
            check: none(),
        },
        Case {
            desc: "truncated UDP header",
            port: UPLINK,
            input: {
                let mut f = from_router().ipv4(
                    ip("203.0.113.5"),
                    ip("10.244.1.5"),
                    ipv4::PROTO_UDP,
                    &[0, 1, 0],
                );
                f.truncate(14 + 23);
                f
            },
            verdict: Verdict::Drop(DropReason::Malformed),
            check: none(),
        },
        Case {
            desc: "unicast frame for another MAC",
            port: UPLINK,
            input: FrameBuilder::new(ROUTER_MAC, CLIENT_MAC).udp_v4(
                sa("203.0.113.5:4000"),
                sa("10.244.1.5:53"),
                b"q",
            ),
            verdict: Verdict::Drop(DropReason::NotForUs),
            check: none(),
        },
        Case {
            desc: "IPv6 on the uplink: to the kernel",
            port: UPLINK,
            input: from_router().ethernet(ethernet::ETHERTYPE_IPV6, &[0x60; 40]),
            verdict: Verdict::ToException { port: UPLINK_EXC },
            check: none(),
        },
        Case {
            desc: "IPv6 on the cluster port: no exception port",
            port: CLUSTER,
            input: from_cluster().ethernet(ethernet::ETHERTYPE_IPV6, &[0x60; 40]),
            verdict: Verdict::Drop(DropReason::NotIpv4),
            check: none(),
        },
        Case {
            desc: "TCP to the gateway's uplink address: to the kernel",
            port: UPLINK,
            input: from_router().tcp_v4(
                sa("203.0.113.5:4000"),
                sa("192.0.2.1:179"),
                TcpFlags::SYN,
                b"",
            ),
            verdict: Verdict::ToException { port: UPLINK_EXC },
            check: none(),
        },
        Case {
            desc: "TCP to the gateway's cluster address: no exception port",
            port: CLUSTER,
            input: from_cluster().tcp_v4(
                sa("10.244.1.5:4000"),
                sa("10.0.0.1:22"),
                TcpFlags::SYN,
                b"",
            ),
            verdict: Verdict::Drop(DropReason::NoException),
            check: none(),
        },
        Case {
            desc: "ping to the gateway's cluster address: answered in place",
            port: CLUSTER,
            input: from_cluster().icmp_echo_v4(
                ip("10.244.1.5"),
                ip("10.0.0.1"),
                true,
                77,
                1,
                b"ping",
            ),
            verdict: Verdict::Transmit { port: CLUSTER },
            check: Box::new(|o| {
                assert_eq!((o.src, o.dst), (ip("10.0.0.1"), ip("10.244.1.5")));
                assert_eq!(o.icmp, Some((icmp::TYPE_ECHO_REPLY, 0, 1)));
                assert_eq!((o.eth_src, o.eth_dst), (CLUSTER_MAC, CROUTER_MAC));
            }),
        },
        Case {
            desc: "an unallocated address in the service CIDR",
            port: UPLINK,
            input: from_router().udp_v4(sa("203.0.113.5:4000"), sa("10.96.7.7:53"), b"q"),
            verdict: Verdict::Drop(DropReason::NoService),
            check: none(),
        },
        Case {
            desc: "fragment of a routed packet: reassembled first (as nf_conntrack does)",
            port: UPLINK,
            input: {
                let mut f = udp_in.clone();
                let mut p = Ipv4Packet::new_unchecked(&mut f[14..]);
                p.set_more_frags(true);
                p.fill_checksum();
                f
            },
            verdict: Verdict::Reassemble,
            check: none(),
        },
    ];
    for c in cases {
        let mut p = routed_pipeline();
        let mut stats = WorkerStats::default();
        let r = run(&mut p, &snap, c.port, &c.input, 0, &mut stats);
        assert_eq!(r.verdict, c.verdict, "{}", c.desc);
        match c.verdict {
            Verdict::Transmit { .. } => (c.check)(&parse(&r.out)),
            Verdict::Drop(reason) => assert_drop(&stats, reason, 1),
            Verdict::ToException { .. } => {
                assert_eq!(r.out, c.input, "{}: unchanged", c.desc);
            }
            _ => {}
        }
    }
}

#[test]
fn exception_port_traffic_goes_out_unchanged() {
    let snap = empty_snapshot();
    let mut p = pipeline();
    let mut stats = WorkerStats::default();
    let input = FrameBuilder::new(UPLINK_MAC, ROUTER_MAC).tcp_v4(
        sa("192.0.2.1:179"),
        sa("203.0.113.5:4000"),
        TcpFlags::ACK,
        b"bgp",
    );
    let r = run(&mut p, &snap, UPLINK_EXC, &input, 0, &mut stats);
    assert_eq!(r.verdict, Verdict::Transmit { port: UPLINK });
    assert_eq!(r.out, input);
    let r = run(&mut p, &snap, 99, &input, 0, &mut stats);
    assert_eq!(r.verdict, Verdict::Drop(DropReason::NotForUs));
}

#[test]
fn ttl_expiry_sends_time_exceeded() {
    let snap = empty_snapshot();
    let mut p = routed_pipeline();
    let mut stats = WorkerStats::default();
    let input = from_router()
        .ttl(1)
        .udp_v4(sa("203.0.113.5:4000"), sa("10.244.1.5:53"), b"q");
    let r = run(&mut p, &snap, UPLINK, &input, 0, &mut stats);
    assert_eq!(r.verdict, Verdict::Transmit { port: UPLINK });
    let o = parse(&r.out);
    assert_eq!((o.eth_src, o.eth_dst), (UPLINK_MAC, ROUTER_MAC));
    assert_eq!((o.src, o.dst), (ip("192.0.2.1"), ip("203.0.113.5")));
    assert_eq!(
        o.icmp,
        Some((icmp::TYPE_TIME_EXCEEDED, icmp::CODE_TTL_EXCEEDED, 0))
    );
    assert_eq!(
        o.quoted,
        input[14..14 + 28].to_vec(),
        "quotes header + 8 bytes"
    );
    assert_drop(&stats, DropReason::TtlExceeded, 1);
}

#[test]
fn icmp_errors_are_rate_limited() {
    let snap = empty_snapshot();
    let mut cfg = routed_config();
    cfg.icmp_errors_per_second = 2;
    let mut p = Pipeline::new(cfg).unwrap();
    let mut stats = WorkerStats::default();
    let input = from_router()
        .ttl(1)
        .udp_v4(sa("203.0.113.5:4000"), sa("10.244.1.5:53"), b"q");
    let verdicts: Vec<Verdict> = (0..4)
        .map(|_| run(&mut p, &snap, UPLINK, &input, 1000, &mut stats).verdict)
        .collect();
    assert_eq!(
        verdicts,
        vec![
            Verdict::Transmit { port: UPLINK },
            Verdict::Transmit { port: UPLINK },
            Verdict::Drop(DropReason::IcmpRateLimited),
            Verdict::Drop(DropReason::IcmpRateLimited),
        ]
    );
    assert_drop(&stats, DropReason::TtlExceeded, 4);
    assert_drop(&stats, DropReason::IcmpRateLimited, 2);
    // Half a second refills one token.
    let r = run(&mut p, &snap, UPLINK, &input, 1500, &mut stats);
    assert_eq!(r.verdict, Verdict::Transmit { port: UPLINK });
    // No ICMP error about an ICMP error.
    let err = from_router().ttl(1).icmp_error_v4(
        ip("203.0.113.5"),
        ip("10.244.1.5"),
        (icmp::TYPE_DEST_UNREACHABLE, icmp::CODE_HOST_UNREACHABLE),
        0,
        &input[14..],
    );
    let r = run(&mut p, &snap, UPLINK, &err, 5000, &mut stats);
    assert_eq!(r.verdict, Verdict::Drop(DropReason::TtlExceeded));
}

#[test]
fn mtu_exceeded() {
    let snap = empty_snapshot();
    let mut cfg = routed_config();
    cfg.ports[1].mtu = 1000;
    let mut p = Pipeline::new(cfg).unwrap();
    let mut stats = WorkerStats::default();
    let big = vec![0xab; 1000];
    let df =
        from_router()
            .dont_frag(true)
            .udp_v4(sa("203.0.113.5:4000"), sa("10.244.1.5:53"), &big);
    let r = run(&mut p, &snap, UPLINK, &df, 0, &mut stats);
    assert_eq!(r.verdict, Verdict::Transmit { port: UPLINK });
    let o = parse(&r.out);
    assert_eq!(
        o.icmp,
        Some((icmp::TYPE_DEST_UNREACHABLE, icmp::CODE_FRAG_NEEDED, 1000))
    );
    assert_eq!(o.dst, ip("203.0.113.5"));
    assert_eq!(o.quoted, df[14..14 + 28].to_vec());
    assert_drop(&stats, DropReason::MtuExceeded, 1);
    // Without DF it is fragmented: routed (TTL 63), its link header removed for the worker
    // to cut the IPv4 packet (`fragments_are_sent_the_way_the_whole_packet_goes`).
    let no_df = from_router().udp_v4(sa("203.0.113.5:4000"), sa("10.244.1.5:53"), &big);
    let r = run(&mut p, &snap, UPLINK, &no_df, 0, &mut stats);
    assert_eq!(r.verdict, Verdict::Fragment { ip_mtu: 1000 });
    assert_eq!(r.out.len(), no_df.len() - 14);
    assert_eq!((r.out[0], r.out[8]), (0x45, 63));
    assert_drop(&stats, DropReason::MtuExceeded, 1);
    // Through VXLAN the next-hop MTU leaves room for the 50 bytes of encapsulation.
    let to_pod = from_router().dont_frag(true).udp_v4(
        sa("203.0.113.5:4000"),
        sa("10.245.2.9:53"),
        &big[..960],
    );
    let r = run(&mut p, &snap, UPLINK, &to_pod, 0, &mut stats);
    assert_eq!(r.verdict, Verdict::Transmit { port: UPLINK });
    assert_eq!(
        parse(&r.out).icmp,
        Some((icmp::TYPE_DEST_UNREACHABLE, icmp::CODE_FRAG_NEEDED, 950))
    );
}

/// What the worker does with a [`Verdict::Fragment`] (DPDK's `rte_ipv4_fragment_*` there,
/// cut by hand here): each piece goes back through [`Pipeline::egress_fragment`] and leaves
/// the way the whole packet would have, toward one VTEP with one outer source port.
#[test]
fn fragments_are_sent_the_way_the_whole_packet_goes() {
    let snap = empty_snapshot();
    let mut cfg = routed_config();
    cfg.ports[1].mtu = 1000;
    let mut p = Pipeline::new(cfg).unwrap();
    let mut stats = WorkerStats::default();
    let data: Vec<u8> = (0..2400u32).map(|i| (i * 7) as u8).collect();
    let input =
        from_router()
            .ident(0x4242)
            .udp_v4(sa("203.0.113.5:4000"), sa("10.245.2.9:53"), &data);
    let r = run(&mut p, &snap, UPLINK, &input, 0, &mut stats);
    assert_eq!(r.verdict, Verdict::Fragment { ip_mtu: 950 });
    let packet = r.out;
    let payload = &packet[20..];
    // (950 - 20) rounded down to a multiple of 8.
    let piece = 928;
    let mut outputs = Vec::new();
    for (i, chunk) in payload.chunks(piece).enumerate() {
        let mut fragment = packet[..20].to_vec();
        fragment.extend_from_slice(chunk);
        {
            let mut ip = Ipv4Packet::new_unchecked(&mut fragment[..]);
            ip.set_total_len((20 + chunk.len()) as u16);
            ip.set_more_frags((i + 1) * piece < payload.len());
            ip.set_frag_offset((i * piece) as u16);
            ip.set_checksum(0);
        }
        let mut frame = VecFrame::new(&fragment);
        let verdict = p.egress_fragment(&mut frame, 0);
        assert_eq!(verdict, Verdict::Transmit { port: CLUSTER }, "fragment {i}");
        outputs.push(frame.into_vec());
    }
    assert_eq!(outputs.len(), 3);
    let mut reassembled = Vec::new();
    let mut source_ports = Vec::new();
    for (i, out) in outputs.iter().enumerate() {
        assert!(out.len() <= 14 + 1000, "fragment {i}: {} bytes", out.len());
        let outer = Ipv4Packet::new_checked(&out[14..]).unwrap();
        assert!(outer.verify_checksum(), "fragment {i}: outer checksum");
        assert_eq!(outer.dst(), ip("10.0.0.2"), "fragment {i}: node-2's VTEP");
        let udp = UdpPacket::new_checked(outer.payload()).unwrap();
        assert_eq!(udp.dst_port(), 4789);
        source_ports.push(udp.src_port());
        let inner = Ipv4Packet::new_checked(&out[14 + 20 + 8 + 8 + 14..]).unwrap();
        assert!(inner.verify_checksum(), "fragment {i}: inner checksum");
        assert_eq!(inner.ident(), 0x4242);
        assert_eq!(inner.ttl(), 63);
        assert_eq!(inner.frag_offset() as usize, i * piece);
        assert_eq!(inner.more_frags(), i < 2);
        reassembled.extend_from_slice(inner.payload());
    }
    assert!(
        source_ports.windows(2).all(|w| w[0] == w[1]),
        "{source_ports:?}"
    );
    assert_eq!(
        reassembled,
        input[14 + 20..],
        "the datagram, whole and in order"
    );
}

#[test]
fn no_route() {
    let snap = empty_snapshot();
    let mut cfg = config(0, 1);
    cfg.routes.remove(0);
    let mut p = Pipeline::new(cfg).unwrap();
    let mut stats = WorkerStats::default();
    let input = from_cluster().udp_v4(sa("10.244.1.5:53"), sa("8.8.8.8:53"), b"r");
    let r = run(&mut p, &snap, CLUSTER, &input, 0, &mut stats);
    assert_eq!(r.verdict, Verdict::Drop(DropReason::NoRoute));
    assert_drop(&stats, DropReason::NoRoute, 1);
}

#[test]
fn reloaded_settings_apply_at_the_next_snapshot() {
    let mut cfg = config(0, 1);
    cfg.routes.remove(0);
    let mut p = Pipeline::new(cfg.clone()).unwrap();
    let mut stats = WorkerStats::default();
    let input = from_cluster().udp_v4(sa("10.244.1.5:53"), sa("8.8.8.8:53"), b"r");
    let snap = empty_snapshot();
    assert_eq!(
        run(&mut p, &snap, CLUSTER, &input, 0, &mut stats).verdict,
        Verdict::Drop(DropReason::NoRoute)
    );
    // A reload adds the default route back and changes the timeouts and the ICMP rate.
    let mut reloaded = empty_snapshot();
    reloaded.generation = snap.generation + 1;
    let mut routes = cfg.routes.clone();
    routes.push(RouteConfig {
        prefix: net("0.0.0.0/0"),
        via: Some(ip("192.0.2.254")),
        port: UPLINK,
    });
    let timeouts = crate::conntrack::Timeouts {
        udp: 5 * crate::conntrack::SECOND,
        ..Default::default()
    };
    reloaded.settings = Some(Arc::new(LiveSettings {
        id: 1,
        routes,
        static_neighbors: cfg.static_neighbors.clone(),
        snat_addresses: vec![],
        timeouts,
        icmp_errors_per_second: 7,
        routable_prefixes: vec![],
    }));
    let r = run(&mut p, &reloaded, CLUSTER, &input, 1, &mut stats);
    assert!(
        matches!(r.verdict, Verdict::Transmit { .. }),
        "{:?}",
        r.verdict
    );
    assert_eq!(parse(&r.out).eth_dst, ROUTER_MAC);
    assert_eq!(p.conntrack().timeouts().udp, 5 * crate::conntrack::SECOND);
    assert_eq!(p.icmp_bucket.rate, 7);
    // A static neighbor that left the config is forgotten; one that stays is kept.
    let mut fewer = empty_snapshot();
    fewer.generation = reloaded.generation + 1;
    let mut settings = (**reloaded.settings.as_ref().unwrap()).clone();
    settings.id = 2;
    settings
        .static_neighbors
        .retain(|(_, a, _)| *a != ip("10.0.0.2"));
    fewer.settings = Some(Arc::new(settings));
    run(&mut p, &fewer, CLUSTER, &input, 2, &mut stats);
    assert_eq!(p.neighbor(CLUSTER, ip("10.0.0.2")), None);
    assert_eq!(p.neighbor(UPLINK, ip("192.0.2.254")), Some(ROUTER_MAC));
}

// ----- VXLAN -------------------------------------------------------------------------------

/// A frame from a pod behind node-2 (VTEP 10.0.0.2), encapsulated toward our VTEP.
pub(super) fn from_node2(inner: &[u8]) -> Vec<u8> {
    FrameBuilder::new(NODE2_MAC, CLUSTER_MAC).vxlan_encap(
        ip("10.0.0.2"),
        ip("10.0.0.1"),
        51000,
        VNI,
        inner,
    )
}

pub(super) fn pod_inner() -> FrameBuilder {
    FrameBuilder::new(NODE2_VXLAN_MAC, CLUSTER_MAC)
}

#[test]
fn vxlan_in_is_decapsulated_and_routed() {
    let snap = empty_snapshot();
    let mut p = pipeline();
    let mut stats = WorkerStats::default();
    let inner = pod_inner().udp_v4(sa("10.245.2.9:5353"), sa("8.8.8.8:53"), b"dns");
    let r = run(&mut p, &snap, CLUSTER, &from_node2(&inner), 0, &mut stats);
    assert_eq!(r.verdict, Verdict::Transmit { port: UPLINK });
    let o = parse(&r.out);
    assert_eq!((o.eth_src, o.eth_dst), (UPLINK_MAC, ROUTER_MAC));
    assert_eq!(
        (o.src, o.dst, o.sport, o.dport),
        (ip("10.245.2.9"), ip("8.8.8.8"), 5353, 53)
    );
    assert_eq!(o.ttl, 63);
    assert_eq!(o.payload, b"dns");
    assert_eq!(r.out.len(), inner.len());
}

#[test]
fn vxlan_out_toward_the_node_vtep() {
    let snap = empty_snapshot();
    let mut p = routed_pipeline();
    let mut stats = WorkerStats::default();
    // Learn node-2's VXLAN MAC from one decapsulated frame first.
    let inner = pod_inner().udp_v4(sa("10.245.2.9:5353"), sa("8.8.8.8:53"), b"dns");
    run(&mut p, &snap, CLUSTER, &from_node2(&inner), 0, &mut stats);
    let input = from_router().dont_frag(true).tcp_v4(
        sa("203.0.113.5:4000"),
        sa("10.245.2.9:80"),
        TcpFlags::SYN,
        b"",
    );
    let r = run(&mut p, &snap, UPLINK, &input, 0, &mut stats);
    assert_eq!(r.verdict, Verdict::Transmit { port: CLUSTER });
    assert_eq!(r.out.len(), input.len() + 50);
    let o = parse(&r.out);
    assert_eq!((o.eth_src, o.eth_dst), (CLUSTER_MAC, NODE2_MAC));
    assert_eq!((o.src, o.dst), (ip("10.0.0.1"), ip("10.0.0.2")));
    assert_eq!(o.protocol, ipv4::PROTO_UDP);
    assert_eq!(o.dport, 4789);
    assert!(
        (49152..=65535).contains(&o.sport),
        "entropy port {}",
        o.sport
    );
    assert!(o.df, "DF copied from the inner header");
    assert_eq!(o.ttl, 64);
    assert_eq!(o.ip_len, input.len() - 14 + 50 - 14 + 14);
    let outer = Ipv4Packet::new_checked(&r.out[14..]).unwrap();
    assert_eq!(outer.ident(), 0);
    let udp = UdpPacket::new_checked(outer.payload()).unwrap();
    assert_eq!(udp.checksum(), 0);
    assert_eq!(usize::from(udp.len()), outer.payload().len());
    let v = VxlanPacket::new_checked(udp.payload()).unwrap();
    assert_eq!(v.vni(), VNI);
    assert_eq!(v.flags(), crate::wire::vxlan::FLAG_I);
    let inner_out = parse(v.payload());
    assert_eq!(inner_out.eth_dst, NODE2_VXLAN_MAC, "learned VTEP MAC");
    assert_eq!(inner_out.eth_src, CLUSTER_MAC);
    assert_eq!(
        (inner_out.src, inner_out.dst),
        (ip("203.0.113.5"), ip("10.245.2.9"))
    );
    assert_eq!(inner_out.ttl, 63);
    // Same flow, same entropy port; the same frame from another port differs.
    let again = run(&mut p, &snap, UPLINK, &input, 0, &mut stats);
    assert_eq!(parse(&again.out).sport, o.sport);
    // Node-3's VTEP MAC is unknown: the outer frame waits for ARP of 10.0.0.3.
    let to3 = from_router().udp_v4(sa("203.0.113.5:4000"), sa("10.245.3.9:53"), b"x");
    let r = run(&mut p, &snap, UPLINK, &to3, 0, &mut stats);
    assert_eq!(
        r.verdict,
        Verdict::HoldForNeighbor {
            port: CLUSTER,
            next_hop: ip("10.0.0.3")
        }
    );
}

#[test]
fn burst_prefetch_reads_the_key_the_lookup_uses() {
    let p = pipeline();
    let key = |proto, s: &str, d: &str| {
        let (s, d) = (sa(s), sa(d));
        Some(FlowKey::new(proto, *s.ip(), s.port(), *d.ip(), d.port()).hash())
    };
    let hint = |port: u16, frame: &[u8]| p.prefetch_burst(port, std::iter::once(frame)).get(0);
    let tcp = from_router().tcp_v4(
        sa("203.0.113.5:40000"),
        sa("10.96.0.10:80"),
        TcpFlags::ACK,
        b"",
    );
    assert_eq!(
        hint(UPLINK, &tcp),
        key(ipv4::PROTO_TCP, "203.0.113.5:40000", "10.96.0.10:80")
    );
    // VXLAN: the inner flow, which is what the stages look up after decapsulation...
    let inner = pod_inner().udp_v4(sa("10.245.2.9:5353"), sa("10.96.0.10:53"), b"dns");
    let encapsulated = from_node2(&inner);
    assert_eq!(
        hint(CLUSTER, &encapsulated),
        key(ipv4::PROTO_UDP, "10.245.2.9:5353", "10.96.0.10:53")
    );
    // ... but only on a cluster port: on an uplink the stages do not decapsulate, and
    // look up the outer flow.
    assert_eq!(
        hint(UPLINK, &encapsulated),
        key(ipv4::PROTO_UDP, "10.0.0.2:51000", "10.0.0.1:4789")
    );
    // Rarer shapes and truncated frames get no hint (the stages parse them fully), nor
    // does what the kernel sends out of an exception port.
    let tagged = from_router()
        .vlan(7)
        .udp_v4(sa("203.0.113.5:1"), sa("10.96.0.10:53"), b"");
    let options = from_router().ip_options(&[1, 1, 1, 0]).udp_v4(
        sa("203.0.113.5:1"),
        sa("10.96.0.10:53"),
        b"",
    );
    let echo = from_router().icmp_echo_v4(ip("203.0.113.5"), ip("10.96.0.10"), true, 1, 1, b"");
    for frame in [&tagged, &options, &echo, &tcp[..37].to_vec()] {
        assert_eq!(hint(UPLINK, frame), None);
    }
    assert_eq!(hint(UPLINK_EXC, &tcp), None);
}

#[test]
fn vxlan_drops() {
    let snap = empty_snapshot();
    let inner = pod_inner().udp_v4(sa("10.245.2.9:5353"), sa("8.8.8.8:53"), b"dns");
    let good = from_node2(&inner);
    let vx_at = 14 + 20 + 8;
    let mut no_i = good.clone();
    no_i[vx_at] = 0;
    let wrong_vni = FrameBuilder::new(NODE2_MAC, CLUSTER_MAC).vxlan_encap(
        ip("10.0.0.2"),
        ip("10.0.0.1"),
        51000,
        99,
        &inner,
    );
    let truncated = {
        // The UDP datagram holds only 4 bytes of VXLAN header.
        let mut f = FrameBuilder::new(NODE2_MAC, CLUSTER_MAC).udp_v4(
            sa("10.0.0.2:51000"),
            sa("10.0.0.1:4789"),
            &[0x08, 0, 0, 0],
        );
        f.truncate(f.len());
        f
    };
    let inner_arp = FrameBuilder::new(NODE2_MAC, CLUSTER_MAC).vxlan_encap(
        ip("10.0.0.2"),
        ip("10.0.0.1"),
        51000,
        VNI,
        &build::arp_request(NODE2_VXLAN_MAC, ip("10.245.2.9"), ip("10.245.2.1")),
    );
    let mut inner_bad_sum = inner.clone();
    inner_bad_sum[14 + 10] ^= 1;
    let cases: Vec<(&str, Vec<u8>, DropReason)> = vec![
        ("missing I flag", no_i, DropReason::VxlanBadFlags),
        ("unknown VNI", wrong_vni, DropReason::VxlanUnknownVni),
        ("truncated VXLAN header", truncated, DropReason::Malformed),
        ("inner ARP", inner_arp, DropReason::NotIpv4),
        (
            "inner bad checksum",
            from_node2(&inner_bad_sum),
            DropReason::BadChecksum,
        ),
    ];
    for (desc, input, reason) in cases {
        let mut p = pipeline();
        let mut stats = WorkerStats::default();
        let r = run(&mut p, &snap, CLUSTER, &input, 0, &mut stats);
        assert_eq!(r.verdict, Verdict::Drop(reason), "{desc}");
        assert_drop(&stats, reason, 1);
    }
}

#[test]
fn config_errors() {
    let mut c = config(0, 1);
    c.vxlan.as_mut().unwrap().local_vtep = ip("192.0.2.1");
    assert!(Pipeline::new(c).is_err(), "VTEP must be on a cluster port");
    let mut c = config(2, 2);
    c.worker_index = 2;
    assert!(Pipeline::new(c).is_err());
    let mut c = config(0, 1);
    c.routes[0].port = 7;
    assert!(Pipeline::new(c).is_err());
    let mut c = config(0, 1);
    c.ports[1].exception_port = Some(UPLINK_EXC);
    assert!(Pipeline::new(c).is_err());
}

#[allow(dead_code)]
fn unused(_: HashMap<u8, u8>) -> Tick {
    SECOND
}

// ----- Services ----------------------------------------------------------------------------

pub(super) const CIP: &str = "10.96.0.10";
pub(super) const LB: &str = "198.51.100.10";
pub(super) const EIP: &str = "198.51.100.20";

pub(super) fn web() -> Arc<BackendSet> {
    set_of(&[
        ready("10.244.1.5", 8080),
        ready("10.244.1.6", 8080),
        ready("10.244.1.7", 8080),
    ])
}

/// id 0 ClusterIP TCP, 1 NodePort TCP 30080 (SNAT), 2 LB TCP 443 (SNAT, source range
/// 203.0.113.0/24), 3 externalIP TCP 80 (ETP Local: no SNAT), 4 ClusterIP UDP 53,
/// 5 ClusterIP SCTP, 6 ClusterIP without endpoints, 7 ClusterIP with only terminating
/// endpoints, 8 ClusterIP with ClientIP affinity, 9 ClusterIP whose only backend is
/// 10.244.1.5, 10 ClusterIP with internalTrafficPolicy Local.
pub(super) fn services(generation: u64, web: &Arc<BackendSet>, dns: &Arc<BackendSet>) -> Snapshot {
    let mut lb = fe(FrontendKind::LoadBalancer, LB, Protocol::Tcp, 443, web);
    lb.source_ranges = vec![net("203.0.113.0/24")];
    let mut eip = fe(FrontendKind::ExternalIp, EIP, Protocol::Tcp, 80, web);
    eip.masquerade = false;
    let mut aff = fe(
        FrontendKind::ClusterIp,
        "10.96.0.90",
        Protocol::Tcp,
        80,
        web,
    );
    aff.affinity = Some(60);
    let local_set = set_of(&[("10.245.2.9", 8080, EndpointState::Ready, Some("node-2"))]);
    let mut itp = fe(
        FrontendKind::ClusterIp,
        "10.96.0.110",
        Protocol::Tcp,
        80,
        &set_of(&[
            ("10.245.2.9", 8080, EndpointState::Ready, Some("node-2")),
            ("10.244.1.5", 8080, EndpointState::Ready, Some("node-9")),
        ]),
    );
    itp.internal = InternalPolicy::Local {
        by_node: [(Arc::from("node-2"), local_set)].into_iter().collect(),
    };
    snapshot(
        generation,
        vec![
            fe(FrontendKind::ClusterIp, CIP, Protocol::Tcp, 80, web),
            fe(FrontendKind::NodePort, "0.0.0.0", Protocol::Tcp, 30080, web),
            lb,
            eip,
            fe(
                FrontendKind::ClusterIp,
                "10.96.0.53",
                Protocol::Udp,
                53,
                dns,
            ),
            fe(
                FrontendKind::ClusterIp,
                "10.96.0.60",
                Protocol::Sctp,
                9999,
                &set_of(&[ready("10.244.3.1", 9999)]),
            ),
            fe(
                FrontendKind::ClusterIp,
                "10.96.0.70",
                Protocol::Tcp,
                80,
                &set_of(&[]),
            ),
            fe(
                FrontendKind::ClusterIp,
                "10.96.0.80",
                Protocol::Tcp,
                80,
                &set_of(&[
                    ("10.244.4.1", 8080, EndpointState::ServingTerminating, None),
                    ("10.244.4.2", 8080, EndpointState::NotServing, None),
                ]),
            ),
            aff,
            fe(
                FrontendKind::ClusterIp,
                "10.96.0.100",
                Protocol::Tcp,
                80,
                &set_of(&[ready("10.244.1.5", 8080)]),
            ),
            itp,
        ],
    )
}

pub(super) fn dns() -> Arc<BackendSet> {
    set_of(&[ready("10.244.2.1", 53), ready("10.244.2.2", 53)])
}

pub(super) fn svc_snapshot() -> Snapshot {
    services(1, &web(), &dns())
}

/// The backend Maglev picks for this flow in `set`.
pub(super) fn maglev(set: &BackendSet, proto: u8, src: &str, dst: &str) -> SocketAddrV4 {
    let (s, d) = (sa(src), sa(dst));
    let h = rewrite::flow_hash(proto, *s.ip(), s.port(), *d.ip(), d.port());
    let b = set.pick(h).unwrap();
    SocketAddrV4::new(b.addr, b.port)
}

fn sock(o: &Out) -> (SocketAddrV4, SocketAddrV4) {
    (
        SocketAddrV4::new(o.src, o.sport),
        SocketAddrV4::new(o.dst, o.dport),
    )
}

#[test]
fn clusterip_tcp_syn_dnat_and_reply() {
    let snap = svc_snapshot();
    let mut p = pipeline();
    let mut stats = WorkerStats::default();
    let client = "10.244.9.9:41000";
    let vip = "10.96.0.10:80";
    let backend = maglev(&web(), ipv4::PROTO_TCP, client, vip);
    let syn = from_cluster().tcp_v4(sa(client), sa(vip), TcpFlags::SYN, b"");
    let r = run(&mut p, &snap, CLUSTER, &syn, 0, &mut stats);
    assert_eq!(r.verdict, Verdict::Transmit { port: CLUSTER });
    let o = parse(&r.out);
    assert_eq!(sock(&o), (sa(client), backend), "DNAT to the Maglev pick");
    assert_eq!(
        (o.eth_src, o.eth_dst, o.ttl),
        (CLUSTER_MAC, CROUTER_MAC, 63)
    );
    assert_eq!(o.tcp_flags, TcpFlags::SYN.bits());
    let synack = from_cluster().tcp_v4(backend, sa(client), TcpFlags::SYN | TcpFlags::ACK, b"");
    let r = run(&mut p, &snap, CLUSTER, &synack, 1, &mut stats);
    assert_eq!(r.verdict, Verdict::Transmit { port: CLUSTER });
    let o = parse(&r.out);
    assert_eq!(sock(&o), (sa(vip), sa(client)), "reply from the VIP");
    let key = FlowKey::new(ipv4::PROTO_TCP, ip("10.244.9.9"), 41000, ip(CIP), 80);
    let (id, _) = p.conntrack().peek(&key, 1).unwrap();
    let e = p.conntrack().entry(id);
    assert!(e.seen_reply());
    assert_eq!(
        e.nat().snat,
        None,
        "ClusterIP from a routed pod: no masquerade"
    );
    assert_eq!(stats.frontend_packets[0], 2);
    assert_eq!(stats.total_drops(), 0);
}

#[test]
fn nodeport_with_snat_and_reply() {
    let snap = svc_snapshot();
    let mut p = pipeline();
    let mut stats = WorkerStats::default();
    let client = "203.0.113.5:40000";
    let np = "192.0.2.1:30080";
    let backend = maglev(&web(), ipv4::PROTO_TCP, client, np);
    let syn = from_router().tcp_v4(sa(client), sa(np), TcpFlags::SYN, b"");
    let r = run(&mut p, &snap, UPLINK, &syn, 0, &mut stats);
    assert_eq!(r.verdict, Verdict::Transmit { port: CLUSTER });
    let o = parse(&r.out);
    assert_eq!(o.src, ip("10.0.0.1"), "SNAT to the cluster port's address");
    assert!((32768..=60999).contains(&o.sport));
    assert_eq!(SocketAddrV4::new(o.dst, o.dport), backend);
    let snat = SocketAddrV4::new(o.src, o.sport);
    let synack = from_cluster().tcp_v4(backend, snat, TcpFlags::SYN | TcpFlags::ACK, b"");
    let r = run(&mut p, &snap, CLUSTER, &synack, 1, &mut stats);
    assert_eq!(r.verdict, Verdict::Transmit { port: UPLINK });
    let o = parse(&r.out);
    assert_eq!(sock(&o), (sa(np), sa(client)));
    assert_eq!((o.eth_src, o.eth_dst), (UPLINK_MAC, ROUTER_MAC));
    // A NodePort on the cluster address is not a NodePort (only node-port addresses).
    let wrong = from_cluster().tcp_v4(sa("10.244.9.9:1"), sa("10.0.0.1:30080"), TcpFlags::SYN, b"");
    let r = run(&mut p, &snap, CLUSTER, &wrong, 2, &mut stats);
    assert_eq!(r.verdict, Verdict::Drop(DropReason::NoException));
}

#[test]
fn load_balancer_source_ranges() {
    let snap = svc_snapshot();
    let mut p = pipeline();
    let mut stats = WorkerStats::default();
    let vip = "198.51.100.10:443";
    let allowed = from_router().tcp_v4(sa("203.0.113.9:1234"), sa(vip), TcpFlags::SYN, b"");
    let r = run(&mut p, &snap, UPLINK, &allowed, 0, &mut stats);
    assert_eq!(r.verdict, Verdict::Transmit { port: CLUSTER });
    let o = parse(&r.out);
    assert_eq!(
        SocketAddrV4::new(o.dst, o.dport),
        maglev(&web(), ipv4::PROTO_TCP, "203.0.113.9:1234", vip)
    );
    assert_eq!(o.src, ip("10.0.0.1"));
    let blocked = from_router().tcp_v4(sa("198.18.0.1:1234"), sa(vip), TcpFlags::SYN, b"");
    let r = run(&mut p, &snap, UPLINK, &blocked, 0, &mut stats);
    assert_eq!(r.verdict, Verdict::Drop(DropReason::SourceRange));
    assert_drop(&stats, DropReason::SourceRange, 1);
    assert_eq!(p.conntrack().len(), 1);
}

#[test]
fn external_ip_keeps_the_client_address() {
    let snap = svc_snapshot();
    let mut p = pipeline();
    let mut stats = WorkerStats::default();
    let (client, vip) = ("203.0.113.5:40001", "198.51.100.20:80");
    let backend = maglev(&web(), ipv4::PROTO_TCP, client, vip);
    let syn = from_router().tcp_v4(sa(client), sa(vip), TcpFlags::SYN, b"");
    let r = run(&mut p, &snap, UPLINK, &syn, 0, &mut stats);
    assert_eq!(r.verdict, Verdict::Transmit { port: CLUSTER });
    assert_eq!(sock(&parse(&r.out)), (sa(client), backend));
    let reply = from_cluster().tcp_v4(backend, sa(client), TcpFlags::SYN | TcpFlags::ACK, b"");
    let r = run(&mut p, &snap, CLUSTER, &reply, 1, &mut stats);
    assert_eq!(r.verdict, Verdict::Transmit { port: UPLINK });
    assert_eq!(sock(&parse(&r.out)), (sa(vip), sa(client)));
}

#[test]
fn udp_and_sctp_services() {
    let snap = svc_snapshot();
    let mut p = pipeline();
    let mut stats = WorkerStats::default();
    let (client, vip) = ("10.244.9.9:5353", "10.96.0.53:53");
    let backend = maglev(&dns(), ipv4::PROTO_UDP, client, vip);
    let q = from_cluster().udp_v4(sa(client), sa(vip), b"query");
    let r = run(&mut p, &snap, CLUSTER, &q, 0, &mut stats);
    assert_eq!(r.verdict, Verdict::Transmit { port: CLUSTER });
    let o = parse(&r.out);
    assert_eq!(sock(&o), (sa(client), backend));
    assert_eq!(o.payload, b"query");
    let a = from_cluster().udp_v4(backend, sa(client), b"answer");
    let r = run(&mut p, &snap, CLUSTER, &a, 1, &mut stats);
    assert_eq!(sock(&parse(&r.out)), (sa(vip), sa(client)));
    // A datagram without checksum keeps "no checksum".
    let mut nosum = from_cluster().udp_v4(sa("10.244.9.9:5354"), sa(vip), b"q");
    nosum[14 + 20 + 6..14 + 20 + 8].fill(0);
    let r = run(&mut p, &snap, CLUSTER, &nosum, 2, &mut stats);
    assert_eq!(r.verdict, Verdict::Transmit { port: CLUSTER });
    assert_eq!(&r.out[14 + 20 + 6..14 + 20 + 8], &[0, 0]);
    // SCTP: ports rewritten and the CRC32c recomputed.
    let (sclient, svip) = ("10.244.9.9:7000", "10.96.0.60:9999");
    let init = from_cluster().sctp_v4(sa(sclient), sa(svip), 0, &build::sctp_init_chunk(42));
    let r = run(&mut p, &snap, CLUSTER, &init, 3, &mut stats);
    assert_eq!(r.verdict, Verdict::Transmit { port: CLUSTER });
    assert_eq!(sock(&parse(&r.out)), (sa(sclient), sa("10.244.3.1:9999")));
    let ack = from_cluster().sctp_v4(sa("10.244.3.1:9999"), sa(sclient), 42, &[2, 0, 0, 4]);
    let r = run(&mut p, &snap, CLUSTER, &ack, 4, &mut stats);
    assert_eq!(sock(&parse(&r.out)), (sa(svip), sa(sclient)));
}

#[test]
fn rejections_with_port_unreachable() {
    let snap = svc_snapshot();
    struct Case {
        desc: &'static str,
        port: u16,
        input: Vec<u8>,
        counted: DropReason,
        from: &'static str,
    }
    let cases = vec![
        Case {
            desc: "unknown port on a ClusterIP",
            port: CLUSTER,
            input: from_cluster().tcp_v4(
                sa("10.244.9.9:1"),
                sa("10.96.0.10:81"),
                TcpFlags::SYN,
                b"",
            ),
            counted: DropReason::NoService,
            from: "10.96.0.10",
        },
        Case {
            desc: "unknown port on an LB VIP, UDP",
            port: UPLINK,
            input: from_router().udp_v4(sa("203.0.113.5:1"), sa("198.51.100.10:53"), b"q"),
            counted: DropReason::NoService,
            from: "198.51.100.10",
        },
        Case {
            desc: "service without endpoints",
            port: CLUSTER,
            input: from_cluster().tcp_v4(
                sa("10.244.9.9:1"),
                sa("10.96.0.70:80"),
                TcpFlags::SYN,
                b"",
            ),
            counted: DropReason::NoEndpoints,
            from: "10.96.0.70",
        },
    ];
    for c in cases {
        let mut p = pipeline();
        let mut stats = WorkerStats::default();
        let r = run(&mut p, &snap, c.port, &c.input, 0, &mut stats);
        assert_eq!(r.verdict, Verdict::Transmit { port: c.port }, "{}", c.desc);
        let o = parse(&r.out);
        let src = EthernetFrame::new_checked(&c.input[..]).unwrap().src_addr();
        assert_eq!(o.eth_dst, src, "{}: back to the previous hop", c.desc);
        assert_eq!(o.src, ip(c.from), "{}", c.desc);
        assert_eq!(
            o.dst,
            Ipv4Packet::new_checked(&c.input[14..]).unwrap().src()
        );
        assert_eq!(
            o.icmp,
            Some((icmp::TYPE_DEST_UNREACHABLE, icmp::CODE_PORT_UNREACHABLE, 0)),
            "{}",
            c.desc
        );
        assert_eq!(o.quoted, c.input[14..14 + 28].to_vec(), "{}", c.desc);
        assert_drop(&stats, c.counted, 1);
        assert_eq!(p.conntrack().len(), 0);
    }
}

#[test]
fn only_terminating_endpoints_are_used() {
    let snap = svc_snapshot();
    let mut p = pipeline();
    let mut stats = WorkerStats::default();
    for port in 1000..1010 {
        let c = format!("10.244.9.9:{port}");
        let syn = from_cluster().tcp_v4(sa(&c), sa("10.96.0.80:80"), TcpFlags::SYN, b"");
        let r = run(&mut p, &snap, CLUSTER, &syn, 0, &mut stats);
        assert_eq!(r.verdict, Verdict::Transmit { port: CLUSTER });
        assert_eq!(
            sock(&parse(&r.out)).1,
            sa("10.244.4.1:8080"),
            "never the not-serving one"
        );
    }
}

#[test]
fn affinity_pins_a_client() {
    let snap = svc_snapshot();
    let mut p = pipeline();
    let mut stats = WorkerStats::default();
    let mut seen = std::collections::HashSet::new();
    let mut plain = std::collections::HashSet::new();
    for port in 2000..2020u16 {
        let c = format!("10.244.9.9:{port}");
        let syn = from_cluster().tcp_v4(sa(&c), sa("10.96.0.90:80"), TcpFlags::SYN, b"");
        let r = run(&mut p, &snap, CLUSTER, &syn, u64::from(port), &mut stats);
        seen.insert(sock(&parse(&r.out)).1);
        plain.insert(maglev(&web(), ipv4::PROTO_TCP, &c, "10.96.0.90:80"));
    }
    assert_eq!(seen.len(), 1, "one backend for the client: {seen:?}");
    assert!(plain.len() > 1, "without affinity Maglev spreads the ports");
    // Another client is not pinned to the first one's backend by necessity, and after
    // the timeout the first client is re-balanced.
    let later = 2020 + 61 * SECOND;
    let mut after = std::collections::HashSet::new();
    for port in 3000..3020u16 {
        let c = format!("10.244.9.9:{port}");
        let syn = from_cluster().tcp_v4(sa(&c), sa("10.96.0.90:80"), TcpFlags::SYN, b"");
        let r = run(
            &mut p,
            &snap,
            CLUSTER,
            &syn,
            later + u64::from(port),
            &mut stats,
        );
        after.insert(sock(&parse(&r.out)).1);
    }
    assert_eq!(after.len(), 1);
}

#[test]
fn hairpin_is_masqueraded() {
    let snap = svc_snapshot();
    let mut p = pipeline();
    let mut stats = WorkerStats::default();
    let (me, vip) = ("10.244.1.5:5555", "10.96.0.100:80");
    let syn = from_cluster().tcp_v4(sa(me), sa(vip), TcpFlags::SYN, b"");
    let r = run(&mut p, &snap, CLUSTER, &syn, 0, &mut stats);
    assert_eq!(r.verdict, Verdict::Transmit { port: CLUSTER });
    let o = parse(&r.out);
    assert_eq!(o.src, ip("10.0.0.1"), "hairpin: SNAT");
    assert_eq!(SocketAddrV4::new(o.dst, o.dport), sa("10.244.1.5:8080"));
    let snat = SocketAddrV4::new(o.src, o.sport);
    let reply = from_cluster().tcp_v4(
        sa("10.244.1.5:8080"),
        snat,
        TcpFlags::SYN | TcpFlags::ACK,
        b"",
    );
    let r = run(&mut p, &snap, CLUSTER, &reply, 1, &mut stats);
    assert_eq!(sock(&parse(&r.out)), (sa(vip), sa(me)));
}

#[test]
fn icmp_frag_needed_for_a_tracked_flow_reaches_the_client() {
    let snap = svc_snapshot();
    let mut p = pipeline();
    let mut stats = WorkerStats::default();
    let (client, np) = ("203.0.113.5:40000", "192.0.2.1:30080");
    let syn = from_router().tcp_v4(sa(client), sa(np), TcpFlags::SYN, b"");
    let r = run(&mut p, &snap, UPLINK, &syn, 0, &mut stats);
    let sent = parse(&r.out);
    // A router toward the backend cannot forward it: frag-needed to the SNAT address.
    let err = from_cluster().icmp_error_v4(
        ip("10.0.0.254"),
        sent.src,
        (icmp::TYPE_DEST_UNREACHABLE, icmp::CODE_FRAG_NEEDED),
        1400,
        &r.out[14..],
    );
    let r = run(&mut p, &snap, CLUSTER, &err, 1, &mut stats);
    assert_eq!(r.verdict, Verdict::Transmit { port: UPLINK });
    let o = parse(&r.out);
    assert_eq!((o.src, o.dst), (ip("10.0.0.254"), ip("203.0.113.5")));
    assert_eq!(
        o.icmp,
        Some((icmp::TYPE_DEST_UNREACHABLE, icmp::CODE_FRAG_NEEDED, 1400))
    );
    let (qs, qd, qsp, qdp) = quoted_tuple(&o.quoted);
    assert_eq!(
        (SocketAddrV4::new(qs, qsp), SocketAddrV4::new(qd, qdp)),
        (sa(client), sa(np)),
        "the quoted packet is the client's as it sent it"
    );
    assert_eq!(o.quoted.len(), 28);
    for (i, (q, orig)) in o.quoted.iter().zip(&syn[14..]).enumerate() {
        if !matches!(i, 8 | 10 | 11) {
            assert_eq!(
                q, orig,
                "quoted byte {i}: only TTL and header checksum differ"
            );
        }
    }
    assert_eq!((o.eth_src, o.eth_dst), (UPLINK_MAC, ROUTER_MAC));
    // The error counts as a packet of the flow: its NodePort frontend (id 1) and backend.
    let backend = SocketAddrV4::new(sent.dst, sent.dport);
    let slot = snap
        .backend_counter(1, *backend.ip(), backend.port())
        .unwrap();
    assert_eq!(
        (stats.frontend_packets[1], stats.backend_packets[slot]),
        (2, 2)
    );
}

#[test]
fn backend_removed_udp_repicked_tcp_dropped() {
    let web0 = web();
    let dns0 = dns();
    let snap1 = services(1, &web0, &dns0);
    let mut p = pipeline();
    let mut stats = WorkerStats::default();
    let (uc, uvip) = ("10.244.9.9:5353", "10.96.0.53:53");
    let (tc, tvip) = ("10.244.9.9:41000", "10.96.0.10:80");
    let ub = maglev(&dns0, ipv4::PROTO_UDP, uc, uvip);
    let tb = maglev(&web0, ipv4::PROTO_TCP, tc, tvip);
    let q = from_cluster().udp_v4(sa(uc), sa(uvip), b"q");
    assert_eq!(
        sock(&parse(&run(&mut p, &snap1, CLUSTER, &q, 0, &mut stats).out)).1,
        ub
    );
    let syn = from_cluster().tcp_v4(sa(tc), sa(tvip), TcpFlags::SYN, b"");
    assert_eq!(
        sock(&parse(
            &run(&mut p, &snap1, CLUSTER, &syn, 0, &mut stats).out
        ))
        .1,
        tb
    );
    // Both chosen backends leave their services.
    let without = |set: &BackendSet, gone: SocketAddrV4| {
        let rest: Vec<(String, u16)> = set
            .backends
            .iter()
            .filter(|b| SocketAddrV4::new(b.addr, b.port) != gone)
            .map(|b| (b.addr.to_string(), b.port))
            .collect();
        let rest: Vec<(&str, u16, EndpointState, Option<&str>)> = rest
            .iter()
            .map(|(a, p)| (a.as_str(), *p, EndpointState::Ready, None))
            .collect();
        set_of(&rest)
    };
    let snap2 = services(2, &without(&web0, tb), &without(&dns0, ub));
    let r = run(&mut p, &snap2, CLUSTER, &q, 10, &mut stats);
    assert_eq!(r.verdict, Verdict::Transmit { port: CLUSTER });
    let nb = sock(&parse(&r.out)).1;
    assert_ne!(nb, ub, "UDP re-picked");
    let ack = from_cluster().tcp_v4(sa(tc), sa(tvip), TcpFlags::ACK, b"data");
    let r = run(&mut p, &snap2, CLUSTER, &ack, 10, &mut stats);
    assert_eq!(r.verdict, Verdict::Drop(DropReason::BackendGone));
    assert_drop(&stats, DropReason::BackendGone, 1);
    // The entry lingers, unrefreshed by the dropped segments, for the backend_gone grace.
    let key = FlowKey::new(ipv4::PROTO_TCP, ip("10.244.9.9"), 41000, ip(CIP), 80);
    let grace = p.conntrack().timeouts().backend_gone;
    let r = run(&mut p, &snap2, CLUSTER, &ack, 5000, &mut stats);
    assert_eq!(r.verdict, Verdict::Drop(DropReason::BackendGone));
    let (id, _) = p.conntrack().peek(&key, 5000).expect("kept for the grace");
    assert_eq!(p.conntrack().entry(id).expires_at(), 10 + grace);
    // Past it the entry is gone, and the retransmission is not balanced anew.
    let r = run(&mut p, &snap2, CLUSTER, &ack, 10 + grace, &mut stats);
    assert_eq!(r.verdict, Verdict::Drop(DropReason::TcpNoFlow));
    assert!(
        p.conntrack().peek(&key, 10 + grace).is_none(),
        "entry expired"
    );
    assert_drop(&stats, DropReason::BackendGone, 2);
}

/// An endpoint moved between two slices remove-first is absent from one snapshot: its
/// TCP flow's segments in the gap are dropped (`backend_gone`), and once a snapshot lists it
/// again the flow goes on to the same backend (the client's retransmission gets through).
#[test]
fn tcp_flow_survives_an_endpoint_absent_for_a_moment() {
    let WebFlow {
        web: web0,
        snap1: _,
        mut p,
        mut stats,
        client,
        vip,
        backend,
    } = web_flow_opened();
    let reply = from_cluster().tcp_v4(backend, sa(client), TcpFlags::SYN | TcpFlags::ACK, b"");
    let snap1 = services(1, &web0, &dns());
    run(&mut p, &snap1, CLUSTER, &reply, 1, &mut stats);
    let ack = from_cluster().tcp_v4(sa(client), sa(vip), TcpFlags::ACK, b"GET /");
    assert_eq!(
        sock(&parse(
            &run(&mut p, &snap1, CLUSTER, &ack, 2, &mut stats).out
        ))
        .1,
        backend
    );
    let rest: Vec<(String, u16)> = web0
        .backends
        .iter()
        .filter(|b| SocketAddrV4::new(b.addr, b.port) != backend)
        .map(|b| (b.addr.to_string(), b.port))
        .collect();
    let rest: Vec<_> = rest.iter().map(|(a, port)| ready(a, *port)).collect();
    let gap = services(2, &set_of(&rest), &dns());
    let r = run(&mut p, &gap, CLUSTER, &ack, 100, &mut stats);
    assert_eq!(r.verdict, Verdict::Drop(DropReason::BackendGone));
    // Listed again (by another slice: the set is the same), 0.3 s later.
    let back = services(3, &web0, &dns());
    let r = run(&mut p, &back, CLUSTER, &ack, 400, &mut stats);
    assert_eq!(r.verdict, Verdict::Transmit { port: CLUSTER });
    assert_eq!(sock(&parse(&r.out)).1, backend, "the same backend");
    let key = FlowKey::new(ipv4::PROTO_TCP, ip("10.244.9.9"), 41000, ip(CIP), 80);
    let (id, _) = p.conntrack().peek(&key, 400).unwrap();
    assert!(
        p.conntrack().entry(id).expires_at() > 400 + p.conntrack().timeouts().backend_gone,
        "an established timeout again"
    );
    let r = run(&mut p, &back, CLUSTER, &reply, 401, &mut stats);
    assert_eq!(r.verdict, Verdict::Transmit { port: CLUSTER });
    assert_drop(&stats, DropReason::BackendGone, 1);
}

/// A TCP segment without SYN and without a flow is never balanced as a new connection
/// (kube-proxy drops nf_conntrack's INVALID): it would reach a pod that answers RST.
#[test]
fn tcp_without_syn_and_without_flow_is_dropped() {
    let snap = svc_snapshot();
    let mut p = pipeline();
    let mut stats = WorkerStats::default();
    let (client, vip) = ("10.244.9.9:41000", "10.96.0.10:80");
    for flags in [
        TcpFlags::ACK,
        TcpFlags::ACK | TcpFlags::PSH,
        TcpFlags::SYN | TcpFlags::ACK,
        TcpFlags::RST,
        TcpFlags::FIN | TcpFlags::ACK,
        TcpFlags::SYN | TcpFlags::RST,
    ] {
        let frame = from_cluster().tcp_v4(sa(client), sa(vip), flags, b"x");
        let r = run(&mut p, &snap, CLUSTER, &frame, 0, &mut stats);
        assert_eq!(r.verdict, Verdict::Drop(DropReason::TcpNoFlow), "{flags:?}");
    }
    assert_eq!(p.conntrack().len(), 0);
    assert_eq!(stats.frontend_packets[0], 0, "not counted as the Service's");
    // Also through a NodePort; a SYN still opens.
    let ack = from_router().tcp_v4(
        sa("203.0.113.5:40000"),
        sa("192.0.2.1:30080"),
        TcpFlags::ACK,
        b"",
    );
    let r = run(&mut p, &snap, UPLINK, &ack, 0, &mut stats);
    assert_eq!(r.verdict, Verdict::Drop(DropReason::TcpNoFlow));
    assert_drop(&stats, DropReason::TcpNoFlow, 7);
    let syn = from_cluster().tcp_v4(sa(client), sa(vip), TcpFlags::SYN, b"");
    let r = run(&mut p, &snap, CLUSTER, &syn, 0, &mut stats);
    assert_eq!(r.verdict, Verdict::Transmit { port: CLUSTER });
    // With `tcp_loose` (the benchmarks' captures have no handshakes) an ACK opens.
    let mut loose = Pipeline::new(PipelineConfig {
        conntrack: ConntrackConfig {
            capacity: 1024,
            tcp_loose: true,
            ..ConntrackConfig::default()
        },
        ..config(0, 1)
    })
    .unwrap();
    let ack = from_cluster().tcp_v4(sa(client), sa(vip), TcpFlags::ACK, b"x");
    let r = run(&mut loose, &snap, CLUSTER, &ack, 0, &mut stats);
    assert_eq!(r.verdict, Verdict::Transmit { port: CLUSTER });
    // Routed TCP that no frontend claims is not concerned.
    let routed = from_cluster().tcp_v4(
        sa("10.244.9.9:41000"),
        sa("203.0.113.9:443"),
        TcpFlags::ACK,
        b"",
    );
    let r = run(&mut p, &snap, CLUSTER, &routed, 0, &mut stats);
    assert_ne!(r.verdict, Verdict::Drop(DropReason::TcpNoFlow));
}

/// kube-semantics item 12, frontend edits: a nodePort change or a deleted Service leaves
/// the established TCP flows it created alone while an EndpointSlice still lists their
/// backend (the translation is in conntrack by value); UDP flows of the removed frontend
/// are flushed; a backend no slice lists any more loses its TCP flows.
#[test]
fn frontend_edits_keep_tcp_flows_and_flush_udp() {
    let (web0, dns0) = (web(), dns());
    let snap1 = services(1, &web0, &dns0);
    let mut p = pipeline();
    let mut stats = WorkerStats::default();
    let (client, node_port) = ("203.0.113.5:40000", "192.0.2.1:30080");
    let syn = from_router().tcp_v4(sa(client), sa(node_port), TcpFlags::SYN, b"");
    let first = parse(&run(&mut p, &snap1, UPLINK, &syn, 0, &mut stats).out);
    let (snat, backend) = sock(&first);
    let synack = from_cluster().tcp_v4(backend, snat, TcpFlags::SYN | TcpFlags::ACK, b"");
    run(&mut p, &snap1, CLUSTER, &synack, 1, &mut stats);
    let (uc, uvip) = ("10.244.9.9:5353", "10.96.0.53:53");
    let q = from_cluster().udp_v4(sa(uc), sa(uvip), b"q");
    run(&mut p, &snap1, CLUSTER, &q, 1, &mut stats);

    // The nodePort moves 30080 → 30081 and the UDP Service is deleted; the web pods stay.
    let mut edited = services(2, &web0, &dns0);
    let np = edited.node_ports.remove(&(Protocol::Tcp, 30080)).unwrap();
    edited.node_ports.insert((Protocol::Tcp, 30081), np);
    let dns_key = FrontendKey {
        addr: ip("10.96.0.53"),
        protocol: Protocol::Udp,
        port: 53,
    };
    edited.frontends.remove(&dns_key);
    edited.service_addresses.remove(&ip("10.96.0.53"));
    assert!(edited
        .backend_presence
        .contains(Protocol::Tcp, *backend.ip(), backend.port()));
    let ack = from_router().tcp_v4(sa(client), sa(node_port), TcpFlags::ACK, b"GET /");
    let r = run(&mut p, &edited, UPLINK, &ack, 10, &mut stats);
    assert_eq!(r.verdict, Verdict::Transmit { port: CLUSTER });
    assert_eq!(sock(&parse(&r.out)), (snat, backend), "same translation");
    let answer = from_cluster().tcp_v4(backend, snat, TcpFlags::ACK, b"200 OK");
    let r = run(&mut p, &edited, CLUSTER, &answer, 11, &mut stats);
    assert_eq!(r.verdict, Verdict::Transmit { port: UPLINK });
    assert_eq!(sock(&parse(&r.out)), (sa(node_port), sa(client)));
    // A new connection to the old nodePort is not served; to the new one it is.
    let syn2 = from_router().tcp_v4(sa("203.0.113.5:40001"), sa(node_port), TcpFlags::SYN, b"");
    let r = run(&mut p, &edited, UPLINK, &syn2, 12, &mut stats);
    assert_ne!(r.verdict, Verdict::Transmit { port: CLUSTER });
    // The UDP flow is flushed: its next datagram finds no Service (inside the service CIDR).
    let r = run(&mut p, &edited, CLUSTER, &q, 12, &mut stats);
    assert_eq!(r.verdict, Verdict::Drop(DropReason::NoService));
    let ukey = FlowKey::new(
        ipv4::PROTO_UDP,
        ip("10.244.9.9"),
        5353,
        ip("10.96.0.53"),
        53,
    );
    assert!(p.conntrack().peek(&ukey, 12).is_none(), "UDP entry flushed");

    // The web Service is deleted too, and its slices with it: the backend is listed
    // nowhere, the TCP flow ends.
    let mut deleted = services(3, &set_of(&[]), &dns0);
    deleted.node_ports.clear();
    deleted.backend_presence = Default::default();
    let r = run(&mut p, &deleted, UPLINK, &ack, 20, &mut stats);
    assert_eq!(r.verdict, Verdict::Drop(DropReason::BackendGone));
    // While an orphaned slice still lists it, the flow would have gone on.
    let mut orphaned = services(4, &set_of(&[]), &dns0);
    orphaned.node_ports.clear();
    orphaned.backend_presence = Default::default();
    orphaned
        .backend_presence
        .add(Protocol::Tcp, *backend.ip(), backend.port());
    let r = run(&mut p, &orphaned, UPLINK, &ack, 21, &mut stats);
    assert_eq!(r.verdict, Verdict::Transmit { port: CLUSTER });
}

/// A TCP flow from a pod to the `web` ClusterIP, opened (SYN at time 0) under generation 1
/// of [`services`]: the tests of snapshot changes start from it.
struct WebFlow {
    web: Arc<BackendSet>,
    snap1: Snapshot,
    p: Pipeline,
    stats: WorkerStats,
    client: &'static str,
    vip: &'static str,
    /// The backend Maglev picked.
    backend: SocketAddrV4,
}

fn web_flow_opened() -> WebFlow {
    let web = web();
    let snap1 = services(1, &web, &dns());
    let mut p = pipeline();
    let mut stats = WorkerStats::default();
    let (client, vip) = ("10.244.9.9:41000", "10.96.0.10:80");
    let backend = maglev(&web, ipv4::PROTO_TCP, client, vip);
    let syn = from_cluster().tcp_v4(sa(client), sa(vip), TcpFlags::SYN, b"");
    run(&mut p, &snap1, CLUSTER, &syn, 0, &mut stats);
    WebFlow {
        web,
        snap1,
        p,
        stats,
        client,
        vip,
        backend,
    }
}

/// Per-frontend and per-backend counters are indexes of one snapshot: an established flow
/// must count under the new snapshot's frontend id and backend slot once it changes.
#[test]
fn packet_counters_follow_a_snapshot_change() {
    let WebFlow {
        web: web0,
        snap1,
        mut p,
        mut stats,
        client: tc,
        vip: tvip,
        backend: tb,
    } = web_flow_opened();
    let slot1 = snap1.backend_counter(0, *tb.ip(), tb.port()).unwrap();
    let ack = from_cluster().tcp_v4(sa(tc), sa(tvip), TcpFlags::ACK, b"data");
    run(&mut p, &snap1, CLUSTER, &ack, 1, &mut stats);
    assert_eq!(
        (stats.frontend_packets[0], stats.backend_packets[slot1]),
        (2, 2)
    );

    // Generation 2: another frontend comes first (the ClusterIP's id becomes 1) and a
    // backend sorting before the flow's joins the set (its slot moves).
    let mut backends: Vec<(String, u16)> = web0
        .backends
        .iter()
        .map(|b| (b.addr.to_string(), b.port))
        .collect();
    backends.push(("10.244.1.1".to_string(), 8080));
    let web2 = set_of(
        &backends
            .iter()
            .map(|(a, port)| ready(a, *port))
            .collect::<Vec<_>>(),
    );
    let first = fe(
        FrontendKind::ClusterIp,
        "10.96.0.200",
        Protocol::Tcp,
        80,
        &dns(),
    );
    let snap2 = snapshot(
        2,
        vec![
            first,
            fe(FrontendKind::ClusterIp, CIP, Protocol::Tcp, 80, &web2),
        ],
    );
    let slot2 = snap2.backend_counter(1, *tb.ip(), tb.port()).unwrap();
    assert_ne!(slot1, slot2, "the test must move the backend's slot");
    let before = (
        stats.frontend_packets.clone(),
        stats.backend_packets.clone(),
    );
    for now in 2..5 {
        let r = run(&mut p, &snap2, CLUSTER, &ack, now, &mut stats);
        assert_eq!(sock(&parse(&r.out)).1, tb, "the flow keeps its backend");
    }
    let grew =
        |after: &[u64], before: &[u64], i: usize| after[i] - before.get(i).copied().unwrap_or(0);
    assert_eq!(grew(&stats.frontend_packets, &before.0, 1), 3);
    assert_eq!(grew(&stats.frontend_packets, &before.0, 0), 0);
    assert_eq!(grew(&stats.backend_packets, &before.1, slot2), 3);
    let moved: u64 = (0..stats.backend_packets.len())
        .filter(|&i| i != slot2)
        .map(|i| grew(&stats.backend_packets, &before.1, i))
        .sum();
    assert_eq!(moved, 0, "no other backend counted");
}

#[test]
fn serving_terminating_backend_keeps_its_flow() {
    let WebFlow {
        web: web0,
        mut p,
        mut stats,
        client: tc,
        vip: tvip,
        backend: tb,
        ..
    } = web_flow_opened();
    let set2 = with_state(&web0, tb, EndpointState::ServingTerminating);
    let snap2 = services(2, &set2, &dns());
    let ack = from_cluster().tcp_v4(sa(tc), sa(tvip), TcpFlags::ACK, b"data");
    let r = run(&mut p, &snap2, CLUSTER, &ack, 10, &mut stats);
    assert_eq!(r.verdict, Verdict::Transmit { port: CLUSTER });
    assert_eq!(sock(&parse(&r.out)).1, tb);
    // New connections avoid it.
    for port in 5000..5020 {
        let c = format!("10.244.9.9:{port}");
        let syn = from_cluster().tcp_v4(sa(&c), sa(tvip), TcpFlags::SYN, b"");
        let r = run(&mut p, &snap2, CLUSTER, &syn, 11, &mut stats);
        assert_ne!(sock(&parse(&r.out)).1, tb);
    }
}

#[test]
fn syn_flood_does_not_break_established_flows() {
    let snap = svc_snapshot();
    let mut cfg = config(0, 1);
    cfg.conntrack.capacity = 64;
    let mut p = Pipeline::new(cfg).unwrap();
    let mut stats = WorkerStats::default();
    let (client, np) = ("203.0.113.5:40000", "192.0.2.1:30080");
    let syn = from_router().tcp_v4(sa(client), sa(np), TcpFlags::SYN, b"");
    let out = parse(&run(&mut p, &snap, UPLINK, &syn, 0, &mut stats).out);
    let (snat, backend) = sock(&out);
    let synack = from_cluster().tcp_v4(backend, snat, TcpFlags::SYN | TcpFlags::ACK, b"");
    run(&mut p, &snap, CLUSTER, &synack, 1, &mut stats);
    let ack = from_router().tcp_v4(sa(client), sa(np), TcpFlags::ACK, b"");
    run(&mut p, &snap, UPLINK, &ack, 2, &mut stats);
    for i in 0..2000u32 {
        let src = SocketAddrV4::new(Ipv4Addr::from(0xc612_0000 + i), 1024 + (i % 50000) as u16);
        let f = from_router().tcp_v4(src, sa(np), TcpFlags::SYN, b"");
        let r = run(&mut p, &snap, UPLINK, &f, 3, &mut stats);
        assert_eq!(r.verdict, Verdict::Transmit { port: CLUSTER });
    }
    assert_drop(&stats, DropReason::CtFull, 0);
    let data = from_router().tcp_v4(sa(client), sa(np), TcpFlags::ACK | TcpFlags::PSH, b"GET /");
    let r = run(&mut p, &snap, UPLINK, &data, 4, &mut stats);
    assert_eq!(sock(&parse(&r.out)), (snat, backend), "same translation");
    let reply = from_cluster().tcp_v4(backend, snat, TcpFlags::ACK, b"200");
    let r = run(&mut p, &snap, CLUSTER, &reply, 5, &mut stats);
    assert_eq!(sock(&parse(&r.out)), (sa(np), sa(client)));
}

#[test]
fn fragments_and_echo_to_service_addresses() {
    let snap = svc_snapshot();
    let mut p = pipeline();
    let mut stats = WorkerStats::default();
    let mut frag = from_cluster().udp_v4(sa("10.244.9.9:5353"), sa("10.96.0.53:53"), b"q");
    {
        let mut ipp = Ipv4Packet::new_unchecked(&mut frag[14..]);
        ipp.set_more_frags(true);
        ipp.fill_checksum();
    }
    let r = run(&mut p, &snap, CLUSTER, &frag, 0, &mut stats);
    assert_eq!(r.verdict, Verdict::Reassemble);
    let mut off = Pipeline::new(PipelineConfig {
        reassemble_fragments: false,
        ..config(0, 1)
    })
    .unwrap();
    let r = run(&mut off, &snap, CLUSTER, &frag, 0, &mut stats);
    assert_eq!(r.verdict, Verdict::Drop(DropReason::Fragment));
    let ping = from_cluster().icmp_echo_v4(ip("10.244.9.9"), ip(CIP), true, 9, 1, b"hi");
    let r = run(&mut p, &snap, CLUSTER, &ping, 0, &mut stats);
    assert_eq!(r.verdict, Verdict::Transmit { port: CLUSTER });
    let o = parse(&r.out);
    assert_eq!((o.src, o.dst), (ip(CIP), ip("10.244.9.9")));
    assert_eq!(o.icmp, Some((icmp::TYPE_ECHO_REPLY, 0, 1)));
}

/// A first fragment as hosts send it: the UDP header's length covers the whole datagram,
/// more bytes than the fragment carries. It used to fail the UDP length check and be
/// dropped as `malformed`, routed or not.
#[test]
fn first_fragment_of_a_large_udp_datagram() {
    let snap = svc_snapshot();
    let first_fragment = |dst: &str| {
        let whole = from_cluster().udp_v4(sa("10.244.9.9:5353"), sa(dst), &[0x5a; 1000]);
        // The first 16 bytes of the datagram (its 8-byte UDP header and 8 data bytes).
        let mut frag = whole[..14 + 20 + 16].to_vec();
        let mut ipp = Ipv4Packet::new_unchecked(&mut frag[14..]);
        ipp.set_total_len(20 + 16);
        ipp.set_more_frags(true);
        ipp.fill_checksum();
        frag
    };
    let cases = [
        (
            "routed, reassembly on",
            first_fragment("203.0.113.5:53"),
            true,
            Verdict::Reassemble,
        ),
        (
            "to a ClusterIP, reassembly on",
            first_fragment("10.96.0.53:53"),
            true,
            Verdict::Reassemble,
        ),
        (
            "routed, reassembly off: untouched but for TTL",
            first_fragment("203.0.113.5:53"),
            false,
            Verdict::Transmit { port: UPLINK },
        ),
        (
            "to a ClusterIP, reassembly off",
            first_fragment("10.96.0.53:53"),
            false,
            Verdict::Drop(DropReason::Fragment),
        ),
    ];
    for (desc, frag, reassemble_fragments, verdict) in cases {
        let mut p = Pipeline::new(PipelineConfig {
            reassemble_fragments,
            ..config(0, 1)
        })
        .unwrap();
        let mut stats = WorkerStats::default();
        let r = run(&mut p, &snap, CLUSTER, &frag, 0, &mut stats);
        assert_eq!(r.verdict, verdict, "{desc}");
        match verdict {
            Verdict::Drop(reason) => assert_drop(&stats, reason, 1),
            Verdict::Reassemble => assert_eq!(r.out, frag, "{desc}: untouched"),
            _ => {
                assert_eq!(r.out.len(), frag.len(), "{desc}");
                assert_eq!(r.out[14 + 8], 63, "{desc}: TTL");
                assert_eq!(
                    r.out[14 + 20..],
                    frag[14 + 20..],
                    "{desc}: UDP bytes as sent"
                );
                assert!(Ipv4Packet::new_checked(&r.out[14..])
                    .unwrap()
                    .verify_checksum());
            }
        }
    }
}

/// A frame from a pod behind node-3 (VTEP 10.0.0.3).
fn from_node3(inner: &[u8]) -> Vec<u8> {
    FrameBuilder::new(NODE2_MAC, CLUSTER_MAC).vxlan_encap(
        ip("10.0.0.3"),
        ip("10.0.0.1"),
        51000,
        VNI,
        inner,
    )
}

#[test]
fn internal_traffic_policy_local() {
    let snap = svc_snapshot();
    let mut p = pipeline();
    let mut stats = WorkerStats::default();
    let vip = "10.96.0.110:80";
    for port in 6000..6010 {
        let c = format!("10.245.2.7:{port}");
        let inner = pod_inner().tcp_v4(sa(&c), sa(vip), TcpFlags::SYN, b"");
        let r = run(&mut p, &snap, CLUSTER, &from_node2(&inner), 0, &mut stats);
        assert_eq!(r.verdict, Verdict::Transmit { port: CLUSTER });
        let outer = parse(&r.out);
        assert_eq!(outer.dst, ip("10.0.0.2"), "back to node-2 over VXLAN");
        let inner_out = parse(&r.out[50..]);
        assert_eq!(
            sock(&inner_out).1,
            sa("10.245.2.9:8080"),
            "node-2's endpoint only"
        );
    }
    let inner = pod_inner().tcp_v4(sa("10.245.3.7:6000"), sa(vip), TcpFlags::SYN, b"");
    let r = run(&mut p, &snap, CLUSTER, &from_node3(&inner), 0, &mut stats);
    assert_eq!(r.verdict, Verdict::Drop(DropReason::NoLocalEndpoint));
    // Not from a pod (no VXLAN): Cluster semantics.
    let syn = from_cluster().tcp_v4(sa("10.244.9.9:6000"), sa(vip), TcpFlags::SYN, b"");
    let r = run(&mut p, &snap, CLUSTER, &syn, 0, &mut stats);
    assert!(matches!(r.verdict, Verdict::Transmit { .. }));
}

#[test]
fn two_workers_agree_on_owners() {
    let snap = svc_snapshot();
    let mut ps = [
        Pipeline::new(config(0, 2)).unwrap(),
        Pipeline::new(config(1, 2)).unwrap(),
    ];
    let mut stats = WorkerStats::default();
    let mut owners_seen = std::collections::HashSet::new();
    for port in 40000..40016u16 {
        for (dst, snat) in [("192.0.2.1:30080", true), ("198.51.100.20:80", false)] {
            let client = format!("203.0.113.5:{port}");
            let syn = from_router().tcp_v4(sa(&client), sa(dst), TcpFlags::SYN, b"");
            let frame = VecFrame::new(&syn);
            let o = ps[0].owner(&frame, UPLINK, &snap);
            assert_eq!(o, ps[1].owner(&frame, UPLINK, &snap));
            owners_seen.insert(o);
            let other = 1 - o;
            let r = run(&mut ps[other], &snap, UPLINK, &syn, 0, &mut stats);
            assert_eq!(r.verdict, Verdict::Handoff { worker: o as u16 });
            let r = run(&mut ps[o], &snap, UPLINK, &syn, 0, &mut stats);
            assert_eq!(r.verdict, Verdict::Transmit { port: CLUSTER });
            let (s, b) = sock(&parse(&r.out));
            assert_eq!(s.ip() == &ip("10.0.0.1"), snat);
            let reply = from_cluster().tcp_v4(b, s, TcpFlags::SYN | TcpFlags::ACK, b"");
            let rf = VecFrame::new(&reply);
            assert_eq!(
                ps[0].owner(&rf, CLUSTER, &snap),
                o,
                "reply owner of {client} -> {dst}"
            );
            assert_eq!(ps[1].owner(&rf, CLUSTER, &snap), o);
            let r = run(&mut ps[o], &snap, CLUSTER, &reply, 1, &mut stats);
            assert_eq!(sock(&parse(&r.out)), (sa(dst), sa(&client)));
        }
    }
    assert_eq!(owners_seen.len(), 2, "both workers own some flows");
}

mod robustness {
    //! Mutated valid frames through the whole pipeline on every port: no panic, every
    //! transmitted IPv4 frame has a valid header checksum.
    use super::*;
    use proptest::prelude::*;

    fn seeds() -> Vec<Vec<u8>> {
        let inner = pod_inner().tcp_v4(
            sa("10.245.2.7:6000"),
            sa("10.96.0.110:80"),
            TcpFlags::SYN,
            b"",
        );
        vec![
            from_router().tcp_v4(
                sa("203.0.113.5:40000"),
                sa("192.0.2.1:30080"),
                TcpFlags::SYN,
                b"x",
            ),
            from_cluster().udp_v4(sa("10.244.9.9:5353"), sa("10.96.0.53:53"), b"q"),
            from_cluster().sctp_v4(
                sa("10.244.9.9:7000"),
                sa("10.96.0.60:9999"),
                0,
                &build::sctp_init_chunk(1),
            ),
            from_node2(&inner),
            from_router().ttl(1).ip_options(&[1, 1, 1, 1]).udp_v4(
                sa("203.0.113.5:1"),
                sa("10.244.1.5:2"),
                b"",
            ),
            from_cluster().icmp_error_v4(
                ip("10.0.0.254"),
                ip("10.0.0.1"),
                (icmp::TYPE_DEST_UNREACHABLE, icmp::CODE_FRAG_NEEDED),
                1400,
                &from_cluster().tcp_v4(
                    sa("10.0.0.1:32768"),
                    sa("10.244.1.5:8080"),
                    TcpFlags::SYN,
                    b"",
                )[14..],
            ),
            build::arp_request(CLIENT_MAC, ip("192.0.2.7"), ip("198.51.100.10")),
        ]
    }

    proptest! {
        #[test]
        fn mutated_frames_never_panic(
            which in 0usize..7,
            port in prop_oneof![Just(UPLINK), Just(CLUSTER), Just(UPLINK_EXC)],
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6),
            cut in any::<usize>(),
        ) {
            let snap = svc_snapshot();
            let mut p = pipeline();
            let mut stats = WorkerStats::default();
            let mut f = seeds().swap_remove(which);
            for (at, x) in flips {
                let n = f.len();
                f[at % n] ^= x;
            }
            f.truncate(cut % (f.len() + 1));
            let r = run(&mut p, &snap, port, &f, 0, &mut stats);
            if let Verdict::Transmit { port: out } = r.verdict {
                if out != port || port == UPLINK_EXC {
                    // Forwarded or built by the pipeline: the IPv4 header must be right.
                    if let Ok(e) = EthernetFrame::new_checked(&r.out[..]) {
                        if e.ethertype() == ethernet::ETHERTYPE_IPV4 && port != UPLINK_EXC {
                            let ipp = Ipv4Packet::new_checked(e.payload()).unwrap();
                            prop_assert!(ipp.verify_checksum());
                        }
                    }
                }
            }
        }
    }
}

/// Writes valid frames (first byte = port selector of the fuzz target) as a seed corpus
/// into `$FUZZ_SEEDS`: `FUZZ_SEEDS=fuzz/corpus/receive_path cargo test ... -- --ignored`.
#[test]
#[ignore]
fn write_fuzz_seeds() {
    let Ok(dir) = std::env::var("FUZZ_SEEDS") else {
        return;
    };
    std::fs::create_dir_all(&dir).unwrap();
    let inner = pod_inner().tcp_v4(
        sa("10.245.2.7:6000"),
        sa("10.96.0.10:80"),
        TcpFlags::SYN,
        b"",
    );
    let inner_udp = pod_inner().udp_v4(sa("10.245.2.7:6000"), sa("10.96.0.10:53"), b"q");
    // Selector: bits 0-1 port (0 uplink, 1 cluster, 2 exception), bit 2 feed back.
    let seeds: Vec<(u8, Vec<u8>)> = vec![
        (
            4,
            from_router().tcp_v4(
                sa("203.0.113.5:40000"),
                sa("192.0.2.1:30080"),
                TcpFlags::SYN,
                b"x",
            ),
        ),
        (
            4,
            from_router().tcp_v4(
                sa("203.0.113.5:40000"),
                sa("198.51.100.10:443"),
                TcpFlags::SYN,
                b"",
            ),
        ),
        (
            0,
            from_router().tcp_v4(
                sa("198.18.0.1:40000"),
                sa("198.51.100.10:443"),
                TcpFlags::SYN,
                b"",
            ),
        ),
        (
            4,
            from_router().sctp_v4(
                sa("203.0.113.5:7000"),
                sa("198.51.100.10:9"),
                0,
                &build::sctp_init_chunk(1),
            ),
        ),
        (
            5,
            from_cluster().udp_v4(sa("10.244.9.9:5353"), sa("10.96.0.10:53"), b"q"),
        ),
        (
            5,
            from_cluster().tcp_v4(
                sa("10.244.9.9:5353"),
                sa("10.96.0.10:80"),
                TcpFlags::SYN,
                b"",
            ),
        ),
        (5, from_node2(&inner)),
        (1, from_node2(&inner_udp)),
        (
            0,
            from_router().ttl(1).ip_options(&[1, 1, 1, 1]).udp_v4(
                sa("203.0.113.5:1"),
                sa("10.244.1.5:2"),
                b"",
            ),
        ),
        (
            0,
            from_router().dont_frag(true).udp_v4(
                sa("203.0.113.5:1"),
                sa("10.245.2.9:2"),
                &[7; 1480],
            ),
        ),
        (
            1,
            from_cluster().icmp_error_v4(
                ip("10.0.0.254"),
                ip("10.0.0.1"),
                (icmp::TYPE_DEST_UNREACHABLE, icmp::CODE_FRAG_NEEDED),
                1400,
                &from_cluster().tcp_v4(
                    sa("10.0.0.1:32768"),
                    sa("10.244.1.5:8080"),
                    TcpFlags::SYN,
                    b"",
                )[14..],
            ),
        ),
        (
            1,
            from_cluster().icmp_echo_v4(ip("10.244.9.9"), ip("10.96.0.10"), true, 1, 1, b"hi"),
        ),
        (
            0,
            build::arp_request(CLIENT_MAC, ip("192.0.2.7"), ip("198.51.100.10")),
        ),
        (
            0,
            build::arp_reply(CLIENT_MAC, ip("192.0.2.7"), UPLINK_MAC, ip("192.0.2.1")),
        ),
        (
            2,
            FrameBuilder::new(UPLINK_MAC, ROUTER_MAC).vlan(5).udp_v4(
                sa("192.0.2.1:1"),
                sa("8.8.8.8:53"),
                b"",
            ),
        ),
    ];
    for (i, (sel, f)) in seeds.into_iter().enumerate() {
        let mut bytes = vec![sel];
        bytes.extend_from_slice(&f);
        std::fs::write(format!("{dir}/seed-{i:02}"), bytes).unwrap();
    }
}

#[test]
fn trace_names_the_decisions() {
    let snap = svc_snapshot();
    let mut p = pipeline();
    let key = FlowKey::new(
        ipv4::PROTO_TCP,
        ip("203.0.113.5"),
        40000,
        ip("192.0.2.1"),
        30080,
    );
    let t = p.trace(&key, &snap, 0);
    let text = t.to_string();
    assert!(text.contains("NodePort"), "{text}");
    assert!(text.contains("Maglev"), "{text}");
    assert!(text.contains("SNAT: masquerade"), "{text}");
    let backend = maglev(
        &web(),
        ipv4::PROTO_TCP,
        "203.0.113.5:40000",
        "192.0.2.1:30080",
    );
    assert_eq!(
        t.translated.map(|k| (k.dst, k.dst_port)),
        Some((*backend.ip(), backend.port()))
    );
    assert_eq!(t.egress, Some((CLUSTER, ip("10.0.0.254"))));
    // Once the flow exists, trace reports the conntrack entry.
    let mut stats = WorkerStats::default();
    let syn = from_router().tcp_v4(
        sa("203.0.113.5:40000"),
        sa("192.0.2.1:30080"),
        TcpFlags::SYN,
        b"",
    );
    run(&mut p, &snap, UPLINK, &syn, 0, &mut stats);
    let t = p.trace(&key, &snap, 1);
    assert!(t.steps[0].starts_with("conntrack"), "{t}");
    let blocked = FlowKey::new(ipv4::PROTO_TCP, ip("198.18.0.1"), 1, ip(LB), 443);
    assert!(p
        .trace(&blocked, &snap, 0)
        .to_string()
        .contains("loadBalancerSourceRanges"));
    let eip = FlowKey::new(ipv4::PROTO_TCP, ip("203.0.113.5"), 1, ip(EIP), 80);
    assert!(p.trace(&eip, &snap, 0).to_string().contains("no SNAT"));
}

/// The established-flow fast path against the general path: the same packets through two
/// pipelines, one with the fast path off, give the same verdicts, bytes, counters and
/// conntrack state, including the cases the fast path must hand over (TTL 1, MTU, bad
/// checksum, options, expiry, a new snapshot, a moved neighbor).
#[test]
fn fast_path_matches_the_general_path() {
    let web = web();
    let snaps = [services(1, &web, &dns()), services(2, &web, &dns())];
    let mut fast = pipeline();
    let mut general = pipeline();
    general.set_fast_path(false);
    let (mut fast_stats, mut general_stats) = (WorkerStats::default(), WorkerStats::default());

    let (client, vip) = ("10.244.9.9:41000", "10.96.0.10:80");
    let backend = maglev(&web, ipv4::PROTO_TCP, client, vip);
    let to_vip = |flags, payload: &[u8]| from_cluster().tcp_v4(sa(client), sa(vip), flags, payload);
    let from_backend = |flags| from_cluster().tcp_v4(backend, sa(client), flags, b"");
    let pod = "10.245.2.9:5555";
    let pod_to_vip = |flags| from_node2(&pod_inner().tcp_v4(sa(pod), sa(vip), flags, b"via vxlan"));
    let pod_backend = maglev(&web, ipv4::PROTO_TCP, pod, vip);
    let (nodeport, outside) = ("192.0.2.1:30080", "203.0.113.7:50000");
    let np_backend = maglev(&web, ipv4::PROTO_TCP, outside, nodeport);
    let np_syn = from_router().tcp_v4(sa(outside), sa(nodeport), TcpFlags::SYN, b"");
    // The SNAT source a fresh pipeline gives the NodePort flow (both start with it).
    let snat = {
        let r = run(
            &mut pipeline(),
            &snaps[0],
            UPLINK,
            &np_syn,
            0,
            &mut WorkerStats::default(),
        );
        sock(&parse(&r.out)).0
    };
    let dns_flow =
        |payload: &[u8]| from_cluster().udp_v4(sa("10.244.9.9:5353"), sa("10.96.0.53:53"), payload);
    let mut bad_checksum = to_vip(TcpFlags::ACK, b"x");
    bad_checksum[14 + 10] ^= 0xff;
    let big =
        from_cluster()
            .dont_frag(true)
            .tcp_v4(sa(client), sa(vip), TcpFlags::ACK, &[7u8; 1480]);
    let moved_vtep = MacAddr([0x02, 0xbb, 0, 0, 2, 0x77]);
    let (local_pod, local_vip) = ("10.245.2.20:6000", "10.96.0.110:80");
    // (in-port, frame, time, snapshot index)
    let steps: Vec<(u16, Vec<u8>, Tick, usize)> = vec![
        (UPLINK, np_syn.clone(), 0, 0),
        (
            CLUSTER,
            from_cluster().tcp_v4(np_backend, snat, TcpFlags::SYN | TcpFlags::ACK, b""),
            1,
            0,
        ),
        (
            UPLINK,
            from_router().tcp_v4(sa(outside), sa(nodeport), TcpFlags::ACK, b""),
            2,
            0,
        ),
        (
            CLUSTER,
            from_cluster().tcp_v4(np_backend, snat, TcpFlags::ACK, b""),
            3,
            0,
        ),
        (CLUSTER, to_vip(TcpFlags::SYN, b""), 4, 0),
        (CLUSTER, from_backend(TcpFlags::SYN | TcpFlags::ACK), 5, 0),
        (CLUSTER, to_vip(TcpFlags::ACK, b""), 6, 0),
        (
            CLUSTER,
            to_vip(TcpFlags::ACK | TcpFlags::PSH, b"request"),
            7,
            0,
        ),
        (CLUSTER, from_backend(TcpFlags::ACK), 8, 0),
        (
            CLUSTER,
            from_cluster()
                .pad(true)
                .tcp_v4(sa(client), sa(vip), TcpFlags::ACK, b""),
            9,
            0,
        ),
        (
            CLUSTER,
            from_cluster()
                .ttl(1)
                .tcp_v4(sa(client), sa(vip), TcpFlags::ACK, b""),
            10,
            0,
        ),
        (CLUSTER, bad_checksum, 11, 0),
        (
            CLUSTER,
            from_cluster().ip_options(&[1, 1, 1, 0]).tcp_v4(
                sa(client),
                sa(vip),
                TcpFlags::ACK,
                b"",
            ),
            12,
            0,
        ),
        (CLUSTER, big, 13, 0),
        (CLUSTER, dns_flow(b"q1"), 14, 0),
        (CLUSTER, dns_flow(b"q2"), 15, 0),
        (CLUSTER, pod_to_vip(TcpFlags::SYN), 16, 0),
        (CLUSTER, pod_to_vip(TcpFlags::ACK), 17, 0),
        (
            CLUSTER,
            from_cluster().tcp_v4(pod_backend, sa(pod), TcpFlags::SYN | TcpFlags::ACK, b""),
            18,
            0,
        ),
        (CLUSTER, pod_to_vip(TcpFlags::ACK), 19, 0),
        (
            CLUSTER,
            from_cluster().tcp_v4(pod_backend, sa(pod), TcpFlags::ACK, b"encap"),
            20,
            0,
        ),
        // node-2's VTEP sends from another MAC: the cached VTEP MAC must not be used.
        (
            CLUSTER,
            from_node2(&FrameBuilder::new(moved_vtep, CLUSTER_MAC).tcp_v4(
                sa(pod),
                sa(vip),
                TcpFlags::ACK,
                b"moved",
            )),
            20,
            0,
        ),
        (
            CLUSTER,
            from_cluster().tcp_v4(pod_backend, sa(pod), TcpFlags::ACK, b""),
            20,
            0,
        ),
        // A pod of node-2 to a Service whose backend is on node-2 too (internalTrafficPolicy
        // Local), then node-2's VTEP sends from another MAC: the reply toward node-2 is
        // encapsulated to the MAC the frame came from, not the one cached before it.
        (
            CLUSTER,
            from_node2(&pod_inner().tcp_v4(sa(local_pod), sa(local_vip), TcpFlags::SYN, b"")),
            20,
            0,
        ),
        (
            CLUSTER,
            from_node2(&FrameBuilder::new(moved_vtep, CLUSTER_MAC).tcp_v4(
                sa(local_pod),
                sa(local_vip),
                TcpFlags::ACK,
                b"moved again",
            )),
            20,
            0,
        ),
        // A new snapshot: the entries are re-validated by the general path first.
        (CLUSTER, to_vip(TcpFlags::ACK, b"after"), 21, 1),
        (CLUSTER, to_vip(TcpFlags::ACK, b"again"), 22, 1),
        (CLUSTER, to_vip(TcpFlags::FIN | TcpFlags::ACK, b""), 25, 1),
        (CLUSTER, from_backend(TcpFlags::FIN | TcpFlags::ACK), 26, 1),
        (CLUSTER, to_vip(TcpFlags::RST, b""), 27, 1),
        // Long after: every entry has expired.
        (CLUSTER, dns_flow(b"late"), 10_000_000, 1),
        (CLUSTER, pod_to_vip(TcpFlags::ACK), 10_000_001, 1),
    ];
    for (i, (port, frame, now, snap)) in steps.iter().enumerate() {
        let snap = &snaps[*snap];
        let f = run(&mut fast, snap, *port, frame, *now, &mut fast_stats);
        let g = run(&mut general, snap, *port, frame, *now, &mut general_stats);
        assert_eq!(f.verdict, g.verdict, "step {i}");
        assert_eq!(f.out, g.out, "step {i}: bytes");
        assert_eq!(
            fast.conntrack().stats(),
            general.conntrack().stats(),
            "step {i}"
        );
    }
    // Frames after a VTEP MAC change (the L2 epoch moved) take the general path.
    assert!(
        fast_stats.fast_path >= 13,
        "the fast path took {} packets",
        fast_stats.fast_path
    );
    assert_eq!(general_stats.fast_path, 0);
    assert_eq!(fast_stats.drops, general_stats.drops);
    assert_eq!(fast_stats.frontend_packets, general_stats.frontend_packets);
    assert_eq!(fast_stats.backend_packets, general_stats.backend_packets);
    let entries = |p: &Pipeline| {
        p.conntrack()
            .iter()
            .map(|(_, e)| format!("{e:?}"))
            .collect::<Vec<_>>()
    };
    assert_eq!(entries(&fast), entries(&general));
}

/// ClientIP affinity holds when a client's connections land on different workers (the
/// owner of a connection hashes its source port too): a client's first connection picks
/// by its address alone, so every worker remembers the same backend.
#[test]
fn affinity_holds_across_workers() {
    let snap = svc_snapshot();
    let mut workers = [
        Pipeline::new(config(0, 2)).unwrap(),
        Pipeline::new(config(1, 2)).unwrap(),
    ];
    let mut stats = WorkerStats::default();
    let mut owners = std::collections::HashSet::new();
    let mut backends = std::collections::HashSet::new();
    for port in 2000..2040u16 {
        let c = format!("10.244.9.9:{port}");
        let syn = from_cluster().tcp_v4(sa(&c), sa("10.96.0.90:80"), TcpFlags::SYN, b"");
        let owner = workers[0].owner(&VecFrame::new(&syn), CLUSTER, &snap);
        let r = run(&mut workers[owner], &snap, CLUSTER, &syn, 0, &mut stats);
        owners.insert(owner);
        backends.insert(sock(&parse(&r.out)).1);
    }
    assert_eq!(owners.len(), 2, "the connections spread over both workers");
    assert_eq!(
        backends.len(),
        1,
        "one backend for the client: {backends:?}"
    );
}

/// Affinity belongs to the Service port: its ClusterIP and NodePort share it, and it
/// survives a snapshot that renumbers the frontends.
#[test]
fn affinity_is_per_service_port_and_outlives_frontend_ids() {
    let sticky = |set: &Arc<BackendSet>, kind, addr, port| {
        let mut f = fe(kind, addr, Protocol::Tcp, port, set);
        f.affinity = Some(60);
        f.masquerade = false;
        f.service = Some("sticky");
        f
    };
    let frontends = |generation, set: &Arc<BackendSet>, extra: bool| {
        let mut fes = vec![
            sticky(set, FrontendKind::ClusterIp, "10.96.0.90", 80),
            sticky(set, FrontendKind::NodePort, "0.0.0.0", 30090),
        ];
        if extra {
            // Sorts first: every id of the sticky Service moves.
            fes.insert(
                0,
                fe(FrontendKind::ClusterIp, CIP, Protocol::Tcp, 80, &web()),
            );
        }
        snapshot(generation, fes)
    };
    let full = web();
    let mut p = pipeline();
    let mut stats = WorkerStats::default();
    let syn = |port: u16, dst: &str| {
        let c = format!("10.244.9.9:{port}");
        from_cluster().tcp_v4(sa(&c), sa(dst), TcpFlags::SYN, b"")
    };
    let snap1 = frontends(1, &full, false);
    let first = sock(&parse(
        &run(
            &mut p,
            &snap1,
            CLUSTER,
            &syn(1000, "10.96.0.90:80"),
            0,
            &mut stats,
        )
        .out,
    ))
    .1;
    // The first backend leaves: the client is pinned to another.
    let rest: Vec<(String, u16)> = full
        .backends
        .iter()
        .filter(|b| SocketAddrV4::new(b.addr, b.port) != first)
        .map(|b| (b.addr.to_string(), b.port))
        .collect();
    let without_first = set_of(
        &rest
            .iter()
            .map(|(a, port)| (a.as_str(), *port, EndpointState::Ready, None))
            .collect::<Vec<_>>(),
    );
    let snap2 = frontends(2, &without_first, false);
    let second = sock(&parse(
        &run(
            &mut p,
            &snap2,
            CLUSTER,
            &syn(1001, "10.96.0.90:80"),
            10,
            &mut stats,
        )
        .out,
    ))
    .1;
    assert_ne!(second, first);
    // The first backend is back, the ids moved, and the client comes in by the NodePort:
    // the affinity of the Service port still decides, where a fresh pick would be `first`.
    let snap3 = frontends(3, &full, true);
    assert_ne!(
        snap3.node_ports[&(Protocol::Tcp, 30090)].id,
        snap2.node_ports[&(Protocol::Tcp, 30090)].id
    );
    let r = run(
        &mut p,
        &snap3,
        CLUSTER,
        &syn(1002, "192.0.2.1:30090"),
        20,
        &mut stats,
    );
    assert_eq!(r.verdict, Verdict::Transmit { port: CLUSTER });
    assert_eq!(
        sock(&parse(&r.out)).1,
        second,
        "the Service port's affinity"
    );
    let mut fresh = pipeline();
    let r = run(
        &mut fresh,
        &snap3,
        CLUSTER,
        &syn(1002, "192.0.2.1:30090"),
        20,
        &mut stats,
    );
    assert_eq!(
        sock(&parse(&r.out)).1,
        first,
        "without it, the client's pick"
    );
}

/// kube-semantics item 12: a TCP flow keeps its backend while the backend is listed in any
/// condition (a readiness flap breaks nothing); a UDP flow only while it is ready or serving
/// and terminating: one that is neither makes UDP pick again.
#[test]
fn readiness_flap_keeps_tcp_flows_udp_picks_again() {
    let (web0, dns0) = (web(), dns());
    let snap1 = services(1, &web0, &dns0);
    let mut p = pipeline();
    let mut stats = WorkerStats::default();
    let (uc, uvip) = ("10.244.9.9:5353", "10.96.0.53:53");
    let (tc, tvip) = ("10.244.9.9:41000", "10.96.0.10:80");
    let q = from_cluster().udp_v4(sa(uc), sa(uvip), b"q");
    let ub = sock(&parse(&run(&mut p, &snap1, CLUSTER, &q, 0, &mut stats).out)).1;
    let syn = from_cluster().tcp_v4(sa(tc), sa(tvip), TcpFlags::SYN, b"");
    let tb = sock(&parse(
        &run(&mut p, &snap1, CLUSTER, &syn, 0, &mut stats).out,
    ))
    .1;
    let snap2 = services(
        2,
        &with_state(&web0, tb, EndpointState::NotServing),
        &with_state(&dns0, ub, EndpointState::NotServing),
    );
    let r = run(&mut p, &snap2, CLUSTER, &q, 10, &mut stats);
    assert_eq!(r.verdict, Verdict::Transmit { port: CLUSTER });
    assert_ne!(sock(&parse(&r.out)).1, ub, "UDP picks a serving backend");
    let ack = from_cluster().tcp_v4(sa(tc), sa(tvip), TcpFlags::ACK, b"data");
    let r = run(&mut p, &snap2, CLUSTER, &ack, 10, &mut stats);
    assert_eq!(r.verdict, Verdict::Transmit { port: CLUSTER });
    assert_eq!(
        sock(&parse(&r.out)).1,
        tb,
        "TCP keeps its not-ready backend"
    );
    // Ready again 0.3 s later: the same backend still.
    let snap3 = services(3, &web0, &dns0);
    let r = run(&mut p, &snap3, CLUSTER, &ack, 310, &mut stats);
    assert_eq!(sock(&parse(&r.out)).1, tb);
    // Not ready, not serving, terminating: still listed, still kept.
    let snap4 = services(4, &with_state(&web0, tb, EndpointState::NotServing), &dns0);
    let r = run(&mut p, &snap4, CLUSTER, &ack, 320, &mut stats);
    assert_eq!(sock(&parse(&r.out)).1, tb);
    assert_drop(&stats, DropReason::BackendGone, 0);
}

/// A SYN on the tuple of a connection that ended opens a new connection, which never goes
/// to an endpoint that is not usable (kube-semantics item 11): the closed entry's backend
/// is kept only while new connections could pick it.
#[test]
fn port_reuse_after_close_avoids_an_unusable_backend() {
    let WebFlow {
        web: web0,
        snap1,
        mut p,
        mut stats,
        client,
        vip,
        backend,
    } = web_flow_opened();
    let rst = from_cluster().tcp_v4(backend, sa(client), TcpFlags::RST, b"");
    run(&mut p, &snap1, CLUSTER, &rst, 1, &mut stats);
    let key = FlowKey::new(ipv4::PROTO_TCP, ip("10.244.9.9"), 41000, ip(CIP), 80);
    let (id, _) = p.conntrack().peek(&key, 1).expect("closed, still tracked");
    assert!(p.conntrack().entry(id).is_closed());
    // Reused while the backend is still usable: the same translation.
    let syn = from_cluster().tcp_v4(sa(client), sa(vip), TcpFlags::SYN, b"");
    assert_eq!(
        sock(&parse(
            &run(&mut p, &snap1, CLUSTER, &syn, 2, &mut stats).out
        ))
        .1,
        backend
    );
    run(&mut p, &snap1, CLUSTER, &rst, 3, &mut stats);
    // The backend terminates (serving, so its live flows would stay): a reuse of the closed
    // tuple goes elsewhere.
    let set2 = with_state(&web0, backend, EndpointState::ServingTerminating);
    let snap2 = services(2, &set2, &dns());
    let r = run(&mut p, &snap2, CLUSTER, &syn, 4, &mut stats);
    assert_eq!(r.verdict, Verdict::Transmit { port: CLUSTER });
    assert_ne!(
        sock(&parse(&r.out)).1,
        backend,
        "a new connection, a usable backend"
    );
}

/// internalTrafficPolicy: Local with no endpoint on the sender's node drops; a Service
/// with no usable endpoint at all is rejected as under Cluster (kube-proxy checks that
/// first).
#[test]
fn internal_traffic_policy_local_without_a_local_endpoint() {
    let itp = |set: &Arc<BackendSet>, node3: &Arc<BackendSet>| {
        let mut f = fe(
            FrontendKind::ClusterIp,
            "10.96.0.110",
            Protocol::Tcp,
            80,
            set,
        );
        f.internal = InternalPolicy::Local {
            by_node: [(Arc::from("node-3"), node3.clone())].into_iter().collect(),
        };
        snapshot(1, vec![f])
    };
    let mut p = pipeline();
    let mut stats = WorkerStats::default();
    let inner = pod_inner().tcp_v4(
        sa("10.245.3.7:6000"),
        sa("10.96.0.110:80"),
        TcpFlags::SYN,
        b"",
    );
    let elsewhere = set_of(&[("10.245.2.9", 8080, EndpointState::Ready, Some("node-2"))]);
    let r = run(
        &mut p,
        &itp(&elsewhere, &set_of(&[])),
        CLUSTER,
        &from_node3(&inner),
        0,
        &mut stats,
    );
    assert_eq!(r.verdict, Verdict::Drop(DropReason::NoLocalEndpoint));
    let r = run(
        &mut p,
        &itp(&set_of(&[]), &set_of(&[])),
        CLUSTER,
        &from_node3(&inner),
        0,
        &mut stats,
    );
    assert!(
        matches!(
            r.verdict,
            Verdict::Transmit { .. } | Verdict::HoldForNeighbor { .. }
        ),
        "{:?}",
        r.verdict
    );
    assert_drop(&stats, DropReason::NoEndpoints, 1);
}

/// Issue 24 item 3: a pod reaching a NodePort, LB IP or externalIP of an
/// externalTrafficPolicy: Local Service is treated as Cluster policy and masqueraded, as
/// kube-proxy does (the backend would answer the pod directly otherwise); whether it came
/// over VXLAN or from a pod CIDR source. An external client keeps its address.
#[test]
fn pods_reaching_local_policy_frontends_are_masqueraded() {
    let snap = svc_snapshot();
    let eip = format!("{EIP}:80");
    let translated = |p: &mut Pipeline, port: u16, frame: &[u8], stats: &mut WorkerStats| {
        let r = run(p, &snap, port, frame, 0, stats);
        assert_eq!(r.verdict, Verdict::Transmit { port: CLUSTER });
        sock(&parse(&r.out))
    };
    let mut p = pipeline();
    let mut stats = WorkerStats::default();
    // An external client: the client address is kept (eTP Local).
    let outside = from_router().tcp_v4(sa("203.0.113.5:40000"), sa(&eip), TcpFlags::SYN, b"");
    let (src, _) = translated(&mut p, UPLINK, &outside, &mut stats);
    assert_eq!(src, sa("203.0.113.5:40000"));
    // A pod on node-2, over VXLAN.
    let inner = pod_inner().tcp_v4(sa("10.245.2.7:6000"), sa(&eip), TcpFlags::SYN, b"");
    let (src, _) = translated(&mut p, CLUSTER, &from_node2(&inner), &mut stats);
    assert_eq!(
        *src.ip(),
        ip("10.0.0.1"),
        "SNAT to the cluster-side address"
    );
    // A pod of a pod CIDR, routed to the gateway without VXLAN.
    let routed = from_cluster().tcp_v4(sa("10.245.3.7:6000"), sa(&eip), TcpFlags::SYN, b"");
    let (src, _) = translated(&mut p, CLUSTER, &routed, &mut stats);
    assert_eq!(*src.ip(), ip("10.0.0.1"));
    // Over VXLAN from a source outside every pod CIDR (a node's host network): still
    // cluster traffic.
    let host = pod_inner().tcp_v4(sa("10.0.0.2:6001"), sa(&eip), TcpFlags::SYN, b"");
    let (src, _) = translated(&mut p, CLUSTER, &from_node2(&host), &mut stats);
    assert_eq!(*src.ip(), ip("10.0.0.1"));
    // A ClusterIP without masquerade stays unmasqueraded (the operator's choice).
    let mut unmasked = fe(FrontendKind::ClusterIp, CIP, Protocol::Tcp, 80, &web());
    unmasked.masquerade = false;
    let snap2 = snapshot(2, vec![unmasked]);
    let r = run(
        &mut p,
        &snap2,
        CLUSTER,
        &from_cluster().tcp_v4(
            sa("10.245.3.7:6002"),
            sa("10.96.0.10:80"),
            TcpFlags::SYN,
            b"",
        ),
        0,
        &mut stats,
    );
    assert_eq!(sock(&parse(&r.out)).0, sa("10.245.3.7:6002"));
}
