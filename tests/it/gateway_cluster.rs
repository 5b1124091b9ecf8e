//! The gateway in front of node agents (docs/gateway.md, increment 2), every part real and on
//! loopback: a test Kubernetes API with peon pods on two nodes and the agents' own pods (pod
//! IP and the container port named `http`, as a DaemonSet's pods show them), two agent
//! processes playing those nodes' agents (each its own log root, port and pod watch), moto,
//! and a fake overlord. The gateway finds a task's node and agent through its two watches.

use crate::common;
use crate::gateway::{
    ALLOWED, Gateway, REFUSED, assert_every_offset, assert_no_log, contains, gateway_with,
    log_path, offset_cases, put_archived, s3_section,
};

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{
    AgentProc, Moto, Node, assert_same_log, create_bucket_now, http_get, s3_args, s3_env,
    wait_for_bytes_with, wait_for_object, wait_until,
};
use druid_log_agent::loadgen::{LineGen, PeonWriter};
use druid_log_agent_testkit::kubeapi::{FakeApi, PodModel, RestartPolicy};
use druid_log_agent_testkit::overlord::{FakeOverlord, log_of};

const LONG: Duration = Duration::from_secs(60);
const AGENT_NS: &str = "druid-log-agent";
const AGENT_LABEL: (&str, &str) = ("app.kubernetes.io/name", "druid-log-agent");
const PEON: (&str, &str) = ("druid.k8s.peons", "true");
const TOKEN: &str = "the-agents-token";
const BEARER: &str = "Authorization: Bearer the-agents-token";
const BUCKET: &str = "logs";

/// One node: its log tree and its agent, with the agent's pod as the API shows it.
struct NodeAgent {
    name: &'static str,
    node: Node,
    agent: Option<AgentProc>,
    /// The agent's HTTP address (its pod IP and `http` port).
    addr: String,
}

/// Two nodes with their agents, the API, moto and a gateway.
struct Cluster {
    moto: Moto,
    api: FakeApi,
    nodes: Vec<NodeAgent>,
    gw: Gateway,
    _dir: tempfile::TempDir,
}

/// How the gateway of a [`Cluster`] is set up beside its routing.
struct Setup<'a> {
    /// Extra lines of the gateway's config (authorize, overlord_url, timeouts).
    gateway: String,
    /// Extra flags of both agents.
    agent_args: &'a [&'a str],
}

impl Cluster {
    fn start(setup: Setup) -> Cluster {
        let moto = Moto::start();
        create_bucket_now(&moto, BUCKET);
        let api = FakeApi::start();
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = api.write_kubeconfig(dir.path());
        let token_file = dir.path().join("agent-token");
        std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
        let nodes = ["node-a", "node-b"]
            .into_iter()
            .map(|name| {
                start_agent(
                    name,
                    &api,
                    &moto,
                    &kubeconfig,
                    &token_file,
                    setup.agent_args,
                )
            })
            .collect();
        let config = format!(
            "kubernetes = true\nagent_namespace = \"{AGENT_NS}\"\nagent_token_file = \"{}\"\n{}\n{}",
            token_file.display(),
            setup.gateway,
            s3_section(&moto.endpoint)
        );
        let gw = gateway_with(&config, |cmd| {
            cmd.env("KUBECONFIG", &kubeconfig)
                .env_remove("KUBERNETES_SERVICE_HOST");
        });
        wait_until(LONG, "the gateway is ready", || {
            http_get(&gw.addr, "/readyz", &[]).status == 200
        });
        let c = Cluster {
            moto,
            api,
            nodes,
            gw,
            _dir: dir,
        };
        c.wait_gateway_metric("druid_log_gateway_known_agents", 2);
        c
    }

    fn node(&self, name: &str) -> &NodeAgent {
        self.nodes.iter().find(|n| n.name == name).unwrap()
    }

    fn node_mut(&mut self, name: &str) -> &mut NodeAgent {
        self.nodes.iter_mut().find(|n| n.name == name).unwrap()
    }

