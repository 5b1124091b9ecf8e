//! The short soak (about two minutes): 100 peons with rotation and task churn, container
//! restarts reported as a kubelet reports them (late, in either order with the files), the agent
//! SIGKILLed and SIGTERMed at random moments, S3 down and faulty, the Kubernetes API away as
//! connections reset, 503 answers and connections refused, some outages longer than the
//! agent's pending timeout, the state disk full (when root may mount a tmpfs), then a per-task
//! ledger of every byte.
//! The long version is the same command with a longer `--duration-secs` (docs/reliability.md).
//!
//! The soak's code is in the test rig (testkit/src/soak.rs), run here in this process: only a
//! test of this package knows the path of the agent binary this build made.

use std::ffi::OsStr;

use clap::Parser;
use druid_log_agent_testkit::soak;

#[test]
fn short_soak_loses_and_doubles_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("ledger.jsonl");
    let node = dir.path().join("node");
    let args = soak::Args::parse_from(
        [
            "soak",
            "--duration-secs",
            "90",
            "--writers",
            "100",
            "--rate-mib",
            "3",
            "--seed",
            "7",
            "--agent",
            env!("CARGO_BIN_EXE_druid-log-agent"),
        ]
        .map(OsStr::new)
        .into_iter()
        .chain([OsStr::new("--dir"), node.as_os_str()])
        .chain([OsStr::new("--ledger"), ledger.as_os_str()]),
    );
    let summary = soak::run(args).expect("run the soak");
    eprintln!("{summary:#}");
    if summary["ok"] != true {
        print_agent_lines_of_failed_tasks(&ledger, &node.join("agent.log"));
    }
    assert!(summary["ok"] == true, "soak failed: {summary}");
    // The run did what it says: faults happened and tasks were judged.
    for key in [
        "tasks_exact",
        "agent_sigkills",
        "agent_sigterms",
        "s3_outages",
        "kube_api_outages",
        "kube_api_outages_reset",
        "kube_api_outages_503",
        "kube_api_outages_refused",
        "kube_api_outages_longer_than_pending_timeout",
        "container_restarts",
        "crash_loop_back_offs",
        "rotations_while_agent_down",
        "snapshot_checks",
    ] {
        assert!(
            summary[key].as_u64().unwrap_or(0) > 0,
            "{key} is 0: {summary}"
        );
    }
    let rows = std::fs::read_to_string(&ledger).unwrap();
    assert_eq!(
        rows.lines().count() as u64,
        summary["tasks"].as_u64().unwrap()
    );
}

/// What the agents logged about each task the ledger did not find exact or exposed: the node's
/// directory goes with the test's temp dir, and a CI machine with it, so this is all there is
/// to diagnose a rare failure with.
fn print_agent_lines_of_failed_tasks(ledger: &std::path::Path, agent_log: &std::path::Path) {
    let rows = std::fs::read_to_string(ledger).unwrap_or_default();
    let failed: Vec<String> = rows
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["verdict"] != "exact" && r["exposed"] != true)
        .filter_map(|r| r["pod_dir"].as_str().map(str::to_owned))
        .collect();
    let log = std::fs::read_to_string(agent_log).unwrap_or_default();
    for pod_dir in failed {
        // The uid alone: the watch and the API name a pod by it, the engine by its directory.
        let uid = pod_dir.rsplit('_').next().unwrap_or(&pod_dir).to_owned();
        eprintln!("agent log lines about {pod_dir}, agent starts and stops, watch failures:");
        for line in log.lines().filter(|l| {
            [uid.as_str(), "agent started", "shutting down", "pod watch"]
                .iter()
                .any(|n| l.contains(n))
        }) {
            eprintln!("  {line}");
        }
    }
}
