//! What the files source costs with one large (~1 MB, valid) manifest file: the time to
//! parse it, and the CPU the source uses while nothing changes (measured from
//! /proc/self/stat; this test binary holds only this test, so the process is the source).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use control::manifests::{load, watch_files};
use control::model::Model;

/// Services and their EndpointSlices (10 endpoints each), `count` of each.
fn large_manifest(count: usize) -> String {
    let mut text = String::new();
    for i in 0..count {
        let (a, b) = (i / 250, i % 250);
        text.push_str(&format!(
            "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: svc-{i}\n  namespace: load\n  \
             labels: {{app: svc-{i}, tier: backend}}\nspec:\n  type: ClusterIP\n  \
             clusterIP: 10.100.{a}.{b}\n  ports:\n  - name: http\n    port: 80\n    \
             targetPort: 8080\n    protocol: TCP\n"
        ));
        text.push_str(&format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  \
             name: svc-{i}-abcde\n  namespace: load\n  labels:\n    \
             kubernetes.io/service-name: svc-{i}\naddressType: IPv4\nports:\n- name: http\n  \
             port: 8080\n  protocol: TCP\nendpoints:\n"
        ));
        for e in 0..10 {
            text.push_str(&format!(
                "- addresses: [10.244.{a}.{}]\n  conditions: {{ready: true}}\n  \
                 nodeName: node-{e}\n",
                (b + e) % 250
            ));
        }
    }
    text
}

/// User + system CPU time of this process.
fn process_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // The fields after the command name (which is in parentheses and may hold spaces).
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // Ticks of USER_HZ, which is 100 on Linux.
    Duration::from_millis(ticks * 10)
}

/// The idle work of the files source before inotify (its loop until this test was
/// written, `fingerprint` verbatim): list the directory, read and hash every file, every
/// `poll`. Runs for `window` and returns the CPU it took.
fn previous_loop_cost(dir: &std::path::Path, poll: Duration, window: Duration) -> Duration {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let fingerprint = |path: &std::path::Path| -> u64 {
        let files = control::manifests::manifest_files(path).unwrap();
        let mut hasher = DefaultHasher::new();
        for file in &files {
            file.hash(&mut hasher);
            let bytes = std::fs::read(file).unwrap();
            bytes.hash(&mut hasher);
        }
        hasher.finish()
    };
    let before = process_cpu();
    let started = Instant::now();
    let first = fingerprint(dir);
    while started.elapsed() < window {
        assert_eq!(fingerprint(dir), first);
        std::thread::sleep(poll);
    }
    process_cpu() - before
}

#[test]
fn idle_cost_with_one_large_file() {
    let dir: PathBuf = std::env::temp_dir().join(format!("servicegate-cpu-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let text = large_manifest(1000);
    std::fs::write(dir.join("large.yaml"), &text).unwrap();

    let started = Instant::now();
    let loaded = load(&dir).unwrap();
    let parse = started.elapsed();
    assert!(loaded.problems().is_empty(), "{:?}", loaded.problems());
    assert_eq!(loaded.model.services.len(), 1000);
    assert_eq!(loaded.model.endpoint_slices.len(), 1000);
    println!(
        "a {} KB manifest file ({} Services, {} EndpointSlices): loaded in {:.0} ms",
        text.len() / 1024,
        loaded.model.services.len(),
        loaded.model.endpoint_slices.len(),
        parse.as_secs_f64() * 1e3
    );

    let window = Duration::from_secs(5);
    let previous = previous_loop_cost(&dir, Duration::from_millis(100), window);
    println!(
        "before (read + hash of every file every 100 ms), idle over {} s: {:.0} ms of CPU \
         ({:.2} % of a core)",
        window.as_secs(),
        previous.as_secs_f64() * 1e3,
        previous.as_secs_f64() / window.as_secs_f64() * 100.0
    );

    let runtime = tokio::runtime::Runtime::new().unwrap();
    for poll_ms in [100, 2000] {
        let (tx, mut rx) = tokio::sync::watch::channel::<Option<Arc<Model>>>(None);
        let task = runtime.spawn(watch_files(dir.clone(), Duration::from_millis(poll_ms), tx));
        runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(30), rx.changed())
                .await
                .expect("the first model")
                .unwrap();
        });
        let before = process_cpu();
        std::thread::sleep(window);
        let used = process_cpu() - before;
        let share = used.as_secs_f64() / window.as_secs_f64();
        println!(
            "files source idle over {} s, poll_ms {poll_ms}: {:.0} ms of CPU ({:.2} % of a core)",
            window.as_secs(),
            used.as_secs_f64() * 1e3,
            share * 100.0
        );
        assert!(
            !rx.has_changed().unwrap(),
            "nothing changed, nothing is published"
        );
        // Generous for a loaded CI machine; what matters is the printed figure.
        assert!(share < 0.10, "{:.2} % of a core", share * 100.0);
        drop(rx);
        runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .expect("the source stops")
                .unwrap();
        });
    }
    let _ = std::fs::remove_dir_all(&dir);
}
