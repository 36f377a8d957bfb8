//! Maps and load-time globals shared by every hook family.

use aya_ebpf::{
    macros::map,
    maps::{LruHashMap, LruPerCpuHashMap, PerCpuArray, RingBuf},
};
use udptrace_common::{
    FlowKey, FlowStats, Offsets, PendingSend, SkbEvent, EVENTS_BYTES, FLOWS_DEFAULT,
    NF_INET_NUMHOOKS, PENDING_SENDS_MAX, STATS_LEN,
};

#[map(name = "EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

#[map(name = "STATS")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STATS_LEN, 0);

/// Every datagram sent, counted per flow; the loader sets the size (`--flow-entries`).
#[map(name = "FLOWS")]
pub static FLOWS: LruPerCpuHashMap<FlowKey, FlowStats> =
    LruPerCpuHashMap::with_max_entries(FLOWS_DEFAULT, 0);

#[map(name = "PENDING_SENDS")]
pub static PENDING_SENDS: LruHashMap<u64, PendingSend> =
    LruHashMap::with_max_entries(PENDING_SENDS_MAX, 0);

/// The datagram as the "before NAT" netfilter program saw it, per CPU and hook: the "after"
/// program at the same hook compares. Netfilter runs a hook's functions on one CPU in order.
#[map(name = "NAT_BEFORE")]
pub static NAT_BEFORE: PerCpuArray<SkbEvent> = PerCpuArray::with_max_entries(NF_INET_NUMHOOKS, 0);

/// The skb that last passed the end of LOCAL_IN on this CPU (deliver hop, netfilter way).
#[map(name = "LOCAL_IN_SKB")]
pub static LOCAL_IN_SKB: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Kernel layout facts, filled from BTF and tracefs by the loader.
#[unsafe(no_mangle)]
pub static OFFSETS: Offsets = Offsets::MISSING;

/// Reads one field of [`OFFSETS`] so the compiler cannot fold the load-time value.
macro_rules! offset {
    ($field:ident) => {
        // SAFETY: OFFSETS is a plain static; the volatile read only stops constant folding.
        unsafe { core::ptr::read_volatile(&raw const $crate::maps::OFFSETS.$field) } as usize
    };
}
pub(crate) use offset;

/// Bumps a per-CPU counter (no atomics on BPF: per-CPU slots, summed in userspace).
#[inline(always)]
pub fn count(stat: u32) {
    if let Some(slot) = STATS.get_ptr_mut(stat) {
        // SAFETY: the slot belongs to this CPU and the program cannot be preempted on it.
        unsafe { *slot += 1 };
    }
}
