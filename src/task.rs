//! Which Druid task a pod log directory belongs to.
//!
//! The pipeline asks a [`TaskIdentity`] about every pod directory it finds. Without a cluster
//! the [`DirNameIdentity`] answers from the directory name alone; the Kubernetes watch plugs in
//! behind the same trait.

use std::fmt;

/// A Druid task id, as Druid spells it (`:` and all). Checked once here so that it can be used
/// in archive names: Druid's own ids never contain `/` or NUL and never start with `.`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaskId(String);

/// A string refused as a task id; holds it for the message.
#[derive(Debug, thiserror::Error)]
#[error(
    "task id {0:?} cannot be used as an archive name (empty, over 255 bytes, or has '/', '\\', NUL or a leading '.')"
)]
pub struct BadTaskId(pub String);

impl TaskId {
    /// Checks that `id` is safe as a file or object name (not empty, at most 255 bytes, no `/`,
    /// `\` or NUL, no leading `.`); whether Druid would issue it is not checked.
    pub fn new(id: impl Into<String>) -> Result<Self, BadTaskId> {
        let id = id.into();
        let bad = id.is_empty()
            || id.len() > 255
            || id.starts_with('.')
            || id.bytes().any(|b| b == b'/' || b == 0 || b == b'\\');
        if bad {
            Err(BadTaskId(id))
        } else {
            Ok(TaskId(id))
        }
    }

    /// The id as Druid spells it.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The archive name of a peon whose task id could not be learned:
    /// `_unmapped/<namespace>_<pod>_<uid>`. Never a valid Druid task id (it has a `/`), so it
    /// can never collide with one, nor be asked for over HTTP.
    pub fn unmapped(pod: &PodDir) -> TaskId {
        TaskId(format!("_unmapped/{}", pod.name))
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A pod's `metadata.uid`: what the cache is keyed by, and the last part of the pod's log
/// directory name (`<namespace>_<pod>_<uid>`). Unlike the name, it is never reused: a pod
/// created again under the same name is another pod, with another log.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct PodUid(String);

impl PodUid {
    /// The uid as the API and the directory name spell it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<String> for PodUid {
    fn from(uid: String) -> PodUid {
        PodUid(uid)
    }
}

impl From<&str> for PodUid {
    fn from(uid: &str) -> PodUid {
        PodUid(uid.to_owned())
    }
}

/// Lets the cache and the pending maps be asked with the uid of a `PodDir` as it is.
impl std::borrow::Borrow<str> for PodUid {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PodUid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A kubelet pod log directory, `<namespace>_<pod>_<uid>`. Kubernetes names and uids never
/// contain `_`, so the split is exact.
///
/// The key of a task in the engine: only a name that parses is one, so every task, spool and
/// checkpoint entry has a valid name. Compared, ordered and hashed by `name` alone (which
/// determines the other fields), so that a map keyed by it is looked up with the `&str` of a
/// directory entry or an event's path ([`Borrow<str>`](std::borrow::Borrow)).
#[derive(Debug, Clone)]
pub struct PodDir {
    /// The whole directory name: the task's key in the engine, the checkpoint and spool names.
    pub name: String,
    /// Kubernetes namespace of the pod.
    pub namespace: String,
    /// Pod name; Druid derives it from the task id lossily, so it is no substitute for the id.
    pub pod: String,
    /// Pod uid: tells apart pods of one name over time; the key of the Kubernetes pod cache.
    pub uid: PodUid,
}

impl PodDir {
    /// `None` for anything that is not a pod directory name, including names with characters
    /// Kubernetes never uses: the name becomes part of a spool file name.
    pub fn parse(name: &str) -> Option<PodDir> {
        let ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 253
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
                && !s.starts_with('.')
        };
        let mut it = name.split('_');
        let (ns, pod, uid) = (it.next()?, it.next()?, it.next()?);
        if it.next().is_some() || !ok(ns) || !ok(pod) || !ok(uid) {
            return None;
        }
        Some(PodDir {
            name: name.to_owned(),
            namespace: ns.to_owned(),
            pod: pod.to_owned(),
            uid: PodUid::from(uid),
        })
    }
}

impl PartialEq for PodDir {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

impl Eq for PodDir {}

impl PartialOrd for PodDir {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for PodDir {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.name.cmp(&other.name)
    }
}

impl std::hash::Hash for PodDir {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.name.hash(state);
    }
}

impl std::borrow::Borrow<str> for PodDir {
    fn borrow(&self) -> &str {
        &self.name
    }
}

impl fmt::Display for PodDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

/// What is known about a pod directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// A peon running this task: read and archive its log.
    Task(TaskId),
    /// Not known yet: hold the files open so they cannot vanish, but do not read them.
    Pending,
    /// Not a peon: never read.
    Ignore,
}

/// As log lines show it: the task id, or `pending`, or `not-a-peon`, one word each so a
/// log query can match the value.
impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Task(id) => id.fmt(f),
            Identity::Pending => f.write_str("pending"),
            Identity::Ignore => f.write_str("not-a-peon"),
        }
    }
}

/// The seam between the log pipeline and whatever knows which pod runs which task.
pub trait TaskIdentity: Send {
    /// What the pod directory is: a task, not known yet, or not a peon. Called for every
    /// directory found and again while it is pending, so it must be cheap (no API request).
    fn identify(&mut self, pod: &PodDir) -> Identity;

    /// Whether the pod's log container will not run again (its files will not grow once read
    /// to their end). The pipeline also ends a task when its directory is removed or it has
    /// been idle for too long.
    fn container_finished(&mut self, _pod: &PodDir) -> bool {
        false
    }

    /// Whether the pod is now known to be a peon: a directory let go as "not a peon" is taken
    /// back (and read from the start of its files) when its pod turns up after all.
    fn is_peon(&mut self, _pod: &PodDir) -> bool {
        false
    }
}

/// The no-cluster default: the task id is the pod name. Druid derives pod names from task ids
/// lossily (lower-cased, shortened), so this is for demos and nodes without API access; the
/// Kubernetes identity reads the exact id from the `task.id` annotation.
#[derive(Debug, Default, Clone, Copy)]
pub struct DirNameIdentity;

impl TaskIdentity for DirNameIdentity {
    fn identify(&mut self, pod: &PodDir) -> Identity {
        match TaskId::new(pod.pod.clone()) {
            Ok(id) => Identity::Task(id),
            Err(_) => Identity::Ignore,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_dir_names() {
        let p =
            PodDir::parse("druid_index-kafka-abc-1_0f1e2d3c-aaaa-bbbb-cccc-000000000001").unwrap();
        assert_eq!(p.namespace, "druid");
        assert_eq!(p.pod, "index-kafka-abc-1");
        for bad in [
            "a_b", "a_b_c_d", "A_b_c", "a__c", "../x_y_z", "a_b_c\0", "a_.._c",
        ] {
            assert!(PodDir::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn task_ids() {
        assert!(TaskId::new("index_kafka_wiki_2024-01-01T00:00:00.000Z_abc").is_ok());
        for bad in ["", ".", "..", "a/b", "a\0b", ".hidden"] {
            assert!(TaskId::new(bad).is_err(), "{bad:?}");
        }
    }
}
