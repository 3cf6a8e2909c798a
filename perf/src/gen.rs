//! Inputs generated on the fly: pcap captures of 64-byte frames (60 bytes + FCS on the
//! wire) and, for the many-services scenario, a manifests directory.

use std::fmt::Write as _;
use std::io::{BufWriter, Write};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use dataplane::wire::build::FrameBuilder;
use dataplane::wire::{MacAddr, TcpFlags};
use pcap_file::pcap::{PcapPacket, PcapWriter};

/// MAC DPDK's net_pcap gives its (only) port: `02:70:63:61:70:00` ("pcap").
pub const PCAP_PORT_MAC: MacAddr = MacAddr([0x02, 0x70, 0x63, 0x61, 0x70, 0x00]);
/// The uplink router of configs/bench.yaml (neighbor 192.168.100.2).
pub const ROUTER_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0x01, 0x02]);
/// Node-1's VTEP MAC (neighbor 10.0.0.11 in configs/bench.yaml).
pub const NODE1_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x11]);

/// What every frame of a capture is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Traffic {
    /// ACKs of established TCP flows from uplink clients to the ClusterIP 10.96.0.10:80.
    ClusterIpAck,
    /// ACKs to the NodePort 192.168.100.1:30080.
    NodePortAck,
    /// SYNs, each of a distinct flow, to the ClusterIP.
    Syn,
    /// A spoofed SYN flood (hping3 `--flood -S --rand-source`): SYNs from scattered
    /// sources of 100.64.0.0/10 and random ports to the NodePort 192.168.100.1:30080,
    /// masqueraded, never answered.
    SynFlood,
    /// UDP datagrams to 10.96.0.20:53.
    Udp,
    /// `ClusterIpAck` from pods of node-1, VXLAN-encapsulated by its VTEP 10.0.0.11.
    VxlanAck,
    /// ACKs spread over the 1,000 generated Services (10.97.x.y:80).
    ManyServices,
}

/// Client `i` of `n` flows: distinct (address, port) pairs, 60,000 ports per address.
fn client(base: Ipv4Addr, i: usize) -> SocketAddrV4 {
    let addr = u32::from(base) + (i / 60_000) as u32;
    SocketAddrV4::new(Ipv4Addr::from(addr), 1024 + (i % 60_000) as u16)
}

/// The worker owning flow `i` of uplink traffic to a service address: a mirror of the
/// pipeline's `hash_ip_port(src, sport, workers)` (dataplane/src/pipeline/mod.rs), so a
/// capture per rx queue can hold exactly the flows of that queue's worker (ideal steering,
/// no hand-offs).
pub fn owner(i: usize, workers: usize) -> usize {
    let c = client(Ipv4Addr::new(192, 168, 100, 10), i);
    let k = (u64::from(u32::from(*c.ip())) << 16) | u64::from(c.port());
    (dataplane::maglev::fmix64(k ^ 0x6f77_6e65_7273_6869) % workers as u64) as usize
}

/// Address of generated Service `i` (of [`write_many_services`]).
pub fn many_service_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 97, 0, 1)) + i as u32)
}

