//! Where each node's pods are, from `v1/Node` objects: the pod CIDRs the gateway encapsulates
//! toward, the node's VTEP and VTEP MAC, and its name (internalTrafficPolicy: Local).
//!
//! Per node (scheme `flannel`):
//! - pod CIDRs: `spec.podCIDRs`, else `spec.podCIDR` (IPv6 ones are ignored for now);
//! - VTEP: the `flannel.alpha.coreos.com/public-ip` annotation, else the node's first
//!   `InternalIP`;
//! - VTEP MAC: `VtepMAC` of the `flannel.alpha.coreos.com/backend-data` JSON annotation,
//!   else learned from the node's VXLAN frames (the pipeline does that for every VTEP).
//!
//! Scheme `internal-ip` takes the InternalIP and learns the MAC, for overlays that publish no
//! annotation. Static `vxlan.pod_cidrs` pin nodes: an entry naming a node replaces what the
//! API says about that node, and an entry's CIDR is never taken from the API.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use dataplane::snapshot::PodCidrRoute;
use dataplane::wire::MacAddr;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;

use crate::config::{parse_mac, NodeScheme};

/// flannel's annotation of the node's public (VTEP) address.
pub const FLANNEL_PUBLIC_IP: &str = "flannel.alpha.coreos.com/public-ip";
/// flannel's annotation of backend data: `{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}`.
pub const FLANNEL_BACKEND_DATA: &str = "flannel.alpha.coreos.com/backend-data";

/// Nodes as the dataplane sees them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeRoutes {
    /// Pod CIDRs behind their VTEPs: the static ones first, then the API's by node name.
    pub routes: Vec<PodCidrRoute>,
    /// Every node name known (API nodes and the static entries' names).
    pub names: BTreeSet<Arc<str>>,
    /// What was skipped and why (`Node node-3: no InternalIP and no …`).
    pub notes: Vec<String>,
}

/// Derives the pod routes of `nodes` under `scheme` (`None`: only `pinned`), with `vni`;
/// `pinned` are the static `vxlan.pod_cidrs`.
pub fn derive(
    scheme: NodeScheme,
    vni: u32,
    pinned: &[PodCidrRoute],
    nodes: &BTreeMap<String, Arc<Node>>,
) -> NodeRoutes {
    let mut out = NodeRoutes {
        routes: pinned.to_vec(),
        names: pinned.iter().filter_map(|r| r.node.clone()).collect(),
        notes: Vec::new(),
    };
    if scheme == NodeScheme::None {
        return out;
    }
    let pinned_names = out.names.clone();
    let pinned_cidrs: BTreeSet<_> = pinned.iter().map(|r| r.cidr.trunc()).collect();
    for (name, node) in nodes {
        let name: Arc<str> = Arc::from(name.as_str());
        out.names.insert(name.clone());
        if pinned_names.contains(&name) {
            continue;
        }
        let Some(vtep) = vtep_of(scheme, node) else {
            out.notes.push(format!(
                "Node {name}: no VTEP ({}InternalIP): its pods are not routed",
                match scheme {
                    NodeScheme::Flannel => format!("no {FLANNEL_PUBLIC_IP} annotation and no "),
                    _ => "no ".to_string(),
                }
            ));
            continue;
        };
        let vtep_mac = match scheme {
            NodeScheme::Flannel => flannel_vtep_mac(node, &name, &mut out.notes),
            _ => None,
        };
        for (field, cidr) in pod_cidrs(node) {
            match cidr.parse::<IpNet>() {
                Ok(IpNet::V4(cidr)) if pinned_cidrs.contains(&cidr.trunc()) => {}
                Ok(IpNet::V4(cidr)) => out.routes.push(PodCidrRoute {
                    cidr,
                    vtep,
                    vni,
                    node: Some(name.clone()),
                    vtep_mac,
                }),
                // IPv6 pod CIDRs wait for the IPv6 dataplane.
                Ok(IpNet::V6(_)) => {}
                Err(_) => out.notes.push(format!(
                    "Node {name}: {field}: {cidr:?} is not a CIDR, ignored"
                )),
            }
        }
    }
    out
}

