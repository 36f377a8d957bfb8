//! Command-line interface.

use std::net::IpAddr;

use clap::{Args, Parser, Subcommand};

use crate::{loader::NetnsScope, output::table::SortBy, pipeline::filter::Filter};

/// Trace UDP datagrams through the kernel: every hop, every address rewrite, every drop.
#[derive(Debug, Parser)]
#[command(name = "udptrace", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// What to log on stderr: off, error, warn, info, debug or trace (else RUST_LOG, else
    /// warn). `debug` also turns on the kernel programs' own logs: lost events, full maps,
    /// failed reads, malformed headers, as they happen.
    #[arg(long, global = true, value_name = "LEVEL")]
    pub log_level: Option<tracing_subscriber::filter::LevelFilter>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the path of each UDP datagram, live.
    Trace(TraceArgs),
    /// Count every UDP flow, live: a refreshing table, or one JSON snapshot.
    Flows(FlowsArgs),
    /// Run as a daemon: count flows, keep recent paths, serve them over HTTP with
    /// Prometheus metrics.
    Agent(Box<AgentArgs>),
    /// Show which hooks this kernel allows and which one each hop uses, and why.
    Doctor,
    /// Ask agents on several nodes for their partial paths and join each datagram's into
    /// one end-to-end path (JSON lines).
    Path(PathArgs),
}

#[derive(Debug, Args)]
pub struct PathArgs {
    /// An agent to ask: `URL` or `NODE=URL` (e.g. `node-a=http://10.0.0.1:9720`); repeat for
    /// each node.
    #[arg(long = "agent", value_name = "[NODE=]URL", required = true)]
    pub agents: Vec<String>,
    #[command(flatten)]
    pub filter: FilterArgs,
}

/// `--port`, `--host`, `--pid`, `--comm`: which datagrams or flows to show.
#[derive(Debug, Clone, Args)]
pub struct FilterArgs {
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
}

impl FilterArgs {
    pub fn filter(&self) -> Filter {
        Filter {
            port: self.port,
            host: self.host,
            pid: self.pid,
            comm: self.comm.clone(),
        }
    }
}

/// Which datagrams are traced hop by hop. Every datagram is counted in its flow whatever
/// is sampled; drops and new NAT rewrites are always reported.
#[derive(Debug, Clone, Copy, Args)]
pub struct SampleArgs {
    /// Trace 1 datagram in N of each flow hop by hop, after the first ones (1: every one).
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub sample_every: u32,
    /// Datagrams at the start of each flow always traced when sampling.
    #[arg(long, value_name = "N", default_value_t = SAMPLE_FIRST_DEFAULT)]
    pub sample_first: u32,
}

/// Datagrams at the start of each flow traced whatever the sampling rate.
pub const SAMPLE_FIRST_DEFAULT: u32 = 10;

impl SampleArgs {
    pub fn config(&self) -> udptrace_common::SampleConfig {
        udptrace_common::SampleConfig {
            first: self.sample_first,
            every: self.sample_every,
        }
    }
}

/// Whether the per-datagram path hooks are attached beside the counting ones
/// (docs/performance.md, "two costs").
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Paths {
    /// Every hop of the datagrams the sampling picks: NAT before→after, the source the
    /// receiver sees, explanations.
    On,
    /// Counting only: every datagram sent counted per flow in one small program, every drop
    /// counted with its reason (a few reported as they happen). The cheapest mode.
    Off,
    /// Counting only, and the path hooks attached in windows: on request
    /// (`POST /api/v1/windows`), a few seconds after news (a flow's first drop with a
    /// reason, a new NAT mapping), on a duty cycle if set. The agent's only.
    Windows,
}

