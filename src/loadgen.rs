//! Synthetic peons: Druid-style log lines written the way a container runtime and the kubelet
//! write them (CRI records split at 16 KiB, rename rotation with gzip of older files, container
//! restarts). Used by the demo, the tests and the benchmarks, so they all exercise the same
//! realistic input. Every writer also keeps what `kubectl logs` would print, to compare with.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// containerd splits a line into `P` records of this many bytes.
pub const CRI_SPLIT: usize = 16 * 1024;

/// A small deterministic PRNG (xorshift*): the load must be reproducible from a seed, and a
/// dependency for this would be heavier than the ten lines.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// The same seed gives the same sequence; any seed is fine (0 included).
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next 64 pseudo-random bits; not for anything that must be unpredictable.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

const LEVELS: [&str; 4] = ["INFO", "INFO", "WARN", "DEBUG"];
const THREADS: [&str; 5] = [
    "task-runner-0-priority-0",
    "main",
    "[index_kafka_wikipedia]-appenderator-persist",
    "qtp1282811396-57",
    "KafkaSupervisor-wikipedia",
];
const CLASSES: [&str; 6] = [
    "org.apache.druid.indexing.seekablestream.SeekableStreamIndexTaskRunner",
    "org.apache.druid.segment.realtime.appenderator.StreamAppenderator",
    "org.apache.druid.indexing.common.task.IndexTask",
    "org.apache.druid.java.util.common.lifecycle.Lifecycle",
    "org.apache.druid.server.coordination.ChangeRequestHttpSyncer",
    "org.apache.kafka.clients.consumer.internals.ConsumerCoordinator",
];
const FRAMES: [&str; 6] = [
    "org.apache.druid.segment.realtime.appenderator.StreamAppenderator.persistAll(StreamAppenderator.java:745)",
    "org.apache.druid.indexing.seekablestream.SeekableStreamIndexTaskRunner.runInternal(SeekableStreamIndexTaskRunner.java:689)",
    "org.apache.druid.indexing.common.task.AbstractTask.run(AbstractTask.java:179)",
    "java.util.concurrent.FutureTask.run(FutureTask.java:264)",
    "java.util.concurrent.ThreadPoolExecutor.runWorker(ThreadPoolExecutor.java:1128)",
    "java.lang.Thread.run(Thread.java:829)",
];

/// Produces Druid peon log lines: mostly short log4j lines, sometimes a stack trace (one line
/// per frame, as Java prints it), sometimes a line longer than containerd's 16 KiB split.
#[derive(Debug, Clone)]
pub struct LineGen {
    rng: Rng,
    millis: u64,
    trace_left: u32,
    /// One line in this many is a long spec dump (0 = never).
    pub long_every: u64,
    /// Lines as varied as a real peon's (see [`LineGen::varied`]).
    varied: bool,
}

impl LineGen {
    /// The same seed gives the same lines, so a run (and a failure) can be repeated.
    pub fn new(seed: u64) -> LineGen {
        LineGen {
            rng: Rng::new(seed),
            millis: 0,
            trace_left: 0,
            long_every: 500,
            varied: false,
        }
    }

    /// Lines that compress about as well as a real peon's log (about 4x at gzip level 1, where
    /// [`LineGen::new`]'s compress 6x): besides the log4j lines, the metrics a peon's logging
    /// emitter writes as JSON, request logs with addresses and ids, and messages whose numbers,
    /// hashes and identifiers vary. Compression is most of the agent's cost, so a benchmark on
    /// easy text alone flatters it.
    pub fn varied(seed: u64) -> LineGen {
        LineGen {
            varied: true,
            ..LineGen::new(seed)
        }
    }

    /// At least `bytes` of this generator's lines, each ended by a newline: the decoded text
    /// a peon's log holds, for what compresses or uploads text rather than CRI records.
    pub fn text(&mut self, bytes: usize) -> Vec<u8> {
        let (mut out, mut line) = (Vec::with_capacity(bytes + 4096), Vec::new());
        while out.len() < bytes {
            self.next_line(&mut line);
            out.extend_from_slice(&line);
            out.push(b'\n');
        }
        out
    }

