//! A small fake Kubernetes API server for tests and the soak: the pods API only, speaking the real list/watch
//! JSON over real HTTP/1.1, so the real `kube` client (and `kube::runtime::watcher`) can be driven
//! against it through a kubeconfig.
//!
//! What it models, as kube-apiserver does:
//! - `GET /api/v1/pods` and `GET /api/v1/namespaces/{ns}/pods[/{name}]` with equality-based
//!   `labelSelector` and `fieldSelector` (`spec.nodeName`, `metadata.name`, `metadata.namespace`,
//!   `status.phase`); `limit`/`continue` are accepted and everything is returned in one page.
//! - The service proxy, `/api/v1/namespaces/{ns}/services/{name}[:{port}]/proxy/{path}`, to a
//!   backend a test registers ([`FakeApi::add_service`]): the caller's `Authorization` is
//!   consumed, not forwarded; an unknown Service is a 404 `Status`, an unreachable backend a
//!   503 `Status`; the backend's answer is streamed back.
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
//! - Outages in the forms a client meets ([`Outage`], [`FakeApi::set_outage`]): connections
//!   reset, connections refused (the listener closed, the same port bound again after), and
//!   `503 Service Unavailable` answers with the apiserver's `Status` body. Every form cuts the
//!   open connections, watches included.
//! - [`FakeApi::wait_delivered`]: a test can wait until a change has been handed to a client's
//!   connection, so "the agent has been sent this status" is an event, not a sleep.
//!
//! And the kubelet's side, [`PodModel`]: pod status as the kubelet reports it through container
//! starts, exits, back-offs and restarts (see its documentation for what is modelled and from
//! where).
//!
//! Self-contained (std, serde_json, tokio, hyper, hyper-util, bytes), with its own tokio runtime,
//! so it works from plain `#[test]`s and from `#[tokio::test]`s alike.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
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

/// The forms an API server outage takes for a client.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Outage {
    /// Open connections are cut and new ones are reset (RST) as soon as they are accepted: a
    /// server or load balancer that aborts.
    Reset,
    /// The listening socket is closed, so connecting fails with "connection refused" (the API
    /// server pods restarting); the same port is bound again when the outage ends.
    Refused,
    /// Connections are accepted and every request, lists and watches alike, is answered `503
    /// Service Unavailable` with a `Status` body (the server up but not ready). Clients with
    /// built-in retries on 503 (kube-client's default `RetryPolicy::server_retry`) can hide
    /// such an outage from their caller.
    Unavailable,
}

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
    /// Whether the accept loop should have a listening socket (false while connections are
    /// refused).
    listen: watch::Sender<bool>,
    /// Whether it has one, for [`FakeApi::set_outage`] to return only once it is so.
    listening: Signal<bool>,
    /// The newest resourceVersion a list or watch response has handed to a connection.
    delivered: Signal<u64>,
    /// Watches being streamed: a watch counts until its client is gone or it timed out.
    open_watches: Signal<usize>,
}

/// Counts a watch in [`Shared::open_watches`] while it lives.
struct OpenWatch(Arc<Shared>);

impl OpenWatch {
    fn new(shared: Arc<Shared>) -> OpenWatch {
        shared.open_watches.update(|n| *n += 1);
        OpenWatch(shared)
    }
}

impl Drop for OpenWatch {
    fn drop(&mut self) {
        self.0.open_watches.update(|n| *n -= 1);
    }
}

impl Shared {
    fn mark_delivered(&self, resource_version: u64) {
        self.delivered
            .update(|delivered| *delivered = (*delivered).max(resource_version));
    }
}

/// A value that plain threads (tests) wait on while the server's tasks change it.
struct Signal<T> {
    value: Mutex<T>,
    changed: Condvar,
}

impl<T: Copy + PartialEq> Signal<T> {
    fn new(value: T) -> Signal<T> {
        Signal {
            value: Mutex::new(value),
            changed: Condvar::new(),
        }
    }

    fn get(&self) -> T {
        *self
            .value
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn update(&self, change: impl FnOnce(&mut T)) {
        let mut value = self
            .value
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let before = *value;
        change(&mut value);
        if *value != before {
            self.changed.notify_all();
        }
    }

    /// Whether `done` holds within `timeout`.
    fn wait_until(&self, timeout: Duration, done: impl Fn(&T) -> bool) -> bool {
        let value = self
            .value
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let (_value, result) = self
            .changed
            .wait_timeout_while(value, timeout, |value| !done(value))
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        !result.timed_out()
    }
}

struct Store {
    pods: BTreeMap<String, Value>,
    resource_version: u64,
    /// Watches from a resourceVersion older than this get 410 Expired.
    oldest_watchable: u64,
    history: Vec<Change>,
    requests: Vec<String>,
    outage: Option<Outage>,
    connections: HashMap<u64, AbortHandle>,
    next_connection: u64,
    /// Services the proxy subresource reaches: (namespace, name) -> (port name, backend).
    services: HashMap<(String, String), (String, SocketAddr)>,
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
        let (listen, _) = watch::channel(true);
        let shared = Arc::new(Shared {
            store: Mutex::new(Store {
                pods: BTreeMap::new(),
                resource_version: INITIAL_RESOURCE_VERSION,
                oldest_watchable: 0,
                history: Vec::new(),
                requests: Vec::new(),
                outage: None,
                connections: HashMap::new(),
                next_connection: 0,
                services: HashMap::new(),
            }),
            changed,
            listen,
            listening: Signal::new(true),
            delivered: Signal::new(0),
            open_watches: Signal::new(0),
        });
        runtime.spawn(accept_loop(listener, addr, shared.clone()));
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
    /// resourceVersion, which is returned (for [`FakeApi::wait_delivered`]).
    pub fn apply(&self, mut pod: Value) -> u64 {
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
        resource_version
    }

