//! The per-task spool: the single source of truth for every reader of a task's log.
//!
//! On disk a spool is a sequence of independent gzip members, one per sealed block, so
//! `zcat spool.gz` prints the whole log. Each member carries, in a gzip extra subfield `DL`,
//! its compressed and uncompressed lengths: the block index is rebuilt after a restart by
//! reading 24-byte headers, never by decompressing. The newest, unsealed block (the tail) lives
//! in memory; a crash loses it, which is safe because the checkpoint only ever records source
//! offsets taken right after a seal (see [`crate::ingest`]).
//!
//! Architecture invariant: sealed members are immutable. Readers copy block positions under a
//! short read lock and then read the file without any lock; the writer only appends.
//!
//! `member` is the on-disk format of one block, `writer` the ingest side (append, seal, cut
//! back to the committed length on open), `reader` the shared handle every reader uses.

mod member;
mod reader;
mod writer;

use std::io;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use reader::Spool;
pub use writer::{Packer, SpoolWriter, TailMut};

/// A byte position in a task's log text, the decoded text `kubectl logs` prints and `zcat`
/// of the spool gives: what Druid's `offset=` counts and what a text archive holds. Not to be
/// mixed up with a [`SpoolFileOffset`] (compressed bytes) nor with a position in a source file
/// ([`crate::tail::SourceOffset`]); `#[serde(transparent)]` keeps the checkpoint a plain number.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct LogOffset(u64);

/// A byte position in a spool file: compressed bytes, always at a gzip member boundary where
/// it is recorded (a checkpoint's committed length, the end of a gzip part). See [`LogOffset`]
/// for why it is a type.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct SpoolFileOffset(u64);

macro_rules! offset_ops {
    ($t:ident) => {
        impl $t {
            /// The start.
            pub const ZERO: $t = $t(0);

            /// The position `n` bytes from the start.
            pub const fn new(n: u64) -> Self {
                $t(n)
            }

            /// The position as a byte count, for the readers' `u64` ranges and for messages.
            pub const fn get(self) -> u64 {
                self.0
            }
        }

        impl std::ops::AddAssign<u64> for $t {
            fn add_assign(&mut self, n: u64) {
                self.0 += n;
            }
        }

        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}
offset_ops!(LogOffset);
offset_ops!(SpoolFileOffset);

/// A spool could not be written or read; every message names the file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The OS refused an operation (a full disk, the file descriptor limit, permissions).
    #[error("spool {path}: {op}: {source}")]
    Io {
        /// The spool file.
        path: PathBuf,
        /// The failed step, as the message shows it ("open", "append block", "fsync", ...).
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// The file does not hold what the checkpoint says it holds. The agent never repairs a
    /// spool: moved aside, it is rebuilt from the source logs if they still exist.
    #[error(
        "spool {path} is corrupt at byte {offset}: {what}; move it aside to let the agent rebuild it from the source logs"
    )]
    Corrupt {
        /// The spool file.
        path: PathBuf,
        /// Byte of the spool file where the bad member (or the short end) starts.
        offset: u64,
        /// What was wrong, for the message.
        what: &'static str,
    },
}

#[derive(Debug, Clone, Copy)]
struct Block {
    raw_start: u64,
    file_off: u64,
    deflate_len: u32,
    raw_len: u32,
}

#[derive(Debug, Default)]
struct Inner {
    blocks: Vec<Block>,
    sealed_raw: u64,
    sealed_file: u64,
    tail: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::io::Read;

    fn text(n: usize, seed: u64) -> Vec<u8> {
        let mut v = Vec::with_capacity(n);
        let mut x = seed;
        while v.len() < n {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            v.extend_from_slice(format!("line {} value {}\n", x >> 40, x % 977).as_bytes());
        }
        v.truncate(n);
        v
    }

    fn read_all(s: &Spool, a: u64, b: u64) -> Vec<u8> {
        let mut out = Vec::new();
        s.read_range(a, b, &mut |c| {
            out.extend_from_slice(c);
            Ok(())
        })
        .unwrap();
        out
    }

