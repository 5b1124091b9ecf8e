//! The S3 archive target: the log at `{prefix}/{taskId}/log`, plain text, exactly where and
//! how Druid's `S3TaskLogs` reads it.
//!
//! A log is stored while its task runs, as parts of a multipart upload cut from committed
//! spool bytes, so a task's end costs one last part. The object only appears when the upload
//! is completed, so S3 never shows half a log. Every step is recorded in the checkpoint by the
//! ingest thread ([`UploadState`]): after a crash the upload resumes (parts re-sent under their
//! number replace themselves), and a completion that may have happened is checked with a
//! HEAD before anything is repeated.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use aws_sdk_s3::Client;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::{ByteStream, SdkBody};
use aws_sdk_s3::types::{
    CompletedMultipartUpload, CompletedPart, ObjectCannedAcl, ServerSideEncryption,
};
use bytes::Bytes;
use http_body::Frame;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::archive::{Job, JobKind, Origin, Outcome, Part, UploadState, placeholder};
use crate::spool::Spool;
use crate::task::TaskId;

/// S3 refuses parts under 5 MiB (MiB, not MB), except the last.
pub const MIN_PART: u64 = 5 * 1024 * 1024;
/// S3's largest part: 5 GiB.
pub const MAX_PART: u64 = 5 << 30;
/// S3's largest object: 5 TiB. The part sizes must let a log of this size fit in
/// [`PartNumber::MAX`] parts.
pub const MAX_OBJECT: u64 = 5 << 40;

/// A multipart part number. S3 numbers parts 1 to 10,000 and refuses any other, so a number
/// outside that range cannot be made, and one past the last is a clear error rather than a
/// request S3 refuses on every retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct PartNumber(u16);

impl PartNumber {
    /// The number of an upload's first part.
    pub const FIRST: PartNumber = PartNumber(1);
    /// The highest number S3 accepts; the part sizes must let any log fit (see [`MAX_OBJECT`]).
    pub const MAX: PartNumber = PartNumber(10_000);

    /// `n` if S3 accepts it as a part number.
    pub fn new(n: u32) -> Option<PartNumber> {
        u16::try_from(n)
            .ok()
            .filter(|n| (Self::FIRST.0..=Self::MAX.0).contains(n))
            .map(PartNumber)
    }

    /// The number after this one; `None` after the last S3 accepts.
    pub fn next(self) -> Option<PartNumber> {
        Self::new(u32::from(self.0) + 1)
    }

    /// The number as S3 spells it in requests and responses.
    pub fn get(self) -> u16 {
        self.0
    }

    /// As the SDK takes it.
    fn sdk(self) -> i32 {
        i32::from(self.0)
    }
}

impl TryFrom<u32> for PartNumber {
    type Error = String;

    fn try_from(n: u32) -> Result<Self, Self::Error> {
        PartNumber::new(n).ok_or_else(|| format!("part number {n} is not within 1 to 10000"))
    }
}

impl From<PartNumber> for u32 {
    fn from(n: PartNumber) -> u32 {
        u32::from(n.0)
    }
}

impl std::fmt::Display for PartNumber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// How big each part of a multipart upload is, by part number. A fixed size would cap a log at
/// 10,000 parts (78 GiB with 8 MiB parts); a size that grows with the log keeps small logs in
/// small parts (little to resend after a failure, little waiting on the node) and lets any log
/// up to S3's 5 TiB object limit fit. The size depends on the part number alone, so an upload
/// resumed after a crash cuts the same parts as the one before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartSizes {
    /// The size of the first parts (`part_bytes`).
    base: u64,
    /// Parts of the base size before the first doubling.
    flat: u32,
    /// Parts between two doublings.
    double_every: u32,
}

