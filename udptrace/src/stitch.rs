//! One datagram across nodes: joins the partial paths several agents saw (each covering its
//! node's namespaces) into one end-to-end path. A part that ends by handing the datagram on
//! (a transmit, into a tunnel or out of a NIC) continues in another node's part that begins
//! with the datagram arriving (ingress, decap) with the same addresses, IP identification
//! and length — the inner datagram's, for a tunnel, and the same VNI. Nothing is added to packets; there is no
//! central store: `udptrace path` and `/api/v1/paths/stitched` ask the agents.

use std::collections::HashMap;

use anyhow::Context as _;
use serde_json::Value;

use crate::filter::Filter;

/// A partial path and the node (agent) that saw it.
#[derive(Debug, Clone)]
pub struct Part {
    pub node: String,
    pub path: Value,
}

/// Source, destination, IP identification, length, and the VNI of the tunnel carrying it.
/// (Not the UDP checksum: with checksum offload the sending side sees a partial sum where
/// the receiving node sees the final one. Not the outer tuple: an underlay NAT may rewrite
/// it between nodes.)
type Key = (String, String, u64, u64, Option<u64>);

fn key(hop: &Value) -> Option<Key> {
    Some((
        hop["src"].as_str()?.to_string(),
        hop["dst"].as_str()?.to_string(),
        hop["ip_id"].as_u64()?,
        hop["len"].as_u64()?,
        hop["vni"].as_u64(),
    ))
}

fn hops(path: &Value) -> impl DoubleEndedIterator<Item = &Value> {
    path["hops"]
        .as_array()
        .map(|h| h.as_slice())
        .unwrap_or_default()
        .iter()
        .filter(|h| h["kind"] != "fragment")
}

/// Where a part hands the datagram on, if it does (no verdict here, or it left the host).
fn exit(path: &Value) -> Option<Key> {
    if path["verdict"] == "delivered" || path["verdict"] == "dropped" {
        return None;
    }
    let hop = hops(path).next_back()?;
    matches!(hop["kind"].as_str()?, "xmit" | "encap")
        .then(|| key(hop))
        .flatten()
}

/// Where a part takes the datagram over, if it starts with its arrival.
fn entry(path: &Value) -> Option<Key> {
    let hop = hops(path).next()?;
    matches!(hop["kind"].as_str()?, "ingress" | "decap")
        .then(|| key(hop))
        .flatten()
}

/// Joins `parts` into end-to-end paths (a part nothing continues stays as it is, with its
/// node named), in the order of their first part.
pub fn stitch(parts: &[Part]) -> Vec<Value> {
    let mut entries: HashMap<Key, Vec<usize>> = HashMap::new();
    for (i, part) in parts.iter().enumerate() {
        if let Some(k) = entry(&part.path) {
            entries.entry(k).or_default().push(i);
        }
    }
    let mut next: Vec<Option<usize>> = vec![None; parts.len()];
    let mut taken = vec![false; parts.len()];
    for (i, part) in parts.iter().enumerate() {
        let Some(k) = exit(&part.path) else { continue };
        let found = entries.get(&k).and_then(|c| {
            c.iter()
                .copied()
                .find(|&j| !taken[j] && parts[j].node != part.node)
        });
        if let Some(j) = found {
            next[i] = Some(j);
            taken[j] = true;
        }
    }
    let mut out = Vec::new();
    for head in (0..parts.len()).filter(|&i| !taken[i]) {
        let mut chain = vec![&parts[head]];
        let mut at = head;
        while let Some(j) = next[at] {
            if chain.len() > parts.len() {
                break;
            }
            chain.push(&parts[j]);
            at = j;
        }
        out.push(merge(&chain));
    }
    out
}

/// One path from consecutive parts: every hop (with its node), the last part's verdict and
/// final addresses, its explanation plus the rewrites earlier nodes made.
fn merge(chain: &[&Part]) -> Value {
    let first = &chain[0].path;
    let last = &chain[chain.len() - 1].path;
    let mut out = first.clone();
    let mut all = Vec::new();
    let mut rewrites = Vec::new();
    for part in chain {
        for hop in part.path["hops"].as_array().into_iter().flatten() {
            let mut hop = hop.clone();
            hop["node"] = part.node.clone().into();
            all.push(hop);
        }
        if std::ptr::eq(&part.path, last) {
            continue;
        }
        for hop in hops(&part.path).filter(|h| h["kind"] == "nat") {
            rewrites.push(format!(
                "on {}: {} at {} in netns {} rewrote {} → {}",
                part.node,
                hop["nat"].as_str().unwrap_or("nat").to_uppercase(),
                hop["nf_hook"].as_str().unwrap_or("?"),
                hop["netns"],
                hop["before"]["dst"].as_str().unwrap_or("?"),
                hop["after"]["dst"].as_str().unwrap_or("?"),
            ));
        }
    }
    out["hops"] = Value::Array(all);
    for field in ["final", "verdict", "complete"] {
        out[field] = last[field].clone();
    }
    out["sampled"] = first["sampled"].clone();
    out["nodes"] = chain
        .iter()
        .map(|p| Value::from(p.node.clone()))
        .collect::<Vec<_>>()
        .into();
    out["id"] = chain
        .iter()
        .filter_map(|p| p.path["id"].as_str())
        .collect::<Vec<_>>()
        .join("+")
        .into();
    let mut explain = last["explain"].as_str().unwrap_or_default().to_string();
    if chain.len() > 1 {
        explain = format!("on {}: {explain}", chain[chain.len() - 1].node);
    }
    for r in rewrites {
        explain.push_str("; earlier, ");
        explain.push_str(&r);
    }
    out["explain"] = explain.into();
    out
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

/// `udptrace path`: asks every agent, prints the joined paths as JSON lines.
pub async fn run(args: crate::args::PathArgs) -> anyhow::Result<()> {
    let query = query(&args.filter.filter());
    let agents: Vec<(String, String)> = args.agents.iter().map(|a| node_and_url(a)).collect();
    let parts = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<Part>> {
        let mut parts = Vec::new();
        for (node, url) in &agents {
            parts.extend(fetch(url, node, &query)?);
        }
        Ok(parts)
    })
    .await??;
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    for path in stitch(&parts) {
        writeln!(out, "{path}")?;
    }
    Ok(())
}

