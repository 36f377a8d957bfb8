//! One plain sentence per path: why the receiver sees the source it sees, or why the
//! datagram died, naming the rewrite, the hook and the namespace.

use std::net::SocketAddr;

use crate::model::{FragmentAction, Hop, HopKind, NatKind, Path, Verdict};

fn addr(a: Option<SocketAddr>) -> String {
    a.map_or_else(|| "?".into(), |a| a.to_string())
}

/// "SNAT at postrouting in netns 4026532177 rewrote 10.0.0.1:5000 → 10.0.0.7:5000"; on a
/// reply whose rewrite undoes the request's, "conntrack at postrouting in netns 4026532177
/// restored 10.250.0.1:30053 as the source of this reply, undoing the request's DNAT
/// 10.250.0.1:30053 → 10.244.2.5:53".
pub(crate) fn rewrite(hop: &Hop) -> Option<String> {
    let nat = hop.nat.as_ref()?;
    let (before, after) = nat.nat.rewritten(nat.before, nat.after);
    if let Some((request, req_before, req_after)) = nat.undoes() {
        let side = match nat.nat {
            NatKind::Snat => "source",
            NatKind::Dnat => "destination",
        };
        return Some(format!(
            "conntrack at {} in netns {} restored {} as the {side} of this reply, undoing the \
             request's {} {} → {}",
            nat.nf_hook.name(),
            hop.netns,
            addr(after),
            request.name().to_uppercase(),
            addr(req_before),
            addr(req_after)
        ));
    }
    Some(format!(
        "{} at {} in netns {} rewrote {} → {}",
        nat.nat.name().to_uppercase(),
        nat.nf_hook.name(),
        hop.netns,
        addr(before),
        addr(after)
    ))
}

fn rewrites(path: &Path, kind: NatKind) -> Vec<String> {
    path.hops
        .iter()
        .filter(|h| h.nat.as_ref().is_some_and(|n| n.nat == kind))
        .filter_map(rewrite)
        .collect()
}

fn who(hop: &Hop) -> String {
    hop.process.as_ref().map_or_else(
        || "a socket nobody has read yet".into(),
        |p| format!("{}[{}]", p.name(), p.pid),
    )
}

/// "; it travelled as 3 IP fragments from vx0 (MTU 1450) in netns 4026532177", when it did.
fn fragmentation(path: &Path) -> String {
    let Some((hop, f)) = path.hops.iter().find_map(|h| {
        let f = h.fragment.as_ref()?;
        (h.kind == HopKind::Fragment && f.action == Some(FragmentAction::Split)).then_some((h, f))
    }) else {
        return String::new();
    };
    let dev = hop
        .ifname
        .as_ref()
        .map(|d| match hop.mtu {
            Some(mtu) => format!(" {d} (MTU {mtu})"),
            None => format!(" {d}"),
        })
        .unwrap_or_default();
    format!(
        "; it travelled as {} IP fragments from{dev} in netns {}",
        f.fragments, hop.netns
    )
}

/// The sentence for `path`.
pub fn explain(path: &Path) -> String {
    let sentence = sentence(path);
    let sampled = if path.sampled {
        ""
    } else {
        " (not sampled: the hops before the first one shown were not recorded)"
    };
    format!("{sentence}{}{sampled}", fragmentation(path))
}

