//! The request handlers: a task's log with Druid's API and answers, the task list, readiness.

use std::sync::Arc;
use std::time::Instant;

use crate::oneline::OneLine;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tracing::warn;

use super::Http;
use super::offset::druid_start;
use super::stream;

/// Druid's own text for an unknown task (`OverlordResource.getTaskLog`).
pub const NO_LOG: &str =
    "No log was found for this task. The task may not exist, or it may not have begun running yet.";
/// Druid's content type of a task log (`OverlordResource.getTaskLog`).
pub const TEXT: &str = "text/plain; charset=UTF-8";
/// A snapshot this small (Druid's own `offset=-8192` reads, the common request) is read in
/// the handler and sent whole: it spans at most two blocks (tens of microseconds), and a
/// response task, a channel and a hop to the blocking pool would cost more than the read.
const INLINE_MAX: u64 = 64 << 10;

/// The query of a log request, as Druid's `TaskLogs` clients send it; the gateway reads it
/// with the same rules, so both answer the same query the same way.
#[derive(Debug, PartialEq)]
pub struct LogQuery {
    /// Druid's `offset` (0 when absent): from the start, or from the end when negative.
    pub offset: i64,
    /// `follow=true`: keep the response open while the task runs.
    pub follow: bool,
}

/// Why a log request's query was refused (400); the message is the response body.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum QueryError {
    /// `offset` is not an `i64`.
    #[error("offset must be a whole number of bytes, got {0:?}")]
    Offset(String),
}

/// The query string of a log request: `offset` (when given twice, the last) and `follow`
/// (on for `true`, `1` or no value); other parameters are ignored.
pub fn parse_query(q: Option<&str>) -> Result<LogQuery, QueryError> {
    let mut out = LogQuery {
        offset: 0,
        follow: false,
    };
    for pair in q.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "offset" => out.offset = v.parse().map_err(|_| QueryError::Offset(v.to_owned()))?,
            "follow" => out.follow = matches!(v, "true" | "1" | ""),
            _ => {}
        }
    }
    Ok(out)
}

/// `GET /druid/indexer/v1/task/{task_id}/log`: the overlord's own route and answers.
pub(super) async fn task_log(
    State(http): State<Arc<Http>>,
    Path(task_id): Path<String>,
    RawQuery(q): RawQuery,
) -> Response {
    let q = match parse_query(q.as_deref()) {
        Ok(q) => q,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    };
    let Some(entry) = http.registry.get(&task_id) else {
        return (
            StatusCode::NOT_FOUND,
            [(header::CONTENT_TYPE, TEXT)],
            NO_LOG,
        )
            .into_response();
    };
    // A plain read is a snapshot of the log as it is now, like Druid's reader of a finished
    // object; `follow` goes on past it.
    let len = entry.spool.len();
    let start = druid_start(q.offset, len);
    if !q.follow && len - start <= INLINE_MAX {
        return match entry.spool.read_to_vec(start, len) {
            Ok(text) => ([(header::CONTENT_TYPE, TEXT)], text).into_response(),
            Err(e) => {
                warn!(task = %entry.task_id, error = %OneLine(&e), "cannot read spool for a log request");
                (StatusCode::INTERNAL_SERVER_ERROR, "cannot read the log\n").into_response()
            }
        };
    }
    let follow = q.follow.then(|| Instant::now() + http.opts.follow_max);
    let body = stream::log_body(
        http.registry.clone(),
        entry,
        start,
        len,
        follow,
        http.opts.follow_end.clone(),
    );
    let mut resp = Response::new(body);
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(TEXT));
    resp
}

/// `GET /tasks`: every task on this node with its state, sizes and archive, and the pod
/// directories held unread (for operators; Druid does not ask for it).
pub(super) async fn tasks(State(http): State<Arc<Http>>) -> Response {
    let list: Vec<serde_json::Value> = http
        .registry
        .all()
        .iter()
        .map(|e| {
            serde_json::json!({
                "id": e.task_id.as_str(),
                "namespace": e.pod.namespace,
                "pod": e.pod.pod,
                "podUid": e.pod.uid,
                "state": e.state(),
                "bytes": e.spool.len(),
                "spoolBytes": e.spool.file_len(),
                "archive": e.archived_to,
                "archivedBytes": match e.phase {
                    crate::checkpoint::Phase::Archived { archived_len, .. } => Some(archived_len),
                    _ => None,
                },
                "archiveError": e.archive_error,
                "upload": {"parts": e.uploaded_parts, "bytes": e.uploaded_bytes},
                "lagBytes": e.lag_bytes,
            })
        })
        .collect();
    // Directories held unread until their pod is known (an API outage holds them back).
    let pending = http.registry.pending().into_iter().map(|p| {
        serde_json::json!({
            "id": null,
            "namespace": p.pod.namespace,
            "pod": p.pod.pod,
            "podUid": p.pod.uid,
            "state": "pending",
            "pendingSinceMs": p.since_ms,
        })
    });
    let list: Vec<serde_json::Value> = list.into_iter().chain(pending).collect();
    axum::Json(list).into_response()
}

/// `GET /readyz`: ready once the pod cache has synced (when the watch is on) and the state
/// directory takes a write.
pub(super) async fn readyz(State(http): State<Arc<Http>>) -> Response {
    if let Some(c) = &http.opts.pod_cache
        && !c.is_synced()
    {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "the pod cache is not synced with the Kubernetes API yet\n",
        )
            .into_response();
    }
    let dir = http.opts.state_dir.clone();
    let probe = tokio::task::spawn_blocking(move || {
        let p = dir.join(".readyz");
        std::fs::write(&p, b"ok").and_then(|()| std::fs::remove_file(&p))
    })
    .await;
    match probe {
        Ok(Ok(())) => (StatusCode::OK, "ready\n").into_response(),
        Ok(Err(e)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "state directory {} is not writable: {e}\n",
                http.opts.state_dir.display()
            ),
        )
            .into_response(),
        Err(_) => StatusCode::SERVICE_UNAVAILABLE.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parsing() {
        assert_eq!(
            parse_query(Some("offset=-8192&follow=true")),
            Ok(LogQuery {
                offset: -8192,
                follow: true
            })
        );
        assert_eq!(
            parse_query(None),
            Ok(LogQuery {
                offset: 0,
                follow: false
            })
        );
        assert_eq!(
            parse_query(Some("offset=x")),
            Err(QueryError::Offset("x".into()))
        );
        assert_eq!(
            QueryError::Offset("x".into()).to_string(),
            "offset must be a whole number of bytes, got \"x\""
        );
    }
}
