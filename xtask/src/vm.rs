//! `cargo xtask integration-test --vm`: the integration suite on other kernels, under qemu.
//!
//! For each kernel: fetch Debian's kernel package with `apt-get download` (cached under
//! ~/.cache/udptrace/kernels), build a cpio initramfs holding the test binaries, udptrace, the
//! tools the tests run (with their shared libraries), and the kernel's network modules, boot it
//! with qemu (TCG), stream the guest's console, and require the success marker.

use std::{
    collections::BTreeSet,
    fs,
    io::{BufRead as _, BufReader, Write as _},
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::{
    cmd::{exec, output, workspace},
    suite::{build_tests, is_test_binary, module_filters, Totals, INTEGRATION},
};

/// Kernels tested by default: Debian 12's 6.1 LTS (cloud flavour: small, BTF, kprobes).
pub const DEFAULT_KERNELS: &[&str] = &["6.1"];
/// Whole-run limit for one guest.
const GUEST_TIMEOUT: Duration = Duration::from_secs(25 * 60);
const SUCCESS: &str = "udptrace-vm: SUCCESS";
const FAILURE: &str = "udptrace-vm: FAILURE";

/// Host tools the guest needs: init's, and what the tests run.
const TOOLS: &[&str] = &[
    "sh",
    "mount",
    "umount",
    "cat",
    "sleep",
    "uname",
    "mkdir",
    "ls",
    "grep",
    "env",
    "setpriv",
    "python3",
    "nc",
    "ip",
    "iptables",
    "ip6tables",
    "iptables-nft",
    "nft",
    "bpftool",
    "kmod",
    "modprobe",
    "conntrack",
    "tcpdump",
    "dig",
    "nstat",
    "dnsmasq",
    "sysctl",
    "tc",
    "ss",
];

/// Kernel module directories the tests' network setups use (veth, bridge, vxlan, netfilter,
/// tc) and what they depend on.
const MODULE_DIRS: &[&str] = &[
    "kernel/net",
    "kernel/drivers/net",
    "kernel/lib",
    "kernel/crypto",
    "kernel/arch",
];

/// Parts of Python's standard library the tests never import.
const PYTHON_SKIP: &[&str] = &[
    "test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "lib2to3",
    "pydoc_data",
    "config-3.11-x86_64-linux-gnu",
    "site-packages",
    "dist-packages",
];

fn cache() -> Result<PathBuf> {
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    Ok(PathBuf::from(home).join(".cache/udptrace/kernels"))
}

/// A kernel unpacked from its Debian package.
struct Kernel {
    release: String,
    vmlinuz: PathBuf,
    modules: PathBuf,
}

/// Resolves a kernel spec to a Debian package: `6.1` means the newest 6.1 cloud kernel
/// (what `linux-image-cloud-amd64` depends on); anything else is a package name.
fn package_for(spec: &str) -> Result<String> {
    if spec.starts_with("linux-image-") {
        return Ok(spec.to_string());
    }
    if spec != "6.1" {
        bail!("unknown kernel {spec:?}: give `6.1` or a Debian package name (linux-image-…)");
    }
    let deps = output(Command::new("apt-cache").args(["depends", "linux-image-cloud-amd64"]))?;
    deps.lines()
        .find_map(|l| l.trim().strip_prefix("Depends: "))
        .filter(|p| p.starts_with("linux-image-6.1"))
        .map(str::to_string)
        .context("apt-cache knows no linux-image-cloud-amd64 6.1 kernel: run `apt-get update`")
}

fn fetch(spec: &str) -> Result<Kernel> {
    // A machine whose package lists are missing or old knows no (or a vanished) package:
    // refresh them once and retry.
    let pkg = match package_for(spec) {
        Ok(p) => p,
        Err(_) => {
            exec(Command::new("apt-get").args(["update", "-qq"]))?;
            package_for(spec)?
        }
    };
    let dir = cache()?.join(&pkg);
    let root = dir.join("root");
    if !root.join("boot").is_dir() {
        fs::create_dir_all(&dir)?;
        let deb = || -> Option<PathBuf> {
            fs::read_dir(&dir)
                .ok()?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .find(|p| p.extension().is_some_and(|x| x == "deb"))
        };
        if deb().is_none() {
            let mut download = Command::new("apt-get");
            download.current_dir(&dir).args(["download", &pkg]);
            if exec(&mut download).is_err() {
                exec(Command::new("apt-get").args(["update", "-qq"]))?;
                exec(&mut download)?;
            }
        }
        let deb = deb().context("apt-get download left no .deb")?;
        let tmp = dir.join("root.tmp");
        let _ = fs::remove_dir_all(&tmp);
        exec(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tmp))?;
        fs::rename(&tmp, &root)?;
    }
    let vmlinuz = fs::read_dir(root.join("boot"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .context("the kernel package has no boot/vmlinuz-*")?;
    let release = vmlinuz.file_name().unwrap().to_string_lossy()["vmlinuz-".len()..].to_string();
    let modules = root.join("lib/modules").join(&release);
    Ok(Kernel {
        release,
        vmlinuz,
        modules,
    })
}

/// Where a host command lives.
fn which(tool: &str) -> Result<PathBuf> {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.exists())
        .with_context(|| format!("{tool} is not installed: run `cargo xtask setup`"))
}

/// Builds the guest's root filesystem in a staging directory.
struct Staging {
    root: PathBuf,
    copied: BTreeSet<PathBuf>,
}

impl Staging {
    fn new(root: PathBuf) -> Result<Self> {
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root)?;
        // Mirror merged-/usr links (bin -> usr/bin, ...) so copied paths resolve alike.
        for top in ["bin", "sbin", "lib", "lib64", "lib32", "libx32"] {
            let host = Path::new("/").join(top);
            if let Ok(target) = fs::read_link(&host) {
                fs::create_dir_all(root.join(target.strip_prefix("/").unwrap_or(&target)))?;
                std::os::unix::fs::symlink(&target, root.join(top))?;
            }
        }
        for d in ["proc", "sys", "dev", "run", "tmp", "root", "etc", "var"] {
            fs::create_dir_all(root.join(d))?;
        }
        std::os::unix::fs::symlink("/run", root.join("var/run"))?;
        Ok(Self {
            root,
            copied: BTreeSet::new(),
        })
    }

    fn dest(&self, path: &Path) -> PathBuf {
        self.root.join(path.strip_prefix("/").unwrap_or(path))
    }

    /// Copies a host path (following and recreating symlinks) and, for ELF files, the
    /// shared libraries `ldd` names.
    fn copy(&mut self, path: &Path) -> Result<()> {
        if !self.copied.insert(path.to_path_buf()) {
            return Ok(());
        }
        let meta = fs::symlink_metadata(path).with_context(|| format!("{}", path.display()))?;
        let dest = self.dest(path);
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent)?;
        }
        if meta.file_type().is_symlink() {
            let target = fs::read_link(path)?;
            let _ = fs::remove_file(&dest);
            std::os::unix::fs::symlink(&target, &dest)?;
            let resolved = path.parent().unwrap_or(Path::new("/")).join(&target);
            return self.copy(&resolved);
        }
        if meta.is_dir() {
            fs::create_dir_all(&dest)?;
            return Ok(());
        }
        // A path through a directory symlink (e.g. /lib/x86_64-linux-gnu/…): the parent
        // link was mirrored, so writing through it lands in the right place.
        fs::copy(path, &dest).with_context(|| format!("copying {}", path.display()))?;
        if is_elf(path) {
            for lib in ldd(path)? {
                self.copy(&lib)?;
            }
        }
        Ok(())
    }

    /// Copies a directory tree, skipping top-level entries named in `skip`.
    fn copy_tree(&mut self, dir: &Path, skip: &[&str]) -> Result<()> {
        for entry in fs::read_dir(dir)? {
            let path = entry?.path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            if skip.contains(&name.as_str()) {
                continue;
            }
            if fs::symlink_metadata(&path)?.is_dir() {
                self.copy_tree(&path, &[])?;
            } else {
                self.copy(&path)?;
            }
        }
        Ok(())
    }

    fn write(&self, path: &str, text: &str, mode: u32) -> Result<()> {
        let dest = self.dest(Path::new(path));
        fs::create_dir_all(dest.parent().unwrap())?;
        fs::write(&dest, text)?;
        fs::set_permissions(&dest, fs::Permissions::from_mode(mode))?;
        Ok(())
    }
}

