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
//! **Heartbeats.** Every [`HEARTBEAT`] the feeder confirms, with a read barrier, that this node
//! has applied everything the cluster committed before the barrier started, sends what that
//! leaves unsent, then an event with `heartbeat` set: "you have every revocation committed
//! before `at_ms`" (`seq` is the last one sent). A node that cannot confirm (partitioned, no
//! leader) sends no heartbeat, so a verifier that treats a token as revoked-or-not only while
//! its last heartbeat is younger than its bound (say three intervals) never relies on a stale
//! stream for longer than that.
//!
//! **Correctness.** The feeder reads the log only from this node's applied state, which holds a
//! prefix of the Raft log, and sends entries in sequence order without gaps, except for entries
//! retention forgot, whose credentials have expired. It waits for the applied index to move
//! between reads, so it misses nothing committed after its last read.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

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
pub const STALL: Duration = Duration::from_secs(30);
/// How often a subscriber gets a heartbeat (when the node can confirm it is current).
pub const HEARTBEAT: Duration = Duration::from_secs(5);

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

/// Where the feeder reads: this node's applied state (or a test's log).
pub trait Log: Send + 'static {
    /// The revocations after `from`, at most `limit`. Any change applied after this call
    /// starts wakes the next [`Log::changed`].
    fn after(&mut self, from: u64, limit: usize) -> Result<Vec<state::Revocation>, String>;
    /// Waits until the applied state may have changed since the last [`Log::after`]; false
    /// once it never will (the node stops).
    fn changed(&mut self) -> impl Future<Output = bool> + Send;
    /// Confirms that everything committed before the call started is applied here: the
    /// time it started, or `None` when it cannot be confirmed (within a deadline).
    fn confirm(&self) -> impl Future<Output = Option<u64>> + Send;
}

/// The node's applied state.
pub struct NodeLog {
    node: Arc<Node>,
    applied: tokio::sync::watch::Receiver<openraft::RaftMetrics<u64, ephemera_raft::NodeInfo>>,
}

impl NodeLog {
    pub fn new(node: Arc<Node>) -> Self {
        NodeLog {
            applied: node.raft.metrics(),
            node,
        }
    }
}

impl Log for NodeLog {
    fn after(&mut self, from: u64, limit: usize) -> Result<Vec<state::Revocation>, String> {
        // Marks the applied index as seen before reading, so a change after this read wakes
        // `changed`.
        self.applied.borrow_and_update();
        state::revocations_after(&self.node.view, from, limit).map_err(|e| e.to_string())
    }

    async fn changed(&mut self) -> bool {
        self.applied.changed().await.is_ok()
    }

    async fn confirm(&self) -> Option<u64> {
        let started = self.node.clock.now_ms();
        // The barrier is bounded by the node's request timeout.
        self.node.read_barrier().await.ok().map(|()| started)
    }
}

/// How a feeder paces its subscriber.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    pub stall: Duration,
    pub heartbeat: Duration,
}

pub const PACE: Pace = Pace {
    stall: STALL,
    heartbeat: HEARTBEAT,
};

/// Feeds `tx` with the revocations after `from`, and heartbeats, until the subscriber goes
/// away, falls behind or the node stops. `_slot` is the subscriber's place among
/// [`MAX_WATCHERS`].
pub async fn feed<L: Log, S: Send>(
    mut log: L,
    from: u64,
    tx: mpsc::Sender<Event>,
    pace: Pace,
    _slot: S,
) {
    let mut next = from;
    let mut beat = tokio::time::interval(pace.heartbeat);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    beat.reset();
    // Set by a confirmation: a heartbeat for that time goes once the log is sent up to now.
    let mut confirmed: Option<u64> = None;
    loop {
        let page = match log.after(next, PAGE) {
            Ok(p) => p,
            Err(e) => {
                let _ = tx.try_send(Err(Status::internal(format!("reading the log: {e}"))));
                return;
            }
        };
        let full = page.len() == PAGE;
        for r in page {
            let seq = r.seq;
            if !send(&tx, Ok(event(r)), next, pace.stall).await {
                return;
            }
            next = seq;
        }
        if full {
            continue;
        }
        if let Some(at_ms) = confirmed.take() {
            let heartbeat = pb::RevocationEvent {
                seq: next,
                at_ms,
                heartbeat: true,
                ..Default::default()
            };
            if !send(&tx, Ok(heartbeat), next, pace.stall).await {
                return;
            }
        }
        tokio::select! {
            changed = log.changed() => {
                if !changed {
                    return;
                }
            }
            _ = beat.tick() => confirmed = log.confirm().await,
            _ = tx.closed() => return,
        }
    }
}

/// The channel a feeder sends into: [`BUFFER`] events, and the slot [`send`] keeps for the
/// error that ends a stalled stream.
pub fn channel() -> (mpsc::Sender<Event>, mpsc::Receiver<Event>) {
    mpsc::channel(BUFFER + 1)
}

