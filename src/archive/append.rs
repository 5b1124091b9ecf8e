//! A directory archive written while the task runs, from the text the ingest thread has just
//! sealed, so that the task's end costs a rename instead of inflating the whole spool.
//!
//! Inflating the spool for the archive was a fifth of the agent's CPU on a directory target
//! (docs/performance.md); the text exists in plain form once, in the tail the ingest thread
//! seals, and the archive writes it out anyway. So, for the directory target only, each sealed
//! tail is handed (moved, not copied: the tail takes a recycled buffer in its place) to one
//! appender thread, which appends it to a hidden file beside the archive,
//! `{dir}/.{pod_dir}.partial`. At the task's end the worker takes that file if it holds at
//! least the whole committed log, cuts it to that length, syncs it and renames it into place.
//!
//! The spool stays the source of truth and nothing here is ever needed: every doubt falls
//! back to the whole write from the spool ([`crate::archive::DirArchive::put`]). A partial is
//! only kept while it holds exactly the text `[0, n)` of its spool, checked by position at each
//! block: a block the ingest thread did not hand over (the appender is [`IN_FLIGHT_MAX`] behind,
//! say on a slow shared volume), a failed write, a task resumed after a restart (its first block
//! does not start at 0), each drops the partial for good. No state crosses a restart: a
//! partial left by an earlier run is removed when its task ends.
//!
//! The ingest thread never waits here: handing over is a channel send, and over the in-flight
//! bound it keeps the text instead (the archive then falls back). It sends blocks in batches
//! ([`Handoff::flush`], about once per round of reads): a send per 64 KiB block woke the
//! appender thousands of times a second, and those wakeups cost the ingest thread a tenth of
//! its time.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, mpsc};

use tracing::debug;

use crate::spool::LogOffset;

/// Bytes of sealed text handed over and not yet written, above which the ingest thread keeps
/// its text rather than hand over more. Far above what a local disk needs (the appender writes
/// to the page cache many times faster than ingest seals), it bounds the memory a stalled
/// shared volume can pin; the affected tasks' archives are then written whole at their end.
pub const IN_FLIGHT_MAX: usize = 16 << 20;

/// Handed-over text above which a batch is sent without waiting for [`Handoff::flush`].
const BATCH_BYTES: usize = 1 << 20;

/// Recycled buffers larger than this are dropped, not pooled: one huge line must not pin its
/// buffer for the agent's life.
const POOL_BUF_MAX: usize = 4 << 20;

/// Capacity of the recycled buffers kept: a few batches' worth is all a steady flow reuses,
/// and what the pool keeps stays allocated while the agent runs.
const POOL_BYTES: usize = 4 << 20;

/// Partials open at once, each an open file descriptor on the archive volume for the task's
/// life. A node runs far fewer peons; past it new tasks get no partial (their archives are
/// written whole), rather than the agent running out of descriptors under the usual soft
/// limit of 1024.
const MAX_OPEN: usize = 256;

/// Partials not written for this long are removed when an appender starts. No agent will
/// complete them: their node is gone with its agent (a node scaled away while tasks ran), or
/// the agent that wrote them was killed and its successor has not archived the task yet. A
/// live one that old (a task silent for a day) only costs its task a whole write at the end.
pub const SWEEP_AGE: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

enum Msg {
    Block {
        pod_dir: String,
        start: LogOffset,
        text: Vec<u8>,
    },
    Take {
        pod_dir: String,
        len: LogOffset,
        reply: tokio::sync::oneshot::Sender<Option<Partial>>,
    },
    Forget {
        pod_dir: String,
    },
}

/// What both ends share: the in-flight count and the buffers given back.
struct Shared {
    in_flight: AtomicUsize,
    in_flight_max: usize,
    pool: Mutex<Pool>,
}

/// Buffers written out, for the ingest thread's next tails.
#[derive(Default)]
struct Pool {
    bufs: Vec<Vec<u8>>,
    /// Their capacities, at most [`POOL_BYTES`].
    bytes: usize,
}

