//! `udptrace agent`: the daemon. The pipeline's paths feed a flow table and a ring of recent
//! paths; the kernel's flow counters are read every second; an HTTP server answers
//! `/healthz`, `/metrics` (Prometheus text), `/api/v1/flows` and `/api/v1/paths`.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    path::Path as FsPath,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use axum::{
    extract::{Query, State},
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};
use serde::Deserialize;
use udptrace_common::SampleConfig;

use crate::{
    args::{AgentArgs, SAMPLE_FIRST_DEFAULT},
    clock::{monotonic_ns, Clock},
    filter::Filter,
    flows::FlowTable,
    k8s::{ApiServer, Cluster},
    loader::{NetnsScope, Sampler},
    paths::Path,
    pipeline::{Losses, Pipeline},
    stitch::{self, Part},
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
    pub cgroup_root: Option<std::path::PathBuf>,
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
    sample_every: Option<u32>,
    sample_first: Option<u32>,
    kube_api: Option<String>,
    node_name: Option<String>,
    cgroup_root: Option<std::path::PathBuf>,
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

fn read_config(path: &FsPath) -> anyhow::Result<ConfigFile> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("config file {}", path.display()))
}

/// What the HTTP handlers read.
struct Shared {
    flows: FlowTable,
    paths: VecDeque<Path>,
    paths_kept: usize,
    losses: Losses,
    /// (hop, hook) in use.
    hooks: Vec<(&'static str, &'static str)>,
    per_flow_metrics: bool,
    /// Changes the kernel's sampling at runtime.
    sampler: Option<Sampler>,
    sampling: SampleConfig,
    /// Kubernetes names, when in a cluster.
    cluster: Option<Cluster>,
    /// For stitching: this node's name, the other agents, our own address.
    node: String,
    peers: Vec<String>,
    peer_service: Option<String>,
    bound: SocketAddr,
}

type AppState = Arc<Mutex<Shared>>;

pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    let settings = Settings::resolve(&args)?;
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("listening on {}", settings.listen))?;
    let bound = listener.local_addr()?;
    if let Some(dir) = &settings.cgroup_root {
        crate::kernel::cgroup2::configure(dir.clone());
    }
    let cluster = match &settings.kube {
        Some(server) => {
            Some(watch_cluster(server, &settings.node, settings.cgroup_root.clone()).await?)
        }
        None => None,
    };
    let only = netns_inodes(&settings.only_netns)?;
    let mut pipeline = Pipeline::start(
        settings.netns,
        settings.flow_entries,
        settings.sampling,
        None,
    )?;
    if let Some(only) = only {
        pipeline.keep_only(only);
    }
    pipeline.tracer.warn_missing_hops();
    let mut hooks: Vec<(&'static str, &'static str)> = Vec::new();
    for report in std::iter::once(&pipeline.tracer.send).chain(&pipeline.tracer.skb_hops) {
        if let Some(hook) = report.chosen() {
            hooks.push((report.hop, hook));
        }
    }
    let state: AppState = Arc::new(Mutex::new(Shared {
        flows: FlowTable::new(
            Clock::new(),
            settings.flow_idle,
            settings.flow_entries as usize,
        ),
        paths: VecDeque::new(),
        paths_kept: settings.paths_kept,
        losses: Losses::default(),
        hooks,
        per_flow_metrics: settings.per_flow_metrics,
        sampler: pipeline.tracer.sampler(),
        sampling: settings.sampling,
        cluster,
        node: settings.node.clone(),
        peers: settings.peers.clone(),
        peer_service: settings.peer_service.clone(),
        bound,
    }));
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/api/v1/flows", get(flows))
        .route("/api/v1/paths", get(paths))
        .route("/api/v1/sampling", get(sampling).put(set_sampling))
        .route("/api/v1/paths/stitched", get(stitched))
        .with_state(state.clone());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stop_rx.await;
            })
            .await
    });
    // Tests and scripts wait for this line.
    eprintln!("udptrace: agent listening on http://{bound}");

    // The kernel's flow counters are read every second on a thread of their own: a large
    // table takes a while, and events and signals must not wait for it.
    let reader = pipeline
        .tracer
        .flow_reader()
        .context("the eBPF object has no FLOWS or STATS map")?;
    let (counts_tx, mut counts) = tokio::sync::mpsc::channel(1);
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_secs(1));
        if counts_tx.blocking_send(reader.read()).is_err() {
            break;
        }
    });
    let mut finished = Vec::new();
    let stop = loop {
        tokio::select! {
            step = pipeline.step(&mut finished) => {
                if let Some(stop) = step? {
                    break stop;
                }
            }
            Some(read) = counts.recv() => {
                let mut s = state.lock().expect("agent state");
                s.losses = pipeline.apply_flow_counts(&mut s.flows, read);
                s.flows.set_nat_totals(pipeline.nat_counts());
            }
        }
        if !finished.is_empty() {
            let now = monotonic_ns();
            let mut s = state.lock().expect("agent state");
            for path in finished.drain(..) {
                s.flows.observe(&path, now);
                if s.paths.len() >= s.paths_kept {
                    s.paths.pop_front();
                }
                if s.paths_kept > 0 {
                    s.paths.push_back(path);
                }
            }
        }
    };
    tracing::debug!("stopping ({stop:?})");
    // Detach everything first; then paths still being assembled count as they are (a drop
    // seen is a drop), and the server finishes its requests.
    let losses = {
        let mut s = state.lock().expect("agent state");
        // No last read of the kernel's counters: they go with the process anyway, and
        // with a large table the read would keep our programs attached for a while.
        let (losses, rest) = pipeline.finish(None);
        let now = monotonic_ns();
        for path in finished.drain(..).chain(rest) {
            s.flows.observe(&path, now);
        }
        losses
    };
    let _ = stop_tx.send(());
    match tokio::time::timeout(Duration::from_secs(5), server).await {
        Ok(Ok(Err(e))) => tracing::warn!("HTTP server: {e}"),
        Err(_) => tracing::warn!("HTTP server did not finish its requests in 5 s"),
        _ => {}
    }
    tracing::debug!("HTTP server done");
    eprintln!("udptrace: agent stopped ({stop:?}); {losses}");
    Ok(())
}

