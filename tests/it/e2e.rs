//! End-to-end tests of the real binary on a node-like log tree with the directory archive.

use crate::common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::{Duration, SystemTime};

use common::{AgentProc, Node, assert_same_log, metric, wait_for_archive, wait_until, write_log};
use druid_log_agent::loadgen::{LineGen, PeonWriter, Rng};

const LONG: Duration = Duration::from_secs(60);

/// The agent is killed with SIGKILL (and now and then stopped with SIGTERM) at random moments
/// while a peon writes, rotates and restarts; every restart resumes from the checkpoint. The
/// archive must be byte-identical to what was written: nothing lost, nothing twice.
#[test]
fn kill9_at_random_moments_loses_and_doubles_nothing() {
    let seed = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("CRASH_SEED={seed}");
    let node = Node::new();
    let task = "index-kafka-crash";
    let main = node.pod_dir(task).join("main");
    // Intervals scaled down with the rotation period: the kubelet rotates at most every 10 s,
    // here every half second.
    let args = [
        "--idle-timeout-secs",
        "2",
        "--commit-interval-ms",
        "20",
        "--block-max-age-ms",
        "20",
        "--poll-interval-ms",
        "50",
    ];
    let writer = std::thread::spawn(move || {
        let mut w = PeonWriter::create(&main, 512 << 10).unwrap();
        let mut lines = LineGen::new(seed);
        lines.long_every = 200;
        write_log(&mut w, &mut lines, 3 << 20, Some(1 << 20));
        w.write_line("stderr", b"java.lang.OutOfMemoryError: Java heap space")
            .unwrap();
        w.restart().unwrap();
        write_log(&mut w, &mut lines, 3 << 20, Some(1 << 20));
        w
    });
    let mut rng = Rng::new(seed);
    let mut agent = AgentProc::start(&node, &args);
    let mut kills = 0;
    while !writer.is_finished() {
        std::thread::sleep(Duration::from_millis(50 + rng.below(400)));
        if rng.below(4) == 0 {
            let status = agent.terminate();
            assert!(
                status.success(),
                "SIGTERM must end the agent cleanly, got {status}"
            );
        } else {
            agent.kill9();
        }
        kills += 1;
        agent = AgentProc::start(&node, &args);
    }
    let w = writer.join().unwrap();
    assert!(kills >= 5, "only {kills} restarts; the test proves little");
    let got = wait_for_archive(&node.archived(task), w.expected.len(), LONG);
    assert_same_log(&got, &w.expected);
    let status = agent.terminate();
    assert!(status.success());
}

/// First start on a node that already has logs: rotated uncompressed files and live files are
/// read from their start, in order; gzipped rotations are not read.
#[test]
fn startup_on_existing_logs_without_checkpoint() {
    let node = Node::new();
    let task = "index-parallel-existing";
    let mut w = PeonWriter::create(&node.pod_dir(task).join("main"), 0).unwrap();
    let mut lines = LineGen::new(7);
    write_log(&mut w, &mut lines, 100 << 10, None);
    w.rotate(false).unwrap();
    let gz_part = w.expected.len();
    write_log(&mut w, &mut lines, 100 << 10, None);
    w.rotate(false).unwrap(); // the first rotation is gzipped now
    write_log(&mut w, &mut lines, 100 << 10, None);
    let agent = AgentProc::start(&node, &["--idle-timeout-secs", "1"]);
    let addr = agent.http_addr();
    let want = &w.expected[gz_part..];
    let got = wait_for_archive(&node.archived(task), want.len(), LONG);
    assert_same_log(&got, want);
    // One run read the whole log: the file written as it was read became the archive, and
    // the spool was not inflated for it.
    wait_until(LONG, "the archive counted as renamed", || {
        metric(&addr, "druid_log_agent_dir_archives_renamed_total") == Some(1)
    });
    assert_eq!(
        metric(&addr, "druid_log_agent_dir_archives_written_total"),
        Some(0)
    );
    assert!(agent.terminate().success());
}

/// A log file the agent may not open is reported clearly and retried; once it becomes
/// readable its whole content is shipped.
#[test]
fn unreadable_file_is_reported_then_read() {
    let node = Node::new();
    let task = "index-kafka-unreadable";
    let mut w = PeonWriter::create(&node.pod_dir(task).join("main"), 0).unwrap();
    let mut lines = LineGen::new(3);
    write_log(&mut w, &mut lines, 50 << 10, None);
    let live = w.live_path();
    fs::set_permissions(&live, fs::Permissions::from_mode(0o000)).unwrap();
    // As root the agent would read the file anyway; drop the capabilities that bypass file
    // permissions, as a non-root agent container would lack them.
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--inh-caps=-dac_override,-dac_read_search",
        "--bounding-set=-dac_override,-dac_read_search",
        "--",
    ]);
    let base = AgentProc::command(
        &node,
        &["--idle-timeout-secs", "1", "--rescan-interval-secs", "1"],
    );
    cmd.arg(base.get_program()).args(base.get_args());
    for (k, v) in base.get_envs() {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let agent = AgentProc::spawn(cmd);
    let line = agent.wait_for_line("cannot open log file", LONG);
    assert!(
        line.contains("0.log") && line.contains("ermission denied"),
        "{line}"
    );
    fs::set_permissions(&live, fs::Permissions::from_mode(0o644)).unwrap();
    let got = wait_for_archive(&node.archived(task), w.expected.len(), LONG);
    assert_same_log(&got, &w.expected);
    assert!(agent.terminate().success());
}

