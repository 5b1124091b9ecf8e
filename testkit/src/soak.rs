//! Soak of the real agent binary under load and faults, ending in a per-task ledger.
//!
//! The `soak` tool (tools/, `cargo run --release -p druid-log-agent-tools --bin soak -- --help`)
//! and the short soak test (tests/it/soak.rs) both call [`run`]. On a temporary node it runs many
//! peon log writers with kubelet-style rotation (remove excess, gzip, rename, late writes),
//! starts and ends tasks continuously through a fake Kubernetes API (pods with `task.id`, their status as a kubelet
//! reports it: `PodModel`), and archives through a fault proxy to a moto S3 server, while it
//! - restarts peon containers as a kubelet does (restartPolicy OnFailure or Always): the old
//!   instance exits, a back-off, `<n+1>.log`; the API hears of it late (up to two seconds, in
//!   order, sometimes only the newest state): `terminated` with the pod still Running, then
//!   `waiting: CrashLoopBackOff`, then `running` with restartCount + 1 and `lastState`, while
//!   the new instance prints its first line up to 1.5 s after it started, so the status can
//!   also come first; tasks end with the terminated state and the terminal phase in one update
//!   or two, or (restartPolicy Always) with the pod's deletion;
//! - stops the agent at random moments (SIGKILL or SIGTERM) and starts it again, so logs rotate
//!   while it is down;
//! - takes S3 away (connections refused and cut) and injects resets, 503 SlowDown, 500s and
//!   stalls;
//! - takes the Kubernetes API away in turn as connections reset, 503 answers and connections
//!   refused, every other outage longer than the agent's pending timeout, and every other one
//!   with its history expired so the agent must relist;
//! - fills the state directory's disk (a tmpfs, when run as root) for a few seconds;
//! - reads task logs from the snapshot endpoint and checks each is a prefix of what was written.
//!
//! Then it ends every task, lets the agent drain, and compares every archived object with what
//! was written: one JSON line per task with `--ledger`, and a JSON summary on stdout. It exits
//! with status 1 on any lost, doubled or corrupted byte. The one loss that is allowed is the one
//! docs/reliability.md documents: a pod whose log directory was deleted while no agent was
//! running to drain it (such tasks are reported as `exposed`, and their archive must still be a
//! prefix of what was written: nothing doubled, nothing out of order). A pod deleted during an API
//! outage before any client was sent it is archived under `_unmapped/<pod dir>`, the documented
//! fallback, unless a watch resumed from before its creation is sent its events from the history
//! later (as from a real API server's watch cache) and the agent learns its task id after all;
//! such tasks are judged where their archive is and counted as `tasks_unmapped`.

use std::collections::{HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use crate::faultproxy::{FaultProxy, Mode};
use crate::kubeapi::{FakeApi, Outage, PodModel, RestartPolicy};
use crate::moto::Moto;
use clap::Parser;
use druid_log_agent::loadgen::{LineGen, Rng, encode_cri};
use serde_json::{Value, json};

/// The soak's settings, parsed from the `soak` tool's command line.
#[derive(Parser, Clone)]
#[command(
    name = "soak",
    about = "Soak druid-log-agent under load and faults; prints a ledger summary (JSON)"
)]
pub struct Args {
    /// How long tasks are started and faults injected; the drain comes after.
    #[arg(long, default_value_t = 120)]
    duration_secs: u64,
    /// Peon log writers running at once (each task ends and a new one starts).
    #[arg(long, default_value_t = 120)]
    writers: usize,
    /// Write rate of all writers together, MiB/s.
    #[arg(long, default_value_t = 6.0)]
    rate_mib: f64,
    /// Kubelet rotation size (containerLogMaxSize) in KiB; 5 files are kept (containerLogMaxFiles).
    #[arg(long, default_value_t = 1024)]
    rotate_kib: u64,
    /// Shortest and longest task life in seconds.
    #[arg(long, default_value_t = 5)]
    task_min_secs: u64,
    #[arg(long, default_value_t = 60)]
    task_max_secs: u64,
    /// Size of the tmpfs for the state directory (needs root; without it the disk-full fault is
    /// skipped and said so).
    #[arg(long, default_value_t = 512)]
    disk_mib: u64,
    /// Longest wait for the last archives after the load stops.
    #[arg(long, default_value_t = 300)]
    drain_secs: u64,
    /// The agent's `--pending-timeout-secs`; every other API outage lasts longer.
    #[arg(long, default_value_t = 5)]
    pending_timeout_secs: u64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The agent binary (default: druid-log-agent beside this binary).
    #[arg(long)]
    agent: Option<PathBuf>,
    /// moto's server command, moto[server]==5.1.22 (scripts/test makes .venv/bin/moto_server).
    #[arg(long, default_value = "moto_server")]
    moto: String,
    /// Where to build the node (a new temporary directory by default; kept on failure).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Write the per-task ledger here, one JSON object per line.
    #[arg(long)]
    ledger: Option<PathBuf>,
}

const NAMESPACE: &str = "druid";
const NODE: &str = "soak-node";
const BUCKET: &str = "soak";
const PREFIX: &str = "druid/indexing-logs";
const MAX_FILES: usize = 5;
/// A pod deleted within this long after an agent started may be gone before that agent's first
/// scan found it, so it counts as deleted while no agent was running.
const STARTUP_WINDOW: Duration = Duration::from_secs(3);
/// The longest the kubelet's status reaches the API after the kubelet knows it.
const STATUS_LAG_MS: u64 = 2000;
/// The longest a new container instance takes to print its first line.
const FIRST_LINE_MS: u64 = 1500;
/// The longest restart back-off (a real kubelet's is 10 s doubling to 5 min; shortened so a
/// short soak sees many).
const BACK_OFF_MS: u64 = 2000;

// ---------------------------------------------------------------------------------------------
// Shared state

/// What the agent supervisor tells the others.
#[derive(Default)]
struct AgentState {
    /// Running, and since when.
    up_since: Option<Instant>,
    /// Stops so far (SIGKILL or SIGTERM).
    stops: u64,
    /// SIGKILLs so far: only these may lose what a deleted file still held.
    kills: u64,
}

