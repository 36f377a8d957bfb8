//! udptrace's integration tests: one binary, one module per hop or scenario. They run as
//! root, one at a time (`--test-threads=1`: they share the kernel), against the real
//! udptrace binary and real peers in network namespaces they create and remove
//! (`udptrace-testkit`). `cargo xtask integration-test` runs them here and in VMs;
//! `cargo test --release --test integration -- nat::` runs one module.

mod churn;
mod cleanup;
mod counting;
mod deliver;
mod deploy;
mod drop;
mod exposure;
mod filter;
mod flows;
mod gso;
mod image;
mod ingress;
mod ipv6;
mod k8s;
mod kube;
mod logs;
mod malformed;
mod nat;
mod overlay;
mod podman;
mod pressure;
mod privileges;
mod sampling;
mod send;
mod soak;
mod stitch;
