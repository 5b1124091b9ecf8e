//! The checkpoint: what the agent vouches for after a crash.
//!
//! One file, `checkpoint.json`, replaced atomically: write a temp file, fsync it, rename it over
//! the old one, fsync the directory. If the agent dies at any instant, either the old or the new
//! checkpoint is in place, and every spool byte it refers to was fsynced before it was written.
//! The format is a versioned enum so that a later agent can read an older checkpoint.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::archive::UploadState;
use crate::decode::{FileDecodeState, LineState};
use crate::spool::{LogOffset, SpoolFileOffset};
use crate::tail::SourceOffset;

/// A file's identity, defined where files are followed and re-exported here: its fields are
/// part of the checkpoint format.
pub use crate::tail::FileKey;

/// Name of the checkpoint in the state directory. Without it an agent starts from nothing:
/// it removes the spools, then reads and archives every log on the node again.
pub const FILE_NAME: &str = "checkpoint.json";

/// Why the checkpoint could not be read or replaced. At start the agent refuses to run; at a
/// commit the old checkpoint stays in place and the commit is retried.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// Reading or replacing the file failed (permissions, a full disk).
    #[error("checkpoint {path}: {op}: {source}")]
    Io {
        /// The checkpoint file.
        path: PathBuf,
        /// The failed step, as the message shows it ("read", "write", "fsync", "rename", ...).
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// The file is there but no known layout reads it (cut short by hand, or written by a newer
    /// agent with a layout this one does not know).
    #[error(
        "checkpoint {path} cannot be read: {source}; move it aside to start over (logs already archived may be archived again)"
    )]
    Parse {
        /// The checkpoint file.
        path: PathBuf,
        /// Where and why decoding failed.
        source: serde_json::Error,
    },
}

/// The file's top level; `version` selects the layout.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "version")]
pub enum Checkpoint {
    /// Layout 1, the only one so far. A new layout is a new variant; this one must stay readable.
    #[serde(rename = "1")]
    V1(State),
}

/// Everything a restart needs, as of the last commit.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct State {
    /// Wall-clock time of the commit, milliseconds since the Unix epoch.
    pub committed_at_ms: u64,
    /// One entry per task the agent still tracks, each a snapshot taken right after a seal (see
    /// [`crate::ingest`]), so its spool length and source offsets describe the same bytes.
    pub tasks: Vec<TaskState>,
}

/// A file read to its end and closed, and how long it was then: a rescan never reads it again
/// unless it has grown since (the runtime wrote after all), then from where reading stopped.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct DoneFile {
    /// Flattened: the JSON fields are the key's own, as in older checkpoints (format
    /// compatibility).
    #[serde(flatten)]
    pub key: FileKey,
    /// `None` in checkpoints of agents before it was recorded: such a file is never read again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub len: Option<SourceOffset>,
}

/// Where the lifecycle of a task stands.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case", tag = "phase")]
pub enum Phase {
    /// Sources may still grow.
    Running,
    /// All sources drained, everything sealed and committed; the archive is due.
    Ended,
    /// The archive holds exactly `archived_len` bytes of this spool.
    Archived {
        /// When the archive completed, ms since the epoch; the retention of the spool (once
        /// the pod is gone) counts from it.
        at_ms: u64,
        /// Bytes of log text the archive holds.
        archived_len: LogOffset,
    },
}

/// A file still being read, as committed: after a restart it is found again by `key` (not by
/// `path`) and read on from `offset`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SourceState {
    /// The container's restart number: `<n>` in `<n>.log`.
    pub restart: u32,
    /// The file's identity; decides which file on disk this is.
    pub key: FileKey,
    /// Next byte to read; everything before it is in the spool's committed part.
    pub offset: SourceOffset,
    /// Where the file was last seen; only a hint, the key decides.
    pub path: PathBuf,
    /// Decoder state at `offset`: a record cut across two reads continues from here.
    pub decode: FileDecodeState,
}

/// One task's committed state. A field added later must be `#[serde(default)]`, or older
/// checkpoints stop loading.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TaskState {
    /// The pod log directory name, `<namespace>_<pod>_<uid>`: the task's stable key on a node.
    pub pod_dir: String,
    /// Container directory the log is read from, recorded so that a restart with another
    /// `container` setting still reopens the same files.
    pub container: String,
    /// The task id learned for the pod, or its `_unmapped/` name (see
    /// [`crate::task::TaskId::unmapped`]); `None` while the pod is pending. Checked again on
    /// restore: an id that is no valid [`crate::task::TaskId`] makes the task pending again.
    pub task_id: Option<String>,
    /// Committed length of the spool file (compressed bytes).
    pub spool_file_len: SpoolFileOffset,
    /// Bytes of log text in that committed part.
    pub log_len: LogOffset,
    /// Where the lifecycle stands. A task that writes again after `Ended` or `Archived` is
    /// `Running` again, and is archived again, whole, when it ends.
    pub phase: Phase,
    /// Files still being read, in log order.
    pub sources: Vec<SourceState>,
    /// Files read to their end, so a rescan does not read them again.
    pub done: Vec<DoneFile>,
    /// Highest restart number taken into the log so far.
    pub last_restart: Option<u32>,
    /// The line being built on stdout and stderr (indexed by [`crate::decode::Stream`]), so the
    /// line cap and a line split across a restart come out as without one.
    pub lines: [LineState; 2],
    /// How far the archive of this log has got.
    #[serde(default)]
    pub upload: UploadState,
    /// When the agent first saw the task (ms since the epoch).
    #[serde(default)]
    pub first_seen_ms: u64,
    /// The spool of this archived task was lost; the archive alone holds its log, and its
    /// files must never be read (and archived) again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub spool_lost: bool,
}

