//! Probes the kernel, loads the eBPF object with this kernel's offsets, and attaches each
//! hop with the best hook the kernel allows, falling back in order and recording why
//! (`chain`, one chain per hop in `hops/`). Everything attached is owned by [`Tracer`];
//! dropping it detaches exactly that.

mod chain;
mod hops;
mod maps;
mod netfilter;
pub mod netns;
mod report;
mod rtnl;
mod sys;
mod tc;

pub use chain::DISABLE_HOOKS_ENV;
pub use maps::{FlowReader, KernelCounts, Sampler};
pub use netns::{Namespaces, NetnsScope};
pub use report::{Attempt, HopReport};

use std::{collections::BTreeMap, os::fd::AsFd as _, path::PathBuf};

use aya::{
    maps::{Array, Map, MapData, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::SchedClassifier,
    Ebpf, EbpfLoader,
};
use udptrace_common::{
    names, programs, FlowKey, FlowStats, TraceFilter, FLOWS_DEFAULT, MODE_COUNT_HOP,
    MODE_DELIVER_AT_NAT, MODE_NAT_LINKS, MODE_PATHS, STATS_LEN,
};

use crate::kernel::{
    btf::{BtfError, KernelBtf},
    drop_reasons::DropReasons,
    offsets::KernelLayout,
    preflight::{self, PreflightError},
    tracefs::Tracefs,
};
use chain::{chain, program, unload_any, Ctx};

/// The kernel programs, built by `build.rs` and embedded in the binary.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/udptrace-ebpf"));

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Preflight(#[from] PreflightError),
    #[error(transparent)]
    Btf(#[from] BtfError),
    #[error(
        "this udptrace binary was built without its eBPF programs (AYA_BUILD_SKIP=1): \
         rebuild with `cargo xtask build`"
    )]
    NoObject,
    #[error("loading the eBPF object failed: {0}")]
    Object(String),
    #[error("no hook for the {hop} hop works on this kernel:\n{report}\nrun `udptrace doctor` for details")]
    NoHook { hop: &'static str, report: String },
}

/// What to load and where to attach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadConfig {
    /// Which network namespaces the per-namespace hops (NAT, tc ingress) cover.
    pub scope: NetnsScope,
    /// Attach the per-datagram path hooks (send, NAT, xmit, deliver, readers, ingress) as
    /// well as the counting ones (count, drop): the two costs of docs/performance.md.
    pub paths: bool,
    /// Flows the kernel's table holds.
    pub flow_entries: u32,
    /// The host's cgroup v2 hierarchy (the cgroup send hooks attach at its root); `None`:
    /// `UDPTRACE_CGROUP_ROOT`, else the one mounted here.
    pub cgroup_root: Option<PathBuf>,
    /// The kernel programs' own debug logs (aya-log: lost events, full maps, failed reads).
    /// Off, they cost nothing: the verifier drops the code.
    pub kernel_log: bool,
    /// Only datagrams matching this are traced hop by hop, decided in the kernel (counts
    /// and drops stay every datagram's).
    pub filter: TraceFilter,
    /// Datagrams may be sampled (1 in N), now or later: `consume_skb` is attached with the
    /// path hooks so a freed skb's decision is forgotten at once. Without sampling only
    /// traced datagrams are remembered, until their verdict (or for a second), and every
    /// path is filtered again in userspace: no hook every freed skb of the host pays for.
    pub sampled: bool,
    /// Count every datagram per flow (the count hop, `FLOWS`): off for `trace`, which reads
    /// no counts.
    pub count: bool,
}

impl LoadConfig {
    /// Defaults: `scope`, the default flow table, the cgroup hierarchy found here.
    /// Kernel logs are on when this process logs debug records for `udptrace_ebpf`
    /// (`--log-level debug`, or `RUST_LOG`).
    pub fn new(scope: NetnsScope) -> Self {
        Self {
            scope,
            paths: true,
            flow_entries: FLOWS_DEFAULT,
            cgroup_root: None,
            kernel_log: tracing::enabled!(target: "udptrace_ebpf", tracing::Level::DEBUG),
            filter: TraceFilter::NONE,
            sampled: true,
            count: true,
        }
    }
}

