//! Tracepoint record access at offsets taken from this kernel's tracefs formats.

use aya_ebpf::programs::TracePointContext;

use crate::read::kernel::ReadError;

/// Reads a tracepoint field at `off`.
#[inline(always)]
pub fn field<T>(ctx: &TracePointContext, off: usize) -> Result<T, ReadError> {
    if off == udptrace_common::OFFSET_MISSING as usize {
        return Err(ReadError);
    }
    // SAFETY: the offset comes from this kernel's format file for this tracepoint.
    unsafe { ctx.read_at::<T>(off) }.map_err(|_| ReadError)
}
