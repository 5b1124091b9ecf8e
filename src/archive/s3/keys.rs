//! What an archived object is called and how it describes itself, exactly as Druid's
//! `S3TaskLogs` builds and reads it. Pure functions: they decide where Druid finds a log, so a
//! change here moves every archive.

use std::collections::HashMap;

use crate::archive::job::Origin;
use crate::task::TaskId;

const CONTENT_TYPE: &str = "text/plain; charset=utf-8";
const GZIP_TYPE: &str = "application/gzip";

/// Object key of `task`'s log: `{prefix}/{taskId}/log`, where Druid's `S3TaskLogs` looks
/// (`log.gz` with `gzip`, which Druid does not read).
pub fn object_key(prefix: &str, task: &TaskId, gzip: bool) -> String {
    let name = if gzip { "log.gz" } else { "log" };
    format!("{prefix}/{task}/{name}")
}

/// The object's `Content-Type`: text, or with `gzip` the compressed file itself (no
/// `Content-Encoding`, so a download stays compressed).
pub fn content_type(gzip: bool) -> &'static str {
    if gzip { GZIP_TYPE } else { CONTENT_TYPE }
}

/// The object's user metadata: where the log came from (Druid's pod names are lossy, so the
/// task id is there too) and its length in text bytes (`len`; 0 when not known yet, at the
/// start of a multipart upload).
pub fn metadata(task: &TaskId, origin: &Origin, len: u64) -> HashMap<String, String> {
    let mut m = HashMap::new();
    m.insert("task-id".into(), task.to_string());
    m.insert("namespace".into(), origin.namespace.clone());
    m.insert("pod".into(), origin.pod.clone());
    m.insert("pod-uid".into(), origin.pod_uid.to_string());
    if let Some(n) = &origin.node {
        m.insert("node".into(), n.clone());
    }
    m.insert("first-seen-ms".into(), origin.first_seen_ms.to_string());
    m.insert("bytes".into(), len.to_string());
    m.insert(
        "agent".into(),
        format!("druid-log-agent/{}", env!("CARGO_PKG_VERSION")),
    );
    // Non-ASCII would not survive as an HTTP header; Kubernetes names are ASCII anyway.
    m.retain(|_, v| v.is_ascii());
    m
}
