//! End-to-end benchmark of the real agent binary on synthetic Druid peon logs.
//!
//! `cargo run --release -p druid-log-agent-tools --bin bench -- --help`. Runs `druid-log-agent`
//! (the release binary beside this one: build the workspace, `cargo build --release
//! --workspace`) on a temporary node with the directory archive and prints one JSON object:
//! ingest throughput and CPU seconds per GiB (from /proc, user + system), peak RSS,
//! write-to-visible and snapshot latencies under load, whole-log streaming speed, time from a
//! pod's end to its complete archive, and the spool's compression ratio.
//!
//! With `--runs N` (and `--agent-b PATH` to compare two builds) it runs itself N times per
//! agent, alternating A and B so that both see the same machine, after `--warmup` runs per
//! agent (1) that are not counted, and prints every run and the median and range of each
//! headline figure. Each run records the machine's load average before
//! and after it and the agent process's own user and system CPU: a figure is only worth quoting
//! with the conditions it was measured in.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use druid_log_agent::demo::dir_size;
use druid_log_agent::loadgen::{LineGen, PeonWriter};
use druid_log_agent_testkit::http::{self, KeepAlive};
use druid_log_agent_tools::{
    MachineSample, Pace, async_snapshot_clients, bucket_quantile, cpu_by_thread, cpu_seconds,
    cpu_split, gzip1_speeds, histogram_buckets, loadavg, ms, now_utc, page_write_speeds, pct,
    proc_field, write_mib,
};

#[derive(Parser)]
#[command(about = "End-to-end benchmark of druid-log-agent; prints one JSON object")]
struct Args {
    /// Peon pods.
    #[arg(long, default_value_t = 20)]
    pods: usize,
    /// MiB of log written before the agent starts (ingest throughput and CPU).
    #[arg(long, default_value_t = 512)]
    mib: u64,
    /// MiB written while the agent runs (latencies under load).
    #[arg(long, default_value_t = 256)]
    live_mib: u64,
    /// Rate of the live phase in MiB/s, all pods together.
    #[arg(long, default_value_t = 100)]
    live_rate: u64,
    /// Concurrent clients of the snapshot endpoint during the live phase.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Kubelet rotation size in MiB.
    #[arg(long, default_value_t = 10)]
    rotate_mib: u64,
    /// Where to build the node (a temporary directory by default).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// The agent binary (default: druid-log-agent beside this binary).
    #[arg(long)]
    agent: Option<PathBuf>,
    /// Archive to this S3-compatible endpoint (static credentials test/test) instead of a
    /// directory, e.g. a local moto or SeaweedFS.
    #[arg(long)]
    s3_endpoint: Option<String>,
    /// Bucket for --s3-endpoint (must exist).
    #[arg(long, default_value = "bench")]
    s3_bucket: String,
    /// Extra arguments for `druid-log-agent run`, e.g. `--agent-arg=--compression-level=6`.
    #[arg(long = "agent-arg", allow_hyphen_values = true)]
    agent_args: Vec<String>,
    /// Run the agent under this command, split at spaces, e.g. `--wrap "heaptrack -o /tmp/h"`;
    /// figures from /proc are then taken from the agent process itself, and it is stopped with
    /// SIGTERM so the wrapper can write its data.
    #[arg(long)]
    wrap: Option<String>,
    /// Snapshot clients and the probe keep their connection open between requests (as an
    /// overlord or proxy does) instead of opening one per request.
    #[arg(long)]
    keep_alive: bool,
    /// Run all snapshot clients on one thread (an event loop, each client on its own
    /// kept-alive connection) instead of a thread each: on a small machine 64 busy client
    /// threads compete with the agent for the cores, and a client thread that waits for a core
    /// after its response arrived counts that wait as latency. Implies --keep-alive.
    #[arg(long)]
    async_clients: bool,
    /// Requests per second of each snapshot client; 0 (the default) sends the next request as
    /// soon as the last one is answered (a closed loop, which on a small machine measures how
    /// the cores are shared more than the agent). Paced latencies count from when a request
    /// was due, so a client that falls behind reports the delay.
    #[arg(long, default_value_t = 0.0)]
    client_rate: f64,
    /// Copy the agent's own log (stderr) to this file.
    #[arg(long)]
    agent_log: Option<PathBuf>,
    /// Run the whole bench this many times (per agent with --agent-b) and print the runs with
    /// the median and range of each headline figure.
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// A second agent binary to compare with --agent (or the default): runs alternate A, B,
    /// A, B, ... so a change in the machine's load hits both alike.
    #[arg(long)]
    agent_b: Option<PathBuf>,
    /// With --runs or --agent-b: runs per agent before the measured ones, not counted. The
    /// first run after a build (or another memory-hungry process) pays for page-cache
    /// refaults: 8.5 against about 5 CPU-s/GiB in one sitting, in both agents alike.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// The text the peons write: `plain` (log4j lines that compress about 6x at level 1) or
    /// `varied` (metrics JSON, request logs and ids mixed in: about 4x, like a real peon's).
    #[arg(long, value_enum, default_value_t = Data::Plain)]
    data: Data,
}

