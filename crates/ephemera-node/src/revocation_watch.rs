//! `WatchRevocations`: the revocation log (`ephemera_core::state::revocations_after`) streamed
//! to a subscriber from the sequence number it last saw, then each new revocation as this node
//! applies it.
//!
//! **Bounds.** Each subscriber has its own buffer of [`BUFFER`] events, filled by one task
//! that reads the log in pages of [`PAGE`] (a catch-up from far back goes as fast as the
//! subscriber reads). A subscriber that leaves the buffer full for [`STALL`] (it stopped
//! reading, or reads slower than revocations commit) is sent a precise `RESOURCE_EXHAUSTED`
//! with the sequence number to resume from, and its stream ends: a slow reader never makes the
//! node hold more than one buffer and one page for it. At most [`MAX_WATCHERS`] streams are
//! open per node.
//!
//! **Staleness.** An event reaches a subscriber once the node it is connected to has applied
//! the entry: a follower lags the leader by its replication delay (milliseconds on a healthy
//! cluster), and a partitioned node by as long as the partition lasts, so a verifier that
//! relies on the stream alone accepts a revoked token for at most that long. A verifier that
//! needs a bound should also watch that the stream stays connected (and fall back to
//! introspection, which is linearizable, when it is not).
//!
//! **Correctness.** The feeder reads the log only from this node's applied state, which holds a
//! prefix of the Raft log, and sends entries in sequence order without gaps, except for entries
//! retention forgot, whose credentials have expired. It waits for the applied index to move
//! between reads, so it misses nothing committed after its last read.

use std::sync::Arc;

use ephemera_core::state::{self, Revoked};
use ephemera_proto::v1 as pb;
use tokio::sync::mpsc;
use tonic::Status;

use crate::node::Node;

/// Events buffered per subscriber before it counts as too far behind.
pub const BUFFER: usize = 1024;
/// Log entries read at a time.
const PAGE: usize = 256;
/// Open streams per node.
pub const MAX_WATCHERS: usize = 1024;
/// How long a full buffer may stay full before its subscriber counts as too far behind.
pub const STALL: std::time::Duration = std::time::Duration::from_secs(30);

pub type Event = Result<pb::RevocationEvent, Status>;

fn event(r: state::Revocation) -> pb::RevocationEvent {
    let mut e = pb::RevocationEvent {
        seq: r.seq,
        at_ms: r.at_ms,
        ..Default::default()
    };
    match r.what {
        Revoked::Lease { id, expires_at_ms } => {
            e.lease_id = id;
            e.expires_at_ms = expires_at_ms;
        }
        Revoked::Key { kid } => e.kid = kid,
    }
    e
}

/// Feeds `tx` with the revocations after `from`, until the subscriber goes away, falls behind
/// or the node stops. `_slot` is the subscriber's place among [`MAX_WATCHERS`].
pub async fn feed(
    node: Arc<Node>,
    from: u64,
    tx: mpsc::Sender<Event>,
    _slot: tokio::sync::OwnedSemaphorePermit,
) {
    let mut applied = node.raft.metrics();
    let mut next = from;
    loop {
        // Marks the applied index as seen before reading, so a change after this read wakes
        // the wait below.
        applied.borrow_and_update();
        let page = match state::revocations_after(&node.view, next, PAGE) {
            Ok(p) => p,
            Err(e) => {
                let _ = tx.try_send(Err(Status::internal(format!("reading the log: {e}"))));
                return;
            }
        };
        let full = page.len() == PAGE;
        for r in page {
            let seq = r.seq;
            match tokio::time::timeout(STALL, tx.send(Ok(event(r)))).await {
                Ok(Ok(())) => next = seq,
                Ok(Err(_)) => return, // the subscriber went away
                Err(_) => {
                    // The buffer stayed full: the error goes once a slot frees (or not at all
                    // if the subscriber never reads again).
                    let behind = Status::resource_exhausted(format!(
                        "the subscriber left {BUFFER} revocations unread for {}s; resume with \
                         from_seq={next}",
                        STALL.as_secs()
                    ));
                    let _ = tokio::time::timeout(STALL, tx.send(Err(behind))).await;
                    return;
                }
            }
        }
        if full {
            continue;
        }
        tokio::select! {
            changed = applied.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = tx.closed() => return,
        }
    }
}