fn is_elf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok()
        && magic == *b"\x7fELF"
}

/// Shared libraries (and the dynamic loader) an ELF file needs.
fn ldd(path: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(path).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let p = l
                .split("=> ")
                .nth(1)
                .unwrap_or(l)
                .split(" (")
                .next()?
                .trim();
            p.starts_with('/').then(|| PathBuf::from(p))
        })
        .collect())
}

/// Copies the kernel's network modules and indexes them with depmod.
fn add_modules(st: &mut Staging, k: &Kernel) -> Result<()> {
    let dest = st.dest(Path::new("/lib/modules")).join(&k.release);
    fs::create_dir_all(&dest)?;
    for f in [
        "modules.order",
        "modules.builtin",
        "modules.builtin.modinfo",
    ] {
        if k.modules.join(f).exists() {
            fs::copy(k.modules.join(f), dest.join(f))?;
        }
    }
    for dir in MODULE_DIRS {
        let src = k.modules.join(dir);
        if src.is_dir() {
            exec(
                Command::new("cp")
                    .arg("-a")
                    .arg(&src)
                    .arg(dest.join(dir).parent().unwrap()),
            )?;
        }
    }
    exec(
        Command::new("depmod")
            .arg("-b")
            .arg(&st.root)
            .arg(&k.release),
    )
}

