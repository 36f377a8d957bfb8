//! The agent's image (deploy/Containerfile, built by `cargo xtask image`) runs under podman
//! with exactly the DaemonSet's capabilities, mounts and settings, and counts a datagram.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use serde_json::Value;
use udptrace_testkit::*;

fn podman(args: &[&str]) -> std::process::Output {
    Command::new("podman")
        .args(["--runtime", "runc"])
        .args(args)
        .output()
        .expect("podman")
}

/// Removes the container however the test ends.
struct Container(String);

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman(&["rm", "-f", "-t", "10", &self.0]);
    }
}

#[test]
fn the_image_runs_with_the_daemonsets_capabilities_and_counts_a_flow() {
    require_root();
    let tag = format!("udptrace:{}", env!("CARGO_PKG_VERSION"));
    if Command::new("podman").arg("--version").output().is_err()
        || !podman(&["image", "exists", &tag]).status.success()
    {
        eprintln!("skipped: no podman or no {tag} image here (`cargo xtask image` builds it)");
        return;
    }
    // The DaemonSet pins the same tag.
    assert!(DAEMONSET.contains(&format!("image: {tag}")));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let name = format!("udpt-agent-{}", std::process::id());
    // What the DaemonSet's hostPath (DirectoryOrCreate) does: a fresh host may have no
    // named namespace yet.
    std::fs::create_dir_all("/run/netns").unwrap();
    let caps = daemonset_capabilities().join(",");
    let listen = format!("UDPTRACE_LISTEN=127.0.0.1:{port}");
    // As the DaemonSet runs it: host network and PIDs, all capabilities dropped but the
    // named ones, read-only root, no privilege escalation, the same read-only mounts.
    let out = podman(&[
        "run",
        "-d",
        "--name",
        &name,
        "--network",
        "host",
        "--pid",
        "host",
        "--ulimit",
        "nofile=20000:20000",
        "--ulimit",
        "nproc=1024:1024",
        "--cap-drop",
        "all",
        "--cap-add",
        &caps,
        "--security-opt",
        "no-new-privileges",
        "--read-only",
        "-v",
        "/sys/kernel/btf:/sys/kernel/btf:ro",
        "-v",
        "/sys/kernel/tracing:/sys/kernel/tracing:ro",
        "-v",
        "/run/netns:/run/netns:ro",
        "-v",
        "/sys/fs/cgroup:/host/sys/fs/cgroup:ro",
        "-e",
        "UDPTRACE_CGROUP_ROOT=/host/sys/fs/cgroup",
        "-e",
        &listen,
        "-e",
        "UDPTRACE_NETNS=all",
        &tag,
        "agent",
    ]);
    assert!(
        out.status.success(),
        "podman run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let container = Container(name.clone());
    let logs = || {
        let out = podman(&["logs", &name]);
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !logs().contains("agent listening on") {
        assert!(
            Instant::now() < deadline,
            "the agent did not start:\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let net = Pair::new(&[]);
    let status = net
        .a
        .cmd(PYTHON)
        .args([
            "-c",
            &format!(
                "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
                 for _ in range(3): s.sendto(b'img',('{B4}',20941))"
            ),
        ])
        .status()
        .unwrap();
    assert!(status.success());
    let url = format!("http://127.0.0.1:{port}/api/v1/flows?port=20941");
    let deadline = Instant::now() + Duration::from_secs(15);
    let flow = loop {
        let body: Value = serde_json::from_str(&http_get(&url)).unwrap();
        let flow = body["flows"][0].clone();
        if flow["packets"] == 3 || Instant::now() > deadline {
            break flow;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(flow["packets"], 3, "{flow}\n{}", logs());
    assert_eq!(flow["netns"], net.a.inode());
    // podman stop sends SIGTERM: the agent detaches and exits 0.
    assert!(podman(&["stop", "-t", "15", &name]).status.success());
    let state = podman(&["inspect", "-f", "{{.State.ExitCode}}", &name]);
    assert_eq!(
        String::from_utf8_lossy(&state.stdout).trim(),
        "0",
        "{}",
        logs()
    );
    assert!(logs().contains("agent stopped (Signal)"), "{}", logs());
    drop(container);
}
