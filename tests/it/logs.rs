//! The agent's own log lines, as an operator and a log pipeline read them: ids, paths and
//! errors as plain values (never Rust's `Debug`: `Some("..")`, `TaskId("..")`, quoted paths),
//! JSON lines with everything at the top level, and the sample lines of docs/operations.md
//! shaped as the agent really prints them.

use crate::common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use common::{AgentProc, Moto, Node, create_bucket_now, s3_args, s3_env};
use druid_log_agent::loadgen::PeonWriter;

const LONG: Duration = Duration::from_secs(120);

/// What a line may not contain: the `Debug` forms of our ids and of `Option`, which the
/// agent printed before (`identity=Task(TaskId("index-kafka-wiki-abc"))`, `task=Some("..")`).
const DEBUG_FORMS: &[&str] = &["Some(", "=None", "TaskId(", "PodDir(", "PodUid("];

/// A log line reduced to what the docs promise about it: its level, target, message and the
/// names of its fields. Timestamps and values differ from run to run.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Shape {
    level: String,
    target: String,
    message: String,
    fields: BTreeSet<String>,
}

/// Whether a word of a text line starts a field (`name=value`).
fn field_name(word: &str) -> Option<&str> {
    let (name, _) = word.split_once('=')?;
    let ident = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    ident.then_some(name)
}

/// A text line: `TIMESTAMP LEVEL TARGET: MESSAGE name=value ...`. Values are printed plainly
/// and may hold spaces (an error), so a field starts at a word shaped `name=`.
fn text_shape(line: &str) -> Option<Shape> {
    let mut words = line.split_whitespace();
    let _timestamp = words.next()?;
    let level = words.next()?.to_owned();
    let target = words.next()?.strip_suffix(':')?.to_owned();
    let mut message = Vec::new();
    let mut fields = BTreeSet::new();
    for w in words {
        match field_name(w) {
            Some(name) => {
                fields.insert(name.to_owned());
            }
            None if fields.is_empty() => message.push(w),
            None => {}
        }
    }
    Some(Shape {
        level,
        target,
        message: message.join(" "),
        fields,
    })
}

/// A JSON line: its top-level keys are the fields, `timestamp`, `level`, `target` and
/// `message` among them.
fn json_shape(line: &str) -> Option<Shape> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let o = v.as_object()?;
    let s = |k: &str| o.get(k).and_then(|v| v.as_str()).map(str::to_owned);
    Some(Shape {
        level: s("level")?,
        target: s("target")?,
        message: s("message")?,
        fields: o.keys().cloned().collect(),
    })
}

/// The checks every line of either format must pass.
fn assert_plain(line: &str, json: bool) {
    for bad in DEBUG_FORMS {
        assert!(!line.contains(bad), "{bad:?} (Rust's Debug) in: {line}");
    }
    if !json {
        // A string printed with Debug is quoted: `pod_dir="druid_..."`, `file="/var/log/..."`.
        assert!(!line.contains("=\""), "a quoted value in: {line}");
        assert!(text_shape(line).is_some(), "not a log line: {line}");
        return;
    }
    let v: serde_json::Value =
        serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    let o = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {line}"));
    for key in ["timestamp", "level", "target", "message"] {
        assert!(
            o.get(key).is_some_and(|v| v.is_string()),
            "no top-level {key:?} in: {line}"
        );
    }
    for (k, v) in o {
        assert!(
            !(v.is_object() || v.is_array()),
            "{k:?} is nested, not a plain field: {line}"
        );
        // A value printed with Debug inside a JSON string: "\"/var/log/pods/...\"".
        if let Some(s) = v.as_str() {
            assert!(!s.starts_with('"'), "{k:?} is a quoted value: {line}");
        }
    }
}

/// The agent with a directory archive, a peon that restarted (its first file is drained and
/// closed, a debug line) and debug lines of the agent itself: every line until it archived the
/// log and stopped.
fn dir_archive_run(json: bool) -> Vec<String> {
    let node = Node::new();
    let task = "index-kafka-wiki-abc";
    let mut w = PeonWriter::create(&node.pod_dir(task).join("main"), 0).unwrap();
    w.write_line("stdout", b"first start").unwrap();
    w.restart().unwrap();
    w.write_line("stdout", b"second start").unwrap();
    let mut args = vec![
        "--idle-timeout-secs",
        "1",
        "--log-level",
        "info,druid_log_agent=debug",
    ];
    if json {
        args.extend(["--log-format", "json"]);
    }
    let mut cmd = AgentProc::command(&node, &args);
    cmd.env_remove("RUST_LOG");
    let agent = AgentProc::spawn(cmd);
    let mut lines = agent.lines_until("log archived", LONG);
    let (status, rest) = agent.terminate_collect();
    assert!(status.success(), "{status}");
    lines.extend(rest);
    lines
}

