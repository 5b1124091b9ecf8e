//! The agent's settings, defined once: the structs below are at the same time the TOML file
//! (serde), the `DLA_*` environment variables and the flags (clap), and `--help` (their doc
//! comments, and the defaults of [`Config::default`] appended by [`cli_args`]).
//!
//! Layers, each over the one before: the defaults, the config file, the environment, the flags.
//! The file is read by serde into a whole [`Config`] (every key optional); clap then overwrites
//! the fields whose variable or flag is given (no clap default is ever set, so nothing else is
//! touched). Flags win over the environment by clap's own rule.
//!
//! Why clap with serde rather than a layered-config crate (figment, config-rs): the flags must
//! be clap's anyway, with their help and their names (`--s3-bucket`, `NODE_NAME`), and clap
//! already reads each flag's variable; a second crate would add a second spelling of every
//! setting for the environment and still need the flags written out.
//!
//! Settings renamed when they took units keep their old names as aliases, in their old unit
//! ([`OLD_NAMES`]): `retention_secs = 3600`, `DLA_RETENTION_SECS`, `--retention-secs`. Giving a
//! setting under both names in one layer is refused.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{Arg, ArgMatches, Command, FromArgMatches};
use serde::{Deserialize, Serialize};

pub use crate::archive::s3::S3Config;
pub use crate::kube::KubeConfig;
use crate::units;

/// Every setting of the agent. In the file, every key is optional; `deny_unknown_fields`: a
/// misspelt key is an error, not a silently ignored one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// This node's name; the DaemonSet sets NODE_NAME from the downward API.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// Where the kubelet writes pod logs.
    #[arg(long)]
    pub log_root: PathBuf,
    /// Spools and the checkpoint; must survive agent restarts (a hostPath in a DaemonSet).
    #[arg(long)]
    pub state_dir: PathBuf,
    /// The container whose log is the task log.
    #[arg(long)]
    pub container: String,
    /// Longest log line kept; longer lines are cut, marked and counted.
    #[arg(long, value_name = "SIZE", value_parser = units::parse_size::<usize>)]
    #[serde(with = "units::size")]
    pub line_max_bytes: usize,
    /// Uncompressed size of a spool block, 4KiB to 64MiB: the unit of compression and of
    /// random access.
    #[arg(long, value_name = "SIZE", value_parser = units::parse_size::<usize>)]
    #[serde(with = "units::size")]
    pub block_bytes: usize,
    /// Seal a block that has held text this long even if not full.
    ///
    /// This bounds what must be read again from the source files after a crash (from its
    /// `.gz` when the kubelet compressed a rotated file meanwhile; lost only if the kubelet
    /// deleted it, `containerLogMaxFiles` rotations later).
    #[arg(long, value_name = "DURATION", value_parser = units::parse_duration)]
    #[serde(with = "units::duration")]
    pub block_max_age: Duration,
    /// gzip level of spool blocks, 0 to 9 (1 = fastest).
    #[arg(long)]
    pub compression_level: u32,
    /// How often sealed blocks and source offsets are made durable (the checkpoint).
    #[arg(long, value_name = "DURATION", value_parser = units::parse_duration)]
    #[serde(with = "units::duration")]
    pub commit_interval: Duration,
    /// Read every open file this often even without an inotify event (a safety net).
    #[arg(long, value_name = "DURATION", value_parser = units::parse_duration)]
    #[serde(with = "units::duration")]
    pub poll_interval: Duration,
    /// Rescan the whole log tree this often even without events (a safety net; at least 1s).
    #[arg(long, value_name = "DURATION", value_parser = units::parse_duration)]
    #[serde(with = "units::duration")]
    pub rescan_interval: Duration,
    /// Archive a task whose log has not grown for this long; 0 = only when its pod directory
    /// is removed or its pod ends. A task that writes more later is archived again, whole.
    #[arg(long, value_name = "DURATION", value_parser = units::parse_duration)]
    #[serde(with = "units::duration")]
    pub idle_timeout: Duration,
    /// Keep a task's spool (and serve it over HTTP) this long after its archive is complete
    /// and its pod is gone.
    #[arg(long, value_name = "DURATION", value_parser = units::parse_duration)]
    #[serde(with = "units::duration")]
    pub retention: Duration,
    /// Bound of all spools on disk; at it, reading pauses until archives free space; 0 = no
    /// bound.
    #[arg(long, value_name = "SIZE", value_parser = units::parse_size::<u64>)]
    #[serde(with = "units::size")]
    pub spool_max_bytes: u64,
    /// On SIGTERM, wait this long for archives in flight before exiting anyway.
    #[arg(long, value_name = "DURATION", value_parser = units::parse_duration)]
    #[serde(with = "units::duration")]
    pub shutdown_timeout: Duration,
    /// Address of the HTTP endpoint (task logs, /tasks, /healthz, /readyz, /metrics).
    #[arg(long)]
    pub listen: String,
    /// File with a bearer token that every request but /healthz and /readyz must present;
    /// unset: no authentication.
    #[arg(long)]
    pub auth_token_file: Option<PathBuf>,
    /// Longest a follow=true log response stays open.
    #[arg(long, value_name = "DURATION", value_parser = units::parse_duration)]
    #[serde(with = "units::duration")]
    pub follow_max: Duration,
    /// HTTP connections served at once; more are closed at once.
    #[arg(long)]
    pub http_max_connections: usize,
    /// Longest wait between two attempts of a failing archive (at least 1s).
    #[arg(long, value_name = "DURATION", value_parser = units::parse_duration)]
    #[serde(with = "units::duration")]
    pub archive_retry_max: Duration,
    /// Archive jobs (uploads) run at once.
    #[arg(long)]
    pub archive_parallel: usize,
    /// The Kubernetes pod watch that maps pods to task ids (`[kubernetes]`).
    #[command(flatten)]
    pub kubernetes: KubeConfig,
    /// Where finished logs go (`[archive]`); by flags, `--archive-dir` or `--s3-bucket` and the
    /// other `--s3-*` flags (see [`Overrides`]).
    #[arg(skip)]
    pub archive: ArchiveConfig,
    /// Format of the agent's own log lines, on stderr.
    #[arg(long, value_enum)]
    pub log_format: LogFormat,
    /// Which of the agent's own log lines are printed: a level (error, warn, info, debug,
    /// trace) or tracing directives such as "info,druid_log_agent::kube=debug". RUST_LOG, when
    /// set, wins (what a developer sets for one run overrides the deployed setting).
    #[arg(long)]
    pub log_level: String,
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
    S3(S3Config),
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

