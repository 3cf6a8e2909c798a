//! The in-memory model every service source produces: the Services and EndpointSlices it
//! currently knows, as Kubernetes objects. The `kubernetes` source (kube-rs reflectors) and
//! the `files` source (YAML manifests) both publish a complete `Model` whenever anything
//! changed, and only after their initial lists are complete; the compiler does not know
//! which source it has (level-triggered: "rebuild what changed", not "apply this delta").

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// `namespace/name` of an object.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ObjectKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The kinds of object a model holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ObjectKind {
    Service,
    EndpointSlice,
}

impl ObjectKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ObjectKind::Service => "Service",
            ObjectKind::EndpointSlice => "EndpointSlice",
        }
    }
}

impl std::fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything a source knows at one instant.
#[derive(Clone, Debug, Default)]
pub struct Model {
    pub services: BTreeMap<ObjectKey, Arc<Service>>,
    pub endpoint_slices: BTreeMap<ObjectKey, Arc<EndpointSlice>>,
    /// The cluster's `v1/Node`s by name, when the `kubernetes` source watches them
    /// (`vxlan.nodes`); empty otherwise.
    pub nodes: BTreeMap<String, Arc<Node>>,
    /// Where each object was read from, as messages name it
    /// (`services.yaml: document 2 (Service lab/web)`), so that a warning about an object
    /// names its file. The `files` source fills it; the `kubernetes` source has no files.
    pub origins: BTreeMap<(ObjectKind, ObjectKey), String>,
    /// What the source could not use (a manifest document that does not parse, an object
    /// defined twice, a manifest path that disappeared): everything else is in the model.
    /// The admin API lists them with the compiler's warnings and counts them per file and
    /// reason.
    pub problems: Vec<SourceProblem>,
}

/// One thing a source could not use, e.g. a manifest document that does not parse.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceProblem {
    /// The file it is in (or the manifest path, for a path that cannot be listed).
    pub file: String,
    /// A short stable label for metrics: `syntax`, `too_deep`, `too_large`, `not_an_object`,
    /// `missing_field`, `invalid_field`, `duplicate`, `unreadable`, `path_unreadable`.
    pub reason: &'static str,
    /// The one-line message for people, naming the file, the document and the cause.
    pub message: String,
}

impl std::fmt::Display for SourceProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl Model {
    /// How messages name an object: where it was read from when known, else
    /// `Kind namespace/name`.
    pub fn describe(&self, kind: ObjectKind, key: &ObjectKey) -> String {
        match self.origins.get(&(kind, key.clone())) {
            Some(origin) => origin.clone(),
            None => format!("{kind} {key}"),
        }
    }
}
