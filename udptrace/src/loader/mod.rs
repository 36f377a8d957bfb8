//! Probes the kernel, loads the eBPF object with this kernel's offsets, and attaches each
//! hop with the best hook the kernel allows, falling back in order and recording why.
//! Everything attached is owned by [`Tracer`]; dropping it detaches exactly that.

mod ingress;
mod netfilter;
mod netns;
mod rtnl;

pub use netns::NetnsScope;

use std::{os::fd::AsFd as _, path::Path};

use aya::{
    maps::{Array, Map, MapData, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{
        CgroupAttachMode, CgroupSockAddr, FEntry, FExit, KProbe, RawTracePoint, SchedClassifier,
        TracePoint,
    },
    Btf, Ebpf, EbpfLoader,
};
use udptrace_common::{names, FlowKey, FlowStats, SampleConfig, STATS_LEN};

use crate::kernel::{
    btf::{BtfError, KernelBtf},
    cgroup2,
    drop_reasons::DropReasons,
    offsets::{Group, KernelLayout},
    preflight::{self, PreflightError},
    tracefs::Tracefs,
};

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

/// One attempt to attach a hop through one hook.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// e.g. `fentry:udp_sendmsg`.
    pub hook: &'static str,
    /// `Ok` when attached; otherwise why not.
    pub outcome: Result<(), String>,
}

/// `why` a hook failed, with the capabilities this process lacks when the kernel said
/// "permission denied" without naming one (kernels differ in what each hook needs).
fn name_caps(why: &str) -> String {
    let denied = why.contains("Permission denied") || why.contains("Operation not permitted");
    let lacking = crate::kernel::preflight::lacking_hook_caps();
    if !denied || why.contains("CAP_") || lacking.is_empty() {
        return why.to_string();
    }
    format!("{why} (this process lacks {})", lacking.join(", "))
}

/// How one hop is observed on this kernel.
#[derive(Debug, Clone)]
pub struct HopReport {
    pub hop: &'static str,
    /// Hooks tried in order of preference, up to and including the one in use.
    pub attempts: Vec<Attempt>,
    /// Hooks not tried because a better one worked.
    pub not_needed: Vec<&'static str>,
    /// Remarks about the hook in use (reduced detail, ...).
    pub notes: Vec<String>,
    /// Where the hook in use could not be attached (a namespace, a device), and why.
    pub errors: Vec<String>,
}

impl HopReport {
    fn new(hop: &'static str) -> Self {
        Self {
            hop,
            attempts: Vec::new(),
            not_needed: Vec::new(),
            notes: Vec::new(),
            errors: Vec::new(),
        }
    }

    /// The hook in use, if any.
    pub fn chosen(&self) -> Option<&'static str> {
        self.attempts
            .iter()
            .find(|a| a.outcome.is_ok())
            .map(|a| a.hook)
    }

    /// What a user should know before trusting the paths: this hop is not observed at all,
    /// or not everywhere it should be.
    pub fn warnings(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .errors
            .iter()
            .map(|e| format!("{} hop not attached everywhere: {}", self.hop, name_caps(e)))
            .collect();
        if self.chosen().is_none() {
            let why = self
                .attempts
                .last()
                .and_then(|a| a.outcome.as_ref().err())
                .map_or_else(|| "no hook to try".to_string(), |e| name_caps(e));
            out.insert(0, format!("no {} hop: {why}", self.hop));
        }
        out
    }

    /// One line per hook tried: attached, or why not usable.
    pub fn render(&self) -> String {
        self.attempts
            .iter()
            .map(|a| match &a.outcome {
                Ok(()) => format!("  tried {}: attached", a.hook),
                Err(why) => format!("  tried {}: not usable: {why}", a.hook),
            })
            .collect::<Vec<_>>()
            .join("\n")
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
    pub kernel: KernelFacts,
    pub send: HopReport,
    /// nat, xmit, drop.
    pub skb_hops: Vec<HopReport>,
    /// Netfilter programs and their links (dropping them detaches).
    netfilter: netfilter::Coverage,
    /// tc ingress attachments (dropping them detaches).
    ingress: Option<ingress::Coverage>,
    scope: NetnsScope,
    /// Drop reason names of this kernel.
    pub drop_reasons: DropReasons,
}