struct Shared {
    args: Args,
    agent: Mutex<AgentState>,
    agent_addr: String,
    /// Faults stop (the load keeps going until `load_done`).
    faults_done: AtomicBool,
    /// The API is in an outage longer than the pending timeout: the agent is not stopped
    /// meanwhile, since a restarted agent forgets what it concluded during the outage and so
    /// hides whether it concluded wrongly.
    api_long_outage: AtomicBool,
    /// No new tasks; running ones end.
    load_done: AtomicBool,
    /// Everything is verified or the drain timed out: threads exit.
    all_done: AtomicBool,
    tasks: Mutex<Vec<Task>>,
    ledger: Mutex<Vec<Value>>,
    counters: Counters,
}

#[derive(Default)]
struct Counters {
    tasks_started: AtomicU64,
    bytes_written: AtomicU64,
    rotations: AtomicU64,
    rotations_while_down: AtomicU64,
    files_removed_by_kubelet: AtomicU64,
    container_restarts: AtomicU64,
    crash_loop_back_offs: AtomicU64,
    restart_statuses_coalesced: AtomicU64,
    sigkills: AtomicU64,
    sigterms: AtomicU64,
    sigterm_unclean_exits: AtomicU64,
    s3_outages: AtomicU64,
    s3_fault_periods: AtomicU64,
    api_outages: AtomicU64,
    api_outages_reset: AtomicU64,
    api_outages_503: AtomicU64,
    api_outages_refused: AtomicU64,
    api_outages_long: AtomicU64,
    api_history_expired: AtomicU64,
    disk_full_periods: AtomicU64,
    snapshot_checks: AtomicU64,
    snapshot_mismatches: AtomicU64,
    peak_rss_kib: AtomicU64,
    max_fds: AtomicU64,
    max_threads: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

// ---------------------------------------------------------------------------------------------
// Peons

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    Running,
    /// `main` terminated; the pod and its directory go by a queued [`PodOp::Delete`] (quick
    /// delete) or once archived.
    Ended,
    /// Directory and pod gone; waiting for the archive.
    Removed,
}

/// A change of a pod in the API.
enum PodOp {
    Apply(Value),
    /// The object goes; the kubelet removes the pod's log directory.
    Delete,
}

struct Task {
    id: String,
    uid: String,
    dir: PathBuf,
    /// The pod as its kubelet reports it.
    model: PodModel,
    /// What the API is yet to be told, each at its time, in order (the kubelet's status
    /// manager writes late, and never an older status after a newer one).
    ops: VecDeque<(Instant, PodOp)>,
    last_op_at: Instant,
    /// The resourceVersion of the pod's creation in the API.
    created_rv: Option<u64>,
    /// The pod was deleted before any client was sent it (it lived within an API outage): its
    /// log goes under `_unmapped/`, unless a watch resumed from before its creation was sent
    /// its events from the history afterwards (then under its task id; see `archive_id`).
    unmappable: bool,
    /// The pod was deleted while the API was down: an agent restarted since its creation was
    /// sent (to the agent before) lists the API only after the deletion, so it cannot learn
    /// the task id either; the log may be under its id or under `_unmapped/`.
    deleted_in_outage: bool,
    lines: LineGen,
    seq: u64,
    restart: u32,
    file: File,
    size: u64,
    rotations: u32,
    nanos: u64,
    expected: Vec<u8>,
    rate: f64,
    credit: f64,
    ends_at: Instant,
    restart_at: Option<Instant>,
    /// The container exited and waits for its restart (nothing is written).
    back_off_until: Option<Instant>,
    /// The current instance has not printed its first line yet.
    quiet_until: Instant,
    next_rotate_check: Instant,
    phase: Phase,
    quick_delete: bool,
    /// The agent's SIGKILL count when the directory went, and whether an agent had been up long
    /// enough to have found it.
    removed: Option<(u64, bool)>,
}

impl Task {
    fn live(&self) -> PathBuf {
        self.dir.join("main").join(format!("{}.log", self.restart))
    }

    /// Queues a change of the pod for `at`, or right after the one queued before.
    fn tell_api(&mut self, op: PodOp, at: Instant) {
        let at = at.max(self.last_op_at);
        self.last_op_at = at;
        self.ops.push_back((at, op));
    }

    /// A status the kubelet has now, reaching the API up to [`STATUS_LAG_MS`] later.
    fn report(&mut self, status: Value, now: Instant, rng: &mut Rng) {
        let lag = Duration::from_millis(rng.below(STATUS_LAG_MS + 1));
        self.tell_api(PodOp::Apply(status), now + lag);
    }

    /// Whether the pod is in the API now.
    fn in_api(&self) -> bool {
        self.created_rv.is_some() && self.phase != Phase::Removed
    }

    /// The id its archive is under, among the `archived` ones.
    fn archive_id(&self, archived: &HashMap<String, i64>) -> String {
        let dir = self.dir.file_name().unwrap_or_default().to_string_lossy();
        let unmapped = format!("_unmapped/{dir}");
        let (under_id, under_unmapped) = (
            archived.contains_key(&self.id),
            archived.contains_key(&unmapped),
        );
        // Deleted before any response carried it, the pod may still reach the agent: a watch
        // resumed after the outage from an older resourceVersion is sent the pod's ADDED and
        // DELETED events from the history, as a real API server's watch cache sends them. The
        // agent can then archive it under its task id after all.
        let learnt_late = self.unmappable && under_id && !under_unmapped;
        let either = self.deleted_in_outage && !under_id && under_unmapped;
        if (self.unmappable && !learnt_late) || either {
            unmapped
        } else {
            self.id.clone()
        }
    }

    /// `main` exits and the kubelet will start it again after a back-off: the terminated
    /// state (sometimes never sent: the status manager sends the newest it has), the back-off
    /// when it is long enough to be seen.
    fn exit_for_restart(&mut self, now: Instant, rng: &mut Rng, c: &Counters) {
        let (code, reason) = match (self.model.restart_policy(), rng.below(3)) {
            (RestartPolicy::Always, 0) => (0, "Completed"),
            (_, 1) => (137, "OOMKilled"),
            _ => (1, "Error"),
        };
        let exited = self.model.exit("main", code, reason);
        if rng.below(4) == 0 {
            add(&c.restart_statuses_coalesced, 1);
        } else {
            self.report(exited, now, rng);
        }
        let back_off = Duration::from_millis(rng.below(BACK_OFF_MS + 1));
        if back_off >= Duration::from_millis(500) {
            let waiting = self.model.back_off("main");
            self.report(waiting, now, rng);
            add(&c.crash_loop_back_offs, 1);
        }
        self.back_off_until = Some(now + back_off);
    }