    /// Deletes a pod by uid: a DELETED event carrying its last state with a new resourceVersion,
    /// which is returned. Panics if there is no such pod.
    pub fn delete(&self, uid: &str) -> u64 {
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
        resource_version
    }

    /// `true`: an [`Outage::Reset`]; `false`: serving normally again.
    pub fn set_down(&self, down: bool) {
        self.set_outage(down.then_some(Outage::Reset));
    }

    /// The outage in progress, if any.
    pub fn outage(&self) -> Option<Outage> {
        lock(&self.shared.store).outage
    }

    /// Starts an outage of the given form (every open connection, watches included, is cut), or
    /// ends it with `None`. Returns once the server behaves so: with [`Outage::Refused`] the
    /// port is closed, after it the port is bound again.
    pub fn set_outage(&self, outage: Option<Outage>) {
        let cut: Vec<AbortHandle> = {
            let mut store = lock(&self.shared.store);
            store.outage = outage;
            if outage.is_some() {
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
        let listen = outage != Some(Outage::Refused);
        self.shared.listen.send_replace(listen);
        assert!(
            self.shared
                .listening
                .wait_until(Duration::from_secs(10), |listening| *listening == listen),
            "the fake kube-apiserver could not {} {}",
            if listen { "bind again" } else { "close" },
            self.addr,
        );
    }

    /// Waits until a list or watch response carrying the store's state as of `resource_version`
    /// or later (an event of that change or a newer one, a BOOKMARK at least that new, or a
    /// list at least that new) has been handed to a client's connection; hyper writes it to the
    /// socket before it next waits. `false` if that did not happen within `timeout`.
    ///
    /// This is what makes a race deterministic: "the agent has been sent `main` terminated; now
    /// the new instance writes". It says nothing about what the client did with the event.
    pub fn wait_delivered(&self, resource_version: u64, timeout: Duration) -> bool {
        self.shared
            .delivered
            .wait_until(timeout, |delivered| *delivered >= resource_version)
    }

    /// Forgets the event history: a later watch from a resourceVersion older than the current
    /// A Service `namespace/name` whose port `port_name` leads to `backend`, for the proxy
    /// subresource (`/api/v1/namespaces/{ns}/services/{name}:{port}/proxy/...`), as the API
    /// server reaches a Service's endpoint for `kubectl get --raw` and client libraries.
    pub fn add_service(&self, namespace: &str, name: &str, port_name: &str, backend: SocketAddr) {
        lock(&self.shared.store).services.insert(
            (namespace.to_owned(), name.to_owned()),
            (port_name.to_owned(), backend),
        );
    }

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

    /// The newest resourceVersion a list or watch response has handed to a client (see
    /// [`FakeApi::wait_delivered`]): a change newer than this has reached no client yet.
    pub fn delivered(&self) -> u64 {
        self.shared.delivered.get()
    }

    /// Waits until `done` holds for the number of open watches (a watch is open until its
    /// client closed the connection or the watch timed out); `false` if not within `timeout`.
    /// Tells whether a client really let go of its watch, not only stopped reading it.
    pub fn wait_open_watches(&self, timeout: Duration, done: impl Fn(usize) -> bool) -> bool {
        self.shared
            .open_watches
            .wait_until(timeout, |open| done(*open))
    }

    /// Request targets (`path?query`, as sent, percent-encoded) seen so far, in order.
    pub fn requests(&self) -> Vec<String> {
        lock(&self.shared.store).requests.clone()
    }

    /// The current (latest) resourceVersion of the store, as the API writes it.
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

/// A pod as the apiserver returns it, for tests that need no history: restartPolicy `Never`,
/// `containers` are (name, state) with state "running", "waiting" (not started yet:
/// `ContainerCreating`) or "terminated" (exit code 0, reason "Completed"), each with restartCount
/// 0. The phase is what the kubelet reports for that ([`PodModel`]): `Pending` while a container
/// waits, `Succeeded` once every container terminated, `Running` otherwise.
/// `metadata.resourceVersion` is left to the store.
pub fn pod(
    namespace: &str,
    name: &str,
    uid: &str,
    node: &str,
    labels: &[(&str, &str)],
    annotations: &[(&str, &str)],
    containers: &[(&str, &str)],
) -> Value {
    let names: Vec<&str> = containers.iter().map(|(container, _)| *container).collect();
    let mut model = PodModel::new(namespace, name, uid, node, RestartPolicy::Never, &names)
        .with_labels(labels)
        .with_annotations(annotations);
    for (container, state) in containers {
        match *state {
            "running" => {
                model.start(container);
            }
            "terminated" => {
                model.start(container);
                model.exit(container, 0, "Completed");
            }
            "waiting" => {}
            other => panic!("container state {other:?}: use running, waiting or terminated"),
        }
    }
    if model.computed_phase().is_terminal() {
        model.finish();
    }
    model.json()
}

// ---------------------------------------------------------------------------------------------
// The kubelet's pod status

const IMAGE: &str = "docker.io/apache/druid:33.0.0";
const IMAGE_ID: &str = "docker.io/apache/druid@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
/// How long the kubelet gives a container between SIGTERM and SIGKILL on deletion.
const TERMINATION_GRACE_SECONDS: u64 = 30;

/// A pod's `spec.restartPolicy`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum RestartPolicy {
    Always,
    OnFailure,
    Never,
}

impl RestartPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            RestartPolicy::Always => "Always",
            RestartPolicy::OnFailure => "OnFailure",
            RestartPolicy::Never => "Never",
        }
    }

