//! Issue 18, item 3: for the same Service state every gateway of a fleet sends a given
//! 5-tuple to the same backend, and ClientIP affinity picks the same backend, so a flow
//! that ECMP moves to another gateway lands on the same pod.
//!
//! Two "gateways" are built the way two servicegate processes would be, differing in
//! everything that must not matter: the order objects arrived in (one compiler saw an
//! older state first, the other compiles the final state fresh), how the endpoints are
//! split over EndpointSlices and listed within them, and the number of workers (1 and 3:
//! each SYN is processed by the worker that owns it). Then many connections are opened
//! through the real pipeline of each and the DNAT destinations compared.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;

use control::compiler::{CompileOptions, Compiler};
use control::model::{Model, ObjectKey};
use dataplane::conntrack::ConntrackConfig;
use dataplane::frame::VecFrame;
use dataplane::pipeline::Pipeline;
use dataplane::pipeline::{rewrite, PipelineConfig, PortConfig, PortRole, RouteConfig, Verdict};
use dataplane::snapshot::Snapshot;
use dataplane::stats::WorkerStats;
use dataplane::wire::build::FrameBuilder;
use dataplane::wire::{EthernetFrame, Ipv4Packet, MacAddr, TcpFlags, TcpPacket};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

const VIP: &str = "203.0.113.10";
const STICKY_VIP: &str = "203.0.113.11";
const UPLINK: u16 = 0;
const CLUSTER: u16 = 1;
const ROUTER_MAC: MacAddr = MacAddr([0x02, 0xee, 0, 0, 0, 0xfe]);
const UPLINK_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x01]);
const CLUSTER_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 1, 0x01]);
const POD_MAC: MacAddr = MacAddr([0x02, 0xaa, 0, 0, 0, 0x10]);

/// Endpoints 10.0.0.10 .. 10.0.0.10+n-1, port 8080.
fn pods(n: u8) -> Vec<Ipv4Addr> {
    (0..n).map(|i| Ipv4Addr::new(10, 0, 0, 10 + i)).collect()
}

fn service(name: &str, vip: &str, affinity: bool) -> Service {
    let affinity = if affinity {
        "sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}\n  "
    } else {
        ""
    };
    serde_saphyr::from_str(&format!(
        "apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: fleet}}
spec:
  type: LoadBalancer
  {affinity}clusterIP: 10.96.0.{octet}
  clusterIPs: [10.96.0.{octet}]
  ports: [{{name: http, protocol: TCP, port: 80, targetPort: 8080}}]
status:
  loadBalancer:
    ingress: [{{ip: {vip}}}]
",
        octet = if vip == VIP { 10 } else { 11 },
    ))
    .expect("a Service")
}

fn slice(service: &str, name: &str, endpoints: &[Ipv4Addr]) -> EndpointSlice {
    let endpoints: Vec<String> = endpoints
        .iter()
        .map(|a| {
            format!("  - addresses: [\"{a}\"]\n    conditions: {{ready: true, serving: true, terminating: false}}\n")
        })
        .collect();
    serde_saphyr::from_str(&format!(
        "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}
  namespace: fleet
  labels: {{kubernetes.io/service-name: {service}}}
addressType: IPv4
ports: [{{name: http, protocol: TCP, port: 8080}}]
endpoints:
{}",
        endpoints.concat()
    ))
    .expect("an EndpointSlice")
}

/// A model of the two Services, their endpoints split into slices as `split` says.
fn model(endpoints: &[Ipv4Addr], split: &[usize], slice_prefix: &str) -> Model {
    let mut model = Model::default();
    for (name, vip, affinity) in [("web", VIP, false), ("sticky", STICKY_VIP, true)] {
        model.services.insert(
            ObjectKey::new("fleet", name),
            Arc::new(service(name, vip, affinity)),
        );
        let mut rest = endpoints;
        for (i, &n) in split.iter().enumerate() {
            let (these, after) = rest.split_at(n.min(rest.len()));
            rest = after;
            let slice_name = format!("{name}-{slice_prefix}{i}");
            model.endpoint_slices.insert(
                ObjectKey::new("fleet", &slice_name),
                Arc::new(slice(name, &slice_name, these)),
            );
        }
        assert!(rest.is_empty(), "split covers every endpoint");
    }
    model
}

