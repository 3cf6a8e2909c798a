//! Per-service and per-backend packet totals for `/metrics`.
//!
//! Workers count into plain arrays indexed by the ids of the snapshot they run (frontend
//! ids, `Snapshot::backend_counter`), which mean nothing in another snapshot. So the control
//! side keeps every snapshot a worker may still report counts of, folds the counts a worker
//! retires when it moves to a new generation into totals keyed by name (service port,
//! frontend, backend address), and adds each worker's live counts at scrape time. A
//! counter therefore survives snapshot changes; it is forgotten only when its frontend or
//! backend leaves the snapshot.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::sync::Arc;

use dataplane::snapshot::{FrontendKind, Protocol, ServicePortName, Snapshot};
use dataplane::stats::RetiredCounters;
use dataplane::worker::WorkerShared;

/// A frontend by what it serves (ids change between snapshots, this does not).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct FrontendName {
    pub service: ServicePortName,
    pub kind: FrontendKind,
    pub addr: Ipv4Addr,
    pub protocol: Protocol,
    pub port: u16,
}

/// A backend of a service port.
pub type BackendName = (ServicePortName, Ipv4Addr, u16);

/// Snapshots kept at most for workers that lag behind (a stuck worker must not keep
/// every snapshot alive); counts retired under a dropped snapshot are lost.
const MAX_KEPT: usize = 64;

/// Totals since start, by name.
#[derive(Default)]
pub struct PacketTotals {
    snapshots: BTreeMap<u64, Arc<Snapshot>>,
    workers: Option<Arc<[WorkerShared]>>,
    frontends: HashMap<FrontendName, u64>,
    backends: HashMap<BackendName, u64>,
}

/// What a scrape reports.
pub struct PacketCounts {
    pub frontends: HashMap<FrontendName, u64>,
    pub backends: HashMap<BackendName, u64>,
}

fn frontend_name(snapshot: &Snapshot, id: usize) -> Option<FrontendName> {
    let f = snapshot.frontends_by_id.get(id)?;
    Some(FrontendName {
        service: f.service.clone(),
        kind: f.kind,
        addr: f.addr,
        protocol: f.protocol,
        port: f.port,
    })
}

/// Adds counts taken under `snapshot` into `frontends` and `backends`.
fn fold(
    snapshot: &Snapshot,
    frontend_packets: &[u64],
    backend_packets: &[u64],
    frontends: &mut HashMap<FrontendName, u64>,
    backends: &mut HashMap<BackendName, u64>,
) {
    for (id, &n) in frontend_packets.iter().enumerate() {
        if n == 0 {
            continue;
        }
        if let Some(name) = frontend_name(snapshot, id) {
            *frontends.entry(name).or_default() += n;
        }
    }
    for (id, f) in snapshot.frontends_by_id.iter().enumerate() {
        let (Some(&base), Some(&end)) = (
            snapshot.backend_counter_base.get(id),
            snapshot.backend_counter_base.get(id + 1),
        ) else {
            continue;
        };
        let Some(counts) = backend_packets.get(base as usize..(end as usize)) else {
            continue;
        };
        for (b, &n) in f.backends.backends.iter().zip(counts) {
            if n != 0 {
                *backends
                    .entry((f.service.clone(), b.addr, b.port))
                    .or_default() += n;
            }
        }
    }
}

impl PacketTotals {
    /// The workers whose counts are collected (none in `check`/tests without a runtime).
    pub fn attach(&mut self, workers: Arc<[WorkerShared]>) {
        self.workers = Some(workers);
    }

    /// Called with each snapshot before it is swapped in.
    pub fn installed(&mut self, snapshot: Arc<Snapshot>) {
        self.snapshots.insert(snapshot.generation, snapshot);
        self.collect();
    }

    /// Folds every worker's retired counts into the totals and drops the snapshots no
    /// worker can report counts of any more.
    pub fn collect(&mut self) {
        let newest = self.snapshots.keys().next_back().copied().unwrap_or(0);
        let Some(workers) = self.workers.clone() else {
            self.snapshots.retain(|&g, _| g == newest);
            return;
        };
        let mut oldest_in_use = newest;
        for worker in workers.iter() {
            // Taken with the worker's generation under one lock: whatever it retires later
            // is of this generation or a newer one.
            let (retired, generation): (Vec<RetiredCounters>, u64) = {
                let mut cell = worker.stats.lock();
                (std::mem::take(&mut cell.retired), cell.generation)
            };
            for r in retired {
                if let Some(snapshot) = self.snapshots.get(&r.generation) {
                    fold(
                        snapshot,
                        &r.frontend_packets,
                        &r.backend_packets,
                        &mut self.frontends,
                        &mut self.backends,
                    );
                }
            }
            oldest_in_use = oldest_in_use.min(generation);
        }
        self.snapshots
            .retain(|&g, _| g >= oldest_in_use || g == newest);
        while self.snapshots.len() > MAX_KEPT {
            self.snapshots.pop_first();
        }
    }

    /// Totals plus every worker's live counts, for the names `current` serves; totals of
    /// names it no longer serves are forgotten.
    pub fn counts(&mut self, current: &Snapshot) -> PacketCounts {
        self.collect();
        let mut frontends = self.frontends.clone();
        let mut backends = self.backends.clone();
        if let Some(workers) = &self.workers {
            for worker in workers.iter() {
                let cell = worker.stats.lock();
                if let Some(snapshot) = self.snapshots.get(&cell.generation) {
                    fold(
                        snapshot,
                        &cell.frontend_packets,
                        &cell.backend_packets,
                        &mut frontends,
                        &mut backends,
                    );
                }
            }
        }
        let served: std::collections::HashSet<FrontendName> = (0..current.frontends_by_id.len())
            .filter_map(|id| frontend_name(current, id))
            .collect();
        let served_backends: std::collections::HashSet<BackendName> = current
            .frontends_by_id
            .iter()
            .flat_map(|f| {
                f.backends
                    .backends
                    .iter()
                    .map(|b| (f.service.clone(), b.addr, b.port))
            })
            .collect();
        self.frontends.retain(|k, _| served.contains(k));
        self.backends.retain(|k, _| served_backends.contains(k));
        frontends.retain(|k, _| served.contains(k));
        backends.retain(|k, _| served_backends.contains(k));
        PacketCounts {
            frontends,
            backends,
        }
    }
}
