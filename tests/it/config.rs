//! Settings as the real binary takes them: `check-config` refuses exactly what `run` refuses,
//! after the same environment variables and flags, and prints the settings `run` uses.

use crate::common;

use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::AgentProc;

/// A config file plus environment, and a word the refusal must contain.
struct Case {
    name: &'static str,
    /// Lines of the config file; `{tmp}` is the test's directory.
    file: &'static str,
    env: &'static [(&'static str, &'static str)],
    needle: &'static str,
}

/// What the settings of a test start from: a directory archive and a port of its own, so
/// that only the setting under test can be refused.
const BASE: &str = "listen = \"127.0.0.1:0\"\n";
const DIR_ARCHIVE: &str = "[archive]\ntype = \"dir\"\ndir = \"{tmp}/archive\"\n";

const REFUSED: &[Case] = &[
    Case {
        name: "listen that is no address",
        file: "listen = \"not-an-addr\"\n",
        env: &[],
        needle: "not-an-addr",
    },
    Case {
        name: "listen from the environment",
        file: BASE,
        env: &[("DLA_LISTEN", "not-an-addr")],
        needle: "not-an-addr",
    },
    Case {
        name: "a block size from the environment",
        file: BASE,
        env: &[("DLA_BLOCK_BYTES", "1")],
        needle: "block_bytes",
    },
    Case {
        name: "a log level that is no level",
        file: "log_level = \"inf\"\n",
        env: &[],
        needle: "log_level",
    },
    Case {
        name: "a token file that is not there",
        file: "auth_token_file = \"{tmp}/no-such-token\"\n",
        env: &[],
        needle: "no-such-token",
    },
    Case {
        name: "an empty token file",
        file: "auth_token_file = \"{tmp}/empty-token\"\n",
        env: &[],
        needle: "is empty",
    },
    Case {
        name: "the pod watch without the node's name",
        file: "[kubernetes]\nenabled = true\n",
        env: &[],
        needle: "NODE_NAME",
    },
    Case {
        name: "the pod watch without a Kubernetes client configuration",
        file: "[kubernetes]\nenabled = true\n",
        env: &[
            ("NODE_NAME", "node-1"),
            ("KUBECONFIG", "/no/such/kubeconfig"),
        ],
        needle: "Kubernetes client",
    },
    Case {
        name: "an S3 setting for a directory archive",
        file: "",
        env: &[("DLA_S3_ENDPOINT", "http://127.0.0.1:9")],
        needle: "DLA_S3_ENDPOINT",
    },
    Case {
        name: "an S3 endpoint that is no URL",
        file: "[archive]\ntype = \"s3\"\nbucket = \"logs\"\nendpoint = \"minio 9000\"\n",
        env: &[],
        needle: "archive.endpoint",
    },
    Case {
        name: "a KMS key without SSE-KMS",
        file: "[archive]\ntype = \"s3\"\nbucket = \"logs\"\nsse_kms_key_id = \"k\"\n",
        env: &[],
        needle: "sse_kms_key_id",
    },
    Case {
        name: "a duration without a unit",
        file: "retention = 3600\n",
        env: &[],
        needle: "retention = 3600",
    },
    Case {
        name: "a size that is no size, from the environment",
        file: BASE,
        env: &[("DLA_SPOOL_MAX_BYTES", "lots")],
        needle: "--spool-max-bytes",
    },
    Case {
        name: "a misspelt key",
        file: "retentoin = \"1h\"\n",
        env: &[],
        needle: "unknown field `retentoin`",
    },
    Case {
        name: "a misspelt key of the S3 section",
        file: "[archive]\ntype = \"s3\"\nbucket = \"logs\"\npart_byts = \"8MiB\"\n",
        env: &[],
        needle: "unknown field `part_byts`",
    },
    Case {
        name: "an S3 part size with an unknown unit",
        file: "[archive]\ntype = \"s3\"\nbucket = \"logs\"\npart_bytes = \"8 parsecs\"\n",
        env: &[],
        needle: "part_bytes = \"8 parsecs\"",
    },
    Case {
        name: "a setting under its old and its new name in the file",
        file: "[kubernetes]\npending_timeout = \"1m\"\npending_timeout_secs = 60\n",
        env: &[],
        needle: "kubernetes.pending_timeout_secs",
    },
    Case {
        name: "a setting under its old and its new name in the environment",
        file: BASE,
        env: &[("DLA_RETENTION", "1h"), ("DLA_RETENTION_SECS", "60")],
        needle: "DLA_RETENTION_SECS",
    },
    Case {
        name: "an old name with a unit",
        file: "retention_secs = \"1h\"\n",
        env: &[],
        needle: "retention = \"1h\"",
    },
    Case {
        name: "an S3 archive without a bucket",
        file: "[archive]\ntype = \"s3\"\nendpoint = \"http://127.0.0.1:9\"\n",
        env: &[],
        needle: "DLA_S3_BUCKET",
    },
];

