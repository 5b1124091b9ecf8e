//! Where a task's log goes: the archive worker and its targets.
//!
//! The ingest thread decides *what* to archive and *when* (only committed spool bytes, only a
//! committed end) and sends [`Job`]s; the worker, on the async runtime, does the I/O and sends
//! back [`Outcome`]s, which ingest records in the checkpoint. The worker keeps no state of its
//! own between jobs: everything it needs to resume is in the job, so a restart resumes from the
//! checkpoint alone.

pub mod s3;

use std::fs;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc};

use crate::archive::s3::{PartNumber, PartSizes};
use crate::spool::{Spool, SpoolError};
use crate::task::TaskId;

/// Why an archive attempt failed. It reaches ingest as text in [`Outcome::Failed`]; the spool
/// is kept and the attempt retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// A local write failed (the directory target).
    #[error("archive of task {task} to {target}: {op}: {source}")]
    Io {
        /// Task id whose archive failed.
        task: String,
        /// The destination as the user knows it: the file path.
        target: String,
        /// The failed step ("create directory", "write", "fsync", "rename", ...).
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// The spool could not be read back: a fault of this node, not of the target.
    #[error("archive of task {task}: reading its spool: {source}")]
    Spool {
        /// Task id whose archive failed.
        task: String,
        /// The spool's error, which says what to do.
        source: SpoolError,
    },
    /// A remote store refused or failed the request. Not constructed today: the S3 target reports
    /// its failures straight into [`Outcome::Failed`].
    #[error("archive of task {task} to {target}: {message}")]
    Remote {
        /// Task id whose archive failed.
        task: String,
        /// The destination as the user knows it (bucket and key).
        target: String,
        /// The store's answer, with its error code where it gave one.
        message: String,
        /// Retrying soon will not help (access denied, no such bucket, bad credentials).
        permanent: bool,
    },
}

impl ArchiveError {
    /// Whether retrying soon is pointless; the retry then starts at a quarter of the longest
    /// backoff rather than at one second (it is still retried: credentials may be fixed).
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            ArchiveError::Remote {
                permanent: true,
                ..
            }
        )
    }
}

/// What Druid's overlord writes when a peon left no log, so that Druid's reader (which breaks on
/// an empty object) and users see why.
pub fn placeholder(task: &TaskId) -> String {
    format!(
        "Peon for task [{task}] did not report any logs. Check k8s metrics and events for the pod to see what happened."
    )
}

/// A multipart part already stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    /// S3 part number; parts are numbered without gaps, from 1, in stream order.
    pub number: PartNumber,
    /// The ETag S3 returned for the part; CompleteMultipartUpload needs all of them.
    pub etag: String,
    /// End of the part in the uploaded byte stream; parts are contiguous from 0.
    pub end: u64,
}

/// How far a task's archive has got; lives in the checkpoint so a restart resumes it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadState {
    /// S3 multipart upload id; `None` until the upload is created. A restart resumes this upload
    /// rather than starting another (an abandoned one costs storage until it expires).
    pub upload_id: Option<String>,
    /// Parts stored, in order, contiguous from byte 0 of the uploaded stream (the text, or the
    /// spool file itself with `gzip`).
    pub parts: Vec<Part>,
    /// CompleteMultipartUpload was sent; after a crash its success must be checked, not
    /// assumed or repeated blindly.
    #[serde(default)]
    pub completing: bool,
}

impl UploadState {
    /// Bytes of the uploaded stream already stored: text bytes, or spool-file bytes with `gzip`.
    pub fn uploaded(&self) -> u64 {
        self.parts.last().map_or(0, |p| p.end)
    }

    /// The number the next part gets; `None` once S3's last part number is used.
    pub fn next_part_number(&self) -> Option<PartNumber> {
        match self.parts.last() {
            None => Some(PartNumber::FIRST),
            Some(p) => p.number.next(),
        }
    }
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
    pub pod_uid: String,
    /// This node's name (`node` metadata), when configured.
    pub node: Option<String>,
    /// When the agent first saw the task, ms since the epoch (`first-seen-ms` metadata).
    pub first_seen_ms: u64,
}

/// Work for the archive worker.
#[derive(Debug, Clone)]
pub struct Job {
    /// The task's key in ingest (`<namespace>_<pod>_<uid>`); the outcome carries it back.
    pub pod_dir: String,
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
        committed: u64,
        /// Committed bytes of the spool file, at the same point.
        committed_file: u64,
    },
    /// The log is complete at `len` bytes of text (`file_len` bytes of spool file): store
    /// the rest and make the archive visible.
    Finish {
        /// Bytes of log text, as committed at the end.
        len: u64,
        /// Bytes of the spool file at the same point.
        file_len: u64,
    },
}

/// The archive worker's answer to a [`Job`]. Ingest records it in the next checkpoint, so a
/// restart neither loses nor repeats stored parts.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Parts were stored (or an upload was started); the state to checkpoint.
    Progress {
        /// The task's key in ingest.
        pod_dir: String,
        /// The new upload state, to checkpoint.
        state: UploadState,
    },
    /// The archive is complete and visible at `location`.
    Done {
        /// The task's key in ingest.
        pod_dir: String,
        /// The archive name.
        task: TaskId,
        /// Bytes of log text archived. The task counts as archived only if its spool still
        /// holds exactly this much; if it wrote meanwhile, it is archived again.
        len: u64,
        /// Where the log went (a file path or an `s3://` URL), shown by `/tasks`.
        location: String,
    },
    /// The attempt failed; ingest keeps the spool and retries with backoff.
    Failed {
        /// The task's key in ingest.
        pod_dir: String,
        /// The archive name.
        task: TaskId,
        /// The error as text, for the log and `/tasks`.
        error: String,
        /// See [`ArchiveError::is_permanent`]: the retry waits longer.
        permanent: bool,
        /// Progress made before the failure, to keep.
        state: UploadState,
    },
    /// Dropped unstarted because the agent is stopping; the next agent redoes it.
    Skipped {
        /// The task's key in ingest.
        pod_dir: String,
    },
}

