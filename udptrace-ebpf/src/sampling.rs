//! Sampling: which datagrams get their hops reported (`udptrace_common::sample`). Decided
//! once per datagram at the first hop that sees it and remembered by skb address until the
//! kernel frees the skb; a datagram leaving a local socket also shares the decision with its
//! send hop through the socket, whichever of the two runs first.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_jiffies64, bpf_ktime_get_ns},
    macros::{map, raw_tracepoint},
    maps::{Array, LruHashMap, PerCpuArray},
    programs::RawTracePointContext,
};
use udptrace_common::{
    Addr, FlowKey, NatSeen, NatSeenKey, ReaderKey, SampleConfig, SkbEvent, SockDecision,
    TraceFilter, FILTER_HOST, IP_MF, IP_OFFSET, READER_EVERY_NS, SAMPLE_FLOWS_MAX, SAMPLE_NAT_MAX,
    SAMPLE_READERS_MAX, SAMPLE_SKBS_MAX, SAMPLE_SOCKS_MAX, SIDE_SEND, SIDE_SKB,
};

use crate::{
    maps::{empty_bodies, offset, NO_COMMON_LRU},
    read::kernel::{try_read_kernel, Fields},
};

/// Set by userspace, at load and at runtime. All zeros (the initial value) traces everything.
#[map(name = "SAMPLING")]
static SAMPLING: Array<SampleConfig> = Array::with_max_entries(1, 0);

/// Set by userspace: which datagrams may be traced at all. All zeros (the initial value):
/// every one.
#[map(name = "TRACE_FILTER")]
static TRACE_FILTER: Array<TraceFilter> = Array::with_max_entries(1, 0);

/// Set to 1 once a datagram decided on has left the filter's match (a NAT rewrite took it
/// out of it): from then on, headers the filter leaves out may still be a traced datagram's,
/// and hops look the skb up before leaving it out. Kernel-only; a new load starts at 0.
#[map(name = "FILTER_ESCAPES")]
static FILTER_ESCAPES: Array<u32> = Array::with_max_entries(1, 0);

/// When (jiffies) a decision was last remembered, kept to within [`STAMP_SLACK_JIFFIES`]:
/// while none was for longer than a decision is trusted, no lookup can find one, and hops
/// that only look up (the delivery, `consume_skb`) or only serve traced datagrams (the
/// readers) leave at once. A filter nothing matches then costs those hooks no hash lookup.
#[map(name = "LAST_REMEMBERED")]
static LAST_REMEMBERED: Array<u64> = Array::with_max_entries(1, 0);

/// Datagrams seen per flow, for "the first N, then 1 in M".
#[map(name = "SAMPLE_COUNT")]
static SAMPLE_COUNT: LruHashMap<FlowKey, u64> =
    LruHashMap::with_max_entries(SAMPLE_FLOWS_MAX, NO_COMMON_LRU);

/// skb address → when decided (ns) << 1 | traced, until the datagram's verdict or the skb
/// is freed.
#[map(name = "SAMPLE_SKBS")]
static SAMPLE_SKBS: LruHashMap<u64, u64> =
    LruHashMap::with_max_entries(SAMPLE_SKBS_MAX, NO_COMMON_LRU);

/// Decisions per CPU in [`SKB_UNTRACED`] (a power of two).
const UNTRACED_SLOTS: usize = 8;
/// Sockets per CPU in [`SOCK_UNTRACED`] (a power of two).
const SOCK_SLOTS: usize = 4;

/// Recent decisions not to trace a datagram, on one CPU: skb addresses and the values
/// [`SAMPLE_SKBS`] would hold, written in turn at `next` (userspace clears it as `[u64; 17]`).
/// Looked through whole (the verifier refuses arithmetic on a typed hook's skb pointer, so
/// no slot can be computed from the address; it compares).
#[repr(C)]
pub struct Untraced {
    next: u64,
    skb: [u64; UNTRACED_SLOTS],
    value: [u64; UNTRACED_SLOTS],
}

