//! The per-worker packet pipeline: one [`Pipeline`] per worker takes a received frame,
//! decides its fate ([`Verdict`]) and rewrites it in place. No allocation, lock or atomic
//! on the per-packet path: every table is allocated by [`Pipeline::new`] (neighbors,
//! conntrack, affinity, routes), or rebuilt when a new [`Snapshot`] generation is first
//! seen (the pod-CIDR LPM and a few per-snapshot indexes).
//!
//! # The path of one frame
//!
//! 1. **Ethernet** (one 802.1Q tag allowed, kept on egress: only MACs are rewritten).
//!    Unicast frames for another MAC: `not_for_us`. ARP → [`Pipeline`] answers requests for
//!    the in-port's own addresses and, on uplinks, for LoadBalancer/externalIP service
//!    addresses (in place, `Transmit{in_port}`); learns senders of replies and of requests
//!    aimed at us (only senders inside a subnet of the in-port). ARP replies are handed to
//!    the kernel when the port has an exception port (it needs them for its own
//!    neighbors), else consumed as `arp_ignored`. Non-IPv4, non-ARP → exception port or
//!    `not_ipv4`.
//! 2. **IPv4**: `new_checked` (`malformed`), header checksum (`bad_checksum`); Ethernet
//!    padding is trimmed. L4 checksums are not verified (a bad one stays bad through the
//!    incremental updates). *Options* are allowed and forwarded untouched (L4 is found
//!    through the IHL; source-route options are not acted upon). *Fragments* (after the
//!    uplink source check) go to the worker's reassembly ([`Verdict::Reassemble`], DPDK's
//!    `rte_ip_frag`) unless they are for the gateway itself (the kernel reassembles those)
//!    or come from an uplink toward nothing the whole datagram could reach
//!    (`uplink_not_allowed`); the whole datagram then comes back as a new frame. With
//!    `fragments.reassemble` off, a fragment to a service, node-port or SNAT address or into
//!    the service CIDR is dropped (`fragment`) and any other is routed as it is.
//! 3. **VXLAN** to `local_vtep:udp_port`, on a cluster port only: I flag required (`vxlan_bad_flags`), VNI must be
//!    the configured one (`vxlan_unknown_vni`), truncation is `malformed`. The outer headers
//!    are stripped; the outer source (the sending node's VTEP) is kept for
//!    internalTrafficPolicy Local, and the inner source MAC is remembered as that VTEP's
//!    MAC for re-encapsulation toward it (`PodCidrRoute` carries no VTEP MAC; until a
//!    frame from that VTEP has been seen, the inner destination MAC is broadcast).
//!    Decapsulated traffic for the gateway's own addresses is not handed to the kernel
//!    (only echo requests are answered).
//! 4. **Edge policy** ([`edge`]), for packets of uplinks: martian and cluster-side sources
//!    are dropped (`martian_source`, `spoofed_source`); a conntrack hit counts only through
//!    a direction the entry admits from uplinks; what steps 4–5 neither translate nor
//!    deliver locally is routed only into `edge.routable_prefixes` (`uplink_not_allowed`).
//! 4. **Services** (see `kube-semantics.md`; the decisions are [`decide`]'s, which `ctl
//!    trace` shares): conntrack hit → stored translation; a snapshot change re-validates
//!    the backend lazily ([`decide::tracked_flow`]: TCP/SCTP keep it while any slice of the
//!    Service lists it in any condition, or, their frontend gone, any slice at all; else
//!    `backend_gone` drops and the entry lingers `timeouts.backend_gone` in case it returns.
//!    UDP keeps it while ready or serving-terminating and its frontend exists, else the
//!    entry goes and the datagram is a new flow). Miss → a TCP segment that is not a SYN is
//!    dropped (`tcp_no_flow`), never balanced; frontend match, source ranges, ITP Local,
//!    affinity, Maglev, SNAT (policy, pods to eTP Local frontends, hairpin), insert,
//!    rewrite. No usable endpoint or an unknown port on a service address → ICMP
//!    port-unreachable (rate-limited). ICMP errors quoting a tracked flow are translated.
//!    ICMP echo requests to a service address are answered by the gateway (like IPVS).
//! 5. **Local**: traffic for an owned address (or broadcast/multicast) → the in-port's
//!    exception port; without one, echo requests are answered, the rest `no_exception_port`.
//!    Frames from an exception port go out of its real port unchanged.
//! 6. **Route**: pod CIDRs of the snapshot (VXLAN encap toward the node's VTEP) first, then
//!    configured and connected routes by longest prefix (a connected route wins over a
//!    static one of the same prefix). TTL ≤ 1 → ICMP time-exceeded (`ttl_exceeded`). *MTU*:
//!    a packet whose (outer) IP length exceeds the egress MTU gets, with DF, an ICMP
//!    frag-needed (next-hop MTU = port MTU, minus 50 when encapsulating; `mtu_exceeded`);
//!    without DF it is translated whole and handed to the worker to cut
//!    ([`Verdict::Fragment`]; each fragment leaves through [`Pipeline::egress_fragment`]).
//! 7. **L2**: egress MAC as source, next hop's MAC as destination → `Transmit`, or
//!    `HoldForNeighbor` (the next hop is then ARPed by [`Pipeline::housekeeping`]).
//!
//! ICMP errors the gateway generates quote the packet as received (before translation) and
//! are counted with their cause (`no_endpoints`, `no_service`, `ttl_exceeded`,
//! `mtu_exceeded`) even when sent; when the token bucket is empty the verdict is
//! `Drop(icmp_rate_limited)`. No error is sent about an ICMP error, a non-first fragment
//! or a non-unicast source.
//!
//! # Flow ownership ([`Pipeline::owner`])
//!
//! Both directions of a tracked flow must reach the worker holding its conntrack entry:
//! * destination is a SNAT address → `SnatPorts::owner_of(dst_port)` (SNAT ports are
//!   partitioned per worker, so the reply finds the worker that allocated the port);
//! * destination is a service address or a node-port address → hash(src ip, src port);
//! * otherwise → hash(dst ip, dst port): the reply of a non-SNAT flow goes back to the
//!   client, so this matches the request's hash(src ip, src port).
//!
//! VXLAN frames are judged on their inner headers; ICMP errors on the reversed tuple of
//! the packet they quote; ICMP echo by its identifier; anything else (ARP, other
//! protocols, unparsable) belongs to worker 0. SNAT addresses must not also be node-port
//! or service addresses.

pub mod decide;
pub mod edge;
mod fast;
mod neighbor;
pub mod rewrite;
pub mod route;
mod trace;

pub use trace::Trace;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_edge;
#[cfg(test)]
mod tests_flood;

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::ops::RangeInclusive;
use std::sync::Arc;

use ipnet::Ipv4Net;
use rustc_hash::FxHashMap;

use crate::conntrack::{
    Affinity, Conntrack, ConntrackConfig, Direction, EntryId, FlowKey, InsertError, Nat,
    SnapshotBinding, SnatPorts, Tick,
};
use crate::frame::Frame;
use crate::maglev::fmix64;
use crate::snapshot::{
    Backend, BackendSet, Frontend, FrontendKind, LiveSettings, Protocol, Snapshot,
};
use crate::stats::{DropReason, WorkerStats};
use crate::wire::arp::{self, ArpPacket};
use crate::wire::ethernet::{self, EthernetFrame, MacAddr};
use crate::wire::icmp;
use crate::wire::ipv4::{self, Ipv4Packet};
use crate::wire::{checksum, TcpFlags, UdpPacket, VxlanPacket};

use edge::{EdgePolicy, EdgePort};
use neighbor::NeighborTable;
use rewrite::{EncapHop, EncapTemplate, L4, VXLAN_OVERHEAD};
use route::{Hop, PodRoutes, RouteTable};

/// Neighbors one worker remembers (all ports together).
pub const NEIGHBOR_CAPACITY: usize = 4096;
/// Learned neighbors buffered for [`Pipeline::take_learned`].
pub const LEARNED_CAPACITY: usize = 256;
/// Conntrack slots examined per [`Pipeline::housekeeping`] call.
pub const CT_EXPIRE_BUDGET: usize = 256;
/// Neighbor slots examined per [`Pipeline::housekeeping`] call.
pub const NEIGHBOR_SWEEP_BUDGET: usize = 512;
/// Slots of the per-worker route cache (a power of two).
const ROUTE_CACHE_SLOTS: usize = 4096;
const _: () = assert!(ROUTE_CACHE_SLOTS.is_power_of_two());
/// VTEP → inner MAC entries remembered for re-encapsulation (one per node; preallocated,
/// so learning never allocates; when full, configured and known VTEPs keep their entries
/// and new ones are sent with the broadcast inner MAC, which kernel VXLAN devices accept).
const VTEP_MACS: usize = 4096;
/// The smallest IP MTU the gateway fragments to (RFC 791's 576 bytes every host accepts).
const MIN_FRAGMENT_MTU: u16 = 576;
/// Frames per burst the prefetch stage looks ahead at (the rx burst size).
pub const PREFETCH_BURST: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortRole {
    /// Toward clients (LB VIPs and externalIPs are ARPed here).
    Uplink,
    /// Toward the cluster (nodes, VTEPs, pods).
    Cluster,
}

#[derive(Clone, Debug)]
pub struct PortConfig {
    /// DPDK port id.
    pub id: u16,
    pub mac: MacAddr,
    /// Owned addresses with their subnets; the first is the primary.
    pub addresses: Vec<Ipv4Net>,
    pub role: PortRole,
    /// IP MTU (largest IPv4 total length transmitted).
    pub mtu: u16,
    /// DPDK port id of a tap toward the kernel for this port.
    pub exception_port: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteConfig {
    pub prefix: Ipv4Net,
    /// Next hop; `None` = directly connected.
    pub via: Option<Ipv4Addr>,
    pub port: u16,
}

#[derive(Clone, Copy, Debug)]
pub struct VxlanConfig {
    /// 4789.
    pub udp_port: u16,
    pub vni: u32,
    /// An owned address on a cluster port.
    pub local_vtep: Ipv4Addr,
}

#[derive(Clone, Debug)]
pub struct PipelineConfig {
    pub ports: Vec<PortConfig>,
    /// Static routes; connected routes are derived from port addresses.
    pub routes: Vec<RouteConfig>,
    pub static_neighbors: Vec<(u16, Ipv4Addr, MacAddr)>,
    pub vxlan: Option<VxlanConfig>,
    /// Empty: the primary address of each cluster port.
    pub snat_addresses: Vec<Ipv4Addr>,
    pub snat_port_range: RangeInclusive<u16>,
    pub conntrack: ConntrackConfig,
    pub affinity_capacity: usize,
    pub icmp_errors_per_second: u32,
    pub worker_index: usize,
    pub workers: usize,
    pub neighbor_timeout_ms: u64,
    /// Prefixes that uplinks may reach although they are neither a Service frontend nor
    /// the gateway's (`edge.routable_prefixes`; see [`edge`]).
    pub routable_prefixes: Vec<Ipv4Net>,
    /// Fragments the gateway forwards are reassembled first ([`Verdict::Reassemble`]), as
    /// nf_conntrack does; off: a fragment of a tracked destination is dropped (`fragment`).
    pub reassemble_fragments: bool,
}

/// The conntrack key hashes [`Pipeline::prefetch_burst`] computed, by position in the burst.
#[derive(Clone, Copy, Debug, Default)]
pub struct BurstHashes {
    hashes: [u64; PREFETCH_BURST],
    /// Bit `i`: frame `i` had a hash.
    present: u32,
}

const _: () = assert!(PREFETCH_BURST <= u32::BITS as usize);

impl BurstHashes {
    /// The hash of the frame at `position` in the burst, if the prefetch read one.
    #[inline]
    pub fn get(&self, position: usize) -> Option<u64> {
        (position < PREFETCH_BURST && self.present & (1 << position) != 0)
            .then(|| self.hashes[position])
    }
}

/// What the worker does with the frame after [`Pipeline::process`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Transmit {
        port: u16,
    },
    Drop(DropReason),
    ToException {
        port: u16,
    },
    /// The frame is fully rewritten except its destination MAC; hold it until
    /// [`Pipeline::neighbor`] knows `next_hop`, then set the MAC and transmit on `port`.
    HoldForNeighbor {
        port: u16,
        next_hop: Ipv4Addr,
    },
    /// The flow belongs to another worker: hand the frame over unchanged.
    Handoff {
        worker: u16,
    },
    /// An IPv4 fragment the gateway must see whole (its flow is tracked, or may be): add it
    /// to the worker's reassembly; the whole datagram then goes through
    /// [`Pipeline::process`] like any frame.
    Reassemble,
    /// The packet is translated but larger than the egress MTU, without DF: its link
    /// headers are removed (the frame starts at the IPv4 header). Cut it into fragments of
    /// at most `ip_mtu` bytes and pass each to [`Pipeline::egress_fragment`].
    Fragment {
        ip_mtu: u16,
    },
}

