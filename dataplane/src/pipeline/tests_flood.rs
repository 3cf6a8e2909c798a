//! Issue 23 items 2 and 3 at the pipeline: a spoofed SYN flood against a masqueraded
//! NodePort (the backends answer every SYN, so its entries sit in SYN_RECV holding SNAT
//! ports, as in the report), with a legitimate client opening connections and
//! established flows exchanging data throughout; and tables that fill up.

use std::net::{Ipv4Addr, SocketAddrV4};

use super::tests::*;
use super::*;
use crate::conntrack::{ConntrackConfig, SECOND};
use crate::maglev::fmix64;
use crate::stats::{DropReason, WorkerStats};
use crate::wire::TcpFlags;

const NODE_PORT: &str = "192.0.2.1:30080";

/// A spoofed source: random addresses of 11.0.0.0/8 (no martian, nothing cluster-side).
fn spoofed(i: u64) -> SocketAddrV4 {
    let h = fmix64(i ^ 0x0066_6c6f_6f64);
    SocketAddrV4::new(
        Ipv4Addr::from(0x0b00_0000 | (h as u32 & 0x00ff_ffff)),
        1024 + (h >> 40) as u16 % 60000,
    )
}

fn legit(i: u64) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::new(203, 0, 113, 1 + (i / 50_000) as u8),
        1024 + (i % 50_000) as u16,
    )
}

fn transmitted(v: Verdict) -> bool {
    matches!(v, Verdict::Transmit { .. })
}

/// Drives one connection's three-way handshake from the uplink client `client`: SYN, the
/// backend's SYN-ACK, the client's ACK. `Some((backend, snat))` when every step passed.
fn handshake(
    p: &mut Pipeline,
    snap: &Snapshot,
    client: SocketAddrV4,
    now: Tick,
    stats: &mut WorkerStats,
) -> Option<(SocketAddrV4, SocketAddrV4)> {
    let syn = from_router().tcp_v4(client, sa(NODE_PORT), TcpFlags::SYN, b"");
    let r = run(p, snap, UPLINK, &syn, now, stats);
    if !transmitted(r.verdict) {
        return None;
    }
    let o = parse(&r.out);
    let (snat, backend) = (
        SocketAddrV4::new(o.src, o.sport),
        SocketAddrV4::new(o.dst, o.dport),
    );
    let synack = from_cluster().tcp_v4(backend, snat, TcpFlags::SYN | TcpFlags::ACK, b"");
    if !transmitted(run(p, snap, CLUSTER, &synack, now, stats).verdict) {
        return None;
    }
    let ack = from_router().tcp_v4(client, sa(NODE_PORT), TcpFlags::ACK, b"");
    transmitted(run(p, snap, UPLINK, &ack, now, stats).verdict).then_some((backend, snat))
}

