//! The HTTP endpoint of the real binary: Druid's log API and offset rules, hostile requests,
//! authentication, concurrent readers during ingest, and bounded memory while streaming.

use crate::common;

use std::fs;
use std::time::Duration;

use common::{AgentProc, Node, http_get, wait_for_archive, wait_for_bytes, wait_for_bytes_with};
use druid_log_agent::loadgen::{LineGen, PeonWriter};
use druid_log_agent::serve::{NO_LOG, druid_start};

const LONG: Duration = Duration::from_secs(60);

fn write(w: &mut PeonWriter, seed: u64, bytes: usize) {
    common::write_log(w, &mut LineGen::new(seed), bytes, None);
}

fn log_path(task: &str, offset: &str) -> String {
    format!("/druid/indexer/v1/task/{task}/log?offset={offset}")
}

/// A log of several sealed blocks plus an unsealed tail, read with every kind of offset.
#[test]
fn every_offset_rule_of_druid_is_byte_exact() {
    let node = Node::new();
    let task = "index-kafka-offsets";
    let mut w = PeonWriter::create(&node.pod_dir(task).join("main"), 0).unwrap();
    write(&mut w, 1, 300 << 10);
    // A huge block age keeps the newest bytes in the unsealed tail.
    let agent = AgentProc::start(
        &node,
        &["--idle-timeout-secs", "0", "--block-max-age-ms", "3600000"],
    );
    let addr = agent.http_addr();
    let want = &w.expected;
    let len = want.len() as i64;
    wait_for_bytes(&addr, task, want.len(), LONG);
    let tasks: serde_json::Value =
        serde_json::from_slice(&http_get(&addr, "/tasks", &[]).body).unwrap();
    let spool = tasks[0]["spoolBytes"].as_u64().unwrap();
    assert!(spool > 0, "some blocks must be sealed: {tasks}");
    for offset in [
        0,
        1,
        4096,
        65_535,
        65_536,
        200_000,
        len - 1,
        len,
        len + 1,
        -1,
        -8192,
        -100_000,
        -(len - 1),
        -len,
        -len - 1,
        i64::MIN,
        i64::MAX,
    ] {
        let r = http_get(&addr, &log_path(task, &offset.to_string()), &[]);
        assert_eq!(r.status, 200, "offset {offset}");
        assert_eq!(r.header("content-type"), Some("text/plain; charset=UTF-8"));
        let start = druid_start(offset, want.len() as u64) as usize;
        assert!(
            r.body == want[start..],
            "offset {offset}: got {} bytes, want {}",
            r.body.len(),
            want.len() - start
        );
    }
    // No offset at all is the whole log.
    let r = http_get(&addr, &format!("/druid/indexer/v1/task/{task}/log"), &[]);
    assert!(r.body == *want);
    for bad in ["abc", "1.5", "99999999999999999999999", ""] {
        let r = http_get(&addr, &log_path(task, bad), &[]);
        assert_eq!(
            r.status,
            400,
            "offset {bad:?}: {:?}",
            String::from_utf8_lossy(&r.body)
        );
    }
    assert!(agent.terminate().success());
}

/// Unknown tasks get Druid's 404 text; paths that try to escape or confuse never reach a file.
#[test]
fn unknown_and_hostile_requests() {
    let node = Node::new();
    let task = "index-kafka-hostile";
    let mut w = PeonWriter::create(&node.pod_dir(task).join("main"), 0).unwrap();
    write(&mut w, 2, 10 << 10);
    let agent = AgentProc::start(&node, &["--idle-timeout-secs", "0"]);
    let addr = agent.http_addr();
    wait_for_bytes(&addr, task, w.expected.len(), LONG);
    let r = http_get(&addr, &log_path("no_such_task", "0"), &[]);
    assert_eq!(r.status, 404);
    assert_eq!(String::from_utf8_lossy(&r.body), NO_LOG);
    let long = "a".repeat(100_000);
    let hostile = [
        "/druid/indexer/v1/task/../../../../etc/passwd/log".to_owned(),
        "/druid/indexer/v1/task/..%2F..%2F..%2Fetc%2Fpasswd/log".to_owned(),
        "/druid/indexer/v1/task/%2e%2e/log".to_owned(),
        "/druid/indexer/v1/task/%2e%2e%2fstate%2fcheckpoint.json/log".to_owned(),
        "/druid/indexer/v1/task/a%00b/log".to_owned(),
        "/druid/indexer/v1/task/%ff%fe/log".to_owned(),
        format!("/druid/indexer/v1/task/{}/log", &long[..2000]),
        format!("/druid/indexer/v1/task/{long}/log"),
        "/../../etc/passwd".to_owned(),
        "/druid/indexer/v1/task//log".to_owned(),
    ];
    for path in &hostile {
        let r = http_get(&addr, path, &[]);
        assert!(
            matches!(r.status, 400 | 404 | 414 | 431),
            "{}: status {}",
            &path[..path.len().min(80)],
            r.status
        );
        assert!(
            !String::from_utf8_lossy(&r.body).contains("root:"),
            "{path}"
        );
    }
    // The agent is still serving.
    assert_eq!(http_get(&addr, "/healthz", &[]).status, 200);
    let r = http_get(&addr, &log_path(task, "0"), &[]);
    assert!(r.body == w.expected);
    assert!(agent.terminate().success());
}

