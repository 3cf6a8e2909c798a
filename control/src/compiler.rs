//! The compiler: a pure function from the [`Model`] (Services and EndpointSlices as
//! Kubernetes objects) to the dataplane [`Snapshot`], honouring every item of
//! `kube-semantics.md`. It is incremental: the [`Compiler`] keeps, per Service, the frontends
//! it compiled (with their `Arc<BackendSet>`s and Maglev tables) and the exact inputs they
//! came from (the Service and its EndpointSlices, by `Arc` identity, else by value). A
//! compilation recompiles only Services whose inputs changed; every other Service's frontends
//! and Maglev tables are reused as they are. The model is walked in step with the previous
//! one (both are sorted by key), so an unchanged object costs a key comparison and an `Arc`
//! identity check. When the recompiled Services claim exactly the frontends they claimed
//! before (an endpoint or policy change), the previous frontend tables are patched: only
//! their frontends get new `Arc<Frontend>`s, every id stays. Otherwise (a Service or frontend
//! added, removed or re-keyed) conflict resolution and id assignment run anew over every
//! frontend. Either way the result is the same as compiling the model from scratch
//! (`Compiler::new(..).compile(model)`), which a test checks over a sequence of changes.
//!
//! Maglev table size per backend set: the configured `maglev.table_size` (a prime), whatever
//! the set's size, as Maglev's paper, Katran and Cilium do: only at a fixed size does a
//! change of the set move no more flows than those of the endpoints that came or went
//! (kube-semantics item 14). A size that followed the endpoint count would reshuffle
//! nearly every flow on every scale-up or scale-down. A set with as many usable endpoints
//! as the configured size gets the next prime ≥ 100 × usable (Maglev needs M > N). The
//! cost is memory: 2 bytes a slot (32 KiB per distinct backend set at 16,381), which a
//! cluster of many thousands of Services can lower with a smaller `maglev.table_size`.
//!
//! IP families: only IPv4 is compiled today. The family decisions are made in one place
//! ([`IpFamily`] and the `*_for_family` helpers): a Service is compiled once per family it
//! has a clusterIP of, and endpoints, externalIPs, LB ingress IPs and source ranges of the
//! other family are ignored. Adding IPv6 means adding a family to [`FAMILIES`] plus IPv6
//! variants of the snapshot types, not rewriting the compiler.
//!
//! Choices made where Kubernetes leaves room (documented for the README):
//! - Conflicting frontends (two Services claiming the same address/protocol/port, or the
//!   same NodePort): the older Service (creationTimestamp, then namespace/name; a Service
//!   without a timestamp counts as newest) keeps the frontend, the other is warned about.
//! - An endpoint listed in several slices with different conditions keeps its best state
//!   (ready > serving-terminating > not-serving), and the smallest node name on a tie, so
//!   the result never depends on slice order.
//! - `loadBalancerSourceRanges` that are all invalid or of the other family leave the LB
//!   frontend open to every source, as kube-proxy does (each invalid range is warned about).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use dataplane::maglev::{is_prime, MaglevTable, DEFAULT_TABLE_SIZE, MAX_BACKENDS};
use dataplane::snapshot::{
    Backend, BackendPresence, BackendSet, EndpointState, Frontend, FrontendKey, FrontendKind,
    InternalPolicy, PodCidrRoute, Protocol, ServicePortName, Snapshot,
};
use ipnet::{IpNet, Ipv4Net};
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use rustc_hash::FxHashMap;

use crate::config::NodeScheme;
use crate::model::{Model, ObjectKey, ObjectKind};
use crate::nodes::NodeRoutes;

/// The label that ties an EndpointSlice to its Service (same namespace).
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// `sessionAffinityConfig.clientIP.timeoutSeconds` default (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT_SECS: u32 = 10800;

/// What the compiler needs beyond the model: gateway-side configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompileOptions {
    /// Addresses NodePort frontends answer on (item 5).
    pub node_port_addresses: Vec<Ipv4Addr>,
    /// Maglev table size: a prime larger than any port's usable endpoint count.
    pub maglev_table_size: u32,
    /// The service CIDR; unallocated addresses inside it are dropped (item 8).
    pub service_cidr: Option<Ipv4Net>,
    /// Remote pod CIDRs behind node VTEPs; their `node` names map VTEPs to nodes for
    /// internalTrafficPolicy: Local (item 18).
    pub pod_routes: Vec<PodCidrRoute>,
    /// Masquerade pod-originated ClusterIP traffic (item 19). Default true.
    pub masquerade_cluster_ip: bool,
    /// How the model's `nodes` add pod routes to the static `pod_routes` (which pin the
    /// nodes they name); `None`: the model's nodes are ignored. Under any other scheme the
    /// known nodes are authoritative: an endpoint on a node that is not known is not used.
    pub node_scheme: NodeScheme,
    /// The VNI of pod routes learned from nodes.
    pub vni: u32,
}

impl Default for CompileOptions {
    fn default() -> Self {
        CompileOptions {
            node_port_addresses: Vec::new(),
            maglev_table_size: DEFAULT_TABLE_SIZE,
            service_cidr: None,
            pod_routes: Vec::new(),
            masquerade_cluster_ip: true,
            node_scheme: NodeScheme::None,
            vni: 0,
        }
    }
}

/// Counters of one compilation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompileStats {
    /// Services that produced at least one frontend.
    pub services: usize,
    /// Frontends in the snapshot (address-bound and NodePort).
    pub frontends: usize,
    /// Backends over every compiled service port (an endpoint of two ports counts twice).
    pub backends: usize,
    /// Backend sets taken from the cache (unchanged since the previous compilation, or
    /// identical to another port's set in this one).
    pub backend_sets_reused: usize,
    /// Backend sets (Maglev tables) built in this compilation.
    pub backend_sets_built: usize,
}

/// The result of one compilation.
#[derive(Debug)]
pub struct Compiled {
    /// The tables; `generation` is 0, the publisher sets it.
    pub snapshot: Snapshot,
    /// Everything the compiler ignored or decided on the user's behalf, in a stable order.
    pub warnings: Vec<Warning>,
    pub stats: CompileStats,
}