fn options() -> CompileOptions {
    CompileOptions {
        node_port_addresses: vec![Ipv4Addr::new(192, 0, 2, 1)],
        ..CompileOptions::default()
    }
}

/// Worker `index` of `workers`, uplink 192.0.2.1/24 and cluster 10.0.0.1/24 with every
/// pod's MAC known.
fn pipeline(index: usize, workers: usize) -> Pipeline {
    let net = |s: &str| s.parse().expect("prefix");
    let mut static_neighbors = vec![(UPLINK, Ipv4Addr::new(192, 0, 2, 254), ROUTER_MAC)];
    static_neighbors.extend(pods(40).into_iter().map(|a| (CLUSTER, a, POD_MAC)));
    Pipeline::new(PipelineConfig {
        ports: vec![
            PortConfig {
                id: UPLINK,
                mac: UPLINK_MAC,
                addresses: vec![net("192.0.2.1/24")],
                role: PortRole::Uplink,
                mtu: 1500,
                exception_port: None,
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
        routes: vec![RouteConfig {
            prefix: net("0.0.0.0/0"),
            via: Some(Ipv4Addr::new(192, 0, 2, 254)),
            port: UPLINK,
        }],
        static_neighbors,
        vxlan: None,
        snat_addresses: vec![Ipv4Addr::new(10, 0, 0, 1)],
        snat_port_range: 32768..=60999,
        conntrack: ConntrackConfig {
            capacity: 65_536,
            ..ConntrackConfig::default()
        },
        affinity_capacity: 65_536,
        icmp_errors_per_second: 100,
        worker_index: index,
        workers,
        neighbor_timeout_ms: 30_000,
        routable_prefixes: Vec::new(),
        reassemble_fragments: true,
    })
    .expect("pipeline")
}

/// One gateway: a snapshot and its workers.
struct Gateway {
    snapshot: Snapshot,
    workers: Vec<Pipeline>,
    stats: WorkerStats,
}

impl Gateway {
    fn new(snapshot: Snapshot, workers: usize) -> Gateway {
        Gateway {
            snapshot,
            workers: (0..workers).map(|i| pipeline(i, workers)).collect(),
            stats: WorkerStats::default(),
        }
    }

    /// Opens a connection (a SYN from the uplink) and returns the backend it was sent to.
    fn connect(&mut self, client: SocketAddrV4, vip: &str) -> SocketAddrV4 {
        let vip = SocketAddrV4::new(vip.parse().expect("vip"), 80);
        let syn = FrameBuilder::new(ROUTER_MAC, UPLINK_MAC).tcp_v4(client, vip, TcpFlags::SYN, b"");
        let mut frame = VecFrame::new(&syn);
        let owner = self.workers[0].owner(&frame, UPLINK, &self.snapshot);
        let verdict =
            self.workers[owner].process(&mut frame, UPLINK, &self.snapshot, 1, &mut self.stats);
        assert_eq!(
            verdict,
            Verdict::Transmit { port: CLUSTER },
            "{client} -> {vip}"
        );
        let out = frame.into_vec();
        let ethernet = EthernetFrame::new_checked(&out[..]).expect("ethernet");
        let ip = Ipv4Packet::new_checked(ethernet.payload()).expect("ipv4");
        let tcp = TcpPacket::new_checked(ip.payload()).expect("tcp");
        SocketAddrV4::new(ip.dst(), tcp.dst_port())
    }
}

/// A deterministic spread of client addresses and ports (xorshift).
fn clients(n: usize, seed: u64) -> Vec<SocketAddrV4> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let addr = Ipv4Addr::from(0xc633_6400 | (state as u32 & 0x0000_ffff)); // 198.51.x.y
            let port = 1024 + (state >> 32) as u16 % 60000;
            SocketAddrV4::new(addr, port)
        })
        .collect()
}

