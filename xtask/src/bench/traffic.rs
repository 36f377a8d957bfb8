//! The benchmark's traffic: one sender at full speed in namespace a, one receiver counting
//! in namespace b, each on a CPU of its own.

use std::{
    net::UdpSocket,
    os::fd::AsRawFd as _,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc, Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use udptrace_testkit::enter;

use super::{Workload, PAYLOAD, PORT};

/// The sender and the receiver each keep a CPU of their own (where there are two): left to
/// the scheduler they sometimes share one, and the no-tracer rate alone moved by half between
/// runs. The veth delivers in the sender's softirq, so the sender's CPU does nearly all the
/// kernel work a datagram costs, with or without a tracer.
const SENDER_CPU: usize = 0;
const RECEIVER_CPU: usize = 1;

/// Keeps the calling thread on `cpu` (modulo the CPUs there are).
pub fn pin_to_cpu(cpu: usize) -> Result<()> {
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
pub struct Sink {
    received: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Result<()>>,
}

impl Sink {
    pub fn start(netns: &str) -> Result<Self> {
        let netns = netns.to_string();
        let received = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = {
            let (received, stop) = (received.clone(), stop.clone());
            std::thread::spawn(move || -> Result<()> {
                enter(&netns).with_context(|| format!("entering netns {netns}"))?;
                pin_to_cpu(RECEIVER_CPU)?;
                // Dual-stack: IPv4 datagrams arrive v4-mapped, IPv6 ones as they are.
                let socket = UdpSocket::bind(("::", PORT)).context("binding the receiver")?;
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

    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    pub fn stop(self) -> Result<()> {
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

/// Sends from namespace a for `secs` what the workload sends (docs/performance.md): as fast
/// as one thread can, or at `rate` datagrams per second (a burst each millisecond, sleeping
/// in between, so that the CPU time a datagram costs can be read off the CPUs' idle time).
/// Returns datagrams sent.
pub fn send(netns: &str, workload: Workload, secs: Duration, rate: Option<u64>) -> Result<u64> {
    let netns = netns.to_string();
    std::thread::spawn(move || -> Result<u64> {
        enter(&netns).with_context(|| format!("entering netns {netns}"))?;
        pin_to_cpu(SENDER_CPU)?;
        let mut sockets = workload.sockets().context("opening the senders' sockets")?;
        let payload = [0x5au8; PAYLOAD];
        let started = Instant::now();
        let deadline = started + secs;
        let mut sent = 0u64;
        let mut tries = 0u64;
        while Instant::now() < deadline {
            // How many datagrams are due by now (all of a burst at full speed).
            let due = match rate {
                None => tries + 256,
                Some(rate) => {
                    let now = started.elapsed();
                    let due = (now.as_micros() as u64 * rate) / 1_000_000;
                    if due <= tries {
                        let tick = Duration::from_millis(now.as_millis() as u64 + 1);
                        std::thread::sleep(tick.saturating_sub(started.elapsed()));
                        continue;
                    }
                    due
                }
            };
            while tries < due {
                tries += 1;
                // A full queue (ENOBUFS) or an ICMP error is a datagram not sent.
                if sockets.send(&payload) {
                    sent += 1;
                }
            }
        }
        Ok(sent)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the sender panicked"))?
}

/// The machine's CPU time spent other than idle, read before and after a measurement.
pub struct Busy {
    at: Instant,
    idle: Duration,
    cpus: u32,
}

impl Busy {
    /// Idle time of every CPU: cpuidle's per-state residency (microseconds), else the idle
    /// and iowait columns of /proc/stat (which NO_HZ kernels measure exactly but print in
    /// hundredths of a second).
    pub fn now() -> Result<Self> {
        let mut idle = Duration::ZERO;
        let mut cpus = 0;
        for cpu in 0.. {
            let dir = format!("/sys/devices/system/cpu/cpu{cpu}");
            if !std::path::Path::new(&dir).exists() {
                break;
            }
            let Some(us) = cpuidle_us(&dir) else {
                return Self::from_proc_stat();
            };
            idle += Duration::from_micros(us);
            cpus += 1;
        }
        ensure!(cpus > 0, "no CPU under /sys/devices/system/cpu");
        Ok(Self {
            at: Instant::now(),
            idle,
            cpus,
        })
    }

    fn from_proc_stat() -> Result<Self> {
        let stat = std::fs::read_to_string("/proc/stat").context("/proc/stat")?;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        let (mut idle, mut cpus) = (0u64, 0);
        for line in stat
            .lines()
            .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        {
            let f: Vec<u64> = line
                .split_whitespace()
                .skip(1)
                .map(|v| v.parse().unwrap_or(0))
                .collect();
            ensure!(f.len() >= 5, "/proc/stat: short line {line:?}");
            idle += f[3] + f[4];
            cpus += 1;
        }
        Ok(Self {
            at: Instant::now(),
            idle: Duration::from_micros(idle * 1_000_000 / hz),
            cpus,
        })
    }

    /// CPU time the machine spent busy since `before`, all CPUs together.
    pub fn since(&self, before: &Self) -> Duration {
        ((self.at - before.at) * self.cpus.min(before.cpus))
            .saturating_sub(self.idle.saturating_sub(before.idle))
    }
}

/// Microseconds a CPU spent in its idle states, if cpuidle reports them.
fn cpuidle_us(cpu_dir: &str) -> Option<u64> {
    let states = std::fs::read_dir(format!("{cpu_dir}/cpuidle")).ok()?;
    let mut us = 0;
    let mut any = false;
    for state in states.flatten() {
        if state.file_name().to_string_lossy().starts_with("state") {
            us += std::fs::read_to_string(state.path().join("time"))
                .ok()?
                .trim()
                .parse::<u64>()
                .ok()?;
            any = true;
        }
    }
    any.then_some(us)
}
