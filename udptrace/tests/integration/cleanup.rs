//! What udptrace leaves in the kernel when it stops: nothing after SIGTERM or SIGINT, and
//! after SIGKILL nothing a restart does not find and remove.

use std::time::Duration;

use udptrace_testkit::*;

/// The bpf filters named like ours on the ingress of `dev` in `ns`.
fn our_filters(ns: &Netns, dev: &str) -> usize {
    let out = sh(&[
        "ip", "netns", "exec", &ns.name, "tc", "filter", "show", "dev", dev, "ingress",
    ]);
    out.lines().filter(|l| l.contains("ingress_clsact")).count()
}

/// `udptrace trace` on every namespace, with `env`; the programs it loaded.
fn start(env: &[(&str, &str)]) -> (Tracer, std::collections::BTreeSet<u64>) {
    let before = udptrace_program_ids();
    let tracer = Tracer::start_env(&["--netns", "all", "--port", "20411"], env);
    let mine = udptrace_program_ids()
        .difference(&before)
        .copied()
        .collect();
    (tracer, mine)
}

#[test]
fn sigterm_leaves_no_program_link_or_filter() {
    require_root();
    let net = Pair::new(&[]);
    for env in [vec![], vec![("UDPTRACE_DISABLE_HOOKS", "tcx")]] {
        let (mut tracer, mine) = start(&env);
        assert!(links_to(&mine) > 0 || our_filters(&net.b, "ut-b") > 0);
        tracer.signal(libc::SIGTERM);
        assert!(tracer.wait(Duration::from_secs(60)).success());
        assert_eq!(wait_unloaded(&mine), Vec::<u64>::new(), "{env:?}");
        assert_eq!(our_filters(&net.b, "ut-b"), 0, "{env:?}");
        assert_eq!(our_filters(&net.a, "ut-a"), 0, "{env:?}");
    }
}

/// A killed udptrace cannot clean up: the kernel removes its links (file descriptors) but
/// not the tc filters it added (clsact, kernels before 6.6). The next udptrace removes
/// those, keeps its own one per device, and leaves nothing when it stops.
#[test]
fn after_sigkill_a_restart_removes_what_was_left() {
    require_root();
    let net = Pair::new(&[]);

    // tcx (6.6+): links die with the process.
    if !uses_tcx(&[]) {
        eprintln!("no tcx on this kernel: the clsact part below covers it");
    } else {
        let (mut tracer, mine) = start(&[]);
        tracer.signal(libc::SIGKILL);
        let _ = tracer.wait(Duration::from_secs(10));
        assert_eq!(
            wait_unloaded(&mine),
            Vec::<u64>::new(),
            "tcx links outlived SIGKILL"
        );
    }

    let clsact = [("UDPTRACE_DISABLE_HOOKS", "tcx")];
    let (mut killed, killed_progs) = start(&clsact);
    assert_eq!(our_filters(&net.b, "ut-b"), 1);
    killed.signal(libc::SIGKILL);
    let _ = killed.wait(Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        our_filters(&net.b, "ut-b"),
        1,
        "the kernel keeps a killed process's tc filter"
    );

    let (tracer, mine) = start(&clsact);
    assert_eq!(
        our_filters(&net.b, "ut-b"),
        1,
        "the leftover is replaced, not doubled"
    );
    assert_eq!(our_filters(&net.a, "ut-a"), 1);
    assert!(
        tracer
            .stderr()
            .contains("left by a udptrace that did not stop cleanly"),
        "{}",
        tracer.stderr()
    );
    // It still traces through its own filter.
    py_send(&net.a, B4, 20411, "sendto", 8);
    let path = tracer.one_path();
    assert!(hop_kinds(&path).iter().any(|k| k == "ingress"), "{path}");
    assert!(tracer.stop().success());
    assert_eq!(wait_unloaded(&mine), Vec::<u64>::new());
    assert_eq!(our_filters(&net.b, "ut-b"), 0);
    assert_eq!(our_filters(&net.a, "ut-a"), 0);
    // The killed one's programs went with their last filter.
    assert_eq!(wait_unloaded(&killed_progs), Vec::<u64>::new());
}
