//! Races between the runtime's writes and the engine's decision that a file has ended, made
//! deterministic: the engine asks its [`TaskIdentity`] whether the container finished after the
//! read that found the end of a file and before it closes the file, so an identity that writes
//! to the files when asked puts a write exactly in that window. And transient errors when the
//! engine reopens its files after a crash (EMFILE), made with the process's fd limit.
//!
//! The tests take turns (`SERIAL`): one of them lowers the fd limit of the whole process.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use druid_log_agent::archive::{DirArchive, JobKind, Outcome};
use druid_log_agent::config::{ArchiveConfig, Config};
use druid_log_agent::ingest::{Ingest, NoWatch};
use druid_log_agent::loadgen::encode_cri;
use druid_log_agent::metrics::Metrics;
use druid_log_agent::task::{Identity, PodDir, TaskId, TaskIdentity};

const TASK: &str = "index-parallel-race";

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

type Hook = Box<dyn FnMut() + Send>;

/// The task id is the pod name; "finished" is whatever the test says, and the first time the
/// engine asks, the hook runs (the runtime writes while the engine decides).
#[derive(Clone, Default)]
struct Scripted {
    finished: Arc<Mutex<bool>>,
    hook: Arc<Mutex<Option<Hook>>>,
    /// The pod is not known yet (an API outage).
    pending: Arc<Mutex<bool>>,
}

impl TaskIdentity for Scripted {
    fn identify(&mut self, pod: &PodDir) -> Identity {
        if *self.pending.lock().unwrap() {
            return Identity::Pending;
        }
        Identity::Task(TaskId::new(pod.pod.clone()).unwrap())
    }

    fn container_finished(&mut self, _pod: &PodDir) -> bool {
        if let Some(mut hook) = self.hook.lock().unwrap().take() {
            hook();
        }
        *self.finished.lock().unwrap()
    }
}

/// A container log directory and what `kubectl logs` would print of it.
struct Files {
    dir: PathBuf,
    nanos: u64,
    expected: Arc<Mutex<Vec<u8>>>,
}

impl Files {
    fn append(&mut self, file: &str, lines: usize) {
        append(&self.dir.join(file), &mut self.nanos, lines, &self.expected);
    }
}

fn append(path: &Path, nanos: &mut u64, lines: usize, expected: &Mutex<Vec<u8>>) {
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    let mut rec = Vec::new();
    for i in 0..lines {
        *nanos += 1_000;
        let line =
            format!("2024-05-01T00:00:00,000 INFO [task-runner] line {nanos} {i} of {path:?}");
        rec.clear();
        encode_cri("stdout", *nanos, line.as_bytes(), &mut rec);
        f.write_all(&rec).unwrap();
        let mut e = expected.lock().unwrap();
        e.extend_from_slice(line.as_bytes());
        e.push(b'\n');
    }
}

struct World {
    cfg: Config,
    pod_dir: PathBuf,
    files: Files,
    identity: Scripted,
    ingest: Ingest,
    archive: DirArchive,
    now: Instant,
    /// Last: fields drop in order, and the engine and the appender still write here as they
    /// go (the engine's hand-over flushes on drop).
    _tmp: tempfile::TempDir,
}

impl World {
    fn new() -> World {
        Self::with_archive(|dir| DirArchive::appending(dir, Arc::default()))
    }

    fn with_archive(archive: impl FnOnce(PathBuf) -> DirArchive) -> World {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("pods");
        let archive_dir = tmp.path().join("archive");
        let cfg = Config {
            log_root: root.clone(),
            state_dir: tmp.path().join("state"),
            archive: ArchiveConfig::Dir {
                dir: archive_dir.clone(),
            },
            idle_timeout: std::time::Duration::ZERO,
            ..Config::default()
        };
        let pod_dir = root.join(format!("druid_{TASK}_11111111-2222-3333-4444-555555555555"));
        let dir = pod_dir.join("main");
        fs::create_dir_all(&dir).unwrap();
        let identity = Scripted::default();
        // One appender for the whole test, across the engine's simulated crashes: an agent's
        // crash ends it too, so this asks more of its checks by position than a crash does.
        let archive = archive(archive_dir);
        let ingest = open(&cfg, &identity, &archive);
        World {
            _tmp: tmp,
            cfg,
            pod_dir,
            files: Files {
                dir,
                nanos: 0,
                expected: Arc::default(),
            },
            identity,
            ingest,
            archive,
            now: Instant::now(),
        }
    }

