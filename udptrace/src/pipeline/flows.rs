//! Per-flow aggregation: exact datagram and byte counts from the kernel's `FLOWS` map, and
//! what the flow's paths tell — NAT before→after, drops by reason, the source the receiver
//! sees, an explanation — plus totals that only grow, for Prometheus.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::SocketAddr,
};

use udptrace_common::{DropKey, DropStats, FlowKey, FlowStats};

use crate::{
    clock::Clock,
    kernel::drop_reasons::DropReasons,
    model::{Endpoints, FlowNat, FlowView, HopKind, NatKind, NfHook, Path, Verdict},
    pipeline::{
        conntrack::{Connection, CtEvent},
        events::socket_addr,
        filter::Filter,
    },
};

/// A flow as its sender sees it: namespace, own address, the destination it named.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowId {
    pub netns: u32,
    pub src: Option<SocketAddr>,
    pub dst: Option<SocketAddr>,
}

impl FlowId {
    pub fn from_kernel(key: &FlowKey) -> Self {
        Self {
            netns: key.netns,
            src: socket_addr(&key.src),
            dst: socket_addr(&key.dst),
        }
    }

    /// The flow a path belongs to: its send hop's. A datagram not sent here has none.
    pub fn of_path(path: &Path) -> Option<Self> {
        let send = path.hops.first().filter(|h| h.kind == HopKind::Send)?;
        Some(Self {
            netns: send.netns,
            src: send.addrs.src,
            dst: send.addrs.dst,
        })
    }
}

/// Distinct rewrites kept per flow (a flow normally has one or two).
const MAX_NAT: usize = 8;
/// How long a flow seen only in a path waits for the kernel's table to show it.
const PATH_ONLY_NS: u64 = 2_000_000_000;
/// Datagrams in a row DNATed and then not delivered before a flow is called a black hole.
const STALE_AFTER: u32 = 3;

#[derive(Debug, Default)]
struct Flow {
    /// The kernel's key, once the kernel map has shown it (to remove it on expiry).
    kernel: Option<FlowKey>,
    /// Counts as last read from the kernel.
    counted: FlowStats,
    drops: BTreeMap<String, u64>,
    nat: Vec<FlowNat>,
    last: Option<Endpoints>,
    /// The latest sender: pid, thread's name, process's name.
    process: Option<(u32, String, String)>,
    explain: String,
    /// DNATed datagrams in a row with no delivery.
    undelivered_dnat: u32,
    /// Counting mode's view of the same ([`FlowTable::judge_conntrack_dnat`]).
    ct_dnat: CtDnat,
    /// CLOCK_MONOTONIC ns of the latest thing seen (a count or a path).
    active_ns: u64,
    first_path_ns: u64,
}

/// Whether a flow DNATed by conntrack loses every datagram, from counts alone (no path tells
/// of deliveries): the datagrams not dropped (`packets − drops`) stop growing while drops
/// go on. A datagram's drop lands a read after its count at most, so only growth in two
/// reads in a row means some got through.
#[derive(Debug, Default, Clone, Copy)]
struct CtDnat {
    /// `packets − drops` when datagrams last got through.
    kept: u64,
    /// The flow's drops then.
    drops: u64,
    /// `packets − drops` grew in the last read.
    grew: bool,
}

/// Where the NAT translation totals come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NatTotals {
    /// One per rewrite a path showed (every datagram traced: exact).
    Paths,
    /// The NAT programs' own counters ([`FlowTable::set_nat_totals`]).
    Kernel,
    /// Every datagram of a flow whose rewrite conntrack told of
    /// ([`FlowTable::count_nat_by_flows`]).
    Flows,
}

/// Counts that only grow, by label, for the metrics.
#[derive(Debug, Default, Clone)]
pub struct Totals {
    /// By sender namespace.
    pub datagrams: BTreeMap<u32, u64>,
    pub bytes: BTreeMap<u32, u64>,
    pub errors: BTreeMap<u32, u64>,
    /// By (reason, namespace where dropped).
    pub drops: BTreeMap<(String, u32), u64>,
    /// Drops the kernel counted but did not report as a hop (its per-key event limit).
    pub drops_held: u64,
    /// By (netfilter hook, dnat/snat): from the kernel's counters when given
    /// ([`FlowTable::set_nat_totals`]), else from the paths seen.
    pub nat: BTreeMap<(&'static str, &'static str), u64>,
    /// Flows the kernel's LRU map evicted (created, not alive, not expired by us).
    pub evictions: u64,
    /// Flows expired after `idle`.
    pub expired: u64,
    /// Rewritten connections conntrack told of that the table had no room for.
    pub conntrack_full: u64,
}

/// Every flow seen, bounded by the kernel map's size and expiry after idleness.
#[derive(Debug)]
pub struct FlowTable {
    clock: Clock,
    idle_ns: u64,
    flows: HashMap<FlowId, Flow>,
    totals: Totals,
    /// Flows removed from the kernel's map by [`FlowTable::expire`].
    removed: u64,
    max_flows: usize,
    /// The flow of each (namespace, source, destination) its sampled paths showed at some
    /// hop: a datagram sampling left out, reported from its drop or NAT hop on, is
    /// counted in its flow through it.
    seen_at: HashMap<HopTuple, FlowId>,
    /// Where `totals.nat` comes from.
    nat_totals: NatTotals,
    /// Each drop key's counts as last read, for what is new in the next read.
    drops_read: HashMap<DropKey, DropStats>,
    /// Rewritten UDP connections conntrack holds now, by namespace and original tuple, each
    /// with the flow it was found to belong to.
    conns: HashMap<(u32, SocketAddr, SocketAddr), Tracked>,
    /// The flow of each tuple its datagrams have after a rewrite conntrack told of (in any
    /// namespace: the next namespace's conntrack sees them so, and drops there too).
    via: HashMap<(SocketAddr, SocketAddr), FlowId>,
    /// News since [`FlowTable::take_news`]: a flow's first drop with a reason (or a reason
    /// new in a namespace), a rewrite new to a flow.
    news: News,
}

