//! A flow in the shape of `/api/v1/flows` and `flows --json` (docs/flows.md).

use std::{collections::BTreeMap, time::SystemTime};

use serde::{Deserialize, Serialize};

use super::{rfc3339, Endpoints, NatKind, NfHook, Owner};

/// One distinct rewrite seen on a flow's datagrams.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowNat {
    pub nat: NatKind,
    pub nf_hook: NfHook,
    pub netns: u32,
    pub before: Endpoints,
    pub after: Endpoints,
    /// Learned from conntrack rather than from a datagram's NAT hop: `nf_hook` is then
    /// inferred (DNAT at output in the sender's namespace and at prerouting elsewhere, SNAT
    /// at postrouting).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub conntrack: bool,
}

/// A flow as its sender sees it, with what happened to its datagrams.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowView {
    pub orig: Endpoints,
    /// What the receiver saw on the latest delivered datagram.
    #[serde(rename = "final", default, skip_serializing_if = "Option::is_none")]
    pub last: Option<Endpoints>,
    pub netns: u32,
    /// Datagrams sent, as the wire carries them (a UDP GSO send of N segments is N).
    pub packets: u64,
    pub bytes: u64,
    /// Sends (skbs) that carried them: fewer than `packets` when the sender segments.
    #[serde(default)]
    pub sends: u64,
    /// Sends that failed (the tracepoint send hook sees the result).
    pub errors: u64,
    pub drops: BTreeMap<String, u64>,
    pub nat: Vec<FlowNat>,
    #[serde(with = "rfc3339")]
    pub first_seen: SystemTime,
    #[serde(with = "rfc3339")]
    pub last_seen: SystemTime,
    /// The sending process of the latest datagram, when a path named it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Its thread's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
    /// Its process's name (the thread-group leader's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process_name: Option<String>,
    /// Datagrams DNATed and then never delivered, repeatedly, or (in a cluster) DNATed to
    /// a backend no EndpointSlice lists: a stale conntrack entry?
    pub stale_dnat: bool,
    pub explain: String,
    /// Who owns the flow's addresses, by IP (the agent in a cluster).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k8s: Option<BTreeMap<String, Owner>>,
}