/// A directory on the node: an archive that works without any cloud, as `demo` shows.
impl Default for ArchiveConfig {
    fn default() -> Self {
        ArchiveConfig::Dir {
            dir: PathBuf::from("/var/lib/druid-log-agent/archive"),
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

/// The defaults, written once: an empty file means these, and `--help` shows them.
impl Default for Config {
    fn default() -> Self {
        Config {
            node_name: None,
            log_root: PathBuf::from("/var/log/pods"),
            state_dir: PathBuf::from("/var/lib/druid-log-agent"),
            container: "main".into(),
            line_max_bytes: 1 << 20,
            block_bytes: 64 << 10,
            block_max_age: Duration::from_secs(2),
            compression_level: 1,
            commit_interval: Duration::from_secs(1),
            poll_interval: Duration::from_secs(1),
            rescan_interval: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(600),
            retention: Duration::from_secs(3_600),
            spool_max_bytes: 4 << 30,
            shutdown_timeout: Duration::from_secs(25),
            archive_retry_max: Duration::from_secs(60),
            archive_parallel: 4,
            kubernetes: KubeConfig::default(),
            listen: "0.0.0.0:8095".into(),
            auth_token_file: None,
            follow_max: Duration::from_secs(3_600),
            http_max_connections: 256,
            archive: ArchiveConfig::default(),
            log_format: LogFormat::Text,
            log_level: "info".into(),
        }
    }
}

/// The unit an old setting name counted in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OldUnit {
    /// `_secs`.
    Seconds,
    /// `_ms`.
    Milliseconds,
}

impl OldUnit {
    fn duration(self, n: u64) -> Duration {
        match self {
            OldUnit::Seconds => Duration::from_secs(n),
            OldUnit::Milliseconds => Duration::from_millis(n),
        }
    }

    fn suffix(self) -> &'static str {
        match self {
            OldUnit::Seconds => "s",
            OldUnit::Milliseconds => "ms",
        }
    }

    fn words(self) -> &'static str {
        match self {
            OldUnit::Seconds => "seconds",
            OldUnit::Milliseconds => "milliseconds",
        }
    }
}

