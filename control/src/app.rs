//! The commands behind the `servicegate` binary: `run`, `check`, `replay`. Everything here is
//! glue between the config, the dataplane runtime, the service sources, the compiler, the
//! publisher and the admin API.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use dataplane::conntrack::{ConntrackConfig, Timeouts, SECOND};
use dataplane::dpdk::PortSetup;
use dataplane::pipeline::{self, Pipeline, PipelineConfig};
use dataplane::runtime::{PortSpec, ReassemblySpec, Runtime, RuntimeSpec, WorkerSpec};
use dataplane::snapshot::{LiveSettings, PodCidrRoute, Snapshot};
use dataplane::wire::MacAddr;
use dataplane::worker::Mode;
use tokio::sync::watch;

use crate::compiler::{CompileOptions, Compiler};
use crate::config::{parse_mac, Config, ForwardingMode, PortRole, SourceKind};
use crate::model::Model;

/// `servicegate check`: the config, then every manifest of the files source, compiled.
pub fn check(config: &Config) -> anyhow::Result<()> {
    println!(
        "config ok: {} port(s), {} worker(s), source {:?}",
        config.ports.len(),
        config.cores.workers.len(),
        config.services.source
    );
    if config.services.source != SourceKind::Files {
        // The Services are not known offline, so say it for any that may come (item 18).
        let names_nodes = config
            .vxlan
            .as_ref()
            .is_some_and(|vx| vx.pod_cidrs.iter().any(|p| p.node.is_some()));
        let nodes = config.node_scheme();
        if nodes != crate::config::NodeScheme::None {
            println!(
                "nodes (pod CIDRs, VTEPs, VTEP MACs) come from the API: vxlan.nodes {nodes:?}"
            );
        } else if !names_nodes {
            println!(
                "note: no vxlan.pod_cidrs[].node is configured: Services with \
                 internalTrafficPolicy: Local will be treated as Cluster"
            );
        }
        println!("services come from the Kubernetes API; nothing more to check offline");
        return Ok(());
    }
    let path = config.services.path.as_ref().expect("validated");
    let loaded = crate::manifests::load(path)?;
    for line in &loaded.skipped {
        println!("note: {line}");
    }
    // Documents `run` skips (and serves the rest without): errors here.
    let mut invalid = Vec::new();
    for problem in loaded.problems() {
        println!("error: {problem}");
        invalid.push(problem.to_string());
    }
    let compiled = Compiler::new(compile_options(config)).compile(&loaded.model);
    // An endpoint's warning comes once per Service port it is merged into: print it once.
    let mut printed = std::collections::HashSet::new();
    for warning in &compiled.warnings {
        let line = warning.located(&loaded.model);
        if !printed.insert(line.clone()) {
            continue;
        }
        if warning.invalid {
            println!("error: {line}");
            invalid.push(line);
        } else {
            println!("warning: {line}");
        }
    }
    print_snapshot(&compiled.snapshot);
    println!(
        "{} service(s), {} frontend(s), {} backend(s)",
        compiled.stats.services, compiled.stats.frontends, compiled.stats.backends
    );
    // `run` serves the rest and ignores what is invalid, as kube-proxy does; `check` is
    // where such values are caught before they are deployed.
    match invalid.as_slice() {
        [] => Ok(()),
        [only] => bail!("{only}"),
        [first, rest @ ..] => bail!(
            "{first} (and {} more invalid value(s), listed above)",
            rest.len()
        ),
    }
}

fn print_snapshot(snapshot: &Snapshot) {
    for frontend in snapshot.all_frontends() {
        let address = match frontend.kind {
            dataplane::snapshot::FrontendKind::NodePort => format!("*:{}", frontend.port),
            _ => format!("{}:{}", frontend.addr, frontend.port),
        };
        let backends: Vec<String> = frontend
            .backends
            .backends
            .iter()
            .map(|b| format!("{}:{}({})", b.addr, b.port, b.state.as_str()))
            .collect();
        println!(
            "{:<40} {:<12} {:<22} {:<5} -> {}",
            frontend.service.to_string(),
            frontend.kind.as_str(),
            address,
            frontend.protocol,
            if backends.is_empty() {
                "(no endpoints)".to_string()
            } else {
                backends.join(", ")
            }
        );
    }
}

/// Compiler options derived from the config.
pub fn compile_options(config: &Config) -> CompileOptions {
    CompileOptions {
        node_port_addresses: config.node_port_addresses(),
        maglev_table_size: config.maglev.table_size,
        service_cidr: config.services.service_cidr,
        pod_routes: pod_routes(config),
        masquerade_cluster_ip: config.services.masquerade_cluster_ip,
        node_scheme: config.node_scheme(),
        vni: config.vxlan.as_ref().map_or(0, |v| v.vni),
    }
}

fn pod_routes(config: &Config) -> Vec<PodCidrRoute> {
    let Some(vxlan) = &config.vxlan else {
        return Vec::new();
    };
    vxlan
        .pod_cidrs
        .iter()
        .map(|p| PodCidrRoute {
            cidr: p.cidr,
            vtep: p.vtep,
            vni: vxlan.vni,
            node: p.node.as_deref().map(Arc::from),
            vtep_mac: p.vtep_mac.as_deref().and_then(parse_mac).map(MacAddr),
        })
        .collect()
}

/// Where each configured port's device comes from.
enum Devices<'a> {
    /// The config's own devices.
    Configured,
    /// `replay`: every port (and exception port) becomes a net_pcap port.
    Pcap {
        inputs: &'a [(usize, PathBuf)],
        out_dir: &'a Path,
        empty: &'a Path,
    },
}

/// The net_pcap device standing in for port `name` under replay: frames from `rx`, and
/// one capture per transmit queue (every worker has one), see [`replay_tx_capture`].
fn pcap_device(index: usize, rx: &Path, out_dir: &Path, name: &str, workers: usize) -> String {
    let mut device = format!("net_pcap{index},rx_pcap={}", rx.display());
    for worker in 0..workers {
        let capture = replay_tx_capture(out_dir, name, workers, worker);
        device.push_str(&format!(",tx_pcap={}", capture.display()));
    }
    device
}

