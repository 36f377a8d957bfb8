//! The xmit hop: tracepoint `net_dev_start_xmit`, typed (tp_btf: the skb's fields are plain
//! loads) or else raw (every read a helper call); a kernel without it traces without this
//! hop.

use udptrace_common::{programs, Hook};

use crate::{
    kernel::offsets::Group,
    loader::{
        chain::{attach_chain, attach_raw_tp, attach_tp_btf, need, Ctx},
        report::HopReport,
    },
};

pub fn attach(ctx: &mut Ctx<'_>) -> HopReport {
    attach_chain(
        ctx,
        "xmit",
        &[
            (Hook::TpBtfNetDevStartXmit.name(), tp_btf),
            (Hook::TpNetDevStartXmit.name(), raw_tp),
        ],
    )
}

fn tp_btf(ctx: &mut Ctx<'_>, _: &mut HopReport) -> Result<(), String> {
    need(ctx.layout, &[Group::Skb, Group::Sock, Group::TpXmit])?;
    attach_tp_btf(
        ctx.ebpf,
        programs::XMIT_BTF_START_XMIT,
        "net_dev_start_xmit",
    )
}

fn raw_tp(ctx: &mut Ctx<'_>, _: &mut HopReport) -> Result<(), String> {
    need(ctx.layout, &[Group::Skb, Group::Sock, Group::TpXmit])?;
    attach_raw_tp(ctx.ebpf, programs::XMIT_START_XMIT, "net_dev_start_xmit")
}
