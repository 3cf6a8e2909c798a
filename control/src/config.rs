//! The gateway config: one YAML file (../shared/interface.md). Unknown keys are errors;
//! every error names the file, the key path and what was expected.

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use serde::Deserialize;

fn default_true() -> bool {
    true
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub eal: EalConfig,
    #[serde(default)]
    pub cores: CoresConfig,
    #[serde(default)]
    pub mempool: MempoolConfig,
    pub ports: Vec<PortConfig>,
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    #[serde(default)]
    pub neighbors: Vec<NeighborConfig>,
    #[serde(default)]
    pub vxlan: Option<VxlanConfig>,
    pub services: ServicesConfig,
    #[serde(default)]
    pub snat: SnatConfig,
    #[serde(default)]
    pub edge: EdgeConfig,
    #[serde(default)]
    pub fragments: FragmentsConfig,
    #[serde(default)]
    pub conntrack: ConntrackSection,
    #[serde(default)]
    pub maglev: MaglevConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    /// Forwarding mode: `gateway` (the service pipeline) or `io` (port-to-port like
    /// testpmd's io mode: ports are paired in order; the benchmark ceiling).
    #[serde(default)]
    pub mode: ForwardingMode,
    /// ICMP errors (unreachable, time exceeded) a worker may send per second.
    #[serde(default = "default_icmp_rate")]
    pub icmp_errors_per_second: u32,
    /// Routes for the node's BGP speaker to announce (`crate::announce`).
    #[serde(default)]
    pub announce: AnnounceConfig,
    /// On SIGTERM/SIGINT: withdraw every announcement at once, keep forwarding this many
    /// seconds (while the routers move traffic to other gateways), then stop.
    #[serde(default)]
    pub drain_seconds: u64,
}

