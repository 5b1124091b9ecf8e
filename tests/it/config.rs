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
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_druid-log-agent"));
    cmd.arg(sub)
        .arg("--config")
        .arg(config)
        .arg("--log-root")
        .arg(dir.join("pods"))
        .arg("--state-dir")
        .arg(dir.join("state"))
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
    assert_eq!(printed["idle_timeout_secs"].as_integer(), Some(5));
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
