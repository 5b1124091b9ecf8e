//! The deployment files agree with the agent they deploy.
//!
//! `manifests/` is rendered with `kubectl kustomize` (offline), every document is validated
//! against the Kubernetes schemas by `kubernetes-validate` (strict: unknown fields fail), the
//! ConfigMap's `config.toml` must pass the real binary's `check-config`, and the DaemonSet's
//! mounts, ports, probes, args and grace period must match the effective settings that
//! `check-config` prints. The example overlay `examples/minio/` (an S3-compatible store,
//! credentials from a Secret) is rendered and validated the same way, its config must pass
//! `check-config` too, and it may differ from `manifests/` only where it says. docs/operations.md
//! is checked against the crate.
//!
//! Needs `kubectl` (client only) and the PyPI package `kubernetes-validate` (which brings
//! PyYAML, used here to turn the rendered YAML into JSON). `scripts/test` installs the latter. A
//! missing tool fails the test: these checks are never skipped.

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use serde_json::{Value, json};

/// The Kubernetes version validated against: the API version the agent's client is built for
/// (`k8s-openapi` feature `v1_33` in Cargo.toml).
pub(crate) const KUBERNETES_VERSION: &str = "1.33";
pub(crate) const NAMESPACE: &str = "druid-log-agent";
pub(crate) const VALIDATE_HINT: &str = "the PyPI package kubernetes-validate is needed, with the PyYAML it brings \
     along; scripts/test installs it in .venv/ and puts that first on the PATH";
pub(crate) const KUBECTL_HINT: &str = "kubectl (client only) is needed for `kubectl kustomize`; it is \
     part of the development and CI machines (/usr/bin/kubectl); set KUBECTL to use another";

pub(crate) fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs a command to completion, feeding `input`; panics with `hint` if it cannot start.
pub(crate) fn run(cmd: &mut Command, input: &[u8], hint: &str) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}; {hint}"));
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        // A command that exits without reading its input is judged by its status, not here.
        let _ = stdin.write_all(&input);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    out
}

pub(crate) fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `kubectl kustomize manifests/`, rendered once per test binary.
fn rendered() -> &'static str {
    static R: OnceLock<String> = OnceLock::new();
    R.get_or_init(|| kustomize(&repo().join("manifests")))
}

/// `kubectl kustomize DIR`: the rendered YAML.
pub(crate) fn kustomize(dir: &Path) -> String {
    let kubectl = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into());
    let out = run(
        Command::new(kubectl).arg("kustomize").arg(dir),
        b"",
        KUBECTL_HINT,
    );
    assert!(
        out.status.success(),
        "kubectl kustomize {} failed: {}",
        dir.display(),
        text(&out.stderr)
    );
    let yaml = text(&out.stdout);
    assert!(yaml.contains("kind:"), "kustomize rendered nothing");
    yaml
}

/// The rendered documents as JSON (PyYAML, which kubernetes-validate depends on).
pub(crate) fn documents() -> &'static [Value] {
    static D: OnceLock<Vec<Value>> = OnceLock::new();
    D.get_or_init(|| yaml_documents(rendered()))
}

/// YAML documents as JSON (PyYAML, which kubernetes-validate depends on).
pub(crate) fn yaml_documents(yaml: &str) -> Vec<Value> {
    let script = "import json, sys, yaml\n\
                  json.dump([d for d in yaml.safe_load_all(sys.stdin) if d is not None], sys.stdout)";
    let out = run(
        Command::new("python3").args(["-c", script]),
        yaml.as_bytes(),
        VALIDATE_HINT,
    );
    assert!(
        out.status.success(),
        "cannot convert the rendered YAML to JSON ({VALIDATE_HINT}): {}",
        text(&out.stderr)
    );
    match serde_json::from_slice(&out.stdout).unwrap() {
        Value::Array(docs) => docs,
        other => panic!("expected a list of documents, got {other}"),
    }
}

pub(crate) fn kind_of(d: &Value) -> &str {
    d["kind"].as_str().unwrap_or("")
}

/// The one document of `kind` (and `name`, if given) in `manifests/`.
fn one(kind: &str, name: Option<&str>) -> &'static Value {
    one_in(documents(), kind, name)
}

