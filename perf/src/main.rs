//! `cargo run --release -p perf -- --suite quick|full [--runs N]`: throughput, latency and
//! cycles/packet of the real `servicegate run` on generated captures, each beside
//! `dpdk-testpmd` io-forwarding the same capture on the same kind of ports.
//!
//! Writes `perf/results/latest.json` and rewrites `perf/RESULTS.md` (keeping its hand-written
//! "Reading the figures" section).

mod gen;
mod run;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use gen::Traffic;
use run::{Device, PodNetwork, SgSetup};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Suite {
    Quick,
    Full,
}

/// One scenario: how its capture is made and how servicegate is set up around it.
struct Scenario {
    name: &'static str,
    /// Distinct flows (= frames of the capture); 0 for the net_null io ceiling.
    flows: usize,
    traffic: Option<Traffic>,
    io_mode: bool,
    /// The capture arrives on the cluster port (VXLAN).
    on_cluster: bool,
    workers: Vec<usize>,
    masquerade: bool,
    syn_timeout: Option<u64>,
    /// Conntrack entries (default 2 Mi).
    conntrack_capacity: Option<u64>,
    many_services: bool,
    /// Routed for all but the VXLAN scenario: the issue's (a) is DNAT only.
    pod_network: PodNetwork,
    note: &'static str,
}

impl Scenario {
    fn new(name: &'static str, flows: usize, traffic: Traffic) -> Scenario {
        Scenario {
            name,
            flows,
            traffic: Some(traffic),
            io_mode: false,
            on_cluster: false,
            workers: vec![1],
            masquerade: true,
            syn_timeout: None,
            conntrack_capacity: None,
            many_services: false,
            pod_network: PodNetwork::Routed,
            note: "",
        }
    }
}

fn scenarios(suite: Suite) -> Vec<Scenario> {
    let mut v = vec![
        Scenario {
            name: "io-null",
            flows: 0,
            traffic: None,
            io_mode: true,
            note: "mode io, net_null -> net_null: the I/O ceiling",
            ..Scenario::new("", 0, Traffic::ClusterIpAck)
        },
        Scenario {
            name: "io-pcap",
            io_mode: true,
            note: "mode io, net_pcap replay -> net_null: the replay ceiling",
            ..Scenario::new("", 10_000, Traffic::ClusterIpAck)
        },
        Scenario {
            masquerade: false,
            note: "ClusterIP, established, DNAT only, pods routed via their node",
            ..Scenario::new("a-clusterip", 1, Traffic::ClusterIpAck)
        },
        Scenario {
            masquerade: false,
            note: "ClusterIP, established, DNAT only, pods routed via their node",
            ..Scenario::new("a-clusterip", 10_000, Traffic::ClusterIpAck)
        },
    ];
    if suite == Suite::Full {
        v.push(Scenario {
            name: "io-pcap",
            io_mode: true,
            note: "mode io, replay of the 1M-flow capture -> net_null: the replay ceiling of a-clusterip at 1M flows",
            ..Scenario::new("", 1_000_000, Traffic::ClusterIpAck)
        });
        v.push(Scenario {
            masquerade: false,
            note: "ClusterIP, established, DNAT only, pods routed via their node",
            ..Scenario::new("a-clusterip", 1_000_000, Traffic::ClusterIpAck)
        });
        v.push(Scenario {
            on_cluster: true,
            pod_network: PodNetwork::Vxlan,
            note: "VXLAN from node-1 VTEP, decap, DNAT+SNAT, re-encap to the backend's node VTEP",
            ..Scenario::new("b-vxlan", 10_000, Traffic::VxlanAck)
        });
    }
    v.push(Scenario {
        note: "NodePort 192.168.100.1:30080, DNAT+SNAT",
        ..Scenario::new("c-nodeport", 10_000, Traffic::NodePortAck)
    });
    v.push(Scenario {
        masquerade: false,
        syn_timeout: Some(1),
        conntrack_capacity: Some(1 << 17),
        note: "SYN of a new flow; DNAT only; table of 131,072 entries < 524,288 flows, so every SYN is an insert that early-drops the oldest unreplied entry",
        ..Scenario::new("d-new-conn", 1 << 19, Traffic::Syn)
    });
    v.push(Scenario {
        note: "UDP ClusterIP 10.96.0.20:53, DNAT+SNAT",
        ..Scenario::new("e-udp", 10_000, Traffic::Udp)
    });
    if suite == Suite::Full {
        v.push(Scenario {
            note: "spoofed SYN flood to the NodePort (DNAT+SNAT, 3 backends x 28,232 SNAT ports, production timeouts): past the first 84,696 SYNs each one reclaims the SNAT port of an unreplied entry (early drop); what a flood at the worker's full rate costs",
            ..Scenario::new("h-syn-flood", 1 << 19, Traffic::SynFlood)
        });
        v.push(Scenario {
            many_services: true,
            note: "1,000 ClusterIP Services x 8 backends, DNAT+SNAT",
            ..Scenario::new("f-1000-svc", 10_000, Traffic::ManyServices)
        });
        v.push(Scenario {
            workers: vec![0, 1],
            masquerade: false,
            note: "a-clusterip 10k with two workers (cores 0,1; control shares core 0), 2 pcap rx queues, each holding the flows its worker owns",
            ..Scenario::new("g-2-workers", 10_000, Traffic::ClusterIpAck)
        });
    }
    v
}