/// The flood of the issue, at a rate no real host sends: 120,000 spoofed SYNs at 1.2 M/s
/// (0.1 s), each answered by its backend, so that the 3 × 28,232 SNAT ports of the
/// NodePort's backends are all held by half-open flows after 70 % of it. A client opens
/// a connection every 1,000 SYNs, 100 established flows send data both ways every 500, and
/// after the flood the client keeps connecting for 10 simulated seconds.
#[test]
fn a_spoofed_syn_flood_leaves_new_and_established_connections_served() {
    const FLOOD: u64 = 120_000;
    const PER_MS: u64 = 1_200;
    let snap = svc_snapshot();
    let mut p = Pipeline::new(PipelineConfig {
        conntrack: ConntrackConfig {
            capacity: 1 << 17,
            ..ConntrackConfig::default()
        },
        ..config(0, 1)
    })
    .unwrap();
    let mut stats = WorkerStats::default();

    let mut established = Vec::new();
    for i in 0..100 {
        let client = legit(1_000_000 + i);
        let (backend, snat) = handshake(&mut p, &snap, client, 0, &mut stats).expect("before");
        established.push((client, backend, snat));
    }
    let (mut opened, mut tried, mut sent, mut delivered) = (0u64, 0u64, 0u64, 0u64);
    let mut next_legit = 0;
    for i in 0..FLOOD {
        let now = 10 + i / PER_MS;
        let client = spoofed(i);
        let syn = from_router().tcp_v4(client, sa(NODE_PORT), TcpFlags::SYN, b"");
        let r = run(&mut p, &snap, UPLINK, &syn, now, &mut stats);
        if transmitted(r.verdict) {
            // The backend answers; the spoofed client never does.
            let o = parse(&r.out);
            let synack = from_cluster().tcp_v4(
                SocketAddrV4::new(o.dst, o.dport),
                SocketAddrV4::new(o.src, o.sport),
                TcpFlags::SYN | TcpFlags::ACK,
                b"",
            );
            run(&mut p, &snap, CLUSTER, &synack, now, &mut stats);
        }
        if i % 1_000 == 0 {
            tried += 1;
            opened +=
                u64::from(handshake(&mut p, &snap, legit(next_legit), now, &mut stats).is_some());
            next_legit += 1;
        }
        if i % 500 == 0 {
            let (client, backend, snat) = established[(i / 500) as usize % established.len()];
            let data = from_router().tcp_v4(client, sa(NODE_PORT), TcpFlags::ACK, b"request");
            let answer = from_cluster().tcp_v4(backend, snat, TcpFlags::ACK, b"response");
            sent += 2;
            delivered += u64::from(transmitted(
                run(&mut p, &snap, UPLINK, &data, now, &mut stats).verdict,
            ));
            delivered += u64::from(transmitted(
                run(&mut p, &snap, CLUSTER, &answer, now, &mut stats).verdict,
            ));
        }
    }
    let during = opened as f64 / tried as f64;
    let delivery = delivered as f64 / sent as f64;
    let ct = p.conntrack().stats();
    println!(
        "during the flood: {opened}/{tried} new connections ({:.2} %), {delivered}/{sent} established packets ({:.2} %); conntrack {} entries, {} evictions, {} snat_exhausted, {} ct_full",
        during * 100.0,
        delivery * 100.0,
        ct.entries,
        ct.evictions,
        stats.drops_of(DropReason::SnatExhausted),
        stats.drops_of(DropReason::CtFull)
    );
    assert!(during >= 0.99, "new connections during the flood: {during}");
    assert!(
        delivery >= 0.99,
        "established delivery during the flood: {delivery}"
    );
    assert!(ct.evictions > 0, "the flood's half-open flows gave way");

    // After the flood: 10 s of new connections, one every 10 ms.
    let end = 10 + FLOOD / PER_MS;
    let (mut after_opened, mut after_tried) = (0u64, 0u64);
    for k in 0..1_000 {
        after_tried += 1;
        let client = legit(next_legit);
        next_legit += 1;
        after_opened +=
            u64::from(handshake(&mut p, &snap, client, end + k * 10, &mut stats).is_some());
    }
    let after = after_opened as f64 / after_tried as f64;
    println!("after the flood: {after_opened}/{after_tried} new connections");
    assert!(after >= 0.99, "new connections after the flood: {after}");

    // No established entry was evicted: the 100 flows still answer, both ways.
    let now = end + 10 * SECOND;
    for &(client, backend, snat) in &established {
        let data = from_router().tcp_v4(client, sa(NODE_PORT), TcpFlags::ACK, b"late");
        assert!(transmitted(
            run(&mut p, &snap, UPLINK, &data, now, &mut stats).verdict
        ));
        let answer = from_cluster().tcp_v4(backend, snat, TcpFlags::ACK, b"late");
        assert_eq!(
            run(&mut p, &snap, CLUSTER, &answer, now, &mut stats).verdict,
            Verdict::Transmit { port: UPLINK },
            "an established flow lost its entry"
        );
    }
}

