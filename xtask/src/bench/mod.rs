//! `cargo xtask bench`: what tracing costs. UDP datagrams per second between two network
//! namespaces over a veth pair, with each tool in turn (interleaved: every round runs every
//! tool once; the median over rounds kept, with the spread): no tracer, the agent counting
//! only (the always-on mode), the agent with sampled paths, `trace` in full-path mode,
//! `trace` filtered to a port nothing uses, tcpdump on the receiving interface, a bpftrace
//! one-liner. Prints each tool's rate as a ratio of "no tracer" in the same round and the
//! nanoseconds it adds per datagram on the sending CPU (1/rate_with − 1/rate_without), with
//! its CPU time, peak memory, lost events, attach time and whether its flow counts are exact.

pub mod reference;
mod tools;
mod traffic;
mod workload;

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use clap::ValueEnum;
use udptrace_testkit::Pair;

use crate::cmd::{is_root, workspace};
use tools::{ProgStats, Running};
use traffic::{send, Busy, Sink};
use workload::{Workload, WorkloadKind};

/// The sender's and the receiver's addresses (testkit's `Pair`: a in `a`, b in `b`).
const ADDR_A: &str = udptrace_testkit::A4;
const ADDR_B: &str = udptrace_testkit::B4;
/// The receiver's end of the veth.
const DEV_B: &str = "ut-b";
/// The sender's end.
const DEV_A: &str = "ut-a";
const PORT: u16 = 9999;
/// UDP payload bytes per datagram (a small DNS query's size).
const PAYLOAD: usize = 64;

/// The targets (issue 16): rate with the tool over rate without. Always-on counting keeps
/// ≥ 0.97; a filtered `trace` leaves traffic it does not match ≥ 0.95.
const TARGET_COUNTING: f64 = 0.97;
const TARGET_FILTERED: f64 = 0.95;
/// At 50 000 datagrams/s always-on counting adds at most 0.5% of one core (≈ 100 ns a
/// datagram); `trace` of every datagram loses nothing and adds at most 1 µs a datagram.
const TARGET_COUNTING_CORE_PERCENT: f64 = 0.5;
const TARGET_TRACE_NS: f64 = 1000.0;
/// The port the filtered trace asks for: no datagram of the benchmark goes there.
pub const UNUSED_PORT: u16 = 53;

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Seconds each measurement sends for.
    #[arg(long, default_value_t = 5)]
    secs: u64,
    /// Rounds; each runs every tool once, in turn. The median over rounds is reported, with
    /// the lowest and highest.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Flows (sockets sending in turn) of the many-flow workload.
    #[arg(long, default_value_t = 1000)]
    flows: usize,
    /// Workloads, each a table of its own (comma separated): `one` connected socket, `many`
    /// (`--flows` connected sockets in turn), `unconnected` (`sendto`), `ipv6`, `dnat` (an
    /// nftables DNAT in the sender's namespace), `drops` (half the datagrams dropped by an
    /// nftables rule at the receiver), `churn` (a new socket per datagram).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "one,many")]
    workloads: Vec<WorkloadKind>,
    /// Datagrams a second of the fixed-rate runs, which measure the CPU time each tool adds
    /// per datagram (0: none).
    #[arg(long, default_value_t = 50_000)]
    rate: u64,
    /// Only the fixed-rate runs, not the max-rate ones.
    #[arg(long)]
    fixed_only: bool,
    /// Tools to compare with "no tracer" (comma separated) [default: all]. `none` adds a
    /// second no-tracer run to each round: a control that shows the instrument's spread.
    #[arg(long, value_enum, value_delimiter = ',')]
    tools: Vec<Tool>,
    /// Fail when a target does not hold (counting ≥ 0.97 and filtered trace ≥ 0.95 of the
    /// no-tracer rate, the agent's flow counts exact).
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
    /// `udptrace agent` as it runs by default (every namespace): counting, path hooks only in
    /// windows (none opens under this load), the always-on cost.
    Counting,
    /// The agent as `counting`, its always-on programs attached with empty bodies
    /// (`UDPTRACE_EMPTY_BODIES=1`): what the hooks cost before udptrace does anything.
    CountingFloor,
    /// `udptrace agent --paths on`: sampled paths all the time (every namespace, 1 in 100
    /// traced hop by hop), what a path window costs.
    Agent,
    /// `udptrace trace --netns all`: every datagram's full path printed.
    Trace,
    /// `udptrace trace --netns all --port 53`: a filter no datagram of the load matches.
    TraceFiltered,
    /// `trace --port 53` with every program's body empty (`UDPTRACE_EMPTY_BODIES=1`): what
    /// its hooks cost attached, before udptrace does anything (the filter's floor).
    TraceFilteredFloor,
    /// `tcpdump -w /dev/null` on the receiving interface.
    Tcpdump,
    /// bpftrace running `--bpftrace` (by default counting `tracepoint:net:netif_receive_skb`).
    Bpftrace,
    /// The reference always-on counter (NetObserv's design: tc ingress and egress on both
    /// veth ends, a per-CPU hash per flow, evicted every 5 s; xtask/reference-ebpf).
    Reference,
    /// `conntrack -E` in the sender's namespace: what following conntrack's events costs
    /// alone (the agent's NAT per flow comes from them).
    ConntrackEvents,
}

