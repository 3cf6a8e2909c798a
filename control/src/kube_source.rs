//! The `kubernetes` service source: kube-rs watchers + reflector stores on `v1/Service` and
//! `discovery.k8s.io/v1/EndpointSlice`, publishing a complete [`Model`] on every change.
//!
//! Semantics (kube-semantics.md item 13):
//! - nothing is published before BOTH initial lists are complete (`Event::InitDone` of each);
//! - after that, applied events (`Apply`, `Delete`, `InitDone` of a relist) rebuild the
//!   whole model from both stores (level-triggered) and publish it with `send_replace`:
//!   once per batch of events that are ready together (up to [`BATCH_EVENTS`]), so a burst
//!   costs one rebuild while a lone change is published at once;
//! - a `410 Gone` (expired resourceVersion) makes kube's watcher relist (`State::Empty`); the
//!   reflector buffers the relist and swaps it in atomically at `InitDone`, so no model sent
//!   during a relist lacks objects;
//! - while the API server is unreachable the watchers back off and retry
//!   (`default_backoff`: 0.8 s doubling to 30 s, with jitter); errors never touch the stores,
//!   so the last model stays in force and nothing is sent until the API answers again.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use futures::stream::{self, BoxStream};
use futures::{FutureExt as _, StreamExt};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::reflector::{self, Store};
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
}

/// Most watcher events applied before one model is built and published, so that a
/// continuous storm still publishes regularly.
const BATCH_EVENTS: usize = 1024;

/// Which of the two watched kinds an event came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Service,
    EndpointSlice,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
        }
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
) -> (Store<K>, BoxStream<'static, (Kind, Step)>)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync,
    K: 'static,
{
    let (reader, writer) = reflector::store::<K>();
    let stream = watcher(api, wc)
        .default_backoff()
        .modify(|obj: &mut K| {
            obj.managed_fields_mut().clear();
        })
        .reflect(writer)
        .map(move |ev| (kind, classify(ev)))
        .boxed();
    (reader, stream)
}

/// Rebuild the whole model from both stores.
fn build_model(services: &Store<Service>, slices: &Store<EndpointSlice>) -> Model {
    let mut model = Model::default();
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

/// Run the `kubernetes` source until the watch streams end (they normally never do).
///
/// Publishes `Some(model)` on `updates` only once both initial lists are complete, then after
/// every batch of changes that arrived together. Errors from the API server are logged and retried with backoff; they never
/// cause a model to be sent. Returns an error only if the client cannot be built.
pub async fn run(
    config: KubeSourceConfig,
    updates: watch::Sender<Option<Arc<Model>>>,
) -> anyhow::Result<()> {
    let client = make_client(&config).await?;
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
        "kubernetes source: watching Services and EndpointSlices"
    );

    let (services, svc_stream) = reflected(services_api, wc.clone(), Kind::Service);
    let (slices, eps_stream) = reflected(slices_api, wc, Kind::EndpointSlice);
    let mut merged = stream::select_all([svc_stream, eps_stream]);

    let mut svc_state = KindState::default();
    let mut eps_state = KindState::default();
    let mut published = 0u64;

    while let Some(first) = merged.next().await {
        // Apply every event that is already here before rebuilding: a burst of changes
        // (a Deployment rolling, a relist's aftermath) costs one model, not one per event,
        // while a lone change is published at once.
        let mut changed = false;
        let mut next = Some(first);
        let mut taken = 0;
        while let Some((kind, step)) = next {
            let state = match kind {
                Kind::Service => &mut svc_state,
                Kind::EndpointSlice => &mut eps_state,
            };
            changed |= apply_step(kind, step, state);
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
        if !(svc_state.ready && eps_state.ready) {
            tracing::debug!(
                services_ready = svc_state.ready,
                endpoint_slices_ready = eps_state.ready,
                "kubernetes source: waiting for both initial lists before publishing"
            );
            continue;
        }
        let model = build_model(&services, &slices);
        if published == 0 {
            tracing::info!(
                services = model.services.len(),
                endpoint_slices = model.endpoint_slices.len(),
                "kubernetes source: both initial lists complete, publishing first model"
            );
        } else {
            tracing::debug!(
                services = model.services.len(),
                endpoint_slices = model.endpoint_slices.len(),
                "kubernetes source: publishing model"
            );
        }
        published += 1;
        updates.send_replace(Some(Arc::new(model)));
    }
    anyhow::bail!("kubernetes source: watch streams ended")
}
