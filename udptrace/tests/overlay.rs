//! Overlays: a datagram between two "nodes" over VXLAN keeps one path across the tunnel, with
//! an encap hop naming the VNI and the node-to-node addresses, checked against tcpdump on the
//! underlay.

mod common;

use std::{
    io::{BufRead as _, BufReader},
    process::Stdio,
};

use common::*;

#[test]
fn a_datagram_over_vxlan_shows_its_encapsulation_and_arrives() {
    require_root();
    let net = Pair::new(&[]);
    // The overlay: vx0 in each node, VNI 42, over the underlay veth (10.203.0.0/24).
    for (ns, local, remote, overlay) in [
        (&net.a, A4, B4, "10.205.0.1/24"),
        (&net.b, B4, A4, "10.205.0.2/24"),
    ] {
        let dev = if std::ptr::eq(ns, &net.a) {
            "ut-a"
        } else {
            "ut-b"
        };
        ns.ip(&[
            "link", "add", "vx0", "type", "vxlan", "id", "42", "local", local, "remote", remote,
            "dstport", "4789", "dev", dev,
        ]);
        ns.ip(&["addr", "add", overlay, "dev", "vx0"]);
        ns.ip(&["link", "set", "vx0", "up"]);
    }
    let mut receiver = net
        .b
        .cmd(PYTHON)
        .args([
            "-c",
            "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
             s.bind(('10.205.0.2',20701))\nprint('ready',flush=True)\n\
             d,a=s.recvfrom(100)\nprint(a[0],a[1],flush=True)\nimport time\ntime.sleep(2)",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(receiver.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "ready");
    // Only A's VXLAN packets whose inner packet is IPv4 UDP (not ARP, not MLD reports):
    // inner ethertype at UDP offset 8 + 8 + 12, inner IP protocol at 8 + 8 + 14 + 9.
    let dump = tcpdump(
        &net.b,
        "ut-b",
        "src host 10.203.0.1 and udp dst port 4789 and udp[28:2] = 0x0800 and udp[39] = 17",
    );
    let tracer = Tracer::start(&["--netns", "all", "--port", "20701", "--count", "1"]);
    let nc = nc_send(Some(&net.a), &[], "10.205.0.2", 20701);
    let seen = lines.next().unwrap().unwrap();
    let path = tracer.one_path();
    // The receiver stays up a moment, like a server: its socket names it on a kernel where
    // no reader hook saw it (see docs/architecture.md).
    let _ = receiver.kill();
    let _ = receiver.wait();

    assert_eq!(path["verdict"], "delivered", "{path}");
    assert_eq!(path["hops"][0]["pid"], nc);
    let hops = path["hops"].as_array().unwrap();
    let xmit_vx0 = hops
        .iter()
        .find(|h| h["kind"] == "xmit" && h["ifname"] == "vx0");
    assert!(xmit_vx0.is_some(), "the overlay device sends it: {path}");
    let encap = hops
        .iter()
        .find(|h| h["kind"] == "encap")
        .unwrap_or_else(|| panic!("no encap hop: {path}"));
    assert_eq!(encap["tunnel"], "vxlan");
    assert_eq!(encap["vni"], 42);
    assert_eq!(encap["ifname"], "ut-a");
    assert_eq!(encap["netns"], net.a.inode());
    assert!(
        encap["outer"]["src"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{A4}:")),
        "{encap}"
    );
    assert_eq!(encap["outer"]["dst"], format!("{B4}:4789"));
    assert_eq!(
        encap["dst"], "10.205.0.2:20701",
        "src/dst stay the inner datagram's"
    );
    let deliver = hops.last().unwrap();
    assert_eq!(
        (deliver["kind"].as_str(), deliver["comm"].as_str()),
        (Some("deliver"), Some("python3"))
    );
    assert_eq!(deliver["netns"], net.b.inode());
    let mut words = seen.split_whitespace();
    assert_eq!(
        path["final"]["src"],
        format!("{}:{}", words.next().unwrap(), words.next().unwrap())
    );
    // Ground truth: the underlay carried it in VXLAN with VNI 42.
    let out = dump.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.contains("VXLAN, flags [I] (0x08), vni 42"),
        "tcpdump: {out}"
    );
    assert!(
        out.contains("10.205.0.1.") && out.contains("> 10.205.0.2.20701: UDP, length 3"),
        "tcpdump: {out}"
    );
}