/// Decisions not to trace, per CPU: most datagrams with sampling on. A datagram's later hops
/// run on the CPU its first one did (the veth, the NIC's queue, the delivery all in one
/// softirq), so they find the decision here with a few plain loads, and nothing is inserted
/// in or deleted from a hash for it. A hop on another CPU (RPS, a migrated sender), or one
/// after seven more datagrams were decided on this CPU, does not see it and decides again:
/// at worst a datagram traced from there on. Traced datagrams are kept in [`SAMPLE_SKBS`],
/// across CPUs.
#[map(name = "SKB_UNTRACED")]
static SKB_UNTRACED: PerCpuArray<Untraced> = PerCpuArray::with_max_entries(1, 0);

/// The slot of this CPU's [`SKB_UNTRACED`] holding `skb`'s decision, with the decisions.
#[inline(always)]
fn untraced_of(skb: u64) -> Option<(&'static mut Untraced, usize)> {
    let u = SKB_UNTRACED.get_ptr_mut(0)?;
    // SAFETY: this CPU's value; a program is not preempted on its CPU.
    let u = unsafe { &mut *u };
    let i = u.skb.iter().position(|&s| s == skb)?;
    Some((u, i))
}

/// Sockets whose datagram the skb hops decided not to trace, per CPU, until the send hop
/// takes the decision: the tracepoint runs after the skb hops, at the end of the same system
/// call, on the same CPU (a sender migrated in between does not find it, and its send hop
/// decides again). A traced datagram's socket is kept in [`SAMPLE_SOCKS`], across CPUs.
/// Written in turn at `next` (userspace clears it as `[u64; 5]`).
#[repr(C)]
pub struct SocksUntraced {
    next: u64,
    sk: [u64; SOCK_SLOTS],
}

#[map(name = "SOCK_UNTRACED")]
static SOCK_UNTRACED: PerCpuArray<SocksUntraced> = PerCpuArray::with_max_entries(1, 0);

/// This CPU's [`SOCK_UNTRACED`].
#[inline(always)]
fn socks_untraced() -> Option<&'static mut SocksUntraced> {
    // SAFETY: this CPU's value; a program is not preempted on its CPU.
    SOCK_UNTRACED.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// Notes on this CPU that the skb hops decided not to trace `sk`'s datagram.
#[inline(always)]
fn note_sock_untraced(sk: u64) {
    if let Some(s) = socks_untraced() {
        let i = (s.next as usize) & (SOCK_SLOTS - 1);
        s.sk[i] = sk;
        s.next = s.next.wrapping_add(1);
    }
}

/// Takes `sk`'s untraced decision from this CPU's [`SOCK_UNTRACED`]; says whether there
/// was one.
#[inline(always)]
fn take_sock_untraced(sk: u64) -> bool {
    let Some(s) = socks_untraced() else {
        return false;
    };
    match s.sk.iter().position(|&x| x == sk) {
        Some(i) => {
            s.sk[i] = 0;
            true
        }
        None => false,
    }
}

/// Whether this CPU's [`SOCK_UNTRACED`] holds an untraced decision for `sk`.
#[inline(always)]
fn sock_untraced(sk: u64) -> bool {
    socks_untraced().is_some_and(|s| s.sk.contains(&sk))
}

/// Sending socket → the decision for the datagram it is sending.
#[map(name = "SAMPLE_SOCKS")]
static SAMPLE_SOCKS: LruHashMap<u64, SockDecision> =
    LruHashMap::with_max_entries(SAMPLE_SOCKS_MAX, 0);

/// NAT rewrites already reported: an unsampled datagram's rewrite is reported when new.
#[map(name = "SAMPLE_NAT")]
static SAMPLE_NAT: LruHashMap<NatSeenKey, NatSeen> =
    LruHashMap::with_max_entries(SAMPLE_NAT_MAX, 0);

/// (socket, reading thread) → when last reported.
#[map(name = "SAMPLE_READERS")]
static SAMPLE_READERS: LruHashMap<ReaderKey, u64> =
    LruHashMap::with_max_entries(SAMPLE_READERS_MAX, 0);

/// The sampling configuration when datagrams are decided on (sampling on, or a filter
/// set); `None`: every datagram is traced.
#[inline(always)]
fn config() -> Option<SampleConfig> {
    let c = *SAMPLING.get(0)?;
    (!c.is_all() || filter().is_some()).then_some(c)
}

/// Whether 1 in N is sampled (not just filtered).
#[inline(always)]
fn sampling_on() -> bool {
    SAMPLING.get(0).is_some_and(|c| !c.is_all())
}

