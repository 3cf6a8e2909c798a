//! A fake Kubernetes API server speaking enough of the list/watch protocol for the real
//! kube-rs client over plain HTTP on loopback.
//!
//! Served (GET only):
//! - `/api/v1/services`, `/api/v1/namespaces/{ns}/services`
//! - `/apis/discovery.k8s.io/v1/endpointslices`,
//!   `/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices`
//! - `/api/v1/nodes` (cluster-scoped)
//! - `/api`, `/apis`, `/version` (minimal discovery)
//!
//! Lists honour `limit` + `continue` (consistent snapshot per paginated list, like etcd) and
//! `labelSelector` (`k=v`, `k==v`, `k!=v`, `k`, `!k`); the collection carries
//! `metadata.resourceVersion`. `?watch=true|1` streams newline-delimited watch events with
//! `resourceVersion` > the given one (replayed from an event log, then live),
//! `allowWatchBookmarks=true` adds periodic `BOOKMARK`s, `timeoutSeconds` ends the stream.
//! A watch from a resourceVersion older than the last [`FakeApiServer::expire_watches_with_410`]
//! answers a `410 Expired` ERROR event, like a compacted etcd.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Body;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{broadcast, mpsc};
use tokio::task::{JoinHandle, JoinSet};

/// The resource kinds the fake server knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    fn index(self) -> usize {
        match self {
            Kind::Service => 0,
            Kind::EndpointSlice => 1,
            Kind::Node => 2,
        }
    }
    fn api_version(self) -> &'static str {
        match self {
            Kind::Service | Kind::Node => "v1",
            Kind::EndpointSlice => "discovery.k8s.io/v1",
        }
    }
    fn kind(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        }
    }
    fn list_kind(self) -> &'static str {
        match self {
            Kind::Service => "ServiceList",
            Kind::EndpointSlice => "EndpointSliceList",
            Kind::Node => "NodeList",
        }
    }
    fn namespaced(self) -> bool {
        self != Kind::Node
    }
}

/// One change, as recorded in the event log and broadcast to watchers.
#[derive(Debug)]
struct Change {
    rv: u64,
    kind: Kind,
    /// Object before the change (`None` = created).
    old: Option<Value>,
    /// Object after the change (`None` = deleted; `old` then carries the new resourceVersion).
    new: Option<Value>,
}

#[derive(Clone, Debug)]
enum Msg {
    Change(Arc<Change>),
    /// Send `410 Expired` and close.
    Expire,
    /// Close without an error.
    Close,
}

type Key = (String, String);

#[derive(Default)]
struct State {
    rv: u64,
    /// Watches from a resourceVersion below this answer 410.
    compacted: u64,
    objects: [BTreeMap<Key, Value>; 3],
    log: Vec<Arc<Change>>,
    max_page: Option<usize>,
    list_delay: [Duration; 3],
    /// Paginated list snapshots: id -> (resourceVersion, items).
    pages: HashMap<u64, (u64, Arc<Vec<Value>>)>,
    next_page_id: u64,
}