/// Something the compiler ignored or decided on the user's behalf.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Warning {
    /// The object whose field the warning is about; `None` when it is about no one field
    /// (a conflict between Services, a gateway option).
    pub object: Option<(ObjectKind, ObjectKey)>,
    /// The field path in `object` (`spec.ports[0].protocol`); empty when `object` is `None`.
    pub field: String,
    /// What is wrong or was decided, and what the gateway does about it.
    pub message: String,
    /// The value is invalid — the API server would have refused it — so the gateway
    /// ignores it (kube-proxy does the same). `check` fails on these; the other warnings are
    /// decisions on valid input and only notes.
    pub invalid: bool,
}

impl Warning {
    /// A decision on valid input, not about one field.
    pub fn note(message: String) -> Warning {
        Warning {
            object: None,
            field: String::new(),
            message,
            invalid: false,
        }
    }

    /// An invalid value at `field` of an object.
    pub fn invalid(kind: ObjectKind, key: ObjectKey, field: String, message: String) -> Warning {
        Warning {
            object: Some((kind, key)),
            field,
            message,
            invalid: true,
        }
    }

    /// The warning with its object named as `model` knows it: with the file and document
    /// it was read from (`services.yaml: document 2 (Service lab/web): spec.clusterIP: …`)
    /// for the `files` source, as `Service lab/web: spec.clusterIP: …` otherwise.
    pub fn located(&self, model: &Model) -> String {
        match &self.object {
            Some((kind, key)) => format!(
                "{}: {}: {}",
                model.describe(*kind, key),
                self.field,
                self.message
            ),
            None => self.message.clone(),
        }
    }
}

impl std::fmt::Display for Warning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.object {
            Some((kind, key)) => write!(f, "{kind} {key}: {}: {}", self.field, self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// What one Service compiled to, and the inputs it was compiled from.
#[derive(Debug)]
struct ServiceEntry {
    service: Arc<Service>,
    slices: Vec<Arc<EndpointSlice>>,
    candidates: Vec<Candidate>,
    /// Id of each of `candidates` in the last assembled snapshot (`None`: lost a conflict).
    ids: Vec<Option<u32>>,
    /// Backend sets of `candidates` (for reuse when the inputs change but a set does not).
    sets: Vec<Arc<BackendSet>>,
    warnings: Vec<Warning>,
    backends: usize,
    /// One of the Service's slices changed since the entry was compiled.
    dirty: bool,
}

impl ServiceEntry {
    /// True when `service` and `slices` are the inputs this entry was compiled from: the
    /// same objects (the kube reflector keeps unchanged objects' `Arc`s), or equal ones (the
    /// files source parses every object anew on a reload).
    fn compiled_from(&self, service: &Arc<Service>, slices: &[&Arc<EndpointSlice>]) -> bool {
        (Arc::ptr_eq(&self.service, service) || *self.service == **service)
            && self.slices.len() == slices.len()
            && self
                .slices
                .iter()
                .zip(slices)
                .all(|(a, b)| Arc::ptr_eq(a, b) || **a == ***b)
    }
}

/// An EndpointSlice of the last model and the Service it names (its
/// `kubernetes.io/service-name` label).
#[derive(Debug)]
struct SliceEntry {
    slice: Arc<EndpointSlice>,
    service: Option<String>,
}

/// The frontend tables of the last compilation, kept so that a change that adds, removes or
/// moves no frontend (an endpoint change, a policy change) patches them: unchanged frontends
/// keep their `Arc<Frontend>` and their id.
#[derive(Debug)]
struct Assembly {
    frontends: FxHashMap<FrontendKey, Arc<Frontend>>,
    node_ports: FxHashMap<(Protocol, u16), Arc<Frontend>>,
    service_addresses: FxHashMap<Ipv4Addr, FrontendKind>,
    by_id: Vec<Arc<Frontend>>,
    node_port_addresses: Vec<Ipv4Addr>,
    /// Warnings of conflict resolution and of the node-port addresses.
    warnings: Vec<Warning>,
    /// Services with at least one frontend.
    services: usize,
}

impl Assembly {
    /// Puts `frontend` in the map its kind belongs to, under its key (replacing the
    /// frontend of that key, if any).
    fn place(&mut self, frontend: &Arc<Frontend>) {
        if frontend.kind == FrontendKind::NodePort {
            self.node_ports
                .insert((frontend.protocol, frontend.port), frontend.clone());
        } else {
            self.frontends.insert(
                FrontendKey {
                    addr: frontend.addr,
                    protocol: frontend.protocol,
                    port: frontend.port,
                },
                frontend.clone(),
            );
        }
    }

    /// Replaces frontend `frontend.id` (same key, same kind) by `frontend`.
    fn replace(&mut self, frontend: Arc<Frontend>) {
        self.place(&frontend);
        let id = frontend.id as usize;
        self.by_id[id] = frontend;
    }

    /// The snapshot of these tables (generation 0), with `pod_routes`.
    fn snapshot(&self, options: &CompileOptions, pod_routes: Vec<PodCidrRoute>) -> Snapshot {
        Snapshot {
            generation: 0,
            frontends: self.frontends.clone(),
            node_ports: self.node_ports.clone(),
            node_port_addresses: self.node_port_addresses.clone(),
            service_addresses: self.service_addresses.clone(),
            service_cidr: options.service_cidr,
            pod_routes,
            settings: None,
            frontend_count: self.by_id.len() as u32,
            frontends_by_id: self.by_id.clone(),
            backend_counter_base: Snapshot::counter_bases(&self.by_id),
            backend_presence: BackendPresence::default(),
        }
    }
}

/// The labelled slices of each Service (its namespace and the slices' service-name label),
/// by slice name.
type SlicesOf = HashMap<ObjectKey, BTreeMap<String, Arc<EndpointSlice>>>;

/// Compiles models into snapshots, recompiling only Services whose inputs changed.
#[derive(Debug)]
pub struct Compiler {
    options: CompileOptions,
    /// Every Service of the last model, in model order.
    services: BTreeMap<ObjectKey, ServiceEntry>,
    /// Every EndpointSlice of the last model, in model order.
    slices: BTreeMap<ObjectKey, SliceEntry>,
    /// The labelled slices of each Service, by slice name (model order).
    slices_of: SlicesOf,
    /// The tables of the last compilation.
    assembly: Option<Assembly>,
    /// Every endpoint of every slice of the last model, kept up to date slice by slice.
    presence: BackendPresence,
    /// The node names the last compilation knew: when they change, every Service is
    /// compiled again (internalTrafficPolicy: Local and endpoints on unknown nodes depend on
    /// them); a change of a node's CIDR, VTEP or MAC alone recompiles nothing.
    node_names: Option<BTreeSet<Arc<str>>>,
}

/// An address family the compiler serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum IpFamily {
    V4,
}

/// The families compiled, in order. IPv6 is a later addition here.
pub const FAMILIES: &[IpFamily] = &[IpFamily::V4];

impl IpFamily {
    /// The EndpointSlice `addressType` of this family.
    fn address_type(self) -> &'static str {
        match self {
            IpFamily::V4 => "IPv4",
        }
    }

