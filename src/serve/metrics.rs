//! Prometheus exposition of `/metrics`, and the HTTP side's own figures (requests by route
//! and status, latency histograms, refused connections); the process figures are in
//! `process.rs`, the ingest counters and archive histograms in `crate::metrics`.
//!
//! Written by hand rather than with `prometheus-client`: that crate encodes only OpenMetrics
//! text (`# TYPE x counter` for a sample named `x_total`, a `# EOF` line, another content
//! type), which would change what scrapers and docs/operations.md see, and the ingest
//! counters are plain atomics updated on the hot path that it would have to re-read through a
//! collector anyway. Full metric names stay greppable here; docs/operations.md is checked
//! against them.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::Http;
use crate::metrics::Histogram;
use crate::registry::TaskEntry;

/// The `route` label of the request metrics; anything else is `other`, so a scanner's paths
/// cannot grow the label set.
pub(super) const ROUTES: [&str; 6] = [
    "log",
    "druid_log_agent_tasks",
    "healthz",
    "readyz",
    "metrics",
    "other",
];

/// What the HTTP side counts about itself.
#[derive(Default)]
pub(super) struct RequestStats {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    latency: [Histogram; ROUTES.len()],
    rejected_connections: AtomicU64,
    open_connections: AtomicU64,
}

impl RequestStats {
    /// One answered request: `route` an index into [`ROUTES`].
    pub(super) fn record(&self, route: usize, status: u16, took: Duration) {
        self.latency[route].observe(took);
        let mut counts = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        *counts.entry((ROUTES[route], status)).or_default() += 1;
    }

    /// A connection accepted; [`RequestStats::closed`] when it ends.
    pub(super) fn opened(&self) {
        self.open_connections.fetch_add(1, Relaxed);
    }

    /// An accepted connection ended.
    pub(super) fn closed(&self) {
        self.open_connections.fetch_sub(1, Relaxed);
    }

    /// A connection closed at the connection limit.
    pub(super) fn rejected(&self) {
        self.rejected_connections.fetch_add(1, Relaxed);
    }
}

/// The index in [`ROUTES`] of a request path.
pub(super) fn route_of(path: &str) -> usize {
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

/// `GET /metrics`: the agent's counters, the tasks and spools as they are now, and the HTTP
/// side's own figures, in Prometheus text format 0.0.4.
pub(super) async fn metrics(State(http): State<Arc<Http>>) -> Result<Response, Infallible> {
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
    // Written before any archive too, all zero: dashboards and alerts find the series at once.
    let m = &http.metrics;
    for (name, help, h) in [
        (
            "druid_log_agent_archive_duration_seconds",
            "Time of an archive job that completed an archive, from its handing to the archive worker to its success.",
            &m.archive_duration,
        ),
        (
            "druid_log_agent_archive_delay_seconds",
            "Time from a task's log end to its archive complete, failed attempts included.",
            &m.archive_delay,
        ),
    ] {
        head(out, name, "histogram", help);
        h.write(out, name, "");
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
            "Pods in the watch's cache: this node's peons, and deleted ones for deleted_retention.",
            cache.len() as u64,
        );
    }
    let pending = http.registry.pending();
    single(
        out,
        "druid_log_agent_pending_pods",
        "gauge",
        "Pod log directories held unread until their pod is known (the API may be unreachable).",
        pending.len() as u64,
    );
    // What the alert asks: a count stays up on a node that starts other pods' directories
    // more often than the pending timeout lets each go, an age only when one is stuck.
    let oldest = pending.iter().map(|p| p.held_since.elapsed()).max();
    single(
        out,
        "druid_log_agent_pending_oldest_seconds",
        "gauge",
        "How long this agent has held the longest-held pending pod log directory (0 when none).",
        oldest.map_or(0, |d| d.as_secs()),
    );
    let sum = |f: &dyn Fn(&TaskEntry) -> u64| tasks.iter().map(|t| f(t)).sum::<u64>();
    single(
        out,
        "druid_log_agent_spool_bytes",
        "gauge",
        "Compressed bytes in spools on disk.",
        sum(&|t| t.spool.file_len()),
    );
    if let Some(max) = http.opts.spool_max_bytes {
        single(
            out,
            "druid_log_agent_spool_max_bytes",
            "gauge",
            "The spool_max_bytes setting: at it, reading pauses until archives free space.",
            max,
        );
    }
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
        http.stats.rejected_connections.load(Relaxed),
    );
    single(
        out,
        "druid_log_agent_http_open_connections",
        "gauge",
        "HTTP connections open now (follow streams included), out of max_connections.",
        http.stats.open_connections.load(Relaxed),
    );
    head(
        out,
        "druid_log_agent_http_requests_total",
        "counter",
        "HTTP requests by route and status.",
    );
    for ((route, code), n) in http
        .stats
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
    for (route, h) in ROUTES.iter().zip(&http.stats.latency) {
        h.write(
            out,
            "druid_log_agent_http_request_duration_seconds",
            &format!("route=\"{route}\""),
        );
    }
    super::process::write(out);
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
}
