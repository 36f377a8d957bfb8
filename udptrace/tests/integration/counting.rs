//! Counting only (`--paths off`, the always-on cost): every datagram sent counted exactly per
//! flow by one program — connected and unconnected sends, UDP GSO segments as the wire
//! datagrams they become, an unconnected send through DNAT by the destination the
//! application named — and every drop with its reason, checked against what the receiver
//! read and the kernel's own counters; no path hook attached, nothing left behind.

use std::{
    collections::BTreeSet,
    sync::mpsc,
    time::{Duration, Instant},
};

use serde_json::Value;
use udptrace_testkit::*;

/// A Service-like address in a's OUTPUT chain, DNATed to the receiver.
const VIP: &str = "10.203.0.99";
const RECEIVED: u16 = 21001;
const NOBODY: u16 = 21002;
const SERVICE: u16 = 21003;

/// Connected: 100 × 64 bytes to RECEIVED. Unconnected: 50 × 32 bytes to NOBODY, then
/// 30 × 16 bytes to VIP:SERVICE. GSO: 5 sends of 4800 bytes in 1200-byte segments to
/// RECEIVED. Prints the three sockets' ports.
const SENDER: &str = r#"
import socket, sys
host, vip, received, nobody, service = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
c.connect((host, received))
for _ in range(100): c.send(b'c' * 64)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(50): u.sendto(b'u' * 32, (host, nobody))
for _ in range(30): u.sendto(b'n' * 16, (vip, service))
g = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
g.setsockopt(17, 103, 1200)  # SOL_UDP, UDP_SEGMENT
for _ in range(5): g.sendto(b'g' * 4800, (host, received))
print(c.getsockname()[1], u.getsockname()[1], g.getsockname()[1], flush=True)
"#;

/// Names of the programs with these ids.
fn program_names(ids: &BTreeSet<u64>) -> BTreeSet<String> {
    let progs: Vec<Value> =
        serde_json::from_str(&sh(&["bpftool", "-j", "prog", "show"])).expect("bpftool JSON");
    progs
        .iter()
        .filter(|p| p["id"].as_u64().is_some_and(|id| ids.contains(&id)))
        .filter_map(|p| Some(p["name"].as_str()?.to_string()))
        .collect()
}

/// The agent's flows, once their packets add up to `want` (it reads the kernel every second).
fn flows_adding_up(agent: &Agent, want: u64) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let body: Value = serde_json::from_str(&agent.get("/api/v1/flows")).unwrap();
        let flows: Vec<Value> = body["flows"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| {
                let dst = f["orig"]["dst"].as_str().unwrap_or_default();
                [RECEIVED, NOBODY, SERVICE]
                    .iter()
                    .any(|p| dst.ends_with(&format!(":{p}")))
            })
            .cloned()
            .collect();
        let total: u64 = flows.iter().map(|f| f["packets"].as_u64().unwrap()).sum();
        if total >= want || Instant::now() > deadline {
            return flows;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn flow<'a>(flows: &'a [Value], src: &str, dst: &str) -> &'a Value {
    flows
        .iter()
        .find(|f| f["orig"]["src"] == src && f["orig"]["dst"] == dst)
        .unwrap_or_else(|| panic!("no flow {src} → {dst} in {flows:#?}"))
}

