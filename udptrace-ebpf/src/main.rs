//! udptrace kernel programs. One module per hook family; shared types live in
//! `udptrace-common`. Every program only observes: none changes a packet's fate.
#![no_std]
#![no_main]

mod current;
mod deliver;
mod drop;
mod ingress;
mod kernel;
mod maps;
mod netfilter;
mod sample;
mod send;
mod skb;
mod tp;
mod xmit;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// bpf_probe_read_kernel and friends are GPL-only helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
