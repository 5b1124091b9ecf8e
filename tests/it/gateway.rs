//! The cluster gateway (`druid-log-agent gateway`, docs/gateway.md), the real binary on
//! loopback: reads from the archive byte for byte as Druid reads it, Druid's 404, the
//! overlord's answer for what the archive lacks, and `authorize = "druid"` against a fake
//! overlord that refuses all but one caller.

use crate::common;

use std::process::{Command, Stdio};

use common::{AgentProc, Moto, create_bucket_now, http_get, s3_env};
use druid_log_agent::archive::s3::S3Config;
use druid_log_agent::serve::{NO_LOG, TEXT, druid_start};
use druid_log_agent::task::TaskId;
use druid_log_agent_testkit::overlord::{FakeOverlord, log_of};

pub(crate) const ALLOWED: &str = "Authorization: Basic YWxsb3dlZDpwdw==";
pub(crate) const REFUSED: &str = "Authorization: Basic cmVmdXNlZDpwdw==";

/// A gateway process with its config file.
pub(crate) struct Gateway {
    pub(crate) addr: String,
    _proc: AgentProc,
    _dir: tempfile::TempDir,
}

fn gateway(config: &str) -> Gateway {
    gateway_with(config, |_| {})
}

/// A gateway with `config` as its file, `env` adjusting its command (a kubeconfig).
pub(crate) fn gateway_with(config: &str, env: impl FnOnce(&mut Command)) -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gateway.toml");
    std::fs::write(&file, config).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_druid-log-agent"));
    cmd.arg("gateway")
        .arg("--config")
        .arg(&file)
        .args(["--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "info")
        .env_remove("DLA_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    s3_env(&mut cmd);
    env(&mut cmd);
    let proc = AgentProc::spawn(cmd);
    let addr = proc.http_addr();
    Gateway {
        addr,
        _proc: proc,
        _dir: dir,
    }
}

pub(crate) fn s3_section(endpoint: &str) -> String {
    format!(
        "[archive]\ntype = \"s3\"\nbucket = \"logs\"\nendpoint = \"{endpoint}\"\npath_style = true\nregion = \"us-east-1\"\n"
    )
}

/// Some Druid-style log text with a byte pattern that makes any misplaced range visible.
fn content(seed: u64, bytes: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes + 100);
    let mut n = 0u64;
    while out.len() < bytes {
        out.extend_from_slice(
            format!("2026-01-01T00:00:00,{n:03} INFO [task-{seed}] line {n} of the log\n")
                .as_bytes(),
        );
        n += 1;
    }
    out
}

/// Writes `body` where the agent archives `task` (the agent's own key function).
pub(crate) fn put_archived(moto: &Moto, task: &str, body: &[u8]) {
    let key = S3Config {
        bucket: "logs".into(),
        ..S3Config::default()
    }
    .key(&TaskId::new(task).unwrap());
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(
            moto.client()
                .put_object()
                .bucket("logs")
                .key(&key)
                .content_type("text/plain; charset=utf-8")
                .body(body.to_vec().into())
                .send(),
        )
        .unwrap();
}

pub(crate) fn log_path(task: &str, offset: i64) -> String {
    format!("/druid/indexer/v1/task/{task}/log?offset={offset}")
}

/// The offsets Druid's clients send, around the edges of a log of `len` bytes.
pub(crate) fn offset_cases(len: i64) -> [i64; 11] {
    [
        0,
        1,
        1000,
        len - 1,
        len,
        len + 5,
        -1,
        -500,
        -(len - 1),
        -len,
        -(len + 10),
    ]
}

/// Every Druid offset case against what `druid_start` says of the content.
pub(crate) fn assert_every_offset(addr: &str, task: &str, log: &[u8], extra: &[&str]) {
    for offset in offset_cases(log.len() as i64) {
        let r = http_get(addr, &log_path(task, offset), extra);
        assert_eq!(
            r.status,
            200,
            "offset {offset}: {:?}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.header("content-type"), Some(TEXT), "offset {offset}");
        let start = druid_start(offset, log.len() as u64) as usize;
        assert!(
            r.body == log[start..],
            "offset {offset}: {} bytes, want {} from byte {start}",
            r.body.len(),
            log.len() - start
        );
    }
}

pub(crate) fn assert_no_log(r: &common::Reply) {
    assert_eq!(r.status, 404);
    assert_eq!(r.header("content-type"), Some(TEXT));
    assert_eq!(r.body, NO_LOG.as_bytes());
}

/// A finished task archived to S3 is served byte for byte at every offset; a task the
/// archive lacks, with no overlord, is Druid's 404.
#[test]
fn archive_s3_every_offset_and_unknown_is_druids_404() {
    let moto = Moto::start();
    create_bucket_now(&moto, "logs");
    let task = "index_kafka_wiki_2026-01-01T00:00:00.000Z_abc";
    let log = content(1, 300 << 10);
    put_archived(&moto, task, &log);
    let gw = gateway(&format!(
        "authorize = \"none\"\n{}",
        s3_section(&moto.endpoint)
    ));
    assert_every_offset(&gw.addr, task, &log, &[]);
    assert_no_log(&http_get(&gw.addr, &log_path("unknown_task", 0), &[]));
    // An id that is not one (a leading dot) never reaches S3.
    assert_no_log(&http_get(&gw.addr, &log_path("..", 0), &[]));
}

/// The directory layout, `{dir}/{taskId}.log`, read the same way.
#[test]
fn archive_dir_every_offset() {
    let archive = tempfile::tempdir().unwrap();
    let task = "index_parallel_wiki_x:1";
    let log = content(2, 100 << 10);
    std::fs::write(archive.path().join(format!("{task}.log")), &log).unwrap();
    let gw = gateway(&format!(
        "authorize = \"none\"\n[archive]\ntype = \"dir\"\ndir = \"{}\"\n",
        archive.path().display()
    ));
    assert_every_offset(&gw.addr, task, &log, &[]);
    assert_no_log(&http_get(&gw.addr, &log_path("other", 0), &[]));
}

fn druid_gateway(moto: &Moto, overlord: &FakeOverlord) -> Gateway {
    gateway(&format!(
        "authorize = \"druid\"\noverlord_url = \"{}\"\n{}",
        overlord.url(),
        s3_section(&moto.endpoint)
    ))
}

/// What the archive lacks, the overlord answers (with the caller's credentials); a caller
/// the overlord refuses gets its 403 and no byte of the log, from either source.
#[test]
fn druid_authorization_and_overlord_fallback() {
    let moto = Moto::start();
    create_bucket_now(&moto, "logs");
    let task = "index_kafka_auth_1";
    let other = "index_hadoop_on_a_middle_manager";
    let overlord = FakeOverlord::start(
        ALLOWED.strip_prefix("Authorization: ").unwrap(),
        &[task, other],
    );
    let log = content(3, 50 << 10);
    put_archived(&moto, task, &log);
    let gw = druid_gateway(&moto, &overlord);

    let refused = http_get(&gw.addr, &log_path(task, 0), &[REFUSED]);
    assert_eq!(refused.status, 403);
    assert!(
        !contains(&refused.body, &log[..40]),
        "a refused caller got log bytes"
    );
    let no_creds = http_get(&gw.addr, &log_path(task, 0), &[]);
    assert_eq!(no_creds.status, 401);

    assert_every_offset(&gw.addr, task, &log, &[ALLOWED]);

    // Not archived: the overlord's answer, passed through.
    let r = http_get(&gw.addr, &log_path(other, 0), &[ALLOWED]);
    assert_eq!(r.status, 200);
    assert_eq!(r.body, log_of(other).as_bytes());
    let r = http_get(&gw.addr, &log_path(other, 0), &[REFUSED]);
    assert_eq!(r.status, 403);
    assert!(!contains(&r.body, log_of(other).as_bytes()));

    // A task Druid does not know (its metadata is gone): the overlord answers 400, so no
    // one may be granted its log, archived or not: Druid's 404, no byte, and not a 503.
    let forgotten = "index_kafka_forgotten_1";
    let old = content(5, 10 << 10);
    put_archived(&moto, forgotten, &old);
    for t in [forgotten, "never_existed"] {
        let r = http_get(&gw.addr, &log_path(t, 0), &[ALLOWED]);
        assert_no_log(&r);
    }
}

/// Overlord down: authorization cannot be asked, so no log is served (503), archived or not.
#[test]
fn druid_authorization_fails_closed_when_the_overlord_is_down() {
    let moto = Moto::start();
    create_bucket_now(&moto, "logs");
    let task = "index_kafka_down_1";
    let mut overlord =
        FakeOverlord::start(ALLOWED.strip_prefix("Authorization: ").unwrap(), &[task]);
    let log = content(4, 20 << 10);
    put_archived(&moto, task, &log);
    let gw = druid_gateway(&moto, &overlord);
    overlord.stop();
    for t in [task, "not_archived_either"] {
        let r = http_get(&gw.addr, &log_path(t, 0), &[ALLOWED]);
        let shown = String::from_utf8_lossy(&r.body[..r.body.len().min(200)]).into_owned();
        assert_eq!(r.status, 503, "{t}: {shown:?}");
        assert!(!contains(&r.body, &log[..40]));
    }
    let metrics = String::from_utf8(http_get(&gw.addr, "/metrics", &[]).body).unwrap();
    assert!(
        metrics.contains(
            "druid_log_gateway_requests_total{route=\"log\",source=\"none\",code=\"503\"} 2"
        ),
        "{metrics}"
    );
}

pub(crate) fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// `--check-config` refuses `authorize = "druid"` without an overlord, at start, not at the
/// first request.
#[test]
fn check_config_refuses_druid_without_overlord() {
    let out = Command::new(env!("CARGO_BIN_EXE_druid-log-agent"))
        .args(["gateway", "--check-config"])
        .env_remove("DLA_CONFIG")
        .env_remove("DLA_AUTHORIZE")
        .env_remove("DLA_OVERLORD_URL")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("authorize = \"druid\" needs overlord_url"),
        "{err}"
    );
}

/// Without `s3:ListBucket`, AWS answers HEAD of a missing key with 403, not 404: the gateway
/// must take that as "not archived" (Druid's 404), not as an error, and still serve what is
/// archived.
#[test]
fn archive_without_list_bucket_a_missing_key_is_still_druids_404() {
    let moto = Moto::start();
    create_bucket_now(&moto, "logs");
    let aws = common::no_list_bucket::NoListBucket::start(&moto.endpoint);
    let task = "index_kafka_no_list_1";
    let log = content(6, 40 << 10);
    put_archived(&moto, task, &log);
    let gw = gateway(&format!("authorize = \"none\"\n{}", s3_section(&aws.url())));
    let r = http_get(&gw.addr, &log_path(task, -100), &[]);
    assert_eq!(r.status, 200);
    assert_eq!(r.body, &log[log.len() - 100..]);
    assert_no_log(&http_get(&gw.addr, &log_path("not_archived", 0), &[]));
    // Answered as "not archived", not as a failed read that happened to end in a 404.
    let metrics = String::from_utf8(http_get(&gw.addr, "/metrics", &[]).body).unwrap();
    assert!(
        !metrics.contains("druid_log_gateway_upstream_errors_total{source=\"archive\""),
        "{metrics}"
    );
}