    /// A peon pod of `task` on `node`, its `main` container running, and its log writer.
    fn run_peon(&self, node: &str, pod: &str, task: &str) -> (PodModel, PeonWriter) {
        let uid = format!("uid-{pod}");
        let mut model = PodModel::new("druid", pod, &uid, node, RestartPolicy::Never, &["main"])
            .with_labels(&[PEON])
            .with_annotations(&[("task.id", task)]);
        self.api.apply(model.start("main"));
        let dir = self
            .node(node)
            .node
            .pods
            .join(format!("druid_{pod}_{uid}"))
            .join("main");
        (model, PeonWriter::create(&dir, 0).unwrap())
    }

    /// The peon's container exits 0 and the pod finishes, as its kubelet reports it.
    fn finish_peon(&self, model: &mut PodModel) {
        self.api.apply(model.exit("main", 0, "Completed"));
        self.api.apply(model.finish());
    }

    /// The value of a sample of the gateway's `/metrics`, `series` with its labels.
    fn gateway_metric(&self, series: &str) -> Option<u64> {
        sample(&self.gw.addr, series, &[])
    }

    fn wait_gateway_metric(&self, series: &str, want: u64) {
        wait_until(LONG, &format!("{series} = {want}"), || {
            self.gateway_metric(series) == Some(want)
        });
    }
}

