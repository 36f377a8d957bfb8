//! The NAT hop: a BPF netfilter link where each way through a namespace ends (POSTROUTING,
//! and the end of LOCAL_IN) reports what NAT in that namespace rewrote, against the packet's
//! conntrack entry (see [`try_after`]).
//!
//! Loaded by userspace as BPF_PROG_TYPE_NETFILTER (aya has no API for it; the section is
//! `classifier` so aya's ELF parser accepts the program). It always accepts the packet.

use aya_ebpf::{
    helpers::bpf_probe_read_kernel_buf,
    macros::{classifier, kprobe, kretprobe, map},
    maps::PerCpuArray,
    programs::{ProbeContext, RetProbeContext, TcContext},
    EbpfContext as _,
};
use udptrace_common::{
    Addr, Hook, NatEvent, SkbEvent, AF_INET, KIND_NAT, MODE_DELIVER_AT_NAT, NF_INET_LOCAL_IN,
    NF_INET_LOCAL_OUT, NF_INET_NUMHOOKS, NF_INET_POST_ROUTING, NF_INET_PRE_ROUTING,
    SKB_DNAT_AT_OUTPUT, SKB_DNAT_BEFORE, SKB_UNSAMPLED, STAT_NAT_BASE, STAT_READ_ERROR,
    STAT_RINGBUF_FULL, TUNNEL_NONE,
};

use crate::{
    maps::{count, empty_bodies, finish, mode, offset, ring_flags, Scratch, EVENTS, NAT_BEFORE},
    read::kernel::{read_kernel, try_read_kernel, Fields, Probed, ReadError, Typed},
    read::skb::{fill, read_udp, read_udp_of},
    sampling::{self, Decision},
};

/// Netfilter verdict: let the packet go on.
pub const NF_ACCEPT: i32 = 1;

/// `struct bpf_nf_ctx { const struct nf_hook_state *state; struct sk_buff *skb; }`: the
/// netfilter program context (UAPI-stable layout). Both are pointers the verifier types
/// from BTF: their fields are plain loads ([`Typed`]).
#[inline(always)]
pub fn nf_ctx(ctx: &TcContext) -> (Typed, Typed) {
    let p = ctx.as_ptr() as *const u64;
    // SAFETY: the context is a bpf_nf_ctx; the verifier allows 8-byte reads of both fields.
    let (state, skb) = unsafe { (core::ptr::read(p), core::ptr::read(p.add(1))) };
    (Typed(state as *const u8), Typed(skb as *const u8))
}

/// `skb->_nfct` keeps the conntrack info in its low bits (NFCT_PTRMASK, NFCT_INFOMASK).
const NFCT_PTRMASK: u64 = !7;
const NFCT_INFOMASK: u64 = 7;
/// `enum ip_conntrack_info`: from here on, the packet goes the reply direction.
const IP_CT_IS_REPLY: u64 = 3;
/// `enum ip_conntrack_status` (UAPI): source or destination NAT applies to the connection.
const IPS_NAT_MASK: u64 = (1 << 4) | (1 << 5);
/// Every namespace's loopback device has this index.
const LOOPBACK_IFINDEX: u32 = 1;

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

/// Reads the tuple's address at `ip`/`port` (offsets in the tuple) into `out`, in place
/// (map memory: the NAT hop's stack has no room for copies), as the packet's family has it.
#[inline(always)]
fn tuple_addr(
    tuple: u64,
    ip: usize,
    port: usize,
    family: u16,
    out: &mut Addr,
) -> Result<(), ReadError> {
    // SAFETY: the helper checks the kernel address and fills `out.ip` or fails.
    unsafe { bpf_probe_read_kernel_buf((tuple + ip as u64) as *const u8, &mut out.ip) }.map_err(
        |_| {
            count(STAT_READ_ERROR);
            ReadError
        },
    )?;
    if family == AF_INET {
        // A tuple's IPv4 address fills the first 4 bytes; like the packet's, the rest is 0.
        out.ip[4..].fill(0);
    }
    out.port = u16::from_be(read_kernel::<u16>(tuple, port)?);
    out.family = family;
    out._pad = 0;
    Ok(())
}

/// Reads the tuple's source and destination into `ev`'s `outer_src`/`outer_dst` (a
/// tunnel's, unused where a datagram has none), as `ev`'s family has them: in map memory,
/// where they compare with the packet's without a copy on the stack.
#[inline(always)]
fn tuple_as_outer(tuple: u64, ev: &mut SkbEvent) -> Result<(), ReadError> {
    let family = ev.dst.family;
    tuple_addr(
        tuple,
        offset!(tuple_dst_u3),
        offset!(tuple_dst_port),
        family,
        &mut ev.outer_dst,
    )?;
    tuple_addr(
        tuple,
        offset!(tuple_src_u3),
        offset!(tuple_src_port),
        family,
        &mut ev.outer_src,
    )
}

