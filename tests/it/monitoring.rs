//! The optional monitoring component (`manifests/monitoring/`) agrees with the agent.
//!
//! `manifests/` is copied and rendered with `components: [monitoring]` added, as
//! docs/operations.md tells users to; the PrometheusRule's `spec` as rendered is the rules file
//! that `promtool test rules` runs `alerts.test.yaml` on (the rules are written once, in
//! `prometheusrule.yaml`); every alert has its runbook in docs/operations.md. The Grafana
//! dashboard (`dashboard.json`, shipped as a ConfigMap for Grafana's sidecar) has every query
//! parsed by promtool, written as recording rules with Grafana's variables filled in. Every
//! metric the rules, the dashboard and docs/operations.md name must be in a live agent's
//! `/metrics` (the gateway's `druid_log_gateway_*` in a live gateway's), so a renamed metric
//! fails here rather than on an operator's screen. The gateway's PodMonitor selects the pods of
//! `manifests/gateway/`.
//!
//! Needs what tests/it/manifests.rs needs, and `promtool` (Debian's `prometheus` package;
//! `.ci/run` installs it). A missing tool fails the test: these checks are never skipped.

use crate::common::{AgentProc, Node, http_get};
use crate::gateway::gateway_with;
use crate::manifests::{
    NAMESPACE, kind_of, kustomize, metric_names, names_with_prefix, repo, run, text, validated,
    yaml_documents,
};
use druid_log_agent_testkit::kubeapi::FakeApi;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use serde_json::{Value, json};

const PROMTOOL_HINT: &str = "promtool is needed (Debian's prometheus package: apt-get install \
     --no-install-recommends prometheus; .ci/run installs it); set PROMTOOL to use another";
/// The CRDs of the Prometheus Operator: kubernetes-validate has no schema for them.
const OPERATOR_KINDS: [&str; 2] = ["PodMonitor", "PrometheusRule"];
/// The job the agents' PodMonitor gives its targets (its `jobLabel` names the pods' label), and
/// the job the agents' alerts select.
const JOB: &str = "druid-log-agent";
/// The same for the cluster gateway's PodMonitor and alerts.
const GATEWAY_JOB: &str = "druid-log-gateway";
/// The prefix of the gateway's own metrics: these are looked for in a live gateway.
const GATEWAY_METRICS: &str = "druid_log_gateway_";

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
    let found = all(kind);
    assert_eq!(found.len(), 1, "expected exactly one {kind}");
    found[0]
}

fn all(kind: &str) -> Vec<&'static Value> {
    documents().iter().filter(|d| kind_of(d) == kind).collect()
}

/// The PodMonitor named `name`.
fn pod_monitor(name: &str) -> &'static Value {
    let found: Vec<&Value> = all("PodMonitor")
        .into_iter()
        .filter(|d| d["metadata"]["name"] == name)
        .collect();
    assert_eq!(found.len(), 1, "expected exactly one PodMonitor {name}");
    found[0]
}

/// The pod template of the gateway's Deployment, as `manifests/gateway/` renders it.
fn gateway_pod_template() -> &'static Value {
    static T: OnceLock<Value> = OnceLock::new();
    T.get_or_init(|| {
        let docs = yaml_documents(&kustomize(&repo().join("manifests/gateway")));
        let found: Vec<&Value> = docs.iter().filter(|d| kind_of(d) == "Deployment").collect();
        assert_eq!(found.len(), 1, "manifests/gateway/ has one Deployment");
        found[0]["spec"]["template"].clone()
    })
}

/// Checks a PodMonitor against the pods it is for: it selects them, its job is `job`, and it
/// scrapes `/metrics` on a named port of their first container.
fn assert_scrapes(pm: &Value, template: &Value, job: &str) {
    let name = &pm["metadata"]["name"];
    let pm = &pm["spec"];
    let pod_labels = &template["metadata"]["labels"];
    for (k, v) in pm["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(&pod_labels[k], v, "PodMonitor {name} selects the pods");
    }
    let job_label = pm["jobLabel"].as_str().expect("jobLabel is set");
    assert_eq!(pod_labels[job_label], job, "the job the alerts select");
    let endpoints = pm["podMetricsEndpoints"].as_array().unwrap();
    assert_eq!(endpoints.len(), 1);
    let port = &endpoints[0]["port"];
    let containers = template["spec"]["containers"].as_array().unwrap();
    assert!(
        containers[0]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| &p["name"] == port),
        "PodMonitor {name}: its port {port} is a named port of the container"
    );
    assert_eq!(endpoints[0]["path"], "/metrics");
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
    promtool_fed(args, dir, b"")
}

