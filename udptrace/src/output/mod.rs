//! How things look: a path as human or JSON lines, the flow table, Prometheus text.

pub mod lines;
pub mod metrics;
pub mod table;
