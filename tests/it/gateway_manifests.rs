//! The cluster gateway's deployment files agree with the gateway and with the agents it routes
//! to.
//!
//! `manifests/gateway/` is rendered with `kubectl kustomize` and validated like `manifests/`
//! (strict, Kubernetes 1.33); its `gateway.toml`, as the ConfigMap holds it, must pass the real
//! binary's `gateway --check-config`, and the settings it prints must match the Deployment
//! (port, probes, args) and the agents (`manifests/`: their archive, peon selector, retention,
//! pod labels, port name, namespace, token). The examples of `examples/gateway/` are checked
//! for what they promise: the IAM policy reads the agents' key and nothing else, the Ingress
//! and the HTTPRoute send Druid's task-log path, and only it, to the gateway's Service, and the
//! logs reader's Role allows the service proxy path `druid-log-agent logs` asks, and only it.
//! The HTTPRoute and its ReferenceGrant are Gateway API kinds (CRDs) that kubernetes-validate
//! has no schema for: they are checked by hand against the fields of their CRDs, as
//! tests/it/monitoring.rs does for the Prometheus Operator's kinds.
//!
//! Needs what tests/it/manifests.rs needs. A missing tool fails the test.

use crate::manifests::{
    self, NAMESPACE, array_of, assert_in_namespace, kind_of, kustomize, one_in, repo, run, str_of,
    text, validated, yaml_documents,
};

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use druid_log_agent::config::ArchiveConfig;
use druid_log_agent::task::TaskId;
use druid_log_agent_testkit::kubeapi::FakeApi;
use regex::Regex;
use serde_json::{Value, json};

/// The Gateway API kinds of `examples/gateway/httproute.yaml`: CRDs, so kubernetes-validate has
/// no schema for them.
const GATEWAY_API_KINDS: [&str; 2] = ["HTTPRoute", "ReferenceGrant"];

/// Druid's task-log path for a few task ids as Druid writes them (colons, dots, dashes), as a
/// proxy sees the path (decoded, without the query).
const LOG_PATHS: [&str; 4] = [
    "/druid/indexer/v1/task/index_kafka_wikipedia_8f3e2a1b0c9d7e6_aiceognb/log",
    "/druid/indexer/v1/task/index_parallel_wiki_2026-05-04T09:12:01.482Z/log",
    "/druid/indexer/v1/task/query-7b1e.2:a/log",
    "/druid/indexer/v1/task/x/log",
];

/// Paths of the console and of Druid's API that must stay with the router: the task's other
/// endpoints, paths that only look like the log path, and the console itself.
const OTHER_PATHS: [&str; 11] = [
    "/",
    "/unified-console.html",
    "/druid/v2/sql",
    "/druid/indexer/v1/tasks",
    "/druid/indexer/v1/task",
    "/druid/indexer/v1/task/index_kafka_wikipedia_8f3e2a1b0c9d7e6_aiceognb",
    "/druid/indexer/v1/task/index_kafka_wikipedia_8f3e2a1b0c9d7e6_aiceognb/status",
    "/druid/indexer/v1/task/index_kafka_wikipedia_8f3e2a1b0c9d7e6_aiceognb/reports",
    "/druid/indexer/v1/task/a/b/log",
    "/druid/indexer/v1/task//log",
    "/druid/indexer/v1/task/x/log/more",
];

/// `kubectl kustomize manifests/gateway/`, rendered once.
fn rendered() -> &'static str {
    static R: OnceLock<String> = OnceLock::new();
    R.get_or_init(|| kustomize(&repo().join("manifests/gateway")))
}

fn documents() -> &'static [Value] {
    static D: OnceLock<Vec<Value>> = OnceLock::new();
    D.get_or_init(|| yaml_documents(rendered()))
}

fn one(kind: &str) -> &'static Value {
    one_in(documents(), kind, None)
}

fn deployment() -> &'static Value {
    one("Deployment")
}

fn pod_spec() -> &'static Value {
    &deployment()["spec"]["template"]["spec"]
}

fn pod_labels() -> &'static Value {
    &deployment()["spec"]["template"]["metadata"]["labels"]
}

fn container() -> &'static Value {
    let containers = array_of(&pod_spec()["containers"], "the Deployment's containers");
    assert_eq!(containers.len(), 1, "the Deployment runs one container");
    &containers[0]
}

/// Whether a `matchLabels` map selects `labels` (an empty selector selects everything, which
/// none of these files means).
fn match_labels_select(match_labels: &Value, labels: &Value) -> bool {
    let wanted = match_labels
        .as_object()
        .unwrap_or_else(|| panic!("matchLabels should be a map, is {match_labels}"));
    assert!(!wanted.is_empty(), "an empty selector selects every pod");
    wanted.iter().all(|(k, v)| &labels[k] == v)
}

