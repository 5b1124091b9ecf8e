//! Where a task's log goes: the archive worker and its targets.
//!
//! The ingest thread decides *what* to archive and *when* (only committed spool bytes, only a
//! committed end) and sends [`Job`]s; the worker, on the async runtime, does the I/O and sends
//! back [`Outcome`]s, which ingest records in the checkpoint. The worker keeps no state of its
//! own between jobs: everything it needs to resume is in the job, so a restart resumes from the
//! checkpoint alone.
//!
//! The modules depend downwards only, and this file defines nothing (it re-exports), so no
//! module imports from one that imports it back:
//! - [`upload`]: upload progress and S3's part limits; depends on nothing in `archive`.
//! - [`job`]: the job/outcome vocabulary; depends on `upload`.
//! - [`append`]: a directory archive written as the task runs; depends on nothing in `archive`.
//! - [`dir`] and [`s3`]: the targets; depend on `job` and `upload` (`dir` also on `append`).
//! - [`target`]: the two targets as one; depends on `dir`, `s3`, `job`, `upload`.
//! - [`worker`]: runs jobs on a target; depends on `target` and `job`.

pub mod append;
pub mod dir;
pub mod job;
pub mod s3;
pub mod target;
pub mod upload;
pub mod worker;

pub use dir::{DirArchive, DirError};
pub use job::{Job, JobKind, Origin, Outcome, placeholder};
pub use target::Target;
pub use upload::{Part, PartNumber, PartSizes, UploadState};
pub use worker::run_worker;
