//! Per-worker connection tracking: one [`Conntrack`] per worker, never shared (no lock, no
//! atomic), fully preallocated by [`Conntrack::new`]: nothing on the per-packet path
//! allocates.
//!
//! # Layout
//!
//! * A slab of [`Entry`] (`Vec<Entry>`, `capacity` long) with an intrusive free list.
//! * An open-addressing index of `next_pow2(8 × capacity)` 8-byte slots (32-bit hash tag,
//!   entry id + direction), linear probing, backward-shift deletion (no tombstones). Both
//!   directions of a flow are keys of the same entry, so the load factor never exceeds ¼:
//!   a full table under a flood of new connections probes, inserts and removes (backward
//!   shift) two keys per packet, and short runs keep that work and its misses low, for 64
//!   index bytes per entry (twice what ½ would take).
//! * An intrusive FIFO (doubly linked through the slab) of *unassured* entries — TCP that has
//!   not reached ESTABLISHED with a reply seen, UDP/ICMP/other without a reply — in the order
//!   they were created. When the table is full, an insert early-drops the head of that list
//!   (the oldest embryonic flow) in O(1). Assured flows are never early-dropped: a SYN flood
//!   cannot push out an established connection; when nothing is droppable the insert is
//!   refused and counted (`full`).
//! * Expiry is incremental: [`Conntrack::expire`] sweeps a cursor over at most `budget` slab
//!   slots per call, so a worker can call it every poll loop at bounded cost. A full sweep
//!   takes `capacity / budget` calls; an entry may therefore outlive its deadline by that
//!   long in memory, but never in behaviour: [`Conntrack::lookup`] treats (and removes) an
//!   entry whose deadline has passed as absent, and an insert that clashes with an expired
//!   entry reclaims it.
//!
//! # Time
//!
//! [`Tick`] is milliseconds from any fixed origin (the worker's clock, or a simulated one in
//! tests). An entry is expired when `now >= expires_at`.
//!
//! # Protocol models
//!
//! * TCP follows Linux's `nf_conntrack_proto_tcp` state table (flag classes by precedence:
//!   RST, SYN or SYN+ACK, FIN, ACK; per direction) without window tracking. A fresh entry starts in `None`
//!   (10 s, the CLOSE timeout) and the pipeline feeds it the first packet: a SYN moves it to
//!   SYN_SENT; a bare ACK picks up a mid-stream flow (Linux `tcp_loose=1`), which matters for
//!   a gateway fleet where ECMP may move a flow between gateways — Maglev picks the same
//!   backend on the new gateway. Until a reply is seen a TCP entry's timeout is capped at
//!   the SYN_SENT timeout, so a picked-up flow that never hears back cannot live 5 days. An
//!   original-direction SYN in TIME_WAIT or CLOSE reopens the entry (port reuse) as a new,
//!   unassured SYN_SENT flow with the same translation. Invalid or ignored packets neither
//!   move the state nor refresh the timer; [`Conntrack::on_packet`] returns `false` for them
//!   and the caller decides whether to forward them.
//! * UDP: unreplied (30 s) until a reply is seen, then assured (120 s).
//! * ICMP echo (identifier in both ports): 30 s; assured once the reply is seen.
//! * SCTP (simple model, no chunk parsing): unreplied 30 s, then assured with Linux's
//!   ESTABLISHED timeout (210 s, SCTP heartbeats keep idle associations alive).
//! * Anything else: 600 s (Linux generic), assured once a reply is seen.

use std::fmt;
use std::net::Ipv4Addr;
use std::ops::RangeInclusive;

use crate::maglev::fmix64;

/// Milliseconds on the worker's clock.
pub type Tick = u64;

/// One second in [`Tick`]s.
pub const SECOND: Tick = 1000;

/// IP protocol numbers the tracker models.
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_SCTP: u8 = 132;

/// TCP header flag bits (byte 13 of the TCP header).
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
}

const NIL: u32 = u32::MAX;

/// A connection's 5-tuple as seen on the wire in one direction. For ICMP echo the
/// identifier is used as both ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub src_port: u16,
    pub dst_port: u16,
    pub protocol: u8,
}

impl FlowKey {
    pub const fn new(
        protocol: u8,
        src: Ipv4Addr,
        src_port: u16,
        dst: Ipv4Addr,
        dst_port: u16,
    ) -> FlowKey {
        FlowKey {
            src,
            dst,
            src_port,
            dst_port,
            protocol,
        }
    }

    /// The same flow seen from the other end (source and destination swapped).
    #[inline]
    pub const fn reversed(&self) -> FlowKey {
        FlowKey {
            src: self.dst,
            dst: self.src,
            src_port: self.dst_port,
            dst_port: self.src_port,
            protocol: self.protocol,
        }
    }

    /// A fast, seedless 64-bit hash of the packed fields (two rounds of `fmix64`); used to
    /// index the table. Not symmetric: `k.hash() != k.reversed().hash()` in general.
    #[inline]
    pub fn hash(&self) -> u64 {
        Self::hash_of(
            self.protocol,
            self.src,
            self.src_port,
            self.dst,
            self.dst_port,
        )
    }

    /// [`FlowKey::hash`] of the key these fields would make. The packet path hashes the
    /// values it just parsed with this: hashing a key it has just built in memory makes
    /// the compiler load the two addresses as one word from two narrower stores, which
    /// stalls (failed store-to-load forwarding).
    #[inline]
    pub fn hash_of(
        protocol: u8,
        src: Ipv4Addr,
        src_port: u16,
        dst: Ipv4Addr,
        dst_port: u16,
    ) -> u64 {
        let addrs = (u64::from(u32::from(src)) << 32) | u64::from(u32::from(dst));
        let rest = (u64::from(src_port) << 32) | (u64::from(dst_port) << 16) | u64::from(protocol);
        fmix64(addrs ^ fmix64(rest ^ 0x636f_6e6e_7472_6b31))
    }
}

impl fmt::Display for FlowKey {
    /// `tcp 10.0.0.5:41000 -> 10.96.0.10:80`, the form `ctl trace` accepts.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = match self.protocol {
            PROTO_TCP => "tcp",
            PROTO_UDP => "udp",
            PROTO_SCTP => "sctp",
            PROTO_ICMP => "icmp",
            _ => {
                return write!(
                    f,
                    "proto-{} {}:{} -> {}:{}",
                    self.protocol, self.src, self.src_port, self.dst, self.dst_port
                )
            }
        };
        write!(
            f,
            "{proto} {}:{} -> {}:{}",
            self.src, self.src_port, self.dst, self.dst_port
        )
    }
}

/// Which key of an entry a packet matched.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// As the client sent it: client → frontend.
    Original = 0,
    /// As the backend answers: backend → client (or backend → SNAT address:port).
    Reply = 1,
}

impl Direction {
    pub const fn opposite(self) -> Direction {
        match self {
            Direction::Original => Direction::Reply,
            Direction::Reply => Direction::Original,
        }
    }
}

/// The translation of a flow, by value (never an index into a snapshot).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Nat {
    /// The destination the client addressed (VIP / node address / external IP) and port.
    pub frontend_addr: Ipv4Addr,
    pub frontend_port: u16,
    /// The chosen backend.
    pub backend_addr: Ipv4Addr,
    pub backend_port: u16,
    /// Source rewrite toward the backend (masquerade), if any: (SNAT address, port).
    pub snat: Option<(Ipv4Addr, u16)>,
}

/// TCP connection states (Linux `nf_conntrack` names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TcpState {
    /// Created, no packet accounted yet.
    None,
    SynSent,
    SynRecv,
    Established,
    FinWait,
    CloseWait,
    LastAck,
    TimeWait,
    Close,
}

impl TcpState {
    pub const fn as_str(self) -> &'static str {
        match self {
            TcpState::None => "NONE",
            TcpState::SynSent => "SYN_SENT",
            TcpState::SynRecv => "SYN_RECV",
            TcpState::Established => "ESTABLISHED",
            TcpState::FinWait => "FIN_WAIT",
            TcpState::CloseWait => "CLOSE_WAIT",
            TcpState::LastAck => "LAST_ACK",
            TcpState::TimeWait => "TIME_WAIT",
            TcpState::Close => "CLOSE",
        }
    }
}

/// Per-protocol state of an entry. Whether a reply was seen and whether the entry is
/// assured are separate flags of the [`Entry`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum State {
    Tcp(TcpState),
    Udp,
    Icmp,
    Sctp,
    Other,
}

impl State {
    fn initial(protocol: u8) -> State {
        match protocol {
            PROTO_TCP => State::Tcp(TcpState::None),
            PROTO_UDP => State::Udp,
            PROTO_ICMP => State::Icmp,
            PROTO_SCTP => State::Sctp,
            _ => State::Other,
        }
    }

    /// For the admin API: the TCP state name, or `UNREPLIED` / `ASSURED` for the others.
    pub fn describe(self, assured: bool) -> &'static str {
        match self {
            State::Tcp(s) => s.as_str(),
            _ if assured => "ASSURED",
            _ => "UNREPLIED",
        }
    }
}

/// Timeouts in [`Tick`]s (milliseconds). Defaults are Linux `nf_conntrack`'s.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub tcp_syn_sent: Tick,
    pub tcp_syn_recv: Tick,
    pub tcp_established: Tick,
    pub tcp_fin_wait: Tick,
    pub tcp_close_wait: Tick,
    pub tcp_last_ack: Tick,
    pub tcp_time_wait: Tick,
    pub tcp_close: Tick,
    pub udp: Tick,
    pub udp_stream: Tick,
    pub icmp: Tick,
    pub sctp_unreplied: Tick,
    pub sctp_established: Tick,
    pub generic: Tick,
    /// How long a TCP or SCTP flow whose backend left every EndpointSlice stays tracked
    /// (its packets dropped as `backend_gone`), so that it resumes if the endpoint comes
    /// back: an endpoint moved between slices remove-first is absent for a moment. Not a
    /// Linux timeout (nf_conntrack never looks at endpoints).
    pub backend_gone: Tick,
}

impl Default for Timeouts {
    fn default() -> Timeouts {
        Timeouts {
            tcp_syn_sent: 120 * SECOND,
            tcp_syn_recv: 60 * SECOND,
            tcp_established: 432_000 * SECOND,
            tcp_fin_wait: 120 * SECOND,
            tcp_close_wait: 60 * SECOND,
            tcp_last_ack: 30 * SECOND,
            tcp_time_wait: 120 * SECOND,
            tcp_close: 10 * SECOND,
            udp: 30 * SECOND,
            udp_stream: 120 * SECOND,
            icmp: 30 * SECOND,
            sctp_unreplied: 30 * SECOND,
            sctp_established: 210 * SECOND,
            generic: 600 * SECOND,
            backend_gone: 30 * SECOND,
        }
    }
}

impl Timeouts {
    #[inline]
    fn tcp(&self, state: TcpState) -> Tick {
        match state {
            TcpState::None | TcpState::Close => self.tcp_close,
            TcpState::SynSent => self.tcp_syn_sent,
            TcpState::SynRecv => self.tcp_syn_recv,
            TcpState::Established => self.tcp_established,
            TcpState::FinWait => self.tcp_fin_wait,
            TcpState::CloseWait => self.tcp_close_wait,
            TcpState::LastAck => self.tcp_last_ack,
            TcpState::TimeWait => self.tcp_time_wait,
        }
    }

