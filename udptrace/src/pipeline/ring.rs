//! The ring buffer, read from tokio in bounded batches of decoded events.

use std::io;

use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;

use super::events::Event;

/// Records that did not decode, kept for the exit report.
#[derive(Debug, Default)]
pub struct Undecodable(pub u64);

/// Records read from the ring at most per [`EventStream::next_batch`].
pub const BATCH: usize = 1024;

/// The ring buffer, readable from tokio.
pub struct EventStream {
    ring: AsyncFd<RingBuf<MapData>>,
}

impl EventStream {
    pub fn new(ring: RingBuf<MapData>) -> io::Result<Self> {
        // SAFETY: the RingBuf owns its map fd, which stays open and unchanged for as long
        // as the AsyncFd owns the RingBuf.
        let ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(Self { ring })
    }

    /// Waits for records and appends the available ones to `out`, at most [`BATCH`] at a
    /// time: a ring the kernel refills as fast as it is read must not grow the batch (and
    /// the agent's memory) without end; the rest stays readable for the next call.
    /// Undecodable records are counted in `bad` (they mean the object and this binary
    /// disagree).
    pub async fn next_batch(
        &mut self,
        out: &mut Vec<Event>,
        bad: &mut Undecodable,
    ) -> io::Result<()> {
        let mut guard = self.ring.readable_mut().await?;
        if !read(guard.get_inner_mut(), out, bad) {
            // Read empty: wait for the kernel's next wake-up.
            guard.clear_ready();
        }
        // Else records may be left: the fd stays ready, the next call reads on at once.
        Ok(())
    }

    /// Appends what the ring holds now, at most [`BATCH`] records, without waiting for a
    /// wake-up: with path hooks attached a hop event wakes the reader only once
    /// [`udptrace_common::EVENTS_WAKE_BYTES`] wait, so the pipeline also reads on its tick and before it
    /// stops. `true` when the batch filled (records may be left).
    pub fn read_now(&mut self, out: &mut Vec<Event>, bad: &mut Undecodable) -> bool {
        read(self.ring.get_mut(), out, bad)
    }
}

/// Appends up to [`BATCH`] records of `ring` to `out`; `true` when that many were read.
fn read(ring: &mut RingBuf<MapData>, out: &mut Vec<Event>, bad: &mut Undecodable) -> bool {
    for _ in 0..BATCH {
        let Some(record) = ring.next() else {
            return false;
        };
        match Event::decode(&record) {
            Ok(e) => out.push(e),
            Err(err) => {
                bad.0 += 1;
                tracing::warn!("dropping ring buffer record: {err}");
            }
        }
    }
    true
}
