//! Task lifecycle over time: the periodic tick, ending, dropping and expiring tasks, archive
//! jobs and their outcomes, retry backoff, and the drain at shutdown.

use std::fs;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use tracing::{debug, error, info};

use crate::archive::{Job, JobKind, Origin, Outcome, UploadState};
use crate::checkpoint::Phase;
use crate::registry::PendingPod;
use crate::task::{Identity, PodDir};

use super::commit::{seal, snapshot};
use super::restore::aside_bytes;
use super::{Ingest, now_ms};

impl Ingest {
    /// The periodic pass: reads every task (in case an event was missed), seals tails that are
    /// old enough, ends idle tasks, retries archives and drops expired spools.
    pub fn tick(&mut self, now: Instant) {
        if self.degraded {
            self.rescan_all = true;
        }
        let names: Vec<String> = self.tasks.keys().map(|p| p.name.clone()).collect();
        for name in &names {
            self.retry_reopen(name);
            self.dirty_read.insert(name.clone());
        }
        self.process(now);
        for name in &names {
            let Some(t) = self.tasks.get_mut(name.as_str()) else {
                continue;
            };
            if t.task_id().is_none() {
                t.identity = self.identity.identify(&t.pod);
                if t.identity == Identity::Ignore {
                    self.drop_task(name);
                    continue;
                }
                // A task that ended while pending (read as its agent stopped) has a committed
                // snapshot without a name: the name goes into the next checkpoint before its
                // archive may go out (an end is archived only once saved), or a crash in between
                // could let the next agent name it otherwise (the pod gone from the cache by
                // then) and archive the log a second time.
                let id = t.task_id().map(|i| i.to_string());
                if let (Some(id), Some(s)) = (id, t.snapshot.as_mut()) {
                    s.task_id = Some(id);
                    t.unsaved = true;
                    t.snapshot_gen += 1;
                }
                self.publish(name);
                continue;
            }
            if t.tail_since
                .is_some_and(|s| now.duration_since(s) >= self.s.block_max_age)
                && seal(t, &mut self.sealer, &self.metrics)
            {
                // A slow task: no need to hold a block's worth of buffer until its next line.
                let buf = t.writer.release_tail();
                self.sealer.recycle(buf);
            }
            let idle = self
                .s
                .idle_timeout
                .is_some_and(|d| now.duration_since(t.last_growth) >= d);
            if t.phase == Phase::Running && idle && t.restoring.is_none() {
                info!(
                    pod_dir = %name,
                    "no new log lines for idle_timeout; ending the task"
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
        self.publish_pending();
    }

    /// Readers see the pods still waiting for their identity (`/tasks`).
    fn publish_pending(&self) {
        self.registry.set_pending(
            self.tasks
                .values()
                .filter(|t| t.identity == Identity::Pending)
                .map(|t| PendingPod {
                    pod: t.pod.clone(),
                    since_ms: t.first_seen_ms,
                    held_since: t.seen_at,
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

    pub(super) fn end_task(&mut self, name: &str) {
        let Some(t) = self.tasks.get_mut(name) else {
            return;
        };
        if !seal(t, &mut self.sealer, &self.metrics) {
            return; // retried on the next tick
        }
        // An ended task rarely writes again: its spool stays for readers, its buffer need not.
        let buf = t.writer.release_tail();
        self.sealer.recycle(buf);
        // The tail is empty now, so this snapshot is a valid checkpoint of the whole log.
        t.phase = Phase::Ended;
        t.ended_at = Some(Instant::now());
        t.snapshot = Some(snapshot(t));
        t.unsaved = true;
        t.snapshot_gen += 1;
        self.metrics.tasks_ended.fetch_add(1, Relaxed);
        info!(pod_dir = %name, task = t.task_id().map(tracing::field::display), bytes = t.writer.spool().len(), "task log ended");
        self.commit_now = true;
        self.publish(name);
    }

    /// Forgets a pod that turned out not to be a peon: its files are closed unread and its
    /// (empty) spool removed.
    pub(super) fn drop_task(&mut self, name: &str) {
        if let Some(t) = self.tasks.remove(name) {
            let _ = fs::remove_file(t.writer.spool().path());
            if let Some(h) = &mut self.sealer.handoff {
                h.forget(name);
            }
            self.ignored.insert(name.to_owned());
            self.checkpoint_dirty = true;
            // At once, not on the next poll, and before the line: whoever reads the line must
            // not still find the pod listed as pending in `/tasks`.
            self.publish_pending();
            info!(pod_dir = %name, "not a peon pod; its log is not read");
        }
    }

    fn collect_expired(&mut self) {
        self.collect_expired_at(self.s.retention);
    }

    /// Drops the spools of archived tasks whose pod is gone and whose archive is older than
    /// `retention`.
    pub(super) fn collect_expired_at(&mut self, retention: Duration) {
        let now = now_ms();
        let retention = retention.as_millis() as u64;
        let expired: Vec<String> = self
            .tasks
            .iter()
            .filter(|(_, t)| {
                t.dir_gone
                    && matches!(t.phase, Phase::Archived { at_ms, .. } if now.saturating_sub(at_ms) >= retention)
            })
            .map(|(p, _)| p.name.clone())
            .collect();
        if self.aside_bytes > 0 {
            self.aside_bytes =
                aside_bytes(&self.s.spool_dir, Some(Duration::from_millis(retention)));
        }
        for name in expired {
            if let Some(t) = self.tasks.remove(name.as_str()) {
                if let Some(id) = t.task_id() {
                    self.registry.remove(id, &name);
                }
                let _ = fs::remove_file(t.writer.spool().path());
                debug!(pod_dir = %name, "retention over; spool removed");
                self.checkpoint_dirty = true;
            }
        }
    }

    /// Hands work to the archive: the rest of every task whose end is committed, and, for
    /// targets that store parts while a task runs, every whole part of committed bytes. Only
    /// committed bytes may leave the node: after a crash the spool is cut back to them, and an
    /// archive must never hold bytes the spool then lacks, nor an end a crash could undo.
    pub(super) fn queue_archives(&mut self, now: Instant) {
        // Not `now`, taken before this round's reads: the caller hands the jobs to the worker
        // right after this, and the archive histogram measures from there.
        let handed = Instant::now();
        for t in self.tasks.values_mut() {
            if t.job_since.is_some() || t.archive_retry_at.is_some_and(|at| now < at) {
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
                        t.committed_file_len.get()
                    } else {
                        t.committed_len.get()
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
            t.job_since = Some(handed);
            self.jobs.push(Job {
                pod_dir: t.pod.clone(),
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
        // A directory archive takes a task's partial when its job runs: the text sealed
        // before must be on its way first.
        self.sealer.flush();
        std::mem::take(&mut self.jobs)
    }

    /// Records what the archive worker did.
    pub fn archive_finished(&mut self, o: &Outcome, now: Instant) {
        let Some(t) = self.tasks.get_mut(o.pod_dir()) else {
            return;
        };
        let since = t.job_since.take();
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
                if let Some(since) = since {
                    let took = now.saturating_duration_since(since);
                    self.metrics.archive_duration.observe(took);
                }
                info!(task = %task, location = %location, bytes = len.get(), "log archived");
                t.archive_retry_at = None;
                t.archive_failures = 0;
                t.archive_error = None;
                t.archived_to = Some(location.clone());
                // A later end (the task wrote again) starts a new archive that replaces this.
                t.upload = UploadState::default();
                if t.phase == Phase::Ended && t.writer.spool().len() == len.get() {
                    t.phase = Phase::Archived {
                        at_ms: now_ms(),
                        archived_len: *len,
                    };
                    if let Some(ended) = t.ended_at.take() {
                        let waited = now.saturating_duration_since(ended);
                        self.metrics.archive_delay.observe(waited);
                    }
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
        let name = o.pod_dir().name.clone();
        self.publish(&name);
    }

    /// Seals every tail and commits: called on SIGTERM so the next agent resumes with little to
    /// re-read. Reads what is left in open files first, for at most `read_for`.
    pub fn shutdown(&mut self, read_for: Duration) -> bool {
        // A file whose pod was deleted moments ago is still open here but gone for the next
        // agent: read everything there is (bounded) before the last checkpoint. That holds for
        // a pod not known yet (pending through an API outage) too: its log is read into its
        // spool, still pending, and the next agent archives it under its task id, or under
        // `_unmapped/` if the pod list never shows it (as a running agent does with a pod gone
        // before its metadata came, peon or not). Left unread, the log would be lost whole
        // (Druid's placeholder archived instead). A pending pod whose directory is still there
        // waits unread as always: the next agent finds its files. Checked here, not by
        // `dir_gone`: inotify events still queued are not handled any more.
        for t in self.tasks.values_mut() {
            if t.identity == Identity::Pending && !self.s.log_root.join(&t.pod.name).is_dir() {
                info!(pod_dir = %t.pod.name, "pod directory gone while its pod is not known yet; reading its open files into the spool before stopping");
                t.dir_gone = true;
                t.read_pending = true;
            }
        }
        let deadline = Instant::now() + read_for;
        let names: Vec<String> = self.tasks.keys().map(|p| p.name.clone()).collect();
        self.dirty_read.extend(names);
        while self.process(Instant::now()) && Instant::now() < deadline {}
        for t in self.tasks.values_mut() {
            seal(t, &mut self.sealer, &self.metrics);
        }
        self.sealer.flush();
        self.commit(Instant::now())
    }
}

/// Exponential backoff with jitter: 1 s doubling up to `max`; permanent errors (access denied,
/// no such bucket) start at a quarter of `max`, since a person has to act first.
///
/// Not `backon`: a retry here is a deadline the ingest thread checks (`archive_retry_at`), not
/// an async loop, so only its delay arithmetic would be used, as an iterator kept per task; and
/// its jitter adds up to the whole delay on top, past `archive_retry_max`, where this one
/// takes up to a quarter off.
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `archive_retry_max` is a cap the jitter never exceeds, and permanent errors start
    /// at a quarter of it.
    #[test]
    fn backoff_doubles_within_the_cap() {
        let max = Duration::from_secs(300);
        for permanent in [false, true] {
            for failures in 1..40 {
                let base = if permanent {
                    max / 4
                } else {
                    Duration::from_secs(1)
                };
                let want = base.saturating_mul(1 << (failures - 1).min(16)).min(max);
                let got = backoff(failures, permanent, max);
                assert!(
                    got <= want && got >= want * 3 / 4,
                    "{failures} {permanent}: {got:?}"
                );
            }
        }
    }
}
