//! The `files` source: loading manifests, error messages, reload on change, and the lab
//! manifests under configs/lab compiled end to end.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use control::compiler::{CompileOptions, Compiler};
use control::manifests::{load, load_path, load_str, watch_files, ManifestError};
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
    let loaded = load_str(Path::new("all.yaml"), &text).unwrap();
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
    let loaded = load_str(Path::new("cluster.yaml"), text).unwrap();
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

#[test]
fn error_names_file_object_and_field() {
    let text = format!(
        "{SLICE}---\n{}",
        SERVICE
            .replace("name: web", "name: web\n  namespace: default")
            .replace("port: 80", "port: http")
    );
    let err = load_str(Path::new("configs/lab/services.yaml"), &text).unwrap_err();
    let message = err.to_string();
    assert_eq!(
        message,
        r#"configs/lab/services.yaml: document 2 (Service default/web): spec.ports[0].port: invalid type: string "http", expected i32"#
    );
    assert!(matches!(err, ManifestError::Parse { .. }));
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
"#;
    let message = load_str(Path::new("l.yaml"), list).unwrap_err().to_string();
    assert!(
        message.starts_with(
            "l.yaml: document 1 item 1 (EndpointSlice lab/s): endpoints[0].conditions.ready: "
        ),
        "{message}"
    );
    let broken = format!("{SERVICE}---\nkind: [unclosed\n");
    let message = load_str(Path::new("b.yaml"), &broken)
        .unwrap_err()
        .to_string();
    assert!(message.starts_with("b.yaml: document 2: "), "{message}");
}

#[test]
fn duplicate_object_is_an_error() {
    let text = format!("{SERVICE}---\n{SERVICE}");
    let message = load_str(Path::new("d.yaml"), &text)
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("d.yaml: document 2")
            && message.contains("default/web")
            && message.contains("document 1"),
        "{message}"
    );
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
    let message = load_path(&file).unwrap_err().to_string();
    assert!(
        message.ends_with(r#"document 1 (Service default/api): spec.ports[0].port: invalid type: string "x", expected i32"#),
        "{message}"
    );
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

#[tokio::test]
async fn watch_reloads_on_change_and_keeps_last_good_model() {
    let dir = temp_dir("watch");
    std::fs::write(dir.join("services.yaml"), SERVICE).unwrap();
    let (tx, mut rx) = tokio::sync::watch::channel(None);
    let task = tokio::spawn(watch_files(dir.clone(), Duration::from_millis(20), tx));

    let first = next_model(&mut rx).await;
    assert_eq!(first.services.len(), 1);
    assert!(first.endpoint_slices.is_empty());

    // A new file in the directory.
    std::fs::write(dir.join("slices.yaml"), SLICE).unwrap();
    let second = next_model(&mut rx).await;
    assert_eq!(second.endpoint_slices.len(), 1);

    // A broken edit: the last good model stays, nothing is published.
    std::fs::write(dir.join("slices.yaml"), format!("{SLICE}\nendpoints: [[[")).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !rx.has_changed().unwrap(),
        "a model that does not load is never published"
    );
    assert_eq!(rx.borrow().as_ref().unwrap().endpoint_slices.len(), 1);

    // Fixed again: published again.
    std::fs::write(dir.join("slices.yaml"), SLICE.replace("web-abc", "web-def")).unwrap();
    let third = next_model(&mut rx).await;
    assert!(third
        .endpoint_slices
        .contains_key(&ObjectKey::new("default", "web-def")));

    // Removing a file is a change too.
    std::fs::remove_file(dir.join("slices.yaml")).unwrap();
    let fourth = next_model(&mut rx).await;
    assert!(fourth.endpoint_slices.is_empty());

    drop(rx);
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("watch_files returns once every receiver is gone")
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
