//! The admin API end to end over real TCP: a hand-made snapshot, two `WorkerShared`s whose
//! requests a test thread answers like a worker would, and `ctl` as the client.

use rustc_hash::FxHashMap as HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use arc_swap::ArcSwap;
use control::admin::{self, AdminState, PortInfo, Routing, SyncInfo};
use control::ctl::{self, CtlCommand};
use control::model::SourceProblem;
use control::packets::PacketTotals;
use dataplane::conntrack::{Direction, FlowKey, Nat, PROTO_TCP};
use dataplane::dpdk::{PortStats, QUEUE_STAT_COUNTERS};
use dataplane::maglev::MaglevTable;
use dataplane::pipeline::route::RouteTable;
use dataplane::snapshot::{
    Backend, BackendSet, EndpointState, Frontend, FrontendKey, FrontendKind, InternalPolicy,
    PodCidrRoute, Protocol, ServicePortName, Snapshot,
};
use dataplane::stats::{DropReason, RetiredCounters};
use dataplane::worker::{ConntrackRow, Request, WorkerShared};
use ipnet::Ipv4Net;
use serde_json::Value;

const GENERATION: u64 = 7;

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn spn(ns: &str, name: &str, port: &str) -> ServicePortName {
    ServicePortName {
        namespace: ns.into(),
        name: name.into(),
        port_name: port.into(),
        protocol: Protocol::Tcp,
    }
}

fn backend_set(backends: Vec<Backend>) -> Arc<BackendSet> {
    let usable: Vec<u32> = backends
        .iter()
        .enumerate()
        .filter(|(_, b)| b.state == EndpointState::Ready)
        .map(|(i, _)| i as u32)
        .collect();
    let keys: Vec<(Ipv4Addr, u16)> = usable
        .iter()
        .map(|&i| (backends[i as usize].addr, backends[i as usize].port))
        .collect();
    Arc::new(BackendSet {
        maglev: MaglevTable::build(&keys, 251),
        backends,
        usable,
    })
}

fn backend(addr: &str, port: u16, state: EndpointState, node: &str) -> Backend {
    Backend {
        addr: ip(addr),
        port,
        state,
        node: Some(node.into()),
    }
}

fn snapshot() -> Snapshot {
    let web = backend_set(vec![
        backend("10.244.1.5", 8080, EndpointState::Ready, "node-a"),
        backend("10.244.1.6", 8080, EndpointState::Ready, "node-a"),
        backend("10.244.2.7", 8080, EndpointState::Ready, "node-b"),
    ]);
    let lb = backend_set(vec![
        backend("10.244.2.8", 8443, EndpointState::Ready, "node-b"),
        backend("10.244.2.9", 8443, EndpointState::NotServing, "node-b"),
    ]);
    let cluster_ip = Arc::new(Frontend {
        id: 0,
        service: spn("default", "web", "http"),
        kind: FrontendKind::ClusterIp,
        addr: ip("10.96.0.10"),
        protocol: Protocol::Tcp,
        port: 80,
        backends: Arc::clone(&web),
        masquerade: false,
        source_ranges: vec![],
        affinity_timeout_secs: None,
        internal_policy: InternalPolicy::Cluster,
    });
    let node_port = Arc::new(Frontend {
        id: 1,
        service: spn("default", "web", "http"),
        kind: FrontendKind::NodePort,
        addr: Ipv4Addr::UNSPECIFIED,
        protocol: Protocol::Tcp,
        port: 30080,
        backends: web,
        masquerade: true,
        source_ranges: vec![],
        affinity_timeout_secs: None,
        internal_policy: InternalPolicy::Cluster,
    });
    let load_balancer = Arc::new(Frontend {
        id: 2,
        service: spn("shop", "checkout", "https"),
        kind: FrontendKind::LoadBalancer,
        addr: ip("203.0.113.10"),
        protocol: Protocol::Tcp,
        port: 443,
        backends: lb,
        masquerade: false,
        source_ranges: vec!["198.51.100.0/24".parse::<Ipv4Net>().unwrap()],
        affinity_timeout_secs: Some(10800),
        internal_policy: InternalPolicy::Cluster,
    });
    let mut frontends = HashMap::default();
    for f in [&cluster_ip, &load_balancer] {
        frontends.insert(
            FrontendKey {
                addr: f.addr,
                protocol: f.protocol,
                port: f.port,
            },
            Arc::clone(f),
        );
    }
    let mut node_ports = HashMap::default();
    node_ports.insert((Protocol::Tcp, 30080), node_port);
    let mut service_addresses = HashMap::default();
    service_addresses.insert(ip("10.96.0.10"), FrontendKind::ClusterIp);
    service_addresses.insert(ip("203.0.113.10"), FrontendKind::LoadBalancer);
    let mut snapshot = Snapshot {
        generation: GENERATION,
        frontends,
        node_ports,
        node_port_addresses: vec![ip("192.168.1.10")],
        service_addresses,
        service_cidr: Some("10.96.0.0/12".parse().unwrap()),
        pod_routes: vec![
            PodCidrRoute {
                vtep_mac: None,
                cidr: "10.244.1.0/24".parse().unwrap(),
                vtep: ip("192.168.1.21"),
                vni: 1,
                node: Some("node-a".into()),
            },
            PodCidrRoute {
                vtep_mac: None,
                cidr: "10.244.2.0/24".parse().unwrap(),
                vtep: ip("192.168.1.22"),
                vni: 1,
                node: Some("node-b".into()),
            },
            // A node whose VTEP is in another underlay subnet, behind a router.
            PodCidrRoute {
                vtep_mac: None,
                cidr: "10.244.3.0/24".parse().unwrap(),
                vtep: ip("172.20.0.23"),
                vni: 1,
                node: Some("node-c".into()),
            },
            // A node whose VTEP no route reaches.
            PodCidrRoute {
                vtep_mac: None,
                cidr: "10.244.4.0/24".parse().unwrap(),
                vtep: ip("203.0.113.200"),
                vni: 1,
                node: Some("node-d".into()),
            },
        ],
        frontend_count: 3,
        ..Snapshot::default()
    };
    snapshot.index_counters();
    snapshot
}

