//! Drops: each path ends `dropped` with the kernel's reason, in the namespace where it
//! happened, checked against ground truth (tcpdump, nstat, iptables counters).

use std::{
    io::{BufRead as _, BufReader},
    process::Stdio,
    time::Duration,
};

use serde_json::Value;
use udptrace_testkit::*;

fn last_hop(path: &Value) -> &Value {
    path["hops"].as_array().unwrap().last().unwrap()
}

/// A counter from `nstat` in `ns` (absolute value).
fn nstat(ns: &Netns, counter: &str) -> u64 {
    let out = ns
        .cmd("nstat")
        .args(["-az", counter])
        .output()
        .expect("nstat");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| {
            l.strip_prefix(counter)
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or_else(|| panic!("no {counter} in {text}"))
}

#[test]
fn no_listener_in_another_namespace_is_no_socket_there() {
    require_root();
    for (dst, port, udp_no_ports) in [(B4, 20401u16, "UdpNoPorts"), (B6, 20402, "Udp6NoPorts")] {
        let net = Pair::new(&[]);
        let p = port.to_string();
        let dump = tcpdump(&net.b, "ut-b", &format!("udp port {port}"));
        let no_ports = nstat(&net.b, udp_no_ports);
        let tracer = Tracer::start(&["--port", &p, "--count", "1"]);
        let (pid, out) = py_send(&net.a, dst, port, "sendto", 10);
        let path = tracer.one_path();
        // Followed into B (the default): its way in, then the drop.
        assert_eq!(
            hop_kinds(&path),
            ["send", "xmit", "ingress", "drop"],
            "{path}"
        );
        let (send, xmit, ingress, drop) = (
            &path["hops"][0],
            &path["hops"][1],
            &path["hops"][2],
            &path["hops"][3],
        );
        assert_eq!(
            (ingress["ifname"].as_str(), &ingress["netns"]),
            (Some("ut-b"), &net.b.inode().into())
        );
        assert_eq!(send["pid"], pid);
        assert_eq!(
            (xmit["ifname"].as_str(), &xmit["netns"]),
            (Some("ut-a"), &net.a.inode().into())
        );
        assert_eq!(drop["reason"], "NO_SOCKET", "{path}");
        assert_eq!(
            drop["netns"],
            net.b.inode(),
            "dropped in the receiver's namespace"
        );
        assert_eq!(drop["ifname"], "ut-b");
        assert_eq!(path["verdict"], "dropped");
        let sport = sent_port(&out);
        assert!(
            drop["src"]
                .as_str()
                .unwrap()
                .ends_with(&format!(":{sport}")),
            "{drop}"
        );
        // Ground truth: the datagram reached ut-b, and B counted it as having no port.
        let seen = dump.wait_with_output().unwrap();
        let seen = String::from_utf8_lossy(&seen.stdout);
        assert!(
            seen.contains(&format!(".{port}: UDP, length 10")),
            "tcpdump saw: {seen}"
        );
        assert_eq!(nstat(&net.b, udp_no_ports), no_ports + 1);
    }
}

#[test]
fn an_input_drop_rule_is_netfilter_drop_in_that_namespace() {
    require_root();
    let net = Pair::new(&[]);
    // Like a NetworkPolicy ingress rule on the receiving "pod".
    iptables(
        &net.b,
        &["-A", "INPUT", "-p", "udp", "--dport", "20403", "-j", "DROP"],
    );
    let tracer = Tracer::start(&["--port", "20403", "--count", "1"]);
    py_send(&net.a, B4, 20403, "sendto", 7);
    let path = tracer.one_path();
    let drop = last_hop(&path);
    assert_eq!(
        (drop["kind"].as_str(), drop["reason"].as_str()),
        (Some("drop"), Some("NETFILTER_DROP")),
        "{path}"
    );
    assert_eq!(drop["netns"], net.b.inode());
    assert_eq!(path["verdict"], "dropped");
    // Ground truth: the rule's own packet counter.
    assert_eq!(input_rule_packets(&net.b, 20403), 1);
}

#[test]
fn a_receiver_that_never_reads_drops_socket_rcvbuff() {
    require_root();
    let net = Pair::new(&[]);
    // A receiver with the smallest buffer the kernel allows, which never reads.
    let mut receiver = net
        .b
        .cmd(PYTHON)
        .args([
            "-c",
            "import socket,sys,time\n\
             s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
             s.setsockopt(socket.SOL_SOCKET,socket.SO_RCVBUF,1)\n\
             s.bind(('10.203.0.2',20404))\n\
             print('ready',flush=True)\n\
             time.sleep(60)",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let receiver_pid = receiver.id();
    let mut ready = String::new();
    BufReader::new(receiver.stdout.as_mut().unwrap())
        .read_line(&mut ready)
        .unwrap();
    assert_eq!(ready.trim(), "ready");
    let before = nstat(&net.b, "UdpRcvbufErrors");
    // --netns all: delivery into B's socket is seen from a link in B.
    let tracer = Tracer::start(&["--netns", "all", "--port", "20404"]);
    let burst = 30;
    let sender = net
        .a
        .cmd(PYTHON)
        .args([
            "-c",
            &format!(
                "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
                 for _ in range({burst}): s.sendto(b'z'*1000,('10.203.0.2',20404))"
            ),
        ])
        .status()
        .unwrap();
    assert!(sender.success());
    // Dropped paths end at once; queued ones time out as incomplete.
    let paths = tracer.paths(burst, Duration::from_secs(6));
    let _ = receiver.kill();
    let _ = receiver.wait();
    let rcvbuff: Vec<&Value> = paths
        .iter()
        .filter(|p| last_hop(p)["reason"] == "SOCKET_RCVBUFF")
        .collect();
    let dropped = nstat(&net.b, "UdpRcvbufErrors") - before;
    assert!(dropped > 0, "the buffer overflowed");
    assert_eq!(
        rcvbuff.len() as u64,
        dropped,
        "one dropped path per datagram the kernel counted"
    );
    for p in &rcvbuff {
        assert_eq!(last_hop(p)["netns"], net.b.inode());
        assert_eq!(p["verdict"], "dropped");
    }
    // The rest sit in the socket's queue: delivered to it. Nobody reads, so the process named
    // is the one holding the socket (found as `ss -p` does).
    let queued: Vec<&Value> = paths
        .iter()
        .filter(|p| p["verdict"] == "delivered")
        .collect();
    let verdicts: Vec<&str> = paths
        .iter()
        .map(|p| p["verdict"].as_str().unwrap())
        .collect();
    assert_eq!(
        queued.len() as u64 + dropped,
        burst as u64,
        "verdicts: {verdicts:?}"
    );
    for p in queued {
        let deliver = last_hop(p);
        assert_eq!(deliver["kind"], "deliver");
        assert_eq!(
            deliver["pid"], receiver_pid,
            "the socket's holder: {deliver}"
        );
        assert_eq!(deliver["netns"], net.b.inode());
    }
}
