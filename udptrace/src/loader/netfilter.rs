//! BPF netfilter programs and links, which aya 0.14 cannot load: the programs come from the
//! same object (aya parses them as `classifier` sections and creates their maps); here they
//! are relocated against aya's map fds and loaded with raw `bpf(BPF_PROG_LOAD)` as
//! BPF_PROG_TYPE_NETFILTER, then linked with `bpf(BPF_LINK_CREATE)` in each network
//! namespace. Links are file descriptors: dropping them detaches exactly what we attached.

use std::{
    collections::{HashMap, HashSet},
    fs::File,
    io,
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd, RawFd},
    path::Path,
};

use aya::{maps::Map, Ebpf};

use super::{netns::Namespaces, sys::bpf_fd};
use aya_obj::generated::{bpf_attach_type, bpf_attr, bpf_cmd, bpf_insn, bpf_prog_type};
use udptrace_common::{NF_INET_LOCAL_IN, NF_INET_POST_ROUTING};

const NFPROTO_IPV4: u32 = 2;
const NFPROTO_IPV6: u32 = 10;

fn map_fd(map: &Map) -> Option<RawFd> {
    let data = match map {
        Map::Array(d)
        | Map::PerCpuArray(d)
        | Map::RingBuf(d)
        | Map::LruHashMap(d)
        | Map::PerCpuLruHashMap(d)
        | Map::HashMap(d)
        | Map::SkStorage(d) => d,
        // Every map of the object must be here: a program is relocated as a whole, so one
        // map missing fails even programs that never use it.
        _ => return None,
    };
    Some(data.fd().as_fd().as_raw_fd())
}

/// Loads the named netfilter programs from `object`, using the maps aya created for `ebpf`.
pub fn load_programs(object: &[u8], ebpf: &Ebpf, names: &[&str]) -> Result<Vec<OwnedFd>, String> {
    let mut obj = aya_obj::Object::parse(object).map_err(|e| format!("parsing the object: {e}"))?;
    let maps = obj.maps.clone();
    let fds: Vec<(String, RawFd)> = ebpf
        .maps()
        .filter_map(|(name, map)| Some((name.to_string(), map_fd(map)?)))
        .collect();
    let text: HashSet<usize> = obj.functions.keys().map(|(section, _)| *section).collect();
    obj.relocate_maps(
        fds.iter()
            .filter_map(|(name, fd)| maps.get(name).map(|m| (name.as_str(), *fd, m))),
        &text,
    )
    .map_err(|e| format!("relocating maps: {e}"))?;
    obj.relocate_calls(&text)
        .map_err(|e| format!("relocating calls: {e}"))?;
    names
        .iter()
        .map(|name| {
            let prog = obj
                .programs
                .get(*name)
                .ok_or_else(|| format!("program {name} missing from object"))?;
            let func = obj
                .functions
                .get(&prog.function_key())
                .ok_or_else(|| format!("{name}: no code"))?;
            prog_load(name, &func.instructions)
        })
        .collect()
}

fn prog_load(name: &str, insns: &[bpf_insn]) -> Result<OwnedFd, String> {
    let license = c"GPL";
    let mut log = vec![0u8; 1 << 16];
    let attempt = |with_log: bool, log: &mut Vec<u8>| {
        // SAFETY: bpf_attr is plain data; all-zero is its valid empty value.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        // SAFETY: writing the BPF_PROG_LOAD member of the union.
        let a = unsafe { &mut attr.__bindgen_anon_3 };
        a.prog_type = bpf_prog_type::BPF_PROG_TYPE_NETFILTER as u32;
        a.expected_attach_type = bpf_attach_type::BPF_NETFILTER as u32;
        a.insns = insns.as_ptr() as u64;
        a.insn_cnt = insns.len() as u32;
        a.license = license.as_ptr() as u64;
        for (dst, src) in a.prog_name.iter_mut().zip(name.bytes().take(15)) {
            *dst = src as libc::c_char;
        }
        if with_log {
            a.log_level = 1;
            a.log_buf = log.as_mut_ptr() as u64;
            a.log_size = log.len() as u32;
        }
        bpf_fd(bpf_cmd::BPF_PROG_LOAD, &mut attr)
    };
    attempt(false, &mut log).or_else(|first| {
        attempt(true, &mut log).map_err(|_| {
            let end = log.iter().position(|&b| b == 0).unwrap_or(0);
            let tail: String = String::from_utf8_lossy(&log[..end]).lines().rev().take(3).collect::<Vec<_>>().join(" / ");
            match first.raw_os_error() {
                Some(libc::EINVAL) if tail.is_empty() => format!(
                    "loading {name}: {first}: this kernel has no BPF netfilter programs (Linux 6.4 or newer)"
                ),
                _ => format!("loading {name}: {first}: {tail}"),
            }
        })
    })
}

