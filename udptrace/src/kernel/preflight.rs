//! Checks made before loading anything, each failing with what to do next.

use std::fs;

/// Oldest kernel udptrace supports: BPF ring buffers arrived in Linux 5.8.
pub const MIN_KERNEL: (u32, u32) = (5, 8);

#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error(
        "udptrace needs root, or CAP_BPF and CAP_PERFMON (it loads eBPF programs and attaches \
         them to kernel hooks); missing: {missing}. Run it with sudo"
    )]
    Privileges { missing: String },
    #[error(
        "kernel {release} is too old: udptrace needs Linux {}.{} or newer (BPF ring buffer)",
        MIN_KERNEL.0, MIN_KERNEL.1
    )]
    KernelTooOld { release: String },
    #[error("cannot tell the kernel version from {release:?}")]
    KernelVersion { release: String },
}

/// The running kernel's release string (`uname -r`).
pub fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Major and minor version from a release like `6.18.44-fc-v657`.
pub fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Fails when the kernel predates [`MIN_KERNEL`].
pub fn check_kernel(release: &str) -> Result<(u32, u32), PreflightError> {
    let version = parse_release(release).ok_or_else(|| PreflightError::KernelVersion {
        release: release.into(),
    })?;
    if version < MIN_KERNEL {
        return Err(PreflightError::KernelTooOld {
            release: release.into(),
        });
    }
    Ok(version)
}

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// The effective capability set from `/proc/self/status`.
fn effective_caps() -> u64 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

/// Every capability some hook may need on some kernel (the DaemonSet's list), by number.
const HOOK_CAPS: [(u32, &str); 6] = [
    (CAP_BPF, "CAP_BPF"),
    (CAP_PERFMON, "CAP_PERFMON"),
    (12, "CAP_NET_ADMIN"),
    (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
    (19, "CAP_SYS_PTRACE"),
    (24, "CAP_SYS_RESOURCE"),
];

/// Of the capabilities hooks may need, those this process lacks: what to name when the
/// kernel refuses a hook with EPERM or EACCES and the error does not say which.
pub fn lacking_hook_caps() -> Vec<&'static str> {
    let caps = effective_caps();
    HOOK_CAPS
        .iter()
        .filter(|(c, _)| caps & (1 << c) == 0)
        .map(|(_, n)| *n)
        .collect()
}

/// Names the capabilities missing for loading and attaching tracing programs.
pub fn missing_caps(caps: u64) -> Vec<&'static str> {
    let has = |c: u32| caps & (1 << c) != 0;
    if has(CAP_SYS_ADMIN) {
        return Vec::new();
    }
    [(CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON")]
        .into_iter()
        .filter(|(c, _)| !has(*c))
        .map(|(_, n)| n)
        .collect()
}

/// Fails unless this process may load and attach the programs.
pub fn check_privileges() -> Result<(), PreflightError> {
    let missing = missing_caps(effective_caps());
    if missing.is_empty() {
        Ok(())
    } else {
        Err(PreflightError::Privileges {
            missing: missing.join(", "),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_releases() {
        assert_eq!(parse_release("6.18.44-fc-v657"), Some((6, 18)));
        assert_eq!(parse_release("6.1.0-50-cloud-amd64"), Some((6, 1)));
        assert_eq!(parse_release("5.8"), Some((5, 8)));
        assert_eq!(parse_release("garbage"), None);
    }

    #[test]
    fn old_kernels_are_refused_with_the_minimum() {
        assert!(check_kernel("6.1.0-50-cloud-amd64").is_ok());
        assert!(check_kernel("5.8.0").is_ok());
        let err = check_kernel("5.4.0-150-generic").unwrap_err().to_string();
        assert!(err.contains("5.4.0-150-generic is too old"), "{err}");
        assert!(err.contains("Linux 5.8 or newer"), "{err}");
        assert!(check_kernel("").is_err());
    }

    #[test]
    fn capabilities() {
        assert!(missing_caps(1 << CAP_SYS_ADMIN).is_empty());
        assert!(missing_caps((1 << CAP_BPF) | (1 << CAP_PERFMON)).is_empty());
        assert_eq!(missing_caps(1 << CAP_BPF), vec!["CAP_PERFMON"]);
        assert_eq!(missing_caps(0), vec!["CAP_BPF", "CAP_PERFMON"]);
        let err = PreflightError::Privileges {
            missing: "CAP_BPF".into(),
        }
        .to_string();
        assert!(err.contains("Run it with sudo"), "{err}");
    }
}
