//! The agent under sustained load: one sender as fast as it can over 200 flows (nine in ten
//! datagrams to a listener, one to a closed port), for `UDPTRACE_SOAK_SECS` seconds (60 by
//! default; `cargo xtask soak --secs 600` for the long one). Its memory and open file
//! descriptors must stay flat once warm, no event may be lost then, and every datagram must
//! be counted on its flow.

use std::{
    process::Stdio,
    time::{Duration, Instant},
};

use serde_json::Value;
use udptrace_testkit::*;

const LISTEN: u16 = 20811;
const CLOSED: u16 = 20812;

/// Sends until the time is up; prints how many datagrams went to each port, and how many
/// sends failed.
const SENDER: &str = r#"
import socket, sys, time
host, secs, flows, listen, closed = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(flows)]
to_listen, to_closed = (host, listen), (host, closed)
sent = [0, 0]
errors = 0
i = 0
end = time.monotonic() + secs
while time.monotonic() < end:
    for _ in range(1000):
        closed_one = i % 10 == 9
        try:
            socks[i % flows].sendto(b'soak', to_closed if closed_one else to_listen)
            sent[closed_one] += 1
        except OSError:
            errors += 1
        i += 1
print(sent[0], sent[1], errors, flush=True)
"#;

const RECEIVER: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
print('ready', flush=True)
while True:
    s.recv(64)
"#;

fn soak_secs() -> u64 {
    std::env::var("UDPTRACE_SOAK_SECS")
        .ok()
        .map(|s| s.parse().expect("UDPTRACE_SOAK_SECS: seconds"))
        .unwrap_or(60)
}

/// The agent's packet count over the flows to `port`, once it has read the kernel's
/// counters after the last datagram (it reads them every second).
fn counted(agent: &Agent, port: u16, want: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let body: Value =
            serde_json::from_str(&agent.get(&format!("/api/v1/flows?port={port}"))).unwrap();
        let n = body["flows"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f["orig"]["dst"].as_str() == Some(&format!("{B4}:{port}")))
            .filter_map(|f| f["packets"].as_u64())
            .sum();
        if n >= want || Instant::now() > deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn memory_and_fds_stay_flat_and_every_datagram_is_counted() {
    require_root();
    let secs = soak_secs();
    let net = Pair::new(&[]);
    let (_receiver, _) = spawn_ready(net.b.cmd(PYTHON).args(["-c", RECEIVER, B4, "20811"]));
    let agent = Agent::start(&["--netns", "all", "--paths", "on"]);
    let sender = net
        .a
        .cmd(PYTHON)
        .args(["-c", SENDER, B4, &secs.to_string(), "200"])
        .args([LISTEN, CLOSED].map(|p| p.to_string()))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Warm: the recent-path ring is full and the flow table holds every flow.
    let started = Instant::now();
    let warm_at = Duration::from_secs((secs / 4).max(10));
    let mut samples = Vec::new();
    let mut warm = None;
    let mut lost_warming = None;
    let mut waited_warm = Duration::ZERO;
    while started.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_secs(2));
        let sample = (
            started.elapsed().as_secs(),
            agent.rss_kib(),
            agent.fds().total,
        );
        if warm.is_none() && started.elapsed() >= warm_at {
            warm = Some(sample);
            lost_warming = agent.metric("udptrace_events_lost_total");
            waited_warm = agent.cpu_wait();
        }
        samples.push(sample);
    }
    let out = sender.wait_with_output().unwrap();
    assert!(out.status.success(), "sender: {out:?}");
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    let n: Vec<u64> = line
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    let (to_listen, to_closed, errors) = (n[0], n[1], n[2]);
    let elapsed = started.elapsed().as_secs_f64();
    eprintln!(
        "soak: {secs} s, {} datagrams ({:.0}/s), {errors} failed sends; (s, RSS KiB, fds): {samples:?}",
        to_listen + to_closed,
        (to_listen + to_closed) as f64 / elapsed
    );
    assert!(to_listen > 0 && to_closed > 0);

    // No lost flow counts: the kernel counts per flow, the agent sums and keeps them.
    assert_eq!(counted(&agent, LISTEN, to_listen), to_listen);
    assert_eq!(counted(&agent, CLOSED, to_closed), to_closed);
    for metric in [
        "udptrace_flows_not_counted_total",
        "udptrace_flow_evictions_total",
    ] {
        assert_eq!(agent.metric(metric), Some(0.0), "{metric}");
    }
    // The start is a burst (every flow's first datagrams are traced whole, every tenth
    // datagram is a drop, reported always); once warm, the agent keeps up: not one event lost.
    // One condition it cannot hold: other work on the machine keeping the agent off the
    // CPUs (the ring buffer holds ~1 MiB of hop events, tens of milliseconds of this load).
    // The agent's threads' run-queue wait tells that apart from an agent too slow: waiting
    // for a CPU more than 2% of the time once warm (this load alone: 41 ms in 45 s, 0.1%,
    // on 2 cores; the figure is printed), lost events are reported as that, not failed;
    // otherwise not one may be lost.
    let lost_warming = lost_warming.expect("udptrace_events_lost_total at the warm mark");
    let lost = agent.metric("udptrace_events_lost_total").unwrap() - lost_warming;
    let waited = agent.cpu_wait().saturating_sub(waited_warm);
    let warm_secs = secs.saturating_sub(warm_at.as_secs()).max(1);
    let busy = waited.as_secs_f64() > 0.02 * warm_secs as f64;
    eprintln!(
        "soak: {lost_warming} event(s) lost while warming up, {lost} after; the agent waited \
         {waited:?} for a CPU in {warm_secs} s once warm"
    );
    if busy && lost > 0.0 {
        eprintln!(
            "soak: {lost} event(s) lost while other work kept the agent waiting {waited:?} for \
             a CPU: not held against it"
        );
    } else {
        assert_eq!(
            lost, 0.0,
            "events lost under sustained load, the machine not busy"
        );
    }

    // Flat once warm: memory within 8 MiB or 10% of the warm mark; not one fd more.
    let (at, warm_rss, warm_fds) = warm.expect("a sample after warm-up");
    for &(t, rss, fds) in samples.iter().filter(|s| s.0 > at) {
        assert!(
            rss <= warm_rss + (8 * 1024).max(warm_rss / 10),
            "RSS grew from {warm_rss} KiB at {at} s to {rss} KiB at {t} s: {samples:?}"
        );
        assert!(
            fds <= warm_fds,
            "open fds grew from {warm_fds} at {at} s to {fds} at {t} s: {samples:?}"
        );
    }
    let (status, stderr) = agent.stop(libc::SIGTERM);
    assert!(status.success(), "{stderr}");
}
