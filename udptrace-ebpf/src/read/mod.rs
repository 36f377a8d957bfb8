//! What the hops read: kernel memory at BTF offsets, tracepoint records, an skb's headers,
//! the current task.

pub mod current;
pub mod kernel;
pub mod peek;
pub mod skb;
pub mod tracepoint;