/// `?port=&host=&pid=&comm=`, as the command-line filters.
#[derive(Debug, Default, Deserialize)]
struct FilterQuery {
    port: Option<u16>,
    host: Option<std::net::IpAddr>,
    pid: Option<u32>,
    comm: Option<String>,
}

impl From<FilterQuery> for Filter {
    fn from(q: FilterQuery) -> Self {
        Self {
            port: q.port,
            host: q.host,
            pid: q.pid,
            comm: q.comm,
        }
    }
}

/// The inodes of the namespaces named (in /run/netns) or given by path; None for none.
fn netns_inodes(names: &[String]) -> anyhow::Result<Option<std::collections::HashSet<u32>>> {
    use std::os::unix::fs::MetadataExt as _;
    if names.is_empty() {
        return Ok(None);
    }
    names
        .iter()
        .map(|n| {
            let path = if n.contains('/') {
                std::path::PathBuf::from(n)
            } else {
                std::path::Path::new("/run/netns").join(n)
            };
            let meta = std::fs::metadata(&path).with_context(|| {
                format!(
                    "only_netns: {n:?}: no such network namespace ({})",
                    path.display()
                )
            })?;
            Ok(meta.ino() as u32)
        })
        .collect::<anyhow::Result<_>>()
        .map(Some)
}