/// The one document of `kind` (and `name`, if given) in `docs`.
pub(crate) fn one_in<'a>(docs: &'a [Value], kind: &str, name: Option<&str>) -> &'a Value {
    let found: Vec<&Value> = docs
        .iter()
        .filter(|d| kind_of(d) == kind)
        .filter(|d| name.is_none_or(|n| d["metadata"]["name"] == n))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected exactly one {kind} {name:?} in the rendered manifests"
    );
    found[0]
}

pub(crate) fn str_of<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what} should be a string, is {v}"))
}

pub(crate) fn array_of<'a>(v: &'a Value, what: &str) -> &'a [Value] {
    v.as_array()
        .map(|a| a.as_slice())
        .unwrap_or_else(|| panic!("{what} should be a list, is {v}"))
}

pub(crate) fn daemonset() -> &'static Value {
    one("DaemonSet", None)
}

fn pod_spec() -> &'static Value {
    &daemonset()["spec"]["template"]["spec"]
}

pub(crate) fn agent_container() -> &'static Value {
    let containers = array_of(&pod_spec()["containers"], "the DaemonSet's containers");
    assert_eq!(
        containers.len(),
        1,
        "the DaemonSet runs one container, the agent"
    );
    &containers[0]
}

fn volume(name: &str) -> &'static Value {
    array_of(&pod_spec()["volumes"], "the DaemonSet's volumes")
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("the DaemonSet has no volume {name:?}"))
}

/// The agent container's volume mounts: mount path -> (volume, read-only).
fn mounts() -> BTreeMap<String, (&'static Value, bool)> {
    array_of(&agent_container()["volumeMounts"], "volumeMounts")
        .iter()
        .map(|m| {
            assert!(
                m.get("subPath").is_none(),
                "no subPath mounts: a subPath ConfigMap mount never sees updates ({m})"
            );
            let vol = volume(str_of(&m["name"], "volumeMounts[].name"));
            let ro = m["readOnly"].as_bool().unwrap_or(false);
            (str_of(&m["mountPath"], "mountPath").to_owned(), (vol, ro))
        })
        .collect()
}

/// The ConfigMap the DaemonSet mounts, and where: (ConfigMap, mount path).
fn config_map_and_mount() -> (&'static Value, String) {
    let (path, vol) = mounts()
        .into_iter()
        .find(|(_, (v, _))| v.get("configMap").is_some())
        .map(|(p, (v, _))| (p, v))
        .expect("the DaemonSet mounts the agent's ConfigMap");
    let name = str_of(&vol["configMap"]["name"], "configMap.name");
    assert!(
        vol["configMap"].get("items").is_none(),
        "the ConfigMap is mounted whole, so its keys are its file names"
    );
    (one("ConfigMap", Some(name)), path)
}

/// The agent's config file as the ConfigMap holds it: (file name, TOML).
fn config_toml() -> (String, String) {
    let (cm, _) = config_map_and_mount();
    let data = cm["data"].as_object().expect("the ConfigMap has data");
    assert_eq!(data.len(), 1, "the ConfigMap holds one file, config.toml");
    let (key, toml) = data.iter().next().unwrap();
    (
        key.clone(),
        str_of(toml, "the ConfigMap's config").to_owned(),
    )
}

/// `druid-log-agent check-config` on the ConfigMap's config: the effective settings it prints.
pub(crate) fn effective_config() -> &'static toml::Table {
    static C: OnceLock<toml::Table> = OnceLock::new();
    C.get_or_init(|| check_config(&config_toml().1, "manifests/config.toml"))
}

/// `druid-log-agent check-config` on `config` (the config file `what`, as rendered into its
/// ConfigMap): the effective settings it prints.
fn check_config(config: &str, what: &str) -> toml::Table {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.toml");
    std::fs::write(&file, config).unwrap();
    // check-config checks what `run` would at start, in the DaemonSet's environment: the
    // node name from the downward API and a Kubernetes client configuration (in the pod
    // the in-cluster one; here a kubeconfig, which is never contacted).
    let kubeconfig = common::write_kubeconfig(dir.path(), "http://127.0.0.1:9");
    let out = run(
        Command::new(env!("CARGO_BIN_EXE_druid-log-agent"))
            .arg("check-config")
            .arg(&file)
            .env("NODE_NAME", "node-1")
            .env("KUBECONFIG", &kubeconfig),
        b"",
        "the agent binary is built by cargo test",
    );
    assert!(
        out.status.success(),
        "{what} fails check-config: {}",
        text(&out.stderr)
    );
    toml::from_str(&text(&out.stdout)).expect("check-config prints TOML")
}

