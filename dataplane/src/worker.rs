//! The polling loop of one worker lcore: receive a burst from each (port, queue) it owns,
//! hand frames of other workers' flows over, run the pipeline, transmit per port at the end
//! of the burst. With a conntrack table larger than the caches, each burst is held back
//! until the next one has been received and its table lines requested. Nothing here locks,
//! allocates or touches a shared atomic per packet: the snapshot is loaded once per burst,
//! the stop flag read once per loop, counters are the worker's own and published every few
//! milliseconds.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::Arc;

use arc_swap::ArcSwap;
use crossbeam_queue::ArrayQueue;

use crate::conntrack::{Direction, FlowKey, Nat, Tick};
use crate::dpdk::{
    self, Mbuf, Mempool, PortId, QueueId, Reassembled, Reassembly, RxBurst, TxBuffer,
};
use crate::frame::Frame;
use crate::pipeline::{BurstHashes, Pipeline, Verdict};
use crate::snapshot::Snapshot;
use crate::stats::{ConntrackCounters, DropReason, StatsCell, WorkerStats, MAX_PORTS};
use crate::wire::ethernet::EthernetFrame;
use crate::wire::MacAddr;

/// Frames a worker holds while their next hop's MAC is being resolved.
const HOLD_CAPACITY: usize = 64;
/// How long a held frame waits for an ARP reply.
const HOLD_TIMEOUT_MS: Tick = 1000;
/// Frames taken from the hand-off inbox per loop, so a flood from another worker cannot
/// starve this worker's own queues.
const HANDOFF_BUDGET: usize = 64;

/// One row of `/v1/conntrack`.
#[derive(Clone, Debug)]
pub struct ConntrackRow {
    pub worker: usize,
    pub original: FlowKey,
    pub reply: FlowKey,
    pub nat: Nat,
    pub frontend_id: u32,
    pub generation: u64,
    pub state: String,
    pub expires_in_ms: u64,
    pub packets_original: u64,
    pub packets_reply: u64,
}

/// What the control side asks a running worker (answered between bursts).
pub enum Request {
    /// Up to `limit` entries, optionally only those of frontend ids in `frontends`.
    DumpConntrack {
        limit: usize,
        frontends: Option<Vec<u32>>,
        reply: SyncSender<Vec<ConntrackRow>>,
    },
    /// The entry a flow (either direction) hits, if any.
    Lookup {
        flow: FlowKey,
        reply: SyncSender<Option<(ConntrackRow, Direction)>>,
    },
}

/// What a worker shares with the control side and the other workers.
pub struct WorkerShared {
    pub stats: StatsCell,
    pub requests: ArrayQueue<Request>,
    /// Frames of flows this worker owns, received by another worker.
    pub handoff: ArrayQueue<Mbuf>,
    /// Neighbors another worker learned.
    pub neighbors: ArrayQueue<(u16, Ipv4Addr, MacAddr)>,
}

impl WorkerShared {
    pub fn new() -> WorkerShared {
        WorkerShared {
            stats: StatsCell::default(),
            requests: ArrayQueue::new(64),
            handoff: ArrayQueue::new(4096),
            neighbors: ArrayQueue::new(1024),
        }
    }
}

impl Default for WorkerShared {
    fn default() -> Self {
        Self::new()
    }
}

/// How a worker treats frames.
pub enum Mode {
    /// The gateway pipeline.
    Gateway(Box<Pipeline>),
    /// Port-to-port forwarding like testpmd's io mode: `peer[in]` is the egress port.
    /// The I/O ceiling the benchmarks compare against.
    Io { peer: Vec<u16> },
}

