//! `druid-log-agent gateway`: one address for every task's log (docs/gateway.md, issue 14).
//!
//! A request is answered by the agent on the task's node (found through two pod watches),
//! then the archive (the key or file the agents write, read the way Druid reads it), then
//! the overlord when one is configured, then Druid's 404.
//!
//! The settings are defined once, as the agent's are (`config.rs`): [`GatewayConfig`] is the
//! TOML file (serde), the flags and their `DLA_*` variables (clap), and `--help`.
//!
//! The modules:
//! - `archive_read`: the archive as Druid's `S3TaskLogs.streamTaskLog` and `FileTaskLogs`
//!   read it, streamed.
//! - `routes`: the routing table (task -> node -> agent) and the two watches that fill it.
//! - `upstream`: the HTTP client of calls to the agents and the overlord, with connect and
//!   first-byte timeouts.
//! - `authz`: who may read a task's log (`authorize`), with its decision cache.
//! - `handlers`: the routes, the order of answers and the metrics.

mod archive_read;
mod authz;
pub mod client;
mod handlers;
mod routes;
mod upstream;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::{ArgMatches, Command, FromArgMatches};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::config::{ArchiveConfig, LogFormat};
use crate::units;

pub use archive_read::ArchiveReadError;

/// Who may read a log through the gateway. The gateway must not open a side door around
/// Druid's own authorization, so the default asks Druid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Authorize {
    /// Ask the overlord for the task's status with the caller's `Authorization` and `Cookie`:
    /// whoever may see the task through Druid may read its log; overlord down: 503.
    Druid,
    /// The agent's bearer token check (`auth_token_file`).
    Token,
    /// Anyone who can reach the gateway: trusted networks only.
    None,
}

/// Every setting of the gateway. In the file, every key is optional; the archive is the
/// agent's `[archive]` section, as is, so one text configures where both write and read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// Address of the HTTP endpoint (task logs, /healthz, /readyz, /metrics).
    #[arg(long)]
    pub listen: String,
    /// The overlord (or router) URL, e.g. http://druid-overlord:8090: asked for logs nothing
    /// else has, and for authorization with authorize = "druid". Unset: neither.
    #[arg(long)]
    pub overlord_url: Option<String>,
    /// Who may read: druid (the overlord decides, per task, with the caller's credentials),
    /// token (auth_token_file's bearer token) or none (trusted networks only).
    #[arg(long, value_enum)]
    pub authorize: Authorize,
    /// File with the bearer token callers must present with authorize = "token".
    #[arg(long)]
    pub auth_token_file: Option<PathBuf>,
    /// How long an overlord decision (allowed or refused) is reused for the same credentials
    /// and task; 0 = ask every time.
    #[arg(long, value_name = "DURATION", value_parser = units::parse_duration)]
    #[serde(with = "units::duration")]
    pub auth_cache: Duration,
    /// Most decisions kept in the cache; when full, expired ones are dropped, and if none has
    /// expired the cache starts over (a few more questions to the overlord, never more memory).
    #[arg(long)]
    pub auth_cache_max: usize,
    /// Longest wait for a connection to an upstream (the overlord, S3).
    #[arg(long, value_name = "DURATION", value_parser = units::parse_duration)]
    #[serde(with = "units::duration")]
    pub upstream_connect_timeout: Duration,
    /// Longest wait for the first byte of an upstream's answer once connected.
    #[arg(long, value_name = "DURATION", value_parser = units::parse_duration)]
    #[serde(with = "units::duration")]
    pub upstream_first_byte_timeout: Duration,
    /// Ask the agent on the task's node first, found by watching the peon pods (every
    /// namespace) and the agents' pods (needs in-cluster config or KUBECONFIG). Unset: on
    /// inside a cluster (KUBERNETES_SERVICE_HOST is set), off elsewhere.
    #[arg(long)]
    pub kubernetes: Option<bool>,
    /// Label selector of peon pods.
    #[arg(long)]
    pub peon_label_selector: String,
    /// Peon pod annotation holding the exact task id.
    #[arg(long)]
    pub task_id_annotation: String,
    /// Label selector of the agents' pods.
    #[arg(long)]
    pub agent_label_selector: String,
    /// Namespace of the agents' pods; unset: the gateway's own (its service account's, or
    /// the kubeconfig context's).
    #[arg(long)]
    pub agent_namespace: Option<String>,
    /// Name of the agents' container port the gateway calls.
    #[arg(long)]
    pub agent_port_name: String,
    /// File with the agents' bearer token (their auth_token_file), sent to every agent.
    #[arg(long)]
    pub agent_token_file: Option<PathBuf>,
    /// How long a deleted peon pod stays mapped to its node: the agents serve a task's spool
    /// for their `retention` after its pod is gone, so the same time.
    #[arg(long, value_name = "DURATION", value_parser = units::parse_duration)]
    #[serde(with = "units::duration")]
    pub pod_retention: Duration,
    /// Where the agents archive logs (`[archive]`, the agent's section); unset: no archive
    /// is read.
    #[arg(skip)]
    pub archive: Option<ArchiveConfig>,
    /// Format of the gateway's own log lines, on stderr.
    #[arg(long, value_enum)]
    pub log_format: LogFormat,
    /// Which of the gateway's own log lines are printed: a level or tracing directives, as
    /// the agent's `log_level`; RUST_LOG, when set, wins.
    #[arg(long)]
    pub log_level: String,
}