    /// Writes the next line, without its newline, into `out` (cleared first).
    pub fn next_line(&mut self, out: &mut Vec<u8>) {
        out.clear();
        if self.trace_left > 0 {
            self.trace_left -= 1;
            let f = FRAMES[self.rng.below(FRAMES.len() as u64) as usize];
            let _ = write!(out, "\tat {f}");
            return;
        }
        self.millis += 1 + self.rng.below(40);
        let (s, ms) = (self.millis / 1000, self.millis % 1000);
        let _ = write!(
            out,
            "2024-05-01T{:02}:{:02}:{:02},{ms:03} {} [{}] {} - ",
            (s / 3600) % 24,
            (s / 60) % 60,
            s % 60,
            LEVELS[self.rng.below(4) as usize],
            THREADS[self.rng.below(THREADS.len() as u64) as usize],
            CLASSES[self.rng.below(CLASSES.len() as u64) as usize],
        );
        let r = self.rng.below(1000);
        if self.varied && r >= 400 {
            self.varied_message(r, out);
        } else if self.long_every > 0 && self.rng.below(self.long_every) == 0 {
            let len = 17_000 + self.rng.below(30_000) as usize;
            out.extend_from_slice(
                b"Submitting task spec: {\"type\":\"index_kafka\",\"dataSchema\":",
            );
            while out.len() < len {
                let _ = write!(
                    out,
                    "{{\"name\":\"dim{}\",\"type\":\"string\"}},",
                    self.rng.below(100_000)
                );
            }
            out.push(b'}');
        } else if r < 8 {
            let _ = write!(
                out,
                "Exception while persisting segment wikipedia_2024-05-01T00:00:00.000Z_{}",
                self.rng.below(1 << 20)
            );
            self.trace_left = 8 + self.rng.below(30) as u32;
        } else {
            let _ = write!(
                out,
                "Persisted rows[{}] and bytes[{}] for segment[wikipedia_2024-05-01T{:02}:00:00.000Z_2024-05-01T{:02}:00:00.000Z_2024-05-01T00:00:00.000Z_{}] offset[{}]",
                self.rng.below(100_000),
                self.rng.below(50_000_000),
                s % 24,
                (s + 1) % 24,
                self.rng.below(16),
                self.rng.next_u64() >> 20,
            );
        }
    }
}

impl LineGen {
    /// The message of a [`LineGen::varied`] line; `r` (400 to 999) picks its kind.
    fn varied_message(&mut self, r: u64, out: &mut Vec<u8>) {
        let rng = &mut self.rng;
        if r < 700 {
            // The logging emitter's metrics, one JSON object per event, as a peon with
            // `druid.emitter=logging` writes them.
            let _ = write!(
                out,
                "{{\"feed\":\"metrics\",\"timestamp\":\"2024-05-01T{:02}:{:02}:{:02}.{:03}Z\",\"service\":\"druid/peon\",\"host\":\"10.{}.{}.{}:8100\",\"version\":\"31.0.0\",\"metric\":\"{}\",\"value\":{},\"dataSource\":\"{}\",\"taskId\":[\"index_kafka_{}_{:016x}\"],\"partition\":{}}}",
                rng.below(24),
                rng.below(60),
                rng.below(60),
                rng.below(1000),
                rng.below(256),
                rng.below(256),
                rng.below(256),
                METRICS[rng.below(METRICS.len() as u64) as usize],
                rng.below(10_000_000) as f64 / (1 + rng.below(1000)) as f64,
                DATASOURCES[rng.below(DATASOURCES.len() as u64) as usize],
                DATASOURCES[rng.below(DATASOURCES.len() as u64) as usize],
                rng.next_u64(),
                rng.below(64),
            );
        } else if r < 850 {
            let _ = write!(
                out,
                "Request[{:08x}-{:04x}-{:04x}-{:04x}-{:012x}] from 10.{}.{}.{}:{} for [/druid/worker/v1/chat/index_kafka_{}_{:016x}/{}] took {} ms, {} bytes",
                rng.next_u64() as u32,
                rng.below(1 << 16),
                rng.below(1 << 16),
                rng.below(1 << 16),
                rng.next_u64() >> 16,
                rng.below(256),
                rng.below(256),
                rng.below(256),
                1024 + rng.below(60_000),
                DATASOURCES[rng.below(DATASOURCES.len() as u64) as usize],
                rng.next_u64(),
                ["offsets/current", "rowStats", "status", "pause", "resume"][rng.below(5) as usize],
                rng.below(5000),
                rng.below(1 << 24),
            );
        } else {
            let _ = write!(
                out,
                "Segment[{}_2024-05-01T{:02}:00:00.000Z_2024-05-01T{:02}:00:00.000Z_2024-05-01T{:02}:{:02}:{:02}.{:03}Z_{}] pushed to deep storage at s3://druid-segments-{:x}/{}/{:x}/index.zip, size[{}], rows[{}], md5[{:016x}{:016x}]",
                DATASOURCES[rng.below(DATASOURCES.len() as u64) as usize],
                rng.below(24),
                rng.below(24),
                rng.below(24),
                rng.below(60),
                rng.below(60),
                rng.below(1000),
                rng.below(200),
                rng.below(1 << 20),
                DATASOURCES[rng.below(DATASOURCES.len() as u64) as usize],
                rng.next_u64(),
                rng.below(1 << 30),
                rng.below(10_000_000),
                rng.next_u64(),
                rng.next_u64(),
            );
        }
    }
}