    /// One round of the agent's loop: a rescan (for inotify's events), reads, a commit, and the
    /// archives of tasks whose end is committed. Returns the last archive written, if any.
    fn round(&mut self) -> Option<Vec<u8>> {
        self.now += Duration::from_secs(2);
        let now = self.now;
        self.ingest.scan_all();
        while self.ingest.process(now) {}
        self.ingest.tick(now);
        self.ingest.commit_if_due(now, Duration::from_secs(1));
        let mut archived = None;
        for job in self.ingest.take_archive_jobs() {
            let JobKind::Finish { len, .. } = job.kind else {
                panic!("the directory archive takes no parts");
            };
            let location = self
                .archive
                .finish(&job.pod_dir.name, &job.task, &job.spool, len)
                .unwrap();
            let outcome = Outcome::Done {
                pod_dir: job.pod_dir,
                task: job.task.clone(),
                len,
                location,
            };
            self.ingest.archive_finished(&outcome, now);
            archived = Some(fs::read(self.archive.path_of(&job.task)).unwrap());
        }
        archived
    }

    fn archived(&mut self) -> Vec<u8> {
        for _ in 0..20 {
            if let Some(a) = self.round() {
                return a;
            }
        }
        panic!("task never archived");
    }

    fn on_next_question(&self, hook: impl FnMut() + Send + 'static) {
        *self.identity.hook.lock().unwrap() = Some(Box::new(hook));
    }

    fn set_finished(&self, finished: bool) {
        *self.identity.finished.lock().unwrap() = finished;
    }

    fn set_pending(&self, pending: bool) {
        *self.identity.pending.lock().unwrap() = pending;
    }

    /// The task's spool file.
    fn spool_file(&self) -> PathBuf {
        fs::read_dir(self.cfg.state_dir.join("spool"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|x| x == "gz"))
            .unwrap()
    }

    /// How many spools were set aside as damaged.
    fn set_aside_count(&self) -> usize {
        fs::read_dir(self.cfg.state_dir.join("spool"))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .contains(".corrupt-")
            })
            .count()
    }

    fn expected(&self) -> Vec<u8> {
        self.files.expected.lock().unwrap().clone()
    }
}

/// An engine as the agent starts one, handing sealed text to the archive's appender.
fn open(cfg: &Config, identity: &Scripted, archive: &DirArchive) -> Ingest {
    let mut ingest = Ingest::open(
        cfg,
        Box::new(identity.clone()),
        Box::new(NoWatch),
        Arc::new(Metrics::default()),
    )
    .unwrap();
    if let Some(h) = archive.handoff() {
        ingest.hand_sealed_text_to(h);
    }
    ingest
}

fn assert_same(got: &[u8], want: &[u8]) {
    if got != want {
        let at = got.iter().zip(want).position(|(a, b)| a != b);
        panic!(
            "archive differs: {} bytes archived, {} written, first difference at {at:?}",
            got.len(),
            want.len()
        );
    }
}

/// The container's last lines land after the read that found the end of the file and before
/// the engine learns the container finished: they are read, not cut off by the close.
#[test]
fn last_write_while_the_end_is_decided_is_read() {
    let _turn = serial();
    let mut w = World::new();
    w.files.append("0.log", 50);
    w.round();
    let (path, expected) = (w.files.dir.join("0.log"), w.files.expected.clone());
    let mut nanos = 1 << 40;
    w.on_next_question(move || append(&path, &mut nanos, 7, &expected));
    w.set_finished(true);
    let got = w.archived();
    assert_same(&got, &w.expected());
}

/// Rotation: the runtime writes to the renamed file until it reopens, and the new file gets
/// its first line, both between the engine's read of the old file and its decision that the
/// old file was superseded.
#[test]
fn late_write_to_a_renamed_file_while_the_new_one_starts_is_read() {
    let _turn = serial();
    let mut w = World::new();
    w.files.append("0.log", 50);
    let rotated = w.files.dir.join("0.log.20240501-000001");
    fs::rename(w.files.dir.join("0.log"), &rotated).unwrap();
    // The new file exists (empty), and the engine follows it behind the renamed one.
    fs::File::create(w.files.dir.join("0.log")).unwrap();
    w.round();
    let live = w.files.dir.join("0.log");
    let expected = w.files.expected.clone();
    let mut nanos = 1 << 40;
    w.on_next_question(move || {
        append(&rotated, &mut nanos, 3, &expected);
        append(&live, &mut nanos, 2, &expected);
    });
    w.round();
    w.files.nanos = 1 << 41;
    w.files.append("0.log", 10);
    fs::remove_dir_all(&w.pod_dir).unwrap();
    let got = w.archived();
    assert_same(&got, &w.expected());
}

