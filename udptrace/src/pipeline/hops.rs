//! Hop events to hops: one decoder per event type, the only place that turns kernel
//! records' numbers into the contract's words.

use udptrace_common::{
    Addr, Hook, NatEvent, SendEvent, SkbEvent, AF_INET, IP_DF, IP_MF, IP_OFFSET, KIND_DROP,
    KIND_INGRESS, KIND_XMIT, NF_INET_LOCAL_OUT, NF_INET_PRE_ROUTING, SKB_DNAT_AT_OUTPUT,
    SKB_DNAT_BEFORE, SKB_MALFORMED, SKB_SOCK_GRO, SKB_SOCK_NO_GRO, TUNNEL_GENEVE, TUNNEL_VXLAN,
};

use crate::{
    clock::Clock,
    kernel::drop_reasons::DropReasons,
    model::{
        Conntrack, Endpoints, Fragment, Gso, Hop, HopKind, Nat, NatKind, NfHook, Process, Tunnel,
        TunnelKind,
    },
    pipeline::events::{comm, socket_addr},
};

/// The send hop of a [`SendEvent`].
pub fn send_hop(ev: &SendEvent, clock: &Clock) -> Hop {
    let (len, errno) = if ev.ret < 0 {
        // A kernel errno is small; a corrupted record may hold anything, i32::MIN included.
        (0, Some(ev.ret.saturating_neg()))
    } else {
        (ev.ret as u32, None)
    };
    Hop {
        kind: HopKind::Send,
        ts: clock.wall(ev.header.ts_ns),
        hook: Hook::from_u16(ev.header.hook),
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
            name: comm(&ev.name),
            uid: Some(ev.uid),
            cgroup: ev.cgroup,
        }),
        errno,
        error: errno.map(|e| {
            let msg = std::io::Error::from_raw_os_error(e).to_string();
            msg.split(" (os error").next().unwrap_or(&msg).to_string()
        }),
        reason: None,
        nat: None,
        tunnel: None,
        fragment: None,
        gso: None,
        df: false,
        ip_id: None,
        malformed: false,
        sock_ino: 0,
        k8s: None,
        node: None,
        ifkind: None,
        mtu: None,
    }
}

/// The xmit, ingress, drop or deliver hop of an [`SkbEvent`].
pub fn skb_hop(ev: &SkbEvent, clock: &Clock, reasons: &DropReasons) -> Hop {
    let tunnel = tunnel(ev);
    let kind = match ev.header.kind {
        KIND_XMIT if tunnel.is_some() => HopKind::Encap,
        KIND_XMIT => HopKind::Xmit,
        KIND_INGRESS => HopKind::Ingress,
        KIND_DROP => HopKind::Drop,
        _ => HopKind::Deliver,
    };
    let ifname = comm(&ev.ifname);
    let ifkind = comm(&ev.ifkind);
    let has_dev = !ifname.is_empty();
    Hop {
        kind,
        ts: clock.wall(ev.header.ts_ns),
        hook: Hook::from_u16(ev.header.hook),
        netns: ev.netns,
        ifname: has_dev.then_some(ifname),
        ifkind: (!ifkind.is_empty()).then_some(ifkind),
        mtu: (has_dev && ev.mtu != 0).then_some(ev.mtu),
        addrs: Endpoints {
            src: socket_addr(&ev.src),
            dst: socket_addr(&ev.dst),
        },
        len: ev.len,
        process: (kind == HopKind::Deliver && ev.pid != 0).then(|| Process {
            pid: ev.pid,
            tid: ev.tid,
            comm: comm(&ev.comm),
            name: String::new(),
            uid: None,
            cgroup: ev.cgroup,
        }),
        errno: None,
        error: None,
        reason: (kind == HopKind::Drop).then(|| {
            reasons
                .name(ev.reason)
                .map_or_else(|| format!("reason {}", ev.reason), str::to_string)
        }),
        nat: None,
        tunnel,
        fragment: fragment(ev),
        gso: (ev.gso_size != 0).then_some(Gso {
            size: ev.gso_size,
            segments: ev.gso_segs,
            read_as_one: match (ev.flags & SKB_SOCK_GRO, ev.flags & SKB_SOCK_NO_GRO) {
                (0, 0) => None,
                (gro, _) => Some(gro != 0),
            },
        }),
        df: ev.ip_frag & IP_DF != 0,
        ip_id: ip_id(ev),
        malformed: ev.flags & SKB_MALFORMED != 0,
        sock_ino: ev.sk_ino,
        k8s: None,
        node: None,
    }
}

/// The datagram's IP identification, where it has one.
fn ip_id(ev: &SkbEvent) -> Option<u16> {
    (ev.src.family == AF_INET || ev.ip_frag & (IP_MF | IP_OFFSET) != 0).then_some(ev.ip_id)
}

