//! udptrace's parts, for its command-line program (src/main.rs) and for the fuzz targets
//! that feed its decoders arbitrary kernel records (fuzz/).

pub mod agent;
pub mod args;
pub mod cli;
pub mod clock;
pub mod doctor;
pub mod events;
pub mod explain;
pub mod filter;
pub mod flows;
pub mod k8s;
pub mod kernel;
pub mod loader;
pub mod paths;
pub mod pipeline;
pub mod procs;
pub mod stitch;
pub mod top;
pub mod trace;
