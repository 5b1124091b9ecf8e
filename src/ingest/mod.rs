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

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tracing::{debug, error, info, warn};

use crate::archive::{Job, JobKind, Origin, Outcome, UploadState};
use crate::checkpoint::{self, DoneFile, FileKey, Phase, SourceState, State, TaskState};
use crate::config::Config;
use crate::decode::{DecodeStats, Decoder, FileDecodeState, LineState, Tail};
use crate::metrics::Metrics;
use crate::registry::{PendingPod, Registry, TaskEntry};
use crate::spool::{Packer, SpoolWriter};
use crate::tail::{self, FINGERPRINT_LEN};
use crate::task::{Identity, PodDir, TaskId, TaskIdentity};

/// Bytes read from one task before others, and inotify events, get their turn. Small enough
/// that discovery (opening new files before the kubelet can gzip and delete them) is never
/// stuck behind a long read, and that a task with a fresh line waits for at most about one
/// turn of each busy task before it is read (200 busy tasks: 12.5 MiB, tens of milliseconds;
/// it was 1 MiB, and a round took seconds when the agent had fallen behind). A block a turn:
/// smaller turns cost more CPU (32 KiB: about 7% more per GiB), as each tail goes cold in the
/// cache between its turns.
const READ_BUDGET: u64 = 64 << 10;
const READ_BUF: usize = 256 << 10;
/// The smallest read: a containerd record is at most 16 KiB plus its header.
const MIN_READ: usize = 32 << 10;
/// How many drained files a task remembers so a rescan never reads them again; the kubelet
/// keeps far fewer files per container.
const DONE_MEMORY: usize = 64;
/// Backoff of a task's failing spool writes (a full disk): doubling from the first to the max.
const SEAL_RETRY_FIRST: Duration = Duration::from_millis(100);
const SEAL_RETRY_MAX: Duration = Duration::from_secs(2);
/// How long a restored task waits for the files of its checkpoint to open again (EMFILE,
/// EACCES) before it reads the ones that did: long enough for a transient cause to pass.
const RESTORE_PATIENCE: Duration = Duration::from_secs(60);

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

/// Registers inotify watches; a trait so that tests can drive the engine without inotify.
pub trait DirWatcher: Send {
    /// Watches `dir` (not recursively); watching a watched directory again is a no-op. An error
    /// (the watch limit, usually) makes the engine rescan the whole tree on every poll instead.
    fn watch(&mut self, dir: &Path) -> Result<(), notify::Error>;
    /// Stops watching `dir`, whose pod was let go; failures are ignored.
    fn unwatch(&mut self, dir: &Path);
}

/// For tests and for a polling-only mode.
pub struct NoWatch;

impl DirWatcher for NoWatch {
    fn watch(&mut self, _dir: &Path) -> Result<(), notify::Error> {
        Ok(())
    }
    fn unwatch(&mut self, _dir: &Path) {}
}

struct Source {
    restart: u32,
    key: FileKey,
    path: PathBuf,
    file: File,
    /// Device and inode of the open fd: the key's, except for a file read back from its
    /// `.gz`, whose original inode is free for the kubelet's next file.
    held: (u64, u64),
    offset: u64,
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
    /// An archive job for this task is with the worker.
    job_in_flight: bool,
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
    committed_len: u64,
    /// The spool file length of that commit.
    committed_file_len: u64,
    first_seen_ms: u64,
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
            job_in_flight: false,
            archive_retry_at: None,
            archive_failures: 0,
            seal_failures: 0,
            seal_retry_at: None,
            archived_to: None,
            archive_error: None,
            upload: UploadState::default(),
            committed_len: 0,
            committed_file_len: 0,
            first_seen_ms: now_ms(),
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
    tasks: BTreeMap<String, Task>,
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
    packer: Packer,
    /// Reading is paused because the spools reached `spool_max_bytes`.
    backpressure: bool,
    /// A spool was created since the last commit: the next one syncs the spool directory.
    spool_dir_unsynced: bool,
    /// Bytes of spools set aside (`*.corrupt-*`), counted against `spool_max_bytes`.
    aside_bytes: u64,
}

/// What a commit in flight holds, to apply when it is done.
struct InFlight {
    marks: Vec<Mark>,
    /// Tasks whose spools the job syncs.
    synced: Vec<String>,
    spool_dir_synced: bool,
    commit_now: bool,
    checkpoint_dirty: bool,
}

/// A task's snapshot as the commit in flight records it.
struct Mark {
    pod_dir: String,
    snapshot_gen: u64,
    log_len: u64,
    file_len: u64,
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
            block_max_age: Duration::from_millis(cfg.block_max_age_ms),
            idle_timeout: (cfg.idle_timeout_secs > 0)
                .then(|| Duration::from_secs(cfg.idle_timeout_secs)),
            retention: Duration::from_secs(cfg.retention_secs),
            part_sizes: cfg.archive.part_sizes(),
            archive_retry_max: Duration::from_secs(cfg.archive_retry_max_secs.max(1)),
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
            packer: Packer::new(cfg.compression_level),
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

    fn restore(&mut self, ts: TaskState) -> Result<(), PipelineError> {
        let Some(pod) = PodDir::parse(&ts.pod_dir) else {
            warn!(pod_dir = %ts.pod_dir, "checkpoint names an invalid pod directory; entry dropped");
            return Ok(());
        };
        let path = self.spool_path(&pod.name);
        if matches!(ts.phase, Phase::Archived { .. })
            && !path.exists()
            && !self.s.log_root.join(&pod.name).exists()
        {
            // Its retention ended and its spool was removed after the last checkpoint that
            // names it (a failed final commit on a full disk, a crash): archived whole, pod
            // gone, nothing left to keep.
            debug!(pod_dir = %pod.name, "archived task whose spool was already removed; forgotten");
            self.checkpoint_dirty = true;
            return Ok(());
        }
        let bad = match SpoolWriter::open(&path, ts.spool_file_len) {
            Ok(w) if w.spool().len() == ts.log_len => Ok(w),
            Ok(w) => Err(format!(
                "holds {} bytes of text, checkpoint says {}",
                w.spool().len(),
                ts.log_len
            )),
            Err(e @ crate::spool::SpoolError::Corrupt { .. }) => Err(e.to_string()),
            Err(source) => {
                return Err(PipelineError::SpoolUnavailable {
                    pod_dir: ts.pod_dir,
                    source,
                });
            }
        };
        let writer = match bad {
            Ok(w) => w,
            Err(why) => {
                self.set_aside(&path, &why);
                return self.restore_without_spool(pod, ts, &path);
            }
        };
        let container_dir = self.s.log_root.join(&pod.name).join(&ts.container);
        let identity = restored_identity(&ts, &pod);
        let mut task = Task::new(pod, identity, container_dir, writer);
        task.restoring = Some(ts.sources.clone());
        task.done = ts.done.iter().copied().collect();
        task.last_restart = ts.last_restart;
        task.lines = ts.lines;
        task.phase = ts.phase;
        task.snapshot = Some(ts.clone());
        task.upload = ts.upload.clone();
        task.committed_len = ts.log_len;
        task.committed_file_len = ts.spool_file_len;
        task.first_seen_ms = ts.first_seen_ms;
        task.spool_lost = ts.spool_lost;
        self.reopen_sources(&mut task);
        info!(pod_dir = %task.pod.name, log_bytes = ts.log_len, files = ts.sources.len(), "resumed task from checkpoint");
        let name = task.pod.name.clone();
        self.dirty_read.insert(name.clone());
        self.tasks.insert(name.clone(), task);
        self.publish(&name);
        Ok(())
    }

