//! The stages in data-flow order, and the one loop that drives them for every command:
//!
//! `ring` (ring buffer records) → `events` (typed, length-checked) → `hops` (the contract's
//! hops) → `assemble` (one path per datagram; `procs` names receivers, `explain` writes
//! the sentence) → `flows` (per-flow counts, from the kernel's table and the paths) → a
//! [`Sink`] (`trace`'s lines, `flows`' table, the agent's API). `filter` selects paths and
//! flows; `stitch` joins several nodes' parts of one datagram.
//!
//! [`Pipeline::run`] owns what every command shares: signals, the deadline, the ticks that
//! follow devices and namespaces, the kernel's flow counters read on a thread of their
//! own, and the final drain after everything is detached.

pub mod assemble;
pub mod conntrack;
pub mod events;
pub mod explain;
pub mod filter;
pub mod flows;
pub mod hops;
pub mod procs;
pub mod ring;
pub mod stitch;
pub mod windows;

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use anyhow::Context as _;
use aya_log::EbpfLogger;
use tokio::{
    io::unix::{AsyncFd, AsyncFdReadyMutGuard},
    signal::unix::{signal, Signal, SignalKind},
    time::{Instant, Interval},
};
use udptrace_common::{
    FlowKey, SampleConfig, EVENTS_BYTES, NF_INET_NUMHOOKS, STAT_FLOW_FULL, STAT_FLOW_NEW,
    STAT_NAT_BASE, STAT_PENDING_FULL, STAT_READ_ERROR, STAT_RINGBUF_FULL, STAT_USER_READ_ERROR,
};

use crate::{
    clock::{monotonic_ns, Clock},
    loader::{
        FlowReader, HopReport, KernelCounts, LoadConfig, Namespaces, NetnsScope, Sampler, Tracer,
    },
    model::{NfHook, Path},
};
use assemble::Assembler;
use conntrack::{Conntrack, CtEvent, CtStats};
use events::Event;
use flows::FlowTable;
use ring::{EventStream, Undecodable};
use windows::{Action, Windows};

/// The kernel's flow and drop tables as read at one moment.
pub type FlowCounts = KernelCounts;

/// What a command does with what the pipeline produces. [`Pipeline::run`] calls it; every
/// method may end the run by returning a [`Stop`].
pub trait Sink {
    /// Hand the kernel's flow counters to [`Sink::counts`] every second.
    const COUNTS: bool = false;
    /// Read them once more when stopping, before detaching (a table of 100k flows takes
    /// most of a second: the agent, which goes on serving, does without).
    const LAST_COUNTS: bool = false;
    /// Hand it what conntrack tells of rewritten connections ([`Sink::conntrack`]) when
    /// no per-datagram NAT hook is attached (counting only).
    const CONNTRACK: bool = false;

    /// Paths that finished; the sink takes them (`paths` is empty afterwards).
    fn paths(&mut self, paths: &mut Vec<Path>) -> anyhow::Result<Option<Stop>>;

    /// The kernel's flow counters (when [`Sink::COUNTS`]); apply them with
    /// [`Pipeline::apply_flow_counts`].
    fn counts(
        &mut self,
        _pipeline: &mut Pipeline,
        _counts: FlowCounts,
    ) -> anyhow::Result<Option<Stop>> {
        Ok(None)
    }

    /// Rewritten connections conntrack told of (when [`Sink::CONNTRACK`]).
    fn conntrack(&mut self, _events: &[CtEvent]) -> anyhow::Result<Option<Stop>> {
        Ok(None)
    }

    /// Everything is detached: the paths still being assembled (incomplete if they had no
    /// verdict), why the run stopped, and what was lost.
    fn finish(&mut self, stop: Stop, rest: Vec<Path>, losses: Losses) -> anyhow::Result<()>;
}

/// Why the pipeline stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// `--count` reached.
    Count,
    /// `--duration` elapsed.
    Duration,
    /// SIGINT or SIGTERM.
    Signal,
    /// stdout was closed.
    ClosedOutput,
}

