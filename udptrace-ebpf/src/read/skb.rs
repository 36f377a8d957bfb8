//! What every skb-based hop reads: the UDP/IP headers of a `struct sk_buff`, its device and
//! network namespace. One parser for xmit, drop and deliver.

use aya_ebpf::helpers::bpf_probe_read_kernel_str_bytes;
use network_types::{
    ip::{Ipv4Hdr, Ipv6Hdr},
    udp::UdpHdr,
};
use udptrace_common::{
    Addr, SkbEvent, AF_INET, AF_INET6, IPPROTO_UDP, IP_MF, IP_OFFSET, KIND_DELIVER, KIND_DROP,
    KIND_XMIT, SKB_MALFORMED, SKB_SOCK_GRO, SKB_SOCK_NO_GRO, SKB_UNSAMPLED, STAT_RINGBUF_FULL,
    TUNNEL_GENEVE, TUNNEL_NONE, TUNNEL_VXLAN,
};

use crate::{
    maps::{count, offset, ring_flags, Scratch, EVENTS},
    read::current::header,
    read::kernel::{read_kernel, try_read_kernel, Fields, Probed, ReadError},
    read::peek,
    sampling::{self, Decision},
};

/// `skb->network_header` when unset (`(typeof(skb->network_header))~0U`).
pub const HEADER_UNSET: u16 = 0xffff;

/// What follows an IP header.
enum Payload {
    /// A UDP header at this address, and how many bytes the IP header says follow it
    /// (UDP header included).
    Udp(u64, u16),
    /// A non-first fragment of a UDP datagram: this many payload bytes, no UDP header.
    Fragment(u16),
    /// Anything else.
    Other,
}

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_DSTOPTS: u8 = 60;
/// IPv6 extension headers followed before giving up (hop-by-hop, routing, destination
/// options and fragment cover what hosts send).
const MAX_EXT_HEADERS: usize = 4;

/// Reads an IPv4/IPv6 header at `ip` into `src`/`dst` (ports left 0), `ip_id` and
/// `ip_frag`; says where the UDP header starts.
#[inline(always)]
fn read_ip(
    ip: u64,
    src: &mut Addr,
    dst: &mut Addr,
    ip_id: &mut u16,
    ip_frag: &mut u16,
) -> Result<Payload, ReadError> {
    let version: u8 = read_kernel::<u8>(ip, 0)? >> 4;
    if version == 4 {
        let h: Ipv4Hdr = read_kernel(ip, 0)?;
        if h.proto != IPPROTO_UDP as u8 {
            return Ok(Payload::Other);
        }
        *src = Addr {
            family: AF_INET,
            port: 0,
            _pad: 0,
            ip: [0; 16],
        };
        *dst = *src;
        src.ip[..4].copy_from_slice(&h.src_addr);
        dst.ip[..4].copy_from_slice(&h.dst_addr);
        *ip_id = u16::from_be_bytes(h.id);
        *ip_frag = u16::from_be_bytes(h.frags);
        let header = u16::from(h.vihl & 0x0f) * 4;
        if *ip_frag & IP_OFFSET != 0 {
            let total = u16::from_be_bytes(h.tot_len);
            return Ok(Payload::Fragment(total.saturating_sub(header)));
        }
        let payload = u16::from_be_bytes(h.tot_len).saturating_sub(header);
        Ok(Payload::Udp(ip + u64::from(header), payload))
    } else if version == 6 {
        let h: Ipv6Hdr = read_kernel(ip, 0)?;
        *src = Addr {
            family: AF_INET6,
            port: 0,
            _pad: 0,
            ip: h.src_addr,
        };
        *dst = Addr {
            family: AF_INET6,
            port: 0,
            _pad: 0,
            ip: h.dst_addr,
        };
        *ip_id = 0;
        *ip_frag = 0;
        let mut next = h.next_hdr;
        let mut at = ip + Ipv6Hdr::LEN as u64;
        let mut left = u16::from_be_bytes(h.payload_len);
        for _ in 0..MAX_EXT_HEADERS {
            match next {
                IPPROTO_UDP_U8 if *ip_frag & IP_OFFSET != 0 => {
                    return Ok(Payload::Fragment(left));
                }
                IPPROTO_UDP_U8 => return Ok(Payload::Udp(at, left)),
                IPPROTO_FRAGMENT => {
                    // next header, reserved, offset << 3 | M, identification
                    let f: [u8; 8] = read_kernel(at, 0)?;
                    let off_m = u16::from_be_bytes([f[2], f[3]]);
                    *ip_frag = ((off_m >> 3) & IP_OFFSET) | if off_m & 1 != 0 { IP_MF } else { 0 };
                    *ip_id = u16::from_be_bytes([f[6], f[7]]);
                    next = f[0];
                    at += 8;
                    left = left.saturating_sub(8);
                }
                IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                    let e: [u8; 2] = read_kernel(at, 0)?;
                    let len = (u16::from(e[1]) + 1) * 8;
                    next = e[0];
                    at += u64::from(len);
                    left = left.saturating_sub(len);
                }
                _ => return Ok(Payload::Other),
            }
        }
        Ok(Payload::Other)
    } else {
        Ok(Payload::Other)
    }
}

