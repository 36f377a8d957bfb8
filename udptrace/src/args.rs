//! Command-line interface.

use std::net::IpAddr;

use clap::{Args, Parser, Subcommand};

use crate::loader::NetnsScope;

/// Trace UDP datagrams through the kernel: every hop, every address rewrite, every drop.
#[derive(Debug, Parser)]
#[command(name = "udptrace", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the path of each UDP datagram, live.
    Trace(TraceArgs),
    /// Show which hooks this kernel allows and which one each hop uses, and why.
    Doctor,
}

#[derive(Debug, Args)]
pub struct TraceArgs {
    /// Print JSON lines (one path object per line; see docs/json.md).
    #[arg(long)]
    pub json: bool,
    /// Only datagrams with this source or destination port (before or after any rewrite).
    #[arg(long, value_name = "PORT")]
    pub port: Option<u16>,
    /// Only datagrams from or to this address.
    #[arg(long, value_name = "IP")]
    pub host: Option<IpAddr>,
    /// Only datagrams sent or received by this process id.
    #[arg(long)]
    pub pid: Option<u32>,
    /// Only datagrams sent or received by a process with this name (as in /proc/PID/comm).
    #[arg(long, value_name = "NAME")]
    pub comm: Option<String>,
    /// Stop after printing this many datagrams.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,
    /// Network namespaces to cover with per-namespace hooks (NAT): the host's, or also every
    /// namespace under /run/netns when tracing starts. Tracepoint hops see every namespace.
    #[arg(long, value_enum, default_value_t = NetnsScope::Host)]
    pub netns: NetnsScope,
    /// Stop after this many seconds.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    pub duration: Option<u64>,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn bad_values_are_refused_with_the_option_named() {
        for (args, needle) in [
            (vec!["udptrace", "trace", "--port", "70000"], "--port"),
            (vec!["udptrace", "trace", "--host", "not-an-ip"], "--host"),
            (vec!["udptrace", "trace", "--count", "0"], "--count"),
            (
                vec!["udptrace", "trace", "--duration", "soon"],
                "--duration",
            ),
        ] {
            let err = Cli::try_parse_from(&args).unwrap_err().to_string();
            assert!(err.contains(needle), "{args:?}: {err}");
        }
    }

    #[test]
    fn parses_a_full_trace_line() {
        let cli = Cli::try_parse_from([
            "udptrace",
            "trace",
            "--json",
            "--port",
            "5353",
            "--host",
            "::1",
            "--pid",
            "7",
            "--comm",
            "nc",
            "--count",
            "1",
            "--duration",
            "5",
        ])
        .unwrap();
        let Command::Trace(t) = cli.command else {
            panic!("not trace")
        };
        assert!(t.json);
        assert_eq!(t.port, Some(5353));
        assert_eq!(t.host, Some("::1".parse().unwrap()));
        assert_eq!(
            (t.pid, t.comm.as_deref(), t.count, t.duration),
            (Some(7), Some("nc"), Some(1), Some(5))
        );
    }
}