/// Whether an equality-based label selector as the gateway's settings write it
/// (`key=value,key2=value2`) selects `labels`.
fn selector_selects(selector: &str, labels: &Value) -> bool {
    selector.split(',').all(|term| {
        let (k, v) = term
            .split_once('=')
            .unwrap_or_else(|| panic!("{selector:?}: only key=value terms are checked here"));
        labels[k.trim()] == v.trim().trim_start_matches('=')
    })
}

/// The ConfigMap the Deployment mounts whole, and where: (file name, its text, mount path).
fn config_file() -> (String, String, String) {
    let vol = array_of(&pod_spec()["volumes"], "volumes")
        .iter()
        .find(|v| v.get("configMap").is_some())
        .expect("the Deployment mounts its ConfigMap");
    assert!(
        vol["configMap"].get("items").is_none(),
        "the ConfigMap is mounted whole, so its keys are its file names"
    );
    let mount = array_of(&container()["volumeMounts"], "volumeMounts")
        .iter()
        .find(|m| m["name"] == vol["name"])
        .expect("the config volume is mounted");
    assert!(
        mount.get("subPath").is_none(),
        "no subPath mounts: a subPath ConfigMap mount never sees updates"
    );
    assert_eq!(mount["readOnly"], true);
    let cm = one_in(
        documents(),
        "ConfigMap",
        Some(str_of(&vol["configMap"]["name"], "configMap.name")),
    );
    let data = cm["data"].as_object().expect("the ConfigMap has data");
    assert_eq!(data.len(), 1, "the ConfigMap holds one file: {data:?}");
    let (key, value) = data.iter().next().unwrap();
    (
        key.clone(),
        str_of(value, "the gateway's config").to_owned(),
        str_of(&mount["mountPath"], "mountPath").to_owned(),
    )
}

/// `druid-log-agent gateway --check-config` on `config`: the effective settings, or the
/// gateway's refusal.
fn check_config(config: &str) -> Result<toml::Table, String> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gateway.toml");
    std::fs::write(&file, config).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_druid-log-agent"));
    cmd.args(["gateway", "--check-config", "--config"])
        .arg(&file)
        .env_remove("DLA_CONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST");
    // Only the file speaks: no DLA_* variable of the environment the tests run in.
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("DLA_") {
            cmd.env_remove(name);
        }
    }
    let out = run(&mut cmd, b"", "the agent binary is built by cargo test");
    if !out.status.success() {
        return Err(text(&out.stderr));
    }
    Ok(toml::from_str(&text(&out.stdout)).expect("check-config prints TOML"))
}

/// The settings of the rendered `gateway.toml`, as the gateway reads them.
fn effective() -> &'static toml::Table {
    static C: OnceLock<toml::Table> = OnceLock::new();
    C.get_or_init(|| {
        check_config(&config_file().1)
            .unwrap_or_else(|e| panic!("manifests/gateway/gateway.toml fails check-config: {e}"))
    })
}

fn setting<'a>(table: &'a toml::Table, key: &str) -> &'a toml::Value {
    table
        .get(key)
        .unwrap_or_else(|| panic!("check-config printed no {key}"))
}

fn setting_str<'a>(table: &'a toml::Table, key: &str) -> &'a str {
    setting(table, key)
        .as_str()
        .unwrap_or_else(|| panic!("{key} is not a string"))
}

fn duration(table: &toml::Table, key: &str) -> Duration {
    let text = setting_str(table, key);
    druid_log_agent::units::parse_duration(text)
        .unwrap_or_else(|e| panic!("{key} = {text:?} is not a duration: {e}"))
}

/// The port of a `listen` setting.
fn port_of(listen: &str) -> u64 {
    listen
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("listen {listen:?} has no numeric port"))
}

/// A named container port of `container`, as a number.
fn named_port(container: &Value, name: &str) -> u64 {
    array_of(&container["ports"], "ports")
        .iter()
        .find(|p| p["name"] == name)
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("no container port named {name:?}"))
}

/// Every (kind, namespace, name) of a set of documents: two kustomizations applied side by side
/// must not own the same object, or each apply would overwrite the other's.
fn identities(docs: &[Value]) -> BTreeSet<(String, String, String)> {
    docs.iter()
        .map(|d| {
            let m = &d["metadata"];
            (
                kind_of(d).to_owned(),
                m["namespace"].as_str().unwrap_or("").to_owned(),
                str_of(&m["name"], "metadata.name").to_owned(),
            )
        })
        .collect()
}

