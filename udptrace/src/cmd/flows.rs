//! `udptrace flows`: the flow table, live like top (redrawn every second on a terminal,
//! printed every second otherwise), or one JSON snapshot when tracing stops.

use std::{
    io::{self, IsTerminal as _, Write as _},
    time::Duration,
};

use crate::{
    clock::{monotonic_ns, Clock},
    cmd::args::{FlowsArgs, Paths},
    loader::LoadConfig,
    model::{FlowView, Path},
    output::table::{sort, table, SortBy},
    pipeline::{
        conntrack::CtEvent, filter::Filter, flows::FlowTable, FlowCounts, Losses, Pipeline, Sink,
        Stop,
    },
};

/// Flows in the table between refreshes.
const IDLE: Duration = Duration::from_secs(300);
/// Rows shown on a terminal.
const ROWS: usize = 40;

pub async fn run(args: FlowsArgs) -> anyhow::Result<()> {
    // JSON is one snapshot: by default after a second.
    let duration = match (args.duration, args.json) {
        (Some(s), _) => Some(Duration::from_secs(s)),
        (None, true) => Some(Duration::from_secs(1)),
        (None, false) => None,
    };
    let load = LoadConfig {
        paths: match args.paths {
            Paths::On => true,
            Paths::Off => false,
            Paths::Windows => anyhow::bail!(
                "--paths windows is the agent's (`udptrace agent --paths windows`); `flows` \
                 takes on or off"
            ),
        },
        flow_entries: args.flow_entries,
        // Paths only for the flows shown (counts and drops stay every flow's).
        filter: args.filter.filter().kernel(),
        sampled: !args.sample.config().is_all(),
        ..LoadConfig::new(args.netns)
    };
    let pipeline = Pipeline::start(&load, args.sample.config(), duration)?;
    eprintln!("udptrace: tracing; counting flows (Ctrl-C to stop)");
    let mut flows = FlowTable::new(Clock::new(), IDLE, args.flow_entries as usize);
    if !load.paths {
        flows.count_nat_by_flows();
    }
    let mut sink = Table {
        flows,
        filter: args.filter.filter(),
        sort: args.sort,
        json: args.json,
        terminal: io::stdout().is_terminal(),
    };
    pipeline.run(&mut sink).await?;
    Ok(())
}

/// The flow table, redrawn when the kernel's counters come (every second).
struct Table {
    flows: FlowTable,
    filter: Filter,
    sort: SortBy,
    /// One JSON snapshot at the end instead of the live table.
    json: bool,
    terminal: bool,
}

impl Table {
    fn views(&self) -> Vec<FlowView> {
        let mut views = self.flows.snapshot(&self.filter);
        sort(&mut views, self.sort);
        views
    }
}

impl Sink for Table {
    const COUNTS: bool = true;
    /// The counts up to the very end, for the JSON snapshot.
    const LAST_COUNTS: bool = true;
    const CONNTRACK: bool = true;

    fn conntrack(&mut self, events: &[CtEvent]) -> anyhow::Result<Option<Stop>> {
        self.flows.observe_conntrack(events);
        Ok(None)
    }

    fn paths(&mut self, paths: &mut Vec<Path>) -> anyhow::Result<Option<Stop>> {
        let now = monotonic_ns();
        for path in paths.drain(..) {
            self.flows.observe(&path, now);
        }
        Ok(None)
    }

    fn counts(
        &mut self,
        pipeline: &mut Pipeline,
        counts: FlowCounts,
    ) -> anyhow::Result<Option<Stop>> {
        pipeline.apply_flow_counts(&mut self.flows, counts);
        if self.json {
            return Ok(None);
        }
        let mut out = io::stdout().lock();
        let screen = if self.terminal { "\x1b[H\x1b[2J" } else { "" };
        let rows = if self.terminal { ROWS } else { usize::MAX };
        let drawn =
            write!(out, "{screen}{}", table(&self.views(), rows)).and_then(|()| out.flush());
        Ok(drawn.is_err().then_some(Stop::ClosedOutput))
    }

    fn finish(&mut self, stop: Stop, rest: Vec<Path>, losses: Losses) -> anyhow::Result<()> {
        let now = monotonic_ns();
        for path in &rest {
            self.flows.observe(path, now);
        }
        if self.json {
            let flows = self.views();
            println!("{}", serde_json::json!({ "flows": flows }));
        }
        eprintln!("udptrace: stopped ({stop:?}); {losses}");
        Ok(())
    }
}
