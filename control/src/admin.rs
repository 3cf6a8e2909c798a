//! The admin HTTP API (default `127.0.0.1:9900`): health, readiness, Prometheus metrics,
//! and the JSON views `ctl` prints (`/v1/services`, `/v1/conntrack`, `/v1/trace`).
//!
//! Nothing here touches the packet path: counters are read from each worker's published
//! `StatsCell` (one short lock per worker per scrape), conntrack is asked of the owning
//! workers through their request queues (answered between bursts, waited for at most
//! [`WORKER_REPLY_TIMEOUT`]), and everything else comes from the current snapshot.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use dataplane::conntrack::{Direction, FlowKey, PROTO_ICMP, PROTO_SCTP, PROTO_TCP, PROTO_UDP};
use dataplane::dpdk::{PortStats, QUEUE_STAT_COUNTERS};
use dataplane::pipeline::decide::{self, Masquerade, NewConnection, TrackedFlow, Unframed};
use dataplane::pipeline::edge::{BadSource, EdgePolicy, EdgePort};
use dataplane::pipeline::route::{PodRoutes, RouteTable};
use dataplane::pipeline::PortRole;
use dataplane::snapshot::{
    Backend, BackendSet, EndpointState, Frontend, FrontendKind, InternalPolicy, Protocol, Snapshot,
};
use dataplane::stats::{DropReason, WorkerStats, MAX_PORTS};
use dataplane::worker::{ConntrackRow, Request, WorkerShared};
use ipnet::Ipv4Net;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::exposition::Format;

/// How long a worker may take to answer a conntrack request.
pub const WORKER_REPLY_TIMEOUT: Duration = Duration::from_secs(1);
/// A worker whose published cycle counter has not moved for this long is reported stuck.
pub const STUCK_AFTER: Duration = Duration::from_secs(2);
/// Default and maximum `?limit=` of `/v1/conntrack`.
pub const DEFAULT_CONNTRACK_LIMIT: usize = 1000;
pub const MAX_CONNTRACK_LIMIT: usize = 100_000;

/// A driver counter exported per port: metric name, help, accessor.
type DriverCounter = (&'static str, &'static str, fn(&PortStats) -> u64);
/// A driver counter exported per (port, queue): metric name, help, the per-queue values,
/// how many queues of that direction the port has.
type DriverQueueCounter = (
    &'static str,
    &'static str,
    fn(&PortStats) -> &[u64; QUEUE_STAT_COUNTERS],
    fn(&PortInfo) -> u16,
);

/// A configured port, as the metrics and `ctl` name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortInfo {
    /// Name from the config (the `port` label).
    pub name: String,
    /// DPDK port id (index of the per-port counters).
    pub id: u16,
    /// What the port is for (e.g. `uplink`, `cluster`, `exception`).
    pub role: String,
    /// Receive queues.
    pub queues: u16,
    /// The EAL device name (`net_tap0`, a PCI address): what a capture attaches to.
    pub device: String,
    /// Transmit queues (one per worker: a worker's tx queue is its index).
    pub tx_queues: u16,
}

/// What `trace` needs to name where a packet leaves: the route table the pipeline builds
/// from the same config, with the ports' names.
#[derive(Clone, Debug, Default)]
pub struct Routing {
    pub table: RouteTable,
    /// The config's port names, indexed like the table's ports.
    pub port_names: Vec<String>,
    /// Whether VXLAN is configured: only then are pod CIDRs encapsulated (as in the
    /// pipeline).
    pub vxlan: bool,
    /// The ports' roles, indexed like the table's ports.
    pub port_roles: Vec<PortRole>,
    /// The edge policy the pipeline applies to uplinks, from the same config.
    pub edge: EdgePolicy,
    /// Each port's addresses (indexed like the table's ports): traffic for them is the
    /// gateway's own.
    pub addresses: Vec<Vec<Ipv4Net>>,
    /// Whether each port has an exception port toward the kernel.
    pub exception: Vec<bool>,
}

impl Routing {
    /// The routes of `config` as the pipeline holds them: its static routes, then every
    /// port's connected subnets (ports are the config's, in order).
    pub fn from_config(config: &crate::config::Config) -> Routing {
        // Validation rejects a route naming an unknown port, so none is skipped here.
        let statics = config
            .routes
            .iter()
            .filter_map(|r| Some((r.prefix, r.via, config.port_index(&r.port)?)));
        let connected = config
            .ports
            .iter()
            .enumerate()
            .flat_map(|(i, p)| p.addresses.iter().map(move |&net| (net, i)));
        let port_roles: Vec<PortRole> = config
            .ports
            .iter()
            .map(|p| match p.role {
                crate::config::PortRole::Uplink => PortRole::Uplink,
                crate::config::PortRole::Cluster => PortRole::Cluster,
            })
            .collect();
        let edge_ports: Vec<EdgePort<'_>> = config
            .ports
            .iter()
            .zip(&port_roles)
            .map(|(p, &role)| EdgePort {
                role,
                addresses: &p.addresses,
            })
            .collect();
        let edge_routes: Vec<_> = config
            .routes
            .iter()
            .filter_map(|r| Some((r.prefix, config.port_index(&r.port)?)))
            .collect();
        let edge = EdgePolicy::new(
            &edge_ports,
            &edge_routes,
            &config.snat_addresses(),
            &config.edge.routable_prefixes,
        );
        Routing {
            table: RouteTable::new(statics, connected),
            port_names: config.ports.iter().map(|p| p.name.clone()).collect(),
            vxlan: config.vxlan.is_some(),
            port_roles,
            edge,
            addresses: config.ports.iter().map(|p| p.addresses.clone()).collect(),
            exception: config.ports.iter().map(|p| p.exception.is_some()).collect(),
        }
    }

    /// The port a packet from `src` arrives on, as `rp_filter` sees it: the one the route
    /// toward `src` leaves through (pod CIDRs first, as the pipeline routes), with its name.
    fn arrival_of(&self, snapshot: &Snapshot, src: Ipv4Addr) -> Option<(PortRole, String)> {
        let pods = self.vxlan.then(|| PodRoutes::new(&snapshot.pod_routes));
        let hop = self.table.hop(src, pods.as_ref())?;
        let role = *self.port_roles.get(hop.port)?;
        let name = self.port_names.get(hop.port).cloned().unwrap_or_default();
        Some((role, name))
    }

    /// Whether the pipeline takes `dst` for the gateway itself: an owned address, a
    /// broadcast or multicast address, or a port subnet's broadcast address.
    fn is_local(&self, dst: Ipv4Addr) -> bool {
        dst.is_broadcast()
            || dst.is_multicast()
            || self
                .addresses
                .iter()
                .flatten()
                .any(|n| n.addr() == dst || (n.prefix_len() < 31 && n.broadcast() == dst))
    }

    fn owns(&self, dst: Ipv4Addr) -> bool {
        self.addresses.iter().flatten().any(|n| n.addr() == dst)
    }
}

/// What the control side last did to the service tables.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SyncInfo {
    /// Compile + publish latency of the last snapshot, seconds.
    pub last_sync_seconds: f64,
    /// `kubernetes` or `files` (and whatever detail the source gives).
    pub source: String,
    /// Objects the compiler skipped or served partially, one line each.
    pub warnings: Vec<String>,
    /// Services in the last snapshot.
    pub services: usize,
    /// What the source could not use in the last sync (files source: bad documents).
    pub source_problems: Vec<crate::model::SourceProblem>,
    /// Config reloads (SIGHUP) applied and refused.
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    /// What the last reload did, one line (`refused: gateway.yaml: routes[0].via: …`).
    pub last_reload: Option<String>,
}

/// Driver counters of every port, by port name.
pub type PortStatsFn = Box<dyn Fn() -> Vec<(String, PortStats)> + Send + Sync>;
/// (mbufs in use, mbufs available) of each packet pool, by pool name.
pub type MempoolsFn = Box<dyn Fn() -> Vec<(String, u32, u32)> + Send + Sync>;

/// The EAL settings a secondary process must share with the gateway.
#[derive(Clone, Debug, Default)]
pub struct EalInfo {
    pub file_prefix: String,
    /// Whether the gateway's memory is in hugepages, which secondaries map (with
    /// `--no-huge` it is private to the gateway and no capture can attach).
    pub hugepages: bool,
    pub no_pci: bool,
}

/// Everything the admin API reads.
pub struct AdminState {
    pub snapshot: Arc<ArcSwap<Snapshot>>,
    pub workers: Arc<[WorkerShared]>,
    pub ports: Vec<PortInfo>,
    /// Driver counters (`rte_eth_stats`), read on each scrape.
    pub port_stats: PortStatsFn,
    /// The packet pools' occupancy, read on each scrape.
    pub mempools: MempoolsFn,
    /// How a DPDK secondary process (`ctl capture`, `dpdk-dumpcap`) joins this gateway.
    pub eal: EalInfo,
    /// Set once the first complete snapshot is installed.
    pub ready: Arc<AtomicBool>,
    pub sync: Arc<parking_lot::Mutex<SyncInfo>>,
    /// The pipeline's flow hash (what Maglev is indexed with), for `trace`.
    pub flow_hash: fn(&FlowKey) -> u64,
    /// The route table, for `trace`'s egress port and next hop (a config reload swaps it).
    pub routing: arc_swap::ArcSwap<Routing>,
    pub tsc_hz: u64,
    /// Conntrack entries each worker's table holds (`conntrack.capacity`).
    pub conntrack_capacity: u64,
    /// Per-service and per-backend packet totals (the publisher registers snapshots).
    pub packets: Arc<parking_lot::Mutex<crate::packets::PacketTotals>>,
    /// Readiness (workers polling, links up, draining) and announcements; without it
    /// `/readyz` follows `ready` alone.
    pub announce: Option<Arc<crate::announce::Announcer>>,
}

/// Per-worker liveness: the last `total_cycles` seen and when it last moved.
#[derive(Clone, Copy)]
struct Progress {
    total_cycles: u64,
    bursts: u64,
    changed_at: Instant,
}

