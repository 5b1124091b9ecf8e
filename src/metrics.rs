//! Counters every stage adds to; read by the agent's logs now and by `/metrics` later.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

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