/// The egress of the packet a [`Verdict::Fragment`] cut, for each of its fragments.
#[derive(Clone, Copy, Debug)]
struct FragmentEgress {
    ctx: Ctx,
    hop: Hop,
    cache_slot: Option<usize>,
    /// The packet's Ethernet header (with its 802.1Q tag, if any) as the pipeline left it.
    link: [u8; FragmentEgress::LINK_MAX],
}

impl FragmentEgress {
    const LINK_MAX: usize = 18;
}

// Eight bytes travel back from every stage in a register; a larger verdict is returned
// through memory, and reading it back right after the callee's narrower stores stalls
// on store-to-load forwarding once per packet.
const _: () = assert!(std::mem::size_of::<Verdict>() <= 8);

#[derive(Debug)]
struct Port {
    id: u16,
    mac: MacAddr,
    addresses: Vec<Ipv4Net>,
    role: PortRole,
    mtu: u16,
    exception_port: Option<u16>,
}

impl Port {
    fn primary(&self) -> Option<Ipv4Addr> {
        self.addresses.first().map(|n| n.addr())
    }

    fn owns(&self, addr: Ipv4Addr) -> bool {
        self.addresses.iter().any(|n| n.addr() == addr)
    }

    fn on_link(&self, addr: Ipv4Addr) -> bool {
        self.addresses.iter().any(|n| n.contains(&addr))
    }

    fn source_for(&self, dst: Ipv4Addr) -> Ipv4Addr {
        self.addresses
            .iter()
            .find(|n| n.contains(&dst))
            .or(self.addresses.first())
            .map_or(Ipv4Addr::UNSPECIFIED, |n| n.addr())
    }
}

/// The L2 rewrite for a hop, copied from the neighbor table and the VTEP MACs so that a
/// packet to a cached destination needs neither lookup.
#[derive(Clone, Copy, Debug)]
struct Adjacency {
    port_id: u16,
    /// The out-port's MAC: the (outer) source MAC, and the inner one when encapsulating.
    port_mac: MacAddr,
    /// The next hop's MAC.
    next_hop_mac: MacAddr,
    /// The hop's VXLAN headers (when it encapsulates), with these MACs and the remote
    /// VTEP's as the inner destination.
    encap: Option<EncapTemplate>,
    /// The next hop's neighbor slot, marked used per packet as a lookup would.
    neighbor_slot: usize,
}

/// One destination in the per-worker route cache.
#[derive(Clone, Copy, Debug)]
struct CachedRoute {
    dst: u32,
    /// Snapshot generation + 1 the hop was computed under; 0 never matches.
    tag: u64,
    hop: Option<Hop>,
    /// The hop's L2, once its next hop resolved, with the [`Pipeline::l2_epoch`] it was
    /// copied at.
    l2: Option<(u64, Adjacency)>,
}

const EMPTY_ROUTE: CachedRoute = CachedRoute {
    dst: 0,
    tag: 0,
    hop: None,
    l2: None,
};

/// Indexes derived from the snapshot, rebuilt when its generation changes.
#[derive(Default)]
struct SnapCache {
    generation: Option<u64>,
    pod_routes: PodRoutes,
    vtep_nodes: HashMap<Ipv4Addr, Arc<str>>,
}

/// Per-packet context through the stages.
#[derive(Clone, Copy, Debug)]
struct Ctx {
    /// Index of the in-port.
    in_port: usize,
    /// Offset of the IPv4 header (the Ethernet header length of the current frame).
    l2: usize,
    /// Source MAC of the frame as received (the previous hop).
    prev_mac: MacAddr,
    /// Outer source of a decapsulated VXLAN frame.
    outer_src: Option<Ipv4Addr>,
    /// The conntrack key hash of the packet as received ([`FlowKey::hash`]), once
    /// computed: it also gives the VXLAN entropy port, stable per flow and direction
    /// (egress hashes the packet's own tuple the same way for packets without one).
    flow_hash: Option<u64>,
}

/// Token bucket in thousandths of a token.
#[derive(Debug)]
struct TokenBucket {
    rate: u64,
    milli: u64,
    last: Tick,
}

impl TokenBucket {
    fn new(per_second: u32) -> TokenBucket {
        TokenBucket {
            rate: u64::from(per_second),
            milli: u64::from(per_second) * 1000,
            last: 0,
        }
    }

    fn take(&mut self, now: Tick) -> bool {
        let elapsed = now.saturating_sub(self.last);
        self.last = self.last.max(now);
        let cap = self.rate * 1000;
        self.milli = (self.milli + elapsed.saturating_mul(self.rate)).min(cap);
        if self.milli >= 1000 {
            self.milli -= 1000;
            true
        } else {
            false
        }
    }
}

/// A rewrite of source and/or destination address:port.
#[derive(Clone, Copy, Debug, Default)]
struct Rewrite {
    src: Option<(Ipv4Addr, u16)>,
    dst: Option<(Ipv4Addr, u16)>,
}

impl Rewrite {
    /// The translation of a tracked flow's packet in direction `dir`: toward the backend
    /// (DNAT, and SNAT when the entry has it), or back to the client (the reverse).
    #[inline]
    fn of_tracked(nat: &Nat, original: &FlowKey, dir: Direction) -> Rewrite {
        match dir {
            Direction::Original => Rewrite {
                src: nat.snat,
                dst: Some((nat.backend_addr, nat.backend_port)),
            },
            Direction::Reply => Rewrite {
                src: Some((nat.frontend_addr, nat.frontend_port)),
                dst: nat.snat.map(|_| (original.src, original.src_port)),
            },
        }
    }
}

/// What a frame's arrival port is to the pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Arrival {
    /// One of its ports (an index into `ports`).
    Port(usize),
    /// The kernel side of a port's exception path (the port's index): what the host
    /// sends goes out of that port as it is.
    FromException(usize),
    Unknown,
}

pub struct Pipeline {
    ports: Vec<Port>,
    /// What a frame's arrival port is, by DPDK port id: one index per packet instead of a
    /// search of the ports and of the exception ports.
    arrivals: Vec<Arrival>,
    routes: RouteTable,
    vxlan: Option<VxlanConfig>,
    /// One allocator per SNAT address, so the address can be chosen by egress port.
    snat: SnatAllocators,
    ct: Conntrack,
    affinity: Affinity,
    icmp_bucket: TokenBucket,
    neighbors: NeighborTable,
    neighbor_timeout: Tick,
    learned: Vec<(u16, Ipv4Addr, MacAddr)>,
    vtep_macs: FxHashMap<Ipv4Addr, MacAddr>,
    /// The pair `remember_vtep_mac` stored last (and `vtep_macs` still holds): a burst of
    /// frames from one node repeats it, and checking it costs no hashing.
    last_vtep_mac: Option<(Ipv4Addr, MacAddr)>,
    /// An array, so that indexing it with a slot (< ROUTE_CACHE_SLOTS by construction)
    /// needs no bounds check.
    route_cache: Box<[CachedRoute; ROUTE_CACHE_SLOTS]>,
    /// Counts changes of `vtep_macs` and of the snapshot (see [`Pipeline::l2_epoch`]).
    l2_changes: u64,
    worker_index: usize,
    workers: usize,
    snap: SnapCache,
    edge: EdgePolicy,
    /// Whether established packets take [`Pipeline::fast_established`] (off only to
    /// compare it with the general path).
    fast_path: bool,
    /// The SNAT port range (a reload may add SNAT addresses, each gets this range).
    snat_port_range: RangeInclusive<u16>,
    /// The [`LiveSettings::id`] applied last (0: the ones of [`PipelineConfig`]).
    settings_id: u64,
    reassemble_fragments: bool,
    /// Set by [`Verdict::Fragment`], read by [`Pipeline::egress_fragment`].
    fragment_egress: Option<FragmentEgress>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("worker_index", &self.worker_index)
            .field("workers", &self.workers)
            .field("ports", &self.ports)
            .field("conntrack", &self.ct)
            .finish_non_exhaustive()
    }
}

/// The SNAT addresses: `configured`, or when there are none the primary address of each
/// cluster port.
fn snat_addresses(ports: &[Port], configured: &[Ipv4Addr]) -> Vec<Ipv4Addr> {
    let mut addresses: Vec<Ipv4Addr> = if configured.is_empty() {
        ports
            .iter()
            .filter(|p| p.role == PortRole::Cluster)
            .filter_map(Port::primary)
            .collect()
    } else {
        configured.to_vec()
    };
    let mut seen = Vec::with_capacity(addresses.len());
    addresses.retain(|a| {
        let first = !seen.contains(a);
        seen.push(*a);
        first
    });
    addresses
}

/// A worker's SNAT port allocators, one per SNAT address.
type SnatAllocators = Vec<(Ipv4Addr, SnatPorts)>;

/// One SNAT allocator per address; an address of `previous` keeps its allocator. On an
/// error `previous` is handed back untouched.
fn snat_allocators(
    addresses: &[Ipv4Addr],
    mut previous: SnatAllocators,
    range: &RangeInclusive<u16>,
    worker_index: usize,
    workers: usize,
) -> Result<SnatAllocators, (String, SnatAllocators)> {
    // The fallible part first, so that a failure loses none of `previous`.
    let mut fresh = Vec::new();
    for &a in addresses {
        if previous.iter().any(|(p, _)| *p == a) {
            continue;
        }
        match SnatPorts::new(&[a], range.clone(), worker_index, workers) {
            Ok(s) => fresh.push((a, s)),
            Err(e) => return Err((format!("SNAT address {a}: {e}"), previous)),
        }
    }
    // `addresses` has no duplicates (see `snat_addresses`): each is in one of the two.
    let mut snat = Vec::with_capacity(addresses.len());
    for &a in addresses {
        if let Some(at) = previous.iter().position(|(p, _)| *p == a) {
            snat.push(previous.swap_remove(at));
        } else if let Some(at) = fresh.iter().position(|(p, _)| *p == a) {
            snat.push(fresh.swap_remove(at));
        }
    }
    Ok(snat)
}

/// The edge policy of these ports, static routes (prefix, port index), SNAT addresses and
/// routable prefixes.
fn edge_policy(
    ports: &[Port],
    static_routes: &[(Ipv4Net, usize)],
    snat: &[Ipv4Addr],
    routable: &[Ipv4Net],
) -> EdgePolicy {
    let edge_ports: Vec<EdgePort<'_>> = ports
        .iter()
        .map(|p| EdgePort {
            role: p.role,
            addresses: &p.addresses,
        })
        .collect();
    EdgePolicy::new(&edge_ports, static_routes, snat, routable)
}

fn is_unicast(a: Ipv4Addr) -> bool {
    !(a.is_unspecified() || a.is_broadcast() || a.is_multicast())
}

fn hash_ip_port(addr: Ipv4Addr, port: u16, workers: usize) -> usize {
    let k = (u64::from(u32::from(addr)) << 16) | u64::from(port);
    (fmix64(k ^ 0x6f77_6e65_7273_6869) % workers as u64) as usize
}

