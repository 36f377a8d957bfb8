//! The drop hop: the kernel frees the datagram with a reason. Every UDP datagram dropped is
//! counted in the kernel by namespace, reason and addresses (`DROPS`), attached paths or
//! not; a drop is reported as a hop event when a path follows the datagram, and otherwise
//! at most once a second per drop key and CPU — the drops held back are counted.

use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::{btf_tracepoint, raw_tracepoint},
    programs::{BtfTracePointContext, RawTracePointContext},
};
use udptrace_common::{
    DropKey, DropStats, Hook, SkbEvent, DROP_EVENT_EVERY_NS, KIND_DROP, MODE_NAT_LINKS, MODE_PATHS,
    SKB_UNSAMPLED, STAT_RINGBUF_FULL, TUNNEL_NONE,
};

use crate::{
    maps::{count, empty_bodies, finish, mode, ring_flags, Scratch, DROPS, EVENTS},
    read::kernel::{Fields, Probed, ReadError, Typed},
    read::skb::{fill_device, fill_flow_key, fill_rest},
    sampling::{self, Decision},
};

/// `SKB_NOT_DROPPED_YET`, 0 in every kernel's `enum skb_drop_reason`: not a drop.
const NOT_DROPPED_YET: u32 = 0;

/// Raw tracepoint kfree_skb(struct sk_buff *skb, void *location, enum skb_drop_reason reason,
/// ...); the loader checks these positions in the kernel's BTF.
#[raw_tracepoint(tracepoint = "kfree_skb")]
pub fn drop_kfree_skb(ctx: RawTracePointContext) -> u32 {
    if empty_bodies() {
        return 0;
    }
    let reason: u64 = ctx.arg(2);
    finish!(
        try_drop(Probed(ctx.arg(0)), reason as u32, Hook::TpKfreeSkb as u16),
        "drop_kfree_skb"
    );
    0
}

/// The same tracepoint typed (tp_btf): the skb's fields, its device's and the device's
/// namespace's are plain loads the verifier checks, not helper calls (the packet's bytes
/// still are). Every datagram dropped pays them, counted or not.
#[btf_tracepoint(function = "kfree_skb")]
pub fn drop_btf_kfree_skb(ctx: BtfTracePointContext) -> u32 {
    if empty_bodies() {
        return 0;
    }
    let skb: *const u8 = ctx.arg(0);
    let reason: u64 = ctx.arg(2);
    finish!(
        try_drop(Typed(skb), reason as u32, Hook::TpBtfKfreeSkb as u16),
        "drop_btf_kfree_skb"
    );
    0
}

#[inline(always)]
fn try_drop<S: Fields>(sk_buff: S, reason: u32, hook: u16) -> Result<(), ReadError> {
    let skb = sk_buff.addr();
    if skb == 0 || reason == NOT_DROPPED_YET {
        return Ok(());
    }
    // Without path hooks no datagram is followed: every drop is one nobody traces.
    let paths = mode(MODE_PATHS);
    let decision = if paths {
        sampling::lookup(skb)
    } else {
        Decision::Known(false)
    };
    if paths && !matches!(decision, Decision::All) {
        // The datagram ends here: the address may carry another one next.
        sampling::forget(skb);
    }
    let Some(mut scratch) = Scratch::take() else {
        return Ok(());
    };
    let ev = scratch.event();
    let Some(dev) = fill_flow_key(ev, sk_buff, 0)? else {
        return Ok(());
    };
    let traced = match decision {
        Decision::All => true,
        Decision::Known(traced) => traced,
        // First seen as it is dropped: no path follows it.
        Decision::Unknown => false,
    };
    if !count_drop(ev, reason, traced) {
        return Ok(());
    }
    if !traced {
        ev.flags |= SKB_UNSAMPLED;
    }
    fill_device(ev, sk_buff, dev);
    fill_rest(ev, KIND_DROP, hook, sk_buff, reason, dev);
    ev.sk_ino = 0;
    if paths && ev.tunnel == TUNNEL_NONE && mode(MODE_NAT_LINKS) {
        super::nat::note_dnat(sk_buff, ev)?;
    }
    if EVENTS.output::<SkbEvent>(&*ev, ring_flags()).is_err() {
        count(STAT_RINGBUF_FULL);
    }
    Ok(())
}

/// Counts the drop of `ev` for `reason`; says whether to report it: always when `traced`,
/// else when this CPU reported none for the key in the last [`DROP_EVENT_EVERY_NS`].
#[inline(always)]
fn count_drop(ev: &SkbEvent, reason: u32, traced: bool) -> bool {
    let key = DropKey {
        netns: ev.netns,
        reason,
        src: ev.src,
        dst: ev.dst,
    };
    let bytes = u64::from(ev.len);
    // SAFETY: plain helper call without pointer arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(stats) = DROPS.get_ptr_mut(key) else {
        // A traced drop is reported with its path: it does not count against the limit.
        let stats = DropStats {
            packets: 1,
            bytes,
            held: 0,
            reported_ns: if traced { 0 } else { now },
        };
        // A full table evicts its least recently used key: the insert does not fail for
        // want of room.
        let _ = DROPS.insert(key, stats, 0);
        return true;
    };
    // SAFETY: this CPU's value of the entry; a program cannot be preempted on its CPU.
    let stats = unsafe { &mut *stats };
    stats.packets += 1;
    stats.bytes += bytes;
    if traced {
        return true;
    }
    if stats.reported_ns != 0 && now.saturating_sub(stats.reported_ns) < DROP_EVENT_EVERY_NS {
        stats.held += 1;
        return false;
    }
    stats.reported_ns = now;
    true
}