struct App {
    state: Arc<AdminState>,
    progress: parking_lot::Mutex<Vec<Option<Progress>>>,
}

impl App {
    /// Samples every worker's published counters; returns, per worker, how long its
    /// counters have not moved (about zero while it polls).
    fn sample_idle(&self) -> Vec<Duration> {
        let now = Instant::now();
        let mut progress = self.progress.lock();
        progress.resize(self.state.workers.len(), None);
        let mut idle = Vec::with_capacity(self.state.workers.len());
        for (i, worker) in self.state.workers.iter().enumerate() {
            let (total_cycles, bursts) = {
                let s = worker.stats.lock();
                (s.total_cycles, s.bursts)
            };
            let entry = progress[i].get_or_insert(Progress {
                total_cycles,
                bursts,
                changed_at: now,
            });
            if entry.total_cycles != total_cycles || entry.bursts != bursts {
                *entry = Progress {
                    total_cycles,
                    bursts,
                    changed_at: now,
                };
            }
            idle.push(now.duration_since(entry.changed_at));
        }
        idle
    }

    /// The workers stuck for longer than [`STUCK_AFTER`], with how long they have been.
    fn sample_progress(&self) -> Vec<(usize, Duration)> {
        self.sample_idle()
            .into_iter()
            .enumerate()
            .filter(|(_, idle)| *idle > STUCK_AFTER)
            .collect()
    }
}

/// The admin API's routes.
pub fn router(state: Arc<AdminState>) -> Router {
    let app = Arc::new(App {
        progress: parking_lot::Mutex::new(vec![None; state.workers.len()]),
        state,
    });
    router_for(app)
}

fn router_for(app: Arc<App>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/services", get(services))
        .route("/v1/conntrack", get(conntrack))
        .route("/v1/trace", get(trace))
        .route("/v1/announcements", get(announcements))
        .route("/v1/ports", get(ports))
        .with_state(app)
}

/// Serves the admin API on `listener` until the task is dropped; samples worker progress
/// every 500 ms so `/healthz` notices a stuck worker even when probed rarely.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AdminState>,
) -> anyhow::Result<()> {
    let app = Arc::new(App {
        progress: parking_lot::Mutex::new(vec![None; state.workers.len()]),
        state,
    });
    let sampler = {
        let app = Arc::clone(&app);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                app.sample_progress();
            }
        })
    };
    let result = axum::serve(listener, router_for(app)).await;
    sampler.abort();
    result.map_err(anyhow::Error::from)
}

fn text(status: StatusCode, body: impl Into<String>) -> Response {
    let mut body = body.into();
    if !body.ends_with('\n') {
        body.push('\n');
    }
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

fn bad_request(reason: impl std::fmt::Display) -> Response {
    let reason = reason.to_string();
    (StatusCode::BAD_REQUEST, Json(json!({ "error": reason }))).into_response()
}

async fn healthz(State(app): State<Arc<App>>) -> Response {
    let stuck = app.sample_progress();
    if stuck.is_empty() {
        return text(StatusCode::OK, "ok");
    }
    let list: Vec<String> = stuck
        .iter()
        .map(|(w, idle)| format!("worker {w} has not polled for {:.1}s", idle.as_secs_f64()))
        .collect();
    text(StatusCode::SERVICE_UNAVAILABLE, list.join("; "))
}

async fn readyz(State(app): State<Arc<App>>) -> Response {
    if let Some(announcer) = &app.state.announce {
        let readiness = announcer.readiness();
        if !readiness.ready {
            let reasons = if readiness.reasons.is_empty() {
                "not evaluated yet".to_string()
            } else {
                readiness.summary()
            };
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {reasons}"),
            );
        }
    }
    if app.state.ready.load(Ordering::Acquire) {
        let generation = app.state.snapshot.load().generation;
        text(
            StatusCode::OK,
            format!("ok (snapshot generation {generation})"),
        )
    } else {
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: no complete service snapshot installed yet",
        )
    }
}

// ---------------------------------------------------------------------------------------
// Metrics

type Labels = Vec<(String, String)>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
        .collect()
}

/// A histogram handed to the encoder as already-bucketed values (from the summed
/// hdrhistogram of the workers).
#[derive(Debug)]
struct PrebucketedHistogram {
    sum: f64,
    count: u64,
    /// (upper bound, cumulative count), ending with +Inf.
    buckets: Vec<(f64, u64)>,
}

