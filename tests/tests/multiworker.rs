//! Two workers on two queues per port (net_tap needs as many rx as tx queues, and every
//! worker has a tx queue, so single-queue taps cannot serve two workers). Port p's queue q
//! goes to worker (p + q) % workers; the kernel spreads flows over a tap's queues by flow
//! hash, so a NodePort+SNAT flow's request (uplink) and reply (cluster port) often arrive at
//! different workers, and the non-owner hands the frame to the flow's owner. Real kernels on both ends (taps in two
//! namespaces): a client curling the NodePort, a backend pod's HTTP server.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tests::harness::{
    http_get, require_root, sh, unique_name, wait_for_link, workspace_root, Gateway, Netns, TempDir,
};

const CONNECTIONS: usize = 40;
const BACKEND: &str = "10.0.0.50";

const MANIFESTS: &str = "apiVersion: v1
kind: Service
metadata:
  name: web-nodeport
  namespace: mw
spec:
  type: NodePort
  clusterIP: 10.96.0.11
  clusterIPs: [10.96.0.11]
  ports:
    - name: http
      protocol: TCP
      port: 80
      targetPort: 9376
      nodePort: 30080
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-nodeport-abc12
  namespace: mw
  labels:
    kubernetes.io/service-name: web-nodeport
addressType: IPv4
ports:
  - name: http
    protocol: TCP
    port: 9376