#[test]
fn bearer_token_is_required_except_for_probes() {
    let node = Node::new();
    let token_file = node.tmp.path().join("token");
    fs::write(&token_file, "s3cret-token\n").unwrap();
    let task = "index-kafka-auth";
    let mut w = PeonWriter::create(&node.pod_dir(task).join("main"), 0).unwrap();
    write(&mut w, 3, 1 << 10);
    let agent = AgentProc::start(&node, &["--auth-token-file", token_file.to_str().unwrap()]);
    let addr = agent.http_addr();
    let path = log_path(task, "0");
    assert_eq!(http_get(&addr, &path, &[]).status, 401);
    assert_eq!(
        http_get(&addr, &path, &["Authorization: Bearer wrong"]).status,
        401
    );
    assert_eq!(
        http_get(&addr, &path, &["Authorization: Bearer s3cret-token2"]).status,
        401
    );
    assert_eq!(http_get(&addr, "/tasks", &[]).status, 401);
    assert_eq!(http_get(&addr, "/metrics", &[]).status, 401);
    assert_eq!(http_get(&addr, "/healthz", &[]).status, 200);
    assert_eq!(http_get(&addr, "/readyz", &[]).status, 200);
    // Listening comes before the agent has found the task's directory (a loaded machine
    // answered 404 here): wait until it holds the log, asking with the token.
    let bearer = "Authorization: Bearer s3cret-token";
    wait_for_bytes_with(&addr, task, w.expected.len(), LONG, &[bearer]);
    let ok = http_get(&addr, &path, &[bearer]);
    assert_eq!(ok.status, 200);
    assert!(ok.body == w.expected);
    assert!(agent.terminate().success());
}

/// The authentication scheme is case-insensitive (RFC 9110, section 11.1) and may be followed
/// by more than one space: clients that send `bearer` are not locked out. The token itself is
/// compared exactly.
#[test]
fn bearer_scheme_is_case_insensitive() {
    let node = Node::new();
    let token_file = node.tmp.path().join("token");
    fs::write(&token_file, "s3cret-token\n").unwrap();
    let task = "index-kafka-auth-scheme";
    let mut w = PeonWriter::create(&node.pod_dir(task).join("main"), 0).unwrap();
    write(&mut w, 3, 1 << 10);
    let agent = AgentProc::start(&node, &["--auth-token-file", token_file.to_str().unwrap()]);
    let addr = agent.http_addr();
    let auth = "Authorization: Bearer s3cret-token";
    wait_for_bytes_with(&addr, task, w.expected.len(), LONG, &[auth]);
    let path = log_path(task, "0");
    for header in [
        "Authorization: bearer s3cret-token",
        "Authorization: BEARER s3cret-token",
        "Authorization: BeArEr s3cret-token",
        "Authorization: Bearer   s3cret-token",
    ] {
        let r = http_get(&addr, &path, &[header]);
        assert_eq!(r.status, 200, "{header}");
        assert!(r.body == w.expected, "{header}");
    }
    for header in [
        "Authorization: bearer S3CRET-TOKEN",
        "Authorization: Basic s3cret-token",
        "Authorization: bearers3cret-token",
        "Authorization: s3cret-token",
    ] {
        assert_eq!(http_get(&addr, &path, &[header]).status, 401, "{header}");
    }
    assert!(agent.terminate().success());
}

