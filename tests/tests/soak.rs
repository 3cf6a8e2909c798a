//! Soak (issue 23 item 5, `make soak`): the lab (tests/lab/topology.sh, files source) under
//! constant churn for `SOAK_MINUTES` minutes (default 2, what `make test` runs):
//!
//! * 10 EndpointSlice updates a second: the `web` and `web-nodeport` slices (one file,
//!   rewritten and renamed into place) cycle through endpoint sets that always keep real,
//!   serving pods: all three ready; one of them serving but terminating (no new connection
//!   goes to it, its connections go on); a fourth endpoint that is neither ready nor serving.
//!   No request may fail because of them.
//! * 200 new connections a second (four paced clients of 50/s: two from a pod to the `web`
//!   ClusterIP over VXLAN, two from outside to the `web-nodeport` NodePort, masqueraded), one
//!   HTTP request each, a 10 s timeout (a failure is a real failure, not a slow machine).
//! * 16 keep-alive connections (8 from the pod, 8 from outside) for the whole run, a request
//!   on each every 250 ms, never reopened and never moved to another pod.
//!
//! It asserts no failed request; a flat RSS of the servicegate process (the sample at the end
//! of the load within 5 % of an early one taken after a warm-up); conntrack entries that
//! track the live flows (every sample: the keep-alive connections plus the connections
//! opened within the last close timeout are there, nothing older than that plus a margin
//! is); after the load, the entries back to the keep-alive connections, then (those closed)
//! to the baseline; the mbufs in use (`servicegate_mempool_mbufs_in_use`) back to the
//! baseline.
//! The closing TCP states' conntrack timeouts are 5 s here (Linux's TIME_WAIT is 120 s), so
//! the table reaches its steady state within the warm-up and drains within seconds.
//! Figures are printed on lines starting `soak figure:`.

use std::path::{Path, PathBuf};

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tests::harness::{http_get, Background};
use tests::lab::{lab_manifests_without, Lab};

/// The conntrack timeout of the closing TCP states in the soak's config, seconds.
const CLOSE_TIMEOUT: u64 = 5;
/// New connections per second, summed over the paced clients.
const NEW_CONNECTIONS_PER_SECOND: f64 = 200.0;
/// (namespace, URL, source address) of each paced client; the rate is shared equally.
const PACED: [(&str, &str, &str); 4] = [
    ("cpod", "http://10.96.0.10/", "10.244.1.10"),
    ("cpod", "http://10.96.0.10/", "10.244.1.10"),
    ("client", "http://192.168.100.1:30080/", "192.168.100.2"),
    ("client", "http://192.168.100.1:30080/", "192.168.100.2"),
];
/// (namespace, URL, source address) of each keep-alive client.
const KEEPALIVE: [(&str, &str, &str); 2] = [
    ("cpod", "http://10.96.0.10/", "10.244.1.10"),
    ("client", "http://192.168.100.1:30080/", "192.168.100.2"),
];
const KEEPALIVE_CONNECTIONS: usize = 8;
const KEEPALIVE_INTERVAL: f64 = 0.25;
const SLICE_UPDATES_PER_SECOND: u64 = 10;

const PODS: [(&str, &str); 3] = [
    ("10.244.1.2", "node-1"),
    ("10.244.1.3", "node-1"),
    ("10.244.2.2", "node-2"),
];

/// The churned slices in state `step`: each endpoint set keeps serving pods.
fn churn_slices(step: u64) -> String {
    let slice = |name: &str, service: &str, state: u64| {
        let mut text = format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  namespace: lab\n  labels:\n    kubernetes.io/service-name: {service}\n  annotations:\n    test/write: \"{step}\"\naddressType: IPv4\nports:\n  - name: http\n    protocol: TCP\n    port: 9376\nendpoints:\n"
        );
        for (i, (addr, node)) in PODS.iter().enumerate() {
            // State 1: pod3 terminating; state 3: pod1 terminating (serving: their
            // connections go on, new ones go to the others).
            let terminating = (state == 1 && i == 2) || (state == 3 && i == 0);
            text.push_str(&format!(
                "  - addresses: [\"{addr}\"]\n    nodeName: {node}\n    conditions: {{ready: {}, serving: true, terminating: {terminating}}}\n",
                !terminating
            ));
        }
        if state == 2 {
            // A pod that is not ready yet: in the slice, never a backend.
            text.push_str(
                "  - addresses: [\"10.244.2.9\"]\n    nodeName: node-2\n    conditions: {ready: false, serving: false, terminating: false}\n",
            );
        }
        text
    };
    format!(
        "{}---\n{}",
        slice("web-abc12", "web", step % 4),
        slice("web-nodeport-abc12", "web-nodeport", (step + 2) % 4)
    )
}

