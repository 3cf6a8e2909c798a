//! The Service decisions, shared by the packet path and by `ctl trace` (the admin API's
//! `explain`), so that what trace says is what the packets get:
//!
//! - [`new_connection`]: what a new connection to a frontend gets before the backend pick
//!   (source ranges, internalTrafficPolicy, usable endpoints, masquerade);
//! - [`opens_connection`]: which packets without a tracked flow may open one;
//! - [`tracked_flow`]: whether a tracked flow keeps its backend under a new snapshot
//!   (kube-semantics item 12);
//! - [`unmatched`] and [`local`]: a packet that matches no frontend.
//!
//! Pure functions of the snapshot and the packet's summary: no state, no allocation.

use std::net::Ipv4Addr;
use std::sync::Arc;

use crate::conntrack::{opens_tcp_connection, Nat};
use crate::snapshot::{
    BackendSet, EndpointState, Frontend, FrontendKind, InternalPolicy, Protocol, Snapshot,
};
use crate::stats::DropReason;

/// Why a new connection is masqueraded (its source becomes a gateway SNAT address).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Masquerade {
    /// ClusterIP traffic with `services.masquerade_cluster_ip`, or a NodePort, LB IP or
    /// externalIP of an externalTrafficPolicy: Cluster Service.
    Policy,
    /// A pod (its packet arrived over VXLAN, or its source is in a pod CIDR) to a NodePort,
    /// LB IP or externalIP of an externalTrafficPolicy: Local Service. kube-proxy treats
    /// traffic from inside the cluster to such frontends as Cluster policy: without SNAT the
    /// backend would answer the pod directly, from an address the pod never called.
    PodToLocalPolicy,
    /// The client is the chosen endpoint: it would answer itself.
    Hairpin,
}

impl Masquerade {
    /// Why, in words (`ctl trace`).
    pub fn describe(self) -> &'static str {
        match self {
            Masquerade::Policy => "masquerade by policy (ClusterIP masquerade, or externalTrafficPolicy Cluster)",
            Masquerade::PodToLocalPolicy => "masquerade: a pod reaching an externalTrafficPolicy Local frontend is treated as Cluster policy, as kube-proxy does (the backend would otherwise answer the pod directly)",
            Masquerade::Hairpin => "hairpin: the client is the chosen endpoint",
        }
    }
}

/// Where a new connection comes from, as the Service decisions see it.
#[derive(Clone, Copy, Debug)]
pub struct Sender<'a> {
    pub src: Ipv4Addr,
    /// The node of the sending pod: the node behind the VTEP the packet came from over
    /// VXLAN (`ctl trace`: behind the pod CIDR of the source). `None`: not pod traffic
    /// from a known node, so internalTrafficPolicy: Local is treated as Cluster.
    pub node: Option<&'a Arc<str>>,
    /// The packet comes from a pod: it arrived over VXLAN, or its source is in a pod CIDR.
    pub from_pod: bool,
}

/// The fate of a new connection to a frontend, before the backend pick.
#[derive(Debug)]
pub enum NewConnection<'f> {
    /// Dropped without an answer.
    Drop(DropReason),
    /// Answered with an ICMP port-unreachable (rate-limited), counted under the reason.
    Reject(DropReason),
    /// Balanced over the usable endpoints of `set`.
    Balance {
        set: &'f BackendSet,
        /// internalTrafficPolicy: Local narrowed `set` to the sender's node.
        local: bool,
        /// Why the connection is masqueraded whatever the pick; `None`: the client address
        /// is kept unless the pick is a hairpin.
        masquerade: Option<Masquerade>,
    },
}

/// Whether a frontend that does not masquerade by policy would be masqueraded for a pod:
/// the only case where [`Sender::from_pod`] matters (callers may skip working it out
/// otherwise).
#[inline]
pub fn needs_from_pod(fe: &Frontend) -> bool {
    !fe.masquerade && fe.kind != FrontendKind::ClusterIp
}

/// What a new connection from `sender` to `fe` gets (kube-semantics items 8, 16–20), in
/// the order kube-proxy decides: loadBalancerSourceRanges, then internalTrafficPolicy
/// (with no usable endpoint anywhere the connection is rejected as under Cluster; with
/// usable ones elsewhere but none on the sender's node it is dropped silently), then the
/// usable endpoints.
pub fn new_connection<'f>(fe: &'f Frontend, sender: Sender<'_>) -> NewConnection<'f> {
    if fe.kind == FrontendKind::LoadBalancer
        && !fe.source_ranges.is_empty()
        && !fe.source_ranges.iter().any(|r| r.contains(&sender.src))
    {
        return NewConnection::Drop(DropReason::SourceRange);
    }
    let (set, local): (&BackendSet, bool) = match (&fe.internal_policy, sender.node) {
        (InternalPolicy::Local { by_node }, Some(node)) => match by_node.get(node) {
            Some(s) if !s.usable.is_empty() => (s, true),
            _ if fe.backends.usable.is_empty() => (&fe.backends, false),
            _ => return NewConnection::Drop(DropReason::NoLocalEndpoint),
        },
        _ => (&fe.backends, false),
    };
    if set.usable.is_empty() {
        return NewConnection::Reject(DropReason::NoEndpoints);
    }
    let masquerade = if fe.masquerade {
        Some(Masquerade::Policy)
    } else if needs_from_pod(fe) && sender.from_pod {
        Some(Masquerade::PodToLocalPolicy)
    } else {
        None
    };
    NewConnection::Balance {
        set,
        local,
        masquerade,
    }
}

