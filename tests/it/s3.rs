//! The S3 archive against a real S3-compatible server (moto, which enforces the 5 MiB minimum
//! part size): keys and content exactly as Druid reads them, multipart while the task runs,
//! kill -9 in the middle of an upload, injected faults, a permanent error, and the archive
//! histograms an archive moves.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use common::{
    AgentProc, Moto, Node, agent_s3, assert_same_log, create_bucket_now, s3_env, wait_for_bytes,
    wait_for_object,
};
use druid_log_agent::archive::s3::{PartNumber, PartSizes, S3Config, S3Target};
use druid_log_agent::archive::{Job, JobKind, Origin, Outcome, Part, UploadState};
use druid_log_agent::loadgen::{LineGen, PeonWriter, Rng};
use druid_log_agent::serve::druid_start;
use druid_log_agent::spool::{LogOffset, Spool, SpoolFileOffset, SpoolWriter};
use druid_log_agent::task::TaskId;
use druid_log_agent_testkit::faultproxy::{FaultProxy, Mode};

const LONG: Duration = Duration::from_secs(120);
const MIB: u64 = 1024 * 1024;

fn s3_config(endpoint: &str, bucket: &str) -> S3Config {
    S3Config {
        bucket: bucket.into(),
        prefix: "druid/indexing-logs".into(),
        region: Some("us-east-1".into()),
        endpoint: Some(endpoint.into()),
        path_style: true,
        sse: None,
        sse_kms_key_id: None,
        disable_acl: false,
        part_bytes: 5 * MIB,
        gzip: false,
    }
}

async fn target(endpoint: &str) -> S3Target {
    let creds = aws_sdk_s3::config::Credentials::new("test", "test", None, None, "test");
    S3Target::with_credentials(s3_config(endpoint, "logs"), creds).await
}

fn text(bytes: usize, seed: u64) -> Vec<u8> {
    LineGen::new(seed).text(bytes)
}

fn spool_of(dir: &std::path::Path, content: &[u8]) -> Arc<Spool> {
    let mut w = SpoolWriter::open(&dir.join("t.gz"), SpoolFileOffset::ZERO).unwrap();
    let mut p = druid_log_agent::spool::Packer::new(1);
    for chunk in content.chunks(64 << 10) {
        w.append(|t| t.extend_from_slice(chunk));
        w.seal(&mut p).unwrap();
    }
    w.spool().clone()
}

/// A `Finish` job's kind from plain byte counts (text, spool file).
fn finish(len: u64, file_len: u64) -> JobKind {
    JobKind::Finish {
        len: LogOffset::new(len),
        file_len: SpoolFileOffset::new(file_len),
    }
}

fn job(task: &TaskId, spool: &Arc<Spool>, state: UploadState, kind: JobKind) -> Job {
    Job {
        pod_dir: druid_log_agent::task::PodDir::parse("druid_peon_uid").unwrap(),
        task: task.clone(),
        spool: spool.clone(),
        state,
        origin: Origin {
            namespace: "druid".into(),
            pod: "peon".into(),
            pod_uid: "uid".into(),
            node: Some("node-1".into()),
            first_seen_ms: 1,
        },
        kind,
    }
}

async fn get(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    range: Option<String>,
) -> Vec<u8> {
    let out = client
        .get_object()
        .bucket(bucket)
        .key(key)
        .set_range(range)
        .send()
        .await
        .unwrap_or_else(|e| panic!("get {key}: {e:?}"));
    out.body.collect().await.unwrap().into_bytes().to_vec()
}

async fn create_bucket(client: &aws_sdk_s3::Client, bucket: &str) {
    client.create_bucket().bucket(bucket).send().await.unwrap();
}

