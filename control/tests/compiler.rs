//! The compiler against every item of kube-semantics.md it decides. Objects are written as
//! YAML, as a user would see them in `kubectl get -o yaml`.

use std::net::Ipv4Addr;
use std::sync::Arc;

use control::compiler::{CompileOptions, Compiled, Compiler};
use control::model::{Model, ObjectKey};
use dataplane::maglev::MaglevTable;
use dataplane::snapshot::{
    Backend, EndpointState, Frontend, FrontendKey, FrontendKind, InternalPolicy, PodCidrRoute,
    Protocol, Snapshot,
};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// The warnings of a compilation as they are printed.
fn warning_lines(c: &Compiled) -> Vec<String> {
    c.warnings.iter().map(ToString::to_string).collect()
}

/// A model from multi-document YAML (Services and EndpointSlices only).
fn model(yaml: &str) -> Model {
    let mut model = Model::default();
    let documents: Vec<serde_json::Value> =
        serde_saphyr::from_str_multiple(yaml).expect("valid YAML");
    for value in documents {
        if value.is_null() {
            continue;
        }
        match value["kind"].as_str() {
            Some("Service") => {
                let mut svc: Service = serde_json::from_value(value).expect("a Service");
                let ns = svc
                    .metadata
                    .namespace
                    .get_or_insert_with(|| "default".into());
                let key = ObjectKey::new(ns.clone(), svc.metadata.name.clone().unwrap());
                model.services.insert(key, Arc::new(svc));
            }
            Some("EndpointSlice") => {
                let mut slice: EndpointSlice =
                    serde_json::from_value(value).expect("an EndpointSlice");
                let ns = slice
                    .metadata
                    .namespace
                    .get_or_insert_with(|| "default".into());
                let key = ObjectKey::new(ns.clone(), slice.metadata.name.clone().unwrap());
                model.endpoint_slices.insert(key, Arc::new(slice));
            }
            other => panic!("unexpected kind {other:?}"),
        }
    }
    model
}

fn compile(yaml: &str) -> Compiled {
    compile_with(CompileOptions::default(), yaml)
}

fn compile_with(options: CompileOptions, yaml: &str) -> Compiled {
    Compiler::new(options).compile(&model(yaml))
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn fe<'a>(snapshot: &'a Snapshot, addr: &str, protocol: Protocol, port: u16) -> &'a Arc<Frontend> {
    snapshot
        .frontends
        .get(&FrontendKey {
            addr: ip(addr),
            protocol,
            port,
        })
        .unwrap_or_else(|| panic!("no frontend {addr}:{port}/{protocol}"))
}

fn has_fe(snapshot: &Snapshot, addr: &str, protocol: Protocol, port: u16) -> bool {
    snapshot.frontends.contains_key(&FrontendKey {
        addr: ip(addr),
        protocol,
        port,
    })
}

/// (addr, port, state) of every backend.
fn backends(frontend: &Frontend) -> Vec<(String, u16, EndpointState)> {
    frontend
        .backends
        .backends
        .iter()
        .map(|b| (b.addr.to_string(), b.port, b.state))
        .collect()
}

/// (addr, port) of the usable backends.
fn usable(frontend: &Frontend) -> Vec<(String, u16)> {
    let set = &frontend.backends;
    set.usable
        .iter()
        .map(|&i| {
            let b = &set.backends[i as usize];
            (b.addr.to_string(), b.port)
        })
        .collect()
}

use EndpointState::{NotServing, Ready, ServingTerminating};
use Protocol::{Sctp, Tcp, Udp};

const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: lab}
spec:
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10]
  ports:
    - {name: http, port: 80, protocol: TCP, targetPort: http}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-a
  namespace: lab
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 9376, protocol: TCP}]
endpoints:
  - addresses: [10.244.1.2]
    nodeName: node-1
  - addresses: [10.244.2.2]
    nodeName: node-2
"#;

#[test]
fn item_01_headless_and_externalname_ignored() {
    let c = compile(
        r#"
apiVersion: v1
kind: Service
metadata: {name: headless}
spec:
  clusterIP: None
  clusterIPs: [None]
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: empty-ip}
spec:
  clusterIP: ""
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: external}
spec:
  type: ExternalName
  externalName: example.com
  clusterIP: 10.96.0.50
  clusterIPs: [10.96.0.50]
  ports: [{port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: headless-x
  labels: {kubernetes.io/service-name: headless}
addressType: IPv4
ports: [{port: 80}]
endpoints: [{addresses: [10.244.1.2]}]
"#,
    );
    assert_eq!(c.snapshot.frontend_count, 0);
    assert!(c.snapshot.frontends.is_empty());
    assert!(c.snapshot.service_addresses.is_empty());
    assert_eq!(c.stats.services, 0);
    assert!(
        c.warnings.is_empty(),
        "headless and ExternalName Services are valid, not warned about: {:?}",
        c.warnings
    );
}

#[test]
fn invalid_values_are_warned_with_their_field_path_and_ignored() {
    let c = compile(
        r#"
apiVersion: v1
kind: Service
metadata: {name: bad, namespace: lab}
spec:
  type: LoadBalancer
  clusterIPs: [10.96.0.10, 10.96.0.300]
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: -1}}
  ports:
    - {name: http, port: 80, protocol: TPC}
    - {name: big, port: 70000}
    - {name: web, port: 8080, nodePort: 70000}
    - {name: web, port: 8081}
status:
  loadBalancer:
    ingress: [{ip: 192.0.2.1}, {ip: not-an-ip}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: bad-1
  namespace: lab
  labels: {kubernetes.io/service-name: bad}
addressType: IPv4
ports: [{name: web, port: 70000}, {name: web, port: 9376}]
endpoints: [{addresses: [10.244.1.300]}, {addresses: [10.244.1.2]}]
"#,
    );
    assert_eq!(
        warning_lines(&c),
        vec![
            r#"Service lab/bad: spec.clusterIPs[1]: "10.96.0.300" is not an IP address, ignored"#,
            "Service lab/bad: spec.sessionAffinityConfig.clientIP.timeoutSeconds: -1 is not positive; using 10800",
            r#"Service lab/bad: status.loadBalancer.ingress[1].ip: "not-an-ip" is not an IP address, ignored"#,
            r#"Service lab/bad: spec.ports[0].protocol: "TPC" is not TCP, UDP or SCTP, the port is ignored"#,
            "Service lab/bad: spec.ports[1].port: 70000 is outside 1..=65535, the port is ignored",
            "EndpointSlice lab/bad-1: ports[0].port: 70000 is outside 1..=65535, ignored",
            r#"EndpointSlice lab/bad-1: endpoints[0].addresses[0]: "10.244.1.300" is not an IPv4 address, the endpoint is ignored"#,
            "Service lab/bad: spec.ports[2].nodePort: 70000 is outside 1..=65535, ignored",
            r#"Service lab/bad: spec.ports[3]: port "web"/TCP is listed twice, this one is ignored"#,
        ]
    );
    assert!(c.warnings.iter().all(|w| w.invalid), "{:?}", c.warnings);
    // What is valid is still served: run ignores only the invalid parts.
    let s = &c.snapshot;
    assert_eq!(
        backends(fe(s, "10.96.0.10", Tcp, 8080)),
        vec![("10.244.1.2".into(), 9376, Ready)]
    );
    assert!(has_fe(s, "192.0.2.1", Tcp, 8080));
    assert!(!has_fe(s, "10.96.0.10", Tcp, 80), "the TPC port is ignored");
    assert!(
        s.node_ports.is_empty(),
        "the out-of-range nodePort is ignored"
    );
}