    /// Opens again the files a restored task was reading, at their committed offsets. A file
    /// that cannot be found now (EMFILE with hundreds of pods, EACCES for a moment, a rename
    /// between listing and opening) is not taken for lost: that would let the directory scan
    /// open it as new, from offset 0, and spool committed text twice. Until every file is
    /// either found or known to be gone, the task reads nothing and opens no new file; the
    /// checkpoint keeps its sources as they were. Returns whether the task is settled.
    fn reopen_sources(&self, t: &mut Task) -> bool {
        let Some(states) = t.restoring.as_ref() else {
            return true;
        };
        let mut sources = VecDeque::new();
        let mut lost = Vec::new();
        let mut unopened = Vec::new();
        let since = *t.restore_failing_since.get_or_insert_with(Instant::now);
        let patient = since.elapsed() < RESTORE_PATIENCE;
        for ss in states {
            match locate(&t.container_dir, &ss.key, &self.s.state_dir) {
                Ok(Some((path, file, recovered))) => {
                    if recovered {
                        // Gzipped by the kubelet while the agent was down: read from the copy.
                        info!(pod_dir = %t.pod.name, file = %ss.path.display(), offset = ss.offset,
                            "log file was gzipped while the agent was down; reading it from its .gz");
                    }
                    sources.push_back((
                        recovered,
                        Source {
                            held: held(&file),
                            restart: ss.restart,
                            key: ss.key,
                            path: path.unwrap_or_else(|| ss.path.clone()),
                            file,
                            offset: ss.offset,
                            decode: ss.decode.clone(),
                        },
                    ));
                }
                Ok(None) => lost.push(ss),
                Err(e) if patient => {
                    if !t.restore_warned {
                        t.restore_warned = true;
                        warn!(pod_dir = %t.pod.name, file = %ss.path.display(), error = %e,
                            "cannot reopen a log file the checkpoint names; the task waits and retries (its file is not read again from the start)");
                    }
                    return false;
                }
                Err(e) => {
                    // The error does not clear: read the files that opened. This one is
                    // remembered as read up to its committed offset, so should it open later
                    // and be longer, it is read on from there (out of order, but once).
                    error!(pod_dir = %t.pod.name, file = %ss.path.display(), offset = ss.offset, error = %e,
                        "a log file the checkpoint names still cannot be reopened; reading the task's other files, this one once it can be opened");
                    unopened.push(DoneFile {
                        key: ss.key,
                        len: Some(ss.offset),
                    });
                }
            }
        }
        for ss in lost {
            self.metrics.lost_sources.fetch_add(1, Relaxed);
            warn!(
                pod_dir = %t.pod.name, file = %ss.path.display(), offset = ss.offset,
                "log file was rotated away or deleted while the agent was down; \
                 its bytes after the committed offset cannot be read"
            );
        }
        for (recovered, _) in &sources {
            let counter = if *recovered {
                &self.metrics.recovered_sources
            } else {
                &self.metrics.files_opened
            };
            counter.fetch_add(1, Relaxed);
        }
        if t.restore_warned {
            info!(pod_dir = %t.pod.name, "log files reopened; the task reads on");
        }
        t.sources = sources.into_iter().map(|(_, s)| s).collect();
        t.done.extend(unopened);
        t.restoring = None;
        t.restore_warned = false;
        t.restore_failing_since = None;
        true
    }

