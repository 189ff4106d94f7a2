//! Coalescing of linearizable-read barriers. A barrier costs a quorum round trip (the leader
//! confirms it still leads) and, on a follower, an RPC to the leader; under load, one round can
//! serve every request that was waiting when it started.
//!
//! Correctness: a request is served by a round that *starts after the request arrived*. Rounds
//! run one at a time; requests arriving during a round wait for the next one, because the
//! round in flight may have fixed its read index before they arrived (reusing it could miss a
//! write acknowledged in between).

use std::future::Future;

use tokio::sync::{mpsc, oneshot};

pub struct Coalescer<T> {
    waiters: mpsc::UnboundedSender<oneshot::Sender<T>>,
}

impl<T: Clone + Send + 'static> Coalescer<T> {
    /// Spawns the task that runs the rounds; it ends when the coalescer is dropped.
    pub fn spawn<F, Fut>(round: F) -> Self
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: Future<Output = T> + Send,
    {
        let (tx, mut rx) = mpsc::unbounded_channel::<oneshot::Sender<T>>();
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                // Everyone who arrived before this round starts.
                let mut batch = vec![first];
                while let Ok(w) = rx.try_recv() {
                    batch.push(w);
                }
                let result = round().await;
                for w in batch {
                    // A waiter that gave up (its request was cancelled) is skipped.
                    let _ = w.send(result.clone());
                }
            }
        });
        Coalescer { waiters: tx }
    }

    /// The result of the next round to start; `None` once the coalescer has stopped.
    pub async fn next_round(&self) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.waiters.send(tx).ok()?;
        rx.await.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn concurrent_requests_share_rounds_and_late_ones_wait_for_the_next() {
        let rounds = Arc::new(AtomicU64::new(0));
        let counter = rounds.clone();
        let c = Arc::new(Coalescer::spawn(move || {
            let counter = counter.clone();
            async move {
                let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
                n
            }
        }));
        // 100 requests at once: the first starts round 1, the rest queue behind it and share
        // round 2.
        let tasks: Vec<_> = (0..100)
            .map(|_| {
                let c = c.clone();
                tokio::spawn(async move { c.next_round().await.unwrap() })
            })
            .collect();
        let mut seen = Vec::new();
        for t in tasks {
            seen.push(t.await.unwrap());
        }
        assert!(rounds.load(Ordering::SeqCst) <= 3, "{seen:?}");
        // A request that arrives while round r runs is answered by a later round.
        let during = {
            let c = c.clone();
            tokio::spawn(async move { c.next_round().await.unwrap() })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        let started_before = rounds.load(Ordering::SeqCst);
        let late = c.next_round().await.unwrap();
        assert!(
            late > started_before,
            "late {late}, started before {started_before}"
        );
        assert!(during.await.unwrap() >= started_before);
    }
}
