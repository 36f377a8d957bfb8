//! Handles on the eBPF object's maps through file descriptors of their own: the flow table
//! and counters (read on another thread), the sampling setting (changed while running).

use std::os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd};

use aya::{
    maps::{Array, HashMap, Map, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues},
    Ebpf, Pod,
};
use aya_obj::generated::{bpf_attr, bpf_cmd};

use super::sys::bpf;
use udptrace_common::{
    names, DropKey, DropStats, FlowKey, FlowStats, NatSeen, NatSeenKey, ReaderKey, SampleConfig,
    SockDecision, TraceFilter,
};

/// `name`'s map through a file descriptor of its own.
fn own_map(ebpf: &Ebpf, name: &str) -> Option<Map> {
    let wrap: fn(MapData) -> Map = match ebpf.map(name)? {
        Map::PerCpuLruHashMap(_) => Map::PerCpuLruHashMap,
        Map::PerCpuArray(_) => Map::PerCpuArray,
        Map::Array(_) => Map::Array,
        _ => return None,
    };
    Some(wrap(MapData::from_fd(own_fd(ebpf, name)?).ok()?))
}

/// A file descriptor of our own for `name`'s map.
fn own_fd(ebpf: &Ebpf, name: &str) -> Option<OwnedFd> {
    let data = match ebpf.map(name)? {
        Map::PerCpuLruHashMap(d) | Map::PerCpuArray(d) | Map::Array(d) => d,
        _ => return None,
    };
    data.fd().as_fd().try_clone_to_owned().ok()
}

/// Sets which datagrams are traced hop by hop (`udptrace_common::SampleConfig`); the kernel
/// programs read it for every new datagram.
pub struct Sampler {
    map: Array<MapData, SampleConfig>,
}

impl Sampler {
    pub fn new(ebpf: &Ebpf) -> Option<Self> {
        Some(Self {
            map: Array::try_from(own_map(ebpf, names::SAMPLING)?).ok()?,
        })
    }

    pub fn set(&mut self, config: SampleConfig) -> std::io::Result<()> {
        self.map.set(0, config, 0).map_err(std::io::Error::other)
    }

    pub fn get(&self) -> std::io::Result<SampleConfig> {
        self.map.get(&0, 0).map_err(std::io::Error::other)
    }
}

/// Sets which datagrams may be traced at all (`udptrace_common::TraceFilter`).
pub fn set_filter(ebpf: &mut Ebpf, filter: TraceFilter) -> std::io::Result<()> {
    let map = ebpf
        .map_mut(names::TRACE_FILTER)
        .ok_or_else(|| std::io::Error::other("no TRACE_FILTER map in the eBPF object"))?;
    Array::<_, TraceFilter>::try_from(map)
        .map_err(std::io::Error::other)?
        .set(0, filter, 0)
        .map_err(std::io::Error::other)
}

/// Empties the sampling maps (datagrams seen per flow, decisions by skb and by socket,
/// NAT rewrites and readers reported): what they remember from an earlier path window
/// would misdecide reused skb addresses, and each window starts with each flow's first
/// datagrams again.
pub fn clear_sampling(ebpf: &mut Ebpf) {
    clear::<FlowKey, u64>(ebpf, names::SAMPLE_COUNT);
    clear::<u64, u64>(ebpf, names::SAMPLE_SKBS);
    clear::<u64, SockDecision>(ebpf, names::SAMPLE_SOCKS);
    clear::<NatSeenKey, NatSeen>(ebpf, names::SAMPLE_NAT);
    clear::<ReaderKey, u64>(ebpf, names::SAMPLE_READERS);
    clear_untraced(ebpf);
}

/// Empties every CPU's slots of decisions not to trace, by skb and by socket.
fn clear_untraced(ebpf: &mut Ebpf) {
    clear_per_cpu::<[u64; 17]>(ebpf, names::SKB_UNTRACED);
    clear_per_cpu::<[u64; 5]>(ebpf, names::SOCK_UNTRACED);
}

fn clear_per_cpu<V: Pod + Default + Clone>(ebpf: &mut Ebpf, name: &str) {
    let Some(map) = ebpf.map_mut(name) else {
        return;
    };
    let Ok(mut slots) = PerCpuArray::<_, V>::try_from(map) else {
        tracing::warn!("{name}: not a per-CPU array");
        return;
    };
    let Ok(cpus) = aya::util::nr_cpus() else {
        return;
    };
    for i in 0..slots.len() {
        if let Ok(empty) = PerCpuValues::try_from(vec![V::default(); cpus]) {
            let _ = slots.set(i, empty, 0);
        }
    }
}