    /// Whether the kubelet starts a container that exited with `exit_code` again, in a pod not
    /// being deleted (`ShouldContainerBeRestarted` in pkg/kubelet/container/helpers.go).
    pub fn restarts(self, exit_code: i32) -> bool {
        match self {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => exit_code != 0,
            RestartPolicy::Never => false,
        }
    }
}

/// `status.phase`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum PodPhase {
    Pending,
    Running,
    Succeeded,
    Failed,
}

impl PodPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            PodPhase::Pending => "Pending",
            PodPhase::Running => "Running",
            PodPhase::Succeeded => "Succeeded",
            PodPhase::Failed => "Failed",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, PodPhase::Succeeded | PodPhase::Failed)
    }
}

/// One pod as its kubelet reports it: a spec (restartPolicy, containers) and, per container, the
/// newest instance's state, the previous instance's termination and the restart count. Each
/// step returns the pod as the kubelet's status would then show it; the test applies it to the
/// [`FakeApi`] when it chooses, which is how status lag is expressed: the kubelet's status
/// manager writes asynchronously (pkg/kubelet/status/status_manager.go), so the API shows a
/// state seconds after the files show it, and it may skip intermediate states (it sends the
/// newest status it has, never an older one after a newer one). A test that applies every
/// step, late and in order, is faithful; one that applies an older snapshot after a newer one
/// is not.
///
/// Modelled after kubernetes/kubernetes (read, not copied):
/// - `convertToAPIContainerStatuses` (pkg/kubelet/kubelet_pods.go): the newest instance gives
///   `state`, the one before it `lastState`; a running instance has `state.running.startedAt`,
///   an exited one `state.terminated` with exitCode, reason, startedAt, finishedAt and its
///   containerID; a container that will be restarted and is in back-off is
///   `waiting: CrashLoopBackOff` with `lastState.terminated` and still the exited instance's
///   containerID; before its first start a container is `waiting: ContainerCreating`.
/// - `startContainer` (pkg/kubelet/kuberuntime/kuberuntime_container.go): a new instance gets
///   restartCount = previous + 1 and its log file is `<restartCount>.log`; every instance has
///   its own containerID. The first restart happens at once; back-off (10 s doubling to 5 min
///   on a real node) shows as CrashLoopBackOff from the second on, which a test chooses by
///   calling [`PodModel::back_off`] or not.
/// - `getPhase` (pkg/kubelet/kubelet_pods.go), for regular containers: `Pending` while a
///   container waits without having run; `Running` while one runs; when none runs (a container
///   in back-off counts as stopped, and not as succeeded): `Running` if restartPolicy is
///   Always, `Succeeded` if every one exited 0, `Failed` if restartPolicy is Never, `Running`
///   (restarting) for OnFailure with a failure. A pod being deleted never restarts anything and
///   ends `Succeeded` or `Failed`. So a sidecar that keeps running keeps the pod `Running`
///   after `main` exited for good.
/// - `mergePodStatus` (pkg/kubelet/status/status_manager.go): a transition to a terminal phase
///   is held back while the pod could still have running containers, until the pod worker has
///   finished terminating the pod ([`PodModel::finish`]). So with restartPolicy Never the
///   container's `terminated` state and the terminal phase come in two updates when the test
///   applies the snapshot of [`PodModel::exit`] and then that of [`PodModel::finish`], in one
///   when it applies only the latter. A terminal phase never changes again.
/// - `ready` and `started` follow whether the instance runs (no probes are modelled).
///
/// Not modelled: init containers, probes, conditions, container garbage collection (a test
/// removes old instances' log files itself).
///
/// Steps the kubelet could not take panic (a restart that the restartPolicy rules out, a
/// restart of a running container, finishing a pod that still runs), so a test cannot express
/// an impossible sequence.
#[derive(Clone, Debug)]
pub struct PodModel {
    namespace: String,
    name: String,
    uid: String,
    node: String,
    labels: Vec<(String, String)>,
    annotations: Vec<(String, String)>,
    restart_policy: RestartPolicy,
    containers: Vec<ContainerModel>,
    /// `status.podIP`: the sandbox's address, given before any container starts.
    pod_ip: String,
    /// `spec.containers[].ports`: (container, port name, port).
    ports: Vec<(String, String, u16)>,
    /// The phase the status shows.
    phase: PodPhase,
    /// The pod worker has finished terminating the pod: a terminal phase may be shown.
    finished: bool,
    /// Since when (clock seconds) the pod is being deleted.
    deleting_since: Option<u64>,
    /// Seconds since the pod's creation, one more at every step, for timestamps.
    clock: u64,
}

