//! The deploy manifests in configs/deploy/ are valid YAML of the kinds a cluster needs, and
//! the gateway config inside the ConfigMap is a valid servicegate config.

use std::path::Path;

use control::config::Config;

fn documents(file: &str) -> Vec<serde_json::Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../configs/deploy")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_saphyr::from_str_multiple(&text).unwrap_or_else(|e| panic!("{file}: {e}"))
}

fn kinds(docs: &[serde_json::Value]) -> Vec<String> {
    docs.iter()
        .map(|d| d["kind"].as_str().expect("kind").to_string())
        .collect()
}

#[test]
fn rbac_grants_list_and_watch_of_services_endpointslices_and_nodes() {
    let docs = documents("rbac.yaml");
    assert_eq!(
        kinds(&docs),
        [
            "Namespace",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding"
        ]
    );
    let rules = docs[2]["rules"].as_array().unwrap();
    let text = serde_json::to_string(rules).unwrap();
    for needed in [
        "services",
        "endpointslices",
        "nodes",
        "watch",
        "list",
        "discovery.k8s.io",
    ] {
        assert!(text.contains(needed), "ClusterRole lacks {needed}: {text}");
    }
}

#[test]
fn daemonset_runs_privileged_on_the_host_network_with_hugepages() {
    let docs = documents("daemonset.yaml");
    assert_eq!(kinds(&docs), ["DaemonSet"]);
    let pod = &docs[0]["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], serde_json::Value::Bool(true));
    assert!(pod["nodeSelector"]
        .as_object()
        .is_some_and(|m| !m.is_empty()));
    let container = &pod["containers"][0];
    assert_eq!(
        container["securityContext"]["privileged"],
        serde_json::Value::Bool(true)
    );
    assert!(container["resources"]["limits"]["hugepages-2Mi"].is_string());
    assert_eq!(pod["serviceAccountName"].as_str(), Some("servicegate"));
}

#[test]
fn configmap_holds_a_valid_gateway_config() {
    let docs = documents("configmap.yaml");
    assert_eq!(kinds(&docs), ["ConfigMap"]);
    let text = docs[0]["data"]["gateway.yaml"]
        .as_str()
        .expect("gateway.yaml key");
    let config = Config::parse(text, "configmap.yaml:gateway.yaml").expect("valid config");
    assert_eq!(config.ports.len(), 2);
}
