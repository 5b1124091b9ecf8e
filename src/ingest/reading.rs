//! Reading: one `pread` at a time from a task's current file, decoded into its spool's tail,
//! within a read budget per turn and the room `spool_max_bytes` leaves.

use std::collections::BTreeMap;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use crate::oneline::OneLine;
use tracing::{debug, info, warn};

use crate::checkpoint::{DoneFile, Phase};
use crate::decode::{DecodeStats, Decoder, FileDecodeState, LineState, Tail};
use crate::metrics::Metrics;
use crate::tail::{self, FINGERPRINT_LEN, SourceOffset};
use crate::task::PodDir;

use super::commit::seal;
use super::{Ingest, Task};

/// Bytes read from one task before others, and inotify events, get their turn. Small enough
/// that discovery (opening new files before the kubelet can gzip and delete them) is never
/// stuck behind a long read, and that a task with a fresh line waits for at most about one
/// turn of each busy task before it is read (200 busy tasks: 12.5 MiB, tens of milliseconds;
/// it was 1 MiB, and a round took seconds when the agent had fallen behind). A block a turn:
/// smaller turns cost more CPU (32 KiB: about 7% more per GiB), as each tail goes cold in the
/// cache between its turns.
const READ_BUDGET: u64 = 64 << 10;
pub(super) const READ_BUF: usize = 256 << 10;
/// The smallest read: a containerd record is at most 16 KiB plus its header.
const MIN_READ: usize = 32 << 10;
/// Read past a turn's budget by this much: a turn ends with the record that crosses its
/// budget, most records are a few hundred bytes, and a step whose record does not fit in what
/// is left of the budget takes what the buffer holds before it reads again.
const TURN_SLACK: usize = 4 << 10;
/// How many drained files a task remembers so a rescan never reads them again; the kubelet
/// keeps far fewer files per container.
const DONE_MEMORY: usize = 64;

impl Ingest {
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
            let gone = self.tasks.get(name.as_str()).is_some_and(|t| t.dir_gone);
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
        // Once per round, not per block: each send wakes the appender.
        self.sealer.flush();
        more && room > 0
    }

    /// How many more bytes the spools may take before `spool_max_bytes`. Before saying none,
    /// spools that are archived and whose pod is gone are dropped early, retention or not.
    fn spool_room(&mut self) -> u64 {
        let Some(max) = self.s.spool_max_bytes else {
            return u64::MAX;
        };
        let used = |tasks: &BTreeMap<PodDir, Task>| -> u64 {
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
        if (t.task_id().is_none() && !t.read_pending) || t.restoring.is_some() || t.spool_lost {
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
        let mut ahead = Ahead::default();
        loop {
            if t.writer.tail_len() >= self.s.block_bytes
                && !seal(t, &mut self.sealer, &self.metrics)
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
                &mut ahead,
            ) {
                Step::Read(n) => total += n,
                Step::Full => {
                    if !seal(t, &mut self.sealer, &self.metrics) {
                        break;
                    }
                }
                Step::Closed(n) => {
                    appended += n;
                    ahead = Ahead::default();
                }
                Step::Wait => break,
                Step::Truncated => {
                    ahead = Ahead::default();
                    // What was read before the cut exists nowhere else now: make it durable
                    // before anything else, with the file's offset already back at 0.
                    seal(t, &mut self.sealer, &self.metrics);
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
                    pod_dir = %name,
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
}

/// What the read buffer holds of the task's front file since the last `pread` of this turn:
/// bytes `[offset, offset + len)`. Steps of one turn take their bytes from it instead of
/// reading them again (a block used to cost six `pread`s of about 10 KiB: a read sized to the
/// room left in the block, then smaller ones for the rest of the turn's budget). Valid within
/// one turn on one file only: the buffer is every task's, and a turn starts empty.
#[derive(Debug, Default, Clone, Copy)]
struct Ahead {
    offset: u64,
    len: usize,
}

impl Ahead {
    /// Where in the buffer the `want` bytes from file offset `at` are, if it holds them all.
    fn covers(&self, at: u64, want: usize) -> Option<usize> {
        let from = at.checked_sub(self.offset)?;
        (from + want as u64 <= self.len as u64).then_some(from as usize)
    }

    /// How many bytes from file offset `at` on the buffer holds (0 if none).
    fn held_from(&self, at: u64) -> usize {
        at.checked_sub(self.offset)
            .and_then(|from| (self.len as u64).checked_sub(from))
            .map_or(0, |n| n as usize)
    }
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
    ahead: &mut Ahead,
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
    let (from, n) = loop {
        let at = src.offset.get();
        // As if `want` bytes were read now: the file only grows under us, so bytes read a
        // moment ago in this turn are the bytes a read now would give (a cut by copytruncate
        // in between is found like one after a single read).
        let (from, n) = match ahead.covers(at, want) {
            Some(from) => (from, want),
            None => {
                // Also what the rest of the turn will want, so its steps need no read.
                let len = want.max(limit.saturating_add(TURN_SLACK)).min(buf.len());
                let got = match src.file.read_at(&mut buf[..len], at) {
                    Ok(got) => got,
                    Err(e) => {
                        *ahead = Ahead::default();
                        warn!(file = %src.path.display(), error = %OneLine(&e), "read failed; retrying");
                        return Step::Wait;
                    }
                };
                *ahead = Ahead {
                    offset: at,
                    len: got,
                };
                (0, got.min(want))
            }
        };
        if n == 0 {
            break (from, n);
        }
        let input = &buf[from..from + n];
        // Decoded straight into the spool's tail: the only copy of the text.
        let mut used = {
            let mut tail = writer.tail();
            reserve_tail(&mut tail, n, block);
            dec.decode(
                &mut src.decode,
                lines,
                input,
                Tail::Growing,
                &mut tail,
                stats,
            )
        };
        if used == 0 && n == want {
            if want < room {
                // The record is longer than the read budget left: what the buffer holds past
                // the budget first (the turn's read took the slack for it), then read up to
                // the block.
                let held = ahead.held_from(at);
                want = if held > want {
                    held.min(room)
                } else {
                    (want * 2).max(MIN_READ).min(room)
                };
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
            used = dec.decode(
                &mut src.decode,
                lines,
                input,
                Tail::Oversized,
                &mut writer.tail(),
                stats,
            );
        }
        if used > 0 {
            src.offset += used as u64;
            return Step::Read(used as u64);
        }
        break (from, n);
    };
    // At the end of the file, or only a record still being written is left.
    let md = match src.file.metadata() {
        Ok(md) => md,
        Err(_) => return Step::Wait,
    };
    if md.len() < src.offset.get() {
        m.file_truncations.fetch_add(1, Relaxed);
        warn!(file = %src.path.display(), was = src.offset.get(), now = md.len(), "log file shrank (copytruncate?); reading it again from the start");
        src.offset = SourceOffset::ZERO;
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
    if md.len() > src.offset.get() + n as u64 {
        return Step::Read(0);
    }
    if n > 0 {
        // The file will not grow: its unterminated last record is final.
        let input = &buf[from..from + n];
        let used = dec.decode(
            &mut src.decode,
            lines,
            input,
            Tail::Final,
            &mut writer.tail(),
            stats,
        );
        src.offset += used as u64;
        return Step::Read(used as u64);
    }
    let mut appended = 0;
    if let Some(c) = src.decode.continuing.take()
        && c.ends_line
    {
        writer.tail().push(b'\n');
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
    debug!(file = %src.path.display(), bytes = src.offset.get(), "log file drained; closed");
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