/// A file closed at its end because the container was said to have finished, which then grows
/// (the status was wrong, or a write came late), is read on from where reading stopped, and
/// the task is archived again, whole.
#[test]
fn a_closed_file_that_grows_is_read_on() {
    let _turn = serial();
    let mut w = World::new();
    w.files.append("0.log", 40);
    w.set_finished(true);
    let first = w.archived();
    assert_same(&first, &w.expected());
    // The container was not done after all.
    w.set_finished(false);
    w.files.append("0.log", 30);
    w.round();
    w.files.append("0.log", 5);
    w.set_finished(true);
    let second = w.archived();
    assert_same(&second, &w.expected());
}

/// The highest fd number in use by this process.
fn highest_fd() -> u64 {
    fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
        .max()
        .unwrap()
}

/// Takes every free fd number up to the highest in use (open() takes the lowest), then sets the
/// limit so that `room` more can be opened at the same time. Returns the old limit and the
/// fds that fill the gaps (close them after restoring the limit).
/// Waits until this process has no thread of that name: a thread's end is no event a test can
/// wait on.
fn wait_until_no_thread_named(name: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let alive = fs::read_dir("/proc/self/task")
            .unwrap()
            .flatten()
            .any(|t| fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim_end() == name));
        if !alive {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "a thread {name} is still running"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn fd_limit_with_room_for(room: u64) -> (u64, Vec<fs::File>) {
    let mut fillers = Vec::new();
    let highest = highest_fd();
    let top = loop {
        let f = fs::File::open("/dev/null").unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&f) as u64;
        fillers.push(f);
        if fd > highest {
            break fd;
        }
    };
    (set_fd_limit(top + 1 + room), fillers)
}

fn set_fd_limit(soft: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain libc calls on a local struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        let old = lim.rlim_cur;
        lim.rlim_cur = soft;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
        old
    }
}

