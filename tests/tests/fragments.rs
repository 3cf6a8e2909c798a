//! Issue 23 item 4: IPv4 fragments through the real `servicegate replay` (DPDK net_pcap
//! ports, the workers' `rte_ip_frag` reassembly and fragmentation). A UDP datagram to a
//! ClusterIP arrives in fragments in order, reversed, shuffled, with a duplicate and
//! overlapping; the backend's reply comes back fragmented inside VXLAN. Every output frame
//! is compared byte for byte with one built from scratch (full checksums), and each given-up
//! fragment is counted as `fragment`.
//!
//! Ordering across ports: the uplink capture holds fewer frames than one rx burst, and the
//! worker polls the uplink before the cluster port, so the request's conntrack entry exists
//! before the reply's fragments arrive.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};

use dataplane::wire::build::FrameBuilder;
use dataplane::wire::{ethernet, ipv4, Ipv4Packet, MacAddr};
use tests::harness::{
    read_pcap, replay, replay_drops, require_root, unique_name, write_pcap, TempDir,
};

const GW_UPLINK_MAC: MacAddr = MacAddr([0x02, 0x53, 0x47, 0x00, 0x00, 0x01]);
const GW_CLUSTER_MAC: MacAddr = MacAddr([0x02, 0x53, 0x47, 0x00, 0x00, 0x02]);
const CLIENT_MAC: MacAddr = MacAddr([0x02, 0x00, 0x00, 0x00, 0x10, 0x10]);
const NODE1_MAC: MacAddr = MacAddr([0x02, 0x00, 0x00, 0x00, 0x00, 0x11]);
const VTEP1_MAC: MacAddr = MacAddr([0x02, 0x53, 0x47, 0x00, 0x01, 0x01]);

const GW_UPLINK: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 1);
const GW_CLUSTER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 10);
const NODE1: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 11);
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 53);
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);
const VNI: u32 = 42;

/// Payload bytes per fragment of a host on a 1500-byte link, and of the gateway toward a
/// pod (VXLAN leaves 1450 for the inner packet: (1450 - 20) rounded down to 8 bytes).
const UPLINK_PIECE: usize = 1480;
const POD_PIECE: usize = 1424;

fn sock(addr: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(addr, port)
}

fn write_config(dir: &Path, fragments: &str) -> PathBuf {
    let manifests = dir.join("manifests");
    std::fs::create_dir_all(&manifests).expect("manifests dir");
    std::fs::write(
        manifests.join("dns.yaml"),
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: dns, namespace: t}}\n\
             spec:\n  type: ClusterIP\n  clusterIP: {CLUSTER_IP}\n  clusterIPs: [{CLUSTER_IP}]\n  \
             ports: [{{name: dns, protocol: UDP, port: 53, targetPort: 5353}}]\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: dns-1, namespace: t, labels: {{kubernetes.io/service-name: dns}}}}\n\
             addressType: IPv4\nports: [{{name: dns, protocol: UDP, port: 5353}}]\n\
             endpoints: [{{addresses: [\"{BACKEND}\"], conditions: {{ready: true}}, nodeName: node-1}}]\n"
        ),
    )
    .expect("write manifests");
    let config = format!(
        "eal:\n  file_prefix: {prefix}\n  no_pci: true\n\
         cores:\n  control: 0\n  workers: [1]\n\
         ports:\n\
         \x20 - name: uplink\n    device: \"net_tap0,iface=sgf-up,mac={GW_UPLINK_MAC}\"\n    role: uplink\n    \
         addresses: [{GW_UPLINK}/24]\n\
         \x20 - name: cluster\n    device: \"net_tap1,iface=sgf-cl,mac={GW_CLUSTER_MAC}\"\n    role: cluster\n    \
         addresses: [{GW_CLUSTER}/24]\n\
         neighbors:\n\
         \x20 - {{address: {CLIENT}, mac: \"{CLIENT_MAC}\", port: uplink}}\n\
         \x20 - {{address: {NODE1}, mac: \"{NODE1_MAC}\", port: cluster}}\n\
         vxlan:\n  udp_port: 4789\n  vni: {VNI}\n  local_vtep: {GW_CLUSTER}\n  nodes: none\n  pod_cidrs:\n\
         \x20   - {{cidr: 10.244.1.0/24, vtep: {NODE1}, node: node-1, vtep_mac: \"{VTEP1_MAC}\"}}\n\
         services:\n  source: files\n  path: {manifests}\n  service_cidr: 10.96.0.0/12\n  \
         masquerade_cluster_ip: false\n\
         {fragments}",
        prefix = unique_name("sgfr"),
        manifests = manifests.display(),
    );
    let path = dir.join("gateway.yaml");
    std::fs::write(&path, config).expect("write config");
    path
}

/// The payload of datagram `n`: every byte tells its position, so a misplaced piece shows.
fn payload(n: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| n.wrapping_mul(31) ^ (i as u8) ^ (i >> 8) as u8)
        .collect()
}

