//! The drop hop: the kernel frees the datagram with a reason.

use aya_ebpf::{macros::raw_tracepoint, programs::RawTracePointContext};
use udptrace_common::{Hook, KIND_DROP};

use crate::{maps::finish, read::skb::emit};

/// Raw tracepoint kfree_skb(struct sk_buff *skb, void *location, enum skb_drop_reason reason,
/// ...); the loader checks these positions in the kernel's BTF.
#[raw_tracepoint(tracepoint = "kfree_skb")]
pub fn drop_kfree_skb(ctx: RawTracePointContext) -> u32 {
    let reason: u64 = ctx.arg(2);
    finish!(
        emit(
            KIND_DROP,
            Hook::TpKfreeSkb as u16,
            ctx.arg(0),
            reason as u32
        ),
        "drop_kfree_skb"
    );
    0
}
