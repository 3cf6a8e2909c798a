//! Issue 3, must-show 2: one capture mixing every packet-path case goes through the real
//! `servicegate replay` (gateway mode, real DPDK net_pcap ports) and the output captures
//! equal the expected ones, compared field by field; every output checksum is valid; every
//! dropped frame is counted under its named reason.
//!
//! One capture means one in-port: everything enters on the uplink, whose config lets it
//! route to the cluster's prefixes (`edge.routable_prefixes`, the edge policy's opening).
//! Nodes are on the cluster side: VXLAN from the uplink, with a node's source address, is
//! dropped as spoofed (decapsulation on a cluster port is the pipeline tests' and the
//! lab's).
//!
//! Expected frames are built from scratch with the frame builder (full checksums, not the
//! pipeline's incremental ones), from what the docs of `dataplane::pipeline` promise.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;

use dataplane::wire::build::FrameBuilder;
use dataplane::wire::{
    arp, ethernet, icmp, ipv4, ArpPacket, EthernetFrame, IcmpPacket, Ipv4Packet, MacAddr, TcpFlags,
    TcpPacket, UdpPacket, VxlanPacket,
};
use tests::harness::{
    read_pcap, replay, replay_drops, require_root, unique_name, write_pcap, TempDir,
};

const GW_UPLINK_MAC: MacAddr = MacAddr([0x02, 0x53, 0x47, 0x00, 0x00, 0x01]);
const GW_CLUSTER_MAC: MacAddr = MacAddr([0x02, 0x53, 0x47, 0x00, 0x00, 0x02]);
const CLIENT_MAC: MacAddr = MacAddr([0x02, 0x00, 0x00, 0x00, 0x10, 0x10]);
/// Learned from an ARP reply in the capture; not configured anywhere.
const PEER_MAC: MacAddr = MacAddr([0x02, 0x00, 0x00, 0x00, 0x10, 0x20]);
const HOST_MAC: MacAddr = MacAddr([0x02, 0x00, 0x00, 0x00, 0x00, 0x50]);
const ROUTER_MAC: MacAddr = MacAddr([0x02, 0x00, 0x00, 0x00, 0x02, 0x54]);
/// Underlay MACs of the two nodes (static neighbors of the cluster port).
const NODE1_MAC: MacAddr = MacAddr([0x02, 0x00, 0x00, 0x00, 0x00, 0x11]);
const NODE2_MAC: MacAddr = MacAddr([0x02, 0x00, 0x00, 0x00, 0x00, 0x12]);
/// Node-1's VXLAN device MAC, from the config (`vtep_mac`).
const VTEP1_MAC: MacAddr = MacAddr([0x02, 0x53, 0x47, 0x00, 0x01, 0x01]);
/// Node-2's VXLAN device MAC: not configured, learned from its decapsulated frames.
const VTEP2_MAC: MacAddr = MacAddr([0x02, 0x53, 0x47, 0x00, 0x01, 0x02]);
const OTHER_MAC: MacAddr = MacAddr([0x02, 0x00, 0x00, 0x00, 0x99, 0x99]);

const GW_UPLINK: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 1);
const GW_CLUSTER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 10);
const PEER: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 20);
const VIP: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 50);
const HOST: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 50);
const ROUTER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 254);
const NODE1: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 11);
const NODE2: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 12);
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);
const POD2: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 7);
const VNI: u32 = 42;
const VXLAN_PORT: u16 = 4789;

fn sock(addr: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(addr, port)
}

