//! The gateway fleet end to end (tests/lab/fleet.sh): two real servicegate gateways, each
//! with its own BIRD announcing its Service VIPs over BGP (through the gateway's exception
//! path) to an upstream router namespace running BIRD with ECMP and a 5-tuple multipath hash;
//! kernel clients from many addresses behind the router, the pods of `make lab` behind VXLAN.
//! Every figure is printed on a line starting with `fleet figure:`.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tests::harness::{
    http_get, require_root, unique_name, workspace_root, Background, Gateway, TempDir,
};

const VIP: &str = "192.0.2.100";
const STICKY_VIP: &str = "192.0.2.101";
const CLIENTS: &str = "198.51.100.0/24";
/// The gateways' uplink addresses: the router's next hops toward them.
const NEXT_HOP: [&str; 2] = ["192.168.101.1", "192.168.102.1"];

fn figure(text: String) {
    println!("fleet figure: {text}");
}

struct Fleet {
    dir: TempDir,
    prefix: String,
    configs: [PathBuf; 2],
    admins: [String; 2],
    gateways: [Option<Gateway>; 2],
    /// When the router's route to the VIP gained or lost a gateway (unix seconds).
    fib_changes: std::cell::RefCell<Vec<f64>>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

impl Fleet {
    fn start() -> Fleet {
        require_root();
        let root = workspace_root();
        let dir = TempDir::new("fleet");
        let n = unique_name("");
        let prefix = format!("sf{}", &n[n.len().saturating_sub(6)..]);
        let services = root.join("configs/fleet/services");
        let admins = [
            format!("127.0.0.1:{}", free_port()),
            format!("127.0.0.1:{}", free_port()),
        ];
        let configs = [1, 2].map(|g| {
            let text = std::fs::read_to_string(root.join(format!("configs/fleet/gw{g}.yaml")))
                .unwrap()
                .replace("sgf", &prefix)
                .replace(&format!("127.0.0.1:991{g}"), &admins[g - 1])
                .replace("path: services", &format!("path: {}", services.display()));
            let path = dir.path().join(format!("gw{g}.yaml"));
            std::fs::write(&path, text).unwrap();
            path
        });
        let mut fleet = Fleet {
            dir,
            prefix,
            configs,
            admins,
            gateways: [None, None],
            fib_changes: Default::default(),
        };
        for g in 0..2 {
            fleet.start_gateway(g);
        }
        fleet.fleet_sh(&["up"]);
        for g in 0..2 {
            fleet.wait_announced(g, true, Duration::from_secs(30));
        }
        fleet
    }

    fn start_gateway(&mut self, g: usize) {
        let mut gateway = Gateway::start(&self.configs[g], &self.admins[g]);
        // Ports started: the taps exist and may move (readiness may wait for their links).
        gateway.wait_for_200("/healthz", Duration::from_secs(30));
        self.gateways[g] = Some(gateway);
    }

