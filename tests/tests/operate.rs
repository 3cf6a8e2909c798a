//! Operating a gateway with the tools the field uses, against a running `servicegate run`
//! on net_tap ports (EAL `--no-huge`): Debian's `prometheus` scrapes it, loads the shipped
//! alerting rules and answers queries over its HTTP API; every panel of the shipped Grafana
//! dashboard is a valid query over series the gateway exposes; `dpdk-telemetry.py` (the dpdk
//! package) reads servicegate's own telemetry commands beside ethdev's.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use control::ctl::url_encode;
use dataplane::stats::DropReason;
use serde_json::Value;
use tests::harness::{
    http_get, require_root, sh, unique_name, wait_for_link, workspace_root, ChildGuard, Gateway,
    Netns, TempDir,
};

/// A port on loopback nobody listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A gateway with an uplink and a cluster tap serving the lab's Services; the uplink's
/// kernel side sits in `client`, addressed 192.0.2.2/24 (the gateway is 192.0.2.1).
struct RunningGateway {
    gateway: Gateway,
    client: Netns,
    file_prefix: String,
    _dir: TempDir,
}

fn start_gateway(tag: &str) -> RunningGateway {
    let dir = TempDir::new(tag);
    let (uplink, cluster) = (unique_name("sgou"), unique_name("sgoc"));
    let file_prefix = unique_name("sgop");
    let admin = format!("127.0.0.1:{}", free_port());
    let id = std::process::id() % 1000;
    let config = format!(
        "eal:\n  args: [\"--no-huge\", \"-m\", \"512\", \"--log-level=*:warning\"]\n  no_pci: true\n  file_prefix: {file_prefix}\n\
         cores:\n  control: 0\n  workers: [1]\n  idle_sleep_us: 20\n\
         ports:\n\
         \x20 - name: uplink\n    device: \"net_tap{id},iface={uplink}\"\n    role: uplink\n    addresses: [192.0.2.1/24]\n\
         \x20 - name: cluster\n    device: \"net_tap{},iface={cluster}\"\n    role: cluster\n    addresses: [10.0.0.1/24]\n\
         services:\n  source: files\n  path: {}\n\
         admin:\n  listen: {admin}\n",
        id + 1,
        workspace_root().join("configs/lab").display()
    );
    let path = dir.path().join("gateway.yaml");
    std::fs::write(&path, config).expect("write config");
    let mut gateway = Gateway::start(&path, &admin);
    gateway.wait_ready(Duration::from_secs(30));
    wait_for_link(&uplink, Duration::from_secs(20));
    let client = Netns::new("sgoc");
    sh("ip", &["link", "set", &uplink, "netns", &client.name]);
    client.exec(&["ip", "addr", "add", "192.0.2.2/24", "dev", &uplink]);
    client.exec(&["ip", "link", "set", &uplink, "up"]);
    RunningGateway {
        gateway,
        client,
        file_prefix,
        _dir: dir,
    }
}