/// Loaded programs, the event stream and the assembler, driven by [`Pipeline::run`].
pub struct Pipeline {
    tracer: Tracer,
    /// The kernel's flow table, read for `refresh_flows`.
    flows: FlowReader,
    stream: EventStream,
    assembler: Assembler,
    batch: Vec<Event>,
    bad: Undecodable,
    /// When the windows and devices are next looked at (`Pipeline::next_tick`).
    tick_at: Instant,
    /// The ring may hold records no wake-up announced: read them without waiting.
    ring_unread: bool,
    coverage: NamespaceCoverage,
    /// Namespaces covered but gone, and when that was noticed: let go of once a read of the
    /// counts begun after that is in.
    leaving: BTreeMap<u64, std::time::Instant>,
    /// The flow counts are read (the sink takes them).
    counts_read: bool,
    /// Namespaces forgotten, and when: reads begun before hold their flows still.
    forgotten: BTreeMap<u64, std::time::Instant>,
    /// Flows removed from the kernel's map, and when: reads begun before hold them still.
    removed: Vec<(std::time::Instant, HashSet<FlowKey>)>,
    netns_scan: Interval,
    deadline: Option<Instant>,
    sigterm: Signal,
    sigint: Signal,
    /// The kernel programs' logs, when loaded with them on (`--log-level debug`).
    kernel_log: Option<AsyncFd<EbpfLogger<&'static dyn log::Log>>>,
    /// Only hops in these namespaces are kept (an agent answering for one emulated node).
    only: Option<HashSet<u32>>,
    scope: NetnsScope,
    /// The per-datagram path hooks are attached.
    paths: bool,
    /// conntrack's readers, when a sink wants NAT from them.
    conntrack: Option<Conntrack>,
    /// What they told since the sink last took it.
    ct_events: Vec<CtEvent>,
    /// Path windows, in a counting run that attaches the path hooks at times.
    windows: Option<Windows>,
}

