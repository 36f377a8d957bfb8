//! Per-flow counting: exact counts with the agent's API and with `flows --json`, Prometheus
//! scraping the agent for real, and a clean stop on SIGTERM.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use udptrace_testkit::*;

/// Sends `n` datagrams of `size` bytes from `ns` to `host:port` in one process.
fn burst(ns: &Netns, host: &str, port: u16, n: usize, size: usize) {
    let status = ns
        .cmd(PYTHON)
        .args([
            "-c",
            &format!(
                "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
                 for _ in range({n}): s.sendto(b'f'*{size},('{host}',{port}))"
            ),
        ])
        .status()
        .unwrap();
    assert!(status.success());
}

/// The flows to `port` the agent reports, waiting until their packet count reaches `want`
/// (the agent reads the kernel's counters every second) or 10 s passed.
fn flows_to(agent: &Agent, port: u16, want: u64) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let body: Value =
            serde_json::from_str(&agent.get(&format!("/api/v1/flows?port={port}"))).unwrap();
        let flows = body["flows"].as_array().unwrap().clone();
        let total: u64 = flows.iter().map(|f| f["packets"].as_u64().unwrap()).sum();
        let drops: u64 = flows
            .iter()
            .map(|f| f["drops"]["NO_SOCKET"].as_u64().unwrap_or(0))
            .sum();
        if (total >= want && drops >= want) || Instant::now() > deadline {
            return flows;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn the_agent_counts_every_datagram_of_a_flow_exactly() {
    require_root();
    let net = Pair::new(&[]);
    let before = udptrace_program_ids();
    let agent = Agent::start(&["--netns", "all", "--paths", "on"]);
    let mine: std::collections::BTreeSet<u64> = udptrace_program_ids()
        .difference(&before)
        .copied()
        .collect();
    for (n, port) in [(1u64, 20901u16), (10, 20902), (250, 20903)] {
        burst(&net.a, B4, port, n as usize, 100);
        let flows = flows_to(&agent, port, n);
        assert_eq!(flows.len(), 1, "{flows:?}");
        let f = &flows[0];
        assert_eq!(f["packets"], n, "{f}");
        assert_eq!(f["bytes"], n * 100, "{f}");
        assert_eq!(f["netns"], net.a.inode());
        assert_eq!(f["orig"]["dst"], format!("{B4}:{port}"));
        // Nobody listens in b: every one of them dropped there, each counted.
        assert_eq!(f["drops"]["NO_SOCKET"], n, "{f}");
        assert!(f["explain"].as_str().unwrap().contains("NO_SOCKET"), "{f}");
        assert_eq!(f["comm"], "python3");
    }
    // Recent paths are kept, in the trace contract.
    let paths: Value = serde_json::from_str(&agent.get("/api/v1/paths?port=20902")).unwrap();
    let paths = paths["paths"].as_array().unwrap();
    assert_eq!(paths.len(), 10);
    assert!(paths
        .iter()
        .all(|p| p["type"] == "path" && p["verdict"] == "dropped"));
    assert_eq!(agent.get("/healthz").trim(), "ok");
    // The metrics count the same datagrams; promtool accepts them.
    let metrics = agent.get("/metrics");
    let line = format!(
        "udptrace_datagrams_total{{netns=\"{}\"}} 261",
        net.a.inode()
    );
    assert!(metrics.contains(&line), "{line} in\n{metrics}");
    if Command::new("promtool").arg("--version").output().is_ok() {
        let mut check = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write as _;
        check
            .stdin
            .take()
            .unwrap()
            .write_all(metrics.as_bytes())
            .unwrap();
        let out = check.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // SIGTERM: detach everything, exit 0.
    let (status, stderr) = agent.stop(libc::SIGTERM);
    assert!(status.success(), "{stderr}");
    assert!(!mine.is_empty());
    assert_eq!(
        wait_unloaded(&mine),
        Vec::<u64>::new(),
        "left loaded; the agent said:\n{stderr}"
    );
}

#[test]
fn flows_json_prints_one_exact_snapshot() {
    require_root();
    let net = Pair::new(&[]);
    let before = udptrace_program_ids();
    let child = Command::new(udptrace_bin())
        .args(["flows", "--json", "--duration", "4", "--port", "20911"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for it to be tracing: its stderr says so.
    let mut child = child;
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    use std::io::BufRead as _;
    while err.read_line(&mut line).unwrap() > 0 && !line.contains("tracing") {
        line.clear();
    }
    let mine: std::collections::BTreeSet<u64> = udptrace_program_ids()
        .difference(&before)
        .copied()
        .collect();
    burst(&net.a, B4, 20911, 37, 12);
    let rest = std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut rest);
        rest
    });
    let out = child.wait_with_output().unwrap();
    let stderr = rest.join().unwrap();
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        wait_unloaded(&mine),
        Vec::<u64>::new(),
        "left loaded; udptrace said:\n{stderr}"
    );
    let snapshot: Value = serde_json::from_slice(&out.stdout).unwrap();
    let flows = snapshot["flows"].as_array().unwrap();
    assert_eq!(flows.len(), 1, "{snapshot}");
    assert_eq!(flows[0]["packets"], 37);
    assert_eq!(flows[0]["bytes"], 37 * 12);
    assert_eq!(flows[0]["drops"]["NO_SOCKET"], 37);
}