fn setting<'a>(table: &'a toml::Table, path: &str) -> &'a toml::Value {
    let mut v: Option<&toml::Value> = None;
    let mut t = table;
    for key in path.split('.') {
        let next = t
            .get(key)
            .unwrap_or_else(|| panic!("check-config printed no {path}"));
        if let toml::Value::Table(inner) = next {
            t = inner;
        }
        v = Some(next);
    }
    v.unwrap()
}

fn setting_str(path: &str) -> String {
    setting(effective_config(), path)
        .as_str()
        .unwrap_or_else(|| panic!("{path} is not a string"))
        .to_owned()
}

/// A duration setting as check-config prints it ("25s"), read with the agent's own parser.
fn setting_duration(path: &str) -> std::time::Duration {
    let text = setting_str(path);
    druid_log_agent::units::parse_duration(&text)
        .unwrap_or_else(|e| panic!("{path} = {text:?} is not a duration: {e}"))
}

/// The port of `listen` ("0.0.0.0:8095", "[::]:8095", "host:8095").
pub(crate) fn listen_port() -> u16 {
    let listen = setting_str("listen");
    let (_, port) = listen
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("listen {listen:?} has no port"));
    port.parse()
        .unwrap_or_else(|_| panic!("listen {listen:?} has no numeric port"))
}

/// A port of the agent container, by number or by name, as a number.
fn container_port(port: &Value) -> u64 {
    if let Some(n) = port.as_u64() {
        return n;
    }
    let name = str_of(port, "a port");
    array_of(&agent_container()["ports"], "ports")
        .iter()
        .find(|p| p["name"] == name)
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("the agent container has no port named {name:?}"))
}

#[test]
fn manifests_render_with_kustomize() {
    let kinds: BTreeSet<&str> = documents().iter().map(kind_of).collect();
    let expected: BTreeSet<&str> = [
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "DaemonSet",
        "Service",
        "NetworkPolicy",
    ]
    .into();
    assert_eq!(kinds, expected);
    assert_eq!(one("Namespace", None)["metadata"]["name"], NAMESPACE);
    assert_in_namespace(documents());
}

/// Every namespaced document of `docs` is in the agent's namespace, the others in none.
pub(crate) fn assert_in_namespace(docs: &[Value]) {
    for d in docs {
        let cluster_scoped = matches!(
            kind_of(d),
            "Namespace" | "ClusterRole" | "ClusterRoleBinding"
        );
        let ns = &d["metadata"]["namespace"];
        if cluster_scoped {
            assert!(ns.is_null(), "{} is cluster-scoped", kind_of(d));
        } else {
            assert_eq!(ns, NAMESPACE, "{} {}", kind_of(d), d["metadata"]["name"]);
        }
    }
}

/// Runs kubernetes-validate (strict: unknown fields are errors) on a file of documents.
pub(crate) fn kubernetes_validate(file: &Path) -> Output {
    let out = run(
        Command::new("python3")
            .args(["-m", "kubernetes_validate", "--strict", "-k"])
            .arg(KUBERNETES_VERSION)
            .arg(file),
        b"",
        VALIDATE_HINT,
    );
    let stderr = text(&out.stderr);
    assert!(
        !stderr.contains("No module named"),
        "kubernetes-validate is not installed: {VALIDATE_HINT}\n{stderr}"
    );
    out
}

/// Runs kubernetes-validate (strict) on `rendered` YAML, requires it to pass, and returns its
/// report (what passed, what it had no schema for).
pub(crate) fn validated(rendered: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rendered.yaml");
    std::fs::write(&file, rendered).unwrap();
    let out = kubernetes_validate(&file);
    let report = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        out.status.success(),
        "the rendered manifests do not validate against Kubernetes {KUBERNETES_VERSION}:\n{report}"
    );
    report
}