impl PartSizes {
    /// `base` for parts 1 to 1,000, then twice as much every 500 parts, up to 5 GiB. From
    /// the smallest base (5 MiB) 10,000 parts hold about 24 TiB, well over S3's 5 TiB; logs
    /// under 1,000 base parts (7.8 GiB at the default 8 MiB) never see the growth.
    pub fn new(base: u64) -> PartSizes {
        Self::growing(base, 1_000, 500)
    }

    /// A schedule that grows sooner: `base` for `flat` parts, then doubling every
    /// `double_every` parts. For tests through a real S3, where an upload of 1,000 parts is
    /// too big; the agent itself uses [`PartSizes::new`].
    pub fn growing(base: u64, flat: u32, double_every: u32) -> PartSizes {
        PartSizes {
            base,
            flat,
            double_every: double_every.max(1),
        }
    }

    /// The size of part `n` (the last part of an upload may be shorter).
    pub fn size(&self, n: PartNumber) -> u64 {
        let n = u32::from(n);
        let doublings = n.saturating_sub(self.flat).div_ceil(self.double_every);
        let factor = 1u64.checked_shl(doublings).unwrap_or(u64::MAX);
        self.base.saturating_mul(factor).min(MAX_PART)
    }

    /// Where the next whole part of `upload` ends in the uploaded stream: ingest asks for
    /// parts once this many committed bytes exist. `None` once all 10,000 parts are stored.
    pub fn next_part_end(&self, upload: &UploadState) -> Option<u64> {
        let n = upload.next_part_number()?;
        Some(upload.uploaded().saturating_add(self.size(n)))
    }

    /// The longest log one upload of these sizes holds: the sum over all 10,000 parts.
    pub fn capacity(&self) -> u64 {
        let mut n = Some(PartNumber::FIRST);
        let mut sum = 0u64;
        while let Some(p) = n {
            sum = sum.saturating_add(self.size(p));
            n = p.next();
        }
        sum
    }
}
const CONTENT_TYPE: &str = "text/plain; charset=utf-8";
const GZIP_TYPE: &str = "application/gzip";

/// `[archive] type = "s3"` settings; also the `--s3-*` flags and `DLA_S3_*` variables (see
/// [`crate::config`]). Every key has a default (the bucket's, empty, is refused by
/// [`S3Config::validate`]), so a file may leave the bucket to `DLA_S3_BUCKET`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct S3Config {
    /// Archive to this S3 bucket instead of a directory (Druid's S3TaskLogs layout,
    /// s3://{bucket}/{prefix}/{taskId}/log; druid.indexer.logs.s3Bucket). As a flag or
    /// variable it replaces only the bucket of the config file's S3 section.
    #[arg(long = "s3-bucket")]
    pub bucket: String,
    /// Druid's druid.indexer.logs.s3Prefix; the key is {prefix}/{taskId}/log, exactly as
    /// Druid builds it.
    #[arg(long = "s3-prefix")]
    pub prefix: String,
    /// AWS region; unset: from the AWS chain (AWS_REGION, profile), else us-east-1.
    #[arg(long = "s3-region")]
    pub region: Option<String>,
    /// An S3-compatible endpoint URL, e.g. http://minio:9000; unset: AWS.
    #[arg(long = "s3-endpoint")]
    pub endpoint: Option<String>,
    /// Path-style addressing (endpoint/bucket/key), which most S3-compatible stores need.
    #[arg(long = "s3-path-style", action = clap::ArgAction::Set)]
    pub path_style: bool,
    /// Server-side encryption: AES256 (SSE-S3) or aws:kms (SSE-KMS); unset: none requested.
    #[arg(long = "s3-sse")]
    pub sse: Option<String>,
    /// KMS key id for aws:kms; unset: the bucket's default key.
    #[arg(long = "s3-sse-kms-key-id")]
    pub sse_kms_key_id: Option<String>,
    /// Do not send the bucket-owner-full-control ACL (Druid's disableAcl).
    #[arg(long = "s3-disable-acl", action = clap::ArgAction::Set)]
    pub disable_acl: bool,
    /// Size of the parts stored while a task runs, 5MiB to 5GiB: of the first 1,000; later
    /// parts double every 500 parts up to 5GiB, so a log up to S3's 5TiB fits.
    #[arg(long = "s3-part-bytes", value_name = "SIZE", value_parser = crate::units::parse_size::<u64>)]
    #[serde(with = "crate::units::size")]
    pub part_bytes: u64,
    /// Store logs gzip-compressed at {prefix}/{taskId}/log.gz (Content-Type:
    /// application/gzip, no Content-Encoding) for consumers other than Druid, which reads only
    /// the plain log.
    #[arg(long = "s3-gzip", action = clap::ArgAction::Set)]
    pub gzip: bool,
}

