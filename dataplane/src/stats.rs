//! Per-worker counters. A worker owns its `WorkerStats` and bumps plain integers (no shared
//! atomic on the per-packet path); every few milliseconds it copies them into a
//! `StatsCell` the control side reads and sums.

use std::sync::Arc;

use hdrhistogram::Histogram;
use parking_lot::Mutex;

use crate::snapshot::Snapshot;

/// Most ports a gateway drives (counters are fixed arrays indexed by port id).
pub const MAX_PORTS: usize = 16;

macro_rules! drop_reasons {
    ($($variant:ident => $name:literal: $help:literal,)*) => {
        /// Why a frame was not transmitted. Every drop has one; the names are the
        /// `reason` label of `servicegate_drops_total` and never change.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum DropReason { $($variant,)* }

        impl DropReason {
            pub const ALL: &'static [DropReason] = &[$(DropReason::$variant,)*];
            pub const COUNT: usize = Self::ALL.len();

            pub fn as_str(self) -> &'static str {
                match self { $(DropReason::$variant => $name,)* }
            }

            pub fn help(self) -> &'static str {
                match self { $(DropReason::$variant => $help,)* }
            }
        }
    };
}

drop_reasons! {
    Malformed => "malformed": "a header is truncated or inconsistent",
    NotIpv4 => "not_ipv4": "not IPv4 or ARP, and no exception port to hand it to",
    BadChecksum => "bad_checksum": "IPv4 header checksum wrong",
    TtlExceeded => "ttl_exceeded": "TTL reached zero (an ICMP time-exceeded was sent when allowed)",
    Fragment => "fragment": "IPv4 fragment given up without being reassembled: timed out, duplicate or overlapping, over 8 per datagram or 65,407 bytes, the table full (or fragments.reassemble off and the fragment's flow tracked)",
    NoService => "no_service": "destination is an unallocated service address, or a service port nobody serves",
    NoEndpoints => "no_endpoints": "service has no usable endpoint (an ICMP port-unreachable was sent when allowed)",
    SourceRange => "source_range": "LoadBalancer source outside loadBalancerSourceRanges",
    NoLocalEndpoint => "no_local_endpoint": "internalTrafficPolicy Local and no endpoint on the sender's node",
    BackendGone => "backend_gone": "the flow's backend left every EndpointSlice (TCP/SCTP; the entry lingers conntrack.timeouts.backend_gone in case it returns)",
    TcpNoFlow => "tcp_no_flow": "a TCP segment without SYN to a service frontend and no tracked flow (never balanced as a new connection; nf_conntrack INVALID)",
    CtFull => "ct_full": "connection table full of established flows",
    HalfOpenLimit => "half_open_limit": "the source already holds conntrack.half_open_per_source half-open flows",
    SnatExhausted => "snat_exhausted": "no free SNAT port in this worker's range",
    NoRoute => "no_route": "no route to the destination",
    NoNeighbor => "no_neighbor": "next hop MAC unresolved (an ARP request was sent)",
    MtuExceeded => "mtu_exceeded": "frame larger than the egress MTU (ICMP frag-needed sent when DF)",
    VxlanUnknownVni => "vxlan_unknown_vni": "VXLAN with a VNI the gateway does not serve",
    VxlanBadFlags => "vxlan_bad_flags": "VXLAN without the I flag",
    NotForUs => "not_for_us": "frame for another host and nothing routes it",
    NoException => "no_exception_port": "traffic for the gateway itself and no exception port",
    ArpIgnored => "arp_ignored": "ARP not for an address the gateway answers",
    MartianSource => "martian_source": "from an uplink with a source that is never valid (0/8, loopback, multicast, class E, a broadcast)",
    SpoofedSource => "spoofed_source": "from an uplink with a cluster-side source (pod or service CIDR, SNAT or gateway address, a cluster route)",
    UplinkNotAllowed => "uplink_not_allowed": "from an uplink to neither a Service frontend, a tracked flow nor the gateway (edge.routable_prefixes allows more)",
    IcmpRateLimited => "icmp_rate_limited": "an ICMP error was due but the rate limit held it back",
    HandoffFull => "handoff_full": "hand-off ring to the owning worker was full",
    TxFull => "tx_full": "the NIC refused the frame",
    NoMbuf => "no_mbuf": "mempool empty when a frame had to be built",
    Shutdown => "shutdown": "in flight (held or handed over) when the workers stopped",
}

