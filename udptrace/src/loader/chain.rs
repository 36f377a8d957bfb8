//! The one fallback chain every hop uses: hooks declared as data (name, attach function),
//! best first, walked by [`attach_chain`], each attempt recorded with why it failed.
//! Plus the attach steps the hops' functions are made of.

use std::path::Path;

use aya::{
    programs::{BtfTracePoint, FEntry, FExit, RawTracePoint, TracePoint},
    Btf, Ebpf,
};

use super::{
    netfilter,
    netns::NetnsScope,
    report::{Attempt, HopReport},
    tc, EBPF_OBJECT,
};
use crate::kernel::offsets::{Group, KernelLayout};

/// What attaching a hook works with, and what it leaves attached.
pub struct Ctx<'a> {
    pub ebpf: &'a mut Ebpf,
    pub layout: &'a KernelLayout,
    pub scope: NetnsScope,
    /// The host's cgroup v2 hierarchy, if configured (else found, see `kernel::cgroup2`).
    pub cgroup_root: Option<&'a Path>,
    /// Netfilter programs to link in every covered namespace.
    pub netfilter: &'a mut netfilter::Coverage,
    /// The ingress programs' tc attachments, once the ingress hop attached.
    pub ingress: &'a mut Option<tc::Coverage>,
}

impl Ctx<'_> {
    /// The embedded eBPF object's bytes (netfilter programs are loaded from them).
    pub fn object(&self) -> &'static [u8] {
        EBPF_OBJECT
    }
}

/// One way to observe a hop: `Err` says why it is not usable here. It may add notes
/// (reduced detail, where it runs) and errors (where it could not attach) to the report.
pub type AttachFn = fn(&mut Ctx<'_>, &mut HopReport) -> Result<(), String>;

/// A hook of a hop's chain: the name `doctor` and `UDPTRACE_DISABLE_HOOKS` use (its family
/// before the first `:`), and how to attach it.
pub type AttachPoint = (&'static str, AttachFn);

/// Tries `chain` in order until one hook attaches; records every attempt, and the hooks
/// after the one that worked as not needed.
pub fn attach_chain(ctx: &mut Ctx<'_>, hop: &'static str, chain: &[AttachPoint]) -> HopReport {
    let mut report = HopReport::new(hop);
    for &(hook, attach) in chain {
        if report.chosen().is_some() {
            report.not_needed.push(hook);
            continue;
        }
        let outcome = enabled(hook).and_then(|()| attach(ctx, &mut report));
        report.attempts.push(Attempt { hook, outcome });
    }
    report
}

/// Diagnostic switch: hook families (`fentry`, `kprobe`, `raw_tracepoint`, `tcx`...) not to
/// use, comma separated. Lets a user (and the tests) run a fallback on a kernel that has a
/// better hook.
pub const DISABLE_HOOKS_ENV: &str = "UDPTRACE_DISABLE_HOOKS";

/// `Err` naming [`DISABLE_HOOKS_ENV`] when it lists `hook`'s family: the attempt is not made.
pub fn enabled(hook: &str) -> Result<(), String> {
    let family = hook.split(':').next().unwrap_or(hook);
    let disabled =
        std::env::var(DISABLE_HOOKS_ENV).is_ok_and(|v| v.split(',').any(|f| f.trim() == family));
    if disabled {
        Err(format!("disabled by {DISABLE_HOOKS_ENV}"))
    } else {
        Ok(())
    }
}

/// `Err` with the first missing offset group's reason.
pub fn need(layout: &KernelLayout, groups: &[Group]) -> Result<(), String> {
    groups
        .iter()
        .find_map(|g| layout.missing(*g))
        .map_or(Ok(()), |why| Err(why.to_string()))
}

/// Formats an error with its whole source chain.
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        s.push_str(": ");
        s.push_str(&e.to_string());
        source = e.source();
    }
    s
}

/// The program `name` of type `T`.
pub fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, String>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf
        .program_mut(name)
        .ok_or_else(|| format!("program {name} missing from object"))?;
    prog.try_into()
        .map_err(|e: aya::programs::ProgramError| chain(&e))
}