/// `overlap_bursts_from`: the conntrack size from which the worker holds each burst until
/// the next one has been received (0: every burst, so that this path is what is tested).
/// `workers`: the CPUs of the workers, as YAML (`[1]`).
fn write_config(dir: &Path, overlap_bursts_from: usize, workers: &str) -> std::path::PathBuf {
    let manifests = dir.join("manifests");
    std::fs::create_dir_all(&manifests).expect("manifests dir");
    std::fs::write(
        manifests.join("services.yaml"),
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: t}}\n\
             spec:\n  type: ClusterIP\n  clusterIP: {CLUSTER_IP}\n  clusterIPs: [{CLUSTER_IP}]\n  \
             ports: [{{name: http, protocol: TCP, port: 80, targetPort: 8080}}]\n\
             ---\napiVersion: v1\nkind: Service\nmetadata: {{name: web-lb, namespace: t}}\n\
             spec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.12\n  clusterIPs: [10.96.0.12]\n  \
             ports: [{{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30081}}]\n\
             status:\n  loadBalancer:\n    ingress: [{{ip: {VIP}}}]\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: web-1, namespace: t, labels: {{kubernetes.io/service-name: web}}}}\n\
             addressType: IPv4\nports: [{{name: http, protocol: TCP, port: 8080}}]\n\
             endpoints: [{{addresses: [\"{BACKEND}\"], conditions: {{ready: true}}, nodeName: node-1}}]\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: web-lb-1, namespace: t, labels: {{kubernetes.io/service-name: web-lb}}}}\n\
             addressType: IPv4\nports: [{{name: http, protocol: TCP, port: 8080}}]\n\
             endpoints: [{{addresses: [\"{BACKEND}\"], conditions: {{ready: true}}, nodeName: node-1}}]\n"
        ),
    )
    .expect("write manifests");
    // Device strings are replaced by net_pcap ports under replay; their `mac=` devargs are
    // kept, so the gateway's MACs are known here.
    let config = format!(
        "eal:\n  file_prefix: {prefix}\n  no_pci: true\n\
         cores:\n  control: 0\n  workers: {workers}\n\
         ports:\n\
         \x20 - name: uplink\n    device: \"net_tap0,iface=sgr-up,mac={GW_UPLINK_MAC}\"\n    role: uplink\n    \
         addresses: [{GW_UPLINK}/24]\n    exception: \"net_tap2,iface=sgr-up-k\"\n\
         \x20 - name: cluster\n    device: \"net_tap1,iface=sgr-cl,mac={GW_CLUSTER_MAC}\"\n    role: cluster\n    \
         addresses: [{GW_CLUSTER}/24]\n\
         routes:\n  - {{prefix: 172.16.0.0/16, via: {ROUTER}, port: cluster}}\n\
         neighbors:\n\
         \x20 - {{address: {HOST}, mac: \"{HOST_MAC}\", port: cluster}}\n\
         \x20 - {{address: {ROUTER}, mac: \"{ROUTER_MAC}\", port: cluster}}\n\
         \x20 - {{address: {NODE1}, mac: \"{NODE1_MAC}\", port: cluster}}\n\
         \x20 - {{address: {NODE2}, mac: \"{NODE2_MAC}\", port: cluster}}\n\
         vxlan:\n  udp_port: {VXLAN_PORT}\n  vni: {VNI}\n  local_vtep: {GW_CLUSTER}\n  pod_cidrs:\n\
         \x20   - {{cidr: 10.244.1.0/24, vtep: {NODE1}, node: node-1, vtep_mac: \"{VTEP1_MAC}\"}}\n\
         \x20   - {{cidr: 10.244.2.0/24, vtep: {NODE2}, node: node-2}}\n\
         services:\n  source: files\n  path: {manifests}\n  service_cidr: 10.96.0.0/12\n  \
         masquerade_cluster_ip: false\n\
         conntrack:\n  overlap_bursts_from: {overlap_bursts_from}\n\
         edge:\n  routable_prefixes: [10.0.0.0/8, 172.16.0.0/16]\n",
        prefix = unique_name("sgrm"),
        manifests = manifests.display(),
    );
    let path = dir.join("gateway.yaml");
    std::fs::write(&path, config).expect("write config");
    path
}

/// Output ports, in the order their captures are compared.
const PORTS: [&str; 3] = ["uplink", "cluster", "uplink-exception"];

/// One input frame and what must come of it.
struct Case {
    what: &'static str,
    input: Vec<u8>,
    /// (output port, frame) in the order the gateway must send them.
    outputs: Vec<(&'static str, Vec<u8>)>,
    /// The named counter it is dropped under (or counted under while answered).
    counted: Option<&'static str>,
}

/// `frame` routed one hop: new MACs, TTL - 1, header checksum recomputed from scratch,
/// Ethernet padding gone.
fn routed(frame: &[u8], src_mac: MacAddr, dst_mac: MacAddr) -> Vec<u8> {
    let total = {
        let ip = Ipv4Packet::new_checked(&frame[ethernet::HEADER_LEN..]).expect("ipv4");
        usize::from(ip.total_len())
    };
    let mut out = frame[..ethernet::HEADER_LEN + total].to_vec();
    {
        let mut e = EthernetFrame::new_unchecked(&mut out[..]);
        e.set_src_addr(src_mac);
        e.set_dst_addr(dst_mac);
    }
    let mut ip = Ipv4Packet::new_unchecked(&mut out[ethernet::HEADER_LEN..]);
    let ttl = ip.ttl();
    ip.set_ttl(ttl - 1);
    ip.fill_checksum();
    out
}

/// The IPv4 packet of an Ethernet frame (no padding).
fn ip_of(frame: &[u8]) -> &[u8] {
    let ip = Ipv4Packet::new_checked(&frame[ethernet::HEADER_LEN..]).expect("ipv4");
    &frame[ethernet::HEADER_LEN..ethernet::HEADER_LEN + usize::from(ip.total_len())]
}

/// `frame` (Ethernet + IPv4 without options) as two fragments, the first carrying `split`
/// payload bytes (a multiple of 8).
fn fragment_pair(frame: &[u8], split: usize) -> (Vec<u8>, Vec<u8>) {
    let l3 = ethernet::HEADER_LEN;
    let header = &frame[..l3 + ipv4::HEADER_LEN];
    let data = &frame[l3 + ipv4::HEADER_LEN..];
    let piece = |from: usize, to: usize, more: bool| {
        let mut f = header.to_vec();
        f.extend_from_slice(&data[from..to]);
        let mut ip = Ipv4Packet::new_unchecked(&mut f[l3..]);
        ip.set_total_len((ipv4::HEADER_LEN + to - from) as u16);
        ip.set_more_frags(more);
        ip.set_frag_offset(from as u16);
        ip.fill_checksum();
        f
    };
    (piece(0, split, true), piece(split, data.len(), false))
}

/// The outer UDP source port the gateway must choose for an inner flow: RFC 7348's entropy
/// from the inner flow's hash, in the dynamic range (see `rewrite::Encap`). The flow is
/// the one the gateway received (before any NAT), hashed as its conntrack key.
fn entropy_port(protocol: u8, src: SocketAddrV4, dst: SocketAddrV4) -> u16 {
    let hash = dataplane::conntrack::FlowKey::hash_of(
        protocol,
        *src.ip(),
        src.port(),
        *dst.ip(),
        dst.port(),
    );
    49152 + (hash % 16384) as u16
}

fn cases() -> Vec<Case> {
    let client = FrameBuilder::new(CLIENT_MAC, GW_UPLINK_MAC);
    let to_cluster = |frame: &[u8], mac: MacAddr| routed(frame, GW_CLUSTER_MAC, mac);
    let mut cases = Vec::new();

    // --- ARP ---------------------------------------------------------------------------
    let who_has_gw = dataplane::wire::build::arp_request(CLIENT_MAC, CLIENT, GW_UPLINK);
    cases.push(Case {
        what: "ARP request for the uplink's own address",
        outputs: vec![(
            "uplink",
            FrameBuilder::new(GW_UPLINK_MAC, CLIENT_MAC).arp(
                arp::OP_REPLY,
                (GW_UPLINK_MAC, GW_UPLINK),
                (CLIENT_MAC, CLIENT),
            ),
        )],
        input: who_has_gw,
        counted: None,
    });
    cases.push(Case {
        what: "ARP request for a LoadBalancer VIP",
        input: dataplane::wire::build::arp_request(CLIENT_MAC, CLIENT, VIP),
        outputs: vec![(
            "uplink",
            FrameBuilder::new(GW_UPLINK_MAC, CLIENT_MAC).arp(
                arp::OP_REPLY,
                (GW_UPLINK_MAC, VIP),
                (CLIENT_MAC, CLIENT),
            ),
        )],
        counted: None,
    });
    cases.push(Case {
        what: "ARP request on the uplink for the cluster port's address",
        input: dataplane::wire::build::arp_request(CLIENT_MAC, CLIENT, GW_CLUSTER),
        outputs: vec![],
        counted: Some("arp_ignored"),
    });
    let peer_reply = dataplane::wire::build::arp_reply(PEER_MAC, PEER, GW_UPLINK_MAC, GW_UPLINK);
    cases.push(Case {
        what: "ARP reply (learned; the kernel behind the exception port gets it too)",
        outputs: vec![("uplink-exception", peer_reply.clone())],
        input: peer_reply,
        counted: None,
    });

    // --- Routing -----------------------------------------------------------------------
    let udp = client.udp_v4(sock(CLIENT, 5000), sock(HOST, 53), b"routed datagram");
    cases.push(Case {
        what: "routed UDP to a connected host (static neighbor)",
        outputs: vec![("cluster", to_cluster(&udp, HOST_MAC))],
        input: udp,
        counted: None,
    });
    let padded = client
        .clone()
        .pad(true)
        .udp_v4(sock(CLIENT, 5001), sock(HOST, 53), b"x");
    assert_eq!(padded.len(), 60);
    cases.push(Case {
        what: "routed UDP in a padded minimum-size frame (padding trimmed)",
        outputs: vec![("cluster", to_cluster(&padded, HOST_MAC))],
        input: padded,
        counted: None,
    });
    let tcp = client.tcp_v4(
        sock(CLIENT, 41000),
        sock(Ipv4Addr::new(172, 16, 5, 5), 443),
        TcpFlags::SYN,
        b"",
    );
    cases.push(Case {
        what: "routed TCP through a static route's next hop",
        outputs: vec![("cluster", to_cluster(&tcp, ROUTER_MAC))],
        input: tcp,
        counted: None,
    });
    let expiring =
        client
            .clone()
            .ttl(1)
            .udp_v4(sock(CLIENT, 33434), sock(HOST, 33434), b"traceroute");
    cases.push(Case {
        what: "TTL 1: ICMP time-exceeded from the gateway, quoting the packet as received",
        outputs: vec![(
            "uplink",
            FrameBuilder::new(GW_UPLINK_MAC, CLIENT_MAC).icmp_error_v4(
                GW_UPLINK,
                CLIENT,
                (icmp::TYPE_TIME_EXCEEDED, icmp::CODE_TTL_EXCEEDED),
                0,
                ip_of(&expiring),
            ),
        )],
        input: expiring,
        counted: Some("ttl_exceeded"),
    });
    let with_options = client
        .clone()
        .ip_options(&[1, 1, 1, 0]) // NOP NOP NOP EOL
        .udp_v4(sock(CLIENT, 5002), sock(HOST, 53), b"options");
    cases.push(Case {
        what: "IPv4 with options: forwarded with the options untouched",
        outputs: vec![("cluster", to_cluster(&with_options, HOST_MAC))],
        input: with_options,
        counted: None,
    });
    // A datagram to a routed host in two fragments: reassembled (as nf_conntrack does), and
    // forwarded whole since it fits the egress MTU. Fragments and the whole datagram are
    // the subject of fragments.rs.
    let whole =
        client
            .clone()
            .ident(0x0101)
            .udp_v4(sock(CLIENT, 5007), sock(HOST, 53), &[0x11; 40]);
    let (first, later) = fragment_pair(&whole, 24);
    cases.push(Case {
        what: "first fragment of a routed datagram: held for reassembly",
        outputs: vec![],
        input: first,
        counted: None,
    });
    cases.push(Case {
        what: "last fragment of a routed datagram: the whole datagram is routed",
        outputs: vec![("cluster", to_cluster(&whole, HOST_MAC))],
        input: later,
        counted: None,
    });
    cases.push(Case {
        what: "unicast frame for another MAC",
        input: FrameBuilder::new(CLIENT_MAC, OTHER_MAC).udp_v4(
            sock(CLIENT, 5003),
            sock(HOST, 53),
            b"not mine",
        ),
        outputs: vec![],
        counted: Some("not_for_us"),
    });

    // --- The gateway's own traffic -----------------------------------------------------
    let ssh = client.tcp_v4(sock(CLIENT, 42000), sock(GW_UPLINK, 22), TcpFlags::SYN, b"");
    cases.push(Case {
        what: "TCP to the gateway's own address: to the exception port unchanged",
        outputs: vec![("uplink-exception", ssh.clone())],
        input: ssh,
        counted: None,
    });
    cases.push(Case {
        what: "ping to the LoadBalancer VIP: answered by the gateway",
        input: client.icmp_echo_v4(CLIENT, VIP, true, 0x4242, 1, b"ping the vip"),
        outputs: vec![(
            "uplink",
            FrameBuilder::new(GW_UPLINK_MAC, CLIENT_MAC).icmp_echo_v4(
                VIP,
                CLIENT,
                false,
                0x4242,
                1,
                b"ping the vip",
            ),
        )],
        counted: None,
    });

    // --- VXLAN out, before node-2's VTEP MAC is known ------------------------------------
    let node1 = FrameBuilder::new(GW_CLUSTER_MAC, NODE1_MAC);
    let node2 = FrameBuilder::new(GW_CLUSTER_MAC, NODE2_MAC);
    let (src, dst) = (sock(CLIENT, 41001), sock(Ipv4Addr::new(10, 244, 1, 9), 80));
    let to_pod = client.tcp_v4(src, dst, TcpFlags::SYN, b"");
    cases.push(Case {
        what: "plain frame to a remote pod CIDR: VXLAN to node-1 (configured VTEP MAC)",
        outputs: vec![(
            "cluster",
            node1.vxlan_encap(
                GW_CLUSTER,
                NODE1,
                entropy_port(ipv4::PROTO_TCP, src, dst),
                VNI,
                &routed(&to_pod, GW_CLUSTER_MAC, VTEP1_MAC),
            ),
        )],
        input: to_pod,
        counted: None,
    });
    let (src2, dst2) = (sock(CLIENT, 41002), sock(Ipv4Addr::new(10, 244, 1, 9), 80));
    let second_flow = client.tcp_v4(src2, dst2, TcpFlags::SYN, b"");
    cases.push(Case {
        what: "another flow to the same pod: same VTEP, its own entropy port",
        outputs: vec![(
            "cluster",
            node1.vxlan_encap(
                GW_CLUSTER,
                NODE1,
                entropy_port(ipv4::PROTO_TCP, src2, dst2),
                VNI,
                &routed(&second_flow, GW_CLUSTER_MAC, VTEP1_MAC),
            ),
        )],
        input: second_flow,
        counted: None,
    });
    let (src3, dst3) = (sock(CLIENT, 5004), sock(Ipv4Addr::new(10, 244, 2, 9), 53));
    let to_node2_early = client.udp_v4(src3, dst3, b"early");
    cases.push(Case {
        what: "frame to node-2's pod CIDR before its VTEP MAC is known: inner broadcast",
        outputs: vec![(
            "cluster",
            node2.vxlan_encap(
                GW_CLUSTER,
                NODE2,
                entropy_port(ipv4::PROTO_UDP, src3, dst3),
                VNI,
                &routed(&to_node2_early, GW_CLUSTER_MAC, MacAddr::BROADCAST),
            ),
        )],
        input: to_node2_early,
        counted: None,
    });

    // --- VXLAN in ----------------------------------------------------------------------
    let underlay = FrameBuilder::new(NODE2_MAC, GW_UPLINK_MAC);
    let pod2 = FrameBuilder::new(VTEP2_MAC, GW_CLUSTER_MAC);
    let to_peer = pod2.udp_v4(sock(POD2, 6000), sock(PEER, 7000), b"from a pod");
    cases.push(Case {
        what: "VXLAN from a node's address on the uplink: spoofed source",
        input: underlay.vxlan_encap(NODE2, GW_CLUSTER, 50000, VNI, &to_peer),
        outputs: vec![],
        counted: Some("spoofed_source"),
    });
    let (pod_src, vip_dst) = (sock(POD2, 40000), sock(CLUSTER_IP, 80));
    let syn = pod2.tcp_v4(pod_src, vip_dst, TcpFlags::SYN, b"");
    cases.push(Case {
        what: "VXLAN from a node's address on the uplink to a ClusterIP: spoofed source",
        input: underlay.vxlan_encap(NODE2, GW_CLUSTER, 50001, VNI, &syn),
        outputs: vec![],
        counted: Some("spoofed_source"),
    });
    let pod_on_uplink = client.tcp_v4(pod_src, vip_dst, TcpFlags::SYN, b"");
    cases.push(Case {
        what: "a pod's address as the source on the uplink: spoofed source",
        input: pod_on_uplink,
        outputs: vec![],
        counted: Some("spoofed_source"),
    });
    let (src4, dst4) = (sock(CLIENT, 5005), sock(Ipv4Addr::new(10, 244, 2, 9), 53));
    let to_node2_late = client.udp_v4(src4, dst4, b"late");
    cases.push(Case {
        what: "frame to node-2's pod CIDR after spoofed VXLAN: still the inner broadcast",
        outputs: vec![(
            "cluster",
            node2.vxlan_encap(
                GW_CLUSTER,
                NODE2,
                entropy_port(ipv4::PROTO_UDP, src4, dst4),
                VNI,
                &routed(&to_node2_late, GW_CLUSTER_MAC, MacAddr::BROADCAST),
            ),
        )],
        input: to_node2_late,
        counted: None,
    });
    cases.push(Case {
        what: "VXLAN with an unknown VNI from a node's address on the uplink",
        input: underlay.vxlan_encap(NODE2, GW_CLUSTER, 50002, VNI + 1, &to_peer),
        outputs: vec![],
        counted: Some("spoofed_source"),
    });
    let mut no_i_flag = underlay.vxlan_encap(NODE2, GW_CLUSTER, 50003, VNI, &to_peer);
    {
        let vxlan_at = ethernet::HEADER_LEN + ipv4::HEADER_LEN + 8;
        let mut v = VxlanPacket::new_unchecked(&mut no_i_flag[vxlan_at..]);
        v.set_flags(0);
    }
    cases.push(Case {
        what: "VXLAN without the I flag from a node's address on the uplink",
        input: no_i_flag,
        outputs: vec![],
        counted: Some("spoofed_source"),
    });
    cases.push(Case {
        what: "VXLAN header truncated (4 of 8 bytes) from a node's address on the uplink",
        input: underlay.udp_v4(
            sock(NODE2, 50004),
            sock(GW_CLUSTER, VXLAN_PORT),
            &[0x08, 0, 0, 0],
        ),
        outputs: vec![],
        counted: Some("spoofed_source"),
    });
    let mut cut = client.udp_v4(sock(CLIENT, 5006), sock(HOST, 53), b"cut short in transit");
    cut.truncate(cut.len() - 8);
    cases.push(Case {
        what: "IPv4 total length beyond the frame",
        input: cut,
        outputs: vec![],
        counted: Some("malformed"),
    });
    cases.push(Case {
        what: "TCP header truncated (10 bytes)",
        input: client.ipv4(CLIENT, HOST, ipv4::PROTO_TCP, &[0u8; 10]),
        outputs: vec![],
        counted: Some("malformed"),
    });
    cases
}

/// Every field of a frame as (name, value), down through ARP, IPv4 (and a quoted packet),
/// TCP/UDP/ICMP and VXLAN into the inner frame; the rest as hex.
fn dissect(frame: &[u8]) -> Vec<(String, String)> {
    let mut fields = Vec::new();
    dissect_ethernet(frame, "", &mut fields);
    fields
}

fn push(fields: &mut Vec<(String, String)>, prefix: &str, name: &str, value: impl ToString) {
    fields.push((format!("{prefix}{name}"), value.to_string()));
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn dissect_ethernet(frame: &[u8], prefix: &str, f: &mut Vec<(String, String)>) {
    push(f, prefix, "frame length", frame.len());
    let Ok(e) = EthernetFrame::new_checked(frame) else {
        push(f, prefix, "bytes", hex(frame));
        return;
    };
    push(f, prefix, "eth.dst", e.dst_addr());
    push(f, prefix, "eth.src", e.src_addr());
    push(f, prefix, "eth.vlan", format!("{:?}", e.vlan_id()));
    push(f, prefix, "eth.type", format!("{:#06x}", e.ethertype()));
    match e.ethertype() {
        ethernet::ETHERTYPE_ARP => match ArpPacket::new_checked(e.payload()) {
            Ok(a) => {
                push(f, prefix, "arp.op", a.operation());
                push(f, prefix, "arp.sender_mac", a.sender_hw());
                push(f, prefix, "arp.sender_ip", a.sender_ip());
                push(f, prefix, "arp.target_mac", a.target_hw());
                push(f, prefix, "arp.target_ip", a.target_ip());
                push(
                    f,
                    prefix,
                    "arp.trailer",
                    hex(&e.payload()[arp::HEADER_LEN..]),
                );
            }
            Err(_) => push(f, prefix, "arp.bytes", hex(e.payload())),
        },
        ethernet::ETHERTYPE_IPV4 => dissect_ipv4(e.payload(), &format!("{prefix}ip."), f),
        _ => push(f, prefix, "payload", hex(e.payload())),
    }
}

fn dissect_ipv4(bytes: &[u8], prefix: &str, f: &mut Vec<(String, String)>) {
    let Ok(ip) = Ipv4Packet::new_checked(bytes) else {
        push(f, prefix, "bytes", hex(bytes));
        return;
    };
    push(f, prefix, "version", ip.version());
    push(f, prefix, "header_len", ip.header_len());
    push(f, prefix, "dscp_ecn", ip.dscp_ecn());
    push(f, prefix, "total_len", ip.total_len());
    push(f, prefix, "ident", format!("{:#06x}", ip.ident()));
    push(f, prefix, "df", ip.dont_frag());
    push(f, prefix, "mf", ip.more_frags());
    push(f, prefix, "frag_offset", ip.frag_offset());
    push(f, prefix, "ttl", ip.ttl());
    push(f, prefix, "protocol", ip.protocol());
    push(f, prefix, "checksum", format!("{:#06x}", ip.checksum()));
    push(f, prefix, "src", ip.src());
    push(f, prefix, "dst", ip.dst());
    push(f, prefix, "options", hex(ip.options()));
    push(
        f,
        prefix,
        "trailer after total_len",
        hex(&bytes[usize::from(ip.total_len())..]),
    );
    if ip.frag_offset() != 0 {
        push(f, prefix, "fragment data", hex(ip.payload()));
        return;
    }
    let l4 = ip.payload();
    match ip.protocol() {
        ipv4::PROTO_UDP => match UdpPacket::new_checked(l4) {
            Ok(u) => {
                let p = format!("{prefix}udp.");
                push(f, &p, "src_port", u.src_port());
                push(f, &p, "dst_port", u.dst_port());
                push(f, &p, "len", u.len());
                push(f, &p, "checksum", format!("{:#06x}", u.checksum()));
                match VxlanPacket::new_checked(u.payload()) {
                    Ok(v) if u.dst_port() == VXLAN_PORT => {
                        push(f, &p, "vxlan.flags", format!("{:#04x}", v.flags()));
                        push(f, &p, "vxlan.vni", v.vni());
                        dissect_ethernet(v.payload(), &format!("{p}vxlan.inner."), f);
                    }
                    _ => push(f, &p, "payload", hex(u.payload())),
                }
            }
            Err(_) => push(f, prefix, "l4 bytes", hex(l4)),
        },
        ipv4::PROTO_TCP => match TcpPacket::new_checked(l4) {
            Ok(t) => {
                let p = format!("{prefix}tcp.");
                push(f, &p, "src_port", t.src_port());
                push(f, &p, "dst_port", t.dst_port());
                push(f, &p, "seq", t.seq_number());
                push(f, &p, "ack", t.ack_number());
                push(f, &p, "flags", format!("{:?}", t.flags()));
                push(f, &p, "window", t.window_len());
                push(f, &p, "checksum", format!("{:#06x}", t.checksum()));
                push(f, &p, "options", hex(t.options()));
                push(f, &p, "payload", hex(t.payload()));
            }
            Err(_) => push(f, prefix, "l4 bytes", hex(l4)),
        },
        ipv4::PROTO_ICMP => match IcmpPacket::new_checked(l4) {
            Ok(m) => {
                let p = format!("{prefix}icmp.");
                push(f, &p, "type", m.msg_type());
                push(f, &p, "code", m.msg_code());
                push(f, &p, "checksum", format!("{:#06x}", m.checksum()));
                push(f, &p, "rest of header", hex(&l4[4..icmp::HEADER_LEN]));
                if m.is_error() {
                    dissect_quoted(m.payload(), &format!("{p}quoted."), f);
                } else {
                    push(f, &p, "payload", hex(m.payload()));
                }
            }
            Err(_) => push(f, prefix, "l4 bytes", hex(l4)),
        },
        _ => push(f, prefix, "payload", hex(l4)),
    }
}

/// The IPv4 header and first 8 bytes an ICMP error quotes (the quote is shorter than the
/// packet's total length, so it is not a checkable IPv4 packet).
fn dissect_quoted(bytes: &[u8], prefix: &str, f: &mut Vec<(String, String)>) {
    if bytes.len() < ipv4::HEADER_LEN {
        push(f, prefix, "bytes", hex(bytes));
        return;
    }
    let ip = Ipv4Packet::new_unchecked(bytes);
    push(f, prefix, "header_len", ip.header_len());
    push(f, prefix, "total_len", ip.total_len());
    push(f, prefix, "ttl", ip.ttl());
    push(f, prefix, "protocol", ip.protocol());
    push(f, prefix, "checksum", format!("{:#06x}", ip.checksum()));
    push(f, prefix, "src", ip.src());
    push(f, prefix, "dst", ip.dst());
    push(
        f,
        prefix,
        "first 8 bytes of payload",
        hex(bytes.get(ip.header_len()..).unwrap_or(&[])),
    );
}

/// Every checksum of an output frame is valid: the IPv4 header (outer, inner, and the
/// header an ICMP error quotes), and TCP/UDP/ICMP of unfragmented packets (a fragment's L4
/// checksum covers bytes it does not carry). UDP checksum 0 ("none") is accepted only on
/// VXLAN's outer datagrams, where the pipeline writes it (RFC 7348).
fn checksum_problems(frame: &[u8], what: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let Ok(e) = EthernetFrame::new_checked(frame) else {
        return problems;
    };
    if e.ethertype() != ethernet::ETHERTYPE_IPV4 {
        return problems;
    }
    let Ok(ip) = Ipv4Packet::new_checked(e.payload()) else {
        problems.push(format!("{what}: IPv4 header does not parse"));
        return problems;
    };
    if !ip.verify_checksum() {
        problems.push(format!("{what}: IPv4 header checksum"));
    }
    if ip.is_fragment() {
        return problems;
    }
    let (src, dst, l4) = (ip.src(), ip.dst(), ip.payload());
    match ip.protocol() {
        ipv4::PROTO_UDP => {
            let u = UdpPacket::new_checked(l4).expect("udp parses");
            if u.checksum() == 0 {
                if u.dst_port() != VXLAN_PORT {
                    problems.push(format!("{what}: UDP without checksum outside VXLAN"));
                }
            } else if !u.verify_checksum(src, dst) {
                problems.push(format!("{what}: UDP checksum"));
            }
            if u.dst_port() == VXLAN_PORT {
                if let Ok(v) = VxlanPacket::new_checked(u.payload()) {
                    for p in checksum_problems(v.payload(), &format!("{what} (inner)")) {
                        problems.push(p);
                    }
                }
            }
        }
        ipv4::PROTO_TCP => {
            let t = TcpPacket::new_checked(l4).expect("tcp parses");
            if !t.verify_checksum(src, dst) {
                problems.push(format!("{what}: TCP checksum"));
            }
        }
        ipv4::PROTO_ICMP => {
            let m = IcmpPacket::new_checked(l4).expect("icmp parses");
            if !m.verify_checksum() {
                problems.push(format!("{what}: ICMP checksum"));
            }
            if m.is_error() {
                let quoted = m.payload();
                let ihl = Ipv4Packet::new_unchecked(quoted).header_len();
                let header = &quoted[..ihl.min(quoted.len())];
                if dataplane::wire::checksum::compute(0, header) != 0 {
                    problems.push(format!("{what}: quoted IPv4 header checksum"));
                }
            }
        }
        _ => {}
    }
    problems
}

/// Names the first differing field of frame `index` on `port` (with the case it came
/// from), or a byte difference the dissection does not show.
fn compare(port: &str, index: usize, what: &str, expected: &[u8], actual: &[u8]) {
    let (want, got) = (dissect(expected), dissect(actual));
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        assert!(
            w == g,
            "{port}.pcap frame {index} ({what}): field {} is {} but {} was expected \
             (field #{i})\nexpected: {}\nactual:   {}",
            g.0,
            g.1,
            w.1,
            hex(expected),
            hex(actual)
        );
    }
    assert_eq!(
        want.len(),
        got.len(),
        "{port}.pcap frame {index} ({what}): different structure\nexpected fields {want:?}\nactual fields {got:?}"
    );
    assert!(
        expected == actual,
        "{port}.pcap frame {index} ({what}): bytes differ where no field shows it\nexpected: {}\nactual:   {}",
        hex(expected),
        hex(actual)
    );
}

/// The value of `drop NAME: N` lines of the replay report.

#[test]
fn replay_of_a_mixed_capture_gives_the_expected_captures() {
    replay_mixed_capture(dataplane::worker::OVERLAP_BURSTS_FROM);
}

/// The same capture through a worker that holds every burst until it has received the
/// next one (what it does with a table of a million flows).
#[test]
fn replay_with_bursts_held_back_gives_the_same_captures() {
    replay_mixed_capture(0);
}

fn replay_mixed_capture(overlap_bursts_from: usize) {
    require_root();
    let dir = TempDir::new("mixed");
    let config = write_config(dir.path(), overlap_bursts_from, "[1]");
    let cases = cases();
    let input: Vec<Vec<u8>> = cases.iter().map(|c| c.input.clone()).collect();
    let input_path = dir.path().join("mixed.pcap");
    write_pcap(&input_path, &input);
    let out_dir = dir.path().join("out");
    let started = std::time::Instant::now();
    let report = replay(&config, &[("uplink", &input_path)], &out_dir);
    eprintln!(
        "replay of {} frames took {:.2?}:\n{report}",
        input.len(),
        started.elapsed()
    );

    for port in PORTS {
        let expected: Vec<(&str, &Vec<u8>)> = cases
            .iter()
            .flat_map(|c| {
                c.outputs
                    .iter()
                    .filter(|(p, _)| *p == port)
                    .map(move |(_, f)| (c.what, f))
            })
            .collect();
        let actual = read_pcap(&out_dir.join(format!("{port}.pcap")));
        let listing = |frames: &[Vec<u8>]| {
            frames
                .iter()
                .map(|f| format!("  {}", hex(f)))
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(
            actual.len(),
            expected.len(),
            "{port}.pcap: {} frames, {} expected ({:?})\nactual frames:\n{}\n{report}",
            actual.len(),
            expected.len(),
            expected.iter().map(|(w, _)| *w).collect::<Vec<_>>(),
            listing(&actual)
        );
        for (index, ((what, want), got)) in expected.iter().zip(&actual).enumerate() {
            compare(port, index, what, want, got);
            let problems = checksum_problems(got, &format!("{port}.pcap frame {index} ({what})"));
            assert!(problems.is_empty(), "invalid checksums: {problems:#?}");
        }
    }

    // The expected frames are themselves checked, so a wrong expectation cannot hide a
    // checksum the comparison would then demand.
    for case in &cases {
        for (port, frame) in &case.outputs {
            let problems = checksum_problems(frame, &format!("expected {port} ({})", case.what));
            assert!(problems.is_empty(), "{problems:#?}");
        }
    }

    // Entropy ports: in the dynamic range, and distinct for the two flows to one pod.
    let cluster = read_pcap(&out_dir.join("cluster.pcap"));
    let vxlan_sports: Vec<u16> = cluster
        .iter()
        .filter_map(|f| {
            let ip = Ipv4Packet::new_checked(&f[ethernet::HEADER_LEN..]).ok()?;
            let u = UdpPacket::new_checked(ip.payload()).ok()?;
            (u.dst_port() == VXLAN_PORT).then(|| u.src_port())
        })
        .collect();
    assert_eq!(vxlan_sports.len(), 4, "VXLAN frames on the cluster port");
    assert!(vxlan_sports.iter().all(|p| *p >= 49152), "{vxlan_sports:?}");
    assert_ne!(
        vxlan_sports[0], vxlan_sports[1],
        "two flows to one pod share an entropy port"
    );

    let mut want_drops = std::collections::BTreeMap::new();
    for case in &cases {
        if let Some(reason) = case.counted {
            *want_drops.entry(reason.to_string()).or_insert(0u64) += 1;
        }
    }
    assert_eq!(
        replay_drops(&report),
        want_drops,
        "drop counters:\n{report}"
    );
    let total: u64 = want_drops.values().sum();
    assert!(
        report.contains(&format!("drops total: {total}\n")),
        "{report}"
    );
    let sent: usize = cases.iter().map(|c| c.outputs.len()).sum();
    assert!(
        report.contains(&format!("port uplink: rx {} tx ", input.len())),
        "{report}"
    );
    let tx = |name: &str| -> usize {
        report
            .lines()
            .find_map(|l| l.strip_prefix(&format!("port {name}: ")))
            .and_then(|l| l.split("tx ").nth(1))
            .and_then(|n| n.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no tx count of {name} in:\n{report}"))
    };
    assert_eq!(PORTS.iter().map(|p| tx(p)).sum::<usize>(), sent, "{report}");
    assert!(report.contains("mbufs in use after stop: 0"), "{report}");
}

/// Replay with two workers: every worker transmits on a queue of its own, which net_pcap
/// writes to a capture of its own; replay joins them into one capture per port. The input
/// is given as two captures for one port, which replay reads one after the other.
#[test]
fn replay_with_two_workers_joins_their_captures() {
    require_root();
    let dir = TempDir::new("mixed2w");
    let config = write_config(dir.path(), dataplane::worker::OVERLAP_BURSTS_FROM, "[0, 1]");
    let client = FrameBuilder::new(CLIENT_MAC, GW_UPLINK_MAC);
    // Routed datagrams to one host: a flow's owner is the hash of its destination address
    // and port, so these spread over both workers.
    let input: Vec<Vec<u8>> = (0..64u16)
        .map(|i| client.udp_v4(sock(CLIENT, 5000), sock(HOST, 1000 + i), &i.to_be_bytes()))
        .collect();
    let expected: Vec<Vec<u8>> = input
        .iter()
        .map(|f| routed(f, GW_CLUSTER_MAC, HOST_MAC))
        .collect();
    let (first, second) = (
        dir.path().join("first.pcap"),
        dir.path().join("second.pcap"),
    );
    write_pcap(&first, &input[..40]);
    write_pcap(&second, &input[40..]);
    let out_dir = dir.path().join("out");
    let report = replay(
        &config,
        &[("uplink", &first), ("uplink", &second)],
        &out_dir,
    );
    assert!(report.contains("port uplink: rx 64 tx 0 "), "{report}");
    assert!(report.contains("port cluster: rx 0 tx 64 "), "{report}");
    assert!(report.contains("drops total: 0\n"), "{report}");
    assert!(report.contains("mbufs in use after stop: 0"), "{report}");
    let handoffs: u64 = report
        .lines()
        .find_map(|l| l.strip_prefix("workers: 2 "))
        .and_then(|l| l.split("handoffs: ").nth(1))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no handoff count for two workers in:\n{report}"));
    assert!(
        handoffs > 0 && handoffs < 64,
        "both workers should transmit: {handoffs} of 64 handed off\n{report}"
    );

    // Worker 0's frames, then worker 1's, each in the order received: every frame once,
    // in two runs of increasing input position.
    let actual = read_pcap(&out_dir.join("cluster.pcap"));
    let positions: Vec<usize> = actual
        .iter()
        .map(|got| {
            expected
                .iter()
                .position(|want| want == got)
                .unwrap_or_else(|| panic!("unexpected frame {}", hex(got)))
        })
        .collect();
    let mut sorted = positions.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..64).collect::<Vec<_>>(), "{positions:?}");
    let runs = 1 + positions.windows(2).filter(|w| w[1] < w[0]).count();
    assert_eq!(runs, 2, "one run per worker: {positions:?}");
    for port in ["uplink", "uplink-exception"] {
        assert!(
            read_pcap(&out_dir.join(format!("{port}.pcap"))).is_empty(),
            "{port}"
        );
    }
    let left: Vec<_> = std::fs::read_dir(&out_dir)
        .expect("out dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().to_string())
        .filter(|name| name.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "scratch captures left behind: {left:?}");
}