const IPPROTO_UDP_U8: u8 = IPPROTO_UDP as u8;

/// Reads the UDP header at `udp` into the ports, payload length and checksum of `ev`;
/// flags it malformed when its length disagrees with the `ip_payload` bytes the IP header
/// gives it (shorter than a UDP header, or longer than what is there: the kernel drops it).
#[inline(always)]
fn read_udp_header(udp: u64, ip_payload: u16, ev: &mut SkbEvent) -> Result<(), ReadError> {
    let h: UdpHdr = read_kernel(udp, 0)?;
    let ulen = u16::from_be_bytes(h.len);
    ev.src.port = u16::from_be_bytes(h.src);
    ev.dst.port = u16::from_be_bytes(h.dst);
    ev.len = u32::from(ulen.saturating_sub(UdpHdr::LEN as u16));
    ev.udp_csum = u16::from_be_bytes(h.check);
    // A first fragment's UDP length counts the fragments that follow.
    if ev.ip_frag & IP_MF == 0 && (ulen < UdpHdr::LEN as u16 || ulen > ip_payload) {
        ev.flags |= SKB_MALFORMED;
    }
    Ok(())
}

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
/// Geneve's protocol type for an Ethernet payload.
const ETH_P_TEB: u16 = 0x6558;

/// Reads the IP and UDP headers into `ev`. `Ok(false)` when the skb is not a UDP datagram
/// or a fragment of one. A non-first fragment is reported without ports. A VXLAN or Geneve
/// datagram carrying UDP is reported by its inner addresses, with the tunnel's in `outer_*`.
#[inline(always)]
pub fn read_udp(skb: u64, ev: &mut SkbEvent) -> Result<bool, ReadError> {
    read_udp_of(Probed(skb), ev)
}

