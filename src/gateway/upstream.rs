//! The HTTP client of the gateway's calls to the node agents and the overlord: one pooled hyper-util client (the
//! HTTP stack the agent already has) with a connect timeout, and a first-byte timeout on
//! every call, so a dead upstream costs a fallback or a 503, never a hang.

use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, Request, Response, header};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// Why an upstream call gave no answer; the kind is what the metrics count.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Refused, reset, or no connection within the connect timeout.
    #[error("{url}: {source}")]
    Connect {
        /// What was asked.
        url: String,
        /// The client's error.
        source: hyper_util::client::legacy::Error,
    },
    /// Connected, but no answer within the first-byte timeout.
    #[error("{url}: no answer within {}", humantime::format_duration(*timeout))]
    FirstByte {
        /// What was asked.
        url: String,
        /// The timeout.
        timeout: Duration,
    },
    /// The URL built from the settings and a checked task id is not a URI (a bug).
    #[error("{url}: not a request: {reason}")]
    Request {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
}

impl UpstreamError {
    /// The metric label of the failure.
    pub fn kind(&self) -> &'static str {
        match self {
            UpstreamError::Connect { .. } => "connect",
            UpstreamError::FirstByte { .. } => "timeout",
            UpstreamError::Request { .. } => "request",
        }
    }
}

/// The header that carries a caller's `Authorization` through the API server's service
/// proxy, which consumes `Authorization` itself (`druid-log-agent logs` sends it).
pub const PROXIED_AUTHORIZATION: &str = "x-druid-authorization";

/// The caller's credentials, passed to the overlord as they came: Druid decides with them.
pub const FORWARDED: [header::HeaderName; 2] = [header::AUTHORIZATION, header::COOKIE];

/// A client with the gateway's timeouts.
#[derive(Clone)]
pub struct Upstream {
    client: Client<HttpConnector, Body>,
    first_byte: Duration,
}

impl Upstream {
    /// A pooled HTTP/1 client that gives up connecting after `connect` and waiting for an
    /// answer's head after `first_byte`.
    pub fn new(connect: Duration, first_byte: Duration) -> Upstream {
        let mut conn = HttpConnector::new();
        conn.set_connect_timeout(Some(connect));
        conn.set_nodelay(true);
        Upstream {
            client: Client::builder(TokioExecutor::new()).build(conn),
            first_byte,
        }
    }

    /// `GET url` with the caller's credential headers from `caller`; the answer's body is
    /// left to stream (dropping it closes the connection).
    pub async fn get(
        &self,
        url: &str,
        caller: &HeaderMap,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let mut req = Request::get(url);
        for name in FORWARDED {
            for v in caller.get_all(&name) {
                req = req.header(&name, v);
            }
        }
        self.send(url, req).await
    }

    /// `GET url` of a node agent, with the agents' bearer token and none of the caller's
    /// credentials (an agent knows only its own token; a caller's password stays with Druid).
    pub async fn get_agent(
        &self,
        url: &str,
        token: Option<&str>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let mut req = Request::get(url);
        if let Some(t) = token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        self.send(url, req).await
    }

    async fn send(
        &self,
        url: &str,
        req: axum::http::request::Builder,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let req = req
            .body(Body::empty())
            .map_err(|e| UpstreamError::Request {
                url: url.to_owned(),
                reason: e.to_string(),
            })?;
        match tokio::time::timeout(self.first_byte, self.client.request(req)).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(source)) => Err(UpstreamError::Connect {
                url: url.to_owned(),
                source,
            }),
            Err(_) => Err(UpstreamError::FirstByte {
                url: url.to_owned(),
                timeout: self.first_byte,
            }),
        }
    }
}
