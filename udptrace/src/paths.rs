//! Datagram paths: the hops one datagram took, in the shape of the JSON contract
//! (docs/json.md), assembled from hop events.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    time::SystemTime,
};

use serde::{Serialize, Serializer};
use udptrace_common::{
    NatEvent, RecvEvent, SendEvent, SkbEvent, AF_INET, HOOK_FENTRY_UDPV6_SENDMSG,
    HOOK_FENTRY_UDP_SENDMSG, HOOK_FEXIT_UDP_ENQUEUE, HOOK_KPROBE_NF_NAT, HOOK_KPROBE_UDPV6_SENDMSG,
    HOOK_KPROBE_UDP_SENDMSG, HOOK_NETFILTER_LINK, HOOK_TCX_INGRESS, HOOK_TC_CLSACT_INGRESS,
    HOOK_TP_KFREE_SKB, HOOK_TP_NET_DEV_START_XMIT, HOOK_TP_SK_DATA_READY, HOOK_TP_SOCK_SEND_LENGTH,
    IP_DF, IP_MF, IP_OFFSET, KIND_DROP, KIND_INGRESS, KIND_XMIT, NF_INET_FORWARD, NF_INET_LOCAL_IN,
    NF_INET_LOCAL_OUT, NF_INET_POST_ROUTING, NF_INET_PRE_ROUTING, SKB_MALFORMED, SKB_UNSAMPLED,
    TUNNEL_GENEVE, TUNNEL_VXLAN,
};

use crate::{
    clock::{rfc3339, Clock},
    events::{comm, socket_addr, Event},
    explain::explain,
    kernel::drop_reasons::DropReasons,
    procs::SocketOwners,
};

/// The name of the hook that produced an event, as shown in `hook`.
pub fn hook_name(hook: u16) -> &'static str {
    match hook {
        HOOK_FENTRY_UDP_SENDMSG => "fentry:udp_sendmsg",
        HOOK_FENTRY_UDPV6_SENDMSG => "fentry:udpv6_sendmsg",
        HOOK_KPROBE_UDP_SENDMSG => "kprobe:udp_sendmsg",
        HOOK_KPROBE_UDPV6_SENDMSG => "kprobe:udpv6_sendmsg",
        HOOK_TP_SOCK_SEND_LENGTH => "raw_tracepoint:sock:sock_send_length",
        HOOK_TP_NET_DEV_START_XMIT => "raw_tracepoint:net:net_dev_start_xmit",
        HOOK_TP_KFREE_SKB => "raw_tracepoint:skb:kfree_skb",
        HOOK_NETFILTER_LINK => "netfilter-link",
        HOOK_KPROBE_NF_NAT => "kprobe:nf_nat_manip_pkt",
        HOOK_FEXIT_UDP_ENQUEUE => "fexit:__udp_enqueue_schedule_skb",
        HOOK_TP_SK_DATA_READY => "netfilter-link+raw_tracepoint:sock:sk_data_ready",
        HOOK_TCX_INGRESS => "tcx:ingress",
        HOOK_TC_CLSACT_INGRESS => "tc:clsact-ingress",
        _ => "unknown",
    }
}

fn ts<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&rfc3339(*t))
}

fn opt_addr<S: Serializer>(a: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
    match a {
        Some(a) => s.collect_str(a),
        None => s.serialize_none(),
    }
}

/// Source and destination at one point of a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Endpoints {
    #[serde(serialize_with = "opt_addr")]
    pub src: Option<SocketAddr>,
    #[serde(serialize_with = "opt_addr")]
    pub dst: Option<SocketAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    Delivered,
    Dropped,
    /// Transmitted on a device that hands it out of this kernel: a NIC, or a tun/tap
    /// device (a VM's or a VPN's).
    LeftHost,
    Unknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Process {
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    pub cgroup: u64,
}

/// One hop of a datagram.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Hop {
    pub kind: HopKind,
    #[serde(serialize_with = "ts")]
    pub ts: SystemTime,
    pub hook: &'static str,
    pub netns: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ifname: Option<String>,
    /// The device's kind (`veth`, `bridge`, `vxlan`, `tun`, ...); absent for a device
    /// without one (NICs, loopback) and where no device is involved.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ifkind: Option<String>,
    /// The device's MTU.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(flatten)]
    pub addrs: Endpoints,
    /// Payload bytes.
    pub len: u32,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub process: Option<Process>,
    /// errno of a failed send (e.g. 1 when netfilter's OUTPUT chain dropped it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errno: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Drop reason, the kernel's name without `SKB_DROP_REASON_`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The UDP header's length is shorter than a UDP header or longer than the bytes the IP
    /// header gives it: a crafted or corrupted datagram (the kernel drops it as too small).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub malformed: bool,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub nat: Option<Nat>,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub tunnel: Option<Tunnel>,
    /// The datagram travels as IP fragments here.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fragment: Option<Fragment>,
    /// The IPv4 don't-fragment flag was set.
    #[serde(skip)]
    pub df: bool,
    /// IPv4 identification (IPv6: from a fragment header): with the addresses and length,
    /// what joins one datagram's partial paths from several nodes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip_id: Option<u16>,
    /// The receiving socket's inode (deliver hops), to find its process when no reader
    /// was seen.
    #[serde(skip)]
    pub sock_ino: u64,
}

/// The overlay a datagram travels in at a hop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Tunnel {
    /// `vxlan` or `geneve`.
    pub tunnel: &'static str,
    pub vni: u32,
    /// The tunnel packet's own addresses (node to node).
    pub outer: Endpoints,
}

/// A datagram travelling as IP fragments at one hop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Fragment {
    /// IPv4 identification (IPv6: the low 16 bits of the fragment header's).
    pub ip_id: u16,
    /// Fragments of the datagram that passed this point (this hop's included).
    pub fragments: u32,
    /// Where this hop's fragment starts in the datagram, in bytes (absent for the first,
    /// which carries the UDP header and stands for all of them).
    #[serde(skip_serializing_if = "is_zero")]
    pub offset: u32,
    /// On `fragment` hops: `split` (cut into fragments from here on) or `reassembled`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<&'static str>,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

/// What a NAT hop rewrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Nat {
    /// `dnat` or `snat`.
    pub nat: &'static str,
    /// `prerouting`, `input`, `forward`, `output`, `postrouting`.
    pub nf_hook: &'static str,
    pub before: Endpoints,
    pub after: Endpoints,
    /// The conntrack entry's original and reply tuples, when the datagram has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conntrack: Option<Conntrack>,
}

/// A conntrack entry as `conntrack -L` shows it: original and reply direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Conntrack {
    pub orig: Endpoints,
    pub reply: Endpoints,
}

/// A datagram's path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Path {
    #[serde(rename = "type")]
    pub ty: &'static str,
    pub id: String,
    #[serde(serialize_with = "ts")]
    pub ts: SystemTime,
    pub complete: bool,
    /// False for a datagram that sampling left out and that is reported anyway because it
    /// was dropped or newly NATed: the hops before the first one shown were not recorded.
    pub sampled: bool,
    pub orig: Endpoints,
    #[serde(rename = "final")]
    pub last: Endpoints,
    pub verdict: Verdict,
    /// One sentence a person can act on (see `explain`).
    pub explain: String,
    pub hops: Vec<Hop>,
}