/// One row of results (one run, or the medians of several).
#[derive(Clone, Debug, Default)]
struct Row {
    name: String,
    flows: usize,
    mpps: f64,
    testpmd_mpps: f64,
    ratio: f64,
    cycles_per_packet: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    conntrack: f64,
    new_flows_per_pkt: f64,
    /// Share of the transmitted packets the established-flow fast path forwarded.
    fast_path_share: f64,
    notes: Vec<String>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn median_row(runs: &[Row]) -> Row {
    let f = |g: fn(&Row) -> f64| median(runs.iter().map(g).collect());
    let mut row = Row {
        name: runs[0].name.clone(),
        flows: runs[0].flows,
        mpps: f(|r| r.mpps),
        testpmd_mpps: f(|r| r.testpmd_mpps),
        ratio: f(|r| r.ratio),
        cycles_per_packet: f(|r| r.cycles_per_packet),
        p50_us: f(|r| r.p50_us),
        p99_us: f(|r| r.p99_us),
        p999_us: f(|r| r.p999_us),
        conntrack: f(|r| r.conntrack),
        new_flows_per_pkt: f(|r| r.new_flows_per_pkt),
        fast_path_share: f(|r| r.fast_path_share),
        notes: Vec::new(),
    };
    for r in runs {
        for n in &r.notes {
            if !row.notes.contains(n) {
                row.notes.push(n.clone());
            }
        }
    }
    row
}

struct Ctx {
    binary: PathBuf,
    dir: PathBuf,
    tsc_hz: f64,
    lab: PathBuf,
    many: PathBuf,
    next_admin: u16,
    hugepages: bool,
}

/// Captures are generated once per scenario and reused across runs.
fn capture(ctx: &Ctx, s: &Scenario) -> anyhow::Result<Vec<PathBuf>> {
    let Some(traffic) = s.traffic else {
        return Ok(Vec::new());
    };
    let queues = s.workers.len();
    let mut files = Vec::new();
    for q in 0..queues {
        let path = ctx
            .dir
            .join(format!("{:?}-{}-{q}of{queues}.pcap", traffic, s.flows));
        if !path.exists() {
            // One capture per rx queue, holding the flows its worker owns.
            gen::write_pcap(
                &path,
                traffic,
                (0..s.flows).filter(|&i| queues == 1 || gen::owner(i, queues) == q),
            )?;
        }
        files.push(path);
    }
    Ok(files)
}

fn run_scenario(ctx: &mut Ctx, s: &Scenario, files: &[PathBuf], run: usize) -> Row {
    let tag = format!("{}-{}-r{run}", s.name, s.flows);
    let pcap = Device::Pcap(files.to_vec());
    let sink = Device::Null { rx: false };
    let (uplink, cluster) = match (s.traffic, s.on_cluster) {
        (None, _) => (Device::Null { rx: true }, Device::Null { rx: true }),
        (Some(_), false) => (pcap, sink),
        (Some(_), true) => (sink, pcap),
    };
    let setup = SgSetup {
        io_mode: s.io_mode,
        uplink_first: !s.on_cluster,
        uplink,
        cluster,
        workers: s.workers.clone(),
        frames: s.flows as u64,
        manifests: if s.many_services {
            ctx.many.clone()
        } else {
            ctx.lab.clone()
        },
        pod_network: s.pod_network,
        masquerade_cluster_ip: s.masquerade,
        tcp_syn_sent_timeout: s.syn_timeout,
        conntrack_capacity: s.conntrack_capacity.unwrap_or(1 << 21),
        hugepages: ctx.hugepages,
    };
    let mut row = Row {
        name: s.name.to_string(),
        flows: s.flows,
        mpps: f64::NAN,
        testpmd_mpps: f64::NAN,
        ratio: f64::NAN,
        cycles_per_packet: f64::NAN,
        p50_us: f64::NAN,
        p99_us: f64::NAN,
        p999_us: f64::NAN,
        conntrack: f64::NAN,
        new_flows_per_pkt: f64::NAN,
        fast_path_share: f64::NAN,
        notes: Vec::new(),
    };
    ctx.next_admin += 1;
    eprintln!("[run {run}] {} flows={} ...", s.name, s.flows);
    match run::servicegate(&ctx.binary, &ctx.dir, &setup, &tag, ctx.next_admin) {
        Ok(m) => {
            row.mpps = m.pps / 1e6;
            row.cycles_per_packet = ctx.tsc_hz * m.busy_ratio_sum / m.pps;
            row.p50_us = m.p50_us;
            row.p99_us = m.p99_us;
            row.p999_us = m.p999_us;
            row.conntrack = m.conntrack_entries;
            row.new_flows_per_pkt = m.inserts_per_s / m.pps;
            row.fast_path_share = m.fast_path_per_s / m.pps;
            // Frames from a net_null rx (io-null) are garbage to the gateway; only
            // report drops where the capture is the input.
            let rx = m.rx_pps.max(1.0);
            for (label, v) in &m.drops {
                let share = v / (rx * run::WINDOW.as_secs_f64());
                if share > 0.001 {
                    row.notes
                        .push(format!("drops {label}: {:.1}% of rx", share * 100.0));
                }
            }
        }
        Err(e) => row.notes.push(format!("servicegate failed: {e:#}")),
    }
    let (rx, tx) = setup.testpmd_devices();
    match run::testpmd(&ctx.dir, &rx, &tx, s.flows as u64, &tag) {
        Ok(pps) => {
            row.testpmd_mpps = pps / 1e6;
            row.ratio = row.mpps / row.testpmd_mpps;
        }
        Err(e) => row.notes.push(format!("testpmd failed: {e:#}")),
    }
    eprintln!(
        "[run {run}] {} flows={}: {:.3} Mpps, testpmd {:.3} Mpps {}",
        s.name,
        s.flows,
        row.mpps,
        row.testpmd_mpps,
        row.notes.join("; ")
    );
    row
}

fn fmt(v: f64, digits: usize) -> String {
    if v.is_finite() {
        format!("{v:.digits$}")
    } else {
        "-".into()
    }
}

fn table(rows: &[Row]) -> String {
    let header = [
        "scenario",
        "flows",
        "Mpps",
        "testpmd",
        "ratio",
        "cyc/pkt",
        "p50 us",
        "p99 us",
        "p99.9 us",
        "conntrack",
    ];
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.name.clone(),
                r.flows.to_string(),
                fmt(r.mpps, 3),
                fmt(r.testpmd_mpps, 3),
                fmt(r.ratio, 2),
                fmt(r.cycles_per_packet, 0),
                fmt(r.p50_us, 2),
                fmt(r.p99_us, 2),
                fmt(r.p999_us, 2),
                fmt(r.conntrack, 0),
            ]
        })
        .collect();
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            cells
                .iter()
                .map(|c| c[i].len())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |c: &[String]| {
        let parts: Vec<String> = c
            .iter()
            .enumerate()
            .map(|(i, s)| {
                if i == 0 {
                    format!("{s:<w$}", w = widths[i])
                } else {
                    format!("{s:>w$}", w = widths[i])
                }
            })
            .collect();
        format!("| {} |", parts.join(" | "))
    };
    let mut out = line(&header.map(String::from));
    out.push('\n');
    let sep: Vec<String> = widths
        .iter()
        .enumerate()
        .map(|(i, w)| {
            if i == 0 {
                format!(":{}", "-".repeat(w + 1))
            } else {
                format!("{}:", "-".repeat(w + 1))
            }
        })
        .collect();
    out.push_str(&format!("|{}|\n", sep.join("|")));
    for c in &cells {
        out.push_str(&line(c));
        out.push('\n');
    }
    out
}