/// Sends one event; false when the stream is over (the subscriber went away, or left its
/// buffer full for `stall` and was told where to resume). The channel's last slot is kept for
/// that error, so it is delivered right after what the subscriber left unread, and the feeder
/// ends at once.
async fn send(tx: &mpsc::Sender<Event>, e: Event, resume_from: u64, stall: Duration) -> bool {
    match tokio::time::timeout(stall, tx.reserve_many(2)).await {
        Ok(Ok(mut permits)) => {
            // The second permit goes back with the iterator.
            permits.next().expect("two permits").send(e);
            true
        }
        Ok(Err(_)) => false,
        Err(_) => {
            let behind = Status::resource_exhausted(format!(
                "the subscriber left {} revocations unread for {}s; resume with \
                 from_seq={resume_from}",
                tx.max_capacity() - 1,
                stall.as_secs()
            ));
            let _ = tx.try_send(Err(behind));
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};

    /// A log of `n` revocations whose confirmations succeed while `current` says so; the
    /// `k`th successful one is at time `k`.
    struct TestLog {
        n: u64,
        current: Arc<AtomicBool>,
        confirmations: Arc<AtomicU64>,
    }

    impl Log for TestLog {
        fn after(&mut self, from: u64, limit: usize) -> Result<Vec<state::Revocation>, String> {
            Ok((from + 1..=self.n)
                .take(limit)
                .map(|seq| state::Revocation {
                    seq,
                    at_ms: seq,
                    what: Revoked::Lease {
                        id: format!("l_{seq}"),
                        expires_at_ms: 0,
                    },
                })
                .collect())
        }

        async fn changed(&mut self) -> bool {
            std::future::pending().await
        }

        async fn confirm(&self) -> Option<u64> {
            self.current
                .load(SeqCst)
                .then(|| self.confirmations.fetch_add(1, SeqCst) + 1)
        }
    }

    fn log(n: u64) -> (TestLog, Arc<AtomicBool>, Arc<AtomicU64>) {
        let current = Arc::new(AtomicBool::new(true));
        let confirmations = Arc::new(AtomicU64::new(0));
        let log = TestLog {
            n,
            current: current.clone(),
            confirmations: confirmations.clone(),
        };
        (log, current, confirmations)
    }

    #[tokio::test]
    async fn a_subscriber_that_stops_reading_is_told_where_to_resume() {
        let (log, ..) = log(1_000);
        // Room for 8 events and the error; a full buffer counts as stalled at once, and the
        // subscriber reads nothing until the feeder has ended.
        let (tx, mut rx) = mpsc::channel(9);
        let pace = Pace {
            stall: Duration::ZERO,
            heartbeat: Duration::from_secs(3600),
        };
        let feeder = tokio::spawn(feed(log, 0, tx, pace, ()));
        feeder.await.unwrap();
        let mut seqs = Vec::new();
        let err = loop {
            match rx.recv().await.expect("the feeder ends with an error") {
                Ok(e) => seqs.push(e.seq),
                Err(s) => break s,
            }
        };
        // What was buffered, in order, and then where to resume: after the last one it got.
        assert_eq!(seqs, (1..=8).collect::<Vec<_>>());
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert!(err.message().contains("from_seq=8"), "{}", err.message());
        assert!(rx.recv().await.is_none(), "the stream ends");
    }

    #[tokio::test]
    async fn heartbeats_follow_the_log_and_stop_while_the_node_cannot_confirm() {
        let (log, current, confirmations) = log(3);
        let (tx, mut rx) = channel();
        let pace = Pace {
            stall: STALL,
            heartbeat: Duration::from_millis(10),
        };
        let _feeder = tokio::spawn(feed(log, 0, tx, pace, ()));
        for seq in 1..=3 {
            let e = rx.recv().await.unwrap().unwrap();
            assert_eq!((e.seq, e.heartbeat), (seq, false));
        }
        // A heartbeat after the revocations it vouches for, with the confirmation's time.
        let e = rx.recv().await.unwrap().unwrap();
        assert_eq!((e.seq, e.at_ms, e.heartbeat), (3, 1, true));
        // While confirmations fail, silence: a heartbeat already confirmed may still arrive,
        // none confirmed later can.
        current.store(false, SeqCst);
        let last_confirmed = confirmations.load(SeqCst);
        while let Ok(e) = tokio::time::timeout(pace.heartbeat * 5, rx.recv()).await {
            let e = e.unwrap().unwrap();
            assert!(e.heartbeat && e.at_ms <= last_confirmed, "{e:?}");
        }
        current.store(true, SeqCst);
        let e = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .expect("heartbeats resume")
            .unwrap()
            .unwrap();
        assert!(e.heartbeat && e.at_ms > last_confirmed, "{e:?}");
    }
}
