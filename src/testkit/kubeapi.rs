//! A small fake Kubernetes API server for tests and the soak: the pods API only, speaking the real list/watch
//! JSON over real HTTP/1.1, so the real `kube` client (and `kube::runtime::watcher`) can be driven
//! against it through a kubeconfig.
//!
//! What it models, as kube-apiserver does:
//! - `GET /api/v1/pods` and `GET /api/v1/namespaces/{ns}/pods[/{name}]` with equality-based
//!   `labelSelector` and `fieldSelector` (`spec.nodeName`, `metadata.name`, `metadata.namespace`,
//!   `status.phase`); `limit`/`continue` are accepted and everything is returned in one page.
//! - One global, monotonic `resourceVersion` (an integer as a string) bumped by every change.
//! - Watches (`watch=true`) stream newline-delimited `WatchEvent`s in a chunked 200 response:
//!   events newer than the requested `resourceVersion` (a pod that stops matching the selector is
//!   a `DELETED` for that watcher, one that starts matching an `ADDED`), `BOOKMARK`s about every
//!   second when `allowWatchBookmarks=true`, the end after `timeoutSeconds`. Without a
//!   `resourceVersion` (or with "0") or with `sendInitialEvents=true` the current state comes first
//!   as synthetic `ADDED` events (the latter closed by the `k8s.io/initial-events-end` bookmark).
//! - A watch from a `resourceVersion` older than the retained history (see
//!   [`FakeApi::expire_history`]) gets one `ERROR` event carrying the 410 `Expired` Status and ends,
//!   which is what the real server does and what makes clients relist.
//! - [`FakeApi::set_down`] cuts every open connection and resets new ones until it comes back.
//!
//! Self-contained (std, serde_json, tokio, hyper, hyper-util, bytes), with its own tokio runtime,
//! so it works from plain `#[test]`s and from `#[tokio::test]`s alike.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Map, Value, json};
use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;

/// The resourceVersion of the empty store; the first change gets this plus one.
const INITIAL_RESOURCE_VERSION: u64 = 1000;
/// Watch duration when the client does not send `timeoutSeconds`.
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(290);
/// How often a watch with `allowWatchBookmarks=true` gets a BOOKMARK.
const BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);

/// A fake kube-apiserver serving the pods API on 127.0.0.1; stops its server on drop.
pub struct FakeApi {
    shared: Arc<Shared>,
    addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
}

struct Shared {
    store: Mutex<Store>,
    /// The current resourceVersion, to wake watchers after a change.
    changed: watch::Sender<u64>,
}

