//! One datagram across nodes: two agents on this machine, each answering for the namespaces
//! of one emulated node of the VXLAN overlay, each see part of a datagram's way; `udptrace
//! path` and `/api/v1/paths/stitched` join the parts into the path one kernel-wide trace
//! sees.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use serde_json::Value;
use udptrace_testkit::*;

/// (kind, netns, ifname) of each hop, the way to compare paths.
fn points(path: &Value) -> Vec<(String, u64, String)> {
    path["hops"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["kind"].as_str().unwrap().to_string(),
                h["netns"].as_u64().unwrap(),
                h["ifname"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

#[test]
fn two_nodes_parts_join_into_the_single_kernel_path() {
    require_root();
    let net = Pair::new(&[]);
    overlay(&net);
    let (mut receiver, _lines) = py_receiver(&net.b, "10.205.0.2", 20981);
    // Ground truth: one trace that sees both "nodes".
    let tracer = Tracer::start(&["--netns", "all", "--port", "20981", "--count", "1"]);
    let node_b = Agent::start(&[
        "--netns",
        "all",
        "--only-netns",
        &net.b.name,
        "--node-name",
        "node-b",
    ]);
    // Node a's agent knows its peer (for /api/v1/paths/stitched).
    let node_a = Agent::start(&[
        "--netns",
        "all",
        "--only-netns",
        &net.a.name,
        "--node-name",
        "node-a",
        "--peers",
        &format!("node-b={}", node_b.url),
    ]);
    // Agents trace paths in windows (their default): a requested one on each node serves
    // the stitching.
    node_a.open_window("1m");
    node_b.open_window("1m");
    let pid = nc_send(Some(&net.a), &[], "10.205.0.2", 20981);
    let whole = tracer.one_path();
    assert_eq!(whole["verdict"], "delivered", "{whole}");

    // Each agent has its node's part: a's ends in the tunnel (no verdict there, printed
    // after the idle time), b's begins with the VXLAN packet's arrival.
    let deadline = Instant::now() + Duration::from_secs(15);
    let part = |agent: &Agent| -> Option<Value> {
        let body: Value = serde_json::from_str(&agent.get("/api/v1/paths?port=20981")).unwrap();
        body["paths"].as_array().unwrap().first().cloned()
    };
    let (a, b) = loop {
        if let (Some(a), Some(b)) = (part(&node_a), part(&node_b)) {
            break (a, b);
        }
        assert!(
            Instant::now() < deadline,
            "parts: {:?} {:?}",
            part(&node_a),
            part(&node_b)
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    assert!(points(&a).iter().all(|p| p.1 == net.a.inode()), "{a}");
    assert!(points(&b).iter().all(|p| p.1 == net.b.inode()), "{b}");
    assert_eq!(a["hops"][0]["kind"], "send", "{a}");
    assert_eq!(b["verdict"], "delivered", "{b}");

    // `udptrace path` asks both and joins them.
    let out = Command::new(udptrace_bin())
        .args([
            "path",
            "--agent",
            &format!("node-a={}", node_a.url),
            "--agent",
            &format!("node-b={}", node_b.url),
            "--port",
            "20981",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stitched: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(stitched.len(), 1, "{stitched:#?}");
    let path = &stitched[0];
    assert_eq!(
        points(path),
        points(&whole),
        "stitched:\n{path}\nwhole:\n{whole}"
    );
    assert_eq!(path["verdict"], "delivered");
    assert_eq!(path["nodes"], serde_json::json!(["node-a", "node-b"]));
    assert_eq!(path["hops"][0]["pid"], pid);
    assert_eq!(path["final"], whole["final"]);
    assert!(
        path["explain"]
            .as_str()
            .unwrap()
            .starts_with("on node-b: delivered"),
        "{path}"
    );

    // The same from node a's agent, which asks its peer.
    let body: Value =
        serde_json::from_str(&node_a.get("/api/v1/paths/stitched?port=20981")).unwrap();
    let paths = body["paths"].as_array().unwrap();
    assert_eq!(paths.len(), 1, "{body}");
    assert_eq!(points(&paths[0]), points(&whole), "{body}");
    assert_eq!(paths[0]["nodes"], serde_json::json!(["node-a", "node-b"]));
    for agent in [node_a, node_b] {
        let (status, stderr) = agent.stop(libc::SIGTERM);
        assert!(status.success(), "{stderr}");
    }
    let _ = receiver.kill();
    let _ = receiver.wait();
}

#[test]
fn a_missing_agent_is_a_clear_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = Command::new(udptrace_bin())
        .args(["path", "--agent", &format!("http://127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("asking the agent at http://127.0.0.1:{port}")),
        "{stderr}"
    );
}
