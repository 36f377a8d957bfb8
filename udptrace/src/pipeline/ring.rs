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
        let ring = guard.get_inner_mut();
        for _ in 0..BATCH {
            let Some(record) = ring.next() else {
                // Read empty: wait for the kernel's next wake-up.
                guard.clear_ready();
                return Ok(());
            };
            match Event::decode(&record) {
                Ok(e) => out.push(e),
                Err(err) => {
                    bad.0 += 1;
                    tracing::warn!("dropping ring buffer record: {err}");
                }
            }
        }
        // Records may be left: the fd stays ready, the next call reads on at once.
        Ok(())
    }
}