#[derive(Clone, Debug)]
struct ContainerModel {
    name: String,
    restart_count: u32,
    state: ContainerState,
    /// The previous instance's end.
    last_terminated: Option<Terminated>,
    /// The newest instance's id (kept through a back-off, as the kubelet does).
    container_id: Option<String>,
}

#[derive(Clone, Debug)]
enum ContainerState {
    /// Never started (`ContainerCreating`) or in back-off (`CrashLoopBackOff`).
    Waiting {
        reason: &'static str,
        message: Option<String>,
    },
    Running {
        started_at: u64,
    },
    Terminated(Terminated),
}

#[derive(Clone, Debug)]
struct Terminated {
    exit_code: i32,
    reason: String,
    started_at: u64,
    finished_at: u64,
    container_id: String,
}

impl PodModel {
    /// A pod scheduled on `node`, its containers created but not started: each
    /// `waiting: ContainerCreating`, the phase `Pending`.
    pub fn new(
        namespace: &str,
        name: &str,
        uid: &str,
        node: &str,
        restart_policy: RestartPolicy,
        containers: &[&str],
    ) -> PodModel {
        PodModel {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            uid: uid.to_owned(),
            node: node.to_owned(),
            labels: Vec::new(),
            annotations: Vec::new(),
            restart_policy,
            containers: containers
                .iter()
                .map(|name| ContainerModel {
                    name: (*name).to_owned(),
                    restart_count: 0,
                    state: ContainerState::Waiting {
                        reason: "ContainerCreating",
                        message: None,
                    },
                    last_terminated: None,
                    container_id: None,
                })
                .collect(),
            pod_ip: "10.1.0.1".to_owned(),
            ports: Vec::new(),
            phase: PodPhase::Pending,
            finished: false,
            deleting_since: None,
            clock: 0,
        }
    }