/// `GET /api/v1/paths/stitched`: this agent's recent paths and the other agents' (the
/// peers, and every address of the peer service), joined per datagram.
async fn stitched(State(state): State<AppState>, Query(q): Query<FilterQuery>) -> Response {
    let filter = Filter::from(q);
    let (mut parts, mut peers, service, bound) = {
        let s = state.lock().expect("agent state");
        let parts: Vec<Part> = s
            .paths
            .iter()
            .filter(|p| filter.matches(p))
            .map(|p| Part {
                node: s.node.clone(),
                path: serde_json::to_value(p).unwrap_or_default(),
            })
            .collect();
        (parts, s.peers.clone(), s.peer_service.clone(), s.bound)
    };
    if let Some(service) = service {
        match tokio::net::lookup_host(service.as_str()).await {
            Ok(addrs) => peers.extend(addrs.filter(|a| *a != bound).map(|a| format!("http://{a}"))),
            Err(e) => {
                return (
                    StatusCode::BAD_GATEWAY,
                    format!("resolving the peer service {service}: {e}\n"),
                )
                    .into_response()
            }
        }
    }
    let query = stitch::query(&filter);
    let fetched = tokio::task::spawn_blocking(move || {
        peers
            .iter()
            .map(|p| {
                let (node, url) = stitch::node_and_url(p);
                stitch::fetch(&url, &node, &query)
            })
            .collect::<anyhow::Result<Vec<Vec<Part>>>>()
    })
    .await;
    match fetched {
        Ok(Ok(more)) => parts.extend(more.into_iter().flatten()),
        Ok(Err(e)) => return (StatusCode::BAD_GATEWAY, format!("{e:#}\n")).into_response(),
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
    Json(serde_json::json!({ "paths": stitch::stitch(&parts) })).into_response()
}

/// Starts watching the cluster; waits up to 10 s for the first lists (the agent serves
/// without names meanwhile if the API server is slow: the watchers keep trying).
async fn watch_cluster(
    server: &ApiServer,
    node: &str,
    cgroup_root: Option<std::path::PathBuf>,
) -> anyhow::Result<Cluster> {
    anyhow::ensure!(
        !node.is_empty(),
        "the node's name is needed to watch its pods: --node-name or UDPTRACE_NODE_NAME (in a \
         DaemonSet, from the downward API's spec.nodeName)"
    );
    let cluster = Cluster::start(server, node, cgroup_root)?;
    match tokio::time::timeout(Duration::from_secs(10), cluster.ready()).await {
        Ok(Ok(())) => eprintln!("udptrace: watching Kubernetes (node {node})"),
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            tracing::warn!("Kubernetes API: no first list in 10 s; names come when it answers")
        }
    }
    Ok(cluster)
}

async fn flows(State(state): State<AppState>, Query(q): Query<FilterQuery>) -> Response {
    let filter = Filter::from(q);
    let s = state.lock().expect("agent state");
    let views = s.flows.snapshot(&filter);
    let body = match &s.cluster {
        Some(cluster) => {
            let names = cluster.directory();
            let views: Vec<serde_json::Value> =
                views.iter().map(|v| names.decorate_flow(v)).collect();
            serde_json::json!({ "flows": views })
        }
        None => serde_json::json!({ "flows": views }),
    };
    Json(body).into_response()
}

async fn paths(State(state): State<AppState>, Query(q): Query<FilterQuery>) -> Response {
    let filter = Filter::from(q);
    let s = state.lock().expect("agent state");
    let paths = s.paths.iter().filter(|p| filter.matches(p));
    let body = match &s.cluster {
        Some(cluster) => {
            let names = cluster.directory();
            let paths: Vec<serde_json::Value> = paths.map(|p| names.decorate_path(p)).collect();
            serde_json::json!({ "paths": paths })
        }
        None => serde_json::json!({ "paths": paths.collect::<Vec<&Path>>() }),
    };
    Json(body).into_response()
}

fn sampling_json(c: SampleConfig) -> serde_json::Value {
    serde_json::json!({ "first": c.first, "every": c.every })
}

async fn sampling(State(state): State<AppState>) -> Response {
    let s = state.lock().expect("agent state");
    // What the kernel has, in effect now.
    let now = s.sampler.as_ref().and_then(|m| m.get().ok());
    Json(sampling_json(now.unwrap_or(s.sampling))).into_response()
}

/// `PUT /api/v1/sampling` with `{"every": N, "first": K}` (either may be left out).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SamplingChange {
    every: Option<u32>,
    first: Option<u32>,
}