impl Path {
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

/// The send hop of a [`SendEvent`].
pub fn send_hop(ev: &SendEvent, clock: &Clock) -> Hop {
    let (len, errno) = if ev.ret < 0 {
        // A kernel errno is small; a corrupted record may hold anything, i32::MIN included.
        (0, Some(ev.ret.saturating_neg()))
    } else {
        (ev.ret as u32, None)
    };
    Hop {
        kind: HopKind::Send,
        ts: clock.wall(ev.header.ts_ns),
        hook: hook_name(ev.header.hook),
        netns: ev.netns,
        ifname: None,
        addrs: Endpoints {
            src: socket_addr(&ev.src),
            dst: socket_addr(&ev.dst),
        },
        len,
        process: Some(Process {
            pid: ev.pid,
            tid: ev.tid,
            comm: comm(&ev.comm),
            uid: Some(ev.uid),
            cgroup: ev.cgroup,
        }),
        errno,
        error: errno.map(|e| {
            let msg = std::io::Error::from_raw_os_error(e).to_string();
            msg.split(" (os error").next().unwrap_or(&msg).to_string()
        }),
        reason: None,
        nat: None,
        tunnel: None,
        fragment: None,
        df: false,
        ip_id: None,
        malformed: false,
        sock_ino: 0,
        ifkind: None,
        mtu: None,
    }
}

/// The xmit, ingress, drop or deliver hop of an [`SkbEvent`].
pub fn skb_hop(ev: &SkbEvent, clock: &Clock, reasons: &DropReasons) -> Hop {
    let tunnel = tunnel(ev);
    let kind = match ev.header.kind {
        KIND_XMIT if tunnel.is_some() => HopKind::Encap,
        KIND_XMIT => HopKind::Xmit,
        KIND_INGRESS => HopKind::Ingress,
        KIND_DROP => HopKind::Drop,
        _ => HopKind::Deliver,
    };
    let ifname = comm(&ev.ifname);
    let ifkind = comm(&ev.ifkind);
    let has_dev = !ifname.is_empty();
    Hop {
        kind,
        ts: clock.wall(ev.header.ts_ns),
        hook: hook_name(ev.header.hook),
        netns: ev.netns,
        ifname: has_dev.then_some(ifname),
        ifkind: (!ifkind.is_empty()).then_some(ifkind),
        mtu: (has_dev && ev.mtu != 0).then_some(ev.mtu),
        addrs: Endpoints {
            src: socket_addr(&ev.src),
            dst: socket_addr(&ev.dst),
        },
        len: ev.len,
        process: (kind == HopKind::Deliver && ev.pid != 0).then(|| Process {
            pid: ev.pid,
            tid: ev.tid,
            comm: comm(&ev.comm),
            uid: None,
            cgroup: ev.cgroup,
        }),
        errno: None,
        error: None,
        reason: (kind == HopKind::Drop).then(|| {
            reasons
                .name(ev.reason)
                .map_or_else(|| format!("reason {}", ev.reason), str::to_string)
        }),
        nat: None,
        tunnel,
        fragment: fragment(ev),
        df: ev.ip_frag & IP_DF != 0,
        ip_id: ip_id(ev),
        malformed: ev.flags & SKB_MALFORMED != 0,
        sock_ino: ev.sk_ino,
    }
}

/// The datagram's IP identification, where it has one.
fn ip_id(ev: &SkbEvent) -> Option<u16> {
    (ev.src.family == AF_INET || ev.ip_frag & (IP_MF | IP_OFFSET) != 0).then_some(ev.ip_id)
}

/// The fragment an skb event carries, if the datagram travels fragmented there.
fn fragment(ev: &SkbEvent) -> Option<Fragment> {
    (ev.ip_frag & (IP_MF | IP_OFFSET) != 0).then(|| Fragment {
        ip_id: ev.ip_id,
        fragments: 1,
        offset: u32::from(ev.ip_frag & IP_OFFSET) * 8,
        action: None,
    })
}

/// The overlay of an skb event, if it was encapsulated.
fn tunnel(ev: &SkbEvent) -> Option<Tunnel> {
    let name = match ev.tunnel {
        TUNNEL_VXLAN => "vxlan",
        TUNNEL_GENEVE => "geneve",
        _ => return None,
    };
    Some(Tunnel {
        tunnel: name,
        vni: ev.vni,
        outer: Endpoints {
            src: socket_addr(&ev.outer_src),
            dst: socket_addr(&ev.outer_dst),
        },
    })
}

/// The netfilter hook's name (`enum nf_inet_hooks`).
pub fn nf_hook_name(hook: u32) -> &'static str {
    match hook {
        NF_INET_PRE_ROUTING => "prerouting",
        NF_INET_LOCAL_IN => "input",
        NF_INET_FORWARD => "forward",
        NF_INET_LOCAL_OUT => "output",
        NF_INET_POST_ROUTING => "postrouting",
        _ => "unknown",
    }
}

/// The NAT hop of a [`NatEvent`]: destination NAT happens at prerouting and output, source
/// NAT at postrouting and input.
pub fn nat_hop(ev: &NatEvent, clock: &Clock) -> Hop {
    let before = Endpoints {
        src: socket_addr(&ev.before_src),
        dst: socket_addr(&ev.before_dst),
    };
    let after = Endpoints {
        src: socket_addr(&ev.skb.src),
        dst: socket_addr(&ev.skb.dst),
    };
    let dnat = matches!(ev.nf_hook, NF_INET_PRE_ROUTING | NF_INET_LOCAL_OUT);
    let ifname = comm(&ev.skb.ifname);
    Hop {
        kind: HopKind::Nat,
        ts: clock.wall(ev.skb.header.ts_ns),
        hook: hook_name(ev.skb.header.hook),
        netns: ev.skb.netns,
        ifname: (!ifname.is_empty()).then_some(ifname),
        ifkind: None,
        mtu: None,
        fragment: None,
        df: false,
        ip_id: ip_id(&ev.skb),
        addrs: after,
        len: ev.skb.len,
        process: None,
        errno: None,
        error: None,
        reason: None,
        tunnel: tunnel(&ev.skb),
        malformed: ev.skb.flags & SKB_MALFORMED != 0,
        sock_ino: 0,
        nat: Some(Nat {
            nat: if dnat { "dnat" } else { "snat" },
            nf_hook: nf_hook_name(ev.nf_hook),
            before,
            after,
            conntrack: (ev.ct_orig_src.family != 0).then(|| Conntrack {
                orig: Endpoints {
                    src: socket_addr(&ev.ct_orig_src),
                    dst: socket_addr(&ev.ct_orig_dst),
                },
                reply: Endpoints {
                    src: socket_addr(&ev.ct_reply_src),
                    dst: socket_addr(&ev.ct_reply_dst),
                },
            }),
        }),
    }
}

/// How long a finished path waits for its send hop, which the tracepoint hook reports only
/// after the send returns (after the datagram's later hops).
const GRACE_NS: u64 = 100_000_000;
/// A path with no verdict after this long is printed as incomplete.
const IDLE_NS: u64 = 2_000_000_000;
/// Paths assembled at once; beyond this the oldest is printed as incomplete.
pub const MAX_OPEN: usize = 65_536;
/// How often open paths are scanned for idleness.
const SCAN_NS: u64 = 50_000_000;

