//! Kernel timestamps (CLOCK_MONOTONIC, from `bpf_ktime_get_ns`) to wall-clock time.

use std::time::{Duration, SystemTime};

/// Converts monotonic nanoseconds to wall-clock time using the offset between the two
/// clocks measured once at start.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    /// Wall-clock time at monotonic zero, in ns since the Unix epoch.
    boot_wall_ns: i128,
}

/// CLOCK_MONOTONIC now, in the unit of kernel event timestamps.
pub fn monotonic_ns() -> u64 {
    now_ns(libc::CLOCK_MONOTONIC) as u64
}

fn now_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

impl Clock {
    pub fn new() -> Self {
        Self {
            boot_wall_ns: now_ns(libc::CLOCK_REALTIME) - now_ns(libc::CLOCK_MONOTONIC),
        }
    }

    /// A clock whose monotonic zero is `wall` (tests).
    #[cfg(test)]
    pub fn with_boot(wall: SystemTime) -> Self {
        let ns = wall
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        Self {
            boot_wall_ns: ns as i128,
        }
    }

    pub fn wall(&self, monotonic_ns: u64) -> SystemTime {
        let ns = (self.boot_wall_ns + i128::from(monotonic_ns)).max(0) as u128;
        SystemTime::UNIX_EPOCH
            + Duration::new((ns / 1_000_000_000) as u64, (ns % 1_000_000_000) as u32)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// RFC 3339 with nanoseconds, UTC: `2026-11-26T12:33:01.123456789Z`.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_nanos(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_with_nanoseconds() {
        let boot = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let clock = Clock::with_boot(boot);
        assert_eq!(
            rfc3339(clock.wall(1_500_000_007)),
            "2027-01-15T08:00:01.500000007Z"
        );
    }

    #[test]
    fn live_clock_is_close_to_now() {
        let clock = Clock::new();
        let t = clock.wall(now_ns(libc::CLOCK_MONOTONIC) as u64);
        let diff = t
            .duration_since(SystemTime::now())
            .unwrap_or_else(|e| e.duration());
        assert!(diff < Duration::from_secs(1), "{diff:?}");
    }
}