impl Tool {
    fn name(self) -> &'static str {
        match self {
            Self::None => "no tracer",
            Self::Counting => "agent (default)",
            Self::CountingFloor => "agent, empty",
            Self::Agent => "agent --paths on",
            Self::Trace => "trace",
            Self::TraceFiltered => "trace --port 53",
            Self::TraceFilteredFloor => "trace --port 53, empty",
            Self::Tcpdump => "tcpdump",
            Self::Bpftrace => "bpftrace",
            Self::Reference => "reference",
            Self::ConntrackEvents => "conntrack -E",
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
    let mut tools = vec![Tool::None];
    if opts.tools.is_empty() {
        tools.extend([
            Tool::Counting,
            Tool::CountingFloor,
            Tool::Agent,
            Tool::Trace,
            Tool::TraceFiltered,
            Tool::TraceFilteredFloor,
            Tool::Tcpdump,
            Tool::Bpftrace,
            Tool::Reference,
        ]);
    } else {
        // `none` among them is a second no-tracer run in each round: a control, whose
        // "added" shows what the instrument's spread alone makes of nothing.
        tools.extend(opts.tools.iter());
    }
    let programs = Programs {
        udptrace: match &opts.udptrace {
            Some(exe) => exe.clone(),
            None => {
                crate::suite::build_release()?;
                workspace().join("target/release/udptrace")
            }
        },
        reference: if tools.contains(&Tool::Reference) {
            Some(reference::build()?)
        } else {
            None
        },
        bpftrace: opts.bpftrace.clone(),
    };
    let mut phases = Vec::new();
    if !opts.fixed_only {
        phases.push(Phase::MaxRate);
    }
    if opts.rate > 0 {
        phases.push(Phase::Fixed(opts.rate));
    }
    ensure!(
        !phases.is_empty(),
        "--fixed-only with --rate 0: nothing to measure"
    );
    let net = Pair::new(&[]);
    let _stats = opts.prog_stats.then(ProgStats::enable).transpose()?;
    let sink = Sink::start(&net.b.name)?;
    let secs = Duration::from_secs(opts.secs);
    let workloads: Vec<Workload> = opts
        .workloads
        .iter()
        .map(|&k| Workload::of(k, opts.flows))
        .collect();
    // [phase][workload][tool] → one sample a round.
    let mut results = vec![vec![vec![Vec::new(); tools.len()]; workloads.len()]; phases.len()];
    // Warm up (neighbours, caches) before the first measurement of each workload counts.
    for &workload in &workloads {
        let _prepared = workload.prepare(&net)?;
        send(&net.a.name, workload, Duration::from_millis(500), None)?;
    }
    for round in 0..opts.rounds {
        for (p, &phase) in phases.iter().enumerate() {
            for (w, &workload) in workloads.iter().enumerate() {
                for (t, &tool) in tools.iter().enumerate() {
                    let case = Case {
                        tool,
                        workload,
                        phase,
                    };
                    let sample = measure(&programs, &net, case, secs, &sink, opts)
                        .with_context(|| format!("{} with {}", tool.name(), workload.label()))?;
                    eprintln!(
                        "bench: round {} · {} · {} · {:<15} {:>10.0} datagrams/s{}",
                        round + 1,
                        phase.name(),
                        workload.label(),
                        tool.name(),
                        sample.rate(),
                        sample
                            .busy_per_datagram()
                            .map_or(String::new(), |ns| format!(
                                ", {ns:.0} ns of CPU per datagram"
                            ))
                    );
                    results[p][w][t].push(sample);
                }
            }
        }
    }
    sink.stop()?;
    let mut failures = Vec::new();
    for (p, &phase) in phases.iter().enumerate() {
        for (w, &workload) in workloads.iter().enumerate() {
            let report = Report {
                phase,
                workload,
                tools: &tools,
                results: &results[p][w],
                opts,
            };
            match phase {
                Phase::MaxRate => report.max_rate(&mut failures),
                Phase::Fixed(rate) => report.fixed_rate(rate, &mut failures),
            }
        }
    }
    println!();
    if !opts.fixed_only {
        println!(
            "max rate — ratio: rate with the tool over the no-tracer rate of the same round; \
             added ns: 1/rate_with − 1/rate_without, the sending CPU's time per datagram (the \
             veth delivers on it too). cpu: the tool's own CPU time over wall time (100% = one \
             core)."
        );
    }
    if opts.rate > 0 {
        println!(
            "fixed rate — CPU ns/datagram: busy time of every CPU (all but their idle time: \
             sender, softirq, receiver and the tool together) over datagrams sent; added: the \
             same less the no-tracer run's of the same round; % core: that at the rate sent; own % \
             core: the tool's process alone (its eBPF programs run in the senders' and \
             softirq's time, not its own)."
        );
    }
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

/// What the tools run.
pub struct Programs {
    /// udptrace's binary.
    pub udptrace: PathBuf,
    /// The reference counter's eBPF object, when it is measured.
    pub reference: Option<PathBuf>,
    /// bpftrace's program.
    pub bpftrace: String,
}

/// How the sender sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// As fast as it can: what a tool takes off the rate.
    MaxRate,
    /// At this many datagrams a second: the CPU time a tool adds per datagram.
    Fixed(u64),
}

impl Phase {
    fn name(self) -> String {
        match self {
            Self::MaxRate => "max rate".into(),
            Self::Fixed(rate) => format!("{rate}/s"),
        }
    }
}

/// One table: one phase and workload, every tool over the rounds.
struct Report<'a> {
    phase: Phase,
    workload: Workload,
    tools: &'a [Tool],
    results: &'a [Vec<Sample>],
    opts: &'a Options,
}

