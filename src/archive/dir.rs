//! The directory target: Druid's `FileTaskLogs` layout, `{dir}/{taskId}.log`, usually on a
//! volume Druid mounts too.
//!
//! A directory cannot hold a half-written log in a useful way, so this target ignores the
//! `Parts` jobs and writes the whole log at the end, replacing any earlier copy atomically
//! ([`crate::durable::replace`]).

use std::fs;
use std::io::{self, Write};
use std::path::PathBuf;

use crate::archive::job::{Job, JobKind, Outcome, placeholder};
use crate::oneline::OneLine;
use crate::spool::{LogOffset, Spool, SpoolError};
use crate::task::TaskId;

/// Why a directory archive failed. It reaches ingest as text in [`Outcome::Failed`]; the spool
/// is kept and the attempt retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    /// A local write failed.
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
    /// The blocking task that wrote the file panicked or was cancelled.
    #[error("archive worker failed: {0}")]
    Worker(tokio::task::JoinError),
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

    /// Does one job: a `Parts` job changes nothing (the log is written whole at its end), a
    /// `Finish` job writes the log on the blocking pool.
    pub async fn run(&self, job: Job) -> Outcome {
        let JobKind::Finish { len, .. } = job.kind else {
            return Outcome::Progress {
                pod_dir: job.pod_dir,
                state: job.state,
            };
        };
        let d = self.clone();
        let (task, spool) = (job.task.clone(), job.spool.clone());
        let written = tokio::task::spawn_blocking(move || d.put(&task, &spool, len))
            .await
            .unwrap_or_else(|e| Err(DirError::Worker(e)));
        match written {
            Ok(location) => Outcome::Done {
                pod_dir: job.pod_dir,
                task: job.task,
                len,
                location,
            },
            // A full disk or a permission may be fixed any moment: never a permanent failure.
            Err(e) => Outcome::Failed {
                pod_dir: job.pod_dir,
                task: job.task,
                permanent: false,
                error: OneLine(&e).to_string(),
                state: job.state,
            },
        }
    }

    /// Stores the first `len` bytes of `spool` as the complete log of `task`, replacing any
    /// earlier copy, visible only once whole (temp file, fsync, rename, fsync the directory).
    pub fn put(&self, task: &TaskId, spool: &Spool, len: LogOffset) -> Result<String, DirError> {
        let dest = self.path_of(task);
        let parent = dest.parent().unwrap_or(&self.dir).to_owned();
        let io = |op, source| DirError::Io {
            task: task.to_string(),
            target: dest.display().to_string(),
            op,
            source,
        };
        fs::create_dir_all(&parent).map_err(|e| io("create directory", e))?;
        crate::durable::replace(
            &dest,
            |out| {
                if len == LogOffset::ZERO {
                    out.write_all(placeholder(task).as_bytes())
                        .map_err(|e| io("write", e))
                } else {
                    spool
                        .read_range(0, len.get(), &mut |chunk| out.write_all(chunk))
                        .map_err(|source| DirError::Spool {
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