    #[test]
    fn ranges_across_blocks_and_tail_and_plain_gzip_readable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gz");
        let mut w = SpoolWriter::open(&path, SpoolFileOffset::ZERO).unwrap();
        let mut p = Packer::new(1);
        let all = text(300_000, 7);
        for chunk in all.chunks(70_000) {
            w.append(|t| t.extend_from_slice(chunk));
            if chunk.len() == 70_000 {
                w.seal(&mut p).unwrap();
            }
        }
        let s = w.spool().clone();
        assert_eq!(s.len(), all.len() as u64);
        for (a, b) in [
            (0, 300_000),
            (69_999, 70_001),
            (139_000, 290_000),
            (280_000, 300_000),
            (5, 5),
        ] {
            assert_eq!(
                read_all(&s, a, b),
                &all[a as usize..b as usize],
                "range {a}..{b}"
            );
        }
        w.seal(&mut p).unwrap();
        w.sync().unwrap();
        let mut gz = Vec::new();
        flate2::read::MultiGzDecoder::new(File::open(&path).unwrap())
            .read_to_end(&mut gz)
            .unwrap();
        assert_eq!(gz, all);
    }

    #[test]
    fn pieces_end_where_blocks_end_and_together_are_the_range() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = SpoolWriter::open(&dir.path().join("t.gz"), SpoolFileOffset::ZERO).unwrap();
        let mut p = Packer::new(1);
        let all = text(300_000, 11);
        // Blocks of 70 000 bytes, then 20 000 unsealed.
        for chunk in all.chunks(70_000) {
            w.append(|t| t.extend_from_slice(chunk));
            if chunk.len() == 70_000 {
                w.seal(&mut p).unwrap();
            }
        }
        let s = w.spool().clone();
        for (start, limit, want) in [
            (0, 300_000, 100_000),
            (5, 290_000, 30_000),
            (69_999, 150_000, 20_000),
        ] {
            let (mut pos, mut got) = (start, Vec::new());
            while pos < limit {
                let end = s.piece_end(pos, limit, want);
                assert!(end > pos && end <= limit, "{pos} -> {end}");
                assert!(
                    end == limit || end.is_multiple_of(70_000) || end >= 280_000,
                    "piece {pos}..{end} ends inside a block"
                );
                got.extend(s.read_to_vec(pos, end).unwrap());
                pos = end;
            }
            assert_eq!(got, &all[start as usize..limit as usize]);
        }
        assert_eq!(
            s.piece_end(10, 100_000, 20_000),
            70_000,
            "within one block: its end"
        );
        assert_eq!(
            s.piece_end(10, 100_000, 100),
            110,
            "a block more than four pieces long is split"
        );
        assert_eq!(s.piece_end(10, 50, 100), 50, "never past the limit");
        assert_eq!(
            s.piece_end(281_000, 300_000, 1000),
            282_000,
            "in the tail: as asked"
        );
    }

    #[test]
    fn a_damaged_block_is_corrupt_for_every_reader_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gz");
        let mut w = SpoolWriter::open(&path, SpoolFileOffset::ZERO).unwrap();
        let mut p = Packer::new(1);
        let all = text(100_000, 5);
        w.append(|t| t.extend_from_slice(&all));
        w.seal(&mut p).unwrap();
        let s = w.spool().clone();
        let mut bytes = std::fs::read(&path).unwrap();
        // Past the 24-byte header: the deflate stream itself.
        for b in &mut bytes[40..400] {
            *b ^= 0x5a;
        }
        std::fs::write(&path, &bytes).unwrap();
        let whole = s.read_to_vec(0, 100_000).unwrap_err();
        assert!(matches!(whole, SpoolError::Corrupt { .. }), "{whole}");
        let part = s.read_range(10, 20, &mut |_| Ok(())).unwrap_err();
        assert!(matches!(part, SpoolError::Corrupt { .. }), "{part}");
    }

    #[test]
    fn reopen_cuts_to_committed_length_and_rebuilds_index() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gz");
        let all = text(200_000, 3);
        let mut w = SpoolWriter::open(&path, SpoolFileOffset::ZERO).unwrap();
        let mut p = Packer::new(1);
        w.append(|t| t.extend_from_slice(&all[..100_000]));
        w.seal(&mut p).unwrap();
        let committed = w.file_len();
        w.append(|t| t.extend_from_slice(&all[100_000..]));
        w.seal(&mut p).unwrap();
        drop(w);
        let w = SpoolWriter::open(&path, committed).unwrap();
        assert_eq!(w.spool().len(), 100_000);
        assert_eq!(read_all(w.spool(), 0, 100_000), &all[..100_000]);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), committed.get());
    }

    #[test]
    fn committed_length_inside_a_member_is_reported_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gz");
        let mut w = SpoolWriter::open(&path, SpoolFileOffset::ZERO).unwrap();
        let mut p = Packer::new(1);
        w.append(|t| t.extend_from_slice(b"hello\n"));
        w.seal(&mut p).unwrap();
        let len = w.spool().file_len();
        drop(w);
        let err = SpoolWriter::open(&path, SpoolFileOffset::new(len - 3)).unwrap_err();
        assert!(matches!(err, SpoolError::Corrupt { .. }), "{err}");
    }
}
