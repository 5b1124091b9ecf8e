//! Arbitrary bytes through the record decoder, driven the way `pipeline::read_step` drives it.
//!
//! Input layout: `[cap, buf, seed_lo, seed_hi, files, data...]`.
//! - `cap`: the line cap (`1..=64`, or 1 MiB when `cap >= 0xC0`), small so truncation runs;
//! - `buf`: the read buffer size (`1..=96`), the model of `READ_BUF`: a record that does not
//!   fit is consumed piecewise (`Tail::Oversized`);
//! - `seed_*`: drives the schedule (read sizes, how the file grows, restarts);
//! - `files`: `data` is cut into `files % 3 + 1` log files of one container (rotation or
//!   restarts): each file gets its own `FileDecodeState` (format autodetected per file), the
//!   per-stream line state spans them, as in the pipeline.
//!
//! Checked, and why the decoder promises it (src/decode.rs):
//! 1. No panic; every call consumes at most its input; `Oversized` always makes progress;
//!    `Final` consumes all; each file is consumed to its end and leaves no continuation.
//! 2. The output does not depend on how the file was read: short reads, a file that grows a
//!    few bytes at a time, restarts from a checkpoint (decode state through JSON) at any step
//!    all give the same bytes and counters as one buffer-sized read after another ("no state
//!    but a length counter spans records, a checkpoint can be taken at any record boundary";
//!    the proptest `any_p_split_decodes_to_the_same_line` claims it for valid CRI).
//! 3. The output equals one `decode(.., Tail::Final)` of each whole file unless a record longer
//!    than the buffer had to be taken piecewise (`Oversized`) and its first piece could not
//!    tell what the record is: a JSON record (never parsed in pieces: kept raw, by design) or a
//!    CRI header cut before its third space (`<time> <stream> <tag> `). `Oversized` is used
//!    exactly for the records of at least `buf` bytes before their newline.
//! 4. If nothing was truncated, the cap made no difference.
//! 5. Bounds: the output is at most the input plus one newline per file plus one marker per
//!    truncated line ("never drops a byte silently", but never invents any either); between
//!    two newlines each stream adds at most `cap` bytes and one marker; the counters agree.
#![no_main]

use druid_log_agent::decode::{
    DecodeStats, Decoder, FileDecodeState, LineState, TRUNCATION_MARKER, Tail,
};
use libfuzzer_sys::fuzz_target;

/// splitmix64: the schedule comes from the input, so a crash reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n`; 0 when `n == 0`.
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
    fn one_in(&mut self, n: u64) -> bool {
        self.next() % n == 0
    }
}

#[derive(Default, PartialEq, Debug)]
struct Run {
    out: Vec<u8>,
    stats: DecodeStats,
    lines: [LineState; 2],
    oversized: bool,
}

/// What a checkpoint does to the decode state: JSON out and back in. Must be lossless.
fn through_checkpoint<T>(v: &T) -> T
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let back: T = serde_json::from_slice(&serde_json::to_vec(v).unwrap()).unwrap();
    assert_eq!(&back, v, "decode state changed through the checkpoint");
    back
}

/// One file read to its end as `read_step` reads it. With `sched`, reads are of random sizes
/// up to `buf`, the file becomes visible a few bytes at a time and the decoder restarts from
/// a checkpoint at random steps; without, every read asks for `buf` bytes of a complete file.
fn read_file(dec: &Decoder, file: &[u8], buf: usize, mut sched: Option<&mut Rng>, run: &mut Run) {
    let mut fstate = FileDecodeState::default();
    let mut offset = 0usize;
    let mut visible = match sched.as_deref_mut() {
        Some(r) => r.below(file.len() + 1),
        None => file.len(),
    };
    let mut steps = 0usize;
    loop {
        steps += 1;
        assert!(steps < 100_000, "no progress");
        if let Some(r) = sched.as_deref_mut() {
            if r.one_in(4) {
                fstate = through_checkpoint(&fstate);
                run.lines = through_checkpoint(&run.lines);
            }
            if visible < file.len() && r.one_in(3) {
                visible += 1 + r.below(file.len() - visible);
            }
        }
        // The `MIN_READ..=READ_BUF` read of `read_step`.
        let mut want = match sched.as_deref_mut() {
            Some(r) => 1 + r.below(buf),
            None => buf,
        };
        let n = loop {
            let n = want.min(visible - offset);
            if n == 0 {
                break 0;
            }
            let input = &file[offset..offset + n];
            let before = (fstate.clone(), run.out.len(), run.stats);
            let mut used = dec.decode(
                &mut fstate,
                &mut run.lines,
                input,
                Tail::Growing,
                &mut run.out,
                &mut run.stats,
            );
            assert!(used <= n, "consumed {used} of {n}");
            if used == 0 {
                assert_eq!((fstate.clone(), run.out.len(), run.stats), before);
            }
            if used == 0 && n == want {
                if want < buf {
                    want = buf;
                    continue;
                }
                used = dec.decode(
                    &mut fstate,
                    &mut run.lines,
                    input,
                    Tail::Oversized,
                    &mut run.out,
                    &mut run.stats,
                );
                assert!(used > 0 && used <= n, "Oversized consumed {used} of {n}");
                run.oversized = true;
            }
            if used > 0 {
                offset += used;
            }
            break if used > 0 { usize::MAX } else { n };
        };
        if n == usize::MAX {
            continue; // Step::Read
        }
        if visible < file.len() {
            // Step::Wait; the runtime writes more.
            let r = sched.as_deref_mut().expect("only a schedule hides bytes");
            visible += 1 + r.below(file.len() - visible);
            continue;
        }
        if n > 0 {
            // The file will not grow: its unterminated last record is final.
            let input = &file[offset..offset + n];
            let used = dec.decode(
                &mut fstate,
                &mut run.lines,
                input,
                Tail::Final,
                &mut run.out,
                &mut run.stats,
            );
            assert_eq!(used, n, "Final left bytes behind");
            assert!(fstate.continuing.is_none());
            offset += used;
            continue;
        }
        // Drained: close the file, as `read_step` does: a pending line ends here, and counts
        // as a line (it did not before this target found it; tests/it/fuzz_regressions.rs).
        if let Some(c) = fstate.continuing.take()
            && c.ends_line
        {
            run.out.push(b'\n');
            run.lines[c.stream as usize & 1] = LineState::default();
            run.stats.lines += 1;
        }
        break;
    }
    assert_eq!(offset, file.len());
}

