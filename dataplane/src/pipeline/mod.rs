// PLACEHOLDER (not committed): replaced by the pipe branch.
use crate::conntrack::Tick;
use crate::frame::Frame;
use crate::snapshot::Snapshot;
use crate::stats::{DropReason, WorkerStats};
use crate::wire::MacAddr;
use std::net::Ipv4Addr;
pub enum Verdict {
    Transmit { port: u16 },
    Drop(DropReason),
    ToException { port: u16 },
    HoldForNeighbor { port: u16, next_hop: Ipv4Addr },
    Handoff { worker: usize },
}
use ipnet::Ipv4Net; use std::ops::RangeInclusive; use crate::conntrack::ConntrackConfig;
#[derive(Clone, Copy, Debug, PartialEq, Eq)] pub enum PortRole { Uplink, Cluster }
#[derive(Clone, Debug)] pub struct PortConfig { pub id: u16, pub mac: MacAddr, pub addresses: Vec<Ipv4Net>, pub role: PortRole, pub mtu: u16, pub exception_port: Option<u16> }
#[derive(Clone, Debug)] pub struct RouteConfig { pub prefix: Ipv4Net, pub via: Option<Ipv4Addr>, pub port: u16 }
#[derive(Clone, Debug)] pub struct VxlanConfig { pub udp_port: u16, pub vni: u32, pub local_vtep: Ipv4Addr }
#[derive(Clone, Debug)] pub struct PipelineConfig { pub ports: Vec<PortConfig>, pub routes: Vec<RouteConfig>, pub static_neighbors: Vec<(u16, Ipv4Addr, MacAddr)>, pub vxlan: Option<VxlanConfig>, pub snat_addresses: Vec<Ipv4Addr>, pub snat_port_range: RangeInclusive<u16>, pub conntrack: ConntrackConfig, pub affinity_capacity: usize, pub icmp_errors_per_second: u32, pub worker_index: usize, pub workers: usize, pub neighbor_timeout_ms: u64 }
pub struct Pipeline;
impl Pipeline {
    pub fn new(_c: PipelineConfig) -> Result<Pipeline, String> {
        Ok(Pipeline)
    }
    pub fn process<F: Frame>(
        &mut self,
        _frame: &mut F,
        _in_port: u16,
        _snapshot: &Snapshot,
        _now: Tick,
        _stats: &mut WorkerStats,
    ) -> Verdict {
        Verdict::Drop(DropReason::NoRoute)
    }
    pub fn owner<F: Frame>(&self, _frame: &F, _in_port: u16, _snapshot: &Snapshot) -> usize {
        0
    }
    pub fn neighbor(&self, _port: u16, _addr: Ipv4Addr) -> Option<MacAddr> {
        None
    }
    pub fn learn_neighbor(&mut self, _port: u16, _addr: Ipv4Addr, _mac: MacAddr, _now: Tick) {}
    pub fn take_learned(&mut self) -> impl Iterator<Item = (u16, Ipv4Addr, MacAddr)> {
        std::iter::empty()
    }
    pub fn housekeeping(&mut self, _now: Tick, _emit: &mut dyn FnMut(u16, &[u8])) {}
    pub fn conntrack(&self) -> &crate::conntrack::Conntrack {
        unimplemented!()
    }
}
pub fn flow_hash(_k: &crate::conntrack::FlowKey) -> u64 { 0 }