#[derive(Debug, Args)]
pub struct FlowsArgs {
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Print one JSON snapshot ({"flows":[...]}, as the agent's /api/v1/flows) when tracing
    /// stops (after --duration, default 1 s, or on Ctrl-C) instead of a live table.
    #[arg(long)]
    pub json: bool,
    /// Order of the table.
    #[arg(long, value_enum, default_value_t = SortBy::Packets)]
    pub sort: SortBy,
    /// Network namespaces to cover with per-namespace hooks, as for `trace`: every one
    /// unless `--netns host`.
    #[arg(long, value_enum, default_value_t = NetnsScope::All)]
    pub netns: NetnsScope,
    /// Stop after this many seconds.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    pub duration: Option<u64>,
    /// Flows the kernel keeps (least recently used evicted first).
    #[arg(long, value_name = "N", default_value_t = udptrace_common::FLOWS_DEFAULT,
          value_parser = clap::value_parser!(u32).range(16..))]
    pub flow_entries: u32,
    /// Per-datagram path hooks too (NAT, the receiver's view, explanations), or counting
    /// only.
    #[arg(long, value_enum, default_value_t = Paths::On)]
    pub paths: Paths,
    #[command(flatten)]
    pub sample: SampleArgs,
}

/// The agent's settings: each from the command line, else its environment variable, else
/// the config file (TOML, keys as the long option names with `_`), else the default.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// A TOML file with any of the settings below (e.g. `listen = "0.0.0.0:9720"`).
    #[arg(long, env = "UDPTRACE_CONFIG", value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,
    /// Address of the HTTP API and metrics [default: 127.0.0.1:9720; port 0 picks one].
    #[arg(long, env = "UDPTRACE_LISTEN", value_name = "ADDR")]
    pub listen: Option<std::net::SocketAddr>,
    /// Network namespaces to cover [default: host].
    #[arg(long, env = "UDPTRACE_NETNS", value_enum)]
    pub netns: Option<NetnsScope>,
    /// Flows the kernel keeps; the least recently used is evicted first [default: 65536].
    #[arg(long, env = "UDPTRACE_FLOW_ENTRIES", value_name = "N",
          value_parser = clap::value_parser!(u32).range(16..))]
    pub flow_entries: Option<u32>,
    /// A flow with nothing new for this many seconds is forgotten [default: 300].
    #[arg(long, env = "UDPTRACE_FLOW_IDLE", value_name = "SECS",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub flow_idle: Option<u64>,
    /// Recent paths kept for /api/v1/paths [default: 1000].
    #[arg(long, env = "UDPTRACE_PATHS_KEPT", value_name = "N")]
    pub paths_kept: Option<usize>,
    /// Also export per-flow series (labels netns, src, dst: one series per flow)
    /// [default: false].
    #[arg(long, env = "UDPTRACE_PER_FLOW_METRICS", value_name = "BOOL")]
    pub per_flow_metrics: Option<bool>,
    /// When the per-datagram path hooks (sampled paths, each hop, the receiver's view) are
    /// attached beside the counting ones: only in windows (asked for, after news, on a duty
    /// cycle), always, or never [default: windows].
    #[arg(long, env = "UDPTRACE_PATHS", value_enum)]
    pub paths: Option<Paths>,
    /// With `--paths windows`: how long a window opened by news lasts; 0s: none
    /// [default: 5s].
    #[arg(long, env = "UDPTRACE_AUTO_WINDOW", value_name = "DURATION")]
    pub auto_window: Option<humantime::Duration>,
    /// With `--paths windows`: at most one automatic window per this long [default: 60s].
    #[arg(long, env = "UDPTRACE_AUTO_WINDOW_COOLDOWN", value_name = "DURATION")]
    pub auto_window_cooldown: Option<humantime::Duration>,
    /// With `--paths windows`: also open a window every this long (a duty cycle)
    /// [default: none].
    #[arg(long, env = "UDPTRACE_WINDOW_EVERY", value_name = "DURATION")]
    pub window_every: Option<humantime::Duration>,
    /// The duty cycle's window length [default: 5s].
    #[arg(long, env = "UDPTRACE_WINDOW_FOR", value_name = "DURATION")]
    pub window_for: Option<humantime::Duration>,
    /// Trace 1 datagram in N of each flow hop by hop, after the first ones; 1 traces every
    /// one. Counts stay exact; drops and new NAT rewrites are always reported. Changeable at
    /// runtime: PUT /api/v1/sampling [default: 100].
    #[arg(long, env = "UDPTRACE_SAMPLE_EVERY", value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub sample_every: Option<u32>,
    /// Datagrams at the start of each flow always traced [default: 10].
    #[arg(long, env = "UDPTRACE_SAMPLE_FIRST", value_name = "N")]
    pub sample_first: Option<u32>,
    /// Kubernetes API server to watch pods, Services and EndpointSlices through, without
    /// credentials (`kubectl proxy`, a test server) [default: in a pod, the cluster's own;
    /// elsewhere none: no Kubernetes names].
    #[arg(long, env = "UDPTRACE_KUBE_API", value_name = "URL")]
    pub kube_api: Option<String>,
    /// This node's Kubernetes name (pods are watched on it only) [default: the host name].
    #[arg(long, env = "UDPTRACE_NODE_NAME", value_name = "NAME")]
    pub node_name: Option<String>,
    /// Where the host's cgroup v2 hierarchy is mounted: to name the pod container of a
    /// process, and where the send hop's cgroup hooks attach when it has no fentry or kprobe
    /// [default: where this process sees one].
    #[arg(long, env = crate::kernel::cgroup2::ROOT_ENV, value_name = "DIR")]
    pub cgroup_root: Option<std::path::PathBuf>,
    /// Keep only hops in these network namespaces (names in /run/netns, or paths): the
    /// agent answers for one emulated node [default: every namespace covered].
    #[arg(
        long,
        env = "UDPTRACE_ONLY_NETNS",
        value_name = "NETNS,...",
        value_delimiter = ','
    )]
    pub only_netns: Option<Vec<String>>,
    /// Other nodes' agents, for /api/v1/paths/stitched: `URL` or `NODE=URL`, comma separated.
    #[arg(
        long,
        env = "UDPTRACE_PEERS",
        value_name = "[NODE=]URL,...",
        value_delimiter = ','
    )]
    pub peers: Option<Vec<String>>,
    /// A DNS name and port whose every address is an agent (the headless Service, e.g.
    /// `udptrace.udptrace.svc:9720`), for /api/v1/paths/stitched.
    #[arg(long, env = "UDPTRACE_PEER_SERVICE", value_name = "HOST:PORT")]
    pub peer_service: Option<String>,
}

