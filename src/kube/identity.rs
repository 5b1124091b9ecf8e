//! [`KubeIdentity`]: the ingest thread's answers about pod directories, from the pod cache,
//! and the rules for a directory whose pod the cache does not know.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::oneline::OneLine;
use tracing::{info, warn};

use super::KubeConfig;
use super::cache::{PodCache, PodUid};
use crate::metrics::Metrics;
use crate::task::{Identity, PodDir, TaskId, TaskIdentity};

/// How much earlier than its log directory a pod may have been created and seen.
const WATCH_LAG: Duration = Duration::from_secs(5);

/// The [`TaskIdentity`] backed by the pod cache.
pub struct KubeIdentity {
    cache: Arc<PodCache>,
    pending_timeout: Duration,
    /// Per pending pod: its directory's creation (`None` if it was gone when first looked
    /// at) and when it was first looked at.
    first_seen: HashMap<PodUid, (Option<Instant>, Instant)>,
    /// Pods already warned about as pending past the timeout, so the log says it once.
    warned_pending: HashSet<PodUid>,
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
            pending_timeout: cfg.pending_timeout,
            first_seen: HashMap::new(),
            warned_pending: HashSet::new(),
            metrics,
            log_root,
        }
    }
}

impl TaskIdentity for KubeIdentity {
    fn identify(&mut self, pod: &PodDir) -> Identity {
        if let Some(info) = self.cache.get(pod.uid.as_str()) {
            self.first_seen.remove(pod.uid.as_str());
            self.warned_pending.remove(pod.uid.as_str());
            return match info.task_id.as_deref().map(TaskId::new) {
                Some(Ok(id)) => Identity::Task(id),
                Some(Err(e)) => {
                    warn!(pod_dir = %pod.name, error = %OneLine(&e), "peon's task id cannot be used; archiving under _unmapped/");
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
                warn!(pod_dir = %pod.name, "pod log directory still unknown after pending_timeout and the pod list is not current (API unreachable?); its files are held unread until the API answers");
            }
            return Identity::Pending;
        };
        // The list the cache rests on must have completed after the directory appeared (or the
        // watch run unbroken since before), and the pod had pending_timeout to show up since.
        // An unrepresentable deadline (a huge pending_timeout) never comes.
        if born
            .max(current)
            .checked_add(self.pending_timeout)
            .is_none_or(|deadline| now < deadline)
        {
            return Identity::Pending;
        }
        self.first_seen.remove(pod.uid.as_str());
        self.warned_pending.remove(pod.uid.as_str());
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
        self.cache.peek(pod.uid.as_str(), |i| i.is_some())
    }

    fn container_finished(&mut self, pod: &PodDir) -> bool {
        self.cache
            .peek(pod.uid.as_str(), |i| i.is_some_and(|i| i.finished))
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