    /// The kubelet starts the next instance: `<n+1>.log`, running with restartCount + 1; its
    /// first line comes a moment later, so the status may come first.
    fn start_next_instance(&mut self, now: Instant, rng: &mut Rng) -> io::Result<()> {
        self.back_off_until = None;
        self.restart += 1;
        self.file = open_append(&self.live())?;
        self.size = 0;
        let running = self.model.restart("main");
        assert_eq!(self.model.restart_count("main"), self.restart);
        self.report(running, now, rng);
        self.quiet_until = now + Duration::from_millis(rng.below(FIRST_LINE_MS + 1));
        Ok(())
    }

    /// The task ends. Under restartPolicy Always only the pod's deletion ends it: SIGTERM, the
    /// peon exits 143, the pod Failed, the object goes and the kubelet removes the directory.
    /// Otherwise `main` exits for good (a failure only under Never), its terminated state and
    /// the terminal phase in two updates or one.
    fn end(&mut self, now: Instant, rng: &mut Rng) {
        self.phase = Phase::Ended;
        let delete_in = Duration::from_millis(rng.below(2000));
        if self.model.restart_policy() == RestartPolicy::Always {
            let deleting = self.model.begin_deletion();
            self.report(deleting, now, rng);
            let exited = self.model.exit("main", 143, "Error");
            self.report(exited, now, rng);
            let ended = self.model.finish();
            self.report(ended, now, rng);
            self.tell_api(PodOp::Delete, now + delete_in);
            return;
        }
        let failed = self.model.restart_policy() == RestartPolicy::Never && rng.below(4) == 0;
        let exited = if failed {
            self.model.exit("main", 1, "Error")
        } else {
            self.model.exit("main", 0, "Completed")
        };
        if rng.below(2) == 0 {
            self.report(exited, now, rng);
        }
        let ended = self.model.finish();
        self.report(ended, now, rng);
        if self.quick_delete {
            self.tell_api(PodOp::Delete, now + delete_in);
        }
    }

    /// Writes one line tagged with its sequence number, so a ledger can name missing and
    /// doubled lines.
    fn write_line(&mut self, buf: &mut Vec<u8>, rec: &mut Vec<u8>) -> io::Result<usize> {
        self.lines.next_line(buf);
        self.seq += 1;
        let _ = write!(buf, " #{}", self.seq);
        let stream = if buf.first() == Some(&b'\t') {
            "stderr"
        } else {
            "stdout"
        };
        rec.clear();
        self.nanos += 1_000;
        encode_cri(stream, self.nanos, buf, rec);
        self.file.write_all(rec)?;
        self.size += rec.len() as u64;
        self.expected.extend_from_slice(buf);
        self.expected.push(b'\n');
        Ok(buf.len() + 1)
    }

    /// The kubelet's rotation: remove rotated files beyond MaxFiles-2, gzip the uncompressed
    /// ones (through a .tmp, as the kubelet does), rename the live file, then the runtime
    /// reopens, sometimes after one more line landed in the renamed file.
    fn rotate(&mut self, late_write: bool, c: &Counters) -> io::Result<()> {
        let main = self.dir.join("main");
        let base = format!("{}.log.", self.restart);
        let mut rotated: Vec<String> = fs::read_dir(&main)?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with(&base) && !n.ends_with(".tmp"))
            .collect();
        rotated.sort();
        let excess = rotated.len().saturating_sub(MAX_FILES - 2);
        for name in rotated.drain(..excess) {
            fs::remove_file(main.join(name))?;
            add(&c.files_removed_by_kubelet, 1);
        }
        for name in rotated.iter().filter(|n| !n.ends_with(".gz")) {
            let data = fs::read(main.join(name))?;
            let tmp = main.join(format!("{name}.gz.tmp"));
            let mut enc =
                flate2::write::GzEncoder::new(File::create(&tmp)?, flate2::Compression::fast());
            enc.write_all(&data)?;
            enc.finish()?.sync_all()?;
            fs::rename(&tmp, main.join(format!("{name}.gz")))?;
            fs::remove_file(main.join(name))?;
        }
        self.rotations += 1;
        fs::rename(
            self.live(),
            main.join(format!("{base}20240501-{:06}", self.rotations)),
        )?;
        if late_write {
            let (mut a, mut b) = (Vec::new(), Vec::new());
            self.write_line(&mut a, &mut b)?;
        }
        self.file = open_append(&self.live())?;
        self.size = 0;
        add(&c.rotations, 1);
        Ok(())
    }
}

fn open_append(p: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(p)
}

fn new_task(n: u64, rng: &mut Rng, args: &Args, logs: &Path, now: Instant) -> io::Result<Task> {
    let uid = format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        rng.next_u64() as u32,
        rng.below(1 << 16),
        rng.below(1 << 12),
        rng.below(1 << 12),
        rng.next_u64() >> 16
    );
    let pod_name = format!("peon-{n}-{:05x}", rng.below(1 << 20));
    let id = format!(
        "index_kafka_soak_{n}_{:08x}_2024-05-01T00:00:00.000Z",
        rng.next_u64() as u32
    );
    let dir = logs.join(format!("{NAMESPACE}_{pod_name}_{uid}"));
    fs::create_dir_all(dir.join("main"))?;
    let file = open_append(&dir.join("main").join("0.log"))?;
    let mean = args.rate_mib * 1048576.0 / args.writers.max(1) as f64;
    let life =
        args.task_min_secs + rng.below(args.task_max_secs.saturating_sub(args.task_min_secs) + 1);
    let life = Duration::from_millis(life * 1000 + rng.below(1000));
    let mut lines = LineGen::new(rng.next_u64());
    lines.long_every = 400;
    // Druid's task runner sets restartPolicy Never; pod templates can say otherwise, and only
    // OnFailure and Always restart a container.
    let restarts = rng.below(5) == 0;
    let policy = match (restarts, rng.below(3)) {
        (true, 0) => RestartPolicy::Always,
        (true, _) => RestartPolicy::OnFailure,
        (false, 0) => RestartPolicy::OnFailure,
        (false, _) => RestartPolicy::Never,
    };
    let mut model = PodModel::new(NAMESPACE, &pod_name, &uid, NODE, policy, &["main"])
        .with_labels(&[("druid.k8s.peons", "true")])
        .with_annotations(&[("task.id", &id)]);
    let pending = model.json();
    let running = model.start("main");
    let mut task = Task {
        id,
        uid,
        dir,
        model,
        ops: VecDeque::new(),
        last_op_at: now,
        created_rv: None,
        unmappable: false,
        deleted_in_outage: false,
        lines,
        seq: 0,
        restart: 0,
        file,
        size: 0,
        rotations: 0,
        nanos: n * 1_000_000_000,
        expected: Vec::new(),
        rate: mean * (0.25 + rng.below(1750) as f64 / 1000.0),
        credit: 0.0,
        ends_at: now + life,
        restart_at: restarts.then(|| now + life / 2),
        back_off_until: None,
        quiet_until: now,
        next_rotate_check: now + Duration::from_millis(rng.below(1000)),
        phase: Phase::Running,
        // Only a deletion ends a pod that restarts always.
        quick_delete: policy == RestartPolicy::Always || rng.below(10) < 3,
        removed: None,
    };
    // The log sometimes appears before the pod is known, as on a busy kubelet: the pod
    // (Pending, then running) reaches the API up to three seconds after its directory.
    let known_at = now + Duration::from_millis(rng.below(3) * rng.below(1500));
    task.tell_api(PodOp::Apply(pending), known_at);
    task.report(running, known_at, rng);
    Ok(task)
}