/// [`read_udp`] for an skb read either way ([`Fields`]); the packet's bytes by helper.
#[inline(always)]
pub fn read_udp_of<S: Fields>(skb: S, ev: &mut SkbEvent) -> Result<bool, ReadError> {
    let head: u64 = skb.read(offset!(skb_head))?;
    let nh: u16 = skb.read(offset!(skb_network_header))?;
    if head == 0 || nh == HEADER_UNSET {
        return Ok(false);
    }
    ev.tunnel = TUNNEL_NONE;
    ev.vni = 0;
    ev.udp_csum = 0;
    ev.flags = 0;
    ev.outer_src = Addr::default();
    ev.outer_dst = Addr::default();
    let udp = match read_ip(
        head + u64::from(nh),
        &mut ev.src,
        &mut ev.dst,
        &mut ev.ip_id,
        &mut ev.ip_frag,
    )? {
        Payload::Udp(udp, len) => (udp, len),
        Payload::Fragment(len) => {
            ev.len = u32::from(len);
            return Ok(true);
        }
        Payload::Other => return Ok(false),
    };
    let (udp, ip_payload) = udp;
    read_udp_header(udp, ip_payload, ev)?;
    // A tunnel packet's first fragment still holds the inner headers.
    let tunnel_header: [u8; 8] = match ev.dst.port {
        VXLAN_PORT | FLANNEL_VXLAN_PORT | GENEVE_PORT => read_kernel(udp, UdpHdr::LEN)?,
        _ => return Ok(true),
    };
    let (tunnel, eth) = if ev.dst.port == GENEVE_PORT {
        if u16::from_be_bytes([tunnel_header[2], tunnel_header[3]]) != ETH_P_TEB {
            return Ok(true);
        }
        let options = u64::from(tunnel_header[0] & 0x3f) * 4;
        (TUNNEL_GENEVE, udp + 16 + options)
    } else {
        // VXLAN: the I flag says the VNI is valid.
        if tunnel_header[0] & 0x08 == 0 {
            return Ok(true);
        }
        (TUNNEL_VXLAN, udp + 16)
    };
    let mut ethertype = u16::from_be(read_kernel::<u16>(eth, 12)?);
    let mut inner = eth + 14;
    if ethertype == ETH_P_8021Q {
        ethertype = u16::from_be(read_kernel::<u16>(eth, 16)?);
        inner += 4;
    }
    if ethertype != ETH_P_IP && ethertype != ETH_P_IPV6 {
        return Ok(false);
    }
    let (outer_src, outer_dst) = (ev.src, ev.dst);
    match read_ip(
        inner,
        &mut ev.src,
        &mut ev.dst,
        &mut ev.ip_id,
        &mut ev.ip_frag,
    )? {
        Payload::Udp(inner_udp, len) => read_udp_header(inner_udp, len, ev)?,
        Payload::Fragment(len) => {
            ev.len = u32::from(len);
            ev.udp_csum = 0;
        }
        Payload::Other => return Ok(false),
    }
    ev.outer_src = outer_src;
    ev.outer_dst = outer_dst;
    ev.tunnel = tunnel;
    ev.vni = u32::from_be_bytes([0, tunnel_header[4], tunnel_header[5], tunnel_header[6]]);
    Ok(true)
}

/// Whether receiving socket `sk` reads several datagrams as one buffer (`UDP_GRO` on:
/// [`SKB_SOCK_GRO`]) or one by one ([`SKB_SOCK_NO_GRO`]); 0 where this kernel's layout or
/// the read says nothing.
#[inline(always)]
fn gro_flag(sk: u64) -> u32 {
    let mask = offset!(udp_gro_mask) as u8;
    match try_read_kernel::<u8>(sk, offset!(udp_gro_byte)) {
        Some(_) if mask == 0 => 0,
        Some(byte) if byte & mask != 0 => SKB_SOCK_GRO,
        Some(_) => SKB_SOCK_NO_GRO,
        None => 0,
    }
}

/// The inode of socket `sk` (sk->sk_socket->file->f_inode->i_ino), as /proc/PID/fd shows it.
#[inline(always)]
fn socket_inode(sk: u64) -> Option<u64> {
    let socket: u64 = try_read_kernel(sk, offset!(sk_socket))?;
    let file: u64 = try_read_kernel(socket, offset!(socket_file))?;
    let inode: u64 = try_read_kernel(file, offset!(file_inode))?;
    try_read_kernel(inode, offset!(inode_ino))
}

/// The device's rtnetlink kind (dev->rtnl_link_ops->kind) into `out`; left empty for a
/// device without one (physical NICs, loopback).
#[inline(always)]
fn device_kind<S: Fields>(dev: S, out: &mut [u8; 16]) {
    let Some(ops) = dev.pointer(offset!(dev_link_ops)).filter(|p| p.addr() != 0) else {
        return;
    };
    let Some(kind) = ops.field::<u64>(offset!(link_ops_kind)).filter(|&p| p != 0) else {
        return;
    };
    // SAFETY: the helper checks the address; a fault leaves `out` as it is.
    let _ = unsafe { bpf_probe_read_kernel_str_bytes(kind as *const u8, out) };
}

const VXLAN_PORT: u16 = 4789;
const FLANNEL_VXLAN_PORT: u16 = 8472;
const GENEVE_PORT: u16 = 6081;