/// The filter, when headers it leaves out are a left-out datagram without looking the skb
/// up: no datagram decided on has left its match since the load.
#[inline(always)]
pub fn headers_filter() -> Option<&'static TraceFilter> {
    let f = filter()?;
    FILTER_ESCAPES.get(0).is_some_and(|&e| e == 0).then_some(f)
}

/// After a NAT hop's decision on a datagram (traced or not): if the rewrite took it out of
/// the filter's match, [`headers_filter`] gives none from then on.
#[inline(always)]
pub fn note_rewrite(after_src: &Addr, after_dst: &Addr) {
    let Some(f) = filter() else {
        return;
    };
    if f.matches(after_src, after_dst) {
        return;
    }
    if let Some(escapes) = FILTER_ESCAPES.get_ptr_mut(0) {
        // SAFETY: the map's one value; a plain store of 1 is idempotent across CPUs.
        unsafe { *escapes = 1 };
    }
}

/// Whether a datagram no hop traced yet is left out by the filter, from its headers alone
/// (before anything else is read of it). Not for NAT hops: they look at both sides.
#[inline(always)]
pub fn left_out(ev: &SkbEvent) -> bool {
    filter().is_some_and(|f| {
        if ev.ip_frag & IP_OFFSET != 0 {
            !f.matches_hosts(&ev.src, &ev.dst)
        } else {
            !f.matches(&ev.src, &ev.dst)
        }
    })
}

/// Whether the send hop can leave socket `sk`'s datagram out from its ports alone (a port
/// filter that neither end matches, `call_dst` the destination the call named), before
/// reading the rest of the socket. `after_skbs`: as for [`decide_send`]; a datagram an skb
/// hop traced (matching after a rewrite) is not left out.
#[inline(always)]
pub fn send_left_out<S: Fields>(sk: S, call_dst: &Addr, after_skbs: bool) -> bool {
    let Some(f) = filter() else {
        return false;
    };
    if f.flags & FILTER_HOST != 0 {
        // The host filter needs the addresses: the full decision reads them.
        return false;
    }
    // Each step returns at once: plain control flow for the verifier of every hook the send
    // hop may use (an fentry program's registers are checked strictly).
    match sk.field::<u16>(offset!(sk_num)) {
        Some(sport) if sport != f.port => {}
        _ => return false,
    }
    let dport = if call_dst.family != 0 {
        call_dst.port
    } else {
        match sk.field::<u16>(offset!(sk_dport)) {
            Some(p) => u16::from_be(p),
            None => return false,
        }
    };
    if dport == f.port {
        return false;
    }
    // Left out: an skb hop's decision not to trace it goes with it.
    if after_skbs {
        take_sock_untraced(sk.addr());
    }
    // An skb hop that traced the datagram remembered its skb too: while nothing was
    // remembered lately, no such decision waits for this socket.
    // SAFETY: the value is read at once.
    !(after_skbs
        && !none_remembered_within(TRUSTED_JIFFIES)
        && unsafe { SAMPLE_SOCKS.get(sk.addr()) }.is_some_and(|d| d.side == SIDE_SKB))
}

/// The trace filter, when one is set (read in place: the NAT hop's stack has no room for a
/// copy).
#[inline(always)]
fn filter() -> Option<&'static TraceFilter> {
    TRACE_FILTER.get(0).filter(|f| !f.is_none())
}

/// What is known about an skb's datagram.
pub enum Decision {
    /// Sampling is off and no filter set: every datagram is traced.
    All,
    Known(bool),
    /// No hop has decided yet, or none traced it: a datagram the filter leaves out is
    /// remembered nowhere, and each hop sees again that it does not match. (No payload:
    /// an enum whose payload is undefined in some variants gets spilled whole, and the
    /// verifier refuses the spill of an undefined register.)
    Unknown,
}

#[inline(always)]
pub fn lookup(skb: u64) -> Decision {
    lookup_stamped(skb).0
}

