//! `udptrace flows`: the flow table, live like top (redrawn every second on a terminal,
//! printed every second otherwise), or one JSON snapshot when tracing stops.

use std::{
    io::{self, IsTerminal as _, Write as _},
    net::SocketAddr,
    time::Duration,
};

use crate::{
    args::{FlowsArgs, SortBy},
    clock::{monotonic_ns, Clock},
    flows::{FlowTable, FlowView},
    pipeline::Pipeline,
};

/// Flows in the table between refreshes.
const IDLE: Duration = Duration::from_secs(300);
/// Rows shown on a terminal.
const ROWS: usize = 40;

fn addr(a: Option<SocketAddr>) -> String {
    a.map_or_else(|| "?".into(), |a| a.to_string())
}

fn sort(views: &mut [FlowView], by: SortBy) {
    use std::cmp::Reverse;
    match by {
        SortBy::Packets => views.sort_by_key(|v| Reverse(v.packets)),
        SortBy::Bytes => views.sort_by_key(|v| Reverse(v.bytes)),
        SortBy::Drops => views.sort_by_key(|v| Reverse(v.drops.values().sum::<u64>())),
    }
}

/// The table: one row per flow, NAT before→after and the receiver's view in columns.
pub fn table(views: &[FlowView], rows: usize) -> String {
    let mut out = format!(
        "{:>9} {:>11} {:>6}  {:<22} {:<22} {:<30} {:<22} {}\n",
        "DGRAMS", "BYTES", "DROPS", "SOURCE", "DESTINATION", "NAT", "RECEIVER SEES", "PROCESS"
    );
    for v in views.iter().take(rows) {
        let drops: u64 = v.drops.values().sum();
        let nat = v
            .nat
            .iter()
            .map(|n| {
                let (before, after) = if n.nat == "snat" {
                    (n.before.src, n.after.src)
                } else {
                    (n.before.dst, n.after.dst)
                };
                format!("{} {}⇒{}", n.nat.to_uppercase(), addr(before), addr(after))
            })
            .collect::<Vec<_>>()
            .join(", ");
        let sees = v.last.map(|e| addr(e.src)).unwrap_or_default();
        let process = match (&v.comm, v.pid) {
            (Some(c), Some(p)) => format!("{c}[{p}]"),
            _ => String::new(),
        };
        out.push_str(&format!(
            "{:>9} {:>11} {:>6}  {:<22} {:<22} {:<30} {:<22} {}\n",
            v.packets,
            v.bytes,
            drops,
            addr(v.orig.src),
            addr(v.orig.dst),
            if nat.is_empty() { "-".into() } else { nat },
            sees,
            process
        ));
    }
    out
}

pub async fn run(args: FlowsArgs) -> anyhow::Result<()> {
    // JSON is one snapshot: by default after a second.
    let duration = match (args.duration, args.json) {
        (Some(s), _) => Some(Duration::from_secs(s)),
        (None, true) => Some(Duration::from_secs(1)),
        (None, false) => None,
    };
    let mut pipeline = Pipeline::start(
        args.netns,
        args.flow_entries,
        args.sample.config(),
        duration,
    )?;
    let filter = args.filter.filter();
    let mut table_state = FlowTable::new(Clock::new(), IDLE, args.flow_entries as usize);
    let terminal = io::stdout().is_terminal();
    eprintln!("udptrace: tracing; counting flows (Ctrl-C to stop)");
    let mut redraw = tokio::time::interval(Duration::from_secs(1));
    redraw.tick().await;
    let mut finished = Vec::new();
    let stop = loop {
        tokio::select! {
            step = pipeline.step(&mut finished) => {
                if let Some(stop) = step? {
                    break stop;
                }
            }
            _ = redraw.tick() => {
                pipeline.refresh_flows(&mut table_state);
                if !args.json {
                    let mut views = table_state.snapshot(&filter);
                    sort(&mut views, args.sort);
                    let mut out = io::stdout().lock();
                    let screen = if terminal { "\x1b[H\x1b[2J" } else { "" };
                    let rows = if terminal { ROWS } else { usize::MAX };
                    if write!(out, "{screen}{}", table(&views, rows)).and_then(|()| out.flush()).is_err() {
                        break crate::pipeline::Stop::ClosedOutput;
                    }
                }
            }
        }
        let now = monotonic_ns();
        for path in finished.drain(..) {
            table_state.observe(&path, now);
        }
    };
    let (losses, rest) = pipeline.finish(Some(&mut table_state));
    let now = monotonic_ns();
    for path in finished.drain(..).chain(rest) {
        table_state.observe(&path, now);
    }
    if args.json {
        let mut views = table_state.snapshot(&filter);
        sort(&mut views, args.sort);
        println!("{}", serde_json::json!({ "flows": views }));
    }
    eprintln!("udptrace: stopped ({stop:?}); {losses}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, time::SystemTime};

    use super::*;
    use crate::{flows::FlowNat, paths::Endpoints};

    fn view(packets: u64, drops: u64) -> FlowView {
        let sa = |s: &str| Some(s.parse::<SocketAddr>().unwrap());
        FlowView {
            orig: Endpoints {
                src: sa("10.88.0.34:43090"),
                dst: sa("10.88.0.1:5353"),
            },
            last: Some(Endpoints {
                src: sa("10.88.0.1:43090"),
                dst: sa("10.88.0.33:5353"),
            }),
            netns: 1,
            packets,
            bytes: packets * 3,
            errors: 0,
            drops: BTreeMap::from([("NO_SOCKET".to_string(), drops)]),
            nat: vec![FlowNat {
                nat: "dnat",
                nf_hook: "prerouting",
                netns: 1,
                before: Endpoints {
                    src: sa("10.88.0.34:43090"),
                    dst: sa("10.88.0.1:5353"),
                },
                after: Endpoints {
                    src: sa("10.88.0.34:43090"),
                    dst: sa("10.88.0.33:5353"),
                },
            }],
            first_seen: SystemTime::UNIX_EPOCH,
            last_seen: SystemTime::UNIX_EPOCH,
            pid: Some(7),
            comm: Some("nc".into()),
            stale_dnat: false,
            explain: String::new(),
        }
    }

    #[test]
    fn the_table_shows_nat_and_what_the_receiver_sees_sorted_as_asked() {
        let mut views = vec![view(1, 9), view(5, 0)];
        sort(&mut views, SortBy::Packets);
        assert_eq!(views[0].packets, 5);
        sort(&mut views, SortBy::Drops);
        assert_eq!(views[0].packets, 1);
        let text = table(&views, 1);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "header and one row: {text}");
        assert!(lines[0].contains("RECEIVER SEES"));
        assert!(
            lines[1].contains("DNAT 10.88.0.1:5353⇒10.88.0.33:5353"),
            "{text}"
        );
        assert!(lines[1].contains("10.88.0.1:43090"), "{text}");
        assert!(lines[1].contains("nc[7]"), "{text}");
    }
}
