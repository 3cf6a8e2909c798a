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
pub struct PipelineConfig;
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
