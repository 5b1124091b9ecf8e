//! Commits: a seal and its snapshot on the ingest thread, the fsyncs and the checkpoint
//! replace in a [`CommitJob`] that may run elsewhere, and what counts as committed afterwards.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use crate::oneline::OneLine;
use tracing::{debug, error, info};

use crate::archive::append::Handoff;
use crate::checkpoint::{self, SourceState, State, TaskState};
use crate::metrics::Metrics;
use crate::spool::{LogOffset, Packer, SpoolFileOffset};
use crate::tail::{self, FINGERPRINT_LEN};
use crate::task::PodDir;

use super::{Ingest, Source, Task, now_ms};

/// Backoff of a task's failing spool writes (a full disk): doubling from the first to the max.
const SEAL_RETRY_FIRST: Duration = Duration::from_millis(100);
const SEAL_RETRY_MAX: Duration = Duration::from_secs(2);

/// What a commit in flight holds, to apply when it is done.
pub(super) struct InFlight {
    marks: Vec<Mark>,
    /// Tasks whose spools the job syncs.
    synced: Vec<PodDir>,
    spool_dir_synced: bool,
    commit_now: bool,
    checkpoint_dirty: bool,
}

/// A task's snapshot as the commit in flight records it.
struct Mark {
    pod_dir: PodDir,
    snapshot_gen: u64,
    log_len: LogOffset,
    file_len: SpoolFileOffset,
}

/// The slow part of a commit: fsync the spools written since their last sync, then replace
/// the checkpoint. It touches no state of the ingest thread, so it may run on any thread.
pub struct CommitJob {
    state_dir: PathBuf,
    spools: Vec<Arc<crate::spool::Spool>>,
    /// The spool directory, when spools were created in it since the last commit: their
    /// names must be durable before a checkpoint names them (after a power loss the
    /// checkpoint could name a spool that is not there).
    spool_dir: Option<PathBuf>,
    state: State,
}

/// The result of a [`CommitJob`], for [`Ingest::finish_commit`].
pub struct CommitDone(Result<(), CommitError>);

/// Why a commit failed; in every case the previous checkpoint is still in place and the
/// commit is retried.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// A spool's new blocks could not be made durable, so no checkpoint may name them.
    #[error("cannot sync spool ({0}); checkpoint not written")]
    SpoolSync(#[source] crate::spool::SpoolError),
    /// A new spool's name could not be made durable, so no checkpoint may name it.
    #[error("cannot sync spool directory {dir}: {source}; checkpoint not written")]
    SpoolDirSync {
        /// The spool directory.
        dir: PathBuf,
        /// What fsync said.
        #[source]
        source: io::Error,
    },
    /// Writing or replacing the checkpoint failed.
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::CheckpointError),
}

impl CommitJob {
    /// Syncs the spools, then replaces the checkpoint. Blocking (fsyncs), so the agent runs it
    /// on a thread of its own; on failure the old checkpoint stays in place.
    pub fn run(self) -> CommitDone {
        CommitDone(self.sync_and_write())
    }

    fn sync_and_write(&self) -> Result<(), CommitError> {
        for s in &self.spools {
            s.sync().map_err(CommitError::SpoolSync)?;
        }
        if let Some(dir) = &self.spool_dir {
            crate::durable::sync_dir(dir).map_err(|source| CommitError::SpoolDirSync {
                dir: dir.clone(),
                source,
            })?;
        }
        Ok(checkpoint::commit(&self.state_dir, &self.state)?)
    }
}

impl Ingest {
    /// Commits the checkpoint when one is due (interval elapsed, or a task ended). On success,
    /// tasks that ended become archive jobs.
    pub fn commit_if_due(&mut self, now: Instant, interval: Duration) {
        let due = self.commit_now || now.duration_since(self.last_commit) >= interval;
        if due && (self.checkpoint_dirty || self.tasks.values().any(|t| t.unsaved)) {
            self.commit(now);
        }
        self.queue_archives(now);
    }

    /// Like [`Ingest::commit_if_due`], but leaves the slow part of the commit (the fsyncs and
    /// the checkpoint write) to the caller, who runs the returned job on another thread and
    /// hands its result to [`Ingest::finish_commit`]; reading goes on meanwhile. One commit
    /// is in flight at a time.
    pub fn commit_job_if_due(&mut self, now: Instant, interval: Duration) -> Option<CommitJob> {
        let due = self.commit_now || now.duration_since(self.last_commit) >= interval;
        let job = if due
            && self.commit_in_flight.is_none()
            && (self.checkpoint_dirty || self.tasks.values().any(|t| t.unsaved))
        {
            Some(self.begin_commit(now))
        } else {
            None
        };
        self.queue_archives(now);
        job
    }

