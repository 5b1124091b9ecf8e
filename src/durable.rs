//! Durable file replacement, written once for every file the agent replaces whole (the
//! checkpoint, a directory archive's log).
//!
//! Write a temp file beside the target, fsync it, rename it over the target, fsync the
//! directory. If the process or the machine dies at any instant, the target is either the old
//! file or the new one, whole; after the directory fsync the new one survives a power loss (a
//! rename alone may be undone by one).
//!
//! The temp file has a fixed name (`.{name}.tmp`), not a random one as `tempfile` would give:
//! a temp file left by a crash is then truncated and reused by the next replace of the same
//! file, rather than staying forever beside the checkpoint or in the archive directory Druid
//! reads. `tempfile` would save the two lines that name and remove it, not the fsyncs.

use std::fs::{self, File};
use std::io::{self, BufWriter};
use std::path::Path;

/// Replaces `dest` with what `write` writes, atomically and durably. `io` turns a failed step
/// (named: "create", "write", "fsync", "rename", "fsync directory") into the caller's error,
/// so that the error names the caller's file and what failed; errors of `write` itself are
/// passed through. A failed attempt leaves no temp file behind: a half-written one is never
/// read, but wastes the space that is probably lacking.
pub fn replace<E>(
    dest: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> Result<(), E>,
    io: impl Fn(&'static str, io::Error) -> E,
) -> Result<(), E> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    let file = File::create(&tmp).map_err(|e| io("create", e))?;
    let mut out = BufWriter::with_capacity(1 << 16, file);
    let written = write(&mut out).and_then(|()| {
        let file = out.into_inner().map_err(|e| io("write", e.into_error()))?;
        file.sync_all().map_err(|e| io("fsync", e))
    });
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    // If we die here the old file is still whole.
    fs::rename(&tmp, dest).map_err(|e| io("rename", e))?;
    sync_dir(dir).map_err(|e| io("fsync directory", e))
}

/// Makes a rename, creation or unlink in `dir` durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn replaces_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("f");
        fs::write(&dest, b"old").unwrap();
        let io = |_, e: io::Error| e;
        replace(&dest, |w| w.write_all(b"new"), io).unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"new");
        let failed = replace(
            &dest,
            |w| {
                w.write_all(b"half")?;
                Err(io::Error::other("disk gone"))
            },
            io,
        );
        assert!(failed.is_err());
        assert_eq!(fs::read(&dest).unwrap(), b"new");
        let left: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "no temp file left behind");
    }

    /// A temp file a crash left behind is reused, not kept beside the new one forever.
    #[test]
    fn a_crashed_attempts_temp_file_is_reused() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("f");
        fs::write(dir.path().join(".f.tmp"), b"left by a crash, and longer").unwrap();
        replace(&dest, |w| w.write_all(b"new"), |_, e: io::Error| e).unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"new");
        let left: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "no temp file left behind");
    }
}
