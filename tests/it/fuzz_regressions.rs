//! Regression tests for what the fuzz targets (fuzz/) found, run through the real binary.

use crate::common;

use std::fs;
use std::time::Duration;

use common::{AgentProc, Node, http_get, wait_for_archive};

const LONG: Duration = Duration::from_secs(60);

/// fuzz/seeds/decode/oversized_unterminated_at_eof: a file whose last record is longer than a
/// read buffer and has no newline. Its line is ended when the file is drained, and that line
/// is counted like any other (`druid_log_agent_lines_total` was one short).
#[test]
fn unterminated_oversized_last_record_is_one_counted_line() {
    let node = Node::new();
    let task = "index-fuzz-unterminated";
    let dir = node.pod_dir(task).join("main");
    fs::create_dir_all(&dir).unwrap();
    let long = vec![b'x'; 300 << 10];
    let mut file = b"2024-05-01T00:00:00.000000001Z stdout F first line\n".to_vec();
    file.extend_from_slice(b"2024-05-01T00:00:00.000000002Z stdout F ");
    file.extend_from_slice(&long);
    fs::write(dir.join("0.log"), &file).unwrap();
    let agent = AgentProc::start(&node, &[]);
    let addr = agent.http_addr();
    // The pod is gone: the file cannot grow, so its last record is final.
    common::wait_for_bytes(&addr, task, 11 + long.len(), LONG);
    fs::remove_dir_all(node.pod_dir(task)).unwrap();
    let mut want = b"first line\n".to_vec();
    want.extend_from_slice(&long);
    want.push(b'\n');
    let got = wait_for_archive(&node.archived(task), want.len(), LONG);
    assert!(got == want, "archive differs: {} bytes", got.len());
    let metrics = String::from_utf8(http_get(&addr, "/metrics", &[]).body).unwrap();
    assert!(
        metrics.contains("\ndruid_log_agent_lines_total 2\n"),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("lines_total"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(agent.terminate().success());
}
