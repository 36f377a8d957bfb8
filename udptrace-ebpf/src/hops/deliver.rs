//! The deliver hop: a receiving socket queued the datagram; and who reads that socket.
//!
//! Best first, as the loader tries them:
//! 1. fentry and fexit on `__udp_enqueue_schedule_skb` (socket and skb together, with the
//!    result): the hop is read on entry, while the skb is only ours, and sent on a 0 return.
//! 2. A netfilter link at the very end of LOCAL_IN remembers the skb about to reach UDP on
//!    this CPU; raw tracepoint `sk_data_ready` (fired from the enqueue, same CPU, same
//!    call chain) names the socket that took it.
//!
//! Readers: fexit on `udp_recvmsg`/`udpv6_recvmsg`, else raw tracepoint `sock_recv_length`
//! (both after the read, so a reader already blocked when tracing starts is seen too).

use aya_ebpf::{
    macros::{classifier, fentry, fexit, raw_tracepoint},
    programs::{FEntryContext, FExitContext, RawTracePointContext, TcContext},
};
use udptrace_common::{Hook, RecvEvent, IPPROTO_UDP, KIND_DELIVER, KIND_RECV, STAT_RINGBUF_FULL};

use super::nat::{nf_ctx, NF_ACCEPT};
use crate::{
    maps::{
        empty_bodies, fault, finish, offset, ring_flags, DELIVER_PENDING, EVENTS, LOCAL_IN_SKB,
    },
    read::current::{header, task},
    read::kernel::{read_kernel, try_read_kernel, Fields as _, ReadError},
    read::skb::{emit_for_sock, output, prepare_delivery},
    sampling,
};

/// int __udp_enqueue_schedule_skb(struct sock *sk, struct sk_buff *skb), on entry: the hop
/// as it will be if the datagram is queued. Once queued, a reader on another CPU may take and
/// free the skb before the fexit program runs (seen in the 6.1 VM).
#[fentry(function = "__udp_enqueue_schedule_skb")]
pub fn deliver_fentry_enqueue(ctx: FEntryContext) -> u32 {
    let Some(pending) = DELIVER_PENDING.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: this CPU's slot; the enqueue runs with bottom halves off, so no other
    // enqueue on this CPU comes between this program and its fexit.
    let pending = unsafe { &mut *pending };
    pending.skb = 0;
    let sk: u64 = ctx.arg(0);
    let skb: u64 = ctx.arg(1);
    let hook = Hook::FexitUdpEnqueue as u16;
    let result = prepare_delivery(&mut pending.ev, hook, skb, sk);
    if let Ok(Some(stamp)) = result {
        pending.skb = skb;
        pending.stamp = stamp;
    }
    finish!(result, "deliver_fentry_enqueue");
    0
}

/// The same on return, 0 when queued: sends what the entry read.
#[fexit(function = "__udp_enqueue_schedule_skb")]
pub fn deliver_fexit_enqueue(ctx: FExitContext) -> u32 {
    let skb: u64 = ctx.arg(1);
    let ret: i64 = ctx.arg(2);
    let Some(pending) = DELIVER_PENDING.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: this CPU's slot, filled by the entry program of this same call.
    let pending = unsafe { &mut *pending };
    if pending.skb != skb || skb == 0 {
        return 0;
    }
    pending.skb = 0;
    if ret == 0 {
        output(&pending.ev);
        sampling::forget_if(skb, pending.stamp);
    }
    0
}

/// int (*)(struct bpf_nf_ctx *ctx), linked last at LOCAL_IN: the skb about to reach UDP.
/// Where the NAT hop is linked, its program at the end of LOCAL_IN does this instead
/// (`MODE_DELIVER_AT_NAT`) and this one is not linked.
#[classifier]
// Inlined into the macro's entry point, its result kept (see `nat_after`).
#[inline(always)]
pub fn deliver_local_in(ctx: TcContext) -> i32 {
    if empty_bodies() {
        return NF_ACCEPT;
    }
    let (_, skb) = nf_ctx(&ctx);
    note_local_in(skb.addr());
    NF_ACCEPT
}