#[test]
fn every_gateway_picks_the_same_backend_whatever_the_arrival_order_and_worker_count() {
    let endpoints = pods(13);
    // Gateway A: the final state compiled fresh, endpoints in three slices in address order.
    let a_model = model(&endpoints, &[5, 5, 3], "a");
    let a_snapshot = Compiler::new(options()).compile(&a_model).snapshot;
    // Gateway B: first an older state (fewer endpoints, other slices), then the final one
    // with the endpoints reversed and split in two slices of other names.
    let mut reversed = endpoints.clone();
    reversed.reverse();
    let mut b_compiler = Compiler::new(options());
    let _older = b_compiler.compile(&model(&pods(7), &[4, 3], "old"));
    let b_snapshot = b_compiler.compile(&model(&reversed, &[9, 4], "b")).snapshot;

    let mut a = Gateway::new(a_snapshot, 1);
    let mut b = Gateway::new(b_snapshot, 3);
    let tuples = clients(3000, 0x5eed_0001);
    let mut per_backend: BTreeMap<SocketAddrV4, usize> = BTreeMap::new();
    for client in &tuples {
        let on_a = a.connect(*client, VIP);
        let on_b = b.connect(*client, VIP);
        assert_eq!(on_a, on_b, "{client} -> {VIP}: gateway A and B disagree");
        *per_backend.entry(on_a).or_default() += 1;
    }
    // Every endpoint gets a share: the picks are a spread, not one constant.
    assert_eq!(per_backend.len(), endpoints.len(), "{per_backend:?}");

    // ClientIP affinity: a client's first connection picks by its address alone, so each
    // gateway (each worker) sends every connection of a client to the same pod.
    let mut sticky_backends = BTreeSet::new();
    for (i, client) in clients(400, 0x5eed_0002).iter().enumerate() {
        let first = a.connect(*client, STICKY_VIP);
        for extra in 1..=3u16 {
            let again = SocketAddrV4::new(*client.ip(), client.port().wrapping_add(extra * 7919));
            let gateway = if extra % 2 == 0 { &mut a } else { &mut b };
            assert_eq!(
                gateway.connect(again, STICKY_VIP),
                first,
                "client {} (connection {i}.{extra})",
                client.ip()
            );
        }
        assert_eq!(b.connect(*client, STICKY_VIP), first, "client {client}");
        sticky_backends.insert(first);
    }
    assert!(sticky_backends.len() > 1, "{sticky_backends:?}");
    eprintln!(
        "fleet picks: {} tuples agree on 2 gateways (1 and 3 workers) over {} backends; {} affinity clients agree",
        tuples.len(),
        per_backend.len(),
        400
    );
}

/// The flow hash and the Maglev table are fixed functions, with no per-process seed: the
/// values below were computed once and hold in every process, on every gateway.
#[test]
fn the_flow_hash_and_maglev_are_seedless() {
    let hash = rewrite::flow_hash(
        6,
        Ipv4Addr::new(198, 51, 100, 7),
        40000,
        VIP.parse().expect("vip"),
        80,
    );
    assert_eq!(hash, GOLDEN_FLOW_HASH, "{hash:#x}");
    let snapshot = Compiler::new(options())
        .compile(&model(&pods(13), &[13], "g"))
        .snapshot;
    let mut gateway = Gateway::new(snapshot, 2);
    let picked = gateway.connect(
        SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 7), 40000),
        VIP,
    );
    assert_eq!(picked, GOLDEN_PICK.parse().expect("golden"), "{picked}");
}

const GOLDEN_FLOW_HASH: u64 = 0x7408_6df6_f216_5559;
const GOLDEN_PICK: &str = "10.0.0.16:8080";