impl EncodeMetric for PrebucketedHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_histogram::<NoLabelSet>(self.sum, self.count, &self.buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// Upper bounds of the burst latency histogram, in nanoseconds.
const LATENCY_BUCKETS_NS: &[u64] = &[
    1_000,
    2_000,
    5_000,
    10_000,
    20_000,
    50_000,
    100_000,
    200_000,
    500_000,
    1_000_000,
    5_000_000,
    10_000_000,
    100_000_000,
];

fn counter_family() -> Family<Labels, Counter> {
    Family::default()
}

/// A gauge holding `value`, to register once.
fn gauge_of(value: i64) -> Gauge {
    let gauge = Gauge::default();
    gauge.set(value);
    gauge
}

fn gauge_family() -> Family<Labels, Gauge> {
    Family::default()
}

fn fgauge_family() -> Family<Labels, Gauge<f64, AtomicU64>> {
    Family::default()
}

pub(crate) fn service_label(f: &Frontend) -> String {
    format!("{}/{}", f.service.namespace, f.service.name)
}

pub(crate) fn frontend_label(f: &Frontend) -> String {
    match f.kind {
        FrontendKind::NodePort => format!("*:{}/{}", f.port, f.protocol),
        _ => format!("{}:{}/{}", f.addr, f.port, f.protocol),
    }
}

/// Renders the whole registry; a fresh registry per scrape (cheap at scrape rate).
fn render_metrics(state: &AdminState, worker_idle: &[Duration]) -> String {
    let snapshot = state.snapshot.load();
    let per_worker: Vec<WorkerStats> = state
        .workers
        .iter()
        .map(|w| w.stats.lock().clone())
        .collect();
    let mut total = WorkerStats::default();
    for w in &per_worker {
        total.merge(w);
    }
    let mut registry = Registry::default();

    // Per port (software counters of the workers) and per (port, worker) = queue.
    let rx_packets = counter_family();
    let rx_bytes = counter_family();
    let tx_packets = counter_family();
    let tx_bytes = counter_family();
    let q_rx = counter_family();
    let q_tx = counter_family();
    let port_info = gauge_family();
    for port in &state.ports {
        let p = usize::from(port.id);
        if p >= MAX_PORTS {
            continue;
        }
        let l = labels(&[("port", &port.name)]);
        rx_packets.get_or_create(&l).inc_by(total.rx_packets[p]);
        rx_bytes.get_or_create(&l).inc_by(total.rx_bytes[p]);
        tx_packets.get_or_create(&l).inc_by(total.tx_packets[p]);
        tx_bytes.get_or_create(&l).inc_by(total.tx_bytes[p]);
        for (w, s) in per_worker.iter().enumerate() {
            let lw = labels(&[("port", &port.name), ("worker", &w.to_string())]);
            q_rx.get_or_create(&lw).inc_by(s.rx_packets[p]);
            q_tx.get_or_create(&lw).inc_by(s.tx_packets[p]);
        }
        port_info
            .get_or_create(&labels(&[
                ("port", &port.name),
                ("id", &port.id.to_string()),
                ("role", &port.role),
                ("queues", &port.queues.to_string()),
            ]))
            .set(1);
    }
    registry.register(
        "servicegate_rx_packets",
        "Frames received, per port",
        rx_packets,
    );
    registry.register("servicegate_rx_bytes", "Bytes received, per port", rx_bytes);
    registry.register(
        "servicegate_tx_packets",
        "Frames the NIC accepted for transmission, per port",
        tx_packets,
    );
    registry.register(
        "servicegate_tx_bytes",
        "Bytes queued for transmission, per port",
        tx_bytes,
    );
    registry.register(
        "servicegate_queue_rx_packets",
        "Frames received per port by each worker (a worker owns its rx queues)",
        q_rx,
    );
    registry.register(
        "servicegate_queue_tx_packets",
        "Frames transmitted per port by each worker (tx queue = worker index)",
        q_tx,
    );
    registry.register(
        "servicegate_port_info",
        "Configured ports (always 1)",
        port_info,
    );

    // Driver counters.
    let driver: [DriverCounter; 8] = [
        (
            "servicegate_port_rx_packets",
            "Driver: frames received",
            |s| s.rx_packets,
        ),
        (
            "servicegate_port_tx_packets",
            "Driver: frames transmitted",
            |s| s.tx_packets,
        ),
        ("servicegate_port_rx_bytes", "Driver: bytes received", |s| {
            s.rx_bytes
        }),
        (
            "servicegate_port_tx_bytes",
            "Driver: bytes transmitted",
            |s| s.tx_bytes,
        ),
        (
            "servicegate_port_rx_missed",
            "Driver: frames the NIC dropped because the rx ring was full (workers too slow)",
            |s| s.rx_missed,
        ),
        (
            "servicegate_port_rx_errors",
            "Driver: erroneous frames received",
            |s| s.rx_errors,
        ),
        (
            "servicegate_port_tx_errors",
            "Driver: failed transmissions",
            |s| s.tx_errors,
        ),
        (
            "servicegate_port_rx_no_mbuf",
            "Driver: rx mbuf allocation failures (mempool too small)",
            |s| s.rx_no_mbuf,
        ),
    ];
    let in_use = gauge_family();
    let available = gauge_family();
    for (pool, used, free) in (state.mempools)() {
        let l = labels(&[("pool", &pool)]);
        in_use.get_or_create(&l).set(i64::from(used));
        available.get_or_create(&l).set(i64::from(free));
    }
    registry.register(
        "servicegate_mempool_mbufs_in_use",
        "Mbufs taken from a packet pool: in rx rings, in flight, held for reassembly (back to its idle level when traffic stops; a steady rise is a leak)",
        in_use,
    );
    registry.register(
        "servicegate_mempool_mbufs_available",
        "Mbufs left in a packet pool (near 0: rx_no_mbuf follows)",
        available,
    );
    let port_stats = (state.port_stats)();
    for (name, help, field) in driver {
        let family = counter_family();
        for (port, stats) in &port_stats {
            family
                .get_or_create(&labels(&[("port", port)]))
                .inc_by(field(stats));
        }
        registry.register(name, help, family);
    }
    let per_queue: [DriverQueueCounter; 4] = [
        (
            "servicegate_port_queue_rx_packets",
            "Driver: frames received, per rx queue (a worker owns its rx queues)",
            |s| &s.rx_queue_packets,
            |p| p.queues,
        ),
        (
            "servicegate_port_queue_rx_bytes",
            "Driver: bytes received, per rx queue",
            |s| &s.rx_queue_bytes,
            |p| p.queues,
        ),
        (
            "servicegate_port_queue_tx_packets",
            "Driver: frames transmitted, per tx queue (tx queue = worker index)",
            |s| &s.tx_queue_packets,
            |p| p.tx_queues,
        ),
        (
            "servicegate_port_queue_tx_bytes",
            "Driver: bytes transmitted, per tx queue",
            |s| &s.tx_queue_bytes,
            |p| p.tx_queues,
        ),
    ];
    for (name, help, values, queues) in per_queue {
        let family = counter_family();
        for port in &state.ports {
            let Some((_, stats)) = port_stats.iter().find(|(name, _)| *name == port.name) else {
                continue;
            };
            // DPDK keeps per-queue counters for the first QUEUE_STAT_COUNTERS queues only.
            let counted = usize::from(queues(port)).min(QUEUE_STAT_COUNTERS);
            for (queue, value) in values(stats).iter().take(counted).enumerate() {
                family
                    .get_or_create(&labels(&[
                        ("port", &port.name),
                        ("queue", &queue.to_string()),
                    ]))
                    .inc_by(*value);
            }
        }
        registry.register(name, help, family);
    }

    // Drops: every reason, always (a family may be registered once, so the help of every
    // reason goes into the one HELP line).
    let drops = counter_family();
    let mut help = String::from("Frames dropped, by reason:");
    for reason in DropReason::ALL {
        drops
            .get_or_create(&labels(&[("reason", reason.as_str())]))
            .inc_by(total.drops_of(*reason));
        let _ = write!(help, " {}: {};", reason.as_str(), reason.help());
    }
    registry.register("servicegate_drops", help.trim_end_matches(';'), drops);

    // Conntrack, per worker.
    let ct_entries = gauge_family();
    let ct_inserts = counter_family();
    let ct_evictions = counter_family();
    let ct_expirations = counter_family();
    let ct_full = counter_family();
    let busy = fgauge_family();
    let handoffs = counter_family();
    let exception = counter_family();
    let fast_path = counter_family();
    let fragments = counter_family();
    let bursts = counter_family();
    let worker_generation = gauge_family();
    for (w, s) in per_worker.iter().enumerate() {
        let wl = w.to_string();
        let l = labels(&[("worker", &wl)]);
        ct_entries.get_or_create(&l).set(s.conntrack.entries as i64);
        ct_inserts.get_or_create(&l).inc_by(s.conntrack.inserts);
        ct_evictions.get_or_create(&l).inc_by(s.conntrack.evictions);
        ct_expirations
            .get_or_create(&l)
            .inc_by(s.conntrack.expirations);
        ct_full.get_or_create(&l).inc_by(s.conntrack.full);
        let ratio = if s.total_cycles > 0 {
            s.busy_cycles as f64 / s.total_cycles as f64
        } else {
            0.0
        };
        busy.get_or_create(&l).set(ratio);
        bursts.get_or_create(&l).inc_by(s.bursts);
        worker_generation.get_or_create(&l).set(s.generation as i64);
        for (dir, v) in [("in", s.handoffs_in), ("out", s.handoffs_out)] {
            handoffs
                .get_or_create(&labels(&[("worker", &wl), ("direction", dir)]))
                .inc_by(v);
        }
        fast_path.get_or_create(&l).inc_by(s.fast_path);
        for (stage, v) in [
            ("received", s.fragments_in),
            ("reassembled", s.reassembled),
            ("sent", s.fragments_out),
        ] {
            fragments
                .get_or_create(&labels(&[("worker", &wl), ("stage", stage)]))
                .inc_by(v);
        }
        for (dir, v) in [("to", s.to_exception), ("from", s.from_exception)] {
            exception
                .get_or_create(&labels(&[("worker", &wl), ("direction", dir)]))
                .inc_by(v);
        }
    }
    registry.register(
        "servicegate_conntrack_entries",
        "Live conntrack entries, per worker shard",
        ct_entries,
    );
    let ct_capacity = gauge_family();
    for w in 0..per_worker.len() {
        ct_capacity
            .get_or_create(&labels(&[("worker", &w.to_string())]))
            .set(i64::try_from(state.conntrack_capacity).unwrap_or(i64::MAX));
    }
    registry.register(
        "servicegate_conntrack_capacity",
        "Conntrack entries a worker shard holds (conntrack.capacity)",
        ct_capacity,
    );
    registry.register(
        "servicegate_conntrack_inserts",
        "Conntrack entries created",
        ct_inserts,
    );
    registry.register(
        "servicegate_conntrack_evictions",
        "Conntrack entries evicted early to make room (table under pressure)",
        ct_evictions,
    );
    registry.register(
        "servicegate_conntrack_expirations",
        "Conntrack entries that timed out",
        ct_expirations,
    );
    registry.register(
        "servicegate_conntrack_full",
        "New flows refused because the table was full of established flows",
        ct_full,
    );
    registry.register(
        "servicegate_worker_busy_ratio",
        "Share of a worker's cycles spent on non-empty bursts since start",
        busy,
    );
    registry.register(
        "servicegate_handoffs",
        "Frames handed between workers to the flow's owner",
        handoffs,
    );
    registry.register(
        "servicegate_exception",
        "Frames to/from the exception (kernel) port",
        exception,
    );
    registry.register("servicegate_bursts", "Non-empty bursts processed", bursts);
    registry.register(
        "servicegate_fragments",
        "IPv4 fragments taken into reassembly (received), datagrams reassembled from them, and fragments cut on egress (sent); given-up fragments count as drops{reason=\"fragment\"}",
        fragments,
    );
    registry.register(
        "servicegate_fast_path_packets",
        "Packets of established flows forwarded by the fast path (the rest take the general path)",
        fast_path,
    );
    let stalled = fgauge_family();
    for (w, idle) in worker_idle.iter().enumerate() {
        stalled
            .get_or_create(&labels(&[("worker", &w.to_string())]))
            .set(idle.as_secs_f64());
    }
    registry.register(
        "servicegate_worker_stalled_seconds",
        "How long a worker's published counters have not moved (about 0 while it polls; /healthz fails past 2 s)",
        stalled,
    );
    registry.register(
        "servicegate_worker_snapshot_generation",
        "Snapshot generation each worker last loaded",
        worker_generation,
    );

    // Services.
    let service_packets = counter_family();
    let backend_packets = counter_family();
    let backend_info = gauge_family();
    let mut seen_sets: HashSet<String> = HashSet::new();
    let counts = state.packets.lock().counts(&snapshot);
    for f in snapshot.all_frontends() {
        let svc = service_label(f);
        let name = crate::packets::FrontendName {
            service: f.service.clone(),
            kind: f.kind,
            addr: f.addr,
            protocol: f.protocol,
            port: f.port,
        };
        service_packets
            .get_or_create(&labels(&[
                ("service", &svc),
                ("port", &f.service.port_name),
                ("protocol", f.protocol.as_str()),
                ("kind", f.kind.as_str()),
                ("frontend", &frontend_label(f)),
            ]))
            .inc_by(counts.frontends.get(&name).copied().unwrap_or(0));
        if seen_sets.insert(f.service.to_string()) {
            for (i, b) in f.backends.backends.iter().enumerate() {
                let usable = f.backends.usable.contains(&(i as u32));
                backend_packets
                    .get_or_create(&labels(&[
                        ("service", &svc),
                        ("port", &f.service.port_name),
                        ("protocol", f.protocol.as_str()),
                        ("backend", &format!("{}:{}", b.addr, b.port)),
                    ]))
                    .inc_by(
                        counts
                            .backends
                            .get(&(f.service.clone(), b.addr, b.port))
                            .copied()
                            .unwrap_or(0),
                    );
                backend_info
                    .get_or_create(&labels(&[
                        ("service", &svc),
                        ("port", &f.service.port_name),
                        ("protocol", f.protocol.as_str()),
                        ("backend", &format!("{}:{}", b.addr, b.port)),
                        ("state", b.state.as_str()),
                        ("usable", if usable { "true" } else { "false" }),
                        ("node", b.node.as_deref().unwrap_or("")),
                    ]))
                    .set(1);
            }
        }
    }
    registry.register(
        "servicegate_service_packets",
        "Packets of new and tracked flows per frontend since start (kept across snapshot changes while the frontend is served)",
        service_packets,
    );
    registry.register(
        "servicegate_backend_packets",
        "Packets of flows to each backend of a Service port since start, both directions (kept across snapshot changes while the backend is listed)",
        backend_packets,
    );
    registry.register(
        "servicegate_backend_info",
        "Every endpoint of every served Service port with its state (always 1)",
        backend_info,
    );

    let generation = gauge_of(snapshot.generation as i64);
    registry.register(
        "servicegate_snapshot_generation",
        "Generation of the installed snapshot (0: none yet)",
        generation,
    );
    let frontends = gauge_of(i64::from(snapshot.frontend_count));
    registry.register(
        "servicegate_frontends",
        "Frontends in the installed snapshot",
        frontends,
    );
    let ready: Gauge = Gauge::default();
    let snapshot_ready = state.ready.load(Ordering::Acquire);
    match &state.announce {
        Some(announcer) => {
            let status = announcer.status.lock();
            ready.set(i64::from(status.readiness.ready && snapshot_ready));
            let draining = gauge_of(i64::from(status.readiness.draining));
            registry.register(
                "servicegate_draining",
                "1 from SIGTERM/SIGINT until exit: announcements withdrawn, still forwarding",
                draining,
            );
            let count = gauge_of(status.announced.len() as i64);
            registry.register(
                "servicegate_announced_prefixes",
                "Prefixes in the announce table (what the BGP speaker announces)",
                count,
            );
            let each = gauge_family();
            for candidate in status.candidates.iter().filter(|c| c.announce) {
                if status.announced.contains(&candidate.prefix) {
                    let reason = match candidate.source {
                        "service" if candidate.usable_endpoints => "usable_endpoints",
                        "service" => "always",
                        other => other,
                    };
                    each.get_or_create(&labels(&[
                        ("prefix", &candidate.prefix.to_string()),
                        ("reason", reason),
                    ]))
                    .set(1);
                }
            }
            registry.register(
                "servicegate_announced_prefix",
                "1 for each announced prefix, with why (usable_endpoints, always, extra, node_port_address)",
                each,
            );
            let errors: Counter = Counter::default();
            errors.inc_by(status.errors);
            registry.register(
                "servicegate_announce_errors",
                "Failed attempts to bring the announce table to the desired prefixes",
                errors,
            );
        }
        None => {
            ready.set(i64::from(snapshot_ready));
        }
    }
    registry.register(
        "servicegate_ready",
        "1 when ready: first complete snapshot installed, every worker polling, every port's link up, not draining",
        ready,
    );
    {
        let sync = state.sync.lock();
        let latency: Gauge<f64, AtomicU64> = Gauge::default();
        latency.set(sync.last_sync_seconds);
        registry.register(
            "servicegate_sync_latency_seconds",
            "Compile and publish time of the last snapshot",
            latency,
        );
        let services = gauge_of(sync.services as i64);
        registry.register(
            "servicegate_services",
            "Services in the last snapshot",
            services,
        );
        let reloads = counter_family();
        reloads
            .get_or_create(&labels(&[("result", "ok")]))
            .inc_by(sync.reloads_ok);
        reloads
            .get_or_create(&labels(&[("result", "error")]))
            .inc_by(sync.reloads_failed);
        registry.register(
            "servicegate_config_reload",
            "Config reloads (SIGHUP) applied (ok) and refused (error)",
            reloads,
        );
        let warnings = gauge_of(sync.warnings.len() as i64);
        registry.register(
            "servicegate_sync_warnings",
            "Objects the compiler skipped or served partially in the last sync",
            warnings,
        );
        let manifest_errors = gauge_family();
        for problem in &sync.source_problems {
            manifest_errors
                .get_or_create(&vec![
                    ("file".to_string(), problem.file.clone()),
                    ("reason".to_string(), problem.reason.to_string()),
                ])
                .inc();
        }
        registry.register(
            "servicegate_manifest_errors",
            "Manifest documents (or objects) the files source currently skips, by file and \
             reason; a manifest path that cannot be read counts under reason path_unreadable",
            manifest_errors,
        );
    }

    // Burst latency: a real histogram from the summed hdrhistogram, plus its quantiles.
    let hist = &total.burst_latency_ns;
    let count = hist.len();
    // The encoder accumulates: hand it the count of each bucket alone.
    let mut buckets: Vec<(f64, u64)> = Vec::with_capacity(LATENCY_BUCKETS_NS.len() + 1);
    let mut below = 0u64;
    for &ub in LATENCY_BUCKETS_NS {
        let cumulative = if count == 0 {
            0
        } else {
            hist.count_between(0, ub)
        };
        buckets.push((ub as f64 / 1e9, cumulative.saturating_sub(below)));
        below = below.max(cumulative);
    }
    buckets.push((f64::INFINITY, count.saturating_sub(below)));
    let sum = if count == 0 {
        0.0
    } else {
        hist.mean() * count as f64 / 1e9
    };
    registry.register(
        "servicegate_burst_latency_seconds",
        "Processing time of non-empty bursts, all workers",
        PrebucketedHistogram {
            sum,
            count,
            buckets,
        },
    );
    let mut out = String::new();
    if prometheus_client::encoding::text::encode_registry(&mut out, &registry).is_err() {
        out.clear();
    }
    // The quantiles are a summary (the `quantile` label is reserved to summaries);
    // prometheus_client encodes none, so it is written here, in the same syntax.
    let _ = writeln!(
        out,
        "# HELP servicegate_burst_latency_quantile_seconds Quantiles of the burst processing time since start, all workers\n\
         # TYPE servicegate_burst_latency_quantile_seconds summary"
    );
    for q in [0.5, 0.99, 0.999] {
        let v = if count == 0 {
            0.0
        } else {
            hist.value_at_quantile(q) as f64 / 1e9
        };
        let _ = writeln!(
            out,
            "servicegate_burst_latency_quantile_seconds{{quantile=\"{q}\"}} {v}"
        );
    }
    let _ = writeln!(
        out,
        "servicegate_burst_latency_quantile_seconds_sum {sum}\n\
         servicegate_burst_latency_quantile_seconds_count {count}"
    );
    let _ = prometheus_client::encoding::text::encode_eof(&mut out);
    out
}

/// OpenMetrics or the classic text format, as the client's `Accept` asks
/// ([`crate::exposition::negotiate`]).
async fn metrics(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let openmetrics = render_metrics(&app.state, &app.sample_idle());
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let format = crate::exposition::negotiate(accept);
    let body = match format {
        Format::OpenMetrics => openmetrics,
        Format::Text => crate::exposition::openmetrics_to_text(&openmetrics),
    };
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, format.content_type())],
        body,
    )
        .into_response()
}