/// The guest's /init. The root is the initramfs itself (writable), so nothing is mounted
/// over /tmp: the binaries sit at their host paths, which may be under /tmp.
fn init_script(udptrace: &str, tests: &[String], filters: &[String], rounds: u32) -> String {
    let quote = |items: &[String]| {
        items
            .iter()
            .map(|t| format!("'{t}'"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let (tests, filters) = (quote(tests), quote(filters));
    format!(
        r#"#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root RUST_BACKTRACE=1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /run
mount -t bpf bpf /sys/fs/bpf
mount -t tracefs tracefs /sys/kernel/tracing
mount -t debugfs debugfs /sys/kernel/debug
mount -t cgroup2 cgroup2 /sys/fs/cgroup
ip link set lo up
echo "udptrace-vm: kernel $(uname -r)"
echo "udptrace-vm: udptrace doctor"
'{udptrace}' doctor
status=0
round=0
while [ $round -lt {rounds} ]; do
    round=$((round + 1))
    for t in {tests}; do
        echo "udptrace-vm: running $t (round $round of {rounds})"
        "$t" --test-threads=1 --show-output {filters} || status=1
    done
done
# Nothing else loads BPF programs here: any of ours still loaded after every run stopped
# is a leak (a filter or link left behind). The kernel frees programs a moment after
# their last user goes.
sleep 2
left=$(bpftool prog show | grep -E 'name (send|xmit|drop|nat|deliver|recv|ingress|count|sample)_')
if [ -n "$left" ]; then
    echo "udptrace-vm: programs left loaded after the suite:"
    echo "$left"
    for dev in $(ls /sys/class/net); do tc filter show dev "$dev" ingress; done
    status=1
fi
if [ $status = 0 ]; then echo "{SUCCESS}"; else echo "{FAILURE}"; fi
echo o > /proc/sysrq-trigger
sleep 30
"#
    )
}

/// Writes `root` as a newc cpio archive (what the kernel unpacks as its initramfs).
fn write_cpio(root: &Path, out: &Path) -> Result<()> {
    let mut w = std::io::BufWriter::new(fs::File::create(out)?);
    let mut ino = 1;
    let mut stack = vec![root.to_path_buf()];
    let mut entries = Vec::new();
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir)? {
            let path = e?.path();
            if fs::symlink_metadata(&path)?.is_dir() {
                stack.push(path.clone());
            }
            entries.push(path);
        }
    }
    entries.sort(); // parents before children
    for path in entries {
        let meta = fs::symlink_metadata(&path)?;
        let name = path.strip_prefix(root)?.to_string_lossy().to_string();
        let builder = cpio::newc::Builder::new(&name)
            .ino(ino)
            .mode(meta.mode())
            .uid(0)
            .gid(0)
            .nlink(1)
            .mtime(0);
        ino += 1;
        let data = if meta.file_type().is_symlink() {
            fs::read_link(&path)?.to_string_lossy().as_bytes().to_vec()
        } else if meta.is_file() {
            fs::read(&path)?
        } else {
            Vec::new()
        };
        let size = u32::try_from(data.len()).context("file too large for cpio")?;
        let mut writer = builder.write(&mut w, size);
        writer.write_all(&data)?;
        writer.finish()?;
    }
    cpio::newc::trailer(&mut w)?;
    w.flush()?;
    Ok(())
}

/// Builds the initramfs for `k`; returns its path.
fn initramfs(
    k: &Kernel,
    udptrace: &Path,
    tests: &[String],
    filters: &[String],
    rounds: u32,
) -> Result<PathBuf> {
    let vm_dir = workspace().join("target/vm");
    let mut st = Staging::new(vm_dir.join(format!("root-{}", k.release)))?;
    for tool in TOOLS {
        st.copy(&which(tool)?)?;
    }
    // iptables' match/target extensions, Python's standard library, name databases.
    st.copy_tree(Path::new("/usr/lib/x86_64-linux-gnu/xtables"), &[])?;
    st.copy_tree(Path::new("/usr/lib/python3.11"), PYTHON_SKIP)?;
    // scapy (Debian's python3-scapy), which crafts tests/integration/malformed.rs's packets.
    st.copy_tree(Path::new("/usr/lib/python3/dist-packages/scapy"), &[])?;
    for f in [
        "/etc/passwd",
        "/etc/group",
        "/etc/protocols",
        "/etc/services",
        "/etc/nsswitch.conf",
    ] {
        if Path::new(f).exists() {
            st.copy(Path::new(f))?;
        }
    }
    st.copy(udptrace)?;
    for t in tests {
        st.copy(Path::new(t))?;
    }
    add_modules(&mut st, k)?;
    st.write(
        "/init",
        &init_script(&udptrace.to_string_lossy(), tests, filters, rounds),
        0o755,
    )?;
    let out = vm_dir.join(format!("initramfs-{}.cpio", k.release));
    write_cpio(&st.root, &out)?;
    Ok(out)
}

/// Boots `k` with `initrd`, streams its console, and returns whether it printed SUCCESS.
fn boot(k: &Kernel, initrd: &Path, totals: &mut Totals) -> Result<bool> {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "2048"])
        .args([
            "-nographic",
            "-no-reboot",
            "-nodefaults",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(&k.vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 panic=-1 rdinit=/init loglevel=4"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    eprintln!("xtask: $ {}", crate::cmd::show(&cmd));
    let mut child = cmd
        .spawn()
        .context("starting qemu-system-x86_64: run `cargo xtask setup`")?;
    let stdout = child.stdout.take().context("qemu stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + GUEST_TIMEOUT;
    let mut verdict = None;
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => {
                let line = line.trim_end_matches('\r').to_string();
                println!("[{}] {line}", k.release);
                totals.add_line(&line, Some(&k.release));
                if line.contains(SUCCESS) {
                    verdict = Some(true);
                } else if line.contains(FAILURE) {
                    verdict = Some(false);
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                eprintln!(
                    "xtask: the {} guest did not finish within {GUEST_TIMEOUT:?}",
                    k.release
                );
                let _ = child.kill();
                break;
            }
        }
    }
    let _ = child.wait();
    match verdict {
        Some(ok) => Ok(ok),
        None => {
            eprintln!(
                "xtask: the {} guest ended without a success or failure marker",
                k.release
            );
            Ok(false)
        }
    }
}

/// Runs the integration suite in a VM per kernel spec.
pub fn run(kernels: &[String], totals: &mut Totals) -> Result<()> {
    // UDPTRACE_VM_TESTS=overlay,nat runs only those modules of the integration tests (a
    // quicker loop when one kernel's behaviour is in question).
    let only = std::env::var("UDPTRACE_VM_TESTS").unwrap_or_default();
    let filters = module_filters(&only);
    // UDPTRACE_VM_ROUNDS=10 runs them that many times in one boot (chasing a rare failure).
    let rounds = match std::env::var("UDPTRACE_VM_ROUNDS") {
        Ok(n) => n
            .parse::<u32>()
            .ok()
            .filter(|&n| n > 0)
            .context("UDPTRACE_VM_ROUNDS must be a positive number")?,
        Err(_) => 1,
    };
    let tests: Vec<String> = build_tests()?
        .into_iter()
        .filter(|t| !is_test_binary(t, "xtask"))
        .filter(|t| filters.is_empty() || is_test_binary(t, INTEGRATION))
        .collect();
    let udptrace = workspace().join("target/release/udptrace");
    let mut failed = Vec::new();
    for spec in kernels {
        let started = Instant::now();
        let k = fetch(spec)?;
        let initrd = initramfs(&k, &udptrace, &tests, &filters, rounds)?;
        let mb = fs::metadata(&initrd)?.len() / (1 << 20);
        eprintln!(
            "xtask: booting Linux {} ({mb} MiB initramfs) under qemu (TCG)",
            k.release
        );
        if !boot(&k, &initrd, totals)? {
            failed.push(k.release.clone());
        }
        eprintln!(
            "xtask: {} guest done in {:.0?}",
            k.release,
            started.elapsed()
        );
    }
    if !failed.is_empty() {
        bail!("the integration suite failed in the VM on: {failed:?}");
    }
    Ok(())
}
