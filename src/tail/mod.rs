//! The files of one container's log: naming, identity and order.
//!
//! The kubelet writes `<n>.log` for the n-th start of a container and rotates by renaming it to
//! `<n>.log.<YYYYMMDD-HHMMSS>` (later gzipped to `.gz`, then deleted). The log of a container
//! is therefore, in order: for each restart n, its rotated files by timestamp, then `<n>.log`.
//! Files are followed by inode with their fd held, so a rename changes nothing for a reader and
//! a deleted file can still be read to its end.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use flate2::Crc;

mod watch;
pub use watch::{DirWatcher, NoWatch};

/// Identifies a file across renames and guards against inode reuse: the inode alone may be
/// handed to a new file once the old one is deleted, the first bytes of a log differ.
///
/// Part of the checkpoint format (as [`crate::checkpoint::FileKey`]): a field added later
/// must be `#[serde(default)]`.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize, PartialEq, Eq, Hash)]
pub struct FileKey {
    /// Device number: inode numbers are unique per file system only.
    pub dev: u64,
    /// Inode number: follows the file through the kubelet's rotation rename.
    pub ino: u64,
    /// Birth time in nanoseconds (statx), 0 where the filesystem does not record it. Tells a
    /// reused inode number apart even when the file is empty and has no fingerprint yet.
    #[serde(default)]
    pub born_ns: u64,
    /// How many leading bytes `fp` covers (up to 64; fewer while the file was shorter).
    pub fp_len: u32,
    /// CRC-32 of those bytes.
    pub fp: u32,
}

/// A byte position in a source log file (the runtime's CRI or json-file records): where
/// reading resumes. A type of its own because it travels beside positions in the decoded text
/// and in the spool file, which count other bytes; `#[serde(transparent)]` keeps the checkpoint
/// a plain number.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(transparent)]
pub struct SourceOffset(u64);

impl SourceOffset {
    /// The start of a file.
    pub const ZERO: SourceOffset = SourceOffset(0);

    /// The offset `n` bytes into the file.
    pub const fn new(n: u64) -> Self {
        SourceOffset(n)
    }

    /// The offset as a byte count, for `pread`, comparisons with a file's size and messages.
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl std::ops::AddAssign<u64> for SourceOffset {
    fn add_assign(&mut self, n: u64) {
        self.0 += n;
    }
}

impl std::fmt::Display for SourceOffset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// How many leading bytes identify a file's content (CRI lines start with a nanosecond
/// timestamp, so two log files differ well within this).
pub const FINGERPRINT_LEN: u32 = 64;

/// A log file name the kubelet writes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogName {
    /// `<n>.log.<timestamp>`: a rotated, not yet compressed file. Sorts before the live file
    /// of the same restart.
    Rotated(u32, String),
    /// `<n>.log`: the file the runtime writes now.
    Live(u32),
}

impl LogName {
    /// `None` for anything else, including compressed rotations (`.gz`) and temp files.
    pub fn parse(name: &str) -> Option<LogName> {
        let (num, rest) = name.split_once(".log")?;
        if num.is_empty() || num.len() > 9 || !num.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let n: u32 = num.parse().ok()?;
        if rest.is_empty() {
            return Some(LogName::Live(n));
        }
        let ts = rest.strip_prefix('.')?;
        let ok =
            !ts.is_empty() && ts.len() <= 32 && ts.bytes().all(|b| b.is_ascii_digit() || b == b'-');
        ok.then(|| LogName::Rotated(n, ts.to_owned()))
    }

    /// The container start `n` the file belongs to: all files of a start come before those of the
    /// next one.
    pub fn restart(&self) -> u32 {
        match self {
            LogName::Rotated(n, _) | LogName::Live(n) => *n,
        }
    }

    fn order_key(&self) -> (u32, u8, &str) {
        match self {
            LogName::Rotated(n, ts) => (*n, 0, ts.as_str()),
            LogName::Live(n) => (*n, 1, ""),
        }
    }
}

/// A log file seen in a container directory.
#[derive(Debug, Clone)]
pub struct Found {
    /// The parsed name, which gives the file's place in the log.
    pub name: LogName,
    /// Where it was listed; the next rotation may rename it before it is opened.
    pub path: PathBuf,
    /// Device when listed; with `ino`, tells a new file from one already read or open.
    pub dev: u64,
    /// Inode when listed; see `dev`. Only a hint: the fingerprint decides once opened.
    pub ino: u64,
}

/// The container directory's log files in log order. A missing directory is an empty list.
pub fn list(dir: &Path) -> io::Result<Vec<Found>> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry?;
        let Some(name) = entry.file_name().to_str().and_then(LogName::parse) else {
            continue;
        };
        // Followed, because on dockershim nodes the kubelet's `<n>.log` is a symlink to the
        // runtime's json-file log. A file renamed or deleted since readdir is simply gone.
        let Ok(md) = fs::metadata(entry.path()) else {
            continue;
        };
        if !md.is_file() {
            continue;
        }
        out.push(Found {
            name,
            path: entry.path(),
            dev: md.dev(),
            ino: md.ino(),
        });
    }
    out.sort_by(|a, b| a.name.order_key().cmp(&b.name.order_key()));
    Ok(out)
}

