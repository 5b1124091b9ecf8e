//! Counters every stage adds to; read by the agent's logs now and by `/metrics` later.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

macro_rules! counters {
    ($($name:ident: $doc:literal),* $(,)?) => {
        /// Monotonic counters (Prometheus `_total` semantics).
        #[derive(Debug, Default)]
        pub struct Metrics { $(#[doc = $doc] pub $name: AtomicU64,)* }

        impl Metrics {
            /// `(name, help, value)` for every counter, for exposition and tests.
            pub fn snapshot(&self) -> Vec<(&'static str, &'static str, u64)> {
                vec![$((stringify!($name), $doc, self.$name.load(Relaxed)),)*]
            }
        }
    };
}

counters! {
    read_bytes: "Bytes read from container log files.",
    records: "Log records (CRI or json-file lines) decoded.",
    lines: "Complete log lines written to spools.",
    malformed_records: "Records in neither CRI nor json-file format, kept raw.",
    truncated_lines: "Lines cut at line_max_bytes.",
    truncated_bytes: "Bytes dropped from cut lines.",
    files_opened: "Log files opened.",
    files_closed: "Log files read to their end and closed.",
    file_truncations: "Log files that shrank under the reader (copytruncate); read again from 0.",
    unreadable_files: "Attempts to open a log file that failed.",
    recovered_sources: "Files in the checkpoint that were gzipped while the agent was down, read from their .gz.",
    lost_sources: "Files in the checkpoint that were gone at restart (rotated away or deleted while the agent was down).",
    blocks_sealed: "Spool blocks compressed and appended.",
    spool_errors: "Failed spool writes or syncs (e.g. a full disk); retried.",
    commits: "Checkpoints committed.",
    commit_errors: "Failed checkpoint commits; retried.",
    tasks_started: "Tasks whose log the agent began to spool.",
    tasks_ended: "Tasks whose log ended (pod gone, container finished or idle).",
    archives: "Logs archived.",
    upload_parts: "Multipart parts stored while tasks ran (S3).",
    upload_bytes: "Bytes stored in multipart parts while tasks ran (S3).",
    archive_errors: "Failed archive attempts; retried.",
    rescans: "Full rescans of the log tree.",
    watch_errors: "inotify errors (queue overflow, watch limit); each triggers a rescan.",
    backpressure_pauses: "Times reading paused because the spools reached spool_max_bytes.",
    unmapped_tasks: "Peon logs archived under _unmapped/ because their task id could not be learned.",
}

/// Upper bounds, in seconds, of the latency histograms' buckets: from half a millisecond
/// (a snapshot served from the page cache) to seconds (an upstream that is slow to answer).
const BUCKETS: [f64; 10] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5,
];

/// A latency histogram in Prometheus' cumulative form, updated without a lock: the agent's
/// and the gateway's HTTP sides observe every request with it.
#[derive(Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    /// Counts one observation of `d`.
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                self.buckets[i].fetch_add(1, Relaxed);
            }
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_micros.fetch_add(d.as_micros() as u64, Relaxed);
    }

    /// Writes the `_bucket`, `_sum` and `_count` samples of `name` with `labels` (already
    /// formatted, `a="x",b="y"`); the `# HELP`/`# TYPE` lines are the caller's.
    pub fn write(&self, out: &mut String, name: &str, labels: &str) {
        for (b, c) in BUCKETS.iter().zip(&self.buckets) {
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels},le=\"{b}\"}} {}",
                c.load(Relaxed)
            );
        }
        let count = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum{{{labels}}} {}",
            self.sum_micros.load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
    }
}