endpoints:
  - addresses: [\"10.0.0.50\"]
    conditions: {ready: true, serving: true, terminating: false}
";

/// Sequential HTTP/1.0 GETs on fresh connections (fresh source ports, so flows hash to
/// both workers); prints `ok N` and every bad answer.
const CLIENT: &str = r#"
import socket, sys
n, ok = int(sys.argv[1]), 0
for i in range(n):
    try:
        s = socket.create_connection(("192.168.100.1", 30080), timeout=5)
        s.settimeout(5)
        s.sendall(b"GET / HTTP/1.0\r\nHost: web\r\n\r\n")
        data = b""
        while True:
            d = s.recv(4096)
            if not d:
                break
            data += d
        s.close()
        if data.startswith(b"HTTP/1.1 200") and data.endswith(b"\r\n\r\nbackend\n"):
            ok += 1
        else:
            print("bad answer", i, data)
    except Exception as e:
        print("failed", i, e)
print("ok", ok)
"#;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

fn config(dir: &Path, uplink: &str, cluster: &str, admin: &str) -> PathBuf {
    let manifests = dir.join("manifests");
    std::fs::create_dir_all(&manifests).expect("manifests dir");
    std::fs::write(manifests.join("web.yaml"), MANIFESTS).expect("write manifests");
    let text = format!(
        "mode: gateway
eal:
  args: [\"--no-huge\", \"-m\", \"1024\", \"--log-level=*:warning\"]
  no_pci: true
  file_prefix: {prefix}
cores:
  control: 0
  workers: [0, 1]
  idle_sleep_us: 20
ports:
  - name: uplink
    device: \"net_tap0,iface={uplink},mac=02:53:47:00:00:01\"
    role: uplink
    queues: 2
    addresses: [192.168.100.1/24]
  - name: cluster
    device: \"net_tap1,iface={cluster},mac=02:53:47:00:00:02\"
    role: cluster
    queues: 2
    addresses: [10.0.0.1/24]
services:
  source: files
  path: {manifests}
  service_cidr: 10.96.0.0/12
admin:
  listen: {admin}
",
        prefix = unique_name("sgm"),
        manifests = manifests.display(),
    );
    let path = dir.join("gateway.yaml");
    std::fs::write(&path, text).expect("write config");
    path
}

/// `name{labels} value` samples of one metric family: (labels, value).
fn metric(admin: &str, name: &str) -> Vec<(String, f64)> {
    samples_of(&scrape(admin), name)
}

fn scrape(admin: &str) -> String {
    let (code, body) = http_get(admin, "/metrics").expect("GET /metrics");
    assert_eq!(code, 200, "/metrics: {body}");
    body
}

/// The samples of family `name` in a scrape: (labels, value).
fn samples_of(body: &str, name: &str) -> Vec<(String, f64)> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            let (metric, labels) = key.split_once('{').unwrap_or((key, ""));
            if metric != name {
                return None;
            }
            Some((labels.trim_end_matches('}').to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// Workers publish their counters every 10 ms, each on its own clock, and the last
/// segments of a connection (FIN, final ACK) may still be crossing when the client returns:
/// a single scrape can catch one worker's hand-off before the other's takeover. Scrape
/// until two reads 200 ms apart agree.
fn settled_metric(admin: &str, name: &str) -> Vec<(String, f64)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut previous = metric(admin, name);
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let current = metric(admin, name);
        if current == previous || Instant::now() > deadline {
            return current;
        }
        previous = current;
    }
}

fn sample(samples: &[(String, f64)], labels: &str) -> f64 {
    samples
        .iter()
        .find(|(l, _)| l == labels)
        .map(|(_, v)| *v)
        .unwrap_or_else(|| panic!("no sample {{{labels}}} in {samples:?}"))
}

#[test]
fn nodeport_snat_flows_cross_workers_and_are_handed_to_their_owner() {
    require_root();
    let dir = TempDir::new("mw");
    let (uplink, cluster) = (unique_name("sgu"), unique_name("sgc"));
    let admin = format!("127.0.0.1:{}", free_port());
    let config = config(dir.path(), &uplink, &cluster, &admin);
    let mut gateway = Gateway::start(&config, &admin);
    // The ports are started once ready; only then may the taps move.
    gateway.wait_ready(Duration::from_secs(60));
    wait_for_link(&uplink, Duration::from_secs(20));
    wait_for_link(&cluster, Duration::from_secs(20));

    let client = Netns::new("sgmc");
    let backend = Netns::new("sgmb");
    // net_tap gives the kernel side the DPDK port's MAC: give each kernel its own.
    sh("ip", &["link", "set", &uplink, "netns", &client.name]);
    client.exec(&["ip", "link", "set", &uplink, "address", "02:53:47:00:ff:01"]);
    client.exec(&["ip", "addr", "add", "192.168.100.2/24", "dev", &uplink]);
    client.exec(&["ip", "link", "set", &uplink, "up"]);
    sh("ip", &["link", "set", &cluster, "netns", &backend.name]);
    backend.exec(&[
        "ip",
        "link",
        "set",
        &cluster,
        "address",
        "02:53:47:00:ff:02",
    ]);
    backend.exec(&[
        "ip",
        "addr",
        "add",
        &format!("{BACKEND}/24"),
        "dev",
        &cluster,
    ]);
    backend.exec(&["ip", "link", "set", &cluster, "up"]);

    let pod = workspace_root().join("tests/lab/pod.py");
    let _server = backend.spawn(&["python3", &pod.display().to_string(), "backend"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    let probe = format!("import socket; socket.create_connection(('{BACKEND}', 9376), 0.2)");
    while !backend
        .exec_any(&["python3", "-c", &probe])
        .status
        .success()
    {
        assert!(Instant::now() < deadline, "backend server did not listen");
        std::thread::sleep(Duration::from_millis(100));
    }

    let started = Instant::now();
    let run = client.exec_any(&["python3", "-c", CLIENT, &CONNECTIONS.to_string()]);
    let elapsed = started.elapsed();
    let out = String::from_utf8_lossy(&run.stdout).to_string();
    let handoffs = settled_metric(&admin, "servicegate_handoffs_total");
    let inserts = metric(&admin, "servicegate_conntrack_inserts_total");
    // One scrape, so the driver's per-queue and per-port counters are of the same read.
    let counters = scrape(&admin);
    let (ok, gw_out, gw_err) = gateway.stop();
    assert!(
        out.contains(&format!("ok {CONNECTIONS}\n")),
        "not every connection succeeded:\n{out}{}\nhandoffs {handoffs:?}\ngateway:\n{gw_out}\n{gw_err}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(ok, "gateway did not exit 0:\n{gw_out}\n{gw_err}");

    // Both workers own flows (their conntrack shards got entries) ...
    for w in ["0", "1"] {
        let n = sample(&inserts, &format!("worker=\"{w}\""));
        assert!(n > 0.0, "worker {w} owns no flow: {inserts:?}");
    }
    // ... and each hands frames to the other: worker 0 (uplink) passes requests of worker
    // 1's flows, worker 1 (cluster port) passes replies to worker 0's SNAT ports.
    let at = |w: &str, d: &str| sample(&handoffs, &format!("worker=\"{w}\",direction=\"{d}\""));
    for w in ["0", "1"] {
        assert!(
            at(w, "out") > 0.0,
            "worker {w} handed nothing off: {handoffs:?}"
        );
        assert!(
            at(w, "in") > 0.0,
            "worker {w} took nothing over: {handoffs:?}"
        );
    }
    assert_eq!(
        at("0", "out") + at("1", "out"),
        at("0", "in") + at("1", "in"),
        "every hand-off is taken over: {handoffs:?}"
    );
    assert!(gw_out.contains("mbufs in use after stop: 0"), "{gw_out}");

    // The driver's per-queue counters (net_tap keeps them): both queues of each port are
    // exported, they add up to the port's own counters, and the traffic shows in them.
    for port in ["uplink", "cluster"] {
        for dir in ["rx", "tx"] {
            let total = |unit: &str| {
                sample(
                    &samples_of(&counters, &format!("servicegate_port_{dir}_{unit}_total")),
                    &format!("port=\"{port}\""),
                )
            };
            let queues = |unit: &str| -> Vec<f64> {
                let family = samples_of(
                    &counters,
                    &format!("servicegate_port_queue_{dir}_{unit}_total"),
                );
                ["0", "1"]
                    .map(|q| sample(&family, &format!("port=\"{port}\",queue=\"{q}\"")))
                    .to_vec()
            };
            let (packets, bytes) = (queues("packets"), queues("bytes"));
            assert_eq!(
                packets.iter().sum::<f64>(),
                total("packets"),
                "{port} {dir} packets per queue {packets:?}"
            );
            assert_eq!(
                bytes.iter().sum::<f64>(),
                total("bytes"),
                "{port} {dir} bytes per queue {bytes:?}"
            );
            // 40 connections: at least SYN, request, FIN each way through every port.
            assert!(
                packets.iter().sum::<f64>() >= (3 * CONNECTIONS) as f64,
                "{port} {dir} packets per queue {packets:?}"
            );
            for (p, b) in packets.iter().zip(&bytes) {
                // Every frame is at least an ARP's 42 bytes.
                assert!(*b >= 42.0 * p, "{port} {dir}: {p} packets, {b} bytes");
            }
        }
    }
    eprintln!(
        "{CONNECTIONS} connections in {elapsed:?}; handoffs {handoffs:?}; conntrack inserts {inserts:?}"
    );
}
