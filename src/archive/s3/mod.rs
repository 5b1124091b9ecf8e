//! The S3 archive target: the log at `{prefix}/{taskId}/log`, plain text, exactly where and
//! how Druid's `S3TaskLogs` reads it.
//!
//! A log is stored while its task runs, as parts of a multipart upload cut from committed
//! spool bytes, so a task's end costs one last part. The object only appears when the upload
//! is completed, so S3 never shows half a log. Every step is recorded in the checkpoint by the
//! ingest thread ([`UploadState`]): after a crash the upload resumes (parts re-sent under their
//! number replace themselves), and a completion that may have happened is checked with a
//! HEAD before anything is repeated.
//!
//! The modules, each depending only on those listed before it:
//! - `keys`: the object key, content type and metadata, as Druid reads them.
//! - `config`: [`S3Config`], checked by [`S3Config::validate`].
//! - `error`: [`S3Error`], and which failures are permanent or lose the upload.
//! - `body`: request bodies streamed from the spool.
//! - `client`: the SDK client as the settings make it, and one attempt's shared context.
//! - `parts`: parts cut from committed spool bytes while the task runs.
//! - `complete`: resume and verified completion at the task's end.
//!
//! This file only ties them to a [`Job`] and its [`Outcome`].

mod body;
mod client;
mod complete;
mod config;
mod error;
mod keys;
mod parts;

use tracing::warn;

use crate::archive::job::{Job, JobKind, Outcome};
use crate::archive::upload::UploadState;
use crate::spool::{LogOffset, SpoolFileOffset};

pub use crate::archive::upload::{MAX_OBJECT, MAX_PART, MIN_PART, PartNumber, PartSizes};
pub use body::BodyError;
pub use config::{S3Config, S3ConfigError};
pub use error::S3Error;

use client::Attempt;
pub use client::Bucket;
use complete::finish;
use parts::store_parts;

/// The S3 target: a client for the configured bucket, and the part sizes it cuts.
pub struct S3Target {
    bucket: Bucket,
    sizes: PartSizes,
}

impl S3Target {
    /// Builds the client from the standard AWS chain (environment, profile, web identity for
    /// IRSA, container and instance metadata) plus the settings here.
    pub async fn new(cfg: S3Config) -> S3Target {
        Self::build(cfg, None).await
    }

    /// With fixed credentials instead of the chain: for tests against a local S3 server, which
    /// must never go looking for instance metadata.
    pub async fn with_credentials(
        cfg: S3Config,
        creds: aws_sdk_s3::config::Credentials,
    ) -> S3Target {
        Self::build(cfg, Some(creds)).await
    }

    async fn build(cfg: S3Config, creds: Option<aws_sdk_s3::config::Credentials>) -> S3Target {
        let sizes = PartSizes::new(cfg.part_bytes);
        S3Target {
            bucket: Bucket::connect(cfg, creds).await,
            sizes,
        }
    }

    /// Cuts parts by `sizes` instead of the agent's schedule: for tests of growing parts
    /// through a real S3 (see [`PartSizes::growing`]).
    pub fn with_part_sizes(mut self, sizes: PartSizes) -> S3Target {
        self.sizes = sizes;
        self
    }

    /// The settings this target was made from.
    pub fn config(&self) -> &S3Config {
        &self.bucket.cfg
    }

    /// Does one job and answers with its outcome: S3 errors become [`Outcome::Failed`] with the
    /// parts already stored kept, and an upload S3 no longer knows is started over.
    pub async fn run(&self, job: Job) -> Outcome {
        let key = self.bucket.cfg.key(&job.task);
        let mut state = job.state.clone();
        // The uploaded stream is the text, or for gzip output the spool file.
        let pick = |text: LogOffset, file: SpoolFileOffset| {
            if self.bucket.cfg.gzip {
                file.get()
            } else {
                text.get()
            }
        };
        let at = Attempt {
            bucket: &self.bucket,
            sizes: self.sizes,
            job: &job,
            key: &key,
        };
        let result = match job.kind {
            JobKind::Parts {
                committed,
                committed_file,
            } => store_parts(&at, &mut state, pick(committed, committed_file), false)
                .await
                .map(|()| None),
            JobKind::Finish { len, file_len } => {
                finish(&at, &mut state, pick(len, file_len), len.get())
                    .await
                    .map(Some)
            }
        };
        match result {
            Ok(None) => Outcome::Progress {
                pod_dir: job.pod_dir,
                state,
            },
            Ok(Some(location)) => Outcome::Done {
                pod_dir: job.pod_dir,
                task: job.task,
                len: match job.kind {
                    JobKind::Finish { len, .. } => len,
                    JobKind::Parts { committed, .. } => committed,
                },
                location,
            },
            Err(f) => {
                if f.upload_gone() {
                    warn!(key = %key, "the multipart upload is gone (aborted or expired); starting a new one");
                    state = UploadState::default();
                }
                Outcome::Failed {
                    pod_dir: job.pod_dir,
                    task: job.task,
                    permanent: f.is_permanent(),
                    error: f.to_string(),
                    state,
                }
            }
        }
    }
}