#[test]
fn gateway_renders_beside_the_agents_and_validates() {
    let kinds: BTreeSet<&str> = documents().iter().map(kind_of).collect();
    let expected: BTreeSet<&str> = [
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "NetworkPolicy",
    ]
    .into();
    assert_eq!(kinds, expected, "no Namespace: manifests/ owns it");
    let report = validated(rendered());
    assert_eq!(
        report.matches(" passed for resource ").count(),
        documents().len(),
        "every document of manifests/gateway/ must be validated, not skipped:\n{report}"
    );

    // In the agents' namespace, which manifests/ creates; no object of the agents' own.
    assert_in_namespace(documents());
    assert_eq!(
        one_in(manifests::documents(), "Namespace", None)["metadata"]["name"],
        NAMESPACE
    );
    let shared: Vec<_> = identities(documents())
        .intersection(&identities(manifests::documents()))
        .cloned()
        .collect();
    assert!(
        shared.is_empty(),
        "manifests/gateway/ and manifests/ both define {shared:?}"
    );

    // The same image as the agents: one binary, both kustomizations point at one image.
    let agent_image = &manifests::agent_container()["image"];
    assert_eq!(
        &container()["image"],
        agent_image,
        "set the same image in manifests/kustomization.yaml and manifests/gateway/kustomization.yaml"
    );
}

#[test]
fn gateway_config_passes_check_config_and_agrees_with_the_deployment() {
    let (key, _, mount) = config_file();
    assert_eq!(key, "gateway.toml");
    let c = container();
    assert_eq!(
        c["args"],
        json!([
            "gateway",
            "--config",
            format!("{}/{key}", mount.trim_end_matches('/'))
        ])
    );
    assert!(c.get("command").is_none(), "the image's entrypoint runs it");
    for e in c["env"].as_array().into_iter().flatten() {
        let name = str_of(&e["name"], "env[].name");
        assert!(
            !name.starts_with("DLA_"),
            "{name} would override gateway.toml; set it in the file"
        );
    }

    let g = effective();
    assert_eq!(
        setting_str(g, "authorize"),
        "druid",
        "the gateway opens no side door: Druid decides who reads a log"
    );
    let overlord = setting_str(g, "overlord_url");
    assert!(overlord.starts_with("http://"), "{overlord}");
    assert_eq!(setting(g, "kubernetes").as_bool(), Some(true));

    // The port of listen: the container port named http, the probes, the Service.
    let port = port_of(setting_str(g, "listen"));
    assert_eq!(named_port(c, "http"), port);
    let ports = array_of(&c["ports"], "ports");
    assert_eq!(ports.len(), 1, "one port: {ports:?}");
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(get["port"], "http", "{probe} port");
    }
    let svc = one("Service");
    let svc_ports = array_of(&svc["spec"]["ports"], "Service ports");
    assert_eq!(svc_ports.len(), 1);
    assert_eq!(
        svc_ports[0]["name"], "http",
        "`logs` goes through the API server's service proxy to the port named http"
    );
    assert_eq!(svc_ports[0]["targetPort"], "http");
    assert_eq!(svc["spec"]["selector"], *pod_labels());
}

#[test]
fn gateway_config_agrees_with_the_agents() {
    let g = effective();
    let a = manifests::effective_config();

    // Where the agents write, the gateway reads.
    assert_eq!(
        setting(g, "archive"),
        setting(a, "archive"),
        "[archive] of gateway.toml must be the agents' (manifests/config.toml)"
    );
    // The same peons, the same task ids, and the agents' spools kept as long as they keep them.
    let agents_kube = setting(a, "kubernetes")
        .as_table()
        .expect("the agents' [kubernetes]");
    assert_eq!(
        setting(g, "peon_label_selector"),
        setting(agents_kube, "label_selector")
    );
    assert_eq!(
        setting(g, "task_id_annotation"),
        setting(agents_kube, "task_id_annotation")
    );
    assert_eq!(duration(g, "pod_retention"), duration(a, "retention"));

    // The agent pods: their label, their port by name, their namespace.
    let agent_labels = &manifests::daemonset()["spec"]["template"]["metadata"]["labels"];
    let selector = setting_str(g, "agent_label_selector");
    assert!(
        selector_selects(selector, agent_labels),
        "agent_label_selector {selector:?} does not select the agents' pods ({agent_labels})"
    );
    assert!(
        !selector_selects(selector, pod_labels()),
        "agent_label_selector {selector:?} selects the gateway's own pods: a gateway would be \
         taken for its node's agent"
    );
    let port_name = setting_str(g, "agent_port_name");
    assert_eq!(
        named_port(manifests::agent_container(), port_name),
        u64::from(manifests::listen_port()),
        "agent_port_name {port_name:?} names the agents' listen port"
    );
    match g.get("agent_namespace") {
        // The gateway's own namespace: the agents' (gateway_renders_beside_the_agents_...).
        None => {}
        Some(ns) => assert_eq!(ns.as_str(), Some(NAMESPACE)),
    }
    // Agents that want a token get it from the gateway.
    assert_eq!(
        a.contains_key("auth_token_file"),
        g.contains_key("agent_token_file"),
        "with auth_token_file set for the agents, set agent_token_file for the gateway (and the \
         other way round)"
    );

    // The test itself: check-config refuses what the gateway would refuse at start.
    let broken = config_file()
        .1
        .replace("authorize = \"druid\"", "authorize = \"maybe\"");
    assert!(
        check_config(&broken).is_err(),
        "check-config accepted authorize = \"maybe\""
    );
}