/// The established ClusterIP flow worker 0 holds.
fn held_row() -> ConntrackRow {
    let original = FlowKey::new(PROTO_TCP, ip("10.0.0.5"), 41000, ip("10.96.0.10"), 80);
    let reply = FlowKey::new(PROTO_TCP, ip("10.244.1.6"), 8080, ip("10.0.0.5"), 41000);
    ConntrackRow {
        worker: 0,
        original,
        reply,
        nat: Nat {
            frontend_addr: ip("10.96.0.10"),
            frontend_port: 80,
            backend_addr: ip("10.244.1.6"),
            backend_port: 8080,
            snat: None,
        },
        frontend_id: 0,
        generation: GENERATION,
        state: "ESTABLISHED".to_string(),
        expires_in_ms: 431_000,
        packets_original: 12,
        packets_reply: 10,
    }
}

fn flow_hash(k: &FlowKey) -> u64 {
    k.hash()
}

fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

/// The harness gateway's routes, built as `Routing::from_config` builds them: uplink
/// (index 0) on 10.0.0.1/24, cluster (index 1) on 192.168.1.10/24 where the VTEPs of
/// node-a and node-b are on-link; node-c's VTEP subnet is behind 192.168.1.1, and pods of
/// 10.244.9.0/24 are routed (no VXLAN) through their node 192.168.1.30. Nothing covers
/// 172.31.0.0/16 or 203.0.113.200 (node-d's VTEP).
fn routing(vxlan: bool) -> Routing {
    Routing {
        table: RouteTable::new(
            [
                (net("172.20.0.0/16"), Some(ip("192.168.1.1")), 1),
                (net("10.244.9.0/24"), Some(ip("192.168.1.30")), 1),
            ],
            [(net("10.0.0.1/24"), 0), (net("192.168.1.10/24"), 1)],
        ),
        port_names: vec!["uplink".into(), "cluster".into()],
        vxlan,
        addresses: vec![vec![net("10.0.0.1/24")], vec![net("192.168.1.10/24")]],
        exception: vec![false, false],
        ..Routing::default()
    }
}

struct Harness {
    addr: SocketAddr,
    ready: Arc<AtomicBool>,
    workers: Arc<[WorkerShared]>,
    stop: Arc<AtomicBool>,
    player: Option<JoinHandle<()>>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(p) = self.player.take() {
            let _ = p.join();
        }
    }
}

/// Plays both workers: answers requests (worker 0 holds `held_row`, worker 1 nothing) and
/// keeps worker 0's cycle counter moving; worker 1's stays still.
fn play_workers(workers: Arc<[WorkerShared]>, stop: Arc<AtomicBool>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let row = held_row();
        while !stop.load(Ordering::Relaxed) {
            for (i, w) in workers.iter().enumerate() {
                while let Some(request) = w.requests.pop() {
                    match request {
                        Request::DumpConntrack {
                            limit,
                            frontends,
                            reply,
                        } => {
                            let rows: Vec<ConntrackRow> = if i == 0 {
                                vec![row.clone()]
                                    .into_iter()
                                    .filter(|r| {
                                        frontends
                                            .as_ref()
                                            .is_none_or(|ids| ids.contains(&r.frontend_id))
                                    })
                                    .take(limit)
                                    .collect()
                            } else {
                                Vec::new()
                            };
                            let _ = reply.try_send(rows);
                        }
                        Request::Lookup { flow, reply } => {
                            let found = if i != 0 {
                                None
                            } else if flow == row.original {
                                Some((row.clone(), Direction::Original))
                            } else if flow == row.reply {
                                Some((row.clone(), Direction::Reply))
                            } else {
                                None
                            };
                            let _ = reply.try_send(found);
                        }
                    }
                }
            }
            {
                let mut s = workers[0].stats.lock();
                s.total_cycles += 1000;
                s.busy_cycles += 250;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    })
}

/// Per-queue driver counters: `first` for the first queues, zero for the rest.
fn queue_counters(first: &[u64]) -> [u64; QUEUE_STAT_COUNTERS] {
    let mut all = [0; QUEUE_STAT_COUNTERS];
    all[..first.len()].copy_from_slice(first);
    all
}

