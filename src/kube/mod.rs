//! Which pod runs which Druid task, from the Kubernetes API.
//!
//! One list+watch of this node's peon pods (`spec.nodeName=<node>`, label `druid.k8s.peons=true`)
//! feeds a cache keyed by pod uid; the ingest thread asks it through
//! [`TaskIdentity`](crate::task::TaskIdentity) about each pod log directory
//! `<namespace>_<pod>_<uid>`. Only the annotation `task.id` holds the exact task id (labels and
//! pod names are lossy). The watch runs on the async runtime and never
//! blocks ingest: while it is down or resyncing, known tasks keep flowing and new directories
//! are held open, unread, until their pod is known.
//!
//! Here: the settings and the client. `watch` runs the list+watch into the `cache`, `status`
//! decides from a pod's status whether its log is over, `identity` answers the ingest thread.

mod cache;
mod identity;
mod status;
mod watch;

use std::time::Duration;

use kube::Client;
use serde::{Deserialize, Serialize};

pub use cache::{PodCache, PodUid};
pub use identity::KubeIdentity;
pub use watch::watch_pods;

/// `[kubernetes]` settings; also flags and `DLA_*` variables (see [`crate::config`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct KubeConfig {
    /// Map pods to task ids with a watch of this node's peon pods (needs NODE_NAME, and
    /// in-cluster config or KUBECONFIG). Unset: on inside a cluster (KUBERNETES_SERVICE_HOST
    /// is set), off elsewhere, where the task id is the pod name.
    #[arg(long = "kubernetes")]
    pub enabled: Option<bool>,
    /// Label selector of peon pods.
    #[arg(long = "peon-label-selector")]
    pub label_selector: String,
    /// Pod annotation holding the exact task id.
    #[arg(long)]
    pub task_id_annotation: String,
    /// Hold a log directory whose pod is unknown this long before deciding on it.
    ///
    /// How long a log directory whose pod a current pod list has not shown is held before it
    /// is decided on: ignored if the pod directory is still there (the pod lives and is not a
    /// peon), archived under `_unmapped/` if it is gone (its metadata never arrived). Counted
    /// from the later of the directory's creation and the list; nothing is decided while the
    /// list is not current (API unreachable).
    #[arg(long, value_name = "DURATION", value_parser = crate::units::parse_duration)]
    #[serde(with = "crate::units::duration")]
    pub pending_timeout: Duration,
    /// How long the metadata of a deleted pod is kept so its log can finish.
    #[arg(long = "deleted-retention", value_name = "DURATION", value_parser = crate::units::parse_duration)]
    #[serde(with = "crate::units::duration")]
    pub deleted_retention: Duration,
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
            pending_timeout: Duration::from_secs(300),
            deleted_retention: Duration::from_secs(3600),
        }
    }
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
