//! What every hook family stamps on its events: the header, and the task it runs in.

use aya_ebpf::helpers::{
    bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
    bpf_get_current_task, bpf_get_current_uid_gid, bpf_get_smp_processor_id, bpf_ktime_get_ns,
};
use udptrace_common::EventHeader;

use crate::{maps::offset, read::kernel::try_read_kernel};

/// The header of an event of `kind` from `hook`, stamped now on this CPU.
#[inline(always)]
pub fn header(kind: u16, hook: u16) -> EventHeader {
    EventHeader {
        kind,
        hook,
        // SAFETY: a plain helper call without pointer arguments.
        cpu: unsafe { bpf_get_smp_processor_id() },
        // SAFETY: as above.
        ts_ns: unsafe { bpf_ktime_get_ns() },
    }
}

/// The task the program runs in (meaningful in process context: send, recv).
pub struct Task {
    pub pid: u32,
    pub tid: u32,
    pub uid: u32,
    pub gid: u32,
    pub cgroup: u64,
    /// The thread's name.
    pub comm: [u8; 16],
    /// The process's name: the thread-group leader's (dig's resolver threads are
    /// `isc-net-0000`; people look for `dig`).
    pub name: [u8; 16],
}

#[inline(always)]
pub fn task() -> Task {
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    let pid = (pid_tgid >> 32) as u32;
    let tid = pid_tgid as u32;
    let comm = bpf_get_current_comm().unwrap_or_default();
    // The leader is the thread whose id is the process's: only another thread needs the
    // two reads.
    let name = if pid == tid {
        comm
    } else {
        leader_comm().unwrap_or(comm)
    };
    Task {
        pid,
        tid,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        // SAFETY: plain helper call without pointer arguments.
        cgroup: unsafe { bpf_get_current_cgroup_id() },
        comm,
        name,
    }
}

/// The current thread-group leader's `comm`; `None` where the layout is unknown.
#[inline(always)]
fn leader_comm() -> Option<[u8; 16]> {
    // SAFETY: plain helper call without pointer arguments.
    let current = unsafe { bpf_get_current_task() };
    let leader: u64 = try_read_kernel(current, offset!(task_group_leader))?;
    try_read_kernel(leader, offset!(task_comm))
}
