//! Reads of kernel memory at offsets found in BTF at load time.

use aya_ebpf::helpers::{bpf_probe_read_kernel, bpf_probe_read_user};
use udptrace_common::{
    Addr, AF_INET, AF_INET6, OFFSET_MISSING, STAT_READ_ERROR, STAT_USER_READ_ERROR,
};

use crate::maps::{count, fault, offset};

/// A failed read; counted in `STATS` where it is dropped.
pub struct ReadError;

/// Reads a `T` at `base + off` from kernel memory.
#[inline(always)]
pub fn read_kernel<T>(base: u64, off: usize) -> Result<T, ReadError> {
    if off == OFFSET_MISSING as usize {
        return Err(ReadError);
    }
    // SAFETY: bpf_probe_read_kernel checks the address; a fault is an error, not a crash.
    unsafe { bpf_probe_read_kernel((base as usize + off) as *const T) }.map_err(|_| {
        count(STAT_READ_ERROR);
        ReadError
    })
}

/// Like [`read_kernel`] for a pointer that may not be one (a field the kernel reuses as
/// scratch space): a fault is an expected answer, not counted as an error.
#[inline(always)]
pub fn try_read_kernel<T>(base: u64, off: usize) -> Option<T> {
    if off == OFFSET_MISSING as usize {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel checks the address; a fault is an error, not a crash.
    unsafe { bpf_probe_read_kernel((base as usize + off) as *const T) }.ok()
}

/// How a kernel object's fields are read: by helper at any address ([`Probed`]), or by plain
/// loads through a pointer the verifier has typed from BTF ([`Typed`]: a typed tracepoint's
/// or a netfilter program's arguments), which cost no call.
pub trait Fields: Copy {
    /// The object's address.
    fn addr(self) -> u64;
    /// The `T` at `off`, `None` when the field is missing or (by helper) unreadable.
    fn field<T: Copy>(self, off: usize) -> Option<T>;
    /// The object the pointer at `off` points to, read the same way (a typed pointer's
    /// pointer field is typed too).
    fn pointer(self, off: usize) -> Option<Self>;

    /// The object the pointer at `off` points to, whose value `value` was read from there
    /// before (0: none): by helper nothing is read again; a typed pointer is loaded again
    /// (a plain load), for the verifier to know what it points to.
    fn again(self, off: usize, value: u64) -> Option<Self>;

    /// [`Self::field`], a failure counted as a read error.
    #[inline(always)]
    fn read<T: Copy>(self, off: usize) -> Result<T, ReadError> {
        self.field(off).ok_or_else(|| {
            count(STAT_READ_ERROR);
            ReadError
        })
    }
}

/// An object read by helper.
#[derive(Clone, Copy)]
pub struct Probed(pub u64);

impl Fields for Probed {
    #[inline(always)]
    fn addr(self) -> u64 {
        self.0
    }

    #[inline(always)]
    fn field<T: Copy>(self, off: usize) -> Option<T> {
        try_read_kernel(self.0, off)
    }

    #[inline(always)]
    fn pointer(self, off: usize) -> Option<Self> {
        self.field::<u64>(off).map(Probed)
    }

    #[inline(always)]
    fn again(self, _off: usize, value: u64) -> Option<Self> {
        (value != 0).then_some(Probed(value))
    }
}

/// An object behind a BTF-typed pointer: the verifier checks each load against the kernel's
/// type (the offset, from the frozen read-only data, is a constant to it) and a fault reads
/// as 0. A program whose loads it refuses does not load, and its hook's fallback is used.
#[derive(Clone, Copy)]
pub struct Typed(pub *const u8);

impl Fields for Typed {
    #[inline(always)]
    fn addr(self) -> u64 {
        self.0 as u64
    }

    #[inline(always)]
    fn field<T: Copy>(self, off: usize) -> Option<T> {
        if off == OFFSET_MISSING as usize || self.0.is_null() {
            return None;
        }
        // SAFETY: see the type: a checked load through a typed pointer.
        Some(unsafe { core::ptr::read_volatile(self.0.add(off) as *const T) })
    }

    #[inline(always)]
    fn pointer(self, off: usize) -> Option<Self> {
        self.field::<u64>(off).map(|p| Typed(p as *const u8))
    }

    #[inline(always)]
    fn again(self, off: usize, value: u64) -> Option<Self> {
        if value == 0 {
            return None;
        }
        self.pointer(off).filter(|p| !p.0.is_null())
    }
}

/// Reads a `T` at `base + off` from the current task's user memory.
#[inline(always)]
pub fn read_user<T>(base: u64, off: usize) -> Result<T, ReadError> {
    // SAFETY: bpf_probe_read_user checks the address; a fault is an error.
    unsafe { bpf_probe_read_user((base as usize + off) as *const T) }.map_err(|_| {
        fault(STAT_USER_READ_ERROR);
        ReadError
    })
}

/// Reads a socket's bound and peer addresses into `src`/`dst` and returns the inode of
/// its network namespace; through a typed pointer ([`Typed`]) every field is a plain load.
#[inline(always)]
pub fn read_sock<S: Fields>(sk: S, src: &mut Addr, dst: &mut Addr) -> Result<u32, ReadError> {
    let family: u16 = sk.read(offset!(sk_family))?;
    let sport: u16 = sk.read(offset!(sk_num))?;
    let dport: u16 = sk.read(offset!(sk_dport))?;
    *src = Addr {
        family,
        port: sport,
        _pad: 0,
        ip: [0; 16],
    };
    *dst = Addr {
        family,
        port: u16::from_be(dport),
        _pad: 0,
        ip: [0; 16],
    };
    if family == AF_INET {
        let s: [u8; 4] = sk.read(offset!(sk_rcv_saddr))?;
        let d: [u8; 4] = sk.read(offset!(sk_daddr))?;
        src.ip[..4].copy_from_slice(&s);
        dst.ip[..4].copy_from_slice(&d);
    } else if family == AF_INET6 {
        src.ip = sk.read(offset!(sk_v6_rcv_saddr))?;
        dst.ip = sk.read(offset!(sk_v6_daddr))?;
    }
    sk.pointer(offset!(sk_net))
        .ok_or(ReadError)?
        .read(offset!(net_inum))
}

/// Where a `struct sockaddr` lives.
#[derive(Clone, Copy)]
pub enum Mem {
    Kernel,
    User,
}

#[inline(always)]
fn read_at<T>(mem: Mem, base: u64, off: usize) -> Result<T, ReadError> {
    match mem {
        Mem::Kernel => read_kernel(base, off),
        Mem::User => read_user(base, off),
    }
}

/// Parses a `struct sockaddr_in`/`sockaddr_in6` (UAPI layouts) of `len` bytes at `ptr`.
/// Returns an `Addr` with family 0 for a null pointer or another family.
#[inline(always)]
pub fn read_sockaddr(mem: Mem, ptr: u64, len: u32) -> Result<Addr, ReadError> {
    let mut addr = Addr::default();
    if ptr == 0 || len < 8 {
        return Ok(addr);
    }
    let family: u16 = read_at(mem, ptr, 0)?;
    let port: u16 = read_at(mem, ptr, 2)?;
    if family == AF_INET {
        let ip: [u8; 4] = read_at(mem, ptr, 4)?;
        addr.ip[..4].copy_from_slice(&ip);
    } else if family == AF_INET6 && len >= 24 {
        addr.ip = read_at(mem, ptr, 8)?;
    } else {
        return Ok(addr);
    }
    addr.family = family;
    addr.port = u16::from_be(port);
    Ok(addr)
}
