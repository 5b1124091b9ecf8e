//! Directory watching: the seam between the engine and inotify. Watches are hints only (see
//! [`crate::ingest`]): polls and rescans make a missed or refused watch harmless.

use std::path::Path;

/// Registers inotify watches; a trait so that tests can drive the engine without inotify.
pub trait DirWatcher: Send {
    /// Watches `dir` (not recursively); watching a watched directory again is a no-op. An error
    /// (the watch limit, usually) makes the engine rescan the whole tree on every poll instead.
    fn watch(&mut self, dir: &Path) -> Result<(), notify::Error>;
    /// Stops watching `dir`, whose pod was let go; failures are ignored.
    fn unwatch(&mut self, dir: &Path);
}

/// For tests and for a polling-only mode.
pub struct NoWatch;

impl DirWatcher for NoWatch {
    fn watch(&mut self, _dir: &Path) -> Result<(), notify::Error> {
        Ok(())
    }
    fn unwatch(&mut self, _dir: &Path) {}
}