/// The defaults, written once: an empty file means these, and `--help` shows them.
impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            listen: "0.0.0.0:8095".into(),
            overlord_url: None,
            authorize: Authorize::Druid,
            auth_token_file: None,
            auth_cache: Duration::from_secs(30),
            auth_cache_max: 10_000,
            upstream_connect_timeout: Duration::from_secs(1),
            upstream_first_byte_timeout: Duration::from_secs(10),
            kubernetes: None,
            peon_label_selector: "druid.k8s.peons=true".into(),
            task_id_annotation: "task.id".into(),
            agent_label_selector: "app.kubernetes.io/name=druid-log-agent".into(),
            agent_namespace: None,
            agent_port_name: "http".into(),
            agent_token_file: None,
            pod_retention: Duration::from_secs(3_600),
            archive: None,
            log_format: LogFormat::Text,
            log_level: "info".into(),
        }
    }
}

/// Why the gateway refused its settings or could not start; names the setting or file.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The file could not be read.
    #[error("gateway config file {path}: {source}")]
    Read {
        /// The config file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Not valid TOML, an unknown key, or a value of the wrong form.
    #[error("gateway config file {path}: {source}")]
    Parse {
        /// The config file.
        path: PathBuf,
        /// toml's error, with line and column; boxed because it is large.
        source: Box<toml::de::Error>,
    },
    /// The flags did not fit the settings (a bug: they were built from them).
    #[error("gateway settings from flags and environment: {0}")]
    Flags(Box<clap::Error>),
    /// A value the gateway cannot work with; the message says what it must be.
    #[error("gateway config: {setting} {expected}")]
    Invalid {
        /// The setting (or settings) refused.
        setting: &'static str,
        /// What it must be.
        expected: &'static str,
    },
    /// The archive section is refused as the agent would refuse it.
    #[error("gateway config: {0}")]
    Archive(#[from] crate::config::ConfigError),
    /// `listen` does not resolve.
    #[error("listen {listen:?} is not an address: {source}")]
    ListenAddr {
        /// The setting.
        listen: String,
        /// The resolver's error.
        source: std::io::Error,
    },
    /// The token file cannot be read or is empty.
    #[error("auth_token_file {}: {reason}", path.display())]
    TokenFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// No Kubernetes client could be configured (no in-cluster config, no usable kubeconfig).
    #[error("kubernetes = true but no Kubernetes client: {0}")]
    Kube(#[source] Box<kube::Error>),
    /// The runtime, the signal handlers or the listener could not be set up.
    #[error("gateway start: {0}")]
    Start(#[source] std::io::Error),
}

impl GatewayConfig {
    /// Parses the text of a gateway config file, `path` naming it in errors.
    pub fn from_toml(text: &str, path: &Path) -> Result<GatewayConfig, GatewayError> {
        toml::from_str(text).map_err(|source: toml::de::Error| GatewayError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })
    }

    /// The settings `gateway` uses: the defaults, the file if any, then the environment and
    /// the flags; validated.
    pub fn load(
        file: Option<&Path>,
        overrides: &GatewayOverrides,
    ) -> Result<GatewayConfig, GatewayError> {
        let mut c = match file {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| GatewayError::Read {
                    path: p.to_owned(),
                    source,
                })?;
                Self::from_toml(&text, p)?
            }
            None => GatewayConfig::default(),
        };
        // No flag has a clap default, so only what was given is updated.
        c.update_from_arg_matches(&overrides.0)
            .map_err(|e| GatewayError::Flags(Box::new(e)))?;
        c.validate()?;
        Ok(c)
    }

    /// Refuses settings the gateway would misbehave with rather than fail loudly later.
    pub fn validate(&self) -> Result<(), GatewayError> {
        let bad = |setting, expected| Err(GatewayError::Invalid { setting, expected });
        if let Some(url) = &self.overlord_url {
            let ok = url.parse::<axum::http::Uri>().is_ok_and(|u| {
                u.scheme_str() == Some("http") && u.authority().is_some() && u.query().is_none()
            });
            if !ok {
                return bad(
                    "overlord_url",
                    "must be an http:// URL such as http://druid-overlord:8090 (https is not \
                     supported yet)",
                );
            }
        }
        match self.authorize {
            Authorize::Druid if self.overlord_url.is_none() => {
                return bad(
                    "authorize = \"druid\"",
                    "needs overlord_url (or authorize = \"token\" or \"none\")",
                );
            }
            Authorize::Token if self.auth_token_file.is_none() => {
                return bad("authorize = \"token\"", "needs auth_token_file");
            }
            _ => {}
        }
        if self.peon_label_selector.trim().is_empty() || self.agent_label_selector.trim().is_empty()
        {
            return bad(
                "peon_label_selector and agent_label_selector",
                "must not be empty (an empty selector watches every pod)",
            );
        }
        if self.task_id_annotation.is_empty() || self.agent_port_name.is_empty() {
            return bad(
                "task_id_annotation and agent_port_name",
                "must not be empty",
            );
        }
        if !crate::config::log_level_valid(&self.log_level) {
            return bad("log_level", crate::config::LOG_LEVEL_EXPECTED);
        }
        if self.upstream_connect_timeout.is_zero() || self.upstream_first_byte_timeout.is_zero() {
            return bad(
                "upstream_connect_timeout and upstream_first_byte_timeout",
                "must be positive",
            );
        }
        match &self.archive {
            Some(ArchiveConfig::S3(s)) => s
                .validate()
                .map_err(|e| GatewayError::Archive(crate::config::ConfigError::S3(e)))?,
            Some(ArchiveConfig::Dir { .. }) | None => {}
        }
        Ok(())
    }

    /// `listen` resolved, as the check and the bind must agree on it.
    pub fn listen_addrs(&self) -> Result<Vec<std::net::SocketAddr>, GatewayError> {
        use std::net::ToSocketAddrs;
        self.listen
            .to_socket_addrs()
            .map(|a| a.collect())
            .map_err(|source| GatewayError::ListenAddr {
                listen: self.listen.clone(),
                source,
            })
    }

    /// The token callers must present with `authorize = "token"`, read from its file.
    pub fn token(&self) -> Result<Option<String>, GatewayError> {
        match (self.authorize, &self.auth_token_file) {
            (Authorize::Token, Some(p)) => read_token(p).map(Some),
            _ => Ok(None),
        }
    }

    /// The token the gateway presents to the agents, read from `agent_token_file`.
    pub fn agent_token(&self) -> Result<Option<String>, GatewayError> {
        self.agent_token_file.as_deref().map(read_token).transpose()
    }

    /// Whether to route to the node agents: as configured, or, when unset, whether the
    /// gateway runs in a pod.
    pub fn kubernetes_enabled(&self) -> bool {
        self.kubernetes
            .unwrap_or_else(|| std::env::var_os("KUBERNETES_SERVICE_HOST").is_some())
    }

    /// Everything `gateway` would refuse at start, short of binding the port: the settings,
    /// `listen` and the token file (`--check-config`).
    pub fn check(&self) -> Result<(), GatewayError> {
        self.validate()?;
        self.listen_addrs()?;
        self.token()?;
        self.agent_token()?;
        Ok(())
    }
}