/// `spec.podCIDRs`, else `spec.podCIDR`, with the field each came from.
fn pod_cidrs(node: &Node) -> Vec<(String, &str)> {
    let Some(spec) = &node.spec else {
        return Vec::new();
    };
    match &spec.pod_cidrs {
        Some(cidrs) if !cidrs.is_empty() => cidrs
            .iter()
            .enumerate()
            .map(|(i, c)| (format!("spec.podCIDRs[{i}]"), c.as_str()))
            .collect(),
        _ => spec
            .pod_cidr
            .iter()
            .map(|c| ("spec.podCIDR".to_string(), c.as_str()))
            .collect(),
    }
}

fn annotation<'a>(node: &'a Node, key: &str) -> Option<&'a str> {
    node.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

fn vtep_of(scheme: NodeScheme, node: &Node) -> Option<Ipv4Addr> {
    if scheme == NodeScheme::Flannel {
        if let Some(ip) = annotation(node, FLANNEL_PUBLIC_IP).and_then(|v| v.trim().parse().ok()) {
            return Some(ip);
        }
    }
    node.status
        .as_ref()?
        .addresses
        .iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP")
        .find_map(|a| match a.address.parse::<IpAddr>() {
            Ok(IpAddr::V4(ip)) => Some(ip),
            _ => None,
        })
}