/// A path being assembled.
#[derive(Debug)]
struct Open {
    id: String,
    /// Send hop, if seen (always printed first), then the skb hops in arrival order.
    send: Option<Hop>,
    hops: Vec<Hop>,
    /// The sending socket, from the send hop or the first skb hop.
    sock: u64,
    skb: u64,
    /// Every skb that carried (part of) the datagram, and its IP identities: forgotten
    /// when the path is printed.
    skbs: Vec<u64>,
    idents: Vec<Ident>,
    first_ns: u64,
    last_ns: u64,
    verdict: Verdict,
    /// The drop verdict came from a later fragment freed without a reason: a kernel may free
    /// a fragment's skb that way while the datagram is reassembled and delivered (6.1 frees
    /// a duplicate or a merged fragment so), so a delivery that follows still counts.
    weak_drop: bool,
    /// When the verdict was reached.
    ended_ns: Option<u64>,
    /// The receiving socket of a delivered datagram whose reader is not known yet.
    reader_sk: u64,
    /// Its first hop came flagged `SKB_UNSAMPLED`.
    unsampled: bool,
}

impl Open {
    fn into_path(self, complete: bool) -> Path {
        let sampled = !self.unsampled || self.send.is_some();
        let hops = mark_fragmentation(self.send.into_iter().chain(self.hops));
        let first = hops.first().map(|h| h.addrs);
        let last = hops.last().map(|h| h.addrs);
        let empty = Endpoints {
            src: None,
            dst: None,
        };
        let mut path = Path {
            ty: "path",
            id: self.id,
            ts: hops
                .iter()
                .map(|h| h.ts)
                .min()
                .unwrap_or(SystemTime::UNIX_EPOCH),
            complete,
            sampled,
            orig: first.unwrap_or(empty),
            last: last.unwrap_or(empty),
            verdict: self.verdict,
            explain: String::new(),
            hops,
        };
        path.explain = explain(&path);
        path
    }

    /// Ready to print: a verdict, and the send hop if the datagram was sent here.
    fn done(&self, now_ns: u64) -> bool {
        match self.ended_ns {
            Some(at) => {
                let have_send = self.send.is_some() || self.sock == 0;
                // A weak drop waits out the grace for a delivery that would overrule it.
                (have_send && self.reader_sk == 0 && !self.weak_drop)
                    || now_ns >= at.saturating_add(GRACE_NS)
            }
            None => false,
        }
    }
}

/// A later fragment freed without a reason: a kernel may free a fragment's skb that way
/// while the datagram is reassembled and delivered, so it is a drop only if no delivery follows.
fn is_weak_drop(hop: &Hop) -> bool {
    hop.kind == HopKind::Drop
        && hop.fragment.as_ref().is_some_and(|f| f.offset != 0)
        && hop.reason.as_deref() == Some("NOT_SPECIFIED")
}

/// A datagram's IP identity: source, destination and identification. Fragments share it,
/// and so do the pieces the kernel cuts a forwarded datagram into.
type Ident = (IpAddr, IpAddr, u16);

fn ident(hop: &Hop, ip_id: u16) -> Option<Ident> {
    let (src, dst) = (hop.addrs.src?.ip(), hop.addrs.dst?.ip());
    // IPv6 has an identification only in a fragment header.
    (src.is_ipv4() || hop.fragment.is_some()).then_some((src, dst, ip_id))
}

/// The same observation point: one device's transmit (or ingress) in one namespace.
fn same_point(a: &Hop, b: &Hop) -> bool {
    let stage = |k: HopKind| match k {
        HopKind::Encap => HopKind::Xmit,
        HopKind::Decap => HopKind::Ingress,
        k => k,
    };
    stage(a.kind) == stage(b.kind) && a.netns == b.netns && a.ifname == b.ifname
}

/// Whether transmitting on this hop's device hands the datagram out of this kernel: a
/// device without a kind (a NIC; not loopback) or a tun/tap device (a VM or a VPN reads it).
fn leaves_host(hop: &Hop) -> bool {
    matches!(hop.kind, HopKind::Xmit | HopKind::Encap)
        && hop.ifname.as_deref().is_some_and(|n| n != "lo")
        && hop.ifkind.as_deref().is_none_or(|k| k == "tun")
}

/// Inserts a `fragment` hop where the datagram starts travelling as fragments, and where
/// it is whole again.
fn mark_fragmentation(hops: impl Iterator<Item = Hop>) -> Vec<Hop> {
    let mut out: Vec<Hop> = Vec::new();
    let mut last: Option<Fragment> = None;
    for hop in hops {
        if hop.kind != HopKind::Send {
            let marker = match (&last, &hop.fragment) {
                (None, Some(f)) => Some(Fragment {
                    action: Some("split"),
                    offset: 0,
                    ..f.clone()
                }),
                (Some(f), None) => Some(Fragment {
                    action: Some("reassembled"),
                    ..f.clone()
                }),
                _ => None,
            };
            if let Some(fragment) = marker {
                out.push(Hop {
                    kind: HopKind::Fragment,
                    nat: None,
                    reason: None,
                    process: None,
                    fragment: Some(fragment),
                    ..hop.clone()
                });
            }
            last.clone_from(&hop.fragment);
        }
        out.push(hop);
    }
    out
}

/// Assembles hop events into one path per datagram.
///
/// A datagram is identified by its skb pointer inside this kernel; its send hop joins by the
/// sending socket (`skb->sk` on the way out). A path ends on delivery or drop; one that
/// reaches neither within [`IDLE_NS`] is printed with `complete: false`.
#[derive(Debug, Default)]
pub struct Assembler {
    clock: Clock,
    reasons: DropReasons,
    /// By id, which grows with time: the first is the oldest.
    open: BTreeMap<u64, Open>,
    by_skb: HashMap<u64, u64>,
    by_sock: HashMap<u64, u64>,
    by_ident: HashMap<Ident, u64>,
    /// Identities of printed fragmented datagrams, with when: their late fragments are not
    /// new datagrams (bounded by [`MAX_OPEN`]).
    printed_idents: HashMap<Ident, u64>,
    /// Paths finished early — pushed out by [`MAX_OPEN`], or send-only paths superseded by a
    /// later send on the same socket — waiting to be handed out (incomplete).
    pending: Vec<Path>,
    /// Paths that reached a verdict and wait (up to [`GRACE_NS`]) for their send hop or
    /// reader: the only ones `collect` looks at on every call.
    ended: Vec<u64>,
    /// Paths delivered to a socket whose reader is not known yet, by socket.
    waiting_readers: HashMap<u64, Vec<u64>>,
    /// When the open paths were last scanned for idleness.
    last_scan_ns: u64,
    /// Who reads each receiving socket, from the recv hook (bounded by [`MAX_OPEN`]).
    readers: HashMap<u64, Process>,
    /// Who holds a receiving socket, from /proc, when no reader was seen.
    owners: SocketOwners,
    next: u64,
}

impl Assembler {
    pub fn new(clock: Clock, reasons: DropReasons) -> Self {
        Self {
            clock,
            reasons,
            ..Self::default()
        }
    }

    /// Paths being assembled.
    #[cfg(test)]
    pub fn open_paths(&self) -> usize {
        self.open.len()
    }

    fn start(&mut self, ts_ns: u64, key: u64) -> u64 {
        if self.open.len() >= MAX_OPEN {
            if let Some(oldest) = self.open.keys().next().copied() {
                let mut out = std::mem::take(&mut self.pending);
                self.finish(oldest, false, &mut out);
                self.pending = out;
            }
        }
        self.next += 1;
        let open = Open {
            id: format!("{ts_ns:x}-{key:x}"),
            send: None,
            hops: Vec::new(),
            sock: 0,
            skb: 0,
            skbs: Vec::new(),
            idents: Vec::new(),
            first_ns: ts_ns,
            last_ns: ts_ns,
            verdict: Verdict::Unknown,
            weak_drop: false,
            ended_ns: None,
            reader_sk: 0,
            unsampled: false,
        };
        self.open.insert(self.next, open);
        self.next
    }

