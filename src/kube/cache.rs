//! The pod cache: what the watch has learned of this node's peon pods, keyed by pod uid, and
//! whether it is current. The watch writes it; the ingest thread and the HTTP side read it.

use std::collections::HashMap;

pub use crate::task::PodUid;
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// What the watch knows of one pod.
#[derive(Debug, Clone)]
pub(super) struct PodInfo {
    pub(super) task_id: Option<String>,
    /// The log container has terminated (and not restarted).
    pub(super) finished: bool,
    pub(super) deleted_at: Option<Instant>,
}

/// The pod cache shared by the watch (writer) and the ingest thread (reader).
#[derive(Debug, Default)]
pub struct PodCache {
    pub(super) pods: RwLock<HashMap<PodUid, PodInfo>>,
    pub(super) synced: AtomicBool,
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
    /// `deleted_retention` (for `/metrics`: it must not grow without bound).
    pub fn len(&self) -> usize {
        self.pods.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether the cache holds no pod.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Since when the cache has been current, if it is now.
    pub(super) fn current_since(&self) -> Option<Instant> {
        *self.current_since.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the watch runs unbroken on a completed list (`true`), or broke (`false`).
    pub(super) fn set_current(&self, ok: bool) {
        let mut since = self.current_since.lock().unwrap_or_else(|e| e.into_inner());
        match (ok, *since) {
            (true, None) => *since = Some(Instant::now()),
            (false, _) => *since = None,
            _ => {}
        }
    }

    pub(super) fn get(&self, uid: &str) -> Option<PodInfo> {
        self.peek(uid, |i| i.cloned())
    }

    /// Looks at a pod without cloning it: asked at every end of file.
    pub(super) fn peek<R>(&self, uid: &str, f: impl FnOnce(Option<&PodInfo>) -> R) -> R {
        f(self.pods.read().unwrap_or_else(|e| e.into_inner()).get(uid))
    }
}