/// What [`FlowTable::take_news`] tells: reasons to look closer (open a path window).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct News {
    pub drop: bool,
    pub nat: bool,
}

/// A connection conntrack told of.
#[derive(Debug)]
struct Tracked {
    conn: Connection,
    /// The flow it was applied to; `None` until that flow is known here.
    flow: Option<FlowId>,
}

/// A datagram's addresses at one hop, with the hop's namespace.
type HopTuple = (u32, Option<SocketAddr>, Option<SocketAddr>);

/// Tuples remembered per flow, on average, before [`FlowTable::seen_at`] starts over.
const TUPLES_PER_FLOW: usize = 8;

impl FlowTable {
    /// A table of at most `max_flows` flows (the kernel map's size: a flow the kernel no
    /// longer counts is not kept here either), forgotten after `idle`.
    pub fn new(clock: Clock, idle: std::time::Duration, max_flows: usize) -> Self {
        Self {
            max_flows,
            clock,
            idle_ns: u64::try_from(idle.as_nanos()).unwrap_or(u64::MAX),
            flows: HashMap::new(),
            totals: Totals::default(),
            removed: 0,
            seen_at: HashMap::new(),
            nat_totals: NatTotals::Paths,
            drops_read: HashMap::new(),
            conns: HashMap::new(),
            via: HashMap::new(),
            news: News::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    pub fn totals(&self) -> &Totals {
        &self.totals
    }

    /// Takes in a read of the kernel's map (every flow it holds, CPUs summed) and how many
    /// flows the kernel had created just before that read: counts grow by what is new since the last read;
    /// flows created that neither live nor expired here were evicted by the LRU, whether or
    /// not a read ever saw them.
    pub fn update_counts(&mut self, kernel: &[(FlowKey, FlowStats)], created: u64, now_ns: u64) {
        self.read_counts(kernel, now_ns);
        self.apply_connections();
        self.totals.evictions = self
            .totals
            .evictions
            .max(created.saturating_sub(kernel.len() as u64 + self.removed));
    }

    fn read_counts(&mut self, kernel: &[(FlowKey, FlowStats)], now_ns: u64) {
        let mut present = std::collections::HashSet::with_capacity(kernel.len());
        for (key, stats) in kernel {
            let id = FlowId::from_kernel(key);
            present.insert(id);
            let flow = self.flows.entry(id).or_default();
            // A flow evicted and seen again starts from zero in the kernel.
            let base = if stats.packets + stats.errors < flow.counted.packets + flow.counted.errors
            {
                FlowStats::default()
            } else {
                flow.counted
            };
            let grow = |total: &mut BTreeMap<u32, u64>, now: u64, before: u64| {
                *total.entry(id.netns).or_default() += now.saturating_sub(before);
            };
            grow(&mut self.totals.datagrams, stats.packets, base.packets);
            grow(&mut self.totals.bytes, stats.bytes, base.bytes);
            grow(&mut self.totals.errors, stats.errors, base.errors);
            if self.nat_totals == NatTotals::Flows {
                Self::count_nat(
                    &mut self.totals,
                    flow,
                    stats.packets.saturating_sub(base.packets),
                );
            }
            // No timestamp per datagram in the kernel: counts that grew since the last read
            // (or a flow new to this read) are activity now.
            if stats.packets + stats.errors != flow.counted.packets + flow.counted.errors
                || flow.kernel.is_none()
            {
                flow.active_ns = flow.active_ns.max(now_ns);
            }
            flow.kernel = Some(*key);
            flow.counted = *stats;
        }
        // Evicted by the kernel's LRU: forgotten here too (counted from the creations). A
        // flow known only from a path is kept until the next read could have shown it.
        self.flows.retain(|id, f| {
            present.contains(id)
                || (f.kernel.is_none() && now_ns.saturating_sub(f.active_ns) < PATH_ONLY_NS)
        });
    }

    /// The kernel's count of every NAT rewrite (paths show only the sampled ones).
    pub fn set_nat_totals(&mut self, counts: BTreeMap<(&'static str, &'static str), u64>) {
        self.nat_totals = NatTotals::Kernel;
        self.totals.nat = counts;
    }

    /// Counting mode (the NAT programs attached only in path windows, if ever): each
    /// datagram of a flow with a rewrite conntrack told of counts as translated by it.
    pub fn count_nat_by_flows(&mut self) {
        self.nat_totals = NatTotals::Flows;
    }

    /// Adds `packets` of `flow` to the NAT totals of each of its rewrites.
    fn count_nat(totals: &mut Totals, flow: &Flow, packets: u64) {
        if packets == 0 {
            return;
        }
        for n in &flow.nat {
            *totals
                .nat
                .entry((n.nf_hook.name(), n.nat.name()))
                .or_default() += packets;
        }
    }

    /// Takes in a read of the kernel's drop counts (every UDP datagram dropped, by
    /// namespace, reason and addresses): totals by reason grow by what is new since the last
    /// read, and each drop is counted on the flow that sent it, when known here — by its
    /// addresses (the sender's, or as a path of the flow showed them at some hop), or by the
    /// destination and source port alone for a flow whose socket is bound to no address.
    pub fn update_drops(
        &mut self,
        kernel: &[(DropKey, DropStats)],
        reasons: &DropReasons,
        now_ns: u64,
    ) {
        let mut by_dst: HashMap<(Option<SocketAddr>, u16), Vec<FlowId>> = HashMap::new();
        let mut read = HashMap::with_capacity(kernel.len());
        for (key, stats) in kernel {
            read.insert(*key, *stats);
            let before = self.drops_read.get(key).copied().unwrap_or_default();
            // A key evicted and seen again starts from zero in the kernel.
            let before = if stats.packets < before.packets {
                DropStats::default()
            } else {
                before
            };
            let new = stats.packets - before.packets;
            self.totals.drops_held += stats.held.saturating_sub(before.held);
            if new == 0 {
                continue;
            }
            let reason = reasons
                .name(key.reason)
                .map_or_else(|| key.reason.to_string(), str::to_string);
            let total = self
                .totals
                .drops
                .entry((reason.clone(), key.netns))
                .or_default();
            self.news.drop |= *total == 0;
            *total += new;
            let src = socket_addr(&key.src);
            let dst = socket_addr(&key.dst);
            let id = FlowId {
                netns: key.netns,
                src,
                dst,
            };
            let id = if self.flows.contains_key(&id) {
                Some(id)
            } else if let Some(id) = self.seen_at.get(&(key.netns, src, dst)) {
                Some(*id)
            } else if let Some(id) = src.zip(dst).and_then(|t| self.via.get(&t)) {
                Some(*id)
            } else {
                if by_dst.is_empty() {
                    for id in self.flows.keys() {
                        by_dst
                            .entry((id.dst, id.src.map_or(0, |s| s.port())))
                            .or_default()
                            .push(*id);
                    }
                }
                by_dst
                    .get(&(dst, src.map_or(0, |s| s.port())))
                    .and_then(|ids| {
                        ids.iter().copied().find(|id| {
                            id.src
                                .is_some_and(|s| s.ip().is_unspecified() || Some(s) == src)
                        })
                    })
            };
            if let Some(flow) = id.and_then(|id| self.flows.get_mut(&id)) {
                let n = flow.drops.entry(reason).or_default();
                self.news.drop |= *n == 0;
                *n += new;
                flow.active_ns = flow.active_ns.max(now_ns);
            }
        }
        self.drops_read = read;
        self.judge_conntrack_dnat();
    }

    /// For each flow conntrack DNATs (and no path has shown the rewrite), the datagrams
    /// dropped since the last ones got through, as paths would count them: enough in a row
    /// and the flow is called a stale DNAT. Run after each read of counts and drops.
    fn judge_conntrack_dnat(&mut self) {
        let ids: HashSet<FlowId> = self.conns.values().filter_map(|t| t.flow).collect();
        for id in ids {
            let Some(f) = self.flows.get_mut(&id) else {
                continue;
            };
            if !f.nat.iter().any(|n| n.conntrack && n.nat == NatKind::Dnat) {
                continue;
            }
            let drops: u64 = f.drops.values().sum();
            let kept = f.counted.packets.saturating_sub(drops);
            let ct = &mut f.ct_dnat;
            if kept > ct.kept {
                if ct.grew {
                    *ct = CtDnat {
                        kept,
                        drops,
                        grew: false,
                    };
                } else {
                    ct.grew = true;
                }
            } else {
                ct.grew = false;
            }
            f.undelivered_dnat = u32::try_from(drops.saturating_sub(ct.drops)).unwrap_or(u32::MAX);
        }
    }

    /// Takes in what conntrack told: rewritten connections that began (or a dump listed)
    /// and ended, and namespaces whose events were lost (what was known of them is
    /// replaced by the dump that follows). Each connection is applied to the flow whose
    /// datagrams it carries as soon as that flow is known here.
    pub fn observe_conntrack(&mut self, events: &[CtEvent]) {
        for event in events {
            match event {
                CtEvent::Nat(c) => {
                    let key = (c.netns, c.orig.0, c.orig.1);
                    if let Some(t) = self.conns.get_mut(&key) {
                        if t.conn != *c {
                            *t = Tracked {
                                conn: *c,
                                flow: None,
                            };
                        }
                    } else if self.conns.len() < self.max_flows {
                        self.conns.insert(
                            key,
                            Tracked {
                                conn: *c,
                                flow: None,
                            },
                        );
                    } else {
                        self.totals.conntrack_full += 1;
                    }
                }
                CtEvent::Gone(c) => {
                    self.conns.remove(&(c.netns, c.orig.0, c.orig.1));
                }
                CtEvent::Resync(netns) => self.conns.retain(|k, _| k.0 != *netns),
            }
        }
        self.apply_connections();
    }

    /// Applies every connection not applied yet (or whose flow was forgotten) to its flow.
    fn apply_connections(&mut self) {
        let pending: Vec<Connection> = self
            .conns
            .values()
            .filter(|t| t.flow.is_none_or(|id| !self.flows.contains_key(&id)))
            .map(|t| t.conn)
            .collect();
        if pending.is_empty() {
            return;
        }
        // Flows by (destination, source port), for a sender whose own address is not the
        // one conntrack saw (a socket bound to no address, or seen in another namespace).
        let mut by_dst: HashMap<(SocketAddr, u16), Vec<FlowId>> = HashMap::new();
        for id in self.flows.keys() {
            if let (Some(src), Some(dst)) = (id.src, id.dst) {
                by_dst.entry((dst, src.port())).or_default().push(*id);
            }
        }
        // Applied in rounds: a connection in the next namespace is found through the
        // tuple a rewrite in the one before gave the flow's datagrams.
        let mut left = pending;
        loop {
            let before = left.len();
            left.retain(|c| match self.flow_of_connection(c, &by_dst) {
                Some(id) => {
                    self.apply_connection(id, c);
                    false
                }
                None => true,
            });
            if left.is_empty() || left.len() == before {
                break;
            }
        }
    }

    fn flow_of_connection(
        &self,
        c: &Connection,
        by_dst: &HashMap<(SocketAddr, u16), Vec<FlowId>>,
    ) -> Option<FlowId> {
        let (src, dst) = c.orig;
        let exact = FlowId {
            netns: c.netns,
            src: Some(src),
            dst: Some(dst),
        };
        if self.flows.contains_key(&exact) {
            return Some(exact);
        }
        if let Some(id) = self
            .via
            .get(&c.orig)
            .or_else(|| self.seen_at.get(&(c.netns, Some(src), Some(dst))))
        {
            return self.flows.contains_key(id).then_some(*id);
        }
        let candidates: Vec<FlowId> = by_dst
            .get(&(dst, src.port()))?
            .iter()
            .copied()
            .filter(|id| {
                id.src
                    .is_some_and(|s| s.ip().is_unspecified() || s.ip() == src.ip())
            })
            .collect();
        // The sender's own namespace first; elsewhere only an unambiguous match.
        let here: Vec<FlowId> = candidates
            .iter()
            .copied()
            .filter(|id| id.netns == c.netns)
            .collect();
        match (here.as_slice(), candidates.as_slice()) {
            ([id], _) | ([], [id]) => Some(*id),
            _ => None,
        }
    }

    fn apply_connection(&mut self, id: FlowId, c: &Connection) {
        let key = (c.netns, c.orig.0, c.orig.1);
        if let Some(t) = self.conns.get_mut(&key) {
            t.flow = Some(id);
        }
        if self.via.len() >= self.max_flows.saturating_mul(TUPLES_PER_FLOW) {
            self.via.clear();
        }
        let after = c.after();
        self.via.insert(after, id);
        let Some(flow) = self.flows.get_mut(&id) else {
            return;
        };
        let ends = |(src, dst): (SocketAddr, SocketAddr)| Endpoints {
            src: Some(src),
            dst: Some(dst),
        };
        // After DNAT, before SNAT (conntrack applies DNAT first on the way out).
        let middle = (c.orig.0, c.reply.0);
        let mut seen = Vec::with_capacity(2);
        if c.dnat() {
            seen.push(FlowNat {
                nat: NatKind::Dnat,
                nf_hook: if id.netns == c.netns {
                    NfHook::Output
                } else {
                    NfHook::Prerouting
                },
                netns: c.netns,
                before: ends(c.orig),
                after: ends(middle),
                conntrack: true,
            });
        }
        if c.snat() {
            seen.push(FlowNat {
                nat: NatKind::Snat,
                nf_hook: NfHook::Postrouting,
                netns: c.netns,
                before: ends(middle),
                after: ends(after),
                conntrack: true,
            });
        }
        for nat in seen {
            if !flow.nat.iter().any(|n| same_rewrite(n, &nat)) && flow.nat.len() < MAX_NAT {
                // Its datagrams counted so far were rewritten too.
                if self.nat_totals == NatTotals::Flows {
                    *self
                        .totals
                        .nat
                        .entry((nat.nf_hook.name(), nat.nat.name()))
                        .or_default() += flow.counted.packets;
                }
                flow.nat.push(nat);
                self.news.nat = true;
            }
        }
    }

    /// What is new since the last call.
    pub fn take_news(&mut self) -> News {
        std::mem::take(&mut self.news)
    }

    /// Takes in a finished path: its drops, rewrites, what the receiver saw.
    pub fn observe(&mut self, path: &Path, now_ns: u64) {
        for hop in path
            .hops
            .iter()
            .filter(|_| self.nat_totals == NatTotals::Paths)
        {
            if let Some(nat) = &hop.nat {
                *self
                    .totals
                    .nat
                    .entry((nat.nf_hook.name(), nat.nat.name()))
                    .or_default() += 1;
            }
        }
        let id = match FlowId::of_path(path) {
            Some(id) => {
                self.learn_tuples(path, id);
                id
            }
            None if !path.sampled => match self.flow_of_unsampled(path) {
                Some(id) => id,
                None => return,
            },
            // A datagram not sent here.
            None => return,
        };
        if !self.flows.contains_key(&id) && self.flows.len() >= self.max_flows {
            // The kernel's table is full too: this flow was (or will be) evicted there.
            return;
        }
        let flow = self.flows.entry(id).or_default();
        flow.active_ns = flow.active_ns.max(now_ns);
        if flow.first_path_ns == 0 {
            flow.first_path_ns = now_ns;
        }
        if let Some(p) = path.hops[0].process.as_ref() {
            flow.process = Some((p.pid, p.comm.clone(), p.name().to_string()));
        }
        let mut dnat = false;
        for hop in &path.hops {
            let Some(nat) = &hop.nat else { continue };
            dnat |= nat.nat == NatKind::Dnat;
            let seen = FlowNat {
                nat: nat.nat,
                nf_hook: nat.nf_hook,
                netns: hop.netns,
                before: nat.before,
                after: nat.after,
                conntrack: false,
            };
            // A path shows the hook; it replaces what conntrack told of the same rewrite.
            if let Some(told) = flow
                .nat
                .iter_mut()
                .find(|n| n.conntrack && same_rewrite(n, &seen))
            {
                *told = seen;
            } else if !flow.nat.contains(&seen) && flow.nat.len() < MAX_NAT {
                flow.nat.push(seen);
            }
        }
        // (Drops are counted from the kernel's drop table: every one, sampled or not.)
        if path.verdict == Verdict::Delivered {
            flow.last = Some(path.last);
        }
        flow.undelivered_dnat = match (dnat, path.verdict) {
            (_, Verdict::Delivered | Verdict::LeftHost) => 0,
            (true, _) => flow.undelivered_dnat.saturating_add(1),
            (false, _) => flow.undelivered_dnat,
        };
        flow.explain.clone_from(&path.explain);
    }

    fn learn_tuples(&mut self, path: &Path, id: FlowId) {
        if self.seen_at.len() >= self.max_flows.saturating_mul(TUPLES_PER_FLOW) {
            self.seen_at.clear();
        }
        for hop in &path.hops {
            self.seen_at
                .insert((hop.netns, hop.addrs.src, hop.addrs.dst), id);
            if let Some(nat) = &hop.nat {
                self.seen_at
                    .insert((hop.netns, nat.before.src, nat.before.dst), id);
            }
        }
    }

    /// The flow of a path sampling left out, by the addresses at its first hop (before the
    /// rewrite, for a NAT hop) as an earlier sampled path of the flow showed them.
    fn flow_of_unsampled(&self, path: &Path) -> Option<FlowId> {
        let hop = path.hops.iter().find(|h| h.kind != HopKind::Fragment)?;
        let addrs = hop.nat.as_ref().map_or(hop.addrs, |n| n.before);
        let id = self.seen_at.get(&(hop.netns, addrs.src, addrs.dst))?;
        self.flows.contains_key(id).then_some(*id)
    }

    /// Forgets the namespaces `inodes`, gone (their last counts read): their flows, their
    /// totals, the connections their conntrack held (it can no longer say they ended), where
    /// their datagrams were seen. Returns the flows' kernel keys, to remove from the kernel's
    /// map. A new namespace given the same inode number then starts from nothing, and a node
    /// whose pods come and go for weeks keeps no series for every namespace it ever had.
    pub fn forget_namespaces(&mut self, inodes: &[u64]) -> Vec<FlowKey> {
        let gone: HashSet<u32> = inodes.iter().map(|&i| i as u32).collect();
        let ids: Vec<FlowId> = self
            .flows
            .keys()
            .filter(|id| gone.contains(&id.netns))
            .copied()
            .collect();
        let keys: Vec<FlowKey> = ids
            .into_iter()
            .filter_map(|id| self.flows.remove(&id)?.kernel)
            .collect();
        self.removed += keys.len() as u64;
        for netns in &gone {
            self.totals.datagrams.remove(netns);
            self.totals.bytes.remove(netns);
            self.totals.errors.remove(netns);
        }
        self.totals.drops.retain(|(_, n), _| !gone.contains(n));
        self.conns.retain(|(netns, _, _), _| !gone.contains(netns));
        self.seen_at
            .retain(|(netns, _, _), _| !gone.contains(netns));
        self.via.retain(|_, id| !gone.contains(&id.netns));
        keys
    }

    /// Forgets flows with nothing new for longer than the idle setting; returns their
    /// kernel keys, to remove from the kernel map.
    pub fn expire(&mut self, now_ns: u64) -> Vec<FlowKey> {
        let idle_ns = self.idle_ns;
        let stale: Vec<FlowId> = self
            .flows
            .iter()
            .filter(|(_, f)| now_ns.saturating_sub(f.active_ns) > idle_ns)
            .map(|(id, _)| *id)
            .collect();
        self.totals.expired += stale.len() as u64;
        let keys: Vec<FlowKey> = stale
            .into_iter()
            .filter_map(|id| self.flows.remove(&id)?.kernel)
            .collect();
        self.removed += keys.len() as u64;
        keys
    }

    /// The flows that pass `filter`, most datagrams first.
    pub fn snapshot(&self, filter: &Filter) -> Vec<FlowView> {
        let mut views: Vec<FlowView> = self
            .flows
            .iter()
            .map(|(id, f)| self.view(id, f))
            .filter(|v| filter.matches_flow(v))
            .collect();
        views.sort_by(|a, b| b.packets.cmp(&a.packets).then(a.orig.dst.cmp(&b.orig.dst)));
        views
    }

    fn view(&self, id: &FlowId, f: &Flow) -> FlowView {
        let first_ns = match (f.counted.first_ns, f.first_path_ns) {
            (0, p) => p,
            (k, 0) => k,
            (k, p) => k.min(p),
        };
        let stale_dnat = f.undelivered_dnat >= STALE_AFTER;
        let explain = match f.nat.iter().find(|n| n.nat == NatKind::Dnat) {
            Some(d) if stale_dnat => format!(
                "{} datagrams in a row were DNATed to {} ({} at {} in netns {}) and never \
                 delivered: a stale conntrack entry to a backend that is gone?",
                f.undelivered_dnat,
                d.after.dst.map_or_else(|| "?".into(), |a| a.to_string()),
                d.nat.name().to_uppercase(),
                d.nf_hook.name(),
                d.netns
            ),
            _ if f.explain.is_empty() => explain_conntrack(&f.nat).unwrap_or_default(),
            _ => f.explain.clone(),
        };
        FlowView {
            orig: Endpoints {
                src: id.src,
                dst: id.dst,
            },
            last: f.last,
            netns: id.netns,
            packets: f.counted.packets,
            bytes: f.counted.bytes,
            sends: f.counted.sends,
            errors: f.counted.errors,
            drops: f.drops.clone(),
            nat: f.nat.clone(),
            first_seen: self.clock.wall(first_ns),
            last_seen: self.clock.wall(f.active_ns),
            pid: f.process.as_ref().map(|p| p.0),
            comm: f.process.as_ref().map(|p| p.1.clone()),
            process_name: f.process.as_ref().map(|p| p.2.clone()),
            stale_dnat,
            explain,
            k8s: None,
        }
    }
}

/// The sentence for a flow whose rewrites only conntrack told of (no path traced): each
/// rewrite, and the addresses the datagrams have after the last one.
/// The same rewrite, whether a path or conntrack told of it.
fn same_rewrite(a: &FlowNat, b: &FlowNat) -> bool {
    a.nat == b.nat && a.netns == b.netns && a.before == b.before && a.after == b.after
}

fn explain_conntrack(nat: &[FlowNat]) -> Option<String> {
    let last = nat.iter().rfind(|n| n.conntrack)?;
    let addr = |a: Option<SocketAddr>| a.map_or_else(|| "?".into(), |a| a.to_string());
    let steps: Vec<String> = nat
        .iter()
        .filter(|n| n.conntrack)
        .map(|n| match n.nat {
            NatKind::Dnat => format!(
                "DNAT in netns {} sends it to {}",
                n.netns,
                addr(n.after.dst)
            ),
            NatKind::Snat => format!(
                "SNAT in netns {} gives it the source {}",
                n.netns,
                addr(n.after.src)
            ),
        })
        .collect();
    Some(format!(
        "conntrack: {}; past it the datagrams go {} → {} (no path traced)",
        steps.join(", then "),
        addr(last.after.src),
        addr(last.after.dst)
    ))
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use udptrace_common::{Addr, AF_INET};

    use super::*;
    use crate::pipeline::hops::tests::sample_path;

    fn clock() -> Clock {
        Clock::with_boot(SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000))
    }

    /// An IPv4 address as the kernel programs write it.
    fn kernel_addr(a: SocketAddr) -> Addr {
        let mut out = Addr {
            family: AF_INET,
            port: a.port(),
            ..Addr::default()
        };
        if let std::net::IpAddr::V4(v4) = a.ip() {
            out.ip[..4].copy_from_slice(&v4.octets());
        }
        out
    }

    /// The kernel key of the sample path's flow.
    fn key() -> FlowKey {
        let path = sample_path();
        FlowKey {
            netns: path.hops[0].netns,
            _pad: 0,
            src: kernel_addr(path.hops[0].addrs.src.unwrap()),
            dst: kernel_addr(path.hops[0].addrs.dst.unwrap()),
        }
    }

    fn stats(packets: u64) -> FlowStats {
        FlowStats {
            packets,
            bytes: packets * 3,
            errors: 0,
            sends: packets,
            first_ns: 10,
        }
    }

    #[test]
    fn counts_come_from_the_kernel_and_totals_only_grow() {
        let mut t = FlowTable::new(clock(), Duration::from_secs(60), 100);
        t.update_counts(&[(key(), stats(5))], 1, 0);
        t.update_counts(&[(key(), stats(8))], 1, 0);
        let v = t.snapshot(&Filter::default());
        assert_eq!((v[0].packets, v[0].bytes), (8, 24));
        assert_eq!(t.totals().datagrams[&key().netns], 8);
        // Evicted by the kernel's LRU: gone here, counted as an eviction, totals kept.
        t.update_counts(&[], 1, 0);
        assert_eq!(t.len(), 0);
        assert_eq!(t.totals().evictions, 1);
        // Back with fresh counts: the totals grow by them.
        t.update_counts(&[(key(), stats(2))], 2, 0);
        assert_eq!(t.totals().datagrams[&key().netns], 10);
    }

    #[test]
    fn paths_add_the_receivers_view_and_the_sender_not_drops() {
        let reasons = DropReasons::from_pairs([(3, "NO_SOCKET")]);
        let mut t = FlowTable::new(clock(), Duration::from_secs(60), 100);
        t.update_counts(&[(key(), stats(2))], 1, 0);
        let mut lost = sample_path();
        lost.verdict = Verdict::Dropped;
        let mut drop = lost.hops[0].clone();
        drop.kind = HopKind::Drop;
        drop.process = None;
        drop.reason = Some("NO_SOCKET".into());
        lost.hops.push(drop);
        t.observe(&lost, 150);
        let mut delivered = sample_path();
        delivered.verdict = Verdict::Delivered;
        delivered.last.src = Some("10.0.0.9:1".parse().unwrap());
        t.observe(&delivered, 160);
        // The kernel counts every drop; a path reporting one adds nothing.
        assert!(t.snapshot(&Filter::default())[0].drops.is_empty());
        t.update_drops(
            &[(drop_key(&key(), key().netns, 3), dropped(1, 0))],
            &reasons,
            170,
        );
        let v = &t.snapshot(&Filter::default())[0];
        assert_eq!(v.drops["NO_SOCKET"], 1);
        assert_eq!(v.last.unwrap().src, delivered.last.src);
        assert_eq!(v.comm.as_deref(), Some("nc"));
        assert_eq!(t.totals().drops[&("NO_SOCKET".to_string(), key().netns)], 1);
        let json = serde_json::to_value(v).unwrap();
        for field in [
            "orig",
            "final",
            "netns",
            "packets",
            "bytes",
            "sends",
            "drops",
            "nat",
            "first_seen",
            "last_seen",
            "explain",
        ] {
            assert!(json.get(field).is_some(), "{field} in {json}");
        }
    }

    #[test]
    fn a_drop_after_nat_counts_in_the_flow_whose_path_showed_the_rewrite() {
        let reasons = DropReasons::from_pairs([(3, "NO_SOCKET")]);
        let mut t = FlowTable::new(clock(), Duration::from_secs(60), 100);
        t.update_counts(&[(key(), stats(2))], 1, 0);
        let mut path = sample_path();
        let mut nat = path.hops[0].clone();
        nat.kind = HopKind::Nat;
        nat.process = None;
        nat.netns = 77;
        nat.addrs.dst = Some("10.244.9.9:53".parse().unwrap());
        path.hops.push(nat);
        t.observe(&path, 0);
        // Dropped in namespace 77 with the rewritten destination.
        let mut at = drop_key(&key(), 77, 3);
        at.dst.ip[..4].copy_from_slice(&[10, 244, 9, 9]);
        at.dst.port = 53;
        t.update_drops(&[(at, dropped(3, 2))], &reasons, 0);
        assert_eq!(t.snapshot(&Filter::default())[0].drops["NO_SOCKET"], 3);
        // Addresses no path showed belong to no flow here, but count in the totals.
        at.dst.port = 54;
        t.update_drops(&[(at, dropped(1, 0))], &reasons, 0);
        assert_eq!(t.snapshot(&Filter::default())[0].drops["NO_SOCKET"], 3);
        assert_eq!(t.totals().drops[&("NO_SOCKET".to_string(), 77)], 4);
    }

    fn drop_key(flow: &FlowKey, netns: u32, reason: u32) -> DropKey {
        DropKey {
            netns,
            reason,
            src: flow.src,
            dst: flow.dst,
        }
    }

    fn dropped(packets: u64, held: u64) -> DropStats {
        DropStats {
            packets,
            bytes: packets * 64,
            held,
            reported_ns: 1,
        }
    }

    /// Conntrack's DNAT of the sample flow (10.0.0.1:40112 → 127.0.0.1:5353 as sent) to
    /// 10.9.9.9:53, and the drop key of its datagrams past the rewrite.
    fn conntrack_dnat() -> (CtEvent, DropKey) {
        let (src, dst) = {
            let p = sample_path();
            (p.hops[0].addrs.src.unwrap(), p.hops[0].addrs.dst.unwrap())
        };
        let backend: SocketAddr = "10.9.9.9:53".parse().unwrap();
        let conn = Connection {
            netns: key().netns,
            orig: (src, dst),
            reply: (backend, src),
        };
        let mut after = drop_key(&key(), key().netns, 3);
        after.dst = kernel_addr(backend);
        (CtEvent::Nat(conn), after)
    }

    #[test]
    fn conntrack_nat_lands_on_its_flow_once_the_flow_is_known() {
        let mut t = FlowTable::new(clock(), Duration::from_secs(60), 100);
        let (ct, _) = conntrack_dnat();
        t.observe_conntrack(&[ct]);
        // Not applied before the flow is known; then listed, marked as conntrack's.
        assert_eq!(t.len(), 0);
        t.update_counts(&[(key(), stats(2))], 1, 0);
        let v = &t.snapshot(&Filter::default())[0];
        assert_eq!(v.nat.len(), 1, "{v:?}");
        assert!(v.nat[0].conntrack && v.nat[0].nat == NatKind::Dnat, "{v:?}");
        assert_eq!(v.nat[0].after.dst, Some("10.9.9.9:53".parse().unwrap()));
        assert!(v.explain.contains("conntrack"), "{}", v.explain);
        // Conntrack's news, once.
        assert!(t.take_news().nat);
        assert!(!t.take_news().nat);
    }

    #[test]
    fn counting_mode_calls_a_conntrack_dnat_that_loses_everything_stale() {
        let reasons = DropReasons::from_pairs([(3, "NO_SOCKET")]);
        let mut t = FlowTable::new(clock(), Duration::from_secs(60), 100);
        let (ct, after) = conntrack_dnat();
        t.observe_conntrack(&[ct]);
        let read = |t: &mut FlowTable, packets: u64, drops: u64| {
            t.update_counts(&[(key(), stats(packets))], 1, 0);
            t.update_drops(&[(after, dropped(drops, 0))], &reasons, 0);
            t.snapshot(&Filter::default())[0].clone()
        };
        // Delivered for a while (the drops of two reads: some got through).
        assert!(!read(&mut t, 100, 0).stale_dnat);
        assert!(!read(&mut t, 200, 0).stale_dnat);
        assert!(!read(&mut t, 300, 2).stale_dnat);
        // The backend goes: every datagram dropped, one read's drops landing a read late.
        let v = read(&mut t, 303, 3);
        assert!(!v.stale_dnat, "{v:?}");
        let v = read(&mut t, 306, 8);
        assert_eq!(v.drops["NO_SOCKET"], 8);
        assert!(v.stale_dnat, "{v:?}");
        assert!(v.explain.contains("stale conntrack"), "{}", v.explain);
        // Delivered again in two reads in a row: no longer stale.
        read(&mut t, 400, 8);
        assert!(!read(&mut t, 500, 8).stale_dnat);
    }

    #[test]
    fn kernel_drop_counts_land_on_their_flow_exactly_once() {
        let reasons = DropReasons::from_pairs([(2, "NOT_SPECIFIED"), (3, "NO_SOCKET")]);
        let mut t = FlowTable::new(clock(), Duration::from_secs(60), 100);
        t.update_counts(&[(key(), stats(10))], 1, 0);
        // Dropped in the receiver's namespace (another one), with the same addresses.
        let other = drop_key(&key(), key().netns + 1, 3);
        t.update_drops(&[(other, dropped(4, 3))], &reasons, 0);
        t.update_drops(&[(other, dropped(6, 5))], &reasons, 0);
        // A path reporting one of those drops adds nothing: the kernel counted it.
        let mut path = sample_path();
        path.verdict = Verdict::Dropped;
        let mut drop = path.hops[0].clone();
        drop.kind = HopKind::Drop;
        drop.reason = Some("NO_SOCKET".into());
        path.hops.push(drop);
        t.observe(&path, 0);
        let v = &t.snapshot(&Filter::default())[0];
        assert_eq!(v.drops["NO_SOCKET"], 6);
        assert_eq!(
            t.totals().drops[&("NO_SOCKET".to_string(), key().netns + 1)],
            6
        );
        assert_eq!(t.totals().drops_held, 5);
        // A reason this kernel does not name is shown by number; a drop of addresses no
        // flow here sent counts in the totals only.
        let mut stranger = drop_key(&key(), 9, 77);
        stranger.dst.port = 1;
        t.update_drops(
            &[(other, dropped(6, 5)), (stranger, dropped(2, 0))],
            &reasons,
            0,
        );
        assert_eq!(t.totals().drops[&("77".to_string(), 9)], 2);
        assert_eq!(t.snapshot(&Filter::default())[0].drops.len(), 1);
    }

    #[test]
    fn a_drop_finds_the_flow_of_a_socket_bound_to_no_address() {
        let reasons = DropReasons::from_pairs([(3, "NO_SOCKET")]);
        let mut t = FlowTable::new(clock(), Duration::from_secs(60), 100);
        let mut unbound = key();
        unbound.src.ip = [0; 16];
        t.update_counts(&[(unbound, stats(3))], 1, 0);
        // The wire carries the source address routing chose.
        t.update_drops(&[(drop_key(&key(), 5, 3), dropped(2, 0))], &reasons, 0);
        assert_eq!(t.snapshot(&Filter::default())[0].drops["NO_SOCKET"], 2);
    }

    #[test]
    fn idle_flows_expire_and_leave_the_kernel_map_too() {
        let mut t = FlowTable::new(clock(), Duration::from_nanos(1_000), 100);
        t.update_counts(&[(key(), stats(1))], 1, 100);
        assert!(t.expire(1_000).is_empty());
        assert_eq!(t.expire(1_101), vec![key()]);
        assert_eq!(t.len(), 0);
        assert_eq!(t.totals().expired, 1);
    }

    #[test]
    fn a_gone_namespace_is_forgotten_and_its_number_starts_again_from_nothing() {
        let mut t = FlowTable::new(clock(), Duration::from_secs(60), 100);
        let (gone, other) = (key(), FlowKey { netns: 9, ..key() });
        t.update_counts(&[(gone, stats(2)), (other, stats(3))], 2, 100);
        assert_eq!(t.forget_namespaces(&[u64::from(gone.netns)]), vec![gone]);
        assert_eq!(t.totals().datagrams.get(&gone.netns), None);
        assert_eq!(t.totals().datagrams.get(&9), Some(&3));
        // A new namespace with the same number counts its own datagrams only.
        t.update_counts(&[(gone, stats(5)), (other, stats(3))], 3, 200);
        assert_eq!(t.totals().datagrams.get(&gone.netns), Some(&5));
    }

    #[test]
    fn repeated_dnat_without_delivery_is_called_stale() {
        let mut t = FlowTable::new(clock(), Duration::from_secs(60), 100);
        let mut path = sample_path();
        let mut nat = path.hops[0].clone();
        nat.kind = HopKind::Nat;
        nat.process = None;
        nat.nat = Some(Box::new(crate::model::Nat {
            nat: NatKind::Dnat,
            nf_hook: crate::model::NfHook::Output,
            before: path.hops[0].addrs,
            after: Endpoints {
                src: path.hops[0].addrs.src,
                dst: Some("10.244.9.9:53".parse().unwrap()),
            },
            conntrack: None,
        }));
        path.hops.push(nat);
        path.verdict = Verdict::Unknown;
        for i in 0..3 {
            assert!(!t
                .snapshot(&Filter::default())
                .first()
                .is_some_and(|v| v.stale_dnat));
            t.observe(&path, 100 + i);
        }
        let v = &t.snapshot(&Filter::default())[0];
        assert!(v.stale_dnat);
        assert!(v.explain.contains("10.244.9.9:53"), "{}", v.explain);
        assert_eq!(t.totals().nat[&("output", "dnat")], 3);
    }
}
