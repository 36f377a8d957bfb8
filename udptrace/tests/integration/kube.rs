//! Two "nodes" with "pods" on a bridge each, a VXLAN overlay between them (Flannel's port
//! 8472), and iptables rules shaped like kube-proxy's for a DNS Service VIP 10.96.0.10:53
//! backed by a real dnsmasq in a pod on node B. A pod's query keeps its source; a node's
//! own query is masqueraded — udptrace must say so, matching the source dnsmasq logs.

use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Stdio},
    sync::mpsc,
    time::Duration,
};

use serde_json::Value;
use udptrace_testkit::*;

const VIP: &str = "10.96.0.10";
const DNS_POD: &str = "10.244.2.7";
const CLIENT_POD: &str = "10.244.1.5";

fn sysctl(ns: &Netns, kv: &str) {
    assert!(
        ns.cmd("sysctl")
            .args(["-qw", kv])
            .status()
            .unwrap()
            .success(),
        "{kv}"
    );
}

fn iptables_nat(ns: &Netns, rule: &[&str]) {
    let mut args = vec!["-t", "nat"];
    args.extend_from_slice(rule);
    iptables(ns, &args);
}

/// A node namespace with a bridge `cbr0` (`.1` of `pod_cidr`) and one pod attached.
fn pod_on(node: &Netns, pod: &Netns, bridge_ip: &str, pod_ip: &str, tag: &str) {
    node.ip(&["link", "add", "cbr0", "type", "bridge"]);
    node.ip(&["addr", "add", &format!("{bridge_ip}/24"), "dev", "cbr0"]);
    node.ip(&["link", "set", "cbr0", "up"]);
    let host_end = format!("veth{tag}");
    sh(&[
        "ip", "link", "add", &host_end, "netns", &node.name, "type", "veth", "peer", "name",
        "eth0", "netns", &pod.name,
    ]);
    node.ip(&["link", "set", &host_end, "master", "cbr0", "up"]);
    pod.ip(&["addr", "add", &format!("{pod_ip}/24"), "dev", "eth0"]);
    pod.ip(&["link", "set", "eth0", "up"]);
    pod.ip(&["route", "add", "default", "via", bridge_ip]);
}

struct Cluster {
    node_a: Netns,
    node_b: Netns,
    pod_a: Netns,
    pod_b: Netns,
}

