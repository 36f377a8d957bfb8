//! Kubernetes enrichment, a decorator on what the agent serves: who is behind an address.
//! Watches (list, then watch, through kube's reflector) the pods on this node, every Service
//! and every EndpointSlice; names each address of a path or flow — a pod (namespace, name,
//! node), a Service's ClusterIP — and tells a DNAT to a backend that no EndpointSlice lists
//! any more (the stale UDP conntrack entry) at once.
//!
//! Without a cluster (no `--kube-api` and not in a pod) none of this runs.

pub mod cgroups;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
};

use anyhow::Context as _;
use futures::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    runtime::{reflector, reflector::Store, watcher, WatchStreamExt as _},
    Api, Client, Config,
};

use self::cgroups::Cgroups;
use crate::model::{FlowView, NatKind, Owner, OwnerKind, Path};

/// Where the agent finds the API server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiServer {
    /// This URL, without credentials (a test server, `kubectl proxy`).
    Url(String),
    /// In a pod: the service account's token and CA, `KUBERNETES_SERVICE_HOST`.
    InCluster,
}

impl ApiServer {
    /// From the setting, else in-cluster when the pod environment says so.
    pub fn find(url: Option<&str>) -> Option<Self> {
        match url {
            Some(u) => Some(Self::Url(u.to_string())),
            None => std::env::var_os("KUBERNETES_SERVICE_HOST").map(|_| Self::InCluster),
        }
    }
}

/// The watched objects, kept current by the reflectors.
#[derive(Clone)]
pub struct Cluster {
    node: String,
    pods: Store<Pod>,
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    cgroups: Arc<Cgroups>,
}

impl Cluster {
    /// Connects and starts watching (the watchers retry with backoff forever).
    /// `cgroup_root`: where the host's cgroup v2 hierarchy is (processes are matched to
    /// their pod's container by cgroup).
    pub fn start(
        server: &ApiServer,
        node: &str,
        cgroup_root: Option<PathBuf>,
    ) -> anyhow::Result<Self> {
        let config = match server {
            ApiServer::Url(url) => Config::new(
                url.parse()
                    .with_context(|| format!("Kubernetes API URL {url:?}"))?,
            ),
            ApiServer::InCluster => Config::incluster().context(
                "reading the pod's service account (KUBERNETES_SERVICE_HOST is set, but the \
                 token or CA is not mounted?)",
            )?,
        };
        let client = Client::try_from(config).context("Kubernetes client")?;
        let on_node = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
        let pods = spawn(Api::<Pod>::all(client.clone()), on_node);
        let services = spawn(
            Api::<Service>::all(client.clone()),
            watcher::Config::default(),
        );
        let slices = spawn(
            Api::<EndpointSlice>::all(client),
            watcher::Config::default(),
        );
        Ok(Self {
            node: node.to_string(),
            pods,
            services,
            slices,
            cgroups: Arc::new(Cgroups::new(cgroup_root)),
        })
    }

    /// Returns once every watcher has its first list.
    pub async fn ready(&self) -> anyhow::Result<()> {
        let ended = "a Kubernetes watcher ended";
        self.pods.wait_until_ready().await.context(ended)?;
        self.services.wait_until_ready().await.context(ended)?;
        self.slices.wait_until_ready().await.context(ended)?;
        Ok(())
    }

    /// A snapshot of who owns which address, built from the stores now.
    pub fn directory(&self) -> Directory {
        let mut owners = HashMap::new();
        // Remote pods are known through the EndpointSlices that list them.
        for slice in self.slices.state() {
            let namespace = slice.metadata.namespace.clone().unwrap_or_default();
            for ep in &slice.endpoints {
                let Some(target) = ep
                    .target_ref
                    .as_ref()
                    .filter(|t| t.kind.as_deref() == Some("Pod") && t.name.is_some())
                else {
                    continue;
                };
                for ip in ep.addresses.iter().filter_map(|a| a.parse::<IpAddr>().ok()) {
                    owners.insert(
                        ip,
                        Owner {
                            kind: OwnerKind::Pod,
                            namespace: target.namespace.clone().unwrap_or(namespace.clone()),
                            name: target.name.clone().unwrap_or_default(),
                            node: ep.node_name.clone(),
                            container: None,
                        },
                    );
                }
            }
        }
        // This node's pods, from the pods themselves (host-network pods have the node's
        // address: they name nothing), and their containers by runtime ID.
        let mut containers = HashMap::new();
        for pod in self.pods.state() {
            let owner = |container: Option<String>| Owner {
                kind: OwnerKind::Pod,
                namespace: pod.metadata.namespace.clone().unwrap_or_default(),
                name: pod.metadata.name.clone().unwrap_or_default(),
                node: Some(self.node.clone()),
                container,
            };
            let statuses = pod.status.iter().flat_map(|s| {
                let init = s.init_container_statuses.iter().flatten();
                s.container_statuses.iter().flatten().chain(init)
            });
            for status in statuses {
                // "containerd://ID", "cri-o://ID", "docker://ID"
                let Some((_, id)) = status
                    .container_id
                    .as_deref()
                    .and_then(|c| c.split_once("://"))
                else {
                    continue;
                };
                if let Some(uid) = pod.metadata.uid.clone() {
                    containers.insert((uid, id.to_string()), owner(Some(status.name.clone())));
                }
            }
            let host_network = pod
                .spec
                .as_ref()
                .and_then(|s| s.host_network)
                .unwrap_or(false);
            let Some(status) = pod.status.as_ref().filter(|_| !host_network) else {
                continue;
            };
            let ips = status
                .pod_ips
                .iter()
                .flatten()
                .map(|p| p.ip.as_str())
                .chain(status.pod_ip.as_deref());
            for ip in ips.filter_map(|a| a.parse::<IpAddr>().ok()) {
                owners.insert(ip, owner(None));
            }
        }
        for svc in self.services.state() {
            let Some(spec) = svc.spec.as_ref() else {
                continue;
            };
            let ips = spec
                .cluster_ips
                .iter()
                .flatten()
                .chain(spec.cluster_ip.as_ref());
            for ip in ips.filter_map(|a| a.parse::<IpAddr>().ok()) {
                owners.insert(
                    ip,
                    Owner {
                        kind: OwnerKind::Service,
                        namespace: svc.metadata.namespace.clone().unwrap_or_default(),
                        name: svc.metadata.name.clone().unwrap_or_default(),
                        node: None,
                        container: None,
                    },
                );
            }
        }
        let mut endpoints = HashSet::new();
        for slice in self.slices.state() {
            let ports: Vec<u16> = slice
                .ports
                .iter()
                .flatten()
                .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "UDP")
                .filter_map(|p| u16::try_from(p.port?).ok())
                .collect();
            for ep in &slice.endpoints {
                // Kubernetes treats an unknown readiness as ready.
                if ep.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                    continue;
                }
                for ip in ep.addresses.iter().filter_map(|a| a.parse::<IpAddr>().ok()) {
                    for port in &ports {
                        endpoints.insert(SocketAddr::new(ip, *port));
                    }
                }
            }
        }
        Directory {
            owners,
            endpoints,
            containers,
            cgroups: Some(self.cgroups.clone()),
        }
    }
}

