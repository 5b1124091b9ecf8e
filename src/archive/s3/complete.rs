//! Making the log visible, and resuming: a multipart upload completed (or a small log put
//! whole) at the task's end, after checking what a crash may have left done.
//!
//! The checkpoint may lag behind S3 (a part stored, or a completion sent, just before a
//! crash) but never run ahead, so what S3 has is reconciled with what was recorded, and a
//! completion that may have happened is checked with HeadObject before anything is repeated.

use std::collections::HashMap;

use aws_sdk_s3::error::SdkError;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use tracing::{info, warn};

use crate::archive::job::placeholder;
use crate::archive::s3::body::spool_body;
use crate::archive::s3::client::Attempt;
use crate::archive::s3::error::S3Error;
use crate::archive::s3::keys;
use crate::archive::s3::parts::store_parts;
use crate::archive::upload::{PartNumber, UploadState};

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

/// Makes the complete log visible at `key`: `len` bytes of the uploaded stream,
/// `text_len` bytes of text.
pub async fn finish(
    at: &Attempt<'_>,
    state: &mut UploadState,
    len: u64,
    text_len: u64,
) -> Result<String, S3Error> {
    let (bucket, key) = (at.bucket, at.key);
    let location = format!("s3://{}/{}", bucket.cfg.bucket, key);
    if state.completing {
        match completion(at, len).await? {
            Completion::Complete => {
                info!(key = %key, "found the upload completed before a restart");
                return Ok(location);
            }
            Completion::NotComplete => {}
            // Completing an upload that still exists is safe; if it is gone, the
            // reconciliation below finds out and stores the log again.
            Completion::CannotTell => warn!(
                key = %key,
                "cannot tell whether the upload was completed before a restart \
                 (HeadObject answers 403: does the policy lack s3:ListBucket?); completing it"
            ),
        }
    }
    if let Some(id) = state.upload_id.clone() {
        match reconcile(at, &id, state).await {
            Ok(()) => {}
            Err(f) if f.upload_gone() => match completion(at, len).await? {
                // Completed before a crash that kept the news from the checkpoint.
                Completion::Complete => {
                    info!(key = %key, "found the upload completed before a restart");
                    return Ok(location);
                }
                // Aborted (a lifecycle rule), or completed with no way to know: the spool
                // holds the whole log, and storing the same bytes at the same key again
                // leaves the same object.
                c @ (Completion::NotComplete | Completion::CannotTell) => {
                    warn!(
                        key = %key,
                        head_object_forbidden = c == Completion::CannotTell,
                        "the multipart upload is gone and no complete object is known; storing the log again"
                    );
                    *state = UploadState::default();
                }
            },
            Err(f) => return Err(f),
        }
    }
    if state.upload_id.is_none() && len <= at.sizes.size(PartNumber::FIRST) {
        put_whole(at, len, text_len).await?;
        return Ok(location);
    }
    store_parts(at, state, len, true).await?;
    let Some(id) = state.upload_id.clone() else {
        // Nothing was stored (an empty log): the placeholder, as Druid writes it.
        put_whole(at, 0, 0).await?;
        return Ok(location);
    };
    state.completing = true;
    let parts: Vec<CompletedPart> = state
        .parts
        .iter()
        .map(|p| {
            CompletedPart::builder()
                .part_number(i32::from(p.number.get()))
                .e_tag(&p.etag)
                .build()
        })
        .collect();
    let done = bucket
        .client
        .complete_multipart_upload()
        .bucket(&bucket.cfg.bucket)
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
            let f = at.failed("CompleteMultipartUpload", e);
            if f.upload_gone() && completion(at, len).await? == Completion::Complete {
                return Ok(location);
            }
            Err(f)
        }
    }
}

/// Checks the parts S3 has against the ones recorded: the checkpoint may lag behind
/// (a part stored just before a crash), never run ahead.
async fn reconcile(at: &Attempt<'_>, id: &str, state: &mut UploadState) -> Result<(), S3Error> {
    let (bucket, key) = (at.bucket, at.key);
    let out = bucket
        .client
        .list_parts()
        .bucket(&bucket.cfg.bucket)
        .key(key)
        .upload_id(id)
        .send()
        .await
        .map_err(|e| at.failed("ListParts", e))?;
    let stored: HashMap<i32, String> = out
        .parts()
        .iter()
        .filter_map(|p| Some((p.part_number()?, p.e_tag()?.to_owned())))
        .collect();
    let keep = state
        .parts
        .iter()
        .take_while(|p| stored.get(&i32::from(p.number.get())) == Some(&p.etag))
        .count();
    if keep < state.parts.len() {
        warn!(
            key = %key,
            recorded = state.parts.len(),
            stored = keep,
            "some recorded parts are missing in S3; re-sending them"
        );
        state.parts.truncate(keep);
    }
    Ok(())
}

/// Whether the attempt's key holds the complete log of `len` bytes, as far as HeadObject can
/// say.
async fn completion(at: &Attempt<'_>, len: u64) -> Result<Completion, S3Error> {
    let (bucket, key) = (at.bucket, at.key);
    match bucket
        .client
        .head_object()
        .bucket(&bucket.cfg.bucket)
        .key(key)
        .send()
        .await
    {
        Ok(h) if h.content_length() == i64::try_from(len).ok() => Ok(Completion::Complete),
        Ok(_) => Ok(Completion::NotComplete),
        Err(SdkError::ServiceError(e)) => match e.raw().status().as_u16() {
            404 => Ok(Completion::NotComplete),
            403 => Ok(Completion::CannotTell),
            _ => Err(at.failed("HeadObject", SdkError::ServiceError(e))),
        },
        Err(e) => Err(at.failed("HeadObject", e)),
    }
}

/// Stores the log whole with one PutObject: the first `len` bytes of the uploaded stream
/// (`text_len` bytes of text), or the placeholder if `len` is 0.
async fn put_whole(at: &Attempt<'_>, len: u64, text_len: u64) -> Result<(), S3Error> {
    let (bucket, key, job) = (at.bucket, at.key, at.job);
    let (body, body_len) = if len == 0 {
        let text = placeholder(&job.task).into_bytes();
        let body = if bucket.cfg.gzip { gzip(&text) } else { text };
        let n = body.len() as u64;
        (ByteStream::from(body), n)
    } else {
        (spool_body(&job.spool, bucket.cfg.gzip, 0, len), len)
    };
    let mut req = bucket
        .client
        .put_object()
        .bucket(&bucket.cfg.bucket)
        .key(key)
        .content_type(bucket.cfg.content_type())
        .content_length(body_len as i64)
        .set_metadata(Some(keys::metadata(&job.task, &job.origin, text_len)))
        .body(body);
    let (acl, sse, kms) = bucket.cfg.put_options();
    req = req
        .set_acl(acl)
        .set_server_side_encryption(sse)
        .set_ssekms_key_id(kms);
    req.send().await.map_err(|e| at.failed("PutObject", e))?;
    Ok(())
}
fn gzip(text: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let _ = enc.write_all(text);
    enc.finish().unwrap_or_default()
}
