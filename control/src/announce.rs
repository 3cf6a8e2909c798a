//! Readiness and route announcements for a fleet of gateways behind ECMP (issue 18).
//!
//! servicegate does not speak BGP. It hands the node's BGP speaker (BIRD) the prefixes this
//! gateway should attract as kernel routes on the exception tap — the kernel interface of
//! the uplink's `exception` vdev — in a routing table of their own (`announce.table`),
//! with protocol number [`ROUTE_PROTOCOL`]. BIRD's `kernel` protocol learns that table and
//! exports its routes over BGP.
//!
//! Why this stays correct when servicegate crashes: the tap belongs to the DPDK process.
//! When the process dies, even by `kill -9`, the kernel destroys the tap and every route
//! through it in the same step; BIRD sees the netlink deletion at once and withdraws. No
//! stale announcement outlives the process, and a restart starts from an empty table
//! (whatever a previous instance left with this protocol number is removed by the first
//! reconcile).
//!
//! The announcer is level-triggered: every [`TICK`] it evaluates readiness and the desired
//! prefixes; when either changed, and at least every [`RECHECK`] anyway, it reads the
//! table's routes of [`ROUTE_PROTOCOL`] and adds what is missing and deletes what is
//! extra. A route someone deleted comes back; a stale one goes away.
//!
//! Readiness gates everything (and is what `/readyz` answers): the first complete snapshot
//! is installed, every worker's loop advanced within [`STALLED_AFTER`], every DPDK port's
//! link is up, and the gateway is not draining.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use arc_swap::ArcSwap;
use dataplane::snapshot::{FrontendKind, Snapshot};
use dataplane::worker::WorkerShared;
use ipnet::Ipv4Net;
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::Notify;

use crate::config::{AnnounceWhen, Config};

/// The protocol number of the routes servicegate installs (`ip route … proto 200`): a
/// number of its own, so the announcer only ever touches its routes, and BIRD's `learn`
/// takes them as alien routes.
pub const ROUTE_PROTOCOL: u8 = 200;
/// A worker whose loop counters did not move for this long makes the gateway unready.
pub const STALLED_AFTER: Duration = Duration::from_millis(300);
/// How often readiness and the desired prefixes are evaluated.
pub const TICK: Duration = Duration::from_millis(100);
/// How often the kernel table is read back even when nothing changed here.
pub const RECHECK: Duration = Duration::from_millis(200);

/// Whether the gateway may attract traffic, and if not, every reason why not.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Readiness {
    pub ready: bool,
    pub draining: bool,
    /// Empty when ready.
    pub reasons: Vec<String>,
}

impl Readiness {
    /// Readiness from its conditions: `stalled` are (worker, idle time), `down` the ports
    /// whose link is down.
    pub fn evaluate(
        snapshot_installed: bool,
        stalled: &[(usize, Duration)],
        down: &[String],
        draining: bool,
    ) -> Readiness {
        let mut reasons = Vec::new();
        if draining {
            reasons.push("draining".to_string());
        }
        if !snapshot_installed {
            reasons.push("no complete service snapshot installed yet".to_string());
        }
        for (worker, idle) in stalled {
            reasons.push(format!(
                "worker {worker} has not polled for {} ms",
                idle.as_millis()
            ));
        }
        for port in down {
            reasons.push(format!("port {port}: link down"));
        }
        Readiness {
            ready: reasons.is_empty(),
            draining,
            reasons,
        }
    }

    /// One line: `ready`, or `draining; port uplink: link down`.
    pub fn summary(&self) -> String {
        if self.ready {
            "ready".to_string()
        } else {
            self.reasons.join("; ")
        }
    }
}

/// What the announcer does, from the config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AnnounceSettings {
    pub when: AnnounceWhen,
    pub extra_prefixes: Vec<Ipv4Net>,
    /// NodePort addresses to announce (empty unless `announce.node_port_addresses`).
    pub node_port_addresses: Vec<Ipv4Addr>,
}

impl AnnounceSettings {
    pub fn from_config(config: &Config) -> AnnounceSettings {
        AnnounceSettings {
            when: config.announce.when,
            extra_prefixes: config.announce.extra_prefixes.clone(),
            node_port_addresses: if config.announce.node_port_addresses {
                config.node_port_addresses()
            } else {
                Vec::new()
            },
        }
    }
}