impl Cluster {
    fn new() -> Self {
        let (node_a, node_b) = (Netns::new("nodea"), Netns::new("nodeb"));
        let (pod_a, pod_b) = (Netns::new("poda"), Netns::new("podb"));
        // Underlay between the nodes.
        sh(&[
            "ip",
            "link",
            "add",
            "eth0",
            "netns",
            &node_a.name,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &node_b.name,
        ]);
        for (node, ip) in [(&node_a, "10.203.1.1/24"), (&node_b, "10.203.1.2/24")] {
            node.ip(&["addr", "add", ip, "dev", "eth0"]);
            node.ip(&["link", "set", "eth0", "up"]);
            sysctl(node, "net.ipv4.ip_forward=1");
            sysctl(node, "net.ipv4.conf.all.rp_filter=0");
        }
        pod_on(&node_a, &pod_a, "10.244.1.1", CLIENT_POD, "a");
        pod_on(&node_b, &pod_b, "10.244.2.1", DNS_POD, "b");
        // The overlay, Flannel style: VXLAN on 8472, pod CIDRs routed over it.
        for (node, local, remote, vtep, peer_vtep, peer_pods) in [
            (
                &node_a,
                "10.203.1.1",
                "10.203.1.2",
                "10.245.0.1/24",
                "10.245.0.2",
                "10.244.2.0/24",
            ),
            (
                &node_b,
                "10.203.1.2",
                "10.203.1.1",
                "10.245.0.2/24",
                "10.245.0.1",
                "10.244.1.0/24",
            ),
        ] {
            node.ip(&[
                "link",
                "add",
                "flannel.1",
                "type",
                "vxlan",
                "id",
                "1",
                "local",
                local,
                "remote",
                remote,
                "dstport",
                "8472",
                "dev",
                "eth0",
            ]);
            node.ip(&["addr", "add", vtep, "dev", "flannel.1"]);
            node.ip(&["link", "set", "flannel.1", "up"]);
            node.ip(&[
                "route",
                "add",
                peer_pods,
                "via",
                peer_vtep,
                "dev",
                "flannel.1",
            ]);
        }
        // Service IPs are not routed anywhere; the node's default route lets its own
        // sockets pick a source before kube-proxy's OUTPUT DNAT.
        node_a.ip(&["route", "add", "default", "via", "10.203.1.2"]);
        // kube-proxy (iptables mode) on node A for the DNS Service.
        for chain in [
            "KUBE-SERVICES",
            "KUBE-SVC-TCOU7JCQXEZGVUNU",
            "KUBE-SEP-DNS",
            "KUBE-MARK-MASQ",
            "KUBE-POSTROUTING",
        ] {
            iptables_nat(&node_a, &["-N", chain]);
        }
        iptables_nat(&node_a, &["-A", "PREROUTING", "-j", "KUBE-SERVICES"]);
        iptables_nat(&node_a, &["-A", "OUTPUT", "-j", "KUBE-SERVICES"]);
        iptables_nat(&node_a, &["-A", "POSTROUTING", "-j", "KUBE-POSTROUTING"]);
        iptables_nat(
            &node_a,
            &[
                "-A",
                "KUBE-SERVICES",
                "-d",
                "10.96.0.10/32",
                "-p",
                "udp",
                "--dport",
                "53",
                "-j",
                "KUBE-SVC-TCOU7JCQXEZGVUNU",
            ],
        );
        iptables_nat(
            &node_a,
            &[
                "-A",
                "KUBE-SVC-TCOU7JCQXEZGVUNU",
                "!",
                "-s",
                "10.244.0.0/16",
                "-d",
                "10.96.0.10/32",
                "-p",
                "udp",
                "--dport",
                "53",
                "-j",
                "KUBE-MARK-MASQ",
            ],
        );
        iptables_nat(
            &node_a,
            &["-A", "KUBE-SVC-TCOU7JCQXEZGVUNU", "-j", "KUBE-SEP-DNS"],
        );
        iptables_nat(
            &node_a,
            &[
                "-A",
                "KUBE-SEP-DNS",
                "-s",
                "10.244.2.7/32",
                "-j",
                "KUBE-MARK-MASQ",
            ],
        );
        iptables_nat(
            &node_a,
            &[
                "-A",
                "KUBE-SEP-DNS",
                "-p",
                "udp",
                "-j",
                "DNAT",
                "--to-destination",
                "10.244.2.7:53",
            ],
        );
        iptables_nat(
            &node_a,
            &[
                "-A",
                "KUBE-MARK-MASQ",
                "-j",
                "MARK",
                "--set-xmark",
                "0x4000/0x4000",
            ],
        );
        iptables_nat(
            &node_a,
            &[
                "-A",
                "KUBE-POSTROUTING",
                "-m",
                "mark",
                "!",
                "--mark",
                "0x4000/0x4000",
                "-j",
                "RETURN",
            ],
        );
        iptables_nat(
            &node_a,
            &[
                "-A",
                "KUBE-POSTROUTING",
                "-j",
                "MARK",
                "--set-xmark",
                "0x4000/0x0",
            ],
        );
        iptables_nat(&node_a, &["-A", "KUBE-POSTROUTING", "-j", "MASQUERADE"]);
        Self {
            node_a,
            node_b,
            pod_a,
            pod_b,
        }
    }
}

/// dnsmasq answering example.test in the DNS pod, logging every query's source.
struct Dnsmasq {
    child: Child,
    log: mpsc::Receiver<String>,
}

