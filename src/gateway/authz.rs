//! `authorize = "druid"`: the overlord decides who may read a task's log, with the caller's
//! own credentials, so the gateway never serves a log the caller could not read through Druid.
//!
//! Druid guards the log endpoint with READ on the task's datasource; the task status endpoint
//! has the same guard, and is cheap. Its answer decides: 2xx serves, 401 and 403 are passed on
//! with no log byte, 400 or 404 (a task Druid does not know) is Druid's 404 with no log byte,
//! anything else (refused, timeout, 5xx, another status) is 503: fail closed. Decisions are cached per (SHA-256 of the credentials, task id) for `auth_cache`, so
//! a console polling a log does not ask the overlord each time; the credentials themselves
//! are never kept.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use sha2::{Digest, Sha256};

use super::upstream::{FORWARDED, Upstream, UpstreamError};
use crate::task::TaskId;

/// What the overlord said about a caller and a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Serve the log.
    Allow,
    /// 401 or 403: this status to the caller, no log byte.
    Deny(StatusCode),
    /// The overlord does not know the task (Druid's `TaskResourceFilter` answers 400
    /// "Cannot find any task with id"; older versions 404): no one can be granted READ on
    /// it, so nothing is served, and it is Druid's "no log", not an outage.
    Unknown,
}

/// The overlord could not decide (unreachable, timeout, 5xx): the caller gets 503.
#[derive(Debug, thiserror::Error)]
pub enum AuthzError {
    /// No answer.
    #[error("overlord authorization: {0}")]
    Upstream(#[from] UpstreamError),
    /// An answer that is neither a grant nor a refusal.
    #[error("overlord authorization: task status answered {0}")]
    Status(StatusCode),
}

type Key = ([u8; 32], TaskId);

/// The overlord's decisions, asked and cached.
pub struct DruidAuthz {
    upstream: Upstream,
    overlord: String,
    ttl: Duration,
    max: usize,
    cache: Mutex<HashMap<Key, (Decision, Instant)>>,
}

impl DruidAuthz {
    /// Asks `overlord` (its base URL) through `upstream`; keeps at most `max` decisions for
    /// `ttl` each.
    pub fn new(upstream: Upstream, overlord: &str, ttl: Duration, max: usize) -> DruidAuthz {
        DruidAuthz {
            upstream,
            overlord: overlord.trim_end_matches('/').to_owned(),
            ttl,
            max,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Whether the caller with `headers` may read `task`'s log.
    pub async fn decide(&self, task: &TaskId, headers: &HeaderMap) -> Result<Decision, AuthzError> {
        let key = (credentials_digest(headers), task.clone());
        let now = Instant::now();
        if let Some((d, at)) = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            && now.duration_since(*at) < self.ttl
        {
            return Ok(*d);
        }
        let url = format!(
            "{}/druid/indexer/v1/task/{}/status",
            self.overlord,
            super::handlers::path_segment(task)
        );
        let resp = self.upstream.get(&url, headers).await?;
        let status = resp.status();
        // The body is not needed; dropping it lets the connection go.
        drop(resp);
        let d = if status.is_success() {
            Decision::Allow
        } else if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            Decision::Deny(status)
        } else if status == StatusCode::BAD_REQUEST || status == StatusCode::NOT_FOUND {
            Decision::Unknown
        } else {
            return Err(AuthzError::Status(status));
        };
        if !self.ttl.is_zero() {
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            if cache.len() >= self.max {
                cache.retain(|_, (_, at)| now.duration_since(*at) < self.ttl);
            }
            if cache.len() >= self.max {
                // All still fresh: start over rather than grow; the cost is a few more asks.
                cache.clear();
            }
            cache.insert(key, (d, now));
        }
        Ok(d)
    }
}

/// The SHA-256 of the caller's credential headers, each named and length-prefixed so two
/// different sets never hash alike by concatenation.
fn credentials_digest(headers: &HeaderMap) -> [u8; 32] {
    let mut h = Sha256::new();
    for name in FORWARDED {
        for v in headers.get_all(&name) {
            h.update(name.as_str().as_bytes());
            h.update((v.len() as u64).to_be_bytes());
            h.update(v.as_bytes());
        }
        h.update([0]);
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::header;

    #[test]
    fn digest_tells_credentials_apart() {
        let of = |pairs: &[(header::HeaderName, &str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.append(k, v.parse().unwrap());
            }
            credentials_digest(&m)
        };
        let a = of(&[(header::AUTHORIZATION, "Basic YQ==")]);
        assert_eq!(a, of(&[(header::AUTHORIZATION, "Basic YQ==")]));
        assert_ne!(a, of(&[(header::AUTHORIZATION, "Basic Yg==")]));
        assert_ne!(a, of(&[(header::COOKIE, "Basic YQ==")]));
        assert_ne!(a, of(&[]));
    }
}
