//! The whole pipeline on bursts of established flows and of new connections, without DPDK
//! or I/O:
//! `cargo bench -p dataplane --bench pipeline`. Frames are plain buffers; what this measures
//! is the per-packet cost of the stages (prefetch, parse, conntrack, NAT, route, VXLAN
//! encapsulation, L2) that `perf`'s end-to-end figures add on top of the I/O ceiling.

use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use dataplane::conntrack::ConntrackConfig;
use dataplane::frame::{Frame, VecFrame};
use dataplane::maglev::MaglevTable;
use dataplane::pipeline::{
    Pipeline, PipelineConfig, PortConfig, PortRole, RouteConfig, Verdict, VxlanConfig,
    PREFETCH_BURST,
};
use dataplane::snapshot::{
    Backend, BackendSet, EndpointState, Frontend, FrontendKey, FrontendKind, InternalPolicy,
    PodCidrRoute, Protocol, ServicePortName, Snapshot,
};
use dataplane::stats::WorkerStats;
use dataplane::wire::build::FrameBuilder;
use dataplane::wire::{MacAddr, TcpFlags};

const UPLINK_MAC: MacAddr = MacAddr([2, 0, 0, 0, 0, 1]);
const CLUSTER_MAC: MacAddr = MacAddr([2, 0, 0, 0, 1, 1]);
const ROUTER_MAC: MacAddr = MacAddr([2, 0xee, 0, 0, 0, 0xfe]);
const NODE_MAC: MacAddr = MacAddr([2, 0xaa, 0, 0, 0, 2]);
const SERVICE: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 80);

/// The gateway's pipeline; with `routed`, pod CIDR 10.245.2.0/24 is routed through its
/// node (flannel host-gw) instead of the snapshot's VXLAN pod route.
fn pipeline(flows: usize, routed: bool) -> Pipeline {
    let mut routes = vec![RouteConfig {
        prefix: "0.0.0.0/0".parse().unwrap(),
        via: Some(Ipv4Addr::new(192, 0, 2, 254)),
        port: 0,
    }];
    if routed {
        routes.push(RouteConfig {
            prefix: "10.245.2.0/24".parse().unwrap(),
            via: Some(Ipv4Addr::new(10, 0, 0, 2)),
            port: 1,
        });
    }
    Pipeline::new(PipelineConfig {
        ports: vec![
            PortConfig {
                id: 0,
                mac: UPLINK_MAC,
                addresses: vec!["192.0.2.1/24".parse().unwrap()],
                role: PortRole::Uplink,
                mtu: 1500,
                exception_port: None,
            },
            PortConfig {
                id: 1,
                mac: CLUSTER_MAC,
                addresses: vec!["10.0.0.1/24".parse().unwrap()],
                role: PortRole::Cluster,
                mtu: 1500,
                exception_port: None,
            },
        ],
        routes,
        static_neighbors: vec![
            (0, Ipv4Addr::new(192, 0, 2, 254), ROUTER_MAC),
            (1, Ipv4Addr::new(10, 0, 0, 2), NODE_MAC),
        ],
        vxlan: Some(VxlanConfig {
            udp_port: 4789,
            vni: 1,
            local_vtep: Ipv4Addr::new(10, 0, 0, 1),
        }),
        snat_addresses: vec![],
        snat_port_range: 32768..=60999,
        conntrack: ConntrackConfig {
            capacity: (flows * 2).next_power_of_two().max(1024),
            // The bursts are established flows without handshakes, never answered.
            tcp_loose: true,
            half_open_per_source: 0,
            ..ConntrackConfig::default()
        },
        affinity_capacity: 256,
        icmp_errors_per_second: 100,
        worker_index: 0,
        workers: 1,
        neighbor_timeout_ms: 30_000,
        routable_prefixes: vec![],
        reassemble_fragments: true,
    })
    .expect("pipeline")
}