/// int (*)(struct bpf_nf_ctx *ctx), linked just after NAT at POSTROUTING and LOCAL_IN (at
/// the end of LOCAL_IN when it does the deliver hop's part there too: `MODE_DELIVER_AT_NAT`).
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
    finish!(after(state, skb), "nat_after");
    NF_ACCEPT
}

/// The NAT hop's work at its link: a packet without a conntrack entry costs two plain
/// loads (and at LOCAL_IN, for the deliver hop, a store).
#[inline(always)]
fn after(state: Typed, skb: Typed) -> Result<(), ReadError> {
    // Through the typed pointers: plain loads the verifier checks, for every packet.
    let hook = u32::from(state.read::<u8>(offset!(nf_state_hook))?);
    if hook == NF_INET_LOCAL_IN && mode(MODE_DELIVER_AT_NAT) {
        super::deliver::note_local_in(skb.addr());
    }
    // Most packets have no conntrack entry.
    let Some(nfct) = skb.field::<u64>(offset!(skb_nfct)) else {
        return Ok(());
    };
    let Some(tuple) = nat_tuple(nfct) else {
        return Ok(());
    };
    let snat_hook = match hook {
        NF_INET_POST_ROUTING => hook,
        NF_INET_LOCAL_IN => {
            // Sent by this namespace to itself: POSTROUTING reported its NAT, which LOCAL_IN
            // repeats unchanged.
            let dev = skb.pointer(offset!(skb_dev));
            if dev.and_then(|d| d.field::<u32>(offset!(dev_ifindex))) == Some(LOOPBACK_IFINDEX) {
                return Ok(());
            }
            hook
        }
        _ => return Ok(()),
    };
    report(skb, tuple, dnat_hook(skb, hook), snat_hook)
}

/// Where destination NAT happened to a packet NAT in this namespace saw by `hook`: at
/// output for a local socket's datagram, else at prerouting.
#[inline(always)]
fn dnat_hook<S: Fields>(skb: S, hook: u32) -> u32 {
    if hook != NF_INET_LOCAL_IN && skb.field::<u64>(offset!(skb_sk)).is_some_and(|sk| sk != 0) {
        NF_INET_LOCAL_OUT
    } else {
        NF_INET_PRE_ROUTING
    }
}

/// What the datagram was before NAT comes from its conntrack tuple, not from a program
/// before NAT: NAT rewrites the destination at prerouting or output and the source at
/// postrouting or input (a reply's undoing included), each side at most once per namespace,
/// and the tuple of the packet's direction holds both as they entered this namespace. So one
/// link where each way through a namespace ends sees what every NAT hook rewrote: the
/// destination at `dnat_hook`, the source at `snat_hook`, both in one event when both
/// changed. A rewrite without conntrack (a stateless `ip daddr set`) is no NAT hop.
#[inline(always)]
fn report<S: Fields>(skb: S, tuple: u64, dnat_hook: u32, snat_hook: u32) -> Result<(), ReadError> {
    let Some(before) = NAT_BEFORE.get_ptr_mut(dnat_hook) else {
        return Ok(());
    };
    // SAFETY: this CPU's slot for the hook; NAT reports on one CPU do not nest (netfilter
    // runs a hook's functions in order, and the drop hop is not inside a netfilter program).
    let before = unsafe { &mut *before };
    // A tunnel's packet is read by its inner datagram, its conntrack entry is the outer
    // packet's: they do not compare.
    if !read_udp_of(skb, before)? || before.tunnel != TUNNEL_NONE {
        return Ok(());
    }
    // The tuple's addresses into the slot's outer ones (a tunnel's, unused by a NAT hop),
    // compared there, then taken as what the datagram was before.
    tuple_as_outer(tuple, before)?;
    let dnat = before.outer_dst != before.dst;
    let snat = before.outer_src != before.src;
    before.dst = before.outer_dst;
    before.src = before.outer_src;
    let (hook, dnat_first_at) = match (dnat, snat) {
        (true, true) => (snat_hook, dnat_hook + 1),
        (true, false) => (dnat_hook, 0),
        (false, true) => (snat_hook, 0),
        (false, false) => return Ok(()),
    };
    emit_nat(Hook::NetfilterLink as u16, skb, hook, dnat_first_at, before)
}

