//! The `druid-log-agent` binary: parses the command line and wires the library together.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use druid_log_agent::archive::s3::S3Config;
use druid_log_agent::config::{ArchiveConfig, Config, LogFormat};
use druid_log_agent::{app, demo};

#[derive(Parser)]
#[command(
    name = "druid-log-agent",
    version,
    about = "Ships Druid peon pod logs from this node to where Druid reads task logs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent (the DaemonSet's job).
    Run(Box<RunArgs>),
    /// Check the settings `run` would use (the config file, then the same environment
    /// variables and flags) and print them as TOML, defaults filled in. Exits non-zero with
    /// the reason for anything `run` would refuse at start. It neither opens the state
    /// directory nor binds the port, which a running agent holds.
    CheckConfig {
        /// The TOML config file (or --config / DLA_CONFIG).
        file: Option<PathBuf>,
        #[command(flatten)]
        settings: Box<RunArgs>,
    },
    /// Run the pipeline on a synthetic node in a temporary directory and check the archives
    /// byte for byte against what the synthetic peons wrote. Needs no cluster and no cloud.
    Demo {
        /// Build the demo tree here instead of a new temporary directory (it is wiped first).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Keep the tree afterwards to look at the spools and archives.
        #[arg(long)]
        keep: bool,
        /// How many peon pods to simulate.
        #[arg(long, default_value_t = 3)]
        peons: usize,
        /// Log bytes each peon writes.
        #[arg(long, default_value_t = 12 << 20)]
        bytes_per_peon: u64,
    },
}

