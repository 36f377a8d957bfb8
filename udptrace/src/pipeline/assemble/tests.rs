//! Path assembly, event by event: orders, joins, fragments, tunnels, readers.

use udptrace_common::{
    Hook, IP_MF, KIND_DELIVER, KIND_DROP, KIND_INGRESS, KIND_XMIT, TUNNEL_VXLAN,
};

use super::*;
use crate::model::{NatKind, NfHook};
use crate::pipeline::{
    events::tests::{sample_send, sample_skb},
    hops::tests::{clock, reasons},
};

const SOCK: u64 = 0xffff_8880_1234_5678;

fn skb(kind: u16, ts: u64, sk: u64) -> Event {
    let mut ev = sample_skb(kind);
    ev.header.ts_ns = ts;
    ev.sk = sk;
    Event::Skb(ev)
}

fn send(ts: u64) -> Event {
    let mut ev = sample_send();
    ev.header.ts_ns = ts;
    Event::Send(ev)
}

#[test]
fn tracepoint_order_send_after_its_drop_joins_first() {
    let mut a = Assembler::new(clock(), reasons());
    let mut out = Vec::new();
    a.push(&skb(KIND_XMIT, 10, SOCK), &mut out);
    a.push(&skb(KIND_DROP, 20, 0), &mut out);
    assert!(out.is_empty(), "waits for the send hop");
    a.push(&send(30), &mut out);
    assert_eq!(out.len(), 1);
    let p = &out[0];
    let kinds: Vec<HopKind> = p.hops.iter().map(|h| h.kind).collect();
    assert_eq!(kinds, [HopKind::Send, HopKind::Xmit, HopKind::Drop]);
    assert_eq!(p.verdict, Verdict::Dropped);
    assert!(p.complete);
    assert_eq!(p.hops[2].reason.as_deref(), Some("NO_SOCKET"));
    assert_eq!(p.hops[1].ifname.as_deref(), Some("ut-b"));
    assert_eq!(p.ts, clock().wall(10), "the earliest hop");
    assert_eq!(a.open_paths(), 0);
}

#[test]
fn entry_hook_order_send_then_skb_hops_then_delivery() {
    let mut a = Assembler::new(clock(), reasons());
    let mut out = Vec::new();
    a.push(&send(5), &mut out);
    a.push(&skb(KIND_XMIT, 10, SOCK), &mut out);
    let mut deliver = sample_skb(KIND_DELIVER);
    deliver.header.ts_ns = 40;
    deliver.sk = 0xdead; // the receiver's socket: never joins a send
    deliver.pid = 77;
    deliver.comm[..7].copy_from_slice(b"python3");
    deliver.src.port = 999; // what the receiver sees
    a.push(&Event::Skb(deliver), &mut out);
    assert_eq!(out.len(), 1);
    let p = &out[0];
    assert_eq!(p.verdict, Verdict::Delivered);
    assert_eq!(p.hops.len(), 3);
    assert_eq!(
        p.last.src.unwrap().port(),
        999,
        "final is the receiving socket's view"
    );
    assert_eq!(p.orig.src.unwrap().port(), 40112);
    let json = serde_json::to_value(&p.hops[2]).unwrap();
    assert_eq!(
        (json["pid"].as_u64(), json["comm"].as_str()),
        (Some(77), Some("python3"))
    );
    assert!(json.get("uid").is_none());
}

#[test]
fn a_path_without_its_send_is_printed_after_the_grace() {
    let mut a = Assembler::new(clock(), reasons());
    let mut out = Vec::new();
    a.push(&skb(KIND_XMIT, 10, SOCK), &mut out);
    a.push(&skb(KIND_DROP, 20, 0), &mut out);
    a.tick(20 + GRACE_NS - 1, &mut out);
    assert!(out.is_empty());
    a.tick(20 + GRACE_NS, &mut out);
    assert_eq!(out.len(), 1);
    assert!(out[0].complete, "it has a verdict");
    assert_eq!(out[0].hops.len(), 2);
}

fn reader(ts: u64, sk: u64, pid: u32) -> Event {
    let mut comm = [0u8; 16];
    comm[..7].copy_from_slice(b"dnsmasq");
    Event::Recv(RecvEvent {
        header: udptrace_common::EventHeader {
            kind: udptrace_common::KIND_RECV,
            hook: Hook::TpSockRecvLength as u16,
            cpu: 0,
            ts_ns: ts,
        },
        sk,
        pid,
        tid: pid,
        comm,
        ..RecvEvent::default()
    })
}

