//! `udptrace trace`: load, attach, and print each datagram's path until stopped.

use std::{
    io::{self, IsTerminal as _, Write},
    time::Duration,
};

use anyhow::Context as _;
use udptrace_common::FLOWS_DEFAULT;

use crate::{
    args::TraceArgs,
    cli::{render, Format},
    filter::Filter,
    paths::Path,
    pipeline::{Pipeline, Stop},
};

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
    let mut pipeline = Pipeline::start(
        args.netns,
        FLOWS_DEFAULT,
        args.sample.config(),
        args.duration.map(Duration::from_secs),
    )?;
    let filter = args.filter.filter();
    let format = if args.json {
        Format::Json
    } else {
        Format::Human {
            color: io::stdout().is_terminal(),
        }
    };
    pipeline.tracer.warn_missing_hops();
    // Tests and scripts wait for this line before sending traffic.
    eprintln!(
        "udptrace: tracing; send hop via {} (Ctrl-C to stop)",
        pipeline.tracer.send.chosen().unwrap_or("none")
    );

    let mut out = io::stdout().lock();
    let mut paths = Vec::new();
    let mut shown = 0u64;
    let stop = loop {
        if let Some(stop) = pipeline.step(&mut paths).await? {
            break stop;
        }
        if let Some(stop) = print(
            &mut out, &mut paths, &filter, format, &mut shown, args.count,
        )? {
            break stop;
        }
    };
    // Detached; stopped by time or signal: what is still being assembled is printed as
    // incomplete, never silently dropped.
    let (losses, mut rest) = pipeline.finish(None);
    if matches!(stop, Stop::Duration | Stop::Signal) {
        print(&mut out, &mut rest, &filter, format, &mut shown, args.count)?;
    }
    eprintln!("udptrace: stopped ({stop:?}); {shown} datagram(s) shown, {losses}");
    Ok(())
}
