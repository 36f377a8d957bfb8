//! `udptrace trace`: load, attach, and print each datagram's path until stopped.

use std::{
    io::{self, IsTerminal as _, Write},
    time::Duration,
};

use anyhow::Context as _;
use tokio::{
    signal::unix::{signal, SignalKind},
    time::Instant,
};
use udptrace_common::{
    STAT_PENDING_FULL, STAT_READ_ERROR, STAT_RINGBUF_FULL, STAT_USER_READ_ERROR,
};

use crate::{
    args::TraceArgs,
    cli::{render, Format},
    clock::{monotonic_ns, Clock},
    events::{EventStream, Undecodable},
    filter::Filter,
    loader::Tracer,
    paths::{Assembler, Path},
};

/// Why tracing stopped.
#[derive(Debug, PartialEq, Eq)]
enum Stop {
    Count,
    Duration,
    Signal,
    ClosedOutput,
}

/// Prints the paths that pass the filter; `Some(stop)` when the count is reached or
/// stdout closed.
fn print(
    out: &mut impl Write,
    paths: &mut Vec<Path>,
    filter: &Filter,
    format: Format,
    shown: &mut u64,
    count: Option<u64>,
) -> anyhow::Result<Option<Stop>> {
    for path in paths.drain(..) {
        if !filter.matches(&path) {
            continue;
        }
        if let Err(e) = writeln!(out, "{}", render(&path, format)) {
            if e.kind() == io::ErrorKind::BrokenPipe {
                return Ok(Some(Stop::ClosedOutput));
            }
            return Err(e).context("writing to stdout");
        }
        *shown += 1;
        if count.is_some_and(|n| *shown >= n) {
            let _ = out.flush();
            return Ok(Some(Stop::Count));
        }
    }
    match out.flush() {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(Some(Stop::ClosedOutput)),
        r => r.map(|()| None).context("writing to stdout"),
    }
}

pub async fn run(args: TraceArgs) -> anyhow::Result<()> {
    let mut tracer = Tracer::load(args.netns)?;
    let ring = tracer
        .take_events()
        .context("the eBPF object has no EVENTS ring buffer")?;
    let mut stream = EventStream::new(ring).context("registering the ring buffer with tokio")?;
    let filter = Filter {
        port: args.port,
        host: args.host,
        pid: args.pid,
        comm: args.comm,
    };
    let format = if args.json {
        Format::Json
    } else {
        Format::Human {
            color: io::stdout().is_terminal(),
        }
    };
    let mut assembler = Assembler::new(Clock::new(), tracer.drop_reasons.clone());
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    // Namespaces (containers, pods) come and go: look for new ones every second.
    let mut netns_scan = tokio::time::interval(Duration::from_secs(1));
    let deadline = args
        .duration
        .map(|s| Instant::now() + Duration::from_secs(s));
    let mut sigterm = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;

    // Tests and scripts wait for this line before sending traffic.
    eprintln!(
        "udptrace: tracing; send hop via {} (Ctrl-C to stop)",
        tracer.send.chosen().unwrap_or("none")
    );

    let mut out = io::stdout().lock();
    let mut batch = Vec::new();
    let mut paths = Vec::new();
    let mut bad = Undecodable::default();
    let mut shown = 0u64;
    let stop = loop {
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = stream.next_batch(&mut batch, &mut bad) => r.context("reading the ring buffer")?,
            _ = tick.tick() => {
                // A device appeared or went: attach to it now, and look for the namespace
                // that may have come with it (a container's veth shows up in ours first).
                if tracer.follow_devices() {
                    let new = tracer.cover_new_namespaces();
                    if new > 0 {
                        tracing::info!("now covering {new} more network namespace(s)");
                    }
                }
            }
            _ = netns_scan.tick() => {
                let new = tracer.cover_new_namespaces();
                if new > 0 {
                    tracing::info!("now covering {new} more network namespace(s)");
                }
            }
            () = sleep => break Stop::Duration,
            _ = sigterm.recv() => break Stop::Signal,
            _ = sigint.recv() => break Stop::Signal,
        }
        for event in batch.drain(..) {
            assembler.push(&event, &mut paths);
        }
        assembler.tick(monotonic_ns(), &mut paths);
        match print(
            &mut out, &mut paths, &filter, format, &mut shown, args.count,
        ) {
            Ok(Some(stop)) => break stop,
            Ok(None) => {}
            Err(e) => return Err(e),
        }
    };
    // Stopped by time or signal: what is still being assembled is printed as incomplete,
    // never silently dropped.
    if matches!(stop, Stop::Duration | Stop::Signal) {
        assembler.flush(&mut paths);
        print(
            &mut out, &mut paths, &filter, format, &mut shown, args.count,
        )?;
    }

    let stats = tracer.stats();
    let stat = |i: u32| stats.get(i as usize).copied().unwrap_or(0);
    let lost = stat(STAT_RINGBUF_FULL);
    eprintln!(
        "udptrace: stopped ({stop:?}); {shown} datagram(s) shown, {lost} event(s) lost to a full \
         ring buffer, {} kernel read error(s), {} unreadable send destination(s), {} pending-send \
         table overflow(s), {} undecodable record(s)",
        stat(STAT_READ_ERROR),
        stat(STAT_USER_READ_ERROR),
        stat(STAT_PENDING_FULL),
        bad.0
    );
    Ok(())
}
