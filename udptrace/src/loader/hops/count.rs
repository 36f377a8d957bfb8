//! The count hop: cgroup_skb egress at the root of the cgroup v2 hierarchy counts every
//! datagram a local socket sends, per flow, in one small program (the always-on cost).
//! Without it the send hop counts (one of its hooks is then attached in every mode).

use aya::programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType};
use udptrace_common::{programs, Hook};

use crate::{
    kernel::{cgroup2, offsets::Group},
    loader::{
        chain::{attach_chain, chain, need, program, Ctx},
        report::HopReport,
    },
};

pub fn attach(ctx: &mut Ctx<'_>) -> HopReport {
    attach_chain(ctx, "count", &[(Hook::CgroupSkbEgress.name(), cgroup_skb)])
}

fn cgroup_skb(ctx: &mut Ctx<'_>, report: &mut HopReport) -> Result<(), String> {
    // The sender's namespace is read from the skb's socket; conntrack (the destination an
    // unconnected send named, before NAT) is optional.
    need(ctx.layout, &[Group::Skb, Group::Sock])?;
    let root = cgroup2::root(ctx.cgroup_root)?;
    let dir = std::fs::File::open(&root).map_err(|e| format!("{}: {e}", root.display()))?;
    let name = programs::COUNT_CGROUP_EGRESS;
    let prog: &mut CgroupSkb = program(ctx.ebpf, name)?;
    prog.load()
        .map_err(|e| format!("loading {name}: {}", chain(&e)))?;
    // A bpf_link runs beside the cgroup's other programs (systemd's IP accounting, a
    // CNI's): `Single` passes no flags, which links do not take.
    if let Err(e) = prog.attach(&dir, CgroupSkbAttachType::Egress, CgroupAttachMode::Single) {
        let why = format!("attaching {name} to {}: {}", root.display(), chain(&e));
        let _ = prog.unload();
        return Err(why);
    }
    let mut note = format!(
        "every datagram sent, counted per flow at {}",
        root.display()
    );
    if let Some(why) = ctx.layout.missing(Group::Conntrack) {
        note.push_str(&format!(
            "; unconnected sends through NAT are counted by their rewritten destination \
             ({why})"
        ));
    }
    report.notes.push(note);
    Ok(())
}