/// Ids, paths, options and errors print as plain values in both formats, and every JSON line
/// has its message, level, target, timestamp and fields at the top level.
#[test]
fn no_debug_forms_in_text_or_json_lines() {
    for json in [false, true] {
        let lines = dir_archive_run(json);
        // The lines that printed Debug forms before are among those checked.
        for needle in [
            "new pod log directory",
            "log file drained",
            "task log ended",
            "log archived",
        ] {
            assert!(
                lines.iter().any(|l| l.contains(needle)),
                "no {needle:?} line (json: {json}):\n{}",
                lines.join("\n")
            );
        }
        for line in &lines {
            assert_plain(line, json);
        }
        let started = lines
            .iter()
            .find(|l| l.contains("new pod log directory"))
            .unwrap();
        assert!(started.contains("index-kafka-wiki-abc"), "{started}");
    }
}

/// The fenced blocks of docs/operations.md's "Log lines" section: (language, lines).
fn doc_samples() -> Vec<(String, Vec<String>)> {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/operations.md"))
            .unwrap();
    let section = doc
        .split("\n### ")
        .find(|s| s.starts_with("Log lines"))
        .expect("docs/operations.md has a \"### Log lines\" section");
    let section = section.split("\n## ").next().unwrap();
    let mut blocks = Vec::new();
    let mut open: Option<(String, Vec<String>)> = None;
    for line in section.lines() {
        match (line.strip_prefix("```"), open.take()) {
            (Some(lang), None) => open = Some((lang.trim().to_owned(), Vec::new())),
            (Some(_), Some(block)) => blocks.push(block),
            (None, Some((lang, mut lines))) => {
                lines.push(line.to_owned());
                open = Some((lang, lines));
            }
            (None, None) => {}
        }
    }
    blocks
}

/// The agent archiving to S3 whose bucket appears only after the first attempt failed: a
/// start line, an S3 failure and an archived log, then its stop.
fn s3_run(moto: &Moto, json: bool) -> Vec<String> {
    let node = Node::new();
    let bucket = if json { "late-json" } else { "late-text" };
    let mut w = PeonWriter::create(&node.pod_dir("index-kafka-wiki-abc").join("main"), 0).unwrap();
    w.write_line("stdout", b"a line of log").unwrap();
    let mut args = s3_args(&moto.endpoint, bucket).to_vec();
    args.extend(["--idle-timeout-secs", "1"]);
    if json {
        args.extend(["--log-format", "json"]);
    }
    let mut cmd = AgentProc::command(&node, &args);
    s3_env(&mut cmd);
    let agent = AgentProc::spawn(cmd);
    let mut lines = agent.lines_until("archive failed", LONG);
    create_bucket_now(moto, bucket);
    lines.extend(agent.lines_until("log archived", LONG));
    let (status, rest) = agent.terminate_collect();
    assert!(status.success(), "{status}");
    lines.extend(rest);
    lines
}

/// Each sample line of docs/operations.md (text and JSON) has a twin in what the agent really
/// prints: the same level, target, message and field names.
#[test]
fn operations_md_sample_lines_are_what_the_agent_prints() {
    let blocks = doc_samples();
    let moto = Moto::start();
    for (lang, json) in [("text", false), ("json", true)] {
        let samples: Vec<&String> = blocks
            .iter()
            .filter(|(l, _)| l == lang)
            .flat_map(|(_, lines)| lines)
            .filter(|l| !l.trim().is_empty())
            .collect();
        assert!(
            samples.len() >= 3,
            "docs/operations.md's \"Log lines\" has {} {lang} sample lines; a start line, an archived log and an S3 failure at least",
            samples.len()
        );
        let shape = |l: &str| if json { json_shape(l) } else { text_shape(l) };
        let real: BTreeSet<Shape> = s3_run(&moto, json)
            .iter()
            .filter_map(|l| shape(l))
            .collect();
        for sample in samples {
            assert_plain(sample, json);
            let want = shape(sample).unwrap_or_else(|| panic!("not a {lang} log line: {sample}"));
            let same_message: Vec<&Shape> =
                real.iter().filter(|s| s.message == want.message).collect();
            assert!(
                same_message.contains(&&want),
                "the agent prints no {lang} line shaped like the sample\n{sample}\nwhose shape is {want:?}; lines with its message: {same_message:?}"
            );
        }
    }
}
