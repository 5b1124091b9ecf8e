//! The Kubernetes side of the real binary: the real `kube` client, through a kubeconfig, against
//! a fake API server that speaks the real list/watch JSON (testkit/src/kubeapi.rs), with pod
//! status as a kubelet reports it (`PodModel`): container restarts with their status lagging
//! the files either way, API outages in several forms and longer than the pending timeout.

use crate::common;

use std::fs;
use std::time::Duration;

use common::{
    AgentProc, Moto, Node, assert_same_log, create_bucket_now, http_get, metric, s3_args, s3_env,
    task_entry, wait_for_archive, wait_for_bytes, wait_for_object, wait_until,
};
use druid_log_agent::loadgen::{LineGen, PeonWriter};
use druid_log_agent_testkit::kubeapi::{FakeApi, Outage, PodModel, RestartPolicy, pod};

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

/// A peon pod in namespace `druid` on node-a, as its kubelet reports it.
fn peon_model(
    name: &str,
    uid: &str,
    task: &str,
    policy: RestartPolicy,
    containers: &[&str],
) -> PodModel {
    PodModel::new("druid", name, uid, "node-a", policy, containers)
        .with_labels(&[PEON])
        .with_annotations(&[("task.id", task)])
}

const BUCKET: &str = "logs";

/// The object Druid reads a task's log from.
fn s3_key(task: &str) -> String {
    format!("druid/indexing-logs/{task}/log")
}

/// A node whose agent watches the fake API and archives to S3 (moto, bucket [`BUCKET`]).
struct S3Node {
    moto: Moto,
    api: FakeApi,
    node: Node,
    agent: AgentProc,
    /// The agent's HTTP address, once it is ready.
    addr: String,
}

impl S3Node {
    fn start() -> S3Node {
        let moto = Moto::start();
        create_bucket_now(&moto, BUCKET);
        let api = FakeApi::start();
        let node = Node::new();
        let args = s3_args(&moto.endpoint, BUCKET);
        let agent = AgentProc::spawn(command(&node, &api, &args, true));
        let addr = wait_ready(&agent);
        S3Node {
            moto,
            api,
            node,
            agent,
            addr,
        }
    }

    /// The directory of a pod's logs in namespace `druid`.
    fn pod_dir(&self, name: &str, uid: &str) -> std::path::PathBuf {
        self.node.pods.join(dir_name("druid", name, uid))
    }

    /// The task's object in S3 is what `log` wrote, byte for byte.
    fn assert_archived(&self, task: &str, log: &PeonWriter) {
        let key = s3_key(task);
        let got = wait_for_object(&self.moto.endpoint, BUCKET, &key, log.expected.len(), LONG);
        assert_same_log(&got, &log.expected);
    }

    fn stop(self) {
        assert!(self.agent.terminate().success());
    }
}

fn start(node: &Node, api: &FakeApi, extra: &[&str]) -> AgentProc {
    AgentProc::spawn(command(node, api, extra, false))
}

