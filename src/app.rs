//! Starts the stages: the inotify watcher, the ingest thread that drives [`Ingest`], and the
//! archive worker on the async runtime ([`Agent`]); and, in [`run`], the pod watch and HTTP
//! around them. Stopping them is [`crate::shutdown`]'s: `run` waits for the stop signal and
//! hands every stage it started to [`Shutdown::drain`].
//!
//! Ingest runs on a thread of its own rather than on the async runtime: it does blocking file
//! I/O and CPU-bound compression, and owning its state outright keeps the hot path free of
//! locks. Everything reaches it as a [`Msg`] on one channel, so events are handled in order.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use notify::Watcher;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::archive::DirArchive;
use crate::archive::s3::S3Target;
use crate::archive::{self, Job, Outcome, Target};
use crate::config::Config;
use crate::config::{ArchiveConfig, LogFormat};
use crate::ingest::{CommitDone, CommitJob, DirWatcher, Ingest, PipelineError};
use crate::metrics::Metrics;
use crate::oneline::OneLine;
use crate::registry::Registry;
use crate::shutdown::{self, Running, Shutdown};
use crate::task::{DirNameIdentity, TaskIdentity};
use crate::{kube, serve};

/// Everything the ingest thread reacts to.
pub enum Msg {
    /// An inotify event, or a watcher error (events may be lost: the tree is rescanned).
    Fs(notify::Result<notify::Event>),
    /// The archive worker's answer to a job.
    Archive(Outcome),
    /// The commit thread finished a commit job.
    Committed(CommitDone),
    /// Stop reading, seal, commit, wait (up to the grace period) for archives in flight, commit
    /// their outcomes, and end the thread.
    Shutdown,
}

/// What an embedding program (the demo, tests) may want to hear about.
#[derive(Debug, Clone)]
pub enum AgentEvent {
    /// Each archive outcome, after ingest has recorded it (the demo waits for the `Done`s).
    Archive(Outcome),
}

struct NotifyWatcher {
    inner: notify::INotifyWatcher,
    watched: HashSet<PathBuf>,
}

impl DirWatcher for NotifyWatcher {
    fn watch(&mut self, dir: &Path) -> Result<(), notify::Error> {
        if self.watched.contains(dir) {
            return Ok(());
        }
        self.inner.watch(dir, notify::RecursiveMode::NonRecursive)?;
        self.watched.insert(dir.to_owned());
        Ok(())
    }

    fn unwatch(&mut self, dir: &Path) {
        if self.watched.remove(dir) {
            // The kernel drops the watch of a deleted directory by itself; this only tidies up.
            let _ = self.inner.unwatch(dir);
        }
    }
}

/// A running agent. Dropping it without [`Agent::shutdown`] leaves the threads running.
pub struct Agent {
    registry: Registry,
    tx: Sender<Msg>,
    ingest: JoinHandle<()>,
    /// Disconnected once the archive worker has ended (or its runtime dropped it).
    worker_done: Receiver<()>,
    shutdown_grace: Duration,
    metrics: Arc<Metrics>,
}

