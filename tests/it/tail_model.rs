//! Model-based test of tail + decode + spool + checkpoint: random sequences of what a runtime
//! and the kubelet do to a container's log files (writes, rename rotations with late writes
//! and gzip, restarts, deletion of the pod directory) interleaved with what the agent does
//! (reads, rescans, commits, crashes and restarts), driven in-process and deterministically.
//! The model is `PeonWriter::expected`, the text `kubectl logs` would print; the archive must
//! equal it exactly.

use std::fs;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use druid_log_agent::archive::{DirArchive, JobKind, Outcome};
use druid_log_agent::config::{ArchiveConfig, Config};
use druid_log_agent::ingest::{Ingest, NoWatch};
use druid_log_agent::loadgen::{LineGen, PeonWriter};
use druid_log_agent::metrics::Metrics;
use druid_log_agent::task::{DirNameIdentity, TaskId};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    /// Write this many lines (some long, some stack traces).
    Write(u8),
    /// A runtime write of a line bigger than the reader's buffer.
    WriteHuge,
    Rotate {
        late_write: bool,
    },
    Restart,
    /// The kubelet renames the live file away, the runtime fails to reopen, the kubelet
    /// renames it back.
    RotateFailed,
    /// The agent dies and stays down across two rotations (lines written in between): the
    /// first rotated file is gzipped meanwhile and must be read back from its `.gz`.
    DownAcrossRotations,
    /// copytruncate (logrotate, not the kubelet): the live file is cut to zero in place. The
    /// agent has read it up to here and notices the shrink at once, as inotify makes it.
    Truncate,
    /// The agent reads what inotify would have pointed at.
    Process,
    /// The agent's periodic rescan.
    Rescan,
    Commit,
    /// kill -9 and start again from the state directory.
    Crash,
    /// SIGTERM and start again.
    Stop,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1u8..40).prop_map(Op::Write),
        1 => Just(Op::WriteHuge),
        2 => any::<bool>().prop_map(|late_write| Op::Rotate { late_write }),
        1 => Just(Op::Restart),
        1 => Just(Op::Truncate),
        1 => Just(Op::RotateFailed),
        1 => Just(Op::DownAcrossRotations),
        4 => Just(Op::Process),
        1 => Just(Op::Rescan),
        2 => Just(Op::Commit),
        2 => Just(Op::Crash),
        1 => Just(Op::Stop),
    ]
}

struct World {
    cfg: Config,
    pod_dir: PathBuf,
    task: TaskId,
    writer: PeonWriter,
    lines: LineGen,
    ingest: Option<Ingest>,
    archive: DirArchive,
    now: Instant,
    /// Last: fields drop in order, and the engine and the appender still write here as they
    /// go (the engine's hand-over flushes on drop).
    _tmp: tempfile::TempDir,
}

impl World {
    fn new(seed: u64, block_bytes: usize) -> World {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("pods");
        let archive_dir = tmp.path().join("archive");
        let cfg = Config {
            log_root: root.clone(),
            state_dir: tmp.path().join("state"),
            archive: ArchiveConfig::Dir {
                dir: archive_dir.clone(),
            },
            block_bytes,
            idle_timeout: std::time::Duration::ZERO,
            ..Config::default()
        };
        let task = TaskId::new("index-parallel-wiki-abc").unwrap();
        let pod_dir = root.join(format!("druid_{task}_11111111-2222-3333-4444-555555555555"));
        let writer = PeonWriter::create(&pod_dir.join("main"), 0).unwrap();
        let mut lines = LineGen::new(seed);
        lines.long_every = 50;
        let mut w = World {
            _tmp: tmp,
            cfg,
            pod_dir,
            task,
            writer,
            lines,
            ingest: None,
            archive: DirArchive::appending(archive_dir, Arc::default()),
            now: Instant::now(),
        };
        w.start();
        w
    }

    fn start(&mut self) {
        let mut ingest = Ingest::open(
            &self.cfg,
            Box::new(DirNameIdentity),
            Box::new(NoWatch),
            Arc::new(Metrics::default()),
        )
        .unwrap();
        ingest.hand_sealed_text_to(self.archive.handoff().unwrap());
        self.ingest = Some(ingest);
        self.process();
    }

    fn ingest(&mut self) -> &mut Ingest {
        self.ingest.as_mut().unwrap()
    }

