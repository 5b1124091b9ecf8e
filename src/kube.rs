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
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use serde::{Deserialize, Serialize};
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
    /// How long a log directory whose pod the watch has not shown is held before it is
    /// decided on: ignored if the pod directory is still there (the pod lives and is not a
    /// peon), archived under `_unmapped/` if it is gone (its metadata never arrived).
    pub pending_timeout_secs: u64,
    /// How long the metadata of a deleted pod is kept so its log can finish.
    pub deleted_retention_secs: u64,
}

impl KubeConfig {
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
    /// Since when the watch has run without a break (no error since its last complete list):
    /// every peon that existed at any moment since then has been seen.
    unbroken_since: std::sync::Mutex<Option<Instant>>,
}

impl PodCache {
    /// Whether the cache holds a complete list from the API (for `/readyz`).
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Relaxed)
    }

    /// Whether the watch has been unbroken since `t`.
    fn unbroken_since(&self, t: Instant) -> bool {
        self.unbroken_since
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|since| since <= t)
    }

    fn set_unbroken(&self, ok: bool) {
        let mut since = self
            .unbroken_since
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match (ok, *since) {
            (true, None) => *since = Some(Instant::now()),
            (false, _) => *since = None,
            _ => {}
        }
    }

    fn get(&self, uid: &str) -> Option<PodInfo> {
        self.pods
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(uid)
            .cloned()
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
    let finished = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.name == container))
        .and_then(|c| c.state.as_ref())
        .is_some_and(|s| s.terminated.is_some());
    Some((
        uid,
        PodInfo {
            task_id,
            finished,
            deleted_at: None,
        },
    ))
}

/// Runs the list+watch until the process ends, with the watcher's backoff on errors (API
/// down, 410 Gone, timeouts all end in a relist).
pub async fn watch_pods(
    client: Client,
    cfg: KubeConfig,
    node: String,
    container: String,
    cache: Arc<PodCache>,
) {
    let api: Api<Pod> = Api::all(client);
    let wc = watcher::Config::default()
        .fields(&format!("spec.nodeName={node}"))
        .labels(&cfg.label_selector);
    let mut stream = watcher::watcher(api, wc).default_backoff().boxed();
    let mut relist: Option<HashSet<String>> = None;
    while let Some(ev) = stream.next().await {
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
                if let Some((uid, mut info)) = info_of(&pod, &cfg.task_id_annotation, &container) {
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
                let keep = Duration::from_secs(cfg.deleted_retention_secs);
                pods.retain(|_, i| i.deleted_at.is_none_or(|d| now.duration_since(d) < keep));
                cache.set_unbroken(true);
                if !cache.synced.swap(true, Ordering::Relaxed) {
                    info!(pods = pods.len(), node = %node, "pod cache synced");
                }
            }
            Err(e) => {
                cache.set_unbroken(false);
                warn!(error = %e, "pod watch failed; known tasks keep flowing, retrying with backoff");
            }
        }
    }
}

/// How much earlier than its log directory a pod may have been created and seen.
const WATCH_LAG: Duration = Duration::from_secs(5);

/// The [`TaskIdentity`] backed by the pod cache.
pub struct KubeIdentity {
    cache: Arc<PodCache>,
    pending_timeout: Duration,
    first_seen: HashMap<String, Instant>,
    metrics: Arc<Metrics>,
    log_root: std::path::PathBuf,
}

impl KubeIdentity {
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
            metrics,
            log_root,
        }
    }
}

impl TaskIdentity for KubeIdentity {
    fn identify(&mut self, pod: &PodDir) -> Identity {
        if let Some(info) = self.cache.get(&pod.uid) {
            self.first_seen.remove(&pod.uid);
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
        let since = *self
            .first_seen
            .entry(pod.uid.clone())
            .or_insert_with(|| created(&dir));
        if !self.cache.is_synced() || since.elapsed() < self.pending_timeout {
            return Identity::Pending;
        }
        self.first_seen.remove(&pod.uid);
        if dir.is_dir() {
            // The pod lives and a synced watch of this node's peons does not list it.
            Identity::Ignore
        } else if since
            .checked_sub(WATCH_LAG)
            .is_some_and(|t| self.cache.unbroken_since(t))
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

    fn container_finished(&mut self, pod: &PodDir) -> bool {
        self.cache.get(&pod.uid).is_some_and(|i| i.finished)
    }
}

/// When a pod's log directory was created, as an `Instant`: the pending timeout counts from
/// there, so an agent restart does not start it again. Now if the file system cannot say.
fn created(dir: &std::path::Path) -> Instant {
    let now = Instant::now();
    std::fs::metadata(dir)
        .and_then(|m| m.created().or_else(|_| m.modified()))
        .ok()
        .and_then(|t| std::time::SystemTime::now().duration_since(t).ok())
        .and_then(|age| now.checked_sub(age))
        .unwrap_or(now)
}

/// The client the standard way: in-cluster config inside a pod, `KUBECONFIG` (or
/// `~/.kube/config`) otherwise; plain `http://` servers included.
pub async fn client() -> Result<Client, kube::Error> {
    Client::try_default().await
}
