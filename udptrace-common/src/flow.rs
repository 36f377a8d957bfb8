//! Per-flow counters the kernel keeps for every UDP datagram sent and every one dropped,
//! whatever is sampled and whether or not path hooks are attached.

use crate::Addr;

/// A flow as its sender sees it: the sending socket's namespace, its own address (an unbound
/// socket's is the wildcard with the chosen port) and the destination the application named.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Inode of the sender's network namespace.
    pub netns: u32,
    pub _pad: u32,
    pub src: Addr,
    pub dst: Addr,
}
#[cfg(feature = "user")]
// SAFETY: #[repr(C)] of fixed-width integers and byte arrays with explicit padding:
// every bit pattern is a valid value.
unsafe impl aya::Pod for FlowKey {}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 56);

/// One CPU's counts for a flow (userspace sums the CPUs). No timestamp is taken per
/// datagram: userspace sees a flow active when its counts grow between two reads.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowStats {
    /// Datagrams sent as the wire carries them: a UDP GSO send of N segments counts N
    /// (with entry hooks, datagrams handed to UDP).
    pub packets: u64,
    /// Payload bytes of those datagrams.
    pub bytes: u64,
    /// Sends that failed (tracepoint hook only: entry hooks run before the result).
    pub errors: u64,
    /// Sends (skbs) that carried them: fewer than `packets` when the sender segments.
    pub sends: u64,
    /// CLOCK_MONOTONIC nanoseconds when this CPU first counted the flow.
    pub first_ns: u64,
}
#[cfg(feature = "user")]
// SAFETY: #[repr(C)] of fixed-width integers and byte arrays with explicit padding:
// every bit pattern is a valid value.
unsafe impl aya::Pod for FlowStats {}
const _: () = assert!(core::mem::size_of::<FlowStats>() == 40);

/// Default number of flows the kernel keeps (least recently used evicted first).
pub const FLOWS_DEFAULT: u32 = 65_536;

/// A drop as the kernel counts it: where (the namespace of the device or socket holding
/// the datagram), why (`enum skb_drop_reason` of this kernel) and the datagram's addresses
/// there.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DropKey {
    pub netns: u32,
    pub reason: u32,
    pub src: Addr,
    pub dst: Addr,
}
#[cfg(feature = "user")]
// SAFETY: #[repr(C)] of fixed-width integers and byte arrays with explicit padding:
// every bit pattern is a valid value.
unsafe impl aya::Pod for DropKey {}
const _: () = assert!(core::mem::size_of::<DropKey>() == 56);

/// One CPU's counts for a [`DropKey`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropStats {
    /// Datagrams dropped.
    pub packets: u64,
    /// Their UDP payload bytes.
    pub bytes: u64,
    /// Drops not reported as a hop event: the per-key limit held them back.
    pub held: u64,
    /// CLOCK_MONOTONIC ns of this CPU's last drop event for the key (0: none yet).
    pub reported_ns: u64,
}
#[cfg(feature = "user")]
// SAFETY: #[repr(C)] of fixed-width integers and byte arrays with explicit padding:
// every bit pattern is a valid value.
unsafe impl aya::Pod for DropStats {}
const _: () = assert!(core::mem::size_of::<DropStats>() == 32);

/// Drop keys the kernel keeps (least recently used evicted first).
pub const DROPS_MAX: u32 = 16_384;
/// A datagram dropped that no path is following is reported as a drop hop at most this
/// often per drop key and CPU; the others are counted (`DropStats::held`).
pub const DROP_EVENT_EVERY_NS: u64 = 1_000_000_000;

/// What is attached, for the programs to know (the `MODE` map, set by the loader).
/// The count hop counts every datagram sent: the send hop then counts only failed sends.
pub const MODE_COUNT_HOP: u32 = 1;
/// The path hooks are attached: a drop of a datagram being traced is always reported.
pub const MODE_PATHS: u32 = 2;
/// NAT is seen by netfilter links only where each way through a namespace ends
/// (POSTROUTING, LOCAL_IN): the drop hop reports the destination NAT of a datagram dropped
/// before it got there.
pub const MODE_NAT_LINKS: u32 = 4;
/// The NAT hop's link at LOCAL_IN, moved to the end of LOCAL_IN, also notes the skb about to
/// reach UDP for the deliver hop (whose own link is then not made): one program run per
/// datagram less.
pub const MODE_DELIVER_AT_NAT: u32 = 8;