struct Inner {
    state: Mutex<State>,
    events: broadcast::Sender<Msg>,
    lists: AtomicU64,
    list_pages: AtomicU64,
    watches: AtomicU64,
    bookmark_interval: Mutex<Duration>,
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A fake Kubernetes API server on `127.0.0.1:<random port>`.
pub struct FakeApiServer {
    inner: Arc<Inner>,
    addr: SocketAddr,
    accept: Mutex<Option<JoinHandle<()>>>,
}

impl FakeApiServer {
    /// Bind `127.0.0.1:0` and start serving.
    pub async fn start() -> FakeApiServer {
        let (events, _) = broadcast::channel(4096);
        let inner = Arc::new(Inner {
            state: Mutex::new(State::default()),
            events,
            lists: AtomicU64::new(0),
            list_pages: AtomicU64::new(0),
            watches: AtomicU64::new(0),
            bookmark_interval: Mutex::new(Duration::from_secs(1)),
        });
        let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0))).expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local_addr");
        let handle = tokio::spawn(accept_loop(inner.clone(), listener));
        FakeApiServer {
            inner,
            addr,
            accept: Mutex::new(Some(handle)),
        }
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Write a kubeconfig pointing at this server into `dir`; returns its path.
    pub fn write_kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\n\
             current-context: fake\nusers:\n- name: fake\n  user: {{}}\n",
            self.url()
        );
        std::fs::write(&path, text).expect("write kubeconfig");
        path
    }

    /// Create or replace a Service; returns the new resourceVersion.
    pub fn apply_service(&self, svc: Service) -> u64 {
        self.apply(Kind::Service, serde_json::to_value(svc).expect("serialize"))
    }

    /// Delete a Service; returns the new resourceVersion, `None` if it did not exist.
    pub fn delete_service(&self, namespace: &str, name: &str) -> Option<u64> {
        self.delete(Kind::Service, namespace, name)
    }

    /// Create or replace an EndpointSlice; returns the new resourceVersion.
    pub fn apply_endpoint_slice(&self, eps: EndpointSlice) -> u64 {
        self.apply(
            Kind::EndpointSlice,
            serde_json::to_value(eps).expect("serialize"),
        )
    }

    /// Delete an EndpointSlice; returns the new resourceVersion, `None` if it did not exist.
    pub fn delete_endpoint_slice(&self, namespace: &str, name: &str) -> Option<u64> {
        self.delete(Kind::EndpointSlice, namespace, name)
    }

    /// Create or replace a Node (cluster-scoped); returns the new resourceVersion.
    pub fn apply_node(&self, node: Node) -> u64 {
        self.apply(Kind::Node, serde_json::to_value(node).expect("serialize"))
    }

    /// Delete a Node; returns the new resourceVersion, `None` if it did not exist.
    pub fn delete_node(&self, name: &str) -> Option<u64> {
        self.delete(Kind::Node, "", name)
    }

    fn apply(&self, kind: Kind, mut obj: Value) -> u64 {
        let mut st = self.inner.state();
        st.rv += 1;
        let rv = st.rv;
        obj["apiVersion"] = json!(kind.api_version());
        obj["kind"] = json!(kind.kind());
        let meta = &mut obj["metadata"];
        if !kind.namespaced() {
            if let Some(meta) = meta.as_object_mut() {
                meta.remove("namespace");
            }
        } else if meta.get("namespace").and_then(Value::as_str).is_none() {
            meta["namespace"] = json!("default");
        }
        let key: Key = (
            meta["namespace"].as_str().unwrap_or_default().to_owned(),
            meta["name"].as_str().expect("object has a name").to_owned(),
        );
        meta["resourceVersion"] = json!(rv.to_string());
        if meta.get("uid").and_then(Value::as_str).is_none() {
            let uid = st.objects[kind.index()]
                .get(&key)
                .and_then(|o| o["metadata"]["uid"].as_str().map(str::to_owned))
                .unwrap_or_else(|| format!("uid-{}-{}-{rv}", key.0, key.1));
            meta["uid"] = json!(uid);
        }
        let old = st.objects[kind.index()].insert(key, obj.clone());
        self.record(
            &mut st,
            Change {
                rv,
                kind,
                old,
                new: Some(obj),
            },
        );
        rv
    }

    fn delete(&self, kind: Kind, namespace: &str, name: &str) -> Option<u64> {
        let mut st = self.inner.state();
        let mut old = st.objects[kind.index()].remove(&(namespace.to_owned(), name.to_owned()))?;
        st.rv += 1;
        let rv = st.rv;
        old["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.record(
            &mut st,
            Change {
                rv,
                kind,
                old: Some(old),
                new: None,
            },
        );
        Some(rv)
    }

    /// Log and broadcast while holding the state lock, so watch setup (which also holds it)
    /// sees every change either in the log or live, never both nor neither.
    fn record(&self, st: &mut State, change: Change) {
        let change = Arc::new(change);
        st.log.push(change.clone());
        let _ = self.inner.events.send(Msg::Change(change));
    }

    /// Current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.inner.state().rv
    }

    /// Compact: every open watch gets a `410 Expired` ERROR event and is closed; any watch
    /// from an older resourceVersion answers 410 as well, so clients must relist.
    pub fn expire_watches_with_410(&self) {
        let mut st = self.inner.state();
        // Watches from the current resourceVersion would still be valid after a real
        // compaction; bump it so every client's last-seen version is too old.
        st.rv += 1;
        st.compacted = st.rv;
        st.log.clear();
        st.pages.clear();
        let _ = self.inner.events.send(Msg::Expire);
    }

    /// Close every open watch stream cleanly (clients resume from their resourceVersion).
    pub fn close_watches(&self) {
        let _st = self.inner.state();
        let _ = self.inner.events.send(Msg::Close);
    }

    /// `true`: drop the listener and every open connection (clients get connection refused).
    /// `false`: bind the same port again and serve.
    pub async fn set_down(&self, down: bool) {
        if down {
            let handle = self.accept.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(handle) = handle {
                handle.abort();
                let _ = handle.await;
            }
            let _ = self.inner.events.send(Msg::Close);
        } else {
            if self
                .accept
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some()
            {
                return;
            }
            let mut tries = 0;
            let listener = loop {
                match bind(self.addr) {
                    Ok(l) => break l,
                    Err(e) if tries < 50 => {
                        tries += 1;
                        tracing::debug!(error = %e, "fake apiserver: rebind failed, retrying");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => panic!("rebind {}: {e}", self.addr),
                }
            };
            let handle = tokio::spawn(accept_loop(self.inner.clone(), listener));
            *self.accept.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
        }
    }

    /// Cap every list page at `n` items, whatever `limit` the client asked for (the API
    /// server may return fewer than `limit`; clients must follow `continue`).
    pub fn set_max_page_size(&self, n: Option<usize>) {
        self.inner.state().max_page = n;
    }

    /// Delay every list of `kind` by `delay` before answering.
    pub fn set_list_delay(&self, kind: Kind, delay: Duration) {
        self.inner.state().list_delay[kind.index()] = delay;
    }

    /// Interval between BOOKMARK events on watches that allow them.
    pub fn set_bookmark_interval(&self, interval: Duration) {
        *self
            .inner
            .bookmark_interval
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = interval;
    }

    /// Complete lists served (first pages).
    pub fn lists_served(&self) -> u64 {
        self.inner.lists.load(Ordering::SeqCst)
    }

    /// List pages served (first and continued).
    pub fn list_pages_served(&self) -> u64 {
        self.inner.list_pages.load(Ordering::SeqCst)
    }

    /// Watches started (including ones answered with 410).
    pub fn watches_served(&self) -> u64 {
        self.inner.watches.load(Ordering::SeqCst)
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        if let Some(h) = self.accept.lock().unwrap_or_else(|e| e.into_inner()).take() {
            h.abort();
        }
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(128)
}

/// Accept connections; aborting this task drops the listener and (through the JoinSet)
/// every connection it spawned.
async fn accept_loop(inner: Arc<Inner>, listener: TcpListener) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let inner = inner.clone();
                conns.spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let inner = inner.clone();
                        async move { Ok::<_, Infallible>(handle(inner, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .expect("response")
}

fn status_body(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "reason": reason, "code": code, "message": message,
    })
}

fn error_response(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    json_response(code, &status_body(code.as_u16(), reason, message))
}

async fn handle(inner: Arc<Inner>, req: Request<Incoming>) -> Response<Body> {
    if req.method() != hyper::Method::GET {
        return error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "only GET is served",
        );
    }
    let path = req.uri().path().to_owned();
    let query: HashMap<String, String> =
        form_urlencoded::parse(req.uri().query().unwrap_or_default().as_bytes())
            .into_owned()
            .collect();
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (kind, ns) = match segs.as_slice() {
        ["version"] => {
            return json_response(
                StatusCode::OK,
                &json!({"major": "1", "minor": "34", "gitVersion": "v1.34.0-fake", "platform": "linux/amd64"}),
            )
        }
        ["api"] => {
            return json_response(
                StatusCode::OK,
                &json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}),
            )
        }
        ["apis"] => {
            return json_response(
                StatusCode::OK,
                &json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [{
                    "name": "discovery.k8s.io",
                    "versions": [{"groupVersion": "discovery.k8s.io/v1", "version": "v1"}],
                    "preferredVersion": {"groupVersion": "discovery.k8s.io/v1", "version": "v1"},
                }]}),
            )
        }
        ["api", "v1", "services"] => (Kind::Service, None),
        ["api", "v1", "nodes"] => (Kind::Node, None),
        ["api", "v1", "namespaces", ns, "services"] => (Kind::Service, Some(ns.to_string())),
        ["apis", "discovery.k8s.io", "v1", "endpointslices"] => (Kind::EndpointSlice, None),
        ["apis", "discovery.k8s.io", "v1", "namespaces", ns, "endpointslices"] => {
            (Kind::EndpointSlice, Some(ns.to_string()))
        }
        _ => {
            return error_response(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("the server could not find the requested resource ({path})"),
            )
        }
    };
    let selector = match query.get("labelSelector") {
        Some(s) => match Selector::parse(s) {
            Ok(sel) => sel,
            Err(e) => return error_response(StatusCode::BAD_REQUEST, "BadRequest", &e),
        },
        None => Selector::default(),
    };
    let filter = Filter { kind, ns, selector };
    let watch = matches!(
        query.get("watch").map(String::as_str),
        Some("true" | "1" | "True")
    );
    if watch {
        watch_response(inner, filter, &query)
    } else {
        list_response(inner, filter, &query).await
    }
}

