//! Fills [`Offsets`] for the running kernel and remembers which groups of facts are missing,
//! so the loader can refuse exactly the hooks that need them, with the reason.

use udptrace_common::Offsets;

use super::{btf::KernelBtf, tracefs::Tracefs};

/// A group of offsets that hooks need together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    /// `struct sock` addresses, ports, family and netns.
    Sock,
    /// Kernel `struct msghdr` (fentry/kprobe destination of unconnected sends).
    Msghdr,
    /// `struct user_msghdr`/`mmsghdr` (tracepoint destination of sendmsg/sendmmsg).
    UserMsghdr,
    /// Raw tracepoint `sock_send_length(struct sock *, int ret, ...)`.
    TpSendLength,
    /// Tracepoints `syscalls:sys_enter_send{to,msg,mmsg}`.
    TpSendSyscalls,
    /// `struct sk_buff` headers, device and socket; `struct net_device` name, index, netns.
    Skb,
    /// Raw tracepoint `net_dev_start_xmit(struct sk_buff *, ...)`.
    TpXmit,
    /// Raw tracepoints `kfree_skb(struct sk_buff *, void *, enum skb_drop_reason, ...)` and
    /// `consume_skb(struct sk_buff *, ...)`: where skbs end.
    TpDrop,
    /// `struct nf_hook_state` (netfilter program context).
    NfState,
    /// Raw tracepoint `sk_data_ready(struct sock *)`.
    TpReady,
    /// Raw tracepoint `sock_recv_length(struct sock *, int ret, ...)`.
    TpRecv,
    /// From a `struct sock` to its socket's inode number.
    SockInode,
    /// From an skb to its conntrack entry's tuples.
    Conntrack,
    /// A task's thread-group leader and name (without: a thread's name stands for its
    /// process's).
    Task,
    /// An skb's GSO segment size and count (without: a GSO skb looks like one datagram).
    Gso,
    /// A UDP socket's `UDP_GRO` flag (without: a delivery of several datagrams does not say
    /// whether the receiver reads them as one buffer).
    UdpGro,
}

/// Offsets for this kernel, and why any group could not be filled.
pub struct KernelLayout {
    pub offsets: Offsets,
    problems: Vec<(Group, String)>,
}

impl KernelLayout {
    /// Why `group` is unavailable, or `None` when all its offsets were found.
    pub fn missing(&self, group: Group) -> Option<&str> {
        self.problems
            .iter()
            .find(|(g, _)| *g == group)
            .map(|(_, why)| why.as_str())
    }

