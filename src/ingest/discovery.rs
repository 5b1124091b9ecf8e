//! Discovery: which pod directories and log files exist, and which are new. inotify events
//! only mark what to look at; scans decide.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io;
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;

use crate::oneline::OneLine;
use tracing::{debug, error, info, warn};

use crate::decode::FileDecodeState;
use crate::spool::{SpoolFileOffset, SpoolWriter};
use crate::tail;
use crate::tail::SourceOffset;
use crate::task::{Identity, PodDir};

use super::{Ingest, Source, Task, held};

impl Ingest {
    /// Tells the engine what inotify saw. Events are hints: they only mark what to look at.
    pub fn on_fs_event(&mut self, ev: &notify::Event) {
        use notify::EventKind;
        tracing::trace!(?ev, "inotify");
        if ev.need_rescan() {
            self.metrics.watch_errors.fetch_add(1, Relaxed);
            warn!("inotify queue overflowed; rescanning the log tree");
            self.rescan_all = true;
            return;
        }
        // Opens, reads and closes (ours included: every readdir opens the directory) say
        // nothing about new data; reacting to them would feed back into endless rescans.
        if matches!(ev.kind, EventKind::Access(_)) {
            return;
        }
        for p in &ev.paths {
            let Ok(rel) = p.strip_prefix(&self.s.log_root) else {
                continue;
            };
            let mut comps = rel.components().filter_map(|c| c.as_os_str().to_str());
            let Some(pod) = comps.next() else {
                self.rescan_all = true;
                continue;
            };
            let container = comps.next();
            let file = comps.next();
            match (container, file) {
                (Some(c), Some(_)) if c == self.s.container => {
                    let data = matches!(
                        ev.kind,
                        EventKind::Modify(notify::event::ModifyKind::Data(_))
                    );
                    // Data written to a file no source holds: a new file, or one closed at
                    // its end that grew after all; the directory scan decides which.
                    let unheld = || {
                        self.tasks
                            .get(pod)
                            .is_some_and(|t| t.sources.iter().all(|s| s.path != *p))
                    };
                    if !data || unheld() {
                        self.dirty_pods.insert(pod.to_owned());
                    }
                    self.dirty_read.insert(pod.to_owned());
                }
                (Some(_), Some(_)) => {}
                _ => {
                    self.dirty_pods.insert(pod.to_owned());
                }
            }
        }
    }

    /// inotify failed (watch limit, queue overflow): fall back to rescans.
    pub fn on_watch_error(&mut self, err: &str) {
        self.metrics.watch_errors.fetch_add(1, Relaxed);
        warn!(error = %err, "inotify error; rescanning the log tree");
        self.rescan_all = true;
    }

    /// Lists the log root: new pod directories become tasks, vanished ones end their tasks.
    pub fn scan_all(&mut self) {
        self.rescan_all = false;
        self.metrics.rescans.fetch_add(1, Relaxed);
        let root = self.s.log_root.clone();
        if let Err(e) = self.watcher.watch(&root) {
            self.watch_failed(&root, &e);
        }
        let mut present = BTreeSet::new();
        match fs::read_dir(&root) {
            Ok(rd) => {
                for e in rd.flatten() {
                    if let Some(name) = e.file_name().to_str() {
                        present.insert(name.to_owned());
                    }
                }
                self.warned.remove(&root);
            }
            Err(e) => {
                if self.warned.insert(root.clone()) {
                    error!(log_root = %root.display(), error = %OneLine(&e), "cannot list the log root; retrying");
                }
                return;
            }
        }
        let known: Vec<String> = self.tasks.keys().map(|p| p.name.clone()).collect();
        for name in known.iter().filter(|n| !present.contains(*n)) {
            self.scan_pod(name);
        }
        self.ignored.retain(|n| present.contains(n));
        for name in &present {
            self.scan_pod(name);
        }
    }

    fn watch_failed(&mut self, dir: &Path, err: &notify::Error) {
        self.metrics.watch_errors.fetch_add(1, Relaxed);
        if !self.degraded {
            let missing = match &err.kind {
                notify::ErrorKind::PathNotFound => true,
                notify::ErrorKind::Io(e) => e.kind() == std::io::ErrorKind::NotFound,
                _ => false,
            };
            if missing {
                // At the log root this is a setting to check, not a limit to raise.
                warn!(dir = %dir.display(), "cannot watch directory: it does not exist (check log_root); polling rescans until it appears");
            } else if matches!(err.kind, notify::ErrorKind::MaxFilesWatch) {
                warn!(dir = %dir.display(), error = %OneLine(err), "cannot watch directory (inotify watch limit?); falling back to polling rescans");
            } else {
                warn!(dir = %dir.display(), error = %OneLine(err), "cannot watch directory; falling back to polling rescans");
            }
        }
        self.degraded = true;
    }