fn default_part_bytes() -> u64 {
    8 << 20
}

/// What an S3 archive set up by flags alone starts from; the defaults `--help` shows.
impl Default for S3Config {
    fn default() -> Self {
        S3Config {
            bucket: String::new(),
            prefix: "druid/indexing-logs".into(),
            region: None,
            endpoint: None,
            path_style: false,
            sse: None,
            sse_kms_key_id: None,
            disable_acl: false,
            part_bytes: default_part_bytes(),
            gzip: false,
        }
    }
}

impl S3Config {
    /// Object key of `task`'s log: `{prefix}/{taskId}/log`, where Druid's `S3TaskLogs` looks
    /// (`log.gz` with `gzip`).
    pub fn key(&self, task: &TaskId) -> String {
        let name = if self.gzip { "log.gz" } else { "log" };
        format!("{}/{}/{name}", self.prefix, task)
    }

    fn content_type(&self) -> &'static str {
        if self.gzip { GZIP_TYPE } else { CONTENT_TYPE }
    }

    /// Refuses settings S3 would refuse on every request, or that would be dropped unused.
    pub fn validate(&self) -> Result<(), String> {
        if self.bucket.is_empty() {
            return Err(
                "archive.bucket must be set (in the config file, or by --s3-bucket or DLA_S3_BUCKET)"
                    .into(),
            );
        }
        if !(MIN_PART..=MAX_PART).contains(&self.part_bytes) {
            return Err(format!(
                "archive.part_bytes must be between {MIN_PART} (5 MiB) and {MAX_PART} (5 GiB): S3 rejects other parts"
            ));
        }
        if let Some(ep) = &self.endpoint {
            let uri: Result<axum::http::Uri, _> = ep.parse();
            let ok = uri.is_ok_and(|u| {
                matches!(u.scheme_str(), Some("http" | "https")) && u.authority().is_some()
            });
            if !ok {
                return Err(format!(
                    "archive.endpoint {ep:?} must be an http:// or https:// URL such as http://minio:9000"
                ));
            }
        }
        match self.sse.as_deref() {
            None | Some("AES256") | Some("aws:kms") => {}
            Some(other) => {
                return Err(format!(
                    "archive.sse must be \"AES256\" or \"aws:kms\", not {other:?}"
                ));
            }
        }
        if self.sse_kms_key_id.is_some() && self.sse.as_deref() != Some("aws:kms") {
            return Err(
                "archive.sse_kms_key_id is used only with sse = \"aws:kms\": set sse too, or unset it"
                    .into(),
            );
        }
        Ok(())
    }
}

/// A client and its settings.
pub struct S3Target {
    cfg: S3Config,
    sizes: PartSizes,
    client: Client,
}

/// What HeadObject says of a completion that may have happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Completion {
    /// The object is there with the log's length.
    Complete,
    /// No object, or an older one (an earlier, shorter archive of the task).
    NotComplete,
    /// 403: without `s3:ListBucket` S3 answers a missing key with 403 rather than 404 (and
    /// without `s3:GetObject` an existing one too). Asking again changes nothing: the agent
    /// must go on without the answer.
    CannotTell,
}

