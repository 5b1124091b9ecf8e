//! Helpers for end-to-end tests that drive the real `druid-log-agent` binary.

#![allow(dead_code)]

pub mod no_list_bucket;

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
            .arg("--listen")
            .arg("127.0.0.1:0")
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
        self.wait_for_any(&[needle], timeout)
    }

    /// Waits for a line containing any of `needles` (an outcome or its failure, so a test
    /// fails on the first sign of the wrong one rather than at its timeout); returns it.
    pub fn wait_for_any(&self, needles: &[&str], timeout: Duration) -> String {
        self.wait_for_line_where(&format!("any of {needles:?}"), timeout, |l| {
            needles.iter().any(|n| l.contains(n))
        })
    }

    /// Waits for a line of the agent's log that `matches` (`what` names it in the panic
    /// message if none comes); returns it.
    pub fn wait_for_line_where(
        &self,
        what: &str,
        timeout: Duration,
        matches: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if matches(&l) => return l,
                Ok(_) => {}
                Err(_) => panic!("agent never logged {what} within {timeout:?}"),
            }
        }
    }

    /// Waits until the agent either listens (`Ok`, still running) or exits before it does
    /// (`Err` with its exit status and everything it logged): a test of start-up refusals
    /// waits for one of the two events, never for a time.
    pub fn listening_or_exit(mut self) -> Result<AgentProc, (std::process::ExitStatus, String)> {
        let mut log = String::new();
        // The stderr reader ends (and the channel closes) when the process exits.
        for line in self.lines.iter() {
            if line.contains("listening") {
                return Ok(self);
            }
            log.push_str(&line);
            log.push('\n');
        }
        Err((self.child.wait().unwrap(), log))
    }

    /// Every line up to and including the first that contains `needle`, in order: for tests
    /// that look at the whole log, not one line of it.
    pub fn lines_until(&self, needle: &str, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut lines = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    let done = l.contains(needle);
                    lines.push(l);
                    if done {
                        return lines;
                    }
                }
                Err(_) => panic!(
                    "agent never logged {needle:?} within {timeout:?}; it logged:\n{}",
                    lines.join("\n")
                ),
            }
        }
    }

    /// SIGTERM; returns the exit status and every line not read yet, up to the last one the
    /// agent wrote (the reader ends when the agent closes its stderr by exiting).
    pub fn terminate_collect(mut self) -> (std::process::ExitStatus, Vec<String>) {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let rest = self.lines.iter().collect();
        (self.child.wait().unwrap(), rest)
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

impl AgentProc {
    /// Waits for the agent to log its HTTP address and returns it.
    pub fn http_addr(&self) -> String {
        let line = self.wait_for_line("listening", Duration::from_secs(60));
        let addr = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("addr="))
            .unwrap_or_else(|| panic!("no addr= in {line:?}"));
        addr.to_owned()
    }
}

pub use druid_log_agent_testkit::http::{self, Reply};