#[test]
fn gateway_deployment_is_least_privilege_and_highly_available() {
    let d = deployment();
    let spec = pod_spec();
    assert_eq!(d["spec"]["replicas"], 2);
    assert_eq!(
        d["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"], 0,
        "a new pod is ready before an old one goes"
    );
    assert!(match_labels_select(
        &d["spec"]["selector"]["matchLabels"],
        pod_labels()
    ));

    // Spread over nodes: a topology spread constraint or a pod anti-affinity on the hostname.
    let spreads = spec["topologySpreadConstraints"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|t| {
            t["topologyKey"] == "kubernetes.io/hostname"
                && match_labels_select(&t["labelSelector"]["matchLabels"], pod_labels())
        });
    let anti_affinity = &spec["affinity"]["podAntiAffinity"];
    let repels = ["requiredDuringSchedulingIgnoredDuringExecution"]
        .iter()
        .flat_map(|k| anti_affinity[k].as_array().into_iter().flatten())
        .chain(
            anti_affinity["preferredDuringSchedulingIgnoredDuringExecution"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| &p["podAffinityTerm"]),
        )
        .any(|t| {
            t["topologyKey"] == "kubernetes.io/hostname"
                && match_labels_select(&t["labelSelector"]["matchLabels"], pod_labels())
        });
    assert!(spreads || repels, "the two gateways are spread over nodes");

    let pdb = one("PodDisruptionBudget");
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    assert!(match_labels_select(
        &pdb["spec"]["selector"]["matchLabels"],
        pod_labels()
    ));

    // Least privilege: any uid, nothing of the node.
    let psc = &spec["securityContext"];
    assert_eq!(psc["runAsNonRoot"], true);
    assert!(psc["runAsUser"].as_u64().is_some_and(|u| u > 0));
    assert_eq!(psc["seccompProfile"]["type"], "RuntimeDefault");
    for key in ["hostNetwork", "hostPID", "hostIPC"] {
        assert!(spec[key].is_null() || spec[key] == false, "{key}");
    }
    for v in array_of(&spec["volumes"], "volumes") {
        assert!(v.get("hostPath").is_none(), "no hostPath: {v}");
    }
    let sc = &container()["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert!(sc["privileged"].is_null() || sc["privileged"] == false);
    assert_eq!(sc["capabilities"], json!({"drop": ["ALL"]}));
    for kind in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            assert!(
                container()["resources"][kind][resource].is_string(),
                "resources.{kind}.{resource}"
            );
        }
    }

    // The preStop pause and the gateway's own drain fit in the grace period.
    let grace = spec["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
    let pause = container()["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        Duration::from_secs(grace)
            > Duration::from_secs(pause) + druid_log_agent::shutdown::HTTP_CLOSE,
        "terminationGracePeriodSeconds {grace} must exceed the preStop pause {pause}s and the \
         gateway's HTTP drain"
    );

    // A load-balanced Service: any gateway answers for any task.
    let svc = &one("Service")["spec"];
    assert!(svc["type"].is_null() || svc["type"] == "ClusterIP");
    assert!(
        svc["clusterIP"].is_null(),
        "not headless: clusterIP {}",
        svc["clusterIP"]
    );
    assert_eq!(
        spec["serviceAccountName"],
        one("ServiceAccount")["metadata"]["name"]
    );
}