impl Dnsmasq {
    fn start(pod: &Netns) -> Self {
        let mut child = pod
            .cmd("dnsmasq")
            .args([
                "--no-daemon",
                "--no-resolv",
                "--no-hosts",
                "--user=root",
                "--bind-interfaces",
            ])
            .args([
                &format!("--listen-address={DNS_POD}"),
                "--address=/example.test/192.0.2.10",
            ])
            .args(["--log-queries", "--log-facility=-"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("dnsmasq");
        let (tx, log) = mpsc::channel();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let dnsmasq = Self { child, log };
        dnsmasq.wait_for("started");
        dnsmasq
    }

    fn wait_for(&self, needle: &str) -> String {
        loop {
            match self.log.recv_timeout(Duration::from_secs(10)) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(_) => panic!("dnsmasq never logged {needle:?}"),
            }
        }
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn dig(ns: &Netns) -> String {
    let out = ns
        .cmd("dig")
        .args([
            "+short",
            "+tries=1",
            "+time=3",
            &format!("@{VIP}"),
            "example.test",
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The query's path: sent to the VIP (dig sends from a worker thread, whose name is not
/// "dig": the hop's `process_name` is).
fn query_path(paths: &[Value]) -> &Value {
    paths
        .iter()
        .find(|p| p["orig"]["dst"] == format!("{VIP}:53") && p["hops"][0]["kind"] == "send")
        .unwrap_or_else(|| panic!("no query path among {} paths", paths.len()))
}

fn nat_hops(path: &Value) -> Vec<&Value> {
    path["hops"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["kind"] == "nat")
        .collect()
}

#[test]
fn a_pod_keeps_its_source_and_a_node_is_masqueraded() {
    require_root();
    let cluster = Cluster::new();
    let dns = Dnsmasq::start(&cluster.pod_b);
    let nat_visible = nat_hook().is_some();

    for (who, client, source) in [
        ("pod", &cluster.pod_a, CLIENT_POD),
        ("node", &cluster.node_a, "10.245.0.1"),
    ] {
        let tracer = Tracer::start(&["--netns", "all", "--port", "53"]);
        assert_eq!(
            dig(client),
            "192.0.2.10",
            "{who}: dig through the Service VIP works"
        );
        let logged = dns.wait_for("query[A] example.test from");
        let paths = tracer.paths(2, Duration::from_secs(5));
        drop(tracer);
        let path = query_path(&paths);
        assert_eq!(path["hops"][0]["process_name"], "dig", "{who}: {path}");
        // Ground truth 2: node A's conntrack has the Service translation for this query.
        let sport = path["orig"]["src"]
            .as_str()
            .unwrap()
            .rsplit(':')
            .next()
            .unwrap()
            .to_string();
        let ct = cluster
            .node_a
            .cmd("conntrack")
            .args(["-L", "-p", "udp", "--orig-dst", VIP])
            .output()
            .unwrap();
        let ct = String::from_utf8_lossy(&ct.stdout);
        let entry = ct
            .lines()
            .find(|l| l.contains(&format!("sport={sport} dport=53")));
        let entry =
            entry.unwrap_or_else(|| panic!("{who}: no conntrack entry for port {sport}:\n{ct}"));
        assert!(
            entry.contains(&format!("src={DNS_POD} dst={source} sport=53")),
            "{who}: {entry}"
        );
        // Ground truth: the source dnsmasq saw.
        assert!(
            logged.ends_with(&format!("from {source}")),
            "{who}: dnsmasq logged {logged:?}"
        );
        assert_eq!(path["verdict"], "delivered", "{who}: {path}");
        let deliver = path["hops"].as_array().unwrap().last().unwrap();
        assert_eq!(deliver["comm"], "dnsmasq", "{who}: {deliver}");
        assert_eq!(deliver["netns"], cluster.pod_b.inode());
        assert_eq!(path["final"]["dst"], format!("{DNS_POD}:53"));
        assert!(
            path["final"]["src"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{source}:")),
            "{who}: {path}"
        );
        let encap = path["hops"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["kind"] == "encap");
        let encap = encap.unwrap_or_else(|| panic!("{who}: no encap hop: {path}"));
        assert_eq!(
            (encap["tunnel"].as_str(), encap["vni"].as_u64()),
            (Some("vxlan"), Some(1))
        );
        assert_eq!(encap["outer"]["dst"], "10.203.1.2:8472");
        if nat_visible {
            let nat = nat_hops(path);
            let dnat = nat
                .iter()
                .find(|h| h["nat"] == "dnat")
                .unwrap_or_else(|| panic!("{who}: no DNAT: {path}"));
            assert_eq!(dnat["before"]["dst"], format!("{VIP}:53"));
            assert_eq!(dnat["after"]["dst"], format!("{DNS_POD}:53"));
            assert_eq!(dnat["netns"], cluster.node_a.inode());
            let snat = nat.iter().find(|h| h["nat"] == "snat");
            if who == "pod" {
                assert_eq!(dnat["nf_hook"], "prerouting");
                assert!(snat.is_none(), "a pod's query keeps its source: {path}");
                assert!(
                    path["explain"].as_str().unwrap().contains("as sent"),
                    "{}",
                    path["explain"]
                );
            } else {
                assert_eq!(dnat["nf_hook"], "output");
                let snat = snat.unwrap_or_else(|| panic!("node query not masqueraded: {path}"));
                assert_eq!(snat["nf_hook"], "postrouting");
                assert!(snat["after"]["src"]
                    .as_str()
                    .unwrap()
                    .starts_with("10.245.0.1:"));
                let explain = path["explain"].as_str().unwrap();
                assert!(explain.contains("because SNAT at postrouting"), "{explain}");
            }
            // The answer: conntrack gives it the VIP back as its source, which is what dig
            // checks; said as the undoing of the query's DNAT, not as a rewrite of its own.
            let answer = paths
                .iter()
                .find(|p| p["orig"]["src"] == format!("{DNS_POD}:53"))
                .unwrap_or_else(|| panic!("{who}: no answer among {paths:?}"));
            assert_eq!(
                answer["final"]["src"],
                format!("{VIP}:53"),
                "{who}: {answer}"
            );
            let explain = answer["explain"].as_str().unwrap();
            assert!(
                explain.contains(&format!(
                    "restored {VIP}:53 as the source of this reply, undoing the request's DNAT \
                     {VIP}:53 → {DNS_POD}:53"
                )),
                "{who}: {explain}"
            );
        }
    }
    let _ = &cluster.node_b;
}
