//! Compiler scale benchmark: 10,000 Services with 250,000 endpoints compiled from scratch
//! (time, peak memory), then 1,000 single-endpoint changes, each compiled by the real
//! `Publisher` (incremental compiler + one pointer swap) and timed until every dataplane
//! worker reports the new generation (p50/p99). Prints figures; asserts nothing.
//!
//! The workers are the real ones (DPDK EAL, `--no-huge`, no ports, so they only poll the
//! snapshot): a worker loads the snapshot once per loop and, on a new generation, shows it
//! in its published stats cell at once (`WorkerStats::begin_generation`), so "installed in
//! every worker" is the swap plus at most one worker loop (idle sleep 50 µs) and the 100 µs
//! polling here. Needs root (EAL); without EAL it says so and reports the compile + swap
//! time only.
//!
//!   cargo run --release -p control --example compile_scale [SERVICES] [ENDPOINTS_PER_SERVICE] [CHANGES]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use control::app::Publisher;
use control::compiler::{CompileOptions, Compiler};
use control::model::{Model, ObjectKey};
use dataplane::runtime::{Runtime, RuntimeSpec, WorkerSpec};
use dataplane::snapshot::Snapshot;
use dataplane::worker::Mode;
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

fn service(i: usize) -> Service {
    let ip = format!("10.{}.{}.{}", 96 + i / 65536, (i / 256) % 256, i % 256);
    Service {
        metadata: ObjectMeta {
            namespace: Some(format!("ns{}", i % 100)),
            name: Some(format!("svc{i}")),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some(ip.clone()),
            cluster_ips: Some(vec![ip]),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                protocol: Some("TCP".into()),
                port: 80,
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn slice(i: usize, endpoints: usize, not_ready: Option<usize>) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            namespace: Some(format!("ns{}", i % 100)),
            name: Some(format!("svc{i}-a")),
            labels: Some(BTreeMap::from([(
                "kubernetes.io/service-name".to_string(),
                format!("svc{i}"),
            )])),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        endpoints: Some(
            (0..endpoints)
                .map(|e| {
                    let n = i * endpoints + e;
                    Endpoint {
                        addresses: vec![format!(
                            "10.{}.{}.{}",
                            128 + n / 65536,
                            (n / 256) % 256,
                            n % 256
                        )],
                        conditions: Some(EndpointConditions {
                            ready: Some(not_ready != Some(e)),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }
                })
                .collect(),
        ),
        ports: Some(vec![EndpointPort {
            name: Some("http".into()),
            protocol: Some("TCP".into()),
            port: Some(8080),
            ..Default::default()
        }]),
    }
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(str::to_string)
        })
        .and_then(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Two real workers with no ports (they poll only the snapshot), or why not.
fn start_workers() -> Result<(Runtime, RuntimeSpec), String> {
    let spec = RuntimeSpec {
        eal_args: [
            "--lcores=0@0,1@0,2@1",
            "--no-huge",
            "-m",
            "256",
            "--no-pci",
            "--log-level=*:warning",
        ]
        .iter()
        .map(|a| a.to_string())
        .chain([format!("--file-prefix=sg-scale-{}", std::process::id())])
        .collect(),
        mbufs: 1023,
        mbuf_cache: 32,
        ports: Vec::new(),
        workers: vec![WorkerSpec::default(); 2],
        idle_sleep_us: 50,
        overlap_bursts_from: dataplane::worker::OVERLAP_BURSTS_FROM,
        reassembly: None,
    };
    let mut runtime = Runtime::init(&spec)?;
    runtime.launch(&spec, |_| Ok(Mode::Io { peer: Vec::new() }))?;
    Ok((runtime, spec))
}

fn percentile(sorted: &[Duration], p: usize) -> f64 {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)].as_secs_f64() * 1000.0
}

fn main() {
    let mut args = std::env::args().skip(1);
    let services: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let per_service: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(25);
    let changes: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1000);
    let mut model = Model::default();
    for i in 0..services {
        let s = service(i);
        let key = ObjectKey::new(
            s.metadata.namespace.clone().unwrap(),
            s.metadata.name.clone().unwrap(),
        );
        model.services.insert(key, Arc::new(s));
        let e = slice(i, per_service, None);
        let key = ObjectKey::new(
            e.metadata.namespace.clone().unwrap(),
            e.metadata.name.clone().unwrap(),
        );
        model.endpoint_slices.insert(key, Arc::new(e));
    }
    let before = peak_rss_mib();
    let started = Instant::now();
    let compiled = Compiler::new(CompileOptions::default()).compile(&model);
    let from_scratch = started.elapsed();
    println!(
        "from scratch: {} services, {} frontends, {} backends in {:.3} s; peak RSS {:.0} MiB (model alone {:.0} MiB)",
        compiled.stats.services,
        compiled.stats.frontends,
        compiled.stats.backends,
        from_scratch.as_secs_f64(),
        peak_rss_mib(),
        before
    );
    drop(compiled);

    let workers = match start_workers() {
        Ok(w) => Some(w),
        Err(err) => {
            println!("no dataplane workers ({err}); measuring compile + swap only");
            None
        }
    };
    let snapshot = workers
        .as_ref()
        .map(|(runtime, _)| runtime.snapshot.clone())
        .unwrap_or_else(|| Arc::new(ArcSwap::from_pointee(Snapshot::default())));
    let mut publisher = Publisher::with_options(CompileOptions::default(), "files", snapshot);
    // The publisher's first compilation is from scratch too; the changes are incremental.
    let started = Instant::now();
    publisher.publish(&model);
    println!(
        "first publish (from scratch, swapped in): {:.3} s; peak RSS {:.0} MiB",
        started.elapsed().as_secs_f64(),
        peak_rss_mib()
    );

    let mut swapped = Vec::with_capacity(changes);
    let mut installed = Vec::with_capacity(changes);
    for change in 0..changes {
        let i = (change * 7919) % services;
        let e = slice(i, per_service, Some(change % per_service));
        let key = ObjectKey::new(
            e.metadata.namespace.clone().unwrap(),
            e.metadata.name.clone().unwrap(),
        );
        model.endpoint_slices.insert(key, Arc::new(e));
        let started = Instant::now();
        publisher.publish(&model);
        swapped.push(started.elapsed());
        if let Some((runtime, _)) = &workers {
            let generation = publisher.generation();
            while runtime
                .workers
                .iter()
                .any(|w| w.stats.lock().generation < generation)
            {
                std::thread::sleep(Duration::from_micros(100));
            }
            installed.push(started.elapsed());
        }
    }
    swapped.sort();
    installed.sort();
    println!(
        "one endpoint change, compiled and swapped in ({changes} changes): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        percentile(&swapped, 50),
        percentile(&swapped, 99),
        percentile(&swapped, 100)
    );
    if let Some((runtime, spec)) = workers {
        println!(
            "one endpoint change, installed in all {} workers ({changes} changes): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            spec.workers.len(),
            percentile(&installed, 50),
            percentile(&installed, 99),
            percentile(&installed, 100)
        );
        let report = runtime.stop();
        if report.panicked_workers > 0 {
            println!("{} worker(s) panicked", report.panicked_workers);
        }
    }
    println!("peak RSS at the end {:.0} MiB", peak_rss_mib());
}
