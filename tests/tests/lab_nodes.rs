//! Issue 22 item 4: a node joins (and leaves) the lab under load, with Services, EndpointSlices
//! and Nodes from the Kubernetes API (the fake API server, list/watch through a kubeconfig)
//! and the nodes' pod CIDRs, VTEPs and VTEP MACs learned from flannel's annotations
//! (`vxlan.nodes: flannel`, no static `vxlan.pod_cidrs`). A client in the client namespace
//! opens 40 new connections a second to the `web` NodePort throughout; every figure is
//! printed on a line starting with `lab nodes figure:`.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::{EndpointConditions, EndpointSlice};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::Value;
use tests::apiserver::FakeApiServer;
use tests::harness::{http_get, Background};
use tests::lab::Lab;
use tests::{endpoint_slice, node, service};

const NS: &str = "lab";
const CLUSTER_IP: &str = "10.96.0.10";
const NODE_PORT: i32 = 30080;
/// What the client loops over: the `web` NodePort on the gateway's uplink address.
const URL: &str = "http://192.168.100.1:30080/";
const RATE: &str = "40";
const CLIENT: &str = "192.168.100.2/32";

const POD1: (&str, &str) = ("10.244.1.2", "node-1");
const POD2: (&str, &str) = ("10.244.1.3", "node-1");
const POD3: (&str, &str) = ("10.244.2.2", "node-2");
const POD4: (&str, &str) = ("10.244.3.2", "node-3");
/// A flow to pod4 that no Service matches: its trace names the node
/// whose pod CIDR holds pod4, once the gateway knows that node.
const TO_POD4: &str = "tcp 10.244.1.2:41000 -> 10.244.3.2:9376";

fn figure(text: String) {
    eprintln!("lab nodes figure: {text}");
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64()
}

/// `web`: ClusterIP 10.96.0.10:80 and NodePort 30080, to the pods' 9376.
fn web_service() -> Service {
    let mut svc = service(NS, "web", CLUSTER_IP, 80);
    let spec = svc.spec.as_mut().expect("spec");
    spec.type_ = Some("NodePort".to_owned());
    let port = &mut spec.ports.as_mut().expect("ports")[0];
    port.node_port = Some(NODE_PORT);
    port.target_port = Some(IntOrString::Int(9376));
    svc
}

/// The `web` EndpointSlice: ready and serving pods, each on its node.
fn web_slice(pods: &[(&str, &str)]) -> EndpointSlice {
    let addresses: Vec<&str> = pods.iter().map(|(addr, _)| *addr).collect();
    let mut slice = endpoint_slice(NS, "web-abc12", "web", &addresses, 9376);
    for (ep, (_, node)) in slice.endpoints.iter_mut().flatten().zip(pods) {
        ep.node_name = Some((*node).to_owned());
        ep.conditions = Some(EndpointConditions {
            ready: Some(true),
            serving: Some(true),
            terminating: Some(false),
        });
    }
    slice
}

/// Node `name` as flannel annotates it: pod CIDR, public-ip (the VTEP) and VtepMAC.
fn flannel_node(
    name: &str,
    pod_cidr: &str,
    vtep: &str,
    vtep_mac: &str,
) -> k8s_openapi::api::core::v1::Node {
    node(name, pod_cidr, vtep, Some(vtep), Some(vtep_mac))
}

/// configs/lab.yaml with the kubernetes source on `kubeconfig` and the nodes from the API.
fn kube_config(config: String, kubeconfig: &std::path::Path) -> String {
    let mut out = String::new();
    for line in config.lines() {
        if line.trim_start().starts_with("pod_cidrs:") || line.trim_start().starts_with("- { cidr:")
        {
            continue;
        }
        if line.trim_start().starts_with("path: lab") {
            out.push_str(&format!("  kubeconfig: {}\n", kubeconfig.display()));
            continue;
        }
        out.push_str(&line.replace("source: files", "source: kubernetes"));
        out.push('\n');
        if line.trim_start().starts_with("local_vtep:") {
            out.push_str("  nodes: flannel\n");
        }
    }
    for want in ["source: kubernetes", "kubeconfig: ", "nodes: flannel"] {
        assert!(out.contains(want), "configs/lab.yaml changed shape: {out}");
    }
    assert!(!out.contains("pod_cidrs"), "{out}");
    out
}

/// The node the gateway encapsulates a packet for pod4 toward (`None`: no pod route), and
/// the snapshot generation that says so.
fn pod4_node(lab: &Lab) -> (Option<String>, u64) {
    let trace = lab.trace(TO_POD4);
    let node = trace["egress"]["node"].as_str().map(str::to_owned);
    (node, trace["generation"].as_u64().unwrap_or(0))
}

