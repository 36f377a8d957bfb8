//! What udptrace exposes when nobody asked for more: no payload byte of a traced datagram
//! anywhere it writes or keeps (its output, its API, its kernel maps), and an API reachable
//! from the node itself only.

use std::{collections::BTreeSet, process::Stdio, time::Duration};

use serde_json::Value;
use udptrace_testkit::*;

/// The payload every test datagram carries.
const SECRET: &[u8] = b"udptrace-secret!";

/// Byte strings in a bpftool JSON dump: arrays of "0x.." strings (keys and values).
fn byte_strings(v: &Value, out: &mut Vec<Vec<u8>>) {
    match v {
        Value::Array(items) => {
            let bytes: Option<Vec<u8>> = items
                .iter()
                .map(|i| {
                    i.as_str()
                        .and_then(|s| s.strip_prefix("0x"))
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                })
                .collect();
            match bytes {
                Some(b) if !b.is_empty() => out.push(b),
                _ => items.iter().for_each(|i| byte_strings(i, out)),
            }
        }
        Value::Object(fields) => fields.values().for_each(|i| byte_strings(i, out)),
        _ => {}
    }
}

/// Every map the process `pid` holds (its fds' `map_id`), dumped: key and value bytes.
fn map_contents(pid: u32) -> (usize, Vec<Vec<u8>>) {
    let ids: BTreeSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .filter(|info| !info.contains("map_type:\t27"))
        // Socket storage (24) cannot be listed from userspace; the count hop keeps only each
        // socket's namespace inode there (udptrace-ebpf/src/hops/count.rs).
        .filter(|info| !info.contains("map_type:\t24"))
        .filter_map(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("map_id:"))
                .and_then(|id| id.trim().parse().ok())
        })
        .collect();
    let mut out = Vec::new();
    for id in &ids {
        let dump = sh(&["bpftool", "-j", "map", "dump", "id", &id.to_string()]);
        byte_strings(&serde_json::from_str(&dump).unwrap(), &mut out);
    }
    (ids.len(), out)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn no_payload_byte_is_kept_or_shown() {
    require_root();
    let net = Pair::new(&[]);
    let agent = Agent::start(&["--netns", "all", "--paths", "on", "--sample-first", "100"]);
    let tracer = Tracer::start(&["--netns", "all", "--port", "20901"]);
    let mut rx = net
        .b
        .cmd(PYTHON)
        .args([
            "-c",
            "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
             s.bind(('10.203.0.2',20901))\nprint('ready',flush=True)\n\
             while True: s.recv(100)",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(rx.stdout.as_mut().unwrap()),
        &mut ready,
    )
    .unwrap();
    let secret = std::str::from_utf8(SECRET).unwrap();
    let send = format!(
        "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
         for _ in range(5): s.sendto(b'{secret}',('10.203.0.2',20901))"
    );
    assert!(net
        .a
        .cmd(PYTHON)
        .args(["-c", &send])
        .status()
        .unwrap()
        .success());
    let paths = tracer.paths(5, Duration::from_secs(10));
    assert_eq!(paths.len(), 5, "{}", tracer.stderr());
    // What a user sees: the paths printed, the agent's API and metrics.
    for p in &paths {
        assert_eq!(p["verdict"], "delivered", "{p}");
        assert_eq!(p["hops"][0]["len"], SECRET.len(), "{p}");
        assert!(!p.to_string().contains(secret), "{p}");
    }
    for page in ["/api/v1/paths", "/api/v1/flows", "/metrics"] {
        let body = agent.get_until(page, |b| !page.starts_with("/api") || b.contains("20901"));
        if page.starts_with("/api") {
            assert!(body.contains("20901"), "{page} knows the flow: {body}");
        }
        assert!(!body.contains(secret), "{page}: {body}");
    }
    // What is kept: every map of the agent's (the ring buffer is read out by now).
    let (maps, contents) = map_contents(agent.pid());
    assert!(maps >= 5, "the agent's maps were found ({maps})");
    assert!(
        contents
            .iter()
            .any(|b| contains(b, &20901u16.to_be_bytes()) || contains(b, &20901u16.to_le_bytes())),
        "the dump holds the flow (the search can find something)"
    );
    assert!(
        !contents.iter().any(|b| contains(b, SECRET)),
        "payload bytes in a map"
    );
    let _ = rx.kill();
    let _ = rx.wait();
}

#[test]
fn the_api_listens_on_loopback_unless_told_otherwise() {
    require_root();
    // In a namespace of its own: the default port cannot be taken by anyone else there,
    // and what listens there is the agent's alone.
    let ns = Netns::new("api");
    let mut cmd = ns.cmd(udptrace_bin());
    cmd.arg("agent").env_remove("UDPTRACE_LISTEN");
    let agent = Agent::start_command(cmd);
    assert_eq!(agent.url, "http://127.0.0.1:9720");
    let listening =
        String::from_utf8(ns.cmd("ss").args(["-Hltn"]).output().unwrap().stdout).unwrap();
    let addrs: Vec<&str> = listening
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .collect();
    assert_eq!(addrs, ["127.0.0.1:9720"], "{listening}");
    let (status, stderr) = agent.stop(libc::SIGTERM);
    assert!(status.success(), "{stderr}");
    // Told otherwise, it does as told.
    let mut cmd = ns.cmd(udptrace_bin());
    cmd.args(["agent", "--listen", "0.0.0.0:9721"]);
    let agent = Agent::start_command(cmd);
    let listening =
        String::from_utf8(ns.cmd("ss").args(["-Hltn"]).output().unwrap().stdout).unwrap();
    assert!(listening.contains("0.0.0.0:9721"), "{listening}");
    let _ = agent.stop(libc::SIGTERM);
}