impl Pipeline {
    /// Loads and attaches everything; stops by itself after `duration` if given.
    pub fn start(
        config: &LoadConfig,
        sampling: SampleConfig,
        duration: Option<Duration>,
    ) -> anyhow::Result<Self> {
        let mut tracer = Tracer::load(config)?;
        if !sampling.is_all() {
            tracer
                .sampler()
                .context(
                    "sampling needs the drop hop (tracepoints skb:kfree_skb and \
                     skb:consume_skb), which this kernel did not attach; run without sampling \
                     (--sample-every 1) or see `udptrace doctor`",
                )?
                .set(sampling)
                .context("setting the sampling rate")?;
        }
        let ring = tracer
            .events()
            .context("the eBPF object has no EVENTS ring buffer")?;
        let stream = EventStream::new(ring).context("registering the ring buffer with tokio")?;
        let kernel_log = match tracer.take_kernel_logger() {
            // SAFETY: the logger owns its ring buffer's map fd, which stays open and
            // unchanged for as long as the AsyncFd owns the logger.
            Some(logger) => Some(
                unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) }
                    .map_err(std::io::Error::from)
                    .context("registering the kernel log ring buffer with tokio")?,
            ),
            None => None,
        };
        let assembler = Assembler::new(Clock::new(), tracer.drop_reasons().clone())
            .host_only(config.scope == NetnsScope::Host);
        let flows = tracer
            .flow_reader()
            .context("the eBPF object has no FLOWS or STATS map")?;
        Ok(Self {
            tracer,
            flows,
            stream,
            assembler,
            batch: Vec::with_capacity(ring::BATCH),
            bad: Undecodable::default(),
            tick_at: Instant::now(),
            ring_unread: false,
            coverage: NamespaceCoverage::default(),
            leaving: BTreeMap::new(),
            counts_read: false,
            forgotten: BTreeMap::new(),
            removed: Vec::new(),
            // Namespaces (containers, pods) come and go: look for new ones every second.
            netns_scan: tokio::time::interval(Duration::from_secs(1)),
            deadline: duration.map(|d| Instant::now() + d),
            sigterm: signal(SignalKind::terminate()).context("installing a SIGTERM handler")?,
            sigint: signal(SignalKind::interrupt()).context("installing a SIGINT handler")?,
            kernel_log,
            only: None,
            scope: config.scope,
            paths: config.paths,
            conntrack: None,
            ct_events: Vec::new(),
            windows: None,
        })
    }

    /// From now on, only hops (and flows) in these network namespaces (by inode) count.
    pub fn keep_only(&mut self, netns: HashSet<u32>) {
        self.only = Some(netns);
    }

    /// From now on the path hooks (loaded without) are attached in the windows `windows`
    /// asks for.
    pub fn use_windows(&mut self, windows: Windows) {
        self.windows = Some(windows);
    }

    /// When to look at the windows and devices next: every 50 ms while path hooks are
    /// attached (devices to follow, paths in flight to time out) or a window is wanted or
    /// closing; else once a second, or when the duty cycle is due — a window asked for
    /// wakes the pipeline at once ([`Windows::asked`]). An idle agent wakes 20 times a
    /// second less.
    fn next_tick(&self) -> Instant {
        let now = Instant::now();
        let fast = now + Duration::from_millis(50);
        if self.tracer.paths_attached() {
            return fast;
        }
        let slow = now + Duration::from_secs(1);
        match &self.windows {
            None => slow,
            Some(w) => match w.quiet_until(false) {
                None => fast,
                Some(None) => slow,
                Some(Some(cycle)) => slow.min(cycle.max(now)),
            },
        }
    }

    /// One step of the path windows (on every tick).
    fn drive_windows(&mut self) {
        let Some(windows) = self.windows.clone() else {
            return;
        };
        let sample = |c| {
            if let Some(mut s) = self.tracer.sampler() {
                if let Err(e) = s.set(c) {
                    tracing::warn!("path window: setting the sampling: {e}");
                }
            }
        };
        match windows.next(self.tracer.paths_attached()) {
            Action::None => {}
            Action::Open(sampling) => {
                let started = std::time::Instant::now();
                let result = self.tracer.open_paths().map_err(|e| e.to_string());
                if result.is_ok() {
                    if let Some(mut s) = self.tracer.sampler() {
                        let _ = s.set(sampling);
                    }
                    tracing::info!(
                        "path window open (hooks attached in {} ms)",
                        started.elapsed().as_millis()
                    );
                } else if let Err(e) = &result {
                    tracing::warn!("path window: could not attach the path hooks: {e}");
                }
                windows.opened(result);
            }
            Action::Resume(sampling) => sample(sampling),
            Action::Drain => sample(SampleConfig::NONE),
            Action::Close => {
                self.tracer.close_paths();
                windows.closed();
                tracing::info!("path window closed (path hooks detached)");
            }
        }
    }

    fn kept(&self, netns: u32) -> bool {
        self.only.as_ref().is_none_or(|only| only.contains(&netns))
    }

    /// How each hop is observed on this kernel (send first).
    pub fn hops(&self) -> impl Iterator<Item = &HopReport> {
        self.tracer.hops()
    }

    /// The send hop's hook in use, for the start line.
    pub fn send_hook(&self) -> &'static str {
        self.tracer.send_hook().unwrap_or("none")
    }

    /// Logs every hop that is not observed (everywhere), once at start.
    pub fn warn_missing_hops(&self) {
        self.tracer.warn_missing_hops();
    }

    /// A handle on the kernel's sampling setting (see [`Tracer::sampler`]).
    pub fn sampler(&self) -> Option<Sampler> {
        self.tracer.sampler()
    }

    /// Runs until a signal, the deadline or the sink stops it; then detaches everything
    /// and hands the sink what was still being assembled.
    pub async fn run<S: Sink>(mut self, sink: &mut S) -> anyhow::Result<Stop> {
        self.counts_read = S::COUNTS;
        let mut counts = if S::COUNTS {
            // The kernel's flow counters are read every second on a thread of their own:
            // a large table takes a while, and events and signals must not wait for it.
            let reader = self
                .tracer
                .flow_reader()
                .context("the eBPF object has no FLOWS or STATS map")?;
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            std::thread::spawn(move || loop {
                std::thread::sleep(Duration::from_secs(1));
                if tx.blocking_send(reader.read()).is_err() {
                    break;
                }
            });
            Some(rx)
        } else {
            None
        };
        if S::CONNTRACK && !self.paths {
            let mut ct = Conntrack::new();
            let n = ct.cover(&Namespaces::list(self.scope));
            tracing::info!("following NAT through conntrack in {n} network namespace(s)");
            self.conntrack = Some(ct);
        }
        let mut finished = Vec::new();
        let stop = loop {
            let counted = async {
                match counts.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            let stop = tokio::select! {
                step = self.step(&mut finished) => step?,
                Some(read) = counted => sink.counts(&mut self, read)?,
            };
            if let Some(stop) = stop {
                break stop;
            }
            if !finished.is_empty() {
                if let Some(stop) = sink.paths(&mut finished)? {
                    break stop;
                }
            }
            if !self.ct_events.is_empty() {
                let events = std::mem::take(&mut self.ct_events);
                if let Some(stop) = sink.conntrack(&events)? {
                    break stop;
                }
            }
        };
        tracing::debug!("stopping ({stop:?})");
        self.drain_ring(&mut finished);
        if S::LAST_COUNTS {
            let read = self.flows.read();
            sink.counts(&mut self, read)?;
        }
        // Paths that finished in the last step, then those still being assembled.
        let (losses, rest) = self.finish();
        let rest = finished.drain(..).chain(rest).collect();
        sink.finish(stop, rest, losses)?;
        Ok(stop)
    }

    /// Waits for events or the next tick and appends the paths that finished to `out`.
    /// `Some` when a signal came or the deadline passed.
    async fn step(&mut self, out: &mut Vec<Path>) -> anyhow::Result<Option<Stop>> {
        let sleep = async {
            match self.deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = self.stream.next_batch(&mut self.batch, &mut self.bad) => {
                r.context("reading the ring buffer")?;
            }
            () = std::future::ready(()), if self.ring_unread => {
                self.ring_unread = self.stream.read_now(&mut self.batch, &mut self.bad);
            }
            () = tokio::time::sleep_until(self.tick_at) => {
                // Hop events below the wake-up mark are waiting.
                self.ring_unread = true;
                self.drive_windows();
                // A device appeared or went: attach to it now, and look for the namespace
                // that may have come with it (a container's veth shows up in ours first).
                if self.tracer.follow_devices() {
                    self.cover_new_namespaces();
                }
                self.tick_at = self.next_tick();
            }
            () = windows_asked(&self.windows) => {
                self.drive_windows();
                self.tick_at = self.next_tick();
            }
            _ = self.netns_scan.tick() => self.cover_new_namespaces(),
            events = conntrack_events(&mut self.conntrack) => self.ct_events.extend(events),
            ready = kernel_log_ready(&mut self.kernel_log) => {
                if let Ok(mut guard) = ready {
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
            }
            () = sleep => return Ok(Some(Stop::Duration)),
            _ = self.sigterm.recv() => return Ok(Some(Stop::Signal)),
            _ = self.sigint.recv() => return Ok(Some(Stop::Signal)),
        }
        self.take_batch(out);
        self.assembler.tick(monotonic_ns(), out);
        Ok(None)
    }

    /// Reads what is left in the ring (records that woke no one included), before stopping.
    fn drain_ring(&mut self, out: &mut Vec<Path>) {
        // Bounded: the ring holds at most EVENTS_BYTES; a kernel refilling it as fast as it
        // is read does not keep the pipeline from stopping.
        let most = EVENTS_BYTES as usize / 16 / ring::BATCH + 1;
        for _ in 0..most {
            let more = self.stream.read_now(&mut self.batch, &mut self.bad);
            self.take_batch(out);
            if !more {
                break;
            }
        }
    }

    /// Hands the events read to the assembler.
    fn take_batch(&mut self, out: &mut Vec<Path>) {
        let only = self.only.take();
        for event in self.batch.drain(..) {
            let netns = match &event {
                Event::Send(ev) => Some(ev.netns),
                Event::Skb(ev) => Some(ev.netns),
                Event::Nat(ev) => Some(ev.skb.netns),
                // Readers name a socket's receiver; they carry no namespace.
                Event::Recv(_) => None,
            };
            if netns.is_some_and(|n| only.as_ref().is_some_and(|o| !o.contains(&n))) {
                continue;
            }
            self.assembler.push(&event, out);
        }
        self.only = only;
    }

    /// Brings `table` up to date with the kernel's flow counters, expires idle flows (here
    /// and in the kernel) and returns the loss counters.
    pub fn apply_flow_counts(&mut self, table: &mut FlowTable, mut kernel: FlowCounts) -> Losses {
        kernel.flows.retain(|(key, _)| self.kept(key.netns));
        kernel.drops.retain(|(key, _)| self.kept(key.netns));
        // A read begun before a namespace was forgotten may still hold its flows (the
        // reader runs on its own thread): they are the old namespace's, not news of one
        // given the same number since (it could not be: we held the old one until then).
        self.forgotten.retain(|_, at| *at > kernel.taken);
        if !self.forgotten.is_empty() {
            let stale = |netns: u32| self.forgotten.contains_key(&u64::from(netns));
            kernel.flows.retain(|(key, _)| !stale(key.netns));
            kernel.drops.retain(|(key, _)| !stale(key.netns));
        }
        // Likewise flows expired here and removed from the kernel's map after this read
        // began: seen again, they would count anew from zero.
        self.removed.retain(|(at, _)| *at > kernel.taken);
        if !self.removed.is_empty() {
            let removed: HashSet<&FlowKey> = self.removed.iter().flat_map(|(_, k)| k).collect();
            kernel.flows.retain(|(key, _)| !removed.contains(key));
        }
        let now = monotonic_ns();
        table.update_counts(&kernel.flows, kernel.created, now);
        table.update_drops(&kernel.drops, self.tracer.drop_reasons(), now);
        tracing::debug!(
            "flows: {} in the kernel's table, {} created there, {} here; {} drop key(s)",
            kernel.flows.len(),
            kernel.created,
            table.len(),
            kernel.drops.len()
        );
        // Namespaces gone before this read began: their last counts are in; forget them,
        // then let go of them.
        let gone: Vec<u64> = self
            .leaving
            .iter()
            .filter(|(_, noticed)| **noticed < kernel.taken)
            .map(|(inode, _)| *inode)
            .collect();
        if !gone.is_empty() {
            let keys = table.forget_namespaces(&gone);
            self.remove_flows(keys);
            let now = std::time::Instant::now();
            for inode in &gone {
                self.leaving.remove(inode);
                self.forgotten.insert(*inode, now);
            }
            self.release(&gone);
        }
        let expired = table.expire(monotonic_ns());
        self.remove_flows(expired);
        self.losses()
    }

    /// Removes flows from the kernel's map, remembering them for reads already under way.
    fn remove_flows(&mut self, keys: Vec<FlowKey>) {
        if keys.is_empty() {
            return;
        }
        self.tracer.remove_flows(&keys);
        self.removed
            .push((std::time::Instant::now(), keys.into_iter().collect()));
    }

    /// Covers the namespaces that appeared since the last look, and notes those covered that
    /// no file names any more (gone: no process, no bind mount). What we hold in a gone
    /// namespace keeps it, and its inode number, from being freed: it is let go of once its
    /// last counts are in and the flow table has forgotten it (`apply_flow_counts`), so that
    /// a new namespace given the same number starts from nothing; at once when nothing reads
    /// counts.
    fn cover_new_namespaces(&mut self) {
        let namespaces = Namespaces::list(self.scope);
        let added = self.tracer.follow_namespaces(&namespaces);
        if added > 0 {
            tracing::info!("now covering {added} more network namespace(s)");
        }
        if let Some(ct) = self.conntrack.as_mut() {
            let new = ct.cover(&namespaces);
            if new > 0 {
                tracing::info!("following conntrack in {new} more network namespace(s)");
            }
        }
        let covered = self.covered();
        let now = std::time::Instant::now();
        self.leaving
            .retain(|i, _| covered.contains(i) && !namespaces.contains(*i));
        for inode in covered {
            if !namespaces.contains(inode) {
                self.leaving.entry(inode).or_insert(now);
            }
        }
        if !self.counts_read && !self.leaving.is_empty() {
            let gone: Vec<u64> = std::mem::take(&mut self.leaving).into_keys().collect();
            self.release(&gone);
        }
    }

    /// Namespaces with something of ours in them.
    fn covered(&self) -> BTreeSet<u64> {
        let mut covered: BTreeSet<u64> = self.tracer.namespace_coverage().into_keys().collect();
        if let Some(ct) = &self.conntrack {
            covered.extend(ct.namespaces());
        }
        covered
    }

    /// Lets go of the namespaces `gone`: every link, attachment and socket of ours there.
    fn release(&mut self, gone: &[u64]) {
        self.tracer.release_namespaces(gone);
        if let Some(ct) = self.conntrack.as_mut() {
            ct.release(gone);
        }
        self.coverage.released += gone.len() as u64;
        tracing::info!(
            "let go of {} network namespace(s) gone: {gone:?}",
            gone.len()
        );
    }

    /// The namespaces covered now, the links held in them, and those let go of so far.
    pub fn namespace_coverage(&self) -> NamespaceCoverage {
        let links = self.tracer.namespace_coverage();
        let conntrack: BTreeSet<u64> = self
            .conntrack
            .as_ref()
            .map(|ct| ct.namespaces().collect())
            .unwrap_or_default();
        let namespaces: Vec<CoveredNamespace> = self
            .covered()
            .into_iter()
            .map(|netns| CoveredNamespace {
                netns,
                links: links.get(&netns).copied().unwrap_or(0) as u64,
                conntrack: conntrack.contains(&netns),
                gone: self.leaving.contains_key(&netns),
            })
            .collect();
        NamespaceCoverage {
            covered: namespaces.len() as u64,
            links: namespaces.iter().map(|n| n.links).sum(),
            released: self.coverage.released,
            namespaces,
        }
    }

    /// What the conntrack readers counted; `None` when conntrack is not followed.
    pub fn conntrack_stats(&self) -> Option<Arc<CtStats>> {
        self.conntrack.as_ref().map(Conntrack::stats)
    }

    /// Stops: detaches everything at once (nothing of ours stays in the kernel while the
    /// rest winds down), then ends every path being assembled (incomplete if it has no
    /// verdict).
    fn finish(self) -> (Losses, Vec<Path>) {
        let losses = self.losses();
        tracing::debug!("detaching");
        let Self {
            tracer,
            mut assembler,
            ..
        } = self;
        drop(tracer);
        tracing::debug!("detached");
        let mut paths = Vec::new();
        assembler.flush(&mut paths);
        tracing::debug!("{} open path(s) ended", paths.len());
        (losses, paths)
    }

    /// NAT rewrites the kernel counted, by (netfilter hook, `dnat`/`snat`): every one,
    /// whatever is sampled.
    pub fn nat_counts(&self) -> BTreeMap<(&'static str, &'static str), u64> {
        let stats = self.tracer.stats();
        let mut out = BTreeMap::new();
        for hook in 0..NF_INET_NUMHOOKS {
            for (dnat, kind) in [(0, "snat"), (1, "dnat")] {
                let i = (STAT_NAT_BASE + 2 * hook + dnat) as usize;
                match stats.get(i) {
                    Some(&n) if n > 0 => {
                        out.insert((NfHook::from_kernel(hook).name(), kind), n);
                    }
                    _ => {}
                }
            }
        }
        out
    }

    /// What the kernel side lost or could not read, and records that did not decode.
    fn losses(&self) -> Losses {
        let stats = self.tracer.stats();
        let stat = |i: u32| stats.get(i as usize).copied().unwrap_or(0);
        let ct = self.conntrack_stats().unwrap_or_default();
        Losses {
            conntrack_overflows: ct.overflows.load(Ordering::Relaxed),
            conntrack_undecodable: ct.undecodable.load(Ordering::Relaxed),
            conntrack_namespaces: ct.namespaces.load(Ordering::Relaxed),
            ring_full: stat(STAT_RINGBUF_FULL),
            read_errors: stat(STAT_READ_ERROR),
            user_read_errors: stat(STAT_USER_READ_ERROR),
            pending_full: stat(STAT_PENDING_FULL),
            flow_full: stat(STAT_FLOW_FULL),
            flows_created: stat(STAT_FLOW_NEW),
            undecodable: self.bad.0,
        }
    }
}

/// The next batch conntrack's readers send; never, without them.
async fn conntrack_events(ct: &mut Option<Conntrack>) -> Vec<CtEvent> {
    match ct {
        Some(ct) => ct.recv().await,
        None => std::future::pending().await,
    }
}

/// Returns when a path window is asked for; never, without windows.
async fn windows_asked(windows: &Option<Windows>) {
    match windows {
        Some(w) => w.asked().await,
        None => std::future::pending().await,
    }
}

/// Waits until the kernel log ring has records; never, without kernel logs.
async fn kernel_log_ready<'a>(
    log: &'a mut Option<AsyncFd<EbpfLogger<&'static dyn log::Log>>>,
) -> std::io::Result<AsyncFdReadyMutGuard<'a, EbpfLogger<&'static dyn log::Log>>> {
    match log {
        Some(fd) => fd.readable_mut().await,
        None => std::future::pending().await,
    }
}