/// Counters of one worker since start.
#[derive(Clone)]
pub struct WorkerStats {
    pub rx_packets: [u64; MAX_PORTS],
    pub rx_bytes: [u64; MAX_PORTS],
    pub tx_packets: [u64; MAX_PORTS],
    pub tx_bytes: [u64; MAX_PORTS],
    pub drops: [u64; DropReason::COUNT],
    pub bursts: u64,
    pub busy_cycles: u64,
    pub total_cycles: u64,
    pub handoffs_out: u64,
    pub handoffs_in: u64,
    pub to_exception: u64,
    /// Packets the pipeline's established-flow fast path forwarded.
    pub fast_path: u64,
    /// IPv4 fragments taken into reassembly.
    pub fragments_in: u64,
    /// Datagrams reassembled from them.
    pub reassembled: u64,
    /// Fragments the gateway cut from packets larger than the egress MTU.
    pub fragments_out: u64,
    pub from_exception: u64,
    /// Snapshot generation the worker last loaded.
    pub generation: u64,
    /// Processing time of non-empty bursts, in nanoseconds.
    pub burst_latency_ns: Histogram<u64>,
    /// Per-frontend packets (index = frontend id of `generation`'s snapshot).
    pub frontend_packets: Vec<u64>,
    /// Per-backend packets (index = `Snapshot::backend_counter` of `generation`'s snapshot).
    pub backend_packets: Vec<u64>,
    /// Published cell only: the per-frontend/backend counts of generations the worker has
    /// left, for the control side to fold into its totals (it takes them; so the vectors
    /// are freed on the control side).
    pub retired: Vec<RetiredCounters>,
    pub conntrack: ConntrackCounters,
}

/// Per-frontend and per-backend packets a worker counted under one snapshot generation.
#[derive(Clone, Debug, Default)]
pub struct RetiredCounters {
    pub generation: u64,
    pub frontend_packets: Vec<u64>,
    pub backend_packets: Vec<u64>,
}

/// Conntrack figures a worker reports (copied from its table).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConntrackCounters {
    pub entries: u64,
    pub inserts: u64,
    pub evictions: u64,
    pub expirations: u64,
    pub full: u64,
}

impl Default for WorkerStats {
    fn default() -> Self {
        WorkerStats {
            rx_packets: [0; MAX_PORTS],
            rx_bytes: [0; MAX_PORTS],
            tx_packets: [0; MAX_PORTS],
            tx_bytes: [0; MAX_PORTS],
            drops: [0; DropReason::COUNT],
            bursts: 0,
            busy_cycles: 0,
            total_cycles: 0,
            handoffs_out: 0,
            handoffs_in: 0,
            to_exception: 0,
            fast_path: 0,
            fragments_in: 0,
            reassembled: 0,
            fragments_out: 0,
            from_exception: 0,
            generation: 0,
            burst_latency_ns: new_latency_histogram(),
            frontend_packets: Vec::new(),
            backend_packets: Vec::new(),
            retired: Vec::new(),
            conntrack: ConntrackCounters::default(),
        }
    }
}

/// 1 ns to 1 s at 2 significant digits (1 %): fixed size, so recording never allocates.
/// Each worker adds its histogram into its published cell and clears it every 10 ms: at
/// 3 digits that was 21.5k counters (172 KB) walked and cleared, ~2 % of a worker core
/// and a sweep through its L2; at 2 digits it is 3.1k (25 KB).
pub fn new_latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 1_000_000_000, 2).expect("static histogram bounds")
}

impl WorkerStats {
    #[inline]
    pub fn drop(&mut self, reason: DropReason) {
        self.drops[reason as usize] += 1;
    }

    /// Counts a packet of frontend `frontend_id`, to the backend counter at `backend` (both
    /// indexes of the current snapshot).
    #[inline]
    pub fn count_packet(&mut self, frontend_id: u32, backend: Option<usize>) {
        if let Some(c) = self.frontend_packets.get_mut(frontend_id as usize) {
            *c += 1;
        }
        if let Some(c) = backend.and_then(|i| self.backend_packets.get_mut(i)) {
            *c += 1;
        }
    }

    /// Makes the per-frontend/backend counter arrays as long as `snapshot` needs (they
    /// grow only when a new snapshot arrives).
    #[inline]
    pub fn size_for(&mut self, snapshot: &Snapshot) {
        let frontends = snapshot.frontend_count as usize;
        if self.frontend_packets.len() < frontends {
            self.frontend_packets.resize(frontends, 0);
        }
        let backends = snapshot.backend_counter_count();
        if self.backend_packets.len() < backends {
            self.backend_packets.resize(backends, 0);
        }
    }