/// The state directory fills up: the agent says so, keeps the data in the source files, and
/// once space returns it catches up; the archive is complete and not corrupted.
#[test]
fn full_state_disk_is_reported_and_recovered() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    }
    let node = Node::new();
    fs::create_dir_all(&node.state).unwrap();
    let mount = |opts: &str| {
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", opts, "tmpfs"])
            .arg(&node.state)
            .status()
            .unwrap();
        assert!(st.success(), "mount -o {opts} failed");
    };
    mount("size=128k");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _guard = Unmount(node.state.clone());
    let task = "index-kafka-diskfull";
    let mut w = PeonWriter::create(&node.pod_dir(task).join("main"), 0).unwrap();
    let mut lines = LineGen::new(11);
    let agent = AgentProc::start(&node, &["--idle-timeout-secs", "1"]);
    // About 1.5 MiB of spool at level 1: far more than 128 KiB.
    write_log(&mut w, &mut lines, 6 << 20, None);
    let line = agent.wait_for_line("cannot write spool block", LONG);
    assert!(line.contains("No space left on device"), "{line}");
    // Space comes back.
    let st = Command::new("mount")
        .args(["-o", "remount,size=64m"])
        .arg(&node.state)
        .status()
        .unwrap();
    assert!(st.success());
    let got = wait_for_archive(&node.archived(task), w.expected.len(), LONG);
    assert_same_log(&got, &w.expected);
    assert!(agent.terminate().success());
}

/// SIGTERM while the agent is still starting (the kubelet stops pods whenever it likes) is a
/// clean stop, exit 0, as after start: the handler is in place before the agent says anything.
#[test]
fn sigterm_during_start_is_a_clean_stop() {
    let node = Node::new();
    let task = "index-kafka-early-term";
    let mut w = PeonWriter::create(&node.pod_dir(task).join("main"), 0).unwrap();
    write_log(&mut w, &mut LineGen::new(9), 64 << 10, None);
    let agent = AgentProc::start(&node, &[]);
    agent.wait_for_line("agent started", LONG);
    let status = agent.terminate();
    assert!(status.success(), "{status}");
}

/// A second agent on a state directory another agent uses exits at once, non-zero, naming the
/// directory, before it reads the checkpoint; the first goes on, and once it has stopped the
/// directory can be used again.
#[test]
fn second_agent_on_a_state_directory_is_refused() {
    let node = Node::new();
    let task = "index-kafka-two-agents";
    let mut w = PeonWriter::create(&node.pod_dir(task).join("main"), 0).unwrap();
    write_log(&mut w, &mut LineGen::new(11), 64 << 10, None);
    let first = AgentProc::start(&node, &["--idle-timeout-secs", "0"])
        .listening_or_exit()
        .unwrap_or_else(|(status, log)| panic!("the first agent did not start ({status}): {log}"));
    // A checkpoint holding the task, which a second agent would restore.
    let checkpoint = node.state.join(druid_log_agent::checkpoint::FILE_NAME);
    let deadline = std::time::Instant::now() + LONG;
    while !fs::read_to_string(&checkpoint).is_ok_and(|c| c.contains(task)) {
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint holds {task}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let second = AgentProc::start(&node, &["--idle-timeout-secs", "0"]).listening_or_exit();
    let Err((status, log)) = second else {
        panic!("a second agent started on the state directory of the first");
    };
    assert!(!status.success(), "{status}: {log}");
    let dir = node.state.display().to_string();
    assert!(
        log.contains(&dir) && log.contains("in use by another agent"),
        "{log}"
    );
    assert!(
        !log.contains("resumed task from checkpoint"),
        "the second agent read the checkpoint: {log}"
    );
    assert!(first.terminate().success());
    let third = AgentProc::start(&node, &["--idle-timeout-secs", "0"])
        .listening_or_exit()
        .unwrap_or_else(|(status, log)| panic!("the directory stayed locked ({status}): {log}"));
    assert!(third.terminate().success());
}

/// A log root that does not exist is named as such (not as an inotify limit), and once it
/// appears its pods are read: the rescans look again.
#[test]
fn a_missing_log_root_is_named_and_read_once_it_appears() {
    let node = Node::new();
    fs::remove_dir(&node.pods).unwrap();
    let agent = AgentProc::start(&node, &["--rescan-interval", "1s"]);
    // The warning and the address come in either order (ingest and HTTP start side by side).
    let (mut addr, mut warning) = (None, None);
    while addr.is_none() || warning.is_none() {
        let l = agent.wait_for_any(&["listening", "check log_root", "cannot watch"], LONG);
        if l.contains("listening") {
            addr = l
                .split_whitespace()
                .find_map(|w| w.strip_prefix("addr="))
                .map(str::to_owned);
        } else {
            warning = Some(l);
        }
    }
    let (addr, warning) = (addr.unwrap(), warning.unwrap());
    assert!(
        warning.contains("it does not exist (check log_root)"),
        "{warning}"
    );
    let task = "index-kafka-late-root";
    let mut w = PeonWriter::create(&node.pod_dir(task).join("main"), 0).unwrap();
    let mut lines = LineGen::new(5);
    write_log(&mut w, &mut lines, 16 << 10, None);
    common::wait_for_bytes(&addr, task, w.expected.len(), LONG);
    assert!(agent.terminate().success());
}
