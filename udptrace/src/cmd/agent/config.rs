//! The agent's settings: command line and environment (clap) first, then the config file,
//! then defaults.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use serde::Deserialize;
use udptrace_common::SampleConfig;

use crate::{
    cmd::args::{AgentArgs, Paths, SAMPLE_FIRST_DEFAULT},
    k8s::ApiServer,
    loader::NetnsScope,
    pipeline::windows::Policy,
};

/// The agent's settings after command line, environment and config file are merged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub listen: SocketAddr,
    pub netns: NetnsScope,
    pub flow_entries: u32,
    pub flow_idle: Duration,
    pub paths_kept: usize,
    pub per_flow_metrics: bool,
    /// The path hooks: attached, not (counting only), or in windows.
    pub paths: Paths,
    /// When windows open by themselves (with `paths` = windows).
    pub windows: Policy,
    pub sampling: SampleConfig,
    /// Kubernetes enrichment: where the API server is.
    pub kube: Option<ApiServer>,
    /// This node's name (Kubernetes' node name; how stitched paths name this agent's part).
    pub node: String,
    /// Only these network namespaces' hops (names in /run/netns, or paths).
    pub only_netns: Vec<String>,
    /// Other agents (`[NODE=]URL`) and a DNS name whose addresses are agents, for stitching.
    pub peers: Vec<String>,
    pub peer_service: Option<String>,
    /// The host's cgroup v2 hierarchy (to find a process's pod container).
    pub cgroup_root: Option<PathBuf>,
}

/// The agent's default sampling: the first datagrams of each flow, then 1 in 100.
pub const SAMPLE_EVERY_DEFAULT: u32 = 100;

/// The config file: the same settings, all optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    listen: Option<SocketAddr>,
    netns: Option<String>,
    flow_entries: Option<u32>,
    flow_idle: Option<u64>,
    paths_kept: Option<usize>,
    per_flow_metrics: Option<bool>,
    paths: Option<Paths>,
    auto_window: Option<String>,
    auto_window_cooldown: Option<String>,
    window_every: Option<String>,
    window_for: Option<String>,
    sample_every: Option<u32>,
    sample_first: Option<u32>,
    kube_api: Option<String>,
    node_name: Option<String>,
    cgroup_root: Option<PathBuf>,
    only_netns: Option<Vec<String>>,
    peers: Option<Vec<String>>,
    peer_service: Option<String>,
}

impl Settings {
    /// Command line (and environment, which clap reads) first, then the config file.
    pub fn resolve(args: &AgentArgs) -> anyhow::Result<Self> {
        let file = match &args.config {
            Some(path) => read_config(path)?,
            None => ConfigFile::default(),
        };
        let netns = match (args.netns, file.netns.as_deref()) {
            (Some(n), _) => n,
            (None, Some("host")) | (None, None) => NetnsScope::Host,
            (None, Some("all")) => NetnsScope::All,
            (None, Some(other)) => {
                anyhow::bail!("config file: netns = {other:?}: expected \"host\" or \"all\"")
            }
        };
        let flow_entries = args
            .flow_entries
            .or(file.flow_entries)
            .unwrap_or(udptrace_common::FLOWS_DEFAULT);
        anyhow::ensure!(
            flow_entries >= 16,
            "flow_entries = {flow_entries}: at least 16"
        );
        let flow_idle = args.flow_idle.or(file.flow_idle).unwrap_or(300);
        anyhow::ensure!(flow_idle >= 1, "flow_idle = 0: at least 1 second");
        let sampling = SampleConfig {
            every: args
                .sample_every
                .or(file.sample_every)
                .unwrap_or(SAMPLE_EVERY_DEFAULT),
            first: args
                .sample_first
                .or(file.sample_first)
                .unwrap_or(SAMPLE_FIRST_DEFAULT),
        };
        anyhow::ensure!(
            sampling.every >= 1,
            "sample_every = 0: at least 1 (1 traces every datagram)"
        );
        let defaults = Policy::default();
        Ok(Self {
            listen: args
                .listen
                .or(file.listen)
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9720))),
            netns,
            flow_entries,
            flow_idle: Duration::from_secs(flow_idle),
            paths_kept: args.paths_kept.or(file.paths_kept).unwrap_or(1000),
            per_flow_metrics: args
                .per_flow_metrics
                .or(file.per_flow_metrics)
                .unwrap_or(false),
            paths: args.paths.or(file.paths).unwrap_or(Paths::Windows),
            windows: Policy {
                auto: duration(args.auto_window, &file.auto_window, "auto_window")?
                    .unwrap_or(defaults.auto),
                cooldown: duration(
                    args.auto_window_cooldown,
                    &file.auto_window_cooldown,
                    "auto_window_cooldown",
                )?
                .unwrap_or(defaults.cooldown),
                cycle_every: duration(args.window_every, &file.window_every, "window_every")?
                    .filter(|d| !d.is_zero()),
                cycle_for: duration(args.window_for, &file.window_for, "window_for")?
                    .unwrap_or(defaults.cycle_for),
            },
            sampling,
            kube: ApiServer::find(args.kube_api.as_deref().or(file.kube_api.as_deref())),
            node: args
                .node_name
                .clone()
                .or(file.node_name)
                .unwrap_or_else(|| {
                    std::fs::read_to_string("/proc/sys/kernel/hostname")
                        .map(|h| h.trim().to_string())
                        .unwrap_or_default()
                }),
            cgroup_root: args.cgroup_root.clone().or(file.cgroup_root),
            only_netns: args
                .only_netns
                .clone()
                .or(file.only_netns)
                .unwrap_or_default(),
            peers: args.peers.clone().or(file.peers).unwrap_or_default(),
            peer_service: args.peer_service.clone().or(file.peer_service),
        })
    }
}

