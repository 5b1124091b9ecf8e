//! What the ingest thread and the archive worker say to each other: a [`Job`] out, an
//! [`Outcome`] back. Both carry everything an attempt needs or learnt, so the worker keeps no
//! state between jobs and the checkpoint alone resumes an archive after a restart.

use std::sync::Arc;

use crate::archive::upload::UploadState;
use crate::spool::{LogOffset, Spool, SpoolFileOffset};
use crate::task::{PodDir, TaskId};

/// What Druid's overlord writes when a peon left no log, so that Druid's reader (which breaks on
/// an empty object) and users see why.
pub fn placeholder(task: &TaskId) -> String {
    format!(
        "Peon for task [{task}] did not report any logs. Check k8s metrics and events for the pod to see what happened."
    )
}

/// Where a log came from, for object metadata.
#[derive(Debug, Clone, Default)]
pub struct Origin {
    /// Kubernetes namespace of the peon pod (`namespace` metadata).
    pub namespace: String,
    /// Pod name (`pod` metadata): Druid derives it from the task id lossily, so the id cannot be
    /// read back from it.
    pub pod: String,
    /// Pod uid (`pod-uid` metadata): tells apart pods of one name over time.
    pub pod_uid: crate::task::PodUid,
    /// This node's name (`node` metadata), when configured.
    pub node: Option<String>,
    /// When the agent first saw the task, ms since the epoch (`first-seen-ms` metadata).
    pub first_seen_ms: u64,
}

/// Work for the archive worker.
#[derive(Debug, Clone)]
pub struct Job {
    /// The task's key in ingest (`<namespace>_<pod>_<uid>`); the outcome carries it back.
    pub pod_dir: PodDir,
    /// The archive name: the object key or file name is derived from it.
    pub task: TaskId,
    /// Where the bytes come from; only the committed prefix named by `kind` may be read.
    pub spool: Arc<Spool>,
    /// Upload progress as ingest last recorded it: the worker resumes from it and keeps no state.
    pub state: UploadState,
    /// Object metadata; only the S3 target stores it.
    pub origin: Origin,
    /// What to store.
    pub kind: JobKind,
}

/// What a [`Job`] asks for. Lengths come in pairs, text and spool file, as the uploaded
/// stream is one or the other (`gzip`); both name the same committed point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    /// The task runs: store whole parts of the first `committed` bytes of text
    /// (`committed_file` bytes of the spool file).
    Parts {
        /// Committed bytes of log text.
        committed: LogOffset,
        /// Committed bytes of the spool file, at the same point.
        committed_file: SpoolFileOffset,
    },
    /// The log is complete at `len` bytes of text (`file_len` bytes of spool file): store
    /// the rest and make the archive visible.
    Finish {
        /// Bytes of log text, as committed at the end.
        len: LogOffset,
        /// Bytes of the spool file at the same point.
        file_len: SpoolFileOffset,
    },
}

/// The archive worker's answer to a [`Job`]. Ingest records it in the next checkpoint, so a
/// restart neither loses nor repeats stored parts.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Parts were stored (or an upload was started); the state to checkpoint.
    Progress {
        /// The task's key in ingest.
        pod_dir: PodDir,
        /// The new upload state, to checkpoint.
        state: UploadState,
    },
    /// The archive is complete and visible at `location`.
    Done {
        /// The task's key in ingest.
        pod_dir: PodDir,
        /// The archive name.
        task: TaskId,
        /// Bytes of log text archived. The task counts as archived only if its spool still
        /// holds exactly this much; if it wrote meanwhile, it is archived again.
        len: LogOffset,
        /// Where the log went (a file path or an `s3://` URL), shown by `/tasks`.
        location: String,
    },
    /// The attempt failed; ingest keeps the spool and retries with backoff.
    Failed {
        /// The task's key in ingest.
        pod_dir: PodDir,
        /// The archive name.
        task: TaskId,
        /// The error as text, for the log and `/tasks`.
        error: String,
        /// Retrying soon will not help (access denied, no such bucket, no part number left):
        /// the retry starts at a quarter of the longest backoff rather than at one second (it
        /// is still retried: credentials may be fixed).
        permanent: bool,
        /// Progress made before the failure, to keep.
        state: UploadState,
    },
    /// Dropped unstarted because the agent is stopping; the next agent redoes it.
    Skipped {
        /// The task's key in ingest.
        pod_dir: PodDir,
    },
}

impl Outcome {
    /// The task the outcome is about, whatever the variant, so ingest can always find it and
    /// clear its job in flight.
    pub fn pod_dir(&self) -> &PodDir {
        match self {
            Outcome::Progress { pod_dir, .. }
            | Outcome::Done { pod_dir, .. }
            | Outcome::Failed { pod_dir, .. }
            | Outcome::Skipped { pod_dir } => pod_dir,
        }
    }
}
