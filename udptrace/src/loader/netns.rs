//! Network namespaces: which ones per-namespace hooks cover, and doing something inside one.

use std::{
    collections::BTreeMap,
    fs::File,
    io,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

/// Which network namespaces per-namespace hooks (netfilter links) cover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum NetnsScope {
    /// The namespace udptrace runs in.
    #[default]
    Host,
    /// That one, every namespace named under /run/netns and every process's, including
    /// those that appear while tracing.
    All,
}

impl NetnsScope {
    /// Namespace files to cover: our own; with `All` also every /run/netns entry and every
    /// process's namespace (containers and pods). Duplicates are removed by inode later.
    pub fn files(self) -> Vec<PathBuf> {
        let mut files = vec![PathBuf::from("/proc/self/ns/net")];
        if self == Self::All {
            let entries = |dir: &str| -> Vec<PathBuf> {
                std::fs::read_dir(dir)
                    .into_iter()
                    .flatten()
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .collect()
            };
            let mut named = entries("/run/netns");
            named.sort();
            files.extend(named);
            files.extend(
                entries("/proc")
                    .into_iter()
                    .filter(|p| {
                        p.file_name().is_some_and(|n| {
                            n.to_string_lossy().bytes().all(|b| b.is_ascii_digit())
                        })
                    })
                    .map(|p| p.join("ns/net")),
            );
        }
        files
    }
}

/// The network namespaces a scope reaches now, each under one file that names it (the
/// same namespace is often named by many: every process in it, a /run/netns entry).
///
/// A namespace no file names any more has no process and no bind mount left: nothing can
/// send in it again, and the kernel frees it once the last reference goes. udptrace holds
/// such a reference (a socket, a namespace file) only while the namespace is listed here,
/// so that its inode number cannot be given to a new namespace while udptrace still counts
/// it as covered.
#[derive(Debug, Default, Clone)]
pub struct Namespaces {
    by_inode: BTreeMap<u64, PathBuf>,
}

impl Namespaces {
    /// Lists the namespaces `scope` reaches now.
    pub fn list(scope: NetnsScope) -> Self {
        let mut by_inode = BTreeMap::new();
        for file in scope.files() {
            if let Some(inode) = inode(&file) {
                by_inode.entry(inode).or_insert(file);
            }
        }
        Self { by_inode }
    }

    /// Namespace inodes and the file that names each.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &Path)> {
        self.by_inode.iter().map(|(i, f)| (*i, f.as_path()))
    }

    pub fn contains(&self, inode: u64) -> bool {
        self.by_inode.contains_key(&inode)
    }

    pub fn len(&self) -> usize {
        self.by_inode.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_inode.is_empty()
    }
}

/// The inode identifying the network namespace of a namespace file.
pub fn inode(file: &Path) -> Option<u64> {
    std::fs::metadata(file).ok().map(|m| m.ino())
}

/// Runs `f` on a thread of its own that entered the network namespace of `file` (sockets,
/// links and interface names then refer to that namespace; the caller's stays as it was).
/// `Err` when the namespace cannot be entered, or is no longer the one numbered `expect`.
pub fn run_in<T: Send>(
    file: &Path,
    expect: Option<u64>,
    f: impl FnOnce() -> T + Send,
) -> Result<T, String> {
    let ns = File::open(file).map_err(|e| format!("opening {}: {e}", file.display()))?;
    if let Some(expect) = expect {
        let now = ns.metadata().map(|m| m.ino()).unwrap_or(0);
        if now != expect {
            return Err(format!("{} is no longer netns {expect}", file.display()));
        }
    }
    let target = ns.metadata().map(|m| m.ino()).ok();
    std::thread::scope(|s| {
        s.spawn(|| {
            // Already there (our own namespace): entering it would need CAP_SYS_ADMIN for
            // nothing.
            if target.is_some() && target == inode(Path::new("/proc/thread-self/ns/net")) {
                return Ok(f());
            }
            // SAFETY: setns on a namespace fd we opened; it changes only this thread.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                let e = io::Error::last_os_error();
                let hint = if e.raw_os_error() == Some(libc::EPERM) {
                    " (entering another network namespace needs CAP_SYS_ADMIN)"
                } else {
                    ""
                };
                return Err(format!("entering {}: {e}{hint}", file.display()));
            }
            Ok(f())
        })
        .join()
        .unwrap_or_else(|_| Err("the namespace thread panicked".into()))
    })
}
