//! `cargo xtask bench`: what tracing costs. UDP datagrams per second between two network
//! namespaces over a veth pair, with each tool in turn (alternating, several rounds, the
//! median kept): no tracer, the agent as the DaemonSet runs it, `trace` in full-path mode,
//! tcpdump on the receiving interface, a bpftrace one-liner counting on one tracepoint.
//! Prints each tool's rate as a ratio of "no tracer" in the same run, with its CPU time,
//! peak memory, lost events, attach time and (agent) whether its flow counts are exact.

use std::{
    fs::File,
    io::{BufRead as _, BufReader, Read},
    net::UdpSocket,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc, Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use clap::ValueEnum;

use crate::cmd::{exec, is_root, workspace};

const NS_A: &str = "udpt-bench-a";
const NS_B: &str = "udpt-bench-b";
const DEV_A: &str = "ubench-a";
const DEV_B: &str = "ubench-b";
const ADDR_A: &str = "10.213.0.1";
const ADDR_B: &str = "10.213.0.2";
const PORT: u16 = 9999;
/// UDP payload bytes per datagram (a small DNS query's size).
const PAYLOAD: usize = 64;

/// The targets (issue 7): rate with the tool over rate without.
const TARGET_AGENT: f64 = 0.97;
const TARGET_TRACE: f64 = 0.85;

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Seconds each measurement sends for.
    #[arg(long, default_value_t = 5)]
    secs: u64,
    /// Rounds; each runs every tool once, in turn. The median round is reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Flows (sockets sending in turn) of the many-flow workload.
    #[arg(long, default_value_t = 1000)]
    flows: usize,
    /// Tools to compare with "no tracer" (comma separated) [default: all].
    #[arg(long, value_enum, value_delimiter = ',')]
    tools: Vec<Tool>,
    /// Fail when a target does not hold (agent ≥ 0.97, trace ≥ 0.85 of the no-tracer rate,
    /// the agent's flow counts exact).
    #[arg(long)]
    check: bool,
    /// Print where udptrace's eBPF programs spend their time (kernel.bpf_stats_enabled is
    /// turned on while the benchmark runs: it costs a little on every program run).
    #[arg(long)]
    prog_stats: bool,
    /// The program the `bpftrace` tool runs: say, empty probes on the tracepoints udptrace
    /// uses, to see what merely being attached there costs.
    #[arg(
        long,
        default_value = "tracepoint:net:netif_receive_skb { @packets = count(); }"
    )]
    bpftrace: String,
    /// The udptrace binary to measure instead of this workspace's release build (an older
    /// build, to compare two versions run for run).
    #[arg(long)]
    udptrace: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Tool {
    /// No tracer: the baseline.
    None,
    /// `udptrace agent` with the DaemonSet's settings (every namespace, 1 in 100 sampled).
    Agent,
    /// `udptrace trace --netns all`: every datagram's full path printed.
    Trace,
    /// `tcpdump -w /dev/null` on the receiving interface.
    Tcpdump,
    /// bpftrace running `--bpftrace` (by default counting `tracepoint:net:netif_receive_skb`).
    Bpftrace,
}

impl Tool {
    fn name(self) -> &'static str {
        match self {
            Self::None => "no tracer",
            Self::Agent => "udptrace agent",
            Self::Trace => "udptrace trace",
            Self::Tcpdump => "tcpdump",
            Self::Bpftrace => "bpftrace",
        }
    }
}

