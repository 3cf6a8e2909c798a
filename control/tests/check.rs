//! What `servicegate check` and `run` refuse before anything starts, and how they say it:
//! one line naming the file, the key or object and field, and what is wrong.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use control::config::Config;

/// A fresh, empty directory under the system temp dir.
fn temp_dir(tag: &str) -> PathBuf {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "servicegate-check-{tag}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A valid config up to its `services` section (core 0 exists on every machine).
const PORTS: &str = "cores: {control: 0, workers: [0]}
ports:
  - name: uplink
    device: net_null0
    role: uplink
    addresses: [192.0.2.1/24]
";

/// Writes `gateway.yaml` (PORTS + `services`) into `dir` and loads it.
fn load(dir: &Path, services: &str) -> (PathBuf, Config) {
    let path = dir.join("gateway.yaml");
    std::fs::write(&path, format!("{PORTS}services:\n{services}")).unwrap();
    let config = Config::load(&path).expect("the config itself is valid");
    (path, config)
}

const WEB: &str = r#"apiVersion: v1
kind: Service
metadata: {name: web, namespace: lab}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80}]
"#;

#[test]
fn a_config_error_names_the_key_path_once() {
    let text =
        PORTS.replace("192.0.2.1/24", "192.0.2.300/24") + "services: {source: files, path: lab}\n";
    let err = Config::parse(&text, "gateway.yaml").unwrap_err();
    assert_eq!(
        err.to_string(),
        "gateway.yaml: ports[0].addresses[0]: invalid IP address syntax at line 6, column 17"
    );
    let text = PORTS.replace("role: uplink", "role: uplink\n    colour: blue")
        + "services: {source: files, path: lab}\n";
    let err = Config::parse(&text, "gateway.yaml").unwrap_err();
    assert!(
        err.to_string()
            .starts_with("gateway.yaml: ports[0]: unknown field `colour`, expected one of"),
        "{err}"
    );
}

#[test]
fn a_manifest_path_that_cannot_be_read_is_a_one_line_config_error() {
    let dir = temp_dir("path");
    let (config_path, config) = load(&dir, "  source: files\n  path: missing\n");
    let err = config.check_service_source(&config_path).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{}: services.path: {}: no such file or directory",
            config_path.display(),
            dir.join("missing").display()
        )
    );

    // A manifest file, or a directory of them, that exists is fine.
    std::fs::write(dir.join("web.yaml"), WEB).unwrap();
    let (config_path, config) = load(&dir, "  source: files\n  path: web.yaml\n");
    config.check_service_source(&config_path).expect("a file");
    let (config_path, config) = load(&dir, "  source: files\n  path: .\n");
    config
        .check_service_source(&config_path)
        .expect("a directory");
}

#[test]
fn a_kubeconfig_that_cannot_be_read_is_a_one_line_config_error() {
    let dir = temp_dir("kubeconfig");
    let (config_path, config) = load(
        &dir,
        "  source: kubernetes\n  kubeconfig: /nonexistent/kc\n",
    );
    let err = config.check_service_source(&config_path).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{}: services.kubeconfig: /nonexistent/kc: no such file or directory",
            config_path.display()
        )
    );

    let not_yaml = dir.join("not-yaml");
    std::fs::write(&not_yaml, "clusters: [unclosed\n").unwrap();
    let (config_path, config) = load(
        &dir,
        &format!(
            "  source: kubernetes\n  kubeconfig: {}\n",
            not_yaml.display()
        ),
    );
    let err = config
        .check_service_source(&config_path)
        .unwrap_err()
        .to_string();
    let expected = format!(
        "{}: services.kubeconfig: {}: not a kubeconfig: ",
        config_path.display(),
        not_yaml.display()
    );
    assert!(err.starts_with(&expected), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");

    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: 'http://127.0.0.1:1'}}]