fn delivered(ts: u64, sk: u64) -> Event {
    let mut ev = sample_skb(KIND_DELIVER);
    ev.header.ts_ns = ts;
    ev.sk = sk;
    Event::Skb(ev)
}

#[test]
fn the_reader_of_the_receiving_socket_is_named_whenever_it_reads() {
    const RX: u64 = 0xffff_8880_9999_0000;
    let mut a = Assembler::new(clock(), reasons());
    let mut out = Vec::new();
    // Read after delivery (tracepoint sock_recv_length fires after the read).
    a.push(&delivered(10, RX), &mut out);
    assert!(out.is_empty(), "waits for the reader");
    a.push(&reader(20, RX, 4242), &mut out);
    assert_eq!(out.len(), 1);
    let json = serde_json::to_value(&out[0].hops[0]).unwrap();
    assert_eq!(
        (json["pid"].as_u64(), json["comm"].as_str()),
        (Some(4242), Some("dnsmasq"))
    );
    // Known reader (fentry on recvmsg fires before): named at once.
    a.push(&delivered(30, RX), &mut out);
    assert_eq!(out.len(), 2);
    assert_eq!(out[1].hops[0].process.as_ref().map(|p| p.pid), Some(4242));
    // Nobody reads another socket: printed after the grace, without a process.
    a.push(&delivered(40, 0xabc), &mut out);
    a.tick(40 + GRACE_NS, &mut out);
    assert_eq!(out.len(), 3);
    assert_eq!(out[2].verdict, Verdict::Delivered);
    assert!(out[2].hops[0].process.is_none());
}

#[test]
fn a_datagram_from_elsewhere_ends_at_once() {
    let mut a = Assembler::new(clock(), reasons());
    let mut out = Vec::new();
    a.push(&skb(KIND_DROP, 20, 0), &mut out);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].verdict, Verdict::Dropped);
}

#[test]
fn no_verdict_means_incomplete_after_idle_and_on_flush() {
    let mut a = Assembler::new(clock(), reasons());
    let mut out = Vec::new();
    a.push(&send(5), &mut out);
    a.tick(5 + IDLE_NS - 1, &mut out);
    assert!(out.is_empty());
    // Idleness is looked for every SCAN_NS, not on every call.
    a.tick(5 + IDLE_NS + SCAN_NS, &mut out);
    assert_eq!(out.len(), 1);
    assert!(!out[0].complete);
    assert_eq!(out[0].verdict, Verdict::Unknown);

    a.push(&send(10 * IDLE_NS), &mut out);
    a.flush(&mut out);
    assert_eq!(out.len(), 2);
    assert!(!out[1].complete);
    assert_eq!(a.open_paths(), 0);
}

#[test]
fn a_path_without_verdict_says_when_only_the_host_is_watched() {
    for host_only in [false, true] {
        let mut a = Assembler::new(clock(), reasons()).host_only(host_only);
        let mut out = Vec::new();
        a.push(&send(5), &mut out);
        a.push(&skb(KIND_XMIT, 6, SOCK), &mut out);
        a.flush(&mut out);
        assert_eq!(
            out[0]
                .explain
                .contains("without that option udptrace follows"),
            host_only,
            "{}",
            out[0].explain
        );
    }
}

#[test]
fn an_unsampled_drop_is_a_path_of_its_own_that_says_so() {
    let mut a = Assembler::new(clock(), reasons());
    let mut out = Vec::new();
    // Reported only because it was dropped, in the receiver's namespace (no socket).
    let Event::Skb(mut drop) = skb(KIND_DROP, 10, 0) else {
        unreachable!()
    };
    drop.reason = 3;
    drop.flags = SKB_UNSAMPLED;
    a.push(&Event::Skb(drop), &mut out);
    assert_eq!(out.len(), 1);
    assert!(out[0].complete && !out[0].sampled);
    assert_eq!(out[0].verdict, Verdict::Dropped);
    assert!(out[0].explain.contains("not sampled"), "{}", out[0].explain);
    // A sampled one is what it always was.
    a.push(&skb(KIND_DROP, 20, 0), &mut out);
    assert!(out[1].sampled);
}