/// [`promtool`] with `input` on its standard input.
fn promtool_fed(args: &[&str], dir: &Path, input: &[u8]) -> Output {
    let promtool = std::env::var("PROMTOOL").unwrap_or_else(|_| "promtool".into());
    run(
        Command::new(promtool).args(args).current_dir(dir),
        input,
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
    for kind in OPERATOR_KINDS {
        for d in all(kind) {
            assert_eq!(d["metadata"]["namespace"], NAMESPACE, "{kind}");
        }
    }

    // One PodMonitor for the agents' pods and one for the gateway's, each on the container
    // port named in its workload; neither selects the other's pods.
    assert_eq!(all("PodMonitor").len(), 2);
    let agents = &one("DaemonSet")["spec"]["template"];
    let agents_pm = pod_monitor(JOB);
    let gateway_pm = pod_monitor(GATEWAY_JOB);
    assert_scrapes(agents_pm, agents, JOB);
    assert_scrapes(gateway_pm, gateway_pod_template(), GATEWAY_JOB);
    for (pm, other) in [(agents_pm, gateway_pod_template()), (gateway_pm, agents)] {
        let labels = &other["metadata"]["labels"];
        let selects = pm["spec"]["selector"]["matchLabels"]
            .as_object()
            .unwrap()
            .iter()
            .all(|(k, v)| &labels[k] == v);
        assert!(
            !selects,
            "PodMonitor {} selects the other workload's pods",
            pm["metadata"]["name"]
        );
    }
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
    for kind in OPERATOR_KINDS {
        for d in all(kind) {
            assert_eq!(d["apiVersion"], "monitoring.coreos.com/v1", "{kind}");
            assert!(keys(d).is_subset(&allowed(&["apiVersion", "kind", "metadata", "spec"])));
        }
    }
    for pm in all("PodMonitor") {
        check_pod_monitor_fields(&pm["spec"]);
    }
    assert_eq!(keys(&one("PrometheusRule")["spec"]), allowed(&["groups"]));
}

/// The field names of a JSON object.
fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .unwrap_or_else(|| panic!("{v} is an object"))
        .keys()
        .cloned()
        .collect()
}

fn allowed(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| n.to_string()).collect()
}

/// A PodMonitor's spec against the fields of its CRD that the component uses.
fn check_pod_monitor_fields(pm: &Value) {
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

/// The ConfigMap that carries the dashboard to Grafana's dashboard sidecar: a stable name, so
/// an edit replaces the dashboard instead of adding a copy.
const DASHBOARD_CONFIGMAP: &str = "druid-log-agent-dashboard";
/// The label, and its value, that Grafana's dashboard sidecar looks for in kube-prometheus-stack
/// (`grafana.sidecar.dashboards.label` and `labelValue`).
const SIDECAR_LABEL: (&str, &str) = ("grafana_dashboard", "1");
/// The data source variable every panel and query must use, so that an imported dashboard
/// follows the data source chosen at its top instead of one fixed in the JSON.
const DATASOURCE: &str = "${datasource}";
/// Grafana's built-in variables a query may use, with the concrete values promtool is given:
/// durations where Grafana writes durations, plain numbers for the `_s` and `_ms` forms.
const GRAFANA_BUILTINS: [(&str, &str); 6] = [
    ("__rate_interval", "5m"),
    ("__interval", "1m"),
    ("__range", "1h"),
    ("__interval_ms", "60000"),
    ("__range_s", "3600"),
    ("__range_ms", "3600000"),
];

fn dashboard_text() -> String {
    std::fs::read_to_string(component().join("dashboard.json")).unwrap()
}

fn dashboard() -> &'static Value {
    static D: OnceLock<Value> = OnceLock::new();
    D.get_or_init(|| {
        serde_json::from_str(&dashboard_text())
            .unwrap_or_else(|e| panic!("manifests/monitoring/dashboard.json is not JSON: {e}"))
    })
}

