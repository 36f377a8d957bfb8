//! Path assembly: hops to one path per datagram, joined by skb, socket and IP identity.

use std::{collections::BTreeMap, net::IpAddr, time::SystemTime};

use foldhash::HashMap;
use udptrace_common::{Hook, RecvEvent, SendEvent, SkbEvent, SKB_UNSAMPLED};

use crate::{
    clock::Clock,
    kernel::drop_reasons::DropReasons,
    model::{Endpoints, Fragment, FragmentAction, Hop, HopKind, Path, PathType, Process, Verdict},
    pipeline::{
        events::{comm, Event},
        explain::explain,
        hops::{dnat_before_drop, nat_hops, send_hop, skb_hop},
        procs::SocketOwners,
    },
};

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
        let mut hops = if self.hops.iter().any(|h| h.fragment.is_some()) {
            mark_fragmentation(self.send.into_iter().chain(self.hops))
        } else {
            // Each hop moved once, into a vector allocated once.
            let mut hops = Vec::with_capacity(self.hops.len() + 1);
            hops.extend(self.send);
            hops.extend(self.hops);
            hops
        };
        segments_of_the_send(&mut hops);
        let first = hops.first().map(|h| h.addrs);
        let last = hops.last().map(|h| h.addrs);
        let empty = Endpoints {
            src: None,
            dst: None,
        };
        let mut path = Path {
            ty: PathType::Path,
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
            k8s: None,
            nodes: Vec::new(),
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
                    action: Some(FragmentAction::Split),
                    offset: 0,
                    ..f.clone()
                }),
                (Some(f), None) => Some(Fragment {
                    action: Some(FragmentAction::Reassembled),
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
                    gso: None,
                    ..hop.clone()
                });
            }
            last.clone_from(&hop.fragment);
        }
        out.push(hop);
    }
    out
}

/// A send whose buffer the kernel carries as several datagrams (UDP GSO) says so: the send
/// hook sees only the call, the first skb hop of the same payload the segments.
fn segments_of_the_send(hops: &mut [Hop]) {
    let Some((send, rest)) = hops.split_first_mut() else {
        return;
    };
    if send.kind != HopKind::Send || send.gso.is_some() {
        return;
    }
    send.gso = rest
        .iter()
        .find(|h| h.gso.is_some() && h.len == send.len)
        .and_then(|h| h.gso);
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
    /// Boxed: the map moves its values as it grows and shrinks, and a path being assembled
    /// is several hundred bytes.
    open: BTreeMap<u64, Box<Open>>,
    // Hashed with foldhash: these maps take several lookups and updates per event, and
    // SipHash, std's default, was 5% of a full trace's CPU.
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
    /// Only the host's namespace is covered (`--netns host`): a path without a verdict
    /// may have gone where nothing watches, and its sentence says how to follow it.
    host_only: bool,
}

/// Added to the sentence of a path with no verdict when only the host's namespace is
/// covered.
const HOST_ONLY: &str = "; only the host's network namespace is watched (--netns host): without \
                         that option udptrace follows a datagram into every namespace";

impl Assembler {
    pub fn new(clock: Clock, reasons: DropReasons) -> Self {
        Self {
            clock,
            reasons,
            ..Self::default()
        }
    }

    /// Says, in the sentence of each path left without a verdict, that only the host's
    /// namespace is watched.
    pub fn host_only(mut self, yes: bool) -> Self {
        self.host_only = yes;
        self
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
            // A datagram's hops on one host: transmit, NAT, ingress, delivery, a few more
            // across namespaces. Growing the vector would copy them.
            hops: Vec::with_capacity(6),
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
        self.open.insert(self.next, Box::new(open));
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
                for hop in nat_hops(ev, &self.clock) {
                    self.push_skb_hop(&ev.skb, hop);
                }
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
        let after = Hook::from_u16(ev.header.hook).sends_after_skbs();
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
        if let Some(nat) = dnat_before_drop(ev, &self.clock) {
            self.push_skb_hop(ev, nat);
        }
        let hop = skb_hop(ev, &self.clock, &self.reasons);
        self.push_skb_hop(ev, hop);
    }

    /// A task reads socket `ev.sk`: it is the receiver of what is (and will be) queued there.
    fn push_reader(&mut self, ev: &RecvEvent) {
        let reader = Process {
            pid: ev.pid,
            tid: ev.tid,
            comm: comm(&ev.comm),
            name: comm(&ev.name),
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
        // The drop hop reads a destination NAT the datagram had where it was dropped, not
        // knowing whether the NAT hop's link reported it already: the path keeps it once.
        if let Some(nat) = hop.nat.as_ref() {
            let seen = open.hops.iter().any(|h| {
                h.netns == hop.netns
                    && h.nat.as_ref().is_some_and(|n| {
                        (n.nat, n.before, n.after) == (nat.nat, nat.before, nat.after)
                    })
            });
            if seen {
                return;
            }
        }
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
        let mut path = (*open).into_path(complete);
        if self.host_only && !path.complete {
            path.explain.push_str(HOST_ONLY);
        }
        out.push(path);
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
mod tests;
