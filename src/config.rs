//! The agent's settings: one TOML file, then environment variables and flags on top (what a
//! DaemonSet sets per node). Every field has a default, so an empty file is a valid config.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Every setting of the agent, as read from the TOML file. `deny_unknown_fields`: a misspelt
/// key is an error, not a silently ignored one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// This node's name (the DaemonSet sets `NODE_NAME` from the downward API).
    pub node_name: Option<String>,
    /// Where the kubelet writes pod logs.
    pub log_root: PathBuf,
    /// Spools and the checkpoint; must survive agent restarts (a hostPath in a DaemonSet).
    pub state_dir: PathBuf,
    /// The container whose log is the task log.
    pub container: String,
    /// Longest log line kept; longer lines are cut, marked and counted.
    pub line_max_bytes: usize,
    /// Uncompressed size of a spool block: the unit of compression and of random access.
    pub block_bytes: usize,
    /// A block holding text for this long is sealed even if not full. This bounds what must
    /// be re-read from the source files after a crash, and must stay well below the kubelet's
    /// 10 s rotation period: a rotated file is gzipped (and gone) at the next rotation.
    pub block_max_age_ms: u64,
    /// gzip level of spool blocks (1 = fastest).
    pub compression_level: u32,
    /// How often sealed blocks and source offsets are made durable.
    pub commit_interval_ms: u64,
    /// How often every open file is read even without an inotify event (safety net).
    pub poll_interval_ms: u64,
    /// How often the whole log tree is rescanned even without events (safety net).
    pub rescan_interval_secs: u64,
    /// A task whose files have not grown for this long is archived (0 = never); it is archived
    /// again, whole, if it writes more later.
    pub idle_timeout_secs: u64,
    /// How long a task's spool is kept after its archive is complete and its pod is gone.
    pub retention_secs: u64,
    /// Upper bound of all spools on disk; at it, reading pauses (0 = no bound).
    pub spool_max_bytes: u64,
    /// On SIGTERM, how long to wait for archives in flight before exiting anyway.
    pub shutdown_timeout_secs: u64,
    /// Address of the HTTP endpoint (task logs, /tasks, /healthz, /readyz, /metrics).
    pub listen: String,
    /// File holding a bearer token that every request but the health probes must present.
    pub auth_token_file: Option<PathBuf>,
    /// Longest a `follow=true` log response stays open.
    pub follow_max_secs: u64,
    /// HTTP connections served at once; more are closed at once.
    pub http_max_connections: usize,
    /// Longest wait between two attempts of a failing archive.
    pub archive_retry_max_secs: u64,
    /// Archive jobs (uploads) run at once.
    pub archive_parallel: usize,
    /// The Kubernetes pod watch that maps pods to task ids.
    pub kubernetes: crate::kube::KubeConfig,
    /// Where finished logs go.
    pub archive: ArchiveConfig,
    /// `text` or `json` for the agent's own logs.
    pub log_format: LogFormat,
}

/// Where finished logs go: `type = "dir"` or `type = "s3"` under `[archive]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ArchiveConfig {
    /// Druid's `FileTaskLogs` layout: `{dir}/{taskId}.log`.
    Dir {
        /// The directory Druid's `druid.indexer.logs.directory` names, usually a shared
        /// volume.
        dir: PathBuf,
    },
    /// Druid's `S3TaskLogs` layout: `s3://{bucket}/{prefix}/{taskId}/log`.
    S3(crate::archive::s3::S3Config),
}

impl ArchiveConfig {
    /// The part sizes of targets that store logs in parts while tasks run: ingest asks for
    /// parts once [`crate::archive::s3::PartSizes::next_part_end`] committed bytes exist.
    pub fn part_sizes(&self) -> Option<crate::archive::s3::PartSizes> {
        match self {
            ArchiveConfig::Dir { .. } => None,
            ArchiveConfig::S3(s) => Some(crate::archive::s3::PartSizes::new(s.part_bytes)),
        }
    }
}

/// Format of the agent's own log, on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for a log collector.
    Json,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node_name: None,
            log_root: PathBuf::from("/var/log/pods"),
            state_dir: PathBuf::from("/var/lib/druid-log-agent"),
            container: "main".into(),
            line_max_bytes: 1 << 20,
            block_bytes: 64 << 10,
            block_max_age_ms: 2_000,
            compression_level: 1,
            commit_interval_ms: 1_000,
            poll_interval_ms: 1_000,
            rescan_interval_secs: 60,
            idle_timeout_secs: 600,
            retention_secs: 3_600,
            spool_max_bytes: 4 << 30,
            shutdown_timeout_secs: 25,
            archive_retry_max_secs: 60,
            archive_parallel: 4,
            kubernetes: crate::kube::KubeConfig::default(),
            listen: "0.0.0.0:8095".into(),
            auth_token_file: None,
            follow_max_secs: 3_600,
            http_max_connections: 256,
            archive: ArchiveConfig::Dir {
                dir: PathBuf::from("/var/lib/druid-log-agent/archive"),
            },
            log_format: LogFormat::Text,
        }
    }
}

/// Why a config file or setting was refused; names the file or the setting.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("config file {path}: {source}")]
    Read {
        /// The config file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Not valid TOML, or a key or a value of the wrong type.
    #[error("config file {path}: {source}")]
    Parse {
        /// The config file.
        path: PathBuf,
        /// toml's error, with line and column; boxed because it is large.
        source: Box<toml::de::Error>,
    },
    /// Parsed, but a value is out of range; the message names the setting and its range.
    #[error("config: {0}")]
    Invalid(String),
}

impl Config {
    /// Parses `path`. Does not validate: call [`Config::validate`] once environment variables
    /// and flags are applied on top.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })
    }

    /// Rejects settings that would make the agent misbehave rather than fail loudly later.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        if self.container.is_empty() || self.container.contains('/') {
            return bad("container must be a plain container name such as \"main\"");
        }
        if self.line_max_bytes < 1024 {
            return bad("line_max_bytes must be at least 1024");
        }
        if !(4096..=(64 << 20)).contains(&self.block_bytes) {
            return bad("block_bytes must be between 4096 and 67108864");
        }
        if self.compression_level > 9 {
            return bad("compression_level must be 0 to 9");
        }
        if self.commit_interval_ms == 0 || self.poll_interval_ms == 0 {
            return bad("commit_interval_ms and poll_interval_ms must be positive");
        }
        if let ArchiveConfig::S3(s) = &self.archive {
            s.validate()
                .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_defaults_and_unknown_keys_fail() {
        assert_eq!(toml::from_str::<Config>("").unwrap(), Config::default());
        let c: Config =
            toml::from_str("idle_timeout_secs = 5\n[archive]\ntype = \"dir\"\ndir = \"/x\"\n")
                .unwrap();
        assert_eq!(c.idle_timeout_secs, 5);
        assert_eq!(c.archive, ArchiveConfig::Dir { dir: "/x".into() });
        assert!(toml::from_str::<Config>("idle_timeout = 5").is_err());
        Config::default().validate().unwrap();
    }
}