/// `frame` (Ethernet + IPv4 without options) cut into fragments of `piece` payload bytes,
/// as a host's or the gateway's IP layer cuts it: header copied, MF on all but the last,
/// offset, length and header checksum set.
fn cut(frame: &[u8], piece: usize) -> Vec<Vec<u8>> {
    let l3 = ethernet::HEADER_LEN;
    let header = &frame[..l3 + ipv4::HEADER_LEN];
    let data = &frame[l3 + ipv4::HEADER_LEN..];
    let mut out = Vec::new();
    for (i, chunk) in data.chunks(piece).enumerate() {
        let mut f = header.to_vec();
        f.extend_from_slice(chunk);
        let mut ip = Ipv4Packet::new_unchecked(&mut f[l3..]);
        ip.set_total_len((ipv4::HEADER_LEN + chunk.len()) as u16);
        ip.set_more_frags((i + 1) * piece < data.len());
        ip.set_frag_offset((i * piece) as u16);
        ip.fill_checksum();
        out.push(f);
    }
    out
}

/// The outer UDP source port the gateway chooses for a flow (see `replay_mixed.rs`).
fn entropy_port(src: SocketAddrV4, dst: SocketAddrV4) -> u16 {
    let hash = dataplane::conntrack::FlowKey::hash_of(
        ipv4::PROTO_UDP,
        *src.ip(),
        src.port(),
        *dst.ip(),
        dst.port(),
    );
    49152 + (hash % 16384) as u16
}

/// Datagram `n` (`len` payload bytes) from the client's port `5000 + n` to the ClusterIP.
fn request(n: u8, len: usize) -> Vec<u8> {
    FrameBuilder::new(CLIENT_MAC, GW_UPLINK_MAC)
        .ident(0x1000 + u16::from(n))
        .udp_v4(
            sock(CLIENT, 5000 + u16::from(n)),
            sock(CLUSTER_IP, 53),
            &payload(n, len),
        )
}

/// What the backend's node must receive of datagram `n`: translated to the backend,
/// TTL 63, cut for the pod network, each piece in VXLAN toward node-1.
fn delivered(n: u8, len: usize) -> Vec<Vec<u8>> {
    let client = sock(CLIENT, 5000 + u16::from(n));
    let whole = FrameBuilder::new(GW_CLUSTER_MAC, VTEP1_MAC)
        .ident(0x1000 + u16::from(n))
        .ttl(63)
        .udp_v4(client, sock(BACKEND, 5353), &payload(n, len));
    let port = entropy_port(client, sock(CLUSTER_IP, 53));
    cut(&whole, POD_PIECE)
        .iter()
        .map(|inner| {
            FrameBuilder::new(GW_CLUSTER_MAC, NODE1_MAC)
                .vxlan_encap(GW_CLUSTER, NODE1, port, VNI, inner)
        })
        .collect()
}

fn counter(report: &str, name: &str) -> u64 {
    replay_drops(report).get(name).copied().unwrap_or(0)
}

fn assert_frames(port: &str, got: &[Vec<u8>], want: &[Vec<u8>], report: &str) {
    let hex = |f: &[u8]| f.iter().map(|b| format!("{b:02x}")).collect::<String>();
    assert_eq!(
        got.len(),
        want.len(),
        "{port}: {} frames, {} expected\n{report}",
        got.len(),
        want.len()
    );
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            g == w,
            "{port} frame {i} differs\n got: {}\nwant: {}",
            hex(g),
            hex(w)
        );
    }
}