/// Small logs go up in one PutObject, large ones in parts; task ids keep `:`, `.` and `_`;
/// what Druid would read back, whole or from any offset, is the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_content_and_druid_ranges() {
    let moto = Moto::start();
    let client = moto.client();
    create_bucket(&client, "logs").await;
    let target = target(&moto.endpoint).await;
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        (
            "index_kafka_wikipedia_2024-05-01T00:00:00.000Z_abc.def",
            200 << 10,
        ),
        (
            "index_parallel_wiki:2024-05-01T00:00:00.000Z:part_1",
            12 * MIB as usize + 777,
        ),
    ];
    for (i, (id, size)) in cases.iter().enumerate() {
        let task = TaskId::new(*id).unwrap();
        let content = text(*size, i as u64);
        let d = tmp.path().join(i.to_string());
        std::fs::create_dir_all(&d).unwrap();
        let spool = spool_of(&d, &content);
        let len = content.len() as u64;
        let out = target
            .run(job(
                &task,
                &spool,
                UploadState::default(),
                JobKind::Finish {
                    len: LogOffset::new(len),
                    file_len: SpoolFileOffset::new(spool.file_len()),
                },
            ))
            .await;
        let Outcome::Done { location, .. } = out else {
            panic!("{id}: {out:?}");
        };
        let key = format!("druid/indexing-logs/{id}/log");
        assert_eq!(location, format!("s3://logs/{key}"));
        let head = client
            .head_object()
            .bucket("logs")
            .key(&key)
            .send()
            .await
            .unwrap();
        assert_eq!(head.content_type(), Some("text/plain; charset=utf-8"));
        assert_eq!(
            head.metadata()
                .and_then(|m| m.get("task-id"))
                .map(String::as_str),
            Some(*id)
        );
        let got = get(&client, "logs", &key, None).await;
        assert_same_log(&got, &content);
        // Druid's S3TaskLogs reads from `start` to the end with a ranged GET.
        for offset in [
            0i64,
            1,
            5_000_000,
            -8192,
            -(len as i64) + 1,
            len as i64 + 10,
        ] {
            let start = druid_start(offset, len);
            let part = get(&client, "logs", &key, Some(format!("bytes={start}-"))).await;
            assert!(part == content[start as usize..], "{id} offset {offset}");
        }
    }
}

/// Parts are stored while the task runs (from committed bytes); the end costs one last part.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parts_while_running_then_one_last_part() {
    let moto = Moto::start();
    let client = moto.client();
    create_bucket(&client, "logs").await;
    let target = target(&moto.endpoint).await;
    let tmp = tempfile::tempdir().unwrap();
    let content = text(17 * MIB as usize, 9);
    let spool = spool_of(tmp.path(), &content);
    let task = TaskId::new("index_kafka_parts").unwrap();
    let out = target
        .run(job(
            &task,
            &spool,
            UploadState::default(),
            JobKind::Parts {
                committed: LogOffset::new(11 * MIB),
                committed_file: SpoolFileOffset::ZERO,
            },
        ))
        .await;
    let Outcome::Progress { state, .. } = out else {
        panic!("{out:?}");
    };
    assert_eq!(state.parts.len(), 2, "two whole 5 MiB parts of 11 MiB");
    assert_eq!(state.uploaded(), 10 * MIB);
    let key = "druid/indexing-logs/index_kafka_parts/log";
    // Nothing is visible before the end.
    assert!(
        client
            .head_object()
            .bucket("logs")
            .key(key)
            .send()
            .await
            .is_err()
    );
    let len = content.len() as u64;
    let out = target
        .run(job(
            &task,
            &spool,
            state,
            JobKind::Finish {
                len: LogOffset::new(len),
                file_len: SpoolFileOffset::new(spool.file_len()),
            },
        ))
        .await;
    assert!(matches!(out, Outcome::Done { .. }), "{out:?}");
    assert_same_log(&get(&client, "logs", key, None).await, &content);
}

