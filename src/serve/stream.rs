//! Log bodies longer than a snapshot read in the handler: read from the spool in bounded chunks
//! on the blocking pool and streamed through a short channel, and with `follow=true` kept open
//! while the task runs.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::oneline::OneLine;
use axum::body::Body;
use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::registry::{Registry, TaskEntry};

/// One chunk of a streamed log; with the channel depth this bounds a response's memory.
const CHUNK: u64 = 256 << 10;
const CHUNKS_IN_FLIGHT: usize = 4;
/// How often a follower looks for appended text.
const FOLLOW_POLL: Duration = Duration::from_millis(100);

/// The body of a log read from `start`: up to `snapshot_len`, or with `follow` (its deadline)
/// on past it until the log ends, the deadline passes, the client goes away or `end_follow`
/// is cancelled. A task sends it; the body only takes chunks off the channel.
pub(super) fn log_body(
    registry: Registry,
    entry: Arc<TaskEntry>,
    start: u64,
    snapshot_len: u64,
    follow: Option<Instant>,
    end_follow: CancellationToken,
) -> Body {
    let (tx, rx) = mpsc::channel::<Result<Bytes, io::Error>>(CHUNKS_IN_FLIGHT);
    tokio::spawn(stream_log(
        registry,
        entry,
        start,
        snapshot_len,
        follow,
        end_follow,
        tx,
    ));
    Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }))
}

/// Sends the log from `pos` in chunks; with `follow`, keeps sending what is appended until
/// the task's log ends, the deadline passes, the client goes away or `end_follow` is cancelled (the
/// agent stops: what it read is sent first).
async fn stream_log(
    registry: Registry,
    mut entry: Arc<TaskEntry>,
    mut pos: u64,
    snapshot_len: u64,
    follow: Option<Instant>,
    end_follow: CancellationToken,
    tx: mpsc::Sender<Result<Bytes, io::Error>>,
) {
    loop {
        // Looked at before the length is: ingest has stopped by the time `end_follow` is
        // cancelled, so the length read after it is the last one.
        let ending = end_follow.is_cancelled();
        let end = if follow.is_some() {
            entry.spool.len()
        } else {
            snapshot_len
        };
        while pos < end {
            let spool = entry.spool.clone();
            // Ends on a block boundary: a block split between two chunks would be inflated
            // twice. Worked out on the blocking pool, as it takes the spool's lock.
            let read = tokio::task::spawn_blocking(move || {
                spool.read_to_vec(pos, spool.piece_end(pos, end, CHUNK))
            })
            .await;
            let chunk = match read {
                Ok(Ok(b)) => b,
                Ok(Err(e)) => {
                    warn!(task = %entry.task_id, error = %OneLine(&e), "cannot read spool for a log request");
                    let _ = tx.send(Err(io::Error::other(e.to_string()))).await;
                    return;
                }
                Err(_) => return,
            };
            if chunk.is_empty() {
                // Cannot happen below the spool's length; never spin if it does.
                return;
            }
            pos += chunk.len() as u64;
            if tx.send(Ok(Bytes::from(chunk))).await.is_err() {
                return; // the client went away
            }
        }
        let Some(deadline) = follow else { return };
        if ending || (!entry.is_running() && pos >= entry.spool.len()) {
            return;
        }
        if Instant::now() >= deadline {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(FOLLOW_POLL) => {}
            _ = end_follow.cancelled() => {}
            _ = tx.closed() => return,
        }
        // The phase may have changed (the task ended); the spool handle stays the same.
        if let Some(e) = registry.get(entry.task_id.as_str())
            && Arc::ptr_eq(&e.spool, &entry.spool)
        {
            entry = e;
        }
    }
}