// ---------------------------------------------------------------------------------------
// /v1/announcements

/// The ports, and what a DPDK secondary process needs to join the gateway.
async fn ports(State(app): State<Arc<App>>) -> Response {
    let eal = &app.state.eal;
    Json(json!({
        "file_prefix": eal.file_prefix,
        "hugepages": eal.hugepages,
        "no_pci": eal.no_pci,
        "ports": app.state.ports.iter().map(|p| json!({
            "name": p.name,
            "id": p.id,
            "device": p.device,
            "role": p.role,
            "queues": p.queues,
            "tx_queues": p.tx_queues,
        })).collect::<Vec<_>>(),
    }))
    .into_response()
}

async fn announcements(State(app): State<Arc<App>>) -> Response {
    let Some(announcer) = &app.state.announce else {
        return Json(json!({
            "enabled": false,
            "readiness": {
                "ready": app.state.ready.load(Ordering::Acquire),
                "draining": false,
                "reasons": [],
            },
            "candidates": [],
            "announced": [],
        }))
        .into_response();
    };
    let status = announcer.status.lock().clone();
    let mut value = serde_json::to_value(&status).unwrap_or_else(|_| json!({}));
    // Each candidate says whether the kernel table holds it now.
    if let Some(candidates) = value.get_mut("candidates").and_then(Value::as_array_mut) {
        for (candidate, c) in candidates.iter_mut().zip(&status.candidates) {
            candidate["in_table"] = json!(status.announced.contains(&c.prefix));
        }
    }
    Json(value).into_response()
}

// ---------------------------------------------------------------------------------------
// /v1/services

fn backend_json(set: &BackendSet, i: usize, b: &Backend) -> Value {
    json!({
        "address": b.addr.to_string(),
        "port": b.port,
        "state": b.state.as_str(),
        "usable": set.usable.contains(&(i as u32)),
        "node": b.node.as_deref(),
    })
}

fn frontend_json(snapshot: &Snapshot, f: &Frontend, packets: Option<u64>) -> Value {
    let backends: Vec<Value> = f
        .backends
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| backend_json(&f.backends, i, b))
        .collect();
    let internal = match &f.internal_policy {
        InternalPolicy::Cluster => json!("Cluster"),
        InternalPolicy::Local { by_node } => {
            let mut nodes: Vec<&str> = by_node.keys().map(|n| &**n).collect();
            nodes.sort_unstable();
            json!({ "Local": { "nodes": nodes } })
        }
    };
    let mut v = json!({
        "id": f.id,
        "service": service_label(f),
        "namespace": &*f.service.namespace,
        "name": &*f.service.name,
        "port_name": &*f.service.port_name,
        "protocol": f.protocol.as_str(),
        "kind": f.kind.as_str(),
        "address": f.addr.to_string(),
        "port": f.port,
        "masquerade": f.masquerade,
        "source_ranges": f.source_ranges.iter().map(|r| r.to_string()).collect::<Vec<_>>(),
        "affinity": match f.affinity_timeout_secs {
            Some(t) => json!({ "type": "ClientIP", "timeout_seconds": t }),
            None => json!(null),
        },
        "internal_traffic_policy": internal,
        "maglev_table_size": f.backends.maglev.size(),
        "usable_backends": f.backends.usable.len(),
        "backends": backends,
        "packets": packets,
    });
    if f.kind == FrontendKind::NodePort {
        v["node_port_addresses"] = json!(snapshot
            .node_port_addresses
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>());
    }
    v
}

async fn services(State(app): State<Arc<App>>) -> Response {
    let state = &app.state;
    let snapshot = state.snapshot.load();
    let mut packets: Vec<u64> = Vec::new();
    for w in state.workers.iter() {
        let s = w.stats.lock();
        if s.generation == snapshot.generation {
            if packets.len() < s.frontend_packets.len() {
                packets.resize(s.frontend_packets.len(), 0);
            }
            for (c, v) in packets.iter_mut().zip(&s.frontend_packets) {
                *c += v;
            }
        }
    }
    let frontends: Vec<Value> = snapshot
        .all_frontends()
        .into_iter()
        .map(|f| frontend_json(&snapshot, f, packets.get(f.id as usize).copied()))
        .collect();
    let sync = state.sync.lock().clone();
    Json(json!({
        "generation": snapshot.generation,
        "ready": state.ready.load(Ordering::Acquire),
        "source": sync.source,
        "services": sync.services,
        "last_sync_seconds": sync.last_sync_seconds,
        "warnings": sync.warnings,
        "last_reload": sync.last_reload,
        "service_cidr": snapshot.service_cidr.map(|c| c.to_string()),
        "frontends": frontends,
    }))
    .into_response()
}

