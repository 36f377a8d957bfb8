//! The terminal sink: one readable line per datagram, or JSON lines (docs/json.md).

use std::{net::SocketAddr, time::SystemTime};

use crate::paths::{Hop, HopKind, Path, Verdict};

/// How `trace` prints paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Human,
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

fn hop_line(h: &Hop) -> String {
    let who = h
        .process
        .as_ref()
        .map(|p| format!(" {}[{}]", p.comm, p.pid))
        .unwrap_or_default();
    let dev = h
        .ifname
        .as_ref()
        .map(|d| format!(" {d}"))
        .unwrap_or_default();
    let kind = match h.kind {
        HopKind::Send => "send",
        HopKind::Nat => "NAT",
        HopKind::Xmit => "xmit",
        HopKind::Drop => "DROP",
        HopKind::Deliver => "deliver",
    };
    if let Some(nat) = &h.nat {
        return format!(
            "{} {} at {}: {} → {} became {} → {}  netns {}",
            kind,
            nat.nat.to_uppercase(),
            nat.nf_hook,
            addr(nat.before.src),
            addr(nat.before.dst),
            addr(nat.after.src),
            addr(nat.after.dst),
            h.netns
        );
    }
    let outcome = match (&h.error, h.errno, &h.reason) {
        (Some(e), Some(n), _) => format!("failed: {e} (errno {n})"),
        (_, _, Some(reason)) => reason.to_string(),
        _ => format!("{} B", h.len),
    };
    format!(
        "{kind}{dev}{who} {} → {} {outcome}  netns {}  via {}",
        addr(h.addrs.src),
        addr(h.addrs.dst),
        h.netns,
        h.hook
    )
}

/// One line for a path.
pub fn render(path: &Path, format: Format) -> String {
    match format {
        Format::Json => serde_json::to_string(path).expect("paths always serialize"),
        Format::Human => {
            let hops: Vec<String> = path.hops.iter().map(hop_line).collect();
            let verdict = match (path.verdict, path.complete) {
                (Verdict::Delivered, _) => "delivered",
                (Verdict::Dropped, _) => "dropped",
                (Verdict::Unknown, true) => "unknown",
                (Verdict::Unknown, false) => "incomplete",
            };
            format!("{} {verdict}: {}", clock_time(path.ts), hops.join(" ⇒ "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paths::tests::sample_path;

    #[test]
    fn human_line_reads_like_a_sentence() {
        assert_eq!(
            render(&sample_path(), Format::Human),
            "08:00:00.000000 unknown: send nc[100] 127.0.0.1:40112 → 127.0.0.1:5353 3 B  netns \
             4026531840  via tracepoint:sock:sock_send_length"
        );
    }

    #[test]
    fn human_line_shows_failures() {
        let mut path = sample_path();
        path.hops[0].errno = Some(1);
        path.hops[0].error = Some("Operation not permitted".into());
        path.hops[0].addrs.dst = None;
        let line = render(&path, Format::Human);
        assert!(
            line.contains("→ ? failed: Operation not permitted (errno 1)"),
            "{line}"
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