const HOOK_FENTRY: &str = "fentry:udp_sendmsg+udpv6_sendmsg";
const HOOK_KPROBE: &str = "kprobe:udp_sendmsg+udpv6_sendmsg";
const HOOK_TP: &str = "raw_tracepoint:sock:sock_send_length";
/// Where the tracepoint send hop learns unconnected sends' destinations, best first.
const HOOK_CGROUP_SENDMSG: &str = "cgroup:sendmsg4+sendmsg6";

/// Formats an error with its whole source chain.
fn chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        s.push_str(": ");
        s.push_str(&e.to_string());
        source = e.source();
    }
    s
}

/// Unloads the named programs of type `$ty` (detaching their links) after a partial attach,
/// so a fallback never runs beside half of a better hook.
macro_rules! unload_all {
    ($ty:ty, $ebpf:expr, $names:expr) => {
        for name in $names {
            if let Ok(prog) = program::<$ty>($ebpf, name) {
                if prog.fd().is_err() {
                    continue; // never loaded
                }
                if let Err(e) = prog.unload() {
                    tracing::warn!("unloading {name}: {}", chain(&e));
                }
            }
        }
    };
}

impl Tracer {
    /// Checks privileges and the kernel, loads the programs and attaches every hop.
    pub fn load(scope: NetnsScope) -> Result<Self, LoadError> {
        Self::load_with(scope, udptrace_common::FLOWS_DEFAULT)
    }

    /// Like [`Tracer::load`], keeping up to `flow_entries` flows in the kernel.
    pub fn load_with(scope: NetnsScope, flow_entries: u32) -> Result<Self, LoadError> {
        preflight::check_privileges()?;
        let release = preflight::kernel_release();
        preflight::check_kernel(&release)?;
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
        if EBPF_OBJECT.is_empty() {
            return Err(LoadError::NoObject);
        }
        let mut ebpf = EbpfLoader::new()
            .override_global(names::OFFSETS, &layout.offsets, true)
            .map_max_entries(names::FLOWS, flow_entries)
            .load(EBPF_OBJECT)
            .map_err(|e| LoadError::Object(chain(&e)))?;
        let drop_reasons = DropReasons::from_btf(&kbtf).unwrap_or_default();
        let send = attach_send(&mut ebpf, &layout);
        if send.chosen().is_none() {
            return Err(LoadError::NoHook {
                hop: "send",
                report: send.render(),
            });
        }
        let kernel = KernelFacts {
            tracefs: tracefs_fact,
        };
        let mut netfilter = netfilter::Coverage::default();
        let mut skb_hops = vec![attach_nat(&mut ebpf, &layout, &mut netfilter)];
        skb_hops.extend(attach_skb_hops(&mut ebpf, &layout));
        skb_hops.extend(attach_deliver(&mut ebpf, &layout, &mut netfilter));
        let (ingress_report, ingress) = attach_ingress(&mut ebpf, &layout, scope);
        skb_hops.push(ingress_report);
        if !netfilter.is_empty() {
            let (covered, errors) = netfilter.cover(&scope.files());
            let note =
                format!("netfilter links in {covered} network namespace(s) ({scope:?} scope)");
            for report in skb_hops
                .iter_mut()
                .filter(|r| r.chosen().is_some_and(|h| h.starts_with("netfilter-link")))
            {
                report.notes.push(note.clone());
                report.errors.extend(errors.iter().cloned());
            }
        }
        Ok(Self {
            ebpf,
            kernel,
            send,
            skb_hops,
            drop_reasons,
            netfilter,
            ingress,
            scope,
        })
    }

