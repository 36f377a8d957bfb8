//! Namespaces coming and going as pods do (issue 17): the agent covers every namespace
//! (`--netns all`, path hooks on) while rounds of "pods" are created, send, and are deleted.
//! Each pod is a namespace with a veth on the test's bridge namespace; half have a DNAT rule
//! in their OUTPUT chain, a quarter a receiving process. Every datagram a pod sent while
//! alive is counted on its flow; afterwards the agent's descriptors, BPF links and programs,
//! memory and flows are back to the warm baseline, the kernel has freed every deleted
//! namespace (their veths' peers are gone from the bridge), and a pod created last is still
//! traced hop by hop. `UDPTRACE_CHURN_ROUNDS` sets the rounds (5 of 40 pods by default;
//! `cargo xtask soak --churn` runs it for longer).

use std::{
    collections::BTreeMap,
    process::Child,
    time::{Duration, Instant},
};

use serde_json::Value;
use udptrace_testkit::*;

/// The bridge's address in the hub, where every pod sends.
const HUB: &str = "10.210.0.1";
const PORT: u16 = 20951;
/// What DNAT pods send to: their OUTPUT chain rewrites it to HUB:PORT.
const DNAT_PORT: u16 = 20952;
const PER_POD: u64 = 50;
const PODS_PER_ROUND: usize = 40;
/// How long the agent keeps an idle flow: the pods' flows must leave the table by the end.
const FLOW_IDLE_SECS: u64 = 2;

const SENDER: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(int(sys.argv[3])):
    s.sendto(b'churn', (sys.argv[1], int(sys.argv[2])))
"#;

const RECEIVER: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
print('ready', flush=True)
while True:
    s.recv(64)
"#;

fn rounds() -> usize {
    std::env::var("UDPTRACE_CHURN_ROUNDS")
        .ok()
        .map(|s| s.parse().expect("UDPTRACE_CHURN_ROUNDS: a number"))
        .unwrap_or(5)
}

/// A receiving process, ended (and reaped) when dropped.
struct Receiver(Child);

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A receiver in `ns` on `addr:port`, ready when returned.
fn receiver(ns: &Netns, addr: &str, port: u16) -> Receiver {
    let (child, _) = spawn_ready(
        ns.cmd(PYTHON)
            .args(["-c", RECEIVER, addr, &port.to_string()]),
    );
    Receiver(child)
}

/// One pod: its namespace (removed when dropped, with whatever runs in it), its address.
struct Pod {
    ns: Netns,
    addr: String,
    dnat: bool,
    _receiver: Option<Receiver>,
}

impl Pod {
    fn new(hub: &Netns, round: usize, index: usize) -> Self {
        let ns = Netns::new("pod");
        let addr = format!("10.210.{}.{}", round + 1, index + 1);
        let port = format!("c{round}x{index}");
        sh(&[
            "ip", "link", "add", &port, "netns", &hub.name, "type", "veth", "peer", "name", "eth0",
            "netns", &ns.name,
        ]);
        hub.ip(&["link", "set", &port, "master", "br0", "up"]);
        ns.ip(&["addr", "add", &format!("{addr}/16"), "dev", "eth0"]);
        ns.ip(&["link", "set", "eth0", "up"]);
        let dnat = index % 2 == 1;
        if dnat {
            sh(&[
                "ip",
                "netns",
                "exec",
                &ns.name,
                "iptables",
                "-t",
                "nat",
                "-A",
                "OUTPUT",
                "-p",
                "udp",
                "--dport",
                &DNAT_PORT.to_string(),
                "-j",
                "DNAT",
                "--to-destination",
                &format!("{HUB}:{PORT}"),
            ]);
        }
        let receiver = index
            .is_multiple_of(4)
            .then(|| receiver(&ns, "0.0.0.0", PORT));
        Self {
            ns,
            addr,
            dnat,
            _receiver: receiver,
        }
    }

    /// Starts sending [`PER_POD`] datagrams to the hub (through DNAT, for a DNAT pod).
    fn send(&self) -> Child {
        let port = if self.dnat { DNAT_PORT } else { PORT };
        self.ns
            .cmd(PYTHON)
            .args(["-c", SENDER, HUB, &port.to_string(), &PER_POD.to_string()])
            .spawn()
            .unwrap()
    }
}

/// Datagrams the agent counted per sender's namespace, as its metrics say (a pod's flows may
/// already have expired: they are idle after `FLOW_IDLE_SECS`).
fn totals_by_netns(agent: &Agent) -> BTreeMap<u64, u64> {
    agent
        .get("/metrics")
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("udptrace_datagrams_total{netns=\"")?;
            let (netns, value) = rest.split_once("\"} ")?;
            Some((
                netns.parse().ok()?,
                value.trim().parse::<f64>().ok()? as u64,
            ))
        })
        .collect()
}