    /// Tries again to reopen the files of a task restored from the checkpoint; once they are
    /// open, its directory is scanned for files that came meanwhile.
    fn retry_reopen(&mut self, name: &str) {
        if self.tasks.get(name).is_none_or(|t| t.restoring.is_none()) {
            return;
        }
        if let Some(mut t) = self.tasks.remove(name) {
            if self.reopen_sources(&mut t) {
                self.dirty_pods.insert(name.to_owned());
            }
            self.tasks.insert(name.to_owned(), t);
        }
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
                        .map(|m| m.len().saturating_sub(s.offset))
                })
                .sum(),
        });
    }

    /// The registry this engine publishes its tasks to, for readers.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Moves a spool that does not match the checkpoint out of the way (kept for a look,
    /// counted in `spool_max_bytes`, removed after `retention_secs`, or first when the spools
    /// are full).
    fn set_aside(&mut self, path: &Path, why: &str) {
        let aside = path.with_extension(format!("{ASIDE}{}", now_ms()));
        error!(spool = %path.display(), moved_to = %aside.display(), "spool does not match the checkpoint ({why}); set aside");
        self.metrics.spool_errors.fetch_add(1, Relaxed);
        if fs::rename(path, &aside).is_ok() {
            // Retention counts from now: the rename keeps the spool's last write time.
            let _ = fs::File::options()
                .write(true)
                .open(&aside)
                .and_then(|f| f.set_modified(SystemTime::now()));
        }
        self.aside_bytes = aside_bytes(&self.s.spool_dir, None);
    }

    /// Restores a task whose spool was set aside, with a new empty spool.
    /// - Archived: the archive holds the whole log. The task is kept as it was (its files, what
    ///   was read of them, the archive's length), so its files are never read again as new and
    ///   archived over the complete object; it reads nothing more and is not served (readers
    ///   go to the archive), and goes when its retention ends.
    /// - Otherwise the log is read again from the start of the files that are still there;
    ///   an upload in progress is continued under its id from part 1 (re-sent parts replace
    ///   the old ones, and completion names only the new), so none is left orphaned.
    fn restore_without_spool(
        &mut self,
        pod: PodDir,
        ts: TaskState,
        path: &Path,
    ) -> Result<(), PipelineError> {
        // Without a spool the task's state would be dropped, and an archived task's files
        // archived again over the complete object: better not to start.
        let writer =
            SpoolWriter::open(path, 0).map_err(|source| PipelineError::SpoolUnavailable {
                pod_dir: ts.pod_dir.clone(),
                source,
            })?;
        self.spool_dir_unsynced = true;
        let container_dir = self.s.log_root.join(&pod.name).join(&ts.container);
        let identity = restored_identity(&ts, &pod);
        let mut task = Task::new(pod, identity, container_dir, writer);
        task.first_seen_ms = ts.first_seen_ms;
        if matches!(ts.phase, Phase::Archived { .. }) {
            // Its files are not even held open: they are never read again, and the task's
            // existence alone keeps the directory scan from taking them for new ones.
            warn!(pod_dir = %task.pod.name, "the task's log was archived whole; its local copy is lost, so it is served from the archive only and not read again");
            task.done = ts.done.iter().copied().collect();
            task.last_restart = ts.last_restart;
            task.lines = ts.lines;
            task.phase = ts.phase;
            task.spool_lost = true;
        } else {
            info!(pod_dir = %task.pod.name, "the task's log is read again from its files");
            task.upload = UploadState {
                upload_id: ts.upload.upload_id.clone(),
                parts: Vec::new(),
                completing: false,
            };
        }
        task.snapshot = Some(snapshot(&mut task));
        task.unsaved = true;
        let name = task.pod.name.clone();
        self.dirty_pods.insert(name.clone());
        self.tasks.insert(name.clone(), task);
        self.publish(&name);
        Ok(())
    }

    fn remove_orphan_spools(&mut self) {
        let Ok(rd) = fs::read_dir(&self.s.spool_dir) else {
            return;
        };
        for e in rd.flatten() {
            let name = e.file_name();
            let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".gz")) else {
                continue;
            };
            if !self.tasks.contains_key(stem) {
                // Written after the last commit: its sources restart from offset 0.
                let _ = fs::remove_file(e.path());
            }
        }
    }

    /// The counters the engine updates, shared with `/metrics`.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    // ----- discovery -------------------------------------------------------------------------

    /// Tells the engine what inotify saw. Events are hints: they only mark what to look at.
    pub fn on_fs_event(&mut self, ev: &notify::Event) {
        use notify::EventKind;
        tracing::trace!(?ev, "inotify");
        if ev.need_rescan() {
            self.metrics.watch_errors.fetch_add(1, Relaxed);
            warn!("inotify queue overflowed; rescanning the log tree");
            self.rescan_all = true;
            return;
        }
        // Opens, reads and closes (ours included: every readdir opens the directory) say
        // nothing about new data; reacting to them would feed back into endless rescans.
        if matches!(ev.kind, EventKind::Access(_)) {
            return;
        }
        for p in &ev.paths {
            let Ok(rel) = p.strip_prefix(&self.s.log_root) else {
                continue;
            };
            let mut comps = rel.components().filter_map(|c| c.as_os_str().to_str());
            let Some(pod) = comps.next() else {
                self.rescan_all = true;
                continue;
            };
            let container = comps.next();
            let file = comps.next();
            match (container, file) {
                (Some(c), Some(_)) if c == self.s.container => {
                    let data = matches!(
                        ev.kind,
                        EventKind::Modify(notify::event::ModifyKind::Data(_))
                    );
                    // Data written to a file no source holds: a new file, or one closed at
                    // its end that grew after all; the directory scan decides which.
                    let unheld = || {
                        self.tasks
                            .get(pod)
                            .is_some_and(|t| t.sources.iter().all(|s| s.path != *p))
                    };
                    if !data || unheld() {
                        self.dirty_pods.insert(pod.to_owned());
                    }
                    self.dirty_read.insert(pod.to_owned());
                }
                (Some(_), Some(_)) => {}
                _ => {
                    self.dirty_pods.insert(pod.to_owned());
                }
            }
        }
    }

    /// inotify failed (watch limit, queue overflow): fall back to rescans.
    pub fn on_watch_error(&mut self, err: &str) {
        self.metrics.watch_errors.fetch_add(1, Relaxed);
        warn!(error = err, "inotify error; rescanning the log tree");
        self.rescan_all = true;
    }

    /// Lists the log root: new pod directories become tasks, vanished ones end their tasks.
    pub fn scan_all(&mut self) {
        self.rescan_all = false;
        self.metrics.rescans.fetch_add(1, Relaxed);
        let root = self.s.log_root.clone();
        if let Err(e) = self.watcher.watch(&root) {
            self.watch_failed(&root, &e);
        }
        let mut present = BTreeSet::new();
        match fs::read_dir(&root) {
            Ok(rd) => {
                for e in rd.flatten() {
                    if let Some(name) = e.file_name().to_str() {
                        present.insert(name.to_owned());
                    }
                }
                self.warned.remove(&root);
            }
            Err(e) => {
                if self.warned.insert(root.clone()) {
                    error!(log_root = %root.display(), error = %e, "cannot list the log root; retrying");
                }
                return;
            }
        }
        let known: Vec<String> = self.tasks.keys().cloned().collect();
        for name in known.iter().filter(|n| !present.contains(*n)) {
            self.scan_pod(name);
        }
        self.ignored.retain(|n| present.contains(n));
        for name in &present {
            self.scan_pod(name);
        }
    }

    fn watch_failed(&mut self, dir: &Path, err: &notify::Error) {
        self.metrics.watch_errors.fetch_add(1, Relaxed);
        if !self.degraded {
            warn!(dir = %dir.display(), error = %err, "cannot watch directory (inotify watch limit?); falling back to polling rescans");
        }
        self.degraded = true;
    }

    fn scan_pod(&mut self, name: &str) {
        let pod_path = self.s.log_root.join(name);
        let exists = pod_path.is_dir();
        if !exists {
            if let Some(t) = self.tasks.get_mut(name)
                && !t.dir_gone
            {
                debug!(pod_dir = name, "pod directory removed; draining its files");
                t.dir_gone = true;
                self.dirty_read.insert(name.to_owned());
            }
            self.watcher.unwatch(&pod_path);
            return;
        }
        if self.ignored.contains(name) {
            return;
        }
        if !self.tasks.contains_key(name) {
            let Some(pod) = PodDir::parse(name) else {
                self.ignored.insert(name.to_owned());
                return;
            };
            let identity = self.identity.identify(&pod);
            if identity == Identity::Ignore {
                self.ignored.insert(name.to_owned());
                return;
            }
            let path = self.spool_path(name);
            let writer = match SpoolWriter::open(&path, 0) {
                Ok(w) => w,
                Err(e) => {
                    self.metrics.spool_errors.fetch_add(1, Relaxed);
                    error!(pod_dir = name, error = %e, "cannot create spool; retrying on the next scan");
                    return;
                }
            };
            self.spool_dir_unsynced = true;
            info!(pod_dir = name, identity = ?identity, "new pod log directory");
            self.metrics.tasks_started.fetch_add(1, Relaxed);
            let container_dir = pod_path.join(&self.s.container);
            self.tasks.insert(
                name.to_owned(),
                Task::new(pod, identity, container_dir, writer),
            );
        }
        let Some(t) = self.tasks.get_mut(name) else {
            return;
        };
        if t.identity == Identity::Pending {
            t.identity = self.identity.identify(&t.pod);
            if t.identity == Identity::Ignore {
                self.drop_task(name);
                return;
            }
        }
        t.dir_gone = false;
        let cdir = t.container_dir.clone();
        self.publish(name);
        for d in [&pod_path, &cdir] {
            if d.is_dir()
                && let Err(e) = self.watcher.watch(d)
            {
                self.watch_failed(d, &e);
            }
        }
        self.scan_container(name);
        self.dirty_read.insert(name.to_owned());
    }

    /// Opens the container's files that are new to the task, in log order, behind the ones it
    /// is already reading. A file is new unless it is being read, was read to its end, or
    /// belongs to an older restart than one already taken.
    fn scan_container(&mut self, name: &str) {
        let Some(t) = self.tasks.get_mut(name) else {
            return;
        };
        if t.restoring.is_some() || t.spool_lost {
            // The files being resumed are not all open yet: any file could be one of them.
            return;
        }
        let found = match tail::list(&t.container_dir) {
            Ok(f) => f,
            Err(e) => {
                if self.warned.insert(t.container_dir.clone()) {
                    error!(dir = %t.container_dir.display(), error = %e, "cannot list container log directory; retrying");
                }
                return;
            }
        };
        for f in found {
            if let Some(s) = t.sources.iter_mut().find(|s| s.held == (f.dev, f.ino)) {
                s.path = f.path;
                continue;
            }
            // A file of an older restart is never new; one read to its end may have grown.
            let drained = t
                .done
                .iter()
                .any(|d| d.key.dev == f.dev && d.key.ino == f.ino);
            if !drained && t.last_restart.is_some_and(|r| f.name.restart() < r) {
                continue;
            }
            let file = match File::open(&f.path) {
                Ok(file) => file,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    // Removed by the kubelet since the listing (a rotated file beyond
                    // containerLogMaxFiles, or gzipped): nothing of it was ours to lose here.
                    debug!(file = %f.path.display(), "log file gone between listing and open");
                    continue;
                }
                Err(e) => {
                    self.metrics.unreadable_files.fetch_add(1, Relaxed);
                    if self.warned.insert(f.path.clone()) {
                        error!(file = %f.path.display(), error = %e, "cannot open log file; retrying on every rescan");
                    }
                    continue;
                }
            };
            self.warned.remove(&f.path);
            let was_read = t.done.iter().position(|d| {
                d.key.dev == f.dev
                    && d.key.ino == f.ino
                    && tail::is_same(&file, &d.key).unwrap_or(false)
            });
            if let Some(i) = was_read {
                let d = t.done[i];
                let grown = d
                    .len
                    .is_some_and(|len| file.metadata().is_ok_and(|m| m.len() > len));
                if !grown {
                    continue;
                }
                // Closed at its end, then written to after all (a late write, or a status that
                // said the container had ended when it had not): read on from where reading
                // stopped. It precedes every file still open, which were all found after it.
                let offset = d.len.unwrap_or_default();
                warn!(file = %f.path.display(), offset, "log file grew after it was read to its end and closed; reading on");
                t.done.remove(i);
                self.metrics.files_opened.fetch_add(1, Relaxed);
                t.sources.push_front(Source {
                    held: held(&file),
                    restart: f.name.restart(),
                    key: d.key,
                    path: f.path,
                    file,
                    offset,
                    decode: FileDecodeState::default(),
                });
                continue;
            }
            let key = match tail::key_of(&file) {
                Ok(k) => k,
                Err(e) => {
                    warn!(file = %f.path.display(), error = %e, "cannot read log file; retrying");
                    continue;
                }
            };
            debug!(file = %f.path.display(), "following log file");
            self.metrics.files_opened.fetch_add(1, Relaxed);
            t.last_restart = Some(
                t.last_restart
                    .map_or(f.name.restart(), |r| r.max(f.name.restart())),
            );
            t.sources.push_back(Source {
                held: held(&file),
                restart: f.name.restart(),
                key,
                path: f.path,
                file,
                offset: 0,
                decode: FileDecodeState::default(),
            });
        }
    }

    // ----- reading ---------------------------------------------------------------------------

    /// Reads what inotify pointed at and what rescans found. Returns whether work is left
    /// (a task hit its read budget), in which case the caller should call again soon.
    pub fn process(&mut self, now: Instant) -> bool {
        if self.rescan_all {
            self.scan_all();
        }
        for name in std::mem::take(&mut self.dirty_pods) {
            self.scan_pod(&name);
        }
        let mut room = self.spool_room();
        let mut more = false;
        for name in std::mem::take(&mut self.dirty_read) {
            // When the spools are full, only pods that are gone are still read: their end
            // and archive are what frees space, and their deleted files hold disk too. The
            // others keep their mark and are read once space is back; their bytes wait in
            // the source files meanwhile.
            let gone = self.tasks.get(&name).is_some_and(|t| t.dir_gone);
            if room == 0 && !gone {
                self.dirty_read.insert(name);
                continue;
            }
            let (again, used) = self.read_task(&name, now, if gone { u64::MAX } else { room });
            if again {
                self.dirty_read.insert(name);
                more = true;
            }
            room = room.saturating_sub(used);
        }
        if room == 0 {
            // Says so (log, metric) the moment the bound is reached.
            self.spool_room();
        }
        more && room > 0
    }

    /// How many more bytes the spools may take before `spool_max_bytes`. Before saying none,
    /// spools that are archived and whose pod is gone are dropped early, retention or not.
    fn spool_room(&mut self) -> u64 {
        let Some(max) = self.s.spool_max_bytes else {
            return u64::MAX;
        };
        let used = |tasks: &BTreeMap<String, Task>| -> u64 {
            tasks
                .values()
                .map(|t| t.writer.spool().file_len() + t.writer.tail_len() as u64)
                .sum()
        };
        let mut now_used = used(&self.tasks) + self.aside_bytes;
        if now_used >= max {
            self.collect_expired_at(Duration::ZERO);
            now_used = used(&self.tasks) + self.aside_bytes;
        }
        if now_used < max {
            if self.backpressure {
                info!("spools below spool_max_bytes again; reading resumes");
                self.backpressure = false;
            }
            return max - now_used;
        }
        if !self.backpressure {
            self.backpressure = true;
            self.metrics.backpressure_pauses.fetch_add(1, Relaxed);
            warn!(
                spool_bytes = now_used,
                spool_max_bytes = max,
                "spools are full: reading paused until archives complete and free space"
            );
        }
        0
    }

    /// Reads one task's files in order until they are drained, the read budget is spent or
    /// the spool has grown by `room` bytes. Returns whether more is waiting, and the growth.
    fn read_task(&mut self, name: &str, now: Instant, room: u64) -> (bool, u64) {
        let Some(t) = self.tasks.get_mut(name) else {
            return (false, 0);
        };
        if t.task_id().is_none() || t.restoring.is_some() || t.spool_lost {
            return (false, 0);
        }
        let size = |t: &Task| t.writer.spool().file_len() + t.writer.tail_len() as u64;
        let size_before = size(t);
        let (dir_gone, pod) = (t.dir_gone, t.pod.clone());
        let identity = &mut self.identity;
        let mut finished = || dir_gone || identity.container_finished(&pod);
        let mut total = 0u64;
        let mut appended = 0u64;
        let mut stats = DecodeStats::default();
        let mut more = false;
        let mut reactivated = false;
        loop {
            if t.writer.tail_len() >= self.s.block_bytes
                && !seal(t, &mut self.packer, &self.metrics)
            {
                // Disk full or similar: stop reading until the tail can be sealed.
                break;
            }
            if total >= READ_BUDGET || size(t).saturating_sub(size_before) >= room {
                more = true;
                break;
            }
            let room = self.s.block_bytes.saturating_sub(t.writer.tail_len());
            match read_step(
                t,
                &mut self.buf,
                room,
                (READ_BUDGET - total) as usize,
                self.s.block_bytes,
                &self.decoder,
                &mut stats,
                &mut finished,
                &self.metrics,
            ) {
                Step::Read(n) => total += n,
                Step::Full => {
                    if !seal(t, &mut self.packer, &self.metrics) {
                        break;
                    }
                }
                Step::Closed(n) => appended += n,
                Step::Wait => break,
                Step::Truncated => {
                    // What was read before the cut exists nowhere else now: make it durable
                    // before anything else, with the file's offset already back at 0.
                    seal(t, &mut self.packer, &self.metrics);
                    self.commit_now = true;
                }
            }
        }
        if t.tail_since.is_none() && t.writer.tail_len() > 0 {
            t.tail_since = Some(now);
        }
        if total > 0 || appended > 0 {
            t.last_growth = now;
            if t.phase != Phase::Running {
                info!(
                    pod_dir = name,
                    "task wrote more after its log was archived; it will be archived again when it ends"
                );
                t.phase = Phase::Running;
                reactivated = true;
            }
        }
        let m = &self.metrics;
        m.read_bytes.fetch_add(total, Relaxed);
        m.records.fetch_add(stats.records, Relaxed);
        m.lines.fetch_add(stats.lines, Relaxed);
        m.malformed_records.fetch_add(stats.malformed, Relaxed);
        m.truncated_lines.fetch_add(stats.truncated_lines, Relaxed);
        m.truncated_bytes.fetch_add(stats.truncated_bytes, Relaxed);
        let grew = size(t).saturating_sub(size_before);
        if t.sources.is_empty() && t.phase == Phase::Running && finished() {
            self.end_task(name);
        } else if reactivated {
            self.publish(name);
        }
        (more, grew)
    }

    // ----- time-driven work ------------------------------------------------------------------

    /// The periodic pass: reads every task (in case an event was missed), seals tails that are
    /// old enough, ends idle tasks, retries archives and drops expired spools.
    pub fn tick(&mut self, now: Instant) {
        if self.degraded {
            self.rescan_all = true;
        }
        let names: Vec<String> = self.tasks.keys().cloned().collect();
        for name in &names {
            self.retry_reopen(name);
            self.dirty_read.insert(name.clone());
        }
        self.process(now);
        for name in &names {
            let Some(t) = self.tasks.get_mut(name) else {
                continue;
            };
            if t.task_id().is_none() {
                t.identity = self.identity.identify(&t.pod);
                if t.identity == Identity::Ignore {
                    self.drop_task(name);
                } else {
                    self.publish(name);
                }
                continue;
            }
            if t.tail_since
                .is_some_and(|s| now.duration_since(s) >= self.s.block_max_age)
                && seal(t, &mut self.packer, &self.metrics)
            {
                // A slow task: no need to hold a block's worth of buffer until its next line.
                t.writer.release_tail();
            }
            let idle = self
                .s
                .idle_timeout
                .is_some_and(|d| now.duration_since(t.last_growth) >= d);
            if t.phase == Phase::Running && idle && t.restoring.is_none() {
                info!(
                    pod_dir = name,
                    "no new log lines for idle_timeout_secs; ending the task"
                );
                self.end_task(name);
            }
        }
        self.collect_expired();
        self.take_back_peons();
        // Once a poll: readers see upload progress and how far behind each task's reading is.
        for name in &names {
            self.publish(name);
        }
        self.registry.set_pending(
            self.tasks
                .values()
                .filter(|t| t.identity == Identity::Pending)
                .map(|t| PendingPod {
                    pod: t.pod.clone(),
                    since_ms: t.first_seen_ms,
                })
                .collect(),
        );
    }

    /// A directory let go as "not a peon" whose pod now turns out to be one (its metadata came
    /// late) is taken back: it was never read, so it is read from the start of its files.
    fn take_back_peons(&mut self) {
        let back: Vec<String> = self
            .ignored
            .iter()
            .filter(|name| PodDir::parse(name).is_some_and(|pod| self.identity.is_peon(&pod)))
            .cloned()
            .collect();
        for name in back {
            info!(pod_dir = %name, "pod turned out to be a peon after all; reading its log from the start");
            self.ignored.remove(&name);
            self.dirty_pods.insert(name);
        }
    }

    fn end_task(&mut self, name: &str) {
        let Some(t) = self.tasks.get_mut(name) else {
            return;
        };
        if !seal(t, &mut self.packer, &self.metrics) {
            return; // retried on the next tick
        }
        // An ended task rarely writes again: its spool stays for readers, its buffer need not.
        t.writer.release_tail();
        // The tail is empty now, so this snapshot is a valid checkpoint of the whole log.
        t.phase = Phase::Ended;
        t.snapshot = Some(snapshot(t));
        t.unsaved = true;
        t.snapshot_gen += 1;
        self.metrics.tasks_ended.fetch_add(1, Relaxed);
        info!(pod_dir = name, task = ?t.task_id().map(|i| i.as_str()), bytes = t.writer.spool().len(), "task log ended");
        self.commit_now = true;
        self.publish(name);
    }

    /// Forgets a pod that turned out not to be a peon: its files are closed unread and its
    /// (empty) spool removed.
    fn drop_task(&mut self, name: &str) {
        if let Some(t) = self.tasks.remove(name) {
            info!(pod_dir = name, "not a peon pod; its log is not read");
            let _ = fs::remove_file(t.writer.spool().path());
            self.ignored.insert(name.to_owned());
            self.checkpoint_dirty = true;
        }
    }

    fn collect_expired(&mut self) {
        self.collect_expired_at(self.s.retention);
    }

    /// Drops the spools of archived tasks whose pod is gone and whose archive is older than
    /// `retention`.
    fn collect_expired_at(&mut self, retention: Duration) {
        let now = now_ms();
        let retention = retention.as_millis() as u64;
        let expired: Vec<String> = self
            .tasks
            .iter()
            .filter(|(_, t)| {
                t.dir_gone
                    && matches!(t.phase, Phase::Archived { at_ms, .. } if now.saturating_sub(at_ms) >= retention)
            })
            .map(|(n, _)| n.clone())
            .collect();
        if self.aside_bytes > 0 {
            self.aside_bytes =
                aside_bytes(&self.s.spool_dir, Some(Duration::from_millis(retention)));
        }
        for name in expired {
            if let Some(t) = self.tasks.remove(&name) {
                if let Some(id) = t.task_id() {
                    self.registry.remove(id, &name);
                }
                let _ = fs::remove_file(t.writer.spool().path());
                debug!(pod_dir = %name, "retention over; spool removed");
                self.checkpoint_dirty = true;
            }
        }
    }

    // ----- durability ------------------------------------------------------------------------

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
                    error!(error = %e, "checkpoint not committed; retrying");
                } else {
                    debug!(error = %e, attempts = self.commit_failures, "checkpoint still not committed");
                }
                for name in &f.synced {
                    if let Some(t) = self.tasks.get_mut(name) {
                        t.writer.mark_unsynced();
                    }
                }
                self.spool_dir_unsynced |= f.spool_dir_synced;
                // Retried after commit_interval_ms, not at once: a full disk must not turn
                // the ingest loop into a stream of failing commits.
                self.checkpoint_dirty |= f.checkpoint_dirty || f.commit_now;
                false
            }
        }
    }

    /// Hands work to the archive: the rest of every task whose end is committed, and, for
    /// targets that store parts while a task runs, every whole part of committed bytes. Only
    /// committed bytes may leave the node: after a crash the spool is cut back to them, and an
    /// archive must never hold bytes the spool then lacks, nor an end a crash could undo.
    fn queue_archives(&mut self, now: Instant) {
        for t in self.tasks.values_mut() {
            if t.job_in_flight || t.archive_retry_at.is_some_and(|at| now < at) {
                continue;
            }
            let task = match &t.identity {
                Identity::Task(id) => id.clone(),
                _ => continue,
            };
            let kind = match t.phase {
                // The end is committed (not unsaved), so the committed lengths are the whole
                // log; never the live lengths, which a crash could cut back.
                Phase::Ended if !t.unsaved => JobKind::Finish {
                    len: t.committed_len,
                    file_len: t.committed_file_len,
                },
                Phase::Running => {
                    // Parts are cut from the text, or from the spool file for gzip output.
                    let have = if self.s.upload_gzip {
                        t.committed_file_len
                    } else {
                        t.committed_len
                    };
                    match self.s.part_sizes {
                        Some(sizes)
                            if sizes
                                .next_part_end(&t.upload)
                                .is_some_and(|end| have >= end) =>
                        {
                            JobKind::Parts {
                                committed: t.committed_len,
                                committed_file: t.committed_file_len,
                            }
                        }
                        _ => continue,
                    }
                }
                _ => continue,
            };
            t.job_in_flight = true;
            self.jobs.push(Job {
                pod_dir: t.pod.name.clone(),
                task,
                spool: t.writer.spool().clone(),
                state: t.upload.clone(),
                origin: Origin {
                    namespace: t.pod.namespace.clone(),
                    pod: t.pod.pod.clone(),
                    pod_uid: t.pod.uid.clone(),
                    node: self.s.node.clone(),
                    first_seen_ms: t.first_seen_ms,
                },
                kind,
            });
        }
    }

    /// Jobs decided since the last call, for the caller to hand to the archive worker; the
    /// worker's answer comes back through [`Ingest::archive_finished`].
    pub fn take_archive_jobs(&mut self) -> Vec<Job> {
        std::mem::take(&mut self.jobs)
    }

    /// Records what the archive worker did.
    pub fn archive_finished(&mut self, o: &Outcome, now: Instant) {
        let Some(t) = self.tasks.get_mut(o.pod_dir()) else {
            return;
        };
        t.job_in_flight = false;
        match o {
            Outcome::Skipped { .. } => return,
            Outcome::Progress { state, .. } => {
                let new = state.parts.len().saturating_sub(t.upload.parts.len()) as u64;
                let bytes = state.uploaded().saturating_sub(t.upload.uploaded());
                self.metrics.upload_parts.fetch_add(new, Relaxed);
                self.metrics.upload_bytes.fetch_add(bytes, Relaxed);
                t.upload = state.clone();
                t.archive_failures = 0;
                t.archive_error = None;
                // Parts stored but not in the checkpoint are sent again after a crash: record
                // them with the next commit, not one interval later.
                self.commit_now |= new > 0;
            }
            Outcome::Done {
                task,
                len,
                location,
                ..
            } => {
                self.metrics.archives.fetch_add(1, Relaxed);
                info!(task = %task, location = %location, bytes = len, "log archived");
                t.archive_retry_at = None;
                t.archive_failures = 0;
                t.archive_error = None;
                t.archived_to = Some(location.clone());
                // A later end (the task wrote again) starts a new archive that replaces this.
                t.upload = UploadState::default();
                if t.phase == Phase::Ended && t.writer.spool().len() == *len {
                    t.phase = Phase::Archived {
                        at_ms: now_ms(),
                        archived_len: *len,
                    };
                }
            }
            Outcome::Failed {
                task,
                error,
                permanent,
                state,
                ..
            } => {
                self.metrics.archive_errors.fetch_add(1, Relaxed);
                t.upload = state.clone();
                t.archive_failures = t.archive_failures.saturating_add(1);
                let delay = backoff(t.archive_failures, *permanent, self.s.archive_retry_max);
                error!(task = %task, error = %error, permanent, retry_in_ms = delay.as_millis() as u64,
                    "archive failed; the spool is kept and the archive retried");
                t.archive_retry_at = Some(now + delay);
                t.archive_error = Some(error.clone());
            }
        }
        if let Some(s) = &mut t.snapshot {
            s.phase = t.phase;
            s.upload = t.upload.clone();
        }
        t.unsaved = true;
        t.snapshot_gen += 1;
        let name = o.pod_dir().to_owned();
        self.publish(&name);
    }

    /// Seals every tail and commits: called on SIGTERM so the next agent resumes with little to
    /// re-read. Reads what is left in open files first, for at most `read_for`.
    pub fn shutdown(&mut self, read_for: Duration) -> bool {
        // A file whose pod was deleted moments ago is still open here but gone for the next
        // agent: read everything there is (bounded) before the last checkpoint.
        let deadline = Instant::now() + read_for;
        let names: Vec<String> = self.tasks.keys().cloned().collect();
        self.dirty_read.extend(names);
        while self.process(Instant::now()) && Instant::now() < deadline {}
        for t in self.tasks.values_mut() {
            seal(t, &mut self.packer, &self.metrics);
        }
        self.commit(Instant::now())
    }

    /// Whether reads or scans are waiting, so that the driver loops again at once rather than
    /// waiting for an event or the poll interval.
    pub fn has_work_queued(&self) -> bool {
        !self.dirty_read.is_empty() || !self.dirty_pods.is_empty() || self.rescan_all
    }
}

