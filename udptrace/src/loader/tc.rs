//! The ingress hop's attachments: one tc ingress program on every device of every covered
//! network namespace, including devices that appear later (an rtnetlink socket per
//! namespace hears of them).
//!
//! - tcx (Linux 6.6+): a link placed first, so a CNI's program that redirects or drops
//!   cannot hide a datagram from us; ours always answers "next". Links are file
//!   descriptors: closing them detaches exactly ours.
//! - clsact (older kernels): a filter on the clsact qdisc, added if the device has none.
//!   On exit our filters are removed inside their namespace, and the qdisc too when we
//!   added it and nothing else hangs off it.

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
};

use aya::programs::{
    links::Link as _,
    tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcError},
    LinkOrder, SchedClassifier, TcAttachType,
};

use super::{
    netns::{self, Namespaces},
    rtnl::{LinkMonitor, Rtnl},
};

/// How the program is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Tcx,
    Clsact,
}

impl Mode {
    /// The program in the object for this mode (each stamps its own hook on events).
    pub fn program(self) -> &'static str {
        match self {
            Self::Tcx => udptrace_common::programs::INGRESS_TCX,
            Self::Clsact => udptrace_common::programs::INGRESS_CLSACT,
        }
    }
}

/// The clsact filter priority that runs first.
const FIRST_PRIORITY: u16 = 1;

struct Device {
    name: String,
    link: SchedClassifierLink,
    /// We added the device's clsact qdisc.
    added_qdisc: bool,
}

struct Netns {
    /// A file naming the namespace, to enter it again.
    file: PathBuf,
    monitor: LinkMonitor,
    devices: HashMap<u32, Device>,
}

/// Every namespace and device the ingress program is attached to.
pub struct Coverage {
    mode: Mode,
    namespaces: HashMap<u64, Netns>,
}

/// Attaches `prog` to device `name` (in the calling thread's namespace).
fn attach(
    prog: &mut SchedClassifier,
    mode: Mode,
    index: u32,
    name: &str,
) -> Result<Device, String> {
    let (options, added_qdisc) = match mode {
        Mode::Tcx => (TcAttachOptions::TcxOrder(LinkOrder::first()), false),
        Mode::Clsact => {
            remove_orphans(index, name);
            let added = match tc::qdisc_add_clsact(name) {
                Ok(()) => true,
                Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => false,
                Err(TcError::NetlinkError(e)) => {
                    // aya's message for a netlink error names no errno: say it, and what
                    // permission it takes.
                    let errno = e.raw_os_error().unwrap_or(0);
                    let hint = if errno == libc::EPERM {
                        " (tc qdiscs need CAP_NET_ADMIN)"
                    } else {
                        ""
                    };
                    return Err(format!(
                        "adding a clsact qdisc to {name}: {}{hint}",
                        std::io::Error::from_raw_os_error(errno)
                    ));
                }
                Err(e) => return Err(format!("adding a clsact qdisc to {name}: {e}")),
            };
            // Priority 1 runs before any other filter (the kernel's automatic choice is
            // after the existing ones).
            let options = NlOptions {
                priority: FIRST_PRIORITY,
                ..NlOptions::default()
            };
            (TcAttachOptions::Netlink(options), added)
        }
    };
    let attached = prog
        .attach_with_options(name, TcAttachType::Ingress, options)
        .or_else(|e| match mode {
            // Priority 1 holds another kind of filter: after it, then.
            Mode::Clsact => prog.attach_with_options(
                name,
                TcAttachType::Ingress,
                TcAttachOptions::Netlink(NlOptions::default()),
            ),
            Mode::Tcx => Err(e),
        })
        .and_then(|id| prog.take_link(id));
    match attached {
        Ok(link) => Ok(Device {
            name: name.to_string(),
            link,
            added_qdisc,
        }),
        Err(e) => {
            if added_qdisc {
                let _ = Rtnl::open().and_then(|mut r| r.delete_clsact(index));
            }
            Err(format!("attaching to {name}: {}", super::chain(&e)))
        }
    }
}