struct Filter {
    kind: Kind,
    ns: Option<String>,
    selector: Selector,
}

impl Filter {
    fn matches(&self, obj: &Value) -> bool {
        if let Some(ns) = &self.ns {
            if obj["metadata"]["namespace"].as_str() != Some(ns) {
                return false;
            }
        }
        self.selector.matches(&obj["metadata"]["labels"])
    }
}

#[derive(Default)]
struct Selector {
    /// (key, op, value): op is `=`, `!=`, `exists`, `!exists`.
    reqs: Vec<(String, &'static str, String)>,
}

impl Selector {
    fn parse(s: &str) -> Result<Selector, String> {
        let mut reqs = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            if let Some((k, v)) = part.split_once("!=") {
                reqs.push((k.trim().to_owned(), "!=", v.trim().to_owned()));
            } else if let Some((k, v)) = part.split_once("==") {
                reqs.push((k.trim().to_owned(), "=", v.trim().to_owned()));
            } else if let Some((k, v)) = part.split_once('=') {
                reqs.push((k.trim().to_owned(), "=", v.trim().to_owned()));
            } else if let Some(k) = part.strip_prefix('!') {
                reqs.push((k.trim().to_owned(), "!exists", String::new()));
            } else if part.contains(' ') || part.contains('(') {
                return Err(format!("unsupported label selector {s:?}"));
            } else {
                reqs.push((part.to_owned(), "exists", String::new()));
            }
        }
        Ok(Selector { reqs })
    }