/// What the simulated peons write; compression is most of the agent's cost, so the ratio of
/// the text decides the figures.
#[derive(Clone, Copy, ValueEnum)]
enum Data {
    Plain,
    Varied,
}

impl Data {
    fn lines(self, seed: u64) -> LineGen {
        match self {
            Data::Plain => LineGen::new(seed),
            Data::Varied => LineGen::varied(seed),
        }
    }
}

/// How often the bench asks the agent whether it has read everything: each answer costs the
/// agent a metrics render (and a count of its open files), so a tight loop would add to the
/// very CPU measured; 20 ms is 1 % of a 2 s ingest.
const POLL_INGEST: Duration = Duration::from_millis(20);
/// How often the bench asks which ended tasks are archived (one `/tasks` list for all).
const POLL_ARCHIVE: Duration = Duration::from_millis(10);

/// The figures a comparison summarises (JSON pointers into one run's output).
const HEADLINE: &[&str] = &[
    "/ingest_mib_s",
    "/ingest_cpu_s_per_gib",
    "/end_to_end_cpu_s_per_gib",
    "/agent_cpu_s/ingest/system",
    "/peak_rss_mib",
    "/idle_rss_anon_mib",
    "/idle_rss_file_mib",
    "/task_end_to_archive_ms/p50",
    "/whole_log_stream_mib_s",
    "/snapshot_offset_-8192_ms/p99",
    "/write_to_visible_ms/p99",
    "/snapshot_offset_-8192_ms/p50",
    "/live_phase/agent_log_route_ms_at_most/p99",
    "/live_phase/machine/busy_cores",
    "/live_phase/machine/cpu_wait_pct",
    "/live_phase/load_generator_cpu_s/user",
    "/live_phase/agent_cpu_s/user",
    "/load_before/0",
    "/load_after/0",
    "/machine/gzip1_mib_s",
    "/machine/fresh_page_write_mib_s",
    "/floor_cpu_s_per_gib/ingest",
    "/floor_cpu_s_per_gib/end_to_end",
];

/// This command line without `--runs`, `--agent-b` and `--agent` (and their values): what one
/// run of a series is given, with its own `--agent`.
fn single_run_args() -> Vec<String> {
    let mut out = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let name = a.split('=').next().unwrap_or("");
        if matches!(name, "--runs" | "--agent-b" | "--agent" | "--warmup") {
            if !a.contains('=') {
                args.next();
            }
            continue;
        }
        out.push(a);
    }
    out
}