    /// Whether a commit job was handed out and its result not yet given back.
    pub fn commit_in_flight(&self) -> bool {
        self.commit_in_flight.is_some()
    }

    /// Syncs every spool with new blocks, then replaces the checkpoint. Returns success.
    pub fn commit(&mut self, now: Instant) -> bool {
        if self.commit_in_flight.is_some() {
            return false;
        }
        let job = self.begin_commit(now);
        let done = job.run();
        self.finish_commit(done)
    }

    /// Takes the state to commit: snapshots, and the spools written since their last sync.
    /// Until [`Ingest::finish_commit`], nothing counts as committed.
    fn begin_commit(&mut self, now: Instant) -> CommitJob {
        self.last_commit = now;
        // With an empty tail a snapshot is valid at any time: take one, so files found since
        // the last seal (and their fingerprints) are in the checkpoint too.
        for t in self.tasks.values_mut() {
            if t.writer.tail_len() == 0 {
                t.snapshot = Some(snapshot(t));
            }
        }
        let mut spools = Vec::new();
        let mut synced = Vec::new();
        let mut marks = Vec::new();
        for (name, t) in &mut self.tasks {
            // Blocks sealed from now on set the flag again and are synced by the next commit.
            if t.writer.take_unsynced() {
                spools.push(t.writer.spool().clone());
                synced.push(name.clone());
            }
            if let Some(s) = &t.snapshot {
                marks.push(Mark {
                    pod_dir: name.clone(),
                    snapshot_gen: t.snapshot_gen,
                    log_len: s.log_len,
                    file_len: s.spool_file_len,
                });
            }
        }
        let state = State {
            committed_at_ms: now_ms(),
            tasks: self
                .tasks
                .values()
                .filter_map(|t| t.snapshot.clone())
                .collect(),
        };
        let spool_dir_synced = std::mem::take(&mut self.spool_dir_unsynced);
        self.commit_in_flight = Some(InFlight {
            marks,
            synced,
            spool_dir_synced,
            commit_now: std::mem::take(&mut self.commit_now),
            checkpoint_dirty: std::mem::take(&mut self.checkpoint_dirty),
        });
        CommitJob {
            state_dir: self.s.state_dir.clone(),
            spools,
            spool_dir: spool_dir_synced.then(|| self.s.spool_dir.clone()),
            state,
        }
    }

    /// Records the result of a commit job. On success, what it held counts as committed (and
    /// may be archived); a task whose snapshot changed meanwhile stays unsaved. On failure,
    /// everything is as if it had not been tried, and the commit is retried.
    pub fn finish_commit(&mut self, done: CommitDone) -> bool {
        let Some(f) = self.commit_in_flight.take() else {
            return false;
        };
        match done.0 {
            Ok(()) => {
                self.metrics.commits.fetch_add(1, Relaxed);
                if self.commit_failures > 0 {
                    info!(
                        failed_attempts = self.commit_failures,
                        "checkpoint committed again"
                    );
                    self.commit_failures = 0;
                }
                for m in f.marks {
                    if let Some(t) = self.tasks.get_mut(&m.pod_dir) {
                        if t.snapshot_gen == m.snapshot_gen {
                            t.unsaved = false;
                        }
                        t.committed_len = m.log_len;
                        t.committed_file_len = m.file_len;
                    }
                }
                true
            }
            Err(e) => {
                self.metrics.commit_errors.fetch_add(1, Relaxed);
                self.commit_failures += 1;
                if self.commit_failures == 1 {
                    error!(error = %OneLine(&e), "checkpoint not committed; retrying");
                } else {
                    debug!(error = %OneLine(&e), attempts = self.commit_failures, "checkpoint still not committed");
                }
                for name in &f.synced {
                    if let Some(t) = self.tasks.get_mut(name) {
                        t.writer.mark_unsynced();
                    }
                }
                self.spool_dir_unsynced |= f.spool_dir_synced;
                // Retried after commit_interval, not at once: a full disk must not turn
                // the ingest loop into a stream of failing commits.
                self.checkpoint_dirty |= f.checkpoint_dirty || f.commit_now;
                false
            }
        }
    }
}