/// The config file of a case in `dir`, on [`BASE`] and a directory archive unless the case
/// sets them.
fn write_config(dir: &Path, case_file: &str) -> std::path::PathBuf {
    let mut text = String::new();
    if !case_file.contains("listen") {
        text.push_str(BASE);
    }
    text.push_str(case_file);
    if !case_file.contains("[archive]") {
        text.push_str(DIR_ARCHIVE);
    }
    let path = dir.join("config.toml");
    std::fs::write(&path, text.replace("{tmp}", dir.to_str().unwrap())).unwrap();
    path
}

/// `druid-log-agent {sub} --config FILE ...` with the test's paths, the case's environment and
/// nothing of the caller's environment that the agent reads.
fn command(sub: &str, dir: &Path, config: &Path, env: &[(&str, &str)]) -> Command {
    let mut cmd = bare_command(sub, config, env);
    cmd.arg("--log-root")
        .arg(dir.join("pods"))
        .arg("--state-dir")
        .arg(dir.join("state"));
    cmd
}

/// `druid-log-agent {sub} --config FILE` with the case's environment and nothing of the
/// caller's that the agent reads.
fn bare_command(sub: &str, config: &Path, env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_druid-log-agent"));
    cmd.arg(sub)
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("DLA_") || k.starts_with("KUBE") || k == "NODE_NAME" {
            cmd.env_remove(&*k);
        }
    }
    common::s3_env(&mut cmd);
    cmd.envs(env.iter().copied());
    cmd
}

fn check_config(dir: &Path, config: &Path, env: &[(&str, &str)]) -> Output {
    command("check-config", dir, config, env).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Every setting `run` refuses at start, `check-config` refuses too, with the same reason,
/// whether it comes from the file, the environment or a flag.
#[test]
fn check_config_refuses_what_run_refuses() {
    for case in REFUSED {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("pods")).unwrap();
        std::fs::write(tmp.path().join("empty-token"), "\n").unwrap();
        let config = write_config(tmp.path(), case.file);
        let out = check_config(tmp.path(), &config, case.env);
        let err = text(&out.stderr);
        assert!(
            !out.status.success() && err.contains(case.needle),
            "check-config accepted {} or gave another reason: {}{err}",
            case.name,
            text(&out.stdout)
        );
        let mut run = command("run", tmp.path(), &config, case.env);
        run.stdout(Stdio::null());
        match AgentProc::spawn(run).listening_or_exit() {
            Ok(_agent) => panic!(
                "run started with {} although check-config refused it: {err}",
                case.name
            ),
            Err((status, log)) => assert!(
                !status.success() && log.contains(case.needle),
                "run refused {} for another reason ({status}): {log}",
                case.name
            ),
        }
    }
}

/// `check-config` prints the settings `run` uses: the file's, the environment's over them
/// (a bucket replacing only the bucket), and the defaults `--help` shows for the rest (an
/// S3 archive without `prefix` gets Druid's default prefix); and `run` starts with them.
#[test]
fn check_config_prints_the_settings_run_uses() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("pods")).unwrap();
    let config = write_config(
        tmp.path(),
        "[archive]\ntype = \"s3\"\nendpoint = \"http://127.0.0.1:9\"\npath_style = true\n",
    );
    let env = [("DLA_S3_BUCKET", "logs"), ("DLA_IDLE_TIMEOUT_SECS", "5")];
    let out = check_config(tmp.path(), &config, &env);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let printed: toml::Table = toml::from_str(&text(&out.stdout)).unwrap();
    let archive = printed["archive"].as_table().unwrap();
    assert_eq!(archive["type"].as_str(), Some("s3"));
    assert_eq!(archive["bucket"].as_str(), Some("logs"));
    assert_eq!(archive["prefix"].as_str(), Some("druid/indexing-logs"));
    assert_eq!(archive["endpoint"].as_str(), Some("http://127.0.0.1:9"));
    assert_eq!(archive["path_style"].as_bool(), Some(true));
    // DLA_IDLE_TIMEOUT_SECS is the old name of DLA_IDLE_TIMEOUT; printed under the new one.
    assert_eq!(printed["idle_timeout"].as_str(), Some("5s"));
    let mut run = command("run", tmp.path(), &config, &env);
    run.stdout(Stdio::null());
    let agent = AgentProc::spawn(run)
        .listening_or_exit()
        .unwrap_or_else(|(status, log)| {
            panic!("run refused what check-config accepted ({status}): {log}")
        });
    assert!(agent.terminate().success());
}

