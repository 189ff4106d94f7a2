//! Group commit of the leader's writes. openraft 0.9 appends each client write on its own: its
//! core task writes and fsyncs one entry, then replicates it, then takes the next, so every
//! write pays an fsync, a replication round and the task hand-offs around them, and writes
//! queue behind each other's fsyncs. Commands that reach the leader while earlier writes are in
//! flight are written as one entry instead (`Op::Batch`, applied command by command).
//!
//! Correctness: a batch is an ordinary log entry, and `apply` applies its commands in order,
//! each as it would be applied alone, so the state is what consecutive entries would give. A
//! submitter gets the result of its own command only, and only once `write` returns it: for
//! the node, once the entry is committed on a quorum (fsynced) and applied on the leader, the
//! acknowledgement a lone write had. A batch that fails fails each of its commands. Nothing
//! waits to fill a batch: a command that finds a write slot free goes at once, so under light
//! load every write is alone and no slower than before.
//!
//! Bounds: at most `max_batch` commands and `max_bytes` encoded bytes per write (a command
//! larger than that goes alone), at most `in_flight` writes outstanding, and a queue of
//! `4 × max_batch` (a full queue makes submitters wait).

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Semaphore};

/// How large batches get and how many are outstanding.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_batch: usize,
    pub max_bytes: usize,
    pub in_flight: usize,
}

type Queued<C, R> = (C, usize, oneshot::Sender<R>);

pub struct GroupCommit<C, R> {
    queue: mpsc::Sender<Queued<C, R>>,
}

