//! NAT per flow without per-packet hooks: netfilter's connection tracking says, in each
//! covered network namespace, every UDP connection's tuple as sent and as it is answered
//! (ctnetlink NEW and DESTROY events, and a dump at the start and after lost events). A
//! connection whose reply tuple is not the mirror of its original one was rewritten there.
//!
//! One netlink socket per namespace, opened inside it (a netlink socket talks to the
//! namespace of the thread that opened it), read by a task of its own; the namespace's
//! socket is closed as soon as the namespace is no longer reachable (no process in it, no
//! bind mount): the socket must not be what keeps a dead namespace alive.

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    os::fd::AsRawFd as _,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_netfilter::{
    conntrack::{ConntrackAttribute, ConntrackMessage, IPTuple, ProtoTuple, Protocol, Tuple},
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
};
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket};
use tokio::{
    io::{unix::AsyncFd, Interest},
    sync::mpsc,
    task::JoinHandle,
};

use crate::loader::netns::{self, Namespaces};

/// NFNLGRP_CONNTRACK_NEW and NFNLGRP_CONNTRACK_DESTROY (linux/netfilter/nfnetlink.h).
const GROUP_NEW: u32 = 1;
const GROUP_DESTROY: u32 = 3;
/// The socket's receive buffer: events of a burst of new connections wait here.
const RCVBUF: usize = 8 << 20;
/// Batches of events waiting for the pipeline.
const QUEUE: usize = 256;

/// One connection's tuples in one namespace's conntrack table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Connection {
    /// The namespace's inode (as the kernel programs report it).
    pub netns: u32,
    /// Source and destination of the connection's first datagram as it arrived at
    /// conntrack in that namespace.
    pub orig: (SocketAddr, SocketAddr),
    /// Source and destination the answers are expected with.
    pub reply: (SocketAddr, SocketAddr),
}

impl Connection {
    /// The destination was rewritten (DNAT): answers come from another address.
    pub fn dnat(&self) -> bool {
        self.reply.0 != self.orig.1
    }

    /// The source was rewritten (SNAT, masquerade).
    pub fn snat(&self) -> bool {
        self.reply.1 != self.orig.0
    }

    /// Source and destination after every rewrite here.
    pub fn after(&self) -> (SocketAddr, SocketAddr) {
        (self.reply.1, self.reply.0)
    }
}

/// What a namespace's conntrack told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CtEvent {
    /// A rewritten UDP connection exists (new, or listed by a dump).
    Nat(Connection),
    /// A rewritten UDP connection ended.
    Gone(Connection),
    /// Events of this namespace were lost (its socket's buffer overflowed): what is known
    /// of it is stale; a dump of every connection there follows.
    Resync(u32),
}

/// What the conntrack readers counted, for the metrics.
#[derive(Debug, Default)]
pub struct CtStats {
    /// Times a namespace's socket overflowed (events lost, a dump followed).
    pub overflows: AtomicU64,
    /// Messages that did not decode.
    pub undecodable: AtomicU64,
    /// Namespaces watched now.
    pub namespaces: AtomicU64,
}

/// The conntrack readers of every covered namespace.
pub struct Conntrack {
    watched: HashMap<u64, JoinHandle<()>>,
    tx: mpsc::Sender<Vec<CtEvent>>,
    rx: mpsc::Receiver<Vec<CtEvent>>,
    stats: Arc<CtStats>,
}

impl Drop for Conntrack {
    fn drop(&mut self) {
        for (_, task) in self.watched.drain() {
            task.abort();
        }
    }
}