/// One ClusterIP with three pods on a remote node (reached through VXLAN unless `routed`).
fn snapshot(routed: bool) -> Snapshot {
    let backends: Vec<Backend> = (2..5)
        .map(|i| Backend {
            addr: Ipv4Addr::new(10, 245, 2, i),
            port: 9376,
            state: EndpointState::Ready,
            node: Some(Arc::from("node-2")),
        })
        .collect();
    let pairs: Vec<(Ipv4Addr, u16)> = backends.iter().map(|b| (b.addr, b.port)).collect();
    let set = Arc::new(BackendSet {
        maglev: MaglevTable::build(&pairs, 16381),
        usable: (0..backends.len() as u32).collect(),
        backends,
    });
    let frontend = Arc::new(Frontend {
        id: 0,
        service: ServicePortName {
            namespace: Arc::from("default"),
            name: Arc::from("web"),
            port_name: Arc::from(""),
            protocol: Protocol::Tcp,
        },
        kind: FrontendKind::ClusterIp,
        addr: *SERVICE.ip(),
        protocol: Protocol::Tcp,
        port: SERVICE.port(),
        backends: set,
        masquerade: false,
        source_ranges: vec![],
        affinity_timeout_secs: None,
        internal_policy: InternalPolicy::Cluster,
    });
    let mut s = Snapshot {
        generation: 1,
        service_cidr: Some("10.96.0.0/12".parse().unwrap()),
        pod_routes: if routed {
            vec![]
        } else {
            vec![PodCidrRoute {
                cidr: "10.245.2.0/24".parse().unwrap(),
                vtep: Ipv4Addr::new(10, 0, 0, 2),
                vni: 1,
                node: Some(Arc::from("node-2")),
                vtep_mac: Some(NODE_MAC),
            }]
        },
        ..Snapshot::default()
    };
    s.service_addresses
        .insert(frontend.addr, FrontendKind::ClusterIp);
    s.frontends.insert(
        FrontendKey {
            addr: frontend.addr,
            protocol: Protocol::Tcp,
            port: frontend.port,
        },
        frontend,
    );
    s.frontend_count = 1;
    s.index_counters();
    s
}

/// 64-byte TCP ACKs from `flows` distinct clients to the Service.
fn frames(flows: usize) -> Vec<Vec<u8>> {
    segments(flows, TcpFlags::ACK)
}

/// 64-byte TCP segments with `flags` from `flows` distinct clients to the Service.
fn segments(flows: usize, flags: TcpFlags) -> Vec<Vec<u8>> {
    (0..flows)
        .map(|i| {
            let client = Ipv4Addr::from(0x0a01_0000 + (i as u32 >> 14));
            FrameBuilder::new(ROUTER_MAC, UPLINK_MAC).pad(true).tcp_v4(
                SocketAddrV4::new(client, 1024 + (i as u16 & 0x3fff)),
                SERVICE,
                flags,
                b"",
            )
        })
        .collect()
}

/// What a worker does with a received burst. Not inlined, so that a profile (perf,
/// callgrind) separates it from the refill of the buffers.
#[inline(never)]
fn run_burst(
    pipeline: &mut Pipeline,
    burst: &mut [VecFrame],
    in_port: u16,
    snap: &Snapshot,
    stats: &mut WorkerStats,
) {
    let hashes = pipeline.prefetch_burst(in_port, burst.iter().map(|f| f.data()));
    for (position, frame) in burst.iter_mut().enumerate() {
        let hash = hashes.get(position);
        black_box(pipeline.process_hashed(frame, in_port, snap, 2, stats, hash));
    }
}

/// The same flows arriving from a node's VTEP, VXLAN-encapsulated (a pod calling the
/// Service through the gateway).
fn vxlan_frames(flows: usize) -> Vec<Vec<u8>> {
    frames(flows)
        .iter()
        .map(|inner| {
            FrameBuilder::new(NODE_MAC, CLUSTER_MAC).vxlan_encap(
                Ipv4Addr::new(10, 0, 0, 2),
                Ipv4Addr::new(10, 0, 0, 1),
                51000,
                1,
                inner,
            )
        })
        .collect()
}

