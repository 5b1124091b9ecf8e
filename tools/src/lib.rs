//! What the benchmark commands share: the clients, the percentiles and the readings of /proc
//! that `bench` (the agent) and `gwbench` (the gateway against the agent) report.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use druid_log_agent::loadgen::{LineGen, PeonWriter};
use druid_log_agent_testkit::http;

/// How fast this machine, as it is now, runs the agent's main cost: gzip level 1 of
/// Druid-style text (64 MiB of the bench's plain lines, three passes, one thread), in MiB of
/// text per second, the median pass. Two machines of the same kind, or one machine on two
/// days, have differed by a factor of two in CPU-s/GiB on the same code; a figure quoted with
/// this one beside it can be compared with another only when the two calibrations agree.
pub fn gzip1_mib_s() -> f64 {
    deflate_passes(&LineGen::new(7).text(64 << 20)).0
}

/// What gzip level 1 alone costs on `text`, as (deflate, inflate) in MiB of text per second,
/// the median of three passes on one thread, one stream each. The agent compresses text like
/// it into its spool and, for a plain-text archive, inflates it once more: these two speeds
/// are the floor under its CPU-s/GiB on such text, whatever else it does. The inflate speed
/// is NaN if the round trip did not give the text back.
pub fn gzip1_speeds(text: &[u8]) -> (f64, f64) {
    use std::io::Read;
    let (deflate, packed) = deflate_passes(text);
    let mut out = Vec::with_capacity(text.len());
    let mut inflate: Vec<f64> = (0..3)
        .map(|_| {
            out.clear();
            let started = Instant::now();
            // Our own output read back from memory: cannot fail.
            let _ = flate2::read::GzDecoder::new(packed.as_slice()).read_to_end(&mut out);
            mib_s(text, started)
        })
        .collect();
    // A round trip that does not give the text back measured nothing: say so, not a speed.
    let inflate = if out == text {
        pct(&mut inflate, 0.5)
    } else {
        f64::NAN
    };
    (deflate, inflate)
}

/// Three gzip level 1 passes over `text`: the median speed, and the gzip stream.
fn deflate_passes(text: &[u8]) -> (f64, Vec<u8>) {
    use std::io::Write;
    // One output buffer for all passes, as large as the text: the passes after the first
    // write into pages that exist, as the inflate passes do.
    let mut packed = Vec::with_capacity(text.len());
    let mut passes: Vec<f64> = (0..3)
        .map(|_| {
            packed.clear();
            let started = Instant::now();
            let mut gz = flate2::write::GzEncoder::new(&mut packed, flate2::Compression::fast());
            // A Vec sink cannot fail.
            let _ = gz.write_all(text).and_then(|_| gz.try_finish());
            drop(gz);
            mib_s(text, started)
        })
        .collect();
    (pct(&mut passes, 0.5), packed)
}

/// What writing into the page cache costs on this machine as it is now, in MiB/s on one
/// thread: 64 MiB written in 1 MiB writes to a new file in `dir` (pages the kernel must
/// allocate, and on ext4 blocks it must reserve), then the same bytes over it again (pages
/// that exist). The agent writes every spool block and every directory archive into new
/// pages. On a virtual machine whose host takes back the guest's free memory (a balloon with
/// free page reporting), a new page can cost ten times an existing one, depending on what the
/// guest freed in the seconds before: a record of the machine's state beside a run's figures,
/// not a correction to them. The 64 MiB it frees again may make the agent's first writes a
/// little cheaper. NaN for a write that failed.
pub fn page_write_speeds(dir: &std::path::Path) -> (f64, f64) {
    use std::io::{Seek, Write};
    let chunk = vec![b'x'; 1 << 20];
    let path = dir.join(format!(".page-write-{}", std::process::id()));
    let pass = |f: &mut std::fs::File| -> std::io::Result<f64> {
        f.rewind()?;
        let started = Instant::now();
        for _ in 0..64 {
            f.write_all(&chunk)?;
        }
        Ok(64.0 / started.elapsed().as_secs_f64())
    };
    let speeds =
        std::fs::File::create_new(&path).and_then(|mut f| Ok((pass(&mut f)?, pass(&mut f)?)));
    let _ = std::fs::remove_file(&path);
    speeds.unwrap_or((f64::NAN, f64::NAN))
}

fn mib_s(text: &[u8], started: Instant) -> f64 {
    text.len() as f64 / (1 << 20) as f64 / started.elapsed().as_secs_f64()
}

/// The machine's 1, 5 and 15 minute load averages: a figure is only worth quoting with the
/// load it was measured under.
pub fn loadavg() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut it = text
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(f64::NAN));
    [(); 3].map(|_| it.next().unwrap_or(f64::NAN))
}

