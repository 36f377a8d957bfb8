//! rtnetlink in one network namespace: the devices it has, the tc filters on a clsact
//! qdisc, removing a clsact qdisc, and a socket that hears about devices coming and going.
//! A netlink socket talks to the namespace of the thread that opened it.

use std::io;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_route::{
    link::{LinkAttribute, LinkMessage},
    tc::{TcAttribute, TcFilterBpfOption, TcHandle, TcMessage, TcOption},
    RouteNetlinkMessage,
};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// RTMGRP_LINK: device added, changed or removed.
const RTMGRP_LINK: u32 = 1;

/// A request/response socket in the calling thread's namespace.
pub struct Rtnl {
    socket: Socket,
    seq: u32,
}

impl Rtnl {
    pub fn open() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Self { socket, seq: 0 })
    }

    /// Sends `msg` and collects the answer: every message of a dump, or nothing for an
    /// acknowledged request. A netlink error becomes an `io::Error`.
    fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.seq += 1;
        let mut packet = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(msg));
        packet.header.flags = NLM_F_REQUEST | flags;
        packet.header.sequence_number = self.seq;
        packet.finalize();
        let mut buf = vec![0; packet.buffer_len()];
        packet.serialize(&mut buf);
        self.socket.send(&buf, 0)?;
        let mut answers = Vec::new();
        let mut rx = vec![0u8; 1 << 16];
        loop {
            let size = self.socket.recv(&mut &mut rx[..], 0)?;
            let mut at = 0;
            while at < size {
                let reply: NetlinkMessage<RouteNetlinkMessage> =
                    NetlinkMessage::deserialize(&rx[at..size])
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let len = reply.header.length as usize;
                if reply.header.sequence_number == self.seq {
                    match reply.payload {
                        NetlinkPayload::Done(_) => return Ok(answers),
                        NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io()),
                        // The acknowledgement of a request that is not a dump.
                        NetlinkPayload::Error(_) => return Ok(answers),
                        NetlinkPayload::InnerMessage(m) => answers.push(m),
                        _ => {}
                    }
                }
                if len == 0 {
                    break;
                }
                at += len;
            }
            if flags & NLM_F_DUMP == 0 && flags & NLM_F_ACK == 0 {
                return Ok(answers);
            }
        }
    }

    /// Every device of the namespace: index and name.
    pub fn links(&mut self) -> io::Result<Vec<(u32, String)>> {
        let answers = self.request(
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            NLM_F_DUMP,
        )?;
        Ok(answers
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(link) => {
                    let name = link.attributes.iter().find_map(|a| match a {
                        LinkAttribute::IfName(n) => Some(n.clone()),
                        _ => None,
                    })?;
                    Some((link.header.index, name))
                }
                _ => None,
            })
            .collect())
    }

    /// How many tc filters hang off the clsact qdisc of `ifindex` (ingress and egress).
    pub fn clsact_filters(&mut self, ifindex: u32) -> io::Result<usize> {
        let mut total = 0;
        for minor in [TcHandle::MIN_INGRESS, TcHandle::MIN_EGRESS] {
            let mut msg = TcMessage::with_index(ifindex as i32);
            msg.header.parent = TcHandle {
                major: TcHandle::CLSACT.major,
                minor,
            };
            total += self
                .request(RouteNetlinkMessage::GetTrafficFilter(msg), NLM_F_DUMP)?
                .len();
        }
        Ok(total)
    }

    /// The BPF filters on the clsact ingress of `ifindex` whose program is named `name`.
    pub fn ingress_bpf_filters(&mut self, ifindex: u32, name: &str) -> io::Result<Vec<BpfFilter>> {
        let mut msg = TcMessage::with_index(ifindex as i32);
        msg.header.parent = TcHandle {
            major: TcHandle::CLSACT.major,
            minor: TcHandle::MIN_INGRESS,
        };
        let answers = self.request(RouteNetlinkMessage::GetTrafficFilter(msg), NLM_F_DUMP)?;
        Ok(answers
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewTrafficFilter(f) => Some(f),
                _ => None,
            })
            .filter_map(|f| {
                let options = f.attributes.iter().find_map(|a| match a {
                    TcAttribute::Options(o) => Some(o),
                    _ => None,
                })?;
                let (mut prog, mut prog_id) = (None, None);
                for option in options {
                    match option {
                        TcOption::Bpf(TcFilterBpfOption::ProgName(n)) => prog = Some(n),
                        TcOption::Bpf(TcFilterBpfOption::ProgId(id)) => prog_id = Some(*id),
                        _ => {}
                    }
                }
                prog?.starts_with(name).then_some(BpfFilter {
                    info: f.header.info,
                    handle: f.header.handle,
                    prog_id: prog_id?,
                })
            })
            .collect())
    }

    /// Removes one filter (as listed by [`Rtnl::ingress_bpf_filters`]) from `ifindex`.
    pub fn delete_ingress_filter(&mut self, ifindex: u32, filter: &BpfFilter) -> io::Result<()> {
        let mut msg = TcMessage::with_index(ifindex as i32);
        msg.header.parent = TcHandle {
            major: TcHandle::CLSACT.major,
            minor: TcHandle::MIN_INGRESS,
        };
        msg.header.handle = filter.handle;
        msg.header.info = filter.info;
        msg.attributes.push(TcAttribute::Kind("bpf".into()));
        self.request(RouteNetlinkMessage::DelTrafficFilter(msg), NLM_F_ACK)
            .map(drop)
    }

    /// Removes the clsact qdisc of `ifindex`.
    pub fn delete_clsact(&mut self, ifindex: u32) -> io::Result<()> {
        let mut msg = TcMessage::with_index(ifindex as i32);
        msg.header.parent = TcHandle::CLSACT;
        msg.header.handle = TcHandle {
            major: TcHandle::CLSACT.major,
            minor: 0,
        };
        msg.attributes.push(TcAttribute::Kind("clsact".into()));
        self.request(RouteNetlinkMessage::DelQueueDiscipline(msg), NLM_F_ACK)
            .map(drop)
    }
}

/// A BPF tc filter: where it is (priority and protocol in `info`, `handle`) and its program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BpfFilter {
    pub info: u32,
    pub handle: TcHandle,
    pub prog_id: u32,
}

/// A non-blocking socket subscribed to device changes in the namespace it was opened in.
pub struct LinkMonitor(Socket);

impl LinkMonitor {
    pub fn open() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind(&SocketAddr::new(0, RTMGRP_LINK))?;
        socket.set_non_blocking(true)?;
        Ok(Self(socket))
    }

    /// Drains what arrived; true when any device changed since the last call (an overrun
    /// counts as a change: the caller rescans anyway).
    pub fn changed(&self) -> bool {
        let mut buf = vec![0u8; 1 << 16];
        let mut changed = false;
        loop {
            match self.0.recv(&mut &mut buf[..], 0) {
                Ok(0) => return changed,
                Ok(_) => changed = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return changed,
                Err(_) => return true,
            }
        }
    }
}