users: [{name: u, user: {}}]
contexts: [{name: x, context: {cluster: c, user: u}}]
current-context: x
",
    )
    .unwrap();
    let (config_path, config) = load(
        &dir,
        &format!(
            "  source: kubernetes\n  kubeconfig: {}\n",
            kubeconfig.display()
        ),
    );
    config.check_service_source(&config_path).expect("readable");
    // Without one the client configuration is inferred when the source starts.
    let (config_path, config) = load(&dir, "  source: kubernetes\n");
    config.check_service_source(&config_path).expect("inferred");
}

#[test]
fn a_missing_manifest_path_is_named_once() {
    let missing = temp_dir("missing").join("nonexist");
    let err = anyhow::Error::from(control::manifests::load(&missing).unwrap_err());
    assert_eq!(
        format!("{err:#}"),
        format!("{}: no such file or directory", missing.display())
    );
}

#[test]
fn check_fails_on_an_invalid_value_naming_the_file_document_object_and_field() {
    let dir = temp_dir("invalid");
    let manifests = dir.join("services.yaml");
    std::fs::write(
        &manifests,
        format!(
            "{}---\n{}",
            WEB.replace("web", "other")
                .replace("10.96.0.10", "10.96.0.11"),
            WEB.replace("10.96.0.10", "10.96.0.300")
        ),
    )
    .unwrap();
    let (_, config) = load(&dir, "  source: files\n  path: services.yaml\n");
    let err = control::app::check(&config).unwrap_err();
    assert_eq!(
        format!("{err:#}"),
        format!(
            "{}: document 2 (Service lab/web): spec.clusterIP: \"10.96.0.300\" is not an IP address, ignored",
            manifests.display()
        )
    );

    let misspelt = WEB
        .replace("10.96.0.10", "10.96.0.12")
        .replace("port: 80}", "port: 80, protocol: TPC}");
    std::fs::write(&manifests, misspelt).unwrap();
    let err = control::app::check(&config).unwrap_err();
    assert_eq!(
        format!("{err:#}"),
        format!(
            "{}: document 1 (Service lab/web): spec.ports[0].protocol: \"TPC\" is not TCP, UDP or SCTP, the port is ignored",
            manifests.display()
        )
    );
}

#[test]
fn check_accepts_what_is_valid_but_not_served() {
    let dir = temp_dir("valid");
    std::fs::write(
        dir.join("services.yaml"),
        format!(
            r#"{WEB}---
apiVersion: v1
kind: Service
metadata: {{name: headless, namespace: lab}}
spec:
  clusterIP: None
  ports: [{{port: 80}}]
---
apiVersion: v1
kind: Service
metadata: {{name: external, namespace: lab}}
spec:
  type: ExternalName
  externalName: example.com
---
apiVersion: v1
kind: Service
metadata: {{name: dual, namespace: lab}}
spec:
  clusterIP: 10.96.0.20
  clusterIPs: [10.96.0.20, "fd00::20"]
  ipFamilies: [IPv4, IPv6]
  externalIPs: ["2001:db8::7"]
  ports: [{{port: 80}}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: web, namespace: lab}}
spec: {{replicas: 3}}
"#
        ),
    )
    .unwrap();
    let (_, config) = load(&dir, "  source: files\n  path: services.yaml\n");
    control::app::check(&config).expect("notes are not errors");
}