/// The hash whose Maglev slot picks a new connection's backend, given the flow's hash:
/// under `sessionAffinity: ClientIP` the client address's alone, so that every worker
/// (each remembers affinity for the flows it owns) and every gateway gives a client's
/// first connection the same backend; otherwise the flow's.
#[inline]
pub fn pick_hash(fe: &Frontend, flow_hash: u64, client: Ipv4Addr) -> u64 {
    if fe.affinity_timeout_secs.is_some() {
        rewrite::flow_hash(0, client, 0, Ipv4Addr::UNSPECIFIED, 0)
    } else {
        flow_hash
    }
}

/// The frontend id of a flow whose frontend is gone from the snapshot (no frontend's
/// counters count it).
pub const NO_FRONTEND: u32 = u32::MAX;

fn is_usable(set: &BackendSet, addr: Ipv4Addr, port: u16) -> bool {
    set.backends
        .binary_search_by(|b| (b.addr, b.port).cmp(&(addr, port)))
        .is_ok_and(|i| set.usable.contains(&(i as u32)))
}

impl Pipeline {
    pub fn new(config: PipelineConfig) -> Result<Pipeline, String> {
        if config.workers == 0 || config.worker_index >= config.workers {
            return Err(format!(
                "worker index {} out of range for {} workers",
                config.worker_index, config.workers
            ));
        }
        if config.workers > usize::from(u16::MAX) {
            return Err(format!("{} workers: at most {}", config.workers, u16::MAX));
        }
        let mut ports: Vec<Port> = Vec::with_capacity(config.ports.len());
        for p in &config.ports {
            if ports.iter().any(|q| q.id == p.id) {
                return Err(format!("port {} configured twice", p.id));
            }
            ports.push(Port {
                id: p.id,
                mac: p.mac,
                addresses: p.addresses.clone(),
                role: p.role,
                mtu: p.mtu,
                exception_port: p.exception_port,
            });
        }
        let mut exception_of = Vec::new();
        for (i, p) in ports.iter().enumerate() {
            if let Some(e) = p.exception_port {
                if ports.iter().any(|q| q.id == e) || exception_of.iter().any(|(x, _)| *x == e) {
                    return Err(format!(
                        "exception port {e} of port {} is already in use",
                        p.id
                    ));
                }
                exception_of.push((e, i));
            }
        }
        let mut arrivals = Vec::new();
        let mut arrive = |id: u16, arrival: Arrival| {
            let at = usize::from(id);
            if arrivals.len() <= at {
                arrivals.resize(at + 1, Arrival::Unknown);
            }
            arrivals[at] = arrival;
        };
        for (i, p) in ports.iter().enumerate() {
            arrive(p.id, Arrival::Port(i));
        }
        for &(e, i) in &exception_of {
            arrive(e, Arrival::FromException(i));
        }
        let index_of = |id: u16| ports.iter().position(|p| p.id == id);
        let mut statics = Vec::with_capacity(config.routes.len());
        for r in &config.routes {
            let port = index_of(r.port)
                .ok_or_else(|| format!("route {} names unknown port {}", r.prefix, r.port))?;
            statics.push((r.prefix, r.via, port));
        }
        let connected = ports
            .iter()
            .enumerate()
            .flat_map(|(i, p)| p.addresses.iter().map(move |&net| (net, i)));
        let routes = RouteTable::new(statics, connected);
        if let Some(vx) = &config.vxlan {
            if vx.vni >= 1 << 24 {
                return Err(format!("VXLAN VNI {} does not fit in 24 bits", vx.vni));
            }
            let on_cluster = ports
                .iter()
                .any(|p| p.role == PortRole::Cluster && p.owns(vx.local_vtep));
            if !on_cluster {
                return Err(format!(
                    "VXLAN local VTEP {} is not an address of a cluster port",
                    vx.local_vtep
                ));
            }
        }
        let snat_addrs = snat_addresses(&ports, &config.snat_addresses);
        let static_routes: Vec<(Ipv4Net, usize)> = config
            .routes
            .iter()
            .filter_map(|r| Some((r.prefix, index_of(r.port)?)))
            .collect();
        let edge = edge_policy(
            &ports,
            &static_routes,
            &snat_addrs,
            &config.routable_prefixes,
        );
        let snat = snat_allocators(
            &snat_addrs,
            Vec::new(),
            &config.snat_port_range,
            config.worker_index,
            config.workers,
        )
        .map_err(|(reason, _)| reason)?;
        let mut neighbors = NeighborTable::new(NEIGHBOR_CAPACITY);
        for &(port, addr, mac) in &config.static_neighbors {
            if index_of(port).is_none() {
                return Err(format!("static neighbor {addr} names unknown port {port}"));
            }
            if !neighbors.add_static(port, addr, mac) {
                return Err(format!("too many static neighbors (at {addr})"));
            }
        }
        Ok(Pipeline {
            ports,
            arrivals,
            routes,
            vxlan: config.vxlan,
            snat,
            ct: Conntrack::new(config.conntrack),
            affinity: Affinity::new(config.affinity_capacity.max(1)),
            icmp_bucket: TokenBucket::new(config.icmp_errors_per_second),
            neighbors,
            neighbor_timeout: config.neighbor_timeout_ms.max(1),
            learned: Vec::with_capacity(LEARNED_CAPACITY),
            vtep_macs: {
                let mut map = FxHashMap::default();
                map.reserve(VTEP_MACS);
                map
            },
            last_vtep_mac: None,
            // Built on the heap (an array literal in `Box::new` may pass through the stack).
            route_cache: vec![EMPTY_ROUTE; ROUTE_CACHE_SLOTS]
                .try_into()
                .unwrap_or_else(|_| unreachable!("ROUTE_CACHE_SLOTS entries")),
            l2_changes: 0,
            worker_index: config.worker_index,
            workers: config.workers,
            snap: SnapCache::default(),
            edge,
            fast_path: true,
            snat_port_range: config.snat_port_range,
            settings_id: 0,
            reassemble_fragments: config.reassemble_fragments,
            fragment_egress: None,
        })
    }

    /// Applies reloaded settings: routes, static neighbors, SNAT addresses, conntrack
    /// timeouts and the ICMP error rate. Tracked flows stay: their translations are stored
    /// by value, and a SNAT address that stays keeps its allocator (whose ports in use are
    /// the conntrack's). Called on the worker at a snapshot change, so it never fails: a
    /// route or neighbor naming a port this pipeline lacks (the control side checks
    /// them) is skipped.
    #[cold]
    #[inline(never)]
    fn apply_settings(&mut self, settings: &LiveSettings) {
        self.settings_id = settings.id;
        let index_of = |id: u16| self.ports.iter().position(|p| p.id == id);
        let statics: Vec<_> = settings
            .routes
            .iter()
            .filter_map(|r| Some((r.prefix, r.via, index_of(r.port)?)))
            .collect();
        let connected = self
            .ports
            .iter()
            .enumerate()
            .flat_map(|(i, p)| p.addresses.iter().map(move |&net| (net, i)));
        self.routes = RouteTable::new(statics, connected);
        let neighbors: Vec<_> = settings
            .static_neighbors
            .iter()
            .copied()
            .filter(|&(port, _, _)| index_of(port).is_some())
            .collect();
        self.neighbors.replace_statics(&neighbors);
        let snat_addrs = snat_addresses(&self.ports, &settings.snat_addresses);
        let previous = std::mem::take(&mut self.snat);
        self.snat = match snat_allocators(
            &snat_addrs,
            previous,
            &self.snat_port_range,
            self.worker_index,
            self.workers,
        ) {
            Ok(snat) => snat,
            // The control side checked the addresses; keep the running ones.
            Err((_, previous)) => previous,
        };
        let static_routes: Vec<(Ipv4Net, usize)> = settings
            .routes
            .iter()
            .filter_map(|r| Some((r.prefix, index_of(r.port)?)))
            .collect();
        let active_snat: Vec<Ipv4Addr> = self.snat.iter().map(|(a, _)| *a).collect();
        // The snapshot's part of the policy is added again by `take_snapshot`, which
        // called this.
        self.edge = edge_policy(
            &self.ports,
            &static_routes,
            &active_snat,
            &settings.routable_prefixes,
        );
        self.ct.set_timeouts(settings.timeouts);
        if self.icmp_bucket.rate != u64::from(settings.icmp_errors_per_second) {
            self.icmp_bucket = TokenBucket::new(settings.icmp_errors_per_second);
        }
        // Every cached hop and L2 copy is recomputed.
        self.l2_changes += 1;
        self.route_cache.fill(EMPTY_ROUTE);
    }

    /// Turns the established-flow fast path off (or on again): for tests and benchmarks
    /// that compare it with the general path, which gives the same results.
    pub fn set_fast_path(&mut self, enabled: bool) {
        self.fast_path = enabled;
    }

    pub fn conntrack(&self) -> &Conntrack {
        &self.ct
    }

    pub fn worker_index(&self) -> usize {
        self.worker_index
    }

    /// ClientIP affinity entries replaced early because their bucket was full.
    pub fn affinity_evictions(&self) -> u64 {
        self.affinity.evictions
    }

    /// The MAC of `addr` on `port`, if resolved (for frames held for ARP).
    pub fn neighbor(&self, port: u16, addr: Ipv4Addr) -> Option<MacAddr> {
        self.neighbors.get(port, addr)
    }

    /// A mapping another worker learned.
    pub fn learn_neighbor(&mut self, port: u16, addr: Ipv4Addr, mac: MacAddr, now: Tick) {
        self.neighbors.learn(port, addr, mac, now, true);
    }