#[test]
fn every_document_validates_against_the_kubernetes_schemas() {
    let report = validated(rendered());
    let passed = report.matches(" passed for resource ").count();
    assert_eq!(
        passed,
        documents().len(),
        "every document must be validated, not skipped:\n{report}"
    );

    // The validator really is strict: a misspelt field fails.
    let mut broken = daemonset().clone();
    broken["spec"]["template"]["spec"]["terminationGracePeriod"] = json!(60);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("broken.json");
    std::fs::write(&file, broken.to_string()).unwrap();
    let out = kubernetes_validate(&file);
    assert!(
        !out.status.success(),
        "kubernetes-validate --strict accepted an unknown field: {}",
        text(&out.stdout)
    );
}

#[test]
fn configmap_config_passes_check_config() {
    let (key, _) = config_toml();
    assert_eq!(key, "config.toml");
    let config = effective_config();
    assert_eq!(
        setting(config, "kubernetes.enabled").as_bool(),
        Some(true),
        "the DaemonSet maps pods to tasks through the API"
    );
    assert_eq!(setting_str("archive.type"), "s3");
    assert_eq!(setting_str("archive.bucket"), "my-druid-logs");
    assert_eq!(setting_str("archive.prefix"), "druid/indexing-logs");
    // Druid's S3TaskLogs reads the plain {prefix}/{taskId}/log, not the gzip output.
    if let Some(gzip) = config["archive"].get("gzip") {
        assert_eq!(
            gzip.as_bool(),
            Some(false),
            "Druid reads only the plain log"
        );
    }
}

#[test]
fn daemonset_agrees_with_the_agent_config() {
    let c = agent_container();
    let spec = pod_spec();
    let mounts = mounts();

    // args: run with the config file where the ConfigMap is mounted.
    let (key, _) = config_toml();
    let (_, config_dir) = config_map_and_mount();
    let config_path = format!("{}/{key}", config_dir.trim_end_matches('/'));
    assert_eq!(c["args"], json!(["run", "--config", config_path]));
    assert!(
        c.get("command").is_none(),
        "the image's entrypoint runs the agent"
    );

    // Nothing in the environment overrides what is checked here.
    let env = array_of(&c["env"], "env");
    for e in env {
        let name = str_of(&e["name"], "env[].name");
        assert!(
            !name.starts_with("DLA_"),
            "{name} would override config.toml; set it in the ConfigMap"
        );
    }
    let node = env
        .iter()
        .find(|e| e["name"] == "NODE_NAME")
        .expect("NODE_NAME is set");
    assert_eq!(
        node["valueFrom"],
        json!({"fieldRef": {"fieldPath": "spec.nodeName"}}),
        "NODE_NAME comes from the downward API"
    );

    // log_root: the kubelet's pod logs, read-only, at the same path as on the node.
    let log_root = setting_str("log_root");
    let (vol, ro) = mounts
        .get(&log_root)
        .unwrap_or_else(|| panic!("nothing is mounted at log_root {log_root}"));
    assert_eq!(vol["hostPath"]["path"], "/var/log/pods");
    assert_eq!(log_root, "/var/log/pods", "mounted at the node's own path");
    assert!(ro, "the pod logs are mounted read-only");

    // state_dir: a writable hostPath, so a restarted agent resumes.
    let state_dir = setting_str("state_dir");
    let (vol, ro) = mounts
        .get(&state_dir)
        .unwrap_or_else(|| panic!("nothing is mounted at state_dir {state_dir}"));
    assert!(!ro, "the state directory is writable");
    assert_eq!(vol["hostPath"]["type"], "DirectoryOrCreate");
    assert_eq!(vol["hostPath"]["path"], "/var/lib/druid-log-agent");

    // The root filesystem is read-only: whatever else the agent writes is on a writable mount.
    let writable: Vec<&String> = mounts
        .iter()
        .filter(|(_, (_, ro))| !ro)
        .map(|(p, _)| p)
        .collect();
    if setting_str("archive.type") == "dir" {
        let dir = setting_str("archive.dir");
        assert!(
            writable.iter().any(|m| Path::new(&dir).starts_with(m)),
            "archive.dir {dir} is not on a writable mount ({writable:?})"
        );
    }

    // The port of listen: the container port, the probes, the Service, the NetworkPolicy.
    let port = u64::from(listen_port());
    let ports: Vec<u64> = array_of(&c["ports"], "ports")
        .iter()
        .map(|p| p["containerPort"].as_u64().unwrap())
        .collect();
    assert_eq!(ports, vec![port], "the container port is listen's");
    for (probe, path) in [
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
        ("startupProbe", "/healthz"),
    ] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(container_port(&get["port"]), port, "{probe} port");
    }
    let svc = one("Service", None);
    let svc_ports = array_of(&svc["spec"]["ports"], "Service ports");
    assert_eq!(svc_ports.len(), 1);
    assert_eq!(svc_ports[0]["port"].as_u64(), Some(port));
    assert_eq!(container_port(&svc_ports[0]["targetPort"]), port);
    assert_eq!(
        svc["spec"]["selector"],
        daemonset()["spec"]["template"]["metadata"]["labels"]
    );
    let np = one("NetworkPolicy", None);
    assert_eq!(
        np["spec"]["podSelector"]["matchLabels"],
        daemonset()["spec"]["selector"]["matchLabels"]
    );
    for rule in array_of(&np["spec"]["ingress"], "NetworkPolicy ingress") {
        for p in array_of(&rule["ports"], "NetworkPolicy ports") {
            assert_eq!(p["port"].as_u64(), Some(port), "NetworkPolicy port");
        }
    }

    // On SIGTERM the agent waits shutdown_timeout for uploads, then commits: the kubelet
    // must not kill it before.
    let grace = spec["terminationGracePeriodSeconds"].as_u64().unwrap();
    let shutdown = setting_duration("shutdown_timeout");
    assert!(
        std::time::Duration::from_secs(grace) > shutdown,
        "terminationGracePeriodSeconds {grace} must exceed shutdown_timeout {shutdown:?}"
    );

    // One node at a time.
    assert_eq!(
        daemonset()["spec"]["updateStrategy"],
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}})
    );

    // Least privilege: see the comments in manifests/daemonset.yaml.
    let sc = &c["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(
        sc["capabilities"],
        json!({"drop": ["ALL"], "add": ["DAC_READ_SEARCH"]})
    );
    assert_eq!(spec["securityContext"]["runAsUser"], 0);
    assert!(spec["hostNetwork"].is_null() && spec["hostPID"].is_null());

    // The placeholder image is this crate's version (bump both together).
    let image = str_of(&c["image"], "image");
    assert!(
        image.ends_with(&format!("druid-log-agent:{}", env!("CARGO_PKG_VERSION"))),
        "image {image} should be druid-log-agent:{}",
        env!("CARGO_PKG_VERSION")
    );
}

