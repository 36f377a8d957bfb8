//! udptrace with only the capabilities the DaemonSet grants (as a container's root has
//! them), and with each one of them missing: it works with all of them, and a missing one
//! is named, with what it costs, instead of paths quietly lacking hops.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use serde_json::Value;
use udptrace_testkit::*;

/// `setpriv` running udptrace as root with exactly `caps` (DaemonSet spelling, e.g.
/// `NET_ADMIN`): the bounding set limits what root's exec gets, nothing is inherited.
fn with_caps(caps: &[&str]) -> Command {
    let set: Vec<String> = caps
        .iter()
        .map(|c| format!("+{}", c.to_lowercase()))
        .collect();
    let mut c = Command::new("setpriv");
    c.arg(format!("--bounding-set=-all,{}", set.join(",")))
        .arg("--inh-caps=-all")
        .arg(udptrace_bin());
    c
}

#[test]
fn the_daemonsets_capabilities_are_enough() {
    require_root();
    let caps = daemonset_capabilities();
    assert!(caps.contains(&"SYS_ADMIN"), "{caps:?}");
    let net = Pair::new(&[]);
    let agent = Agent::start_via(with_caps(&caps), &["--netns", "all", "--sample-first", "5"]);
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid())).unwrap();
    let eff = status.lines().find(|l| l.starts_with("CapEff:")).unwrap();
    let full = std::fs::read_to_string("/proc/self/status").unwrap();
    let ours = full.lines().find(|l| l.starts_with("CapEff:")).unwrap();
    assert_ne!(
        eff, ours,
        "the agent runs with fewer capabilities than the test"
    );
    // Attaching the path hooks at runtime needs no more than the DaemonSet gives either.
    agent.open_window("1m");
    for _ in 0..5 {
        py_send(&net.a, B4, 20801, "sendto", 16);
    }
    // Counted, and traced across both namespaces: the tracer entered them.
    let deadline = Instant::now() + Duration::from_secs(10);
    let path = loop {
        let body: Value = serde_json::from_str(&agent.get("/api/v1/paths?port=20801")).unwrap();
        let paths = body["paths"].as_array().unwrap().clone();
        if paths.len() >= 5 || Instant::now() > deadline {
            assert_eq!(paths.len(), 5, "{body}\n{}", agent.stderr());
            break paths[0].clone();
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let kinds = hop_kinds(&path);
    assert!(kinds.contains(&"ingress".to_string()), "{path}");
    assert_eq!(path["verdict"], "dropped", "no one listens: {path}");
    let ingress = hops_of(&path, "ingress");
    assert_eq!(ingress[0]["netns"], net.b.inode(), "{path}");
    let (status, stderr) = agent.stop(libc::SIGTERM);
    assert!(status.success(), "{stderr}");
    // Nothing missing that root has: a kernel may lack a hook for everyone (the 6.1 NAT
    // probe needs the nf_nat module loaded), which is not the capabilities' doing.
    let root = Command::new(udptrace_bin())
        .args(["trace", "--netns", "all", "--duration", "1"])
        .output()
        .unwrap();
    let root = warnings(&String::from_utf8_lossy(&root.stderr));
    let capped = warnings(&stderr);
    assert!(capped.is_subset(&root), "{capped:#?}\nroot: {root:#?}");
}

/// The warnings in udptrace's stderr, without their timestamps.
fn warnings(stderr: &str) -> std::collections::BTreeSet<String> {
    stderr
        .lines()
        .filter(|l| l.contains(" WARN "))
        .map(|l| l.split_once(" WARN ").unwrap().1.to_string())
        .collect()
}

/// Runs `udptrace trace --netns all` for a second without `missing`: its stderr.
fn trace_without(missing: &str, caps: &[&str]) -> (bool, String) {
    let keep: Vec<&str> = caps.iter().copied().filter(|c| *c != missing).collect();
    let out = with_caps(&keep)
        .args(["trace", "--netns", "all", "--duration", "1"])
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_missing_capability_is_named() {
    require_root();
    let caps = daemonset_capabilities();
    let net = Pair::new(&[]);
    // What this kernel lacks whatever the capabilities.
    let (ok, stderr) = trace_without("", &caps);
    assert!(ok, "{stderr}");
    let baseline = warnings(&stderr);
    for cap in &caps {
        let (ok, stderr) = trace_without(cap, &caps);
        assert!(ok, "without {cap}: {stderr}");
        // Some are covered by another (CAP_SYS_ADMIN allows what CAP_BPF, CAP_PERFMON and,
        // for BPF links, CAP_NET_ADMIN do); when one is missing for real, it is named.
        for line in warnings(&stderr).difference(&baseline) {
            assert!(
                line.contains(&format!("CAP_{cap}")),
                "without {cap}: {line}"
            );
        }
    }
    // Without CAP_SYS_ADMIN the test's namespaces cannot be entered: said for each hop
    // attached per namespace (tc ingress; netfilter links where the kernel has them, not
    // its global probes), and the host's own namespace is still covered.
    let (_, doctor, _) = udptrace(Command::new(udptrace_bin()).arg("doctor"));
    let per_namespace: Vec<&str> = ["nat", "deliver"]
        .into_iter()
        .filter(|hop| {
            doctor
                .lines()
                .any(|l| l.starts_with(&format!("{hop} hop")) && l.contains("uses netfilter-link"))
        })
        .chain(["ingress"])
        .collect();
    let (_, stderr) = trace_without("SYS_ADMIN", &caps);
    let b = format!("/run/netns/{}", net.b.name);
    for hop in per_namespace {
        assert!(
            stderr.lines().any(
                |l| l.contains(&format!("{hop} hop not attached everywhere"))
                    && l.contains(&b)
                    && l.contains("needs CAP_SYS_ADMIN")
            ),
            "{hop}: {stderr}"
        );
    }
    // Without CAP_BPF and CAP_SYS_ADMIN nothing can load: an error that says so, at once.
    let keep: Vec<&str> = caps
        .iter()
        .copied()
        .filter(|c| *c != "BPF" && *c != "SYS_ADMIN")
        .collect();
    let (status, _, err) = udptrace(with_caps(&keep).args(["trace"]));
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("missing: CAP_BPF"), "{err}");
}
