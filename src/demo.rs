//! `druid-log-agent demo`: the whole pipeline on a made-up node, checked byte for byte.
//!
//! It lays out a kubelet-style log tree in a temporary directory, runs synthetic peons (CRI
//! records with P/F splits, stack traces, lines over 16 KiB, rotations with gzip, a container
//! restart, a sidecar that must not be shipped), runs the real agent on it with the directory
//! archive, deletes the pods as the kubelet would, and compares every archived log with what
//! `kubectl logs` would have printed.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use crate::app::{Agent, AgentEvent, StartError};
use crate::archive::{DirArchive, Outcome, Target};
use crate::config::{ArchiveConfig, Config};
use crate::loadgen::{LineGen, PeonWriter};
use crate::metrics::Metrics;
use crate::task::{BadTaskId, DirNameIdentity, TaskId};

/// What `druid-log-agent demo` does: synthetic peons write a temporary log tree, the agent
/// archives it to a directory, and every archive is compared with what the peon wrote.
pub struct DemoOptions {
    /// Where to build the tree; a fresh temporary directory if `None`.
    pub dir: Option<PathBuf>,
    /// Leave the tree in place afterwards.
    pub keep: bool,
    /// How many peon pods write at once.
    pub peons: usize,
    /// Log bytes each peon writes.
    pub bytes_per_peon: u64,
}

