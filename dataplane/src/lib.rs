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
#[cfg(feature = "dpdk")]
pub mod runtime;

/// A cache prefetch hint and a huge-page hint; without DPDK (fuzzing) they do nothing.
#[cfg(feature = "dpdk")]
pub(crate) use dpdk::{advise_huge_pages, prefetch_read};
#[cfg(not(feature = "dpdk"))]
pub(crate) fn advise_huge_pages<T>(_region: &mut [std::mem::MaybeUninit<T>]) {}
#[cfg(not(feature = "dpdk"))]
#[inline(always)]
pub(crate) fn prefetch_read<T>(_value: &T) {}
#[cfg(feature = "dpdk")]
pub mod worker;
