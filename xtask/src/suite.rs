//! The test suite as xtask runs it, here and in VMs: building the test binaries, picking
//! them by name, running one and adding up its libtest summary.

use std::process::Command;

use anyhow::{bail, Context as _, Result};

use crate::cmd::{exec, workspace};

/// Builds target/release/udptrace with its eBPF programs embedded.
pub fn build_release() -> Result<()> {
    exec(Command::new("cargo").current_dir(workspace()).args([
        "build",
        "--release",
        "-p",
        "udptrace",
    ]))
}

pub fn cargo(args: &[&str]) -> Command {
    let mut c = Command::new("cargo");
    c.current_dir(workspace()).args(args);
    c
}

/// Builds udptrace and every test binary; returns the test binaries' paths.
pub fn build_tests() -> Result<Vec<String>> {
    build_release()?;
    let out = cargo(&["test", "--release", "--no-run", "--message-format=json"])
        .output()
        .context("building the tests")?;
    if !out.status.success() {
        bail!(
            "building the tests failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let binaries: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| test_executable(line).ok().flatten())
        .collect();
    if binaries.is_empty() {
        bail!("cargo built no test binaries");
    }
    Ok(binaries)
}

/// The integration tests' binary (udptrace/tests/integration/, one module per hop or
/// scenario).
pub const INTEGRATION: &str = "integration";

/// libtest filters for the integration test modules named in `list` (`overlay,nat`):
/// `overlay::`, `nat::`. Empty for an empty list (every test).
pub fn module_filters(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .map(|m| format!("{m}::"))
        .collect()
}

/// Whether `path` is the binary cargo built for test target `name` (`name-<hash>`).
pub fn is_test_binary(path: &str, name: &str) -> bool {
    std::path::Path::new(path)
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{name}-")))
}

#[derive(Default)]
pub struct Totals {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
    /// The tests that failed, by name (with the kernel they ran on, in a VM).
    pub failures: Vec<String>,
    /// Where each failing test panicked and the first lines of its message: the end of a
    /// CI log is often all a reader gets.
    pub panics: Vec<String>,
    /// Lines of the panic being read, while its message goes on.
    reading_panic: Option<usize>,
}

/// How many lines of a panic's message the closing summary repeats.
const PANIC_LINES: usize = 6;
/// How long a repeated line may be.
const PANIC_LINE_CHARS: usize = 300;

impl Totals {
    /// One closing line for the whole run, in the form CI reads, after the names of the
    /// tests that failed (the end of a long log is what a reader sees first).
    pub fn print(&self) {
        for panic in &self.panics {
            println!("{panic}");
        }
        for name in &self.failures {
            println!("failed: {name}");
        }
        println!(
            "tests: {} passed, {} failed, {} skipped",
            self.passed, self.failed, self.ignored
        );
    }

    /// Reads one line of libtest's output: the counts of a summary line
    /// (`test result: ok. 12 passed; 0 failed; 0 ignored; ...`) and the name in a failed
    /// test's line (`test nat::x ... FAILED`), kept with `place` (where it ran) if given.
    pub fn add_line(&mut self, line: &str, place: Option<&str>) {
        self.read_panic(line, place);
        if let Some(name) = line
            .strip_prefix("test ")
            .and_then(|l| l.strip_suffix(" ... FAILED"))
        {
            self.failures.push(match place {
                Some(p) => format!("{name} ({p})"),
                None => name.to_string(),
            });
            return;
        }
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

    /// Keeps a failing test's panic (`thread 'nat::x' panicked at file:line:` and the
    /// message's first lines, up to an empty line).
    fn read_panic(&mut self, line: &str, place: Option<&str>) {
        if line.starts_with("thread '") && line.contains("' panicked at ") {
            let at = match place {
                Some(p) => format!("panic ({p}): {line}"),
                None => format!("panic: {line}"),
            };
            self.panics.push(at);
            self.reading_panic = Some(0);
            return;
        }
        let Some(n) = self.reading_panic else { return };
        let last = self.panics.last_mut().expect("a panic being read");
        if line.trim().is_empty() || n >= PANIC_LINES {
            self.reading_panic = None;
            return;
        }
        let cut: String = line.chars().take(PANIC_LINE_CHARS).collect();
        last.push_str("\n  ");
        last.push_str(&cut);
        self.reading_panic = Some(n + 1);
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
        totals.add_line(&line, Some("host"));
    }
    Ok(child.wait()?.success())
}

/// Picks the executable of a test artifact out of one line of cargo's JSON messages.
fn test_executable(line: &str) -> Result<Option<String>> {
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
    fn names_test_binaries_by_their_file() {
        let soak = "/w/target/release/deps/soak-8a6f6cc6d32fc8a3";
        assert!(is_test_binary(soak, "soak"));
        assert!(!is_test_binary(soak, "so"));
        assert!(!is_test_binary("/w/target/release/deps/soakage-1", "soak"));
        assert!(!is_test_binary("/w/soak-1/deps/drop-2", "soak"));
    }

    #[test]
    fn module_lists_become_filters() {
        assert_eq!(module_filters("overlay, nat,"), ["overlay::", "nat::"]);
        assert!(module_filters("").is_empty());
    }

    #[test]
    fn sums_libtest_summaries() {
        let mut t = Totals::default();
        t.add_line("test result: ok. 12 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 13.53s", None);
        t.add_line(
            "test result: FAILED. 26 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out",
            None,
        );
        t.add_line("running 3 tests", None);
        t.add_line("test nat::a_rewrite_is_seen ... FAILED", Some("6.1"));
        t.add_line("test nat::b ... ok", None);
        assert_eq!((t.passed, t.failed, t.ignored), (38, 2, 1));
        assert_eq!(t.failures, ["nat::a_rewrite_is_seen (6.1)"]);
    }

    #[test]
    fn keeps_the_start_of_each_panic() {
        let mut t = Totals::default();
        for line in [
            "---- churn::x stdout ----",
            "warm: 2 namespaces",
            "thread 'churn::x' panicked at udptrace/tests/integration/churn.rs:300:9:",
            "round 3: descriptors",
            "left: 7",
            "",
            "more output",
        ] {
            t.add_line(line, Some("host"));
        }
        assert_eq!(
            t.panics,
            ["panic (host): thread 'churn::x' panicked at \
              udptrace/tests/integration/churn.rs:300:9:\n  round 3: descriptors\n  left: 7"]
        );
    }
}