/// Waits (≤ 10 s) until the gateway routes pod4's CIDR to `want`; returns the generation.
fn wait_pod4_node(lab: &Lab, want: Option<&str>) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (node, generation) = pod4_node(lab);
        if node.as_deref() == want {
            return generation;
        }
        assert!(
            Instant::now() < deadline,
            "pod4's CIDR not routed to {want:?} within 10 s: {}",
            lab.trace(TO_POD4)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits (≤ 5 s) until every worker runs snapshot generation `generation` or later.
fn wait_workers(lab: &Lab, generation: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, body) = http_get(&lab.admin, "/metrics").expect("metrics");
        let workers: Vec<u64> = body
            .lines()
            .filter(|l| l.starts_with("servicegate_worker_snapshot_generation{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .map(|g| g as u64)
            .collect();
        if !workers.is_empty() && workers.iter().all(|&g| g >= generation) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "workers at {workers:?}, not at generation {generation} within 5 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The NodePort frontend's backend addresses in `/v1/services`.
fn node_port_backends(lab: &Lab) -> Vec<String> {
    let (code, body) = http_get(&lab.admin, "/v1/services").expect("GET /v1/services");
    assert_eq!(code, 200, "/v1/services: {body}");
    let services: Value = serde_json::from_str(&body).expect("/v1/services is JSON");
    let frontend = services["frontends"]
        .as_array()
        .expect("frontends")
        .iter()
        .find(|f| f["kind"] == "NodePort" && f["port"] == NODE_PORT)
        .unwrap_or_else(|| panic!("no NodePort {NODE_PORT} frontend: {services}"));
    frontend["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .filter_map(|b| b["address"].as_str().map(str::to_owned))
        .collect()
}

fn wait_node_port_backend(lab: &Lab, addr: &str, present: bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let backends = node_port_backends(lab);
        if backends.iter().any(|b| b == addr) == present {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{addr} {} the NodePort's backends within 10 s: {backends:?}",
            if present { "not in" } else { "still in" }
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A pod's figures in a load run: (connections it answered, first and last start, unix s).
fn answered(load: &Value, pod: &str) -> Option<(u64, f64, f64)> {
    let b = &load["backends"][pod];
    Some((
        b["count"].as_u64()?,
        b["first"].as_f64()?,
        b["last"].as_f64()?,
    ))
}

fn load_summary(what: &str, load: &Value) {
    let mut pods: Vec<String> = load["backends"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(pod, b)| format!("{pod} {}", b["count"]))
                .collect()
        })
        .unwrap_or_default();
    pods.sort();
    figure(format!(
        "{what}: {} new connections, {} failed, {} slower than 0.5 s, median {} ms, max {} ms; answered by {}",
        load["total"],
        load["failed"],
        load["slow"],
        load["median_ms"],
        load["max_ms"],
        pods.join(", ")
    ));
}

fn start_load(lab: &Lab, name: &str) -> (Background, std::path::PathBuf) {
    let out = lab.dir.path().join(name);
    let child = lab.spawn_client(
        "client",
        &["load", URL, RATE, CLIENT, out.to_str().unwrap()],
    );
    (Background(Some(child)), out)
}

#[test]
fn a_node_joins_under_load_and_its_pod_answers_with_no_failed_request() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let server = rt.block_on(FakeApiServer::start());
    server.apply_service(web_service());
    server.apply_endpoint_slice(web_slice(&[POD1, POD2, POD3]));
    server.apply_node(flannel_node(
        "node-1",
        "10.244.1.0/24",
        "10.0.0.11",
        "02:53:47:00:01:01",
    ));
    server.apply_node(flannel_node(
        "node-2",
        "10.244.2.0/24",
        "10.0.0.12",
        "02:53:47:00:01:02",
    ));
    let lab = Lab::start("lab-nodes", |dir, config| {
        kube_config(config, &server.write_kubeconfig(dir))
    });

    // The two nodes come from the API: their pods are reached, node-3's CIDR is not routed.
    let first = lab.client("client", &["count", URL, "60"]);
    assert_eq!(first["failed"], 0, "{first}");
    for pod in ["pod1", "pod2", "pod3"] {
        assert!(
            first["counts"][pod].as_u64().unwrap_or(0) > 0,
            "{pod} answers: {first}"
        );
    }
    assert_eq!(pod4_node(&lab).0, None, "{}", lab.trace(TO_POD4));

    // Join: under load, node3 comes up, its Node object appears, then pod4 in the slice.
    let (load, out) = start_load(&lab, "join.json");
    std::thread::sleep(Duration::from_secs(2));
    lab.topology("node3");
    let applied = Instant::now();
    server.apply_node(flannel_node(
        "node-3",
        "10.244.3.0/24",
        "10.0.0.13",
        "02:53:47:00:01:03",
    ));
    let generation = wait_pod4_node(&lab, Some("node-3"));
    let known = applied.elapsed();
    wait_workers(&lab, generation);
    let on_workers = applied.elapsed();
    figure(format!(
        "Node node-3 applied -> the gateway routes 10.244.3.0/24 to it (/v1/trace): {:.0} ms; every worker on that snapshot: {:.0} ms",
        known.as_secs_f64() * 1000.0,
        on_workers.as_secs_f64() * 1000.0
    ));
    std::thread::sleep(Duration::from_secs(1));
    let slice_unix = unix_now();
    let slice_at = Instant::now();
    server.apply_endpoint_slice(web_slice(&[POD1, POD2, POD3, POD4]));
    wait_node_port_backend(&lab, POD4.0, true);
    let in_frontend = slice_at.elapsed();
    std::thread::sleep(Duration::from_secs(5));
    let join = load.finish(&out);
    load_summary("join (node3 up, Node node-3, pod4 in the slice)", &join);
    let (pod4, first4, _) = answered(&join, "pod4")
        .unwrap_or_else(|| panic!("pod4 never answered after it joined: {join}"));
    figure(format!(
        "slice with pod4 applied -> pod4 a NodePort backend (/v1/services): {:.0} ms; -> the first new connection pod4 answered started after {:.0} ms",
        in_frontend.as_secs_f64() * 1000.0,
        (first4 - slice_unix) * 1000.0
    ));
    assert_eq!(
        join["failed"], 0,
        "failed requests while node-3 joined: {join}"
    );
    assert!(
        first4 >= slice_unix,
        "pod4 answered a connection started before it was in the slice: {join}"
    );
    assert!(pod4 > 0);
    for pod in ["pod1", "pod2", "pod3"] {
        let (_, _, last) = answered(&join, pod).unwrap_or_else(|| panic!("{pod}: {join}"));
        assert!(
            last > slice_unix,
            "{pod} still answers after the join: {join}"
        );
    }

    // Leave: Node node-3 is deleted (pod4 still listed in the slice): the gateway stops
    // using its endpoint and its pod CIDR; the other pods keep answering.
    let (load, out) = start_load(&lab, "leave.json");
    std::thread::sleep(Duration::from_secs(2));
    let deleted_unix = unix_now();
    let deleted_at = Instant::now();
    server.delete_node("node-3").expect("node-3 exists");
    let generation = wait_pod4_node(&lab, None);
    let forgotten = deleted_at.elapsed();
    wait_workers(&lab, generation);
    // From here no worker can pick pod4.
    let forgotten_unix = unix_now();
    assert!(
        !node_port_backends(&lab).iter().any(|b| b == POD4.0),
        "pod4 on a deleted node is still a backend: {:?}",
        node_port_backends(&lab)
    );
    std::thread::sleep(Duration::from_secs(3));
    let leave = load.finish(&out);
    load_summary(
        "leave (Node node-3 deleted, pod4 still in the slice)",
        &leave,
    );
    figure(format!(
        "Node node-3 deleted -> the gateway no longer routes 10.244.3.0/24 nor uses pod4: {:.0} ms",
        forgotten.as_secs_f64() * 1000.0
    ));
    let (_, _, last4) = answered(&leave, "pod4")
        .unwrap_or_else(|| panic!("pod4 answered before the leave: {leave}"));
    assert!(
        last4 < forgotten_unix,
        "pod4 got a new connection after the gateway forgot node-3: {leave}"
    );
    for pod in ["pod1", "pod2", "pod3"] {
        let (_, _, last) = answered(&leave, pod).unwrap_or_else(|| panic!("{pod}: {leave}"));
        assert!(
            last > forgotten_unix,
            "{pod} answers after the leave: {leave}"
        );
    }
    // A connection pod4 had accepted and not finished when its node went away loses its
    // route: that one may fail (the node and its pods are gone). Nothing else may.
    let failures = leave["failures"].as_array().expect("failures");
    let in_flight = failures
        .iter()
        .filter(|f| {
            let t = f["t"].as_f64().unwrap_or(0.0);
            (deleted_unix - 3.5..forgotten_unix).contains(&t)
        })
        .count();
    figure(format!(
        "leave: {} failed, {in_flight} of them started before the gateway forgot node-3 (in flight to pod4)",
        failures.len()
    ));
    assert_eq!(
        failures.len(),
        in_flight,
        "failed requests not explained by node-3 leaving: {leave}"
    );
    assert!(in_flight <= 2, "{leave}");
}