const METRICS: [&str; 8] = [
    "ingest/events/processed",
    "ingest/events/unparseable",
    "ingest/rows/output",
    "ingest/persists/count",
    "ingest/persists/timeMs",
    "ingest/kafka/lag",
    "jvm/gc/cpu",
    "jvm/mem/used",
];
const DATASOURCES: [&str; 6] = [
    "wikipedia",
    "clickstream",
    "orders_eu",
    "metrics_k8s",
    "ad_impressions",
    "payments",
];

/// Encodes one line as CRI records: `P` chunks of [`CRI_SPLIT`] bytes, then `F`.
pub fn encode_cri(stream: &str, nanos: u64, line: &[u8], out: &mut Vec<u8>) {
    let ts = |out: &mut Vec<u8>, tag: &str| {
        let (s, ns) = (nanos / 1_000_000_000, nanos % 1_000_000_000);
        let _ = write!(
            out,
            "2024-05-01T{:02}:{:02}:{:02}.{ns:09}Z {stream} {tag} ",
            (s / 3600) % 24,
            (s / 60) % 60,
            s % 60
        );
    };
    let mut chunks = line.chunks(CRI_SPLIT).peekable();
    if chunks.peek().is_none() {
        ts(out, "F");
        out.push(b'\n');
        return;
    }
    while let Some(c) = chunks.next() {
        ts(out, if chunks.peek().is_some() { "P" } else { "F" });
        out.extend_from_slice(c);
        out.push(b'\n');
    }
}

/// One peon container's log directory as a runtime and the kubelet maintain it.
#[derive(Debug)]
pub struct PeonWriter {
    dir: PathBuf,
    restart: u32,
    file: File,
    size: u64,
    /// Rotate when the live file reaches this size (0 = never).
    pub rotate_bytes: u64,
    rotations: u32,
    nanos: u64,
    rec: Vec<u8>,
    /// What `kubectl logs` prints for this container, all restarts included.
    pub expected: Vec<u8>,
}

impl PeonWriter {
    /// Creates `<dir>` and `0.log` in it.
    pub fn create(dir: &Path, rotate_bytes: u64) -> io::Result<PeonWriter> {
        fs::create_dir_all(dir)?;
        let file = open_append(&dir.join("0.log"))?;
        Ok(PeonWriter {
            dir: dir.to_owned(),
            restart: 0,
            file,
            size: 0,
            rotate_bytes,
            rotations: 0,
            nanos: 0,
            rec: Vec::with_capacity(64 << 10),
            expected: Vec::new(),
        })
    }

    /// The file the runtime writes now, `<restart>.log`; it changes at each simulated restart.
    pub fn live_path(&self) -> PathBuf {
        self.dir.join(format!("{}.log", self.restart))
    }

