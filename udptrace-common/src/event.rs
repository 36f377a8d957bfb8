//! Hop events as they travel through the ring buffer.

/// Event kinds (`EventHeader::kind`).
pub const KIND_SEND: u16 = 1;
/// A device transmitted the datagram ([`SkbEvent`]).
pub const KIND_XMIT: u16 = 2;
/// The kernel freed the datagram with a drop reason ([`SkbEvent`]).
pub const KIND_DROP: u16 = 3;
/// A receiving socket queued the datagram ([`SkbEvent`], `sk` is the receiving socket).
pub const KIND_DELIVER: u16 = 4;
/// Netfilter NAT rewrote the datagram's addresses ([`NatEvent`]).
pub const KIND_NAT: u16 = 5;
/// An application reads (or waits to read) from a UDP socket ([`RecvEvent`]).
pub const KIND_RECV: u16 = 6;
/// tc ingress saw the datagram arrive on a device ([`SkbEvent`]).
pub const KIND_INGRESS: u16 = 7;

/// `SendEvent::flags`: the destination came from the syscall's address argument
/// (an unconnected send), not from the socket.
pub const SEND_DST_FROM_CALL: u32 = 1 << 0;
/// `SendEvent::flags`: the socket was connected (it has a peer address).
pub const SEND_CONNECTED: u32 = 1 << 1;

/// An IPv4 or IPv6 address with a port. IPv4 uses the first 4 bytes of `ip`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Addr {
    /// `AF_INET`, `AF_INET6`, or 0 when unknown.
    pub family: u16,
    /// Port in host byte order.
    pub port: u16,
    pub _pad: u32,
    /// Address bytes in network order.
    pub ip: [u8; 16],
}
#[cfg(feature = "user")]
// SAFETY: #[repr(C)] of fixed-width integers and byte arrays with explicit padding:
// every bit pattern is a valid value.
unsafe impl aya::Pod for Addr {}
const _: () = assert!(core::mem::size_of::<Addr>() == 24);

/// First bytes of every event: what it is, where it came from, when.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHeader {
    pub kind: u16,
    /// The [`crate::Hook`] that produced it, as `u16`.
    pub hook: u16,
    pub cpu: u32,
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
}
#[cfg(feature = "user")]
// SAFETY: #[repr(C)] of fixed-width integers and byte arrays with explicit padding:
// every bit pattern is a valid value.
unsafe impl aya::Pod for EventHeader {}
const _: () = assert!(core::mem::size_of::<EventHeader>() == 16);

/// A datagram handed to UDP by a sending socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SendEvent {
    pub header: EventHeader,
    /// Kernel address of the `struct sock`.
    pub sock: u64,
    /// cgroup v2 id of the sending task.
    pub cgroup: u64,
    /// Thread group id (the user-visible pid).
    pub pid: u32,
    /// Thread id.
    pub tid: u32,
    pub uid: u32,
    pub gid: u32,
    /// Inode number of the socket's network namespace.
    pub netns: u32,
    /// Bytes sent (or requested, for entry hooks); a negative errno when the send failed.
    pub ret: i32,
    /// `SEND_*` flags.
    pub flags: u32,
    pub _pad: u32,
    /// The sending thread's name.
    pub comm: [u8; 16],
    /// The process's name: its thread-group leader's `comm` (the thread's own where the
    /// kernel's layout is unknown).
    pub name: [u8; 16],
    /// Source as the socket has it (an unbound address is all zeros).
    pub src: Addr,
    /// Destination as the application gave it.
    pub dst: Addr,
}
#[cfg(feature = "user")]
// SAFETY: #[repr(C)] of fixed-width integers and byte arrays with explicit padding:
// every bit pattern is a valid value.
unsafe impl aya::Pod for SendEvent {}
const _: () = assert!(core::mem::size_of::<SendEvent>() == 144);