    /// A worker starts counting under `snapshot`: the counts of its previous generation go
    /// to the published cell's `retired` list (the ids of one snapshot mean nothing in
    /// another), and the cell shows the new generation with no counts yet. Runs once per
    /// snapshot change, never per packet.
    pub fn begin_generation(&mut self, cell: &StatsCell, snapshot: &Snapshot) {
        let counted = self.frontend_packets.iter().any(|&c| c != 0)
            || self.backend_packets.iter().any(|&c| c != 0);
        let retired = RetiredCounters {
            generation: self.generation,
            frontend_packets: std::mem::take(&mut self.frontend_packets),
            backend_packets: std::mem::take(&mut self.backend_packets),
        };
        self.generation = snapshot.generation;
        self.size_for(snapshot);
        let mut shared = cell.lock();
        if counted {
            shared.retired.push(retired);
        }
        shared.generation = snapshot.generation;
        shared.frontend_packets.clear();
        shared.backend_packets.clear();
    }

    pub fn drops_of(&self, reason: DropReason) -> u64 {
        self.drops[reason as usize]
    }

    pub fn total_drops(&self) -> u64 {
        self.drops.iter().sum()
    }

    /// Adds `other` into `self` (the control side sums workers).
    pub fn merge(&mut self, other: &WorkerStats) {
        for i in 0..MAX_PORTS {
            self.rx_packets[i] += other.rx_packets[i];
            self.rx_bytes[i] += other.rx_bytes[i];
            self.tx_packets[i] += other.tx_packets[i];
            self.tx_bytes[i] += other.tx_bytes[i];
        }
        for (mine, theirs) in self.drops.iter_mut().zip(other.drops.iter()) {
            *mine += theirs;
        }
        self.bursts += other.bursts;
        self.busy_cycles += other.busy_cycles;
        self.total_cycles += other.total_cycles;
        self.handoffs_out += other.handoffs_out;
        self.handoffs_in += other.handoffs_in;
        self.to_exception += other.to_exception;
        self.fast_path += other.fast_path;
        self.fragments_in += other.fragments_in;
        self.reassembled += other.reassembled;
        self.fragments_out += other.fragments_out;
        self.from_exception += other.from_exception;
        self.generation = self.generation.max(other.generation);
        let _ = self.burst_latency_ns.add(&other.burst_latency_ns);
        if self.frontend_packets.len() < other.frontend_packets.len() {
            self.frontend_packets
                .resize(other.frontend_packets.len(), 0);
        }
        for (mine, theirs) in self
            .frontend_packets
            .iter_mut()
            .zip(&other.frontend_packets)
        {
            *mine += theirs;
        }
        if self.backend_packets.len() < other.backend_packets.len() {
            self.backend_packets.resize(other.backend_packets.len(), 0);
        }
        for (mine, theirs) in self.backend_packets.iter_mut().zip(&other.backend_packets) {
            *mine += theirs;
        }
        self.conntrack.entries += other.conntrack.entries;
        self.conntrack.inserts += other.conntrack.inserts;
        self.conntrack.evictions += other.conntrack.evictions;
        self.conntrack.expirations += other.conntrack.expirations;
        self.conntrack.full += other.conntrack.full;
    }
}

/// Where a worker publishes its counters; the lock is taken once per publish period by
/// the worker and on each scrape by the control side, never per packet.
pub type StatsCell = Arc<Mutex<WorkerStats>>;

impl WorkerStats {
    /// Copies a worker's live counters into its published cell. The latency histogram
    /// moves instead (added here, reset there), so the worker's copy stays small and
    /// recording never allocates.
    pub fn publish_from(&mut self, local: &mut WorkerStats) {
        self.rx_packets = local.rx_packets;
        self.rx_bytes = local.rx_bytes;
        self.tx_packets = local.tx_packets;
        self.tx_bytes = local.tx_bytes;
        self.drops = local.drops;
        self.bursts = local.bursts;
        self.busy_cycles = local.busy_cycles;
        self.total_cycles = local.total_cycles;
        self.handoffs_out = local.handoffs_out;
        self.handoffs_in = local.handoffs_in;
        self.to_exception = local.to_exception;
        self.fast_path = local.fast_path;
        self.fragments_in = local.fragments_in;
        self.reassembled = local.reassembled;
        self.fragments_out = local.fragments_out;
        self.from_exception = local.from_exception;
        self.generation = local.generation;
        self.frontend_packets.clone_from(&local.frontend_packets);
        self.backend_packets.clone_from(&local.backend_packets);
        self.conntrack = local.conntrack;
        let _ = self.burst_latency_ns.add(&local.burst_latency_ns);
        local.burst_latency_ns.reset();
    }
}
