//! `druid-log-agent logs TASK`: a task's log printed from anywhere `kubectl` works, through
//! the API server's proxy to the gateway Service (the user's kubeconfig credentials, no
//! port-forward, no extra network access), or from a gateway URL directly.

use std::io::Write;

use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt;

use super::handlers::path_segment;
use crate::oneline::OneLine;
use crate::task::TaskId;

/// Where `logs` asks.
#[derive(Debug, Clone)]
pub enum Via {
    /// A gateway's base URL (`http://host:port`), with the value of an `Authorization`
    /// header to send (Druid's credentials or the gateway's token).
    Gateway {
        /// The base URL.
        url: String,
        /// The `Authorization` header's value, if any.
        authorization: Option<String>,
    },
    /// The gateway Service through the API server's service proxy; `authorization` goes as
    /// X-Druid-Authorization (the API server consumes `Authorization`).
    Kube {
        /// The `Authorization` value for the gateway, if any.
        authorization: Option<String>,
        /// The Service's namespace; unset: the kubeconfig context's.
        namespace: Option<String>,
        /// The Service's name.
        service: String,
        /// The Service's port name.
        port: String,
    },
}

/// What `logs` asks for: Druid's own query.
#[derive(Debug, Clone)]
pub struct LogsRequest {
    /// The task id, checked before it goes into a URL.
    pub task: String,
    /// Druid's `offset`.
    pub offset: i64,
    /// Keep printing while the task runs.
    pub follow: bool,
    /// Where to ask.
    pub via: Via,
}

/// How a `logs` request ended when the question could be asked.
#[derive(Debug)]
pub enum LogsOutcome {
    /// The log was printed.
    Printed,
    /// No one has the log: the answer's text (Druid's).
    NotFound(String),
    /// Another answer: its status and text.
    Refused(StatusCode, String),
}

/// Why `logs` could not ask or could not finish printing.
#[derive(Debug, thiserror::Error)]
pub enum LogsError {
    /// Not a task id Druid could have made.
    #[error("{0:?} is not a task id")]
    TaskId(String),
    /// No Kubernetes client (no kubeconfig, no in-cluster config).
    #[error("no Kubernetes client (a kubeconfig or --gateway URL is needed): {}", OneLine(.0))]
    Kube(#[source] Box<kube::Error>),
    /// The request could not be made or its answer was cut.
    #[error("{url}: {reason}")]
    Request {
        /// What was asked.
        url: String,
        /// Why it failed, on one line.
        reason: String,
    },
    /// stdout closed or full.
    #[error("cannot write the log: {0}")]
    Write(#[from] std::io::Error),
}

/// Asks for the log and prints it to `out` as it arrives (a follow prints until the task
/// ends or the server ends the stream).
pub fn fetch(req: &LogsRequest, out: &mut dyn Write) -> Result<LogsOutcome, LogsError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(fetch_async(req, out))
}

async fn fetch_async(req: &LogsRequest, out: &mut dyn Write) -> Result<LogsOutcome, LogsError> {
    let task = TaskId::new(req.task.clone()).map_err(|_| LogsError::TaskId(req.task.clone()))?;
    let mut path = format!(
        "/druid/indexer/v1/task/{}/log?offset={}",
        path_segment(&task),
        req.offset
    );
    if req.follow {
        path.push_str("&follow=true");
    }
    match &req.via {
        Via::Gateway { url, authorization } => {
            let url = format!("{}{path}", url.trim_end_matches('/'));
            let fail = |reason: String| LogsError::Request {
                url: url.clone(),
                reason,
            };
            let client =
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .build_http::<axum::body::Body>();
            let mut r = Request::get(&url);
            if let Some(a) = authorization {
                r = r.header(header::AUTHORIZATION, a);
            }
            let r = r
                .body(axum::body::Body::empty())
                .map_err(|e| fail(e.to_string()))?;
            let resp = client
                .request(r)
                .await
                .map_err(|e| fail(OneLine(&e).to_string()))?;
            let (parts, body) = resp.into_parts();
            print_body(&parts, body, out)
                .await
                .map_err(|e| e.or_request(&url))
        }
        Via::Kube {
            authorization,
            namespace,
            service,
            port,
        } => {
            let client = crate::kube::client()
                .await
                .map_err(|e| LogsError::Kube(Box::new(e)))?;
            let ns = namespace
                .clone()
                .unwrap_or_else(|| client.default_namespace().to_owned());
            let url = format!("/api/v1/namespaces/{ns}/services/{service}:{port}/proxy{path}");
            let mut r = Request::get(&url);
            if let Some(a) = authorization {
                r = r.header(super::upstream::PROXIED_AUTHORIZATION, a);
            }
            let r = r
                .body(kube::client::Body::empty())
                .map_err(|e| LogsError::Request {
                    url: url.clone(),
                    reason: e.to_string(),
                })?;
            let resp = client.send(r).await.map_err(|e| LogsError::Request {
                url: url.clone(),
                reason: OneLine(&e).to_string(),
            })?;
            let (parts, body) = resp.into_parts();
            print_body(&parts, body, out)
                .await
                .map_err(|e| e.or_request(&url))
        }
    }
}

/// A failure while reading or printing a body; the URL is added by the caller.
enum BodyFailure {
    Read(String),
    Write(std::io::Error),
}

impl BodyFailure {
    fn or_request(self, url: &str) -> LogsError {
        match self {
            BodyFailure::Read(reason) => LogsError::Request {
                url: url.to_owned(),
                reason: format!("the answer was cut: {reason}"),
            },
            BodyFailure::Write(e) => LogsError::Write(e),
        }
    }
}

/// A 2xx body goes to `out` frame by frame (flushed, so a follow shows lines as they come);
/// another answer's text is kept for the message.
async fn print_body<B>(
    head: &axum::http::response::Parts,
    body: B,
    out: &mut dyn Write,
) -> Result<LogsOutcome, BodyFailure>
where
    B: http_body::Body<Data = bytes::Bytes>,
    B::Error: std::error::Error + 'static,
{
    let status = head.status;
    let mut body = std::pin::pin!(body);
    if !status.is_success() {
        let mut text = Vec::new();
        while let Some(f) = body.frame().await {
            let f = f.map_err(|e| BodyFailure::Read(OneLine(&e).to_string()))?;
            if let Ok(d) = f.into_data() {
                // A page of error text is enough to say what went wrong.
                if text.len() < 64 << 10 {
                    text.extend_from_slice(&d);
                }
            }
        }
        let text = String::from_utf8_lossy(&text).into_owned();
        // Druid's 404 is text; the API server's own (no such Service, or namespace) is a JSON
        // Status, which says the way there is wrong, not that the log is missing.
        let api_status = head
            .headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
        return Ok(if status == StatusCode::NOT_FOUND && !api_status {
            LogsOutcome::NotFound(text)
        } else {
            LogsOutcome::Refused(status, text)
        });
    }
    while let Some(f) = body.frame().await {
        let f = f.map_err(|e| BodyFailure::Read(OneLine(&e).to_string()))?;
        if let Ok(d) = f.into_data() {
            out.write_all(&d).map_err(BodyFailure::Write)?;
            out.flush().map_err(BodyFailure::Write)?;
        }
    }
    Ok(LogsOutcome::Printed)
}