/// Where worker `worker`'s transmit queue of port `name` writes under replay. net_pcap
/// gives each `tx_pcap` its own queue and file, so with several workers each writes a
/// capture of its own, which [`join_captures`] makes `DIR/PORT.pcap` after the run.
fn replay_tx_capture(out_dir: &Path, name: &str, workers: usize, worker: usize) -> PathBuf {
    if workers == 1 {
        out_dir.join(format!("{name}.pcap"))
    } else {
        out_dir.join(format!(".{name}.worker{worker}.pcap"))
    }
}

/// Writes the frames of `parts`, in order, into one capture at `into`; the header is the
/// first part's (every part comes from the same kind of port).
fn join_captures(parts: &[PathBuf], into: &Path) -> anyhow::Result<u64> {
    use pcap_file::pcap::PcapWriter;
    let first = parts.first().ok_or_else(|| anyhow!("no capture to join"))?;
    let header = open_capture(first)?.header();
    let out = std::fs::File::create(into).with_context(|| format!("write {}", into.display()))?;
    let mut writer = PcapWriter::with_header(std::io::BufWriter::new(out), header)
        .with_context(|| format!("write {}", into.display()))?;
    let mut frames = 0;
    for part in parts {
        let mut reader = open_capture(part)?;
        while let Some(packet) = reader.next_raw_packet() {
            let packet =
                packet.with_context(|| format!("{}: record {}", part.display(), frames + 1))?;
            writer
                .write_raw_packet(&packet)
                .with_context(|| format!("write {}", into.display()))?;
            frames += 1;
        }
    }
    writer
        .into_writer()
        .into_inner()
        .map_err(|e| anyhow!("write {}: {}", into.display(), e.error()))?;
    Ok(frames)
}

/// The EAL arguments and runtime layout for `config`.
fn runtime_spec(
    config: &Config,
    devices: Devices<'_>,
    file_prefix: &str,
) -> anyhow::Result<RuntimeSpec> {
    let workers = config.cores.workers.len();
    let mut eal_args = Vec::new();
    let mut lcores = vec![format!("0@{}", config.cores.control)];
    for (i, core) in config.cores.workers.iter().enumerate() {
        lcores.push(format!("{}@{}", i + 1, core));
    }
    eal_args.push(format!("--lcores={}", lcores.join(",")));
    eal_args.push(format!("--file-prefix={file_prefix}"));
    match devices {
        Devices::Configured => {
            if config.eal.no_pci {
                eal_args.push("--no-pci".into());
            }
            eal_args.extend(config.eal.args.iter().cloned());
        }
        Devices::Pcap { .. } => {
            eal_args.extend(
                [
                    "--no-huge",
                    "-m",
                    "1024",
                    "--no-pci",
                    "--log-level=*:warning",
                ]
                .map(String::from),
            );
        }
    }
    let mut ports = Vec::new();
    let mut worker_specs = vec![WorkerSpec::default(); workers];
    let mut add_port = |name: String,
                        device: String,
                        queues: u16,
                        port: &crate::config::PortConfig,
                        eal_args: &mut Vec<String>| {
        let device_name = device.split(',').next().unwrap_or_default().to_string();
        // net_tap requires as many rx as tx queues, and every worker has a tx queue.
        let queues = if device_name.starts_with("net_tap") {
            queues.max(workers as u16)
        } else {
            queues
        };
        if looks_like_pci(&device_name) {
            eal_args.push("-a".into());
            eal_args.push(device.clone());
        } else {
            eal_args.push(format!("--vdev={device}"));
        }
        let index = ports.len();
        // Port p's queue q goes to worker (p + q) % workers: multi-queue ports still spread
        // over every worker, and single-queue ports (taps, pcap replay) spread over the
        // workers instead of all landing on worker 0.
        for queue in 0..queues {
            worker_specs[(index + usize::from(queue)) % workers]
                .rx
                .push((index, queue));
        }
        ports.push(PortSpec {
            device_name,
            name,
            setup: PortSetup {
                rx_queues: queues,
                tx_queues: workers as u16,
                rx_descriptors: port.rx_descriptors,
                tx_descriptors: port.tx_descriptors,
                mtu: Some(port.mtu),
                promiscuous: port.promiscuous,
                rss: true,
            },
        });
    };
    for (i, port) in config.ports.iter().enumerate() {
        let device = match &devices {
            Devices::Configured => port.device.clone(),
            Devices::Pcap {
                inputs,
                out_dir,
                empty,
            } => {
                let rx = inputs
                    .iter()
                    .find(|(p, _)| *p == i)
                    .map(|(_, f)| f.as_path())
                    .unwrap_or(empty);
                pcap_device(i, rx, out_dir, &port.name, workers)
            }
        };
        let queues = if matches!(devices, Devices::Pcap { .. }) {
            1
        } else {
            port.queues
        };
        add_port(port.name.clone(), device, queues, port, &mut eal_args);
    }
    for (i, port) in config.ports.iter().enumerate() {
        if let Some(exception) = &port.exception {
            let device = match &devices {
                Devices::Configured => exception.clone(),
                Devices::Pcap { out_dir, empty, .. } => pcap_device(
                    config.ports.len() + i,
                    empty,
                    out_dir,
                    &format!("{}-exception", port.name),
                    workers,
                ),
            };
            add_port(
                format!("{}-exception", port.name),
                device,
                1,
                port,
                &mut eal_args,
            );
        }
    }
    Ok(RuntimeSpec {
        eal_args,
        mbufs: config.mempool.mbufs,
        mbuf_cache: config.mempool.cache,
        ports,
        workers: worker_specs,
        idle_sleep_us: config.cores.idle_sleep_us,
        overlap_bursts_from: config.conntrack.overlap_bursts_from,
        reassembly: (config.mode == ForwardingMode::Gateway && config.fragments.reassemble)
            .then_some(ReassemblySpec {
                max_datagrams: config.fragments.max_datagrams,
                timeout_ms: config.fragments.timeout_ms,
            }),
    })
}