/// Removes filters of ours on device `index` whose program no process holds: left by a
/// udptrace that was killed (SIGKILL, OOM) before it could remove them. A tc filter outlives
/// the process that added it; a running udptrace holds its program's file descriptor, so
/// its filters are never taken for leftovers. (tcx links are file descriptors: the kernel
/// removes them with the process.)
fn remove_orphans(index: u32, name: &str) {
    let Ok(mut rtnl) = Rtnl::open() else {
        return;
    };
    let Ok(filters) = rtnl.ingress_bpf_filters(index, Mode::Clsact.program()) else {
        return;
    };
    if filters.is_empty() {
        return;
    }
    let held = held_programs();
    for filter in filters.iter().filter(|f| !held.contains(&f.prog_id)) {
        match rtnl.delete_ingress_filter(index, filter) {
            Ok(()) => tracing::warn!(
                "removed a tc filter on {name} left by a udptrace that did not stop cleanly \
                 (program id {})",
                filter.prog_id
            ),
            Err(e) => tracing::warn!(
                "a tc filter on {name} left by a udptrace that did not stop cleanly (program \
                 id {}) could not be removed: {e}; remove it with `tc filter del dev {name} \
                 ingress`",
                filter.prog_id
            ),
        }
    }
}

/// Ids of the BPF programs some process holds a file descriptor of (from /proc/*/fdinfo).
fn held_programs() -> HashSet<u32> {
    let mut ids = HashSet::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return ids;
    };
    for proc in procs.flatten() {
        let Ok(fds) = std::fs::read_dir(proc.path().join("fdinfo")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(info) = std::fs::read_to_string(fd.path()) else {
                continue;
            };
            ids.extend(
                info.lines()
                    .filter_map(|l| l.strip_prefix("prog_id:"))
                    .filter_map(|v| v.trim().parse::<u32>().ok()),
            );
        }
    }
    ids
}

/// What a scan of one namespace's devices found.
struct Scan {
    /// Devices attached now, by index.
    added: Vec<(u32, Device)>,
    /// Every device the namespace has.
    present: HashSet<u32>,
    /// Devices that refused the program.
    errors: Vec<String>,
}

/// Attaches to every device of the calling thread's namespace not in `known`.
fn attach_new(
    prog: &mut SchedClassifier,
    mode: Mode,
    known: &HashSet<u32>,
) -> Result<Scan, String> {
    let links = Rtnl::open()
        .and_then(|mut r| r.links())
        .map_err(|e| format!("listing devices: {e}"))?;
    let present: HashSet<u32> = links.iter().map(|(i, _)| *i).collect();
    let mut added = Vec::new();
    let mut errors = Vec::new();
    for (index, name) in links.into_iter().filter(|(i, _)| !known.contains(i)) {
        match attach(prog, mode, index, &name) {
            Ok(dev) => added.push((index, dev)),
            Err(e) => errors.push(e),
        }
    }
    Ok(Scan {
        added,
        present,
        errors,
    })
}

