//! Real peers: a Python sender, nc, tcpdump, and programs that say when they are ready.

use std::{
    io::{BufRead as _, BufReader, Lines},
    process::{Child, ChildStdout, Command, Stdio},
};

use crate::netns::Netns;

/// Debian's python3: its comm is "python3" (a pyenv shim would exec something else).
pub const PYTHON: &str = "/usr/bin/python3";

/// A sender in Python: `mode` is sendto, sendmsg or connect; prints "<src ip> <src port>"
/// or "errno <n>".
pub const PY_SEND: &str = r#"
import socket, sys
host, port, mode, size = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
data = b"x" * size
if len(sys.argv) > 5:
    sys.stdin.readline()  # wait for the go
try:
    if mode == "sendto":
        s.sendto(data, (host, port))
    elif mode == "sendmsg":
        s.sendmsg([data], [], 0, (host, port))
    else:
        s.connect((host, port))
        s.send(data)
    print(s.getsockname()[0], s.getsockname()[1], flush=True)
except OSError as e:
    print("errno", e.errno, flush=True)
"#;

/// Runs the Python sender in `ns` and returns (pid, its output line).
pub fn py_send(ns: &Netns, host: &str, port: u16, mode: &str, size: usize) -> (u32, String) {
    let child = ns
        .cmd(PYTHON)
        .args([
            "-c",
            PY_SEND,
            host,
            &port.to_string(),
            mode,
            &size.to_string(),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let pid = child.id();
    let out = child.wait_with_output().expect("python3 output");
    assert!(out.status.success(), "python sender failed");
    (pid, String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The source port [`PY_SEND`] printed ("<ip> <port>").
pub fn sent_port(out: &str) -> String {
    out.split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("python printed no port: {out:?}"))
        .to_string()
}

/// A receiver in Python: binds `host`:`port` (IPv4 or IPv6), prints "ready", then
/// "<source ip> <source port> <length>" for each datagram, until killed.
pub const PY_RECEIVE: &str = r#"
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
s.bind((host, port))
print("ready", flush=True)
while True:
    d, a = s.recvfrom(65535)
    print(a[0], a[1], len(d), flush=True)
"#;

/// Starts [`PY_RECEIVE`] on `host`:`port` in `ns`, ready to receive: the child (killed when
/// `ns` goes) and its lines, one per datagram.
pub fn py_receiver(ns: &Netns, host: &str, port: u16) -> (Child, Lines<BufReader<ChildStdout>>) {
    spawn_ready(
        ns.cmd(PYTHON)
            .args(["-c", PY_RECEIVE, host, &port.to_string()]),
    )
}

/// Sends "hi\n" with `nc -u` the way people do (`echo hi | nc -u -w1 HOST PORT`), in `ns`
/// or on the host. Returns nc's pid.
pub fn nc_send(ns: Option<&Netns>, extra: &[&str], host: &str, port: u16) -> u32 {
    let mut cmd = match ns {
        Some(ns) => ns.cmd("nc"),
        None => Command::new("nc"),
    };
    let mut child = cmd
        .args(extra)
        .args(["-u", "-w1", host, &port.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("nc");
    let pid = child.id();
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(b"hi\n").expect("write to nc");
    }
    child.wait().expect("nc exit");
    pid
}

/// tcpdump on `dev` in `ns`, ready when this returns.
pub fn tcpdump(ns: &Netns, dev: &str, filter: &str) -> Child {
    tcpdump_with(ns, dev, &["-c", "1"], filter)
}

/// tcpdump with more options (`-c N`, `-v`, ...), ready when this returns.
pub fn tcpdump_with(ns: &Netns, dev: &str, options: &[&str], filter: &str) -> Child {
    let mut child = ns
        .cmd("tcpdump")
        .args(["-i", dev, "-n", "-l"])
        .args(options)
        .arg(filter)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tcpdump");
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while err.read_line(&mut line).unwrap_or(0) > 0 && !line.contains("listening on") {
        line.clear();
    }
    child
}

/// Spawns `cmd` (a program that prints "ready" once it can receive) and waits for that line:
/// the child and the rest of its output.
pub fn spawn_ready(cmd: &mut Command) -> (Child, Lines<BufReader<ChildStdout>>) {
    let mut child = cmd.stdout(Stdio::piped()).spawn().expect("spawn");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    assert_eq!(
        lines.next().and_then(Result::ok).as_deref(),
        Some("ready"),
        "{cmd:?} did not get ready"
    );
    (child, lines)
}