/// Everything one worker runs with.
pub struct Worker {
    pub index: usize,
    pub rx_queues: Vec<(PortId, QueueId)>,
    /// This worker's tx queue, the same index on every port.
    pub tx_queue: QueueId,
    pub port_count: usize,
    pub mode: Mode,
    pub snapshot: Arc<ArcSwap<Snapshot>>,
    pub stop: Arc<AtomicBool>,
    pub pool: Arc<Mempool>,
    /// Every worker's shared part, indexed by worker.
    pub peers: Arc<[WorkerShared]>,
    /// Sleep this long after a run of empty polls (0: pure busy polling).
    pub idle_sleep_us: u64,
    /// Live conntrack entries from which each burst is held back until the next one has
    /// been received and its index slots requested (0: always).
    pub overlap_bursts_from: usize,
    /// IPv4 reassembly (`None`: fragments the pipeline asks to reassemble are dropped).
    pub reassembly: Option<Reassembly>,
}

/// [`Worker::overlap_bursts_from`] by default: at 2^18 live flows the conntrack entries
/// alone are 32 MB, an L3 cache's size. Below it lookups mostly hit the caches, and holding
/// a burst back would only cost L1 room and latency.
pub const OVERLAP_BURSTS_FROM: usize = 1 << 18;

/// A received burst whose conntrack lines are on their way (software pipelining across
/// bursts, as VPP's and DPVS's loops do): with a table larger than the caches, a burst is
/// processed after the next one has been received and its index slots requested, so that
/// one burst's slots and entries arrive while the other is processed; or at the end of a
/// loop that received nothing.
#[derive(Default)]
struct ReadyBurst {
    frames: RxBurst,
    port: u16,
    hashes: BurstHashes,
}

struct Held {
    mbuf: Mbuf,
    port: u16,
    next_hop: Ipv4Addr,
    deadline: Tick,
}

