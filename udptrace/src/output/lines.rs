//! The terminal sink: for each datagram a summary line, its hops one per line with the
//! rewrites and drops highlighted, and the explanation; or JSON lines (docs/json.md).

use std::{
    fmt,
    io::{self, Write},
    net::SocketAddr,
    time::{SystemTime, UNIX_EPOCH},
};

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

/// An address, or `?` when the hop did not see it.
struct Addr(Option<SocketAddr>);

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(a) => a.fmt(f),
            None => f.write_str("?"),
        }
    }
}

/// `HH:MM:SS.micros` in UTC.
struct ClockTime(SystemTime);

impl fmt::Display for ClockTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Unix time counts no leap seconds: a day is always 86 400 of its seconds.
        let since = self.0.duration_since(UNIX_EPOCH).unwrap_or_default();
        let day = since.as_secs() % 86_400;
        write!(
            f,
            "{:02}:{:02}:{:02}.{:06}",
            day / 3600,
            day / 60 % 60,
            day % 60,
            since.subsec_micros()
        )
    }
}

/// `text` wrapped in an ANSI style when colors are on.
struct Paint<T> {
    text: T,
    style: &'static str,
    color: bool,
}

fn paint<T: fmt::Display>(text: T, style: &'static str, color: bool) -> Paint<T> {
    Paint { text, style, color }
}

impl<T: fmt::Display> fmt::Display for Paint<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.color {
            write!(f, "\x1b[{}m{}\x1b[0m", self.style, self.text)
        } else {
            self.text.fmt(f)
        }
    }
}

const BOLD_YELLOW: &str = "1;33";
const BOLD_RED: &str = "1;31";
const GREEN: &str = "32";

/// What became of the datagram at a hop: its size, its failure or drop reason, its
/// fragments.
struct Outcome<'a> {
    hop: &'a Hop,
    color: bool,
}

impl fmt::Display for Outcome<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (h, color) = (self.hop, self.color);
        match (&h.error, h.errno, &h.reason, &h.fragment) {
            (Some(e), Some(n), _, _) => {
                paint(format_args!("failed: {e} (errno {n})"), BOLD_RED, color).fmt(f)
            }
            (_, _, Some(reason), _) => paint(reason, BOLD_RED, color).fmt(f),
            (_, _, _, Some(frag)) if h.kind == HopKind::Fragment => match frag.action {
                Some(FragmentAction::Reassembled) => paint(
                    format_args!("{} B reassembled from {} fragments", h.len, frag.fragments),
                    BOLD_YELLOW,
                    color,
                )
                .fmt(f),
                _ => {
                    let mtu = Mtu(h.mtu);
                    paint(
                        format_args!(
                            "{} B split into {} fragments (ip id {}{mtu})",
                            h.len, frag.fragments, frag.ip_id
                        ),
                        BOLD_YELLOW,
                        color,
                    )
                    .fmt(f)
                }
            },
            (_, _, _, Some(frag)) if frag.offset != 0 => {
                write!(f, "fragment at byte {}, {} B", frag.offset, h.len)
            }
            (_, _, _, Some(frag)) => write!(f, "{} B in {} fragments", h.len, frag.fragments),
            _ => match h.gso {
                Some(g) => {
                    write!(
                        f,
                        "{} B as {} datagrams of {} B (GSO)",
                        h.len, g.segments, g.size
                    )?;
                    match g.read_as_one {
                        Some(true) => f.write_str(", read as one buffer (UDP_GRO)"),
                        Some(false) => f.write_str(", read one by one"),
                        None => Ok(()),
                    }
                }
                None => write!(f, "{} B", h.len),
            },
        }
    }
}

/// `, MTU n` when the MTU is known.
struct Mtu(Option<u32>);

impl fmt::Display for Mtu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(m) => write!(f, ", MTU {m}"),
            None => Ok(()),
        }
    }
}

fn write_hop(out: &mut impl Write, h: &Hop, color: bool) -> io::Result<()> {
    if let Some(nat) = &h.nat {
        let (before, after) = nat.nat.rewritten(nat.before, nat.after);
        let text = format_args!(
            "{:<8}{} at {}: {} ⇒ {}",
            "nat",
            nat.nat.name().to_uppercase(),
            nat.nf_hook.name(),
            Addr(before),
            Addr(after)
        );
        return write!(
            out,
            "  {}  netns {}  via {}",
            paint(text, BOLD_YELLOW, color),
            h.netns,
            h.hook
        );
    }
    write!(out, "  {:<8}", h.kind.name())?;
    if let Some(dev) = &h.ifname {
        write!(out, "{dev} ")?;
    }
    if let Some(p) = &h.process {
        write!(out, "{}[{}] ", p.name(), p.pid)?;
        if let Some(thread) = p.thread() {
            write!(out, "(thread {thread}[{}]) ", p.tid)?;
        }
    }
    write!(out, "{} → {}", Addr(h.addrs.src), Addr(h.addrs.dst))?;
    if let Some(t) = &h.tunnel {
        let text = format_args!(
            "  in {} vni {} {} → {}",
            t.tunnel.name().to_uppercase(),
            t.vni,
            Addr(t.outer.src),
            Addr(t.outer.dst)
        );
        write!(out, "{}", paint(text, BOLD_YELLOW, color))?;
    }
    write!(out, "  {}", Outcome { hop: h, color })?;
    write!(out, "  netns {}  via {}", h.netns, h.hook)
}

/// Writes a path to `out`, newline-terminated: one line (JSON) or a block of lines (human),
/// formatted straight into the writer (a full trace prints hundreds of thousands of lines a
/// second).
pub fn write_path(out: &mut impl Write, path: &Path, format: Format) -> io::Result<()> {
    match format {
        Format::Json => {
            serde_json::to_writer(&mut *out, path).map_err(io::Error::other)?;
        }
        Format::Human { color } => {
            let verdict = match (path.verdict, path.complete) {
                (Verdict::Delivered, _) => paint("delivered", GREEN, color),
                (Verdict::Dropped, _) => paint("dropped", BOLD_RED, color),
                (Verdict::LeftHost, _) => paint("left host", GREEN, color),
                (Verdict::Unknown, true) => paint("unknown", "", false),
                (Verdict::Unknown, false) => paint("incomplete", "", false),
            };
            write!(
                out,
                "{} {verdict} {} → {}",
                ClockTime(path.ts),
                Addr(path.orig.src),
                Addr(path.orig.dst)
            )?;
            for h in &path.hops {
                out.write_all(b"\n")?;
                write_hop(out, h, color)?;
            }
            write!(out, "\n  = {}", path.explain)?;
        }
    }
    out.write_all(b"\n")
}

/// A path as [`write_path`] writes it, without the final newline.
pub fn render(path: &Path, format: Format) -> String {
    let mut out = Vec::new();
    write_path(&mut out, path, format).expect("writing to memory");
    out.pop();
    String::from_utf8(out).expect("paths print as UTF-8")
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
