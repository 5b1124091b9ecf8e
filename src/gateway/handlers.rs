//! The gateway's routes and the order of answers for a task's log: authorization first,
//! then the agent on the task's node, then the archive, then the overlord when configured,
//! then Druid's 404 (docs/gateway.md, "The order of answers").

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http_body_util::BodyExt;
use tracing::warn;

use super::archive_read::ArchiveReader;
use super::authz::{Decision, DruidAuthz};
use super::routes::Routes;
use super::upstream::Upstream;
use super::{Authorize, GatewayConfig};
use crate::metrics::Histogram;
use crate::oneline::OneLine;
use crate::serve::{LogQuery, NO_LOG, TEXT, parse_query};
use crate::task::TaskId;

/// Who answered a request, as the metrics label it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Source {
    Agent,
    Archive,
    Overlord,
    /// The gateway itself: a 404, a refusal, a bad request, a probe.
    None,
}

impl Source {
    fn label(self) -> &'static str {
        match self {
            Source::Agent => "agent",
            Source::Archive => "archive",
            Source::Overlord => "overlord",
            Source::None => "none",
        }
    }
}

/// Counters of `/metrics`: requests by route, answering source and status, with the time to
/// the response head; upstream errors by source and kind.
#[derive(Default)]
struct Stats {
    requests: Mutex<BTreeMap<(&'static str, Source, u16), u64>>,
    latency: Mutex<BTreeMap<(&'static str, Source), Arc<Histogram>>>,
    upstream_errors: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
}

impl Stats {
    fn request(&self, route: &'static str, source: Source, status: StatusCode, took: Duration) {
        self.latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((route, source))
            .or_default()
            .observe(took);
        *self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((route, source, status.as_u16()))
            .or_default() += 1;
    }

    fn upstream_error(&self, source: &'static str, kind: &'static str) {
        *self
            .upstream_errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((source, kind))
            .or_default() += 1;
    }

    /// The Prometheus text format, as the agent's `/metrics` writes it.
    fn render(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        out.push_str("# HELP druid_log_gateway_requests_total HTTP requests by route, answering source and status.\n");
        out.push_str("# TYPE druid_log_gateway_requests_total counter\n");
        for ((route, source, code), n) in self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "druid_log_gateway_requests_total{{route=\"{route}\",source=\"{}\",code=\"{code}\"}} {n}",
                source.label()
            );
        }
        out.push_str("# HELP druid_log_gateway_request_duration_seconds Time to the response head, by route and answering source.\n");
        out.push_str("# TYPE druid_log_gateway_request_duration_seconds histogram\n");
        for ((route, source), h) in self
            .latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            h.write(
                &mut out,
                "druid_log_gateway_request_duration_seconds",
                &format!("route=\"{route}\",source=\"{}\"", source.label()),
            );
        }
        out.push_str("# HELP druid_log_gateway_upstream_errors_total Upstream calls that gave no usable answer, by source and kind.\n");
        out.push_str("# TYPE druid_log_gateway_upstream_errors_total counter\n");
        for ((source, kind), n) in self
            .upstream_errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "druid_log_gateway_upstream_errors_total{{source=\"{source}\",kind=\"{kind}\"}} {n}"
            );
        }
        out
    }
}

/// What every request of the gateway shares.
pub struct Gateway {
    /// The routing table, when routing to the agents (`kubernetes`).
    routes: Option<Arc<Routes>>,
    agents: Upstream,
    agent_token: Option<String>,
    archive: Option<ArchiveReader>,
    overlord: Option<(Upstream, String)>,
    authorize: Authorize,
    authz: Option<DruidAuthz>,
    token: Option<String>,
    stats: Arc<Stats>,
}

impl Gateway {
    /// The gateway of `cfg`, with the token read from `auth_token_file` for `authorize =
    /// "token"`, the agents' token, and the routing table the watches fill.
    pub async fn new(
        cfg: &GatewayConfig,
        token: Option<String>,
        agent_token: Option<String>,
        routes: Option<Arc<Routes>>,
    ) -> Gateway {
        let upstream = Upstream::new(
            cfg.upstream_connect_timeout,
            cfg.upstream_first_byte_timeout,
        );
        let archive = match &cfg.archive {
            Some(a) => Some(
                ArchiveReader::new(
                    a,
                    cfg.upstream_connect_timeout,
                    cfg.upstream_first_byte_timeout,
                )
                .await,
            ),
            None => None,
        };
        let overlord = cfg
            .overlord_url
            .as_deref()
            .map(|u| (upstream.clone(), u.trim_end_matches('/').to_owned()));
        let authz = match (cfg.authorize, &cfg.overlord_url) {
            (Authorize::Druid, Some(u)) => Some(DruidAuthz::new(
                upstream.clone(),
                u,
                cfg.auth_cache,
                cfg.auth_cache_max,
            )),
            _ => None,
        };
        Gateway {
            routes,
            agents: upstream.clone(),
            agent_token,
            archive,
            overlord,
            authorize: cfg.authorize,
            authz,
            token,
            stats: Arc::default(),
        }
    }
}

