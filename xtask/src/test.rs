//! `cargo xtask test`: formatting, lints (host and BPF crates), then every test binary;
//! the kernel-touching ones as root, one test at a time.

use std::process::Command;

use anyhow::{bail, Context as _, Result};

use crate::{
    cmd::{exec, root_command, workspace},
    setup::EBPF_TOOLCHAIN,
};

pub fn build_release() -> Result<()> {
    exec(Command::new("cargo").current_dir(workspace()).args([
        "build",
        "--release",
        "-p",
        "udptrace",
    ]))
}

pub fn run() -> Result<()> {
    let ws = workspace();
    let cargo = |args: &[&str]| {
        let mut c = Command::new("cargo");
        c.current_dir(&ws).args(args);
        c
    };
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
            .current_dir(&ws)
            .args([
                "run",
                EBPF_TOOLCHAIN,
                "cargo",
                "clippy",
                "--release",
                "-p",
                "udptrace-ebpf",
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
    )?;
    build_release()?;

    // Build the test binaries, then run them ourselves so the kernel-touching ones run as
    // root, with one test at a time (they share the kernel).
    let out = cargo(&["test", "--release", "--no-run", "--message-format=json"])
        .output()
        .context("building the tests")?;
    if !out.status.success() {
        bail!(
            "building the tests failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut binaries = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json_lite(line) else {
            continue;
        };
        if let Some(exe) = msg {
            binaries.push(exe);
        }
    }
    if binaries.is_empty() {
        bail!("cargo built no test binaries");
    }
    let mut failed = Vec::new();
    for exe in &binaries {
        let mut cmd = root_command(exe);
        cmd.current_dir(&ws).arg("--test-threads=1");
        if let Err(e) = exec(&mut cmd) {
            eprintln!("xtask: {e:#}");
            failed.push(exe.clone());
        }
    }
    if !failed.is_empty() {
        bail!("test binaries failed: {failed:?}");
    }
    eprintln!("xtask: all {} test binaries passed", binaries.len());
    Ok(())
}

/// Picks the executable of a test artifact out of one line of cargo's JSON messages.
fn serde_json_lite(line: &str) -> Result<Option<String>> {
    let v: serde_json::Value = serde_json::from_str(line)?;
    let is_test = v["reason"] == "compiler-artifact" && v["profile"]["test"] == true;
    Ok(if is_test {
        v["executable"].as_str().map(str::to_string)
    } else {
        None
    })
}
