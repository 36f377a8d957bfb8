//! A datagram's path: the hops one datagram took, in the shape of the JSON contract
//! (docs/json.md).

use std::{collections::BTreeMap, net::SocketAddr, time::SystemTime};

use serde::{Deserialize, Serialize};
use udptrace_common::Hook;

use super::{hook_name, rfc3339, Owner};

/// Source and destination at one point of a path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoints {
    pub src: Option<SocketAddr>,
    pub dst: Option<SocketAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    Delivered,
    Dropped,
    /// Transmitted on a device that hands it out of this kernel: a NIC, or a tun/tap
    /// device (a VM's or a VPN's).
    LeftHost,
    Unknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HopKind {
    Send,
    Nat,
    Xmit,
    /// tc ingress: the datagram arrived on a device.
    Ingress,
    /// A device transmitted the datagram inside a VXLAN/Geneve packet.
    Encap,
    /// The datagram arrived on a device out of the VXLAN/Geneve packet that carried it.
    Decap,
    /// The datagram was cut into IP fragments, or put back together (a marker before the
    /// hop where that was first seen).
    Fragment,
    Drop,
    Deliver,
}

impl HopKind {
    /// The name in the JSON contract and the human view.
    pub fn name(self) -> &'static str {
        match self {
            Self::Send => "send",
            Self::Nat => "nat",
            Self::Xmit => "xmit",
            Self::Ingress => "ingress",
            Self::Encap => "encap",
            Self::Decap => "decap",
            Self::Fragment => "fragment",
            Self::Drop => "drop",
            Self::Deliver => "deliver",
        }
    }
}

/// Who sent or received, on send and deliver hops.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Process {
    pub pid: u32,
    pub tid: u32,
    /// The thread's name (what the kernel calls `comm`).
    pub comm: String,
    /// The process's name: its thread-group leader's `comm` (`dig`, where the thread
    /// sending is `isc-net-0000`). Empty from an older agent.
    #[serde(
        rename = "process_name",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    pub cgroup: u64,
}

impl Process {
    /// The process's name, or the thread's where it is not known.
    pub fn name(&self) -> &str {
        if self.name.is_empty() {
            &self.comm
        } else {
            &self.name
        }
    }

    /// The thread's name where it differs from the process's.
    pub fn thread(&self) -> Option<&str> {
        (!self.name.is_empty() && self.name != self.comm).then_some(self.comm.as_str())
    }
}

/// Several datagrams in one skb: `segments` of `size` payload bytes each (the last may be
/// shorter), as `skb_shared_info` has them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gso {
    pub size: u16,
    pub segments: u16,
    /// On a delivery: the receiving socket reads them as one buffer (`UDP_GRO` on, `true`;
    /// the kernel counts one datagram in) or one by one (`false`); absent where unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_as_one: Option<bool>,
}

/// One hop of a datagram.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hop {
    pub kind: HopKind,
    #[serde(with = "rfc3339")]
    pub ts: SystemTime,
    #[serde(with = "hook_name")]
    pub hook: Hook,
    pub netns: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ifname: Option<String>,
    /// The device's kind (`veth`, `bridge`, `vxlan`, `tun`, ...); absent for a device
    /// without one (NICs, loopback) and where no device is involved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ifkind: Option<String>,
    /// The device's MTU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(flatten)]
    pub addrs: Endpoints,
    /// Payload bytes.
    pub len: u32,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub process: Option<Process>,
    /// errno of a failed send (e.g. 1 when netfilter's OUTPUT chain dropped it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errno: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Drop reason, the kernel's name without `SKB_DROP_REASON_`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The UDP header's length is shorter than a UDP header or longer than the bytes the IP
    /// header gives it: a crafted or corrupted datagram (the kernel drops it as too small).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub malformed: bool,
    /// Boxed: most hops have none, and a hop is moved several times on its way to the
    /// output (a ~260-byte field inline made every hop ~770 bytes).
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub nat: Option<Box<Nat>>,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub tunnel: Option<Tunnel>,
    /// The datagram travels as IP fragments here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fragment: Option<Fragment>,
    /// The skb stands for several datagrams here (UDP GSO before the kernel segments it,
    /// or GRO after it coalesced them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gso: Option<Gso>,
    /// The IPv4 don't-fragment flag was set.
    #[serde(skip)]
    pub df: bool,
    /// IPv4 identification (IPv6: from a fragment header): with the addresses and length,
    /// what joins one datagram's partial paths from several nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_id: Option<u16>,
    /// The receiving socket's inode (deliver hops), to find its process when no reader
    /// was seen.
    #[serde(skip)]
    pub sock_ino: u64,
    /// The pod container of the hop's process (the agent in a cluster).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k8s: Option<Box<Owner>>,
    /// The node (agent) that saw the hop, in a path stitched from several nodes' parts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// The overlay protocol carrying a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TunnelKind {
    Vxlan,
    Geneve,
}

impl TunnelKind {
    /// `vxlan` or `geneve`, as in the JSON contract.
    pub fn name(self) -> &'static str {
        match self {
            Self::Vxlan => "vxlan",
            Self::Geneve => "geneve",
        }
    }
}

/// The overlay a datagram travels in at a hop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tunnel {
    pub tunnel: TunnelKind,
    pub vni: u32,
    /// The tunnel packet's own addresses (node to node).
    pub outer: Endpoints,
}

/// What a `fragment` hop marks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FragmentAction {
    /// Cut into fragments from here on.
    Split,
    /// Whole again.
    Reassembled,
}