// ---------------------------------------------------------------------------------------
// Worker requests

/// Pushes one request per worker (built by `make`) and waits for every answer with one
/// shared deadline. Returns the answers and one line per worker that did not answer.
async fn ask_workers<T: Send + 'static>(
    workers: Arc<[WorkerShared]>,
    make: impl Fn(std::sync::mpsc::SyncSender<T>) -> Request + Send + 'static,
) -> (Vec<(usize, T)>, Vec<String>) {
    let joined = tokio::task::spawn_blocking(move || {
        let mut pending: Vec<(usize, Receiver<T>)> = Vec::new();
        let mut missing = Vec::new();
        for (i, w) in workers.iter().enumerate() {
            let (tx, rx) = sync_channel(1);
            if w.requests.push(make(tx)).is_err() {
                missing.push(format!("worker {i}: request queue full"));
            } else {
                pending.push((i, rx));
            }
        }
        let deadline = Instant::now() + WORKER_REPLY_TIMEOUT;
        let mut answers = Vec::new();
        for (i, rx) in pending {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(v) => answers.push((i, v)),
                Err(_) => missing.push(format!(
                    "worker {i}: no answer within {} ms",
                    WORKER_REPLY_TIMEOUT.as_millis()
                )),
            }
        }
        (answers, missing)
    })
    .await;
    joined.unwrap_or_else(|e| (Vec::new(), vec![format!("request task failed: {e}")]))
}

/// The frontend a conntrack row belongs to: by id when the row was created under the
/// current snapshot, else by its frontend address.
fn row_frontend<'a>(snapshot: &'a Snapshot, row: &ConntrackRow) -> Option<&'a Arc<Frontend>> {
    let protocol = Protocol::from_ip_proto(row.original.protocol)?;
    if row.generation == snapshot.generation {
        if let Some(f) = snapshot
            .all_frontends()
            .into_iter()
            .find(|f| f.id == row.frontend_id)
        {
            return Some(f);
        }
    }
    snapshot.match_frontend(row.nat.frontend_addr, protocol, row.nat.frontend_port)
}

fn row_json(snapshot: &Snapshot, row: &ConntrackRow) -> Value {
    let f = row_frontend(snapshot, row);
    json!({
        "worker": row.worker,
        "original": row.original.to_string(),
        "reply": row.reply.to_string(),
        "service": f.map(|f| f.service.to_string()),
        "kind": f.map(|f| f.kind.as_str()),
        "frontend": format!("{}:{}", row.nat.frontend_addr, row.nat.frontend_port),
        "backend": format!("{}:{}", row.nat.backend_addr, row.nat.backend_port),
        "snat": row.nat.snat.map(|(a, p)| format!("{a}:{p}")),
        "state": row.state,
        "expires_in_ms": row.expires_in_ms,
        "packets_original": row.packets_original,
        "packets_reply": row.packets_reply,
        "frontend_id": row.frontend_id,
        "generation": row.generation,
    })
}

#[derive(Deserialize)]
struct ConntrackQuery {
    limit: Option<String>,
    service: Option<String>,
}

/// `ns/name` or `ns/name:port-name` → the matching frontends' ids.
#[allow(clippy::result_large_err)] // the error is the finished HTTP answer
fn service_filter(snapshot: &Snapshot, spec: &str) -> Result<Vec<u32>, Response> {
    let (svc, port) = match spec.split_once(':') {
        Some((s, p)) => (s, Some(p)),
        None => (spec, None),
    };
    let Some((ns, name)) = svc.split_once('/') else {
        return Err(bad_request(format!(
            "service must be namespace/name or namespace/name:port, got {spec:?}"
        )));
    };
    let ids: Vec<u32> = snapshot
        .all_frontends()
        .into_iter()
        .filter(|f| {
            &*f.service.namespace == ns
                && &*f.service.name == name
                && port.is_none_or(|p| &*f.service.port_name == p)
        })
        .map(|f| f.id)
        .collect();
    if ids.is_empty() {
        return Err((
            StatusCode::NOT_FOUND,
            Json(json!({ "error": format!("no service {spec} in the current snapshot") })),
        )
            .into_response());
    }
    Ok(ids)
}

async fn conntrack(
    State(app): State<Arc<App>>,
    query: Result<Query<ConntrackQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(query)) = query else {
        return bad_request("bad query string");
    };
    let limit = match query.limit.as_deref() {
        None | Some("") => DEFAULT_CONNTRACK_LIMIT,
        Some(s) => match s.parse::<usize>() {
            Ok(n) if n <= MAX_CONNTRACK_LIMIT => n,
            _ => {
                return bad_request(format!(
                    "limit must be a number from 0 to {MAX_CONNTRACK_LIMIT}, got {s:?}"
                ))
            }
        },
    };
    let snapshot = app.state.snapshot.load_full();
    let (filter, service) = match query.service.as_deref().filter(|s| !s.is_empty()) {
        None => (None, None),
        Some(spec) => match service_filter(&snapshot, spec) {
            Ok(ids) => (Some(ids), Some(spec.to_string())),
            Err(response) => return response,
        },
    };
    let (answers, missing) = ask_workers(Arc::clone(&app.state.workers), move |reply| {
        Request::DumpConntrack {
            limit,
            frontends: filter.clone(),
            reply,
        }
    })
    .await;
    let mut rows: Vec<ConntrackRow> = answers.into_iter().flat_map(|(_, r)| r).collect();
    rows.sort_by_key(|r| (r.worker, r.original));
    let truncated = rows.len() > limit;
    rows.truncate(limit);
    let entries: Vec<Value> = rows.iter().map(|r| row_json(&snapshot, r)).collect();
    Json(json!({
        "generation": snapshot.generation,
        "workers": app.state.workers.len(),
        "service": service,
        "limit": limit,
        "truncated": truncated,
        "incomplete": missing,
        "count": entries.len(),
        "entries": entries,
    }))
    .into_response()
}

// ---------------------------------------------------------------------------------------
// /v1/trace

/// Parses `tcp 10.0.0.5:41000 -> 10.96.0.10:80` (what `FlowKey`'s `Display` prints).
pub fn parse_flow(s: &str) -> Result<FlowKey, String> {
    let s = s.trim();
    let (proto, rest) = s.split_once(char::is_whitespace).ok_or_else(|| {
        format!("flow must look like `tcp 10.0.0.5:41000 -> 10.96.0.10:80`, got {s:?}")
    })?;
    let protocol = match proto.to_ascii_lowercase().as_str() {
        "tcp" => PROTO_TCP,
        "udp" => PROTO_UDP,
        "sctp" => PROTO_SCTP,
        "icmp" => PROTO_ICMP,
        other => {
            return Err(format!(
                "unknown protocol {other:?} (tcp, udp, sctp or icmp)"
            ))
        }
    };
    if protocol == PROTO_ICMP {
        return parse_icmp_flow(rest);
    }
    let (src, dst) = rest
        .split_once("->")
        .ok_or_else(|| format!("flow needs `src:port -> dst:port`, got {rest:?}"))?;
    let endpoint = |what: &str, e: &str| -> Result<(Ipv4Addr, u16), String> {
        let e = e.trim();
        let (a, p) = e
            .rsplit_once(':')
            .ok_or_else(|| format!("{what} must be ipv4:port, got {e:?}"))?;
        let addr = a
            .parse::<Ipv4Addr>()
            .map_err(|_| format!("{what} address {a:?} is not an IPv4 address"))?;
        let port = p
            .parse::<u16>()
            .map_err(|_| format!("{what} port {p:?} is not a number from 0 to 65535"))?;
        Ok((addr, port))
    };
    let (src, src_port) = endpoint("source", src)?;
    let (dst, dst_port) = endpoint("destination", dst)?;
    Ok(FlowKey::new(protocol, src, src_port, dst, dst_port))
}

/// `10.0.0.5 -> 10.96.0.10 [id 7]`: an ICMP echo request (the identifier, default 0,
/// becomes the key's source port, as echo flows are owned by their identifier).
fn parse_icmp_flow(rest: &str) -> Result<FlowKey, String> {
    let usage = "an ICMP flow looks like `icmp 10.0.0.5 -> 10.96.0.10` or `icmp 10.0.0.5 -> 10.96.0.10 id 7`";
    let (src, rest) = rest
        .split_once("->")
        .ok_or_else(|| format!("{usage}, got {rest:?}"))?;
    let mut words = rest.split_whitespace();
    let dst = words
        .next()
        .ok_or_else(|| format!("{usage}: no destination"))?;
    let id = match (words.next(), words.next(), words.next()) {
        (None, _, _) => 0,
        (Some("id"), Some(id), None) => id
            .parse::<u16>()
            .map_err(|_| format!("echo id {id:?} is not a number from 0 to 65535"))?,
        _ => return Err(format!("{usage}, got {rest:?}")),
    };
    let address = |what: &str, a: &str| {
        a.trim()
            .parse::<Ipv4Addr>()
            .map_err(|_| format!("{what} {a:?} is not an IPv4 address ({usage})"))
    };
    Ok(FlowKey::new(
        PROTO_ICMP,
        address("source", src)?,
        id,
        address("destination", dst)?,
        0,
    ))
}