/// What went wrong, and whether retrying soon can help.
struct Failure {
    message: String,
    permanent: bool,
    /// The multipart upload no longer exists (aborted, expired by a lifecycle rule).
    upload_gone: bool,
}

fn failure<E, R>(op: &str, key: &str, e: SdkError<E, R>) -> Failure
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let code = e.code().map(str::to_owned);
    let message = match (&e, code.as_deref()) {
        (SdkError::ServiceError(_), Some(code)) => format!(
            "{op} of s3 key {key}: {code}: {}",
            e.message().unwrap_or("no message")
        ),
        _ => format!(
            "{op} of s3 key {key}: {}",
            aws_sdk_s3::error::DisplayErrorContext(&e)
        ),
    };
    let permanent = matches!(
        code.as_deref(),
        Some(
            "AccessDenied"
                | "NoSuchBucket"
                | "InvalidAccessKeyId"
                | "SignatureDoesNotMatch"
                | "InvalidBucketName"
                | "AllAccessDisabled"
                | "KMS.NotFoundException"
                | "KMS.DisabledException"
        )
    );
    Failure {
        message,
        permanent,
        upload_gone: code.as_deref() == Some("NoSuchUpload"),
    }
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
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
        if let Some(c) = creds {
            loader = loader.credentials_provider(c);
        }
        if let Some(r) = &cfg.region {
            loader = loader.region(aws_config::Region::new(r.clone()));
        }
        let shared = loader.load().await;
        let mut b = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(cfg.path_style)
            // Checksums only where S3 requires them: S3-compatible stores differ in what
            // they accept, and parts are small enough that TCP and TLS integrity suffice.
            .request_checksum_calculation(
                aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired,
            )
            .response_checksum_validation(
                aws_sdk_s3::config::ResponseChecksumValidation::WhenRequired,
            );
        if shared.region().is_none() {
            b = b.region(aws_config::Region::new("us-east-1"));
        }
        if let Some(ep) = &cfg.endpoint {
            b = b.endpoint_url(ep.clone());
        }
        S3Target {
            client: Client::from_conf(b.build()),
            sizes: PartSizes::new(cfg.part_bytes),
            cfg,
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
        &self.cfg
    }

    /// The part sizes this target cuts.
    pub fn part_sizes(&self) -> PartSizes {
        self.sizes
    }

    /// Does one job and answers with its outcome: S3 errors become [`Outcome::Failed`] with the
    /// parts already stored kept, and an upload S3 no longer knows is started over.
    pub async fn run(&self, job: Job) -> Outcome {
        let key = self.cfg.key(&job.task);
        let mut state = job.state.clone();
        // The uploaded stream is the text, or for gzip output the spool file.
        let pick = |text: u64, file: u64| if self.cfg.gzip { file } else { text };
        let result = match job.kind {
            JobKind::Parts {
                committed,
                committed_file,
            } => self
                .store_parts(
                    &job,
                    &key,
                    &mut state,
                    pick(committed, committed_file),
                    false,
                )
                .await
                .map(|()| None),
            JobKind::Finish { len, file_len } => self
                .finish(&job, &key, &mut state, pick(len, file_len), len)
                .await
                .map(Some),
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
                if f.upload_gone {
                    warn!(key = %key, "the multipart upload is gone (aborted or expired); starting a new one");
                    state = UploadState::default();
                }
                Outcome::Failed {
                    pod_dir: job.pod_dir,
                    task: job.task,
                    error: f.message,
                    permanent: f.permanent,
                    state,
                }
            }
        }
    }

    fn metadata(&self, task: &TaskId, origin: &Origin, len: u64) -> HashMap<String, String> {
        let mut m = HashMap::new();
        m.insert("task-id".into(), task.to_string());
        m.insert("namespace".into(), origin.namespace.clone());
        m.insert("pod".into(), origin.pod.clone());
        m.insert("pod-uid".into(), origin.pod_uid.clone());
        if let Some(n) = &origin.node {
            m.insert("node".into(), n.clone());
        }
        m.insert("first-seen-ms".into(), origin.first_seen_ms.to_string());
        m.insert("bytes".into(), len.to_string());
        m.insert(
            "agent".into(),
            format!("druid-log-agent/{}", env!("CARGO_PKG_VERSION")),
        );
        // Non-ASCII would not survive as an HTTP header; Kubernetes names are ASCII anyway.
        m.retain(|_, v| v.is_ascii());
        m
    }

    /// Stores whole parts of the first `upto` bytes; with `last`, everything up to `upto`.
    async fn store_parts(
        &self,
        job: &Job,
        key: &str,
        state: &mut UploadState,
        upto: u64,
        last: bool,
    ) -> Result<(), Failure> {
        loop {
            let from = state.uploaded();
            if from >= upto {
                return Ok(());
            }
            let Some(number) = state.next_part_number() else {
                return Err(Failure {
                    message: format!(
                        "UploadPart of s3 key {key}: the log is longer than 10000 parts of these sizes hold ({} bytes); S3 takes no more parts",
                        self.sizes.capacity()
                    ),
                    permanent: true,
                    upload_gone: false,
                });
            };
            let part = self.sizes.size(number);
            let to = if from + part <= upto {
                from + part
            } else if last {
                upto
            } else {
                return Ok(());
            };
            let upload_id = match &state.upload_id {
                Some(id) => id.clone(),
                None => {
                    let id = self.create(job, key).await?;
                    state.upload_id = Some(id.clone());
                    id
                }
            };
            let out = self
                .client
                .upload_part()
                .bucket(&self.cfg.bucket)
                .key(key)
                .upload_id(&upload_id)
                .part_number(number.sdk())
                .content_length((to - from) as i64)
                .body(self.body(&job.spool, from, to))
                .send()
                .await
                .map_err(|e| failure("UploadPart", key, e))?;
            let etag = out.e_tag().unwrap_or_default().to_owned();
            info!(key, part = %number, bytes = to - from, "part stored");
            state.parts.push(Part {
                number,
                etag,
                end: to,
            });
        }
    }

    async fn create(&self, job: &Job, key: &str) -> Result<String, Failure> {
        let mut req = self
            .client
            .create_multipart_upload()
            .bucket(&self.cfg.bucket)
            .key(key)
            .content_type(self.cfg.content_type())
            .set_metadata(Some(self.metadata(&job.task, &job.origin, 0)));
        let (acl, sse, kms) = self.put_options();
        req = req
            .set_acl(acl)
            .set_server_side_encryption(sse)
            .set_ssekms_key_id(kms);
        let out = req
            .send()
            .await
            .map_err(|e| failure("CreateMultipartUpload", key, e))?;
        let id = out.upload_id().unwrap_or_default().to_owned();
        info!(key, upload_id = %id, "multipart upload started");
        Ok(id)
    }

    /// The ACL and encryption settings every new object gets: `(acl, sse, kms key id)`.
    fn put_options(
        &self,
    ) -> (
        Option<ObjectCannedAcl>,
        Option<ServerSideEncryption>,
        Option<String>,
    ) {
        let acl = (!self.cfg.disable_acl).then_some(ObjectCannedAcl::BucketOwnerFullControl);
        let sse = self.cfg.sse.as_deref().map(ServerSideEncryption::from);
        let kms = sse.as_ref().and(self.cfg.sse_kms_key_id.clone());
        (acl, sse, kms)
    }

    /// Makes the complete log visible at `key`: `len` bytes of the uploaded stream,
    /// `text_len` bytes of text.
    async fn finish(
        &self,
        job: &Job,
        key: &str,
        state: &mut UploadState,
        len: u64,
        text_len: u64,
    ) -> Result<String, Failure> {
        let location = format!("s3://{}/{}", self.cfg.bucket, key);
        if state.completing {
            match self.completion(key, len).await? {
                Completion::Complete => {
                    info!(key, "found the upload completed before a restart");
                    return Ok(location);
                }
                Completion::NotComplete => {}
                // Completing an upload that still exists is safe; if it is gone, the
                // reconciliation below finds out and stores the log again.
                Completion::CannotTell => warn!(
                    key,
                    "cannot tell whether the upload was completed before a restart \
                     (HeadObject answers 403: does the policy lack s3:ListBucket?); completing it"
                ),
            }
        }
        if let Some(id) = state.upload_id.clone() {
            match self.reconcile(key, &id, state).await {
                Ok(()) => {}
                Err(f) if f.upload_gone => match self.completion(key, len).await? {
                    // Completed before a crash that kept the news from the checkpoint.
                    Completion::Complete => {
                        info!(key, "found the upload completed before a restart");
                        return Ok(location);
                    }
                    // Aborted (a lifecycle rule), or completed with no way to know: the spool
                    // holds the whole log, and storing the same bytes at the same key again
                    // leaves the same object.
                    c @ (Completion::NotComplete | Completion::CannotTell) => {
                        warn!(
                            key,
                            head_object_forbidden = c == Completion::CannotTell,
                            "the multipart upload is gone and no complete object is known; storing the log again"
                        );
                        *state = UploadState::default();
                    }
                },
                Err(f) => return Err(f),
            }
        }
        if state.upload_id.is_none() && len <= self.sizes.size(PartNumber::FIRST) {
            self.put_whole(job, key, len, text_len).await?;
            return Ok(location);
        }
        self.store_parts(job, key, state, len, true).await?;
        let Some(id) = state.upload_id.clone() else {
            // Nothing was stored (an empty log): the placeholder, as Druid writes it.
            self.put_whole(job, key, 0, 0).await?;
            return Ok(location);
        };
        state.completing = true;
        let parts: Vec<CompletedPart> = state
            .parts
            .iter()
            .map(|p| {
                CompletedPart::builder()
                    .part_number(p.number.sdk())
                    .e_tag(&p.etag)
                    .build()
            })
            .collect();
        let done = self
            .client
            .complete_multipart_upload()
            .bucket(&self.cfg.bucket)
            .key(key)
            .upload_id(&id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await;
        match done {
            Ok(_) => Ok(location),
            // The first attempt may have succeeded with its answer lost: check, don't guess.
            // Unless the object is known complete, the failure stands; an upload that is
            // gone resets the state (see `run`), so the next attempt stores the log again
            // rather than asking a question S3 will not answer.
            Err(e) => {
                let f = failure("CompleteMultipartUpload", key, e);
                if f.upload_gone && self.completion(key, len).await? == Completion::Complete {
                    return Ok(location);
                }
                Err(f)
            }
        }
    }

    /// Checks the parts S3 has against the ones recorded: the checkpoint may lag behind
    /// (a part stored just before a crash), never run ahead.
    async fn reconcile(&self, key: &str, id: &str, state: &mut UploadState) -> Result<(), Failure> {
        let out = self
            .client
            .list_parts()
            .bucket(&self.cfg.bucket)
            .key(key)
            .upload_id(id)
            .send()
            .await
            .map_err(|e| failure("ListParts", key, e))?;
        let stored: HashMap<i32, String> = out
            .parts()
            .iter()
            .filter_map(|p| Some((p.part_number()?, p.e_tag()?.to_owned())))
            .collect();
        let keep = state
            .parts
            .iter()
            .take_while(|p| stored.get(&p.number.sdk()) == Some(&p.etag))
            .count();
        if keep < state.parts.len() {
            warn!(
                key,
                recorded = state.parts.len(),
                stored = keep,
                "some recorded parts are missing in S3; re-sending them"
            );
            state.parts.truncate(keep);
        }
        Ok(())
    }

    /// Whether `key` holds the complete log of `len` bytes, as far as HeadObject can say.
    async fn completion(&self, key: &str, len: u64) -> Result<Completion, Failure> {
        match self
            .client
            .head_object()
            .bucket(&self.cfg.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(h) if h.content_length() == i64::try_from(len).ok() => Ok(Completion::Complete),
            Ok(_) => Ok(Completion::NotComplete),
            Err(SdkError::ServiceError(e)) => match e.raw().status().as_u16() {
                404 => Ok(Completion::NotComplete),
                403 => Ok(Completion::CannotTell),
                _ => Err(failure("HeadObject", key, SdkError::ServiceError(e))),
            },
            Err(e) => Err(failure("HeadObject", key, e)),
        }
    }

    async fn put_whole(
        &self,
        job: &Job,
        key: &str,
        len: u64,
        text_len: u64,
    ) -> Result<(), Failure> {
        let (body, body_len) = if len == 0 {
            let text = placeholder(&job.task).into_bytes();
            let body = if self.cfg.gzip { gzip(&text) } else { text };
            let n = body.len() as u64;
            (ByteStream::from(body), n)
        } else {
            (self.body(&job.spool, 0, len), len)
        };
        let mut req = self
            .client
            .put_object()
            .bucket(&self.cfg.bucket)
            .key(key)
            .content_type(self.cfg.content_type())
            .content_length(body_len as i64)
            .set_metadata(Some(self.metadata(&job.task, &job.origin, text_len)))
            .body(body);
        let (acl, sse, kms) = self.put_options();
        req = req
            .set_acl(acl)
            .set_server_side_encryption(sse)
            .set_ssekms_key_id(kms);
        req.send().await.map_err(|e| failure("PutObject", key, e))?;
        Ok(())
    }
}