pub fn run(opts: &Options) -> Result<()> {
    ensure!(
        is_root(),
        "the benchmark creates network namespaces and loads eBPF programs: run it as root \
         (sudo -E cargo xtask bench)"
    );
    ensure!(
        opts.rounds > 0 && opts.secs > 0 && opts.flows > 0,
        "nothing to measure"
    );
    let exe = match &opts.udptrace {
        Some(exe) => exe.clone(),
        None => {
            crate::test::build_release()?;
            workspace().join("target/release/udptrace")
        }
    };
    let mut tools = vec![Tool::None];
    if opts.tools.is_empty() {
        tools.extend([Tool::Agent, Tool::Trace, Tool::Tcpdump, Tool::Bpftrace]);
    } else {
        tools.extend(opts.tools.iter().filter(|t| **t != Tool::None));
    }
    let _net = Net::new()?;
    let _stats = opts.prog_stats.then(ProgStats::enable).transpose()?;
    let sink = Sink::start()?;
    let secs = Duration::from_secs(opts.secs);
    let workloads = [1, opts.flows];
    let mut results: Vec<Vec<Vec<Sample>>> = vec![vec![Vec::new(); tools.len()]; workloads.len()];
    // Warm up (ARP, caches) before the first measurement counts.
    send(1, Duration::from_millis(500))?;
    for round in 0..opts.rounds {
        for (w, &flows) in workloads.iter().enumerate() {
            for (t, &tool) in tools.iter().enumerate() {
                let sample = measure(&exe, tool, flows, secs, &sink, opts)
                    .with_context(|| format!("{} with {flows} flow(s)", tool.name()))?;
                eprintln!(
                    "bench: round {} · {flows} flow(s) · {:<15} {:>10.0} datagrams/s",
                    round + 1,
                    tool.name(),
                    sample.rate()
                );
                results[w][t].push(sample);
            }
        }
    }
    sink.stop()?;
    let mut failures = Vec::new();
    for (w, &flows) in workloads.iter().enumerate() {
        println!();
        println!(
            "{flows} flow(s), {PAYLOAD}-byte datagrams, {ADDR_A} → {ADDR_B}:{PORT} over a veth; \
             {} s × {} round(s), median round",
            opts.secs, opts.rounds
        );
        let base = median(&results[w][0]).rate();
        println!(
            "{:<16} {:>13} {:>7} {:>9} {:>10} {:>8} {:>12} {:>10}",
            "tool",
            "datagrams/s",
            "ratio",
            "cpu",
            "peak RSS",
            "attach",
            "lost events",
            "flow count"
        );
        for (t, &tool) in tools.iter().enumerate() {
            let s = median(&results[w][t]);
            let ratio = s.rate() / base;
            println!(
                "{:<16} {:>13.0} {:>7.3} {:>9} {:>10} {:>8} {:>12} {:>10}",
                tool.name(),
                s.rate(),
                ratio,
                s.tool
                    .as_ref()
                    .map_or("-".into(), |x| format!("{:.0}%", x.cpu * 100.0)),
                s.tool
                    .as_ref()
                    .map_or("-".into(), |x| format!("{} MiB", x.peak_kib / 1024)),
                s.tool
                    .as_ref()
                    .map_or("-".into(), |x| format!("{:.2} s", x.attach.as_secs_f64())),
                s.tool
                    .as_ref()
                    .and_then(|x| x.lost)
                    .map_or("-".into(), |n| n.to_string()),
                s.tool
                    .as_ref()
                    .and_then(|x| x.counted)
                    .map_or("-".into(), |n| if n == s.sent {
                        "exact".into()
                    } else {
                        format!("{n}/{}", s.sent)
                    }),
            );
            let target = match tool {
                Tool::Agent => Some(TARGET_AGENT),
                Tool::Trace => Some(TARGET_TRACE),
                _ => None,
            };
            if let Some(target) = target.filter(|t| ratio < *t) {
                failures.push(format!(
                    "{} at {flows} flow(s): {ratio:.3} of the no-tracer rate (target {target})",
                    tool.name()
                ));
            }
            // Every round, not just the median: a flow count is exact or it is not.
            for s in &results[w][t] {
                if let Some(n) = s.tool.as_ref().and_then(|x| x.counted) {
                    if n != s.sent {
                        failures.push(format!(
                            "{} at {flows} flow(s) counted {n} of {} datagrams sent",
                            tool.name(),
                            s.sent
                        ));
                    }
                }
            }
        }
    }
    println!();
    println!("cpu: the tool's CPU time over the measurement's wall time (100% = one core).");
    if failures.is_empty() {
        println!("targets: all met");
    } else {
        println!("targets missed:\n  {}", failures.join("\n  "));
        if opts.check {
            bail!("{} target(s) missed", failures.len());
        }
    }
    Ok(())
}