impl Conntrack {
    pub fn new() -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        Self {
            watched: HashMap::new(),
            tx,
            rx,
            stats: Arc::default(),
        }
    }

    pub fn stats(&self) -> Arc<CtStats> {
        self.stats.clone()
    }

    /// Watches every namespace of `namespaces` not watched yet. Returns how many were added;
    /// errors (a namespace gone meanwhile, one that cannot be entered) are logged.
    pub fn cover(&mut self, namespaces: &Namespaces) -> usize {
        let mut added = 0;
        for (inode, file) in namespaces.iter() {
            if self.watched.contains_key(&inode) {
                continue;
            }
            match netns::run_in(file, Some(inode), open) {
                Ok(Ok(socket)) => {
                    // SAFETY: the netlink socket owns its descriptor, closes it only
                    // when dropped, and always reports the same one.
                    match unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE) } {
                        Ok(fd) => {
                            let task = tokio::spawn(read(
                                fd,
                                inode as u32,
                                self.tx.clone(),
                                self.stats.clone(),
                            ));
                            self.watched.insert(inode, task);
                            added += 1;
                        }
                        Err(e) => tracing::warn!("conntrack of netns {inode}: {e}"),
                    }
                }
                Ok(Err(e)) => tracing::warn!(
                    "conntrack of netns {inode} ({}): {e}: NAT there is not followed",
                    file.display()
                ),
                Err(e) => tracing::debug!("conntrack: {e}"),
            }
        }
        self.count();
        added
    }

    /// Closes the sockets in the namespaces `inodes` (gone): they would keep them alive.
    pub fn release(&mut self, inodes: &[u64]) {
        for inode in inodes {
            if let Some(task) = self.watched.remove(inode) {
                task.abort();
            }
        }
        self.count();
    }

    fn count(&self) {
        self.stats
            .namespaces
            .store(self.watched.len() as u64, Ordering::Relaxed);
    }

    /// Namespaces watched now.
    pub fn namespaces(&self) -> impl Iterator<Item = u64> + '_ {
        self.watched.keys().copied()
    }

    /// The next batch of events.
    pub async fn recv(&mut self) -> Vec<CtEvent> {
        // The sender half lives in `self`: the channel never closes.
        self.rx.recv().await.unwrap_or_default()
    }
}

impl Default for Conntrack {
    fn default() -> Self {
        Self::new()
    }
}

/// A non-blocking socket in the calling thread's namespace, subscribed to new and ended
/// connections, with a dump of every connection asked for.
fn open() -> io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_NETFILTER)?;
    socket.bind_auto()?;
    set_rcvbuf(&socket, RCVBUF);
    socket.add_membership(GROUP_NEW)?;
    socket.add_membership(GROUP_DESTROY)?;
    socket.set_non_blocking(true)?;
    request_dump(&socket)?;
    Ok(socket)
}

/// SO_RCVBUFFORCE (CAP_NET_ADMIN: past net.core.rmem_max), else what SO_RCVBUF gets.
fn set_rcvbuf(socket: &Socket, bytes: usize) {
    let size = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: setsockopt on a socket we own, with a pointer to an int and its size.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&raw const size).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            return;
        }
    }
}

/// Asks for every connection of the namespace (IPv4 and IPv6); the answers come as
/// messages like the events.
fn request_dump(socket: &Socket) -> io::Result<()> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut packet = NetlinkMessage::new(
        header,
        NetlinkPayload::from(NetfilterMessage::new(
            NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, 0),
            ConntrackMessage::Get(vec![]),
        )),
    );
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf);
    socket.send(&buf, 0).map(drop)
}

/// Reads one namespace's socket until it fails or the task is aborted.
async fn read(
    fd: AsyncFd<Socket>,
    netns: u32,
    tx: mpsc::Sender<Vec<CtEvent>>,
    stats: Arc<CtStats>,
) {
    let mut buf = vec![0u8; 1 << 16];
    // A dump is running (one at a time per socket); another is due when it ends.
    let mut dumping = true;
    let mut dump_again = false;
    loop {
        let Ok(mut guard) = fd.readable().await else {
            return;
        };
        let received = guard.try_io(|s| s.get_ref().recv(&mut &mut buf[..], 0));
        let mut events = Vec::new();
        match received {
            Err(_would_block) => continue,
            Ok(Ok(n)) => {
                let done = parse(&buf[..n], netns, &mut events, &stats);
                if done {
                    dumping = false;
                    if std::mem::take(&mut dump_again) {
                        events.push(CtEvent::Resync(netns));
                        dumping = request_dump(fd.get_ref()).is_ok();
                    }
                }
            }
            Ok(Err(e)) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                stats.overflows.fetch_add(1, Ordering::Relaxed);
                tracing::debug!("conntrack of netns {netns}: events lost, resyncing");
                if dumping {
                    dump_again = true;
                } else {
                    events.push(CtEvent::Resync(netns));
                    dumping = request_dump(fd.get_ref()).is_ok();
                }
            }
            Ok(Err(e)) => {
                tracing::warn!("conntrack of netns {netns}: {e}; NAT there is no longer followed");
                return;
            }
        }
        if !events.is_empty() && tx.send(events).await.is_err() {
            return;
        }
    }
}