#[test]
fn rbac_allows_reading_pods_only() {
    let role = one("ClusterRole", None);
    assert_eq!(
        role["rules"],
        json!([{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}])
    );
    let sa = one("ServiceAccount", None);
    assert_eq!(pod_spec()["serviceAccountName"], sa["metadata"]["name"]);
    let binding = one("ClusterRoleBinding", None);
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    assert_eq!(binding["roleRef"]["kind"], "ClusterRole");
    assert_eq!(
        binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": NAMESPACE}])
    );
}

/// `examples/minio/`: `manifests/` for an S3-compatible store, rendered once.
fn minio_rendered() -> &'static str {
    static R: OnceLock<String> = OnceLock::new();
    R.get_or_init(|| kustomize(&repo().join("examples/minio")))
}

fn minio_documents() -> &'static [Value] {
    static D: OnceLock<Vec<Value>> = OnceLock::new();
    D.get_or_init(|| yaml_documents(minio_rendered()))
}

/// The overlay's ConfigMap, found through the DaemonSet's config volume, as the agent reads it.
fn minio_config_toml() -> &'static str {
    let docs = minio_documents();
    let spec = &one_in(docs, "DaemonSet", None)["spec"]["template"]["spec"];
    let name = array_of(&spec["volumes"], "the DaemonSet's volumes")
        .iter()
        .find_map(|v| v["configMap"]["name"].as_str())
        .expect("the DaemonSet mounts a ConfigMap");
    let cm = one_in(docs, "ConfigMap", Some(name));
    str_of(&cm["data"]["config.toml"], "the ConfigMap's config.toml")
}

/// The credentials Secret of the example, and the variables the agent container reads from it.
const MINIO_SECRET: &str = "druid-log-agent-s3-credentials";
const MINIO_KEYS: [&str; 2] = ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"];

