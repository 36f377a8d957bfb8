//! deploy/: every manifest validates against the Kubernetes schemas, strictly (unknown
//! fields are errors), with the validator `cargo xtask setup` installs.

use udptrace_testkit::{daemonset_capabilities, DAEMONSET};

use std::{
    path::{Path, PathBuf},
    process::Command,
};

fn validator() -> Option<PathBuf> {
    let home = std::env::var_os("HOME")?;
    let exe = Path::new(&home).join(".cache/udptrace/venv/bin/kubernetes-validate");
    exe.exists().then_some(exe)
}

/// Every Kubernetes manifest under deploy/ (kustomization files configure kustomize; they
/// are not resources).
fn manifests() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let mut out = Vec::new();
    let mut dirs = vec![root];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().map(Result::unwrap) {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml")
                && path.file_name().is_some_and(|n| n != "kustomization.yaml")
            {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

fn validate(exe: &Path, files: &[PathBuf]) -> (bool, String) {
    let out = Command::new(exe)
        .arg("--strict")
        .args(files)
        .output()
        .expect("kubernetes-validate");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success() && !text.contains("ERROR"), text)
}

#[test]
fn every_manifest_validates_strictly() {
    let Some(exe) = validator() else {
        eprintln!(
            "skipped: kubernetes-validate is not installed here (`cargo xtask setup` installs it)"
        );
        return;
    };
    let files = manifests();
    let names: Vec<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for want in [
        "namespace.yaml",
        "serviceaccount.yaml",
        "rbac.yaml",
        "configmap.yaml",
        "daemonset.yaml",
        "service.yaml",
        "servicemonitor.yaml",
    ] {
        assert!(names.iter().any(|n| n == want), "deploy/ has no {want}");
    }
    let (ok, report) = validate(&exe, &files);
    assert!(ok, "{report}");
    // Every core resource was checked against a schema (only the ServiceMonitor, a CRD of
    // the Prometheus Operator, has none in the validator).
    assert_eq!(
        report.matches(" passed for resource ").count(),
        7,
        "{report}"
    );

    // The check has teeth: a DaemonSet with a misspelt field is refused.
    let dir = std::env::temp_dir().join(format!("udpt-deploy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("daemonset.yaml");
    let ds = std::fs::read_to_string(
        files
            .iter()
            .find(|f| f.ends_with("daemonset.yaml"))
            .unwrap(),
    )
    .unwrap();
    std::fs::write(&bad, ds.replace("hostNetwork: true", "hostNetwrok: true")).unwrap();
    let (ok, report) = validate(&exe, &[bad]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(!ok, "a misspelt field passed: {report}");
}

/// The DaemonSet grants named capabilities only: never privileged, everything else dropped.
#[test]
fn the_daemonset_is_not_privileged_and_names_its_capabilities() {
    let ds = DAEMONSET;
    assert!(ds.contains("privileged: false"));
    assert!(!ds.contains("privileged: true"));
    assert!(ds.contains("drop: [\"ALL\"]"));
    assert_eq!(
        daemonset_capabilities(),
        [
            "BPF",
            "PERFMON",
            "NET_ADMIN",
            "SYS_ADMIN",
            "SYS_PTRACE",
            "SYS_RESOURCE"
        ]
    );
}
