//! Per-flow counters the kernel keeps for every UDP datagram sent, whatever is sampled.

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

/// One CPU's counts for a flow (userspace sums the CPUs).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowStats {
    /// Datagrams sent (or, with entry hooks, handed to UDP).
    pub packets: u64,
    /// Payload bytes of those datagrams.
    pub bytes: u64,
    /// Sends that failed (tracepoint hook only: entry hooks run before the result).
    pub errors: u64,
    /// CLOCK_MONOTONIC nanoseconds of the first and last datagram on this CPU.
    pub first_ns: u64,
    pub last_ns: u64,
}
#[cfg(feature = "user")]
// SAFETY: #[repr(C)] of fixed-width integers and byte arrays with explicit padding:
// every bit pattern is a valid value.
unsafe impl aya::Pod for FlowStats {}
const _: () = assert!(core::mem::size_of::<FlowStats>() == 40);

/// Default number of flows the kernel keeps (least recently used evicted first).
pub const FLOWS_DEFAULT: u32 = 65_536;