/// One measurement: what was sent and delivered, and what the tool cost.
#[derive(Debug, Clone)]
struct Sample {
    secs: f64,
    sent: u64,
    delivered: u64,
    tool: Option<ToolCost>,
}

impl Sample {
    /// Datagrams delivered to the receiving socket per second.
    fn rate(&self) -> f64 {
        self.delivered as f64 / self.secs
    }
}

#[derive(Debug, Clone)]
struct ToolCost {
    /// CPU time over wall time while the sender ran.
    cpu: f64,
    peak_kib: u64,
    /// From start until it said it was ready.
    attach: Duration,
    /// Events the tool lost (ring buffer full, or the kernel dropped packets to tcpdump).
    lost: Option<u64>,
    /// The agent's packet count for the flows sent on.
    counted: Option<u64>,
}

fn median(samples: &[Sample]) -> Sample {
    let mut v = samples.to_vec();
    v.sort_by(|a, b| a.rate().total_cmp(&b.rate()));
    v[v.len() / 2].clone()
}

fn measure(
    exe: &Path,
    tool: Tool,
    flows: usize,
    secs: Duration,
    sink: &Sink,
    opts: &Options,
) -> Result<Sample> {
    let prog_stats = opts.prog_stats;
    let mut running = match tool {
        Tool::None => None,
        _ => Some(Running::start(exe, tool, &opts.bpftrace)?),
    };
    let cpu_before = running.as_ref().map(Running::cpu_ticks).transpose()?;
    let before = sink.received();
    let started = Instant::now();
    let sent = send(flows, secs)?;
    let elapsed = started.elapsed();
    let cpu_after = running.as_ref().map(Running::cpu_ticks).transpose()?;
    if prog_stats && matches!(tool, Tool::Agent | Tool::Trace) {
        ProgStats::print(sent)?;
    }
    // What is still queued reaches the socket.
    std::thread::sleep(Duration::from_millis(200));
    let delivered = sink.received() - before;
    let tool = match running.take() {
        None => None,
        Some(r) => Some(r.finish(
            cpu_after.unwrap_or(0) - cpu_before.unwrap_or(0),
            elapsed,
            sent,
        )?),
    };
    Ok(Sample {
        secs: elapsed.as_secs_f64(),
        sent,
        delivered,
        tool,
    })
}

/// The two namespaces and their veth, removed when dropped.
struct Net;

