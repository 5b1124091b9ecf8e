//! The archive worker: runs [`Job`]s on the async runtime, a few at once, and answers each
//! with an [`Outcome`].
//!
//! Its life is the job channel's: it takes jobs until the channel closes, then finishes the
//! ones it started and returns. That is how it drains at shutdown (see [`run_worker`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::{Semaphore, mpsc};

use crate::archive::job::{Job, Outcome};
use crate::archive::target::Target;

/// Runs jobs, up to `parallel` at once, until the job channel closes, then waits for the jobs
/// it started and returns: every started job is answered through `report` before the future
/// completes. After `stop` is set, jobs taken from the channel are not started but answered
/// with [`Outcome::Skipped`] (the next agent redoes them from the checkpoint).
///
/// To drain it: set `stop`, drop the job sender, and await the spawned task (bounded by a
/// timeout if the grace period is; aborting it after that loses nothing the checkpoint has).
pub async fn run_worker(
    target: Arc<Target>,
    mut jobs: mpsc::UnboundedReceiver<Job>,
    parallel: usize,
    stop: Arc<AtomicBool>,
    report: impl Fn(Outcome) + Send + Sync + 'static,
) {
    let report = Arc::new(report);
    let slots = Arc::new(Semaphore::new(parallel.max(1)));
    let mut running = Vec::new();
    while let Some(job) = jobs.recv().await {
        if stop.load(Ordering::Relaxed) {
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
