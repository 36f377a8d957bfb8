//! IPv6 beyond the fixed header: a datagram behind a destination-options extension header,
//! and one fragmented by its sender (a fragment header on each piece).

use udptrace_testkit::*;

/// The length of the next datagram the receiver got.
fn received_len(lines: &mut impl Iterator<Item = std::io::Result<String>>) -> usize {
    let line = lines.next().expect("a datagram").expect("receiver output");
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

#[test]
fn a_datagram_behind_a_destination_options_header_is_followed() {
    require_root();
    let net = Pair::new(&[]);
    let dump = tcpdump_with(&net.b, "ut-b", &["-c", "1", "-v"], "ip6[6] = 60");
    let tracer = Tracer::start(&["--netns", "all", "--port", "20831", "--count", "1"]);
    let (mut rx, mut lines) = py_receiver(&net.b, B6, 20831);
    // A sticky destination options header holding one PadN option.
    let sent = net
        .a
        .cmd(PYTHON)
        .args([
            "-c",
            &format!(
                "import socket\ns=socket.socket(socket.AF_INET6,socket.SOCK_DGRAM)\n\
                 s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_DSTOPTS, bytes([0,0,1,4,0,0,0,0]))\n\
                 s.sendto(b'q'*21, ('{B6}', 20831))"
            ),
        ])
        .status()
        .unwrap();
    assert!(sent.success());
    assert_eq!(received_len(&mut lines), 21);
    let _ = rx.kill();
    let _ = rx.wait();
    let path = tracer.one_path();
    assert_eq!(
        hop_kinds(&path),
        ["send", "xmit", "ingress", "deliver"],
        "{path}"
    );
    for hop in &path["hops"].as_array().unwrap()[1..] {
        assert_eq!(hop["dst"], format!("[{B6}]:20831"), "{hop}");
        assert_eq!(hop["len"], 21, "{hop}");
    }
    // Ground truth: the packet on the wire had the extension header.
    let out = dump.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(out.contains("DSTOPT"), "tcpdump: {out}");
}

#[test]
fn an_ipv6_datagram_fragmented_by_its_sender_is_one_path() {
    require_root();
    let net = Pair::new(&[]);
    let dump = tcpdump_with(
        &net.b,
        "ut-b",
        &["-c", "3", "-v"],
        "ip6 and src host fd0c:203::1 and ip6[6] = 44",
    );
    let tracer = Tracer::start(&["--netns", "all", "--port", "20832", "--count", "1"]);
    let (mut rx, mut lines) = py_receiver(&net.b, B6, 20832);
    let (pid, _) = py_send(&net.a, B6, 20832, "sendto", 3000);
    assert_eq!(received_len(&mut lines), 3000);
    let _ = rx.kill();
    let _ = rx.wait();
    let path = tracer.one_path();
    assert_eq!(path["verdict"], "delivered", "{path}");
    assert_eq!(path["hops"][0]["pid"], pid);
    assert_eq!(
        hop_kinds(&path),
        ["send", "fragment", "xmit", "ingress", "fragment", "deliver"],
        "{path}"
    );
    let split = &path["hops"][1];
    assert_eq!(split["fragment"]["action"], "split");
    assert_eq!(split["ifname"], "ut-a");
    assert_eq!(split["mtu"], 1500);
    // 3008 bytes of UDP in pieces of at most 1448 (1500 less 40 + 8 of headers, a multiple of 8).
    assert_eq!(split["fragment"]["fragments"], 3, "{path}");
    assert_eq!(path["hops"][3]["fragment"]["fragments"], 3, "{path}");
    assert_eq!(path["hops"][4]["fragment"]["action"], "reassembled");
    assert_eq!(path["hops"][5]["len"], 3000);
    let out = dump.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.matches("frag (").count(), 3, "tcpdump: {out}");
}