/// Network namespaces followed (`--netns all`): for the metrics and the namespaces API.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NamespaceCoverage {
    /// Namespaces with something of ours attached or watching in them now.
    pub covered: u64,
    /// Per-namespace links held now (netfilter, tcx or clsact).
    pub links: u64,
    /// Namespaces let go of since the start, because they were gone.
    pub released: u64,
    /// Each namespace covered now, by inode.
    pub namespaces: Vec<CoveredNamespace>,
}

/// One namespace with something of ours in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CoveredNamespace {
    /// Its inode.
    pub netns: u64,
    /// Links held there (netfilter, tcx or clsact).
    pub links: u64,
    /// Whether its conntrack is followed (counting: NAT per flow from conntrack).
    pub conntrack: bool,
    /// Gone (no file names it any more), held until its last counts are in.
    pub gone: bool,
}

/// Counters of what was lost, for the exit line and the metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Losses {
    pub ring_full: u64,
    pub read_errors: u64,
    pub user_read_errors: u64,
    pub pending_full: u64,
    pub flow_full: u64,
    /// Flows the kernel added to its table (not a loss: with its size, gives evictions).
    pub flows_created: u64,
    pub undecodable: u64,
    /// Times a namespace's conntrack events overflowed our socket (a dump resynced it).
    pub conntrack_overflows: u64,
    pub conntrack_undecodable: u64,
    /// Namespaces whose conntrack is followed now (not a loss).
    pub conntrack_namespaces: u64,
}

