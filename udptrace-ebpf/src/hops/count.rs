//! The count hop: every datagram a local socket sends, counted on its flow by one small
//! program, whatever else is attached. cgroup_skb egress at the root of the cgroup v2
//! hierarchy runs once per skb a local socket sends (in `ip_finish_output`, before any
//! segmentation or fragmentation, after NAT), for every process and every network
//! namespace; forwarded and tunnel-encapsulated packets do not pass it.
//!
//! The flow is the sender's view, as the send hop reports it: the socket's namespace and
//! bound address, and the destination it named — the socket's peer when connected, else
//! the packet's destination as it was before NAT rewrote it (its conntrack tuple).
//! Per datagram: one map update on the flow, no timestamp, no event; the socket's namespace
//! in two reads of kernel memory that stay cached.

use aya_ebpf::{
    bindings::bpf_sock,
    helpers::{bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::cgroup_skb,
    programs::SkBuffContext,
};
use udptrace_common::{
    Addr, FlowKey, FlowStats, AF_INET, AF_INET6, IPPROTO_UDP, OFFSET_MISSING, STAT_FLOW_FULL,
    STAT_FLOW_NEW,
};

use crate::{
    maps::{count, empty_bodies, fault, offset, FLOWS},
    read::kernel::try_read_kernel,
};

/// What a cgroup_skb program returns to let the packet go.
const ALLOW: i32 = 1;

#[cgroup_skb(egress)]
pub fn count_cgroup_egress(ctx: SkBuffContext) -> i32 {
    if !empty_bodies() {
        count_egress(&ctx);
    }
    ALLOW
}

const IPV4_HEADER: usize = 20;
const IPV6_HEADER: usize = 40;
const UDP_HEADER: usize = 8;

#[inline(always)]
fn count_egress(ctx: &SkBuffContext) {
    let raw = ctx.skb.skb;
    // SAFETY: the program's context, a `struct __sk_buff` the verifier lets us read.
    let skb = unsafe { &*raw };
    let data = skb.data as usize;
    let end = skb.data_end as usize;
    // The packet starts at its IP header here.
    if data + IPV4_HEADER > end {
        return;
    }
    // SAFETY: inside the packet, bounds checked above.
    let first = unsafe { *(data as *const u8) };
    let (ip_header, v4) = match first >> 4 {
        4 => {
            // SAFETY: inside the 20 bytes checked above.
            if unsafe { *((data + 9) as *const u8) } != IPPROTO_UDP as u8 {
                return;
            }
            (usize::from(first & 0x0f) * 4, true)
        }
        6 => {
            if data + IPV6_HEADER > end {
                return;
            }
            // SAFETY: inside the 40 bytes just checked. Extension headers are not followed:
            // UDP sockets send none unless asked (IPV6_HOPOPTS and the like), and such a
            // send is not counted.
            if unsafe { *((data + 6) as *const u8) } != IPPROTO_UDP as u8 {
                return;
            }
            (IPV6_HEADER, false)
        }
        _ => return,
    };
    if !(IPV4_HEADER..=60).contains(&ip_header) {
        return;
    }
    let udp = data + ip_header;
    if udp + UDP_HEADER > end {
        return;
    }
    // The socket's addresses from the context, each a plain word: the key is written
    // word by word (no zeroing loop, no byte copies on the common path).
    let family = skb.family as u16;
    // Each context field read on its own (volatile), at a constant offset from the
    // context: the verifier refuses a load through a pointer derived from it.
    let field = |f: &u32| -> u32 {
        // SAFETY: a field of the program's context.
        unsafe { core::ptr::read_volatile(f) }
    };
    let (src_ip, dst_ip) = if family == AF_INET {
        (
            [field(&skb.local_ip4), 0, 0, 0],
            [field(&skb.remote_ip4), 0, 0, 0],
        )
    } else if family == AF_INET6 {
        (
            [
                field(&skb.local_ip6[0]),
                field(&skb.local_ip6[1]),
                field(&skb.local_ip6[2]),
                field(&skb.local_ip6[3]),
            ],
            [
                field(&skb.remote_ip6[0]),
                field(&skb.remote_ip6[1]),
                field(&skb.remote_ip6[2]),
                field(&skb.remote_ip6[3]),
            ],
        )
    } else {
        return;
    };
    let mut dst = addr(family, u16::from_be(skb.remote_port as u16), dst_ip);
    if dst.port == 0 {
        // Unconnected: the destination this send named is the packet's, before NAT.
        // SAFETY: inside the UDP and IP headers, bounds checked above.
        unsafe { packet_dst(&mut dst, data, udp, v4) };
        // The kernel's own skb: the context is one, but the verifier allows no arithmetic
        // on it; read back from the stack it is a plain number (the loader has CAP_PERFMON).
        let ptr = raw as u64;
        // SAFETY: reads our own stack slot.
        if let Ok(kskb) = unsafe { bpf_probe_read_kernel(&raw const ptr) } {
            before_nat(kskb, &mut dst);
        }
    }
    // SAFETY: the context's socket field (a full socket at egress, or null).
    let sk = unsafe { skb.__bindgen_anon_2.sk };
    let Some(netns) = netns_of(sk) else {
        return;
    };
    let key = FlowKey {
        netns,
        _pad: 0,
        src: addr(family, skb.local_port as u16, src_ip),
        dst,
    };
    let segs = u64::from(skb.gso_segs.max(1));
    let payload = u64::from(skb.len).saturating_sub((ip_header + UDP_HEADER) as u64);
    add(&key, segs, payload);
}

/// An address of `family` from its words in network order.
#[inline(always)]
fn addr(family: u16, port: u16, ip: [u32; 4]) -> Addr {
    Addr {
        family,
        port,
        _pad: 0,
        // SAFETY: 16 bytes either way, every bit pattern valid.
        ip: unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(ip) },
    }
}