#[test]
fn an_entry_hook_send_never_joins_an_earlier_datagram() {
    let mut a = Assembler::new(clock(), reasons());
    let mut out = Vec::new();
    // An unsampled datagram's drop on its way out (its send hop was not reported)...
    let Event::Skb(mut drop) = skb(KIND_DROP, 10, SOCK) else {
        unreachable!()
    };
    drop.flags = SKB_UNSAMPLED;
    a.push(&Event::Skb(drop), &mut out);
    // ...then the next datagram's send, reported by fentry before its skb hops.
    let Event::Send(mut ev) = send(20) else {
        unreachable!()
    };
    ev.header.hook = Hook::FentryUdpSendmsg as u16;
    a.push(&Event::Send(ev), &mut out);
    a.push(&skb(KIND_XMIT, 30, SOCK), &mut out);
    a.push(&skb(KIND_DELIVER, 40, 0), &mut out);
    a.tick(40 + GRACE_NS, &mut out);
    assert_eq!(out.len(), 2, "{out:#?}");
    let dropped = out.iter().find(|p| p.verdict == Verdict::Dropped).unwrap();
    assert_eq!(dropped.hops.len(), 1);
    assert!(!dropped.sampled);
    let delivered = out
        .iter()
        .find(|p| p.verdict == Verdict::Delivered)
        .unwrap();
    assert_eq!(delivered.hops[0].kind, HopKind::Send);
    assert!(delivered.sampled);
}

#[test]
fn a_send_without_skb_hops_does_not_collect_the_next_datagram() {
    let mut a = Assembler::new(clock(), reasons());
    let mut out = Vec::new();
    a.push(&send(5), &mut out); // e.g. no route: no skb ever
    a.push(&send(50), &mut out);
    assert_eq!(out.len(), 1, "the first is over");
    assert!(!out[0].complete);
    a.push(&skb(KIND_XMIT, 60, SOCK), &mut out);
    a.push(&skb(KIND_DROP, 70, 0), &mut out);
    assert_eq!(out.len(), 2);
    assert_eq!(
        out[1].hops.len(),
        3,
        "the second send got its xmit and drop"
    );
    assert_eq!(out[1].ts, clock().wall(50));
}

#[test]
fn skb_pointer_reuse_starts_a_new_path_after_the_first_ended() {
    let mut a = Assembler::new(clock(), reasons());
    let mut out = Vec::new();
    a.push(&skb(KIND_DROP, 20, 0), &mut out);
    a.push(&skb(KIND_DROP, 30, 0), &mut out);
    assert_eq!(out.len(), 2);
    assert_ne!(out[0].id, out[1].id);
}

