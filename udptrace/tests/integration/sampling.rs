//! Sampling of detailed paths: the first datagrams of a flow, then 1 in N; every drop and
//! every new NAT rewrite whatever was sampled; changeable while the agent runs — and the
//! flow counts stay exact.

use std::{
    process::Child,
    time::{Duration, Instant},
};

use serde_json::Value;
use udptrace_testkit::*;

/// A receiver in b counting what it reads on each of `ports`; prints "ready", then one line
/// per datagram.
fn receiver(net: &Pair, ports: &[u16]) -> Child {
    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
    let script = format!(
        "import socket,select\nss=[]\nfor p in [{}]:\n s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n \
         s.bind(('{B4}',p))\n ss.append(s)\nprint('ready',flush=True)\nwhile True:\n \
         for s in select.select(ss,[],[])[0]:\n  d,a=s.recvfrom(2048)\n  \
         print(s.getsockname()[1],len(d),flush=True)\n",
        ports.join(",")
    );
    let (child, mut lines) = spawn_ready(net.b.cmd(PYTHON).args(["-c", &script]));
    std::thread::spawn(move || while lines.next().is_some() {});
    child
}

/// Sends `n` datagrams from a socket bound to `from` in a (one flow), 3 ms apart.
fn send(net: &Pair, from: u16, dst: &str, port: u16, n: usize) {
    let status = net
        .a
        .cmd(PYTHON)
        .args([
            "-c",
            &format!(
                "import socket,time\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
                 s.bind(('{A4}',{from}))\nfor _ in range({n}):\n s.sendto(b's'*64,('{dst}',{port}))\n \
                 time.sleep(0.003)"
            ),
        ])
        .status()
        .unwrap();
    assert!(status.success());
}

