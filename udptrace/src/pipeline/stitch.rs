//! One datagram across nodes: joins the partial paths several agents saw (each covering its
//! node's namespaces) into one end-to-end path. A part that ends by handing the datagram on
//! (a transmit, into a tunnel or out of a NIC) continues in another node's part that begins
//! with the datagram arriving (ingress, decap) with the same addresses, IP identification
//! and length — the inner datagram's, for a tunnel, and the same VNI. Nothing is added to packets; there is no
//! central store: `udptrace path` and `/api/v1/paths/stitched` ask the agents.

use std::{collections::HashMap, net::SocketAddr};

use crate::{
    model::{Hop, HopKind, Path, Verdict},
    pipeline::explain::rewrite,
};

/// A partial path and the node (agent) that saw it.
#[derive(Debug, Clone)]
pub struct Part {
    pub node: String,
    pub path: Path,
}

/// Source, destination, IP identification, length, and the VNI of the tunnel carrying it.
/// (Not the UDP checksum: with checksum offload the sending side sees a partial sum where
/// the receiving node sees the final one. Not the outer tuple: an underlay NAT may rewrite
/// it between nodes.)
type Key = (SocketAddr, SocketAddr, u16, u32, Option<u32>);

fn key(hop: &Hop) -> Option<Key> {
    Some((
        hop.addrs.src?,
        hop.addrs.dst?,
        hop.ip_id?,
        hop.len,
        hop.tunnel.as_ref().map(|t| t.vni),
    ))
}

fn hops(path: &Path) -> impl DoubleEndedIterator<Item = &Hop> {
    path.hops.iter().filter(|h| h.kind != HopKind::Fragment)
}

/// Where a part hands the datagram on, if it does (no verdict here, or it left the host).
fn exit(path: &Path) -> Option<Key> {
    if matches!(path.verdict, Verdict::Delivered | Verdict::Dropped) {
        return None;
    }
    let hop = hops(path).next_back()?;
    matches!(hop.kind, HopKind::Xmit | HopKind::Encap)
        .then(|| key(hop))
        .flatten()
}

/// Where a part takes the datagram over, if it starts with its arrival.
fn entry(path: &Path) -> Option<Key> {
    let hop = hops(path).next()?;
    matches!(hop.kind, HopKind::Ingress | HopKind::Decap)
        .then(|| key(hop))
        .flatten()
}

/// Joins `parts` into end-to-end paths (a part nothing continues stays as it is, with its
/// node named), in the order of their first part.
pub fn stitch(parts: &[Part]) -> Vec<Path> {
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
fn merge(chain: &[&Part]) -> Path {
    let first = &chain[0].path;
    let last = &chain[chain.len() - 1];
    let mut out = first.clone();
    out.hops = Vec::new();
    let mut rewrites = Vec::new();
    for (i, part) in chain.iter().enumerate() {
        out.hops.extend(part.path.hops.iter().map(|hop| Hop {
            node: Some(part.node.clone()),
            ..hop.clone()
        }));
        if i + 1 == chain.len() {
            continue;
        }
        for hop in hops(&part.path).filter(|h| h.kind == HopKind::Nat) {
            if let Some(r) = rewrite(hop) {
                rewrites.push(format!("on {}: {r}", part.node));
            }
        }
    }
    out.last = last.path.last;
    out.verdict = last.path.verdict;
    out.complete = last.path.complete;
    out.nodes = chain.iter().map(|p| p.node.clone()).collect();
    out.id = chain
        .iter()
        .map(|p| p.path.id.as_str())
        .collect::<Vec<_>>()
        .join("+");
    let mut explain = last.path.explain.clone();
    if chain.len() > 1 {
        explain = format!("on {}: {explain}", last.node);
    }
    for r in rewrites {
        explain.push_str("; earlier, ");
        explain.push_str(&r);
    }
    out.explain = explain;
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::hops::tests::sample_path;

    fn hop(kind: HopKind, netns: u32, src: &str, dst: &str) -> Hop {
        let mut h = sample_path().hops.remove(0);
        h.kind = kind;
        h.netns = netns;
        h.addrs.src = Some(src.parse().unwrap());
        h.addrs.dst = Some(dst.parse().unwrap());
        h.ip_id = Some(77);
        h.len = 5;
        h
    }

    fn part(node: &str, id: &str, verdict: Verdict, explain: &str, hops: Vec<Hop>) -> Part {
        let mut path = sample_path();
        path.id = id.into();
        path.verdict = verdict;
        path.explain = explain.into();
        path.hops = hops;
        Part {
            node: node.into(),
            path,
        }
    }

    #[test]
    fn a_part_handed_on_into_a_tunnel_continues_where_it_comes_out() {
        use HopKind::*;
        let (s, d) = ("10.205.0.1:4000", "10.205.0.2:20701");
        let a = part(
            "node-a",
            "a1",
            Verdict::Unknown,
            "no verdict",
            vec![hop(Send, 1, s, d), hop(Xmit, 1, s, d), hop(Encap, 1, s, d)],
        );
        let b = part(
            "node-b",
            "b1",
            Verdict::Delivered,
            "delivered to nc",
            vec![
                hop(Ingress, 2, s, d),
                hop(Decap, 2, s, d),
                hop(Deliver, 2, s, d),
            ],
        );
        // Another datagram's arrival on node b (another IP id) is not this one's.
        let mut other = b.clone();
        other.path.hops[0].ip_id = Some(78);
        other.path.id = "b2".into();
        let out = stitch(&[other, a, b]);
        assert_eq!(out.len(), 2);
        let joined = out.iter().find(|p| p.id == "a1+b1").unwrap();
        let kinds: Vec<HopKind> = joined.hops.iter().map(|h| h.kind).collect();
        assert_eq!(kinds, [Send, Xmit, Encap, Ingress, Decap, Deliver]);
        assert_eq!(joined.verdict, Verdict::Delivered);
        assert_eq!(joined.nodes, ["node-a", "node-b"]);
        assert_eq!(joined.hops[0].node.as_deref(), Some("node-a"));
        assert_eq!(joined.hops[5].node.as_deref(), Some("node-b"));
        assert!(joined.explain.starts_with("on node-b: delivered"));
        // The stitched path is the contract too: it reads back as it was written.
        let json = serde_json::to_value(joined).unwrap();
        assert_eq!(json["nodes"], serde_json::json!(["node-a", "node-b"]));
        assert_eq!(json["hops"][0]["node"], "node-a");
        let back: Path = serde_json::from_value(json).unwrap();
        assert_eq!(&back, joined);
    }

    #[test]
    fn parts_of_one_node_are_not_joined() {
        let (s, d) = ("10.0.0.1:1", "10.0.0.2:2");
        let a = part(
            "n",
            "a",
            Verdict::Unknown,
            "",
            vec![hop(HopKind::Xmit, 1, s, d)],
        );
        let b = part(
            "n",
            "b",
            Verdict::Delivered,
            "",
            vec![hop(HopKind::Ingress, 1, s, d)],
        );
        assert_eq!(stitch(&[a, b]).len(), 2);
    }
}
