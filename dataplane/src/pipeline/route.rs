//! Where a packet leaves: pod CIDRs (VXLAN toward the node's VTEP) first, then static and
//! connected routes by longest prefix. The pipeline forwards with these tables and the
//! admin API's `trace` explains with the same ones, so the explanation cannot drift from
//! what the workers do.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use prefix_trie::PrefixMap;

use crate::snapshot::PodCidrRoute;

/// One route: the egress port (an index into the pipeline's ports, which are the config's
/// ports in order) and the gateway to send through (`None`: the destination is on-link).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteEntry {
    pub port: usize,
    pub via: Option<Ipv4Addr>,
}

/// Where a packet to some destination leaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hop {
    /// Index of the egress port.
    pub port: usize,
    /// The address whose MAC the frame is sent to: the route's gateway, or the destination
    /// (the VTEP when encapsulating) when it is on-link.
    pub next_hop: Ipv4Addr,
    /// Encapsulate in VXLAN toward this VTEP.
    pub vtep: Option<Ipv4Addr>,
}

/// Static routes and connected subnets, looked up by longest prefix.
#[derive(Clone, Debug, Default)]
pub struct RouteTable {
    routes: PrefixMap<Ipv4Net, RouteEntry>,
}

impl RouteTable {
    /// `statics` are (prefix, gateway, port index); `connected` are the ports' own subnets
    /// (subnet, port index), inserted last so that a connected route replaces a static one
    /// of the same prefix.
    pub fn new(
        statics: impl IntoIterator<Item = (Ipv4Net, Option<Ipv4Addr>, usize)>,
        connected: impl IntoIterator<Item = (Ipv4Net, usize)>,
    ) -> RouteTable {
        let mut routes = PrefixMap::new();
        for (prefix, via, port) in statics {
            routes.insert(prefix.trunc(), RouteEntry { port, via });
        }
        for (subnet, port) in connected {
            routes.insert(subnet.trunc(), RouteEntry { port, via: None });
        }
        RouteTable { routes }
    }

    /// The longest prefix holding `dst`, with its route.
    pub fn lookup(&self, dst: Ipv4Addr) -> Option<(Ipv4Net, RouteEntry)> {
        self.routes
            .get_lpm(&Ipv4Net::from(dst))
            .map(|(prefix, &route)| (prefix, route))
    }

    /// The hop toward `dst`. With `pods` (VXLAN configured), a destination inside a pod
    /// CIDR is encapsulated toward its VTEP, and the VTEP's own route gives the port and
    /// the next hop; a pod whose VTEP has no route has no hop.
    pub fn hop(&self, dst: Ipv4Addr, pods: Option<&PodRoutes>) -> Option<Hop> {
        if let Some((_, vtep)) = pods.and_then(|p| p.vtep_for(dst)) {
            let (_, outer) = self.lookup(vtep)?;
            return Some(Hop {
                port: outer.port,
                next_hop: outer.via.unwrap_or(vtep),
                vtep: Some(vtep),
            });
        }
        let (_, route) = self.lookup(dst)?;
        Some(Hop {
            port: route.port,
            next_hop: route.via.unwrap_or(dst),
            vtep: None,
        })
    }
}

/// The pod CIDRs of a snapshot, each behind its node's VTEP.
#[derive(Clone, Debug, Default)]
pub struct PodRoutes {
    cidrs: PrefixMap<Ipv4Net, Ipv4Addr>,
}

impl PodRoutes {
    pub fn new(routes: &[PodCidrRoute]) -> PodRoutes {
        let mut cidrs = PrefixMap::new();
        for r in routes {
            cidrs.insert(r.cidr.trunc(), r.vtep);
        }
        PodRoutes { cidrs }
    }