/// `--runs`/`--agent-b`: runs this binary once per run and agent, alternating, and prints each
/// run's figures, then the median and range of the headline figures per agent.
fn series(args: &Args, agent_a: PathBuf) {
    let me = std::env::current_exe().expect("own path");
    let mut agents = vec![("a", agent_a)];
    if let Some(b) = &args.agent_b {
        agents.push(("b", b.clone()));
    }
    let base = single_run_args();
    let run = |label: &str, bin: &PathBuf, what: &str| -> serde_json::Value {
        let out = Command::new(&me)
            .args(&base)
            .arg("--agent")
            .arg(bin)
            .stderr(Stdio::inherit())
            .output()
            .expect("run bench");
        assert!(out.status.success(), "bench {what} of agent {label} failed");
        serde_json::from_slice(&out.stdout).expect("a bench run prints JSON")
    };
    for w in 0..args.warmup {
        for (label, bin) in &agents {
            let v = run(label, bin, "warm-up run");
            eprintln!(
                "warm-up run {} agent {label} (not counted): {}",
                w + 1,
                serde_json::to_string(&v).unwrap_or_default()
            );
        }
    }
    let mut runs: Vec<(&str, serde_json::Value)> = Vec::new();
    for i in 0..args.runs {
        // A B, then B A: neither build always runs right after the other.
        let mut order: Vec<&(&str, PathBuf)> = agents.iter().collect();
        if i % 2 == 1 {
            order.reverse();
        }
        for (label, bin) in order {
            let v = run(label, bin, &format!("run {}", i + 1));
            eprintln!(
                "run {} agent {label}: {}",
                i + 1,
                serde_json::to_string(&v).unwrap_or_default()
            );
            runs.push((label, v));
        }
    }
    let mut summary = serde_json::Map::new();
    for (label, bin) in &agents {
        let mut figures = serde_json::Map::new();
        for key in HEADLINE {
            let mut v: Vec<f64> = runs
                .iter()
                .filter(|(l, _)| l == label)
                .filter_map(|(_, r)| r.pointer(key)?.as_f64())
                .collect();
            if v.is_empty() {
                continue;
            }
            let (lo, hi) = (
                v.iter().copied().fold(f64::INFINITY, f64::min),
                v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            );
            figures.insert(
                key.trim_start_matches('/').replace('/', "."),
                serde_json::json!({"median": pct(&mut v, 0.5), "min": lo, "max": hi}),
            );
        }
        summary.insert(
            label.to_string(),
            serde_json::json!({"agent": bin.display().to_string(), "runs": args.runs, "warmup_runs": args.warmup, "figures": figures}),
        );
    }
    let out = serde_json::json!({
        "date": now_utc(),
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "summary": summary,
        "runs": runs.iter().map(|(l, r)| serde_json::json!({"agent": l, "result": r})).collect::<Vec<_>>(),
    });
    println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
}

