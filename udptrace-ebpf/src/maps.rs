//! Maps and load-time globals shared by every hook family.

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    macros::map,
    maps::{Array, LruHashMap, LruPerCpuHashMap, PerCpuArray, RingBuf},
};
use aya_log_ebpf::debug;
use udptrace_common::{
    DropKey, DropStats, FlowKey, FlowStats, NatEvent, Offsets, PendingSend, SkbEvent, DROPS_MAX,
    EVENTS_BYTES, EVENTS_WAKE_BYTES, FLOWS_DEFAULT, MODE_PATHS, NF_INET_NUMHOOKS,
    PENDING_SENDS_MAX, STATS_LEN, STAT_FLOW_FULL, STAT_PENDING_FULL, STAT_READ_ERROR,
    STAT_RINGBUF_FULL, STAT_USER_READ_ERROR,
};

#[map(name = "EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

#[map(name = "STATS")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STATS_LEN, 0);

/// Every datagram sent, counted per flow; the loader sets the size (`--flow-entries`).
#[map(name = "FLOWS")]
pub static FLOWS: LruPerCpuHashMap<FlowKey, FlowStats> =
    LruPerCpuHashMap::with_max_entries(FLOWS_DEFAULT, 0);

/// Every datagram dropped, counted by namespace, reason and addresses.
#[map(name = "DROPS")]
pub static DROPS: LruPerCpuHashMap<DropKey, DropStats> =
    LruPerCpuHashMap::with_max_entries(DROPS_MAX, 0);

/// Flags for a record sent to [`EVENTS`]: whether it wakes the reader. With path hooks
/// attached hop events come by the hundred thousand a second, and a wake-up for each (the
/// kernel's default whenever the reader has caught up) cost an interrupt on this CPU and a
/// reschedule IPI to the reader's for every few records; the reader looks at the ring on its
/// own tick anyway. So a record wakes it only once [`EVENTS_WAKE_BYTES`] wait. Without path
/// hooks the records are the rare, rate-limited drop reports, and each wakes it at once.
#[inline(always)]
pub fn ring_flags() -> u64 {
    if !mode(MODE_PATHS) {
        return 0;
    }
    if EVENTS.query(u64::from(BPF_RB_AVAIL_DATA)) >= u64::from(EVENTS_WAKE_BYTES) {
        u64::from(BPF_RB_FORCE_WAKEUP)
    } else {
        u64::from(BPF_RB_NO_WAKEUP)
    }
}

/// `MODE_*` flags: what is attached (set by the loader as it attaches).
#[map(name = "MODE")]
static MODE: Array<u32> = Array::with_max_entries(1, 0);

/// Whether `flag` (a `MODE_*`) is set.
#[inline(always)]
pub fn mode(flag: u32) -> bool {
    MODE.get(0).is_some_and(|m| m & flag != 0)
}

#[map(name = "PENDING_SENDS")]
pub static PENDING_SENDS: LruHashMap<u64, PendingSend> =
    LruHashMap::with_max_entries(PENDING_SENDS_MAX, NO_COMMON_LRU);

/// The datagram as it was before NAT at a hook (its headers, the rewritten side from its
/// conntrack tuple), per CPU and hook: room the NAT hop's stack lacks.
#[map(name = "NAT_BEFORE")]
pub static NAT_BEFORE: PerCpuArray<SkbEvent> = PerCpuArray::with_max_entries(NF_INET_NUMHOOKS, 0);

/// The skb that last passed the end of LOCAL_IN on this CPU (deliver hop, netfilter way).
#[map(name = "LOCAL_IN_SKB")]
pub static LOCAL_IN_SKB: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// A delivery's hop, filled before the enqueue and sent after it (deliver hop, fentry way).
#[repr(C)]
pub struct PendingDelivery {
    /// The skb being queued; 0 when there is nothing to send.
    pub skb: u64,
    /// Its sampling decision's stamp, forgotten once it is queued.
    pub stamp: u64,
    pub ev: SkbEvent,
}

#[map(name = "DELIVER_PENDING")]
pub static DELIVER_PENDING: PerCpuArray<PendingDelivery> = PerCpuArray::with_max_entries(1, 0);

/// Nesting levels one CPU can have (task, softirq, hardirq, NMI): a program interrupted on
/// its CPU by another keeps its scratch event.
const SCRATCH_LEVELS: u32 = 4;

