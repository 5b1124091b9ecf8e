//! What the spool's codec costs on this machine, beside the alternatives worth asking about:
//! gzip level 1 by zlib-rs (the agent's, through flate2) on text cut into independent members
//! of several block sizes, libdeflate on the same members, zlib-rs's other strategies at level
//! 1 (Huffman only, RLE), and inflating 64 KiB members with zlib-rs and libdeflate. One thread,
//! its own CPU time (`/proc/thread-self/schedstat`, nanoseconds) for the median of three passes
//! over 64 MiB of the bench's text, in CPU-s per GiB of text (the bench's figures are per GiB of
//! CRI input, 13 to 18 % more bytes). Every compressor writes each member into one reused
//! buffer, as the spool's packer does, and what is made or read is checked against the text.
//! Prints one JSON object with the date and the load.
//!
//! `cargo run --release -p druid-log-agent-tools --example codecs -- varied` (or `plain`).

use druid_log_agent::loadgen::LineGen;
use druid_log_agent_tools::{loadavg, now_utc, pct};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use serde_json::json;

const TEXT: usize = 64 << 20;
const BLOCKS: [usize; 4] = [64 << 10, 256 << 10, 1 << 20, TEXT];
const MEMBER: usize = 64 << 10;

fn main() {
    let data = std::env::args().nth(1).unwrap_or_else(|| "varied".into());
    let text = match data.as_str() {
        "plain" => LineGen::new(7).text(TEXT),
        "varied" => LineGen::varied(7).text(TEXT),
        other => {
            eprintln!("codecs: data is `plain` or `varied`, not `{other}`");
            std::process::exit(2);
        }
    };
    let load_before = loadavg();
    let date = now_utc();
    let zlib_rs: Vec<_> = BLOCKS
        .iter()
        .map(|&block| {
            let (s, packed) = zlib_rs_deflate(&text, block);
            json!({"block": block, "cpu_s_per_gib": s, "ratio": ratio(&text, packed)})
        })
        .collect();
    let (s, packed) = libdeflate_deflate(&text, MEMBER);
    let libdeflate = json!({"block": MEMBER, "cpu_s_per_gib": s, "ratio": ratio(&text, packed)});
    let strategies: serde_json::Map<_, _> = [
        ("huffman_only", zlib_rs::Strategy::HuffmanOnly),
        ("rle", zlib_rs::Strategy::Rle),
    ]
    .into_iter()
    .map(|(name, strategy)| {
        let (s, packed) = zlib_rs_strategy(&text, strategy);
        (
            name.to_owned(),
            json!({"block": MEMBER, "cpu_s_per_gib": s, "ratio": ratio(&text, packed)}),
        )
    })
    .collect();
    let members = members(&text);
    let out = json!({
        "date": date,
        "data": data,
        "load_before": load_before,
        "deflate_level_1": {"zlib_rs": zlib_rs, "libdeflate": libdeflate, "zlib_rs_strategy": strategies},
        "inflate_64k_members_cpu_s_per_gib": {
            "zlib_rs": zlib_rs_inflate(&members, &text),
            "libdeflate": libdeflate_inflate(&members, &text),
        },
        "load_after": loadavg(),
    });
    println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
}

fn ratio(text: &[u8], packed: usize) -> f64 {
    text.len() as f64 / packed.max(1) as f64
}

/// This thread's CPU time so far, in seconds.
fn thread_cpu_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    let ns: Option<f64> = stat.split_whitespace().next().and_then(|v| v.parse().ok());
    ns.expect("/proc/thread-self/schedstat (Linux with schedstats)") / 1e9
}

/// CPU seconds per GiB of `text` for the median of three runs of `pass`, and what the last
/// pass returned.
fn median_of_three<T>(text: &[u8], mut pass: impl FnMut() -> T) -> (f64, T) {
    let gib = text.len() as f64 / (1u64 << 30) as f64;
    let mut last = None;
    let mut secs: Vec<f64> = (0..3)
        .map(|_| {
            let started = thread_cpu_s();
            last = Some(pass());
            (thread_cpu_s() - started) / gib
        })
        .collect();
    (pct(&mut secs, 0.5), last.expect("three passes ran"))
}

/// Panics unless `member` inflates to `chunk`: a codec that made something else measured
/// nothing.
fn check_member(member: &[u8], chunk: &[u8]) {
    let mut d = Decompress::new(false);
    let mut back = Vec::with_capacity(chunk.len());
    let ok = matches!(
        d.decompress_vec(member, &mut back, FlushDecompress::Finish),
        Ok(Status::StreamEnd)
    );
    assert!(ok && back == chunk, "a member does not inflate to its text");
}