/// Sets `dst` to the packet's destination address and port (an unconnected send's), as
/// the sending socket names it: an IPv6 socket's IPv4 destination is v4-mapped.
///
/// # Safety
/// `data` and `udp` point at the packet's IP and UDP headers, both within bounds.
#[inline(always)]
unsafe fn packet_dst(dst: &mut Addr, data: usize, udp: usize, v4: bool) {
    let byte = |at: usize| -> u8 {
        // SAFETY: within the headers, as the caller promised.
        unsafe { *(at as *const u8) }
    };
    let word = |at: usize| -> u32 {
        u32::from_ne_bytes([byte(at), byte(at + 1), byte(at + 2), byte(at + 3)])
    };
    dst.port = u16::from_be_bytes([byte(udp + 2), byte(udp + 3)]);
    let ip = if !v4 {
        [
            word(data + 24),
            word(data + 28),
            word(data + 32),
            word(data + 36),
        ]
    } else if dst.family == AF_INET {
        [word(data + 16), 0, 0, 0]
    } else {
        // An IPv6 socket sending to an IPv4 address: ::ffff:a.b.c.d.
        [
            0,
            0,
            u32::from_ne_bytes([0, 0, 0xff, 0xff]),
            word(data + 16),
        ]
    };
    *dst = addr(dst.family, dst.port, ip);
}

/// The sending socket's namespace inode: `sk->sk_net->ns.inum`, two reads of kernel memory
/// that stay in the cache (every socket of a namespace shares its `struct net`). Keeping it
/// in the socket's storage instead measured cheaper for one busy socket (~40 ns) but dearer
/// for many (~250 ns at 1000 sockets: the storage is two more cold lines per socket) and for
/// sockets that send once (creating storage) — docs/performance.md.
#[inline(always)]
fn netns_of(sk: *mut bpf_sock) -> Option<u32> {
    if sk.is_null() {
        return None;
    }
    // The context's socket is the kernel's `struct sock`; read back from our stack its
    // address is a plain number the verifier lets us read through (CAP_PERFMON).
    let ptr = sk as u64;
    // SAFETY: reads our own stack slot.
    let sk: u64 = unsafe { bpf_probe_read_kernel(&raw const ptr) }.ok()?;
    let net: u64 = try_read_kernel(sk, offset!(sk_net))?;
    try_read_kernel(net, offset!(net_inum))
}

