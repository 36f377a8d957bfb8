//! The one place that names hooks and programs.
//!
//! [`Hook`] is which kernel hook produced an event (`EventHeader::hook`), with the name a
//! path shows for it; [`programs`] names every program of the eBPF object, as the loader
//! asks for it and as its function is called in `udptrace-ebpf` (a test of the loader checks
//! that each one is in the built object).

/// Which kernel hook produced an event: `EventHeader::hook` holds `hook as u16`.
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Hook {
    /// A number this build does not know (a record from a newer kernel side, or corrupted).
    Unknown = 0,
    FentryUdpSendmsg = 1,
    FentryUdpv6Sendmsg = 2,
    KprobeUdpSendmsg = 3,
    KprobeUdpv6Sendmsg = 4,
    TpSockSendLength = 5,
    TpNetDevStartXmit = 6,
    TpKfreeSkb = 7,
    NetfilterLink = 8,
    FexitUdpEnqueue = 9,
    TpSkDataReady = 10,
    FexitUdpRecvmsg = 11,
    TpSockRecvLength = 12,
    KprobeNfNat = 13,
    TcxIngress = 14,
    TcClsactIngress = 15,
    CgroupSkbEgress = 16,
    TpBtfNetDevStartXmit = 17,
    TpBtfSockSendLength = 18,
    TpBtfKfreeSkb = 19,
}

impl Hook {
    /// Every hook, `Unknown` first.
    pub const ALL: [Hook; 20] = [
        Hook::Unknown,
        Hook::FentryUdpSendmsg,
        Hook::FentryUdpv6Sendmsg,
        Hook::KprobeUdpSendmsg,
        Hook::KprobeUdpv6Sendmsg,
        Hook::TpSockSendLength,
        Hook::TpNetDevStartXmit,
        Hook::TpKfreeSkb,
        Hook::NetfilterLink,
        Hook::FexitUdpEnqueue,
        Hook::TpSkDataReady,
        Hook::FexitUdpRecvmsg,
        Hook::TpSockRecvLength,
        Hook::KprobeNfNat,
        Hook::TcxIngress,
        Hook::TcClsactIngress,
        Hook::CgroupSkbEgress,
        Hook::TpBtfNetDevStartXmit,
        Hook::TpBtfSockSendLength,
        Hook::TpBtfKfreeSkb,
    ];

    /// The hook of `EventHeader::hook`; `Unknown` for a number not listed.
    pub const fn from_u16(v: u16) -> Hook {
        let mut i = 1;
        while i < Self::ALL.len() {
            if Self::ALL[i] as u16 == v {
                return Self::ALL[i];
            }
            i += 1;
        }
        Hook::Unknown
    }

    /// The name a hop shows in `hook` (docs/json.md): `family:target`.
    pub const fn name(self) -> &'static str {
        match self {
            Hook::Unknown => "unknown",
            Hook::FentryUdpSendmsg => "fentry:udp_sendmsg",
            Hook::FentryUdpv6Sendmsg => "fentry:udpv6_sendmsg",
            Hook::KprobeUdpSendmsg => "kprobe:udp_sendmsg",
            Hook::KprobeUdpv6Sendmsg => "kprobe:udpv6_sendmsg",
            Hook::TpSockSendLength => "raw_tracepoint:sock:sock_send_length",
            Hook::TpNetDevStartXmit => "raw_tracepoint:net:net_dev_start_xmit",
            Hook::TpKfreeSkb => "raw_tracepoint:skb:kfree_skb",
            Hook::NetfilterLink => "netfilter-link",
            Hook::FexitUdpEnqueue => "fexit:__udp_enqueue_schedule_skb",
            Hook::TpSkDataReady => "netfilter-link+raw_tracepoint:sock:sk_data_ready",
            Hook::FexitUdpRecvmsg => "fexit:udp_recvmsg",
            Hook::TpSockRecvLength => "raw_tracepoint:sock:sock_recv_length",
            Hook::KprobeNfNat => "kprobe:nf_nat_manip_pkt",
            Hook::TcxIngress => "tcx:ingress",
            Hook::TcClsactIngress => "tc:clsact-ingress",
            Hook::CgroupSkbEgress => "cgroup_skb:egress",
            Hook::TpBtfNetDevStartXmit => "tp_btf:net:net_dev_start_xmit",
            Hook::TpBtfSockSendLength => "tp_btf:sock:sock_send_length",
            Hook::TpBtfKfreeSkb => "tp_btf:skb:kfree_skb",
        }
    }

    /// Whether this send hook runs once the send is over, after the datagram's skb hops
    /// (the tracepoint), rather than on entry to UDP.
    pub const fn sends_after_skbs(self) -> bool {
        matches!(self, Hook::TpSockSendLength | Hook::TpBtfSockSendLength)
    }

    /// The hook named `name` (as [`Hook::name`] spells it), if any.
    pub fn from_name(name: &str) -> Option<Hook> {
        Self::ALL.iter().copied().find(|h| h.name() == name)
    }
}