/// A datagram travelling as IP fragments at one hop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fragment {
    /// IPv4 identification (IPv6: the low 16 bits of the fragment header's).
    pub ip_id: u16,
    /// Fragments of the datagram that passed this point (this hop's included).
    pub fragments: u32,
    /// Where this hop's fragment starts in the datagram, in bytes (absent for the first,
    /// which carries the UDP header and stands for all of them).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub offset: u32,
    /// On `fragment` hops only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<FragmentAction>,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

/// Which address a NAT rewrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NatKind {
    Dnat,
    Snat,
}

impl NatKind {
    /// `dnat` or `snat`, as in the JSON contract and the metrics' labels.
    pub fn name(self) -> &'static str {
        match self {
            Self::Dnat => "dnat",
            Self::Snat => "snat",
        }
    }

    /// The address this kind of NAT rewrites (the source for SNAT, else the destination),
    /// before and after.
    pub fn rewritten(
        self,
        before: Endpoints,
        after: Endpoints,
    ) -> (Option<SocketAddr>, Option<SocketAddr>) {
        match self {
            Self::Snat => (before.src, after.src),
            Self::Dnat => (before.dst, after.dst),
        }
    }
}

/// The netfilter hook (`enum nf_inet_hooks`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NfHook {
    Prerouting,
    Input,
    Forward,
    Output,
    Postrouting,
    Unknown,
}

impl NfHook {
    /// The hook of the kernel's number.
    pub fn from_kernel(hook: u32) -> Self {
        use udptrace_common::{
            NF_INET_FORWARD, NF_INET_LOCAL_IN, NF_INET_LOCAL_OUT, NF_INET_POST_ROUTING,
            NF_INET_PRE_ROUTING,
        };
        match hook {
            NF_INET_PRE_ROUTING => Self::Prerouting,
            NF_INET_LOCAL_IN => Self::Input,
            NF_INET_FORWARD => Self::Forward,
            NF_INET_LOCAL_OUT => Self::Output,
            NF_INET_POST_ROUTING => Self::Postrouting,
            _ => Self::Unknown,
        }
    }

    /// The name in the JSON contract and the metrics' labels.
    pub fn name(self) -> &'static str {
        match self {
            Self::Prerouting => "prerouting",
            Self::Input => "input",
            Self::Forward => "forward",
            Self::Output => "output",
            Self::Postrouting => "postrouting",
            Self::Unknown => "unknown",
        }
    }
}

/// What a NAT hop rewrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nat {
    pub nat: NatKind,
    pub nf_hook: NfHook,
    pub before: Endpoints,
    pub after: Endpoints,
    /// The conntrack entry's original and reply tuples, when the datagram has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conntrack: Option<Conntrack>,
}

impl Nat {
    /// When this rewrite is conntrack undoing, on a reply, what the request's NAT did: the
    /// request's rewrite (its kind, and the address before → after). A reply's packet
    /// comes from the request's translated destination (the reply tuple's source) and, once
    /// restored, goes to the request's sender (the original tuple's source).
    pub fn undoes(&self) -> Option<(NatKind, Option<SocketAddr>, Option<SocketAddr>)> {
        let ct = self.conntrack?;
        let reply = self.before.src == ct.reply.src
            && self.after.dst == ct.orig.src
            && ct.orig.src != ct.reply.src;
        if !reply {
            return None;
        }
        Some(match self.nat {
            // A reply's source put back: the request's destination had been rewritten.
            NatKind::Snat => (NatKind::Dnat, ct.orig.dst, ct.reply.src),
            // A reply's destination put back: the request's source had been rewritten.
            NatKind::Dnat => (NatKind::Snat, ct.orig.src, ct.reply.dst),
        })
    }
}

/// A conntrack entry as `conntrack -L` shows it: original and reply direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conntrack {
    pub orig: Endpoints,
    pub reply: Endpoints,
}

/// The `type` of a path record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PathType {
    #[default]
    Path,
}

/// A datagram's path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Path {
    #[serde(rename = "type", default)]
    pub ty: PathType,
    pub id: String,
    #[serde(with = "rfc3339")]
    pub ts: SystemTime,
    pub complete: bool,
    /// False for a datagram that sampling left out and that is reported anyway because it
    /// was dropped or newly NATed: the hops before the first one shown were not recorded.
    pub sampled: bool,
    pub orig: Endpoints,
    #[serde(rename = "final")]
    pub last: Endpoints,
    pub verdict: Verdict,
    /// One sentence a person can act on (see `pipeline::explain`).
    pub explain: String,
    pub hops: Vec<Hop>,
    /// Who owns the path's addresses, by IP (the agent in a cluster).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k8s: Option<BTreeMap<String, Owner>>,
    /// The nodes whose parts were joined, in order (stitched paths).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
}

impl Path {
    /// The path without what the contract leaves out (the don't-fragment flag, socket
    /// inodes): what its JSON reads back as.
    pub fn without_internals(&self) -> Self {
        let mut path = self.clone();
        for hop in &mut path.hops {
            hop.df = false;
            hop.sock_ino = 0;
        }
        path
    }

    /// Every address on the path (each hop's source and destination, and what a NAT hop
    /// rewrote).
    pub fn addresses(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.hops
            .iter()
            .flat_map(|h| {
                let before = h.nat.as_ref().map(|n| n.before);
                [
                    h.addrs.src,
                    h.addrs.dst,
                    before.and_then(|b| b.src),
                    before.and_then(|b| b.dst),
                ]
            })
            .flatten()
    }
}