#[test]
fn fragments_reach_one_backend_whole_in_any_order_and_replies_go_back_fragmented() {
    require_root();
    let dir = TempDir::new("fragments");
    let config = write_config(dir.path(), "");

    let mut uplink = Vec::new();
    let mut to_node = Vec::new();
    // In order: two fragments of a 2,000-byte datagram.
    uplink.extend(cut(&request(1, 2000), UPLINK_PIECE));
    to_node.extend(delivered(1, 2000));
    // Reversed.
    let mut reversed = cut(&request(2, 2000), UPLINK_PIECE);
    reversed.reverse();
    uplink.extend(reversed);
    to_node.extend(delivered(2, 2000));
    // Three fragments, middle first, then first, then last.
    let three = cut(&request(3, 4000), UPLINK_PIECE);
    uplink.extend([three[1].clone(), three[0].clone(), three[2].clone()]);
    to_node.extend(delivered(3, 4000));
    // The first fragment twice: the copy is dropped, the datagram goes through.
    let twice = cut(&request(4, 2000), UPLINK_PIECE);
    uplink.extend([twice[0].clone(), twice[0].clone(), twice[1].clone()]);
    to_node.extend(delivered(4, 2000));
    // Overlapping: a last fragment that starts inside the first one. Neither is delivered
    // (Linux and RFC 5722 do the same): both are counted.
    let whole = request(5, 2000);
    let first = cut(&whole, UPLINK_PIECE)[0].clone();
    let overlapping = {
        let mut f = whole[..ethernet::HEADER_LEN + ipv4::HEADER_LEN].to_vec();
        let data = &whole[ethernet::HEADER_LEN + ipv4::HEADER_LEN..];
        f.extend_from_slice(&data[1000..]);
        let mut ip = Ipv4Packet::new_unchecked(&mut f[ethernet::HEADER_LEN..]);
        ip.set_total_len((ipv4::HEADER_LEN + data.len() - 1000) as u16);
        ip.set_frag_offset(1000);
        ip.fill_checksum();
        f
    };
    uplink.extend([first, overlapping]);
    assert!(
        uplink.len() < 32,
        "the uplink capture must fit one rx burst"
    );

    // The backend answers datagram 1 with 3,000 bytes, fragmented by its node for the
    // pod network, inside VXLAN.
    let reply_payload = payload(9, 3000);
    let pod_reply = FrameBuilder::new(VTEP1_MAC, GW_CLUSTER_MAC)
        .ident(0x2001)
        .udp_v4(sock(BACKEND, 5353), sock(CLIENT, 5001), &reply_payload);
    let cluster: Vec<Vec<u8>> = cut(&pod_reply, POD_PIECE)
        .iter()
        .map(|inner| {
            FrameBuilder::new(NODE1_MAC, GW_CLUSTER_MAC)
                .vxlan_encap(NODE1, GW_CLUSTER, 50123, VNI, inner)
        })
        .collect();
    let to_client = cut(
        &FrameBuilder::new(GW_UPLINK_MAC, CLIENT_MAC)
            .ident(0x2001)
            .ttl(63)
            .udp_v4(sock(CLUSTER_IP, 53), sock(CLIENT, 5001), &reply_payload),
        UPLINK_PIECE,
    );

    let uplink_in = dir.path().join("uplink-in.pcap");
    let cluster_in = dir.path().join("cluster-in.pcap");
    write_pcap(&uplink_in, &uplink);
    write_pcap(&cluster_in, &cluster);
    let out = dir.path().join("out");
    let report = replay(
        &config,
        &[("uplink", &uplink_in), ("cluster", &cluster_in)],
        &out,
    );
    eprintln!("{report}");
    assert_frames(
        "cluster",
        &read_pcap(&out.join("cluster.pcap")),
        &to_node,
        &report,
    );
    assert_frames(
        "uplink",
        &read_pcap(&out.join("uplink.pcap")),
        &to_client,
        &report,
    );
    // One duplicate and two overlapping fragments, nothing else.
    assert_eq!(counter(&report, "fragment"), 3, "{report}");
    assert!(report.contains("drops total: 3\n"), "{report}");
    assert!(report.contains("mbufs in use after stop: 0"), "{report}");
}

#[test]
fn an_incomplete_datagram_is_given_up_after_the_timeout_and_counted() {
    require_root();
    let dir = TempDir::new("fragments-timeout");
    let config = write_config(dir.path(), "fragments:\n  timeout_ms: 10\n");
    let pieces = cut(&request(6, 3000), UPLINK_PIECE);
    // The first two of three fragments; the last never comes.
    let input = dir.path().join("in.pcap");
    write_pcap(&input, &pieces[..2]);
    let out = dir.path().join("out");
    let report = replay(&config, &[("uplink", &input)], &out);
    eprintln!("{report}");
    assert!(read_pcap(&out.join("cluster.pcap")).is_empty(), "{report}");
    assert_eq!(counter(&report, "fragment"), 2, "{report}");
    assert!(report.contains("mbufs in use after stop: 0"), "{report}");
}

#[test]
fn with_reassembly_off_a_fragment_to_a_service_is_dropped() {
    require_root();
    let dir = TempDir::new("fragments-off");
    let config = write_config(dir.path(), "fragments:\n  reassemble: false\n");
    let input = dir.path().join("in.pcap");
    write_pcap(&input, &cut(&request(7, 2000), UPLINK_PIECE));
    let out = dir.path().join("out");
    let report = replay(&config, &[("uplink", &input)], &out);
    assert!(read_pcap(&out.join("cluster.pcap")).is_empty(), "{report}");
    assert_eq!(counter(&report, "fragment"), 2, "{report}");
}
