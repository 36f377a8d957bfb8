//! udptrace kernel programs: `hops/` has one module per hop (its programs, each hook the
//! loader may choose for it), `read/` what they read (kernel memory, tracepoint records,
//! an skb's headers, the current task), `maps` and `sampling` what they share. Shared types
//! live in `udptrace-common`. Every program only observes: none changes a packet's fate.
#![no_std]
#![no_main]

mod hops;
mod maps;
mod read;
mod sampling;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// bpf_probe_read_kernel and friends are GPL-only helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
