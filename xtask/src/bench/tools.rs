//! The tools measured while the sender runs (udptrace's agent and trace, tcpdump,
//! bpftrace), what each cost, and the kernel's own per-program run time.

use std::{
    io::{BufRead as _, BufReader, Read},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{mpsc, Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use udptrace_testkit::metric_value;

use udptrace_testkit::Pair;

use super::{reference, Programs, Tool, ToolCost, Workload, DEV_A, DEV_B};

/// A tool tracing while the sender runs.
pub struct Running {
    tool: Tool,
    workload: Workload,
    /// Inode of the sender's network namespace.
    sender_netns: u64,
    child: Child,
    attach: Duration,
    /// The agent's URL.
    url: Option<String>,
    output: Arc<Mutex<String>>,
}

impl Running {
    pub fn start(programs: &Programs, net: &Pair, tool: Tool, workload: Workload) -> Result<Self> {
        let exe = &programs.udptrace;
        let (mut cmd, ready) = match tool {
            Tool::None => unreachable!("no tracer runs nothing"),
            Tool::Counting | Tool::CountingFloor | Tool::Agent => {
                let mut c = Command::new(exe);
                c.args(["agent", "--listen", "127.0.0.1:0", "--netns", "all"]);
                if tool != Tool::Agent {
                    // The cost between windows: a new NAT mapping or drop reason would open
                    // one for 5 s (at most once a minute), which `agent --paths on` measures.
                    c.args(["--auto-window", "0s"]);
                }
                if tool == Tool::Agent {
                    c.args(["--paths", "on"]);
                }
                if tool == Tool::CountingFloor {
                    c.env("UDPTRACE_EMPTY_BODIES", "1");
                }
                (c, Some("udptrace: agent listening on "))
            }
            Tool::Trace | Tool::TraceFiltered | Tool::TraceFilteredFloor => {
                let mut c = Command::new(exe);
                c.args(["trace", "--netns", "all"]);
                if tool != Tool::Trace {
                    c.args(["--port", &super::UNUSED_PORT.to_string()]);
                }
                if tool == Tool::TraceFilteredFloor {
                    c.env("UDPTRACE_EMPTY_BODIES", "1");
                }
                (c, Some("udptrace: tracing"))
            }
            Tool::Tcpdump => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &net.b.name, "tcpdump", "-n", "-i", DEV_B])
                    .args(["-w", "/dev/null", "udp"]);
                (c, Some("listening on"))
            }
            Tool::Bpftrace => {
                let mut c = Command::new("bpftrace");
                c.args(["-e", &programs.bpftrace]);
                (c, Some("Attaching "))
            }
            Tool::Reference => {
                let object = programs
                    .reference
                    .as_deref()
                    .context("the reference counter's object was not built")?;
                let c = reference::command(
                    object,
                    &[(&net.a.name, DEV_A), (&net.b.name, DEV_B)],
                    workload.wire_ports(),
                )?;
                (c, Some(reference::READY))
            }
            Tool::ConntrackEvents => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &net.a.name, "conntrack", "-E"])
                    .args(["-e", "NEW,DESTROY"]);
                // It prints nothing until an event comes.
                (c, None)
            }
        };
        // trace prints every path: to /dev/null, so the terminal is not what is measured.
        let stdout = if matches!(
            tool,
            Tool::Trace | Tool::TraceFiltered | Tool::TraceFilteredFloor
        ) {
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
                    if let Some(at) = ready.and_then(|r| Some(line.find(r)? + r.len())) {
                        let _ = tx.send(line[at..].trim().to_string());
                    }
                    let mut o = output.lock().unwrap();
                    o.push_str(&line);
                    o.push('\n');
                }
            });
        }
        let mut running = Self {
            tool,
            workload,
            sender_netns: net.a.inode(),
            child,
            attach: Duration::ZERO,
            url: None,
            output,
        };
        if ready.is_none() {
            // Nothing to wait for: give it time to subscribe, and check it still runs.
            std::thread::sleep(Duration::from_millis(300));
            running.attach = started.elapsed();
            if let Some(status) = running.child.try_wait()? {
                bail!(
                    "{} exited with {status}:\n{}",
                    tool.name(),
                    running.output.lock().unwrap()
                );
            }
            return Ok(running);
        }
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(rest) => {
                running.attach = started.elapsed();
                if matches!(tool, Tool::Counting | Tool::CountingFloor | Tool::Agent) {
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

    /// CPU time so far, every thread's: the scheduler's run time (`se.sum_exec_runtime` in
    /// /proc/PID/task/TID/sched, nanosecond-precise where stat's ticks are 10 ms). A thread
    /// that ends between two reads takes its time with it; the agent's threads live as
    /// long as it does.
    pub fn cpu_time(&self) -> Result<Duration> {
        let tasks = PathBuf::from(format!("/proc/{}/task", self.child.id()));
        let mut ns = 0u64;
        for task in std::fs::read_dir(&tasks).with_context(|| tasks.display().to_string())? {
            let Ok(sched) = std::fs::read_to_string(task?.path().join("sched")) else {
                continue; // ended since it was listed
            };
            ns += sched
                .lines()
                .find_map(|l| l.strip_prefix("se.sum_exec_runtime"))
                .and_then(|v| v.trim_start_matches([' ', ':']).trim().parse::<f64>().ok())
                .map_or(0, |ms| (ms * 1e6) as u64);
        }
        Ok(Duration::from_nanos(ns))
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
    pub fn finish(mut self, cpu: Duration, wall: Duration, sent: u64) -> Result<ToolCost> {
        let cpu = cpu.as_secs_f64() / wall.as_secs_f64();
        // Empty bodies count nothing: no count to check.
        let counted = match &self.url {
            // So many flows that their list is larger than a read: the namespace's total.
            Some(url) if self.tool != Tool::CountingFloor && self.workload.many_flows() => {
                let series = format!(
                    "udptrace_datagrams_total{{netns=\"{}\"}}",
                    self.sender_netns
                );
                Some(agent_metric_count(url, &series, sent)?)
            }
            Some(url) if self.tool != Tool::CountingFloor => {
                Some(agent_count(url, self.workload.ports(), sent)?)
            }
            _ => None,
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
            status.success() || matches!(self.tool, Tool::Bpftrace | Tool::ConntrackEvents),
            "{} exited with {status}:\n{output}",
            self.tool.name()
        );
        let lost = match self.tool {
            Tool::Counting | Tool::CountingFloor | Tool::Agent => lost_metric,
            // The exit line names only the counters that are not zero.
            Tool::Trace | Tool::TraceFiltered | Tool::TraceFilteredFloor => {
                number_before(&output, " event(s) lost to a full ring buffer")
                    .or_else(|| output.contains("udptrace: stopped").then_some(0))
            }
            Tool::Tcpdump => number_before(&output, " packets dropped by kernel"),
            _ => None,
        };
        let counted = match self.tool {
            Tool::Reference => Some(
                output
                    .lines()
                    .find_map(|l| l.strip_prefix(reference::COUNTED))
                    .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
                    .with_context(|| format!("the reference's count:\n{output}"))?,
            ),
            _ => counted,
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
pub struct ProgStats(String);

/// How udptrace's program names begin (udptrace-ebpf: one prefix per hook family).
const PROGRAM_PREFIXES: &[&str] = &[
    "count_", "send_", "xmit_", "drop_", "nat_", "deliver_", "recv_", "ingress_", "sample_",
];

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl ProgStats {
    pub fn enable() -> Result<Self> {
        let before = std::fs::read_to_string(BPF_STATS).context(BPF_STATS)?;
        std::fs::write(BPF_STATS, "1").context(BPF_STATS)?;
        Ok(Self(before.trim().to_string()))
    }

    /// udptrace's programs (by name: the one udptrace running), by total run time: runs per
    /// datagram, ns per run.
    pub fn print(datagrams: u64) -> Result<()> {
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
    udptrace_testkit::http::get(url).map_err(anyhow::Error::msg)
}

fn metric(url: &str, name: &str) -> Result<u64> {
    let page = http_get(&format!("{url}/metrics"))?;
    metric_value(&page, name)
        .map(|v| v as u64)
        .with_context(|| format!("{name} in /metrics"))
}

/// The agent's count of datagrams sent in the sender's namespace (`series`), once it has
/// read the kernel's counters after the last datagram.
fn agent_metric_count(url: &str, series: &str, want: u64) -> Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let page = http_get(&format!("{url}/metrics"))?;
        let counted = metric_value(&page, series).unwrap_or(0.0) as u64;
        if counted >= want || Instant::now() > deadline {
            return Ok(counted);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The agent's packet count over the benchmark's flows, once it has read the kernel's
/// counters after the last datagram (it reads them every second).
fn agent_count(url: &str, ports: &[u16], want: u64) -> Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut counted = 0;
        for port in ports {
            let body: serde_json::Value =
                serde_json::from_str(&http_get(&format!("{url}/api/v1/flows?port={port}"))?)
                    .context("the agent's flows")?;
            counted += body["flows"]
                .as_array()
                .context("flows")?
                .iter()
                .filter_map(|f| f["packets"].as_u64())
                .sum::<u64>();
        }
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
        let line = "udptrace: stopped (Signal); 12 datagram(s) shown of 12 traced, 3471 event(s) lost to a full ring buffer, 0 kernel read error(s)";
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
