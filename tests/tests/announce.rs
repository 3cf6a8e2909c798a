//! Issue 18, items 1 and 2 on one real gateway (no BIRD: the kernel table BIRD would learn
//! is read directly). servicegate with an uplink tap (client namespace), a cluster tap
//! (backend namespace), a spare port whose tap stays in this namespace (its link is the
//! "port down" trigger) and the uplink's exception tap moved into the gateway's kernel
//! namespace, where the announced routes live (`ip -n NS route show table 100`).
//!
//! Shown, with the time each took (printed as `announce figure:` lines):
//! - a previous instance's leftover route is flushed; nothing is announced before ready;
//! - announced once ready: the LoadBalancer IP with a usable endpoint and the extra prefix,
//!   not the one without endpoints;
//! - a route deleted by hand comes back; the last endpoint going withdraws its /32;
//! - a port going down withdraws everything (and `/readyz` says why), up announces again;
//! - SIGTERM withdraws at once, `/readyz` says draining, connections through the VIP keep
//!   working during `drain_seconds`, then the process exits 0;
//! - `kill -9`: the kernel removes the routes with the tap.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tests::harness::{
    http_get, require_root, servicegate_bin, sh, unique_name, wait_for_link, workspace_root,
    Gateway, Netns, TempDir,
};

const VIP: &str = "203.0.113.10";
const EMPTY_VIP: &str = "203.0.113.20";
const EXTRA: &str = "10.96.0.0/12";
const BACKEND: &str = "10.0.0.50";
const TABLE: &str = "100";
const DRAIN_SECONDS: u64 = 3;

fn manifests(ready: bool) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: web, namespace: an}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.11
  clusterIPs: [10.96.0.11]
  ports: [{{name: http, protocol: TCP, port: 80, targetPort: 9376, nodePort: 30080}}]