/// One source may hold `conntrack.half_open_per_source` half-open flows; completing one
/// makes room for the next. Other sources are not affected.
#[test]
fn half_open_flows_per_source_are_bounded() {
    let snap = svc_snapshot();
    let mut p = Pipeline::new(PipelineConfig {
        conntrack: ConntrackConfig {
            capacity: 1 << 12,
            half_open_per_source: 16,
            ..ConntrackConfig::default()
        },
        ..config(0, 1)
    })
    .unwrap();
    let mut stats = WorkerStats::default();
    let src = Ipv4Addr::new(203, 0, 113, 77);
    // Unreplied UDP (a client's outstanding DNS queries) is no half-open connection: it
    // neither counts nor is refused.
    for port in 0..40 {
        let query = from_router().udp_v4(
            SocketAddrV4::new(src, 5000 + port),
            sa("10.96.0.53:53"),
            b"q",
        );
        assert!(transmitted(
            run(&mut p, &snap, UPLINK, &query, 0, &mut stats).verdict
        ));
    }
    assert_eq!(p.conntrack().half_open_of(src), 0);
    for port in 0..16 {
        let syn = from_router().tcp_v4(
            SocketAddrV4::new(src, 2000 + port),
            sa(NODE_PORT),
            TcpFlags::SYN,
            b"",
        );
        assert!(transmitted(
            run(&mut p, &snap, UPLINK, &syn, 0, &mut stats).verdict
        ));
    }
    let one_more = from_router().tcp_v4(
        SocketAddrV4::new(src, 3000),
        sa(NODE_PORT),
        TcpFlags::SYN,
        b"",
    );
    let r = run(&mut p, &snap, UPLINK, &one_more, 0, &mut stats);
    assert_eq!(r.verdict, Verdict::Drop(DropReason::HalfOpenLimit));
    assert_eq!(p.conntrack().half_open_of(src), 16);
    // Another source is served.
    assert!(handshake(&mut p, &snap, sa("203.0.113.78:2000"), 0, &mut stats).is_some());
    // One of the 16 completes: room for one more.
    let client = SocketAddrV4::new(src, 2000);
    let key = FlowKey::new(ipv4::PROTO_TCP, src, 2000, ip("192.0.2.1"), 30080);
    let (id, _) = p.conntrack().peek(&key, 0).unwrap();
    let reply = *p.conntrack().entry(id).reply();
    let synack = from_cluster().tcp_v4(
        SocketAddrV4::new(reply.src, reply.src_port),
        SocketAddrV4::new(reply.dst, reply.dst_port),
        TcpFlags::SYN | TcpFlags::ACK,
        b"",
    );
    assert!(transmitted(
        run(&mut p, &snap, CLUSTER, &synack, 1, &mut stats).verdict
    ));
    let ack = from_router().tcp_v4(client, sa(NODE_PORT), TcpFlags::ACK, b"");
    assert!(transmitted(
        run(&mut p, &snap, UPLINK, &ack, 1, &mut stats).verdict
    ));
    assert_eq!(p.conntrack().half_open_of(src), 15);
    assert!(transmitted(
        run(&mut p, &snap, UPLINK, &one_more, 2, &mut stats).verdict
    ));
}

/// A single-backend NodePort (masqueraded), so that SNAT ports per backend are few.
fn one_backend() -> Snapshot {
    snapshot(
        1,
        vec![fe(
            FrontendKind::NodePort,
            "0.0.0.0",
            Protocol::Tcp,
            30080,
            &set_of(&[ready("10.244.1.5", 8080)]),
        )],
    )
}

/// Sends one request and its response through an established masqueraded flow and checks
/// both translations: to the backend from `snat`, back to `client` from the NodePort.
fn exchange(
    p: &mut Pipeline,
    snap: &Snapshot,
    (client, backend, snat): (SocketAddrV4, SocketAddrV4, SocketAddrV4),
    now: Tick,
    stats: &mut WorkerStats,
) {
    let data = from_router().tcp_v4(client, sa(NODE_PORT), TcpFlags::ACK, b"q");
    let r = run(p, snap, UPLINK, &data, now, stats);
    assert_eq!(r.verdict, Verdict::Transmit { port: CLUSTER });
    let o = parse(&r.out);
    assert_eq!(
        (
            SocketAddrV4::new(o.src, o.sport),
            SocketAddrV4::new(o.dst, o.dport)
        ),
        (snat, backend),
        "request of {client}"
    );
    let answer = from_cluster().tcp_v4(backend, snat, TcpFlags::ACK, b"a");
    let r = run(p, snap, CLUSTER, &answer, now, stats);
    assert_eq!(r.verdict, Verdict::Transmit { port: UPLINK });
    let o = parse(&r.out);
    assert_eq!(
        (
            SocketAddrV4::new(o.src, o.sport),
            SocketAddrV4::new(o.dst, o.dport)
        ),
        (sa(NODE_PORT), client),
        "response to {client}"
    );
}

