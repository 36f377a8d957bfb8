//! Builds the kernel programs (`udptrace-ebpf`) for the BPF target and leaves the object in
//! `OUT_DIR`, where `loader` embeds it.

use std::{env, fs, path::PathBuf};

use anyhow::Context as _;
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=UDPTRACE_EBPF_TOOLCHAIN");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    // With AYA_BUILD_SKIP=1 (cargo check, clippy, docs) there is no object; leave an empty
    // one so the crate compiles, and the loader says so at run time.
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        fs::write(out_dir.join("udptrace-ebpf"), [])?;
    }
    let toolchain = env::var("UDPTRACE_EBPF_TOOLCHAIN").ok();
    let toolchain = toolchain
        .as_deref()
        .map_or(Toolchain::Nightly, Toolchain::Custom);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../udptrace-ebpf");
    let root = root.to_str().context("non-UTF-8 path")?;
    aya_build::build_ebpf(
        [Package {
            name: "udptrace-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        toolchain,
    )
    .context("building the eBPF programs failed: run `cargo xtask setup` first")
}
