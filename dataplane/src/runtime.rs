//! Brings the dataplane up and down in the one order DPDK accepts: EAL → mempool → ports →
//! workers on their lcores; and back: stop flag → wait for every worker → stop and close
//! ports → check every mbuf is home → free the pool → EAL cleanup.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::dpdk::{
    self, Eal, LcoreId, Mempool, Port, PortId, PortSetup, PortStats, QueueId, Reassembly,
};
use crate::snapshot::Snapshot;
use crate::stats::WorkerStats;
use crate::worker::{Mode, Worker, WorkerShared};

/// One port as the runtime brings it up.
#[derive(Clone, Debug)]
pub struct PortSpec {
    /// The name EAL gives the device: a vdev name (`net_tap0`) or a PCI address.
    pub device_name: String,
    /// The name users gave it in the config (`uplink`).
    pub name: String,
    pub setup: PortSetup,
}

/// What one worker polls: (index into `RuntimeSpec::ports`, rx queue) pairs.
#[derive(Clone, Debug, Default)]
pub struct WorkerSpec {
    pub rx: Vec<(usize, u16)>,
}

#[derive(Clone, Debug)]
pub struct RuntimeSpec {
    pub eal_args: Vec<String>,
    pub mbufs: u32,
    pub mbuf_cache: u32,
    pub ports: Vec<PortSpec>,
    pub workers: Vec<WorkerSpec>,
    pub idle_sleep_us: u64,
    /// [`Worker::overlap_bursts_from`].
    pub overlap_bursts_from: usize,
    /// Each worker's IPv4 reassembly (`None`: none).
    pub reassembly: Option<ReassemblySpec>,
}

/// Bounds of one worker's IPv4 reassembly.
#[derive(Clone, Copy, Debug)]
pub struct ReassemblySpec {
    /// Datagrams in progress at once; a fragment of one more is dropped (`fragment`)
    /// unless the oldest has timed out.
    pub max_datagrams: u32,
    /// A datagram not complete this long after its first fragment is given up.
    pub timeout_ms: u64,
}

/// Whole datagrams (up to 64 KiB each) a worker may have in flight at once, between its
/// reassembly and transmission or a hand-off.
const DATAGRAM_MBUFS_PER_WORKER: u32 = 64;
/// What `Runtime::stop` observed.
#[derive(Clone)]
pub struct StopReport {
    /// Mbufs not back in the pool after every port closed (0 on a clean stop).
    pub mbufs_in_use: u32,
    /// Workers whose loop panicked (a bug: the loop never panics by design).
    pub panicked_workers: usize,
    pub workers: Vec<WorkerStats>,
    pub ports: Vec<(String, PortStats)>,
}

/// A running dataplane.
pub struct Runtime {
    // Field order is drop order: ports before the pool before EAL.
    ports: Vec<Port>,
    pool: Arc<Mempool>,
    /// Reassembled datagrams, one contiguous mbuf each.
    datagrams: Option<Arc<Mempool>>,
    lcores: Vec<LcoreId>,
    stop: Arc<AtomicBool>,
    pub snapshot: Arc<ArcSwap<Snapshot>>,
    pub workers: Arc<[WorkerShared]>,
    eal: Eal,
}

impl Runtime {
    /// Initialises EAL, the pool and the ports (read-only until `launch`).
    pub fn init(spec: &RuntimeSpec) -> Result<Runtime, String> {
        let eal = Eal::init(&spec.eal_args).map_err(|e| e.to_string())?;
        let lcores = eal.worker_lcores();
        if lcores.len() < spec.workers.len() {
            return Err(format!(
                "{} workers configured but EAL has {} worker lcores (check cores.workers)",
                spec.workers.len(),
                lcores.len()
            ));
        }
        let pool = Mempool::new(&eal, "sg_mbufs", spec.mbufs, spec.mbuf_cache, 2048)
            .map_err(|e| e.to_string())?;
        let datagrams = match spec.reassembly {
            Some(_) => Some(Arc::new(
                Mempool::new(
                    &eal,
                    "sg_datagrams",
                    DATAGRAM_MBUFS_PER_WORKER * spec.workers.len().max(1) as u32,
                    0,
                    dpdk::REASSEMBLED_MAX as u16,
                )
                .map_err(|e| format!("reassembly pool: {e}"))?,
            )),
            None => None,
        };
        let mut ports = Vec::with_capacity(spec.ports.len());
        for port_spec in &spec.ports {
            let mut port = Port::by_name(&eal, &port_spec.device_name)
                .map_err(|e| format!("port {}: {e}", port_spec.name))?;
            port.name = port_spec.name.clone();
            ports.push(port);
        }
        let workers: Arc<[WorkerShared]> = (0..spec.workers.len())
            .map(|_| WorkerShared::new())
            .collect();
        Ok(Runtime {
            ports,
            pool: Arc::new(pool),
            datagrams,
            lcores: lcores[..spec.workers.len()].to_vec(),
            stop: Arc::new(AtomicBool::new(false)),
            snapshot: Arc::new(ArcSwap::from_pointee(Snapshot::default())),
            workers,
            eal,
        })
    }