#[derive(Debug, Args)]
pub struct TraceArgs {
    /// Print JSON lines (one path object per line; see docs/json.md).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Stop after printing this many datagrams.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,
    /// Network namespaces to cover with per-namespace hooks (NAT, delivery, tc ingress):
    /// every namespace a datagram may enter (/run/netns and every process's, containers and
    /// pods, also those created while tracing), or only the host's. Tracepoint hops (send,
    /// xmit, drop) see every namespace either way.
    #[arg(long, value_enum, default_value_t = NetnsScope::All)]
    pub netns: NetnsScope,
    /// Stop after this many seconds.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    pub duration: Option<u64>,
    #[command(flatten)]
    pub sample: SampleArgs,
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
    fn sampling_traces_the_first_then_one_in_n() {
        let c = SampleArgs {
            sample_every: 10,
            sample_first: 3,
        }
        .config();
        let traced: Vec<u64> = (0..53).filter(|&n| c.traces(n)).collect();
        assert_eq!(traced, [0, 1, 2, 10, 20, 30, 40, 50]);
        let all = SampleArgs {
            sample_every: 1,
            sample_first: 0,
        }
        .config();
        assert!(all.is_all() && (0..100).all(|n| all.traces(n)));
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
        assert_eq!(t.filter.port, Some(5353));
        assert_eq!(t.filter.host, Some("::1".parse().unwrap()));
        assert_eq!(
            (t.filter.pid, t.filter.comm.as_deref(), t.count, t.duration),
            (Some(7), Some("nc"), Some(1), Some(5))
        );
    }
}
