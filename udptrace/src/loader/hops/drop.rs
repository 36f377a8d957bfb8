//! The drop hop: tracepoint `kfree_skb` with the reason (every drop counted in the
//! kernel), typed (tp_btf: the skb's fields are plain loads) or else raw, and with path hooks `consume_skb`, where sampling forgets a datagram's decision
//! when its skb is freed the other way (without them nothing is decided: every freed skb
//! of the host would pay for nothing).

use udptrace_common::{programs, Hook};

use crate::{
    kernel::offsets::Group,
    loader::{
        chain::{attach_chain, attach_raw_tp, attach_tp_btf, enabled, need, Ctx},
        report::HopReport,
    },
};

pub fn attach(ctx: &mut Ctx<'_>) -> HopReport {
    attach_chain(
        ctx,
        "drop",
        &[
            (Hook::TpBtfKfreeSkb.name(), tp_btf),
            (Hook::TpKfreeSkb.name(), raw_tp),
        ],
    )
}

fn tp_btf(ctx: &mut Ctx<'_>, _: &mut HopReport) -> Result<(), String> {
    need(ctx.layout, &[Group::Skb, Group::Sock, Group::TpDrop])?;
    attach_tp_btf(ctx.ebpf, programs::DROP_BTF_KFREE_SKB, "kfree_skb")
}

fn raw_tp(ctx: &mut Ctx<'_>, _: &mut HopReport) -> Result<(), String> {
    need(ctx.layout, &[Group::Skb, Group::Sock, Group::TpDrop])?;
    attach_raw_tp(ctx.ebpf, programs::DROP_KFREE_SKB, "kfree_skb")
}

/// With the path hooks: `consume_skb`, where sampling forgets the decision of an skb freed
/// without a drop.
pub fn attach_consume(ctx: &mut Ctx<'_>) -> Result<(), String> {
    enabled(Hook::TpKfreeSkb.name())?;
    need(ctx.layout, &[Group::Skb])?;
    attach_raw_tp(ctx.ebpf, programs::SAMPLE_CONSUME_SKB, "consume_skb")
}