fn gzip(text: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let _ = enc.write_all(text);
    enc.finish().unwrap_or_default()
}

impl S3Target {
    /// Bytes `[from, to)` of the uploaded stream (the text, or for gzip output the spool file
    /// itself, whose members together are one valid gzip file) as a request body read from
    /// the spool while it is sent, and read again from `from` if the SDK retries.
    fn body(&self, spool: &Arc<Spool>, from: u64, to: u64) -> ByteStream {
        let (spool, gzip) = (spool.clone(), self.cfg.gzip);
        ByteStream::new(SdkBody::retryable(move || {
            SdkBody::from_body_1_x(SpoolBody {
                spool: spool.clone(),
                gzip,
                pos: from,
                end: to,
                reading: None,
            })
        }))
    }
}

/// A piece of the uploaded stream read from the spool a chunk at a time (on the blocking
/// pool), so an upload in flight holds a chunk in memory rather than its whole part: four
/// uploads of 8 MiB parts at once would otherwise hold 32 MiB, and the allocator keeps such
/// peaks long after they are freed.
struct SpoolBody {
    spool: Arc<Spool>,
    gzip: bool,
    pos: u64,
    end: u64,
    reading: Option<tokio::task::JoinHandle<Result<Vec<u8>, String>>>,
}

/// What a [`SpoolBody`] reads at a time.
const BODY_CHUNK: u64 = 256 << 10;