/// Ends a flow with an RST from the client (its entry then times out in CLOSE's 10 s).
fn reset(
    p: &mut Pipeline,
    snap: &Snapshot,
    client: SocketAddrV4,
    now: Tick,
    stats: &mut WorkerStats,
) {
    let rst = from_router().tcp_v4(client, sa(NODE_PORT), TcpFlags::RST, b"");
    assert!(transmitted(run(p, snap, UPLINK, &rst, now, stats).verdict));
}

/// Conntrack full of established flows: new flows are dropped as `ct_full` (nothing
/// established is evicted), the established ones keep their translations, and new flows
/// are served again once some have ended and timed out.
#[test]
fn a_full_table_refuses_new_flows_keeps_the_established_and_recovers() {
    let snap = one_backend();
    let mut p = Pipeline::new(PipelineConfig {
        conntrack: ConntrackConfig {
            capacity: 64,
            ..ConntrackConfig::default()
        },
        ..config(0, 1)
    })
    .unwrap();
    let mut stats = WorkerStats::default();
    let flows: Vec<_> = (0..64)
        .map(|i| {
            let client = legit(i);
            let (backend, snat) = handshake(&mut p, &snap, client, 0, &mut stats).expect("open");
            (client, backend, snat)
        })
        .collect();
    assert_eq!(p.conntrack().len(), 64);
    for i in 0..100 {
        let syn = from_router().tcp_v4(legit(1000 + i), sa(NODE_PORT), TcpFlags::SYN, b"");
        assert_eq!(
            run(&mut p, &snap, UPLINK, &syn, 1, &mut stats).verdict,
            Verdict::Drop(DropReason::CtFull)
        );
    }
    assert_eq!(stats.drops_of(DropReason::CtFull), 100);
    assert_eq!(p.conntrack().stats().evictions, 0);
    for &flow in &flows {
        exchange(&mut p, &snap, flow, 2, &mut stats);
    }
    // The load ends: 8 flows close; after CLOSE's 10 s their slots serve new flows.
    for &(client, ..) in &flows[..8] {
        reset(&mut p, &snap, client, 3, &mut stats);
    }
    let later = 3 + 11 * SECOND;
    for i in 0..8 {
        assert!(
            handshake(&mut p, &snap, legit(2000 + i), later, &mut stats).is_some(),
            "recovered"
        );
    }
    for &flow in &flows[8..] {
        exchange(&mut p, &snap, flow, later, &mut stats);
    }
}