/// The decision, and the map value it came from (0: none) for [`forget_if`].
#[inline(always)]
pub fn lookup_stamped(skb: u64) -> (Decision, u64) {
    if config().is_none() {
        return (Decision::All, 0);
    }
    if none_remembered_within(TRUSTED_JIFFIES) {
        return (Decision::Unknown, 0);
    }
    if let Some((u, i)) = untraced_of(skb) {
        let value = u.value[i];
        if fresh(value) {
            return (Decision::Known(false), value);
        }
    }
    // SAFETY: the value is copied out at once.
    match unsafe { SAMPLE_SKBS.get(skb) }.copied() {
        Some(v) if fresh(v) => (Decision::Known(v & 1 != 0), v),
        _ => (Decision::Unknown, 0),
    }
}

/// Whether a remembered decision may be this datagram's: one older than any datagram's way
/// through a kernel belongs to an skb freed where no hook saw it (some frees have no
/// tracepoint).
#[inline(always)]
fn fresh(value: u64) -> bool {
    now().saturating_sub(value >> 1) < SKB_DECISION_NS
}

#[inline(always)]
fn now() -> u64 {
    // SAFETY: plain helper call.
    unsafe { bpf_ktime_get_ns() }
}

/// Counts one datagram of `key` and says whether it is traced. Two CPUs sending on one flow
/// at once may count one datagram twice: the rate stays about 1 in M.
#[inline(always)]
fn next_of_flow(cfg: &SampleConfig, key: &FlowKey) -> bool {
    if cfg.is_all() {
        // Filtered only: nothing to count.
        return true;
    }
    let n = match SAMPLE_COUNT.get_ptr_mut(key) {
        Some(p) => {
            // SAFETY: a map value; the race above is the only one and harmless.
            unsafe {
                let n = *p;
                *p = n + 1;
                n
            }
        }
        None => {
            let _ = SAMPLE_COUNT.insert(key, 1u64, 0);
            0
        }
    };
    cfg.traces(n)
}

/// Remembers the decision on `skb`'s datagram for its later hops: per CPU when it is not
/// traced ([`SKB_UNTRACED`]), else in [`SAMPLE_SKBS`].
#[inline(always)]
pub fn remember(skb: u64, traced: bool) {
    let value = now() << 1 | u64::from(traced);
    if traced {
        // An earlier datagram's decision at the same address is not this one's.
        if let Some((u, i)) = untraced_of(skb) {
            u.skb[i] = 0;
        }
        let _ = SAMPLE_SKBS.insert(skb, value, 0);
    } else if let Some(u) = SKB_UNTRACED.get_ptr_mut(0) {
        // SAFETY: this CPU's value; a program is not preempted on its CPU.
        let u = unsafe { &mut *u };
        let i = (u.next as usize) & (UNTRACED_SLOTS - 1);
        u.skb[i] = skb;
        u.value[i] = value;
        u.next = u.next.wrapping_add(1);
    }
    if let Some(last) = LAST_REMEMBERED.get_ptr_mut(0) {
        let now = jiffies();
        // SAFETY: the map's one value: a plain load, and a store only when it is stale (so
        // CPUs remembering at once do not take the line from each other at every datagram).
        unsafe {
            if now.wrapping_sub(*last) > STAMP_SLACK_JIFFIES {
                *last = now;
            }
        }
    }
}

/// Whether datagrams are decided on (sampling on, or a filter set) and none was remembered
/// recently enough to be trusted: a lookup would find nothing. Conservative at any HZ up to
/// 1000 ([`TRUSTED_JIFFIES`]).
#[inline(always)]
pub fn nothing_to_look_up() -> bool {
    config().is_some() && none_remembered_within(TRUSTED_JIFFIES)
}

/// Whether no decision was remembered in the last `ago` jiffies (and the stamp's slack).
#[inline(always)]
fn none_remembered_within(ago: u64) -> bool {
    // Before the first decision the stamp is 0 (jiffies start far from 0).
    LAST_REMEMBERED
        .get(0)
        .is_some_and(|&last| last == 0 || jiffies().wrapping_sub(last) > ago + STAMP_SLACK_JIFFIES)
}

#[inline(always)]
fn jiffies() -> u64 {
    // SAFETY: plain helper call.
    unsafe { bpf_jiffies64() }
}

/// The datagram reached its verdict, or its skb is freed: the address may carry another
/// datagram next.
#[inline(always)]
pub fn forget(skb: u64) {
    // Not traced, decided on this CPU: nothing in the hash.
    if forget_untraced(skb, 0) {
        return;
    }
    let _ = SAMPLE_SKBS.remove(skb);
}

