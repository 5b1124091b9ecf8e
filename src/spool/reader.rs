//! The reading side of a spool, shared by the ingest thread, the archive and the HTTP
//! endpoint: block positions are copied under a short read lock, the file is read without one.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{RwLock, RwLockReadGuard};

use flate2::{Decompress, FlushDecompress, Status};

use super::member::HEADER_LEN;
use super::{Block, Inner, SpoolError};

/// A readable handle on a task's spool, shared between the ingest path and readers.
#[derive(Debug)]
pub struct Spool {
    pub(super) path: PathBuf,
    pub(super) file: File,
    pub(super) inner: RwLock<Inner>,
}

impl Spool {
    /// The spool file, for messages and for operators (`zcat` prints the sealed part).
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(super) fn read_inner(&self) -> RwLockReadGuard<'_, Inner> {
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
    /// [`super::SpoolWriter::take_unsynced`]); safe while the writer goes on appending.
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
    /// response chunk); keep ranges small. Whole blocks are inflated straight into the buffer.
    pub fn read_to_vec(&self, start: u64, end: u64) -> Result<Vec<u8>, SpoolError> {
        let mut buf = Vec::with_capacity(end.saturating_sub(start) as usize);
        self.read(start, end, Out::Vec(&mut buf))?;
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
        self.read(start, end, Out::Sink(sink))
    }

    /// Where a caller that reads `[from, limit)` in pieces of about `want` bytes should end
    /// the piece that starts at `from`: on a block boundary where one lies within the piece
    /// (else at the end of the block `from` is in, unless that is more than four pieces away),
    /// so that consecutive pieces inflate each block once rather than the block they split
    /// twice. Always after `from` when `from < limit`, never after `limit`.
    pub fn piece_end(&self, from: u64, limit: u64, want: u64) -> u64 {
        let target = from.saturating_add(want.max(1));
        if target >= limit {
            return limit;
        }
        let i = self.read_inner();
        if target >= i.sealed_raw {
            // In the unsealed tail: nothing is inflated there.
            return target;
        }
        let b = i.blocks[i.blocks.partition_point(|b| b.raw_start <= target) - 1];
        let block_end = b.raw_start + b.raw_len as u64;
        if b.raw_start > from {
            b.raw_start
        } else if block_end - from > want.saturating_mul(4) {
            // A block far larger than a piece (block_bytes can be set to 64 MiB): the piece
            // stays bounded, and the block is inflated once per piece instead.
            target
        } else {
            block_end.min(limit)
        }
    }

    fn read(&self, start: u64, end: u64, mut out: Out<'_>) -> Result<(), SpoolError> {
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
                        out.put(&i.tail[from..to])
                            .map_err(|e| self.io("write", e))?;
                    }
                    return Ok(());
                }
                let idx = i.blocks.partition_point(|b| b.raw_start <= pos) - 1;
                i.blocks[idx]
            };
            let block_end = block.raw_start + block.raw_len as u64;
            if let Out::Vec(v) = &mut out
                && pos == block.raw_start
                && end >= block_end
            {
                self.inflate_block(&block, &mut inflate, &mut packed, v)?;
                pos = block_end;
                continue;
            }
            raw.clear();
            self.inflate_block(&block, &mut inflate, &mut packed, &mut raw)?;
            let from = (pos - block.raw_start) as usize;
            let to = ((end - block.raw_start) as usize).min(raw.len());
            out.put(&raw[from..to]).map_err(|e| self.io("write", e))?;
            pos = block.raw_start + to as u64;
        }
        Ok(())
    }

    /// Appends the text of block `b` to `out`, inflated into its spare capacity (no zeroing,
    /// no copy).
    fn inflate_block(
        &self,
        b: &Block,
        inflate: &mut Decompress,
        packed: &mut Vec<u8>,
        out: &mut Vec<u8>,
    ) -> Result<(), SpoolError> {
        packed.resize(b.deflate_len as usize, 0);
        self.file
            .read_exact_at(packed, b.file_off + HEADER_LEN as u64)
            .map_err(|e| self.io("read block", e))?;
        out.reserve(b.raw_len as usize);
        inflate.reset(false);
        let corrupt = |what| SpoolError::Corrupt {
            path: self.path.clone(),
            offset: b.file_off,
            what,
        };
        // decompress_vec writes into the spare capacity and never grows `out`; text beyond
        // the header's length is caught by the count below and cut off again.
        let before = out.len();
        let status = inflate.decompress_vec(packed, out, FlushDecompress::Finish);
        match status {
            Ok(Status::StreamEnd) if inflate.total_out() == b.raw_len as u64 => Ok(()),
            Ok(_) => {
                out.truncate(before);
                Err(corrupt("block shorter or longer than its header says"))
            }
            Err(_) => {
                out.truncate(before);
                Err(corrupt("invalid deflate data"))
            }
        }
    }

    pub(super) fn io(&self, op: &'static str, source: io::Error) -> SpoolError {
        SpoolError::Io {
            path: self.path.clone(),
            op,
            source,
        }
    }
}

/// Where [`Spool::read`] puts text: a caller's sink, or a buffer whole blocks are inflated
/// straight into.
enum Out<'a> {
    Sink(&'a mut dyn FnMut(&[u8]) -> io::Result<()>),
    Vec(&'a mut Vec<u8>),
}

impl Out<'_> {
    fn put(&mut self, text: &[u8]) -> io::Result<()> {
        match self {
            Out::Sink(sink) => sink(text),
            Out::Vec(v) => {
                v.extend_from_slice(text);
                Ok(())
            }
        }
    }
}
