//! Trace filters decided in the kernel: a datagram `--port`/`--host` leaves out returns
//! early at every hop and is never assembled in userspace, however busy its flow; a rewrite
//! that makes a datagram match traces it from there on, and one that makes a traced datagram
//! stop matching does not lose it.

use std::time::Duration;

use serde_json::Value;
use udptrace_testkit::*;

const UNRELATED: u16 = 20996;
const VIP_PORT: u16 = 20997;
const BACKEND: u16 = 20998;
const VIP: &str = "10.203.0.9";

/// `n` datagrams from a's connected socket to `host:port`.
fn send(net: &Pair, host: &str, port: u16, n: usize) {
    let script = format!(
        "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.connect(('{host}', {port}))\nfor _ in range({n}): s.send(b'f' * 32)\n"
    );
    let out = net.a.cmd(PYTHON).args(["-c", &script]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
}

/// The number in trace's exit line before ` traced`.
fn traced(stderr: &str) -> u64 {
    let line = stderr
        .lines()
        .find(|l| l.starts_with("udptrace: stopped"))
        .unwrap_or_else(|| panic!("no exit line:\n{stderr}"));
    let before = &line[..line.find(" traced").expect("traced count")];
    before
        .rsplit(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{line}"))
}

fn nat_hop(path: &Value) -> &Value {
    path["hops"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["kind"] == "nat")
        .unwrap_or_else(|| panic!("no nat hop: {path}"))
}

#[test]
fn a_filtered_trace_assembles_only_what_matches_before_or_after_nat() {
    require_root();
    let net = Pair::new(&[]);
    // A Service-like VIP:port, DNATed to the backend.
    dnat_output(&net.a, Some(VIP), VIP_PORT, &format!("{B4}:{BACKEND}"));
    let Some(_) = nat_hook() else { return };
    let (_backend, _backend_lines) = py_receiver(&net.b, B4, BACKEND);
    // The unrelated flow's receiver reads silently.
    let silent = format!(
        "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.bind(('{B4}', {UNRELATED}))\nprint('ready', flush=True)\nwhile True: s.recv(4096)\n"
    );
    let (_other, _other_lines) = spawn_ready(net.b.cmd(PYTHON).args(["-c", &silent]));
    // Filtering on the backend (matches after the rewrite) and on the VIP (matches before).
    let mut by_backend = Tracer::start(&["--netns", "all", "--port", &BACKEND.to_string()]);
    let mut by_vip = Tracer::start(&["--netns", "all", "--host", VIP]);
    for t in [&by_backend, &by_vip] {
        assert!(
            t.stderr().contains("in the kernel"),
            "the start line says where the filter acts: {}",
            t.stderr()
        );
    }
    // A busy unrelated flow, then five datagrams to the VIP.
    send(&net, B4, UNRELATED, 3000);
    send(&net, VIP, VIP_PORT, 5);
    for (name, tracer) in [("--port", &by_backend), ("--host", &by_vip)] {
        let paths = tracer.paths(5, Duration::from_secs(10));
        assert_eq!(paths.len(), 5, "{name}: {}", tracer.stderr());
        for p in &paths {
            assert_eq!(p["verdict"], "delivered", "{name}: {p}");
            let nat = nat_hop(p);
            assert_eq!(nat["before"]["dst"], format!("{VIP}:{VIP_PORT}"), "{p}");
            assert_eq!(nat["after"]["dst"], format!("{B4}:{BACKEND}"), "{p}");
            // Matched before the rewrite: the whole way. Matched after it: from the rewrite
            // on, and the send hop too where it reports after the skb hops (the
            // tracepoint; the socket shares the decision).
            let first = if name == "--host" || send_hop_reports_after_skbs() {
                "send"
            } else {
                "nat"
            };
            assert_eq!(p["hops"][0]["kind"], first, "{name}: {p}");
        }
    }
    // Nothing of the unrelated flow reached userspace: the kernel left it out.
    for (name, tracer) in [("--port", &mut by_backend), ("--host", &mut by_vip)] {
        tracer.signal(libc::SIGINT);
        assert!(tracer.wait(Duration::from_secs(10)).success());
        let n = traced(&tracer.stderr());
        assert!(n <= 10, "{name}: {n} paths assembled\n{}", tracer.stderr());
    }
}