    /// The timeout an entry in `state` gets on a valid packet.
    #[inline(always)]
    pub fn for_state(&self, state: State, seen_reply: bool, assured: bool) -> Tick {
        match state {
            State::Tcp(s) if seen_reply => self.tcp(s),
            State::Tcp(s) => self.tcp(s).min(self.tcp_syn_sent),
            State::Udp if assured => self.udp_stream,
            State::Udp => self.udp,
            State::Icmp => self.icmp,
            State::Sctp if assured => self.sctp_established,
            State::Sctp => self.sctp_unreplied,
            State::Other => self.generic,
        }
    }
}

/// Construction parameters of a [`Conntrack`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConntrackConfig {
    /// Maximum number of connections (entries) this worker tracks.
    pub capacity: usize,
    pub timeouts: Timeouts,
    /// Half-open (unassured TCP and SCTP) entries one source address may hold; 0: no limit
    /// (see [`Conntrack::half_open_of`]).
    pub half_open_per_source: u32,
    /// Let a TCP segment without SYN open a flow to a frontend, as Linux does with
    /// `nf_conntrack_tcp_loose=1` (picking up connections mid-stream). Off by default: such a
    /// segment is dropped (`tcp_no_flow`), never balanced anew. The benchmarks, whose
    /// captures are established flows without handshakes, turn it on.
    pub tcp_loose: bool,
}

impl Default for ConntrackConfig {
    fn default() -> ConntrackConfig {
        ConntrackConfig {
            capacity: 262_144,
            timeouts: Timeouts::default(),
            half_open_per_source: DEFAULT_HALF_OPEN_PER_SOURCE,
            tcp_loose: false,
        }
    }
}

/// Default of [`ConntrackConfig::half_open_per_source`].
pub const DEFAULT_HALF_OPEN_PER_SOURCE: u32 = 1024;

/// The SYN_SENT / SYN_RECV timeout of unassured TCP entries while the table is under
/// pressure ([`Conntrack::under_pressure`]): a half-open connection that has not completed
/// in this long gives its slot and SNAT port back early (a SYN flood's entries then live a
/// few seconds, not one or two minutes).
pub const PRESSURE_SYN_TIMEOUT: Tick = 5 * SECOND;

/// The protocols whose unassured entries are half-open connections (a SYN or an INIT not
/// answered): what `conntrack.half_open_per_source` bounds.
#[inline]
fn opens_with_handshake(protocol: u8) -> bool {
    protocol == PROTO_TCP || protocol == PROTO_SCTP
}

/// Counters of half-open entries per source address, by a hash of the address (a source
/// may share its bucket with a few others; the budget is generous enough for that).
const HALF_OPEN_BUCKETS: usize = 1 << 16;

/// `Entry::backend_counter` when the backend has no counter.
const NO_COUNTER: u32 = u32::MAX;

/// Where an entry's packets count in one snapshot: frontend ids and per-backend counter
/// slots mean something only in the snapshot of `generation`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotBinding {
    pub generation: u64,
    pub frontend_id: u32,
    /// The backend's per-backend packet counter (`Snapshot::backend_counter`), if any.
    pub backend_counter: Option<usize>,
}

impl SnapshotBinding {
    /// A binding without a backend counter.
    pub const fn new(generation: u64, frontend_id: u32) -> SnapshotBinding {
        SnapshotBinding {
            generation,
            frontend_id,
            backend_counter: None,
        }
    }

    fn counter_slot(&self) -> u32 {
        self.backend_counter
            .and_then(|c| u32::try_from(c).ok())
            .unwrap_or(NO_COUNTER)
    }
}

/// A handle to a live entry. Valid until the entry is removed (by [`Conntrack::remove`],
/// expiry, early drop or reclaim); ids are then reused. Handles are meant to live for the
/// processing of one packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EntryId(u32);

impl EntryId {
    #[inline]
    pub const fn index(self) -> usize {
        self.0 as usize
    }
}

/// One tracked connection: both directions' keys, the translation, state and counters.
///
/// Exactly two cache lines, aligned: the first holds what a lookup and the established
/// path read (keys, translation, frontend and counter slot, deadline), the second the
/// snapshot generation and what [`Conntrack::on_packet`] writes. A 1M-flow table then
/// costs two line fills per packet, both prefetched by the burst stage, where the
/// unaligned 136-byte layout before straddled three.
#[derive(Clone, Debug)]
#[repr(C, align(64))]
pub struct Entry {
    original: FlowKey,
    reply: FlowKey,
    nat: Nat,
    frontend_id: u32,
    /// The backend's per-backend packet counter in the snapshot of `generation`
    /// ([`NO_COUNTER`]: none), so that counting a packet is one array index.
    backend_counter: u32,
    expires_at: Tick,
    // ----- second line: the generation, counters and state written per packet
    /// Snapshot generation at which the backend was last validated. The pipeline compares
    /// it with the current snapshot's and re-validates lazily ([`Conntrack::revalidate`]).
    pub generation: u64,
    packets: [u64; 2],
    bytes: [u64; 2],
    /// Free list (free entries) or unassured FIFO (live, unassured entries).
    prev: u32,
    next: u32,
    /// The index hashes (low 32 bits of [`FlowKey::hash`]) of `original` and `reply`, so
    /// that removing the entry and warming an eviction do not hash the keys again.
    key_hashes: [u32; 2],
    state: State,
    seen_reply: bool,
    assured: bool,
    live: bool,
    /// Bit `d`: packets of direction `d` may arrive on an uplink (the edge policy, see
    /// `pipeline::edge`); none until [`Conntrack::admit_from_uplink`].
    uplink_directions: u8,
}

const _: () = assert!(std::mem::size_of::<Entry>() == 128);
const _: () = assert!(std::mem::offset_of!(Entry, generation) == 64);

impl Entry {
    fn vacant(next: u32) -> Entry {
        let zero = FlowKey::new(0, Ipv4Addr::UNSPECIFIED, 0, Ipv4Addr::UNSPECIFIED, 0);
        Entry {
            original: zero,
            reply: zero,
            nat: Nat {
                frontend_addr: Ipv4Addr::UNSPECIFIED,
                frontend_port: 0,
                backend_addr: Ipv4Addr::UNSPECIFIED,
                backend_port: 0,
                snat: None,
            },
            frontend_id: 0,
            generation: 0,
            backend_counter: NO_COUNTER,
            state: State::Other,
            seen_reply: false,
            assured: false,
            live: false,
            uplink_directions: 0,
            expires_at: 0,
            packets: [0; 2],
            bytes: [0; 2],
            prev: NIL,
            next,
            key_hashes: [0; 2],
        }
    }

    pub fn original(&self) -> &FlowKey {
        &self.original
    }
    pub fn reply(&self) -> &FlowKey {
        &self.reply
    }
    pub fn key(&self, dir: Direction) -> &FlowKey {
        match dir {
            Direction::Original => &self.original,
            Direction::Reply => &self.reply,
        }
    }
    pub fn nat(&self) -> &Nat {
        &self.nat
    }
    pub fn frontend_id(&self) -> u32 {
        self.frontend_id
    }
    /// Where the entry's packets count, in the snapshot of `generation`.
    pub fn binding(&self) -> SnapshotBinding {
        SnapshotBinding {
            generation: self.generation,
            frontend_id: self.frontend_id,
            backend_counter: (self.backend_counter != NO_COUNTER)
                .then_some(self.backend_counter as usize),
        }
    }
    /// A TCP connection that ended (TIME_WAIT or CLOSE): a SYN on its tuple opens another.
    /// Whether packets of direction `dir` may arrive on an uplink (edge policy).
    #[inline(always)]
    pub fn arrives_on_uplink(&self, dir: Direction) -> bool {
        self.uplink_directions & (1 << dir as u8) != 0
    }

    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Tcp(TcpState::TimeWait | TcpState::Close))
    }

    pub fn state(&self) -> State {
        self.state
    }
    /// A packet was seen in the reply direction.
    pub fn seen_reply(&self) -> bool {
        self.seen_reply
    }
    /// Not eligible for early drop (TCP established with a reply seen; others replied).
    pub fn assured(&self) -> bool {
        self.assured
    }
    pub fn expires_at(&self) -> Tick {
        self.expires_at
    }
    pub fn packets(&self, dir: Direction) -> u64 {
        self.packets[dir as usize]
    }
    pub fn bytes(&self, dir: Direction) -> u64 {
        self.bytes[dir as usize]
    }
}

/// Why an insert failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InsertError {
    /// The table is at capacity and holds no unassured entry to early-drop.
    #[error("conntrack table full")]
    Full,
    /// A live entry already owns the original or the reply key (or both keys are equal).
    /// For the reply key this is a NAT clash: masquerade with a fresh SNAT port, or drop.
    #[error("conntrack key clash")]
    Clash,
}

/// Per-worker counters; plain integers, copied out by [`Conntrack::stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConntrackStats {
    /// Live entries at the time of the copy.
    pub entries: u64,
    pub inserts: u64,
    /// Explicit removals ([`Conntrack::remove`]).
    pub removals: u64,
    /// Unassured entries dropped to make room for a new one (early drop).
    pub evictions: u64,
    /// Entries removed because their timeout passed (sweep, lookup or reclaim).
    pub expirations: u64,
    /// Inserts refused because the table was full of assured entries.
    pub full: u64,
    /// Inserts refused because a key was taken.
    pub clashes: u64,
    pub lookups: u64,
    pub hits: u64,
    /// TCP packets that did not fit the state machine.
    pub invalid: u64,
}

#[derive(Clone, Copy)]
struct Slot {
    /// Low 32 bits of the key's hash; the home bucket is `hash & mask`.
    hash: u32,
    /// `entry id << 1 | direction`, or `EMPTY`.
    reference: u32,
}

const EMPTY: u32 = u32::MAX;
const EMPTY_SLOT: Slot = Slot {
    hash: 0,
    reference: EMPTY,
};

/// How many slots `insert` sweeps for an expired entry when the table is full and nothing
/// is unassured.
const RECLAIM_BUDGET: usize = 64;

/// The connection table of one worker. See the module documentation.
pub struct Conntrack {
    entries: Vec<Entry>,
    index: Vec<Slot>,
    mask: usize,
    free_head: u32,
    unassured_head: u32,
    unassured_tail: u32,
    len: usize,
    cursor: usize,
    timeouts: Timeouts,
    tcp_loose: bool,
    stats: ConntrackStats,
    /// The key the last `lookup_hashed` missed, while no key has been added since: a new
    /// flow's insert then skips probing for it again.
    absent: Option<FlowKey>,
    /// Unassured entries per source bucket ([`Conntrack::half_open_of`]).
    half_open: Box<[u32]>,
    half_open_per_source: u32,
    /// Until when a SNAT pool reported pressure ([`Conntrack::note_snat_pressure`]).
    snat_pressure_until: Tick,
}