/// A bearer token from its file, trimmed; an empty file is refused (it would match nothing,
/// or, sent, be refused by every agent).
fn read_token(p: &Path) -> Result<String, GatewayError> {
    let t = std::fs::read_to_string(p).map_err(|e| GatewayError::TokenFile {
        path: p.to_owned(),
        reason: e.to_string(),
    })?;
    let t = t.trim();
    if t.is_empty() {
        return Err(GatewayError::TokenFile {
            path: p.to_owned(),
            reason: "empty".into(),
        });
    }
    Ok(t.to_owned())
}

/// The gateway settings given by environment variables and flags, as clap parsed them; the
/// binary flattens this into its `gateway` command and hands it to [`GatewayConfig::load`].
#[derive(Debug, Clone)]
pub struct GatewayOverrides(ArgMatches);

impl FromArgMatches for GatewayOverrides {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        Ok(GatewayOverrides(m.clone()))
    }

    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        self.0 = m.clone();
        Ok(())
    }
}

impl clap::Args for GatewayOverrides {
    fn augment_args(cmd: Command) -> Command {
        gateway_args(cmd)
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        gateway_args(cmd)
    }
}

/// Adds every gateway setting as a flag with its `DLA_*` variable (the agent's naming rule)
/// and its default in the help; none is required and none has a clap default, so only what
/// is given overrides the file.
fn gateway_args(cmd: Command) -> Command {
    let defaults: BTreeMap<String, String> = toml::Table::try_from(GatewayConfig::default())
        .expect("the defaults print as TOML")
        .into_iter()
        .filter_map(|(k, v)| match v {
            toml::Value::String(s) => Some((k, s)),
            toml::Value::Table(_) => None,
            other => Some((k, other.to_string())),
        })
        .collect();
    let before: Vec<String> = cmd
        .get_arguments()
        .map(|a| a.get_id().to_string())
        .collect();
    <GatewayConfig as clap::Args>::augment_args(cmd)
        .mut_args(|a| {
            let id = a.get_id().to_string();
            if before.contains(&id) {
                return a;
            }
            let a = match a.get_long() {
                Some(long) => {
                    let env = crate::config::env_name(long);
                    a.env(env)
                }
                None => a,
            };
            let note = defaults
                .get(&id)
                .map(|d| format!(" [default: {d}]"))
                .unwrap_or_default();
            let help = a.get_help().map(|h| format!("{h}{note}"));
            let a = a.required(false);
            match help {
                Some(h) => a.help(h),
                None => a,
            }
        })
        .after_help(format!(
            "The archive is the agent's [archive] section of the config file.\nA DURATION is {}.",
            units::DURATION_HELP
        ))
}

