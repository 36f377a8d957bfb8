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
//! is read once per socket and kept in its storage.

use aya_ebpf::{
    bindings::{__sk_buff, bpf_sock, BPF_SK_STORAGE_GET_F_CREATE},
    btf_maps::SkStorage,
    helpers::{bpf_ktime_get_ns, bpf_probe_read_kernel, generated::bpf_sk_storage_get},
    macros::{btf_map, cgroup_skb},
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
    let mut key = FlowKey::default();
    // The packet's destination address, read at constant offsets the bounds checks cover.
    let mut pkt_dst = [0u8; 16];
    let ip_header = match first >> 4 {
        4 => {
            // SAFETY: inside the 20 bytes checked above.
            unsafe {
                if *((data + 9) as *const u8) != IPPROTO_UDP as u8 {
                    return;
                }
                core::ptr::copy_nonoverlapping((data + 16) as *const u8, pkt_dst.as_mut_ptr(), 4);
            }
            usize::from(first & 0x0f) * 4
        }
        6 => {
            if data + IPV6_HEADER > end {
                return;
            }
            // SAFETY: inside the 40 bytes just checked. Extension headers are not followed:
            // UDP sockets send none unless asked (IPV6_HOPOPTS and the like), and such a
            // send is not counted.
            unsafe {
                if *((data + 6) as *const u8) != IPPROTO_UDP as u8 {
                    return;
                }
                core::ptr::copy_nonoverlapping((data + 24) as *const u8, pkt_dst.as_mut_ptr(), 16);
            }
            IPV6_HEADER
        }
        _ => return,
    };
    let v4 = first >> 4 == 4;
    if !(IPV4_HEADER..=60).contains(&ip_header) {
        return;
    }
    let udp = data + ip_header;
    if udp + UDP_HEADER > end {
        return;
    }
    let family = skb.family as u16;
    key.src = Addr {
        family,
        port: skb.local_port as u16,
        _pad: 0,
        ip: [0; 16],
    };
    key.dst = Addr {
        family,
        port: u16::from_be(skb.remote_port as u16),
        _pad: 0,
        ip: [0; 16],
    };
    if family == AF_INET {
        key.src.ip[..4].copy_from_slice(&skb.local_ip4.to_ne_bytes());
        key.dst.ip[..4].copy_from_slice(&skb.remote_ip4.to_ne_bytes());
    } else if family == AF_INET6 {
        for i in 0..4 {
            key.src.ip[i * 4..i * 4 + 4].copy_from_slice(&skb.local_ip6[i].to_ne_bytes());
            key.dst.ip[i * 4..i * 4 + 4].copy_from_slice(&skb.remote_ip6[i].to_ne_bytes());
        }
    } else {
        return;
    }
    if key.dst.port == 0 {
        // Unconnected: the destination this send named is the packet's, before NAT.
        // SAFETY: inside the UDP header, bounds checked above.
        key.dst.port = u16::from_be(unsafe { *((udp + 2) as *const u16) });
        if !v4 {
            key.dst.ip = pkt_dst;
        } else if family == AF_INET {
            key.dst.ip[..4].copy_from_slice(&pkt_dst[..4]);
        } else {
            // An IPv6 socket sending to a v4-mapped address: as the socket names it.
            key.dst.ip[10] = 0xff;
            key.dst.ip[11] = 0xff;
            key.dst.ip[12..].copy_from_slice(&pkt_dst[..4]);
        }
        // The kernel's own skb: the context is one, but the verifier allows no arithmetic
        // on it; read back from the stack it is a plain number (the loader has CAP_PERFMON).
        let ptr = raw as u64;
        // SAFETY: reads our own stack slot.
        if let Ok(kskb) = unsafe { bpf_probe_read_kernel(&raw const ptr) } {
            before_nat(kskb, &mut key.dst);
        }
    }
    // SAFETY: the context's socket field (a full socket at egress, or null).
    let sk = unsafe { skb.__bindgen_anon_2.sk };
    let Some(netns) = netns_of(raw, sk) else {
        return;
    };
    key.netns = netns;
    let segs = u64::from(skb.gso_segs.max(1));
    let payload = u64::from(skb.len).saturating_sub((ip_header + UDP_HEADER) as u64);
    add(&key, segs, payload);
}

/// What the count hop remembers of a socket (its own storage, freed with it).
#[repr(C)]
pub struct SockNote {
    /// Inode of the socket's network namespace (a socket never changes namespace); 0 until
    /// read.
    netns: u32,
    _pad: u32,
}

/// Per socket: its namespace, read once (three reads of kernel memory) instead of for
/// every datagram.
#[btf_map]
static SOCK_NOTES: SkStorage<SockNote> = SkStorage::new();

/// The sending socket's namespace inode, from its storage, else read (skb->sk->sk_net->
/// ns.inum) and kept there.
#[inline(always)]
fn netns_of(ctx_skb: *mut __sk_buff, sk: *mut bpf_sock) -> Option<u32> {
    if sk.is_null() {
        return None;
    }
    // SAFETY: `sk` is the context's socket; the helper checks it is a full socket and
    // creates a zeroed value for it the first time.
    let note = unsafe {
        bpf_sk_storage_get(
            (&raw const SOCK_NOTES).cast_mut().cast(),
            sk.cast(),
            core::ptr::null_mut(),
            u64::from(BPF_SK_STORAGE_GET_F_CREATE),
        )
    }
    .cast::<SockNote>();
    if note.is_null() {
        return None;
    }
    // SAFETY: the socket's storage value; only this program writes it.
    let note = unsafe { &mut *note };
    if note.netns != 0 {
        return Some(note.netns);
    }
    let ptr = ctx_skb as u64;
    // SAFETY: reads our own stack slot (the kernel skb's address as a plain number).
    let skb: u64 = unsafe { bpf_probe_read_kernel(&raw const ptr) }.ok()?;
    let sk: u64 = try_read_kernel(skb, offset!(skb_sk))?;
    let net: u64 = try_read_kernel(sk, offset!(sk_net))?;
    note.netns = try_read_kernel(net, offset!(net_inum))?;
    Some(note.netns)
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
pub fn add(key: &FlowKey, segs: u64, payload: u64) {
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