#[test]
fn item_02_protocols_are_distinct_keys() {
    let c = compile(
        r#"
apiVersion: v1
kind: Service
metadata: {name: dns}
spec:
  clusterIP: 10.96.0.53
  ports:
    - {name: dns-tcp, port: 53, protocol: TCP}
    - {name: dns-udp, port: 53, protocol: UDP}
    - {name: dns-sctp, port: 53, protocol: SCTP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: dns-x
  labels: {kubernetes.io/service-name: dns}
addressType: IPv4
ports:
  - {name: dns-tcp, port: 5300}
  - {name: dns-udp, port: 5301, protocol: UDP}
  - {name: dns-sctp, port: 5302, protocol: SCTP}
endpoints: [{addresses: [10.244.1.2]}]
"#,
    );
    assert_eq!(c.snapshot.frontend_count, 3);
    for (proto, port, name) in [
        (Tcp, 5300, "dns-tcp"),
        (Udp, 5301, "dns-udp"),
        (Sctp, 5302, "dns-sctp"),
    ] {
        let f = fe(&c.snapshot, "10.96.0.53", proto, 53);
        assert_eq!(f.protocol, proto);
        assert_eq!(f.service.protocol, proto);
        assert_eq!(&*f.service.port_name, name);
        assert_eq!(backends(f), vec![("10.244.1.2".into(), port, Ready)]);
    }
}

#[test]
fn item_02_missing_protocol_is_tcp_and_matches_slice_port_by_protocol() {
    let c = compile(
        r#"
apiVersion: v1
kind: Service
metadata: {name: s}
spec:
  clusterIP: 10.96.0.5
  ports: [{port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: s-x
  labels: {kubernetes.io/service-name: s}
addressType: IPv4
ports: [{port: 8080, protocol: UDP}]
endpoints: [{addresses: [10.244.1.2]}]
"#,
    );
    let f = fe(&c.snapshot, "10.96.0.5", Tcp, 80);
    assert!(
        backends(f).is_empty(),
        "a UDP slice port does not serve a TCP service port"
    );
}

#[test]
fn item_03_dual_stack_yields_only_ipv4_frontends() {
    let c = compile(
        r#"
apiVersion: v1
kind: Service
metadata: {name: dual}
spec:
  type: LoadBalancer
  clusterIP: fd00:10:96::10
  clusterIPs: [fd00:10:96::10, 10.96.0.10]
  ipFamilies: [IPv6, IPv4]
  externalIPs: [2001:db8::1, 198.51.100.7]
  loadBalancerSourceRanges: [2001:db8::/32, 203.0.113.0/24]
  ports: [{name: http, port: 80, nodePort: 30080}]
status:
  loadBalancer:
    ingress: [{ip: "2001:db8::100"}, {ip: 192.0.2.100}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: dual-v6
  labels: {kubernetes.io/service-name: dual}
addressType: IPv6
ports: [{name: http, port: 9376}]
endpoints: [{addresses: ["fd00:10:244::2"]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: dual-v4
  labels: {kubernetes.io/service-name: dual}
addressType: IPv4
ports: [{name: http, port: 9376}]
endpoints: [{addresses: [10.244.1.2]}]
"#,
    );
    let s = &c.snapshot;
    assert_eq!(
        s.frontend_count, 4,
        "ClusterIP, NodePort, LB, externalIP: IPv4 only"
    );
    let cluster = fe(s, "10.96.0.10", Tcp, 80);
    assert_eq!(backends(cluster), vec![("10.244.1.2".into(), 9376, Ready)]);
    assert!(has_fe(s, "192.0.2.100", Tcp, 80));
    assert!(has_fe(s, "198.51.100.7", Tcp, 80));
    assert!(s.node_ports.contains_key(&(Tcp, 30080)));
    assert_eq!(
        fe(s, "192.0.2.100", Tcp, 80).source_ranges,
        vec!["203.0.113.0/24".parse().unwrap()]
    );
    assert!(
        c.warnings.is_empty(),
        "other-family values are not warned: {:?}",
        c.warnings
    );
}

#[test]
fn item_03_ipv6_only_service_is_not_served() {
    let c = compile(
        r#"
apiVersion: v1
kind: Service
metadata: {name: v6}
spec:
  type: NodePort
  clusterIP: fd00:10:96::10
  clusterIPs: [fd00:10:96::10]
  externalIPs: [198.51.100.7]
  ports: [{port: 80, nodePort: 30080}]
"#,
    );
    assert_eq!(c.snapshot.frontend_count, 0);
}

#[test]
fn item_04_cluster_ip_frontend_per_port() {
    let c = compile(
        r#"
apiVersion: v1
kind: Service
metadata: {name: multi, namespace: lab}
spec:
  clusterIP: 10.96.0.10
  ports:
    - {name: http, port: 80}
    - {name: https, port: 443}
"#,
    );
    let s = &c.snapshot;
    assert_eq!(s.frontend_count, 2);
    let http = fe(s, "10.96.0.10", Tcp, 80);
    assert_eq!(http.kind, FrontendKind::ClusterIp);
    assert_eq!(http.service.to_string(), "lab/multi:http/TCP");
    assert_eq!(
        fe(s, "10.96.0.10", Tcp, 443).service.to_string(),
        "lab/multi:https/TCP"
    );
    assert_eq!(
        s.service_addresses.get(&ip("10.96.0.10")),
        Some(&FrontendKind::ClusterIp)
    );
}

#[test]
fn item_05_node_port_frontends_ignore_source_ranges() {
    let options = CompileOptions {
        node_port_addresses: vec![ip("192.168.1.10")],
        ..CompileOptions::default()
    };
    let c = compile_with(
        options,
        r#"
apiVersion: v1
kind: Service
metadata: {name: np}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.10
  loadBalancerSourceRanges: [10.0.0.0/8]
  ports: [{port: 80, nodePort: 30080}, {port: 81, protocol: UDP, nodePort: 30080}]
"#,
    );
    let s = &c.snapshot;
    assert_eq!(s.node_port_addresses, vec![ip("192.168.1.10")]);
    let tcp = &s.node_ports[&(Tcp, 30080)];
    assert_eq!(tcp.kind, FrontendKind::NodePort);
    assert_eq!(tcp.port, 30080);
    assert!(tcp.source_ranges.is_empty());
    assert!(s.node_ports.contains_key(&(Udp, 30080)));
    assert!(s
        .match_frontend(ip("192.168.1.10"), Tcp, 30080)
        .is_some_and(|f| f.kind == FrontendKind::NodePort));
    assert!(s.match_frontend(ip("127.0.0.1"), Tcp, 30080).is_none());
}

#[test]
fn item_06_lb_ingress_vip_only() {
    let c = compile(
        r#"
apiVersion: v1
kind: Service
metadata: {name: lb}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.10
  allocateLoadBalancerNodePorts: false
  ports: [{port: 80}]
status:
  loadBalancer:
    ingress:
      - ip: 192.0.2.1
      - ip: 192.0.2.2
        ipMode: VIP
      - ip: 192.0.2.3
        ipMode: Proxy
      - hostname: lb.example.com
"#,
    );
    let s = &c.snapshot;
    assert_eq!(fe(s, "192.0.2.1", Tcp, 80).kind, FrontendKind::LoadBalancer);
    assert!(has_fe(s, "192.0.2.2", Tcp, 80));
    assert!(!has_fe(s, "192.0.2.3", Tcp, 80), "ipMode Proxy is skipped");
    assert!(s.node_ports.is_empty());
    assert_eq!(s.frontend_count, 3);
    assert_eq!(
        s.service_addresses.get(&ip("192.0.2.1")),
        Some(&FrontendKind::LoadBalancer)
    );
    assert!(!s.service_addresses.contains_key(&ip("192.0.2.3")));
}

#[test]
fn item_07_external_ips() {
    let c = compile(
        r#"
apiVersion: v1
kind: Service
metadata: {name: ext}
spec:
  clusterIP: 10.96.0.10
  externalIPs: [198.51.100.7, not-an-ip]
  ports: [{port: 80}]
"#,
    );
    let s = &c.snapshot;
    assert_eq!(
        fe(s, "198.51.100.7", Tcp, 80).kind,
        FrontendKind::ExternalIp
    );
    assert_eq!(
        s.service_addresses.get(&ip("198.51.100.7")),
        Some(&FrontendKind::ExternalIp)
    );
    assert_eq!(
        warning_lines(&c),
        vec![
            r#"Service default/ext: spec.externalIPs[1]: "not-an-ip" is not an IP address, ignored"#
        ]
    );
    assert!(c.warnings[0].invalid, "an invalid value: check fails on it");
}

#[test]
fn item_08_frontends_without_endpoints_and_service_addresses() {
    let options = CompileOptions {
        service_cidr: Some("10.96.0.0/16".parse().unwrap()),
        ..CompileOptions::default()
    };
    let c = compile_with(
        options,
        r#"
apiVersion: v1
kind: Service
metadata: {name: lonely}
spec:
  clusterIP: 10.96.0.10
  ports: [{port: 80}]
"#,
    );
    let s = &c.snapshot;
    let f = fe(s, "10.96.0.10", Tcp, 80);
    assert!(f.backends.backends.is_empty());
    assert!(f.backends.maglev.is_empty());
    assert!(
        f.backends.pick(12345).is_none(),
        "no usable endpoint: the dataplane rejects"
    );
    assert_eq!(s.service_addresses.len(), 1);
    assert_eq!(s.service_cidr, Some("10.96.0.0/16".parse().unwrap()));
}

#[test]
fn item_09_slices_merge_and_duplicates_collapse() {
    let c = compile(
        r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-a
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 9376}]
endpoints:
  - addresses: [10.244.2.2]
  - addresses: [10.244.1.2]
    conditions: {ready: false, serving: false}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-b
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 9376}]
endpoints:
  - addresses: [10.244.1.2]
  - addresses: [10.244.1.3]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: other-namespace
  namespace: elsewhere
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 9376}]
endpoints: [{addresses: [10.244.9.9]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: unlabelled
addressType: IPv4
ports: [{name: http, port: 9376}]
endpoints: [{addresses: [10.244.8.8]}]
"#,
    );
    let f = fe(&c.snapshot, "10.96.0.10", Tcp, 80);
    assert_eq!(
        backends(f),
        vec![
            ("10.244.1.2".into(), 9376, Ready),
            ("10.244.1.3".into(), 9376, Ready),
            ("10.244.2.2".into(), 9376, Ready),
        ],
        "merged, deduplicated (ready wins), sorted; other namespaces and unlabelled slices ignored"
    );
}

#[test]
fn item_09_endpoint_moving_between_slices_does_not_flap() {
    let service = r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80}]
"#;
    let slice = |name: &str, endpoints: &str| {
        format!(
            r#"
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{{name: http, port: 9376}}]
endpoints: {endpoints}
"#
        )
    };
    let pod = "[{addresses: [10.244.1.2], nodeName: node-1}]";
    let both = "[{addresses: [10.244.1.2], nodeName: node-1}, {addresses: [10.244.1.3], nodeName: node-1}]";
    let one = "[{addresses: [10.244.1.3], nodeName: node-1}]";
    // The endpoint is in slice a, then in both (mid-move), then only in slice b.
    let before = format!("{service}{}{}", slice("web-a", both), slice("web-b", "[]"));
    let during = format!("{service}{}{}", slice("web-a", both), slice("web-b", pod));
    let after = format!("{service}{}{}", slice("web-a", one), slice("web-b", pod));
    let mut compiler = Compiler::new(CompileOptions::default());
    let sets: Vec<_> = [before, during, after]
        .iter()
        .map(|yaml| {
            let c = compiler.compile(&model(yaml));
            fe(&c.snapshot, "10.96.0.10", Tcp, 80).backends.clone()
        })
        .collect();
    assert!(
        Arc::ptr_eq(&sets[0], &sets[1]),
        "same inputs → same shared set"
    );
    assert!(Arc::ptr_eq(&sets[1], &sets[2]));
    assert_eq!(sets[0].backends.len(), 2);
}