impl Worker {
    /// Polls until the stop flag is set, then forwards the burst it holds, drops the frames
    /// waiting for a neighbor and publishes its final counters.
    pub fn run(mut self) {
        let hz = dpdk::tsc_hz().max(1);
        // TSC → time without a division per loop: milliseconds by one u64 division of the
        // elapsed ticks, nanoseconds by a 32.32 fixed-point multiply.
        let tsc_per_ms = (hz / 1000).max(1);
        let ns_per_tsc_q32 = ((1_000_000_000u128 << 32) / u128::from(hz)) as u64;
        // A cheap per-loop check of the published snapshot: one relaxed pointer load, where
        // `ArcSwap::load` takes and releases a debt slot.
        let mut snapshots = arc_swap::Cache::new(self.snapshot.clone());
        // Borrowed beside `&mut self` in the loop (cloned once: not a shared atomic per loop).
        let peers = Arc::clone(&self.peers);
        let mut stats = WorkerStats::default();
        let mut tx: Vec<TxBuffer> = (0..self.port_count).map(|_| TxBuffer::default()).collect();
        let mut held: Vec<Held> = Vec::with_capacity(HOLD_CAPACITY);
        let mut burst = RxBurst::default();
        let mut ready = ReadyBurst::default();
        let mut next_publish = 0u64;
        let mut next_housekeeping = 0u64;
        let mut empty_polls = 0u32;
        let start_tsc = dpdk::tsc();
        let mut last_tsc = start_tsc;

        while !self.stop.load(Ordering::Relaxed) {
            let loop_start = dpdk::tsc();
            let now: Tick = (loop_start - start_tsc) / tsc_per_ms;
            let snapshot: &Arc<Snapshot> = snapshots.load();
            if stats.generation != snapshot.generation {
                stats.begin_generation(&self.peers[self.index].stats, snapshot);
            }
            let mut received = 0usize;

            let mut taken = 0;
            let handoff = &peers[self.index].handoff;
            // `pop` on an empty queue issues a full fence; `is_empty` is two plain loads.
            while taken < HANDOFF_BUDGET && !handoff.is_empty() {
                let Some(mut mbuf) = handoff.pop() else {
                    break;
                };
                taken += 1;
                stats.handoffs_in += 1;
                let in_port = mbuf.port();
                let verdict = self.handle(&mut mbuf, in_port, snapshot, now, &mut stats, None);
                self.dispatch(mbuf, verdict, snapshot, now, &mut tx, &mut held, &mut stats);
            }
            received += taken;

            let mut fresh = 0usize;
            for q in 0..self.rx_queues.len() {
                let (port, queue) = self.rx_queues[q];
                let n = dpdk::rx_burst(port, queue, &mut burst);
                fresh += n;
                if n == 0 {
                    continue;
                }
                let mut hashes = BurstHashes::default();
                let mut overlap = false;
                if let Mode::Gateway(pipeline) = &self.mode {
                    if n > 1 {
                        burst.prefetch_data();
                        hashes = pipeline.prefetch_slots(port.0, burst.pending_data());
                        overlap = pipeline.conntrack().len() >= self.overlap_bursts_from;
                    }
                }
                // A burst held back from before goes through the pipeline while this one's
                // index lines arrive; it goes first, so frames of one queue keep their order.
                self.process_burst(&mut ready, snapshot, now, &mut stats, &mut tx, &mut held);
                if let Mode::Gateway(pipeline) = &self.mode {
                    pipeline.prefetch_entries(&hashes);
                }
                std::mem::swap(&mut ready.frames, &mut burst);
                ready.port = port.0;
                ready.hashes = hashes;
                if !overlap {
                    self.process_burst(&mut ready, snapshot, now, &mut stats, &mut tx, &mut held);
                }
            }
            // Nothing new arrived behind a held burst: it waits no longer.
            if fresh == 0 {
                self.process_burst(&mut ready, snapshot, now, &mut stats, &mut tx, &mut held);
            }
            received += fresh;

            for (port, buffer) in tx.iter_mut().enumerate() {
                if !buffer.is_empty() {
                    flush(port as u16, self.tx_queue, buffer, &mut stats);
                }
            }

            let loop_end = dpdk::tsc();
            stats.total_cycles += loop_end - last_tsc;
            last_tsc = loop_end;
            if received > 0 {
                empty_polls = 0;
                stats.bursts += 1;
                let cycles = loop_end - loop_start;
                stats.busy_cycles += cycles;
                let ns = ((u128::from(cycles) * u128::from(ns_per_tsc_q32)) >> 32) as u64;
                let _ = stats.burst_latency_ns.record(ns.max(1));
            } else {
                empty_polls = empty_polls.saturating_add(1);
            }

            if loop_end >= next_housekeeping {
                next_housekeeping = loop_end + hz / 1000;
                self.housekeeping(now, &mut tx, &mut held, &mut stats);
                self.answer_requests(now);
            }
            if loop_end >= next_publish {
                next_publish = loop_end + hz / 100;
                self.publish(&mut stats);
            }
            if self.idle_sleep_us > 0 && empty_polls > 64 {
                std::thread::sleep(std::time::Duration::from_micros(self.idle_sleep_us));
            }
        }

        // Draining: a burst held back for the overlap is forwarded like any other, and
        // what that queues is sent; only frames still waiting for a neighbor are dropped.
        let now: Tick = (dpdk::tsc() - start_tsc) / tsc_per_ms;
        let snapshot: &Arc<Snapshot> = snapshots.load();
        self.process_burst(&mut ready, snapshot, now, &mut stats, &mut tx, &mut held);
        for (port, buffer) in tx.iter_mut().enumerate() {
            flush(port as u16, self.tx_queue, buffer, &mut stats);
        }
        for h in held.drain(..) {
            stats.drop(DropReason::Shutdown);
            drop(h.mbuf);
        }
        self.publish(&mut stats);
    }