/// The agent's flow to `port` once its counts reach `packets` (read every second) and its
/// drops `drops`, or after 15 s.
fn flow_to(agent: &Agent, port: u16, packets: u64, drops: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let body: Value =
            serde_json::from_str(&agent.get(&format!("/api/v1/flows?port={port}"))).unwrap();
        let flow = body["flows"][0].clone();
        let dropped: u64 = flow["drops"]
            .as_object()
            .map_or(0, |d| d.values().filter_map(Value::as_u64).sum());
        if (flow["packets"] == packets && dropped == drops) || Instant::now() > deadline {
            return flow;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The agent's recent paths whose original destination is `dst`, once there are `want`
/// (or after 10 s).
fn paths_to(agent: &Agent, dst: &str, want: usize) -> Vec<Value> {
    let fetch = || -> Vec<Value> {
        let body: Value = serde_json::from_str(&agent.get("/api/v1/paths")).unwrap();
        body["paths"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["orig"]["dst"] == dst)
            .cloned()
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while fetch().len() < want && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    // Anything more than wanted would show up now.
    std::thread::sleep(Duration::from_millis(500));
    fetch()
}

fn put(agent: &Agent, path: &str, body: &str) -> (u16, String) {
    let url = format!("{}{path}", agent.url);
    match ureq::put(&url)
        .header("content-type", "application/json")
        .config()
        .http_status_as_error(false)
        .build()
        .send(body)
    {
        Ok(mut r) => (
            r.status().as_u16(),
            r.body_mut().read_to_string().unwrap_or_default(),
        ),
        Err(e) => panic!("PUT {url}: {e}"),
    }
}

#[test]
fn the_first_datagrams_then_one_in_n_every_drop_and_counts_stay_exact() {
    require_root();
    let net = Pair::new(&[]);
    let mut rx = receiver(&net, &[20951]);
    let agent = Agent::start(&[
        "--netns",
        "all",
        "--paths",
        "on",
        "--sample-first",
        "3",
        "--sample-every",
        "10",
    ]);
    let dst = format!("{B4}:20951");
    // Delivered: datagrams 0, 1, 2 (the first), then 10, 20, 30, 40, 50 of 53.
    send(&net, 20950, B4, 20951, 53);
    let flow = flow_to(&agent, 20951, 53, 0);
    assert_eq!(flow["packets"], 53, "{flow}");
    let paths = paths_to(&agent, &dst, 8);
    assert_eq!(paths.len(), 8, "{paths:#?}");
    for p in &paths {
        assert_eq!(p["sampled"], true, "{p}");
        assert_eq!(p["verdict"], "delivered", "{p}");
        assert_eq!(
            hop_kinds(p).first().map(String::as_str),
            Some("send"),
            "{p}"
        );
    }
    // Nobody listens on 20952: every drop is counted; the sampled datagrams' drops end their
    // paths, the others are reported from the drop on at most once a second per drop key
    // and CPU, and what that held back is counted.
    let dropped = format!("{B4}:20952");
    send(&net, 20950, B4, 20952, 20);
    let flow = flow_to(&agent, 20952, 20, 20);
    assert_eq!(flow["drops"]["NO_SOCKET"], 20, "{flow}");
    let paths = paths_to(&agent, &dropped, 5);
    let (sampled, unsampled): (Vec<&Value>, Vec<&Value>) =
        paths.iter().partition(|p| p["sampled"] == true);
    // Datagrams 0, 1, 2 and 10 of the flow.
    assert_eq!(sampled.len(), 4, "{paths:#?}");
    for p in &sampled {
        assert_eq!(
            hop_kinds(p).first().map(String::as_str),
            Some("send"),
            "{p}"
        );
        assert_eq!(p["verdict"], "dropped", "{p}");
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!(
        !unsampled.is_empty() && unsampled.len() <= cpus,
        "{paths:#?}"
    );
    for p in &unsampled {
        assert_eq!(hop_kinds(p), ["drop"], "{p}");
        assert_eq!(p["hops"][0]["reason"], "NO_SOCKET", "{p}");
        assert!(
            p["explain"].as_str().unwrap().contains("not sampled"),
            "{p}"
        );
    }
    let held = agent.metric("udptrace_drop_events_held_total").unwrap();
    assert!(held >= (16 - unsampled.len()) as f64, "held {held}");
    // At runtime: every datagram.
    assert_eq!(
        serde_json::from_str::<Value>(&agent.get("/api/v1/sampling")).unwrap(),
        serde_json::json!({"first": 3, "every": 10})
    );
    let (status, body) = put(&agent, "/api/v1/sampling", r#"{"every": 1}"#);
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&agent.get("/api/v1/sampling")).unwrap(),
        serde_json::json!({"first": 3, "every": 1})
    );
    assert_eq!(agent.metric("udptrace_sample_every"), Some(1.0));
    send(&net, 20950, B4, 20951, 12);
    let flow = flow_to(&agent, 20951, 53 + 12, 0);
    assert_eq!(flow["packets"], 65, "{flow}");
    let paths = paths_to(&agent, &dst, 8 + 12);
    assert_eq!(paths.len(), 20, "{paths:#?}");
    // Bad input is refused and changes nothing.
    let (status, body) = put(&agent, "/api/v1/sampling", r#"{"every": 0}"#);
    assert_eq!(status, 400, "{body}");
    let (status, body) = put(&agent, "/api/v1/sampling", r#"{"rate": 5}"#);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("every"), "{body}");
    assert_eq!(agent.metric("udptrace_sample_every"), Some(1.0));
    let (status, stderr) = agent.stop(libc::SIGTERM);
    assert!(status.success(), "{stderr}");
    // The exit line names only what was lost.
    assert!(
        stderr.contains("agent stopped (Signal); nothing lost"),
        "{stderr}"
    );
    let _ = rx.kill();
    let _ = rx.wait();
}

/// A Service-like DNAT whose backend changes: the unsampled datagram that first takes the
/// new backend is reported from its rewrite on; the NAT metric counts every rewrite.
#[test]
fn a_new_nat_rewrite_is_reported_even_when_not_sampled() {
    require_root();
    let net = Pair::new(&[]);
    dnat_output(&net.a, Some("10.203.0.9"), 20961, &format!("{B4}:20962"));
    if nat_hook().is_none() {
        eprintln!("skipped: no NAT hook on this kernel");
        return;
    }
    let mut rx = receiver(&net, &[20962, 20963]);
    let agent = Agent::start(&[
        "--netns",
        "all",
        "--paths",
        "on",
        "--sample-first",
        "1",
        "--sample-every",
        "1000",
    ]);
    // One flow: the same socket throughout, its conntrack entry flushed when the backend
    // changes (as kube-proxy does for UDP).
    let script = format!(
        "import socket,time,subprocess\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
         s.bind(('{A4}',0))\n\
         def burst():\n for _ in range(5):\n  s.sendto(b'n'*32,('10.203.0.9',20961))\n  time.sleep(0.003)\n\
         burst()\nprint('ready',flush=True)\ninput()\nburst()\n"
    );
    let (mut sender, _lines) = spawn_ready(
        net.a
            .cmd(PYTHON)
            .args(["-c", &script])
            .stdin(std::process::Stdio::piped()),
    );
    let flow = flow_to(&agent, 20961, 5, 0);
    assert_eq!(flow["packets"], 5, "{flow}");
    // The backend moves to 20963.
    iptables(&net.a, &["-t", "nat", "-F", "OUTPUT"]);
    dnat_output(&net.a, Some("10.203.0.9"), 20961, &format!("{B4}:20963"));
    let flushed = net.a.cmd("conntrack").args(["-F"]).output().unwrap();
    assert!(flushed.status.success(), "{flushed:?}");
    use std::io::Write as _;
    sender.stdin.take().unwrap().write_all(b"\n").unwrap();
    assert!(sender.wait().unwrap().success());
    let flow = flow_to(&agent, 20961, 10, 0);
    assert_eq!(flow["packets"], 10, "{flow}");
    let after: Vec<&str> = flow["nat"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["after"]["dst"].as_str())
        .collect();
    assert_eq!(
        after,
        [format!("{B4}:20962"), format!("{B4}:20963")],
        "{flow}"
    );
    // Two paths: the first datagram in full; the first to the new backend from its rewrite.
    let deadline = Instant::now() + Duration::from_secs(10);
    let paths = loop {
        let body: Value = serde_json::from_str(&agent.get("/api/v1/paths?port=20961")).unwrap();
        let paths = body["paths"].as_array().unwrap().clone();
        if paths.len() >= 2 || Instant::now() > deadline {
            break paths;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(paths.len(), 2, "{paths:#?}");
    assert_eq!(paths[0]["sampled"], true, "{}", paths[0]);
    assert_eq!(hops_of(&paths[0], "send").len(), 1, "{}", paths[0]);
    assert_eq!(paths[1]["sampled"], false, "{}", paths[1]);
    assert_eq!(hop_kinds(&paths[1])[0], "nat", "{}", paths[1]);
    assert_eq!(paths[1]["verdict"], "delivered", "{}", paths[1]);
    assert_eq!(
        paths[1]["final"]["dst"],
        format!("{B4}:20963"),
        "{}",
        paths[1]
    );
    // Every rewrite counted, sampled or not.
    let metrics = agent.get("/metrics");
    assert!(
        metrics.contains("udptrace_nat_translations_total{hook=\"output\",nat=\"dnat\"} 10"),
        "{metrics}"
    );
    let _ = rx.kill();
    let _ = rx.wait();
}