impl Coverage {
    pub fn new(mode: Mode) -> Self {
        Self {
            mode,
            namespaces: HashMap::new(),
        }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Devices attached, over all namespaces.
    pub fn devices(&self) -> usize {
        self.namespaces.values().map(|n| n.devices.len()).sum()
    }

    /// Attaches in each namespace of `files` not covered yet. Returns how many namespaces
    /// were added and what failed.
    pub fn cover(
        &mut self,
        prog: &mut SchedClassifier,
        namespaces: &Namespaces,
    ) -> (usize, Vec<String>) {
        let mode = self.mode;
        let mut new = 0;
        let mut errors = Vec::new();
        for (inode, file) in namespaces.iter() {
            if self.namespaces.contains_key(&inode) {
                continue;
            }
            let entered = netns::run_in(file, Some(inode), || {
                let monitor = LinkMonitor::open().map_err(|e| format!("watching devices: {e}"))?;
                let scan = attach_new(prog, mode, &HashSet::new())?;
                Ok::<_, String>((monitor, scan))
            });
            match entered.and_then(|r| r) {
                Ok((monitor, scan)) => {
                    let added = scan.added;
                    errors.extend(
                        scan.errors
                            .into_iter()
                            .map(|e| format!("netns {inode}: {e}")),
                    );
                    self.namespaces.insert(
                        inode,
                        Netns {
                            file: file.to_path_buf(),
                            monitor,
                            devices: added.into_iter().collect(),
                        },
                    );
                    new += 1;
                }
                Err(e) => errors.push(format!("netns {inode} ({}): {e}", file.display())),
            }
        }
        (new, errors)
    }

    /// Follows device changes the namespaces reported: attaches to new devices and forgets
    /// removed ones. Returns whether any namespace had a change (new devices may mean new
    /// namespaces: a container's veth appears in the host's first).
    pub fn follow(&mut self, prog: &mut SchedClassifier) -> (bool, Vec<String>) {
        let mode = self.mode;
        let mut any = false;
        let mut errors = Vec::new();
        for (inode, ns) in &mut self.namespaces {
            if !ns.monitor.changed() {
                continue;
            }
            any = true;
            let known: HashSet<u32> = ns.devices.keys().copied().collect();
            let scanned = netns::run_in(&ns.file, Some(*inode), || attach_new(prog, mode, &known));
            match scanned.and_then(|r| r) {
                Ok(scan) => {
                    errors.extend(
                        scan.errors
                            .into_iter()
                            .map(|e| format!("netns {inode}: {e}")),
                    );
                    for gone in known.difference(&scan.present) {
                        if let Some(dev) = ns.devices.remove(gone) {
                            forget(dev);
                        }
                    }
                    ns.devices.extend(scan.added);
                }
                Err(e) => errors.push(format!("netns {inode}: {e}")),
            }
        }
        (any, errors)
    }

    /// Namespaces covered now.
    pub fn namespaces(&self) -> impl Iterator<Item = (u64, usize)> + '_ {
        self.namespaces.iter().map(|(i, n)| (*i, n.devices.len()))
    }

    /// Lets go of the namespaces `inodes` (gone): their devices went with them, and our
    /// device monitor must not keep them alive.
    pub fn release(&mut self, inodes: &[u64]) {
        for inode in inodes {
            if let Some(ns) = self.namespaces.remove(inode) {
                ns.devices.into_values().for_each(forget);
            }
        }
    }
}

/// Drops our handle on a device that is gone, without detaching: a tcx link is a file
/// descriptor (closing it is all there is to do), but a clsact filter is named by device
/// index and would be looked for in this thread's namespace.
fn forget(dev: Device) {
    match dev.link.priority() {
        Ok(_) => std::mem::forget(dev.link),
        Err(_) => drop(dev.link),
    }
}

/// Removes our filters (and the qdiscs we added, when nothing else uses them) inside
/// their namespace.
fn detach_in(file: &Path, inode: u64, mut devices: HashMap<u32, Device>) -> Result<(), String> {
    let entered = netns::run_in(file, Some(inode), || {
        let mut rtnl = Rtnl::open().ok();
        for (index, dev) in devices.drain() {
            if let Err(e) = dev.link.detach() {
                tracing::warn!("detaching from {}: {}", dev.name, super::chain(&e));
            }
            if !dev.added_qdisc {
                continue;
            }
            if let Some(r) = rtnl.as_mut() {
                match r.clsact_filters(index) {
                    Ok(0) => {
                        if let Err(e) = r.delete_clsact(index) {
                            tracing::warn!("removing the clsact qdisc of {}: {e}", dev.name);
                        }
                    }
                    Ok(n) => tracing::info!(
                        "leaving the clsact qdisc udptrace added to {}: {n} filter(s) of others use it",
                        dev.name
                    ),
                    Err(e) => tracing::warn!("listing filters of {}: {e}", dev.name),
                }
            }
        }
    });
    // Not entered: detaching here would look for the filters in the wrong namespace.
    devices.into_values().for_each(forget);
    entered
}

impl Drop for Coverage {
    fn drop(&mut self) {
        for (inode, ns) in self.namespaces.drain() {
            if self.mode == Mode::Tcx {
                drop(ns.devices);
                continue;
            }
            // Keep the monitor (and with it the namespace) until our filters are gone.
            let Netns {
                file,
                monitor,
                devices,
            } = ns;
            if let Err(e) = detach_in(&file, inode, devices) {
                tracing::warn!("netns {inode}: tc filters not removed: {e}");
            }
            drop(monitor);
        }
    }
}