/// A setting's name from before durations took units, still accepted with its old meaning (a
/// whole number in its unit), so existing config files, DaemonSets and scripts keep working.
pub struct OldName {
    /// The `[section]` the key is in, if any.
    pub section: Option<&'static str>,
    /// The old key, e.g. `retention_secs`; its flag and variable follow from it
    /// (`--retention-secs`, `DLA_RETENTION_SECS`) when it had them.
    pub old: &'static str,
    /// The setting's name now, e.g. `retention`: its key in the same section, and its clap id.
    pub new: &'static str,
    /// What the old name's number counts.
    pub unit: OldUnit,
    /// Whether the old name also had a flag and a variable (some settings were file-only).
    pub had_flag: bool,
    set: fn(&mut Config, Duration),
}

macro_rules! old_name {
    ($section:expr, $old:literal => $new:ident $(. $sub:ident)*, $unit:ident, $flag:literal) => {
        OldName {
            section: $section,
            old: $old,
            new: last_ident!($new $(, $sub)*),
            unit: OldUnit::$unit,
            had_flag: $flag,
            set: |c, d| c.$new $(. $sub)* = d,
        }
    };
}

macro_rules! last_ident {
    ($only:ident) => {
        stringify!($only)
    };
    ($first:ident, $($rest:ident),+) => {
        last_ident!($($rest),+)
    };
}

/// Every old name and the setting it now names.
pub const OLD_NAMES: &[OldName] = &[
    old_name!(None, "block_max_age_ms" => block_max_age, Milliseconds, true),
    old_name!(None, "commit_interval_ms" => commit_interval, Milliseconds, true),
    old_name!(None, "poll_interval_ms" => poll_interval, Milliseconds, true),
    old_name!(None, "rescan_interval_secs" => rescan_interval, Seconds, true),
    old_name!(None, "idle_timeout_secs" => idle_timeout, Seconds, true),
    old_name!(None, "retention_secs" => retention, Seconds, true),
    old_name!(None, "shutdown_timeout_secs" => shutdown_timeout, Seconds, true),
    old_name!(None, "follow_max_secs" => follow_max, Seconds, true),
    old_name!(None, "archive_retry_max_secs" => archive_retry_max, Seconds, true),
    old_name!(Some("kubernetes"), "pending_timeout_secs" => kubernetes.pending_timeout, Seconds, true),
    old_name!(Some("kubernetes"), "deleted_retention_secs" => kubernetes.deleted_retention, Seconds, false),
];

/// Why the settings were refused; names the file, the setting and what it accepts.
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
    /// Not valid TOML, or an unknown key, or a value of the wrong type or form.
    #[error("config file {path}: {source}")]
    Parse {
        /// The config file.
        path: PathBuf,
        /// toml's error, with line and column; boxed because it is large.
        source: Box<toml::de::Error>,
    },
    /// A setting given under its old and its new name in the same layer.
    #[error(
        "{place}: {new} is given twice, as {new_given} and by its old name {old_given} (in \
         {unit}): keep one"
    )]
    BothNames {
        /// The file and line, or "flags and environment".
        place: String,
        /// The setting's name.
        new: String,
        /// How the new name was given.
        new_given: String,
        /// How the old name was given.
        old_given: String,
        /// The old name's unit.
        unit: &'static str,
    },
    /// An old name with a value other than a whole number in its unit.
    #[error(
        "config file {path}, line {line}: {old} is the old name of {new} and takes a whole \
         number of {unit}; for a duration with a unit write {new} = \"1h\" (or \"500ms\", \"2s\")"
    )]
    OldNameValue {
        /// The config file.
        path: PathBuf,
        /// Where the value is.
        line: usize,
        /// The old name.
        old: String,
        /// The new name.
        new: &'static str,
        /// The old name's unit.
        unit: &'static str,
    },
    /// An S3 setting given by a flag or variable while the archive is a directory: it would be
    /// dropped without a word.
    #[error(
        "{0} is set but the archive is a directory: set the bucket too (--s3-bucket, \
         DLA_S3_BUCKET or [archive] type = \"s3\" in the config file), or unset it"
    )]
    S3SettingForDir(String),
    /// The matches did not fit the settings (a bug: they were built from them).
    #[error("settings from flags and environment: {0}")]
    Flags(Box<clap::Error>),
    /// Parsed, but a value is out of range; the message names the setting and its range.
    #[error("config: {setting} must be {expected}")]
    OutOfRange {
        /// The setting (or settings) refused.
        setting: &'static str,
        /// What it must be.
        expected: &'static str,
    },
    /// The S3 section is incomplete or inconsistent.
    #[error("config: {0}")]
    S3(#[from] crate::archive::s3::S3ConfigError),
}