/// The Kubernetes settings are checked as `run` checks them, without contacting the API: a
/// node name and a client configuration are enough.
#[test]
fn check_config_accepts_the_pod_watch_with_a_node_and_a_kubeconfig() {
    let tmp = tempfile::tempdir().unwrap();
    let kubeconfig = common::write_kubeconfig(tmp.path(), "http://127.0.0.1:9");
    let config = write_config(tmp.path(), "[kubernetes]\nenabled = true\n");
    let out = check_config(
        tmp.path(),
        &config,
        &[
            ("NODE_NAME", "node-1"),
            ("KUBECONFIG", kubeconfig.to_str().unwrap()),
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let printed: toml::Table = toml::from_str(&text(&out.stdout)).unwrap();
    assert_eq!(printed["node_name"].as_str(), Some("node-1"));
}

/// A config file, environment and flags of today, before units: every old name still means
/// what it meant, in its unit; the new names take units in all three layers; check-config
/// prints them all under the new names with units, and what it prints reads back the same.
#[test]
fn old_names_and_units_in_the_file_the_environment_and_the_flags() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("pods")).unwrap();
    let config = write_config(
        tmp.path(),
        "retention_secs = 7200\nblock_max_age_ms = 500\nblock_bytes = 65536\n\
         line_max_bytes = \"64KiB\"\n[kubernetes]\npending_timeout_secs = 10\n\
         deleted_retention = \"2h\"\n",
    );
    let env = [
        ("DLA_SPOOL_MAX_BYTES", "1GiB"),
        ("DLA_FOLLOW_MAX_SECS", "30"),
        ("DLA_SHUTDOWN_TIMEOUT", "1m 30s"),
    ];
    let mut cmd = command("check-config", tmp.path(), &config, &env);
    cmd.args(["--commit-interval-ms", "250", "--poll-interval", "100ms"]);
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let printed_text = text(&out.stdout);
    let printed: toml::Table = toml::from_str(&printed_text).unwrap();
    let kube = printed["kubernetes"].as_table().unwrap();
    for (got, want) in [
        (&printed["retention"], "2h"),
        (&printed["block_max_age"], "500ms"),
        (&printed["block_bytes"], "64KiB"),
        (&printed["line_max_bytes"], "64KiB"),
        (&printed["spool_max_bytes"], "1GiB"),
        (&printed["follow_max"], "30s"),
        (&printed["shutdown_timeout"], "1m 30s"),
        (&printed["commit_interval"], "250ms"),
        (&printed["poll_interval"], "100ms"),
        (&kube["pending_timeout"], "10s"),
        (&kube["deleted_retention"], "2h"),
    ] {
        assert_eq!(got.as_str(), Some(want), "{printed_text}");
    }
    for old in ["retention_secs", "block_max_age_ms", "follow_max_secs"] {
        assert!(!printed.contains_key(old), "{old} printed: {printed_text}");
    }
    // What check-config prints is a config file that means the same.
    let again = tmp.path().join("printed.toml");
    std::fs::write(&again, &printed_text).unwrap();
    let out = check_config(tmp.path(), &again, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), printed_text);
}