impl Agent {
    /// Restores state, starts watching and reading, and runs archives on `rt`. Fails if the
    /// state directory or the checkpoint cannot be used, or inotify cannot be initialised.
    pub fn start(
        cfg: &Config,
        identity: Box<dyn TaskIdentity>,
        target: Target,
        observer: Option<Sender<AgentEvent>>,
        rt: &tokio::runtime::Handle,
        metrics: Arc<Metrics>,
    ) -> Result<Agent, StartError> {
        let (tx, rx) = mpsc::channel::<Msg>();
        let fs_tx = tx.clone();
        let queued = Arc::new(Mutex::new(HashSet::<PathBuf>::new()));
        let queued_w = queued.clone();
        let inner = notify::INotifyWatcher::new(
            move |res: notify::Result<notify::Event>| {
                // The runtime writes a log line per write(2), so a busy node makes hundreds
                // of thousands of data events a second, one per line. One queued event per
                // file says all they say: the rest would only cost memory and ingest time.
                if let Some(path) = res.as_ref().ok().and_then(data_event) {
                    let mut q = queued_w.lock().unwrap_or_else(|e| e.into_inner());
                    if q.contains(path) {
                        return;
                    }
                    q.insert(path.to_owned());
                }
                let _ = fs_tx.send(Msg::Fs(res));
            },
            notify::Config::default(),
        )
        .map_err(StartError::Inotify)?;
        let watcher = NotifyWatcher {
            inner,
            watched: HashSet::new(),
        };
        // Before the checkpoint is read: a second agent must not even restore from it.
        let state_lock = lock_state_dir(&cfg.state_dir)?;
        let mut ingest = Ingest::open(cfg, identity, Box::new(watcher), metrics.clone())?;
        if let Target::Dir(d) = &target
            && let Some(h) = d.handoff()
        {
            ingest.hand_sealed_text_to(h);
        }
        let registry = ingest.registry().clone();

        let (jobs_tx, jobs_rx) = tokio::sync::mpsc::unbounded_channel::<Job>();
        // Cancelled by the ingest thread when it stops reading: the worker starts no new job.
        let stop_jobs = CancellationToken::new();
        let done_tx = std::sync::Mutex::new(tx.clone());
        let (worker_alive, worker_done) = mpsc::channel::<()>();
        let worker = archive::run_worker(
            Arc::new(target),
            jobs_rx,
            cfg.archive_parallel,
            stop_jobs.clone(),
            move |o| {
                let _ = done_tx
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .send(Msg::Archive(o));
            },
        );
        rt.spawn(async move {
            worker.await;
            drop(worker_alive);
        });

        let timing = Timing {
            poll: cfg.poll_interval,
            rescan: cfg.rescan_interval.max(Duration::from_secs(1)),
            commit: cfg.commit_interval,
            shutdown_grace: cfg.shutdown_timeout,
        };
        let shutdown_grace = timing.shutdown_grace;
        // Commits run beside ingest: their fsyncs can take hundreds of milliseconds on a busy
        // disk, and reading must not stop for them (a line is visible once read).
        let (commit_tx, commit_rx) = mpsc::channel::<CommitJob>();
        let committed_tx = tx.clone();
        std::thread::Builder::new()
            .name("commit".into())
            .spawn(move || {
                for job in commit_rx {
                    if committed_tx.send(Msg::Committed(job.run())).is_err() {
                        break;
                    }
                }
            })
            .map_err(StartError::Thread)?;
        let ingest = std::thread::Builder::new()
            .name("ingest".into())
            .spawn(move || {
                run_loop(
                    ingest, rx, queued, jobs_tx, commit_tx, stop_jobs, timing, observer,
                );
                // The ingest thread writes the last checkpoint: the directory is free after it.
                drop(state_lock);
            })
            .map_err(StartError::Thread)?;
        Ok(Agent {
            registry,
            tx,
            ingest,
            worker_done,
            shutdown_grace,
            metrics,
        })
    }

    /// The counters this agent updates: the `Arc` given to [`Agent::start`], for `/metrics`.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The tasks readers may look up.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Steps 1 and 2 of the drain (see [`crate::shutdown`]): stops reading, seals and commits,
    /// waits (up to the grace period) for the archives in flight and commits their outcomes,
    /// then lets the archive worker finish. Returns once everything is durable.
    pub fn shutdown(self) {
        let deadline = Instant::now() + self.shutdown_grace;
        let _ = self.tx.send(Msg::Shutdown);
        drop(self.tx);
        if self.ingest.join().is_err() {
            error!("ingest thread panicked");
        }
        // The ingest thread has waited for every job the worker got and closed its queue, so
        // the worker ends at once, unless the grace period ran out with uploads running: those
        // stop with the runtime, and the next agent redoes them from the checkpoint.
        let left = deadline.saturating_duration_since(Instant::now());
        if let Err(RecvTimeoutError::Timeout) = self.worker_done.recv_timeout(left) {
            warn!(
                "archive worker still running at the end of the grace period; its uploads stop with the agent"
            );
        }
    }
}

/// Why [`Agent::start`] refused to start; each message says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Another running agent holds the state directory's lock.
    #[error(
        "state directory {} is in use by another agent (it holds {}): run one agent per state directory, or stop the other one first",
        dir.display(),
        dir.join(LOCK_FILE).display()
    )]
    StateDirInUse {
        /// The state directory.
        dir: PathBuf,
    },
    /// The lock file could not be created, opened or locked (permissions, a read-only mount).
    #[error("state directory {}: cannot {op} {}: {source}", dir.display(), dir.join(LOCK_FILE).display())]
    StateDirLock {
        /// The state directory.
        dir: PathBuf,
        /// The failed step, as the message shows it ("open", "lock", ...).
        op: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// inotify could not be set up (the `fs.inotify.max_user_instances` limit, usually).
    #[error("cannot initialise inotify: {0}")]
    Inotify(notify::Error),
    /// The ingest or the commit thread could not be spawned.
    #[error("cannot start thread: {0}")]
    Thread(std::io::Error),
    /// The state directory or the checkpoint cannot be used; nothing was changed.
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
}