    /// Reads every offset from `btf` and, where tracefs is mounted, from event formats.
    pub fn resolve(btf: &KernelBtf, tracefs: Option<&Tracefs>) -> Self {
        let mut o = Offsets::MISSING;
        let mut problems = Vec::new();
        let mut group = |g: Group, r: Result<(), String>| {
            if let Err(why) = r {
                problems.push((g, why));
            }
        };

        group(
            Group::Sock,
            (|| {
                let sk = |f: &str| {
                    btf.offset_of("sock", &["__sk_common", f])
                        .map_err(|e| e.to_string())
                };
                o.sk_family = sk("skc_family")?;
                o.sk_protocol = btf
                    .offset_of("sock", &["sk_protocol"])
                    .map_err(|e| e.to_string())?;
                o.sk_num = sk("skc_num")?;
                o.sk_dport = sk("skc_dport")?;
                o.sk_rcv_saddr = sk("skc_rcv_saddr")?;
                o.sk_daddr = sk("skc_daddr")?;
                o.sk_v6_rcv_saddr = sk("skc_v6_rcv_saddr")?;
                o.sk_v6_daddr = sk("skc_v6_daddr")?;
                o.sk_net = btf
                    .offset_of("sock", &["__sk_common", "skc_net", "net"])
                    .map_err(|e| e.to_string())?;
                o.net_inum = btf
                    .offset_of("net", &["ns", "inum"])
                    .map_err(|e| e.to_string())?;
                Ok(())
            })(),
        );

        group(
            Group::Msghdr,
            (|| {
                o.msghdr_name = btf
                    .offset_of("msghdr", &["msg_name"])
                    .map_err(|e| e.to_string())?;
                o.msghdr_namelen = btf
                    .offset_of("msghdr", &["msg_namelen"])
                    .map_err(|e| e.to_string())?;
                Ok(())
            })(),
        );

        group(
            Group::UserMsghdr,
            (|| {
                let f = |s: &str| {
                    btf.offset_of("user_msghdr", &[s])
                        .map_err(|e| e.to_string())
                };
                o.user_msghdr_name = f("msg_name")?;
                o.user_msghdr_namelen = f("msg_namelen")?;
                o.mmsghdr_size = btf.size_of("mmsghdr").map_err(|e| e.to_string())?;
                Ok(())
            })(),
        );

        // Raw tracepoints get the TP_PROTO arguments themselves, by position: check the
        // positions udptrace reads hold the types it expects.
        let raw_tp = |tp: &str, want: &[&str]| -> Result<(), String> {
            let args = btf.tracepoint_args(tp).map_err(|e| e.to_string())?;
            for (i, want) in want.iter().enumerate() {
                let got = args.get(i).map_or("missing", String::as_str);
                if got != *want {
                    return Err(format!(
                        "tracepoint {tp}: argument {i} is {got}, udptrace expects {want}"
                    ));
                }
            }
            Ok(())
        };
        group(
            Group::TpSendLength,
            raw_tp("sock_send_length", &["struct sock *", "int"]),
        );

        let no_tracefs = || super::tracefs::TracefsError::NotMounted.to_string();

        group(
            Group::TpSendSyscalls,
            (|| {
                let fs = tracefs.ok_or_else(no_tracefs)?;
                let fmt = |n: &str| fs.format("syscalls", n).map_err(|e| e.to_string());
                let (sendto, sendmsg, sendmmsg) = (
                    fmt("sys_enter_sendto")?,
                    fmt("sys_enter_sendmsg")?,
                    fmt("sys_enter_sendmmsg")?,
                );
                for exit in ["sys_exit_sendto", "sys_exit_sendmsg", "sys_exit_sendmmsg"] {
                    if !fs.exists("syscalls", exit) {
                        return Err(format!(
                            "tracepoint syscalls:{exit} does not exist on this kernel"
                        ));
                    }
                }
                let off =
                    |f: &super::tracefs::Format, n: &str| f.offset(n).map_err(|e| e.to_string());
                o.tp_sendto_addr = off(&sendto, "addr")?;
                o.tp_sendto_addr_len = off(&sendto, "addr_len")?;
                o.tp_sendmsg_msg = off(&sendmsg, "msg")?;
                o.tp_sendmmsg_mmsg = off(&sendmmsg, "mmsg")?;
                o.tp_sendmmsg_vlen = off(&sendmmsg, "vlen")?;
                Ok(())
            })(),
        );

        group(
            Group::Skb,
            (|| {
                let skb = |f: &str| btf.offset_of("sk_buff", &[f]).map_err(|e| e.to_string());
                o.skb_head = skb("head")?;
                o.skb_network_header = skb("network_header")?;
                o.skb_transport_header = skb("transport_header")?;
                o.skb_dev = skb("dev")?;
                o.skb_sk = skb("sk")?;
                let dev = |f: &[&str]| btf.offset_of("net_device", f).map_err(|e| e.to_string());
                o.dev_ifindex = dev(&["ifindex"])?;
                o.dev_name = dev(&["name"])?;
                o.dev_net = dev(&["nd_net", "net"])?;
                o.dev_mtu = dev(&["mtu"])?;
                o.dev_link_ops = dev(&["rtnl_link_ops"])?;
                o.link_ops_kind = btf
                    .offset_of("rtnl_link_ops", &["kind"])
                    .map_err(|e| e.to_string())?;
                Ok(())
            })(),
        );

        group(
            Group::TpXmit,
            raw_tp("net_dev_start_xmit", &["struct sk_buff *"]),
        );
        group(
            Group::TpDrop,
            raw_tp(
                "kfree_skb",
                &["struct sk_buff *", "void *", "enum skb_drop_reason"],
            )
            .and_then(|()| raw_tp("consume_skb", &["struct sk_buff *"])),
        );

        group(
            Group::NfState,
            (|| {
                o.nf_state_hook = btf
                    .offset_of("nf_hook_state", &["hook"])
                    .map_err(|e| e.to_string())?;
                Ok(())
            })(),
        );

        group(Group::TpReady, raw_tp("sk_data_ready", &["struct sock *"]));
        group(
            Group::TpRecv,
            raw_tp("sock_recv_length", &["struct sock *", "int"]),
        );

        group(
            Group::SockInode,
            (|| {
                let f = |s: &str, path: &[&str]| btf.offset_of(s, path).map_err(|e| e.to_string());
                o.sk_socket = f("sock", &["sk_socket"])?;
                o.socket_file = f("socket", &["file"])?;
                o.file_inode = f("file", &["f_inode"])?;
                o.inode_ino = f("inode", &["i_ino"])?;
                Ok(())
            })(),
        );

        group(
            Group::Conntrack,
            (|| {
                let f = |s: &str, path: &[&str]| btf.offset_of(s, path).map_err(|e| e.to_string());
                o.skb_nfct = f("sk_buff", &["_nfct"])?;
                o.ct_tuplehash = f("nf_conn", &["tuplehash"])?;
                o.ct_tuplehash_size = btf
                    .size_of("nf_conntrack_tuple_hash")
                    .map_err(|e| e.to_string())?;
                o.ct_hash_tuple = f("nf_conntrack_tuple_hash", &["tuple"])?;
                o.tuple_src_u3 = f("nf_conntrack_tuple", &["src", "u3"])?;
                o.tuple_src_port = f("nf_conntrack_tuple", &["src", "u", "all"])?;
                o.tuple_l3num = f("nf_conntrack_tuple", &["src", "l3num"])?;
                o.tuple_dst_u3 = f("nf_conntrack_tuple", &["dst", "u3"])?;
                o.tuple_dst_port = f("nf_conntrack_tuple", &["dst", "u", "all"])?;
                o.ct_status = f("nf_conn", &["status"])?;
                Ok(())
            })(),
        );

        group(
            Group::Task,
            (|| {
                let f = |path: &[&str]| {
                    btf.offset_of("task_struct", path)
                        .map_err(|e| e.to_string())
                };
                o.task_group_leader = f(&["group_leader"])?;
                o.task_comm = f(&["comm"])?;
                Ok(())
            })(),
        );

        group(
            Group::Gso,
            (|| {
                let f = |s: &str, path: &[&str]| btf.offset_of(s, path).map_err(|e| e.to_string());
                o.skb_end = f("sk_buff", &["end"])?;
                o.shinfo_gso_size = f("skb_shared_info", &["gso_size"])?;
                o.shinfo_gso_segs = f("skb_shared_info", &["gso_segs"])?;
                Ok(())
            })(),
        );

        group(
            Group::UdpGro,
            (|| {
                // `struct udp_sock` starts with its `struct sock`: offsets in it are offsets
                // from the socket. Since 6.6 the flag is a bit of `udp_flags` (little-endian
                // here), before a bitfield.
                let bit = match btf.bit_offset_of("udp_sock", "udp_flags") {
                    Ok(flags) => {
                        let gro = btf.enumerator("UDP_FLAGS_GRO_ENABLED").ok_or(
                            "struct udp_sock has udp_flags but no enumerator UDP_FLAGS_GRO_ENABLED",
                        )?;
                        flags + gro as u32
                    }
                    Err(_) => btf
                        .bit_offset_of("udp_sock", "gro_enabled")
                        .map_err(|e| e.to_string())?,
                };
                o.udp_gro_byte = bit / 8;
                o.udp_gro_mask = 1 << (bit % 8);
                Ok(())
            })(),
        );

        Self {
            offsets: o,
            problems,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every offset is either found on the running kernel (host or VM) or its group names
    /// why not, so no hook ever runs with an offset nobody filled.
    #[test]
    fn every_offset_is_filled_or_its_group_says_why() {
        let Ok(btf) = KernelBtf::running() else {
            eprintln!("skipped: no kernel BTF");
            return;
        };
        let tracefs = Tracefs::find().ok();
        let layout = KernelLayout::resolve(&btf, tracefs.as_ref());
        let o = layout.offsets;
        let groups: [(Group, &[u32]); 16] = [
            (
                Group::Sock,
                &[
                    o.sk_family,
                    o.sk_protocol,
                    o.sk_num,
                    o.sk_dport,
                    o.sk_rcv_saddr,
                    o.sk_daddr,
                    o.sk_v6_rcv_saddr,
                    o.sk_v6_daddr,
                    o.sk_net,
                    o.net_inum,
                ],
            ),
            (Group::Msghdr, &[o.msghdr_name, o.msghdr_namelen]),
            (
                Group::UserMsghdr,
                &[o.user_msghdr_name, o.user_msghdr_namelen, o.mmsghdr_size],
            ),
            (Group::TpSendLength, &[]),
            (
                Group::TpSendSyscalls,
                &[
                    o.tp_sendto_addr,
                    o.tp_sendto_addr_len,
                    o.tp_sendmsg_msg,
                    o.tp_sendmmsg_mmsg,
                    o.tp_sendmmsg_vlen,
                ],
            ),
            (
                Group::Skb,
                &[
                    o.skb_head,
                    o.skb_network_header,
                    o.skb_transport_header,
                    o.skb_dev,
                    o.skb_sk,
                    o.dev_ifindex,
                    o.dev_name,
                    o.dev_net,
                    o.dev_mtu,
                    o.dev_link_ops,
                    o.link_ops_kind,
                ],
            ),
            (Group::TpXmit, &[]),
            (Group::TpDrop, &[]),
            (Group::NfState, &[o.nf_state_hook]),
            (Group::TpReady, &[]),
            (Group::TpRecv, &[]),
            (
                Group::SockInode,
                &[o.sk_socket, o.socket_file, o.file_inode, o.inode_ino],
            ),
            (
                Group::Conntrack,
                &[
                    o.skb_nfct,
                    o.ct_tuplehash,
                    o.ct_tuplehash_size,
                    o.ct_hash_tuple,
                    o.tuple_src_u3,
                    o.tuple_src_port,
                    o.tuple_l3num,
                    o.tuple_dst_u3,
                    o.tuple_dst_port,
                    o.ct_status,
                ],
            ),
            (Group::Task, &[o.task_group_leader, o.task_comm]),
            (
                Group::Gso,
                &[o.skb_end, o.shinfo_gso_size, o.shinfo_gso_segs],
            ),
            (Group::UdpGro, &[o.udp_gro_byte, o.udp_gro_mask]),
        ];
        for (group, values) in groups {
            let unfilled = values.contains(&udptrace_common::OFFSET_MISSING);
            match layout.missing(group) {
                Some(why) => eprintln!("{group:?} unavailable here: {why}"),
                None => assert!(!unfilled, "{group:?} has an unfilled offset but no reason"),
            }
        }
        // Struct layouts every supported kernel has.
        assert_eq!(layout.missing(Group::Sock), None);
        assert_eq!(layout.missing(Group::Skb), None);
        assert_eq!(layout.missing(Group::SockInode), None);
        assert_eq!(layout.missing(Group::Conntrack), None);
    }
}
