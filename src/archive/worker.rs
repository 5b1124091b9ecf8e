//! The archive worker: runs [`Job`]s on the async runtime, a few at once, and answers each
//! with an [`Outcome`].
//!
//! Its life is the job channel's: it takes jobs until the channel closes, then finishes the
//! ones it started and returns. That is how it drains at shutdown (see [`run_worker`]).

use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc};

use crate::archive::job::{Job, Outcome};
use crate::archive::target::Target;

/// Runs jobs, up to `parallel` at once, until the job channel closes, then waits for the jobs
/// it started and returns: every started job is answered through `report` before the future
/// completes. After `stop` is cancelled, jobs taken from the channel are not started but answered
/// with [`Outcome::Skipped`] (the next agent redoes them from the checkpoint).
///
/// To drain it: cancel `stop`, drop the job sender, and await the spawned task (bounded by a
/// timeout if the grace period is; aborting it after that loses nothing the checkpoint has).
pub async fn run_worker(
    target: Arc<Target>,
    mut jobs: mpsc::UnboundedReceiver<Job>,
    parallel: usize,
    stop: tokio_util::sync::CancellationToken,
    report: impl Fn(Outcome) + Send + Sync + 'static,
) {
    let report = Arc::new(report);
    let slots = Arc::new(Semaphore::new(parallel.max(1)));
    let mut running = Vec::new();
    while let Some(job) = jobs.recv().await {
        if stop.is_cancelled() {
            report(Outcome::Skipped {
                pod_dir: job.pod_dir,
            });
            continue;
        }
        let Ok(permit) = slots.clone().acquire_owned().await else {
            break;
        };
        let (target, report) = (target.clone(), report.clone());
        running.push(tokio::spawn(async move {
            let outcome = target.run(job).await;
            drop(permit);
            report(outcome);
        }));
        running.retain(|h| !h.is_finished());
    }
    for h in running {
        let _ = h.await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::archive::dir::DirArchive;
    use crate::archive::job::{JobKind, Origin};
    use crate::spool::{Packer, SpoolWriter};
    use crate::task::TaskId;

    /// A worker on a directory, its job sender, what it reported, and a job for a 5-byte log.
    fn setup(
        dir: &std::path::Path,
        stop: &tokio_util::sync::CancellationToken,
    ) -> (
        impl Future<Output = ()>,
        mpsc::UnboundedSender<Job>,
        Arc<Mutex<Vec<Outcome>>>,
        Job,
    ) {
        let mut w =
            SpoolWriter::open(&dir.join("spool.gz"), crate::spool::SpoolFileOffset::ZERO).unwrap();
        w.append(|t| t.extend_from_slice(b"line\n"));
        w.seal(&mut Packer::new(1)).unwrap();
        let job = Job {
            pod_dir: crate::task::PodDir::parse("ns_pod_uid").unwrap(),
            task: TaskId::new("index_kafka_t").unwrap(),
            spool: w.spool().clone(),
            state: Default::default(),
            origin: Origin::default(),
            kind: JobKind::Finish {
                len: crate::spool::LogOffset::new(5),
                file_len: w.file_len(),
            },
        };
        let target = Arc::new(Target::Dir(DirArchive::new(dir.join("archive"))));
        let (tx, rx) = mpsc::unbounded_channel();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let worker = run_worker(target, rx, 2, stop.clone(), move |o| {
            sink.lock().unwrap().push(o)
        });
        (worker, tx, seen, job)
    }

    /// The drain shutdown relies on: a job taken before the channel closed is finished and
    /// answered before the worker returns. (The test runtime has one thread, so the job only
    /// runs while the worker waits for it.)
    #[tokio::test]
    async fn a_closed_channel_lets_started_jobs_finish() {
        let dir = tempfile::tempdir().unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let (worker, tx, seen, job) = setup(dir.path(), &stop);
        tx.send(job).unwrap();
        drop(tx);
        worker.await;
        let seen = seen.lock().unwrap();
        assert!(
            matches!(seen.as_slice(), [Outcome::Done { len, .. }] if len.get() == 5),
            "{seen:?}"
        );
        let log = std::fs::read(dir.path().join("archive/index_kafka_t.log")).unwrap();
        assert_eq!(log, b"line\n");
    }

    /// Once stopping, a job is answered without being started: ingest must not wait for it.
    #[tokio::test]
    async fn after_stop_jobs_are_skipped_unstarted() {
        let dir = tempfile::tempdir().unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        stop.cancel();
        let (worker, tx, seen, job) = setup(dir.path(), &stop);
        tx.send(job).unwrap();
        drop(tx);
        worker.await;
        let seen = seen.lock().unwrap();
        assert!(
            matches!(seen.as_slice(), [Outcome::Skipped { pod_dir }] if pod_dir.name == "ns_pod_uid"),
            "{seen:?}"
        );
        assert!(!dir.path().join("archive").exists());
    }
}
