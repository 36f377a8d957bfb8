//! `cargo xtask image`: the agent's container image from deploy/Containerfile — a static
//! (musl) release binary in an otherwise empty image (no base image can be pulled here,
//! and none is needed).

use std::process::Command;

use anyhow::Result;

use crate::cmd::{exec, root_command, workspace};

/// The Rust target of the image's binary.
pub const TARGET: &str = "x86_64-unknown-linux-musl";

/// `udptrace:VERSION`, as deploy/base/daemonset.yaml pins it.
pub fn tag() -> String {
    format!("udptrace:{}", env!("CARGO_PKG_VERSION"))
}

/// Whether podman is here to build and run images.
pub fn podman_available() -> bool {
    Command::new("podman")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

pub fn build() -> Result<()> {
    exec(
        Command::new("cargo")
            .current_dir(workspace())
            // ring (TLS to the Kubernetes API) compiles C for the target: musl's gcc.
            .env("CC_x86_64_unknown_linux_musl", "musl-gcc")
            .args(["build", "--release", "-p", "udptrace", "--target", TARGET]),
    )?;
    // runc and explicit ulimits: what works with this host's podman (TOOLCHAIN.md).
    exec(
        root_command("podman")
            .current_dir(workspace())
            .args(["--runtime", "runc", "build", "--quiet"])
            .args([
                "--ulimit",
                "nofile=20000:20000",
                "--ulimit",
                "nproc=1024:1024",
            ])
            .args(["-f", "deploy/Containerfile", "-t", &tag(), "."]),
    )
}