/// `skb->_nfct` keeps the conntrack info in its low bits.
const NFCT_PTRMASK: u64 = !7;
const NFCT_INFOMASK: u64 = 7;
/// `enum ip_conntrack_info`: from here on, the packet goes the reply direction.
const IP_CT_IS_REPLY: u64 = 3;
/// `enum ip_conntrack_status`: source or destination NAT applies to the connection.
const IPS_NAT_MASK: u64 = (1 << 4) | (1 << 5);

/// Replaces `dst` with the destination the packet had before NAT, from its conntrack
/// entry's tuple for the packet's direction (only when the connection is NATed).
#[inline(always)]
fn before_nat(skb: u64, dst: &mut Addr) {
    if offset!(skb_nfct) as u32 == OFFSET_MISSING || offset!(ct_status) as u32 == OFFSET_MISSING {
        return;
    }
    let Some(nfct) = try_read_kernel::<u64>(skb, offset!(skb_nfct)) else {
        return;
    };
    let ct = nfct & NFCT_PTRMASK;
    if ct == 0
        || !try_read_kernel::<u64>(ct, offset!(ct_status)).is_some_and(|s| s & IPS_NAT_MASK != 0)
    {
        return;
    }
    let dir = u64::from(nfct & NFCT_INFOMASK >= IP_CT_IS_REPLY);
    let tuple = ct
        + offset!(ct_tuplehash) as u64
        + dir * offset!(ct_tuplehash_size) as u64
        + offset!(ct_hash_tuple) as u64;
    let (Some(ip), Some(port)) = (
        try_read_kernel::<[u8; 16]>(tuple, offset!(tuple_dst_u3)),
        try_read_kernel::<u16>(tuple, offset!(tuple_dst_port)),
    ) else {
        return;
    };
    if dst.family == AF_INET {
        dst.ip[..4].copy_from_slice(&ip[..4]);
    } else if dst.ip[10] == 0xff && dst.ip[11] == 0xff && dst.ip[..10] == [0; 10] {
        dst.ip[12..].copy_from_slice(&ip[..4]);
    } else {
        dst.ip = ip;
    }
    dst.port = u16::from_be(port);
}

/// Adds `segs` datagrams of `payload` bytes in all, sent in one skb, to `key`'s flow.
#[inline(always)]
fn add(key: &FlowKey, segs: u64, payload: u64) {
    if let Some(stats) = FLOWS.get_ptr_mut(key) {
        // SAFETY: this CPU's value of the entry; a program cannot be preempted on its CPU.
        let stats = unsafe { &mut *stats };
        stats.packets += segs;
        stats.bytes += payload;
        stats.sends += 1;
        return;
    }
    let stats = FlowStats {
        packets: segs,
        bytes: payload,
        errors: 0,
        sends: 1,
        // SAFETY: plain helper call without pointer arguments.
        first_ns: unsafe { bpf_ktime_get_ns() },
    };
    insert(key, &stats);
}

/// Adds a flow this CPU has not counted yet. A program's update of a per-CPU map writes
/// only this CPU's slot: if another CPU added the flow since the lookup, this still counts
/// exactly once.
#[inline(always)]
pub fn insert(key: &FlowKey, stats: &FlowStats) {
    match FLOWS.insert(key, stats, 0) {
        Ok(()) => count(STAT_FLOW_NEW),
        Err(_) => fault(STAT_FLOW_FULL),
    }
}
