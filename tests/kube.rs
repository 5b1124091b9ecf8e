//! The Kubernetes side of the real binary: the real `kube` client, through a kubeconfig, against
//! a fake API server that speaks the real list/watch JSON (src/testkit/kubeapi.rs).

mod common;

use std::fs;
use std::time::Duration;

use common::{AgentProc, Node, assert_same_log, http_get, wait_for_archive, wait_for_bytes};
use druid_log_agent::loadgen::{LineGen, PeonWriter};
use druid_log_agent::testkit::kubeapi::{FakeApi, pod};

const LONG: Duration = Duration::from_secs(60);
const PEON: (&str, &str) = ("druid.k8s.peons", "true");

fn dir_name(ns: &str, name: &str, uid: &str) -> String {
    format!("{ns}_{name}_{uid}")
}

/// A peon pod in namespace `druid` on node-a; `task` is the `task.id` annotation.
fn peon(
    name: &str,
    uid: &str,
    task: Option<&str>,
    containers: &[(&str, &str)],
) -> serde_json::Value {
    let ann: Vec<(&str, &str)> = task.map(|t| ("task.id", t)).into_iter().collect();
    pod("druid", name, uid, "node-a", &[PEON], &ann, containers)
}

/// The log of container `container` of a pod, as the runtime writes it.
fn log_of(node: &Node, ns: &str, name: &str, uid: &str, container: &str) -> PeonWriter {
    PeonWriter::create(&node.pods.join(dir_name(ns, name, uid)).join(container), 0).unwrap()
}

fn write(w: &mut PeonWriter, seed: u64, bytes: usize) {
    common::write_log(w, &mut LineGen::new(seed), bytes, None);
}