impl fmt::Debug for Conntrack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Conntrack")
            .field("len", &self.len)
            .field("capacity", &self.entries.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// TCP flag classes, in Linux's order of precedence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TcpClass {
    Syn,
    SynAck,
    Fin,
    Ack,
    Rst,
    None,
}

/// Whether a TCP segment with these flags may open a connection (a SYN without ACK or RST,
/// as Linux nf_conntrack with `nf_conntrack_tcp_loose=0` requires): any other segment
/// without a tracked flow is INVALID there, and kube-proxy drops INVALID.
pub fn opens_tcp_connection(flags: u8) -> bool {
    tcp_class(flags) == TcpClass::Syn
}

fn tcp_class(flags: u8) -> TcpClass {
    use tcp_flags::*;
    if flags & RST != 0 {
        TcpClass::Rst
    } else if flags & SYN != 0 {
        if flags & ACK != 0 {
            TcpClass::SynAck
        } else {
            TcpClass::Syn
        }
    } else if flags & FIN != 0 {
        TcpClass::Fin
    } else if flags & ACK != 0 {
        TcpClass::Ack
    } else {
        TcpClass::None
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    Next(TcpState),
    Ignore,
    Invalid,
}

/// Linux's `tcp_conntracks[dir][class][state]` (without SYN_SENT2 / LISTEN).
fn tcp_step(state: TcpState, dir: Direction, flags: u8) -> Step {
    use Step::{Ignore as IG, Invalid as IV, Next};
    use TcpState::*;
    let class = tcp_class(flags);
    match (dir, class) {
        (_, TcpClass::Rst) => match state {
            None => IV,
            _ => Next(Close),
        },
        (_, TcpClass::None) => IV,
        (_, TcpClass::Fin) => match state {
            None | SynSent => IV,
            SynRecv | Established => Next(FinWait),
            FinWait | CloseWait | LastAck => Next(LastAck),
            TimeWait => Next(TimeWait),
            Close => Next(Close),
        },
        (Direction::Original, TcpClass::Syn) => match state {
            None | SynSent | TimeWait | Close => Next(SynSent),
            _ => IG,
        },
        (Direction::Original, TcpClass::SynAck) => match state {
            SynRecv => Next(SynRecv),
            _ => IV,
        },
        (Direction::Original, TcpClass::Ack) => match state {
            None | SynRecv | Established => Next(Established),
            SynSent => IV,
            FinWait | CloseWait => Next(CloseWait),
            LastAck | TimeWait => Next(TimeWait),
            Close => Next(Close),
        },
        (Direction::Reply, TcpClass::Syn) => match state {
            // Simultaneous open (Linux's SYN_SENT2) is folded into SYN_SENT.
            SynSent | TimeWait => Next(SynSent),
            _ => IV,
        },
        (Direction::Reply, TcpClass::SynAck) => match state {
            None => IV,
            SynSent => Next(SynRecv),
            _ => IG,
        },
        (Direction::Reply, TcpClass::Ack) => match state {
            None => IV,
            SynSent => IG,
            SynRecv => Next(SynRecv),
            Established => Next(Established),
            FinWait | CloseWait => Next(CloseWait),
            LastAck | TimeWait => Next(TimeWait),
            Close => Next(Close),
        },
    }
}

impl Conntrack {
    /// Preallocates everything: `capacity` entries and `next_pow2(8 × capacity)` index
    /// slots. Panics if `capacity` is 0 or above 2^28.
    pub fn new(config: ConntrackConfig) -> Conntrack {
        let capacity = config.capacity;
        assert!(
            capacity > 0 && capacity <= 1 << 28,
            "conntrack capacity must be in 1..=2^28"
        );
        let mut entries: Vec<Entry> = Vec::with_capacity(capacity);
        crate::advise_huge_pages(entries.spare_capacity_mut());
        entries.extend((0..capacity).map(|i| {
            let next = if i + 1 == capacity { NIL } else { i as u32 + 1 };
            Entry::vacant(next)
        }));
        let slots = (capacity * 8).next_power_of_two().max(16);
        let mut index = Vec::with_capacity(slots);
        crate::advise_huge_pages(index.spare_capacity_mut());
        index.resize(slots, EMPTY_SLOT);
        Conntrack {
            entries,
            index,
            mask: slots - 1,
            free_head: 0,
            unassured_head: NIL,
            unassured_tail: NIL,
            len: 0,
            cursor: 0,
            timeouts: config.timeouts,
            tcp_loose: config.tcp_loose,
            stats: ConntrackStats::default(),
            absent: None,
            half_open: vec![0; HALF_OPEN_BUCKETS].into_boxed_slice(),
            half_open_per_source: config.half_open_per_source,
            snat_pressure_until: 0,
        }
    }

    pub fn capacity(&self) -> usize {
        self.entries.len()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn timeouts(&self) -> &Timeouts {
        &self.timeouts
    }

    /// [`ConntrackConfig::tcp_loose`].
    pub fn tcp_loose(&self) -> bool {
        self.tcp_loose
    }

    /// New timeouts (a config reload): each entry takes them at its next packet; until
    /// then it keeps the expiry it was given.
    pub fn set_timeouts(&mut self, timeouts: Timeouts) {
        self.timeouts = timeouts;
    }

    /// A copy of the counters, with `entries` filled in.
    pub fn stats(&self) -> ConntrackStats {
        ConntrackStats {
            entries: self.len as u64,
            ..self.stats
        }
    }

    /// The raw index probe: the live entry holding `key`, expired or not.
    #[inline]
    fn find(&self, key: &FlowKey) -> Option<(EntryId, Direction)> {
        self.find_hashed(key, key.hash())
    }

    #[inline(always)]
    fn find_hashed(&self, key: &FlowKey, hash: u64) -> Option<(EntryId, Direction)> {
        debug_assert_eq!(hash, key.hash());
        let hash = hash as u32;
        let mut i = hash as usize & self.mask;
        loop {
            let slot = self.index[i];
            if slot.reference == EMPTY {
                return None;
            }
            if slot.hash == hash {
                let id = slot.reference >> 1;
                let dir = if slot.reference & 1 == 0 {
                    Direction::Original
                } else {
                    Direction::Reply
                };
                if self.entries[id as usize].key(dir) == key {
                    return Some((EntryId(id), dir));
                }
            }
            i = (i + 1) & self.mask;
        }
    }

    /// Burst prefetch, stage 1: the index slot where probing for the key of `hash`
    /// ([`FlowKey::hash`]) starts. Issue it for every frame of a burst, then stage 2, then
    /// process: the misses overlap instead of stalling one packet at a time.
    #[inline]
    pub fn prefetch_slot(&self, hash: u64) {
        let i = hash as u32 as usize & self.mask;
        crate::prefetch_read(&self.index[i]);
    }

    /// Burst prefetch, stage 2: the entries the probe sequence of `hash` points at (by hash
    /// tag only, so that the keys are not compared — which would wait for the entry).
    #[inline]
    pub fn prefetch_entry(&self, hash: u64) {
        let hash = hash as u32;
        let mut i = hash as usize & self.mask;
        // Bounded: a long run is rare at ≤ 25 % load (two keys per entry, eight slots per
        // entry), and this is only a hint.
        for _ in 0..4 {
            let slot = self.index[i];
            if slot.reference == EMPTY {
                return;
            }
            if slot.hash == hash {
                if let Some(e) = self.entries.get((slot.reference >> 1) as usize) {
                    crate::prefetch_read(e);
                }
                return;
            }
            i = (i + 1) & self.mask;
        }
    }

    /// The per-packet lookup. An entry whose deadline has passed is removed (counted as an
    /// expiration) and reported absent.
    #[inline]
    pub fn lookup(&mut self, key: &FlowKey, now: Tick) -> Option<(EntryId, Direction)> {
        self.lookup_hashed(key, key.hash(), now)
    }

    /// [`Conntrack::lookup`] with the key's hash ([`FlowKey::hash`]) already computed: the
    /// pipeline hashes each packet's key once, for this lookup, the insert of a new flow and
    /// the VXLAN entropy port.
    #[inline]
    pub fn lookup_hashed(
        &mut self,
        key: &FlowKey,
        hash: u64,
        now: Tick,
    ) -> Option<(EntryId, Direction)> {
        self.stats.lookups += 1;
        let Some((id, dir)) = self.find_hashed(key, hash) else {
            self.absent = Some(*key);
            return None;
        };
        if self.entries[id.index()].expires_at <= now {
            self.remove_inner(id.0);
            self.stats.expirations += 1;
            self.absent = Some(*key);
            return None;
        }
        self.stats.hits += 1;
        Some((id, dir))
    }

    /// [`Conntrack::lookup_hashed`] without its effects: a live entry's handle, or `None`
    /// for a missing or expired one (left for `lookup_hashed` to remove). Not counted: a
    /// caller that goes on with the hit calls [`Conntrack::count_hit`].
    #[inline(always)]
    pub fn find_live(&self, key: &FlowKey, hash: u64, now: Tick) -> Option<(EntryId, Direction)> {
        match self.find_hashed(key, hash) {
            Some((id, dir)) if self.entries[id.index()].expires_at > now => Some((id, dir)),
            _ => None,
        }
    }

    /// Counts a lookup that hit, as [`Conntrack::lookup_hashed`] does.
    #[inline]
    pub fn count_hit(&mut self) {
        self.stats.lookups += 1;
        self.stats.hits += 1;
    }

    /// Read-only lookup (admin API, trace, SNAT port checks): expired entries are absent.
    /// Not counted.
    pub fn peek(&self, key: &FlowKey, now: Tick) -> Option<(EntryId, Direction)> {
        self.find(key)
            .filter(|(id, _)| self.entries[id.index()].expires_at > now)
    }

    /// The entry behind a handle. Panics (debug) if the handle is stale.
    #[inline]
    pub fn entry(&self, id: EntryId) -> &Entry {
        let e = &self.entries[id.index()];
        debug_assert!(e.live, "stale conntrack handle");
        e
    }

    /// Mutable access (only `generation` is writable; keys and translation are fixed).
    #[inline]
    pub fn entry_mut(&mut self, id: EntryId) -> &mut Entry {
        let e = &mut self.entries[id.index()];
        debug_assert!(e.live, "stale conntrack handle");
        e
    }

    /// Records that the entry's backend is still valid under another snapshot, where its
    /// packets count as `binding` says.
    #[inline]
    pub fn revalidate(&mut self, id: EntryId, binding: SnapshotBinding) {
        let e = &mut self.entries[id.index()];
        debug_assert!(e.live, "stale conntrack handle");
        e.generation = binding.generation;
        e.frontend_id = binding.frontend_id;
        e.backend_counter = binding.counter_slot();
    }

    /// The entry behind a handle if it is live.
    pub fn get(&self, id: EntryId) -> Option<&Entry> {
        self.entries.get(id.index()).filter(|e| e.live)
    }

    /// Lets the directions `original` and `reply` of a new entry arrive on an uplink (see
    /// `pipeline::edge`: the original only when the entry was created from an uplink).
    pub fn admit_from_uplink(&mut self, id: EntryId, original: bool, reply: bool) {
        self.entries[id.index()].uplink_directions = u8::from(original) | u8::from(reply) << 1;
    }

    /// Live entries in slab order (admin API; a full scan — never on the packet path).
    pub fn iter(&self) -> impl Iterator<Item = (EntryId, &Entry)> + '_ {
        self.entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.live)
            .map(|(i, e)| (EntryId(i as u32), e))
    }

    /// Creates an entry for a new connection. `original` is the first packet's key (client
    /// → frontend), `reply` the key the backend's answers will carry. The entry starts
    /// unassured, in the protocol's initial state (TCP: `None`, 10 s); feed it the first
    /// packet with [`Conntrack::on_packet`]. When the table is full the oldest unassured
    /// entry is early-dropped; with none, an expired entry is reclaimed from a short sweep;
    /// otherwise the insert fails with [`InsertError::Full`].
    pub fn insert(
        &mut self,
        original: FlowKey,
        reply: FlowKey,
        nat: Nat,
        binding: SnapshotBinding,
        now: Tick,
    ) -> Result<EntryId, InsertError> {
        let hashes = [original.hash(), reply.hash()];
        self.insert_hashed([original, reply], hashes, nat, binding, now)
    }

    /// [`Conntrack::insert`] of `[original, reply]` with their [`FlowKey::hash`]es, which
    /// the caller has already computed.
    pub fn insert_hashed(
        &mut self,
        [original, reply]: [FlowKey; 2],
        hashes: [u64; 2],
        nat: Nat,
        binding: SnapshotBinding,
        now: Tick,
    ) -> Result<EntryId, InsertError> {
        debug_assert_eq!(hashes, [original.hash(), reply.hash()]);
        if original == reply {
            self.stats.clashes += 1;
            return Err(InsertError::Clash);
        }
        // A new flow's original key was looked up and missed just before: that probe need
        // not run again.
        let original_absent = self.absent == Some(original);
        debug_assert!(!original_absent || self.find_hashed(&original, hashes[0]).is_none());
        let keys = [(&original, hashes[0]), (&reply, hashes[1])];
        for &(key, hash) in &keys[usize::from(original_absent)..] {
            if let Some((id, _)) = self.find_hashed(key, hash) {
                if self.entries[id.index()].expires_at <= now {
                    self.remove_inner(id.0);
                    self.stats.expirations += 1;
                } else {
                    self.stats.clashes += 1;
                    return Err(InsertError::Clash);
                }
            }
        }
        if self.free_head == NIL && !self.make_room(now) {
            self.stats.full += 1;
            return Err(InsertError::Full);
        }
        let id = self.free_head;
        let state = State::initial(original.protocol);
        let expires_at = now.saturating_add(self.timeouts.for_state(state, false, false));
        let e = &mut self.entries[id as usize];
        self.free_head = e.next;
        *e = Entry {
            original,
            reply,
            nat,
            frontend_id: binding.frontend_id,
            generation: binding.generation,
            backend_counter: binding.counter_slot(),
            state,
            seen_reply: false,
            assured: false,
            live: true,
            uplink_directions: 0,
            expires_at,
            packets: [0; 2],
            bytes: [0; 2],
            prev: NIL,
            next: NIL,
            key_hashes: hashes.map(|h| h as u32),
        };
        self.index_insert(hashes[0] as u32, id << 1);
        self.index_insert(hashes[1] as u32, (id << 1) | 1);
        self.push_unassured(id);
        self.len += 1;
        self.stats.inserts += 1;
        if self.free_head == NIL {
            self.prefetch_next_victims();
        }
        Ok(EntryId(id))
    }

    /// A full table evicts along the unassured FIFO, one entry per insert. Warm what the
    /// next evictions touch, each a few inserts ahead so the fetch has time to land: the
    /// index slots of the next two victims and the entry after them (this insert reads the
    /// second victim's keys from a line warmed one insert ago). A flood of new connections
    /// then does not pay three dependent misses per SYN.
    #[inline]
    fn prefetch_next_victims(&self) {
        let head = self.unassured_head;
        if head == NIL {
            return;
        }
        let victim = &self.entries[head as usize];
        self.prefetch_index_of(victim);
        let Some(second) = self.entries.get(victim.next as usize) else {
            return;
        };
        self.prefetch_index_of(second);
        if let Some(third) = self.entries.get(second.next as usize) {
            crate::prefetch_read(third);
        }
    }

    #[inline]
    fn prefetch_index_of(&self, entry: &Entry) {
        for hash in entry.key_hashes {
            crate::prefetch_read(&self.index[hash as usize & self.mask]);
        }
    }

    /// Frees one entry for an insert into a full table.
    fn make_room(&mut self, now: Tick) -> bool {
        let victim = self.unassured_head;
        if victim != NIL {
            if self.entries[victim as usize].expires_at <= now {
                self.stats.expirations += 1;
            } else {
                self.stats.evictions += 1;
            }
            self.remove_inner(victim);
            return true;
        }
        self.expire(now, RECLAIM_BUDGET) > 0
    }

    /// Accounts a packet of `len` bytes in direction `dir` and advances the state machine
    /// (`tcp_flags` is the TCP flags byte for TCP, ignored otherwise). Valid packets refresh
    /// the expiry with the new state's timeout. Returns `false` for TCP packets that are
    /// invalid or ignored in the current state (state and timer unchanged).
    #[inline(always)]
    pub fn on_packet(
        &mut self,
        id: EntryId,
        dir: Direction,
        tcp_flags: Option<u8>,
        len: u32,
        now: Tick,
    ) -> bool {
        let e = &mut self.entries[id.index()];
        debug_assert!(e.live, "stale conntrack handle");
        e.packets[dir as usize] += 1;
        e.bytes[dir as usize] += u64::from(len);
        // Almost every packet changes neither the state nor `seen_reply` nor `assured`, and
        // the state machine would only move the deadline: an ACK (without SYN, FIN or RST)
        // of an established TCP connection, or a datagram of a flow whose reply direction
        // has nothing left to mark. This part is inlined into the packet path, the state
        // machine ([`Conntrack::advance`]) is not.
        let unchanged = match e.state {
            State::Tcp(TcpState::Established) => {
                use tcp_flags::{ACK, FIN, RST, SYN};
                tcp_flags.unwrap_or(0) & (ACK | FIN | RST | SYN) == ACK
                    && (dir == Direction::Original || e.seen_reply)
                    && e.assured == e.seen_reply
            }
            State::Tcp(_) => false,
            // `advance` marks the reply direction seen and assured, nothing else.
            _ => dir == Direction::Original || (e.seen_reply && e.assured),
        };
        if unchanged {
            e.expires_at =
                now.saturating_add(self.timeouts.for_state(e.state, e.seen_reply, e.assured));
            return true;
        }
        self.advance(id, dir, tcp_flags, now)
    }

    /// The state machine part of [`Conntrack::on_packet`] (counters already taken).
    #[inline(never)]
    fn advance(&mut self, id: EntryId, dir: Direction, tcp_flags: Option<u8>, now: Tick) -> bool {
        let timeouts = &self.timeouts;
        let e = &mut self.entries[id.index()];
        let was_assured = e.assured;
        let mut reopened = false;
        match e.state {
            State::Tcp(s) => match tcp_step(s, dir, tcp_flags.unwrap_or(0)) {
                Step::Next(next) => {
                    if dir == Direction::Original
                        && next == TcpState::SynSent
                        && matches!(s, TcpState::TimeWait | TcpState::Close)
                    {
                        // Port reuse: a new connection on the same tuple.
                        reopened = true;
                        e.seen_reply = false;
                        e.assured = false;
                    }
                    e.state = State::Tcp(next);
                    if dir == Direction::Reply {
                        e.seen_reply = true;
                    }
                    if next == TcpState::Established && e.seen_reply {
                        e.assured = true;
                    }
                }
                Step::Ignore => return false,
                Step::Invalid => {
                    self.stats.invalid += 1;
                    return false;
                }
            },
            _ => {
                if dir == Direction::Reply {
                    e.seen_reply = true;
                    e.assured = true;
                }
            }
        }
        e.expires_at = now.saturating_add(timeouts.for_state(e.state, e.seen_reply, e.assured));
        let half_open =
            !e.assured && matches!(e.state, State::Tcp(TcpState::SynSent | TcpState::SynRecv));
        let assured = e.assured;
        if half_open && self.under_pressure(now) {
            let e = &mut self.entries[id.index()];
            e.expires_at = e.expires_at.min(now.saturating_add(PRESSURE_SYN_TIMEOUT));
        }
        if reopened {
            if !was_assured {
                self.unlink_unassured(id.0);
            }
            self.push_unassured(id.0);
        } else if assured && !was_assured {
            self.unlink_unassured(id.0);
        }
        true
    }

    /// Brings the deadline of a live entry forward to `deadline` if it is later (never
    /// postpones it): a flow whose backend is gone lingers no longer than that, however
    /// many of its packets arrive meanwhile (they are dropped, not accounted).
    pub fn expire_by(&mut self, id: EntryId, deadline: Tick) {
        let e = &mut self.entries[id.index()];
        debug_assert!(e.live, "stale conntrack handle");
        e.expires_at = e.expires_at.min(deadline);
    }

    /// Removes a live entry (e.g. its backend is gone). Returns `false` for a stale handle.
    pub fn remove(&mut self, id: EntryId) -> bool {
        if self.get(id).is_none() {
            return false;
        }
        self.remove_inner(id.0);
        self.stats.removals += 1;
        true
    }

    /// Removes a live, unassured entry to give its slot or SNAT port to a new flow (early
    /// drop, counted in `evictions`, or in `expirations` when its time had come). Returns
    /// `false`, removing nothing, for an assured entry or a stale handle: an established
    /// flow is never evicted.
    pub fn evict_unassured(&mut self, id: EntryId, now: Tick) -> bool {
        match self.get(id) {
            Some(e) if !e.assured => {
                if e.expires_at <= now {
                    self.stats.expirations += 1;
                } else {
                    self.stats.evictions += 1;
                }
                self.remove_inner(id.0);
                true
            }
            _ => false,
        }
    }

    /// Whether the table is under pressure: three quarters full, or a SNAT pool reported
    /// pressure less than [`PRESSURE_SYN_TIMEOUT`] ago. Half-open TCP entries then get
    /// [`PRESSURE_SYN_TIMEOUT`] instead of the SYN_SENT / SYN_RECV timeouts.
    #[inline]
    pub fn under_pressure(&self, now: Tick) -> bool {
        self.len * 4 >= self.entries.len() * 3 || now < self.snat_pressure_until
    }

    /// A SNAT pool found few free ports (see [`SnatPorts::allocate_reclaiming`]).
    pub fn note_snat_pressure(&mut self, now: Tick) {
        self.snat_pressure_until = now.saturating_add(PRESSURE_SYN_TIMEOUT);
    }

    /// Half-open entries (unassured TCP and SCTP: a handshake not completed) whose
    /// original source is `src` (or shares its bucket). Unreplied UDP and ICMP do not count:
    /// a client's outstanding DNS queries are no SYN flood.
    #[inline]
    pub fn half_open_of(&self, src: Ipv4Addr) -> u32 {
        self.half_open[half_open_bucket(src)]
    }

    /// Whether `src` may open one more `protocol` flow (`conntrack.half_open_per_source`
    /// bounds the ones that open with a handshake).
    #[inline]
    pub fn half_open_allowed(&self, protocol: u8, src: Ipv4Addr) -> bool {
        self.half_open_per_source == 0
            || !opens_with_handshake(protocol)
            || self.half_open_of(src) < self.half_open_per_source
    }

    /// Incremental expiry: examines at most `budget` slab slots from a sweeping cursor and
    /// removes the entries whose deadline has passed. Returns how many it removed.
    pub fn expire(&mut self, now: Tick, budget: usize) -> usize {
        let n = self.entries.len();
        let mut removed = 0;
        for _ in 0..budget.min(n) {
            let i = self.cursor;
            self.cursor = if i + 1 == n { 0 } else { i + 1 };
            let e = &self.entries[i];
            if e.live && e.expires_at <= now {
                self.remove_inner(i as u32);
                removed += 1;
            }
        }
        self.stats.expirations += removed as u64;
        removed
    }

    fn remove_inner(&mut self, id: u32) {
        let (hashes, assured) = {
            let e = &self.entries[id as usize];
            debug_assert!(e.live);
            debug_assert_eq!(
                e.key_hashes,
                [e.original.hash() as u32, e.reply.hash() as u32]
            );
            (e.key_hashes, e.assured)
        };
        self.index_remove(hashes[0], id << 1);
        self.index_remove(hashes[1], (id << 1) | 1);
        if !assured {
            self.unlink_unassured(id);
        }
        let e = &mut self.entries[id as usize];
        e.live = false;
        e.prev = NIL;
        e.next = self.free_head;
        self.free_head = id;
        self.len -= 1;
    }

    fn push_unassured(&mut self, id: u32) {
        let original = &self.entries[id as usize].original;
        if opens_with_handshake(original.protocol) {
            let bucket = half_open_bucket(original.src);
            self.half_open[bucket] = self.half_open[bucket].saturating_add(1);
        }
        let tail = self.unassured_tail;
        {
            let e = &mut self.entries[id as usize];
            e.prev = tail;
            e.next = NIL;
        }
        if tail == NIL {
            self.unassured_head = id;
        } else {
            self.entries[tail as usize].next = id;
        }
        self.unassured_tail = id;
    }

    fn unlink_unassured(&mut self, id: u32) {
        let (prev, next) = {
            let e = &self.entries[id as usize];
            (e.prev, e.next)
        };
        let original = &self.entries[id as usize].original;
        if opens_with_handshake(original.protocol) {
            let bucket = half_open_bucket(original.src);
            self.half_open[bucket] = self.half_open[bucket].saturating_sub(1);
        }
        if prev == NIL {
            self.unassured_head = next;
        } else {
            self.entries[prev as usize].next = next;
        }
        if next == NIL {
            self.unassured_tail = prev;
        } else {
            self.entries[next as usize].prev = prev;
        }
        let e = &mut self.entries[id as usize];
        e.prev = NIL;
        e.next = NIL;
    }

    fn index_insert(&mut self, hash: u32, reference: u32) {
        self.absent = None;
        let mut i = hash as usize & self.mask;
        while self.index[i].reference != EMPTY {
            i = (i + 1) & self.mask;
        }
        self.index[i] = Slot { hash, reference };
    }

    /// Removes the slot holding `reference` (whose key's index hash is `hash`) and closes
    /// the gap by backward shift.
    fn index_remove(&mut self, hash: u32, reference: u32) {
        let mut i = hash as usize & self.mask;
        while self.index[i].reference != reference {
            debug_assert!(self.index[i].reference != EMPTY, "key missing from index");
            i = (i + 1) & self.mask;
        }
        let mut hole = i;
        let mut j = i;
        loop {
            j = (j + 1) & self.mask;
            let slot = self.index[j];
            if slot.reference == EMPTY {
                break;
            }
            let home = slot.hash as usize & self.mask;
            // Move `j` into the hole unless its home lies cyclically in (hole, j].
            let stays = if hole <= j {
                hole < home && home <= j
            } else {
                hole < home || home <= j
            };
            if !stays {
                self.index[hole] = slot;
                hole = j;
            }
        }
        self.index[hole] = EMPTY_SLOT;
    }
}