fn start_agent(
    name: &'static str,
    api: &FakeApi,
    moto: &Moto,
    kubeconfig: &Path,
    token_file: &Path,
    extra: &[&str],
) -> NodeAgent {
    let node = Node::new();
    let token = token_file.to_str().unwrap();
    let mut args = vec![
        "--kubernetes",
        "true",
        "--node-name",
        name,
        "--idle-timeout",
        "0s",
        "--auth-token-file",
        token,
    ];
    args.extend_from_slice(&s3_args(&moto.endpoint, BUCKET));
    args.extend_from_slice(extra);
    let mut cmd = AgentProc::command(&node, &args);
    cmd.env("KUBECONFIG", kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST");
    s3_env(&mut cmd);
    let agent = AgentProc::spawn(cmd);
    let addr = agent.http_addr();
    let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
    // The agent's pod as its DaemonSet creates it and its kubelet reports it: on its node,
    // with its IP and the port named `http`, running and ready.
    let mut pod = PodModel::new(
        AGENT_NS,
        &format!("druid-log-agent-{name}"),
        &format!("uid-agent-{name}"),
        name,
        RestartPolicy::Always,
        &["agent"],
    )
    .with_labels(&[AGENT_LABEL])
    .with_pod_ip("127.0.0.1")
    .with_port("agent", "http", port);
    api.apply(pod.start("agent"));
    NodeAgent {
        name,
        node,
        agent: Some(agent),
        addr,
    }
}

/// Whether every thread of process `pid` is stopped (state `T` in `/proc/PID/task/*/stat`;
/// the state follows the command name's closing parenthesis, and a name may hold one).
fn all_threads_stopped(pid: &str) -> bool {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    tasks.into_iter().all(|t| {
        let stat = std::fs::read_to_string(t.unwrap().path().join("stat")).unwrap_or_default();
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            == Some("T")
    })
}

/// The value of the sample `series` (name and labels, exactly as exposed) in `addr`'s
/// `/metrics`.
fn sample(addr: &str, series: &str, extra: &[&str]) -> Option<u64> {
    let text = String::from_utf8(http_get(addr, "/metrics", extra).body).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn write(w: &mut PeonWriter, seed: u64, bytes: usize) {
    common::write_log(w, &mut LineGen::new(seed), bytes, None);
}

/// A running task on the second node, read through the gateway at every Druid offset: byte
/// for byte what that node's agent serves, with Druid's authorization in front (a refused
/// caller gets no byte) and 503 once the overlord is down.
#[test]
fn running_task_on_the_second_node_at_every_offset_as_its_agent_serves_it() {
    let task_b = "index_kafka_wiki_2026-12-01T00:00:00.000Z_b";
    let task_a = "index_kafka_wiki_2026-12-01T00:00:00.000Z_a";
    let mut overlord = FakeOverlord::start(
        ALLOWED.strip_prefix("Authorization: ").unwrap(),
        &[task_a, task_b],
    );
    let c = Cluster::start(Setup {
        gateway: format!(
            "authorize = \"druid\"\noverlord_url = \"{}\"",
            overlord.url()
        ),
        agent_args: &[],
    });
    let (_pod_b, mut log_b) = c.run_peon("node-b", "peon-b", task_b);
    let (_pod_a, mut log_a) = c.run_peon("node-a", "peon-a", task_a);
    write(&mut log_b, 1, 300 << 10);
    write(&mut log_a, 2, 20 << 10);
    wait_for_bytes_with(
        &c.node("node-b").addr,
        task_b,
        log_b.expected.len(),
        LONG,
        &[BEARER],
    );
    wait_for_bytes_with(
        &c.node("node-a").addr,
        task_a,
        log_a.expected.len(),
        LONG,
        &[BEARER],
    );
    c.wait_gateway_metric("druid_log_gateway_known_tasks", 2);

    // Running, so not archived: only the node's agent has these bytes.
    assert_every_offset(&c.gw.addr, task_b, &log_b.expected, &[ALLOWED]);
    let agent_b = &c.node("node-b").addr;
    for offset in offset_cases(log_b.expected.len() as i64) {
        let direct = http_get(agent_b, &log_path(task_b, offset), &[BEARER]);
        let through = http_get(&c.gw.addr, &log_path(task_b, offset), &[ALLOWED]);
        assert_eq!(through.status, direct.status, "offset {offset}");
        assert!(
            through.body == direct.body,
            "offset {offset}: not the agent's bytes"
        );
        assert_eq!(
            through.header("content-type"),
            direct.header("content-type")
        );
    }
    assert_every_offset(&c.gw.addr, task_a, &log_a.expected, &[ALLOWED]);
    // 11 offsets twice for task b, 11 for task a.
    assert_eq!(
        c.gateway_metric(
            "druid_log_gateway_requests_total{route=\"log\",source=\"agent\",code=\"200\"}"
        ),
        Some(33)
    );

    // The overlord refuses this caller: 403 and not a byte, though the agent has the log.
    let refused = http_get(&c.gw.addr, &log_path(task_b, 0), &[REFUSED]);
    assert_eq!(refused.status, 403);
    assert!(!contains(&refused.body, &log_b.expected[..64]));
    // A task no one knows: the overlord says 400, so Druid's 404.
    assert_no_log(&http_get(
        &c.gw.addr,
        &log_path("index_unknown_1", 0),
        &[ALLOWED],
    ));

    // Overlord down: a decision still in the cache (auth_cache, 30 s) serves; credentials
    // it has not seen cannot be checked, so 503 and no byte (fail closed).
    overlord.stop();
    let cached = http_get(&c.gw.addr, &log_path(task_b, -8192), &[ALLOWED]);
    assert_eq!(cached.status, 200);
    let other = "Authorization: Basic b3RoZXI6cHc=";
    let down = http_get(&c.gw.addr, &log_path(task_b, -8192), &[other]);
    assert_eq!(down.status, 503);
    assert!(!contains(
        &down.body,
        &log_b.expected[log_b.expected.len() - 64..]
    ));
}

/// A follow through the gateway stays open while the task writes and ends with the whole log
/// when the task ends; a client that leaves a follow releases the gateway's connection to
/// the agent (the agent's open-connection count drops back).
#[test]
fn follow_ends_with_the_whole_log_and_a_client_that_leaves_frees_the_agent() {
    let c = Cluster::start(Setup {
        gateway: "authorize = \"none\"".into(),
        agent_args: &[],
    });
    let agent_b = c.node("node-b").addr.clone();
    let open = || sample(&agent_b, "druid_log_agent_http_open_connections", &[BEARER]);

    // First, the client that leaves: no other gateway connection to agent b exists yet.
    let leaving_task = "index_kafka_leaving_1";
    let (_pod_l, mut log_l) = c.run_peon("node-b", "peon-l", leaving_task);
    write(&mut log_l, 3, 10 << 10);
    wait_for_bytes_with(
        &agent_b,
        leaving_task,
        log_l.expected.len(),
        LONG,
        &[BEARER],
    );
    c.wait_gateway_metric("druid_log_gateway_known_tasks", 1);
    let mut client = TcpStream::connect(&c.gw.addr).unwrap();
    write!(
        client,
        "GET {}&follow=true HTTP/1.1\r\nHost: t\r\n\r\n",
        log_path(leaving_task, 0)
    )
    .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 64 << 10];
    while !contains(&got, &log_l.expected[log_l.expected.len() - 40..]) {
        let n = client.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "the follow ended early: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    // The follow's connection and this /metrics request itself.
    wait_until(LONG, "agent b holds the follow", || open() == Some(2));
    drop(client);
    wait_until(LONG, "agent b's follow connection closes", || {
        open() == Some(1)
    });

    // Then a follow that the task's end completes.
    let task = "index_kafka_follow_1";
    let (mut pod, mut log) = c.run_peon("node-b", "peon-f", task);
    write(&mut log, 4, 100 << 10);
    wait_for_bytes_with(&agent_b, task, log.expected.len(), LONG, &[BEARER]);
    c.wait_gateway_metric("druid_log_gateway_known_tasks", 2);
    let gw = c.gw.addr.clone();
    let follower = std::thread::spawn(move || {
        common::http::get(
            &gw,
            &format!("{}&follow=true", log_path(task, 0)),
            &[],
            None,
        )
    });
    // The follower's connection is open at the agent before the task writes on.
    wait_until(LONG, "agent b holds the second follow", || {
        open() == Some(2)
    });
    write(&mut log, 5, 200 << 10);
    c.finish_peon(&mut pod);
    let r = follower.join().unwrap().unwrap();
    assert_eq!(r.status, 200);
    assert_same_log(&r.body, &log.expected);
}

/// A finished task whose pod is deleted and whose spool the agent has retired: the gateway
/// still routes to the node's agent (the pod stays mapped), gets its 404, and serves the
/// archive byte for byte at every offset. A task whose node has no agent is served from
/// the archive too; a task nobody has, with no overlord, is Druid's 404.
#[test]
fn retired_spool_is_served_from_s3_at_every_offset() {
    let c = Cluster::start(Setup {
        gateway: "authorize = \"none\"".into(),
        agent_args: &["--retention", "0s"],
    });
    let task = "index_parallel_wiki_2026-12-01T01:00:00.000Z_r";
    let (mut pod, mut log) = c.run_peon("node-b", "peon-r", task);
    write(&mut log, 6, 400 << 10);
    c.finish_peon(&mut pod);
    let key = format!("druid/indexing-logs/{task}/log");
    let archived = wait_for_object(&c.moto.endpoint, BUCKET, &key, log.expected.len(), LONG);
    assert_same_log(&archived, &log.expected);
    // The pod is deleted and the kubelet removes its logs; the agent retires the spool.
    c.api.delete("uid-peon-r");
    std::fs::remove_dir_all(c.node("node-b").node.pods.join("druid_peon-r_uid-peon-r")).unwrap();
    let agent_b = c.node("node-b").addr.clone();
    wait_until(LONG, "agent b retires the spool", || {
        http_get(&agent_b, &log_path(task, 0), &[BEARER]).status == 404
    });
    let asked_before = sample(
        &agent_b,
        "druid_log_agent_http_requests_total{route=\"log\",code=\"404\"}",
        &[BEARER],
    )
    .unwrap();

    assert_every_offset(&c.gw.addr, task, &log.expected, &[]);
    // Each of the 11 requests asked the agent first.
    let asked = sample(
        &agent_b,
        "druid_log_agent_http_requests_total{route=\"log\",code=\"404\"}",
        &[BEARER],
    )
    .unwrap();
    assert_eq!(asked - asked_before, 11);
    assert_eq!(
        c.gateway_metric(
            "druid_log_gateway_requests_total{route=\"log\",source=\"archive\",code=\"200\"}"
        ),
        Some(11)
    );

    // A peon on a node without an agent (a node that is gone): the archive.
    let orphan = "index_kafka_orphan_1";
    let body = b"archived before its node went away\n".to_vec();
    put_archived(&c.moto, orphan, &body);
    let mut ghost = PodModel::new(
        "druid",
        "peon-o",
        "uid-peon-o",
        "node-gone",
        RestartPolicy::Never,
        &["main"],
    )
    .with_labels(&[PEON])
    .with_annotations(&[("task.id", orphan)]);
    c.api.apply(ghost.start("main"));
    c.wait_gateway_metric("druid_log_gateway_known_tasks", 2);
    let r = http_get(&c.gw.addr, &log_path(orphan, 0), &[]);
    assert_eq!((r.status, r.body), (200, body));

    assert_no_log(&http_get(
        &c.gw.addr,
        &log_path("index_nobody_has_1", 0),
        &[],
    ));
    // The agent's 404 means "not here", not a failure: no upstream error is counted.
    let metrics = String::from_utf8(http_get(&c.gw.addr, "/metrics", &[]).body).unwrap();
    assert!(
        !metrics.contains("druid_log_gateway_upstream_errors_total{"),
        "{metrics}"
    );
}

/// The agent of the task's node killed (its pod still listed as running: the kubelet has not
/// reported yet): the archive answers, or the overlord for what is not archived. An agent
/// that accepts connections but never answers (stopped) costs the first-byte timeout, then
/// the archive answers.
#[test]
fn a_killed_or_hung_agent_falls_back_to_the_archive_and_the_overlord() {
    let live = "index_kafka_live_on_b";
    let overlord = FakeOverlord::start(ALLOWED.strip_prefix("Authorization: ").unwrap(), &[live]);
    let mut c = Cluster::start(Setup {
        gateway: format!(
            "authorize = \"none\"\noverlord_url = \"{}\"\nupstream_first_byte_timeout = \"1s\"",
            overlord.url()
        ),
        agent_args: &[],
    });
    // Finished and archived, spools kept (retention 1h): the agents would answer.
    let done_b = "index_kafka_done_on_b";
    let done_a = "index_kafka_done_on_a";
    let mut archived = Vec::new();
    for (node, pod, task, seed) in [
        ("node-b", "peon-db", done_b, 7),
        ("node-a", "peon-da", done_a, 8),
    ] {
        let (mut model, mut log) = c.run_peon(node, pod, task);
        write(&mut log, seed, 50 << 10);
        c.finish_peon(&mut model);
        let key = format!("druid/indexing-logs/{task}/log");
        wait_for_object(&c.moto.endpoint, BUCKET, &key, log.expected.len(), LONG);
        archived.push(log.expected);
    }
    let (_pod, mut log_live) = c.run_peon("node-b", "peon-live", live);
    write(&mut log_live, 9, 10 << 10);
    let agent_b = c.node("node-b").addr.clone();
    wait_for_bytes_with(&agent_b, live, log_live.expected.len(), LONG, &[BEARER]);
    c.wait_gateway_metric("druid_log_gateway_known_tasks", 3);
    let r = http_get(&c.gw.addr, &log_path(live, 0), &[]);
    assert!(
        r.status == 200 && r.body == log_live.expected,
        "before the kill"
    );

    c.node_mut("node-b").agent.take().unwrap().kill9();
    let r = http_get(&c.gw.addr, &log_path(done_b, 0), &[]);
    assert_eq!(r.status, 200);
    assert_same_log(&r.body, &archived[0]);
    // Not archived: the overlord's answer (the caller's credentials passed on).
    let r = http_get(&c.gw.addr, &log_path(live, 0), &[ALLOWED]);
    assert_eq!((r.status, r.body), (200, log_of(live).into_bytes()));
    assert_eq!(
        c.gateway_metric(
            "druid_log_gateway_upstream_errors_total{source=\"agent\",kind=\"connect\"}"
        ),
        Some(2)
    );

    // Agent a stopped (SIGSTOP): the kernel still accepts its connections, nothing answers.
    let pid = c
        .node("node-a")
        .agent
        .as_ref()
        .unwrap()
        .child
        .id()
        .to_string();
    let signal = |sig: &str| {
        assert!(
            Command::new("kill")
                .args([sig, &pid])
                .status()
                .unwrap()
                .success()
        );
    };
    assert!(!all_threads_stopped(&pid), "agent a runs before the signal");
    signal("-STOP");
    // kill(2) returns once the signal is queued; the group stop then spreads from the one
    // thread that takes it, and on a loaded machine another thread woken by the gateway's
    // connection could answer first (seen in CI: the agent served the log, no timeout was
    // counted). Stopped is when the kernel shows every thread stopped.
    wait_until(LONG, "every thread of agent a is stopped", || {
        all_threads_stopped(&pid)
    });
    // A read timeout far above the gateway's first-byte timeout: a gateway that hangs on
    // the stopped agent fails the test instead of hanging it.
    let r = common::http::get(&c.gw.addr, &log_path(done_a, 0), &[], Some(LONG));
    signal("-CONT");
    let r = r.expect("the gateway answered");
    assert_eq!(r.status, 200);
    assert_same_log(&r.body, &archived[1]);
    assert_eq!(
        c.gateway_metric(
            "druid_log_gateway_upstream_errors_total{source=\"agent\",kind=\"timeout\"}"
        ),
        Some(1)
    );
}

/// `druid-log-agent logs` with the user's kubeconfig, through the API server's service
/// proxy to the gateway Service (the Druid credentials in X-Druid-Authorization, as the API
/// server consumes Authorization), and with `--gateway`: the log on stdout and exit 0, a
/// follow until the task ends, Druid's 404 text on stderr and exit 1 for a task nobody
/// has, exit 2 when the way there is wrong (no such Service).
#[test]
fn logs_command_through_the_api_server_and_direct() {
    let task = "index_kafka_logs_cmd_1";
    let overlord = FakeOverlord::start(ALLOWED.strip_prefix("Authorization: ").unwrap(), &[task]);
    let c = Cluster::start(Setup {
        gateway: format!(
            "authorize = \"druid\"\noverlord_url = \"{}\"",
            overlord.url()
        ),
        agent_args: &[],
    });
    let creds = ALLOWED.strip_prefix("Authorization: ").unwrap();
    let gw_addr: std::net::SocketAddr = c.gw.addr.parse().unwrap();
    c.api
        .add_service(AGENT_NS, "druid-log-gateway", "http", gw_addr);
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = c.api.write_kubeconfig(dir.path());
    let logs = |args: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_druid-log-agent"));
        cmd.arg("logs")
            .args(args)
            .env("KUBECONFIG", &kubeconfig)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("DLA_GATEWAY_URL")
            .env_remove("DLA_AUTHORIZATION");
        cmd
    };
    let (mut pod, mut log) = c.run_peon("node-b", "peon-c", task);
    write(&mut log, 10, 60 << 10);
    wait_for_bytes_with(
        &c.node("node-b").addr,
        task,
        log.expected.len(),
        LONG,
        &[BEARER],
    );
    c.wait_gateway_metric("druid_log_gateway_known_tasks", 1);

    // Druid decides through the API server too: without credentials the overlord says 401.
    let out = logs(&[task, "-n", AGENT_NS]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    let out = logs(&[task, "-n", AGENT_NS, "--authorization", creds])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same_log(&out.stdout, &log.expected);
    let gw_url = format!("http://{}", c.gw.addr);
    let out = logs(&[
        task,
        "--offset",
        "-100",
        "--gateway",
        &gw_url,
        "--authorization",
        creds,
    ])
    .output()
    .unwrap();
    assert!(out.status.success());
    assert_eq!(out.stdout, &log.expected[log.expected.len() - 100..]);
    // The request went through the API server's proxy path.
    assert!(
        c.api.requests().iter().any(|r| r.starts_with(&format!(
            "/api/v1/namespaces/{AGENT_NS}/services/druid-log-gateway:http/proxy/druid/indexer/v1/task/{task}/log"
        ))),
        "{:?}",
        c.api.requests()
    );

    // A follow through the API server prints until the task ends.
    let follower = logs(&[task, "-n", AGENT_NS, "--follow", "--authorization", creds])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let agent_b = c.node("node-b").addr.clone();
    wait_until(LONG, "agent b holds the follow", || {
        sample(&agent_b, "druid_log_agent_http_open_connections", &[BEARER]) == Some(2)
    });
    write(&mut log, 11, 100 << 10);
    c.finish_peon(&mut pod);
    let out = follower.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_same_log(&out.stdout, &log.expected);

    let out = logs(&[
        "index_nobody_has_2",
        "-n",
        AGENT_NS,
        "--authorization",
        creds,
    ])
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        druid_log_agent::serve::NO_LOG
    );
    let out = logs(&[task, "-n", AGENT_NS, "--service", "no-such-gateway"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("404") && err.contains("not found"), "{err}");
}
