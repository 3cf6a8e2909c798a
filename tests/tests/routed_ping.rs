//! Issue 3, must-show 3 (routing half): live, with network namespaces and net_tap ports, a
//! client pings a host on the far side of the gateway (not an address the gateway answers
//! itself): the gateway answers the client's ARP for its address, resolves the far host by
//! ARPing for it, and routes both ways. The SSH-like half (the gateway's own address
//! reaching its kernel through the exception port) is lab.rs's
//! `the_gateway_own_address_reaches_its_kernel_through_the_exception_path`.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dataplane::wire::{arp, ethernet, ArpPacket, EthernetFrame};
use tests::harness::{
    http_get, read_pcap, require_root, sh, unique_name, wait_for_link, ChildGuard, Gateway, Netns,
    TempDir,
};

const UPLINK_MAC: &str = "02:53:47:00:00:01";
const CLUSTER_MAC: &str = "02:53:47:00:00:02";

/// ARP packets of a capture as (operation, sender MAC, sender IP, target IP).
fn arps(frames: &[Vec<u8>]) -> Vec<(u16, String, Ipv4Addr, Ipv4Addr)> {
    frames
        .iter()
        .filter_map(|f| {
            let e = EthernetFrame::new_checked(&f[..]).ok()?;
            if e.ethertype() != ethernet::ETHERTYPE_ARP {
                return None;
            }
            let a = ArpPacket::new_checked(e.payload()).ok()?;
            Some((
                a.operation(),
                a.sender_hw().to_string(),
                a.sender_ip(),
                a.target_ip(),
            ))
        })
        .collect()
}

