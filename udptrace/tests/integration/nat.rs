//! NAT: every rewrite on the path, with the netfilter hook that made it and the namespace,
//! checked against conntrack's own view of the flow and tcpdump on the receiving side.

use std::process::Command;

use udptrace_testkit::*;

/// Whether this kernel has BPF netfilter links; prints why not when it has none. A kernel
/// that has them but refused our program fails the test: that is a bug of ours, not a
/// kernel without the feature.
fn netfilter_links() -> bool {
    let (_, out, _) = udptrace(Command::new(udptrace_bin()).arg("doctor"));
    let usable = out
        .lines()
        .any(|l| l.starts_with("nat hop") && l.contains("uses netfilter-link"));
    if !usable {
        let why = out
            .lines()
            .find(|l| l.contains("tried netfilter-link"))
            .unwrap_or("no nat hop line");
        assert!(
            why.contains("no BPF netfilter programs"),
            "this kernel has BPF netfilter programs, but the NAT hop did not attach: {}",
            why.trim()
        );
        eprintln!(
            "skipped: this kernel has no BPF netfilter links: {}",
            why.trim()
        );
    }
    usable
}

#[test]
fn dnat_at_output_and_snat_at_postrouting_are_both_on_the_path() {
    require_root();
    let net = Pair::new(&[]);
    // A Service-like virtual IP: 10.203.0.9:20501 is DNATed to the "pod" 10.203.0.2:20502,
    // and the node masquerades the source to 10.203.0.7.
    dnat_output(&net.a, Some("10.203.0.9"), 20501, "10.203.0.2:20502");
    iptables(
        &net.a,
        &[
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-p",
            "udp",
            "--dport",
            "20502",
            "-j",
            "SNAT",
            "--to-source",
            "10.203.0.7",
        ],
    );
    let Some(nat_hook) = nat_hook() else { return };
    let dump = tcpdump(&net.b, "ut-b", "udp port 20502");
    let tracer = Tracer::start(&["--netns", "all", "--port", "20501", "--count", "1"]);
    let (pid, out) = py_send(&net.a, "10.203.0.9", 20501, "sendto", 12);
    let sport = sent_port(&out);
    let path = tracer.one_path();
    assert_eq!(
        hop_kinds(&path),
        ["send", "nat", "nat", "xmit", "ingress", "drop"],
        "{path}"
    );
    assert_eq!(path["hops"][0]["pid"], pid);
    // Across the veth: tc ingress on its peer, in the other namespace, after SNAT.
    let ingress = hops_of(&path, "ingress")[0];
    assert_eq!(ingress["ifname"], "ut-b");
    assert_eq!(ingress["netns"], hops_of(&path, "drop")[0]["netns"]);
    assert_eq!(ingress["src"], format!("10.203.0.7:{sport}"));
    assert_eq!(
        path["orig"]["dst"], "10.203.0.9:20501",
        "as the application gave it"
    );

    let nat = hops_of(&path, "nat");
    let (dnat, snat) = (nat[0], nat[1]);
    assert_eq!(
        (dnat["nat"].as_str(), dnat["nf_hook"].as_str()),
        (Some("dnat"), Some("output"))
    );
    assert_eq!(dnat["before"]["dst"], "10.203.0.9:20501");
    assert_eq!(dnat["after"]["dst"], "10.203.0.2:20502");
    assert_eq!(dnat["netns"], net.a.inode());
    assert_eq!(
        (snat["nat"].as_str(), snat["nf_hook"].as_str()),
        (Some("snat"), Some("postrouting"))
    );
    assert_eq!(snat["before"]["src"], format!("10.203.0.1:{sport}"));
    assert_eq!(snat["after"]["src"], format!("10.203.0.7:{sport}"));
    // The conntrack entry as the kernel keeps it (the one `conntrack -L` lists below); by
    // the SNAT both directions are final, at the DNAT the reply side may still be partial.
    let ct = serde_json::json!({
        "orig": {"src": format!("10.203.0.1:{sport}"), "dst": "10.203.0.9:20501"},
        "reply": {"src": "10.203.0.2:20502", "dst": format!("10.203.0.7:{sport}")},
    });
    assert_eq!(snat["conntrack"], ct, "{snat}");
    assert_eq!(dnat["conntrack"]["orig"], ct["orig"], "{dnat}");
    assert!(
        nat_hook.starts_with(snat["hook"].as_str().unwrap().split(':').next().unwrap()),
        "{snat}"
    );

    // What the receiving side sees: the rewritten addresses, dropped for want of a socket.
    let drop = hops_of(&path, "drop")[0];
    assert_eq!(drop["reason"], "NO_SOCKET");
    assert_eq!(drop["netns"], net.b.inode());
    assert_eq!(path["final"]["src"], format!("10.203.0.7:{sport}"));
    assert_eq!(path["final"]["dst"], "10.203.0.2:20502");

    // Ground truth 1: conntrack's entry in A, original and reply tuples.
    let ct = net
        .a
        .cmd("conntrack")
        .args(["-L", "-p", "udp", "--orig-port-dst", "20501"])
        .output()
        .unwrap();
    let ct = String::from_utf8_lossy(&ct.stdout);
    let expected = format!(
        "src=10.203.0.1 dst=10.203.0.9 sport={sport} dport=20501 [UNREPLIED] src=10.203.0.2 dst=10.203.0.7 sport=20502 dport={sport}"
    );
    assert!(
        ct.contains(&expected),
        "conntrack -L:\n{ct}\nexpected {expected}"
    );
    // Ground truth 2: what arrived on the receiver's interface.
    let seen = dump.wait_with_output().unwrap();
    let seen = String::from_utf8_lossy(&seen.stdout);
    assert!(
        seen.contains(&format!(
            "10.203.0.7.{sport} > 10.203.0.2.20502: UDP, length 12"
        )),
        "{seen}"
    );
}