#[test]
fn item_09_fqdn_slices_ignored_and_only_first_address() {
    let c = compile(
        r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  clusterIP: 10.96.0.10
  ports: [{port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-fqdn
  labels: {kubernetes.io/service-name: web}
addressType: FQDN
ports: [{port: 80}]
endpoints: [{addresses: [backend.example.com]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-v4
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.244.1.2, 10.244.1.99]}]
"#,
    );
    let f = fe(&c.snapshot, "10.96.0.10", Tcp, 80);
    assert_eq!(backends(f), vec![("10.244.1.2".into(), 8080, Ready)]);
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
}

#[test]
fn item_10_named_target_port_resolves_per_slice() {
    let c = compile(
        r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: web}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-old
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.244.1.2]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-new
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 9090}]
endpoints: [{addresses: [10.244.1.3]}]
"#,
    );
    let f = fe(&c.snapshot, "10.96.0.10", Tcp, 80);
    assert_eq!(
        backends(f),
        vec![
            ("10.244.1.2".into(), 8080, Ready),
            ("10.244.1.3".into(), 9090, Ready)
        ]
    );
}

#[test]
fn item_10_port_matched_by_name_and_numberless_ports_ignored() {
    let c = compile(
        r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  clusterIP: 10.96.0.10
  ports:
    - {name: http, port: 80}
    - {name: metrics, port: 9100}
    - {name: admin, port: 8443}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-x
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports:
  - {name: http, port: 9376}
  - {name: metrics}
  - {port: 1}
endpoints: [{addresses: [10.244.1.2]}]
"#,
    );
    let s = &c.snapshot;
    assert_eq!(
        backends(fe(s, "10.96.0.10", Tcp, 80)),
        vec![("10.244.1.2".into(), 9376, Ready)]
    );
    assert!(
        backends(fe(s, "10.96.0.10", Tcp, 9100)).is_empty(),
        "slice port without number"
    );
    assert!(
        backends(fe(s, "10.96.0.10", Tcp, 8443)).is_empty(),
        "no slice port named admin"
    );
}

#[test]
fn item_10_unnamed_service_port_matches_unnamed_slice_port() {
    let c = compile(
        r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  clusterIP: 10.96.0.10
  ports: [{port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-x
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: "", port: 9376}]
endpoints: [{addresses: [10.244.1.2]}]
"#,
    );
    assert_eq!(
        backends(fe(&c.snapshot, "10.96.0.10", Tcp, 80)),
        vec![("10.244.1.2".into(), 9376, Ready)]
    );
}

