//! The ingest engine: log files in, spools and checkpoints out, archive jobs when tasks end.
//!
//! [`Ingest`] is synchronous and owns all mutable state of the hot path; it is driven by
//! [`crate::app`] from inotify events and timers, and directly by tests, which makes every
//! interleaving of writes, renames and crashes reproducible.
//!
//! Crash safety rests on one rule: a task's checkpoint entry is a snapshot taken right after a
//! seal, when the unsealed tail is empty, so the spool's sealed length and the source offsets in
//! it describe the same bytes. The commit fsyncs the spools before it replaces the checkpoint.
//! After `kill -9`, spools are cut back to their committed length and sources resume at their
//! committed offsets: what was in the lost tail is read again, once.
//!
//! The engine is one type split by concern: `discovery` (which directories and files exist),
//! `reading` (files into spools), `restore` (the state of the last checkpoint back after a
//! restart), `commit` (seals, snapshots, the checkpoint) and `lifecycle` (the periodic tick,
//! ends, expiry, archive jobs). This file holds the types and the engine's constructor.

mod commit;
mod discovery;
mod lifecycle;
mod reading;
mod restore;

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::archive::{Job, UploadState};
use crate::checkpoint::{self, DoneFile, FileKey, Phase, SourceState, TaskState};
use crate::config::Config;
use crate::decode::{Decoder, FileDecodeState, LineState};
use crate::metrics::Metrics;
use crate::registry::{Registry, TaskEntry};
use crate::spool::{LogOffset, Packer, SpoolFileOffset, SpoolWriter};
use crate::tail::SourceOffset;
use crate::task::{Identity, PodDir, TaskId, TaskIdentity};

pub use crate::tail::{DirWatcher, NoWatch};
pub use commit::{CommitDone, CommitError, CommitJob};
use commit::{InFlight, Sealer};
use reading::READ_BUF;
use restore::aside_bytes;

/// Why [`Ingest::open`] could not restore the last state. The agent does not start rather
/// than lose or repeat logs; each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The state or spool directory could not be created or listed.
    #[error("state directory {path}: {op}: {source}")]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// The failed step, as the message shows it.
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// The checkpoint could not be read.
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::CheckpointError),
    /// A spool the checkpoint names cannot be opened (EMFILE, EACCES, an I/O error): taking
    /// it for damaged would throw away text that may exist nowhere else, so the agent does not
    /// start; it is retried at the next start.
    #[error(
        "cannot open the spool of pod directory {pod_dir}: {source}; nothing was changed, start the agent again once the cause is gone (file descriptor limit, permissions, disk)"
    )]
    SpoolUnavailable {
        /// The task's pod directory.
        pod_dir: String,
        /// Why its spool could not be opened.
        source: crate::spool::SpoolError,
    },
}

struct Source {
    restart: u32,
    key: FileKey,
    path: PathBuf,
    file: File,
    /// Device and inode of the open fd: the key's, except for a file read back from its
    /// `.gz`, whose original inode is free for the kubelet's next file.
    held: (u64, u64),
    offset: SourceOffset,
    decode: FileDecodeState,
}

fn held(file: &File) -> (u64, u64) {
    file.metadata().map_or((0, 0), |m| (m.dev(), m.ino()))
}

struct Task {
    pod: PodDir,
    identity: Identity,
    container_dir: PathBuf,
    writer: SpoolWriter,
    sources: VecDeque<Source>,
    /// After a restart: the sources of the checkpoint while some cannot be reopened yet
    /// (see [`Ingest::reopen_sources`]); nothing is read meanwhile.
    restoring: Option<Vec<SourceState>>,
    restore_warned: bool,
    /// Since when reopening has failed.
    restore_failing_since: Option<Instant>,
    /// The spool of an archived task was lost (set aside): nothing is read or served.
    spool_lost: bool,
    done: VecDeque<DoneFile>,
    last_restart: Option<u32>,
    lines: [LineState; 2],
    phase: Phase,
    dir_gone: bool,
    last_growth: Instant,
    tail_since: Option<Instant>,
    /// The state the next checkpoint records for this task: taken at the last seal.
    snapshot: Option<TaskState>,
    /// `snapshot` changed since the last commit.
    unsaved: bool,
    /// Counts changes of `snapshot`, so a commit that ran in the background clears `unsaved`
    /// only if nothing changed meanwhile.
    snapshot_gen: u64,
    /// When the archive job with the worker was handed to it; `None` while none is.
    job_since: Option<Instant>,
    /// When this agent ended the task's log, for the end-to-archive histogram; `None` while
    /// it runs, and for a task restored as ended (the checkpoint keeps no end time).
    ended_at: Option<Instant>,
    archive_retry_at: Option<Instant>,
    /// Consecutive failed archive attempts, for the backoff.
    archive_failures: u32,
    /// Consecutive failed spool writes, and when to try again: a full disk must not turn every
    /// inotify event into a failed write and a log line.
    seal_failures: u32,
    seal_retry_at: Option<Instant>,
    archived_to: Option<String>,
    archive_error: Option<String>,
    upload: UploadState,
    /// Log bytes the last successful commit vouches for: only these may be archived.
    committed_len: LogOffset,
    /// The spool file length of that commit.
    committed_file_len: SpoolFileOffset,
    first_seen_ms: u64,
    /// When this process first saw the directory: `first_seen_ms` may come from an earlier
    /// run's checkpoint and is wall-clock time, so how long a directory has been held here is
    /// counted from this.
    seen_at: Instant,
    /// Whether this run hands the task's sealed text to a directory archive's partial: `None`
    /// before its first seal, `Some(false)` once it cannot (the log resumed in mid-way, or a
    /// block was not taken), so that the text of such a task no longer takes the appender's
    /// room from tasks that can still have one.
    partial: Option<bool>,
    /// Read although its pod is not known yet: this agent is stopping and the pod's directory
    /// is gone, so the files it holds open are the last copy of the log (see
    /// [`Ingest::shutdown`]).
    read_pending: bool,
}