/// Decodes the messages of one read; true when a dump ended in it.
fn parse(buf: &[u8], netns: u32, out: &mut Vec<CtEvent>, stats: &CtStats) -> bool {
    let mut done = false;
    let mut at = 0;
    while at + 4 <= buf.len() {
        let len = u32::from_ne_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]) as usize;
        if len < 16 || at + len > buf.len() {
            stats.undecodable.fetch_add(1, Ordering::Relaxed);
            break;
        }
        match NetlinkMessage::<NetfilterMessage>::deserialize(&buf[at..at + len]) {
            Ok(msg) => match msg.payload {
                NetlinkPayload::Done(_) => done = true,
                // A failed dump is over too.
                NetlinkPayload::Error(e) if e.code.is_some() => {
                    tracing::debug!("conntrack of netns {netns}: {}", e.to_io());
                    done = true;
                }
                NetlinkPayload::Error(_) => {}
                NetlinkPayload::InnerMessage(NetfilterMessage {
                    inner: NetfilterMessageInner::Conntrack(ct),
                    ..
                }) => match ct {
                    ConntrackMessage::New(attrs) | ConntrackMessage::Get(attrs) => {
                        out.extend(connection(&attrs, netns).map(CtEvent::Nat));
                    }
                    ConntrackMessage::Delete(attrs) => {
                        out.extend(connection(&attrs, netns).map(CtEvent::Gone));
                    }
                    _ => {}
                },
                _ => {}
            },
            Err(_) => {
                stats.undecodable.fetch_add(1, Ordering::Relaxed);
            }
        }
        // Messages are 4-byte aligned.
        at += (len + 3) & !3;
    }
    done
}

/// A rewritten UDP connection from a message's attributes; None for anything else.
fn connection(attrs: &[ConntrackAttribute], netns: u32) -> Option<Connection> {
    let mut orig = None;
    let mut reply = None;
    for attr in attrs {
        match attr {
            ConntrackAttribute::CtaTupleOrig(t) => orig = udp_tuple(t),
            ConntrackAttribute::CtaTupleReply(t) => reply = udp_tuple(t),
            _ => {}
        }
    }
    let c = Connection {
        netns,
        orig: orig?,
        reply: reply?,
    };
    (c.dnat() || c.snat()).then_some(c)
}

