//! The ingress hop: tc ingress on every device of the covered namespaces sees the datagram
//! arrive (after a veth crossing, a decapsulation, or from the wire). The programs only
//! observe: they always return "no opinion", so the verdict is whatever the next program
//! (a CNI's, say) or the stack decides.

use aya_ebpf::{helpers::bpf_probe_read_kernel, macros::classifier, programs::TcContext};
use udptrace_common::{Hook, KIND_INGRESS};

use crate::{
    maps::{empty_bodies, finish},
    read::{kernel::Probed, peek, skb::emit_peeked},
};

/// TC_ACT_UNSPEC: for tcx, TCX_NEXT (run the next program, then the stack); for a clsact
/// filter in direct-action mode, continue with the next filter.
const NO_VERDICT: i32 = -1;

/// Linked with tcx (Linux 6.6+).
#[classifier]
// Inlined into the macro's entry point, its result kept (see `nat_after`).
#[inline(always)]
pub fn ingress_tcx(ctx: TcContext) -> i32 {
    if empty_bodies() {
        return NO_VERDICT;
    }
    observe(&ctx, Hook::TcxIngress as u16);
    NO_VERDICT
}

/// A clsact ingress filter (kernels before 6.6).
#[classifier]
// Inlined into the macro's entry point, its result kept (see `nat_after`).
#[inline(always)]
pub fn ingress_clsact(ctx: TcContext) -> i32 {
    if empty_bodies() {
        return NO_VERDICT;
    }
    observe(&ctx, Hook::TcClsactIngress as u16);
    NO_VERDICT
}

#[inline(always)]
fn observe(ctx: &TcContext, hook: u16) {
    // Left out by the trace filter from the packet's own bytes: the cheapest look there is.
    if peek::tc_left_out(ctx) {
        return;
    }
    // The context is the kernel's struct sk_buff: its address is the datagram's identity,
    // as the other hops report it. Reading the pointer back from the stack turns it into a
    // plain number the verifier lets us pass on (the loader has CAP_PERFMON).
    let ptr = ctx.skb.skb as u64;
    // SAFETY: reads our own stack slot.
    if let Ok(skb) = unsafe { bpf_probe_read_kernel(&raw const ptr) } {
        finish!(emit_peeked(KIND_INGRESS, hook, Probed(skb)), "ingress");
    }
}