/// Parts grow with the log as the schedule says (here one that grows from the second part:
/// 5, 10, 20 MiB... as the agent's does after 1,000 parts), S3 takes them, and an upload
/// resumed from a shorter recorded state cuts the same parts again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parts_grow_with_the_log() {
    let moto = Moto::start();
    let client = moto.client();
    create_bucket(&client, "logs").await;
    let sizes = PartSizes::growing(5 * MIB, 1, 1);
    let target = target(&moto.endpoint).await.with_part_sizes(sizes);
    let tmp = tempfile::tempdir().unwrap();
    let content = text(17 * MIB as usize, 31);
    let spool = spool_of(tmp.path(), &content);
    let (len, file_len) = (content.len() as u64, spool.file_len());
    let task = TaskId::new("index_kafka_growing").unwrap();
    let parts = |committed| JobKind::Parts {
        committed: LogOffset::new(committed),
        committed_file: SpoolFileOffset::ZERO,
    };
    let out = target
        .run(job(&task, &spool, UploadState::default(), parts(len)))
        .await;
    let Outcome::Progress { state, .. } = out else {
        panic!("{out:?}")
    };
    let ends: Vec<u64> = state.parts.iter().map(|p| p.end).collect();
    assert_eq!(
        ends,
        [5 * MIB, 15 * MIB],
        "5 MiB, then 10 MiB; 20 MiB is not there yet"
    );
    // A crash after the first part was recorded: the second is cut as before.
    let mut resumed = state.clone();
    resumed.parts.truncate(1);
    let out = target.run(job(&task, &spool, resumed, parts(len))).await;
    let Outcome::Progress { state: again, .. } = out else {
        panic!("{out:?}")
    };
    assert_eq!(again.parts, state.parts);
    let listed = client
        .list_parts()
        .bucket("logs")
        .key("druid/indexing-logs/index_kafka_growing/log")
        .upload_id(state.upload_id.clone().unwrap())
        .send()
        .await
        .unwrap();
    let stored: Vec<i64> = listed.parts().iter().filter_map(|p| p.size()).collect();
    assert_eq!(stored, [5 * MIB as i64, 10 * MIB as i64]);
    let out = target
        .run(job(&task, &spool, again, finish(len, file_len)))
        .await;
    assert!(matches!(out, Outcome::Done { .. }), "{out:?}");
    let key = "druid/indexing-logs/index_kafka_growing/log";
    assert_same_log(&get(&client, "logs", key, None).await, &content);
}

/// All 10,000 part numbers used and the log goes on: a clear, permanent error naming the key,
/// before any request (S3 would refuse part 10,001 on every retry).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_part_after_the_last_part_number() {
    // Never contacted.
    let target = target("http://127.0.0.1:9").await;
    let tmp = tempfile::tempdir().unwrap();
    let spool = spool_of(tmp.path(), b"");
    let task = TaskId::new("index_kafka_huge").unwrap();
    let state = UploadState {
        upload_id: Some("upload".into()),
        parts: (1..=10_000)
            .map(|n| Part {
                number: PartNumber::new(n).unwrap(),
                etag: "e".into(),
                end: u64::from(n) * 5 * MIB,
            })
            .collect(),
        completing: false,
    };
    let committed = state.uploaded() + 5 * MIB;
    let kind = JobKind::Parts {
        committed: LogOffset::new(committed),
        committed_file: SpoolFileOffset::ZERO,
    };
    let out = target.run(job(&task, &spool, state, kind)).await;
    let Outcome::Failed {
        error, permanent, ..
    } = out
    else {
        panic!("{out:?}")
    };
    assert!(permanent, "{error}");
    assert!(
        error.contains("druid/indexing-logs/index_kafka_huge/log") && error.contains("10000 parts"),
        "{error}"
    );
}

/// An empty log is stored as Druid's own placeholder line, never as an empty object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_log_gets_the_placeholder() {
    let moto = Moto::start();
    let client = moto.client();
    create_bucket(&client, "logs").await;
    let target = target(&moto.endpoint).await;
    let tmp = tempfile::tempdir().unwrap();
    let spool = spool_of(tmp.path(), b"");
    let task = TaskId::new("noop_task").unwrap();
    let out = target
        .run(job(
            &task,
            &spool,
            UploadState::default(),
            JobKind::Finish {
                len: LogOffset::ZERO,
                file_len: SpoolFileOffset::ZERO,
            },
        ))
        .await;
    assert!(matches!(out, Outcome::Done { .. }), "{out:?}");
    let got = get(&client, "logs", "druid/indexing-logs/noop_task/log", None).await;
    assert_eq!(
        String::from_utf8(got).unwrap(),
        druid_log_agent::archive::placeholder(&task)
    );
}

/// About 50 MiB/s when `paced`, as fast as possible otherwise.
fn write_log(w: &mut PeonWriter, seed: u64, bytes: usize, paced: bool) {
    common::write_log(w, &mut LineGen::new(seed), bytes, paced.then_some(50 << 20));
}

fn count_parts(agent: &AgentProc, until: usize) -> Vec<u32> {
    let mut parts = Vec::new();
    while parts.len() < until {
        let line = agent.wait_for_line("part stored", LONG);
        let n = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("part="))
            .and_then(|n| n.parse().ok())
            .unwrap();
        parts.push(n);
    }
    parts
}

/// A sample of the agent's `/metrics` as a float (`_sum` series are not integers).
fn sample(addr: &str, series: &str) -> f64 {
    let text = String::from_utf8(common::http_get(addr, "/metrics", &[]).body).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
}

