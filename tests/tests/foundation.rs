//! The foundation, end to end with the real binary and real DPDK (EAL with --no-huge):
//! replay is byte-exact, taps carry kernel frames, two workers account for every packet,
//! `check` accepts every shipped config and names the key of a broken one.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tests::harness::{
    read_pcap, require_root, servicegate_bin, sh_any, unique_name, wait_for_link, write_pcap,
    Gateway, Netns, Rng, TempDir,
};

fn lab_manifests() -> String {
    tests::harness::workspace_root()
        .join("configs/lab")
        .display()
        .to_string()
}

fn io_config(
    dir: &Path,
    ports: &[(&str, &str)],
    workers: &[usize],
    extra: &str,
) -> std::path::PathBuf {
    let mut text = String::new();
    text.push_str("mode: io\n");
    text.push_str(&format!(
        "eal:\n  args: [\"--no-huge\", \"-m\", \"512\", \"--log-level=*:warning\"]\n  no_pci: true\n  file_prefix: {}\n",
        unique_name("sgt")
    ));
    text.push_str(&format!(
        "cores:\n  control: 0\n  workers: [{}]\n",
        workers
            .iter()
            .map(|w| w.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    ));
    text.push_str("ports:\n");
    for (name, device) in ports {
        text.push_str(&format!(
            "  - name: {name}\n    device: \"{device}\"\n    role: uplink\n"
        ));
        text.push_str(extra);
    }
    text.push_str(&format!(
        "services:\n  source: files\n  path: {}\n",
        lab_manifests()
    ));
    text.push_str(&format!(
        "admin:\n  listen: 127.0.0.1:{}\n",
        20000 + std::process::id() % 20000
    ));
    let path = dir.join("gateway.yaml");
    std::fs::write(&path, text).expect("write config");
    path
}

fn admin_address() -> String {
    format!("127.0.0.1:{}", 20000 + std::process::id() % 20000)
}

#[test]
fn replay_forwards_ten_thousand_mixed_frames_byte_identical() {
    require_root();
    let dir = TempDir::new("replay");
    let mut rng = Rng(0x5eed);
    let frames: Vec<Vec<u8>> = (0..10_000)
        .map(|i| {
            let len = 60 + rng.below(1514 - 60 + 1) as usize;
            let mut frame: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            frame[0] = 0x02; // unicast, locally administered
            frame[6] = 0x02;
            frame[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
            frame[14..18].copy_from_slice(&(i as u32).to_be_bytes());
            frame
        })
        .collect();
    let sizes: Vec<usize> = frames.iter().map(Vec::len).collect();
    assert!(sizes.contains(&60) || sizes.iter().min() < Some(&100));
    assert!(sizes.iter().max() > Some(&1400));
    let input = dir.path().join("in.pcap");
    write_pcap(&input, &frames);
    let config = io_config(
        dir.path(),
        &[("a", "net_null_unused"), ("b", "net_null_unused2")],
        &[1],
        "",
    );
    let out_dir = dir.path().join("out");
    let output = Command::new(servicegate_bin())
        .args(["replay", "--config"])
        .arg(&config)
        .arg("--in")
        .arg(format!("a={}", input.display()))
        .arg("--out-dir")
        .arg(&out_dir)
        .output()
        .expect("run replay");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "replay failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let out = read_pcap(&out_dir.join("b.pcap"));
    assert_eq!(out.len(), frames.len(), "every frame comes out\n{stdout}");
    for (i, (sent, got)) in frames.iter().zip(&out).enumerate() {
        assert_eq!(sent, got, "frame {i} differs");
    }
    assert!(stdout.contains("port a: rx 10000 tx 0"), "{stdout}");
    assert!(stdout.contains("port b: rx 0 tx 10000"), "{stdout}");
    assert!(stdout.contains("drops total: 0"), "{stdout}");
    assert!(stdout.contains("mbufs in use after stop: 0"), "{stdout}");
}

#[test]
fn two_tap_ports_carry_kernel_frames_both_ways() {
    require_root();
    let dir = TempDir::new("taps");
    let (left, right) = (unique_name("sgl"), unique_name("sgr"));
    let config = io_config(
        dir.path(),
        &[
            (
                "left",
                &format!("net_tap{},iface={left}", std::process::id() % 1000),
            ),
            (
                "right",
                &format!("net_tap{},iface={right}", std::process::id() % 1000 + 1),
            ),
        ],
        &[1],
        "",
    );
    // Ports start before their taps may move into namespaces: wait for the admin API.
    let mut gateway = Gateway::start(&config, &admin_address());
    gateway.wait_ready(Duration::from_secs(30));
    wait_for_link(&left, Duration::from_secs(20));
    wait_for_link(&right, Duration::from_secs(20));
    let a = Netns::new("sga");
    let b = Netns::new("sgb");
    for (ns, link, addr) in [(&a, &left, "10.77.0.1/24"), (&b, &right, "10.77.0.2/24")] {
        tests::harness::sh("ip", &["link", "set", link, "netns", &ns.name]);
        ns.exec(&["ip", "addr", "add", addr, "dev", link]);
        ns.exec(&["ip", "link", "set", link, "up"]);
    }
    // ARP and ICMP both cross the gateway: a reply proves frames went both ways.
    let ping = a.exec_any(&["ping", "-c", "3", "-W", "2", "-i", "0.2", "10.77.0.2"]);
    let (ok, out, err) = gateway.stop();
    assert!(
        ping.status.success(),
        "ping through the taps failed:\n{}\ngateway:\n{out}\n{err}",
        String::from_utf8_lossy(&ping.stdout)
    );
    assert!(ok, "gateway did not exit 0:\n{out}\n{err}");
    assert!(out.contains("mbufs in use after stop: 0"), "{out}");
}

#[test]
fn two_workers_account_for_every_packet_and_return_every_mbuf() {
    require_root();
    let dir = TempDir::new("null");
    let config = io_config(
        dir.path(),
        &[("a", "net_null0,copy=0"), ("b", "net_null1,copy=0")],
        &[0, 1],
        "    queues: 2\n",
    );
    let gateway = Gateway::start(&config, &admin_address());
    std::thread::sleep(Duration::from_secs(4));
    let (ok, out, err) = gateway.stop();
    assert!(ok, "gateway did not exit 0:\n{out}\n{err}");
    let number = |prefix: &str, key: &str| -> u64 {
        out.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.split(key).nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {key} on {prefix} in:\n{out}"))
    };
    let rx = number("port a:", "rx ") + number("port b:", "rx ");
    let tx = number("port a:", "tx ") + number("port b:", "tx ");
    let drops = number("drops total:", "total: ");
    assert!(rx >= 1_000_000, "only {rx} packets in 4 s:\n{out}");
    assert_eq!(rx, tx + drops, "rx = tx + drops must hold:\n{out}");
    assert!(out.contains("workers: 2"), "{out}");
    assert!(out.contains("mbufs in use after stop: 0"), "{out}");
}

#[test]
fn check_accepts_every_shipped_config() {
    let configs = tests::harness::workspace_root().join("configs");
    let mut checked = 0;
    for entry in std::fs::read_dir(&configs).expect("configs/") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let output = Command::new(servicegate_bin())
                .args(["check", "--config"])
                .arg(&path)
                .output()
                .expect("run check");
            assert!(
                output.status.success(),
                "check {} failed:\n{}{}",
                path.display(),
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
            checked += 1;
        }
    }
    assert!(
        checked >= 3,
        "expected lab, bench and real-NIC configs, found {checked}"
    );
}

#[test]
fn check_names_the_key_of_a_broken_config() {
    let dir = TempDir::new("broken");
    let good = format!(
        "ports:\n  - name: uplink\n    device: net_tap0\n    role: uplink\n    addresses: [192.0.2.1/24]\nservices:\n  source: files\n  path: {}\n",
        lab_manifests()
    );
    let cases: &[(&str, String, &str)] = &[
        (
            "unknown key",
            good.replace("role: uplink", "role: uplink\n    colour: blue"),
            "ports[0]: unknown field `colour`",
        ),
        (
            "bad CIDR",
            good.replace("192.0.2.1/24", "192.0.2.300/24"),
            "ports[0].addresses[0]",
        ),
        (
            "unknown port name",
            format!(
                "{good}routes:\n  - prefix: 0.0.0.0/0\n    via: 192.0.2.254\n    port: upl1nk\n"
            ),
            "routes[0].port: unknown port name \"upl1nk\"",
        ),
        (
            "bad core list",
            format!("{good}cores:\n  workers: [1, 1]\n"),
            "cores.workers[1]",
        ),
        (
            "core that does not exist",
            format!("{good}cores:\n  workers: [4096]\n"),
            "cores.workers[0]: core 4096 does not exist",
        ),
        (
            "not a prime",
            format!("{good}maglev:\n  table_size: 1000\n"),
            "maglev.table_size",
        ),
        (
            "missing manifest path",
            good.replace(&lab_manifests(), "/nonexistent/manifests"),
            "services.path: /nonexistent/manifests: no such file or directory",
        ),
        (
            "unreadable kubeconfig",
            good.replace(
                &format!("source: files\n  path: {}", lab_manifests()),
                "source: kubernetes\n  kubeconfig: /nonexistent/kc",
            ),
            "services.kubeconfig: /nonexistent/kc: no such file or directory",
        ),
    ];
    for (what, text, expected) in cases {
        let path = dir.path().join("broken.yaml");
        std::fs::write(&path, text).expect("write");
        let output = Command::new(servicegate_bin())
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .expect("run check");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{what}: check accepted it");
        assert!(
            stderr.contains("broken.yaml"),
            "{what}: error does not name the file: {stderr}"
        );
        assert!(
            stderr.contains(expected),
            "{what}: expected {expected:?} in: {stderr}"
        );
        assert_eq!(
            stderr.trim().lines().count(),
            1,
            "{what}: one-line error expected: {stderr}"
        );
    }
    let _ = sh_any("true", &[]);
}

#[test]
fn check_names_the_file_object_and_field_of_an_invalid_manifest_value() {
    let dir = TempDir::new("invalid-manifest");
    let manifests = dir.path().join("services.yaml");
    std::fs::write(
        &manifests,
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: lab}\nspec:\n  clusterIP: 10.96.0.300\n  ports: [{port: 80}]\n",
    )
    .expect("write");
    let config = dir.path().join("gateway.yaml");
    std::fs::write(
        &config,
        format!(
            "ports:\n  - name: uplink\n    device: net_tap0\n    role: uplink\nservices:\n  source: files\n  path: {}\n",
            manifests.display()
        ),
    )
    .expect("write");
    let output = Command::new(servicegate_bin())
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .expect("run check");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "check accepted it: {stderr}");
    let expected = format!(
        "{}: document 1 (Service lab/web): spec.clusterIP: \"10.96.0.300\" is not an IP address",
        manifests.display()
    );
    assert!(
        stderr.contains(&expected),
        "expected {expected:?} in: {stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

/// kube-semantics item 18: with the Kubernetes source, Services are unknown offline, so
/// `check` says up front when no pod CIDR names its node (internalTrafficPolicy: Local
/// would be treated as Cluster), and stays quiet when one does.
#[test]
fn check_says_when_internal_traffic_policy_local_cannot_be_honoured() {
    let dir = TempDir::new("itp-note");
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\nusers: []\n",
    )
    .expect("write kubeconfig");
    // `vxlan.nodes: none`: only the static pod CIDRs name nodes. With the default
    // (flannel) the nodes come from the API and check says so instead.
    let config = |pod_cidr: &str, nodes: &str| {
        format!(
            "ports:\n  - name: cluster\n    device: net_tap0\n    role: cluster\n    addresses: [10.0.0.1/24]\n\
             vxlan:\n  vni: 1\n  local_vtep: 10.0.0.1\n{nodes}  pod_cidrs:\n    - {pod_cidr}\n\
             services:\n  source: kubernetes\n  kubeconfig: {}\n",
            kubeconfig.display()
        )
    };
    let note = "Services with internalTrafficPolicy: Local will be treated as Cluster";
    let from_api = "nodes (pod CIDRs, VTEPs, VTEP MACs) come from the API";
    for (pod_cidr, nodes, noted) in [
        (
            "{cidr: 10.244.1.0/24, vtep: 10.0.0.11}",
            "  nodes: none\n",
            true,
        ),
        (
            "{cidr: 10.244.1.0/24, vtep: 10.0.0.11, node: node-1}",
            "  nodes: none\n",
            false,
        ),
        ("{cidr: 10.244.1.0/24, vtep: 10.0.0.11}", "", false),
    ] {
        let path = dir.path().join("gateway.yaml");
        std::fs::write(&path, config(pod_cidr, nodes)).expect("write config");
        let output = Command::new(servicegate_bin())
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .expect("run check");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{pod_cidr}: {stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(stdout.contains(note), noted, "{pod_cidr}:\n{stdout}");
        assert_eq!(
            stdout.contains(from_api),
            nodes.is_empty(),
            "{nodes}:\n{stdout}"
        );
    }
}