/// Runs the gateway until SIGTERM or SIGINT: binds `listen`, starts the pod watches when
/// routing to the agents, serves, then stops accepting, lets the responses in flight finish
/// (at most [`crate::shutdown::HTTP_CLOSE`]) and stops the watches.
/// `init_logging` is called once the settings are known, before the first log line.
pub fn run(
    cfg: GatewayConfig,
    init_logging: impl FnOnce(LogFormat, &str),
) -> Result<(), GatewayError> {
    init_logging(cfg.log_format, &cfg.log_level);
    let listen = cfg.listen_addrs()?;
    let token = cfg.token()?;
    let agent_token = cfg.agent_token()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(GatewayError::Start)?;
    let shutdown = crate::shutdown::Shutdown::new();
    shutdown.on_signals(&rt).map_err(GatewayError::Start)?;
    if cfg.authorize == Authorize::None {
        tracing::warn!(
            "authorize = \"none\": anyone who can reach the gateway reads every task's log; \
             for trusted networks only"
        );
    }
    rt.block_on(async {
        let watches = CancellationToken::new();
        let routes = if cfg.kubernetes_enabled() {
            let client = crate::kube::client()
                .await
                .map_err(|e| GatewayError::Kube(Box::new(e)))?;
            let settings = routes::RouteSettings {
                peon_label_selector: cfg.peon_label_selector.clone(),
                task_id_annotation: cfg.task_id_annotation.clone(),
                agent_label_selector: cfg.agent_label_selector.clone(),
                agent_namespace: cfg
                    .agent_namespace
                    .clone()
                    .unwrap_or_else(|| client.default_namespace().to_owned()),
                agent_port_name: cfg.agent_port_name.clone(),
                pod_retention: cfg.pod_retention,
            };
            tracing::info!(agent_namespace = %settings.agent_namespace,
                agent_label_selector = %settings.agent_label_selector,
                peon_label_selector = %settings.peon_label_selector,
                "routing to the node agents");
            let routes = Arc::new(routes::Routes::default());
            tokio::spawn(routes::watch(
                client,
                settings,
                routes.clone(),
                watches.clone(),
            ));
            Some(routes)
        } else {
            tracing::info!("kubernetes = false: answering from the archive and the overlord only");
            None
        };
        let state = handlers::Gateway::new(&cfg, token, agent_token, routes).await;
        let app = handlers::router(Arc::new(state));
        let listener = tokio::net::TcpListener::bind(&listen[..])
            .await
            .map_err(GatewayError::Start)?;
        let addr = listener.local_addr().map_err(GatewayError::Start)?;
        tracing::info!(%addr, "listening");
        let stop = shutdown.requested().clone();
        let server = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned());
        let server = tokio::spawn(async move { server.await });
        shutdown.requested().cancelled().await;
        tracing::info!("stopping: closing HTTP");
        let _ = tokio::time::timeout(crate::shutdown::HTTP_CLOSE, server).await;
        watches.cancel();
        Ok(())
    })
}
