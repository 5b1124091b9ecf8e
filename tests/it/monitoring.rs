//! The optional monitoring component (`manifests/monitoring/`) agrees with the agent.
//!
//! `manifests/` is copied and rendered with `components: [monitoring]` added, as
//! docs/operations.md tells users to; the PrometheusRule's `spec` as rendered is the rules file
//! that `promtool test rules` runs `alerts.test.yaml` on (the rules are written once, in
//! `prometheusrule.yaml`); every metric the rules name must be in a live agent's `/metrics`;
//! every alert has its runbook in docs/operations.md.
//!
//! Needs what tests/it/manifests.rs needs, and `promtool` (Debian's `prometheus` package;
//! `.ci/run` installs it). A missing tool fails the test: these checks are never skipped.

use crate::common::{AgentProc, Node, http_get};
use crate::manifests::{
    NAMESPACE, kind_of, kustomize, metric_names, repo, run, text, validated, yaml_documents,
};

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use serde_json::{Value, json};

const PROMTOOL_HINT: &str = "promtool is needed (Debian's prometheus package: apt-get install \
     --no-install-recommends prometheus; .ci/run installs it); set PROMTOOL to use another";
/// The CRDs of the Prometheus Operator: kubernetes-validate has no schema for them.
const OPERATOR_KINDS: [&str; 2] = ["PodMonitor", "PrometheusRule"];
/// The job the PodMonitor gives its targets (its `jobLabel` names the pods' label), and the
/// job the alerts select.
const JOB: &str = "druid-log-agent";

fn component() -> PathBuf {
    repo().join("manifests/monitoring")
}

/// Copies the regular files of `from` into `to`, folders included.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// `manifests/` with the component added as docs/operations.md says, rendered once.
fn rendered() -> &'static str {
    static R: OnceLock<String> = OnceLock::new();
    R.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let copy = dir.path().join("manifests");
        copy_tree(&repo().join("manifests"), &copy);
        let kustomization = copy.join("kustomization.yaml");
        let mut k = std::fs::read_to_string(&kustomization).unwrap();
        assert!(
            !k.contains("\ncomponents:"),
            "manifests/kustomization.yaml leaves the monitoring component out by default"
        );
        k.push_str("\ncomponents:\n  - monitoring\n");
        std::fs::write(&kustomization, k).unwrap();
        kustomize(&copy)
    })
}

fn documents() -> &'static [Value] {
    static D: OnceLock<Vec<Value>> = OnceLock::new();
    D.get_or_init(|| yaml_documents(rendered()))
}

fn one(kind: &str) -> &'static Value {
    let found: Vec<&Value> = documents().iter().filter(|d| kind_of(d) == kind).collect();
    assert_eq!(found.len(), 1, "expected exactly one {kind}");
    found[0]
}

/// Every alerting rule of the rendered PrometheusRule.
fn alerts() -> Vec<&'static Value> {
    let groups = one("PrometheusRule")["spec"]["groups"]
        .as_array()
        .expect("the PrometheusRule has groups");
    let rules: Vec<&Value> = groups
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("a group has rules"))
        .collect();
    assert!(
        rules.iter().all(|r| r.get("alert").is_some()),
        "only alerting rules"
    );
    rules
}

fn promtool(args: &[&str], dir: &Path) -> Output {
    let promtool = std::env::var("PROMTOOL").unwrap_or_else(|_| "promtool".into());
    run(
        Command::new(promtool).args(args).current_dir(dir),
        b"",
        PROMTOOL_HINT,
    )
}

/// Writes the rendered PrometheusRule's `spec` as `rules.yaml` beside a copy of
/// `alerts.test.yaml` in `dir`. JSON is YAML, so the spec is written as it was parsed.
fn write_rules_and_tests(dir: &Path) {
    let spec = &one("PrometheusRule")["spec"];
    let keys: BTreeSet<&str> = spec.as_object().unwrap().keys().map(|k| &k[..]).collect();
    assert_eq!(keys, ["groups"].into(), "the spec is a plain rules file");
    std::fs::write(dir.join("rules.yaml"), spec.to_string()).unwrap();
    std::fs::copy(
        component().join("alerts.test.yaml"),
        dir.join("alerts.test.yaml"),
    )
    .unwrap();
}

#[test]
fn component_renders_beside_the_agent() {
    let kinds: BTreeSet<&str> = documents().iter().map(kind_of).collect();
    for kind in OPERATOR_KINDS.iter().chain(&["DaemonSet", "Service"]) {
        assert!(kinds.contains(kind), "{kind} is rendered: {kinds:?}");
    }
    let daemonset = one("DaemonSet");
    let pod_labels = &daemonset["spec"]["template"]["metadata"]["labels"];
    for kind in OPERATOR_KINDS {
        assert_eq!(one(kind)["metadata"]["namespace"], NAMESPACE, "{kind}");
    }

    // The PodMonitor scrapes the agent's pods, on the container port named in the DaemonSet.
    let pm = &one("PodMonitor")["spec"];
    for (k, v) in pm["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(&pod_labels[k], v, "the PodMonitor selects the agent's pods");
    }
    let job_label = pm["jobLabel"].as_str().expect("jobLabel is set");
    assert_eq!(pod_labels[job_label], JOB, "the job the alerts select");
    let endpoints = pm["podMetricsEndpoints"].as_array().unwrap();
    assert_eq!(endpoints.len(), 1);
    let port = &endpoints[0]["port"];
    let containers = daemonset["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap();
    assert!(
        containers[0]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| &p["name"] == port),
        "the PodMonitor's port {port} is a named port of the agent container"
    );
    assert_eq!(endpoints[0]["path"], "/metrics");
}

