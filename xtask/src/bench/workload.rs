//! What the benchmark's sender sends: which sockets, to where, through which rules. Each
//! workload is a table of its own; the rules one needs (a DNAT, a drop) exist only while it
//! is measured, so that no other workload pays for them (a NAT table turns conntrack on for
//! every packet of its namespace).

use std::{
    io::Write as _,
    net::{IpAddr, SocketAddr, UdpSocket},
    process::{Command, Stdio},
};

use anyhow::{ensure, Context as _, Result};
use clap::ValueEnum;
use udptrace_testkit::{Netns, Pair, A6, B6};

use super::{ADDR_A, ADDR_B, DEV_A, PORT};

/// Where the DNAT workload sends (rewritten to `PORT` in the sender's namespace).
pub const DNAT_PORT: u16 = 9998;
/// Where the drop workload sends every other datagram (dropped in the receiver's namespace).
pub const DROP_PORT: u16 = 9997;
/// The churn workload's extra source addresses in the sender's namespace.
const CHURN_SOURCES: [&str; 3] = ["10.203.0.11", "10.203.0.12", "10.203.0.13"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WorkloadKind {
    /// One connected socket.
    One,
    /// `--flows` connected sockets taken in turn.
    Many,
    /// One unconnected socket sending with `sendto` (the count hop reads the destination
    /// from the packet and looks for a conntrack entry).
    Unconnected,
    /// One connected socket over IPv6.
    Ipv6,
    /// One connected socket whose destination an nftables DNAT rewrites (conntrack on in
    /// the sender's namespace, as on a Kubernetes node).
    Dnat,
    /// Two connected sockets taken in turn, one of them to a port an nftables rule drops
    /// at the receiver: half the datagrams dropped.
    Drops,
    /// A new socket for every datagram (bind, sendto, close), from four source addresses in
    /// turn: DNS-like churn, up to ~110 000 distinct flows (4 × the ephemeral ports).
    Churn,
}

#[derive(Debug, Clone, Copy)]
pub struct Workload {
    pub kind: WorkloadKind,
    /// Sockets of the many-flow workload.
    pub flows: usize,
}

impl Workload {
    pub fn of(kind: WorkloadKind, many: usize) -> Self {
        Self { kind, flows: many }
    }

    pub fn label(self) -> String {
        match self.kind {
            WorkloadKind::One => "1 flow".into(),
            WorkloadKind::Many => format!("{} flows", self.flows),
            WorkloadKind::Unconnected => "1 unconnected flow (sendto)".into(),
            WorkloadKind::Ipv6 => "1 flow over IPv6".into(),
            WorkloadKind::Dnat => "1 flow through a DNAT".into(),
            WorkloadKind::Drops => "2 flows, 1 dropped (half the datagrams)".into(),
            WorkloadKind::Churn => "a new socket per datagram (churn)".into(),
        }
    }

    /// The destination ports the sender names: a flow counter's counts are summed over them.
    pub fn ports(self) -> &'static [u16] {
        match self.kind {
            WorkloadKind::Dnat => &[DNAT_PORT],
            WorkloadKind::Drops => &[PORT, DROP_PORT],
            _ => &[PORT],
        }
    }

    /// The destination ports on the wire, after NAT: what a counter on the devices sees.
    pub fn wire_ports(self) -> &'static [u16] {
        match self.kind {
            WorkloadKind::Dnat => &[PORT],
            _ => self.ports(),
        }
    }

    /// So many flows that a flow counter's list of them is too long to read back whole.
    pub fn many_flows(self) -> bool {
        self.kind == WorkloadKind::Churn
    }

    /// Puts in place what the workload needs while it is measured; undone when the returned
    /// guard drops.
    pub fn prepare(self, net: &Pair) -> Result<Prepared<'_>> {
        let mut prepared = Prepared {
            net,
            tables: Vec::new(),
            addresses: Vec::new(),
        };
        match self.kind {
            WorkloadKind::Dnat => prepared.nft(
                &net.a,
                &format!(
                    "table ip udptrace_bench {{\n chain out {{\n  type nat hook output priority \
                     -100\n  udp dport {DNAT_PORT} dnat to {ADDR_B}:{PORT}\n }}\n}}\n"
                ),
                "ip udptrace_bench",
            )?,
            WorkloadKind::Drops => prepared.nft(
                &net.b,
                &format!(
                    "table inet udptrace_bench {{\n chain in {{\n  type filter hook input \
                     priority 0\n  udp dport {DROP_PORT} drop\n }}\n}}\n"
                ),
                "inet udptrace_bench",
            )?,
            WorkloadKind::Churn => {
                for addr in CHURN_SOURCES {
                    net.a
                        .ip(&["addr", "add", &format!("{addr}/24"), "dev", DEV_A]);
                    prepared.addresses.push(addr);
                }
            }
            _ => {}
        }
        Ok(prepared)
    }

    /// Opens the workload's sockets (in the sender's namespace, on its thread).
    pub fn sockets(self) -> Result<Sockets> {
        let v4 = |port: u16| -> Result<UdpSocket> {
            let s = UdpSocket::bind((ADDR_A, 0))?;
            s.connect((ADDR_B, port))?;
            Ok(s)
        };
        Ok(match self.kind {
            WorkloadKind::One => Sockets::Connected(vec![v4(PORT)?], 0),
            WorkloadKind::Many => {
                Sockets::Connected((0..self.flows).map(|_| v4(PORT)).collect::<Result<_>>()?, 0)
            }
            WorkloadKind::Unconnected => Sockets::Unconnected(
                UdpSocket::bind((ADDR_A, 0))?,
                SocketAddr::new(ADDR_B.parse()?, PORT),
            ),
            WorkloadKind::Ipv6 => {
                let s = UdpSocket::bind((A6, 0))?;
                s.connect((B6, PORT))?;
                Sockets::Connected(vec![s], 0)
            }
            WorkloadKind::Dnat => Sockets::Connected(vec![v4(DNAT_PORT)?], 0),
            WorkloadKind::Drops => Sockets::Connected(vec![v4(PORT)?, v4(DROP_PORT)?], 0),
            WorkloadKind::Churn => Sockets::Churn(
                std::iter::once(ADDR_A)
                    .chain(CHURN_SOURCES)
                    .map(str::parse)
                    .collect::<Result<_, _>>()?,
                SocketAddr::new(ADDR_B.parse()?, PORT),
                0,
            ),
        })
    }
}