impl Config {
    /// Parses `path`. Does not validate: call [`Config::validate`] once environment variables
    /// and flags are applied on top (as [`Config::load`] does).
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text, path)
    }

    /// Parses the text of a config file, `path` naming it in errors. Old names are read as
    /// their new ones with their unit; errors keep toml's line and column.
    pub fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let parse_error = |mut source: toml::de::Error| {
            source.set_input(Some(text));
            ConfigError::Parse {
                path: path.to_owned(),
                source: Box::new(source),
            }
        };
        let mut doc = toml::de::DeTable::parse(text).map_err(parse_error)?;
        let line = |span: std::ops::Range<usize>| text[..span.start].matches('\n').count() + 1;
        for o in OLD_NAMES {
            let table = match o.section {
                None => Some(doc.get_mut()),
                Some(s) => match doc.get_mut().get_mut(s).map(|v| v.get_mut()) {
                    Some(toml::de::DeValue::Table(t)) => Some(t),
                    // Not a table: serde says so, with the line.
                    _ => None,
                },
            };
            let Some(table) = table else { continue };
            let Some((key, value)) = table.remove_entry(o.old) else {
                continue;
            };
            let full = |name: &str| match o.section {
                Some(s) => format!("{s}.{name}"),
                None => name.to_owned(),
            };
            if let Some((new_key, _)) = table.get_key_value(o.new) {
                return Err(ConfigError::BothNames {
                    place: format!(
                        "config file {}, line {}",
                        path.display(),
                        line(new_key.span())
                    ),
                    new: full(o.new),
                    new_given: full(o.new),
                    old_given: full(o.old),
                    unit: o.unit.words(),
                });
            }
            let n = match value.get_ref() {
                toml::de::DeValue::Integer(i) => u64::from_str_radix(i.as_str(), i.radix()).ok(),
                _ => None,
            };
            let Some(n) = n else {
                return Err(ConfigError::OldNameValue {
                    path: path.to_owned(),
                    line: line(value.span()),
                    old: full(o.old),
                    new: o.new,
                    unit: o.unit.words(),
                });
            };
            let text = format!("{n}{}", o.unit.suffix());
            table.insert(
                toml::Spanned::new(key.span(), o.new.into()),
                toml::Spanned::new(value.span(), toml::de::DeValue::String(text.into())),
            );
        }
        check_archive_section(doc.get_ref()).map_err(parse_error)?;
        Config::deserialize(toml::de::Deserializer::from(doc)).map_err(parse_error)
    }

    /// The settings `run` uses: the defaults, the file if any, then the environment and the
    /// flags in `overrides`; validated.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        let mut c = match file {
            Some(p) => Config::from_file(p)?,
            None => Config::default(),
        };
        overrides.apply(&mut c)?;
        c.validate()?;
        Ok(c)
    }

    /// Rejects settings that would make the agent misbehave rather than fail loudly later.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |setting, expected| Err(ConfigError::OutOfRange { setting, expected });
        if self.container.is_empty() || self.container.contains('/') {
            return bad("container", "a plain container name such as \"main\"");
        }
        if self.line_max_bytes < 1024 {
            return bad("line_max_bytes", "at least 1KiB (1024)");
        }
        if !(4096..=(64 << 20)).contains(&self.block_bytes) {
            return bad("block_bytes", "between 4KiB (4096) and 64MiB (67108864)");
        }
        if self.compression_level > 9 {
            return bad("compression_level", "0 to 9");
        }
        if !log_level_valid(&self.log_level) {
            return bad("log_level", LOG_LEVEL_EXPECTED);
        }
        if self.commit_interval.is_zero() || self.poll_interval.is_zero() {
            return bad("commit_interval and poll_interval", "positive");
        }
        if let ArchiveConfig::S3(s) = &self.archive {
            s.validate()?;
        }
        Ok(())
    }
}

