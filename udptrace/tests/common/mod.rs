//! Integration-test helpers: network namespaces the test creates (and removes), real
//! senders, and the real udptrace binary reading the real kernel.
#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Lines, Read as _},
    os::unix::fs::MetadataExt as _,
    process::{Child, ChildStdout, Command, ExitStatus, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        mpsc, Arc, Mutex,
    },
    time::{Duration, Instant},
};

use serde_json::Value;

pub const UDPTRACE: &str = env!("CARGO_BIN_EXE_udptrace");
/// Debian's python3: its comm is "python3" (a pyenv shim would exec something else).
pub const PYTHON: &str = "/usr/bin/python3";

pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("integration tests load eBPF programs and create network namespaces: run them as root (`cargo xtask test` does)");
    }
}

/// Runs a command that must succeed; returns its stdout.
pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Inode of the host's network namespace.
pub fn host_netns() -> u64 {
    std::fs::metadata("/proc/self/ns/net")
        .expect("own netns")
        .ino()
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A network namespace that exists for the test's lifetime.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Self {
        let name = format!(
            "udpt-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        sh(&["ip", "netns", "add", &name]);
        sh(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        Self { name }
    }

    pub fn inode(&self) -> u64 {
        std::fs::metadata(format!("/run/netns/{}", self.name))
            .expect("netns file")
            .ino()
    }

    /// A command run inside this namespace (`ip netns exec` execs it in place, so the
    /// child's pid is the program's pid).
    pub fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["ip", "-n", &self.name];
        all.extend_from_slice(args);
        sh(&all);
    }
}

impl Drop for Netns {
    /// Ends what still runs inside (a peer a failed assertion left running would hold the
    /// test's output open) and removes the namespace.
    fn drop(&mut self) {
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    // SAFETY: kill(2); the pid is in a namespace this test made.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Two namespaces joined by a veth pair: `a` has 10.203.0.1/24 and fd0c:203::1/64,
/// `b` has .2 and ::2 (and `b` the extra addresses given).
pub struct Pair {
    pub a: Netns,
    pub b: Netns,
}

pub const A4: &str = "10.203.0.1";
pub const B4: &str = "10.203.0.2";
pub const A6: &str = "fd0c:203::1";
pub const B6: &str = "fd0c:203::2";

impl Pair {
    pub fn new(extra_b: &[&str]) -> Self {
        let a = Netns::new("a");
        let b = Netns::new("b");
        sh(&[
            "ip", "link", "add", "ut-a", "netns", &a.name, "type", "veth", "peer", "name", "ut-b",
            "netns", &b.name,
        ]);
        for (ns, dev, v4, v6) in [(&a, "ut-a", A4, A6), (&b, "ut-b", B4, B6)] {
            ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", dev]);
            ns.ip(&["addr", "add", &format!("{v6}/64"), "dev", dev, "nodad"]);
            ns.ip(&["link", "set", dev, "up"]);
        }
        for addr in extra_b {
            b.ip(&["addr", "add", addr, "dev", "ut-b"]);
        }
        Self { a, b }
    }
}

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

/// The hops of `kind` in a path, in order.
pub fn hops_of<'a>(path: &'a Value, kind: &str) -> Vec<&'a Value> {
    path["hops"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["kind"] == kind)
        .collect()
}

/// The kinds of a path's hops, in order.
pub fn hop_kinds(path: &Value) -> Vec<String> {
    path["hops"]
        .as_array()
        .expect("hops")
        .iter()
        .map(|h| h["kind"].as_str().unwrap().to_string())
        .collect()
}

/// The source port [`PY_SEND`] printed ("<ip> <port>").
pub fn sent_port(out: &str) -> String {
    out.split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("python printed no port: {out:?}"))
        .to_string()
}

/// The hook `udptrace doctor` says the NAT hop uses now (`netfilter-link:nat` or
/// `kprobe:nf_nat_manip_pkt`), or `None` with the reason printed. Ask after creating the
/// NAT rules: the kprobe fallback needs the nf_nat module, which a first rule loads.
pub fn nat_hook() -> Option<String> {
    let (_, out, _) = udptrace(Command::new(UDPTRACE).arg("doctor"));
    let line = out
        .lines()
        .find(|l| l.starts_with("nat hop"))
        .unwrap_or_default();
    match line.split("uses ").nth(1) {
        Some(hook) => Some(hook.trim().to_string()),
        None => {
            let why: Vec<&str> = out
                .lines()
                .filter(|l| l.contains("tried") && l.contains("nf"))
                .collect();
            eprintln!("skipped NAT assertions: this kernel offers no NAT hook: {why:?}");
            None
        }
    }
}

