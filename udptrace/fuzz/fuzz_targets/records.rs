#![no_main]
//! Ring buffer records as a kernel program bug, a mismatched build or memory corruption could
//! hand them over: decoding never panics, and every record that decodes goes through path
//! assembly, explanation and both output formats without panicking either, and every path's
//! JSON reads back as the same path (the contract `udptrace path` and stitching rely on).

use libfuzzer_sys::fuzz_target;
use udptrace::{
    clock::Clock,
    kernel::drop_reasons::DropReasons,
    model::Path,
    output::lines::{render, Format},
    pipeline::{assemble::Assembler, events::Event},
};
use udptrace_common::{
    NatEvent, RecvEvent, SendEvent, SkbEvent, KIND_DELIVER, KIND_DROP, KIND_INGRESS, KIND_NAT,
    KIND_RECV, KIND_SEND, KIND_XMIT,
};

/// Record kinds a selector byte below their count picks, with their sizes.
const KINDS: [(u16, usize); 7] = [
    (KIND_SEND, size_of::<SendEvent>()),
    (KIND_XMIT, size_of::<SkbEvent>()),
    (KIND_INGRESS, size_of::<SkbEvent>()),
    (KIND_NAT, size_of::<NatEvent>()),
    (KIND_DROP, size_of::<SkbEvent>()),
    (KIND_DELIVER, size_of::<SkbEvent>()),
    (KIND_RECV, size_of::<RecvEvent>()),
];

fuzz_target!(|data: &[u8]| {
    let mut assembler = Assembler::new(Clock::new(), DropReasons::default());
    let mut paths = Vec::new();
    let mut rest = data;
    // Each record: a selector byte, then a well-sized record of that kind (its kind field
    // set), or, past the kinds, that many raw bytes.
    while let Some((&selector, tail)) = rest.split_first() {
        let record = match KINDS.get(usize::from(selector)) {
            Some(&(kind, len)) => {
                let Some(bytes) = tail.get(..len) else { break };
                let mut record = bytes.to_vec();
                record[..2].copy_from_slice(&kind.to_ne_bytes());
                rest = &tail[len..];
                record
            }
            None => {
                let len = (usize::from(selector) - KINDS.len()).min(tail.len());
                rest = &tail[len..];
                tail[..len].to_vec()
            }
        };
        if let Ok(event) = Event::decode(&record) {
            assembler.push(&event, &mut paths);
        }
    }
    assembler.tick(u64::MAX, &mut paths);
    assembler.flush(&mut paths);
    for path in &paths {
        let json = render(path, Format::Json);
        let _ = render(path, Format::Human { color: false });
        let back: Path = serde_json::from_str(&json).expect("a path's JSON reads back");
        assert_eq!(back, path.without_internals(), "{json}");
    }
});
