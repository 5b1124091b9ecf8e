//! The per-task spool: the single source of truth for every reader of a task's log.
//!
//! On disk a spool is a sequence of independent gzip members, one per sealed block, so
//! `zcat spool.gz` prints the whole log. Each member carries, in a gzip extra subfield `DL`,
//! its compressed and uncompressed lengths: the block index is rebuilt after a restart by
//! reading 24-byte headers, never by decompressing. The newest, unsealed block (the tail) lives
//! in memory; a crash loses it, which is safe because the checkpoint only ever records source
//! offsets taken right after a seal (see `pipeline`).
//!
//! Architecture invariant: sealed members are immutable. Readers copy block positions under a
//! short read lock and then read the file without any lock; the writer only appends.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard};

use serde::{Deserialize, Serialize};

use flate2::{Compress, Compression, Crc, Decompress, FlushCompress, FlushDecompress, Status};

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

const HEADER_LEN: usize = 24;
const TRAILER_LEN: usize = 8;

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

/// A readable handle on a task's spool, shared between the ingest path and readers.
#[derive(Debug)]
pub struct Spool {
    path: PathBuf,
    file: File,
    inner: RwLock<Inner>,
}

/// The ingest side of a spool. Only one exists per spool.
pub struct SpoolWriter {
    spool: Arc<Spool>,
    unsynced: bool,
}

/// The compressor and its output buffer, shared by all the spools of one ingest thread: a
/// deflate state takes a few hundred KiB, too much to keep one per task on a node with
/// hundreds of peons.
pub struct Packer {
    compress: Compress,
    scratch: Vec<u8>,
}

impl Packer {
    /// `level`: deflate level, 0 (store) to 9; higher values are taken as 9. Each ingest thread
    /// makes one and passes it to [`SpoolWriter::seal`].
    pub fn new(level: u32) -> Packer {
        Packer {
            compress: Compress::new(Compression::new(level.min(9)), false),
            scratch: Vec::new(),
        }
    }
}

impl std::fmt::Debug for SpoolWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpoolWriter")
            .field("path", &self.spool.path)
            .finish()
    }
}

impl Spool {
    /// The spool file, for messages and for operators (`zcat` prints the sealed part).
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn read_inner(&self) -> RwLockReadGuard<'_, Inner> {
        // A panic while holding the lock cannot leave `Inner` half-updated (each update is a
        // single push or clear), so a poisoned lock is still safe to read.
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes of log text held, sealed and unsealed.
    pub fn len(&self) -> u64 {
        let i = self.read_inner();
        i.sealed_raw + i.tail.len() as u64
    }

    /// No log text yet, sealed or not.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Makes what was written to the spool file so far durable (see
    /// [`SpoolWriter::take_unsynced`]); safe while the writer goes on appending.
    pub fn sync(&self) -> Result<(), SpoolError> {
        self.file.sync_data().map_err(|e| self.io("fsync", e))
    }

    /// Bytes of the spool file that hold sealed blocks.
    pub fn file_len(&self) -> u64 {
        self.read_inner().sealed_file
    }

    /// Reads bytes `[start, end)` of the spool file itself (whole gzip members when the
    /// bounds are member boundaries): the compressed form of the log, as `zcat` reads it.
    pub fn read_file(&self, start: u64, end: u64) -> Result<Vec<u8>, SpoolError> {
        let mut buf = vec![0; end.saturating_sub(start) as usize];
        self.file
            .read_exact_at(&mut buf, start)
            .map_err(|e| self.io("read", e))?;
        Ok(buf)
    }

    /// Log bytes `[start, end)` in one buffer, for callers that need them whole (a part, a
    /// response chunk); keep ranges small.
    pub fn read_to_vec(&self, start: u64, end: u64) -> Result<Vec<u8>, SpoolError> {
        let mut buf = Vec::with_capacity(end.saturating_sub(start) as usize);
        self.read_range(start, end, &mut |c| {
            buf.extend_from_slice(c);
            Ok(())
        })?;
        Ok(buf)
    }

    /// Copies log bytes `[start, end)` to `sink`, a block at a time, decompressing only the
    /// blocks that overlap the range. Safe to call while the writer appends and seals.
    pub fn read_range(
        &self,
        start: u64,
        end: u64,
        sink: &mut dyn FnMut(&[u8]) -> io::Result<()>,
    ) -> Result<(), SpoolError> {
        let mut pos = start;
        let mut packed = Vec::new();
        let mut raw = Vec::new();
        let mut inflate = Decompress::new(false);
        while pos < end {
            let block = {
                let i = self.read_inner();
                if pos >= i.sealed_raw {
                    let from = (pos - i.sealed_raw) as usize;
                    let to = ((end - i.sealed_raw) as usize).min(i.tail.len());
                    if from < to {
                        sink(&i.tail[from..to]).map_err(|e| self.io("write", e))?;
                    }
                    return Ok(());
                }
                let idx = i.blocks.partition_point(|b| b.raw_start <= pos) - 1;
                i.blocks[idx]
            };
            self.inflate_block(&block, &mut inflate, &mut packed, &mut raw)?;
            let from = (pos - block.raw_start) as usize;
            let to = ((end - block.raw_start) as usize).min(raw.len());
            sink(&raw[from..to]).map_err(|e| self.io("write", e))?;
            pos = block.raw_start + to as u64;
        }
        Ok(())
    }