/// Notes `skb` as the one about to reach UDP on this CPU, for `sk_data_ready` to pair with
/// the socket that takes it.
#[inline(always)]
pub fn note_local_in(skb: u64) {
    if let Some(slot) = LOCAL_IN_SKB.get_ptr_mut(0) {
        // SAFETY: this CPU's slot.
        unsafe { *slot = skb };
    }
}

/// Raw tracepoint sk_data_ready(const struct sock *sk): a socket was told data is queued.
#[raw_tracepoint(tracepoint = "sk_data_ready")]
pub fn deliver_sk_data_ready(ctx: RawTracePointContext) -> u32 {
    if empty_bodies() {
        return 0;
    }
    finish!(try_data_ready(ctx.arg(0)), "deliver_sk_data_ready");
    0
}

#[inline(always)]
fn try_data_ready(sk: u64) -> Result<(), ReadError> {
    let Some(slot) = LOCAL_IN_SKB.get_ptr_mut(0) else {
        return Ok(());
    };
    // SAFETY: this CPU's slot, set by deliver_local_in earlier in this same call chain.
    let skb = unsafe { core::ptr::replace(slot, 0) };
    // No decision to find (a filter nothing matched lately): the delivery never decides.
    if skb == 0
        || sampling::nothing_to_look_up()
        || read_kernel::<u16>(sk, offset!(sk_protocol))? != IPPROTO_UDP
    {
        return Ok(());
    }
    emit_for_sock(KIND_DELIVER, Hook::TpSkDataReady as u16, skb, sk)
}

/// Reports the current task as a reader of UDP socket `sk`.
#[inline(always)]
fn emit_reader(hook: u16, sk: u64) {
    if !sampling::readers_wanted() || !sampling::reader_due(sk) {
        return;
    }
    let task = task();
    let event = RecvEvent {
        header: header(KIND_RECV, hook),
        sk,
        cgroup: task.cgroup,
        pid: task.pid,
        tid: task.tid,
        uid: task.uid,
        _pad: 0,
        comm: task.comm,
        name: task.name,
    };
    if EVENTS.output::<RecvEvent>(&event, ring_flags()).is_err() {
        fault(STAT_RINGBUF_FULL);
    }
}

/// int udp_recvmsg(struct sock *sk, struct msghdr *msg, size_t len, int flags, int *addr_len),
/// on return: a reader blocked before tracing started is seen once it has read.
#[fexit(function = "udp_recvmsg")]
pub fn recv_fexit_udp_recvmsg(ctx: FExitContext) -> u32 {
    emit_reader(Hook::FexitUdpRecvmsg as u16, ctx.arg(0));
    0
}

/// int udpv6_recvmsg(struct sock *sk, struct msghdr *msg, size_t len, int flags, int *addr_len)
#[fexit(function = "udpv6_recvmsg")]
pub fn recv_fexit_udpv6_recvmsg(ctx: FExitContext) -> u32 {
    emit_reader(Hook::FexitUdpRecvmsg as u16, ctx.arg(0));
    0
}

/// Raw tracepoint sock_recv_length(struct sock *sk, int ret, int flags), after every socket
/// read.
#[raw_tracepoint(tracepoint = "sock_recv_length")]
pub fn recv_sock_recv_length(ctx: RawTracePointContext) -> u32 {
    if empty_bodies() {
        return 0;
    }
    let sk: u64 = ctx.arg(0);
    let ret: i32 = ctx.arg(1);
    if ret >= 0
        && sampling::readers_wanted()
        && try_read_kernel::<u16>(sk, offset!(sk_protocol)) == Some(IPPROTO_UDP)
    {
        emit_reader(Hook::TpSockRecvLength as u16, sk);
    }
    0
}