impl Net {
    fn new() -> Result<Self> {
        for ns in [NS_A, NS_B] {
            // Left over from an interrupted run.
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
            exec(Command::new("ip").args(["netns", "add", ns]))?;
        }
        let net = Self;
        exec(Command::new("ip").args([
            "link", "add", DEV_A, "netns", NS_A, "type", "veth", "peer", "name", DEV_B, "netns",
            NS_B,
        ]))?;
        for (ns, dev, addr) in [(NS_A, DEV_A, ADDR_A), (NS_B, DEV_B, ADDR_B)] {
            exec(Command::new("ip").args([
                "-n",
                ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                dev,
            ]))?;
            exec(Command::new("ip").args(["-n", ns, "link", "set", dev, "up"]))?;
            exec(Command::new("ip").args(["-n", ns, "link", "set", "lo", "up"]))?;
        }
        Ok(net)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in [NS_A, NS_B] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Moves the calling thread into network namespace `name` (sockets it opens live there).
fn enter(name: &str) -> Result<()> {
    let file = File::open(Path::new("/run/netns").join(name))
        .with_context(|| format!("opening netns {name}"))?;
    // SAFETY: setns on an open namespace file; it affects this thread only.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    ensure!(
        rc == 0,
        "entering netns {name}: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// The sender and the receiver each keep a CPU of their own (where there are two): left to
/// the scheduler they sometimes share one, and the no-tracer rate alone moved by half between
/// runs. The veth delivers in the sender's softirq, so the sender's CPU does nearly all the
/// kernel work a datagram costs, with or without a tracer.
const SENDER_CPU: usize = 0;
const RECEIVER_CPU: usize = 1;

/// Keeps the calling thread on `cpu` (modulo the CPUs there are).
fn pin_to_cpu(cpu: usize) -> Result<()> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET writes inside it.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu % cpus, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    ensure!(
        rc == 0,
        "pinning to CPU {cpu}: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// A receiver in namespace b counting datagrams.
struct Sink {
    received: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Result<()>>,
}

impl Sink {
    fn start() -> Result<Self> {
        let received = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = {
            let (received, stop) = (received.clone(), stop.clone());
            std::thread::spawn(move || -> Result<()> {
                enter(NS_B)?;
                pin_to_cpu(RECEIVER_CPU)?;
                let socket = UdpSocket::bind((ADDR_B, PORT)).context("binding the receiver")?;
                set_rcvbuf(&socket, 8 << 20)?;
                socket.set_read_timeout(Some(Duration::from_millis(100)))?;
                let _ = ready_tx.send(());
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    match socket.recv(&mut buf) {
                        Ok(_) => {
                            received.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock
                                    | std::io::ErrorKind::TimedOut
                                    | std::io::ErrorKind::Interrupted
                            ) => {}
                        Err(e) => return Err(e).context("receiving"),
                    }
                }
                Ok(())
            })
        };
        if ready_rx.recv_timeout(Duration::from_secs(10)).is_err() {
            return match thread.join() {
                Ok(Err(e)) => Err(e),
                _ => bail!("the receiver did not start"),
            };
        }
        Ok(Self {
            received,
            stop,
            thread,
        })
    }

    fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    fn stop(self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("the receiver panicked"))?
    }
}

fn set_rcvbuf(socket: &UdpSocket, bytes: i32) -> Result<()> {
    // SAFETY: setsockopt with a pointer to an int of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&raw const bytes).cast(),
            std::mem::size_of::<i32>() as u32,
        )
    };
    ensure!(
        rc == 0,
        "SO_RCVBUFFORCE: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// Sends as fast as one thread can from namespace a for `secs`, cycling through `flows`
/// connected sockets (each its own source port: its own flow). Returns datagrams sent.
fn send(flows: usize, secs: Duration) -> Result<u64> {
    std::thread::spawn(move || -> Result<u64> {
        enter(NS_A)?;
        pin_to_cpu(SENDER_CPU)?;
        let sockets = (0..flows)
            .map(|_| {
                let s = UdpSocket::bind((ADDR_A, 0))?;
                s.connect((ADDR_B, PORT))?;
                Ok(s)
            })
            .collect::<std::io::Result<Vec<_>>>()
            .context("opening the senders' sockets")?;
        let payload = [0x5au8; PAYLOAD];
        let deadline = Instant::now() + secs;
        let mut sent = 0u64;
        'out: loop {
            for s in &sockets {
                // A full queue (ENOBUFS) or an ICMP error is a datagram not sent.
                if s.send(&payload).is_ok() {
                    sent += 1;
                }
                if sent.is_multiple_of(256) && Instant::now() >= deadline {
                    break 'out;
                }
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        Ok(sent)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the sender panicked"))?
}

/// A tool tracing while the sender runs.
struct Running {
    tool: Tool,
    child: Child,
    attach: Duration,
    /// The agent's URL.
    url: Option<String>,
    output: Arc<Mutex<String>>,
}

impl Running {
    fn start(exe: &Path, tool: Tool, bpftrace: &str) -> Result<Self> {
        let (mut cmd, ready) = match tool {
            Tool::None => unreachable!("no tracer runs nothing"),
            Tool::Agent => {
                let mut c = Command::new(exe);
                c.args(["agent", "--listen", "127.0.0.1:0", "--netns", "all"]);
                (c, "udptrace: agent listening on ")
            }
            Tool::Trace => {
                let mut c = Command::new(exe);
                c.args(["trace", "--netns", "all"]);
                (c, "udptrace: tracing")
            }
            Tool::Tcpdump => {
                let mut c = Command::new("ip");
                c.args([
                    "netns",
                    "exec",
                    NS_B,
                    "tcpdump",
                    "-n",
                    "-i",
                    DEV_B,
                    "-w",
                    "/dev/null",
                    "udp",
                ]);
                (c, "listening on")
            }
            Tool::Bpftrace => {
                let mut c = Command::new("bpftrace");
                c.args(["-e", bpftrace]);
                (c, "Attaching ")
            }
        };
        // trace prints every path: to /dev/null, so the terminal is not what is measured.
        let stdout = if tool == Tool::Trace {
            Stdio::null()
        } else {
            Stdio::piped()
        };
        let started = Instant::now();
        let mut child = cmd
            .stdout(stdout)
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", crate::cmd::show(&cmd)))?;
        let output = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let pipes: Vec<Box<dyn Read + Send>> = [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        ]
        .into_iter()
        .flatten()
        .collect();
        for pipe in pipes {
            let (tx, output) = (tx.clone(), output.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if let Some(at) = line.find(ready) {
                        let _ = tx.send(line[at + ready.len()..].trim().to_string());
                    }
                    let mut o = output.lock().unwrap();
                    o.push_str(&line);
                    o.push('\n');
                }
            });
        }
        let mut running = Self {
            tool,
            child,
            attach: Duration::ZERO,
            url: None,
            output,
        };
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(rest) => {
                running.attach = started.elapsed();
                if tool == Tool::Agent {
                    running.url = Some(rest);
                }
                Ok(running)
            }
            Err(_) => bail!(
                "{} did not get ready:\n{}",
                tool.name(),
                running.output.lock().unwrap()
            ),
        }
    }

    fn proc_file(&self, name: &str) -> Result<String> {
        let path = PathBuf::from(format!("/proc/{}/{name}", self.child.id()));
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
    }

    /// User and system CPU time so far, in clock ticks (all threads).
    fn cpu_ticks(&self) -> Result<u64> {
        let stat = self.proc_file("stat")?;
        // Fields after the command name (which may hold spaces) in parentheses.
        let rest = stat.rsplit_once(')').context("/proc/PID/stat")?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are the 14th and 15th fields; `rest` starts at the 3rd.
        let field = |i: usize| -> Result<u64> {
            fields
                .get(i - 3)
                .context("/proc/PID/stat is short")?
                .parse()
                .context("/proc/PID/stat")
        };
        Ok(field(14)? + field(15)?)
    }

    /// Peak resident memory (VmHWM), KiB.
    fn peak_kib(&self) -> Result<u64> {
        self.proc_file("status")?
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .context("VmHWM in /proc/PID/status")
    }

    /// Reads what the tool cost, then stops it with SIGINT.
    fn finish(mut self, ticks: u64, wall: Duration, sent: u64) -> Result<ToolCost> {
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let cpu = ticks as f64 / hz / wall.as_secs_f64();
        let counted = match &self.url {
            Some(url) => Some(agent_count(url, sent)?),
            None => None,
        };
        let lost_metric = match &self.url {
            Some(url) => Some(metric(url, "udptrace_events_lost_total")?),
            None => None,
        };
        let peak_kib = self.peak_kib()?;
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                bail!("{} did not stop on SIGINT", self.tool.name());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // The readers see the pipes close.
        std::thread::sleep(Duration::from_millis(100));
        let output = self.output.lock().unwrap().clone();
        // bpftrace ends on SIGINT with its map printed; the others with status 0.
        ensure!(
            status.success() || self.tool == Tool::Bpftrace,
            "{} exited with {status}:\n{output}",
            self.tool.name()
        );
        let lost = match self.tool {
            Tool::Agent => lost_metric,
            Tool::Trace => number_before(&output, " event(s) lost to a full ring buffer"),
            Tool::Tcpdump => number_before(&output, " packets dropped by kernel"),
            _ => None,
        };
        Ok(ToolCost {
            cpu,
            peak_kib,
            attach: self.attach,
            lost,
            counted,
        })
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
            let _ = self.child.wait();
        }
    }
}

/// kernel.bpf_stats_enabled on while it lives, as it was before after.
struct ProgStats(String);

/// How udptrace's program names begin (udptrace-ebpf: one prefix per hook family).
const PROGRAM_PREFIXES: &[&str] = &[
    "send_", "xmit_", "drop_", "nat_", "deliver_", "recv_", "ingress_", "sample_",
];

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl ProgStats {
    fn enable() -> Result<Self> {
        let before = std::fs::read_to_string(BPF_STATS).context(BPF_STATS)?;
        std::fs::write(BPF_STATS, "1").context(BPF_STATS)?;
        Ok(Self(before.trim().to_string()))
    }

    /// udptrace's programs (by name: the one udptrace running), by total run time: runs per
    /// datagram, ns per run.
    fn print(datagrams: u64) -> Result<()> {
        let out = crate::cmd::output(Command::new("bpftool").args(["-j", "prog", "show"]))?;
        let progs: Vec<serde_json::Value> = serde_json::from_str(&out).context("bpftool JSON")?;
        let mut mine: Vec<(String, u64, u64)> = progs
            .iter()
            .filter(|p| {
                let name = p["name"].as_str().unwrap_or_default();
                PROGRAM_PREFIXES.iter().any(|ours| name.starts_with(ours))
            })
            .map(|p| {
                (
                    p["name"].as_str().unwrap_or("?").to_string(),
                    p["run_cnt"].as_u64().unwrap_or(0),
                    p["run_time_ns"].as_u64().unwrap_or(0),
                )
            })
            .filter(|(_, runs, _)| *runs > 0)
            .collect();
        mine.sort_by_key(|(_, _, ns)| std::cmp::Reverse(*ns));
        let total: u64 = mine.iter().map(|(_, _, ns)| ns).sum();
        eprintln!(
            "bench: eBPF time {:.0} ns per datagram sent ({datagrams} sent)",
            total as f64 / datagrams.max(1) as f64
        );
        for (name, runs, ns) in mine {
            eprintln!(
                "bench:   {name:<16} {:>6.2} runs/datagram {:>6} ns/run {:>6.0} ns/datagram",
                runs as f64 / datagrams.max(1) as f64,
                ns / runs,
                ns as f64 / datagrams.max(1) as f64
            );
        }
        Ok(())
    }
}

impl Drop for ProgStats {
    fn drop(&mut self) {
        let _ = std::fs::write(BPF_STATS, &self.0);
    }
}

/// The number printed right before `suffix` in `text`.
fn number_before(text: &str, suffix: &str) -> Option<u64> {
    let end = text.find(suffix)?;
    text[..end]
        .rsplit(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

fn http_get(url: &str) -> Result<String> {
    ureq::get(url)
        .call()
        .with_context(|| format!("GET {url}"))?
        .body_mut()
        .read_to_string()
        .with_context(|| format!("GET {url}"))
}

fn metric(url: &str, name: &str) -> Result<u64> {
    let body = http_get(&format!("{url}/metrics"))?;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .with_context(|| format!("{name} in /metrics"))
}

/// The agent's packet count over the benchmark's flows, once it has read the kernel's
/// counters after the last datagram (it reads them every second).
fn agent_count(url: &str, want: u64) -> Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let body: serde_json::Value =
            serde_json::from_str(&http_get(&format!("{url}/api/v1/flows?port={PORT}"))?)
                .context("the agent's flows")?;
        let counted: u64 = body["flows"]
            .as_array()
            .context("flows")?
            .iter()
            .filter_map(|f| f["packets"].as_u64())
            .sum();
        if counted >= want || Instant::now() > deadline {
            return Ok(counted);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_counts_out_of_exit_lines() {
        let line = "udptrace: stopped (Signal); 12 datagram(s) shown, 3471 event(s) lost to a full ring buffer, 0 kernel read error(s)";
        assert_eq!(
            number_before(line, " event(s) lost to a full ring buffer"),
            Some(3471)
        );
        assert_eq!(
            number_before("0 packets dropped by kernel", " packets dropped by kernel"),
            Some(0)
        );
        assert_eq!(number_before("nothing", " packets dropped by kernel"), None);
    }
}
