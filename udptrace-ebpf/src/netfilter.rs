//! The NAT hop: BPF netfilter links just before and just after NAT at a hook. The "before"
//! program remembers the tuple; the "after" program reports it when NAT changed it.
//!
//! Loaded by userspace as BPF_PROG_TYPE_NETFILTER (aya has no API for it; the section is
//! `classifier` so aya's ELF parser accepts the programs). Both always accept the packet.

use aya_ebpf::{macros::classifier, programs::TcContext, EbpfContext as _};
use udptrace_common::{NatEvent, HOOK_NETFILTER_LINK, KIND_NAT, STAT_RINGBUF_FULL};

use crate::{
    kernel::{read_kernel, ReadError},
    maps::{count, offset, EVENTS, NAT_BEFORE},
    skb::{fill, read_udp, Task},
};

/// Netfilter verdict: let the packet go on.
const NF_ACCEPT: i32 = 1;

/// `struct bpf_nf_ctx { const struct nf_hook_state *state; struct sk_buff *skb; }`: the
/// netfilter program context (UAPI-stable layout).
#[inline(always)]
fn nf_ctx(ctx: &TcContext) -> (u64, u64) {
    let p = ctx.as_ptr() as *const u64;
    // SAFETY: the context is a bpf_nf_ctx; the verifier allows 8-byte reads of both fields.
    unsafe { (core::ptr::read(p), core::ptr::read(p.add(1))) }
}

#[inline(always)]
fn hook_of(state: u64) -> Result<u32, ReadError> {
    Ok(u32::from(read_kernel::<u8>(state, offset!(nf_state_hook))?))
}

/// int (*)(struct bpf_nf_ctx *ctx), linked just before NAT.
#[classifier]
pub fn nat_before(ctx: TcContext) -> i32 {
    let (state, skb) = nf_ctx(&ctx);
    let _ = try_before(state, skb);
    NF_ACCEPT
}

#[inline(always)]
fn try_before(state: u64, skb: u64) -> Result<(), ReadError> {
    let hook = hook_of(state)?;
    let Some(slot) = NAT_BEFORE.get_ptr_mut(hook) else {
        return Ok(());
    };
    // SAFETY: this CPU's slot; netfilter runs the hook's functions on one CPU in order.
    let slot = unsafe { &mut *slot };
    slot.skb = if read_udp(skb, slot)? { skb } else { 0 };
    Ok(())
}

/// int (*)(struct bpf_nf_ctx *ctx), linked just after NAT.
#[classifier]
pub fn nat_after(ctx: TcContext) -> i32 {
    let (state, skb) = nf_ctx(&ctx);
    let _ = try_after(state, skb);
    NF_ACCEPT
}

#[inline(always)]
fn try_after(state: u64, skb: u64) -> Result<(), ReadError> {
    let hook = hook_of(state)?;
    let Some(before) = NAT_BEFORE.get_ptr_mut(hook) else {
        return Ok(());
    };
    // SAFETY: this CPU's slot, written by nat_before at this hook for this packet.
    let before = unsafe { &mut *before };
    if before.skb != skb || skb == 0 {
        return Ok(());
    }
    before.skb = 0;
    let Some(mut entry) = EVENTS.reserve::<NatEvent>(0) else {
        count(STAT_RINGBUF_FULL);
        return Ok(());
    };
    // SAFETY: sized for a NatEvent; every field is written before submit, or discarded.
    let ev = unsafe { &mut *entry.as_mut_ptr() };
    let changed = match fill(
        &mut ev.skb,
        KIND_NAT,
        HOOK_NETFILTER_LINK,
        skb,
        0,
        Task::None,
        0,
    ) {
        Ok(true) => ev.skb.src != before.src || ev.skb.dst != before.dst,
        _ => false,
    };
    if changed {
        ev.before_src = before.src;
        ev.before_dst = before.dst;
        ev.nf_hook = hook;
        ev._pad = 0;
        entry.submit(0);
    } else {
        entry.discard(0);
    }
    Ok(())
}
