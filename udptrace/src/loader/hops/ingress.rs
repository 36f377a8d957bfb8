//! The ingress hop: tc ingress on every device of the covered namespaces; tcx where the
//! kernel has it (6.6+), else a clsact filter. New devices get it as rtnetlink reports them
//! (`Tracer::follow_devices`).

use aya::{programs::SchedClassifier, util::KernelVersion};
use udptrace_common::Hook;

use crate::{
    kernel::offsets::Group,
    loader::{
        chain::{attach_chain, chain, need, program, Ctx},
        netns::Namespaces,
        report::HopReport,
        tc,
    },
};

pub fn attach(ctx: &mut Ctx<'_>) -> HopReport {
    attach_chain(
        ctx,
        "ingress",
        &[
            (Hook::TcxIngress.name(), tcx),
            (Hook::TcClsactIngress.name(), clsact),
        ],
    )
}

fn tcx(ctx: &mut Ctx<'_>, report: &mut HopReport) -> Result<(), String> {
    if !KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0)) {
        return Err("tcx needs Linux 6.6 or newer".into());
    }
    cover(ctx, tc::Mode::Tcx, report)
}

fn clsact(ctx: &mut Ctx<'_>, report: &mut HopReport) -> Result<(), String> {
    cover(ctx, tc::Mode::Clsact, report)
}

/// Loads the program of `mode` and attaches it on every device of the covered namespaces.
fn cover(ctx: &mut Ctx<'_>, mode: tc::Mode, report: &mut HopReport) -> Result<(), String> {
    need(ctx.layout, &[Group::Skb, Group::Sock])?;
    let prog: &mut SchedClassifier = program(ctx.ebpf, mode.program())?;
    prog.load()
        .map_err(|e| format!("loading {}: {}", mode.program(), chain(&e)))?;
    let mut cover = tc::Coverage::new(mode);
    let (_, errors) = cover.cover(prog, &Namespaces::list(ctx.scope));
    if cover.devices() == 0 {
        let _ = prog.unload();
        return Err(format!(
            "no device accepted the program: {}",
            errors.join("; ")
        ));
    }
    report.notes.push(format!(
        "on {} device(s) ({:?} scope), first in line, never changing a verdict",
        cover.devices(),
        ctx.scope
    ));
    // Devices that refused the program (the hop works elsewhere).
    report.errors.extend(errors);
    *ctx.ingress = Some(cover);
    Ok(())
}