    fn fleet_sh(&self, args: &[&str]) {
        let (action, rest) = args.split_first().expect("action");
        let out = Command::new("bash")
            .arg(workspace_root().join("tests/lab/fleet.sh"))
            .arg(action)
            .arg(&self.prefix)
            .args(rest)
            .env("FLEET_DIR", self.dir.path().join("bird"))
            .output()
            .expect("fleet.sh");
        assert!(
            out.status.success() || *action == "down",
            "fleet.sh {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn ns(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    /// The router's FIB next hops for `vip` (`ip route show`), empty when it has no route.
    fn next_hops(&self, vip: &str) -> Vec<String> {
        let out = Command::new("ip")
            .args(["-n", &self.ns("router"), "route", "show", vip])
            .output()
            .expect("ip route");
        let text = String::from_utf8_lossy(&out.stdout);
        let mut hops: Vec<String> = text
            .split_whitespace()
            .collect::<Vec<_>>()
            .windows(2)
            .filter(|w| w[0] == "via")
            .map(|w| w[1].to_string())
            .collect();
        hops.sort();
        hops
    }

    /// Waits until the router's route to the VIP does (or does not) go through gateway `g`;
    /// returns how long that took.
    /// A change it waited for is recorded in `fib_changes` (unix time it was seen).
    fn wait_announced(&self, g: usize, present: bool, timeout: Duration) -> Duration {
        let start = Instant::now();
        let mut first = true;
        while start.elapsed() < timeout {
            if self.next_hops(VIP).iter().any(|h| h == NEXT_HOP[g]) == present {
                if !first {
                    self.fib_changes.borrow_mut().push(unix_now());
                }
                return start.elapsed();
            }
            first = false;
            std::thread::sleep(Duration::from_millis(2));
        }
        panic!(
            "gateway {} {} in the router's FIB within {timeout:?}: {:?}\nbird logs:\n{}",
            g + 1,
            if present { "not announced" } else { "still" },
            self.next_hops(VIP),
            self.bird_logs()
        );
    }

    fn bird_logs(&self) -> String {
        let mut text = String::new();
        for name in ["router", "gw1", "gw2"] {
            let log = self.dir.path().join("bird").join(format!("{name}.log"));
            let body = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = body.lines().rev().take(15).collect();
            text.push_str(&format!("--- {name}\n"));
            for line in tail.into_iter().rev() {
                text.push_str(line);
                text.push('\n');
            }
        }
        text
    }

    /// New conntrack entries of gateway `g` so far (every worker).
    fn inserts(&self, g: usize) -> f64 {
        let (_, body) = http_get(&self.admins[g], "/metrics").expect("metrics");
        body.lines()
            .filter(|l| l.starts_with("servicegate_conntrack_inserts_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Whether gateway `g` tracks a flow from `source` ("addr:port").
    fn tracks(&self, g: usize, source: &str) -> bool {
        let Ok((_, body)) = http_get(&self.admins[g], "/v1/conntrack?limit=100000") else {
            return false;
        };
        let needle = format!("{source} ");
        serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| {
                let rows = v.get("entries").cloned().unwrap_or(v);
                rows.as_array().cloned()
            })
            .unwrap_or_default()
            .iter()
            .any(|row| {
                row["original"]
                    .as_str()
                    .is_some_and(|o| o.contains(&needle))
            })
    }

    fn client_command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.ns("clients"), "python3"])
            .arg(workspace_root().join("tests/lab/client.py"))
            .args(args);
        command
    }

    fn client(&self, args: &[&str]) -> Value {
        let out = self.client_command(args).output().expect("client.py");
        let stdout = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "client {args:?}: {e}: {stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// A client.py mode that runs until SIGTERM and writes its result to `out`.
    fn spawn_client(&self, args: &[&str]) -> Background {
        let child = self
            .client_command(args)
            .stdout(Stdio::null())
            .spawn()
            .expect("client.py");
        Background(Some(child))
    }

    /// Steers the router's traffic from the clients to the VIPs through gateway `g` alone
    /// (a policy rule ahead of the ECMP route BIRD installed), or back to ECMP with `None`.
    fn force_gateway(&self, g: Option<usize>) {
        let router = self.ns("router");
        let _ = Command::new("ip")
            .args(["-n", &router, "rule", "del", "pref", "100"])
            .output();
        if let Some(g) = g {
            for vip in [VIP, STICKY_VIP] {
                run(&[
                    "ip",
                    "-n",
                    &router,
                    "route",
                    "replace",
                    vip,
                    "via",
                    NEXT_HOP[g],
                    "table",
                    "201",
                ]);
            }
            run(&[
                "ip", "-n", &router, "rule", "add", "iif", "clients", "lookup", "201", "pref",
                "100",
            ]);
        }
    }

    /// SIGKILL to gateway `g`; the returned thread reaps it.
    fn kill9(&mut self, g: usize) -> std::thread::JoinHandle<()> {
        let gateway = self.gateways[g].take().expect("running gateway");
        gateway.signal("KILL");
        std::thread::spawn(move || {
            let (status, _, _) = gateway.wait_exit(Duration::from_secs(10));
            assert!(status.is_some(), "a gateway survived kill -9");
        })
    }

    /// SIGTERM gateway `g` and returns the moment it was sent; the gateway is waited for
    /// (withdraw, drain, exit) by the returned thread.
    fn sigterm(&mut self, g: usize) -> (Instant, std::thread::JoinHandle<bool>) {
        let gateway = self.gateways[g].take().expect("running gateway");
        let sent = Instant::now();
        gateway.signal("TERM");
        let waiter = std::thread::spawn(move || {
            let (status, _, err) = gateway.wait_exit(Duration::from_secs(30));
            let clean = status.is_some_and(|s| s.success());
            if !clean {
                eprintln!("gateway did not exit cleanly after SIGTERM: {status:?}\n{err}");
            }
            clean
        });
        (sent, waiter)
    }

    /// Restarts gateway `g`, wires its new taps, waits until the router has it back; returns
    /// the time from start to the router's FIB having it again.
    fn restart(&mut self, g: usize) -> Duration {
        let start = Instant::now();
        self.start_gateway(g);
        self.fleet_sh(&["attach", &(g + 1).to_string()]);
        self.wait_announced(g, true, Duration::from_secs(30));
        start.elapsed()
    }
}

/// Long-lived keep-alive connections from fixed tuples, and which gateway carried each when
/// they were opened.
struct Streams {
    client: Background,
    out: PathBuf,
    through: Vec<Option<usize>>,
}

/// How the streams fared across an event on gateway `g`.
struct StreamBreaks {
    on_g: u32,
    broke_g: u32,
    on_other: u32,
    broke_other: u32,
    unknown: u32,
}

impl Fleet {
    /// Opens 20 keep-alive connections (requests every 100 ms) from ports `port_base`.. and
    /// finds which gateway tracks each.
    fn open_streams(&self, port_base: u32) -> Streams {
        let out = self.dir.path().join(format!("streams-{port_base}.json"));
        let client = self.spawn_client(&[
            "streams",
            &format!("http://{VIP}/"),
            "20",
            CLIENTS,
            &port_base.to_string(),
            out.to_str().unwrap(),
        ]);
        std::thread::sleep(Duration::from_secs(2));
        let through = (0..20)
            .map(|i| format!("198.51.100.{}:{}", i + 1, port_base + i))
            .map(|source| (0..2).find(|&g| self.tracks(g, &source)))
            .collect();
        Streams {
            client,
            out,
            through,
        }
    }
}

impl Streams {
    fn finish(self, g: usize) -> StreamBreaks {
        let result = self.client.finish(&self.out);
        let connections = result["connections"].as_array().expect("connections");
        let mut breaks = StreamBreaks {
            on_g: 0,
            broke_g: 0,
            on_other: 0,
            broke_other: 0,
            unknown: 0,
        };
        for (c, gateway) in connections.iter().zip(&self.through) {
            let broken = u32::from(!c["broken"].is_null());
            match gateway {
                Some(h) if *h == g => {
                    breaks.on_g += 1;
                    breaks.broke_g += broken;
                }
                Some(_) => {
                    breaks.on_other += 1;
                    breaks.broke_other += broken;
                }
                None => breaks.unknown += 1,
            }
        }
        breaks
    }
}

impl StreamBreaks {
    fn report(&self, what: &str, g: usize) {
        figure(format!(
            "{what}: keep-alive connections: {}/{} through gw{} broke, {}/{} through gw{} broke ({} not found in either conntrack)",
            self.broke_g,
            self.on_g,
            g + 1,
            self.broke_other,
            self.on_other,
            2 - g,
            self.unknown
        ));
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for gateway in self.gateways.iter_mut().filter_map(Option::take) {
            gateway.signal("KILL");
            let _ = gateway.wait_exit(Duration::from_secs(5));
        }
        self.fleet_sh(&["down"]);
    }
}

/// A client process stopped with SIGTERM (it then writes its result), killed if dropped.
fn run(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn backends(result: &Value) -> Vec<String> {
    result["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .map(|b| b.as_str().unwrap_or("?").to_string())
        .collect()
}

/// Prints a load run's figures; returns (failed connections, how many of them were in flight
/// when the router's FIB changed).
fn load_summary(what: &str, load: &Value, fib_changes: &[f64]) -> (usize, usize) {
    let failures = load["failures"].as_array().expect("failures");
    // In flight at a change: started at most 100 ms before the change was seen (a
    // connection takes a few ms; the poll sees a change a few ms late) and not over when it
    // happened. A gateway that stopped forwarding before the router moved away (no drain)
    // fails connections started earlier than that, which count as plain failures.
    let in_flight = failures
        .iter()
        .filter(|f| {
            let start = f["t"].as_f64().unwrap_or(0.0);
            let end = start + f["seconds"].as_f64().unwrap_or(0.0);
            fib_changes
                .iter()
                .any(|&change| (change - 0.1..=change).contains(&start) && end >= change - 0.05)
        })
        .count();
    figure(format!(
        "{what}: {} new connections, {} failed ({in_flight} of them in flight when the router's FIB changed), {} slower than 0.5 s (a SYN retransmitted), median {} ms",
        load["total"],
        failures.len(),
        load["slow"],
        load["median_ms"]
    ));
    if !failures.is_empty() {
        println!("failures: {failures:?}; FIB changes at {fib_changes:?}");
    }
    (failures.len(), in_flight)
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64()
}

/// Items a and b: ECMP spreads new connections over both gateways, and each gateway alone
/// sends the same 5-tuples (and the same client addresses, with ClientIP affinity) to the
/// same pods.
#[test]
fn ecmp_spreads_connections_and_every_gateway_picks_the_same_pods() {
    let fleet = Fleet::start();
    assert_eq!(fleet.next_hops(VIP), NEXT_HOP.to_vec(), "ECMP over both");
    assert_eq!(
        fleet.next_hops(STICKY_VIP),
        NEXT_HOP.to_vec(),
        "ECMP over both"
    );

    let before = [fleet.inserts(0), fleet.inserts(1)];
    let start = Instant::now();
    let result = fleet.client(&["spread", &format!("http://{VIP}/"), "1000", CLIENTS]);
    let elapsed = start.elapsed();
    let carried = [fleet.inserts(0) - before[0], fleet.inserts(1) - before[1]];
    let answered: u64 = result["counts"]
        .as_object()
        .expect("counts")
        .values()
        .map(|v| v.as_u64().unwrap_or(0))
        .sum();
    let share = carried[0] / (carried[0] + carried[1]);
    figure(format!(
        "a: 1000 new connections from 254 client addresses in {:.2} s: {answered} answered, {} failed; per pod {}",
        elapsed.as_secs_f64(),
        result["failed"],
        result["counts"]
    ));
    figure(format!(
        "a: share per gateway (conntrack inserts): gw1 {} ({:.1} %), gw2 {} ({:.1} %)",
        carried[0],
        share * 100.0,
        carried[1],
        (1.0 - share) * 100.0
    ));
    assert_eq!(result["failed"], 0, "{result}");
    assert_eq!(answered, 1000, "{result}");
    assert!(
        carried[0] + carried[1] >= 1000.0,
        "every connection is a conntrack insert on one gateway: {carried:?}"
    );
    assert!((0.3..=0.7).contains(&share), "gw1 carried {share:.3}");

    // b: the same 5-tuples through each gateway alone.
    let url = format!("http://{VIP}/");
    let mut picks = Vec::new();
    for g in 0..2 {
        fleet.force_gateway(Some(g));
        let before = fleet.inserts(g);
        picks.push(backends(
            &fleet.client(&["tuples", &url, "300", CLIENTS, "100", "21000"]),
        ));
        assert!(
            fleet.inserts(g) - before >= 300.0,
            "the tuples went through gateway {} alone",
            g + 1
        );
    }
    let same = picks[0]
        .iter()
        .zip(&picks[1])
        .filter(|(a, b)| a == b)
        .count();
    let distinct: std::collections::BTreeSet<&String> = picks[0].iter().collect();
    figure(format!(
        "b: 300 fixed 5-tuples through gw1 alone then gw2 alone: {same}/300 reach the same pod (pods seen: {distinct:?})"
    ));
    assert!(
        picks[0].iter().all(|b| b.starts_with("pod")),
        "{:?}",
        picks[0]
    );
    assert_eq!(picks[0], picks[1], "the same 5-tuple, another pod");
    assert!(distinct.len() >= 3, "the tuples spread over the pods");

    // b: ClientIP affinity: 40 client addresses, 3 connections each (other ports), per gateway.
    let sticky_url = format!("http://{STICKY_VIP}/");
    let mut sticky = Vec::new();
    for (g, port_base) in [(0, "23000"), (1, "24000")] {
        fleet.force_gateway(Some(g));
        sticky.push(backends(&fleet.client(&[
            "tuples",
            &sticky_url,
            "120",
            CLIENTS,
            "40",
            port_base,
        ])));
    }
    fleet.force_gateway(None);
    for picks in &sticky {
        for (i, pick) in picks.iter().enumerate() {
            assert!(pick.starts_with("pod"), "{picks:?}");
            assert_eq!(pick, &picks[i % 40], "client {} changed pods", i % 40);
        }
    }
    let clients_same = (0..40).filter(|&i| sticky[0][i] == sticky[1][i]).count();
    let sticky_pods: std::collections::BTreeSet<&String> = sticky[0].iter().collect();
    figure(format!(
        "b: ClientIP affinity: 40 clients x 3 connections per gateway: each client kept one pod; {clients_same}/40 clients got the same pod on gw1 and gw2 (pods: {sticky_pods:?})"
    ));
    assert_eq!(sticky[0], sticky[1], "affinity picked other pods on gw2");
    assert!(sticky_pods.len() >= 2, "the clients spread over the pods");
}

/// Items c and d: a crash under a stream of new connections, then a rolling restart under a
/// stream of new connections with long-lived keep-alive connections open.
#[test]
fn a_crash_and_a_rolling_restart_under_load() {
    let mut fleet = Fleet::start();
    let url = format!("http://{VIP}/");

    // c: kill -9 of gw1 at 60 new connections/s.
    let out = fleet.dir.path().join("crash-load.json");
    let load = fleet.spawn_client(&["load", &url, "60", CLIENTS, out.to_str().unwrap()]);
    let streams = fleet.open_streams(25000);
    let killed = Instant::now();
    let reaper = fleet.kill9(0);
    fleet.wait_announced(0, false, Duration::from_secs(10));
    let converged = killed.elapsed();
    reaper.join().expect("reaper");
    figure(format!(
        "c: kill -9 of gw1: the router's FIB dropped it after {} ms",
        converged.as_millis()
    ));
    std::thread::sleep(Duration::from_secs(3));
    let crash = load.finish(&out);
    load_summary(
        "c: during the crash (60/s, 2 s before, 3 s after)",
        &crash,
        &fleet.fib_changes.borrow(),
    );
    let breaks = streams.finish(0);
    breaks.report("c: kill -9 of gw1", 0);
    assert_eq!(breaks.unknown, 0, "every stream is tracked by a gateway");
    assert_eq!(breaks.broke_other, 0, "a connection through gw2 broke");
    let after = fleet.client(&["spread", &url, "200", CLIENTS]);
    figure(format!(
        "c: after convergence: 200 new connections, {} failed",
        after["failed"]
    ));
    assert_eq!(after["failed"], 0, "{after}");

    let back = fleet.restart(0);
    figure(format!(
        "c: gw1 restarted: in the router's FIB again {} ms after its start",
        back.as_millis()
    ));

    // d: rolling restart, gw1 then gw2, at 50 new connections/s.
    let out = fleet.dir.path().join("rolling-load.json");
    let rolling_start = unix_now();
    let load = fleet.spawn_client(&["load", &url, "50", CLIENTS, out.to_str().unwrap()]);
    let mut broken_restarting = 0;
    let mut broken_other = 0;
    for (g, port_base) in [(0usize, 26000u32), (1, 27000)] {
        let streams = fleet.open_streams(port_base);
        let (sent, waiter) = fleet.sigterm(g);
        let withdrawn = fleet.wait_announced(g, false, Duration::from_secs(10));
        figure(format!(
            "d: SIGTERM gw{}: the router's FIB dropped it after {} ms (drain_seconds 3 keeps it forwarding)",
            g + 1,
            withdrawn.as_millis()
        ));
        let clean = waiter.join().expect("waiter");
        figure(format!(
            "d: gw{} exited {} {} ms after SIGTERM",
            g + 1,
            if clean { "cleanly (0)" } else { "NOT cleanly" },
            sent.elapsed().as_millis()
        ));
        let back = fleet.restart(g);
        figure(format!(
            "d: gw{} back in the router's FIB {} ms after its restart",
            g + 1,
            back.as_millis()
        ));
        std::thread::sleep(Duration::from_secs(1));
        let breaks = streams.finish(g);
        breaks.report(&format!("d: rolling restart of gw{}", g + 1), g);
        assert_eq!(breaks.unknown, 0, "every stream is tracked by a gateway");
        assert_eq!(
            breaks.broke_other, 0,
            "a connection through the other gateway broke"
        );
        broken_restarting += breaks.broke_g;
        broken_other += breaks.broke_other;
        assert!(clean, "gw{} exits 0 after SIGTERM", g + 1);
    }
    let rolling = load.finish(&out);
    fleet
        .fib_changes
        .borrow_mut()
        .retain(|&t| t >= rolling_start);
    let (failed, in_flight) = load_summary(
        "d: during the rolling restart (50/s)",
        &rolling,
        &fleet.fib_changes.borrow(),
    );
    figure(format!(
        "d: keep-alive connections broken: {broken_restarting} through the restarting gateway, {broken_other} through the other"
    ));
    // A connection in the middle of its handshake or request when the router moves its
    // hash bucket to the other gateway breaks: that gateway has no state for it (item 6).
    // Every other new connection must succeed.
    assert_eq!(
        failed - in_flight,
        0,
        "new connections failed during the rolling restart, not in flight at a FIB change"
    );
}