/// Whether a packet of `protocol` without a tracked flow may open a connection to a
/// frontend: a TCP segment must be a SYN (without ACK or RST); any other is dropped as
/// `tcp_no_flow`, never balanced (a retransmission of a flow whose entry is gone would
/// otherwise reach another pod, which answers RST), unless conntrack is `tcp_loose`.
#[inline]
pub fn opens_connection(protocol: Protocol, tcp_flags: Option<u8>, tcp_loose: bool) -> bool {
    protocol != Protocol::Tcp || tcp_loose || tcp_flags.is_some_and(opens_tcp_connection)
}

/// Whether a tracked flow keeps its backend under a snapshot it was not validated in.
#[derive(Debug)]
pub enum TrackedFlow<'s> {
    /// It keeps its backend; its packets count under this frontend (`None`: the frontend
    /// that created it is gone, a nodePort edit or a deleted Service).
    Keep(Option<&'s Arc<Frontend>>),
    /// UDP whose backend is no longer usable or whose frontend is gone: the entry goes
    /// and the next datagram picks again, as kube-proxy flushes UDP conntrack entries.
    Flush,
    /// TCP or SCTP whose backend left every EndpointSlice: dropped as `backend_gone`.
    Gone,
}

/// kube-semantics item 12: a TCP (or SCTP) flow keeps its backend while the backend is
/// present in its Service's slices in any condition (ready or not, serving or not,
/// terminating or not), and through edits or deletion of its frontend while some
/// EndpointSlice still lists the backend; a UDP flow only while its backend is ready or
/// serving and terminating, and while its frontend exists.
pub fn tracked_flow<'s>(snap: &'s Snapshot, protocol: u8, nat: &Nat) -> TrackedFlow<'s> {
    let Some(protocol) = Protocol::from_ip_proto(protocol) else {
        return TrackedFlow::Flush;
    };
    let fe = snap.match_frontend(nat.frontend_addr, protocol, nat.frontend_port);
    let state = fe.and_then(|f| f.backends.state_of(nat.backend_addr, nat.backend_port));
    match (protocol, fe, state) {
        (
            Protocol::Udp,
            Some(f),
            Some(EndpointState::Ready | EndpointState::ServingTerminating),
        ) => TrackedFlow::Keep(Some(f)),
        (Protocol::Udp, _, _) => TrackedFlow::Flush,
        (_, Some(f), Some(_)) => TrackedFlow::Keep(Some(f)),
        (_, Some(_), None) => TrackedFlow::Gone,
        (_, None, _)
            if snap
                .backend_presence
                .contains(protocol, nat.backend_addr, nat.backend_port) =>
        {
            TrackedFlow::Keep(None)
        }
        (_, None, _) => TrackedFlow::Gone,
    }
}

/// What kind of packet matched no frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unframed {
    /// TCP, UDP or SCTP (a port that no frontend serves).
    Ports,
    /// An ICMP echo request (not a fragment).
    EchoRequest,
    /// Anything else.
    Other,
}

/// The fate of a packet that matched no frontend, by its destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unmatched {
    /// A service address on a port nobody serves: ICMP port-unreachable (`no_service`).
    Reject(DropReason),
    /// An echo request to a service address: the gateway answers (as IPVS does).
    AnswerEcho,
    Drop(DropReason),
    /// Not a service destination: local delivery or routing decide.
    NotService,
}

/// kube-semantics item 8: a known service address on an unknown port is rejected; an
/// unallocated address inside the service CIDR is dropped.
pub fn unmatched(snap: &Snapshot, dst: Ipv4Addr, packet: Unframed) -> Unmatched {
    if snap.service_addresses.contains_key(&dst) {
        return match packet {
            Unframed::Ports => Unmatched::Reject(DropReason::NoService),
            Unframed::EchoRequest => Unmatched::AnswerEcho,
            Unframed::Other => Unmatched::Drop(DropReason::NoService),
        };
    }
    if snap.service_cidr.is_some_and(|c| c.contains(&dst)) {
        return Unmatched::Drop(DropReason::NoService);
    }
    Unmatched::NotService
}

/// The fate of a packet for the gateway itself (an owned address, broadcast, multicast).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Local {
    /// Handed to the kernel through the in-port's exception port.
    Exception,
    /// An echo request to an owned address, answered by the gateway.
    AnswerEcho,
    /// `no_exception_port`.
    Drop(DropReason),
}

/// Traffic for the gateway goes to the in-port's exception port, unless it came over
/// VXLAN (decapsulated traffic is never handed to the kernel); without one, only echo
/// requests to an owned address are answered.
pub fn local(has_exception_port: bool, over_vxlan: bool, echo_request_to_owned: bool) -> Local {
    if has_exception_port && !over_vxlan {
        Local::Exception
    } else if echo_request_to_owned {
        Local::AnswerEcho
    } else {
        Local::Drop(DropReason::NoException)
    }
}