/// A free TCP port on 127.0.0.1 (bound, then released for the server to take).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn prometheus_scrapes_the_agent_and_answers_promql() {
    require_root();
    if Command::new("prometheus")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: prometheus is not installed here (`cargo xtask setup` installs it)");
        return;
    }
    let net = Pair::new(&[]);
    let agent = Agent::start(&[]);
    let dir = std::env::temp_dir().join(format!("udpt-prom-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let target = agent.url.trim_start_matches("http://");
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: udptrace\n    \
             static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .unwrap();
    let port = free_port();
    let mut prom = Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    burst(&net.a, B4, 20921, 42, 8);
    let query = format!(
        "http://127.0.0.1:{port}/api/v1/query?query=udptrace_datagrams_total%7Bnetns%3D%22{}%22%7D",
        net.a.inode()
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let value = loop {
        let answer = ureq::get(&query)
            .call()
            .ok()
            .and_then(|mut r| r.body_mut().read_to_string().ok())
            .and_then(|b| serde_json::from_str::<Value>(&b).ok());
        let value = answer.as_ref().and_then(|a| {
            a["data"]["result"][0]["value"][1]
                .as_str()
                .map(str::to_string)
        });
        if value.as_deref() == Some("42") || Instant::now() > deadline {
            break value;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let _ = prom.kill();
    let _ = prom.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        value.as_deref(),
        Some("42"),
        "PromQL over Prometheus's HTTP API"
    );
}

/// Sends one datagram to each of `count` distinct loopback addresses 127.1.x.y:9 (nobody
/// listens), starting at the `start`th: that many new flows from one socket.
fn distinct_flows(start: usize, count: usize) {
    let status = Command::new(PYTHON)
        .args([
            "-c",
            &format!(
                "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
                 for i in range({start},{}): s.sendto(b'm',('127.%d.%d.%d'%(1+(i>>16),(i>>8)&255,i&255),9))",
                start + count
            ),
        ])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Waits until the agent accounts for exactly `want` flows, kept or evicted by the kernel's
/// LRU (or 60 s passed): (kept, evicted). A flow known only from a path is kept up to 2 s
/// before the kernel's table confirms it, so the sum can overshoot for a moment.
fn wait_flows(agent: &Agent, want: f64) -> (f64, f64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let kept = agent.metric("udptrace_flows ").unwrap_or(0.0);
        let evicted = agent.metric("udptrace_flow_evictions_total").unwrap_or(0.0);
        if kept + evicted == want || Instant::now() > deadline {
            return (kept, evicted);
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// The agent's memory ceiling (docs/flows.md): 100k flows fit well under it.
const RSS_CEILING_KIB: u64 = 256 * 1024;

#[test]
fn memory_is_bounded_at_100k_flows_and_evictions_are_counted() {
    require_root();
    let agent = Agent::start(&["--flow-entries", "131072"]);
    let idle = agent.rss_kib();
    let mut sent = 0;
    let mut report = vec![format!("idle: {idle} KiB")];
    for n in [1_000usize, 10_000, 100_000] {
        distinct_flows(sent, n - sent);
        sent = n;
        // Every destination is one flow: kept, or evicted by the kernel's LRU, which may
        // evict a little before it is full (its free lists are per CPU).
        let (kept, evicted) = wait_flows(&agent, n as f64);
        assert_eq!(kept + evicted, n as f64, "{}", agent.stderr());
        assert!(
            evicted < n as f64 * 0.05,
            "{evicted} of {n} evicted from a 131072 table"
        );
        let rss = agent.rss_kib();
        report.push(format!("{n} flows: {rss} KiB ({evicted} evicted)"));
        assert!(rss < RSS_CEILING_KIB, "{report:?}");
    }
    eprintln!("agent memory: {}", report.join(", "));
    // With 100k flows and their paths in hand it still stops at once, cleanly.
    let started = Instant::now();
    let (status, stderr) = agent.stop(libc::SIGINT);
    assert!(status.success(), "{stderr}");
    eprintln!("stopped in {:?}", started.elapsed());

    // A table of 1024: the kernel's LRU evicts, the agent says how many, and keeps no more.
    let agent = Agent::start(&["--flow-entries", "1024"]);
    distinct_flows(0, 5_000);
    let (kept, evicted) = wait_flows(&agent, 5_000.0);
    assert_eq!(kept + evicted, 5_000.0);
    assert!(kept <= 1024.0, "{kept} flows kept, {evicted} evicted");
    assert!(evicted >= 3_976.0, "{kept} flows kept, {evicted} evicted");
}

/// A Service-like DNAT in the sender's namespace to a backend address where nothing listens
/// any more: the flow shows the rewrite, every drop, and is called a black hole.
#[test]
fn nat_and_drops_are_counted_per_flow_and_a_black_hole_is_named() {
    require_root();
    let net = Pair::new(&[]);
    dnat_output(&net.a, Some("10.203.0.9"), 20931, "10.203.0.2:20932");
    if nat_hook().is_none() {
        eprintln!("skipped: no NAT hook on this kernel");
        return;
    }
    let agent = Agent::start(&["--netns", "all"]);
    burst(&net.a, "10.203.0.9", 20931, 5, 20);
    let deadline = Instant::now() + Duration::from_secs(10);
    let flow = loop {
        let body: Value = serde_json::from_str(&agent.get("/api/v1/flows?port=20931")).unwrap();
        let flow = body["flows"][0].clone();
        if (flow["drops"]["NO_SOCKET"] == 5 && flow["packets"] == 5) || Instant::now() > deadline {
            break flow;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(flow["packets"], 5, "{flow}");
    assert_eq!(flow["orig"]["dst"], "10.203.0.9:20931");
    assert_eq!(flow["drops"]["NO_SOCKET"], 5, "{flow}");
    let nat = flow["nat"].as_array().unwrap();
    assert_eq!(nat.len(), 1, "{flow}");
    assert_eq!(
        (nat[0]["nat"].as_str(), nat[0]["after"]["dst"].as_str()),
        (Some("dnat"), Some("10.203.0.2:20932"))
    );
    assert_eq!(flow["stale_dnat"], true, "{flow}");
    assert!(
        flow["explain"]
            .as_str()
            .unwrap()
            .contains("stale conntrack"),
        "{flow}"
    );
    // Ground truth: conntrack has the entry the datagrams were DNATed by.
    let ct = net
        .a
        .cmd("conntrack")
        .args(["-L", "-p", "udp", "--dport", "20931"])
        .output()
        .unwrap();
    let ct = String::from_utf8_lossy(&ct.stdout);
    assert!(
        ct.contains("dst=10.203.0.9") && ct.contains("src=10.203.0.2"),
        "{ct}"
    );
    let metrics = agent.get("/metrics");
    assert!(
        metrics.contains("udptrace_nat_translations_total{hook=\"output\",nat=\"dnat\"} 5"),
        "{metrics}"
    );
}
