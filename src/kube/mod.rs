//! Which pod runs which Druid task, from the Kubernetes API.
//!
//! One list+watch of this node's peon pods (`spec.nodeName=<node>`, label `druid.k8s.peons=true`)
//! feeds a cache keyed by pod uid; the ingest thread asks it through [`TaskIdentity`] about each
//! pod log directory `<namespace>_<pod>_<uid>`. Only the annotation `task.id` holds the exact
//! task id (labels and pod names are lossy). The watch runs on the async runtime and never
//! blocks ingest: while it is down or resyncing, known tasks keep flowing and new directories
//! are held open, unread, until their pod is known.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::metrics::Metrics;
use crate::task::{Identity, PodDir, TaskId, TaskIdentity};

/// `[kubernetes]` settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KubeConfig {
    /// Watch the API. Unset: on inside a cluster (`KUBERNETES_SERVICE_HOST` is set), off
    /// elsewhere, where the task id is the pod name.
    pub enabled: Option<bool>,
    /// Label selector of peon pods.
    pub label_selector: String,
    /// Annotation holding the exact task id.
    pub task_id_annotation: String,
    /// How long a log directory whose pod a current pod list has not shown is held before it
    /// is decided on: ignored if the pod directory is still there (the pod lives and is not a
    /// peon), archived under `_unmapped/` if it is gone (its metadata never arrived). Counted
    /// from the later of the directory's creation and the list; nothing is decided while the
    /// list is not current (API unreachable).
    pub pending_timeout_secs: u64,
    /// How long the metadata of a deleted pod is kept so its log can finish.
    pub deleted_retention_secs: u64,
}

impl KubeConfig {
    /// Whether to run the pod watch: as configured, or, when unset, whether the agent runs in a
    /// pod (`KUBERNETES_SERVICE_HOST` is set).
    pub fn is_enabled(&self) -> bool {
        self.enabled
            .unwrap_or_else(|| std::env::var_os("KUBERNETES_SERVICE_HOST").is_some())
    }
}

impl Default for KubeConfig {
    fn default() -> Self {
        KubeConfig {
            enabled: None,
            label_selector: "druid.k8s.peons=true".into(),
            task_id_annotation: "task.id".into(),
            pending_timeout_secs: 300,
            deleted_retention_secs: 3600,
        }
    }
}

/// What the watch knows of one pod.
#[derive(Debug, Clone)]
struct PodInfo {
    task_id: Option<String>,
    /// The log container has terminated (and not restarted).
    finished: bool,
    deleted_at: Option<Instant>,
}

/// The pod cache shared by the watch (writer) and the ingest thread (reader).
#[derive(Debug, Default)]
pub struct PodCache {
    pods: RwLock<HashMap<String, PodInfo>>,
    synced: AtomicBool,
    /// When the list the cache rests on completed, while the watch has run without an error
    /// since: the cache is current, and every peon that existed at any moment since then has
    /// been seen. `None` while the watch is broken (API down, answering 503, history expired)
    /// until its relist completes.
    current_since: std::sync::Mutex<Option<Instant>>,
}

impl PodCache {
    /// Whether the cache has held a complete list from the API once (for `/readyz`: known
    /// tasks flow during an outage, so readiness does not flap with the API).
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Relaxed)
    }

    /// How many pods the cache holds: this node's peons, and deleted ones for
    /// `deleted_retention_secs` (for `/metrics`: it must not grow without bound).
    pub fn len(&self) -> usize {
        self.pods.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether the cache holds no pod.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Since when the cache has been current, if it is now.
    fn current_since(&self) -> Option<Instant> {
        *self.current_since.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_current(&self, ok: bool) {
        let mut since = self.current_since.lock().unwrap_or_else(|e| e.into_inner());
        match (ok, *since) {
            (true, None) => *since = Some(Instant::now()),
            (false, _) => *since = None,
            _ => {}
        }
    }

    fn get(&self, uid: &str) -> Option<PodInfo> {
        self.peek(uid, |i| i.cloned())
    }

    /// Looks at a pod without cloning it: asked at every end of file.
    fn peek<R>(&self, uid: &str, f: impl FnOnce(Option<&PodInfo>) -> R) -> R {
        f(self.pods.read().unwrap_or_else(|e| e.into_inner()).get(uid))
    }
}

fn info_of(pod: &Pod, annotation: &str, container: &str) -> Option<(String, PodInfo)> {
    let uid = pod.metadata.uid.clone()?;
    let task_id = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(annotation))
        .cloned();
    Some((
        uid,
        PodInfo {
            task_id,
            finished: will_not_run_again(pod, container),
            deleted_at: None,
        },
    ))
}