async fn start() -> Harness {
    let workers: Arc<[WorkerShared]> = vec![WorkerShared::new(), WorkerShared::new()].into();
    {
        let mut s = workers[0].stats.lock();
        s.generation = GENERATION;
        s.frontend_packets = vec![100, 20, 3];
        // ClusterIP's backends are counters 0..3, NodePort's 3..6 (same service port).
        s.backend_packets = vec![60, 30, 10, 15, 5, 0, 3, 0];
        // Counts of the previous generation this worker left: folded into the totals
        // while that snapshot is kept (it is not here: they must not appear).
        s.retired.push(RetiredCounters {
            generation: GENERATION - 1,
            frontend_packets: vec![1_000_000],
            backend_packets: vec![1_000_000],
        });
        s.rx_packets[0] = 1000;
        s.rx_bytes[0] = 64_000;
        s.tx_packets[1] = 990;
        s.tx_bytes[1] = 63_000;
        s.drops[DropReason::NoService as usize] = 4;
        s.bursts = 50;
        s.handoffs_out = 3;
        s.conntrack.entries = 1;
        s.conntrack.inserts = 9;
        for ns in [2_000u64, 3_000, 5_000, 40_000] {
            s.burst_latency_ns.record(ns).unwrap();
        }
    }
    {
        let mut s = workers[1].stats.lock();
        s.generation = GENERATION - 1; // stale: its frontend counters must be ignored
        s.frontend_packets = vec![1_000_000, 0, 0];
        s.rx_packets[0] = 500;
        s.total_cycles = 10;
    }
    let ready = Arc::new(AtomicBool::new(false));
    let installed = Arc::new(snapshot());
    let packets = Arc::new(parking_lot::Mutex::new(PacketTotals::default()));
    packets.lock().attach(Arc::clone(&workers));
    packets.lock().installed(Arc::clone(&installed));
    let state = Arc::new(AdminState {
        packets,
        snapshot: Arc::new(ArcSwap::new(installed)),
        workers: Arc::clone(&workers),
        ports: vec![
            PortInfo {
                name: "uplink".into(),
                id: 0,
                role: "uplink".into(),
                device: "net_null0".into(),
                queues: 2,
                tx_queues: 2,
            },
            PortInfo {
                name: "cluster".into(),
                id: 1,
                role: "cluster".into(),
                device: "net_null1".into(),
                queues: 2,
                tx_queues: 2,
            },
        ],
        eal: control::admin::EalInfo::default(),
        mempools: Box::new(|| vec![("rx".to_string(), 1200, 6991)]),
        port_stats: Box::new(|| {
            vec![
                (
                    "uplink".to_string(),
                    PortStats {
                        rx_packets: 1500,
                        rx_missed: 17,
                        rx_queue_packets: queue_counters(&[700, 800]),
                        rx_queue_bytes: queue_counters(&[44_800, 51_200]),
                        ..PortStats::default()
                    },
                ),
                (
                    "cluster".to_string(),
                    PortStats {
                        tx_queue_packets: queue_counters(&[600, 390]),
                        tx_queue_bytes: queue_counters(&[38_400, 24_960]),
                        // A queue the port does not have: never exported.
                        rx_queue_packets: queue_counters(&[0, 0, 99]),
                        ..PortStats::default()
                    },
                ),
            ]
        }),
        ready: Arc::clone(&ready),
        sync: Arc::new(parking_lot::Mutex::new(SyncInfo {
            last_sync_seconds: 0.0125,
            source: "files".into(),
            warnings: vec!["default/broken: port 0 has no targetPort".into()],
            services: 2,
            source_problems: vec![
                SourceProblem {
                    file: "m/a.yaml".into(),
                    reason: "syntax",
                    message: "m/a.yaml: document 2: unexpected end of file".into(),
                },
                SourceProblem {
                    file: "m/a.yaml".into(),
                    reason: "syntax",
                    message: "m/a.yaml: document 4: did not find expected ','".into(),
                },
                SourceProblem {
                    file: "m/b.yaml".into(),
                    reason: "duplicate",
                    message: "m/b.yaml: document 1 (Service default/web): ...".into(),
                },
            ],
            ..SyncInfo::default()
        })),
        flow_hash,
        routing: arc_swap::ArcSwap::from_pointee(routing(true)),
        tsc_hz: 2_000_000_000,
        conntrack_capacity: 4096,
        announce: None,
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(admin::serve(listener, state));
    let stop = Arc::new(AtomicBool::new(false));
    let player = play_workers(Arc::clone(&workers), Arc::clone(&stop));
    Harness {
        addr,
        ready,
        workers,
        stop,
        player: Some(player),
    }
}

async fn get(h: &Harness, path: &str) -> (u16, String) {
    let addr = h.addr.to_string();
    let path = path.to_string();
    tokio::task::spawn_blocking(move || ctl::get(&addr, &path).unwrap())
        .await
        .unwrap()
}

async fn get_json(h: &Harness, path: &str) -> Value {
    let (status, body) = get(h, path).await;
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

fn trace_path(flow: &str) -> String {
    format!("/v1/trace?flow={}", ctl::url_encode(flow))
}

#[tokio::test]
async fn readyz_follows_the_first_snapshot() {
    let h = start().await;
    let (status, body) = get(&h, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    h.ready.store(true, Ordering::Release);
    let (status, body) = get(&h, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("ok"));
}

#[tokio::test]
async fn healthz_names_the_stuck_worker() {
    let h = start().await;
    let (status, body) = get(&h, "/healthz").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body.trim(), "ok");
    // Worker 1's counters never move; worker 0's do (the player bumps them).
    tokio::time::sleep(Duration::from_millis(2600)).await;
    let (status, body) = get(&h, "/healthz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("worker 1"), "{body}");
    assert!(!body.contains("worker 0"), "{body}");
    // It recovers once worker 1 moves again.
    h.workers[1].stats.lock().total_cycles += 1;
    let (status, body) = get(&h, "/healthz").await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn services_lists_every_frontend() {
    let h = start().await;
    let v = get_json(&h, "/v1/services").await;
    assert_eq!(v["generation"], GENERATION);
    assert_eq!(v["source"], "files");
    let fs = v["frontends"].as_array().unwrap();
    assert_eq!(fs.len(), 3);
    let cip = &fs[0];
    assert_eq!(cip["service"], "default/web");
    assert_eq!(cip["namespace"], "default");
    assert_eq!(cip["name"], "web");
    assert_eq!(cip["port_name"], "http");
    assert_eq!(cip["protocol"], "TCP");
    assert_eq!(cip["kind"], "ClusterIP");
    assert_eq!(cip["address"], "10.96.0.10");
    assert_eq!(cip["port"], 80);
    assert_eq!(cip["masquerade"], false);
    assert_eq!(cip["maglev_table_size"], 251);
    assert_eq!(cip["packets"], 100, "stale worker 1 must not count");
    let backends = cip["backends"].as_array().unwrap();
    assert_eq!(backends.len(), 3);
    assert_eq!(backends[0]["address"], "10.244.1.5");
    assert_eq!(backends[0]["port"], 8080);
    assert_eq!(backends[0]["state"], "ready");
    assert_eq!(backends[0]["usable"], true);
    assert_eq!(backends[2]["node"], "node-b");
    let np = &fs[1];
    assert_eq!(np["kind"], "NodePort");
    assert_eq!(np["port"], 30080);
    assert_eq!(np["masquerade"], true);
    assert_eq!(np["node_port_addresses"][0], "192.168.1.10");
    let lb = &fs[2];
    assert_eq!(lb["kind"], "LoadBalancer");
    assert_eq!(lb["source_ranges"][0], "198.51.100.0/24");
    assert_eq!(lb["affinity"]["timeout_seconds"], 10800);
    assert_eq!(lb["backends"][1]["state"], "not-serving");
    assert_eq!(lb["backends"][1]["usable"], false);
}

/// Every line is a comment (`# HELP|TYPE|UNIT|EOF`) or `name{labels} value`.
fn check_exposition(text: &str) {
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            assert!(
                rest.starts_with("HELP ")
                    || rest.starts_with("TYPE ")
                    || rest.starts_with("UNIT ")
                    || rest == "EOF",
                "bad comment line {line:?}"
            );
            continue;
        }
        let name_end = line
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(line.len());
        let name = &line[..name_end];
        assert!(!name.is_empty(), "no metric name in {line:?}");
        assert!(name.starts_with("servicegate_"), "unprefixed {line:?}");
        let mut rest = &line[name_end..];
        if rest.starts_with('{') {
            let close = rest
                .rfind('}')
                .unwrap_or_else(|| panic!("unclosed labels {line:?}"));
            let labels = &rest[1..close];
            for pair in split_labels(labels) {
                let (k, v) = pair
                    .split_once('=')
                    .unwrap_or_else(|| panic!("bad label {pair:?} in {line:?}"));
                assert!(
                    k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                    "bad label name in {line:?}"
                );
                assert!(
                    v.starts_with('"') && v.ends_with('"') && v.len() >= 2,
                    "bad label value in {line:?}"
                );
            }
            rest = &rest[close + 1..];
        }
        let value = rest
            .strip_prefix(' ')
            .unwrap_or_else(|| panic!("no value in {line:?}"));
        let value = value.split(' ').next().unwrap();
        assert!(
            value.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&value),
            "bad value {value:?} in {line:?}"
        );
    }
}

fn split_labels(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut quoted = false;
    let bytes = s.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'"' if i == 0 || bytes[i - 1] != b'\\' => quoted = !quoted,
            b',' if !quoted => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if start < s.len() {
        out.push(&s[start..]);
    }
    out
}

#[tokio::test]
async fn metrics_have_the_promised_names() {
    let h = start().await;
    let (status, body) = get(&h, "/metrics").await;
    assert_eq!(status, 200);
    check_exposition(&body);
    for name in [
        "servicegate_rx_packets_total{port=\"uplink\"} 1500",
        "servicegate_rx_bytes_total{port=\"uplink\"} 64000",
        "servicegate_tx_packets_total{port=\"cluster\"} 990",
        "servicegate_tx_bytes_total{port=\"cluster\"} 63000",
        "servicegate_queue_rx_packets_total{port=\"uplink\",worker=\"1\"} 500",
        "servicegate_port_queue_rx_packets_total{port=\"uplink\",queue=\"0\"} 700",
        "servicegate_port_queue_rx_packets_total{port=\"uplink\",queue=\"1\"} 800",
        "servicegate_port_queue_rx_bytes_total{port=\"uplink\",queue=\"1\"} 51200",
        "servicegate_port_queue_tx_packets_total{port=\"cluster\",queue=\"0\"} 600",
        "servicegate_port_queue_tx_packets_total{port=\"cluster\",queue=\"1\"} 390",
        "servicegate_port_queue_tx_bytes_total{port=\"cluster\",queue=\"0\"} 38400",
        "servicegate_port_queue_tx_bytes_total{port=\"uplink\",queue=\"1\"} 0",
        "servicegate_port_queue_rx_packets_total{port=\"cluster\",queue=\"1\"} 0",
        "servicegate_manifest_errors{file=\"m/a.yaml\",reason=\"syntax\"} 2",
        "servicegate_manifest_errors{file=\"m/b.yaml\",reason=\"duplicate\"} 1",
        "servicegate_port_rx_missed_total{port=\"uplink\"} 17",
        "servicegate_drops_total{reason=\"no_service\"} 4",
        "servicegate_conntrack_entries{worker=\"0\"} 1",
        "servicegate_conntrack_capacity{worker=\"1\"} 4096",
        "servicegate_worker_stalled_seconds{worker=\"1\"}",
        "servicegate_conntrack_inserts_total{worker=\"0\"} 9",
        "servicegate_conntrack_evictions_total{worker=\"0\"} 0",
        "servicegate_conntrack_expirations_total{worker=\"0\"} 0",
        "servicegate_conntrack_full_total{worker=\"1\"} 0",
        "servicegate_snapshot_generation 7",
        "servicegate_sync_latency_seconds 0.0125",
        "servicegate_worker_busy_ratio{worker=\"0\"}",
        "servicegate_handoffs_total{worker=\"0\",direction=\"out\"} 3",
        "servicegate_burst_latency_seconds_bucket{le=\"+Inf\"} 4",
        "servicegate_burst_latency_seconds_count 4",
        "servicegate_burst_latency_quantile_seconds{quantile=\"0.99\"}",
        "servicegate_backend_info{service=\"default/web\",port=\"http\",protocol=\"TCP\",backend=\"10.244.1.5:8080\",state=\"ready\"",
    ] {
        assert!(body.contains(name), "missing {name:?} in\n{body}");
    }
    // Buckets are cumulative: 2, 3 and 5 µs are below 10 µs, 40 µs is not.
    let bucket = body
        .lines()
        .find(|l| {
            l.starts_with("servicegate_burst_latency_seconds_bucket{")
                && l.split('"')
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
                    .is_some_and(|v| (v - 1e-5).abs() < 1e-12)
        })
        .expect("10 µs bucket");
    assert!(bucket.ends_with(" 3"), "{bucket}");
    // Per-queue series exist for the queues each port has, and no others.
    for family in [
        "servicegate_port_queue_rx_packets_total",
        "servicegate_port_queue_rx_bytes_total",
        "servicegate_port_queue_tx_packets_total",
        "servicegate_port_queue_tx_bytes_total",
    ] {
        let series: Vec<&str> = body
            .lines()
            .filter(|l| l.starts_with(&format!("{family}{{")))
            .collect();
        assert_eq!(
            series.len(),
            4,
            "2 ports x 2 queues of {family}: {series:?}"
        );
        assert!(
            series.iter().all(|l| !l.contains("queue=\"2\"")),
            "{series:?}"
        );
    }
    // Every drop reason is exported, with its help text.
    for reason in DropReason::ALL {
        let line = format!("servicegate_drops_total{{reason=\"{}\"}}", reason.as_str());
        assert!(body.contains(&line), "missing {line}");
        assert!(
            body.contains(reason.help()),
            "missing help of {}",
            reason.as_str()
        );
    }
    // Per-frontend packets: only workers on the current generation count.
    let line = body
        .lines()
        .find(|l| {
            l.starts_with("servicegate_service_packets_total{") && l.contains("kind=\"ClusterIP\"")
        })
        .expect("service packets");
    assert!(line.contains("service=\"default/web\""), "{line}");
    assert!(line.contains("frontend=\"10.96.0.10:80/TCP\""), "{line}");
    assert!(line.ends_with(" 100"), "{line}");
    // Per-backend packets: summed over the port's frontends (ClusterIP 60 + NodePort 15).
    for (backend, n) in [
        ("10.244.1.5:8080", 75),
        ("10.244.1.6:8080", 35),
        ("10.244.2.7:8080", 10),
        ("10.244.2.8:8443", 3),
    ] {
        let line = format!("servicegate_backend_packets_total{{service=\"{}\",port=\"{}\",protocol=\"TCP\",backend=\"{backend}\"}} {n}",
            if n == 3 { "shop/checkout" } else { "default/web" },
            if n == 3 { "https" } else { "http" });
        assert!(body.contains(&line), "missing {line:?} in\n{body}");
    }
}

#[tokio::test]
async fn conntrack_rows_from_every_worker() {
    let h = start().await;
    let v = get_json(&h, "/v1/conntrack?limit=10").await;
    assert_eq!(v["count"], 1);
    assert_eq!(v["incomplete"].as_array().unwrap().len(), 0);
    let e = &v["entries"][0];
    assert_eq!(e["worker"], 0);
    assert_eq!(e["original"], "tcp 10.0.0.5:41000 -> 10.96.0.10:80");
    assert_eq!(e["reply"], "tcp 10.244.1.6:8080 -> 10.0.0.5:41000");
    assert_eq!(e["service"], "default/web:http/TCP");
    assert_eq!(e["backend"], "10.244.1.6:8080");
    assert_eq!(e["snat"], Value::Null);
    assert_eq!(e["state"], "ESTABLISHED");
    assert_eq!(e["expires_in_ms"], 431_000);

    let v = get_json(&h, "/v1/conntrack?service=shop/checkout").await;
    assert_eq!(v["count"], 0);
    let v = get_json(&h, "/v1/conntrack?service=default%2Fweb").await;
    assert_eq!(v["count"], 1);
    let (status, body) = get(&h, "/v1/conntrack?service=nope/nope").await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = get(&h, "/v1/conntrack?limit=lots").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("limit"), "{body}");
}

fn steps(v: &Value) -> Vec<(String, String)> {
    v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["rule"].as_str().unwrap().to_string(),
                s["decision"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[tokio::test]
async fn trace_cluster_ip_new_flow() {
    let h = start().await;
    let flow = "tcp 10.0.0.5:41001 -> 10.96.0.10:80";
    let v = get_json(&h, &trace_path(flow)).await;
    assert_eq!(v["flow"], flow);
    assert_eq!(v["verdict"], "forward");
    assert_eq!(v["service"], "default/web:http/TCP");
    assert_eq!(v["endpoints"].as_array().unwrap().len(), 3);
    // The pick is what the dataplane's Maglev table gives for the pipeline's hash.
    let key = FlowKey::new(PROTO_TCP, ip("10.0.0.5"), 41001, ip("10.96.0.10"), 80);
    let s = snapshot();
    let f = s.match_frontend(key.dst, Protocol::Tcp, 80).unwrap();
    let b = f.backends.pick(flow_hash(&key)).unwrap();
    let expected = format!("{}:{}", b.addr, b.port);
    assert_eq!(v["maglev"]["backend"], expected);
    assert_eq!(v["maglev"]["table_size"], 251);
    assert_eq!(v["maglev"]["slot"], flow_hash(&key) % 251);
    assert_eq!(
        v["translation"]["to"],
        format!("tcp 10.0.0.5:41001 -> {expected}")
    );
    assert_eq!(v["snat"]["masquerade"], false);
    // The backend is a pod behind node-a's or node-b's VTEP, both on the cluster subnet:
    // the VTEP itself is the next hop.
    let vtep = if b.addr.octets()[2] == 1 {
        "192.168.1.21"
    } else {
        "192.168.1.22"
    };
    assert_eq!(v["egress"]["via"], "vxlan");
    assert_eq!(v["egress"]["port"], "cluster");
    assert_eq!(v["egress"]["next_hop"], vtep);
    assert_eq!(v["egress"]["vtep"], vtep);
    assert_eq!(v["egress"]["route"], "192.168.1.0/24");
    let rules: Vec<String> = steps(&v).into_iter().map(|(r, _)| r).collect();
    assert_eq!(
        rules,
        [
            "conntrack",
            "service",
            "endpoints",
            "maglev",
            "session_affinity",
            "snat",
            "translation",
            "egress"
        ]
    );
}

#[tokio::test]
async fn trace_conntrack_hit_both_directions() {
    let h = start().await;
    let v = get_json(&h, &trace_path("tcp 10.0.0.5:41000 -> 10.96.0.10:80")).await;
    assert_eq!(steps(&v)[0], ("conntrack".to_string(), "hit".to_string()));
    assert_eq!(v["conntrack"]["direction"], "original");
    assert_eq!(v["conntrack"]["state"], "ESTABLISHED");
    assert_eq!(
        v["translation"]["to"],
        "tcp 10.0.0.5:41000 -> 10.244.1.6:8080"
    );
    let v = get_json(&h, &trace_path("tcp 10.244.1.6:8080 -> 10.0.0.5:41000")).await;
    assert_eq!(v["conntrack"]["direction"], "reply");
    assert_eq!(
        v["translation"]["to"],
        "tcp 10.96.0.10:80 -> 10.0.0.5:41000"
    );
}

#[tokio::test]
async fn trace_node_port_masquerades() {
    let h = start().await;
    let v = get_json(
        &h,
        &trace_path("tcp 198.51.100.7:50000 -> 192.168.1.10:30080"),
    )
    .await;
    assert_eq!(v["verdict"], "forward");
    assert_eq!(v["frontend"]["kind"], "NodePort");
    assert_eq!(v["snat"]["masquerade"], true);
    assert_eq!(v["snat"]["client_address_preserved"], false);
    let to = v["translation"]["to"].as_str().unwrap();
    assert!(
        to.starts_with("tcp <snat-address>:<snat-port> -> 10.244."),
        "{to}"
    );
    assert!(steps(&v).contains(&("snat".to_string(), "masquerade".to_string())));
}

#[tokio::test]
async fn trace_load_balancer_source_ranges_and_affinity() {
    let h = start().await;
    let v = get_json(
        &h,
        &trace_path("tcp 198.51.100.7:50000 -> 203.0.113.10:443"),
    )
    .await;
    assert_eq!(v["verdict"], "forward");
    assert_eq!(
        v["backend"]["address"], "10.244.2.8",
        "the not-serving one is never picked"
    );
    assert_eq!(v["snat"]["client_address_preserved"], true);
    assert_eq!(v["affinity"]["predictable"], false);
    // With ClientIP affinity the pick hashes the client address alone, as the pipeline does.
    assert_eq!(v["maglev"]["hash_of"], "client address");
    let all = steps(&v);
    assert!(all.contains(&("source_ranges".to_string(), "allow".to_string())));
    assert!(all.contains(&("session_affinity".to_string(), "maybe".to_string())));
    assert!(all.contains(&("snat".to_string(), "keep-source".to_string())));

    let v = get_json(&h, &trace_path("tcp 192.0.2.1:50000 -> 203.0.113.10:443")).await;
    assert_eq!(v["verdict"], "drop");
    assert_eq!(v["drop_reason"], "source_range");
}

/// A backend reaching its own Service, picked for itself: masqueraded whatever the policy
/// (kube-semantics item 19), and the trace says why.
#[tokio::test]
async fn trace_names_a_hairpin() {
    let h = start().await;
    let s = snapshot();
    let f = s
        .match_frontend(ip("10.96.0.10"), Protocol::Tcp, 80)
        .unwrap();
    assert!(!f.masquerade);
    let sport = (40000..41000u16)
        .find(|&port| {
            let key = FlowKey::new(PROTO_TCP, ip("10.244.1.5"), port, ip("10.96.0.10"), 80);
            f.backends.pick(flow_hash(&key)).unwrap().addr == ip("10.244.1.5")
        })
        .expect("some port picks the client itself");
    let v = get_json(
        &h,
        &trace_path(&format!("tcp 10.244.1.5:{sport} -> 10.96.0.10:80")),
    )
    .await;
    assert_eq!(v["backend"]["address"], "10.244.1.5");
    assert_eq!(v["snat"]["hairpin"], true);
    assert_eq!(v["snat"]["masquerade"], true);
    assert_eq!(v["snat"]["client_address_preserved"], false);
    assert!(steps(&v).contains(&("snat".to_string(), "hairpin".to_string())));
    assert_eq!(
        v["translation"]["to"],
        "tcp <snat-address>:<snat-port> -> 10.244.1.5:8080"
    );
}

#[tokio::test]
async fn trace_rejects_unknown_port_and_routes_the_rest() {
    let h = start().await;
    let v = get_json(&h, &trace_path("tcp 10.0.0.5:41000 -> 10.96.0.10:81")).await;
    assert_eq!(v["verdict"], "reject");
    assert_eq!(v["drop_reason"], "no_service");
    let detail = v["steps"][1]["detail"].as_str().unwrap();
    assert!(detail.contains("ICMP port-unreachable"), "{detail}");

    let v = get_json(&h, &trace_path("udp 10.0.0.5:41000 -> 10.96.3.3:53")).await;
    assert_eq!(v["verdict"], "drop");
    let v = get_json(&h, &trace_path("tcp 10.0.0.5:41000 -> 10.244.2.8:8443")).await;
    assert_eq!(v["verdict"], "routed");
    assert_eq!(v["egress"]["node"], "node-b");
    assert_eq!(v["egress"]["port"], "cluster");
    assert_eq!(v["egress"]["next_hop"], "192.168.1.22");
}

/// The egress names the config's port and the next hop, computed with the pipeline's
/// route table.
#[tokio::test]
async fn trace_names_egress_port_and_next_hop() {
    let h = start().await;
    let egress = |v: &Value| {
        (
            v["egress"]["via"].clone(),
            v["egress"]["port"].clone(),
            v["egress"]["next_hop"].clone(),
        )
    };
    // A pod behind a VTEP in another underlay subnet: the router toward the VTEP.
    let v = get_json(&h, &trace_path("tcp 10.0.0.5:41000 -> 10.244.3.7:80")).await;
    assert_eq!(v["verdict"], "routed");
    assert_eq!(
        egress(&v),
        ("vxlan".into(), "cluster".into(), "192.168.1.1".into())
    );
    assert_eq!(v["egress"]["vtep"], "172.20.0.23");
    assert_eq!(v["egress"]["node"], "node-c");
    assert_eq!(v["egress"]["route"], "172.20.0.0/16");
    let last = v["steps"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["rule"], "egress");
    let detail = last["detail"].as_str().unwrap();
    assert!(
        detail.contains("out of port cluster, next hop 192.168.1.1"),
        "{detail}"
    );

    // A routed pod (no VXLAN for its CIDR): the route's gateway.
    let v = get_json(&h, &trace_path("tcp 10.0.0.5:41000 -> 10.244.9.7:80")).await;
    assert_eq!(v["verdict"], "routed");
    assert_eq!(
        egress(&v),
        ("route".into(), "cluster".into(), "192.168.1.30".into())
    );
    assert_eq!(v["egress"]["route"], "10.244.9.0/24");

    // A destination on a connected subnet is its own next hop; here the reply of the
    // held flow, back to the client.
    let v = get_json(&h, &trace_path("tcp 10.244.1.6:8080 -> 10.0.0.5:41000")).await;
    assert_eq!(v["conntrack"]["direction"], "reply");
    assert_eq!(
        egress(&v),
        ("route".into(), "uplink".into(), "10.0.0.5".into())
    );
    assert_eq!(v["egress"]["route"], "10.0.0.0/24");

    // No route: said plainly, and dropped as the pipeline drops it.
    let v = get_json(&h, &trace_path("tcp 10.0.0.5:41000 -> 172.31.0.1:80")).await;
    assert_eq!(v["verdict"], "drop");
    assert_eq!(v["drop_reason"], "no_route");
    assert_eq!(egress(&v), ("no-route".into(), Value::Null, Value::Null));
    let detail = v["egress"]["detail"].as_str().unwrap();
    assert!(detail.contains("no route to 172.31.0.1"), "{detail}");

    // A pod whose node's VTEP no route reaches.
    let v = get_json(&h, &trace_path("tcp 10.0.0.5:41000 -> 10.244.4.7:80")).await;
    assert_eq!(v["verdict"], "drop");
    assert_eq!(v["drop_reason"], "no_route");
    assert_eq!(v["egress"]["port"], Value::Null);
    let detail = v["egress"]["detail"].as_str().unwrap();
    assert!(
        detail.contains("behind VTEP 203.0.113.200, but no route reaches the VTEP"),
        "{detail}"
    );
}

/// Without VXLAN (routed mode) pod CIDRs are not encapsulated: a service's pod backend
/// leaves by its route, as the pipeline sends it.
#[test]
fn trace_in_routed_mode_follows_the_routes() {
    let mut s = snapshot();
    // A routed-mode snapshot has no pod CIDRs behind VTEPs; the backends of default/web
    // are then reached by routes: 10.244.1.0/24 has none here, 10.244.9.0/24 has one.
    s.pod_routes.clear();
    let routed = routing(false);
    let flow = FlowKey::new(PROTO_TCP, ip("10.0.0.5"), 41000, ip("10.244.9.7"), 80);
    let v = admin::explain(&s, &routed, &flow, flow_hash, None, &[]);
    assert_eq!(v["verdict"], "routed");
    assert_eq!(v["egress"]["via"], "route");
    assert_eq!(v["egress"]["port"], "cluster");
    assert_eq!(v["egress"]["next_hop"], "192.168.1.30");

    // The same pod CIDRs as the VXLAN harness, but VXLAN off: not encapsulated, and
    // 10.244.1.6 has no route.
    let with_pods = snapshot();
    let flow = FlowKey::new(PROTO_TCP, ip("10.0.0.5"), 41000, ip("10.244.1.6"), 8080);
    let v = admin::explain(&with_pods, &routed, &flow, flow_hash, None, &[]);
    assert_eq!(v["verdict"], "drop");
    assert_eq!(v["drop_reason"], "no_route");
    assert_eq!(v["egress"]["via"], "no-route");
    let v = admin::explain(&with_pods, &routing(true), &flow, flow_hash, None, &[]);
    assert_eq!(v["egress"]["via"], "vxlan");
    assert_eq!(v["egress"]["next_hop"], "192.168.1.21");
}

#[tokio::test]
async fn trace_malformed_flow_is_400() {
    let h = start().await;
    for bad in [
        "tcp 10.0.0.5 -> 10.96.0.10:80",
        "gre 10.0.0.5:1 -> 10.96.0.10:80",
        "tcp 10.0.0.5:41000 10.96.0.10:80",
        "tcp 10.0.0.300:1 -> 10.96.0.10:80",
        "tcp 10.0.0.5:70000 -> 10.96.0.10:80",
    ] {
        let (status, body) = get(&h, &trace_path(bad)).await;
        assert_eq!(status, 400, "{bad}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        let reason = v["error"].as_str().unwrap();
        assert!(!reason.contains('\n'), "{reason}");
    }
    let (status, _) = get(&h, "/v1/trace").await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn ctl_prints_tables_and_explanations() {
    let h = start().await;
    let addr = h.addr.to_string();
    let out = tokio::task::spawn_blocking(move || {
        let services = ctl::render(&addr, &CtlCommand::Services, false).unwrap();
        let conntrack = ctl::render(
            &addr,
            &CtlCommand::Conntrack {
                limit: Some(5),
                service: Some("default/web".into()),
            },
            false,
        )
        .unwrap();
        let trace = ctl::render(
            &addr,
            &CtlCommand::Trace {
                flow: "tcp 10.0.0.5:41001 -> 10.96.0.10:80".into(),
            },
            false,
        )
        .unwrap();
        let routed = ctl::render(
            &addr,
            &CtlCommand::Trace {
                flow: "tcp 10.0.0.5:41000 -> 10.244.9.7:80".into(),
            },
            false,
        )
        .unwrap();
        let unroutable = ctl::render(
            &addr,
            &CtlCommand::Trace {
                flow: "tcp 10.0.0.5:41000 -> 172.31.0.1:80".into(),
            },
            false,
        )
        .unwrap();
        let json = ctl::render(&addr, &CtlCommand::Services, true).unwrap();
        ctl::run(&addr, CtlCommand::Services, false).unwrap();
        (services, conntrack, (trace, routed, unroutable), json)
    })
    .await
    .unwrap();
    let (services, conntrack, (trace, routed, unroutable), json) = out;
    assert!(services.starts_with("SERVICE "), "{services}");
    assert!(services.contains("default/web"), "{services}");
    assert!(services.contains("shop/checkout"), "{services}");
    assert!(services.contains("10.96.0.10:80"), "{services}");
    assert!(
        conntrack.contains("tcp 10.0.0.5:41000 -> 10.96.0.10:80"),
        "{conntrack}"
    );
    assert!(conntrack.contains("ESTABLISHED"), "{conntrack}");
    assert!(trace.contains("verdict  FORWARD"), "{trace}");
    assert!(trace.contains("maglev"), "{trace}");
    // The egress line: the backend's pod is behind node-a's or node-b's VTEP.
    let egress = trace
        .lines()
        .find(|l| l.starts_with("egress   "))
        .unwrap_or_else(|| panic!("no egress line: {trace}"));
    assert!(
        egress.starts_with("egress   port cluster, next hop 192.168.1.2")
            && egress.contains("VXLAN VNI 1 to VTEP 192.168.1.2"),
        "{egress}"
    );
    assert!(
        routed.contains("egress   port cluster, next hop 192.168.1.30 (route 10.244.9.0/24)"),
        "{routed}"
    );
    assert!(
        unroutable.contains("verdict  DROP (no_route)")
            && unroutable.contains("egress   none: no route to 172.31.0.1"),
        "{unroutable}"
    );
    let v: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["frontends"].as_array().unwrap().len(), 3);
}

#[test]
fn ctl_reports_an_unreachable_gateway() {
    // Bind then drop: a port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let err = ctl::run(&addr, CtlCommand::Services, false).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("cannot reach the admin API at {addr}: is servicegate running?")
    );
}

/// GET `path` with an `Accept` header (or none); returns the content type and the body.
async fn get_accepting(h: &Harness, path: &str, accept: Option<&str>) -> (String, String) {
    use std::io::{Read, Write};
    let addr = h.addr;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{}Connection: close\r\n\r\n",
        accept.map_or(String::new(), |a| format!("Accept: {a}\r\n"))
    );
    tokio::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream.write_all(request.as_bytes()).unwrap();
        let mut raw = String::new();
        stream.read_to_string(&mut raw).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let content_type = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-type: ")
                    .map(str::to_string)
            })
            .unwrap();
        // axum answers a known length, not chunks.
        (content_type, body.to_string())
    })
    .await
    .unwrap()
}

