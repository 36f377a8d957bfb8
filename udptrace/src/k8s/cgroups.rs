//! Which pod container a task runs in, from its cgroup: the kernel reports a task's cgroup
//! v2 id (the cgroup directory's inode number); kubelet names a pod's cgroup after the pod's
//! UID (`pod<uid>`, with `_` for `-` under the systemd driver) and a container's after the
//! runtime's container ID (`cri-containerd-<id>.scope`, `crio-<id>.scope`,
//! `docker-<id>.scope`, or the bare ID under the cgroupfs driver).

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Mutex,
};

use crate::kernel::cgroup2;

/// Directory levels searched below the hierarchy's root (kubepods nests 4 deep).
const MAX_DEPTH: usize = 8;
/// Paths remembered before starting over.
const MAX_KNOWN: usize = 4096;

/// The cgroup v2 hierarchy, and where the ids looked up so far are in it.
#[derive(Debug)]
pub struct Cgroups {
    root: Option<PathBuf>,
    known: Mutex<HashMap<u64, String>>,
}

impl Cgroups {
    /// `root`: where the host's cgroup v2 hierarchy is mounted; else where this process
    /// sees one mounted.
    pub fn new(root: Option<PathBuf>) -> Self {
        Self {
            root: root.map(cgroup2::v2_under).or_else(cgroup2::mount),
            known: Mutex::new(HashMap::new()),
        }
    }

    /// The pod UID and container ID of cgroup `id`, when kubelet made it.
    pub fn container(&self, id: u64) -> Option<(String, String)> {
        if id == 0 {
            return None;
        }
        let path = {
            let known = self.known.lock().expect("cgroup paths");
            known.get(&id).cloned()
        };
        let path = match path {
            Some(p) => p,
            None => {
                // A miss is not remembered: the cgroup may be created later.
                let p = find(self.root.as_deref()?, id)?;
                let mut known = self.known.lock().expect("cgroup paths");
                if known.len() >= MAX_KNOWN {
                    known.clear();
                }
                known.insert(id, p.clone());
                p
            }
        };
        parse(&path)
    }
}

/// The path below `root` of the cgroup directory whose inode is `id`.
fn find(root: &Path, id: u64) -> Option<String> {
    let mut stack = vec![(root.to_path_buf(), 0)];
    while let Some((dir, depth)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            if !meta.is_dir() {
                continue;
            }
            let path = entry.path();
            if meta.ino() == id {
                return Some(path.strip_prefix(root).ok()?.display().to_string());
            }
            if depth < MAX_DEPTH {
                stack.push((path, depth + 1));
            }
        }
    }
    None
}

/// The pod UID and container ID a kubelet-made cgroup path names.
pub fn parse(path: &str) -> Option<(String, String)> {
    let mut uid = None;
    let mut container = None;
    for part in path.split('/') {
        let stem = part
            .strip_suffix(".slice")
            .or_else(|| part.strip_suffix(".scope"))
            .unwrap_or(part);
        if let Some(at) = stem.rfind("pod") {
            let candidate = &stem[at + 3..];
            if candidate.len() == 36 {
                uid = Some(candidate.replace('_', "-"));
            }
        }
        let id = stem.rsplit('-').next().unwrap_or(stem);
        if id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
            container = Some(id.to_string());
        }
    }
    Some((uid?, container?))
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "3f6c1a52-8d0e-4f7b-9b1e-2a4d5c6e7f80";
    const ID: &str = "9a7c3e1f0b2d4c6e8a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f708192a3b4c5";

    #[test]
    fn kubelet_paths_of_both_drivers_and_the_common_runtimes() {
        let systemd = format!(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/\
             cri-containerd-{ID}.scope",
            UID.replace('-', "_")
        );
        let cgroupfs = format!("kubepods/burstable/pod{UID}/{ID}");
        let crio = format!(
            "kubepods.slice/kubepods-pod{}.slice/crio-{ID}.scope",
            UID.replace('-', "_")
        );
        for path in [systemd, cgroupfs, crio] {
            assert_eq!(parse(&path), Some((UID.into(), ID.into())), "{path}");
        }
        assert_eq!(parse("system.slice/sshd.service"), None);
        assert_eq!(parse(&format!("kubepods/burstable/pod{UID}")), None);
    }

    #[test]
    fn a_cgroup_is_found_by_its_inode() {
        let root = std::env::temp_dir().join(format!("udpt-cg-{}", std::process::id()));
        let leaf = root.join(format!("kubepods/besteffort/pod{UID}/{ID}"));
        std::fs::create_dir_all(&leaf).unwrap();
        let ino = std::fs::metadata(&leaf).unwrap().ino();
        let cgroups = Cgroups::new(Some(root.clone()));
        assert_eq!(cgroups.container(ino), Some((UID.into(), ID.into())));
        assert_eq!(cgroups.container(0), None);
        std::fs::remove_dir_all(&root).unwrap();
        // Remembered once found.
        assert_eq!(cgroups.container(ino), Some((UID.into(), ID.into())));
    }
}
