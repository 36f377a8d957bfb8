//! The benchmark's reference always-on flow counter, measured beside udptrace (issue 16):
//! NetObserv's eBPF agent's design, rebuilt on the points that set its cost. A tc program on
//! ingress and one on egress of every device; per packet, the headers parsed by direct
//! packet access, a flow key of 56 bytes (ether type, direction, MAC and IP addresses,
//! ports, protocol, interface), one lookup in a per-CPU hash and an update in place (packets,
//! bytes, the first and last time seen), or an insert for a new flow. Userspace evicts the
//! table on a timer (xtask's `reference-counter`). It counts every packet, UDP or not, as
//! NetObserv does; it never changes a packet's fate.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::bpf_ktime_get_ns,
    macros::{classifier, map},
    maps::PerCpuHashMap,
    programs::TcContext,
};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::{Ipv4Hdr, Ipv6Hdr},
    udp::UdpHdr,
};

/// A flow as NetObserv keys it (its `flow_id`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FlowId {
    pub eth_protocol: u16,
    /// 0 ingress, 1 egress.
    pub direction: u8,
    pub transport: u8,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    /// IPv4 addresses v4-mapped, as NetObserv keeps them.
    pub src_ip: [u8; 16],
    pub dst_ip: [u8; 16],
    pub src_port: u16,
    pub dst_port: u16,
    pub if_index: u32,
}

/// What is counted per flow (NetObserv's `flow_metrics`, its core).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FlowMetrics {
    pub packets: u64,
    pub bytes: u64,
    pub start_ns: u64,
    pub end_ns: u64,
}

const _: () = assert!(core::mem::size_of::<FlowId>() == 56);
const _: () = assert!(core::mem::size_of::<FlowMetrics>() == 32);

/// NetObserv's default table size (`CACHE_MAX_FLOWS`); xtask may set another at load.
#[map(name = "REF_FLOWS")]
static FLOWS: PerCpuHashMap<FlowId, FlowMetrics> = PerCpuHashMap::with_max_entries(5000, 0);

/// TCX_NEXT / TC_ACT_UNSPEC: no opinion on the packet.
const NO_VERDICT: i32 = -1;
const INGRESS: u8 = 0;
const EGRESS: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

#[classifier]
#[inline(always)]
pub fn reference_ingress(ctx: TcContext) -> i32 {
    count(&ctx, INGRESS);
    NO_VERDICT
}

#[classifier]
#[inline(always)]
pub fn reference_egress(ctx: TcContext) -> i32 {
    count(&ctx, EGRESS);
    NO_VERDICT
}

/// A `T` at `offset` into the packet, bounds checked.
#[inline(always)]
fn at<T>(ctx: &TcContext, offset: usize) -> Option<*const T> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

#[inline(always)]
fn count(ctx: &TcContext, direction: u8) {
    let Some(eth) = at::<EthHdr>(ctx, 0) else {
        return;
    };
    // SAFETY: within the packet, bounds checked by `at`.
    let eth = unsafe { &*eth };
    let mut id = FlowId {
        eth_protocol: u16::from_be(eth.ether_type),
        direction,
        transport: 0,
        src_mac: eth.src_addr,
        dst_mac: eth.dst_addr,
        src_ip: [0; 16],
        dst_ip: [0; 16],
        src_port: 0,
        dst_port: 0,
        // SAFETY: the context's own field.
        if_index: unsafe { (*ctx.skb.skb).ifindex },
    };
    let l4 = match eth.ether_type {
        t if t == EtherType::Ipv4 as u16 => {
            let Some(ip) = at::<Ipv4Hdr>(ctx, EthHdr::LEN) else {
                return;
            };
            // SAFETY: within the packet, bounds checked by `at`.
            let ip = unsafe { &*ip };
            id.transport = ip.proto;
            id.src_ip[10] = 0xff;
            id.src_ip[11] = 0xff;
            id.src_ip[12..].copy_from_slice(&ip.src_addr);
            id.dst_ip[10] = 0xff;
            id.dst_ip[11] = 0xff;
            id.dst_ip[12..].copy_from_slice(&ip.dst_addr);
            EthHdr::LEN + usize::from(ip.vihl & 0x0f) * 4
        }
        t if t == EtherType::Ipv6 as u16 => {
            let Some(ip) = at::<Ipv6Hdr>(ctx, EthHdr::LEN) else {
                return;
            };
            // SAFETY: within the packet, bounds checked by `at`.
            let ip = unsafe { &*ip };
            id.transport = ip.next_hdr;
            id.src_ip = ip.src_addr;
            id.dst_ip = ip.dst_addr;
            EthHdr::LEN + Ipv6Hdr::LEN
        }
        _ => 0,
    };
    if l4 != 0 && (id.transport == IPPROTO_UDP || id.transport == IPPROTO_TCP) {
        // TCP's ports sit where UDP's do.
        if let Some(ports) = at::<UdpHdr>(ctx, l4) {
            // SAFETY: within the packet, bounds checked by `at`.
            let ports = unsafe { &*ports };
            id.src_port = u16::from_be_bytes(ports.src);
            id.dst_port = u16::from_be_bytes(ports.dst);
        }
    }
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let len = u64::from(ctx.len());
    match FLOWS.get_ptr_mut(id) {
        Some(flow) => {
            // SAFETY: this CPU's value of the entry; a program run is not preempted by
            // another on the same CPU for tc.
            let flow = unsafe { &mut *flow };
            flow.packets += 1;
            flow.bytes += len;
            flow.end_ns = now;
        }
        None => {
            let flow = FlowMetrics {
                packets: 1,
                bytes: len,
                start_ns: now,
                end_ns: now,
            };
            // A full table loses the packet's count (NetObserv sends it on a ring buffer).
            let _ = FLOWS.insert(id, flow, u64::from(BPF_NOEXIST));
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
