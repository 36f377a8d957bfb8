//! `udptrace trace`: load, attach, and print each datagram's path until stopped.

use std::{
    io::{self, IsTerminal as _, Write},
    time::Duration,
};

use anyhow::Context as _;

use crate::{
    cmd::args::TraceArgs,
    loader::LoadConfig,
    model::Path,
    output::lines::{write_path, Format},
    pipeline::{filter::Filter, Losses, Pipeline, Sink, Stop},
};

pub async fn run(args: TraceArgs) -> anyhow::Result<()> {
    let filter = args.filter.filter();
    let pipeline = Pipeline::start(
        &LoadConfig {
            filter: filter.kernel(),
            sampled: !args.sample.config().is_all(),
            count: false,
            ..LoadConfig::new(args.netns)
        },
        args.sample.config(),
        args.duration.map(Duration::from_secs),
    )?;
    let format = if args.json {
        Format::Json
    } else {
        Format::Human {
            color: io::stdout().is_terminal(),
        }
    };
    pipeline.warn_missing_hops();
    // Tests and scripts wait for this line before sending traffic.
    eprintln!(
        "udptrace: tracing; send hop via {}{} (Ctrl-C to stop)",
        pipeline.send_hook(),
        filter_note(&filter)
    );
    let mut sink = Lines {
        // Written a batch of paths at a time (`print` flushes after each), not a syscall
        // a line.
        out: io::BufWriter::with_capacity(1 << 16, io::stdout().lock()),
        filter,
        format,
        shown: 0,
        assembled: 0,
        count: args.count,
    };
    pipeline.run(&mut sink).await?;
    Ok(())
}

/// What the start line says of the filter: which parts the kernel applies.
fn filter_note(filter: &Filter) -> String {
    let kernel: Vec<&str> = [filter.port.map(|_| "--port"), filter.host.map(|_| "--host")]
        .into_iter()
        .flatten()
        .collect();
    let user = filter.userspace_only();
    match (kernel.is_empty(), user.is_empty()) {
        (true, true) => String::new(),
        (false, true) => format!("; {} in the kernel", kernel.join(" ")),
        (true, false) => format!(
            "; {} in userspace (every datagram is traced, then filtered)",
            user.join(" ")
        ),
        (false, false) => format!(
            "; {} in the kernel, {} in userspace",
            kernel.join(" "),
            user.join(" ")
        ),
    }
}

/// Prints the paths that pass the filter, one block (or JSON line) each.
struct Lines<W: Write> {
    out: W,
    filter: Filter,
    format: Format,
    shown: u64,
    /// Paths assembled, shown or not (the filter's userspace part, drops of datagrams the
    /// kernel part left out).
    assembled: u64,
    count: Option<u64>,
}

impl<W: Write> Lines<W> {
    /// `Some(stop)` when the count is reached or stdout closed.
    fn print(&mut self, paths: &mut Vec<Path>) -> anyhow::Result<Option<Stop>> {
        for path in paths.drain(..) {
            self.assembled += 1;
            if !self.filter.matches(&path) {
                continue;
            }
            if let Err(e) = write_path(&mut self.out, &path, self.format) {
                if e.kind() == io::ErrorKind::BrokenPipe {
                    return Ok(Some(Stop::ClosedOutput));
                }
                return Err(e).context("writing to stdout");
            }
            self.shown += 1;
            if self.count.is_some_and(|n| self.shown >= n) {
                let _ = self.out.flush();
                return Ok(Some(Stop::Count));
            }
        }
        match self.out.flush() {
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(Some(Stop::ClosedOutput)),
            r => r.map(|()| None).context("writing to stdout"),
        }
    }
}

impl<W: Write> Sink for Lines<W> {
    fn paths(&mut self, paths: &mut Vec<Path>) -> anyhow::Result<Option<Stop>> {
        self.print(paths)
    }

    /// Stopped by time or signal: what is still being assembled is printed as incomplete,
    /// never silently dropped.
    fn finish(&mut self, stop: Stop, mut rest: Vec<Path>, losses: Losses) -> anyhow::Result<()> {
        if matches!(stop, Stop::Duration | Stop::Signal) {
            self.print(&mut rest)?;
        }
        eprintln!(
            "udptrace: stopped ({stop:?}); {} datagram(s) shown of {} traced, {losses}",
            self.shown, self.assembled
        );
        Ok(())
    }
}
