//! The stages every mode shares: load and attach, read the ring buffer, assemble paths,
//! follow devices and namespaces as they come and go, until a signal or a deadline.
//! `trace`, `flows` and `agent` consume its paths.

use std::{
    collections::{BTreeMap, HashSet},
    time::Duration,
};

use anyhow::Context as _;
use tokio::{
    signal::unix::{signal, Signal, SignalKind},
    time::{Instant, Interval},
};
use udptrace_common::{
    FlowKey, FlowStats, SampleConfig, NF_INET_NUMHOOKS, STAT_FLOW_FULL, STAT_FLOW_NEW,
    STAT_NAT_BASE, STAT_PENDING_FULL, STAT_READ_ERROR, STAT_RINGBUF_FULL, STAT_USER_READ_ERROR,
};

use crate::{
    clock::{monotonic_ns, Clock},
    events::{Event, EventStream, Undecodable},
    flows::FlowTable,
    loader::{FlowReader, NetnsScope, Tracer},
    paths::{nf_hook_name, Assembler, Path},
};

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

/// Loaded programs, the event stream and the assembler, driven by [`Pipeline::step`].
pub struct Pipeline {
    pub tracer: Tracer,
    /// The kernel's flow table, read for `refresh_flows`.
    flows: FlowReader,
    stream: EventStream,
    assembler: Assembler,
    batch: Vec<Event>,
    bad: Undecodable,
    tick: Interval,
    netns_scan: Interval,
    deadline: Option<Instant>,
    sigterm: Signal,
    sigint: Signal,
    /// Only hops in these namespaces are kept (an agent answering for one emulated node).
    only: Option<HashSet<u32>>,
}

impl Pipeline {
    /// Loads and attaches everything; stops by itself after `duration` if given.
    pub fn start(
        scope: NetnsScope,
        flow_entries: u32,
        sampling: SampleConfig,
        duration: Option<Duration>,
    ) -> anyhow::Result<Self> {
        let mut tracer = Tracer::load_with(scope, flow_entries)?;
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
            .take_events()
            .context("the eBPF object has no EVENTS ring buffer")?;
        let stream = EventStream::new(ring).context("registering the ring buffer with tokio")?;
        let assembler = Assembler::new(Clock::new(), tracer.drop_reasons.clone());
        let flows = tracer
            .flow_reader()
            .context("the eBPF object has no FLOWS or STATS map")?;
        Ok(Self {
            tracer,
            flows,
            stream,
            assembler,
            batch: Vec::with_capacity(crate::events::BATCH),
            bad: Undecodable::default(),
            tick: tokio::time::interval(Duration::from_millis(50)),
            // Namespaces (containers, pods) come and go: look for new ones every second.
            netns_scan: tokio::time::interval(Duration::from_secs(1)),
            deadline: duration.map(|d| Instant::now() + d),
            sigterm: signal(SignalKind::terminate()).context("installing a SIGTERM handler")?,
            sigint: signal(SignalKind::interrupt()).context("installing a SIGINT handler")?,
            only: None,
        })
    }

    /// From now on, only hops (and flows) in these network namespaces (by inode) count.
    pub fn keep_only(&mut self, netns: HashSet<u32>) {
        self.only = Some(netns);
    }

    fn kept(&self, netns: u32) -> bool {
        self.only.as_ref().is_none_or(|only| only.contains(&netns))
    }

    /// Waits for events or the next tick and appends the paths that finished to `out`.
    /// `Some` when a signal came or the deadline passed.
    pub async fn step(&mut self, out: &mut Vec<Path>) -> anyhow::Result<Option<Stop>> {
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
            _ = self.tick.tick() => {
                // A device appeared or went: attach to it now, and look for the namespace
                // that may have come with it (a container's veth shows up in ours first).
                if self.tracer.follow_devices() {
                    self.cover_new_namespaces();
                }
            }
            _ = self.netns_scan.tick() => self.cover_new_namespaces(),
            () = sleep => return Ok(Some(Stop::Duration)),
            _ = self.sigterm.recv() => return Ok(Some(Stop::Signal)),
            _ = self.sigint.recv() => return Ok(Some(Stop::Signal)),
        }
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
        self.assembler.tick(monotonic_ns(), out);
        Ok(None)
    }

    /// Brings `table` up to date with the kernel's flow counters, expires idle flows (here
    /// and in the kernel) and returns the loss counters.
    pub fn refresh_flows(&mut self, table: &mut FlowTable) -> Losses {
        let counts = self.flows.read();
        self.apply_flow_counts(table, counts)
    }

    /// Like [`Pipeline::refresh_flows`] with counts already read by a [`FlowReader`] (on
    /// another thread, say).
    pub fn apply_flow_counts(
        &mut self,
        table: &mut FlowTable,
        (created, mut kernel): (u64, Vec<(FlowKey, FlowStats)>),
    ) -> Losses {
        kernel.retain(|(key, _)| self.kept(key.netns));
        table.update_counts(&kernel, created, monotonic_ns());
        tracing::debug!(
            "flows: {} in the kernel's table, {created} created there, {} here",
            kernel.len(),
            table.len()
        );
        let expired = table.expire(monotonic_ns());
        self.tracer.remove_flows(&expired);
        self.losses()
    }

    fn cover_new_namespaces(&mut self) {
        let new = self.tracer.cover_new_namespaces();
        if new > 0 {
            tracing::info!("now covering {new} more network namespace(s)");
        }
    }

    /// Stops: reads the kernel's flow counters into `table` a last time, detaches
    /// everything at once (nothing of ours stays in the kernel while the rest winds down),
    /// then ends every path being assembled (incomplete if it has no verdict).
    pub fn finish(mut self, table: Option<&mut FlowTable>) -> (Losses, Vec<Path>) {
        if let Some(table) = table {
            self.refresh_flows(table);
        }
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
                        out.insert((nf_hook_name(hook), kind), n);
                    }
                    _ => {}
                }
            }
        }
        out
    }

    /// What the kernel side lost or could not read, and records that did not decode.
    pub fn losses(&self) -> Losses {
        let stats = self.tracer.stats();
        let stat = |i: u32| stats.get(i as usize).copied().unwrap_or(0);
        Losses {
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
}

impl std::fmt::Display for Losses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} event(s) lost to a full ring buffer, {} kernel read error(s), {} unreadable send \
             destination(s), {} pending-send table overflow(s), {} flow(s) not counted (flow \
             table full), {} undecodable record(s)",
            self.ring_full,
            self.read_errors,
            self.user_read_errors,
            self.pending_full,
            self.flow_full,
            self.undecodable
        )
    }
}