/// Reads `[archive]` as the section of its `type`, for errors that point at the key. serde
/// reads a tagged enum from a buffered copy without positions, so its errors would point at
/// `[archive]` and not name the key; read this way they do. Whatever passes here, serde then
/// reads the same way.
fn check_archive_section(doc: &toml::de::DeTable<'_>) -> Result<(), toml::de::Error> {
    use toml::de::{DeValue, ValueDeserializer};
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)] // read for its errors only
    struct Dir {
        dir: PathBuf,
    }
    let Some(section) = doc.get("archive") else {
        return Ok(());
    };
    let DeValue::Table(t) = section.get_ref() else {
        return Ok(());
    };
    let mut t = t.clone();
    let kind = t.remove("type");
    let section = toml::Spanned::new(section.span(), DeValue::Table(t));
    match kind.as_ref().map(|k| k.get_ref()) {
        Some(DeValue::String(k)) if k == "s3" => {
            S3Config::deserialize(ValueDeserializer::from(section)).map(drop)
        }
        Some(DeValue::String(k)) if k == "dir" => {
            Dir::deserialize(ValueDeserializer::from(section)).map(drop)
        }
        // No or another type: serde's error says which types there are.
        _ => Ok(()),
    }
}

/// The settings given by environment variables and flags, as clap parsed them: a binary
/// flattens this into its command (`#[command(flatten)]`) and hands it to [`Config::load`].
/// It keeps clap's matches whole because which layer gave a value matters (an old name and
/// a new one in the same layer are refused; across layers the later wins).
#[derive(Debug, Clone)]
pub struct Overrides(ArgMatches);

impl FromArgMatches for Overrides {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        Ok(Overrides(m.clone()))
    }

    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        self.0 = m.clone();
        Ok(())
    }
}

impl clap::Args for Overrides {
    fn augment_args(cmd: Command) -> Command {
        cli_args(cmd)
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        cli_args(cmd)
    }
}

/// The flag of the archive directory: the one setting of an enum (`[archive] type = "dir"`),
/// which clap cannot flatten.
const ARCHIVE_DIR: &str = "archive_dir";

/// The variable of a flag: `--s3-part-bytes` reads `DLA_S3_PART_BYTES`.
pub(crate) fn env_name(long: &str) -> String {
    format!("DLA_{}", long.replace('-', "_").to_ascii_uppercase())
}

/// How a user names an argument: `--s3-endpoint (DLA_S3_ENDPOINT)`.
fn arg_name(a: &Arg) -> String {
    let long = a.get_long().unwrap_or_default();
    match a.get_env() {
        Some(env) => format!("--{long} ({})", env.to_string_lossy()),
        None => format!("--{long}"),
    }
}

/// The arguments of the S3 section, as [`cli_args`] adds them.
fn s3_args() -> Vec<Arg> {
    <S3Config as clap::Args>::augment_args(Command::new("s3"))
        .get_arguments()
        .map(|a| {
            let env = env_name(a.get_long().unwrap_or_default());
            a.clone().env(env)
        })
        .collect()
}

/// The defaults as `--help` shows them, by clap id: [`Config::default`] and
/// [`S3Config::default`] printed as `check-config` prints them.
fn help_defaults() -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut add = |t: &toml::Table| {
        for (k, v) in t {
            let shown = match v {
                toml::Value::Table(_) => continue,
                toml::Value::String(s) if s.is_empty() => continue,
                toml::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            assert!(
                out.insert(k.clone(), shown).is_none(),
                "setting {k} is named twice: clap ids must be unique"
            );
        }
    };
    let top = toml::Table::try_from(Config::default()).expect("the defaults print as TOML");
    add(&top);
    if let Some(toml::Value::Table(k)) = top.get("kubernetes") {
        add(k);
    }
    add(&toml::Table::try_from(S3Config::default()).expect("the S3 defaults print as TOML"));
    if let ArchiveConfig::Dir { dir } = ArchiveConfig::default() {
        out.insert(ARCHIVE_DIR.into(), dir.display().to_string());
    }
    out
}

