//! The `files` source: loading manifests, error messages, reload on change, and the lab
//! manifests under configs/lab compiled end to end.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use control::compiler::{CompileOptions, Compiler};
use control::manifests::{load, load_path, load_str, watch_files, Loaded, ManifestSet};
use control::model::SourceProblem;
use control::model::{Model, ObjectKey};
use dataplane::snapshot::{EndpointState, FrontendKey, FrontendKind, Protocol};

/// A fresh, empty directory under the system temp dir.
fn temp_dir(tag: &str) -> PathBuf {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "servicegate-manifests-{tag}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

const SERVICE: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  clusterIP: 10.96.0.10
  ports:
    - name: http
      port: 80
"#;

const SLICE: &str = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: default
  labels:
    kubernetes.io/service-name: web
addressType: IPv4
ports: [{name: http, port: 9376}]
endpoints: [{addresses: [10.244.1.2]}]
"#;

const DEPLOYMENT: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: lab
spec: {replicas: 3}
"#;

#[test]
fn multi_document_file_with_skipped_kinds() {
    let text = format!("---\n{SERVICE}---\n{DEPLOYMENT}---\n{SLICE}---\n");
    let loaded = load_str(Path::new("all.yaml"), &text);
    let model = loaded.model;
    assert_eq!(model.services.len(), 1);
    assert_eq!(model.endpoint_slices.len(), 1);
    let svc = &model.services[&ObjectKey::new("default", "web")];
    assert_eq!(
        svc.metadata.namespace.as_deref(),
        Some("default"),
        "missing namespace = default"
    );
    assert!(model
        .endpoint_slices
        .contains_key(&ObjectKey::new("default", "web-abc")));
    assert_eq!(loaded.skipped.len(), 1);
    assert!(
        loaded.skipped[0].contains("Deployment") && loaded.skipped[0].contains("lab/web"),
        "{:?}",
        loaded.skipped
    );
}

#[test]
fn kubectl_list_output_loads_as_is() {
    // The shape of `kubectl get svc,endpointslices -A -o yaml`.
    let text = r#"
apiVersion: v1
kind: List
metadata:
  resourceVersion: ""
items:
- apiVersion: v1
  kind: Service
  metadata:
    creationTimestamp: "2024-05-01T10:00:00Z"
    name: kubernetes
    namespace: default
    resourceVersion: "199"
    uid: 3f0e4c1d-aaaa-bbbb-cccc-000000000001
  spec:
    clusterIP: 10.96.0.1
    clusterIPs:
    - 10.96.0.1
    internalTrafficPolicy: Cluster
    ipFamilies:
    - IPv4
    ipFamilyPolicy: SingleStack
    ports:
    - name: https
      port: 443
      protocol: TCP
      targetPort: 6443
    sessionAffinity: None
    type: ClusterIP
  status:
    loadBalancer: {}
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata:
    labels:
      kubernetes.io/service-name: kubernetes
    name: kubernetes
    namespace: default
  addressType: IPv4
  endpoints:
  - addresses:
    - 192.168.1.5
    conditions:
      ready: true
  ports:
  - name: https
    port: 6443
    protocol: TCP
- apiVersion: apps/v1
  kind: Deployment
  metadata: {name: coredns, namespace: kube-system}
"#;
    let loaded = load_str(Path::new("cluster.yaml"), text);
    assert_eq!(loaded.model.services.len(), 1);
    assert_eq!(loaded.model.endpoint_slices.len(), 1);
    assert_eq!(loaded.skipped.len(), 1);
    assert!(
        loaded.skipped[0].contains("document 1 item 3"),
        "{:?}",
        loaded.skipped
    );
    let compiled = Compiler::new(CompileOptions::default()).compile(&loaded.model);
    let f = &compiled.snapshot.frontends[&FrontendKey {
        addr: Ipv4Addr::new(10, 96, 0, 1),
        protocol: Protocol::Tcp,
        port: 443,
    }];
    assert_eq!(f.backends.backends[0].port, 6443);
}

/// The only problem of `loaded`.
fn only_problem(loaded: &Loaded) -> &SourceProblem {
    match loaded.problems() {
        [only] => only,
        other => panic!("expected one problem, got {other:#?}"),
    }
}

#[test]
fn error_names_file_object_and_field() {
    let text = format!(
        "{SLICE}---\n{}",
        SERVICE
            .replace("name: web", "name: web\n  namespace: default")
            .replace("port: 80", "port: http")
    );
    let loaded = load_str(Path::new("configs/lab/services.yaml"), &text);
    let problem = only_problem(&loaded);
    assert_eq!(
        problem.message,
        r#"configs/lab/services.yaml: document 2 (Service default/web): spec.ports[0].port: invalid type: string "http", expected i32"#
    );
    assert_eq!(problem.reason, "invalid_field");
    assert_eq!(problem.file, "configs/lab/services.yaml");
    // The slice of document 1 is loaded all the same.
    assert_eq!(loaded.model.endpoint_slices.len(), 1);
    assert!(loaded.model.services.is_empty());
}

#[test]
fn error_in_list_item_and_yaml_syntax() {
    let list = r#"
apiVersion: v1
kind: List
items:
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {name: s, namespace: lab}
  addressType: IPv4
  endpoints:
  - addresses: [10.0.0.1]
    conditions: {ready: maybe}
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {name: t, namespace: lab}
  addressType: IPv4
  endpoints: [{addresses: [10.0.0.2]}]
"#;
    let loaded = load_str(Path::new("l.yaml"), list);
    let message = &only_problem(&loaded).message;
    assert!(
        message.starts_with(
            "l.yaml: document 1 item 1 (EndpointSlice lab/s): endpoints[0].conditions.ready: "
        ),
        "{message}"
    );
    // The other item of the same List is in force.
    assert_eq!(
        loaded.model.endpoint_slices.keys().collect::<Vec<_>>(),
        vec![&ObjectKey::new("lab", "t")]
    );
    let broken = format!("{SERVICE}---\nkind: [unclosed\n");
    let loaded = load_str(Path::new("b.yaml"), &broken);
    let problem = only_problem(&loaded);
    assert!(
        problem.message.starts_with("b.yaml: document 2: "),
        "{problem:?}"
    );
    assert_eq!(problem.reason, "syntax");
    assert_eq!(loaded.model.services.len(), 1);
}

#[test]
fn duplicate_object_is_skipped_and_named() {
    let text = format!(
        "{SERVICE}---\n{}",
        SERVICE.replace("10.96.0.10", "10.96.0.99")
    );
    let loaded = load_str(Path::new("d.yaml"), &text);
    let problem = only_problem(&loaded);
    assert_eq!(problem.reason, "duplicate");
    assert!(
        problem.message.contains("d.yaml: document 2")
            && problem.message.contains("default/web")
            && problem.message.contains("document 1"),
        "{problem:?}"
    );
    // The first definition is served.
    let web = &loaded.model.services[&ObjectKey::new("default", "web")];
    assert_eq!(
        web.spec.as_ref().unwrap().cluster_ip.as_deref(),
        Some("10.96.0.10")
    );
}

/// A Service named `name` with ClusterIP 10.96.0.`last`.
fn service(name: &str, last: u8) -> String {
    SERVICE
        .replace("name: web", &format!("name: {name}"))
        .replace("10.96.0.10", &format!("10.96.0.{last}"))
}

#[test]
fn each_bad_document_is_skipped_on_its_own() {
    // (what, the bad document, the reason, a part of the message)
    let bad: &[(&str, String, &str, &str)] = &[
        (
            "garbage YAML",
            "apiVersion: v1\nkind: Service\nmetadata: {name: x\n  spec: ]]]\n".into(),
            "syntax",
            "document 2: ",
        ),
        (
            "a port that is not a number",
            service("eighty", 80).replace("port: 80", "port: eighty"),
            "invalid_field",
            r#"document 2 (Service default/eighty): spec.ports[0].port: invalid type: string "eighty", expected i32"#,
        ),
        (
            "a missing apiVersion",
            service("noapi", 81).replace("apiVersion: v1\n", ""),
            "missing_field",
            "document 2 (Service default/noapi): apiVersion and kind are required",
        ),
        (
            "a missing name",
            service("x", 82).replace("  name: x\n", "  namespace: lab\n"),
            "missing_field",
            "document 2 (Service without metadata.name): metadata.name: missing",
        ),
        (
            "a scalar document",
            "just some text\n".into(),
            "not_an_object",
            "document 2: expected a Kubernetes object (a mapping), found a string",
        ),
        (
            "a sequence document",
            "- a\n- b\n".into(),
            "not_an_object",
            "document 2: expected a Kubernetes object (a mapping), found a sequence",
        ),
        (
            "a duplicate object",
            service("other", 90).replace("name: other", "name: web-other\n  namespace: lab"),
            "duplicate",
            "document 2 (Service lab/web-other): Service lab/web-other is already defined in",
        ),
        (
            "a List whose items are no sequence",
            "apiVersion: v1\nkind: List\nitems: {a: 1}\n".into(),
            "invalid_field",
            "document 2: items: expected a sequence",
        ),
        (
            "nesting past the bound",
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: deep}}\nspec: {}{}\n",
                "[".repeat(100),
                "]".repeat(100)
            ),
            "too_deep",
            "document 2: nested more than 64 levels deep",
        ),
    ];
    for (what, document, reason, message) in bad {
        let dir = temp_dir("bad");
        // The duplicate is defined first in a.yaml; the others are good.
        std::fs::write(
            dir.join("a.yaml"),
            service("web-other", 91)
                .replace("name: web-other", "name: web-other\n  namespace: lab"),
        )
        .unwrap();
        std::fs::write(
            dir.join("b.yaml"),
            format!("{}---\n{document}---\n{SLICE}", service("before", 11)),
        )
        .unwrap();
        std::fs::write(dir.join("c.yaml"), service("after", 12)).unwrap();
        let loaded = load(&dir).unwrap();
        let problem = only_problem(&loaded);
        let file = dir.join("b.yaml").display().to_string();
        assert_eq!(problem.reason, *reason, "{what}: {problem:?}");
        assert_eq!(problem.file, file, "{what}");
        assert!(
            problem.message.starts_with(&format!("{file}: ")) && problem.message.contains(message),
            "{what}: {:?} should contain {message:?}",
            problem.message
        );
        // Everything else, in the same file and the others, is in force.
        let services: Vec<String> = loaded
            .model
            .services
            .keys()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            services,
            vec!["default/after", "default/before", "lab/web-other"],
            "{what}"
        );
        assert_eq!(loaded.model.endpoint_slices.len(), 1, "{what}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn a_syntax_error_in_document_3_of_5_leaves_the_other_four() {
    let documents: Vec<String> = (1..=5u8)
        .map(|n| {
            if n == 3 {
                // A flow mapping never closed: a YAML parser reading the stream would lose
                // everything after it.
                "apiVersion: v1\nkind: Service\nmetadata: {name: three\nspec:\n  ports: [{port: 80}]\n".to_owned()
            } else {
                service(&format!("s{n}"), n)
            }
        })
        .collect();
    let text = documents.join("---\n");
    let loaded = load_str(Path::new("five.yaml"), &text);
    let problem = only_problem(&loaded);
    assert!(
        problem.message.starts_with("five.yaml: document 3: "),
        "{problem:?}"
    );
    // The line is the file's, not the document's.
    let first_line_of_3 = text
        .lines()
        .position(|l| l.contains("name: three"))
        .unwrap()
        + 1;
    assert!(
        (first_line_of_3..first_line_of_3 + 5)
            .any(|line| problem.message.contains(&format!("line {line}"))),
        "{problem:?} names a line of document 3 (from line {first_line_of_3})"
    );
    let services: Vec<String> = loaded
        .model
        .services
        .keys()
        .map(|k| k.name.clone())
        .collect();
    assert_eq!(services, vec!["s1", "s2", "s4", "s5"]);
}

