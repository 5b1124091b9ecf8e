//! The HTTP endpoint: task logs with the overlord's own API and offset semantics, the task
//! list, health, readiness and Prometheus metrics, on one port.
//!
//! Architecture invariants: a request only ever reads a spool (through the registry), never
//! waits on the ingest thread and never holds a lock ingest needs; a request path never
//! becomes a file path; a response body is streamed in bounded chunks, so a 5 GiB log costs
//! no more memory than a 5 KiB one.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::metrics::Metrics;
use crate::registry::{Registry, TaskEntry};

/// Druid's own text for an unknown task (`OverlordResource.getTaskLog`).
pub const NO_LOG: &str =
    "No log was found for this task. The task may not exist, or it may not have begun running yet.";
const TEXT: &str = "text/plain; charset=UTF-8";
/// One chunk of a streamed log; with the channel depth this bounds a response's memory.
const CHUNK: u64 = 256 << 10;
const CHUNKS_IN_FLIGHT: usize = 4;
/// A snapshot this small (Druid's own `offset=-8192` reads, the common request) is read in
/// the handler and sent whole: it spans at most two blocks (tens of microseconds), and a
/// response task, a channel and a hop to the blocking pool would cost more than the read.
const INLINE_MAX: u64 = 64 << 10;
const FOLLOW_POLL: Duration = Duration::from_millis(100);
const BUCKETS: [f64; 10] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5,
];

/// Settings of the HTTP endpoint, taken from [`crate::config::Config`].
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// A bearer token every request but the health probes must present.
    pub token: Option<String>,
    /// Longest a `follow=true` response stays open.
    pub follow_max: Duration,
    /// Connections served at once; more are closed at once.
    pub max_connections: usize,
    /// Checked by `/readyz`: must be writable.
    pub state_dir: PathBuf,
    /// Checked by `/readyz` when the Kubernetes watch is on: must be synced.
    pub pod_cache: Option<Arc<crate::kube::PodCache>>,
    /// Cancelled at the follow streams' turn of the shutdown: a `follow=true` response then
    /// sends what is left and ends its body properly instead of being cut.
    pub follow_end: CancellationToken,
}

/// What the handlers share.
pub struct Http {
    registry: Registry,
    metrics: Arc<Metrics>,
    opts: ServeOptions,
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    latency: [Histogram; ROUTES.len()],
    rejected_connections: AtomicU64,
}

const ROUTES: [&str; 6] = [
    "log",
    "druid_log_agent_tasks",
    "healthz",
    "readyz",
    "metrics",
    "other",
];

#[derive(Default)]
struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                self.buckets[i].fetch_add(1, Relaxed);
            }
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_micros.fetch_add(d.as_micros() as u64, Relaxed);
    }
}

impl Http {
    /// The handlers' shared state: the registry and metrics are the agent's own, read without
    /// ever waiting on ingest.
    pub fn new(registry: Registry, metrics: Arc<Metrics>, opts: ServeOptions) -> Arc<Http> {
        Arc::new(Http {
            registry,
            metrics,
            opts,
            requests: Mutex::new(BTreeMap::new()),
            latency: Default::default(),
            rejected_connections: AtomicU64::new(0),
        })
    }
}

/// The routes: Druid's task log path (`/druid/indexer/v1/task/{task_id}/log`, what the overlord
/// asks for), `/tasks`, the probes and `/metrics`, behind the token check. Connection limits
/// are [`serve`]'s.
pub fn router(http: Arc<Http>) -> Router {
    Router::new()
        .route("/druid/indexer/v1/task/{task_id}/log", get(task_log))
        .route("/tasks", get(tasks))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n") })
        .layer(middleware::from_fn_with_state(http.clone(), guard))
        .with_state(http)
}