/// Every setting of the config file can be overridden here; flags win over environment
/// variables, which win over the file, which wins over the defaults shown.
#[derive(Args)]
struct RunArgs {
    /// TOML config file; every key is optional.
    #[arg(long, env = "DLA_CONFIG")]
    config: Option<PathBuf>,
    /// This node's name [default: unset].
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// Where the kubelet writes pod logs [default: /var/log/pods].
    #[arg(long, env = "DLA_LOG_ROOT")]
    log_root: Option<PathBuf>,
    /// Spools and checkpoint; must survive restarts [default: /var/lib/druid-log-agent].
    #[arg(long, env = "DLA_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Archive finished logs as {dir}/{taskId}.log, Druid's FileTaskLogs layout
    /// [default: /var/lib/druid-log-agent/archive].
    #[arg(long, env = "DLA_ARCHIVE_DIR")]
    archive_dir: Option<PathBuf>,
    /// Archive to this S3 bucket instead of a directory (Druid's S3TaskLogs layout,
    /// s3://{bucket}/{prefix}/{taskId}/log); replaces only the bucket of the config file's S3
    /// section, whose other settings stay [default: unset].
    #[arg(long, env = "DLA_S3_BUCKET")]
    s3_bucket: Option<String>,
    /// Druid's druid.indexer.logs.s3Prefix [default: druid/indexing-logs].
    #[arg(long, env = "DLA_S3_PREFIX")]
    s3_prefix: Option<String>,
    /// AWS region [default: from the AWS chain, else us-east-1].
    #[arg(long, env = "DLA_S3_REGION")]
    s3_region: Option<String>,
    /// S3-compatible endpoint URL, e.g. http://minio:9000 [default: AWS].
    #[arg(long, env = "DLA_S3_ENDPOINT")]
    s3_endpoint: Option<String>,
    /// Path-style addressing (needed by most S3-compatible stores) [default: false].
    #[arg(long, env = "DLA_S3_PATH_STYLE")]
    s3_path_style: Option<bool>,
    /// Size of the first 1,000 multipart parts, 5 MiB to 5 GiB; later parts double every 500
    /// parts up to 5 GiB, so a log up to S3's 5 TiB fits [default: 8388608].
    #[arg(long, env = "DLA_S3_PART_BYTES")]
    s3_part_bytes: Option<u64>,
    /// Server-side encryption: AES256 or aws:kms [default: unset].
    #[arg(long, env = "DLA_S3_SSE")]
    s3_sse: Option<String>,
    /// KMS key id for aws:kms [default: the bucket's default key].
    #[arg(long, env = "DLA_S3_SSE_KMS_KEY_ID")]
    s3_sse_kms_key_id: Option<String>,
    /// Do not send the bucket-owner-full-control ACL, like Druid's disableAcl [default: false].
    #[arg(long, env = "DLA_S3_DISABLE_ACL")]
    s3_disable_acl: Option<bool>,
    /// Store logs gzip-compressed at {prefix}/{taskId}/log.gz for consumers other than Druid
    /// (Druid reads only the plain log) [default: false].
    #[arg(long, env = "DLA_S3_GZIP")]
    s3_gzip: Option<bool>,
    /// Longest wait between two attempts of a failing archive [default: 60].
    #[arg(long, env = "DLA_ARCHIVE_RETRY_MAX_SECS")]
    archive_retry_max_secs: Option<u64>,
    /// The container whose log is the task log [default: main].
    #[arg(long, env = "DLA_CONTAINER")]
    container: Option<String>,
    /// Longest line kept; longer ones are cut and marked [default: 1048576].
    #[arg(long, env = "DLA_LINE_MAX_BYTES")]
    line_max_bytes: Option<usize>,
    /// Uncompressed spool block size [default: 65536].
    #[arg(long, env = "DLA_BLOCK_BYTES")]
    block_bytes: Option<usize>,
    /// Seal a block after this long even if not full [default: 2000].
    #[arg(long, env = "DLA_BLOCK_MAX_AGE_MS")]
    block_max_age_ms: Option<u64>,
    /// gzip level of spool blocks, 0-9 [default: 1].
    #[arg(long, env = "DLA_COMPRESSION_LEVEL")]
    compression_level: Option<u32>,
    /// Checkpoint interval [default: 1000].
    #[arg(long, env = "DLA_COMMIT_INTERVAL_MS")]
    commit_interval_ms: Option<u64>,
    /// Read every open file this often even without inotify events [default: 1000].
    #[arg(long, env = "DLA_POLL_INTERVAL_MS")]
    poll_interval_ms: Option<u64>,
    /// Rescan the whole log tree this often [default: 60].
    #[arg(long, env = "DLA_RESCAN_INTERVAL_SECS")]
    rescan_interval_secs: Option<u64>,
    /// Archive a task whose log has not grown for this long; 0 = only when its pod directory
    /// is removed [default: 600].
    #[arg(long, env = "DLA_IDLE_TIMEOUT_SECS")]
    idle_timeout_secs: Option<u64>,
    /// Keep a spool this long after its archive is complete and its pod is gone [default: 3600].
    #[arg(long, env = "DLA_RETENTION_SECS")]
    retention_secs: Option<u64>,
    /// Bound of all spools on disk; at it, reading pauses until archives free space; 0 = no
    /// bound [default: 4294967296].
    #[arg(long, env = "DLA_SPOOL_MAX_BYTES")]
    spool_max_bytes: Option<u64>,
    /// On SIGTERM, wait this long for archives in flight [default: 25].
    #[arg(long, env = "DLA_SHUTDOWN_TIMEOUT_SECS")]
    shutdown_timeout_secs: Option<u64>,
    /// Address of the HTTP endpoint [default: 0.0.0.0:8095].
    #[arg(long, env = "DLA_LISTEN")]
    listen: Option<String>,
    /// File with a bearer token required on every request but /healthz and /readyz
    /// [default: unset, no authentication].
    #[arg(long, env = "DLA_AUTH_TOKEN_FILE")]
    auth_token_file: Option<PathBuf>,
    /// Longest a follow=true log response stays open [default: 3600].
    #[arg(long, env = "DLA_FOLLOW_MAX_SECS")]
    follow_max_secs: Option<u64>,
    /// HTTP connections served at once [default: 256].
    #[arg(long, env = "DLA_HTTP_MAX_CONNECTIONS")]
    http_max_connections: Option<usize>,
    /// Map pods to task ids with a watch of this node's peon pods (needs NODE_NAME and
    /// in-cluster config or KUBECONFIG) [default: on inside a cluster, off elsewhere].
    #[arg(long, env = "DLA_KUBERNETES")]
    kubernetes: Option<bool>,
    /// Label selector of peon pods [default: druid.k8s.peons=true].
    #[arg(long, env = "DLA_PEON_LABEL_SELECTOR")]
    peon_label_selector: Option<String>,
    /// Pod annotation with the exact task id [default: task.id].
    #[arg(long, env = "DLA_TASK_ID_ANNOTATION")]
    task_id_annotation: Option<String>,
    /// Hold a log directory whose pod is unknown this long before deciding on it
    /// [default: 300].
    #[arg(long, env = "DLA_PENDING_TIMEOUT_SECS")]
    pending_timeout_secs: Option<u64>,
    /// Format of the agent's own log lines [default: text].
    #[arg(long, env = "DLA_LOG_FORMAT", value_enum)]
    log_format: Option<LogFormat>,
}