/// Applies the pod changes that are due. `removed` is what [`Task::removed`] records if the
/// pod and its directory go now.
fn apply_due_ops(
    t: &mut Task,
    api: &FakeApi,
    now: Instant,
    removed: (u64, bool),
) -> io::Result<()> {
    while t.ops.front().is_some_and(|(at, _)| *at <= now) {
        let Some((_, op)) = t.ops.pop_front() else {
            break;
        };
        match op {
            PodOp::Apply(status) => {
                let rv = api.apply(status);
                t.created_rv.get_or_insert(rv);
            }
            PodOp::Delete => {
                t.unmappable = t.created_rv.is_none_or(|created| api.delivered() < created);
                t.deleted_in_outage = api.outage().is_some();
                api.delete(&t.uid);
                fs::remove_dir_all(&t.dir)?;
                t.phase = Phase::Removed;
                t.removed = Some(removed);
            }
        }
    }
    Ok(())
}

/// The node's writers and kubelet: writes, rotates, restarts containers, ends tasks and removes
/// their directories.
fn writer_loop(sh: &Shared, logs: &Path, api: &FakeApi) -> io::Result<()> {
    let args = &sh.args;
    let mut rng = Rng::new(args.seed ^ 0x5eed);
    let (mut buf, mut rec) = (Vec::with_capacity(64 << 10), Vec::with_capacity(64 << 10));
    let mut last = Instant::now();
    let mut next_id = 0u64;
    while !sh.all_done.load(Ordering::SeqCst) {
        let now = Instant::now();
        let dt = now.duration_since(last).as_secs_f64();
        last = now;
        let agent_up = lock(&sh.agent).up_since.is_some();
        let kills = lock(&sh.agent).kills;
        let up_long = lock(&sh.agent)
            .up_since
            .is_some_and(|t| now.duration_since(t) >= STARTUP_WINDOW);
        let load_done = sh.load_done.load(Ordering::SeqCst);
        let mut tasks = lock(&sh.tasks);
        let running = tasks.iter().filter(|t| t.phase == Phase::Running).count();
        if !load_done {
            for _ in running..args.writers {
                next_id += 1;
                tasks.push(new_task(next_id, &mut rng, args, logs, now)?);
                add(&sh.counters.tasks_started, 1);
            }
        }
        for t in tasks.iter_mut() {
            apply_due_ops(t, api, now, (kills, agent_up && up_long))?;
            if t.phase != Phase::Running {
                continue;
            }
            if let Some(until) = t.back_off_until {
                if now >= until {
                    t.start_next_instance(now, &mut rng)?;
                    add(&sh.counters.container_restarts, 1);
                }
                continue;
            }
            t.credit = (t.credit + t.rate * dt).min(t.rate);
            while t.credit > 0.0 && now >= t.quiet_until {
                let n = t.write_line(&mut buf, &mut rec)?;
                t.credit -= n as f64;
                add(&sh.counters.bytes_written, n as u64);
            }
            if now >= t.next_rotate_check {
                t.next_rotate_check = now + Duration::from_secs(1);
                if t.size >= args.rotate_kib << 10 {
                    t.rotate(rng.below(2) == 0, &sh.counters)?;
                    if !agent_up {
                        add(&sh.counters.rotations_while_down, 1);
                    }
                }
            }
            if t.restart_at.is_some_and(|at| at <= now) && !load_done {
                // Now and then a second restart, halfway through what is left.
                t.restart_at =
                    (rng.below(3) == 0 && t.ends_at > now).then(|| now + (t.ends_at - now) / 2);
                t.exit_for_restart(now, &mut rng, &sh.counters);
                continue;
            }
            if now >= t.ends_at || load_done {
                t.file.sync_all()?;
                t.end(now, &mut rng);
            }
        }
        drop(tasks);
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The agent

struct AgentProc {
    child: Child,
    started: Instant,
}

fn start_agent(sh: &Shared, bin: &Path, node: &Path, kubeconfig: &Path, s3: &str) -> AgentProc {
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(node.join("agent.log"))
        .expect("agent log file");
    let child = Command::new(bin)
        .arg("run")
        .args(["--log-root", &node.join("logs").to_string_lossy()])
        .args([
            "--state-dir",
            &node.join("state").join("agent").to_string_lossy(),
        ])
        .args([
            "--s3-bucket",
            BUCKET,
            "--s3-endpoint",
            s3,
            "--s3-path-style",
            "true",
        ])
        .args(["--s3-region", "us-east-1", "--listen", &sh.agent_addr])
        .args(["--kubernetes", "true", "--node-name", NODE])
        .args(["--archive-retry-max-secs", "4", "--retention-secs", "5"])
        .args(["--shutdown-timeout-secs", "5", "--pending-timeout-secs"])
        .arg(sh.args.pending_timeout_secs.to_string())
        .env("KUBECONFIG", kubeconfig)
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("agent log file"))
        .stderr(log)
        .spawn()
        .expect("start the agent");
    AgentProc {
        child,
        started: Instant::now(),
    }
}

/// A number from /proc/PID/status (`VmHWM:` in KiB, `Threads:`).
fn proc_status(pid: u32, key: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Counter values of one agent process, from its /metrics.
fn counters_of(metrics: &str) -> HashMap<String, f64> {
    metrics
        .lines()
        .filter(|l| l.starts_with("druid_log_agent_") && l.contains("_total "))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

/// Runs the agent, stops it at random moments and starts it again; samples its memory, fds and
/// counters. Returns the counters summed over every run.
fn supervise(
    sh: &Shared,
    bin: &Path,
    node: &Path,
    kubeconfig: &Path,
    s3: &str,
) -> HashMap<String, f64> {
    let mut rng = Rng::new(sh.args.seed ^ 0xa9e7);
    let mut totals: HashMap<String, f64> = HashMap::new();
    loop {
        let mut agent = start_agent(sh, bin, node, kubeconfig, s3);
        lock(&sh.agent).up_since = Some(agent.started);
        let pid = agent.child.id();
        let run_for = Duration::from_millis(6000 + rng.below(14_000));
        let mut last_counters = HashMap::new();
        let mut next_scrape = Instant::now();
        let mut exited = None;
        while sh.faults_done.load(Ordering::SeqCst)
            || agent.started.elapsed() < run_for
            || sh.api_long_outage.load(Ordering::SeqCst)
        {
            if sh.all_done.load(Ordering::SeqCst) {
                break;
            }
            sample(sh, pid);
            if Instant::now() >= next_scrape {
                next_scrape = Instant::now() + Duration::from_secs(1);
                if let Some((200, body)) = http_get(&sh.agent_addr, "/metrics") {
                    last_counters = counters_of(&String::from_utf8_lossy(&body));
                }
            }
            if let Ok(Some(status)) = agent.child.try_wait() {
                exited = Some(status);
                break;
            }
            thread::sleep(Duration::from_millis(100));
        }
        if let Some(status) = exited {
            // The agent must never die on its own.
            eprintln!("soak: the agent exited by itself: {status}");
            lock(&sh.agent).up_since = None;
            for (k, v) in last_counters {
                *totals.entry(k).or_default() += v;
            }
            totals.insert("agent_died".into(), 1.0);
            return totals;
        }
        if let Some((200, body)) = http_get(&sh.agent_addr, "/metrics") {
            last_counters = counters_of(&String::from_utf8_lossy(&body));
        }
        for (k, v) in last_counters {
            *totals.entry(k).or_default() += v;
        }
        let finish = sh.all_done.load(Ordering::SeqCst);
        let graceful = finish || rng.below(5) < 2;
        {
            let mut st = lock(&sh.agent);
            st.up_since = None;
            st.stops += 1;
        }
        if graceful {
            add(&sh.counters.sigterms, 1);
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
            let status = agent.child.wait().expect("wait for the agent");
            if !status.success() {
                eprintln!("soak: agent exit after SIGTERM: {status}");
                add(&sh.counters.sigterm_unclean_exits, 1);
            }
        } else {
            lock(&sh.agent).kills += 1;
            add(&sh.counters.sigkills, 1);
            let _ = agent.child.kill();
            let _ = agent.child.wait();
        }
        if finish {
            return totals;
        }
        if !sh.faults_done.load(Ordering::SeqCst) {
            thread::sleep(Duration::from_millis(300 + rng.below(2700)));
        }
    }
}

fn sample(sh: &Shared, pid: u32) {
    let c = &sh.counters;
    c.peak_rss_kib
        .fetch_max(proc_status(pid, "VmHWM:"), Ordering::Relaxed);
    c.max_threads
        .fetch_max(proc_status(pid, "Threads:"), Ordering::Relaxed);
    if let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) {
        c.max_fds.fetch_max(fds.count() as u64, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------------------------
// Faults other than agent restarts

struct Disk {
    mount: Option<PathBuf>,
}

impl Disk {
    /// A tmpfs of `mib` at `dir` when we may mount; otherwise a plain directory.
    fn new(dir: &Path, mib: u64) -> Disk {
        fs::create_dir_all(dir).expect("state dir");
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "soak-state"])
            .arg(dir)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        Disk {
            mount: ok.then(|| dir.to_owned()),
        }
    }

    /// Fills the volume; returns the filler's path.
    fn fill(&self) -> Option<PathBuf> {
        let dir = self.mount.as_ref()?;
        let path = dir.join("filler");
        let mut f = File::create(&path).ok()?;
        let chunk = vec![0u8; 1 << 20];
        while f.write_all(&chunk).is_ok() {}
        // The last partial chunk: fill to the last byte.
        while f.write_all(&chunk[..4096]).is_ok() {}
        while f.write_all(&chunk[..1]).is_ok() {}
        Some(path)
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        if let Some(dir) = &self.mount {
            let _ = Command::new("umount").arg(dir).status();
        }
    }
}

fn faults_loop(sh: &Shared, proxy: &FaultProxy, api: &FakeApi, disk: &Disk) {
    let mut rng = Rng::new(sh.args.seed ^ 0xfa17);
    let now = Instant::now();
    let secs = |rng: &mut Rng, lo: u64, hi: u64| {
        Duration::from_millis(lo * 1000 + rng.below((hi - lo) * 1000))
    };
    let mut s3_next = now + secs(&mut rng, 5, 15);
    let mut s3_heal: Option<Instant> = None;
    let mut api_next = now + secs(&mut rng, 5, 10);
    let mut api_heal: Option<Instant> = None;
    let mut disk_next = now + secs(&mut rng, 15, 30);
    let mut disk_heal: Option<(Instant, PathBuf)> = None;
    while !sh.faults_done.load(Ordering::SeqCst) {
        let now = Instant::now();
        if s3_heal.is_some_and(|t| t <= now) {
            s3_heal = None;
            proxy.set_mode(Mode::Healthy);
            s3_next = now + secs(&mut rng, 6, 20);
        } else if s3_heal.is_none() && now >= s3_next {
            // Alternate, so that even a short soak has both.
            if get(&sh.counters.s3_outages) <= get(&sh.counters.s3_fault_periods) {
                proxy.set_mode(Mode::Down);
                add(&sh.counters.s3_outages, 1);
                s3_heal = Some(now + secs(&mut rng, 3, 10));
            } else {
                proxy.set_mode(Mode::Faulty);
                add(&sh.counters.s3_fault_periods, 1);
                s3_heal = Some(now + secs(&mut rng, 4, 12));
            }
        }
        if api_heal.is_some_and(|t| t <= now) {
            api_heal = None;
            if get(&sh.counters.api_outages) % 2 == 1 {
                // Events during the outage are gone: the agent must relist.
                api.expire_history();
                add(&sh.counters.api_history_expired, 1);
            }
            api.set_outage(None);
            sh.api_long_outage.store(false, Ordering::SeqCst);
            api_next = now + secs(&mut rng, 4, 10);
        } else if api_heal.is_none() && now >= api_next {
            // The forms in turn, every other outage longer than the agent's pending timeout,
            // so that even a short soak has each.
            let n = get(&sh.counters.api_outages);
            let (form, counter) = match n % 3 {
                0 => (Outage::Unavailable, &sh.counters.api_outages_503),
                1 => (Outage::Reset, &sh.counters.api_outages_reset),
                _ => (Outage::Refused, &sh.counters.api_outages_refused),
            };
            api.set_outage(Some(form));
            add(&sh.counters.api_outages, 1);
            add(counter, 1);
            let pending = sh.args.pending_timeout_secs;
            let lasts = if n.is_multiple_of(2) {
                add(&sh.counters.api_outages_long, 1);
                sh.api_long_outage.store(true, Ordering::SeqCst);
                secs(&mut rng, pending + 2, pending + 6)
            } else {
                secs(&mut rng, 2, 5)
            };
            api_heal = Some(now + lasts);
        }
        if disk_heal.as_ref().is_some_and(|(t, _)| *t <= now) {
            if let Some((_, p)) = disk_heal.take() {
                let _ = fs::remove_file(p);
            }
            disk_next = now + secs(&mut rng, 20, 40);
        } else if disk_heal.is_none()
            && now >= disk_next
            && let Some(p) = disk.fill()
        {
            add(&sh.counters.disk_full_periods, 1);
            disk_heal = Some((now + secs(&mut rng, 3, 7), p));
        }
        thread::sleep(Duration::from_millis(50));
    }
    proxy.set_mode(Mode::Healthy);
    api.set_outage(None);
    sh.api_long_outage.store(false, Ordering::SeqCst);
    if let Some((_, p)) = disk_heal {
        let _ = fs::remove_file(p);
    }
}

/// Reads whole task logs from the snapshot endpoint while they are written: each must be a
/// prefix of what the writer wrote.
fn snapshot_loop(sh: &Shared) {
    let mut rng = Rng::new(sh.args.seed ^ 0x5a95);
    while !sh.load_done.load(Ordering::SeqCst) {
        thread::sleep(Duration::from_millis(200));
        let id = {
            let tasks = lock(&sh.tasks);
            let live: Vec<&Task> = tasks.iter().filter(|t| t.phase == Phase::Running).collect();
            if live.is_empty() {
                continue;
            }
            live[rng.below(live.len() as u64) as usize].id.clone()
        };
        let Some((200, body)) =
            http_get(&sh.agent_addr, &format!("/druid/indexer/v1/task/{id}/log"))
        else {
            continue;
        };
        let tasks = lock(&sh.tasks);
        if let Some(t) = tasks.iter().find(|t| t.id == id) {
            add(&sh.counters.snapshot_checks, 1);
            if !t.expected.starts_with(&body) {
                add(&sh.counters.snapshot_mismatches, 1);
                eprintln!(
                    "soak: snapshot of {id} ({} bytes) is not a prefix of the {} bytes written",
                    body.len(),
                    t.expected.len()
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Verification

/// Sizes of every archived object, by task id.
async fn list_archived(s3: &aws_sdk_s3::Client) -> Result<HashMap<String, i64>, String> {
    let mut out = HashMap::new();
    let mut pages = s3
        .list_objects_v2()
        .bucket(BUCKET)
        .prefix(format!("{PREFIX}/"))
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| format!("list: {e:?}"))?;
        for o in page.contents() {
            let Some(key) = o.key() else { continue };
            if let Some(id) = key
                .strip_prefix(&format!("{PREFIX}/"))
                .and_then(|k| k.strip_suffix("/log"))
            {
                out.insert(id.to_owned(), o.size().unwrap_or(0));
            }
        }
    }
    Ok(out)
}

async fn fetch(s3: &aws_sdk_s3::Client, id: &str) -> Option<Vec<u8>> {
    let o = s3
        .get_object()
        .bucket(BUCKET)
        .key(format!("{PREFIX}/{id}/log"))
        .send()
        .await
        .ok()?;
    Some(o.body.collect().await.ok()?.into_bytes().to_vec())
}

/// Compares an archive with what was written. Lines carry ` #<seq>` at their end, so a
/// difference is described as doubled and missing sequence numbers.
fn ledger_row(t: &Task, got: Option<&[u8]>, exposed: bool) -> (Value, bool) {
    let want = &t.expected;
    let got_b = got.unwrap_or_default();
    let exact = got.is_some() && got_b == want.as_slice();
    // Druid's placeholder stands for the empty log (an object is never empty): for an exposed
    // task whose files went before the agent read a byte, it is the empty prefix. It names the
    // task id, or the fallback name of a task whose id could not be learned.
    use druid_log_agent::archive::placeholder;
    use druid_log_agent::task::{PodDir, TaskId};
    let unmapped = t
        .dir
        .file_name()
        .and_then(|n| PodDir::parse(&n.to_string_lossy()))
        .map(|pod| TaskId::unmapped(&pod));
    let empty = TaskId::new(t.id.as_str())
        .ok()
        .into_iter()
        .chain(unmapped)
        .any(|id| got_b == placeholder(&id).as_bytes());
    let prefix = empty || want.starts_with(got_b);
    let (mut dups, mut missing, mut unparsable) = (0u64, Vec::new(), 0u64);
    if !exact {
        let mut seen = vec![0u32; t.seq as usize + 2];
        for line in got_b.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let n = line
                .iter()
                .rposition(|b| *b == b'#')
                .and_then(|i| {
                    std::str::from_utf8(&line[i + 1..])
                        .ok()?
                        .parse::<usize>()
                        .ok()
                })
                .filter(|n| *n < seen.len());
            match n {
                Some(n) => seen[n] += 1,
                None => unparsable += 1,
            }
        }
        dups = seen.iter().filter(|c| **c > 1).count() as u64;
        let mut start = None;
        for (n, c) in seen.iter().enumerate().take(t.seq as usize + 1).skip(1) {
            match (*c == 0, start) {
                (true, None) => start = Some(n),
                (false, Some(s)) => {
                    missing.push(format!("{s}-{}", n - 1));
                    start = None;
                }
                _ => {}
            }
        }
        if let Some(s) = start {
            missing.push(format!("{s}-{}", t.seq));
        }
    }
    // An exposed task may lose its tail (documented); nothing else may differ.
    let ok = exact || (exposed && prefix);
    let verdict = if exact {
        "exact"
    } else if ok {
        "lost-tail-deleted-while-agent-down"
    } else if got.is_none() {
        "missing"
    } else {
        "mismatch"
    };
    let row = json!({
        "task": t.id,
        "pod_dir": t.dir.file_name().map(|n| n.to_string_lossy().into_owned()),
        "lines_written": t.seq,
        "bytes_written": want.len(),
        "bytes_archived": got.map(|g| g.len()),
        "equal": exact,
        "prefix": prefix,
        "duplicate_lines": dups,
        "missing_line_ranges": missing,
        "unparsable_lines": unparsable,
        "rotations": t.rotations,
        "restarts": t.restart,
        "restart_policy": t.model.restart_policy().as_str(),
        "unmapped": t.unmappable,
        "quick_delete": t.quick_delete,
        "exposed": exposed,
        "verdict": verdict,
    });
    (row, ok)
}

fn exposed(sh: &Shared, t: &Task) -> bool {
    t.removed
        .is_some_and(|(kills, was_up)| !was_up || lock(&sh.agent).kills > kills)
}

/// Checks ended tasks whose archive is complete, then lets the kubelet remove their
/// directories (pods not deleted quickly stay until their log is archived, as when the pod
/// garbage collector is slow). With `last`, checks everything that is left. Returns how many
/// tasks are still to be archived.
fn verify_round(
    sh: &Shared,
    rt: &tokio::runtime::Runtime,
    s3: &aws_sdk_s3::Client,
    api: &FakeApi,
    last: bool,
    failures: &mut u64,
) -> Result<usize, String> {
    let archived = rt.block_on(list_archived(s3))?;
    // Take the tasks to check out of the table, so the writers are not held up by downloads.
    let (mut checking, mut left) = (Vec::new(), 0);
    {
        let mut tasks = lock(&sh.tasks);
        let mut i = 0;
        while i < tasks.len() {
            let t = &tasks[i];
            let ended = matches!(t.phase, Phase::Ended | Phase::Removed);
            let complete =
                archived.get(&t.archive_id(&archived)).copied() == Some(t.expected.len() as i64);
            // Judged once the API has been told everything (a status applied after the pod's
            // deletion below would create it again).
            if ended && (last || (complete && t.ops.is_empty())) {
                checking.push(tasks.swap_remove(i));
                continue;
            }
            // An exposed task may never be complete; it is judged at the end.
            if !ended || !exposed(sh, t) {
                left += 1;
            }
            i += 1;
        }
    }
    let mut unfinished = Vec::new();
    for t in checking {
        let id = t.archive_id(&archived);
        let got = if archived.contains_key(&id) {
            rt.block_on(fetch(s3, &id))
        } else {
            None
        };
        if got.as_deref() != Some(t.expected.as_slice()) && !last {
            left += 1;
            unfinished.push(t);
            continue;
        }
        let (row, ok) = ledger_row(&t, got.as_deref(), exposed(sh, &t));
        if !ok {
            *failures += 1;
            eprintln!("soak: {row}");
        }
        lock(&sh.ledger).push(row);
        if t.in_api() {
            api.delete(&t.uid);
            let _ = fs::remove_dir_all(&t.dir);
        }
        let _ = rt.block_on(
            s3.delete_object()
                .bucket(BUCKET)
                .key(format!("{PREFIX}/{id}/log"))
                .send(),
        );
    }
    lock(&sh.tasks).extend(unfinished);
    Ok(left)
}

// ---------------------------------------------------------------------------------------------
// Plumbing

fn http_get(addr: &str, target: &str) -> Option<(u16, Vec<u8>)> {
    let r = crate::http::get(addr, target, &[], Some(Duration::from_secs(20))).ok()?;
    Some((r.status, r.body))
}

fn free_port() -> io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Runs the soak and returns its summary (JSON; `"ok": true` when no byte was lost, doubled or
/// corrupted and the run drained); `Err` when the rig itself could not be set up.
pub fn run(args: Args) -> Result<Value, String> {
    let bin = match &args.agent {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .map_err(|e| e.to_string())?
            .with_file_name("druid-log-agent"),
    };
    let tmp;
    let node = match &args.dir {
        Some(d) => {
            fs::create_dir_all(d).map_err(|e| e.to_string())?;
            d.clone()
        }
        None => {
            tmp = std::env::temp_dir().join(format!("dla-soak-{}", std::process::id()));
            fs::create_dir_all(&tmp).map_err(|e| e.to_string())?;
            tmp.clone()
        }
    };
    let logs = node.join("logs");
    fs::create_dir_all(&logs).map_err(|e| e.to_string())?;
    let disk = Disk::new(&node.join("state"), args.disk_mib);
    let moto = Moto::start_with(&args.moto)?;
    let moto_url = moto.endpoint.clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let s3 = moto.client();
    rt.block_on(s3.create_bucket().bucket(BUCKET).send())
        .map_err(|e| format!("create bucket: {e:?}"))?;
    let proxy =
        FaultProxy::start(&moto_url, Mode::Healthy, args.seed).map_err(|e| e.to_string())?;
    let api = FakeApi::start();
    let kubeconfig = api.write_kubeconfig(&node);
    let sh = Arc::new(Shared {
        agent_addr: format!("127.0.0.1:{}", free_port().map_err(|e| e.to_string())?),
        args: args.clone(),
        agent: Mutex::new(AgentState::default()),
        faults_done: AtomicBool::new(false),
        api_long_outage: AtomicBool::new(false),
        load_done: AtomicBool::new(false),
        all_done: AtomicBool::new(false),
        tasks: Mutex::new(Vec::new()),
        ledger: Mutex::new(Vec::new()),
        counters: Counters::default(),
    });
    let started = Instant::now();
    let mut failures = 0u64;
    let (totals, drained) = thread::scope(|scope| {
        let supervisor = {
            let (sh, bin, node, kc, url) = (&sh, &bin, &node, &kubeconfig, proxy.url());
            scope.spawn(move || supervise(sh, bin, node, kc, &url))
        };
        let writer = scope.spawn(|| writer_loop(&sh, &logs, &api));
        scope.spawn(|| faults_loop(&sh, &proxy, &api, &disk));
        scope.spawn(|| snapshot_loop(&sh));
        let stop_at = started + Duration::from_secs(args.duration_secs);
        let mut next_report = Instant::now() + Duration::from_secs(10);
        let mut drained = false;
        let mut drain_deadline = None;
        loop {
            thread::sleep(Duration::from_secs(1));
            if Instant::now() >= stop_at && !sh.load_done.load(Ordering::SeqCst) {
                eprintln!("soak: load and faults stop; draining");
                sh.faults_done.store(true, Ordering::SeqCst);
                sh.load_done.store(true, Ordering::SeqCst);
                drain_deadline = Some(Instant::now() + Duration::from_secs(args.drain_secs));
            }
            if writer.is_finished() || supervisor.is_finished() {
                break;
            }
            let left = match verify_round(&sh, &rt, &s3, &api, false, &mut failures) {
                Ok(left) => left,
                Err(e) => {
                    eprintln!("soak: {e}");
                    continue;
                }
            };
            if Instant::now() >= next_report {
                next_report = Instant::now() + Duration::from_secs(10);
                eprintln!(
                    "soak: {:>4} s: {} tasks started, {} MiB written, {} verified, {} failed, {} agent stops",
                    started.elapsed().as_secs(),
                    get(&sh.counters.tasks_started),
                    get(&sh.counters.bytes_written) >> 20,
                    lock(&sh.ledger).len(),
                    failures,
                    lock(&sh.agent).stops,
                );
            }
            if sh.load_done.load(Ordering::SeqCst) && left == 0 {
                drained = true;
                break;
            }
            if drain_deadline.is_some_and(|d| Instant::now() >= d) {
                break;
            }
        }
        // Judge what is left (with a healthy S3 and a running agent), then stop everything.
        if let Err(e) = verify_round(&sh, &rt, &s3, &api, true, &mut failures) {
            eprintln!("soak: final check: {e}");
            failures += 1;
        }
        sh.all_done.store(true, Ordering::SeqCst);
        if let Ok(Err(e)) = writer.join() {
            eprintln!("soak: writer failed: {e}");
            failures += 1;
        }
        (supervisor.join().unwrap_or_default(), drained)
    });
    let c = &sh.counters;
    let ledger = lock(&sh.ledger);
    if let Some(path) = &args.ledger {
        let mut text = String::new();
        for row in ledger.iter() {
            text.push_str(&row.to_string());
            text.push('\n');
        }
        fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    let count = |v: &str| ledger.iter().filter(|r| r["verdict"] == v).count();
    let agent_log = fs::read_to_string(node.join("agent.log")).unwrap_or_default();
    let panics = agent_log.matches("panicked at").count();
    let metric = |name: &str| totals.get(name).copied().unwrap_or(0.0);
    let ok = failures == 0
        && drained
        && panics == 0
        && get(&c.snapshot_mismatches) == 0
        && get(&c.sigterm_unclean_exits) == 0
        && !totals.contains_key("agent_died");
    let summary = json!({
        "ok": ok,
        "seconds": started.elapsed().as_secs(),
        "load_seconds": args.duration_secs,
        "writers": args.writers,
        "rate_mib_s": args.rate_mib,
        "tasks": ledger.len(),
        "tasks_exact": count("exact"),
        "tasks_exposed_lost_tail": count("lost-tail-deleted-while-agent-down"),
        "tasks_unmapped": ledger.iter().filter(|r| r["unmapped"] == true).count(),
        "tasks_failed": failures,
        "drained": drained,
        "bytes_written": get(&c.bytes_written),
        "bytes_archived_verified": ledger.iter().filter_map(|r| r["bytes_archived"].as_u64()).sum::<u64>(),
        "rotations": get(&c.rotations),
        "rotations_while_agent_down": get(&c.rotations_while_down),
        "rotated_files_removed_by_kubelet": get(&c.files_removed_by_kubelet),
        "container_restarts": get(&c.container_restarts),
        "crash_loop_back_offs": get(&c.crash_loop_back_offs),
        "restart_statuses_coalesced": get(&c.restart_statuses_coalesced),
        "agent_sigkills": get(&c.sigkills),
        "agent_sigterms": get(&c.sigterms),
        "agent_unclean_sigterm_exits": get(&c.sigterm_unclean_exits),
        "agent_panics": panics,
        "agent_peak_rss_mib": get(&c.peak_rss_kib) as f64 / 1024.0,
        "agent_max_open_fds": get(&c.max_fds),
        "agent_max_threads": get(&c.max_threads),
        "s3_outages": get(&c.s3_outages),
        "s3_fault_periods": get(&c.s3_fault_periods),
        "s3_faults_injected": proxy.counts.faults(),
        "kube_api_outages": get(&c.api_outages),
        "kube_api_outages_reset": get(&c.api_outages_reset),
        "kube_api_outages_503": get(&c.api_outages_503),
        "kube_api_outages_refused": get(&c.api_outages_refused),
        "kube_api_outages_longer_than_pending_timeout": get(&c.api_outages_long),
        "pending_timeout_secs": args.pending_timeout_secs,
        "kube_api_history_expired": get(&c.api_history_expired),
        "disk_full_periods": get(&c.disk_full_periods),
        "disk_full_fault": if disk.mount.is_some() { "tmpfs" } else { "skipped: cannot mount a tmpfs (not root?)" },
        "snapshot_checks": get(&c.snapshot_checks),
        "snapshot_mismatches": get(&c.snapshot_mismatches),
        "agent_archive_errors_retried": metric("druid_log_agent_archive_errors_total"),
        "agent_spool_errors_retried": metric("druid_log_agent_spool_errors_total"),
        "agent_commit_errors_retried": metric("druid_log_agent_commit_errors_total"),
        "agent_recovered_sources": metric("druid_log_agent_recovered_sources_total"),
        "agent_lost_sources": metric("druid_log_agent_lost_sources_total"),
        "agent_unmapped_tasks": metric("druid_log_agent_unmapped_tasks_total"),
        "agent_archives": metric("druid_log_agent_archives_total"),
        "node_dir": node.display().to_string(),
    });
    drop(disk);
    if ok && args.dir.is_none() {
        let _ = fs::remove_dir_all(&node);
    }
    Ok(summary)
}