/// Serves `router` on `listener` until `stop` is cancelled, with per-connection limits:
/// headers must arrive within 10 s and fit in 16 KiB, and at most `max_connections` at once.
/// Then stops accepting and returns once every connection has finished the response it was
/// sending (idle kept-alive connections are closed at once).
pub async fn serve(listener: TcpListener, http: Arc<Http>, stop: CancellationToken) {
    let app = router(http.clone());
    let slots = Arc::new(Semaphore::new(http.opts.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of fds and the like: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            http.rejected_connections.fetch_add(1, Relaxed);
            debug!(%peer, "connection limit reached; closing");
            continue;
        };
        // A streamed body goes out in several writes; with Nagle's algorithm the last one
        // waits for the client's delayed ACK (40 ms) on a kept-alive connection.
        let _ = stream.set_nodelay(true);
        let svc = TowerToHyperService::new(app.clone());
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(10))
            .max_buf_size(16 << 10)
            .serve_connection(TokioIo::new(stream), svc);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(%peer, error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Binds the first of `addr` (the `listen` setting, resolved when the settings were checked)
/// that can be bound; returns the address bound, whose port is the one chosen for port 0.
pub async fn bind(addr: &[SocketAddr]) -> io::Result<(TcpListener, SocketAddr)> {
    let l = TcpListener::bind(addr).await?;
    let a = l.local_addr()?;
    Ok((l, a))
}

fn route_of(path: &str) -> usize {
    let name = match path {
        "/tasks" => "druid_log_agent_tasks",
        "/healthz" => "healthz",
        "/readyz" => "readyz",
        "/metrics" => "metrics",
        p if p.starts_with("/druid/indexer/v1/task/") => "log",
        _ => "other",
    };
    ROUTES
        .iter()
        .position(|r| *r == name)
        .unwrap_or(ROUTES.len() - 1)
}

/// Authentication and request metrics around every handler.
async fn guard(State(http): State<Arc<Http>>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = route_of(req.uri().path());
    let probe = matches!(ROUTES[route], "healthz" | "readyz");
    let resp = match &http.opts.token {
        Some(token) if !probe && !authorized(&req, token) => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "missing or wrong bearer token\n",
        )
            .into_response(),
        _ => next.run(req).await,
    };
    http.latency[route].observe(started.elapsed());
    let mut counts = http.requests.lock().unwrap_or_else(|e| e.into_inner());
    *counts
        .entry((ROUTES[route], resp.status().as_u16()))
        .or_default() += 1;
    resp
}

fn authorized(req: &Request, token: &str) -> bool {
    let Some(got) = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| bearer_credentials(v.as_bytes()))
    else {
        return false;
    };
    constant_time_eq(got, token.as_bytes())
}

/// The credentials of a `Bearer` authorization, or `None` for another scheme. RFC 9110
/// (section 11.1) makes the scheme case-insensitive and allows one or more spaces after it:
/// clients that send `bearer` must not be locked out.
fn bearer_credentials(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(b"bearer".len())?;
    if !scheme.eq_ignore_ascii_case(b"bearer") || rest.first() != Some(&b' ') {
        return None;
    }
    Some(rest.trim_ascii_start())
}

/// Compares without an early exit, so response time says nothing about how much matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, x) in a.iter().enumerate() {
        diff |= (x ^ b.get(i).copied().unwrap_or(0)) as usize;
    }
    diff == 0
}

/// Where Druid's `streamTaskLog(taskId, offset)` starts reading a log of `len` bytes.
pub fn druid_start(offset: i64, len: u64) -> u64 {
    if offset > 0 && (offset as u64) < len {
        offset as u64
    } else if offset < 0 && offset.unsigned_abs() < len {
        len - offset.unsigned_abs()
    } else {
        0
    }
}

struct LogQuery {
    offset: i64,
    follow: bool,
}

fn parse_query(q: Option<&str>) -> Result<LogQuery, String> {
    let mut out = LogQuery {
        offset: 0,
        follow: false,
    };
    for pair in q.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "offset" => {
                out.offset = v
                    .parse()
                    .map_err(|_| format!("offset must be a whole number of bytes, got {v:?}\n"))?
            }
            "follow" => out.follow = matches!(v, "true" | "1" | ""),
            _ => {}
        }
    }
    Ok(out)
}

async fn task_log(
    State(http): State<Arc<Http>>,
    Path(task_id): Path<String>,
    RawQuery(q): RawQuery,
) -> Response {
    let q = match parse_query(q.as_deref()) {
        Ok(q) => q,
        Err(msg) => return (StatusCode::BAD_REQUEST, msg).into_response(),
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
                warn!(task = %entry.task_id, error = %e, "cannot read spool for a log request");
                (StatusCode::INTERNAL_SERVER_ERROR, "cannot read the log\n").into_response()
            }
        };
    }
    let follow = q.follow.then(|| Instant::now() + http.opts.follow_max);
    let (tx, rx) = mpsc::channel::<Result<Bytes, io::Error>>(CHUNKS_IN_FLIGHT);
    tokio::spawn(stream_log(
        http.registry.clone(),
        entry,
        start,
        len,
        follow,
        http.opts.follow_end.clone(),
        tx,
    ));
    let body = Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }));
    let mut resp = Response::new(body);
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(TEXT));
    resp
}

/// Sends the log from `pos` in chunks; with `follow`, keeps sending what is appended until
/// the task's log ends, the deadline passes, the client goes away or `end` is cancelled (the
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
            let to = end.min(pos + CHUNK);
            let spool = entry.spool.clone();
            let read = tokio::task::spawn_blocking(move || spool.read_to_vec(pos, to)).await;
            let chunk = match read {
                Ok(Ok(b)) => b,
                Ok(Err(e)) => {
                    warn!(task = %entry.task_id, error = %e, "cannot read spool for a log request");
                    let _ = tx.send(Err(io::Error::other(e.to_string()))).await;
                    return;
                }
                Err(_) => return,
            };
            pos = to;
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