/// The routes: Druid's task-log path and the probes.
pub fn router(gw: Arc<Gateway>) -> Router {
    Router::new()
        .route("/druid/indexer/v1/task/{task_id}/log", get(task_log))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(gw)
}

/// `task` as one URL path segment: characters outside the unreserved set and `:` are
/// percent-encoded, so no id can add a path segment or a query to an upstream URL.
pub(crate) fn path_segment(task: &TaskId) -> String {
    let mut out = String::new();
    for b in task.as_str().bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b':') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn no_log() -> Response {
    (
        StatusCode::NOT_FOUND,
        [(header::CONTENT_TYPE, TEXT)],
        NO_LOG,
    )
        .into_response()
}

/// `GET /druid/indexer/v1/task/{task_id}/log`: Druid's route, answers and offset rules.
async fn task_log(
    State(gw): State<Arc<Gateway>>,
    Path(task_id): Path<String>,
    RawQuery(q): RawQuery,
    mut req: Request,
) -> Response {
    let started = Instant::now();
    // Through the API server's service proxy (`druid-log-agent logs`), `Authorization` never
    // arrives: the API server consumes it. The caller's Druid credentials come in
    // X-Druid-Authorization instead and are used as if they had come in `Authorization`; the
    // overlord (or the token check) still decides, so this opens no way around it.
    if !req.headers().contains_key(header::AUTHORIZATION)
        && let Some(v) = req
            .headers()
            .get(super::upstream::PROXIED_AUTHORIZATION)
            .cloned()
    {
        req.headers_mut().insert(header::AUTHORIZATION, v);
    }
    let (source, resp) = answer(&gw, task_id, q, req).await;
    gw.stats
        .request("log", source, resp.status(), started.elapsed());
    resp
}

async fn answer(
    gw: &Gateway,
    task_id: String,
    q: Option<String>,
    req: Request,
) -> (Source, Response) {
    if let Some(refused) = check_token(gw, &req) {
        return (Source::None, refused);
    }
    // A checked id, before it goes into any key, file name or URL.
    let Ok(task) = TaskId::new(task_id) else {
        return (Source::None, no_log());
    };
    let LogQuery { offset, follow } = match parse_query(q.as_deref()) {
        Ok(q) => q,
        Err(e) => {
            return (
                Source::None,
                (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
            );
        }
    };
    if let Some(authz) = &gw.authz {
        match authz.decide(&task, req.headers()).await {
            Ok(Decision::Allow) => {}
            // Druid does not know the task: its datasource, and so who may read it, is
            // unknown; an archived log of it stays unserved.
            Ok(Decision::Unknown) => return (Source::None, no_log()),
            Ok(Decision::Deny(status)) => {
                return (
                    Source::None,
                    (status, "not authorized for this task\n").into_response(),
                );
            }
            Err(e) => {
                warn!(task = %task, error = %OneLine(&e), "cannot authorize: refusing (fail closed)");
                gw.stats.upstream_error("overlord", "authorize");
                return (
                    Source::None,
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "the overlord cannot be asked who may read this log; try again\n",
                    )
                        .into_response(),
                );
            }
        }
    }
    if let Some(resp) = from_agent(gw, &task, offset, follow).await {
        return (Source::Agent, resp);
    }
    if let Some(archive) = &gw.archive {
        match archive.open(&task, offset).await {
            Ok(Some(found)) => {
                let mut resp = Response::new(found.body);
                resp.headers_mut()
                    .insert(header::CONTENT_TYPE, HeaderValue::from_static(TEXT));
                return (Source::Archive, resp);
            }
            Ok(None) => {}
            Err(e) => {
                warn!(task = %task, error = %OneLine(&e), "archive read failed; trying the next source");
                gw.stats.upstream_error("archive", "error");
            }
        }
    }
    if let Some((upstream, base)) = &gw.overlord {
        let mut url = format!("{base}/druid/indexer/v1/task/{}/log", path_segment(&task));
        if let Some(q) = &q {
            url.push('?');
            url.push_str(q);
        }
        match upstream.get(&url, req.headers()).await {
            Ok(resp) => {
                // The overlord's answer is the answer, its 404 included, streamed through.
                let (parts, body) = resp.into_parts();
                let mut out = Response::new(Body::new(body));
                *out.status_mut() = parts.status;
                if let Some(ct) = parts.headers.get(header::CONTENT_TYPE) {
                    out.headers_mut().insert(header::CONTENT_TYPE, ct.clone());
                }
                return (Source::Overlord, out);
            }
            Err(e) => {
                warn!(task = %task, error = %OneLine(&e), "overlord unreachable for a log");
                gw.stats.upstream_error("overlord", e.kind());
            }
        }
    }
    (Source::None, no_log())
}