/// Raw deflate members as the spool's packer makes them: one compressor reset per block, each
/// member into the same buffer. Returns the cost and the members' total size.
fn zlib_rs_deflate(text: &[u8], block: usize) -> (f64, usize) {
    let mut c = Compress::new(Compression::new(1), false);
    let mut out = Vec::with_capacity(block.min(text.len()) + 1024);
    let (s, total) = median_of_three(text, || {
        let mut total = 0;
        for chunk in text.chunks(block) {
            out.clear();
            c.reset();
            let start = c.total_in();
            loop {
                out.reserve(chunk.len() / 2 + 1024);
                let done = (c.total_in() - start) as usize;
                match c.compress_vec(&chunk[done..], &mut out, FlushCompress::Finish) {
                    Ok(Status::StreamEnd) => break,
                    Ok(_) => {}
                    Err(e) => panic!("deflate of our own text: {e}"),
                }
            }
            total += out.len();
        }
        total
    });
    check_member(&out, text.chunks(block).last().unwrap_or_default());
    (s, total)
}

/// 64 KiB members at level 1 with another of zlib's strategies (Huffman codes only, or
/// matches of the byte before only): still deflate, so any gzip reader reads them, and
/// reputed to trade ratio for speed, which is what this measures. Made by zlib-rs itself,
/// which flate2 does not let choose a strategy.
fn zlib_rs_strategy(text: &[u8], strategy: zlib_rs::Strategy) -> (f64, usize) {
    let mut c = zlib_rs::Deflate::new_with_config(zlib_rs::DeflateConfig {
        level: 1,
        window_bits: -15,
        strategy,
        ..zlib_rs::DeflateConfig::default()
    });
    let mut out = vec![0u8; zlib_rs::compress_bound(MEMBER)];
    let mut last = 0;
    let (s, total) = median_of_three(text, || {
        text.chunks(MEMBER)
            .map(|chunk| {
                c.reset();
                match c.compress(chunk, &mut out, zlib_rs::DeflateFlush::Finish) {
                    Ok(zlib_rs::Status::StreamEnd) => {}
                    other => panic!("a member within its bound in one call: {other:?}"),
                }
                last = c.total_out() as usize;
                last
            })
            .sum()
    });
    check_member(&out[..last], text.chunks(MEMBER).last().unwrap_or_default());
    (s, total)
}

fn libdeflate_deflate(text: &[u8], block: usize) -> (f64, usize) {
    let level = libdeflater::CompressionLvl::new(1).expect("1 is a level");
    let mut c = libdeflater::Compressor::new(level);
    let mut out = vec![0u8; c.deflate_compress_bound(block)];
    let mut last = 0;
    let (s, total) = median_of_three(text, || {
        text.chunks(block)
            .map(|chunk| {
                last = c
                    .deflate_compress(chunk, &mut out)
                    .expect("the buffer is the bound");
                last
            })
            .sum()
    });
    check_member(&out[..last], text.chunks(block).last().unwrap_or_default());
    (s, total)
}

/// The text as zlib-rs level 1 members of 64 KiB, the spool's default block.
fn members(text: &[u8]) -> Vec<Vec<u8>> {
    let mut c = Compress::new(Compression::new(1), false);
    text.chunks(MEMBER)
        .map(|chunk| {
            c.reset();
            let mut out = Vec::with_capacity(chunk.len() + 1024);
            match c.compress_vec(chunk, &mut out, FlushCompress::Finish) {
                Ok(Status::StreamEnd) => out,
                other => panic!("a 64 KiB member in one call: {other:?}"),
            }
        })
        .collect()
}

/// Inflating every member after the one before it, as a reader of a range does; panics when
/// the text does not come back.
fn zlib_rs_inflate(members: &[Vec<u8>], text: &[u8]) -> f64 {
    let mut d = Decompress::new(false);
    let mut out = Vec::with_capacity(text.len());
    let (s, ()) = median_of_three(text, || {
        out.clear();
        for m in members {
            d.reset(false);
            out.reserve(MEMBER);
            let _ = d.decompress_vec(m, &mut out, FlushDecompress::Finish);
        }
    });
    assert!(out == text, "the members do not inflate to the text");
    s
}

fn libdeflate_inflate(members: &[Vec<u8>], text: &[u8]) -> f64 {
    let mut d = libdeflater::Decompressor::new();
    let mut out = vec![0u8; text.len()];
    let (s, ()) = median_of_three(text, || {
        let mut at = 0;
        for m in members {
            let room = (text.len() - at).min(MEMBER);
            at += d
                .deflate_decompress(m, &mut out[at..at + room])
                .unwrap_or(0);
        }
    });
    assert!(out == text, "the members do not inflate to the text");
    s
}