/// Facts about the kernel found before loading.
#[derive(Debug, Clone)]
pub struct KernelFacts {
    /// Where tracefs is, or why it is unusable.
    pub tracefs: String,
}

/// The loaded, attached programs and their maps.
pub struct Tracer {
    ebpf: Ebpf,
    kernel: KernelFacts,
    /// count, then send, nat, xmit, drop, deliver, recv, ingress (the path hops only when
    /// asked for; send also when it is what counts).
    hops: Vec<HopReport>,
    /// Netfilter programs and their links (dropping them detaches).
    netfilter: netfilter::Coverage,
    /// tc ingress attachments (dropping them detaches).
    ingress: Option<tc::Coverage>,
    scope: NetnsScope,
    /// Drop reason names of this kernel.
    drop_reasons: DropReasons,
    /// Loaded with kernel logs on.
    kernel_log: bool,
    /// This kernel's offsets and the cgroup hierarchy: attaching path hooks again needs them.
    layout: KernelLayout,
    cgroup_root: Option<PathBuf>,
    /// Datagrams are counted by the count hop, or not at all (`LoadConfig::count` off):
    /// either way the send hop counts only failed sends and goes with the path hooks. Else
    /// the send hop counts, and stays attached.
    counted: bool,
    /// The path hooks are attached.
    paths: bool,
    /// `LoadConfig::sampled`.
    sampled: bool,
}

impl Tracer {
    /// Checks privileges and the kernel, loads the programs and attaches every hop.
    pub fn load(config: &LoadConfig) -> Result<Self, LoadError> {
        preflight::check_privileges()?;
        let release = preflight::kernel_release();
        preflight::check_kernel(&release)?;
        // The kernel's BTF is parsed once, read for offsets and drop reason names, and let go
        // before the object loads: parsed, it is ~25 MiB of heap, most of the agent's peak.
        let kbtf = KernelBtf::running()?;
        let tracefs = Tracefs::find_or_mount();
        let tracefs_fact = match &tracefs {
            Ok((fs, true)) => format!("{} (mounted by udptrace)", fs.root().display()),
            Ok((fs, false)) => fs.root().display().to_string(),
            Err(e) => e.to_string(),
        };
        let tracefs = tracefs.ok().map(|(fs, _)| fs);
        let layout = KernelLayout::resolve(&kbtf, tracefs.as_ref());
        tracing::debug!("kernel offsets: {:?}", layout.offsets);
        let drop_reasons = DropReasons::from_btf(&kbtf).unwrap_or_default();
        drop(kbtf);
        if EBPF_OBJECT.is_empty() {
            return Err(LoadError::NoObject);
        }
        // aya-log's levels: 0 is off, 4 is debug (aya_log_common::Level::Debug).
        let log_level: u8 = if config.kernel_log { 4 } else { 0 };
        // The bench's floor run: the same hooks, attached, doing nothing.
        let empty_bodies: u8 = std::env::var_os("UDPTRACE_EMPTY_BODIES")
            .is_some_and(|v| v == "1")
            .into();
        if empty_bodies != 0 {
            tracing::warn!("UDPTRACE_EMPTY_BODIES=1: every program returns at once (the bench's floor): nothing is counted or traced");
        }
        // No kernel BTF for aya: the object has no CO-RE relocations (its programs read at
        // the offsets resolved above; a test keeps it so), and aya would parse vmlinux's
        // BTF again only to find nothing to relocate.
        let mut ebpf = EbpfLoader::new()
            .btf(None)
            .override_global(names::OFFSETS, &layout.offsets, true)
            .override_global(names::AYA_LOG_LEVEL, &log_level, true)
            .override_global(names::EMPTY_BODIES, &empty_bodies, true)
            .map_max_entries(names::FLOWS, config.flow_entries)
            .load(EBPF_OBJECT)
            .map_err(|e| LoadError::Object(chain(&e)))?;
        if !config.filter.is_none() {
            // Before anything is attached: no datagram is decided without it.
            maps::set_filter(&mut ebpf, config.filter)
                .map_err(|e| LoadError::Object(format!("setting the trace filter: {e}")))?;
        }
        let mut tracer = Self {
            ebpf,
            kernel: KernelFacts {
                tracefs: tracefs_fact,
            },
            hops: Vec::new(),
            drop_reasons,
            netfilter: netfilter::Coverage::default(),
            ingress: None,
            scope: config.scope,
            kernel_log: config.kernel_log,
            layout,
            cgroup_root: config.cgroup_root.clone(),
            counted: false,
            paths: false,
            sampled: config.sampled,
        };
        // The count hop first, and the programs told at once whether it counts: the send
        // hop then counts only failed sends. Nothing counted when nothing reads the counts
        // (`trace`): one program fewer per datagram.
        if config.count {
            let count = hops::count::attach(&mut tracer.ctx());
            tracer.counted = count.chosen().is_some();
            tracer.hops.push(count);
        } else {
            tracer.counted = true;
        }
        tracer.set_mode(false)?;
        if !tracer.counted {
            // Without the count hop the send hop counts, in every mode.
            let send = hops::send::attach(&mut tracer.ctx());
            if send.chosen().is_none() {
                return Err(LoadError::NoHook {
                    hop: "send",
                    report: format!("{}\n{}", tracer.hops[0].render(), send.render()),
                });
            }
            tracer.hops.push(send);
        }
        let drop = hops::drop::attach(&mut tracer.ctx());
        tracer.hops.push(drop);
        if config.paths {
            tracer.attach_paths()?;
        }
        release_freed_heap();
        Ok(tracer)
    }