/// The real udptrace binary, tracing.
pub struct Tracer {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: Arc<Mutex<String>>,
    /// While held, nobody reads udptrace's stdout: dropping this lets the reader go on.
    hold: Option<mpsc::Sender<()>>,
}

impl Tracer {
    /// Starts `udptrace trace --json ARGS` and waits until it says it is tracing.
    pub fn start(args: &[&str]) -> Self {
        Self::start_env(args, &[])
    }

    /// Like [`Tracer::start`], with extra environment variables.
    pub fn start_env(args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::spawn(args, env, false)
    }

    /// Like [`Tracer::start`], but nothing reads its stdout until [`Tracer::release_output`]:
    /// a consumer that stalls (`udptrace trace | less`, paused). Once the pipe is full,
    /// udptrace blocks writing and its ring buffer fills.
    pub fn start_held(args: &[&str]) -> Self {
        Self::spawn(args, &[], true)
    }

    /// Starts reading the stdout of a tracer started with [`Tracer::start_held`].
    pub fn release_output(&mut self) {
        self.hold = None;
    }

    fn spawn(args: &[&str], env: &[(&str, &str)], held: bool) -> Self {
        let mut child = Command::new(UDPTRACE)
            .arg("trace")
            .arg("--json")
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start udptrace");
        let stderr = Arc::new(Mutex::new(String::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        {
            let stderr = stderr.clone();
            let pipe = child.stderr.take().expect("stderr");
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if line.starts_with("udptrace: tracing") {
                        let _ = ready_tx.send(());
                    }
                    let mut s = stderr.lock().unwrap();
                    s.push_str(&line);
                    s.push('\n');
                }
            });
        }
        let (tx, lines) = mpsc::channel();
        let pipe = child.stdout.take().expect("stdout");
        let (hold, gate) = mpsc::channel::<()>();
        std::thread::spawn(move || {
            // Returns when the sender is dropped.
            let _ = gate.recv();
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut tracer = Self {
            child,
            lines,
            stderr,
            hold: held.then_some(hold),
        };
        if ready_rx.recv_timeout(Duration::from_secs(60)).is_err() {
            let _ = tracer.child.kill();
            panic!("udptrace did not start tracing:\n{}", tracer.stderr());
        }
        tracer
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Collects up to `n` paths, waiting at most `timeout` in all.
    pub fn paths(&self, n: usize, timeout: Duration) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while out.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => out.push(
                    serde_json::from_str(&line)
                        .unwrap_or_else(|e| panic!("bad JSON {line:?}: {e}")),
                ),
                Err(_) => break,
            }
        }
        out
    }

    /// Exactly one path, or a panic saying what udptrace printed.
    pub fn one_path(&self) -> Value {
        let mut p = self.paths(1, Duration::from_secs(10));
        assert_eq!(
            p.len(),
            1,
            "expected one path; udptrace stderr:\n{}",
            self.stderr()
        );
        p.remove(0)
    }

    /// Stops with SIGINT and returns the exit status.
    pub fn stop(mut self) -> ExitStatus {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        self.wait(Duration::from_secs(10))
    }

    /// Sends `signal` (SIGTERM, SIGKILL...) without waiting.
    pub fn signal(&mut self, signal: i32) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// Waits for udptrace to exit by itself.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "udptrace did not exit; stderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Sends `signal` to `child` and waits up to `timeout` for it to exit.
fn signal_and_wait(child: &mut Child, signal: i32, timeout: Duration) -> Option<ExitStatus> {
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, signal) };
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A failed test still stops udptrace the way a user would (SIGINT), so it removes what it
/// attached (tc filters on older kernels outlive a killed process); SIGKILL if it does not
/// exit.
fn stop_child(child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    if signal_and_wait(child, libc::SIGINT, Duration::from_secs(60)).is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        // A tracer blocked writing its output could not see the signal.
        self.release_output();
        stop_child(&mut self.child);
    }
}

/// Runs a udptrace command to completion: (status, stdout, stderr).
pub fn udptrace(cmd: &mut Command) -> (ExitStatus, String, String) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("udptrace");
    let mut out = String::new();
    let mut err = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (child.wait().unwrap(), out, err)
}

/// The hook family (`fentry`, `kprobe`, `tracepoint`) `udptrace doctor` says the send hop
/// uses on this kernel.
pub fn send_hook_family() -> String {
    let (status, out, _) = udptrace(Command::new(UDPTRACE).arg("doctor"));
    assert!(status.success(), "doctor failed:\n{out}");
    let line = out
        .lines()
        .find(|l| l.starts_with("send hop"))
        .expect("send hop line");
    let hook = line.split("uses ").nth(1).expect("uses <hook>");
    hook.split(':').next().unwrap().to_string()
}