#[test]
fn without_nat_there_is_no_nat_hop_and_host_scope_skips_other_namespaces() {
    require_root();
    if !netfilter_links() {
        return;
    }
    let net = Pair::new(&[]);
    dnat_output(&net.a, None, 20503, "10.203.0.2:20504");
    // Host scope: the rule in A is not watched, so no nat hop, but the rewritten datagram
    // still shows its real addresses at xmit and drop.
    let tracer = Tracer::start(&["--netns", "host", "--port", "20504", "--count", "1"]);
    py_send(&net.a, B4, 20503, "sendto", 3);
    let path = tracer.one_path();
    assert!(hops_of(&path, "nat").is_empty(), "{path}");
    assert_eq!(hops_of(&path, "xmit")[0]["dst"], "10.203.0.2:20504");
    // A datagram no rule touches has no nat hop even when every namespace is watched.
    let tracer = Tracer::start(&["--netns", "all", "--port", "20505", "--count", "1"]);
    py_send(&net.a, B4, 20505, "sendto", 3);
    let path = tracer.one_path();
    assert!(hops_of(&path, "nat").is_empty(), "{path}");
}

#[test]
fn namespaces_created_while_tracing_are_covered() {
    require_root();
    if !netfilter_links() {
        return;
    }
    // The tracer starts first; the "pod" namespaces and their rule appear afterwards.
    let tracer = Tracer::start(&["--netns", "all", "--port", "20507", "--count", "1"]);
    let net = Pair::new(&[]);
    dnat_output(&net.a, None, 20506, "10.203.0.2:20507");
    std::thread::sleep(std::time::Duration::from_millis(2500)); // the tracer scans every second
    py_send(&net.a, B4, 20506, "sendto", 3);
    let path = tracer.one_path();
    let nat = hops_of(&path, "nat");
    assert_eq!(nat.len(), 1, "{path}");
    assert_eq!(nat[0]["netns"], net.a.inode());
    assert_eq!(nat[0]["after"]["dst"], "10.203.0.2:20507");
}