/// Clears `skb`'s slot in [`SKB_UNTRACED`] when it holds its decision (with the value
/// `stamp`, unless 0); says whether it did.
#[inline(always)]
fn forget_untraced(skb: u64, stamp: u64) -> bool {
    let Some((u, i)) = untraced_of(skb) else {
        return false;
    };
    if stamp != 0 && u.value[i] != stamp {
        return false;
    }
    u.skb[i] = 0;
    true
}

/// [`forget`], unless the address already carries another datagram's decision (its skb
/// freed and reused since `stamp` was read).
#[inline(always)]
pub fn forget_if(skb: u64, stamp: u64) {
    if stamp == 0 || forget_untraced(skb, stamp) {
        return;
    }
    // SAFETY: the value is copied out at once.
    if unsafe { SAMPLE_SKBS.get(skb) }.copied() == Some(stamp) {
        let _ = SAMPLE_SKBS.remove(skb);
    }
}

/// Whether a transmit on `dev` hands the datagram out of this kernel (its verdict): a
/// device without an rtnetlink kind that is not loopback (a NIC), or a tun/tap device.
#[inline(always)]
pub fn leaves_host(dev: u64) -> bool {
    if dev == 0 {
        return false;
    }
    match try_read_kernel::<u64>(dev, offset!(dev_link_ops)) {
        Some(0) => try_read_kernel::<u32>(dev, offset!(dev_ifindex)) != Some(LOOPBACK_IFINDEX),
        Some(ops) => {
            try_read_kernel::<u64>(ops, offset!(link_ops_kind))
                .filter(|&k| k != 0)
                .and_then(|k| try_read_kernel::<[u8; 4]>(k, 0))
                == Some(*b"tun\0")
        }
        None => false,
    }
}

/// How stale [`LAST_REMEMBERED`] may be.
const STAMP_SLACK_JIFFIES: u64 = 16;
/// At least [`SKB_DECISION_NS`] at any HZ up to 1000.
const TRUSTED_JIFFIES: u64 = 1024;
/// Readers are reported while datagrams were traced in the last 16 s (at HZ 1000; longer at
/// a lower HZ): a reader taking a traced datagram later than that is not named.
const READERS_JIFFIES: u64 = 16 * 1024;
/// Every namespace's loopback device has this index.
const LOOPBACK_IFINDEX: u32 = 1;
/// A decision older than this is not trusted.
const SKB_DECISION_NS: u64 = 1_000_000_000;

/// Decides for a datagram no hop traced yet (`ev` holds its headers; `before`, at a
/// NAT hop, the addresses before the rewrite). One the filter leaves out (on both sides of
/// a rewrite) is not traced, and nothing is remembered of it. A fragment is always traced:
/// its pieces travel on skbs of their own and must agree. One leaving local socket `sender`
/// follows that socket's decision (its send hop may have run first) or sets it for the
/// send hop to follow. Anything else counts on its flow as seen here. `None`: left out by
/// the filter (nothing remembered); else whether traced (remembered for the skb).
#[inline(always)]
pub fn decide_skb(
    skb: u64,
    ev: &SkbEvent,
    before: Option<(&Addr, &Addr)>,
    sender: u64,
) -> Option<bool> {
    // Changed since the lookup to trace everything: traced.
    let Some(cfg) = config() else {
        return Some(true);
    };
    let cfg = &cfg;
    if let Some(f) = filter() {
        let admits = |s: &Addr, d: &Addr| {
            if ev.ip_frag & IP_OFFSET != 0 {
                f.matches_hosts(s, d)
            } else {
                f.matches(s, d)
            }
        };
        if !admits(&ev.src, &ev.dst) && !before.is_some_and(|(s, d)| admits(s, d)) {
            return None;
        }
    }
    let (src, dst) = before.unwrap_or((&ev.src, &ev.dst));
    let key = FlowKey {
        netns: ev.netns,
        _pad: 0,
        src: *src,
        dst: *dst,
    };
    let traced = if ev.ip_frag & (IP_MF | IP_OFFSET) != 0 {
        if sender != 0 {
            set_sock(sender, true, SIDE_SKB);
        }
        true
    } else if sender != 0 {
        if sock_untraced(sender) {
            false
        } else {
            // SAFETY: the value is copied out at once.
            match unsafe { SAMPLE_SOCKS.get(sender) } {
                Some(d) => d.traced != 0,
                None => {
                    let traced = next_of_flow(cfg, &key);
                    if traced {
                        set_sock(sender, true, SIDE_SKB);
                    } else {
                        note_sock_untraced(sender);
                    }
                    traced
                }
            }
        }
    } else {
        next_of_flow(cfg, &key)
    };
    remember(skb, traced);
    Some(traced)
}