/// An archive moves both archive histograms, once each: the job's own time, and the wait from
/// the task's end, which holds that job and so is never shorter.
#[test]
fn an_archive_is_timed() {
    const DURATION: &str = "druid_log_agent_archive_duration_seconds";
    const DELAY: &str = "druid_log_agent_archive_delay_seconds";
    let moto = Moto::start();
    create_bucket_now(&moto, "logs");
    let node = Node::new();
    let task = "index-kafka-timed";
    let mut w = PeonWriter::create(&node.pod_dir(task).join("main"), 0).unwrap();
    // The task ends when its pod directory goes, after the whole log is written: an idle
    // timeout could end it in a pause of a loaded machine mid-write, and the log written after
    // that reopens the task, whose first archive then has no end to be timed from.
    let agent = agent_s3(
        &node,
        &moto.endpoint,
        "logs",
        &["--idle-timeout-secs", "3600"],
    );
    let addr = agent.http_addr();
    for h in [DURATION, DELAY] {
        assert_eq!(
            sample(&addr, &format!("{h}_count")),
            0.0,
            "{h} before any archive"
        );
    }
    write_log(&mut w, 8, 64 << 10, false);
    // Held before the directory goes, as a kubelet removes it long after the last write: a
    // loaded CI machine once removed it before the agent had opened a file, and the archive
    // was the placeholder.
    wait_for_bytes(&addr, task, w.expected.len(), LONG);
    std::fs::remove_dir_all(node.pod_dir(task)).unwrap();
    // Logged once the outcome is recorded, histograms included.
    agent.wait_for_line("log archived", LONG);
    let archives = sample(&addr, "druid_log_agent_archives_total");
    assert_eq!(archives, 1.0);
    for h in [DURATION, DELAY] {
        assert_eq!(sample(&addr, &format!("{h}_count")), archives, "{h}");
        assert_eq!(
            sample(&addr, &format!("{h}_bucket{{le=\"+Inf\"}}")),
            archives,
            "{h}"
        );
        assert!(sample(&addr, &format!("{h}_sum")) > 0.0, "{h}");
    }
    assert!(sample(&addr, &format!("{DELAY}_sum")) >= sample(&addr, &format!("{DURATION}_sum")));
    let key = format!("druid/indexing-logs/{task}/log");
    let got = wait_for_object(&moto.endpoint, "logs", &key, w.expected.len(), LONG);
    assert_same_log(&got, &w.expected);
    assert!(agent.terminate().success());
}

/// kill -9 while a multipart upload is under way; the next agent resumes it from the
/// checkpoint (not from part 1) and the object is complete and byte-identical.
#[test]
fn kill9_during_multipart_resumes_the_upload() {
    let moto = Moto::start();
    create_bucket_now(&moto, "logs");
    let node = Node::new();
    let task = "index-kafka-multipart";
    let mut w = PeonWriter::create(&node.pod_dir(task).join("main"), 8 << 20).unwrap();
    let args = ["--idle-timeout-secs", "2", "--commit-interval-ms", "100"];
    let agent = agent_s3(&node, &moto.endpoint, "logs", &args);
    write_log(&mut w, 1, 12 << 20, true);
    let before = count_parts(&agent, 2);
    assert_eq!(before, [1, 2]);
    agent.kill9();
    // The peon goes on while the agent is down (at most one rotation, as in the ten seconds a
    // restart takes at most: the kubelet rotates no faster).
    write_log(&mut w, 2, 2 << 20, false);
    let agent = agent_s3(&node, &moto.endpoint, "logs", &args);
    let addr = agent.http_addr();
    write_log(&mut w, 3, 8 << 20, true);
    let key = format!("druid/indexing-logs/{task}/log");
    let got = wait_for_object(&moto.endpoint, "logs", &key, w.expected.len(), LONG);
    assert_same_log(&got, &w.expected);
    let after = count_parts(&agent, 1);
    assert!(
        after[0] > 1,
        "the upload restarted from part 1 instead of resuming"
    );
    let stored = common::metric(&addr, "druid_log_agent_upload_parts_total").unwrap();
    assert!(stored >= 1, "{stored} parts stored");
    assert!(agent.terminate().success());
}

