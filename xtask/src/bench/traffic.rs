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

use super::{ADDR_A, ADDR_B, PAYLOAD, PORT};

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

/// Sends as fast as one thread can from namespace a for `secs`, cycling through `flows`
/// connected sockets (each its own source port: its own flow). Returns datagrams sent.
pub fn send(netns: &str, flows: usize, secs: Duration) -> Result<u64> {
    let netns = netns.to_string();
    std::thread::spawn(move || -> Result<u64> {
        enter(&netns).with_context(|| format!("entering netns {netns}"))?;
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
