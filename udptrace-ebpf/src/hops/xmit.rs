//! The xmit hop: a device transmits the datagram.

use aya_ebpf::{macros::raw_tracepoint, programs::RawTracePointContext};
use udptrace_common::{Hook, KIND_XMIT};

use crate::{maps::finish, read::skb::emit};

/// Raw tracepoint net_dev_start_xmit(const struct sk_buff *skb, const struct net_device *dev),
/// just before the driver takes the skb: it is intact and still owned by the sending socket.
/// Raw: the program gets the arguments as they are, and the kernel builds no trace record.
#[raw_tracepoint(tracepoint = "net_dev_start_xmit")]
pub fn xmit_start_xmit(ctx: RawTracePointContext) -> u32 {
    finish!(
        emit(KIND_XMIT, Hook::TpNetDevStartXmit as u16, ctx.arg(0), 0),
        "xmit_start_xmit"
    );
    0
}
