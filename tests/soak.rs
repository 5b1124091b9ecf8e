//! The short soak (about two minutes): 100 peons with rotation and task churn, container
//! restarts reported as a kubelet reports them (late, in either order with the files), the agent
//! SIGKILLed and SIGTERMed at random moments, S3 down and faulty, the Kubernetes API away as
//! connections reset, 503 answers and connections refused, some outages longer than the
//! agent's pending timeout, the state disk full (when root may mount a tmpfs), then a per-task
//! ledger of every byte.
//! The long version is the same command with a longer `--duration-secs` (docs/reliability.md).

use std::process::Command;

#[test]
fn short_soak_loses_and_doubles_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("ledger.jsonl");
    let out = Command::new(env!("CARGO_BIN_EXE_soak"))
        .args([
            "--duration-secs",
            "90",
            "--writers",
            "100",
            "--rate-mib",
            "3",
        ])
        .args([
            "--seed",
            "7",
            "--agent",
            env!("CARGO_BIN_EXE_druid-log-agent"),
        ])
        .arg("--dir")
        .arg(dir.path().join("node"))
        .arg("--ledger")
        .arg(&ledger)
        .output()
        .expect("run the soak");
    let summary = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stderr}\n{summary}");
    assert!(out.status.success(), "soak failed: {summary}");
    let summary: serde_json::Value = serde_json::from_str(&summary).expect("summary JSON");
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