fn write_churn(manifests: &Path, step: u64) {
    let tmp = manifests.join(".churn.tmp");
    std::fs::write(&tmp, churn_slices(step)).unwrap();
    std::fs::rename(tmp, manifests.join("churn.yaml")).unwrap();
}

/// The lab serving configs/lab/ with the `web` and `web-nodeport` slices in churn.yaml.
fn soak_lab() -> Lab {
    Lab::start("soak", |dir, config| {
        let manifests = lab_manifests_without(dir, &["web-abc12", "web-nodeport-abc12"]);
        write_churn(&manifests, 0);
        let t = CLOSE_TIMEOUT;
        assert!(
            !config.contains("\nconntrack:"),
            "configs/lab.yaml has a conntrack section"
        );
        format!(
            "{}\nconntrack:\n  timeouts: {{tcp_fin_wait: {t}, tcp_close_wait: {t}, tcp_last_ack: {t}, tcp_time_wait: {t}, tcp_close: {t}}}\n",
            config
                .replace("path: lab ", &format!("path: {} ", manifests.display()))
                .replace(
                    "  service_cidr: 10.96.0.0/12",
                    "  service_cidr: 10.96.0.0/12\n  poll_ms: 50",
                )
        )
    })
}

/// The sum over every sample (all labels) of metric `name` in a `/metrics` body.
fn sum(body: &str, name: &str) -> f64 {
    body.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// One look at the gateway.
#[derive(Clone, Copy, Debug)]
struct Sample {
    /// Seconds since the load started.
    t: f64,
    rss_kib: u64,
    entries: u64,
    inserts: u64,
    evictions: u64,
    generation: u64,
}

fn sample(lab: &Lab, pid: u32, t: f64) -> Sample {
    let (code, body) = http_get(&lab.admin, "/metrics").expect("GET /metrics");
    assert_eq!(code, 200, "/metrics: {body}");
    Sample {
        t,
        rss_kib: rss_kib(pid),
        entries: sum(&body, "servicegate_conntrack_entries") as u64,
        inserts: sum(&body, "servicegate_conntrack_inserts_total") as u64,
        evictions: sum(&body, "servicegate_conntrack_evictions_total") as u64,
        generation: sum(&body, "servicegate_snapshot_generation") as u64,
    }
}

/// VmRSS of process `pid`, KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status (the gateway exited?): {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
}

/// The mbufs taken from the gateway's rx pool (held by the rx rings, in flight, leaked):
/// `servicegate_mempool_mbufs_in_use{pool="rx"}`, DPDK's `rte_mempool_in_use_count`.
fn mbufs_in_use(lab: &Lab) -> u64 {
    lab.metric_line("servicegate_mempool_mbufs_in_use{pool=\"rx\"}")
        .expect("servicegate_mempool_mbufs_in_use on /metrics") as u64
}

