//! Issue 24, item 6: `ctl trace` agrees with the packets. A table of flows (ClusterIP,
//! NodePort, LoadBalancer with externalTrafficPolicy Local, internalTrafficPolicy Local from
//! the right and the wrong node, unknown ports and addresses, echo requests, the gateway's
//! own addresses with and without an exception port, a pod routed out, a pod address
//! reached from the uplink) goes once through a real `Pipeline` and once through
//! `admin::explain` over the same config and snapshot; the verdicts, drop reasons, chosen
//! backends and masquerade must be the same.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;

use control::admin::{explain, Routing};
use control::app::compile_options;
use control::compiler::Compiler;
use control::config::Config;
use control::model::{Model, ObjectKey};
use dataplane::conntrack::{ConntrackConfig, FlowKey, PROTO_ICMP, PROTO_TCP, PROTO_UDP};
use dataplane::frame::VecFrame;
use dataplane::pipeline::Verdict;
use dataplane::pipeline::{
    rewrite, Pipeline, PipelineConfig, PortConfig, PortRole, RouteConfig, VxlanConfig,
};
use dataplane::snapshot::Snapshot;
use dataplane::stats::{DropReason, WorkerStats};
use dataplane::wire::build::FrameBuilder;
use dataplane::wire::{EthernetFrame, Ipv4Packet, MacAddr, TcpFlags, TcpPacket, UdpPacket};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

const UPLINK: u16 = 0;
const CLUSTER: u16 = 1;
const UPLINK_EXCEPTION: u16 = 10;
const UPLINK_MAC: MacAddr = MacAddr([0x02, 0x53, 0x47, 0, 0, 0x01]);
const CLUSTER_MAC: MacAddr = MacAddr([0x02, 0x53, 0x47, 0, 0, 0x02]);
const ROUTER_MAC: MacAddr = MacAddr([0x02, 0xee, 0, 0, 0, 0xfe]);
const NODE1_MAC: MacAddr = MacAddr([0x02, 0xaa, 0, 0, 0, 0x11]);
const NODE2_MAC: MacAddr = MacAddr([0x02, 0xaa, 0, 0, 0, 0x12]);
const NODE1_VTEP_MAC: MacAddr = MacAddr([0x02, 0x53, 0x47, 0, 1, 0x01]);
const NODE2_VTEP_MAC: MacAddr = MacAddr([0x02, 0x53, 0x47, 0, 1, 0x02]);

/// The lab's gateway: an uplink with an exception port, a cluster port without one, VXLAN
/// to two nodes, a default route out of the uplink.
const CONFIG: &str = r#"
cores: {control: 0, workers: [1]}
ports:
  - name: uplink
    device: net_null0
    role: uplink
    addresses: [192.168.100.1/24]
    exception: net_null2
  - name: cluster
    device: net_null1
    role: cluster
    addresses: [10.0.0.1/24]
routes:
  - {prefix: 0.0.0.0/0, via: 192.168.100.254, port: uplink}
neighbors:
  - {port: uplink, address: 192.168.100.254, mac: "02:ee:00:00:00:fe"}
  - {port: cluster, address: 10.0.0.11, mac: "02:aa:00:00:00:11"}
  - {port: cluster, address: 10.0.0.12, mac: "02:aa:00:00:00:12"}
vxlan:
  udp_port: 4789
  vni: 42
  local_vtep: 10.0.0.1
  pod_cidrs:
    - {cidr: 10.244.1.0/24, vtep: 10.0.0.11, node: node-1, vtep_mac: "02:53:47:00:01:01"}
    - {cidr: 10.244.2.0/24, vtep: 10.0.0.12, node: node-2, vtep_mac: "02:53:47:00:01:02"}
services:
  source: files
  path: /
  service_cidr: 10.96.0.0/12
"#;

fn service(name: &str, spec: &str) -> Service {
    serde_saphyr::from_str(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: t}}\nspec:\n{spec}"
    ))
    .expect("a Service")
}

/// A slice of `service` with one port named `name`, its endpoints as (address, node).
fn slice(service: &str, protocol: &str, port: u16, endpoints: &[(&str, &str)]) -> EndpointSlice {
    let endpoints: String = endpoints
        .iter()
        .map(|(a, node)| {
            format!("  - addresses: [\"{a}\"]\n    nodeName: {node}\n    conditions: {{ready: true, serving: true, terminating: false}}\n")
        })
        .collect();
    serde_saphyr::from_str(&format!(
        "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {service}-1
  namespace: t
  labels: {{kubernetes.io/service-name: {service}}}
addressType: IPv4
ports: [{{name: p, protocol: {protocol}, port: {port}}}]
endpoints:
{endpoints}"
    ))
    .expect("an EndpointSlice")
}