impl Shared {
    /// `text` was written (or will never be): it no longer counts as in flight.
    fn done(&self, text: Vec<u8>) {
        self.in_flight.fetch_sub(text.capacity(), Relaxed);
        self.recycle(text);
    }

    fn recycle(&self, mut text: Vec<u8>) {
        let cap = text.capacity();
        if cap == 0 || cap > POOL_BUF_MAX {
            return;
        }
        text.clear();
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        if pool.bytes + cap <= POOL_BYTES {
            pool.bytes += cap;
            pool.bufs.push(text);
        }
    }
}

/// A partial archive that holds at least the whole log: the worker cuts, syncs and renames it.
#[derive(Debug)]
pub struct Partial {
    /// The open file, written through this handle.
    pub file: File,
    /// Its name, beside the archive: what to rename.
    pub path: PathBuf,
}

impl Partial {
    /// Whether `path` still names the file written through `file`: another process (an agent
    /// of this node draining while the next one starts, a cleanup) may have replaced or
    /// removed it, and renaming what the name holds then would archive the wrong text.
    pub fn still_named(&self) -> io::Result<bool> {
        let held = self.file.metadata()?;
        Ok(match fs::symlink_metadata(&self.path) {
            Ok(named) => named.dev() == held.dev() && named.ino() == held.ino(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(e),
        })
    }
}

/// The ingest thread's end: hands sealed text over, in batches.
pub struct Handoff {
    tx: mpsc::Sender<Vec<Msg>>,
    shared: Arc<Shared>,
    batch: Vec<Msg>,
    batch_bytes: usize,
}

impl std::fmt::Debug for Handoff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handoff")
            .field("in_flight", &self.shared.in_flight.load(Relaxed))
            .field("batched", &self.batch.len())
            .finish()
    }
}

impl Handoff {
    /// An empty buffer to swap with the tail being sealed: a recycled one when there is one, so
    /// the next tail is written into pages already touched. Never waits for the lock: a new
    /// buffer does as well.
    pub fn spare(&self) -> Vec<u8> {
        let Ok(mut pool) = self.shared.pool.try_lock() else {
            return Vec::new();
        };
        let buf = pool.bufs.pop().unwrap_or_default();
        pool.bytes -= buf.capacity();
        buf
    }

    /// Hands over `text`, sealed at `start` of the log of `pod_dir`, with the next
    /// [`Handoff::flush`]. Over the in-flight bound (unless nothing is in flight) the text is
    /// not taken and `false` returned: the partial of that task is then dropped at its next
    /// block, and its archive written whole. Never blocks.
    pub fn send(&mut self, pod_dir: &str, start: LogOffset, text: Vec<u8>) -> bool {
        // Buffers, not text, are what the bound is for: memory held for the writer.
        let held = text.capacity();
        let len = text.len();
        // One block is always taken when none is in flight, however long (a 100 MiB line).
        let before = self.shared.in_flight.fetch_add(held, Relaxed);
        if before > 0 && before + held > self.shared.in_flight_max {
            self.shared.done(text);
            return false;
        }
        self.batch.push(Msg::Block {
            pod_dir: pod_dir.to_owned(),
            start,
            text,
        });
        self.batch_bytes += len;
        if self.batch_bytes >= BATCH_BYTES {
            self.flush();
        }
        true
    }

    /// Keeps a buffer that is not handed over (a failed seal's spare, a released tail, the text
    /// of a task that has no partial) for a later [`Handoff::spare`].
    pub fn recycle(&self, text: Vec<u8>) {
        self.shared.recycle(text);
    }

    /// The task will never be archived from this node (its pod is not a peon): its partial,
    /// if any, is removed (after the blocks handed over before).
    pub fn forget(&mut self, pod_dir: &str) {
        self.batch.push(Msg::Forget {
            pod_dir: pod_dir.to_owned(),
        });
        self.flush();
    }

    /// Sends what was handed over since the last flush. The engine flushes after each round of
    /// reads and before it hands out archive jobs, so a task's end is asked for after its text.
    pub fn flush(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        self.batch_bytes = 0;
        if let Err(mpsc::SendError(batch)) = self.tx.send(std::mem::take(&mut self.batch)) {
            for msg in batch {
                if let Msg::Block { text, .. } = msg {
                    self.shared.done(text);
                }
            }
        }
    }
}

