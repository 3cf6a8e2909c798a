//! `servicegate ctl capture`: packets of a running gateway's port into a pcapng file that
//! tcpdump and Wireshark read. This process joins the gateway as a DPDK secondary process
//! (so the gateway must run on hugepages), asks it to copy the port's frames through
//! `rte_pdump` (filtered in the gateway by `rte_bpf`, compiled from libpcap syntax), and
//! writes them with `rte_pcapng`. The port, its device and the EAL file prefix come from
//! the admin API (`/v1/ports`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use dataplane::dpdk::{CaptureSpec, Eal, PortCapture};
use serde_json::Value;

/// Which frames of the port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Direction {
    Rx,
    Tx,
    Both,
}

#[derive(Clone, Debug)]
pub struct CaptureRequest {
    pub admin: String,
    pub port: String,
    pub queue: Option<u16>,
    pub direction: Direction,
    pub filter: Option<String>,
    /// Stop after this many frames (0: only `duration` stops).
    pub count: u64,
    pub duration: Option<Duration>,
    pub snaplen: u32,
    pub output: PathBuf,
}

/// Runs the capture to its end; prints how many frames went to the file.
pub fn run(request: &CaptureRequest) -> anyhow::Result<()> {
    if request.count == 0 && request.duration.is_none() {
        bail!("give --count N, --duration SECONDS, or both");
    }
    let (status, body) = crate::ctl::get(&request.admin, "/v1/ports")?;
    if status != 200 {
        bail!("{}/v1/ports answered {status}: {body}", request.admin);
    }
    let info: Value = serde_json::from_str(&body).context("/v1/ports")?;
    let ports = info["ports"].as_array().cloned().unwrap_or_default();
    let Some(port) = ports.iter().find(|p| p["name"] == request.port.as_str()) else {
        let names: Vec<&str> = ports.iter().filter_map(|p| p["name"].as_str()).collect();
        bail!(
            "no port {:?} in the gateway (ports: {})",
            request.port,
            names.join(", ")
        );
    };
    if info["hugepages"] != true {
        bail!(
            "the gateway runs with --no-huge (eal.args): its memory is private, so no capture \
             process can attach; run it on hugepages (e.g. `echo 512 > /proc/sys/vm/nr_hugepages` \
             and eal.args without --no-huge)"
        );
    }
    if let Some(queue) = request.queue {
        let queues = port["queues"]
            .as_u64()
            .unwrap_or(0)
            .max(port["tx_queues"].as_u64().unwrap_or(0));
        if u64::from(queue) >= queues {
            bail!("port {} has queues 0..{queues}, not {queue}", request.port);
        }
    }
    let device = port["device"]
        .as_str()
        .ok_or_else(|| anyhow!("/v1/ports: port {} without a device", request.port))?
        .to_string();
    let prefix = info["file_prefix"].as_str().unwrap_or("servicegate");
    let mut args = vec![
        "servicegate-capture".to_string(),
        "--proc-type=secondary".to_string(),
        format!("--file-prefix={prefix}"),
        "--lcores=0".to_string(),
        "--log-level=*:error".to_string(),
    ];
    if info["no_pci"] == true {
        args.push("--no-pci".into());
    }
    let eal =
        Eal::init(&args).map_err(|e| anyhow!("joining the gateway (file prefix {prefix}): {e}"))?;
    let file = std::fs::File::create(&request.output)
        .with_context(|| format!("create {}", request.output.display()))?;
    let spec = CaptureSpec {
        device,
        queue: request.queue,
        rx: request.direction != Direction::Tx,
        tx: request.direction != Direction::Rx,
        filter: request.filter.clone(),
        snaplen: request.snaplen,
    };
    let mut capture = PortCapture::start(&eal, &spec, file).map_err(|e| anyhow!("{e}"))?;
    let deadline = request.duration.map(|d| Instant::now() + d);
    let limit = if request.count == 0 {
        u64::MAX
    } else {
        request.count
    };
    loop {
        capture
            .drain(limit - capture.written)
            .map_err(|e| anyhow!("{e}"))?;
        if capture.written >= limit || deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let written = capture.written;
    drop(capture);
    eprintln!(
        "{written} frames of port {} ({:?}) written to {}",
        request.port,
        request.direction,
        request.output.display()
    );
    Ok(())
}