/// The time of a run in UTC, for the record a figure is quoted with.
pub fn now_utc() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// When a paced client's requests are due: `rate` a second, client `i` of `n` offset so that
/// the clients do not all send at once.
pub struct Pace {
    period: Option<Duration>,
    next: Instant,
}

impl Pace {
    pub fn new(rate: f64, i: usize, n: usize) -> Pace {
        let period = (rate > 0.0).then(|| Duration::from_secs_f64(1.0 / rate));
        let offset = period.map_or(Duration::ZERO, |p| p.mul_f64(i as f64 / n.max(1) as f64));
        Pace {
            period,
            next: Instant::now() + offset,
        }
    }

    /// The time the next request is due (and moves on), or `None` when not paced.
    pub fn due(&mut self) -> Option<Instant> {
        let p = self.period?;
        let due = self.next;
        self.next += p;
        Some(due)
    }

    /// Sleeps until the next request is due; returns when it was due (now, if not paced).
    pub fn wait(&mut self) -> Instant {
        match self.due() {
            Some(due) => {
                if let Some(d) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(d);
                }
                due
            }
            None => Instant::now(),
        }
    }
}

/// `n` clients as tasks of one single-threaded event loop, each on a kept-alive connection,
/// client `i` asking for `targets[i % len]` (a path and query) `rate` times a second (0: as
/// soon as answered), until `stop`; returns the latencies of the successful requests in ms.
/// One thread for all: on a small machine, a thread per client competes with the server for
/// the cores and counts its wait for a core as latency.
pub fn async_snapshot_clients(
    addr: &str,
    targets: &[String],
    n: usize,
    rate: f64,
    stop: &Arc<AtomicBool>,
) -> Vec<f64> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("client runtime");
    rt.block_on(async {
        let mut handles = Vec::new();
        for i in 0..n {
            let (addr, stop) = (addr.to_owned(), stop.clone());
            let target = targets[i % targets.len()].clone();
            let mut pace = Pace::new(rate, i, n);
            handles.push(tokio::spawn(async move {
                let req = format!("GET {target} HTTP/1.1\r\nHost: b\r\n\r\n");
                let mut lat = Vec::new();
                let mut conn: Option<tokio::net::TcpStream> = None;
                let mut buf = Vec::with_capacity(16 << 10);
                while !stop.load(Ordering::Relaxed) {
                    let s = match &conn {
                        Some(s) => s,
                        None => {
                            let s = tokio::net::TcpStream::connect(&addr)
                                .await
                                .expect("connect to agent");
                            let _ = s.set_nodelay(true);
                            conn.insert(s)
                        }
                    };
                    let t = match pace.due() {
                        Some(due) => {
                            tokio::time::sleep_until(due.into()).await;
                            due
                        }
                        None => Instant::now(),
                    };
                    let mut sent = 0;
                    let mut ok = true;
                    while sent < req.len() {
                        if s.writable().await.is_err() {
                            ok = false;
                            break;
                        }
                        match s.try_write(&req.as_bytes()[sent..]) {
                            Ok(k) => sent += k,
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                            Err(_) => {
                                ok = false;
                                break;
                            }
                        }
                    }
                    buf.clear();
                    let mut done = None;
                    while ok && done.is_none() {
                        if s.readable().await.is_err() {
                            break;
                        }
                        let at = buf.len();
                        buf.resize(at + (16 << 10), 0);
                        match s.try_read(&mut buf[at..]) {
                            Ok(0) => ok = false,
                            Ok(k) => {
                                buf.truncate(at + k);
                                done = http::complete(&buf).map(|c| (c.status, c.end, c.close));
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                                buf.truncate(at)
                            }
                            Err(_) => ok = false,
                        }
                    }
                    match done {
                        Some((status, _, close)) => {
                            if status == 200 {
                                lat.push(ms(t.elapsed()));
                            }
                            if close {
                                conn = None;
                            }
                        }
                        None => conn = None,
                    }
                }
                lat
            }));
        }
        let mut all = Vec::new();
        for h in handles {
            all.extend(h.await.unwrap_or_default());
        }
        all
    })
}

/// A field of /proc/PID/status (or another `key: value` file of /proc/PID), in its unit (kB
/// for memory); 0 when absent.
pub fn proc_field(pid: u32, file: &str, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.trim().trim_end_matches("kB").trim().to_owned())
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// User + system CPU seconds of a process, from /proc/PID/stat.
pub fn cpu_seconds(pid: u32) -> f64 {
    let (user, system) = cpu_split(pid);
    user + system
}

