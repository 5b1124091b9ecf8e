//! The archive destinations the agent knows, behind one type the worker runs jobs on.
//!
//! An enum rather than a trait: the set is closed (a directory, S3) and chosen once at
//! startup, the worker shares one target across its spawned jobs, and `async fn` in a trait
//! cannot be called through `dyn` without boxing every future (or the `async-trait` crate),
//! while a generic worker would make [`crate::app`] generic over the target for no gain. The
//! match below is the whole cost of the enum.

use crate::archive::dir::DirArchive;
use crate::archive::job::{Job, Outcome};
use crate::archive::s3::S3Target;

/// Where archives go.
pub enum Target {
    /// A directory: Druid reads it with `FileTaskLogs` (usually a shared volume).
    Dir(DirArchive),
    /// S3 or an S3-compatible store, in parts while the task runs.
    S3(S3Target),
}

impl Target {
    /// Does one job; every failure is an [`Outcome::Failed`], so every job is answered.
    pub async fn run(&self, job: Job) -> Outcome {
        match self {
            Target::Dir(d) => d.run(job).await,
            Target::S3(s) => s.run(job).await,
        }
    }
}