#[test]
fn counting_only_is_exact_for_every_kind_of_send_and_every_drop() {
    require_root();
    let net = Pair::new(&[]);
    dnat_output(&net.a, Some(VIP), SERVICE, &format!("{B4}:{RECEIVED}"));
    let before = udptrace_program_ids();
    let agent = Agent::start(&["--netns", "all", "--paths", "off"]);
    let mine: BTreeSet<u64> = udptrace_program_ids()
        .difference(&before)
        .copied()
        .collect();
    // The two counting programs, and no path hook.
    assert_eq!(
        program_names(&mine),
        BTreeSet::from(["count_cgroup_egress".into(), drop_program().into()]),
        "{}",
        agent.stderr()
    );
    let (_receiver, lines) = py_receiver(&net.b, B4, RECEIVED);
    let (tx, received) = mpsc::channel();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let counters = udp_counters(&net.b);
    let out = net
        .a
        .cmd(PYTHON)
        .args(["-c", SENDER, B4, VIP])
        .args([RECEIVED, NOBODY, SERVICE].map(|p| p.to_string()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let ports: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .map(str::to_string)
        .collect();
    let (connected, unconnected, gso) = (&ports[0], &ports[1], &ports[2]);
    // What the receiver read: 100 + 30 (through the DNAT) + 5 × 4 segments.
    let mut read = Vec::new();
    while read.len() < 150 {
        match received.recv_timeout(Duration::from_secs(10)) {
            Ok(line) => read.push(line),
            Err(_) => panic!("the receiver read {} datagrams of 150", read.len()),
        }
    }
    assert_eq!(read.iter().filter(|l| l.ends_with(" 1200")).count(), 20);
    let moved = counters_moved(&counters, &udp_counters(&net.b));
    assert_eq!(moved.get("UdpInDatagrams"), Some(&150), "{moved:?}");
    assert_eq!(moved.get("UdpNoPorts"), Some(&50), "{moved:?}");

    let flows = flows_adding_up(&agent, 200);
    let ns_a = net.a.inode();
    let f = flow(
        &flows,
        &format!("{A4}:{connected}"),
        &format!("{B4}:{RECEIVED}"),
    );
    assert_eq!(
        (&f["packets"], &f["bytes"], &f["sends"]),
        (&100.into(), &6400.into(), &100.into()),
        "{f}"
    );
    assert_eq!(f["netns"], ns_a);
    let f = flow(
        &flows,
        &format!("0.0.0.0:{unconnected}"),
        &format!("{B4}:{NOBODY}"),
    );
    assert_eq!(
        (&f["packets"], &f["bytes"]),
        (&50.into(), &1600.into()),
        "{f}"
    );
    assert_eq!(f["drops"]["NO_SOCKET"], 50, "{f}");
    // Counted by the address the application named, not the one DNAT rewrote it to.
    let f = flow(
        &flows,
        &format!("0.0.0.0:{unconnected}"),
        &format!("{VIP}:{SERVICE}"),
    );
    assert_eq!(
        (&f["packets"], &f["bytes"]),
        (&30.into(), &480.into()),
        "{f}"
    );
    assert_eq!(f["drops"], serde_json::json!({}), "{f}");
    // Its DNAT without a per-datagram hook: from ns a's conntrack events, as conntrack has it.
    let vip_nat = || {
        let body: Value = serde_json::from_str(&agent.get("/api/v1/flows")).unwrap();
        let flows = body["flows"].as_array().unwrap().clone();
        flow(
            &flows,
            &format!("0.0.0.0:{unconnected}"),
            &format!("{VIP}:{SERVICE}"),
        )["nat"]
            .clone()
    };
    let mut nat = vip_nat();
    for _ in 0..50 {
        if nat.as_array().is_some_and(|n| !n.is_empty()) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        nat = vip_nat();
    }
    assert_eq!(
        nat,
        serde_json::json!([{
            "nat": "dnat",
            "nf_hook": "output",
            "netns": ns_a,
            "before": {"src": format!("{A4}:{unconnected}"), "dst": format!("{VIP}:{SERVICE}")},
            "after": {"src": format!("{A4}:{unconnected}"), "dst": format!("{B4}:{RECEIVED}")},
            "conntrack": true,
        }]),
        "{}",
        agent.stderr()
    );
    let table = net
        .a
        .cmd("conntrack")
        .args(["-L", "-p", "udp", "--dport", &SERVICE.to_string()])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains(&format!(
            "src={B4} dst={A4} sport={RECEIVED} dport={unconnected}"
        )),
        "{table}"
    );
    // The wire's datagrams, and the sends that carried them.
    let f = flow(
        &flows,
        &format!("0.0.0.0:{gso}"),
        &format!("{B4}:{RECEIVED}"),
    );
    assert_eq!(
        (&f["packets"], &f["bytes"], &f["sends"]),
        (&20.into(), &24000.into(), &5.into()),
        "{f}"
    );
    assert_eq!(flows.len(), 4, "{flows:#?}");

    // Drops: every one counted; a few reported as hops, the rest held back and counted.
    let metrics = agent.get("/metrics");
    let drops = metric_value(
        &metrics,
        &format!(
            "udptrace_drops_total{{netns=\"{}\",reason=\"NO_SOCKET\"}}",
            net.b.inode()
        ),
    );
    assert_eq!(
        drops,
        Some(50.0),
        "{moved:?}\n{}",
        sh(&["bpftool", "map", "dump", "name", "DROPS"])
    );
    let paths: Value =
        serde_json::from_str(&agent.get(&format!("/api/v1/paths?port={NOBODY}"))).unwrap();
    let paths = paths["paths"].as_array().unwrap();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!(
        !paths.is_empty() && paths.len() <= cpus,
        "one drop hop per second and CPU: {paths:#?}"
    );
    assert!(paths
        .iter()
        .all(|p| p["verdict"] == "dropped" && p["sampled"] == false));
    let held = agent.metric("udptrace_drop_events_held_total").unwrap();
    assert!(held >= (50 - paths.len()) as f64, "held {held}");
    assert!(
        metrics.contains("udptrace_hook_info{hook=\"cgroup_skb:egress\",hop=\"count\"} 1"),
        "{metrics}"
    );

    let (status, stderr) = agent.stop(libc::SIGTERM);
    assert!(status.success(), "{stderr}");
    assert_eq!(wait_unloaded(&mine), Vec::<u64>::new(), "{stderr}");
}

#[test]
fn flows_counts_only_when_asked_and_says_which_hook_counts() {
    require_root();
    let net = Pair::new(&[]);
    let mut child = std::process::Command::new(udptrace_bin())
        .args([
            "flows",
            "--paths",
            "off",
            "--netns",
            "all",
            "--json",
            "--duration",
            "3",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, ready) = mpsc::channel();
    let said = std::thread::spawn(move || {
        use std::io::BufRead as _;
        let mut all = String::new();
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.starts_with("udptrace: tracing") {
                let _ = tx.send(());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    ready
        .recv_timeout(Duration::from_secs(60))
        .expect("udptrace flows did not start");
    for _ in 0..7 {
        nc_send(Some(&net.a), &[], B4, NOBODY);
    }
    let out = child.wait_with_output().unwrap();
    let said = said.join().unwrap();
    assert!(out.status.success(), "{said}");
    let body: Value = serde_json::from_slice(&out.stdout).unwrap();
    let ours: Vec<&Value> = body["flows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["orig"]["dst"] == format!("{B4}:{NOBODY}"))
        .collect();
    assert_eq!(ours.len(), 7, "{body:#}\n{said}");
    for f in ours {
        assert_eq!((&f["packets"], &f["bytes"]), (&1.into(), &3.into()), "{f}");
        assert_eq!(f["drops"]["NO_SOCKET"], 1, "{f}");
        // Without paths, nothing says what the receiver saw or who sent it.
        assert!(f.get("final").is_none() && f.get("comm").is_none(), "{f}");
    }
}

/// The agent's path windows, as `GET /api/v1/windows` shows them.
fn counting() -> BTreeSet<String> {
    BTreeSet::from(["count_cgroup_egress".into(), drop_program().into()])
}

#[test]
fn path_windows_attach_the_path_hooks_only_while_open() {
    require_root();
    let net = Pair::new(&[]);
    let before = udptrace_program_ids();
    // The agent's default: --paths windows.
    let agent = Agent::start(&[
        "--netns",
        "all",
        "--auto-window",
        "2s",
        "--auto-window-cooldown",
        "1h",
    ]);
    let progs = || {
        let now: BTreeSet<u64> = udptrace_program_ids()
            .difference(&before)
            .copied()
            .collect();
        program_names(&now)
    };
    assert_eq!(progs(), counting(), "{}", agent.stderr());
    assert_eq!(agent.windows()["open"], false);
    // Bad requests say what is expected and open nothing.
    for bad in ["0s", "abc", "11m"] {
        let (status, body) = agent.post(&format!("/api/v1/windows?duration={bad}"));
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body.contains("duration="), "{body}");
    }
    assert_eq!(agent.post("/api/v1/windows").0, 400);

    // A requested window: the path hooks attach, paths come, then they detach again.
    let (_receiver, _lines) = py_receiver(&net.b, B4, RECEIVED);
    agent.open_window("4s");
    let attached = progs();
    // The xmit hop's program is the typed tracepoint's or the raw one's.
    for name in ["xmit_", "sample_consume"] {
        assert!(
            attached.iter().any(|p| p.starts_with(name)),
            "{name} not attached in the window: {attached:?}"
        );
    }
    let send = format!(
        "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.connect(('{B4}', {RECEIVED}))\nfor _ in range(20): s.send(b'w' * 64)\n"
    );
    let out = net.a.cmd(PYTHON).args(["-c", &send]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let delivered = loop {
        let body: Value =
            serde_json::from_str(&agent.get(&format!("/api/v1/paths?port={RECEIVED}"))).unwrap();
        let n = body["paths"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["verdict"] == "delivered")
            .count();
        if n >= 10 || Instant::now() > deadline {
            break n;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    // The first 10 of the flow are traced in a window, then 1 in 100.
    assert!(
        delivered >= 10,
        "{delivered} delivered paths\n{}",
        agent.stderr()
    );
    let w = agent.windows_until("window closed", |w| w["open"] == false);
    assert_eq!(w["opened"]["request"], 1, "{w}");
    assert!(w["open_secs_total"].as_f64().unwrap() >= 4.0, "{w}");
    let counting = counting();
    let only_counting = || {
        let deadline = Instant::now() + Duration::from_secs(10);
        while progs() != counting && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
        }
        assert_eq!(progs(), counting, "path hooks left after the window");
    };
    only_counting();

    // News: the first drop with a reason opens a window by itself.
    let drop = format!(
        "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         for _ in range(5): s.sendto(b'x', ('{B4}', {NOBODY}))\n"
    );
    let out = net.a.cmd(PYTHON).args(["-c", &drop]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let w = agent.windows_until("window after a drop", |w| w["opened"]["drop"] == 1);
    assert!(w.get("error").is_none(), "{w}");
    agent.windows_until("drop window closed", |w| w["open"] == false);
    let metrics = agent.get("/metrics");
    assert_eq!(
        metric_value(&metrics, "udptrace_path_windows_total{reason=\"request\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric_value(&metrics, "udptrace_path_windows_total{reason=\"drop\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric_value(&metrics, "udptrace_path_window_open"),
        Some(0.0)
    );
    only_counting();
    let (status, stderr) = agent.stop(libc::SIGTERM);
    assert!(status.success(), "{stderr}");
    let left: BTreeSet<u64> = udptrace_program_ids()
        .difference(&before)
        .copied()
        .collect();
    assert_eq!(wait_unloaded(&left), Vec::<u64>::new(), "{stderr}");
}
