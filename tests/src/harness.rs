//! What end-to-end tests share: the real `servicegate` binary, network namespaces and taps
//! that clean up even when a test fails, pcap files in and out.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The release binary (the README's test command builds it first). `SERVICEGATE_BIN`
/// overrides.
pub fn servicegate_bin() -> PathBuf {
    if let Ok(path) = std::env::var("SERVICEGATE_BIN") {
        return PathBuf::from(path);
    }
    let root = workspace_root();
    for profile in ["release", "debug"] {
        let candidate = root.join("target").join(profile).join("servicegate");
        if candidate.exists() {
            return candidate;
        }
    }
    panic!(
        "servicegate binary not found: run `cargo build --release` first (or set SERVICEGATE_BIN)"
    );
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

/// Tests that need root, taps or namespaces: in CI (root) they always run; elsewhere they
/// fail loudly rather than silently skip.
pub fn require_root() {
    // SAFETY-free check: /proc/self/status Uid line.
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let uid = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("1");
    assert_eq!(
        uid, "0",
        "this test needs root (network namespaces, taps, DPDK)"
    );
}

static UNIQUE: AtomicU32 = AtomicU32::new(0);

/// A short name unique to this process and call (interface names are ≤ 15 bytes).
pub fn unique_name(tag: &str) -> String {
    let n = UNIQUE.fetch_add(1, Ordering::SeqCst);
    let pid = std::process::id() % 10000;
    format!("{tag}{pid}x{n}")
}

/// Runs a command, panicking with its output if it fails.
pub fn sh(program: &str, args: &[&str]) -> Output {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Runs a command, returning its output whatever the status.
pub fn sh_any(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

/// A network namespace deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = unique_name(tag);
        sh("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Runs a command inside the namespace, panicking on failure.
    pub fn exec(&self, args: &[&str]) -> Output {
        let mut full = vec!["netns", "exec", self.name.as_str()];
        full.extend_from_slice(args);
        sh("ip", &full)
    }

    pub fn exec_any(&self, args: &[&str]) -> Output {
        let mut full = vec!["netns", "exec", self.name.as_str()];
        full.extend_from_slice(args);
        sh_any("ip", &full)
    }

    /// Starts a long-running command inside the namespace (killed on drop of the Child guard).
    pub fn spawn(&self, args: &[&str]) -> ChildGuard {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn in netns");
        ChildGuard(child)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .map(|out| {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).output();
                }
            });
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A child process killed when dropped.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits for a kernel interface to exist (a net_tap port creates it at EAL init).
pub fn wait_for_link(name: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if Path::new("/sys/class/net").join(name).exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("interface {name} did not appear within {timeout:?}");
}

/// A running `servicegate run`: stopped with SIGINT on drop (or `stop`), output kept.
pub struct Gateway {
    child: Option<Child>,
    pub admin: String,
    stdout: Option<std::thread::JoinHandle<String>>,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Gateway {
    pub fn start(config: &Path, admin: &str) -> Gateway {
        let mut child = Command::new(servicegate_bin())
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start servicegate");
        let mut out = child.stdout.take().expect("stdout");
        let err = child.stderr.take().expect("stderr");
        let stdout = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = out.read_to_string(&mut text);
            text
        });
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if std::env::var("SG_TEST_VERBOSE").is_ok() {
                    eprintln!("[gateway] {line}");
                }
                text.push_str(&line);
                text.push('\n');
            }
            text
        });
        Gateway {
            child: Some(child),
            admin: admin.to_string(),
            stdout: Some(stdout),
            stderr: Some(stderr),
        }
    }

    /// Waits for `GET /readyz` to answer 200.
    pub fn wait_ready(&mut self, timeout: Duration) {
        self.wait_for_200("/readyz", timeout);
    }

    /// Waits for `GET path` of the admin API to answer 200 (`/healthz`: the ports are started
    /// and the workers poll, even where readiness waits for the ports' links).
    pub fn wait_for_200(&mut self, path: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    let (out, err) = self.take_output();
                    panic!(
                        "servicegate exited early with {status}\nstdout:\n{out}\nstderr:\n{err}"
                    );
                }
            }
            if http_get(&self.admin, path)
                .map(|(code, _)| code == 200)
                .unwrap_or(false)
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.as_mut().map(|c| c.kill());
        let (out, err) = self.take_output();
        panic!("servicegate: no 200 on {path} within {timeout:?}\nstdout:\n{out}\nstderr:\n{err}");
    }

    fn take_output(&mut self) -> (String, String) {
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
        let out = self
            .stdout
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default();
        let err = self
            .stderr
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default();
        (out, err)
    }

    /// The process id (for signals).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process still runs.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Sends `signal` (`TERM`, `KILL`, ...) without waiting.
    pub fn signal(&self, signal: &str) {
        if let Some(pid) = self.pid() {
            sh("kill", &[&format!("-{signal}"), &pid.to_string()]);
        }
    }

    /// Waits up to `timeout` for the process to exit by itself (after a signal the test sent),
    /// killing it after that; returns (exit status if it exited in time, stdout, stderr).
    pub fn wait_exit(
        mut self,
        timeout: Duration,
    ) -> (Option<std::process::ExitStatus>, String, String) {
        let mut status = None;
        if let Some(child) = self.child.as_mut() {
            let deadline = Instant::now() + timeout;
            loop {
                match child.try_wait() {
                    Ok(Some(s)) => {
                        status = Some(s);
                        break;
                    }
                    _ if Instant::now() > deadline => {
                        let _ = child.kill();
                        break;
                    }
                    _ => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
        let (out, err) = self.take_output();
        (status, out, err)
    }

    /// SIGINT, wait for exit; returns (exit success, stdout, stderr).
    pub fn stop(mut self) -> (bool, String, String) {
        let mut ok = false;
        if let Some(child) = self.child.as_mut() {
            let _ = Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .output();
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                match child.try_wait() {
                    Ok(Some(status)) => {
                        ok = status.success();
                        break;
                    }
                    _ if Instant::now() > deadline => {
                        let _ = child.kill();
                        break;
                    }
                    _ => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
        let (out, err) = self.take_output();
        (ok, out, err)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .output();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A minimal HTTP/1.0 GET: (status, body).
pub fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

/// Writes frames as a classic pcap file (Ethernet link type), one microsecond apart.
pub fn write_pcap(path: &Path, frames: &[Vec<u8>]) {
    let file =
        std::fs::File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    let mut writer = pcap_file::pcap::PcapWriter::new(std::io::BufWriter::new(file))
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    for (i, frame) in frames.iter().enumerate() {
        let packet = pcap_file::pcap::PcapPacket::new(
            Duration::from_micros(i as u64),
            frame.len() as u32,
            frame,
        );
        writer
            .write_packet(&packet)
            .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }
    writer
        .into_writer()
        .flush()
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// Reads the frames of a classic pcap file.
pub fn read_pcap(path: &Path) -> Vec<Vec<u8>> {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let mut reader = pcap_file::pcap::PcapReader::new(std::io::BufReader::new(file))
        .unwrap_or_else(|e| panic!("{} is not a pcap: {e}", path.display()));
    let mut frames = Vec::new();
    while let Some(packet) = reader.next_packet() {
        let packet = packet
            .unwrap_or_else(|e| panic!("{}: record {}: {e}", path.display(), frames.len() + 1));
        frames.push(packet.data.into_owned());
    }
    frames
}

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let path = std::env::temp_dir().join(unique_name(&format!("sg-{tag}-")));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A tiny deterministic PRNG for generated inputs (xorshift64*).
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// A background client (tests/lab/client.py's `load` and `streams` modes) that writes its
/// JSON result to a file when it gets SIGTERM; killed on drop if not finished.
pub struct Background(pub Option<Child>);

impl Background {
    /// SIGTERM, wait for the client to exit, and read its result from `out`.
    pub fn finish(mut self, out: &Path) -> serde_json::Value {
        let mut child = self.0.take().expect("running");
        sh("kill", &["-TERM", &child.id().to_string()]);
        let status = child.wait().expect("client exit");
        let text = std::fs::read_to_string(out)
            .unwrap_or_else(|e| panic!("client ({status}) wrote no {}: {e}", out.display()));
        serde_json::from_str(&text).expect("client result")
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `servicegate replay --config CONFIG --in PORT=FILE... --out-dir OUT`, which must succeed:
/// its report (stdout).
pub fn replay(config: &Path, inputs: &[(&str, &Path)], out_dir: &Path) -> String {
    let mut command = Command::new(servicegate_bin());
    command.args(["replay", "--config"]).arg(config);
    for (port, input) in inputs {
        command
            .arg("--in")
            .arg(format!("{port}={}", input.display()));
    }
    let output = command
        .arg("--out-dir")
        .arg(out_dir)
        .output()
        .expect("run servicegate replay");
    let report = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        output.status.success(),
        "replay failed:\n{report}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    report
}

/// The drop counters of a replay report (`drop REASON: N` lines).
pub fn replay_drops(report: &str) -> std::collections::BTreeMap<String, u64> {
    report
        .lines()
        .filter_map(|l| l.strip_prefix("drop "))
        .filter_map(|l| l.split_once(": "))
        .map(|(name, n)| (name.to_string(), n.trim().parse().expect("count")))
        .collect()
}
