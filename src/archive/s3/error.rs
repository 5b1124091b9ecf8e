//! What a failed S3 request means for the archive: its message (naming the request and the
//! key), whether retrying soon can help, and whether the multipart upload is gone.
//!
//! The classification decides the retry schedule and whether an upload is started over, so
//! it is written once, here, from the error code S3 answered with.

use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};

/// Error codes after which a retry soon is pointless: the caller's permissions, credentials,
/// bucket or KMS key must change first.
const PERMANENT: &[&str] = &[
    "AccessDenied",
    "NoSuchBucket",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidBucketName",
    "AllAccessDisabled",
    "KMS.NotFoundException",
    "KMS.DisabledException",
];

/// The code S3 answers with when the multipart upload no longer exists (aborted, or expired
/// by a lifecycle rule).
const UPLOAD_GONE: &str = "NoSuchUpload";

/// Why an S3 archive attempt failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum S3Error {
    /// S3 answered with an error code.
    #[error("{op} of s3 key {key}: {code}: {message}")]
    Refused {
        /// The request, as the S3 API names it ("UploadPart", ...).
        op: &'static str,
        /// The object key.
        key: String,
        /// S3's error code ("AccessDenied", "NoSuchUpload", ...): it decides the retry.
        code: String,
        /// S3's message ("no message" if it gave none).
        message: String,
    },
    /// No answer with a code: the connection, a timeout, an answer that could not be read.
    /// Always worth retrying.
    #[error("{op} of s3 key {key}: {detail}")]
    Failed {
        /// The request, as the S3 API names it.
        op: &'static str,
        /// The object key.
        key: String,
        /// The SDK's error with its causes, as one line.
        detail: String,
    },
    /// Every part number is used and the log goes on: S3 would refuse any further part.
    #[error(
        "UploadPart of s3 key {key}: the log is longer than 10000 parts of these sizes hold ({capacity} bytes); S3 takes no more parts"
    )]
    PartsExhausted {
        /// The object key.
        key: String,
        /// What 10,000 parts of the target's sizes hold.
        capacity: u64,
    },
}

impl S3Error {
    /// `op` on `key` failed with `e`.
    pub fn from_sdk<E, R>(op: &'static str, key: &str, e: SdkError<E, R>) -> S3Error
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug,
    {
        // Only a service error has a code (the SDK's other errors have empty metadata).
        match (&e, e.code()) {
            (SdkError::ServiceError(_), Some(code)) => S3Error::Refused {
                op,
                key: key.to_owned(),
                code: code.to_owned(),
                message: e.message().unwrap_or("no message").to_owned(),
            },
            _ => S3Error::Failed {
                op,
                key: key.to_owned(),
                detail: aws_sdk_s3::error::DisplayErrorContext(&e).to_string(),
            },
        }
    }

    /// Whether retrying soon is pointless; the retry then waits longer.
    pub fn is_permanent(&self) -> bool {
        match self {
            S3Error::Refused { code, .. } => PERMANENT.contains(&code.as_str()),
            S3Error::Failed { .. } => false,
            S3Error::PartsExhausted { .. } => true,
        }
    }

    /// Whether the multipart upload no longer exists, so that it must be started over.
    pub fn upload_gone(&self) -> bool {
        matches!(self, S3Error::Refused { code, .. } if code == UPLOAD_GONE)
    }
}