/// User and system CPU seconds of a process (not of the machine), from /proc/PID/stat.
pub fn cpu_split(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let (_, user, system) = parse_stat(&stat).unwrap_or_default();
    let ticks = clock_ticks();
    (user as f64 / ticks, system as f64 / ticks)
}

/// User plus system CPU seconds of a process's threads, summed by thread name: where a phase's
/// CPU went (the agent's `ingest` thread against its `archive-append` writer, say). Threads
/// that already ended are missing; [`cpu_split`] still counts them.
pub fn cpu_by_thread(pid: u32) -> std::collections::BTreeMap<String, f64> {
    let ticks = clock_ticks();
    let mut by = std::collections::BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return by;
    };
    for t in tasks.flatten() {
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        if let Some((name, user, system)) = parse_stat(&stat) {
            *by.entry(name.to_owned()).or_insert(0.0) += (user + system) as f64 / ticks;
        }
    }
    by
}

/// The name, user and system clock ticks of a /proc `stat` line. The name is between the first
/// `(` and the last `)`, as it may hold either.
fn parse_stat(stat: &str) -> Option<(&str, u64, u64)> {
    let (head, after) = stat.rsplit_once(')')?;
    let name = head.split_once('(').map_or("?", |(_, n)| n);
    // Fields 14 and 15 of stat; after the ')' they are at index 11 and 12.
    let mut f = after.split_whitespace().skip(11);
    let mut next = || f.next().and_then(|x| x.parse().ok()).unwrap_or(0);
    Some((name, next(), next()))
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .unwrap_or(100.0)
}

/// The `p` quantile (0 to 1) of `v` by the nearest rank; sorts `v`.
pub fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// A duration in milliseconds, as every latency is reported.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Writes about `bytes` of generated Druid lines to `w`, dropping the writer's model copy
/// (the benchmarks compare counts, not bytes).
pub fn write_mib(w: &mut PeonWriter, g: &mut LineGen, bytes: u64) {
    let mut line = Vec::new();
    let target = w.expected.len() as u64 + bytes;
    while (w.expected.len() as u64) < target {
        g.next_line(&mut line);
        w.write_line("stdout", &line).expect("write log");
    }
    // The model copy is not needed here; keep memory flat.
    w.expected.clear();
    w.expected.shrink_to(0);
}

/// What the whole machine did over a phase, read from /proc before and after it: a latency
/// measured while the load generator and the agent share two cores means something only beside
/// how busy the cores were and how long runnable threads waited for one.
#[derive(Debug, Clone, Copy)]
pub struct MachineSample {
    at: Instant,
    /// Online CPUs, as /proc/stat counts them (its `cpu` line sums them all, whatever this
    /// process's affinity).
    cpus: usize,
    busy_ticks: u64,
    all_ticks: u64,
    cpu_wait_us: u64,
}

