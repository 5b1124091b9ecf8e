//! What a failed S3 request means for the archive: its message (naming the request and the
//! key), whether retrying soon can help, and whether the multipart upload is gone.
//!
//! The classification decides the retry schedule and whether an upload is started over, so
//! it is written once, here, from the error code S3 answered with.

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::operation::RequestId;

use crate::oneline::OneLine;

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

/// Why an S3 archive attempt failed. Each message is one line that names the request, the
/// object as an `s3://` URL, what S3 said (its code and message) or why no answer came (the
/// causes, never the SDK's `Debug`), and S3's request id when there is one, which AWS support
/// asks for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum S3Error {
    /// S3 answered with an error code.
    #[error("{op} s3://{bucket}/{key}: {code}{}{}", message_note(.message), request_id_note(.request_id))]
    Refused {
        /// The request, as the S3 API names it ("UploadPart", ...).
        op: &'static str,
        /// The bucket.
        bucket: String,
        /// The object key.
        key: String,
        /// S3's error code ("AccessDenied", "NoSuchUpload", ...): it decides the retry.
        code: String,
        /// S3's message, if it gave one (S3 does; some compatible stores leave it empty).
        message: Option<String>,
        /// S3's request id (`x-amz-request-id`), if the answer had one.
        request_id: Option<String>,
    },
    /// No answer with a code: the connection, a timeout, an answer that could not be read.
    /// Always worth retrying.
    #[error("{op} s3://{bucket}/{key}: {cause}{}", request_id_note(.request_id))]
    Failed {
        /// The request, as the S3 API names it.
        op: &'static str,
        /// The bucket.
        bucket: String,
        /// The object key.
        key: String,
        /// The SDK's error and its causes, as one line ([`OneLine`]).
        cause: String,
        /// S3's request id, if an answer came at all.
        request_id: Option<String>,
    },
    /// Every part number is used and the log goes on: S3 would refuse any further part.
    #[error(
        "UploadPart s3://{bucket}/{key}: the log is longer than 10000 parts of these sizes hold ({capacity} bytes); S3 takes no more parts"
    )]
    PartsExhausted {
        /// The bucket.
        bucket: String,
        /// The object key.
        key: String,
        /// What 10,000 parts of the target's sizes hold.
        capacity: u64,
    },
}

/// `": MESSAGE"`, or nothing without one.
fn message_note(message: &Option<String>) -> String {
    message
        .as_ref()
        .map(|m| format!(": {m}"))
        .unwrap_or_default()
}

/// `" (request id ID)"`, or nothing without one.
fn request_id_note(id: &Option<String>) -> String {
    id.as_ref()
        .map(|id| format!(" (request id {id})"))
        .unwrap_or_default()
}

impl S3Error {
    /// `op` on `bucket`/`key` failed with `e`. The SDK's own accessors give the code, the
    /// message and the request id; its `DisplayErrorContext` is not used, as it ends with
    /// the whole error's `Debug`.
    pub fn from_sdk<E>(
        op: &'static str,
        bucket: &str,
        key: &str,
        e: SdkError<E, HttpResponse>,
    ) -> S3Error
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        let request_id = e.request_id().map(str::to_owned);
        // Only a service error has a code (the SDK's other errors have empty metadata).
        match (&e, e.code()) {
            (SdkError::ServiceError(_), Some(code)) => S3Error::Refused {
                op,
                bucket: bucket.to_owned(),
                key: key.to_owned(),
                code: code.to_owned(),
                message: e.message().filter(|m| !m.is_empty()).map(str::to_owned),
                request_id,
            },
            _ => {
                let mut cause = OneLine(&e).to_string();
                // An answer without a code (an HTML error page, an empty 503): its status is
                // the one thing it says.
                if let SdkError::ServiceError(s) = &e {
                    cause = format!("HTTP {}: {cause}", s.raw().status().as_u16());
                }
                S3Error::Failed {
                    op,
                    bucket: bucket.to_owned(),
                    key: key.to_owned(),
                    cause,
                    request_id,
                }
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_s3::error::{ConnectorError, ErrorMetadata};
    use aws_sdk_s3::operation::put_object::PutObjectError;
    use aws_sdk_s3::primitives::SdkBody;

    const KEY: &str = "druid/indexing-logs/index_kafka_wiki/log";

    fn answer(status: u16, request_id: Option<&str>) -> HttpResponse {
        let mut r = HttpResponse::new(status.try_into().unwrap(), SdkBody::empty());
        if let Some(id) = request_id {
            r.headers_mut().insert("x-amz-request-id", id.to_owned());
        }
        r
    }

    #[test]
    fn a_refusal_names_request_object_code_message_and_request_id() {
        let meta = ErrorMetadata::builder()
            .code("NoSuchBucket")
            .message("The specified bucket does not exist")
            .build();
        let e = SdkError::service_error(PutObjectError::generic(meta), answer(404, Some("0123")));
        let f = S3Error::from_sdk("PutObject", "logs", KEY, e);
        assert_eq!(
            f.to_string(),
            format!(
                "PutObject s3://logs/{KEY}: NoSuchBucket: The specified bucket does not exist (request id 0123)"
            )
        );
        assert!(f.is_permanent());
        // An S3-compatible store that sends no message: the code alone.
        let meta = ErrorMetadata::builder()
            .code("NoSuchBucket")
            .message("")
            .build();
        let e = SdkError::service_error(PutObjectError::generic(meta), answer(404, Some("0123")));
        let f = S3Error::from_sdk("PutObject", "logs", KEY, e);
        assert_eq!(
            f.to_string(),
            format!("PutObject s3://logs/{KEY}: NoSuchBucket (request id 0123)")
        );
    }

    #[test]
    fn no_answer_is_its_causes_in_words() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let e: SdkError<PutObjectError, HttpResponse> =
            SdkError::dispatch_failure(ConnectorError::io(Box::new(refused)));
        let f = S3Error::from_sdk("PutObject", "logs", KEY, e);
        assert_eq!(
            f.to_string(),
            format!("PutObject s3://logs/{KEY}: dispatch failure: io error: connection refused")
        );
        assert!(!f.is_permanent());
        // An answer without a code (a proxy's HTML page) says its status.
        let e = SdkError::service_error(
            PutObjectError::generic(ErrorMetadata::builder().build()),
            answer(502, None),
        );
        let f = S3Error::from_sdk("UploadPart", "logs", KEY, e).to_string();
        assert!(
            f.starts_with(&format!(
                "UploadPart s3://logs/{KEY}: HTTP 502: service error"
            )),
            "{f}"
        );
        assert!(!f.contains('{'), "{f}");
    }
}