/// Why the demo could not run (as opposed to ran and found a difference: `Ok(false)`).
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// Laying out or cleaning up the demo tree failed.
    #[error("demo tree {}: cannot {op}: {source}", path.display())]
    Tree {
        /// The file or directory.
        path: PathBuf,
        /// The failed step ("remove", "create", "write").
        op: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The async runtime the agent's archives run on could not be built.
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    /// The agent refused to start.
    #[error(transparent)]
    Start(#[from] StartError),
    /// A synthetic peon could not write its log.
    #[error("synthetic peon {}: {source}", pod_dir.display())]
    Peon {
        /// The peon's pod directory.
        pod_dir: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A made-up task id that the agent would not archive under.
    #[error(transparent)]
    Task(#[from] BadTaskId),
    /// A synthetic peon's thread panicked.
    #[error("peon thread panicked")]
    PeonPanicked,
}

fn tree(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> DemoError {
    let path = path.to_owned();
    move |source| DemoError::Tree { path, op, source }
}

struct Peon {
    pod_dir: PathBuf,
    task: TaskId,
    writer: PeonWriter,
}

/// Runs the demo; `Ok(true)` if every archive matched.
pub fn run(opts: &DemoOptions) -> Result<bool, DemoError> {
    let started = Instant::now();
    let root = match &opts.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("druid-log-agent-demo-{}", std::process::id())),
    };
    if root.exists() {
        fs::remove_dir_all(&root).map_err(tree("remove", &root))?;
    }
    let pods = root.join("pods");
    let archive_dir = root.join("archive");
    fs::create_dir_all(&pods).map_err(tree("create", &pods))?;
    let cfg = Config {
        log_root: pods.clone(),
        state_dir: root.join("state"),
        archive: ArchiveConfig::Dir {
            dir: archive_dir.clone(),
        },
        idle_timeout: std::time::Duration::ZERO,
        ..Config::default()
    };
    println!("demo tree:     {}", root.display());
    println!("  log root:    {}", pods.display());
    println!("  state dir:   {}", cfg.state_dir.display());
    println!("  archive dir: {}", archive_dir.display());

    let (obs_tx, obs_rx) = mpsc::channel();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(DemoError::Runtime)?;
    let metrics = Arc::new(Metrics::default());
    let agent = Agent::start(
        &cfg,
        Box::new(DirNameIdentity),
        Target::Dir(DirArchive::appending(&archive_dir, metrics.clone())),
        Some(obs_tx),
        rt.handle(),
        metrics,
    )?;

    let mut handles = Vec::new();
    for i in 0..opts.peons {
        let task = format!(
            "index-kafka-wikipedia-{i}-{:08x}",
            0x5eed_0000u32 + i as u32
        );
        let pod_dir = pods.join(format!("druid_{task}_0f1e2d3c-0000-4000-8000-{i:012}"));
        let bytes = opts.bytes_per_peon;
        handles.push(std::thread::spawn(move || -> Result<Peon, DemoError> {
            let peon = |source| DemoError::Peon {
                pod_dir: pod_dir.clone(),
                source,
            };
            // A sidecar in the same pod: its log is not the task log and must not be shipped.
            let mut sidecar = PeonWriter::create(&pod_dir.join("istio-proxy"), 0).map_err(peon)?;
            sidecar
                .write_line(
                    "stdout",
                    b"sidecar noise that must not appear in the task log",
                )
                .map_err(peon)?;
            let mut w = PeonWriter::create(
                &pod_dir.join("main"),
                (2 << 20).min(bytes / 4).max(64 << 10),
            )
            .map_err(peon)?;
            write_peon(&mut w, i as u64, bytes).map_err(peon)?;
            Ok(Peon {
                task: TaskId::new(task)?,
                pod_dir,
                writer: w,
            })
        }));
    }
    let mut peons = Vec::new();
    for h in handles {
        peons.push(h.join().map_err(|_| DemoError::PeonPanicked)??);
    }
    // The kubelet removes a finished pod's log directory; the agent reads what is left through
    // the files it holds open, then archives.
    for p in &peons {
        fs::remove_dir_all(&p.pod_dir).map_err(tree("remove", &p.pod_dir))?;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut archived = std::collections::BTreeSet::new();
    while archived.len() < peons.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        match obs_rx.recv_timeout(left) {
            Ok(AgentEvent::Archive(Outcome::Done { task, .. })) => {
                archived.insert(task);
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    let metrics = agent.metrics().clone();
    agent.shutdown();

    let mut all_ok = archived.len() == peons.len();
    println!();
    for p in &peons {
        let path = DirArchive::new(&archive_dir).path_of(&p.task);
        let got = fs::read(&path).unwrap_or_default();
        if opts.keep {
            let expected = root.join("expected");
            fs::create_dir_all(&expected).map_err(tree("create", &expected))?;
            let file = expected.join(format!("{}.log", p.task));
            fs::write(&file, &p.writer.expected).map_err(tree("write", &file))?;
        }
        let ok = got == p.writer.expected;
        all_ok &= ok;
        println!(
            "{} {}  {} bytes written, {} archived{}",
            if ok { "OK  " } else { "FAIL" },
            path.display(),
            p.writer.expected.len(),
            got.len(),
            first_difference(&got, &p.writer.expected)
                .map(|i| format!(", first difference at byte {i}"))
                .unwrap_or_default()
        );
    }
    let spool_bytes: u64 = dir_size(&cfg.state_dir.join("spool"));
    let log_bytes: u64 = peons.iter().map(|p| p.writer.expected.len() as u64).sum();
    println!();
    for (name, _, v) in metrics.snapshot() {
        if v > 0 {
            println!("  {name:<20} {v}");
        }
    }
    println!(
        "\nspool: {spool_bytes} bytes on disk for {log_bytes} bytes of log ({:.1}x); {:.1}s in all",
        log_bytes as f64 / spool_bytes.max(1) as f64,
        started.elapsed().as_secs_f64()
    );
    println!(
        "{}",
        if all_ok {
            "PASS: every archived log is byte-identical to what the peons wrote"
        } else {
            "FAIL: an archived log differs from what its peon wrote"
        }
    );
    if !opts.keep {
        let _ = fs::remove_dir_all(&root);
    }
    Ok(all_ok)
}

/// A peon's life: steady logging with stack traces and long lines, an out-of-memory crash and
/// a container restart halfway.
fn write_peon(w: &mut PeonWriter, seed: u64, bytes: u64) -> std::io::Result<()> {
    let mut lines = LineGen::new(seed);
    lines.long_every = 300;
    let mut line = Vec::new();
    let mut restarted = false;
    let mut since_pause = 0u64;
    while (w.expected.len() as u64) < bytes {
        lines.next_line(&mut line);
        let stream = if line.first() == Some(&b'\t') {
            "stderr"
        } else {
            "stdout"
        };
        w.write_line(stream, &line)?;
        since_pause += line.len() as u64;
        if !restarted && w.expected.len() as u64 > bytes / 2 {
            w.write_line("stderr", b"java.lang.OutOfMemoryError: Java heap space")?;
            w.restart()?;
            restarted = true;
        }
        // Pace like a busy peon (about 8 MiB/s) rather than a disk benchmark: rotations then
        // come every quarter second or so, forty times the kubelet's fastest.
        if since_pause > (64 << 10) {
            since_pause = 0;
            std::thread::sleep(Duration::from_millis(8));
        }
    }
    w.flush()
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a == b {
        return None;
    }
    Some(
        a.iter()
            .zip(b)
            .position(|(x, y)| x != y)
            .unwrap_or(a.len().min(b.len())),
    )
}

/// Bytes in the files directly inside `p` (0 if it cannot be read).
pub fn dir_size(p: &Path) -> u64 {
    fs::read_dir(p)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}
