//! `udptrace agent`: the daemon. The pipeline's paths feed a flow table and a ring of recent
//! paths; the kernel's flow counters are read every second; `http` answers the API.

mod config;
mod http;

pub use config::{Settings, SAMPLE_EVERY_DEFAULT};

use std::{
    collections::{HashSet, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;

use crate::{
    clock::{monotonic_ns, Clock},
    cmd::args::{AgentArgs, Paths},
    k8s::{ApiServer, Cluster},
    loader::LoadConfig,
    model::Path,
    pipeline::{
        conntrack::CtEvent,
        flows::{FlowTable, News},
        windows::{Reason, Windows},
        FlowCounts, Losses, NamespaceCoverage, Pipeline, Sink, Stop,
    },
};
use http::{AppState, Shared};

pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    let settings = Settings::resolve(&args)?;
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("listening on {}", settings.listen))?;
    let bound = listener.local_addr()?;
    let cluster = match &settings.kube {
        Some(server) => {
            Some(watch_cluster(server, &settings.node, settings.cgroup_root.clone()).await?)
        }
        None => None,
    };
    let only = netns_inodes(&settings.only_netns)?;
    let load = LoadConfig {
        paths: settings.paths == Paths::On,
        flow_entries: settings.flow_entries,
        cgroup_root: settings.cgroup_root.clone(),
        ..LoadConfig::new(settings.netns)
    };
    let mut pipeline = Pipeline::start(&load, settings.sampling, None)?;
    let windows = (settings.paths == Paths::Windows).then(|| {
        let windows = Windows::new(settings.windows, settings.sampling);
        pipeline.use_windows(windows.clone());
        windows
    });
    if let Some(only) = only {
        pipeline.keep_only(only);
    }
    pipeline.warn_missing_hops();
    let hooks = pipeline
        .hops()
        .filter_map(|r| Some((r.hop, r.chosen()?)))
        .collect();
    let mut flows = FlowTable::new(
        Clock::new(),
        settings.flow_idle,
        settings.flow_entries as usize,
    );
    let nat_programs = settings.paths == Paths::On;
    if !nat_programs {
        flows.count_nat_by_flows();
    }
    let state: AppState = Arc::new(Mutex::new(Shared {
        flows,
        paths: VecDeque::new(),
        paths_kept: settings.paths_kept,
        losses: Losses::default(),
        namespaces: NamespaceCoverage::default(),
        hooks,
        per_flow_metrics: settings.per_flow_metrics,
        sampler: pipeline.sampler(),
        windows: windows.clone(),
        sampling: settings.sampling,
        cluster,
        node: settings.node.clone(),
        peers: settings.peers.clone(),
        peer_service: settings.peer_service.clone(),
        bound,
    }));
    let app = http::router(state.clone());
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
    let mut sink = AgentSink {
        state,
        losses: Losses::default(),
        windows,
        nat_programs,
    };
    let stop = pipeline.run(&mut sink).await?;
    let _ = stop_tx.send(());
    match tokio::time::timeout(Duration::from_secs(5), server).await {
        Ok(Ok(Err(e))) => tracing::warn!("HTTP server: {e}"),
        Err(_) => tracing::warn!("HTTP server did not finish its requests in 5 s"),
        _ => {}
    }
    tracing::debug!("HTTP server done");
    eprintln!("udptrace: agent stopped ({stop:?}); {}", sink.losses);
    Ok(())
}

/// The agent's end of the pipeline: the state the HTTP handlers read.
struct AgentSink {
    state: AppState,
    /// What was lost, when stopped.
    losses: Losses,
    /// Path windows, with `--paths windows`: news opens one.
    windows: Option<Windows>,
    /// The NAT programs are always attached (`--paths on`): their counters are the NAT
    /// totals (else conntrack's flows are).
    nat_programs: bool,
}

impl AgentSink {
    /// Opens a path window when the flow table saw something new.
    fn look_closer(&self, news: News) {
        let Some(windows) = &self.windows else {
            return;
        };
        for (new, reason) in [(news.drop, Reason::Drop), (news.nat, Reason::Nat)] {
            if new && windows.news(reason) {
                tracing::info!("path window for news: {}", reason.name());
            }
        }
    }
}

impl Sink for AgentSink {
    const COUNTS: bool = true;
    // No last read of the kernel's counters: they go with the process anyway, and with a
    // large table the read would keep our programs attached for a while.
    const LAST_COUNTS: bool = false;
    const CONNTRACK: bool = true;

    fn conntrack(&mut self, events: &[CtEvent]) -> anyhow::Result<Option<Stop>> {
        let news = {
            let mut s = self.state.lock().expect("agent state");
            s.flows.observe_conntrack(events);
            s.flows.take_news()
        };
        self.look_closer(news);
        Ok(None)
    }

    fn paths(&mut self, paths: &mut Vec<Path>) -> anyhow::Result<Option<Stop>> {
        let now = monotonic_ns();
        let mut s = self.state.lock().expect("agent state");
        for path in paths.drain(..) {
            s.flows.observe(&path, now);
            if s.paths.len() >= s.paths_kept {
                s.paths.pop_front();
            }
            if s.paths_kept > 0 {
                s.paths.push_back(path);
            }
        }
        Ok(None)
    }

    fn counts(
        &mut self,
        pipeline: &mut Pipeline,
        counts: FlowCounts,
    ) -> anyhow::Result<Option<Stop>> {
        let news = {
            let mut s = self.state.lock().expect("agent state");
            s.losses = pipeline.apply_flow_counts(&mut s.flows, counts);
            s.namespaces = pipeline.namespace_coverage();
            if self.nat_programs {
                s.flows.set_nat_totals(pipeline.nat_counts());
            }
            s.flows.take_news()
        };
        self.look_closer(news);
        Ok(None)
    }

    /// Detached; paths still being assembled count as they are (a drop seen is a drop).
    fn finish(&mut self, stop: Stop, rest: Vec<Path>, losses: Losses) -> anyhow::Result<()> {
        let now = monotonic_ns();
        let mut s = self.state.lock().expect("agent state");
        for path in &rest {
            s.flows.observe(path, now);
        }
        tracing::debug!("stopped ({stop:?})");
        self.losses = losses;
        Ok(())
    }
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
/// The inodes of the namespaces named (in /run/netns) or given by path; None for none.
fn netns_inodes(names: &[String]) -> anyhow::Result<Option<HashSet<u32>>> {
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
