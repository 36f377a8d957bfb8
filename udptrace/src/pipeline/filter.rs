//! Which paths to show: `--port`, `--host`, `--pid`, `--comm`. A path matches when any of
//! its hops does, so a port matches before or after any rewrite.

use std::net::IpAddr;

use udptrace_common::{Addr, TraceFilter, AF_INET, AF_INET6, FILTER_HOST, FILTER_PORT};

use crate::model::{FlowView, Path};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub port: Option<u16>,
    pub host: Option<IpAddr>,
    pub pid: Option<u32>,
    pub comm: Option<String>,
}

/// Treats `::ffff:a.b.c.d` and `a.b.c.d` as the same host.
fn same_host(a: IpAddr, b: IpAddr) -> bool {
    a.to_canonical() == b.to_canonical()
}

impl Filter {
    /// The query string (`?port=..&host=..`) that asks an agent's API for the same.
    pub fn query_string(&self) -> String {
        let mut q = Vec::new();
        if let Some(p) = self.port {
            q.push(format!("port={p}"));
        }
        if let Some(h) = self.host {
            q.push(format!("host={h}"));
        }
        if let Some(p) = self.pid {
            q.push(format!("pid={p}"));
        }
        if let Some(c) = &self.comm {
            q.push(format!("comm={c}"));
        }
        if q.is_empty() {
            String::new()
        } else {
            format!("?{}", q.join("&"))
        }
    }

    /// What the kernel programs decide themselves (`--port`, `--host`): the first hop that
    /// sees a datagram these leave out returns early, and so does every later one.
    pub fn kernel(&self) -> TraceFilter {
        let mut f = TraceFilter::NONE;
        if let Some(port) = self.port {
            f.flags |= FILTER_PORT;
            f.port = port;
        }
        if let Some(host) = self.host {
            f.flags |= FILTER_HOST;
            f.host = match host.to_canonical() {
                IpAddr::V4(v4) => {
                    let mut ip = [0; 16];
                    ip[..4].copy_from_slice(&v4.octets());
                    Addr {
                        family: AF_INET,
                        ip,
                        ..Addr::default()
                    }
                }
                IpAddr::V6(v6) => Addr {
                    family: AF_INET6,
                    ip: v6.octets(),
                    ..Addr::default()
                },
            };
        }
        f
    }

    /// The filters only userspace applies (to assembled paths): the process ones, known at
    /// the send and deliver hops only.
    pub fn userspace_only(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.pid.is_some() {
            out.push("--pid");
        }
        if self.comm.is_some() {
            out.push("--comm");
        }
        out
    }

    pub fn matches(&self, path: &Path) -> bool {
        let port = self
            .port
            .is_none_or(|p| path.addresses().any(|a| a.port() == p));
        let host = self
            .host
            .is_none_or(|h| path.addresses().any(|a| same_host(a.ip(), h)));
        let procs = || path.hops.iter().filter_map(|h| h.process.as_ref());
        let pid = self.pid.is_none_or(|p| procs().any(|pr| pr.pid == p));
        let comm = self
            .comm
            .as_ref()
            .is_none_or(|c| procs().any(|pr| &pr.comm == c || pr.name() == c));
        port && host && pid && comm
    }

    /// A flow matches on any of its addresses (as sent, rewritten, as received) and on its
    /// sending process.
    pub fn matches_flow(&self, flow: &FlowView) -> bool {
        fn ends(e: &crate::model::Endpoints) -> [Option<std::net::SocketAddr>; 2] {
            [e.src, e.dst]
        }
        let addresses = || {
            ends(&flow.orig)
                .into_iter()
                .chain(flow.last.iter().flat_map(ends))
                .chain(
                    flow.nat
                        .iter()
                        .flat_map(|n| ends(&n.before).into_iter().chain(ends(&n.after))),
                )
                .flatten()
        };
        let port = self.port.is_none_or(|p| addresses().any(|a| a.port() == p));
        let host = self
            .host
            .is_none_or(|h| addresses().any(|a| same_host(a.ip(), h)));
        let pid = self.pid.is_none_or(|p| flow.pid == Some(p));
        let comm = self
            .comm
            .as_ref()
            .is_none_or(|c| flow.comm.as_ref() == Some(c) || flow.process_name.as_ref() == Some(c));
        port && host && pid && comm
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::hops::tests::sample_path;

    #[test]
    fn port_and_host_go_to_the_kernel_in_its_form() {
        assert!(Filter::default().kernel().is_none());
        let f = Filter {
            port: Some(53),
            host: Some("::ffff:10.0.0.2".parse().unwrap()),
            pid: Some(7),
            ..Default::default()
        };
        let k = f.kernel();
        assert_eq!((k.flags, k.port), (FILTER_PORT | FILTER_HOST, 53));
        // The mapped form becomes the IPv4 host (the kernel matches both forms of it).
        assert_eq!(k.host.family, AF_INET);
        assert_eq!(k.host.ip[..4], [10, 0, 0, 2]);
        assert_eq!(f.userspace_only(), ["--pid"]);
        let six = Filter {
            host: Some("fd00::1".parse().unwrap()),
            ..Default::default()
        }
        .kernel();
        assert_eq!((six.flags, six.host.family), (FILTER_HOST, AF_INET6));
        assert_eq!(six.host.ip[15], 1);
    }

    #[test]
    fn empty_filter_matches_everything() {
        assert!(Filter::default().matches(&sample_path()));
    }

    #[test]
    fn port_matches_source_or_destination() {
        let path = sample_path();
        for (port, hit) in [(5353, true), (40112, true), (53, false)] {
            let f = Filter {
                port: Some(port),
                ..Default::default()
            };
            assert_eq!(f.matches(&path), hit, "port {port}");
        }
    }

    #[test]
    fn host_pid_and_comm() {
        let path = sample_path();
        let host = |h: &str| Filter {
            host: Some(h.parse().unwrap()),
            ..Default::default()
        };
        assert!(host("127.0.0.1").matches(&path));
        assert!(host("::ffff:127.0.0.1").matches(&path));
        assert!(!host("10.0.0.1").matches(&path));
        assert!(Filter {
            pid: Some(100),
            ..Default::default()
        }
        .matches(&path));
        assert!(
            !Filter {
                pid: Some(101),
                ..Default::default()
            }
            .matches(&path),
            "tid is not pid"
        );
        assert!(Filter {
            comm: Some("nc".into()),
            ..Default::default()
        }
        .matches(&path));
        assert!(!Filter {
            comm: Some("n".into()),
            ..Default::default()
        }
        .matches(&path));
    }

    #[test]
    fn all_conditions_must_hold() {
        let f = Filter {
            port: Some(5353),
            comm: Some("dig".into()),
            ..Default::default()
        };
        assert!(!f.matches(&sample_path()));
    }
}
