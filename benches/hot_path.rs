//! Micro benchmarks of the per-byte hot path: decoding CRI records, sealing spool blocks, and
//! reading a range back. `cargo bench --bench hot_path`; throughput is in bytes of input.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use druid_log_agent::decode::{DecodeStats, Decoder, FileDecodeState, LineState, Tail};
use druid_log_agent::loadgen::{LineGen, encode_cri};
use druid_log_agent::spool::{Packer, SpoolFileOffset, SpoolWriter};
use std::hint::black_box;

/// About `bytes` of CRI records of Druid-style lines (long lines split into P/F records).
fn cri_input(bytes: usize) -> Vec<u8> {
    let mut g = LineGen::new(42);
    let mut line = Vec::new();
    let mut out = Vec::with_capacity(bytes + (64 << 10));
    let mut nanos = 0;
    while out.len() < bytes {
        g.next_line(&mut line);
        nanos += 1_000;
        encode_cri("stdout", nanos, &line, &mut out);
    }
    out
}

fn decode(c: &mut Criterion) {
    let input = cri_input(8 << 20);
    let dec = Decoder::new(1 << 20);
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Bytes(input.len() as u64));
    g.bench_function("cri_8MiB", |b| {
        let mut out = Vec::with_capacity(input.len());
        b.iter(|| {
            out.clear();
            let mut f = FileDecodeState::default();
            let mut lines = [LineState::default(); 2];
            let mut st = DecodeStats::default();
            // In 256 KiB reads, as the tail does.
            let mut pos = 0;
            while pos < input.len() {
                let end = (pos + (256 << 10)).min(input.len());
                let tail = if end == input.len() {
                    Tail::Final
                } else {
                    Tail::Growing
                };
                pos += dec.decode(
                    &mut f,
                    &mut lines,
                    &input[pos..end],
                    tail,
                    &mut out,
                    &mut st,
                );
            }
            black_box(out.len())
        })
    });
    g.finish();
}

fn spool(c: &mut Criterion) {
    let text = {
        let dec = Decoder::new(1 << 20);
        let mut out = Vec::new();
        dec.decode(
            &mut FileDecodeState::default(),
            &mut [LineState::default(); 2],
            &cri_input(8 << 20),
            Tail::Final,
            &mut out,
            &mut DecodeStats::default(),
        );
        out
    };
    let dir = tempfile::tempdir().unwrap();
    let mut g = c.benchmark_group("spool");
    g.throughput(Throughput::Bytes(text.len() as u64));
    g.sample_size(20);
    g.bench_function("append_and_seal_64KiB_blocks_level1", |b| {
        let mut packer = Packer::new(1);
        b.iter(|| {
            let path = dir.path().join("w.gz");
            let _ = std::fs::remove_file(&path);
            let mut w = SpoolWriter::open(&path, SpoolFileOffset::ZERO).unwrap();
            for block in text.chunks(64 << 10) {
                w.append(|t| t.extend_from_slice(block));
                w.seal(&mut packer).unwrap();
            }
            black_box(w.spool().file_len())
        })
    });
    let path = dir.path().join("r.gz");
    let mut w = SpoolWriter::open(&path, SpoolFileOffset::ZERO).unwrap();
    let mut packer = Packer::new(1);
    for block in text.chunks(64 << 10) {
        w.append(|t| t.extend_from_slice(block));
        w.seal(&mut packer).unwrap();
    }
    let spool = w.spool().clone();
    g.bench_function("read_range_whole", |b| {
        b.iter(|| {
            let mut n = 0;
            spool
                .read_range(0, spool.len(), &mut |c| {
                    n += c.len();
                    Ok(())
                })
                .unwrap();
            black_box(n)
        })
    });
    g.throughput(Throughput::Bytes(8192));
    g.bench_function("read_last_8KiB", |b| {
        let len = spool.len();
        b.iter(|| black_box(spool.read_to_vec(len - 8192, len).unwrap().len()))
    });
    g.finish();
}

criterion_group!(benches, decode, spool);
criterion_main!(benches);