    /// Feeds one event; appends the paths it finished to `out`.
    pub fn push(&mut self, event: &Event, out: &mut Vec<Path>) {
        let now = match event {
            Event::Send(ev) => {
                self.push_send(ev);
                ev.header.ts_ns
            }
            Event::Skb(ev) => {
                self.push_skb(ev);
                ev.header.ts_ns
            }
            Event::Nat(ev) => {
                let hop = nat_hop(ev, &self.clock);
                self.push_skb_hop(&ev.skb, hop);
                ev.skb.header.ts_ns
            }
            Event::Recv(ev) => {
                self.push_reader(ev);
                ev.header.ts_ns
            }
        };
        self.collect(now, out);
    }

    fn push_send(&mut self, ev: &SendEvent) {
        let hop = send_hop(ev, &self.clock);
        // The tracepoint hook reports the send after its skb hops: join that path. (An
        // entry hook runs before them: a path waiting then is an earlier datagram's.)
        let after = ev.header.hook == HOOK_TP_SOCK_SEND_LENGTH;
        let waiting = self.by_sock.get(&ev.sock).copied().filter(|id| {
            after
                && self.open.get(id).is_some_and(|o| {
                    o.send.is_none()
                        && o.hops.first().and_then(|h| h.addrs.src).map(|a| a.port())
                            == Some(ev.src.port)
                })
        });
        let id = match waiting {
            Some(id) => id,
            None => {
                // An earlier send on this socket that never got an skb hop is over: it
                // must not collect this datagram's hops.
                if let Some(old) = self.by_sock.get(&ev.sock).copied() {
                    if self
                        .open
                        .get(&old)
                        .is_some_and(|o| o.send.is_some() && o.skb == 0)
                    {
                        let mut out = std::mem::take(&mut self.pending);
                        self.finish(old, false, &mut out);
                        self.pending = out;
                    }
                }
                let id = self.start(ev.header.ts_ns, ev.sock);
                self.by_sock.insert(ev.sock, id);
                id
            }
        };
        let open = self.open.get_mut(&id).expect("open path");
        open.sock = ev.sock;
        open.first_ns = open.first_ns.min(ev.header.ts_ns);
        open.send = Some(hop);
    }

    fn push_skb(&mut self, ev: &SkbEvent) {
        let hop = skb_hop(ev, &self.clock, &self.reasons);
        self.push_skb_hop(ev, hop);
    }

    /// A task reads socket `ev.sk`: it is the receiver of what is (and will be) queued there.
    fn push_reader(&mut self, ev: &RecvEvent) {
        let reader = Process {
            pid: ev.pid,
            tid: ev.tid,
            comm: comm(&ev.comm),
            uid: Some(ev.uid),
            cgroup: ev.cgroup,
        };
        for id in self.waiting_readers.remove(&ev.sk).unwrap_or_default() {
            let Some(open) = self.open.get_mut(&id).filter(|o| o.reader_sk == ev.sk) else {
                continue;
            };
            if let Some(hop) = open
                .hops
                .iter_mut()
                .rev()
                .find(|h| h.kind == HopKind::Deliver)
            {
                hop.process = Some(reader.clone());
            }
            open.reader_sk = 0;
        }
        if self.readers.len() >= MAX_OPEN {
            self.readers.clear();
        }
        self.readers.insert(ev.sk, reader);
    }

    /// Adds a hop seen on `ev.skb` (xmit, drop, nat, deliver) to its datagram's path.
    fn push_skb_hop(&mut self, ev: &SkbEvent, mut hop: Hop) {
        let mut reader_sk = 0;
        if hop.kind == HopKind::Deliver && hop.process.is_none() {
            match self.readers.get(&ev.sk) {
                Some(reader) => hop.process = Some(reader.clone()),
                None => {
                    // Look the holder up now, while it surely still runs (a reader blocked in
                    // recvmsg before an fexit was attached is never reported by it); a reader
                    // seen within the grace replaces it.
                    if hop.sock_ino != 0 {
                        hop.process = self.owners.owner(hop.sock_ino);
                    }
                    tracing::debug!(
                        "deliver on socket inode {}: holder {:?}",
                        hop.sock_ino,
                        hop.process.as_ref().map(|p| p.pid)
                    );
                    reader_sk = ev.sk;
                }
            }
        }
        let ident = ident(&hop, ev.ip_id);
        let later_fragment = hop.fragment.as_ref().is_some_and(|f| f.offset != 0);
        // Fragments after the first leave with the sender's socket too: they join by identity.
        let outbound = ev.sk != 0 && hop.kind != HopKind::Deliver && !later_fragment;
        // A datagram that reached its verdict is over: a new one may reuse its skb. Unless
        // the verdict was a weak drop and this is the delivery that overrules it.
        let overrules = |o: &Open| o.weak_drop && hop.kind == HopKind::Deliver;
        let known = self
            .by_skb
            .get(&ev.skb)
            .copied()
            .filter(|id| {
                self.open
                    .get(id)
                    .is_some_and(|o| o.ended_ns.is_none() || overrules(o))
            })
            .or_else(|| {
                // A fragment on an skb not seen yet: cut from a datagram already followed.
                let id = self.by_ident.get(&ident?).copied()?;
                (hop.fragment.is_some() && self.open.contains_key(&id)).then_some(id)
            });
        if known.is_some_and(|id| {
            self.open
                .get(&id)
                .is_some_and(|o| o.ended_ns.is_some() && !overrules(o))
        }) {
            // A fragment of a datagram that already reached its verdict: a piece being freed
            // with it (6.1 reports a reassembled datagram's fragments as kfree_skb
            // NOT_SPECIFIED once it is read), not news about it.
            return;
        }
        if later_fragment {
            match known {
                Some(id) => {
                    let open = self.open.get_mut(&id).expect("open path");
                    open.last_ns = open.last_ns.max(ev.header.ts_ns);
                    if !open.skbs.contains(&ev.skb) {
                        open.skbs.push(ev.skb);
                    }
                    self.by_skb.insert(ev.skb, id);
                    // Counted on the first fragment's hop at the same point; only a fragment
                    // seen alone (or dropped) is a hop of its own.
                    let first = open.hops.iter_mut().rev().find(|h| {
                        same_point(h, &hop)
                            && h.fragment.as_ref().map(|f| f.ip_id) == Some(ev.ip_id)
                    });
                    if let (Some(first), false) = (first, hop.kind == HopKind::Drop) {
                        if let Some(f) = first.fragment.as_mut() {
                            f.fragments += 1;
                        }
                        return;
                    }
                }
                // The rest of a datagram already printed.
                None if ident.is_some_and(|i| {
                    self.printed_idents
                        .get(&i)
                        .is_some_and(|at| ev.header.ts_ns.saturating_sub(*at) < IDLE_NS)
                }) =>
                {
                    return
                }
                None => {}
            }
        }
        // An entry hook (fentry/kprobe) reported the send first: the socket's first skb joins it.
        let sent = || {
            self.by_sock.get(&ev.sk).copied().filter(|id| {
                self.open
                    .get(id)
                    .is_some_and(|o| o.send.is_some() && o.skb == 0)
            })
        };
        let id = match known.or_else(|| outbound.then(sent).flatten()) {
            Some(id) => id,
            None => {
                let id = self.start(ev.header.ts_ns, ev.skb);
                self.open.get_mut(&id).expect("open path").unsampled =
                    ev.flags & SKB_UNSAMPLED != 0;
                if outbound {
                    self.by_sock.insert(ev.sk, id);
                    self.open.get_mut(&id).expect("open path").sock = ev.sk;
                }
                id
            }
        };
        self.by_skb.insert(ev.skb, id);
        if let Some(ident) = ident {
            self.by_ident.insert(ident, id);
        }
        let open = self.open.get_mut(&id).expect("open path");
        if !later_fragment {
            open.skb = ev.skb;
        }
        if !open.skbs.contains(&ev.skb) {
            open.skbs.push(ev.skb);
        }
        if let Some(ident) = ident.filter(|i| !open.idents.contains(i)) {
            open.idents.push(ident);
        }
        open.last_ns = open.last_ns.max(ev.header.ts_ns);
        // Out of the tunnel packet that carried it: the device decapsulated it.
        if hop.kind == HopKind::Ingress && hop.tunnel.is_none() {
            if let Some(carried) = open.hops.last().and_then(|h| h.tunnel.clone()) {
                hop.kind = HopKind::Decap;
                hop.tunnel = Some(carried);
            }
        }
        // The first verdict stands; a drop or delivery after leaving on a NIC is more precise.
        let open_verdict = matches!(open.verdict, Verdict::Unknown | Verdict::LeftHost);
        match hop.kind {
            HopKind::Drop if open_verdict => {
                open.verdict = Verdict::Dropped;
                open.weak_drop = is_weak_drop(&hop);
            }
            HopKind::Deliver if open_verdict || open.weak_drop => {
                if open.weak_drop {
                    // The fragment was freed as part of the reassembly, not lost: its hop
                    // would show a drop in a delivered path.
                    open.hops.retain(|h| !is_weak_drop(h));
                    open.weak_drop = false;
                }
                open.verdict = Verdict::Delivered;
            }
            _ if open.verdict == Verdict::Unknown && leaves_host(&hop) => {
                open.verdict = Verdict::LeftHost;
            }
            _ => {}
        }
        if open.verdict != Verdict::Unknown && open.ended_ns.is_none() {
            open.ended_ns = Some(ev.header.ts_ns);
            self.ended.push(id);
        }
        if reader_sk != 0 {
            open.reader_sk = reader_sk;
            let waiting = self.waiting_readers.entry(reader_sk).or_default();
            if waiting.len() < MAX_OPEN {
                waiting.push(id);
            }
        }
        open.hops.push(hop);
    }