#[inline]
fn half_open_bucket(src: Ipv4Addr) -> usize {
    (fmix64(u64::from(u32::from(src)) ^ 0x6861_6c66_6f70_656e) as usize) & (HALF_OPEN_BUCKETS - 1)
}

/// Why a [`SnatPorts`] could not be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SnatConfigError {
    #[error("no SNAT address configured")]
    NoAddress,
    #[error("worker index {0} out of range for {1} workers")]
    BadWorker(usize, usize),
    #[error("the SNAT port range leaves no port to this worker")]
    EmptyPartition,
}

/// SNAT source-port allocation for one worker. The port range is partitioned among workers
/// by `port % workers == worker_index`, so the owner of a reply packet addressed to a SNAT
/// address is a function of its destination port ([`SnatPorts::owner_of`]). A port is in
/// use for (SNAT address, port, backend, backend port, protocol) exactly while the would-be
/// reply key is a live key of this worker's table, so ports free themselves when the entry
/// goes; no bitmap.
#[derive(Clone, Debug)]
pub struct SnatPorts {
    addrs: Box<[Ipv4Addr]>,
    worker_index: usize,
    workers: usize,
    first: u16,
    per_addr: u32,
    max_attempts: u32,
}

impl SnatPorts {
    /// The default masquerade range (Linux's `ip_local_port_range`).
    pub const DEFAULT_RANGE: RangeInclusive<u16> = 32768..=60999;
    /// Default bound on ports tried per allocation.
    pub const DEFAULT_MAX_ATTEMPTS: u32 = 128;