    /// Runs every frame of `burst` through [`Worker::handle`] and [`Worker::dispatch`].
    #[inline(always)]
    fn process_burst(
        &mut self,
        burst: &mut ReadyBurst,
        snapshot: &Snapshot,
        now: Tick,
        stats: &mut WorkerStats,
        tx: &mut [TxBuffer],
        held: &mut Vec<Held>,
    ) {
        let in_port = burst.port;
        let p = usize::from(in_port) % MAX_PORTS;
        let mut position = 0;
        while let Some(mut mbuf) = burst.frames.pop() {
            stats.rx_packets[p] += 1;
            stats.rx_bytes[p] += mbuf.len() as u64;
            // `pop` takes the frames in the order `pending_data` showed them.
            let hash = burst.hashes.get(position);
            position += 1;
            let verdict = self.handle(&mut mbuf, in_port, snapshot, now, stats, hash);
            self.dispatch(mbuf, verdict, snapshot, now, tx, held, stats);
        }
    }

    /// Runs the frame through this worker's mode; `hash` is the burst prefetch's for it.
    /// Always inlined, like `dispatch`: as calls, their register saves and restores cost
    /// more instructions per packet than forwarding does in io mode.
    #[inline(always)]
    fn handle(
        &mut self,
        mbuf: &mut Mbuf,
        in_port: u16,
        snapshot: &Snapshot,
        now: Tick,
        stats: &mut WorkerStats,
        hash: Option<u64>,
    ) -> Verdict {
        match &mut self.mode {
            Mode::Io { peer } => Verdict::Transmit {
                port: peer.get(usize::from(in_port)).copied().unwrap_or(in_port),
            },
            // The pipeline decides ownership itself and answers `Handoff` for frames of
            // another worker's flows.
            Mode::Gateway(pipeline) => {
                pipeline.process_hashed(mbuf, in_port, snapshot, now, stats, hash)
            }
        }
    }

    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn dispatch(
        &mut self,
        mbuf: Mbuf,
        verdict: Verdict,
        snapshot: &Snapshot,
        now: Tick,
        tx: &mut [TxBuffer],
        held: &mut Vec<Held>,
        stats: &mut WorkerStats,
    ) {
        match verdict {
            Verdict::Reassemble => self.reassemble(mbuf, snapshot, now, tx, held, stats),
            Verdict::Fragment { ip_mtu } => self.fragment(mbuf, ip_mtu, now, tx, held, stats),
            _ => self.dispatch_whole(mbuf, verdict, now, tx, held, stats),
        }
    }

    /// Adds a fragment to the reassembly; a datagram it completes goes through the
    /// pipeline like a received frame (it is no fragment any more).
    #[inline(never)]
    fn reassemble(
        &mut self,
        mbuf: Mbuf,
        snapshot: &Snapshot,
        now: Tick,
        tx: &mut [TxBuffer],
        held: &mut Vec<Held>,
        stats: &mut WorkerStats,
    ) {
        let Some(reassembly) = self.reassembly.as_mut() else {
            stats.drop(DropReason::Fragment);
            return;
        };
        // The pipeline parsed this header before asking; its own view gives the length.
        let Ok(l2) = EthernetFrame::new_checked(mbuf.data()).map(|e| e.header_len()) else {
            stats.drop(DropReason::Malformed);
            return;
        };
        stats.fragments_in += 1;
        let Reassembled::Complete(mut whole) = reassembly.add(mbuf, l2, dpdk::tsc()) else {
            return;
        };
        stats.reassembled += 1;
        let in_port = whole.port();
        let verdict = self.handle(&mut whole, in_port, snapshot, now, stats, None);
        match verdict {
            Verdict::Fragment { ip_mtu } => self.fragment(whole, ip_mtu, now, tx, held, stats),
            // A whole datagram is no fragment: the pipeline cannot ask again.
            Verdict::Reassemble => stats.drop(DropReason::Malformed),
            _ => self.dispatch_whole(whole, verdict, now, tx, held, stats),
        }
    }

