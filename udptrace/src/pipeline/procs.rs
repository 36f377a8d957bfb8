//! Which process holds a socket, found as `ss -p` does: a `/proc/PID/fd` link named
//! `socket:[INODE]`. Used for a delivered datagram whose reader no hook saw (a reader
//! already blocked in recvmsg when an fexit was attached never returns through it).

use std::{collections::HashMap, fs};

use crate::model::Process;

/// Remembered owners, bounded.
#[derive(Debug, Default)]
pub struct SocketOwners {
    cache: HashMap<u64, Option<Process>>,
}

const MAX_CACHED: usize = 4096;

impl SocketOwners {
    /// The process holding the socket with inode `ino`, if any process still does.
    pub fn owner(&mut self, ino: u64) -> Option<Process> {
        if let Some(known) = self.cache.get(&ino) {
            return known.clone();
        }
        let found = scan(ino);
        if self.cache.len() >= MAX_CACHED {
            self.cache.clear();
        }
        self.cache.insert(ino, found.clone());
        found
    }
}

fn scan(ino: u64) -> Option<Process> {
    let target = format!("socket:[{ino}]");
    let pids = fs::read_dir("/proc").ok()?.filter_map(|e| {
        let name = e.ok()?.file_name();
        name.to_str()?.parse::<u32>().ok()
    });
    for pid in pids {
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        let holds = fds
            .filter_map(Result::ok)
            .any(|fd| fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == target.as_str()));
        if holds {
            let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            let uid = fs::read_to_string(format!("/proc/{pid}/status"))
                .ok()
                .and_then(|s| {
                    s.lines().find_map(|l| {
                        l.strip_prefix("Uid:")?
                            .split_whitespace()
                            .next()?
                            .parse()
                            .ok()
                    })
                });
            // /proc/PID/comm is the leader's: the process's name.
            let comm = comm.trim().to_string();
            return Some(Process {
                pid,
                tid: pid,
                name: comm.clone(),
                comm,
                uid,
                cgroup: 0,
            });
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use super::*;

    #[test]
    fn finds_the_owner_of_our_own_socket() {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&sock);
        let ino = fs::metadata(format!("/proc/self/fd/{fd}")).unwrap().ino();
        let owner = SocketOwners::default()
            .owner(ino)
            .expect("our process holds it");
        assert_eq!(owner.pid, std::process::id());
        assert!(SocketOwners::default().owner(u64::MAX).is_none());
    }
}
