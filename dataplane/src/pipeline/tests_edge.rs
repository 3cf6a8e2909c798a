//! The edge policy (`pipeline::edge`), Katran style: frames in, verdict and counter out,
//! for each class of source and of destination a packet from an uplink may have, and for
//! tracked flows on both the fast path and the general path.

use super::tests::*;
use super::*;
use crate::frame::VecFrame;
use crate::stats::{DropReason, WorkerStats};
use crate::wire::{Ipv4Packet, TcpFlags};

const NODE_PORT: &str = "192.0.2.1:30080";
const CLIENT: &str = "203.0.113.5:40000";

fn syn(src: &str, dst: &str) -> Vec<u8> {
    from_router().tcp_v4(sa(src), sa(dst), TcpFlags::SYN, b"")
}

#[test]
fn martian_and_spoofed_sources_from_an_uplink_are_dropped() {
    let snap = svc_snapshot();
    // Each source sends a SYN to the NodePort, which a valid source opens.
    let cases: &[(&str, &str, Option<DropReason>)] = &[
        ("internet client", "203.0.113.5", None),
        ("a neighbour on the uplink subnet", "192.0.2.7", None),
        ("loopback", "127.0.0.1", Some(DropReason::MartianSource)),
        ("this network", "0.0.0.0", Some(DropReason::MartianSource)),
        ("multicast", "224.0.0.5", Some(DropReason::MartianSource)),
        ("class E", "240.0.0.1", Some(DropReason::MartianSource)),
        (
            "limited broadcast",
            "255.255.255.255",
            Some(DropReason::MartianSource),
        ),
        (
            "directed broadcast of the uplink subnet",
            "192.0.2.255",
            Some(DropReason::MartianSource),
        ),
        (
            "the gateway's uplink address",
            "192.0.2.1",
            Some(DropReason::SpoofedSource),
        ),
        (
            "the gateway's cluster address (VTEP, SNAT)",
            "10.0.0.1",
            Some(DropReason::SpoofedSource),
        ),
        (
            "a pod of a VXLAN pod CIDR",
            "10.245.2.50",
            Some(DropReason::SpoofedSource),
        ),
        (
            "a pod behind the cluster route 10.244.0.0/16",
            "10.244.1.50",
            Some(DropReason::SpoofedSource),
        ),
        (
            "the service CIDR",
            "10.96.0.10",
            Some(DropReason::SpoofedSource),
        ),
        (
            "a node on the cluster subnet",
            "10.0.0.7",
            Some(DropReason::SpoofedSource),
        ),
    ];
    for &(desc, src, expected) in cases {
        let mut p = pipeline();
        let mut stats = WorkerStats::default();
        let r = run(
            &mut p,
            &snap,
            UPLINK,
            &syn(&format!("{src}:40000"), NODE_PORT),
            0,
            &mut stats,
        );
        match expected {
            None => {
                assert_eq!(r.verdict, Verdict::Transmit { port: CLUSTER }, "{desc}");
                assert_eq!(p.conntrack().len(), 1, "{desc}: tracked");
            }
            Some(reason) => {
                assert_eq!(r.verdict, Verdict::Drop(reason), "{desc}");
                assert_eq!(stats.drops_of(reason), 1, "{desc}: counted");
                assert_eq!(p.conntrack().len(), 0, "{desc}: nothing tracked");
            }
        }
    }
    // The same sources are the cluster's own on the cluster port: a pod reaches its
    // ClusterIP.
    let mut p = pipeline();
    let mut stats = WorkerStats::default();
    let pod = from_cluster().tcp_v4(
        sa("10.244.1.50:40000"),
        sa(&format!("{CIP}:80")),
        TcpFlags::SYN,
        b"",
    );
    let r = run(&mut p, &snap, CLUSTER, &pod, 0, &mut stats);
    assert_eq!(r.verdict, Verdict::Transmit { port: CLUSTER });
}

