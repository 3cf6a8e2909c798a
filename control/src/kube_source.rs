//! The `kubernetes` service source: kube-rs watchers + reflector stores on `v1/Service`,
//! `discovery.k8s.io/v1/EndpointSlice` and (with `vxlan.nodes`) `v1/Node`, publishing a
//! complete [`Model`] on every change.
//!
//! Semantics (kube-semantics.md item 13):
//! - nothing is published before EVERY initial list is complete (`Event::InitDone` of each);
//! - after that, applied events (`Apply`, `Delete`, `InitDone` of a relist) rebuild the
//!   whole model from both stores (level-triggered) and publish it with `send_replace`:
//!   once per batch of events that are ready together (up to [`BATCH_EVENTS`]), so a burst
//!   costs one rebuild while a lone change is published at once;
//! - a `410 Gone` (expired resourceVersion) makes kube's watcher relist (`State::Empty`); the
//!   reflector buffers the relist and swaps it in atomically at `InitDone`, so no model sent
//!   during a relist lacks objects;
//! - while the API server is unreachable the watchers back off and retry
//!   ([`BoundedBackoff`]: 0.5 s doubling to 4 s, plus at most 25 % jitter, so a retry is never
//!   more than 5 s away); errors never touch the stores, so the last model stays in force and
//!   nothing is sent until the API answers again. kube's default backoff (0.8 s doubling to
//!   30 s with up to 100 % jitter) could leave the gateway a minute behind an API that was
//!   back; with this one a change made during an outage is in force within about 5 s of
//!   the API's return (plus a relist).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures::stream::{self, BoxStream};
use futures::{FutureExt as _, StreamExt};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::reflector::{self, Store};
use kube::runtime::utils::Backoff;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use crate::model::{Model, ObjectKey};

/// Where and what to watch.
#[derive(Clone, Debug, Default)]
pub struct KubeSourceConfig {
    /// Kubeconfig file to use; `None` infers (`$KUBECONFIG` / `~/.kube/config`, then
    /// in-cluster service account).
    pub kubeconfig: Option<PathBuf>,
    /// Label selector applied to both Services and EndpointSlices (e.g. `gateway=edge`).
    pub label_selector: Option<String>,
    /// Namespace to watch; `None` = all namespaces.
    pub namespace: Option<String>,
    /// Watch `v1/Node` too (all of them: the label selector and namespace are the
    /// Services'), and wait for its initial list as for the others.
    pub watch_nodes: bool,
}

/// Most watcher events applied before one model is built and published, so that a
/// continuous storm still publishes regularly.
const BATCH_EVENTS: usize = 1024;

/// Which of the two watched kinds an event came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The longest wait between two retries, jitter included, of [`BoundedBackoff`].
pub const BACKOFF_LONGEST: Duration = Duration::from_secs(5);

/// Exponential backoff with a hard bound: `FIRST` doubling up to `CAP`, each wait plus up to
/// a quarter of itself of jitter (so that a fleet of gateways does not retry in step), never
/// more than [`BACKOFF_LONGEST`]. Reset by the watcher after every successful event.
#[derive(Clone, Debug)]
pub struct BoundedBackoff {
    next: Duration,
    seed: u64,
}

impl BoundedBackoff {
    const FIRST: Duration = Duration::from_millis(500);
    const CAP: Duration = Duration::from_secs(4);

    pub fn new() -> BoundedBackoff {
        use std::hash::{BuildHasher as _, Hasher as _};
        // A per-process random seed without a new dependency: std's hasher keys are random.
        let seed = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish()
            | 1;
        BoundedBackoff {
            next: Self::FIRST,
            seed,
        }
    }

    /// xorshift64: enough to spread retries, not for secrets.
    fn random(&mut self) -> u64 {
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        self.seed
    }
}

impl Default for BoundedBackoff {
    fn default() -> Self {
        BoundedBackoff::new()
    }
}

impl Iterator for BoundedBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let base = self.next;
        self.next = (self.next * 2).min(Self::CAP);
        let jitter_ms = self.random() % (base.as_millis() as u64 / 4 + 1);
        Some((base + Duration::from_millis(jitter_ms)).min(BACKOFF_LONGEST))
    }
}