impl Task {
    /// A task with nothing read yet.
    fn new(pod: PodDir, identity: Identity, container_dir: PathBuf, writer: SpoolWriter) -> Task {
        Task {
            pod,
            identity,
            container_dir,
            writer,
            sources: VecDeque::new(),
            restoring: None,
            restore_warned: false,
            restore_failing_since: None,
            spool_lost: false,
            done: VecDeque::new(),
            last_restart: None,
            lines: Default::default(),
            phase: Phase::Running,
            dir_gone: false,
            last_growth: Instant::now(),
            tail_since: None,
            snapshot: None,
            unsaved: false,
            snapshot_gen: 0,
            job_since: None,
            ended_at: None,
            archive_retry_at: None,
            archive_failures: 0,
            seal_failures: 0,
            seal_retry_at: None,
            archived_to: None,
            archive_error: None,
            upload: UploadState::default(),
            committed_len: LogOffset::ZERO,
            committed_file_len: SpoolFileOffset::ZERO,
            first_seen_ms: now_ms(),
            seen_at: Instant::now(),
            partial: None,
            read_pending: false,
        }
    }

    fn task_id(&self) -> Option<&TaskId> {
        match &self.identity {
            Identity::Task(id) => Some(id),
            _ => None,
        }
    }
}

/// Settings the engine needs, resolved from [`Config`].
#[derive(Debug, Clone)]
struct Settings {
    log_root: PathBuf,
    state_dir: PathBuf,
    spool_dir: PathBuf,
    container: String,
    block_bytes: usize,
    block_max_age: Duration,
    idle_timeout: Option<Duration>,
    retention: Duration,
    /// Set when the archive stores logs in parts while tasks run.
    part_sizes: Option<crate::archive::s3::PartSizes>,
    archive_retry_max: Duration,
    node: Option<String>,
    spool_max_bytes: Option<u64>,
    /// The archive stores the spool's gzip members rather than the text.
    upload_gzip: bool,
}

