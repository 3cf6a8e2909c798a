//! `ctl trace`: what the pipeline would do with a flow, read-only, naming each rule that
//! decided it. Not on the packet path (it allocates strings).

use std::fmt;
use std::net::Ipv4Addr;

use super::{rewrite, Pipeline};
use crate::conntrack::{Direction, FlowKey, Tick};
use crate::snapshot::{FrontendKind, InternalPolicy, Protocol, Snapshot};
use crate::wire::MacAddr;

/// The answer of [`Pipeline::trace`]: one line per decision, in path order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Trace {
    pub steps: Vec<String>,
    /// Translated (source, destination) when the flow is served.
    pub translated: Option<FlowKey>,
    /// Egress port id and next hop.
    pub egress: Option<(u16, Ipv4Addr)>,
}

impl fmt::Display for Trace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for s in &self.steps {
            writeln!(f, "{s}")?;
        }
        Ok(())
    }
}

impl Pipeline {
    /// Explains the fate of the first packet of `flow` (or of its next packet when
    /// conntrack holds it), without changing any state.
    pub fn trace(&self, flow: &FlowKey, snapshot: &Snapshot, now: Tick) -> Trace {
        let mut t = Trace::default();
        let mut dst = (flow.dst, flow.dst_port);
        let mut src = (flow.src, flow.src_port);
        if let Some((id, dir)) = self.ct.peek(flow, now) {
            let e = self.ct.entry(id);
            let nat = *e.nat();
            t.steps.push(format!(
                "conntrack: {} entry, {} ({}), expires in {} ms",
                match dir {
                    Direction::Original => "original direction of an",
                    Direction::Reply => "reply direction of an",
                },
                e.original(),
                e.state().describe(e.assured()),
                e.expires_at().saturating_sub(now)
            ));
            match dir {
                Direction::Original => {
                    dst = (nat.backend_addr, nat.backend_port);
                    if let Some(s) = nat.snat {
                        src = s;
                    }
                }
                Direction::Reply => {
                    src = (nat.frontend_addr, nat.frontend_port);
                    if nat.snat.is_some() {
                        dst = (e.original().src, e.original().src_port);
                    }
                }
            }
        } else if let Some(fe) = Protocol::from_ip_proto(flow.protocol)
            .and_then(|p| snapshot.match_frontend(flow.dst, p, flow.dst_port))
        {
            t.steps.push(format!(
                "service: {} {} frontend {}:{}",
                fe.service,
                fe.kind.as_str(),
                flow.dst,
                flow.dst_port
            ));
            if fe.kind == FrontendKind::LoadBalancer
                && !fe.source_ranges.is_empty()
                && !fe.source_ranges.iter().any(|r| r.contains(&flow.src))
            {
                t.steps.push(format!(
                    "drop: source {} outside loadBalancerSourceRanges",
                    flow.src
                ));
                return t;
            }
            if let InternalPolicy::Local { .. } = fe.internal_policy {
                t.steps.push(
                    "internalTrafficPolicy Local: applies to pod traffic arriving over VXLAN \
                     (endpoints of the sender's node only)"
                        .into(),
                );
            }
            let set = &fe.backends;
            if set.usable.is_empty() {
                t.steps
                    .push("reject: no usable endpoint → ICMP port-unreachable".into());
                return t;
            }
            let hash = rewrite::flow_hash(
                flow.protocol,
                flow.src,
                flow.src_port,
                flow.dst,
                flow.dst_port,
            );
            let affine = fe
                .affinity_timeout_secs
                .and_then(|_| self.affinity.get(fe.service.stable_id(), flow.src, now))
                .filter(|&(a, p)| super::is_usable(set, a, p));
            let b = match affine {
                Some(b) => {
                    t.steps
                        .push(format!("backend {}:{} by ClientIP affinity", b.0, b.1));
                    b
                }
                None => {
                    let hash = super::pick_hash(fe, hash, flow.src);
                    let Some(b) = set.pick(hash) else {
                        return t;
                    };
                    t.steps.push(format!(
                        "backend {}:{} ({}) by Maglev, flow hash {hash:#018x}, {} usable of {}",
                        b.addr,
                        b.port,
                        b.state.as_str(),
                        set.usable.len(),
                        set.backends.len()
                    ));
                    (b.addr, b.port)
                }
            };
            dst = b;
            if fe.masquerade || b.0 == flow.src {
                let why = if fe.masquerade {
                    "masquerade (externalTrafficPolicy Cluster / ClusterIP masquerade)"
                } else {
                    "hairpin (the client is the chosen endpoint)"
                };
                t.steps
                    .push(format!("SNAT: {why}; source port from this worker's range"));
            } else {
                t.steps.push(
                    "no SNAT: client address kept (externalTrafficPolicy Local, or the reply \
                     path passes the gateway)"
                        .into(),
                );
            }
        } else if snapshot.service_addresses.contains_key(&flow.dst) {
            t.steps.push(format!(
                "reject: {} is a service address without port {} → ICMP port-unreachable",
                flow.dst, flow.dst_port
            ));
            return t;
        } else if snapshot.service_cidr.is_some_and(|c| c.contains(&flow.dst)) {
            t.steps.push(format!(
                "drop: {} is unallocated in the service CIDR",
                flow.dst
            ));
            return t;
        } else if self.is_owned(flow.dst) {
            t.steps.push(format!(
                "local: {} is a gateway address → exception port",
                flow.dst
            ));
            return t;
        } else {
            t.steps.push("no service: routed as it is".into());
        }
        t.translated = Some(FlowKey::new(flow.protocol, src.0, src.1, dst.0, dst.1));
        let pod = snapshot
            .pod_routes
            .iter()
            .filter(|r| r.cidr.contains(&dst.0))
            .max_by_key(|r| r.cidr.prefix_len());
        let (lookup, vtep) = match pod {
            Some(r) if self.vxlan.is_some() => {
                t.steps.push(format!(
                    "route: pod CIDR {} behind VTEP {} (node {}) → VXLAN",
                    r.cidr,
                    r.vtep,
                    r.node.as_deref().unwrap_or("?")
                ));
                (r.vtep, true)
            }
            _ => (dst.0, false),
        };
        match self.routes.lookup(lookup) {
            Some((prefix, r)) => {
                let port = &self.ports[r.port];
                let next_hop = r.via.unwrap_or(lookup);
                let mac = self
                    .neighbors
                    .get(port.id, next_hop)
                    .map_or("unresolved (ARP)".to_string(), |m: MacAddr| m.to_string());
                t.steps.push(format!(
                    "route: {prefix} → port {} next hop {next_hop} ({mac}){}",
                    port.id,
                    if vtep { ", outer header" } else { "" }
                ));
                t.egress = Some((port.id, next_hop));
            }
            None => t.steps.push("drop: no route".into()),
        }
        t
    }
}
