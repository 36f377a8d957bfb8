//! One module per hop, as the loader attaches them (udptrace/src/loader/hops/ mirrors it).

pub mod count;
mod deliver;
mod drop;
mod ingress;
mod nat;
mod send;
mod xmit;
