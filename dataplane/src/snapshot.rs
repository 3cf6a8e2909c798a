//! Everything a worker reads, compiled by the control side into one immutable value and
//! published with a single pointer swap (`arc_swap::ArcSwap<Snapshot>`). A worker loads it
//! once per burst. Conntrack entries store translations by value, never an index into a
//! snapshot, so a swap never invalidates a flow.

use std::collections::HashMap;

use rustc_hash::FxHashMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use ipnet::Ipv4Net;

use crate::maglev::MaglevTable;

/// IP protocol numbers of the protocols a Service can carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Protocol {
    Tcp = 6,
    Udp = 17,
    Sctp = 132,
}

impl Protocol {
    pub fn from_ip_proto(proto: u8) -> Option<Protocol> {
        match proto {
            6 => Some(Protocol::Tcp),
            17 => Some(Protocol::Udp),
            132 => Some(Protocol::Sctp),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What destination a frontend answers on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FrontendKind {
    ClusterIp,
    NodePort,
    LoadBalancer,
    ExternalIp,
}

impl FrontendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FrontendKind::ClusterIp => "ClusterIP",
            FrontendKind::NodePort => "NodePort",
            FrontendKind::LoadBalancer => "LoadBalancer",
            FrontendKind::ExternalIp => "ExternalIP",
        }
    }
}

/// Condition of an endpoint as the EndpointSlice reports it, reduced to what the
/// dataplane decides on (kube-semantics items 11–12).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EndpointState {
    /// `ready`: chosen for new connections.
    Ready,
    /// Not ready but `serving` and `terminating`: keeps its flows; chosen for new
    /// connections only when no endpoint of the frontend is ready.
    ServingTerminating,
    /// Neither: chosen for no new connection, and its flows end (UDP ones pick again).
    NotServing,
}

impl EndpointState {
    pub fn as_str(self) -> &'static str {
        match self {
            EndpointState::Ready => "ready",
            EndpointState::ServingTerminating => "serving-terminating",
            EndpointState::NotServing => "not-serving",
        }
    }
}

/// One endpoint of a Service port (ip:port from the EndpointSlice).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Backend {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub state: EndpointState,
    /// `nodeName` of the endpoint, for internalTrafficPolicy: Local.
    pub node: Option<Arc<str>>,
}

/// A (namespace/name, port name, protocol) of a Service: the unit kube-proxy serves.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServicePortName {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    pub port_name: Arc<str>,
    pub protocol: Protocol,
}

impl ServicePortName {
    /// A hash of the name that is the same in every snapshot and every process: the key of
    /// what outlives a snapshot's frontend ids (ClientIP affinity, shared by the port's
    /// ClusterIP, NodePort, LoadBalancer and externalIP frontends, as kube-proxy's is).
    pub fn stable_id(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut hasher = rustc_hash::FxHasher::default();
        self.hash(&mut hasher);
        hasher.finish()
    }
}

impl std::fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if !self.port_name.is_empty() {
            write!(f, ":{}", self.port_name)?;
        }
        write!(f, "/{}", self.protocol)
    }
}

/// The backends of one Service port and the Maglev table over the usable ones. Shared by
/// every frontend (ClusterIP, NodePort, LB, externalIP) of that port, and between
/// snapshots when the port's inputs did not change.
#[derive(Debug)]
pub struct BackendSet {
    /// Every endpoint known for the port, in a stable order (sorted by ip, port).
    pub backends: Vec<Backend>,
    /// Maglev table over `usable` (indices into `backends`). Empty when nothing is usable.
    pub maglev: MaglevTable,
    /// Indices into `backends` of the endpoints chosen for new connections: the ready ones,
    /// or when none is ready the serving-terminating ones.
    pub usable: Vec<u32>,
}