    /// DPDK port ids in config order (the pipeline and counters use them).
    pub fn port_ids(&self) -> Vec<u16> {
        self.ports.iter().map(|p| p.id.0).collect()
    }

    pub fn port_macs(&self) -> Vec<[u8; 6]> {
        self.ports.iter().map(|p| p.mac()).collect()
    }

    pub fn ports(&self) -> &[Port] {
        &self.ports
    }

    pub fn pool(&self) -> &Arc<Mempool> {
        &self.pool
    }

    /// Every packet pool by the name the metrics give it: `rx` (frames received and built),
    /// and `datagrams` (reassembled datagrams) when reassembly is on.
    pub fn pools(&self) -> Vec<(&'static str, Arc<Mempool>)> {
        let mut pools = vec![("rx", self.pool.clone())];
        if let Some(datagrams) = &self.datagrams {
            pools.push(("datagrams", datagrams.clone()));
        }
        pools
    }

    /// Starts the ports and launches one worker per `spec.workers` entry with the mode
    /// `mode_for(worker_index)` gives.
    pub fn launch(
        &mut self,
        spec: &RuntimeSpec,
        mut mode_for: impl FnMut(usize) -> Result<Mode, String>,
    ) -> Result<(), String> {
        for (port, port_spec) in self.ports.iter_mut().zip(&spec.ports) {
            port.start(&port_spec.setup, &self.pool)
                .map_err(|e| format!("port {}: {e}", port_spec.name))?;
        }
        let max_port_id = self.ports.iter().map(|p| p.id.0).max().unwrap_or(0);
        let tsc_per_ms = dpdk::tsc_hz() / 1000;
        for (index, worker_spec) in spec.workers.iter().enumerate() {
            let reassembly = match (spec.reassembly, &self.datagrams) {
                (Some(r), Some(datagrams)) => Some(
                    Reassembly::new(
                        r.max_datagrams,
                        r.timeout_ms.saturating_mul(tsc_per_ms),
                        datagrams.clone(),
                    )
                    .map_err(|e| format!("worker {index}: {e}"))?,
                ),
                _ => None,
            };
            let worker = Worker {
                index,
                rx_queues: worker_spec
                    .rx
                    .iter()
                    .map(|&(port, queue)| (self.ports[port].id, QueueId(queue)))
                    .collect(),
                tx_queue: QueueId(index as u16),
                port_count: usize::from(max_port_id) + 1,
                mode: mode_for(index)?,
                snapshot: self.snapshot.clone(),
                stop: self.stop.clone(),
                pool: self.pool.clone(),
                peers: self.workers.clone(),
                idle_sleep_us: spec.idle_sleep_us,
                overlap_bursts_from: spec.overlap_bursts_from,
                reassembly,
            };
            let lcore = self.lcores[index];
            self.eal
                .launch(lcore, Box::new(move || worker.run()))
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Sums the workers' published counters.
    pub fn total_stats(&self) -> WorkerStats {
        let mut total = WorkerStats::default();
        for worker in self.workers.iter() {
            total.merge(&worker.stats.lock());
        }
        total
    }

    pub fn port_stats(&self) -> Vec<(String, PortStats)> {
        self.ports
            .iter()
            .map(|p| (p.name.clone(), p.stats()))
            .collect()
    }

    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Stops workers, then ports, and reports whether every mbuf came home.
    pub fn stop(mut self) -> StopReport {
        self.stop.store(true, Ordering::SeqCst);
        let mut panicked_workers = 0;
        for &lcore in &self.lcores {
            if !self.eal.wait(lcore) {
                panicked_workers += 1;
            }
        }
        // A worker may hand a frame to a peer that already left its loop: free those here.
        for worker in self.workers.iter() {
            let mut orphans = 0;
            while let Some(mbuf) = worker.handoff.pop() {
                drop(mbuf);
                orphans += 1;
            }
            if orphans > 0 {
                worker.stats.lock().drops[crate::stats::DropReason::Shutdown as usize] += orphans;
            }
        }
        let ports = self.port_stats();
        for port in self.ports.iter_mut() {
            port.stop();
        }
        // Closing releases the mbufs still sitting in rx rings.
        self.ports.clear();
        let workers = self
            .workers
            .iter()
            .map(|w| w.stats.lock().clone())
            .collect();
        StopReport {
            mbufs_in_use: self.pool.in_use(),
            panicked_workers,
            workers,
            ports,
        }
    }
}

/// Port ids as `PortId` for the control side's counters.
pub fn port_id(raw: u16) -> PortId {
    PortId(raw)
}

pub use dpdk::version as dpdk_version;
