//! What udptrace's integration tests and its benchmark share: network namespaces they
//! create (and remove), real peers, the real udptrace binary and its agent, HTTP and
//! metric reads, and the kernel's own counters as ground truth. Helpers panic with a
//! message saying what failed (STYLE: tests panic, they do not return errors).

pub mod counters;
pub mod http;
pub mod json;
pub mod netns;
pub mod peers;
pub mod udptrace;

pub use counters::*;
pub use http::{http_get, metric_value};
pub use json::*;
pub use netns::*;
pub use peers::*;
pub use udptrace::*;

use std::process::Command;

pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("integration tests load eBPF programs and create network namespaces: run them as root (`cargo xtask test` does)");
    }
}

/// Runs a command that must succeed; returns its stdout.
pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