/// An in-flight send, remembered per thread between where its destination is seen (the
/// syscall's entry, or the cgroup `sendmsg` hook inside UDP) and the socket layer's report.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingSend {
    /// Destination from `sendto`/`sendmsg`, family 0 when the call named none.
    pub dst: Addr,
    /// The sending socket when the cgroup hook saw it (the destination is for its next
    /// send only), else 0 (any socket the syscall sends on).
    pub sk: u64,
    /// User pointer to the `struct mmsghdr` vector of a `sendmmsg`, else 0.
    pub mmsg: u64,
    /// Entries in `mmsg`.
    pub vlen: u32,
    /// Index of the next `mmsg` entry the socket layer will send.
    pub idx: u32,
}
#[cfg(feature = "user")]
// SAFETY: #[repr(C)] of fixed-width integers and byte arrays with explicit padding:
// every bit pattern is a valid value.
unsafe impl aya::Pod for PendingSend {}
const _: () = assert!(core::mem::size_of::<PendingSend>() == 48);

/// A datagram seen through its `struct sk_buff`: transmitted, dropped or delivered.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SkbEvent {
    pub header: EventHeader,
    /// Kernel address of the `struct sk_buff`: the datagram's identity inside one kernel.
    pub skb: u64,
    /// The socket owning the skb (the sender's on the way out, the receiver's once queued).
    pub sk: u64,
    /// A task to name, for a hook that runs in the receiver's context; the current skb hooks
    /// run in softirq or an unrelated task and leave these 0 (the reader comes from
    /// [`RecvEvent`] or the socket's holder).
    pub cgroup: u64,
    pub pid: u32,
    pub tid: u32,
    /// Network namespace of the device (or of the socket when there is no device).
    pub netns: u32,
    pub ifindex: u32,
    /// Drop reason number (this kernel's `enum skb_drop_reason`), else 0.
    pub reason: u32,
    /// UDP payload bytes (UDP length minus its header).
    pub len: u32,
    /// IPv4 identification (0 for IPv6) and UDP checksum, as on the wire: with the inner
    /// tuple they identify a datagram across nodes without touching it.
    pub ip_id: u16,
    pub udp_csum: u16,
    /// `TUNNEL_*`: the datagram travels encapsulated here; `src`/`dst` are then the inner
    /// addresses and `outer_*` the tunnel's.
    pub tunnel: u16,
    /// The IP fragment field in host order, `IP_DF | IP_MF | offset in 8-byte units`, as
    /// IPv4 has it (IPv6: from a fragment header, without DF). A non-first fragment has
    /// no UDP header: its ports are 0 and `len` is its share of the payload.
    pub ip_frag: u16,
    pub ifname: [u8; 16],
    pub comm: [u8; 16],
    pub src: Addr,
    pub dst: Addr,
    /// VXLAN/Geneve network identifier when `tunnel` is set.
    pub vni: u32,
    /// The device's MTU (0 without a device).
    pub mtu: u32,
    pub outer_src: Addr,
    /// The tunnel's destination; without a tunnel, on a drop flagged [`SKB_DNAT_BEFORE`],
    /// the destination before NAT.
    pub outer_dst: Addr,
    /// Inode of the receiving socket (deliver only; 0 when unknown): userspace finds the
    /// process holding it, as `ss -p` does, when no reader was seen.
    pub sk_ino: u64,
    /// The device's rtnetlink kind (`veth`, `bridge`, `vxlan`, `tun`, ...); empty for a
    /// device without one (physical NICs, loopback).
    pub ifkind: [u8; 16],
    /// `SKB_*` flags.
    pub flags: u32,
    /// A UDP GSO (or GRO) skb: the payload bytes of each datagram it stands for, and how
    /// many (`skb_shared_info.gso_size`/`gso_segs`); 0 for a plain datagram.
    pub gso_size: u16,
    pub gso_segs: u16,
}
#[cfg(feature = "user")]
// SAFETY: #[repr(C)] of fixed-width integers and byte arrays with explicit padding:
// every bit pattern is a valid value.
unsafe impl aya::Pod for SkbEvent {}
const _: () = assert!(core::mem::size_of::<SkbEvent>() == 240);

