//! The send hop: a datagram handed to UDP by a socket.
//!
//! Three ways to see it, best first; the loader attaches the first this kernel allows:
//! 1. fentry on `udp_sendmsg`/`udpv6_sendmsg`: socket and destination in one place.
//! 2. kprobe on the same functions.
//! 3. raw tracepoint `sock_send_length` (after every socket send, with the socket and
//!    the result), plus the destination of unconnected sends, which the socket does not
//!    hold, from the cgroup `sendmsg4`/`sendmsg6` hooks at the cgroup v2 root (UDP runs
//!    them for every send that names a destination), or else from
//!    `syscalls:sys_enter_send{to,msg,mmsg}` (which put every syscall of every task on the
//!    kernel's slow path while attached).

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{btf_tracepoint, cgroup_sock_addr, fentry, kprobe, raw_tracepoint, tracepoint},
    programs::{
        BtfTracePointContext, FEntryContext, ProbeContext, RawTracePointContext, SockAddrContext,
        TracePointContext,
    },
};
use udptrace_common::{
    Addr, FlowKey, FlowStats, Hook, PendingSend, SendEvent, AF_INET, AF_INET6, IPPROTO_UDP,
    KIND_SEND, MODE_COUNT_HOP, MODE_PATHS, SEND_CONNECTED, SEND_DST_FROM_CALL, STAT_PENDING_FULL,
    STAT_RINGBUF_FULL,
};

use super::count;
use crate::{
    maps::{empty_bodies, fault, finish, mode, offset, ring_flags, EVENTS, FLOWS, PENDING_SENDS},
    read::current::{header, task},
    read::kernel::{
        read_kernel, read_sock, read_sockaddr, read_user, Fields, Mem, Probed, ReadError, Typed,
    },
    read::tracepoint::field,
    sampling,
};

/// Counts one datagram of socket `sk` on its flow and, when it is sampled (or failed), sends
/// its send-hop event. `call_dst` is the destination the application named in the call
/// (family 0 when it named none). The event is built in place in the ring buffer: the BPF
/// stack is too small for a copy.
#[inline(always)]
fn emit<S: Fields>(hook: u16, sock: S, call_dst: Addr, ret: i32) -> Result<(), ReadError> {
    // Nothing to count (the count hop counts, or nobody) and a filter that the ports
    // already leave out: two reads, and done.
    let after_skbs = Hook::from_u16(hook).sends_after_skbs();
    if ret >= 0
        && mode(MODE_COUNT_HOP)
        && mode(MODE_PATHS)
        && sampling::send_left_out(sock, &call_dst, after_skbs)
    {
        return Ok(());
    }
    let sk = sock.addr();
    let mut key = FlowKey::default();
    key.netns = read_sock(sock, &mut key.src, &mut key.dst)?;
    let connected = key.dst.port != 0;
    if call_dst.family != 0 {
        key.dst = call_dst;
    }
    count_flow(&key, ret);
    if !mode(MODE_PATHS) {
        // Counting is all this hop does without path hooks (no count hop here).
        return Ok(());
    }
    let traced = sampling::decide_send(sk, &key, after_skbs);
    if !traced && ret >= 0 {
        return Ok(());
    }
    let Some(mut entry) = EVENTS.reserve::<SendEvent>(0) else {
        // The event is lost; the flow's count is not.
        fault(STAT_RINGBUF_FULL);
        return Ok(());
    };
    // SAFETY: the reservation is sized for a SendEvent; `fill` writes every field.
    fill(
        unsafe { &mut *entry.as_mut_ptr() },
        hook,
        sk,
        &key,
        connected,
        call_dst.family != 0,
        ret,
    );
    entry.submit(ring_flags());
    Ok(())
}