/// The trace of a packet that matched no frontend, with the pipeline's decisions
/// ([`decide::unmatched`], [`decide::local`]). The port it arrives on is taken to be the
/// one the gateway routes its source through, and a source in a pod CIDR to arrive over
/// VXLAN.
fn explain_unmatched(
    out: &mut Value,
    steps: &mut Vec<Value>,
    snapshot: &Snapshot,
    routing: &Routing,
    flow: &FlowKey,
    packet: Unframed,
    uplink: Option<&str>,
) {
    let what = match packet {
        Unframed::Ports => format!(
            "{}/{}",
            Protocol::from_ip_proto(flow.protocol).map_or("?", |p| p.as_str()),
            flow.dst_port
        ),
        Unframed::EchoRequest => "an ICMP echo request".to_string(),
        Unframed::Other => format!("IP protocol {}", flow.protocol),
    };
    match decide::unmatched(snapshot, flow.dst, packet) {
        decide::Unmatched::Reject(reason) => {
            let kind = snapshot
                .service_addresses
                .get(&flow.dst)
                .map_or("", |k| k.as_str());
            steps.push(step(
                "service",
                "reject",
                format!(
                    "{} is a {kind} service address but no service serves {what} on it: reject: ICMP port-unreachable (drop reason {})",
                    flow.dst,
                    reason.as_str()
                ),
            ));
            out["verdict"] = json!("reject");
            out["drop_reason"] = json!(reason.as_str());
        }
        decide::Unmatched::AnswerEcho => {
            steps.push(step(
                "service",
                "answer",
                format!(
                    "{} is a service address: the gateway answers the echo request itself (as IPVS does)",
                    flow.dst
                ),
            ));
            out["verdict"] = json!("answer");
        }
        decide::Unmatched::Drop(reason) => {
            let detail = if snapshot.service_addresses.contains_key(&flow.dst) {
                format!(
                    "{} is a service address, which serves only its ports and echo requests, not {what}: dropped (drop reason {})",
                    flow.dst,
                    reason.as_str()
                )
            } else {
                format!(
                    "{} is inside the service CIDR {} but no service has it: dropped (drop reason {})",
                    flow.dst,
                    snapshot.service_cidr.map(|c| c.to_string()).unwrap_or_default(),
                    reason.as_str()
                )
            };
            steps.push(step("service", "drop", detail));
            out["verdict"] = json!("drop");
            out["drop_reason"] = json!(reason.as_str());
        }
        decide::Unmatched::NotService if routing.is_local(flow.dst) => {
            let in_port = routing.table.hop(flow.src, None).map(|h| h.port);
            let in_name = in_port
                .and_then(|i| routing.port_names.get(i))
                .map_or("?", String::as_str);
            let over_vxlan = routing.vxlan
                && snapshot
                    .pod_routes
                    .iter()
                    .any(|r| r.cidr.contains(&flow.src));
            let has_exception = in_port.is_some_and(|i| routing.exception.get(i) == Some(&true));
            let node_port = if snapshot.node_port_addresses.contains(&flow.dst) {
                format!(" (a node-port address, and {what} is no NodePort)")
            } else {
                String::new()
            };
            match decide::local(
                has_exception,
                over_vxlan,
                packet == Unframed::EchoRequest && routing.owns(flow.dst),
            ) {
                decide::Local::Exception => {
                    steps.push(step(
                        "local",
                        "exception",
                        format!(
                            "{} is the gateway's own{node_port}: handed to the kernel through the exception port of port {in_name} (the port toward the source)",
                            flow.dst
                        ),
                    ));
                    out["verdict"] = json!("local");
                }
                decide::Local::AnswerEcho => {
                    steps.push(step(
                        "local",
                        "answer",
                        format!(
                            "{} is the gateway's own and {}: the gateway answers the echo request",
                            flow.dst,
                            if over_vxlan {
                                "the request comes over VXLAN"
                            } else {
                                "no exception port takes it"
                            }
                        ),
                    ));
                    out["verdict"] = json!("answer");
                }
                decide::Local::Drop(reason) => {
                    steps.push(step(
                        "local",
                        "drop",
                        format!(
                            "{} is the gateway's own{node_port}, but {}: dropped (drop reason {})",
                            flow.dst,
                            if over_vxlan {
                                "traffic decapsulated from VXLAN is not handed to the kernel".to_string()
                            } else {
                                format!("port {in_name} (the port toward the source) has no exception port")
                            },
                            reason.as_str()
                        ),
                    ));
                    out["verdict"] = json!("drop");
                    out["drop_reason"] = json!(reason.as_str());
                }
            }
        }
        decide::Unmatched::NotService => {
            steps.push(step(
                "service",
                "routed",
                format!(
                    "{} is not a service address: no translation, routed",
                    flow.dst
                ),
            ));
            if !refused_from_uplink(out, steps, routing, uplink, flow.dst) {
                out["verdict"] = json!("routed");
                add_egress(out, steps, snapshot, routing, flow.dst);
            }
        }
    }
}

fn step(rule: &str, decision: &str, detail: impl Into<String>) -> Value {
    json!({ "rule": rule, "decision": decision, "detail": detail.into() })
}

/// Where a packet to `dst` leaves, computed like the pipeline does: a pod CIDR of the
/// snapshot (VXLAN configured) is encapsulated toward its node's VTEP and the VTEP's route
/// gives the port and next hop; anything else takes the longest-prefix route. `port` and
/// `next_hop` are null when there is no route (the pipeline drops with `no_route`).
fn egress_json(snapshot: &Snapshot, routing: &Routing, dst: Ipv4Addr) -> Value {
    let pods = routing.vxlan.then(|| PodRoutes::new(&snapshot.pod_routes));
    let pod = pods
        .as_ref()
        .and_then(|p| p.vtep_for(dst))
        .and_then(|(cidr, _)| {
            // The last route of a CIDR is the one the table kept.
            snapshot
                .pod_routes
                .iter()
                .rev()
                .find(|r| r.cidr.trunc() == cidr)
        });
    let hop = routing.table.hop(dst, pods.as_ref());
    let port = hop.map(|h| {
        routing
            .port_names
            .get(h.port)
            .cloned()
            .unwrap_or_else(|| format!("#{}", h.port))
    });
    // The route the next hop came from: the VTEP's when encapsulating, else dst's.
    let route = routing
        .table
        .lookup(pod.map_or(dst, |r| r.vtep))
        .map(|(prefix, r)| (prefix, r.via));
    let next_hop_detail = match (hop, route) {
        (Some(_), Some((prefix, Some(via)))) => format!(
            "out of port {}, next hop {} (gateway of route {prefix})",
            port.as_deref().unwrap_or_default(),
            via
        ),
        (Some(h), Some((prefix, None))) => format!(
            "out of port {}, next hop {} (on-link: connected subnet {prefix})",
            port.as_deref().unwrap_or_default(),
            h.next_hop
        ),
        _ => String::new(),
    };
    let no_route = DropReason::NoRoute.as_str();
    match (pod, hop) {
        (Some(r), Some(h)) => json!({
            "via": "vxlan",
            "port": port,
            "next_hop": h.next_hop.to_string(),
            "route": route.map(|(prefix, _)| prefix.to_string()),
            "pod_cidr": r.cidr.to_string(),
            "vtep": r.vtep.to_string(),
            "vni": r.vni,
            "node": r.node.as_deref(),
            "detail": format!(
                "{dst} is in pod CIDR {}: re-encapsulated in VXLAN (VNI {}) to VTEP {}{}, {next_hop_detail}",
                r.cidr,
                r.vni,
                r.vtep,
                r.node.as_deref().map(|n| format!(" (node {n})")).unwrap_or_default()
            ),
        }),
        (Some(r), None) => json!({
            "via": "no-route",
            "port": null,
            "next_hop": null,
            "pod_cidr": r.cidr.to_string(),
            "vtep": r.vtep.to_string(),
            "vni": r.vni,
            "node": r.node.as_deref(),
            "detail": format!(
                "{dst} is in pod CIDR {} behind VTEP {}, but no route reaches the VTEP: dropped (drop reason {no_route})",
                r.cidr, r.vtep
            ),
        }),
        (None, Some(h)) => json!({
            "via": "route",
            "port": port,
            "next_hop": h.next_hop.to_string(),
            "route": route.map(|(prefix, _)| prefix.to_string()),
            "detail": format!("{dst} is routed {next_hop_detail}; the next hop's MAC is resolved by ARP"),
        }),
        (None, None) => json!({
            "via": "no-route",
            "port": null,
            "next_hop": null,
            "detail": format!("no route to {dst}: dropped (drop reason {no_route})"),
        }),
    }
}

/// Adds the egress step and `out["egress"]` for a packet to `dst`; without a route the
/// verdict becomes a `no_route` drop, as in the pipeline.
fn add_egress(
    out: &mut Value,
    steps: &mut Vec<Value>,
    snapshot: &Snapshot,
    routing: &Routing,
    dst: Ipv4Addr,
) {
    let egress = egress_json(snapshot, routing, dst);
    steps.push(step(
        "egress",
        egress["via"].as_str().unwrap_or_default(),
        egress["detail"].as_str().unwrap_or_default(),
    ));
    if egress["port"].is_null() {
        out["verdict"] = json!("drop");
        out["drop_reason"] = json!(DropReason::NoRoute.as_str());
    }
    out["egress"] = egress;
}

/// The edge policy's step of a trace (`dataplane::pipeline::edge`): a flow whose source is
/// routed through an uplink arrives there (as `rp_filter` sees it), so its source is
/// validated. `Ok(Some(port))`: it arrives on that uplink; `Err`: its source is dropped.
fn edge_step(
    steps: &mut Vec<Value>,
    snapshot: &Snapshot,
    routing: &Routing,
    flow: &FlowKey,
) -> Result<Option<String>, DropReason> {
    let Some((PortRole::Uplink, port)) = routing.arrival_of(snapshot, flow.src) else {
        return Ok(None);
    };
    let mut edge = routing.edge.clone();
    edge.take_snapshot(snapshot);
    let arrives = format!(
        "{} arrives on uplink {port} (the route toward it leaves there)",
        flow.src
    );
    match edge.check_source(flow.src) {
        Ok(()) => {
            steps.push(step(
                "edge",
                "uplink",
                format!("{arrives}; a valid source: from an uplink only Service frontends, tracked flows, the gateway's own addresses and edge.routable_prefixes are reached"),
            ));
            Ok(Some(port))
        }
        Err(bad) => {
            let why = match bad {
                BadSource::Martian(why) => format!("a martian ({why})"),
                BadSource::Spoofed(prefix, side) => {
                    format!("a cluster-side address ({} {prefix})", side.as_str())
                }
            };
            let reason = bad.drop_reason();
            steps.push(step(
                "edge",
                "drop",
                format!(
                    "{arrives}; the source is {why}: dropped (drop reason {})",
                    reason.as_str()
                ),
            ));
            Err(reason)
        }
    }
}