fn flannel_vtep_mac(node: &Node, name: &str, notes: &mut Vec<String>) -> Option<MacAddr> {
    let data = annotation(node, FLANNEL_BACKEND_DATA)?;
    let mac = serde_json::from_str::<serde_json::Value>(data)
        .ok()
        .and_then(|v| v.get("VtepMAC")?.as_str().map(str::to_owned));
    match mac.as_deref().map(|m| (m, parse_mac(m))) {
        Some((_, Some(mac))) => Some(MacAddr(mac)),
        Some((text, None)) => {
            notes.push(format!(
                "Node {name}: {FLANNEL_BACKEND_DATA}: VtepMAC {text:?} is not a MAC, learned instead"
            ));
            None
        }
        // Other backends (host-gw) carry no VtepMAC.
        None => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeAddress, NodeSpec, NodeStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn node(name: &str, cidrs: &[&str], internal: &str, annotations: &[(&str, &str)]) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                annotations: Some(
                    annotations
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                pod_cidrs: Some(cidrs.iter().map(|c| c.to_string()).collect()),
                ..Default::default()
            }),
            status: Some(NodeStatus {
                addresses: Some(vec![
                    NodeAddress {
                        type_: "Hostname".into(),
                        address: name.into(),
                    },
                    NodeAddress {
                        type_: "InternalIP".into(),
                        address: internal.into(),
                    },
                ]),
                ..Default::default()
            }),
        }
    }

    fn nodes(list: Vec<Node>) -> BTreeMap<String, Arc<Node>> {
        list.into_iter()
            .map(|n| (n.metadata.name.clone().unwrap(), Arc::new(n)))
            .collect()
    }

    #[test]
    fn flannel_annotations_give_vtep_and_mac_else_internal_ip_and_learning() {
        let list = nodes(vec![
            node(
                "a",
                &["10.244.1.0/24", "fd00:1::/64"],
                "10.0.0.11",
                &[
                    (FLANNEL_PUBLIC_IP, "172.16.0.11"),
                    (
                        FLANNEL_BACKEND_DATA,
                        r#"{"VNI":1,"VtepMAC":"02:53:47:00:01:01"}"#,
                    ),
                ],
            ),
            node("b", &["10.244.2.0/24"], "10.0.0.12", &[]),
        ]);
        let derived = derive(NodeScheme::Flannel, 42, &[], &list);
        assert_eq!(derived.routes.len(), 2, "the IPv6 CIDR is ignored");
        let a = &derived.routes[0];
        assert_eq!(a.cidr.to_string(), "10.244.1.0/24");
        assert_eq!(a.vtep, Ipv4Addr::new(172, 16, 0, 11));
        assert_eq!(a.vtep_mac, Some(MacAddr([2, 0x53, 0x47, 0, 1, 1])));
        assert_eq!(a.node.as_deref(), Some("a"));
        assert_eq!(a.vni, 42);
        let b = &derived.routes[1];
        assert_eq!(b.vtep, Ipv4Addr::new(10, 0, 0, 12));
        assert_eq!(b.vtep_mac, None);
        assert!(derived.notes.is_empty(), "{:?}", derived.notes);

        // internal-ip ignores flannel's annotations.
        let plain = derive(NodeScheme::InternalIp, 42, &[], &list);
        assert_eq!(plain.routes[0].vtep, Ipv4Addr::new(10, 0, 0, 11));
        assert_eq!(plain.routes[0].vtep_mac, None);
        // none: nothing from the API.
        assert!(derive(NodeScheme::None, 42, &[], &list).routes.is_empty());
    }

    #[test]
    fn pod_cidr_is_the_fallback_and_bad_values_are_noted_not_fatal() {
        let mut old = node("old", &[], "10.0.0.13", &[]);
        old.spec = Some(NodeSpec {
            pod_cidr: Some("10.244.3.0/24".into()),
            ..Default::default()
        });
        let bad = node(
            "bad",
            &["10.244.4.0/33"],
            "10.0.0.14",
            &[(FLANNEL_BACKEND_DATA, r#"{"VtepMAC":"zz"}"#)],
        );
        let mut gone = node("novtep", &["10.244.5.0/24"], "x", &[]);
        gone.status = None;
        let derived = derive(NodeScheme::Flannel, 1, &[], &nodes(vec![old, bad, gone]));
        assert_eq!(derived.routes.len(), 1);
        assert_eq!(derived.routes[0].cidr.to_string(), "10.244.3.0/24");
        assert_eq!(derived.notes.len(), 3, "{:?}", derived.notes);
        assert!(derived.notes.iter().any(|n| n.contains("spec.podCIDRs[0]")));
        assert!(derived
            .notes
            .iter()
            .any(|n| n.contains("Node novtep: no VTEP")));
        assert_eq!(derived.names.len(), 3, "every node's name is known");
    }

    #[test]
    fn the_scheme_defaults_to_flannel_under_kubernetes_and_needs_that_source() {
        let config = |source: &str, nodes: &str| {
            crate::config::Config::parse(
                &format!(
                    "ports: [{{name: c, device: net_null0, role: cluster, addresses: [10.0.0.1/24]}}]\n\
                     vxlan: {{vni: 42, local_vtep: 10.0.0.1{nodes}}}\n\
                     services: {{source: {source}, path: /}}\n"
                ),
                "gateway.yaml",
            )
        };
        let kube = config("kubernetes", "").expect("valid");
        assert_eq!(kube.node_scheme(), NodeScheme::Flannel);
        let off = config("kubernetes", ", nodes: none").expect("valid");
        assert_eq!(off.node_scheme(), NodeScheme::None);
        let plain = config("kubernetes", ", nodes: internal-ip").expect("valid");
        assert_eq!(plain.node_scheme(), NodeScheme::InternalIp);
        assert_eq!(
            config("files", "").expect("valid").node_scheme(),
            NodeScheme::None
        );
        let err = config("files", ", nodes: flannel").unwrap_err().to_string();
        assert!(err.starts_with("gateway.yaml: vxlan.nodes: "), "{err}");
        let err = config("kubernetes", ", nodes: calico")
            .unwrap_err()
            .to_string();
        assert!(err.contains("vxlan.nodes"), "{err}");
    }

    #[test]
    fn static_entries_pin_their_node_and_their_cidr() {
        let pinned = vec![
            PodCidrRoute {
                cidr: "10.244.1.0/24".parse().unwrap(),
                vtep: Ipv4Addr::new(10, 0, 0, 99),
                vni: 42,
                node: Some(Arc::from("a")),
                vtep_mac: None,
            },
            PodCidrRoute {
                cidr: "10.244.2.0/24".parse().unwrap(),
                vtep: Ipv4Addr::new(10, 0, 0, 98),
                vni: 42,
                node: None,
                vtep_mac: None,
            },
        ];
        let list = nodes(vec![
            node("a", &["10.244.7.0/24"], "10.0.0.11", &[]),
            node("b", &["10.244.2.0/24", "10.244.8.0/24"], "10.0.0.12", &[]),
        ]);
        let derived = derive(NodeScheme::Flannel, 42, &pinned, &list);
        let got: Vec<(String, Ipv4Addr)> = derived
            .routes
            .iter()
            .map(|r| (r.cidr.to_string(), r.vtep))
            .collect();
        assert_eq!(
            got,
            vec![
                ("10.244.1.0/24".to_string(), Ipv4Addr::new(10, 0, 0, 99)),
                ("10.244.2.0/24".to_string(), Ipv4Addr::new(10, 0, 0, 98)),
                ("10.244.8.0/24".to_string(), Ipv4Addr::new(10, 0, 0, 12)),
            ]
        );
    }
}