impl<C: Send + 'static, R: Send + 'static> GroupCommit<C, R> {
    /// Spawns the task that forms batches; it ends when the `GroupCommit` is dropped. `write`
    /// must return one result per command, in order.
    pub fn spawn<F, Fut>(limits: Limits, write: F) -> Self
    where
        F: Fn(Vec<C>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<R>> + Send + 'static,
    {
        let max_batch = limits.max_batch.max(1);
        let (tx, mut rx) = mpsc::channel::<Queued<C, R>>(4 * max_batch);
        let slots = Arc::new(Semaphore::new(limits.in_flight.max(1)));
        tokio::spawn(async move {
            // A command that did not fit the last batch opens the next.
            let mut held: Option<Queued<C, R>> = None;
            loop {
                // A slot first: while every write is outstanding, submissions gather here.
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                let Some(first) = (match held.take() {
                    Some(h) => Some(h),
                    None => rx.recv().await,
                }) else {
                    return;
                };
                let mut bytes = first.1;
                let mut batch = vec![first];
                while batch.len() < max_batch {
                    let Ok(next) = rx.try_recv() else { break };
                    if bytes + next.1 > limits.max_bytes {
                        held = Some(next);
                        break;
                    }
                    bytes += next.1;
                    batch.push(next);
                }
                let (commands, replies): (Vec<C>, Vec<_>) =
                    batch.into_iter().map(|(c, _, r)| (c, r)).unzip();
                let written = write(commands);
                tokio::spawn(async move {
                    for (reply, result) in replies.into_iter().zip(written.await) {
                        // A submitter that gave up (its request was cancelled) is skipped.
                        let _ = reply.send(result);
                    }
                    drop(slot);
                });
            }
        });
        GroupCommit { queue: tx }
    }

    /// Writes `command` (`bytes` long, encoded) with whatever else is waiting; `None` if the
    /// writer stopped first.
    pub async fn submit(&self, command: C, bytes: usize) -> Option<R> {
        let (tx, rx) = oneshot::channel();
        self.queue.send((command, bytes, tx)).await.ok()?;
        rx.await.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tokio::sync::watch;

    type Writes = Arc<Mutex<Vec<Vec<u32>>>>;

    /// A group whose writes record their batch and then wait until the gate opens; each
    /// command's result is the command times ten.
    fn gated(limits: Limits) -> (Arc<GroupCommit<u32, u32>>, Writes, watch::Sender<bool>) {
        let writes = Writes::default();
        let (gate, opened) = watch::channel(false);
        let seen = writes.clone();
        let group = GroupCommit::spawn(limits, move |batch: Vec<u32>| {
            seen.lock().unwrap().push(batch.clone());
            let mut opened = opened.clone();
            async move {
                let _ = opened.wait_for(|open| *open).await;
                batch.into_iter().map(|c| c * 10).collect::<Vec<_>>()
            }
        });
        (Arc::new(group), writes, gate)
    }

    type Submitted = tokio::task::JoinHandle<(u32, Option<u32>)>;

    fn submit(group: &Arc<GroupCommit<u32, u32>>, c: u32, bytes: usize) -> Submitted {
        let g = group.clone();
        tokio::spawn(async move { (c, g.submit(c, bytes).await) })
    }

    /// Submits `(command, bytes)` pairs from their own tasks while every write slot is taken,
    /// each queued before the next is submitted (the queue's free capacity only shrinks while
    /// the batching task waits for a slot), so the queue holds them in this order.
    async fn queue_in_order(
        group: &Arc<GroupCommit<u32, u32>>,
        commands: &[(u32, usize)],
    ) -> Vec<Submitted> {
        let mut tasks = Vec::new();
        for &(c, bytes) in commands {
            let before = group.queue.capacity();
            tasks.push(submit(group, c, bytes));
            while group.queue.capacity() == before {
                tokio::task::yield_now().await;
            }
        }
        tasks
    }

    /// Lets the batching task run until `n` writes have started.
    async fn until_writes(writes: &Writes, n: usize) {
        while writes.lock().unwrap().len() < n {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn waiting_commands_share_a_write_and_each_gets_its_own_result() {
        let limits = Limits {
            max_batch: 8,
            max_bytes: 1 << 20,
            in_flight: 1,
        };
        let (group, writes, gate) = gated(limits);
        // The first command finds the slot free and goes alone, at once.
        let mut tasks = vec![submit(&group, 0, 1)];
        until_writes(&writes, 1).await;
        // The rest arrive while it is in flight, and wait for the slot together.
        let rest: Vec<(u32, usize)> = (1..20).map(|c| (c, 1)).collect();
        tasks.extend(queue_in_order(&group, &rest).await);
        gate.send(true).unwrap();
        for t in tasks {
            let (c, result) = t.await.unwrap();
            assert_eq!(result, Some(c * 10), "command {c} got another's result");
        }
        let writes = writes.lock().unwrap().clone();
        let expected: Vec<Vec<u32>> = vec![
            vec![0],
            (1..9).collect(),
            (9..17).collect(),
            (17..20).collect(),
        ];
        assert_eq!(writes, expected, "in order, at most max_batch at a time");
    }

    #[tokio::test]
    async fn a_batch_stays_within_its_byte_budget_and_a_large_command_goes_alone() {
        let limits = Limits {
            max_batch: 8,
            max_bytes: 10,
            in_flight: 1,
        };
        let (group, writes, gate) = gated(limits);
        let mut tasks = vec![submit(&group, 0, 1)];
        until_writes(&writes, 1).await;
        tasks.extend(queue_in_order(&group, &[(1, 4), (2, 4), (3, 4), (4, 20), (5, 1)]).await);
        gate.send(true).unwrap();
        for t in tasks {
            let (c, result) = t.await.unwrap();
            assert_eq!(result, Some(c * 10));
        }
        let writes = writes.lock().unwrap().clone();
        assert_eq!(writes, vec![vec![0], vec![1, 2], vec![3], vec![4], vec![5]]);
    }

    #[tokio::test]
    async fn a_submitter_that_gives_up_does_not_stop_the_others() {
        let limits = Limits {
            max_batch: 4,
            max_bytes: 1 << 20,
            in_flight: 2,
        };
        let (group, writes, gate) = gated(limits);
        let abandoned = submit(&group, 1, 1);
        until_writes(&writes, 1).await;
        abandoned.abort();
        gate.send(true).unwrap();
        assert_eq!(group.submit(2, 1).await, Some(20));
    }
}