    /// What this worker learned from ARP since the last call (at most `LEARNED_CAPACITY`
    /// per period; later ones are learned by the other workers on their own).
    pub fn take_learned(&mut self) -> impl Iterator<Item = (u16, Ipv4Addr, MacAddr)> + '_ {
        self.learned.drain(..)
    }

    /// Bounded periodic work: conntrack expiry, neighbor ageing, and ARP requests for
    /// wanted or ageing next hops (each at most once per second), emitted as complete
    /// frames through `emit(port, frame)`.
    pub fn housekeeping(&mut self, now: Tick, emit: &mut dyn FnMut(u16, &[u8])) {
        self.ct.expire(now, CT_EXPIRE_BUDGET);
        let ports = &self.ports;
        let mut request = |port: u16, target: Ipv4Addr| {
            let Some(p) = ports.iter().find(|p| p.id == port) else {
                return;
            };
            let mut buf = [0u8; 60];
            {
                let mut e = EthernetFrame::new_unchecked(&mut buf[..]);
                e.set_dst_addr(MacAddr::BROADCAST);
                e.set_src_addr(p.mac);
                e.set_ethertype(ethernet::ETHERTYPE_ARP);
            }
            let mut a = ArpPacket::new_unchecked(&mut buf[ethernet::HEADER_LEN..]);
            a.init_ethernet_ipv4();
            a.set_operation(arp::OP_REQUEST);
            a.set_sender_hw(p.mac);
            a.set_sender_ip(p.source_for(target));
            a.set_target_hw(MacAddr::ZERO);
            a.set_target_ip(target);
            emit(port, &buf);
        };
        self.neighbors.sweep(
            now,
            NEIGHBOR_SWEEP_BUDGET,
            self.neighbor_timeout,
            &mut request,
        );
    }

    #[inline(always)]
    fn arrival(&self, id: u16) -> Arrival {
        self.arrivals
            .get(usize::from(id))
            .copied()
            .unwrap_or(Arrival::Unknown)
    }

    fn is_owned(&self, addr: Ipv4Addr) -> bool {
        self.ports.iter().any(|p| p.owns(addr))
    }

    fn is_snat_addr(&self, addr: Ipv4Addr) -> bool {
        self.snat.iter().any(|(a, _)| *a == addr)
    }

    #[inline]
    fn sync_snapshot(&mut self, snap: &Snapshot) {
        if self.snap.generation != Some(snap.generation) {
            self.take_snapshot(snap);
        }
    }

    /// Once per snapshot: kept out of line so the per-packet check above stays small.
    #[cold]
    #[inline(never)]
    fn take_snapshot(&mut self, snap: &Snapshot) {
        if let Some(settings) = snap.settings.as_deref() {
            if settings.id != self.settings_id {
                self.apply_settings(settings);
            }
        }
        self.l2_changes += 1;
        let mut vtep_nodes = HashMap::new();
        for r in &snap.pod_routes {
            if let Some(mac) = r.vtep_mac {
                self.remember_vtep_mac(r.vtep, mac);
            }
            if let Some(node) = &r.node {
                vtep_nodes.insert(r.vtep, node.clone());
            }
        }
        self.edge.take_snapshot(snap);
        self.snap = SnapCache {
            generation: Some(snap.generation),
            pod_routes: PodRoutes::new(&snap.pod_routes),
            vtep_nodes,
        };
    }

    /// Takes a received frame on `in_port` and decides its fate, rewriting it in place.
    /// A `Drop` verdict is counted into `stats` here, as are the causes of ICMP errors the
    /// pipeline sends (see the module docs) and per-frontend packets; rx/tx, hand-offs and
    /// exception traffic are the worker's to count. With several workers, a frame whose
    /// flow another worker owns comes back as `Handoff` untouched.
    pub fn process<F: Frame>(
        &mut self,
        frame: &mut F,
        in_port: u16,
        snapshot: &Snapshot,
        now: Tick,
        stats: &mut WorkerStats,
    ) -> Verdict {
        self.process_hashed(frame, in_port, snapshot, now, stats, None)
    }

    /// [`Pipeline::process`] with the frame's hash from [`Pipeline::prefetch_burst`]
    /// ([`BurstHashes::get`] at the frame's position in the burst), if it gave one.
    ///
    /// Inlined into the caller's loop up to the fast path: an established packet of one
    /// worker's table is forwarded without entering the general path's function (whose
    /// register saves and frame setup cost it more than the checks below).
    #[inline(always)]
    pub fn process_hashed<F: Frame>(
        &mut self,
        frame: &mut F,
        in_port: u16,
        snapshot: &Snapshot,
        now: Tick,
        stats: &mut WorkerStats,
        prefetched_hash: Option<u64>,
    ) -> Verdict {
        let verdict = match self.arrival(in_port) {
            Arrival::Port(pidx) if self.fast_path_first(snapshot) => {
                stats.size_for(snapshot);
                match self.fast_established(frame, pidx, snapshot, now, stats, prefetched_hash) {
                    Some(verdict) => {
                        stats.fast_path += 1;
                        verdict
                    }
                    None => {
                        self.process_general(frame, in_port, snapshot, now, stats, prefetched_hash)
                    }
                }
            }
            _ => self.process_general(frame, in_port, snapshot, now, stats, prefetched_hash),
        };
        if let Verdict::Drop(reason) = verdict {
            stats.drop(reason);
        }
        verdict
    }

    /// Whether a frame of one of the ports tries the fast path before the general path's
    /// first steps: when those would change nothing (the snapshot is the one the pipeline
    /// knows, and one worker owns every flow).
    #[inline(always)]
    fn fast_path_first(&self, snap: &Snapshot) -> bool {
        self.fast_path && self.workers == 1 && self.snap.generation == Some(snap.generation)
    }

    /// Everything but the inlined fast path above. It tries the fast path itself for the
    /// frames that did not take it first (a changed snapshot, several workers).
    #[inline(never)]
    fn process_general<F: Frame>(
        &mut self,
        frame: &mut F,
        in_port: u16,
        snap: &Snapshot,
        now: Tick,
        stats: &mut WorkerStats,
        prefetched_hash: Option<u64>,
    ) -> Verdict {
        let fast_tried = self.fast_path_first(snap);
        let pidx = match self.arrival(in_port) {
            Arrival::Port(pidx) => pidx,
            Arrival::FromException(real) => {
                return Verdict::Transmit {
                    port: self.ports[real].id,
                }
            }
            Arrival::Unknown => return Verdict::Drop(DropReason::NotForUs),
        };
        self.sync_snapshot(snap);
        stats.size_for(snap);
        if self.workers > 1 {
            let owner = self.owner(frame, in_port, snap);
            if owner != self.worker_index {
                return Verdict::Handoff {
                    worker: owner as u16,
                };
            }
        }
        if self.fast_path && !fast_tried {
            if let Some(verdict) =
                self.fast_established(frame, pidx, snap, now, stats, prefetched_hash)
            {
                stats.fast_path += 1;
                return verdict;
            }
        }
        let (l2, ethertype, dst_mac, src_mac) = match EthernetFrame::new_checked(frame.data()) {
            Ok(e) => (e.header_len(), e.ethertype(), e.dst_addr(), e.src_addr()),
            Err(_) => return Verdict::Drop(DropReason::Malformed),
        };
        if dst_mac.is_unicast() && dst_mac != self.ports[pidx].mac {
            return Verdict::Drop(DropReason::NotForUs);
        }
        match ethertype {
            ethernet::ETHERTYPE_ARP => return self.arp(frame, l2, pidx, snap, now),
            ethernet::ETHERTYPE_IPV4 => {}
            _ => return self.exception_or(pidx, DropReason::NotIpv4),
        }
        let mut ctx = Ctx {
            in_port: pidx,
            l2,
            prev_mac: src_mac,
            outer_src: None,
            flow_hash: None,
        };
        if let Err(reason) = check_ipv4(frame, l2) {
            return Verdict::Drop(reason);
        }
        // Only nodes send VXLAN, and they are on the cluster side: on an uplink the VTEP is
        // one of the gateway's own addresses like any other (the edge policy).
        let vxlan = self
            .vxlan
            .as_ref()
            .filter(|_| self.ports[pidx].role == PortRole::Cluster);
        if let Some(vx) = vxlan {
            let (is_vxlan, outer_src) = {
                let ip = Ipv4Packet::new_unchecked(&frame.data()[l2..]);
                let is = ip.dst() == vx.local_vtep
                    && ip.protocol() == ipv4::PROTO_UDP
                    && !ip.is_fragment()
                    && UdpPacket::new_checked(ip.payload())
                        .is_ok_and(|u| u.dst_port() == vx.udp_port);
                (is, ip.src())
            };
            if is_vxlan {
                if let Err(reason) = self.decap(frame, l2) {
                    return Verdict::Drop(reason);
                }
                let (l2, ethertype, src_mac) = match EthernetFrame::new_checked(frame.data()) {
                    Ok(e) => (e.header_len(), e.ethertype(), e.src_addr()),
                    Err(_) => return Verdict::Drop(DropReason::Malformed),
                };
                if ethertype != ethernet::ETHERTYPE_IPV4 {
                    return Verdict::Drop(DropReason::NotIpv4);
                }
                if let Err(reason) = check_ipv4(frame, l2) {
                    return Verdict::Drop(reason);
                }
                self.remember_vtep_mac(outer_src, src_mac);
                ctx.l2 = l2;
                ctx.prev_mac = src_mac;
                ctx.outer_src = Some(outer_src);
            }
        }
        self.ip_stage(frame, ctx, snap, now, stats, prefetched_hash)
    }

    /// Strips outer Ethernet/IPv4/UDP/VXLAN (validated up to UDP by the caller).
    fn decap<F: Frame>(&self, frame: &mut F, l2: usize) -> Result<(), DropReason> {
        let Some(vx) = &self.vxlan else {
            return Err(DropReason::Malformed);
        };
        let strip = {
            let ip = Ipv4Packet::new_unchecked(&frame.data()[l2..]);
            let ihl = ip.header_len();
            let udp = UdpPacket::new_checked(ip.payload()).map_err(|_| DropReason::Malformed)?;
            // `new_checked` refuses a header without the I flag as `Malformed`.
            let v = VxlanPacket::new_checked(udp.payload()).map_err(|e| match e {
                crate::wire::Error::Malformed => DropReason::VxlanBadFlags,
                crate::wire::Error::Truncated => DropReason::Malformed,
            })?;
            if v.vni() != vx.vni {
                return Err(DropReason::VxlanUnknownVni);
            }
            let inner_len = v.payload().len();
            let strip = l2 + ihl + 8 + 8;
            // Drop whatever follows the UDP datagram (padding) with the outer headers.
            let keep_end = strip + inner_len;
            (strip, keep_end)
        };
        let (strip, keep_end) = strip;
        let extra = frame.len() - keep_end;
        if !frame.trim(extra) || !frame.adj(strip) {
            return Err(DropReason::Malformed);
        }
        Ok(())
    }

    #[inline]
    fn remember_vtep_mac(&mut self, vtep: Ipv4Addr, mac: MacAddr) {
        if self.last_vtep_mac != Some((vtep, mac)) {
            self.store_vtep_mac(vtep, mac);
        }
    }

    fn store_vtep_mac(&mut self, vtep: Ipv4Addr, mac: MacAddr) {
        let room = self.vtep_macs.len() < VTEP_MACS;
        match self.vtep_macs.entry(vtep) {
            std::collections::hash_map::Entry::Occupied(mut known) => {
                if *known.get() != mac {
                    *known.get_mut() = mac;
                    self.l2_changes += 1;
                }
            }
            std::collections::hash_map::Entry::Vacant(slot) if room => {
                slot.insert(mac);
                self.l2_changes += 1;
            }
            // Full: not stored, so not the pair the map holds.
            std::collections::hash_map::Entry::Vacant(_) => return,
        }
        self.last_vtep_mac = Some((vtep, mac));
    }

    #[inline]
    fn vtep_mac(&self, vtep: Ipv4Addr) -> MacAddr {
        self.vtep_macs
            .get(&vtep)
            .copied()
            .unwrap_or(MacAddr::BROADCAST)
    }

    fn exception_or(&self, pidx: usize, reason: DropReason) -> Verdict {
        match self.ports[pidx].exception_port {
            Some(port) => Verdict::ToException { port },
            None => Verdict::Drop(reason),
        }
    }

    // ----- ARP -------------------------------------------------------------------------

    fn arp<F: Frame>(
        &mut self,
        frame: &mut F,
        l2: usize,
        pidx: usize,
        snap: &Snapshot,
        now: Tick,
    ) -> Verdict {
        let (op, sha, spa, tpa) = match ArpPacket::new_checked(&frame.data()[l2..]) {
            Ok(a) => (a.operation(), a.sender_hw(), a.sender_ip(), a.target_ip()),
            Err(_) => return Verdict::Drop(DropReason::Malformed),
        };
        let port = &self.ports[pidx];
        let port_id = port.id;
        let answerable = port.owns(tpa)
            || (port.role == PortRole::Uplink
                && matches!(
                    snap.service_addresses.get(&tpa),
                    Some(FrontendKind::LoadBalancer | FrontendKind::ExternalIp)
                ));
        let learnable = is_unicast(spa) && sha.is_unicast() && port.on_link(spa) && spa != tpa;
        if learnable {
            let create = op == arp::OP_REPLY || (op == arp::OP_REQUEST && answerable);
            if self.neighbors.learn(port_id, spa, sha, now, create)
                && self.learned.len() < LEARNED_CAPACITY
            {
                self.learned.push((port_id, spa, sha));
            }
        } else if is_unicast(spa) && sha.is_unicast() && port.on_link(spa) {
            // Gratuitous ARP: refresh an entry we already have.
            if self.neighbors.learn(port_id, spa, sha, now, false)
                && self.learned.len() < LEARNED_CAPACITY
            {
                self.learned.push((port_id, spa, sha));
            }
        }
        let port = &self.ports[pidx];
        if op == arp::OP_REQUEST && answerable && spa != tpa {
            let mac = port.mac;
            let data = frame.data_mut();
            {
                let mut e = EthernetFrame::new_unchecked(&mut data[..]);
                e.set_dst_addr(sha);
                e.set_src_addr(mac);
            }
            let mut a = ArpPacket::new_unchecked(&mut data[l2..]);
            a.set_operation(arp::OP_REPLY);
            a.set_target_hw(sha);
            a.set_target_ip(spa);
            a.set_sender_hw(mac);
            a.set_sender_ip(tpa);
            return Verdict::Transmit { port: port_id };
        }
        if op == arp::OP_REPLY {
            return self.exception_or(pidx, DropReason::ArpIgnored);
        }
        Verdict::Drop(DropReason::ArpIgnored)
    }

    // ----- IPv4 ------------------------------------------------------------------------

    /// `prefetched_hash`: as for the fast path, the burst prefetch read the same header
    /// bytes as the key below whenever it gave a hash.
    fn ip_stage<F: Frame>(
        &mut self,
        frame: &mut F,
        mut ctx: Ctx,
        snap: &Snapshot,
        now: Tick,
        stats: &mut WorkerStats,
        prefetched_hash: Option<u64>,
    ) -> Verdict {
        let (src, dst, protocol, fragment, l4) = {
            let ip = Ipv4Packet::new_unchecked(&frame.data()[ctx.l2..]);
            // A fragment's transport header is not looked at: fragments are never
            // translated, and a first fragment's UDP length covers bytes it does not carry
            // (checking it would drop every first fragment as `malformed`).
            let whole = !ip.is_fragment();
            let l4 = match rewrite::parse_l4(ip.protocol(), whole, ip.payload()) {
                Ok(l4) => l4,
                Err(_) => return Verdict::Drop(DropReason::Malformed),
            };
            (ip.src(), ip.dst(), ip.protocol(), ip.is_fragment(), l4)
        };
        let from_uplink = self.on_uplink(&ctx);
        if from_uplink {
            if let Err(bad) = self.edge.check_source(src) {
                return Verdict::Drop(bad.drop_reason());
            }
        }
        if fragment {
            if let Some(verdict) = self.fragment_verdict(dst, snap, from_uplink) {
                return verdict;
            }
        }
        if l4 == L4::IcmpError && !fragment {
            if let Some(v) = self.icmp_error_tracked(frame, ctx, snap, now, stats) {
                return v;
            }
        }
        if let L4::Ports {
            sport,
            dport,
            tcp_flags,
        } = l4
        {
            let hash = prefetched_hash
                .unwrap_or_else(|| FlowKey::hash_of(protocol, src, sport, dst, dport));
            debug_assert_eq!(
                hash,
                FlowKey::hash_of(protocol, src, sport, dst, dport),
                "the burst prefetch read another key"
            );
            let key = FlowKey::new(protocol, src, sport, dst, dport);
            ctx.flow_hash = Some(hash);
            if let Some((id, dir)) = self.ct.lookup_hashed(&key, hash, now) {
                // `None`: UDP to a gone backend, handled as a new flow below.
                if let Some(v) = self.established(frame, ctx, snap, now, stats, id, dir, tcp_flags)
                {
                    return v;
                }
            }
            if let Some(p) = Protocol::from_ip_proto(protocol) {
                if let Some(fe) = snap.match_frontend(dst, p, dport) {
                    if !decide::opens_connection(p, tcp_flags, self.ct.tcp_loose()) {
                        return Verdict::Drop(DropReason::TcpNoFlow);
                    }
                    return self.new_flow(frame, ctx, snap, now, stats, fe, key, tcp_flags);
                }
            }
        }
        let echo_request = matches!(l4, L4::Echo { request: true, .. }) && !fragment;
        let unframed = match l4 {
            L4::Ports { .. } => decide::Unframed::Ports,
            _ if echo_request => decide::Unframed::EchoRequest,
            _ => decide::Unframed::Other,
        };
        match decide::unmatched(snap, dst, unframed) {
            decide::Unmatched::Reject(reason) => {
                return self.reject(
                    frame,
                    ctx,
                    now,
                    stats,
                    (icmp::TYPE_DEST_UNREACHABLE, icmp::CODE_PORT_UNREACHABLE),
                    0,
                    reason,
                    Some(dst),
                )
            }
            decide::Unmatched::AnswerEcho => return self.answer_echo(frame, ctx, now),
            decide::Unmatched::Drop(reason) => return Verdict::Drop(reason),
            decide::Unmatched::NotService => {}
        }
        let local = self.is_owned(dst)
            || dst.is_broadcast()
            || dst.is_multicast()
            || self.ports[ctx.in_port]
                .addresses
                .iter()
                .any(|n| n.prefix_len() < 31 && n.broadcast() == dst);
        if local {
            let exception_port = self.ports[ctx.in_port].exception_port;
            return match decide::local(
                exception_port.is_some(),
                ctx.outer_src.is_some(),
                echo_request && self.is_owned(dst),
            ) {
                decide::Local::Exception => Verdict::ToException {
                    port: exception_port.unwrap_or_default(),
                },
                decide::Local::AnswerEcho => self.answer_echo(frame, ctx, now),
                decide::Local::Drop(reason) => Verdict::Drop(reason),
            };
        }
        if from_uplink && !self.edge.routable(dst) {
            return Verdict::Drop(DropReason::UplinkNotAllowed);
        }
        self.forward(frame, ctx, now, stats, Rewrite::default(), None)
    }

    /// What becomes of a fragment: reassembled when its flow is or may be tracked (to a
    /// service, node-port or SNAT address, or a reply or routed packet: nf_conntrack
    /// reassembles all of these), `None` (the general path: the kernel reassembles) when
    /// it is for the gateway itself. A fragment from an uplink that the whole datagram
    /// could not pass either is dropped before it takes a place in the table.
    #[cold]
    fn fragment_verdict(
        &self,
        dst: Ipv4Addr,
        snap: &Snapshot,
        from_uplink: bool,
    ) -> Option<Verdict> {
        let tracked = snap.service_addresses.contains_key(&dst)
            || snap.node_port_addresses.contains(&dst)
            || self.is_snat_addr(dst)
            || snap.service_cidr.is_some_and(|c| c.contains(&dst));
        if !self.reassemble_fragments {
            return tracked.then_some(Verdict::Drop(DropReason::Fragment));
        }
        if tracked {
            return Some(Verdict::Reassemble);
        }
        if self.is_owned(dst) || dst.is_broadcast() || dst.is_multicast() {
            return None;
        }
        if from_uplink && !self.edge.routable(dst) {
            return Some(Verdict::Drop(DropReason::UplinkNotAllowed));
        }
        Some(Verdict::Reassemble)
    }

    /// Whether the packet arrived on an uplink (the edge policy applies).
    #[inline(always)]
    fn on_uplink(&self, ctx: &Ctx) -> bool {
        self.ports[ctx.in_port].role == PortRole::Uplink
    }

    /// A conntrack hit. `None`: the entry was removed because its UDP backend is gone and
    /// the packet must be treated as a new flow.
    #[allow(clippy::too_many_arguments)]
    fn established<F: Frame>(
        &mut self,
        frame: &mut F,
        ctx: Ctx,
        snap: &Snapshot,
        now: Tick,
        stats: &mut WorkerStats,
        id: EntryId,
        dir: Direction,
        tcp_flags: Option<u8>,
    ) -> Option<Verdict> {
        let (nat, original, mut binding) = {
            let e = self.ct.entry(id);
            if self.on_uplink(&ctx) && !e.arrives_on_uplink(dir) {
                return Some(Verdict::Drop(DropReason::UplinkNotAllowed));
            }
            (*e.nat(), *e.original(), e.binding())
        };
        if binding.generation != snap.generation {
            // Frontend ids and counter slots are per snapshot: find the frontend again and
            // check the backend may keep the flow (kube-semantics item 12).
            match decide::tracked_flow(snap, original.protocol, &nat) {
                decide::TrackedFlow::Keep(fe) => {
                    binding = match fe {
                        Some(f) => SnapshotBinding {
                            generation: snap.generation,
                            frontend_id: f.id,
                            backend_counter: snap.backend_counter(
                                f.id,
                                nat.backend_addr,
                                nat.backend_port,
                            ),
                        },
                        // Its frontend is gone: counted under no frontend nor backend.
                        None => SnapshotBinding::new(snap.generation, NO_FRONTEND),
                    };
                    self.ct.revalidate(id, binding);
                }
                decide::TrackedFlow::Flush => {
                    self.ct.remove(id);
                    if dir == Direction::Original {
                        return None;
                    }
                    return Some(Verdict::Drop(DropReason::BackendGone));
                }
                decide::TrackedFlow::Gone => {
                    if dir == Direction::Original
                        && tcp_flags.is_some_and(crate::conntrack::opens_tcp_connection)
                    {
                        // A SYN is a new connection: it picks again.
                        self.ct.remove(id);
                        return None;
                    }
                    // The entry stays, not refreshed, for `backend_gone` at most (the
                    // generation is left behind, so each packet checks again): if the
                    // endpoint comes back meanwhile (moved between slices remove-first), the
                    // flow goes on where it was.
                    let grace = self.ct.timeouts().backend_gone;
                    self.ct.expire_by(id, now.saturating_add(grace));
                    return Some(Verdict::Drop(DropReason::BackendGone));
                }
            }
        }
        if dir == Direction::Original
            && tcp_flags.is_some_and(|f| f & TcpFlags::SYN.bits() as u8 != 0)
            && self.ct.entry(id).is_closed()
            && !self.backend_takes_new_connections(snap, &original, &nat)
        {
            // Port reuse after the end of a connection is a new connection, and a new
            // connection never goes to an endpoint that is not usable (item 11): the old
            // entry goes, and the SYN picks again.
            self.ct.remove(id);
            return None;
        }
        let rw = Rewrite::of_tracked(&nat, &original, dir);
        let len = frame.len().saturating_sub(ctx.l2) as u32;
        // Packets the TCP state machine calls invalid are still forwarded (no window
        // tracking here; the backend judges them).
        self.ct.on_packet(id, dir, tcp_flags, len, now);
        stats.count_packet(binding.frontend_id, binding.backend_counter);
        Some(self.forward(frame, ctx, now, stats, rw, None))
    }

    /// Whether the backend of a tracked flow is one its frontend would choose for a new
    /// connection now.
    fn backend_takes_new_connections(
        &self,
        snap: &Snapshot,
        original: &FlowKey,
        nat: &Nat,
    ) -> bool {
        Protocol::from_ip_proto(original.protocol)
            .and_then(|p| snap.match_frontend(nat.frontend_addr, p, nat.frontend_port))
            .is_some_and(|f| is_usable(&f.backends, nat.backend_addr, nat.backend_port))
    }

    #[allow(clippy::too_many_arguments)]
    fn new_flow<F: Frame>(
        &mut self,
        frame: &mut F,
        ctx: Ctx,
        snap: &Snapshot,
        now: Tick,
        stats: &mut WorkerStats,
        fe: &Arc<Frontend>,
        key: FlowKey,
        tcp_flags: Option<u8>,
    ) -> Verdict {
        if let Some(c) = stats.frontend_packets.get_mut(fe.id as usize) {
            *c += 1;
        }
        // A VTEP without a node name leaves the sender's node unknown: internalTrafficPolicy
        // Local is then treated as Cluster.
        let sender = decide::Sender {
            src: key.src,
            node: ctx
                .outer_src
                .and_then(|vtep| self.snap.vtep_nodes.get(&vtep)),
            from_pod: decide::needs_from_pod(fe)
                && (ctx.outer_src.is_some() || self.snap.pod_routes.vtep_for(key.src).is_some()),
        };
        let (set, policy_masquerade) = match decide::new_connection(fe, sender) {
            decide::NewConnection::Balance {
                set, masquerade, ..
            } => (set, masquerade),
            decide::NewConnection::Drop(reason) => return Verdict::Drop(reason),
            decide::NewConnection::Reject(reason) => {
                return self.reject(
                    frame,
                    ctx,
                    now,
                    stats,
                    (icmp::TYPE_DEST_UNREACHABLE, icmp::CODE_PORT_UNREACHABLE),
                    0,
                    reason,
                    Some(key.dst),
                )
            }
        };
        let hash = rewrite::flow_hash(key.protocol, key.src, key.src_port, key.dst, key.dst_port);
        let affinity_scope = fe.affinity_timeout_secs.map(|_| fe.service.stable_id());
        let affine = affinity_scope.and_then(|scope| {
            self.affinity
                .get(scope, key.src, now)
                .filter(|&(a, p)| is_usable(set, a, p))
        });
        let backend: (Ipv4Addr, u16) = match affine {
            Some(b) => b,
            None => match set.pick(pick_hash(fe, hash, key.src)) {
                Some(Backend { addr, port, .. }) => (*addr, *port),
                None => return Verdict::Drop(DropReason::NoEndpoints),
            },
        };
        let reply_without_snat =
            FlowKey::new(key.protocol, backend.0, backend.1, key.src, key.src_port);
        let reply_without_snat_hash = reply_without_snat.hash();
        if policy_masquerade.is_none() {
            // The reply key is known now (without SNAT): start fetching its index slot,
            // which the insert below probes, while the route and counters are looked up.
            self.ct.prefetch_slot(reply_without_snat_hash);
        }
        let key_hash = ctx.flow_hash.unwrap_or_else(|| key.hash());
        let route_slot = self.route_slot(backend.0);
        let Some(hop) = self.route_cache[route_slot].hop else {
            return Verdict::Drop(DropReason::NoRoute);
        };
        if !self.ct.half_open_allowed(key.protocol, key.src) {
            return Verdict::Drop(DropReason::HalfOpenLimit);
        }
        let mut snat = None;
        if policy_masquerade.is_some() || backend.0 == key.src {
            snat = self.allocate_snat(hop.port, key.protocol, backend, hash, now);
            if snat.is_none() {
                return Verdict::Drop(DropReason::SnatExhausted);
            }
        }
        let binding = SnapshotBinding {
            generation: snap.generation,
            frontend_id: fe.id,
            backend_counter: snap.backend_counter(fe.id, backend.0, backend.1),
        };
        let mut attempt = 0;
        let id = loop {
            let nat = Nat {
                frontend_addr: key.dst,
                frontend_port: key.dst_port,
                backend_addr: backend.0,
                backend_port: backend.1,
                snat,
            };
            let (reply, reply_hash) = match snat {
                None => (reply_without_snat, reply_without_snat_hash),
                Some((ra, rp)) => {
                    let reply = FlowKey::new(key.protocol, backend.0, backend.1, ra, rp);
                    (reply, reply.hash())
                }
            };
            let inserted =
                self.ct
                    .insert_hashed([key, reply], [key_hash, reply_hash], nat, binding, now);
            match inserted {
                Ok(id) => {
                    let reply_on_uplink = self.ports[hop.port].role == PortRole::Uplink;
                    self.ct
                        .admit_from_uplink(id, self.on_uplink(&ctx), reply_on_uplink);
                    break id;
                }
                Err(InsertError::Full) => return Verdict::Drop(DropReason::CtFull),
                Err(InsertError::Clash) => {
                    attempt += 1;
                    if attempt > 1 {
                        return Verdict::Drop(DropReason::SnatExhausted);
                    }
                    let salt = hash ^ 0x636c_6173_6800_0000;
                    snat = self.allocate_snat(hop.port, key.protocol, backend, salt, now);
                    if snat.is_none() {
                        return Verdict::Drop(DropReason::SnatExhausted);
                    }
                }
            }
        };
        let len = frame.len().saturating_sub(ctx.l2) as u32;
        if !self
            .ct
            .on_packet(id, Direction::Original, tcp_flags, len, now)
        {
            // Not a valid opener (e.g. a stray RST): forward it statelessly to the same
            // backend, keep no entry.
            self.ct.remove(id);
        }
        if let (Some(t), Some(scope)) = (fe.affinity_timeout_secs, affinity_scope) {
            self.affinity
                .refresh(scope, key.src, backend, Tick::from(t) * 1000, now);
        }
        let rw = Rewrite {
            src: snat,
            dst: Some(backend),
        };
        if let Some(c) = binding
            .backend_counter
            .and_then(|i| stats.backend_packets.get_mut(i))
        {
            *c += 1;
        }
        self.forward(frame, ctx, now, stats, rw, Some((hop, route_slot)))
    }

    /// A SNAT (address, port) for a flow leaving through port `egress`: the egress port's
    /// primary address when it is a SNAT address, else the first SNAT address. When the
    /// probed ports are all taken, an unassured flow's port is reclaimed (early drop).
    fn allocate_snat(
        &mut self,
        egress: usize,
        protocol: u8,
        backend: (Ipv4Addr, u16),
        hash: u64,
        now: Tick,
    ) -> Option<(Ipv4Addr, u16)> {
        let primary = self.ports[egress].primary();
        let (_, ports) = self
            .snat
            .iter()
            .find(|(a, _)| Some(*a) == primary)
            .or(self.snat.first())?;
        ports.allocate_reclaiming(&mut self.ct, protocol, backend, hash, now)
    }

    /// An ICMP error quoting a tracked flow: translate the quoted packet and the outer
    /// addresses as the flow's packets are translated, then forward. `None` when the quoted
    /// packet belongs to no tracked flow.
    fn icmp_error_tracked<F: Frame>(
        &mut self,
        frame: &mut F,
        ctx: Ctx,
        snap: &Snapshot,
        now: Tick,
        stats: &mut WorkerStats,
    ) -> Option<Verdict> {
        let (key, ihl) = {
            let ip = Ipv4Packet::new_unchecked(&frame.data()[ctx.l2..]);
            let emb = ip.payload().get(icmp::HEADER_LEN..)?;
            let (protocol, src, dst, sport, dport, _) = quoted_tuple(emb)?;
            (
                FlowKey::new(protocol, dst, dport, src, sport),
                ip.header_len(),
            )
        };
        let (id, dir) = self.ct.lookup(&key, now)?;
        if self.on_uplink(&ctx) && !self.ct.entry(id).arrives_on_uplink(dir) {
            return None;
        }
        let (nat, original, binding) = {
            let e = self.ct.entry(id);
            // Ids from another snapshot would count toward the wrong frontend and backend.
            let binding = Some(e.binding()).filter(|b| b.generation == snap.generation);
            (*e.nat(), *e.original(), binding)
        };
        // The translated key K' of a packet with key `key` travelling in `dir`.
        let (new_src, new_dst) = match dir {
            Direction::Original => (
                nat.snat.unwrap_or((key.src, key.src_port)),
                (nat.backend_addr, nat.backend_port),
            ),
            Direction::Reply => (
                (nat.frontend_addr, nat.frontend_port),
                if nat.snat.is_some() {
                    (original.src, original.src_port)
                } else {
                    (key.dst, key.dst_port)
                },
            ),
        };
        let data = &mut frame.data_mut()[ctx.l2..];
        let total = {
            let ip = Ipv4Packet::new_unchecked(&*data);
            usize::from(ip.total_len())
        };
        {
            let icmp_msg = &mut data[ihl..total];
            let emb = &mut icmp_msg[icmp::HEADER_LEN..];
            // The quoted packet travelled the other way: its source is K's destination.
            translate_quoted(emb, new_dst, new_src);
            let mut m = crate::wire::IcmpPacket::new_unchecked(icmp_msg);
            m.fill_checksum();
        }
        let rw = {
            let ip = Ipv4Packet::new_unchecked(&*data);
            Rewrite {
                src: (ip.src() == key.src).then_some((new_src.0, 0)),
                dst: (ip.dst() == key.dst).then_some((new_dst.0, 0)),
            }
        };
        // Addresses only: an ICMP error has no ports (`nat` leaves ICMP errors' bodies).
        rewrite::nat(data, rw.src, rw.dst);
        if let Some(b) = binding {
            stats.count_packet(b.frontend_id, b.backend_counter);
        }
        Some(self.forward(frame, ctx, now, stats, Rewrite::default(), None))
    }

    // ----- ICMP the gateway originates -------------------------------------------------

    /// Counts `reason` and answers with an ICMP error (rate-limited) from `from` (default:
    /// the in-port's address toward the sender).
    #[allow(clippy::too_many_arguments)]
    fn reject<F: Frame>(
        &mut self,
        frame: &mut F,
        ctx: Ctx,
        now: Tick,
        stats: &mut WorkerStats,
        kind: (u8, u8),
        mtu: u16,
        reason: DropReason,
        from: Option<Ipv4Addr>,
    ) -> Verdict {
        let (src, allowed) = {
            let ip = Ipv4Packet::new_unchecked(&frame.data()[ctx.l2..]);
            let quoting_error = ip.protocol() == ipv4::PROTO_ICMP
                && ip.frag_offset() == 0
                && crate::wire::IcmpPacket::new_checked(ip.payload()).is_ok_and(|m| {
                    !matches!(
                        m.msg_type(),
                        icmp::TYPE_ECHO_REQUEST | icmp::TYPE_ECHO_REPLY
                    )
                });
            (
                ip.src(),
                is_unicast(ip.src()) && ip.frag_offset() == 0 && !quoting_error,
            )
        };
        if !allowed {
            return Verdict::Drop(reason);
        }
        stats.drop(reason);
        if !self.icmp_bucket.take(now) {
            return Verdict::Drop(DropReason::IcmpRateLimited);
        }
        let from = from.unwrap_or_else(|| self.ports[ctx.in_port].source_for(src));
        if !rewrite::build_icmp_error(frame, ctx.l2, from, kind, mtu) {
            return Verdict::Drop(DropReason::NoMbuf);
        }
        self.output_local(frame, ctx, now, src)
    }

    fn answer_echo<F: Frame>(&mut self, frame: &mut F, ctx: Ctx, now: Tick) -> Verdict {
        let src = {
            let data = &mut frame.data_mut()[ctx.l2..];
            let src = Ipv4Packet::new_unchecked(&*data).src();
            rewrite::echo_reply(data);
            src
        };
        if !is_unicast(src) {
            return Verdict::Drop(DropReason::NoException);
        }
        self.output_local(frame, ctx, now, src)
    }

    /// Sends a packet the gateway built in place (ICMP) toward `dst`: back to the previous
    /// hop's MAC when the route leaves through the in-port, else routed normally.
    fn output_local<F: Frame>(
        &mut self,
        frame: &mut F,
        ctx: Ctx,
        now: Tick,
        dst: Ipv4Addr,
    ) -> Verdict {
        let Some(hop) = self.route(dst) else {
            return Verdict::Drop(DropReason::NoRoute);
        };
        if hop.vtep.is_none() && hop.port == ctx.in_port && ctx.outer_src.is_none() {
            let port = &self.ports[hop.port];
            let mut e = EthernetFrame::new_unchecked(frame.data_mut());
            e.set_dst_addr(ctx.prev_mac);
            e.set_src_addr(port.mac);
            return Verdict::Transmit { port: port.id };
        }
        self.egress(
            frame,
            Ctx {
                flow_hash: None,
                ..ctx
            },
            now,
            hop,
            None,
        )
    }

    // ----- Routing and egress ----------------------------------------------------------

    /// The hop toward `dst`, through a direct-mapped per-worker cache in front of the two
    /// longest-prefix lookups (pod CIDRs, then routes). Entries are tagged with the
    /// snapshot generation they were computed under, so a new snapshot invalidates them.
    fn route(&mut self, dst: Ipv4Addr) -> Option<Hop> {
        let slot = self.route_slot(dst);
        self.route_cache[slot].hop
    }

    /// The route cache slot holding `dst`'s hop under the current snapshot, filled now if
    /// it held something else.
    #[inline]
    fn route_slot(&mut self, dst: Ipv4Addr) -> usize {
        let key = u32::from(dst);
        // Fibonacci hashing: one multiply spreads neighbouring addresses over the slots.
        let slot =
            (key.wrapping_mul(0x9e37_79b9) >> (32 - ROUTE_CACHE_SLOTS.trailing_zeros())) as usize;
        if !self.slot_holds(slot, dst) {
            self.fill_route_slot(slot, dst);
        }
        slot
    }

    /// A route cache miss: the longest-prefix matches, out of line.
    #[cold]
    #[inline(never)]
    fn fill_route_slot(&mut self, slot: usize, dst: Ipv4Addr) {
        let tag = self.snap.generation.map_or(0, |g| g.wrapping_add(1));
        let key = u32::from(dst);
        self.route_cache[slot] = CachedRoute {
            dst: key,
            tag,
            hop: self.route_uncached(dst),
            l2: None,
        };
    }

    /// Whether route cache `slot` holds `dst`'s hop under the current snapshot.
    #[inline(always)]
    fn slot_holds(&self, slot: usize, dst: Ipv4Addr) -> bool {
        let tag = self.snap.generation.map_or(0, |g| g.wrapping_add(1));
        let cached = &self.route_cache[slot];
        cached.dst == u32::from(dst) && cached.tag == tag && tag != 0
    }

    /// Moves whenever a cached [`Adjacency`] may be wrong: a neighbor resolution or a VTEP
    /// MAC changed, or a new snapshot (which may configure VTEP MACs) was taken. Both
    /// counters only grow, so their sum moves when either does.
    #[inline]
    fn l2_epoch(&self) -> u64 {
        self.neighbors.epoch() + self.l2_changes
    }

    fn route_uncached(&self, dst: Ipv4Addr) -> Option<Hop> {
        // Pod CIDRs only mean VXLAN when VXLAN is configured.
        let pods = self.vxlan.is_some().then_some(&self.snap.pod_routes);
        self.routes.hop(dst, pods)
    }

    /// Route (unless `hop` is given, with the route cache slot it came from), TTL, MTU,
    /// translate, decrement TTL, encapsulate, L2.
    fn forward<F: Frame>(
        &mut self,
        frame: &mut F,
        ctx: Ctx,
        now: Tick,
        stats: &mut WorkerStats,
        rw: Rewrite,
        hop: Option<(Hop, usize)>,
    ) -> Verdict {
        let (dst, ttl, ip_len, df) = {
            let ip = Ipv4Packet::new_unchecked(&frame.data()[ctx.l2..]);
            (
                ip.dst(),
                ip.ttl(),
                usize::from(ip.total_len()),
                ip.dont_frag(),
            )
        };
        let final_dst = rw.dst.map_or(dst, |(a, _)| a);
        let (hop, cache_slot) = match hop {
            // The slot may have been refilled for another destination since.
            Some((hop, slot)) => (hop, self.slot_holds(slot, final_dst).then_some(slot)),
            None => {
                let slot = self.route_slot(final_dst);
                match self.route_cache[slot].hop {
                    Some(hop) => (hop, Some(slot)),
                    None => return Verdict::Drop(DropReason::NoRoute),
                }
            }
        };
        if ttl <= 1 {
            return self.reject(
                frame,
                ctx,
                now,
                stats,
                (icmp::TYPE_TIME_EXCEEDED, icmp::CODE_TTL_EXCEEDED),
                0,
                DropReason::TtlExceeded,
                None,
            );
        }
        let overhead = if hop.vtep.is_some() {
            VXLAN_OVERHEAD
        } else {
            0
        };
        let mtu = usize::from(self.ports[hop.port].mtu);
        if ip_len + overhead > mtu {
            if df {
                let next_mtu = mtu.saturating_sub(overhead) as u16;
                return self.reject(
                    frame,
                    ctx,
                    now,
                    stats,
                    (icmp::TYPE_DEST_UNREACHABLE, icmp::CODE_FRAG_NEEDED),
                    next_mtu,
                    DropReason::MtuExceeded,
                    None,
                );
            }
            return self.fragment_on_egress(frame, ctx, rw, hop, cache_slot, mtu - overhead);
        }
        {
            let ip = &mut frame.data_mut()[ctx.l2..];
            rewrite::forward_rewrite(ip, rw.src, rw.dst);
        }
        self.egress(frame, ctx, now, hop, cache_slot)
    }

    /// A packet without DF above the egress MTU: translated whole (its transport checksum
    /// covers every fragment), its link headers set aside for
    /// [`Pipeline::egress_fragment`], then handed to the worker to cut.
    #[cold]
    #[inline(never)]
    fn fragment_on_egress<F: Frame>(
        &mut self,
        frame: &mut F,
        mut ctx: Ctx,
        rw: Rewrite,
        hop: Hop,
        cache_slot: Option<usize>,
        ip_mtu: usize,
    ) -> Verdict {
        if ctx.l2 > FragmentEgress::LINK_MAX || ip_mtu < usize::from(MIN_FRAGMENT_MTU) {
            return Verdict::Drop(DropReason::MtuExceeded);
        }
        {
            let ip = &mut frame.data_mut()[ctx.l2..];
            rewrite::forward_rewrite(ip, rw.src, rw.dst);
        }
        let mut link = [0u8; FragmentEgress::LINK_MAX];
        link[..ctx.l2].copy_from_slice(&frame.data()[..ctx.l2]);
        // Every fragment takes the same underlay path (VXLAN source port): a hash of the
        // addresses when the flow gave none, since only the first fragment has ports.
        if ctx.flow_hash.is_none() {
            let ip = &frame.data()[ctx.l2..];
            let addresses = u64::from_be_bytes(ip[12..20].try_into().unwrap_or([0; 8]));
            ctx.flow_hash = Some(fmix64(addresses));
        }
        if !frame.adj(ctx.l2) {
            return Verdict::Drop(DropReason::Malformed);
        }
        self.fragment_egress = Some(FragmentEgress {
            ctx,
            hop,
            cache_slot,
            link,
        });
        Verdict::Fragment {
            ip_mtu: ip_mtu.min(usize::from(u16::MAX)) as u16,
        }
    }

    /// One fragment of the packet the last [`Verdict::Fragment`] was about (the frame
    /// starts at its IPv4 header, whose checksum is filled here): the link headers back,
    /// then the same egress as the whole packet would have taken.
    pub fn egress_fragment<F: Frame>(&mut self, frame: &mut F, now: Tick) -> Verdict {
        let Some(pending) = self.fragment_egress else {
            return Verdict::Drop(DropReason::Malformed);
        };
        match Ipv4Packet::new_checked(frame.data_mut()) {
            Ok(mut ip) => ip.fill_checksum(),
            Err(_) => return Verdict::Drop(DropReason::Malformed),
        }
        let l2 = pending.ctx.l2;
        if !frame.prepend(l2) {
            return Verdict::Drop(DropReason::NoMbuf);
        }
        frame.data_mut()[..l2].copy_from_slice(&pending.link[..l2]);
        self.egress(frame, pending.ctx, now, pending.hop, pending.cache_slot)
    }

    /// Encapsulates when the hop says so, then sets MACs: from the route cache's copy when
    /// `cache_slot` (the hop's slot) has a current one, else from the neighbor table and
    /// VTEP MACs, copying the result into the slot.
    fn egress<F: Frame>(
        &mut self,
        frame: &mut F,
        ctx: Ctx,
        now: Tick,
        hop: Hop,
        cache_slot: Option<usize>,
    ) -> Verdict {
        let epoch = self.l2_epoch();
        let cached = cache_slot
            .and_then(|slot| self.route_cache[slot].l2)
            .and_then(|(at, adjacency)| (at == epoch).then_some(adjacency));
        let (adjacency, resolved) = match cached {
            Some(adjacency) => {
                self.neighbors.touch(adjacency.neighbor_slot, now);
                (adjacency, true)
            }
            None => {
                let port_id = self.ports[hop.port].id;
                let resolution = self.neighbors.resolve(port_id, hop.next_hop, now);
                let (next_hop_mac, neighbor_slot) = resolution.unwrap_or((MacAddr::ZERO, 0));
                let adjacency = Adjacency {
                    port_id,
                    port_mac: self.ports[hop.port].mac,
                    next_hop_mac,
                    encap: self.encap_template(hop, next_hop_mac),
                    neighbor_slot,
                };
                if let (Some(slot), Some(_)) = (cache_slot, resolution) {
                    // `resolve` may have moved the epoch: tag the copy with the state it
                    // was taken from.
                    self.route_cache[slot].l2 = Some((self.l2_epoch(), adjacency));
                }
                (adjacency, resolution.is_some())
            }
        };
        self.write_l2(frame, ctx.l2, ctx.flow_hash, hop, &adjacency, resolved)
    }

    /// Encapsulates when the hop says so, then writes the MACs of `adjacency` (all but the
    /// next hop's when it is not `resolved`: the frame then waits for it).
    #[inline(always)]
    fn write_l2<F: Frame>(
        &self,
        frame: &mut F,
        l2: usize,
        flow_hash: Option<u64>,
        hop: Hop,
        adjacency: &Adjacency,
        resolved: bool,
    ) -> Verdict {
        // The plain case (two MACs) is inlined into the packet path; encapsulation is not.
        if let Some(template) = &adjacency.encap {
            if !Self::encapsulate(frame, l2, flow_hash, template) {
                return Verdict::Drop(DropReason::NoMbuf);
            }
        } else {
            let mut e = EthernetFrame::new_unchecked(frame.data_mut());
            e.set_src_addr(adjacency.port_mac);
            if resolved {
                e.set_dst_addr(adjacency.next_hop_mac);
            }
        }
        if !resolved {
            return Verdict::HoldForNeighbor {
                port: adjacency.port_id,
                next_hop: hop.next_hop,
            };
        }
        Verdict::Transmit {
            port: adjacency.port_id,
        }
    }

    /// Puts the packet at `l2` inside the VXLAN headers of `template` (the flow's hash, or
    /// one computed from the packet, chooses the outer source port); `false` when the
    /// frame has no headroom for them.
    #[inline(never)]
    fn encapsulate<F: Frame>(
        frame: &mut F,
        l2: usize,
        flow_hash: Option<u64>,
        template: &EncapTemplate,
    ) -> bool {
        let entropy = flow_hash.unwrap_or_else(|| {
            let ip = Ipv4Packet::new_unchecked(&frame.data()[l2..]);
            let (sport, dport) =
                match rewrite::parse_l4(ip.protocol(), ip.frag_offset() == 0, ip.payload()) {
                    Ok(L4::Ports { sport, dport, .. }) => (sport, dport),
                    Ok(L4::Echo { ident, .. }) => (ident, ident),
                    _ => (0, 0),
                };
            FlowKey::hash_of(ip.protocol(), ip.src(), sport, ip.dst(), dport)
        });
        // The template holds every MAC, the next hop's too (zero while unresolved).
        template.encapsulate(frame, l2, entropy)
    }

    /// The VXLAN headers of `hop` when it encapsulates, toward `next_hop_mac`.
    fn encap_template(&self, hop: Hop, next_hop_mac: MacAddr) -> Option<EncapTemplate> {
        let (vtep, vx) = (hop.vtep?, self.vxlan.as_ref()?);
        let port_mac = self.ports[hop.port].mac;
        Some(EncapTemplate::new(&EncapHop {
            next_hop_mac,
            src_mac: port_mac,
            inner_dst_mac: self.vtep_mac(vtep),
            local_vtep: vx.local_vtep,
            remote_vtep: vtep,
            udp_port: vx.udp_port,
            vni: vx.vni,
        }))
    }

    // ----- Burst prefetch --------------------------------------------------------------

    /// Runs ahead of a burst (VPP/DPVS style): computes each frame's conntrack key hash
    /// from its headers, prefetches the index slots, then the entries they point at, so
    /// that the table misses of a whole burst overlap instead of stalling packet by packet.
    /// Frames beyond [`PREFETCH_BURST`] are left alone. Changes nothing but cache contents;
    /// returns the hashes, which the caller hands back with each frame to
    /// [`Pipeline::process_hashed`] so that the fast path does not compute them again.
    ///
    /// Both stages back to back wait once for the index lines (stage 2 reads them) and once
    /// more for the entries; a caller with other work to do in between calls
    /// [`Pipeline::prefetch_slots`] and [`Pipeline::prefetch_entries`] apart.
    pub fn prefetch_burst<'a>(
        &self,
        in_port: u16,
        frames: impl Iterator<Item = &'a [u8]>,
    ) -> BurstHashes {
        let burst = self.prefetch_slots(in_port, frames);
        self.prefetch_entries(&burst);
        burst
    }

    /// Stage 1 of [`Pipeline::prefetch_burst`]: the hashes, and the index slots where
    /// their probes start. `in_port` is the DPDK port the burst came from: VXLAN is only
    /// looked into on cluster ports, as the pipeline itself does (on an uplink the VTEP is
    /// just one of the gateway's addresses), so that the hash is the one the stages use.
    #[inline]
    pub fn prefetch_slots<'a>(
        &self,
        in_port: u16,
        frames: impl Iterator<Item = &'a [u8]>,
    ) -> BurstHashes {
        let mut burst = BurstHashes::default();
        let decapsulates = match self.arrival(in_port) {
            Arrival::Port(pidx) => self.ports[pidx].role == PortRole::Cluster,
            // Frames from the kernel go out as they are and never use the hash.
            Arrival::FromException(_) | Arrival::Unknown => return burst,
        };
        for (position, data) in frames.take(PREFETCH_BURST).enumerate() {
            if let Some(hash) = self.prefetch_hash(data, decapsulates) {
                self.ct.prefetch_slot(hash);
                burst.hashes[position] = hash;
                burst.present |= 1 << position;
            }
        }
        burst
    }

    /// Stage 2 of [`Pipeline::prefetch_burst`]: the entries the (by now arrived) index
    /// slots of `burst` point at.
    #[inline]
    pub fn prefetch_entries(&self, burst: &BurstHashes) {
        let mut present = burst.present;
        while present != 0 {
            self.ct
                .prefetch_entry(burst.hashes[present.trailing_zeros() as usize]);
            present &= present - 1;
        }
    }

    /// The conntrack key hash ([`FlowKey::hash`]) of the common frame shapes, read at
    /// fixed offsets: untagged Ethernet, IPv4 without options or fragmentation,
    /// TCP/UDP/SCTP, directly or inside VXLAN. Only a hint, so it skips the validation the
    /// stages do (and the rarer shapes: VLAN tags, IPv4 options, ICMP): a wrong or missing
    /// hash costs a wasted prefetch, nothing else.
    #[inline]
    fn prefetch_hash(&self, data: &[u8], decapsulates: bool) -> Option<u64> {
        const IP: usize = ethernet::HEADER_LEN;
        const L4: usize = IP + ipv4::HEADER_LEN;
        /// Through the transport ports.
        const SPAN: usize = L4 + 4;
        /// (protocol, destination, destination port, hash)
        fn plain(h: &[u8; SPAN]) -> Option<(u8, Ipv4Addr, u16, u64)> {
            let ethertype = u16::from_be_bytes([h[12], h[13]]);
            let version_ihl = h[IP];
            // Neither the MF flag nor a fragment offset.
            let whole = h[IP + 6] & 0x3f == 0 && h[IP + 7] == 0;
            if ethertype != ethernet::ETHERTYPE_IPV4 || version_ihl != 0x45 || !whole {
                return None;
            }
            let protocol = h[IP + 9];
            if !matches!(
                protocol,
                ipv4::PROTO_TCP | ipv4::PROTO_UDP | ipv4::PROTO_SCTP
            ) {
                return None;
            }
            let addr = |at: usize| Ipv4Addr::new(h[at], h[at + 1], h[at + 2], h[at + 3]);
            let port = |at: usize| u16::from_be_bytes([h[at], h[at + 1]]);
            let (dst, dport) = (addr(IP + 16), port(L4 + 2));
            let hash = FlowKey::hash_of(protocol, addr(IP + 12), port(L4), dst, dport);
            Some((protocol, dst, dport, hash))
        }
        let (protocol, dst, dport, hash) = plain(data.first_chunk::<SPAN>()?)?;
        match &self.vxlan {
            Some(vx)
                if decapsulates
                    && protocol == ipv4::PROTO_UDP
                    && dst == vx.local_vtep
                    && dport == vx.udp_port =>
            {
                // The inner frame starts after outer Ethernet, IPv4, UDP and VXLAN.
                let inner = data.get(VXLAN_OVERHEAD..)?;
                plain(inner.first_chunk::<SPAN>()?).map(|(.., hash)| hash)
            }
            _ => Some(hash),
        }
    }

    // ----- Ownership -------------------------------------------------------------------

    /// Which worker owns this frame's flow (see the module docs). Cheap: parses headers
    /// only, touches no table but the snapshot's address sets.
    pub fn owner<F: Frame>(&self, frame: &F, in_port: u16, snapshot: &Snapshot) -> usize {
        let _ = in_port;
        if self.workers <= 1 {
            return 0;
        }
        let Some((_, _src, sport, dst, dport, src)) = self.flow_of(frame.data()) else {
            return 0;
        };
        if self.is_snat_addr(dst) {
            return SnatPorts::owner_of(dport, self.workers);
        }
        if snapshot.service_addresses.contains_key(&dst)
            || snapshot.node_port_addresses.contains(&dst)
        {
            return hash_ip_port(src, sport, self.workers);
        }
        hash_ip_port(dst, dport, self.workers)
    }

    /// (protocol, src, sport, dst, dport, src) of the flow a frame belongs to, looking into
    /// VXLAN and into the packet an ICMP error quotes (reversed).
    #[allow(clippy::type_complexity)]
    fn flow_of(&self, data: &[u8]) -> Option<(u8, Ipv4Addr, u16, Ipv4Addr, u16, Ipv4Addr)> {
        let eth = EthernetFrame::new_checked(data).ok()?;
        if eth.ethertype() != ethernet::ETHERTYPE_IPV4 {
            return None;
        }
        let mut ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
        if let Some(vx) = &self.vxlan {
            if ip.dst() == vx.local_vtep && ip.protocol() == ipv4::PROTO_UDP && !ip.is_fragment() {
                let udp = UdpPacket::new_checked(ip.payload()).ok()?;
                if udp.dst_port() == vx.udp_port {
                    let v = VxlanPacket::new_checked(udp.payload()).ok()?;
                    let inner = EthernetFrame::new_checked(v.payload()).ok()?;
                    if inner.ethertype() != ethernet::ETHERTYPE_IPV4 {
                        return None;
                    }
                    // Re-borrow the inner packet from the original slice.
                    let off = inner.payload().as_ptr() as usize - data.as_ptr() as usize;
                    ip = Ipv4Packet::new_checked(&data[off..]).ok()?;
                }
            }
        }
        let (src, dst, protocol) = (ip.src(), ip.dst(), ip.protocol());
        // Every fragment of a datagram must reach the worker reassembling it, and only the
        // first has ports: fragments are placed by their addresses (the whole datagram is
        // handed to its flow's owner after reassembly).
        if ip.is_fragment() {
            return Some((protocol, src, 0, dst, 0, src));
        }
        match rewrite::parse_l4(protocol, ip.frag_offset() == 0, ip.payload()).ok()? {
            L4::Ports { sport, dport, .. } => Some((protocol, src, sport, dst, dport, src)),
            L4::Echo { ident, .. } => Some((protocol, src, ident, dst, ident, src)),
            L4::IcmpError => {
                let emb = ip.payload().get(icmp::HEADER_LEN..)?;
                let (p, es, ed, esp, edp, _) = quoted_tuple(emb)?;
                Some((p, ed, edp, es, esp, ed))
            }
            L4::Other => None,
        }
    }
}