/// The MAC the pipeline gives each configured port. Under replay a net_pcap port has a
/// driver-chosen MAC it cannot change, and filters nothing: the pipeline uses the MAC the
/// live device would have (its `mac=` devarg) instead, so replayed frames addressed to the
/// gateway are accepted and outputs carry the live source MACs.
fn pipeline_macs(config: &Config, runtime: &Runtime, replay: bool) -> Vec<[u8; 6]> {
    let mut macs = runtime.port_macs();
    if replay {
        for (mac, port) in macs.iter_mut().zip(&config.ports) {
            if let Some(configured) = devarg_mac(&port.device) {
                *mac = configured;
            }
        }
    }
    macs
}

/// The `mac=` devarg of a vdev spec (`net_tap0,iface=sg-up,mac=02:53:47:00:00:01`).
fn devarg_mac(device: &str) -> Option<[u8; 6]> {
    device
        .split(',')
        .skip(1)
        .find_map(|arg| arg.strip_prefix("mac="))
        .and_then(parse_mac)
}

fn looks_like_pci(name: &str) -> bool {
    name.contains(':') && name.split(':').count() >= 2 && !name.starts_with("net_")
}

/// The pipeline config of worker `index`: DPDK port ids are only known once EAL probed.
/// The conntrack timeouts of the config: each key given in seconds, Linux's default for
/// the others.
fn conntrack_timeouts(t: &crate::config::TimeoutsConfig) -> Timeouts {
    let defaults = Timeouts::default();
    let secs = |v: Option<u64>, d: u64| v.map(|s| s.saturating_mul(SECOND)).unwrap_or(d);
    Timeouts {
        tcp_syn_sent: secs(t.tcp_syn_sent, defaults.tcp_syn_sent),
        tcp_syn_recv: secs(t.tcp_syn_recv, defaults.tcp_syn_recv),
        tcp_established: secs(t.tcp_established, defaults.tcp_established),
        tcp_fin_wait: secs(t.tcp_fin_wait, defaults.tcp_fin_wait),
        tcp_close_wait: secs(t.tcp_close_wait, defaults.tcp_close_wait),
        tcp_last_ack: secs(t.tcp_last_ack, defaults.tcp_last_ack),
        tcp_time_wait: secs(t.tcp_time_wait, defaults.tcp_time_wait),
        tcp_close: secs(t.tcp_close, defaults.tcp_close),
        udp: secs(t.udp, defaults.udp),
        udp_stream: secs(t.udp_stream, defaults.udp_stream),
        icmp: secs(t.icmp, defaults.icmp),
        sctp_unreplied: secs(t.sctp_unreplied, defaults.sctp_unreplied),
        sctp_established: secs(t.sctp_established, defaults.sctp_established),
        generic: secs(t.generic, defaults.generic),
        backend_gone: secs(t.backend_gone, defaults.backend_gone),
    }
}

fn pipeline_config(
    config: &Config,
    runtime: &Runtime,
    macs: &[[u8; 6]],
    index: usize,
) -> anyhow::Result<PipelineConfig> {
    let ids = runtime.port_ids();
    let mut exception_ids = Vec::new();
    let mut next_exception = config.ports.len();
    for port in &config.ports {
        if port.exception.is_some() {
            exception_ids.push(Some(ids[next_exception]));
            next_exception += 1;
        } else {
            exception_ids.push(None);
        }
    }
    let ports = config
        .ports
        .iter()
        .enumerate()
        .map(|(i, port)| pipeline::PortConfig {
            id: ids[i],
            mac: MacAddr(macs[i]),
            addresses: port.addresses.clone(),
            role: match port.role {
                PortRole::Uplink => pipeline::PortRole::Uplink,
                PortRole::Cluster => pipeline::PortRole::Cluster,
            },
            mtu: port.mtu,
            exception_port: exception_ids[i],
        })
        .collect();
    let LiveSettings {
        routes,
        static_neighbors,
        snat_addresses,
        timeouts,
        icmp_errors_per_second,
        routable_prefixes,
        ..
    } = live_settings(config, &ids, 0)?;
    Ok(PipelineConfig {
        ports,
        routes,
        static_neighbors,
        vxlan: config.vxlan.as_ref().map(|v| pipeline::VxlanConfig {
            udp_port: v.udp_port,
            vni: v.vni,
            local_vtep: v.local_vtep,
        }),
        snat_addresses,
        snat_port_range: config.snat.port_min..=config.snat.port_max,
        conntrack: ConntrackConfig {
            capacity: config.conntrack.capacity,
            timeouts,
            half_open_per_source: config.conntrack.half_open_per_source,
            tcp_loose: config.conntrack.tcp_loose,
        },
        affinity_capacity: config.conntrack.affinity_capacity,
        icmp_errors_per_second,
        worker_index: index,
        workers: config.cores.workers.len(),
        neighbor_timeout_ms: 300_000,
        routable_prefixes,
        reassemble_fragments: config.fragments.reassemble,
    })
}

