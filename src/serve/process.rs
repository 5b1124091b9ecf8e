//! The standard `process_*` metrics (as every Prometheus client library names them) and the
//! build info, so an operator's existing dashboards and alerts for CPU, memory and file
//! descriptors work on the agent unchanged.
//!
//! Read from procfs on each scrape: a handful of small in-memory files, cheaper than keeping
//! a collector thread. A figure that cannot be read (not Linux, a hardened /proc) is left out
//! rather than reported as zero.

use std::fmt::Write as _;

/// The kernel reports process times in clock ticks of `USER_HZ`, which is 100 on every
/// architecture Linux exports to user space (`sysconf(_SC_CLK_TCK)` answers the same).
const USER_HZ: f64 = 100.0;

/// Appends the process metrics and `druid_log_agent_build_info` to a `/metrics` answer (the
/// agent's and the gateway's).
pub fn write(out: &mut String) {
    let stat = std::fs::read_to_string("/proc/self/stat").ok();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .as_deref()
        .and_then(|s| s.rsplit_once(')'))
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // stat(5) numbers fields from 1; after the ')' field 3 (state) is index 0.
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    if let (Some(utime), Some(stime)) = (field(14), field(15)) {
        gauge_f(
            out,
            "process_cpu_seconds_total",
            "counter",
            "User and system CPU time spent, in seconds.",
            (utime + stime) as f64 / USER_HZ,
        );
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    };
    if let Some(rss) = kib("VmRSS:") {
        gauge(
            out,
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            rss * 1024,
        );
    }
    if let Some(vsz) = kib("VmSize:") {
        gauge(
            out,
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes.",
            vsz * 1024,
        );
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        gauge(
            out,
            "process_open_fds",
            "Open file descriptors.",
            dir.count() as u64,
        );
    }
    let max_fds = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            l.lines()
                .find_map(|l| l.strip_prefix("Max open files"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        });
    if let Some(max) = max_fds {
        gauge(
            out,
            "process_max_fds",
            "The soft limit of open file descriptors.",
            max,
        );
    }
    let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse::<u64>().ok())
    });
    if let (Some(boot), Some(start)) = (boot, field(22)) {
        gauge_f(
            out,
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since the Unix epoch, in seconds.",
            boot as f64 + start as f64 / USER_HZ,
        );
    }
    let _ = writeln!(
        out,
        "# HELP druid_log_agent_build_info The agent's version, as a label; always 1.\n\
         # TYPE druid_log_agent_build_info gauge\n\
         druid_log_agent_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
}

fn gauge(out: &mut String, name: &str, help: &str, v: u64) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
}

fn gauge_f(out: &mut String, name: &str, kind: &str, help: &str, v: f64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
    );
}