fn link_create(prog: &OwnedFd, pf: u32, hook: u32, priority: i32) -> io::Result<OwnedFd> {
    // SAFETY: bpf_attr is plain data; all-zero is its valid empty value.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // SAFETY: writing the BPF_LINK_CREATE member of the union.
    let l = unsafe { &mut attr.link_create };
    l.__bindgen_anon_1.prog_fd = prog.as_raw_fd() as u32;
    l.attach_type = bpf_attach_type::BPF_NETFILTER as u32;
    l.__bindgen_anon_3.netfilter.pf = pf;
    l.__bindgen_anon_3.netfilter.hooknum = hook;
    l.__bindgen_anon_3.netfilter.priority = priority;
    bpf_fd(bpf_cmd::BPF_LINK_CREATE, &mut attr)
}

/// One program to link at one hook, at the first free priority of several.
pub struct Slot<'a> {
    pub prog: &'a OwnedFd,
    pub hook: u32,
    pub priorities: &'static [i32],
}

/// Just after source NAT (NF_IP_PRI_NAT_SRC is 100) at POSTROUTING and LOCAL_IN, where each
/// way through a namespace ends and every NAT hook before has had its say: the NAT hop's
/// slots. A priority another hook holds gives EBUSY, hence a few candidates each. `progs` is
/// `nat_after`.
pub fn nat_slots(progs: &[OwnedFd]) -> Vec<Slot<'_>> {
    [NF_INET_POST_ROUTING, NF_INET_LOCAL_IN]
        .into_iter()
        .map(|hook| Slot {
            prog: &progs[0],
            hook,
            priorities: AFTER_SRC,
        })
        .collect()
}

/// [`nat_slots`] when the NAT hop's program also does the deliver hop's part at LOCAL_IN
/// (noting the skb about to reach UDP): there it is linked at the end of LOCAL_IN, where the
/// deliver hop's own program would have been, instead of just after NAT.
pub fn nat_slots_with_deliver(progs: &[OwnedFd]) -> Vec<Slot<'_>> {
    vec![
        Slot {
            prog: &progs[0],
            hook: NF_INET_POST_ROUTING,
            priorities: AFTER_SRC,
        },
        Slot {
            prog: &progs[0],
            hook: NF_INET_LOCAL_IN,
            priorities: LOCAL_IN_LAST,
        },
    ]
}

const AFTER_SRC: &[i32] = &[101, 102, 105, 110];

/// The end of LOCAL_IN, after filtering and source NAT (only conntrack's confirm, at
/// INT_MAX, comes later).
const LOCAL_IN_LAST: &[i32] = &[1000, 1001, 1010, 2000];

/// The deliver hop's slot: the end of LOCAL_IN.
pub fn local_in_last(progs: &[OwnedFd]) -> Vec<Slot<'_>> {
    vec![Slot {
        prog: &progs[0],
        hook: NF_INET_LOCAL_IN,
        priorities: LOCAL_IN_LAST,
    }]
}

fn link_first_free(
    prog: &OwnedFd,
    pf: u32,
    hook: u32,
    priorities: &[i32],
) -> Result<OwnedFd, String> {
    let mut last = None;
    for &priority in priorities {
        match link_create(prog, pf, hook, priority) {
            Ok(link) => return Ok(link),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => last = Some(e),
            Err(e) => return Err(format!("linking at hook {hook} priority {priority}: {e}")),
        }
    }
    Err(format!(
        "every priority near NAT at hook {hook} is taken: {}",
        last.map(|e| e.to_string()).unwrap_or_default()
    ))
}