/// The settings of `config` a reload applies to running workers (`ids`: the DPDK port id
/// of each configured port, in config order), numbered `id`.
fn live_settings(config: &Config, ids: &[u16], id: u64) -> anyhow::Result<LiveSettings> {
    let port_id = |name: &str| -> anyhow::Result<u16> {
        config
            .port_index(name)
            .and_then(|i| ids.get(i).copied())
            .ok_or_else(|| anyhow!("unknown port {name}"))
    };
    let routes = config
        .routes
        .iter()
        .map(|r| {
            Ok(pipeline::RouteConfig {
                prefix: r.prefix,
                via: r.via,
                port: port_id(&r.port)?,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let static_neighbors = config
        .neighbors
        .iter()
        .map(|n| {
            Ok((
                port_id(&n.port)?,
                n.address,
                MacAddr(parse_mac(&n.mac).expect("validated")),
            ))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(LiveSettings {
        id,
        routes,
        static_neighbors,
        snat_addresses: config.snat_addresses(),
        timeouts: conntrack_timeouts(&config.conntrack.timeouts),
        icmp_errors_per_second: config.icmp_errors_per_second,
        routable_prefixes: config.edge.routable_prefixes.clone(),
    })
}

fn mode_for(
    config: &Config,
    runtime: &Runtime,
    macs: &[[u8; 6]],
    index: usize,
) -> Result<Mode, String> {
    match config.mode {
        ForwardingMode::Io => {
            let ids = runtime.port_ids();
            let mut peer = vec![0u16; usize::from(ids.iter().copied().max().unwrap_or(0)) + 1];
            for pair in ids.chunks(2) {
                let (a, b) = (pair[0], *pair.get(1).unwrap_or(&pair[0]));
                peer[usize::from(a)] = b;
                peer[usize::from(b)] = a;
            }
            Ok(Mode::Io { peer })
        }
        ForwardingMode::Gateway => {
            let pipeline_config =
                pipeline_config(config, runtime, macs, index).map_err(|e| e.to_string())?;
            Pipeline::new(pipeline_config).map(|p| Mode::Gateway(Box::new(p)))
        }
    }
}

/// How soon the reclaim thread looks again at snapshots still held elsewhere (a worker's
/// guard for one loop; the packet totals until every worker reported a newer generation);
/// doubled up to [`RECLAIM_POLL_MAX`] while nothing could be freed.
const RECLAIM_POLL: Duration = Duration::from_millis(2);
const RECLAIM_POLL_MAX: Duration = Duration::from_millis(200);

/// After the publisher is gone, how long the reclaim thread waits for the last holders.
const RECLAIM_GRACE: Duration = Duration::from_secs(1);

/// Frees the snapshots the publisher replaced, on its own thread: off the publish path
/// (freeing 10,000 frontends takes milliseconds) and never on a worker. A worker's
/// arc-swap guard can outlive the swap by one loop; were the guard the last reference, the
/// worker would free the snapshot. So the thread keeps each replaced snapshot until its
/// reference is the only one left (`Arc::try_unwrap`), then drops it.
fn spawn_reclaimer() -> std::sync::mpsc::Sender<Arc<Snapshot>> {
    let (tx, rx) = std::sync::mpsc::channel::<Arc<Snapshot>>();
    let spawned = std::thread::Builder::new()
        .name("sg-reclaim".into())
        .spawn(move || reclaim(rx));
    if let Err(err) = spawned {
        // Without the thread the receiver is gone: `publish` then drops snapshots itself.
        tracing::warn!("cannot start the snapshot reclaim thread: {err}");
    }
    tx
}

fn reclaim(rx: std::sync::mpsc::Receiver<Arc<Snapshot>>) {
    use std::sync::mpsc::RecvTimeoutError;
    let mut pending: Vec<Arc<Snapshot>> = Vec::new();
    let mut closed: Option<Instant> = None;
    let mut poll = RECLAIM_POLL;
    loop {
        let received = if closed.is_some() {
            std::thread::sleep(poll);
            Err(RecvTimeoutError::Disconnected)
        } else if pending.is_empty() {
            rx.recv().map_err(|_| RecvTimeoutError::Disconnected)
        } else {
            rx.recv_timeout(poll)
        };
        match received {
            Ok(snapshot) => {
                pending.push(snapshot);
                poll = RECLAIM_POLL;
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                closed.get_or_insert_with(Instant::now);
            }
        }
        // Only the unique holder can free a snapshot here; the others stay for later.
        let held = pending.len();
        pending = pending
            .into_iter()
            .filter_map(|snapshot| Arc::try_unwrap(snapshot).map(drop).err())
            .collect();
        if pending.len() == held {
            poll = (poll * 2).min(RECLAIM_POLL_MAX);
        }
        if closed.is_some_and(|at| pending.is_empty() || at.elapsed() > RECLAIM_GRACE) {
            return;
        }
    }
}

/// Compiles each model the source publishes and swaps it in; marks `ready` after the first.
pub struct Publisher {
    compiler: Compiler,
    generation: u64,
    /// Replaced snapshots go to the reclaim thread (see [`spawn_reclaimer`]).
    reclaim: std::sync::mpsc::Sender<Arc<Snapshot>>,
    pub snapshot: Arc<arc_swap::ArcSwap<Snapshot>>,
    pub ready: Arc<AtomicBool>,
    pub sync: Arc<parking_lot::Mutex<crate::admin::SyncInfo>>,
    /// Per-service/backend packet totals: every installed snapshot is registered here, so
    /// counts workers took under it can be named.
    pub packets: Arc<parking_lot::Mutex<crate::packets::PacketTotals>>,
    /// The worker settings of the last config reload, carried by every snapshot from then
    /// on (`None`: the ones the workers started with).
    settings: Option<Arc<LiveSettings>>,
}

impl Publisher {
    pub fn new(config: &Config, snapshot: Arc<arc_swap::ArcSwap<Snapshot>>) -> Publisher {
        let source = format!("{:?}", config.services.source).to_lowercase();
        Publisher::with_options(compile_options(config), &source, snapshot)
    }

    /// A publisher compiling with `options` (what `new` derives from the config), for a
    /// service source named `source` (the admin API's sync info).
    pub fn with_options(
        options: CompileOptions,
        source: &str,
        snapshot: Arc<arc_swap::ArcSwap<Snapshot>>,
    ) -> Publisher {
        Publisher {
            compiler: Compiler::new(options),
            generation: 0,
            reclaim: spawn_reclaimer(),
            snapshot,
            ready: Arc::new(AtomicBool::new(false)),
            sync: Arc::new(parking_lot::Mutex::new(crate::admin::SyncInfo {
                source: source.to_string(),
                ..Default::default()
            })),
            packets: Arc::default(),
            settings: None,
        }
    }

    /// A config reload: new compile options (the tables are compiled anew when they
    /// changed) and new worker settings, both in force from the next publish.
    pub fn reconfigure(&mut self, options: CompileOptions, settings: Arc<LiveSettings>) {
        if *self.compiler.options() != options {
            self.compiler = Compiler::new(options);
        }
        self.settings = Some(settings);
    }

    /// The generation of the last snapshot installed (0: none yet).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Compiles and installs `model`. The previous snapshot is handed to the reclaim
    /// thread, which frees it once the last worker's guard of it is gone (arc-swap's read
    /// guards are released at the end of each worker loop).
    pub fn publish(&mut self, model: &Model) {
        let started = Instant::now();
        let mut compiled = self.compiler.compile(model);
        self.generation += 1;
        compiled.snapshot.generation = self.generation;
        compiled.snapshot.settings = self.settings.clone();
        let services = compiled.stats.services;
        let frontends = compiled.stats.frontends;
        let snapshot = Arc::new(compiled.snapshot);
        self.packets.lock().installed(snapshot.clone());
        let old = self.snapshot.swap(snapshot);
        // Should the reclaim thread be gone, the snapshot is dropped here.
        let _ = self.reclaim.send(old);
        let elapsed = started.elapsed();
        // Warnings name the file and document of their object (files source).
        // What the source could not use comes first (files source: bad documents).
        let warnings: Vec<String> = model
            .problems
            .iter()
            .map(ToString::to_string)
            .chain(
                compiled
                    .warnings
                    .iter()
                    .map(|warning| warning.located(model)),
            )
            .collect();
        for warning in &warnings {
            tracing::warn!("{warning}");
        }
        tracing::info!(
            generation = self.generation,
            services,
            frontends,
            ms = elapsed.as_secs_f64() * 1000.0,
            "snapshot installed"
        );
        let mut sync = self.sync.lock();
        sync.last_sync_seconds = elapsed.as_secs_f64();
        sync.warnings = warnings;
        sync.source_problems = model.problems.clone();
        sync.services = services;
        drop(sync);
        self.ready.store(true, Ordering::SeqCst);
    }
}

/// Debounce: a burst of updates within this window is compiled once.
const COALESCE: Duration = Duration::from_millis(20);

/// What a config reload hands the publisher.
struct Reconfigure {
    options: CompileOptions,
    settings: Arc<LiveSettings>,
}

/// Feeds every model the source sends to the publisher, coalescing bursts; a reload
/// recompiles the last model with the new options and settings.
async fn publish_loop(
    mut publisher: Publisher,
    mut updates: watch::Receiver<Option<Arc<Model>>>,
    mut reloads: tokio::sync::mpsc::UnboundedReceiver<Reconfigure>,
) {
    let mut last: Option<Arc<Model>> = None;
    loop {
        tokio::select! {
            changed = updates.changed() => {
                if changed.is_err() {
                    return;
                }
                // A lone change is compiled at once; a burst is coalesced into its last state.
                let model = updates.borrow_and_update().clone();
                if let Some(model) = model {
                    publisher.publish(&model);
                    last = Some(model);
                }
                tokio::time::sleep(COALESCE).await;
            }
            Some(reload) = reloads.recv() => {
                publisher.reconfigure(reload.options, reload.settings);
                // Before the first model, the first publish carries them.
                if let Some(model) = &last {
                    publisher.publish(model);
                }
            }
        }
    }
}

/// Re-reads the config at `path` (SIGHUP) and applies what needs no restart over
/// `running`. Returns the line the admin API shows, and whether the service source must be
/// restarted; an error (the same one-line reason as `check`) leaves everything as it was.
fn reload_config(
    path: &Path,
    running: &mut Config,
    port_ids: &[u16],
    settings_id: u64,
    publisher: &tokio::sync::mpsc::UnboundedSender<Reconfigure>,
) -> anyhow::Result<(String, bool)> {
    let new = Config::load(path)?;
    new.check_service_source(path)?;
    let restart = crate::reload::needs_restart(running, &new);
    let applied = crate::reload::effective(running, &new)
        .map_err(|reason| anyhow!("{}: {reason}", path.display()))?;
    let settings = live_settings(&applied, port_ids, settings_id)?;
    let source_changed = crate::reload::source_changed(running, &applied);
    publisher
        .send(Reconfigure {
            options: compile_options(&applied),
            settings: Arc::new(settings),
        })
        .map_err(|_| anyhow!("the publisher is gone"))?;
    *running = applied;
    let line = if restart.is_empty() {
        "applied".to_string()
    } else {
        format!(
            "applied; needs a restart (not applied): {}",
            restart.join(", ")
        )
    };
    Ok((line, source_changed))
}

fn spawn_source(
    config: &Config,
    tx: watch::Sender<Option<Arc<Model>>>,
) -> tokio::task::JoinHandle<()> {
    match config.services.source {
        SourceKind::Files => {
            let path = config.services.path.clone().expect("validated");
            let poll = Duration::from_millis(config.services.poll_ms);
            tokio::spawn(crate::manifests::watch_files(path, poll, tx))
        }
        SourceKind::Kubernetes => {
            let source = crate::kube_source::KubeSourceConfig {
                kubeconfig: config.services.kubeconfig.clone(),
                label_selector: config.services.label_selector.clone(),
                namespace: config.services.namespace.clone(),
                watch_nodes: config.node_scheme() != crate::config::NodeScheme::None,
            };
            tokio::spawn(async move {
                if let Err(err) = crate::kube_source::run(source, tx).await {
                    tracing::error!("kubernetes source stopped: {err:#}");
                }
            })
        }
    }
}

/// Builds every worker's mode up front, so a bad pipeline config fails before any launch.
fn worker_modes(
    config: &Config,
    runtime: &Runtime,
    workers: usize,
    replay: bool,
) -> anyhow::Result<Vec<Option<Mode>>> {
    let macs = pipeline_macs(config, runtime, replay);
    (0..workers)
        .map(|i| {
            mode_for(config, runtime, &macs, i)
                .map(Some)
                .map_err(|e| anyhow!(e))
        })
        .collect()
}

/// `servicegate run`; `path` is the config file, read again on SIGHUP.
pub fn run(config: Config, path: &Path) -> anyhow::Result<()> {
    let spec = runtime_spec(&config, Devices::Configured, &config.eal.file_prefix)?;
    let mut runtime = Runtime::init(&spec).map_err(|e| anyhow!(e))?;
    // `ctl capture` and dpdk-dumpcap attach as secondary processes (hugepages only).
    if let Err(err) = dataplane::dpdk::pdump_init() {
        tracing::warn!("packet capture unavailable: {err}");
    }
    let result = (|| -> anyhow::Result<()> {
        let mut modes = worker_modes(&config, &runtime, spec.workers.len(), false)?;
        runtime
            .launch(&spec, |i| {
                modes[i]
                    .take()
                    .ok_or_else(|| "worker launched twice".to_string())
            })
            .map_err(|e| anyhow!(e))?;
        let control = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        control.block_on(serve_control(&config, path, &spec, &runtime))
    })();
    tracing::info!("stopping workers and ports");
    let report = runtime.stop();
    print_report(&report, &config);
    result?;
    if report.panicked_workers > 0 {
        bail!("{} worker(s) panicked", report.panicked_workers);
    }
    Ok(())
}

/// The control thread: service source, publisher, admin API; returns on SIGINT/SIGTERM.
async fn serve_control(
    config: &Config,
    config_path: &Path,
    spec: &RuntimeSpec,
    runtime: &Runtime,
) -> anyhow::Result<()> {
    let (tx, rx) = watch::channel(None);
    let publisher = Publisher::new(config, runtime.snapshot.clone());
    publisher.packets.lock().attach(runtime.workers.clone());
    let ports: Vec<crate::admin::PortInfo> = spec
        .ports
        .iter()
        .zip(runtime.port_ids())
        .map(|(p, id)| crate::admin::PortInfo {
            name: p.name.clone(),
            id,
            role: config
                .ports
                .iter()
                .find(|c| c.name == p.name)
                .map(|c| format!("{:?}", c.role).to_lowercase())
                .unwrap_or_else(|| "exception".into()),
            device: p.device_name.clone(),
            queues: p.setup.rx_queues,
            tx_queues: p.setup.tx_queues,
        })
        .collect();
    let eal = crate::admin::EalInfo {
        file_prefix: config.eal.file_prefix.clone(),
        hugepages: !spec.eal_args.iter().any(|a| a == "--no-huge"),
        no_pci: spec.eal_args.iter().any(|a| a == "--no-pci"),
    };
    let stats_ports: Vec<(String, u16)> = ports.iter().map(|p| (p.name.clone(), p.id)).collect();
    let announcer = Arc::new(crate::announce::Announcer::default());
    let health = crate::announce::HealthInputs {
        snapshot: runtime.snapshot.clone(),
        snapshot_installed: publisher.ready.clone(),
        workers: runtime.workers.clone(),
        ports: spec
            .ports
            .iter()
            .zip(runtime.port_ids())
            .map(|(p, id)| {
                crate::announce::PortProbe::new(&p.name, id, configured_device(config, &p.name))
            })
            .collect(),
        link_up: |id| dataplane::dpdk::link_up(dataplane::dpdk::PortId(id)),
    };
    let pools = runtime.pools();
    let state = Arc::new(crate::admin::AdminState {
        eal,
        mempools: Box::new(move || {
            pools
                .iter()
                .map(|(name, pool)| (name.to_string(), pool.in_use(), pool.available()))
                .collect()
        }),
        snapshot: runtime.snapshot.clone(),
        workers: runtime.workers.clone(),
        ports,
        port_stats: Box::new(move || {
            stats_ports
                .iter()
                .map(|(name, id)| {
                    (
                        name.clone(),
                        dataplane::dpdk::port_stats(dataplane::dpdk::PortId(*id)),
                    )
                })
                .collect()
        }),
        ready: publisher.ready.clone(),
        sync: publisher.sync.clone(),
        flow_hash: |k| {
            dataplane::pipeline::rewrite::flow_hash(
                k.protocol, k.src, k.src_port, k.dst, k.dst_port,
            )
        },
        routing: arc_swap::ArcSwap::from_pointee(crate::admin::Routing::from_config(config)),
        tsc_hz: dataplane::dpdk::tsc_hz(),
        conntrack_capacity: config.conntrack.capacity as u64,
        packets: publisher.packets.clone(),
        announce: Some(announcer.clone()),
    });
    // Beside ethdev's commands on the telemetry socket; a gateway without them still runs.
    if let Err(err) = crate::telemetry::register(Arc::clone(&state)) {
        tracing::warn!("DPDK telemetry commands not registered: {err}");
    }
    let listener = tokio::net::TcpListener::bind(config.admin.listen)
        .await
        .with_context(|| format!("admin.listen {}: cannot bind", config.admin.listen))?;
    tracing::info!("admin API on http://{}", config.admin.listen);
    let sync = publisher.sync.clone();
    let (reload_tx, reload_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut source = spawn_source(config, tx.clone());
    tokio::spawn(publish_loop(publisher, rx, reload_rx));
    tokio::spawn(crate::announce::run(
        announcer.clone(),
        health,
        crate::announce::AnnounceSettings::from_config(config),
        crate::announce::kernel_table(config),
    ));
    let served = Arc::clone(&state);
    tokio::spawn(async move {
        if let Err(err) = crate::admin::serve(listener, served).await {
            tracing::error!("admin API stopped: {err:#}");
        }
    });
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let mut running = config.clone();
    let port_ids = runtime.port_ids();
    let mut settings_id = 0;
    loop {
        tokio::select! {
            _ = int.recv() => {
                tracing::info!("SIGINT");
                break;
            }
            _ = term.recv() => {
                tracing::info!("SIGTERM");
                break;
            }
            _ = hangup.recv() => {
                settings_id += 1;
                let outcome =
                    reload_config(config_path, &mut running, &port_ids, settings_id, &reload_tx);
                let mut info = sync.lock();
                match outcome {
                    Ok((line, source_changed)) => {
                        tracing::info!("SIGHUP: config {}: {line}", config_path.display());
                        state
                            .routing
                            .store(Arc::new(crate::admin::Routing::from_config(&running)));
                        info.reloads_ok += 1;
                        info.last_reload = Some(line);
                        if source_changed {
                            // The old source's last model stays in force until the new
                            // one has published a complete one.
                            source.abort();
                            source = spawn_source(&running, tx.clone());
                        }
                    }
                    Err(err) => {
                        let line = format!("refused, the running config stays: {err:#}");
                        tracing::error!("SIGHUP: {line}");
                        info.reloads_failed += 1;
                        info.last_reload = Some(line);
                    }
                }
            }
        }
    }
    // Withdraw first, so the routers move new traffic to other gateways, while this one
    // keeps forwarding what still arrives for `drain_seconds`.
    let signalled = Instant::now();
    announcer.drain();
    if announcer.wait_withdrawn(WITHDRAW_TIMEOUT).await {
        tracing::info!(
            ms = signalled.elapsed().as_secs_f64() * 1000.0,
            "draining: announcements withdrawn"
        );
    } else {
        tracing::warn!(
            "draining: announcements not confirmed withdrawn within {WITHDRAW_TIMEOUT:?} \
             (they go with the exception tap when the process exits)"
        );
    }
    if running.drain_seconds > 0 {
        let drain = Duration::from_secs(running.drain_seconds);
        tracing::info!("draining: forwarding for {} s more", running.drain_seconds);
        // A second signal cuts the drain short.
        tokio::select! {
            _ = tokio::time::sleep(drain.saturating_sub(signalled.elapsed())) => {}
            _ = int.recv() => tracing::info!("SIGINT again: stopping now"),
            _ = term.recv() => tracing::info!("SIGTERM again: stopping now"),
        }
    }
    Ok(())
}

/// The configured DPDK device of the runtime port called `name` (`NAME` or
/// `NAME-exception`, as [`runtime_spec`] names them).
fn configured_device<'a>(config: &'a Config, name: &str) -> &'a str {
    for port in &config.ports {
        if port.name == name {
            return &port.device;
        }
        if let Some(exception) = &port.exception {
            if name.strip_suffix("-exception") == Some(port.name.as_str()) {
                return exception;
            }
        }
    }
    ""
}

/// How long a stop waits for the withdrawal to be confirmed in the kernel table.
const WITHDRAW_TIMEOUT: Duration = Duration::from_secs(2);

/// Counts the frames of a classic pcap file (either byte order, µs or ns timestamps).
pub fn pcap_frame_count(path: &Path) -> anyhow::Result<u64> {
    let mut reader = open_capture(path)?;
    let mut frames = 0;
    while let Some(packet) = reader.next_raw_packet() {
        packet.with_context(|| format!("{}: record {}", path.display(), frames + 1))?;
        frames += 1;
    }
    Ok(frames)
}

/// A classic pcap capture, opened for reading; errors name the file.
fn open_capture(
    path: &Path,
) -> anyhow::Result<pcap_file::pcap::PcapReader<std::io::BufReader<std::fs::File>>> {
    let file = std::fs::File::open(path).with_context(|| format!("read {}", path.display()))?;
    pcap_file::pcap::PcapReader::new(std::io::BufReader::new(file)).with_context(|| {
        format!(
            "{}: not a classic pcap file (pcapng is not supported)",
            path.display()
        )
    })
}

/// `servicegate replay`.
pub fn replay(config: Config, inputs: &[String], out_dir: &Path) -> anyhow::Result<()> {
    // (port index, its input captures in the order given, with their frame counts)
    let mut by_port: Vec<(usize, Vec<(PathBuf, u64)>)> = Vec::new();
    for input in inputs {
        let (port, file) = input
            .split_once('=')
            .ok_or_else(|| anyhow!("--in {input:?}: expected PORT=FILE.pcap"))?;
        let index = config
            .port_index(port)
            .ok_or_else(|| anyhow!("--in {input:?}: no port named {port:?} in the config"))?;
        let file = PathBuf::from(file);
        let capture = (std::fs::canonicalize(&file)?, pcap_frame_count(&file)?);
        match by_port.iter_mut().find(|(i, _)| *i == index) {
            Some((_, files)) => files.push(capture),
            None => by_port.push((index, vec![capture])),
        }
    }
    std::fs::create_dir_all(out_dir).with_context(|| format!("create {}", out_dir.display()))?;
    let out_dir = std::fs::canonicalize(out_dir)?;
    let empty = out_dir.join(".empty-input.pcap");
    write_empty_pcap(&empty)?;
    // Scratch captures removed when replay returns, whatever happens.
    let mut scratch = ScratchFiles(vec![empty.clone()]);
    // A port given several captures reads them one after the other, as one capture.
    let mut parsed = Vec::new();
    for (index, files) in by_port {
        let (file, frames) = if let [capture] = files.as_slice() {
            capture.clone()
        } else {
            let joined = out_dir.join(format!(".{}.input.pcap", config.ports[index].name));
            scratch.0.push(joined.clone());
            let parts: Vec<PathBuf> = files.iter().map(|(file, _)| file.clone()).collect();
            let frames = join_captures(&parts, &joined)?;
            (joined, frames)
        };
        parsed.push((index, file, frames));
    }

    let model = match config.services.source {
        SourceKind::Files => {
            crate::manifests::load_path(config.services.path.as_ref().expect("validated"))?
        }
        SourceKind::Kubernetes => Model::default(),
    };
    let inputs: Vec<(usize, PathBuf)> = parsed.iter().map(|(i, f, _)| (*i, f.clone())).collect();
    let prefix = format!("sg-replay-{}", std::process::id());
    let spec = runtime_spec(
        &config,
        Devices::Pcap {
            inputs: &inputs,
            out_dir: &out_dir,
            empty: &empty,
        },
        &prefix,
    )?;
    let mut runtime = Runtime::init(&spec).map_err(|e| anyhow!(e))?;
    let mut publisher = Publisher::new(&config, runtime.snapshot.clone());
    publisher.publish(&model);
    let result = (|| -> anyhow::Result<()> {
        let mut modes = worker_modes(&config, &runtime, spec.workers.len(), true)?;
        runtime
            .launch(&spec, |i| {
                modes[i]
                    .take()
                    .ok_or_else(|| "worker launched twice".to_string())
            })
            .map_err(|e| anyhow!(e))?;
        // Wait until every input frame entered the gateway, then until output settles.
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let stats = runtime.port_stats();
            let all_in = parsed
                .iter()
                .all(|(i, _, frames)| stats[*i].1.rx_packets >= *frames);
            if all_in {
                break;
            }
            if Instant::now() > deadline {
                bail!("replay: inputs not consumed within 600 s");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut last = (u64::MAX, u64::MAX);
        loop {
            std::thread::sleep(Duration::from_millis(50));
            let total = runtime.total_stats();
            let now = (total.tx_packets.iter().sum::<u64>(), total.total_drops());
            if now == last {
                break;
            }
            last = now;
        }
        Ok(())
    })();
    let report = runtime.stop();
    result?;
    // Each worker's frames of a port, worker 0's first, in the order it sent them.
    let workers = config.cores.workers.len();
    if workers > 1 {
        let names = config.ports.iter().map(|p| p.name.clone()).chain(
            config
                .ports
                .iter()
                .filter(|p| p.exception.is_some())
                .map(|p| format!("{}-exception", p.name)),
        );
        for name in names {
            let parts: Vec<PathBuf> = (0..workers)
                .map(|w| replay_tx_capture(&out_dir, &name, workers, w))
                .collect();
            scratch.0.extend(parts.iter().cloned());
            join_captures(&parts, &out_dir.join(format!("{name}.pcap")))?;
        }
    }
    drop(scratch);
    print_report(&report, &config);
    if report.mbufs_in_use != 0 {
        bail!(
            "{} mbufs still in use after stop (a leak)",
            report.mbufs_in_use
        );
    }
    Ok(())
}

fn print_report(report: &dataplane::runtime::StopReport, config: &Config) {
    let mut total = dataplane::stats::WorkerStats::default();
    for worker in &report.workers {
        total.merge(worker);
    }
    for (name, stats) in &report.ports {
        println!(
            "port {name}: rx {} tx {} rx_missed {} tx_errors {}",
            stats.rx_packets, stats.tx_packets, stats.rx_missed, stats.tx_errors
        );
    }
    println!(
        "workers: {} bursts: {} handoffs: {}",
        report.workers.len(),
        total.bursts,
        total.handoffs_out
    );
    for reason in dataplane::stats::DropReason::ALL {
        let n = total.drops_of(*reason);
        if n > 0 {
            println!("drop {}: {n}", reason.as_str());
        }
    }
    println!("drops total: {}", total.total_drops());
    println!("mbufs in use after stop: {}", report.mbufs_in_use);
    let _ = config;
}

/// A pcap file without frames: the rx side of ports that have no input.
/// Files removed when dropped.
struct ScratchFiles(Vec<PathBuf>);

impl Drop for ScratchFiles {
    fn drop(&mut self) {
        for file in &self.0 {
            let _ = std::fs::remove_file(file);
        }
    }
}

fn write_empty_pcap(path: &Path) -> anyhow::Result<()> {
    let file = std::fs::File::create(path).with_context(|| format!("write {}", path.display()))?;
    pcap_file::pcap::PcapWriter::new(file).with_context(|| format!("write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{conntrack_timeouts, devarg_mac};
    use crate::config::Config;
    use dataplane::conntrack::{Timeouts, SECOND};

    #[test]
    fn every_conntrack_timeout_is_configurable() {
        let config = Config::parse(
            "ports: [{name: up, device: net_null0, role: uplink}]\n\
             services: {source: files, path: /}\n\
             conntrack:\n  timeouts: {tcp_established: 3600, udp: 10, sctp_unreplied: 5, \
             sctp_established: 60, generic: 20, backend_gone: 4}\n",
            "gateway.yaml",
        )
        .expect("parses");
        let t = conntrack_timeouts(&config.conntrack.timeouts);
        let linux = Timeouts::default();
        assert_eq!(t.tcp_established, 3600 * SECOND);
        assert_eq!(t.udp, 10 * SECOND);
        assert_eq!(t.sctp_unreplied, 5 * SECOND);
        assert_eq!(t.sctp_established, 60 * SECOND);
        assert_eq!(t.generic, 20 * SECOND);
        assert_eq!(t.backend_gone, 4 * SECOND);
        assert_eq!(t.tcp_time_wait, linux.tcp_time_wait, "not given: Linux's");
    }

    #[test]
    fn replay_keeps_the_mac_devarg_of_the_configured_device() {
        assert_eq!(
            devarg_mac("net_tap0,iface=sg-up,mac=02:53:47:00:00:01"),
            Some([0x02, 0x53, 0x47, 0, 0, 0x01])
        );
        assert_eq!(devarg_mac("net_tap0,mac=fixed,iface=x"), None);
        assert_eq!(devarg_mac("net_tap0,iface=sg-up"), None);
        // The device name itself is never a devarg.
        assert_eq!(devarg_mac("mac=02:00:00:00:00:01"), None);
        assert_eq!(devarg_mac("0000:03:00.0"), None);
    }
}
