//! `cargo xtask bench`: what tracing costs. UDP datagrams per second between two network
//! namespaces over a veth pair, with each tool in turn (alternating, several rounds, the
//! median kept): no tracer, the agent as the DaemonSet runs it, `trace` in full-path mode,
//! tcpdump on the receiving interface, a bpftrace one-liner counting on one tracepoint.
//! Prints each tool's rate as a ratio of "no tracer" in the same run, with its CPU time,
//! peak memory, lost events, attach time and (agent) whether its flow counts are exact.

mod tools;
mod traffic;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use clap::ValueEnum;
use udptrace_testkit::Pair;

use crate::cmd::{is_root, workspace};
use tools::{ProgStats, Running};
use traffic::{send, Sink};

/// The sender's and the receiver's addresses (testkit's `Pair`: a in `a`, b in `b`).
const ADDR_A: &str = udptrace_testkit::A4;
const ADDR_B: &str = udptrace_testkit::B4;
/// The receiver's end of the veth.
const DEV_B: &str = "ut-b";
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
            crate::suite::build_release()?;
            workspace().join("target/release/udptrace")
        }
    };
    let mut tools = vec![Tool::None];
    if opts.tools.is_empty() {
        tools.extend([Tool::Agent, Tool::Trace, Tool::Tcpdump, Tool::Bpftrace]);
    } else {
        tools.extend(opts.tools.iter().filter(|t| **t != Tool::None));
    }
    let net = Pair::new(&[]);
    let _stats = opts.prog_stats.then(ProgStats::enable).transpose()?;
    let sink = Sink::start(&net.b.name)?;
    let secs = Duration::from_secs(opts.secs);
    let workloads = [1, opts.flows];
    let mut results: Vec<Vec<Vec<Sample>>> = vec![vec![Vec::new(); tools.len()]; workloads.len()];
    // Warm up (ARP, caches) before the first measurement counts.
    send(&net.a.name, 1, Duration::from_millis(500))?;
    for round in 0..opts.rounds {
        for (w, &flows) in workloads.iter().enumerate() {
            for (t, &tool) in tools.iter().enumerate() {
                let sample = measure(&exe, &net, tool, flows, secs, &sink, opts)
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
pub struct ToolCost {
    /// CPU time over wall time while the sender ran.
    pub cpu: f64,
    pub peak_kib: u64,
    /// From start until it said it was ready.
    pub attach: Duration,
    /// Events the tool lost (ring buffer full, or the kernel dropped packets to tcpdump).
    pub lost: Option<u64>,
    /// The agent's packet count for the flows sent on.
    pub counted: Option<u64>,
}

fn median(samples: &[Sample]) -> Sample {
    let mut v = samples.to_vec();
    v.sort_by(|a, b| a.rate().total_cmp(&b.rate()));
    v[v.len() / 2].clone()
}

fn measure(
    exe: &Path,
    net: &Pair,
    tool: Tool,
    flows: usize,
    secs: Duration,
    sink: &Sink,
    opts: &Options,
) -> Result<Sample> {
    let prog_stats = opts.prog_stats;
    let mut running = match tool {
        Tool::None => None,
        _ => Some(Running::start(exe, &net.b.name, tool, &opts.bpftrace)?),
    };
    let cpu_before = running.as_ref().map(Running::cpu_ticks).transpose()?;
    let before = sink.received();
    let started = Instant::now();
    let sent = send(&net.a.name, flows, secs)?;
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