/// Throttling, server errors, resets and stalls on the way to S3: the agent retries; once the
/// faults stop the object is complete, nothing lost or doubled.
#[test]
fn injected_faults_delay_but_never_corrupt() {
    let moto = Moto::start();
    create_bucket_now(&moto, "logs");
    let proxy = FaultProxy::start(&moto.endpoint, Mode::Faulty, 42).unwrap();
    let endpoint = proxy.url();
    let node = Node::new();
    let tasks = ["index-kafka-faults-a", "index-kafka-faults-b"];
    let mut writers: Vec<PeonWriter> = tasks
        .iter()
        .map(|t| PeonWriter::create(&node.pod_dir(t).join("main"), 0).unwrap())
        .collect();
    let agent = agent_s3(&node, &endpoint, "logs", &["--idle-timeout-secs", "1"]);
    write_log(&mut writers[0], 3, 11 << 20, false);
    write_log(&mut writers[1], 4, 300 << 10, false);
    let errors = agent.wait_for_line("archive failed", LONG);
    assert!(proxy.counts.faults() > 0, "no fault was injected: {errors}");
    proxy.set_mode(Mode::Healthy);
    for (t, w) in tasks.iter().zip(&writers) {
        let key = format!("druid/indexing-logs/{t}/log");
        let got = wait_for_object(&moto.endpoint, "logs", &key, w.expected.len(), LONG);
        assert_same_log(&got, &w.expected);
    }
    assert!(agent.terminate().success());
}

/// A bucket that does not exist: a clear error naming the key, the data kept, and the archive
/// completes once the bucket is there.
#[test]
fn permanent_error_then_recovery() {
    let moto = Moto::start();
    let node = Node::new();
    let task = "index-kafka-nobucket";
    let mut w = PeonWriter::create(&node.pod_dir(task).join("main"), 0).unwrap();
    write_log(&mut w, 5, 64 << 10, false);
    let agent = agent_s3(
        &node,
        &moto.endpoint,
        "late-bucket",
        &["--idle-timeout-secs", "1"],
    );
    let line = agent.wait_for_line("archive failed", LONG);
    assert!(line.contains("NoSuchBucket"), "{line}");
    assert!(
        line.contains(&format!("druid/indexing-logs/{task}/log")),
        "{line}"
    );
    assert!(line.contains("permanent=true"), "{line}");
    create_bucket_now(&moto, "late-bucket");
    let key = format!("druid/indexing-logs/{task}/log");
    let got = wait_for_object(&moto.endpoint, "late-bucket", &key, w.expected.len(), LONG);
    assert_same_log(&got, &w.expected);
    assert!(agent.terminate().success());
}

/// What an operator reads when S3 fails: one line naming the request, the object and what S3
/// said (code, message, request id), or for a server that cannot be reached, the causes in
/// words; never the SDK's `Debug` (`DispatchFailure(DispatchFailure { source: ...`), which
/// used to make these lines 650 to 860 characters long.
#[test]
fn s3_failures_are_one_plain_line() {
    let moto = Moto::start();
    let task = "index-kafka-oneline";
    let key = format!("druid/indexing-logs/{task}/log");
    let debug_forms = ["{", "DispatchFailure", "Some(", "TaskId(", "ConnectorError"];
    // The error field's value ends where the next field starts: the whole error is on the
    // line, not cut by a line break inside it.
    let error_of = |line: &str| -> String {
        let from = line
            .find(" error=")
            .unwrap_or_else(|| panic!("no error= in {line}"));
        let to = line
            .find(" permanent=")
            .unwrap_or_else(|| panic!("no permanent= after the error: {line}"));
        assert!(from < to, "{line}");
        line[from + " error=".len()..to].to_owned()
    };

    // S3 answers: no such bucket.
    let node = Node::new();
    let mut w = PeonWriter::create(&node.pod_dir(task).join("main"), 0).unwrap();
    write_log(&mut w, 7, 4 << 10, false);
    let agent = agent_s3(
        &node,
        &moto.endpoint,
        "no-such-bucket",
        &["--idle-timeout-secs", "1"],
    );
    let line = agent.wait_for_line("archive failed", LONG);
    assert!(agent.terminate().success());
    let error = error_of(&line);
    // S3's message is in the line when S3 sends one (moto leaves it empty).
    let want = format!("PutObject s3://no-such-bucket/{key}: NoSuchBucket");
    assert!(error.starts_with(&want), "{error}");
    assert!(error.contains(" (request id "), "{error}");
    assert!(error.ends_with(')'), "{error}");
    for bad in debug_forms {
        assert!(!line.contains(bad), "{bad:?} in {line}");
    }

    // Nothing answers: connections refused.
    let down = FaultProxy::start(&moto.endpoint, Mode::Down, 1).unwrap();
    let node = Node::new();
    let mut w = PeonWriter::create(&node.pod_dir(task).join("main"), 0).unwrap();
    write_log(&mut w, 8, 4 << 10, false);
    let agent = agent_s3(&node, &down.url(), "logs", &["--idle-timeout-secs", "1"]);
    let line = agent.wait_for_line("archive failed", LONG);
    assert!(agent.terminate().success());
    let error = error_of(&line);
    assert!(
        error.starts_with(&format!("PutObject s3://logs/{key}: ")),
        "{error}"
    );
    assert!(
        error.to_lowercase().contains("connection refused"),
        "{error}"
    );
    for bad in debug_forms {
        assert!(!line.contains(bad), "{bad:?} in {line}");
    }
}

