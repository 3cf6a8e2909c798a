//! Issue 19 item 1: packet capture on a running gateway, read back with tcpdump. The lab
//! gateway runs on hugepages (DPDK's secondary processes map its memory); `servicegate ctl
//! capture` records the uplink's received frames, its transmitted frames, one queue, each
//! with a libpcap filter run in the gateway, while a kernel client opens connections to
//! the NodePort; `dpdk-dumpcap` from the dpdk package attaches to the same gateway.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tests::harness::{require_root, servicegate_bin, workspace_root};
use tests::lab::Lab;

/// 2 MiB pages for the gateway (`-m 512`) and the capture processes, and hugetlbfs
/// mounted where EAL looks.
fn ensure_hugepages() {
    let mounted = std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(2) == Some("hugetlbfs"));
    if !mounted {
        std::fs::create_dir_all("/dev/hugepages").expect("mkdir /dev/hugepages");
        let out = Command::new("mount")
            .args(["-t", "hugetlbfs", "nodev", "/dev/hugepages"])
            .output()
            .expect("mount");
        assert!(out.status.success(), "mount hugetlbfs: {out:?}");
    }
    let path = "/proc/sys/vm/nr_hugepages";
    let pages: u64 = std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    if pages < 512 {
        std::fs::write(path, "512").expect("reserve hugepages");
    }
}

/// `tcpdump -nr FILE`: one line per frame.
fn tcpdump(file: &Path) -> Vec<String> {
    let out = Command::new("tcpdump")
        .args(["-nr"])
        .arg(file)
        .output()
        .expect("tcpdump");
    assert!(
        out.status.success(),
        "tcpdump -r {}: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

fn capture(lab: &Lab, args: &[&str], file: &Path) -> Vec<String> {
    let out = Command::new(servicegate_bin())
        .args(["ctl", "capture", "--admin", &lab.admin, "--duration", "30"])
        .args(args)
        .arg("-w")
        .arg(file)
        .output()
        .expect("servicegate ctl capture");
    assert!(
        out.status.success(),
        "ctl capture {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    tcpdump(file)
}

#[test]
fn ctl_capture_and_dpdk_dumpcap_record_a_live_gateway_port() {
    require_root();
    ensure_hugepages();
    let manifests = workspace_root().join("configs/lab");
    let lab = Lab::start("capture", |_, config| {
        config
            .replace("\"--no-huge\", \"-m\", \"1024\"", "\"-m\", \"512\"")
            .replace("path: lab ", &format!("path: {} ", manifests.display()))
    });
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let (stop, prefix) = (stop.clone(), lab.prefix.clone());
        let script = workspace_root().join("tests/lab/client.py");
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let _ = Command::new("ip")
                    .args(["netns", "exec", &format!("{prefix}-client"), "python3"])
                    .arg(&script)
                    .args(["count", "http://192.168.100.1:30080/", "20"])
                    .output();
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let dir = lab.dir.path().to_path_buf();

    let rx = capture(
        &lab,
        &[
            "--port",
            "uplink",
            "--direction",
            "rx",
            "--filter",
            "tcp dst port 30080",
            "-c",
            "10",
        ],
        &dir.join("rx.pcapng"),
    );
    println!(
        "capture figure: rx, tcp dst port 30080: {} frames, first: {:?}",
        rx.len(),
        rx.first()
    );
    assert_eq!(rx.len(), 10, "{rx:#?}");
    assert!(
        rx.iter().all(|l| l.contains("> 192.168.100.1.30080:")),
        "{rx:#?}"
    );

    let tx = capture(
        &lab,
        &[
            "--port",
            "uplink",
            "--direction",
            "tx",
            "--filter",
            "tcp src port 30080",
            "-c",
            "10",
        ],
        &dir.join("tx.pcapng"),
    );
    println!(
        "capture figure: tx, tcp src port 30080: {} frames, first: {:?}",
        tx.len(),
        tx.first()
    );
    assert_eq!(tx.len(), 10, "{tx:#?}");
    assert!(
        tx.iter().all(|l| l.contains(" 192.168.100.1.30080 > ")),
        "{tx:#?}"
    );

    // Both directions of queue 0, unfiltered: requests and answers.
    let both = capture(
        &lab,
        &[
            "--port",
            "uplink",
            "--queue",
            "0",
            "--filter",
            "tcp port 30080",
            "-c",
            "40",
        ],
        &dir.join("both.pcapng"),
    );
    assert_eq!(both.len(), 40, "{both:#?}");
    assert!(
        both.iter().any(|l| l.contains("> 192.168.100.1.30080:")),
        "{both:#?}"
    );
    assert!(
        both.iter().any(|l| l.contains(" 192.168.100.1.30080 > ")),
        "{both:#?}"
    );

    // DPDK's own tool attaches the same way.
    let dumpcap_file = dir.join("dumpcap.pcapng");
    let out = Command::new("timeout")
        .args([
            "30",
            "dpdk-dumpcap",
            &format!("--file-prefix={}", lab.prefix),
        ])
        .args([
            "-i",
            "net_tap0",
            "-f",
            "tcp port 30080",
            "-c",
            "5",
            "-q",
            "-w",
        ])
        .arg(&dumpcap_file)
        .output()
        .expect("dpdk-dumpcap (the dpdk package)");
    assert!(out.status.success(), "dpdk-dumpcap: {out:?}");
    let dumped = tcpdump(&dumpcap_file);
    println!("capture figure: dpdk-dumpcap: {} frames", dumped.len());
    assert_eq!(dumped.len(), 5, "{dumped:#?}");

    stop.store(true, Ordering::SeqCst);
    traffic.join().unwrap();
    // The gateway still forwards after every capture ended (callbacks removed).
    let after = lab.client("client", &["count", "http://192.168.100.1:30080/", "20"]);
    assert_eq!(after["failed"], 0, "{after}");
}