    pub fn new(
        addrs: &[Ipv4Addr],
        range: RangeInclusive<u16>,
        worker_index: usize,
        workers: usize,
    ) -> Result<SnatPorts, SnatConfigError> {
        if addrs.is_empty() {
            return Err(SnatConfigError::NoAddress);
        }
        if workers == 0 || worker_index >= workers {
            return Err(SnatConfigError::BadWorker(worker_index, workers));
        }
        let (lo, hi) = (usize::from(*range.start()), usize::from(*range.end()));
        let first = lo + (worker_index + workers - lo % workers) % workers;
        if lo > hi || first > hi {
            return Err(SnatConfigError::EmptyPartition);
        }
        let per_addr = ((hi - first) / workers + 1) as u32;
        Ok(SnatPorts {
            addrs: addrs.into(),
            worker_index,
            workers,
            first: first as u16,
            per_addr,
            max_attempts: Self::DEFAULT_MAX_ATTEMPTS,
        })
    }

    pub fn with_max_attempts(mut self, max_attempts: u32) -> SnatPorts {
        self.max_attempts = max_attempts.max(1);
        self
    }

    /// The worker that owns a flow whose SNAT port is `port`.
    #[inline]
    pub fn owner_of(port: u16, workers: usize) -> usize {
        usize::from(port) % workers
    }

    pub fn worker_index(&self) -> usize {
        self.worker_index
    }

    /// Ports available to this worker per SNAT address.
    pub fn ports_per_address(&self) -> u32 {
        self.per_addr
    }

    /// The reply key a flow masqueraded to `snat` would have (ICMP: identifier = port).
    #[inline]
    pub fn reply_key(protocol: u8, backend: (Ipv4Addr, u16), snat: (Ipv4Addr, u16)) -> FlowKey {
        let src_port = if protocol == PROTO_ICMP {
            snat.1
        } else {
            backend.1
        };
        FlowKey::new(protocol, backend.0, src_port, snat.0, snat.1)
    }

    /// Picks a free (SNAT address, port) for a new flow to `backend`: probes start at a
    /// position derived from `flow_hash` (e.g. the original key's hash) and are bounded by
    /// `max_attempts`. `None` when every probe was taken (count it as `snat_exhausted`).
    pub fn allocate(
        &self,
        ct: &Conntrack,
        protocol: u8,
        backend: (Ipv4Addr, u16),
        flow_hash: u64,
        now: Tick,
    ) -> Option<(Ipv4Addr, u16)> {
        match self.probe(ct, protocol, backend, flow_hash, now, None) {
            Probe::Free(candidate, _) => Some(candidate),
            Probe::Taken(_) => None,
        }
    }

    /// [`SnatPorts::allocate`] that lets unassured flows give way, as conntrack slots do
    /// (Linux's early drop): when every probed port is taken, the port of the oldest
    /// unassured flow among them (the first to expire) is reclaimed, its entry evicted. An
    /// assured flow keeps its port. A pool found mostly taken ([`PRESSURE_PROBES`] probes or
    /// more before a free port) is reported to `ct` as pressure (shorter half-open
    /// timeouts).
    pub fn allocate_reclaiming(
        &self,
        ct: &mut Conntrack,
        protocol: u8,
        backend: (Ipv4Addr, u16),
        flow_hash: u64,
        now: Tick,
    ) -> Option<(Ipv4Addr, u16)> {
        // Under pressure (a flood's unreplied entries hold most ports) a probe rarely finds
        // a free port: reclaiming the oldest unreplied one among the first few costs a few
        // lookups instead of `max_attempts` cache misses per new flow.
        let victim_after = ct.under_pressure(now).then_some(PRESSURE_VICTIM_PROBES);
        match self.probe(ct, protocol, backend, flow_hash, now, victim_after) {
            Probe::Free(candidate, probes) => {
                if probes >= PRESSURE_PROBES {
                    ct.note_snat_pressure(now);
                }
                Some(candidate)
            }
            Probe::Taken(victim) => {
                ct.note_snat_pressure(now);
                let (candidate, id) = victim?;
                ct.evict_unassured(id, now).then_some(candidate)
            }
        }
    }

    /// The probe of [`SnatPorts::allocate`]; with `victim_after`, it stops after that many
    /// taken ports once one of them can be reclaimed.
    fn probe(
        &self,
        ct: &Conntrack,
        protocol: u8,
        backend: (Ipv4Addr, u16),
        flow_hash: u64,
        now: Tick,
        victim_after: Option<u32>,
    ) -> Probe {
        // The unassured flow holding a probed port that expires first.
        let mut victim: Option<((Ipv4Addr, u16), EntryId, Tick)> = None;
        let total = self.addrs.len() as u64 * u64::from(self.per_addr);
        let attempts = u64::from(self.max_attempts).min(total);
        let start = fmix64(flow_hash) % total;
        for i in 0..attempts {
            // Few candidates: walk them all. Many: pseudo-random probes (no clustering).
            let pos = if total <= u64::from(self.max_attempts) {
                (start + i) % total
            } else {
                fmix64(flow_hash ^ (i << 48) ^ 0x736e_6174) % total
            };
            let addr = self.addrs[(pos / u64::from(self.per_addr)) as usize];
            let port = u32::from(self.first)
                + (pos % u64::from(self.per_addr)) as u32 * self.workers as u32;
            let candidate = (addr, port as u16);
            match ct.peek(&Self::reply_key(protocol, backend, candidate), now) {
                None => return Probe::Free(candidate, i as u32),
                Some((id, _)) => {
                    let e = ct.entry(id);
                    if !e.assured && victim.is_none_or(|(.., at)| e.expires_at < at) {
                        victim = Some((candidate, id, e.expires_at));
                    }
                    if victim.is_some() && victim_after.is_some_and(|n| i + 1 >= u64::from(n)) {
                        break;
                    }
                }
            }
        }
        Probe::Taken(victim.map(|(candidate, id, _)| (candidate, id)))
    }
}