/// Cases for item 11: endpoints with conditions → (backends, usable).
#[test]
fn item_11_conditions_and_terminating_fallback() {
    struct Case {
        name: &'static str,
        endpoints: &'static str,
        states: &'static [(&'static str, EndpointState)],
        usable: &'static [&'static str],
    }
    let cases = [
        Case {
            name: "missing conditions mean ready",
            endpoints: "[{addresses: [10.0.0.1]}, {addresses: [10.0.0.2], conditions: {}}]",
            states: &[("10.0.0.1", Ready), ("10.0.0.2", Ready)],
            usable: &["10.0.0.1", "10.0.0.2"],
        },
        Case {
            name: "ready wins over terminating",
            endpoints: "[{addresses: [10.0.0.1], conditions: {ready: true}},
                         {addresses: [10.0.0.2], conditions: {ready: false, serving: true, terminating: true}}]",
            states: &[("10.0.0.1", Ready), ("10.0.0.2", ServingTerminating)],
            usable: &["10.0.0.1"],
        },
        Case {
            name: "no ready: fall back to serving-terminating",
            endpoints: "[{addresses: [10.0.0.1], conditions: {ready: false, serving: false, terminating: true}},
                         {addresses: [10.0.0.2], conditions: {ready: false, serving: true, terminating: true}},
                         {addresses: [10.0.0.3], conditions: {ready: false, terminating: true}}]",
            states: &[("10.0.0.1", NotServing), ("10.0.0.2", ServingTerminating), ("10.0.0.3", ServingTerminating)],
            usable: &["10.0.0.2", "10.0.0.3"],
        },
        Case {
            name: "not ready, serving, not terminating is not serving",
            endpoints: "[{addresses: [10.0.0.1], conditions: {ready: false, serving: true}}]",
            states: &[("10.0.0.1", NotServing)],
            usable: &[],
        },
        Case {
            name: "not-serving is never usable",
            endpoints: "[{addresses: [10.0.0.1], conditions: {ready: false, serving: false, terminating: false}}]",
            states: &[("10.0.0.1", NotServing)],
            usable: &[],
        },
    ];
    for case in cases {
        let c = compile(&format!(
            r#"
apiVersion: v1
kind: Service
metadata: {{name: s}}
spec:
  clusterIP: 10.96.0.10
  ports: [{{port: 80}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: s-x
  labels: {{kubernetes.io/service-name: s}}
addressType: IPv4
ports: [{{port: 8080}}]
endpoints: {}
"#,
            case.endpoints
        ));
        let f = fe(&c.snapshot, "10.96.0.10", Tcp, 80);
        let states: Vec<_> = case
            .states
            .iter()
            .map(|&(a, s)| (a.to_string(), 8080, s))
            .collect();
        assert_eq!(backends(f), states, "{}", case.name);
        let expect: Vec<_> = case.usable.iter().map(|a| (a.to_string(), 8080)).collect();
        assert_eq!(usable(f), expect, "{}", case.name);
        assert_eq!(
            f.backends.maglev.is_empty(),
            case.usable.is_empty(),
            "{}",
            case.name
        );
        if !case.usable.is_empty() {
            for hash in 0..200u64 {
                let picked = f
                    .backends
                    .pick(hash.wrapping_mul(0x9e37_79b9_7f4a_7c15))
                    .unwrap();
                assert!(
                    case.usable.contains(&picked.addr.to_string().as_str()),
                    "{}",
                    case.name
                );
            }
        }
    }
}

#[test]
fn item_12_backend_states_kept_for_existing_flows() {
    let c = compile(
        r#"
apiVersion: v1
kind: Service
metadata: {name: s}
spec:
  clusterIP: 10.96.0.10
  ports: [{port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: s-x
  labels: {kubernetes.io/service-name: s}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
  - {addresses: [10.0.0.1]}
  - {addresses: [10.0.0.2], conditions: {ready: false, serving: true, terminating: true}}
  - {addresses: [10.0.0.3], conditions: {ready: false, serving: false}}
"#,
    );
    let set = &fe(&c.snapshot, "10.96.0.10", Tcp, 80).backends;
    assert_eq!(set.state_of(ip("10.0.0.1"), 8080), Some(Ready));
    assert_eq!(set.state_of(ip("10.0.0.2"), 8080), Some(ServingTerminating));
    assert_eq!(set.state_of(ip("10.0.0.3"), 8080), Some(NotServing));
    assert_eq!(set.state_of(ip("10.0.0.4"), 8080), None, "gone entirely");
}

/// The snapshot lists every endpoint of every slice, in any condition and whether or not
/// its Service exists: what an established TCP flow whose frontend went away (a nodePort
/// edit, a deleted Service) is validated against. Kept up to date slice by slice by one
/// compiler across models.
#[test]
fn item_12_backend_presence_covers_every_slice() {
    let web_slice_b = r#"
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-b
  namespace: lab
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 9376, protocol: TCP}, {name: dns, port: 53, protocol: UDP}]
endpoints:
  - addresses: [10.244.3.3]
    conditions: {ready: false, serving: false, terminating: true}
"#;
    let service_only = WEB.split("---").next().unwrap().to_string();
    let slices_only = format!("---{}", WEB.split("---").nth(1).unwrap());
    let mut compiler = Compiler::new(CompileOptions::default());
    let present = |c: &Compiled, protocol: Protocol, addr: &str, port: u16| {
        c.snapshot
            .backend_presence
            .contains(protocol, ip(addr), port)
    };

    let c = compiler.compile(&model(&format!("{WEB}{web_slice_b}")));
    assert!(present(&c, Tcp, "10.244.1.2", 9376));
    assert!(present(&c, Tcp, "10.244.2.2", 9376));
    assert!(
        present(&c, Tcp, "10.244.3.3", 9376),
        "not serving, still listed"
    );
    assert!(present(&c, Udp, "10.244.3.3", 53));
    assert!(
        !present(&c, Udp, "10.244.1.2", 9376),
        "the protocol is part of the key"
    );
    assert!(!present(&c, Tcp, "10.244.1.2", 80));
    assert_eq!(c.snapshot.backend_presence.len(), 4);

    // The Service is deleted, its slices stay (until Kubernetes' garbage collector removes
    // them): the endpoints are still listed.
    let c = compiler.compile(&model(&format!("{slices_only}{web_slice_b}")));
    assert!(c.snapshot.frontends.is_empty());
    assert!(present(&c, Tcp, "10.244.1.2", 9376));

    // web-b goes; web-a stays with one endpoint fewer.
    let fewer = slices_only.replace("  - addresses: [10.244.2.2]\n    nodeName: node-2\n", "");
    assert_ne!(fewer, slices_only);
    let c = compiler.compile(&model(&format!("{service_only}{fewer}")));
    assert!(present(&c, Tcp, "10.244.1.2", 9376));
    assert!(!present(&c, Tcp, "10.244.2.2", 9376), "left every slice");
    assert!(!present(&c, Tcp, "10.244.3.3", 9376));
    assert_eq!(c.snapshot.backend_presence.len(), 1);

    // The same endpoint in two slices counts twice: it stays while either lists it.
    let twice = format!(
        "{service_only}{fewer}{}",
        fewer.replace("name: web-a", "name: web-c")
    );
    let c = compiler.compile(&model(&twice));
    assert!(present(&c, Tcp, "10.244.1.2", 9376));
    let c = compiler.compile(&model(&format!(
        "{service_only}{}",
        fewer.replace("name: web-a", "name: web-c")
    )));
    assert!(present(&c, Tcp, "10.244.1.2", 9376), "web-c still lists it");
    let c = compiler.compile(&model(&service_only));
    assert!(c.snapshot.backend_presence.is_empty());
}

#[test]
fn item_14_maglev_over_usable_is_deterministic() {
    let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: s}
spec:
  clusterIP: 10.96.0.10
  ports: [{port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: s-x
  labels: {kubernetes.io/service-name: s}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
  - {addresses: [10.0.0.3]}
  - {addresses: [10.0.0.1]}
  - {addresses: [10.0.0.2], conditions: {ready: false}}
"#;
    let options = CompileOptions {
        maglev_table_size: 251,
        ..CompileOptions::default()
    };
    let a = compile_with(options.clone(), yaml);
    let b = compile_with(options, yaml);
    let fa = fe(&a.snapshot, "10.96.0.10", Tcp, 80);
    let fb = fe(&b.snapshot, "10.96.0.10", Tcp, 80);
    assert_eq!(
        fa.backends.maglev, fb.backends.maglev,
        "same set → same table on every gateway"
    );
    // Two usable endpoints, the configured size.
    let expected = MaglevTable::build(&[(ip("10.0.0.1"), 8080), (ip("10.0.0.3"), 8080)], 251);
    assert_eq!(fa.backends.maglev, expected);
    assert_eq!(fa.backends.maglev.size(), 251);
}

/// Item 14: a change of the set moves as few flows as possible. One of `n` endpoints
/// leaves: its slots go to the others, and (Maglev's bound) at most a few percent of the
/// other slots change hands.
#[test]
fn item_14_an_endpoint_leaving_moves_little_more_than_its_own_flows() {
    for n in [3usize, 5, 10, 25] {
        let before = compile(&sized(n));
        let after = compile(&sized(n - 1));
        let (a, b) = (
            &fe(&before.snapshot, "10.96.0.10", Tcp, 80).backends,
            &fe(&after.snapshot, "10.96.0.10", Tcp, 80).backends,
        );
        assert_eq!(a.maglev.size(), b.maglev.size(), "{n}: one table size");
        // `sized(n - 1)` is `sized(n)` without its last endpoint.
        let gone = (n - 1) as u16;
        let addr = |set: &dataplane::snapshot::BackendSet, slot: u16| {
            let backend = &set.backends[set.usable[slot as usize] as usize];
            (backend.addr, backend.port)
        };
        let (mut kept, mut moved) = (0usize, 0usize);
        for (&was, &is) in a.maglev.slots().iter().zip(b.maglev.slots()) {
            if was == gone {
                continue;
            }
            if addr(a, was) == addr(b, is) {
                kept += 1;
            } else {
                moved += 1;
            }
        }
        let share = moved as f64 / (kept + moved) as f64;
        assert!(
            share < 0.03,
            "{n} endpoints: {:.1} % of the remaining flows moved",
            share * 100.0
        );
    }
}

/// A Service `s` with `n` ready endpoints 10.1.x.y:8080.
fn sized(n: usize) -> String {
    let mut yaml = String::from(
        "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  clusterIP: 10.96.0.10\n  ports: [{port: 80}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: s-x\n  labels: {kubernetes.io/service-name: s}\naddressType: IPv4\nports: [{port: 8080}]\nendpoints:\n",
    );
    for i in 0..n {
        yaml.push_str(&format!(
            "  - {{addresses: [10.1.{}.{}]}}\n",
            i / 250,
            i % 250 + 1
        ));
    }
    yaml
}

#[test]
fn maglev_table_is_the_configured_size_below_it() {
    let size = |n: usize, configured: u32| {
        let c = compile_with(
            CompileOptions {
                maglev_table_size: configured,
                ..CompileOptions::default()
            },
            &sized(n),
        );
        let set = fe(&c.snapshot, "10.96.0.10", Tcp, 80).backends.clone();
        assert_eq!(set.usable.len(), n);
        set.maglev.size() as u32
    };
    // The configured size, whatever the count below it.
    assert_eq!(size(1, 16381), 16381);
    assert_eq!(size(25, 16381), 16381);
    assert_eq!(size(200, 16381), 16381);
    // More usable endpoints than the configured size: next prime ≥ 100 × n regardless.
    assert_eq!(size(20, 13), 2003);
    // Balance at the chosen size stays within the paper's bound (M ≥ 100 N → ≤ ~1%+1 slot).
    let c = compile(&sized(25));
    let set = &fe(&c.snapshot, "10.96.0.10", Tcp, 80).backends;
    let mut shares = vec![0usize; 25];
    for &slot in set.maglev.slots() {
        shares[slot as usize] += 1;
    }
    let (min, max) = (shares.iter().min().unwrap(), shares.iter().max().unwrap());
    assert!(max - min <= 1, "{shares:?}");
}

#[test]
fn maglev_table_size_not_prime_is_warned_and_corrected() {
    let options = CompileOptions {
        maglev_table_size: 1000,
        ..CompileOptions::default()
    };
    let c = compile_with(options, WEB);
    assert!(
        c.warnings
            .iter()
            .any(|w| w.to_string().contains("1000") && !w.invalid),
        "{:?}",
        c.warnings
    );
    // 1000 → 1009, the size of every table.
    let c = compile_with(
        CompileOptions {
            maglev_table_size: 1000,
            ..CompileOptions::default()
        },
        &sized(20),
    );
    let size = fe(&c.snapshot, "10.96.0.10", Tcp, 80)
        .backends
        .maglev
        .size() as u32;
    assert_eq!(size, 1009);
}

#[test]
fn item_15_session_affinity_timeout() {
    let c = compile(
        r#"
apiVersion: v1
kind: Service
metadata: {name: sticky-default}
spec:
  clusterIP: 10.96.0.30
  sessionAffinity: ClientIP
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: sticky-60}
spec:
  clusterIP: 10.96.0.31
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: plain}
spec:
  clusterIP: 10.96.0.32
  sessionAffinity: None
  ports: [{port: 80}]
"#,
    );
    let s = &c.snapshot;
    assert_eq!(
        fe(s, "10.96.0.30", Tcp, 80).affinity_timeout_secs,
        Some(10800)
    );
    assert_eq!(fe(s, "10.96.0.31", Tcp, 80).affinity_timeout_secs, Some(60));
    assert_eq!(fe(s, "10.96.0.32", Tcp, 80).affinity_timeout_secs, None);
}

