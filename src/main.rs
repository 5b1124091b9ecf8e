//! The `druid-log-agent` binary: parses the command line and wires the library together.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use druid_log_agent::config::{Config, LogFormat, Overrides};
use druid_log_agent::gateway::{GatewayConfig, GatewayOverrides};
use druid_log_agent::oneline::OneLine;
use druid_log_agent::{app, demo, gateway};

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
    /// variables and flags) and print them as TOML, defaults filled in, durations and sizes
    /// with their units and every setting under its current name. Exits non-zero with
    /// the reason for anything `run` would refuse at start. It neither opens the state
    /// directory nor binds the port, which a running agent holds.
    CheckConfig {
        /// The TOML config file (or --config / DLA_CONFIG).
        file: Option<PathBuf>,
        #[command(flatten)]
        settings: Box<RunArgs>,
    },
    /// Run the cluster gateway: Druid's task-log API for every task of the cluster, answered
    /// from the archive the agents write, then the overlord (docs/gateway.md).
    Gateway(Box<GatewayArgs>),
    /// Print a task's log: through the Kubernetes API server's proxy to the gateway Service
    /// (the kubeconfig's credentials), or from --gateway URL. Exit 0 when printed; 1 with
    /// Druid's not-found text on stderr when no one has the log; 2 for any other failure.
    Logs(LogsArgs),
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
/// variables, which win over the file, which wins over the defaults shown. The flags, their
/// variables and their help come from the settings themselves (`druid_log_agent::config`).
#[derive(Args)]
struct RunArgs {
    /// TOML config file; every key is optional.
    #[arg(long, env = "DLA_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: Overrides,
}

/// The gateway's settings: its config file, then environment variables, then flags.
#[derive(Args)]
struct GatewayArgs {
    /// TOML config file; every key is optional, the archive is the agent's [archive] section.
    #[arg(long, env = "DLA_CONFIG")]
    config: Option<PathBuf>,
    /// Check the settings the gateway would use and print them as TOML, defaults filled in;
    /// exits non-zero with the reason for anything it would refuse at start. Binds nothing.
    #[arg(long)]
    check_config: bool,
    #[command(flatten)]
    settings: GatewayOverrides,
}

/// `logs`: the task and Druid's query, and where to ask.
#[derive(Args)]
struct LogsArgs {
    /// The task id (Druid's, e.g. index_kafka_wikipedia_abc_2024-05-01T00:00:00.000Z).
    task_id: String,
    /// Keep printing while the task runs; ends when the task's log ends.
    #[arg(long, short = 'f')]
    follow: bool,
    /// Druid's offset: from this byte, or, negative, this many bytes from the end.
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    offset: i64,
    /// Ask this gateway (http://host:port) directly instead of through the API server.
    #[arg(long, env = "DLA_GATEWAY_URL")]
    gateway: Option<String>,
    /// The Authorization header's value for the gateway (Druid's credentials, e.g. "Basic ...",
    /// or "Bearer TOKEN" for a gateway with authorize = "token"). Through the API server it goes
    /// as X-Druid-Authorization, since the API server consumes Authorization.
    #[arg(long, env = "DLA_AUTHORIZATION", hide_env_values = true)]
    authorization: Option<String>,
    /// The gateway Service's namespace; default: the kubeconfig context's.
    #[arg(long, short = 'n')]
    namespace: Option<String>,
    /// The gateway Service's name.
    #[arg(long, default_value = "druid-log-gateway")]
    service: String,
    /// The gateway Service's port name.
    #[arg(long, default_value = "http")]
    service_port: String,
}

impl RunArgs {
    fn config(&self) -> anyhow::Result<Config> {
        Ok(Config::load(self.config.as_deref(), &self.settings)?)
    }
}

/// `RUST_LOG` when set, else `level` (the `log_level` setting, checked by the settings). JSON
/// lines carry the message and the fields at the top level, where log pipelines look.
fn init_logging(format: LogFormat, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => b
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
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
        Command::Gateway(args) => run_gateway(*args),
        Command::Logs(args) => logs(args),
        Command::Demo {
            dir,
            keep,
            peons,
            bytes_per_peon,
        } => {
            init_logging(LogFormat::Text, "info");
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
        eprintln!("druid-log-agent: error: {}", OneLine(e.as_ref()));
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

fn logs(args: LogsArgs) -> anyhow::Result<ExitCode> {
    use druid_log_agent::gateway::client::{LogsOutcome, LogsRequest, Via, fetch};
    let via = match args.gateway {
        Some(url) => Via::Gateway {
            url,
            authorization: args.authorization,
        },
        None => Via::Kube {
            authorization: args.authorization,
            namespace: args.namespace,
            service: args.service,
            port: args.service_port,
        },
    };
    let req = LogsRequest {
        task: args.task_id,
        offset: args.offset,
        follow: args.follow,
        via,
    };
    match fetch(&req, &mut std::io::stdout().lock())? {
        LogsOutcome::Printed => Ok(ExitCode::SUCCESS),
        LogsOutcome::NotFound(text) => {
            eprint!("{text}");
            Ok(ExitCode::from(1))
        }
        LogsOutcome::Refused(status, text) => {
            eprintln!("druid-log-agent: {status}: {}", text.trim_end());
            Ok(ExitCode::from(2))
        }
    }
}

fn run_gateway(args: GatewayArgs) -> anyhow::Result<ExitCode> {
    let cfg = GatewayConfig::load(args.config.as_deref(), &args.settings)?;
    if args.check_config {
        cfg.check()?;
        print!(
            "{}",
            toml::to_string(&cfg).context("cannot print the settings")?
        );
        eprintln!("valid");
        return Ok(ExitCode::SUCCESS);
    }
    gateway::run(cfg, init_logging)?;
    Ok(ExitCode::SUCCESS)
}