/// The query string of `filter` for an agent's `/api/v1/paths`.
pub fn query(filter: &Filter) -> String {
    let mut q = Vec::new();
    if let Some(p) = filter.port {
        q.push(format!("port={p}"));
    }
    if let Some(h) = filter.host {
        q.push(format!("host={h}"));
    }
    if let Some(p) = filter.pid {
        q.push(format!("pid={p}"));
    }
    if let Some(c) = &filter.comm {
        q.push(format!("comm={c}"));
    }
    if q.is_empty() {
        String::new()
    } else {
        format!("?{}", q.join("&"))
    }
}

/// The recent paths of the agent at `url` (`http://host:port`) that pass the query, as parts
/// of node `node`. Blocking.
pub fn fetch(url: &str, node: &str, query: &str) -> anyhow::Result<Vec<Part>> {
    let full = format!("{}/api/v1/paths{query}", url.trim_end_matches('/'));
    let body = ureq::get(&full)
        .config()
        .timeout_global(Some(std::time::Duration::from_secs(10)))
        .build()
        .call()
        .with_context(|| format!("asking the agent at {url} (GET {full})"))?
        .body_mut()
        .read_to_string()
        .with_context(|| format!("reading the answer of {full}"))?;
    let json: Value =
        serde_json::from_str(&body).with_context(|| format!("{full} did not answer JSON"))?;
    Ok(json["paths"]
        .as_array()
        .with_context(|| format!("{full}: no \"paths\" in the answer"))?
        .iter()
        .map(|p| Part {
            node: node.to_string(),
            path: p.clone(),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn hop(kind: &str, netns: u32, src: &str, dst: &str) -> Value {
        json!({"kind": kind, "netns": netns, "src": src, "dst": dst, "ip_id": 77, "len": 5})
    }

    #[test]
    fn a_part_handed_on_into_a_tunnel_continues_where_it_comes_out() {
        let (s, d) = ("10.205.0.1:4000", "10.205.0.2:20701");
        let a = Part {
            node: "node-a".into(),
            path: json!({"id": "a1", "verdict": "unknown", "complete": false, "sampled": true,
                "final": {"src": s, "dst": d}, "explain": "no verdict",
                "hops": [hop("send", 1, s, d), hop("xmit", 1, s, d), hop("encap", 1, s, d)]}),
        };
        let b = Part {
            node: "node-b".into(),
            path: json!({"id": "b1", "verdict": "delivered", "complete": true, "sampled": true,
                "final": {"src": s, "dst": d}, "explain": "delivered to nc",
                "hops": [hop("ingress", 2, s, d), hop("decap", 2, s, d), hop("deliver", 2, s, d)]}),
        };
        // Another datagram's arrival on node b (another IP id) is not this one's.
        let mut other = b.clone();
        other.path["hops"][0]["ip_id"] = 78.into();
        other.path["id"] = "b2".into();
        let out = stitch(&[other, a, b]);
        assert_eq!(out.len(), 2);
        let joined = out.iter().find(|p| p["id"] == "a1+b1").unwrap();
        let kinds: Vec<&str> = joined["hops"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["kind"].as_str().unwrap())
            .collect();
        assert_eq!(
            kinds,
            ["send", "xmit", "encap", "ingress", "decap", "deliver"]
        );
        assert_eq!(joined["verdict"], "delivered");
        assert_eq!(joined["nodes"], json!(["node-a", "node-b"]));
        assert_eq!(joined["hops"][0]["node"], "node-a");
        assert_eq!(joined["hops"][5]["node"], "node-b");
        assert!(joined["explain"]
            .as_str()
            .unwrap()
            .starts_with("on node-b: delivered"));
    }

    #[test]
    fn parts_of_one_node_are_not_joined() {
        let (s, d) = ("10.0.0.1:1", "10.0.0.2:2");
        let a = Part {
            node: "n".into(),
            path: json!({"id": "a", "verdict": "unknown", "hops": [hop("xmit", 1, s, d)]}),
        };
        let b = Part {
            node: "n".into(),
            path: json!({"id": "b", "verdict": "delivered", "hops": [hop("ingress", 1, s, d)]}),
        };
        assert_eq!(stitch(&[a, b]).len(), 2);
    }
}