/// Adds every setting to `cmd` as a flag with its `DLA_*` variable, with its default in the
/// help, and the old names as hidden flags. None is required and none has a clap default, so
/// that only what is given overrides the file.
pub fn cli_args(cmd: Command) -> Command {
    let before: BTreeSet<String> = cmd
        .get_arguments()
        .map(|a| a.get_id().to_string())
        .collect();
    let cmd = <Config as clap::Args>::augment_args(cmd)
        .arg(
            Arg::new(ARCHIVE_DIR)
                .long("archive-dir")
                .value_name("DIR")
                .value_parser(clap::value_parser!(PathBuf))
                .help(
                    "Archive finished logs as {dir}/{taskId}.log, Druid's FileTaskLogs layout \
                     ([archive] type = \"dir\"); --s3-bucket wins over it",
                ),
        )
        .args(s3_args())
        .args(OLD_NAMES.iter().filter(|o| o.had_flag).map(|o| {
            let long = o.old.replace('_', "-");
            Arg::new(o.old)
                .long(long.clone())
                .env(env_name(&long))
                .value_name(o.unit.words().to_ascii_uppercase())
                .value_parser(clap::value_parser!(u64))
                .hide(true)
        }));
    let cmd = cmd.after_help(format!(
        "A SIZE is {}.\nA DURATION is {}.",
        units::SIZE_HELP,
        units::DURATION_HELP
    ));
    let defaults = help_defaults();
    let ids = |c: Command| -> BTreeSet<String> {
        c.get_arguments().map(|a| a.get_id().to_string()).collect()
    };
    let kube = ids(<KubeConfig as clap::Args>::augment_args(Command::new("k")));
    let s3 = ids(<S3Config as clap::Args>::augment_args(Command::new("s")));
    // In the order of the file: the top-level settings, then each section under its heading.
    let mut order = 0;
    cmd.mut_args(|a| {
        let id = a.get_id().to_string();
        if before.contains(&id) || a.is_hide_set() {
            return a;
        }
        order += 1;
        let (heading, rank) = if kube.contains(&id) {
            (
                Some("Kubernetes pod watch ([kubernetes] in the config file)"),
                1000,
            )
        } else if s3.contains(&id) || id == ARCHIVE_DIR {
            (Some("Archive ([archive] in the config file)"), 2000)
        } else {
            (None, 0)
        };
        let a = a.help_heading(heading).display_order(rank + order);
        let a = match (a.get_env(), a.get_long()) {
            (None, Some(long)) => {
                let env = env_name(long);
                a.env(env)
            }
            _ => a,
        };
        let mut note = String::new();
        if let Some(d) = defaults.get(&id) {
            note.push_str(&format!(" [default: {d}]"));
        }
        if let Some(o) = OLD_NAMES.iter().find(|o| o.new == id) {
            let flag = match o.had_flag {
                true => format!(" (--{})", o.old.replace('_', "-")),
                false => String::new(),
            };
            note.push_str(&format!(
                " [old name: {}{flag}, in {}]",
                o.old,
                o.unit.words()
            ));
        }
        let help = a.get_help().map(|h| format!("{h}{note}"));
        let long_help = a.get_long_help().map(|h| format!("{h}{note}"));
        let a = a.required(false);
        let a = match help {
            Some(h) => a.help(h),
            None => a,
        };
        match long_help {
            Some(h) => a.long_help(h),
            None => a,
        }
    })
}

impl Overrides {
    /// Whether clap took a value for `id` from the command line or the environment.
    fn given(&self, id: &str) -> Option<ValueSource> {
        self.0
            .value_source(id)
            .filter(|s| *s != ValueSource::DefaultValue)
    }