/// Counts one datagram of `key` (`ret`: bytes sent, or a negative errno); only a failed
/// send when the count hop counts the datagrams.
#[inline(always)]
fn count_flow(key: &FlowKey, ret: i32) {
    let failed = ret < 0;
    if !failed && mode(MODE_COUNT_HOP) {
        return;
    }
    let (packets, bytes, errors) = if failed {
        (0, 0, 1)
    } else {
        (1, ret as u64, 0)
    };
    if let Some(stats) = FLOWS.get_ptr_mut(key) {
        // SAFETY: this CPU's value of the entry; a program cannot be preempted on its CPU.
        let stats = unsafe { &mut *stats };
        stats.packets += packets;
        stats.bytes += bytes;
        stats.errors += errors;
        stats.sends += packets;
        return;
    }
    let stats = FlowStats {
        packets,
        bytes,
        errors,
        sends: packets,
        // SAFETY: plain helper call without pointer arguments.
        first_ns: unsafe { bpf_ktime_get_ns() },
    };
    count::insert(key, &stats);
}

#[inline(always)]
fn fill(
    ev: &mut SendEvent,
    hook: u16,
    sk: u64,
    key: &FlowKey,
    connected: bool,
    dst_from_call: bool,
    ret: i32,
) {
    let mut flags = 0;
    if connected {
        flags |= SEND_CONNECTED;
    }
    if dst_from_call {
        flags |= SEND_DST_FROM_CALL;
    }
    let task = task();
    ev.header = header(KIND_SEND, hook);
    ev.sock = sk;
    ev.cgroup = task.cgroup;
    ev.pid = task.pid;
    ev.tid = task.tid;
    ev.uid = task.uid;
    ev.gid = task.gid;
    ev.netns = key.netns;
    ev.ret = ret;
    ev.flags = flags;
    ev._pad = 0;
    ev.comm = task.comm;
    ev.name = task.name;
    ev.src = key.src;
    ev.dst = key.dst;
}

/// The destination in a kernel `struct msghdr` (already copied from the caller).
#[inline(always)]
fn msghdr_dst(msg: u64) -> Result<Addr, ReadError> {
    if msg == 0 {
        return Ok(Addr::default());
    }
    let name: u64 = read_kernel(msg, offset!(msghdr_name))?;
    let len: u32 = read_kernel(msg, offset!(msghdr_namelen))?;
    read_sockaddr(Mem::Kernel, name, len)
}

// --- 1. fentry -------------------------------------------------------------------------

/// int udp_sendmsg(struct sock *sk, struct msghdr *msg, size_t len)
#[fentry(function = "udp_sendmsg")]
pub fn send_fentry_udp_sendmsg(ctx: FEntryContext) -> u32 {
    finish!(
        fentry_send(&ctx, Hook::FentryUdpSendmsg as u16),
        "send_fentry_udp_sendmsg"
    );
    0
}

/// int udpv6_sendmsg(struct sock *sk, struct msghdr *msg, size_t len)
#[fentry(function = "udpv6_sendmsg")]
pub fn send_fentry_udpv6_sendmsg(ctx: FEntryContext) -> u32 {
    finish!(
        fentry_send(&ctx, Hook::FentryUdpv6Sendmsg as u16),
        "send_fentry_udpv6_sendmsg"
    );
    0
}

#[inline(always)]
fn fentry_send(ctx: &FEntryContext, hook: u16) -> Result<(), ReadError> {
    let sk: u64 = ctx.arg(0);
    let msg: u64 = ctx.arg(1);
    let len: u64 = ctx.arg(2);
    emit(hook, Probed(sk), msghdr_dst(msg)?, len as i32)
}

// --- 2. kprobe -------------------------------------------------------------------------

/// int udp_sendmsg(struct sock *sk, struct msghdr *msg, size_t len)
#[kprobe]
pub fn send_kprobe_udp_sendmsg(ctx: ProbeContext) -> u32 {
    finish!(
        kprobe_send(&ctx, Hook::KprobeUdpSendmsg as u16),
        "send_kprobe_udp_sendmsg"
    );
    0
}

/// int udpv6_sendmsg(struct sock *sk, struct msghdr *msg, size_t len)
#[kprobe]
pub fn send_kprobe_udpv6_sendmsg(ctx: ProbeContext) -> u32 {
    finish!(
        kprobe_send(&ctx, Hook::KprobeUdpv6Sendmsg as u16),
        "send_kprobe_udpv6_sendmsg"
    );
    0
}

