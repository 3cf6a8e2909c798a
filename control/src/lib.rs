//! servicegate's control side: config, service sources, the compiler from Kubernetes objects
//! to a dataplane snapshot, publishing, the admin API, and the `servicegate` binary.
#![forbid(unsafe_code)]

pub mod admin;
pub mod announce;
pub mod app;
pub mod capture;
pub mod compiler;
pub mod config;
pub mod ctl;
pub mod exposition;
pub mod files_source;
pub mod kube_source;
pub mod manifests;
pub mod model;
pub mod nodes;
pub mod packets;
pub mod reload;
pub mod telemetry;