/// Whether the log container of `pod` has ended for good, so its files will not grow.
///
/// The kubelet reports a container that exited as `state.terminated` whether or not it is about
/// to restart it: during a restart the status shows `terminated` (phase still `Running`), then
/// `waiting` (CrashLoopBackOff), then `running` with `restartCount + 1` and a new `<n>.log`.
/// So `terminated` alone means nothing; it is final only when no restart can follow: the phase is
/// terminal (`Succeeded`/`Failed`: no container of the pod will run again), or the pod's
/// `restartPolicy` rules a restart out (`Never`; `OnFailure` after exit code 0). A sidecar can
/// keep the phase `Running` long after `main` ended for good, hence the second rule.
fn will_not_run_again(pod: &Pod, container: &str) -> bool {
    let Some(status) = pod.status.as_ref() else {
        return false;
    };
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return true;
    }
    let Some(exit_code) = status
        .container_statuses
        .as_ref()
        .and_then(|cs| cs.iter().find(|c| c.name == container))
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.terminated.as_ref())
        .map(|t| t.exit_code)
    else {
        return false;
    };
    // The API's default; an unknown future value is treated like Always (keep following).
    let policy = pod
        .spec
        .as_ref()
        .and_then(|s| s.restart_policy.as_deref())
        .unwrap_or("Always");
    match policy {
        "Never" => true,
        "OnFailure" => exit_code == 0,
        _ => false,
    }
}

/// First and longest pause between two attempts to list and watch again after an error.
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// A watch that ran this long after its list was healthy: its failure starts the backoff over.
const WATCH_STABLE: Duration = Duration::from_secs(60);

