//! The deliver hop: fexit on the UDP enqueue, else a netfilter link at the end of LOCAL_IN
//! paired with raw tracepoint `sk_data_ready`. And the recv hop (who reads the receiving
//! socket): fexit on `udp_recvmsg`, else raw tracepoint `sock_recv_length`.

use aya::programs::{FEntry, FExit};
use udptrace_common::{programs, Hook};

use crate::{
    kernel::offsets::Group,
    loader::{
        chain::{attach_chain, attach_fentry, attach_fexit, attach_raw_tp, need, unload_all, Ctx},
        netfilter,
        report::HopReport,
    },
};

pub fn attach(ctx: &mut Ctx<'_>) -> HopReport {
    let mut report = attach_chain(
        ctx,
        "deliver",
        &[
            (Hook::FexitUdpEnqueue.name(), fexit),
            (
                "netfilter-link:local_in+raw_tracepoint:sock:sk_data_ready",
                local_in_then_ready,
            ),
        ],
    );
    if let Some(why) = ctx.layout.missing(Group::UdpGro) {
        report.notes.push(format!(
            "a delivery of several datagrams in one skb does not say whether the receiver \
             reads them as one buffer (UDP_GRO): {why}"
        ));
    }
    report
}

pub fn attach_recv(ctx: &mut Ctx<'_>) -> HopReport {
    attach_chain(
        ctx,
        "recv",
        &[
            ("fexit:udp_recvmsg+udpv6_recvmsg", fexit_recv),
            (Hook::TpSockRecvLength.name(), raw_tp_recv),
        ],
    )
}

/// `int __udp_enqueue_schedule_skb(struct sock *sk, struct sk_buff *skb)`: the hop read on
/// entry, sent on return.
fn fexit(ctx: &mut Ctx<'_>, _: &mut HopReport) -> Result<(), String> {
    need(ctx.layout, &[Group::Skb, Group::Sock])?;
    const ENQUEUE: &str = "__udp_enqueue_schedule_skb";
    attach_fentry(ctx.ebpf, programs::DELIVER_FENTRY_ENQUEUE, ENQUEUE)?;
    let result = attach_fexit(ctx.ebpf, programs::DELIVER_FEXIT_ENQUEUE, ENQUEUE);
    if result.is_err() {
        unload_all!(FEntry, ctx.ebpf, [programs::DELIVER_FENTRY_ENQUEUE]);
    }
    result
}

fn local_in_then_ready(ctx: &mut Ctx<'_>, report: &mut HopReport) -> Result<(), String> {
    need(ctx.layout, &[Group::Skb, Group::Sock, Group::TpReady])?;
    let progs = netfilter::load_programs(ctx.object(), ctx.ebpf, &[programs::DELIVER_LOCAL_IN])?;
    attach_raw_tp(ctx.ebpf, programs::DELIVER_SK_DATA_READY, "sk_data_ready")?;
    ctx.netfilter.add_deliver(progs);
    report
        .notes
        .push("linked last at LOCAL_IN (priority 1000)".into());
    Ok(())
}

/// `int udp_recvmsg(struct sock *sk, struct msghdr *msg, size_t len, int flags, int
/// *addr_len)`, and the IPv6 twin.
fn fexit_recv(ctx: &mut Ctx<'_>, _: &mut HopReport) -> Result<(), String> {
    let progs = [
        (programs::RECV_FEXIT_UDP_RECVMSG, "udp_recvmsg"),
        (programs::RECV_FEXIT_UDPV6_RECVMSG, "udpv6_recvmsg"),
    ];
    let result = progs
        .iter()
        .try_for_each(|(name, func)| attach_fexit(ctx.ebpf, name, func));
    if result.is_err() {
        unload_all!(FExit, ctx.ebpf, progs.map(|(n, _)| n));
    }
    result
}

fn raw_tp_recv(ctx: &mut Ctx<'_>, _: &mut HopReport) -> Result<(), String> {
    // The program reads the socket's protocol (a Sock offset).
    need(ctx.layout, &[Group::Sock, Group::TpRecv])?;
    attach_raw_tp(
        ctx.ebpf,
        programs::RECV_SOCK_RECV_LENGTH,
        "sock_recv_length",
    )
}