    /// The longest pod CIDR holding `dst`, with its VTEP.
    pub fn vtep_for(&self, dst: Ipv4Addr) -> Option<(Ipv4Net, Ipv4Addr)> {
        self.cidrs
            .get_lpm(&Ipv4Net::from(dst))
            .map(|(cidr, &vtep)| (cidr, vtep))
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

    /// Port 0 uplink 192.0.2.1/24 with a default route; port 1 cluster 10.0.0.1/24, with
    /// a route to a far underlay subnet and a static route for 10.0.0.0/24 that the
    /// connected subnet must override.
    fn table() -> RouteTable {
        RouteTable::new(
            [
                (net("0.0.0.0/0"), Some(ip("192.0.2.254")), 0),
                (net("172.16.0.0/16"), Some(ip("10.0.0.254")), 1),
                (net("10.0.0.0/24"), Some(ip("192.0.2.9")), 0),
            ],
            [(net("192.0.2.1/24"), 0), (net("10.0.0.1/24"), 1)],
        )
    }

    fn pods() -> PodRoutes {
        let pod = |cidr: &str, vtep: &str| PodCidrRoute {
            cidr: net(cidr),
            vtep: ip(vtep),
            vni: 1,
            node: None,
            vtep_mac: None,
        };
        PodRoutes::new(&[
            pod("10.244.0.0/16", "10.0.0.30"),
            pod("10.244.1.0/24", "10.0.0.21"),
            pod("10.244.2.0/24", "172.16.5.22"),
        ])
    }

    #[test]
    fn longest_prefix_and_connected_over_static() {
        let t = table();
        assert_eq!(
            t.lookup(ip("10.0.0.7")),
            Some((net("10.0.0.0/24"), RouteEntry { port: 1, via: None }))
        );
        let hop = t.hop(ip("172.16.9.9"), None).unwrap();
        assert_eq!(
            (hop.port, hop.next_hop, hop.vtep),
            (1, ip("10.0.0.254"), None)
        );
        let hop = t.hop(ip("10.0.0.7"), None).unwrap();
        assert_eq!((hop.port, hop.next_hop), (1, ip("10.0.0.7")));
        let hop = t.hop(ip("8.8.8.8"), None).unwrap();
        assert_eq!((hop.port, hop.next_hop), (0, ip("192.0.2.254")));
    }

    #[test]
    fn pods_go_to_their_vteps_underlay_next_hop() {
        let t = table();
        let p = pods();
        // The longest pod CIDR wins; its VTEP is on-link.
        assert_eq!(
            t.hop(ip("10.244.1.5"), Some(&p)),
            Some(Hop {
                port: 1,
                next_hop: ip("10.0.0.21"),
                vtep: Some(ip("10.0.0.21"))
            })
        );
        assert_eq!(
            t.hop(ip("10.244.7.5"), Some(&p)).map(|h| h.vtep),
            Some(Some(ip("10.0.0.30")))
        );
        // A VTEP behind a router: the router is the next hop.
        assert_eq!(
            t.hop(ip("10.244.2.5"), Some(&p)),
            Some(Hop {
                port: 1,
                next_hop: ip("10.0.0.254"),
                vtep: Some(ip("172.16.5.22"))
            })
        );
        // Without VXLAN, pod CIDRs mean nothing: the default route takes it.
        assert_eq!(
            t.hop(ip("10.244.1.5"), None).map(|h| (h.next_hop, h.vtep)),
            Some((ip("192.0.2.254"), None))
        );
    }

    #[test]
    fn no_route_no_hop() {
        let t = RouteTable::new([], [(net("10.0.0.1/24"), 1)]);
        assert_eq!(t.hop(ip("192.0.2.7"), None), None);
        // A pod whose VTEP is unreachable has no hop either.
        let p = PodRoutes::new(&[PodCidrRoute {
            cidr: net("10.244.1.0/24"),
            vtep: ip("172.16.0.1"),
            vni: 1,
            node: None,
            vtep_mac: None,
        }]);
        assert_eq!(t.hop(ip("10.244.1.5"), Some(&p)), None);
    }
}