#[inline(always)]
fn set_sock(sk: u64, traced: bool, side: u32) {
    let d = SockDecision {
        traced: u32::from(traced),
        side,
    };
    let _ = SAMPLE_SOCKS.insert(sk, d, 0);
}

/// The send hop's decision for socket `sk` sending on flow `key`. `after_skbs`: this hook
/// runs after the datagram's skb hops (the tracepoint), which may have decided already
/// (and traced a datagram the filter matched only after a rewrite).
#[inline(always)]
pub fn decide_send(sk: u64, key: &FlowKey, after_skbs: bool) -> bool {
    let Some(cfg) = config() else {
        return true;
    };
    let filter = filter();
    if after_skbs {
        if take_sock_untraced(sk) {
            return false;
        }
        // SAFETY: the value is copied out at once.
        if let Some(d) = unsafe { SAMPLE_SOCKS.get(sk) }.copied() {
            if d.side == SIDE_SKB {
                let _ = SAMPLE_SOCKS.remove(sk);
                return d.traced != 0;
            }
        }
    }
    if filter.is_some_and(|f| !f.matches(&key.src, &key.dst)) {
        return false;
    }
    let traced = next_of_flow(&cfg, key);
    set_sock(sk, traced, SIDE_SEND);
    traced
}

/// Records a NAT rewrite at `nf_hook` in `netns`; true when it was not the last one seen for
/// the same tuple before (a new mapping, or a changed one). Always true with sampling off.
#[inline(always)]
pub fn nat_is_new(nf_hook: u32, netns: u32, before: (&Addr, &Addr), after: (&Addr, &Addr)) -> bool {
    if !sampling_on() {
        return true;
    }
    let key = NatSeenKey {
        nf_hook,
        netns,
        src: *before.0,
        dst: *before.1,
    };
    let seen = NatSeen {
        src: *after.0,
        dst: *after.1,
    };
    // SAFETY: the value is compared at once.
    if unsafe { SAMPLE_NAT.get(key) }.is_some_and(|s| *s == seen) {
        return false;
    }
    let _ = SAMPLE_NAT.insert(key, seen, 0);
    true
}

/// Whether readers may be reported at all: always when every datagram is traced; with
/// sampling or a filter, while datagrams were decided on lately ([`READERS_JIFFIES`]):
/// otherwise no reader reads anything anyone asked about. Checked before anything is read.
#[inline(always)]
pub fn readers_wanted() -> bool {
    config().is_none() || !none_remembered_within(READERS_JIFFIES)
}

/// Whether to report the current task reading socket `sk`, once [`readers_wanted`]: always
/// when every datagram is traced, else (sampling on, or a filter set) once a second per
/// reading thread (who reads a socket rarely changes; and a read says nothing of the
/// datagram to filter on).
#[inline(always)]
pub fn reader_due(sk: u64) -> bool {
    if config().is_none() {
        return true;
    }
    let key = ReaderKey {
        sk,
        pid_tgid: bpf_get_current_pid_tgid(),
    };
    let now = now();
    // SAFETY: the value is read at once.
    if unsafe { SAMPLE_READERS.get(key) }
        .is_some_and(|at| now.saturating_sub(*at) < READER_EVERY_NS)
    {
        return false;
    }
    let _ = SAMPLE_READERS.insert(key, now, 0);
    true
}

/// Raw tracepoint consume_skb(struct sk_buff *skb, ...): an skb freed without a drop; its
/// decision must not pass to the next datagram given the same address.
#[raw_tracepoint(tracepoint = "consume_skb")]
pub fn sample_consume_skb(ctx: RawTracePointContext) -> u32 {
    if empty_bodies() {
        return 0;
    }
    if !nothing_to_look_up() {
        forget(ctx.arg(0));
    }
    0
}