fn command(node: &Node, api: &FakeApi, extra: &[&str], s3: bool) -> std::process::Command {
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
    if s3 {
        s3_env(&mut cmd);
    }
    cmd
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
    let read = metric(&addr, "druid_log_agent_read_bytes_total").unwrap();
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
    let archives = || metric(&addr, "druid_log_agent_archives_total").unwrap();
    let deadline = std::time::Instant::now() + LONG;
    while archives() < 2 {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(archives(), 2);
    assert!(agent.terminate().success());
}

/// The live file of `log` is the one the kubelet names after the container's restartCount.
fn assert_instance(log: &PeonWriter, pod: &PodModel) {
    let name = format!("{}.log", pod.restart_count("main"));
    assert!(log.live_path().ends_with(&name), "{:?}", log.live_path());
}

/// Applies a status and waits until the agent's watch has been sent it, so that what the test
/// does next happens after the agent could know it.
fn apply_seen(api: &FakeApi, status: serde_json::Value) {
    let resource_version = api.apply(status);
    assert!(
        api.wait_delivered(resource_version, LONG),
        "the agent's watch was never sent resourceVersion {resource_version}"
    );
}

/// A peon whose `main` fails and is restarted (restartPolicy OnFailure), told as a kubelet
/// tells it and as late: instance 0 writes its last lines; after the back-off the runtime
/// starts `1.log`, which gets lines; only then does the API show instance 0 `terminated`
/// (restartCount 0, the pod still Running), and the agent is sent that; instance 1 writes on;
/// the status shows the back-off (`CrashLoopBackOff`, lastState terminated), then instance 1
/// running (restartCount 1); more lines; `main` exits 0 and, in a later update, the pod
/// Succeeded. The S3 object is both instances' text, byte for byte.
#[test]
fn restart_after_a_failure_is_archived_whole() {
    let s3 = S3Node::start();
    let api = &s3.api;
    let task = "index_kafka_restart_2024-05-01T00:00:00.000Z_a";
    let mut pod = peon_model("peon-r", "uid-r", task, RestartPolicy::OnFailure, &["main"]);
    api.apply(pod.json());
    let mut log = PeonWriter::create(&s3.pod_dir("peon-r", "uid-r").join("main"), 0).unwrap();
    api.apply(pod.start("main"));
    write(&mut log, 1, 300 << 10);

    // What the kubelet does now; the API hears of it later.
    let exited = pod.exit("main", 1, "Error");
    let backing_off = pod.back_off("main");
    let restarted = pod.restart("main");
    log.restart().unwrap();
    assert_instance(&log, &pod);
    write(&mut log, 2, 20 << 10);

    apply_seen(api, exited);
    write(&mut log, 3, 100 << 10);
    api.apply(backing_off);
    api.apply(restarted);
    write(&mut log, 4, 100 << 10);
    apply_seen(api, pod.exit("main", 0, "Completed"));
    api.apply(pod.finish());

    s3.assert_archived(task, &log);
    s3.stop();
}

/// Waits until `/tasks` shows `task` no longer running, or `max`. No event says that the agent
/// decided to keep following a container that exited; this gives it `max` to decide
/// otherwise, and stops as soon as it does.
fn hold_while_running(addr: &str, task: &str, max: Duration) {
    let deadline = std::time::Instant::now() + max;
    while std::time::Instant::now() < deadline {
        if task_entry(addr, task, &[]).is_some_and(|t| t["state"] != "running") {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Two restarts under restartPolicy Always, where even a clean exit is restarted and the phase
/// stays Running. The first is immediate (no back-off before a first restart) and told late:
/// instance 1 has written when the API shows instance 0 OOMKilled. The second follows an exit 0
/// that the API shows, with the back-off, before the next instance's file exists. Container
/// garbage collection then removes the oldest instance's log file (the kubelet keeps one dead
/// instance per container). The task ends with the pod's deletion: SIGTERM, exit 143, the pod
/// Failed, the object gone and the kubelet removing the pod's log directory. The S3 object is
/// the three instances' text, byte for byte.
#[test]
fn two_restarts_then_deletion_are_archived_whole() {
    let s3 = S3Node::start();
    let api = &s3.api;
    let task = "index_kafka_restart_2024-05-01T00:00:00.000Z_b";
    let dir = s3.pod_dir("peon-b", "uid-b");
    let mut pod = peon_model("peon-b", "uid-b", task, RestartPolicy::Always, &["main"]);
    api.apply(pod.json());
    let mut log = PeonWriter::create(&dir.join("main"), 0).unwrap();
    api.apply(pod.start("main"));
    write(&mut log, 1, 200 << 10);

    let exited = pod.exit("main", 137, "OOMKilled");
    let restarted = pod.restart("main");
    log.restart().unwrap();
    assert_instance(&log, &pod);
    write(&mut log, 2, 30 << 10);
    apply_seen(api, exited);
    write(&mut log, 3, 100 << 10);
    api.apply(restarted);
    write(&mut log, 4, 50 << 10);

    apply_seen(api, pod.exit("main", 0, "Completed"));
    hold_while_running(&s3.addr, task, Duration::from_secs(2));
    apply_seen(api, pod.back_off("main"));
    log.restart().unwrap();
    write(&mut log, 5, 50 << 10);
    api.apply(pod.restart("main"));
    assert_instance(&log, &pod);
    fs::remove_file(dir.join("main").join("0.log")).unwrap();
    write(&mut log, 6, 100 << 10);

    apply_seen(api, pod.begin_deletion());
    write(&mut log, 7, 5 << 10); // shutting down after SIGTERM
    api.apply(pod.exit("main", 143, "Error"));
    apply_seen(api, pod.finish());
    api.delete("uid-b");
    fs::remove_dir_all(&dir).unwrap();

    s3.assert_archived(task, &log);
    s3.stop();
}

/// The status ahead of the files: the API shows instance 1 running (restartCount 1, the
/// terminated state coalesced away by the status manager) while `1.log` is still empty. And a
/// sidecar keeps the pod Running after `main` exited 0 for good under OnFailure: the task ends
/// on `main`'s state and the restartPolicy, without a terminal phase. Only `main` is shipped,
/// whole.
#[test]
fn restart_reported_before_the_new_file_has_lines_and_a_sidecar_runs_on() {
    let s3 = S3Node::start();
    let api = &s3.api;
    let task = "index_kafka_restart_2024-05-01T00:00:00.000Z_c";
    let dir = s3.pod_dir("peon-c", "uid-c");
    let mut pod = peon_model(
        "peon-c",
        "uid-c",
        task,
        RestartPolicy::OnFailure,
        &["main", "istio-proxy"],
    );
    api.apply(pod.json());
    let mut log = PeonWriter::create(&dir.join("main"), 0).unwrap();
    let mut sidecar = PeonWriter::create(&dir.join("istio-proxy"), 0).unwrap();
    api.apply(pod.start("istio-proxy"));
    api.apply(pod.start("main"));
    write(&mut log, 1, 150 << 10);
    write(&mut sidecar, 2, 20 << 10);

    pod.exit("main", 2, "Error");
    log.restart().unwrap();
    apply_seen(api, pod.restart("main"));
    assert_instance(&log, &pod);
    write(&mut log, 3, 150 << 10);
    write(&mut sidecar, 4, 20 << 10);
    let ended = pod.exit("main", 0, "Completed");
    assert_eq!(ended["status"]["phase"], "Running");
    api.apply(ended);
    write(&mut sidecar, 5, 20 << 10);

    s3.assert_archived(task, &log);
    s3.stop();
}

/// Whether an agent log line says that the directory `dir` has been pending longer than the
/// pending timeout: the warning the agent gives then (a WARN line naming the directory), or the
/// verdict it must not reach while the API is away ("not a peon"), which the caller refuses.
fn pending_past_timeout(line: &str, dir: &str) -> bool {
    line.contains(dir) && (line.contains(" WARN ") || line.contains("not a peon"))
}

/// The API goes away, in the form `outage`, while a peon starts, for longer than the pending
/// timeout: the pod is created and its log written during the outage, so the agent cannot know
/// whether the directory is a peon's. It must hold the directory however long that lasts and,
/// once the API is back, archive the log whole.
fn outage_longer_than_the_pending_timeout(outage: Outage, name: &str, uid: &str) {
    let api = FakeApi::start();
    let node = Node::new();
    let agent = start(&node, &api, &["--pending-timeout-secs", "2"]);
    let addr = wait_ready(&agent);

    api.set_outage(Some(outage));
    let task = format!("index_kafka_outage_{name}");
    let dir = dir_name("druid", name, uid);
    let mut pod = peon_model(name, uid, &task, RestartPolicy::Never, &["main"]);
    api.apply(pod.json());
    let mut log = log_of(&node, "druid", name, uid, "main");
    api.apply(pod.start("main"));
    write(&mut log, 1, 50 << 10);
    let line = agent.wait_for_line_where(
        &format!("that {dir} is pending past the timeout"),
        LONG,
        |line| pending_past_timeout(line, &dir),
    );
    assert!(
        !line.contains("not a peon"),
        "the agent let a peon go while the API was away ({outage:?}): {line}"
    );
    // The timeout counts from the directory's creation as the file system dates it.
    let created = fs::metadata(node.pods.join(&dir))
        .and_then(|m| m.created())
        .unwrap();
    assert!(
        created.elapsed().unwrap() >= Duration::from_secs(2),
        "the warning came before the pending timeout, so the outage may not outlast it: {line}"
    );
    // What the alert reads: the held directory's age grows for as long as the outage lasts.
    // The pending list is published at the end of a tick, which may follow the warning.
    let pending = |addr: &str| metric(addr, "druid_log_agent_pending_pods");
    wait_until(LONG, "the directory is listed as pending", || {
        pending(&addr) == Some(1)
    });
    let age = |addr: &str| metric(addr, "druid_log_agent_pending_oldest_seconds").unwrap();
    let first = age(&addr);
    wait_until(LONG, "the pending age grows", || age(&addr) > first);
    write(&mut log, 2, 50 << 10);
    api.set_outage(None);
    write(&mut log, 3, 50 << 10);
    api.apply(pod.exit("main", 0, "Completed"));
    api.apply(pod.finish());
    assert_same_log(
        &wait_for_archive(&archived_with(&node, &task), log.expected.len(), LONG),
        &log.expected,
    );
    wait_until(LONG, "no directory is pending", || {
        pending(&addr) == Some(0)
    });
    assert_eq!(age(&addr), 0, "no directory is pending");
    assert!(agent.terminate().success());
}

#[test]
fn api_refusing_connections_longer_than_the_pending_timeout() {
    outage_longer_than_the_pending_timeout(Outage::Refused, "peon-refused", "uid-refused");
}

/// With 503 answers, a client's built-in retries can hide the outage from the watcher.
#[test]
fn api_answering_503_longer_than_the_pending_timeout() {
    outage_longer_than_the_pending_timeout(Outage::Unavailable, "peon-503", "uid-503");
}

/// A directory let go as "not a peon" (the API did not list its pod, also in a relist after
/// the directory appeared) is taken back when the pod turns up as a peon: its log is read from
/// the start and archived whole.
#[test]
fn let_go_directory_is_taken_back_when_its_pod_turns_up_as_a_peon() {
    let api = FakeApi::start();
    let node = Node::new();
    let agent = start(&node, &api, &["--pending-timeout-secs", "1"]);
    wait_ready(&agent);

    let task = "index_kafka_late_pod";
    let dir = dir_name("druid", "peon-late", "uid-late");
    let mut log = log_of(&node, "druid", "peon-late", "uid-late", "main");
    write(&mut log, 1, 50 << 10);
    // The watch breaks and its history is gone: the agent relists, after the directory
    // appeared, and the list does not have the pod.
    api.set_down(true);
    api.expire_history();
    api.set_down(false);
    agent.wait_for_line_where("the directory let go as not a peon", LONG, |line| {
        line.contains(&dir) && line.contains("not a peon")
    });
    write(&mut log, 2, 50 << 10);

    let mut pod = peon_model(
        "peon-late",
        "uid-late",
        task,
        RestartPolicy::Never,
        &["main"],
    );
    api.apply(pod.start("main"));
    write(&mut log, 3, 50 << 10);
    api.apply(pod.exit("main", 0, "Completed"));
    api.apply(pod.finish());
    assert_same_log(
        &wait_for_archive(&archived_with(&node, task), log.expected.len(), LONG),
        &log.expected,
    );
    assert!(agent.terminate().success());
}

/// A deleted pod is forgotten by the watch's cache once `deleted_retention_secs` has passed,
/// without waiting for a relist (which a healthy, long-lived watch may never do): on a busy
/// node the cache must not grow without bound.
#[test]
fn deleted_pods_leave_the_cache_after_their_retention() {
    let api = FakeApi::start();
    let node = Node::new();
    let config = node.tmp.path().join("config.toml");
    fs::write(&config, "[kubernetes]\ndeleted_retention_secs = 1\n").unwrap();
    let agent = start(&node, &api, &["--config", config.to_str().unwrap()]);
    let addr = wait_ready(&agent);
    api.apply(peon(
        "peon-p",
        "uid-p",
        Some("index_kafka_p"),
        &[("main", "running")],
    ));
    let until = |want: u64| {
        let deadline = std::time::Instant::now() + LONG;
        while metric(&addr, "druid_log_agent_watched_pods") != Some(want) {
            assert!(std::time::Instant::now() < deadline, "never {want} pods");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    until(1);
    api.delete("uid-p");
    until(0);
    assert!(agent.terminate().success());
}

/// The pending timeout of the agents in [`held_in_outage`].
const HELD_ARGS: [&str; 2] = ["--pending-timeout-secs", "1"];

/// An agent holding a pod's log directory pending: the API went away (in the form `outage`)
/// before the directory appeared with `bytes` of log, and the pending timeout has passed.
struct Held {
    api: FakeApi,
    node: Node,
    agent: AgentProc,
    dir: String,
    log: PeonWriter,
}

fn held_in_outage(outage: Outage, name: &str, uid: &str, bytes: usize) -> Held {
    let api = FakeApi::start();
    let node = Node::new();
    let agent = start(&node, &api, &HELD_ARGS);
    let addr = wait_ready(&agent);
    api.set_outage(Some(outage));
    let dir = dir_name("druid", name, uid);
    let mut log = log_of(&node, "druid", name, uid, "main");
    write(&mut log, 1, bytes);
    agent.wait_for_line_where(&format!("that {dir} is pending"), LONG, |line| {
        pending_past_timeout(line, &dir)
    });
    // Listed as pending once the agent holds the directory; its file, written before, is open
    // by then (or within moments, on its inotify event: the wait above was a second longer).
    wait_until(LONG, "the directory is listed as pending", || {
        metric(&addr, "druid_log_agent_pending_pods") == Some(1)
    });
    Held {
        api,
        node,
        agent,
        dir,
        log,
    }
}

/// A directory still pending when the agent stops (its pod came and went during an API
/// outage), and gone when the next agent starts: once the pod list is current again it is
/// decided, not held forever. Its files were never read, so what is archived, under the
/// fallback name, is Druid's placeholder.
#[test]
fn pending_directory_gone_across_a_restart_is_decided() {
    let Held {
        api,
        node,
        agent,
        dir,
        ..
    } = held_in_outage(Outage::Refused, "peon-gone", "uid-gone", 10 << 10);
    // The agent stops with the directory pending; the pod is deleted and the kubelet removes
    // its logs meanwhile.
    assert!(agent.terminate().success());
    fs::remove_dir_all(node.pods.join(&dir)).unwrap();
    api.set_outage(None);
    let agent = start(&node, &api, &HELD_ARGS);
    let unmapped = node.archive.join("_unmapped").join(format!("{dir}.log"));
    let got = wait_for_archive(&unmapped, 1, LONG);
    assert!(
        String::from_utf8_lossy(&got).contains("did not report any logs"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    assert!(agent.terminate().success());
}

/// A pending directory (its pod came during an API outage) whose pod is deleted while the agent
/// runs, followed by a SIGTERM before the API is back: the files the agent holds open are the
/// last copy of the log, so it reads them before it stops, and the next agent archives the log
/// whole under the fallback name once the pod list is current (the pod is not in it: created
/// and deleted within the outage).
fn pending_directory_deleted_before_a_sigterm(outage: Outage, name: &str, uid: &str) {
    let Held {
        api,
        node,
        agent,
        dir,
        mut log,
    } = held_in_outage(outage, name, uid, 200 << 10);
    write(&mut log, 2, 100 << 10);
    // The pod is deleted and the kubelet removes its logs while the agent runs; then the
    // agent is stopped (a rolling update, a node drain) before the API answers again.
    fs::remove_dir_all(node.pods.join(&dir)).unwrap();
    assert!(agent.terminate().success());
    api.set_outage(None);
    let agent = start(&node, &api, &HELD_ARGS);
    let unmapped = node.archive.join("_unmapped").join(format!("{dir}.log"));
    assert_same_log(
        &wait_for_archive(&unmapped, log.expected.len(), LONG),
        &log.expected,
    );
    assert!(agent.terminate().success());
    // The name the log was archived under is in the checkpoint, so a later agent does not
    // ask again (ingest_races has the order of the two).
    let state = druid_log_agent::checkpoint::load(&node.state).unwrap();
    let task = state
        .tasks
        .iter()
        .find(|t| t.pod_dir == dir)
        .expect("the task is checkpointed");
    assert_eq!(
        task.task_id.as_deref(),
        Some(format!("_unmapped/{dir}").as_str())
    );
}

#[test]
fn pending_directory_deleted_before_a_sigterm_is_archived_whole() {
    pending_directory_deleted_before_a_sigterm(Outage::Refused, "peon-held", "uid-held");
}

/// With 503 answers, a client's built-in retries can hide the outage from the watcher.
#[test]
fn pending_directory_deleted_before_a_sigterm_in_503s_is_archived_whole() {
    pending_directory_deleted_before_a_sigterm(
        Outage::Unavailable,
        "peon-held-503",
        "uid-held-503",
    );
}

/// The pod watch ends when its turn of the shutdown comes, and lets go of its watch: the API
/// sees the connection closed while the client and its runtime live on (a watch that only
/// stopped being read would stay open on the API server).
#[test]
fn pod_watch_stops_when_told_and_closes_its_watch() {
    use druid_log_agent::kube::{KubeConfig, PodCache, watch_pods};
    use kube::config::{KubeConfigOptions, Kubeconfig};
    use std::sync::Arc;
    use tokio_util::sync::CancellationToken;

    let api = FakeApi::start();
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let client = rt.block_on(async {
        let kubeconfig = Kubeconfig::read_from(api.write_kubeconfig(dir.path())).unwrap();
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .unwrap();
        kube::Client::try_from(config).unwrap()
    });
    let cache = Arc::new(PodCache::default());
    let stop = CancellationToken::new();
    let watch = rt.spawn(watch_pods(
        client.clone(),
        KubeConfig::default(),
        "node-a".into(),
        "main".into(),
        cache.clone(),
        stop.clone(),
    ));
    assert!(
        api.wait_open_watches(LONG, |open| open == 1),
        "the pod watch never started"
    );
    stop.cancel();
    rt.block_on(async { tokio::time::timeout(LONG, watch).await })
        .expect("the pod watch did not end when told to")
        .unwrap();
    assert!(
        api.wait_open_watches(LONG, |open| open == 0),
        "the pod watch ended but its connection to the API stays open"
    );
    drop(client);
}

/// SIGTERM stops the pod watch as the last step of the drain, and the agent exits 0.
#[test]
fn sigterm_stops_the_pod_watch() {
    let api = FakeApi::start();
    let node = Node::new();
    let agent = start(&node, &api, &[]);
    wait_ready(&agent);
    assert!(api.wait_open_watches(LONG, |open| open == 1));
    unsafe {
        libc::kill(agent.child.id() as i32, libc::SIGTERM);
    }
    agent.wait_for_line("pod watch stopped", LONG);
    let mut agent = agent;
    assert!(agent.child.wait().unwrap().success());
}