fn start(node: &Node, api: &FakeApi, extra: &[&str]) -> AgentProc {
    let kubeconfig = api.write_kubeconfig(node.tmp.path());
    let mut args = vec![
        "--kubernetes",
        "true",
        "--node-name",
        "node-a",
        "--idle-timeout-secs",
        "0",
    ];
    args.extend_from_slice(extra);
    let mut cmd = AgentProc::command(node, &args);
    cmd.env("KUBECONFIG", kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST");
    AgentProc::spawn(cmd)
}

fn wait_ready(agent: &AgentProc) -> String {
    let addr = agent.http_addr();
    let deadline = std::time::Instant::now() + LONG;
    while http_get(&addr, "/readyz", &[]).status != 200 {
        assert!(std::time::Instant::now() < deadline, "never ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    addr
}

fn archived_with(node: &Node, task_id: &str) -> std::path::PathBuf {
    node.archive.join(format!("{task_id}.log"))
}

/// A pod known before its log, a log before its pod, and a pod deleted a second after it
/// started: each log is archived whole under its exact task id.
#[test]
fn pods_before_and_after_their_logs_and_short_lived_pods() {
    let api = FakeApi::start();
    let node = Node::new();
    let agent = start(&node, &api, &[]);
    wait_ready(&agent);

    // Known first.
    let a_id = "index_kafka_wiki_2024-05-01T00:00:00.000Z:a";
    api.apply(peon("peon-a", "uid-a", Some(a_id), &[("main", "running")]));
    let mut a = log_of(&node, "druid", "peon-a", "uid-a", "main");
    write(&mut a, 1, 200 << 10);
    api.apply(peon(
        "peon-a",
        "uid-a",
        Some(a_id),
        &[("main", "terminated")],
    ));
    assert_same_log(
        &wait_for_archive(&archived_with(&node, a_id), a.expected.len(), LONG),
        &a.expected,
    );

    // Log first.
    let b_id = "index_parallel_wiki_2024-05-01T00:00:00.000Z_b";
    let mut b = log_of(&node, "druid", "peon-b", "uid-b", "main");
    write(&mut b, 2, 100 << 10);
    api.apply(peon("peon-b", "uid-b", Some(b_id), &[("main", "running")]));
    write(&mut b, 3, 100 << 10);
    api.apply(peon(
        "peon-b",
        "uid-b",
        Some(b_id),
        &[("main", "terminated")],
    ));
    assert_same_log(
        &wait_for_archive(&archived_with(&node, b_id), b.expected.len(), LONG),
        &b.expected,
    );

    // Gone a second after it started: the pod is deleted and the kubelet removes its logs.
    let c_id = "index_kafka_wiki_c";
    let c_dir = node.pods.join(dir_name("druid", "peon-c", "uid-c"));
    api.apply(peon("peon-c", "uid-c", Some(c_id), &[("main", "running")]));
    let mut c = PeonWriter::create(&c_dir.join("main"), 0).unwrap();
    write(&mut c, 4, 30 << 10);
    std::thread::sleep(Duration::from_secs(1)); // the pod's one second of life
    api.delete("uid-c");
    fs::remove_dir_all(&c_dir).unwrap();
    assert_same_log(
        &wait_for_archive(&archived_with(&node, c_id), c.expected.len(), LONG),
        &c.expected,
    );
    assert!(agent.terminate().success());
}

/// A pod that is not a peon is never read; a peon without `task.id` goes under `_unmapped/`;
/// of a peon's two containers only `main` is shipped.
#[test]
fn non_peons_unmapped_peons_and_sidecars() {
    let api = FakeApi::start();
    let node = Node::new();
    let agent = start(&node, &api, &["--pending-timeout-secs", "1"]);
    let addr = wait_ready(&agent);

    api.apply(pod(
        "kube-system",
        "fluentd-x",
        "uid-n",
        "node-a",
        &[],
        &[],
        &[("main", "running")],
    ));
    let mut n = log_of(&node, "kube-system", "fluentd-x", "uid-n", "main");
    write(&mut n, 5, 10 << 10);

    api.apply(peon("peon-u", "uid-u", None, &[("main", "running")]));
    let mut u = log_of(&node, "druid", "peon-u", "uid-u", "main");
    write(&mut u, 6, 20 << 10);

    let s_id = "index_kafka_sidecar";
    let s_dir = node.pods.join(dir_name("druid", "peon-s", "uid-s"));
    api.apply(peon(
        "peon-s",
        "uid-s",
        Some(s_id),
        &[("main", "running"), ("istio-proxy", "running")],
    ));
    let mut s = PeonWriter::create(&s_dir.join("main"), 0).unwrap();
    let mut side = PeonWriter::create(&s_dir.join("istio-proxy"), 0).unwrap();
    write(&mut s, 7, 20 << 10);
    write(&mut side, 8, 20 << 10);

    api.apply(peon("peon-u", "uid-u", None, &[("main", "terminated")]));
    api.apply(peon(
        "peon-s",
        "uid-s",
        Some(s_id),
        &[("main", "terminated"), ("istio-proxy", "running")],
    ));
    let unmapped = node
        .archive
        .join("_unmapped")
        .join(format!("{}.log", dir_name("druid", "peon-u", "uid-u")));
    assert_same_log(
        &wait_for_archive(&unmapped, u.expected.len(), LONG),
        &u.expected,
    );
    assert_same_log(
        &wait_for_archive(&archived_with(&node, s_id), s.expected.len(), LONG),
        &s.expected,
    );

    // The non-peon was held unread and then let go once the watch was sure about it.
    agent.wait_for_line("not a peon pod", LONG);
    let tasks = String::from_utf8(http_get(&addr, "/tasks", &[]).body).unwrap();
    assert!(!tasks.contains("fluentd"), "{tasks}");
    let metrics = String::from_utf8(http_get(&addr, "/metrics", &[]).body).unwrap();
    let read: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("druid_log_agent_read_bytes_total "))
        .unwrap()
        .parse()
        .unwrap();
    let peon_bytes: u64 = [&u, &s]
        .iter()
        .map(|w| fs::metadata(w.live_path()).unwrap().len())
        .sum();
    assert_eq!(read, peon_bytes, "only the peons' main logs were read");
    assert!(
        metrics.contains("druid_log_agent_unmapped_tasks_total 1"),
        "{metrics}"
    );
    assert!(agent.terminate().success());
}

/// A short-lived pod of another app (a `main` container too) deleted while the watch runs
/// unbroken is not a peon: its log is neither read nor archived under `_unmapped/`.
#[test]
fn short_lived_non_peon_is_not_shipped() {
    let api = FakeApi::start();
    let node = Node::new();
    let agent = start(&node, &api, &["--pending-timeout-secs", "1"]);
    let addr = wait_ready(&agent);
    // The rule needs the watch unbroken since a little (5 s) before the directory appeared:
    // this waits out that window, it synchronises nothing.
    std::thread::sleep(std::time::Duration::from_secs(6));
    api.apply(pod(
        "batch",
        "cron-x",
        "uid-x",
        "node-a",
        &[("app", "cron")],
        &[],
        &[("main", "running")],
    ));
    let mut x = log_of(&node, "batch", "cron-x", "uid-x", "main");
    write(&mut x, 11, 10 << 10);
    // The agent holds the directory (unread) while it waits for the pod's metadata.
    agent.wait_for_line("cron-x", LONG);
    api.delete("uid-x");
    fs::remove_dir_all(node.pods.join(dir_name("batch", "cron-x", "uid-x"))).unwrap();
    agent.wait_for_line("never listed by an unbroken watch of peons", LONG);
    let metrics = String::from_utf8(http_get(&addr, "/metrics", &[]).body).unwrap();
    assert!(
        metrics.contains("druid_log_agent_read_bytes_total 0\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("druid_log_agent_unmapped_tasks_total 0\n"),
        "{metrics}"
    );
    assert!(!node.archive.join("_unmapped").exists());
    assert!(agent.terminate().success());
}

/// The API server goes away and comes back (its history expired, so the watch must relist):
/// tasks keep flowing meanwhile, a pod deleted during the outage is still archived, a pod that
/// appeared during the outage is picked up after it, and nothing is archived twice.
#[test]
fn api_outage_loses_and_doubles_nothing() {
    let api = FakeApi::start();
    let node = Node::new();
    let agent = start(&node, &api, &[]);
    let addr = wait_ready(&agent);

    let f_id = "index_kafka_outage_f";
    let f_dir = node.pods.join(dir_name("druid", "peon-f", "uid-f"));
    api.apply(peon("peon-f", "uid-f", Some(f_id), &[("main", "running")]));
    let mut f = PeonWriter::create(&f_dir.join("main"), 0).unwrap();
    write(&mut f, 9, 50 << 10);
    // F is a known task (the agent has its metadata and its bytes) when the API goes away.
    wait_for_bytes(&addr, f_id, f.expected.len(), LONG);

    api.set_down(true);
    write(&mut f, 10, 50 << 10);
    api.delete("uid-f");
    fs::remove_dir_all(&f_dir).unwrap();
    assert_same_log(
        &wait_for_archive(&archived_with(&node, f_id), f.expected.len(), LONG),
        &f.expected,
    );

    let g_id = "index_kafka_outage_g";
    api.apply(peon("peon-g", "uid-g", Some(g_id), &[("main", "running")]));
    let mut g = log_of(&node, "druid", "peon-g", "uid-g", "main");
    write(&mut g, 11, 50 << 10);
    api.expire_history();
    api.set_down(false);
    api.apply(peon(
        "peon-g",
        "uid-g",
        Some(g_id),
        &[("main", "terminated")],
    ));
    assert_same_log(
        &wait_for_archive(&archived_with(&node, g_id), g.expected.len(), LONG),
        &g.expected,
    );

    // Exactly two archives: F once (not again when the relist found it gone) and G once.
    let archives = || -> u64 {
        let metrics = String::from_utf8(http_get(&addr, "/metrics", &[]).body).unwrap();
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("druid_log_agent_archives_total "))
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    let deadline = std::time::Instant::now() + LONG;
    while archives() < 2 {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(archives(), 2);
    assert!(agent.terminate().success());
}