/// Runs the list+watch until told to stop. After any error (API down, answering 503,
/// watch cut, 410 Gone) the watch is started again from a fresh list, with backoff: the cache
/// is "current" again only once a list completed after the error (kube's watcher would resume
/// from its last resourceVersion without a new list, and say nothing when it succeeds, leaving
/// no moment from which the cache is known to be current).
///
/// Ends when `stop` is cancelled (the last step of the shutdown), closing its connection to
/// the API.
pub async fn watch_pods(
    client: Client,
    cfg: KubeConfig,
    node: String,
    container: String,
    cache: Arc<PodCache>,
    stop: CancellationToken,
) {
    let api: Api<Pod> = Api::all(client);
    let wc = watcher::Config::default()
        .fields(&format!("spec.nodeName={node}"))
        .labels(&cfg.label_selector);
    let keep = Duration::from_secs(cfg.deleted_retention_secs);
    let mut retry = RETRY_FIRST;
    loop {
        let mut listed_at = None;
        let mut stream = watcher::watcher(api.clone(), wc.clone()).boxed();
        let mut relist: Option<HashSet<String>> = None;
        // Deleted pods are forgotten after their retention even if no relist comes.
        let mut prune =
            tokio::time::interval(keep.clamp(Duration::from_secs(1), Duration::from_secs(60)));
        let error = loop {
            let ev = tokio::select! {
                _ = stop.cancelled() => {
                    drop(stream);
                    info!("pod watch stopped");
                    return;
                }
                ev = stream.next() => ev,
                _ = prune.tick() => {
                    let mut pods = cache.pods.write().unwrap_or_else(|e| e.into_inner());
                    let now = Instant::now();
                    pods.retain(|_, i| i.deleted_at.is_none_or(|d| now.duration_since(d) < keep));
                    continue;
                }
            };
            let Some(ev) = ev else {
                break "the watch stream ended".to_owned();
            };
            let mut pods = cache.pods.write().unwrap_or_else(|e| e.into_inner());
            match ev {
                Ok(Event::Apply(pod)) | Ok(Event::InitApply(pod)) => {
                    if let Some((uid, info)) = info_of(&pod, &cfg.task_id_annotation, &container) {
                        if let Some(seen) = &mut relist {
                            seen.insert(uid.clone());
                        }
                        pods.insert(uid, info);
                    }
                }
                Ok(Event::Delete(pod)) => {
                    if let Some((uid, mut info)) =
                        info_of(&pod, &cfg.task_id_annotation, &container)
                    {
                        // Kept (as finished) so the log can be drained and archived.
                        info.finished = true;
                        info.deleted_at = Some(Instant::now());
                        pods.insert(uid, info);
                    }
                }
                Ok(Event::Init) => relist = Some(HashSet::new()),
                Ok(Event::InitDone) => {
                    // Pods missing from a relist were deleted while the watch was down.
                    let seen = relist.take().unwrap_or_default();
                    let now = Instant::now();
                    for (uid, info) in pods.iter_mut() {
                        if !seen.contains(uid) && info.deleted_at.is_none() {
                            info.finished = true;
                            info.deleted_at = Some(now);
                        }
                    }
                    pods.retain(|_, i| i.deleted_at.is_none_or(|d| now.duration_since(d) < keep));
                    cache.set_current(true);
                    listed_at = Some(now);
                    if !cache.synced.swap(true, Ordering::Relaxed) {
                        info!(pods = pods.len(), node = %node, "pod cache synced");
                    } else {
                        info!(pods = pods.len(), "pod list current again");
                    }
                }
                Err(e) => break e.to_string(),
            }
        };
        cache.set_current(false);
        // The backoff starts over only after a watch that held for a while: a watch that
        // fails right after its list (no watch permission, a proxy that cuts watches) must not
        // turn into a relist every half second.
        if listed_at.is_some_and(|t: Instant| t.elapsed() >= WATCH_STABLE) {
            retry = RETRY_FIRST;
        }
        warn!(error = %error, retry_in_ms = retry.as_millis() as u64,
            "pod watch failed; known tasks keep flowing, new pod directories wait until the pod list is current again");
        tokio::select! {
            _ = tokio::time::sleep(retry) => {}
            _ = stop.cancelled() => {
                info!("pod watch stopped");
                return;
            }
        }
        retry = (retry * 2).min(RETRY_MAX);
    }
}

/// How much earlier than its log directory a pod may have been created and seen.
const WATCH_LAG: Duration = Duration::from_secs(5);

/// The [`TaskIdentity`] backed by the pod cache.
pub struct KubeIdentity {
    cache: Arc<PodCache>,
    pending_timeout: Duration,
    /// Per pending pod: its directory's creation (`None` if it was gone when first looked
    /// at) and when it was first looked at.
    first_seen: HashMap<String, (Option<Instant>, Instant)>,
    /// Pods already warned about as pending past the timeout, so the log says it once.
    warned_pending: HashSet<String>,
    metrics: Arc<Metrics>,
    log_root: std::path::PathBuf,
}

impl KubeIdentity {
    /// Answers from `cache`, which the pod watch fills; asks no API itself. `log_root` is where
    /// pending pod directories are dated (the pending timeout counts from their creation) and,
    /// once it is up, looked for: still there means "not a peon", gone usually means "archive
    /// under `_unmapped/`".
    pub fn new(
        cache: Arc<PodCache>,
        cfg: &KubeConfig,
        log_root: std::path::PathBuf,
        metrics: Arc<Metrics>,
    ) -> Self {
        KubeIdentity {
            cache,
            pending_timeout: Duration::from_secs(cfg.pending_timeout_secs),
            first_seen: HashMap::new(),
            warned_pending: HashSet::new(),
            metrics,
            log_root,
        }
    }
}