#[test]
fn document_markers_split_only_at_line_starts() {
    // `---` inside a value, or indented, is no marker; a marker may carry the document.
    let text = format!(
        "# leading comment\n%YAML 1.2\n---\n{}\n  annotations: {{note: \"a --- b\"}}\n--- {{apiVersion: v1, kind: Service, metadata: {{name: inline}}, spec: {{clusterIP: 10.96.0.7, ports: [{{port: 80}}]}}}}\n---\n---\n",
        service("first", 1).trim_end()
    );
    let loaded = load_str(Path::new("m.yaml"), &text);
    assert!(loaded.problems().is_empty(), "{:#?}", loaded.problems());
    let services: Vec<String> = loaded
        .model
        .services
        .keys()
        .map(|k| k.name.clone())
        .collect();
    assert_eq!(services, vec!["first", "inline"]);
}

#[test]
fn an_empty_directory_serves_nothing() {
    let dir = temp_dir("empty");
    let loaded = load(&dir).unwrap();
    assert!(loaded.files.is_empty());
    assert!(loaded.model.services.is_empty() && loaded.model.endpoint_slices.is_empty());
    assert!(loaded.problems().is_empty());
    // A missing one is an error (the source keeps its last snapshot then).
    let missing = dir.join("gone");
    assert!(load(&missing).is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn directory_loads_every_manifest_file_sorted() {
    let dir = temp_dir("dir");
    std::fs::write(dir.join("b-slices.yml"), SLICE).unwrap();
    std::fs::write(dir.join("a-services.yaml"), SERVICE).unwrap();
    std::fs::write(
        dir.join("c.json"),
        r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"api","namespace":"lab"},
           "spec":{"clusterIP":"10.96.0.40","ports":[{"port":80}]}}"#,
    )
    .unwrap();
    std::fs::write(dir.join("README.md"), "not a manifest").unwrap();
    std::fs::write(dir.join(".#a-services.yaml"), "garbage: [").unwrap();
    let loaded = load(&dir).unwrap();
    let names: Vec<String> = loaded
        .files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["a-services.yaml", "b-slices.yml", "c.json"]);
    assert_eq!(loaded.model.services.len(), 2);
    assert_eq!(loaded.model.endpoint_slices.len(), 1);
    assert!(loaded
        .model
        .services
        .contains_key(&ObjectKey::new("lab", "api")));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn json_error_names_the_field() {
    let dir = temp_dir("json");
    let file = dir.join("svc.json");
    std::fs::write(
        &file,
        r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"api"},"spec":{"ports":[{"port":"x"}]}}"#,
    )
    .unwrap();
    let loaded = load(&file).unwrap();
    let message = &only_problem(&loaded).message;
    assert!(
        message.ends_with(r#"document 1 (Service default/api): spec.ports[0].port: invalid type: string "x", expected i32"#),
        "{message}"
    );
    // load_path serves what loads (nothing here) and logs the rest.
    assert!(load_path(&file).unwrap().services.is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn lab_manifests_load_and_compile() {
    let lab = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/lab");
    let loaded = load(&lab).unwrap();
    assert!(loaded.skipped.is_empty(), "{:?}", loaded.skipped);
    assert_eq!(loaded.model.services.len(), 5);
    assert_eq!(loaded.model.endpoint_slices.len(), 5);
    let compiled = Compiler::new(CompileOptions {
        node_port_addresses: vec![Ipv4Addr::new(192, 168, 100, 1)],
        ..CompileOptions::default()
    })
    .compile(&loaded.model);
    assert!(compiled.warnings.is_empty(), "{:?}", compiled.warnings);
    let s = &compiled.snapshot;
    let key = |a: [u8; 4], protocol, port| FrontendKey {
        addr: Ipv4Addr::from(a),
        protocol,
        port,
    };
    let web = &s.frontends[&key([10, 96, 0, 10], Protocol::Tcp, 80)];
    let pods: Vec<(String, u16, EndpointState, Option<&str>)> = web
        .backends
        .backends
        .iter()
        .map(|b| (b.addr.to_string(), b.port, b.state, b.node.as_deref()))
        .collect();
    assert_eq!(
        pods,
        vec![
            (
                "10.244.1.2".into(),
                9376,
                EndpointState::Ready,
                Some("node-1")
            ),
            (
                "10.244.1.3".into(),
                9376,
                EndpointState::Ready,
                Some("node-1")
            ),
            (
                "10.244.2.2".into(),
                9376,
                EndpointState::Ready,
                Some("node-2")
            ),
        ]
    );
    assert_eq!(web.backends.usable.len(), 3);
    assert_eq!(
        s.node_ports[&(Protocol::Tcp, 30080)].service.name.as_ref(),
        "web-nodeport"
    );
    let lb = &s.frontends[&key([192, 0, 2, 100], Protocol::Tcp, 80)];
    assert_eq!(lb.kind, FrontendKind::LoadBalancer);
    assert!(lb.masquerade);
    let udp = &s.frontends[&key([10, 96, 0, 20], Protocol::Udp, 53)];
    assert_eq!(udp.backends.backends[0].port, 5353);
    let sticky = &s.frontends[&key([10, 96, 0, 30], Protocol::Tcp, 80)];
    assert_eq!(sticky.affinity_timeout_secs, Some(10800));
    assert!(
        Arc::ptr_eq(&web.backends, &sticky.backends),
        "identical sets are shared"
    );
}

async fn next_model(rx: &mut tokio::sync::watch::Receiver<Option<Arc<Model>>>) -> Arc<Model> {
    tokio::time::timeout(Duration::from_secs(10), rx.changed())
        .await
        .expect("an update within 10 s")
        .expect("sender alive");
    rx.borrow_and_update().clone().expect("Some(model)")
}

/// Waits for the next model, returning it and how long it took.
async fn timed_next_model(
    rx: &mut tokio::sync::watch::Receiver<Option<Arc<Model>>>,
) -> (Arc<Model>, Duration) {
    let started = Instant::now();
    let model = next_model(rx).await;
    (model, started.elapsed())
}

fn names(model: &Model) -> Vec<String> {
    model.services.keys().map(|k| k.name.clone()).collect()
}

#[tokio::test]
async fn inotify_delivers_each_change_and_bad_documents_leave_the_rest() {
    let dir = temp_dir("watch");
    std::fs::write(dir.join("services.yaml"), SERVICE).unwrap();
    let (tx, mut rx) = tokio::sync::watch::channel(None);
    // The fallback check is an hour away: every change below comes through inotify.
    let task = tokio::spawn(watch_files(dir.clone(), Duration::from_secs(3600), tx));

    let first = next_model(&mut rx).await;
    assert_eq!(names(&first), vec!["web"]);
    assert!(first.endpoint_slices.is_empty() && first.problems.is_empty());
    let mut latencies = Vec::new();

    // A new file in the directory.
    std::fs::write(dir.join("slices.yaml"), SLICE).unwrap();
    let (second, latency) = timed_next_model(&mut rx).await;
    latencies.push(latency);
    assert_eq!(second.endpoint_slices.len(), 1);

    // A broken document: the rest of the file and the other files stay in force, and the
    // problem is in the model.
    std::fs::write(
        dir.join("slices.yaml"),
        format!("{SLICE}---\nendpoints: [[[\n---\n{}", service("extra", 30)),
    )
    .unwrap();
    let (third, latency) = timed_next_model(&mut rx).await;
    latencies.push(latency);
    assert_eq!(names(&third), vec!["extra", "web"]);
    assert_eq!(third.endpoint_slices.len(), 1);
    assert_eq!(third.problems.len(), 1, "{:?}", third.problems);
    assert_eq!(third.problems[0].reason, "syntax");
    assert!(third.problems[0]
        .message
        .contains("slices.yaml: document 2: "));

    // Fixed again, in place, with the same size: the event names the file.
    let fixed = SLICE.replace("web-abc", "web-def");
    assert_eq!(fixed.len(), SLICE.len());
    std::fs::write(dir.join("slices.yaml"), &fixed).unwrap();
    let (fourth, latency) = timed_next_model(&mut rx).await;
    latencies.push(latency);
    assert!(fourth.problems.is_empty());
    assert!(fourth
        .endpoint_slices
        .contains_key(&ObjectKey::new("default", "web-def")));
    std::fs::write(dir.join("slices.yaml"), SLICE).unwrap();
    let (_, latency) = timed_next_model(&mut rx).await;
    latencies.push(latency);

    // An editor's save: a new file renamed over the old one.
    std::fs::write(dir.join(".services.yaml.swp"), service("renamed", 40)).unwrap();
    std::fs::rename(dir.join(".services.yaml.swp"), dir.join("services.yaml")).unwrap();
    let (fifth, latency) = timed_next_model(&mut rx).await;
    latencies.push(latency);
    assert_eq!(names(&fifth), vec!["renamed"]);

    // Removing a file is a change too.
    std::fs::remove_file(dir.join("slices.yaml")).unwrap();
    let (sixth, latency) = timed_next_model(&mut rx).await;
    latencies.push(latency);
    assert!(sixth.endpoint_slices.is_empty());

    // An existing but empty directory serves no Services.
    std::fs::remove_file(dir.join("services.yaml")).unwrap();
    let (seventh, latency) = timed_next_model(&mut rx).await;
    latencies.push(latency);
    assert!(seventh.services.is_empty() && seventh.problems.is_empty());

    latencies.sort();
    println!(
        "inotify: change to published model, {} changes: median {:.1} ms, max {:.1} ms",
        latencies.len(),
        latencies[latencies.len() / 2].as_secs_f64() * 1e3,
        latencies[latencies.len() - 1].as_secs_f64() * 1e3
    );
    assert!(
        latencies[latencies.len() / 2] < Duration::from_secs(2),
        "{latencies:?}"
    );

    drop(rx);
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("watch_files returns once every receiver is gone")
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_missing_directory_keeps_the_last_snapshot_and_says_so() {
    let parent = temp_dir("missing");
    let dir = parent.join("manifests");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("services.yaml"), SERVICE).unwrap();
    let (tx, mut rx) = tokio::sync::watch::channel(None);
    let task = tokio::spawn(watch_files(dir.clone(), Duration::from_millis(100), tx));
    let first = next_model(&mut rx).await;
    assert_eq!(names(&first), vec!["web"]);

    std::fs::rename(&dir, parent.join("away")).unwrap();
    let kept = next_model(&mut rx).await;
    assert_eq!(names(&kept), vec!["web"], "the last model is kept");
    assert_eq!(kept.problems.len(), 1);
    assert_eq!(kept.problems[0].reason, "path_unreadable");
    assert!(
        kept.problems[0]
            .message
            .contains("no such file or directory"),
        "{:?}",
        kept.problems
    );

    // Back, with other content: served, the problem gone, and watched again.
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("services.yaml"), service("back", 50)).unwrap();
    let back = next_model(&mut rx).await;
    assert_eq!(names(&back), vec!["back"]);
    assert!(back.problems.is_empty());
    std::fs::write(dir.join("more.yaml"), service("more", 51)).unwrap();
    let more = next_model(&mut rx).await;
    assert_eq!(names(&more), vec!["back", "more"]);

    drop(rx);
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    let _ = std::fs::remove_dir_all(&parent);
}

/// About 200 KB of lists nested as deep as they go, in each style.
fn deeply_nested_lists() -> [(&'static str, String); 2] {
    const LEVELS: usize = 100_000;
    [
        (
            "flow",
            format!("{}{}\n", "[".repeat(LEVELS), "]".repeat(LEVELS)),
        ),
        ("block", format!("{}x\n", "- ".repeat(LEVELS))),
    ]
}

#[test]
fn deep_nesting_is_refused_in_linear_time() {
    for (style, text) in deeply_nested_lists() {
        let dir = temp_dir("deep");
        std::fs::write(dir.join("a.yaml"), SERVICE).unwrap();
        std::fs::write(
            dir.join("deep.yaml"),
            format!("{}---\n{text}", service("beside", 60)),
        )
        .unwrap();
        let started = Instant::now();
        let loaded = load(&dir).unwrap();
        let took = started.elapsed();
        println!(
            "{style}-style nesting, {} KB: refused in {:.1} ms",
            text.len() / 1024,
            took.as_secs_f64() * 1e3
        );
        let problem = only_problem(&loaded);
        assert_eq!(problem.reason, "too_deep", "{problem:?}");
        assert!(
            problem
                .message
                .contains("deep.yaml: document 2: nested more than 64 levels deep"),
            "{problem:?}"
        );
        assert_eq!(names(&loaded.model), vec!["beside", "web"]);
        assert!(took < Duration::from_secs(2), "{style}: {took:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[tokio::test]
async fn a_deeply_nested_file_does_not_stall_updates() {
    let dir = temp_dir("stall");
    std::fs::write(dir.join("a.yaml"), SERVICE).unwrap();
    let (tx, mut rx) = tokio::sync::watch::channel(None);
    let task = tokio::spawn(watch_files(dir.clone(), Duration::from_secs(3600), tx));
    next_model(&mut rx).await;
    let [(_, flow), (_, block)] = deeply_nested_lists();
    std::fs::write(dir.join("deep.yaml"), format!("{flow}---\n{block}")).unwrap();
    let (with_deep, latency) = timed_next_model(&mut rx).await;
    println!(
        "a 400 KB file of nested lists: published (2 documents refused) after {:.1} ms",
        latency.as_secs_f64() * 1e3
    );
    assert_eq!(with_deep.problems.len(), 2);
    assert!(latency < Duration::from_secs(5));
    std::fs::write(dir.join("b.yaml"), service("next", 70)).unwrap();
    let (next, latency) = timed_next_model(&mut rx).await;
    println!(
        "the next change beside it: published after {:.1} ms",
        latency.as_secs_f64() * 1e3
    );
    assert_eq!(names(&next), vec!["next", "web"]);
    assert!(latency < Duration::from_secs(5));
    drop(rx);
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn only_changed_files_are_read_again() {
    let dir = temp_dir("reread");
    for (file, name) in [("a.yaml", "a"), ("b.yaml", "b"), ("c.yaml", "c")] {
        std::fs::write(dir.join(file), service(name, 1)).unwrap();
    }
    // Distinct ClusterIPs are not needed to load.
    let mut set = ManifestSet::new(dir.clone());
    let none = HashSet::new();
    assert!(set.refresh(&none).unwrap());
    assert_eq!(set.files_read(), 3);
    assert!(!set.refresh(&none).unwrap(), "nothing changed");
    assert_eq!(set.files_read(), 3, "metadata alone says so");

    // A change seen by its metadata alone (the fallback check, without inotify).
    std::fs::write(dir.join("b.yaml"), service("bee", 2)).unwrap();
    assert!(set.refresh(&none).unwrap());
    assert_eq!(set.files_read(), 4);
    assert_eq!(names(&set.assemble().model), vec!["a", "bee", "c"]);

    // A file an event names is read even when its metadata looks the same; the same bytes
    // are no change.
    let touched: HashSet<_> = [std::ffi::OsString::from("c.yaml")].into();
    assert!(!set.refresh(&touched).unwrap());
    assert_eq!(set.files_read(), 5);

    // A removed file is a change without a read.
    std::fs::remove_file(dir.join("a.yaml")).unwrap();
    assert!(set.refresh(&none).unwrap());
    assert_eq!(set.files_read(), 5);
    assert_eq!(names(&set.assemble().model), vec!["bee", "c"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_unreadable_file_keeps_what_it_held() {
    use std::os::unix::fs::PermissionsExt;
    let dir = temp_dir("perm");
    let file = dir.join("a.yaml");
    std::fs::write(&file, SERVICE).unwrap();
    let mut set = ManifestSet::new(dir.clone());
    set.refresh(&HashSet::new()).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o000)).unwrap();
    // Root reads it all the same: only an unprivileged run sees the problem.
    let readable = std::fs::read(&file).is_ok();
    std::fs::write(dir.join("b.yaml"), service("b", 2)).unwrap();
    let touched: HashSet<_> = [std::ffi::OsString::from("a.yaml")].into();
    set.refresh(&touched).unwrap();
    let loaded = set.assemble();
    assert_eq!(names(&loaded.model), vec!["b", "web"]);
    if !readable {
        let problem = only_problem(&loaded);
        assert_eq!(problem.reason, "unreadable");
        assert!(problem
            .message
            .contains("what it held when last read is kept"));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_file_being_written_is_read_once_it_is_closed() {
    use std::io::Write;
    let dir = temp_dir("writer");
    std::fs::write(dir.join("a.yaml"), SERVICE).unwrap();
    let (tx, mut rx) = tokio::sync::watch::channel(None);
    let task = tokio::spawn(watch_files(dir.clone(), Duration::from_secs(3600), tx));
    next_model(&mut rx).await;

    let text: Vec<String> = (0..200u8).map(|i| service(&format!("s{i}"), i)).collect();
    let text = text.join("---\n");
    let file = dir.join("b.yaml");
    let writer = std::thread::spawn(move || {
        let mut out = std::fs::File::create(&file).unwrap();
        // Cut in the middle of a document, then a pause a reader could fall into.
        let (head, tail) = text.split_at(text.len() / 2 + 7);
        out.write_all(head.as_bytes()).unwrap();
        out.flush().unwrap();
        std::thread::sleep(Duration::from_millis(150));
        out.write_all(tail.as_bytes()).unwrap();
    });
    let (model, latency) = timed_next_model(&mut rx).await;
    writer.join().unwrap();
    println!(
        "a file written in two parts 150 ms apart: published {:.0} ms after the first event",
        latency.as_secs_f64() * 1e3
    );
    assert!(model.problems.is_empty(), "{:?}", model.problems);
    assert_eq!(model.services.len(), 201);
    drop(rx);
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    let _ = std::fs::remove_dir_all(&dir);
}
