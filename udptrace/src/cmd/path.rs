//! `udptrace path`: asks agents for their recent paths and prints each datagram's path
//! joined across nodes (`pipeline::stitch`). Also the client the agent uses to ask its peers.

use std::io::Write as _;

use anyhow::Context as _;
use serde::Deserialize;

use crate::{
    cmd::args::PathArgs,
    model::Path,
    pipeline::stitch::{stitch, Part},
};

pub async fn run(args: PathArgs) -> anyhow::Result<()> {
    let query = args.filter.filter().query_string();
    let agents: Vec<(String, String)> = args.agents.iter().map(|a| node_and_url(a)).collect();
    let parts = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<Part>> {
        let mut parts = Vec::new();
        for (node, url) in &agents {
            parts.extend(fetch(url, node, &query)?);
        }
        Ok(parts)
    })
    .await??;
    let mut out = std::io::stdout().lock();
    for path in stitch(&parts) {
        writeln!(out, "{}", serde_json::to_string(&path)?)?;
    }
    Ok(())
}

/// `NODE=URL` or `URL` (the node is then the URL's host and port).
pub fn node_and_url(spec: &str) -> (String, String) {
    match spec.split_once('=') {
        Some((node, url)) if !node.contains('/') => (node.to_string(), url.to_string()),
        _ => {
            let host = spec
                .trim_start_matches("http://")
                .trim_end_matches('/')
                .to_string();
            (host, spec.to_string())
        }
    }
}

/// The body of `/api/v1/paths`.
#[derive(Deserialize)]
struct Paths {
    paths: Vec<Path>,
}

/// The recent paths of the agent at `url` (`http://host:port`) that pass `query` (see
/// `Filter::query_string`), as parts of node `node`. Blocking.
pub fn fetch(url: &str, node: &str, query: &str) -> anyhow::Result<Vec<Part>> {
    let full = format!("{}/api/v1/paths{query}", url.trim_end_matches('/'));
    let body = ureq::get(&full)
        .config()
        .timeout_global(Some(std::time::Duration::from_secs(10)))
        .build()
        .call()
        .with_context(|| format!("asking the agent at {url} (GET {full})"))?
        .body_mut()
        .read_to_vec()
        .with_context(|| format!("reading the answer of {full}"))?;
    let answer: Paths = serde_json::from_slice(&body)
        .with_context(|| format!("{full} did not answer a list of paths"))?;
    Ok(answer
        .paths
        .into_iter()
        .map(|path| Part {
            node: node.to_string(),
            path,
        })
        .collect())
}