/// For the drop hop: notes in `ev` (a drop of `skb`, not a tunnel's) the destination it had
/// before this namespace's destination NAT, when its conntrack entry says there was one the
/// NAT hop's links did not see: dropped between prerouting (or output) and POSTROUTING or
/// LOCAL_IN, by a filter rule or for want of a route, say. The event's `outer_dst` then
/// holds it (flag [`SKB_DNAT_BEFORE`]). A source rewritten too means the datagram passed
/// source NAT, which the links follow at once: they reported both.
#[inline(always)]
pub fn note_dnat<S: Fields>(skb: S, ev: &mut SkbEvent) -> Result<(), ReadError> {
    let Some(nfct) = skb.field::<u64>(offset!(skb_nfct)) else {
        return Ok(());
    };
    let Some(tuple) = nat_tuple(nfct) else {
        return Ok(());
    };
    // Read in place (the drop hop's stack has no room): the tuple's source goes to
    // `outer_src`, unused without a tunnel and cleared again.
    tuple_as_outer(tuple, ev)?;
    let unseen = ev.outer_dst != ev.dst && ev.outer_src == ev.src;
    ev.outer_src = Addr::default();
    if !unseen {
        ev.outer_dst = Addr::default();
        return Ok(());
    }
    ev.flags |= SKB_DNAT_BEFORE;
    if dnat_hook(skb, NF_INET_POST_ROUTING) == NF_INET_LOCAL_OUT {
        ev.flags |= SKB_DNAT_AT_OUTPUT;
    }
    Ok(())
}

/// Reports a NAT rewrite of `skb` at netfilter hook `hook` (and, with `dnat_first_at`, one
/// of the destination before it: see [`NatEvent`]) when its addresses differ from
/// `before`'s (what they were before NAT). A datagram not sampled has its rewrite reported
/// when it is a new one (flagged `SKB_UNSAMPLED`), and is traced from there on. Addresses
/// are compared where they lie (maps, the scratch event): this hop's stack has no room for
/// copies.
#[inline(always)]
fn emit_nat<S: Fields>(
    source: u16,
    sk_buff: S,
    hook: u32,
    dnat_first_at: u32,
    before: &SkbEvent,
) -> Result<(), ReadError> {
    let skb = sk_buff.addr();
    let decision = sampling::lookup(skb);
    let Some(mut scratch) = Scratch::take() else {
        return Ok(());
    };
    let ev = scratch.nat();
    let mut changed = match fill(&mut ev.skb, KIND_NAT, source, sk_buff, 0, 0) {
        Ok(true) => ev.skb.src != before.src || ev.skb.dst != before.dst,
        _ => false,
    };
    if !changed {
        return Ok(());
    }
    if hook < NF_INET_NUMHOOKS {
        if dnat_first_at != 0 {
            count(STAT_NAT_BASE + 2 * (dnat_first_at - 1) + 1);
            count(STAT_NAT_BASE + 2 * hook);
        } else {
            count(STAT_NAT_BASE + 2 * hook + u32::from(ev.skb.dst != before.dst));
        }
    }
    ev.before_src = before.src;
    ev.before_dst = before.dst;
    let traced = match decision {
        Decision::All => Some(true),
        Decision::Known(traced) => Some(traced),
        Decision::Unknown => sampling::decide_skb(
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
        ev.dnat_first_at = dnat_first_at;
        conntrack(sk_buff, ev);
        if EVENTS.output::<NatEvent>(&*ev, ring_flags()).is_err() {
            // Counted, not logged: a log call here takes nat_after's stack past the
            // verifier's 512 bytes (the skb event's other emitters log it).
            count(STAT_RINGBUF_FULL);
        }
    }
    Ok(())
}

/// Reads one conntrack tuple at `tuple` into `src`/`dst`, in place (family 0 when
/// unreadable).
#[inline(always)]
fn read_tuple(tuple: u64, src: &mut Addr, dst: &mut Addr) {
    let read = try_read_kernel::<u16>(tuple, offset!(tuple_l3num)).is_some_and(|family| {
        tuple_addr(
            tuple,
            offset!(tuple_src_u3),
            offset!(tuple_src_port),
            family,
            src,
        )
        .is_ok()
            && tuple_addr(
                tuple,
                offset!(tuple_dst_u3),
                offset!(tuple_dst_port),
                family,
                dst,
            )
            .is_ok()
    });
    if !read {
        *src = Addr::default();
        *dst = Addr::default();
    }
}

/// Fills the conntrack entry's original and reply tuples of `skb`, when it has one.
#[inline(always)]
fn conntrack<S: Fields>(skb: S, ev: &mut NatEvent) {
    let ct = skb.field::<u64>(offset!(skb_nfct)).unwrap_or(0) & NFCT_PTRMASK;
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
        emit_nat(Hook::KprobeNfNat as u16, Probed(skb), hook, 0, before),
        "nat_kretprobe_manip"
    );
    0
}