impl MachineSample {
    /// Reads /proc/stat (the first `cpu` line) and /proc/pressure/cpu (PSI, `some total=`);
    /// zeros where the kernel offers neither.
    pub fn now() -> MachineSample {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let ticks: Vec<u64> = stat
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("cpu "))
            .map(|l| {
                l.split_whitespace()
                    .filter_map(|v| v.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        // user nice system idle iowait irq softirq steal: idle and iowait are not busy.
        let all: u64 = ticks.iter().take(8).sum();
        let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
        let psi = std::fs::read_to_string("/proc/pressure/cpu").unwrap_or_default();
        MachineSample {
            at: Instant::now(),
            cpus: stat
                .lines()
                .filter(|l| {
                    l.strip_prefix("cpu")
                        .is_some_and(|r| r.starts_with(|c: char| c.is_ascii_digit()))
                })
                .count(),
            busy_ticks: all.saturating_sub(idle),
            all_ticks: all,
            cpu_wait_us: psi_some_total(&psi),
        }
    }

    /// From `self` to `later`: the cores busy on average, and the share of the time in which
    /// at least one runnable thread waited for a core (PSI's "some").
    pub fn since(&self, later: &MachineSample) -> serde_json::Value {
        let cpus = later.cpus;
        let secs = later.at.duration_since(self.at).as_secs_f64().max(1e-9);
        let all = later.all_ticks.saturating_sub(self.all_ticks).max(1) as f64;
        let busy = later.busy_ticks.saturating_sub(self.busy_ticks) as f64;
        let wait_s = later.cpu_wait_us.saturating_sub(self.cpu_wait_us) as f64 / 1e6;
        serde_json::json!({
            "seconds": secs,
            "busy_cores": busy / all * cpus as f64,
            "cpu_wait_pct": wait_s / secs * 100.0,
        })
    }
}

/// The `some total=` microseconds of /proc/pressure/cpu; 0 when absent.
fn psi_some_total(psi: &str) -> u64 {
    psi.lines()
        .find(|l| l.starts_with("some "))
        .and_then(|l| l.split_whitespace().find_map(|f| f.strip_prefix("total=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The cumulative buckets (`le` in seconds, count) of one histogram series in Prometheus text,
/// `+Inf` last: the agent's own view of a request, to set beside what a client measured.
pub fn histogram_buckets(metrics: &str, name: &str, labels: &str) -> Vec<(f64, u64)> {
    let prefix = format!("{name}_bucket{{{labels},le=\"");
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix(prefix.as_str()))
        .filter_map(|rest| {
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect()
}

/// The smallest bucket bound under which at least the `p` share of the requests counted
/// between two readings of a histogram ([`histogram_buckets`]) fell: an upper bound of the
/// `p` quantile, as exact as the buckets are; `None` without requests in between.
pub fn bucket_quantile(before: &[(f64, u64)], after: &[(f64, u64)], p: f64) -> Option<f64> {
    // A failed reading (an empty answer) must not pass for "no requests before".
    if before.len() != after.len() {
        return None;
    }
    // Both readings list the same bounds in the same order (one histogram, one label set).
    let delta: Vec<(f64, u64)> = after
        .iter()
        .zip(before)
        .map(|(&(le, n), &(_, was))| (le, n.saturating_sub(was)))
        .collect();
    let total = delta.last()?.1;
    if total == 0 {
        return None;
    }
    let need = (total as f64 * p).ceil() as u64;
    delta.iter().find(|&&(_, n)| n >= need).map(|&(le, _)| le)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A thread name may hold a space and a `)`: the fields are counted from the last one.
    #[test]
    fn stat_lines_give_name_and_ticks() {
        let line = "42 (odd) name) S 1 2 3 4 5 6 7 8 9 10 70 30 0 0 20\n";
        assert_eq!(parse_stat(line), Some(("odd) name", 70, 30)));
        assert_eq!(parse_stat("garbage"), None);
    }

    /// The floor's inflate speed is only a speed when the round trip gave the text back.
    #[test]
    fn gzip1_speeds_are_of_a_round_trip() {
        let (deflate, inflate) = gzip1_speeds(&LineGen::varied(3).text(1 << 20));
        assert!(deflate.is_finite() && deflate > 0.0, "deflate {deflate}");
        assert!(inflate.is_finite() && inflate > 0.0, "inflate {inflate}");
    }

    /// Both speeds are measured, and the file is gone afterwards; a directory that cannot
    /// take the file gives no speed rather than a made-up one.
    #[test]
    fn page_write_speeds_leave_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let (fresh, cached) = page_write_speeds(dir.path());
        assert!(fresh.is_finite() && fresh > 0.0, "fresh {fresh}");
        assert!(cached.is_finite() && cached > 0.0, "cached {cached}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let (fresh, cached) = page_write_speeds(&dir.path().join("missing"));
        assert!(fresh.is_nan() && cached.is_nan());
    }

    #[test]
    fn bucket_quantile_reads_the_requests_between_two_readings() {
        let text = |a: u64, b: u64, c: u64| {
            format!(
                "x_bucket{{route=\"log\",le=\"0.001\"}} {a}\nx_bucket{{route=\"log\",le=\"0.01\"}} {b}\n\
                 x_bucket{{route=\"log\",le=\"+Inf\"}} {c}\nx_bucket{{route=\"other\",le=\"0.001\"}} 99\n"
            )
        };
        let before = histogram_buckets(&text(10, 10, 10), "x", "route=\"log\"");
        assert_eq!(before.len(), 3);
        // 100 new requests: 90 under 1 ms, 9 under 10 ms, 1 above.
        let after = histogram_buckets(&text(100, 109, 110), "x", "route=\"log\"");
        assert_eq!(bucket_quantile(&before, &after, 0.5), Some(0.001));
        assert_eq!(bucket_quantile(&before, &after, 0.99), Some(0.01));
        assert_eq!(bucket_quantile(&before, &after, 1.0), Some(f64::INFINITY));
        assert_eq!(bucket_quantile(&after, &after, 0.5), None);
        assert_eq!(bucket_quantile(&[], &after, 0.5), None, "no first reading");
    }

    #[test]
    fn psi_total_is_read_from_the_some_line() {
        let psi = "some avg10=1.00 avg60=0.50 avg300=0.10 total=123456\n\
                   full avg10=0.00 avg60=0.00 avg300=0.00 total=7\n";
        assert_eq!(psi_some_total(psi), 123456);
        assert_eq!(psi_some_total(""), 0);
    }
}