/// Source and destination of a UDP tuple.
fn udp_tuple(tuple: &[Tuple]) -> Option<(SocketAddr, SocketAddr)> {
    let (mut src, mut dst, mut sport, mut dport, mut udp) = (None, None, None, None, false);
    for part in tuple {
        match part {
            Tuple::Ip(ips) => {
                for ip in ips {
                    match ip {
                        IPTuple::SourceAddress(a) => src = Some(*a),
                        IPTuple::DestinationAddress(a) => dst = Some(*a),
                        _ => {}
                    }
                }
            }
            Tuple::Proto(protos) => {
                for p in protos {
                    match p {
                        ProtoTuple::Protocol(Protocol::Udp) => udp = true,
                        ProtoTuple::SourcePort(p) => sport = Some(*p),
                        ProtoTuple::DestinationPort(p) => dport = Some(*p),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    udp.then_some(())?;
    Some((SocketAddr::new(src?, sport?), SocketAddr::new(dst?, dport?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(orig: (&str, &str), reply: (&str, &str)) -> Connection {
        let a = |s: &str| s.parse().unwrap();
        Connection {
            netns: 1,
            orig: (a(orig.0), a(orig.1)),
            reply: (a(reply.0), a(reply.1)),
        }
    }

    #[test]
    fn a_rewrite_is_a_reply_tuple_that_is_not_the_mirror() {
        let plain = conn(
            ("10.0.0.1:5000", "10.0.0.2:53"),
            ("10.0.0.2:53", "10.0.0.1:5000"),
        );
        assert!(!plain.dnat() && !plain.snat());
        let dnat = conn(
            ("10.0.0.1:5000", "10.96.0.10:53"),
            ("10.244.1.7:53", "10.0.0.1:5000"),
        );
        assert!(dnat.dnat() && !dnat.snat());
        assert_eq!(dnat.after().1, "10.244.1.7:53".parse().unwrap());
        let both = conn(
            ("10.0.0.1:5000", "10.96.0.10:53"),
            ("10.244.1.7:53", "10.0.0.9:61000"),
        );
        assert!(both.dnat() && both.snat());
        assert_eq!(
            both.after(),
            (
                "10.0.0.9:61000".parse().unwrap(),
                "10.244.1.7:53".parse().unwrap()
            )
        );
    }

    /// A NEW event as the kernel sends it (captured with `conntrack -E -o xml` semantics,
    /// built here with the crate's own emitter) decodes into the connection; TCP does not.
    #[test]
    fn events_decode_and_only_rewritten_udp_is_kept() {
        let tuple = |src: &str, dst: &str, sport: u16, dport: u16, proto: Protocol| {
            vec![
                Tuple::Ip(vec![
                    IPTuple::SourceAddress(src.parse().unwrap()),
                    IPTuple::DestinationAddress(dst.parse().unwrap()),
                ]),
                Tuple::Proto(vec![
                    ProtoTuple::Protocol(proto),
                    ProtoTuple::SourcePort(sport),
                    ProtoTuple::DestinationPort(dport),
                ]),
            ]
        };
        let message = |proto: Protocol, delete: bool| {
            let attrs = vec![
                ConntrackAttribute::CtaTupleOrig(tuple("10.0.0.1", "10.96.0.10", 5000, 53, proto)),
                ConntrackAttribute::CtaTupleReply(tuple("10.244.1.7", "10.0.0.1", 53, 5000, proto)),
            ];
            let ct = if delete {
                ConntrackMessage::Delete(attrs)
            } else {
                ConntrackMessage::New(attrs)
            };
            let mut packet = NetlinkMessage::new(
                NetlinkHeader::default(),
                NetlinkPayload::from(NetfilterMessage::new(
                    NetfilterHeader::new(NetfilterProtoFamily::IPv4, 0, 0),
                    ct,
                )),
            );
            packet.finalize();
            let mut buf = vec![0; packet.buffer_len()];
            packet.serialize(&mut buf);
            buf
        };
        let mut buf = message(Protocol::Udp, false);
        buf.extend(message(Protocol::Tcp, false));
        buf.extend(message(Protocol::Udp, true));
        let stats = CtStats::default();
        let mut out = Vec::new();
        assert!(!parse(&buf, 7, &mut out, &stats));
        let want = Connection {
            netns: 7,
            orig: (
                "10.0.0.1:5000".parse().unwrap(),
                "10.96.0.10:53".parse().unwrap(),
            ),
            reply: (
                "10.244.1.7:53".parse().unwrap(),
                "10.0.0.1:5000".parse().unwrap(),
            ),
        };
        assert_eq!(out, vec![CtEvent::Nat(want), CtEvent::Gone(want)]);
        assert_eq!(stats.undecodable.load(Ordering::Relaxed), 0);
        // A truncated message is counted, not decoded.
        let mut out = Vec::new();
        parse(&buf[..buf.len() - 10], 7, &mut out, &stats);
        assert!(stats.undecodable.load(Ordering::Relaxed) >= 1);
    }
}
