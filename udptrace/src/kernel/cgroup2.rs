//! Where the cgroup v2 hierarchy is: for the cgroup hooks (attached at its root, they run
//! for every process) and for naming a task's pod from its cgroup id.

use std::path::{Path, PathBuf};

/// Setting (and DaemonSet variable) naming where the host's cgroup hierarchy is mounted.
pub const ROOT_ENV: &str = "UDPTRACE_CGROUP_ROOT";

/// The v2 hierarchy at or under `dir`: a hybrid host keeps it in `unified` beside the v1
/// ones.
pub fn v2_under(dir: PathBuf) -> PathBuf {
    let unified = dir.join("unified");
    if dir.join("cgroup.controllers").exists() || !unified.is_dir() {
        dir
    } else {
        unified
    }
}

/// Where this process sees the cgroup v2 hierarchy mounted (/proc/self/mountinfo: the
/// mount point is the 5th field, the filesystem type follows the " - ").
pub fn mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mount_in(&info)
}

fn mount_in(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (fields, rest) = line.split_once(" - ")?;
        if rest.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        Some(PathBuf::from(fields.split_whitespace().nth(4)?))
    })
}

/// The root of the host's cgroup v2 hierarchy: `configured` (`--cgroup-root`, the config
/// file), or from [`ROOT_ENV`], else the one mounted here. A program attached there runs for every process of the host; so it must be
/// the real root, not a container's cgroup namespace (whose root is a child cgroup).
pub fn root(configured: Option<&Path>) -> Result<PathBuf, String> {
    let given = configured
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os(ROOT_ENV).map(PathBuf::from));
    let dir = match given {
        Some(dir) => v2_under(dir),
        None => {
            mount().ok_or("no cgroup v2 hierarchy is mounted (none in /proc/self/mountinfo)")?
        }
    };
    if !dir.join("cgroup.procs").exists() {
        return Err(format!("{} is not a cgroup v2 hierarchy", dir.display()));
    }
    if !is_root(&dir) {
        return Err(format!(
            "{} is not the root of the host's cgroup hierarchy (a cgroup namespace?): \
             mount the host's /sys/fs/cgroup and point {ROOT_ENV} at it",
            dir.display()
        ));
    }
    Ok(dir)
}

/// Only the root cgroup has no `cgroup.events`.
fn is_root(dir: &Path) -> bool {
    !dir.join("cgroup.events").exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_v2_mount_among_v1_ones() {
        let info = "\
35 24 0:30 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755
36 35 0:31 / /sys/fs/cgroup/memory rw shared:10 - cgroup cgroup rw,memory
44 35 0:39 / /sys/fs/cgroup/unified rw shared:18 - cgroup2 cgroup2 rw,nsdelegate
";
        assert_eq!(
            mount_in(info),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(mount_in("35 24 0:30 / /sys rw - sysfs sysfs rw\n"), None);
    }

    #[test]
    fn the_root_is_told_from_a_child_cgroup() {
        let Some(root) = mount() else {
            eprintln!("skipped: no cgroup v2 hierarchy mounted here");
            return;
        };
        if !is_root(&root) {
            eprintln!("skipped: this process sees a cgroup namespace");
            return;
        }
        let child = std::fs::read_dir(&root)
            .unwrap()
            .flatten()
            .find(|e| e.path().join("cgroup.procs").exists());
        if let Some(child) = child {
            assert!(!is_root(&child.path()), "{}", child.path().display());
        }
    }
}
