//! The xmit hop: a device transmits the datagram.

use aya_ebpf::{
    macros::{btf_tracepoint, raw_tracepoint},
    programs::{BtfTracePointContext, RawTracePointContext},
};
use udptrace_common::{Hook, KIND_XMIT};

use crate::{
    maps::{empty_bodies, finish},
    read::{kernel::Typed, peek, skb::emit, skb::emit_peeked},
};

/// Raw tracepoint net_dev_start_xmit(const struct sk_buff *skb, const struct net_device *dev),
/// just before the driver takes the skb: it is intact and still owned by the sending socket.
/// Raw: the program gets the arguments as they are, and the kernel builds no trace record.
#[raw_tracepoint(tracepoint = "net_dev_start_xmit")]
pub fn xmit_start_xmit(ctx: RawTracePointContext) -> u32 {
    if empty_bodies() {
        return 0;
    }
    finish!(
        emit(KIND_XMIT, Hook::TpNetDevStartXmit as u16, ctx.arg(0), 0),
        "xmit_start_xmit"
    );
    0
}

/// The same tracepoint typed (tp_btf): the kernel's BTF types its arguments, so the skb's
/// fields (the trace filter's first look, then the hop: its socket, device, the device's
/// namespace, index, name, MTU and kind) are plain loads the verifier checks, not helper
/// calls. Only the packet's bytes and the GSO info are read by helper.
#[btf_tracepoint(function = "net_dev_start_xmit")]
pub fn xmit_btf_start_xmit(ctx: BtfTracePointContext) -> u32 {
    if empty_bodies() {
        return 0;
    }
    // The tracepoint's first argument, a struct sk_buff pointer typed by BTF.
    let skb: *const u8 = ctx.arg(0);
    if peek::btf_skb_left_out(skb) {
        return 0;
    }
    finish!(
        emit_peeked(KIND_XMIT, Hook::TpBtfNetDevStartXmit as u16, Typed(skb)),
        "xmit_btf_start_xmit"
    );
    0
}