    /// Puts what the environment and the flags give over `c`.
    fn apply(&self, c: &mut Config) -> Result<(), ConfigError> {
        let m = &self.0;
        c.update_from_arg_matches(m)
            .map_err(|e| ConfigError::Flags(Box::new(e)))?;
        for o in OLD_NAMES.iter().filter(|o| o.had_flag) {
            let Some(old_src) = self.given(o.old) else {
                continue;
            };
            let n = *m.get_one::<u64>(o.old).expect("a value was given");
            match self.given(o.new) {
                Some(new_src) if new_src == old_src => {
                    let long = |id: &str| id.replace('_', "-");
                    let name = |id: &str| format!("--{} ({})", long(id), env_name(&long(id)));
                    return Err(ConfigError::BothNames {
                        place: match old_src {
                            ValueSource::EnvVariable => "environment".into(),
                            _ => "flags".into(),
                        },
                        new: o.new.into(),
                        new_given: name(o.new),
                        old_given: name(o.old),
                        unit: o.unit.words(),
                    });
                }
                Some(new_src) if new_src > old_src => {}
                _ => (o.set)(c, o.unit.duration(n)),
            }
        }
        // The bucket chooses S3 over a directory and replaces only itself: an S3 section of
        // the file (endpoint, path style, region, encryption) stays, as every other flag over
        // the file setting it names.
        if self.given("bucket").is_some() {
            if let ArchiveConfig::Dir { .. } = c.archive {
                c.archive = ArchiveConfig::S3(S3Config::default());
            }
        } else if let Some(dir) = m.get_one::<PathBuf>(ARCHIVE_DIR) {
            c.archive = ArchiveConfig::Dir { dir: dir.clone() };
        }
        match &mut c.archive {
            ArchiveConfig::S3(s3) => s3
                .update_from_arg_matches(m)
                .map_err(|e| ConfigError::Flags(Box::new(e)))?,
            ArchiveConfig::Dir { .. } => {
                if let Some(a) = s3_args()
                    .iter()
                    .find(|a| self.given(a.get_id().as_str()).is_some())
                {
                    return Err(ConfigError::S3SettingForDir(arg_name(a)));
                }
            }
        }
        Ok(())
    }
}

/// What `log_level` must be, for the agent's and the gateway's refusals.
pub const LOG_LEVEL_EXPECTED: &str = "a level (error, warn, info, debug, trace) or tracing \
     directives such as \"info,druid_log_agent::kube=debug\"";