/// The file in the state directory whose lock says an agent uses the directory. Two agents on
/// one directory would restore the same spools and overwrite each other's checkpoint.
pub const LOCK_FILE: &str = "lock";

/// Takes the state directory for this agent: an exclusive `flock` on [`LOCK_FILE`], held as
/// long as the returned file is open. The kernel releases it when the process dies, however it
/// dies, so a crashed agent never leaves a stale lock behind.
fn lock_state_dir(dir: &Path) -> Result<std::fs::File, StartError> {
    let fail = |op, source| StartError::StateDirLock {
        dir: dir.to_owned(),
        op,
        source,
    };
    std::fs::create_dir_all(dir).map_err(|e| fail("create the directory of", e))?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(LOCK_FILE))
        .map_err(|e| fail("open", e))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StartError::StateDirInUse {
            dir: dir.to_owned(),
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(fail("lock", e)),
    }
}

struct Timing {
    poll: Duration,
    rescan: Duration,
    commit: Duration,
    shutdown_grace: Duration,
}

/// The file a data-written event is about; such events are coalesced per file while queued.
fn data_event(ev: &notify::Event) -> Option<&Path> {
    match (&ev.kind, ev.paths.as_slice()) {
        (notify::EventKind::Modify(notify::event::ModifyKind::Data(_)), [p]) => Some(p),
        _ => None,
    }
}