fn clear<K: aya::Pod, V: aya::Pod>(ebpf: &mut Ebpf, name: &str) {
    let Some(map) = ebpf.map_mut(name) else {
        return;
    };
    let Ok(mut map) = HashMap::<_, K, V>::try_from(map) else {
        tracing::warn!("{name}: not a hash map");
        return;
    };
    let keys: Vec<K> = map.keys().filter_map(Result::ok).collect();
    for key in &keys {
        let _ = map.remove(key);
    }
}

/// Sums each flow's per-CPU counts. Only the CPU that added the flow set `first_ns`; the
/// others' slots start at zero and count from there.
fn sum_flows(
    flows: &PerCpuHashMap<MapData, FlowKey, FlowStats>,
    fd: BorrowedFd<'_>,
) -> Vec<(FlowKey, FlowStats)> {
    if let Some(all) = read_batched(fd, |v: &[FlowStats]| sum_cpus(v.iter())) {
        return all;
    }
    flows
        .iter()
        .filter_map(Result::ok)
        .map(|(key, per_cpu)| (key, sum_cpus(per_cpu.iter())))
        .collect()
}

/// Every entry of a per-CPU hash map, each value summed over CPUs by `sum`, read with
/// `BPF_MAP_LOOKUP_BATCH` (Linux 5.6+): a few system calls for the whole table, where
/// iterating takes two per entry (next key, lookup) — a table of 65 536 flows read every
/// second cost the agent a tenth of a core. None when the kernel cannot (then iterate).
fn read_batched<K: Pod, V: Pod, S>(
    fd: BorrowedFd<'_>,
    sum: impl Fn(&[V]) -> S,
) -> Option<Vec<(K, S)>> {
    let cpus = aya::util::nr_cpus().ok()?;
    // Per-CPU values come each in an 8-byte-aligned slot.
    let stride = size_of::<V>().next_multiple_of(8);
    let mut chunk: usize = 4096;
    let mut out = Vec::new();
    let mut token: u32 = 0;
    let mut first = true;
    let fd = fd.as_raw_fd();
    let mut keys: Vec<K> = Vec::new();
    let mut values: Vec<u8> = Vec::new();
    let mut per_cpu: Vec<V> = Vec::with_capacity(cpus);
    loop {
        // SAFETY: K is plain data (Pod): all zeroes is a valid K.
        keys.resize(chunk, unsafe { std::mem::zeroed() });
        values.resize(chunk * cpus * stride, 0);
        let mut next: u32 = 0;
        // SAFETY: bpf_attr is plain data; all-zero is its empty value.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        // SAFETY: writing the fields of the union's batch variant, the one this command reads.
        unsafe {
            let batch = &mut attr.batch;
            batch.in_batch = if first { 0 } else { (&raw const token) as u64 };
            batch.out_batch = (&raw mut next) as u64;
            batch.keys = keys.as_mut_ptr() as u64;
            batch.values = values.as_mut_ptr() as u64;
            batch.count = chunk as u32;
            batch.map_fd = fd as u32;
        }
        let result = bpf(bpf_cmd::BPF_MAP_LOOKUP_BATCH, &mut attr);
        // SAFETY: the kernel wrote how many entries it filled into the variant it read.
        let filled = unsafe { attr.batch.count } as usize;
        let done = match &result {
            Ok(_) => false,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
            // A bucket holds more entries than fit: again, with room for them.
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && filled == 0 => {
                chunk *= 2;
                continue;
            }
            Err(e) if first && out.is_empty() => {
                tracing::debug!("batched map read unavailable ({e}): iterating");
                return None;
            }
            Err(e) => {
                tracing::warn!("batched map read stopped part way ({e}): iterating instead");
                return None;
            }
        };
        for (i, key) in keys.iter().take(filled).enumerate() {
            per_cpu.clear();
            for cpu in 0..cpus {
                let at = (i * cpus + cpu) * stride;
                // SAFETY: inside `values` (filled ≤ chunk entries of `cpus` slots of
                // `stride` ≥ size_of::<V>() bytes); V is plain data, read unaligned.
                per_cpu.push(unsafe { values.as_ptr().add(at).cast::<V>().read_unaligned() });
            }
            out.push((*key, sum(&per_cpu)));
        }
        if done {
            return Some(out);
        }
        token = next;
        first = false;
    }
}