/// kubernetes-validate knows the built-in kinds only: for the Prometheus Operator's kinds it
/// warns "Couldn't find schema" and passes them. So the test requires a pass for every other
/// document and exactly that warning for the operator's kinds, and checks those against the
/// fields of their CRDs that the component uses (and promtool checks the rules themselves).
#[test]
fn documents_validate_and_operator_kinds_are_checked_by_hand() {
    let report = validated(rendered());
    let builtin = documents()
        .iter()
        .filter(|d| !OPERATOR_KINDS.contains(&kind_of(d)))
        .count();
    assert_eq!(
        report.matches(" passed for resource ").count(),
        builtin,
        "every built-in document is validated:\n{report}"
    );
    let unknown: BTreeSet<&str> = report
        .lines()
        .filter_map(|l| l.split("Couldn't find schema for kind ").nth(1))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(
        unknown,
        OPERATOR_KINDS.into(),
        "kubernetes-validate skips exactly the operator's kinds:\n{report}"
    );

    // The operator's kinds: their API version, and only fields of their CRDs
    // (monitoring.coreos.com/v1 PodMonitorSpec, PodMetricsEndpoint, PrometheusRuleSpec).
    let keys = |v: &Value| -> BTreeSet<String> {
        v.as_object()
            .unwrap_or_else(|| panic!("{v} is an object"))
            .keys()
            .cloned()
            .collect()
    };
    let allowed =
        |names: &[&str]| -> BTreeSet<String> { names.iter().map(|n| n.to_string()).collect() };
    for kind in OPERATOR_KINDS {
        let d = one(kind);
        assert_eq!(d["apiVersion"], "monitoring.coreos.com/v1", "{kind}");
        assert!(keys(d).is_subset(&allowed(&["apiVersion", "kind", "metadata", "spec"])));
    }
    let pm = &one("PodMonitor")["spec"];
    assert!(
        keys(pm).is_subset(&allowed(&[
            "jobLabel",
            "selector",
            "namespaceSelector",
            "podMetricsEndpoints",
            "podTargetLabels",
        ])),
        "PodMonitor spec fields: {:?}",
        keys(pm)
    );
    for e in pm["podMetricsEndpoints"].as_array().unwrap() {
        assert!(
            keys(e).is_subset(&allowed(&[
                "port",
                "path",
                "interval",
                "scrapeTimeout",
                "relabelings",
                "metricRelabelings",
                "authorization",
            ])),
            "PodMetricsEndpoint fields: {:?}",
            keys(e)
        );
    }
    assert_eq!(keys(&one("PrometheusRule")["spec"]), allowed(&["groups"]));
}

#[test]
fn alerts_pass_their_promtool_tests() {
    let dir = tempfile::tempdir().unwrap();
    write_rules_and_tests(dir.path());
    let check = promtool(&["check", "rules", "rules.yaml"], dir.path());
    assert!(
        check.status.success(),
        "promtool check rules:\n{}{}",
        text(&check.stdout),
        text(&check.stderr)
    );
    let out = promtool(&["test", "rules", "alerts.test.yaml"], dir.path());
    let report = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "promtool test rules:\n{report}");
    assert!(report.contains("SUCCESS"), "{report}");

    // Every alert is tested: named by a test case that expects it to fire.
    let tests = std::fs::read_to_string(component().join("alerts.test.yaml")).unwrap();
    for rule in alerts() {
        let name = rule["alert"].as_str().unwrap();
        assert!(
            tests.contains(&format!("alertname: {name}\n        exp_alerts:")),
            "alerts.test.yaml has no case where {name} fires"
        );
    }
}

#[test]
fn every_alert_has_a_summary_and_a_runbook_in_the_operations_guide() {
    let doc = std::fs::read_to_string(repo().join("docs/operations.md")).unwrap();
    for rule in alerts() {
        let name = rule["alert"].as_str().unwrap();
        let a = &rule["annotations"];
        for key in ["summary", "description"] {
            assert!(
                a[key].as_str().is_some_and(|s| !s.is_empty()),
                "{name}: {key}"
            );
        }
        assert_eq!(
            a["runbook"],
            json!(format!("docs/operations.md#{}", name.to_lowercase())),
            "{name}: the runbook annotation is its heading's anchor"
        );
        assert!(
            doc.contains(&format!("\n### {name}\n")),
            "docs/operations.md has no runbook heading \"### {name}\""
        );
    }
}

/// The metric families of a `/metrics` answer (their `# TYPE` lines: a family with no sample
/// yet, e.g. requests of a route never asked, is still declared).
fn families(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_metric_the_alerts_use_is_in_a_live_agents_metrics() {
    let exprs: Vec<&str> = alerts()
        .iter()
        .map(|r| r["expr"].as_str().unwrap())
        .collect();
    let used = metric_names(&exprs.join("\n"));
    assert!(
        used.len() >= 8,
        "the alerts use the agent's metrics: {used:?}"
    );
    // The one metric not the agent's own: Prometheus's `up` of the PodMonitor's job.
    for e in &exprs {
        if e.contains("up{") {
            assert!(e.contains(&format!("up{{job=\"{JOB}\"}}")), "{e}");
        }
    }

    let node = Node::new();
    let agent = AgentProc::start(&node, &[]);
    let addr = agent.http_addr();
    let reply = http_get(&addr, "/metrics", &[]);
    assert_eq!(reply.status, 200);
    let live = families(&String::from_utf8(reply.body).unwrap());
    let missing: Vec<&String> = used.difference(&live).collect();
    assert!(
        missing.is_empty(),
        "the alerts use metrics a live agent does not expose: {missing:?}\n(live: {live:?})"
    );
    assert!(agent.terminate().success());
}