const EXTERNAL: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: ext}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.10
  externalIPs: [198.51.100.7]
  externalTrafficPolicy: ETP
  ports: [{port: 80, nodePort: 30080}]
status:
  loadBalancer:
    ingress: [{ip: 192.0.2.100}]
"#;

#[test]
fn item_16_etp_cluster_masquerades_external_frontends() {
    for policy in ["Cluster", "\"\""] {
        let c = compile(&EXTERNAL.replace("ETP", policy));
        let s = &c.snapshot;
        assert!(fe(s, "192.0.2.100", Tcp, 80).masquerade);
        assert!(fe(s, "198.51.100.7", Tcp, 80).masquerade);
        assert!(s.node_ports[&(Tcp, 30080)].masquerade);
    }
}

#[test]
fn item_17_etp_local_keeps_client_address() {
    let c = compile(&EXTERNAL.replace("ETP", "Local"));
    let s = &c.snapshot;
    assert!(!fe(s, "192.0.2.100", Tcp, 80).masquerade);
    assert!(!fe(s, "198.51.100.7", Tcp, 80).masquerade);
    assert!(!s.node_ports[&(Tcp, 30080)].masquerade);
    assert!(
        fe(s, "10.96.0.10", Tcp, 80).masquerade,
        "ClusterIP follows item 19, not ETP"
    );
}