/// The frame of flow `i`.
pub fn frame(traffic: Traffic, i: usize) -> Vec<u8> {
    let uplink = FrameBuilder::new(ROUTER_MAC, PCAP_PORT_MAC).pad(true);
    let external = Ipv4Addr::new(192, 168, 100, 10);
    let cluster_ip = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 80);
    let mut established = uplink.clone();
    established.tcp_seq = 0x1000_0000 ^ i as u32;
    established.tcp_ack = 0x2000_0000 ^ i as u32;
    match traffic {
        Traffic::ClusterIpAck => {
            established.tcp_v4(client(external, i), cluster_ip, TcpFlags::ACK, b"")
        }
        Traffic::NodePortAck => established.tcp_v4(
            client(external, i),
            SocketAddrV4::new(Ipv4Addr::new(192, 168, 100, 1), 30080),
            TcpFlags::ACK,
            b"",
        ),
        Traffic::Syn => uplink.tcp_v4(client(external, i), cluster_ip, TcpFlags::SYN, b""),
        Traffic::SynFlood => {
            let r = dataplane::maglev::fmix64(i as u64 ^ 0x5f10_0d5e_ed00_0001);
            let source = u32::from(Ipv4Addr::new(100, 64, 0, 0)) | (r as u32 & 0x003f_ffff);
            uplink.tcp_v4(
                SocketAddrV4::new(Ipv4Addr::from(source), 1024 + ((r >> 32) as u16 % 64_000)),
                SocketAddrV4::new(Ipv4Addr::new(192, 168, 100, 1), 30080),
                TcpFlags::SYN,
                b"",
            )
        }
        Traffic::Udp => uplink.udp_v4(
            client(external, i),
            SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 20), 53),
            &[0u8; 18],
        ),
        Traffic::VxlanAck => {
            // Pods 10.244.1.100.. of node-1 (clear of the backends .2 and .3).
            let pod_mac = MacAddr([0x0a, 0x58, 0x0a, 0xf4, 0x01, 0x64]);
            let mut inner = FrameBuilder::new(pod_mac, PCAP_PORT_MAC);
            inner.tcp_seq = established.tcp_seq;
            inner.tcp_ack = established.tcp_ack;
            let src = client(Ipv4Addr::new(10, 244, 1, 100), i);
            let inner = inner.tcp_v4(src, cluster_ip, TcpFlags::ACK, b"");
            FrameBuilder::new(NODE1_MAC, PCAP_PORT_MAC).vxlan_encap(
                Ipv4Addr::new(10, 0, 0, 11),
                Ipv4Addr::new(10, 0, 0, 1),
                49152 + (i % 16384) as u16,
                1,
                &inner,
            )
        }
        Traffic::ManyServices => established.tcp_v4(
            client(external, i),
            SocketAddrV4::new(many_service_ip(i % 1000), 80),
            TcpFlags::ACK,
            b"",
        ),
    }
}

/// Writes a classic pcap (linktype Ethernet) with flows `flows` of `traffic`.
pub fn write_pcap(
    path: &Path,
    traffic: Traffic,
    flows: impl Iterator<Item = usize>,
) -> anyhow::Result<u64> {
    let file = std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
    let mut out = PcapWriter::new(BufWriter::with_capacity(1 << 20, file))?;
    let mut frames = 0u64;
    for i in flows {
        let f = frame(traffic, i);
        // Timestamps are irrelevant to replay: one second per frame keeps them distinct.
        out.write_packet(&PcapPacket::new(
            Duration::from_secs(frames),
            f.len() as u32,
            &f,
        ))?;
        frames += 1;
    }
    out.into_writer().flush()?;
    Ok(frames)
}

/// 1,000 ClusterIP Services (10.97.0.1.. port 80 → 9376) of 8 ready endpoints each, spread
/// over the pod CIDRs of node-1 and node-2.
pub fn write_many_services(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut services = String::new();
    let mut slices = String::new();
    for i in 0..1000usize {
        let ip = many_service_ip(i);
        let _ = write!(
            services,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: bench}}\n\
             spec:\n  type: ClusterIP\n  clusterIP: {ip}\n  clusterIPs: [{ip}]\n  \
             ports: [{{name: http, protocol: TCP, port: 80, targetPort: 9376}}]\n"
        );
        let _ = write!(
            slices,
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata:\n  name: svc-{i}-x\n  namespace: bench\n  \
             labels: {{kubernetes.io/service-name: svc-{i}}}\naddressType: IPv4\n\
             ports: [{{name: http, protocol: TCP, port: 9376}}]\nendpoints:\n"
        );
        for j in 0..8usize {
            let k = i * 8 + j;
            let node = 1 + k % 2;
            let host = 10 + (k / 2) % 240;
            let _ = writeln!(
                slices,
                "  - {{addresses: [\"10.244.{node}.{host}\"], conditions: {{ready: true, serving: true, terminating: false}}, nodeName: node-{node}}}"
            );
        }
    }
    std::fs::write(dir.join("services.yaml"), services)?;
    std::fs::write(dir.join("endpointslices.yaml"), slices)?;
    Ok(())
}
