//! Wakes the control loop when the cgroup tree changes, instead of waiting
//! for the next rescan: an inotify watch on the root and on every cgroup
//! below it (a cgroup made or removed below it; its `cgroup.events`
//! changing, i.e. its first process joined or its last one left).
use std::{
    collections::HashMap,
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
};

use tokio::io::unix::AsyncFd;

/// Directory events: a cgroup made or removed below the watched one, and
/// `cgroup.events` rewritten (populated changed).
const DIR_MASK: u32 = libc::IN_CREATE | libc::IN_DELETE | libc::IN_ONLYDIR;
const FILE_MASK: u32 = libc::IN_MODIFY;

/// An inotify instance over a cgroup tree.
pub struct CgroupWatch {
    fd: AsyncFd<OwnedFd>,
    /// Watched path → watch descriptor.
    watched: HashMap<PathBuf, i32>,
}

impl CgroupWatch {
    /// Needs a tokio runtime (the descriptor is registered with it).
    pub fn new() -> io::Result<CgroupWatch> {
        // SAFETY: plain inotify_init1; the descriptor is owned below.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor nothing else owns.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: the AsyncFd owns the descriptor, so it stays open for as
        // long as it is registered.
        let fd = unsafe { AsyncFd::register_with_interest(owned, tokio::io::Interest::READABLE) }?;
        Ok(CgroupWatch {
            fd,
            watched: HashMap::new(),
        })
    }

    fn add(&self, path: &Path, mask: u32) -> Option<i32> {
        let c = CString::new(path.as_os_str().as_bytes()).ok()?;
        // SAFETY: a valid NUL-terminated path on our inotify descriptor.
        let wd =
            unsafe { libc::inotify_add_watch(self.fd.get_ref().as_raw_fd(), c.as_ptr(), mask) };
        (wd >= 0).then_some(wd)
    }

    /// Watches `root` and `dirs` (cgroups below it, relative paths): new
    /// ones are added, watches of cgroups no longer listed are forgotten
    /// (the kernel drops a removed directory's watch itself).
    pub fn sync<'a>(&mut self, root: &Path, dirs: impl IntoIterator<Item = &'a str>) {
        let mut now: HashMap<PathBuf, i32> = HashMap::new();
        let wanted = std::iter::once(root.to_owned()).chain(dirs.into_iter().map(|d| root.join(d)));
        for dir in wanted {
            for (path, mask) in [
                (dir.clone(), DIR_MASK),
                (dir.join("cgroup.events"), FILE_MASK),
            ] {
                let wd = match self.watched.get(&path) {
                    Some(wd) => Some(*wd),
                    None => self.add(&path, mask),
                };
                if let Some(wd) = wd {
                    now.insert(path, wd);
                }
            }
        }
        self.watched = now;
    }

    /// Paths watched now.
    pub fn len(&self) -> usize {
        self.watched.len()
    }

    pub fn is_empty(&self) -> bool {
        self.watched.is_empty()
    }

    /// Resolves once something changed in the watched tree (its events
    /// read and dropped: the loop rescans the tree anyway).
    pub async fn changed(&self) {
        loop {
            let Ok(mut guard) = self.fd.readable().await else {
                return std::future::pending().await;
            };
            let mut buf = [0u8; 4096];
            let mut any = false;
            loop {
                // SAFETY: reads into `buf`, bounded by its length.
                let n = unsafe {
                    libc::read(
                        self.fd.get_ref().as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                    )
                };
                if n <= 0 {
                    break;
                }
                any = true;
            }
            guard.clear_ready();
            if any {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_directory_made_or_removed_below_a_watched_one_wakes_it() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("a")).unwrap();
        let mut watch = CgroupWatch::new().unwrap();
        watch.sync(root.path(), ["a"]);
        // Two directories watched (no cgroup.events on a plain file system).
        assert_eq!(watch.len(), 2);
        let quiet = tokio::time::timeout(Duration::from_millis(100), watch.changed()).await;
        assert!(quiet.is_err(), "nothing changed: no wakeup");
        std::fs::create_dir(root.path().join("a/b")).unwrap();
        tokio::time::timeout(Duration::from_secs(2), watch.changed())
            .await
            .expect("a new directory below a watched one wakes");
        watch.sync(root.path(), ["a", "a/b"]);
        std::fs::remove_dir(root.path().join("a/b")).unwrap();
        tokio::time::timeout(Duration::from_secs(2), watch.changed())
            .await
            .expect("a removed directory wakes");
        watch.sync(root.path(), ["a"]);
        assert_eq!(watch.len(), 2, "the removed one is forgotten");
    }
}
