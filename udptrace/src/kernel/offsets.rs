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
    /// Tracepoint `sock:sock_send_length`.
    TpSendLength,
    /// Tracepoints `syscalls:sys_enter_send{to,msg,mmsg}`.
    TpSendSyscalls,
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

        let no_tracefs = || super::tracefs::TracefsError::NotMounted.to_string();
        group(
            Group::TpSendLength,
            (|| {
                let fs = tracefs.ok_or_else(no_tracefs)?;
                let f = fs
                    .format("sock", "sock_send_length")
                    .map_err(|e| e.to_string())?;
                let off = |name: &str| f.offset(name).map_err(|e| e.to_string());
                o.tp_send_sk = off("sk")?;
                o.tp_send_family = off("family")?;
                o.tp_send_protocol = off("protocol")?;
                o.tp_send_ret = off("ret")?;
                Ok(())
            })(),
        );

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

        Self {
            offsets: o,
            problems,
        }
    }
}