/// `--help` shows every setting's default from the same definition check-config prints: the
/// flag of each top-level setting shows exactly what check-config prints for it when nothing
/// is set, and the sections' flags show theirs.
#[test]
fn help_shows_the_defaults_check_config_prints() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty.toml");
    std::fs::write(&empty, "").unwrap();
    // Without the test's own paths: the defaults themselves (check-config opens neither).
    let out = bare_command("check-config", &empty, &[]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let defaults: toml::Table = toml::from_str(&text(&out.stdout)).unwrap();
    let help = Command::new(env!("CARGO_BIN_EXE_druid-log-agent"))
        .args(["run", "--help"])
        .output()
        .unwrap();
    assert!(help.status.success());
    let help = text(&help.stdout);
    // clap prints a flag on one line and its help, default included, on the lines below, up
    // to the next flag.
    let shown = |flag: &str| -> String {
        let start = help
            .find(&format!("      {flag} <"))
            .unwrap_or_else(|| panic!("--help has no {flag}: {help}"));
        let rest = &help[start + flag.len()..];
        let end = rest.find("\n      --").unwrap_or(rest.len());
        rest[..end].to_owned()
    };
    let mut checked = 0;
    for (key, value) in &defaults {
        let value = match value {
            toml::Value::Table(_) => continue,
            toml::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let flag = format!("--{}", key.replace('_', "-"));
        let text = shown(&flag);
        assert!(
            text.contains(&format!("[default: {value}]")),
            "{flag}: check-config prints {value}, --help shows: {text}"
        );
        checked += 1;
    }
    assert!(
        checked > 15,
        "only {checked} settings printed: {defaults:?}"
    );
    for (flag, default) in [
        ("--retention", "1h"),
        ("--block-bytes", "64KiB"),
        ("--pending-timeout", "5m"),
        ("--peon-label-selector", "druid.k8s.peons=true"),
        ("--archive-dir", "/var/lib/druid-log-agent/archive"),
        ("--s3-prefix", "druid/indexing-logs"),
        ("--s3-part-bytes", "8MiB"),
    ] {
        let text = shown(flag);
        assert!(
            text.contains(&format!("[default: {default}]")),
            "{flag}: {text}"
        );
    }
    // The old names work but are not offered; the new ones say what they replace.
    assert!(!help.contains("--retention-secs <"), "{help}");
    assert!(shown("--retention").contains("retention_secs"), "{help}");
    assert!(
        shown("--retention").contains("[env: DLA_RETENTION="),
        "{help}"
    );
}

/// `--log-format json` puts the message and the fields at the top level of each line, where
/// log pipelines look; `log_level` decides what is printed (a debug line appears only at
/// debug), and `RUST_LOG`, when set, wins over it.
#[test]
fn json_lines_and_the_log_level() {
    use druid_log_agent::loadgen::PeonWriter;
    use std::time::Duration;

    let node = common::Node::new();
    let main = node.pod_dir("index-kafka-logs").join("main");
    // A restart: 0.log is drained at once (a later start exists), which logs at debug.
    let restarted = |main: &Path| {
        let mut w = PeonWriter::create(main, 0).unwrap();
        w.write_line("stdout", b"first start").unwrap();
        w.restart().unwrap();
        w.write_line("stdout", b"second start").unwrap();
    };
    restarted(&main);
    let drained = "log file drained";

    let mut cmd = AgentProc::command(&node, &["--log-format", "json", "--log-level", "debug"]);
    cmd.env_remove("RUST_LOG");
    let agent = AgentProc::spawn(cmd);
    let line = agent.wait_for_line("listening", Duration::from_secs(60));
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    for key in ["timestamp", "level", "target", "message", "addr"] {
        assert!(v.get(key).is_some(), "no top-level {key:?} in {line}");
    }
    assert_eq!(v["message"], "listening", "{line}");
    assert_eq!(v["level"], "INFO", "{line}");
    assert!(v.get("fields").is_none(), "{line}");
    let line = agent.wait_for_line(drained, Duration::from_secs(60));
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["level"], "DEBUG", "{line}");
    assert!(agent.terminate().success());

    // RUST_LOG over log_level: debug for the ingest engine only, although log_level says info.
    let node = common::Node::new();
    restarted(&node.pod_dir("index-kafka-logs").join("main"));
    let mut cmd = AgentProc::command(&node, &["--log-level", "info"]);
    cmd.env("RUST_LOG", "info,druid_log_agent::ingest=debug");
    let agent = AgentProc::spawn(cmd);
    agent.wait_for_line(drained, Duration::from_secs(60));
    assert!(agent.terminate().success());
}
