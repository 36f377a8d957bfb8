//! What the running kernel offers: its BTF, tracefs event formats, version and our
//! privileges. Everything the loader decides is based on what is read here.

pub mod btf;
pub mod cgroup2;
pub mod drop_reasons;
pub mod offsets;
pub mod preflight;
pub mod tracefs;