impl Drop for Handoff {
    fn drop(&mut self) {
        self.flush();
    }
}

/// The worker's end, held by [`crate::archive::DirArchive`].
#[derive(Clone)]
pub struct Appender {
    tx: mpsc::Sender<Vec<Msg>>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Appender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Appender").finish_non_exhaustive()
    }
}

impl Appender {
    /// Starts the appender thread for archives in `dir`, allowing `in_flight_max` bytes of
    /// handed-over text not yet written ([`IN_FLIGHT_MAX`] in the agent). The thread ends when
    /// the last [`Handoff`] and [`Appender`] are gone.
    pub fn start(dir: &Path, in_flight_max: usize) -> io::Result<Appender> {
        let (tx, rx) = mpsc::channel::<Vec<Msg>>();
        let shared = Arc::new(Shared {
            in_flight: AtomicUsize::new(0),
            in_flight_max,
            pool: Mutex::new(Pool::default()),
        });
        let mut state = State {
            dir: dir.to_owned(),
            open: HashMap::new(),
            shared: shared.clone(),
        };
        std::thread::Builder::new()
            .name("archive-append".into())
            .spawn(move || {
                for batch in rx {
                    for msg in batch {
                        state.handle(msg);
                    }
                }
            })?;
        // Apart, so that listing a large shared directory holds up no block and no end.
        let swept = dir.to_owned();
        std::thread::Builder::new()
            .name("archive-sweep".into())
            .spawn(move || sweep(&swept, SWEEP_AGE))?;
        Ok(Appender { tx, shared })
    }

    /// A new ingest-side end; blocks handed over through it are written in the order of its
    /// flushes.
    pub fn handoff(&self) -> Handoff {
        Handoff {
            tx: self.tx.clone(),
            shared: self.shared.clone(),
            batch: Vec::new(),
            batch_bytes: 0,
        }
    }

    /// The partial of `pod_dir` if it holds at least the first `len` bytes of its log (and
    /// `len` is not 0: an empty log is archived as a placeholder). Asked after every block
    /// flushed before the task's end was decided, so it waits for those to be written.
    /// `None` means: write the archive whole; any partial file is gone by then.
    pub async fn take(&self, pod_dir: &str, len: LogOffset) -> Option<Partial> {
        self.ask(pod_dir, len)?.await.ok().flatten()
    }

    /// [`Appender::take`] for a caller off the async runtime (it blocks the thread).
    pub fn take_blocking(&self, pod_dir: &str, len: LogOffset) -> Option<Partial> {
        self.ask(pod_dir, len)?.blocking_recv().ok().flatten()
    }

    fn ask(
        &self,
        pod_dir: &str,
        len: LogOffset,
    ) -> Option<tokio::sync::oneshot::Receiver<Option<Partial>>> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.tx
            .send(vec![Msg::Take {
                pod_dir: pod_dir.to_owned(),
                len,
                reply,
            }])
            .ok()?;
        Some(answer)
    }
}

/// One partial being written.
struct Open {
    file: File,
    len: u64,
}

/// The appender thread's state: the partials that still hold exactly `[0, len)` of their log.
struct State {
    dir: PathBuf,
    open: HashMap<String, Open>,
    shared: Arc<Shared>,
}