/// A prefix this gateway could announce, and whether and why it does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Candidate {
    pub prefix: Ipv4Net,
    /// `service` (a LoadBalancer ingress IP or externalIP), `extra`, `node_port_address`.
    pub source: &'static str,
    /// The Service ports with this address (`namespace/name:port`), for `service`.
    pub services: Vec<String>,
    /// Whether any of those Service ports has a usable endpoint (`service` only).
    pub usable_endpoints: bool,
    /// Whether the gateway wants it announced.
    pub announce: bool,
    /// Why it is or is not announced.
    pub reason: String,
}

/// Every candidate prefix of `snapshot` and the config, sorted by prefix; each says
/// whether it should be announced given `readiness`.
pub fn candidates(
    snapshot: &Snapshot,
    settings: &AnnounceSettings,
    readiness: &Readiness,
) -> Vec<Candidate> {
    // address → (Service ports, any usable endpoint)
    let mut services: BTreeMap<Ipv4Addr, (BTreeSet<String>, bool)> = BTreeMap::new();
    for frontend in snapshot.all_frontends() {
        if !matches!(
            frontend.kind,
            FrontendKind::LoadBalancer | FrontendKind::ExternalIp
        ) {
            continue;
        }
        let entry = services.entry(frontend.addr).or_default();
        entry.0.insert(frontend.service.to_string());
        entry.1 |= !frontend.backends.usable.is_empty();
    }
    let unready = |reason: String| format!("not announced: {reason}");
    let mut out: BTreeMap<Ipv4Net, Candidate> = BTreeMap::new();
    for (addr, (names, usable)) in services {
        let prefix = Ipv4Net::from(addr);
        let (announce, reason) = if !readiness.ready {
            (false, unready(readiness.summary()))
        } else if usable {
            (true, "a Service port has usable endpoints".to_string())
        } else if settings.when == AnnounceWhen::Always {
            (
                true,
                "no usable endpoints; announce.when is always".to_string(),
            )
        } else {
            (
                false,
                unready("no Service port has a usable endpoint".into()),
            )
        };
        out.insert(
            prefix,
            Candidate {
                prefix,
                source: "service",
                services: names.into_iter().collect(),
                usable_endpoints: usable,
                announce,
                reason,
            },
        );
    }
    let configured = settings
        .extra_prefixes
        .iter()
        .map(|p| (p.trunc(), "extra", "announce.extra_prefixes"))
        .chain(settings.node_port_addresses.iter().map(|a| {
            (
                Ipv4Net::from(*a),
                "node_port_address",
                "announce.node_port_addresses",
            )
        }));
    for (prefix, source, key) in configured {
        let (announce, reason) = if readiness.ready {
            (true, format!("configured ({key})"))
        } else {
            (false, unready(readiness.summary()))
        };
        // A Service address that is also configured is announced whenever either says so.
        match out.get_mut(&prefix) {
            Some(existing) if announce && !existing.announce => {
                existing.announce = true;
                existing.reason = format!("configured ({key})");
            }
            Some(_) => {}
            None => {
                out.insert(
                    prefix,
                    Candidate {
                        prefix,
                        source,
                        services: Vec::new(),
                        usable_endpoints: false,
                        announce,
                        reason,
                    },
                );
            }
        }
    }
    out.into_values().collect()
}

/// The routes of [`ROUTE_PROTOCOL`] in one kernel table, read and changed with iproute2
/// (`ip -n NETNS`): the control thread runs it a few times a second at most.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelTable {
    pub netns: Option<String>,
    pub device: String,
    pub table: u32,
}

impl KernelTable {
    fn ip(&self) -> tokio::process::Command {
        let mut command = tokio::process::Command::new("ip");
        if let Some(netns) = &self.netns {
            command.args(["-n", netns]);
        }
        command.kill_on_drop(true);
        command
    }

