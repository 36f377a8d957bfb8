//! One module per subcommand: each parses nothing (that is `args`), sets up a pipeline or
//! a client, and plugs its sink into [`crate::pipeline::Pipeline::run`].

pub mod agent;
pub mod args;
pub mod doctor;
pub mod flows;
pub mod path;
pub mod trace;
