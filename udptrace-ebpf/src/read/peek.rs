//! A first look at a datagram for the trace filter: its IP and UDP headers in one read,
//! enough to say that the filter surely leaves it out. Anything this look cannot settle (a
//! fragment, IP options, an IPv6 extension header, a tunnel, a match) goes the whole way
//! ([`super::skb::read_udp`] and the sampling decision).

use core::mem::MaybeUninit;

use aya_ebpf::{
    bindings::bpf_hdr_start_off::BPF_HDR_START_NET, cty::c_void,
    helpers::bpf_skb_load_bytes_relative, programs::TcContext,
};
use udptrace_common::{
    Addr, TraceFilter, AF_INET, AF_INET6, FILTER_HOST, FILTER_PORT, IPPROTO_UDP, IP_MF, IP_OFFSET,
};

use crate::{
    maps::offset,
    read::{
        kernel::{try_read_kernel, Fields, Typed},
        skb::HEADER_UNSET,
    },
    sampling,
};

/// Bytes looked at from the IP header on: an IPv6 header and a UDP header (an IPv4 header
/// without options and a UDP header fit too).
pub const PEEK: usize = 48;

const IPPROTO_TCP: u8 = 6;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;
/// Tunnels whose inner datagram the filter applies to: the whole way reads it.
const TUNNEL_PORTS: [u16; 3] = [4789, 8472, 6081];

/// [`skb_left_out`] for a tc program's packet: the headers copied straight from the packet
/// by one helper call (no pointer to follow, no probe read). A packet shorter than [`PEEK`]
/// from its IP header on goes the whole way.
#[inline(always)]
pub fn tc_left_out(ctx: &TcContext) -> bool {
    let Some(filter) = sampling::headers_filter() else {
        return false;
    };
    // Not zeroed first: Rust zeroes a stack array with a byte-wise loop (a subprogram of
    // ~240 instructions for 48 bytes), and the helper fills every byte, or clears them all
    // when the packet is shorter.
    let mut ip = MaybeUninit::<[u8; PEEK]>::uninit();
    // SAFETY: the helper writes PEEK bytes into `ip` whatever happens, and reads the packet
    // of the program's own context.
    let copied = unsafe {
        bpf_skb_load_bytes_relative(
            ctx.skb.skb as *const c_void,
            0,
            ip.as_mut_ptr() as *mut c_void,
            PEEK as u32,
            BPF_HDR_START_NET,
        )
    };
    // SAFETY: written by the helper above.
    copied == 0 && left_out(unsafe { ip.assume_init_ref() }, filter)
}

/// [`skb_left_out`] for an skb a typed (BTF) tracepoint was given: where the header is comes
/// from two plain loads the verifier checks against struct sk_buff (offsets from the
/// frozen read-only data, constants to it); only the header is read by helper.
#[inline(always)]
pub fn btf_skb_left_out(skb: *const u8) -> bool {
    let Some(filter) = sampling::headers_filter() else {
        return false;
    };
    let (head, nh) = (
        Typed(skb).field::<u64>(offset!(skb_head)).unwrap_or(0),
        Typed(skb)
            .field::<u16>(offset!(skb_network_header))
            .unwrap_or(HEADER_UNSET),
    );
    if head == 0 || nh == HEADER_UNSET {
        return false;
    }
    try_read_kernel::<[u8; PEEK]>(head + u64::from(nh), 0).is_some_and(|ip| left_out(&ip, filter))
}

/// Whether the filter leaves out, from the first bytes of its IP header, the packet of the
/// kernel skb `skb` (two reads for where the header is, one for the header). Only while
/// [`sampling::headers_filter`] gives a filter.
#[inline(always)]
pub fn skb_left_out(skb: u64) -> bool {
    let Some(filter) = sampling::headers_filter() else {
        return false;
    };
    // Each step returns at once: plain control flow for the strictest verifier (6.1's
    // refuses the spill of a register a paired read leaves unset on the other path).
    let head = match try_read_kernel::<u64>(skb, offset!(skb_head)) {
        Some(head) if head != 0 => head,
        _ => return false,
    };
    let nh = match try_read_kernel::<u16>(skb, offset!(skb_network_header)) {
        Some(nh) if nh != HEADER_UNSET => nh,
        _ => return false,
    };
    // Past a short packet's end lies the rest of its buffer (tailroom, skb_shared_info):
    // kernel memory that reads without fault; what it holds is not looked at.
    try_read_kernel::<[u8; PEEK]>(head + u64::from(nh), 0).is_some_and(|ip| left_out(&ip, filter))
}

/// Whether `filter` surely leaves out the packet whose IP header starts `ip`: not UDP (no
/// hop reports it), or a whole UDP datagram, no tunnel's, that neither end of matches.
#[inline(always)]
pub fn left_out(ip: &[u8; PEEK], filter: &TraceFilter) -> bool {
    let (family, udp) = match ip[0] >> 4 {
        4 => {
            if ip[0] & 0x0f != 5 {
                return false;
            }
            match ip[9] {
                p if p == IPPROTO_UDP as u8 => {}
                IPPROTO_TCP | IPPROTO_ICMP => return true,
                _ => return false,
            }
            if u16::from_be_bytes([ip[6], ip[7]]) & (IP_OFFSET | IP_MF) != 0 {
                return false;
            }
            (AF_INET, 20)
        }
        6 => {
            match ip[6] {
                p if p == IPPROTO_UDP as u8 => {}
                IPPROTO_TCP | IPPROTO_ICMPV6 => return true,
                _ => return false,
            }
            (AF_INET6, 40)
        }
        _ => return false,
    };
    let sport = u16::from_be_bytes([ip[udp], ip[udp + 1]]);
    let dport = u16::from_be_bytes([ip[udp + 2], ip[udp + 3]]);
    if TUNNEL_PORTS.contains(&dport) {
        return false;
    }
    if filter.flags & FILTER_HOST == 0 {
        // The port alone decides: no addresses to build.
        return filter.flags & FILTER_PORT != 0 && sport != filter.port && dport != filter.port;
    }
    let mut src = Addr {
        family,
        port: sport,
        _pad: 0,
        ip: [0; 16],
    };
    let mut dst = Addr { port: dport, ..src };
    if family == AF_INET {
        src.ip[..4].copy_from_slice(&ip[12..16]);
        dst.ip[..4].copy_from_slice(&ip[16..20]);
    } else {
        src.ip.copy_from_slice(&ip[8..24]);
        dst.ip.copy_from_slice(&ip[24..40]);
    }
    !filter.matches(&src, &dst)
}