    /// What attaching works with.
    fn ctx(&mut self) -> Ctx<'_> {
        Ctx {
            ebpf: &mut self.ebpf,
            layout: &self.layout,
            scope: self.scope,
            cgroup_root: self.cgroup_root.as_deref(),
            netfilter: &mut self.netfilter,
            ingress: &mut self.ingress,
        }
    }

    /// Attaches the per-datagram path hooks (send, NAT, xmit, `consume_skb`, deliver,
    /// readers, ingress) beside the counting ones, then tells the programs. A hop that
    /// cannot attach is reported; only the send hop is required.
    fn attach_paths(&mut self) -> Result<(), LoadError> {
        if self.paths {
            return Ok(());
        }
        let (counted, sampled) = (self.counted, self.sampled);
        let mut ctx = self.ctx();
        let mut new = Vec::new();
        if counted {
            let send = hops::send::attach(&mut ctx);
            if send.chosen().is_none() {
                self.detach_paths();
                return Err(LoadError::NoHook {
                    hop: "send",
                    report: send.render(),
                });
            }
            new.push(send);
        }
        // The deliver hop first: where it would link at the end of LOCAL_IN, the NAT hop's
        // program is linked there in its place and does its part.
        new.extend([
            hops::deliver::attach(&mut ctx),
            hops::nat::attach(&mut ctx),
            hops::xmit::attach(&mut ctx),
        ]);
        let consume = if sampled {
            hops::drop::attach_consume(&mut ctx)
        } else {
            Ok(())
        };
        new.extend([
            hops::deliver::attach_recv(&mut ctx),
            hops::ingress::attach(&mut ctx),
        ]);
        if !self.netfilter.is_empty() {
            let scope = self.scope;
            let (covered, errors) = self.netfilter.cover(&Namespaces::list(scope));
            let note =
                format!("netfilter links in {covered} network namespace(s) ({scope:?} scope)");
            for report in new
                .iter_mut()
                .filter(|r| r.chosen().is_some_and(|h| h.starts_with("netfilter-link")))
            {
                report.notes.push(note.clone());
                report.errors.extend(errors.iter().cloned());
            }
        }
        self.hops
            .retain(|r| !PATH_HOPS.contains(&r.hop) || !counted && r.hop == "send");
        if let (Err(why), Some(drop)) = (consume, self.hops.iter_mut().find(|r| r.hop == "drop")) {
            drop.errors.push(format!(
                "consume_skb: {why} (sampling cannot forget a freed skb's decision early)"
            ));
        }
        self.hops.extend(new);
        self.hops
            .sort_by_key(|r| HOP_ORDER.iter().position(|h| *h == r.hop));
        self.paths = true;
        // Attaching parsed the object and the kernel's BTF again (trampolines need it).
        release_freed_heap();
        self.set_mode(true)
    }

    /// Detaches the path hooks again and unloads their programs (the counting ones stay):
    /// nothing of them runs, not even an early return.
    fn detach_paths(&mut self) {
        let _ = self.set_mode(false);
        self.netfilter = netfilter::Coverage::default();
        self.ingress = None;
        for name in programs::ALL {
            let keep = name == programs::COUNT_CGROUP_EGRESS
                || name == programs::DROP_KFREE_SKB
                || name == programs::DROP_BTF_KFREE_SKB
                || !self.counted && SEND_PROGRAMS.contains(&name);
            if !keep {
                unload_any(&mut self.ebpf, name);
            }
        }
        self.paths = false;
        // What attaching and detaching the window's programs allocated is free now: without
        // this the agent kept 2–2.6 MiB more per window for good (seen on 6.1).
        release_freed_heap();
    }

    /// Opens a path window: attaches the path hooks (when they are not) and forgets what
    /// sampling remembered from the last window (skb addresses are reused).
    pub fn open_paths(&mut self) -> Result<(), LoadError> {
        if self.paths {
            return Ok(());
        }
        maps::clear_sampling(&mut self.ebpf);
        self.attach_paths()
    }

    /// Closes a path window: detaches the path hooks.
    pub fn close_paths(&mut self) {
        if self.paths {
            self.detach_paths();
        }
    }

    /// The path hooks are attached now.
    pub fn paths_attached(&self) -> bool {
        self.paths
    }

    /// Tells the programs what is attached (`MODE_*`).
    fn set_mode(&mut self, paths: bool) -> Result<(), LoadError> {
        let mut mode = 0;
        if self.counted {
            mode |= MODE_COUNT_HOP;
        }
        if paths {
            mode |= MODE_PATHS;
            let nat_links = self.hops.iter().any(|r| {
                r.hop == "nat" && r.chosen().is_some_and(|h| h.starts_with("netfilter-link"))
            });
            if nat_links {
                mode |= MODE_NAT_LINKS;
            }
            if self.netfilter.deliver_at_nat {
                mode |= MODE_DELIVER_AT_NAT;
            }
        }
        let map = self
            .ebpf
            .map_mut(names::MODE)
            .ok_or_else(|| LoadError::Object(format!("no {} map in the object", names::MODE)))?;
        let mut array = Array::<_, u32>::try_from(map).map_err(|e| LoadError::Object(chain(&e)))?;
        array
            .set(0, mode, 0)
            .map_err(|e| LoadError::Object(format!("setting {}: {}", names::MODE, chain(&e))))
    }

    /// How each hop is observed on this kernel, count first.
    pub fn hops(&self) -> impl Iterator<Item = &HopReport> {
        self.hops.iter()
    }

    /// The send hop's hook in use (without path hooks, the count hop's).
    pub fn send_hook(&self) -> Option<&'static str> {
        let hop = |name: &str| self.hops.iter().find(|r| r.hop == name);
        hop("send")
            .or_else(|| hop("count"))
            .and_then(HopReport::chosen)
    }

    /// Facts about the kernel found before loading.
    pub fn kernel(&self) -> &KernelFacts {
        &self.kernel
    }

    /// This kernel's drop reason names.
    pub fn drop_reasons(&self) -> &DropReasons {
        &self.drop_reasons
    }

    /// Logs, once at start, every hop that is not observed (everywhere), with why: paths
    /// would otherwise lack those hops without a word.
    pub fn warn_missing_hops(&self) {
        for w in self.hops.iter().flat_map(HopReport::warnings) {
            tracing::warn!("{w}");
        }
    }

    /// Follows device changes in the covered namespaces (new veths get the ingress
    /// program). True when something changed: new namespaces may have come with it.
    pub fn follow_devices(&mut self) -> bool {
        let Some(cover) = self.ingress.as_mut() else {
            return false;
        };
        let Ok(prog) = program::<SchedClassifier>(&mut self.ebpf, cover.mode().program()) else {
            return false;
        };
        let (changed, errors) = cover.follow(prog);
        for e in errors {
            tracing::debug!("ingress: {e}");
        }
        changed
    }

    /// Links the netfilter programs and attaches ingress in the namespaces `namespaces`
    /// lists that are not covered yet (with `--netns all`); returns how many were added.
    /// Errors are logged, not fatal.
    pub fn follow_namespaces(&mut self, namespaces: &Namespaces) -> usize {
        if self.scope == NetnsScope::Host {
            return 0;
        }
        let mut added = 0;
        if !self.netfilter.is_empty() {
            let (n, errors) = self.netfilter.cover(namespaces);
            added = n;
            for e in errors {
                tracing::debug!("not covered: {e}");
            }
        }
        if let Some(cover) = self.ingress.as_mut() {
            if let Ok(prog) = program::<SchedClassifier>(&mut self.ebpf, cover.mode().program()) {
                let (n, errors) = cover.cover(prog, namespaces);
                added = added.max(n);
                for e in errors {
                    tracing::debug!("ingress not covered: {e}");
                }
            }
        }
        added
    }

    /// Detaches from the namespaces `inodes` (gone) and lets go of them.
    pub fn release_namespaces(&mut self, inodes: &[u64]) {
        self.netfilter.release(inodes);
        if let Some(cover) = self.ingress.as_mut() {
            cover.release(inodes);
        }
        if !inodes.is_empty() {
            // What following them took is free now: returned, as after a path window (seen
            // on 6.1: 4–8 MiB kept after 40 pods went).
            release_freed_heap();
        }
    }

    /// The namespaces something is attached in now, each with the links (netfilter, tcx
    /// or clsact) held there.
    pub fn namespace_coverage(&self) -> BTreeMap<u64, usize> {
        let mut covered: BTreeMap<u64, usize> = self.netfilter.links().collect();
        if let Some(cover) = &self.ingress {
            for (inode, devices) in cover.namespaces() {
                *covered.entry(inode).or_default() += devices;
            }
        }
        covered
    }

    /// A handle of its own on the flow table and the counters, for a thread that reads them
    /// while the event loop goes on (a table of 100k flows takes most of a second to read).
    pub fn flow_reader(&self) -> Option<FlowReader> {
        FlowReader::new(&self.ebpf)
    }

    /// A handle of its own on the sampling setting, to change it while the pipeline runs.
    /// `None` without the drop hop: its tracepoints are where a datagram's decision ends.
    pub fn sampler(&self) -> Option<Sampler> {
        let drop = self.hops.iter().find(|r| r.hop == "drop")?;
        drop.chosen()?;
        Sampler::new(&self.ebpf)
    }

    /// Forgets flows in the kernel (expired by the agent).
    pub fn remove_flows(&mut self, keys: &[FlowKey]) {
        let Some(map) = self.ebpf.map_mut(names::FLOWS) else {
            return;
        };
        if let Ok(mut flows) = PerCpuHashMap::<_, FlowKey, FlowStats>::try_from(map) {
            for key in keys {
                let _ = flows.remove(key);
            }
        }
    }

    /// The reader of the kernel programs' logs, when they were loaded with them on. Can be
    /// taken once, after everything is attached (it takes the log ring buffer's map).
    pub fn take_kernel_logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        if !self.kernel_log {
            return None;
        }
        aya_log::EbpfLogger::init(&mut self.ebpf)
            .inspect_err(|e| tracing::warn!("no kernel logs: {e}"))
            .ok()
    }

    /// The event ring buffer, read through a descriptor of its own. The map stays in the
    /// object: the netfilter programs loaded by hand when a path window opens are relocated
    /// against the object's maps, and one that writes events fails without it.
    pub fn events(&self) -> Option<RingBuf<MapData>> {
        let Some(Map::RingBuf(data)) = self.ebpf.map(names::EVENTS) else {
            return None;
        };
        let fd = data.fd().as_fd().try_clone_to_owned().ok()?;
        let data = MapData::from_fd(fd).ok()?;
        RingBuf::try_from(Map::RingBuf(data)).ok()
    }

    /// Sums the per-CPU counters of the `STATS` map, indexed by `STAT_*`.
    pub fn stats(&self) -> Vec<u64> {
        let Some(map) = self.ebpf.map(names::STATS) else {
            return Vec::new();
        };
        let Ok(array) = PerCpuArray::<_, u64>::try_from(map) else {
            return Vec::new();
        };
        (0..STATS_LEN)
            .map(|i| array.get(&i, 0).map(|v| v.iter().sum()).unwrap_or(0))
            .collect()
    }
}