fn json(rows: &[Row]) -> serde_json::Value {
    let num = |v: f64| {
        if v.is_finite() {
            serde_json::json!((v * 1000.0).round() / 1000.0)
        } else {
            serde_json::Value::Null
        }
    };
    serde_json::Value::Array(
        rows.iter()
            .map(|r| {
                serde_json::json!({
                    "name": r.name,
                    "flows": r.flows,
                    "mpps": num(r.mpps),
                    "testpmd_mpps": num(r.testpmd_mpps),
                    "ratio": num(r.ratio),
                    "cycles_per_packet": num(r.cycles_per_packet),
                    "p50_us": num(r.p50_us),
                    "p99_us": num(r.p99_us),
                    "p999_us": num(r.p999_us),
                    "fast_path_share": num(r.fast_path_share),
                })
            })
            .collect(),
    )
}

fn machine() -> String {
    let lscpu = std::process::Command::new("lscpu")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    let field = |key: &str| {
        lscpu
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "?".into())
    };
    let kernel = std::process::Command::new("uname")
        .arg("-r")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    format!(
        "{} — {} CPU(s), kernel {kernel}",
        field("Model name"),
        field("CPU(s)")
    )
}

fn today() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn results_md(rows: &[Row], suite: &str, runs: usize, tsc_note: &str, scen: &[Scenario]) -> String {
    let mut md = String::new();
    md.push_str("# servicegate performance results\n\n");
    md.push_str(&format!(
        "Generated by `cargo run --release -p perf -- --suite {suite} --runs {runs}` on {}.\n\n",
        today()
    ));
    md.push_str(&format!("Machine: {}.\n\n", machine()));
    md.push_str(&format!(
        "Medians of {runs} run(s). Each run: `servicegate run` (control core 0, worker core 1) \
         with a generated config, 1 s warm-up after `/readyz`, then `servicegate_tx_packets_total` \
         (all ports) over 3 s. testpmd: `dpdk-testpmd -l 0,1 --forward-mode=io` on the same \
         devices and capture, TX-packets over the same window. Frames are 64 bytes on the wire \
         (60 + FCS; VXLAN: 110 + FCS). cycles/pkt = TSC Hz x Σ busy ratio / pps (busy ratio \
         since worker start); TSC: {tsc_note}. Latency columns are the burst processing time \
         quantiles (`servicegate_burst_latency_quantile_seconds`, since start), not a wire \
         latency. ratio = servicegate Mpps / testpmd Mpps.\n\n"
    ));
    md.push_str(&table(rows));
    md.push_str(
        "\n| scenario | flows | conntrack new flows / packet | fast path / packet | what | notes |\n\
         |:--|--:|--:|--:|:--|:--|\n",
    );
    for r in rows {
        let note = scen
            .iter()
            .find(|s| s.name == r.name && s.flows == r.flows)
            .map(|s| s.note)
            .unwrap_or("");
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            r.name,
            r.flows,
            fmt(r.new_flows_per_pkt, 3),
            fmt(r.fast_path_share, 3),
            note,
            r.notes.join("; ")
        ));
    }
    md
}