    fn v4(self, addr: IpAddr) -> Option<Ipv4Addr> {
        match (self, addr) {
            (IpFamily::V4, IpAddr::V4(a)) => Some(a),
            _ => None,
        }
    }
}

/// One frontend before conflict resolution and id assignment.
#[derive(Debug)]
struct Candidate {
    age: (Option<Time>, ObjectKey),
    service: ServicePortName,
    kind: FrontendKind,
    addr: Ipv4Addr,
    protocol: Protocol,
    port: u16,
    backends: Arc<BackendSet>,
    masquerade: bool,
    source_ranges: Vec<Ipv4Net>,
    affinity_timeout_secs: Option<u32>,
    internal_policy: InternalPolicy,
}

impl Candidate {
    /// The frontend this candidate becomes under `id`.
    fn frontend(&self, id: u32) -> Arc<Frontend> {
        Arc::new(Frontend {
            id,
            service: self.service.clone(),
            kind: self.kind,
            addr: self.addr,
            protocol: self.protocol,
            port: self.port,
            backends: self.backends.clone(),
            masquerade: self.masquerade,
            source_ranges: self.source_ranges.clone(),
            affinity_timeout_secs: self.affinity_timeout_secs,
            internal_policy: self.internal_policy.clone(),
        })
    }
}

fn kind_rank(kind: FrontendKind) -> u8 {
    match kind {
        FrontendKind::ClusterIp => 0,
        FrontendKind::NodePort => 1,
        FrontendKind::LoadBalancer => 2,
        FrontendKind::ExternalIp => 3,
    }
}

fn state_rank(state: EndpointState) -> u8 {
    match state {
        EndpointState::Ready => 0,
        EndpointState::ServingTerminating => 1,
        EndpointState::NotServing => 2,
    }
}

fn parse_protocol(value: Option<&str>) -> Option<Protocol> {
    match value.unwrap_or("TCP") {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        "SCTP" => Some(Protocol::Sctp),
        _ => None,
    }
}

fn port_u16(value: i32) -> Option<u16> {
    u16::try_from(value).ok().filter(|&p| p != 0)
}

fn next_prime(mut n: u32) -> u32 {
    while !is_prime(n) {
        n += 1;
    }
    n
}

/// The state of an endpoint from its conditions (item 11): missing ready/serving mean
/// true, missing terminating means false.
pub fn endpoint_state(
    ready: Option<bool>,
    serving: Option<bool>,
    terminating: Option<bool>,
) -> EndpointState {
    let ready = ready.unwrap_or(true);
    let serving = serving.unwrap_or(true);
    let terminating = terminating.unwrap_or(false);
    if ready {
        EndpointState::Ready
    } else if serving && terminating {
        EndpointState::ServingTerminating
    } else {
        EndpointState::NotServing
    }
}

/// Indices of the endpoints chosen for new connections: ready ones, or when none is ready
/// the serving-terminating ones (item 11).
fn usable_indices(backends: &[Backend]) -> Vec<u32> {
    let pick = |state: EndpointState| -> Vec<u32> {
        backends
            .iter()
            .enumerate()
            .filter(|(_, b)| b.state == state)
            .map(|(i, _)| i as u32)
            .collect()
    };
    let ready = pick(EndpointState::Ready);
    if ready.is_empty() {
        pick(EndpointState::ServingTerminating)
    } else {
        ready
    }
}

impl Compiler {
    pub fn new(options: CompileOptions) -> Compiler {
        Compiler {
            options,
            services: BTreeMap::new(),
            slices: BTreeMap::new(),
            slices_of: HashMap::new(),
            assembly: None,
            presence: BackendPresence::default(),
            node_names: None,
        }
    }

    pub fn options(&self) -> &CompileOptions {
        &self.options
    }

