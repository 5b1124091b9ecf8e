//! Where a finished task's log goes. Behind a trait so S3 and the directory target are
//! interchangeable for the pipeline.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::checkpoint::sync_dir;
use crate::spool::{Spool, SpoolError};
use crate::task::TaskId;

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("archive of task {task} to {target}: {op}: {source}")]
    Io {
        task: String,
        target: String,
        op: &'static str,
        source: io::Error,
    },
    #[error("archive of task {task}: reading its spool: {source}")]
    Spool { task: String, source: SpoolError },
}

/// What Druid's overlord writes when a peon left no log, so that Druid's reader (which breaks on
/// an empty object) and users see why.
pub fn placeholder(task: &TaskId) -> String {
    format!(
        "Peon for task [{task}] did not report any logs. Check k8s metrics and events for the pod to see what happened."
    )
}

/// A finished log's destination.
pub trait Archive: Send {
    /// Stores the first `len` bytes of `spool` as the complete log of `task`, replacing any
    /// earlier copy, visible only once whole. Returns where it went, for logs and reports.
    fn put(&mut self, task: &TaskId, spool: &Spool, len: u64) -> Result<String, ArchiveError>;
}

/// Druid's `FileTaskLogs` layout: `{dir}/{taskId}.log`.
#[derive(Debug, Clone)]
pub struct DirArchive {
    dir: PathBuf,
}

impl DirArchive {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        DirArchive { dir: dir.into() }
    }

    pub fn path_of(&self, task: &TaskId) -> PathBuf {
        self.dir.join(format!("{task}.log"))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Archive for DirArchive {
    fn put(&mut self, task: &TaskId, spool: &Spool, len: u64) -> Result<String, ArchiveError> {
        let dest = self.path_of(task);
        let tmp = self.dir.join(format!(".{task}.log.tmp"));
        let io = |op, source| ArchiveError::Io {
            task: task.to_string(),
            target: dest.display().to_string(),
            op,
            source,
        };
        fs::create_dir_all(&self.dir).map_err(|e| io("create directory", e))?;
        let mut out =
            io::BufWriter::with_capacity(1 << 16, File::create(&tmp).map_err(|e| io("create", e))?);
        let copied = if len == 0 {
            out.write_all(placeholder(task).as_bytes())
                .map_err(|e| io("write", e))
        } else {
            spool
                .read_range(0, len, &mut |chunk| out.write_all(chunk))
                .map_err(|source| ArchiveError::Spool {
                    task: task.to_string(),
                    source,
                })
        };
        let finish = copied.and_then(|()| {
            let f = out.into_inner().map_err(|e| io("write", e.into_error()))?;
            f.sync_all().map_err(|e| io("fsync", e))
        });
        if let Err(e) = finish {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        fs::rename(&tmp, &dest).map_err(|e| io("rename", e))?;
        sync_dir(&self.dir).map_err(|e| io("fsync directory", e))?;
        Ok(dest.display().to_string())
    }
}