/// A duration from the command line, else the config file (`5s`, `1m30s`).
fn duration(
    arg: Option<humantime::Duration>,
    file: &Option<String>,
    key: &str,
) -> anyhow::Result<Option<Duration>> {
    if let Some(d) = arg {
        return Ok(Some(d.into()));
    }
    file.as_deref()
        .map(|text| {
            humantime::parse_duration(text)
                .with_context(|| format!("config file: {key} = {text:?}: expected e.g. \"5s\""))
        })
        .transpose()
}

fn read_config(path: &Path) -> anyhow::Result<ConfigFile> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("config file {}", path.display()))
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::cmd::args::{Cli, Command};

    fn agent_args(argv: &[&str]) -> AgentArgs {
        let mut all = vec!["udptrace", "agent"];
        all.extend_from_slice(argv);
        match Cli::try_parse_from(all).unwrap().command {
            Command::Agent(a) => *a,
            _ => unreachable!(),
        }
    }

    #[test]
    fn defaults_then_config_file_then_command_line() {
        let s = Settings::resolve(&agent_args(&[])).unwrap();
        assert_eq!(s.listen, "127.0.0.1:9720".parse().unwrap());
        assert_eq!((s.netns, s.flow_entries), (NetnsScope::Host, 65_536));
        assert_eq!((s.sampling.first, s.sampling.every), (10, 100));
        assert_eq!(s.paths, Paths::Windows);
        assert_eq!(s.windows, Policy::default());
        let dir = std::env::temp_dir().join(format!("udpt-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("agent.toml");
        std::fs::write(
            &file,
            "listen = \"0.0.0.0:9999\"\nnetns = \"all\"\nflow_idle = 60\nsample_every = 7\n\
             paths = \"off\"\nwindow_every = \"10m\"\n",
        )
        .unwrap();
        let f = file.to_str().unwrap();
        let s = Settings::resolve(&agent_args(&["--config", f])).unwrap();
        assert_eq!(s.listen, "0.0.0.0:9999".parse().unwrap());
        assert_eq!(
            (s.netns, s.flow_idle, s.sampling.every),
            (NetnsScope::All, Duration::from_secs(60), 7)
        );
        assert_eq!(s.paths, Paths::Off);
        assert_eq!(s.windows.cycle_every, Some(Duration::from_secs(600)));
        let s = Settings::resolve(&agent_args(&[
            "--config",
            f,
            "--listen",
            "127.0.0.1:0",
            "--paths",
            "on",
            "--auto-window",
            "2s",
        ]))
        .unwrap();
        assert_eq!(s.paths, Paths::On);
        assert_eq!(s.windows.auto, Duration::from_secs(2));
        assert_eq!(s.listen, "127.0.0.1:0".parse().unwrap());
        std::fs::write(&file, "listen = \"0.0.0.0:9999\"\nlisten_on = 3\n").unwrap();
        let err = Settings::resolve(&agent_args(&["--config", f])).unwrap_err();
        assert!(format!("{err:#}").contains("listen_on"), "{err:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