/// Links every slot, IPv4 and IPv6, in the network namespace of `netns` (a /run/netns or
/// /proc/PID/ns/net file).
pub fn link_in(netns: &Path, slots: &[Slot<'_>]) -> Result<Vec<OwnedFd>, String> {
    // The link attaches in the calling thread's namespace.
    super::netns::run_in(netns, None, || {
        let mut links = Vec::new();
        for slot in slots {
            for pf in [NFPROTO_IPV4, NFPROTO_IPV6] {
                links.push(link_first_free(slot.prog, pf, slot.hook, slot.priorities)?);
            }
        }
        Ok(links)
    })?
}

/// Builds the slots of one set of loaded programs.
pub type SlotsFn = for<'a> fn(&'a [OwnedFd]) -> Vec<Slot<'a>>;

/// One namespace's netfilter links, and the namespace file that keeps its inode ours while
/// it is covered (see [`Namespaces`]).
struct Covered {
    _anchor: File,
    links: Vec<OwnedFd>,
}

/// Loaded netfilter programs, the namespaces they are linked in, and the links.
#[derive(Default)]
pub struct Coverage {
    sets: Vec<(Vec<OwnedFd>, SlotsFn)>,
    covered: HashMap<u64, Covered>,
    /// Where the deliver hop's program is among the sets (linked at the end of LOCAL_IN).
    deliver: Option<usize>,
    /// The NAT hop's program does the deliver hop's part at the end of LOCAL_IN.
    pub deliver_at_nat: bool,
}

impl Coverage {
    /// Adds loaded programs; [`Coverage::cover`] links them.
    pub fn add(&mut self, progs: Vec<OwnedFd>, slots: SlotsFn) {
        self.sets.push((progs, slots));
    }

    /// Adds the deliver hop's program (linked at the end of LOCAL_IN).
    pub fn add_deliver(&mut self, progs: Vec<OwnedFd>) {
        self.deliver = Some(self.sets.len());
        self.add(progs, local_in_last);
    }

    /// Adds the NAT hop's program. Where the deliver hop's program was to be linked at the
    /// end of LOCAL_IN, this one takes its place there and its part (`MODE_DELIVER_AT_NAT`):
    /// the deliver hop's program is unloaded, not linked. Before any namespace is covered.
    pub fn add_nat(&mut self, progs: Vec<OwnedFd>) {
        match self.deliver.take() {
            Some(i) if self.covered.is_empty() => {
                // Dropping the program's fd unloads it.
                self.sets.remove(i);
                self.deliver_at_nat = true;
                self.add(progs, nat_slots_with_deliver);
            }
            _ => self.add(progs, nat_slots),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.sets.is_empty()
    }

    /// Namespaces covered now, each with the links held there.
    pub fn links(&self) -> impl Iterator<Item = (u64, usize)> + '_ {
        self.covered.iter().map(|(i, c)| (*i, c.links.len()))
    }

    /// Links every program set in each namespace of `namespaces` not covered yet. Returns
    /// how many were newly covered and why any could not be.
    pub fn cover(&mut self, namespaces: &Namespaces) -> (usize, Vec<String>) {
        let mut new = 0;
        let mut errors = Vec::new();
        for (inode, file) in namespaces.iter() {
            if self.covered.contains_key(&inode) {
                continue;
            }
            let anchor = match File::open(file) {
                Ok(f) if super::netns::inode(file) == Some(inode) => f,
                // Gone, or the file names another namespace by now.
                _ => continue,
            };
            let mut links = Vec::new();
            let linked = self.sets.iter().try_for_each(|(progs, slots)| {
                links.extend(link_in(file, &slots(progs))?);
                Ok::<(), String>(())
            });
            match linked {
                Ok(()) => {
                    self.covered.insert(
                        inode,
                        Covered {
                            _anchor: anchor,
                            links,
                        },
                    );
                    new += 1;
                }
                // Dropping `links` detaches the part that did link.
                Err(why) => errors.push(format!("netns {inode} ({}): {why}", file.display())),
            }
        }
        (new, errors)
    }

    /// Detaches from the namespaces `inodes` (gone) and lets go of them.
    pub fn release(&mut self, inodes: &[u64]) {
        for inode in inodes {
            // Closing a netfilter link unregisters its hook.
            self.covered.remove(inode);
        }
    }
}