/// Reads the checkpoint in `dir`; a missing file is an empty state (first start).
pub fn load(dir: &Path) -> Result<State, CheckpointError> {
    let path = dir.join(FILE_NAME);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(State::default()),
        Err(source) => {
            return Err(CheckpointError::Io {
                path,
                op: "read",
                source,
            });
        }
    };
    parse(&bytes).map_err(|source| CheckpointError::Parse { path, source })
}

/// Decodes the contents of a checkpoint file, any version. Split from [`load`] so that the
/// format can be tested (and fuzzed, see fuzz/) without a file.
pub fn parse(bytes: &[u8]) -> Result<State, serde_json::Error> {
    match serde_json::from_slice::<Checkpoint>(bytes)? {
        Checkpoint::V1(s) => Ok(s),
    }
}

/// The bytes [`commit`] writes for `state`: always the latest version.
pub fn encode(state: &State) -> Vec<u8> {
    serde_json::to_vec(&Checkpoint::V1(state.clone())).expect("checkpoint state always serializes")
}

/// Replaces the checkpoint in `dir` with `state`, atomically and durably. If the agent dies
/// at any instant, the old checkpoint is still whole and still matches the spools, whose
/// committed parts are never rewritten.
pub fn commit(dir: &Path, state: &State) -> Result<(), CheckpointError> {
    let path = dir.join(FILE_NAME);
    let bytes = encode(state);
    crate::durable::replace(
        &path,
        |w| {
            w.write_all(&bytes).map_err(|source| CheckpointError::Io {
                path: path.clone(),
                op: "write",
                source,
            })
        },
        |op, source| CheckpointError::Io {
            path: path.clone(),
            op,
            source,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_versioned_layout() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()).unwrap(), State::default());
        let st = State {
            committed_at_ms: 5,
            tasks: vec![TaskState {
                pod_dir: "druid_peon-1_abc".into(),
                container: "main".into(),
                task_id: Some("index_kafka_x".into()),
                spool_file_len: SpoolFileOffset::new(10),
                log_len: LogOffset::new(20),
                phase: Phase::Archived {
                    at_ms: 9,
                    archived_len: LogOffset::new(20),
                },
                sources: vec![],
                done: vec![DoneFile {
                    key: FileKey {
                        dev: 1,
                        ino: 2,
                        born_ns: 7,
                        fp_len: 64,
                        fp: 3,
                    },
                    len: Some(SourceOffset::new(4096)),
                }],
                last_restart: Some(0),
                lines: Default::default(),
                upload: UploadState::default(),
                first_seen_ms: 1,
                spool_lost: false,
            }],
        };
        commit(dir.path(), &st).unwrap();
        assert_eq!(load(dir.path()).unwrap(), st);
        let text = fs::read_to_string(dir.path().join(FILE_NAME)).unwrap();
        assert!(text.starts_with(r#"{"version":"1","#), "{text}");
    }

    /// A checkpoint of an agent that recorded drained files without their length still loads.
    #[test]
    fn done_files_without_length_load() {
        let old =
            br#"{"version":"1","committed_at_ms":1,"tasks":[{"pod_dir":"a_b_c","container":"main",
            "task_id":null,"spool_file_len":0,"log_len":0,"phase":{"phase":"running"},"sources":[],
            "done":[{"dev":1,"ino":2,"born_ns":0,"fp_len":64,"fp":3}],"last_restart":null,
            "lines":[{"len":0,"truncated":false},{"len":0,"truncated":false}]}]}"#;
        let st = parse(old).unwrap();
        assert_eq!(st.tasks[0].done[0].len, None);
        assert_eq!(st.tasks[0].done[0].key.ino, 2);
    }

    /// Offsets are types of their own in the code (source, log text, spool file) but plain
    /// numbers in the file: a checkpoint as agents before the types wrote it loads with every
    /// offset in place and is written again byte for byte.
    #[test]
    fn offsets_are_plain_numbers_in_the_file() {
        let old = concat!(
            r#"{"version":"1","committed_at_ms":1,"tasks":[{"pod_dir":"a_b_c","container":"main","#,
            r#""task_id":"t","spool_file_len":123,"log_len":456,"phase":{"phase":"running"},"#,
            r#""sources":[{"restart":0,"key":{"dev":1,"ino":2,"born_ns":3,"fp_len":64,"fp":4},"#,
            r#""offset":789,"path":"/x/0.log","decode":{"format":"cri","continuing":null}}],"#,
            r#""done":[{"dev":1,"ino":5,"born_ns":0,"fp_len":64,"fp":6,"len":4096}],"#,
            r#""last_restart":0,"lines":[{"len":0,"truncated":false},{"len":0,"truncated":false}],"#,
            r#""upload":{"upload_id":null,"parts":[],"completing":false},"first_seen_ms":7}]}"#
        );
        let st = parse(old.as_bytes()).unwrap();
        let t = &st.tasks[0];
        assert_eq!(t.spool_file_len, SpoolFileOffset::new(123));
        assert_eq!(t.log_len, LogOffset::new(456));
        assert_eq!(t.sources[0].offset, SourceOffset::new(789));
        assert_eq!(t.done[0].len, Some(SourceOffset::new(4096)));
        assert_eq!(String::from_utf8(encode(&st)).unwrap(), old);
    }

    #[test]
    fn garbage_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(FILE_NAME), b"{\"version\":\"1\",\x00").unwrap();
        let e = load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("move it aside"), "{e}");
    }
}