/// Validates the IPv4 header at `l2` (length, version, IHL, checksum) and trims Ethernet
/// padding after `total_len`.
fn check_ipv4<F: Frame>(frame: &mut F, l2: usize) -> Result<(), DropReason> {
    let total = {
        let ip = Ipv4Packet::new_checked(&frame.data()[l2..]).map_err(|_| DropReason::Malformed)?;
        if !ip.verify_checksum() {
            return Err(DropReason::BadChecksum);
        }
        usize::from(ip.total_len())
    };
    let extra = frame.len() - (l2 + total);
    if extra > 0 && !frame.trim(extra) {
        return Err(DropReason::Malformed);
    }
    Ok(())
}

/// The tuple of a packet quoted by an ICMP error: (protocol, src, dst, sport, dport, ihl).
/// ICMP echo quotes use the identifier as both ports.
fn quoted_tuple(emb: &[u8]) -> Option<(u8, Ipv4Addr, Ipv4Addr, u16, u16, usize)> {
    if emb.len() < ipv4::HEADER_LEN {
        return None;
    }
    let ip = Ipv4Packet::new_unchecked(emb);
    let ihl = ip.header_len();
    if ip.version() != 4 || ihl < ipv4::HEADER_LEN || emb.len() < ihl + 8 {
        return None;
    }
    let l4 = &emb[ihl..];
    let (sport, dport) = match ip.protocol() {
        ipv4::PROTO_TCP | ipv4::PROTO_UDP | ipv4::PROTO_SCTP => (
            u16::from_be_bytes([l4[0], l4[1]]),
            u16::from_be_bytes([l4[2], l4[3]]),
        ),
        ipv4::PROTO_ICMP if matches!(l4[0], icmp::TYPE_ECHO_REQUEST | icmp::TYPE_ECHO_REPLY) => {
            let ident = u16::from_be_bytes([l4[4], l4[5]]);
            (ident, ident)
        }
        _ => return None,
    };
    Some((ip.protocol(), ip.src(), ip.dst(), sport, dport, ihl))
}