/// Every panel but the rows, the panels of collapsed rows (which hold theirs) included.
fn panels() -> Vec<&'static Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for p in list.as_array().into_iter().flatten() {
            if p["type"] == "row" {
                walk(&p["panels"], out);
            } else {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    walk(&dashboard()["panels"], &mut out);
    out
}

fn title(panel: &Value) -> &str {
    panel["title"].as_str().unwrap_or("(untitled)")
}

fn variables() -> &'static [Value] {
    dashboard()["templating"]["list"]
        .as_array()
        .map_or(&[], Vec::as_slice)
}

/// A PromQL query of the dashboard: a panel target's `expr`, or the series selector of a
/// variable's `label_values(...)`.
struct Query {
    /// Where an operator finds it in Grafana: the panel's title, or `variable $name`.
    place: String,
    /// The name of the recording rule it is checked as.
    record: String,
    /// As written in the dashboard, Grafana's variables and all.
    expr: String,
}

/// Every query of the dashboard, in the dashboard's order.
fn queries() -> Vec<Query> {
    let name_part = |s: &str| -> String {
        s.chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect()
    };
    let mut out = Vec::new();
    for var in variables().iter().filter(|v| v["type"] == "query") {
        let name = var["name"].as_str().unwrap();
        // Grafana writes the query as a string, or (newer versions) as an object holding it.
        let query = var["query"]
            .as_str()
            .or_else(|| var["query"]["query"].as_str())
            .unwrap_or_else(|| panic!("variable ${name} has no query"));
        let expr = if let Some(args) = query
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
        {
            // label_values(selector, label), or label_values(label) with no selector.
            let Some((selector, _label)) = args.rsplit_once(',') else {
                continue;
            };
            selector.trim()
        } else if let Some(expr) = query
            .strip_prefix("query_result(")
            .and_then(|q| q.strip_suffix(')'))
        {
            expr
        } else {
            panic!("variable ${name}: a query form this test does not know: {query}")
        };
        out.push(Query {
            place: format!("variable ${name}"),
            record: format!("dashboard:variable_{}", name_part(name)),
            expr: expr.to_owned(),
        });
    }
    for (i, panel) in panels().into_iter().enumerate() {
        let id = panel["id"].as_u64().unwrap_or(i as u64);
        for (j, target) in panel["targets"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            let ref_id = target["refId"].as_str().map_or(j.to_string(), name_part);
            let expr = target["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("panel \"{}\", target {ref_id}: no expr", title(panel)));
            out.push(Query {
                place: title(panel).to_owned(),
                record: format!("dashboard:panel_{id}:{ref_id}"),
                expr: expr.to_owned(),
            });
        }
    }
    out
}

/// The value each variable a query may use (`$name`) is given: Grafana's built-ins, and the
/// dashboard's own variables, a query or custom one as a regex alternation, the way Grafana
/// writes a multi-value or "All" selection into a `=~` matcher. The data source variable is
/// `None`: it chooses the data source and is no value in a query.
fn variable_values() -> BTreeMap<String, Option<String>> {
    let mut values: BTreeMap<String, Option<String>> = GRAFANA_BUILTINS
        .iter()
        .map(|(k, v)| (k.to_string(), Some(v.to_string())))
        .collect();
    for var in variables() {
        let name = var["name"].as_str().expect("a variable has a name");
        let value = match var["type"].as_str().unwrap_or("") {
            "datasource" => None,
            "query" | "custom" => Some(format!("({name}-example-1|{name}-example-2)")),
            "interval" => Some("5m".to_owned()),
            "constant" | "textbox" => var["query"].as_str().map(str::to_owned),
            other => panic!("variable ${name}: a type this test does not know: {other}"),
        };
        values.insert(name.to_owned(), value);
    }
    values
}