fn sentence(path: &Path) -> String {
    let Some(last) = path.hops.last() else {
        return String::new();
    };
    let snat = rewrites(path, NatKind::Snat);
    let dnat = rewrites(path, NatKind::Dnat);
    let after_dnat = if dnat.is_empty() {
        String::new()
    } else {
        format!(", after {}", dnat.join(" and "))
    };
    match path.verdict {
        Verdict::Delivered if !snat.is_empty() => format!(
            "{} is what the receiver {} sees because {}{after_dnat}",
            addr(path.last.src),
            who(last),
            snat.join(" and then ")
        ),
        Verdict::Delivered => format!(
            "delivered to {} on {} in netns {}, source {} as sent{after_dnat}",
            who(last),
            addr(path.last.dst),
            last.netns,
            addr(path.last.src)
        ),
        Verdict::Dropped => {
            let reason = last.reason.as_deref().unwrap_or("?");
            let place = format!("in netns {}", last.netns);
            let what = match reason {
                "NO_SOCKET" => format!("no socket listens on {} {place}", addr(last.addrs.dst)),
                "NETFILTER_DROP" => format!("a netfilter rule dropped it {place}"),
                "PKT_TOO_BIG" => format!(
                    "it is larger than the MTU of the way out {place} and its don't-fragment flag \
                     is set: the kernel sent ICMP fragmentation-needed back to the sender"
                ),
                r if r.starts_with("FRAG_") || r.starts_with("IP_FRAG") => {
                    format!("its IP fragments could not be put back together {place}")
                }
                "SOCKET_RCVBUFF" => {
                    format!(
                        "the receiving socket on {} {place} had a full buffer",
                        addr(last.addrs.dst)
                    )
                }
                _ => format!("the kernel dropped it {place}"),
            };
            let sender = path
                .hops
                .iter()
                .find_map(|h| h.error.as_ref())
                .map(|e| format!("; the sender got \"{e}\""))
                .unwrap_or_default();
            format!("dropped: {what} ({reason}){after_dnat}{sender}")
        }
        Verdict::LeftHost => {
            let via = if snat.is_empty() {
                format!("source {} as sent", addr(path.last.src))
            } else {
                format!(
                    "source {} because {}",
                    addr(path.last.src),
                    snat.join(" and then ")
                )
            };
            format!(
                "left the host on {} in netns {} for {}, {via}{after_dnat}",
                last.ifname.as_deref().unwrap_or("?"),
                last.netns,
                addr(path.last.dst)
            )
        }
        Verdict::Unknown if !path.complete => format!(
            "no verdict: last seen at {}{} in netns {}{after_dnat}",
            last.kind.name(),
            last.ifname
                .as_ref()
                .map(|d| format!(" on {d}"))
                .unwrap_or_default(),
            last.netns
        ),
        Verdict::Unknown => "no verdict observed".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Conntrack, Endpoints, HopKind, Nat, NfHook, Process};
    use crate::pipeline::hops::tests::sample_path;

    fn sa(s: &str) -> Option<SocketAddr> {
        Some(s.parse().unwrap())
    }

    fn hop(kind: HopKind, netns: u32, src: &str, dst: &str) -> Hop {
        let mut h = sample_path().hops.remove(0);
        h.kind = kind;
        h.netns = netns;
        h.addrs = Endpoints {
            src: sa(src),
            dst: sa(dst),
        };
        h.process = None;
        h
    }

    fn nat(
        kind: NatKind,
        hook: NfHook,
        netns: u32,
        before: (&str, &str),
        after: (&str, &str),
    ) -> Hop {
        let mut h = hop(HopKind::Nat, netns, after.0, after.1);
        h.nat = Some(Box::new(Nat {
            nat: kind,
            nf_hook: hook,
            before: Endpoints {
                src: sa(before.0),
                dst: sa(before.1),
            },
            after: Endpoints {
                src: sa(after.0),
                dst: sa(after.1),
            },
            conntrack: None,
        }));
        h
    }

    fn path(verdict: Verdict, hops: Vec<Hop>) -> Path {
        let mut p = sample_path();
        p.last = hops.last().unwrap().addrs;
        p.hops = hops;
        p.verdict = verdict;
        p
    }

    #[test]
    fn a_reply_is_explained_as_conntrack_undoing_the_requests_dnat() {
        let ct = Conntrack {
            orig: Endpoints {
                src: sa("10.250.0.9:40000"),
                dst: sa("10.250.0.1:30053"),
            },
            reply: Endpoints {
                src: sa("10.244.2.5:53"),
                dst: sa("10.250.0.9:40000"),
            },
        };
        let mut request = nat(
            NatKind::Dnat,
            NfHook::Prerouting,
            1,
            ("10.250.0.9:40000", "10.250.0.1:30053"),
            ("10.250.0.9:40000", "10.244.2.5:53"),
        );
        request.nat.as_mut().unwrap().conntrack = Some(ct);
        assert_eq!(
            rewrite(&request).unwrap(),
            "DNAT at prerouting in netns 1 rewrote 10.250.0.1:30053 → 10.244.2.5:53"
        );
        let mut reply = nat(
            NatKind::Snat,
            NfHook::Postrouting,
            1,
            ("10.244.2.5:53", "10.250.0.9:40000"),
            ("10.250.0.1:30053", "10.250.0.9:40000"),
        );
        reply.nat.as_mut().unwrap().conntrack = Some(ct);
        let mut out = hop(HopKind::Xmit, 1, "10.250.0.1:30053", "10.250.0.9:40000");
        out.ifname = Some("eth0".into());
        let p = path(
            Verdict::LeftHost,
            vec![
                hop(HopKind::Send, 7, "10.244.2.5:53", "10.250.0.9:40000"),
                reply,
                out,
            ],
        );
        assert_eq!(
            explain(&p),
            "left the host on eth0 in netns 1 for 10.250.0.9:40000, source 10.250.0.1:30053 \
             because conntrack at postrouting in netns 1 restored 10.250.0.1:30053 as the \
             source of this reply, undoing the request's DNAT 10.250.0.1:30053 → 10.244.2.5:53"
        );
    }

    #[test]
    fn hairpin_masquerade_explains_the_source() {
        let mut deliver = hop(HopKind::Deliver, 7, "10.88.0.1:40112", "10.88.0.11:5353");
        deliver.process = Some(Process {
            pid: 42,
            tid: 42,
            comm: "python3".into(),
            name: "python3".into(),
            uid: None,
            cgroup: 0,
        });
        let p = path(
            Verdict::Delivered,
            vec![
                hop(HopKind::Send, 5, "0.0.0.0:40112", "10.88.0.1:5353"),
                nat(
                    NatKind::Dnat,
                    NfHook::Prerouting,
                    1,
                    ("10.88.0.10:40112", "10.88.0.1:5353"),
                    ("10.88.0.10:40112", "10.88.0.11:5353"),
                ),
                nat(
                    NatKind::Snat,
                    NfHook::Postrouting,
                    1,
                    ("10.88.0.10:40112", "10.88.0.11:5353"),
                    ("10.88.0.1:40112", "10.88.0.11:5353"),
                ),
                deliver,
            ],
        );
        assert_eq!(
            explain(&p),
            "10.88.0.1:40112 is what the receiver python3[42] sees because SNAT at postrouting in netns 1 \
             rewrote 10.88.0.10:40112 → 10.88.0.1:40112, after DNAT at prerouting in netns 1 rewrote \
             10.88.0.1:5353 → 10.88.0.11:5353"
        );
    }

    #[test]
    fn drops_name_the_reason_and_the_place() {
        let mut drop = hop(HopKind::Drop, 9, "10.0.0.1:1000", "10.244.2.7:5353");
        drop.reason = Some("NO_SOCKET".into());
        let p = path(
            Verdict::Dropped,
            vec![
                hop(HopKind::Send, 5, "0.0.0.0:1000", "10.244.2.7:5353"),
                drop.clone(),
            ],
        );
        assert_eq!(
            explain(&p),
            "dropped: no socket listens on 10.244.2.7:5353 in netns 9 (NO_SOCKET)"
        );

        drop.reason = Some("SOCKET_RCVBUFF".into());
        let p = path(Verdict::Dropped, vec![drop.clone()]);
        assert_eq!(
            explain(&p),
            "dropped: the receiving socket on 10.244.2.7:5353 in netns 9 had a full buffer (SOCKET_RCVBUFF)"
        );

        drop.reason = Some("NETFILTER_DROP".into());
        let mut send = hop(HopKind::Send, 9, "0.0.0.0:1000", "10.244.2.7:5353");
        send.error = Some("Operation not permitted".into());
        let p = path(Verdict::Dropped, vec![send, drop]);
        assert_eq!(
            explain(&p),
            "dropped: a netfilter rule dropped it in netns 9 (NETFILTER_DROP); the sender got \"Operation not permitted\""
        );
    }

    #[test]
    fn plain_delivery_and_no_verdict() {
        let deliver = hop(HopKind::Deliver, 3, "127.0.0.1:999", "127.0.0.1:53");
        let p = path(Verdict::Delivered, vec![deliver]);
        assert_eq!(
            explain(&p),
            "delivered to a socket nobody has read yet on 127.0.0.1:53 in netns 3, source 127.0.0.1:999 as sent"
        );
        let mut xmit = hop(HopKind::Xmit, 4, "10.0.0.1:1", "8.8.8.8:53");
        xmit.ifname = Some("eth0".into());
        let mut p = path(Verdict::Unknown, vec![xmit]);
        p.complete = false;
        assert_eq!(
            explain(&p),
            "no verdict: last seen at xmit on eth0 in netns 4"
        );
    }
}