struct Agent {
    child: Child,
    addr: String,
    /// The agent process itself (the child, or a descendant of the wrapper).
    pid: u32,
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.pid != self.child.id() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.pid.to_string()])
                .status();
        } else {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// The first descendant of `pid` (itself included) whose command is the agent's.
fn agent_pid(pid: u32) -> Option<u32> {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if comm.trim() == "druid-log-agen" || comm.trim() == "druid-log-agent" {
        return Some(pid);
    }
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    children
        .split_whitespace()
        .filter_map(|c| c.parse().ok())
        .find_map(agent_pid)
}

/// Peak RSS since the last call (VmHWM, then reset through clear_refs), in MiB.
fn phase_peak_mib(pid: u32) -> f64 {
    let hwm = proc_field(pid, "status", "VmHWM:");
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
    hwm as f64 / 1024.0
}

/// One request, on a kept-alive connection when there is one.
fn fetch(ka: &mut Option<KeepAlive>, addr: &str, target: &str) -> (u16, Vec<u8>) {
    match ka {
        Some(k) => k
            .get(target)
            .map_or((0, Vec::new()), |r| (r.status, r.body)),
        None => get(addr, target),
    }
}

/// The agent's histogram of its log route (time to the response head), cumulative.
fn server_log_buckets(addr: &str) -> Vec<(f64, u64)> {
    let (_, m) = get(addr, "/metrics");
    histogram_buckets(
        &String::from_utf8_lossy(&m),
        "druid_log_agent_http_request_duration_seconds",
        "route=\"log\"",
    )
}

/// One request on a new connection; status 0 when it failed (the bench counts, never stops),
/// or when the agent sent nothing for a minute: a hung agent ends the bench's waits instead
/// of hanging it.
fn get(addr: &str, target: &str) -> (u16, Vec<u8>) {
    http::get(addr, target, &[], Some(http::IDLE_READ_TIMEOUT))
        .map_or((0, Vec::new()), |r| (r.status, r.body))
}

fn total_bytes(addr: &str) -> u64 {
    let (_, body) = get(addr, "/tasks");
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    v.as_array()
        .map(|a| a.iter().filter_map(|t| t["bytes"].as_u64()).sum())
        .unwrap_or(0)
}

/// `pods` peon log directories `druid_{name}-peon-{i}_<uid>` with a writer and a line
/// generator each (seeds from `seed`); `uid_group` keeps the uids of two sets apart.
fn create_pods(
    dir: &std::path::Path,
    name: &str,
    uid_group: u32,
    pods: usize,
    rotate_bytes: u64,
    seed: u64,
    data: Data,
) -> Vec<(PeonWriter, LineGen, PathBuf)> {
    (0..pods)
        .map(|i| {
            let pod = dir.join(format!(
                "druid_{name}-peon-{i}_00000000-0000-4000-{uid_group}-{i:012}"
            ));
            let w = PeonWriter::create(&pod.join("main"), rotate_bytes).expect("create pod");
            (w, data.lines(seed + i as u64), pod)
        })
        .collect()
}

fn main() {
    let args = Args::parse();
    if args.runs > 1 || args.agent_b.is_some() {
        let a = args.agent.clone().unwrap_or_else(|| {
            std::env::current_exe()
                .expect("own path")
                .with_file_name("druid-log-agent")
        });
        return series(&args, a);
    }
    let load_before = loadavg();
    // The plain text is the calibration's own: measured once, it is both.
    let plain = gzip1_speeds(&Data::Plain.lines(7).text(64 << 20));
    let calibration = plain.0;
    let (data_deflate, data_inflate) = match args.data {
        Data::Plain => plain,
        Data::Varied => gzip1_speeds(&args.data.lines(7).text(64 << 20)),
    };
    let tmp = args
        .dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("dla-bench-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&tmp);
    let pods_dir = tmp.join("pods");
    std::fs::create_dir_all(&pods_dir).expect("create bench dir");
    let agent_bin = args.agent.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .expect("own path")
            .with_file_name("druid-log-agent")
    });
    let mib = 1u64 << 20;
    let per_pod = args.mib * mib / args.pods as u64;

    // Phase 1: logs already on the node; the agent starts and ingests them at full speed.
    let mut writers = create_pods(
        &pods_dir,
        "bench",
        8000,
        args.pods,
        args.rotate_mib * mib,
        0,
        args.data,
    );
    for (w, g, _) in &mut writers {
        // No rotation before the start: a first start reads live and uncompressed files only.
        w.rotate_bytes = 0;
        write_mib(w, g, per_pod);
        w.rotate_bytes = args.rotate_mib * mib;
    }
    let written: u64 = writers
        .iter()
        .map(|(w, _, _)| {
            std::fs::metadata(w.live_path())
                .map(|m| m.len())
                .unwrap_or(0)
        })
        .sum();
    // Just before the agent starts, beside its spool: what a new page costs now.
    let (fresh_page_write, cached_page_write) = page_write_speeds(&tmp);
    let started = Instant::now();
    let mut cmd = match &args.wrap {
        Some(w) => {
            let mut parts = w.split_whitespace();
            let mut c = Command::new(parts.next().expect("--wrap names a command"));
            c.args(parts).arg(&agent_bin);
            c
        }
        None => Command::new(&agent_bin),
    };
    cmd.arg("run");
    if let Some(ep) = &args.s3_endpoint {
        cmd.args([
            "--s3-endpoint",
            ep,
            "--s3-bucket",
            &args.s3_bucket,
            "--s3-path-style",
            "true",
        ])
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true");
    }
    let mut child = cmd
        .args(["--listen", "127.0.0.1:0", "--idle-timeout-secs", "0"])
        .args(&args.agent_args)
        .arg("--log-root")
        .arg(&pods_dir)
        .arg("--state-dir")
        .arg(tmp.join("state"))
        .arg("--archive-dir")
        .arg(tmp.join("archive"))
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", agent_bin.display()));
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    let mut agent_log = args
        .agent_log
        .as_ref()
        .map(|p| std::fs::File::create(p).expect("create --agent-log file"));
    std::thread::spawn(move || {
        let mut r = std::io::BufReader::new(stderr);
        let mut line = String::new();
        while std::io::BufRead::read_line(&mut r, &mut line).unwrap_or(0) > 0 {
            if let Some(f) = &mut agent_log {
                let _ = f.write_all(line.as_bytes());
            }
            if let Some(a) = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("addr="))
            {
                let _ = tx.send(a.to_owned());
            }
            line.clear();
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("agent address");
    let pid = agent_pid(child.id()).expect("agent process");
    let agent = Agent { child, addr, pid };
    let idle_rss_kib = proc_field(pid, "status", "VmRSS:");
    // Pages the agent allocated vs pages of its binary and libraries: a change in the second
    // is code touched, not memory used.
    let idle_anon_kib = proc_field(pid, "status", "RssAnon:");
    let idle_file_kib = proc_field(pid, "status", "RssFile:");
    let mut peaks = serde_json::Map::new();
    let text_total: u64;
    let mut ingest_polls = 0u64;
    loop {
        // Wait for the agent to hold what the files hold (the decoded text is a bit smaller
        // than the CRI records: measure by the agent's own read counter).
        let (_, m) = get(&agent.addr, "/metrics");
        ingest_polls += 1;
        let m = String::from_utf8_lossy(&m);
        let read: u64 = m
            .lines()
            .find_map(|l| l.strip_prefix("druid_log_agent_read_bytes_total "))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if read >= written {
            text_total = total_bytes(&agent.addr);
            ingest_polls += 1;
            break;
        }
        std::thread::sleep(POLL_INGEST);
    }
    let ingest_secs = started.elapsed().as_secs_f64();
    let ingest_split = cpu_split(pid);
    let ingest_threads = cpu_by_thread(pid);
    let ingest_cpu = ingest_split.0 + ingest_split.1;
    peaks.insert("ingest".into(), phase_peak_mib(pid).into());
    let spool_ratio = text_total as f64 / dir_size(&tmp.join("state").join("spool")).max(1) as f64;

    // Phase 2: those pods end (the kubelet removes their directories): time and CPU to the
    // complete archive of each.
    let ends: Vec<(String, Instant)> = writers
        .drain(..)
        .map(|(_, _, pod)| {
            let _ = std::fs::remove_dir_all(&pod);
            let name = pod
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_owned();
            (
                name.split('_').nth(1).unwrap_or_default().to_owned(),
                Instant::now(),
            )
        })
        .collect();
    // One `/tasks` answer says which of them are archived: ask it for all tasks at once,
    // every POLL_ARCHIVE, so the bench's own questions cost the agent little (a list of 200
    // tasks every 2 ms per task cost it more than a Prometheus scrape every 15 s ever will).
    let mut end_to_archive = Vec::new();
    let mut waiting: Vec<&(String, Instant)> = ends.iter().collect();
    let mut archive_polls = 0u64;
    while !waiting.is_empty() {
        let (_, body) = get(&agent.addr, "/tasks");
        archive_polls += 1;
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let archived: std::collections::HashSet<&str> = v
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|t| t["state"] == "archived")
                    .filter_map(|t| t["id"].as_str())
                    .collect()
            })
            .unwrap_or_default();
        waiting.retain(|(task, t0)| {
            let done = archived.contains(task.as_str()) || t0.elapsed() > Duration::from_secs(300);
            if done {
                end_to_archive.push(ms(t0.elapsed()));
            }
            !done
        });
        if !waiting.is_empty() {
            std::thread::sleep(POLL_ARCHIVE);
        }
    }
    let after_archive = cpu_split(pid);
    let archive_threads: std::collections::BTreeMap<String, f64> = cpu_by_thread(pid)
        .into_iter()
        .map(|(name, secs)| {
            let before = ingest_threads.get(&name).copied().unwrap_or(0.0);
            (name, secs - before)
        })
        .collect();
    let archive_cpu = after_archive.0 + after_archive.1 - ingest_cpu;
    peaks.insert("archive".into(), phase_peak_mib(pid).into());

    // Phase 3: whole-log streaming of an ended task whose spool is retained.
    let t = Instant::now();
    let (_, whole) = get(
        &agent.addr,
        "/druid/indexer/v1/task/bench-peon-1/log?offset=0",
    );
    let stream_mib_s = whole.len() as f64 / mib as f64 / t.elapsed().as_secs_f64();
    drop(whole);
    peaks.insert("stream".into(), phase_peak_mib(pid).into());

    // Phase 4: new pods written at a set rate while clients read snapshots and a probe
    // measures how soon a written line is visible.
    let cpu_before_live = cpu_seconds(pid);
    // The load generator (this process: writers, clients, probe) shares the two cores with
    // the agent; its CPU, the machine's and the agent's own latency histogram are read around
    // the phase so a client-side p99 can be split into time in the agent and time waiting.
    let live_machine = MachineSample::now();
    let live_bench_cpu = cpu_split(std::process::id());
    let live_agent_cpu = cpu_split(pid);
    let live_buckets = server_log_buckets(&agent.addr);
    let mut writers = create_pods(
        &pods_dir,
        "live",
        9000,
        args.pods,
        args.rotate_mib * mib,
        1000,
        args.data,
    );

    let stop = Arc::new(AtomicBool::new(false));
    let live_per_pod = args.live_mib * mib / args.pods as u64;
    let rate_per_pod = (args.live_rate * mib) as f64 / args.pods as f64;
    let mut handles = Vec::new();
    let probe_pod = writers.remove(0);
    for (mut w, mut g, _) in writers.drain(..) {
        handles.push(std::thread::spawn(move || {
            let t0 = Instant::now();
            let mut done = 0u64;
            while done < live_per_pod {
                write_mib(&mut w, &mut g, 64 << 10);
                done += 64 << 10;
                let due = Duration::from_secs_f64(done as f64 / rate_per_pod);
                if let Some(ahead) = due.checked_sub(t0.elapsed()) {
                    std::thread::sleep(ahead);
                }
            }
        }));
    }
    let async_clients = args.async_clients.then(|| {
        let (addr, stop) = (agent.addr.clone(), stop.clone());
        let (n, rate) = (args.clients, args.client_rate);
        let targets: Vec<String> = (1..args.pods.max(2))
            .map(|p| format!("/druid/indexer/v1/task/live-peon-{p}/log?offset=-8192"))
            .collect();
        std::thread::spawn(move || async_snapshot_clients(&addr, &targets, n, rate, &stop))
    });
    let clients: Vec<_> = (0..if args.async_clients { 0 } else { args.clients })
        .map(|i| {
            let (addr, stop) = (agent.addr.clone(), stop.clone());
            let task = format!("live-peon-{}", 1 + i % (args.pods - 1).max(1));
            let keep_alive = args.keep_alive;
            let mut pace = Pace::new(args.client_rate, i, args.clients);
            std::thread::spawn(move || {
                let mut lat = Vec::new();
                let mut ka = keep_alive.then(|| KeepAlive::new(&addr));
                while !stop.load(Ordering::Relaxed) {
                    let t = pace.wait();
                    let (status, _) = fetch(
                        &mut ka,
                        &addr,
                        &format!("/druid/indexer/v1/task/{task}/log?offset=-8192"),
                    );
                    if status == 200 {
                        lat.push(ms(t.elapsed()));
                    }
                }
                lat
            })
        })
        .collect();
    let (mut pw, _, _) = probe_pod;
    let mut visible = Vec::new();
    let mut probe_get_max = 0f64;
    let mut probe_ka = (args.keep_alive || args.async_clients).then(|| KeepAlive::new(&agent.addr));
    for i in 0..100 {
        let marker = format!("bench-marker-{i}-{}", started.elapsed().as_nanos());
        let t = Instant::now();
        pw.write_line("stdout", marker.as_bytes())
            .expect("write marker");
        loop {
            let g = Instant::now();
            let (_, body) = fetch(
                &mut probe_ka,
                &agent.addr,
                "/druid/indexer/v1/task/live-peon-0/log?offset=-8192",
            );
            probe_get_max = probe_get_max.max(ms(g.elapsed()));
            if body.windows(marker.len()).any(|w| w == marker.as_bytes()) {
                break;
            }
            if t.elapsed() > Duration::from_secs(10) {
                break;
            }
        }
        visible.push(ms(t.elapsed()));
        std::thread::sleep(Duration::from_millis(20));
    }
    // The first marker also waits for the agent to find the new pod (with all the others).
    let first_visible = visible.first().copied().unwrap_or_default();
    let mut slowest: Vec<(usize, f64)> = visible.iter().copied().enumerate().collect();
    slowest.sort_by(|a, b| b.1.total_cmp(&a.1));
    slowest.truncate(3);
    for h in handles {
        let _ = h.join();
    }
    stop.store(true, Ordering::Relaxed);
    let mut snap: Vec<f64> = clients
        .into_iter()
        .flat_map(|c| c.join().unwrap_or_default())
        .collect();
    if let Some(h) = async_clients {
        snap.extend(h.join().unwrap_or_default());
    }
    let snap_max = snap.iter().cloned().fold(0.0, f64::max);

    let live_cpu = cpu_seconds(pid) - cpu_before_live;
    let live = {
        let machine = live_machine.since(&MachineSample::now());
        let (bench_now, agent_now) = (cpu_split(std::process::id()), cpu_split(pid));
        let after = server_log_buckets(&agent.addr);
        let q = |p| bucket_quantile(&live_buckets, &after, p).map(|s| s * 1000.0);
        serde_json::json!({
            "machine": machine,
            "agent_cpu_s": {"user": agent_now.0 - live_agent_cpu.0, "system": agent_now.1 - live_agent_cpu.1},
            "load_generator_cpu_s": {"user": bench_now.0 - live_bench_cpu.0, "system": bench_now.1 - live_bench_cpu.1},
            "agent_log_route_ms_at_most": {"p50": q(0.5), "p99": q(0.99)},
        })
    };
    let total_cpu = cpu_seconds(pid);
    peaks.insert("live".into(), phase_peak_mib(pid).into());
    let peak_rss_mib = peaks
        .values()
        .filter_map(|v| v.as_f64())
        .fold(0.0, f64::max);
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    let gib = (1u64 << 30) as f64;
    let text_per_gib_in = text_total as f64 / written.max(1) as f64 * 1024.0;
    // No text counted (the agent's /tasks failed) is no floor, not a floor of 0 (NaN prints
    // as null).
    let text_per_gib_in = if text_total == 0 {
        f64::NAN
    } else {
        text_per_gib_in
    };
    let (floor_deflate, floor_inflate) = (
        text_per_gib_in / data_deflate,
        text_per_gib_in / data_inflate,
    );
    let out = serde_json::json!({
        "pods": args.pods,
        "data": args.data.to_possible_value().map(|v| v.get_name().to_owned()),
        "bytes_in": written,
        "text_bytes": text_total,
        "archive": if args.s3_endpoint.is_some() { "s3" } else { "dir" },
        "ingest_mib_s": written as f64 / mib as f64 / ingest_secs,
        "ingest_cpu_s_per_gib": ingest_cpu / (written as f64 / gib),
        "end_to_end_cpu_s_per_gib": (ingest_cpu + archive_cpu) / (written as f64 / gib),
        // The ingest thread alone (reading, decoding, compressing, spool writes), without the
        // threads that run beside it during ingest: with a directory archive its writer
        // (`archive-append`) writes the archive then, not after the tasks end.
        "ingest_thread_cpu_s_per_gib": ingest_threads.get("ingest").copied().unwrap_or(0.0) / (written as f64 / gib),
        "live_phase_cpu_s_incl_serving": live_cpu,
        "total_cpu_s": total_cpu,
        "idle_rss_mib": idle_rss_kib as f64 / 1024.0,
        "idle_rss_anon_mib": idle_anon_kib as f64 / 1024.0,
        "idle_rss_file_mib": idle_file_kib as f64 / 1024.0,
        "peak_rss_mib": peak_rss_mib,
        "peak_rss_mib_by_phase": peaks,
        "keep_alive": args.keep_alive || args.async_clients,
        "async_clients": args.async_clients,
        "client_rate": args.client_rate,
        "write_to_visible_ms": {"first": first_visible, "slowest_markers": slowest, "p50": pct(&mut visible, 0.5), "p99": pct(&mut visible, 0.99), "slowest_single_request": probe_get_max},
        "live_phase": live,
        "snapshot_offset_-8192_ms": {"clients": args.clients, "requests": snap.len(), "p50": pct(&mut snap, 0.5), "p99": pct(&mut snap, 0.99), "max": snap_max},
        "whole_log_stream_mib_s": stream_mib_s,
        "task_end_to_archive_ms": {"p50": pct(&mut end_to_archive, 0.5), "p99": pct(&mut end_to_archive, 0.99)},
        "bench_polls": {"ingest_metrics": ingest_polls, "archive_tasks": archive_polls},
        "spool_compression_ratio": spool_ratio,
        "agent_cpu_s": {
            "ingest": {"user": ingest_split.0, "system": ingest_split.1},
            "archive": {"user": after_archive.0 - ingest_split.0, "system": after_archive.1 - ingest_split.1},
        },
        "agent_cpu_s_by_thread": {"ingest": ingest_threads, "archive": archive_threads},
        "date": now_utc(),
        "load_before": load_before,
        "load_after": loadavg(),
        "machine": {"cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0), "cpu": cpu_model, "gzip1_mib_s": calibration, "data_gzip1_mib_s": data_deflate, "data_gunzip_mib_s": data_inflate, "fresh_page_write_mib_s": fresh_page_write, "cached_page_write_mib_s": cached_page_write},
        // gzip level 1 alone on this run's text, per GiB of CRI input: what the spool's
        // compression (ingest) and one more inflate for a plain-text archive (end to end)
        // cost before the agent does anything else.
        "floor_cpu_s_per_gib": {"ingest": floor_deflate, "end_to_end": floor_deflate + floor_inflate},
    });
    println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    drop(agent);
    let _ = std::fs::remove_dir_all(&tmp);
}
