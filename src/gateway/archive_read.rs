//! The archive, read the way Druid reads it, so the gateway answers with the bytes Druid
//! would: S3 as `S3TaskLogs.streamTaskLog` (a HEAD for the length and ETag, then a GET of the
//! range from [`druid_start`] to the end with `If-Match` on that ETag, so an object replaced
//! in between is not spliced), or the directory layout as `FileTaskLogs` (`{dir}/{taskId}.log`).
//! The key comes from [`S3Config::key`], the function the agent writes with. Bodies are
//! streamed as S3 or the disk hands them over, never buffered whole.

use std::io::SeekFrom;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use axum::body::Body;
use tokio::io::AsyncSeekExt;
use tracing::warn;

use crate::archive::s3::S3Error;
use crate::archive::s3::{Bucket, S3Config};
use crate::config::ArchiveConfig;
use crate::serve::druid_start;
use crate::task::TaskId;

/// Why the archive could not say whether it has a log (the gateway goes on to the next
/// source, and counts it).
#[derive(Debug, thiserror::Error)]
pub enum ArchiveReadError {
    /// An S3 request failed other than by "no such key or bucket": the agent's one-line S3
    /// error (operation, object, code, message, request id).
    #[error(transparent)]
    S3(#[from] crate::archive::s3::S3Error),
    /// The file exists but cannot be read.
    #[error("{}: {source}", path.display())]
    File {
        /// The archive file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A log found in the archive, from the requested offset.
pub struct Found {
    /// The bytes from `druid_start(offset, len)` to the end, streamed.
    pub body: Body,
}

/// The configured archive, ready to read.
pub enum ArchiveReader {
    /// Druid's `FileTaskLogs` layout.
    Dir(PathBuf),
    /// Druid's `S3TaskLogs` layout.
    S3 {
        /// The SDK client, with the gateway's timeouts.
        client: aws_sdk_s3::Client,
        /// Bucket and prefix.
        cfg: S3Config,
        /// Set once a 403 was logged: without `s3:ListBucket` every missing key is a 403.
        forbidden_logged: AtomicBool,
    },
}

impl ArchiveReader {
    /// A reader of `cfg` whose S3 calls give up connecting after `connect` and waiting for an
    /// answer after `first_byte`; the client is the agent's ([`Bucket::connect`]: the AWS
    /// chain, endpoint, path style, region).
    pub async fn new(cfg: &ArchiveConfig, connect: Duration, first_byte: Duration) -> Self {
        match cfg {
            ArchiveConfig::Dir { dir } => ArchiveReader::Dir(dir.clone()),
            ArchiveConfig::S3(s3) => {
                let bucket = Bucket::connect(s3.clone(), None).await;
                let timeouts = aws_sdk_s3::config::timeout::TimeoutConfig::builder()
                    .connect_timeout(connect)
                    .read_timeout(first_byte)
                    .build();
                let conf = bucket
                    .client
                    .config()
                    .to_builder()
                    .timeout_config(timeouts)
                    .build();
                ArchiveReader::S3 {
                    client: aws_sdk_s3::Client::from_conf(conf),
                    cfg: s3.clone(),
                    forbidden_logged: AtomicBool::new(false),
                }
            }
        }
    }

    /// `task`'s log from Druid's `offset`, or `None` when the archive does not have it.
    pub async fn open(
        &self,
        task: &TaskId,
        offset: i64,
    ) -> Result<Option<Found>, ArchiveReadError> {
        match self {
            ArchiveReader::Dir(dir) => open_file(dir.join(format!("{task}.log")), offset).await,
            ArchiveReader::S3 {
                client,
                cfg,
                forbidden_logged,
            } => open_s3(client, cfg, forbidden_logged, task, offset).await,
        }
    }
}

async fn open_file(path: PathBuf, offset: i64) -> Result<Option<Found>, ArchiveReadError> {
    let err = |source| ArchiveReadError::File {
        path: path.clone(),
        source,
    };
    let mut file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(err(e)),
    };
    let len = file.metadata().await.map_err(err)?.len();
    let start = druid_start(offset, len);
    file.seek(SeekFrom::Start(start)).await.map_err(err)?;
    // What was there when the length was taken: a file still being written is not followed.
    let file = tokio::io::AsyncReadExt::take(file, len - start);
    Ok(Some(Found {
        body: Body::from_stream(tokio_util::io::ReaderStream::with_capacity(file, 256 << 10)),
    }))
}

/// Druid's "no log": a 404, `NoSuchKey` or `NoSuchBucket`.
fn no_log<E: ProvideErrorMetadata, R>(e: &SdkError<E, R>, status: Option<u16>) -> bool {
    status == Some(404)
        || matches!(
            e.as_service_error().and_then(|s| s.code()),
            Some("NoSuchKey" | "NoSuchBucket" | "NotFound")
        )
}

async fn open_s3(
    client: &aws_sdk_s3::Client,
    cfg: &S3Config,
    forbidden_logged: &AtomicBool,
    task: &TaskId,
    offset: i64,
) -> Result<Option<Found>, ArchiveReadError> {
    let key = cfg.key(task);
    let head = match client
        .head_object()
        .bucket(&cfg.bucket)
        .key(&key)
        .send()
        .await
    {
        Ok(h) => h,
        Err(e) => {
            let status = e.raw_response().map(|r| r.status().as_u16());
            if no_log(&e, status) {
                return Ok(None);
            }
            if status == Some(403) {
                // Without s3:ListBucket a missing key is a 403: "not archived", said once.
                if !forbidden_logged.swap(true, Ordering::Relaxed) {
                    warn!(bucket = %cfg.bucket, %key, "S3 answers 403 to HEAD: treated as not archived; grant s3:ListBucket so a missing key is a 404");
                }
                return Ok(None);
            }
            return Err(S3Error::from_sdk("HeadObject", &cfg.bucket, &key, e).into());
        }
    };
    let len = head.content_length().unwrap_or(0).max(0) as u64;
    if len == 0 {
        // The agent never archives an empty object; a range of nothing would be a 416.
        return Ok(Some(Found {
            body: Body::empty(),
        }));
    }
    let start = druid_start(offset, len);
    let get = client
        .get_object()
        .bucket(&cfg.bucket)
        .key(&key)
        .range(format!("bytes={start}-"))
        .set_if_match(head.e_tag().map(str::to_owned))
        .send()
        .await;
    let out = match get {
        Ok(o) => o,
        Err(e) => {
            let status = e.raw_response().map(|r| r.status().as_u16());
            if no_log(&e, status) {
                return Ok(None);
            }
            return Err(S3Error::from_sdk("GetObject", &cfg.bucket, &key, e).into());
        }
    };
    let stream = futures_util::stream::unfold(out.body, |mut body| async move {
        body.next().await.map(|chunk| (chunk, body))
    });
    Ok(Some(Found {
        body: Body::from_stream(stream),
    }))
}