/// The sender's sockets, and which is next.
pub enum Sockets {
    /// Connected sockets taken in turn.
    Connected(Vec<UdpSocket>, usize),
    /// One socket naming the destination in each `sendto`.
    Unconnected(UdpSocket, SocketAddr),
    /// A new socket for each datagram, from these sources in turn.
    Churn(Vec<IpAddr>, SocketAddr, usize),
}

impl Sockets {
    /// Sends one datagram; false when the kernel refused it (a full queue, an ICMP error).
    pub fn send(&mut self, payload: &[u8]) -> bool {
        match self {
            Self::Connected(sockets, next) => {
                let ok = sockets[*next].send(payload).is_ok();
                *next = (*next + 1) % sockets.len();
                ok
            }
            Self::Unconnected(socket, to) => socket.send_to(payload, *to).is_ok(),
            Self::Churn(sources, to, next) => {
                let from = sources[*next];
                *next = (*next + 1) % sources.len();
                UdpSocket::bind((from, 0)).is_ok_and(|s| s.send_to(payload, *to).is_ok())
            }
        }
    }
}

/// What a workload put in place, removed when dropped.
pub struct Prepared<'a> {
    net: &'a Pair,
    /// nftables tables, by namespace.
    tables: Vec<(&'a Netns, &'static str)>,
    /// Addresses added to the sender's device.
    addresses: Vec<&'static str>,
}

impl<'a> Prepared<'a> {
    fn nft(&mut self, ns: &'a Netns, ruleset: &str, table: &'static str) -> Result<()> {
        let mut child = ns
            .cmd("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .context("running nft")?;
        child
            .stdin
            .take()
            .context("nft's stdin")?
            .write_all(ruleset.as_bytes())?;
        let status = child.wait()?;
        ensure!(status.success(), "nft refused: {ruleset}");
        self.tables.push((ns, table));
        Ok(())
    }
}

impl Drop for Prepared<'_> {
    fn drop(&mut self) {
        for (ns, table) in &self.tables {
            let mut c: Command = ns.cmd("nft");
            let _ = c
                .args(["delete", "table"])
                .args(table.split_whitespace())
                .status();
        }
        for addr in &self.addresses {
            self.net
                .a
                .ip(&["addr", "del", &format!("{addr}/24"), "dev", DEV_A]);
        }
    }
}