    fn process(&mut self) {
        self.now += Duration::from_millis(10);
        let now = self.now;
        // A rescan stands for the inotify events a real agent would get.
        self.ingest().scan_all();
        while self.ingest().process(now) {}
        // As the agent's loop does after every round: commits when the interval is over or
        // something asked for one (a task ended, a file was truncated).
        self.ingest().commit_if_due(now, Duration::from_secs(1));
    }

    fn apply(&mut self, op: &Op) {
        let mut line = Vec::new();
        match op {
            Op::Write(n) => {
                for _ in 0..*n {
                    self.lines.next_line(&mut line);
                    let stream = if line.first() == Some(&b'\t') {
                        "stderr"
                    } else {
                        "stdout"
                    };
                    self.writer.write_line(stream, &line).unwrap();
                }
            }
            Op::WriteHuge => {
                line.resize(300 << 10, b'x');
                self.writer.write_line("stdout", &line).unwrap();
            }
            Op::Rotate { late_write } => {
                // The kubelet rotates at most every 10 s and gzips a rotated file only at the
                // next rotation; by then a running agent has read it and committed (every
                // second), which this stands for. Losing a file that was never read is the
                // one loss no agent can prevent.
                self.process();
                self.now += Duration::from_secs(10);
                let now = self.now;
                self.ingest().tick(now);
                self.ingest().commit(now);
                self.writer.rotate(*late_write).unwrap();
                self.process();
            }
            Op::Restart => {
                self.writer.restart().unwrap();
                self.process();
            }
            Op::DownAcrossRotations => {
                // The live file has lines (a fingerprint to be recognised by in its .gz), and
                // as before any rotation the agent ran and committed for ten seconds; then it
                // dies.
                for _ in 0..3 {
                    self.lines.next_line(&mut line);
                    self.writer.write_line("stdout", &line).unwrap();
                }
                self.process();
                self.now += Duration::from_secs(10);
                let now = self.now;
                self.ingest().tick(now);
                self.ingest().commit(now);
                self.ingest = None;
                self.writer.rotate(true).unwrap();
                for _ in 0..3 {
                    self.lines.next_line(&mut line);
                    self.writer.write_line("stdout", &line).unwrap();
                }
                self.writer.rotate(false).unwrap();
                self.start();
            }
            Op::RotateFailed => {
                let live = self.writer.live_path();
                let aside = live.with_extension("log.20991231-235959");
                fs::rename(&live, &aside).unwrap();
                self.process();
                fs::rename(&aside, &live).unwrap();
                self.process();
            }
            Op::Truncate => {
                self.process();
                fs::OpenOptions::new()
                    .write(true)
                    .open(self.writer.live_path())
                    .unwrap()
                    .set_len(0)
                    .unwrap();
                self.process();
            }
            Op::Process => self.process(),
            Op::Rescan => {
                self.ingest().scan_all();
            }
            Op::Commit => {
                let now = self.now;
                self.ingest().commit(now);
            }
            Op::Crash => {
                // A crash ends the appender too; its partial files stay behind.
                self.ingest = None;
                let ArchiveConfig::Dir { dir } = &self.cfg.archive else {
                    unreachable!("a directory archive")
                };
                self.archive = DirArchive::appending(dir, Arc::default());
                self.start();
            }
            // The appender outlives this stop (in the agent it ends with the process): the
            // engine that starts next hands it blocks that may not continue its partials, which
            // asks more of its checks by position than a real stop does.
            Op::Stop => {
                self.ingest()
                    .shutdown(druid_log_agent::shutdown::READ_DRAIN);
                self.ingest = None;
                self.start();
            }
        }
    }

    /// The kubelet removes the pod directory; the agent drains and archives.
    fn finish(&mut self) -> Vec<u8> {
        fs::remove_dir_all(&self.pod_dir).unwrap();
        for _ in 0..100 {
            self.process();
            self.now += Duration::from_secs(2);
            let now = self.now;
            self.ingest().tick(now);
            self.ingest().commit_if_due(now, Duration::from_secs(1));
            if let Some(job) = self.ingest().take_archive_jobs().pop() {
                let JobKind::Finish { len, .. } = job.kind else {
                    panic!("the directory archive takes no parts");
                };
                let location = self
                    .archive
                    .finish(&job.pod_dir.name, &job.task, &job.spool, len)
                    .unwrap();
                let outcome = Outcome::Done {
                    pod_dir: job.pod_dir,
                    task: job.task,
                    len,
                    location,
                };
                self.ingest().archive_finished(&outcome, now);
                return fs::read(self.archive.path_of(&self.task)).unwrap();
            }
        }
        panic!("task never archived");
    }
}

