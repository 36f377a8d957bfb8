//! The xmit hop: raw tracepoint `net_dev_start_xmit` (the only hook; a kernel without it
//! traces without this hop).

use udptrace_common::{programs, Hook};

use crate::{
    kernel::offsets::Group,
    loader::{
        chain::{attach_chain, attach_raw_tp, need, Ctx},
        report::HopReport,
    },
};

pub fn attach(ctx: &mut Ctx<'_>) -> HopReport {
    attach_chain(ctx, "xmit", &[(Hook::TpNetDevStartXmit.name(), raw_tp)])
}

fn raw_tp(ctx: &mut Ctx<'_>, _: &mut HopReport) -> Result<(), String> {
    need(ctx.layout, &[Group::Skb, Group::Sock, Group::TpXmit])?;
    attach_raw_tp(ctx.ebpf, programs::XMIT_START_XMIT, "net_dev_start_xmit")
}
