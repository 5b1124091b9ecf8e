//! The ingest side of a spool: text enters the unsealed tail, a seal compresses it into a new
//! member at the end of the file, and opening cuts the file back to what a checkpoint vouches
//! for.

use std::fs::OpenOptions;
use std::ops::{Deref, DerefMut};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, RwLock, RwLockWriteGuard};

use flate2::{Compress, Compression};

use super::member::{HEADER_LEN, TRAILER_LEN, encode_member, parse_header};
use super::{Block, Inner, LogOffset, Spool, SpoolError, SpoolFileOffset};

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

/// The unsealed tail of a spool, held for writing (see [`SpoolWriter::tail`]). A guard rather
/// than a closure so the engine's call reads in the order the bytes move: read, decode into
/// the spool.
pub struct TailMut<'a>(RwLockWriteGuard<'a, Inner>);

impl Deref for TailMut<'_> {
    type Target = Vec<u8>;

    #[inline]
    fn deref(&self) -> &Vec<u8> {
        &self.0.tail
    }
}

impl DerefMut for TailMut<'_> {
    #[inline]
    fn deref_mut(&mut self) -> &mut Vec<u8> {
        &mut self.0.tail
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

    /// The unsealed tail, for the decoder to write text into in place: the only way text
    /// enters a spool. Readers of the spool wait while it is held, so hold it for one decode.
    #[inline]
    pub fn tail(&mut self) -> TailMut<'_> {
        TailMut(self.spool.inner.write().unwrap_or_else(|e| e.into_inner()))
    }

    /// Lets `f` append text to the tail; [`SpoolWriter::tail`] for callers that hold a closure.
    #[inline]
    pub fn append<R>(&mut self, f: impl FnOnce(&mut Vec<u8>) -> R) -> R {
        f(&mut self.tail())
    }

    /// Gives back the memory of an empty tail (for tasks that write rarely): the buffer is
    /// returned, for the caller to reuse or drop.
    pub fn release_tail(&mut self) -> Vec<u8> {
        let mut i = self.spool.inner.write().unwrap_or_else(|e| e.into_inner());
        if i.tail.is_empty() {
            std::mem::take(&mut i.tail)
        } else {
            Vec::new()
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
        self.seal_swapping(packer, None).map(drop)
    }

    /// [`SpoolWriter::seal`] that also gives the sealed text away, for a directory archive
    /// written as the task runs ([`crate::archive::append`]): on success `text` holds it, the
    /// tail continues in `text`'s former buffer (cleared), and the text's position in the log
    /// is returned. On error nothing is swapped.
    pub fn seal_taking(
        &mut self,
        packer: &mut Packer,
        text: &mut Vec<u8>,
    ) -> Result<LogOffset, SpoolError> {
        self.seal_swapping(packer, Some(text))
    }

    fn seal_swapping(
        &mut self,
        packer: &mut Packer,
        swap: Option<&mut Vec<u8>>,
    ) -> Result<LogOffset, SpoolError> {
        let (file_off, raw_len) = {
            let i = self.spool.read_inner();
            if i.tail.is_empty() {
                return Ok(LogOffset(i.sealed_raw));
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
        match swap {
            Some(text) => {
                text.clear();
                std::mem::swap(&mut i.tail, text);
            }
            None => {
                i.tail.clear();
                if i.tail.capacity() > (4 << 20) {
                    // One huge read batch must not pin memory for the life of the task.
                    i.tail.shrink_to(1 << 16);
                }
            }
        }
        self.unsynced = true;
        Ok(LogOffset(raw_start))
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
