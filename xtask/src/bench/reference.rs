//! The reference always-on counter the benchmark measures udptrace against (issue 16):
//! NetObserv's eBPF agent's design (xtask/reference-ebpf: tc ingress and egress on every
//! device, a per-CPU hash per flow) with its userspace eviction: every few seconds the
//! table is read and emptied. It runs as `xtask reference-counter`, a process of its own,
//! so that its CPU time and memory are measured like any tool's.

use std::{
    fs::File,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use aya::{
    maps::{MapData, PerCpuHashMap},
    programs::{tc::TcAttachOptions, LinkOrder, SchedClassifier, TcAttachType},
    EbpfLoader,
};

use crate::cmd::{exec, workspace};

/// The key and value of xtask/reference-ebpf's table (NetObserv's `flow_id` and the core
/// of its `flow_metrics`), as that crate lays them out.
#[repr(C)]
#[derive(Clone, Copy)]
struct FlowId {
    eth_protocol: u16,
    direction: u8,
    transport: u8,
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src_ip: [u8; 16],
    dst_ip: [u8; 16],
    src_port: u16,
    dst_port: u16,
    if_index: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct FlowMetrics {
    packets: u64,
    bytes: u64,
    start_ns: u64,
    end_ns: u64,
}

const _: () = assert!(std::mem::size_of::<FlowId>() == 56);
const _: () = assert!(std::mem::size_of::<FlowMetrics>() == 32);

// SAFETY: plain old data, every bit pattern valid, no padding (56 and 32 bytes).
unsafe impl aya::Pod for FlowId {}
// SAFETY: as above.
unsafe impl aya::Pod for FlowMetrics {}

const EGRESS: u8 = 1;
const IPPROTO_UDP: u8 = 17;

#[derive(Debug, clap::Args)]
pub struct Options {
    /// The eBPF object (xtask builds it: `reference::build`).
    #[arg(long)]
    object: PathBuf,
    /// Where to attach, `NETNS:DEVICE` (a name under /run/netns). Repeatable.
    #[arg(long = "attach", value_name = "NETNS:DEVICE", required = true)]
    attach: Vec<String>,
    /// UDP destination ports whose datagrams are reported at the end (counted where they
    /// leave: on egress). Repeatable.
    #[arg(long = "port", required = true)]
    ports: Vec<u16>,
    /// Table size (NetObserv's `CACHE_MAX_FLOWS`: 5000 by default in its agent; the bench
    /// gives udptrace's flow table size, so that both hold the same number of flows).
    #[arg(long, default_value_t = 5000)]
    entries: u32,
    /// Seconds between evictions (NetObserv's `CACHE_ACTIVE_TIMEOUT`, 5 s by default).
    #[arg(long, default_value_t = 5)]
    evict_secs: u64,
}

/// Builds the reference's eBPF object with the eBPF toolchain; returns its path.
pub fn build() -> Result<PathBuf> {
    let toolchain = crate::setup::ebpf_toolchain()?;
    exec(
        Command::new("rustup")
            .current_dir(workspace().join("xtask/reference-ebpf"))
            .args(["run", toolchain.as_str(), "cargo", "build", "--release"])
            .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"]),
    )
    .context(
        "building the reference counter's eBPF object (cargo xtask setup installs what it needs)",
    )?;
    Ok(workspace().join("target/bpfel-unknown-none/release/udptrace-reference-ebpf"))
}

/// The command line that runs the reference counter on the benchmark's two namespaces.
pub fn command(object: &Path, attach: &[(&str, &str)], ports: &[u16]) -> Result<Command> {
    let mut c = Command::new(std::env::current_exe().context("xtask's own path")?);
    c.arg("reference-counter")
        .arg("--object")
        .arg(object)
        .args(["--entries", &udptrace_common::FLOWS_DEFAULT.to_string()]);
    for port in ports {
        c.args(["--port", &port.to_string()]);
    }
    for (netns, dev) in attach {
        c.args(["--attach", &format!("{netns}:{dev}")]);
    }
    Ok(c)
}

/// What the bench waits for on the reference's output before it measures.
pub const READY: &str = "reference: counting";
/// Its last line: `reference: counted N datagram(s) ...`.
pub const COUNTED: &str = "reference: counted ";

/// `xtask reference-counter`: attach, evict on a timer until SIGINT or SIGTERM, evict a last
/// time, print what was counted, detach (dropping the programs' links).
pub fn run(opts: &Options) -> Result<()> {
    let mut ebpf = EbpfLoader::new()
        .map_max_entries("REF_FLOWS", opts.entries)
        .load_file(&opts.object)
        .with_context(|| format!("loading {}", opts.object.display()))?;
    let home = File::open("/proc/self/ns/net").context("this thread's network namespace")?;
    for (name, direction) in [
        ("reference_ingress", TcAttachType::Ingress),
        ("reference_egress", TcAttachType::Egress),
    ] {
        let prog: &mut SchedClassifier = ebpf
            .program_mut(name)
            .with_context(|| format!("program {name}"))?
            .try_into()?;
        prog.load().with_context(|| format!("loading {name}"))?;
        for spec in &opts.attach {
            let (netns, dev) = spec
                .split_once(':')
                .with_context(|| format!("--attach {spec}: NETNS:DEVICE expected"))?;
            udptrace_testkit::enter(netns).with_context(|| format!("entering netns {netns}"))?;
            let attached = prog.attach_with_options(
                dev,
                direction,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            );
            // SAFETY: setns back into the namespace this thread started in.
            let back = unsafe { libc::setns(home.as_raw_fd(), libc::CLONE_NEWNET) };
            ensure!(back == 0, "setns home: {}", std::io::Error::last_os_error());
            attached.with_context(|| format!("attaching {name} to {dev} in {netns}"))?;
        }
    }
    let mut flows: PerCpuHashMap<MapData, FlowId, FlowMetrics> =
        PerCpuHashMap::try_from(ebpf.take_map("REF_FLOWS").context("map REF_FLOWS")?)?;
    let signals = block_stop_signals()?;
    println!(
        "{READY} on {} device(s), evicting every {} s",
        opts.attach.len(),
        opts.evict_secs
    );
    let mut total = Evicted::default();
    loop {
        let stop = wait_signal(&signals, Duration::from_secs(opts.evict_secs))?;
        total.add(evict(&mut flows, &opts.ports)?);
        if stop {
            break;
        }
    }
    println!(
        "{COUNTED}{} datagram(s) to port(s) {:?} on egress ({} packet(s) in all, {} flow \
         entries evicted)",
        total.port_egress, opts.ports, total.packets, total.entries
    );
    Ok(())
}

#[derive(Default)]
struct Evicted {
    entries: u64,
    packets: u64,
    port_egress: u64,
}

impl Evicted {
    fn add(&mut self, other: Self) {
        self.entries += other.entries;
        self.packets += other.packets;
        self.port_egress += other.port_egress;
    }
}

/// Reads and deletes every entry, as NetObserv's userspace does on its timer.
fn evict(
    flows: &mut PerCpuHashMap<MapData, FlowId, FlowMetrics>,
    ports: &[u16],
) -> Result<Evicted> {
    let keys: Vec<FlowId> = flows.keys().collect::<Result<_, _>>()?;
    let mut out = Evicted::default();
    for key in keys {
        let Ok(values) = flows.get(&key, 0) else {
            continue; // gone since listed
        };
        let packets: u64 = values.iter().map(|v| v.packets).sum();
        let _ = flows.remove(&key);
        out.entries += 1;
        out.packets += packets;
        if key.direction == EGRESS && key.transport == IPPROTO_UDP && ports.contains(&key.dst_port)
        {
            out.port_egress += packets;
        }
    }
    Ok(out)
}

/// SIGINT and SIGTERM blocked, to be taken with sigtimedwait.
fn block_stop_signals() -> Result<libc::sigset_t> {
    // SAFETY: sigemptyset/sigaddset initialise the set; pthread_sigmask on this thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            bail!("pthread_sigmask: {}", std::io::Error::from_raw_os_error(rc));
        }
        Ok(set)
    }
}

/// Waits up to `timeout` for a stop signal; true if one came.
fn wait_signal(set: &libc::sigset_t, timeout: Duration) -> Result<bool> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        let ts = libc::timespec {
            tv_sec: left.as_secs() as libc::time_t,
            tv_nsec: left.subsec_nanos() as libc::c_long,
        };
        // SAFETY: a valid signal set and timespec; no siginfo wanted.
        let rc = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &ts) };
        if rc > 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN) => return Ok(false),
            Some(libc::EINTR) => continue,
            _ => bail!("sigtimedwait: {e}"),
        }
    }
}