/// One flow's counts over CPUs.
fn sum_cpus<'a>(per_cpu: impl Iterator<Item = &'a FlowStats>) -> FlowStats {
    let mut sum = FlowStats::default();
    for s in per_cpu {
        sum.packets += s.packets;
        sum.bytes += s.bytes;
        sum.errors += s.errors;
        sum.sends += s.sends;
        if s.first_ns != 0 && (sum.first_ns == 0 || s.first_ns < sum.first_ns) {
            sum.first_ns = s.first_ns;
        }
    }
    sum
}

/// Sums each drop key's per-CPU counts (`reported_ns`: the latest).
fn sum_drops(
    drops: &PerCpuHashMap<MapData, DropKey, DropStats>,
    fd: BorrowedFd<'_>,
) -> Vec<(DropKey, DropStats)> {
    let sum = |per_cpu: &[DropStats]| {
        per_cpu.iter().fold(DropStats::default(), |a, s| DropStats {
            packets: a.packets + s.packets,
            bytes: a.bytes + s.bytes,
            held: a.held + s.held,
            reported_ns: a.reported_ns.max(s.reported_ns),
        })
    };
    if let Some(all) = read_batched(fd, sum) {
        return all;
    }
    drops
        .iter()
        .filter_map(Result::ok)
        .map(|(key, per_cpu)| (key, sum(&per_cpu)))
        .collect()
}

/// The kernel's counters as read at one moment: how many flows it had created, then every
/// flow and every drop key with its counts summed over CPUs.
#[derive(Debug, Clone)]
pub struct KernelCounts {
    /// When the read began: every datagram counted before is in it.
    pub taken: std::time::Instant,
    pub created: u64,
    pub flows: Vec<(FlowKey, FlowStats)>,
    pub drops: Vec<(DropKey, DropStats)>,
}

/// The flow and drop tables and the counters through file descriptors of their own: usable
/// from another thread, and after the programs are gone.
pub struct FlowReader {
    flows: PerCpuHashMap<MapData, FlowKey, FlowStats>,
    drops: PerCpuHashMap<MapData, DropKey, DropStats>,
    stats: PerCpuArray<MapData, u64>,
    /// The two tables' descriptors again, for batched reads (aya's handles do not lend
    /// theirs).
    flows_fd: OwnedFd,
    drops_fd: OwnedFd,
}

impl FlowReader {
    pub fn new(ebpf: &Ebpf) -> Option<Self> {
        Some(Self {
            flows: PerCpuHashMap::try_from(own_map(ebpf, names::FLOWS)?).ok()?,
            drops: PerCpuHashMap::try_from(own_map(ebpf, names::DROPS)?).ok()?,
            stats: PerCpuArray::try_from(own_map(ebpf, names::STATS)?).ok()?,
            flows_fd: own_fd(ebpf, names::FLOWS)?,
            drops_fd: own_fd(ebpf, names::DROPS)?,
        })
    }

    /// How many flows the kernel had created, read first, then every flow it holds: a flow
    /// created in between is in the table but not in the count, so evictions computed
    /// from the two are never overestimated. Then the drops.
    pub fn read(&self) -> KernelCounts {
        let taken = std::time::Instant::now();
        let created = self
            .stats
            .get(&udptrace_common::STAT_FLOW_NEW, 0)
            .map(|v| v.iter().sum())
            .unwrap_or(0);
        KernelCounts {
            taken,
            created,
            flows: sum_flows(&self.flows, self.flows_fd.as_fd()),
            drops: sum_drops(&self.drops, self.drops_fd.as_fd()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_cpus_counts_add_up_whichever_added_the_flow() {
        let added = FlowStats {
            packets: 53,
            bytes: 53 * 64,
            sends: 53,
            first_ns: 900,
            ..FlowStats::default()
        };
        // Another CPU's slot starts at zero: it has counts but no first_ns.
        let other = FlowStats {
            packets: 12,
            bytes: 12 * 64,
            sends: 12,
            ..FlowStats::default()
        };
        let sum = sum_cpus([other, FlowStats::default(), added].iter());
        assert_eq!(
            (sum.packets, sum.bytes, sum.sends, sum.first_ns),
            (65, 65 * 64, 65, 900)
        );
    }
}
