//! The cluster gateway against the node agent it proxies to, in one run.
//!
//! `cargo run --release -p druid-log-agent-tools --bin gwbench -- --help`. Runs the release
//! `druid-log-agent` (beside this binary) twice: as the agent of one synthetic node (directory
//! archive) and as `gateway`, which learns the node's peons and its agent from a test
//! Kubernetes API (testkit's, the one the integration tests use) exactly as in a cluster. Then
//! it asks both the same questions, alternating which goes first in each round: Druid's
//! `offset=-8192` snapshot with 1 client and with `--clients` clients, and a whole log
//! streamed. It prints one JSON object: each round, the medians over rounds, what the gateway
//! adds to the snapshot p50 and what share of the direct streaming throughput it keeps, the CPU
//! seconds each process spent, and the machine's load before and after.

use std::io::{BufRead, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use druid_log_agent::loadgen::{LineGen, PeonWriter};
use druid_log_agent_testkit::http;
use druid_log_agent_testkit::kubeapi::{FakeApi, PodModel, RestartPolicy};
use druid_log_agent_tools::{
    async_snapshot_clients, cpu_seconds, gzip1_mib_s, loadavg, now_utc, pct, write_mib,
};

#[derive(Parser)]
#[command(about = "The gateway against the node agent it proxies to; prints one JSON object")]
struct Args {
    /// Peon pods (tasks) on the node; the snapshot clients spread over them.
    #[arg(long, default_value_t = 16)]
    pods: usize,
    /// MiB of log of each peon but the first.
    #[arg(long, default_value_t = 2)]
    mib: u64,
    /// MiB of log of the first peon, the one streamed whole.
    #[arg(long, default_value_t = 128)]
    stream_mib: u64,
    /// Clients of the many-clients snapshot figure.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Requests per second of each of the many clients (0: the next as soon as the last is
    /// answered). A closed loop of 64 clients on a small machine measures how two processes
    /// share the cores (a request through the gateway costs both), not what the gateway adds to
    /// a request: the default paces them.
    #[arg(long, default_value_t = 10.0)]
    client_rate: f64,
    /// Seconds each snapshot measurement lasts.
    #[arg(long, default_value_t = 5)]
    secs: u64,
    /// Rounds; each measures direct and gateway, alternating which goes first.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// The agent binary (default: druid-log-agent beside this binary); also runs the gateway.
    #[arg(long)]
    agent: Option<PathBuf>,
}

/// A child process that is killed with the bench.
struct Proc {
    child: Child,
    addr: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `cmd` (its stderr piped) and waits for its `listening addr=...` line.
fn spawn(mut cmd: Command, what: &str) -> Proc {
    let mut child = cmd
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start the {what}: {e}"));
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    let what_owned = what.to_owned();
    std::thread::spawn(move || {
        let mut r = std::io::BufReader::new(stderr);
        let mut line = String::new();
        while r.read_line(&mut line).unwrap_or(0) > 0 {
            if let Some(a) = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("addr="))
            {
                let _ = tx.send(a.to_owned());
            }
            // Warnings and errors are worth seeing; the rest would drown the figures.
            if line.contains("WARN") || line.contains("ERROR") {
                eprint!("{what_owned}: {line}");
            }
            line.clear();
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(30))
        .unwrap_or_else(|_| panic!("the {what} never said where it listens"));
    Proc { child, addr }
}

/// The value of an unlabelled sample in `addr`'s `/metrics`.
fn metric(addr: &str, name: &str) -> Option<f64> {
    let r = http::get(addr, "/metrics", &[], None).ok()?;
    let text = String::from_utf8_lossy(&r.body).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(600);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `GET target` on a new connection, the body read and dropped as it arrives: the bytes
/// received after the headers and the MiB/s from the request to the last byte.
fn stream(addr: &str, target: &str) -> (u64, f64) {
    let t = Instant::now();
    let mut s = TcpStream::connect(addr).expect("connect");
    write!(
        s,
        "GET {target} HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut buf = vec![0u8; 256 << 10];
    let mut head = Vec::new();
    let mut body = None;
    loop {
        let n = s.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        match &mut body {
            Some(b) => *b += n as u64,
            None => {
                head.extend_from_slice(&buf[..n]);
                if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                    assert!(head.starts_with(b"HTTP/1.1 200"), "{target}: not a 200");
                    body = Some((head.len() - end - 4) as u64);
                }
            }
        }
    }
    let body = body.expect("a complete answer");
    // Chunked framing (the gateway's) adds a few bytes per chunk; both sides are compared by
    // their rate, and the sizes are reported.
    (
        body,
        body as f64 / f64::from(1 << 20) / t.elapsed().as_secs_f64(),
    )
}

/// One snapshot figure: `n` clients for `secs` against `addr`.
fn snapshots(addr: &str, targets: &[String], n: usize, rate: f64, secs: u64) -> serde_json::Value {
    let stop = Arc::new(AtomicBool::new(false));
    let h = {
        let (addr, targets, stop) = (addr.to_owned(), targets.to_vec(), stop.clone());
        std::thread::spawn(move || async_snapshot_clients(&addr, &targets, n, rate, &stop))
    };
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::Relaxed);
    let mut lat = h.join().unwrap_or_default();
    serde_json::json!({
        "requests": lat.len(),
        "per_s": lat.len() as f64 / secs as f64,
        "p50": pct(&mut lat, 0.5),
        "p99": pct(&mut lat, 0.99),
    })
}

fn median_of(rounds: &[serde_json::Value], pointer: &str) -> f64 {
    let mut v: Vec<f64> = rounds
        .iter()
        .filter_map(|r| r.pointer(pointer)?.as_f64())
        .collect();
    pct(&mut v, 0.5)
}

/// The log of peon `i`, named after its task: the task id and the bytes of its file.
fn write_peon(dir: &Path, i: usize, bytes: u64) -> (String, u64) {
    let name = format!("gw-peon-{i}");
    let pod = dir.join(format!("druid_{name}_00000000-0000-4000-7000-{i:012}"));
    let mut w = PeonWriter::create(&pod.join("main"), 0).expect("create pod");
    write_mib(&mut w, &mut LineGen::new(i as u64), bytes);
    let len = std::fs::metadata(w.live_path()).map_or(0, |m| m.len());
    (name, len)
}

fn main() {
    let args = Args::parse();
    let load_before = loadavg();
    let calibration = gzip1_mib_s();
    let bin = args.agent.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .expect("own path")
            .with_file_name("druid-log-agent")
    });
    let tmp = std::env::temp_dir().join(format!("dla-gwbench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let pods_dir = tmp.join("pods");
    let archive = tmp.join("archive");
    std::fs::create_dir_all(&pods_dir).expect("create the node");
    let mib = 1u64 << 20;
    let mut written = 0;
    let tasks: Vec<String> = (0..args.pods.max(2))
        .map(|i| {
            let size = if i == 0 { args.stream_mib } else { args.mib };
            let (task, bytes) = write_peon(&pods_dir, i, size * mib);
            written += bytes;
            task
        })
        .collect();

    // The node's agent, without a pod watch: it names a task after its pod, as the peons here
    // are named after their tasks.
    let mut cmd = Command::new(&bin);
    cmd.args(["run", "--listen", "127.0.0.1:0", "--idle-timeout", "0s"])
        .arg("--log-root")
        .arg(&pods_dir)
        .arg("--state-dir")
        .arg(tmp.as_path().join("state"))
        .arg("--archive-dir")
        .arg(&archive);
    let agent = spawn(cmd, "agent");
    let agent_pid = agent.child.id();
    wait_until("the agent has read every log", || {
        metric(&agent.addr, "druid_log_agent_read_bytes_total").unwrap_or(0.0) >= written as f64
    });

    // The cluster as the gateway sees it: the peons on one node and that node's agent pod.
    let api = FakeApi::start();
    let port: u16 = agent
        .addr
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("the agent's port");
    let mut agent_pod = PodModel::new(
        "druid-log-agent",
        "druid-log-agent-node",
        "uid-agent",
        "bench-node",
        RestartPolicy::Always,
        &["agent"],
    )
    .with_labels(&[("app.kubernetes.io/name", "druid-log-agent")])
    .with_pod_ip("127.0.0.1")
    .with_port("agent", "http", port);
    api.apply(agent_pod.start("agent"));
    for (i, task) in tasks.iter().enumerate() {
        let mut pod = PodModel::new(
            "druid",
            task,
            &format!("uid-peon-{i}"),
            "bench-node",
            RestartPolicy::Never,
            &["main"],
        )
        .with_labels(&[("druid.k8s.peons", "true")])
        .with_annotations(&[("task.id", task)]);
        api.apply(pod.start("main"));
    }
    let kubeconfig = api.write_kubeconfig(tmp.as_path());
    let config = tmp.as_path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "kubernetes = true\nagent_namespace = \"druid-log-agent\"\nauthorize = \"none\"\n\
             [archive]\ntype = \"dir\"\ndir = {:?}\n",
            archive.display().to_string()
        ),
    )
    .expect("write the gateway's config");
    let mut cmd = Command::new(&bin);
    cmd.args(["gateway", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .env("KUBECONFIG", &kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("DLA_CONFIG");
    let gateway = spawn(cmd, "gateway");
    let gateway_pid = gateway.child.id();
    wait_until("the gateway knows every task", || {
        metric(&gateway.addr, "druid_log_gateway_known_tasks") == Some(tasks.len() as f64)
            && metric(&gateway.addr, "druid_log_gateway_known_agents") == Some(1.0)
    });

    let snapshot_targets: Vec<String> = tasks[1..]
        .iter()
        .map(|t| format!("/druid/indexer/v1/task/{t}/log?offset=-8192"))
        .collect();
    let stream_target = format!("/druid/indexer/v1/task/{}/log?offset=0", tasks[0]);
    let sides = [
        ("direct", agent.addr.as_str()),
        ("gateway", gateway.addr.as_str()),
    ];
    // Each side answers once before anything is timed: connections pooled, pages cached.
    for (_, addr) in sides {
        snapshots(addr, &snapshot_targets, 4, 0.0, 1);
        stream(addr, &stream_target);
    }
    let cpu_start = (cpu_seconds(agent_pid), cpu_seconds(gateway_pid));
    let mut rounds = Vec::new();
    for round in 0..args.rounds {
        let mut order = sides.to_vec();
        if round % 2 == 1 {
            order.reverse();
        }
        let mut r = serde_json::Map::new();
        for (side, addr) in &order {
            let one = snapshots(addr, &snapshot_targets, 1, 0.0, args.secs);
            let many = snapshots(
                addr,
                &snapshot_targets,
                args.clients,
                args.client_rate,
                args.secs,
            );
            let (bytes, mib_s) = stream(addr, &stream_target);
            r.insert(
                (*side).to_owned(),
                serde_json::json!({
                    "snapshot_1_client_ms": one,
                    "snapshot_many_clients_ms": many,
                    "stream": {"bytes": bytes, "mib_s": mib_s},
                }),
            );
        }
        eprintln!(
            "round {}: {}",
            round + 1,
            serde_json::to_string(&r).unwrap_or_default()
        );
        rounds.push(serde_json::Value::Object(r));
    }
    let cpu = (
        cpu_seconds(agent_pid) - cpu_start.0,
        cpu_seconds(gateway_pid) - cpu_start.1,
    );
    let m = |p: &str| median_of(&rounds, p);
    let summary = serde_json::json!({
        "snapshot_1_client_p50_ms": {"direct": m("/direct/snapshot_1_client_ms/p50"), "gateway": m("/gateway/snapshot_1_client_ms/p50")},
        "snapshot_1_client_p99_ms": {"direct": m("/direct/snapshot_1_client_ms/p99"), "gateway": m("/gateway/snapshot_1_client_ms/p99")},
        "snapshot_many_clients_p50_ms": {"direct": m("/direct/snapshot_many_clients_ms/p50"), "gateway": m("/gateway/snapshot_many_clients_ms/p50")},
        "snapshot_many_clients_p99_ms": {"direct": m("/direct/snapshot_many_clients_ms/p99"), "gateway": m("/gateway/snapshot_many_clients_ms/p99")},
        "stream_mib_s": {"direct": m("/direct/stream/mib_s"), "gateway": m("/gateway/stream/mib_s")},
        "gateway_adds_p50_ms": {
            "1_client": m("/gateway/snapshot_1_client_ms/p50") - m("/direct/snapshot_1_client_ms/p50"),
            "many_clients": m("/gateway/snapshot_many_clients_ms/p50") - m("/direct/snapshot_many_clients_ms/p50"),
        },
        "gateway_keeps_of_stream_throughput": m("/gateway/stream/mib_s") / m("/direct/stream/mib_s"),
    });
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    let out = serde_json::json!({
        "date": now_utc(),
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "pods": tasks.len(),
        "clients": args.clients,
        "client_rate": args.client_rate,
        "secs": args.secs,
        "summary": summary,
        "cpu_s_while_measuring": {"agent": cpu.0, "gateway": cpu.1},
        "rounds": rounds,
        "load_before": load_before,
        "load_after": loadavg(),
        "machine": {"cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0), "cpu": cpu_model, "gzip1_mib_s": calibration},
    });
    println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    drop(gateway);
    drop(agent);
    drop(api);
    let _ = std::fs::remove_dir_all(&tmp);
}
