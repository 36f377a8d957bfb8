//! The terminal sink: for each datagram a summary line, its hops one per line with the
//! rewrites and drops highlighted, and the explanation; or JSON lines (docs/json.md).

use std::{net::SocketAddr, time::SystemTime};

use crate::model::{FragmentAction, Hop, HopKind, Path, Verdict};

/// How `trace` prints paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The readable view; `color` adds ANSI highlights (stdout is a terminal).
    Human {
        color: bool,
    },
    Json,
}

fn addr(a: Option<SocketAddr>) -> String {
    a.map_or_else(|| "?".into(), |a| a.to_string())
}

/// `HH:MM:SS.micros` in UTC.
fn clock_time(t: SystemTime) -> String {
    let s = humantime::format_rfc3339_micros(t).to_string();
    // 2026-11-26T12:33:01.123456Z
    s.get(11..26).unwrap_or(&s).to_string()
}

/// Wraps `text` in an ANSI style when colors are on.
fn paint(text: String, style: &str, color: bool) -> String {
    if color {
        format!("\x1b[{style}m{text}\x1b[0m")
    } else {
        text
    }
}

const BOLD_YELLOW: &str = "1;33";
const BOLD_RED: &str = "1;31";
const GREEN: &str = "32";

fn hop_line(h: &Hop, color: bool) -> String {
    let netns = format!("netns {}", h.netns);
    if let Some(nat) = &h.nat {
        let (before, after) = nat.nat.rewritten(nat.before, nat.after);
        let text = format!(
            "{:<8}{} at {}: {} ⇒ {}",
            "nat",
            nat.nat.name().to_uppercase(),
            nat.nf_hook.name(),
            addr(before),
            addr(after)
        );
        return format!(
            "  {}  {netns}  via {}",
            paint(text, BOLD_YELLOW, color),
            h.hook
        );
    }
    let kind = h.kind.name();
    let who = h
        .process
        .as_ref()
        .map(|p| format!("{}[{}] ", p.comm, p.pid))
        .unwrap_or_default();
    let dev = h
        .ifname
        .as_ref()
        .map(|d| format!("{d} "))
        .unwrap_or_default();
    let flow = format!(
        "{kind:<8}{dev}{who}{} → {}",
        addr(h.addrs.src),
        addr(h.addrs.dst)
    );
    let outcome = match (&h.error, h.errno, &h.reason, &h.fragment) {
        (Some(e), Some(n), _, _) => paint(format!("failed: {e} (errno {n})"), BOLD_RED, color),
        (_, _, Some(reason), _) => paint(reason.clone(), BOLD_RED, color),
        (_, _, _, Some(f)) if h.kind == HopKind::Fragment => {
            let what = match f.action {
                Some(FragmentAction::Reassembled) => {
                    format!("{} B reassembled from {} fragments", h.len, f.fragments)
                }
                _ => format!(
                    "{} B split into {} fragments (ip id {}{})",
                    h.len,
                    f.fragments,
                    f.ip_id,
                    h.mtu.map(|m| format!(", MTU {m}")).unwrap_or_default()
                ),
            };
            paint(what, BOLD_YELLOW, color)
        }
        (_, _, _, Some(f)) if f.offset != 0 => {
            format!("fragment at byte {}, {} B", f.offset, h.len)
        }
        (_, _, _, Some(f)) => format!("{} B in {} fragments", h.len, f.fragments),
        _ => format!("{} B", h.len),
    };
    let overlay = h
        .tunnel
        .as_ref()
        .map(|t| {
            let text = format!(
                "  in {} vni {} {} → {}",
                t.tunnel.name().to_uppercase(),
                t.vni,
                addr(t.outer.src),
                addr(t.outer.dst)
            );
            paint(text, BOLD_YELLOW, color)
        })
        .unwrap_or_default();
    format!("  {flow}{overlay}  {outcome}  {netns}  via {}", h.hook)
}

/// A path: one line (JSON) or a block of lines (human).
pub fn render(path: &Path, format: Format) -> String {
    match format {
        Format::Json => serde_json::to_string(path).expect("paths always serialize"),
        Format::Human { color } => {
            let verdict = match (path.verdict, path.complete) {
                (Verdict::Delivered, _) => paint("delivered".into(), GREEN, color),
                (Verdict::Dropped, _) => paint("dropped".into(), BOLD_RED, color),
                (Verdict::LeftHost, _) => paint("left host".into(), GREEN, color),
                (Verdict::Unknown, true) => "unknown".into(),
                (Verdict::Unknown, false) => "incomplete".into(),
            };
            let mut lines = vec![format!(
                "{} {verdict} {} → {}",
                clock_time(path.ts),
                addr(path.orig.src),
                addr(path.orig.dst)
            )];
            lines.extend(path.hops.iter().map(|h| hop_line(h, color)));
            lines.push(format!("  = {}", path.explain));
            lines.join("\n")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::hops::tests::sample_path;

    #[test]
    fn human_view_is_a_hop_list_with_the_explanation() {
        assert_eq!(
            render(&sample_path(), Format::Human { color: false }),
            "08:00:00.000000 unknown 127.0.0.1:40112 → 127.0.0.1:5353\n  \
             send    nc[100] 127.0.0.1:40112 → 127.0.0.1:5353  3 B  netns 4026531840  \
             via raw_tracepoint:sock:sock_send_length\n  = no verdict observed"
        );
    }

    #[test]
    fn failures_are_highlighted_in_color() {
        let mut path = sample_path();
        path.hops[0].errno = Some(1);
        path.hops[0].error = Some("Operation not permitted".into());
        path.hops[0].addrs.dst = None;
        let plain = render(&path, Format::Human { color: false });
        assert!(
            plain.contains("→ ?  failed: Operation not permitted (errno 1)"),
            "{plain}"
        );
        let color = render(&path, Format::Human { color: true });
        assert!(
            color.contains("\x1b[1;31mfailed: Operation not permitted (errno 1)\x1b[0m"),
            "{color}"
        );
    }

    #[test]
    fn json_is_one_line() {
        let line = render(&sample_path(), Format::Json);
        assert!(!line.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["type"], "path");
    }
}