    /// The prefixes of the table's routes of [`ROUTE_PROTOCOL`] (on any device).
    pub async fn routes(&self) -> anyhow::Result<BTreeSet<Ipv4Net>> {
        let output = self
            .ip()
            .args(["-4", "-j", "route", "show", "table"])
            .arg(self.table.to_string())
            .args(["proto", &ROUTE_PROTOCOL.to_string()])
            .stdin(Stdio::null())
            .output()
            .await
            .context("cannot run `ip` (iproute2)")?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            // A table is created with its first route and goes with its last.
            if stderr.contains("table does not exist") {
                return Ok(BTreeSet::new());
            }
            let first = stderr.lines().next().unwrap_or("failed").trim();
            bail!("ip route show table {}: {first}", self.table);
        }
        parse_routes(&String::from_utf8_lossy(&output.stdout))
    }

    /// Adds `add` (replacing a route of the same prefix) and deletes `delete`; every change
    /// is tried even when one fails, and the first failure is returned.
    pub async fn apply(&self, add: &[Ipv4Net], delete: &[Ipv4Net]) -> anyhow::Result<()> {
        if add.is_empty() && delete.is_empty() {
            return Ok(());
        }
        let mut batch = String::new();
        for prefix in delete {
            batch.push_str(&format!(
                "route del {prefix} table {} proto {ROUTE_PROTOCOL}\n",
                self.table
            ));
        }
        for prefix in add {
            batch.push_str(&format!(
                "route replace {prefix} dev {} table {} proto {ROUTE_PROTOCOL} scope link\n",
                self.device, self.table
            ));
        }
        let mut child = self
            .ip()
            .args(["-force", "-batch", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot run `ip` (iproute2)")?;
        let mut stdin = child.stdin.take().ok_or_else(|| anyhow!("no stdin"))?;
        stdin.write_all(batch.as_bytes()).await?;
        drop(stdin);
        let output = child.wait_with_output().await?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let first = stderr.lines().next().unwrap_or("failed").trim();
            bail!(
                "ip route (table {}, dev {}): {first}",
                self.table,
                self.device
            );
        }
        Ok(())
    }
}

/// The destinations of `ip -j route show` output.
pub fn parse_routes(json: &str) -> anyhow::Result<BTreeSet<Ipv4Net>> {
    #[derive(serde::Deserialize)]
    struct Route {
        dst: String,
    }
    if json.trim().is_empty() {
        return Ok(BTreeSet::new());
    }
    let routes: Vec<Route> =
        serde_json::from_str(json).context("unexpected `ip -j route show` output")?;
    routes
        .iter()
        .map(|r| {
            let dst = if r.dst == "default" {
                "0.0.0.0/0"
            } else {
                &r.dst
            };
            dst.parse::<Ipv4Net>()
                .or_else(|_| dst.parse::<Ipv4Addr>().map(Ipv4Net::from))
                .map_err(|_| anyhow!("unexpected route destination {dst:?}"))
        })
        .collect()
}

/// What the admin API shows: readiness, candidates, what the kernel table holds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct AnnounceStatus {
    pub enabled: bool,
    pub device: Option<String>,
    pub netns: Option<String>,
    pub table: Option<u32>,
    pub readiness: Readiness,
    pub candidates: Vec<Candidate>,
    /// The table's routes of [`ROUTE_PROTOCOL`] after the last reconcile.
    pub announced: Vec<Ipv4Net>,
    /// The last reconcile's failure, if it failed.
    pub error: Option<String>,
    /// Failed reconciles since start.
    pub errors: u64,
    /// When readiness was last evaluated (milliseconds since start of the process's
    /// announcer).
    pub evaluated_ms: u64,
}

/// Shared between the announcer task, the signal handler and the admin API.
pub struct Announcer {
    pub status: parking_lot::Mutex<AnnounceStatus>,
    draining: AtomicBool,
    wake: Notify,
    /// Signalled after each reconcile.
    reconciled: Notify,
}

impl Default for Announcer {
    fn default() -> Self {
        Announcer {
            status: parking_lot::Mutex::new(AnnounceStatus::default()),
            draining: AtomicBool::new(false),
            wake: Notify::new(),
            reconciled: Notify::new(),
        }
    }
}

impl Announcer {
    pub fn readiness(&self) -> Readiness {
        self.status.lock().readiness.clone()
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Starts draining: the next evaluation (woken at once) withdraws everything.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    /// Waits until the kernel table holds none of our routes (or the announcer is
    /// disabled), at most `timeout`; returns whether it does.
    pub async fn wait_withdrawn(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let reconciled = self.reconciled.notified();
            {
                let status = self.status.lock();
                if !status.enabled
                    || (status.readiness.draining
                        && status.announced.is_empty()
                        && status.error.is_none())
                {
                    return true;
                }
            }
            if tokio::time::timeout_at(deadline, reconciled).await.is_err() {
                return false;
            }
        }
    }
}