async fn set_sampling(
    State(state): State<AppState>,
    change: Result<Json<SamplingChange>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let bad = |msg: String| (StatusCode::BAD_REQUEST, format!("{msg}\n")).into_response();
    let Json(change) = match change {
        Ok(c) => c,
        Err(e) => {
            return bad(format!(
                "{}; expected {{\"every\": N, \"first\": K}}",
                e.body_text()
            ))
        }
    };
    let mut s = state.lock().expect("agent state");
    let new = SampleConfig {
        every: change.every.unwrap_or(s.sampling.every),
        first: change.first.unwrap_or(s.sampling.first),
    };
    if new.every == 0 {
        return bad("every = 0: at least 1 (1 traces every datagram)".into());
    }
    let Some(sampler) = s.sampler.as_mut() else {
        return (
            StatusCode::CONFLICT,
            "sampling is not available: the drop hop is not attached (see `udptrace doctor`)\n",
        )
            .into_response();
    };
    if let Err(e) = sampler.set(new) {
        return (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response();
    }
    tracing::info!("sampling now: first {}, then 1 in {}", new.first, new.every);
    s.sampling = new;
    Json(sampling_json(new)).into_response()
}

/// Builds a counter or gauge family (or a single one, without labels) and sets its values.
fn family<M: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    make: impl FnOnce() -> prometheus::Result<M>,
) -> prometheus::Result<M> {
    let metric = make()?;
    registry.register(Box::new(metric.clone()))?;
    Ok(metric)
}

/// The Prometheus text exposition (format 0.0.4) of the agent's state. Counters are the
/// totals since the agent started: they only grow.
fn render_metrics(s: &Shared) -> prometheus::Result<String> {
    let registry = Registry::new();
    let totals = s.flows.totals();
    for (name, help, values) in [
        (
            "udptrace_datagrams_total",
            "UDP datagrams sent, by the sender's network namespace",
            &totals.datagrams,
        ),
        (
            "udptrace_bytes_total",
            "UDP payload bytes sent, by the sender's network namespace",
            &totals.bytes,
        ),
        (
            "udptrace_send_errors_total",
            "UDP sends that failed, by the sender's network namespace",
            &totals.errors,
        ),
    ] {
        let c = family(&registry, || {
            IntCounterVec::new(Opts::new(name, help), &["netns"])
        })?;
        for (netns, v) in values {
            c.with_label_values(&[&netns.to_string()]).inc_by(*v);
        }
    }
    let drops = family(&registry, || {
        IntCounterVec::new(
            Opts::new(
                "udptrace_drops_total",
                "UDP datagrams dropped, by the kernel's reason and the namespace where it happened",
            ),
            &["reason", "netns"],
        )
    })?;
    for ((reason, netns), v) in &totals.drops {
        drops
            .with_label_values(&[reason.as_str(), &netns.to_string()])
            .inc_by(*v);
    }
    let nat = family(&registry, || {
        IntCounterVec::new(
            Opts::new(
                "udptrace_nat_translations_total",
                "NAT rewrites of UDP datagrams, by netfilter hook and kind",
            ),
            &["hook", "nat"],
        )
    })?;
    for ((hook, kind), v) in &totals.nat {
        nat.with_label_values(&[*hook, *kind]).inc_by(*v);
    }
    for (name, help, value) in [
        (
            "udptrace_events_lost_total",
            "Hop events lost to a full ring buffer",
            s.losses.ring_full,
        ),
        (
            "udptrace_flow_evictions_total",
            "Flows the kernel's LRU table evicted before they went idle",
            totals.evictions,
        ),
        (
            "udptrace_flows_expired_total",
            "Flows forgotten after the idle time",
            totals.expired,
        ),
        (
            "udptrace_flows_not_counted_total",
            "Datagrams whose flow could not be added to the kernel's table",
            s.losses.flow_full,
        ),
    ] {
        family(&registry, || IntCounter::new(name, help))?.inc_by(value);
    }
    family(&registry, || {
        IntGauge::new(
            "udptrace_sample_every",
            "1 in this many datagrams of a flow is traced hop by hop after its first ones",
        )
    })?
    .set(i64::from(s.sampling.every));
    family(&registry, || {
        IntGauge::new("udptrace_flows", "Flows tracked now")
    })?
    .set(i64::try_from(s.flows.len()).unwrap_or(i64::MAX));
    let hooks = family(&registry, || {
        IntGaugeVec::new(
            Opts::new("udptrace_hook_info", "The kernel hook each hop uses"),
            &["hop", "hook"],
        )
    })?;
    for (hop, hook) in &s.hooks {
        hooks.with_label_values(&[*hop, *hook]).set(1);
    }
    family(&registry, || {
        IntGaugeVec::new(
            Opts::new("udptrace_build_info", "The agent's version"),
            &["version"],
        )
    })?
    .with_label_values(&[env!("CARGO_PKG_VERSION")])
    .set(1);
    if s.per_flow_metrics {
        let per_flow = family(&registry, || {
            IntCounterVec::new(
                Opts::new(
                    "udptrace_flow_datagrams_total",
                    "UDP datagrams sent, per flow (only with --per-flow-metrics)",
                ),
                &["netns", "src", "dst"],
            )
        })?;
        for flow in s.flows.snapshot(&Filter::default()) {
            let show = |a: Option<SocketAddr>| a.map_or_else(|| "?".into(), |a| a.to_string());
            per_flow
                .with_label_values(&[
                    &flow.netns.to_string(),
                    &show(flow.orig.src),
                    &show(flow.orig.dst),
                ])
                .inc_by(flow.packets);
        }
    }
    TextEncoder::new().encode_to_string(&registry.gather())
}