/// Every program in the eBPF object, by the name of its function in `udptrace-ebpf`.
pub mod programs {
    /// fentry `udp_sendmsg` / `udpv6_sendmsg`.
    pub const SEND_FENTRY_UDP_SENDMSG: &str = "send_fentry_udp_sendmsg";
    pub const SEND_FENTRY_UDPV6_SENDMSG: &str = "send_fentry_udpv6_sendmsg";
    /// kprobe `udp_sendmsg` / `udpv6_sendmsg`.
    pub const SEND_KPROBE_UDP_SENDMSG: &str = "send_kprobe_udp_sendmsg";
    pub const SEND_KPROBE_UDPV6_SENDMSG: &str = "send_kprobe_udpv6_sendmsg";
    /// Tracepoint `sock_send_length`, typed (BTF) or raw.
    pub const SEND_BTF_SOCK_SEND_LENGTH: &str = "send_btf_sock_send_length";
    pub const SEND_SOCK_SEND_LENGTH: &str = "send_sock_send_length";
    /// cgroup `sendmsg4` / `sendmsg6` (unconnected sends' destinations).
    pub const SEND_CGROUP_SENDMSG4: &str = "send_cgroup_sendmsg4";
    pub const SEND_CGROUP_SENDMSG6: &str = "send_cgroup_sendmsg6";
    /// Tracepoints `syscalls:sys_enter_send{to,msg,mmsg}` and their exits.
    pub const SEND_ENTER_SENDTO: &str = "send_enter_sendto";
    pub const SEND_ENTER_SENDMSG: &str = "send_enter_sendmsg";
    pub const SEND_ENTER_SENDMMSG: &str = "send_enter_sendmmsg";
    pub const SEND_EXIT: &str = "send_exit";
    /// Netfilter program just after NAT.
    pub const NAT_AFTER: &str = "nat_after";
    /// kprobe and kretprobe `nf_nat_manip_pkt`.
    pub const NAT_KPROBE_MANIP: &str = "nat_kprobe_manip";
    pub const NAT_KRETPROBE_MANIP: &str = "nat_kretprobe_manip";
    /// Typed (BTF) tracepoint `net_dev_start_xmit`, else the raw one.
    pub const XMIT_BTF_START_XMIT: &str = "xmit_btf_start_xmit";
    pub const XMIT_START_XMIT: &str = "xmit_start_xmit";
    /// Tracepoint `kfree_skb` typed (BTF) or raw, and raw `consume_skb` (where sampling
    /// forgets an skb).
    pub const DROP_BTF_KFREE_SKB: &str = "drop_btf_kfree_skb";
    pub const DROP_KFREE_SKB: &str = "drop_kfree_skb";
    pub const SAMPLE_CONSUME_SKB: &str = "sample_consume_skb";
    /// fentry and fexit `__udp_enqueue_schedule_skb` (read on entry, sent on return).
    pub const DELIVER_FENTRY_ENQUEUE: &str = "deliver_fentry_enqueue";
    pub const DELIVER_FEXIT_ENQUEUE: &str = "deliver_fexit_enqueue";
    /// Netfilter program last at LOCAL_IN, and raw tracepoint `sk_data_ready`.
    pub const DELIVER_LOCAL_IN: &str = "deliver_local_in";
    pub const DELIVER_SK_DATA_READY: &str = "deliver_sk_data_ready";
    /// fexit `udp_recvmsg` / `udpv6_recvmsg`, raw tracepoint `sock_recv_length`.
    pub const RECV_FEXIT_UDP_RECVMSG: &str = "recv_fexit_udp_recvmsg";
    pub const RECV_FEXIT_UDPV6_RECVMSG: &str = "recv_fexit_udpv6_recvmsg";
    pub const RECV_SOCK_RECV_LENGTH: &str = "recv_sock_recv_length";
    /// tc ingress: a tcx link, or a clsact filter.
    pub const INGRESS_TCX: &str = "ingress_tcx";
    pub const INGRESS_CLSACT: &str = "ingress_clsact";

    /// cgroup_skb egress at the cgroup v2 root: every datagram sent, counted per flow.
    pub const COUNT_CGROUP_EGRESS: &str = "count_cgroup_egress";

    /// Every program name above.
    pub const ALL: [&str; 30] = [
        SEND_FENTRY_UDP_SENDMSG,
        SEND_FENTRY_UDPV6_SENDMSG,
        SEND_KPROBE_UDP_SENDMSG,
        SEND_KPROBE_UDPV6_SENDMSG,
        SEND_BTF_SOCK_SEND_LENGTH,
        SEND_SOCK_SEND_LENGTH,
        SEND_CGROUP_SENDMSG4,
        SEND_CGROUP_SENDMSG6,
        SEND_ENTER_SENDTO,
        SEND_ENTER_SENDMSG,
        SEND_ENTER_SENDMMSG,
        SEND_EXIT,
        NAT_AFTER,
        NAT_KPROBE_MANIP,
        NAT_KRETPROBE_MANIP,
        XMIT_BTF_START_XMIT,
        XMIT_START_XMIT,
        DROP_BTF_KFREE_SKB,
        DROP_KFREE_SKB,
        SAMPLE_CONSUME_SKB,
        DELIVER_FENTRY_ENQUEUE,
        DELIVER_FEXIT_ENQUEUE,
        DELIVER_LOCAL_IN,
        DELIVER_SK_DATA_READY,
        RECV_FEXIT_UDP_RECVMSG,
        RECV_FEXIT_UDPV6_RECVMSG,
        RECV_SOCK_RECV_LENGTH,
        INGRESS_TCX,
        INGRESS_CLSACT,
        COUNT_CGROUP_EGRESS,
    ];
}

impl core::fmt::Display for Hook {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}