/// CRC-32 of the first `len` bytes of `file` (fewer if the file is shorter).
pub fn fingerprint(file: &File, len: u32) -> io::Result<(u32, u32)> {
    let mut buf = [0u8; FINGERPRINT_LEN as usize];
    let want = len.min(FINGERPRINT_LEN) as usize;
    let mut got = 0;
    while got < want {
        match file.read_at(&mut buf[got..want], got as u64)? {
            0 => break,
            n => got += n,
        }
    }
    let mut crc = Crc::new();
    crc.update(&buf[..got]);
    Ok((got as u32, crc.sum()))
}

fn born_ns(md: &fs::Metadata) -> u64 {
    md.created()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as u64)
}

/// The identity of an open file, fingerprinted over as much as it holds (up to 64 bytes).
pub fn key_of(file: &File) -> io::Result<FileKey> {
    let md = file.metadata()?;
    let (fp_len, fp) = fingerprint(file, FINGERPRINT_LEN)?;
    Ok(FileKey {
        dev: md.dev(),
        ino: md.ino(),
        born_ns: born_ns(&md),
        fp_len,
        fp,
    })
}

/// Finds, among the gzipped rotations in `dir` (the kubelet compresses a rotated file at the
/// next rotation), the one whose content starts like the file `key` was taken from, and
/// decompresses it into an unlinked temporary file in `scratch`: read through that fd, it is
/// the original file again, offsets and all. `None` if there is none, or if `key` has no
/// fingerprint to recognise it by.
pub fn recover_gz(dir: &Path, key: &FileKey, scratch: &Path) -> io::Result<Option<File>> {
    use std::io::{Read, Write};
    if key.fp_len == 0 {
        return Ok(None);
    }
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if !name
            .strip_suffix(".gz")
            .and_then(LogName::parse)
            .is_some_and(|n| matches!(n, LogName::Rotated(..)))
        {
            continue;
        }
        let mut gz = flate2::read::MultiGzDecoder::new(File::open(&path)?);
        let mut head = vec![0; key.fp_len as usize];
        if gz.read_exact(&mut head).is_err() {
            continue;
        }
        let mut crc = Crc::new();
        crc.update(&head);
        if crc.sum() != key.fp {
            continue;
        }
        let tmp = scratch.join(format!(".recovered-{}-{}", key.ino, std::process::id()));
        let mut out = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        let _ = fs::remove_file(&tmp);
        out.write_all(&head)?;
        io::copy(&mut gz, &mut out)?;
        return Ok(Some(out));
    }
    Ok(None)
}

/// Whether `file` is the file `key` was taken from: same inode, same birth time where the
/// filesystem keeps one, and same leading bytes. A key of an empty file on a filesystem
/// without birth times proves nothing; it matches only a file that is still empty.
pub fn is_same(file: &File, key: &FileKey) -> io::Result<bool> {
    let md = file.metadata()?;
    if md.dev() != key.dev || md.ino() != key.ino {
        return Ok(false);
    }
    let born = born_ns(&md);
    if born != 0 && key.born_ns != 0 && born != key.born_ns {
        return Ok(false);
    }
    if key.fp_len == 0 && key.born_ns == 0 {
        return Ok(md.len() == 0);
    }
    Ok(fingerprint(file, key.fp_len)? == (key.fp_len, key.fp))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_order() {
        assert_eq!(LogName::parse("0.log"), Some(LogName::Live(0)));
        assert_eq!(LogName::parse("12.log"), Some(LogName::Live(12)));
        assert_eq!(
            LogName::parse("1.log.20240501-101500"),
            Some(LogName::Rotated(1, "20240501-101500".into()))
        );
        for bad in [
            "0.log.20240501-101500.gz",
            "x.log",
            ".log",
            "0.log.tmp",
            "0.logx",
            "0.txt",
            "0.log.",
        ] {
            assert_eq!(LogName::parse(bad), None, "{bad}");
        }
        let dir = tempfile::tempdir().unwrap();
        for n in [
            "1.log",
            "0.log",
            "0.log.20240101-000002",
            "0.log.20240101-000001",
            "0.log.20231231-235959.gz",
            "1.log.20240101-000003",
        ] {
            fs::write(dir.path().join(n), n).unwrap();
        }
        let names: Vec<_> = list(dir.path())
            .unwrap()
            .into_iter()
            .map(|f| f.path.file_name().unwrap().to_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            names,
            [
                "0.log.20240101-000001",
                "0.log.20240101-000002",
                "0.log",
                "1.log.20240101-000003",
                "1.log"
            ]
        );
    }

    #[test]
    fn identity_survives_rename_not_replacement() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("0.log");
        fs::write(&a, "2024-05-01T00:00:00Z stdout F one\n").unwrap();
        let key = key_of(&File::open(&a).unwrap()).unwrap();
        let b = dir.path().join("0.log.20240501-000000");
        fs::rename(&a, &b).unwrap();
        assert!(is_same(&File::open(&b).unwrap(), &key).unwrap());
        fs::write(&a, "2024-05-01T00:00:01Z stdout F two\n").unwrap();
        assert!(!is_same(&File::open(&a).unwrap(), &key).unwrap());
    }
}