    /// Moves finished (and timed-out, and evicted) paths to `out`. Cheap on every event:
    /// only paths with a verdict are looked at each time; the scan of every open path for
    /// idleness runs at most every [`SCAN_NS`].
    fn collect(&mut self, now_ns: u64, out: &mut Vec<Path>) {
        out.append(&mut self.pending);
        let mut ready: Vec<(u64, bool)> = Vec::new();
        let open = &self.open;
        self.ended.retain(|id| match open.get(id) {
            Some(o) if o.done(now_ns) => {
                ready.push((*id, true));
                false
            }
            Some(_) => true,
            None => false,
        });
        if now_ns.saturating_sub(self.last_scan_ns) >= SCAN_NS {
            self.last_scan_ns = now_ns;
            ready.extend(
                self.open
                    .iter()
                    .filter(|(_, o)| {
                        o.ended_ns.is_none()
                            && now_ns.saturating_sub(o.last_ns.max(o.first_ns)) >= IDLE_NS
                    })
                    .map(|(id, _)| (*id, false)),
            );
            self.printed_idents
                .retain(|_, at| now_ns.saturating_sub(*at) < IDLE_NS);
            self.waiting_readers.retain(|_, ids| {
                ids.retain(|id| open.contains_key(id));
                !ids.is_empty()
            });
        }
        ready.sort_by_key(|(id, _)| *id);
        ready.dedup_by_key(|(id, _)| *id);
        for (id, complete) in ready {
            self.finish(id, complete, out);
        }
    }

    fn finish(&mut self, id: u64, complete: bool, out: &mut Vec<Path>) {
        let Some(open) = self.open.remove(&id) else {
            return;
        };
        for skb in &open.skbs {
            if self.by_skb.get(skb) == Some(&id) {
                self.by_skb.remove(skb);
            }
        }
        // Only a fragmented datagram has pieces that may still come after it is printed;
        // remembering every datagram would grow the table with the packet rate.
        let fragmented = open.hops.iter().any(|h| h.fragment.is_some());
        for ident in &open.idents {
            if self.by_ident.get(ident) == Some(&id) {
                self.by_ident.remove(ident);
            }
            if fragmented && self.printed_idents.len() < MAX_OPEN {
                self.printed_idents.insert(*ident, open.last_ns);
            }
        }
        if self.by_sock.get(&open.sock) == Some(&id) {
            self.by_sock.remove(&open.sock);
        }
        // A path that ended with a verdict is complete even if its send hop never came
        // (a datagram from elsewhere, or a sender whose send hook is unavailable).
        let complete = complete || open.ended_ns.is_some();
        out.push(open.into_path(complete));
    }

    /// Prints what is due at `now_ns` (CLOCK_MONOTONIC), without new events.
    pub fn tick(&mut self, now_ns: u64, out: &mut Vec<Path>) {
        self.collect(now_ns, out);
    }

    /// Ends every open path (tracing stops): those without a verdict are incomplete.
    pub fn flush(&mut self, out: &mut Vec<Path>) {
        let mut ids: Vec<u64> = self.open.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            let done = self.open.get(&id).is_some_and(|o| o.ended_ns.is_some());
            self.finish(id, done, out);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Duration;

    use udptrace_common::KIND_DELIVER;

    use super::*;
    use crate::events::tests::{sample_send, sample_skb};

    fn clock() -> Clock {
        Clock::with_boot(SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000))
    }

    /// A path of one send hop (the sample nc datagram).
    pub fn sample_path() -> Path {
        let hop = send_hop(&sample_send(), &clock());
        Path {
            ty: "path",
            id: "2a-65".into(),
            ts: hop.ts,
            complete: true,
            sampled: true,
            orig: hop.addrs,
            last: hop.addrs,
            verdict: Verdict::Unknown,
            explain: "no verdict observed".into(),
            hops: vec![hop],
        }
    }

    fn reasons() -> DropReasons {
        DropReasons::from_pairs([(3, "NO_SOCKET"), (6, "SOCKET_RCVBUFF")])
    }

    const SOCK: u64 = 0xffff_8880_1234_5678;

    fn skb(kind: u16, ts: u64, sk: u64) -> Event {
        let mut ev = sample_skb(kind);
        ev.header.ts_ns = ts;
        ev.sk = sk;
        Event::Skb(ev)
    }

    fn send(ts: u64) -> Event {
        let mut ev = sample_send();
        ev.header.ts_ns = ts;
        Event::Send(ev)
    }

