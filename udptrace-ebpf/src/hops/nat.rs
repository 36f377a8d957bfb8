//! The NAT hop: a BPF netfilter link just after NAT at each NAT hook reports a rewrite,
//! with the datagram as it was before from its conntrack entry (see [`try_after`]).
//!
//! Loaded by userspace as BPF_PROG_TYPE_NETFILTER (aya has no API for it; the section is
//! `classifier` so aya's ELF parser accepts the program). It always accepts the packet.

use aya_ebpf::{
    macros::{classifier, kprobe, kretprobe, map},
    maps::PerCpuArray,
    programs::{ProbeContext, RetProbeContext, TcContext},
    EbpfContext as _,
};
use udptrace_common::{
    Addr, Hook, NatEvent, SkbEvent, AF_INET, KIND_NAT, NF_INET_LOCAL_OUT, NF_INET_NUMHOOKS,
    NF_INET_POST_ROUTING, NF_INET_PRE_ROUTING, OFFSET_MISSING, SKB_UNSAMPLED, STAT_NAT_BASE,
    STAT_RINGBUF_FULL,
};

use crate::{
    maps::{count, empty_bodies, finish, offset, ring_flags, Scratch, EVENTS, NAT_BEFORE},
    read::kernel::{read_kernel, try_read_kernel, ReadError},
    read::skb::{fill, read_udp},
    sampling::{self, Decision},
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

/// `skb->_nfct` keeps the conntrack info in its low bits (NFCT_PTRMASK, NFCT_INFOMASK).
const NFCT_PTRMASK: u64 = !7;
const NFCT_INFOMASK: u64 = 7;
/// `enum ip_conntrack_info`: from here on, the packet goes the reply direction.
const IP_CT_IS_REPLY: u64 = 3;
/// `enum ip_conntrack_status` (UAPI): source or destination NAT applies to the connection.
const IPS_NAT_MASK: u64 = (1 << 4) | (1 << 5);

/// The conntrack tuple of the packet's direction (as it entered this namespace's conntrack,
/// before any NAT of it here), when its connection is NATed; `nfct` is the skb's `_nfct`.
/// Most datagrams have no entry, or one without NAT: at most one read, and nothing else is
/// read of them.
#[inline(always)]
fn nat_tuple(nfct: u64) -> Option<u64> {
    let ct = nfct & NFCT_PTRMASK;
    if ct == 0 {
        return None;
    }
    let status = try_read_kernel::<u64>(ct, offset!(ct_status))?;
    if status & IPS_NAT_MASK == 0 {
        return None;
    }
    let dir = u64::from(nfct & NFCT_INFOMASK >= IP_CT_IS_REPLY);
    Some(
        ct + offset!(ct_tuplehash) as u64
            + dir * offset!(ct_tuplehash_size) as u64
            + offset!(ct_hash_tuple) as u64,
    )
}

/// Puts the tuple's address at `ip`/`port` (offsets in the tuple) into `side`; says whether
/// it differed (then NAT rewrote that side at this hook).
#[inline(always)]
fn tuple_side(tuple: u64, ip: usize, port: usize, side: &mut Addr) -> Result<bool, ReadError> {
    let mut addr: [u8; 16] = read_kernel(tuple, ip)?;
    if side.family == AF_INET {
        // A tuple's IPv4 address fills the first 4 bytes; like the packet's, the rest is 0.
        addr[4..].fill(0);
    }
    let port = u16::from_be(read_kernel::<u16>(tuple, port)?);
    let changed = side.ip != addr || side.port != port;
    side.ip = addr;
    side.port = port;
    Ok(changed)
}

/// int (*)(struct bpf_nf_ctx *ctx), linked just after NAT at each NAT hook.
#[classifier]
// Inlined into the entry point the macro wraps it in: as a function of its own, its constant
// result may be optimised away, and the entry would return whatever r0 held (the verifier
// refuses that: "cannot return stack pointer to the caller").
#[inline(always)]
pub fn nat_after(ctx: TcContext) -> i32 {
    if empty_bodies() {
        return NF_ACCEPT;
    }
    let (state, skb) = nf_ctx(&ctx);
    if skb == 0 || offset!(skb_nfct) == OFFSET_MISSING as usize {
        return NF_ACCEPT;
    }
    // SAFETY: the context's skb field is a typed (BTF) pointer: the verifier checks this
    // load of `_nfct` against the kernel's struct sk_buff and makes it a plain load, no
    // helper call, for every packet (most have no conntrack entry). The offset is a
    // constant of the frozen read-only data, known to the verifier.
    let at = offset!(skb_nfct);
    // SAFETY: as said above: a load through the typed pointer, checked by the verifier.
    let nfct = unsafe { core::ptr::read_volatile((skb as *const u8).add(at) as *const u64) };
    finish!(try_after(state, skb, nfct), "nat_after");
    NF_ACCEPT
}

/// What the datagram was before NAT at this hook comes from its conntrack tuple, not from a
/// program before NAT: NAT rewrites the destination at prerouting and output and the source
/// at postrouting and input (a reply's undoing included), each side once per namespace, so
/// the side this hook rewrites is, before it, the tuple's. One program run per hook instead
/// of two; a rewrite without conntrack (a stateless `ip daddr set`) is not a NAT hop.
#[inline(always)]
fn try_after(state: u64, skb: u64, nfct: u64) -> Result<(), ReadError> {
    let Some(tuple) = nat_tuple(nfct) else {
        return Ok(());
    };
    let hook = hook_of(state)?;
    let Some(before) = NAT_BEFORE.get_ptr_mut(hook) else {
        return Ok(());
    };
    // SAFETY: this CPU's slot for this hook; netfilter runs a hook's functions on one CPU
    // in order, and nothing else at this hook runs between the fill and the report.
    let before = unsafe { &mut *before };
    if !read_udp(skb, before)? {
        return Ok(());
    }
    let rewritten = match hook {
        NF_INET_PRE_ROUTING | NF_INET_LOCAL_OUT => tuple_side(
            tuple,
            offset!(tuple_dst_u3),
            offset!(tuple_dst_port),
            &mut before.dst,
        )?,
        _ => tuple_side(
            tuple,
            offset!(tuple_src_u3),
            offset!(tuple_src_port),
            &mut before.src,
        )?,
    };
    if !rewritten {
        return Ok(());
    }
    emit_nat(Hook::NetfilterLink as u16, skb, hook, before)
}

/// Reports a NAT rewrite of `skb` at netfilter hook `hook` when its addresses differ from
/// `before`'s (what they were just before NAT). A datagram not sampled has its rewrite
/// reported when it is a new one (flagged `SKB_UNSAMPLED`), and is traced from there on.
/// Addresses are compared where they lie (maps, the scratch event): this hop's stack has no
/// room for copies.
#[inline(always)]
fn emit_nat(source: u16, skb: u64, hook: u32, before: &SkbEvent) -> Result<(), ReadError> {
    let decision = sampling::lookup(skb);
    let Some(mut scratch) = Scratch::take() else {
        return Ok(());
    };
    let ev = scratch.nat();
    let mut changed = match fill(&mut ev.skb, KIND_NAT, source, skb, 0, 0) {
        Ok(true) => ev.skb.src != before.src || ev.skb.dst != before.dst,
        _ => false,
    };
    if !changed {
        return Ok(());
    }
    if hook < NF_INET_NUMHOOKS {
        count(STAT_NAT_BASE + 2 * hook + u32::from(ev.skb.dst != before.dst));
    }
    ev.before_src = before.src;
    ev.before_dst = before.dst;
    let traced = match decision {
        Decision::All => Some(true),
        Decision::Known(traced) => Some(traced),
        Decision::Unknown(cfg) => sampling::decide_skb(
            &cfg,
            skb,
            &ev.skb,
            Some((&ev.before_src, &ev.before_dst)),
            ev.skb.sk,
        ),
    };
    // Left out by the filter on both sides of the rewrite: nothing to say.
    let Some(traced) = traced else {
        return Ok(());
    };
    sampling::note_rewrite(&ev.skb.src, &ev.skb.dst);
    // Remembered either way: a later unsampled datagram's same rewrite is not news.
    let new = sampling::nat_is_new(
        hook,
        ev.skb.netns,
        (&ev.before_src, &ev.before_dst),
        (&ev.skb.src, &ev.skb.dst),
    );
    if !traced {
        changed = new;
        if new {
            ev.skb.flags |= SKB_UNSAMPLED;
            sampling::remember(skb, true);
        }
    }
    if changed {
        ev.nf_hook = hook;
        ev._pad = 0;
        conntrack(skb, ev);
        if EVENTS.output::<NatEvent>(&*ev, ring_flags()).is_err() {
            // Counted, not logged: a log call here takes nat_after's stack past the
            // verifier's 512 bytes (the skb event's other emitters log it).
            count(STAT_RINGBUF_FULL);
        }
    }
    Ok(())
}

/// Reads one conntrack tuple at `tuple` into `src`/`dst` (family 0 when unreadable).
#[inline(always)]
fn read_tuple(tuple: u64, src: &mut Addr, dst: &mut Addr) {
    *src = Addr::default();
    *dst = Addr::default();
    let Some(family) = try_read_kernel::<u16>(tuple, offset!(tuple_l3num)) else {
        return;
    };
    let (Some(sip), Some(sport), Some(dip), Some(dport)) = (
        try_read_kernel::<[u8; 16]>(tuple, offset!(tuple_src_u3)),
        try_read_kernel::<u16>(tuple, offset!(tuple_src_port)),
        try_read_kernel::<[u8; 16]>(tuple, offset!(tuple_dst_u3)),
        try_read_kernel::<u16>(tuple, offset!(tuple_dst_port)),
    ) else {
        return;
    };
    *src = Addr {
        family,
        port: u16::from_be(sport),
        _pad: 0,
        ip: sip,
    };
    *dst = Addr {
        family,
        port: u16::from_be(dport),
        _pad: 0,
        ip: dip,
    };
}

/// Fills the conntrack entry's original and reply tuples of `skb`, when it has one.
#[inline(always)]
fn conntrack(skb: u64, ev: &mut NatEvent) {
    let ct = try_read_kernel::<u64>(skb, offset!(skb_nfct)).unwrap_or(0) & NFCT_PTRMASK;
    let hashes = ct + offset!(ct_tuplehash) as u64 + offset!(ct_hash_tuple) as u64;
    if ct == 0 {
        ev.ct_orig_src = Addr::default();
        ev.ct_orig_dst = Addr::default();
        ev.ct_reply_src = Addr::default();
        ev.ct_reply_dst = Addr::default();
        return;
    }
    read_tuple(hashes, &mut ev.ct_orig_src, &mut ev.ct_orig_dst);
    read_tuple(
        hashes + offset!(ct_tuplehash_size) as u64,
        &mut ev.ct_reply_src,
        &mut ev.ct_reply_dst,
    );
}

// --- fallback for kernels without netfilter programs (< 6.4) ------------------------------

/// The datagram as it entered `nf_nat_manip_pkt` on this CPU (the return probe compares);
/// `reason` holds the manip type.
#[map(name = "NAT_MANIP")]
static NAT_MANIP: PerCpuArray<SkbEvent> = PerCpuArray::with_max_entries(1, 0);

/// `enum nf_nat_manip_type`: NF_NAT_MANIP_SRC = 0, NF_NAT_MANIP_DST = 1.
const NF_NAT_MANIP_DST: u32 = 1;

/// unsigned int nf_nat_manip_pkt(struct sk_buff *skb, struct nf_conn *ct,
///                               enum nf_nat_manip_type mtype, enum ip_conntrack_dir dir)
#[kprobe]
pub fn nat_kprobe_manip(ctx: ProbeContext) -> u32 {
    let (Some(skb), Some(mtype)) = (ctx.arg::<u64>(0), ctx.arg::<u32>(2)) else {
        return 0;
    };
    if let Some(slot) = NAT_MANIP.get_ptr_mut(0) {
        // SAFETY: this CPU's slot; the return probe of this same call reads it.
        let slot = unsafe { &mut *slot };
        slot.skb = match read_udp(skb, slot) {
            Ok(true) => skb,
            _ => 0,
        };
        slot.reason = mtype;
    }
    0
}

/// Return of nf_nat_manip_pkt: the same skb, now rewritten.
#[kretprobe]
pub fn nat_kretprobe_manip(_ctx: RetProbeContext) -> u32 {
    let Some(slot) = NAT_MANIP.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: this CPU's slot, written by the entry probe of this call.
    let before = unsafe { &mut *slot };
    let skb = before.skb;
    if skb == 0 {
        return 0;
    }
    before.skb = 0;
    // Which hook ran it is not an argument: destination NAT of a local socket's datagram
    // happens at output, of a received one at prerouting; source NAT at postrouting.
    let sk: u64 = read_kernel(skb, offset!(skb_sk)).unwrap_or(0);
    let hook = match (before.reason == NF_NAT_MANIP_DST, sk != 0) {
        (true, true) => NF_INET_LOCAL_OUT,
        (true, false) => NF_INET_PRE_ROUTING,
        _ => NF_INET_POST_ROUTING,
    };
    finish!(
        emit_nat(Hook::KprobeNfNat as u16, skb, hook, before),
        "nat_kretprobe_manip"
    );
    0
}
