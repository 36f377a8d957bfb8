//! The agent's HTTP API: `/healthz`, `/metrics` (Prometheus text), `/api/v1/flows`,
//! `/api/v1/paths`, `/api/v1/paths/stitched`, `/api/v1/sampling` (docs/flows.md).

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use axum::{
    extract::{Query, State},
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use serde::{Deserialize, Serialize};
use udptrace_common::SampleConfig;

use crate::{
    cmd::path::{fetch, node_and_url},
    k8s::Cluster,
    loader::Sampler,
    model::{FlowView, Path},
    output::metrics::{self, Metrics},
    pipeline::{
        filter::Filter,
        flows::FlowTable,
        stitch::{stitch, Part},
        windows::{Reason, Windows, MAX_WINDOW},
        Losses, NamespaceCoverage,
    },
};

/// What the HTTP handlers read.
pub struct Shared {
    pub flows: FlowTable,
    pub paths: VecDeque<Path>,
    pub paths_kept: usize,
    pub losses: Losses,
    pub namespaces: NamespaceCoverage,
    /// (hop, hook) in use.
    pub hooks: Vec<(&'static str, &'static str)>,
    pub per_flow_metrics: bool,
    /// Changes the kernel's sampling at runtime.
    pub sampler: Option<Sampler>,
    pub sampling: SampleConfig,
    /// Path windows, with `--paths windows`.
    pub windows: Option<Windows>,
    /// Kubernetes names, when in a cluster.
    pub cluster: Option<Cluster>,
    /// For stitching: this node's name, the other agents, our own address.
    pub node: String,
    pub peers: Vec<String>,
    pub peer_service: Option<String>,
    pub bound: SocketAddr,
}

pub type AppState = Arc<Mutex<Shared>>;

/// The routes, serving `state`.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/api/v1/flows", get(flows))
        .route("/api/v1/paths", get(paths))
        .route("/api/v1/sampling", get(sampling).put(set_sampling))
        .route("/api/v1/paths/stitched", get(stitched))
        .route("/api/v1/windows", get(windows).post(open_window))
        .route("/api/v1/namespaces", get(namespaces))
        .with_state(state)
}

/// The body of `/api/v1/flows`.
#[derive(Serialize)]
struct FlowsBody {
    flows: Vec<FlowView>,
}

/// The body of `/api/v1/paths` and `/api/v1/paths/stitched`.
#[derive(Serialize)]
struct PathsBody {
    paths: Vec<Path>,
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
                path: p.clone(),
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
    let query = filter.query_string();
    let fetched = tokio::task::spawn_blocking(move || {
        peers
            .iter()
            .map(|p| {
                let (node, url) = node_and_url(p);
                fetch(&url, &node, &query)
            })
            .collect::<anyhow::Result<Vec<Vec<Part>>>>()
    })
    .await;
    match fetched {
        Ok(Ok(more)) => parts.extend(more.into_iter().flatten()),
        Ok(Err(e)) => return (StatusCode::BAD_GATEWAY, format!("{e:#}\n")).into_response(),
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
    Json(PathsBody {
        paths: stitch(&parts),
    })
    .into_response()
}

async fn flows(State(state): State<AppState>, Query(q): Query<FilterQuery>) -> Response {
    let filter = Filter::from(q);
    let s = state.lock().expect("agent state");
    let mut flows = s.flows.snapshot(&filter);
    if let Some(cluster) = &s.cluster {
        let names = cluster.directory();
        flows.iter_mut().for_each(|v| names.decorate_flow(v));
    }
    Json(FlowsBody { flows }).into_response()
}

async fn paths(State(state): State<AppState>, Query(q): Query<FilterQuery>) -> Response {
    let filter = Filter::from(q);
    let s = state.lock().expect("agent state");
    let mut paths: Vec<Path> = s
        .paths
        .iter()
        .filter(|p| filter.matches(p))
        .cloned()
        .collect();
    if let Some(cluster) = &s.cluster {
        let names = cluster.directory();
        paths.iter_mut().for_each(|p| names.decorate_path(p));
    }
    Json(PathsBody { paths }).into_response()
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
    if let Some(w) = &s.windows {
        w.set_sampling(new);
    }
    tracing::info!("sampling now: first {}, then 1 in {}", new.first, new.every);
    s.sampling = new;
    Json(sampling_json(new)).into_response()
}

/// One namespace in `/api/v1/namespaces`.
#[derive(Serialize)]
struct NamespaceView {
    netns: u64,
    links: u64,
    conntrack: bool,
    gone: bool,
}

/// The body of `/api/v1/namespaces`.
#[derive(Serialize)]
struct NamespacesBody {
    covered: u64,
    links: u64,
    released: u64,
    namespaces: Vec<NamespaceView>,
}

/// `GET /api/v1/namespaces`: the network namespaces covered now (as of the last read of
/// the counts, once a second), each with the links held there, whether its conntrack is
/// followed and whether it is gone and about to be let go of; and how many were let go of.
async fn namespaces(State(state): State<AppState>) -> Json<NamespacesBody> {
    let s = state.lock().expect("agent state");
    let c = &s.namespaces;
    Json(NamespacesBody {
        covered: c.covered,
        links: c.links,
        released: c.released,
        namespaces: c
            .namespaces
            .iter()
            .map(|n| NamespaceView {
                netns: n.netns,
                links: n.links,
                conntrack: n.conntrack,
                gone: n.gone,
            })
            .collect(),
    })
}

/// `GET /api/v1/windows`: whether the path hooks are attached, windows opened by reason.
async fn windows(State(state): State<AppState>) -> Response {
    let s = state.lock().expect("agent state");
    match &s.windows {
        Some(w) => Json(w.status()).into_response(),
        None => no_windows(),
    }
}

fn no_windows() -> Response {
    (
        StatusCode::CONFLICT,
        "no path windows: this agent runs with --paths on or off (windows need --paths \
         windows)\n",
    )
        .into_response()
}

/// `?duration=5s` (or seconds).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WindowQuery {
    duration: String,
}

/// `POST /api/v1/windows?duration=D`: attach the path hooks for D (at most 10 min) from
/// now; the paths come to /api/v1/paths as usual.
async fn open_window(
    State(state): State<AppState>,
    q: Result<Query<WindowQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let bad = |msg: String| (StatusCode::BAD_REQUEST, format!("{msg}\n")).into_response();
    let Query(q) = match q {
        Ok(q) => q,
        Err(e) => return bad(format!("{}; expected ?duration=5s", e.body_text())),
    };
    let length = match q.duration.parse::<u64>() {
        Ok(secs) => Ok(std::time::Duration::from_secs(secs)),
        Err(_) => humantime::parse_duration(&q.duration),
    };
    let length = match length {
        Ok(d) if !d.is_zero() && d <= MAX_WINDOW => d,
        Ok(_) => return bad(format!("duration={}: from 1s to 10m", q.duration)),
        Err(e) => return bad(format!("duration={}: {e} (e.g. 5s, 1m30s)", q.duration)),
    };
    let s = state.lock().expect("agent state");
    let Some(w) = &s.windows else {
        return no_windows();
    };
    w.request(length, Reason::Request);
    (StatusCode::ACCEPTED, Json(w.status())).into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    let text = {
        let s = state.lock().expect("agent state");
        metrics::render(&Metrics {
            flows: &s.flows,
            losses: &s.losses,
            namespaces: &s.namespaces,
            hooks: &s.hooks,
            per_flow: s.per_flow_metrics,
            sampling: s.sampling,
            windows: s.windows.as_ref().map(Windows::status),
        })
    };
    match text {
        Ok(text) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], text).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}