impl BackendSet {
    /// The backend a Maglev lookup of `flow_hash` picks, if any endpoint is usable.
    #[inline]
    pub fn pick(&self, flow_hash: u64) -> Option<&Backend> {
        let slot = self.maglev.lookup(flow_hash)?;
        let index = *self.usable.get(slot as usize)?;
        self.backends.get(index as usize)
    }

    /// The state of `addr:port` in this set, or `None` when it is gone entirely.
    pub fn state_of(&self, addr: Ipv4Addr, port: u16) -> Option<EndpointState> {
        self.position(addr, port).map(|i| self.backends[i].state)
    }

    /// Index of `addr:port` in `backends` (sorted, so a binary search).
    #[inline]
    pub fn position(&self, addr: Ipv4Addr, port: u16) -> Option<usize> {
        self.backends
            .binary_search_by(|b| (b.addr, b.port).cmp(&(addr, port)))
            .ok()
    }
}

/// Shards of [`BackendPresence`]: an EndpointSlice change copies the few shards it touches,
/// not the whole index.
const PRESENCE_SHARDS: usize = 256;

/// Slices listing each (protocol, address, port) of one shard.
type PresenceShard = FxHashMap<(Protocol, Ipv4Addr, u16), u32>;

/// Every endpoint (protocol, address, port) of every EndpointSlice the source knows, in any
/// condition, whether or not a Service of the snapshot names the slice: what an established
/// TCP flow whose frontend went away (a nodePort edit, a deleted Service) is validated
/// against (kube-semantics item 12). A count per key, since an endpoint can be listed by
/// several slices.
///
/// Persistent: cloning it (once per snapshot) clones [`PRESENCE_SHARDS`] `Arc`s, and a
/// change copies only the shards it touches (`Arc::make_mut`), so that a one-endpoint update
/// of a 250,000-endpoint cluster stays cheap.
#[derive(Clone, Debug, Default)]
pub struct BackendPresence {
    /// Empty until the first endpoint is added.
    shards: Vec<Arc<PresenceShard>>,
    len: usize,
}

impl BackendPresence {
    fn shard_of(protocol: Protocol, addr: Ipv4Addr, port: u16) -> usize {
        let k = (u64::from(u32::from(addr)) << 24) | (u64::from(port) << 8) | protocol as u64;
        (crate::maglev::fmix64(k) % PRESENCE_SHARDS as u64) as usize
    }

    /// Whether some EndpointSlice lists `addr:port` for `protocol`.
    pub fn contains(&self, protocol: Protocol, addr: Ipv4Addr, port: u16) -> bool {
        self.shards
            .get(Self::shard_of(protocol, addr, port))
            .is_some_and(|shard| shard.contains_key(&(protocol, addr, port)))
    }

    /// One more slice lists `addr:port`.
    pub fn add(&mut self, protocol: Protocol, addr: Ipv4Addr, port: u16) {
        if self.shards.is_empty() {
            self.shards = (0..PRESENCE_SHARDS).map(|_| Arc::default()).collect();
        }
        let shard = Arc::make_mut(&mut self.shards[Self::shard_of(protocol, addr, port)]);
        let count = shard.entry((protocol, addr, port)).or_insert(0);
        if *count == 0 {
            self.len += 1;
        }
        *count += 1;
    }

    /// One slice fewer lists `addr:port` (a key no slice lists is left alone).
    pub fn remove(&mut self, protocol: Protocol, addr: Ipv4Addr, port: u16) {
        let Some(shard) = self.shards.get_mut(Self::shard_of(protocol, addr, port)) else {
            return;
        };
        if !shard.contains_key(&(protocol, addr, port)) {
            return;
        }
        let shard = Arc::make_mut(shard);
        if let Some(count) = shard.get_mut(&(protocol, addr, port)) {
            *count -= 1;
            if *count == 0 {
                shard.remove(&(protocol, addr, port));
                self.len -= 1;
            }
        }
    }