status:
  loadBalancer:
    ingress: [{{ip: {VIP}}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: an
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{{name: http, protocol: TCP, port: 9376}}]
endpoints:
  - addresses: [\"{BACKEND}\"]
    conditions: {{ready: {ready}, serving: {ready}, terminating: false}}
---
apiVersion: v1
kind: Service
metadata: {{name: empty, namespace: an}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.12
  clusterIPs: [10.96.0.12]
  ports: [{{name: http, protocol: TCP, port: 80, targetPort: 9376, nodePort: 30081}}]
status:
  loadBalancer:
    ingress: [{{ip: {EMPTY_VIP}}}]
"
    )
}

struct Taps {
    uplink: String,
    cluster: String,
    spare: String,
    exception: String,
}

fn config(dir: &Path, taps: &Taps, gw_ns: &str, admin: &str) -> PathBuf {
    let manifests_dir = dir.join("manifests");
    std::fs::create_dir_all(&manifests_dir).expect("manifests dir");
    std::fs::write(manifests_dir.join("web.yaml"), manifests(true)).expect("write manifests");
    let text = format!(
        "eal:
  args: [\"--no-huge\", \"-m\", \"512\", \"--log-level=*:warning\"]
  no_pci: true
  file_prefix: {prefix}
cores: {{control: 0, workers: [1], idle_sleep_us: 20}}
ports:
  - name: uplink
    device: \"net_tap0,iface={uplink},mac=02:53:47:00:00:01\"
    role: uplink
    addresses: [192.168.100.1/24]
    exception: \"net_tap3,iface={exception}\"
  - name: cluster
    device: \"net_tap1,iface={cluster},mac=02:53:47:00:00:02\"
    role: cluster
    addresses: [10.0.0.1/24]
  - name: spare
    device: \"net_tap2,iface={spare},mac=02:53:47:00:00:03\"
    role: cluster
services:
  source: files
  path: {manifests}
  poll_ms: 50
announce:
  enabled: true
  netns: {gw_ns}
  table: {TABLE}
  extra_prefixes: [{EXTRA}]
drain_seconds: {DRAIN_SECONDS}
admin:
  listen: {admin}
",
        prefix = unique_name("sga"),
        uplink = taps.uplink,
        cluster = taps.cluster,
        spare = taps.spare,
        exception = taps.exception,
        manifests = manifests_dir.display(),
    );
    let path = dir.join("gateway.yaml");
    std::fs::write(&path, text).expect("write config");
    path
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// The destinations of `table`'s routes in `ns` (`203.0.113.10/32` form).
fn table_routes(ns: &Netns) -> BTreeSet<String> {
    let out = ns.exec_any(&["ip", "-4", "-j", "route", "show", "table", TABLE]);
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || text.trim().is_empty() {
        // The kernel drops a table with its last route.
        return BTreeSet::new();
    }
    let routes: serde_json::Value = serde_json::from_str(&text).expect("ip -j output");
    routes
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["dst"].as_str())
        .map(|d| {
            if d.contains('/') {
                d.to_string()
            } else {
                format!("{d}/32")
            }
        })
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// Polls the table every few milliseconds until `check` holds; returns how long it took.
fn wait_table(
    ns: &Netns,
    what: &str,
    timeout: Duration,
    check: impl Fn(&BTreeSet<String>) -> bool,
) -> Duration {
    let started = Instant::now();
    loop {
        let routes = table_routes(ns);
        if check(&routes) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < timeout,
            "{what}: not within {timeout:?}; table {TABLE} holds {routes:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn ctl_announcements(admin: &str) -> String {
    let out = Command::new(servicegate_bin())
        .args(["ctl", "announcements", "--admin", admin])
        .output()
        .expect("servicegate ctl");
    assert!(
        out.status.success(),
        "ctl announcements: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn metric(admin: &str, line_prefix: &str) -> Option<f64> {
    let (_, body) = http_get(admin, "/metrics").expect("metrics");
    body.lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// New HTTP connections to the VIP for `seconds`, one every 50 ms; prints `ok N failed M`.
const CLIENT: &str = r#"
import socket, sys, time
vip, seconds = sys.argv[1], float(sys.argv[2])
ok = failed = 0
end = time.time() + seconds
while time.time() < end:
    try:
        s = socket.create_connection((vip, 80), timeout=2)
        s.settimeout(2)
        s.sendall(b"GET / HTTP/1.0\r\nHost: web\r\n\r\n")
        data = b""
        while True:
            d = s.recv(4096)
            if not d:
                break
            data += d
        s.close()
        if data.startswith(b"HTTP/1.1 200") and data.endswith(b"backend\n"):
            ok += 1
        else:
            failed += 1
    except Exception as e:
        failed += 1
        print("failed", e, flush=True)
    time.sleep(0.05)
print("ok", ok, "failed", failed)
"#;

/// Moves `link` into `ns`, gives it `address` (and a distinct MAC: net_tap gives the
/// kernel side the DPDK port's), brings it up.
fn move_link(ns: &Netns, link: &str, mac: &str, address: Option<&str>) {
    sh("ip", &["link", "set", link, "netns", &ns.name]);
    ns.exec(&["ip", "link", "set", link, "address", mac]);
    if let Some(address) = address {
        ns.exec(&["ip", "addr", "add", address, "dev", link]);
    }
    ns.exec(&["ip", "link", "set", link, "up"]);
}

#[test]
fn announces_when_ready_withdraws_on_unready_sigterm_and_kill() {
    require_root();
    let dir = TempDir::new("ann");
    let taps = Taps {
        uplink: unique_name("sgau"),
        cluster: unique_name("sgac"),
        spare: unique_name("sgas"),
        exception: unique_name("sgae"),
    };
    let admin = format!("127.0.0.1:{}", free_port());
    let gw_kernel = Netns::new("sgak");
    let client = Netns::new("sgacl");
    let backend = Netns::new("sgabe");
    let config = config(dir.path(), &taps, &gw_kernel.name, &admin);

    // A previous instance's leftover (same table, servicegate's protocol number).
    // (A veth: the dummy module may be missing.)
    gw_kernel.exec(&[
        "ip", "link", "add", "stale0", "type", "veth", "peer", "name", "stale1",
    ]);
    gw_kernel.exec(&["ip", "link", "set", "stale0", "up"]);
    gw_kernel.exec(&[
        "ip",
        "route",
        "add",
        "198.51.100.99/32",
        "dev",
        "stale0",
        "table",
        TABLE,
        "proto",
        "200",
    ]);

    let mut gateway = Gateway::start(&config, &admin);
    gateway.wait_ready(Duration::from_secs(60));
    for tap in [&taps.uplink, &taps.cluster, &taps.spare, &taps.exception] {
        wait_for_link(tap, Duration::from_secs(20));
    }
    let flushed = wait_table(
        &gw_kernel,
        "leftover flushed",
        Duration::from_secs(5),
        |r| r.is_empty(),
    );
    eprintln!("announce figure: leftover route flushed {flushed:?} after ready");

    move_link(
        &client,
        &taps.uplink,
        "02:53:47:00:ff:01",
        Some("192.168.100.2/24"),
    );
    client.exec(&[
        "ip",
        "route",
        "add",
        "203.0.113.0/24",
        "via",
        "192.168.100.1",
    ]);
    move_link(
        &backend,
        &taps.cluster,
        "02:53:47:00:ff:02",
        Some(&format!("{BACKEND}/24")),
    );
    let pod = workspace_root().join("tests/lab/pod.py");
    let _server = backend.spawn(&["python3", &pod.display().to_string(), "backend"]);
    move_link(&gw_kernel, &taps.exception, "02:53:47:00:00:01", None);
    let expected = set(&[&format!("{VIP}/32"), EXTRA]);
    let announced = wait_table(&gw_kernel, "announced", Duration::from_secs(5), |r| {
        *r == expected
    });
    eprintln!("announce figure: announced {announced:?} after the exception tap came up");

    let text = ctl_announcements(&admin);
    eprintln!("$ servicegate ctl announcements\n{text}");
    assert!(text.contains("readiness: ready"), "{text}");
    let row = |prefix: &str| {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no row for {prefix}: {text}"))
            .to_string()
    };
    let columns = |prefix: &str| -> Vec<String> {
        row(prefix)
            .split_whitespace()
            .take(4)
            .map(str::to_string)
            .collect()
    };
    assert_eq!(
        columns(&format!("{VIP}/32")),
        [&format!("{VIP}/32"), "yes", "yes", "service"],
        "{text}"
    );
    assert_eq!(
        columns(&format!("{EMPTY_VIP}/32")),
        [&format!("{EMPTY_VIP}/32"), "no", "no", "service"],
        "{text}"
    );
    assert!(
        row(&format!("{EMPTY_VIP}/32")).ends_with("no Service port has a usable endpoint"),
        "{text}"
    );
    assert!(row(EXTRA).contains("extra"), "{text}");
    assert_eq!(
        metric(&admin, "servicegate_announced_prefixes "),
        Some(2.0),
        "gauge"
    );
    assert_eq!(
        metric(
            &admin,
            &format!(
                "servicegate_announced_prefix{{prefix=\"{VIP}/32\",reason=\"usable_endpoints\"}}"
            )
        ),
        Some(1.0)
    );
    assert_eq!(metric(&admin, "servicegate_ready "), Some(1.0));

    // Level-triggered: a route deleted behind its back comes back.
    gw_kernel.exec(&["ip", "route", "del", &format!("{VIP}/32"), "table", TABLE]);
    let restored = wait_table(&gw_kernel, "restored", Duration::from_secs(2), |r| {
        *r == expected
    });
    eprintln!("announce figure: a route deleted by hand restored in {restored:?}");

    // The last endpoint goes: its /32 is withdrawn, the extra prefix stays.
    let manifest = dir.path().join("manifests/web.yaml");
    std::fs::write(&manifest, manifests(false)).expect("rewrite manifests");
    let withdrawn = wait_table(
        &gw_kernel,
        "withdrawn without endpoints",
        Duration::from_secs(3),
        |r| *r == set(&[EXTRA]),
    );
    eprintln!("announce figure: last endpoint gone -> /32 withdrawn in {withdrawn:?} (files source polled every 50 ms)");
    std::fs::write(&manifest, manifests(true)).expect("rewrite manifests");
    wait_table(&gw_kernel, "endpoint back", Duration::from_secs(3), |r| {
        *r == expected
    });

    // A port goes down: unready, everything withdrawn; /readyz says which.
    let down_at = Instant::now();
    sh("ip", &["link", "set", &taps.spare, "down"]);
    let unready = wait_table(
        &gw_kernel,
        "withdrawn on link down",
        Duration::from_secs(3),
        |r| r.is_empty(),
    );
    eprintln!("announce figure: port down -> withdrawn in {unready:?}");
    assert!(unready < Duration::from_secs(1), "within 1 s: {unready:?}");
    let (code, body) = http_get(&admin, "/readyz").expect("readyz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("port spare: link down"), "{body}");
    assert_eq!(metric(&admin, "servicegate_ready "), Some(0.0));
    sh("ip", &["link", "set", &taps.spare, "up"]);
    let back = wait_table(
        &gw_kernel,
        "back after link up",
        Duration::from_secs(3),
        |r| *r == expected,
    );
    eprintln!(
        "announce figure: port up -> announced again in {back:?} ({:?} after it went down)",
        down_at.elapsed()
    );

    // SIGTERM under a stream of new connections to the VIP: withdrawn at once, and the
    // connections keep working while the gateway drains.
    let stream = std::process::Command::new("ip")
        .args(["netns", "exec", &client.name, "python3", "-c", CLIENT, VIP])
        .arg(format!("{}", DRAIN_SECONDS as f64 - 0.5))
        .output();
    // (The stream above ran before the signal, to show the VIP works; now the real one.)
    let before = String::from_utf8_lossy(&stream.expect("client").stdout).into_owned();
    assert!(before.contains("failed 0"), "before SIGTERM: {before}");
    let during = std::thread::spawn({
        let ns = client.name.clone();
        move || {
            std::process::Command::new("ip")
                .args(["netns", "exec", &ns, "python3", "-c", CLIENT, VIP])
                .arg(format!("{}", DRAIN_SECONDS as f64 - 0.5))
                .output()
                .expect("client")
        }
    });
    std::thread::sleep(Duration::from_millis(200));
    gateway.signal("TERM");
    let term_withdrawn = wait_table(
        &gw_kernel,
        "withdrawn on SIGTERM",
        Duration::from_secs(2),
        |r| r.is_empty(),
    );
    eprintln!("announce figure: SIGTERM -> withdrawn in {term_withdrawn:?}");
    assert!(
        term_withdrawn < Duration::from_secs(1),
        "{term_withdrawn:?}"
    );
    let (code, body) = http_get(&admin, "/readyz").expect("readyz while draining");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("draining"), "{body}");
    assert_eq!(metric(&admin, "servicegate_draining "), Some(1.0));
    let during = during.join().expect("client thread");
    let during = String::from_utf8_lossy(&during.stdout).into_owned();
    assert!(
        gateway.is_running(),
        "still forwarding during drain_seconds"
    );
    let (status, out, err) = gateway.wait_exit(Duration::from_secs(DRAIN_SECONDS + 15));
    assert!(
        status.is_some_and(|s| s.success()),
        "exit 0 after the drain ({status:?}):\n{out}\n{err}"
    );
    assert!(
        during.contains("failed 0") && !during.contains("ok 0 "),
        "connections during the drain: {during}\n{err}"
    );
    eprintln!("announce figure: during the drain: {}", during.trim());

    // kill -9: the exception tap dies with the process, its routes with it.
    let mut gateway = Gateway::start(&config, &admin);
    gateway.wait_ready(Duration::from_secs(60));
    wait_for_link(&taps.exception, Duration::from_secs(20));
    move_link(&gw_kernel, &taps.exception, "02:53:47:00:00:01", None);
    wait_table(&gw_kernel, "announced again", Duration::from_secs(5), |r| {
        *r == expected
    });
    gateway.signal("KILL");
    let killed = wait_table(
        &gw_kernel,
        "gone after kill -9",
        Duration::from_secs(5),
        |r| r.is_empty(),
    );
    eprintln!("announce figure: kill -9 -> routes gone in {killed:?}");
    assert!(killed < Duration::from_secs(1), "{killed:?}");
    let _ = gateway.wait_exit(Duration::from_secs(5));
}