/// Whether udptrace attaches with tcx here (Linux 6.6+, unless told not to).
pub fn uses_tcx(env: &[(&str, &str)]) -> bool {
    let (_, out, _) = udptrace(
        Command::new(UDPTRACE)
            .arg("doctor")
            .envs(env.iter().copied()),
    );
    out.lines()
        .any(|l| l.starts_with("ingress hop") && l.contains("tcx:ingress"))
}

/// Whether the running kernel has drop reason `SKB_DROP_REASON_<name>` (newer kernels name
/// more of their drops).
pub fn kernel_has_drop_reason(name: &str) -> bool {
    sh(&["bpftool", "btf", "dump", "file", "/sys/kernel/btf/vmlinux"])
        .contains(&format!("'SKB_DROP_REASON_{name}'"))
}

/// A running `udptrace agent` (stopped with SIGINT when dropped).
pub struct Agent {
    child: Child,
    /// `http://127.0.0.1:PORT`
    pub url: String,
    stderr: Arc<Mutex<String>>,
}

impl Agent {
    /// Starts `udptrace agent --listen 127.0.0.1:0 ARGS` and waits until it serves.
    pub fn start(args: &[&str]) -> Self {
        Self::start_via(Command::new(UDPTRACE), args)
    }

    /// Like [`Agent::start`], with `launcher` running udptrace (e.g. `setpriv ... udptrace`).
    pub fn start_via(mut launcher: Command, args: &[&str]) -> Self {
        launcher
            .args(["agent", "--listen", "127.0.0.1:0"])
            .args(args);
        Self::start_command(launcher)
    }

    /// Runs `command` (`... udptrace agent ...`, any listen address) and waits until the
    /// agent serves.
    pub fn start_command(mut command: Command) -> Self {
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start udptrace agent");
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        {
            let stderr = stderr.clone();
            let pipe = child.stderr.take().expect("stderr");
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if let Some(url) = line.strip_prefix("udptrace: agent listening on ") {
                        let _ = tx.send(url.to_string());
                    }
                    let mut s = stderr.lock().unwrap();
                    s.push_str(&line);
                    s.push('\n');
                }
            });
        }
        let Ok(url) = rx.recv_timeout(Duration::from_secs(60)) else {
            let _ = child.kill();
            panic!("the agent did not start:\n{}", stderr.lock().unwrap());
        };
        Self { child, url, stderr }
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The agent's resident memory (VmRSS) in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .expect("VmRSS")
    }

    /// A metric's value in /metrics (the first sample whose line starts with `series`).
    pub fn metric(&self, series: &str) -> Option<f64> {
        self.get("/metrics")
            .lines()
            .find(|l| l.starts_with(series))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    }

    /// GET `path` (with its query) from the agent: the body.
    pub fn get(&self, path: &str) -> String {
        http_get(&format!("{}{path}", self.url))
    }

    /// Stops with `signal`: the exit status and everything the agent wrote to stderr.
    pub fn stop(mut self, signal: i32) -> (ExitStatus, String) {
        // Unlinking netfilter hooks waits for RCU grace periods, one per link: slow under
        // an emulated CPU.
        let status = signal_and_wait(&mut self.child, signal, Duration::from_secs(90))
            .unwrap_or_else(|| panic!("agent did not exit:\n{}", self.stderr()));
        // The reader thread sees the pipe close right after the exit.
        std::thread::sleep(Duration::from_millis(200));
        (status, self.stderr())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        stop_child(&mut self.child);
    }
}

/// A plain HTTP GET (only to the servers the tests start on 127.0.0.1): the body.
pub fn http_get(url: &str) -> String {
    ureq::get(url)
        .call()
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .body_mut()
        .read_to_string()
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

/// deploy/base/daemonset.yaml, compiled in (tests also run where the repository is not).
pub const DAEMONSET: &str = include_str!("../../../deploy/base/daemonset.yaml");

/// The capabilities the DaemonSet adds, in order.
pub fn daemonset_capabilities() -> Vec<&'static str> {
    DAEMONSET
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("add:"))
        .skip(1)
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .take_while(|l| l.starts_with("- "))
        .map(|l| l.trim_start_matches("- "))
        .collect()
}

/// Ids of the loaded BPF programs that are udptrace's (by their names).
pub fn udptrace_program_ids() -> std::collections::BTreeSet<u64> {
    let out = sh(&["bpftool", "-j", "prog", "show"]);
    let progs: Vec<Value> = serde_json::from_str(&out).expect("bpftool JSON");
    progs
        .iter()
        .filter(|p| {
            let name = p["name"].as_str().unwrap_or_default();
            [
                "send_", "xmit_", "drop_", "nat_", "deliver_", "recv_", "ingress_",
            ]
            .iter()
            .any(|ours| name.starts_with(ours))
        })
        .filter_map(|p| p["id"].as_u64())
        .collect()
}