/// The ingest engine: every task's open files, spool writer, decoder state and checkpoint
/// snapshot. Driven by one thread (see [`crate::app`]); it never waits on the network.
pub struct Ingest {
    s: Settings,
    decoder: Decoder,
    identity: Box<dyn TaskIdentity>,
    watcher: Box<dyn DirWatcher>,
    metrics: Arc<Metrics>,
    /// Keyed by pod directory: looked up by the `&str` names that events and listings give.
    tasks: BTreeMap<PodDir, Task>,
    ignored: HashSet<String>,
    warned: HashSet<PathBuf>,
    buf: Vec<u8>,
    dirty_read: BTreeSet<String>,
    dirty_pods: BTreeSet<String>,
    rescan_all: bool,
    checkpoint_dirty: bool,
    commit_now: bool,
    last_commit: Instant,
    /// The commit whose slow part runs elsewhere, if any (see [`Ingest::commit_job_if_due`]).
    commit_in_flight: Option<InFlight>,
    /// Consecutive failed commits (logged once per streak).
    commit_failures: u32,
    jobs: Vec<Job>,
    /// Set when inotify cannot be trusted (watch limit reached); the tree is then rescanned
    /// on every poll.
    degraded: bool,
    registry: Registry,
    sealer: Sealer,
    /// Reading is paused because the spools reached `spool_max_bytes`.
    backpressure: bool,
    /// A spool was created since the last commit: the next one syncs the spool directory.
    spool_dir_unsynced: bool,
    /// Bytes of spools set aside (`*.corrupt-*`), counted against `spool_max_bytes`.
    aside_bytes: u64,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Ingest {
    /// Opens the state directory, restores every task of the last checkpoint (cutting spools
    /// back to their committed length, reopening sources at their committed offsets), and
    /// removes spools the checkpoint does not vouch for.
    pub fn open(
        cfg: &Config,
        identity: Box<dyn TaskIdentity>,
        watcher: Box<dyn DirWatcher>,
        metrics: Arc<Metrics>,
    ) -> Result<Ingest, PipelineError> {
        let s = Settings {
            log_root: cfg.log_root.clone(),
            state_dir: cfg.state_dir.clone(),
            spool_dir: cfg.state_dir.join("spool"),
            container: cfg.container.clone(),
            block_bytes: cfg.block_bytes,
            block_max_age: cfg.block_max_age,
            idle_timeout: (!cfg.idle_timeout.is_zero()).then_some(cfg.idle_timeout),
            retention: cfg.retention,
            part_sizes: cfg.archive.part_sizes(),
            archive_retry_max: cfg.archive_retry_max.max(Duration::from_secs(1)),
            node: cfg.node_name.clone(),
            spool_max_bytes: (cfg.spool_max_bytes > 0).then_some(cfg.spool_max_bytes),
            upload_gzip: matches!(&cfg.archive, crate::config::ArchiveConfig::S3(s) if s.gzip),
        };
        fs::create_dir_all(&s.spool_dir).map_err(|source| PipelineError::StateDir {
            path: s.spool_dir.clone(),
            op: "create",
            source,
        })?;
        let state = checkpoint::load(&s.state_dir)?;
        let mut ingest = Ingest {
            decoder: Decoder::new(cfg.line_max_bytes),
            identity,
            watcher,
            metrics,
            tasks: BTreeMap::new(),
            ignored: HashSet::new(),
            warned: HashSet::new(),
            buf: vec![0; READ_BUF],
            dirty_read: BTreeSet::new(),
            dirty_pods: BTreeSet::new(),
            rescan_all: true,
            checkpoint_dirty: false,
            commit_now: false,
            last_commit: Instant::now(),
            commit_in_flight: None,
            commit_failures: 0,
            jobs: Vec::new(),
            degraded: false,
            registry: Registry::default(),
            sealer: Sealer {
                packer: Packer::new(cfg.compression_level),
                handoff: None,
            },
            backpressure: false,
            spool_dir_unsynced: false,
            aside_bytes: 0,
            s,
        };
        for ts in state.tasks {
            ingest.restore(ts)?;
        }
        ingest.remove_orphan_spools();
        ingest.aside_bytes = aside_bytes(&ingest.s.spool_dir, None);
        Ok(ingest)
    }

    fn spool_path(&self, pod_dir: &str) -> PathBuf {
        self.s.spool_dir.join(format!("{pod_dir}.gz"))
    }

    /// Tells readers the current state of a task (once its id is known).
    fn publish(&self, name: &str) {
        let Some(t) = self.tasks.get(name) else {
            return;
        };
        if t.spool_lost {
            return;
        }
        let Some(id) = t.task_id() else {
            return;
        };
        self.registry.publish(TaskEntry {
            task_id: id.clone(),
            pod: t.pod.clone(),
            spool: t.writer.spool().clone(),
            phase: t.phase,
            archived_to: t.archived_to.clone(),
            archive_error: t.archive_error.clone(),
            uploaded_parts: t.upload.parts.len(),
            uploaded_bytes: t.upload.uploaded(),
            lag_bytes: t
                .sources
                .iter()
                .filter_map(|s| {
                    s.file
                        .metadata()
                        .ok()
                        .map(|m| m.len().saturating_sub(s.offset.get()))
                })
                .sum(),
        });
    }

    /// Hands the text of every block sealed from now on to a directory archive that writes
    /// logs as tasks run ([`crate::archive::DirArchive::handoff`]). Blocks sealed before are
    /// not handed over; their tasks' archives are written whole.
    pub fn hand_sealed_text_to(&mut self, handoff: crate::archive::append::Handoff) {
        self.sealer.handoff = Some(handoff);
    }

    /// The registry this engine publishes its tasks to, for readers.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The counters the engine updates, shared with `/metrics`.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Whether reads or scans are waiting, so that the driver loops again at once rather than
    /// waiting for an event or the poll interval.
    pub fn has_work_queued(&self) -> bool {
        !self.dirty_read.is_empty() || !self.dirty_pods.is_empty() || self.rescan_all
    }
}
