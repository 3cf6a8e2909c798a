//! The in-memory model every service source produces: the Services and EndpointSlices it
//! currently knows, as Kubernetes objects. The `kubernetes` source (kube-rs reflectors) and
//! the `files` source (YAML manifests) both publish a complete `Model` whenever anything
//! changed, and only after their initial lists are complete; the compiler does not know
//! which source it has (level-triggered: "rebuild what changed", not "apply this delta").

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;
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

/// Everything a source knows at one instant.
#[derive(Clone, Debug, Default)]
pub struct Model {
    pub services: BTreeMap<ObjectKey, Arc<Service>>,
    pub endpoint_slices: BTreeMap<ObjectKey, Arc<EndpointSlice>>,
}