    pub fn with_labels(mut self, labels: &[(&str, &str)]) -> PodModel {
        self.labels.extend(
            labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        self
    }

    pub fn with_annotations(mut self, annotations: &[(&str, &str)]) -> PodModel {
        self.annotations.extend(
            annotations
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        self
    }

    /// The pod's address (`status.podIP`); tests that connect to a pod give a loopback one.
    pub fn with_pod_ip(mut self, ip: &str) -> PodModel {
        self.pod_ip = ip.to_owned();
        self
    }

    /// A named TCP port of `container` (`spec.containers[].ports`), as a DaemonSet declares
    /// the port its clients find by name.
    pub fn with_port(mut self, container: &str, name: &str, port: u16) -> PodModel {
        self.container(container);
        self.ports
            .push((container.to_owned(), name.to_owned(), port));
        self
    }

    pub fn uid(&self) -> &str {
        &self.uid
    }

    pub fn restart_policy(&self) -> RestartPolicy {
        self.restart_policy
    }

    /// The phase the status shows now.
    pub fn phase(&self) -> PodPhase {
        self.phase
    }

    /// The container's restartCount: its newest instance writes `<restartCount>.log`.
    pub fn restart_count(&self, container: &str) -> u32 {
        self.container(container).restart_count
    }

    /// The newest instance's containerID, once it has been created.
    pub fn container_id(&self, container: &str) -> Option<&str> {
        self.container(container).container_id.as_deref()
    }

    /// The first instance starts: `running`, restartCount 0, a containerID.
    pub fn start(&mut self, container: &str) -> Value {
        self.tick();
        let now = self.clock;
        let uid = self.uid.clone();
        let c = self.container_mut(container);
        assert!(
            c.container_id.is_none(),
            "{container} has run before: use restart"
        );
        c.container_id = Some(container_id(&uid, container, 0));
        c.state = ContainerState::Running { started_at: now };
        self.step()
    }

    /// The running instance exits: `terminated` with `exit_code` and `reason` ("Completed",
    /// "Error", "OOMKilled"), restartCount and lastState unchanged. The phase follows
    /// (`getPhase`), but a terminal one only once [`PodModel::finish`] is called.
    pub fn exit(&mut self, container: &str, exit_code: i32, reason: &str) -> Value {
        self.tick();
        let now = self.clock;
        let c = self.container_mut(container);
        let ContainerState::Running { started_at } = c.state else {
            panic!("{container} is not running: {:?}", c.state);
        };
        c.state = ContainerState::Terminated(Terminated {
            exit_code,
            reason: reason.to_owned(),
            started_at,
            finished_at: now,
            container_id: c
                .container_id
                .clone()
                .expect("a running container has an id"),
        });
        self.step()
    }

    /// The exited instance waits for its restart: `waiting: CrashLoopBackOff`,
    /// `lastState.terminated` of the exited instance, restartCount unchanged.
    pub fn back_off(&mut self, container: &str) -> Value {
        self.tick();
        let pod = format!("{}_{}({})", self.name, self.namespace, self.uid);
        let exited = self.restartable(container);
        let c = self.container_mut(container);
        c.state = ContainerState::Waiting {
            reason: "CrashLoopBackOff",
            message: Some(format!(
                "back-off 10s restarting failed container={container} pod={pod}"
            )),
        };
        c.last_terminated = Some(exited);
        self.step()
    }

    /// A new instance runs (after a back-off or at once): `running`, restartCount + 1,
    /// `lastState.terminated` of the instance before, a new containerID. Its log file is
    /// `<restartCount>.log`.
    pub fn restart(&mut self, container: &str) -> Value {
        self.tick();
        let now = self.clock;
        let uid = self.uid.clone();
        let exited = self.restartable(container);
        let c = self.container_mut(container);
        c.restart_count += 1;
        c.container_id = Some(container_id(&uid, container, c.restart_count));
        c.last_terminated = Some(exited);
        c.state = ContainerState::Running { started_at: now };
        self.step()
    }

    /// The pod worker has finished terminating the pod (no container runs nor will run again):
    /// the status may now show the terminal phase that `getPhase` gives. Panics while a
    /// container runs or will be restarted.
    pub fn finish(&mut self) -> Value {
        let computed = self.computed_phase();
        assert!(
            computed.is_terminal(),
            "pod {} still runs or restarts a container (phase {computed:?})",
            self.name
        );
        self.tick();
        self.finished = true;
        self.step()
    }

    /// The pod is deleted (gracefully): `metadata.deletionTimestamp` is set and nothing is
    /// restarted any more. The kubelet then stops the running containers (the test calls
    /// [`PodModel::exit`], e.g. with 143 after SIGTERM), the phase becomes terminal
    /// ([`PodModel::finish`]) and the object goes ([`FakeApi::delete`]).
    pub fn begin_deletion(&mut self) -> Value {
        self.tick();
        self.deleting_since.get_or_insert(self.clock);
        self.step()
    }

    /// The pod as the API returns it (without `metadata.resourceVersion`, left to the store).
    pub fn json(&self) -> Value {
        let string_map = |pairs: &[(String, String)]| -> Map<String, Value> {
            pairs
                .iter()
                .map(|(key, value)| (key.clone(), Value::from(value.as_str())))
                .collect()
        };
        let mut metadata = json!({
            "name": self.name,
            "namespace": self.namespace,
            "uid": self.uid,
            "creationTimestamp": timestamp(0),
            "labels": string_map(&self.labels),
            "annotations": string_map(&self.annotations),
        });
        if let Some(since) = self.deleting_since {
            metadata["deletionTimestamp"] = timestamp(since + TERMINATION_GRACE_SECONDS).into();
            metadata["deletionGracePeriodSeconds"] = TERMINATION_GRACE_SECONDS.into();
        }
        let specs: Vec<Value> = self
            .containers
            .iter()
            .map(|c| {
                let mut spec = json!({"name": c.name, "image": IMAGE, "resources": {}});
                let ports: Vec<Value> = self
                    .ports
                    .iter()
                    .filter(|(container, _, _)| *container == c.name)
                    .map(|(_, name, port)| {
                        json!({"name": name, "containerPort": port, "protocol": "TCP"})
                    })
                    .collect();
                if !ports.is_empty() {
                    spec["ports"] = ports.into();
                }
                spec
            })
            .collect();
        let statuses: Vec<Value> = self.containers.iter().map(ContainerModel::json).collect();
        // generateAPIPodStatus (pkg/kubelet/kubelet_pods.go, pkg/kubelet/status/generate.go):
        // ContainersReady and Ready are True when every container is ready (no readiness
        // gates, no probes here: ready follows running); a pod in a terminal phase is not
        // ready. Deletion alone does not change them: the containers run until they stop.
        let all_ready = self
            .containers
            .iter()
            .all(|c| matches!(c.state, ContainerState::Running { .. }))
            && !self.phase.is_terminal();
        let ready = if all_ready { "True" } else { "False" };
        let condition = |kind: &str, status: &str| {
            json!({"type": kind, "status": status, "lastProbeTime": null,
                   "lastTransitionTime": timestamp(0)})
        };
        let conditions = vec![
            condition("PodReadyToStartContainers", "True"),
            condition("Initialized", "True"),
            condition("Ready", ready),
            condition("ContainersReady", ready),
            condition("PodScheduled", "True"),
        ];
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": metadata,
            "spec": {
                "nodeName": self.node,
                "restartPolicy": self.restart_policy.as_str(),
                "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
                "containers": specs,
            },
            "status": {
                "phase": self.phase.as_str(),
                "conditions": conditions,
                "hostIP": "10.0.0.1",
                "podIP": self.pod_ip,
                "podIPs": [{"ip": self.pod_ip}],
                "startTime": timestamp(0),
                "qosClass": "BestEffort",
                "containerStatuses": statuses,
            },
        })
    }

