//! `cargo xtask test`: formatting, lints (host and BPF crates), then every test binary;
//! the kernel-touching ones as root, one test at a time.

use std::process::Command;

use anyhow::{bail, Context as _, Result};

use crate::{
    cmd::{exec, root_command, workspace},
    setup::ebpf_toolchain,
    suite::{build_tests, cargo, is_test_binary, run_counting, Totals, INTEGRATION},
};

/// How long `test` fuzzes each target: enough to catch a decoder that panics on the first
/// odd record, bounded for CI (`cargo xtask fuzz` goes on longer).
const FUZZ_SECS: u64 = 45;

/// Lints, then every test on the host kernel, a bounded fuzz run, then (with `vm`) the same
/// suite in VMs.
pub fn run(kernels: &[String]) -> Result<()> {
    lint()?;
    let mut totals = Totals::default();
    let host = run_host(&mut totals);
    let host = host.and(crate::fuzz::run(FUZZ_SECS));
    let vm = if kernels.is_empty() {
        Ok(())
    } else {
        crate::vm::run(kernels, &mut totals)
    };
    totals.print();
    host.and(vm)
}

/// rustfmt, and clippy on the host crates and on the eBPF crates.
pub fn lint() -> Result<()> {
    let toolchain = ebpf_toolchain()?;
    exec(&mut cargo(&["fmt", "--all", "--check"]))?;
    exec(&mut cargo(&[
        "clippy",
        "--release",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    exec(
        Command::new("rustup")
            .current_dir(workspace())
            .args([
                "run",
                toolchain.as_str(),
                "cargo",
                "clippy",
                "--release",
                "-p",
                "udptrace-ebpf",
                // The benchmark's reference counter, linted like the programs it is
                // measured against.
                "-p",
                "udptrace-reference-ebpf",
            ])
            .args([
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--",
                "-D",
                "warnings",
            ]),
    )
}

/// Runs every test binary on this host: as root, one test at a time (they share the kernel).
/// The agent's image is built first where podman is, for the test that runs it.
pub fn run_host(totals: &mut Totals) -> Result<()> {
    if crate::image::podman_available() {
        crate::image::build()?;
    }
    let binaries = build_tests()?;
    let mut failed = Vec::new();
    for exe in &binaries {
        let mut cmd = root_command(exe);
        // --show-output: tests print why they skip a part the kernel lacks.
        cmd.current_dir(workspace())
            .args(["--test-threads=1", "--show-output"]);
        match run_counting(&mut cmd, totals) {
            Ok(true) => {}
            Ok(false) => failed.push(exe.clone()),
            Err(e) => {
                eprintln!("xtask: {e:#}");
                failed.push(exe.clone());
            }
        }
    }
    if !failed.is_empty() {
        bail!("test binaries failed on the host kernel: {failed:?}");
    }
    Ok(())
}

/// Runs the soak test (udptrace/tests/integration/soak.rs) alone for `secs` seconds of
/// traffic, then the churn tests (churn.rs) for `churn_rounds` rounds, printing what they
/// measured.
pub fn soak(secs: u64, churn_rounds: u64) -> Result<()> {
    let binaries = build_tests()?;
    let exe = binaries
        .iter()
        .find(|b| is_test_binary(b, INTEGRATION))
        .context("cargo built no integration tests")?;
    exec(
        root_command(exe)
            .current_dir(workspace())
            .env("UDPTRACE_SOAK_SECS", secs.to_string())
            .args(["--nocapture", "--test-threads=1", "soak::"]),
    )?;
    exec(
        root_command(exe)
            .current_dir(workspace())
            .env("UDPTRACE_CHURN_ROUNDS", churn_rounds.to_string())
            .args(["--nocapture", "--test-threads=1", "churn::"]),
    )
}