    /// Logs, once at start, every hop that is not observed (everywhere), with why: paths
    /// would otherwise lack those hops without a word.
    pub fn warn_missing_hops(&self) {
        for w in std::iter::once(&self.send)
            .chain(&self.skb_hops)
            .flat_map(HopReport::warnings)
        {
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

    /// Links the netfilter programs in namespaces that appeared since the last call (with
    /// `--netns all`); returns how many were added. Errors are logged, not fatal.
    pub fn cover_new_namespaces(&mut self) -> usize {
        if self.scope == NetnsScope::Host {
            return 0;
        }
        let files = self.scope.files();
        let mut new = 0;
        if !self.netfilter.is_empty() {
            let (n, errors) = self.netfilter.cover(&files);
            new = new.max(n);
            for e in errors {
                tracing::debug!("not covered: {e}");
            }
        }
        if let Some(cover) = self.ingress.as_mut() {
            cover.prune(&files);
            if let Ok(prog) = program::<SchedClassifier>(&mut self.ebpf, cover.mode().program()) {
                let (n, errors) = cover.cover(prog, &files);
                new = new.max(n);
                for e in errors {
                    tracing::debug!("ingress not covered: {e}");
                }
            }
        }
        new
    }

    /// A handle of its own on the flow table and the counters, for a thread that reads them
    /// while the event loop goes on (a table of 100k flows takes most of a second to read).
    pub fn flow_reader(&self) -> Option<FlowReader> {
        Some(FlowReader {
            flows: PerCpuHashMap::try_from(own_map(&self.ebpf, names::FLOWS)?).ok()?,
            stats: PerCpuArray::try_from(own_map(&self.ebpf, names::STATS)?).ok()?,
        })
    }

    /// A handle of its own on the sampling setting, to change it while the pipeline runs.
    /// `None` without the drop hop: its tracepoints are where a datagram's decision ends.
    pub fn sampler(&self) -> Option<Sampler> {
        let drop = self.skb_hops.iter().find(|r| r.hop == "drop")?;
        drop.chosen()?;
        Some(Sampler {
            map: Array::try_from(own_map(&self.ebpf, names::SAMPLING)?).ok()?,
        })
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

    /// The event ring buffer. Can be taken once.
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.ebpf
            .take_map(names::EVENTS)
            .and_then(|m| RingBuf::try_from(m).ok())
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

/// `name`'s map through a file descriptor of its own.
fn own_map(ebpf: &Ebpf, name: &str) -> Option<Map> {
    let (data, wrap): (&MapData, fn(MapData) -> Map) = match ebpf.map(name)? {
        Map::PerCpuLruHashMap(d) => (d, Map::PerCpuLruHashMap),
        Map::PerCpuArray(d) => (d, Map::PerCpuArray),
        Map::Array(d) => (d, Map::Array),
        _ => return None,
    };
    let fd = data.fd().as_fd().try_clone_to_owned().ok()?;
    Some(wrap(MapData::from_fd(fd).ok()?))
}

/// Sets which datagrams are traced hop by hop (`udptrace_common::SampleConfig`); the kernel
/// programs read it for every new datagram.
pub struct Sampler {
    map: Array<MapData, SampleConfig>,
}

impl Sampler {
    pub fn set(&mut self, config: SampleConfig) -> std::io::Result<()> {
        self.map.set(0, config, 0).map_err(std::io::Error::other)
    }

    pub fn get(&self) -> std::io::Result<SampleConfig> {
        self.map.get(&0, 0).map_err(std::io::Error::other)
    }
}

/// Sums each flow's per-CPU counts.
fn sum_flows(flows: &PerCpuHashMap<MapData, FlowKey, FlowStats>) -> Vec<(FlowKey, FlowStats)> {
    flows
        .iter()
        .filter_map(Result::ok)
        .map(|(key, per_cpu)| {
            let mut sum = FlowStats {
                first_ns: u64::MAX,
                ..FlowStats::default()
            };
            for s in per_cpu.iter().filter(|s| s.last_ns != 0) {
                sum.packets += s.packets;
                sum.bytes += s.bytes;
                sum.errors += s.errors;
                sum.first_ns = sum.first_ns.min(s.first_ns);
                sum.last_ns = sum.last_ns.max(s.last_ns);
            }
            if sum.first_ns == u64::MAX {
                sum.first_ns = 0;
            }
            (key, sum)
        })
        .collect()
}

/// The flow table and the counters through file descriptors of their own: usable from
/// another thread, and after the programs are gone.
pub struct FlowReader {
    flows: PerCpuHashMap<MapData, FlowKey, FlowStats>,
    stats: PerCpuArray<MapData, u64>,
}

impl FlowReader {
    /// How many flows the kernel had created, read first, then every flow it holds: a flow
    /// created in between is in the table but not in the count, so evictions computed
    /// from the two are never overestimated.
    pub fn read(&self) -> (u64, Vec<(FlowKey, FlowStats)>) {
        let created = self
            .stats
            .get(&udptrace_common::STAT_FLOW_NEW, 0)
            .map(|v| v.iter().sum())
            .unwrap_or(0);
        (created, sum_flows(&self.flows))
    }
}

/// How one hook is attached: `Err` says why it is not usable.
type Attach = fn(&mut Ebpf, &KernelLayout, &mut Vec<String>) -> Result<(), String>;

/// Tries `chain` in order until one hook attaches; records every attempt.
fn attach_chain(
    ebpf: &mut Ebpf,
    layout: &KernelLayout,
    hop: &'static str,
    chain: &[(&'static str, Attach)],
) -> HopReport {
    let mut report = HopReport::new(hop);
    for &(hook, attach) in chain {
        if report.chosen().is_some() {
            report.not_needed.push(hook);
            continue;
        }
        let outcome = enabled(hook).and_then(|()| attach(ebpf, layout, &mut report.notes));
        report.attempts.push(Attempt { hook, outcome });
    }
    report
}

/// The send hop: fentry, then kprobe, then tracepoints.
fn attach_send(ebpf: &mut Ebpf, layout: &KernelLayout) -> HopReport {
    attach_chain(
        ebpf,
        layout,
        "send",
        &[
            (HOOK_FENTRY, send_fentry),
            (HOOK_KPROBE, send_kprobe),
            (HOOK_TP, send_tracepoints),
        ],
    )
}

/// The xmit and drop hops. Each has one hook; a kernel without it traces without that hop.
/// (The deliver hop has its own chain, `attach_deliver`.)
fn attach_skb_hops(ebpf: &mut Ebpf, layout: &KernelLayout) -> Vec<HopReport> {
    fn xmit(e: &mut Ebpf, l: &KernelLayout, _: &mut Vec<String>) -> Result<(), String> {
        need(l, &[Group::Skb, Group::Sock, Group::TpXmit])?;
        attach_raw_tp(e, "xmit_start_xmit", "net_dev_start_xmit")
    }
    fn drop(e: &mut Ebpf, l: &KernelLayout, _: &mut Vec<String>) -> Result<(), String> {
        need(l, &[Group::Skb, Group::Sock, Group::TpDrop])?;
        attach_raw_tp(e, "drop_kfree_skb", "kfree_skb")?;
        // Sampling forgets a datagram's decision when its skb is freed either way.
        let consume = attach_raw_tp(e, "sample_consume_skb", "consume_skb");
        if consume.is_err() {
            // The hop is reported unusable: nothing of it stays attached.
            unload_all!(RawTracePoint, e, ["drop_kfree_skb"]);
        }
        consume
    }
    vec![
        attach_chain(
            ebpf,
            layout,
            "xmit",
            &[("raw_tracepoint:net:net_dev_start_xmit", xmit)],
        ),
        attach_chain(
            ebpf,
            layout,
            "drop",
            &[("raw_tracepoint:skb:kfree_skb", drop)],
        ),
    ]
}

/// The ingress hop: tc ingress on every device of the covered namespaces; tcx where the
/// kernel has it (6.6+), else a clsact filter.
fn attach_ingress(
    ebpf: &mut Ebpf,
    layout: &KernelLayout,
    scope: NetnsScope,
) -> (HopReport, Option<ingress::Coverage>) {
    const TCX: &str = "tcx:ingress";
    const CLSACT: &str = "tc:clsact-ingress";
    let mut report = HopReport::new("ingress");
    let files = scope.files();
    let mut coverage = None;
    for (hook, mode) in [(TCX, ingress::Mode::Tcx), (CLSACT, ingress::Mode::Clsact)] {
        if coverage.is_some() {
            report.not_needed.push(hook);
            continue;
        }
        let outcome = enabled(hook).and_then(|()| {
            if mode == ingress::Mode::Tcx
                && !aya::util::KernelVersion::current()
                    .is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0))
            {
                Err("tcx needs Linux 6.6 or newer".into())
            } else {
                need(layout, &[Group::Skb, Group::Sock]).and_then(|()| {
                    let prog: &mut SchedClassifier = program(ebpf, mode.program())?;
                    prog.load()
                        .map_err(|e| format!("loading {}: {}", mode.program(), chain(&e)))?;
                    let mut cover = ingress::Coverage::new(mode);
                    let (_, errors) = cover.cover(prog, &files);
                    if cover.devices() == 0 {
                        let _ = prog.unload();
                        return Err(format!(
                            "no device accepted the program: {}",
                            errors.join("; ")
                        ));
                    }
                    report.notes.push(format!(
                    "on {} device(s) ({scope:?} scope), first in line, never changing a verdict",
                    cover.devices()
                ));
                    report.errors.extend(errors);
                    coverage = Some(cover);
                    Ok(())
                })
            }
        });
        report.attempts.push(Attempt { hook, outcome });
    }
    (report, coverage)
}

/// The NAT hop: netfilter links just before and after NAT at each NAT hook, in each covered
/// namespace.
fn attach_nat(
    ebpf: &mut Ebpf,
    layout: &KernelLayout,
    cover: &mut netfilter::Coverage,
) -> HopReport {
    const HOOK: &str = "netfilter-link:nat";
    let mut report = HopReport::new("nat");
    let outcome = enabled(HOOK).and_then(|()| {
        need(layout, &[Group::Skb, Group::Sock, Group::NfState]).and_then(|()| {
            let progs = netfilter::load_programs(EBPF_OBJECT, ebpf, &["nat_before", "nat_after"])?;
            cover.add(progs, netfilter::nat_slots);
            report
                .notes
                .push("linked around NAT at prerouting, output, postrouting and input".into());
            Ok(())
        })
    });
    let linked = outcome.is_ok();
    report.attempts.push(Attempt {
        hook: HOOK,
        outcome,
    });
    const KPROBE: &str = "kprobe:nf_nat_manip_pkt";
    if linked {
        report.not_needed.push(KPROBE);
        return report;
    }
    // Kernels before 6.4: the function every NAT rewrite goes through, entry and return.
    let outcome = enabled(KPROBE).and_then(|()| {
        if !Path::new(KPROBE_PMU).exists() {
            Err(format!(
                "this kernel has no kprobes ({KPROBE_PMU} is missing)"
            ))
        } else {
            need(layout, &[Group::Skb, Group::Sock]).and_then(|()| {
                let result = ["nat_kprobe_manip", "nat_kretprobe_manip"]
                    .iter()
                    .try_for_each(|name| {
                        let prog: &mut KProbe = program(ebpf, name)?;
                        prog.load()
                            .map_err(|e| format!("loading {name}: {}", chain(&e)))?;
                        prog.attach("nf_nat_manip_pkt", 0).map(drop).map_err(|e| {
                            format!(
                        "attaching to nf_nat_manip_pkt: {} (is the nf_nat module loaded? it is \
                         once a NAT rule exists)",
                        chain(&e)
                    )
                        })
                    });
                if result.is_err() {
                    unload_all!(KProbe, ebpf, ["nat_kprobe_manip", "nat_kretprobe_manip"]);
                }
                result
            })
        }
    });
    if outcome.is_ok() {
        report.notes.push(
            "NAT seen in nf_nat_manip_pkt in every namespace; the hook is inferred (DNAT of a \
             local socket's datagram: output, else prerouting; SNAT: postrouting)"
                .into(),
        );
    }
    report.attempts.push(Attempt {
        hook: KPROBE,
        outcome,
    });
    report
}

/// The deliver hop: fexit on the UDP enqueue, else a netfilter link at the end of LOCAL_IN
/// paired with raw tracepoint sk_data_ready. Then who reads: fexit on udp_recvmsg, else
/// raw tracepoint sock_recv_length.
fn attach_deliver(
    ebpf: &mut Ebpf,
    layout: &KernelLayout,
    cover: &mut netfilter::Coverage,
) -> Vec<HopReport> {
    const FEXIT: &str = "fexit:__udp_enqueue_schedule_skb";
    const NF_TP: &str = "netfilter-link:local_in+raw_tracepoint:sock:sk_data_ready";
    let mut deliver = HopReport::new("deliver");
    let fexit = enabled(FEXIT).and_then(|()| {
        need(layout, &[Group::Skb, Group::Sock]).and_then(|()| {
            attach_fexit(ebpf, "deliver_fexit_enqueue", "__udp_enqueue_schedule_skb")
        })
    });
    let fexit_ok = fexit.is_ok();
    deliver.attempts.push(Attempt {
        hook: FEXIT,
        outcome: fexit,
    });
    if fexit_ok {
        deliver.not_needed.push(NF_TP);
    } else {
        let outcome = enabled(NF_TP).and_then(|()| {
            need(layout, &[Group::Skb, Group::Sock, Group::TpReady]).and_then(|()| {
                let progs = netfilter::load_programs(EBPF_OBJECT, ebpf, &["deliver_local_in"])?;
                attach_raw_tp(ebpf, "deliver_sk_data_ready", "sk_data_ready")?;
                cover.add(progs, netfilter::local_in_last);
                deliver
                    .notes
                    .push("linked last at LOCAL_IN (priority 1000)".into());
                Ok(())
            })
        });
        deliver.attempts.push(Attempt {
            hook: NF_TP,
            outcome,
        });
    }
    fn fexit_recv(e: &mut Ebpf, _: &KernelLayout, _: &mut Vec<String>) -> Result<(), String> {
        let progs = [
            ("recv_fexit_udp_recvmsg", "udp_recvmsg"),
            ("recv_fexit_udpv6_recvmsg", "udpv6_recvmsg"),
        ];
        let result = progs
            .iter()
            .try_for_each(|(name, func)| attach_fexit(e, name, func));
        if result.is_err() {
            unload_all!(FExit, e, progs.map(|(n, _)| n));
        }
        result
    }
    fn tp_recv(e: &mut Ebpf, l: &KernelLayout, _: &mut Vec<String>) -> Result<(), String> {
        // The program reads the socket's protocol (a Sock offset).
        need(l, &[Group::Sock, Group::TpRecv])?;
        attach_raw_tp(e, "recv_sock_recv_length", "sock_recv_length")
    }
    let recv = attach_chain(
        ebpf,
        layout,
        "recv",
        &[
            ("fexit:udp_recvmsg+udpv6_recvmsg", fexit_recv),
            ("raw_tracepoint:sock:sock_recv_length", tp_recv),
        ],
    );
    vec![deliver, recv]
}

/// Loads and attaches an fexit program on kernel function `func`.
fn attach_fexit(ebpf: &mut Ebpf, name: &str, func: &str) -> Result<(), String> {
    let btf = Btf::from_sys_fs().map_err(|e| chain(&e))?;
    let prog: &mut FExit = program(ebpf, name)?;
    prog.load(func, &btf)
        .map_err(|e| format!("loading for {func}: {}", chain(&e)))?;
    if let Err(e) = prog.attach() {
        let why = format!("attaching to {func}: {}", chain(&e));
        let _ = prog.unload();
        return Err(why);
    }
    Ok(())
}

/// Loads tracepoint program `name` (once) and attaches it to `category:tp` for each `tp`.
fn attach_tp(ebpf: &mut Ebpf, name: &str, category: &str, tps: &[&str]) -> Result<(), String> {
    let prog: &mut TracePoint = program(ebpf, name)?;
    if prog.fd().is_err() {
        prog.load()
            .map_err(|e| format!("loading {name}: {}", chain(&e)))?;
    }
    tps.iter().try_for_each(|tp| {
        prog.attach(category, tp)
            .map(drop)
            .map_err(|e| format!("attaching to {category}:{tp}: {}", chain(&e)))
    })
}

/// Loads raw tracepoint program `name` and attaches it to tracepoint `tp`. Raw: the
/// kernel hands the program the tracepoint's arguments and builds no trace record.
fn attach_raw_tp(ebpf: &mut Ebpf, name: &str, tp: &str) -> Result<(), String> {
    let prog: &mut RawTracePoint = program(ebpf, name)?;
    prog.load()
        .map_err(|e| format!("loading {name}: {}", chain(&e)))?;
    if let Err(e) = prog.attach(tp) {
        let why = format!("attaching to {tp}: {}", chain(&e));
        let _ = prog.unload();
        return Err(why);
    }
    Ok(())
}

/// Diagnostic switch: hook families (`fentry`, `kprobe`, `raw_tracepoint`, `tcx`...) not to use, comma
/// separated. Lets a user (and the tests) run a fallback on a kernel that has a better hook.
pub const DISABLE_HOOKS_ENV: &str = "UDPTRACE_DISABLE_HOOKS";

/// `Err` naming [`DISABLE_HOOKS_ENV`] when it lists `hook`'s family: the attempt is not made.
fn enabled(hook: &str) -> Result<(), String> {
    let family = hook.split(':').next().unwrap_or(hook);
    let disabled =
        std::env::var(DISABLE_HOOKS_ENV).is_ok_and(|v| v.split(',').any(|f| f.trim() == family));
    if disabled {
        Err(format!("disabled by {DISABLE_HOOKS_ENV}"))
    } else {
        Ok(())
    }
}

fn need(layout: &KernelLayout, groups: &[Group]) -> Result<(), String> {
    groups
        .iter()
        .find_map(|g| layout.missing(*g))
        .map_or(Ok(()), |why| Err(why.to_string()))
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, String>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf
        .program_mut(name)
        .ok_or_else(|| format!("program {name} missing from object"))?;
    prog.try_into()
        .map_err(|e: aya::programs::ProgramError| chain(&e))
}

fn send_fentry(ebpf: &mut Ebpf, layout: &KernelLayout, _: &mut Vec<String>) -> Result<(), String> {
    need(layout, &[Group::Sock, Group::Msghdr])?;
    let btf = Btf::from_sys_fs().map_err(|e| chain(&e))?;
    let progs = [
        ("send_fentry_udp_sendmsg", "udp_sendmsg"),
        ("send_fentry_udpv6_sendmsg", "udpv6_sendmsg"),
    ];
    let result = progs.iter().try_for_each(|(name, func)| {
        let prog: &mut FEntry = program(ebpf, name)?;
        prog.load(func, &btf)
            .map_err(|e| format!("loading for {func}: {}", chain(&e)))?;
        prog.attach()
            .map(drop)
            .map_err(|e| format!("attaching to {func}: {}", chain(&e)))
    });
    if result.is_err() {
        unload_all!(FEntry, ebpf, progs.map(|(n, _)| n));
    }
    result
}

/// Attaches the cgroup `sendmsg4`/`sendmsg6` programs at the root of the cgroup v2
/// hierarchy (so they run for every process, beside any other program there) and
/// returns that root; on failure nothing stays attached.
fn send_cgroup_hooks(ebpf: &mut Ebpf) -> Result<std::path::PathBuf, String> {
    let root = cgroup2::root()?;
    let dir = std::fs::File::open(&root).map_err(|e| format!("{}: {e}", root.display()))?;
    let progs = ["send_cgroup_sendmsg4", "send_cgroup_sendmsg6"];
    let result = progs.iter().try_for_each(|name| {
        let prog: &mut CgroupSockAddr = program(ebpf, name)?;
        prog.load()
            .map_err(|e| format!("loading {name}: {}", chain(&e)))?;
        // A bpf_link (aya makes one on 5.7+; the ring buffer needs 5.8 anyway) always runs
        // beside the cgroup's other programs, and takes no flags: `Single` passes none.
        prog.attach(&dir, CgroupAttachMode::Single)
            .map(drop)
            .map_err(|e| format!("attaching {name} to {}: {}", root.display(), chain(&e)))
    });
    if let Err(why) = result {
        unload_all!(CgroupSockAddr, ebpf, progs);
        return Err(why);
    }
    Ok(root)
}

/// Where the kernel lists the kprobe PMU; absent when CONFIG_KPROBES is off.
const KPROBE_PMU: &str = "/sys/bus/event_source/devices/kprobe/type";

fn send_kprobe(ebpf: &mut Ebpf, layout: &KernelLayout, _: &mut Vec<String>) -> Result<(), String> {
    need(layout, &[Group::Sock, Group::Msghdr])?;
    if !Path::new(KPROBE_PMU).exists() {
        return Err(format!(
            "this kernel has no kprobes ({KPROBE_PMU} is missing: CONFIG_KPROBES is off)"
        ));
    }
    let progs = [
        ("send_kprobe_udp_sendmsg", "udp_sendmsg"),
        ("send_kprobe_udpv6_sendmsg", "udpv6_sendmsg"),
    ];
    let result = progs.iter().try_for_each(|(name, func)| {
        let prog: &mut KProbe = program(ebpf, name)?;
        prog.load()
            .map_err(|e| format!("loading for {func}: {}", chain(&e)))?;
        prog.attach(func, 0)
            .map(drop)
            .map_err(|e| format!("attaching to {func}: {}", chain(&e)))
    });
    if result.is_err() {
        unload_all!(KProbe, ebpf, progs.map(|(n, _)| n));
    }
    result
}

fn send_tracepoints(
    ebpf: &mut Ebpf,
    layout: &KernelLayout,
    notes: &mut Vec<String>,
) -> Result<(), String> {
    need(layout, &[Group::Sock, Group::TpSendLength])?;
    attach_raw_tp(ebpf, "send_sock_send_length", "sock_send_length")?;
    // The destination of unconnected sends is not in the socket: the cgroup hooks that UDP
    // runs for such sends see it; else the syscalls' arguments hold it.
    let cgroup = enabled(HOOK_CGROUP_SENDMSG).and_then(|()| send_cgroup_hooks(ebpf));
    let cgroup_why = match cgroup {
        Ok(root) => {
            notes.push(format!(
                "destinations of unconnected sends from {HOOK_CGROUP_SENDMSG} at {}",
                root.display()
            ));
            return Ok(());
        }
        Err(why) => why,
    };
    let attach = attach_tp;
    let syscalls = need(layout, &[Group::TpSendSyscalls, Group::UserMsghdr]).and_then(|()| {
        attach(ebpf, "send_enter_sendto", "syscalls", &["sys_enter_sendto"])?;
        attach(
            ebpf,
            "send_enter_sendmsg",
            "syscalls",
            &["sys_enter_sendmsg"],
        )?;
        attach(
            ebpf,
            "send_enter_sendmmsg",
            "syscalls",
            &["sys_enter_sendmmsg"],
        )?;
        attach(
            ebpf,
            "send_exit",
            "syscalls",
            &["sys_exit_sendto", "sys_exit_sendmsg", "sys_exit_sendmmsg"],
        )
    });
    match syscalls {
        Ok(()) => notes.push(format!(
            "destinations of unconnected sends from syscalls:sys_enter_send{{to,msg,mmsg}} \
             (every syscall is slower while they are attached); {HOOK_CGROUP_SENDMSG} \
             unusable: {cgroup_why}"
        )),
        Err(why) => {
            unload_all!(
                TracePoint,
                ebpf,
                [
                    "send_enter_sendto",
                    "send_enter_sendmsg",
                    "send_enter_sendmmsg",
                    "send_exit"
                ]
            );
            notes.push(format!(
                "unconnected sends will show no destination: {HOOK_CGROUP_SENDMSG} unusable \
                 ({cgroup_why}), syscall tracepoints unusable ({why})"
            ));
        }
    }
    Ok(())
}