/// Whether `level` is a `log_level` the logger takes as meant. A bare word parses as a
/// directive for a target of that name ("inf" would switch all logging off without a word),
/// so a single word must be a level.
pub fn log_level_valid(level: &str) -> bool {
    let plain = !level.contains(['=', ',', ':']);
    tracing_subscriber::EnvFilter::try_new(level).is_ok()
        && (!plain
            || level
                .trim()
                .parse::<tracing_subscriber::filter::LevelFilter>()
                .is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// A command with the settings, as the binary has them.
    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        settings: Overrides,
    }

    fn parse(file: &str, args: &[&str]) -> Result<Config, ConfigError> {
        let cli = Cli::try_parse_from(std::iter::once("x").chain(args.iter().copied()))
            .map_err(|e| ConfigError::Flags(Box::new(e)))?;
        let mut c = Config::from_toml(file, Path::new("test.toml"))?;
        cli.settings.apply(&mut c)?;
        Ok(c)
    }

    #[test]
    fn empty_file_is_defaults_and_unknown_keys_fail() {
        let p = Path::new("t.toml");
        assert_eq!(Config::from_toml("", p).unwrap(), Config::default());
        let c = Config::from_toml(
            "idle_timeout_secs = 5\n[archive]\ntype = \"dir\"\ndir = \"/x\"\n",
            p,
        )
        .unwrap();
        assert_eq!(c.idle_timeout, Duration::from_secs(5));
        assert_eq!(c.archive, ArchiveConfig::Dir { dir: "/x".into() });
        assert!(Config::from_toml("idle_timeout = 5", p).is_err());
        Config::default().validate().unwrap();
    }

    /// No flag or variable has a value unless given: a clap default would silently override
    /// the file (a `bool` flag, for one, defaults to false).
    #[test]
    fn nothing_given_changes_nothing() {
        let file = "retention = \"2h\"\nblock_bytes = \"128KiB\"\n[kubernetes]\nenabled = true\n\
                    [archive]\ntype = \"s3\"\nbucket = \"b\"\npath_style = true\ngzip = true\n";
        let from_file = Config::from_toml(file, Path::new("t")).unwrap();
        assert_eq!(parse(file, &[]).unwrap(), from_file);
        let cli = Cli::try_parse_from(["x"]).unwrap();
        let given: Vec<_> = cli.settings.0.ids().map(|i| i.to_string()).collect();
        assert!(
            given
                .iter()
                .all(|i| cli.settings.0.value_source(i).is_none()),
            "values without being given: {given:?}"
        );
    }

    #[test]
    fn units_in_file_and_flags() {
        let c = parse(
            "block_max_age = \"500ms\"\nspool_max_bytes = \"2GiB\"\nline_max_bytes = 4096\n",
            &[
                "--retention",
                "90m",
                "--block-bytes",
                "128KiB",
                "--pending-timeout",
                "1m 30s",
            ],
        )
        .unwrap();
        assert_eq!(c.block_max_age, Duration::from_millis(500));
        assert_eq!(c.spool_max_bytes, 2 << 30);
        assert_eq!(c.line_max_bytes, 4096);
        assert_eq!(c.retention, Duration::from_secs(90 * 60));
        assert_eq!(c.block_bytes, 128 << 10);
        assert_eq!(c.kubernetes.pending_timeout, Duration::from_secs(90));
        // A bare number is no duration; its error says what is accepted.
        let e = parse("retention = 3600\n", &[]).unwrap_err().to_string();
        assert!(e.contains("retention") && e.contains("3600s"), "{e}");
        let e = parse("", &["--retention", "3600"]).unwrap_err().to_string();
        assert!(e.contains("--retention") && e.contains("1h"), "{e}");
        let e = parse("block_bytes = \"big\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("block_bytes") && e.contains("8MiB"), "{e}");
    }

    #[test]
    fn old_names_keep_their_unit() {
        let c = parse(
            "retention_secs = 7200\nblock_max_age_ms = 250\n[kubernetes]\n\
             pending_timeout_secs = 10\ndeleted_retention_secs = 20\n",
            &["--commit-interval-ms", "100", "--idle-timeout-secs", "5"],
        )
        .unwrap();
        assert_eq!(c.retention, Duration::from_secs(7200));
        assert_eq!(c.block_max_age, Duration::from_millis(250));
        assert_eq!(c.kubernetes.pending_timeout, Duration::from_secs(10));
        assert_eq!(c.kubernetes.deleted_retention, Duration::from_secs(20));
        assert_eq!(c.commit_interval, Duration::from_millis(100));
        assert_eq!(c.idle_timeout, Duration::from_secs(5));
        // A later layer's new name wins over an earlier layer's old one, and the reverse.
        let c = parse("retention_secs = 7200\n", &["--retention", "1m"]).unwrap();
        assert_eq!(c.retention, Duration::from_secs(60));
        let c = parse("retention = \"2h\"\n", &["--retention-secs", "60"]).unwrap();
        assert_eq!(c.retention, Duration::from_secs(60));
        // An old name takes its unit's whole number only.
        let e = parse("retention_secs = \"1h\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("retention = \"1h\""), "{e}");
    }

    #[test]
    fn both_names_in_one_layer_are_refused() {
        let e = parse("retention = \"1h\"\nretention_secs = 60\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 1") && e.contains("retention_secs"), "{e}");
        let e = parse(
            "[kubernetes]\npending_timeout_secs = 1\npending_timeout = \"1s\"\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("kubernetes.pending_timeout_secs"), "{e}");
        let e = parse("", &["--retention", "1h", "--retention-secs", "60"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--retention-secs") && e.contains("keep one"),
            "{e}"
        );
    }

    #[test]
    fn s3_flags_need_an_s3_archive() {
        let c = parse(
            "[archive]\ntype = \"s3\"\nbucket = \"a\"\nregion = \"eu-west-1\"\n",
            &["--s3-bucket", "b", "--s3-part-bytes", "16MiB"],
        )
        .unwrap();
        let ArchiveConfig::S3(s3) = &c.archive else {
            panic!("{c:?}")
        };
        assert_eq!(
            (s3.bucket.as_str(), s3.region.as_deref()),
            ("b", Some("eu-west-1"))
        );
        assert_eq!(s3.part_bytes, 16 << 20);
        let e = parse("", &["--s3-gzip", "true"]).unwrap_err().to_string();
        assert!(e.contains("--s3-gzip (DLA_S3_GZIP)"), "{e}");
    }

    /// Every setting's variable is its flag's name, so a reader of `--help` knows both.
    #[test]
    fn every_flag_has_its_variable() {
        let cmd = cli_args(Command::new("x"));
        for a in cmd.get_arguments().filter(|a| !a.is_hide_set()) {
            let long = a.get_long().unwrap();
            let env = a.get_env().unwrap().to_string_lossy().into_owned();
            if long != "node-name" {
                assert_eq!(env, env_name(long));
            }
        }
    }
}