    fn matches(&self, labels: &Value) -> bool {
        self.reqs.iter().all(|(k, op, v)| {
            let got = labels.get(k).and_then(Value::as_str);
            match *op {
                "=" => got == Some(v.as_str()),
                "!=" => got != Some(v.as_str()),
                "exists" => got.is_some(),
                _ => got.is_none(),
            }
        })
    }
}

async fn list_response(
    inner: Arc<Inner>,
    filter: Filter,
    query: &HashMap<String, String>,
) -> Response<Body> {
    inner.list_pages.fetch_add(1, Ordering::SeqCst);
    if query.get("continue").is_none_or(String::is_empty) {
        inner.lists.fetch_add(1, Ordering::SeqCst);
    }
    let delay = inner.state().list_delay[filter.kind.index()];
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let limit = query
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|&l| l > 0);
    let mut st = inner.state();
    let limit = match (limit, st.max_page) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let (id, offset, rv, items) = match query.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => {
            let parsed = token
                .split_once(':')
                .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<usize>().ok()?)));
            let Some((id, offset)) = parsed else {
                return error_response(StatusCode::BAD_REQUEST, "BadRequest", "invalid continue");
            };
            let Some((rv, items)) = st.pages.get(&id).cloned() else {
                return error_response(
                    StatusCode::GONE,
                    "Expired",
                    "The provided continue parameter is too old to display a consistent list result.",
                );
            };
            (id, offset, rv, items)
        }
        None => {
            let items: Vec<Value> = st.objects[filter.kind.index()]
                .values()
                .filter(|o| filter.matches(o))
                .cloned()
                .collect();
            let id = st.next_page_id;
            st.next_page_id += 1;
            (id, 0, st.rv, Arc::new(items))
        }
    };
    let end = match limit {
        Some(l) => (offset + l).min(items.len()),
        None => items.len(),
    };
    let page: Vec<Value> = items[offset.min(end)..end].to_vec();
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if end < items.len() {
        st.pages.insert(id, (rv, items.clone()));
        metadata["continue"] = json!(format!("{id}:{end}"));
        metadata["remainingItemCount"] = json!(items.len() - end);
    } else {
        st.pages.remove(&id);
    }
    drop(st);
    json_response(
        StatusCode::OK,
        &json!({
            "kind": filter.kind.list_kind(),
            "apiVersion": filter.kind.api_version(),
            "metadata": metadata,
            "items": page,
        }),
    )
}