/// A SNAT range of 4 ports per backend: established flows hold them all, so new flows are
/// dropped as `snat_exhausted` and no two flows ever share a port; half-open flows give
/// theirs way; a port freed by a flow that ended serves a new flow.
#[test]
fn exhausted_snat_ports_drop_new_flows_without_wrong_translations_and_recover() {
    let snap = one_backend();
    let mut p = Pipeline::new(PipelineConfig {
        snat_port_range: 40000..=40003,
        ..config(0, 1)
    })
    .unwrap();
    let mut stats = WorkerStats::default();
    let flows: Vec<_> = (0..4)
        .map(|i| {
            let client = legit(i);
            let (backend, snat) = handshake(&mut p, &snap, client, 0, &mut stats).expect("open");
            (client, backend, snat)
        })
        .collect();
    let ports: std::collections::HashSet<u16> = flows.iter().map(|f| f.2.port()).collect();
    assert_eq!(ports.len(), 4, "each flow its own port: {flows:?}");
    for i in 0..50 {
        assert!(handshake(&mut p, &snap, legit(100 + i), 1, &mut stats).is_none());
    }
    assert_eq!(stats.drops_of(DropReason::SnatExhausted), 50);
    for &flow in &flows {
        exchange(&mut p, &snap, flow, 2, &mut stats);
    }
    // One flow ends; once its entry has timed out its port serves a new client.
    reset(&mut p, &snap, flows[0].0, 3, &mut stats);
    let later = 3 + 11 * SECOND;
    let (_, snat) = handshake(&mut p, &snap, legit(500), later, &mut stats).expect("recovered");
    assert_eq!(snat, flows[0].2, "the freed port");
    for &flow in &flows[1..] {
        exchange(&mut p, &snap, flow, later, &mut stats);
    }
    // Half-open flows hold ports only until a new flow needs one.
    let mut q = Pipeline::new(PipelineConfig {
        snat_port_range: 40000..=40003,
        ..config(0, 1)
    })
    .unwrap();
    for i in 0..4 {
        let syn = from_router().tcp_v4(spoofed(i), sa(NODE_PORT), TcpFlags::SYN, b"");
        assert!(transmitted(
            run(&mut q, &snap, UPLINK, &syn, 0, &mut stats).verdict
        ));
    }
    assert!(handshake(&mut q, &snap, legit(900), 1, &mut stats).is_some());
    assert_eq!(q.conntrack().stats().evictions, 1);
}

/// A ClientIP affinity table of one 4-way bucket: a fifth client replaces the entry closest
/// to expiry (counted, never a wrong backend: every connection goes to a usable backend,
/// and a client that kept its entry keeps its backend); once the load ends, clients are
/// pinned again.
#[test]
fn a_full_affinity_table_forgets_early_but_never_misroutes() {
    let set = web();
    let mut sticky = fe(
        FrontendKind::ClusterIp,
        "10.96.0.90",
        Protocol::Tcp,
        80,
        &set,
    );
    sticky.affinity = Some(60);
    let snap = snapshot(1, vec![sticky]);
    let mut p = Pipeline::new(PipelineConfig {
        affinity_capacity: 4,
        ..config(0, 1)
    })
    .unwrap();
    let mut stats = WorkerStats::default();
    let backends: Vec<SocketAddrV4> = set
        .backends
        .iter()
        .map(|b| SocketAddrV4::new(b.addr, b.port))
        .collect();
    let connect =
        |p: &mut Pipeline, client: &str, port: u16, now: Tick, stats: &mut WorkerStats| {
            let syn = from_cluster().tcp_v4(
                SocketAddrV4::new(ip(client), port),
                sa("10.96.0.90:80"),
                TcpFlags::SYN,
                b"",
            );
            let r = run(p, &snap, CLUSTER, &syn, now, stats);
            assert_eq!(r.verdict, Verdict::Transmit { port: CLUSTER });
            let o = parse(&r.out);
            SocketAddrV4::new(o.dst, o.dport)
        };
    let clients: Vec<String> = (1..=32).map(|i| format!("10.244.9.{i}")).collect();
    let mut first = Vec::new();
    for (i, c) in clients.iter().enumerate() {
        let b = connect(&mut p, c, 1000, i as Tick, &mut stats);
        assert!(backends.contains(&b));
        first.push(b);
    }
    assert!(p.affinity_evictions() > 0, "the table overflowed");
    // Every connection still goes to a usable backend; the clients whose entries
    // survived keep their backend.
    let mut kept = 0;
    for (i, c) in clients.iter().enumerate() {
        let b = connect(&mut p, c, 2000, 100, &mut stats);
        assert!(backends.contains(&b));
        kept += usize::from(b == first[i]);
    }
    assert!(kept >= 4, "kept {kept}");
    // The load ends: four clients, within the table's room, are pinned again.
    let later = 200 * SECOND;
    for c in &clients[..4] {
        let b = connect(&mut p, c, 3000, later, &mut stats);
        for port in 3001..3010 {
            assert_eq!(
                connect(&mut p, c, port, later + 1, &mut stats),
                b,
                "{c} pinned"
            );
        }
    }
    assert_eq!(stats.total_drops(), 0);
}