impl State {
    fn path(&self, pod_dir: &str) -> PathBuf {
        self.dir.join(format!(".{pod_dir}.partial"))
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Block {
                pod_dir,
                start,
                text,
            } => {
                self.append(pod_dir, start.get(), &text);
                self.shared.done(text);
            }
            Msg::Take {
                pod_dir,
                len,
                reply,
            } => {
                let open = self.open.remove(&pod_dir);
                let path = self.path(&pod_dir);
                let partial = match open {
                    Some(o) if len.get() > 0 && o.len >= len.get() => {
                        Some(Partial { file: o.file, path })
                    }
                    // Also a partial an earlier run left: nothing will ever complete it.
                    _ => {
                        remove(&path);
                        None
                    }
                };
                // Nobody waits any more (the agent is stopping): nothing will rename it.
                if let Err(Some(p)) = reply.send(partial)
                    && p.still_named().unwrap_or(false)
                {
                    remove(&p.path);
                }
            }
            Msg::Forget { pod_dir } => {
                self.open.remove(&pod_dir);
                remove(&self.path(&pod_dir));
            }
        }
    }

    fn append(&mut self, pod_dir: String, start: u64, text: &[u8]) {
        let room = self.open.len() < MAX_OPEN;
        match self.open.get_mut(&pod_dir) {
            Some(o) if o.len == start => {
                if let Err(e) = o.file.write_all_at(text, start) {
                    debug!(pod_dir, error = %e, "partial archive dropped; the archive will be written whole");
                    self.open.remove(&pod_dir);
                    remove(&self.path(&pod_dir));
                } else {
                    o.len += text.len() as u64;
                }
            }
            Some(_) => {
                // A block was not handed over, or the log was started again: the partial is
                // no longer the log's prefix.
                self.open.remove(&pod_dir);
                remove(&self.path(&pod_dir));
            }
            None if start == 0 && room => {
                // A new file, not a truncated one: a writer of an earlier run that still held
                // the old one must not write into this.
                let path = self.path(&pod_dir);
                remove(&path);
                let created = fs::create_dir_all(&self.dir).and_then(|()| {
                    let file = File::options().write(true).create_new(true).open(&path)?;
                    file.write_all_at(text, 0)?;
                    Ok(file)
                });
                match created {
                    Ok(file) => {
                        self.open.insert(
                            pod_dir,
                            Open {
                                file,
                                len: text.len() as u64,
                            },
                        );
                    }
                    Err(e) => {
                        debug!(pod_dir, error = %e, "no partial archive; the archive will be written whole");
                        remove(&path);
                    }
                }
            }
            // Resumed after a restart, or dropped before: the archive is written whole.
            None => {}
        }
    }
}

/// Removes the partials in `dir` (of any node) not modified for `age`: files named as this
/// module names them, `.{pod directory}.partial`, nothing else.
fn sweep(dir: &Path, age: std::time::Duration) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let mut removed = 0u32;
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        let ours = name
            .strip_prefix('.')
            .and_then(|n| n.strip_suffix(".partial"))
            .is_some_and(|pod| crate::task::PodDir::parse(pod).is_some());
        if !ours {
            continue;
        }
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|idle| idle >= age);
        if old && fs::remove_file(e.path()).is_ok() {
            removed += 1;
        }
    }
    if removed > 0 {
        tracing::info!(dir = %dir.display(), removed, "removed partial archives no agent will complete (not written for a day)");
    }
}

fn remove(path: &Path) {
    if let Err(e) = fs::remove_file(path)
        && e.kind() != io::ErrorKind::NotFound
    {
        debug!(path = %path.display(), error = %e, "cannot remove a partial archive");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Partials of other nodes' agents that will never finish them (the node is gone) are
    /// removed once a day old; newer ones, and files this module did not name, stay.
    #[test]
    fn the_sweep_removes_only_day_old_partials() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let old = dir.join(".ns_gone_uid1.partial");
        let fresh = dir.join(".ns_live_uid2.partial");
        let log = dir.join("index_old.log");
        let foreign = dir.join(".someone-elses.partial");
        for f in [&old, &fresh, &log, &foreign] {
            fs::write(f, b"text").unwrap();
        }
        let day_ago = std::time::SystemTime::now() - SWEEP_AGE;
        for f in [&old, &log, &foreign] {
            File::options()
                .write(true)
                .open(f)
                .unwrap()
                .set_modified(day_ago)
                .unwrap();
        }
        sweep(dir, SWEEP_AGE);
        assert!(!old.exists(), "a day-old partial is removed");
        assert!(fresh.exists(), "a recent partial stays");
        assert!(log.exists(), "archived logs are never touched");
        assert!(
            foreign.exists(),
            "a name that is not a pod directory's is not ours"
        );
    }
}