/// GET `path` of `addr`, expecting 200 and JSON.
fn get_json(addr: &str, path: &str) -> Value {
    let (code, body) = http_get(addr, path).unwrap_or_else(|e| panic!("GET {path}: {e}"));
    assert_eq!(code, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
}

/// An instant query through Prometheus's HTTP API: the result vector.
fn query(prometheus: &str, promql: &str) -> Vec<Value> {
    let v = get_json(
        prometheus,
        &format!("/api/v1/query?query={}", url_encode(promql)),
    );
    assert_eq!(v["status"], "success", "{promql}: {v}");
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

/// The value of a one-sample result.
fn value(result: &[Value]) -> f64 {
    assert_eq!(result.len(), 1, "{result:?}");
    result[0]["value"][1]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no value in {result:?}"))
}

/// Debian's `prometheus` scraping `target` every second with the shipped rules, on a free
/// loopback port with its own storage; killed on drop.
struct Prometheus {
    _child: ChildGuard,
    addr: String,
}

fn start_prometheus(dir: &Path, target: &str) -> Prometheus {
    let rules = workspace_root().join("configs/prometheus/servicegate.rules.yml");
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files: [\"{}\"]\n\
             scrape_configs:\n  - job_name: servicegate\n    static_configs:\n      - targets: [\"{target}\"]\n",
            rules.display()
        ),
    )
    .expect("write prometheus.yml");
    let addr = format!("127.0.0.1:{}", free_port());
    let log = std::fs::File::create(dir.join("prometheus.log")).expect("log");
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={addr}"))
        .arg("--log.level=warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("prometheus (apt-get install prometheus; .ci/install-deps does)");
    let prometheus = Prometheus {
        _child: ChildGuard(child),
        addr,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !matches!(http_get(&prometheus.addr, "/-/ready"), Ok((200, _))) {
        assert!(
            Instant::now() < deadline,
            "prometheus not ready in 30 s: {}",
            std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    prometheus
}

/// Polls `promql` until it returns one sample satisfying `ok`, for at most `timeout`.
fn wait_for(prometheus: &str, promql: &str, timeout: Duration, ok: impl Fn(f64) -> bool) -> f64 {
    let started = Instant::now();
    loop {
        let result = query(prometheus, promql);
        if result.len() == 1 {
            let v = value(&result);
            if ok(v) {
                println!(
                    "{promql} = {v} after {:.1} s",
                    started.elapsed().as_secs_f64()
                );
                return v;
            }
        }
        assert!(
            started.elapsed() < timeout,
            "{promql} not as expected within {timeout:?}: {result:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The names of the series a `/metrics` body (classic format) has samples of.
fn exposed_names(metrics: &str) -> BTreeSet<String> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap_or_default().to_string())
        .collect()
}

/// `servicegate_*` names a PromQL expression reads.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("servicegate_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

fn dashboard() -> Value {
    let path: PathBuf = workspace_root().join("configs/grafana/servicegate.json");
    let text = std::fs::read_to_string(&path).expect("configs/grafana/servicegate.json");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn prometheus_scrapes_the_gateway_evaluates_the_rules_and_the_dashboard_queries() {
    require_root();
    let g = start_gateway("prom");
    // Traffic on the uplink: ARP and pings to the gateway's address (it has no exception
    // port, so the pings are dropped under their reason).
    g.client
        .exec_any(&["ping", "-c", "3", "-i", "0.2", "-W", "1", "192.0.2.1"]);
    let admin = g.gateway.admin.clone();

    // The live exposition passes promtool's lint.
    let (code, metrics) = http_get(&admin, "/metrics").expect("GET /metrics");
    assert_eq!(code, 200);
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    std::io::Write::write_all(&mut promtool.stdin.take().unwrap(), metrics.as_bytes()).unwrap();
    let lint = promtool.wait_with_output().unwrap();
    assert!(
        lint.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&lint.stdout),
        String::from_utf8_lossy(&lint.stderr)
    );

    let dir = TempDir::new("prometheus");
    let p = start_prometheus(dir.path(), &admin);
    let prom = p.addr.as_str();
    wait_for(
        prom,
        "up{job=\"servicegate\"}",
        Duration::from_secs(30),
        |v| v == 1.0,
    );
    wait_for(prom, "servicegate_ready", Duration::from_secs(30), |v| {
        v == 1.0
    });
    // What the gateway counted reaches Prometheus, labelled as /metrics labels it.
    let rx = wait_for(
        prom,
        "servicegate_rx_packets_total{port=\"uplink\"}",
        Duration::from_secs(30),
        |v| v >= 3.0,
    );
    assert!(rx >= 3.0);
    let reasons = query(prom, "servicegate_drops_total");
    assert_eq!(reasons.len(), DropReason::ALL.len(), "{reasons:?}");
    let web = query(
        prom,
        "servicegate_service_packets_total{service=\"lab/web\",kind=\"ClusterIP\"}",
    );
    assert_eq!(web.len(), 1, "{web:?}");
    assert_eq!(
        value(&query(
            prom,
            "count(servicegate_burst_latency_seconds_bucket{le=\"+Inf\"})"
        )),
        1.0
    );
    assert_eq!(
        value(&query(prom, "max(servicegate_conntrack_capacity)")),
        262_144.0
    );

    // Every shipped rule loaded and evaluates without error; none fires on a healthy gateway.
    std::thread::sleep(Duration::from_secs(2));
    let rules = get_json(prom, "/api/v1/rules");
    let groups = rules["data"]["groups"].as_array().expect("rule groups");
    let all: Vec<&Value> = groups
        .iter()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .collect();
    let names: Vec<&str> = all.iter().filter_map(|r| r["name"].as_str()).collect();
    for needed in [
        "ServicegateNotReady",
        "ServicegateDropsHigh",
        "ServicegateConntrackNearlyFull",
        "ServicegateSnapshotLagging",
        "ServicegateWorkerStalled",
    ] {
        assert!(names.contains(&needed), "{needed} missing from {names:?}");
    }
    for rule in &all {
        assert_eq!(rule["health"], "ok", "{rule}");
        assert_eq!(
            rule["state"], "inactive",
            "fires on a healthy gateway: {rule}"
        );
    }
    println!("{} rules loaded and evaluated", all.len());

    // Every dashboard panel: a valid query over series the gateway exposes.
    let exposed = exposed_names(&metrics);
    let dashboard = dashboard();
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut exprs = 0;
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or("?");
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {title} has no query");
        for target in targets {
            let expr = target["expr"].as_str().expect("expr");
            let names = metric_names(expr);
            assert!(
                !names.is_empty(),
                "{title}: {expr} reads no servicegate_ metric"
            );
            for name in names {
                assert!(
                    exposed.contains(&name),
                    "{title}: {name} is not in /metrics"
                );
            }
            let promql = expr
                .replace("$__rate_interval", "5s")
                .replace("$instance", ".*");
            query(prom, &promql);
            exprs += 1;
        }
    }
    println!("{} panels, {exprs} queries", panels.len());
    for topic in [
        "servicegate_rx_packets_total",
        "servicegate_drops_total",
        "servicegate_conntrack_entries",
        "servicegate_burst_latency_seconds_bucket",
        "servicegate_service_packets_total",
        "servicegate_ready",
    ] {
        assert!(
            panels.iter().any(|p| p["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|t| t["expr"].as_str().unwrap_or("").contains(topic))),
            "no panel reads {topic}"
        );
    }
    drop(p);
    let (ok, out, err) = g.gateway.stop();
    assert!(ok, "gateway did not exit 0:\n{out}\n{err}");
}

/// Runs `dpdk-telemetry.py -f PREFIX` (the dpdk package's client) with `commands` on stdin;
/// one JSON answer per command.
fn telemetry(file_prefix: &str, commands: &[&str]) -> Vec<Value> {
    let mut child = Command::new("dpdk-telemetry.py")
        .args(["-f", file_prefix])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("dpdk-telemetry.py (the dpdk package)");
    let input = commands.join("\n") + "\n";
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "dpdk-telemetry.py: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // It prints the connection banner (a JSON object) first, then one object per command.
    let answers: Vec<Value> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l.trim().trim_start_matches("--> ")).ok())
        .filter(|v| v.get("version").is_none())
        .collect();
    assert_eq!(answers.len(), commands.len(), "{stdout}");
    answers
}

#[test]
fn dpdk_telemetry_answers_servicegates_own_commands() {
    require_root();
    let g = start_gateway("tel");
    g.client
        .exec_any(&["ping", "-c", "2", "-i", "0.2", "-W", "1", "192.0.2.1"]);
    // The counters reach the workers' published stats within a publish period.
    std::thread::sleep(Duration::from_millis(500));
    let answers = telemetry(
        &g.file_prefix,
        &[
            "/",
            "/servicegate/services",
            "/servicegate/workers",
            "/servicegate/conntrack/summary",
            "/help,/servicegate/services",
            "/servicegate/services,3",
        ],
    );
    let commands = answers[0]["/"].as_array().expect("command list");
    for cmd in [
        "/servicegate/services",
        "/servicegate/workers",
        "/servicegate/conntrack/summary",
        "/ethdev/stats",
    ] {
        assert!(
            commands.iter().any(|c| c == cmd),
            "{cmd} not listed: {commands:?}"
        );
    }
    let services = &answers[1]["/servicegate/services"];
    let metrics_services = get_json(&g.gateway.admin, "/v1/services");
    let frontends = metrics_services["frontends"].as_array().unwrap();
    assert_eq!(services["frontends"], frontends.len(), "{services}");
    assert_eq!(services["generation"], metrics_services["generation"]);
    assert_eq!(services["ready"], 1);
    assert_eq!(services["offset"], 0);
    assert_eq!(services["shown"], frontends.len());
    for (i, f) in frontends.iter().enumerate() {
        let t = &services[i.to_string()];
        assert_eq!(t["service"], f["service"], "{t}");
        assert_eq!(t["kind"], f["kind"], "{t}");
        assert_eq!(t["protocol"], f["protocol"], "{t}");
        assert_eq!(
            t["backends"],
            f["backends"].as_array().unwrap().len(),
            "{t}"
        );
    }
    let workers = &answers[2]["/servicegate/workers"];
    assert_eq!(workers["workers"], 1, "{workers}");
    let w0 = &workers["0"];
    assert_eq!(w0["generation"], services["generation"], "{workers}");
    assert!(w0["rx_packets"].as_u64().unwrap() >= 2, "{workers}");
    assert!(w0["bursts"].as_u64().unwrap() >= 1, "{workers}");
    let ct = &answers[3]["/servicegate/conntrack/summary"];
    assert_eq!(ct["capacity_per_worker"], 262_144, "{ct}");
    assert_eq!(ct["capacity"], 262_144, "{ct}");
    assert_eq!(
        ct["entries_per_worker"].as_array().map(Vec::len),
        Some(1),
        "{ct}"
    );
    assert!(answers[4]["/help"]["/servicegate/services"]
        .as_str()
        .is_some_and(|h| h.contains("offset")));
    // A page from offset 3: the rest of the frontends, numbered from 3.
    let page = &answers[5]["/servicegate/services"];
    assert_eq!(page["offset"], 3, "{page}");
    assert_eq!(page["shown"], frontends.len().saturating_sub(3), "{page}");
    assert_eq!(page["3"]["service"], frontends[3]["service"], "{page}");
    println!("telemetry: {services}\n{workers}\n{ct}");
    let (ok, out, err) = g.gateway.stop();
    assert!(ok, "gateway did not exit 0:\n{out}\n{err}");
}
