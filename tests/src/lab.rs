//! The lab (tests/lab/topology.sh) around a real servicegate: what `tests/tests/lab.rs`
//! (files source) and `tests/tests/lab_nodes.rs` (kubernetes source) share. Each [`Lab`] has
//! unique namespace, tap and EAL names and tears everything down on drop, even when a test
//! fails.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{
    http_get, require_root, servicegate_bin, unique_name, workspace_root, Gateway, TempDir,
};

pub struct Lab {
    pub dir: TempDir,
    /// Namespace names are `{prefix}-client`, `{prefix}-node1`, ...
    pub prefix: String,
    /// The uplink, cluster and exception taps.
    pub taps: [String; 3],
    gateway: Option<Gateway>,
    pub admin: String,
}

impl Lab {
    /// Starts servicegate on configs/lab.yaml with this lab's taps, EAL prefix and admin
    /// address, after `edit` (given the lab's scratch directory) rewrote the rest of the
    /// config; waits for `/readyz`, then builds the topology (`topology.sh up`).
    pub fn start(tag: &str, edit: impl FnOnce(&Path, String) -> String) -> Lab {
        require_root();
        let root = workspace_root();
        let dir = TempDir::new(tag);
        let n = unique_name("");
        let short = &n[n.len().saturating_sub(5)..];
        let prefix = format!("sg{short}");
        let taps = [
            format!("{prefix}u"),
            format!("{prefix}c"),
            format!("{prefix}k"),
        ];
        let admin = format!("127.0.0.1:{}", 30000 + std::process::id() % 20000);
        let config = std::fs::read_to_string(root.join("configs/lab.yaml"))
            .unwrap()
            .replace("iface=sg-up,", &format!("iface={},", taps[0]))
            .replace("iface=sg-cl,", &format!("iface={},", taps[1]))
            .replace("iface=sg-up-k\"", &format!("iface={}\"", taps[2]))
            .replace("file_prefix: sg-lab", &format!("file_prefix: {prefix}"))
            .replace("127.0.0.1:9900", &admin);
        let config = edit(dir.path(), config);
        let config_path = dir.path().join("gateway.yaml");
        std::fs::write(&config_path, config).unwrap();
        let mut lab = Lab {
            dir,
            prefix,
            taps,
            gateway: None,
            admin: admin.clone(),
        };
        let mut gateway = Gateway::start(&config_path, &admin);
        gateway.wait_ready(Duration::from_secs(30));
        lab.gateway = Some(gateway);
        lab.topology("up");
        lab
    }

    /// Runs `topology.sh ACTION` for this lab; every action but `down` must succeed.
    pub fn topology(&self, action: &str) {
        let script = workspace_root().join("tests/lab/topology.sh");
        let out = Command::new("bash")
            .arg(script)
            .args([
                action,
                &self.prefix,
                &self.taps[0],
                &self.taps[1],
                &self.taps[2],
            ])
            .output()
            .expect("topology.sh");
        if action != "down" {
            assert!(
                out.status.success(),
                "topology {action} failed:\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    fn client_command(&self, ns: &str, args: &[&str]) -> Command {
        let script = workspace_root().join("tests/lab/client.py");
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &format!("{}-{ns}", self.prefix), "python3"])
            .arg(script)
            .args(args);
        command
    }

    /// Runs tests/lab/client.py in namespace `ns` (e.g. "cpod", "client"): its JSON.
    pub fn client(&self, ns: &str, args: &[&str]) -> Value {
        let out = self.client_command(ns, args).output().expect("client.py");
        let stdout = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "client {args:?}: {e}: {stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// Starts tests/lab/client.py in namespace `ns` in the background.
    pub fn spawn_client(&self, ns: &str, args: &[&str]) -> Child {
        self.client_command(ns, args)
            .stdout(Stdio::null())
            .spawn()
            .expect("client.py")
    }

    /// The value of metric `name` without labels (or its first labelled sample); 0 if absent.
    pub fn metric(&self, name: &str) -> f64 {
        let (_, body) = http_get(&self.admin, "/metrics").expect("metrics");
        body.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }

    /// The value of the metric line starting with `prefix` (name and labels).
    pub fn metric_line(&self, prefix: &str) -> Option<f64> {
        let (_, body) = http_get(&self.admin, "/metrics").expect("metrics");
        body.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    /// Waits until the snapshot generation passes `after`.
    pub fn wait_generation(&self, after: f64) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let generation = self.metric("servicegate_snapshot_generation");
            if generation > after {
                return generation;
            }
            assert!(
                Instant::now() < deadline,
                "no new snapshot after generation {after}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `servicegate ctl trace FLOW` against this lab's gateway: the text it prints.
    pub fn ctl_trace(&self, flow: &str) -> String {
        let out = Command::new(servicegate_bin())
            .args(["ctl", "--admin", &self.admin, "trace", flow])
            .output()
            .expect("servicegate ctl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "ctl trace {flow}: {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        println!("$ servicegate ctl trace '{flow}'\n{text}");
        text
    }

    /// Sends `signal` (`HUP`, ...) to the gateway.
    pub fn signal(&self, signal: &str) {
        self.gateway
            .as_ref()
            .expect("gateway running")
            .signal(signal);
    }

    /// The gateway's process id (for /proc/PID/status and the like).
    pub fn gateway_pid(&self) -> u32 {
        self.gateway
            .as_ref()
            .and_then(Gateway::pid)
            .expect("gateway running")
    }

    /// The config file the gateway runs (and reads again on SIGHUP).
    pub fn config_path(&self) -> std::path::PathBuf {
        self.dir.path().join("gateway.yaml")
    }

    /// `GET /v1/trace?flow=FLOW`: the JSON explanation.
    pub fn trace(&self, flow: &str) -> Value {
        let query = flow.replace(' ', "%20").replace('>', "%3E");
        let (code, body) = http_get(&self.admin, &format!("/v1/trace?flow={query}"))
            .unwrap_or_else(|e| panic!("GET /v1/trace: {e}"));
        assert_eq!(code, 200, "/v1/trace?flow={flow}: {body}");
        serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("/v1/trace is not JSON ({e}): {body}"))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.topology("down");
        if let Some(gateway) = self.gateway.take() {
            let (ok, out, err) = gateway.stop();
            if !std::thread::panicking() {
                assert!(ok, "gateway did not exit 0:\n{out}\n{err}");
                assert!(out.contains("mbufs in use after stop: 0"), "{out}");
            }
        }
    }
}

/// Copies the lab's manifests (configs/lab/) into `dir`/manifests, leaving out the
/// EndpointSlices named in `taken` (the caller writes those itself, in their own files), and
/// returns that directory.
pub fn lab_manifests_without(dir: &Path, taken: &[&str]) -> std::path::PathBuf {
    let root = workspace_root();
    let manifests = dir.join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    std::fs::copy(
        root.join("configs/lab/services.yaml"),
        manifests.join("services.yaml"),
    )
    .unwrap();
    let slices = std::fs::read_to_string(root.join("configs/lab/endpointslices.yaml")).unwrap();
    let documents: Vec<&str> = slices.split("\n---\n").collect();
    let others: Vec<&str> = documents
        .iter()
        .copied()
        .filter(|d| {
            !taken
                .iter()
                .any(|name| d.contains(&format!("name: {name}\n")))
        })
        .collect();
    assert_eq!(
        others.len() + taken.len(),
        documents.len(),
        "every slice of {taken:?} is in configs/lab/endpointslices.yaml"
    );
    std::fs::write(
        manifests.join("endpointslices.yaml"),
        others.join("\n---\n"),
    )
    .unwrap();
    manifests
}