    /// Compiles `model` into a snapshot (generation 0). Never fails: anything unusable is
    /// skipped with a warning.
    ///
    /// The model is walked in step with the previous one (both sorted by key): an object
    /// whose `Arc` did not change costs a key comparison, nothing more. When no frontend was
    /// added, removed or re-keyed, the previous frontend tables are patched instead of
    /// rebuilt.
    pub fn compile(&mut self, model: &Model) -> Compiled {
        let nodes = crate::nodes::derive(
            self.options.node_scheme,
            self.options.vni,
            &self.options.pod_routes,
            &model.nodes,
        );
        let nodes_changed = self.node_names.as_ref() != Some(&nodes.names);
        if nodes_changed {
            self.node_names = Some(nodes.names.clone());
        }
        let mut run = Run {
            nodes: &nodes,
            sets_by_hash: HashMap::new(),
            table_sizes: HashMap::new(),
            warnings: Vec::new(),
            stats: CompileStats::default(),
            table_size: self.options.maglev_table_size,
            options: &self.options,
        };
        for note in &nodes.notes {
            run.warn(note.clone());
        }
        if !is_prime(run.table_size) || run.table_size < 3 {
            let size = next_prime(run.table_size.max(3));
            let size = if run.table_size < 3 {
                DEFAULT_TABLE_SIZE
            } else {
                size
            };
            run.warn(format!(
                "maglev table size {} is not a prime; using {}",
                run.table_size, size
            ));
            run.table_size = size;
        }

        let node_filter = NodeFilter {
            scheme: self.options.node_scheme,
            names: &nodes.names,
        };
        sync_slices(
            model,
            &mut self.slices,
            &mut self.slices_of,
            &mut self.services,
            &mut self.presence,
            &node_filter,
        );
        if nodes_changed {
            // Endpoints on a node that left are not present any more (their flows end as a
            // gone backend's), those on a node that joined are: counted again.
            self.presence = BackendPresence::default();
            for entry in self.slices.values() {
                for (protocol, addr, port) in listed_endpoints(&entry.slice, &node_filter) {
                    self.presence.add(protocol, addr, port);
                }
            }
        }

        // Frontends added, removed or re-keyed: conflicts and ids are resolved anew.
        let mut structural = self.assembly.is_none();
        let mut added: Vec<(ObjectKey, ServiceEntry)> = Vec::new();
        let mut removed: Vec<ObjectKey> = Vec::new();
        let no_slices = BTreeMap::new();
        let slices_of = &self.slices_of;
        let slices_for = |key: &ObjectKey| -> Vec<&Arc<EndpointSlice>> {
            slices_of.get(key).unwrap_or(&no_slices).values().collect()
        };
        let mut previous = self.services.iter_mut().peekable();
        for (key, service) in &model.services {
            // Services of the last model that sort before this one are gone.
            while let Some((old_key, _)) = previous.next_if(|(k, _)| *k < key) {
                removed.push(old_key.clone());
            }
            let Some((_, entry)) = previous.next_if(|(k, _)| *k == key) else {
                let slices = slices_for(key);
                let entry = run.compile_entry(key, service, &slices, &[]);
                added.push((key.clone(), entry));
                continue;
            };
            if !nodes_changed && !entry.dirty && Arc::ptr_eq(&entry.service, service) {
                run.reuse_entry(entry);
                continue;
            }
            entry.dirty = false;
            let slices = slices_for(key);
            if !nodes_changed && entry.compiled_from(service, &slices) {
                // Equal objects parsed anew: keep the new ones for the next comparison.
                entry.service = service.clone();
                entry.slices = slices.into_iter().cloned().collect();
                run.reuse_entry(entry);
                continue;
            }
            let mut fresh = run.compile_entry(key, service, &slices, &entry.sets);
            if same_frontends(&entry.candidates, &fresh.candidates) {
                fresh.ids = entry.ids.clone();
                if let Some(assembly) = self.assembly.as_mut() {
                    for (c, id) in fresh.candidates.iter().zip(&fresh.ids) {
                        if let Some(id) = *id {
                            assembly.replace(c.frontend(id));
                        }
                    }
                }
            } else {
                structural = true;
            }
            *entry = fresh;
        }
        removed.extend(previous.map(|(k, _)| k.clone()));
        structural |= !added.is_empty() || !removed.is_empty();
        for key in removed {
            self.services.remove(&key);
        }
        self.services.extend(added);

        if structural {
            let candidates: Vec<&Candidate> = self
                .services
                .values()
                .flat_map(|entry| &entry.candidates)
                .collect();
            let (assembly, ids) = run.assemble(candidates);
            let mut ids = ids.into_iter();
            for entry in self.services.values_mut() {
                entry.ids = ids.by_ref().take(entry.candidates.len()).collect();
            }
            self.assembly = Some(assembly);
        }
        let assembly = self.assembly.as_ref().expect("assembled above");
        if !structural {
            run.warnings.extend(assembly.warnings.iter().cloned());
        }
        let mut snapshot = assembly.snapshot(&self.options, nodes.routes.clone());
        snapshot.backend_presence = self.presence.clone();
        run.stats.services = assembly.services;
        run.stats.frontends = snapshot.frontend_count as usize;
        Compiled {
            snapshot,
            warnings: run.warnings,
            stats: run.stats,
        }
    }
}

/// True when `a` and `b` claim the same frontends in the same order (same Service age,
/// service port, kind, address, protocol and port): conflict resolution and ids are then
/// unchanged, only what the frontends do may differ.
fn same_frontends(a: &[Candidate], b: &[Candidate]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.kind == y.kind
                && x.addr == y.addr
                && x.protocol == y.protocol
                && x.port == y.port
                && x.service == y.service
                && x.age == y.age
        })
}

/// The `kubernetes.io/service-name` label of a slice.
fn service_label(slice: &EndpointSlice) -> Option<String> {
    slice
        .metadata
        .labels
        .as_ref()
        .and_then(|labels| labels.get(SERVICE_NAME_LABEL))
        .cloned()
}

/// Brings `slices` and `slices_of` in line with the model's EndpointSlices (walking both in
/// key order, so an unchanged slice costs a comparison) and marks the Services whose slices
/// changed dirty.
/// Which endpoints are usable by their node: with a node scheme, only those on a known
/// node (or naming none), as `endpoints_for_family` decides.
struct NodeFilter<'a> {
    scheme: NodeScheme,
    names: &'a BTreeSet<Arc<str>>,
}

impl NodeFilter<'_> {
    fn usable(&self, node: Option<&str>) -> bool {
        self.scheme == NodeScheme::None || node.is_none_or(|n| self.names.contains(n))
    }
}

fn sync_slices(
    model: &Model,
    slices: &mut BTreeMap<ObjectKey, SliceEntry>,
    slices_of: &mut SlicesOf,
    services: &mut BTreeMap<ObjectKey, ServiceEntry>,
    presence: &mut BackendPresence,
    nodes: &NodeFilter,
) {
    let mut changed: Vec<(&ObjectKey, &Arc<EndpointSlice>)> = Vec::new();
    let mut removed: Vec<ObjectKey> = Vec::new();
    let mut previous = slices.iter().peekable();
    for (key, slice) in &model.endpoint_slices {
        while let Some((old_key, _)) = previous.next_if(|(k, _)| *k < key) {
            removed.push(old_key.clone());
        }
        match previous.next_if(|(k, _)| *k == key) {
            Some((_, old)) if Arc::ptr_eq(&old.slice, slice) => {}
            _ => changed.push((key, slice)),
        }
    }
    removed.extend(previous.map(|(k, _)| k.clone()));
    if changed.is_empty() && removed.is_empty() {
        return;
    }
    fn mark(services: &mut BTreeMap<ObjectKey, ServiceEntry>, namespace: &str, service: &str) {
        if let Some(entry) = services.get_mut(&ObjectKey::new(namespace, service)) {
            entry.dirty = true;
        }
    }
    fn unlink(slices_of: &mut SlicesOf, key: &ObjectKey, service: &str) {
        let owner = ObjectKey::new(key.namespace.as_str(), service);
        if let Some(of) = slices_of.get_mut(&owner) {
            of.remove(&key.name);
            if of.is_empty() {
                slices_of.remove(&owner);
            }
        }
    }
    for key in removed {
        let Some(old) = slices.remove(&key) else {
            continue;
        };
        for (protocol, addr, port) in listed_endpoints(&old.slice, nodes) {
            presence.remove(protocol, addr, port);
        }
        if let Some(service) = old.service {
            unlink(slices_of, &key, &service);
            mark(services, &key.namespace, &service);
        }
    }
    for (key, slice) in changed {
        for (protocol, addr, port) in listed_endpoints(slice, nodes) {
            presence.add(protocol, addr, port);
        }
        if let Some(old) = slices.get(key) {
            for (protocol, addr, port) in listed_endpoints(&old.slice, nodes) {
                presence.remove(protocol, addr, port);
            }
        }
        let service = service_label(slice);
        let old = slices.insert(
            key.clone(),
            SliceEntry {
                slice: slice.clone(),
                service: service.clone(),
            },
        );
        if let Some(SliceEntry {
            service: Some(old_service),
            ..
        }) = old
        {
            if service.as_ref() != Some(&old_service) {
                unlink(slices_of, key, &old_service);
            }
            mark(services, &key.namespace, &old_service);
        }
        if let Some(service) = service {
            mark(services, &key.namespace, &service);
            slices_of
                .entry(ObjectKey::new(key.namespace.as_str(), service))
                .or_default()
                .insert(key.name.clone(), slice.clone());
        }
    }
}