/// How many BPF links point at the programs `ids`.
pub fn links_to(ids: &std::collections::BTreeSet<u64>) -> usize {
    let out = sh(&["bpftool", "-j", "link", "show"]);
    let links: Vec<Value> = serde_json::from_str(&out).expect("bpftool JSON");
    links
        .iter()
        .filter(|l| l["prog_id"].as_u64().is_some_and(|id| ids.contains(&id)))
        .count()
}

/// Waits (up to 5 s: the kernel frees a program shortly after its last reference goes)
/// until none of `ids` is loaded; the ones still there.
pub fn wait_unloaded(ids: &std::collections::BTreeSet<u64>) -> Vec<u64> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left: Vec<u64> = udptrace_program_ids().intersection(ids).copied().collect();
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
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

/// A Service-like DNAT in `ns`'s OUTPUT chain, as kube-proxy makes it: UDP to `vip`:`port`
/// goes to `to` (`ip:port`).
pub fn dnat_output(ns: &Netns, vip: &str, port: u16, to: &str) {
    let port = port.to_string();
    iptables(
        ns,
        &[
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "udp",
            "-d",
            vip,
            "--dport",
            &port,
            "-j",
            "DNAT",
            "--to-destination",
            to,
        ],
    );
}

/// iptables `args` in `ns`; the rule must be accepted.
/// `ns`'s UDP counters (IPv4 `Udp*`, IPv6 `Udp6*`) and its IPv4 and IPv6 reassembly
/// successes (`IpReasmOKs`, `Ip6ReasmOKs`), from /proc/net/snmp and snmp6.
pub fn udp_counters(ns: &Netns) -> BTreeMap<String, i64> {
    let read = |file: &str| {
        let out = ns.cmd("cat").arg(file).output().expect("cat");
        String::from_utf8(out.stdout).expect("utf-8")
    };
    let mut out = BTreeMap::new();
    let snmp = read("/proc/net/snmp");
    let lines: Vec<&str> = snmp.lines().collect();
    for pair in lines.chunks(2) {
        let (names, values) = (pair[0], pair[1]);
        let proto = names.split(':').next().unwrap();
        if proto != "Udp" && proto != "Ip" {
            continue;
        }
        for (n, v) in names
            .split_whitespace()
            .zip(values.split_whitespace())
            .skip(1)
        {
            if proto == "Udp" || n == "ReasmOKs" {
                out.insert(format!("{proto}{n}"), v.parse().unwrap());
            }
        }
    }
    for line in read("/proc/net/snmp6").lines() {
        let mut f = line.split_whitespace();
        if let (Some(n), Some(v)) = (f.next(), f.next()) {
            if n.starts_with("Udp6") || n == "Ip6ReasmOKs" {
                out.insert(n.to_string(), v.parse().unwrap());
            }
        }
    }
    out
}

/// What moved between two [`udp_counters`] reads.
pub fn counters_moved(
    before: &BTreeMap<String, i64>,
    after: &BTreeMap<String, i64>,
) -> BTreeMap<String, i64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0)))
        .filter(|(_, d)| *d != 0)
        .collect()
}

/// Packets the INPUT rule for UDP destination port `port` in `ns` has matched (its own
/// counter: ground truth for a netfilter drop).
pub fn input_rule_packets(ns: &Netns, port: u16) -> u64 {
    let out = ns
        .cmd("iptables")
        .args(["-nvxL", "INPUT"])
        .output()
        .expect("iptables");
    let listing = String::from_utf8_lossy(&out.stdout);
    listing
        .lines()
        .find(|l| l.contains(&format!("dpt:{port}")))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no INPUT rule for port {port}:\n{listing}"))
}

pub fn iptables(ns: &Netns, args: &[&str]) {
    let status = ns.cmd("iptables").args(args).status().expect("iptables");
    assert!(status.success(), "iptables {args:?}");
}

/// The overlay: vx0 in each node, VNI 42, 10.205.0.0/24 over the underlay veth
/// (10.203.0.0/24). Its MTU is the underlay's less VXLAN's 50 bytes: 1450.
pub fn overlay(net: &Pair) {
    for (ns, local, remote, overlay) in [
        (&net.a, A4, B4, "10.205.0.1/24"),
        (&net.b, B4, A4, "10.205.0.2/24"),
    ] {
        let dev = if std::ptr::eq(ns, &net.a) {
            "ut-a"
        } else {
            "ut-b"
        };
        ns.ip(&[
            "link", "add", "vx0", "type", "vxlan", "id", "42", "local", local, "remote", remote,
            "dstport", "4789", "dev", dev,
        ]);
        ns.ip(&["addr", "add", overlay, "dev", "vx0"]);
        ns.ip(&["link", "set", "vx0", "up"]);
    }
}
