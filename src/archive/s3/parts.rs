//! A multipart upload while the task runs: whole parts cut from committed spool bytes, by
//! number, each streamed from the spool as it is sent.
//!
//! Parts are cut by [`PartSizes`](crate::archive::upload::PartSizes) from the part number
//! alone, so an upload resumed after a crash cuts the parts it cut before; a part re-sent
//! under its number replaces itself.

use tracing::info;

use crate::archive::s3::body::spool_body;
use crate::archive::s3::client::Attempt;
use crate::archive::s3::error::S3Error;
use crate::archive::s3::keys;
use crate::archive::upload::{Part, UploadState};

/// Stores whole parts of the first `upto` bytes of the uploaded stream, starting the upload if
/// needed; with `last`, everything up to `upto` (the last part may be short). `state` records
/// each part as it is stored, so a failure keeps the parts before it.
pub async fn store_parts(
    at: &Attempt<'_>,
    state: &mut UploadState,
    upto: u64,
    last: bool,
) -> Result<(), S3Error> {
    let (bucket, key) = (at.bucket, at.key);
    loop {
        let from = state.uploaded();
        if from >= upto {
            return Ok(());
        }
        let Some(number) = state.next_part_number() else {
            return Err(S3Error::PartsExhausted {
                bucket: bucket.cfg.bucket.clone(),
                key: key.to_owned(),
                capacity: at.sizes.capacity(),
            });
        };
        let part = at.sizes.size(number);
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
                let id = create(at).await?;
                state.upload_id = Some(id.clone());
                id
            }
        };
        let out = bucket
            .client
            .upload_part()
            .bucket(&bucket.cfg.bucket)
            .key(key)
            .upload_id(&upload_id)
            .part_number(i32::from(number.get()))
            .content_length((to - from) as i64)
            .body(spool_body(&at.job.spool, bucket.cfg.gzip, from, to))
            .send()
            .await
            .map_err(|e| at.failed("UploadPart", e))?;
        let etag = out.e_tag().unwrap_or_default().to_owned();
        info!(key = %key, part = %number, bytes = to - from, "part stored");
        state.parts.push(Part {
            number,
            etag,
            end: to,
        });
    }
}

/// Starts the multipart upload of the attempt's object; its id is all a resume needs.
async fn create(at: &Attempt<'_>) -> Result<String, S3Error> {
    let (bucket, key, job) = (at.bucket, at.key, at.job);
    let mut req = bucket
        .client
        .create_multipart_upload()
        .bucket(&bucket.cfg.bucket)
        .key(key)
        .content_type(bucket.cfg.content_type())
        .set_metadata(Some(keys::metadata(&job.task, &job.origin, 0)));
    let (acl, sse, kms) = bucket.cfg.put_options();
    req = req
        .set_acl(acl)
        .set_server_side_encryption(sse)
        .set_ssekms_key_id(kms);
    let out = req
        .send()
        .await
        .map_err(|e| at.failed("CreateMultipartUpload", e))?;
    let id = out.upload_id().unwrap_or_default().to_owned();
    info!(key = %key, upload_id = %id, "multipart upload started");
    Ok(id)
}
