//! Packets no sane stack sends, crafted with scapy (Debian's python3-scapy) and put on the
//! wire of a veth: truncated and mis-sized UDP, IP options, fragments alone and in order,
//! IPv6 extension headers, zero checksums, VXLAN with garbage inside. The kernel decides each
//! one's fate; the tracer must not change it, must survive, and flags the mis-sized ones.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use serde_json::Value;
use udptrace_testkit::*;

/// Sends the crafted packets out of `ut-a` to `mac` (ut-b). Fragment ids come from argv[2]
/// so a run's fragments never meet an earlier run's still waiting for reassembly.
const CRAFT: &str = r#"
import sys
from scapy.all import (Ether, IP, IPv6, UDP, Raw, VXLAN, IPOption_RR, IPv6ExtHdrHopByHop,
                       IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, fragment, fragment6, sendp)
mac, ids = sys.argv[1], int(sys.argv[2])
A4, B4, A6, B6 = '10.203.0.1', '10.203.0.2', 'fd0c:203::1', 'fd0c:203::2'
e = Ether(dst=mac)
def u(**kw):
    return UDP(sport=20700, dport=20701, **kw)
p = []
p.append(e/IP(src=A4, dst=B4)/u()/Raw(b'well-formed'))
# Only 4 bytes of a UDP header.
p.append(e/IP(src=A4, dst=B4, proto=17)/Raw(bytes(u())[:4]))
# UDP length beyond the IP payload, and below a UDP header.
p.append(e/IP(src=A4, dst=B4)/u(len=200)/Raw(b'claims-more'))
p.append(e/IP(src=A4, dst=B4)/u(len=4)/Raw(b'tiny'))
# UDP length shorter than the IP payload: the kernel trims the datagram to it.
p.append(e/IP(src=A4, dst=B4)/u(len=12, chksum=0)/Raw(b'trimXXXXXXXXXXXX'))
# IP options (record route).
p.append(e/IP(src=A4, dst=B4, options=[IPOption_RR(routers=['0.0.0.0', '0.0.0.0'])])/u()/Raw(b'ip-options'))
# One datagram in three fragments; a middle and a last fragment whose first never comes.
p += [e/f for f in fragment(IP(src=A4, dst=B4, id=ids)/u()/Raw(b'F' * 2400), fragsize=1000)]
p.append(e/IP(src=A4, dst=B4, id=ids + 1, flags='MF', frag=125, proto=17)/Raw(b'M' * 1000))
p.append(e/IP(src=A4, dst=B4, id=ids + 2, frag=250, proto=17)/Raw(b'L' * 400))
# IPv6 behind hop-by-hop and destination options headers, and in fragments.
p.append(e/IPv6(src=A6, dst=B6)/IPv6ExtHdrHopByHop()/IPv6ExtHdrDestOpt()/u()/Raw(b'v6-ext'))
p += [e/f for f in fragment6(IPv6(src=A6, dst=B6)/IPv6ExtHdrFragment(id=ids)/u()/Raw(b'G' * 2400), 1280)]
# A zero checksum: "none" for IPv4, forbidden for IPv6.
p.append(e/IP(src=A4, dst=B4)/u(chksum=0)/Raw(b'zero-v4'))
p.append(e/IPv6(src=A6, dst=B6)/u(chksum=0)/Raw(b'zero-v6'))
# VXLAN with garbage inside; with an inner Ethernet header saying IPv4, then a cut IPv4
# header claiming 60 bytes; saying IPv6, then 3 bytes.
vx = e/IP(src=A4, dst=B4)/UDP(sport=20700, dport=4789)/VXLAN(vni=42, flags=0x08)
p.append(vx/Raw(bytes(range(64))))
p.append(vx/Raw(b'\x02' * 12 + b'\x08\x00' + b'\x4f\xff\xff\xff\xff'))
p.append(vx/Raw(b'\x02' * 12 + b'\x86\xdd' + b'\x60\x00\x00'))
sendp(p, iface='ut-a', verbose=False)
"#;

/// What the receiver read, in order, and the UDP counters of b's kernel that moved.
#[derive(Debug, PartialEq, Eq)]
struct Fate {
    received: Vec<String>,
    counters: BTreeMap<String, i64>,
}

