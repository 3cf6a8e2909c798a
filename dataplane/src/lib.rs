//! servicegate's dataplane: what happens to a packet between `rx_burst` and `tx_burst`.
//!
//! Modules follow the path of a packet: `wire` (header views) → `pipeline` (the stages) →
//! `conntrack` / `maglev` (flow state and backend choice) over the tables of `snapshot`.
//! `dpdk` is the only place that talks to DPDK and the only module allowed `unsafe`.
#![deny(unsafe_code)]

pub mod conntrack;
pub mod frame;
pub mod maglev;
pub mod pipeline;
pub mod snapshot;
pub mod stats;
pub mod wire;

#[cfg(feature = "dpdk")]
pub mod dpdk;