/// `expr` with Grafana's variables (`$name`, `${name}`, `${name:format}`, `[[name]]`) replaced
/// by their values; an error names a variable that is neither Grafana's nor the dashboard's.
fn substitute(expr: &str, values: &BTreeMap<String, Option<String>>) -> Result<String, String> {
    let mut out = String::with_capacity(expr.len());
    let mut rest = expr;
    while let Some(i) = rest.find(['$', '[']) {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        let (name, len) = if let Some(body) = tail.strip_prefix("${") {
            let end = body
                .find('}')
                .ok_or_else(|| format!("unclosed ${{ in {expr}"))?;
            (body[..end].split(':').next().unwrap_or(""), end + 3)
        } else if let Some(body) = tail.strip_prefix("[[") {
            let end = body
                .find("]]")
                .ok_or_else(|| format!("unclosed [[ in {expr}"))?;
            (body[..end].split(':').next().unwrap_or(""), end + 4)
        } else if let Some(body) = tail.strip_prefix('$') {
            let end = body
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(body.len());
            (&body[..end], end + 1)
        } else {
            ("", 1)
        };
        // A lone `$` or `[`, or label_replace's `$1`: not a variable, and Grafana leaves
        // such text alone.
        if name.is_empty() || name.chars().all(|c| c.is_ascii_digit()) {
            out.push_str(&tail[..len]);
            rest = &tail[len..];
            continue;
        }
        match values.get(name) {
            Some(Some(v)) => out.push_str(v),
            Some(None) => return Err(format!("${name} chooses the data source; it is no value")),
            None => {
                return Err(format!(
                    "${name} is neither one of Grafana's built-in variables nor the dashboard's"
                ));
            }
        }
        rest = &tail[len..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The index after the `close` that ends what opens at `open`, strings inside skipped.
fn after_closing(b: &[u8], open: usize, close: u8) -> usize {
    let mut i = open + 1;
    while i < b.len() {
        match b[i] {
            b'"' | b'\'' | b'`' => i = after_string(b, i),
            c if c == close => return i + 1,
            _ => i += 1,
        }
    }
    b.len()
}

/// The index after the string literal that starts at `start`.
fn after_string(b: &[u8], start: usize) -> usize {
    let quote = b[start];
    let mut i = start + 1;
    while i < b.len() {
        if b[i] == b'\\' && quote != b'`' {
            i += 2;
        } else if b[i] == quote {
            return i + 1;
        } else {
            i += 1;
        }
    }
    b.len()
}

/// The metric names a PromQL expression selects: its identifiers that are not a function, a
/// keyword, an aggregation or a label name (labels stand in `{...}` and in the lists after
/// `by`, `without`, `on`, `ignoring`, `group_left` and `group_right`).
fn selected_metrics(expr: &str) -> BTreeSet<String> {
    const GROUPING: [&str; 6] = [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    const KEYWORDS: [&str; 22] = [
        "and",
        "or",
        "unless",
        "atan2",
        "bool",
        "offset",
        "inf",
        "nan",
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    ];
    let b = expr.as_bytes();
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'"' | b'\'' | b'`' => i = after_string(b, i),
            b'{' => i = after_closing(b, i, b'}'),
            b'[' => i = after_closing(b, i, b']'),
            b'#' => {
                i = b[i..]
                    .iter()
                    .position(|&c| c == b'\n')
                    .map_or(b.len(), |n| i + n)
            }
            // A number or a duration (`0.99`, `5m`, `1e3`): not a name.
            c if c.is_ascii_digit() || c == b'.' => {
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.' || b[i] == b'_')
                {
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == b'_' || c == b':' => {
                let start = i;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b':')
                {
                    i += 1;
                }
                let word = &expr[start..i];
                let next = b[i..].iter().position(|c| !c.is_ascii_whitespace());
                let opens = next.is_some_and(|n| b[i + n] == b'(');
                if GROUPING.contains(&word) && opens {
                    i = after_closing(b, i + next.unwrap_or(0), b')');
                } else if !KEYWORDS.contains(&word) && !opens {
                    names.insert(word.to_owned());
                }
            }
            _ => i += 1,
        }
    }
    names
}

/// The query reader and the variable filling on the forms the dashboard and the alerts use,
/// and on those that would fool a simpler reader.
#[test]
fn query_reader_and_variables_on_tricky_queries() {
    let expr = r#"histogram_quantile(0.99, sum by (le, route) (rate(a_bucket{x="b{c}", y=~'d\'e'}[5m])))
        / on (pod) group_left (node) b:recorded offset 1h > bool 1e3
        unless count without (code) (label_replace(c, "dst", "$1", "src", "(.*)")) # d_comment
        or sum(d_total @ 1609746000) and ignoring(job) topk(5, e)"#;
    let want: BTreeSet<String> = ["a_bucket", "b:recorded", "c", "d_total", "e"]
        .map(str::to_owned)
        .into();
    assert_eq!(selected_metrics(expr), want);

    let values = variable_values();
    assert_eq!(
        substitute(
            r#"rate(x{pod=~"$pod", ns="${namespace:regex}"}[$__rate_interval])"#,
            &values
        )
        .as_deref(),
        Ok(
            r#"rate(x{pod=~"(pod-example-1|pod-example-2)", ns="(namespace-example-1|namespace-example-2)"}[5m])"#
        )
    );
    assert_eq!(
        substitute(
            r#"label_replace(x, "a", "$1", "b", "(.*)")[[__range]]"#,
            &values
        )
        .as_deref(),
        Ok(r#"label_replace(x, "a", "$1", "b", "(.*)")1h"#)
    );
    assert!(substitute("rate(x[$window])", &values).is_err());
    assert!(substitute("x{ds=\"$datasource\"}", &values).is_err());
}

#[test]
fn dashboard_ships_as_a_configmap_for_grafanas_sidecar() {
    let found: Vec<&Value> = documents()
        .iter()
        .filter(|d| kind_of(d) == "ConfigMap" && d["metadata"]["name"] == DASHBOARD_CONFIGMAP)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one ConfigMap named {DASHBOARD_CONFIGMAP}, with no hash suffix"
    );
    let cm = found[0];
    assert_eq!(cm["metadata"]["namespace"], NAMESPACE);
    assert_eq!(
        cm["metadata"]["labels"][SIDECAR_LABEL.0], SIDECAR_LABEL.1,
        "the label Grafana's dashboard sidecar looks for"
    );
    let data = cm["data"].as_object().expect("the ConfigMap has data");
    assert_eq!(data.len(), 1, "one file: {:?}", data.keys());
    let (file, text) = data.iter().next().unwrap();
    assert!(
        file.ends_with(".json"),
        "the sidecar loads files ending in .json: {file}"
    );
    assert_eq!(
        text.as_str(),
        Some(&dashboard_text()[..]),
        "the ConfigMap carries dashboard.json unchanged"
    );
}

/// What makes the dashboard work wherever it is imported, and its documentation.
#[test]
fn dashboard_follows_its_variables_and_is_documented() {
    let d = dashboard();
    assert!(
        d["uid"].as_str().is_some_and(|u| !u.is_empty()),
        "a fixed uid: importing it again replaces it"
    );
    let kinds: BTreeMap<&str, &str> = variables()
        .iter()
        .map(|v| (v["name"].as_str().unwrap(), v["type"].as_str().unwrap()))
        .collect();
    assert_eq!(kinds.get("datasource"), Some(&"datasource"), "{kinds:?}");
    for name in ["namespace", "pod", "gateway"] {
        assert_eq!(kinds.get(name), Some(&"query"), "${name}: {kinds:?}");
    }
    for var in variables().iter().filter(|v| v["type"] == "query") {
        assert_eq!(
            var["datasource"]["uid"], DATASOURCE,
            "variable {}",
            var["name"]
        );
    }

    let panels = panels();
    let mut ids = BTreeSet::new();
    let mut titles = BTreeSet::new();
    for p in &panels {
        let t = title(p);
        assert!(
            ids.insert(p["id"].as_u64()),
            "panel \"{t}\": its id is taken"
        );
        assert!(titles.insert(t), "two panels are titled \"{t}\"");
        assert_eq!(p["datasource"]["uid"], DATASOURCE, "panel \"{t}\"");
        let targets = p["targets"].as_array().map_or(&[][..], Vec::as_slice);
        assert!(!targets.is_empty(), "panel \"{t}\" has no query");
        for target in targets {
            assert_eq!(target["datasource"]["uid"], DATASOURCE, "panel \"{t}\"");
            let expr = target["expr"].as_str().unwrap_or("");
            // $__rate_interval, not $__interval or a fixed window: at least four scrapes.
            if expr.contains("rate(") || expr.contains("increase(") {
                assert!(
                    expr.contains("[$__rate_interval]"),
                    "panel \"{t}\": a rate over [$__rate_interval]: {expr}"
                );
            }
            // Every series is narrowed to the chosen pods, the gateway's metrics to the chosen
            // gateways and every other to the chosen agents: each selector of each metric.
            let name_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
            for metric in selected_metrics(expr) {
                let pods = if metric.starts_with(GATEWAY_METRICS) {
                    "pod=~\"$gateway\""
                } else {
                    "pod=~\"$pod\""
                };
                for (at, _) in expr.match_indices(&metric) {
                    let after = &expr[at + metric.len()..];
                    if expr[..at].chars().next_back().is_some_and(name_char)
                        || after.chars().next().is_some_and(name_char)
                    {
                        continue;
                    }
                    let matchers = after
                        .strip_prefix('{')
                        .and_then(|m| m.split_once('}'))
                        .map(|(m, _)| m)
                        .unwrap_or_else(|| {
                            panic!("panel \"{t}\": {metric} without label matchers: {expr}")
                        });
                    assert!(
                        matchers.contains("namespace=~\"$namespace\"") && matchers.contains(pods),
                        "panel \"{t}\": {metric} is not narrowed to $namespace and {pods}: {expr}"
                    );
                }
            }
        }
    }
    assert!(panels.len() >= 10, "{} panels", panels.len());

    let doc = std::fs::read_to_string(repo().join("docs/operations.md")).unwrap();
    let section = doc
        .split("\n### Dashboard\n")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("docs/operations.md has a \"### Dashboard\" section");
    for t in titles {
        assert!(
            section.contains(&format!("**{t}**")),
            "the Dashboard section of docs/operations.md does not explain the panel **{t}**"
        );
    }
}

#[test]
fn dashboard_queries_parse_with_promtool() {
    let values = variable_values();
    let queries = queries();
    let mut groups: Vec<(String, Vec<Value>)> = Vec::new();
    let mut unknown = Vec::new();
    for q in &queries {
        match substitute(&q.expr, &values) {
            Ok(expr) => {
                let rule = json!({ "record": q.record, "expr": expr });
                match groups.iter_mut().find(|(place, _)| *place == q.place) {
                    Some((_, rules)) => rules.push(rule),
                    None => groups.push((q.place.clone(), vec![rule])),
                }
            }
            Err(e) => unknown.push(format!("{}: {e}", q.place)),
        }
    }
    assert!(unknown.is_empty(), "dashboard queries: {unknown:#?}");

    // One rule group per panel, named by its title: promtool's error names the group.
    let file = json!({
        "groups": groups
            .iter()
            .map(|(place, rules)| json!({ "name": place, "rules": rules }))
            .collect::<Vec<_>>()
    });
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("dashboard-queries.yaml"), file.to_string()).unwrap();
    let out = promtool(&["check", "rules", "dashboard-queries.yaml"], dir.path());
    let report = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        out.status.success(),
        "a dashboard query is not PromQL (the group is the panel's title):\n{report}"
    );
    assert!(
        report.contains(&format!("SUCCESS: {} rules found", queries.len())),
        "promtool checked every query of the dashboard ({}):\n{report}",
        queries.len()
    );
}

/// The metric families of a `/metrics` answer with their types (from the `# TYPE` lines: a
/// family with no sample yet, e.g. requests of a route never asked, is still declared).
fn families(exposition: &str) -> BTreeMap<String, String> {
    exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            Some((words.next()?.to_owned(), words.next()?.to_owned()))
        })
        .collect()
}

