//! Restore after a crash or restart: spools cut back to their committed length, sources
//! found again by identity and reopened at their committed offsets, damaged spools set aside.

use std::collections::VecDeque;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant, SystemTime};

use crate::oneline::OneLine;
use tracing::{debug, error, info, warn};

use crate::archive::UploadState;
use crate::checkpoint::{DoneFile, FileKey, Phase, TaskState};
use crate::spool::{SpoolFileOffset, SpoolWriter};
use crate::tail;
use crate::task::{Identity, PodDir, TaskId};

use super::commit::snapshot;
use super::{Ingest, PipelineError, Source, Task, held, now_ms};

/// How long a restored task waits for the files of its checkpoint to open again (EMFILE,
/// EACCES) before it reads the ones that did: long enough for a transient cause to pass.
const RESTORE_PATIENCE: Duration = Duration::from_secs(60);

impl Ingest {
    pub(super) fn restore(&mut self, ts: TaskState) -> Result<(), PipelineError> {
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
            Ok(w) if w.log_len() == ts.log_len => Ok(w),
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
        info!(pod_dir = %task.pod.name, log_bytes = ts.log_len.get(), files = ts.sources.len(), "resumed task from checkpoint");
        let name = task.pod.name.clone();
        self.dirty_read.insert(name.clone());
        self.tasks.insert(task.pod.clone(), task);
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
                        info!(pod_dir = %t.pod.name, file = %ss.path.display(), offset = ss.offset.get(),
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
                        warn!(pod_dir = %t.pod.name, file = %ss.path.display(), error = %OneLine(&e),
                            "cannot reopen a log file the checkpoint names; the task waits and retries (its file is not read again from the start)");
                    }
                    return false;
                }
                Err(e) => {
                    // The error does not clear: read the files that opened. This one is
                    // remembered as read up to its committed offset, so should it open later
                    // and be longer, it is read on from there (out of order, but once).
                    error!(pod_dir = %t.pod.name, file = %ss.path.display(), offset = ss.offset.get(), error = %OneLine(&e),
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
                pod_dir = %t.pod.name, file = %ss.path.display(), offset = ss.offset.get(),
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
    pub(super) fn retry_reopen(&mut self, name: &str) {
        if self.tasks.get(name).is_none_or(|t| t.restoring.is_none()) {
            return;
        }
        if let Some(mut t) = self.tasks.remove(name) {
            if self.reopen_sources(&mut t) {
                self.dirty_pods.insert(name.to_owned());
            }
            self.tasks.insert(t.pod.clone(), t);
        }
    }

    /// Moves a spool that does not match the checkpoint out of the way (kept for a look,
    /// counted in `spool_max_bytes`, removed after `retention`, or first when the spools
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
        let writer = SpoolWriter::open(path, SpoolFileOffset::ZERO).map_err(|source| {
            PipelineError::SpoolUnavailable {
                pod_dir: ts.pod_dir.clone(),
                source,
            }
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
        self.tasks.insert(task.pod.clone(), task);
        self.publish(&name);
        Ok(())
    }

    pub(super) fn remove_orphan_spools(&mut self) {
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
pub(super) fn aside_bytes(dir: &Path, older_than: Option<Duration>) -> u64 {
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
            info!(file = %e.path().display(), "spool set aside longer than retention; removed");
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