#[test]
fn uplinks_reach_services_tracked_flows_and_the_gateway_only() {
    let snap = svc_snapshot();
    let mut fragment = from_router().udp_v4(sa(CLIENT), sa("10.244.1.5:53"), b"frag");
    {
        let mut ipp = Ipv4Packet::new_unchecked(&mut fragment[14..]);
        ipp.set_more_frags(true);
        ipp.fill_checksum();
    }
    // A node's VXLAN to the gateway's VTEP, but arriving on the uplink: not decapsulated,
    // it is traffic for one of the gateway's addresses.
    let vxlan_on_uplink = from_router().vxlan_encap(
        ip("203.0.113.5"),
        ip("10.0.0.1"),
        51000,
        VNI,
        &pod_inner().tcp_v4(
            sa("10.245.2.9:1000"),
            sa("10.244.1.5:9376"),
            TcpFlags::SYN,
            b"",
        ),
    );
    let cases: Vec<(&str, Vec<u8>, Verdict)> = vec![
        (
            "SYN straight to a pod (the route 10.244.0.0/16 via the uplink)",
            syn(CLIENT, "10.244.1.5:9376"),
            Verdict::Drop(DropReason::UplinkNotAllowed),
        ),
        (
            "UDP to a pod of a VXLAN pod CIDR",
            from_router().udp_v4(sa(CLIENT), sa("10.245.2.9:53"), b"q"),
            Verdict::Drop(DropReason::UplinkNotAllowed),
        ),
        (
            "ping of a pod",
            from_router().icmp_echo_v4(ip("203.0.113.5"), ip("10.244.1.5"), true, 7, 1, b"hi"),
            Verdict::Drop(DropReason::UplinkNotAllowed),
        ),
        (
            "fragment toward a pod",
            fragment,
            Verdict::Drop(DropReason::UplinkNotAllowed),
        ),
        (
            "a node's underlay address",
            syn(CLIENT, "10.0.0.2:22"),
            Verdict::Drop(DropReason::UplinkNotAllowed),
        ),
        (
            "another routed prefix (back out of the uplink)",
            from_router().udp_v4(sa(CLIENT), sa("8.8.8.8:53"), b"q"),
            Verdict::Drop(DropReason::UplinkNotAllowed),
        ),
        (
            "VXLAN to the VTEP from the uplink",
            vxlan_on_uplink,
            Verdict::ToException { port: UPLINK_EXC },
        ),
        (
            "ClusterIP frontend",
            syn(CLIENT, &format!("{CIP}:80")),
            Verdict::Transmit { port: CLUSTER },
        ),
        (
            "NodePort frontend",
            syn(CLIENT, NODE_PORT),
            Verdict::Transmit { port: CLUSTER },
        ),
        (
            "LoadBalancer frontend, source inside its ranges",
            syn("203.0.113.9:1234", &format!("{LB}:443")),
            Verdict::Transmit { port: CLUSTER },
        ),
        (
            "LoadBalancer frontend, source outside its ranges",
            syn("198.18.0.1:1234", &format!("{LB}:443")),
            Verdict::Drop(DropReason::SourceRange),
        ),
        (
            "externalIP frontend",
            syn(CLIENT, &format!("{EIP}:80")),
            Verdict::Transmit { port: CLUSTER },
        ),
        (
            "unallocated address of the service CIDR",
            syn(CLIENT, "10.96.5.5:80"),
            Verdict::Drop(DropReason::NoService),
        ),
        (
            "the gateway's own address (SSH): exception path",
            syn(CLIENT, "192.0.2.1:22"),
            Verdict::ToException { port: UPLINK_EXC },
        ),
    ];
    for (desc, frame, verdict) in cases {
        let mut p = pipeline();
        let mut stats = WorkerStats::default();
        let r = run(&mut p, &snap, UPLINK, &frame, 0, &mut stats);
        assert_eq!(r.verdict, verdict, "{desc}");
        if let Verdict::Drop(reason) = verdict {
            assert_eq!(stats.drops_of(reason), 1, "{desc}: counted");
        }
        if verdict == Verdict::Drop(DropReason::UplinkNotAllowed) {
            assert_eq!(p.conntrack().len(), 0, "{desc}: nothing tracked");
        }
    }
}

