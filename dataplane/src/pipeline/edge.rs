//! The edge policy (design.md "The edge policy"): what a port with role `uplink` may send
//! into the gateway. The internet is on the other side of an uplink, so:
//!
//! * **Sources** are validated first, for every packet of an uplink (as Linux drops
//!   martians and `rp_filter` drops spoofed sources): a martian — `0.0.0.0/8`,
//!   `127.0.0.0/8`, multicast `224.0.0.0/4`, class E `240.0.0.0/4` (which holds the
//!   limited broadcast `255.255.255.255`), the directed broadcast of a connected uplink
//!   subnet — is `martian_source`; an address the cluster side owns — a pod CIDR of the
//!   snapshot, the service CIDR, a SNAT address, an address of the gateway, the subnet of a
//!   cluster port or a (non-default) static route through one — is `spoofed_source`.
//! * **Destinations**: a Service frontend (its source ranges apply), the gateway's own
//!   addresses (the exception path) and the flows conntrack holds pass; anything else that
//!   would be routed (pod CIDRs, nodes, the underlay, other prefixes) is
//!   `uplink_not_allowed`, unless the config names it in `edge.routable_prefixes`.
//!
//! # Tracked flows and the fast path
//!
//! The established-flow fast path must not let through what the general path refuses, yet
//! it should not pay for prefix lookups per packet. It needs none: a conntrack entry
//! remembers which of its directions may arrive on an uplink
//! ([`crate::conntrack::Entry::arrives_on_uplink`]), and a packet matches an entry only
//! through a key that holds its source address. The original direction is admitted from
//! uplinks only when the entry was created by a packet of an uplink, whose source passed
//! the checks above (the key holds the same source); the reply direction only when the
//! backend is routed through an uplink (its address is then no cluster-side address: the
//! route toward it does not enter the cluster). So a packet of an uplink the fast path
//! forwards carries a source that was validated, or the backend's own; a packet matching
//! an entry through a direction not admitted from uplinks (say a spoofed pod source
//! replaying a pod's ClusterIP flow) leaves the fast path for the general path, which
//! drops it by its source (`spoofed_source`), or else as `uplink_not_allowed`.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use prefix_trie::{PrefixMap, PrefixSet};

use super::PortRole;
use crate::snapshot::Snapshot;
use crate::stats::DropReason;

/// Why a source address claims to be on the cluster side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClusterSide {
    GatewayAddress,
    SnatAddress,
    PodCidr,
    ServiceCidr,
    /// A cluster port's subnet, or a static route through a cluster port.
    ClusterRoute,
}

impl ClusterSide {
    pub fn as_str(self) -> &'static str {
        match self {
            ClusterSide::GatewayAddress => "an address of the gateway",
            ClusterSide::SnatAddress => "a SNAT address",
            ClusterSide::PodCidr => "a pod CIDR",
            ClusterSide::ServiceCidr => "the service CIDR",
            ClusterSide::ClusterRoute => "a prefix routed through a cluster port",
        }
    }
}

/// What source validation found wrong with a source from an uplink.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BadSource {
    /// Never a valid source (the reason in words).
    Martian(&'static str),
    /// A cluster-side address: the prefix holding it, and what that prefix is.
    Spoofed(Ipv4Net, ClusterSide),
}

impl BadSource {
    pub fn drop_reason(self) -> DropReason {
        match self {
            BadSource::Martian(_) => DropReason::MartianSource,
            BadSource::Spoofed(..) => DropReason::SpoofedSource,
        }
    }
}

/// A port as the policy sees it: its role and its addresses with their subnets.
#[derive(Clone, Copy, Debug)]
pub struct EdgePort<'a> {
    pub role: PortRole,
    pub addresses: &'a [Ipv4Net],
}

/// The edge policy of one gateway (see the module docs). Built from the config; the part
/// that depends on the snapshot (pod CIDRs, service CIDR) is rebuilt by
/// [`EdgePolicy::take_snapshot`], off the packet path.
#[derive(Clone, Debug, Default)]
pub struct EdgePolicy {
    /// Directed broadcasts of the uplinks' connected subnets (shorter than /31).
    uplink_broadcasts: Vec<Ipv4Addr>,
    /// Cluster-side prefixes that do not depend on the snapshot.
    config_cluster: Vec<(Ipv4Net, ClusterSide)>,
    /// `config_cluster` plus the snapshot's pod CIDRs and service CIDR.
    cluster: PrefixMap<Ipv4Net, ClusterSide>,
    routable: PrefixSet<Ipv4Net>,
}

