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

pub const FILE_NAME: &str = "checkpoint.json";

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint {path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        source: io::Error,
    },
    #[error(
        "checkpoint {path} cannot be read: {source}; move it aside to start over (logs already archived may be archived again)"
    )]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// The file's top level; `version` selects the layout.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "version")]
pub enum Checkpoint {
    #[serde(rename = "1")]
    V1(State),
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct State {
    /// Wall-clock time of the commit, milliseconds since the Unix epoch.
    pub committed_at_ms: u64,
    pub tasks: Vec<TaskState>,
}

/// Identifies a file across renames and guards against inode reuse: the inode alone may be
/// handed to a new file once the old one is deleted, the first bytes of a log differ.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
pub struct FileKey {
    pub dev: u64,
    pub ino: u64,
    /// Birth time in nanoseconds (statx), 0 where the filesystem does not record it. Tells a
    /// reused inode number apart even when the file is empty and has no fingerprint yet.
    #[serde(default)]
    pub born_ns: u64,
    /// How many leading bytes `fp` covers (up to 64; fewer while the file was shorter).
    pub fp_len: u32,
    /// CRC-32 of those bytes.
    pub fp: u32,
}

/// A file read to its end and closed, and how long it was then: a rescan never reads it again
/// unless it has grown since (the runtime wrote after all), then from where reading stopped.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct DoneFile {
    #[serde(flatten)]
    pub key: FileKey,
    /// `None` in checkpoints of agents before it was recorded: such a file is never read again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub len: Option<u64>,
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
    Archived { at_ms: u64, archived_len: u64 },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SourceState {
    /// The container's restart number: `<n>` in `<n>.log`.
    pub restart: u32,
    pub key: FileKey,
    /// Next byte to read; everything before it is in the spool's committed part.
    pub offset: u64,
    /// Where the file was last seen; only a hint, the key decides.
    pub path: PathBuf,
    pub decode: FileDecodeState,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TaskState {
    /// The pod log directory name, `<namespace>_<pod>_<uid>`: the task's stable key on a node.
    pub pod_dir: String,
    pub container: String,
    pub task_id: Option<String>,
    /// Committed length of the spool file (compressed bytes).
    pub spool_file_len: u64,
    /// Bytes of log text in that committed part.
    pub log_len: u64,
    pub phase: Phase,
    /// Files still being read, in log order.
    pub sources: Vec<SourceState>,
    /// Files read to their end, so a rescan does not read them again.
    pub done: Vec<DoneFile>,
    /// Highest restart number taken into the log so far.
    pub last_restart: Option<u32>,
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
                spool_file_len: 10,
                log_len: 20,
                phase: Phase::Archived {
                    at_ms: 9,
                    archived_len: 20,
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
                    len: Some(4096),
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

    #[test]
    fn garbage_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(FILE_NAME), b"{\"version\":\"1\",\x00").unwrap();
        let e = load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("move it aside"), "{e}");
    }
}