async fn tasks(State(http): State<Arc<Http>>) -> Response {
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

async fn readyz(State(http): State<Arc<Http>>) -> Response {
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

/// Writes the `# HELP` and `# TYPE` lines of a metric (full names stay greppable in the
/// source, and docs/operations.md is checked against them).
fn head(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A metric with one unlabelled value.
fn single(out: &mut String, name: &str, kind: &str, help: &str, v: u64) {
    head(out, name, kind, help);
    let _ = writeln!(out, "{name} {v}");
}

async fn metrics(State(http): State<Arc<Http>>) -> Result<Response, Infallible> {
    let mut text = String::with_capacity(8 << 10);
    let out = &mut text;
    for (name, help, v) in http.metrics.snapshot() {
        single(
            out,
            &format!("druid_log_agent_{name}_total"),
            "counter",
            help,
            v,
        );
    }
    let tasks = http.registry.all();
    head(
        out,
        "druid_log_agent_tasks",
        "gauge",
        "Tasks on this node by state.",
    );
    for state in ["running", "finishing", "failed", "archived"] {
        let n = tasks.iter().filter(|t| t.state() == state).count();
        let _ = writeln!(out, "druid_log_agent_tasks{{state=\"{state}\"}} {n}");
    }
    if let Some(cache) = &http.opts.pod_cache {
        single(
            out,
            "druid_log_agent_watched_pods",
            "gauge",
            "Pods in the watch's cache: this node's peons, and deleted ones for deleted_retention_secs.",
            cache.len() as u64,
        );
    }
    single(
        out,
        "druid_log_agent_pending_pods",
        "gauge",
        "Pod log directories held unread until their pod is known (the API may be unreachable).",
        http.registry.pending().len() as u64,
    );
    let sum = |f: &dyn Fn(&TaskEntry) -> u64| tasks.iter().map(|t| f(t)).sum::<u64>();
    single(
        out,
        "druid_log_agent_spool_bytes",
        "gauge",
        "Compressed bytes in spools on disk.",
        sum(&|t| t.spool.file_len()),
    );
    single(
        out,
        "druid_log_agent_log_bytes",
        "gauge",
        "Bytes of log text held in spools.",
        sum(&|t| t.spool.len()),
    );
    single(
        out,
        "druid_log_agent_lag_bytes",
        "gauge",
        "Bytes in open log files not read yet, all tasks.",
        sum(&|t| t.lag_bytes),
    );
    head(
        out,
        "druid_log_agent_task_lag_bytes",
        "gauge",
        "Bytes in a running task's open log files not read yet.",
    );
    for t in tasks.iter().filter(|t| t.is_running()) {
        let _ = writeln!(
            out,
            "druid_log_agent_task_lag_bytes{{task=\"{}\"}} {}",
            label(t.task_id.as_str()),
            t.lag_bytes
        );
    }
    single(
        out,
        "druid_log_agent_http_rejected_connections_total",
        "counter",
        "Connections closed at the connection limit.",
        http.rejected_connections.load(Relaxed),
    );
    head(
        out,
        "druid_log_agent_http_requests_total",
        "counter",
        "HTTP requests by route and status.",
    );
    for ((route, code), n) in http
        .requests
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
    {
        let _ = writeln!(
            out,
            "druid_log_agent_http_requests_total{{route=\"{route}\",code=\"{code}\"}} {n}"
        );
    }
    head(
        out,
        "druid_log_agent_http_request_duration_seconds",
        "histogram",
        "Time to the response head, by route.",
    );
    for (route, h) in ROUTES.iter().zip(&http.latency) {
        for (b, c) in BUCKETS.iter().zip(&h.buckets) {
            let _ = writeln!(
                out,
                "druid_log_agent_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"{b}\"}} {}",
                c.load(Relaxed)
            );
        }
        let count = h.count.load(Relaxed);
        let _ = writeln!(
            out,
            "druid_log_agent_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "druid_log_agent_http_request_duration_seconds_sum{{route=\"{route}\"}} {}",
            h.sum_micros.load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(
            out,
            "druid_log_agent_http_request_duration_seconds_count{{route=\"{route}\"}} {count}"
        );
    }
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

/// A Prometheus label value: backslash, quote and newline escaped.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_escaping() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn druid_offset_rules() {
        let len = 100;
        assert_eq!(druid_start(0, len), 0);
        assert_eq!(druid_start(1, len), 1);
        assert_eq!(druid_start(99, len), 99);
        assert_eq!(druid_start(100, len), 0);
        assert_eq!(druid_start(1000, len), 0);
        assert_eq!(druid_start(-1, len), 99);
        assert_eq!(druid_start(-99, len), 1);
        assert_eq!(druid_start(-100, len), 0);
        assert_eq!(druid_start(i64::MIN, len), 0);
        assert_eq!(druid_start(i64::MAX, len), 0);
        assert_eq!(druid_start(5, 0), 0);
    }

    #[test]
    fn token_compare() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
    }
}