    /// Distinct (protocol, address, port) listed.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// internalTrafficPolicy: Local, seen from a gateway (kube-semantics item 18).
#[derive(Clone, Debug)]
pub enum InternalPolicy {
    Cluster,
    /// Pod-originated traffic (arriving over VXLAN from a node's VTEP) goes only to
    /// endpoints on the sending pod's node: one backend set per node name.
    Local {
        by_node: HashMap<Arc<str>, Arc<BackendSet>>,
    },
}

/// One served frontend: a destination (ip or node-port, protocol, port) and what to do
/// with a new connection to it.
#[derive(Debug)]
pub struct Frontend {
    /// Dense index for per-frontend counters (`0..Snapshot::frontend_count`). Meaningful
    /// within one snapshot; the compiler keeps it (and the `Arc<Frontend>`) across snapshots
    /// while no frontend is added, removed or re-keyed, but readers must not rely on that.
    pub id: u32,
    pub service: ServicePortName,
    pub kind: FrontendKind,
    /// The address matched (the VIP; for NodePort the node-port address is any of
    /// `Snapshot::node_port_addresses`, and this is unspecified).
    pub addr: Ipv4Addr,
    pub protocol: Protocol,
    pub port: u16,
    pub backends: Arc<BackendSet>,
    /// SNAT new connections to the cluster-side address (externalTrafficPolicy: Cluster,
    /// pod-originated ClusterIP traffic; kube-semantics items 16–19).
    pub masquerade: bool,
    /// LoadBalancer source ranges; empty means every source is allowed.
    pub source_ranges: Vec<Ipv4Net>,
    /// sessionAffinity: ClientIP timeout in seconds.
    pub affinity_timeout_secs: Option<u32>,
    pub internal_policy: InternalPolicy,
}

/// Key of an address-bound frontend (ClusterIP, LB ingress IP, externalIP).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FrontendKey {
    pub addr: Ipv4Addr,
    pub protocol: Protocol,
    pub port: u16,
}

/// A remote pod CIDR reached through a node's VTEP (VXLAN encapsulation).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodCidrRoute {
    pub cidr: Ipv4Net,
    pub vtep: Ipv4Addr,
    pub vni: u32,
    /// Kubernetes node name behind the VTEP (internalTrafficPolicy: Local).
    pub node: Option<Arc<str>>,
    /// MAC of the node's VXLAN device (flannel's `VtepMAC`): the inner destination MAC of
    /// frames encapsulated toward it. Unset: learned from the node's own VXLAN frames.
    pub vtep_mac: Option<crate::wire::MacAddr>,
}

/// What a config reload changes in the workers without a restart. Each worker applies a
/// new one (by `id`) once, when it first loads a snapshot carrying it: one comparison per
/// snapshot change, nothing per packet.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LiveSettings {
    /// Distinct per published settings (the publisher counts them); 0 is never used.
    pub id: u64,
    /// Static routes (connected ones follow the ports, which do not change).
    pub routes: Vec<crate::pipeline::RouteConfig>,
    pub static_neighbors: Vec<(u16, Ipv4Addr, crate::wire::MacAddr)>,
    /// Empty: the primary address of each cluster port.
    pub snat_addresses: Vec<Ipv4Addr>,
    pub timeouts: crate::conntrack::Timeouts,
    pub icmp_errors_per_second: u32,
    /// `edge.routable_prefixes`.
    pub routable_prefixes: Vec<Ipv4Net>,
}