impl Report<'_> {
    fn heading(&self) {
        println!();
        println!(
            "{}, {PAYLOAD}-byte datagrams, {ADDR_A} → {ADDR_B}:{PORT} over a veth, {}; \
             {} s × {} round(s): median [lowest–highest]",
            self.workload.label(),
            match self.phase {
                Phase::MaxRate => "as fast as one thread sends".into(),
                Phase::Fixed(rate) => format!("{rate} datagrams/s"),
            },
            self.opts.secs,
            self.opts.rounds
        );
    }

    /// Per round, `f` of the tool's sample and the no-tracer sample of that round.
    fn per_round(&self, t: usize, f: impl Fn(&Sample, &Sample) -> f64) -> Spread {
        let values: Vec<f64> = self.results[t]
            .iter()
            .zip(&self.results[0])
            .map(|(s, b)| f(s, b))
            .collect();
        Spread::of(&values)
    }

    fn max_rate(&self, failures: &mut Vec<String>) {
        self.heading();
        println!(
            "{:<16} {:>10} {:>19} {:>21} {:>5} {:>8} {:>7} {:>11} {:>10}",
            "tool",
            "dgrams/s",
            "ratio",
            "added ns/datagram",
            "cpu",
            "peak RSS",
            "attach",
            "lost events",
            "flow count"
        );
        for (t, &tool) in self.tools.iter().enumerate() {
            let ratio = self.per_round(t, |s, b| s.rate() / b.rate());
            let added = self.per_round(t, |s, b| 1e9 / s.rate() - 1e9 / b.rate());
            let s = median(&self.results[t]);
            let cost = |f: &dyn Fn(&ToolCost) -> String| s.tool.as_ref().map_or("-".into(), f);
            println!(
                "{:<16} {:>10.0} {:>19} {:>21} {:>5} {:>8} {:>7} {:>11} {:>10}",
                tool.name(),
                s.rate(),
                if t == 0 { "1".into() } else { ratio.show(3) },
                if t == 0 { "0".into() } else { added.show(0) },
                cost(&|x| format!("{:.0}%", x.cpu * 100.0)),
                cost(&|x| format!("{} MiB", x.peak_kib / 1024)),
                cost(&|x| format!("{:.2} s", x.attach.as_secs_f64())),
                s.lost().map_or("-".into(), |n| n.to_string()),
                s.count_shown(),
            );
            let target = match tool {
                Tool::Counting => Some(TARGET_COUNTING),
                Tool::TraceFiltered => Some(TARGET_FILTERED),
                _ => None,
            };
            if let Some(target) = target.filter(|t| ratio.median < *t) {
                failures.push(format!(
                    "{} at {}: {:.3} of the no-tracer rate (target {target})",
                    tool.name(),
                    self.workload.label(),
                    ratio.median
                ));
            }
            self.exact_counts(tool, t, failures);
        }
        self.beats_reference(|s, b| 1e9 / s.rate() - 1e9 / b.rate(), failures);
    }

    /// The always-on agent must add less per datagram than the reference counter (the median
    /// over rounds of `added`, each against its round's no-tracer sample).
    fn beats_reference(&self, added: impl Fn(&Sample, &Sample) -> f64, failures: &mut Vec<String>) {
        let find = |tool| self.tools.iter().position(|&t| t == tool);
        let (Some(agent), Some(reference)) = (find(Tool::Counting), find(Tool::Reference)) else {
            return;
        };
        let (a, r) = (
            self.per_round(agent, &added).median,
            self.per_round(reference, &added).median,
        );
        if a > r {
            failures.push(format!(
                "{} at {}, {}: {a:.0} ns added per datagram, the reference {r:.0}",
                Tool::Counting.name(),
                self.workload.label(),
                self.phase.name()
            ));
        }
    }

    fn fixed_rate(&self, rate: u64, failures: &mut Vec<String>) {
        self.heading();
        println!(
            "{:<16} {:>10} {:>17} {:>19} {:>7} {:>10} {:>11} {:>10}",
            "tool",
            "sent/s",
            "CPU ns/datagram",
            "added ns/datagram",
            "% core",
            "own % core",
            "lost events",
            "flow count"
        );
        let busy = |s: &Sample| s.busy_per_datagram().unwrap_or(f64::NAN);
        for (t, &tool) in self.tools.iter().enumerate() {
            let cpu = self.per_round(t, |s, _| busy(s));
            let added = self.per_round(t, |s, b| busy(s) - busy(b));
            let core = added.median * rate as f64 / 1e9 * 100.0;
            let own = self.per_round(t, |s, _| s.tool.as_ref().map_or(0.0, |x| x.cpu * 100.0));
            let s = median(&self.results[t]);
            println!(
                "{:<16} {:>10.0} {:>17} {:>19} {:>7} {:>10} {:>11} {:>10}",
                tool.name(),
                s.sent as f64 / s.secs,
                cpu.show(0),
                if t == 0 { "0".into() } else { added.show(0) },
                if t == 0 {
                    "0".into()
                } else {
                    format!("{core:.2}%")
                },
                if t == 0 {
                    "-".into()
                } else {
                    format!("{:.2}%", own.median)
                },
                self.results[t]
                    .iter()
                    .filter_map(Sample::lost)
                    .max()
                    .map_or("-".into(), |n| n.to_string()),
                s.count_shown(),
            );
            match tool {
                Tool::Counting if core > TARGET_COUNTING_CORE_PERCENT => failures.push(format!(
                    "{} at {}, {rate}/s: {core:.2}% of a core added (target ≤ \
                     {TARGET_COUNTING_CORE_PERCENT}%)",
                    tool.name(),
                    self.workload.label()
                )),
                Tool::Trace => {
                    if added.median > TARGET_TRACE_NS {
                        failures.push(format!(
                            "{} at {}, {rate}/s: {:.0} ns added per datagram (target \
                             ≤ {TARGET_TRACE_NS})",
                            tool.name(),
                            self.workload.label(),
                            added.median
                        ));
                    }
                    let lost: u64 = self.results[t].iter().filter_map(Sample::lost).sum();
                    if lost > 0 {
                        failures.push(format!(
                            "{} at {}, {rate}/s: {lost} event(s) lost (target: none)",
                            tool.name(),
                            self.workload.label()
                        ));
                    }
                }
                _ => {}
            }
            self.exact_counts(tool, t, failures);
        }
        let busy = |s: &Sample, b: &Sample| busy(s) - busy(b);
        self.beats_reference(busy, failures);
    }

    /// Every round, not just the median: a flow count is exact or it is not. (The
    /// reference's shortfall is shown, not a target: it is not udptrace.)
    fn exact_counts(&self, tool: Tool, t: usize, failures: &mut Vec<String>) {
        if tool == Tool::Reference {
            return;
        }
        for s in &self.results[t] {
            if let Some(n) = s.tool.as_ref().and_then(|x| x.counted) {
                if n != s.sent {
                    failures.push(format!(
                        "{} at {}, {}: counted {n} of {} datagrams sent",
                        tool.name(),
                        self.workload.label(),
                        self.phase.name(),
                        s.sent
                    ));
                }
            }
        }
    }
}