    #[test]
    fn send_path_matches_the_json_contract() {
        let json: serde_json::Value = serde_json::to_value(sample_path()).unwrap();
        let expected = serde_json::json!({
            "type": "path",
            "id": "2a-65",
            "ts": "2027-01-15T08:00:00.000000042Z",
            "complete": true,
            "sampled": true,
            "orig": {"src": "127.0.0.1:40112", "dst": "127.0.0.1:5353"},
            "final": {"src": "127.0.0.1:40112", "dst": "127.0.0.1:5353"},
            "verdict": "unknown",
            "explain": "no verdict observed",
            "hops": [{
                "kind": "send",
                "ts": "2027-01-15T08:00:00.000000042Z",
                "hook": "raw_tracepoint:sock:sock_send_length",
                "netns": 4026531840u32,
                "src": "127.0.0.1:40112",
                "dst": "127.0.0.1:5353",
                "len": 3,
                "pid": 100,
                "tid": 101,
                "comm": "nc",
                "uid": 1000,
                "cgroup": 7
            }]
        });
        assert_eq!(json, expected);
    }

    #[test]
    fn tracepoint_order_send_after_its_drop_joins_first() {
        let mut a = Assembler::new(clock(), reasons());
        let mut out = Vec::new();
        a.push(&skb(KIND_XMIT, 10, SOCK), &mut out);
        a.push(&skb(KIND_DROP, 20, 0), &mut out);
        assert!(out.is_empty(), "waits for the send hop");
        a.push(&send(30), &mut out);
        assert_eq!(out.len(), 1);
        let p = &out[0];
        let kinds: Vec<HopKind> = p.hops.iter().map(|h| h.kind).collect();
        assert_eq!(kinds, [HopKind::Send, HopKind::Xmit, HopKind::Drop]);
        assert_eq!(p.verdict, Verdict::Dropped);
        assert!(p.complete);
        assert_eq!(p.hops[2].reason.as_deref(), Some("NO_SOCKET"));
        assert_eq!(p.hops[1].ifname.as_deref(), Some("ut-b"));
        assert_eq!(p.ts, clock().wall(10), "the earliest hop");
        assert_eq!(a.open_paths(), 0);
    }

    #[test]
    fn entry_hook_order_send_then_skb_hops_then_delivery() {
        let mut a = Assembler::new(clock(), reasons());
        let mut out = Vec::new();
        a.push(&send(5), &mut out);
        a.push(&skb(KIND_XMIT, 10, SOCK), &mut out);
        let mut deliver = sample_skb(KIND_DELIVER);
        deliver.header.ts_ns = 40;
        deliver.sk = 0xdead; // the receiver's socket: never joins a send
        deliver.pid = 77;
        deliver.comm[..7].copy_from_slice(b"python3");
        deliver.src.port = 999; // what the receiver sees
        a.push(&Event::Skb(deliver), &mut out);
        assert_eq!(out.len(), 1);
        let p = &out[0];
        assert_eq!(p.verdict, Verdict::Delivered);
        assert_eq!(p.hops.len(), 3);
        assert_eq!(
            p.last.src.unwrap().port(),
            999,
            "final is the receiving socket's view"
        );
        assert_eq!(p.orig.src.unwrap().port(), 40112);
        let json = serde_json::to_value(&p.hops[2]).unwrap();
        assert_eq!(
            (json["pid"].as_u64(), json["comm"].as_str()),
            (Some(77), Some("python3"))
        );
        assert!(json.get("uid").is_none());
    }

    #[test]
    fn a_path_without_its_send_is_printed_after_the_grace() {
        let mut a = Assembler::new(clock(), reasons());
        let mut out = Vec::new();
        a.push(&skb(KIND_XMIT, 10, SOCK), &mut out);
        a.push(&skb(KIND_DROP, 20, 0), &mut out);
        a.tick(20 + GRACE_NS - 1, &mut out);
        assert!(out.is_empty());
        a.tick(20 + GRACE_NS, &mut out);
        assert_eq!(out.len(), 1);
        assert!(out[0].complete, "it has a verdict");
        assert_eq!(out[0].hops.len(), 2);
    }

    fn reader(ts: u64, sk: u64, pid: u32) -> Event {
        let mut comm = [0u8; 16];
        comm[..7].copy_from_slice(b"dnsmasq");
        Event::Recv(RecvEvent {
            header: udptrace_common::EventHeader {
                kind: udptrace_common::KIND_RECV,
                hook: udptrace_common::HOOK_TP_SOCK_RECV_LENGTH,
                cpu: 0,
                ts_ns: ts,
            },
            sk,
            pid,
            tid: pid,
            comm,
            ..RecvEvent::default()
        })
    }

    fn delivered(ts: u64, sk: u64) -> Event {
        let mut ev = sample_skb(KIND_DELIVER);
        ev.header.ts_ns = ts;
        ev.sk = sk;
        Event::Skb(ev)
    }

    #[test]
    fn the_reader_of_the_receiving_socket_is_named_whenever_it_reads() {
        const RX: u64 = 0xffff_8880_9999_0000;
        let mut a = Assembler::new(clock(), reasons());
        let mut out = Vec::new();
        // Read after delivery (tracepoint sock_recv_length fires after the read).
        a.push(&delivered(10, RX), &mut out);
        assert!(out.is_empty(), "waits for the reader");
        a.push(&reader(20, RX, 4242), &mut out);
        assert_eq!(out.len(), 1);
        let json = serde_json::to_value(&out[0].hops[0]).unwrap();
        assert_eq!(
            (json["pid"].as_u64(), json["comm"].as_str()),
            (Some(4242), Some("dnsmasq"))
        );
        // Known reader (fentry on recvmsg fires before): named at once.
        a.push(&delivered(30, RX), &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(out[1].hops[0].process.as_ref().map(|p| p.pid), Some(4242));
        // Nobody reads another socket: printed after the grace, without a process.
        a.push(&delivered(40, 0xabc), &mut out);
        a.tick(40 + GRACE_NS, &mut out);
        assert_eq!(out.len(), 3);
        assert_eq!(out[2].verdict, Verdict::Delivered);
        assert!(out[2].hops[0].process.is_none());
    }

    #[test]
    fn a_datagram_from_elsewhere_ends_at_once() {
        let mut a = Assembler::new(clock(), reasons());
        let mut out = Vec::new();
        a.push(&skb(KIND_DROP, 20, 0), &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].verdict, Verdict::Dropped);
    }

    #[test]
    fn no_verdict_means_incomplete_after_idle_and_on_flush() {
        let mut a = Assembler::new(clock(), reasons());
        let mut out = Vec::new();
        a.push(&send(5), &mut out);
        a.tick(5 + IDLE_NS - 1, &mut out);
        assert!(out.is_empty());
        // Idleness is looked for every SCAN_NS, not on every call.
        a.tick(5 + IDLE_NS + SCAN_NS, &mut out);
        assert_eq!(out.len(), 1);
        assert!(!out[0].complete);
        assert_eq!(out[0].verdict, Verdict::Unknown);

        a.push(&send(10 * IDLE_NS), &mut out);
        a.flush(&mut out);
        assert_eq!(out.len(), 2);
        assert!(!out[1].complete);
        assert_eq!(a.open_paths(), 0);
    }