/// Seals the tail and takes the task's checkpoint snapshot. Returns false if the spool write
/// failed (the tail is kept for a retry).
fn seal(t: &mut Task, packer: &mut Packer, m: &Metrics) -> bool {
    if t.writer.tail_len() == 0 {
        return true;
    }
    if t.seal_retry_at.is_some_and(|at| Instant::now() < at) {
        return false;
    }
    match t.writer.seal(packer) {
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
                error!(pod_dir = %t.pod.name, error = %e, "cannot write spool block; reading of this task paused until it succeeds");
            } else {
                debug!(pod_dir = %t.pod.name, error = %e, attempts = t.seal_failures, "spool write still failing");
            }
            false
        }
    }
}

fn snapshot(t: &mut Task) -> TaskState {
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
        spool_file_len: t.writer.spool().file_len(),
        log_len: t.writer.spool().len(),
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

/// The identity a checkpoint recorded: a task id, the fallback name of a peon whose id could
/// not be learned (never a valid task id, so checked against the pod), or not known yet.
fn restored_identity(ts: &TaskState, pod: &PodDir) -> Identity {
    let unmapped = TaskId::unmapped(pod);
    match ts.task_id.as_deref() {
        Some(id) if id == unmapped.as_str() => Identity::Task(unmapped),
        Some(id) => TaskId::new(id).map_or(Identity::Pending, Identity::Task),
        None => Identity::Pending,
    }
}

/// Marks a spool set aside: `<pod dir>.corrupt-<ms>`.
const ASIDE: &str = "corrupt-";

/// The bytes of the spools set aside in `dir`; with `older_than`, those set aside longer ago
/// are removed first.
fn aside_bytes(dir: &Path, older_than: Option<Duration>) -> u64 {
    let Ok(rd) = fs::read_dir(dir) else {
        return 0;
    };
    let mut total = 0;
    for e in rd.flatten() {
        let is_aside = e
            .file_name()
            .to_str()
            .is_some_and(|n| n.contains(&format!(".{ASIDE}")));
        let Ok(md) = e.metadata() else {
            continue;
        };
        if !is_aside {
            continue;
        }
        let old = older_than.is_some_and(|age| {
            md.modified()
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|elapsed| elapsed >= age)
        });
        if old && fs::remove_file(e.path()).is_ok() {
            info!(file = %e.path().display(), "spool set aside longer than retention_secs; removed");
            continue;
        }
        total += md.len();
    }
    total
}

