//! Ring buffer records → typed events: each record's length checked against its kind.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use udptrace_common::{
    Addr, EventHeader, NatEvent, RecvEvent, SendEvent, SkbEvent, AF_INET, AF_INET6, KIND_DELIVER,
    KIND_DROP, KIND_INGRESS, KIND_NAT, KIND_RECV, KIND_SEND, KIND_XMIT,
};

/// A decoded hop event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Send(SendEvent),
    /// xmit, ingress, drop or deliver (see `header.kind`).
    Skb(SkbEvent),
    Nat(NatEvent),
    /// A task reading a UDP socket.
    Recv(RecvEvent),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {0} bytes is shorter than an event header")]
    Short(usize),
    #[error("record of kind {kind} has {len} bytes, expected {expected}")]
    Size {
        kind: u16,
        len: usize,
        expected: usize,
    },
    #[error("unknown event kind {0}")]
    Kind(u16),
}

/// Reads a `T` from the start of `bytes` after checking its length.
fn read<T: aya::Pod>(kind: u16, bytes: &[u8]) -> Result<T, DecodeError> {
    let expected = size_of::<T>();
    if bytes.len() != expected {
        return Err(DecodeError::Size {
            kind,
            len: bytes.len(),
            expected,
        });
    }
    // SAFETY: T is Pod (any bit pattern is valid) and the length was checked.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

impl Event {
    /// Decodes one ring buffer record.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() < size_of::<EventHeader>() {
            return Err(DecodeError::Short(bytes.len()));
        }
        let kind = u16::from_ne_bytes([bytes[0], bytes[1]]);
        match kind {
            KIND_SEND => read(kind, bytes).map(Event::Send),
            KIND_XMIT | KIND_DROP | KIND_DELIVER | KIND_INGRESS => {
                read(kind, bytes).map(Event::Skb)
            }
            KIND_NAT => read(kind, bytes).map(Event::Nat),
            KIND_RECV => read(kind, bytes).map(Event::Recv),
            other => Err(DecodeError::Kind(other)),
        }
    }
}

/// An address with port from an event, `None` for an unknown family.
pub fn socket_addr(a: &Addr) -> Option<SocketAddr> {
    let ip = match a.family {
        AF_INET => IpAddr::V4(Ipv4Addr::new(a.ip[0], a.ip[1], a.ip[2], a.ip[3])),
        AF_INET6 => IpAddr::V6(Ipv6Addr::from(a.ip)),
        _ => return None,
    };
    Some(SocketAddr::new(ip, a.port))
}

/// The process name in a fixed-size, NUL-padded kernel buffer.
pub fn comm(raw: &[u8; 16]) -> String {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

#[cfg(test)]
pub(crate) mod tests {
    use udptrace_common::Hook;

    use super::*;

    fn as_bytes<T: aya::Pod>(v: &T) -> Vec<u8> {
        // SAFETY: Pod types have no padding bytes with undefined contents in our layouts
        // (all padding is explicit) and may be viewed as bytes.
        unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
    }

    pub fn sample_send() -> SendEvent {
        let mut comm = [0u8; 16];
        comm[..2].copy_from_slice(b"nc");
        SendEvent {
            header: EventHeader {
                kind: KIND_SEND,
                hook: Hook::TpSockSendLength as u16,
                cpu: 1,
                ts_ns: 42,
            },
            sock: 0xffff_8880_1234_5678,
            cgroup: 7,
            pid: 100,
            tid: 101,
            uid: 1000,
            gid: 1000,
            netns: 4026531840,
            ret: 3,
            flags: 0,
            _pad: 0,
            comm,
            name: comm,
            src: Addr {
                family: AF_INET,
                port: 40112,
                _pad: 0,
                ip: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            },
            dst: Addr {
                family: AF_INET,
                port: 5353,
                _pad: 0,
                ip: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            },
        }
    }

    pub fn sample_skb(kind: u16) -> SkbEvent {
        let mut ifname = [0u8; 16];
        ifname[..4].copy_from_slice(b"ut-b");
        let mut ifkind = [0u8; 16];
        ifkind[..4].copy_from_slice(b"veth");
        SkbEvent {
            header: EventHeader {
                kind,
                hook: Hook::TpKfreeSkb as u16,
                cpu: 0,
                ts_ns: 50,
            },
            skb: 0xffff_8880_0000_1000,
            sk: 0,
            netns: 4026532000,
            ifindex: 2,
            reason: 3,
            len: 3,
            ip_id: 0x1234,
            udp_csum: 0xabcd,
            ifname,
            ifkind,
            mtu: 1500,
            src: sample_send().src,
            dst: sample_send().dst,
            ..SkbEvent::default()
        }
    }

    #[test]
    fn skb_events_decode_by_kind() {
        for kind in [KIND_XMIT, KIND_DROP, KIND_DELIVER, KIND_INGRESS] {
            let ev = sample_skb(kind);
            assert_eq!(Event::decode(&as_bytes(&ev)), Ok(Event::Skb(ev)));
        }
        let mut bytes = as_bytes(&sample_skb(KIND_XMIT));
        bytes.truncate(128);
        assert!(matches!(
            Event::decode(&bytes),
            Err(DecodeError::Size { expected: 240, .. })
        ));
    }

    #[test]
    fn send_event_round_trips_through_bytes() {
        let ev = sample_send();
        let bytes = as_bytes(&ev);
        assert_eq!(bytes.len(), 144);
        assert_eq!(Event::decode(&bytes), Ok(Event::Send(ev)));
    }

    #[test]
    fn every_shared_type_round_trips() {
        fn round_trip<T: aya::Pod + PartialEq + std::fmt::Debug>(v: T) {
            assert_eq!(read::<T>(0, &as_bytes(&v)).unwrap(), v);
        }
        round_trip(sample_send());
        round_trip(sample_send().src);
        round_trip(sample_send().header);
        round_trip(udptrace_common::PendingSend {
            dst: sample_send().dst,
            sk: 0xffff_8880_0000_1000,
            mmsg: 0x7fff_0000,
            vlen: 4,
            idx: 2,
        });
        round_trip(udptrace_common::Offsets::MISSING);
        round_trip(sample_skb(KIND_DROP));
    }

    #[test]
    fn malformed_records_are_errors() {
        assert_eq!(Event::decode(&[1, 0, 0]), Err(DecodeError::Short(3)));
        let mut bytes = as_bytes(&sample_send());
        bytes.truncate(100);
        assert_eq!(
            Event::decode(&bytes),
            Err(DecodeError::Size {
                kind: KIND_SEND,
                len: 100,
                expected: 144
            })
        );
        let mut bytes = as_bytes(&sample_send());
        bytes[0] = 99;
        assert_eq!(Event::decode(&bytes), Err(DecodeError::Kind(99)));
    }

    #[test]
    fn addresses_and_comm() {
        let ev = sample_send();
        assert_eq!(socket_addr(&ev.dst).unwrap().to_string(), "127.0.0.1:5353");
        let mut v6 = ev.dst;
        v6.family = AF_INET6;
        v6.ip = "fd00::1".parse::<Ipv6Addr>().unwrap().octets();
        assert_eq!(socket_addr(&v6).unwrap().to_string(), "[fd00::1]:5353");
        assert_eq!(socket_addr(&Addr::default()), None);
        assert_eq!(comm(&ev.comm), "nc");
        assert_eq!(comm(b"0123456789abcdef"), "0123456789abcdef");
    }
}
