//! Compiler scale benchmark: 10,000 Services with 250,000 endpoints compiled from scratch
//! (time, peak memory), then 1,000 single-endpoint changes each compiled and published with
//! one pointer swap (p50/p99 latency). Prints figures; asserts nothing.
//!
//!   cargo run --release -p control --example compile_scale [SERVICES] [ENDPOINTS_PER_SERVICE]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use control::compiler::{CompileOptions, Compiler};
use control::model::{Model, ObjectKey};
use dataplane::snapshot::Snapshot;
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

fn main() {
    let mut args = std::env::args().skip(1);
    let services: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let per_service: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(25);
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
    let mut compiler = Compiler::new(CompileOptions::default());
    let started = Instant::now();
    let compiled = compiler.compile(&model);
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
    let published = ArcSwap::from_pointee(compiled.snapshot);

    let mut latencies = Vec::with_capacity(1000);
    for change in 0..1000 {
        let i = (change * 7919) % services;
        let e = slice(i, per_service, Some(change % per_service));
        let key = ObjectKey::new(
            e.metadata.namespace.clone().unwrap(),
            e.metadata.name.clone().unwrap(),
        );
        model.endpoint_slices.insert(key, Arc::new(e));
        let started = Instant::now();
        let mut compiled = compiler.compile(&model);
        compiled.snapshot.generation = change as u64 + 2;
        let old: Arc<Snapshot> = published.swap(Arc::new(compiled.snapshot));
        latencies.push(started.elapsed());
        drop(old);
    }
    latencies.sort();
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
    println!(
        "one endpoint change, compiled and swapped in (1,000 changes): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        ms(latencies[latencies.len() / 2]),
        ms(latencies[latencies.len() * 99 / 100]),
        ms(latencies[latencies.len() - 1])
    );
}
