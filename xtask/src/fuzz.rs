//! `cargo xtask fuzz`: udptrace's decoders under libFuzzer (cargo-fuzz), for a bounded time.
//! The targets live in udptrace/fuzz; a crash leaves its input in
//! udptrace/fuzz/artifacts/TARGET/ and fails the run.

use std::process::Command;

use anyhow::{Context as _, Result};

use crate::{
    cmd::{exec, workspace},
    setup::{ebpf_toolchain, home},
};

/// cargo-fuzz, pinned; installed under ~/.cache/udptrace (a fresh machine lacks it).
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// The fuzz targets (udptrace/fuzz/fuzz_targets).
const TARGETS: &[&str] = &["records"];

fn cargo_fuzz() -> Result<std::path::PathBuf> {
    let root = home()?.join(format!(".cache/udptrace/cargo-fuzz-{CARGO_FUZZ_VERSION}"));
    let bin = root.join("bin/cargo-fuzz");
    if !bin.exists() {
        exec(Command::new("cargo").args([
            "install",
            &format!("cargo-fuzz@{CARGO_FUZZ_VERSION}"),
            "--locked",
            "--root",
            root.to_str().context("non-UTF-8 home")?,
        ]))?;
    }
    Ok(bin)
}

/// Runs each target for `secs` seconds.
pub fn run(secs: u64) -> Result<()> {
    let cargo_fuzz = cargo_fuzz()?;
    let toolchain = ebpf_toolchain()?;
    for target in TARGETS {
        exec(
            Command::new(&cargo_fuzz)
                .current_dir(workspace().join("udptrace"))
                // libFuzzer needs nightly; the eBPF object is not needed to decode records.
                .env("RUSTUP_TOOLCHAIN", &toolchain)
                .env("AYA_BUILD_SKIP", "1")
                // Safe Rust: the bugs to find are panics (overflow checks are on), which need
                // no sanitizer, and an uninstrumented build is minutes quicker.
                .args(["fuzz", "run", "--sanitizer", "none", target, "--"])
                .arg(format!("-max_total_time={secs}"))
                .arg("-rss_limit_mb=4096"),
        )
        .with_context(|| {
            format!(
                "fuzz target {target} failed (its input is in udptrace/fuzz/artifacts/{target}/)"
            )
        })?;
    }
    Ok(())
}