/// The fragment an skb event carries, if the datagram travels fragmented there.
fn fragment(ev: &SkbEvent) -> Option<Fragment> {
    (ev.ip_frag & (IP_MF | IP_OFFSET) != 0).then(|| Fragment {
        ip_id: ev.ip_id,
        fragments: 1,
        offset: u32::from(ev.ip_frag & IP_OFFSET) * 8,
        action: None,
    })
}

/// The overlay of an skb event, if it was encapsulated.
fn tunnel(ev: &SkbEvent) -> Option<Tunnel> {
    let name = match ev.tunnel {
        TUNNEL_VXLAN => TunnelKind::Vxlan,
        TUNNEL_GENEVE => TunnelKind::Geneve,
        _ => return None,
    };
    Some(Tunnel {
        tunnel: name,
        vni: ev.vni,
        outer: Endpoints {
            src: socket_addr(&ev.outer_src),
            dst: socket_addr(&ev.outer_dst),
        },
    })
}

/// The NAT hops of a [`NatEvent`], in the order they happened: one, or two when the event
/// holds a destination rewrite before the source's (`dnat_first_at`).
pub fn nat_hops(ev: &NatEvent, clock: &Clock) -> Vec<Hop> {
    let before = Endpoints {
        src: socket_addr(&ev.before_src),
        dst: socket_addr(&ev.before_dst),
    };
    let after = Endpoints {
        src: socket_addr(&ev.skb.src),
        dst: socket_addr(&ev.skb.dst),
    };
    if ev.dnat_first_at == 0 {
        return vec![nat_hop(ev, ev.nf_hook, before, after, clock)];
    }
    let between = Endpoints {
        src: before.src,
        dst: after.dst,
    };
    vec![
        nat_hop(ev, ev.dnat_first_at - 1, before, between, clock),
        nat_hop(ev, ev.nf_hook, between, after, clock),
    ]
}

/// The NAT hop a drop event carries ([`SKB_DNAT_BEFORE`]): a destination rewrite in the
/// dropping namespace that no NAT hop saw, the datagram dropped before the NAT hop's link.
pub fn dnat_before_drop(ev: &SkbEvent, clock: &Clock) -> Option<Hop> {
    if ev.flags & SKB_DNAT_BEFORE == 0 {
        return None;
    }
    let nf_hook = if ev.flags & SKB_DNAT_AT_OUTPUT != 0 {
        NF_INET_LOCAL_OUT
    } else {
        NF_INET_PRE_ROUTING
    };
    let nat = NatEvent {
        skb: SkbEvent {
            outer_dst: Addr::default(),
            ..*ev
        },
        before_src: ev.src,
        before_dst: ev.outer_dst,
        nf_hook,
        ..NatEvent::default()
    };
    nat_hops(&nat, clock).pop()
}