/// `SkbEvent::flags`: the datagram was not sampled; this hop is reported anyway (a drop, a
/// new NAT rewrite) and the hops before it were not recorded.
pub const SKB_UNSAMPLED: u32 = 1 << 0;
/// `SkbEvent::flags`: the UDP header's length is shorter than a UDP header or longer than
/// the IP header says follows it (the kernel drops such a datagram as too small).
pub const SKB_MALFORMED: u32 = 1 << 1;
/// `SkbEvent::flags`, on a drop: the datagram had its destination rewritten by NAT in this
/// namespace (from `outer_dst`, unused without a tunnel) where no NAT hop saw it: dropped
/// before the NAT hop's link. The path shows that rewrite before the drop.
pub const SKB_DNAT_BEFORE: u32 = 1 << 2;
/// With [`SKB_DNAT_BEFORE`]: the rewrite was at output (a local socket's datagram), not at
/// prerouting.
pub const SKB_DNAT_AT_OUTPUT: u32 = 1 << 3;

/// `SkbEvent::flags`, on a delivery of a GSO/GRO skb: the receiving socket has `UDP_GRO` on
/// and reads the datagrams as one buffer.
pub const SKB_SOCK_GRO: u32 = 1 << 4;
/// `SkbEvent::flags`, on a delivery of a GSO/GRO skb: the receiving socket has `UDP_GRO` off
/// and reads the datagrams one by one (the kernel segments the skb for it).
pub const SKB_SOCK_NO_GRO: u32 = 1 << 5;

/// `SkbEvent::ip_frag`: don't fragment (IPv4).
pub const IP_DF: u16 = 0x4000;
/// `SkbEvent::ip_frag`: more fragments follow.
pub const IP_MF: u16 = 0x2000;
/// `SkbEvent::ip_frag`: the fragment's offset in 8-byte units.
pub const IP_OFFSET: u16 = 0x1fff;

/// `SkbEvent::tunnel`: not encapsulated.
pub const TUNNEL_NONE: u16 = 0;
/// VXLAN (UDP 4789, and 8472 as Flannel uses it).
pub const TUNNEL_VXLAN: u16 = 1;
/// Geneve (UDP 6081).
pub const TUNNEL_GENEVE: u16 = 2;

/// Netfilter hook numbers (`enum nf_inet_hooks`, UAPI).
pub const NF_INET_PRE_ROUTING: u32 = 0;
pub const NF_INET_LOCAL_IN: u32 = 1;
pub const NF_INET_FORWARD: u32 = 2;
pub const NF_INET_LOCAL_OUT: u32 = 3;
pub const NF_INET_POST_ROUTING: u32 = 4;
/// Entries in per-hook tables.
pub const NF_INET_NUMHOOKS: u32 = 5;

/// A NAT rewrite: the datagram's tuple just before and just after NAT at one netfilter hook.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatEvent {
    /// The datagram after the rewrite (`src`/`dst` are the new addresses).
    pub skb: SkbEvent,
    pub before_src: Addr,
    pub before_dst: Addr,
    /// `NF_INET_*`.
    pub nf_hook: u32,
    /// 0, or `NF_INET_*` + 1: the event holds two rewrites, the destination's at that hook
    /// first (from `before_*` to the destination after, the source still `before_src`),
    /// then the source's at `nf_hook`. One link where a namespace's way ends sees both.
    pub dnat_first_at: u32,
    /// The conntrack entry's original and reply tuples (family 0 when unknown).
    pub ct_orig_src: Addr,
    pub ct_orig_dst: Addr,
    pub ct_reply_src: Addr,
    pub ct_reply_dst: Addr,
}
#[cfg(feature = "user")]
// SAFETY: #[repr(C)] of fixed-width integers and byte arrays with explicit padding:
// every bit pattern is a valid value.
unsafe impl aya::Pod for NatEvent {}
const _: () = assert!(core::mem::size_of::<NatEvent>() == 392);

/// A task reading from a UDP socket: who receives what is queued on `sk`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecvEvent {
    pub header: EventHeader,
    pub sk: u64,
    pub cgroup: u64,
    pub pid: u32,
    pub tid: u32,
    pub uid: u32,
    pub _pad: u32,
    /// The reading thread's name.
    pub comm: [u8; 16],
    /// The process's name, as in [`SendEvent::name`].
    pub name: [u8; 16],
}
#[cfg(feature = "user")]
// SAFETY: #[repr(C)] of fixed-width integers and byte arrays with explicit padding:
// every bit pattern is a valid value.
unsafe impl aya::Pod for RecvEvent {}
const _: () = assert!(core::mem::size_of::<RecvEvent>() == 80);