/// Benchmarks `templates` through `pipeline` as bursts of [`PREFETCH_BURST`] buffers,
/// refilled before each run like a driver's mbufs (a stride through the templates): the
/// frames are hot in cache, the tables as hot as the flow count lets them be.
fn bench_bursts(
    g: &mut BenchmarkGroup<'_, WallTime>,
    name: &str,
    pipeline: &mut Pipeline,
    templates: &[Vec<u8>],
    in_port: u16,
    snap: &Snapshot,
    stats: &mut WorkerStats,
) {
    let mut burst: Vec<VecFrame> = (0..PREFETCH_BURST)
        .map(|_| VecFrame::new(&templates[0]))
        .collect();
    let mut next = 0usize;
    g.bench_function(name, |b| {
        b.iter(|| {
            for frame in burst.iter_mut() {
                next = (next + 7919) % templates.len();
                frame.refill(&templates[next]);
            }
            run_burst(pipeline, &mut burst, in_port, snap, stats);
        })
    });
}

/// Builds the frames of `flows` distinct flows.
type FrameMaker = fn(usize) -> Vec<Vec<u8>>;

/// Criterion filters benchmarks by a substring of their id: the filter, so that the setup
/// (up to 1M flows) of the ones it would not run is skipped.
fn name_filter() -> Option<String> {
    std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-') && a.parse::<f64>().is_err())
}

/// perf's scenario d without I/O: every packet is the SYN of a new flow (frontend match,
/// Maglev pick, conntrack insert, DNAT, VXLAN encap), into a table at its steady state,
/// full, where each insert early-drops the oldest unreplied entry. 2^19 flows cycle through
/// a table of 2^17 entries, so none is still there when its SYN comes round again.
fn new_connections(c: &mut Criterion) {
    const FLOWS: usize = 1 << 19;
    const CAPACITY: usize = 1 << 17;
    let name = "new connections (SYN), full table";
    if name_filter().is_some_and(|f| !name.contains(f.as_str())) {
        return;
    }
    let mut g = c.benchmark_group("pipeline");
    g.throughput(Throughput::Elements(PREFETCH_BURST as u64));
    let mut pipeline = pipeline(CAPACITY / 2, false);
    assert_eq!(pipeline.conntrack().capacity(), CAPACITY);
    let snap = snapshot(false);
    let mut stats = WorkerStats::default();
    let templates = segments(FLOWS, TcpFlags::SYN);
    bench_bursts(
        &mut g,
        name,
        &mut pipeline,
        &templates,
        0,
        &snap,
        &mut stats,
    );
    let ct = pipeline.conntrack().stats();
    eprintln!(
        "{name}: {} inserts, {} evictions, {} of {} lookups hit",
        ct.inserts, ct.evictions, ct.hits, ct.lookups
    );
    g.finish();
}

fn established(c: &mut Criterion) {
    let mut g = c.benchmark_group("pipeline established ClusterIP");
    g.throughput(Throughput::Elements(PREFETCH_BURST as u64));
    // (name, flows, in port, frames, pods routed rather than behind VXLAN)
    let scenarios: [(&str, usize, u16, FrameMaker, bool); 6] = [
        ("1 flow", 1, 0, frames, false),
        ("10000 flows", 10_000, 0, frames, false),
        ("1000000 flows", 1_000_000, 0, frames, false),
        ("vxlan in, 10000 flows", 10_000, 1, vxlan_frames, false),
        ("routed: one flow", 1, 0, frames, true),
        ("routed: 1M flows", 1_000_000, 0, frames, true),
    ];
    let filter = name_filter();
    for (name, flows, in_port, make, routed) in scenarios {
        if filter.as_ref().is_some_and(|f| !name.contains(f.as_str())) {
            continue;
        }
        let mut pipeline = pipeline(flows, routed);
        let snap = snapshot(routed);
        let mut stats = WorkerStats::default();
        let templates = make(flows);
        for t in &templates {
            let verdict = pipeline.process(&mut VecFrame::new(t), in_port, &snap, 1, &mut stats);
            assert!(
                matches!(verdict, Verdict::Transmit { port: 1 }),
                "{verdict:?}"
            );
        }
        bench_bursts(
            &mut g,
            name,
            &mut pipeline,
            &templates,
            in_port,
            &snap,
            &mut stats,
        );
        eprintln!(
            "{name}: {} of {} packets took the fast path",
            stats.fast_path,
            pipeline.conntrack().stats().lookups
        );
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = established, new_connections
}
criterion_main!(benches);
