//! The real udptrace binary: `trace` and `agent` running while a test sends, one-shot
//! commands (`doctor`), what it leaves loaded in the kernel, and the DaemonSet's
//! capabilities.

use std::{
    collections::BTreeSet,
    io::{BufRead as _, BufReader, Read as _},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{mpsc, Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{http, sh};

/// The udptrace binary under test: `UDPTRACE_BIN`, else the one cargo built beside the
/// running test binary (`target/<profile>/udptrace` for `target/<profile>/deps/<test>`),
/// which is what `CARGO_BIN_EXE_udptrace` names for an integration test.
pub fn udptrace_bin() -> &'static str {
    static BIN: OnceLock<String> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("UDPTRACE_BIN") {
            return bin.to_string_lossy().into_owned();
        }
        let exe = std::env::current_exe().expect("the test binary's path");
        let bin: PathBuf = exe
            .parent()
            .and_then(|deps| deps.parent())
            .map(|profile| profile.join("udptrace"))
            .expect("a test binary under target/<profile>/deps");
        assert!(
            bin.exists(),
            "{} is missing: build udptrace first (`cargo xtask build`, or run the tests \
             through cargo), or set UDPTRACE_BIN",
            bin.display()
        );
        bin.to_string_lossy().into_owned()
    })
}

/// The real udptrace binary, tracing.
pub struct Tracer {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: Arc<Mutex<String>>,
    /// While held, nobody reads udptrace's stdout: dropping this lets the reader go on.
    hold: Option<mpsc::Sender<()>>,
    /// Signalled when stderr's reader has read its last line.
    stderr_read: mpsc::Receiver<()>,
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
        let mut child = Command::new(udptrace_bin())
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
        let (read_tx, stderr_read) = mpsc::channel();
        {
            let stderr = stderr.clone();
            let pipe = child.stderr.take().expect("stderr");
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    // Kept before the start is signalled: a test reads the start line
                    // as soon as start() returns.
                    {
                        let mut s = stderr.lock().unwrap();
                        s.push_str(&line);
                        s.push('\n');
                    }
                    if line.starts_with("udptrace: tracing") {
                        let _ = ready_tx.send(());
                    }
                }
                let _ = read_tx.send(());
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
            stderr_read,
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