/// The counters that say something was lost, with what they mean.
impl std::fmt::Display for Losses {
    /// Only those that are not zero, or "nothing lost".
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let all = [
            (self.ring_full, "event(s) lost to a full ring buffer"),
            (self.read_errors, "kernel read error(s)"),
            (self.user_read_errors, "unreadable send destination(s)"),
            (self.pending_full, "pending-send table overflow(s)"),
            (self.flow_full, "flow(s) not counted (flow table full)"),
            (self.undecodable, "undecodable record(s)"),
            (
                self.conntrack_overflows,
                "conntrack event overflow(s) (resynced)",
            ),
            (
                self.conntrack_undecodable,
                "undecodable conntrack message(s)",
            ),
        ];
        let mut any = false;
        for (n, what) in all.into_iter().filter(|(n, _)| *n > 0) {
            if any {
                f.write_str(", ")?;
            }
            write!(f, "{n} {what}")?;
            any = true;
        }
        if !any {
            f.write_str("nothing lost")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Losses;

    #[test]
    fn the_exit_line_names_only_what_was_lost() {
        assert_eq!(Losses::default().to_string(), "nothing lost");
        let losses = Losses {
            ring_full: 12,
            conntrack_overflows: 1,
            ..Losses::default()
        };
        assert_eq!(
            losses.to_string(),
            "12 event(s) lost to a full ring buffer, 1 conntrack event overflow(s) (resynced)"
        );
    }
}
