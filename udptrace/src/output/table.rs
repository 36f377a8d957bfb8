//! The flow table of `udptrace flows`: one row per flow, NAT before→after and the
//! receiver's view in columns.

use std::net::SocketAddr;

use crate::model::FlowView;

/// How `flows` orders its table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SortBy {
    #[default]
    Packets,
    Bytes,
    Drops,
}

fn addr(a: Option<SocketAddr>) -> String {
    a.map_or_else(|| "?".into(), |a| a.to_string())
}

/// Orders `views` for the table.
pub fn sort(views: &mut [FlowView], by: SortBy) {
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
                let (before, after) = n.nat.rewritten(n.before, n.after);
                format!(
                    "{} {}⇒{}",
                    n.nat.name().to_uppercase(),
                    addr(before),
                    addr(after)
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        let sees = v.last.map(|e| addr(e.src)).unwrap_or_default();
        let process = match (v.process_name.as_ref().or(v.comm.as_ref()), v.pid) {
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

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, time::SystemTime};

    use super::*;
    use crate::model::{Endpoints, FlowNat, NatKind, NfHook};

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
            sends: packets,
            errors: 0,
            drops: BTreeMap::from([("NO_SOCKET".to_string(), drops)]),
            nat: vec![FlowNat {
                nat: NatKind::Dnat,
                nf_hook: NfHook::Prerouting,
                netns: 1,
                before: Endpoints {
                    src: sa("10.88.0.34:43090"),
                    dst: sa("10.88.0.1:5353"),
                },
                after: Endpoints {
                    src: sa("10.88.0.34:43090"),
                    dst: sa("10.88.0.33:5353"),
                },
                conntrack: false,
            }],
            first_seen: SystemTime::UNIX_EPOCH,
            last_seen: SystemTime::UNIX_EPOCH,
            pid: Some(7),
            comm: Some("nc".into()),
            process_name: None,
            stale_dnat: false,
            explain: String::new(),
            k8s: None,
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
