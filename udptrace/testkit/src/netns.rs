//! Network namespaces a test (or the bench) creates, and removes when dropped: a single
//! one, a pair joined by a veth, an overlay between the pair.

use std::{
    fs::File,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use crate::sh;

/// Inode of the host's network namespace.
pub fn host_netns() -> u64 {
    std::fs::metadata("/proc/self/ns/net")
        .expect("own netns")
        .ino()
}

/// Moves the calling thread into the namespace `/run/netns/<name>`: the sockets it opens
/// from now on live there (the bench sends and receives in-process so).
pub fn enter(name: &str) -> std::io::Result<()> {
    let file = File::open(format!("/run/netns/{name}"))?;
    // SAFETY: setns on an open namespace file; it affects the calling thread only.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A network namespace that exists for the test's lifetime.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Self {
        let name = format!(
            "udpt-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        sh(&["ip", "netns", "add", &name]);
        sh(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        Self { name }
    }

    pub fn inode(&self) -> u64 {
        std::fs::metadata(format!("/run/netns/{}", self.name))
            .expect("netns file")
            .ino()
    }

    /// A command run inside this namespace (`ip netns exec` execs it in place, so the
    /// child's pid is the program's pid).
    pub fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Moves the calling thread into this namespace (see [`enter`]).
    pub fn enter(&self) -> std::io::Result<()> {
        enter(&self.name)
    }

    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["ip", "-n", &self.name];
        all.extend_from_slice(args);
        sh(&all);
    }
}

impl Drop for Netns {
    /// Ends what still runs inside (a peer a failed assertion left running would hold the
    /// test's output open) and removes the namespace.
    fn drop(&mut self) {
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    // SAFETY: kill(2); the pid is in a namespace this test made.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Two namespaces joined by a veth pair: `a` has 10.203.0.1/24 and fd0c:203::1/64,
/// `b` has .2 and ::2 (and `b` the extra addresses given).
pub struct Pair {
    pub a: Netns,
    pub b: Netns,
}

pub const A4: &str = "10.203.0.1";

pub const B4: &str = "10.203.0.2";

pub const A6: &str = "fd0c:203::1";

pub const B6: &str = "fd0c:203::2";

impl Pair {
    pub fn new(extra_b: &[&str]) -> Self {
        let a = Netns::new("a");
        let b = Netns::new("b");
        sh(&[
            "ip", "link", "add", "ut-a", "netns", &a.name, "type", "veth", "peer", "name", "ut-b",
            "netns", &b.name,
        ]);
        for (ns, dev, v4, v6) in [(&a, "ut-a", A4, A6), (&b, "ut-b", B4, B6)] {
            ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", dev]);
            ns.ip(&["addr", "add", &format!("{v6}/64"), "dev", dev, "nodad"]);
            ns.ip(&["link", "set", dev, "up"]);
        }
        for addr in extra_b {
            b.ip(&["addr", "add", addr, "dev", "ut-b"]);
        }
        Self { a, b }
    }
}

/// The overlay: vx0 in each node, VNI 42, 10.205.0.0/24 over the underlay veth
/// (10.203.0.0/24). Its MTU is the underlay's less VXLAN's 50 bytes: 1450.
pub fn overlay(net: &Pair) {
    for (ns, local, remote, overlay) in [
        (&net.a, A4, B4, "10.205.0.1/24"),
        (&net.b, B4, A4, "10.205.0.2/24"),
    ] {
        let dev = if std::ptr::eq(ns, &net.a) {
            "ut-a"
        } else {
            "ut-b"
        };
        ns.ip(&[
            "link", "add", "vx0", "type", "vxlan", "id", "42", "local", local, "remote", remote,
            "dstport", "4789", "dev", dev,
        ]);
        ns.ip(&["addr", "add", overlay, "dev", "vx0"]);
        ns.ip(&["link", "set", "vx0", "up"]);
    }
}
