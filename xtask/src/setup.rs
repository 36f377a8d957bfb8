//! `cargo xtask setup`: everything the build and the tests need on a fresh Debian/Ubuntu
//! host, installed only when missing.
//!
//! - Debian packages used by the tests (peers, netfilter tools, ground truth).
//! - `rust-src` for the toolchain that builds the eBPF crate (`-Z build-std=core`).
//! - bpf-linker linked against that toolchain's own libLLVM: no system LLVM. Its prefix
//!   lives under ~/.cache/udptrace, named after the exact library, so a toolchain update
//!   makes a new prefix and a rebuild instead of a broken symlink.

use std::{fs, path::PathBuf, process::Command};

use anyhow::{Context as _, Result};

use crate::cmd::{exec, output, root_command};

/// The toolchain that builds the eBPF crate (aya-build runs `rustup run <it> cargo build`):
/// `toolchain.channel` of udptrace-ebpf/rust-toolchain.toml, where it is named once.
pub fn ebpf_toolchain() -> Result<String> {
    let file = crate::cmd::workspace().join("udptrace-ebpf/rust-toolchain.toml");
    let text = fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let pinned: toml::Table =
        toml::from_str(&text).with_context(|| format!("parsing {}", file.display()))?;
    pinned
        .get("toolchain")
        .and_then(|t| t.get("channel"))
        .and_then(|c| c.as_str())
        .map(str::to_string)
        .with_context(|| format!("{}: no toolchain.channel", file.display()))
}
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Packages the tests and the tracer's users need.
const PACKAGES: &[&str] = &[
    "iproute2",
    "iptables",
    "nftables",
    "conntrack",
    "tcpdump",
    "netcat-openbsd",
    "dnsutils",
    "python3",
    "bpftool",
    // The benchmark compares the tracer's overhead with a bpftrace one-liner's.
    "bpftrace",
    // Crafts the malformed packets of tests/integration/malformed.rs.
    "python3-scapy",
    "util-linux",
    "procps",
    "sudo",
    // A real DNS server behind the Service VIP in the kube-proxy-shaped test.
    "dnsmasq-base",
    // Real containers for the origin-story test (netavark backend, runc runtime).
    "podman",
    "runc",
    "netavark",
    "aardvark-dns",
    // A real Prometheus server scrapes the agent in a test; promtool lints /metrics.
    "prometheus",
    // The static (musl) agent binary for the image: ring's C and assembly need musl's gcc.
    "musl-tools",
    // The VM tests: qemu, and the kernel modules index.
    "qemu-system-x86",
    "kmod",
];

pub fn run() -> Result<()> {
    packages()?;
    rust_src()?;
    bpf_linker()?;
    python_tools()?;
    musl_target()
}

/// The static target the container image's binary is built for.
fn musl_target() -> Result<()> {
    let installed = output(Command::new("rustup").args(["target", "list", "--installed"]))?;
    if installed.lines().any(|l| l.trim() == crate::image::TARGET) {
        return Ok(());
    }
    exec(Command::new("rustup").args(["target", "add", crate::image::TARGET]))
}

/// The Kubernetes schema validator the deploy test runs, pinned, in a venv of its own.
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";

/// Where `python_tools` puts its venv (`bin/kubernetes-validate`).
fn venv() -> Result<PathBuf> {
    Ok(home()?.join(".cache/udptrace/venv"))
}

fn python_tools() -> Result<()> {
    let venv = venv()?;
    let stamp = venv.join("udptrace.stamp");
    if fs::read_to_string(&stamp).is_ok_and(|s| s == KUBERNETES_VALIDATE) {
        return Ok(());
    }
    exec(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    exec(Command::new(venv.join("bin/pip")).args(["install", "-q", KUBERNETES_VALIDATE]))?;
    fs::write(&stamp, KUBERNETES_VALIDATE)?;
    Ok(())
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    exec(root_command("apt-get").args(["update", "-qq"]))?;
    exec(
        root_command("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing),
    )
}

fn rust_src() -> Result<()> {
    let toolchain = ebpf_toolchain()?;
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))?;
    if !toolchains
        .lines()
        .any(|l| l.starts_with(toolchain.as_str()))
    {
        exec(Command::new("rustup").args([
            "toolchain",
            "install",
            toolchain.as_str(),
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
    }
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        toolchain.as_str(),
    ]))?;
    // rust-src for `-Z build-std=core`; clippy lints the eBPF crate in `xtask test`.
    for component in ["rust-src", "clippy"] {
        if !components.lines().any(|l| l.starts_with(component)) {
            exec(Command::new("rustup").args([
                "component",
                "add",
                component,
                "--toolchain",
                toolchain.as_str(),
            ]))?;
        }
    }
    Ok(())
}

pub fn home() -> Result<PathBuf> {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .context("HOME is not set")
}

/// The toolchain's LLVM: (major version, directory, file name of the shared library).
fn toolchain_llvm() -> Result<(u32, PathBuf, String)> {
    let toolchain = ebpf_toolchain()?;
    let vv = output(
        Command::new("rustc")
            .arg(format!("+{toolchain}"))
            .arg("-vV"),
    )?;
    let major = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.parse().ok())
        .context("rustc -vV printed no LLVM version")?;
    // The channel is pinned, not the date (udptrace-ebpf/rust-toolchain.toml): say which.
    let field = |name: &str| {
        vv.lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or("?")
            .to_string()
    };
    eprintln!(
        "xtask: eBPF toolchain {toolchain}: rustc {} ({}), LLVM {}",
        field("release: "),
        field("commit-date: "),
        field("LLVM version: ")
    );
    let sysroot = output(
        Command::new("rustc")
            .arg(format!("+{toolchain}"))
            .args(["--print", "sysroot"]),
    )?;
    let lib = PathBuf::from(sysroot.trim()).join("lib");
    // The real library is `libLLVM.so.<ver>-rust-<ver>` (its SONAME); `libLLVM-<major>-…so`
    // beside it is a linker script.
    let name = fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .find(|n| n.starts_with("libLLVM.so."))
        .with_context(|| {
            format!(
                "no libLLVM.so.* in {}: is the {toolchain} toolchain complete?",
                lib.display()
            )
        })?;
    Ok((major, lib, name))
}

fn bpf_linker() -> Result<()> {
    let (major, lib, name) = toolchain_llvm()?;
    let cache = home()?.join(".cache/udptrace");
    let stamp = cache.join("bpf-linker.stamp");
    let want = format!("bpf-linker {BPF_LINKER_VERSION} llvm-{major} {name}\n");
    let works = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if works && fs::read_to_string(&stamp).is_ok_and(|s| s == want) {
        return Ok(());
    }
    // A prefix whose lib/ holds the toolchain's libLLVM under both names bpf-linker's build
    // wants: libLLVM.so to link against, and the SONAME to find at run time (RUNPATH).
    let prefix = cache.join(format!("llvm-{name}"));
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)?;
    for link in ["libLLVM.so", name.as_str()] {
        let link = prefix_lib.join(link);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(lib.join(&name), &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    exec(
        Command::new("cargo")
            .env("LLVM_PREFIX", &prefix)
            .args([
                "install",
                &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                "--locked",
                "--force",
            ])
            .args([
                "--no-default-features",
                "--features",
                &format!("llvm-{major}"),
            ]),
    )?;
    fs::write(&stamp, want)?;
    Ok(())
}
