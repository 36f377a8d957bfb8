//! Kubernetes enrichment against a stand-in API server that answers with recorded lists in
//! the real API's format (tests/fixtures/k8s): pods of this node, Services, EndpointSlices.
//! A Service-like DNAT in a real netns to a backend the EndpointSlice no longer lists is a
//! stale conntrack entry at once; paths and flows name pods and the Service.

use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde_json::Value;
use udptrace_testkit::*;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/k8s");

/// The stand-in API server: its URL, and every request line it got so far.
struct ApiServer {
    child: Child,
    url: String,
    requests: Arc<Mutex<Vec<String>>>,
}

impl ApiServer {
    fn start() -> Self {
        let mut child = std::process::Command::new(PYTHON)
            .arg(format!("{FIXTURES}/apiserver.py"))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines.next().unwrap().unwrap();
        let port = first.strip_prefix("ready ").expect("ready PORT");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                seen.lock().unwrap().push(line);
            }
        });
        Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            requests,
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A cgroup shaped like kubelet's (systemd driver, containerd) for the client pod's
/// container in tests/fixtures/k8s/pods.json, under the cgroup v2 hierarchy; removed when
/// dropped (after its processes are gone). None without a cgroup v2 hierarchy.
struct KubeletCgroup {
    top: std::path::PathBuf,
    leaf: std::path::PathBuf,
}

impl KubeletCgroup {
    fn new() -> Option<Self> {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let root = info.lines().find_map(|l| {
            let (fields, rest) = l.split_once(" - ")?;
            if rest.split_whitespace().next()? != "cgroup2" {
                return None;
            }
            Some(std::path::PathBuf::from(fields.split_whitespace().nth(4)?))
        })?;
        let top = root.join(format!("udptrace-test-{}.slice", std::process::id()));
        let leaf = top
            .join("kubepods-besteffort-pod3f6c1a52_8d0e_4f7b_9b1e_2a4d5c6e7f80.slice")
            .join(
                "cri-containerd-9a7c3e1f0b2d4c6e8a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f708192a3b4c5.scope",
            );
        std::fs::create_dir_all(&leaf).unwrap();
        Some(Self { top, leaf })
    }
}

impl Drop for KubeletCgroup {
    fn drop(&mut self) {
        let mut dir = self.leaf.clone();
        while dir.starts_with(&self.top) {
            let _ = std::fs::remove_dir(&dir);
            if !dir.pop() {
                break;
            }
        }
    }
}