/// Finds the file `key` was taken from in a container directory: `Ok(Some((path, file,
/// recovered)))` if it is there (under any name, or read back from its `.gz`, then without a
/// path), `Ok(None)` if a complete listing shows it is gone, `Err` if that cannot be told now.
fn locate(
    dir: &Path,
    key: &FileKey,
    scratch: &Path,
) -> io::Result<Option<(Option<PathBuf>, File, bool)>> {
    for f in tail::list(dir)?
        .into_iter()
        .filter(|f| f.dev == key.dev && f.ino == key.ino)
    {
        // NotFound too is an error here: renamed since the listing, found under its new name
        // by the next attempt.
        let file = File::open(&f.path)?;
        if tail::is_same(&file, key)? {
            return Ok(Some((Some(f.path), file, false)));
        }
    }
    if !dir.is_dir() {
        // The pod's directory went while the agent was down (listed as empty above).
        return Ok(None);
    }
    Ok(tail::recover_gz(dir, key, scratch)?.map(|file| (None, file, true)))
}

enum Step {
    /// Consumed this many bytes (0: more arrived meanwhile, read again).
    Read(u64),
    /// The next record does not fit in the block: seal, then read on.
    Full,
    /// The front file was drained and closed, its text ended with this many bytes (the end
    /// of a line left open); the next one may be read.
    Closed(u64),
    /// Nothing more to read now.
    Wait,
    /// The front file shrank and is read again from 0.
    Truncated,
}