/// With the least privilege AWS users often grant (no `s3:ListBucket`), HeadObject of a missing
/// key answers 403, not 404, so the check of a completion that may have happened tells nothing.
/// The agent then goes on by what it can know: an upload that still exists is completed again;
/// one that is gone (completed or aborted, no way to tell) is stored again from the spool, the
/// same bytes at the same key. Before, every attempt failed on the 403 forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completion_check_without_list_bucket_permission() {
    let moto = Moto::start();
    let client = moto.client();
    create_bucket(&client, "logs").await;
    let aws = common::no_list_bucket::NoListBucket::start(&moto.endpoint);
    let target = target(&aws.url()).await;
    let tmp = tempfile::tempdir().unwrap();
    let content = text(12 * MIB as usize, 21);
    let spool = spool_of(tmp.path(), &content);
    let (len, file_len) = (content.len() as u64, spool.file_len());
    let finish = finish(len, file_len);
    // Parts stored and CompleteMultipartUpload sent (the checkpoint says so), then a crash.
    let sent_completion = |id: &'static str| {
        let (target, spool) = (&target, &spool);
        let task = TaskId::new(id).unwrap();
        async move {
            let parts = JobKind::Parts {
                committed: LogOffset::new(len),
                committed_file: SpoolFileOffset::new(file_len),
            };
            let out = target
                .run(job(&task, spool, UploadState::default(), parts))
                .await;
            let Outcome::Progress { mut state, .. } = out else {
                panic!("{id}: {out:?}")
            };
            assert_eq!(state.parts.len(), 2, "{id}");
            state.completing = true;
            (task, state)
        }
    };

    // The completion did not happen and the upload is still there: complete it.
    let (task, state) = sent_completion("index_kafka_not_completed").await;
    let out = target.run(job(&task, &spool, state, finish)).await;
    assert!(matches!(out, Outcome::Done { .. }), "{out:?}");
    let key = "druid/indexing-logs/index_kafka_not_completed/log";
    assert_same_log(&get(&client, "logs", key, None).await, &content);
    let forbidden = aws.forbidden.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        forbidden > 0,
        "HeadObject of the missing key never got its 403"
    );

    // The upload is gone (a lifecycle rule aborted it): store the log again.
    let (task, state) = sent_completion("index_kafka_upload_gone").await;
    client
        .abort_multipart_upload()
        .bucket("logs")
        .key("druid/indexing-logs/index_kafka_upload_gone/log")
        .upload_id(state.upload_id.clone().unwrap())
        .send()
        .await
        .unwrap();
    let out = target.run(job(&task, &spool, state, finish)).await;
    assert!(matches!(out, Outcome::Done { .. }), "{out:?}");
    let key = "druid/indexing-logs/index_kafka_upload_gone/log";
    assert_same_log(&get(&client, "logs", key, None).await, &content);
    assert!(aws.forbidden.load(std::sync::atomic::Ordering::SeqCst) > forbidden);

    // The completion happened, its answer was lost: HeadObject of the existing key still
    // answers, and nothing is stored again.
    let (task, state) = sent_completion("index_kafka_completed").await;
    let done = target.run(job(&task, &spool, state.clone(), finish)).await;
    assert!(matches!(done, Outcome::Done { .. }), "{done:?}");
    let before = aws.forbidden.load(std::sync::atomic::Ordering::SeqCst);
    let out = target.run(job(&task, &spool, state, finish)).await;
    assert!(matches!(out, Outcome::Done { .. }), "{out:?}");
    assert_eq!(
        aws.forbidden.load(std::sync::atomic::Ordering::SeqCst),
        before
    );
    let key = "druid/indexing-logs/index_kafka_completed/log";
    assert_same_log(&get(&client, "logs", key, None).await, &content);
}