const ITP_LOCAL: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: local, namespace: lab}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  internalTrafficPolicy: Local
  ports: [{port: 80, nodePort: 30080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: local-x
  namespace: lab
  labels: {kubernetes.io/service-name: local}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
  - {addresses: [10.244.1.2], nodeName: node-1}
  - {addresses: [10.244.1.3], nodeName: node-1, conditions: {ready: false, serving: true, terminating: true}}
  - {addresses: [10.244.2.2], nodeName: node-2}
"#;

fn route(cidr: &str, vtep: &str, node: Option<&str>) -> PodCidrRoute {
    PodCidrRoute {
        vtep_mac: None,
        cidr: cidr.parse().unwrap(),
        vtep: ip(vtep),
        vni: 1,
        node: node.map(Arc::from),
    }
}

#[test]
fn item_18_itp_local_with_node_mapping() {
    let options = CompileOptions {
        pod_routes: vec![
            route("10.244.1.0/24", "192.168.1.11", Some("node-1")),
            route("10.244.2.0/24", "192.168.1.12", Some("node-2")),
            route("10.244.3.0/24", "192.168.1.13", Some("node-3")),
        ],
        ..CompileOptions::default()
    };
    let c = compile_with(options.clone(), ITP_LOCAL);
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    let s = &c.snapshot;
    assert_eq!(s.pod_routes, options.pod_routes);
    let f = fe(s, "10.96.0.10", Tcp, 80);
    let InternalPolicy::Local { by_node } = &f.internal_policy else {
        panic!("expected Local, got {:?}", f.internal_policy);
    };
    let node1 = &by_node["node-1"];
    assert_eq!(node1.backends.len(), 2);
    assert_eq!(node1.usable, vec![0], "only the ready local endpoint");
    assert_eq!(by_node["node-2"].backends[0].addr, ip("10.244.2.2"));
    assert!(
        by_node["node-3"].maglev.is_empty(),
        "no local endpoint: drop"
    );
    assert_eq!(
        f.backends.backends.len(),
        3,
        "cluster-wide set kept alongside"
    );
    assert!(
        matches!(
            s.node_ports[&(Tcp, 30080)].internal_policy,
            InternalPolicy::Cluster
        ),
        "external frontends follow externalTrafficPolicy"
    );
}

#[test]
fn item_18_itp_local_without_node_mapping_is_cluster() {
    let options = CompileOptions {
        pod_routes: vec![route("10.244.1.0/24", "192.168.1.11", None)],
        ..CompileOptions::default()
    };
    let c = compile_with(options, ITP_LOCAL);
    let f = fe(&c.snapshot, "10.96.0.10", Tcp, 80);
    assert!(matches!(f.internal_policy, InternalPolicy::Cluster));
    assert_eq!(
        warning_lines(&c),
        vec!["internalTrafficPolicy: Local on lab/local treated as Cluster: no pod_routes name a node"]
    );
    assert!(
        !c.warnings[0].invalid,
        "a decision on valid input, not an error"
    );
}

#[test]
fn item_19_cluster_ip_masquerade_option() {
    let on = compile(WEB);
    assert!(
        fe(&on.snapshot, "10.96.0.10", Tcp, 80).masquerade,
        "default true"
    );
    let off = compile_with(
        CompileOptions {
            masquerade_cluster_ip: false,
            ..CompileOptions::default()
        },
        WEB,
    );
    assert!(!fe(&off.snapshot, "10.96.0.10", Tcp, 80).masquerade);
}

#[test]
fn item_20_source_ranges_trimmed_lb_only() {
    let c = compile(
        r#"
apiVersion: v1
kind: Service
metadata: {name: fw, namespace: lab}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.10
  externalIPs: [198.51.100.7]
  loadBalancerSourceRanges: [" 203.0.113.0/24 ", "10.1.2.3/8", "bogus/99"]
  ports: [{port: 80, nodePort: 30080}]
status:
  loadBalancer:
    ingress: [{ip: 192.0.2.100}]
"#,
    );
    let s = &c.snapshot;
    assert_eq!(
        fe(s, "192.0.2.100", Tcp, 80).source_ranges,
        vec![
            "10.0.0.0/8".parse().unwrap(),
            "203.0.113.0/24".parse().unwrap()
        ]
    );
    assert!(fe(s, "10.96.0.10", Tcp, 80).source_ranges.is_empty());
    assert!(fe(s, "198.51.100.7", Tcp, 80).source_ranges.is_empty());
    assert!(s.node_ports[&(Tcp, 30080)].source_ranges.is_empty());
    assert_eq!(
        warning_lines(&c),
        vec![
            r#"Service lab/fw: spec.loadBalancerSourceRanges[2]: "bogus/99" is not a CIDR, ignored"#
        ]
    );
    assert!(c.warnings[0].invalid);
}

#[test]
fn conflicting_frontends_keep_the_older_service() {
    let c = compile(
        r#"
apiVersion: v1
kind: Service
metadata: {name: young, creationTimestamp: "2024-06-01T00:00:00Z"}
spec:
  type: NodePort
  clusterIP: 10.96.0.11
  externalIPs: [198.51.100.7]
  ports: [{port: 80, nodePort: 30080}]
---
apiVersion: v1
kind: Service
metadata: {name: old, creationTimestamp: "2023-01-01T00:00:00Z"}
spec:
  type: NodePort
  clusterIP: 10.96.0.12
  externalIPs: [198.51.100.7]
  ports: [{port: 80, nodePort: 30080}]
"#,
    );
    let s = &c.snapshot;
    assert_eq!(&*fe(s, "198.51.100.7", Tcp, 80).service.name, "old");
    assert_eq!(&*s.node_ports[&(Tcp, 30080)].service.name, "old");
    assert_eq!(c.warnings.len(), 2, "{:?}", c.warnings);
    assert!(c.warnings.iter().all(|w| {
        let line = w.to_string();
        line.contains("default/young") && line.contains("default/old") && !w.invalid
    }));
    assert_eq!(s.frontend_count, 4);
}

#[test]
fn frontend_ids_dense_and_deterministic() {
    let yaml = format!(
        "{WEB}---{}",
        r#"
apiVersion: v1
kind: Service
metadata: {name: a-first}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.20
  externalIPs: [198.51.100.1]
  ports: [{name: b, port: 81, nodePort: 30081}, {name: a, port: 82}]
status:
  loadBalancer:
    ingress: [{ip: 192.0.2.2}, {ip: 192.0.2.1}]
"#
    );
    let c = compile(&yaml);
    let s = &c.snapshot;
    let order: Vec<String> = s
        .all_frontends()
        .iter()
        .map(|f| format!("{} {} {}:{}", f.service, f.kind.as_str(), f.addr, f.port))
        .collect();
    assert_eq!(
        order,
        vec![
            "default/a-first:a/TCP ClusterIP 10.96.0.20:82",
            "default/a-first:a/TCP LoadBalancer 192.0.2.1:82",
            "default/a-first:a/TCP LoadBalancer 192.0.2.2:82",
            "default/a-first:a/TCP ExternalIP 198.51.100.1:82",
            "default/a-first:b/TCP ClusterIP 10.96.0.20:81",
            "default/a-first:b/TCP NodePort 0.0.0.0:30081",
            "default/a-first:b/TCP LoadBalancer 192.0.2.1:81",
            "default/a-first:b/TCP LoadBalancer 192.0.2.2:81",
            "default/a-first:b/TCP ExternalIP 198.51.100.1:81",
            "lab/web:http/TCP ClusterIP 10.96.0.10:80",
        ]
    );
    let ids: Vec<u32> = s.all_frontends().iter().map(|f| f.id).collect();
    assert_eq!(ids, (0..10).collect::<Vec<_>>());
    assert_eq!(s.frontend_count, 10);
    assert_eq!(c.stats.frontends, 10);
    assert_eq!(c.stats.services, 2);
    assert_eq!(s.generation, 0);
}

#[test]
fn incremental_compile_shares_unchanged_backend_sets() {
    let other = |ready: bool| {
        format!(
            r#"
---
apiVersion: v1
kind: Service
metadata: {{name: api, namespace: lab}}
spec:
  clusterIP: 10.96.0.40
  ports: [{{port: 80}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: api-x
  namespace: lab
  labels: {{kubernetes.io/service-name: api}}
addressType: IPv4
ports: [{{port: 8080}}]
endpoints:
  - {{addresses: [10.244.1.7], conditions: {{ready: {ready}}}}}
  - {{addresses: [10.244.1.8]}}
"#
        )
    };
    let mut compiler = Compiler::new(CompileOptions::default());
    let first = compiler.compile(&model(&format!("{WEB}{}", other(true))));
    assert_eq!(first.stats.backend_sets_built, 2);
    assert_eq!(first.stats.backend_sets_reused, 0);
    assert_eq!(first.stats.backends, 4);
    let second = compiler.compile(&model(&format!("{WEB}{}", other(false))));
    assert_eq!(second.stats.backend_sets_built, 1);
    assert_eq!(second.stats.backend_sets_reused, 1);
    let web = |c: &Compiled| fe(&c.snapshot, "10.96.0.10", Tcp, 80).backends.clone();
    let api = |c: &Compiled| fe(&c.snapshot, "10.96.0.40", Tcp, 80).backends.clone();
    assert!(
        Arc::ptr_eq(&web(&first), &web(&second)),
        "unchanged port shares its table"
    );
    assert!(
        !Arc::ptr_eq(&api(&first), &api(&second)),
        "changed port rebuilt"
    );
    assert_eq!(api(&second).usable.len(), 1);
    // Frontends are new values, backend sets are shared.
    let third = compiler.compile(&model(&format!("{WEB}{}", other(false))));
    assert_eq!(third.stats.backend_sets_built, 0);
    assert!(Arc::ptr_eq(&api(&second), &api(&third)));
}

#[test]
fn backend_node_names_come_from_the_slice() {
    let c = compile(WEB);
    let f = fe(&c.snapshot, "10.96.0.10", Tcp, 80);
    let nodes: Vec<Option<&str>> = f
        .backends
        .backends
        .iter()
        .map(|b: &Backend| b.node.as_deref())
        .collect();
    assert_eq!(nodes, vec![Some("node-1"), Some("node-2")]);
}

#[test]
fn item_05_node_port_addresses_never_loopback() {
    let c = compile_with(
        CompileOptions {
            node_port_addresses: vec![ip("127.0.0.1"), ip("192.168.1.10")],
            ..CompileOptions::default()
        },
        WEB,
    );
    assert_eq!(c.snapshot.node_port_addresses, vec![ip("192.168.1.10")]);
    assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
}

/// Everything a snapshot says, in a canonical order (maps sorted, tables by content).
fn describe(c: &Compiled) -> Vec<String> {
    let s = &c.snapshot;
    let set = |b: &dataplane::snapshot::BackendSet| {
        format!(
            "backends {:?} usable {:?} maglev {:?}",
            b.backends,
            b.usable,
            b.maglev.slots()
        )
    };
    let mut out: Vec<String> = s
        .all_frontends()
        .into_iter()
        .map(|f| {
            let policy = match &f.internal_policy {
                InternalPolicy::Cluster => "cluster".to_string(),
                InternalPolicy::Local { by_node } => {
                    let mut nodes: Vec<String> = by_node
                        .iter()
                        .map(|(node, b)| format!("{node}: {}", set(b)))
                        .collect();
                    nodes.sort();
                    format!("local {nodes:?}")
                }
            };
            format!(
                "#{} {} {:?} {}:{}/{} masq {} ranges {:?} affinity {:?} {} {}",
                f.id,
                f.service,
                f.kind,
                f.addr,
                f.port,
                f.protocol,
                f.masquerade,
                f.source_ranges,
                f.affinity_timeout_secs,
                policy,
                set(&f.backends)
            )
        })
        .collect();
    let mut addresses: Vec<String> = s
        .service_addresses
        .iter()
        .map(|(a, k)| format!("address {a} {k:?}"))
        .collect();
    addresses.sort();
    out.extend(addresses);
    out.push(format!(
        "count {} node-port addresses {:?} warnings {:?} services {} frontends {} backends {}",
        s.frontend_count,
        s.node_port_addresses,
        c.warnings,
        c.stats.services,
        c.stats.frontends,
        c.stats.backends
    ));
    out
}

/// A small deterministic generator (tests must not depend on the run).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

fn parse_one<T: serde::de::DeserializeOwned>(yaml: &str) -> Arc<T> {
    Arc::new(serde_saphyr::from_str(yaml).expect("valid object"))
}

/// Service `svc{i}` in namespace `ns{i % 2}`; `variant` changes type, ports and policies.
fn random_service(i: u64, variant: u64, created: u64) -> Arc<Service> {
    let extra = match variant % 4 {
        0 => "".to_string(),
        1 => format!("  type: NodePort\n  externalTrafficPolicy: Local\n  ports: [{{name: http, port: 80, nodePort: {}}}]\n", 30000 + i % 3),
        2 => "  internalTrafficPolicy: Local\n  sessionAffinity: ClientIP\n  ports: [{name: http, port: 80}, {name: dns, port: 53, protocol: UDP}]\n".to_string(),
        _ => "  type: LoadBalancer\n  loadBalancerSourceRanges: [\"192.0.2.0/24\", \"bad\"]\n  ports: [{name: http, port: 80, nodePort: 31000}]\n".to_string(),
    };
    let ports = if extra.contains("ports:") {
        String::new()
    } else {
        "  ports: [{name: http, port: 80}]\n".to_string()
    };
    // Services 0 and 1 share a clusterIP: a conflict the older one wins.
    let cluster_ip = format!("10.96.0.{}", if i == 1 { 0 } else { i });
    parse_one(&format!(
        "metadata:\n  name: svc{i}\n  namespace: ns{}\n  creationTimestamp: \"2024-01-01T00:00:{:02}Z\"\nspec:\n  clusterIP: {cluster_ip}\n{extra}{ports}status:\n  loadBalancer:\n    ingress: [{{ip: 203.0.113.{i}}}]\n",
        i % 2,
        created % 60
    ))
}

/// Slice `svc{i}-{part}` with endpoints chosen by `seed` from a small pool (so moves
/// between slices and duplicates happen).
fn random_slice(i: u64, part: u64, seed: u64) -> Arc<EndpointSlice> {
    let mut rng = Lcg(seed);
    let mut endpoints = String::new();
    for _ in 0..rng.below(5) {
        let host = rng.below(6) + 1;
        let state = match rng.below(4) {
            0 => "{ready: false, serving: true, terminating: true}",
            1 => "{ready: false}",
            _ => "{ready: true}",
        };
        endpoints.push_str(&format!(
            "  - {{addresses: [10.244.{i}.{host}], nodeName: node-{}, conditions: {state}}}\n",
            host % 2
        ));
    }
    if endpoints.is_empty() {
        endpoints.push_str("  []\n");
    }
    parse_one(&format!(
        "metadata:\n  name: svc{i}-{part}\n  namespace: ns{}\n  labels: {{kubernetes.io/service-name: svc{i}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}, {{name: dns, port: 5353, protocol: UDP}}]\nendpoints:\n{endpoints}",
        i % 2
    ))
}

#[test]
fn incremental_compilation_equals_compiling_from_scratch() {
    let options = CompileOptions {
        node_port_addresses: vec![ip("192.168.1.10")],
        pod_routes: vec![
            route("10.244.0.0/24", "192.168.2.10", Some("node-0")),
            route("10.244.1.0/24", "192.168.2.11", Some("node-1")),
        ],
        ..CompileOptions::default()
    };
    let mut rng = Lcg(7);
    let mut model = Model::default();
    let key = |i: u64, name: String| ObjectKey::new(format!("ns{}", i % 2), name);
    for i in 0..8 {
        model
            .services
            .insert(key(i, format!("svc{i}")), random_service(i, i, i));
        for part in 0..2 {
            model.endpoint_slices.insert(
                key(i, format!("svc{i}-{part}")),
                random_slice(i, part, i * 10 + part),
            );
        }
    }
    let mut incremental = Compiler::new(options.clone());
    let (mut rebuilt, mut reused) = (0, 0);
    for step in 0..300u64 {
        let i = rng.below(8);
        match rng.below(10) {
            // Most changes are endpoint changes, as in a cluster.
            0..=5 => {
                let part = rng.below(2);
                model.endpoint_slices.insert(
                    key(i, format!("svc{i}-{part}")),
                    random_slice(i, part, step * 1000 + i),
                );
            }
            6 => {
                model.endpoint_slices.remove(&key(i, format!("svc{i}-1")));
            }
            7 => {
                model.services.insert(
                    key(i, format!("svc{i}")),
                    random_service(i, rng.below(4), step),
                );
            }
            8 => {
                model.services.remove(&key(i, format!("svc{i}")));
            }
            // The same objects parsed again: equal by value, not by pointer.
            _ => {
                let slice = model
                    .endpoint_slices
                    .get(&key(i, format!("svc{i}-0")))
                    .cloned();
                if let Some(slice) = slice {
                    model
                        .endpoint_slices
                        .insert(key(i, format!("svc{i}-0")), Arc::new((*slice).clone()));
                }
            }
        }
        let got = incremental.compile(&model);
        let want = Compiler::new(options.clone()).compile(&model);
        assert_eq!(describe(&got), describe(&want), "step {step}");
        rebuilt += got.stats.backend_sets_built;
        reused += got.stats.backend_sets_reused;
    }
    println!("300 changes: {rebuilt} backend sets built, {reused} reused");
    assert!(
        reused > 4 * rebuilt,
        "unchanged Services are not recompiled"
    );
}

/// `lab/{name}`.
fn lab_key(name: &str) -> ObjectKey {
    ObjectKey::new("lab", name)
}

/// Service `lab/{name}` on `cluster_ip`:80.
fn lab_service(name: &str, cluster_ip: &str) -> Arc<Service> {
    parse_one(&format!(
        "metadata: {{name: {name}, namespace: lab}}\nspec:\n  clusterIP: {cluster_ip}\n  ports: [{{name: http, port: 80}}]\n"
    ))
}

/// Slice `lab/{name}` of Service `service` with ready endpoints 10.244.0.{host}:8080.
fn lab_slice(name: &str, service: &str, hosts: &[u8]) -> Arc<EndpointSlice> {
    let endpoints: String = hosts
        .iter()
        .map(|h| format!("  - {{addresses: [10.244.0.{h}]}}\n"))
        .collect();
    parse_one(&format!(
        "metadata:\n  name: {name}\n  namespace: lab\n  labels: {{kubernetes.io/service-name: {service}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n{}",
        if endpoints.is_empty() { "  []\n".to_string() } else { endpoints }
    ))
}

#[test]
fn endpoint_change_replaces_only_its_frontend_and_keeps_every_id() {
    let key = |name: &str| ObjectKey::new("lab", name);
    let mut model = Model::default();
    for (name, ip, hosts) in [
        ("a", "10.96.0.1", &[1u8, 2][..]),
        ("b", "10.96.0.2", &[3]),
        ("c", "10.96.0.3", &[4, 5]),
    ] {
        model.services.insert(key(name), lab_service(name, ip));
        model.endpoint_slices.insert(
            key(&format!("{name}-x")),
            lab_slice(&format!("{name}-x"), name, hosts),
        );
    }
    let mut compiler = Compiler::new(CompileOptions::default());
    let first = compiler.compile(&model);
    model
        .endpoint_slices
        .insert(key("b-x"), lab_slice("b-x", "b", &[3, 6, 7]));
    let second = compiler.compile(&model);
    assert_eq!(
        describe(&second),
        describe(&Compiler::new(CompileOptions::default()).compile(&model))
    );
    let at = |c: &Compiled, addr: &str| fe(&c.snapshot, addr, Protocol::Tcp, 80).clone();
    for unchanged in ["10.96.0.1", "10.96.0.3"] {
        assert!(Arc::ptr_eq(&at(&first, unchanged), &at(&second, unchanged)));
    }
    let (old, new) = (at(&first, "10.96.0.2"), at(&second, "10.96.0.2"));
    assert!(!Arc::ptr_eq(&old, &new));
    assert_eq!((old.id, new.id), (1, 1));
    assert!(Arc::ptr_eq(&second.snapshot.frontends_by_id[1], &new));
    assert_eq!(second.snapshot.backend_counter_base, vec![0, 2, 5, 7]);
    assert_eq!(
        second.snapshot.backend_counter(2, ip("10.244.0.5"), 8080),
        Some(6)
    );
}

#[test]
fn slices_moved_between_services_and_services_after_their_slices_compile_as_from_scratch() {
    let key = lab_key;
    let mut model = Model::default();
    model
        .services
        .insert(key("a"), lab_service("a", "10.96.0.1"));
    model
        .services
        .insert(key("b"), lab_service("b", "10.96.0.2"));
    model
        .endpoint_slices
        .insert(key("a-x"), lab_slice("a-x", "a", &[1, 2]));
    model
        .endpoint_slices
        .insert(key("b-x"), lab_slice("b-x", "b", &[3]));
    // Slices of a Service that is not there yet.
    model
        .endpoint_slices
        .insert(key("c-x"), lab_slice("c-x", "c", &[4]));
    let mut compiler = Compiler::new(CompileOptions::default());
    let steps: [fn(&mut Model); 6] = [
        // b-x now belongs to a.
        |m| {
            m.endpoint_slices
                .insert(lab_key("b-x"), lab_slice("b-x", "a", &[3]));
        },
        // c arrives and finds its slice.
        |m| {
            m.services
                .insert(lab_key("c"), lab_service("c", "10.96.0.3"));
        },
        // a second slice of c, then a's first slice gone.
        |m| {
            m.endpoint_slices
                .insert(lab_key("c-y"), lab_slice("c-y", "c", &[5, 4]));
            m.endpoint_slices.remove(&lab_key("a-x"));
        },
        // b-x back to b; a left without slices.
        |m| {
            m.endpoint_slices
                .insert(lab_key("b-x"), lab_slice("b-x", "b", &[3]));
        },
        // c gone, its slices stay.
        |m| {
            m.services.remove(&lab_key("c"));
        },
        // nothing changed.
        |_| {},
    ];
    assert_eq!(
        describe(&compiler.compile(&model)),
        describe(&Compiler::new(CompileOptions::default()).compile(&model))
    );
    for (step, change) in steps.iter().enumerate() {
        change(&mut model);
        assert_eq!(
            describe(&compiler.compile(&model)),
            describe(&Compiler::new(CompileOptions::default()).compile(&model)),
            "step {step}"
        );
    }
}

/// A `v1/Node` with a pod CIDR and an InternalIP, as the kubernetes source stores it.
fn api_node(name: &str, cidr: &str, internal_ip: &str) -> Arc<k8s_openapi::api::core::v1::Node> {
    let yaml = format!(
        "metadata: {{name: {name}}}\nspec: {{podCIDR: \"{cidr}\", podCIDRs: [\"{cidr}\"]}}\n\
         status: {{addresses: [{{type: InternalIP, address: \"{internal_ip}\"}}]}}\n"
    );
    Arc::new(serde_saphyr::from_str(&yaml).expect("a Node"))
}

#[test]
fn nodes_from_the_api_route_pods_and_a_node_that_leaves_takes_its_endpoints_along() {
    let options = CompileOptions {
        node_scheme: control::config::NodeScheme::Flannel,
        vni: 42,
        ..CompileOptions::default()
    };
    let mut compiler = Compiler::new(options);
    let mut m = model(ITP_LOCAL);
    m.nodes.insert(
        "node-1".into(),
        api_node("node-1", "10.244.1.0/24", "10.0.0.11"),
    );
    let c = compiler.compile(&m);
    assert_eq!(
        c.snapshot.pod_routes,
        vec![PodCidrRoute {
            vni: 42,
            ..route("10.244.1.0/24", "10.0.0.11", Some("node-1"))
        }]
    );
    let f = fe(&c.snapshot, "10.96.0.10", Tcp, 80);
    let addrs: Vec<Ipv4Addr> = f.backends.backends.iter().map(|b| b.addr).collect();
    assert_eq!(
        addrs,
        [ip("10.244.1.2"), ip("10.244.1.3")],
        "10.244.2.2 is on node-2, which is no known Node"
    );
    assert!(warning_lines(&c)
        .iter()
        .any(|w| w.contains("(10.244.2.2) is on node node-2, which is not a known Node")));
    let InternalPolicy::Local { by_node } = &f.internal_policy else {
        panic!("nodes from the API name nodes: Local");
    };
    assert_eq!(by_node.len(), 1);
    // Nor is it present: a flow pinned to it ends as a gone backend's does.
    let present =
        |c: &Compiled, addr: &str| c.snapshot.backend_presence.contains(Tcp, ip(addr), 8080);
    assert!(!present(&c, "10.244.2.2"));
    assert!(present(&c, "10.244.1.2"));

    // node-2 joins: its endpoint is used and its pods routed, with nothing else changed.
    m.nodes.insert(
        "node-2".into(),
        api_node("node-2", "10.244.2.0/24", "10.0.0.12"),
    );
    let c = compiler.compile(&m);
    assert_eq!(c.snapshot.pod_routes.len(), 2);
    let f = fe(&c.snapshot, "10.96.0.10", Tcp, 80);
    assert_eq!(f.backends.backends.len(), 3);
    let InternalPolicy::Local { by_node } = &f.internal_policy else {
        panic!("Local");
    };
    assert_eq!(by_node["node-2"].backends[0].addr, ip("10.244.2.2"));
    assert!(present(&c, "10.244.2.2"));

    // node-1 leaves.
    m.nodes.remove("node-1");
    let c = compiler.compile(&m);
    let f = fe(&c.snapshot, "10.96.0.10", Tcp, 80);
    let addrs: Vec<Ipv4Addr> = f.backends.backends.iter().map(|b| b.addr).collect();
    assert_eq!(addrs, [ip("10.244.2.2")]);
    assert_eq!(c.snapshot.pod_routes.len(), 1);
    assert!(!present(&c, "10.244.1.2"), "node-1's pods left with it");
    assert!(present(&c, "10.244.2.2"));
}
