//! Helpers for end-to-end tests that drive the real `druid-log-agent` binary.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

/// A node-like layout in a temporary directory.
pub struct Node {
    pub tmp: tempfile::TempDir,
    pub pods: PathBuf,
    pub state: PathBuf,
    pub archive: PathBuf,
}

impl Node {
    pub fn new() -> Node {
        let tmp = tempfile::tempdir().unwrap();
        let pods = tmp.path().join("pods");
        std::fs::create_dir_all(&pods).unwrap();
        Node {
            pods,
            state: tmp.path().join("state"),
            archive: tmp.path().join("archive"),
            tmp,
        }
    }

    pub fn pod_dir(&self, task: &str) -> PathBuf {
        self.pods
            .join(format!("druid_{task}_0a0b0c0d-1111-2222-3333-444455556666"))
    }

    pub fn archived(&self, task: &str) -> PathBuf {
        self.archive.join(format!("{task}.log"))
    }
}

/// The agent binary running as a child process, its stderr collected line by line.
pub struct AgentProc {
    pub child: Child,
    pub lines: Receiver<String>,
}

impl AgentProc {
    pub fn command(node: &Node, extra: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_druid-log-agent"));
        cmd.arg("run")
            .arg("--log-root")
            .arg(&node.pods)
            .arg("--state-dir")
            .arg(&node.state)
            .arg("--archive-dir")
            .arg(&node.archive)
            .args(extra)
            .env("RUST_LOG", "info")
            .env_remove("DLA_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        cmd
    }

    pub fn start(node: &Node, extra: &[&str]) -> AgentProc {
        Self::spawn(Self::command(node, extra))
    }

    pub fn spawn(mut cmd: Command) -> AgentProc {
        let mut child = cmd.spawn().expect("start agent");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if std::env::var_os("AGENT_LOG").is_some() {
                    eprintln!("agent: {line}");
                }
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        AgentProc { child, lines: rx }
    }

    /// Waits for a line of the agent's log containing `needle`; returns it.
    pub fn wait_for_line(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return l,
                Ok(_) => {}
                Err(_) => panic!("agent never logged {needle:?} within {timeout:?}"),
            }
        }
    }

    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM; returns the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        self.child.wait().unwrap()
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `path` holds at least `len` bytes, then returns its content. The archive is
/// written to a temp file and renamed, so a reader never sees a partial archive.
pub fn wait_for_archive(path: &Path, len: usize, timeout: Duration) -> Vec<u8> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(b) = std::fs::read(path)
            && b.len() >= len
        {
            return b;
        }
        assert!(
            Instant::now() < deadline,
            "{} did not reach {len} bytes within {timeout:?} (has {:?})",
            path.display(),
            std::fs::metadata(path).map(|m| m.len()).ok()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A readable report of where two logs part.
pub fn assert_same_log(got: &[u8], want: &[u8]) {
    if got == want {
        return;
    }
    let at = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    let ctx = |b: &[u8]| {
        String::from_utf8_lossy(&b[at.saturating_sub(80)..(at + 80).min(b.len())]).into_owned()
    };
    panic!(
        "archive differs from what was written: {} bytes archived, {} written, first difference at byte {at}\n--- archived:\n{}\n--- written:\n{}",
        got.len(),
        want.len(),
        ctx(got),
        ctx(want)
    );
}