impl Backoff for BoundedBackoff {
    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

/// What one watcher event means for the merged loop.
#[derive(Debug)]
enum Step {
    /// A relist began (initial list or after 410 / resume failure): stores untouched so far.
    Init,
    /// An object of a (re)list was buffered; stores untouched until `InitDone`.
    Buffered,
    /// A (re)list completed and was swapped into the store.
    InitDone,
    /// The store changed (`Apply` / `Delete`).
    Changed,
    /// The watch's resourceVersion expired (`410 Gone`): the watcher relists next.
    Expired,
    /// The watcher reported an error; it backs off and retries by itself.
    Error(String),
}

fn classify<K>(ev: Result<watcher::Event<K>, watcher::Error>) -> Step {
    match ev {
        Ok(watcher::Event::Init) => Step::Init,
        Ok(watcher::Event::InitApply(_)) => Step::Buffered,
        Ok(watcher::Event::InitDone) => Step::InitDone,
        Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => Step::Changed,
        Err(watcher::Error::WatchError(status)) if status.code == 410 => Step::Expired,
        Err(e) => Step::Error(error_chain(&e)),
    }
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    s
}

/// Build a kube client from the configuration: an explicit kubeconfig file (any server URL,
/// including plain `http://`), or inference.
async fn make_client(config: &KubeSourceConfig) -> anyhow::Result<Client> {
    let kube_config = match &config.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("loading kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("inferring Kubernetes client configuration")?,
    };
    tracing::info!(server = %kube_config.cluster_url, "kubernetes source: API server");
    Client::try_from(kube_config).context("building Kubernetes client")
}

/// One reflected watcher as a stream of [`Step`]s tagged with its kind, plus its store.
fn reflected<K>(
    api: Api<K>,
    wc: watcher::Config,
    kind: Kind,
    strip: fn(&mut K),
) -> (Store<K>, BoxStream<'static, (Kind, Step)>)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync,
    K: 'static,
{
    let (reader, writer) = reflector::store::<K>();
    let stream = watcher(api, wc)
        .backoff(BoundedBackoff::new())
        .modify(move |obj: &mut K| {
            obj.managed_fields_mut().clear();
            strip(obj);
        })
        .reflect(writer)
        .map(move |ev| (kind, classify(ev)))
        .boxed();
    (reader, stream)
}

/// Rebuild the whole model from the stores.
fn build_model(
    services: &Store<Service>,
    slices: &Store<EndpointSlice>,
    nodes: Option<&Store<Node>>,
) -> Model {
    let mut model = Model::default();
    for node in nodes.map(Store::state).unwrap_or_default() {
        model.nodes.insert(node.name_any(), node);
    }
    for svc in services.state() {
        let key = ObjectKey::new(svc.namespace().unwrap_or_default(), svc.name_any());
        model.services.insert(key, svc);
    }
    for eps in slices.state() {
        let key = ObjectKey::new(eps.namespace().unwrap_or_default(), eps.name_any());
        model.endpoint_slices.insert(key, eps);
    }
    model
}

/// Per-kind state of the merged loop, for readiness and for logging state changes only.
#[derive(Debug, Default)]
struct KindState {
    /// The initial list completed once: the store is complete from now on.
    ready: bool,
    /// The last event was an error (API unreachable / watch failed).
    failing: bool,
    /// A relist is in progress (between `Init` and `InitDone`).
    listing: bool,
}

/// Logs one watcher step and updates its kind's state; true when the kind's store changed.
fn apply_step(kind: Kind, step: Step, state: &mut KindState) -> bool {
    let kind_name = kind.as_str();
    if let Step::Error(err) = &step {
        if !state.failing {
            tracing::warn!(
                kind = kind_name,
                error = %err,
                "kubernetes source: watch failed; backing off and retrying, last model stays in force"
            );
        } else {
            tracing::debug!(kind = kind_name, error = %err, "kubernetes source: still failing");
        }
        state.failing = true;
        return false;
    }
    if state.failing {
        tracing::info!(
            kind = kind_name,
            "kubernetes source: API server answering again"
        );
        state.failing = false;
    }
    match step {
        Step::Init => {
            state.listing = true;
            if state.ready {
                tracing::info!(kind = kind_name, "kubernetes source: relisting");
            } else {
                tracing::info!(kind = kind_name, "kubernetes source: initial list");
            }
            false
        }
        Step::Buffered | Step::Error(_) => false,
        Step::Expired => {
            tracing::info!(
                kind = kind_name,
                "kubernetes source: resourceVersion expired (410 Gone), will relist; last model stays in force"
            );
            false
        }
        Step::InitDone => {
            state.listing = false;
            if state.ready {
                tracing::info!(kind = kind_name, "kubernetes source: relist complete");
            } else {
                tracing::info!(kind = kind_name, "kubernetes source: initial list complete");
            }
            state.ready = true;
            true
        }
        Step::Changed => true,
    }
}

/// Keeps what a Node's routes need: its image list alone can be tens of kilobytes.
fn strip_node(node: &mut Node) {
    if let Some(status) = node.status.as_mut() {
        status.images = None;
        status.conditions = None;
        status.volumes_attached = None;
        status.volumes_in_use = None;
    }
}

/// Run the `kubernetes` source until the watch streams end (they normally never do).
///
/// Publishes `Some(model)` on `updates` only once every initial list is complete, then after
/// every batch of changes that arrived together. Errors from the API server are logged and
/// retried with backoff; they never cause a model to be sent. Returns an error only if the
/// client cannot be built.
pub async fn run(
    config: KubeSourceConfig,
    updates: watch::Sender<Option<Arc<Model>>>,
) -> anyhow::Result<()> {
    let client = make_client(&config).await?;
    let nodes_api: Api<Node> = Api::all(client.clone());
    let (services_api, slices_api): (Api<Service>, Api<EndpointSlice>) = match &config.namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client, ns),
        ),
        None => (Api::all(client.clone()), Api::all(client)),
    };
    let mut wc = watcher::Config::default();
    if let Some(selector) = &config.label_selector {
        wc = wc.labels(selector);
    }
    tracing::info!(
        namespace = config.namespace.as_deref().unwrap_or("<all>"),
        label_selector = config.label_selector.as_deref().unwrap_or(""),
        nodes = config.watch_nodes,
        "kubernetes source: watching Services and EndpointSlices"
    );

    let (services, svc_stream) = reflected(services_api, wc.clone(), Kind::Service, |_| {});
    let (slices, eps_stream) = reflected(slices_api, wc, Kind::EndpointSlice, |_| {});
    let mut streams = vec![svc_stream, eps_stream];
    let nodes = if config.watch_nodes {
        let (nodes, node_stream) = reflected(
            nodes_api,
            watcher::Config::default(),
            Kind::Node,
            strip_node,
        );
        streams.push(node_stream);
        Some(nodes)
    } else {
        None
    };
    let mut merged = stream::select_all(streams);

    let mut states: [KindState; 3] = Default::default();
    // A kind not watched needs no initial list.
    states[Kind::Node.index()].ready = !config.watch_nodes;
    let mut published = 0u64;

    while let Some(first) = merged.next().await {
        // Apply every event that is already here before rebuilding: a burst of changes
        // (a Deployment rolling, a relist's aftermath) costs one model, not one per event,
        // while a lone change is published at once.
        let mut changed = false;
        let mut next = Some(first);
        let mut taken = 0;
        while let Some((kind, step)) = next {
            changed |= apply_step(kind, step, &mut states[kind.index()]);
            taken += 1;
            next = if taken < BATCH_EVENTS {
                merged.next().now_or_never().flatten()
            } else {
                None
            };
        }
        if !changed {
            continue;
        }
        if !states.iter().all(|s| s.ready) {
            tracing::debug!(
                services_ready = states[Kind::Service.index()].ready,
                endpoint_slices_ready = states[Kind::EndpointSlice.index()].ready,
                nodes_ready = states[Kind::Node.index()].ready,
                "kubernetes source: waiting for every initial list before publishing"
            );
            continue;
        }
        let model = build_model(&services, &slices, nodes.as_ref());
        if published == 0 {
            tracing::info!(
                services = model.services.len(),
                endpoint_slices = model.endpoint_slices.len(),
                nodes = model.nodes.len(),
                "kubernetes source: every initial list complete, publishing first model"
            );
        } else {
            tracing::debug!(
                services = model.services.len(),
                endpoint_slices = model.endpoint_slices.len(),
                nodes = model.nodes.len(),
                "kubernetes source: publishing model"
            );
        }
        published += 1;
        updates.send_replace(Some(Arc::new(model)));
    }
    anyhow::bail!("kubernetes source: watch streams ended")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_and_never_waits_longer_than_the_bound() {
        let mut backoff = BoundedBackoff::new();
        let waits: Vec<Duration> = backoff.by_ref().take(1000).collect();
        assert!(waits[0] >= BoundedBackoff::FIRST && waits[0] <= BoundedBackoff::FIRST * 5 / 4);
        assert!(waits.iter().all(|w| *w <= BACKOFF_LONGEST), "{waits:?}");
        assert!(waits[10..].iter().all(|w| *w >= BoundedBackoff::CAP));
        // Jitter varies the waits.
        assert!(waits[10..].iter().any(|w| *w != waits[10]));
        backoff.reset();
        assert!(backoff.next().unwrap() <= BoundedBackoff::FIRST * 5 / 4);
    }
}