/// Fills everything but the headers. Returns false when `ev` should be discarded.
#[inline(always)]
pub fn fill<S: Fields>(
    ev: &mut SkbEvent,
    kind: u16,
    hook: u16,
    skb: S,
    reason: u32,
    sock: u64,
) -> Result<bool, ReadError> {
    let Some(dev) = fill_flow_key(ev, skb, sock)? else {
        return Ok(false);
    };
    fill_device(ev, skb, dev);
    fill_rest(ev, kind, hook, skb, reason, dev);
    Ok(true)
}

/// What a flow's or a drop's key needs: the headers, the socket and the namespace; the
/// device's index and name are left to [`fill_device`] (a drop counted but not reported
/// never reads them). `None` when the skb is no UDP datagram; else the device (0: none).
#[inline(always)]
pub fn fill_flow_key<S: Fields>(
    ev: &mut SkbEvent,
    skb: S,
    sock: u64,
) -> Result<Option<u64>, ReadError> {
    if !read_udp_of(skb, ev)? {
        return Ok(None);
    }
    fill_where(ev, skb, sock).map(Some)
}

/// After [`read_udp`]: the socket, the device and the namespace (the device's when it has
/// one, else the socket's); the device (0: none).
#[inline(always)]
fn fill_where<S: Fields>(ev: &mut SkbEvent, skb: S, sock: u64) -> Result<u64, ReadError> {
    ev.ifname = [0; 16];
    ev.ifindex = 0;
    ev.netns = 0;
    // A queued UDP datagram reuses skb->dev as scratch space: with a known receiving
    // socket, take the namespace from the socket and leave the device out.
    let dev = if sock != 0 {
        ev.sk = sock;
        None
    } else {
        ev.sk = skb.read(offset!(skb_sk))?;
        skb.pointer(offset!(skb_dev))
    };
    // UDP reuses skb->dev as scratch space while a datagram sits in a socket queue (it is
    // dropped from there when the socket closes): a "device" that cannot be read (or reads
    // as namespace 0) is none.
    if let Some(dev) = dev.filter(|d| d.addr() != 0) {
        let netns = dev
            .pointer(offset!(dev_net))
            .and_then(|net| net.field::<u32>(offset!(net_inum)))
            .filter(|&n| n != 0);
        if let Some(netns) = netns {
            ev.netns = netns;
            return Ok(dev.addr());
        }
    }
    if ev.sk != 0 {
        let net: u64 = read_kernel(ev.sk, offset!(sk_net))?;
        ev.netns = read_kernel(net, offset!(net_inum))?;
    }
    Ok(0)
}

/// The device's index and name (`dev` from [`fill_flow_key`]; 0: none).
#[inline(always)]
pub fn fill_device<S: Fields>(ev: &mut SkbEvent, skb: S, dev: u64) {
    if let Some(dev) = skb.again(offset!(skb_dev), dev) {
        ev.ifindex = dev.field(offset!(dev_ifindex)).unwrap_or(0);
        ev.ifname = dev.field(offset!(dev_name)).unwrap_or([0; 16]);
    }
}

/// The rest of a hop about to be sent: when and where it happened, and the device's MTU
/// and kind (`dev` from [`fill_flow_key`]). Not spent on datagrams the sampling skips.
#[inline(always)]
pub fn fill_rest<S: Fields>(
    ev: &mut SkbEvent,
    kind: u16,
    hook: u16,
    skb: S,
    reason: u32,
    dev: u64,
) {
    ev.header = header(kind, hook);
    ev.skb = skb.addr();
    ev.reason = reason;
    // `read_udp` set the flags that describe the datagram.
    (ev.gso_size, ev.gso_segs) = gso(skb).unwrap_or((0, 0));
    ev.ifkind = [0; 16];
    ev.mtu = 0;
    if let Some(dev) = skb.again(offset!(skb_dev), dev) {
        ev.mtu = dev.field(offset!(dev_mtu)).unwrap_or(0);
        device_kind(dev, &mut ev.ifkind);
    }
    // Skb hops run in softirq or in an unrelated task: no process to name.
    ev.pid = 0;
    ev.tid = 0;
    ev.cgroup = 0;
    ev.comm = [0; 16];
}