/// What [`SnatPorts::probe`] found.
enum Probe {
    /// A free port, after this many taken ones.
    Free((Ipv4Addr, u16), u32),
    /// Every probed port taken; the unassured flow whose port could be reclaimed.
    Taken(Option<((Ipv4Addr, u16), EntryId)>),
}

/// Taken ports probed before a free one from which a pool counts as under pressure: with
/// random probes, 8 in a row are taken about once in 2^8 allocations at half occupancy,
/// once in 10 at three quarters.
pub const PRESSURE_PROBES: u32 = 8;

/// Under pressure, taken ports probed before the oldest unreplied one among them is
/// reclaimed (see [`SnatPorts::allocate_reclaiming`]).
pub const PRESSURE_VICTIM_PROBES: u32 = 8;

const AFFINITY_WAYS: usize = 4;

#[derive(Clone, Copy, Debug)]
struct AffinitySlot {
    /// [`crate::snapshot::ServicePortName::stable_id`] of the Service port.
    scope: u64,
    client: Ipv4Addr,
    backend: Ipv4Addr,
    port: u16,
    /// 0 = empty (every `now` is ≥ 0, so an empty slot reads as expired).
    expires_at: Tick,
}

const EMPTY_AFFINITY: AffinitySlot = AffinitySlot {
    scope: 0,
    client: Ipv4Addr::UNSPECIFIED,
    backend: Ipv4Addr::UNSPECIFIED,
    port: 0,
    expires_at: 0,
};

/// `sessionAffinity: ClientIP` memory of one worker: (Service port, client IP) → backend,
/// with a per-Service-port timeout refreshed by each new connection. A preallocated 4-way
/// set-associative cache: a key lives in one bucket of 4 slots; when all 4 hold live
/// entries the one closest to expiry is replaced (counted in `evictions`), so under
/// pressure a client may lose its affinity early, never get a wrong one. The caller checks
/// that the remembered backend is still usable.
#[derive(Clone, Debug)]
pub struct Affinity {
    slots: Box<[AffinitySlot]>,
    bucket_mask: usize,
    /// Live entries replaced before their timeout because their bucket was full.
    pub evictions: u64,
}

impl Affinity {
    /// Room for at least `capacity` clients (rounded up to a power of two of 4-slot buckets).
    pub fn new(capacity: usize) -> Affinity {
        let buckets = capacity.div_ceil(AFFINITY_WAYS).max(1).next_power_of_two();
        Affinity {
            slots: vec![EMPTY_AFFINITY; buckets * AFFINITY_WAYS].into_boxed_slice(),
            bucket_mask: buckets - 1,
            evictions: 0,
        }
    }

    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    #[inline]
    fn bucket(&self, scope: u64, client: Ipv4Addr) -> usize {
        let k = scope ^ u64::from(u32::from(client));
        (fmix64(fmix64(k) ^ 0x6166_6669_6e69_7479) as usize & self.bucket_mask) * AFFINITY_WAYS
    }

    /// The backend remembered for this client of this Service port, if not timed out.
    #[inline]
    pub fn get(&self, scope: u64, client: Ipv4Addr, now: Tick) -> Option<(Ipv4Addr, u16)> {
        let b = self.bucket(scope, client);
        self.slots[b..b + AFFINITY_WAYS]
            .iter()
            .find(|s| s.expires_at > now && s.scope == scope && s.client == client)
            .map(|s| (s.backend, s.port))
    }

    /// Remembers (or refreshes) `backend` for this client until `now + timeout`. Call on
    /// each new connection of the client to the Service port.
    pub fn refresh(
        &mut self,
        scope: u64,
        client: Ipv4Addr,
        backend: (Ipv4Addr, u16),
        timeout: Tick,
        now: Tick,
    ) {
        let b = self.bucket(scope, client);
        let ways = &mut self.slots[b..b + AFFINITY_WAYS];
        let pos = ways
            .iter()
            .position(|s| s.expires_at > now && s.scope == scope && s.client == client)
            .or_else(|| ways.iter().position(|s| s.expires_at <= now))
            .unwrap_or_else(|| {
                self.evictions += 1;
                let mut oldest = 0;
                for (i, s) in ways.iter().enumerate() {
                    if s.expires_at < ways[oldest].expires_at {
                        oldest = i;
                    }
                }
                oldest
            });
        ways[pos] = AffinitySlot {
            scope,
            client,
            backend: backend.0,
            port: backend.1,
            expires_at: now.saturating_add(timeout).max(1),
        };
    }

    /// Forgets a client's affinity (e.g. its backend became unusable).
    pub fn remove(&mut self, scope: u64, client: Ipv4Addr) {
        let b = self.bucket(scope, client);
        for s in &mut self.slots[b..b + AFFINITY_WAYS] {
            if s.scope == scope && s.client == client {
                *s = EMPTY_AFFINITY;
            }
        }
    }

