//! The established-flow fast path: what almost every packet of a busy gateway is, done in
//! one straight pass instead of the general stages.
//!
//! It takes the common shapes only: untagged Ethernet to the port's own MAC, IPv4 without
//! options or fragmentation, TCP without SYN or UDP, directly or inside VXLAN from a node,
//! hitting a live conntrack entry bound to the current snapshot, toward a destination
//! whose route and L2 (next-hop MAC, VTEP MAC) are cached and current, within TTL and
//! MTU. Anything
//! else goes to the general path, and the fast path gives up before it changes any state
//! or byte the general path would not change the same way: it validates with the same
//! wire views and decides with the same tables, so that both paths produce the same frame,
//! verdict, counters and conntrack state (`pipeline::tests::fast_path_matches_the_general_path`
//! compares them packet by packet).

use std::net::Ipv4Addr;

use super::{rewrite, Pipeline, PortRole, Rewrite, Verdict, L4, VXLAN_OVERHEAD};
use crate::conntrack::{FlowKey, Tick};
use crate::frame::Frame;
use crate::snapshot::Snapshot;
use crate::stats::{DropReason, WorkerStats};
use crate::wire::ethernet::{self, MacAddr};
use crate::wire::ipv4;
use crate::wire::{checksum, TcpFlags, UdpPacket, VxlanPacket};

/// An IPv4 packet the fast path takes, read from its header.
struct Whole {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    ttl: u8,
    total_len: usize,
}

/// The IPv4 header at the start of `ip`, read at fixed offsets, when the general path would
/// accept it (`Ipv4Packet::check_len`, the header checksum) and it has no options and is
/// not a fragment; with the packet's payload (up to its total length).
#[inline(always)]
fn whole_ipv4(ip: &[u8]) -> Option<(Whole, &[u8])> {
    let h = ip.first_chunk::<{ ipv4::HEADER_LEN }>()?;
    let total_len = usize::from(u16::from_be_bytes([h[2], h[3]]));
    // Version 4 with a 20-byte header; neither the MF flag nor a fragment offset.
    if h[0] != 0x45 || h[6] & 0x3f != 0 || h[7] != 0 {
        return None;
    }
    if !checksum::ipv4_header_verifies(h) {
        return None;
    }
    let payload = ip.get(ipv4::HEADER_LEN..total_len)?;
    let whole = Whole {
        src: Ipv4Addr::new(h[12], h[13], h[14], h[15]),
        dst: Ipv4Addr::new(h[16], h[17], h[18], h[19]),
        protocol: h[9],
        ttl: h[8],
        total_len,
    };
    Some((whole, payload))
}

/// Ports and TCP flags of a TCP (not SYN) or UDP header the general path would accept:
/// its own parser, [`rewrite::parse_l4`], limited to the protocols taken here.
#[inline]
fn ports(protocol: u8, payload: &[u8]) -> Option<(u16, u16, Option<u8>)> {
    if !matches!(protocol, ipv4::PROTO_TCP | ipv4::PROTO_UDP) {
        return None;
    }
    match rewrite::parse_l4(protocol, true, payload).ok()? {
        // A SYN mostly opens a new flow: not worth a lookup the general path repeats.
        L4::Ports {
            tcp_flags: Some(flags),
            ..
        } if flags & TcpFlags::SYN.bits() as u8 != 0 => None,
        L4::Ports {
            sport,
            dport,
            tcp_flags,
        } => Some((sport, dport, tcp_flags)),
        _ => None,
    }
}

