//! The agent's Prometheus text: counters since start, gauges of now.

use std::net::SocketAddr;

use crate::pipeline::windows::Status as WindowStatus;
use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};
use udptrace_common::SampleConfig;

use crate::pipeline::{filter::Filter, flows::FlowTable, Losses, NamespaceCoverage};

/// Builds a counter or gauge family (or a single one, without labels) and sets its values.
fn family<M: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    make: impl FnOnce() -> prometheus::Result<M>,
) -> prometheus::Result<M> {
    let metric = make()?;
    registry.register(Box::new(metric.clone()))?;
    Ok(metric)
}

/// What the metrics show.
pub struct Metrics<'a> {
    pub flows: &'a FlowTable,
    pub losses: &'a Losses,
    pub namespaces: &'a NamespaceCoverage,
    /// (hop, hook) in use.
    pub hooks: &'a [(&'static str, &'static str)],
    /// One series per flow too.
    pub per_flow: bool,
    pub sampling: SampleConfig,
    /// Path windows, when the agent opens them.
    pub windows: Option<WindowStatus>,
}

/// The Prometheus text exposition (format 0.0.4) of the agent's state. Counters are the
/// totals since the agent started: they only grow.
pub fn render(s: &Metrics<'_>) -> prometheus::Result<String> {
    let registry = Registry::new();
    let totals = s.flows.totals();
    for (name, help, values) in [
        (
            "udptrace_datagrams_total",
            "UDP datagrams sent, by the sender's network namespace",
            &totals.datagrams,
        ),
        (
            "udptrace_bytes_total",
            "UDP payload bytes sent, by the sender's network namespace",
            &totals.bytes,
        ),
        (
            "udptrace_send_errors_total",
            "UDP sends that failed, by the sender's network namespace",
            &totals.errors,
        ),
    ] {
        let c = family(&registry, || {
            IntCounterVec::new(Opts::new(name, help), &["netns"])
        })?;
        for (netns, v) in values {
            c.with_label_values(&[&netns.to_string()]).inc_by(*v);
        }
    }
    let drops = family(&registry, || {
        IntCounterVec::new(
            Opts::new(
                "udptrace_drops_total",
                "UDP datagrams dropped, by the kernel's reason and the namespace where it happened",
            ),
            &["reason", "netns"],
        )
    })?;
    for ((reason, netns), v) in &totals.drops {
        drops
            .with_label_values(&[reason.as_str(), &netns.to_string()])
            .inc_by(*v);
    }
    let nat = family(&registry, || {
        IntCounterVec::new(
            Opts::new(
                "udptrace_nat_translations_total",
                "NAT rewrites of UDP datagrams, by netfilter hook and kind",
            ),
            &["hook", "nat"],
        )
    })?;
    for ((hook, kind), v) in &totals.nat {
        nat.with_label_values(&[*hook, *kind]).inc_by(*v);
    }
    for (name, help, value) in [
        (
            "udptrace_events_lost_total",
            "Hop events lost to a full ring buffer",
            s.losses.ring_full,
        ),
        (
            "udptrace_flow_evictions_total",
            "Flows the kernel's LRU table evicted before they went idle",
            totals.evictions,
        ),
        (
            "udptrace_flows_expired_total",
            "Flows forgotten after the idle time",
            totals.expired,
        ),
        (
            "udptrace_flows_not_counted_total",
            "Datagrams whose flow could not be added to the kernel's table",
            s.losses.flow_full,
        ),
        (
            "udptrace_drop_events_held_total",
            "Drops counted but not reported as a hop (at most one a second per drop key and CPU \
             when no path follows the datagram)",
            totals.drops_held,
        ),
        (
            "udptrace_conntrack_overflows_total",
            "Times conntrack events of a namespace overflowed udptrace's socket (events lost; \
             a dump of the namespace's connections followed)",
            s.losses.conntrack_overflows,
        ),
        (
            "udptrace_conntrack_not_kept_total",
            "Rewritten connections conntrack told of that the flow table had no room for",
            totals.conntrack_full,
        ),
    ] {
        family(&registry, || IntCounter::new(name, help))?.inc_by(value);
    }
    family(&registry, || {
        IntGauge::new(
            "udptrace_sample_every",
            "1 in this many datagrams of a flow is traced hop by hop after its first ones",
        )
    })?
    .set(i64::from(s.sampling.every));
    family(&registry, || {
        IntGauge::new(
            "udptrace_conntrack_namespaces",
            "Network namespaces whose conntrack udptrace follows now (counting only: NAT per \
             flow from conntrack)",
        )
    })?
    .set(i64::try_from(s.losses.conntrack_namespaces).unwrap_or(i64::MAX));
    let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    family(&registry, || {
        IntGauge::new(
            "udptrace_namespaces_covered",
            "Network namespaces udptrace has programs attached or sockets watching in now",
        )
    })?
    .set(gauge(s.namespaces.covered));
    family(&registry, || {
        IntGauge::new(
            "udptrace_namespace_links",
            "Links udptrace holds in network namespaces now (netfilter, tcx, clsact): with \
             namespaces coming and going, this follows the namespaces covered and never grows \
             beyond them",
        )
    })?
    .set(gauge(s.namespaces.links));
    family(&registry, || {
        IntCounter::new(
            "udptrace_namespaces_released_total",
            "Network namespaces udptrace let go of because they were gone (every link, \
             socket and reference it held there closed)",
        )
    })?
    .inc_by(s.namespaces.released);
    if let Some(w) = &s.windows {
        let opened = family(&registry, || {
            IntCounterVec::new(
                Opts::new(
                    "udptrace_path_windows_total",
                    "Path windows opened (path hooks attached), by why",
                ),
                &["reason"],
            )
        })?;
        for reason in ["request", "drop", "nat", "cycle"] {
            opened
                .with_label_values(&[reason])
                .inc_by(w.opened.get(reason).copied().unwrap_or(0));
        }
        family(&registry, || {
            IntGauge::new(
                "udptrace_path_window_open",
                "1 while the per-datagram path hooks are attached",
            )
        })?
        .set(i64::from(w.open));
        family(&registry, || {
            IntCounter::new(
                "udptrace_path_window_seconds_total",
                "Whole seconds the path hooks were attached",
            )
        })?
        .inc_by(w.open_secs_total as u64);
    }
    family(&registry, || {
        IntGauge::new("udptrace_flows", "Flows tracked now")
    })?
    .set(i64::try_from(s.flows.len()).unwrap_or(i64::MAX));
    let hooks = family(&registry, || {
        IntGaugeVec::new(
            Opts::new("udptrace_hook_info", "The kernel hook each hop uses"),
            &["hop", "hook"],
        )
    })?;
    for (hop, hook) in s.hooks {
        hooks.with_label_values(&[*hop, *hook]).set(1);
    }
    family(&registry, || {
        IntGaugeVec::new(
            Opts::new("udptrace_build_info", "The agent's version"),
            &["version"],
        )
    })?
    .with_label_values(&[env!("CARGO_PKG_VERSION")])
    .set(1);
    if s.per_flow {
        let per_flow = family(&registry, || {
            IntCounterVec::new(
                Opts::new(
                    "udptrace_flow_datagrams_total",
                    "UDP datagrams sent, per flow (only with --per-flow-metrics)",
                ),
                &["netns", "src", "dst"],
            )
        })?;
        for flow in s.flows.snapshot(&Filter::default()) {
            let show = |a: Option<SocketAddr>| a.map_or_else(|| "?".into(), |a| a.to_string());
            per_flow
                .with_label_values(&[
                    &flow.netns.to_string(),
                    &show(flow.orig.src),
                    &show(flow.orig.dst),
                ])
                .inc_by(flow.packets);
        }
    }
    TextEncoder::new().encode_to_string(&registry.gather())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::clock::Clock;

    #[test]
    fn metrics_are_prometheus_text_with_our_names() {
        let mut flows = FlowTable::new(Clock::new(), Duration::from_secs(60), 16);
        let key = udptrace_common::FlowKey {
            netns: 7,
            ..Default::default()
        };
        let stats = udptrace_common::FlowStats {
            packets: 3,
            bytes: 30,
            ..Default::default()
        };
        flows.update_counts(&[(key, stats)], 1, 0);
        let s = Metrics {
            flows: &flows,
            losses: &Losses::default(),
            namespaces: &NamespaceCoverage {
                covered: 4,
                links: 50,
                released: 200,
                namespaces: Vec::new(),
            },
            hooks: &[("send", "raw_tracepoint:sock:sock_send_length")],
            per_flow: false,
            sampling: SampleConfig {
                first: 10,
                every: 100,
            },
            windows: None,
        };
        let text = render(&s).unwrap();
        for needle in [
            "# TYPE udptrace_datagrams_total counter",
            "# TYPE udptrace_drop_events_held_total counter",
            "udptrace_datagrams_total{netns=\"7\"} 3",
            "udptrace_bytes_total{netns=\"7\"} 30",
            "udptrace_hook_info{hook=\"raw_tracepoint:sock:sock_send_length\",hop=\"send\"} 1",
            "udptrace_build_info{version=",
            "udptrace_events_lost_total 0",
            "udptrace_sample_every 100",
            "udptrace_namespaces_covered 4",
            "udptrace_namespace_links 50",
            "udptrace_namespaces_released_total 200",
        ] {
            assert!(text.contains(needle), "{needle} in\n{text}");
        }
    }
}