#[test]
fn an_encapsulated_xmit_is_an_encap_hop_with_vni_and_outer_addresses() {
    let mut ev = sample_skb(KIND_XMIT);
    ev.tunnel = TUNNEL_VXLAN;
    ev.vni = 42;
    ev.outer_src = udptrace_common::Addr {
        family: 2,
        port: 33000,
        _pad: 0,
        ip: [10, 203, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    };
    ev.outer_dst = udptrace_common::Addr {
        family: 2,
        port: 4789,
        _pad: 0,
        ip: [10, 203, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    };
    let json = serde_json::to_value(skb_hop(&ev, &clock(), &reasons())).unwrap();
    assert_eq!(json["kind"], "encap");
    assert_eq!(json["tunnel"], "vxlan");
    assert_eq!(json["vni"], 42);
    assert_eq!(
        json["outer"],
        serde_json::json!({"src": "10.203.0.1:33000", "dst": "10.203.0.2:4789"})
    );
    assert_eq!(
        json["dst"], "127.0.0.1:5353",
        "src/dst stay the inner datagram's"
    );
}

/// An skb event on device `ifname` of kind `ifkind` (empty: a NIC).
fn on_dev(kind: u16, ts: u64, skb: u64, ifname: &str, ifkind: &str) -> SkbEvent {
    let mut ev = sample_skb(kind);
    ev.header.ts_ns = ts;
    ev.skb = skb;
    ev.sk = 0;
    ev.ifname = [0; 16];
    ev.ifname[..ifname.len()].copy_from_slice(ifname.as_bytes());
    ev.ifkind = [0; 16];
    ev.ifkind[..ifkind.len()].copy_from_slice(ifkind.as_bytes());
    ev
}

#[test]
fn arriving_out_of_a_tunnel_is_a_decap_hop() {
    let mut a = Assembler::new(clock(), reasons());
    let mut out = Vec::new();
    let mut encap = on_dev(KIND_XMIT, 10, 7, "veth-a", "veth");
    encap.tunnel = TUNNEL_VXLAN;
    encap.vni = 42;
    encap.outer_src = sample_send().src;
    encap.outer_dst = sample_send().dst;
    let mut underlay = encap;
    underlay.header.kind = KIND_INGRESS;
    underlay.header.ts_ns = 11;
    a.push(&Event::Skb(encap), &mut out);
    a.push(&Event::Skb(underlay), &mut out);
    a.push(
        &Event::Skb(on_dev(KIND_INGRESS, 12, 7, "vxlan0", "vxlan")),
        &mut out,
    );
    a.push(&Event::Skb(on_dev(KIND_DELIVER, 13, 7, "", "")), &mut out);
    a.tick(13 + GRACE_NS, &mut out);
    let kinds: Vec<HopKind> = out[0].hops.iter().map(|h| h.kind).collect();
    assert_eq!(
        kinds,
        [
            HopKind::Encap,
            HopKind::Ingress,
            HopKind::Decap,
            HopKind::Deliver
        ]
    );
    let decap = &out[0].hops[2];
    assert_eq!(decap.tunnel.as_ref().map(|t| t.vni), Some(42));
    assert_eq!(decap.ifkind.as_deref(), Some("vxlan"));
    reads_back(&out[0]);
}

/// The path's JSON reads back as the path (what the contract leaves out aside).
fn reads_back(path: &Path) {
    let json = serde_json::to_string(path).unwrap();
    let back: Path = serde_json::from_str(&json).unwrap();
    assert_eq!(back, path.without_internals(), "{json}");
}

#[test]
fn transmitting_on_a_nic_or_tap_leaves_the_host_but_a_veth_does_not() {
    for (ifname, ifkind, verdict) in [
        ("eth0", "", Verdict::LeftHost),
        ("tap0", "tun", Verdict::LeftHost),
        ("veth0", "veth", Verdict::Unknown),
        ("lo", "", Verdict::Unknown),
    ] {
        let mut a = Assembler::new(clock(), reasons());
        let mut out = Vec::new();
        a.push(
            &Event::Skb(on_dev(KIND_XMIT, 10, 7, ifname, ifkind)),
            &mut out,
        );
        a.tick(10 + IDLE_NS, &mut out);
        assert_eq!(out[0].verdict, verdict, "{ifname}");
        assert_eq!(out[0].complete, verdict == Verdict::LeftHost, "{ifname}");
    }
}

/// Fragment `n` (0-based) of a 3000-byte datagram cut at 1480 bytes, on skb `skb`.
fn fragment(kind: u16, ts: u64, skb: u64, n: u16, dev: (&str, &str)) -> SkbEvent {
    let mut ev = on_dev(kind, ts, skb, dev.0, dev.1);
    ev.ip_id = 0x4242;
    ev.ip_frag = (n * 185) | if n < 2 { IP_MF } else { 0 };
    if n > 0 {
        ev.src.port = 0;
        ev.dst.port = 0;
        ev.len = 1480;
    } else {
        ev.len = 3000;
    }
    ev
}

#[test]
fn fragments_join_their_datagram_and_are_counted_not_listed() {
    let mut a = Assembler::new(clock(), reasons());
    let mut out = Vec::new();
    // Cut at the sender: the first fragment is the datagram's own skb, the others new.
    let pod = ("eth0", "veth");
    let mut first = fragment(KIND_XMIT, 10, 7, 0, pod);
    first.sk = SOCK;
    a.push(&send(5), &mut out);
    a.push(&Event::Skb(first), &mut out);
    for n in 1..3 {
        let mut ev = fragment(KIND_XMIT, 10 + u64::from(n), 7 + u64::from(n), n, pod);
        ev.sk = SOCK;
        a.push(&Event::Skb(ev), &mut out);
    }
    // Cut again on a smaller MTU by a router: every piece is a new skb.
    let vx = ("vxlan0", "vxlan");
    for (i, n) in [0u16, 1, 2].into_iter().enumerate() {
        a.push(
            &Event::Skb(fragment(KIND_XMIT, 20 + i as u64, 100 + i as u64, n, vx)),
            &mut out,
        );
    }
    // Reassembled at the receiver into the last fragment's skb, then delivered.
    let mut whole = on_dev(KIND_DELIVER, 30, 102, "", "");
    whole.ip_id = 0x4242;
    whole.len = 3000;
    a.push(&Event::Skb(whole), &mut out);
    a.tick(30 + GRACE_NS, &mut out);
    assert_eq!(out.len(), 1, "one datagram: {out:#?}");
    let p = &out[0];
    assert_eq!(p.verdict, Verdict::Delivered);
    let kinds: Vec<HopKind> = p.hops.iter().map(|h| h.kind).collect();
    assert_eq!(
        kinds,
        [
            HopKind::Send,
            HopKind::Fragment,
            HopKind::Xmit,
            HopKind::Xmit,
            HopKind::Fragment,
            HopKind::Deliver
        ]
    );
    let counts: Vec<u32> = p
        .hops
        .iter()
        .filter_map(|h| h.fragment.as_ref().map(|f| f.fragments))
        .collect();
    assert_eq!(counts, [3, 3, 3, 3]);
    assert_eq!(
        p.hops[1].fragment.as_ref().unwrap().action,
        Some(FragmentAction::Split)
    );
    assert_eq!(
        p.hops[4].fragment.as_ref().unwrap().action,
        Some(FragmentAction::Reassembled)
    );
    assert!(p.explain.contains("3 IP fragments"), "{}", p.explain);
    reads_back(p);
    assert_eq!(a.open_paths(), 0);
    assert!(
        a.by_skb.is_empty() && a.by_ident.is_empty(),
        "nothing left behind"
    );
    // A straggler of the printed datagram is not a new one.
    a.push(
        &Event::Skb(fragment(KIND_INGRESS, 40, 200, 2, vx)),
        &mut out,
    );
    a.flush(&mut out);
    assert_eq!(out.len(), 1);
}

#[test]
fn fragments_freed_after_the_delivery_do_not_make_it_a_drop() {
    let mut a = Assembler::new(clock(), reasons());
    let mut out = Vec::new();
    let dev = ("ut-b", "veth");
    a.push(&Event::Skb(fragment(KIND_INGRESS, 10, 1, 0, dev)), &mut out);
    a.push(&Event::Skb(fragment(KIND_INGRESS, 11, 2, 1, dev)), &mut out);
    a.push(&Event::Skb(fragment(KIND_INGRESS, 12, 3, 2, dev)), &mut out);
    let mut whole = on_dev(KIND_DELIVER, 13, 3, "", "");
    whole.ip_id = 0x4242;
    a.push(&Event::Skb(whole), &mut out);
    // Linux 6.1 frees the frag_list of a read datagram through kfree_skb.
    let mut freed = fragment(KIND_DROP, 14, 1, 1, ("", ""));
    freed.netns = 0;
    freed.reason = 2;
    a.push(&Event::Skb(freed), &mut out);
    a.flush(&mut out);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].verdict, Verdict::Delivered, "{:#?}", out[0]);
}