/// Every (protocol, address, port) a slice lists, in any condition and whatever Service
/// it names (or none): what [`BackendPresence`] counts. Invalid values are skipped (the
/// Service compilation warns about them).
fn listed_endpoints<'a>(
    slice: &'a EndpointSlice,
    nodes: &'a NodeFilter,
) -> impl Iterator<Item = (Protocol, Ipv4Addr, u16)> + 'a {
    let family = FAMILIES
        .iter()
        .copied()
        .find(|f| f.address_type() == slice.address_type);
    let ports: Vec<(Protocol, u16)> = slice
        .ports
        .iter()
        .flatten()
        .filter_map(|p| Some((parse_protocol(p.protocol.as_deref())?, port_u16(p.port?)?)))
        .collect();
    slice
        .endpoints
        .iter()
        .flatten()
        .filter(move |_| family.is_some())
        .filter(move |e| nodes.usable(e.node_name.as_deref()))
        .filter_map(move |e| {
            let address = e.addresses.first()?.parse::<IpAddr>().ok()?;
            family?.v4(address)
        })
        .flat_map(move |addr| {
            ports
                .clone()
                .into_iter()
                .map(move |(protocol, port)| (protocol, addr, port))
        })
}

/// State and node of one endpoint while slices are merged.
type MergedEndpoint = (EndpointState, Option<Arc<str>>);

/// State of one compilation.
struct Run<'a> {
    options: &'a CompileOptions,
    /// Pod routes and node names of this compilation (static and from the API).
    nodes: &'a NodeRoutes,
    /// Sets built or reused in this compilation by a hash of their backends: identical
    /// ports of different Services share one set.
    sets_by_hash: HashMap<u64, Vec<Arc<BackendSet>>>,
    /// Table size by usable endpoint count, for the sets too large for the configured
    /// size (finding a prime is not free).
    table_sizes: HashMap<usize, u32>,
    warnings: Vec<Warning>,
    stats: CompileStats,
    /// The configured table size, corrected to a prime: the size of every table whose set
    /// has fewer usable endpoints.
    table_size: u32,
}

/// A hash of a backend list (the key of [`Run::sets_by_hash`]; equality is checked too).
fn backends_hash(backends: &[Backend]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    backends.hash(&mut hasher);
    hasher.finish()
}