#[inline(always)]
fn kprobe_send(ctx: &ProbeContext, hook: u16) -> Result<(), ReadError> {
    let (Some(sk), Some(msg), Some(len)) =
        (ctx.arg::<u64>(0), ctx.arg::<u64>(1), ctx.arg::<u64>(2))
    else {
        return Err(ReadError);
    };
    emit(hook, Probed(sk), msghdr_dst(msg)?, len as i32)
}

// --- 3. tracepoints ----------------------------------------------------------------------

/// cgroup `sendmsg4`: UDP runs it in `udp_sendmsg` for a send that names its destination,
/// before routing. Remembers the destination for this socket's send; always allows it.
#[cgroup_sock_addr(sendmsg4)]
pub fn send_cgroup_sendmsg4(ctx: SockAddrContext) -> i32 {
    if empty_bodies() {
        return 1;
    }
    remember_user_dst(&ctx, AF_INET);
    1
}

/// cgroup `sendmsg6`, as `sendmsg4` for `udpv6_sendmsg`.
#[cgroup_sock_addr(sendmsg6)]
pub fn send_cgroup_sendmsg6(ctx: SockAddrContext) -> i32 {
    if empty_bodies() {
        return 1;
    }
    remember_user_dst(&ctx, AF_INET6);
    1
}