    fn inflate_block(
        &self,
        b: &Block,
        inflate: &mut Decompress,
        packed: &mut Vec<u8>,
        raw: &mut Vec<u8>,
    ) -> Result<(), SpoolError> {
        packed.resize(b.deflate_len as usize, 0);
        self.file
            .read_exact_at(packed, b.file_off + HEADER_LEN as u64)
            .map_err(|e| self.io("read block", e))?;
        raw.clear();
        raw.resize(b.raw_len as usize, 0);
        inflate.reset(false);
        let corrupt = |what| SpoolError::Corrupt {
            path: self.path.clone(),
            offset: b.file_off,
            what,
        };
        match inflate.decompress(packed, raw, FlushDecompress::Finish) {
            Ok(Status::StreamEnd) if inflate.total_out() == b.raw_len as u64 => Ok(()),
            Ok(_) => Err(corrupt("block shorter or longer than its header says")),
            Err(_) => Err(corrupt("invalid deflate data")),
        }
    }

    fn io(&self, op: &'static str, source: io::Error) -> SpoolError {
        SpoolError::Io {
            path: self.path.clone(),
            op,
            source,
        }
    }
}

impl SpoolWriter {
    /// Opens the spool at `path`, cutting it to `committed` (what the last checkpoint
    /// vouches for) and rebuilding the block index from the member headers.
    pub fn open(path: &Path, committed: SpoolFileOffset) -> Result<Self, SpoolError> {
        let committed_len = committed.get();
        let io = |op, source| SpoolError::Io {
            path: path.to_owned(),
            op,
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| io("open", e))?;
        let on_disk = file.metadata().map_err(|e| io("stat", e))?.len();
        if on_disk < committed_len {
            return Err(SpoolError::Corrupt {
                path: path.to_owned(),
                offset: on_disk,
                what: "file is shorter than the checkpoint says",
            });
        }
        let mut inner = Inner::default();
        let mut off = 0u64;
        let mut hdr = [0u8; HEADER_LEN];
        while off < committed_len {
            let corrupt = |what| SpoolError::Corrupt {
                path: path.to_owned(),
                offset: off,
                what,
            };
            file.read_exact_at(&mut hdr, off)
                .map_err(|_| corrupt("truncated member header"))?;
            let (deflate_len, raw_len) = parse_header(&hdr).ok_or_else(|| corrupt("bad header"))?;
            let member = (HEADER_LEN + TRAILER_LEN) as u64 + deflate_len as u64;
            if off + member > committed_len {
                return Err(corrupt("member runs past the committed length"));
            }
            inner.blocks.push(Block {
                raw_start: inner.sealed_raw,
                file_off: off,
                deflate_len,
                raw_len,
            });
            inner.sealed_raw += raw_len as u64;
            off += member;
        }
        // Cut only after the committed part proved sound, so a bad checkpoint destroys nothing.
        if on_disk > committed_len {
            file.set_len(committed_len).map_err(|e| io("truncate", e))?;
        }
        inner.sealed_file = committed_len;
        Ok(SpoolWriter {
            spool: Arc::new(Spool {
                path: path.to_owned(),
                file,
                inner: RwLock::new(inner),
            }),
            unsynced: false,
        })
    }

    /// The shared handle, for the registry and readers; it stays valid after the writer is gone.
    pub fn spool(&self) -> &Arc<Spool> {
        &self.spool
    }

    /// Bytes of log text held, sealed and unsealed: where the next appended byte goes. Typed,
    /// unlike [`Spool::len`], as the engine keeps it beside source and spool-file offsets.
    pub fn log_len(&self) -> LogOffset {
        LogOffset(self.spool.len())
    }

    /// Bytes of the spool file that hold sealed blocks: where the next member goes.
    pub fn file_len(&self) -> SpoolFileOffset {
        SpoolFileOffset(self.spool.file_len())
    }

    /// Lets `f` append decoded text to the tail; the only way text enters a spool.
    #[inline]
    pub fn append<R>(&mut self, f: impl FnOnce(&mut Vec<u8>) -> R) -> R {
        let mut i = self.spool.inner.write().unwrap_or_else(|e| e.into_inner());
        f(&mut i.tail)
    }