/// A NAT hop of `ev` at netfilter hook `nf_hook`: destination NAT happens at prerouting and
/// output, source NAT at postrouting and input.
fn nat_hop(ev: &NatEvent, nf_hook: u32, before: Endpoints, after: Endpoints, clock: &Clock) -> Hop {
    let dnat = matches!(nf_hook, NF_INET_PRE_ROUTING | NF_INET_LOCAL_OUT);
    let ifname = comm(&ev.skb.ifname);
    Hop {
        kind: HopKind::Nat,
        ts: clock.wall(ev.skb.header.ts_ns),
        hook: Hook::from_u16(ev.skb.header.hook),
        netns: ev.skb.netns,
        ifname: (!ifname.is_empty()).then_some(ifname),
        ifkind: None,
        mtu: None,
        fragment: None,
        gso: None,
        df: false,
        ip_id: ip_id(&ev.skb),
        addrs: after,
        len: ev.skb.len,
        process: None,
        errno: None,
        error: None,
        reason: None,
        tunnel: tunnel(&ev.skb),
        malformed: ev.skb.flags & SKB_MALFORMED != 0,
        sock_ino: 0,
        k8s: None,
        node: None,
        nat: Some(Box::new(Nat {
            nat: if dnat { NatKind::Dnat } else { NatKind::Snat },
            nf_hook: NfHook::from_kernel(nf_hook),
            before,
            after,
            conntrack: (ev.ct_orig_src.family != 0).then(|| Conntrack {
                orig: Endpoints {
                    src: socket_addr(&ev.ct_orig_src),
                    dst: socket_addr(&ev.ct_orig_dst),
                },
                reply: Endpoints {
                    src: socket_addr(&ev.ct_reply_src),
                    dst: socket_addr(&ev.ct_reply_dst),
                },
            }),
        })),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::{
        model::{Path, PathType, Verdict},
        pipeline::events::tests::{sample_send, sample_skb},
    };

    pub fn clock() -> Clock {
        Clock::with_boot(SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000))
    }

    /// A path of one send hop (the sample nc datagram).
    pub fn sample_path() -> Path {
        let hop = send_hop(&sample_send(), &clock());
        Path {
            ty: PathType::Path,
            id: "2a-65".into(),
            ts: hop.ts,
            complete: true,
            sampled: true,
            orig: hop.addrs,
            last: hop.addrs,
            verdict: Verdict::Unknown,
            explain: "no verdict observed".into(),
            hops: vec![hop],
            k8s: None,
            nodes: Vec::new(),
        }
    }

    pub fn reasons() -> DropReasons {
        DropReasons::from_pairs([(3, "NO_SOCKET"), (6, "SOCKET_RCVBUFF")])
    }

    #[test]
    fn send_path_matches_the_json_contract() {
        let json: serde_json::Value = serde_json::to_value(sample_path()).unwrap();
        let expected = serde_json::json!({
            "type": "path",
            "id": "2a-65",
            "ts": "2027-01-15T08:00:00.000000042Z",
            "complete": true,
            "sampled": true,
            "orig": {"src": "127.0.0.1:40112", "dst": "127.0.0.1:5353"},
            "final": {"src": "127.0.0.1:40112", "dst": "127.0.0.1:5353"},
            "verdict": "unknown",
            "explain": "no verdict observed",
            "hops": [{
                "kind": "send",
                "ts": "2027-01-15T08:00:00.000000042Z",
                "hook": "raw_tracepoint:sock:sock_send_length",
                "netns": 4026531840u32,
                "src": "127.0.0.1:40112",
                "dst": "127.0.0.1:5353",
                "len": 3,
                "pid": 100,
                "tid": 101,
                "comm": "nc",
                "process_name": "nc",
                "uid": 1000,
                "cgroup": 7
            }]
        });
        assert_eq!(json, expected);
    }

    #[test]
    fn a_thread_sending_is_named_with_its_process() {
        let mut ev = sample_send();
        ev.comm = [0; 16];
        ev.comm[..12].copy_from_slice(b"isc-net-0000");
        ev.name = [0; 16];
        ev.name[..3].copy_from_slice(b"dig");
        let hop = send_hop(&ev, &Clock::new());
        let json = serde_json::to_value(&hop).unwrap();
        assert_eq!(
            (&json["comm"], &json["process_name"]),
            (&"isc-net-0000".into(), &"dig".into())
        );
        let mut path = sample_path();
        path.hops = vec![hop];
        let line = crate::output::lines::render(
            &path,
            crate::output::lines::Format::Human { color: false },
        );
        assert!(
            line.contains("dig[100] (thread isc-net-0000[101])"),
            "{line}"
        );
        assert!(crate::pipeline::filter::Filter {
            comm: Some("dig".into()),
            ..Default::default()
        }
        .matches(&path));
    }

    #[test]
    fn unknown_reason_numbers_are_shown_as_numbers() {
        let mut ev = sample_skb(KIND_DROP);
        ev.reason = 999;
        let hop = skb_hop(&ev, &clock(), &reasons());
        assert_eq!(hop.reason.as_deref(), Some("reason 999"));
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
    fn hook_names_round_trip() {
        assert_eq!(Hook::from_u16(1).name(), "fentry:udp_sendmsg");
        assert_eq!(Hook::from_u16(4).name(), "kprobe:udpv6_sendmsg");
        assert_eq!(Hook::from_u16(999), Hook::Unknown);
        for hook in Hook::ALL {
            assert_eq!(Hook::from_u16(hook as u16), hook);
            assert_eq!(Hook::from_name(hook.name()), Some(hook));
        }
    }

    #[test]
    fn a_nat_hop_says_what_was_rewritten_and_reads_back() {
        let send = sample_send();
        let mut ev = NatEvent {
            skb: sample_skb(udptrace_common::KIND_NAT),
            before_src: send.src,
            before_dst: send.dst,
            nf_hook: NF_INET_PRE_ROUTING,
            ct_orig_src: send.src,
            ct_orig_dst: send.dst,
            ..NatEvent::default()
        };
        ev.skb.header.hook = Hook::NetfilterLink as u16;
        ev.skb.dst.port = 5354;
        ev.ct_reply_src = ev.skb.dst;
        ev.ct_reply_dst = send.src;
        let [hop] = &nat_hops(&ev, &clock())[..] else {
            panic!("one hop")
        };
        let hop = hop.clone();
        let json = serde_json::to_value(&hop).unwrap();
        assert_eq!(json["nat"], "dnat");
        assert_eq!(json["nf_hook"], "prerouting");
        assert_eq!(json["hook"], "netfilter-link");
        assert_eq!(json["before"]["dst"], "127.0.0.1:5353");
        assert_eq!(json["after"]["dst"], "127.0.0.1:5354");
        assert_eq!(json["conntrack"]["reply"]["src"], "127.0.0.1:5354");
        let back: Hop = serde_json::from_value(json).unwrap();
        assert_eq!(
            back,
            Hop {
                df: false,
                sock_ino: 0,
                ..hop
            }
        );
    }
}
