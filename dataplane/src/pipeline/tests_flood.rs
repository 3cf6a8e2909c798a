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