/// What a seal needs besides the task: one per ingest thread.
pub(super) struct Sealer {
    pub(super) packer: Packer,
    /// Where sealed text goes for a directory archive written as tasks run.
    pub(super) handoff: Option<Handoff>,
}

impl Sealer {
    /// Sends the text handed over since the last flush to the appender.
    pub(super) fn flush(&mut self) {
        if let Some(h) = &mut self.handoff {
            h.flush();
        }
    }

    /// Gives the buffer of a released tail back for reuse.
    pub(super) fn recycle(&self, buf: Vec<u8>) {
        if let Some(h) = &self.handoff {
            h.recycle(buf);
        }
    }

    fn seal(&mut self, t: &mut Task) -> Result<(), crate::spool::SpoolError> {
        let h = match &mut self.handoff {
            Some(h) if t.partial != Some(false) => h,
            _ => return t.writer.seal(&mut self.packer),
        };
        let mut text = h.spare();
        match t.writer.seal_taking(&mut self.packer, &mut text) {
            Ok(start) => {
                if t.partial.is_none() && start != LogOffset::ZERO {
                    h.recycle(text);
                    t.partial = Some(false);
                } else {
                    t.partial = Some(h.send(&t.pod.name, start, text));
                }
                Ok(())
            }
            Err(e) => {
                h.recycle(text);
                Err(e)
            }
        }
    }
}

/// Seals the tail and takes the task's checkpoint snapshot. Returns false if the spool write
/// failed (the tail is kept for a retry).
pub(super) fn seal(t: &mut Task, sealer: &mut Sealer, m: &Metrics) -> bool {
    if t.writer.tail_len() == 0 {
        return true;
    }
    if t.seal_retry_at.is_some_and(|at| Instant::now() < at) {
        return false;
    }
    match sealer.seal(t) {
        Ok(()) => {
            m.blocks_sealed.fetch_add(1, Relaxed);
            if t.seal_failures > 0 {
                info!(pod_dir = %t.pod.name, failed_attempts = t.seal_failures, "spool writes succeed again; reading of this task resumes");
                t.seal_failures = 0;
                t.seal_retry_at = None;
            }
            t.tail_since = None;
            t.snapshot = Some(snapshot(t));
            t.unsaved = true;
            t.snapshot_gen += 1;
            true
        }
        Err(e) => {
            m.spool_errors.fetch_add(1, Relaxed);
            t.seal_failures += 1;
            let backoff = SEAL_RETRY_FIRST * 2u32.pow(t.seal_failures.min(8) - 1);
            t.seal_retry_at = Some(Instant::now() + backoff.min(SEAL_RETRY_MAX));
            if t.seal_failures == 1 {
                error!(pod_dir = %t.pod.name, error = %OneLine(&e), "cannot write spool block; reading of this task paused until it succeeds");
            } else {
                debug!(pod_dir = %t.pod.name, error = %OneLine(&e), attempts = t.seal_failures, "spool write still failing");
            }
            false
        }
    }
}

pub(super) fn snapshot(t: &mut Task) -> TaskState {
    debug_assert_eq!(t.writer.tail_len(), 0, "snapshot with an unsealed tail");
    for s in &mut t.sources {
        if s.key.fp_len < FINGERPRINT_LEN
            && let Ok((len, fp)) = tail::fingerprint(&s.file, FINGERPRINT_LEN)
        {
            s.key.fp_len = len;
            s.key.fp = fp;
        }
    }
    TaskState {
        pod_dir: t.pod.name.clone(),
        container: t
            .container_dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned(),
        task_id: t.task_id().map(|i| i.to_string()),
        spool_file_len: t.writer.file_len(),
        log_len: t.writer.log_len(),
        phase: t.phase,
        sources: match &t.restoring {
            Some(states) => states.clone(),
            None => t.sources.iter().map(source_state).collect(),
        },
        done: t.done.iter().copied().collect(),
        last_restart: t.last_restart,
        lines: t.lines,
        upload: t.upload.clone(),
        first_seen_ms: t.first_seen_ms,
        spool_lost: t.spool_lost,
    }
}

fn source_state(s: &Source) -> SourceState {
    SourceState {
        restart: s.restart,
        key: s.key,
        offset: s.offset,
        path: s.path.clone(),
        decode: s.decode.clone(),
    }
}