/// Rewrites a quoted packet (validated by `quoted_tuple`) to `src` → `dst`: addresses with
/// the quoted IPv4 checksum patched, ports, and the quoted UDP/TCP checksum when it is
/// within the quote.
fn translate_quoted(emb: &mut [u8], src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) {
    let mut ip = Ipv4Packet::new_unchecked(&mut *emb);
    let ihl = ip.header_len();
    let protocol = ip.protocol();
    let addresses = checksum::Delta::default()
        .u32(u32::from(ip.src()), u32::from(src.0))
        .u32(u32::from(ip.dst()), u32::from(dst.0));
    ip.set_src(src.0);
    ip.set_dst(dst.0);
    ip.set_checksum(addresses.apply(ip.checksum()));
    let l4 = &mut emb[ihl..];
    let rd = |b: &[u8], at: usize| u16::from_be_bytes([b[at], b[at + 1]]);
    match protocol {
        ipv4::PROTO_TCP | ipv4::PROTO_UDP | ipv4::PROTO_SCTP => {
            let (osp, odp) = (rd(l4, 0), rd(l4, 2));
            l4[0..2].copy_from_slice(&src.1.to_be_bytes());
            l4[2..4].copy_from_slice(&dst.1.to_be_bytes());
            let at = match protocol {
                ipv4::PROTO_UDP => Some(6),
                ipv4::PROTO_TCP if l4.len() >= 18 => Some(16),
                _ => None,
            };
            if let Some(at) = at {
                let change = addresses.u16(osp, src.1).u16(odp, dst.1);
                rewrite::patch_l4_checksum(l4, at, protocol, change);
            }
        }
        ipv4::PROTO_ICMP => {
            // Echo: the identifier of the quoted request/reply is its source "port".
            let ident = if l4[0] == icmp::TYPE_ECHO_REQUEST {
                src.1
            } else {
                dst.1
            };
            let old = rd(l4, 4);
            let c = checksum::update_u16(rd(l4, 2), old, ident);
            l4[4..6].copy_from_slice(&ident.to_be_bytes());
            l4[2..4].copy_from_slice(&c.to_be_bytes());
        }
        _ => {}
    }
}