impl TaskIdentity for KubeIdentity {
    fn identify(&mut self, pod: &PodDir) -> Identity {
        if let Some(info) = self.cache.get(&pod.uid) {
            self.first_seen.remove(&pod.uid);
            self.warned_pending.remove(&pod.uid);
            return match info.task_id.as_deref().map(TaskId::new) {
                Some(Ok(id)) => Identity::Task(id),
                Some(Err(e)) => {
                    warn!(pod_dir = %pod.name, error = %e, "peon's task id cannot be used; archiving under _unmapped/");
                    self.metrics.unmapped_tasks.fetch_add(1, Ordering::Relaxed);
                    Identity::Task(TaskId::unmapped(pod))
                }
                None => {
                    warn!(pod_dir = %pod.name, "peon pod has no task id annotation; archiving under _unmapped/");
                    self.metrics.unmapped_tasks.fetch_add(1, Ordering::Relaxed);
                    Identity::Task(TaskId::unmapped(pod))
                }
            };
        }
        let dir = self.log_root.join(&pod.name);
        // Unknown when the directory is gone before it was first looked at (after an agent
        // restart): then nothing may be concluded from the watch having run since "birth".
        let now = Instant::now();
        let (born_at, first_looked) = *self
            .first_seen
            .entry(pod.uid.clone())
            .or_insert_with(|| (created(&dir), now));
        let born = born_at.unwrap_or(first_looked);
        let Some(current) = self.cache.current_since() else {
            // Without a current pod list nothing can be concluded, however long that takes:
            // the pod may be a peon that started while the API was unreachable.
            if now.duration_since(born) >= self.pending_timeout
                && self.warned_pending.insert(pod.uid.clone())
            {
                warn!(pod_dir = %pod.name, "pod log directory still unknown after pending_timeout_secs and the pod list is not current (API unreachable?); its files are held unread until the API answers");
            }
            return Identity::Pending;
        };
        // The list the cache rests on must have completed after the directory appeared (or the
        // watch run unbroken since before), and the pod had pending_timeout to show up since.
        // An unrepresentable deadline (a huge pending_timeout_secs) never comes.
        if born
            .max(current)
            .checked_add(self.pending_timeout)
            .is_none_or(|deadline| now < deadline)
        {
            return Identity::Pending;
        }
        self.first_seen.remove(&pod.uid);
        self.warned_pending.remove(&pod.uid);
        if dir.is_dir() {
            // The pod lives and a current list of this node's peons does not show it. (A
            // peon deleted while the watch was broken loses its directory to the kubelet's
            // garbage collection well within the default pending timeout.)
            Identity::Ignore
        } else if born_at
            .and_then(|b| b.checked_sub(WATCH_LAG))
            .is_some_and(|t| current <= t)
        {
            // The pod existed while the watch ran without a break, and the watch never showed
            // it: not a peon (a short-lived pod of another app), so its log is not ours to ship.
            info!(pod_dir = %pod.name, "pod gone and never listed by an unbroken watch of peons: not a peon pod; its log is not read");
            Identity::Ignore
        } else {
            warn!(pod_dir = %pod.name, "pod gone before its metadata arrived; archiving its log under _unmapped/");
            self.metrics.unmapped_tasks.fetch_add(1, Ordering::Relaxed);
            Identity::Task(TaskId::unmapped(pod))
        }
    }

    fn is_peon(&mut self, pod: &PodDir) -> bool {
        self.cache.peek(&pod.uid, |i| i.is_some())
    }

    fn container_finished(&mut self, pod: &PodDir) -> bool {
        self.cache.peek(&pod.uid, |i| i.is_some_and(|i| i.finished))
    }
}

/// When a pod's log directory was created, as an `Instant`: the pending timeout counts from
/// there, so an agent restart does not start it again. `None` if the directory is gone; now if
/// the file system cannot say.
fn created(dir: &std::path::Path) -> Option<Instant> {
    let now = Instant::now();
    let md = std::fs::metadata(dir).ok()?;
    Some(
        md.created()
            .or_else(|_| md.modified())
            .ok()
            .and_then(|t| std::time::SystemTime::now().duration_since(t).ok())
            .and_then(|age| now.checked_sub(age))
            .unwrap_or(now),
    )
}

/// The client the standard way: in-cluster config inside a pod, `KUBECONFIG` (or
/// `~/.kube/config`) otherwise; plain `http://` servers included.
///
/// The client's own retries of 429/503/504 are off: they would hide an outage of minutes from
/// the watcher (15 retries with backoff), which would then believe its pod list current while
/// no event can arrive. The watch loop retries on its own, and knows it is doing so.
pub async fn client() -> Result<Client, kube::Error> {
    let mut config = kube::Config::infer()
        .await
        .map_err(kube::Error::InferConfig)?;
    config.default_retry = false;
    Client::try_from(config)
}
