//! The directory target: Druid's `FileTaskLogs` layout, `{dir}/{taskId}.log`, usually on a
//! volume Druid mounts too.
//!
//! A directory cannot hold a half-written log in a useful way, so this target ignores the
//! `Parts` jobs and makes the whole log visible at the end, replacing any earlier copy
//! atomically: by renaming the partial file written as the task ran ([`crate::archive::append`])
//! when there is a whole one, else by writing the log from the spool
//! ([`crate::durable::replace`]).

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use tracing::debug;

use crate::archive::append::{Appender, Handoff, IN_FLIGHT_MAX, Partial};
use crate::archive::job::{Job, JobKind, Outcome, placeholder};
use crate::metrics::Metrics;
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
    appender: Option<Appender>,
    /// Where an appending archive counts renames and whole writes.
    metrics: Option<Arc<Metrics>>,
}

impl DirArchive {
    /// Logs go under `dir`; it (and `_unmapped/`) is created on the first put. Each log is
    /// written whole from the spool at its end.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        DirArchive {
            dir: dir.into(),
            appender: None,
            metrics: None,
        }
    }

    /// As [`DirArchive::new`], and logs are also written as their tasks run, from the text
    /// ingest hands over through [`DirArchive::handoff`], so that a task's end needs no
    /// inflate of its spool. If the appender thread cannot be started, logs are written whole.
    /// `metrics` counts which of the two each archive was.
    pub fn appending(dir: impl Into<PathBuf>, metrics: Arc<Metrics>) -> Self {
        let dir = dir.into();
        let appender = Appender::start(&dir, IN_FLIGHT_MAX)
            .inspect_err(|e| {
                tracing::warn!(error = %e, "cannot start the archive appender; archives are written whole at each task's end");
            })
            .ok();
        DirArchive {
            dir,
            appender,
            metrics: Some(metrics),
        }
    }

    /// Where the ingest thread hands sealed text over, if logs are written as tasks run.
    pub fn handoff(&self) -> Option<Handoff> {
        self.appender.as_ref().map(Appender::handoff)
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
        // Asked here, not on the blocking pool: the answer waits for the blocks handed over
        // before, and the pool's few threads also serve spool reads over HTTP.
        let partial = match &self.appender {
            Some(a) => a.take(&job.pod_dir.name, len).await,
            None => None,
        };
        let d = self.clone();
        let (pod_dir, task, spool) = (job.pod_dir.clone(), job.task.clone(), job.spool.clone());
        let written = tokio::task::spawn_blocking(move || {
            d.finish_with(&pod_dir.name, &task, &spool, len, partial)
        })
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

    /// Stores the first `len` bytes of the log of `pod_dir` (held by `spool`) as the complete
    /// log of `task`, replacing any earlier copy: from the partial written as the task ran if
    /// it holds them all, else from the spool ([`DirArchive::put`]). Blocks the thread.
    pub fn finish(
        &self,
        pod_dir: &str,
        task: &TaskId,
        spool: &Spool,
        len: LogOffset,
    ) -> Result<String, DirError> {
        let partial = self
            .appender
            .as_ref()
            .and_then(|a| a.take_blocking(pod_dir, len));
        self.finish_with(pod_dir, task, spool, len, partial)
    }

    fn finish_with(
        &self,
        pod_dir: &str,
        task: &TaskId,
        spool: &Spool,
        len: LogOffset,
        partial: Option<Partial>,
    ) -> Result<String, DirError> {
        if let Some(partial) = partial {
            match self.rename(task, &partial, len) {
                Ok(location) => {
                    self.count(|m| &m.dir_archives_renamed);
                    return Ok(location);
                }
                // Whatever failed (the partial removed or replaced by someone else, an NFS
                // error on its fsync), the spool still has the log: write it from there now
                // rather than report a failure and wait for the retry.
                Err(e) => {
                    debug!(%task, pod_dir, error = %OneLine(&e), "partial archive not usable; writing the log from the spool");
                    if partial.still_named().unwrap_or(false) {
                        let _ = fs::remove_file(&partial.path);
                    }
                }
            }
        } else if self.appender.is_some() {
            debug!(%task, pod_dir, "no whole partial archive; writing the log from the spool");
        }
        let written = self.put(task, spool, len)?;
        self.count(|m| &m.dir_archives_written);
        Ok(written)
    }

    fn count(&self, counter: impl Fn(&Metrics) -> &AtomicU64) {
        if let Some(m) = &self.metrics {
            counter(m).fetch_add(1, Relaxed);
        }
    }

    /// Makes a partial holding at least `len` bytes the log of `task`: cut to `len`, synced,
    /// renamed over any earlier copy, the directory synced.
    fn rename(&self, task: &TaskId, partial: &Partial, len: LogOffset) -> Result<String, DirError> {
        let dest = self.path_of(task);
        let parent = dest.parent().unwrap_or(&self.dir).to_owned();
        let io = io_error(task, &dest);
        fs::create_dir_all(&parent).map_err(|e| io("create directory", e))?;
        partial
            .file
            .set_len(len.get())
            .map_err(|e| io("truncate", e))?;
        partial.file.sync_all().map_err(|e| io("fsync", e))?;
        // Checked last, right before the rename: between the two only a process that replaces
        // the name within microseconds could slip in.
        if !partial.still_named().map_err(|e| io("stat", e))? {
            return Err(io(
                "rename",
                io::Error::new(
                    io::ErrorKind::NotFound,
                    "the partial was replaced or removed",
                ),
            ));
        }
        fs::rename(&partial.path, &dest).map_err(|e| io("rename", e))?;
        crate::durable::sync_dir(&parent).map_err(|e| io("fsync directory", e))?;
        if parent != self.dir {
            // Into `_unmapped/`: also the name's removal, or a power loss could bring the
            // partial back (harmless, but kept until the sweep).
            crate::durable::sync_dir(&self.dir).map_err(|e| io("fsync directory", e))?;
        }
        Ok(dest.display().to_string())
    }

    /// Stores the first `len` bytes of `spool` as the complete log of `task`, replacing any
    /// earlier copy, visible only once whole (temp file, fsync, rename, fsync the directory).
    pub fn put(&self, task: &TaskId, spool: &Spool, len: LogOffset) -> Result<String, DirError> {
        let dest = self.path_of(task);
        let parent = dest.parent().unwrap_or(&self.dir).to_owned();
        let io = io_error(task, &dest);
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

/// How a failed step on the file `dest` of `task` reads (the step named: "write", "rename").
fn io_error<'a>(
    task: &'a TaskId,
    dest: &'a Path,
) -> impl Fn(&'static str, io::Error) -> DirError + Copy + 'a {
    move |op, source| DirError::Io {
        task: task.to_string(),
        target: dest.display().to_string(),
        op,
        source,
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;
    use crate::spool::{Packer, SpoolFileOffset, SpoolWriter};

    const POD: &str = "ns_pod_uid";

    /// A spool and an appending archive in one temp dir, and the text each sealed block held.
    struct Rig {
        _tmp: tempfile::TempDir,
        spool: SpoolWriter,
        packer: Packer,
        archive: DirArchive,
        handoff: Handoff,
        task: TaskId,
        text: Vec<u8>,
    }

    impl Rig {
        fn new() -> Rig {
            Self::at_most(IN_FLIGHT_MAX)
        }

        /// With at most `in_flight_max` bytes handed over and not yet written.
        fn at_most(in_flight_max: usize) -> Rig {
            let tmp = tempfile::tempdir().unwrap();
            let spool = SpoolWriter::open(&tmp.path().join("s.gz"), SpoolFileOffset::ZERO).unwrap();
            let dir = tmp.path().join("archive");
            let archive = DirArchive {
                appender: Some(Appender::start(&dir, in_flight_max).unwrap()),
                dir,
                metrics: Some(Arc::default()),
            };
            let handoff = archive.handoff().unwrap();
            Rig {
                _tmp: tmp,
                spool,
                packer: Packer::new(1),
                archive,
                handoff,
                task: TaskId::new("index_kafka_t").unwrap(),
                text: Vec::new(),
            }
        }

        /// Seals a block of `n` lines; hands it over unless `hand` is false.
        fn block(&mut self, n: usize, hand: bool) {
            self.seal(n, hand);
            self.handoff.flush();
        }

        /// [`Rig::block`] without the flush.
        fn seal(&mut self, n: usize, hand: bool) {
            let start = self.text.len();
            for i in 0..n {
                let line = format!("{start} line {i} of a block\n");
                self.text.extend_from_slice(line.as_bytes());
                self.spool.append(|t| t.extend_from_slice(line.as_bytes()));
            }
            let mut taken = self.handoff.spare();
            let at = self
                .spool
                .seal_taking(&mut self.packer, &mut taken)
                .unwrap();
            assert_eq!(at.get(), start as u64);
            assert_eq!(taken, self.text[start..]);
            if hand {
                self.handoff.send(POD, at, taken);
            }
        }

        fn partial(&self) -> PathBuf {
            self.archive.dir.join(format!(".{POD}.partial"))
        }

        fn finish(&self, len: usize) -> Vec<u8> {
            self.archive
                .finish(
                    POD,
                    &self.task,
                    self.spool.spool(),
                    LogOffset::new(len as u64),
                )
                .unwrap();
            fs::read(self.archive.path_of(&self.task)).unwrap()
        }

        /// Archives made by a rename and by a whole write, as `/metrics` counts them.
        fn counted(&self) -> (u64, u64) {
            let m = self.archive.metrics.as_ref().unwrap();
            (
                m.dir_archives_renamed.load(Relaxed),
                m.dir_archives_written.load(Relaxed),
            )
        }

        /// Whether the archive file is the partial renamed, not a whole write.
        fn renamed(&self, partial_ino: u64) -> bool {
            let ino = fs::metadata(self.archive.path_of(&self.task))
                .unwrap()
                .ino();
            ino == partial_ino
        }

        /// The inode of the partial once every block handed over is written (a `take` of
        /// another pod waits behind them).
        fn partial_ino(&self) -> Option<u64> {
            let _ = self
                .archive
                .appender
                .as_ref()
                .unwrap()
                .take_blocking("other", LogOffset::new(1));
            fs::metadata(self.partial()).ok().map(|m| m.ino())
        }
    }

    /// Every block handed over: the end is a rename of the partial, which held the log.
    #[test]
    fn a_log_handed_over_whole_is_renamed_into_place() {
        let mut r = Rig::new();
        for _ in 0..5 {
            r.block(300, true);
        }
        let ino = r.partial_ino().expect("a partial while the task runs");
        let archived = r.finish(r.text.len());
        assert_eq!(archived, r.text);
        assert!(r.renamed(ino), "the partial became the archive");
        assert!(!r.partial().exists());
        assert_eq!(r.counted(), (1, 0));
    }

    /// Over the in-flight bound the ingest thread keeps its text (never waits): that block is
    /// missing from the partial, which is then dropped, and the log written whole.
    #[test]
    fn a_block_over_the_in_flight_bound_is_not_handed_over() {
        let mut r = Rig::at_most(1000);
        // The first block is taken whatever its size, as nothing is in flight.
        r.seal(100, true);
        // Not flushed yet, so still in flight: this one is over the bound.
        r.seal(100, true);
        r.handoff.flush();
        // Written (the answer comes after it), so nothing is in flight: the next is taken,
        // and does not continue the partial.
        assert!(r.partial_ino().is_some());
        r.block(100, true);
        assert_eq!(r.partial_ino(), None);
        assert_eq!(r.finish(r.text.len()), r.text);
        assert_eq!(r.counted(), (0, 1));
        // Blocks each written before the next is sealed are all taken: the log is renamed.
        let mut r2 = Rig::at_most(1000);
        r2.block(100, true);
        assert!(r2.partial_ino().is_some());
        r2.block(100, true);
        assert_eq!(r2.finish(r2.text.len()), r2.text);
        assert_eq!(r2.counted(), (1, 0));
    }

    /// Blocks sealed after the end was decided (the task wrote again) are cut off: the archive
    /// is the committed length, and the next one is written whole.
    #[test]
    fn a_partial_longer_than_the_end_is_cut_to_it() {
        let mut r = Rig::new();
        r.block(100, true);
        let end = r.text.len();
        r.block(100, true);
        let ino = r.partial_ino().unwrap();
        assert_eq!(r.finish(end), r.text[..end]);
        assert!(r.renamed(ino));
        r.block(100, true);
        assert_eq!(r.partial_ino(), None, "no partial after the end");
        assert_eq!(r.finish(r.text.len()), r.text);
    }

    /// A block not handed over (the appender was behind): the partial is dropped at the next
    /// one and the log written whole from the spool.
    #[test]
    fn a_block_not_handed_over_drops_the_partial() {
        let mut r = Rig::new();
        r.block(100, true);
        r.block(100, false);
        r.block(100, true);
        assert_eq!(r.partial_ino(), None);
        assert_eq!(r.finish(r.text.len()), r.text);
        // Also the last block missing: the partial is short of the end.
        let mut r = Rig::new();
        r.block(100, true);
        r.block(100, false);
        assert!(r.partial_ino().is_some());
        assert_eq!(r.finish(r.text.len()), r.text);
        assert!(!r.partial().exists());
    }

    /// A task resumed after a restart (its first block is not at 0) never gets a partial, and
    /// the partial an earlier run left is removed at its end.
    #[test]
    fn a_resumed_task_is_written_whole_and_an_old_partial_removed() {
        let mut r = Rig::new();
        r.block(100, false);
        fs::create_dir_all(&r.archive.dir).unwrap();
        fs::write(r.partial(), b"left by an earlier run, shorter or longer").unwrap();
        r.block(100, true);
        r.block(100, true);
        assert_eq!(r.finish(r.text.len()), r.text);
        assert!(!r.partial().exists());
    }

    /// An empty log gets Druid's placeholder, even with a partial of text written after its
    /// end was decided.
    #[test]
    fn an_empty_log_is_the_placeholder() {
        let mut r = Rig::new();
        r.block(10, true);
        assert_eq!(r.finish(0), placeholder(&r.task).as_bytes());
        assert!(!r.partial().exists());
    }

    /// Druid's cleanup removed a live partial (by age, or the whole directory): the log is
    /// written from the spool, not reported as a failure.
    #[test]
    fn a_partial_removed_by_someone_else_is_not_a_failure() {
        let mut r = Rig::new();
        r.block(100, true);
        assert!(r.partial_ino().is_some());
        fs::remove_file(r.partial()).unwrap();
        r.block(100, true);
        assert_eq!(r.finish(r.text.len()), r.text);
        assert_eq!(r.counted(), (0, 1));
        // Replaced rather than removed (another agent of this node): the same.
        let mut r = Rig::new();
        r.block(100, true);
        assert!(r.partial_ino().is_some());
        fs::remove_file(r.partial()).unwrap();
        fs::write(
            r.partial(),
            b"another writer's text, long enough to pass for the log",
        )
        .unwrap();
        r.block(100, true);
        assert_eq!(r.finish(r.text.len()), r.text);
        assert_eq!(r.counted(), (0, 1));
        assert_eq!(
            fs::read(r.partial()).unwrap(),
            b"another writer's text, long enough to pass for the log",
            "another writer's file is not touched"
        );
    }

    /// A pod that is not a peon: its partial goes.
    #[test]
    fn a_forgotten_pod_leaves_no_partial() {
        let mut r = Rig::new();
        r.block(10, true);
        assert!(r.partial_ino().is_some());
        r.handoff.forget(POD);
        assert_eq!(r.partial_ino(), None);
    }
}