    /// Gives back the memory of an empty tail (for tasks that write rarely).
    pub fn release_tail(&mut self) {
        let mut i = self.spool.inner.write().unwrap_or_else(|e| e.into_inner());
        if i.tail.is_empty() {
            i.tail = Vec::new();
        }
    }

    /// Bytes of text not sealed yet. A crash loses them (they are read again from the source),
    /// and a checkpoint snapshot is only valid while this is 0.
    pub fn tail_len(&self) -> usize {
        self.spool.read_inner().tail.len()
    }

    /// Compresses the tail into a new member and appends it to the file. On error the file is
    /// cut back to its last good length and the tail is kept, so a retry (e.g. after the disk
    /// has space again) neither loses nor repeats text.
    pub fn seal(&mut self, packer: &mut Packer) -> Result<(), SpoolError> {
        let (file_off, raw_len) = {
            let i = self.spool.read_inner();
            if i.tail.is_empty() {
                return Ok(());
            }
            encode_member(&mut packer.compress, &i.tail, &mut packer.scratch);
            (i.sealed_file, i.tail.len())
        };
        if let Err(e) = self.spool.file.write_all_at(&packer.scratch, file_off) {
            // Best effort: a partial member beyond `file_off` would also be cut on restart.
            let _ = self.spool.file.set_len(file_off);
            return Err(self.spool.io("append block", e));
        }
        let deflate_len = (packer.scratch.len() - HEADER_LEN - TRAILER_LEN) as u32;
        let mut i = self.spool.inner.write().unwrap_or_else(|e| e.into_inner());
        let raw_start = i.sealed_raw;
        i.blocks.push(Block {
            raw_start,
            file_off,
            deflate_len,
            raw_len: raw_len as u32,
        });
        i.sealed_raw += raw_len as u64;
        i.sealed_file += packer.scratch.len() as u64;
        i.tail.clear();
        if i.tail.capacity() > (4 << 20) {
            // One huge read batch must not pin memory for the life of the task.
            i.tail.shrink_to(1 << 16);
        }
        self.unsynced = true;
        Ok(())
    }

    /// Whether blocks were sealed since the last sync; clears the flag, for a sync that runs
    /// elsewhere ([`Spool::sync`]). If that sync fails, [`SpoolWriter::mark_unsynced`].
    pub fn take_unsynced(&mut self) -> bool {
        std::mem::take(&mut self.unsynced)
    }

    /// Undoes [`SpoolWriter::take_unsynced`] when the sync it was taken for failed, so the next
    /// commit syncs this spool again.
    pub fn mark_unsynced(&mut self) {
        self.unsynced = true;
    }

    /// Makes the sealed blocks durable; called before a checkpoint that refers to them.
    pub fn sync(&mut self) -> Result<(), SpoolError> {
        if self.unsynced {
            self.spool
                .file
                .sync_data()
                .map_err(|e| self.spool.io("fsync", e))?;
            self.unsynced = false;
        }
        Ok(())
    }
}

/// Builds one gzip member (RFC 1952) holding `raw` into `out`.
fn encode_member(compress: &mut Compress, raw: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.resize(HEADER_LEN, 0);
    out.reserve(raw.len() / 2 + 1024);
    compress.reset();
    loop {
        let consumed = compress.total_in() as usize;
        let status = compress
            .compress_vec(&raw[consumed..], out, FlushCompress::Finish)
            .expect("deflate of in-memory buffers cannot fail");
        if status == Status::StreamEnd {
            break;
        }
        out.reserve(out.capacity().max(4096));
    }
    let deflate_len = (out.len() - HEADER_LEN) as u32;
    let mut crc = Crc::new();
    crc.update(raw);
    out.extend_from_slice(&crc.sum().to_le_bytes());
    out.extend_from_slice(&(raw.len() as u32).to_le_bytes());
    // ID1 ID2 CM=deflate FLG=FEXTRA MTIME=0 XFL=0 OS=unknown, XLEN=12, subfield "DL" of 8 bytes.
    let hdr: [u8; 16] = [
        0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 255, 12, 0, b'D', b'L', 8, 0,
    ];
    out[..16].copy_from_slice(&hdr);
    out[16..20].copy_from_slice(&deflate_len.to_le_bytes());
    out[20..24].copy_from_slice(&(raw.len() as u32).to_le_bytes());
}

fn parse_header(h: &[u8; HEADER_LEN]) -> Option<(u32, u32)> {
    if h[..4] != [0x1f, 0x8b, 8, 4] || h[10..16] != [12, 0, b'D', b'L', 8, 0] {
        return None;
    }
    let d = u32::from_le_bytes(h[16..20].try_into().ok()?);
    let r = u32::from_le_bytes(h[20..24].try_into().ok()?);
    Some((d, r))
}

#[cfg(test)]
mod tests {
    use super::*;
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