/// `promtool check metrics` (Debian's `prometheus` package) on `text`: its lint must be
/// silent.
fn promtool_check_metrics(text: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (apt-get install prometheus; .ci/install-deps does)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

const PROMETHEUS_2_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

#[tokio::test]
async fn metrics_answer_in_the_format_the_client_asks_for_and_pass_promtool() {
    let h = start().await;
    // Prometheus 2.x prefers OpenMetrics.
    let (content_type, openmetrics) =
        get_accepting(&h, "/metrics", Some(PROMETHEUS_2_ACCEPT)).await;
    assert!(
        content_type.starts_with("application/openmetrics-text; version=1.0.0"),
        "{content_type}"
    );
    assert!(openmetrics.ends_with("# EOF\n"), "{openmetrics}");
    assert!(openmetrics.contains("# TYPE servicegate_drops counter\n"));
    assert!(openmetrics.contains("# TYPE servicegate_burst_latency_quantile_seconds summary\n"));
    check_exposition(&openmetrics);
    // curl without Accept, `*/*`, and a client asking for 0.0.4 get the classic format.
    for accept in [
        None,
        Some("*/*"),
        Some("text/plain;version=0.0.4;q=1,*/*;q=0.1"),
    ] {
        let (content_type, text) = get_accepting(&h, "/metrics", accept).await;
        assert_eq!(
            content_type, "text/plain; version=0.0.4; charset=utf-8",
            "{accept:?}"
        );
        assert!(!text.contains("# EOF"), "{text}");
        assert!(text.contains("# TYPE servicegate_drops_total counter\n"));
        assert!(text.contains("servicegate_drops_total{reason=\"no_service\"} 4\n"));
        check_exposition(&text);
        promtool_check_metrics(&text);
    }
    // The two carry the same samples.
    let samples = |body: &str| -> Vec<String> {
        let mut v: Vec<String> = body
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| l.rsplit_once(' ').unwrap().0.to_string())
            .collect();
        v.sort();
        v
    };
    let (_, text) = get_accepting(&h, "/metrics", None).await;
    assert_eq!(samples(&openmetrics), samples(&text));
}