impl Outcome {
    /// The task the outcome is about, whatever the variant, so ingest can always find it and
    /// clear its job in flight.
    pub fn pod_dir(&self) -> &str {
        match self {
            Outcome::Progress { pod_dir, .. }
            | Outcome::Done { pod_dir, .. }
            | Outcome::Failed { pod_dir, .. }
            | Outcome::Skipped { pod_dir } => pod_dir,
        }
    }
}

/// The archive destinations the agent knows.
pub enum Target {
    /// A directory: Druid reads it with `FileTaskLogs` (usually a shared volume).
    Dir(DirArchive),
    /// S3 or an S3-compatible store, in parts while the task runs.
    S3(crate::archive::s3::S3Target),
}

impl Target {
    /// Whether this target stores a log in parts while the task runs (then ingest sends
    /// `Parts` jobs), with the part sizes.
    pub fn part_sizes(&self) -> Option<PartSizes> {
        match self {
            Target::Dir(_) => None,
            Target::S3(s) => Some(s.part_sizes()),
        }
    }

    async fn run(&self, job: Job) -> Outcome {
        match self {
            Target::S3(s) => s.run(job).await,
            Target::Dir(d) => {
                let JobKind::Finish { len, .. } = job.kind else {
                    return Outcome::Progress {
                        pod_dir: job.pod_dir,
                        state: job.state,
                    };
                };
                let d = d.clone();
                let (task, spool) = (job.task.clone(), job.spool.clone());
                let r = tokio::task::spawn_blocking(move || d.put(&task, &spool, len)).await;
                match r {
                    Ok(Ok(location)) => Outcome::Done {
                        pod_dir: job.pod_dir,
                        task: job.task,
                        len,
                        location,
                    },
                    Ok(Err(e)) => Outcome::Failed {
                        pod_dir: job.pod_dir,
                        task: job.task,
                        permanent: e.is_permanent(),
                        error: e.to_string(),
                        state: job.state,
                    },
                    Err(e) => Outcome::Failed {
                        pod_dir: job.pod_dir,
                        task: job.task,
                        permanent: false,
                        error: format!("archive worker failed: {e}"),
                        state: job.state,
                    },
                }
            }
        }
    }
}

/// Runs jobs, up to `parallel` at once, until the job channel closes. After `stop` is
/// cancelled, jobs not yet started are answered with `Skipped`; the ones running finish.
pub async fn run_worker(
    target: Arc<Target>,
    mut jobs: mpsc::UnboundedReceiver<Job>,
    parallel: usize,
    stop: tokio_util::sync::CancellationToken,
    report: impl Fn(Outcome) + Send + Sync + 'static,
) {
    let report = Arc::new(report);
    let slots = Arc::new(Semaphore::new(parallel.max(1)));
    let mut running = Vec::new();
    while let Some(job) = jobs.recv().await {
        if stop.is_cancelled() {
            report(Outcome::Skipped {
                pod_dir: job.pod_dir,
            });
            continue;
        }
        let Ok(permit) = slots.clone().acquire_owned().await else {
            break;
        };
        let (target, report) = (target.clone(), report.clone());
        running.push(tokio::spawn(async move {
            let outcome = target.run(job).await;
            drop(permit);
            report(outcome);
        }));
        running.retain(|h| !h.is_finished());
    }
    for h in running {
        let _ = h.await;
    }
}

/// Druid's `FileTaskLogs` layout: `{dir}/{taskId}.log`.
#[derive(Debug, Clone)]
pub struct DirArchive {
    dir: PathBuf,
}

impl DirArchive {
    /// Logs go under `dir`; it (and `_unmapped/`) is created on the first put.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        DirArchive { dir: dir.into() }
    }

    /// `{dir}/{taskId}.log`, the name Druid's `FileTaskLogs` reads; an unmapped task's name has a
    /// `/`, so its file lands in `{dir}/_unmapped/`.
    pub fn path_of(&self, task: &TaskId) -> PathBuf {
        self.dir.join(format!("{task}.log"))
    }

    /// Stores the first `len` bytes of `spool` as the complete log of `task`, replacing any
    /// earlier copy, visible only once whole (temp file, fsync, rename, fsync the directory).
    pub fn put(&self, task: &TaskId, spool: &Spool, len: u64) -> Result<String, ArchiveError> {
        let dest = self.path_of(task);
        let parent = dest.parent().unwrap_or(&self.dir).to_owned();
        let io = |op, source| ArchiveError::Io {
            task: task.to_string(),
            target: dest.display().to_string(),
            op,
            source,
        };
        fs::create_dir_all(&parent).map_err(|e| io("create directory", e))?;
        crate::durable::replace(
            &dest,
            |out| {
                if len == 0 {
                    out.write_all(placeholder(task).as_bytes())
                        .map_err(|e| io("write", e))
                } else {
                    spool
                        .read_range(0, len, &mut |chunk| out.write_all(chunk))
                        .map_err(|source| ArchiveError::Spool {
                            task: task.to_string(),
                            source,
                        })
                }
            },
            io,
        )?;
        Ok(dest.display().to_string())
    }
}