/// After a crash, the engine cannot reopen the files it was reading (EMFILE, as with hundreds
/// of pods): it waits and retries, and never takes them for lost, which would read them again
/// from offset 0 and spool committed text twice.
#[test]
fn restore_under_emfile_retries_and_doubles_nothing() {
    let _turn = serial();
    // No appender: its partial, opened on its own thread whenever it gets there, would take
    // the descriptor counted as room below. For the same reason the appenders of the tests
    // before must be gone (their threads end once their engine and archive are dropped).
    wait_until_no_thread_named("archive-append");
    wait_until_no_thread_named("archive-sweep");
    let mut w = World::with_archive(DirArchive::new);
    w.files.append("0.log", 60);
    w.round();
    w.round(); // committed: the checkpoint names 0.log and how far it was read
    w.files.append("0.log", 20);
    // Room for the checkpoint read and the spool the engine keeps open, none for listing the
    // container directory or opening the log file.
    let (old, fillers) = fd_limit_with_room_for(1);
    // kill -9 before, and the new agent starts now.
    let mut reopened = open(&w.cfg, &w.identity, &w.archive);
    // The first rounds still fail to open anything.
    reopened.tick(w.now);
    set_fd_limit(old);
    drop(fillers);
    w.ingest = reopened;
    w.files.append("0.log", 5);
    w.set_finished(true);
    let got = w.archived();
    assert_same(&got, &w.expected());
    assert_eq!(
        w.ingest
            .metrics()
            .lost_sources
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

/// A pod not known yet (the API away) whose directory is gone when the agent stops: the files
/// the engine holds open are the last copy, so they are read into the spool first. The next
/// engine, once it learns the pod's name, saves the name before the archive goes out: after a
/// crash in between, a later agent could name the log otherwise (the pod gone from its cache)
/// and archive it a second time. The archive is the whole log.
#[test]
fn pending_task_read_at_the_stop_is_named_before_it_is_archived() {
    let _turn = serial();
    let mut w = World::new();
    w.set_pending(true);
    w.files.append("0.log", 60);
    assert!(w.round().is_none());
    fs::remove_dir_all(&w.pod_dir).unwrap();
    assert!(w.ingest.shutdown(Duration::from_secs(3)));
    // The next engine restores the task, still pending, and commits.
    w.ingest = open(&w.cfg, &w.identity, &w.archive);
    assert!(w.round().is_none());
    // It learns the name between two commits: the archive waits for the next one.
    w.set_pending(false);
    let now = w.now + Duration::from_millis(100);
    w.ingest.scan_all();
    while w.ingest.process(now) {}
    w.ingest.tick(now);
    w.ingest.commit_if_due(now, Duration::from_secs(3600));
    assert!(
        w.ingest.take_archive_jobs().is_empty(),
        "archived before the name it learned was saved"
    );
    let got = w.archived();
    assert_same(&got, &w.expected());
}

/// An archived task whose spool turns out damaged after a crash keeps its state: what is left
/// of its files (the kubelet has removed a rotated one since) is not archived again over the
/// complete object.
#[test]
fn archived_task_with_a_damaged_spool_is_not_archived_again() {
    let _turn = serial();
    let mut w = World::new();
    w.files.append("0.log", 40);
    let rotated = w.files.dir.join("0.log.20240501-000001");
    fs::rename(w.files.dir.join("0.log"), &rotated).unwrap();
    w.files.append("0.log", 40);
    w.set_finished(true);
    let complete = w.archived();
    assert_same(&complete, &w.expected());
    w.round(); // the archive's success is committed
    fs::remove_file(&rotated).unwrap();
    let spool = w.spool_file();
    let len = fs::metadata(&spool).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&spool)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    w.ingest = open(&w.cfg, &w.identity, &w.archive);
    for _ in 0..5 {
        assert!(w.round().is_none(), "archived again");
    }
    let archive = w.archive.path_of(&TaskId::new(TASK).unwrap());
    assert_same(&fs::read(archive).unwrap(), &complete);
    let aside = w.set_aside_count();
    assert_eq!(aside, 1, "the damaged spool is kept aside for a look");
}

/// After a crash, the spool itself cannot be opened (EMFILE): the engine refuses to start,
/// naming it, instead of setting the spool aside as damaged and reading the files again; the
/// next start finds everything as it was.
#[test]
fn spool_that_cannot_be_opened_stops_the_start_and_loses_nothing() {
    let _turn = serial();
    let mut w = World::new();
    w.files.append("0.log", 60);
    // A second task: its spool is opened first and held, and the limit leaves no room for
    // the other's.
    let other = w
        .pod_dir
        .with_file_name("druid_index-other_22222222-2222-3333-4444-555555555555")
        .join("main");
    fs::create_dir_all(&other).unwrap();
    let mut nanos = 0;
    append(&other.join("0.log"), &mut nanos, 10, &Mutex::default());
    w.round();
    w.round();
    w.files.append("0.log", 20);
    let (old, fillers) = fd_limit_with_room_for(1);
    let refused = Ingest::open(
        &w.cfg,
        Box::new(w.identity.clone()),
        Box::new(NoWatch),
        Arc::new(Metrics::default()),
    );
    set_fd_limit(old);
    drop(fillers);
    let Err(e) = refused else {
        panic!("started without its spool");
    };
    assert!(e.to_string().contains("cannot open the spool"), "{e}");
    w.ingest = open(&w.cfg, &w.identity, &w.archive);
    w.set_finished(true);
    let archive = w.archive.path_of(&TaskId::new(TASK).unwrap());
    for _ in 0..20 {
        w.round();
    }
    assert_same(&fs::read(archive).unwrap(), &w.expected());
    let aside = w.set_aside_count();
    assert_eq!(aside, 0);
}

/// The spool of an archived task whose pod is gone was removed (its retention ended) after the
/// last checkpoint that names it: the next start forgets the task quietly, it does not take
/// the missing spool for a damaged one.
#[test]
fn spool_removed_by_retention_before_the_last_commit_is_not_damage() {
    let _turn = serial();
    let mut w = World::new();
    w.files.append("0.log", 20);
    w.set_finished(true);
    w.archived();
    w.round(); // the archive's success is committed
    fs::remove_dir_all(&w.pod_dir).unwrap();
    let spool = w.spool_file();
    fs::remove_file(&spool).unwrap();
    w.ingest = open(&w.cfg, &w.identity, &w.archive);
    w.round();
    let errors = w
        .ingest
        .metrics()
        .spool_errors
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        errors, 0,
        "a spool removed by retention was taken for damage"
    );
    let left: Vec<_> = fs::read_dir(w.cfg.state_dir.join("spool"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