    /// Waits for udptrace to exit by itself, and for its last lines on stderr (the exit
    /// line) to be read: the reader may still be behind when the process is gone.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                let _ = self.stderr_read.recv_timeout(Duration::from_secs(5));
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

impl Drop for Tracer {
    fn drop(&mut self) {
        // A tracer blocked writing its output could not see the signal.
        self.release_output();
        stop_child(&mut self.child);
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
        Self::start_via(Command::new(udptrace_bin()), args)
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

    /// The agent's open file descriptors, and the BPF links and programs among them: the
    /// least of three looks 20 ms apart (a file opened for a moment, a namespace being
    /// looked at, is not a leak; a leaked one stays).
    pub fn fds(&self) -> Fds {
        (0..3)
            .map(|i| {
                if i > 0 {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Fds::of(self.child.id())
            })
            .min_by_key(|f| f.total)
            .unwrap()
    }

    /// Time the agent's threads have spent runnable but waiting for a CPU, summed over its
    /// threads (/proc/PID/task/TID/schedstat's second field, ns): how much other work on the
    /// machine kept it from running.
    pub fn cpu_wait(&self) -> Duration {
        let tasks = format!("/proc/{}/task", self.child.id());
        let ns: u64 = std::fs::read_dir(tasks)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
            .filter_map(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum();
        Duration::from_nanos(ns)
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
        http::metric_value(&self.get("/metrics"), series)
    }

    /// GET `path` (with its query) from the agent: the body.
    pub fn get(&self, path: &str) -> String {
        http::http_get(&format!("{}{path}", self.url))
    }

    /// GETs `path` until its body satisfies `ok` (up to 15 s: the agent reads hop events on
    /// its tick, paths finish a little after their last hop); the last body.
    pub fn get_until(&self, path: &str, ok: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let body = self.get(path);
            if ok(&body) || Instant::now() > deadline {
                return body;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// POST `path` (with its query) to the agent: status and body.
    pub fn post(&self, path: &str) -> (u16, String) {
        http::post(&format!("{}{path}", self.url)).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The path windows' status (`GET /api/v1/windows`).
    pub fn windows(&self) -> Value {
        serde_json::from_str(&self.get("/api/v1/windows")).expect("windows JSON")
    }

    /// Waits up to 15 s for the windows' status to satisfy `ok`.
    pub fn windows_until(&self, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let w = self.windows();
            if ok(&w) {
                return w;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: windows {w}\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Asks for a path window of `duration` (`5s`, `1m`) and waits until its hooks are
    /// attached.
    pub fn open_window(&self, duration: &str) {
        let (status, body) = self.post(&format!("/api/v1/windows?duration={duration}"));
        assert_eq!(status, 202, "{body}");
        self.windows_until("window open", |w| w["open"] == true);
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
    hook_family("send")
}

/// The hook family (`fentry`, `tp_btf`, `raw_tracepoint`...) doctor says `hop` uses here.
pub fn hook_family(hop: &str) -> String {
    let (status, out, _) = udptrace(Command::new(udptrace_bin()).arg("doctor"));
    assert!(status.success(), "doctor failed:\n{out}");
    let line = out
        .lines()
        .find(|l| l.starts_with(&format!("{hop} hop")))
        .unwrap_or_else(|| panic!("no {hop} hop line in doctor's output:\n{out}"));
    let hook = line.split("uses ").nth(1).expect("uses <hook>");
    hook.split(':').next().unwrap().to_string()
}

/// The drop hop's program here (the typed tracepoint's or the raw one's).
pub fn drop_program() -> &'static str {
    if hook_family("drop") == "tp_btf" {
        "drop_btf_kfree_skb"
    } else {
        "drop_kfree_skb"
    }
}

/// Whether the send hop this kernel uses reports once the send is over, after the
/// datagram's skb hops (the `sock_send_length` tracepoint, typed or raw), rather than on
/// entry to UDP (fentry, kprobe).
pub fn send_hop_reports_after_skbs() -> bool {
    matches!(send_hook_family().as_str(), "tp_btf" | "raw_tracepoint")
}

/// Whether udptrace attaches with tcx here (Linux 6.6+, unless told not to).
pub fn uses_tcx(env: &[(&str, &str)]) -> bool {
    let (_, out, _) = udptrace(
        Command::new(udptrace_bin())
            .arg("doctor")
            .envs(env.iter().copied()),
    );
    out.lines()
        .any(|l| l.starts_with("ingress hop") && l.contains("tcx:ingress"))
}

/// The hook `udptrace doctor` says the NAT hop uses now (`netfilter-link:nat` or
/// `kprobe:nf_nat_manip_pkt`), or `None` with the reason printed. Ask after creating the
/// NAT rules: the kprobe fallback needs the nf_nat module, which a first rule loads.
pub fn nat_hook() -> Option<String> {
    let (_, out, _) = udptrace(Command::new(udptrace_bin()).arg("doctor"));
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

/// Whether the running kernel has drop reason `SKB_DROP_REASON_<name>` (newer kernels name
/// more of their drops).
pub fn kernel_has_drop_reason(name: &str) -> bool {
    sh(&["bpftool", "btf", "dump", "file", "/sys/kernel/btf/vmlinux"])
        .contains(&format!("'SKB_DROP_REASON_{name}'"))
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
pub fn udptrace_program_ids() -> BTreeSet<u64> {
    let out = sh(&["bpftool", "-j", "prog", "show"]);
    let progs: Vec<Value> = serde_json::from_str(&out).expect("bpftool JSON");
    progs
        .iter()
        .filter(|p| {
            let name = p["name"].as_str().unwrap_or_default();
            [
                "count_", "send_", "xmit_", "drop_", "nat_", "deliver_", "recv_", "ingress_",
                "sample_",
            ]
            .iter()
            .any(|ours| name.starts_with(ours))
        })
        .filter_map(|p| p["id"].as_u64())
        .collect()
}

/// How many BPF links point at the programs `ids`.
pub fn links_to(ids: &BTreeSet<u64>) -> usize {
    let out = sh(&["bpftool", "-j", "link", "show"]);
    let links: Vec<Value> = serde_json::from_str(&out).expect("bpftool JSON");
    links
        .iter()
        .filter(|l| l["prog_id"].as_u64().is_some_and(|id| ids.contains(&id)))
        .count()
}

/// Waits (up to 5 s: the kernel frees a program shortly after its last reference goes)
/// until none of `ids` is loaded; the ones still there.
pub fn wait_unloaded(ids: &BTreeSet<u64>) -> Vec<u64> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left: Vec<u64> = udptrace_program_ids().intersection(ids).copied().collect();
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A process's open file descriptors, and the BPF links and programs among them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fds {
    pub total: usize,
    pub bpf_links: usize,
    pub bpf_progs: usize,
}

impl Fds {
    fn of(pid: u32) -> Self {
        let mut fds = Self {
            total: 0,
            bpf_links: 0,
            bpf_progs: 0,
        };
        for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))
            .expect("the process's fds")
            .flatten()
        {
            fds.total += 1;
            match std::fs::read_link(entry.path()) {
                Ok(t) if t.as_os_str() == "anon_inode:bpf_link" => fds.bpf_links += 1,
                Ok(t) if t.as_os_str() == "anon_inode:bpf-prog" => fds.bpf_progs += 1,
                _ => {}
            }
        }
        fds
    }
}