    /// Live entries (a full scan; admin API only).
    pub fn len(&self, now: Tick) -> usize {
        self.slots.iter().filter(|s| s.expires_at > now).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;
    use tcp_flags::{ACK, FIN, PSH, RST, SYN};

    const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
    const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);
    const SNAT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);

    fn ct(capacity: usize) -> Conntrack {
        Conntrack::new(ConntrackConfig {
            capacity,
            timeouts: Timeouts::default(),
            ..ConntrackConfig::default()
        })
    }

    fn client(i: u32) -> Ipv4Addr {
        Ipv4Addr::from(0xc0a8_0000 + (i >> 14))
    }

    fn client_port(i: u32) -> u16 {
        1024 + (i & 0x3fff) as u16
    }

    /// Flow `i`: client i → VIP:80 → BACKEND:8080, no SNAT.
    fn flow(protocol: u8, i: u32) -> (FlowKey, FlowKey, Nat) {
        let original = FlowKey::new(protocol, client(i), client_port(i), VIP, 80);
        let reply = FlowKey::new(protocol, BACKEND, 8080, client(i), client_port(i));
        let nat = Nat {
            frontend_addr: VIP,
            frontend_port: 80,
            backend_addr: BACKEND,
            backend_port: 8080,
            snat: None,
        };
        (original, reply, nat)
    }

    fn insert(t: &mut Conntrack, protocol: u8, i: u32, now: Tick) -> Result<EntryId, InsertError> {
        let (o, r, nat) = flow(protocol, i);
        t.insert(o, r, nat, SnapshotBinding::new(1, 7), now)
    }

    /// SYN → SYN/ACK → ACK.
    fn establish(t: &mut Conntrack, id: EntryId, now: Tick) {
        assert!(t.on_packet(id, Direction::Original, Some(SYN), 60, now));
        assert!(t.on_packet(id, Direction::Reply, Some(SYN | ACK), 60, now));
        assert!(t.on_packet(id, Direction::Original, Some(ACK), 52, now));
        assert!(t.entry(id).assured());
    }

    #[test]
    fn insert_and_lookup_both_directions() {
        let mut t = ct(64);
        let original = FlowKey::new(PROTO_TCP, Ipv4Addr::new(192, 168, 1, 10), 40000, VIP, 80);
        let reply = FlowKey::new(PROTO_TCP, BACKEND, 8080, SNAT, 33001);
        let nat = Nat {
            frontend_addr: VIP,
            frontend_port: 80,
            backend_addr: BACKEND,
            backend_port: 8080,
            snat: Some((SNAT, 33001)),
        };
        let id = t
            .insert(original, reply, nat, SnapshotBinding::new(9, 42), 0)
            .unwrap();
        assert_eq!(t.lookup(&original, 1), Some((id, Direction::Original)));
        assert_eq!(t.lookup(&reply, 1), Some((id, Direction::Reply)));
        assert_eq!(t.lookup(&original.reversed(), 1), None);
        assert_eq!(t.lookup(&reply.reversed(), 1), None);
        let e = t.entry(id);
        assert_eq!(*e.nat(), nat);
        assert_eq!((e.frontend_id(), e.generation), (42, 9));
        assert_eq!(e.key(Direction::Reply), &reply);
        assert_eq!(e.state(), State::Tcp(TcpState::None));
        assert_eq!(e.binding().backend_counter, None);
        t.revalidate(
            id,
            SnapshotBinding {
                generation: 10,
                frontend_id: 7,
                backend_counter: Some(3),
            },
        );
        let e = t.entry(id);
        assert_eq!(
            e.binding(),
            SnapshotBinding {
                generation: 10,
                frontend_id: 7,
                backend_counter: Some(3),
            }
        );
        t.revalidate(id, SnapshotBinding::new(11, 8));
        assert_eq!(t.entry(id).binding().backend_counter, None);
        assert_eq!(
            original.to_string(),
            "tcp 192.168.1.10:40000 -> 10.96.0.10:80"
        );

        // Either key taken → clash; nothing changes.
        let other = FlowKey::new(PROTO_TCP, Ipv4Addr::new(192, 168, 1, 11), 40000, VIP, 80);
        assert_eq!(
            t.insert(original, other, nat, SnapshotBinding::new(1, 1), 2),
            Err(InsertError::Clash)
        );
        assert_eq!(
            t.insert(other, reply, nat, SnapshotBinding::new(1, 1), 2),
            Err(InsertError::Clash)
        );
        assert_eq!(
            t.insert(other, other, nat, SnapshotBinding::new(1, 1), 2),
            Err(InsertError::Clash)
        );
        assert_eq!(t.len(), 1);
        assert_eq!(t.stats().clashes, 3);
        assert_eq!(t.iter().count(), 1);

        assert!(t.remove(id));
        assert!(!t.remove(id));
        assert_eq!(t.lookup(&original, 3), None);
        assert_eq!(t.lookup(&reply, 3), None);
        assert!(t.is_empty());
        let s = t.stats();
        assert_eq!(
            (s.inserts, s.removals, s.entries, s.lookups, s.hits),
            (1, 1, 0, 6, 2)
        );
    }

    /// A connection picked up mid-stream (its first packet an ACK) stays unreplied, and
    /// evictable, through any number of client ACKs; the first ACK from the backend makes it
    /// assured. The same counters and deadlines whether `on_packet` takes its shortcut for
    /// established ACKs or the state machine.
    #[test]
    fn mid_stream_pickup_is_assured_by_the_first_reply() {
        let to = Timeouts::default();
        let mut t = ct(16);
        let id = insert(&mut t, PROTO_TCP, 1, 0).unwrap();
        for now in 1..=3 {
            assert!(t.on_packet(id, Direction::Original, Some(ACK | PSH), 100, now));
            let e = t.entry(id);
            assert_eq!(e.state(), State::Tcp(TcpState::Established));
            assert!(!e.assured());
            // Unreplied: the SYN_SENT cap applies.
            assert_eq!(
                e.expires_at(),
                now + to.tcp_established.min(to.tcp_syn_sent)
            );
        }
        assert!(t.on_packet(id, Direction::Reply, Some(ACK), 52, 10));
        assert!(t.entry(id).assured());
        assert_eq!(t.entry(id).expires_at(), 10 + to.tcp_established);
        assert!(t.on_packet(id, Direction::Original, Some(ACK), 52, 20));
        assert!(t.on_packet(id, Direction::Reply, Some(ACK), 52, 30));
        let e = t.entry(id);
        assert_eq!(e.expires_at(), 30 + to.tcp_established);
        assert_eq!(e.packets(Direction::Original), 4);
        assert_eq!(e.packets(Direction::Reply), 2);
        // Assured: a flood of new unreplied flows cannot evict it.
        for i in 2..100 {
            let _ = insert(&mut t, PROTO_TCP, i, 40);
        }
        assert_eq!(
            t.lookup(&flow(PROTO_TCP, 1).0, 41),
            Some((id, Direction::Original))
        );
        // A FIN still goes through the state machine.
        assert!(t.on_packet(id, Direction::Original, Some(FIN | ACK), 52, 50));
        assert_eq!(t.entry(id).state(), State::Tcp(TcpState::FinWait));
    }

    #[test]
    fn tcp_lifecycle_and_timeouts() {
        let to = Timeouts::default();
        let mut t = ct(16);
        let id = insert(&mut t, PROTO_TCP, 1, 0).unwrap();
        assert_eq!(t.entry(id).expires_at(), to.tcp_close);

        let mut now = 1000;
        let step = |t: &mut Conntrack, now: Tick, dir, flags, state, timeout: Tick| {
            assert!(t.on_packet(id, dir, Some(flags), 60, now), "{state:?}");
            assert_eq!(t.entry(id).state(), State::Tcp(state));
            assert_eq!(t.entry(id).expires_at(), now + timeout, "{state:?}");
        };
        step(
            &mut t,
            now,
            Direction::Original,
            SYN,
            TcpState::SynSent,
            to.tcp_syn_sent,
        );
        // A bare ACK from the client before the SYN/ACK is invalid: no state change, no refresh.
        assert!(!t.on_packet(id, Direction::Original, Some(ACK), 52, now + 5));
        assert_eq!(t.entry(id).expires_at(), now + to.tcp_syn_sent);
        assert_eq!(t.stats().invalid, 1);
        // SYN retransmit refreshes.
        now += 3000;
        step(
            &mut t,
            now,
            Direction::Original,
            SYN,
            TcpState::SynSent,
            to.tcp_syn_sent,
        );
        now += 10;
        step(
            &mut t,
            now,
            Direction::Reply,
            SYN | ACK,
            TcpState::SynRecv,
            to.tcp_syn_recv,
        );
        assert!(!t.entry(id).assured());
        now += 10;
        step(
            &mut t,
            now,
            Direction::Original,
            ACK,
            TcpState::Established,
            to.tcp_established,
        );
        assert!(t.entry(id).assured());
        assert_eq!(to.tcp_established, 5 * 24 * 3600 * SECOND);
        now += 10;
        step(
            &mut t,
            now,
            Direction::Reply,
            ACK | tcp_flags::PSH,
            TcpState::Established,
            to.tcp_established,
        );
        // Client closes; server ACKs, then closes; client ACKs.
        now += 10;
        step(
            &mut t,
            now,
            Direction::Original,
            FIN | ACK,
            TcpState::FinWait,
            to.tcp_fin_wait,
        );
        now += 10;
        step(
            &mut t,
            now,
            Direction::Reply,
            ACK,
            TcpState::CloseWait,
            to.tcp_close_wait,
        );
        now += 10;
        step(
            &mut t,
            now,
            Direction::Reply,
            FIN | ACK,
            TcpState::LastAck,
            to.tcp_last_ack,
        );
        now += 10;
        step(
            &mut t,
            now,
            Direction::Original,
            ACK,
            TcpState::TimeWait,
            to.tcp_time_wait,
        );
        // Present until the TIME_WAIT deadline, gone at it.
        let original = *t.entry(id).original();
        assert!(t.lookup(&original, now + to.tcp_time_wait - 1).is_some());
        assert!(t.lookup(&original, now + to.tcp_time_wait).is_none());
        assert_eq!(t.stats().expirations, 1);
        assert_eq!(t.stats().inserts, 1);

        // RST → CLOSE (10 s), from any established state.
        let id2 = insert(&mut t, PROTO_TCP, 2, now).unwrap();
        establish(&mut t, id2, now);
        assert!(t.on_packet(id2, Direction::Reply, Some(RST), 40, now + 1));
        assert_eq!(t.entry(id2).state(), State::Tcp(TcpState::Close));
        assert_eq!(t.entry(id2).expires_at(), now + 1 + to.tcp_close);
        // Port reuse: a SYN in CLOSE reopens as a new, unassured SYN_SENT flow.
        assert!(t.on_packet(id2, Direction::Original, Some(SYN), 60, now + 2));
        assert_eq!(t.entry(id2).state(), State::Tcp(TcpState::SynSent));
        assert!(!t.entry(id2).assured() && !t.entry(id2).seen_reply());
        assert_eq!(t.entry(id2).packets(Direction::Original), 3);
        assert_eq!(t.entry(id2).packets(Direction::Reply), 2);
        assert_eq!(t.entry(id2).bytes(Direction::Reply), 100);

        // Connection refused: RST answering the SYN.
        let id3 = insert(&mut t, PROTO_TCP, 3, now).unwrap();
        assert!(t.on_packet(id3, Direction::Original, Some(SYN), 60, now));
        assert!(t.on_packet(id3, Direction::Reply, Some(RST | ACK), 40, now));
        assert_eq!(t.entry(id3).state(), State::Tcp(TcpState::Close));

        // Mid-stream pickup: ESTABLISHED on an ACK, but capped at SYN_SENT's timeout and
        // unassured until the backend answers.
        let id4 = insert(&mut t, PROTO_TCP, 4, now).unwrap();
        assert!(t.on_packet(id4, Direction::Original, Some(ACK), 1000, now));
        assert_eq!(t.entry(id4).state(), State::Tcp(TcpState::Established));
        assert_eq!(t.entry(id4).expires_at(), now + to.tcp_syn_sent);
        assert!(!t.entry(id4).assured());
        assert!(t.on_packet(id4, Direction::Reply, Some(ACK), 52, now));
        assert!(t.entry(id4).assured());
        assert_eq!(t.entry(id4).expires_at(), now + to.tcp_established);
    }

    #[test]
    fn udp_unreplied_and_assured_timeouts() {
        let mut t = ct(16);
        let a = insert(&mut t, PROTO_UDP, 1, 0).unwrap();
        let b = insert(&mut t, PROTO_UDP, 2, 0).unwrap();
        assert!(t.on_packet(a, Direction::Original, None, 100, 0));
        assert!(t.on_packet(b, Direction::Original, None, 100, 0));
        assert!(t.on_packet(b, Direction::Reply, None, 100, 500));
        assert_eq!(
            t.entry(a).state().describe(t.entry(a).assured()),
            "UNREPLIED"
        );
        assert_eq!(t.entry(b).state().describe(t.entry(b).assured()), "ASSURED");
        let (ka, kb) = (*t.entry(a).original(), *t.entry(b).reply());
        assert!(t.lookup(&ka, 30 * SECOND - 1).is_some());
        assert!(t.lookup(&ka, 30 * SECOND).is_none());
        assert!(t.lookup(&kb, 500 + 120 * SECOND - 1).is_some());
        assert!(t.lookup(&kb, 500 + 120 * SECOND).is_none());

        // ICMP echo: 30 s either way.
        let id = insert(&mut t, PROTO_ICMP, 3, 0).unwrap();
        assert!(t.on_packet(id, Direction::Original, None, 84, 0));
        assert!(t.on_packet(id, Direction::Reply, None, 84, 10));
        assert!(t.entry(id).assured());
        assert_eq!(t.entry(id).expires_at(), 10 + 30 * SECOND);
    }

    #[test]
    fn expiry_is_bounded_and_never_early() {
        const N: u32 = 10_000;
        const BUDGET: usize = 64;
        let mut t = ct(16_384);
        for i in 0..N {
            let now = Tick::from(i); // entry i is created at i ms, expires at i + 30 s
            let id = insert(&mut t, PROTO_UDP, i, now).unwrap();
            assert!(t.on_packet(id, Direction::Original, None, 64, now));
        }
        let sweep = t.capacity().div_ceil(BUDGET);
        // Two full sweeps 1 ms before the first deadline: nothing goes.
        for _ in 0..2 * sweep {
            assert_eq!(t.expire(30 * SECOND - 1, BUDGET), 0);
        }
        assert_eq!(t.len(), N as usize);
        // Half the deadlines passed: exactly those go within one sweep, each call bounded.
        let mid = 30 * SECOND + Tick::from(N / 2) - 1;
        let mut removed = 0;
        for _ in 0..sweep {
            let r = t.expire(mid, BUDGET);
            assert!(r <= BUDGET);
            removed += r;
        }
        assert_eq!(removed, N as usize / 2);
        for i in 0..N {
            let (o, _, _) = flow(PROTO_UDP, i);
            assert_eq!(t.peek(&o, mid).is_some(), i >= N / 2, "flow {i}");
        }
        // All deadlines passed: everything gone after at most one more sweep.
        let mut calls = 0;
        while !t.is_empty() {
            assert!(t.expire(30 * SECOND + Tick::from(N), BUDGET) <= BUDGET);
            calls += 1;
            assert!(calls <= sweep);
        }
        assert_eq!(t.stats().expirations, u64::from(N));
        println!("expired {N} entries with budget {BUDGET}: last half in {calls} calls (sweep = {sweep})");
    }

    #[test]
    fn syn_flood_never_evicts_established_flows() {
        const CAP: usize = 1000;
        const FLOOD: u32 = 5000;
        let mut t = ct(CAP);
        let mut established = Vec::new();
        for i in 0..100 {
            let id = insert(&mut t, PROTO_TCP, i, 0).unwrap();
            establish(&mut t, id, 0);
            established.push(i);
        }
        for j in 0..FLOOD {
            let i = 100_000 + j;
            let id =
                insert(&mut t, PROTO_TCP, i, 1 + Tick::from(j)).expect("early drop makes room");
            assert!(t.on_packet(id, Direction::Original, Some(SYN), 60, 1 + Tick::from(j)));
        }
        assert_eq!(t.len(), CAP);
        let now = 1 + Tick::from(FLOOD);
        for &i in &established {
            let (o, r, _) = flow(PROTO_TCP, i);
            assert_eq!(t.lookup(&o, now).map(|x| x.1), Some(Direction::Original));
            assert_eq!(t.lookup(&r, now).map(|x| x.1), Some(Direction::Reply));
        }
        // The oldest embryonic flows went first: exactly the newest CAP - 100 survive.
        let survivors = (CAP - 100) as u32;
        for j in 0..FLOOD {
            let (o, _, _) = flow(PROTO_TCP, 100_000 + j);
            assert_eq!(t.peek(&o, now).is_some(), j >= FLOOD - survivors, "syn {j}");
        }
        let s = t.stats();
        assert_eq!(s.inserts, 100 + u64::from(FLOOD));
        assert_eq!(s.evictions, u64::from(FLOOD - survivors));
        assert_eq!((s.full, s.expirations, s.entries), (0, 0, CAP as u64));
    }

    #[test]
    fn full_of_established_refuses_then_reclaims_expired() {
        let mut t = ct(100);
        for i in 0..100 {
            let id = insert(&mut t, PROTO_TCP, i, 0).unwrap();
            establish(&mut t, id, 0);
        }
        assert_eq!(insert(&mut t, PROTO_TCP, 500, 1), Err(InsertError::Full));
        assert_eq!(insert(&mut t, PROTO_UDP, 501, 2), Err(InsertError::Full));
        let s = t.stats();
        assert_eq!((s.full, s.evictions, s.entries), (2, 0, 100));
        // After the established timeout, an insert reclaims an expired entry itself.
        let later = Timeouts::default().tcp_established;
        assert!(insert(&mut t, PROTO_TCP, 500, later).is_ok());
        assert_eq!(t.stats().full, 2);
        assert!(t.stats().expirations >= 1);
    }

    #[test]
    fn snat_ports_are_partitioned_and_unique() {
        let mut t = ct(16_384);
        let snat = SnatPorts::new(&[SNAT], SnatPorts::DEFAULT_RANGE, 1, 2).unwrap();
        assert_eq!(snat.ports_per_address(), (60999 - 32769) / 2 + 1);
        let backend = (BACKEND, 8080);
        let mut seen = HashSet::new();
        for i in 0..10_000u32 {
            let (o, _, mut nat) = flow(PROTO_TCP, i);
            let (addr, port) = snat
                .allocate(&t, PROTO_TCP, backend, o.hash(), 0)
                .expect("free port");
            assert_eq!(addr, SNAT);
            assert!(
                port % 2 == 1 && (32768..=60999).contains(&port),
                "port {port}"
            );
            assert_eq!(SnatPorts::owner_of(port, 2), 1);
            assert!(seen.insert(port), "port {port} allocated twice");
            nat.snat = Some((addr, port));
            let reply = SnatPorts::reply_key(PROTO_TCP, backend, (addr, port));
            t.insert(o, reply, nat, SnapshotBinding::new(1, 1), 0)
                .unwrap();
        }
        // Worker 0 of 2 only gets even ports.
        let even = SnatPorts::new(&[SNAT], SnatPorts::DEFAULT_RANGE, 0, 2).unwrap();
        for i in 0..100u32 {
            let (_, p) = even
                .allocate(&t, PROTO_UDP, backend, u64::from(i), 0)
                .unwrap();
            assert_eq!(p % 2, 0);
        }
        assert_eq!(
            SnatPorts::new(&[], SnatPorts::DEFAULT_RANGE, 0, 2).unwrap_err(),
            SnatConfigError::NoAddress
        );
        assert!(SnatPorts::new(&[SNAT], 100..=100, 1, 2).is_err());
        assert!(SnatPorts::new(&[SNAT], 1..=2, 2, 2).is_err());
    }

    #[test]
    fn snat_ports_free_with_their_entry() {
        let mut t = ct(16);
        // Worker 2 of 4 in 1000..=1011 owns 1002, 1006, 1010.
        let snat = SnatPorts::new(&[SNAT], 1000..=1011, 2, 4).unwrap();
        let backend = (BACKEND, 53);
        let mut ids = Vec::new();
        for i in 0..3 {
            let (o, _, mut nat) = flow(PROTO_UDP, i);
            let s = snat.allocate(&t, PROTO_UDP, backend, 99, 0).unwrap();
            nat.snat = Some(s);
            ids.push((
                t.insert(
                    o,
                    SnatPorts::reply_key(PROTO_UDP, backend, s),
                    nat,
                    SnapshotBinding::new(1, 1),
                    0,
                )
                .unwrap(),
                s.1,
            ));
        }
        let mut ports: Vec<u16> = ids.iter().map(|x| x.1).collect();
        ports.sort_unstable();
        assert_eq!(ports, [1002, 1006, 1010]);
        assert_eq!(snat.allocate(&t, PROTO_UDP, backend, 99, 0), None);
        // Another backend (or protocol) does not collide.
        assert!(snat.allocate(&t, PROTO_UDP, (BACKEND, 54), 99, 0).is_some());
        assert!(snat.allocate(&t, PROTO_TCP, backend, 99, 0).is_some());
        assert!(t.remove(ids[1].0));
        assert_eq!(
            snat.allocate(&t, PROTO_UDP, backend, 5, 0),
            Some((SNAT, ids[1].1))
        );
        // ICMP: the allocated identifier is both ports of the reply key.
        let k = SnatPorts::reply_key(PROTO_ICMP, (BACKEND, 7), (SNAT, 1002));
        assert_eq!((k.src_port, k.dst_port), (1002, 1002));
    }

    #[test]
    fn affinity_timeout_and_refresh() {
        let mut a = Affinity::new(1024);
        let c = Ipv4Addr::new(203, 0, 113, 9);
        let b1 = (BACKEND, 8080);
        let timeout = 10_800 * SECOND;
        assert_eq!(a.get(1, c, 0), None);
        a.refresh(1, c, b1, timeout, 0);
        assert_eq!(a.get(1, c, timeout - 1), Some(b1));
        assert_eq!(a.get(1, c, timeout), None);
        assert_eq!(a.get(2, c, 1), None, "per frontend");
        // A new connection at t = 1 h refreshes the deadline.
        a.refresh(1, c, b1, timeout, 3600 * SECOND);
        assert_eq!(a.get(1, c, timeout + 1), Some(b1));
        assert_eq!(a.get(1, c, 3600 * SECOND + timeout), None);
        // Re-pinning to another backend replaces, not duplicates.
        let b2 = (Ipv4Addr::new(10, 244, 2, 7), 8080);
        a.refresh(1, c, b2, timeout, 4000 * SECOND);
        assert_eq!(a.get(1, c, 4000 * SECOND), Some(b2));
        assert_eq!(a.len(4000 * SECOND), 1);
        a.remove(1, c);
        assert_eq!(a.get(1, c, 4000 * SECOND), None);

        // Bounded: one bucket of 4; a fifth client replaces the one closest to expiry.
        let mut small = Affinity::new(4);
        assert_eq!(small.capacity(), 4);
        for i in 0..5u32 {
            small.refresh(1, Ipv4Addr::from(i + 1), b1, timeout, Tick::from(i));
        }
        assert_eq!(small.evictions, 1);
        assert_eq!(small.get(1, Ipv4Addr::from(1), 10), None);
        for i in 1..5u32 {
            assert_eq!(small.get(1, Ipv4Addr::from(i + 1), 10), Some(b1));
        }
    }

    /// Key `n` of a small space, so that clashes and probe collisions are frequent.
    fn small_key(n: u8) -> FlowKey {
        FlowKey::new(
            if n & 1 == 0 { PROTO_TCP } else { PROTO_UDP },
            Ipv4Addr::new(10, 0, 0, n % 5),
            1000 + u16::from(n / 5),
            Ipv4Addr::new(10, 0, 1, n % 3),
            80,
        )
    }

    #[derive(Clone, Debug)]
    enum Op {
        Insert(u8, u8),
        Remove(usize),
        Lookup(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0u8..40, 0u8..40).prop_map(|(a, b)| Op::Insert(a, b)),
            1 => any::<usize>().prop_map(Op::Remove),
            3 => (0u8..40).prop_map(Op::Lookup),
        ]
    }

    proptest! {
        /// `on_packet`'s inlined shortcut leaves an entry exactly as the state machine alone
        /// does, for any protocol and any sequence of directions and TCP flags.
        #[test]
        fn shortcut_agrees_with_the_state_machine(
            protocol in prop::sample::select(vec![PROTO_TCP, PROTO_UDP, PROTO_ICMP, PROTO_SCTP, 47u8]),
            packets in proptest::collection::vec((any::<bool>(), any::<u8>(), 0u32..1500), 1..40),
        ) {
            let (mut with, mut without) = (ct(8), ct(8));
            let a = insert(&mut with, protocol, 1, 0).unwrap();
            let b = insert(&mut without, protocol, 1, 0).unwrap();
            for (now, &(reply, flags, len)) in (1..).zip(&packets) {
                let dir = if reply { Direction::Reply } else { Direction::Original };
                let flags = (protocol == PROTO_TCP).then_some(flags);
                let accepted = with.on_packet(a, dir, flags, len, now);
                let e = &mut without.entries[b.index()];
                e.packets[dir as usize] += 1;
                e.bytes[dir as usize] += u64::from(len);
                prop_assert_eq!(accepted, without.advance(b, dir, flags, now));
                prop_assert_eq!(format!("{:?}", with.entry(a)), format!("{:?}", without.entry(b)));
                prop_assert_eq!(with.stats(), without.stats());
            }
        }

        /// Random insert/remove/lookup sequences agree with a model: a map of keys plus the
        /// FIFO of (all unassured) entries that early drop consumes.
        #[test]
        fn agrees_with_model(ops in proptest::collection::vec(op(), 1..300)) {
            const CAP: usize = 8;
            let mut t = ct(CAP);
            // Insertion order = early-drop order.
            let mut model: Vec<(FlowKey, FlowKey, EntryId)> = Vec::new();
            let mut evictions = 0u64;
            let nat = flow(PROTO_TCP, 0).2;
            for op in ops {
                match op {
                    Op::Insert(a, b) => {
                        let (o, r) = (small_key(a), small_key(b));
                        let taken = o == r
                            || model.iter().any(|(x, y, _)| [x, y].contains(&&o) || [x, y].contains(&&r));
                        let got = t.insert(o, r, nat, SnapshotBinding::new(1, 1), 0);
                        if taken {
                            prop_assert_eq!(got, Err(InsertError::Clash));
                        } else {
                            if model.len() == CAP {
                                model.remove(0);
                                evictions += 1;
                            }
                            model.push((o, r, got.unwrap()));
                        }
                    }
                    Op::Remove(n) => {
                        if !model.is_empty() {
                            let (_, _, id) = model.remove(n % model.len());
                            prop_assert!(t.remove(id));
                        }
                    }
                    Op::Lookup(k) => {
                        let key = small_key(k);
                        let want = model.iter().find_map(|&(o, r, id)| {
                            if o == key {
                                Some((id, Direction::Original))
                            } else if r == key {
                                Some((id, Direction::Reply))
                            } else {
                                None
                            }
                        });
                        prop_assert_eq!(t.lookup(&key, 1), want);
                    }
                }
                prop_assert_eq!(t.len(), model.len());
            }
            for &(o, r, id) in &model {
                prop_assert_eq!(t.peek(&o, 1), Some((id, Direction::Original)));
                prop_assert_eq!(t.peek(&r, 1), Some((id, Direction::Reply)));
            }
            prop_assert_eq!(t.stats().evictions, evictions);
            prop_assert_eq!(t.iter().count(), model.len());
        }
    }
}
