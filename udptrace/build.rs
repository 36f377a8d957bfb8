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
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../udptrace-ebpf");
    // The eBPF crate's toolchain is named once, in its rust-toolchain.toml.
    let pinned = root.join("rust-toolchain.toml");
    println!("cargo:rerun-if-changed={}", pinned.display());
    let file: toml::Table = toml::from_str(&fs::read_to_string(&pinned)?)
        .with_context(|| format!("reading {}", pinned.display()))?;
    let channel = file["toolchain"]["channel"]
        .as_str()
        .with_context(|| format!("{}: no toolchain.channel", pinned.display()))?
        .to_string();
    let toolchain = env::var("UDPTRACE_EBPF_TOOLCHAIN").unwrap_or(channel);
    let toolchain = Toolchain::Custom(&toolchain);
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