impl EdgePolicy {
    /// `ports` in the pipeline's order; `routes` are static routes as (prefix, index of
    /// the egress port); `snat` the SNAT addresses; `routable` the prefixes uplinks may
    /// reach anyway (`edge.routable_prefixes`).
    pub fn new(
        ports: &[EdgePort<'_>],
        routes: &[(Ipv4Net, usize)],
        snat: &[Ipv4Addr],
        routable: &[Ipv4Net],
    ) -> EdgePolicy {
        let mut uplink_broadcasts = Vec::new();
        let mut config_cluster = Vec::new();
        for port in ports {
            for net in port.addresses {
                if port.role == PortRole::Uplink && net.prefix_len() < 31 {
                    uplink_broadcasts.push(net.broadcast());
                }
                if port.role == PortRole::Cluster {
                    config_cluster.push((net.trunc(), ClusterSide::ClusterRoute));
                }
            }
        }
        for &(prefix, port) in routes {
            let through_cluster = ports.get(port).is_some_and(|p| p.role == PortRole::Cluster);
            // A default route through the cluster says nothing about where sources live.
            if through_cluster && prefix.prefix_len() > 0 {
                config_cluster.push((prefix.trunc(), ClusterSide::ClusterRoute));
            }
        }
        for &addr in snat {
            config_cluster.push((Ipv4Net::from(addr), ClusterSide::SnatAddress));
        }
        // Last: a host route names the address, not the subnet around it.
        for port in ports {
            for net in port.addresses {
                config_cluster.push((Ipv4Net::from(net.addr()), ClusterSide::GatewayAddress));
            }
        }
        let mut policy = EdgePolicy {
            uplink_broadcasts,
            config_cluster,
            cluster: PrefixMap::new(),
            routable: routable.iter().map(Ipv4Net::trunc).collect(),
        };
        policy.rebuild(None);
        policy
    }

    /// Takes the snapshot's pod CIDRs and service CIDR (once per snapshot generation).
    pub fn take_snapshot(&mut self, snapshot: &Snapshot) {
        self.rebuild(Some(snapshot));
    }

    fn rebuild(&mut self, snapshot: Option<&Snapshot>) {
        let mut cluster = PrefixMap::new();
        if let Some(snap) = snapshot {
            for r in &snap.pod_routes {
                cluster.insert(r.cidr.trunc(), ClusterSide::PodCidr);
            }
            if let Some(cidr) = snap.service_cidr {
                cluster.insert(cidr.trunc(), ClusterSide::ServiceCidr);
            }
        }
        for &(prefix, side) in &self.config_cluster {
            cluster.insert(prefix, side);
        }
        self.cluster = cluster;
    }

    /// Whether `src` may be the source of a packet from an uplink.
    #[inline]
    pub fn check_source(&self, src: Ipv4Addr) -> Result<(), BadSource> {
        if let Some(why) = martian(src) {
            return Err(BadSource::Martian(why));
        }
        if self.uplink_broadcasts.contains(&src) {
            return Err(BadSource::Martian(
                "the directed broadcast of an uplink subnet",
            ));
        }
        match self.cluster.get_lpm(&Ipv4Net::from(src)) {
            Some((prefix, &side)) => Err(BadSource::Spoofed(prefix, side)),
            None => Ok(()),
        }
    }

    /// Whether a packet from an uplink may be routed to `dst` (it is neither a Service
    /// frontend nor an address of the gateway): only inside `edge.routable_prefixes`.
    #[inline]
    pub fn routable(&self, dst: Ipv4Addr) -> bool {
        self.routable.get_spm(&Ipv4Net::from(dst)).is_some()
    }

    /// The routable prefix holding `dst`, for explanations.
    pub fn routable_prefix(&self, dst: Ipv4Addr) -> Option<Ipv4Net> {
        self.routable.get_lpm(&Ipv4Net::from(dst))
    }
}

/// Why `src` is never a valid source on a link, if it is not (RFC 1122 3.2.1.3, RFC 5735):
/// Linux's martian classes.
#[inline]
pub fn martian(src: Ipv4Addr) -> Option<&'static str> {
    let first = src.octets()[0];
    match first {
        0 => Some("\"this network\" 0.0.0.0/8"),
        127 => Some("loopback 127.0.0.0/8"),
        224..=239 => Some("multicast 224.0.0.0/4"),
        255 if src.is_broadcast() => Some("the limited broadcast 255.255.255.255"),
        240..=255 => Some("reserved class E 240.0.0.0/4"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn policy() -> EdgePolicy {
        let uplink = [net("192.0.2.1/24")];
        let cluster = [net("10.0.0.1/24")];
        EdgePolicy::new(
            &[
                EdgePort {
                    role: PortRole::Uplink,
                    addresses: &uplink,
                },
                EdgePort {
                    role: PortRole::Cluster,
                    addresses: &cluster,
                },
            ],
            &[
                (net("0.0.0.0/0"), 0),
                (net("172.16.0.0/16"), 1),
                (net("198.18.0.0/15"), 0),
            ],
            &[ip("10.0.0.100")],
            &[net("10.0.0.128/25")],
        )
    }

    #[test]
    fn source_classes() {
        let mut p = policy();
        let snap = Snapshot {
            service_cidr: Some(net("10.96.0.0/12")),
            pod_routes: vec![crate::snapshot::PodCidrRoute {
                cidr: net("10.244.1.0/24"),
                vtep: ip("10.0.0.11"),
                vni: 1,
                node: None,
                vtep_mac: None,
            }],
            ..Snapshot::default()
        };
        // Before the first snapshot: no pod CIDR is known.
        assert_eq!(p.check_source(ip("10.244.1.50")), Ok(()));
        p.take_snapshot(&snap);
        let martian = |why: &'static str| Err(BadSource::Martian(why));
        let cases = [
            ("0.0.0.0", martian("\"this network\" 0.0.0.0/8")),
            ("0.1.2.3", martian("\"this network\" 0.0.0.0/8")),
            ("127.0.0.1", martian("loopback 127.0.0.0/8")),
            ("224.0.0.5", martian("multicast 224.0.0.0/4")),
            ("239.255.255.250", martian("multicast 224.0.0.0/4")),
            ("240.0.0.1", martian("reserved class E 240.0.0.0/4")),
            (
                "255.255.255.255",
                martian("the limited broadcast 255.255.255.255"),
            ),
            (
                "192.0.2.255",
                martian("the directed broadcast of an uplink subnet"),
            ),
            (
                "10.244.1.50",
                Err(BadSource::Spoofed(
                    net("10.244.1.0/24"),
                    ClusterSide::PodCidr,
                )),
            ),
            (
                "10.96.0.10",
                Err(BadSource::Spoofed(
                    net("10.96.0.0/12"),
                    ClusterSide::ServiceCidr,
                )),
            ),
            (
                "10.0.0.100",
                Err(BadSource::Spoofed(
                    net("10.0.0.100/32"),
                    ClusterSide::SnatAddress,
                )),
            ),
            (
                "10.0.0.1",
                Err(BadSource::Spoofed(
                    net("10.0.0.1/32"),
                    ClusterSide::GatewayAddress,
                )),
            ),
            (
                "192.0.2.1",
                Err(BadSource::Spoofed(
                    net("192.0.2.1/32"),
                    ClusterSide::GatewayAddress,
                )),
            ),
            (
                "10.0.0.11",
                Err(BadSource::Spoofed(
                    net("10.0.0.0/24"),
                    ClusterSide::ClusterRoute,
                )),
            ),
            (
                "172.16.3.4",
                Err(BadSource::Spoofed(
                    net("172.16.0.0/16"),
                    ClusterSide::ClusterRoute,
                )),
            ),
            // Ordinary internet sources, the uplink's neighbours, routes via the uplink.
            ("203.0.113.5", Ok(())),
            ("192.0.2.7", Ok(())),
            ("192.0.2.0", Ok(())),
            ("198.18.0.1", Ok(())),
            ("10.245.0.1", Ok(())),
            ("223.255.255.254", Ok(())),
        ];
        for (src, expected) in cases {
            assert_eq!(p.check_source(ip(src)), expected, "source {src}");
        }
        assert_eq!(
            BadSource::Martian("x").drop_reason(),
            DropReason::MartianSource
        );
        assert_eq!(
            BadSource::Spoofed(net("10.0.0.0/8"), ClusterSide::PodCidr).drop_reason(),
            DropReason::SpoofedSource
        );
    }

    #[test]
    fn routable_prefixes() {
        let p = policy();
        assert!(p.routable(ip("10.0.0.200")));
        assert_eq!(
            p.routable_prefix(ip("10.0.0.200")),
            Some(net("10.0.0.128/25"))
        );
        assert!(!p.routable(ip("10.0.0.50")));
        assert!(!p.routable(ip("10.244.1.5")));
        assert!(!EdgePolicy::default().routable(ip("8.8.8.8")));
    }
}