fn event_line(typ: &str, obj: &Value) -> String {
    let mut s = json!({"type": typ, "object": obj}).to_string();
    s.push('\n');
    s
}

fn expired_line() -> String {
    event_line(
        "ERROR",
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "reason": "Expired", "code": 410, "message": "too old resource version"}),
    )
}

/// The watch event (type, object) `filter` sees for `change`, if any: label changes move
/// objects in and out of a selector as ADDED / DELETED, like the real API server.
fn view(filter: &Filter, change: &Change) -> Option<(&'static str, Value)> {
    if change.kind != filter.kind {
        return None;
    }
    let old_in = change.old.as_ref().is_some_and(|o| filter.matches(o));
    match &change.new {
        Some(new) => match (old_in, filter.matches(new)) {
            (true, true) => Some(("MODIFIED", new.clone())),
            (false, true) => Some(("ADDED", new.clone())),
            (true, false) => {
                let mut gone = change.old.clone().unwrap_or_default();
                gone["metadata"]["resourceVersion"] = json!(change.rv.to_string());
                Some(("DELETED", gone))
            }
            (false, false) => None,
        },
        None => old_in.then(|| ("DELETED", change.old.clone().unwrap_or_default())),
    }
}

fn watch_response(
    inner: Arc<Inner>,
    filter: Filter,
    query: &HashMap<String, String>,
) -> Response<Body> {
    inner.watches.fetch_add(1, Ordering::SeqCst);
    let from: Option<u64> = query
        .get("resourceVersion")
        .filter(|v| !v.is_empty() && v.as_str() != "0")
        .and_then(|v| v.parse().ok());
    let bookmarks = matches!(
        query.get("allowWatchBookmarks").map(String::as_str),
        Some("true" | "1")
    );
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(1800));
    let bookmark_interval = *inner
        .bookmark_interval
        .lock()
        .unwrap_or_else(|e| e.into_inner());

    let (tx, rx) = mpsc::channel::<String>(1024);
    // Under the state lock: decide 410, collect the replay, subscribe to live changes.
    let (initial, start_rv, mut live) = {
        let st = inner.state();
        let live = inner.events.subscribe();
        match from {
            Some(rv) if rv < st.compacted => (vec![expired_line()], rv, None),
            Some(rv) => {
                let lines = st
                    .log
                    .iter()
                    .filter(|c| c.rv > rv)
                    .filter_map(|c| view(&filter, c))
                    .map(|(t, o)| event_line(t, &o))
                    .collect();
                (lines, rv.max(st.rv), Some(live))
            }
            None => {
                let lines = st.objects[filter.kind.index()]
                    .values()
                    .filter(|o| filter.matches(o))
                    .map(|o| event_line("ADDED", o))
                    .collect();
                (lines, st.rv, Some(live))
            }
        }
    };
    tokio::spawn(async move {
        for line in initial {
            if tx.send(line).await.is_err() {
                return;
            }
        }
        let Some(live) = live.as_mut() else { return };
        let mut last_rv = start_rv;
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut tick = tokio::time::interval(bookmark_interval);
        tick.tick().await;
        loop {
            let line = tokio::select! {
                msg = live.recv() => match msg {
                    Ok(Msg::Change(change)) => {
                        if change.rv <= last_rv {
                            continue;
                        }
                        last_rv = change.rv;
                        match view(&filter, &change) {
                            Some((t, o)) => event_line(t, &o),
                            None => continue,
                        }
                    }
                    Ok(Msg::Expire) | Err(broadcast::error::RecvError::Lagged(_)) => {
                        let _ = tx.send(expired_line()).await;
                        return;
                    }
                    Ok(Msg::Close) | Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = tick.tick(), if bookmarks => event_line(
                    "BOOKMARK",
                    &json!({"kind": filter.kind.kind(), "apiVersion": filter.kind.api_version(),
                            "metadata": {"resourceVersion": last_rv.to_string()}}),
                ),
                _ = &mut deadline => return,
                _ = tx.closed() => return,
            };
            if tx.send(line).await.is_err() {
                return;
            }
        }
    });
    let body = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|line| (Ok::<_, Infallible>(line), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(Body::from_stream(body))
        .expect("response")
}