#[test]
fn pods_and_services_are_named_and_a_dnat_to_a_gone_backend_is_stale() {
    require_root();
    if !std::path::Path::new(FIXTURES).is_dir() {
        // The VM's initramfs carries the test binaries, not the repository's fixtures.
        eprintln!("skipped: no {FIXTURES} here");
        return;
    }
    let net = Pair::new(&[]);
    // kube-proxy's rule for Service shop/dns (10.203.0.9:20971), still pointing at the old
    // backend 10.203.0.2:20972 that the EndpointSlice no longer lists as ready.
    dnat_output(&net.a, Some("10.203.0.9"), 20971, "10.203.0.2:20972");
    if nat_hook().is_none() {
        eprintln!("skipped: no NAT hook on this kernel");
        return;
    }
    let api = ApiServer::start();
    let agent = Agent::start(&[
        "--netns",
        "all",
        "--paths",
        "on",
        "--kube-api",
        &api.url,
        "--node-name",
        "node-a",
    ]);
    assert!(
        agent.stderr().contains("watching Kubernetes (node node-a)"),
        "{}",
        agent.stderr()
    );
    // Pods are watched on this node only.
    let requests = api.requests.lock().unwrap().clone();
    let pods: Vec<&String> = requests
        .iter()
        .filter(|r| r.contains("/api/v1/pods"))
        .collect();
    assert!(!pods.is_empty(), "{requests:?}");
    assert!(
        pods.iter()
            .all(|r| r.contains("fieldSelector=spec.nodeName%3Dnode-a")),
        "{pods:?}"
    );
    assert!(
        requests
            .iter()
            .any(|r| r.contains("/apis/discovery.k8s.io/v1/endpointslices")),
        "{requests:?}"
    );

    let mut rx = net
        .b
        .cmd(PYTHON)
        .args([
            "-c",
            "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
             s.bind(('10.203.0.2',20972))\nprint('ready',flush=True)\nwhile True: s.recv(100)",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    BufReader::new(rx.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    // The client runs in a cgroup named the way kubelet names the client pod's container.
    let cgroup = KubeletCgroup::new();
    // (Into the cgroup first: `ip netns exec` mounts a fresh /sys, without the cgroup tree.)
    let status = std::process::Command::new("sh")
        .env(
            "PY",
            "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
             s.bind(('10.203.0.1',20970))\nfor _ in range(3): s.sendto(b'q'*20,('10.203.0.9',20971))",
        )
        .args([
            "-c",
            &format!(
                "{}exec ip netns exec {} {PYTHON} -c \"$PY\"",
                cgroup
                    .as_ref()
                    .map(|c| format!("echo $$ > {}/cgroup.procs && ", c.leaf.display()))
                    .unwrap_or_default(),
                net.a.name
            ),
        ])
        .status()
        .unwrap();
    assert!(status.success());

    let deadline = Instant::now() + Duration::from_secs(15);
    let flow = loop {
        let body: Value = serde_json::from_str(&agent.get("/api/v1/flows?port=20971")).unwrap();
        let flow = body["flows"][0].clone();
        if (flow["packets"] == 3 && !flow["nat"].as_array().is_none_or(Vec::is_empty))
            || Instant::now() > deadline
        {
            break flow;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(flow["packets"], 3, "{flow}");
    // Delivered to the old backend (its socket is still there), yet the Service no longer
    // lists it: a stale entry, named at once, with the command that clears it.
    assert_eq!(flow["stale_dnat"], true, "{flow}");
    let explain = flow["explain"].as_str().unwrap();
    assert!(
        explain.contains("10.203.0.2:20972") && explain.contains("Service shop/dns"),
        "{explain}"
    );
    assert!(explain.contains("conntrack -D -p udp"), "{explain}");
    let k8s = &flow["k8s"];
    assert_eq!(
        k8s["10.203.0.1"],
        serde_json::json!({"kind": "pod", "namespace": "shop", "name": "client-7d9f8b6c5-x2k4q", "node": "node-a"}),
        "{flow}"
    );
    assert_eq!(
        k8s["10.203.0.9"],
        serde_json::json!({"kind": "service", "namespace": "shop", "name": "dns"}),
        "{flow}"
    );
    assert_eq!(
        k8s["10.203.0.2"]["name"], "dns-old-5c8d7f9b4-q7w2e",
        "{flow}"
    );

    // Paths carry the same names.
    let body: Value = serde_json::from_str(&agent.get("/api/v1/paths?port=20971")).unwrap();
    let path = &body["paths"][0];
    assert_eq!(path["verdict"], "delivered", "{path}");
    assert_eq!(path["k8s"]["10.203.0.9"]["name"], "dns", "{path}");
    assert_eq!(path["k8s"]["10.203.0.1"]["kind"], "pod", "{path}");
    // The sending process is the client pod's container, by its cgroup.
    match &cgroup {
        Some(_) => assert_eq!(
            path["hops"][0]["k8s"],
            serde_json::json!({"kind": "pod", "namespace": "shop", "name": "client-7d9f8b6c5-x2k4q",
                               "node": "node-a", "container": "client"}),
            "{path}"
        ),
        None => eprintln!("no cgroup v2 hierarchy here: the container part is not checked"),
    }
    let (status, stderr) = agent.stop(libc::SIGTERM);
    assert!(status.success(), "{stderr}");
    let _ = rx.kill();
    let _ = rx.wait();
}

#[test]
fn without_a_cluster_the_agent_runs_as_before() {
    require_root();
    let agent = Agent::start(&[]);
    let body: Value = serde_json::from_str(&agent.get("/api/v1/flows")).unwrap();
    assert!(body["flows"].is_array());
    assert!(!agent.stderr().contains("Kubernetes"), "{}", agent.stderr());
    let (status, stderr) = agent.stop(libc::SIGTERM);
    assert!(status.success(), "{stderr}");
}

#[test]
fn an_unreachable_api_server_is_said_and_the_agent_still_serves() {
    require_root();
    if !std::path::Path::new(FIXTURES).is_dir() {
        // The VM's initramfs carries the test binaries, not the repository's fixtures.
        eprintln!("skipped: no {FIXTURES} here");
        return;
    }
    // A port nothing listens on (bound, then closed).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let agent = Agent::start(&[
        "--kube-api",
        &format!("http://127.0.0.1:{port}"),
        "--node-name",
        "node-a",
    ]);
    assert_eq!(agent.get("/healthz").trim(), "ok");
    let stderr = agent.stderr();
    assert!(stderr.contains("no first list in 10 s"), "{stderr}");
    let (status, stderr) = agent.stop(libc::SIGTERM);
    assert!(status.success(), "{stderr}");
}