fn default_icmp_rate() -> u32 {
    1000
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ForwardingMode {
    #[default]
    Gateway,
    Io,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EalConfig {
    /// Extra EAL arguments, e.g. `["--no-huge", "-m", "1024"]`.
    #[serde(default)]
    pub args: Vec<String>,
    /// `--file-prefix`: distinct per process when several DPDK processes run at once.
    #[serde(default = "default_file_prefix")]
    pub file_prefix: String,
    /// Skip PCI probing (`--no-pci`): set for vdev-only setups (lab, benchmarks).
    #[serde(default)]
    pub no_pci: bool,
}

fn default_file_prefix() -> String {
    "servicegate".into()
}

impl Default for EalConfig {
    fn default() -> Self {
        EalConfig {
            args: Vec::new(),
            file_prefix: default_file_prefix(),
            no_pci: false,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoresConfig {
    /// CPU of the control thread (EAL main lcore).
    #[serde(default)]
    pub control: usize,
    /// CPUs of the polling workers, one worker each.
    #[serde(default = "default_workers")]
    pub workers: Vec<usize>,
    /// Sleep after a run of empty polls, in µs (0 = pure busy polling). Useful on shared
    /// machines (lab, CI); production gateways keep 0.
    #[serde(default)]
    pub idle_sleep_us: u64,
}

fn default_workers() -> Vec<usize> {
    vec![1]
}

impl Default for CoresConfig {
    fn default() -> Self {
        CoresConfig {
            control: 0,
            workers: default_workers(),
            idle_sleep_us: 0,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MempoolConfig {
    #[serde(default = "default_mbufs")]
    pub mbufs: u32,
    #[serde(default = "default_cache")]
    pub cache: u32,
}

fn default_mbufs() -> u32 {
    16383
}
fn default_cache() -> u32 {
    256
}

impl Default for MempoolConfig {
    fn default() -> Self {
        MempoolConfig {
            mbufs: default_mbufs(),
            cache: default_cache(),
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PortRole {
    /// Faces clients outside the cluster: NodePort, LB and externalIP traffic arrives here.
    Uplink,
    /// Faces the cluster's underlay: nodes, VTEPs, pods.
    Cluster,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortConfig {
    /// A name used by routes and counters (`uplink`).
    pub name: String,
    /// A DPDK device: a vdev spec (`net_tap0,iface=sg-up`) or a PCI address
    /// (`0000:03:00.0`).
    pub device: String,
    pub role: PortRole,
    /// Addresses the gateway owns on this port, with their subnet (`192.0.2.1/24`).
    #[serde(default)]
    pub addresses: Vec<Ipv4Net>,
    #[serde(default = "default_queues")]
    pub queues: u16,
    #[serde(default = "default_descriptors")]
    pub rx_descriptors: u16,
    #[serde(default = "default_descriptors")]
    pub tx_descriptors: u16,
    #[serde(default = "default_mtu")]
    pub mtu: u16,
    #[serde(default = "default_true")]
    pub promiscuous: bool,
    /// A vdev toward the kernel (`net_tap2,iface=sg-up-k`) for traffic to the gateway
    /// itself that no Service claims (SSH, BGP, ping).
    #[serde(default)]
    pub exception: Option<String>,
}

fn default_queues() -> u16 {
    1
}
fn default_descriptors() -> u16 {
    1024
}
fn default_mtu() -> u16 {
    1500
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub prefix: Ipv4Net,
    /// Next hop; omitted for a directly connected prefix.
    #[serde(default)]
    pub via: Option<Ipv4Addr>,
    /// The port name the route leaves through.
    pub port: String,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NeighborConfig {
    pub address: Ipv4Addr,
    pub mac: String,
    pub port: String,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VxlanConfig {
    /// UDP port: 4789 (IANA), 8472 for flannel.
    #[serde(default = "default_vxlan_port")]
    pub udp_port: u16,
    pub vni: u32,
    /// The gateway's VTEP address (an address of a cluster port).
    pub local_vtep: Ipv4Addr,
    /// Remote pod CIDRs behind node VTEPs.
    #[serde(default)]
    pub pod_cidrs: Vec<PodCidrConfig>,
    /// How the `kubernetes` source learns the nodes' pod CIDRs, VTEPs and VTEP MACs from
    /// `v1/Node` objects (default `flannel` under that source, `none` under `files`).
    #[serde(default)]
    pub nodes: Option<NodeScheme>,
}

/// Which annotations of a `v1/Node` say where its pods are (see [`crate::nodes`]).
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum NodeScheme {
    /// flannel's `flannel.alpha.coreos.com/public-ip` (else the InternalIP) and the
    /// `VtepMAC` of `flannel.alpha.coreos.com/backend-data` (else learned).
    Flannel,
    /// The node's InternalIP as its VTEP, the MAC learned from its frames.
    InternalIp,
    /// Nodes are not watched: only `vxlan.pod_cidrs`.
    None,
}

fn default_vxlan_port() -> u16 {
    4789
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodCidrConfig {
    pub cidr: Ipv4Net,
    pub vtep: Ipv4Addr,
    /// Kubernetes node name (enables internalTrafficPolicy: Local).
    #[serde(default)]
    pub node: Option<String>,
    /// MAC of the node's VXLAN device (flannel's VtepMAC annotation); learned from the
    /// node's frames when omitted.
    #[serde(default)]
    pub vtep_mac: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServicesConfig {
    pub source: SourceKind,
    /// For `files`: a manifest file or a directory of them (relative to the config file).
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// For `kubernetes`: kubeconfig path. Default: what `kube::Config::infer` finds —
    /// `$KUBECONFIG`, then `~/.kube/config`, then the in-cluster service account.
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
    #[serde(default)]
    pub label_selector: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
    /// Packets to an unallocated address inside this CIDR are dropped.
    #[serde(default)]
    pub service_cidr: Option<Ipv4Net>,
    /// Where NodePorts answer (default: the first address of each uplink port).
    #[serde(default)]
    pub node_port_addresses: Option<Vec<Ipv4Addr>>,
    /// SNAT pod-originated ClusterIP traffic (kube-semantics item 19).
    #[serde(default = "default_true")]
    pub masquerade_cluster_ip: bool,
    /// Files source: how often the files' metadata is checked beside inotify (for
    /// filesystems where inotify misses changes), in milliseconds.
    #[serde(default = "default_poll_ms")]
    pub poll_ms: u64,
}

fn default_poll_ms() -> u64 {
    2000
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    Files,
    Kubernetes,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnatConfig {
    /// Masquerade addresses (default: the first address of each cluster port).
    #[serde(default)]
    pub addresses: Option<Vec<Ipv4Addr>>,
    #[serde(default = "default_snat_first")]
    pub port_min: u16,
    #[serde(default = "default_snat_last")]
    pub port_max: u16,
}

fn default_snat_first() -> u16 {
    32768
}
fn default_snat_last() -> u16 {
    60999
}

impl Default for SnatConfig {
    fn default() -> Self {
        SnatConfig {
            addresses: None,
            port_min: default_snat_first(),
            port_max: default_snat_last(),
        }
    }
}

/// The edge policy (`dataplane::pipeline::edge`): uplinks reach Service frontends, tracked
/// flows and the gateway's own addresses, and whatever these prefixes hold.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeConfig {
    /// Prefixes that packets from uplinks may be routed to (default: none).
    #[serde(default)]
    pub routable_prefixes: Vec<Ipv4Net>,
}

/// IPv4 reassembly before the pipeline (DPDK's `rte_ip_frag`, one table per worker).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FragmentsConfig {
    /// Reassemble the fragments the gateway forwards (as nf_conntrack does); off: a
    /// fragment of a tracked destination is dropped (`fragment`) and others are routed.
    #[serde(default = "default_true")]
    pub reassemble: bool,
    /// Datagrams in progress per worker; each holds at most 8 fragments' mbufs.
    #[serde(default = "default_fragment_datagrams")]
    pub max_datagrams: u32,
    /// A datagram still incomplete this long after its first fragment is given up.
    #[serde(default = "default_fragment_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_fragment_datagrams() -> u32 {
    1024
}

fn default_fragment_timeout_ms() -> u64 {
    2000
}

impl Default for FragmentsConfig {
    fn default() -> Self {
        FragmentsConfig {
            reassemble: true,
            max_datagrams: default_fragment_datagrams(),
            timeout_ms: default_fragment_timeout_ms(),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConntrackSection {
    /// Entries per worker.
    #[serde(default = "default_ct_capacity")]
    pub capacity: usize,
    #[serde(default = "default_affinity_capacity")]
    pub affinity_capacity: usize,
    /// Live entries from which a worker holds each burst back until the next one has
    /// been received (`dataplane::worker::Worker::overlap_bursts_from`; 0: always).
    #[serde(default = "default_overlap_bursts_from")]
    pub overlap_bursts_from: usize,
    /// Half-open (unassured TCP and SCTP) entries one source address may hold per worker;
    /// 0: no limit.
    #[serde(default = "default_half_open_per_source")]
    pub half_open_per_source: u32,
    /// Per-state timeouts in seconds; omitted ones keep Linux nf_conntrack's defaults.
    #[serde(default)]
    pub timeouts: TimeoutsConfig,
    /// A TCP segment without SYN may open a flow (`nf_conntrack_tcp_loose=1`; for
    /// benchmarks replaying captures without handshakes).
    #[serde(default)]
    pub tcp_loose: bool,
}

fn default_ct_capacity() -> usize {
    262_144
}
fn default_affinity_capacity() -> usize {
    65_536
}
fn default_half_open_per_source() -> u32 {
    dataplane::conntrack::DEFAULT_HALF_OPEN_PER_SOURCE
}
fn default_overlap_bursts_from() -> usize {
    dataplane::worker::OVERLAP_BURSTS_FROM
}

impl Default for ConntrackSection {
    fn default() -> Self {
        ConntrackSection {
            capacity: default_ct_capacity(),
            affinity_capacity: default_affinity_capacity(),
            overlap_bursts_from: default_overlap_bursts_from(),
            half_open_per_source: default_half_open_per_source(),
            timeouts: TimeoutsConfig::default(),
            tcp_loose: false,
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutsConfig {
    pub tcp_syn_sent: Option<u64>,
    pub tcp_syn_recv: Option<u64>,
    pub tcp_established: Option<u64>,
    pub tcp_fin_wait: Option<u64>,
    pub tcp_close_wait: Option<u64>,
    pub tcp_last_ack: Option<u64>,
    pub tcp_time_wait: Option<u64>,
    pub tcp_close: Option<u64>,
    pub udp: Option<u64>,
    pub udp_stream: Option<u64>,
    pub icmp: Option<u64>,
    pub sctp_unreplied: Option<u64>,
    pub sctp_established: Option<u64>,
    /// Any other IP protocol.
    pub generic: Option<u64>,
    /// A TCP/SCTP flow whose backend left every EndpointSlice (not a Linux timeout).
    pub backend_gone: Option<u64>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaglevConfig {
    /// Slots per Maglev table: a prime, ideally ≥ 100 × the largest backend count.
    #[serde(default = "default_table_size")]
    pub table_size: u32,
}

fn default_table_size() -> u32 {
    dataplane::maglev::DEFAULT_TABLE_SIZE
}

impl Default for MaglevConfig {
    fn default() -> Self {
        MaglevConfig {
            table_size: default_table_size(),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Admin HTTP listener; loopback unless you mean it.
    #[serde(default = "default_admin")]
    pub listen: SocketAddr,
}

fn default_admin() -> SocketAddr {
    "127.0.0.1:9900".parse().expect("static address")
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: default_admin(),
        }
    }
}

/// Which Services' addresses are announced.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AnnounceWhen {
    /// Only a Service port with at least one usable endpoint attracts traffic.
    #[default]
    UsableEndpoints,
    /// Every LoadBalancer ingress IP and externalIP, with or without endpoints.
    Always,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AnnounceConfig {
    #[serde(default)]
    pub enabled: bool,
    #[serde(default)]
    pub when: AnnounceWhen,
    /// Kernel interface the routes point at. Default: the `iface=` of the first uplink's
    /// exception vdev (the tap dies with the process, and its routes with it).
    #[serde(default)]
    pub device: Option<String>,
    /// Named network namespace (`/run/netns/NAME`) holding `device`.
    #[serde(default)]
    pub netns: Option<String>,
    /// Kernel routing table the routes go to (the BGP speaker learns it).
    #[serde(default = "default_announce_table")]
    pub table: u32,
    /// Announced whenever the gateway is ready (e.g. the Service CIDR).
    #[serde(default)]
    pub extra_prefixes: Vec<Ipv4Net>,
    /// Also announce each NodePort address (/32).
    #[serde(default)]
    pub node_port_addresses: bool,
}

fn default_announce_table() -> u32 {
    100
}

impl Default for AnnounceConfig {
    fn default() -> Self {
        AnnounceConfig {
            enabled: false,
            when: AnnounceWhen::default(),
            device: None,
            netns: None,
            table: default_announce_table(),
            extra_prefixes: Vec::new(),
            node_port_addresses: false,
        }
    }
}

/// A config error, already phrased for the user: `FILE: KEY: what is wrong`.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {key}: {message}")]
pub struct ConfigError {
    pub file: String,
    pub key: String,
    pub message: String,
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            key: "(file)".into(),
            message: format!("cannot read: {}", io_reason(&e)),
        })?;
        let mut config = Config::parse(&text, &file)?;
        if let Some(services_path) = &config.services.path {
            if services_path.is_relative() {
                let base = path.parent().unwrap_or(Path::new("."));
                config.services.path = Some(base.join(services_path));
            }
        }
        Ok(config)
    }

    /// Checks that the service source can be read: the manifest path of the `files`
    /// source (a file that opens, or a directory that lists), the `services.kubeconfig`
    /// file of the `kubernetes` source (readable, and a kubeconfig). `run` and `check` call
    /// it before anything starts, so an unusable source is a one-line error instead of a
    /// gateway that never becomes ready. `file` is the config file, named in errors.
    ///
    /// Only what the config names is checked: a manifest path that disappears later keeps
    /// the last snapshot, and an omitted kubeconfig is inferred when the source starts.
    pub fn check_service_source(&self, file: &Path) -> Result<(), ConfigError> {
        let err = |key: &str, path: &Path, reason: String| ConfigError {
            file: file.display().to_string(),
            key: key.to_string(),
            message: format!("{}: {reason}", path.display()),
        };
        match self.services.source {
            SourceKind::Files => {
                let path = self.services.path.as_deref().expect("validated");
                let readable = std::fs::metadata(path).and_then(|meta| {
                    if meta.is_dir() {
                        std::fs::read_dir(path).map(drop)
                    } else {
                        std::fs::File::open(path).map(drop)
                    }
                });
                readable.map_err(|e| err("services.path", path, io_reason(&e)))
            }
            SourceKind::Kubernetes => {
                let Some(path) = self.services.kubeconfig.as_deref() else {
                    return Ok(());
                };
                let text = std::fs::read_to_string(path)
                    .map_err(|e| err("services.kubeconfig", path, io_reason(&e)))?;
                kube::config::Kubeconfig::from_yaml(&text)
                    .map(drop)
                    .map_err(|e| {
                        // The YAML parser adds a multi-line excerpt of the file: the first line
                        // says what and where.
                        let what = e.to_string();
                        let what = what.lines().next().unwrap_or_default();
                        err(
                            "services.kubeconfig",
                            path,
                            format!("not a kubeconfig: {what}"),
                        )
                    })
            }
        }
    }

    /// Parses and validates config text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        // serde-saphyr (maintained, panic-free, with nesting and size budgets) reads the
        // YAML; serde_path_to_error tracks the key path of a value that does not fit.
        let mut key = String::new();
        let options = serde_saphyr::options! { with_snippet: false };
        let parsed =
            serde_saphyr::with_deserializer_from_str_with_options(text, options, |deserializer| {
                serde_path_to_error::deserialize(deserializer).map_err(|e| {
                    key = e.path().to_string();
                    e.into_inner()
                })
            });
        let config: Config = parsed.map_err(|error| {
            // "MESSAGE at line L, column C": the place helps, keep it.
            let mut message = error.render_with_options(serde_saphyr::render_options! {
                snippets: serde_saphyr::SnippetMode::Off,
            });
            // A message may start with the key path the parser tracks itself: the key, or
            // for an unknown field its parent. The path is printed once.
            if let Some((prefix, rest)) = message.split_once(": ") {
                let within = key == prefix
                    || key
                        .strip_prefix(prefix)
                        .is_some_and(|tail| tail.starts_with(['.', '[']));
                if within {
                    key = prefix.to_string();
                    message = rest.to_string();
                }
            }
            // An unknown field is named by its parent's path: the message names the field.
            if let Some(field) = message
                .strip_prefix("unknown field `")
                .and_then(|rest| rest.split_once('`'))
                .map(|(field, _)| field)
            {
                if let Some(parent) = key.strip_suffix(&format!(".{field}")) {
                    key = parent.to_string();
                } else if key == field {
                    key.clear();
                }
            }
            if message.is_empty() {
                message = "invalid value".into();
            }
            ConfigError {
                file: file.to_string(),
                key: if key.is_empty() || key == "." {
                    "(top level)".into()
                } else {
                    key.clone()
                },
                message,
            }
        })?;
        config.validate(file)?;
        Ok(config)
    }

    fn validate(&self, file: &str) -> Result<(), ConfigError> {
        let err = |key: String, message: String| ConfigError {
            file: file.to_string(),
            key,
            message,
        };
        if self.ports.is_empty() {
            return Err(err("ports".into(), "at least one port is required".into()));
        }
        if self.fragments.reassemble {
            let f = &self.fragments;
            if !(1..=65536).contains(&f.max_datagrams) {
                return Err(err(
                    "fragments.max_datagrams".into(),
                    format!("{} is outside 1..=65536", f.max_datagrams),
                ));
            }
            if !(10..=60_000).contains(&f.timeout_ms) {
                return Err(err(
                    "fragments.timeout_ms".into(),
                    format!("{} is outside 10..=60000", f.timeout_ms),
                ));
            }
        }
        let mut names = HashSet::new();
        for (i, port) in self.ports.iter().enumerate() {
            if !names.insert(port.name.as_str()) {
                return Err(err(
                    format!("ports[{i}].name"),
                    format!("duplicate port name {:?}", port.name),
                ));
            }
            if port.device.trim().is_empty() {
                return Err(err(format!("ports[{i}].device"), "empty device".into()));
            }
            if port.queues == 0 {
                return Err(err(
                    format!("ports[{i}].queues"),
                    "must be at least 1".into(),
                ));
            }
            if port.mtu < 576 || port.mtu > 9000 {
                return Err(err(
                    format!("ports[{i}].mtu"),
                    format!("{} is outside 576..=9000", port.mtu),
                ));
            }
        }
        let known = |name: &str| self.ports.iter().any(|p| p.name == name);
        for (i, route) in self.routes.iter().enumerate() {
            if !known(&route.port) {
                return Err(err(
                    format!("routes[{i}].port"),
                    format!(
                        "unknown port name {:?} (ports are: {})",
                        route.port,
                        self.port_names()
                    ),
                ));
            }
        }
        for (i, neighbor) in self.neighbors.iter().enumerate() {
            if !known(&neighbor.port) {
                return Err(err(
                    format!("neighbors[{i}].port"),
                    format!(
                        "unknown port name {:?} (ports are: {})",
                        neighbor.port,
                        self.port_names()
                    ),
                ));
            }
            if parse_mac(&neighbor.mac).is_none() {
                return Err(err(
                    format!("neighbors[{i}].mac"),
                    format!(
                        "{:?} is not a MAC address like 02:00:00:00:00:01",
                        neighbor.mac
                    ),
                ));
            }
        }
        let cpus = machine_cores();
        if self.cores.workers.is_empty() {
            return Err(err(
                "cores.workers".into(),
                "at least one worker core is required".into(),
            ));
        }
        let mut seen = HashSet::new();
        for (i, &core) in self.cores.workers.iter().enumerate() {
            if core >= cpus {
                return Err(err(
                    format!("cores.workers[{i}]"),
                    format!(
                        "core {core} does not exist (this machine has cores 0..{})",
                        cpus - 1
                    ),
                ));
            }
            if !seen.insert(core) {
                return Err(err(
                    format!("cores.workers[{i}]"),
                    format!("core {core} listed twice"),
                ));
            }
        }
        if self.cores.control >= cpus {
            return Err(err(
                "cores.control".into(),
                format!(
                    "core {} does not exist (this machine has cores 0..{})",
                    self.cores.control,
                    cpus - 1
                ),
            ));
        }
        if let Some(vxlan) = &self.vxlan {
            if vxlan.vni >= 1 << 24 {
                return Err(err(
                    "vxlan.vni".into(),
                    format!("{} does not fit in 24 bits", vxlan.vni),
                ));
            }
            let owned = self
                .ports
                .iter()
                .filter(|p| p.role == PortRole::Cluster)
                .flat_map(|p| p.addresses.iter())
                .any(|a| a.addr() == vxlan.local_vtep);
            if !owned {
                return Err(err(
                    "vxlan.local_vtep".into(),
                    format!("{} is not an address of a cluster port", vxlan.local_vtep),
                ));
            }
            if self.services.source == SourceKind::Files
                && vxlan.nodes.is_some_and(|n| n != NodeScheme::None)
            {
                return Err(err(
                    "vxlan.nodes".into(),
                    "nodes are learned from the Kubernetes API: it needs services.source: \
                     kubernetes (the files source has vxlan.pod_cidrs)"
                        .into(),
                ));
            }
            for (i, pod) in vxlan.pod_cidrs.iter().enumerate() {
                if let Some(mac) = &pod.vtep_mac {
                    if parse_mac(mac).is_none() {
                        return Err(err(
                            format!("vxlan.pod_cidrs[{i}].vtep_mac"),
                            format!("{mac:?} is not a MAC address like 02:00:00:00:00:01"),
                        ));
                    }
                }
            }
        }
        match self.services.source {
            SourceKind::Files if self.services.path.is_none() => {
                return Err(err(
                    "services.path".into(),
                    "the files source needs a path (a manifest file or directory)".into(),
                ));
            }
            _ => {}
        }
        if !dataplane::maglev::is_prime(self.maglev.table_size) {
            return Err(err(
                "maglev.table_size".into(),
                format!(
                    "{} is not a prime (try 16381 or 65537)",
                    self.maglev.table_size
                ),
            ));
        }
        if self.snat.port_min > self.snat.port_max || self.snat.port_min < 1024 {
            return Err(err(
                "snat.port_min".into(),
                format!(
                    "range {}..={} must be within 1024..=65535 and not empty",
                    self.snat.port_min, self.snat.port_max
                ),
            ));
        }
        if self.conntrack.capacity == 0 {
            return Err(err(
                "conntrack.capacity".into(),
                "must be at least 1".into(),
            ));
        }
        if self.announce.enabled {
            self.validate_announce(file)?;
        }
        if self.mode == ForwardingMode::Io && self.ports.len() % 2 == 1 && self.ports.len() > 1 {
            return Err(err(
                "mode".into(),
                "io mode pairs ports in order: configure 1 or an even number of ports".into(),
            ));
        }
        Ok(())
    }

    fn validate_announce(&self, file: &str) -> Result<(), ConfigError> {
        let err = |key: &str, message: String| ConfigError {
            file: file.to_string(),
            key: key.to_string(),
            message,
        };
        let announce = &self.announce;
        if self.announce_device().is_none() {
            return Err(err(
                "announce.device",
                "not given, and no uplink port has an exception vdev with `iface=` to default to"
                    .into(),
            ));
        }
        if let Some(device) = &announce.device {
            let valid = !device.is_empty()
                && device.len() <= 15
                && !device.contains(['/', ' ', ':'])
                && device != "."
                && device != "..";
            if !valid {
                return Err(err(
                    "announce.device",
                    format!("{device:?} is not a Linux interface name (1-15 characters, no '/', ':' or space)"),
                ));
            }
        }
        if let Some(netns) = &announce.netns {
            if netns.is_empty() || netns.contains(['/', ' ']) || netns == "." || netns == ".." {
                return Err(err(
                    "announce.netns",
                    format!("{netns:?} is not a network namespace name (as `ip netns` lists)"),
                ));
            }
        }
        // 0 is unspecified, 253-255 are the kernel's default, main and local tables.
        if announce.table == 0 || (253..=255).contains(&announce.table) {
            return Err(err(
                "announce.table",
                format!(
                    "{} is reserved (0: unspecified, 253: default, 254: main, 255: local): \
                     use a table of its own, e.g. 100",
                    announce.table
                ),
            ));
        }
        Ok(())
    }

    /// The kernel interface announced routes point at: `announce.device`, or the `iface=`
    /// of the first uplink's exception vdev.
    pub fn announce_device(&self) -> Option<String> {
        if let Some(device) = &self.announce.device {
            return Some(device.clone());
        }
        self.ports
            .iter()
            .filter(|p| p.role == PortRole::Uplink)
            .filter_map(|p| p.exception.as_deref())
            .find_map(|vdev| {
                vdev.split(',')
                    .skip(1)
                    .find_map(|arg| arg.strip_prefix("iface="))
                    .map(str::to_string)
            })
    }

    fn port_names(&self) -> String {
        self.ports
            .iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Index of the port called `name`.
    pub fn port_index(&self, name: &str) -> Option<usize> {
        self.ports.iter().position(|p| p.name == name)
    }

    /// Addresses NodePorts answer on.
    pub fn node_port_addresses(&self) -> Vec<Ipv4Addr> {
        match &self.services.node_port_addresses {
            Some(addresses) => addresses.clone(),
            None => self
                .ports
                .iter()
                .filter(|p| p.role == PortRole::Uplink)
                .filter_map(|p| p.addresses.first().map(|a| a.addr()))
                .collect(),
        }
    }

    /// How nodes are learned: from the API only with the `kubernetes` source and VXLAN
    /// configured, by default with flannel's annotations.
    pub fn node_scheme(&self) -> NodeScheme {
        match (&self.vxlan, self.services.source) {
            (Some(vxlan), SourceKind::Kubernetes) => vxlan.nodes.unwrap_or(NodeScheme::Flannel),
            _ => NodeScheme::None,
        }
    }

    /// Masquerade addresses.
    pub fn snat_addresses(&self) -> Vec<Ipv4Addr> {
        match &self.snat.addresses {
            Some(addresses) => addresses.clone(),
            None => self
                .ports
                .iter()
                .filter(|p| p.role == PortRole::Cluster)
                .filter_map(|p| p.addresses.first().map(|a| a.addr()))
                .collect(),
        }
    }
}

/// An I/O error as the end of a one-line message: `no such file or directory`, without
/// the `(os error 2)` that `std::io::Error` appends.
pub fn io_reason(error: &std::io::Error) -> String {
    let text = error.to_string();
    let text = match text.rfind(" (os error ") {
        Some(at) if text.ends_with(')') => &text[..at],
        _ => text.as_str(),
    };
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => text.to_string(),
    }
}

/// `aa:bb:cc:dd:ee:ff` → bytes.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in mac.iter_mut() {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// The machine's cores (one past the highest online CPU), whatever this thread's affinity:
/// a reload validates the config on the control thread, which is pinned to one core.
fn machine_cores() -> usize {
    let online = std::fs::read_to_string("/sys/devices/system/cpu/online").ok();
    // "0-1", "0,2-3": the last number is the highest online CPU.
    let highest = online.as_deref().and_then(|list| {
        list.trim()
            .rsplit([',', '-'])
            .next()
            .and_then(|n| n.parse::<usize>().ok())
    });
    highest.map(|h| h + 1).unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    })
}