    /// Cuts a packet larger than its egress MTU into fragments (DPDK's `rte_ip_frag`) and
    /// sends each the way the pipeline sends the packet.
    #[inline(never)]
    fn fragment(
        &mut self,
        packet: Mbuf,
        ip_mtu: u16,
        now: Tick,
        tx: &mut [TxBuffer],
        held: &mut Vec<Held>,
        stats: &mut WorkerStats,
    ) {
        let mut fragments = match dpdk::fragment_ipv4(&packet, ip_mtu, &self.pool) {
            Ok(fragments) => fragments,
            Err(_) => {
                stats.drop(DropReason::NoMbuf);
                return;
            }
        };
        drop(packet);
        stats.fragments_out += fragments.len() as u64;
        while let Some(mut fragment) = fragments.pop() {
            let verdict = match &mut self.mode {
                Mode::Gateway(pipeline) => pipeline.egress_fragment(&mut fragment, now),
                Mode::Io { .. } => Verdict::Drop(DropReason::Malformed),
            };
            self.dispatch_whole(fragment, verdict, now, tx, held, stats);
        }
    }

    /// The verdicts about one frame as it leaves: send, hold, hand over or drop.
    #[inline(always)]
    fn dispatch_whole(
        &self,
        mbuf: Mbuf,
        verdict: Verdict,
        now: Tick,
        tx: &mut [TxBuffer],
        held: &mut Vec<Held>,
        stats: &mut WorkerStats,
    ) {
        match verdict {
            Verdict::Transmit { port } => queue_tx(mbuf, port, self.tx_queue, tx, stats),
            Verdict::ToException { port } => {
                stats.to_exception += 1;
                queue_tx(mbuf, port, self.tx_queue, tx, stats);
            }
            Verdict::Drop(_) => drop(mbuf),
            Verdict::HoldForNeighbor { port, next_hop } => {
                if held.len() < HOLD_CAPACITY {
                    held.push(Held {
                        mbuf,
                        port,
                        next_hop,
                        deadline: now + HOLD_TIMEOUT_MS,
                    });
                } else {
                    stats.drop(DropReason::NoNeighbor);
                }
            }
            Verdict::Handoff { worker } => {
                if let Err(mbuf) = self.peers[usize::from(worker)].handoff.push(mbuf) {
                    stats.drop(DropReason::HandoffFull);
                    drop(mbuf);
                } else {
                    stats.handoffs_out += 1;
                }
            }
            // Handled by `dispatch`; a fragment of a fragment is not made.
            Verdict::Reassemble | Verdict::Fragment { .. } => {
                stats.drop(DropReason::Malformed);
                drop(mbuf);
            }
        }
    }

    fn housekeeping(
        &mut self,
        now: Tick,
        tx: &mut [TxBuffer],
        held: &mut Vec<Held>,
        stats: &mut WorkerStats,
    ) {
        if let Some(reassembly) = self.reassembly.as_mut() {
            reassembly.expire(dpdk::tsc());
            stats.drops[DropReason::Fragment as usize] += reassembly.take_freed();
        }
        let Mode::Gateway(pipeline) = &mut self.mode else {
            return;
        };
        while let Some((port, addr, mac)) = self.peers[self.index].neighbors.pop() {
            pipeline.learn_neighbor(port, addr, mac, now);
        }
        for (port, addr, mac) in pipeline.take_learned() {
            for (i, peer) in self.peers.iter().enumerate() {
                if i != self.index {
                    let _ = peer.neighbors.push((port, addr, mac));
                }
            }
        }
        let pool = &self.pool;
        let tx_queue = self.tx_queue;
        pipeline.housekeeping(
            now,
            &mut |port, bytes| match Mbuf::from_bytes(pool, bytes) {
                Some(mbuf) => queue_tx(mbuf, port, tx_queue, tx, stats),
                None => stats.drop(DropReason::NoMbuf),
            },
        );
        let mut i = 0;
        while i < held.len() {
            let h = &held[i];
            if let Some(mac) = pipeline.neighbor(h.port, h.next_hop) {
                let mut h = held.swap_remove(i);
                if h.mbuf.len() >= 6 {
                    h.mbuf.data_mut()[..6].copy_from_slice(mac.as_bytes());
                }
                queue_tx(h.mbuf, h.port, self.tx_queue, tx, stats);
            } else if h.deadline <= now {
                let h = held.swap_remove(i);
                stats.drop(DropReason::NoNeighbor);
                drop(h.mbuf);
            } else {
                i += 1;
            }
        }
        let ct = pipeline.conntrack().stats();
        stats.conntrack = ConntrackCounters {
            entries: ct.entries,
            inserts: ct.inserts,
            evictions: ct.evictions,
            expirations: ct.expirations,
            full: ct.full,
        };
    }