    /// Writes one line on `stream` ("stdout" or "stderr"), rotating first if due.
    pub fn write_line(&mut self, stream: &str, line: &[u8]) -> io::Result<()> {
        debug_assert!(!line.contains(&b'\n'));
        if self.rotate_bytes > 0 && self.size >= self.rotate_bytes {
            self.rotate(true)?;
        }
        self.rec.clear();
        self.nanos += 1_000;
        encode_cri(stream, self.nanos, line, &mut self.rec);
        self.file.write_all(&self.rec)?;
        self.size += self.rec.len() as u64;
        self.expected.extend_from_slice(line);
        self.expected.push(b'\n');
        Ok(())
    }

    /// What the kubelet does when the live file is too big: gzip the previous rotation and
    /// delete it, rename the live file, and have the runtime reopen. With `late_write`, one
    /// more line lands in the renamed file before the reopen, as happens when the runtime is
    /// slow to react.
    pub fn rotate(&mut self, late_write: bool) -> io::Result<()> {
        self.compress_rotated()?;
        self.rotations += 1;
        let rotated = self.dir.join(format!(
            "{}.log.20240501-{:06}",
            self.restart, self.rotations
        ));
        fs::rename(self.live_path(), &rotated)?;
        if late_write {
            let line = b"late line written to the renamed file before the runtime reopened it";
            self.size = 0;
            self.rec.clear();
            self.nanos += 1_000;
            encode_cri("stdout", self.nanos, line, &mut self.rec);
            self.file.write_all(&self.rec)?;
            self.expected.extend_from_slice(line);
            self.expected.push(b'\n');
        }
        self.file = open_append(&self.live_path())?;
        self.size = 0;
        Ok(())
    }

    /// A container restart: the runtime starts `<n+1>.log`; the old file stays.
    pub fn restart(&mut self) -> io::Result<()> {
        self.restart += 1;
        self.file = open_append(&self.live_path())?;
        self.size = 0;
        Ok(())
    }

    /// Compresses every uncompressed rotated file, as the kubelet does with all but the newest
    /// rotation, and removes the original.
    pub fn compress_rotated(&mut self) -> io::Result<()> {
        for e in fs::read_dir(&self.dir)? {
            let p = e?.path();
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if name.contains(".log.") && !name.ends_with(".gz") {
                let data = fs::read(&p)?;
                let gz = p.with_file_name(format!("{name}.gz"));
                let mut enc =
                    flate2::write::GzEncoder::new(File::create(&gz)?, flate2::Compression::fast());
                enc.write_all(&data)?;
                enc.finish()?;
                fs::remove_file(&p)?;
            }
        }
        Ok(())
    }

    /// A no-op today: nothing is buffered, each line's records go out in one `write_all` on
    /// the unbuffered file. Kept so callers need not know that.
    pub fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

fn open_append(p: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of 8 MiB of `g`'s lines over its gzip size at level 1 (the agent's default).
    fn ratio(mut g: LineGen) -> f64 {
        let text = g.text(8 << 20);
        let mut z = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(1));
        z.write_all(&text).unwrap();
        text.len() as f64 / z.finish().unwrap().len() as f64
    }

    /// The benchmarks' two data sets stay what docs/performance.md says they are: the same
    /// seed gives the same bytes, so these ratios are fixed, not measured.
    #[test]
    fn varied_lines_compress_like_a_real_peons_and_the_plain_ones_better() {
        let (plain, varied) = (ratio(LineGen::new(3)), ratio(LineGen::varied(3)));
        assert!((3.5..4.5).contains(&varied), "varied: {varied:.2}x");
        assert!(plain > 5.0, "plain: {plain:.2}x");
    }

    #[test]
    fn long_lines_split_at_16k_and_decode_back() {
        let mut g = LineGen::new(1);
        g.long_every = 1;
        let mut line = Vec::new();
        g.next_line(&mut line);
        assert!(line.len() > CRI_SPLIT);
        let mut rec = Vec::new();
        encode_cri("stdout", 5, &line, &mut rec);
        assert!(rec.split(|b| *b == b'\n').filter(|r| !r.is_empty()).count() >= 2);
        let dec = crate::decode::Decoder::new(1 << 20);
        let mut out = Vec::new();
        let mut st = Default::default();
        let n = dec.decode(
            &mut Default::default(),
            &mut Default::default(),
            &rec,
            crate::decode::Tail::Growing,
            &mut out,
            &mut st,
        );
        assert_eq!(n, rec.len());
        line.push(b'\n');
        assert_eq!(out, line);
    }
}