/// Where an skb or NAT hop builds its event before deciding whether to send it: most
/// datagrams are not sampled, and reserving ring buffer space only to discard it costs more
/// than the copy. It also wakes no reader for nothing: a discarded record that wakes no one
/// would leave the reader asleep behind it until some later record forces a wakeup.
#[map(name = "SCRATCH")]
static SCRATCH: PerCpuArray<NatEvent> = PerCpuArray::with_max_entries(SCRATCH_LEVELS, 0);

/// How many scratch events are in use on this CPU.
#[map(name = "SCRATCH_DEPTH")]
static SCRATCH_DEPTH: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// This CPU's next free scratch event, given back when dropped. Nesting is strictly last in,
/// first out on a CPU, so a depth counter is all the bookkeeping there is; giving back sets
/// the depth to the level taken rather than decrementing it, so a count ever torn (a program
/// migrated or preempted between its load and store) mends itself when the outermost
/// program returns, instead of leaking a level for good.
pub struct Scratch {
    ev: *mut NatEvent,
    depth: *mut u32,
    level: u32,
}

impl Scratch {
    #[inline(always)]
    pub fn take() -> Option<Self> {
        let depth = SCRATCH_DEPTH.get_ptr_mut(0)?;
        // SAFETY: this CPU's counter; an interrupting program restores it before we go on.
        let level = unsafe { *depth };
        let ev = SCRATCH.get_ptr_mut(level)?;
        // SAFETY: as above.
        unsafe { *depth = level + 1 };
        Some(Self { ev, depth, level })
    }

    /// As an skb hop's event.
    #[inline(always)]
    pub fn event(&mut self) -> &mut SkbEvent {
        &mut self.nat().skb
    }

    #[inline(always)]
    pub fn nat(&mut self) -> &mut NatEvent {
        // SAFETY: a map value of this CPU at a level no other running program uses.
        unsafe { &mut *self.ev }
    }
}

impl Drop for Scratch {
    #[inline(always)]
    fn drop(&mut self) {
        // SAFETY: this CPU's counter, set by `take`.
        unsafe { *self.depth = self.level };
    }
}

/// LRU map flag: one LRU list per CPU instead of one locked list shared by all (an update
/// on the datagram path no longer waits for another CPU's).
pub const NO_COMMON_LRU: u32 = 2;

/// Kernel layout facts, filled from BTF and tracefs by the loader.
#[unsafe(no_mangle)]
pub static OFFSETS: Offsets = Offsets::MISSING;

/// Non-zero: the always-on programs (count and drop hops) return at once, so the bench can
/// measure what merely being attached costs (its floor run). Read-only, so the verifier
/// removes the bodies it skips or the check itself.
#[unsafe(no_mangle)]
pub static EMPTY_BODIES: u8 = 0;

/// Whether the loader asked for empty bodies ([`EMPTY_BODIES`]).
#[inline(always)]
pub fn empty_bodies() -> bool {
    // SAFETY: a plain static; the volatile read only stops constant folding.
    unsafe { core::ptr::read_volatile(&raw const EMPTY_BODIES) != 0 }
}

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

/// Counts a rare condition (a lost event, a full map, a failed read of the sender's
/// memory) and, with kernel logs on (`udptrace --log-level debug`), names it through
/// aya-log. Free when off: the loader sets aya-log's read-only `AYA_LOG_LEVEL` to 0 and the
/// verifier drops the log code as unreachable.
#[inline(always)]
pub fn fault(stat: u32) {
    count(stat);
    match stat {
        STAT_RINGBUF_FULL => debug!(&(), "event ring buffer full: a hop event was lost"),
        STAT_FLOW_FULL => debug!(
            &(),
            "flow table refused a new flow: its datagrams are not counted"
        ),
        STAT_PENDING_FULL => debug!(&(), "pending-send table full: a send's destination is lost"),
        STAT_USER_READ_ERROR => debug!(
            &(),
            "reading the sender's memory failed: the destination comes from the socket"
        ),
        STAT_READ_ERROR => debug!(&(), "a read of kernel memory failed"),
        _ => {}
    }
}

/// What a hop's entry point does with its `try_*` result: the failed read was counted
/// where it happened; with kernel logs on it is named, with the program, too.
macro_rules! finish {
    ($result:expr, $program:literal) => {
        if $result.is_err() {
            aya_log_ebpf::debug!(&(), "{}: a kernel read failed, no hop reported", $program);
        }
    };
}
pub(crate) use finish;