#[test]
fn gateway_rbac_is_list_and_watch_on_pods_only() {
    let role = one("ClusterRole");
    assert_eq!(
        role["rules"],
        json!([{"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]}])
    );
    let sa = one("ServiceAccount");
    let binding = one("ClusterRoleBinding");
    assert_eq!(binding["roleRef"]["kind"], "ClusterRole");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    assert_eq!(
        binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": NAMESPACE}])
    );
}

/// The gateway's pods are not taken for agents, and the agents' NetworkPolicy admits them.
#[test]
fn gateway_pods_reach_the_agents_and_are_not_taken_for_them() {
    let agent_docs = manifests::documents();
    let ds = manifests::daemonset();
    let agent_np = one_in(agent_docs, "NetworkPolicy", None);
    for (what, selector) in [
        ("the DaemonSet", &ds["spec"]["selector"]["matchLabels"]),
        (
            "the agents' Service",
            &one_in(agent_docs, "Service", None)["spec"]["selector"],
        ),
        (
            "the agents' NetworkPolicy",
            &agent_np["spec"]["podSelector"]["matchLabels"],
        ),
    ] {
        assert!(
            !match_labels_select(selector, pod_labels()),
            "{what} selects the gateway's pods"
        );
    }

    // A peer of the agents' NetworkPolicy is the gateway's pods, in the policy's namespace
    // (a podSelector alone), on the agents' port.
    let agent_port = u64::from(manifests::listen_port());
    let admitted = array_of(&agent_np["spec"]["ingress"], "ingress")
        .iter()
        .filter(|rule| {
            array_of(&rule["ports"], "ports")
                .iter()
                .any(|p| p["port"].as_u64() == Some(agent_port))
        })
        .flat_map(|rule| array_of(&rule["from"], "from"))
        .any(|peer| {
            peer.get("namespaceSelector").is_none()
                && peer.get("ipBlock").is_none()
                && match_labels_select(&peer["podSelector"]["matchLabels"], pod_labels())
        });
    assert!(
        admitted,
        "manifests/networkpolicy.yaml does not admit the gateway's pods to port {agent_port}"
    );
    assert_eq!(agent_np["metadata"]["namespace"], NAMESPACE);

    // The gateway's own NetworkPolicy: its pods, its port.
    let np = one("NetworkPolicy");
    assert!(match_labels_select(
        &np["spec"]["podSelector"]["matchLabels"],
        pod_labels()
    ));
    let port = port_of(setting_str(effective(), "listen"));
    for rule in array_of(&np["spec"]["ingress"], "ingress") {
        for p in array_of(&rule["ports"], "ports") {
            assert_eq!(p["port"].as_u64(), Some(port), "NetworkPolicy port");
        }
    }
}

/// A glob of IAM (`*` any run of characters, `?` one) matched against a whole string.
fn iam_glob(pattern: &str, s: &str) -> bool {
    let re = regex::escape(pattern)
        .replace(r"\*", ".*")
        .replace(r"\?", ".");
    Regex::new(&format!("^{re}$")).unwrap().is_match(s)
}

/// A statement's `Action` or `Resource`: one string or a list.
fn one_or_many(v: &Value) -> Vec<String> {
    match v {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a
            .iter()
            .map(|x| str_of(x, "an action or resource").to_owned())
            .collect(),
        other => panic!("{other} is neither a string nor a list"),
    }
}

#[test]
fn iam_policy_example_reads_only_the_agents_keys_and_lets_a_missing_log_be_404() {
    let path = repo().join("examples/gateway/iam-policy-read-only.json");
    let policy: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
    assert_eq!(policy["Version"], "2012-10-17");

    // The bucket and the key of a task, as the gateway's archive settings make them.
    let archive: ArchiveConfig = setting(effective(), "archive")
        .clone()
        .try_into()
        .expect("the printed [archive] reads back");
    let ArchiveConfig::S3(s3) = archive else {
        panic!("the gateway reads an S3 archive");
    };
    let task = TaskId::new("index_kafka_wikipedia_8f3e2a1b0c9d7e6_aiceognb").unwrap();
    let key = s3.key(&task);
    let bucket_arn = format!("arn:aws:s3:::{}", s3.bucket);
    let object_arn = format!("{bucket_arn}/{key}");
    let other_arn = format!("{bucket_arn}/elsewhere/{}/log", task.as_str());

    let mut actions = BTreeSet::new();
    for st in array_of(&policy["Statement"], "Statement") {
        assert_eq!(st["Effect"], "Allow", "{st}");
        let resources = one_or_many(&st["Resource"]);
        for action in one_or_many(&st["Action"]) {
            assert!(!action.contains('*'), "no wildcard action: {action}");
            match action.as_str() {
                "s3:GetObject" => {
                    assert!(st.get("Condition").is_none(), "{st}");
                    assert!(
                        resources.iter().any(|r| iam_glob(r, &object_arn)),
                        "GetObject does not cover {object_arn}: {resources:?}"
                    );
                    assert!(
                        !resources.iter().any(|r| iam_glob(r, &other_arn)),
                        "GetObject reaches beyond the prefix ({other_arn}): {resources:?}"
                    );
                }
                // S3 answers a GET or HEAD of a missing key with 404 only to a caller that
                // may list the bucket, and evaluates that check with the key as s3:prefix.
                "s3:ListBucket" => {
                    assert_eq!(
                        resources,
                        std::slice::from_ref(&bucket_arn),
                        "ListBucket is on the bucket"
                    );
                    if let Some(cond) = st.get("Condition") {
                        let prefixes = one_or_many(&cond["StringLike"]["s3:prefix"]);
                        let keys: BTreeSet<&String> = cond
                            .as_object()
                            .unwrap()
                            .values()
                            .flat_map(|c| c.as_object().unwrap().keys())
                            .collect();
                        assert_eq!(keys, [&"s3:prefix".to_owned()].into(), "{cond}");
                        assert!(
                            prefixes.iter().any(|p| iam_glob(p, &key)),
                            "the s3:prefix condition {prefixes:?} does not cover {key}"
                        );
                    }
                }
                other => panic!("a read-only policy allows {other}"),
            }
            actions.insert(action);
        }
    }
    assert_eq!(
        actions,
        ["s3:GetObject".to_owned(), "s3:ListBucket".to_owned()].into()
    );
}

/// The documents of an example file of `examples/gateway/`, and its text.
fn example(file: &str) -> (String, Vec<Value>) {
    let text = std::fs::read_to_string(repo().join("examples/gateway").join(file)).unwrap();
    let docs = yaml_documents(&text);
    (text, docs)
}

/// The gateway's Service, as a backend names it: (namespace, name, port number, port name).
fn gateway_service() -> (String, String, u64, String) {
    let svc = one("Service");
    let port = &svc["spec"]["ports"][0];
    (
        NAMESPACE.to_owned(),
        str_of(&svc["metadata"]["name"], "Service name").to_owned(),
        port["port"].as_u64().unwrap(),
        str_of(&port["name"], "Service port name").to_owned(),
    )
}

#[test]
fn ingress_example_sends_only_task_logs_to_the_gateway() {
    let (text, docs) = example("ingress-nginx.yaml");
    let report = validated(&text);
    assert_eq!(
        report.matches(" passed for resource ").count(),
        docs.len(),
        "every document of ingress-nginx.yaml is validated:\n{report}"
    );
    assert!(docs.iter().all(|d| kind_of(d) == "Ingress"));
    let (gw_ns, gw_name, gw_port, gw_port_name) = gateway_service();

    // Every path of every Ingress, with its backend: (host, path, namespace/service).
    let mut paths: Vec<(String, String, String)> = Vec::new();
    let mut regex_hosts = BTreeSet::new();
    let mut classes = BTreeSet::new();
    for ing in &docs {
        let ns = str_of(&ing["metadata"]["namespace"], "Ingress namespace");
        classes.insert(ing["spec"]["ingressClassName"].to_string());
        let regex =
            ing["metadata"]["annotations"]["nginx.ingress.kubernetes.io/use-regex"] == "true";
        for rule in array_of(&ing["spec"]["rules"], "rules") {
            let host = str_of(&rule["host"], "host").to_owned();
            if regex {
                regex_hosts.insert(host.clone());
            }
            for p in array_of(&rule["http"]["paths"], "paths") {
                let svc = &p["backend"]["service"];
                let name = str_of(&svc["name"], "backend service");
                if (ns, name) == (gw_ns.as_str(), gw_name.as_str()) {
                    assert!(
                        svc["port"]["name"] == gw_port_name.as_str()
                            || svc["port"]["number"].as_u64() == Some(gw_port),
                        "the gateway's backend port: {}",
                        svc["port"]
                    );
                    assert_eq!(
                        p["pathType"], "ImplementationSpecific",
                        "a regular expression is ingress-nginx's, not Prefix or Exact"
                    );
                    assert!(regex, "the gateway's Ingress sets use-regex");
                }
                paths.push((
                    host.clone(),
                    str_of(&p["path"], "path").to_owned(),
                    format!("{ns}/{name}"),
                ));
            }
        }
    }
    assert_eq!(classes.len(), 1, "one ingress class: {classes:?}");
    let hosts: BTreeSet<&String> = paths.iter().map(|(h, _, _)| h).collect();
    assert_eq!(hosts.len(), 1, "one host, the console's: {hosts:?}");
    let host = hosts.into_iter().next().unwrap().clone();
    assert!(
        regex_hosts.contains(&host),
        "the host's paths are regular expressions"
    );

    // ingress-nginx with use-regex: every path of the host is a case-insensitive expression
    // anchored at the start (`location ~* "^path"`), tried longest first; the first match wins.
    let mut locations: Vec<(Regex, String)> = paths
        .iter()
        .map(|(_, path, backend)| {
            (
                Regex::new(&format!("(?i)^{path}")).unwrap_or_else(|e| panic!("{path}: {e}")),
                backend.clone(),
            )
        })
        .collect();
    locations.sort_by_key(|(re, _)| std::cmp::Reverse(re.as_str().len()));
    let route = |path: &str| -> String {
        locations
            .iter()
            .find(|(re, _)| re.is_match(path))
            .map(|(_, b)| b.clone())
            .unwrap_or_else(|| panic!("no location takes {path}"))
    };
    let gateway = format!("{gw_ns}/{gw_name}");
    for p in LOG_PATHS {
        assert_eq!(route(p), gateway, "{p}");
    }
    for p in OTHER_PATHS {
        let to = route(p);
        assert_ne!(to, gateway, "{p} goes to the gateway");
        assert!(to.ends_with("/druid-router"), "{p} goes to {to}");
    }
}

/// Keys of a JSON object, checked against the fields a CRD defines (`required` must be there).
fn assert_fields(what: &str, v: &Value, allowed: &[&str], required: &[&str]) {
    let keys: BTreeSet<&str> = v
        .as_object()
        .unwrap_or_else(|| panic!("{what} is an object, not {v}"))
        .keys()
        .map(String::as_str)
        .collect();
    let allowed: BTreeSet<&str> = allowed.iter().copied().collect();
    let unknown: Vec<&&str> = keys.difference(&allowed).collect();
    assert!(unknown.is_empty(), "{what}: no such field {unknown:?}");
    for r in required {
        assert!(keys.contains(r), "{what}: {r} is required");
    }
}

/// An HTTPRoute or ReferenceGrant against the fields of its CRD (Gateway API standard channel:
/// HTTPRoute `gateway.networking.k8s.io/v1`, ReferenceGrant `v1beta1`).
fn check_gateway_api_fields(d: &Value) {
    let kind = kind_of(d);
    assert_fields(
        kind,
        d,
        &["apiVersion", "kind", "metadata", "spec"],
        &["apiVersion", "kind", "metadata", "spec"],
    );
    let spec = &d["spec"];
    match kind {
        "HTTPRoute" => {
            assert_eq!(d["apiVersion"], "gateway.networking.k8s.io/v1");
            assert_fields(
                "HTTPRoute spec",
                spec,
                &["parentRefs", "hostnames", "rules"],
                &[],
            );
            let hostname = Regex::new(
                r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
            )
            .unwrap();
            for h in spec["hostnames"].as_array().into_iter().flatten() {
                assert!(hostname.is_match(str_of(h, "hostname")), "hostname {h}");
            }
            for p in array_of(&spec["parentRefs"], "parentRefs") {
                assert_fields(
                    "parentRef",
                    p,
                    &["group", "kind", "namespace", "name", "sectionName", "port"],
                    &["name"],
                );
            }
            for rule in array_of(&spec["rules"], "rules") {
                assert_fields(
                    "HTTPRouteRule",
                    rule,
                    &["matches", "filters", "backendRefs", "timeouts"],
                    &[],
                );
                for m in array_of(&rule["matches"], "matches") {
                    assert_fields(
                        "HTTPRouteMatch",
                        m,
                        &["path", "headers", "queryParams", "method"],
                        &[],
                    );
                    assert_fields("HTTPPathMatch", &m["path"], &["type", "value"], &[]);
                    let t = str_of(&m["path"]["type"], "path type");
                    assert!(
                        ["Exact", "PathPrefix", "RegularExpression"].contains(&t),
                        "path type {t}"
                    );
                }
                for b in array_of(&rule["backendRefs"], "backendRefs") {
                    assert_fields(
                        "HTTPBackendRef",
                        b,
                        &[
                            "group",
                            "kind",
                            "name",
                            "namespace",
                            "port",
                            "weight",
                            "filters",
                        ],
                        // A Service backend must name its port (the CRD's validation rule).
                        &["name", "port"],
                    );
                }
            }
        }
        "ReferenceGrant" => {
            assert_eq!(d["apiVersion"], "gateway.networking.k8s.io/v1beta1");
            assert_fields(
                "ReferenceGrant spec",
                spec,
                &["from", "to"],
                &["from", "to"],
            );
            for f in array_of(&spec["from"], "from") {
                assert_fields(
                    "ReferenceGrantFrom",
                    f,
                    &["group", "kind", "namespace"],
                    &["group", "kind", "namespace"],
                );
            }
            for t in array_of(&spec["to"], "to") {
                assert_fields(
                    "ReferenceGrantTo",
                    t,
                    &["group", "kind", "name"],
                    &["group", "kind"],
                );
            }
        }
        other => panic!("a kind the test does not know: {other}"),
    }
}

/// A backendRef as (namespace, name, port), its namespace defaulting to the route's; only
/// Service backends.
fn backend(b: &Value, route_ns: &str) -> (String, String, u64) {
    assert!(
        b["group"].is_null() || b["group"] == "",
        "a core group backend"
    );
    assert!(
        b["kind"].is_null() || b["kind"] == "Service",
        "a Service backend"
    );
    (
        b["namespace"].as_str().unwrap_or(route_ns).to_owned(),
        str_of(&b["name"], "backendRef name").to_owned(),
        b["port"].as_u64().expect("a numeric port"),
    )
}

#[test]
fn httproute_example_sends_only_task_logs_to_the_gateway() {
    let (text, docs) = example("httproute.yaml");
    let report = validated(&text);
    assert_eq!(
        report.matches(" passed for resource ").count(),
        0,
        "kubernetes-validate has no schema for the Gateway API:\n{report}"
    );
    let unknown: BTreeSet<&str> = report
        .lines()
        .filter_map(|l| l.split("Couldn't find schema for kind ").nth(1))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(unknown, GATEWAY_API_KINDS.into(), "{report}");
    for d in &docs {
        check_gateway_api_fields(d);
    }

    let route = one_in(&docs, "HTTPRoute", None);
    let route_ns = str_of(&route["metadata"]["namespace"], "HTTPRoute namespace");
    let (gw_ns, gw_name, gw_port, _) = gateway_service();
    let rules = array_of(&route["spec"]["rules"], "rules");
    let mut to_gateway = 0;
    for rule in rules {
        let backends: Vec<(String, String, u64)> = array_of(&rule["backendRefs"], "backendRefs")
            .iter()
            .map(|b| backend(b, route_ns))
            .collect();
        let matches = array_of(&rule["matches"], "matches");
        if backends
            .iter()
            .any(|(ns, name, _)| (ns, name) == (&gw_ns, &gw_name))
        {
            to_gateway += 1;
            assert_eq!(backends, [(gw_ns.clone(), gw_name.clone(), gw_port)]);
            // Whether the implementation matches the expression against the whole path or
            // searches it, the same paths go to the gateway.
            for m in matches {
                assert_eq!(m["path"]["type"], "RegularExpression");
                let re = str_of(&m["path"]["value"], "path value");
                let search = Regex::new(re).unwrap_or_else(|e| panic!("{re}: {e}"));
                let whole = Regex::new(&format!("^(?:{re})$")).unwrap();
                for p in LOG_PATHS {
                    assert!(whole.is_match(p) && search.is_match(p), "{re} misses {p}");
                }
                for p in OTHER_PATHS {
                    assert!(!whole.is_match(p) && !search.is_match(p), "{re} takes {p}");
                }
            }
        } else {
            // The rest: the router, on every path.
            assert_eq!(
                matches,
                [json!({"path": {"type": "PathPrefix", "value": "/"}})],
                "everything else goes to the router"
            );
            assert!(
                backends.iter().all(|(_, name, _)| name == "druid-router"),
                "{backends:?}"
            );
        }
    }
    assert_eq!(to_gateway, 1, "one rule sends task logs to the gateway");

    // The gateway's Service is in another namespace: a ReferenceGrant there admits the route.
    assert_ne!(route_ns, gw_ns);
    let grant = one_in(&docs, "ReferenceGrant", None);
    assert_eq!(grant["metadata"]["namespace"], gw_ns.as_str());
    assert!(
        array_of(&grant["spec"]["from"], "from").contains(&json!({
            "group": "gateway.networking.k8s.io",
            "kind": "HTTPRoute",
            "namespace": route_ns
        })),
        "the grant admits HTTPRoutes of {route_ns}"
    );
    assert!(
        array_of(&grant["spec"]["to"], "to")
            .iter()
            .any(|t| t["group"] == ""
                && t["kind"] == "Service"
                && (t["name"].is_null() || t["name"] == gw_name.as_str())),
        "the grant covers the gateway's Service"
    );
}

/// `examples/gateway/logs-reader-rbac.yaml` lets a user run `druid-log-agent logs` through the
/// API server and do nothing else: RBAC authorises the service proxy as `get` on
/// `services/proxy` named by the path's `{service}:{port}` segment as written, so the Role's
/// one name must be the gateway Service's name and port name (manifests/gateway/) and the very
/// segment the real command puts in its path (seen by the fake API server).
#[test]
fn logs_reader_rbac_example_grants_only_the_proxy_the_logs_command_uses() {
    let (yaml, docs) = example("logs-reader-rbac.yaml");
    let report = validated(&yaml);
    assert_eq!(
        report.matches(" passed for resource ").count(),
        docs.len(),
        "every document of logs-reader-rbac.yaml is validated:\n{report}"
    );
    let kinds: Vec<&str> = docs.iter().map(kind_of).collect();
    assert_eq!(kinds, ["Role", "RoleBinding"]);
    let (role, binding) = (&docs[0], &docs[1]);
    let (svc_ns, svc_name, _, svc_port_name) = gateway_service();
    for d in &docs {
        assert_eq!(
            d["metadata"]["namespace"],
            svc_ns.as_str(),
            "{} {}: the gateway Service's namespace",
            kind_of(d),
            d["metadata"]["name"]
        );
    }
    let proxied = format!("{svc_name}:{svc_port_name}");
    assert_eq!(
        role["rules"],
        json!([{
            "apiGroups": [""],
            "resources": ["services/proxy"],
            "resourceNames": [proxied],
            "verbs": ["get"],
        }])
    );
    assert_eq!(
        binding["roleRef"],
        json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]})
    );
    let subjects = array_of(&binding["subjects"], "subjects");
    assert_eq!(subjects.len(), 1, "one placeholder subject");
    assert_eq!(subjects[0]["kind"], "Group");
    assert_eq!(subjects[0]["apiGroup"], "rbac.authorization.k8s.io");

    // The real command with its defaults, against the fake API server (which has no such
    // Service, so the answer is the API's 404 Status: exit 2). What it asked is what RBAC
    // sees, and it asks nothing else the Role would have to allow.
    let api = FakeApi::start();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.write_kubeconfig(dir.path());
    let task = "index_kafka_wikipedia_rbac_1";
    let out = Command::new(env!("CARGO_BIN_EXE_druid-log-agent"))
        .args(["logs", task, "-n", &svc_ns])
        .env("KUBECONFIG", &kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("DLA_GATEWAY_URL")
        .env_remove("DLA_AUTHORIZATION")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "no such Service in the fake API: {}",
        text(&out.stderr)
    );
    assert_eq!(
        api.requests(),
        [format!(
            "/api/v1/namespaces/{svc_ns}/services/{proxied}/proxy/druid/indexer/v1/task/{task}/log?offset=0"
        )],
        "the logs command asks the proxy named in the Role, and nothing else"
    );
}
