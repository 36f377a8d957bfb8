//! The send hop: fentry on `udp_sendmsg`/`udpv6_sendmsg`, else kprobes on them, else raw
//! tracepoint `sock_send_length` with the destinations of unconnected sends from the cgroup
//! `sendmsg4`/`sendmsg6` hooks (else the send syscalls' tracepoints).

use aya::programs::{CgroupAttachMode, CgroupSockAddr, FEntry, KProbe, TracePoint};
use udptrace_common::{programs, Hook};

use crate::{
    kernel::{cgroup2, offsets::Group},
    loader::{
        chain::{
            attach_chain, attach_fentry, attach_raw_tp, attach_tp, attach_tp_btf, chain, enabled,
            kprobes, need, program, unload_all, Ctx,
        },
        report::HopReport,
    },
};

const FENTRY: &str = "fentry:udp_sendmsg+udpv6_sendmsg";
const KPROBE: &str = "kprobe:udp_sendmsg+udpv6_sendmsg";
/// Where the tracepoint send hop learns unconnected sends' destinations, best first.
const CGROUP_SENDMSG: &str = "cgroup:sendmsg4+sendmsg6";

pub fn attach(ctx: &mut Ctx<'_>) -> HopReport {
    attach_chain(
        ctx,
        "send",
        &[
            (FENTRY, fentry),
            (KPROBE, kprobe),
            (Hook::TpBtfSockSendLength.name(), typed_tracepoints),
            (Hook::TpSockSendLength.name(), raw_tracepoints),
        ],
    )
}

/// `int udp_sendmsg(struct sock *sk, struct msghdr *msg, size_t len)`, and the IPv6 twin.
fn fentry(ctx: &mut Ctx<'_>, _: &mut HopReport) -> Result<(), String> {
    need(ctx.layout, &[Group::Sock, Group::Msghdr])?;
    let progs = [
        (programs::SEND_FENTRY_UDP_SENDMSG, "udp_sendmsg"),
        (programs::SEND_FENTRY_UDPV6_SENDMSG, "udpv6_sendmsg"),
    ];
    let result = progs
        .iter()
        .try_for_each(|(name, func)| attach_fentry(ctx.ebpf, name, func));
    if result.is_err() {
        unload_all!(FEntry, ctx.ebpf, progs.map(|(n, _)| n));
    }
    result
}

fn kprobe(ctx: &mut Ctx<'_>, _: &mut HopReport) -> Result<(), String> {
    need(ctx.layout, &[Group::Sock, Group::Msghdr])?;
    kprobes()?;
    let progs = [
        (programs::SEND_KPROBE_UDP_SENDMSG, "udp_sendmsg"),
        (programs::SEND_KPROBE_UDPV6_SENDMSG, "udpv6_sendmsg"),
    ];
    let result = progs.iter().try_for_each(|(name, func)| {
        let prog: &mut KProbe = program(ctx.ebpf, name)?;
        prog.load()
            .map_err(|e| format!("loading for {func}: {}", chain(&e)))?;
        prog.attach(func, 0)
            .map(drop)
            .map_err(|e| format!("attaching to {func}: {}", chain(&e)))
    });
    if result.is_err() {
        unload_all!(KProbe, ctx.ebpf, progs.map(|(n, _)| n));
    }
    result
}

