//! Types shared by the kernel programs (`udptrace-ebpf`) and the agent (`udptrace`).
//!
//! Everything here is `#[repr(C)]`, made of fixed-width integers and byte arrays only,
//! with explicit padding, so both sides agree on every byte. Layouts are guarded at
//! compile time; the agent's unit tests round-trip every event through bytes.
#![no_std]

pub mod event;
pub mod flow;
pub mod hook;
pub mod offsets;
pub mod sample;

pub use event::*;
pub use flow::*;
pub use hook::{programs, Hook};
pub use offsets::*;
pub use sample::*;

/// Names of the maps and globals in the eBPF object (the eBPF side's `#[map(name = ...)]`
/// must spell them alike: a loader test checks the built object).
pub mod names {
    /// Ring buffer carrying hop events to userspace.
    pub const EVENTS: &str = "EVENTS";
    /// Per-CPU counters indexed by the `STAT_*` constants.
    pub const STATS: &str = "STATS";
    /// In-flight send syscalls keyed by pid_tgid (destination of unconnected sends).
    pub const PENDING_SENDS: &str = "PENDING_SENDS";
    /// Read-only global holding [`crate::Offsets`], set at load time from BTF and tracefs.
    pub const OFFSETS: &str = "OFFSETS";
    /// Per-CPU, per-netfilter-hook tuple seen just before NAT.
    pub const NAT_BEFORE: &str = "NAT_BEFORE";
    /// Per-CPU skb that last passed the end of LOCAL_IN (about to reach its socket).
    pub const LOCAL_IN_SKB: &str = "LOCAL_IN_SKB";
    /// Per-CPU LRU hash of [`crate::FlowKey`] → [`crate::FlowStats`].
    pub const FLOWS: &str = "FLOWS";
    /// One [`crate::SampleConfig`]: which datagrams get their hops reported (runtime-settable).
    pub const SAMPLING: &str = "SAMPLING";
    /// Per-CPU LRU hash of [`crate::DropKey`] → [`crate::DropStats`].
    pub const DROPS: &str = "DROPS";
    /// One u32 of `MODE_*` flags: what is attached (runtime-settable).
    pub const MODE: &str = "MODE";
    /// One [`crate::TraceFilter`]: which datagrams may be traced at all (runtime-settable).
    pub const TRACE_FILTER: &str = "TRACE_FILTER";

    /// Sampling's memory: datagrams seen per flow, decisions by skb and by socket, NAT
    /// rewrites and readers already reported.
    pub const SAMPLE_COUNT: &str = "SAMPLE_COUNT";
    pub const SAMPLE_SKBS: &str = "SAMPLE_SKBS";
    pub const SAMPLE_SOCKS: &str = "SAMPLE_SOCKS";
    pub const SAMPLE_NAT: &str = "SAMPLE_NAT";
    pub const SAMPLE_READERS: &str = "SAMPLE_READERS";
    /// Per CPU: the last datagrams decided not to be traced (a cursor, eight skb addresses,
    /// their decisions' values: 17 u64s).
    pub const SKB_UNTRACED: &str = "SKB_UNTRACED";
    /// Per CPU: sockets whose datagram the skb hops decided not to trace (a cursor and four
    /// socket addresses: 5 u64s), until the send hop takes the decision.
    pub const SOCK_UNTRACED: &str = "SOCK_UNTRACED";

    /// aya-log's read-only global: which log levels the kernel programs' code keeps.
    pub const AYA_LOG_LEVEL: &str = "AYA_LOG_LEVEL";
    /// Read-only global: non-zero makes the always-on programs return at once (the
    /// bench's floor run, `UDPTRACE_EMPTY_BODIES=1`).
    pub const EMPTY_BODIES: &str = "EMPTY_BODIES";

    /// Every map the agent opens by name.
    pub const ALL: [&str; 14] = [
        EVENTS,
        STATS,
        FLOWS,
        SAMPLING,
        DROPS,
        MODE,
        TRACE_FILTER,
        SAMPLE_COUNT,
        SAMPLE_SKBS,
        SAMPLE_SOCKS,
        SAMPLE_NAT,
        SAMPLE_READERS,
        SKB_UNTRACED,
        SOCK_UNTRACED,
    ];
}

/// Size of the event ring buffer in bytes (a power of two, a multiple of the page size).
pub const EVENTS_BYTES: u32 = 1 << 20;
/// Bytes waiting in the event ring before a hop event wakes its reader (with path hooks
/// attached; the reader also drains the ring on its tick, every 50 ms then). An eighth of the
/// ring: ~3 ms of a 50 000 datagrams/s full trace, the other seven eighths room to spare.
pub const EVENTS_WAKE_BYTES: u32 = EVENTS_BYTES / 8;
/// Maximum number of concurrently pending send syscalls tracked.
pub const PENDING_SENDS_MAX: u32 = 16384;

/// Per-CPU counters in the `STATS` map.
/// A ring-buffer reservation failed: an event was lost.
pub const STAT_RINGBUF_FULL: u32 = 0;
/// A kernel memory read failed while building an event.
pub const STAT_READ_ERROR: u32 = 1;
/// The pending-send table refused an insert.
pub const STAT_PENDING_FULL: u32 = 2;
/// A read of the sending application's memory failed (a page not resident, say): that
/// send's destination is taken from its socket.
pub const STAT_USER_READ_ERROR: u32 = 3;
/// A flow not in `FLOWS` was added (with the map's size, says how many were evicted).
pub const STAT_FLOW_NEW: u32 = 4;
/// Adding a flow to `FLOWS` failed.
pub const STAT_FLOW_FULL: u32 = 5;
/// First of the NAT rewrite counters: `STAT_NAT_BASE + 2 * nf_hook + (1 if DNAT else 0)`,
/// counted for every rewrite whatever is sampled.
pub const STAT_NAT_BASE: u32 = 6;
/// Number of counters in `STATS`.
pub const STATS_LEN: u32 = STAT_NAT_BASE + 2 * event::NF_INET_NUMHOOKS;

/// Address families as the kernel numbers them.
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
/// IP protocol number of UDP.
pub const IPPROTO_UDP: u16 = 17;