    /// The phase `getPhase` gives for the containers' states now (what the status shows may
    /// still hold an earlier one, see [`PodModel::finish`]).
    pub fn computed_phase(&self) -> PodPhase {
        let (mut running, mut waiting, mut stopped, mut succeeded) = (0, 0, 0, 0);
        for c in &self.containers {
            match &c.state {
                ContainerState::Running { .. } => running += 1,
                ContainerState::Terminated(t) => {
                    stopped += 1;
                    if t.exit_code == 0 {
                        succeeded += 1;
                    }
                }
                ContainerState::Waiting { .. } if c.last_terminated.is_some() => stopped += 1,
                ContainerState::Waiting { .. } => waiting += 1,
            }
        }
        if waiting > 0 {
            PodPhase::Pending
        } else if running > 0 {
            PodPhase::Running
        } else if stopped == 0 {
            PodPhase::Pending
        } else if self.deleting_since.is_some() {
            if stopped == succeeded {
                PodPhase::Succeeded
            } else {
                PodPhase::Failed
            }
        } else {
            match self.restart_policy {
                RestartPolicy::Always => PodPhase::Running,
                _ if stopped == succeeded => PodPhase::Succeeded,
                RestartPolicy::Never => PodPhase::Failed,
                RestartPolicy::OnFailure => PodPhase::Running,
            }
        }
    }

    fn tick(&mut self) {
        self.clock += 1;
    }

    /// The status after a step: the phase follows the containers, except that a terminal phase
    /// waits for [`PodModel::finish`] and never changes again.
    fn step(&mut self) -> Value {
        let computed = self.computed_phase();
        if !self.phase.is_terminal() && (self.finished || !computed.is_terminal()) {
            self.phase = computed;
        }
        self.json()
    }

    /// The exited instance of a container the kubelet will start again; panics if it will not.
    fn restartable(&self, container: &str) -> Terminated {
        let c = self.container(container);
        let exited = match &c.state {
            ContainerState::Terminated(t) => t.clone(),
            ContainerState::Waiting { .. } if c.last_terminated.is_some() => {
                c.last_terminated.clone().expect("checked")
            }
            state => panic!("{container} has not exited: {state:?}"),
        };
        assert!(
            self.deleting_since.is_none() && !self.phase.is_terminal(),
            "pod {} is being deleted or has ended: {container} is not restarted",
            self.name
        );
        assert!(
            self.restart_policy.restarts(exited.exit_code),
            "restartPolicy {} does not restart {container} after exit code {}",
            self.restart_policy.as_str(),
            exited.exit_code
        );
        exited
    }

    fn container(&self, name: &str) -> &ContainerModel {
        self.containers
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("pod {} has no container {name:?}", self.name))
    }

    fn container_mut(&mut self, name: &str) -> &mut ContainerModel {
        let pod = self.name.clone();
        self.containers
            .iter_mut()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("pod {pod} has no container {name:?}"))
    }
}

impl ContainerModel {
    fn json(&self) -> Value {
        let running = matches!(self.state, ContainerState::Running { .. });
        let state = match &self.state {
            ContainerState::Waiting { reason, message } => {
                let mut waiting = json!({"reason": reason});
                if let Some(message) = message {
                    waiting["message"] = message.as_str().into();
                }
                json!({"waiting": waiting})
            }
            ContainerState::Running { started_at } => {
                json!({"running": {"startedAt": timestamp(*started_at)}})
            }
            ContainerState::Terminated(t) => json!({"terminated": t.json()}),
        };
        let last_state = self
            .last_terminated
            .as_ref()
            .map_or_else(|| json!({}), |t| json!({"terminated": t.json()}));
        let mut status = json!({
            "name": self.name,
            "state": state,
            "lastState": last_state,
            "ready": running,
            "restartCount": self.restart_count,
            "image": IMAGE,
            "imageID": if self.container_id.is_some() { IMAGE_ID } else { "" },
            "started": running,
        });
        if let Some(id) = &self.container_id {
            status["containerID"] = id.as_str().into();
        }
        status
    }
}

impl Terminated {
    fn json(&self) -> Value {
        json!({
            "exitCode": self.exit_code,
            "reason": self.reason,
            "startedAt": timestamp(self.started_at),
            "finishedAt": timestamp(self.finished_at),
            "containerID": self.container_id,
        })
    }
}

