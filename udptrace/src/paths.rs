//! Datagram paths: the hops one datagram took, in the shape of the JSON contract
//! (docs/json.md). The send hop starts a path; later hop families extend it.

use std::{net::SocketAddr, time::SystemTime};

use serde::{Serialize, Serializer};
use udptrace_common::{
    SendEvent, HOOK_FENTRY_UDPV6_SENDMSG, HOOK_FENTRY_UDP_SENDMSG, HOOK_KPROBE_UDPV6_SENDMSG,
    HOOK_KPROBE_UDP_SENDMSG, HOOK_TP_SOCK_SEND_LENGTH,
};

use crate::{
    clock::{rfc3339, Clock},
    events::{comm, socket_addr, Event},
};

/// The name of the hook that produced an event, as shown in `hook`.
pub fn hook_name(hook: u16) -> &'static str {
    match hook {
        HOOK_FENTRY_UDP_SENDMSG => "fentry:udp_sendmsg",
        HOOK_FENTRY_UDPV6_SENDMSG => "fentry:udpv6_sendmsg",
        HOOK_KPROBE_UDP_SENDMSG => "kprobe:udp_sendmsg",
        HOOK_KPROBE_UDPV6_SENDMSG => "kprobe:udpv6_sendmsg",
        HOOK_TP_SOCK_SEND_LENGTH => "tracepoint:sock:sock_send_length",
        _ => "unknown",
    }
}

fn ts<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&rfc3339(*t))
}

fn opt_addr<S: Serializer>(a: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
    match a {
        Some(a) => s.collect_str(a),
        None => s.serialize_none(),
    }
}

/// Source and destination at one point of a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Endpoints {
    #[serde(serialize_with = "opt_addr")]
    pub src: Option<SocketAddr>,
    #[serde(serialize_with = "opt_addr")]
    pub dst: Option<SocketAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// The contract also has "delivered", "dropped" and "left-host"; they arrive with the
    /// deliver, drop and xmit hops.
    Unknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HopKind {
    Send,
}

/// Who sent or received, on send and deliver hops.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Process {
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    pub uid: u32,
    pub cgroup: u64,
}

/// One hop of a datagram.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Hop {
    pub kind: HopKind,
    #[serde(serialize_with = "ts")]
    pub ts: SystemTime,
    pub hook: &'static str,
    pub netns: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ifname: Option<String>,
    #[serde(flatten)]
    pub addrs: Endpoints,
    /// Payload bytes.
    pub len: u32,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub process: Option<Process>,
    /// errno of a failed send (e.g. 1 when netfilter's OUTPUT chain dropped it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errno: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A datagram's path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Path {
    #[serde(rename = "type")]
    pub ty: &'static str,
    pub id: String,
    #[serde(serialize_with = "ts")]
    pub ts: SystemTime,
    pub complete: bool,
    pub orig: Endpoints,
    #[serde(rename = "final")]
    pub last: Endpoints,
    pub verdict: Verdict,
    pub hops: Vec<Hop>,
}

impl Path {
    /// Every address on the path (each hop's source and destination).
    pub fn addresses(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.hops
            .iter()
            .flat_map(|h| [h.addrs.src, h.addrs.dst])
            .flatten()
    }
}

/// The send hop of a [`SendEvent`].
pub fn send_hop(ev: &SendEvent, clock: &Clock) -> Hop {
    let (len, errno) = if ev.ret < 0 {
        (0, Some(-ev.ret))
    } else {
        (ev.ret as u32, None)
    };
    Hop {
        kind: HopKind::Send,
        ts: clock.wall(ev.header.ts_ns),
        hook: hook_name(ev.header.hook),
        netns: ev.netns,
        ifname: None,
        addrs: Endpoints {
            src: socket_addr(&ev.src),
            dst: socket_addr(&ev.dst),
        },
        len,
        process: Some(Process {
            pid: ev.pid,
            tid: ev.tid,
            comm: comm(&ev.comm),
            uid: ev.uid,
            cgroup: ev.cgroup,
        }),
        errno,
        error: errno.map(|e| {
            let msg = std::io::Error::from_raw_os_error(e).to_string();
            msg.split(" (os error").next().unwrap_or(&msg).to_string()
        }),
    }
}

/// Assembles events into paths. Only send hops exist so far, so every send starts and
/// ends its own path; the verdict stays `unknown` until later hops are observed.
#[derive(Debug, Default)]
pub struct Assembler {
    clock: Clock,
}

impl Assembler {
    pub fn new(clock: Clock) -> Self {
        Self { clock }
    }

    /// Feeds one event; returns the paths it finished.
    pub fn push(&mut self, event: &Event) -> Option<Path> {
        match event {
            Event::Send(ev) => {
                let hop = send_hop(ev, &self.clock);
                Some(Path {
                    ty: "path",
                    id: format!("{:x}-{:x}", ev.header.ts_ns, ev.tid),
                    ts: hop.ts,
                    complete: true,
                    orig: hop.addrs,
                    last: hop.addrs,
                    verdict: Verdict::Unknown,
                    hops: vec![hop],
                })
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Duration;

    use super::*;
    use crate::events::tests::sample_send;

    pub fn sample_path() -> Path {
        let clock = Clock::with_boot(SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000));
        Assembler::new(clock)
            .push(&Event::Send(sample_send()))
            .unwrap()
    }

    #[test]
    fn send_path_matches_the_json_contract() {
        let json: serde_json::Value = serde_json::to_value(sample_path()).unwrap();
        let expected = serde_json::json!({
            "type": "path",
            "id": "2a-65",
            "ts": "2027-01-15T08:00:00.000000042Z",
            "complete": true,
            "orig": {"src": "127.0.0.1:40112", "dst": "127.0.0.1:5353"},
            "final": {"src": "127.0.0.1:40112", "dst": "127.0.0.1:5353"},
            "verdict": "unknown",
            "hops": [{
                "kind": "send",
                "ts": "2027-01-15T08:00:00.000000042Z",
                "hook": "tracepoint:sock:sock_send_length",
                "netns": 4026531840u32,
                "src": "127.0.0.1:40112",
                "dst": "127.0.0.1:5353",
                "len": 3,
                "pid": 100,
                "tid": 101,
                "comm": "nc",
                "uid": 1000,
                "cgroup": 7
            }]
        });
        assert_eq!(json, expected);
    }

    #[test]
    fn failed_send_carries_errno_and_unknown_destination_is_null() {
        let mut ev = sample_send();
        ev.ret = -1;
        ev.dst = Default::default();
        let hop = send_hop(&ev, &Clock::new());
        let json = serde_json::to_value(&hop).unwrap();
        assert_eq!(json["len"], 0);
        assert_eq!(json["errno"], 1);
        assert_eq!(json["error"], "Operation not permitted");
        assert!(json["dst"].is_null());
    }

    #[test]
    fn hook_names() {
        assert_eq!(hook_name(HOOK_FENTRY_UDP_SENDMSG), "fentry:udp_sendmsg");
        assert_eq!(hook_name(HOOK_KPROBE_UDPV6_SENDMSG), "kprobe:udpv6_sendmsg");
        assert_eq!(hook_name(999), "unknown");
    }
}