/// Datagrams the agent counted per sender's namespace, over every flow it holds.
fn counted_by_netns(agent: &Agent) -> BTreeMap<u64, u64> {
    let body: Value = serde_json::from_str(&agent.get("/api/v1/flows")).unwrap();
    let mut out = BTreeMap::new();
    for flow in body["flows"].as_array().unwrap() {
        if let Some(netns) = flow["netns"].as_u64() {
            *out.entry(netns).or_default() += flow["packets"].as_u64().unwrap_or(0);
        }
    }
    out
}

/// Runs one round: `n` pods created, each sending, every datagram counted, then deleted.
/// Returns the pods' namespace inodes, and the agent's descriptors while they lived.
fn round(agent: &Agent, hub: &Netns, round: usize, n: usize) -> (Vec<u64>, Fds) {
    let pods: Vec<Pod> = (0..n).map(|i| Pod::new(hub, round, i)).collect();
    let inodes: Vec<u64> = pods.iter().map(|p| p.ns.inode()).collect();
    // The agent covers new namespaces within a second of their appearing.
    std::thread::sleep(Duration::from_millis(1500));
    let senders: Vec<Child> = pods.iter().map(Pod::send).collect();
    for mut s in senders {
        assert!(s.wait().unwrap().success(), "a pod's sender failed");
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let counted = totals_by_netns(agent);
        let short: Vec<(&str, u64)> = pods
            .iter()
            .zip(&inodes)
            .map(|(p, i)| (p.addr.as_str(), counted.get(i).copied().unwrap_or(0)))
            .filter(|(_, n)| *n != PER_POD)
            .collect();
        if short.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "round {round}: pods whose datagrams were not all counted ({PER_POD} each): \
             {short:?}\n{}",
            agent.stderr()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let alive = agent.fds();
    drop(pods);
    (inodes, alive)
}

/// The namespaces the agent covers now, each with the links it holds there.
fn coverage(agent: &Agent) -> BTreeMap<u64, u64> {
    let body: Value = serde_json::from_str(&agent.get("/api/v1/namespaces")).unwrap();
    body["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["netns"].as_u64().unwrap(), n["links"].as_u64().unwrap()))
        .collect()
}

/// Waits until the agent has let go of every namespace of `pods`, the kernel has freed
/// them (their veths' peers are gone from the hub, in its own time) and the agent has seen
/// those devices go: until the links it holds in the namespaces of `base` are what they
/// were there, if given. With `windows`, first until no path window is open (news of the
/// pods' drops and NAT opens them, and their hooks are links too). Returns what it covers
/// then.
fn settled(
    agent: &Agent,
    hub: &Netns,
    windows: bool,
    pods: &[u64],
    base: Option<&BTreeMap<u64, u64>>,
) -> BTreeMap<u64, u64> {
    if windows {
        windows_closed(agent);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ports_left(hub).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    // Coverage is read with the counts, once a second.
    std::thread::sleep(Duration::from_millis(1500));
    loop {
        let now = coverage(agent);
        let released = !pods.iter().any(|p| now.contains_key(p));
        let as_before = base.is_none_or(|b| {
            b.iter()
                .all(|(netns, links)| now.get(netns).is_none_or(|l| l == links))
        });
        if (released && as_before) || Instant::now() > deadline {
            return now;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until no path window is open, and the metrics have been computed since (once a
/// second, with the counts).
fn windows_closed(agent: &Agent) {
    agent.windows_until("windows closed", |w| w["open"] == false);
    std::thread::sleep(Duration::from_millis(1500));
}

/// Pods whose namespace the kernel has not freed: their veth's peer is still on the bridge.
fn ports_left(hub: &Netns) -> Vec<String> {
    let out = sh(&["ip", "-n", &hub.name, "-o", "link", "show", "master", "br0"]);
    out.lines()
        .filter_map(|l| Some(l.split(':').nth(1)?.trim().to_string()))
        .collect()
}

#[test]
fn with_path_hooks_namespaces_that_go_are_let_go_of() {
    churn(&["--paths", "on", "--sample-first", "10"], false);
}

#[test]
fn counting_namespaces_that_go_are_let_go_of() {
    churn(&[], true);
}

/// The agent with `args` (and `--netns all`) through the rounds; the late pod is traced in a
/// window asked for when `window`.
fn churn(args: &[&str], window: bool) {
    require_root();
    let hub = Netns::new("hub");
    hub.ip(&["link", "add", "br0", "type", "bridge"]);
    hub.ip(&["addr", "add", &format!("{HUB}/16"), "dev", "br0"]);
    hub.ip(&["link", "set", "br0", "up"]);
    let _sink = receiver(&hub, HUB, PORT);
    let idle = FLOW_IDLE_SECS.to_string();
    // Info: a failure shows what the agent covered, let go of and opened when.
    // Few paths kept: the recent-paths list fills up to what it keeps, by design; what is
    // measured is everything else.
    let mut all = vec![
        "--log-level",
        "info",
        "--netns",
        "all",
        "--flow-idle",
        &idle,
        "--paths-kept",
        "100",
    ];
    all.extend_from_slice(args);
    let agent = Agent::start(&all);
    // Warm: a first round (the allocator's arenas and caches grow to their working size),
    // let go of within a couple of seconds; then what is held with only the hub and the
    // host left.
    let (mut deleted, _) = round(&agent, &hub, 0, PODS_PER_ROUND);
    let mut base = settled(&agent, &hub, window, &deleted, None);
    let mut base_fds = agent.fds();
    let base_rss = agent.rss_kib();
    let released_before = agent.metric("udptrace_namespaces_released_total").unwrap();
    eprintln!("warm: namespaces covered (inode: links) {base:?}, {base_fds:?}, RSS {base_rss} KiB");
    let rounds = rounds();
    // Rounds compared whole against the baseline: all but those in which a namespace not
    // the test's came or went on the machine (its links and descriptors are not ours to
    // count; the baseline is taken again after such a round).
    let mut compared = 0;
    for r in 1..=rounds {
        let (inodes, alive) = round(&agent, &hub, r, PODS_PER_ROUND);
        // Everything of ours in the deleted namespaces is let go of, round after round.
        let now = settled(&agent, &hub, window, &inodes, Some(&base));
        deleted.extend(inodes);
        let after = agent.fds();
        eprintln!(
            "round {r}: with {PODS_PER_ROUND} pods {alive:?}; after {after:?}, namespaces \
             covered {now:?}, RSS {} KiB",
            agent.rss_kib()
        );
        let held: Vec<&u64> = deleted.iter().filter(|i| now.contains_key(i)).collect();
        assert!(
            held.is_empty(),
            "round {r}: deleted pods' namespaces still covered: {held:?}\n{}",
            agent.stderr()
        );
        for (netns, links) in &now {
            if let Some(before) = base.get(netns) {
                assert_eq!(
                    links, before,
                    "round {r}: links held in namespace {netns}, against the warm baseline"
                );
            }
        }
        assert_eq!(
            after.bpf_progs, base_fds.bpf_progs,
            "round {r}: BPF programs against the warm {base_fds:?}"
        );
        if now.keys().ne(base.keys()) {
            eprintln!(
                "round {r}: namespaces not the test's came or went ({:?} covered before, {:?} \
                 now): descriptors not compared this round, baseline taken again",
                base.keys().collect::<Vec<_>>(),
                now.keys().collect::<Vec<_>>()
            );
            (base, base_fds) = (now, after);
            continue;
        }
        compared += 1;
        assert_eq!(
            after.bpf_links, base_fds.bpf_links,
            "round {r}: BPF links against the warm {base_fds:?}"
        );
        assert!(
            after.total <= base_fds.total + 2,
            "round {r}: descriptors {after:?} against the warm {base_fds:?}"
        );
    }
    assert!(
        compared > 0,
        "namespaces not the test's came or went in every round: nothing compared"
    );
    let released = agent.metric("udptrace_namespaces_released_total").unwrap() - released_before;
    let pods = (rounds * PODS_PER_ROUND) as f64;
    assert!(
        released >= pods,
        "{released} namespaces released of {pods} deleted"
    );
    // ...so the kernel freed them: a namespace dismantled takes its veth pair with it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ports_left(&hub).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        ports_left(&hub),
        Vec::<String>::new(),
        "deleted namespaces the kernel could not free (something still holds them)"
    );
    let rss = agent.rss_kib();
    assert!(
        rss <= base_rss + 4 * 1024,
        "RSS {rss} KiB against the warm {base_rss} KiB"
    );
    // The pods' flows expire like any idle flow.
    let deadline = Instant::now() + Duration::from_secs(FLOW_IDLE_SECS + 10);
    loop {
        let counted = counted_by_netns(&agent);
        let left: Vec<u64> = deleted
            .iter()
            .copied()
            .filter(|i| counted.contains_key(i))
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "flows of deleted pods still held: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    // A pod created now is covered and traced hop by hop, its NAT included.
    let late = Pod::new(&hub, rounds + 1, 1);
    let inode = late.ns.inode();
    std::thread::sleep(Duration::from_millis(1500));
    if window {
        agent.open_window("30s");
    }
    assert!(late.send().wait().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let body: Value = serde_json::from_str(&agent.get("/api/v1/paths")).unwrap();
        let nat_in_late = body["paths"].as_array().unwrap().iter().any(|p| {
            p["hops"]
                .as_array()
                .unwrap()
                .iter()
                .any(|h| h["netns"].as_u64() == Some(inode) && h["kind"] == "nat")
        });
        if nat_in_late {
            break;
        }
        if Instant::now() > deadline {
            let seen: Vec<String> = body["paths"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| {
                    let hops: Vec<String> = p["hops"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|h| format!("{}@{}", h["kind"], h["netns"]))
                        .collect();
                    hops.join(" ")
                })
                .collect();
            panic!(
                "no path with the late pod's DNAT (netns {inode}); paths: {seen:#?}\nwindows: \
                 {}\nthe agent said:\n{}",
                agent.get("/api/v1/windows"),
                agent.stderr()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}
