//! udptrace's parts, for its command-line program (src/main.rs) and for the fuzz targets
//! that feed its decoders arbitrary kernel records (fuzz/). docs/architecture.md walks
//! through them in data-flow order.

pub mod clock;
pub mod cmd;
pub mod k8s;
pub mod kernel;
pub mod loader;
pub mod model;
pub mod output;
pub mod pipeline;
