//! The task registry: what readers (the HTTP endpoint) may know about this node's tasks.
//!
//! The ingest thread publishes an entry when it learns a task's id and whenever the task's
//! phase changes; readers look task ids up here and nowhere else (a request path never becomes
//! a file path). The lock is held only to clone an `Arc`, never while reading a spool, so
//! readers cannot slow ingest down.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use crate::checkpoint::Phase;
use crate::spool::Spool;
use crate::task::{PodDir, TaskId};

/// One task as readers see it.
#[derive(Debug, Clone)]
pub struct TaskEntry {
    /// The exact Druid task id: the registry's key, and what the HTTP path names.
    pub task_id: TaskId,
    /// The pod directory it is read from; [`Registry::remove`] checks it, as a newer pod may
    /// take the id over.
    pub pod: PodDir,
    /// The log itself: readers read it directly, never through the ingest thread.
    pub spool: Arc<Spool>,
    /// Where the lifecycle stands; a follow request ends once the task is no longer running
    /// and everything is sent.
    pub phase: Phase,
    /// Where the last successful archive went.
    pub archived_to: Option<String>,
    /// The last archive error, while the archive is being retried.
    pub archive_error: Option<String>,
    /// Multipart parts stored so far for the current archive, and the bytes they hold.
    pub uploaded_parts: usize,
    /// Bytes those parts hold, of the uploaded stream: spool-file bytes with `gzip`, text
    /// otherwise.
    pub uploaded_bytes: u64,
    /// Bytes in the task's open files not read yet (as of the last poll).
    pub lag_bytes: u64,
}

impl TaskEntry {
    /// `running`, `finishing` (ended, archive pending), `failed` (archive failing, retried) or
    /// `archived`.
    pub fn state(&self) -> &'static str {
        match self.phase {
            Phase::Running => "running",
            Phase::Ended if self.archive_error.is_some() => "failed",
            Phase::Ended => "finishing",
            Phase::Archived { .. } => "archived",
        }
    }

    /// Whether the log can still grow.
    pub fn is_running(&self) -> bool {
        self.phase == Phase::Running
    }
}

/// A pod log directory whose pod is not known yet: its files are held open, unread, until
/// the Kubernetes API says whose they are. Listed so that an operator sees what an API outage
/// holds back.
#[derive(Debug, Clone)]
pub struct PendingPod {
    /// The pod directory held back.
    pub pod: PodDir,
    /// When the agent first saw the directory (ms since the epoch; the pending timeout counts
    /// from the directory's creation as the file system dates it).
    pub since_ms: u64,
    /// When this process first saw it (a monotonic clock): what the pending age in `/metrics`
    /// counts from, so that neither a clock step nor an agent restart, after which the
    /// directory is held again only until a current pod list has not shown it, moves it.
    pub held_since: Instant,
}

/// The tasks (and pending pod directories) of this node, as readers may see them.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    inner: Arc<RwLock<HashMap<TaskId, Arc<TaskEntry>>>>,
    pending: Arc<RwLock<Vec<PendingPod>>>,
}

impl Registry {
    /// The entry for the task id `id` of a request; `None` for unknown ids and for strings that
    /// are no task id.
    pub fn get(&self, id: &str) -> Option<Arc<TaskEntry>> {
        let map = self.inner.read().unwrap_or_else(|e| e.into_inner());
        // Ids that could never be task ids are not even hashed against real ones.
        let id = TaskId::new(id).ok()?;
        map.get(&id).cloned()
    }

    /// Every entry, sorted by task id, for `/tasks`.
    pub fn all(&self) -> Vec<Arc<TaskEntry>> {
        let map = self.inner.read().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = map.values().cloned().collect();
        v.sort_by(|a, b| a.task_id.cmp(&b.task_id));
        v
    }

    /// Replaces the list of pending pod directories.
    pub fn set_pending(&self, pending: Vec<PendingPod>) {
        *self.pending.write().unwrap_or_else(|e| e.into_inner()) = pending;
    }

    /// The pod directories waiting for their pod's metadata.
    pub fn pending(&self) -> Vec<PendingPod> {
        self.pending
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Adds or replaces the entry of its task id. Ingest publishes a whole new entry on every
    /// change, so readers never see one half updated.
    pub fn publish(&self, entry: TaskEntry) {
        let mut map = self.inner.write().unwrap_or_else(|e| e.into_inner());
        map.insert(entry.task_id.clone(), Arc::new(entry));
    }

    /// Removes the entry of `id` if it still belongs to the pod directory `pod_dir` (a newer
    /// pod may have taken the id over).
    pub fn remove(&self, id: &TaskId, pod_dir: &str) {
        let mut map = self.inner.write().unwrap_or_else(|e| e.into_inner());
        if map.get(id).is_some_and(|e| e.pod.name == pod_dir) {
            map.remove(id);
        }
    }
}