/// Starts a reflector for `api`, retrying with backoff forever.
fn spawn<K>(api: Api<K>, config: watcher::Config) -> Store<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = reflector(writer, watcher(api, config))
        .default_backoff()
        .touched_objects();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            if let Err(e) = event {
                tracing::warn!("Kubernetes watch: {e}");
            }
        }
    });
    reader
}

/// Who owns which address, and which UDP addresses back a Service now.
#[derive(Debug, Default)]
pub struct Directory {
    owners: HashMap<IpAddr, Owner>,
    /// Ready endpoints of every EndpointSlice, with their UDP ports.
    endpoints: HashSet<SocketAddr>,
    /// This node's pods' containers by (pod UID, container ID).
    containers: HashMap<(String, String), Owner>,
    cgroups: Option<Arc<Cgroups>>,
}

impl Directory {
    /// Names of the addresses given that belong to someone, by IP.
    pub fn names(&self, addrs: impl Iterator<Item = SocketAddr>) -> BTreeMap<String, Owner> {
        addrs
            .filter_map(|a| Some((a.ip().to_string(), self.owners.get(&a.ip())?.clone())))
            .collect()
    }

    /// A DNAT from a Service's ClusterIP to an address no EndpointSlice lists (ready) any
    /// more: the rewrite (Service, backend) when the flow has one.
    pub fn stale_backend(&self, flow: &FlowView) -> Option<(Owner, SocketAddr)> {
        flow.nat
            .iter()
            .filter(|n| n.nat == NatKind::Dnat)
            .find_map(|n| {
                let (vip, backend) = (n.before.dst?, n.after.dst?);
                let svc = self
                    .owners
                    .get(&vip.ip())
                    .filter(|o| o.kind == OwnerKind::Service)?;
                (!self.endpoints.contains(&backend)).then(|| (svc.clone(), backend))
            })
    }

    /// Adds `k8s` names to a flow and calls a DNAT to a gone backend stale.
    pub fn decorate_flow(&self, flow: &mut FlowView) {
        let addrs = [flow.orig.src, flow.orig.dst]
            .into_iter()
            .chain(flow.last.iter().flat_map(|e| [e.src, e.dst]))
            .chain(flow.nat.iter().flat_map(|n| [n.after.src, n.after.dst]))
            .flatten();
        flow.k8s = Some(self.names(addrs));
        if let Some((svc, backend)) = self.stale_backend(flow) {
            flow.stale_dnat = true;
            flow.explain =
                format!(
                "DNATed to {backend}, which no EndpointSlice of Service {}/{} lists any more: a \
                 stale conntrack entry (conntrack -D -p udp --orig-dst {} --orig-port-dst {})",
                svc.namespace,
                svc.name,
                flow.orig.dst.map_or_else(|| "?".into(), |a| a.ip().to_string()),
                flow.orig.dst.map_or(0, |a| a.port()),
            );
        }
    }

    /// The pod container a process of cgroup `id` runs in.
    pub fn container(&self, cgroup: u64) -> Option<&Owner> {
        let key = self.cgroups.as_ref()?.container(cgroup)?;
        self.containers.get(&key)
    }

    /// Adds `k8s` names to a path: its addresses', and each process's container (on the
    /// hop that names the process).
    pub fn decorate_path(&self, path: &mut Path) {
        path.k8s = Some(self.names(path.addresses()));
        for hop in &mut path.hops {
            if let Some(owner) = hop.process.as_ref().and_then(|p| self.container(p.cgroup)) {
                hop.k8s = Some(Box::new(owner.clone()));
            }
        }
    }
}