/// What the announcer reads each tick.
pub struct HealthInputs {
    pub snapshot: Arc<ArcSwap<Snapshot>>,
    /// Set by the publisher once the first complete snapshot is installed.
    pub snapshot_installed: Arc<AtomicBool>,
    pub workers: Arc<[WorkerShared]>,
    /// Every DPDK port (configured and exception ports).
    pub ports: Vec<PortProbe>,
    pub link_up: fn(u16) -> bool,
}

/// A DPDK port whose link readiness watches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortProbe {
    pub name: String,
    pub id: u16,
    /// The kernel interface of a `net_tap` port (`iface=`). DPDK's tap driver reads the
    /// link from that interface by name in servicegate's own network namespace, so once
    /// the interface is moved to another namespace (as the lab does) it reads "down"
    /// whatever the state: such a port's link is then unknown, not down.
    pub tap_iface: Option<String>,
}

impl PortProbe {
    /// The probe of a port with DPDK device `device` (`net_tap0,iface=sg-up,...`).
    pub fn new(name: &str, id: u16, device: &str) -> PortProbe {
        let mut parts = device.split(',');
        let driver = parts.next().unwrap_or_default();
        let tap_iface = if driver.starts_with("net_tap") {
            parts
                .find_map(|arg| arg.strip_prefix("iface="))
                .map(str::to_string)
        } else {
            None
        };
        PortProbe {
            name: name.to_string(),
            id,
            tap_iface,
        }
    }

    /// Whether the link is known to be down: `Some(true)` down, `Some(false)` up, `None`
    /// unknown (a tap whose kernel side left this namespace).
    fn down(&self, link_up: fn(u16) -> bool) -> Option<bool> {
        if let Some(iface) = &self.tap_iface {
            if !std::path::Path::new("/sys/class/net").join(iface).exists() {
                return None;
            }
        }
        Some(!link_up(self.id))
    }
}

/// Per-worker loop progress: the counters last seen and when they last moved.
struct Progress {
    seen: Vec<Option<((u64, u64), Instant)>>,
}

impl Progress {
    fn stalled(&mut self, workers: &[WorkerShared], now: Instant) -> Vec<(usize, Duration)> {
        self.seen.resize(workers.len(), None);
        let mut stalled = Vec::new();
        for (i, worker) in workers.iter().enumerate() {
            let counters = {
                let s = worker.stats.lock();
                (s.total_cycles, s.bursts)
            };
            let entry = self.seen[i].get_or_insert((counters, now));
            if entry.0 != counters {
                *entry = (counters, now);
            }
            let idle = now.duration_since(entry.1);
            if idle > STALLED_AFTER {
                stalled.push((i, idle));
            }
        }
        stalled
    }
}

/// Runs until the process stops: evaluates readiness every [`TICK`] and, when `table` is
/// given, keeps its routes equal to the prefixes to announce.
pub async fn run(
    announcer: Arc<Announcer>,
    inputs: HealthInputs,
    settings: AnnounceSettings,
    table: Option<KernelTable>,
) {
    let started = Instant::now();
    {
        let mut status = announcer.status.lock();
        status.enabled = table.is_some();
        status.device = table.as_ref().map(|t| t.device.clone());
        status.netns = table.as_ref().and_then(|t| t.netns.clone());
        status.table = table.as_ref().map(|t| t.table);
    }
    let mut progress = Progress { seen: Vec::new() };
    let mut last_desired: Option<BTreeSet<Ipv4Net>> = None;
    let mut last_check = Instant::now() - RECHECK;
    let mut last_error: Option<String> = None;
    let mut was_ready = false;
    loop {
        let now = Instant::now();
        let stalled = progress.stalled(&inputs.workers, now);
        let down: Vec<String> = inputs
            .ports
            .iter()
            .filter(|port| port.down(inputs.link_up) == Some(true))
            .map(|port| port.name.clone())
            .collect();
        let readiness = Readiness::evaluate(
            inputs.snapshot_installed.load(Ordering::Acquire),
            &stalled,
            &down,
            announcer.is_draining(),
        );
        if readiness.ready != was_ready {
            if readiness.ready {
                tracing::info!("ready: announcing");
            } else {
                tracing::warn!("not ready: {}", readiness.summary());
            }
            was_ready = readiness.ready;
        }
        let snapshot = inputs.snapshot.load();
        let candidates = candidates(&snapshot, &settings, &readiness);
        let desired: BTreeSet<Ipv4Net> = candidates
            .iter()
            .filter(|c| c.announce)
            .map(|c| c.prefix)
            .collect();
        {
            let mut status = announcer.status.lock();
            status.readiness = readiness;
            status.candidates = candidates;
            status.evaluated_ms = started.elapsed().as_millis() as u64;
        }
        if let Some(table) = &table {
            let changed = last_desired.as_ref() != Some(&desired);
            if changed || now.duration_since(last_check) >= RECHECK {
                last_check = now;
                let result = reconcile(table, &desired).await;
                let mut status = announcer.status.lock();
                match result {
                    Ok((actual, added, deleted)) => {
                        if !added.is_empty() || !deleted.is_empty() {
                            tracing::info!(
                                added = ?added,
                                withdrawn = ?deleted,
                                "announcements changed (table {})",
                                table.table
                            );
                        }
                        status.announced = actual.into_iter().collect();
                        status.error = None;
                        last_desired = Some(desired);
                        if last_error.take().is_some() {
                            tracing::info!("announcements reconciled again");
                        }
                    }
                    Err(err) => {
                        let text = format!("{err:#}");
                        if last_error.as_deref() != Some(&text) {
                            tracing::warn!("announcements: {text}");
                        }
                        status.errors += 1;
                        status.error = Some(text.clone());
                        last_error = Some(text);
                        // Retried at the next tick.
                        last_desired = None;
                    }
                }
            }
        }
        announcer.reconciled.notify_waiters();
        let _ = tokio::time::timeout(TICK, announcer.wake.notified()).await;
    }
}