/// Seen on Linux 6.1: a later fragment freed without a reason (a duplicate, or one
/// merged during reassembly) before the reassembled datagram is delivered.
#[test]
fn a_later_fragment_freed_without_a_reason_before_the_delivery_is_no_drop() {
    let reasons = DropReasons::from_pairs([(2, "NOT_SPECIFIED"), (3, "NO_SOCKET")]);
    let dev = ("ut-b", "veth");
    for (reason, delivered) in [(2, true), (3, false)] {
        let mut a = Assembler::new(clock(), reasons.clone());
        let mut out = Vec::new();
        for n in 0..3 {
            let ev = fragment(KIND_INGRESS, 10 + u64::from(n), 1 + u64::from(n), n, dev);
            a.push(&Event::Skb(ev), &mut out);
        }
        let mut freed = fragment(KIND_DROP, 14, 2, 1, ("", ""));
        freed.netns = 0;
        freed.reason = reason;
        a.push(&Event::Skb(freed), &mut out);
        let mut whole = on_dev(KIND_DELIVER, 15, 3, "", "");
        whole.ip_id = 0x4242;
        a.push(&Event::Skb(whole), &mut out);
        a.flush(&mut out);
        // After a real drop the delivery cannot be this datagram's: it starts its own.
        assert_eq!(out.len(), if delivered { 1 } else { 2 }, "{out:#?}");
        let want = if delivered {
            Verdict::Delivered
        } else {
            Verdict::Dropped
        };
        assert_eq!(out[0].verdict, want, "reason {reason}: {:#?}", out[0]);
        // A delivered datagram shows no drop; a dropped one shows where.
        let drops = out[0]
            .hops
            .iter()
            .filter(|h| h.kind == HopKind::Drop)
            .count();
        assert_eq!(drops, usize::from(!delivered), "{:#?}", out[0]);
    }
}