fn model() -> Model {
    let services = [
        (
            "web",
            "  type: NodePort\n  clusterIP: 10.96.0.10\n  ports: [{name: p, protocol: TCP, port: 80, targetPort: 9376, nodePort: 30080}]\n",
            slice("web", "TCP", 9376, &[("10.244.1.2", "node-1"), ("10.244.2.2", "node-2")]),
        ),
        (
            "local-int",
            "  clusterIP: 10.96.0.20\n  internalTrafficPolicy: Local\n  ports: [{name: p, protocol: TCP, port: 80, targetPort: 9376}]\n",
            slice("local-int", "TCP", 9376, &[("10.244.2.3", "node-2")]),
        ),
        (
            "lb-local",
            "  type: LoadBalancer\n  clusterIP: 10.96.0.30\n  externalTrafficPolicy: Local\n  ports: [{name: p, protocol: TCP, port: 443, targetPort: 8443, nodePort: 30443}]\n",
            slice("lb-local", "TCP", 8443, &[("10.244.1.2", "node-1")]),
        ),
        (
            "dns",
            "  clusterIP: 10.96.0.53\n  ports: [{name: p, protocol: UDP, port: 53, targetPort: 5353}]\n",
            slice("dns", "UDP", 5353, &[("10.244.2.2", "node-2")]),
        ),
    ];
    let mut model = Model::default();
    for (name, spec, endpoints) in services {
        let mut svc = service(name, spec);
        if name == "lb-local" {
            svc.status = serde_saphyr::from_str("loadBalancer:\n  ingress: [{ip: 203.0.113.10}]\n")
                .expect("a status");
        }
        model
            .services
            .insert(ObjectKey::new("t", name), Arc::new(svc));
        model.endpoint_slices.insert(
            ObjectKey::new("t", format!("{name}-1")),
            Arc::new(endpoints),
        );
    }
    model
}

fn pipeline(config: &Config) -> Pipeline {
    // The config's `neighbors`.
    let statics = vec![
        (UPLINK, Ipv4Addr::new(192, 168, 100, 254), ROUTER_MAC),
        (CLUSTER, Ipv4Addr::new(10, 0, 0, 11), NODE1_MAC),
        (CLUSTER, Ipv4Addr::new(10, 0, 0, 12), NODE2_MAC),
    ];
    Pipeline::new(PipelineConfig {
        ports: vec![
            PortConfig {
                id: UPLINK,
                mac: UPLINK_MAC,
                addresses: config.ports[0].addresses.clone(),
                role: PortRole::Uplink,
                mtu: 1500,
                exception_port: Some(UPLINK_EXCEPTION),
            },
            PortConfig {
                id: CLUSTER,
                mac: CLUSTER_MAC,
                addresses: config.ports[1].addresses.clone(),
                role: PortRole::Cluster,
                mtu: 1500,
                exception_port: None,
            },
        ],
        routes: vec![RouteConfig {
            prefix: "0.0.0.0/0".parse().expect("prefix"),
            via: Some(Ipv4Addr::new(192, 168, 100, 254)),
            port: UPLINK,
        }],
        static_neighbors: statics,
        vxlan: Some(VxlanConfig {
            udp_port: 4789,
            vni: 42,
            local_vtep: Ipv4Addr::new(10, 0, 0, 1),
        }),
        snat_addresses: Vec::new(),
        snat_port_range: 32768..=60999,
        conntrack: ConntrackConfig {
            capacity: 4096,
            ..ConntrackConfig::default()
        },
        affinity_capacity: 4096,
        icmp_errors_per_second: 1000,
        worker_index: 0,
        workers: 1,
        neighbor_timeout_ms: 30_000,
        routable_prefixes: Vec::new(),
        reassemble_fragments: true,
    })
    .expect("pipeline")
}

/// Where a flow's first packet comes from.
#[derive(Clone, Copy, Debug)]
enum From {
    /// The upstream router, on the uplink.
    Router,
    /// A node's underlay address, straight on the cluster port.
    Underlay,
    /// A pod, encapsulated by its node's VTEP (node 1 or 2).
    Pod(u8),
}

/// What either side concluded about a flow.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    verdict: String,
    drop_reason: Option<String>,
    backend: Option<SocketAddrV4>,
    masquerade: Option<bool>,
}