/// Readers (plain and `follow=true`) hammer the endpoint while the peon writes; every plain
/// reader gets a correct prefix, every follower the whole log once the pod is gone, and
/// ingest completes.
#[test]
fn concurrent_readers_and_followers_during_ingest() {
    let node = Node::new();
    let task = "index-kafka-concurrent";
    let pod = node.pod_dir(task);
    let mut w = PeonWriter::create(&pod.join("main"), 1 << 20).unwrap();
    write(&mut w, 4, 64 << 10);
    let agent = AgentProc::start(
        &node,
        &["--idle-timeout-secs", "0", "--block-max-age-ms", "200"],
    );
    let addr = agent.http_addr();
    wait_for_bytes(&addr, task, w.expected.len(), LONG);
    let followers: Vec<_> = (0..4)
        .map(|_| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                http_get(
                    &addr,
                    &format!("/druid/indexer/v1/task/{task}/log?follow=true"),
                    &[],
                )
            })
        })
        .collect();
    let readers: Vec<_> = (0..12)
        .map(|i| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let mut got = Vec::new();
                for _ in 0..20 {
                    let offset = if i % 2 == 0 { "0" } else { "-8192" };
                    got.push((offset, http_get(&addr, &log_path(task, offset), &[])));
                }
                got
            })
        })
        .collect();
    let writer = std::thread::spawn(move || {
        for seed in 10..40 {
            write(&mut w, seed, 128 << 10);
        }
        w
    });
    let w = writer.join().unwrap();
    wait_for_bytes(&addr, task, w.expected.len(), LONG);
    for r in readers {
        for (offset, reply) in r.join().unwrap() {
            assert_eq!(reply.status, 200);
            if offset == "0" {
                assert!(
                    w.expected.starts_with(&reply.body),
                    "a plain read is a prefix of the log"
                );
            } else {
                assert!(reply.body.len() <= 8192);
                let found = w
                    .expected
                    .windows(reply.body.len().max(1))
                    .any(|win| win == reply.body.as_slice());
                assert!(found, "the last 8 KiB at some moment are part of the log");
            }
        }
    }
    // The kubelet removes the pod: the log ends and every follower's response completes.
    fs::remove_dir_all(&pod).unwrap();
    for f in followers {
        let r = f.join().unwrap();
        assert_eq!(r.status, 200);
        assert!(
            r.body == w.expected,
            "a follower got {} of {} bytes",
            r.body.len(),
            w.expected.len()
        );
    }
    let archived = wait_for_archive(&node.archived(task), w.expected.len(), LONG);
    assert!(archived == w.expected);
    let metrics = String::from_utf8(http_get(&addr, "/metrics", &[]).body).unwrap();
    assert!(
        metrics.contains("druid_log_agent_read_bytes_total"),
        "{metrics}"
    );
    assert!(metrics.contains("druid_log_agent_http_requests_total{route=\"log\",code=\"200\"}"));
    assert!(agent.terminate().success());
}

fn peak_rss_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Three clients stream a 96 MiB log at once: an implementation that buffered a response
/// would need hundreds of MiB; the agent's peak stays far below one copy of the log.
#[test]
fn streaming_a_large_log_keeps_memory_bounded() {
    let node = Node::new();
    let task = "index-kafka-large";
    let mut w = PeonWriter::create(&node.pod_dir(task).join("main"), 0).unwrap();
    let agent = AgentProc::start(&node, &["--idle-timeout-secs", "0"]);
    let addr = agent.http_addr();
    write(&mut w, 5, 96 << 20);
    wait_for_bytes(&addr, task, w.expected.len(), Duration::from_secs(300));
    let clients: Vec<_> = (0..3)
        .map(|_| {
            let addr = addr.clone();
            std::thread::spawn(move || http_get(&addr, &log_path(task, "0"), &[]).body)
        })
        .collect();
    for c in clients {
        let body = c.join().unwrap();
        assert!(
            body == w.expected,
            "streamed {} of {} bytes",
            body.len(),
            w.expected.len()
        );
    }
    let peak = peak_rss_kib(agent.child.id());
    eprintln!(
        "agent peak RSS: {} MiB for a {} MiB log streamed three times",
        peak / 1024,
        w.expected.len() >> 20
    );
    assert!(peak < 64 * 1024, "peak RSS {peak} KiB");
    assert!(agent.terminate().success());
}

/// `/metrics` carries the standard process figures of the agent itself (what dashboards for
/// any Prometheus target show) and its version: values checked against /proc of the agent's
/// own pid, so a figure of another process or a unit slip fails.
#[test]
fn metrics_include_the_process_and_the_build() {
    let node = Node::new();
    let agent = AgentProc::start(&node, &[]);
    let addr = agent.http_addr();
    let text = String::from_utf8(http_get(&addr, "/metrics", &[]).body).unwrap();
    let value = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {text}"))
    };
    let pid = agent.child.id();
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib = |key: &str| -> f64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    };
    // Resident memory moves between the scrape and this read: same order of magnitude.
    let rss = value("process_resident_memory_bytes");
    assert!(
        rss > kib("VmRSS:") * 1024.0 / 2.0 && rss < kib("VmRSS:") * 1024.0 * 2.0,
        "{rss}"
    );
    assert!(value("process_virtual_memory_bytes") >= rss);
    let fds = value("process_open_fds");
    assert!(fds >= 3.0 && fds <= value("process_max_fds"), "{fds}");
    assert!(value("process_cpu_seconds_total") >= 0.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let started = value("process_start_time_seconds");
    // The agent was started by this test: after the test binary itself, and not in the future.
    let test_started = {
        let me = fs::metadata(format!("/proc/{}", std::process::id())).unwrap();
        me.modified()
            .unwrap()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
    };
    assert!(started <= now + 1.0, "{started} vs now {now}");
    assert!(
        started + 2.0 >= test_started,
        "{started} vs test {test_started}"
    );
    let version = format!(
        "druid_log_agent_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    assert!(text.lines().any(|l| l == version), "{text}");
    assert!(agent.terminate().success());
}
