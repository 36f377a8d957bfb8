//! The drop hop: the kernel frees the datagram with a reason.

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use udptrace_common::{HOOK_TP_KFREE_SKB, KIND_DROP};

use crate::{maps::offset, skb::emit, tp::field};

/// skb:kfree_skb(struct sk_buff *skb, void *location, enum skb_drop_reason reason, ...)
#[tracepoint]
pub fn drop_kfree_skb(ctx: TracePointContext) -> u32 {
    let (Ok(skb), Ok(reason)) = (
        field::<u64>(&ctx, offset!(tp_kfree_skb)),
        field::<u32>(&ctx, offset!(tp_kfree_reason)),
    ) else {
        return 0;
    };
    let _ = emit(KIND_DROP, HOOK_TP_KFREE_SKB, skb, reason);
    0
}