/// Attaches the cgroup `sendmsg4`/`sendmsg6` programs at the root of the cgroup v2
/// hierarchy (so they run for every process, beside any other program there) and
/// returns that root; on failure nothing stays attached.
fn cgroup_hooks(ctx: &mut Ctx<'_>) -> Result<std::path::PathBuf, String> {
    let root = cgroup2::root(ctx.cgroup_root)?;
    let dir = std::fs::File::open(&root).map_err(|e| format!("{}: {e}", root.display()))?;
    let progs = [
        programs::SEND_CGROUP_SENDMSG4,
        programs::SEND_CGROUP_SENDMSG6,
    ];
    let result = progs.iter().try_for_each(|name| {
        let prog: &mut CgroupSockAddr = program(ctx.ebpf, name)?;
        prog.load()
            .map_err(|e| format!("loading {name}: {}", chain(&e)))?;
        // A bpf_link (aya makes one on 5.7+; the ring buffer needs 5.8 anyway) always runs
        // beside the cgroup's other programs, and takes no flags: `Single` passes none.
        prog.attach(&dir, CgroupAttachMode::Single)
            .map(drop)
            .map_err(|e| format!("attaching {name} to {}: {}", root.display(), chain(&e)))
    });
    if let Err(why) = result {
        unload_all!(CgroupSockAddr, ctx.ebpf, progs);
        return Err(why);
    }
    Ok(root)
}

/// The send syscalls' tracepoints, for unconnected sends' destinations.
const SYSCALL_PROGRAMS: [(&str, &[&str]); 4] = [
    (programs::SEND_ENTER_SENDTO, &["sys_enter_sendto"]),
    (programs::SEND_ENTER_SENDMSG, &["sys_enter_sendmsg"]),
    (programs::SEND_ENTER_SENDMMSG, &["sys_enter_sendmmsg"]),
    (
        programs::SEND_EXIT,
        &["sys_exit_sendto", "sys_exit_sendmsg", "sys_exit_sendmmsg"],
    ),
];

/// Tracepoint `sock_send_length` typed (tp_btf: the socket's fields are plain loads).
fn typed_tracepoints(ctx: &mut Ctx<'_>, report: &mut HopReport) -> Result<(), String> {
    need(ctx.layout, &[Group::Sock, Group::TpSendLength])?;
    attach_tp_btf(
        ctx.ebpf,
        programs::SEND_BTF_SOCK_SEND_LENGTH,
        "sock_send_length",
    )?;
    destinations(ctx, report);
    Ok(())
}

/// Tracepoint `sock_send_length` raw (every read a helper call).
fn raw_tracepoints(ctx: &mut Ctx<'_>, report: &mut HopReport) -> Result<(), String> {
    need(ctx.layout, &[Group::Sock, Group::TpSendLength])?;
    attach_raw_tp(
        ctx.ebpf,
        programs::SEND_SOCK_SEND_LENGTH,
        "sock_send_length",
    )?;
    destinations(ctx, report);
    Ok(())
}

/// Beside the tracepoint: where unconnected sends' destinations come from (noted in the
/// report; without them such sends show none).
fn destinations(ctx: &mut Ctx<'_>, report: &mut HopReport) {
    // The destination of unconnected sends is not in the socket: the cgroup hooks that UDP
    // runs for such sends see it; else the syscalls' arguments hold it.
    let cgroup = enabled(CGROUP_SENDMSG).and_then(|()| cgroup_hooks(ctx));
    let cgroup_why = match cgroup {
        Ok(root) => {
            report.notes.push(format!(
                "destinations of unconnected sends from {CGROUP_SENDMSG} at {}",
                root.display()
            ));
            return;
        }
        Err(why) => why,
    };
    let syscalls = need(ctx.layout, &[Group::TpSendSyscalls, Group::UserMsghdr]).and_then(|()| {
        SYSCALL_PROGRAMS
            .iter()
            .try_for_each(|(name, tps)| attach_tp(ctx.ebpf, name, "syscalls", tps))
    });
    match syscalls {
        Ok(()) => report.notes.push(format!(
            "destinations of unconnected sends from syscalls:sys_enter_send{{to,msg,mmsg}} \
             (every syscall is slower while they are attached); {CGROUP_SENDMSG} \
             unusable: {cgroup_why}"
        )),
        Err(why) => {
            unload_all!(TracePoint, ctx.ebpf, SYSCALL_PROGRAMS.map(|(n, _)| n));
            report.notes.push(format!(
                "unconnected sends will show no destination: {CGROUP_SENDMSG} unusable \
                 ({cgroup_why}), syscall tracepoints unusable ({why})"
            ));
        }
    }
}
