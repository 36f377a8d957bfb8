//! The NAT hop: a netfilter link just after NAT where each way through a namespace ends
//! (POSTROUTING, LOCAL_IN), in each covered namespace (Linux 6.4+), reading what NAT at every
//! hook rewrote from the packet's conntrack entry; else kprobes on
//! `nf_nat_manip_pkt`, the function every NAT rewrite goes through.

use aya::programs::KProbe;
use udptrace_common::{programs, Hook};

use crate::{
    kernel::offsets::Group,
    loader::{
        chain::{attach_chain, chain, kprobes, need, program, unload_all, Ctx},
        netfilter,
        report::HopReport,
    },
};

pub fn attach(ctx: &mut Ctx<'_>) -> HopReport {
    attach_chain(
        ctx,
        "nat",
        &[
            ("netfilter-link:nat", links),
            (Hook::KprobeNfNat.name(), kprobe),
        ],
    )
}

fn links(ctx: &mut Ctx<'_>, report: &mut HopReport) -> Result<(), String> {
    need(
        ctx.layout,
        &[Group::Skb, Group::Sock, Group::NfState, Group::Conntrack],
    )?;
    let progs = netfilter::load_programs(ctx.object(), ctx.ebpf, &[programs::NAT_AFTER])?;
    ctx.netfilter.add_nat(progs);
    report.notes.push(if ctx.netfilter.deliver_at_nat {
        "linked after NAT at postrouting and at the end of LOCAL_IN (where it also notes the \
         skb for the deliver hop); what NAT rewrote at every hook before, from conntrack"
            .into()
    } else {
        "linked after NAT at postrouting and input; what NAT rewrote at every hook before, \
         from conntrack"
            .into()
    });
    report.notes.push(
        "the destination NAT of a datagram dropped before these links is read at the drop hop"
            .into(),
    );
    Ok(())
}

/// `unsigned int nf_nat_manip_pkt(struct sk_buff *skb, struct nf_conn *ct, enum nf_nat_manip_type
/// mtype, enum ip_conntrack_dir dir)`: entry and return.
fn kprobe(ctx: &mut Ctx<'_>, report: &mut HopReport) -> Result<(), String> {
    kprobes()?;
    need(ctx.layout, &[Group::Skb, Group::Sock])?;
    let progs = [programs::NAT_KPROBE_MANIP, programs::NAT_KRETPROBE_MANIP];
    let result = progs.iter().try_for_each(|name| {
        let prog: &mut KProbe = program(ctx.ebpf, name)?;
        prog.load()
            .map_err(|e| format!("loading {name}: {}", chain(&e)))?;
        prog.attach("nf_nat_manip_pkt", 0).map(drop).map_err(|e| {
            format!(
                "attaching to nf_nat_manip_pkt: {} (is the nf_nat module loaded? it is once a \
                 NAT rule exists)",
                chain(&e)
            )
        })
    });
    if result.is_err() {
        unload_all!(KProbe, ctx.ebpf, progs);
        return result;
    }
    report.notes.push(
        "NAT seen in nf_nat_manip_pkt in every namespace; the hook is inferred (DNAT of a \
         local socket's datagram: output, else prerouting; SNAT: postrouting)"
            .into(),
    );
    Ok(())
}