/// One NAT link where a namespace's way ends reports both rewrites in one event; the drop
/// hop, after it, reports the destination rewrite again: the path has each once, in order.
#[test]
fn a_nat_event_with_both_rewrites_is_two_hops_and_a_drop_repeating_one_adds_none() {
    use udptrace_common::{NatEvent, NF_INET_LOCAL_OUT, NF_INET_POST_ROUTING, SKB_DNAT_BEFORE};
    let mut a = Assembler::new(clock(), reasons());
    let mut out = Vec::new();
    let send_ev = sample_send();
    let mut nat = NatEvent {
        skb: sample_skb(udptrace_common::KIND_NAT),
        before_src: send_ev.src,
        before_dst: send_ev.dst,
        nf_hook: NF_INET_POST_ROUTING,
        dnat_first_at: NF_INET_LOCAL_OUT + 1,
        ..NatEvent::default()
    };
    nat.skb.header.ts_ns = 10;
    nat.skb.sk = SOCK;
    nat.skb.dst.port = 5354;
    nat.skb.src.ip[3] = 7;
    let (after_src, after_dst) = (nat.skb.src, nat.skb.dst);
    a.push(&Event::Nat(nat), &mut out);
    a.push(&skb(KIND_XMIT, 20, SOCK), &mut out);
    let mut drop = sample_skb(KIND_DROP);
    drop.header.ts_ns = 30;
    drop.src = send_ev.src; // the source NAT is not the drop hop's to report
    drop.dst = after_dst;
    drop.outer_dst = send_ev.dst;
    drop.flags |= SKB_DNAT_BEFORE | udptrace_common::SKB_DNAT_AT_OUTPUT;
    a.push(&Event::Skb(drop), &mut out);
    a.push(&send(40), &mut out);
    assert_eq!(out.len(), 1);
    let p = &out[0];
    let kinds: Vec<HopKind> = p.hops.iter().map(|h| h.kind).collect();
    assert_eq!(
        kinds,
        [
            HopKind::Send,
            HopKind::Nat,
            HopKind::Nat,
            HopKind::Xmit,
            HopKind::Drop
        ]
    );
    let (dnat, snat) = (
        p.hops[1].nat.as_ref().unwrap(),
        p.hops[2].nat.as_ref().unwrap(),
    );
    assert_eq!(
        (dnat.nat, dnat.nf_hook, snat.nat, snat.nf_hook),
        (
            NatKind::Dnat,
            NfHook::Output,
            NatKind::Snat,
            NfHook::Postrouting
        )
    );
    let addr = |a: &udptrace_common::Addr| crate::pipeline::events::socket_addr(a);
    assert_eq!(dnat.before.dst, addr(&send_ev.dst));
    assert_eq!(
        (dnat.after.src, dnat.after.dst),
        (addr(&send_ev.src), addr(&after_dst))
    );
    assert_eq!(snat.before, dnat.after);
    assert_eq!(
        (snat.after.src, snat.after.dst),
        (addr(&after_src), addr(&after_dst))
    );
}

/// A datagram dropped before the NAT link: its drop carries the destination NAT, shown
/// before the drop.
#[test]
fn a_drop_carrying_a_destination_nat_shows_it_first() {
    use udptrace_common::SKB_DNAT_BEFORE;
    let mut a = Assembler::new(clock(), reasons());
    let mut out = Vec::new();
    let mut ingress = sample_skb(KIND_INGRESS);
    ingress.header.ts_ns = 10;
    a.push(&Event::Skb(ingress), &mut out);
    let mut drop = sample_skb(KIND_DROP);
    drop.header.ts_ns = 20;
    drop.outer_dst = drop.dst;
    drop.dst.port = 5354;
    drop.flags |= SKB_DNAT_BEFORE;
    a.push(&Event::Skb(drop), &mut out);
    a.flush(&mut out);
    let p = out.first().expect("a path");
    let kinds: Vec<HopKind> = p.hops.iter().map(|h| h.kind).collect();
    assert_eq!(kinds, [HopKind::Ingress, HopKind::Nat, HopKind::Drop]);
    let nat = p.hops[1].nat.as_ref().unwrap();
    assert_eq!((nat.nat, nat.nf_hook), (NatKind::Dnat, NfHook::Prerouting));
    assert_eq!(nat.before.dst.unwrap().port(), 5353);
    assert_eq!(nat.after.dst.unwrap().port(), 5354);
    assert!(p.hops[1].tunnel.is_none());
}