/// One measurement: what was sent and delivered, and what the tool cost.
#[derive(Debug, Clone)]
struct Sample {
    secs: f64,
    sent: u64,
    delivered: u64,
    /// At a fixed rate: every CPU's busy time while the sender ran.
    busy: Option<Duration>,
    tool: Option<ToolCost>,
}

impl Sample {
    /// Datagrams delivered to the receiving socket per second.
    fn rate(&self) -> f64 {
        self.delivered as f64 / self.secs
    }

    /// Nanoseconds of CPU time (every CPU's) per datagram sent, at a fixed rate.
    fn busy_per_datagram(&self) -> Option<f64> {
        Some(self.busy?.as_nanos() as f64 / self.sent.max(1) as f64)
    }

    fn lost(&self) -> Option<u64> {
        self.tool.as_ref()?.lost
    }

    /// "exact", or what the tool counted of what was sent, or "-" for a tool that counts
    /// nothing.
    fn count_shown(&self) -> String {
        match self.tool.as_ref().and_then(|x| x.counted) {
            None => "-".into(),
            Some(n) if n == self.sent => "exact".into(),
            Some(n) => format!("{n}/{}", self.sent),
        }
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

/// A median over rounds with the lowest and highest value.
#[derive(Debug, Clone, Copy)]
struct Spread {
    median: f64,
    low: f64,
    high: f64,
}

impl Spread {
    fn of(values: &[f64]) -> Self {
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let median = if v.len() % 2 == 1 {
            v[v.len() / 2]
        } else {
            (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
        };
        Self {
            median,
            low: v[0],
            high: v[v.len() - 1],
        }
    }

    fn show(&self, decimals: usize) -> String {
        format!(
            "{:.d$} [{:.d$}–{:.d$}]",
            self.median,
            self.low,
            self.high,
            d = decimals
        )
    }
}

/// The round whose rate is the median.
fn median(samples: &[Sample]) -> Sample {
    let mut v = samples.to_vec();
    v.sort_by(|a, b| a.rate().total_cmp(&b.rate()));
    v[v.len() / 2].clone()
}

/// One measurement: a tool, a workload and a phase.
#[derive(Clone, Copy)]
struct Case {
    tool: Tool,
    workload: Workload,
    phase: Phase,
}

fn measure(
    programs: &Programs,
    net: &Pair,
    case: Case,
    secs: Duration,
    sink: &Sink,
    opts: &Options,
) -> Result<Sample> {
    let Case {
        tool,
        workload,
        phase,
    } = case;
    let prog_stats = opts.prog_stats;
    // The workload's rules are in place before the tool starts, as on a node.
    let _prepared = workload.prepare(net)?;
    let mut running = match tool {
        Tool::None => None,
        _ => Some(Running::start(programs, net, tool, workload)?),
    };
    let cpu_before = running.as_ref().map(Running::cpu_time).transpose()?;
    let rate = match phase {
        Phase::MaxRate => None,
        Phase::Fixed(rate) => Some(rate),
    };
    let before = sink.received();
    let busy_before = Busy::now()?;
    let started = Instant::now();
    let sent = send(&net.a.name, workload, secs, rate)?;
    let elapsed = started.elapsed();
    let busy = rate.is_some().then(Busy::now).transpose()?;
    let cpu_after = running.as_ref().map(Running::cpu_time).transpose()?;
    if prog_stats
        && matches!(
            tool,
            Tool::Counting
                | Tool::CountingFloor
                | Tool::Agent
                | Tool::Trace
                | Tool::TraceFiltered
                | Tool::TraceFilteredFloor
        )
    {
        ProgStats::print(sent)?;
    }
    // What is still queued reaches the socket.
    std::thread::sleep(Duration::from_millis(200));
    let delivered = sink.received() - before;
    let tool = match running.take() {
        None => None,
        Some(r) => Some(
            r.finish(
                cpu_after
                    .unwrap_or_default()
                    .saturating_sub(cpu_before.unwrap_or_default()),
                elapsed,
                sent,
            )?,
        ),
    };
    Ok(Sample {
        secs: elapsed.as_secs_f64(),
        sent,
        delivered,
        busy: busy.map(|b| b.since(&busy_before)),
        tool,
    })
}