    #[test]
    fn an_unsampled_drop_is_a_path_of_its_own_that_says_so() {
        let mut a = Assembler::new(clock(), reasons());
        let mut out = Vec::new();
        // Reported only because it was dropped, in the receiver's namespace (no socket).
        let Event::Skb(mut drop) = skb(KIND_DROP, 10, 0) else {
            unreachable!()
        };
        drop.reason = 3;
        drop.flags = SKB_UNSAMPLED;
        a.push(&Event::Skb(drop), &mut out);
        assert_eq!(out.len(), 1);
        assert!(out[0].complete && !out[0].sampled);
        assert_eq!(out[0].verdict, Verdict::Dropped);
        assert!(out[0].explain.contains("not sampled"), "{}", out[0].explain);
        // A sampled one is what it always was.
        a.push(&skb(KIND_DROP, 20, 0), &mut out);
        assert!(out[1].sampled);
    }

    #[test]
    fn an_entry_hook_send_never_joins_an_earlier_datagram() {
        let mut a = Assembler::new(clock(), reasons());
        let mut out = Vec::new();
        // An unsampled datagram's drop on its way out (its send hop was not reported)...
        let Event::Skb(mut drop) = skb(KIND_DROP, 10, SOCK) else {
            unreachable!()
        };
        drop.flags = SKB_UNSAMPLED;
        a.push(&Event::Skb(drop), &mut out);
        // ...then the next datagram's send, reported by fentry before its skb hops.
        let Event::Send(mut ev) = send(20) else {
            unreachable!()
        };
        ev.header.hook = HOOK_FENTRY_UDP_SENDMSG;
        a.push(&Event::Send(ev), &mut out);
        a.push(&skb(KIND_XMIT, 30, SOCK), &mut out);
        a.push(&skb(KIND_DELIVER, 40, 0), &mut out);
        a.tick(40 + GRACE_NS, &mut out);
        assert_eq!(out.len(), 2, "{out:#?}");
        let dropped = out.iter().find(|p| p.verdict == Verdict::Dropped).unwrap();
        assert_eq!(dropped.hops.len(), 1);
        assert!(!dropped.sampled);
        let delivered = out
            .iter()
            .find(|p| p.verdict == Verdict::Delivered)
            .unwrap();
        assert_eq!(delivered.hops[0].kind, HopKind::Send);
        assert!(delivered.sampled);
    }