#[test]
fn minio_example_validates_and_adds_only_its_credentials() {
    let docs = minio_documents();
    let report = validated(minio_rendered());
    assert_eq!(
        report.matches(" passed for resource ").count(),
        docs.len(),
        "every document of examples/minio/ must be validated, not skipped:\n{report}"
    );
    assert_in_namespace(docs);

    // manifests/ plus the Secret.
    let kinds = |docs: &[Value]| -> Vec<String> {
        let mut k: Vec<String> = docs.iter().map(|d| kind_of(d).to_owned()).collect();
        k.sort();
        k
    };
    let mut expected = kinds(documents());
    expected.push("Secret".into());
    expected.sort();
    assert_eq!(kinds(docs), expected);

    // The Secret is an example: placeholders, said to be such, under the keys read below.
    let secret = one_in(docs, "Secret", Some(MINIO_SECRET));
    assert!(secret.get("data").is_none(), "placeholders, in stringData");
    let values = secret["stringData"]
        .as_object()
        .expect("the Secret has stringData");
    let keys: Vec<&str> = values.keys().map(String::as_str).collect();
    assert_eq!(keys, MINIO_KEYS);
    for (key, value) in values {
        assert!(
            str_of(value, key).contains("EXAMPLE"),
            "{key} in examples/minio/credentials-secret.yaml must be a marked placeholder"
        );
    }

    // The DaemonSet is manifests/' with the two variables from the Secret added.
    let mut ds = one_in(docs, "DaemonSet", None).clone();
    let container = &mut ds["spec"]["template"]["spec"]["containers"][0];
    let env = container["env"].as_array_mut().expect("the agent has env");
    let added: Vec<Value> = env
        .iter()
        .filter(|e| MINIO_KEYS.iter().any(|k| e["name"] == *k))
        .cloned()
        .collect();
    let expected_env: Vec<Value> = MINIO_KEYS
        .iter()
        .map(
            |k| json!({"name": k, "valueFrom": {"secretKeyRef": {"name": MINIO_SECRET, "key": k}}}),
        )
        .collect();
    assert_eq!(added, expected_env, "the credentials come from the Secret");
    env.retain(|e| !MINIO_KEYS.iter().any(|k| e["name"] == *k));
    // The config volume names the overlay's ConfigMap (its own hash); otherwise the same.
    let mut base = daemonset().clone();
    for d in [&mut ds, &mut base] {
        for v in d["spec"]["template"]["spec"]["volumes"]
            .as_array_mut()
            .unwrap()
        {
            if v.get("configMap").is_some() {
                v["configMap"]["name"] = json!("CONFIGMAP");
            }
        }
    }
    assert_eq!(
        ds, base,
        "examples/minio/ changes the DaemonSet only by the credentials"
    );
}

#[test]
fn minio_example_config_passes_check_config_and_changes_only_the_store() {
    let config = check_config(minio_config_toml(), "examples/minio/config.toml");
    let archive = config["archive"].as_table().expect("an [archive] section");
    assert_eq!(archive["type"].as_str(), Some("s3"));
    let endpoint = archive
        .get("endpoint")
        .and_then(|e| e.as_str())
        .expect("the example sets the store's endpoint");
    assert!(endpoint.starts_with("http://") || endpoint.starts_with("https://"));
    assert_eq!(
        archive["path_style"].as_bool(),
        Some(true),
        "S3-compatible stores need path-style addressing"
    );
    assert_eq!(
        archive["gzip"].as_bool(),
        Some(false),
        "Druid reads the plain log"
    );

    // Everything else is manifests/config.toml's, which the DaemonSet is checked against.
    let store = [
        "archive.endpoint",
        "archive.path_style",
        "archive.disable_acl",
    ];
    let (overlay, base) = (flat_settings(&config), flat_settings(effective_config()));
    let keys: BTreeSet<&String> = overlay.keys().chain(base.keys()).collect();
    let differ: Vec<String> = keys
        .into_iter()
        .filter(|k| !store.contains(&k.as_str()) && overlay.get(*k) != base.get(*k))
        .map(|k| format!("{k}: {:?} here, {:?} there", overlay.get(k), base.get(k)))
        .collect();
    assert!(
        differ.is_empty(),
        "examples/minio/config.toml differs from manifests/config.toml beyond {store:?}: {differ:#?}"
    );
}