/// A bucket set by `DLA_S3_BUCKET` (as a DaemonSet sets it per environment) replaces only the
/// bucket: the endpoint, path style, region and prefix of the config file's S3 section stay, so
/// the log goes to the configured S3-compatible store, not to AWS.
#[test]
fn bucket_from_the_environment_keeps_the_file_s3_settings() {
    let moto = Moto::start();
    create_bucket_now(&moto, "logs");
    let node = Node::new();
    let config = node.tmp.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[archive]\ntype = \"s3\"\nbucket = \"bucket-of-the-file\"\n\
             prefix = \"from-the-file\"\nendpoint = \"{}\"\npath_style = true\n\
             region = \"us-east-1\"\n",
            moto.endpoint
        ),
    )
    .unwrap();
    let task = "index-kafka-env-bucket";
    let mut w = PeonWriter::create(&node.pod_dir(task).join("main"), 0).unwrap();
    write_log(&mut w, 6, 64 << 10, false);
    let mut cmd = AgentProc::command(
        &node,
        &[
            "--config",
            config.to_str().unwrap(),
            "--idle-timeout-secs",
            "1",
        ],
    );
    s3_env(&mut cmd);
    cmd.env("DLA_S3_BUCKET", "logs");
    let agent = AgentProc::spawn(cmd);
    let line = agent.wait_for_any(&["log archived", "archive failed"], LONG);
    let key = format!("from-the-file/{task}/log");
    assert!(line.contains(&format!("s3://logs/{key}")), "{line}");
    let got = wait_for_object(&moto.endpoint, "logs", &key, w.expected.len(), LONG);
    assert_same_log(&got, &w.expected);
    assert!(agent.terminate().success());
}

/// Optional gzip output: the spool's own gzip members, at `log.gz`, readable by any gzip
/// reader, in parts while the task runs like the plain log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_output_for_other_consumers() {
    use std::io::Read as _;
    let moto = Moto::start();
    let client = moto.client();
    create_bucket(&client, "logs").await;
    let creds = aws_sdk_s3::config::Credentials::new("test", "test", None, None, "test");
    let cfg = S3Config {
        gzip: true,
        ..s3_config(&moto.endpoint, "logs")
    };
    let target = S3Target::with_credentials(cfg, creds).await;
    let tmp = tempfile::tempdir().unwrap();
    // Random-looking text compresses little, so the spool file spans several parts.
    let mut content = Vec::new();
    let mut rng = Rng::new(3);
    while content.len() < 14 * MIB as usize {
        content.extend_from_slice(format!("{:x}\n", rng.next_u64()).as_bytes());
    }
    let spool = spool_of(tmp.path(), &content);
    let (len, file_len) = (content.len() as u64, spool.file_len());
    assert!(file_len > 5 * MIB, "the spool must need parts: {file_len}");
    let task = TaskId::new("index_kafka_gz").unwrap();
    let parts = JobKind::Parts {
        committed: LogOffset::new(len),
        committed_file: SpoolFileOffset::new(file_len),
    };
    let out = target
        .run(job(&task, &spool, UploadState::default(), parts))
        .await;
    let Outcome::Progress { state, .. } = out else {
        panic!("{out:?}")
    };
    assert!(!state.parts.is_empty());
    let out = target
        .run(job(&task, &spool, state, finish(len, file_len)))
        .await;
    assert!(matches!(out, Outcome::Done { .. }), "{out:?}");
    let key = "druid/indexing-logs/index_kafka_gz/log.gz";
    let head = client
        .head_object()
        .bucket("logs")
        .key(key)
        .send()
        .await
        .unwrap();
    assert_eq!(head.content_type(), Some("application/gzip"));
    let gz = get(&client, "logs", key, None).await;
    let mut text = Vec::new();
    flate2::read::MultiGzDecoder::new(&gz[..])
        .read_to_end(&mut text)
        .unwrap();
    assert_same_log(&text, &content);
}