    #[test]
    fn a_send_without_skb_hops_does_not_collect_the_next_datagram() {
        let mut a = Assembler::new(clock(), reasons());
        let mut out = Vec::new();
        a.push(&send(5), &mut out); // e.g. no route: no skb ever
        a.push(&send(50), &mut out);
        assert_eq!(out.len(), 1, "the first is over");
        assert!(!out[0].complete);
        a.push(&skb(KIND_XMIT, 60, SOCK), &mut out);
        a.push(&skb(KIND_DROP, 70, 0), &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(
            out[1].hops.len(),
            3,
            "the second send got its xmit and drop"
        );
        assert_eq!(out[1].ts, clock().wall(50));
    }

    #[test]
    fn skb_pointer_reuse_starts_a_new_path_after_the_first_ended() {
        let mut a = Assembler::new(clock(), reasons());
        let mut out = Vec::new();
        a.push(&skb(KIND_DROP, 20, 0), &mut out);
        a.push(&skb(KIND_DROP, 30, 0), &mut out);
        assert_eq!(out.len(), 2);
        assert_ne!(out[0].id, out[1].id);
    }

    #[test]
    fn an_encapsulated_xmit_is_an_encap_hop_with_vni_and_outer_addresses() {
        let mut ev = sample_skb(KIND_XMIT);
        ev.tunnel = TUNNEL_VXLAN;
        ev.vni = 42;
        ev.outer_src = udptrace_common::Addr {
            family: 2,
            port: 33000,
            _pad: 0,
            ip: [10, 203, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        };
        ev.outer_dst = udptrace_common::Addr {
            family: 2,
            port: 4789,
            _pad: 0,
            ip: [10, 203, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        };
        let json = serde_json::to_value(skb_hop(&ev, &clock(), &reasons())).unwrap();
        assert_eq!(json["kind"], "encap");
        assert_eq!(json["tunnel"], "vxlan");
        assert_eq!(json["vni"], 42);
        assert_eq!(
            json["outer"],
            serde_json::json!({"src": "10.203.0.1:33000", "dst": "10.203.0.2:4789"})
        );
        assert_eq!(
            json["dst"], "127.0.0.1:5353",
            "src/dst stay the inner datagram's"
        );
    }

    #[test]
    fn unknown_reason_numbers_are_shown_as_numbers() {
        let mut ev = sample_skb(KIND_DROP);
        ev.reason = 999;
        let hop = skb_hop(&ev, &clock(), &reasons());
        assert_eq!(hop.reason.as_deref(), Some("reason 999"));
    }

    #[test]
    fn failed_send_carries_errno_and_unknown_destination_is_null() {
        let mut ev = sample_send();
        ev.ret = -1;
        ev.dst = Default::default();
        let hop = send_hop(&ev, &Clock::new());
        let json = serde_json::to_value(&hop).unwrap();
        assert_eq!(json["len"], 0);
        assert_eq!(json["errno"], 1);
        assert_eq!(json["error"], "Operation not permitted");
        assert!(json["dst"].is_null());
    }

    #[test]
    fn hook_names() {
        assert_eq!(hook_name(HOOK_FENTRY_UDP_SENDMSG), "fentry:udp_sendmsg");
        assert_eq!(hook_name(HOOK_KPROBE_UDPV6_SENDMSG), "kprobe:udpv6_sendmsg");
        assert_eq!(hook_name(HOOK_TP_KFREE_SKB), "raw_tracepoint:skb:kfree_skb");
        assert_eq!(hook_name(999), "unknown");
    }

    /// An skb event on device `ifname` of kind `ifkind` (empty: a NIC).
    fn on_dev(kind: u16, ts: u64, skb: u64, ifname: &str, ifkind: &str) -> SkbEvent {
        let mut ev = sample_skb(kind);
        ev.header.ts_ns = ts;
        ev.skb = skb;
        ev.sk = 0;
        ev.ifname = [0; 16];
        ev.ifname[..ifname.len()].copy_from_slice(ifname.as_bytes());
        ev.ifkind = [0; 16];
        ev.ifkind[..ifkind.len()].copy_from_slice(ifkind.as_bytes());
        ev
    }

    #[test]
    fn arriving_out_of_a_tunnel_is_a_decap_hop() {
        let mut a = Assembler::new(clock(), reasons());
        let mut out = Vec::new();
        let mut encap = on_dev(KIND_XMIT, 10, 7, "veth-a", "veth");
        encap.tunnel = TUNNEL_VXLAN;
        encap.vni = 42;
        encap.outer_src = sample_send().src;
        encap.outer_dst = sample_send().dst;
        let mut underlay = encap;
        underlay.header.kind = KIND_INGRESS;
        underlay.header.ts_ns = 11;
        a.push(&Event::Skb(encap), &mut out);
        a.push(&Event::Skb(underlay), &mut out);
        a.push(
            &Event::Skb(on_dev(KIND_INGRESS, 12, 7, "vxlan0", "vxlan")),
            &mut out,
        );
        a.push(&Event::Skb(on_dev(KIND_DELIVER, 13, 7, "", "")), &mut out);
        a.tick(13 + GRACE_NS, &mut out);
        let kinds: Vec<HopKind> = out[0].hops.iter().map(|h| h.kind).collect();
        assert_eq!(
            kinds,
            [
                HopKind::Encap,
                HopKind::Ingress,
                HopKind::Decap,
                HopKind::Deliver
            ]
        );
        let decap = &out[0].hops[2];
        assert_eq!(decap.tunnel.as_ref().map(|t| t.vni), Some(42));
        assert_eq!(decap.ifkind.as_deref(), Some("vxlan"));
    }

    #[test]
    fn transmitting_on_a_nic_or_tap_leaves_the_host_but_a_veth_does_not() {
        for (ifname, ifkind, verdict) in [
            ("eth0", "", Verdict::LeftHost),
            ("tap0", "tun", Verdict::LeftHost),
            ("veth0", "veth", Verdict::Unknown),
            ("lo", "", Verdict::Unknown),
        ] {
            let mut a = Assembler::new(clock(), reasons());
            let mut out = Vec::new();
            a.push(
                &Event::Skb(on_dev(KIND_XMIT, 10, 7, ifname, ifkind)),
                &mut out,
            );
            a.tick(10 + IDLE_NS, &mut out);
            assert_eq!(out[0].verdict, verdict, "{ifname}");
            assert_eq!(out[0].complete, verdict == Verdict::LeftHost, "{ifname}");
        }
    }

    /// Fragment `n` (0-based) of a 3000-byte datagram cut at 1480 bytes, on skb `skb`.
    fn fragment(kind: u16, ts: u64, skb: u64, n: u16, dev: (&str, &str)) -> SkbEvent {
        let mut ev = on_dev(kind, ts, skb, dev.0, dev.1);
        ev.ip_id = 0x4242;
        ev.ip_frag = (n * 185) | if n < 2 { IP_MF } else { 0 };
        if n > 0 {
            ev.src.port = 0;
            ev.dst.port = 0;
            ev.len = 1480;
        } else {
            ev.len = 3000;
        }
        ev
    }

    #[test]
    fn fragments_join_their_datagram_and_are_counted_not_listed() {
        let mut a = Assembler::new(clock(), reasons());
        let mut out = Vec::new();
        // Cut at the sender: the first fragment is the datagram's own skb, the others new.
        let pod = ("eth0", "veth");
        let mut first = fragment(KIND_XMIT, 10, 7, 0, pod);
        first.sk = SOCK;
        a.push(&send(5), &mut out);
        a.push(&Event::Skb(first), &mut out);
        for n in 1..3 {
            let mut ev = fragment(KIND_XMIT, 10 + u64::from(n), 7 + u64::from(n), n, pod);
            ev.sk = SOCK;
            a.push(&Event::Skb(ev), &mut out);
        }
        // Cut again on a smaller MTU by a router: every piece is a new skb.
        let vx = ("vxlan0", "vxlan");
        for (i, n) in [0u16, 1, 2].into_iter().enumerate() {
            a.push(
                &Event::Skb(fragment(KIND_XMIT, 20 + i as u64, 100 + i as u64, n, vx)),
                &mut out,
            );
        }
        // Reassembled at the receiver into the last fragment's skb, then delivered.
        let mut whole = on_dev(KIND_DELIVER, 30, 102, "", "");
        whole.ip_id = 0x4242;
        whole.len = 3000;
        a.push(&Event::Skb(whole), &mut out);
        a.tick(30 + GRACE_NS, &mut out);
        assert_eq!(out.len(), 1, "one datagram: {out:#?}");
        let p = &out[0];
        assert_eq!(p.verdict, Verdict::Delivered);
        let kinds: Vec<HopKind> = p.hops.iter().map(|h| h.kind).collect();
        assert_eq!(
            kinds,
            [
                HopKind::Send,
                HopKind::Fragment,
                HopKind::Xmit,
                HopKind::Xmit,
                HopKind::Fragment,
                HopKind::Deliver
            ]
        );
        let counts: Vec<u32> = p
            .hops
            .iter()
            .filter_map(|h| h.fragment.as_ref().map(|f| f.fragments))
            .collect();
        assert_eq!(counts, [3, 3, 3, 3]);
        assert_eq!(p.hops[1].fragment.as_ref().unwrap().action, Some("split"));
        assert_eq!(
            p.hops[4].fragment.as_ref().unwrap().action,
            Some("reassembled")
        );
        assert!(p.explain.contains("3 IP fragments"), "{}", p.explain);
        assert_eq!(a.open_paths(), 0);
        assert!(
            a.by_skb.is_empty() && a.by_ident.is_empty(),
            "nothing left behind"
        );
        // A straggler of the printed datagram is not a new one.
        a.push(
            &Event::Skb(fragment(KIND_INGRESS, 40, 200, 2, vx)),
            &mut out,
        );
        a.flush(&mut out);
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn fragments_freed_after_the_delivery_do_not_make_it_a_drop() {
        let mut a = Assembler::new(clock(), reasons());
        let mut out = Vec::new();
        let dev = ("ut-b", "veth");
        a.push(&Event::Skb(fragment(KIND_INGRESS, 10, 1, 0, dev)), &mut out);
        a.push(&Event::Skb(fragment(KIND_INGRESS, 11, 2, 1, dev)), &mut out);
        a.push(&Event::Skb(fragment(KIND_INGRESS, 12, 3, 2, dev)), &mut out);
        let mut whole = on_dev(KIND_DELIVER, 13, 3, "", "");
        whole.ip_id = 0x4242;
        a.push(&Event::Skb(whole), &mut out);
        // Linux 6.1 frees the frag_list of a read datagram through kfree_skb.
        let mut freed = fragment(KIND_DROP, 14, 1, 1, ("", ""));
        freed.netns = 0;
        freed.reason = 2;
        a.push(&Event::Skb(freed), &mut out);
        a.flush(&mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].verdict, Verdict::Delivered, "{:#?}", out[0]);
    }

    /// Seen on Linux 6.1: a later fragment freed without a reason (a duplicate, or one
    /// merged during reassembly) before the reassembled datagram is delivered.
    #[test]
    fn a_later_fragment_freed_without_a_reason_before_the_delivery_is_no_drop() {
        let reasons = DropReasons::from_pairs([(2, "NOT_SPECIFIED"), (3, "NO_SOCKET")]);
        let dev = ("ut-b", "veth");
        for (reason, delivered) in [(2, true), (3, false)] {
            let mut a = Assembler::new(clock(), reasons.clone());
            let mut out = Vec::new();
            for n in 0..3 {
                let ev = fragment(KIND_INGRESS, 10 + u64::from(n), 1 + u64::from(n), n, dev);
                a.push(&Event::Skb(ev), &mut out);
            }
            let mut freed = fragment(KIND_DROP, 14, 2, 1, ("", ""));
            freed.netns = 0;
            freed.reason = reason;
            a.push(&Event::Skb(freed), &mut out);
            let mut whole = on_dev(KIND_DELIVER, 15, 3, "", "");
            whole.ip_id = 0x4242;
            a.push(&Event::Skb(whole), &mut out);
            a.flush(&mut out);
            // After a real drop the delivery cannot be this datagram's: it starts its own.
            assert_eq!(out.len(), if delivered { 1 } else { 2 }, "{out:#?}");
            let want = if delivered {
                Verdict::Delivered
            } else {
                Verdict::Dropped
            };
            assert_eq!(out[0].verdict, want, "reason {reason}: {:#?}", out[0]);
            // A delivered datagram shows no drop; a dropped one shows where.
            let drops = out[0]
                .hops
                .iter()
                .filter(|h| h.kind == HopKind::Drop)
                .count();
            assert_eq!(drops, usize::from(!delivered), "{:#?}", out[0]);
        }
    }
}
