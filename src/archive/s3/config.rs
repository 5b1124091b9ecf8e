//! `[archive] type = "s3"`: the settings of the S3 target, and what S3 would refuse in them.

use aws_sdk_s3::types::{ObjectCannedAcl, ServerSideEncryption};
use serde::{Deserialize, Serialize};

use crate::archive::s3::keys;
use crate::archive::upload::{MAX_PART, MIN_PART};
use crate::task::TaskId;

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

/// S3 settings the agent refuses to start with: S3 would refuse every request made with
/// them, or they would be dropped unused. Each message names the setting and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum S3ConfigError {
    /// No bucket anywhere.
    #[error("archive.bucket must be set (in the config file, or by --s3-bucket or DLA_S3_BUCKET)")]
    NoBucket,
    /// A part size S3 does not accept.
    #[error(
        "archive.part_bytes must be between {MIN_PART} (5 MiB) and {MAX_PART} (5 GiB): S3 rejects other parts"
    )]
    PartBytes {
        /// The size configured.
        part_bytes: u64,
    },
    /// Not an http(s) URL with a host.
    #[error(
        "archive.endpoint {endpoint:?} must be an http:// or https:// URL such as http://minio:9000"
    )]
    Endpoint {
        /// The endpoint configured.
        endpoint: String,
    },
    /// An encryption S3 does not know.
    #[error("archive.sse must be \"AES256\" or \"aws:kms\", not {sse:?}")]
    Sse {
        /// The value configured.
        sse: String,
    },
    /// A KMS key without KMS encryption: it would be ignored.
    #[error("archive.sse_kms_key_id is used only with sse = \"aws:kms\": set sse too, or unset it")]
    KmsKeyWithoutKms,
}

impl S3Config {
    /// Object key of `task`'s log: `{prefix}/{taskId}/log`, where Druid's `S3TaskLogs` looks
    /// (`log.gz` with `gzip`).
    pub fn key(&self, task: &TaskId) -> String {
        keys::object_key(&self.prefix, task, self.gzip)
    }

    /// The `Content-Type` every object of these settings gets.
    pub(super) fn content_type(&self) -> &'static str {
        keys::content_type(self.gzip)
    }

    /// The ACL and encryption settings every new object gets: `(acl, sse, kms key id)`.
    pub(super) fn put_options(
        &self,
    ) -> (
        Option<ObjectCannedAcl>,
        Option<ServerSideEncryption>,
        Option<String>,
    ) {
        let acl = (!self.disable_acl).then_some(ObjectCannedAcl::BucketOwnerFullControl);
        let sse = self.sse.as_deref().map(ServerSideEncryption::from);
        let kms = sse.as_ref().and(self.sse_kms_key_id.clone());
        (acl, sse, kms)
    }

    /// Refuses settings S3 would refuse on every request, or that would be dropped unused.
    pub fn validate(&self) -> Result<(), S3ConfigError> {
        if self.bucket.is_empty() {
            return Err(S3ConfigError::NoBucket);
        }
        if !(MIN_PART..=MAX_PART).contains(&self.part_bytes) {
            return Err(S3ConfigError::PartBytes {
                part_bytes: self.part_bytes,
            });
        }
        if let Some(ep) = &self.endpoint {
            let uri: Result<axum::http::Uri, _> = ep.parse();
            let ok = uri.is_ok_and(|u| {
                matches!(u.scheme_str(), Some("http" | "https")) && u.authority().is_some()
            });
            if !ok {
                return Err(S3ConfigError::Endpoint {
                    endpoint: ep.clone(),
                });
            }
        }
        match self.sse.as_deref() {
            None | Some("AES256") | Some("aws:kms") => {}
            Some(other) => {
                return Err(S3ConfigError::Sse {
                    sse: other.to_owned(),
                });
            }
        }
        if self.sse_kms_key_id.is_some() && self.sse.as_deref() != Some("aws:kms") {
            return Err(S3ConfigError::KmsKeyWithoutKms);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What users read when the agent refuses to start: each message names the setting and
    /// the fix, word for word as before the errors were typed.
    #[test]
    fn refusals_name_the_setting_and_the_fix() {
        let ok = S3Config {
            bucket: "b".into(),
            ..S3Config::default()
        };
        assert_eq!(ok.validate(), Ok(()));
        let refused = |cfg: S3Config| cfg.validate().unwrap_err().to_string();
        assert_eq!(
            refused(S3Config::default()),
            "archive.bucket must be set (in the config file, or by --s3-bucket or DLA_S3_BUCKET)"
        );
        assert_eq!(
            refused(S3Config {
                part_bytes: MIN_PART - 1,
                ..ok.clone()
            }),
            "archive.part_bytes must be between 5242880 (5 MiB) and 5368709120 (5 GiB): S3 rejects other parts"
        );
        assert_eq!(
            refused(S3Config {
                endpoint: Some("minio:9000".into()),
                ..ok.clone()
            }),
            "archive.endpoint \"minio:9000\" must be an http:// or https:// URL such as http://minio:9000"
        );
        assert_eq!(
            refused(S3Config {
                sse: Some("kms".into()),
                ..ok.clone()
            }),
            "archive.sse must be \"AES256\" or \"aws:kms\", not \"kms\""
        );
        assert_eq!(
            refused(S3Config {
                sse_kms_key_id: Some("k".into()),
                ..ok
            }),
            "archive.sse_kms_key_id is used only with sse = \"aws:kms\": set sse too, or unset it"
        );
    }
}
