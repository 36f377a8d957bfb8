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

/// Which datagrams may be traced at all (`trace --port P --host H`), evaluated by the first
/// program that sees a datagram: one that does not match is not traced, costs no map update,
/// and every later hop returns early for it too (each evaluates the filter again on what it
/// sees; a NAT hop on the addresses before and after its rewrite, and a datagram matching
/// after one is traced from there on). All zeros: every datagram.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceFilter {
    /// `FILTER_PORT` | `FILTER_HOST`.
    pub flags: u32,
    /// A source or destination port (host order).
    pub port: u16,
    pub _pad: u16,
    /// A source or destination address (`family`, `ip`; the port is not used). An IPv4
    /// host also matches its IPv4-mapped IPv6 form.
    pub host: crate::Addr,
}
#[cfg(feature = "user")]
// SAFETY: #[repr(C)] of fixed-width integers and an `Addr` (itself Pod), padding explicit.
unsafe impl aya::Pod for TraceFilter {}
const _: () = assert!(core::mem::size_of::<TraceFilter>() == 32);

/// `TraceFilter::flags`: the port is set.
pub const FILTER_PORT: u32 = 1;
/// `TraceFilter::flags`: the host is set.
pub const FILTER_HOST: u32 = 1 << 1;

impl TraceFilter {
    /// Every datagram.
    pub const NONE: Self = Self {
        flags: 0,
        port: 0,
        _pad: 0,
        host: crate::Addr {
            family: 0,
            port: 0,
            _pad: 0,
            ip: [0; 16],
        },
    };

    pub fn is_none(&self) -> bool {
        self.flags == 0
    }

    /// Whether a datagram from `src` to `dst` matches (every condition set, each on either
    /// end).
    #[inline(always)]
    pub fn matches(&self, src: &crate::Addr, dst: &crate::Addr) -> bool {
        (self.flags & FILTER_PORT == 0 || src.port == self.port || dst.port == self.port)
            && (self.flags & FILTER_HOST == 0 || self.is_host(src) || self.is_host(dst))
    }

    /// [`Self::matches`] for a fragment after the first: it carries no ports, so only the
    /// host can leave it out (the assembled path is filtered again).
    #[inline(always)]
    pub fn matches_hosts(&self, src: &crate::Addr, dst: &crate::Addr) -> bool {
        self.flags & FILTER_HOST == 0 || self.is_host(src) || self.is_host(dst)
    }

    #[inline(always)]
    fn is_host(&self, a: &crate::Addr) -> bool {
        // Whole words, not byte arrays: compared in registers (a BPF program's stack has
        // no room for copies).
        let (h, x) = (words(&self.host.ip), words(&a.ip));
        if self.host.family == crate::AF_INET {
            match a.family {
                crate::AF_INET => x[0] == h[0],
                // ::ffff:a.b.c.d
                crate::AF_INET6 => {
                    x[0] == 0 && x[1] == 0 && x[2] == u32::from_be(0xffff) && x[3] == h[0]
                }
                _ => false,
            }
        } else {
            a.family == self.host.family && x == h
        }
    }
}

/// An address's 16 bytes as four words in memory order.
#[inline(always)]
fn words(ip: &[u8; 16]) -> [u32; 4] {
    let w = |i: usize| u32::from_ne_bytes([ip[i], ip[i + 1], ip[i + 2], ip[i + 3]]);
    [w(0), w(4), w(8), w(12)]
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Addr, AF_INET, AF_INET6};

    fn v4(a: [u8; 4], port: u16) -> Addr {
        let mut ip = [0; 16];
        ip[..4].copy_from_slice(&a);
        Addr {
            family: AF_INET,
            port,
            _pad: 0,
            ip,
        }
    }

    fn mapped(a: [u8; 4], port: u16) -> Addr {
        let mut ip = [0; 16];
        ip[10] = 0xff;
        ip[11] = 0xff;
        ip[12..].copy_from_slice(&a);
        Addr {
            family: AF_INET6,
            port,
            _pad: 0,
            ip,
        }
    }

    #[test]
    fn no_filter_matches_everything() {
        assert!(TraceFilter::NONE.matches(&v4([1, 2, 3, 4], 1), &Addr::default()));
    }

    #[test]
    fn port_and_host_match_either_end_and_both_must_hold() {
        let (a, b) = (v4([10, 0, 0, 1], 40000), v4([10, 0, 0, 2], 53));
        let port = |p| TraceFilter {
            flags: FILTER_PORT,
            port: p,
            ..TraceFilter::NONE
        };
        assert!(port(53).matches(&a, &b) && port(53).matches(&b, &a));
        assert!(!port(5353).matches(&a, &b));
        let host = |h: Addr| TraceFilter {
            flags: FILTER_HOST,
            host: h,
            ..TraceFilter::NONE
        };
        assert!(host(v4([10, 0, 0, 2], 0)).matches(&a, &b));
        assert!(!host(v4([10, 0, 0, 3], 0)).matches(&a, &b));
        // An IPv4 host is the same host as its IPv4-mapped form on an IPv6 socket.
        assert!(host(v4([10, 0, 0, 2], 0)).matches(&a, &mapped([10, 0, 0, 2], 53)));
        assert!(!host(v4([10, 0, 0, 2], 0)).matches(&a, &mapped([10, 0, 0, 9], 53)));
        let both = TraceFilter {
            flags: FILTER_PORT | FILTER_HOST,
            port: 53,
            host: v4([10, 0, 0, 1], 0),
            ..TraceFilter::NONE
        };
        assert!(both.matches(&a, &b));
        assert!(!both.matches(&a, &v4([10, 0, 0, 2], 54)));
        // A later fragment: no ports to check.
        assert!(both.matches_hosts(&v4([10, 0, 0, 1], 0), &v4([10, 0, 0, 2], 0)));
        assert!(!both.matches_hosts(&v4([10, 0, 0, 7], 0), &v4([10, 0, 0, 2], 0)));
    }
}