fn read_all(dec: &Decoder, files: &[&[u8]], buf: usize, mut sched: Option<&mut Rng>) -> Run {
    let mut run = Run::default();
    for f in files {
        read_file(dec, f, buf, sched.as_deref_mut(), &mut run);
    }
    run
}

fuzz_target!(|data: &[u8]| {
    let [cap, buf, s0, s1, nfiles, data @ ..] = data else {
        return;
    };
    let cap = if *cap >= 0xC0 {
        1 << 20
    } else {
        1 + *cap as usize % 64
    };
    let buf = 1 + *buf as usize % 96;
    let mut rng = Rng(u64::from(*s0) | u64::from(*s1) << 8);
    let mut cuts: Vec<usize> = (0..*nfiles % 3)
        .map(|_| rng.below(data.len() + 1))
        .collect();
    cuts.sort_unstable();
    let mut files = Vec::new();
    let mut start = 0;
    for c in cuts {
        files.push(&data[start..c]);
        start = c;
    }
    files.push(&data[start..]);

    let dec = Decoder::new(cap);
    let want = read_all(&dec, &files, buf, None);
    let got = read_all(&dec, &files, buf, Some(&mut rng));

    // 2. Independent of read sizes, growth and restarts.
    assert_eq!(got.out, want.out, "output depends on how the file was read");
    assert_eq!(got.stats, want.stats);
    assert_eq!(got.lines, want.lines);

    // 3. The buffer size only matters for records whose first `buf` bytes are not conclusive.
    let long = |f: &[u8]| f.split(|&b| b == b'\n').any(|r| r.len() >= buf);
    assert_eq!(want.oversized, files.iter().any(|f| long(f)));
    let conclusive = |f: &[u8]| {
        !long(f)
            || (f.first() != Some(&b'{')
                && f.split(|&b| b == b'\n')
                    .all(|r| r.len() < buf || r[..buf].iter().filter(|&&b| b == b' ').count() >= 3))
    };
    if files.iter().all(|f| conclusive(f)) {
        let mut whole = Run::default();
        for f in &files {
            let mut fs = FileDecodeState::default();
            let used = dec.decode(
                &mut fs,
                &mut whole.lines,
                f,
                Tail::Final,
                &mut whole.out,
                &mut whole.stats,
            );
            assert_eq!(used, f.len());
            assert!(fs.continuing.is_none());
        }
        assert_eq!(whole.out, want.out, "buffer size changed the output");
        assert_eq!(whole.stats, want.stats);
    }

    // 4. The cap only matters when something was cut.
    if want.stats.truncated_lines == 0 {
        assert_eq!(want.stats.truncated_bytes, 0);
        let uncapped = read_all(&Decoder::new(1 << 20), &files, buf, None);
        assert_eq!(uncapped.out, want.out, "the cap changed an uncut output");
    } else {
        assert!(want.stats.truncated_bytes > 0);
    }

    // 5. Bounds and counters.
    let m = TRUNCATION_MARKER.len();
    let st = &want.stats;
    let bound = data.len() + files.len() + st.truncated_lines as usize * m;
    assert!(
        want.out.len() <= bound,
        "output {} > bound {bound}",
        want.out.len()
    );
    for seg in want.out.split(|&b| b == b'\n') {
        assert!(
            seg.len() <= 2 * (cap + m),
            "a line of {} bytes with cap {cap}",
            seg.len()
        );
    }
    assert!(st.malformed <= st.records);
    assert!(st.lines <= st.records);
    assert!(st.truncated_lines <= st.records);
    for l in &want.lines {
        assert!(l.len <= cap as u64);
        assert!(!l.truncated || l.len == cap as u64);
    }
});
