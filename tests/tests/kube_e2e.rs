//! The real `servicegate run` binary against the fake Kubernetes API server through a
//! kubeconfig: initial sync gates readiness, changes reach the admin API and the workers'
//! snapshots, a 410 relist never drops a frontend, and an API outage changes nothing until
//! the API is back.
//!
//! Ports are two `net_null` vdevs with `no-rx=1` (no traffic, so the worker idles on the
//! shared CI cores); each test runs its own EAL (`file_prefix`) and admin port.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tests::apiserver::{FakeApiServer, Kind};
use tests::harness::{http_get, require_root, unique_name, Gateway, TempDir};
use tests::{endpoint_slice, service};

/// How long the API server stays away in the outage test.
const DOWN_SECS: u64 = 30;
/// "Within a few seconds": how fast a change must reach `/v1/services` and the workers.
const PROMPT: Duration = Duration::from_secs(5);
/// Bound for what waits on kube's retry backoff (up to 30 s per retry, with jitter).
const EVENTUALLY: Duration = Duration::from_secs(90);
/// EAL init with --no-huge plus the first sync.
const STARTUP: Duration = Duration::from_secs(60);

const NS: &str = "default";
const SVC: &str = "web";
const SLICE: &str = "web-abc12";
const CLUSTER_IP: &str = "10.96.0.10";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A loopback port free right now (the gateway binds it a moment later).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// A `mode: gateway` config on two net_null ports, services from `kubeconfig`.
fn gateway_config(dir: &Path, kubeconfig: &Path, admin: &str) -> PathBuf {
    let text = format!(
        "mode: gateway
eal:
  args: [\"--no-huge\", \"-m\", \"512\", \"--log-level=*:warning\"]
  no_pci: true
  file_prefix: {prefix}
cores:
  control: 0
  workers: [1]
  idle_sleep_us: 50
ports:
  - name: uplink
    device: \"net_null0,copy=0,no-rx=1\"
    role: uplink
    addresses: [192.168.100.1/24]
  - name: cluster
    device: \"net_null1,copy=0,no-rx=1\"
    role: cluster
    addresses: [10.0.0.1/24]
services:
  source: kubernetes
  kubeconfig: {kubeconfig}
  service_cidr: 10.96.0.0/12
admin:
  listen: {admin}
",
        prefix = unique_name("sgk"),
        kubeconfig = kubeconfig.display(),
    );
    let path = dir.join("gateway.yaml");
    std::fs::write(&path, text).expect("write config");
    path
}

/// The fake API server (on `rt`) and a gateway subprocess watching it.
struct Setup {
    gateway: Gateway,
    server: FakeApiServer,
    _dir: TempDir,
    started: Instant,
}

fn start(rt: &tokio::runtime::Runtime, prepare: impl FnOnce(&FakeApiServer)) -> Setup {
    require_root();
    let server = rt.block_on(FakeApiServer::start());
    prepare(&server);
    let dir = TempDir::new("kube");
    let kubeconfig = server.write_kubeconfig(dir.path());
    let admin = format!("127.0.0.1:{}", free_port());
    let config = gateway_config(dir.path(), &kubeconfig, &admin);
    let started = Instant::now();
    let gateway = Gateway::start(&config, &admin);
    Setup {
        gateway,
        server,
        _dir: dir,
        started,
    }
}

/// A gateway serving `web` with two ready endpoints, seen in its admin API; returns the
/// setup, the admin address and the ClusterIP frontend.
fn start_web(rt: &tokio::runtime::Runtime) -> (Setup, String, String) {
    let mut setup = start(rt, |server| {
        server.apply_service(web_service());
        server.apply_endpoint_slice(web_slice(&["10.244.1.2", "10.244.1.3"]));
    });
    let admin = setup.gateway.admin.clone();
    setup.gateway.wait_ready(STARTUP);
    let fe = format!("{CLUSTER_IP}:80");
    wait_frontend(
        &admin,
        &fe,
        Some(&["10.244.1.2:9376", "10.244.1.3:9376"]),
        PROMPT,
    );
    (setup, admin, fe)
}

fn web_service() -> k8s_openapi::api::core::v1::Service {
    service(NS, SVC, CLUSTER_IP, 80)
}

fn web_slice(backends: &[&str]) -> k8s_openapi::api::discovery::v1::EndpointSlice {
    endpoint_slice(NS, SLICE, SVC, backends, 9376)
}

fn get(admin: &str, path: &str) -> Option<(u16, String)> {
    http_get(admin, path).ok()
}

fn services(admin: &str) -> Value {
    let (code, body) = get(admin, "/v1/services").expect("GET /v1/services");
    assert_eq!(code, 200, "/v1/services: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("/v1/services is not JSON ({e}): {body}"))
}

/// `address:port` of every frontend → its sorted `address:port` backends.
fn frontends(services: &Value) -> BTreeMap<String, Vec<String>> {
    services["frontends"]
        .as_array()
        .expect("frontends array")
        .iter()
        .map(|f| {
            let mut backends: Vec<String> = f["backends"]
                .as_array()
                .expect("backends array")
                .iter()
                .map(|b| format!("{}:{}", b["address"].as_str().unwrap_or("?"), b["port"]))
                .collect();
            backends.sort();
            (
                format!("{}:{}", f["address"].as_str().unwrap_or("?"), f["port"]),
                backends,
            )
        })
        .collect()
}

/// The frontends without their (traffic-dependent) packet counters.
fn frontends_without_packets(services: &Value) -> Value {
    let mut list = services["frontends"].clone();
    for f in list.as_array_mut().expect("frontends array") {
        if let Some(obj) = f.as_object_mut() {
            obj.remove("packets");
        }
    }
    list
}

fn generation(services: &Value) -> u64 {
    services["generation"].as_u64().expect("generation")
}

/// The samples of one metric family: labels text (`worker="0"`) → value.
fn metric(admin: &str, name: &str) -> BTreeMap<String, f64> {
    let (code, body) = get(admin, "/metrics").expect("GET /metrics");
    assert_eq!(code, 200, "/metrics: {body}");
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            let (metric, labels) = match key.split_once('{') {
                Some((m, rest)) => (m, rest.trim_end_matches('}')),
                None => (key, ""),
            };
            if metric != name {
                return None;
            }
            Some((labels.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// Polls `probe` every 20 ms until it answers `Some`; panics with `what` after `timeout`.
fn wait_for<T>(what: &str, timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until every worker runs a snapshot of generation ≥ `generation`, and checks the
/// installed generation reached it too.
fn wait_workers_at(admin: &str, generation: u64) {
    wait_for(
        &format!("every worker to load snapshot generation {generation}"),
        PROMPT,
        || {
            let installed = metric(admin, "servicegate_snapshot_generation")
                .get("")
                .copied()
                .unwrap_or(0.0) as u64;
            let workers = metric(admin, "servicegate_worker_snapshot_generation");
            (installed >= generation
                && !workers.is_empty()
                && workers.values().all(|&g| g as u64 >= generation))
            .then_some(())
        },
    );
}

/// Waits (≤ `timeout`) until `/v1/services` shows `want` for frontend `frontend`
/// (`None` = absent); returns the generation that showed it and how long it took.
fn wait_frontend(
    admin: &str,
    frontend: &str,
    want: Option<&[&str]>,
    timeout: Duration,
) -> (u64, Duration) {
    let since = Instant::now();
    let want: Option<Vec<String>> = want.map(|w| {
        let mut v: Vec<String> = w.iter().map(|s| s.to_string()).collect();
        v.sort();
        v
    });
    let deadline = since + timeout;
    loop {
        let s = services(admin);
        let now = frontends(&s);
        if now.get(frontend) == want.as_ref() {
            return (generation(&s), since.elapsed());
        }
        assert!(
            Instant::now() < deadline,
            "frontend {frontend} not {want:?} within {timeout:?}; last seen: {now:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ready_code(admin: &str) -> Option<u16> {
    get(admin, "/readyz").map(|(c, _)| c)
}

fn stop(setup: Setup) {
    let (ok, out, err) = setup.gateway.stop();
    assert!(
        ok,
        "gateway did not exit 0:\nstdout:\n{out}\nstderr:\n{err}"
    );
}

#[test]
fn initial_sync_gates_readiness_then_lists_the_service_with_its_backends() {
    const LIST_DELAY: Duration = Duration::from_secs(6);
    let rt = runtime();
    let setup = start(&rt, |server| {
        server.apply_service(web_service());
        server.apply_endpoint_slice(web_slice(&["10.244.1.2", "10.244.1.3"]));
        server.set_list_delay(Kind::EndpointSlice, LIST_DELAY);
    });
    let admin = setup.gateway.admin.clone();

    // The admin API comes up after EAL init; until the slice list answers it says 503.
    let first = wait_for("the admin API to answer", STARTUP, || ready_code(&admin));
    assert_eq!(first, 503, "ready before the EndpointSlice list answered");
    let s = services(&admin);
    assert_eq!(s["ready"], Value::Bool(false), "{s}");
    assert_eq!(generation(&s), 0, "a snapshot before the initial sync: {s}");
    assert!(frontends(&s).is_empty(), "{s}");
    let mut not_ready_polls = 0u32;
    let ready_after = wait_for("/readyz 200", STARTUP, || {
        match ready_code(&admin) {
            Some(200) => return Some(setup.started.elapsed()),
            Some(503) => not_ready_polls += 1,
            other => panic!("/readyz answered {other:?}"),
        }
        None
    });
    assert!(
        ready_after >= LIST_DELAY,
        "ready {ready_after:?} after start, before the {LIST_DELAY:?} list delay elapsed"
    );
    assert!(setup.server.lists_served() >= 2, "both kinds listed");

    let s = services(&admin);
    assert_eq!(s["ready"], Value::Bool(true), "{s}");
    assert_eq!(s["source"], "kubernetes", "{s}");
    let fe = frontends(&s);
    assert_eq!(
        fe.get(&format!("{CLUSTER_IP}:80")),
        Some(&vec![
            "10.244.1.2:9376".to_string(),
            "10.244.1.3:9376".to_string()
        ]),
        "{s}"
    );
    let web = s["frontends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["address"] == CLUSTER_IP)
        .expect("web frontend");
    assert_eq!(web["service"], format!("{NS}/{SVC}"), "{web}");
    assert_eq!(web["usable_backends"], 2, "{web}");
    wait_workers_at(&admin, generation(&s));
    eprintln!("ready {ready_after:?} after start ({not_ready_polls} polls saw 503)");
    stop(setup);
}

#[test]
fn changes_reach_the_admin_api_and_the_workers_within_seconds() {
    let rt = runtime();
    let mut setup = start(&rt, |_| {});
    let admin = setup.gateway.admin.clone();
    setup.gateway.wait_ready(STARTUP);
    let s = services(&admin);
    assert!(frontends(&s).is_empty(), "empty cluster, no frontends: {s}");
    wait_workers_at(&admin, generation(&s));
    let fe = format!("{CLUSTER_IP}:80");
    let server = &setup.server;

    // A Service created with one endpoint.
    server.apply_endpoint_slice(web_slice(&["10.244.1.2"]));
    server.apply_service(web_service());
    let (g1, t1) = wait_frontend(&admin, &fe, Some(&["10.244.1.2:9376"]), PROMPT);
    wait_workers_at(&admin, g1);

    // An endpoint added.
    server.apply_endpoint_slice(web_slice(&["10.244.1.2", "10.244.1.3"]));
    let (g2, t2) = wait_frontend(
        &admin,
        &fe,
        Some(&["10.244.1.2:9376", "10.244.1.3:9376"]),
        PROMPT,
    );
    assert!(g2 > g1, "generation {g2} after {g1}");
    wait_workers_at(&admin, g2);

    // An endpoint removed.
    server.apply_endpoint_slice(web_slice(&["10.244.1.3"]));
    let (g3, t3) = wait_frontend(&admin, &fe, Some(&["10.244.1.3:9376"]), PROMPT);
    assert!(g3 > g2, "generation {g3} after {g2}");
    wait_workers_at(&admin, g3);

    // The Service deleted.
    server.delete_service(NS, SVC).expect("web existed");
    let (g4, t4) = wait_frontend(&admin, &fe, None, PROMPT);
    assert!(g4 > g3, "generation {g4} after {g3}");
    wait_workers_at(&admin, g4);
    let s = services(&admin);
    assert!(frontends(&s).is_empty(), "{s}");
    eprintln!("create {t1:?}, add endpoint {t2:?}, remove endpoint {t3:?}, delete {t4:?}");
    stop(setup);
}

#[test]
fn relist_after_410_never_drops_a_frontend() {
    let rt = runtime();
    let mut setup = start(&rt, |server| {
        server.apply_service(web_service());
        server.apply_endpoint_slice(web_slice(&["10.244.1.2", "10.244.1.3"]));
    });
    let admin = setup.gateway.admin.clone();
    setup.gateway.wait_ready(STARTUP);
    let fe = format!("{CLUSTER_IP}:80");
    let (g0, _) = wait_frontend(
        &admin,
        &fe,
        Some(&["10.244.1.2:9376", "10.244.1.3:9376"]),
        PROMPT,
    );

    // Watch /v1/services every 20 ms for the whole test.
    let stop_polling = Arc::new(AtomicBool::new(false));
    let gaps = Arc::new(Mutex::new(Vec::<String>::new()));
    let poller = std::thread::spawn({
        let (admin, fe, stop_polling, gaps) = (
            admin.clone(),
            fe.clone(),
            stop_polling.clone(),
            gaps.clone(),
        );
        move || {
            let mut polls = 0u64;
            while !stop_polling.load(Ordering::SeqCst) {
                let s = services(&admin);
                polls += 1;
                match frontends(&s).get(&fe) {
                    Some(backends) if !backends.is_empty() => {}
                    other => gaps
                        .lock()
                        .unwrap()
                        .push(format!("generation {}: {fe} -> {other:?}", generation(&s))),
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            polls
        }
    });

    let server = &setup.server;
    for round in 0..3 {
        let lists = server.lists_served();
        let gen_before = generation(&services(&admin));
        server.expire_watches_with_410();
        if round == 1 {
            // A change the watchers only learn from the relist.
            server.apply_endpoint_slice(web_slice(&["10.244.1.2", "10.244.1.3", "10.244.1.4"]));
        }
        wait_for(
            &format!("round {round}: both kinds to relist after 410"),
            EVENTUALLY,
            || (server.lists_served() >= lists + 2).then_some(()),
        );
        // The relist is installed as a new snapshot.
        let g = wait_for(
            &format!("round {round}: a snapshot after the relist"),
            EVENTUALLY,
            || {
                let g = generation(&services(&admin));
                (g > gen_before).then_some(g)
            },
        );
        wait_workers_at(&admin, g);
    }
    let (g_end, _) = wait_frontend(
        &admin,
        &fe,
        Some(&["10.244.1.2:9376", "10.244.1.3:9376", "10.244.1.4:9376"]),
        PROMPT,
    );
    // Keep polling a little after the last relist.
    std::thread::sleep(Duration::from_secs(1));
    stop_polling.store(true, Ordering::SeqCst);
    let polls = poller.join().expect("poller");
    let gaps = gaps.lock().unwrap().clone();
    assert!(
        gaps.is_empty(),
        "the frontend disappeared:\n{}",
        gaps.join("\n")
    );
    assert!(polls >= 20, "only {polls} polls");
    eprintln!(
        "{polls} polls, generations {g0}..{g_end}, {} lists served",
        server.lists_served()
    );
    stop(setup);
}

#[test]
fn api_outage_changes_nothing_and_a_change_made_meanwhile_lands_after() {
    let rt = runtime();
    let (setup, admin, fe) = start_web(&rt);
    // Let the watches settle (the snapshot may still be catching up on the initial events).
    std::thread::sleep(Duration::from_millis(500));
    let before = services(&admin);
    let gen_before = generation(&before);
    let frontends_before = frontends_without_packets(&before);
    wait_workers_at(&admin, gen_before);

    rt.block_on(setup.server.set_down(true));
    let down_at = Instant::now();
    let mut polls = 0u32;
    let mut changed = false;
    while down_at.elapsed() < Duration::from_secs(DOWN_SECS) {
        if !changed && down_at.elapsed() >= Duration::from_secs(DOWN_SECS / 2) {
            // Made while the API is unreachable: the gateway cannot see it yet.
            setup.server.delete_endpoint_slice(NS, SLICE);
            setup
                .server
                .apply_endpoint_slice(web_slice(&["10.244.1.3", "10.244.1.9"]));
            changed = true;
        }
        let s = services(&admin);
        assert_eq!(
            generation(&s),
            gen_before,
            "generation moved while the API was down ({:?} in)",
            down_at.elapsed()
        );
        assert_eq!(
            frontends_without_packets(&s),
            frontends_before,
            "frontends changed"
        );
        assert_eq!(s["ready"], Value::Bool(true));
        let health = get(&admin, "/healthz");
        assert_eq!(
            health.as_ref().map(|h| h.0),
            Some(200),
            "unhealthy while the API was down: {health:?}"
        );
        assert_eq!(
            ready_code(&admin),
            Some(200),
            "not ready while the API was down"
        );
        let workers = metric(&admin, "servicegate_worker_snapshot_generation");
        assert!(
            workers.values().all(|&g| g as u64 == gen_before),
            "worker generations {workers:?}, expected {gen_before}"
        );
        polls += 1;
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(changed);

    rt.block_on(setup.server.set_down(false));
    let (g, t) = wait_frontend(
        &admin,
        &fe,
        Some(&["10.244.1.3:9376", "10.244.1.9:9376"]),
        EVENTUALLY,
    );
    assert!(g > gen_before, "generation {g} after {gen_before}");
    // Issue 23 item 7: in force within 15 s of the API's return (the watchers' backoff
    // waits at most 5 s between retries).
    assert!(
        t <= Duration::from_secs(15),
        "the change made during the outage took {t:?} after the API came back"
    );
    wait_workers_at(&admin, g);
    assert_eq!(get(&admin, "/healthz").map(|h| h.0), Some(200));
    eprintln!(
        "{polls} polls during {DOWN_SECS} s down; change landed {t:?} after the API came back"
    );
    stop(setup);
}

fn last_reload(admin: &str) -> Option<String> {
    services(admin)["last_reload"].as_str().map(str::to_owned)
}

#[test]
fn sighup_applies_a_good_config_names_restart_keys_and_refuses_a_broken_one() {
    let rt = runtime();
    let (setup, admin, fe) = start_web(&rt);
    let config = setup._dir.path().join("gateway.yaml");
    let original = std::fs::read_to_string(&config).expect("config");
    let gen_before = generation(&services(&admin));

    // A good config: a route and a timeout (live), more queues (needs a restart).
    let good = original
        .replace(
            "admin:\n",
            "routes:\n  - {prefix: 203.0.113.0/24, via: 192.168.100.2, port: uplink}\n\
             conntrack:\n  timeouts: {udp: 10}\nadmin:\n",
        )
        .replacen("role: uplink\n", "role: uplink\n    queues: 2\n", 1);
    std::fs::write(&config, &good).expect("write config");
    let signalled = Instant::now();
    setup.gateway.signal("HUP");
    let line = wait_for("the reload", PROMPT, || last_reload(&admin));
    let applied_after = signalled.elapsed();
    assert_eq!(
        line, "applied; needs a restart (not applied): ports[0].queues",
        "{line}"
    );
    // The tables are published again with the new settings, which the workers take.
    let g = wait_for("a new snapshot", PROMPT, || {
        let g = generation(&services(&admin));
        (g > gen_before).then_some(g)
    });
    wait_workers_at(&admin, g);
    assert_eq!(
        metric(&admin, "servicegate_config_reload_total")
            .get("result=\"ok\"")
            .copied(),
        Some(1.0)
    );
    eprintln!("SIGHUP applied in {applied_after:?}, snapshot {g} seen by every worker");

    // A broken config: refused with check's one-line error, the gateway still serving.
    std::fs::write(&config, good.replace("admin:\n", "colour: blue\nadmin:\n")).expect("write");
    setup.gateway.signal("HUP");
    let line = wait_for("the refusal", PROMPT, || {
        last_reload(&admin).filter(|l| l.starts_with("refused"))
    });
    assert!(
        line.contains("gateway.yaml: ") && line.contains("unknown field `colour`"),
        "{line}"
    );
    assert_eq!(
        metric(&admin, "servicegate_config_reload_total")
            .get("result=\"error\"")
            .copied(),
        Some(1.0)
    );
    assert_eq!(ready_code(&admin), Some(200));
    wait_frontend(
        &admin,
        &fe,
        Some(&["10.244.1.2:9376", "10.244.1.3:9376"]),
        PROMPT,
    );
    // And changes still flow.
    setup
        .server
        .apply_endpoint_slice(web_slice(&["10.244.1.3"]));
    wait_frontend(&admin, &fe, Some(&["10.244.1.3:9376"]), PROMPT);
    stop(setup);
}

/// Issue 23 item 6: hostile API objects. An EndpointSlice of 10,000 endpoints, a Service
/// created and deleted 100 times a second for 3 s, and objects with missing or absurd
/// fields (no spec, an address that is no IP, ports 0 and 70,000, an unknown address type,
/// a slice of no Service, endpoints without conditions) never stop the gateway: each is
/// applied or skipped, and the good Service keeps its tables all along.
#[test]
fn hostile_api_objects_neither_crash_the_gateway_nor_disturb_a_good_service() {
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort};
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

    let rt = runtime();
    let (mut setup, admin, fe) = start_web(&rt);
    let web_backends = ["10.244.1.2:9376", "10.244.1.3:9376"];
    let server = &setup.server;

    // 10,000 endpoints in one slice (the API server caps slices at 1,000; a broken or
    // hostile one may not).
    let started = Instant::now();
    server.apply_service(service(NS, "big", "10.96.0.77", 80));
    let addresses: Vec<String> = (0..10_000u32)
        .map(|i| format!("10.245.{}.{}", i / 250, 1 + i % 250))
        .collect();
    let refs: Vec<&str> = addresses.iter().map(String::as_str).collect();
    server.apply_endpoint_slice(endpoint_slice(NS, "big-1", "big", &refs, 9376));
    wait_for("the 10,000-endpoint frontend", EVENTUALLY, || {
        let s = services(&admin);
        (frontends(&s).get("10.96.0.77:80").map(Vec::len) == Some(10_000)).then_some(())
    });
    println!(
        "hostile figure: a slice of 10,000 endpoints served after {:?}",
        started.elapsed()
    );

    // Flapping: created and deleted 100 times a second for 3 s, ending created.
    let flap = service(NS, "flap", "10.96.0.78", 80);
    server.apply_endpoint_slice(endpoint_slice(NS, "flap-1", "flap", &["10.244.1.9"], 9376));
    let started = Instant::now();
    for i in 0..300 {
        if i % 2 == 0 {
            server.apply_service(flap.clone());
        } else {
            server.delete_service(NS, "flap");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    server.apply_service(flap.clone());
    wait_frontend(&admin, "10.96.0.78:80", Some(&["10.244.1.9:9376"]), PROMPT);
    println!(
        "hostile figure: 301 flaps in {:?}, then the flapping Service served",
        started.elapsed()
    );

    // Missing and absurd fields.
    let mut no_spec = service(NS, "no-spec", "10.96.0.79", 80);
    no_spec.spec = None;
    server.apply_service(no_spec);
    let mut bad_ip = service(NS, "bad-ip", "10.96.0.80", 80);
    if let Some(spec) = bad_ip.spec.as_mut() {
        spec.cluster_ip = Some("not-an-ip".into());
        spec.cluster_ips = Some(vec!["999.1.1.1".into()]);
    }
    server.apply_service(bad_ip);
    let mut bad_ports = service(NS, "bad-ports", "10.96.0.81", 80);
    if let Some(port) = bad_ports
        .spec
        .as_mut()
        .and_then(|s| s.ports.as_mut())
        .and_then(|p| p.first_mut())
    {
        port.port = 70_000;
        port.node_port = Some(-1);
        port.protocol = Some("QUIC".into());
        port.target_port = Some(IntOrString::String(String::new()));
    }
    server.apply_service(bad_ports);
    let mut zero_port = service(NS, "zero-port", "10.96.0.82", 0);
    if let Some(spec) = zero_port.spec.as_mut() {
        spec.type_ = Some("NoSuchType".into());
        spec.ports.get_or_insert_with(Vec::new).clear();
    }
    server.apply_service(zero_port);
    let mut bad_slice = endpoint_slice(NS, "bad-ip-1", "bad-ip", &["999.0.0.1", ""], 0);
    bad_slice.address_type = "Bogus".into();
    server.apply_endpoint_slice(bad_slice);
    let mut orphan = endpoint_slice(NS, "orphan-1", "web", &["10.244.9.9"], 9376);
    orphan.metadata.labels = None;
    server.apply_endpoint_slice(orphan);
    let mut odd = endpoint_slice(NS, "web-odd", "web", &[], 9376);
    odd.endpoints = Some(vec![Endpoint {
        addresses: vec![],
        conditions: None,
        ..Default::default()
    }]);
    odd.ports = Some(vec![EndpointPort {
        port: Some(-5),
        protocol: Some("TCP".into()),
        name: Some("http".into()),
        ..Default::default()
    }]);
    server.apply_endpoint_slice(odd);
    // One more good change goes through after all of it.
    server.apply_service(service(NS, "after", "10.96.0.83", 80));
    server.apply_endpoint_slice(endpoint_slice(
        NS,
        "after-1",
        "after",
        &["10.244.1.4"],
        9376,
    ));
    wait_frontend(&admin, "10.96.0.83:80", Some(&["10.244.1.4:9376"]), PROMPT);

    assert!(setup.gateway.is_running(), "the gateway exited");
    let s = services(&admin);
    assert_eq!(
        frontends(&s).get(&fe).cloned(),
        Some(
            web_backends
                .iter()
                .map(|b| b.to_string())
                .collect::<Vec<_>>()
        ),
        "the good Service's backends changed: {s}"
    );
    assert_eq!(
        frontends(&s).get("10.96.0.77:80").map(Vec::len),
        Some(10_000)
    );
    let (code, _) = get(&admin, "/healthz").expect("healthz");
    assert_eq!(code, 200);
    stop(setup);
}