/// For a flow that would be routed untranslated: when it arrives on `uplink` and `dst` is
/// neither the gateway's nor routable, adds the edge policy's drop and returns `true`.
fn refused_from_uplink(
    out: &mut Value,
    steps: &mut Vec<Value>,
    routing: &Routing,
    uplink: Option<&str>,
    dst: Ipv4Addr,
) -> bool {
    let Some(port) = uplink else {
        return false;
    };
    if routing.owns(dst) {
        return false;
    }
    if let Some(prefix) = routing.edge.routable_prefix(dst) {
        steps.push(step(
            "edge",
            "routable",
            format!(
                "{dst} is inside edge.routable_prefixes entry {prefix}: routed from uplink {port}"
            ),
        ));
        return false;
    }
    let reason = DropReason::UplinkNotAllowed;
    steps.push(step(
        "edge",
        "drop",
        format!(
            "{dst} is neither a Service frontend nor an address of the gateway, and no edge.routable_prefixes entry holds it: dropped on uplink {port} (drop reason {})",
            reason.as_str()
        ),
    ));
    out["verdict"] = json!("drop");
    out["drop_reason"] = json!(reason.as_str());
    true
}

/// The answer of `/v1/trace` (and `ctl trace`).
pub fn explain(
    snapshot: &Snapshot,
    routing: &Routing,
    flow: &FlowKey,
    flow_hash: fn(&FlowKey) -> u64,
    conntrack: Option<(&ConntrackRow, Direction)>,
    incomplete: &[String],
) -> Value {
    let mut steps = Vec::new();
    let mut out = json!({ "flow": flow.to_string(), "generation": snapshot.generation });

    let uplink = match edge_step(&mut steps, snapshot, routing, flow) {
        Ok(uplink) => uplink,
        Err(reason) => {
            out["verdict"] = json!("drop");
            out["drop_reason"] = json!(reason.as_str());
            out["steps"] = json!(steps);
            return out;
        }
    };

    if let Some((row, dir)) = conntrack {
        let nat = row.nat;
        let translated = match dir {
            Direction::Original => {
                let (src, sport) = nat.snat.unwrap_or((flow.src, flow.src_port));
                FlowKey::new(
                    flow.protocol,
                    src,
                    sport,
                    nat.backend_addr,
                    nat.backend_port,
                )
            }
            Direction::Reply => FlowKey::new(
                flow.protocol,
                nat.frontend_addr,
                nat.frontend_port,
                row.original.src,
                row.original.src_port,
            ),
        };
        let service = row_frontend(snapshot, row).map(|f| f.service.to_string());
        steps.push(step(
            "conntrack",
            "hit",
            format!(
                "worker {} holds an entry ({} direction), state {}, expires in {} ms; the stored translation is applied, no service lookup",
                row.worker,
                if dir == Direction::Original { "original" } else { "reply" },
                row.state,
                row.expires_in_ms
            ),
        ));
        steps.push(step(
            "translation",
            "rewrite",
            format!("{flow}  =>  {translated}"),
        ));
        out["verdict"] = json!("forward");
        if row.generation != snapshot.generation {
            match decide::tracked_flow(snapshot, flow.protocol, &nat) {
                TrackedFlow::Keep(_) => {}
                TrackedFlow::Flush => {
                    steps.push(step(
                        "endpoints",
                        "flush",
                        "the backend no longer takes this UDP flow (not usable, or its frontend is gone): the entry is removed and the packet is handled as a new flow",
                    ));
                    out["verdict"] = json!("new-flow");
                }
                TrackedFlow::Gone => {
                    steps.push(step(
                        "endpoints",
                        "drop",
                        "the backend left every EndpointSlice: dropped (drop reason backend_gone) while the entry lingers in case it returns",
                    ));
                    out["verdict"] = json!("drop");
                    out["drop_reason"] = json!(DropReason::BackendGone.as_str());
                }
            }
        }
        out["service"] = json!(service);
        out["conntrack"] = json!({
            "worker": row.worker,
            "direction": if dir == Direction::Original { "original" } else { "reply" },
            "state": row.state,
            "expires_in_ms": row.expires_in_ms,
            "original": row.original.to_string(),
            "reply": row.reply.to_string(),
            "backend": format!("{}:{}", nat.backend_addr, nat.backend_port),
            "snat": nat.snat.map(|(a, p)| format!("{a}:{p}")),
        });
        out["translation"] = json!({ "from": flow.to_string(), "to": translated.to_string() });
        if out["verdict"] == "forward" {
            add_egress(&mut out, &mut steps, snapshot, routing, translated.dst);
        }
        out["steps"] = json!(steps);
        return out;
    }
    steps.push(step(
        "conntrack",
        "miss",
        if incomplete.is_empty() {
            if flow.protocol == PROTO_TCP {
                "no worker holds an entry for this flow in either direction: a SYN opens a new connection (any other segment is dropped, drop reason tcp_no_flow)".to_string()
            } else {
                "no worker holds an entry for this flow in either direction: treated as a new connection".to_string()
            }
        } else {
            format!(
                "no entry found, but not every worker answered ({}): treated as a new connection",
                incomplete.join("; ")
            )
        },
    ));

    let Some(protocol) = Protocol::from_ip_proto(flow.protocol) else {
        let packet = if flow.protocol == PROTO_ICMP {
            Unframed::EchoRequest
        } else {
            Unframed::Other
        };
        explain_unmatched(
            &mut out,
            &mut steps,
            snapshot,
            routing,
            flow,
            packet,
            uplink.as_deref(),
        );
        out["steps"] = json!(steps);
        return out;
    };

    let Some(f) = snapshot.match_frontend(flow.dst, protocol, flow.dst_port) else {
        explain_unmatched(
            &mut out,
            &mut steps,
            snapshot,
            routing,
            flow,
            Unframed::Ports,
            uplink.as_deref(),
        );
        out["steps"] = json!(steps);
        return out;
    };

    out["service"] = json!(f.service.to_string());
    out["frontend"] = frontend_json(snapshot, f, None);
    steps.push(step(
        "service",
        "match",
        format!(
            "{} frontend {} of service {}",
            f.kind.as_str(),
            frontend_label(f),
            f.service
        ),
    ));

    // The pipeline's decision: a source in a pod CIDR is taken to arrive over VXLAN from
    // its node's VTEP.
    let sender_route = snapshot
        .pod_routes
        .iter()
        .filter(|r| r.cidr.contains(&flow.src))
        .max_by_key(|r| r.cidr.prefix_len());
    let sender_node = sender_route
        .filter(|_| routing.vxlan)
        .and_then(|r| r.node.as_ref());
    let decision = decide::new_connection(
        f,
        decide::Sender {
            src: flow.src,
            node: sender_node,
            from_pod: sender_route.is_some(),
        },
    );

    if f.kind == FrontendKind::LoadBalancer && !f.source_ranges.is_empty() {
        let ranges: Vec<String> = f.source_ranges.iter().map(|r| r.to_string()).collect();
        if let NewConnection::Drop(DropReason::SourceRange) = decision {
            steps.push(step(
                "source_ranges",
                "drop",
                format!(
                    "{} is outside loadBalancerSourceRanges [{}]: dropped (drop reason source_range)",
                    flow.src,
                    ranges.join(", ")
                ),
            ));
            out["verdict"] = json!("drop");
            out["drop_reason"] = json!(DropReason::SourceRange.as_str());
            out["steps"] = json!(steps);
            return out;
        }
        steps.push(step(
            "source_ranges",
            "allow",
            format!(
                "{} is inside loadBalancerSourceRanges [{}]",
                flow.src,
                ranges.join(", ")
            ),
        ));
    }

    if let InternalPolicy::Local { by_node } = &f.internal_policy {
        match (&decision, sender_node) {
            (NewConnection::Drop(DropReason::NoLocalEndpoint), Some(node)) => {
                steps.push(step(
                    "internal_traffic_policy",
                    "drop",
                    format!("internalTrafficPolicy Local: the sender is a pod on node {node} and no usable endpoint runs there (others do): dropped silently (drop reason no_local_endpoint)"),
                ));
                out["verdict"] = json!("drop");
                out["drop_reason"] = json!(DropReason::NoLocalEndpoint.as_str());
                out["steps"] = json!(steps);
                return out;
            }
            (NewConnection::Balance { local: true, .. }, Some(node)) => steps.push(step(
                "internal_traffic_policy",
                "local",
                format!("internalTrafficPolicy Local: the sender is a pod on node {node}: only endpoints on {node} are considered"),
            )),
            (_, Some(node)) => steps.push(step(
                "internal_traffic_policy",
                "cluster",
                format!(
                    "internalTrafficPolicy Local: the sender is a pod on node {node}, but the Service has no usable endpoint anywhere{}: handled as under Cluster",
                    if by_node.contains_key(node) { "" } else { " (nor on that node)" }
                ),
            )),
            (_, None) => steps.push(step(
                "internal_traffic_policy",
                "cluster",
                "internalTrafficPolicy Local, but the source is not a pod behind a known node: all endpoints are considered",
            )),
        }
    }
    let (set, policy_masquerade): (&BackendSet, Option<Masquerade>) = match decision {
        NewConnection::Balance {
            set, masquerade, ..
        } => (set, masquerade),
        _ => (&f.backends, None),
    };

    let endpoints: Vec<Value> = set
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| backend_json(set, i, b))
        .collect();
    out["endpoints"] = json!(endpoints);
    let ready = set
        .backends
        .iter()
        .filter(|b| b.state == EndpointState::Ready)
        .count();
    let listing: Vec<String> = set
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| {
            format!(
                "{}:{} {}{}",
                b.addr,
                b.port,
                b.state.as_str(),
                if set.usable.contains(&(i as u32)) {
                    " (usable)"
                } else {
                    ""
                }
            )
        })
        .collect();
    if set.usable.is_empty() {
        steps.push(step(
            "endpoints",
            "reject",
            format!(
                "no usable endpoint among {} [{}]: reject: ICMP port-unreachable (drop reason no_endpoints)",
                set.backends.len(),
                listing.join(", ")
            ),
        ));
        out["verdict"] = json!("reject");
        out["drop_reason"] = json!(DropReason::NoEndpoints.as_str());
        out["steps"] = json!(steps);
        return out;
    }
    steps.push(step(
        "endpoints",
        if ready > 0 {
            "ready"
        } else {
            "fallback-terminating"
        },
        format!(
            "{} usable of {} [{}]{}",
            set.usable.len(),
            set.backends.len(),
            listing.join(", "),
            if ready == 0 {
                "; none is ready, so serving-terminating endpoints are used"
            } else {
                ""
            }
        ),
    ));

    // With ClientIP affinity a first connection picks by the client address alone.
    let hash = dataplane::pipeline::pick_hash(f, flow_hash(flow), flow.src);
    let hashed = if f.affinity_timeout_secs.is_some() {
        "client address"
    } else {
        "flow"
    };
    let size = set.maglev.size() as u64;
    let slot = hash % size.max(1);
    let index = set.maglev.lookup(hash);
    let Some(backend) = set.pick(hash) else {
        steps.push(step(
            "maglev",
            "reject",
            "Maglev table is empty: no backend",
        ));
        out["verdict"] = json!("reject");
        out["drop_reason"] = json!(DropReason::NoEndpoints.as_str());
        out["steps"] = json!(steps);
        return out;
    };
    steps.push(step(
        "maglev",
        "pick",
        format!(
            "{hashed} hash {hash:#018x} % table size {size} = slot {slot} -> usable[{}] = {}:{}",
            index.unwrap_or(0),
            backend.addr,
            backend.port
        ),
    ));
    out["maglev"] = json!({
        "flow_hash": format!("{hash:#018x}"),
        "hash_of": hashed,
        "table_size": size,
        "slot": slot,
        "usable_index": index,
        "backend": format!("{}:{}", backend.addr, backend.port),
    });
    match f.affinity_timeout_secs {
        Some(t) => {
            steps.push(step(
                "session_affinity",
                "maybe",
                format!(
                    "sessionAffinity ClientIP ({t}s): a first connection of {} picks by its address (above), the same backend on every worker and gateway; later ones take the backend its worker remembers for the Service port while it stays usable (the admin API cannot see those entries)",
                    flow.src
                ),
            ));
            out["affinity"] =
                json!({ "type": "ClientIP", "timeout_seconds": t, "predictable": false });
        }
        None => {
            steps.push(step(
                "session_affinity",
                "none",
                "no session affinity: the Maglev pick decides",
            ));
            out["affinity"] = json!(null);
        }
    }

    // Hairpin: a backend answering itself from the VIP's own address would reply to
    // itself, so the pipeline masquerades whatever the policy.
    let hairpin = backend.addr == flow.src;
    let masquerade = policy_masquerade.is_some() || hairpin;
    let (snat_detail, src_text) = if hairpin {
        (
            format!(
                "hairpin: the client {} is the chosen endpoint, so the source becomes a gateway SNAT address and a port allocated by the owning worker",
                flow.src
            ),
            "<snat-address>:<snat-port>".to_string(),
        )
    } else if policy_masquerade == Some(Masquerade::PodToLocalPolicy) {
        (
            format!(
                "{}; the source {} is in a pod CIDR (or arrives over VXLAN) and becomes a gateway SNAT address and port",
                Masquerade::PodToLocalPolicy.describe(),
                flow.src
            ),
            "<snat-address>:<snat-port>".to_string(),
        )
    } else if policy_masquerade.is_some() {
        (
            match f.kind {
                FrontendKind::ClusterIp => "masquerade: the source becomes a gateway SNAT address and a port allocated by the owning worker, so replies return through the gateway".to_string(),
                _ => format!(
                    "masquerade (externalTrafficPolicy Cluster): the source becomes a gateway SNAT address and a port allocated by the owning worker; the backend does not see the client address {}",
                    flow.src
                ),
            },
            "<snat-address>:<snat-port>".to_string(),
        )
    } else {
        (
            match f.kind {
                FrontendKind::ClusterIp => format!("no masquerade: the backend sees the client address {}", flow.src),
                _ => format!(
                    "no SNAT (externalTrafficPolicy Local): the client address {} is kept and the backend sees it",
                    flow.src
                ),
            },
            format!("{}:{}", flow.src, flow.src_port),
        )
    };
    steps.push(step(
        "snat",
        if hairpin {
            "hairpin"
        } else if policy_masquerade == Some(Masquerade::PodToLocalPolicy) {
            "masquerade-pod"
        } else if masquerade {
            "masquerade"
        } else {
            "keep-source"
        },
        snat_detail,
    ));
    let proto = match flow.protocol {
        PROTO_UDP => "udp",
        PROTO_SCTP => "sctp",
        _ => "tcp",
    };
    let translated = format!("{proto} {src_text} -> {}:{}", backend.addr, backend.port);
    steps.push(step(
        "translation",
        "rewrite",
        format!("{flow}  =>  {translated}"),
    ));
    out["verdict"] = json!("forward");
    out["backend"] = json!({ "address": backend.addr.to_string(), "port": backend.port, "state": backend.state.as_str() });
    out["snat"] = json!({ "masquerade": masquerade, "hairpin": hairpin, "client_address_preserved": !masquerade });
    out["translation"] = json!({ "from": flow.to_string(), "to": translated });
    add_egress(&mut out, &mut steps, snapshot, routing, backend.addr);
    out["steps"] = json!(steps);
    out
}