/// Unloads the named programs of type `$ty` (detaching their links) after a partial attach,
/// so a fallback never runs beside half of a better hook.
macro_rules! unload_all {
    ($ty:ty, $ebpf:expr, $names:expr) => {
        for name in $names {
            if let Ok(prog) = $crate::loader::chain::program::<$ty>($ebpf, name) {
                if prog.fd().is_err() {
                    continue; // never loaded
                }
                if let Err(e) = prog.unload() {
                    tracing::warn!("unloading {name}: {}", $crate::loader::chain::chain(&e));
                }
            }
        }
    };
}
pub(crate) use unload_all;

/// Unloads program `name` (detaching what aya attached of it) if it is loaded.
pub fn unload_any(ebpf: &mut Ebpf, name: &str) {
    use aya::programs::Program;
    let Some(prog) = ebpf.program_mut(name) else {
        return;
    };
    macro_rules! unload {
        ($p:expr) => {
            if $p.fd().is_ok() {
                $p.unload()
            } else {
                Ok(())
            }
        };
    }
    let result = match prog {
        Program::FEntry(p) => unload!(p),
        Program::FExit(p) => unload!(p),
        Program::KProbe(p) => unload!(p),
        Program::RawTracePoint(p) => unload!(p),
        Program::BtfTracePoint(p) => unload!(p),
        Program::TracePoint(p) => unload!(p),
        Program::CgroupSockAddr(p) => unload!(p),
        Program::CgroupSkb(p) => unload!(p),
        Program::SchedClassifier(p) => unload!(p),
        // The netfilter programs: parsed by aya as classifiers, never loaded through it.
        _ => Ok(()),
    };
    if let Err(e) = result {
        tracing::warn!("unloading {name}: {}", chain(&e));
    }
}

/// Where the kernel lists the kprobe PMU; absent when CONFIG_KPROBES is off.
const KPROBE_PMU: &str = "/sys/bus/event_source/devices/kprobe/type";

/// `Err` when this kernel has no kprobes.
pub fn kprobes() -> Result<(), String> {
    if Path::new(KPROBE_PMU).exists() {
        Ok(())
    } else {
        Err(format!(
            "this kernel has no kprobes ({KPROBE_PMU} is missing: CONFIG_KPROBES is off)"
        ))
    }
}

/// Loads trampoline program `$name` (an `FEntry` or `FExit`, or a `BtfTracePoint`) for
/// kernel function (or tracepoint) `$func` and attaches it; unloads it again when the
/// attach fails.
macro_rules! attach_trampoline {
    ($kind:ty, $ebpf:expr, $name:expr, $func:expr) => {{
        let func = $func;
        let btf = Btf::from_sys_fs().map_err(|e| chain(&e))?;
        let prog: &mut $kind = program($ebpf, $name)?;
        prog.load(func, &btf)
            .map_err(|e| format!("loading for {func}: {}", chain(&e)))?;
        if let Err(e) = prog.attach() {
            let why = format!("attaching to {func}: {}", chain(&e));
            let _ = prog.unload();
            return Err(why);
        }
        Ok(())
    }};
}

/// Loads fentry program `name` for kernel function `func` and attaches it.
pub fn attach_fentry(ebpf: &mut Ebpf, name: &str, func: &str) -> Result<(), String> {
    attach_trampoline!(FEntry, ebpf, name, func)
}

/// Loads fexit program `name` for kernel function `func` and attaches it.
pub fn attach_fexit(ebpf: &mut Ebpf, name: &str, func: &str) -> Result<(), String> {
    attach_trampoline!(FExit, ebpf, name, func)
}

/// Loads tracepoint program `name` (once) and attaches it to `category:tp` for each `tp`.
pub fn attach_tp(ebpf: &mut Ebpf, name: &str, category: &str, tps: &[&str]) -> Result<(), String> {
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

/// Loads typed (BTF) tracepoint program `name` for tracepoint `tp` and attaches it (loaded
/// and attached as a trampoline is: against the kernel's BTF type of it).
pub fn attach_tp_btf(ebpf: &mut Ebpf, name: &str, tp: &str) -> Result<(), String> {
    attach_trampoline!(BtfTracePoint, ebpf, name, tp)
}

/// Loads raw tracepoint program `name` and attaches it to tracepoint `tp`. Raw: the
/// kernel hands the program the tracepoint's arguments and builds no trace record.
pub fn attach_raw_tp(ebpf: &mut Ebpf, name: &str, tp: &str) -> Result<(), String> {
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
