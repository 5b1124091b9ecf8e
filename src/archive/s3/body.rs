//! Request bodies read from the spool while they are sent: a part (or a whole small log) is
//! never held in memory.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use aws_sdk_s3::primitives::{ByteStream, SdkBody};
use bytes::Bytes;
use http_body::Frame;

use crate::spool::{Spool, SpoolError};

/// Bytes `[from, to)` of the uploaded stream (the text, or with `gzip` the spool file itself,
/// whose members together are one valid gzip file) as a request body read from the spool
/// while it is sent, and read again from `from` if the SDK retries.
pub fn spool_body(spool: &Arc<Spool>, gzip: bool, from: u64, to: u64) -> ByteStream {
    let spool = spool.clone();
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

/// Why a body could not be read from the spool. The SDK sees it as an I/O error of the body
/// and the request fails (and is retried) like any other. The cause is in the message, not
/// in `source()`: the SDK prints the whole chain, which would say it twice.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The spool could not be read.
    #[error("reading the spool: {0}")]
    Spool(SpoolError),
    /// The spool ended before the byte the checkpoint says it holds.
    #[error("reading the spool: the spool holds fewer bytes than its checkpoint")]
    Short,
    /// The blocking read panicked or was cancelled.
    #[error("reading the spool: {0}")]
    Read(tokio::task::JoinError),
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
    reading: Option<tokio::task::JoinHandle<Result<Vec<u8>, SpoolError>>>,
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
            let (spool, gzip, from, end) = (this.spool.clone(), this.gzip, this.pos, this.end);
            tokio::task::spawn_blocking(move || {
                if gzip {
                    spool.read_file(from, end.min(from + BODY_CHUNK))
                } else {
                    // The spool file is cut anywhere, the text where its blocks end, so a
                    // block is inflated once, not once for each of two reads that split it.
                    // Here, not in poll_frame: it takes the spool's lock, which ingest holds
                    // for a whole decode, and a runtime worker must not wait for that.
                    spool.read_to_vec(from, spool.piece_end(from, end, BODY_CHUNK))
                }
            })
        });
        let read = std::task::ready!(Pin::new(reading).poll(cx));
        this.reading = None;
        let error = match read {
            Ok(Ok(chunk)) if !chunk.is_empty() => {
                this.pos += chunk.len() as u64;
                return Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk)))));
            }
            Ok(Ok(_)) => BodyError::Short,
            Ok(Err(e)) => BodyError::Spool(e),
            Err(e) => BodyError::Read(e),
        };
        Poll::Ready(Some(Err(std::io::Error::other(error))))
    }

    fn is_end_stream(&self) -> bool {
        self.pos >= self.end
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.end - self.pos)
    }
}