/// The immutable tables every worker reads.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Increases by one per published snapshot; 0 means "nothing installed yet".
    pub generation: u64,
    /// ClusterIP, LoadBalancer and externalIP frontends.
    /// Fx-hashed (keys are not attacker-chosen: only the control plane inserts), looked up
    /// for every new flow.
    pub frontends: FxHashMap<FrontendKey, Arc<Frontend>>,
    /// NodePort frontends by (protocol, nodePort), matched on `node_port_addresses`.
    pub node_ports: FxHashMap<(Protocol, u16), Arc<Frontend>>,
    pub node_port_addresses: Vec<Ipv4Addr>,
    /// Every service address (ClusterIP, LB ingress, externalIP) with a frontend: a packet
    /// to one of these on an unknown port is rejected (kube-semantics item 8).
    pub service_addresses: FxHashMap<Ipv4Addr, FrontendKind>,
    /// The service CIDR, if configured: unallocated addresses inside it are dropped.
    pub service_cidr: Option<Ipv4Net>,
    /// Remote pod CIDRs behind node VTEPs.
    pub pod_routes: Vec<PodCidrRoute>,
    /// The settings of the config that apply without a restart (a reload changes them);
    /// `None`: the ones each worker was started with.
    pub settings: Option<Arc<LiveSettings>>,
    /// Number of frontends (ids are `0..frontend_count`).
    pub frontend_count: u32,
    /// Every frontend by id (the compiler fills it, or [`Snapshot::index_counters`]).
    pub frontends_by_id: Vec<Arc<Frontend>>,
    /// Every endpoint of every EndpointSlice, in any condition (see [`BackendPresence`]).
    pub backend_presence: BackendPresence,
    /// Per-backend packet counters of this snapshot: frontend `id`'s backend `i` (index in
    /// its `backends.backends`) counts at `backend_counter_base[id] + i`; the last entry is
    /// the number of counters. The compiler fills it, or [`Snapshot::index_counters`].
    pub backend_counter_base: Vec<u32>,
}

impl Snapshot {
    /// The frontend a packet to `dst:port` matches, if any. NodePort frontends match only
    /// on the node-port addresses.
    #[inline]
    pub fn match_frontend(
        &self,
        dst: Ipv4Addr,
        protocol: Protocol,
        port: u16,
    ) -> Option<&Arc<Frontend>> {
        if let Some(frontend) = self.frontends.get(&FrontendKey {
            addr: dst,
            protocol,
            port,
        }) {
            return Some(frontend);
        }
        if !self.node_ports.is_empty() && self.node_port_addresses.contains(&dst) {
            return self.node_ports.get(&(protocol, port));
        }
        None
    }

    /// Fills `frontends_by_id` and `backend_counter_base` from the frontend maps; the
    /// compiler calls it once the frontends are in place.
    pub fn index_counters(&mut self) {
        let mut by_id: Vec<Arc<Frontend>> = self
            .frontends
            .values()
            .chain(self.node_ports.values())
            .cloned()
            .collect();
        by_id.sort_by_key(|f| f.id);
        self.backend_counter_base = Snapshot::counter_bases(&by_id);
        self.frontends_by_id = by_id;
    }

    /// `backend_counter_base` for frontends listed by id: prefix sums of their backends.
    pub fn counter_bases(by_id: &[Arc<Frontend>]) -> Vec<u32> {
        let mut bases = Vec::with_capacity(by_id.len() + 1);
        let mut next = 0u32;
        for f in by_id {
            bases.push(next);
            next += f.backends.backends.len() as u32;
        }
        bases.push(next);
        bases
    }

    /// Number of per-backend packet counters (see `backend_counter_base`).
    pub fn backend_counter_count(&self) -> usize {
        self.backend_counter_base.last().copied().unwrap_or(0) as usize
    }

    /// The per-backend counter of flows of frontend `frontend_id` to `addr:port`.
    #[inline]
    pub fn backend_counter(&self, frontend_id: u32, addr: Ipv4Addr, port: u16) -> Option<usize> {
        let frontend = self.frontends_by_id.get(frontend_id as usize)?;
        let base = *self.backend_counter_base.get(frontend_id as usize)?;
        Some(base as usize + frontend.backends.position(addr, port)?)
    }

    /// Every frontend, address-bound ones first, in a stable order (for the admin API).
    pub fn all_frontends(&self) -> Vec<&Arc<Frontend>> {
        let mut all: Vec<&Arc<Frontend>> = self
            .frontends
            .values()
            .chain(self.node_ports.values())
            .collect();
        all.sort_by_key(|f| f.id);
        all
    }
}