impl Run<'_> {
    /// A note: a decision on valid input.
    fn warn(&mut self, message: String) {
        self.warnings.push(Warning::note(message));
    }

    /// An invalid value at `field` of a Service, ignored.
    fn invalid_service_field(&mut self, key: &ObjectKey, field: String, message: String) {
        self.warnings.push(Warning::invalid(
            ObjectKind::Service,
            key.clone(),
            field,
            message,
        ));
    }

    /// Compiles one Service into a cache entry. `previous` are the sets of its last
    /// compilation: a port whose endpoints did not change keeps its set and Maglev table.
    fn compile_entry(
        &mut self,
        key: &ObjectKey,
        service: &Arc<Service>,
        slices: &[&Arc<EndpointSlice>],
        previous: &[Arc<BackendSet>],
    ) -> ServiceEntry {
        let warnings_before = self.warnings.len();
        let backends_before = self.stats.backends;
        let mut candidates = Vec::new();
        let mut sets = Vec::new();
        for &family in FAMILIES {
            self.compile_service(
                key,
                service,
                slices,
                family,
                previous,
                &mut candidates,
                &mut sets,
            );
        }
        ServiceEntry {
            service: service.clone(),
            slices: slices.iter().map(|s| (*s).clone()).collect(),
            candidates,
            ids: Vec::new(),
            sets,
            warnings: self.warnings[warnings_before..].to_vec(),
            backends: self.stats.backends - backends_before,
            dirty: false,
        }
    }

    /// Counts an entry compiled earlier, whose inputs did not change, into this run.
    fn reuse_entry(&mut self, entry: &ServiceEntry) {
        self.warnings.extend(entry.warnings.iter().cloned());
        self.stats.backends += entry.backends;
        self.stats.backend_sets_reused += entry.sets.len();
    }

    /// Slots of the Maglev table over `usable` endpoints (see the module docs).
    fn table_size_for(&mut self, usable: usize) -> u32 {
        let configured = self.table_size;
        *self.table_sizes.entry(usable).or_insert_with(|| {
            if usable >= configured as usize {
                next_prime(
                    u32::try_from(usable)
                        .unwrap_or(u32::MAX)
                        .saturating_mul(100),
                )
            } else {
                configured
            }
        })
    }

    /// The backend set for `backends` (sorted by addr, port): one of `previous` or of this
    /// compilation when equal, else built.
    fn backend_set(
        &mut self,
        backends: Vec<Backend>,
        previous: &[Arc<BackendSet>],
        sets: &mut Vec<Arc<BackendSet>>,
    ) -> Arc<BackendSet> {
        let hash = backends_hash(&backends);
        let found = self
            .sets_by_hash
            .get(&hash)
            .and_then(|same| same.iter().find(|s| s.backends == backends))
            .or_else(|| previous.iter().find(|s| s.backends == backends))
            .cloned();
        let set = match found {
            Some(set) => {
                self.stats.backend_sets_reused += 1;
                set
            }
            None => {
                self.stats.backend_sets_built += 1;
                let usable = usable_indices(&backends);
                if usable.len() > MAX_BACKENDS {
                    self.warn(format!(
                        "a Service port with {} usable endpoints: new connections go to the \
                         first {MAX_BACKENDS} (by address) only, the most a Maglev table spreads over",
                        usable.len()
                    ));
                }
                let table_size = self.table_size_for(usable.len());
                let pairs: Vec<(Ipv4Addr, u16)> = usable
                    .iter()
                    .map(|&i| (backends[i as usize].addr, backends[i as usize].port))
                    .collect();
                Arc::new(BackendSet {
                    maglev: MaglevTable::build(&pairs, table_size),
                    backends,
                    usable,
                })
            }
        };
        let same = self.sets_by_hash.entry(hash).or_default();
        if !same.iter().any(|s| Arc::ptr_eq(s, &set)) {
            same.push(set.clone());
        }
        if !sets.iter().any(|s| Arc::ptr_eq(s, &set)) {
            sets.push(set.clone());
        }
        set
    }

    /// Every endpoint of one service port in one family, merged over the Service's slices
    /// and deduplicated by ip:port (items 9–11), sorted by (addr, port).
    fn endpoints_for_family(
        &mut self,
        key: &ObjectKey,
        slices: &[&Arc<EndpointSlice>],
        port_name: &str,
        protocol: Protocol,
        family: IpFamily,
    ) -> Vec<Backend> {
        let mut merged: BTreeMap<(Ipv4Addr, u16), MergedEndpoint> = BTreeMap::new();
        let mut off_node = Vec::new();
        for slice in slices {
            if slice.address_type != family.address_type() {
                continue; // FQDN and other-family slices are ignored (items 3, 9).
            }
            let slice_key = ObjectKey::new(
                key.namespace.as_str(),
                slice.metadata.name.as_deref().unwrap_or(""),
            );
            let mut invalid = |field: String, message: String| {
                self.warnings.push(Warning::invalid(
                    ObjectKind::EndpointSlice,
                    slice_key.clone(),
                    field,
                    message,
                ))
            };
            let ports: Vec<u16> = slice
                .ports
                .iter()
                .flatten()
                .enumerate()
                .filter(|(_, p)| p.name.as_deref().unwrap_or("") == port_name)
                .filter(|(_, p)| parse_protocol(p.protocol.as_deref()) == Some(protocol))
                // A slice port without a number is ignored (item 10).
                .filter_map(|(index, p)| Some((index, p.port?)))
                .filter_map(|(index, n)| {
                    let port = port_u16(n);
                    if port.is_none() {
                        invalid(
                            format!("ports[{index}].port"),
                            format!("{n} is outside 1..=65535, ignored"),
                        );
                    }
                    port
                })
                .collect();
            if ports.is_empty() {
                continue;
            }
            for (index, endpoint) in slice.endpoints.iter().flatten().enumerate() {
                // Only addresses[0] counts (item 9).
                let Some(address) = endpoint.addresses.first() else {
                    continue;
                };
                let addr = match address.parse::<IpAddr>().ok().and_then(|a| family.v4(a)) {
                    Some(addr) => addr,
                    None => {
                        // The slice's addressType says which family its addresses are.
                        invalid(
                            format!("endpoints[{index}].addresses[0]"),
                            format!(
                                "{address:?} is not an {} address, the endpoint is ignored",
                                family.address_type()
                            ),
                        );
                        continue;
                    }
                };
                let conditions = endpoint.conditions.as_ref();
                let state = endpoint_state(
                    conditions.and_then(|c| c.ready),
                    conditions.and_then(|c| c.serving),
                    conditions.and_then(|c| c.terminating),
                );
                let node: Option<Arc<str>> = endpoint.node_name.as_deref().map(Arc::from);
                if self.options.node_scheme != NodeScheme::None {
                    if let Some(gone) = node.as_ref().filter(|n| !self.nodes.names.contains(*n)) {
                        // Its node left the cluster (or never joined): its pods cannot be
                        // reached, and its flows end as a gone backend's do.
                        off_node.push(Warning::note(format!(
                            "EndpointSlice {slice_key}: endpoints[{index}] ({addr}) is on node \
                             {gone}, which is not a known Node: not used"
                        )));
                        continue;
                    }
                }
                for &port in &ports {
                    let candidate = (state, node.clone());
                    merged
                        .entry((addr, port))
                        .and_modify(|current| {
                            let better = (state_rank(candidate.0), &candidate.1)
                                < (state_rank(current.0), &current.1);
                            if better {
                                *current = candidate.clone();
                            }
                        })
                        .or_insert_with(|| candidate.clone());
                }
            }
        }
        self.warnings.extend(off_node);
        merged
            .into_iter()
            .map(|((addr, port), (state, node))| Backend {
                addr,
                port,
                state,
                node,
            })
            .collect()
    }

    #[allow(clippy::too_many_arguments)]
    fn compile_service(
        &mut self,
        key: &ObjectKey,
        service: &Service,
        slices: &[&Arc<EndpointSlice>],
        family: IpFamily,
        previous: &[Arc<BackendSet>],
        out: &mut Vec<Candidate>,
        sets: &mut Vec<Arc<BackendSet>>,
    ) {
        let Some(spec) = service.spec.as_ref() else {
            return;
        };
        // Item 1: ExternalName (even with a clusterIP) and headless Services are ignored.
        if spec.type_.as_deref() == Some("ExternalName") {
            return;
        }
        let cluster_ips = cluster_ips(spec);
        if cluster_ips.is_empty() {
            return;
        }
        // Item 3: a Service is served in a family only if it has a clusterIP of it.
        let mut family_cluster_ips = Vec::new();
        for (field, ip) in cluster_ips {
            match ip.parse::<IpAddr>() {
                Ok(addr) => {
                    if let Some(v4) = family.v4(addr) {
                        family_cluster_ips.push(v4);
                    }
                }
                Err(_) => self.invalid_service_field(
                    key,
                    field,
                    format!("{ip:?} is not an IP address, ignored"),
                ),
            }
        }
        if family_cluster_ips.is_empty() {
            return;
        }

        let external_local = spec.external_traffic_policy.as_deref() == Some("Local");
        let internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");
        let affinity = self.affinity(key, spec);
        let source_ranges = self.source_ranges(key, spec, family);
        let external_ips = self.addresses_for_family(
            key,
            spec.external_ips
                .iter()
                .flatten()
                .enumerate()
                .map(|(i, ip)| (format!("spec.externalIPs[{i}]"), ip.as_str())),
            family,
        );
        let lb_ips = self.lb_ingress_for_family(key, service, family);
        let known_nodes = self.nodes;
        let nodes = &known_nodes.names;
        if internal_local && nodes.is_empty() {
            self.warn(format!(
                "internalTrafficPolicy: Local on {key} treated as Cluster: no pod_routes name a node"
            ));
        }
        let age = (service.metadata.creation_timestamp.clone(), key.clone());
        let masquerade_cluster_ip = self.options.masquerade_cluster_ip;

        let mut seen_ports = BTreeSet::new();
        for (index, port) in spec.ports.iter().flatten().enumerate() {
            let Some(service_port) = self.service_port(key, index, port) else {
                continue;
            };
            let (name, protocol, number) = service_port;
            if !seen_ports.insert((name.clone(), protocol)) {
                self.invalid_service_field(
                    key,
                    format!("spec.ports[{index}]"),
                    format!("port {name:?}/{protocol} is listed twice, this one is ignored"),
                );
                continue;
            }
            let backends = self.endpoints_for_family(key, slices, &name, protocol, family);
            self.stats.backends += backends.len();
            let internal_policy = if internal_local && !nodes.is_empty() {
                let mut by_node = HashMap::new();
                for node in nodes {
                    let local: Vec<Backend> = backends
                        .iter()
                        .filter(|b| b.node.as_deref() == Some(&**node))
                        .cloned()
                        .collect();
                    by_node.insert(node.clone(), self.backend_set(local, previous, sets));
                }
                InternalPolicy::Local { by_node }
            } else {
                InternalPolicy::Cluster
            };
            let set = self.backend_set(backends, previous, sets);
            let service_port_name = ServicePortName {
                namespace: Arc::from(key.namespace.as_str()),
                name: Arc::from(key.name.as_str()),
                port_name: Arc::from(name.as_str()),
                protocol,
            };
            let mut push = |kind: FrontendKind, addr: Ipv4Addr, fport: u16| {
                let external = kind != FrontendKind::ClusterIp;
                out.push(Candidate {
                    age: age.clone(),
                    service: service_port_name.clone(),
                    kind,
                    addr,
                    protocol,
                    port: fport,
                    backends: set.clone(),
                    masquerade: if external {
                        !external_local
                    } else {
                        masquerade_cluster_ip
                    },
                    source_ranges: if kind == FrontendKind::LoadBalancer {
                        source_ranges.clone()
                    } else {
                        Vec::new()
                    },
                    affinity_timeout_secs: affinity,
                    internal_policy: if external {
                        InternalPolicy::Cluster
                    } else {
                        internal_policy.clone()
                    },
                });
            };
            for &addr in &family_cluster_ips {
                push(FrontendKind::ClusterIp, addr, number);
            }
            if let Some(node_port) = port.node_port.filter(|&n| n != 0) {
                match port_u16(node_port) {
                    Some(node_port) => {
                        push(FrontendKind::NodePort, Ipv4Addr::UNSPECIFIED, node_port)
                    }
                    None => self.invalid_service_field(
                        key,
                        format!("spec.ports[{index}].nodePort"),
                        format!("{node_port} is outside 1..=65535, ignored"),
                    ),
                }
            }
            for &addr in &lb_ips {
                push(FrontendKind::LoadBalancer, addr, number);
            }
            for &addr in &external_ips {
                push(FrontendKind::ExternalIp, addr, number);
            }
        }
    }

    /// (port name, protocol, port) of `spec.ports[index]`, or a warning.
    fn service_port(
        &mut self,
        key: &ObjectKey,
        index: usize,
        port: &ServicePort,
    ) -> Option<(String, Protocol, u16)> {
        let name = port.name.clone().unwrap_or_default();
        let Some(protocol) = parse_protocol(port.protocol.as_deref()) else {
            self.invalid_service_field(
                key,
                format!("spec.ports[{index}].protocol"),
                format!(
                    "{:?} is not TCP, UDP or SCTP, the port is ignored",
                    port.protocol.as_deref().unwrap_or("")
                ),
            );
            return None;
        };
        let Some(number) = port_u16(port.port) else {
            self.invalid_service_field(
                key,
                format!("spec.ports[{index}].port"),
                format!("{} is outside 1..=65535, the port is ignored", port.port),
            );
            return None;
        };
        Some((name, protocol, number))
    }

    /// `sessionAffinity: ClientIP` timeout (item 15).
    fn affinity(&mut self, key: &ObjectKey, spec: &ServiceSpec) -> Option<u32> {
        if spec.session_affinity.as_deref() != Some("ClientIP") {
            return None;
        }
        let configured = spec
            .session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds);
        match configured {
            None => Some(DEFAULT_AFFINITY_TIMEOUT_SECS),
            Some(secs) if secs > 0 => Some(secs as u32),
            Some(secs) => {
                self.invalid_service_field(
                    key,
                    "spec.sessionAffinityConfig.clientIP.timeoutSeconds".to_owned(),
                    format!("{secs} is not positive; using {DEFAULT_AFFINITY_TIMEOUT_SECS}"),
                );
                Some(DEFAULT_AFFINITY_TIMEOUT_SECS)
            }
        }
    }

    /// `loadBalancerSourceRanges` of this family, trimmed (item 20).
    fn source_ranges(
        &mut self,
        key: &ObjectKey,
        spec: &ServiceSpec,
        family: IpFamily,
    ) -> Vec<Ipv4Net> {
        let mut ranges = Vec::new();
        for (index, raw) in spec
            .load_balancer_source_ranges
            .iter()
            .flatten()
            .enumerate()
        {
            let value = raw.trim();
            if value.is_empty() {
                continue;
            }
            match value.parse::<IpNet>() {
                Ok(IpNet::V4(net)) if family == IpFamily::V4 => ranges.push(net.trunc()),
                Ok(_) => {} // other family
                Err(_) => self.invalid_service_field(
                    key,
                    format!("spec.loadBalancerSourceRanges[{index}]"),
                    format!("{raw:?} is not a CIDR, ignored"),
                ),
            }
        }
        ranges.sort();
        ranges.dedup();
        ranges
    }

    /// The addresses of `family` among `values` (each with its field path, for warnings).
    fn addresses_for_family<'s>(
        &mut self,
        key: &ObjectKey,
        values: impl Iterator<Item = (String, &'s str)>,
        family: IpFamily,
    ) -> Vec<Ipv4Addr> {
        let mut out = Vec::new();
        for (field, value) in values {
            match value.trim().parse::<IpAddr>() {
                Ok(addr) => {
                    // Addresses of the other family are ignored (item 3).
                    if let Some(v4) = family.v4(addr) {
                        out.push(v4);
                    }
                }
                Err(_) => self.invalid_service_field(
                    key,
                    field,
                    format!("{value:?} is not an IP address, ignored"),
                ),
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// LB ingress IPs with ipMode VIP or unset (item 6).
    fn lb_ingress_for_family(
        &mut self,
        key: &ObjectKey,
        service: &Service,
        family: IpFamily,
    ) -> Vec<Ipv4Addr> {
        let ingress = service
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref());
        let ips: Vec<(String, &str)> = ingress
            .into_iter()
            .flatten()
            .enumerate()
            .filter(|(_, ing)| matches!(ing.ip_mode.as_deref(), None | Some("VIP")))
            .filter_map(|(i, ing)| {
                let ip = ing.ip.as_deref().filter(|ip| !ip.is_empty())?;
                Some((format!("status.loadBalancer.ingress[{i}].ip"), ip))
            })
            .collect();
        self.addresses_for_family(key, ips.into_iter(), family)
    }

    /// Resolves conflicts, assigns dense ids and builds the frontend tables. Returns them
    /// and the id of each candidate (`None`: it lost a conflict).
    fn assemble(&mut self, candidates: Vec<&Candidate>) -> (Assembly, Vec<Option<u32>>) {
        let warnings_before = self.warnings.len();
        // Claim keys oldest Service first.
        let mut order: Vec<usize> = (0..candidates.len()).collect();
        order.sort_by(|&a, &b| {
            let (ca, cb) = (&candidates[a], &candidates[b]);
            age_key(&ca.age)
                .cmp(&age_key(&cb.age))
                .then_with(|| a.cmp(&b))
        });
        #[derive(PartialEq, Eq, Hash)]
        enum Key {
            Addr(FrontendKey),
            NodePort(Protocol, u16),
        }
        let mut claimed: HashMap<Key, usize> = HashMap::new();
        let mut keep = vec![false; candidates.len()];
        for i in order {
            let c = &candidates[i];
            let key = if c.kind == FrontendKind::NodePort {
                Key::NodePort(c.protocol, c.port)
            } else {
                Key::Addr(FrontendKey {
                    addr: c.addr,
                    protocol: c.protocol,
                    port: c.port,
                })
            };
            match claimed.get(&key) {
                None => {
                    claimed.insert(key, i);
                    keep[i] = true;
                }
                Some(&owner) => {
                    let o = &candidates[owner];
                    let what = if c.kind == FrontendKind::NodePort {
                        format!("NodePort {}/{}", c.protocol, c.port)
                    } else {
                        format!("{} {}:{}/{}", c.kind.as_str(), c.addr, c.port, c.protocol)
                    };
                    if o.service == c.service {
                        // The same service port reaches this key twice (e.g. an externalIP
                        // equal to an LB IP): one frontend is enough.
                        continue;
                    }
                    self.warn(format!(
                        "{what} of Service {} conflicts with Service {} ({} {}:{}/{}), which is older and keeps it",
                        c.service,
                        o.service,
                        o.kind.as_str(),
                        o.addr,
                        o.port,
                        o.protocol
                    ));
                }
            }
        }
        let mut kept: Vec<usize> = (0..candidates.len()).filter(|&i| keep[i]).collect();
        kept.sort_by(|&a, &b| {
            let (a, b) = (candidates[a], candidates[b]);
            (
                &a.service.namespace,
                &a.service.name,
                &a.service.port_name,
                a.service.protocol,
            )
                .cmp(&(
                    &b.service.namespace,
                    &b.service.name,
                    &b.service.port_name,
                    b.service.protocol,
                ))
                .then_with(|| kind_rank(a.kind).cmp(&kind_rank(b.kind)))
                .then_with(|| a.addr.cmp(&b.addr))
                .then_with(|| a.port.cmp(&b.port))
        });

        // NodePorts never answer on loopback or the unspecified address (item 5).
        let mut node_port_addresses = Vec::new();
        for &addr in &self.options.node_port_addresses {
            if addr.is_loopback() || addr.is_unspecified() {
                self.warn(format!(
                    "node-port address {addr} ignored: NodePorts never answer on it"
                ));
            } else if !node_port_addresses.contains(&addr) {
                node_port_addresses.push(addr);
            }
        }
        let mut assembly = Assembly {
            frontends: FxHashMap::default(),
            node_ports: FxHashMap::default(),
            service_addresses: FxHashMap::default(),
            by_id: Vec::with_capacity(kept.len()),
            node_port_addresses,
            warnings: Vec::new(),
            services: 0,
        };
        let mut ids = vec![None; candidates.len()];
        let mut services = BTreeSet::new();
        for (id, i) in kept.into_iter().enumerate() {
            let c = candidates[i];
            ids[i] = Some(id as u32);
            services.insert((&c.service.namespace, &c.service.name));
            let frontend = c.frontend(id as u32);
            if c.kind != FrontendKind::NodePort {
                assembly.service_addresses.entry(c.addr).or_insert(c.kind);
            }
            assembly.place(&frontend);
            assembly.by_id.push(frontend);
        }
        assembly.services = services.len();
        assembly.warnings = self.warnings[warnings_before..].to_vec();
        (assembly, ids)
    }
}

/// Oldest first; a Service without a creationTimestamp counts as newest.
fn age_key(age: &(Option<Time>, ObjectKey)) -> (bool, Option<&Time>, &ObjectKey) {
    (age.0.is_none(), age.0.as_ref(), &age.1)
}

/// `spec.clusterIPs` (or the legacy `spec.clusterIP`), without `None`/empty entries, each
/// with its field path (`spec.clusterIPs[1]`) for warnings.
fn cluster_ips(spec: &ServiceSpec) -> Vec<(String, String)> {
    let list: Vec<(String, &String)> = match spec.cluster_ips.as_ref().filter(|l| !l.is_empty()) {
        Some(list) => list
            .iter()
            .enumerate()
            .map(|(i, ip)| (format!("spec.clusterIPs[{i}]"), ip))
            .collect(),
        None => spec
            .cluster_ip
            .iter()
            .map(|ip| ("spec.clusterIP".to_owned(), ip))
            .collect(),
    };
    list.into_iter()
        .map(|(field, ip)| (field, ip.trim().to_owned()))
        .filter(|(_, ip)| !ip.is_empty() && ip != "None")
        .collect()
}