/// Hops whose hooks are attached only with paths (the send hop's too when the count hop
/// counts).
const PATH_HOPS: [&str; 6] = ["send", "nat", "xmit", "deliver", "recv", "ingress"];

/// The order hops are reported in (a datagram's order).
const HOP_ORDER: [&str; 8] = [
    "count", "send", "nat", "xmit", "drop", "deliver", "recv", "ingress",
];

/// The send hop's programs (kept attached when they are what counts).
const SEND_PROGRAMS: [&str; 12] = [
    programs::SEND_FENTRY_UDP_SENDMSG,
    programs::SEND_FENTRY_UDPV6_SENDMSG,
    programs::SEND_KPROBE_UDP_SENDMSG,
    programs::SEND_KPROBE_UDPV6_SENDMSG,
    programs::SEND_BTF_SOCK_SEND_LENGTH,
    programs::SEND_SOCK_SEND_LENGTH,
    programs::SEND_CGROUP_SENDMSG4,
    programs::SEND_CGROUP_SENDMSG6,
    programs::SEND_ENTER_SENDTO,
    programs::SEND_ENTER_SENDMSG,
    programs::SEND_ENTER_SENDMMSG,
    programs::SEND_EXIT,
];

/// Gives the heap the load freed (the kernel's parsed BTF, the object's relocation) back to
/// the system: glibc keeps freed memory mapped, and the agent's resident size stayed at its
/// load-time peak for good.
fn release_freed_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free heap pages; it takes the allocator's lock.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use udptrace_common::programs;

    use super::EBPF_OBJECT;

    /// Every program and map the loader asks for by name is in the built object (an
    /// object built with AYA_BUILD_SKIP=1 is empty: nothing to check).
    #[test]
    fn every_program_and_map_named_is_in_the_object() {
        if EBPF_OBJECT.is_empty() {
            eprintln!("no eBPF object in this build (AYA_BUILD_SKIP=1): skipped");
            return;
        }
        let obj = aya_obj::Object::parse(EBPF_OBJECT).expect("the embedded object parses");
        let progs: BTreeSet<&str> = obj.programs.keys().map(String::as_str).collect();
        for name in programs::ALL {
            assert!(progs.contains(name), "program {name} missing: {progs:?}");
        }
        // The loader gives aya no kernel BTF, and netfilter programs are loaded by hand:
        // neither would apply a CO-RE relocation.
        assert!(
            !obj.has_btf_relocations(),
            "the object has CO-RE relocations: load it with the kernel's BTF"
        );
        let maps: BTreeSet<&str> = obj.maps.keys().map(String::as_str).collect();
        for name in udptrace_common::names::ALL {
            assert!(
                maps.iter()
                    .any(|m| m == &name || m.ends_with(&format!(".{name}"))),
                "map {name} missing: {maps:?}"
            );
        }
    }
}
