//! One module per hop, mirroring `udptrace-ebpf/src/hops/`: each declares its hooks, best
//! first, as a chain [`super::chain::attach_chain`] walks.

pub mod count;
pub mod deliver;
pub mod drop;
pub mod ingress;
pub mod nat;
pub mod send;
pub mod xmit;