/// Waits (up to `timeout`) until `done(sample)`; the last sample either way.
fn wait_for(
    lab: &Lab,
    pid: u32,
    t0: Instant,
    timeout: Duration,
    done: impl Fn(&Sample) -> bool,
) -> (Sample, Duration) {
    let started = Instant::now();
    loop {
        let s = sample(lab, pid, t0.elapsed().as_secs_f64());
        if done(&s) || started.elapsed() > timeout {
            return (s, started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Sets the flag when dropped (the churn thread stops even when the test panics).
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[test]
fn soak_under_churn_new_and_keep_alive_connections() {
    let minutes: f64 = std::env::var("SOAK_MINUTES")
        .ok()
        .map(|m| {
            m.parse()
                .unwrap_or_else(|e| panic!("SOAK_MINUTES={m}: {e}"))
        })
        .unwrap_or(2.0);
    assert!(minutes > 0.0, "SOAK_MINUTES={minutes}");
    let duration = Duration::from_secs_f64(minutes * 60.0);
    let warm_up = Duration::from_secs_f64((duration.as_secs_f64() / 6.0).clamp(10.0, 30.0));
    assert!(
        duration > warm_up + Duration::from_secs(CLOSE_TIMEOUT + 10),
        "SOAK_MINUTES={minutes}: too short for the warm-up ({warm_up:?}) and the checks"
    );

    let lab = soak_lab();
    let pid = lab.gateway_pid();
    let manifests: PathBuf = lab.dir.path().join("manifests");
    let out = |name: String| lab.dir.path().join(name);

    // Baselines: the lab up, no traffic through the gateway yet.
    std::thread::sleep(Duration::from_millis(500));
    let t0 = Instant::now();
    let base = sample(&lab, pid, 0.0);
    let mbufs_base = mbufs_in_use(&lab);
    println!(
        "soak figure: {minutes} minutes (SOAK_MINUTES), warm-up {warm_up:?}; baseline: RSS {} KiB, mbufs in use {mbufs_base}, conntrack entries {}",
        base.rss_kib, base.entries
    );

    // Load: keep-alive connections first, then the paced new connections, then the churn.
    let keepalive_out: Vec<PathBuf> = (0..KEEPALIVE.len())
        .map(|i| out(format!("keepalive{i}.json")))
        .collect();
    let keepalive: Vec<Background> = KEEPALIVE
        .iter()
        .zip(&keepalive_out)
        .map(|((ns, url, source), o)| {
            Background(Some(lab.spawn_client(
                ns,
                &[
                    "keepalive",
                    url,
                    &KEEPALIVE_CONNECTIONS.to_string(),
                    &KEEPALIVE_INTERVAL.to_string(),
                    source,
                    o.to_str().unwrap(),
                ],
            )))
        })
        .collect();
    let keepalive_flows = (KEEPALIVE.len() * KEEPALIVE_CONNECTIONS) as u64;
    let rate = NEW_CONNECTIONS_PER_SECOND / PACED.len() as f64;
    let paced_out: Vec<PathBuf> = (0..PACED.len())
        .map(|i| out(format!("paced{i}.json")))
        .collect();
    let paced: Vec<Background> = PACED
        .iter()
        .zip(&paced_out)
        .map(|((ns, url, source), o)| {
            Background(Some(lab.spawn_client(
                ns,
                &["paced", url, &rate.to_string(), source, o.to_str().unwrap()],
            )))
        })
        .collect();
    let load_started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let churn_guard = StopOnDrop(stop.clone());
    let churn = {
        let (stop, writes, manifests) = (stop.clone(), writes.clone(), manifests.clone());
        std::thread::spawn(move || {
            let period = Duration::from_secs(1) / SLICE_UPDATES_PER_SECOND as u32;
            let started = Instant::now();
            let mut step = 1;
            while !stop.load(Ordering::SeqCst) {
                write_churn(&manifests, step);
                writes.fetch_add(1, Ordering::SeqCst);
                let next = started + period * step as u32;
                step += 1;
                if let Some(wait) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
        })
    };

    // Every second a sample (and the mbufs in use); conntrack checked against the flows.
    let mut samples: Vec<Sample> = Vec::new();
    let mut mbufs: Vec<(f64, u64)> = Vec::new();
    let mut checked = 0;
    let mut next = load_started;
    while load_started.elapsed() < duration {
        let s = sample(&lab, pid, load_started.elapsed().as_secs_f64());
        mbufs.push((s.t, mbufs_in_use(&lab)));
        samples.push(s);
        if s.t >= warm_up.as_secs_f64() {
            // Entries inserted since `recent` have not reached their close timeout: all
            // live. Entries inserted before `old` are past it by 10 s at least: all gone.
            let recent = samples
                .iter()
                .find(|p| p.t >= s.t - CLOSE_TIMEOUT as f64 + 1.5)
                .unwrap();
            let old = samples
                .iter()
                .rev()
                .find(|p| p.t <= s.t - CLOSE_TIMEOUT as f64 - 10.0)
                .unwrap_or(&samples[0]);
            let low = keepalive_flows + (s.inserts - recent.inserts);
            let high = base.entries + keepalive_flows + (s.inserts - old.inserts) + 50;
            assert!(
                s.entries + 50 >= low && s.entries <= high,
                "conntrack entries {} at {:.1} s do not track the live flows: at least {low} \
                 ({keepalive_flows} keep-alive + inserted since {:.1} s), at most {high} \
                 (inserted since {:.1} s); samples: {samples:?}",
                s.entries,
                s.t,
                recent.t,
                old.t
            );
            checked += 1;
        }
        if samples.len().is_multiple_of(10) {
            println!(
                "soak figure: sample t={:.0}s RSS {} KiB, conntrack entries {} (inserts {}), mbufs in use {}, snapshot generation {}, slice updates {}",
                s.t,
                s.rss_kib,
                s.entries,
                s.inserts - base.inserts,
                mbufs.last().unwrap().1,
                s.generation,
                writes.load(Ordering::SeqCst)
            );
        }
        next += Duration::from_secs(1);
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    let loaded = load_started.elapsed();
    let end = sample(&lab, pid, loaded.as_secs_f64());
    samples.push(end);

    // The load stops: churn and new connections; the keep-alive connections stay.
    drop(churn_guard);
    churn.join().expect("churn thread");
    let writes = writes.load(Ordering::SeqCst);
    let paced: Vec<Value> = paced
        .into_iter()
        .zip(&paced_out)
        .map(|(client, o)| client.finish(o))
        .collect();
    let (only_keepalive, settled) = wait_for(
        &lab,
        pid,
        t0,
        Duration::from_secs(CLOSE_TIMEOUT + 20),
        |s| s.entries <= base.entries + keepalive_flows,
    );
    let keepalive: Vec<Value> = keepalive
        .into_iter()
        .zip(&keepalive_out)
        .map(|(client, o)| client.finish(o))
        .collect();
    let (drained, drained_in) = wait_for(
        &lab,
        pid,
        t0,
        Duration::from_secs(CLOSE_TIMEOUT + 20),
        |s| s.entries <= base.entries,
    );
    let mut mbufs_end = mbufs_in_use(&lab);
    let deadline = Instant::now() + Duration::from_secs(10);
    while mbufs_end != mbufs_base && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        mbufs_end = mbufs_in_use(&lab);
    }

    // Figures.
    let total =
        |v: &[Value], key: &str| v.iter().map(|r| r[key].as_u64().unwrap_or(0)).sum::<u64>();
    let new_connections = total(&paced, "total");
    let keepalive_requests = total(&keepalive, "requests");
    let failed = total(&paced, "failed") + total(&keepalive, "failed");
    // Each client's own schedule: connections started over the seconds it ran.
    let achieved: f64 = paced
        .iter()
        .map(|r| r["rate"].as_f64().unwrap_or(0.0))
        .sum();
    println!(
        "soak figure: requests {} ({new_connections} on new connections, {achieved:.1}/s; {keepalive_requests} on {keepalive_flows} keep-alive connections), failed {failed}",
        new_connections + keepalive_requests
    );
    for (i, r) in paced.iter().enumerate() {
        println!(
            "soak figure: paced client {i} ({} {}): {} connections at {}/s, failed {}, unfinished {}, over 1 s {}, median {} ms, p99 {} ms, max {} ms, max schedule lag {} ms, max in flight {}, backends {}",
            PACED[i].0,
            PACED[i].1,
            r["total"],
            r["rate"],
            r["failed"],
            r["unfinished"],
            r["slow"],
            r["median_ms"],
            r["p99_ms"],
            r["max_ms"],
            r["max_lag_ms"],
            r["max_in_flight"],
            r["backends"]
        );
    }
    let generations = only_keepalive.generation - base.generation;
    println!(
        "soak figure: EndpointSlice updates {writes} ({:.1}/s), snapshot generations {generations}",
        writes as f64 / loaded.as_secs_f64()
    );
    let early = samples
        .iter()
        .find(|s| s.t >= warm_up.as_secs_f64())
        .copied()
        .expect("a sample after the warm-up");
    let max_rss = samples.iter().map(|s| s.rss_kib).max().unwrap();
    let growth = (end.rss_kib as f64 - early.rss_kib as f64) / early.rss_kib as f64;
    println!(
        "soak figure: RSS start {} KiB, after warm-up ({:.0} s) {} KiB, end {} KiB ({:+.2} %), max {max_rss} KiB, after drain {} KiB",
        base.rss_kib,
        early.t,
        early.rss_kib,
        end.rss_kib,
        growth * 100.0,
        drained.rss_kib
    );
    let mbufs_max = mbufs.iter().map(|m| m.1).max().unwrap_or(0);
    println!(
        "soak figure: mbufs in use baseline {mbufs_base}, max during load {mbufs_max}, end {mbufs_end}"
    );
    let every = samples.len().div_ceil(12).max(1);
    let mut ct: Vec<String> = samples[..samples.len() - 1]
        .iter()
        .step_by(every)
        .map(|s| format!("{:.0}s:{}", s.t, s.entries))
        .collect();
    ct.push(format!("{:.0}s:{}", end.t, end.entries));
    println!(
        "soak figure: conntrack entries baseline {}, during load {} ({checked} samples checked against the live flows), evictions {}, keep-alive only {} after {:.1} s (expected {}), end {} after {:.1} s",
        base.entries,
        ct.join(" "),
        end.evictions - base.evictions,
        only_keepalive.entries,
        settled.as_secs_f64(),
        base.entries + keepalive_flows,
        drained.entries,
        drained_in.as_secs_f64()
    );

    // Assertions.
    for (i, r) in paced.iter().enumerate() {
        assert_eq!(r["failed"], 0, "paced client {i}: failed connections: {r}");
        assert_eq!(
            r["unfinished"], 0,
            "paced client {i}: unfinished connections: {r}"
        );
        assert_eq!(r["total"], r["started"], "paced client {i}: {r}");
    }
    assert!(
        achieved >= NEW_CONNECTIONS_PER_SECOND * 0.95,
        "new connections not sustained: {achieved:.1}/s of {NEW_CONNECTIONS_PER_SECOND}/s: {paced:?}"
    );
    let expected_requests = loaded.as_secs_f64() / KEEPALIVE_INTERVAL * 0.3;
    for (i, r) in keepalive.iter().enumerate() {
        assert_eq!(r["failed"], 0, "keep-alive client {i}: {r}");
        for c in r["connections"].as_array().unwrap() {
            assert_eq!(
                c["ports"].as_array().map(Vec::len),
                Some(1),
                "keep-alive client {i}: a connection was opened again: {c}"
            );
            assert_eq!(
                c["backends"].as_array().map(Vec::len),
                Some(1),
                "keep-alive client {i}: a connection changed pods: {c}"
            );
            assert!(
                c["requests"].as_u64().unwrap() as f64 >= expected_requests,
                "keep-alive client {i}: too few requests (fewer than {expected_requests:.0}): {c}"
            );
        }
    }
    assert!(
        writes as f64 >= loaded.as_secs_f64() * SLICE_UPDATES_PER_SECOND as f64 * 0.95,
        "{writes} slice updates in {loaded:?}"
    );
    assert!(
        generations as f64 >= writes as f64 * 0.5,
        "{writes} slice updates served as {generations} snapshots"
    );
    assert!(
        growth.abs() <= 0.05,
        "RSS not flat: {} KiB after the warm-up, {} KiB at the end ({:+.2} %); samples: {samples:?}",
        early.rss_kib,
        end.rss_kib,
        growth * 100.0
    );
    assert_eq!(
        end.evictions, base.evictions,
        "conntrack evicted entries early (table under pressure)"
    );
    assert_eq!(
        only_keepalive.entries,
        base.entries + keepalive_flows,
        "conntrack entries with only the keep-alive connections live (after {settled:?})"
    );
    assert_eq!(
        drained.entries, base.entries,
        "conntrack entries after every connection closed and {CLOSE_TIMEOUT} s (after {drained_in:?})"
    );
    assert_eq!(
        mbufs_end, mbufs_base,
        "mbufs in use after the load (baseline {mbufs_base})"
    );
}
