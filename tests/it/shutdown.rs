//! How the agent stops: seen from a program that embeds it (the agent's log lines are captured
//! to see why it stops when it does), and the binary's drain as an HTTP client sees it (more
//! of the binary's SIGTERM path is in tests/it/e2e.rs, the pod watch's in tests/it/kube.rs).

use std::io::Write;
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::{Duration, Instant};

use druid_log_agent::app::Agent;
use druid_log_agent::archive::{DirArchive, Target};
use druid_log_agent::config::{ArchiveConfig, Config};
use druid_log_agent::loadgen::PeonWriter;
use druid_log_agent::task::DirNameIdentity;

const LONG: Duration = Duration::from_secs(60);

/// One formatted log event, sent when the subscriber is done writing it.
struct Line(Vec<u8>, Sender<String>);

impl Write for Line {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        let _ = self.1.send(String::from_utf8_lossy(&self.0).into_owned());
    }
}

/// The agent's log lines from now on (for the whole test binary: one test per binary).
fn capture_log() -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    tracing_subscriber::fmt()
        .with_ansi(false)
        .with_env_filter("info")
        .with_writer(move || Line(Vec::new(), tx.clone()))
        .init();
    rx
}

fn wait_for(log: &Receiver<String>, needle: &str, seen: &mut Vec<String>) {
    let deadline = Instant::now() + LONG;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = log
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("the agent never logged {needle:?}: {seen:#?}"));
        seen.push(line);
        if seen.last().is_some_and(|l| l.contains(needle)) {
            return;
        }
    }
}

/// An archive job whose hand-over to the archive worker failed (the worker is gone: its
/// runtime was shut down) is not waited for at shutdown: nothing will ever answer it, so
/// counting it in flight made every stop wait out the whole grace period.
#[test]
fn shutdown_does_not_wait_for_jobs_never_handed_over() {
    let log = capture_log();
    let tmp = tempfile::tempdir().unwrap();
    let pods = tmp.path().join("pods");
    let cfg = Config {
        log_root: pods.clone(),
        state_dir: tmp.path().join("state"),
        archive: ArchiveConfig::Dir {
            dir: tmp.path().join("archive"),
        },
        idle_timeout: Duration::ZERO,
        commit_interval: Duration::from_millis(20),
        poll_interval: Duration::from_millis(20),
        // Short, so that the failure on code that waits for it comes soon; the test waits
        // for no time, only for what the agent says.
        shutdown_timeout: Duration::from_secs(1),
        ..Config::default()
    };
    let pod = pods.join("druid_index-kafka-never-sent_0a0b0c0d-1111-2222-3333-444455556666");
    let mut w = PeonWriter::create(&pod.join("main"), 0).unwrap();
    w.write_line("stdout", b"one line").unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let agent = Agent::start(
        &cfg,
        Box::new(DirNameIdentity),
        Target::Dir(DirArchive::new(tmp.path().join("archive"))),
        None,
        rt.handle(),
        Default::default(),
    )
    .unwrap();
    // The archive worker goes away with its runtime.
    rt.shutdown_background();
    let mut seen = Vec::new();
    wait_for(&log, "new pod log directory", &mut seen);
    // The pod is gone: the task ends and its archive job cannot be handed over.
    std::fs::remove_dir_all(&pod).unwrap();
    wait_for(&log, "archive worker is gone", &mut seen);
    agent.shutdown();
    seen.extend(log.try_iter());
    assert!(
        !seen.iter().any(|l| l.contains("archives still running")),
        "shutdown waited for a job the worker never got: {seen:#?}"
    );
}

/// A `follow=true` response open when SIGTERM comes is not cut: the agent reads what is left
/// in the file, sends it, and ends the chunked body with its last chunk. The client has the
/// whole log, lines written just before the signal included, in a complete response, and the
/// agent exits 0.
#[test]
fn follow_stream_open_at_sigterm_ends_with_a_complete_body() {
    use crate::common::{AgentProc, Node, http, wait_for_bytes, write_log};
    use druid_log_agent::loadgen::LineGen;
    use std::io::Read;

    let node = Node::new();
    let task = "index-kafka-follow-at-stop";
    let mut w = PeonWriter::create(&node.pod_dir(task).join("main"), 0).unwrap();
    let mut lines = LineGen::new(21);
    write_log(&mut w, &mut lines, 64 << 10, None);
    let agent = AgentProc::start(&node, &["--idle-timeout-secs", "0"]);
    let addr = agent.http_addr();
    wait_for_bytes(&addr, task, w.expected.len(), LONG);

    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        s,
        "GET /druid/indexer/v1/task/{task}/log?follow=true HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    // The response has begun: the stream is open.
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    while !raw.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "the agent closed the connection before answering");
        raw.extend_from_slice(&buf[..n]);
    }
    // Read on while the agent stops, so its writes never wait for this test.
    let reader = std::thread::spawn(move || {
        let got = s.read_to_end(&mut raw);
        (got, raw)
    });
    // Not read yet when the signal comes, most likely: the drain reads it.
    write_log(&mut w, &mut lines, 16 << 10, None);
    let mut agent = agent;
    unsafe {
        libc::kill(agent.child.id() as i32, libc::SIGTERM);
    }
    let (got, raw) = reader.join().unwrap();
    got.expect("the follow stream was cut (connection reset), not ended");
    assert!(
        raw.ends_with(b"\r\n0\r\n\r\n"),
        "the chunked body has no last chunk: the stream was cut ({} bytes, ending {:?})",
        raw.len(),
        String::from_utf8_lossy(&raw[raw.len().saturating_sub(40)..])
    );
    let reply = http::parse(&raw).expect("a whole response");
    assert_eq!(reply.status, 200);
    assert!(
        reply.body == w.expected,
        "the follower got {} of {} bytes",
        reply.body.len(),
        w.expected.len()
    );
    assert!(agent.child.wait().unwrap().success());
}