/// The packets the `target` rule of `chain` in iptables table `table` of `ns` matched so
/// far: the rule counter a user reads with `iptables -L -v`.
fn rule_packets(ns: &Netns, table: &str, chain: &str, target: &str) -> u64 {
    let out = ns
        .cmd("iptables")
        .args(["-t", table, "-L", chain, "-v", "-n", "-x"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    out.lines()
        .find(|l| l.split_whitespace().nth(2) == Some(target))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {target} rule in {table}/{chain}:\n{out}"))
}

#[test]
fn a_dnat_at_prerouting_is_on_the_path_of_a_datagram_a_filter_drops_before_input_ends() {
    require_root();
    if !netfilter_links() {
        return;
    }
    let net = Pair::new(&[]);
    // In the receiving namespace: a DNAT at prerouting (port 20521 → 20522), and a filter
    // rule in INPUT dropping the rewritten datagram before it reaches the end of LOCAL_IN,
    // where the NAT hop's link would have seen it.
    dnat_prerouting(&net.b, 20521, "10.203.0.2:20522");
    iptables(
        &net.b,
        &["-A", "INPUT", "-p", "udp", "--dport", "20522", "-j", "DROP"],
    );
    let tracer = Tracer::start(&["--netns", "all", "--port", "20521", "--count", "1"]);
    let (_, out) = py_send(&net.a, B4, 20521, "sendto", 7);
    let sport = sent_port(&out);
    let path = tracer.one_path();
    assert_eq!(
        hop_kinds(&path),
        ["send", "xmit", "ingress", "nat", "drop"],
        "{path}"
    );
    let nat = hops_of(&path, "nat")[0];
    assert_eq!(
        (nat["nat"].as_str(), nat["nf_hook"].as_str()),
        (Some("dnat"), Some("prerouting")),
        "{nat}"
    );
    assert_eq!(nat["before"]["dst"], "10.203.0.2:20521");
    assert_eq!(nat["after"]["dst"], "10.203.0.2:20522");
    assert_eq!(nat["after"]["src"], format!("10.203.0.1:{sport}"));
    assert_eq!(nat["netns"], net.b.inode());
    let drop = hops_of(&path, "drop")[0];
    assert_eq!(drop["reason"], "NETFILTER_DROP", "{drop}");
    assert_eq!(path["final"]["dst"], "10.203.0.2:20522");
    // Ground truth: both rules counted the datagram (its conntrack entry, never confirmed,
    // went with it).
    assert_eq!(rule_packets(&net.b, "nat", "PREROUTING", "DNAT"), 1);
    assert_eq!(rule_packets(&net.b, "filter", "INPUT", "DROP"), 1);
}

#[test]
fn a_dnat_at_output_over_loopback_is_one_nat_hop() {
    require_root();
    if !netfilter_links() {
        return;
    }
    let net = Pair::new(&[]);
    // Sent and received in one namespace: conntrack applies the OUTPUT DNAT again, unchanged,
    // at prerouting and input; the path has it once.
    dnat_output(&net.a, Some("127.0.0.1"), 20523, "127.0.0.1:20524");
    let tracer = Tracer::start(&["--netns", "all", "--port", "20523", "--count", "1"]);
    py_send(&net.a, "127.0.0.1", 20523, "sendto", 9);
    let path = tracer.one_path();
    let nat = hops_of(&path, "nat");
    assert_eq!(nat.len(), 1, "{path}");
    assert_eq!(
        (nat[0]["nat"].as_str(), nat[0]["nf_hook"].as_str()),
        (Some("dnat"), Some("output"))
    );
    assert_eq!(nat[0]["after"]["dst"], "127.0.0.1:20524");
    let drop = hops_of(&path, "drop")[0];
    assert_eq!(drop["reason"], "NO_SOCKET", "{path}");
}
