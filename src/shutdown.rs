//! How the agent stops: one signal, and the order in which the stages drain.
//!
//! SIGTERM (the kubelet stopping the pod) or SIGINT cancels one token, [`Shutdown::requested`].
//! No stage stops by itself on it: [`Shutdown::drain`] stops them one after the other, because
//! each step needs the ones after it still running:
//!
//! 1. ingest stops reading new events, reads what is left in open files (at most
//!    [`READ_DRAIN`]), seals every tail and commits: from here a SIGKILL loses nothing;
//! 2. the archive worker takes no new job; the uploads in flight finish (until
//!    `shutdown_timeout` after the stop) and their outcomes are committed;
//! 3. together (a follow stream's end is what lets its connection close): `follow=true`
//!    responses send what is left and end their body properly (the last lines were read in
//!    step 1, so a follower has the whole log as it was at the stop), and HTTP stops accepting
//!    and closes each connection once its response is complete (at most [`HTTP_CLOSE`]): until
//!    then Druid can still read logs;
//! 4. the pod watch stops, last (at most [`WATCH_STOP`]): ingest asks the pod cache about
//!    every pod until step 1 ends;
//! 5. `app::run` stops the runtime, waiting at most [`RUNTIME_STOP`] for blocking work.
//!
//! Each later stage waits on a token of its own ("its turn"), cancelled only by the drain: a
//! stage never decides by itself when to stop, so the order is written once, here.

use std::time::Duration;

use tokio::runtime::Runtime;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How long the final drain may read what is left in open files before the last commit: a file
/// whose pod was deleted moments ago is still open here but gone for the next agent.
pub const READ_DRAIN: Duration = Duration::from_secs(3);

/// How long closing HTTP waits for responses in flight (a large log to a slow client) before
/// their connections are cut.
pub const HTTP_CLOSE: Duration = Duration::from_secs(5);

/// How long the pod watch may take to drop its stream once told (it answers at once; the bound
/// only keeps "every step is bounded" true).
pub const WATCH_STOP: Duration = Duration::from_secs(2);

/// How long the runtime's blocking threads (a spool read for a response, a directory archive
/// write to a slow volume) may hold the exit once every stage has stopped.
pub const RUNTIME_STOP: Duration = Duration::from_secs(2);

/// The stop signal and each later stage's turn.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    requested: CancellationToken,
    follow: CancellationToken,
    http: CancellationToken,
    watch: CancellationToken,
}

impl Shutdown {
    /// A signal not given yet.
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    /// Asks the agent to stop, as SIGTERM does.
    pub fn request(&self) {
        self.requested.cancel();
    }

    /// The one stop signal: cancelled on SIGTERM, SIGINT or [`Shutdown::request`].
    pub fn requested(&self) -> &CancellationToken {
        &self.requested
    }

    /// Installs the SIGTERM and SIGINT handlers on `rt` and turns either signal into
    /// [`Shutdown::request`]. Called before anything else: a SIGTERM that came while the agent
    /// started would otherwise kill it by the default action, not stop it.
    pub fn on_signals(&self, rt: &Runtime) -> std::io::Result<()> {
        use tokio::signal::unix::{SignalKind, signal};
        let _rt = rt.enter();
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let requested = self.requested.clone();
        rt.spawn(async move {
            tokio::select! {
                _ = term.recv() => info!("SIGTERM"),
                _ = int.recv() => info!("SIGINT"),
                // Asked by other means: nothing to wait for.
                _ = requested.cancelled() => return,
            }
            requested.cancel();
        });
        Ok(())
    }

    /// Cancelled at step 3: `follow=true` responses send what is left and end.
    pub fn follow_turn(&self) -> CancellationToken {
        self.follow.clone()
    }

    /// Cancelled at step 4: HTTP stops accepting and closes its connections.
    pub fn http_turn(&self) -> CancellationToken {
        self.http.clone()
    }

    /// Cancelled at step 5: the pod watch ends (its connection to the API closes).
    pub fn watch_turn(&self) -> CancellationToken {
        self.watch.clone()
    }

    /// Drains the stages in the order above; returns once the last one stopped. Call it from
    /// a thread outside `rt` (it blocks on the ingest thread).
    pub fn drain(&self, rt: &Runtime, running: Running) {
        info!("stopping: draining ingest and the uploads in flight");
        // Steps 1 and 2: the ingest thread and the archive worker, bounded by the grace period.
        (running.ingest)();
        rt.block_on(async {
            info!("stopping: ending follow streams and closing HTTP");
            self.follow.cancel();
            self.http.cancel();
            if let Some(http) = running.http
                && tokio::time::timeout(HTTP_CLOSE, http).await.is_err()
            {
                warn!(
                    timeout_secs = HTTP_CLOSE.as_secs(),
                    "HTTP responses still in flight at the end of the shutdown; their connections are cut"
                );
            }
            self.watch.cancel();
            if let Some(watch) = running.watch
                && tokio::time::timeout(WATCH_STOP, watch).await.is_err()
            {
                warn!("the pod watch did not stop in time; leaving it");
            }
        });
        info!("stopped");
    }
}

/// The stages [`Shutdown::drain`] stops: what `app::run` started. Ingest comes as the call that
/// stops it, so this module needs nothing of the stages it orders (`app` uses it, not the other
/// way round).
pub struct Running {
    /// Stops ingest and the archive worker (steps 1 and 2) and returns once they stopped:
    /// `Agent::shutdown`.
    pub ingest: Box<dyn FnOnce() + Send>,
    /// The HTTP server; it ends once its turn came and its connections closed.
    pub http: Option<JoinHandle<()>>,
    /// The pod watch, when the Kubernetes side is on.
    pub watch: Option<JoinHandle<()>>,
}