async fn metrics(State(state): State<AppState>) -> Response {
    let text = render_metrics(&state.lock().expect("agent state"));
    match text {
        Ok(text) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], text).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::args::{Cli, Command};

    fn agent_args(argv: &[&str]) -> AgentArgs {
        let mut all = vec!["udptrace", "agent"];
        all.extend_from_slice(argv);
        match Cli::try_parse_from(all).unwrap().command {
            Command::Agent(a) => a,
            _ => unreachable!(),
        }
    }

    #[test]
    fn defaults_then_config_file_then_command_line() {
        let s = Settings::resolve(&agent_args(&[])).unwrap();
        assert_eq!(s.listen, "127.0.0.1:9720".parse().unwrap());
        assert_eq!((s.netns, s.flow_entries), (NetnsScope::Host, 65_536));
        assert_eq!((s.sampling.first, s.sampling.every), (10, 100));
        let dir = std::env::temp_dir().join(format!("udpt-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("agent.toml");
        std::fs::write(
            &file,
            "listen = \"0.0.0.0:9999\"\nnetns = \"all\"\nflow_idle = 60\nsample_every = 7\n",
        )
        .unwrap();
        let f = file.to_str().unwrap();
        let s = Settings::resolve(&agent_args(&["--config", f])).unwrap();
        assert_eq!(s.listen, "0.0.0.0:9999".parse().unwrap());
        assert_eq!(
            (s.netns, s.flow_idle, s.sampling.every),
            (NetnsScope::All, Duration::from_secs(60), 7)
        );
        let s =
            Settings::resolve(&agent_args(&["--config", f, "--listen", "127.0.0.1:0"])).unwrap();
        assert_eq!(s.listen, "127.0.0.1:0".parse().unwrap());
        std::fs::write(&file, "listen = \"0.0.0.0:9999\"\nlisten_on = 3\n").unwrap();
        let err = Settings::resolve(&agent_args(&["--config", f])).unwrap_err();
        assert!(format!("{err:#}").contains("listen_on"), "{err:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn metrics_are_prometheus_text_with_our_names() {
        let mut flows = FlowTable::new(Clock::new(), Duration::from_secs(60), 16);
        let key = udptrace_common::FlowKey {
            netns: 7,
            ..Default::default()
        };
        let stats = udptrace_common::FlowStats {
            packets: 3,
            bytes: 30,
            ..Default::default()
        };
        flows.update_counts(&[(key, stats)], 1, 0);
        let s = Shared {
            flows,
            paths: VecDeque::new(),
            paths_kept: 10,
            losses: Losses::default(),
            hooks: vec![("send", "raw_tracepoint:sock:sock_send_length")],
            per_flow_metrics: false,
            sampler: None,
            cluster: None,
            node: "node-a".into(),
            peers: Vec::new(),
            peer_service: None,
            bound: "127.0.0.1:9720".parse().unwrap(),
            sampling: SampleConfig {
                first: 10,
                every: 100,
            },
        };
        let text = render_metrics(&s).unwrap();
        for needle in [
            "# TYPE udptrace_datagrams_total counter",
            "udptrace_datagrams_total{netns=\"7\"} 3",
            "udptrace_bytes_total{netns=\"7\"} 30",
            "udptrace_hook_info{hook=\"raw_tracepoint:sock:sock_send_length\",hop=\"send\"} 1",
            "udptrace_build_info{version=",
            "udptrace_events_lost_total 0",
            "udptrace_sample_every 100",
        ] {
            assert!(text.contains(needle), "{needle} in\n{text}");
        }
    }
}