struct Store {
    pods: BTreeMap<String, Value>,
    resource_version: u64,
    /// Watches from a resourceVersion older than this get 410 Expired.
    oldest_watchable: u64,
    history: Vec<Change>,
    requests: Vec<String>,
    down: bool,
    connections: HashMap<u64, AbortHandle>,
    next_connection: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum ChangeKind {
    Added,
    Modified,
    Deleted,
}

struct Change {
    resource_version: u64,
    kind: ChangeKind,
    /// The new state; for a deletion the last state with the deletion's resourceVersion.
    object: Value,
    /// The state before a modification.
    previous: Option<Value>,
}

fn lock(store: &Mutex<Store>) -> MutexGuard<'_, Store> {
    store
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl FakeApi {
    /// Binds 127.0.0.1 on an ephemeral port and serves from a background runtime.
    pub fn start() -> FakeApi {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("fake-kubeapi")
            .enable_all()
            .build()
            .expect("fake kube-apiserver runtime");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let addr = listener.local_addr().expect("listener address");
        let listener = {
            let _entered = runtime.enter();
            tokio::net::TcpListener::from_std(listener).expect("tokio listener")
        };
        let (changed, _) = watch::channel(INITIAL_RESOURCE_VERSION);
        let shared = Arc::new(Shared {
            store: Mutex::new(Store {
                pods: BTreeMap::new(),
                resource_version: INITIAL_RESOURCE_VERSION,
                oldest_watchable: 0,
                history: Vec::new(),
                requests: Vec::new(),
                down: false,
                connections: HashMap::new(),
                next_connection: 0,
            }),
            changed,
        });
        runtime.spawn(accept_loop(listener, shared.clone()));
        FakeApi {
            shared,
            addr,
            runtime: Some(runtime),
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes `dir/kubeconfig`: one cluster (server = [`FakeApi::url`]), a token user and a
    /// current context joining them.
    pub fn write_kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1
kind: Config
clusters:
- name: fake
  cluster:
    server: {url}
users:
- name: fake
  user:
    token: fake-token
contexts:
- name: fake
  context:
    cluster: fake
    user: fake
    namespace: default
current-context: fake
preferences: {{}}
",
            url = self.url()
        );
        std::fs::write(&path, text).expect("write kubeconfig");
        path
    }

    /// Creates or replaces a pod, keyed by `metadata.uid`: an ADDED or MODIFIED event with a new
    /// resourceVersion.
    pub fn apply(&self, mut pod: Value) {
        let uid = pod["metadata"]["uid"]
            .as_str()
            .filter(|uid| !uid.is_empty())
            .expect("pod needs metadata.uid")
            .to_owned();
        let object = pod.as_object_mut().expect("pod must be a JSON object");
        object.insert("apiVersion".into(), "v1".into());
        object.insert("kind".into(), "Pod".into());
        let resource_version = {
            let mut store = lock(&self.shared.store);
            store.resource_version += 1;
            let resource_version = store.resource_version;
            pod["metadata"]["resourceVersion"] = resource_version.to_string().into();
            let previous = store.pods.insert(uid, pod.clone());
            let kind = if previous.is_some() {
                ChangeKind::Modified
            } else {
                ChangeKind::Added
            };
            store.history.push(Change {
                resource_version,
                kind,
                object: pod,
                previous,
            });
            resource_version
        };
        self.shared.changed.send_replace(resource_version);
    }

    /// Deletes a pod by uid: a DELETED event carrying its last state with a new resourceVersion.
    /// Panics if there is no such pod.
    pub fn delete(&self, uid: &str) {
        let resource_version = {
            let mut store = lock(&self.shared.store);
            let mut pod = store
                .pods
                .remove(uid)
                .unwrap_or_else(|| panic!("no pod with uid {uid:?} to delete"));
            store.resource_version += 1;
            let resource_version = store.resource_version;
            pod["metadata"]["resourceVersion"] = resource_version.to_string().into();
            store.history.push(Change {
                resource_version,
                kind: ChangeKind::Deleted,
                object: pod,
                previous: None,
            });
            resource_version
        };
        self.shared.changed.send_replace(resource_version);
    }

    /// `true`: every open connection (watches included) is cut and new connections are reset;
    /// `false`: serving normally again.
    pub fn set_down(&self, down: bool) {
        let cut: Vec<AbortHandle> = {
            let mut store = lock(&self.shared.store);
            store.down = down;
            if down {
                store
                    .connections
                    .drain()
                    .map(|(_, handle)| handle)
                    .collect()
            } else {
                Vec::new()
            }
        };
        for handle in cut {
            handle.abort();
        }
    }

    /// Forgets the event history: a later watch from a resourceVersion older than the current
    /// one gets the 410 Expired error and the client has to relist. Open watches still behind
    /// get the same error.
    pub fn expire_history(&self) {
        let resource_version = {
            let mut store = lock(&self.shared.store);
            store.history.clear();
            store.oldest_watchable = store.resource_version;
            store.resource_version
        };
        self.shared.changed.send_replace(resource_version);
    }

    /// Request targets (`path?query`, as sent, percent-encoded) seen so far, in order.
    pub fn requests(&self) -> Vec<String> {
        lock(&self.shared.store).requests.clone()
    }

    /// The current (latest) resourceVersion of the store.
    pub fn resource_version(&self) -> String {
        lock(&self.shared.store).resource_version.to_string()
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.set_down(true);
        if let Some(runtime) = self.runtime.take() {
            // Does not block, so dropping is fine inside an async test too.
            runtime.shutdown_background();
        }
    }
}

/// The decoded query parameters of a request target such as those of [`FakeApi::requests`].
pub fn query_params(target: &str) -> Vec<(String, String)> {
    let query = target.split_once('?').map_or("", |(_, query)| query);
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(key), percent_decode(value))
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let hex = |byte: u8| (byte as char).to_digit(16);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(high), Some(low)) => {
                    out.push((high * 16 + low) as u8);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A pod as the apiserver returns it. `containers` are (name, state) with state "running",
/// "waiting" or "terminated" (exit code 0, reason "Completed"). The phase is Running unless every
/// container terminated (then Succeeded). `metadata.resourceVersion` is left to the store.
pub fn pod(
    namespace: &str,
    name: &str,
    uid: &str,
    node: &str,
    labels: &[(&str, &str)],
    annotations: &[(&str, &str)],
    containers: &[(&str, &str)],
) -> Value {
    const STARTED: &str = "2024-05-01T00:00:01Z";
    const FINISHED: &str = "2024-05-01T00:10:00Z";
    const IMAGE: &str = "docker.io/apache/druid:33.0.0";
    let string_map = |pairs: &[(&str, &str)]| -> Map<String, Value> {
        pairs
            .iter()
            .map(|(key, value)| ((*key).to_owned(), Value::from(*value)))
            .collect()
    };
    let specs: Vec<Value> = containers
        .iter()
        .map(|(container, _)| json!({"name": container, "image": IMAGE, "resources": {}}))
        .collect();
    let statuses: Vec<Value> = containers
        .iter()
        .map(|(container, state)| {
            let container_id = format!("containerd://{uid}-{container}");
            let (state, ready, started, id) = match *state {
                "running" => (json!({"running": {"startedAt": STARTED}}), true, true, true),
                "waiting" => (
                    json!({"waiting": {"reason": "ContainerCreating"}}),
                    false,
                    false,
                    false,
                ),
                "terminated" => (
                    json!({"terminated": {
                        "exitCode": 0,
                        "reason": "Completed",
                        "startedAt": STARTED,
                        "finishedAt": FINISHED,
                        "containerID": container_id,
                    }}),
                    false,
                    false,
                    true,
                ),
                other => panic!("container state {other:?}: use running, waiting or terminated"),
            };
            let mut status = json!({
                "name": container,
                "state": state,
                "lastState": {},
                "ready": ready,
                "restartCount": 0,
                "image": IMAGE,
                "imageID": "docker.io/apache/druid@sha256:0123456789abcdef",
                "started": started,
            });
            if id {
                status["containerID"] = container_id.into();
            }
            status
        })
        .collect();
    let all_terminated =
        !containers.is_empty() && containers.iter().all(|(_, state)| *state == "terminated");
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": uid,
            "creationTimestamp": "2024-05-01T00:00:00Z",
            "labels": string_map(labels),
            "annotations": string_map(annotations),
        },
        "spec": {
            "nodeName": node,
            "restartPolicy": "Never",
            "containers": specs,
        },
        "status": {
            "phase": if all_terminated { "Succeeded" } else { "Running" },
            "hostIP": "10.0.0.1",
            "podIP": "10.1.0.1",
            "startTime": "2024-05-01T00:00:00Z",
            "containerStatuses": statuses,
        },
    })
}