#[allow(clippy::too_many_arguments)]
fn run_loop(
    mut ingest: Ingest,
    rx: Receiver<Msg>,
    queued: Arc<Mutex<HashSet<PathBuf>>>,
    jobs_tx: tokio::sync::mpsc::UnboundedSender<Job>,
    commit_tx: Sender<CommitJob>,
    stop_jobs: CancellationToken,
    t: Timing,
    observer: Option<Sender<AgentEvent>>,
) {
    let start = Instant::now();
    let mut next_poll = start;
    let mut next_rescan = start + t.rescan;
    let mut in_flight = 0usize;
    // Logged once: every later job would only say it again.
    let mut worker_gone = false;
    let mut more = true;
    let mut stopping = false;
    let on_msg =
        |ingest: &mut Ingest, msg: Msg, in_flight: &mut usize, stopping: &mut bool| match msg {
            Msg::Fs(Ok(ev)) => {
                if let Some(p) = data_event(&ev) {
                    // Taken off the queue before the file is read: a write from now on
                    // queues a new event.
                    queued.lock().unwrap_or_else(|e| e.into_inner()).remove(p);
                }
                ingest.on_fs_event(&ev)
            }
            Msg::Fs(Err(e)) => ingest.on_watch_error(&OneLine(&e).to_string()),
            Msg::Archive(o) => {
                *in_flight = in_flight.saturating_sub(1);
                ingest.archive_finished(&o, Instant::now());
                if let Some(obs) = &observer {
                    let _ = obs.send(AgentEvent::Archive(o));
                }
            }
            Msg::Committed(done) => {
                ingest.finish_commit(done);
            }
            Msg::Shutdown => *stopping = true,
        };
    while !stopping {
        let now = Instant::now();
        let wait = if more || ingest.has_work_queued() {
            Duration::ZERO
        } else {
            next_poll.saturating_duration_since(now).min(t.commit)
        };
        match rx.recv_timeout(wait) {
            Ok(msg) => {
                on_msg(&mut ingest, msg, &mut in_flight, &mut stopping);
                // Take what else is queued before reading, so a burst of inotify events for
                // one file costs one read.
                for msg in rx.try_iter().take(100_000) {
                    on_msg(&mut ingest, msg, &mut in_flight, &mut stopping);
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        if stopping {
            break;
        }
        let now = Instant::now();
        if now >= next_rescan {
            ingest.scan_all();
            next_rescan = now + t.rescan;
        }
        more = ingest.process(now);
        if now >= next_poll {
            ingest.tick(now);
            next_poll = now + t.poll;
        }
        if let Some(job) = ingest.commit_job_if_due(now, t.commit)
            && let Err(mpsc::SendError(job)) = commit_tx.send(job)
        {
            // The commit thread is gone (it cannot be, short of a panic): commit here.
            ingest.finish_commit(job.run());
        }
        for job in ingest.take_archive_jobs() {
            // Only a job the worker got will be answered: one it never got must not hold up
            // the shutdown until the end of the grace period.
            if jobs_tx.send(job).is_ok() {
                in_flight += 1;
            } else if !worker_gone {
                worker_gone = true;
                error!("archive worker is gone; archives will resume after a restart");
            }
        }
    }
    info!(in_flight, "shutting down: sealing spools and committing");
    let stopped = Instant::now();
    stop_jobs.cancel();
    drop(jobs_tx);
    // The last commits must not race one still in flight over the checkpoint file.
    let commit_deadline = stopped + t.shutdown_grace.max(COMMIT_WAIT);
    while ingest.commit_in_flight() {
        match rx.recv_timeout(commit_deadline.saturating_duration_since(Instant::now())) {
            Ok(msg) => on_msg(&mut ingest, msg, &mut in_flight, &mut stopping),
            Err(_) => break,
        }
    }
    drop(commit_tx);
    // Sealed and committed before the uploads are waited for: a SIGKILL during that wait
    // (the kubelet's grace period ran out) loses nothing that was read.
    let mut committed = ingest.shutdown(shutdown::READ_DRAIN);
    let deadline = stopped + t.shutdown_grace;
    let mut outcomes = 0usize;
    while in_flight > 0 {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(msg) => {
                outcomes += usize::from(matches!(msg, Msg::Archive(_)));
                on_msg(&mut ingest, msg, &mut in_flight, &mut stopping)
            }
            Err(_) => {
                warn!(
                    in_flight,
                    "archives still running at the end of the grace period; the next agent redoes them"
                );
                break;
            }
        }
    }
    if outcomes > 0 {
        // What was archived must not be archived again by the next agent.
        committed = ingest.commit(Instant::now());
    }
    if !committed {
        error!("final checkpoint failed; the next agent re-reads from the previous one");
    }
}

/// The least the shutdown waits for a commit in flight before its own (the grace period if
/// longer).
const COMMIT_WAIT: Duration = Duration::from_secs(5);

/// Everything `run` checks before it touches the state directory, and what those checks
/// produced. `check-config` goes through the same function, so it refuses exactly what the
/// daemon refuses.
pub struct Startup {
    /// The settings, checked.
    pub cfg: Config,
    /// The bearer token the HTTP endpoint requires, read from `auth_token_file`.
    pub token: Option<String>,
    /// `listen`, resolved once so the check and the bind agree.
    pub listen: Vec<std::net::SocketAddr>,
    /// The pod watch's client and this node's name, when the watch is on.
    pub kube: Option<(::kube::Client, String)>,
}

/// Why the agent refused to start or stopped with an error; each message says what to fix.
/// `main` prints the message and then each source not already in it.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// `listen` is not a socket address and does not resolve.
    #[error(
        "listen {listen:?} is not an address to listen on, such as 0.0.0.0:8095 or [::]:8095: {source}"
    )]
    ListenAddress {
        /// The setting.
        listen: String,
        /// The resolver's error.
        source: std::io::Error,
    },
    /// `listen` resolves, to nothing.
    #[error("listen {listen:?} resolves to no address")]
    ListenNothing {
        /// The setting.
        listen: String,
    },
    /// The token file cannot be read.
    #[error("cannot read auth_token_file {}", path.display())]
    TokenFile {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The token file holds only white space: every request would be refused.
    #[error("auth_token_file {} is empty", path.display())]
    TokenEmpty {
        /// The file.
        path: PathBuf,
    },
    /// The watch is on and no node name was given: it would watch every node's pods.
    #[error(
        "the Kubernetes pod watch needs this node's name: set NODE_NAME (downward API) or --node-name"
    )]
    NoNodeName,
    /// Neither an in-cluster config nor a kubeconfig could be used.
    #[error("cannot configure the Kubernetes client (in-cluster config or KUBECONFIG)")]
    KubeClient(#[source] ::kube::Error),
    /// The async runtime or the signal handlers could not be set up (out of threads or fds).
    #[error("{0}")]
    Runtime(std::io::Error),
    /// The state directory, the checkpoint or inotify refused (see [`StartError`]).
    #[error("cannot start the agent")]
    Start(#[source] StartError),
    /// The `listen` address cannot be bound (in use, or a privileged port).
    #[error("cannot listen on {listen}")]
    Listen {
        /// The setting.
        listen: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Builds the settings and checks them against the environment. Must run on the runtime that
/// will run the pod watch: the Kubernetes client starts a task on it.
pub async fn startup(cfg: Config) -> Result<Startup, RunError> {
    let listen: Vec<_> = tokio::net::lookup_host(cfg.listen.as_str())
        .await
        .map(Iterator::collect)
        .map_err(|source| RunError::ListenAddress {
            listen: cfg.listen.clone(),
            source,
        })?;
    if listen.is_empty() {
        return Err(RunError::ListenNothing {
            listen: cfg.listen.clone(),
        });
    }
    let token = match &cfg.auth_token_file {
        Some(p) => {
            let t = std::fs::read_to_string(p).map_err(|source| RunError::TokenFile {
                path: p.clone(),
                source,
            })?;
            let t = t.trim().to_owned();
            if t.is_empty() {
                return Err(RunError::TokenEmpty { path: p.clone() });
            }
            Some(t)
        }
        None => None,
    };
    let kube = if cfg.kubernetes.is_enabled() {
        let node = cfg.node_name.clone().ok_or(RunError::NoNodeName)?;
        let client = kube::client().await.map_err(RunError::KubeClient)?;
        Some((client, node))
    } else {
        None
    };
    Ok(Startup {
        cfg,
        token,
        listen,
        kube,
    })
}

/// Runs the agent until SIGTERM or SIGINT, then drains it (see [`crate::shutdown`]).
/// `init_logging` is called once the settings passed the start-up checks, so a refused setting
/// is printed plainly.
pub fn run(cfg: Config, init_logging: impl FnOnce(LogFormat, &str)) -> Result<(), RunError> {
    // Two workers: the HTTP side and the uploads must go on while ingest keeps a core busy.
    // Blocking threads read spools for responses and uploads; a few suffice on a node agent,
    // and each thread that ever ran keeps its own malloc arena: more would only cost memory.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(4)
        .enable_all()
        .build()
        .map_err(RunError::Runtime)?;
    let shutdown = Shutdown::new();
    shutdown.on_signals(&rt).map_err(RunError::Runtime)?;
    let Startup {
        cfg,
        token,
        listen,
        kube: kube_client,
    } = rt.block_on(startup(cfg))?;
    init_logging(cfg.log_format, &cfg.log_level);
    let metrics = Arc::new(Metrics::default());
    let target = match &cfg.archive {
        ArchiveConfig::Dir { dir } => Target::Dir(DirArchive::appending(dir, metrics.clone())),
        ArchiveConfig::S3(s3) => Target::S3(rt.block_on(S3Target::new(s3.clone()))),
    };
    let mut watch = None;
    let (identity, pod_cache): (Box<dyn TaskIdentity>, _) =
        if let Some((client, node)) = kube_client {
            let cache = Arc::new(kube::PodCache::default());
            watch = Some(rt.spawn(kube::watch_pods(
                client,
                cfg.kubernetes.clone(),
                node,
                cfg.container.clone(),
                cache.clone(),
                shutdown.watch_turn(),
            )));
            let identity = kube::KubeIdentity::new(
                cache.clone(),
                &cfg.kubernetes,
                cfg.log_root.clone(),
                metrics.clone(),
            );
            (Box::new(identity), Some(cache))
        } else {
            (Box::new(DirNameIdentity), None)
        };
    let agent = Agent::start(&cfg, identity, target, None, rt.handle(), metrics)
        .map_err(RunError::Start)?;
    // Only once the state directory is locked and the checkpoint restored: a refused start
    // must not read as a started agent.
    tracing::info!(log_root = %cfg.log_root.display(), state_dir = %cfg.state_dir.display(), "agent started");
    let http = serve::Http::new(
        agent.registry().clone(),
        agent.metrics().clone(),
        serve::ServeOptions {
            token,
            follow_max: cfg.follow_max,
            max_connections: cfg.http_max_connections,
            state_dir: cfg.state_dir.clone(),
            spool_max_bytes: (cfg.spool_max_bytes > 0).then_some(cfg.spool_max_bytes),
            pod_cache,
            follow_end: shutdown.follow_turn(),
        },
    );
    let server = rt.block_on(async {
        let (listener, addr) =
            serve::bind(&listen[..])
                .await
                .map_err(|source| RunError::Listen {
                    listen: cfg.listen.clone(),
                    source,
                })?;
        tracing::info!(%addr, "listening");
        Ok::<_, RunError>(tokio::spawn(serve::serve(
            listener,
            http,
            shutdown.http_turn(),
        )))
    })?;
    rt.block_on(shutdown.requested().cancelled());
    shutdown.drain(
        &rt,
        Running {
            ingest: Box::new(move || agent.shutdown()),
            http: Some(server),
            watch,
        },
    );
    // Dropping the runtime would wait without bound for blocking work still running.
    rt.shutdown_timeout(shutdown::RUNTIME_STOP);
    Ok(())
}
