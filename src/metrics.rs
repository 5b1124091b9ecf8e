//! Counters and histograms every stage adds to, read by `/metrics` (`serve/metrics.rs`).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

macro_rules! counters {
    ($($name:ident: $doc:literal),* $(,)?) => {
        /// Monotonic counters (Prometheus `_total` semantics), and the archive's histograms.
        #[derive(Debug)]
        pub struct Metrics {
            $(#[doc = $doc] pub $name: AtomicU64,)*
            /// How long the archive jobs that completed an archive took, from ingest handing
            /// the job to the worker to ingest recording its success: one attempt at S3's or
            /// the directory's speed, with the wait for a free worker slot.
            pub archive_duration: Histogram<{ ARCHIVE_BUCKETS.len() }>,
            /// From a task's log end to its archive being complete: what a user waits for
            /// after a task ends before Druid reads its log from the archive (the end's
            /// commit, failed attempts and their backoff included). Tasks that ended before the
            /// agent's last restart are not observed: their end time is not checkpointed.
            pub archive_delay: Histogram<{ ARCHIVE_BUCKETS.len() }>,
        }

        impl Default for Metrics {
            fn default() -> Self {
                Metrics {
                    $($name: AtomicU64::new(0),)*
                    archive_duration: Histogram::new(&ARCHIVE_BUCKETS),
                    archive_delay: Histogram::new(&ARCHIVE_BUCKETS),
                }
            }
        }

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
    dir_archives_renamed: "Directory archives made by renaming the file written as the task ran (no inflate of the spool).",
    dir_archives_written: "Directory archives written whole from the spool: the task resumed after a restart, or its file written as it ran had a gap or failed.",
    rescans: "Full rescans of the log tree.",
    watch_errors: "inotify errors (queue overflow, watch limit); each triggers a rescan.",
    backpressure_pauses: "Times reading paused because the spools reached spool_max_bytes.",
    unmapped_tasks: "Peon logs archived under _unmapped/ because their task id could not be learned.",
}

/// Upper bounds, in seconds, of the HTTP latency histograms' buckets: from a tenth of a
/// millisecond (a snapshot served from the page cache takes 0.1 to 0.4 ms, a gateway hop adds
/// about 0.1, and buckets that start at 0.5 ms could not tell them apart) to seconds (an
/// upstream that is slow to answer). The last is the gateway's default first-byte timeout, so
/// an upstream that times out shows as 10 s in a quantile, not as the 2.5 s of the bucket below.
pub const HTTP_BUCKETS: [f64; 13] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5, 10.0,
];

/// Upper bounds, in seconds, of the archive histograms' buckets: from a small last part sent
/// to a nearby S3 (tens of milliseconds) to a whole large log written to a slow shared volume,
/// or retries backing off up to `archive_retry_max` (a minute by default), ten minutes at most.
pub const ARCHIVE_BUCKETS: [f64; 13] = [
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// A histogram of durations in Prometheus' cumulative form, updated without a lock: the
/// agent's and the gateway's HTTP sides observe every request with it, ingest every archive.
/// Its `N` bucket bounds are given at construction; the default `N` is the HTTP one's, so
/// `Histogram::default()` is an HTTP latency histogram.
#[derive(Debug)]
pub struct Histogram<const N: usize = { HTTP_BUCKETS.len() }> {
    /// Upper bounds in seconds, ascending.
    bounds: &'static [f64; N],
    /// Cumulative: each counts the observations at or under its bound.
    buckets: [AtomicU64; N],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram::new(&HTTP_BUCKETS)
    }
}

impl<const N: usize> Histogram<N> {
    /// An empty histogram with buckets up to each of `bounds` (seconds, ascending) and `+Inf`.
    pub const fn new(bounds: &'static [f64; N]) -> Self {
        Histogram {
            bounds,
            buckets: [const { AtomicU64::new(0) }; N],
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    /// Counts one observation of `d`.
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (b, c) in self.bounds.iter().zip(&self.buckets) {
            if s <= *b {
                c.fetch_add(1, Relaxed);
            }
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_micros.fetch_add(d.as_micros() as u64, Relaxed);
    }

    /// Writes the `_bucket`, `_sum` and `_count` samples of `name` with `labels` (already
    /// formatted, `a="x",b="y"`, or empty for none); the `# HELP`/`# TYPE` lines are the
    /// caller's.
    pub fn write(&self, out: &mut String, name: &str, labels: &str) {
        // `le` joins the other labels; with none, `_sum` and `_count` have no braces at all.
        let (before_le, own) = if labels.is_empty() {
            (String::new(), String::new())
        } else {
            (format!("{labels},"), format!("{{{labels}}}"))
        };
        for (b, c) in self.bounds.iter().zip(&self.buckets) {
            let _ = writeln!(
                out,
                "{name}_bucket{{{before_le}le=\"{b}\"}} {}",
                c.load(Relaxed)
            );
        }
        let count = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{before_le}le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum{own} {}",
            self.sum_micros.load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count{own} {count}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_bounds_ascend() {
        for bounds in [&HTTP_BUCKETS[..], &ARCHIVE_BUCKETS[..]] {
            assert!(bounds.windows(2).all(|w| w[0] < w[1]), "{bounds:?}");
        }
    }

    /// The bounds given decide the buckets; the counts are cumulative, and a histogram with no
    /// labels writes valid series (no `{,le=` and no empty braces).
    #[test]
    fn buckets_of_its_own_and_no_labels() {
        static BOUNDS: [f64; 2] = [1.0, 60.0];
        let h = Histogram::new(&BOUNDS);
        h.observe(Duration::from_millis(500));
        h.observe(Duration::from_secs(30));
        h.observe(Duration::from_secs(3600));
        let mut out = String::new();
        h.write(&mut out, "x_seconds", "");
        assert_eq!(
            out,
            "x_seconds_bucket{le=\"1\"} 1\n\
             x_seconds_bucket{le=\"60\"} 2\n\
             x_seconds_bucket{le=\"+Inf\"} 3\n\
             x_seconds_sum 3630.5\n\
             x_seconds_count 3\n"
        );
        let mut out = String::new();
        Histogram::default().write(&mut out, "y", "route=\"log\"");
        assert!(
            out.starts_with("y_bucket{route=\"log\",le=\"0.0001\"} 0\n"),
            "{out}"
        );
        assert!(
            out.ends_with("y_sum{route=\"log\"} 0\ny_count{route=\"log\"} 0\n"),
            "{out}"
        );
    }
}