/// The destination a cgroup `sendmsg` program sees. `family` is a constant per program:
/// each reads only the address fields its attach type may read.
#[inline(always)]
fn remember_user_dst(ctx: &SockAddrContext, family: u16) {
    // SAFETY: the kernel's context for this program type.
    let a = unsafe { &*ctx.sock_addr };
    let mut dst = Addr {
        family,
        // The port is in network order in the low 16 bits.
        port: u16::from_be(a.user_port as u16),
        ..Addr::default()
    };
    if family == AF_INET {
        dst.ip[..4].copy_from_slice(&a.user_ip4.to_ne_bytes());
    } else {
        for (i, word) in a.user_ip6.iter().enumerate() {
            dst.ip[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
        }
    }
    // SAFETY: the socket pointer member of the context's union, always set here.
    let sk = unsafe { a.__bindgen_anon_1.sk } as u64;
    remember(dst, sk, 0, 0);
}

#[inline(always)]
fn remember(dst: Addr, sk: u64, mmsg: u64, vlen: u32) {
    let pending = PendingSend {
        dst,
        sk,
        mmsg,
        vlen,
        idx: 0,
    };
    if PENDING_SENDS
        .insert(bpf_get_current_pid_tgid(), pending, 0)
        .is_err()
    {
        fault(STAT_PENDING_FULL);
    }
}

#[inline(always)]
fn forget() {
    let _ = PENDING_SENDS.remove(bpf_get_current_pid_tgid());
}

/// syscalls:sys_enter_sendto(int fd, void *buff, size_t len, unsigned flags,
///                           struct sockaddr *addr, int addr_len)
#[tracepoint]
pub fn send_enter_sendto(ctx: TracePointContext) -> u32 {
    finish!(try_enter_sendto(&ctx), "send_enter_sendto");
    0
}

#[inline(always)]
fn try_enter_sendto(ctx: &TracePointContext) -> Result<(), ReadError> {
    let addr: u64 = field(ctx, offset!(tp_sendto_addr))?;
    if addr == 0 {
        return Ok(());
    }
    let len: u64 = field(ctx, offset!(tp_sendto_addr_len))?;
    remember(read_sockaddr(Mem::User, addr, len as u32)?, 0, 0, 0);
    Ok(())
}

/// syscalls:sys_enter_sendmsg(int fd, struct user_msghdr *msg, unsigned flags)
#[tracepoint]
pub fn send_enter_sendmsg(ctx: TracePointContext) -> u32 {
    finish!(try_enter_sendmsg(&ctx), "send_enter_sendmsg");
    0
}

#[inline(always)]
fn user_msghdr_dst(msg: u64) -> Result<Addr, ReadError> {
    let name: u64 = read_user(msg, offset!(user_msghdr_name))?;
    let len: u32 = read_user(msg, offset!(user_msghdr_namelen))?;
    read_sockaddr(Mem::User, name, len)
}

#[inline(always)]
fn try_enter_sendmsg(ctx: &TracePointContext) -> Result<(), ReadError> {
    let msg: u64 = field(ctx, offset!(tp_sendmsg_msg))?;
    if msg == 0 {
        return Ok(());
    }
    let dst = user_msghdr_dst(msg)?;
    if dst.family != 0 {
        remember(dst, 0, 0, 0);
    }
    Ok(())
}

/// syscalls:sys_enter_sendmmsg(int fd, struct mmsghdr *mmsg, unsigned vlen, unsigned flags)
#[tracepoint]
pub fn send_enter_sendmmsg(ctx: TracePointContext) -> u32 {
    finish!(try_enter_sendmmsg(&ctx), "send_enter_sendmmsg");
    0
}

#[inline(always)]
fn try_enter_sendmmsg(ctx: &TracePointContext) -> Result<(), ReadError> {
    let mmsg: u64 = field(ctx, offset!(tp_sendmmsg_mmsg))?;
    let vlen: u64 = field(ctx, offset!(tp_sendmmsg_vlen))?;
    if mmsg != 0 {
        remember(Addr::default(), 0, mmsg, vlen as u32);
    }
    Ok(())
}

/// syscalls:sys_exit_send{to,msg,mmsg}: the call is over, forget its destination.
#[tracepoint]
pub fn send_exit(_ctx: TracePointContext) -> u32 {
    forget();
    0
}

/// Raw tracepoint sock_send_length(struct sock *sk, int ret, int flags), after every
/// socket send (raw: no trace record is built for the sends of other protocols either).
#[raw_tracepoint(tracepoint = "sock_send_length")]
pub fn send_sock_send_length(ctx: RawTracePointContext) -> u32 {
    if empty_bodies() {
        return 0;
    }
    finish!(
        try_sock_send_length(
            Probed(ctx.arg(0)),
            ctx.arg(1),
            Hook::TpSockSendLength as u16
        ),
        "send_sock_send_length"
    );
    0
}

/// The same tracepoint typed (tp_btf): the socket's protocol and ports, all a datagram the
/// trace filter leaves out costs, are plain loads instead of helper calls.
#[btf_tracepoint(function = "sock_send_length")]
pub fn send_btf_sock_send_length(ctx: BtfTracePointContext) -> u32 {
    if empty_bodies() {
        return 0;
    }
    // The tracepoint's arguments: a BTF-typed struct sock pointer, and an int.
    let (sk, ret): (*const u8, i64) = (ctx.arg(0), ctx.arg(1));
    finish!(
        try_sock_send_length(Typed(sk), ret as i32, Hook::TpBtfSockSendLength as u16),
        "send_btf_sock_send_length"
    );
    0
}

#[inline(always)]
fn try_sock_send_length<S: Fields>(sock: S, ret: i32, hook: u16) -> Result<(), ReadError> {
    if sock.field::<u16>(offset!(sk_protocol)) != Some(IPPROTO_UDP) {
        return Ok(());
    }
    let sk = sock.addr();
    let mut dst = Addr::default();
    let thread = bpf_get_current_pid_tgid();
    if let Some(pending) = PENDING_SENDS.get_ptr_mut(thread) {
        // SAFETY: a map value owned by this thread's in-flight send.
        let pending = unsafe { &mut *pending };
        if pending.mmsg != 0 {
            if pending.idx < pending.vlen {
                let entry = pending.mmsg + u64::from(pending.idx) * offset!(mmsghdr_size) as u64;
                dst = user_msghdr_dst(entry)?;
            }
            pending.idx += 1;
        } else if pending.sk == 0 || pending.sk == sk {
            // One destination for one send: the next send of the thread may name none.
            dst = pending.dst;
            let _ = PENDING_SENDS.remove(thread);
        }
    }
    emit(hook, sock, dst, ret)
}