/// One read of the task's current file. The offset only ever moves past complete records, so
/// a record still being written is read again in full later.
#[allow(clippy::too_many_arguments)]
fn read_step(
    t: &mut Task,
    buf: &mut [u8],
    room: usize,
    limit: usize,
    block: usize,
    dec: &Decoder,
    stats: &mut DecodeStats,
    finished: &mut dyn FnMut() -> bool,
    m: &Metrics,
) -> Step {
    let Task {
        sources,
        writer,
        lines,
        done,
        ..
    } = t;
    let Some(src) = sources.front_mut() else {
        return Step::Wait;
    };
    // Read at most what fills the block (decoded text is never longer than its records, so
    // the tail, memory held per task, stays within the block size) and what is left of the
    // task's read budget for this turn.
    let room = room.clamp(1, buf.len());
    let mut want = room.min(limit).max(1);
    let n = loop {
        let n = match src.file.read_at(&mut buf[..want], src.offset) {
            Ok(n) => n,
            Err(e) => {
                warn!(file = %src.path.display(), error = %e, "read failed; retrying");
                return Step::Wait;
            }
        };
        if n == 0 {
            break n;
        }
        let input = &buf[..n];
        let mut used = writer.append(|tail| {
            reserve_tail(tail, n, block);
            dec.decode(&mut src.decode, lines, input, Tail::Growing, tail, stats)
        });
        if used == 0 && n == want {
            if want < room {
                // The record is longer than the read budget left: read up to the block.
                want = (want * 2).max(MIN_READ).min(room);
                continue;
            }
            if writer.tail_len() > 0 {
                // The next record does not fit in what is left of the block.
                return Step::Full;
            }
            if want < buf.len() {
                // A record longer than a block: read more.
                want = (want * 2).max(MIN_READ).min(buf.len());
                continue;
            }
            // One record larger than the buffer: take it piecewise rather than never.
            used = writer.append(|tail| {
                dec.decode(&mut src.decode, lines, input, Tail::Oversized, tail, stats)
            });
        }
        if used > 0 {
            src.offset += used as u64;
            return Step::Read(used as u64);
        }
        break n;
    };
    // At the end of the file, or only a record still being written is left.
    let md = match src.file.metadata() {
        Ok(md) => md,
        Err(_) => return Step::Wait,
    };
    if md.len() < src.offset {
        m.file_truncations.fetch_add(1, Relaxed);
        warn!(file = %src.path.display(), was = src.offset, now = md.len(), "log file shrank (copytruncate?); reading it again from the start");
        src.offset = 0;
        src.decode = FileDecodeState::default();
        // The leading bytes the fingerprint covered are gone; it is taken again from the new
        // content at the next snapshot.
        src.key.fp_len = 0;
        src.key.fp = 0;
        return Step::Truncated;
    }
    // Asked after the read, and before the file is looked at again: the freshest word on
    // the container, and any byte written before it was given is seen below.
    let finished = finished();
    // A later file that has data (or belongs to a later container start) means the runtime
    // has moved on: this one will not grow any more.
    let superseded = sources.iter().skip(1).any(|next| {
        next.restart > sources[0].restart || next.file.metadata().is_ok_and(|m| m.len() > 0)
    });
    let src = &mut sources[0];
    let md = match src.file.metadata() {
        Ok(md) => md,
        Err(_) => return Step::Wait,
    };
    if !(finished || superseded || md.nlink() == 0) {
        return Step::Wait;
    }
    // The file was at its end when read, and cannot grow from now on; but bytes written
    // between that read and this decision (the runtime's last write, a write to a renamed
    // file until the runtime reopens) are there: read them before closing.
    if md.len() > src.offset + n as u64 {
        return Step::Read(0);
    }
    if n > 0 {
        // The file will not grow: its unterminated last record is final.
        let input = &buf[..n];
        let used = writer
            .append(|tail| dec.decode(&mut src.decode, lines, input, Tail::Final, tail, stats));
        src.offset += used as u64;
        return Step::Read(used as u64);
    }
    let mut appended = 0;
    if let Some(c) = src.decode.continuing.take()
        && c.ends_line
    {
        writer.append(|tail| tail.push(b'\n'));
        appended = 1;
        lines[c.stream as usize & 1] = LineState::default();
        // The decoder counts the lines it ends; this one ends here.
        stats.lines += 1;
    }
    let mut key = src.key;
    if let Ok((len, fp)) = tail::fingerprint(&src.file, FINGERPRINT_LEN) {
        key.fp_len = len;
        key.fp = fp;
    }
    debug!(file = %src.path.display(), bytes = src.offset, "log file drained; closed");
    let len = src.offset;
    sources.pop_front();
    m.files_closed.fetch_add(1, Relaxed);
    done.push_back(DoneFile {
        key,
        len: Some(len),
    });
    if done.len() > DONE_MEMORY {
        done.pop_front();
    }
    Step::Closed(appended)
}

/// Makes room for `n` more bytes in a tail, growing it geometrically (a slow task's tail is
/// not copied at every small append) but never past the block size for reads that fit in it:
/// with hundreds of busy tasks, a tail's spare capacity is the larger part of its memory.
fn reserve_tail(tail: &mut Vec<u8>, n: usize, block: usize) {
    if tail.capacity() - tail.len() >= n {
        return;
    }
    let want = (tail.capacity() * 2).min(block).max(tail.len() + n);
    tail.reserve_exact(want - tail.len());
}

/// Exponential backoff with jitter: 1 s doubling up to `max`; permanent errors (access denied,
/// no such bucket) start at a quarter of `max`, since a person has to act first.
fn backoff(failures: u32, permanent: bool, max: Duration) -> Duration {
    let base = if permanent {
        max / 4
    } else {
        Duration::from_secs(1)
    };
    let exp = base.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    let capped = exp.min(max);
    // Spread retries of many tasks over time instead of retrying all at once.
    let jitter = fastrand::u64(..=capped.as_millis() as u64 / 4);
    capped - Duration::from_millis(jitter)
}
