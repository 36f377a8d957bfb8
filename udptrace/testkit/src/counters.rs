//! Ground truth from the kernel itself: SNMP counters, iptables rule counters, and the
//! rules the tests add.

use std::collections::BTreeMap;

use crate::netns::Netns;

/// A Service-like DNAT in `ns`'s OUTPUT chain, as kube-proxy makes it: UDP to `vip`:`port`
/// (any address for `None`) goes to `to` (`ip:port`).
pub fn dnat_output(ns: &Netns, vip: Option<&str>, port: u16, to: &str) {
    let port = port.to_string();
    let vip = vip.map_or(Vec::new(), |v| vec!["-d", v]);
    iptables(
        ns,
        &[
            &["-t", "nat", "-A", "OUTPUT", "-p", "udp"][..],
            &vip,
            &["--dport", &port, "-j", "DNAT", "--to-destination", to],
        ]
        .concat(),
    );
}

/// A DNAT in `ns`'s PREROUTING chain, as a node makes it for what arrives: UDP to port
/// `port` goes to `to` (`ip:port`).
pub fn dnat_prerouting(ns: &Netns, port: u16, to: &str) {
    iptables(
        ns,
        &[
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-p",
            "udp",
            "--dport",
            &port.to_string(),
            "-j",
            "DNAT",
            "--to-destination",
            to,
        ],
    );
}

/// iptables `args` in `ns`; the rule must be accepted.
pub fn iptables(ns: &Netns, args: &[&str]) {
    let status = ns.cmd("iptables").args(args).status().expect("iptables");
    assert!(status.success(), "iptables {args:?}");
}

/// `ns`'s UDP counters (IPv4 `Udp*`, IPv6 `Udp6*`) and its IPv4 and IPv6 reassembly
/// successes (`IpReasmOKs`, `Ip6ReasmOKs`), from /proc/net/snmp and snmp6.
pub fn udp_counters(ns: &Netns) -> BTreeMap<String, i64> {
    let read = |file: &str| {
        let out = ns.cmd("cat").arg(file).output().expect("cat");
        String::from_utf8(out.stdout).expect("utf-8")
    };
    let mut out = BTreeMap::new();
    let snmp = read("/proc/net/snmp");
    let lines: Vec<&str> = snmp.lines().collect();
    for pair in lines.chunks(2) {
        let (names, values) = (pair[0], pair[1]);
        let proto = names.split(':').next().unwrap();
        if proto != "Udp" && proto != "Ip" {
            continue;
        }
        for (n, v) in names
            .split_whitespace()
            .zip(values.split_whitespace())
            .skip(1)
        {
            if proto == "Udp" || n == "ReasmOKs" {
                out.insert(format!("{proto}{n}"), v.parse().unwrap());
            }
        }
    }
    for line in read("/proc/net/snmp6").lines() {
        let mut f = line.split_whitespace();
        if let (Some(n), Some(v)) = (f.next(), f.next()) {
            if n.starts_with("Udp6") || n == "Ip6ReasmOKs" {
                out.insert(n.to_string(), v.parse().unwrap());
            }
        }
    }
    out
}

/// What moved between two [`udp_counters`] reads.
pub fn counters_moved(
    before: &BTreeMap<String, i64>,
    after: &BTreeMap<String, i64>,
) -> BTreeMap<String, i64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0)))
        .filter(|(_, d)| *d != 0)
        .collect()
}

/// Packets the INPUT rule for UDP destination port `port` in `ns` has matched (its own
/// counter: ground truth for a netfilter drop).
pub fn input_rule_packets(ns: &Netns, port: u16) -> u64 {
    let out = ns
        .cmd("iptables")
        .args(["-nvxL", "INPUT"])
        .output()
        .expect("iptables");
    let listing = String::from_utf8_lossy(&out.stdout);
    listing
        .lines()
        .find(|l| l.contains(&format!("dpt:{port}")))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no INPUT rule for port {port}:\n{listing}"))
}
