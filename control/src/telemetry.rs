//! servicegate's own DPDK telemetry commands, answered beside ethdev's on the telemetry
//! socket (`dpdk-telemetry.py -f FILE_PREFIX`):
//!
//! - `/servicegate/services[,OFFSET]`: the installed snapshot's frontends, 250 a page
//!   (DPDK caps a dict at 256 entries), each with its backends and packets;
//! - `/servicegate/workers`: per worker: snapshot generation, packets, drops, bursts,
//!   busy share, conntrack entries, hand-offs;
//! - `/servicegate/conntrack/summary`: entries against capacity, summed and per worker.
//!
//! Answers are built on DPDK's telemetry thread from what the admin API reads: each
//! worker's published counters (one short lock per worker per request, as a scrape) and
//! the current snapshot. The packet path pays nothing.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use dataplane::dpdk::{register_telemetry, TelemetryDict, TelemetryValue};
use dataplane::stats::WorkerStats;

use crate::admin::{frontend_label, service_label, AdminState};

/// Frontends per `/servicegate/services` answer: 256 dict entries less the header's.
pub const SERVICES_PAGE: usize = 250;

fn u64v(name: &str, v: u64) -> (String, TelemetryValue) {
    (name.to_string(), TelemetryValue::U64(v))
}

fn strv(name: &str, v: impl Into<String>) -> (String, TelemetryValue) {
    (name.to_string(), TelemetryValue::Str(v.into()))
}

fn worker_stats(state: &AdminState) -> Vec<WorkerStats> {
    state
        .workers
        .iter()
        .map(|w| w.stats.lock().clone())
        .collect()
}

/// `/servicegate/services[,OFFSET]`.
pub fn services(state: &AdminState, params: &str) -> TelemetryDict {
    let offset: usize = params.trim().parse().unwrap_or(0);
    let snapshot = state.snapshot.load();
    let counts = state.packets.lock().counts(&snapshot);
    let frontends = snapshot.all_frontends();
    let page: Vec<_> = frontends.iter().skip(offset).take(SERVICES_PAGE).collect();
    let mut dict = vec![
        u64v("generation", snapshot.generation),
        u64v("frontends", frontends.len() as u64),
        u64v("offset", offset as u64),
        u64v("shown", page.len() as u64),
        u64v("ready", u64::from(state.ready.load(Ordering::Acquire))),
    ];
    for (i, f) in page.into_iter().enumerate() {
        let name = crate::packets::FrontendName {
            service: f.service.clone(),
            kind: f.kind,
            addr: f.addr,
            protocol: f.protocol,
            port: f.port,
        };
        dict.push((
            (offset + i).to_string(),
            TelemetryValue::Dict(vec![
                strv("service", service_label(f)),
                strv("port", f.service.port_name.to_string()),
                strv("protocol", f.protocol.as_str()),
                strv("kind", f.kind.as_str()),
                strv("frontend", frontend_label(f)),
                u64v("backends", f.backends.backends.len() as u64),
                u64v("usable", f.backends.usable.len() as u64),
                u64v("packets", counts.frontends.get(&name).copied().unwrap_or(0)),
            ]),
        ));
    }
    dict
}

/// `/servicegate/workers`.
pub fn workers(state: &AdminState) -> TelemetryDict {
    let generation = state.snapshot.load().generation;
    let mut dict = vec![
        u64v("workers", state.workers.len() as u64),
        u64v("snapshot_generation", generation),
    ];
    for (w, s) in worker_stats(state).iter().enumerate() {
        let busy_permille = (s.busy_cycles as u128 * 1000)
            .checked_div(u128::from(s.total_cycles))
            .unwrap_or(0) as u64;
        dict.push((
            w.to_string(),
            TelemetryValue::Dict(vec![
                u64v("generation", s.generation),
                u64v("rx_packets", s.rx_packets.iter().sum()),
                u64v("tx_packets", s.tx_packets.iter().sum()),
                u64v("drops", s.total_drops()),
                u64v("bursts", s.bursts),
                u64v("busy_permille", busy_permille),
                u64v("fast_path_packets", s.fast_path),
                u64v("conntrack_entries", s.conntrack.entries),
                u64v("handoffs_in", s.handoffs_in),
                u64v("handoffs_out", s.handoffs_out),
            ]),
        ));
    }
    dict
}

/// `/servicegate/conntrack/summary`.
pub fn conntrack_summary(state: &AdminState) -> TelemetryDict {
    let per_worker = worker_stats(state);
    let sum = |f: fn(&WorkerStats) -> u64| per_worker.iter().map(f).sum::<u64>();
    let entries = sum(|s| s.conntrack.entries);
    let capacity = state.conntrack_capacity * per_worker.len() as u64;
    vec![
        u64v("workers", per_worker.len() as u64),
        u64v("capacity_per_worker", state.conntrack_capacity),
        u64v("capacity", capacity),
        u64v("entries", entries),
        u64v(
            "occupancy_permille",
            (entries * 1000).checked_div(capacity).unwrap_or(0),
        ),
        u64v("inserts", sum(|s| s.conntrack.inserts)),
        u64v("evictions", sum(|s| s.conntrack.evictions)),
        u64v("expirations", sum(|s| s.conntrack.expirations)),
        u64v("full", sum(|s| s.conntrack.full)),
        (
            "entries_per_worker".to_string(),
            TelemetryValue::U64Array(per_worker.iter().map(|s| s.conntrack.entries).collect()),
        ),
    ]
}

/// Registers the three commands; their answers read `state`.
pub fn register(state: Arc<AdminState>) -> anyhow::Result<()> {
    let s = Arc::clone(&state);
    register_telemetry(
        "/servicegate/services",
        "Served frontends with backends and packets. Parameters: offset (250 a page)",
        Box::new(move |params| services(&s, params)),
    )?;
    let s = Arc::clone(&state);
    register_telemetry(
        "/servicegate/workers",
        "Per worker: snapshot generation, packets, drops, bursts, busy share, conntrack entries. Takes no parameters",
        Box::new(move |_| workers(&s)),
    )?;
    register_telemetry(
        "/servicegate/conntrack/summary",
        "Conntrack entries against capacity, summed and per worker. Takes no parameters",
        Box::new(move |_| conntrack_summary(&state)),
    )?;
    Ok(())
}