fn frame(from: From, flow: &FlowKey) -> Vec<u8> {
    let builder = match from {
        From::Router => FrameBuilder::new(ROUTER_MAC, UPLINK_MAC),
        From::Underlay => FrameBuilder::new(NODE1_MAC, CLUSTER_MAC),
        From::Pod(1) => FrameBuilder::new(NODE1_VTEP_MAC, CLUSTER_MAC),
        From::Pod(_) => FrameBuilder::new(NODE2_VTEP_MAC, CLUSTER_MAC),
    };
    let (src, dst) = (
        SocketAddrV4::new(flow.src, flow.src_port),
        SocketAddrV4::new(flow.dst, flow.dst_port),
    );
    let inner = match flow.protocol {
        PROTO_TCP => builder.tcp_v4(src, dst, TcpFlags::SYN, b""),
        PROTO_UDP => builder.udp_v4(src, dst, b"q"),
        _ => builder.icmp_echo_v4(flow.src, flow.dst, true, flow.src_port, 1, b"ping"),
    };
    match from {
        From::Pod(node) => FrameBuilder::new(NODE1_MAC, CLUSTER_MAC).vxlan_encap(
            Ipv4Addr::new(10, 0, 0, 10 + node),
            Ipv4Addr::new(10, 0, 0, 1),
            51000,
            42,
            &inner,
        ),
        _ => inner,
    }
}

/// The pipeline's outcome, read from its verdict and the frame it produced.
fn forwarded(from: From, flow: &FlowKey, config: &Config, snapshot: &Snapshot) -> Outcome {
    let mut p = pipeline(config);
    let mut stats = WorkerStats::default();
    let mut frame = VecFrame::new(&frame(from, flow));
    let in_port = match from {
        From::Router => UPLINK,
        _ => CLUSTER,
    };
    let verdict = p.process(&mut frame, in_port, snapshot, 1, &mut stats);
    let outcome = |verdict: &str| Outcome {
        verdict: verdict.into(),
        drop_reason: None,
        backend: None,
        masquerade: None,
    };
    match verdict {
        Verdict::Drop(reason) => Outcome {
            drop_reason: Some(reason.as_str().into()),
            ..outcome("drop")
        },
        Verdict::ToException { .. } => outcome("local"),
        Verdict::Handoff { .. } => panic!("one worker hands nothing off"),
        Verdict::Reassemble | Verdict::Fragment { .. } => {
            panic!("the flows traced here are neither fragments nor above the MTU")
        }
        Verdict::Transmit { .. } | Verdict::HoldForNeighbor { .. } => {
            let out = frame.into_vec();
            let l3 = |frame: &[u8]| {
                EthernetFrame::new_checked(frame)
                    .expect("ethernet")
                    .payload()
                    .to_vec()
            };
            let mut packet = l3(&out);
            // Toward a pod: look inside the VXLAN the gateway built.
            {
                let ip = Ipv4Packet::new_checked(&packet[..]).expect("ipv4");
                if ip.protocol() == PROTO_UDP
                    && UdpPacket::new_checked(ip.payload()).is_ok_and(|u| u.dst_port() == 4789)
                {
                    let udp = UdpPacket::new_checked(ip.payload()).expect("udp");
                    let inner = l3(&udp.payload()[8..]);
                    packet = inner;
                }
            }
            let ip = Ipv4Packet::new_checked(&packet[..]).expect("ipv4");
            if ip.protocol() == PROTO_ICMP {
                let icmp_type = ip.payload()[0];
                let reason = DropReason::ALL
                    .iter()
                    .find(|&&r| stats.drops_of(r) > 0)
                    .map(|r| r.as_str().to_string());
                return match icmp_type {
                    0 => outcome("answer"),
                    3 => Outcome {
                        drop_reason: reason,
                        ..outcome("reject")
                    },
                    _ if ip.dst() == flow.dst => outcome("routed"),
                    other => panic!("ICMP type {other} from {flow}"),
                };
            }
            let dport = match ip.protocol() {
                PROTO_TCP => TcpPacket::new_checked(ip.payload())
                    .expect("tcp")
                    .dst_port(),
                _ => UdpPacket::new_checked(ip.payload())
                    .expect("udp")
                    .dst_port(),
            };
            if ip.dst() == flow.dst && dport == flow.dst_port {
                return outcome("routed");
            }
            Outcome {
                backend: Some(SocketAddrV4::new(ip.dst(), dport)),
                masquerade: Some(ip.src() != flow.src),
                ..outcome("forward")
            }
        }
    }
}