/// tcpdump of ARP on `link` in `ns` into `file`, killed on drop; returns once it listens
/// (the file header is written before the capture is armed, so it tells nothing).
fn capture_arp(ns: &Netns, link: &str, file: &Path) -> ChildGuard {
    let log = file.with_extension("log");
    let child = Command::new("ip")
        .args(["netns", "exec", &ns.name, "tcpdump", "-i", link, "-U", "-n"])
        // Without it libpcap hands packets over per filled block or per second.
        .arg("--immediate-mode")
        .args(["-Z", "root", "-w"])
        .arg(file)
        .arg("arp")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("tcpdump log"))
        .spawn()
        .expect("spawn tcpdump");
    let guard = ChildGuard(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("listening on")
    {
        assert!(Instant::now() < deadline, "tcpdump on {link} did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    guard
}

/// The MAC `ip neigh` in `ns` holds for `addr` (None when absent or unresolved).
fn neighbor_mac(ns: &Netns, addr: &str) -> Option<String> {
    let out = ns.exec(&["ip", "neigh", "show", addr]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut words = text.split_whitespace();
    words.find(|w| *w == "lladdr")?;
    words.next().map(str::to_string)
}

#[test]
fn a_client_pings_a_host_behind_the_gateway() {
    require_root();
    let dir = TempDir::new("ping");
    let (up_tap, cl_tap) = (unique_name("sgpu"), unique_name("sgpc"));
    let admin = format!("127.0.0.1:{}", 21000 + std::process::id() % 20000);
    let id = std::process::id() % 1000;
    // No static neighbors: the gateway must learn the client and resolve the far host. The
    // far host's subnet is opened to the uplink (the edge policy drops it by default).
    let config = format!(
        "eal:\n  args: [\"--no-huge\", \"-m\", \"512\", \"--log-level=*:warning\"]\n  \
         no_pci: true\n  file_prefix: {prefix}\n\
         cores:\n  control: 0\n  workers: [1]\n  idle_sleep_us: 20\n\
         ports:\n\
         \x20 - name: uplink\n    device: \"net_tap{id},iface={up_tap},mac={UPLINK_MAC}\"\n    \
         role: uplink\n    addresses: [192.168.100.1/24]\n\
         \x20 - name: cluster\n    device: \"net_tap{id2},iface={cl_tap},mac={CLUSTER_MAC}\"\n    \
         role: cluster\n    addresses: [10.0.0.1/24]\n\
         services:\n  source: files\n  path: {manifests}\n\
         edge:\n  routable_prefixes: [10.0.0.0/24]\n\
         admin:\n  listen: {admin}\n",
        prefix = unique_name("sgp"),
        id2 = id + 1,
        // Services play no part here; the lab's are a valid source.
        manifests = tests::harness::workspace_root()
            .join("configs/lab")
            .display(),
    );
    let config_path = dir.path().join("gateway.yaml");
    std::fs::write(&config_path, config).expect("write config");

    let mut gateway = Gateway::start(&config_path, &admin);
    gateway.wait_ready(Duration::from_secs(30));
    wait_for_link(&up_tap, Duration::from_secs(20));
    wait_for_link(&cl_tap, Duration::from_secs(20));
    let client = Netns::new("sgpcl");
    let far = Netns::new("sgpfar");
    for (ns, link, addr, via) in [
        (&client, &up_tap, "192.168.100.10/24", "192.168.100.1"),
        (&far, &cl_tap, "10.0.0.50/24", "10.0.0.1"),
    ] {
        sh("ip", &["link", "set", link, "netns", &ns.name]);
        ns.exec(&["ip", "addr", "add", addr, "dev", link]);
        ns.exec(&["ip", "link", "set", link, "up"]);
        ns.exec(&["ip", "route", "add", "default", "via", via]);
    }
    // ARP as each side sees it.
    let client_arp = dir.path().join("client-arp.pcap");
    let far_arp = dir.path().join("far-arp.pcap");
    let captures = [
        capture_arp(&client, &up_tap, &client_arp),
        capture_arp(&far, &cl_tap, &far_arp),
    ];
    assert_eq!(neighbor_mac(&client, "192.168.100.1"), None, "fresh client");
    assert_eq!(neighbor_mac(&far, "10.0.0.1"), None, "fresh far host");

    let started = Instant::now();
    let ping = client.exec_any(&["ping", "-c", "3", "-W", "2", "-i", "0.3", "10.0.0.50"]);
    let ping_time = started.elapsed();
    let ping_out = String::from_utf8_lossy(&ping.stdout).to_string();
    let (_, metrics) = http_get(&admin, "/metrics").expect("metrics");
    // Read while the taps exist: stopping the gateway deletes them and their neighbors.
    let client_gateway_mac = neighbor_mac(&client, "192.168.100.1");
    let far_gateway_mac = neighbor_mac(&far, "10.0.0.1");
    for mut capture in captures {
        // SIGINT: tcpdump flushes and exits; the guard kills it if it does not.
        sh("kill", &["-INT", &capture.0.id().to_string()]);
        let deadline = Instant::now() + Duration::from_secs(5);
        while capture.0.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let (ok, out, err) = gateway.stop();
    assert!(
        ping.status.success() && ping_out.contains("3 received"),
        "ping 10.0.0.50 through the gateway failed after {ping_time:?}:\n{ping_out}\ngateway:\n{out}\n{err}"
    );
    assert!(ok, "gateway did not exit 0:\n{out}\n{err}");
    assert!(out.contains("mbufs in use after stop: 0"), "{out}");
    // Replies came from the far host itself, routed: TTL 64 less the gateway's hop.
    assert!(ping_out.contains("ttl=63"), "routed replies: {ping_out}");

    // The kernels hold the gateway's MACs (ARP resolved toward the gateway)...
    assert_eq!(
        client_gateway_mac.as_deref(),
        Some(UPLINK_MAC),
        "client's neighbor entry for its gateway"
    );
    assert_eq!(
        far_gateway_mac.as_deref(),
        Some(CLUSTER_MAC),
        "far host's neighbor entry for the gateway"
    );
    // ...the gateway answered the client's ARP and asked for the far host itself (no
    // static neighbor: it had to resolve it before the first echo could leave)...
    let client_side = arps(&read_pcap(&client_arp));
    assert!(
        client_side.contains(&(
            arp::OP_REPLY,
            UPLINK_MAC.to_string(),
            Ipv4Addr::new(192, 168, 100, 1),
            Ipv4Addr::new(192, 168, 100, 10)
        )),
        "the gateway's ARP reply to the client: {client_side:?}"
    );
    let far_side = arps(&read_pcap(&far_arp));
    assert!(
        far_side.contains(&(
            arp::OP_REQUEST,
            CLUSTER_MAC.to_string(),
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::new(10, 0, 0, 50)
        )),
        "the gateway's ARP request for the far host: {far_side:?}"
    );
    // ...and no echo waited in vain for a neighbor.
    let no_neighbor = metrics
        .lines()
        .find(|l| l.starts_with("servicegate_drops_total{reason=\"no_neighbor\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no no_neighbor counter in:\n{metrics}"));
    assert_eq!(no_neighbor, 0.0, "frames dropped waiting for ARP");
}