/// A GSO (or GRO) skb's segment payload size and count, from its `skb_shared_info`
/// (`head + end` on 64-bit kernels, where `end` is an offset); `None` for a plain one.
#[inline(always)]
fn gso<S: Fields>(skb: S) -> Option<(u16, u16)> {
    let head: u64 = skb.field(offset!(skb_head))?;
    let end: u32 = skb.field(offset!(skb_end))?;
    let shinfo = head + u64::from(end);
    let size: u16 = try_read_kernel(shinfo, offset!(shinfo_gso_size))?;
    if size == 0 {
        return None;
    }
    let segs: u16 = try_read_kernel(shinfo, offset!(shinfo_gso_segs))?;
    Some((size, segs))
}

/// Sends one skb hop event for `skb` that a known socket `sk` (the receiver) holds.
#[inline(always)]
pub fn emit_for_sock(kind: u16, hook: u16, skb: u64, sk: u64) -> Result<(), ReadError> {
    emit_inner(kind, hook, Probed(skb), 0, sk)
}

/// Sends one skb hop event for `skb` if it carries a UDP datagram.
#[inline(always)]
pub fn emit(kind: u16, hook: u16, skb: u64, reason: u32) -> Result<(), ReadError> {
    if kind != KIND_DELIVER && peek::skb_left_out(skb) {
        return Ok(());
    }
    emit_inner(kind, hook, Probed(skb), reason, 0)
}

/// [`emit`] for a hop that has already taken the filter's first look at `skb`; a typed
/// (BTF) skb's fields, its device's and namespace's are plain loads.
#[inline(always)]
pub fn emit_peeked<S: Fields>(kind: u16, hook: u16, skb: S) -> Result<(), ReadError> {
    emit_inner(kind, hook, skb, 0, 0)
}

/// Whether this hop ends the datagram's way through this kernel (for the sampling).
#[inline(always)]
fn verdict<S: Fields>(kind: u16, skb: S) -> bool {
    match kind {
        KIND_DROP | KIND_DELIVER => true,
        KIND_XMIT => sampling::leaves_host(skb.field(offset!(skb_dev)).unwrap_or(0)),
        _ => false,
    }
}

/// `sk`, when not 0, replaces `skb->sk` (UDP does not set it on queued datagrams).
/// A datagram not sampled is reported only when dropped (flagged [`SKB_UNSAMPLED`]). The
/// caller has taken the filter's first look ([`peek`]): a datagram it leaves out from its
/// headers is decided in effect once per datagram without anything looked up or remembered
/// (not at the delivery, which never decides: the lookup alone settles it there).
#[inline(always)]
fn emit_inner<S: Fields>(
    kind: u16,
    hook: u16,
    skb: S,
    reason: u32,
    sk: u64,
) -> Result<(), ReadError> {
    if skb.addr() == 0 {
        return Ok(());
    }
    let decision = sampling::lookup(skb.addr());
    if kind == KIND_DELIVER && matches!(decision, Decision::Unknown) {
        // Nothing to report: see `prepare`.
        return Ok(());
    }
    let known = matches!(decision, Decision::Known(_));
    let mut decided = false;
    let result = emit_sampled(kind, hook, skb, reason, sk, decision, &mut decided);
    // What is remembered of the datagram (an earlier hop's decision, or this one's) goes
    // at its verdict; a datagram the filter left out left nothing to forget.
    if (known || decided) && verdict(kind, skb) {
        sampling::forget(skb.addr());
    }
    result
}

#[inline(always)]
fn emit_sampled<S: Fields>(
    kind: u16,
    hook: u16,
    skb: S,
    reason: u32,
    sk: u64,
    decision: Decision,
    decided: &mut bool,
) -> Result<(), ReadError> {
    if matches!(decision, Decision::Known(false)) && kind != KIND_DROP {
        return Ok(());
    }
    let Some(mut scratch) = Scratch::take() else {
        return Ok(());
    };
    let ev = scratch.event();
    if prepare(ev, kind, hook, skb, reason, sk, decision, decided)? {
        output(ev);
    }
    Ok(())
}