/// The settings of a check-config output by their dotted names (`archive.bucket`).
pub(crate) fn flat_settings(table: &toml::Table) -> BTreeMap<String, toml::Value> {
    fn walk(table: &toml::Table, prefix: &str, out: &mut BTreeMap<String, toml::Value>) {
        for (key, value) in table {
            let name = format!("{prefix}{key}");
            match value {
                toml::Value::Table(inner) => walk(inner, &format!("{name}."), out),
                other => {
                    out.insert(name, other.clone());
                }
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(table, "", &mut out);
    out
}

/// Rust source with string continuations (`\` at the end of a line) joined, so a log message
/// split over lines reads as it is printed.
fn source_text() -> String {
    let mut all = String::new();
    // src/ has a folder per stage: walk it whole.
    let mut files = Vec::new();
    let mut dirs = vec![repo().join("src")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|e| e == "rs") {
                files.push(p);
            }
        }
    }
    files.sort();
    for f in files {
        let src = std::fs::read_to_string(f).unwrap();
        let mut lines = src.lines().peekable();
        while let Some(line) = lines.next() {
            match line.strip_suffix('\\') {
                Some(head) => {
                    all.push_str(head);
                    if let Some(next) = lines.peek_mut() {
                        *next = next.trim_start();
                    }
                }
                None => {
                    all.push_str(line);
                    all.push('\n');
                }
            }
        }
    }
    all
}

/// Every `druid_log_agent_<name>` in a text (names ending in `_` are wildcards and skipped).
pub(crate) fn metric_names(text: &str) -> BTreeSet<String> {
    names_with_prefix(text, "druid_log_agent_")
}

/// Every `<prefix><name>` in a text that starts a word (names ending in `_` are wildcards and
/// skipped): `process_` names in docs/operations.md, where "process" alone is a plain word.
pub(crate) fn names_with_prefix(text: &str, prefix: &str) -> BTreeSet<String> {
    text.match_indices(prefix)
        .filter(|(i, _)| {
            !text[..*i]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        })
        .map(|(i, _)| {
            let rest = &text[i + prefix.len()..];
            let end = rest
                .find(|ch: char| !(ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '_'))
                .unwrap_or(rest.len());
            format!("{prefix}{}", &rest[..end])
        })
        .filter(|n| !n.ends_with('_'))
        .collect()
}

#[test]
fn operations_guide_names_real_metrics_and_log_lines() {
    let doc = std::fs::read_to_string(repo().join("docs/operations.md")).unwrap();
    let src = source_text();

    // Every counter is documented, and every metric the guide names exists.
    let counters: BTreeSet<String> = druid_log_agent::metrics::Metrics::default()
        .snapshot()
        .into_iter()
        .map(|(name, _, _)| format!("druid_log_agent_{name}_total"))
        .collect();
    let documented = metric_names(&doc);
    let missing: Vec<&String> = counters.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "docs/operations.md does not list {missing:?}"
    );
    let exposed: BTreeSet<String> = counters.union(&metric_names(&src)).cloned().collect();
    let unknown: Vec<&String> = documented.difference(&exposed).collect();
    assert!(
        unknown.is_empty(),
        "docs/operations.md names metrics the agent does not expose: {unknown:?}"
    );

    // The log lines quoted in the troubleshooting table are the agent's own.
    let section = doc
        .split("\n## ")
        .find(|s| s.starts_with("Troubleshooting"))
        .expect("docs/operations.md has a Troubleshooting section");
    let rows: Vec<Vec<&str>> = section
        .lines()
        .filter(|l| l.starts_with('|'))
        .map(|l| l.trim_matches('|').split('|').map(str::trim).collect())
        .collect();
    let column = rows
        .first()
        .and_then(|header| header.iter().position(|h| h.starts_with("Log line")))
        .expect("the troubleshooting table has a \"Log line\" column");
    let mut quoted = 0;
    for row in &rows[1..] {
        let Some(cell) = row.get(column) else {
            continue;
        };
        for (i, part) in cell.split('`').enumerate() {
            if i % 2 == 1 && !part.is_empty() {
                quoted += 1;
                assert!(
                    src.contains(part),
                    "docs/operations.md quotes a log line that is not in src/: {part:?}"
                );
            }
        }
    }
    assert!(
        quoted >= 5,
        "the troubleshooting table quotes the agent's log lines"
    );
}