/// Sends the crafted packets once and returns their fate as b saw it.
fn craft(net: &Pair, mac: &str, ids: u16) -> Fate {
    let script = "import socket,select\nss=[]\n\
        for fam,a in ((socket.AF_INET,'10.203.0.2'),(socket.AF_INET6,'fd0c:203::2')):\n \
        s=socket.socket(fam,socket.SOCK_DGRAM)\n s.bind((a,20701))\n ss.append(s)\n\
        print('ready',flush=True)\nwhile True:\n \
        for s in select.select(ss,[],[])[0]:\n  d=s.recv(4096)\n  \
        print(d[:12].decode('latin-1'),len(d),flush=True)\n";
    let (mut rx, lines) = spawn_ready(net.b.cmd(PYTHON).args(["-c", script]));
    let before = udp_counters(&net.b);
    let sent = net
        .a
        .cmd(PYTHON)
        .args(["-c", CRAFT, mac, &ids.to_string()])
        .output()
        .unwrap();
    assert!(sent.status.success(), "scapy: {sent:?}");
    std::thread::sleep(Duration::from_millis(700));
    let after = udp_counters(&net.b);
    let _ = rx.kill();
    let _ = rx.wait();
    // Two sockets: the order between them is the scheduler's.
    let mut received: Vec<String> = lines.map_while(Result::ok).collect();
    received.sort();
    let counters = counters_moved(&before, &after);
    Fate { received, counters }
}

fn mac_of_b(net: &Pair) -> String {
    let out = net
        .b
        .cmd("cat")
        .arg("/sys/class/net/ut-b/address")
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn crafted_packets_keep_their_fate_crash_nothing_and_are_flagged() {
    require_root();
    let net = Pair::new(&[]);
    let mac = mac_of_b(&net);
    // Ground truth: the kernel alone.
    let truth = craft(&net, &mac, 1000);
    assert!(
        truth.received.iter().any(|r| r.starts_with("well-formed")),
        "the well-formed datagram arrives: {truth:?}"
    );
    assert!(
        truth.received.iter().any(|r| r == "trim 4"),
        "the kernel trims to the UDP length: {truth:?}"
    );
    // Both ways udptrace runs: the agent (sampling) and trace (every path).
    let agent = Agent::start(&["--netns", "all"]);
    let tracer = Tracer::start(&["--netns", "all", "--port", "20701"]);
    let traced = craft(&net, &mac, 2000);
    assert_eq!(
        traced, truth,
        "the tracers changed what b received or counted"
    );
    let deadline = Instant::now() + Duration::from_secs(6);
    let mut paths = Vec::new();
    while Instant::now() < deadline {
        paths.extend(tracer.paths(64, Duration::from_millis(500)));
    }
    // The three mis-sized ones (4 bytes of header; length 200 for 11 bytes; length 4) are
    // flagged at every hop and dropped, as b counted them.
    let flagged: Vec<&Value> = paths
        .iter()
        .filter(|p| {
            p["hops"]
                .as_array()
                .unwrap()
                .iter()
                .any(|h| h["malformed"] == true)
        })
        .collect();
    let claimed: Vec<u64> = flagged
        .iter()
        .filter_map(|p| p["hops"][0]["len"].as_u64())
        .collect();
    assert_eq!(flagged.len(), 3, "{paths:#?}");
    assert_eq!(truth.counters.get("UdpInErrors"), Some(&3), "{truth:?}");
    assert!(claimed.contains(&192), "length 200 flagged: {flagged:#?}");
    for p in &flagged {
        assert_eq!(p["verdict"], "dropped", "{p}");
        let hops = p["hops"].as_array().unwrap();
        assert!(hops.iter().all(|h| h["malformed"] == true), "{p}");
        if hops[0]["len"] == 192 {
            assert_eq!(hops.last().unwrap()["reason"], "PKT_TOO_SMALL", "{p}");
        }
    }
    // Well-formed datagrams are not flagged.
    for p in &paths {
        if p["verdict"] == "delivered" {
            assert!(
                p["hops"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|h| h["malformed"].is_null()),
                "{p}"
            );
        }
    }
    // One delivered path per datagram b's receiver read (fragments and all).
    let delivered = paths.iter().filter(|p| p["verdict"] == "delivered").count();
    assert_eq!(delivered, truth.received.len(), "{paths:#?}");
    // Both still work, and stop cleanly.
    py_send(&net.a, B4, 20701, "sendto", 8);
    let after: Vec<Value> = tracer.paths(1, Duration::from_secs(5));
    assert_eq!(after.len(), 1, "trace still traces: {}", tracer.stderr());
    assert!(agent.get("/api/v1/flows").contains("flows"));
    assert!(tracer.stop().success());
    let (status, stderr) = agent.stop(libc::SIGTERM);
    assert!(status.success(), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
