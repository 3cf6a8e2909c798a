//! Integration-test support for servicegate: a fake Kubernetes API server and object builders.
#![forbid(unsafe_code)]

pub mod apiserver;
pub mod harness;
pub mod lab;

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Node, NodeAddress, NodeSpec, NodeStatus, Service, ServicePort, ServiceSpec,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// A ClusterIP Service `ns/name` with one TCP port `port` named `http`.
pub fn service(ns: &str, name: &str, cluster_ip: &str, port: i32) -> Service {
    Service {
        metadata: ObjectMeta {
            namespace: Some(ns.to_owned()),
            name: Some(name.to_owned()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".to_owned()),
            cluster_ip: Some(cluster_ip.to_owned()),
            cluster_ips: Some(vec![cluster_ip.to_owned()]),
            ports: Some(vec![ServicePort {
                name: Some("http".to_owned()),
                protocol: Some("TCP".to_owned()),
                port,
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// An IPv4 EndpointSlice `ns/name` of Service `service`, with ready endpoints `addresses`
/// on TCP port `port` named `http`.
pub fn endpoint_slice(
    ns: &str,
    name: &str,
    service: &str,
    addresses: &[&str],
    port: i32,
) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            namespace: Some(ns.to_owned()),
            name: Some(name.to_owned()),
            labels: Some(BTreeMap::from([(
                "kubernetes.io/service-name".to_owned(),
                service.to_owned(),
            )])),
            ..Default::default()
        },
        address_type: "IPv4".to_owned(),
        endpoints: Some(
            addresses
                .iter()
                .map(|a| Endpoint {
                    addresses: vec![(*a).to_owned()],
                    conditions: Some(EndpointConditions {
                        ready: Some(true),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .collect(),
        ),
        ports: Some(vec![EndpointPort {
            name: Some("http".to_owned()),
            protocol: Some("TCP".to_owned()),
            port: Some(port),
            ..Default::default()
        }]),
    }
}

/// A flannel VXLAN node `name`: pod CIDR `pod_cidr`, InternalIP `internal_ip`, and when
/// given flannel's `public-ip` and `backend-data` (`VtepMAC`) annotations.
pub fn node(
    name: &str,
    pod_cidr: &str,
    internal_ip: &str,
    public_ip: Option<&str>,
    vtep_mac: Option<&str>,
) -> Node {
    let mut annotations = BTreeMap::new();
    if let Some(ip) = public_ip {
        annotations.insert(
            "flannel.alpha.coreos.com/public-ip".to_owned(),
            ip.to_owned(),
        );
    }
    if let Some(mac) = vtep_mac {
        annotations.insert(
            "flannel.alpha.coreos.com/backend-data".to_owned(),
            format!(r#"{{"VNI":42,"VtepMAC":"{mac}"}}"#),
        );
        annotations.insert(
            "flannel.alpha.coreos.com/backend-type".to_owned(),
            "vxlan".to_owned(),
        );
    }
    Node {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            annotations: Some(annotations),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            pod_cidr: Some(pod_cidr.to_owned()),
            pod_cidrs: Some(vec![pod_cidr.to_owned()]),
            ..Default::default()
        }),
        status: Some(NodeStatus {
            addresses: Some(vec![NodeAddress {
                type_: "InternalIP".to_owned(),
                address: internal_ip.to_owned(),
            }]),
            ..Default::default()
        }),
    }
}