/// Makes the table's routes of [`ROUTE_PROTOCOL`] equal `desired`; returns what it then
/// holds, what was added and what was deleted.
async fn reconcile(
    table: &KernelTable,
    desired: &BTreeSet<Ipv4Net>,
) -> anyhow::Result<(BTreeSet<Ipv4Net>, Vec<Ipv4Net>, Vec<Ipv4Net>)> {
    let actual = table.routes().await?;
    let add: Vec<Ipv4Net> = desired.difference(&actual).copied().collect();
    let delete: Vec<Ipv4Net> = actual.difference(desired).copied().collect();
    if add.is_empty() && delete.is_empty() {
        return Ok((actual, add, delete));
    }
    table.apply(&add, &delete).await?;
    let now = table.routes().await?;
    if &now != desired {
        let missing: Vec<String> = desired.difference(&now).map(|p| p.to_string()).collect();
        let extra: Vec<String> = now.difference(desired).map(|p| p.to_string()).collect();
        bail!(
            "table {} still differs after the change (missing: [{}], extra: [{}])",
            table.table,
            missing.join(", "),
            extra.join(", ")
        );
    }
    Ok((now, add, delete))
}

/// The kernel table of `config`, when announcing is enabled.
pub fn kernel_table(config: &Config) -> Option<KernelTable> {
    if !config.announce.enabled {
        return None;
    }
    Some(KernelTable {
        netns: config.announce.netns.clone(),
        device: config.announce_device()?,
        table: config.announce.table,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ip_route_json() {
        let json = r#"[{"dst":"203.0.113.10","dev":"sg-up-k","protocol":"200","scope":"link","flags":[]},
                       {"dst":"10.96.0.0/12","dev":"sg-up-k","protocol":"200","scope":"link","flags":[]},
                       {"dst":"default","dev":"x","flags":[]}]"#;
        let routes = parse_routes(json).expect("parses");
        let expected: BTreeSet<Ipv4Net> = ["203.0.113.10/32", "10.96.0.0/12", "0.0.0.0/0"]
            .iter()
            .map(|p| p.parse().unwrap())
            .collect();
        assert_eq!(routes, expected);
        assert!(parse_routes("").expect("empty").is_empty());
        assert!(parse_routes("[]").expect("empty list").is_empty());
        assert!(parse_routes(r#"[{"dst":"fe80::/64"}]"#).is_err());
        assert!(parse_routes("not json").is_err());
    }

    #[test]
    fn readiness_names_every_failed_condition() {
        let ready = Readiness::evaluate(true, &[], &[], false);
        assert!(ready.ready);
        assert_eq!(ready.summary(), "ready");
        let unready = Readiness::evaluate(
            false,
            &[(1, Duration::from_millis(450))],
            &["uplink".to_string()],
            true,
        );
        assert!(!unready.ready);
        assert!(unready.draining);
        assert_eq!(
            unready.summary(),
            "draining; no complete service snapshot installed yet; \
             worker 1 has not polled for 450 ms; port uplink: link down"
        );
    }
}