impl Pipeline {
    /// Forwards `frame` if it is an established packet of the shapes above and returns
    /// the verdict; `None` (nothing changed) sends it to the general path.
    /// `prefetched_hash` is the burst prefetch's hash of this frame: it reads the same
    /// header bytes for every shape taken here, so it is the key's hash when given.
    #[inline]
    pub(super) fn fast_established<F: Frame>(
        &mut self,
        frame: &mut F,
        pidx: usize,
        snap: &Snapshot,
        now: Tick,
        stats: &mut WorkerStats,
        prefetched_hash: Option<u64>,
    ) -> Option<Verdict> {
        let data = frame.data();
        let eth = data.first_chunk::<{ ethernet::HEADER_LEN }>()?;
        if eth[..6] != self.ports[pidx].mac.0[..]
            || u16::from_be_bytes([eth[12], eth[13]]) != ethernet::ETHERTYPE_IPV4
        {
            return None;
        }
        // A plain TCP SYN goes to the general path before any checksum work (a SYN flood is
        // all new flows); `ports` refuses the SYNs this misses (IPv4 options, VXLAN).
        const TCP_FLAGS: usize = ethernet::HEADER_LEN + ipv4::HEADER_LEN + 13;
        if data.get(ethernet::HEADER_LEN + 9) == Some(&ipv4::PROTO_TCP)
            && data
                .get(TCP_FLAGS)
                .is_some_and(|f| f & TcpFlags::SYN.bits() as u8 != 0)
            && data[ethernet::HEADER_LEN] == 0x45
        {
            return None;
        }
        let (mut ip, mut payload) = whole_ipv4(&data[ethernet::HEADER_LEN..])?;
        let mut l2 = ethernet::HEADER_LEN;
        let mut tunneled = false;
        // A copy, so that remembering the VTEP MAC below can borrow `self` mutably.
        if let Some(vx) = self.vxlan {
            if ip.dst == vx.local_vtep && ip.protocol == ipv4::PROTO_UDP {
                // Decapsulated on cluster ports only (the edge policy).
                if self.ports[pidx].role != PortRole::Cluster {
                    return None;
                }
                let udp = UdpPacket::new_checked(payload).ok()?;
                if udp.dst_port() != vx.udp_port {
                    return None;
                }
                let datagram = &payload[8..usize::from(udp.len())];
                let v = VxlanPacket::new_checked(datagram).ok()?;
                if v.vni() != vx.vni {
                    return None;
                }
                let inner = &datagram[8..];
                let inner_eth = inner.first_chunk::<{ ethernet::HEADER_LEN }>()?;
                if u16::from_be_bytes([inner_eth[12], inner_eth[13]]) != ethernet::ETHERTYPE_IPV4 {
                    return None;
                }
                let src_mac = MacAddr([
                    inner_eth[6],
                    inner_eth[7],
                    inner_eth[8],
                    inner_eth[9],
                    inner_eth[10],
                    inner_eth[11],
                ]);
                let outer_src = ip.src;
                l2 = VXLAN_OVERHEAD + ethernet::HEADER_LEN;
                (ip, payload) = whole_ipv4(&inner[ethernet::HEADER_LEN..])?;
                // Where the general path remembers it too (it accepts every frame this far),
                // so that a changed VTEP MAC moves the L2 epoch before the adjacency check
                // below: this frame, if it goes back to the same node, then takes the new MAC.
                self.remember_vtep_mac(outer_src, src_mac);
                tunneled = true;
            }
        }
        let (sport, dport, tcp_flags) = ports(ip.protocol, payload)?;
        if ip.ttl <= 1 {
            return None;
        }
        let hash = prefetched_hash
            .unwrap_or_else(|| FlowKey::hash_of(ip.protocol, ip.src, sport, ip.dst, dport));
        debug_assert_eq!(
            hash,
            FlowKey::hash_of(ip.protocol, ip.src, sport, ip.dst, dport),
            "the burst prefetch read another key"
        );
        let key = FlowKey::new(ip.protocol, ip.src, sport, ip.dst, dport);
        let (id, dir) = self.ct.find_live(&key, hash, now)?;
        let (nat, original, binding) = {
            let e = self.ct.entry(id);
            // The edge policy's check for tracked flows (see `super::edge`): a direction
            // admitted from uplinks was validated when its entry was made.
            if self.ports[pidx].role == PortRole::Uplink && !e.arrives_on_uplink(dir) {
                return None;
            }
            (*e.nat(), *e.original(), e.binding())
        };
        if binding.generation != snap.generation {
            return None;
        }
        let rw = Rewrite::of_tracked(&nat, &original, dir);
        let final_dst = rw.dst.map_or(ip.dst, |(a, _)| a);
        let slot = self.route_slot(final_dst);
        let epoch = self.l2_epoch();
        let cached = &self.route_cache[slot];
        let hop = cached.hop?;
        let adjacency = match &cached.l2 {
            Some((at, adjacency)) if *at == epoch => adjacency,
            _ => return None,
        };
        let overhead = if hop.vtep.is_some() {
            VXLAN_OVERHEAD
        } else {
            0
        };
        if ip.total_len + overhead > usize::from(self.ports[hop.port].mtu) {
            return None;
        }

        // Committed: from here on, the general path's effects, in its order (the adjacency
        // above stays borrowed until the frame is written; what it holds was checked
        // against the epoch before, as the general path checks it).
        let end = l2 + ip.total_len;
        if tunneled {
            let extra = frame.len() - end;
            if !frame.trim(extra) || !frame.adj(VXLAN_OVERHEAD) {
                return Some(Verdict::Drop(DropReason::Malformed));
            }
            l2 -= VXLAN_OVERHEAD;
        } else {
            let extra = frame.len() - end;
            if extra > 0 && !frame.trim(extra) {
                return Some(Verdict::Drop(DropReason::Malformed));
            }
        }
        self.ct.count_hit();
        let len = frame.len().saturating_sub(l2) as u32;
        self.ct.on_packet(id, dir, tcp_flags, len, now);
        stats.count_packet(binding.frontend_id, binding.backend_counter);
        rewrite::forward_rewrite_whole(&mut frame.data_mut()[l2..], rw.src, rw.dst);
        self.neighbors.touch(adjacency.neighbor_slot, now);
        Some(self.write_l2(frame, l2, Some(hash), hop, adjacency, true))
    }
}