#[test]
fn routable_prefixes_open_what_they_name() {
    let snap = svc_snapshot();
    let mut p = Pipeline::new(PipelineConfig {
        routable_prefixes: vec!["10.244.1.0/24".parse().unwrap()],
        reassemble_fragments: true,
        ..config(0, 1)
    })
    .unwrap();
    let mut stats = WorkerStats::default();
    let r = run(
        &mut p,
        &snap,
        UPLINK,
        &syn(CLIENT, "10.244.1.5:9376"),
        0,
        &mut stats,
    );
    assert_eq!(r.verdict, Verdict::Transmit { port: CLUSTER });
    let o = parse(&r.out);
    assert_eq!(
        (o.dst, o.dport, o.ttl),
        (ip("10.244.1.5"), 9376, 63),
        "routed untranslated"
    );
    let r = run(
        &mut p,
        &snap,
        UPLINK,
        &syn(CLIENT, "10.244.2.5:9376"),
        0,
        &mut stats,
    );
    assert_eq!(r.verdict, Verdict::Drop(DropReason::UplinkNotAllowed));
    // Sources are still validated.
    let r = run(
        &mut p,
        &snap,
        UPLINK,
        &syn("127.0.0.1:1", "10.244.1.5:9376"),
        0,
        &mut stats,
    );
    assert_eq!(r.verdict, Verdict::Drop(DropReason::MartianSource));
}

