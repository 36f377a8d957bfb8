//! Tracing under pressure: a flow table far too small for the traffic, an agent that stalls
//! (SIGSTOP) and a `trace` whose reader stalls, so both ring buffers fill and events are
//! lost. Every datagram must meet the same fate as without a tracer, the losses must be
//! counted where a user looks, and both tracers must trace on once the pressure is gone.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use serde_json::Value;
use udptrace_testkit::*;

/// Delivered; delivered after a DNAT to 20801; no socket (NoPorts); dropped by a rule.
const LISTEN: u16 = 20801;
const CLOSED: u16 = 20802;
const DNAT: u16 = 20803;
const FILTERED: u16 = 20804;

/// From `flows` sockets, `rounds` datagrams to each of the four ports, in bursts small
/// enough that b's receiver keeps up (its socket buffer never overflows, so the kernel's
/// own fate of every datagram is the same in every run).
const BLAST: &str = r#"
import socket, sys, time
host, flows, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ports = [int(p) for p in sys.argv[4:]]
socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(flows)]
sent = 0
for r in range(rounds):
    for s in socks:
        for port in ports:
            s.sendto(b'pressure', (host, port))
            sent += 1
            if sent % 200 == 0:
                time.sleep(0.003)
print(sent, flush=True)
"#;

/// Reads until nothing came for 3 seconds (30 for the first datagram: under an emulated CPU
/// the sender takes a while to start); prints the count.
const RECEIVE: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE
s.bind((sys.argv[1], int(sys.argv[2])))
s.settimeout(30.0)
print('ready', flush=True)
n = 0
try:
    while True:
        s.recv(64)
        n += 1
        s.settimeout(3.0)
except socket.timeout:
    pass
print(n, flush=True)
"#;

#[derive(Debug, PartialEq, Eq)]
struct Fate {
    sent: u64,
    received: u64,
    /// Packets the DROP rule matched.
    filtered: u64,
    counters: BTreeMap<String, i64>,
}

/// Sends the blast once; its fate as b saw it.
fn blast(net: &Pair, flows: usize, rounds: usize) -> Fate {
    let (mut rx, mut lines) =
        spawn_ready(
            net.b
                .cmd(PYTHON)
                .args(["-c", RECEIVE, B4, &LISTEN.to_string()]),
        );
    let (before, filtered_before) = (udp_counters(&net.b), input_rule_packets(&net.b, FILTERED));
    let out = net
        .a
        .cmd(PYTHON)
        .args(["-c", BLAST, B4, &flows.to_string(), &rounds.to_string()])
        .args([LISTEN, CLOSED, DNAT, FILTERED].map(|p| p.to_string()))
        .output()
        .unwrap();
    assert!(out.status.success(), "sender: {out:?}");
    let sent = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    let received = lines
        .next()
        .and_then(Result::ok)
        .and_then(|l| l.trim().parse().ok())
        .expect("the receiver's count");
    let _ = rx.wait();
    Fate {
        sent,
        received,
        filtered: input_rule_packets(&net.b, FILTERED) - filtered_before,
        counters: counters_moved(&before, &udp_counters(&net.b)),
    }
}

#[test]
fn full_maps_and_lost_events_change_no_datagrams_fate() {
    require_root();
    let net = Pair::new(&[]);
    dnat_prerouting(&net.b, DNAT, &format!("{B4}:{LISTEN}"));
    iptables(
        &net.b,
        &[
            "-A",
            "INPUT",
            "-p",
            "udp",
            "--dport",
            &FILTERED.to_string(),
            "-j",
            "DROP",
        ],
    );
    let (flows, rounds) = (300, 10);
    let truth = blast(&net, flows, rounds);
    let per_port = (flows * rounds) as u64;
    assert_eq!(truth.sent, 4 * per_port);
    assert_eq!(truth.received, 2 * per_port, "{truth:?}");
    assert_eq!(truth.filtered, per_port, "{truth:?}");
    assert_eq!(truth.counters.get("UdpNoPorts"), Some(&(per_port as i64)));
    assert_eq!(truth.counters.get("UdpRcvbufErrors"), None, "{truth:?}");

    // The agent keeps 16 flows for 300, traces every datagram, and is stopped while the
    // traffic runs; trace's output is not read at all.
    let agent = Agent::start(&[
        "--netns",
        "all",
        "--paths",
        "on",
        "--flow-entries",
        "16",
        "--sample-every",
        "1",
        "--sample-first",
        "0",
    ]);
    // With the kernel programs' own logs on: they say what they lost, as it happens.
    let mut tracer = Tracer::start_held(&["--netns", "all", "--log-level", "debug"]);
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(agent.pid() as i32, libc::SIGSTOP) };
    let traced = blast(&net, flows, rounds);
    // SAFETY: as above.
    unsafe { libc::kill(agent.pid() as i32, libc::SIGCONT) };
    assert_eq!(
        traced, truth,
        "the tracers changed what b received or counted"
    );

    // The pressure was real, and is reported where a user looks.
    std::thread::sleep(Duration::from_secs(3));
    let lost = agent.metric("udptrace_events_lost_total").unwrap();
    assert!(lost > 0.0, "the stopped agent lost events");
    let evicted = agent.metric("udptrace_flow_evictions_total").unwrap();
    assert!(evicted > 0.0, "16 entries for {flows} flows evict");
    tracer.release_output();
    let drained = tracer.paths(usize::MAX, Duration::from_secs(5));
    assert!(!drained.is_empty(), "{}", tracer.stderr());

    // Both trace on: one more datagram (to the closed port), seen whole by each.
    let (_, sent) = py_send(&net.a, B4, CLOSED, "sendto", 9);
    let port = sent_port(&sent);
    // Its 9 bytes tell it from a straggler of the blast's 8-byte datagrams, and its port
    // may have been one of the blast's (ephemeral ports are reused).
    let is_fresh = |p: &Value| {
        p["hops"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h["kind"] == "send" && h["len"] == 9)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let fresh = loop {
        let next = tracer.paths(1, Duration::from_secs(1));
        if let Some(p) = next.into_iter().find(|p| is_fresh(p)) {
            break p;
        }
        assert!(Instant::now() < deadline, "{}", tracer.stderr());
    };
    assert_eq!(fresh["verdict"], "dropped", "{fresh}");
    assert_eq!(
        hop_kinds(&fresh),
        ["send", "xmit", "ingress", "drop"],
        "{fresh}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let body: Value =
            serde_json::from_str(&agent.get(&format!("/api/v1/paths?port={port}"))).unwrap();
        if body["paths"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["verdict"] == "dropped" && is_fresh(p))
        {
            break;
        }
        assert!(Instant::now() < deadline, "{body}\n{}", agent.stderr());
        std::thread::sleep(Duration::from_millis(200));
    }
    // trace says how much it lost on the way out.
    tracer.signal(libc::SIGINT);
    assert!(tracer.wait(Duration::from_secs(10)).success());
    std::thread::sleep(Duration::from_millis(200));
    let stderr = tracer.stderr();
    let lost: u64 = stderr
        .lines()
        .find_map(|l| {
            l.split(" event(s) lost to a full ring buffer")
                .next()?
                .rsplit(' ')
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no loss count in {stderr}"));
    assert!(lost > 0, "trace's blocked reader lost events: {stderr}");
    assert!(
        stderr.contains("event ring buffer full: a hop event was lost"),
        "the kernel programs' log names the loss: {}",
        stderr.lines().rev().take(40).collect::<Vec<_>>().join("\n")
    );
    let (status, stderr) = agent.stop(libc::SIGTERM);
    assert!(status.success(), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