    pub(super) fn scan_pod(&mut self, name: &str) {
        let pod_path = self.s.log_root.join(name);
        let exists = pod_path.is_dir();
        if !exists {
            if let Some(t) = self.tasks.get_mut(name)
                && !t.dir_gone
            {
                debug!(pod_dir = %name, "pod directory removed; draining its files");
                t.dir_gone = true;
                self.dirty_read.insert(name.to_owned());
            }
            self.watcher.unwatch(&pod_path);
            return;
        }
        if self.ignored.contains(name) {
            return;
        }
        if !self.tasks.contains_key(name) {
            let Some(pod) = PodDir::parse(name) else {
                self.ignored.insert(name.to_owned());
                return;
            };
            let identity = self.identity.identify(&pod);
            if identity == Identity::Ignore {
                self.ignored.insert(name.to_owned());
                return;
            }
            let path = self.spool_path(name);
            let writer = match SpoolWriter::open(&path, SpoolFileOffset::ZERO) {
                Ok(w) => w,
                Err(e) => {
                    self.metrics.spool_errors.fetch_add(1, Relaxed);
                    error!(pod_dir = %name, error = %OneLine(&e), "cannot create spool; retrying on the next scan");
                    return;
                }
            };
            self.spool_dir_unsynced = true;
            info!(pod_dir = %name, identity = %identity, "new pod log directory");
            self.metrics.tasks_started.fetch_add(1, Relaxed);
            let container_dir = pod_path.join(&self.s.container);
            self.tasks
                .insert(pod.clone(), Task::new(pod, identity, container_dir, writer));
        }
        let Some(t) = self.tasks.get_mut(name) else {
            return;
        };
        if t.identity == Identity::Pending {
            t.identity = self.identity.identify(&t.pod);
            if t.identity == Identity::Ignore {
                self.drop_task(name);
                return;
            }
        }
        t.dir_gone = false;
        let cdir = t.container_dir.clone();
        self.publish(name);
        for d in [&pod_path, &cdir] {
            if d.is_dir()
                && let Err(e) = self.watcher.watch(d)
            {
                self.watch_failed(d, &e);
            }
        }
        self.scan_container(name);
        self.dirty_read.insert(name.to_owned());
    }

    /// Opens the container's files that are new to the task, in log order, behind the ones it
    /// is already reading. A file is new unless it is being read, was read to its end, or
    /// belongs to an older restart than one already taken.
    fn scan_container(&mut self, name: &str) {
        let Some(t) = self.tasks.get_mut(name) else {
            return;
        };
        if t.restoring.is_some() || t.spool_lost {
            // The files being resumed are not all open yet: any file could be one of them.
            return;
        }
        let found = match tail::list(&t.container_dir) {
            Ok(f) => f,
            Err(e) => {
                if self.warned.insert(t.container_dir.clone()) {
                    error!(dir = %t.container_dir.display(), error = %OneLine(&e), "cannot list container log directory; retrying");
                }
                return;
            }
        };
        for f in found {
            if let Some(s) = t.sources.iter_mut().find(|s| s.held == (f.dev, f.ino)) {
                s.path = f.path;
                continue;
            }
            // A file of an older restart is never new; one read to its end may have grown.
            let drained = t
                .done
                .iter()
                .any(|d| d.key.dev == f.dev && d.key.ino == f.ino);
            if !drained && t.last_restart.is_some_and(|r| f.name.restart() < r) {
                continue;
            }
            let file = match File::open(&f.path) {
                Ok(file) => file,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    // Removed by the kubelet since the listing (a rotated file beyond
                    // containerLogMaxFiles, or gzipped): nothing of it was ours to lose here.
                    debug!(file = %f.path.display(), "log file gone between listing and open");
                    continue;
                }
                Err(e) => {
                    self.metrics.unreadable_files.fetch_add(1, Relaxed);
                    if self.warned.insert(f.path.clone()) {
                        error!(file = %f.path.display(), error = %OneLine(&e), "cannot open log file; retrying on every rescan");
                    }
                    continue;
                }
            };
            self.warned.remove(&f.path);
            let was_read = t.done.iter().position(|d| {
                d.key.dev == f.dev
                    && d.key.ino == f.ino
                    && tail::is_same(&file, &d.key).unwrap_or(false)
            });
            if let Some(i) = was_read {
                let d = t.done[i];
                let grown = d
                    .len
                    .is_some_and(|len| file.metadata().is_ok_and(|m| m.len() > len.get()));
                if !grown {
                    continue;
                }
                // Closed at its end, then written to after all (a late write, or a status that
                // said the container had ended when it had not): read on from where reading
                // stopped. It precedes every file still open, which were all found after it.
                let offset = d.len.unwrap_or_default();
                warn!(file = %f.path.display(), offset = offset.get(), "log file grew after it was read to its end and closed; reading on");
                t.done.remove(i);
                self.metrics.files_opened.fetch_add(1, Relaxed);
                t.sources.push_front(Source {
                    held: held(&file),
                    restart: f.name.restart(),
                    key: d.key,
                    path: f.path,
                    file,
                    offset,
                    decode: FileDecodeState::default(),
                });
                continue;
            }
            let key = match tail::key_of(&file) {
                Ok(k) => k,
                Err(e) => {
                    warn!(file = %f.path.display(), error = %OneLine(&e), "cannot read log file; retrying");
                    continue;
                }
            };
            debug!(file = %f.path.display(), "following log file");
            self.metrics.files_opened.fetch_add(1, Relaxed);
            t.last_restart = Some(
                t.last_restart
                    .map_or(f.name.restart(), |r| r.max(f.name.restart())),
            );
            t.sources.push_back(Source {
                held: held(&file),
                restart: f.name.restart(),
                key,
                path: f.path,
                file,
                offset: SourceOffset::ZERO,
                decode: FileDecodeState::default(),
            });
        }
    }
}
