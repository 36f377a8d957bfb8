//! The xmit hop: a device transmits the datagram.

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use udptrace_common::{HOOK_TP_NET_DEV_START_XMIT, KIND_XMIT};

use crate::{maps::offset, skb::emit, tp::field};

/// net:net_dev_start_xmit(const struct sk_buff *skb, const struct net_device *dev), just
/// before the driver takes the skb: it is intact and still owned by the sending socket.
#[tracepoint]
pub fn xmit_start_xmit(ctx: TracePointContext) -> u32 {
    if let Ok(skb) = field::<u64>(&ctx, offset!(tp_xmit_skb)) {
        let _ = emit(KIND_XMIT, HOOK_TP_NET_DEV_START_XMIT, skb, 0);
    }
    0
}