// ---------------------------------------------------------------------------------------------
// HTTP serving

async fn accept_loop(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let mut store = lock(&shared.store);
        if store.down {
            // Abortive close: the client sees a connection reset.
            let _ = stream.set_zero_linger();
            drop(stream);
            continue;
        }
        let id = store.next_connection;
        store.next_connection += 1;
        let connection_shared = shared.clone();
        // Spawned while the store is locked, so the task unregisters only after registering.
        let task = tokio::spawn(async move {
            let service_shared = connection_shared.clone();
            let service = hyper::service::service_fn(move |request| {
                let shared = service_shared.clone();
                async move { Ok::<_, Infallible>(handle(&shared, request).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
            lock(&connection_shared.store).connections.remove(&id);
        });
        store.connections.insert(id, task.abort_handle());
    }
}

/// A response body: a whole JSON document, or the lines of a watch as they come (chunked).
enum ResponseBody {
    Full(Option<Bytes>),
    Stream(mpsc::Receiver<Bytes>),
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            ResponseBody::Full(bytes) => {
                Poll::Ready(bytes.take().map(|bytes| Ok(Frame::data(bytes))))
            }
            ResponseBody::Stream(lines) => lines
                .poll_recv(cx)
                .map(|line| line.map(|line| Ok(Frame::data(line)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, ResponseBody::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Full(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            ResponseBody::Full(None) => SizeHint::with_exact(0),
            ResponseBody::Stream(_) => SizeHint::default(),
        }
    }
}

fn json_response(status: StatusCode, body: &Value) -> Response<ResponseBody> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("cache-control", "no-cache, private")
        .body(ResponseBody::Full(Some(Bytes::from(body.to_string()))))
        .expect("response")
}

fn status_object(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "details": {},
        "code": code,
    })
}

fn error_response(code: u16, reason: &str, message: &str) -> Response<ResponseBody> {
    let status = StatusCode::from_u16(code).expect("status code");
    json_response(status, &status_object(code, reason, message))
}

async fn handle(shared: &Arc<Shared>, request: Request<Incoming>) -> Response<ResponseBody> {
    let uri = request.uri();
    let target = uri.path_and_query().map_or_else(
        || uri.path().to_owned(),
        |target| target.as_str().to_owned(),
    );
    {
        let mut store = lock(&shared.store);
        store.requests.push(target.clone());
        if store.down {
            return error_response(
                503,
                "ServiceUnavailable",
                "the server is currently unable to handle the request",
            );
        }
    }
    let not_found = || {
        error_response(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
    };
    let segments: Vec<&str> = uri.path().split('/').filter(|s| !s.is_empty()).collect();
    let (namespace, name) = match segments.as_slice() {
        ["api", "v1", "pods"] => (None, None),
        ["api", "v1", "namespaces", namespace, "pods"] => (Some(*namespace), None),
        ["api", "v1", "namespaces", namespace, "pods", name] => (Some(*namespace), Some(*name)),
        _ => return not_found(),
    };
    if request.method() != Method::GET {
        return error_response(
            405,
            "MethodNotAllowed",
            &format!("{} is not supported by this fake server", request.method()),
        );
    }
    if let (Some(namespace), Some(name)) = (namespace, name) {
        return get_pod(shared, namespace, name);
    }
    let params: HashMap<String, String> = query_params(&target).into_iter().collect();
    let selector = match Selector::parse(namespace, &params) {
        Ok(selector) => selector,
        Err(message) => return error_response(400, "BadRequest", &message),
    };
    let flag = |key: &str| matches!(params.get(key).map(String::as_str), Some("true" | "1"));
    if flag("watch") {
        start_watch(shared, selector, &params)
    } else {
        list(shared, &selector)
    }
}

fn get_pod(shared: &Shared, namespace: &str, name: &str) -> Response<ResponseBody> {
    let store = lock(&shared.store);
    let found = store.pods.values().find(|pod| {
        pod["metadata"]["namespace"].as_str() == Some(namespace)
            && pod["metadata"]["name"].as_str() == Some(name)
    });
    match found {
        Some(pod) => json_response(StatusCode::OK, pod),
        None => error_response(404, "NotFound", &format!("pods \"{name}\" not found")),
    }
}

fn list(shared: &Shared, selector: &Selector) -> Response<ResponseBody> {
    let store = lock(&shared.store);
    let items: Vec<Value> = store
        .pods
        .values()
        .filter(|pod| selector.matches(pod))
        .map(|pod| {
            // List items carry no kind/apiVersion, as from the real server.
            let mut item = pod.clone();
            if let Some(object) = item.as_object_mut() {
                object.remove("kind");
                object.remove("apiVersion");
            }
            item
        })
        .collect();
    let body = json!({
        "kind": "PodList",
        "apiVersion": "v1",
        "metadata": {"resourceVersion": store.resource_version.to_string()},
        "items": items,
    });
    json_response(StatusCode::OK, &body)
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": kind, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

fn bookmark_line(resource_version: u64, initial_events_end: bool) -> Bytes {
    let mut metadata = json!({"resourceVersion": resource_version.to_string()});
    if initial_events_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    event_line(
        "BOOKMARK",
        &json!({"kind": "Pod", "apiVersion": "v1", "metadata": metadata}),
    )
}

fn expired_line(requested: u64, oldest: u64) -> Bytes {
    event_line(
        "ERROR",
        &json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": format!("too old resource version: {requested} ({oldest})"),
            "reason": "Expired",
            "code": 410,
        }),
    )
}

/// What a watcher with `selector` sees of a change, if anything.
fn event_for(selector: &Selector, change: &Change) -> Option<Bytes> {
    match change.kind {
        ChangeKind::Added => selector
            .matches(&change.object)
            .then(|| event_line("ADDED", &change.object)),
        ChangeKind::Deleted => selector
            .matches(&change.object)
            .then(|| event_line("DELETED", &change.object)),
        ChangeKind::Modified => {
            let was = change
                .previous
                .as_ref()
                .is_some_and(|prev| selector.matches(prev));
            let is = selector.matches(&change.object);
            match (was, is) {
                (true, true) => Some(event_line("MODIFIED", &change.object)),
                (false, true) => Some(event_line("ADDED", &change.object)),
                (true, false) => {
                    // As the watch cache: the old object at the new resourceVersion.
                    let mut old = change.previous.clone()?;
                    old["metadata"]["resourceVersion"] = change.resource_version.to_string().into();
                    Some(event_line("DELETED", &old))
                }
                (false, false) => None,
            }
        }
    }
}

fn start_watch(
    shared: &Arc<Shared>,
    selector: Selector,
    params: &HashMap<String, String>,
) -> Response<ResponseBody> {
    let flag = |key: &str| matches!(params.get(key).map(String::as_str), Some("true" | "1"));
    let bookmarks = flag("allowWatchBookmarks");
    let send_initial_events = flag("sendInitialEvents");
    let timeout = match params.get("timeoutSeconds").filter(|t| !t.is_empty()) {
        None => DEFAULT_WATCH_TIMEOUT,
        Some(seconds) => match seconds.parse::<u64>() {
            Ok(seconds) => Duration::from_secs(seconds),
            Err(_) => {
                return error_response(
                    400,
                    "BadRequest",
                    &format!("invalid timeoutSeconds {seconds:?}"),
                );
            }
        },
    };
    let requested = match params.get("resourceVersion").map(String::as_str) {
        None | Some("") | Some("0") => None,
        Some(version) => match version.parse::<u64>() {
            Ok(version) => Some(version),
            Err(_) => {
                return error_response(
                    400,
                    "BadRequest",
                    &format!("invalid resourceVersion {version:?}"),
                );
            }
        },
    };

    let mut initial = Vec::new();
    let cursor = {
        let store = lock(&shared.store);
        match requested {
            Some(version) if !send_initial_events => {
                if version < store.oldest_watchable {
                    initial.push(expired_line(version, store.oldest_watchable));
                    None
                } else {
                    Some(version)
                }
            }
            _ => {
                // "Get state and start at most recent": the current state as ADDED events first.
                for pod in store.pods.values().filter(|pod| selector.matches(pod)) {
                    initial.push(event_line("ADDED", pod));
                }
                if send_initial_events {
                    initial.push(bookmark_line(store.resource_version, true));
                }
                Some(store.resource_version)
            }
        }
    };

    let (lines, body) = mpsc::channel(64);
    let pump_shared = shared.clone();
    tokio::spawn(async move {
        for line in initial {
            if lines.send(line).await.is_err() {
                return;
            }
        }
        if let Some(cursor) = cursor {
            pump(pump_shared, selector, cursor, bookmarks, timeout, lines).await;
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .header("cache-control", "no-cache, private")
        .body(ResponseBody::Stream(body))
        .expect("response")
}

/// Streams the changes after `cursor` to one watcher until its timeout or disconnection.
async fn pump(
    shared: Arc<Shared>,
    selector: Selector,
    mut cursor: u64,
    bookmarks: bool,
    timeout: Duration,
    lines: mpsc::Sender<Bytes>,
) {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut changed = shared.changed.subscribe();
    let mut ticks = tokio::time::interval_at(
        tokio::time::Instant::now() + BOOKMARK_INTERVAL,
        BOOKMARK_INTERVAL,
    );
    let mut bookmark_due = false;
    loop {
        changed.borrow_and_update();
        let mut batch = Vec::new();
        let expired = {
            let store = lock(&shared.store);
            if cursor < store.oldest_watchable {
                // History this watcher still needed was dropped: it has to relist.
                batch.push(expired_line(cursor, store.oldest_watchable));
                true
            } else {
                for change in store.history.iter().filter(|c| c.resource_version > cursor) {
                    batch.extend(event_for(&selector, change));
                }
                cursor = cursor.max(store.resource_version);
                false
            }
        };
        if expired {
            for line in batch {
                let _ = lines.send(line).await;
            }
            return;
        }
        if std::mem::take(&mut bookmark_due) {
            batch.push(bookmark_line(cursor, false));
        }
        for line in batch {
            if lines.send(line).await.is_err() {
                return;
            }
        }
        tokio::select! {
            _ = lines.closed() => return,
            _ = tokio::time::sleep_until(deadline) => return,
            result = changed.changed() => {
                if result.is_err() {
                    return;
                }
            }
            _ = ticks.tick(), if bookmarks => bookmark_due = true,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Selectors

enum LabelRequirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    NotExists(String),
}

struct FieldRequirement {
    field: String,
    value: String,
    equals: bool,
}

struct Selector {
    namespace: Option<String>,
    labels: Vec<LabelRequirement>,
    fields: Vec<FieldRequirement>,
}

const SUPPORTED_FIELDS: &[&str] = &[
    "spec.nodeName",
    "metadata.name",
    "metadata.namespace",
    "status.phase",
];

impl Selector {
    fn parse(
        namespace: Option<&str>,
        params: &HashMap<String, String>,
    ) -> Result<Selector, String> {
        let mut labels = Vec::new();
        for term in params
            .get("labelSelector")
            .map_or("", String::as_str)
            .split(',')
        {
            let term = term.trim();
            if term.is_empty() {
                continue;
            }
            let requirement = if let Some((key, value)) = term.split_once("!=") {
                LabelRequirement::NotEquals(key.trim().to_owned(), value.trim().to_owned())
            } else if let Some((key, value)) = term.split_once("==") {
                LabelRequirement::Equals(key.trim().to_owned(), value.trim().to_owned())
            } else if let Some((key, value)) = term.split_once('=') {
                LabelRequirement::Equals(key.trim().to_owned(), value.trim().to_owned())
            } else if let Some(key) = term.strip_prefix('!') {
                LabelRequirement::NotExists(key.trim().to_owned())
            } else if term.contains(|c: char| c.is_whitespace() || c == '(') {
                return Err(format!(
                    "unable to parse requirement: set-based selector {term:?} is not supported by the fake server"
                ));
            } else {
                LabelRequirement::Exists(term.to_owned())
            };
            match &requirement {
                LabelRequirement::Equals(key, _)
                | LabelRequirement::NotEquals(key, _)
                | LabelRequirement::Exists(key)
                | LabelRequirement::NotExists(key)
                    if key.is_empty() =>
                {
                    return Err(format!("unable to parse requirement: {term:?}"));
                }
                _ => labels.push(requirement),
            }
        }
        let mut fields = Vec::new();
        for term in params
            .get("fieldSelector")
            .map_or("", String::as_str)
            .split(',')
        {
            let term = term.trim();
            if term.is_empty() {
                continue;
            }
            let (field, value, equals) = if let Some((field, value)) = term.split_once("!=") {
                (field, value, false)
            } else if let Some((field, value)) = term.split_once("==") {
                (field, value, true)
            } else if let Some((field, value)) = term.split_once('=') {
                (field, value, true)
            } else {
                return Err(format!("invalid selector: {term:?}; can't understand"));
            };
            let field = field.trim();
            if !SUPPORTED_FIELDS.contains(&field) {
                return Err(format!(
                    "field label not supported: {field} (the fake server knows {SUPPORTED_FIELDS:?})"
                ));
            }
            fields.push(FieldRequirement {
                field: field.to_owned(),
                value: value.trim().to_owned(),
                equals,
            });
        }
        Ok(Selector {
            namespace: namespace.map(str::to_owned),
            labels,
            fields,
        })
    }

    fn matches(&self, pod: &Value) -> bool {
        let metadata = &pod["metadata"];
        if let Some(namespace) = &self.namespace
            && metadata["namespace"].as_str() != Some(namespace.as_str())
        {
            return false;
        }
        let label = |key: &str| metadata["labels"][key].as_str();
        let labels_match = self.labels.iter().all(|requirement| match requirement {
            LabelRequirement::Equals(key, value) => label(key) == Some(value.as_str()),
            LabelRequirement::NotEquals(key, value) => label(key) != Some(value.as_str()),
            LabelRequirement::Exists(key) => label(key).is_some(),
            LabelRequirement::NotExists(key) => label(key).is_none(),
        });
        labels_match
            && self.fields.iter().all(|requirement| {
                let actual = match requirement.field.as_str() {
                    "spec.nodeName" => &pod["spec"]["nodeName"],
                    "metadata.name" => &metadata["name"],
                    "metadata.namespace" => &metadata["namespace"],
                    "status.phase" => &pod["status"]["phase"],
                    _ => &Value::Null,
                };
                (actual.as_str().unwrap_or("") == requirement.value) == requirement.equals
            })
    }
}