/// Polls `done` until it holds: for states no event announces (a process's readiness, a
/// metric of another process).
pub fn wait_until(timeout: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The value of an unlabelled metric in the agent's `/metrics` answer.
pub fn metric(addr: &str, name: &str) -> Option<u64> {
    let metrics = String::from_utf8(http_get(addr, "/metrics", &[]).body).unwrap();
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// One HTTP/1.1 GET with `Connection: close`; `extra` are raw header lines.
pub fn http_get(addr: &str, target: &str, extra: &[&str]) -> Reply {
    http::get(addr, target, extra, None).unwrap_or_else(|e| panic!("GET {target} from {addr}: {e}"))
}

/// `task`'s entry in `/tasks`, if it has one; `extra` are header lines (a token).
pub fn task_entry(addr: &str, task: &str, extra: &[&str]) -> Option<serde_json::Value> {
    let r = http_get(addr, "/tasks", extra);
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == task)
        .cloned()
}

/// Waits until `/tasks` reports `task` holding `len` bytes of log.
pub fn wait_for_bytes(addr: &str, task: &str, len: usize, timeout: Duration) {
    wait_for_bytes_with(addr, task, len, timeout, &[]);
}

/// [`wait_for_bytes`] sending `extra` header lines (a token) with every request.
pub fn wait_for_bytes_with(addr: &str, task: &str, len: usize, timeout: Duration, extra: &[&str]) {
    let deadline = Instant::now() + timeout;
    loop {
        let have = task_entry(addr, task, extra).and_then(|t| t["bytes"].as_u64());
        if have == Some(len as u64) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "task {task} has {have:?} bytes, want {len}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

// Not every test crate that includes this module uses them.
#[allow(unused_imports)]
pub use druid_log_agent_testkit::moto::{Moto, client_for};

/// Creates a bucket, for the tests that drive the binary from plain threads.
pub fn create_bucket_now(moto: &Moto, bucket: &str) {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(moto.client().create_bucket().bucket(bucket).send())
        .unwrap_or_else(|e| panic!("create bucket {bucket}: {e:?}"));
}

/// The options of an agent archiving to `bucket` of the S3 server at `endpoint` (path style,
/// 5 MiB parts, retries at most 2 s apart).
pub fn s3_args<'a>(endpoint: &'a str, bucket: &'a str) -> [&'a str; 10] {
    [
        "--s3-bucket",
        bucket,
        "--s3-endpoint",
        endpoint,
        "--s3-path-style",
        "true",
        "--s3-part-bytes",
        "5242880",
        "--archive-retry-max-secs",
        "2",
    ]
}

/// The agent archiving to S3 (see [`s3_args`]), with `extra` options.
pub fn agent_s3(node: &Node, endpoint: &str, bucket: &str, extra: &[&str]) -> AgentProc {
    let mut args = s3_args(endpoint, bucket).to_vec();
    args.extend_from_slice(extra);
    let mut cmd = AgentProc::command(node, &args);
    s3_env(&mut cmd);
    AgentProc::spawn(cmd)
}

/// Polls the object until it has at least `len` bytes (an object appears whole or not at all)
/// and returns it. At the timeout, returns what is there for the caller to compare (a shorter
/// object says more than a timeout), or panics if there is nothing.
pub fn wait_for_object(
    endpoint: &str,
    bucket: &str,
    key: &str,
    len: usize,
    timeout: Duration,
) -> Vec<u8> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = client_for(endpoint);
    let get = || -> Option<Vec<u8>> {
        rt.block_on(async {
            let out = client
                .get_object()
                .bucket(bucket)
                .key(key)
                .send()
                .await
                .ok()?;
            Some(out.body.collect().await.ok()?.into_bytes().to_vec())
        })
    };
    let deadline = Instant::now() + timeout;
    loop {
        let head = rt.block_on(client.head_object().bucket(bucket).key(key).send());
        let size = head.ok().and_then(|h| h.content_length());
        if size >= Some(len as i64) || Instant::now() >= deadline {
            match get() {
                Some(object) if object.len() >= len || Instant::now() >= deadline => {
                    return object;
                }
                Some(_) => {}
                None => assert!(
                    Instant::now() < deadline,
                    "{key} was never archived within {timeout:?} ({len} bytes written)"
                ),
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Environment for an agent talking to a test S3 server: static credentials, no instance
/// metadata lookups.
pub fn s3_env(cmd: &mut Command) {
    cmd.env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("AWS_WEB_IDENTITY_TOKEN_FILE");
}

/// Writes at least `bytes` of Druid-style lines through `w` (stack-trace lines on stderr),
/// at about `rate` bytes per second if given, as fast as possible otherwise.
pub fn write_log(
    w: &mut druid_log_agent::loadgen::PeonWriter,
    lines: &mut druid_log_agent::loadgen::LineGen,
    bytes: usize,
    rate: Option<usize>,
) {
    let start = Instant::now();
    let begin = w.expected.len();
    let mut line = Vec::new();
    while w.expected.len() < begin + bytes {
        lines.next_line(&mut line);
        let stream = if line.first() == Some(&b'\t') {
            "stderr"
        } else {
            "stdout"
        };
        w.write_line(stream, &line).unwrap();
        if let Some(rate) = rate {
            let due = Duration::from_secs_f64((w.expected.len() - begin) as f64 / rate as f64);
            if let Some(ahead) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(ahead);
            }
        }
    }
}

/// Writes `dir/kubeconfig` for an API server at `server`: what `run` and `check-config` need to
/// configure a Kubernetes client. Configuring one never contacts the server.
pub fn write_kubeconfig(dir: &Path, server: &str) -> PathBuf {
    let path = dir.join("kubeconfig");
    let text = format!(
        "apiVersion: v1\nkind: Config\n\
         clusters:\n- name: c\n  cluster:\n    server: {server}\n\
         users:\n- name: u\n  user:\n    token: t\n\
         contexts:\n- name: x\n  context:\n    cluster: c\n    user: u\n\
         current-context: x\n"
    );
    std::fs::write(&path, text).unwrap();
    path
}