#[test]
fn check_lists_every_bad_document_and_the_rest_it_would_serve() {
    let dir = temp_dir("bad-documents");
    let manifests = dir.join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    std::fs::write(
        manifests.join("a.yaml"),
        format!(
            "{WEB}---\nkind: [unclosed\n---\n{}",
            WEB.replace("name: web", "name: api")
                .replace("10.96.0.10", "10.96.0.11")
                .replace("port: 80", "port: eighty")
        ),
    )
    .unwrap();
    std::fs::write(
        manifests.join("b.yaml"),
        WEB.replace("name: web", "name: shop")
            .replace("10.96.0.10", "10.96.0.12"),
    )
    .unwrap();
    let (config_path, config) = load(&dir, "  source: files\n  path: manifests\n");
    let a = manifests.join("a.yaml").display().to_string();
    let err = control::app::check(&config).unwrap_err();
    let message = format!("{err:#}");
    assert!(
        message.starts_with(&format!("{a}: document 2: "))
            && message.ends_with("(and 1 more invalid value(s), listed above)"),
        "{message}"
    );

    let output = std::process::Command::new(env!("CARGO_BIN_EXE_servicegate"))
        .args(["check", "--config"])
        .arg(&config_path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    assert!(!output.status.success());
    assert!(
        stdout.contains(&format!("error: {a}: document 2: ")),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "error: {a}: document 3 (Service lab/api): spec.ports[0].port: invalid type: string \"eighty\", expected i32"
        )),
        "{stdout}"
    );
    // The Services that load are listed as served.
    assert!(
        stdout.contains("10.96.0.10:80") && stdout.contains("10.96.0.12:80"),
        "{stdout}"
    );
    assert!(stdout.contains("2 service(s)"), "{stdout}");

    // An empty directory is valid and serves nothing.
    std::fs::remove_file(manifests.join("a.yaml")).unwrap();
    std::fs::remove_file(manifests.join("b.yaml")).unwrap();
    control::app::check(&config).expect("an empty directory is no error");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn announce_keys_are_checked_and_named() {
    let base = format!("{PORTS}services: {{source: files, path: lab}}\n");
    let parse = |extra: &str| Config::parse(&format!("{base}{extra}"), "gateway.yaml");
    let error = |extra: &str| parse(extra).unwrap_err().to_string();

    // Absent: disabled, nothing to drain.
    let config = parse("").expect("valid");
    assert!(!config.announce.enabled);
    assert_eq!(config.drain_seconds, 0);
    // The device defaults to the uplink's exception tap.
    let with_exception = base.replace(
        "    addresses: [192.0.2.1/24]\n",
        "    addresses: [192.0.2.1/24]\n    exception: \"net_tap9,iface=sg-up-k\"\n",
    );
    let config = Config::parse(
        &format!("{with_exception}announce: {{enabled: true, when: always, extra_prefixes: [10.96.0.0/12]}}\ndrain_seconds: 3\n"),
        "gateway.yaml",
    )
    .expect("valid");
    assert_eq!(config.announce_device().as_deref(), Some("sg-up-k"));
    assert_eq!(config.announce.table, 100);
    assert_eq!(config.drain_seconds, 3);

    assert_eq!(
        error("announce: {enabled: true}\n"),
        "gateway.yaml: announce.device: not given, and no uplink port has an exception vdev \
         with `iface=` to default to"
    );
    assert_eq!(
        error("announce: {enabled: true, device: sg-up-k, table: 254}\n"),
        "gateway.yaml: announce.table: 254 is reserved (0: unspecified, 253: default, \
         254: main, 255: local): use a table of its own, e.g. 100"
    );
    assert!(
        error("announce: {enabled: true, device: a-name-much-too-long}\n").starts_with(
            "gateway.yaml: announce.device: \"a-name-much-too-long\" is not a Linux interface name"
        ),
    );
    assert!(error("announce: {enabled: true, device: x, netns: a/b}\n")
        .starts_with("gateway.yaml: announce.netns: \"a/b\" is not a network namespace name"));
    assert!(
        error("announce: {enabled: true, device: x, when: sometimes}\n")
            .starts_with("gateway.yaml: announce.when: unknown variant `sometimes`"),
        "{}",
        error("announce: {enabled: true, device: x, when: sometimes}\n")
    );
    assert!(
        error("announce: {enabled: true, device: x, colour: blue}\n")
            .starts_with("gateway.yaml: announce: unknown field `colour`")
    );
    assert!(error("drain_seconds: -1\n").starts_with("gateway.yaml: drain_seconds: "));
}
