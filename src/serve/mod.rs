//! The HTTP endpoint: task logs with the overlord's own API and offset semantics, the task
//! list, health, readiness and Prometheus metrics, on one port.
//!
//! Architecture invariants: a request only ever reads a spool (through the registry), never
//! waits on the ingest thread and never holds a lock ingest needs; a request path never
//! becomes a file path; a response body is streamed in bounded chunks, so a 5 GiB log costs
//! no more memory than a 5 KiB one.
//!
//! Here: the server (accept loop, connection limits, graceful close) and the middleware every
//! request passes. `handlers` answers the routes, `offset` holds Druid's offset rules, `stream`
//! the streamed and followed bodies, `auth` the token check, `metrics` the exposition.

mod auth;
mod handlers;
mod metrics;
mod offset;
mod process;
mod stream;

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::oneline::OneLine;
use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::metrics::Metrics;
use crate::registry::Registry;

pub use auth::authorized;
pub use handlers::{LogQuery, NO_LOG, QueryError, TEXT, parse_query};
pub use offset::druid_start;
pub use process::write as write_process_metrics;

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
    /// `spool_max_bytes` (`None` without a limit), exposed beside the spools' size so an alert
    /// can compare the two.
    pub spool_max_bytes: Option<u64>,
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
    stats: metrics::RequestStats,
}

impl Http {
    /// The handlers' shared state: the registry and metrics are the agent's own, read without
    /// ever waiting on ingest.
    pub fn new(registry: Registry, metrics: Arc<Metrics>, opts: ServeOptions) -> Arc<Http> {
        Arc::new(Http {
            registry,
            metrics,
            opts,
            stats: Default::default(),
        })
    }
}

/// The routes: Druid's task log path (`/druid/indexer/v1/task/{task_id}/log`, what the overlord
/// asks for), `/tasks`, the probes and `/metrics`, behind the token check. Connection limits
/// are [`serve`]'s.
pub fn router(http: Arc<Http>) -> Router {
    Router::new()
        .route(
            "/druid/indexer/v1/task/{task_id}/log",
            get(handlers::task_log),
        )
        .route("/tasks", get(handlers::tasks))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(handlers::readyz))
        .route("/metrics", get(metrics::metrics))
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
                warn!(error = %OneLine(&e), "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            http.stats.rejected();
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
        let stats = http.clone();
        stats.stats.opened();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(%peer, error = %OneLine(&e), "connection ended with an error");
            }
            stats.stats.closed();
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

/// Authentication and request metrics around every handler.
async fn guard(State(http): State<Arc<Http>>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = metrics::route_of(req.uri().path());
    let probe = matches!(metrics::ROUTES[route], "healthz" | "readyz");
    let resp = match &http.opts.token {
        Some(token) if !probe && !auth::authorized(&req, token) => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "missing or wrong bearer token\n",
        )
            .into_response(),
        _ => next.run(req).await,
    };
    http.stats
        .record(route, resp.status().as_u16(), started.elapsed());
    resp
}