fn main() -> anyhow::Result<()> {
    let mut suite = Suite::Quick;
    let mut suite_name = "quick".to_string();
    let mut runs = 1usize;
    // One scenario only (profiling); the results files are then left as they are.
    let mut only: Option<String> = None;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?
        .to_path_buf();
    let mut binary = root.join("target/release/servicegate");
    let mut hugepages = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--suite" => {
                suite_name = args.next().context("--suite quick|full")?;
                suite = match suite_name.as_str() {
                    "quick" => Suite::Quick,
                    "full" => Suite::Full,
                    other => bail!("--suite {other}: expected quick or full"),
                };
            }
            "--runs" => runs = args.next().context("--runs N")?.parse()?,
            "--servicegate" => binary = PathBuf::from(args.next().context("--servicegate PATH")?),
            "--only" => only = Some(args.next().context("--only NAME[:FLOWS]")?),
            // servicegate's memory on 2 MiB hugepages (reserved and mounted beforehand).
            "--hugepages" => hugepages = true,
            "-h" | "--help" => {
                println!(
                    "perf --suite quick|full [--runs N] [--only NAME[:FLOWS]] [--servicegate PATH] [--hugepages]"
                );
                return Ok(());
            }
            other => bail!("unknown argument {other:?}"),
        }
    }
    if !binary.exists() {
        bail!(
            "{} missing: run `cargo build --release` first",
            binary.display()
        );
    }
    let tmp = tempfile::Builder::new().prefix("sg-perf-").tempdir()?;
    let (tsc_hz, tsc_note) = run::tsc_hz();
    let many = tmp.path().join("many-services");
    let mut scen = scenarios(suite);
    if let Some(only) = &only {
        let (name, flows) = match only.split_once(':') {
            Some((n, f)) => (n, Some(f.parse::<usize>().context("--only NAME:FLOWS")?)),
            None => (only.as_str(), None),
        };
        scen.retain(|s| s.name == name && flows.is_none_or(|f| f == s.flows));
        if scen.is_empty() {
            bail!("--only {only}: no such scenario in this suite");
        }
    }
    if scen.iter().any(|s| s.many_services) {
        gen::write_many_services(&many)?;
    }
    let mut ctx = Ctx {
        binary,
        dir: tmp.path().to_path_buf(),
        tsc_hz,
        lab: root.join("configs/lab"),
        many,
        next_admin: 19_000 + (std::process::id() % 1000) as u16 * 10,
        hugepages,
    };
    eprintln!("TSC {:.0} MHz ({tsc_note})", tsc_hz / 1e6);
    let mut files = Vec::new();
    for s in &scen {
        files.push(capture(&ctx, s)?);
    }
    let mut all: Vec<Vec<Row>> = vec![Vec::new(); scen.len()];
    for run in 0..runs {
        for (i, s) in scen.iter().enumerate() {
            let row = run_scenario(&mut ctx, s, &files[i], run);
            all[i].push(row);
        }
    }
    let rows: Vec<Row> = all.iter().map(|r| median_row(r)).collect();
    println!("{}", table(&rows));
    for r in &rows {
        if !r.notes.is_empty() || r.new_flows_per_pkt.is_finite() {
            println!(
                "{} {}: new flows/pkt {}, fast path/pkt {} {}",
                r.name,
                r.flows,
                fmt(r.new_flows_per_pkt, 3),
                fmt(r.fast_path_share, 3),
                r.notes.join("; ")
            );
        }
    }
    if only.is_some() {
        return Ok(());
    }
    let perf_dir = root.join("perf");
    std::fs::create_dir_all(perf_dir.join("results"))?;
    std::fs::write(
        perf_dir.join("results/latest.json"),
        serde_json::to_string_pretty(&json(&rows))? + "\n",
    )?;
    let results = perf_dir.join("RESULTS.md");
    // The hand-written reading of the figures outlives the table it reads: keep it.
    let analysis = std::fs::read_to_string(&results)
        .ok()
        .and_then(|old| old.find(ANALYSIS_HEADING).map(|at| old[at..].to_string()));
    let mut text = results_md(&rows, &suite_name, runs, &tsc_note, &scen);
    if let Some(analysis) = analysis {
        text.push('\n');
        text.push_str(&analysis);
    }
    std::fs::write(results, text)?;
    Ok(())
}

/// Where `perf/RESULTS.md`'s hand-written part starts; everything from it on is kept when
/// the table above it is regenerated.
const ANALYSIS_HEADING: &str = "## Reading the figures";