/// The log from the agent on the task's node, streamed through as it arrives; `None` when
/// the table has no agent for the task or the agent has no answer (404, an error status,
/// refused, a timeout): the next source is asked. Once the head is passed on, an upstream
/// failure cuts the body (resuming elsewhere could double bytes) and is counted.
async fn from_agent(gw: &Gateway, task: &TaskId, offset: i64, follow: bool) -> Option<Response> {
    let route = gw.routes.as_ref()?.agent_for(task)?;
    let mut url = format!(
        "http://{}/druid/indexer/v1/task/{}/log?offset={offset}",
        route.addr,
        path_segment(task)
    );
    if follow {
        url.push_str("&follow=true");
    }
    let resp = match gw.agents.get_agent(&url, gw.agent_token.as_deref()).await {
        Ok(r) => r,
        Err(e) => {
            warn!(task = %task, node = %route.node, error = %OneLine(&e),
                "node agent unreachable; trying the next source");
            gw.stats.upstream_error("agent", e.kind());
            return None;
        }
    };
    let status = resp.status();
    if status == StatusCode::NOT_FOUND {
        return None;
    }
    if !status.is_success() {
        warn!(task = %task, node = %route.node, status = status.as_u16(),
            "node agent answered with an error; trying the next source");
        gw.stats.upstream_error("agent", "status");
        return None;
    }
    let (parts, body) = resp.into_parts();
    let stats = gw.stats.clone();
    let body = body.map_err(move |e| {
        stats.upstream_error("agent", "body");
        e
    });
    let mut out = Response::new(Body::new(body));
    let ct = parts
        .headers
        .get(header::CONTENT_TYPE)
        .cloned()
        .unwrap_or(HeaderValue::from_static(TEXT));
    out.headers_mut().insert(header::CONTENT_TYPE, ct);
    Some(out)
}

/// With `authorize = "token"`, the refusal of a request without the token.
fn check_token(gw: &Gateway, req: &Request) -> Option<Response> {
    match (&gw.authorize, &gw.token) {
        (Authorize::Token, Some(token)) if !crate::serve::authorized(req, token) => Some(
            (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                "missing or wrong bearer token\n",
            )
                .into_response(),
        ),
        _ => None,
    }
}

/// `/healthz`: the process serves.
async fn healthz(State(gw): State<Arc<Gateway>>) -> Response {
    gw.stats
        .request("probe", Source::None, StatusCode::OK, Duration::ZERO);
    "ok\n".into_response()
}

/// `/readyz`: serving, and, when routing to the agents, both pod watches have listed once
/// (before that a running task would be missed and answered from the archive or not at all).
async fn readyz(State(gw): State<Arc<Gateway>>) -> Response {
    let resp = match &gw.routes {
        Some(r) if !r.synced() => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the pod watches have not listed the peon and agent pods yet\n",
        )
            .into_response(),
        _ => "ready\n".into_response(),
    };
    gw.stats
        .request("probe", Source::None, resp.status(), Duration::ZERO);
    resp
}

/// `/metrics`, guarded by the token in `authorize = "token"` like the agent's.
async fn metrics(State(gw): State<Arc<Gateway>>, req: Request) -> Response {
    if let Some(refused) = check_token(&gw, &req) {
        gw.stats
            .request("metrics", Source::None, refused.status(), Duration::ZERO);
        return refused;
    }
    gw.stats
        .request("metrics", Source::None, StatusCode::OK, Duration::ZERO);
    let mut text = gw.stats.render();
    if let Some(r) = &gw.routes {
        use std::fmt::Write;
        let (tasks, agents) = r.counts();
        let _ = write!(
            text,
            "# HELP druid_log_gateway_known_tasks Tasks the routing table maps to a node (deleted pods within pod_retention included).\n\
             # TYPE druid_log_gateway_known_tasks gauge\n\
             druid_log_gateway_known_tasks {tasks}\n\
             # HELP druid_log_gateway_known_agents Agent pods the routing table can send requests to.\n\
             # TYPE druid_log_gateway_known_agents gauge\n\
             druid_log_gateway_known_agents {agents}\n\
             # HELP druid_log_gateway_watches_synced 1 once both pod watches have listed (what /readyz waits for).\n\
             # TYPE druid_log_gateway_watches_synced gauge\n\
             druid_log_gateway_watches_synced {}\n",
            u8::from(r.synced())
        );
    }
    crate::serve::write_process_metrics(&mut text);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}