/// A flow a pod opened from the cluster side cannot be joined from an uplink, neither by
/// its original key (the pod's address) nor by its reply key (the backend's), on the fast
/// path or on the general path; a flow opened from the uplink keeps using the fast path.
#[test]
fn tracked_flows_admit_uplink_packets_only_in_their_uplink_directions() {
    let snap = svc_snapshot();
    for fast in [true, false] {
        let mut p = pipeline();
        p.set_fast_path(fast);
        let mut stats = WorkerStats::default();
        let pod = "10.244.9.9:41000";
        let vip = format!("{CIP}:80");
        let backend = maglev(&web(), ipv4::PROTO_TCP, pod, &vip);
        let opened = from_cluster().tcp_v4(sa(pod), sa(&vip), TcpFlags::SYN, b"");
        let r = run(&mut p, &snap, CLUSTER, &opened, 0, &mut stats);
        assert_eq!(r.verdict, Verdict::Transmit { port: CLUSTER });
        let synack = from_cluster().tcp_v4(backend, sa(pod), TcpFlags::SYN | TcpFlags::ACK, b"");
        assert_eq!(
            run(&mut p, &snap, CLUSTER, &synack, 1, &mut stats).verdict,
            Verdict::Transmit { port: CLUSTER }
        );
        let ack = from_cluster().tcp_v4(sa(pod), sa(&vip), TcpFlags::ACK, b"x");
        assert_eq!(
            run(&mut p, &snap, CLUSTER, &ack, 2, &mut stats).verdict,
            Verdict::Transmit { port: CLUSTER }
        );
        let fast_before = stats.fast_path;
        // The pod's own packet, replayed from the internet.
        let spoofed = from_router().tcp_v4(sa(pod), sa(&vip), TcpFlags::ACK, b"evil");
        let r = run(&mut p, &snap, UPLINK, &spoofed, 3, &mut stats);
        assert_eq!(
            r.verdict,
            Verdict::Drop(DropReason::SpoofedSource),
            "fast {fast}"
        );
        // The backend's reply, replayed from the internet.
        let spoofed = from_router().tcp_v4(backend, sa(pod), TcpFlags::ACK, b"evil");
        let r = run(&mut p, &snap, UPLINK, &spoofed, 3, &mut stats);
        assert_eq!(
            r.verdict,
            Verdict::Drop(DropReason::SpoofedSource),
            "fast {fast}"
        );
        assert_eq!(
            stats.fast_path, fast_before,
            "the fast path took none of them"
        );
        assert_eq!(stats.drops_of(DropReason::SpoofedSource), 2);

        // A flow opened on the cluster port by a source that is no cluster address (a
        // node's external address, say): its packets from an uplink pass source validation
        // but not the entry's directions.
        let outside = "198.18.0.9:41000";
        let backend = maglev(&web(), ipv4::PROTO_TCP, outside, &vip);
        let opened = from_cluster().tcp_v4(sa(outside), sa(&vip), TcpFlags::SYN, b"");
        assert_eq!(
            run(&mut p, &snap, CLUSTER, &opened, 4, &mut stats).verdict,
            Verdict::Transmit { port: CLUSTER }
        );
        let synack =
            from_cluster().tcp_v4(backend, sa(outside), TcpFlags::SYN | TcpFlags::ACK, b"");
        run(&mut p, &snap, CLUSTER, &synack, 5, &mut stats);
        let joined = from_router().tcp_v4(sa(outside), sa(&vip), TcpFlags::ACK, b"x");
        let r = run(&mut p, &snap, UPLINK, &joined, 6, &mut stats);
        assert_eq!(
            r.verdict,
            Verdict::Drop(DropReason::UplinkNotAllowed),
            "fast {fast}"
        );
        assert_eq!(stats.fast_path, fast_before);

        // A client of the uplink: its flow's packets are forwarded, on the fast path when on.
        let backend = maglev(&web(), ipv4::PROTO_TCP, CLIENT, NODE_PORT);
        let r = run(
            &mut p,
            &snap,
            UPLINK,
            &syn(CLIENT, NODE_PORT),
            7,
            &mut stats,
        );
        assert_eq!(r.verdict, Verdict::Transmit { port: CLUSTER });
        let o = parse(&r.out);
        let snat = std::net::SocketAddrV4::new(o.src, o.sport);
        let synack = from_cluster().tcp_v4(backend, snat, TcpFlags::SYN | TcpFlags::ACK, b"");
        assert_eq!(
            run(&mut p, &snap, CLUSTER, &synack, 8, &mut stats).verdict,
            Verdict::Transmit { port: UPLINK }
        );
        let ack = from_router().tcp_v4(sa(CLIENT), sa(NODE_PORT), TcpFlags::ACK, b"x");
        let r = run(&mut p, &snap, UPLINK, &ack, 9, &mut stats);
        assert_eq!(r.verdict, Verdict::Transmit { port: CLUSTER });
        assert_eq!(stats.fast_path, fast_before + u64::from(fast));
    }
}

/// The fast path refuses before changing anything: the frame the general path then drops
/// is the frame as received.
#[test]
fn the_fast_path_leaves_refused_uplink_frames_untouched() {
    let snap = svc_snapshot();
    let mut p = pipeline();
    let mut stats = WorkerStats::default();
    let pod = "10.244.9.9:41000";
    let vip = format!("{CIP}:80");
    let opened = from_cluster().tcp_v4(sa(pod), sa(&vip), TcpFlags::SYN, b"");
    run(&mut p, &snap, CLUSTER, &opened, 0, &mut stats);
    let spoofed = from_router().tcp_v4(sa(pod), sa(&vip), TcpFlags::ACK, b"evil");
    let mut frame = VecFrame::new(&spoofed);
    let verdict = p.process(&mut frame, UPLINK, &snap, 1, &mut stats);
    assert_eq!(verdict, Verdict::Drop(DropReason::SpoofedSource));
    assert_eq!(frame.into_vec(), spoofed);
}
