//! Overlays: a datagram between two "nodes" over VXLAN keeps one path across the tunnel, with
//! encap and decap hops naming the VNI and the node-to-node addresses, checked against tcpdump
//! on the underlay. And datagrams larger than the overlay's MTU: cut into fragments and put
//! back together, or (don't-fragment set) dropped with ICMP fragmentation-needed.

use udptrace_testkit::*;

#[test]
fn a_datagram_over_vxlan_shows_its_encapsulation_and_arrives() {
    require_root();
    let net = Pair::new(&[]);
    overlay(&net);
    let (mut receiver, mut lines) = py_receiver(&net.b, "10.205.0.2", 20701);
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
    // Node b: tc ingress on the underlay sees the VXLAN packet, then the inner datagram comes
    // out of vx0: the decap hop, with the tunnel it came in.
    let kinds = hop_kinds(&path);
    let at = kinds.iter().position(|k| k == "encap").unwrap();
    assert_eq!(kinds[at + 1..at + 3], ["ingress", "decap"], "{path}");
    let (underlay, decap) = (&hops[at + 1], &hops[at + 2]);
    assert_eq!(
        (underlay["ifname"].as_str(), underlay["vni"].as_u64()),
        (Some("ut-b"), Some(42))
    );
    assert_eq!(underlay["netns"], net.b.inode());
    assert_eq!(
        (decap["ifname"].as_str(), decap["ifkind"].as_str()),
        (Some("vx0"), Some("vxlan"))
    );
    assert_eq!(decap["netns"], net.b.inode());
    assert_eq!(decap["vni"], 42);
    assert_eq!(decap["outer"], encap["outer"]);
    assert_eq!(decap["dst"], "10.205.0.2:20701");
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

/// Scenario 4, first half: a 3000-byte datagram over an overlay with a 1450-byte MTU is
/// cut into fragments at the sender, carried one by one, and put back together.
#[test]
fn a_datagram_larger_than_the_overlay_mtu_travels_in_fragments() {
    require_root();
    let net = Pair::new(&[]);
    overlay(&net);
    let (mut receiver, mut lines) = py_receiver(&net.b, "10.205.0.2", 20702);
    // Ground truth: the inner fragments on b's overlay device.
    let dump = tcpdump_with(
        &net.b,
        "vx0",
        &["-c", "3", "-v"],
        "ip and src host 10.205.0.1 and dst host 10.205.0.2",
    );
    let tracer = Tracer::start(&["--netns", "all", "--port", "20702", "--count", "1"]);
    let (pid, _) = py_send(&net.a, "10.205.0.2", 20702, "sendto", 3000);
    let seen = lines.next().unwrap().unwrap();
    let path = tracer.one_path();
    let _ = receiver.kill();
    let _ = receiver.wait();

    assert!(seen.ends_with(" 3000"), "the receiver got it whole: {seen}");
    assert_eq!(path["verdict"], "delivered", "{path}");
    assert_eq!(path["hops"][0]["pid"], pid);
    let kinds = hop_kinds(&path);
    assert_eq!(
        kinds,
        ["send", "fragment", "xmit", "encap", "ingress", "decap", "fragment", "deliver"],
        "{path}"
    );
    let frag = hops_of(&path, "fragment");
    let (split, joined) = (frag[0], frag[1]);
    assert_eq!(split["fragment"]["action"], "split");
    assert_eq!(split["ifname"], "vx0");
    assert_eq!(split["mtu"], 1450);
    assert_eq!(split["netns"], net.a.inode());
    assert_eq!(joined["fragment"]["action"], "reassembled");
    assert_eq!(joined["netns"], net.b.inode());
    let ip_id = split["fragment"]["ip_id"].as_u64().unwrap();
    // Every fragment went through every point: 3008 bytes of UDP in 1424-byte pieces.
    for hop in path["hops"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["fragment"].is_object())
    {
        assert_eq!(hop["fragment"]["fragments"], 3, "{hop}");
        assert_eq!(hop["fragment"]["ip_id"], ip_id, "{hop}");
    }
    assert_eq!(hops_of(&path, "deliver")[0]["len"], 3000);
    let explain = path["explain"].as_str().unwrap();
    assert!(
        explain.contains("as 3 IP fragments from vx0 (MTU 1450)"),
        "{explain}"
    );

    let out = dump.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    let pieces = out
        .lines()
        .filter(|l| l.contains(&format!("id {ip_id},")))
        .count();
    assert_eq!(pieces, 3, "tcpdump on b's vx0 saw the fragments: {out}");
}

/// Scenario 4, second half: a "pod" behind node a sends 1460 bytes with don't-fragment
/// set. It fits the pod's 1500-byte link but not node a's overlay (1450): node a drops it
/// and answers ICMP fragmentation-needed, which the pod's tcpdump sees.
#[test]
fn a_dont_fragment_datagram_too_big_for_the_overlay_is_dropped_with_frag_needed() {
    require_root();
    let net = Pair::new(&[]);
    overlay(&net);
    let pod = Netns::new("pod");
    sh(&[
        "ip",
        "link",
        "add",
        "ut-c",
        "netns",
        &pod.name,
        "type",
        "veth",
        "peer",
        "name",
        "ut-ca",
        "netns",
        &net.a.name,
    ]);
    pod.ip(&["addr", "add", "10.206.0.2/24", "dev", "ut-c"]);
    pod.ip(&["link", "set", "ut-c", "up"]);
    pod.ip(&["route", "add", "default", "via", "10.206.0.1"]);
    net.a.ip(&["addr", "add", "10.206.0.1/24", "dev", "ut-ca"]);
    net.a.ip(&["link", "set", "ut-ca", "up"]);
    sh(&[
        "ip",
        "netns",
        "exec",
        &net.a.name,
        "sysctl",
        "-qw",
        "net.ipv4.ip_forward=1",
    ]);
    let icmp = tcpdump_with(&pod, "ut-c", &["-c", "1", "-v"], "icmp");
    let tracer = Tracer::start(&["--netns", "all", "--port", "20703", "--count", "1"]);
    let send = pod
        .cmd(PYTHON)
        .args([
            "-c",
            "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
             s.setsockopt(socket.IPPROTO_IP, 10, 2)  # IP_MTU_DISCOVER, IP_PMTUDISC_DO\n\
             s.sendto(b'x'*1460, ('10.205.0.2', 20703))",
        ])
        .status()
        .unwrap();
    assert!(send.success());
    let path = tracer.one_path();

    assert_eq!(path["verdict"], "dropped", "{path}");
    assert_eq!(
        hop_kinds(&path),
        ["send", "xmit", "ingress", "drop"],
        "{path}"
    );
    let drop = hops_of(&path, "drop")[0];
    assert_eq!(drop["netns"], net.a.inode(), "dropped by the node: {path}");
    assert_eq!(hops_of(&path, "ingress")[0]["ifname"], "ut-ca");
    assert_eq!(hops_of(&path, "xmit")[0]["mtu"], 1500);
    if kernel_has_drop_reason("PKT_TOO_BIG") {
        assert_eq!(drop["reason"], "PKT_TOO_BIG", "{path}");
        let explain = path["explain"].as_str().unwrap();
        assert!(
            explain.contains("larger than the MTU") && explain.contains("fragmentation-needed"),
            "{explain}"
        );
    }
    // Ground truth: node a told the pod the overlay's MTU.
    let out = icmp.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.contains("need to frag (mtu 1450)"),
        "tcpdump in the pod: {out}"
    );
}