/// Whether `name` is in a `/metrics` answer: a family, or the `_bucket`, `_sum` or `_count`
/// series of a histogram (`_sum` and `_count` of a summary).
fn exposes(live: &BTreeMap<String, String>, name: &str) -> bool {
    const SERIES: [(&str, &[&str]); 3] = [
        ("_bucket", &["histogram"]),
        ("_sum", &["histogram", "summary"]),
        ("_count", &["histogram", "summary"]),
    ];
    live.contains_key(name)
        || SERIES.iter().any(|(suffix, kinds)| {
            name.strip_suffix(suffix)
                .and_then(|family| live.get(family))
                .is_some_and(|kind| kinds.contains(&kind.as_str()))
        })
}

/// The families of a live agent's `/metrics` and of a live gateway's, read once.
fn live() -> &'static (BTreeMap<String, String>, BTreeMap<String, String>) {
    static L: OnceLock<(BTreeMap<String, String>, BTreeMap<String, String>)> = OnceLock::new();
    L.get_or_init(|| (live_families(), live_gateway_families()))
}

/// The families of a live agent's `/metrics`, which `promtool check metrics` finds valid
/// (written by hand, a malformed series would only show as a failed scrape). The agent runs
/// with the Kubernetes pod watch on (against the fake API server), so the watch's own gauge is
/// there too.
fn live_families() -> BTreeMap<String, String> {
    let api = FakeApi::start();
    let node = Node::new();
    let kubeconfig = api.write_kubeconfig(node.tmp.path());
    let mut cmd = AgentProc::command(&node, &["--kubernetes", "true", "--node-name", "node-a"]);
    cmd.env("KUBECONFIG", kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST");
    let agent = AgentProc::spawn(cmd);
    let reply = http_get(&agent.http_addr(), "/metrics", &[]);
    assert_eq!(reply.status, 200);
    let check = promtool_fed(&["check", "metrics"], node.tmp.path(), &reply.body);
    assert!(
        check.status.success(),
        "promtool check metrics on a live agent's /metrics:\n{}{}",
        text(&check.stdout),
        text(&check.stderr)
    );
    let live = families(&String::from_utf8(reply.body).unwrap());
    assert!(agent.terminate().success());
    live
}

/// The families of a live gateway's `/metrics`: routing to the agents (against the fake API
/// server), so the routing table's gauges are declared; no archive, no overlord. Families with
/// labels (requests, latency, upstream errors) are declared before their first sample.
fn live_gateway_families() -> BTreeMap<String, String> {
    let api = FakeApi::start();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.write_kubeconfig(dir.path());
    let gw = gateway_with(
        &format!("authorize = \"none\"\nkubernetes = true\nagent_namespace = \"{NAMESPACE}\"\n"),
        |cmd| {
            cmd.env("KUBECONFIG", &kubeconfig)
                .env_remove("KUBERNETES_SERVICE_HOST");
        },
    );
    let reply = http_get(&gw.addr, "/metrics", &[]);
    assert_eq!(reply.status, 200);
    families(&String::from_utf8(reply.body).unwrap())
}

#[test]
fn every_metric_the_alerts_dashboard_and_guide_name_is_in_a_live_agents_or_gateways_metrics() {
    // Where each name is used, so a failure says which alert, panel or page to fix.
    let mut uses: Vec<(String, BTreeSet<String>)> = Vec::new();

    let mut alerts_use = BTreeSet::new();
    for rule in alerts() {
        let expr = rule["expr"].as_str().unwrap();
        let mut names = selected_metrics(expr);
        // The one metric not the agent's or the gateway's own: Prometheus's `up` of a
        // PodMonitor's job.
        if names.remove("up") {
            assert!(
                [JOB, GATEWAY_JOB]
                    .iter()
                    .any(|job| expr.contains(&format!("up{{job=\"{job}\"}}"))),
                "{expr}"
            );
        }
        // A cross-check of the query reader: it finds every name the plain text scan finds.
        let scanned = metric_names(expr);
        assert!(scanned.is_subset(&names), "{scanned:?} {names:?} in {expr}");
        alerts_use.extend(names.iter().cloned());
        uses.push((
            format!("prometheusrule.yaml, alert {}", rule["alert"]),
            names,
        ));
    }
    assert!(
        alerts_use.len() >= 8,
        "the alerts use the agent's metrics: {alerts_use:?}"
    );
    assert!(
        alerts_use.iter().any(|n| n.starts_with(GATEWAY_METRICS)),
        "the alerts use the gateway's metrics: {alerts_use:?}"
    );

    // The dashboard's queries, and the metrics its titles and descriptions name.
    let values = variable_values();
    for q in queries() {
        let expr = substitute(&q.expr, &values).unwrap_or_else(|e| panic!("{}: {e}", q.place));
        let names = selected_metrics(&expr);
        assert!(!names.is_empty(), "{}: no metric in {}", q.place, q.expr);
        uses.push((format!("dashboard.json, {:?}", q.place), names));
    }
    let text = dashboard_text();
    let mut described = metric_names(&text);
    described.extend(names_with_prefix(&text, "process_"));
    described.extend(names_with_prefix(&text, GATEWAY_METRICS));
    uses.push(("dashboard.json, its text".to_owned(), described));

    let doc = std::fs::read_to_string(repo().join("docs/operations.md")).unwrap();
    let mut guide = metric_names(&doc);
    guide.extend(names_with_prefix(&doc, "process_"));
    guide.extend(names_with_prefix(&doc, GATEWAY_METRICS));
    assert!(guide.len() >= 30, "{guide:?}");
    uses.push(("docs/operations.md".to_owned(), guide));

    // The gateway's own metrics in the gateway's /metrics, the others in the agent's.
    let (agent, gateway) = live();
    let missing: Vec<String> = uses
        .iter()
        .filter_map(|(place, names)| {
            let gone: Vec<&String> = names
                .iter()
                .filter(|n| {
                    let live = if n.starts_with(GATEWAY_METRICS) {
                        gateway
                    } else {
                        agent
                    };
                    !exposes(live, n)
                })
                .collect();
            (!gone.is_empty()).then(|| format!("{place}: {gone:?}"))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "metrics a live agent (or, for {GATEWAY_METRICS}*, a live gateway) does not expose:\n{}\n\
         (agent: {:?})\n(gateway: {:?})",
        missing.join("\n"),
        agent.keys().collect::<Vec<_>>(),
        gateway.keys().collect::<Vec<_>>()
    );
}

/// The gateway is the same binary and shares some metrics with the agents (`process_*`, the
/// build info): `$pod` lists the pods by a metric only agents have, so that a scraped gateway
/// is not counted as an agent, and `$gateway` by one only gateways have. A panel shows agents
/// or gateways, never both: its queries use `$pod` or `$gateway`, not the two.
#[test]
fn dashboard_variables_list_agents_and_gateways_apart() {
    let (agent, gateway) = live();
    let values = variable_values();
    // Each pod variable: whose pods it lists, and the other's variable.
    let pod_variables = [
        ("pod", agent, gateway, "gateway"),
        ("gateway", gateway, agent, "pod"),
    ];
    for (var, own, other, other_var) in pod_variables {
        let place = format!("variable ${var}");
        let found: Vec<Query> = queries().into_iter().filter(|q| q.place == place).collect();
        assert_eq!(found.len(), 1, "the dashboard has one {place}");
        let q = &found[0];
        assert!(
            !q.expr.contains(&format!("${other_var}")),
            "{place} depends on ${other_var}: {}",
            q.expr
        );
        let expr = substitute(&q.expr, &values).unwrap_or_else(|e| panic!("{place}: {e}"));
        let names = selected_metrics(&expr);
        assert!(!names.is_empty(), "{place}: no metric in {expr}");
        for name in names {
            assert!(
                exposes(own, &name),
                "{place}: {name} is not in the /metrics of the pods it lists"
            );
            assert!(
                !exposes(other, &name),
                "{place}: {name} is in the other workload's /metrics too (the ${other_var} pods)"
            );
        }
    }
    let mut panels: BTreeMap<String, BTreeSet<&str>> = BTreeMap::new();
    for q in queries()
        .into_iter()
        .filter(|q| !q.place.starts_with("variable $"))
    {
        let used = panels.entry(q.place).or_default();
        used.extend(
            ["$pod", "$gateway"]
                .into_iter()
                .filter(|v| q.expr.contains(v)),
        );
    }
    for (panel, used) in panels {
        assert!(
            used.len() < 2,
            "panel \"{panel}\" mixes agents and gateways: {used:?}"
        );
    }
}