fn check(seed: u64, block_bytes: usize, ops: &[Op]) -> Result<(), TestCaseError> {
    let mut w = World::new(seed, block_bytes);
    for op in ops {
        w.apply(op);
    }
    let got = w.finish();
    let mut want = w.writer.expected.clone();
    if want.is_empty() {
        want = druid_log_agent::archive::placeholder(&w.task).into_bytes();
    }
    if got != want {
        let at = got
            .iter()
            .zip(want.iter())
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(want.len()));
        return Err(TestCaseError::fail(format!(
            "archive differs: {} bytes archived, {} written, first difference at {at}",
            got.len(),
            want.len()
        )));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn archive_equals_what_was_written(
        seed in any::<u64>(),
        block_kib in prop_oneof![Just(4usize), Just(64usize)],
        ops in proptest::collection::vec(op(), 1..40),
    ) {
        check(seed, block_kib << 10, &ops)?;
    }
}

#[test]
fn rotation_then_crash_before_any_commit() {
    use Op::*;
    check(
        1,
        4096,
        &[
            Write(30),
            Process,
            Rotate { late_write: true },
            Write(30),
            Crash,
            Write(5),
        ],
    )
    .unwrap();
}

/// With inotify unusable (watch limit reached), the engine falls back to rescanning on every
/// poll and still finds and reads everything.
#[test]
fn watch_errors_fall_back_to_polling_rescans() {
    struct Exhausted;
    impl druid_log_agent::ingest::DirWatcher for Exhausted {
        fn watch(&mut self, _: &std::path::Path) -> Result<(), notify::Error> {
            Err(notify::Error::generic("inotify watch limit reached"))
        }
        fn unwatch(&mut self, _: &std::path::Path) {}
    }
    let mut w = World::new(5, 4096);
    let metrics = Arc::new(Metrics::default());
    w.ingest = Some(
        Ingest::open(
            &w.cfg,
            Box::new(DirNameIdentity),
            Box::new(Exhausted),
            metrics.clone(),
        )
        .unwrap(),
    );
    w.apply(&Op::Write(20));
    // Only the periodic tick runs: no explicit scan, no events.
    w.now += Duration::from_secs(1);
    let now = w.now;
    w.ingest().tick(now);
    w.ingest().tick(now);
    assert!(
        metrics
            .watch_errors
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
    assert!(metrics.rescans.load(std::sync::atomic::Ordering::Relaxed) >= 2);
    assert_eq!(
        metrics
            .read_bytes
            .load(std::sync::atomic::Ordering::Relaxed),
        fs::metadata(w.writer.live_path()).unwrap().len()
    );
}

/// At `spool_max_bytes` reading pauses (counted, logged), nothing is dropped, and it resumes
/// once archives free space.
#[test]
fn full_spools_pause_reading_until_space_is_freed() {
    let mut w = World::new(6, 4096);
    w.cfg.spool_max_bytes = 16 << 10;
    w.cfg.retention = std::time::Duration::from_secs(3600);
    let metrics = Arc::new(Metrics::default());
    w.ingest = Some(
        Ingest::open(
            &w.cfg,
            Box::new(DirNameIdentity),
            Box::new(NoWatch),
            metrics.clone(),
        )
        .unwrap(),
    );
    w.apply(&Op::Write(255));
    w.apply(&Op::Write(255));
    w.apply(&Op::Process);
    let read = metrics
        .read_bytes
        .load(std::sync::atomic::Ordering::Relaxed);
    let written = fs::metadata(w.writer.live_path()).unwrap().len();
    assert!(read < written, "read {read} of {written}: no pause");
    assert_eq!(
        metrics
            .backpressure_pauses
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // The pod goes away: its log is still read to the end through the open file, archived,
    // and the spool is freed early despite the retention time.
    let got = w.finish();
    assert_eq!(got, w.writer.expected);
}