    fn answer_requests(&mut self, now: Tick) {
        let Mode::Gateway(pipeline) = &self.mode else {
            while let Some(request) = self.peers[self.index].requests.pop() {
                match request {
                    Request::DumpConntrack { reply, .. } => {
                        let _ = reply.try_send(Vec::new());
                    }
                    Request::Lookup { reply, .. } => {
                        let _ = reply.try_send(None);
                    }
                }
            }
            return;
        };
        let conntrack = pipeline.conntrack();
        let row = |entry: &crate::conntrack::Entry| ConntrackRow {
            worker: self.index,
            original: *entry.original(),
            reply: *entry.reply(),
            nat: *entry.nat(),
            frontend_id: entry.frontend_id(),
            generation: entry.generation,
            state: entry.state().describe(entry.assured()).to_string(),
            expires_in_ms: entry.expires_at().saturating_sub(now),
            packets_original: entry.packets(Direction::Original),
            packets_reply: entry.packets(Direction::Reply),
        };
        while let Some(request) = self.peers[self.index].requests.pop() {
            match request {
                Request::DumpConntrack {
                    limit,
                    frontends,
                    reply,
                } => {
                    let rows: Vec<ConntrackRow> = conntrack
                        .iter()
                        .filter(|(_, e)| e.expires_at() > now)
                        .filter(|(_, e)| {
                            frontends
                                .as_ref()
                                .is_none_or(|ids| ids.contains(&e.frontend_id()))
                        })
                        .take(limit)
                        .map(|(_, e)| row(e))
                        .collect();
                    let _ = reply.try_send(rows);
                }
                Request::Lookup { flow, reply } => {
                    let found = conntrack
                        .peek(&flow, now)
                        .map(|(id, dir)| (row(conntrack.entry(id)), dir));
                    let _ = reply.try_send(found);
                }
            }
        }
    }

    fn publish(&self, stats: &mut WorkerStats) {
        let mut shared = self.peers[self.index].stats.lock();
        shared.publish_from(stats);
    }
}

#[inline]
fn queue_tx(mbuf: Mbuf, port: u16, queue: QueueId, tx: &mut [TxBuffer], stats: &mut WorkerStats) {
    let Some(buffer) = tx.get_mut(usize::from(port)) else {
        stats.drop(DropReason::NoRoute);
        return;
    };
    if buffer.is_full() {
        flush(port, queue, buffer, stats);
    }
    stats.tx_bytes[usize::from(port) % MAX_PORTS] += mbuf.len() as u64;
    if let Err(mbuf) = buffer.push(mbuf) {
        stats.drop(DropReason::TxFull);
        drop(mbuf);
    }
}

#[inline]
fn flush(port: u16, queue: QueueId, buffer: &mut TxBuffer, stats: &mut WorkerStats) {
    // Packets count what the NIC accepted; bytes were counted when queued.
    let (sent, refused) = dpdk::tx_flush(PortId(port), queue, buffer);
    stats.tx_packets[usize::from(port) % MAX_PORTS] += sent as u64;
    stats.drops[DropReason::TxFull as usize] += refused as u64;
}