impl RunArgs {
    fn config(&self) -> anyhow::Result<Config> {
        let mut c = match &self.config {
            Some(p) => Config::from_file(p)?,
            None => Config::default(),
        };
        macro_rules! set {
            ($($f:ident),*) => { $(if let Some(v) = &self.$f { c.$f = v.clone(); })* };
        }
        set!(
            log_root,
            state_dir,
            container,
            line_max_bytes,
            block_bytes,
            block_max_age_ms,
            compression_level,
            commit_interval_ms,
            poll_interval_ms,
            rescan_interval_secs,
            idle_timeout_secs,
            retention_secs,
            spool_max_bytes,
            shutdown_timeout_secs,
            log_format,
            archive_retry_max_secs,
            listen,
            follow_max_secs,
            http_max_connections
        );
        if let Some(p) = &self.auth_token_file {
            c.auth_token_file = Some(p.clone());
        }
        if let Some(n) = &self.node_name {
            c.node_name = Some(n.clone());
        }
        if let Some(k) = self.kubernetes {
            c.kubernetes.enabled = Some(k);
        }
        if let Some(v) = &self.peon_label_selector {
            c.kubernetes.label_selector = v.clone();
        }
        if let Some(v) = &self.task_id_annotation {
            c.kubernetes.task_id_annotation = v.clone();
        }
        if let Some(v) = self.pending_timeout_secs {
            c.kubernetes.pending_timeout_secs = v;
        }
        // The bucket chooses S3 over a directory and replaces only itself: an S3 section of the
        // file (endpoint, path style, region, encryption) stays, as every other flag over the
        // file setting it names.
        match (&self.s3_bucket, &self.archive_dir) {
            (Some(bucket), _) => {
                let mut s3 = match &c.archive {
                    ArchiveConfig::S3(s3) => s3.clone(),
                    ArchiveConfig::Dir { .. } => S3Config::default(),
                };
                s3.bucket = bucket.clone();
                c.archive = ArchiveConfig::S3(s3);
            }
            (None, Some(dir)) => c.archive = ArchiveConfig::Dir { dir: dir.clone() },
            (None, None) => {}
        }
        match &mut c.archive {
            ArchiveConfig::S3(s3) => {
                macro_rules! set_s3 {
                    ($($flag:ident => $field:ident),*) => {
                        $(if let Some(v) = &self.$flag { s3.$field = v.clone().into(); })*
                    };
                }
                set_s3!(s3_prefix => prefix, s3_region => region, s3_endpoint => endpoint,
                    s3_path_style => path_style, s3_part_bytes => part_bytes, s3_sse => sse,
                    s3_sse_kms_key_id => sse_kms_key_id, s3_disable_acl => disable_acl,
                    s3_gzip => gzip);
            }
            // An S3 setting without an S3 archive would be dropped without a word.
            ArchiveConfig::Dir { .. } => {
                if let Some(flag) = self.s3_setting_given() {
                    anyhow::bail!(
                        "{flag} is set but the archive is a directory: set the bucket too \
                         (--s3-bucket, DLA_S3_BUCKET or [archive] type = \"s3\" in the config \
                         file), or unset it"
                    );
                }
            }
        }
        c.validate()?;
        Ok(c)
    }

    /// The first S3 setting given by flag or environment other than the bucket, as the user
    /// would name it.
    fn s3_setting_given(&self) -> Option<&'static str> {
        [
            (self.s3_prefix.is_some(), "--s3-prefix (DLA_S3_PREFIX)"),
            (self.s3_region.is_some(), "--s3-region (DLA_S3_REGION)"),
            (
                self.s3_endpoint.is_some(),
                "--s3-endpoint (DLA_S3_ENDPOINT)",
            ),
            (
                self.s3_path_style.is_some(),
                "--s3-path-style (DLA_S3_PATH_STYLE)",
            ),
            (
                self.s3_part_bytes.is_some(),
                "--s3-part-bytes (DLA_S3_PART_BYTES)",
            ),
            (self.s3_sse.is_some(), "--s3-sse (DLA_S3_SSE)"),
            (
                self.s3_sse_kms_key_id.is_some(),
                "--s3-sse-kms-key-id (DLA_S3_SSE_KMS_KEY_ID)",
            ),
            (
                self.s3_disable_acl.is_some(),
                "--s3-disable-acl (DLA_S3_DISABLE_ACL)",
            ),
            (self.s3_gzip.is_some(), "--s3-gzip (DLA_S3_GZIP)"),
        ]
        .into_iter()
        .find_map(|(given, name)| given.then_some(name))
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => b.json().init(),
        LogFormat::Text => b.init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(*args),
        Command::CheckConfig { file, mut settings } => {
            if file.is_some() {
                settings.config = file;
            }
            check_config(&settings)
        }
        Command::Demo {
            dir,
            keep,
            peons,
            bytes_per_peon,
        } => {
            init_logging(LogFormat::Text);
            demo::run(&demo::DemoOptions {
                dir,
                keep,
                peons,
                bytes_per_peon,
            })
            .map_err(anyhow::Error::from)
            .map(|ok| {
                if ok {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            })
        }
    };
    result.unwrap_or_else(|e| {
        // Library errors already name their cause in their message; print each cause once.
        let mut msg = e.to_string();
        for cause in e.chain().skip(1) {
            let c = cause.to_string();
            if !msg.contains(&c) {
                msg.push_str(": ");
                msg.push_str(&c);
            }
        }
        eprintln!("druid-log-agent: error: {msg}");
        ExitCode::from(2)
    })
}

fn check_config(args: &RunArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let cfg = rt.block_on(app::startup(args.config()?))?.cfg;
    // The config holds no secrets itself (credentials come from the AWS chain, the token from
    // a file), so the effective settings print as they are.
    print!(
        "{}",
        toml::to_string(&cfg).context("cannot print the settings")?
    );
    match &args.config {
        Some(file) => eprintln!("{}: valid", file.display()),
        None => eprintln!("valid (no config file: defaults, environment and flags)"),
    }
    Ok(ExitCode::SUCCESS)
}

fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let cfg = args.config()?;
    app::run(cfg, init_logging)?;
    Ok(ExitCode::SUCCESS)
}