/// What `ctl trace` says about the same flow.
fn traced(flow: &FlowKey, routing: &Routing, snapshot: &Snapshot) -> Outcome {
    let out = explain(
        snapshot,
        routing,
        flow,
        |k| rewrite::flow_hash(k.protocol, k.src, k.src_port, k.dst, k.dst_port),
        None,
        &[],
    );
    Outcome {
        verdict: out["verdict"].as_str().unwrap_or("?").into(),
        drop_reason: out["drop_reason"].as_str().map(Into::into),
        backend: out["backend"]["address"].as_str().map(|a| {
            SocketAddrV4::new(
                a.parse().expect("address"),
                out["backend"]["port"].as_u64().expect("port") as u16,
            )
        }),
        masquerade: out["snat"]["masquerade"].as_bool(),
    }
}

#[test]
fn trace_and_the_pipeline_agree_on_a_table_of_flows() {
    let config = Config::parse(CONFIG, "gateway.yaml").expect("config");
    let snapshot = Compiler::new(compile_options(&config))
        .compile(&model())
        .snapshot;
    let routing = Routing::from_config(&config);
    let key = |protocol, src: &str, dst: &str| {
        let (src, dst): (SocketAddrV4, SocketAddrV4) =
            (src.parse().expect("src"), dst.parse().expect("dst"));
        FlowKey::new(protocol, *src.ip(), src.port(), *dst.ip(), dst.port())
    };
    let client = "192.168.100.2:40000";
    let flows = [
        (
            "ClusterIP from the uplink",
            From::Router,
            key(PROTO_TCP, client, "10.96.0.10:80"),
            "forward",
        ),
        (
            "NodePort",
            From::Router,
            key(PROTO_TCP, client, "192.168.100.1:30080"),
            "forward",
        ),
        (
            "NodePort address, unknown port, uplink with an exception port",
            From::Router,
            key(PROTO_TCP, client, "192.168.100.1:30999"),
            "local",
        ),
        (
            "NodePort address, unknown port, cluster port without one",
            From::Underlay,
            key(PROTO_TCP, "10.0.0.11:40000", "10.0.0.1:30999"),
            "drop",
        ),
        (
            "ClusterIP, unknown port",
            From::Router,
            key(PROTO_TCP, client, "10.96.0.10:81"),
            "reject",
        ),
        (
            "unallocated service address",
            From::Router,
            key(PROTO_TCP, client, "10.96.5.5:80"),
            "drop",
        ),
        (
            "echo request to a ClusterIP",
            From::Router,
            key(PROTO_ICMP, "192.168.100.2:7", "10.96.0.10:0"),
            "answer",
        ),
        (
            "echo request to the gateway, uplink",
            From::Router,
            key(PROTO_ICMP, "192.168.100.2:7", "192.168.100.1:0"),
            "local",
        ),
        (
            "iTP Local from a node without a local endpoint",
            From::Pod(1),
            key(PROTO_TCP, "10.244.1.10:40000", "10.96.0.20:80"),
            "drop",
        ),
        (
            "iTP Local from the node with the endpoint",
            From::Pod(2),
            key(PROTO_TCP, "10.244.2.9:40000", "10.96.0.20:80"),
            "forward",
        ),
        (
            "eTP Local LoadBalancer from the uplink",
            From::Router,
            key(PROTO_TCP, client, "203.0.113.10:443"),
            "forward",
        ),
        (
            "eTP Local LoadBalancer from a pod",
            From::Pod(2),
            key(PROTO_TCP, "10.244.2.9:40001", "203.0.113.10:443"),
            "forward",
        ),
        (
            "UDP ClusterIP from a pod",
            From::Pod(1),
            key(PROTO_UDP, "10.244.1.10:5000", "10.96.0.53:53"),
            "forward",
        ),
        (
            "a pod's address from the uplink",
            From::Router,
            key(PROTO_TCP, client, "10.244.1.2:9376"),
            "drop",
        ),
        (
            "a pod to the internet",
            From::Pod(1),
            key(PROTO_UDP, "10.244.1.10:5001", "8.8.8.8:53"),
            "routed",
        ),
    ];
    let mut disagreements = Vec::new();
    for (what, from, flow, expected) in &flows {
        let packets = forwarded(*from, flow, &config, &snapshot);
        let trace = traced(flow, &routing, &snapshot);
        assert_eq!(packets.verdict, *expected, "{what} ({flow}): {packets:?}");
        eprintln!("{what}: {flow}: {packets:?}");
        if packets != trace {
            disagreements.push(format!(
                "{what} ({flow}):\n  packets {packets:?}\n  trace   {trace:?}"
            ));
        }
    }
    assert!(
        disagreements.is_empty(),
        "trace disagrees with the pipeline:\n{}",
        disagreements.join("\n")
    );
    eprintln!("trace agrees with the pipeline on {} flows", flows.len());
}
