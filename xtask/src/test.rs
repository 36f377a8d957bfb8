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
    let mut totals = Totals::default();
    for exe in &binaries {
        let mut cmd = root_command(exe);
        cmd.current_dir(&ws).arg("--test-threads=1");
        match run_counting(&mut cmd, &mut totals) {
            Ok(true) => {}
            Ok(false) => failed.push(exe.clone()),
            Err(e) => {
                eprintln!("xtask: {e:#}");
                failed.push(exe.clone());
            }
        }
    }
    // One closing line for the whole run, in the form CI reads.
    println!(
        "tests: {} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.ignored
    );
    if !failed.is_empty() {
        bail!("test binaries failed: {failed:?}");
    }
    Ok(())
}

#[derive(Default)]
pub struct Totals {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
}

impl Totals {
    /// Adds the counts of a libtest summary line
    /// (`test result: ok. 12 passed; 0 failed; 0 ignored; ...`).
    pub fn add_summary(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(what), Some(n)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }
}

/// Runs a test binary, echoing its output and adding its summary to `totals`.
/// Returns whether it succeeded.
pub fn run_counting(cmd: &mut Command, totals: &mut Totals) -> Result<bool> {
    eprintln!("xtask: $ {}", crate::cmd::show(cmd));
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", crate::cmd::show(cmd)))?;
    let stdout = child.stdout.take().context("test stdout")?;
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let line = line?;
        println!("{line}");
        totals.add_summary(&line);
    }
    Ok(child.wait()?.success())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_libtest_summaries() {
        let mut t = Totals::default();
        t.add_summary("test result: ok. 12 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 13.53s");
        t.add_summary(
            "test result: FAILED. 26 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out",
        );
        t.add_summary("running 3 tests");
        assert_eq!((t.passed, t.failed, t.ignored), (38, 2, 1));
    }
}
