//! The S3 client as the settings make it, and what every request of one job shares.

use aws_sdk_s3::Client;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};

use crate::archive::job::Job;
use crate::archive::s3::config::S3Config;
use crate::archive::s3::error::S3Error;
use crate::archive::upload::PartSizes;

/// A client for the configured bucket, with the settings its requests follow.
pub struct Bucket {
    /// The SDK client, configured once (endpoint, addressing, checksums, region).
    pub client: Client,
    /// The settings: bucket, prefix, ACL, encryption, `gzip`.
    pub cfg: S3Config,
}

impl Bucket {
    /// Builds the client from the standard AWS chain (environment, profile, web identity for
    /// IRSA, container and instance metadata), or from `creds` if given, plus `cfg`.
    pub async fn connect(cfg: S3Config, creds: Option<aws_sdk_s3::config::Credentials>) -> Bucket {
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
        Bucket {
            client: Client::from_conf(b.build()),
            cfg,
        }
    }
}

/// One job against its object: what the requests of one attempt share.
pub struct Attempt<'a> {
    /// Where the requests go.
    pub bucket: &'a Bucket,
    /// How the uploaded stream is cut into parts.
    pub sizes: PartSizes,
    /// The job: task, spool, origin.
    pub job: &'a Job,
    /// The object key of the job's task.
    pub key: &'a str,
}

impl Attempt<'_> {
    /// The attempt's `op` request failed with `e`: the error names the attempt's object.
    pub fn failed<E>(&self, op: &'static str, e: SdkError<E, HttpResponse>) -> S3Error
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        S3Error::from_sdk(op, &self.bucket.cfg.bucket, self.key, e)
    }
}
