//! The kernel programs' own logs (aya-log), on with `--log-level debug`: the verifier must
//! accept every program with its log code, so each hop keeps the hook it has without them.
//! (tests/integration/pressure.rs sees them name lost events as they happen.)

use std::process::Command;

use udptrace_testkit::*;

/// `doctor`'s "<hop> hop  uses <hook>" lines, and its whole report.
fn hooks_in_use(args: &[&str]) -> (Vec<String>, String) {
    let (status, out, err) = udptrace(Command::new(udptrace_bin()).args(args).arg("doctor"));
    assert!(status.success(), "doctor {args:?} failed:\n{out}\n{err}");
    let hooks = out
        .lines()
        .filter(|l| l.contains(" hop ") && !l.starts_with(' '))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    (hooks, out)
}

#[test]
fn kernel_logs_on_keep_every_hop_on_its_hook() {
    require_root();
    let (without, _) = hooks_in_use(&[]);
    assert!(
        without.iter().any(|l| l.starts_with("send hop uses")),
        "{without:?}"
    );
    let (with, report) = hooks_in_use(&["--log-level", "debug"]);
    assert_eq!(
        with, without,
        "hooks with kernel logs on vs off; doctor with them on:\n{report}"
    );
}