impl http_body::Body for SpoolBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = &mut *self;
        if this.pos >= this.end {
            return Poll::Ready(None);
        }
        let reading = this.reading.get_or_insert_with(|| {
            let (spool, gzip, from) = (this.spool.clone(), this.gzip, this.pos);
            let to = this.end.min(from + BODY_CHUNK);
            tokio::task::spawn_blocking(move || {
                let read = if gzip {
                    spool.read_file(from, to)
                } else {
                    spool.read_to_vec(from, to)
                };
                read.map_err(|e| e.to_string())
            })
        });
        let read = std::task::ready!(Pin::new(reading).poll(cx));
        this.reading = None;
        let error = match read {
            Ok(Ok(chunk)) if !chunk.is_empty() => {
                this.pos += chunk.len() as u64;
                return Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk)))));
            }
            Ok(Ok(_)) => "the spool holds fewer bytes than its checkpoint".to_owned(),
            Ok(Err(e)) => e,
            Err(e) => e.to_string(),
        };
        Poll::Ready(Some(Err(std::io::Error::other(format!(
            "reading the spool: {error}"
        )))))
    }

    fn is_end_stream(&self) -> bool {
        self.pos >= self.end
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.end - self.pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::Part;

    const MIB: u64 = 1 << 20;

    fn all_parts() -> impl Iterator<Item = PartNumber> {
        std::iter::successors(Some(PartNumber::FIRST), |n| n.next())
    }

    /// For every base the settings allow: 10,000 parts hold S3's largest object, each part is
    /// one S3 accepts, sizes never shrink, and the first 1,000 are the base size.
    #[test]
    fn part_sizes_fit_the_largest_object_within_s3_limits() {
        assert_eq!(all_parts().count(), 10_000);
        for base in [MIN_PART, 8 * MIB, 64 * MIB, 1 << 30, MAX_PART] {
            let sizes = PartSizes::new(base);
            assert!(
                sizes.capacity() >= MAX_OBJECT,
                "base {base}: {} < 5 TiB",
                sizes.capacity()
            );
            let mut previous = 0;
            for n in all_parts() {
                let size = sizes.size(n);
                assert!(
                    (MIN_PART..=MAX_PART).contains(&size),
                    "base {base}, part {n}"
                );
                assert!(size >= previous, "base {base}: part {n} shrinks");
                if n.get() <= 1_000 {
                    assert_eq!(size, base, "part {n}");
                }
                previous = size;
            }
        }
        // The growth: double at part 1001 and every 500 parts after it.
        let sizes = PartSizes::new(MIN_PART);
        let size = |n| sizes.size(PartNumber::new(n).unwrap());
        assert_eq!(size(1_001), 2 * MIN_PART);
        assert_eq!(size(1_500), 2 * MIN_PART);
        assert_eq!(size(1_501), 4 * MIN_PART);
        assert_eq!(size(10_000), MAX_PART);
    }

    /// Part numbers are 1 to 10,000, also when read back from a checkpoint.
    #[test]
    fn part_numbers_are_those_s3_accepts() {
        assert_eq!(PartNumber::new(0), None);
        assert_eq!(PartNumber::new(1), Some(PartNumber::FIRST));
        assert_eq!(PartNumber::new(10_000), Some(PartNumber::MAX));
        assert_eq!(PartNumber::new(10_001), None);
        assert_eq!(PartNumber::new(u32::MAX), None);
        assert_eq!(PartNumber::MAX.next(), None);
        let part = |n: u32| format!(r#"{{"number":{n},"etag":"e","end":1}}"#);
        assert!(serde_json::from_str::<Part>(&part(0)).is_err());
        assert!(serde_json::from_str::<Part>(&part(10_001)).is_err());
        let p: Part = serde_json::from_str(&part(10_000)).unwrap();
        assert_eq!(p.number, PartNumber::MAX);
        assert_eq!(serde_json::to_string(&p).unwrap(), part(10_000));
    }

    /// Ingest's question "is there a whole part to store?": the next part's end, by its
    /// number; none once every number is used.
    #[test]
    fn next_part_end_follows_the_schedule() {
        let sizes = PartSizes::growing(MIN_PART, 1, 1);
        let mut upload = UploadState::default();
        assert_eq!(sizes.next_part_end(&upload), Some(MIN_PART));
        upload.parts.push(Part {
            number: PartNumber::FIRST,
            etag: "e".into(),
            end: MIN_PART,
        });
        assert_eq!(sizes.next_part_end(&upload), Some(3 * MIN_PART));
        upload.parts = all_parts()
            .map(|number| Part {
                number,
                etag: "e".into(),
                end: u64::from(number.get()) * MIN_PART,
            })
            .collect();
        assert_eq!(sizes.next_part_end(&upload), None);
    }
}
