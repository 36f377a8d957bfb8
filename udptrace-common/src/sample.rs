//! Sampling of detailed path events. Every datagram is counted per flow whatever is
//! sampled; sampling decides which datagrams get their hops reported. The decision is made
//! once per datagram, at the first hop that sees it, and every later hop follows it.

/// Which datagrams are traced hop by hop: the first `first` of each flow, then 1 in `every`.
/// Drops and new NAT rewrites are reported whatever was decided. `every` ≤ 1 traces every
/// datagram (and the programs skip the bookkeeping).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SampleConfig {
    pub first: u32,
    pub every: u32,
}
#[cfg(feature = "user")]
// SAFETY: #[repr(C)] of fixed-width integers and byte arrays with explicit padding:
// every bit pattern is a valid value.
unsafe impl aya::Pod for SampleConfig {}
const _: () = assert!(core::mem::size_of::<SampleConfig>() == 8);

impl SampleConfig {
    /// Every datagram traced.
    pub const ALL: Self = Self { first: 0, every: 1 };
    /// No datagram newly traced (those already decided go on): how a path window closes
    /// without cutting the paths in flight.
    pub const NONE: Self = Self {
        first: 0,
        every: u32::MAX,
    };

    pub fn is_all(&self) -> bool {
        self.every <= 1
    }

    /// Whether the `n`th datagram (from 0) of a flow is traced.
    pub fn traces(&self, n: u64) -> bool {
        if self.every == u32::MAX {
            return false;
        }
        self.every <= 1 || n < u64::from(self.first) || n.is_multiple_of(u64::from(self.every))
    }
}

/// The sampling decision for a sending socket's current datagram, so its send hop and its
/// skb hops agree whichever the kernel runs first.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockDecision {
    /// 1 when traced.
    pub traced: u32,
    /// `SIDE_*`: which hop decided.
    pub side: u32,
}
#[cfg(feature = "user")]
// SAFETY: #[repr(C)] of fixed-width integers and byte arrays with explicit padding:
// every bit pattern is a valid value.
unsafe impl aya::Pod for SockDecision {}

/// `SockDecision::side`: the send hop decided (entry hooks run before the skb exists).
pub const SIDE_SEND: u32 = 1;
/// `SockDecision::side`: an skb hop decided (the send tracepoint runs after them).
pub const SIDE_SKB: u32 = 2;

/// A NAT rewrite as the sampling remembers it: hook and namespace, the tuple before.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatSeenKey {
    pub nf_hook: u32,
    pub netns: u32,
    pub src: crate::Addr,
    pub dst: crate::Addr,
}

/// The tuple after the rewrite.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatSeen {
    pub src: crate::Addr,
    pub dst: crate::Addr,
}

/// A reader of a socket, as the sampling rate-limits reader reports.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReaderKey {
    pub sk: u64,
    pub pid_tgid: u64,
}

#[cfg(feature = "user")]
// SAFETY: #[repr(C)] of fixed-width integers and `Addr`s (themselves Pod), no padding.
unsafe impl aya::Pod for NatSeenKey {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for NatSeen {}
#[cfg(feature = "user")]
// SAFETY: two u64s.
unsafe impl aya::Pod for ReaderKey {}

/// Flows whose datagrams are counted for sampling (an evicted flow starts again at 0:
/// its next datagrams count as first ones).
pub const SAMPLE_FLOWS_MAX: u32 = 32_768;
/// Datagrams in flight whose decision is remembered by skb (forgotten when freed).
pub const SAMPLE_SKBS_MAX: u32 = 65_536;
/// Sockets whose current decision is remembered.
pub const SAMPLE_SOCKS_MAX: u32 = 16_384;
/// Distinct NAT rewrites remembered.
pub const SAMPLE_NAT_MAX: u32 = 16_384;
/// Readers remembered for rate limiting.
pub const SAMPLE_READERS_MAX: u32 = 4_096;
/// With sampling on, a socket's reader is reported at most this often.
pub const READER_EVERY_NS: u64 = 1_000_000_000;