/// Fills `ev` with the hop of `skb` that a receiving socket `sk` is about to queue, for
/// [`output`] once the socket has it: the reader may take and free the skb the moment it is
/// queued, its headers and its sampling decision with it. Returns the decision's stamp for
/// [`sampling::forget_if`], or `None` when there is nothing to report.
#[inline(always)]
pub fn prepare_delivery(
    ev: &mut SkbEvent,
    hook: u16,
    skb: u64,
    sk: u64,
) -> Result<Option<u64>, ReadError> {
    let (decision, stamp) = sampling::lookup_stamped(skb);
    if matches!(decision, Decision::Known(false)) {
        // Its verdict: a decision not to trace, kept on this CPU, ends here (the skb may be
        // freed on the reader's CPU, where no hop could forget it; a later datagram given
        // the same address must not inherit it). A failed enqueue's drop finds none: it
        // was not traced either way.
        sampling::forget_if(skb, stamp);
        return Ok(None);
    }
    let mut decided = false;
    Ok(prepare(
        ev,
        KIND_DELIVER,
        hook,
        Probed(skb),
        0,
        sk,
        decision,
        &mut decided,
    )?
    .then_some(stamp))
}

/// Fills `ev` for the hop; true when it is to be sent. `decided`: set when this hop made
/// (and remembered) the datagram's decision.
#[expect(
    clippy::too_many_arguments,
    reason = "one call per hop kind, inlined: a struct would only move the fields"
)]
#[inline(always)]
fn prepare<S: Fields>(
    ev: &mut SkbEvent,
    kind: u16,
    hook: u16,
    skb: S,
    reason: u32,
    sk: u64,
    decision: Decision,
    decided: &mut bool,
) -> Result<bool, ReadError> {
    // A delivery never decides: every datagram met an earlier hop that did (the transmit
    // or the ingress), and the deliver hook may run after the reader has already taken and
    // freed the skb (its decision gone with it): deciding then would count the datagram
    // again, as the first of a flow, and report a path of its delivery alone. (Seen in the
    // 6.1 VM: one such path in 53 datagrams.)
    if matches!(decision, Decision::Unknown) && kind == KIND_DELIVER {
        return Ok(false);
    }
    if !read_udp_of(skb, ev)? {
        return Ok(false);
    }
    // Left out by the filter: the headers were all it cost.
    if matches!(decision, Decision::Unknown) && sampling::left_out(ev) {
        return Ok(false);
    }
    let dev = fill_where(ev, skb, sk)?;
    if sk != 0 && read_kernel::<u16>(sk, offset!(sk_num)).ok() != Some(ev.dst.port) {
        // The socket is not bound to this datagram's port: a stale pairing (an skb that
        // reached LOCAL_IN in a namespace we do not cover, say). Say nothing.
        return Ok(false);
    }
    let traced = match decision {
        Decision::All => true,
        Decision::Known(traced) => traced,
        Decision::Unknown => match sampling::decide_skb(skb.addr(), ev, None, ev.sk) {
            Some(traced) => {
                *decided = true;
                traced
            }
            // Left out by the filter: not even a drop is reported here.
            None => return Ok(false),
        },
    };
    if !traced {
        if kind != KIND_DROP {
            return Ok(false);
        }
        ev.flags |= SKB_UNSAMPLED;
    }
    fill_device(ev, skb, dev);
    fill_rest(ev, kind, hook, skb, reason, dev);
    ev.sk_ino = if sk != 0 {
        socket_inode(sk).unwrap_or(0)
    } else {
        0
    };
    if sk != 0 && ev.gso_size != 0 {
        ev.flags |= gro_flag(sk);
    }
    Ok(true)
}

/// Sends a filled hop event.
#[inline(always)]
pub fn output(ev: &SkbEvent) {
    if EVENTS.output::<SkbEvent>(ev, ring_flags()).is_err() {
        // Counted, not logged: a log call this deep takes the skb hops' combined stack past
        // 512 bytes on 6.1 (the send hop logs a full ring buffer).
        count(STAT_RINGBUF_FULL);
    }
}