#[derive(Deserialize)]
struct TraceQuery {
    flow: Option<String>,
}

async fn trace(
    State(app): State<Arc<App>>,
    query: Result<Query<TraceQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(query)) = query else {
        return bad_request("bad query string");
    };
    let Some(spec) = query.flow else {
        return bad_request("missing ?flow=, e.g. ?flow=tcp 10.0.0.5:41000 -> 10.96.0.10:80");
    };
    let flow = match parse_flow(&spec) {
        Ok(flow) => flow,
        Err(reason) => return bad_request(reason),
    };
    let snapshot = app.state.snapshot.load_full();
    let (answers, missing) = ask_workers(Arc::clone(&app.state.workers), move |reply| {
        Request::Lookup { flow, reply }
    })
    .await;
    let hit = answers.into_iter().find_map(|(_, a)| a);
    let body = explain(
        &snapshot,
        &app.state.routing.load(),
        &flow,
        app.state.flow_hash,
        hit.as_ref().map(|(row, dir)| (row, *dir)),
        &missing,
    );
    Json(body).into_response()
}

/// Formats seconds for humans (used by `ctl`).
pub fn human_ms(ms: u64) -> String {
    let mut s = String::new();
    if ms >= 3_600_000 {
        let _ = write!(s, "{}h{:02}m", ms / 3_600_000, (ms / 60_000) % 60);
    } else if ms >= 60_000 {
        let _ = write!(s, "{}m{:02}s", ms / 60_000, (ms / 1000) % 60);
    } else {
        let _ = write!(s, "{}.{:01}s", ms / 1000, (ms % 1000) / 100);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `from_config` indexes ports as the pipeline does (config order), lets a connected
    /// subnet win over a static route of the same prefix, and enables pod CIDRs with VXLAN.
    #[test]
    fn routing_from_config_matches_the_pipeline_table() {
        let text = "
ports:
  - name: uplink
    device: net_null0
    role: uplink
    addresses: [192.0.2.1/24]
  - name: cluster
    device: net_null1
    role: cluster
    addresses: [10.0.0.1/24]
routes:
  - { prefix: 0.0.0.0/0, via: 192.0.2.254, port: uplink }
  - { prefix: 10.0.0.0/24, via: 192.0.2.9, port: uplink }
  - { prefix: 172.16.0.0/16, via: 10.0.0.254, port: cluster }
vxlan:
  vni: 42
  local_vtep: 10.0.0.1
  pod_cidrs:
    - { cidr: 10.244.1.0/24, vtep: 172.16.0.11 }
services:
  source: kubernetes
";
        let config = crate::config::Config::parse(text, "test.yaml").expect("valid config");
        let routing = Routing::from_config(&config);
        assert_eq!(routing.port_names, ["uplink", "cluster"]);
        assert!(routing.vxlan);
        let hop = |dst: &str| {
            let h = routing
                .table
                .hop(dst.parse().unwrap(), None)
                .expect("a hop");
            (routing.port_names[h.port].as_str(), h.next_hop.to_string())
        };
        assert_eq!(hop("10.0.0.7"), ("cluster", "10.0.0.7".to_string()));
        assert_eq!(hop("172.16.3.3"), ("cluster", "10.0.0.254".to_string()));
        assert_eq!(hop("8.8.8.8"), ("uplink", "192.0.2.254".to_string()));

        let snapshot = Snapshot {
            pod_routes: crate::app::compile_options(&config).pod_routes,
            ..Snapshot::default()
        };
        let egress = egress_json(&snapshot, &routing, "10.244.1.9".parse().unwrap());
        assert_eq!(egress["via"], "vxlan");
        assert_eq!(egress["port"], "cluster");
        assert_eq!(egress["next_hop"], "10.0.0.254");
        assert_eq!(egress["vtep"], "172.16.0.11");
        assert_eq!(egress["vni"], 42);
    }
}