/// `containerd://` and 64 hex digits, different for every instance of a container.
fn container_id(uid: &str, container: &str, restart_count: u32) -> String {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut id = String::from("containerd://");
    for round in 0..4u8 {
        let mut hasher = DefaultHasher::new();
        (uid, container, restart_count, round).hash(&mut hasher);
        id.push_str(&format!("{:016x}", hasher.finish()));
    }
    id
}

/// RFC 3339 (whole seconds, as the API writes them), `seconds` after 2024-05-01T00:00:00Z.
fn timestamp(seconds: u64) -> String {
    let day = 1 + (seconds / 86_400).min(30);
    let seconds = seconds % 86_400;
    format!(
        "2024-05-{day:02}T{:02}:{:02}:{:02}Z",
        seconds / 3600,
        (seconds / 60) % 60,
        seconds % 60
    )
}

// ---------------------------------------------------------------------------------------------
// HTTP serving

async fn accept_loop(listener: tokio::net::TcpListener, addr: SocketAddr, shared: Arc<Shared>) {
    let mut listen = shared.listen.subscribe();
    let mut listener = Some(listener);
    loop {
        let want = *listen.borrow_and_update();
        if want && listener.is_none() {
            // Bound again on the same port (SO_REUSEADDR, so connections in TIME_WAIT do not
            // stand in the way); another process taking the port meanwhile is retried.
            match tokio::net::TcpListener::bind(addr).await {
                Ok(bound) => listener = Some(bound),
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            }
        } else if !want {
            // Dropping the socket closes it: connecting is refused from now on.
            listener = None;
        }
        shared
            .listening
            .update(|listening| *listening = listener.is_some());
        let Some(bound) = &listener else {
            if listen.changed().await.is_err() {
                return;
            }
            continue;
        };
        let stream = tokio::select! {
            accepted = bound.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            changed = listen.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let mut store = lock(&shared.store);
        if matches!(store.outage, Some(Outage::Reset | Outage::Refused)) {
            // Abortive close: the client sees a connection reset. (Refused: accepted just
            // before the socket closed.)
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

/// One line of a watch, with the resourceVersion the client knows the state as of once it has
/// the line (0: none, e.g. an `ERROR`).
struct WatchLine {
    bytes: Bytes,
    resource_version: u64,
}

/// A response body: a whole JSON document, or the lines of a watch as they come (chunked).
/// Lists and watch lines record what they deliver (for [`FakeApi::wait_delivered`]) when hyper
/// takes them to write.
enum ResponseBody {
    Full {
        bytes: Option<Bytes>,
        /// A list: the store's state as of this resourceVersion.
        delivers: Option<(Arc<Shared>, u64)>,
    },
    Stream {
        lines: mpsc::Receiver<WatchLine>,
        shared: Arc<Shared>,
    },
    /// A proxied backend's body, passed on as it arrives; its failure cuts this response.
    Proxied(Incoming),
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ResponseBody::Proxied(body) => Pin::new(body).poll_frame(cx),
            ResponseBody::Full { bytes, delivers } => {
                let frame = bytes.take();
                if frame.is_some()
                    && let Some((shared, resource_version)) = delivers.take()
                {
                    shared.mark_delivered(resource_version);
                }
                Poll::Ready(frame.map(|bytes| Ok(Frame::data(bytes))))
            }
            ResponseBody::Stream { lines, shared } => lines.poll_recv(cx).map(|line| {
                line.map(|line| {
                    shared.mark_delivered(line.resource_version);
                    Ok(Frame::data(line.bytes))
                })
            }),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Proxied(body) => body.is_end_stream(),
            other => matches!(other, ResponseBody::Full { bytes: None, .. }),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Full {
                bytes: Some(bytes), ..
            } => SizeHint::with_exact(bytes.len() as u64),
            ResponseBody::Full { bytes: None, .. } => SizeHint::with_exact(0),
            ResponseBody::Stream { .. } => SizeHint::default(),
            ResponseBody::Proxied(body) => body.size_hint(),
        }
    }
}

fn json_response(status: StatusCode, body: &Value) -> Response<ResponseBody> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("cache-control", "no-cache, private")
        .body(ResponseBody::Full {
            bytes: Some(Bytes::from(body.to_string())),
            delivers: None,
        })
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

/// kube-apiserver's 503: the `Status` of apimachinery's `errors.NewServiceUnavailable` (status
/// Failure, reason ServiceUnavailable, code 503, no details), with the message client-go also
/// gives a bodiless 503. No `Retry-After`: the server does not know when it will be ready.
fn unavailable_response() -> Response<ResponseBody> {
    json_response(
        StatusCode::SERVICE_UNAVAILABLE,
        &json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": "the server is currently unable to handle the request",
            "reason": "ServiceUnavailable",
            "code": 503,
        }),
    )
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
        if store.outage.is_some() {
            return unavailable_response();
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
    if let [
        "api",
        "v1",
        "namespaces",
        namespace,
        "services",
        service,
        "proxy",
        ..,
    ] = segments.as_slice()
    {
        let (namespace, service) = (namespace.to_string(), service.to_string());
        return proxy(shared, &namespace, &service, request).await;
    }
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

/// The service proxy (pkg/registry/core/service/proxy.go): `{name}[:{port}]` resolved to the
/// Service's backend, the path after `/proxy` and the query forwarded, the answer streamed
/// back with its status and headers. The API server authenticated the caller and removed
/// `Authorization` before proxying (apiserver's WithAuthentication), so the backend never
/// sees it. An unknown Service is the API's 404; a backend that cannot be reached is a 503
/// `Status` saying so, as the real proxy's error responder answers.
async fn proxy(
    shared: &Shared,
    namespace: &str,
    service: &str,
    request: Request<Incoming>,
) -> Response<ResponseBody> {
    let (name, port) = service.split_once(':').unwrap_or((service, ""));
    let found = lock(&shared.store)
        .services
        .get(&(namespace.to_owned(), name.to_owned()))
        .cloned();
    let backend = match found {
        Some((port_name, addr)) if port.is_empty() || port == port_name => addr,
        Some(_) => {
            return error_response(
                503,
                "ServiceUnavailable",
                &format!("no endpoints available for service \"{service}\""),
            );
        }
        None => {
            return error_response(404, "NotFound", &format!("services \"{name}\" not found"));
        }
    };
    let prefix = format!("/api/v1/namespaces/{namespace}/services/{service}/proxy");
    let uri = request.uri();
    let rest = uri.path().strip_prefix(&prefix).unwrap_or("/");
    let target = match uri.query() {
        Some(q) => format!("{}?{q}", if rest.is_empty() { "/" } else { rest }),
        None => if rest.is_empty() { "/" } else { rest }.to_owned(),
    };
    let unreachable = |e: &dyn std::fmt::Display| {
        error_response(
            503,
            "ServiceUnavailable",
            &format!("error trying to reach service: {e}"),
        )
    };
    let stream = match tokio::net::TcpStream::connect(backend).await {
        Ok(s) => s,
        Err(e) => return unreachable(&format!("dial tcp {backend}: {e}")),
    };
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
    {
        Ok(c) => c,
        Err(e) => return unreachable(&e),
    };
    tokio::spawn(conn);
    let mut forward = Request::builder().method(request.method()).uri(&target);
    for (k, v) in request.headers() {
        if k != hyper::header::AUTHORIZATION && k != hyper::header::HOST {
            forward = forward.header(k, v);
        }
    }
    let forward = forward
        .header(hyper::header::HOST, backend.to_string())
        .body(http_body_util::Empty::<Bytes>::new())
        .expect("request");
    match sender.send_request(forward).await {
        Ok(resp) => resp.map(ResponseBody::Proxied),
        Err(e) => unreachable(&e),
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

fn list(shared: &Arc<Shared>, selector: &Selector) -> Response<ResponseBody> {
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
    let mut response = json_response(StatusCode::OK, &body);
    if let ResponseBody::Full { delivers, .. } = response.body_mut() {
        *delivers = Some((shared.clone(), store.resource_version));
    }
    response
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

impl WatchLine {
    fn new(bytes: Bytes, resource_version: u64) -> WatchLine {
        WatchLine {
            bytes,
            resource_version,
        }
    }
}

/// What a watcher with `selector` sees of a change, if anything.
fn event_for(selector: &Selector, change: &Change) -> Option<WatchLine> {
    event_bytes_for(selector, change).map(|bytes| WatchLine::new(bytes, change.resource_version))
}

fn event_bytes_for(selector: &Selector, change: &Change) -> Option<Bytes> {
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
                    initial.push(WatchLine::new(
                        expired_line(version, store.oldest_watchable),
                        0,
                    ));
                    None
                } else {
                    Some(version)
                }
            }
            _ => {
                // "Get state and start at most recent": the current state as ADDED events first.
                for pod in store.pods.values().filter(|pod| selector.matches(pod)) {
                    initial.push(WatchLine::new(event_line("ADDED", pod), 0));
                }
                if send_initial_events {
                    initial.push(WatchLine::new(
                        bookmark_line(store.resource_version, true),
                        0,
                    ));
                }
                // Once the client has all of it, it has the state as of now.
                if let Some(last) = initial.last_mut() {
                    last.resource_version = store.resource_version;
                }
                Some(store.resource_version)
            }
        }
    };

    let (lines, body) = mpsc::channel(64);
    let pump_shared = shared.clone();
    let open = OpenWatch::new(shared.clone());
    tokio::spawn(async move {
        let _open = open;
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
        .body(ResponseBody::Stream {
            lines: body,
            shared: shared.clone(),
        })
        .expect("response")
}

/// Streams the changes after `cursor` to one watcher until its timeout or disconnection.
async fn pump(
    shared: Arc<Shared>,
    selector: Selector,
    mut cursor: u64,
    bookmarks: bool,
    timeout: Duration,
    lines: mpsc::Sender<WatchLine>,
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
                batch.push(WatchLine::new(
                    expired_line(cursor, store.oldest_watchable),
                    0,
                ));
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
            batch.push(WatchLine::new(bookmark_line(cursor, false), cursor));
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
