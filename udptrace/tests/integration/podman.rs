//! The origin story, in real containers: a receiver publishes 5353/udp with podman, a
//! sender container sends to the bridge address, and the receiver sees the bridge address
//! as the source (hairpin MASQUERADE). udptrace must show the DNAT, the MASQUERADE, the
//! delivery to python3, and the source the receiver printed.

use std::{
    process::{Command, Output},
    time::{Duration, Instant},
};

use udptrace_testkit::*;

/// podman with the settings that work on this kind of host (TOOLCHAIN.md): netavark, runc,
/// explicit ulimits, the host's own root filesystem as an overlay.
fn podman(args: &[&str]) -> Output {
    Command::new("podman")
        .args(["--network-backend", "netavark", "--runtime", "runc"])
        .args(args)
        .output()
        .expect("podman")
}

const RUN: &[&str] = &[
    "run",
    "--ulimit",
    "nofile=20000:20000",
    "--ulimit",
    "nproc=1024:1024",
    "--network",
    "bridge",
];

/// The container's root: the host's own filesystem as an overlay (no image to pull). With
/// `--rootfs`, the first argument after the options is this path, then the command.
const ROOTFS: &[&str] = &["--rootfs", "/:O"];

/// Removes the receiver container however the test ends.
struct Container(String);

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman(&["rm", "-f", "-t", "0", &self.0]);
    }
}

fn logs(name: &str) -> String {
    String::from_utf8_lossy(&podman(&["logs", name]).stdout).into_owned()
}

const RECEIVER: &str = r#"
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 5353))
print("ready", flush=True)
while True:
    data, addr = s.recvfrom(2048)
    print("from", addr[0], addr[1], flush=True)
"#;

#[test]
fn hairpin_masquerade_in_podman_explains_the_source_the_receiver_sees() {
    require_root();
    if Command::new("podman").arg("--version").output().is_err() {
        eprintln!("skipped: podman is not installed here (`cargo xtask setup` installs it)");
        return;
    }
    // Netavark's port forwarding is NAT in the host namespace: that hook must be usable.
    if !nat_hook().is_some_and(|h| h.starts_with("netfilter-link")) {
        eprintln!("skipped: no BPF netfilter links here (Linux 6.4+)");
        return;
    }
    let name = format!("udpt-rx-{}", std::process::id());
    let rx = Container(name.clone());
    let mut args = RUN.to_vec();
    args.extend(["-d", "--name", &name, "-p", "5353:5353/udp"]);
    args.extend(ROOTFS);
    args.extend(["/usr/bin/python3", "-c", RECEIVER]);
    let out = podman(&args);
    assert!(
        out.status.success(),
        "receiver: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !logs(&rx.0).contains("ready") {
        assert!(
            Instant::now() < deadline,
            "receiver never got ready: {}",
            logs(&rx.0)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let pid = String::from_utf8_lossy(&podman(&["inspect", "-f", "{{.State.Pid}}", &rx.0]).stdout)
        .trim()
        .to_string();

    // The command a user types first: no option to follow the datagram into the
    // containers' namespaces is needed.
    let tracer = Tracer::start(&["--port", "5353", "--count", "1"]);
    let send_from_container = || {
        let mut args = RUN.to_vec();
        args.push("--rm");
        args.extend(ROOTFS);
        args.extend(["/bin/sh", "-c", "echo hi | nc -u -w1 10.88.0.1 5353"]);
        let out = podman(&args);
        assert!(
            out.status.success(),
            "sender: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    send_from_container();
    let path = tracer.one_path();

    // Ground truth: what the receiver printed.
    let deadline = Instant::now() + Duration::from_secs(10);
    let seen = loop {
        if let Some(line) = logs(&rx.0)
            .lines()
            .find(|l| l.starts_with("from "))
            .map(str::to_string)
        {
            break line;
        }
        assert!(
            Instant::now() < deadline,
            "the receiver got nothing: {}",
            logs(&rx.0)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut words = seen.split_whitespace().skip(1);
    let seen_src = format!("{}:{}", words.next().unwrap(), words.next().unwrap());
    assert!(seen_src.starts_with("10.88.0.1:"), "the hairpin: {seen}");

    assert_eq!(path["verdict"], "delivered", "{path}");
    assert_eq!(path["orig"]["dst"], "10.88.0.1:5353");
    assert_eq!(
        path["final"]["src"], seen_src,
        "final.src is what the receiver printed: {path}"
    );
    let hops = path["hops"].as_array().unwrap();
    let send = &hops[0];
    assert_eq!(
        (send["kind"].as_str(), send["comm"].as_str()),
        (Some("send"), Some("nc")),
        "{path}"
    );
    let nat: Vec<_> = hops.iter().filter(|h| h["kind"] == "nat").collect();
    let dnat = nat
        .iter()
        .find(|h| h["nat"] == "dnat")
        .unwrap_or_else(|| panic!("no DNAT: {path}"));
    assert_eq!(dnat["nf_hook"], "prerouting");
    assert_eq!(dnat["before"]["dst"], "10.88.0.1:5353");
    assert!(
        dnat["after"]["dst"]
            .as_str()
            .unwrap()
            .starts_with("10.88.0."),
        "{dnat}"
    );
    let snat = nat
        .iter()
        .find(|h| h["nat"] == "snat")
        .unwrap_or_else(|| panic!("no MASQUERADE: {path}"));
    assert_eq!(snat["nf_hook"], "postrouting");
    assert_eq!(snat["after"]["src"], seen_src);
    assert_eq!(
        dnat["netns"],
        host_netns(),
        "the port forwarding runs in the host namespace"
    );
    let deliver = hops.last().unwrap();
    assert_eq!(deliver["kind"], "deliver");
    assert_eq!(deliver["comm"], "python3");
    assert_eq!(
        deliver["pid"].to_string(),
        pid,
        "the receiver container's python3, by host pid"
    );
    let explain = path["explain"].as_str().unwrap();
    assert!(
        explain.starts_with(&format!(
            "{seen_src} is what the receiver python3[{pid}] sees because SNAT at postrouting"
        )),
        "{explain}"
    );

    // Restricted to the host's namespace, the datagram goes out of sight into the
    // container's, and the sentence says which option follows it.
    let tracer = Tracer::start(&["--netns", "host", "--port", "5353", "--count", "1"]);
    send_from_container();
    let path = tracer.one_path();
    assert_eq!(
        (path["verdict"].as_str(), path["complete"].as_bool()),
        (Some("unknown"), Some(false)),
        "{path}"
    );
    let explain = path["explain"].as_str().unwrap();
    assert!(
        explain.starts_with("no verdict: last seen at")
            && explain.contains("only the host's network namespace is watched (--netns host)"),
        "{explain}"
    );
}
