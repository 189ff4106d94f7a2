//! In-memory log and state-machine stores over the core's [`MemKv`], for the deterministic
//! simulation (`crates/ephemera-sim`): sled runs threads of its own and writes real files, so
//! its timing is the machine's, not the simulation's. Everything else about a node is the same:
//! the state machine applies the log with the same function as the sled one
//! ([`crate::store::apply_entries`]) and serves reads through the same [`StateView`].
//!
//! **Durability.** A [`MemDisk`] is one node's disk. It outlives the stores opened on it: a
//! simulated crash drops the node's tasks and stores, and the restarted node opens new stores
//! on the same disk. What the sled stores flush before answering is durable at once here too:
//! appended entries (the flush callback fires after the write), the vote, truncation, purge and
//! snapshots. What sled writes without a flush, the committed index and the applied state, is
//! durable only from the next [`MemDisk::sync`] (the simulation calls it on sled's own
//! schedule, every 500 ms), and [`MemDisk::crash`] throws away what was written since: the
//! restarted node re-applies the log from an older applied index, as a sled node does.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io::{Read, Seek, Write};
use std::ops::RangeBounds;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use ephemera_core::kv::{KvPairs, MemKv};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{LogId, OptionalSend, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta, Vote};

use crate::store::{
    applied_state, apply_entries, snapshot_err, AppliedState, Meta, StateView, StorageResult,
    StoreError, KEY_LAST_APPLIED, KEY_MEMBERSHIP,
};
use crate::{decode, encode, Entry, NodeId, Response, TypeConfig};

#[derive(Default)]
struct Log {
    entries: BTreeMap<u64, Entry>,
    vote: Option<Vote<NodeId>>,
    last_purged: Option<LogId<NodeId>>,
    committed: Option<LogId<NodeId>>,
    /// `committed` as of the last sync.
    committed_synced: Option<LogId<NodeId>>,
}

/// One node's simulated disk (see the module doc).
#[derive(Default)]
pub struct MemDisk {
    log: Mutex<Log>,
    state: Arc<RwLock<MemKv>>,
    /// The state as of the last sync.
    state_synced: Mutex<MemKv>,
    /// The current snapshot: its meta and its file's bytes.
    snapshot: Mutex<Option<(Meta, Vec<u8>)>>,
}

impl MemDisk {
    /// Makes everything written so far durable, as sled's periodic flush does.
    pub fn sync(&self) {
        let mut log = self.log.lock().expect("log lock");
        log.committed_synced = log.committed;
        *self.state_synced.lock().expect("state lock") =
            self.state.read().expect("state lock").clone();
    }

    /// Loses what was written since the last sync. Call it once the node's tasks are gone.
    pub fn crash(&self) {
        let mut log = self.log.lock().expect("log lock");
        log.committed = log.committed_synced;
        *self.state.write().expect("state lock") =
            self.state_synced.lock().expect("state lock").clone();
    }

    /// The vote last saved (the simulation checks that it never goes back).
    pub fn vote(&self) -> Option<Vote<NodeId>> {
        self.log.lock().expect("log lock").vote
    }

    /// The committed log id last saved.
    pub fn committed(&self) -> Option<LogId<NodeId>> {
        self.log.lock().expect("log lock").committed
    }

    /// The log ids of the entries held with an index in `from..=to`.
    pub fn log_ids(&self, from: u64, to: u64) -> Vec<LogId<NodeId>> {
        if from > to {
            return Vec::new();
        }
        let log = self.log.lock().expect("log lock");
        log.entries
            .range(from..=to)
            .map(|(_, e)| e.log_id)
            .collect()
    }

    /// Read access to the applied state.
    pub fn view(&self) -> StateView {
        StateView::memory(self.state.clone())
    }

    /// Opens the stores on this disk.
    pub fn open(self: &Arc<Self>) -> (MemLogStore, MemStateMachine) {
        (
            MemLogStore { disk: self.clone() },
            MemStateMachine {
                view: StateView::memory(self.state.clone()),
                disk: self.clone(),
                commands: Arc::default(),
            },
        )
    }
}

#[derive(Clone)]
pub struct MemLogStore {
    disk: Arc<MemDisk>,
}

impl MemLogStore {
    fn log(&self) -> std::sync::MutexGuard<'_, Log> {
        self.disk.log.lock().expect("log lock")
    }
}

impl RaftLogReader<TypeConfig> for MemLogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry>> {
        Ok(self
            .log()
            .entries
            .range(range)
            .map(|(_, e)| e.clone())
            .collect())
    }
}

impl RaftLogStorage<TypeConfig> for MemLogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let log = self.log();
        Ok(LogState {
            last_purged_log_id: log.last_purged,
            last_log_id: log
                .entries
                .last_key_value()
                .map(|(_, e)| e.log_id)
                .or(log.last_purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StorageResult<()> {
        self.log().vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<NodeId>>> {
        Ok(self.log().vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StorageResult<()> {
        self.log().committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<NodeId>>> {
        Ok(self.log().committed)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        {
            let mut log = self.log();
            for e in entries {
                log.entries.insert(e.log_id.index, e);
            }
        }
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        self.log().entries.split_off(&log_id.index);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        let mut log = self.log();
        log.last_purged = Some(log_id);
        log.entries = log.entries.split_off(&(log_id.index + 1));
        Ok(())
    }
}

pub struct MemStateMachine {
    disk: Arc<MemDisk>,
    view: StateView,
    commands: Arc<AtomicU64>,
}

impl MemStateMachine {
    pub fn view(&self) -> StateView {
        self.view.clone()
    }

    /// The count of commands applied since the store was opened.
    pub fn commands_applied(&self) -> Arc<AtomicU64> {
        self.commands.clone()
    }
}

/// A snapshot file's bytes as an open file, positioned at its start.
fn snapshot_file(bytes: &[u8], meta: Option<&Meta>) -> StorageResult<Box<tokio::fs::File>> {
    let failed = |e: std::io::Error| snapshot_err(meta, e);
    let mut f = tempfile::tempfile().map_err(failed)?;
    f.write_all(bytes).map_err(failed)?;
    f.seek(std::io::SeekFrom::Start(0)).map_err(failed)?;
    Ok(Box::new(tokio::fs::File::from_std(f)))
}

pub struct MemSnapshotBuilder {
    disk: Arc<MemDisk>,
}

impl RaftSnapshotBuilder<TypeConfig> for MemSnapshotBuilder {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let (pairs, (applied, membership)): (KvPairs, AppliedState) = {
            let state = self.disk.state.read().expect("state lock");
            let pairs = state
                .map
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            (pairs, applied_state(&*state)?)
        };
        // openraft purges the log up to the snapshot: the state it covers must be durable.
        self.disk.sync();
        let meta = SnapshotMeta {
            snapshot_id: applied.map_or_else(
                || "none".to_string(),
                |l| format!("{}-{}", l.leader_id, l.index),
            ),
            last_log_id: applied,
            last_membership: membership,
        };
        let bytes = encode(&pairs);
        let file = snapshot_file(&bytes, Some(&meta))?;
        *self.disk.snapshot.lock().expect("snapshot lock") = Some((meta.clone(), bytes));
        Ok(Snapshot {
            meta,
            snapshot: file,
        })
    }
}

impl RaftStateMachine<TypeConfig> for MemStateMachine {
    type SnapshotBuilder = MemSnapshotBuilder;

    async fn applied_state(&mut self) -> StorageResult<AppliedState> {
        self.view.applied_state()
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<Response>>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let (results, writes, commands) = apply_entries(&self.view, entries)?;
        self.disk
            .state
            .write()
            .expect("state lock")
            .commit(writes.into_iter().collect());
        self.commands.fetch_add(commands, Ordering::Relaxed);
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        MemSnapshotBuilder {
            disk: self.disk.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<tokio::fs::File>> {
        snapshot_file(&[], None)
    }

    async fn install_snapshot(
        &mut self,
        meta: &Meta,
        snapshot: Box<tokio::fs::File>,
    ) -> StorageResult<()> {
        let mut f = snapshot.into_std().await;
        let mut bytes = Vec::new();
        f.seek(std::io::SeekFrom::Start(0))
            .and_then(|_| f.read_to_end(&mut bytes))
            .map_err(|e| snapshot_err(Some(meta), e))?;
        let pairs: KvPairs =
            decode(&bytes).map_err(|e| snapshot_err(Some(meta), StoreError(e.to_string())))?;
        let mut map: BTreeMap<Vec<u8>, Vec<u8>> = pairs.into_iter().collect();
        // The snapshot's own bookkeeping is its meta, not what the builder's state said.
        map.insert(KEY_LAST_APPLIED.to_vec(), encode(&meta.last_log_id));
        map.insert(KEY_MEMBERSHIP.to_vec(), encode(&meta.last_membership));
        *self.disk.state.write().expect("state lock") = MemKv { map };
        *self.disk.snapshot.lock().expect("snapshot lock") = Some((meta.clone(), bytes));
        self.disk.sync();
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        let current = self.disk.snapshot.lock().expect("snapshot lock").clone();
        current
            .map(|(meta, bytes)| {
                Ok(Snapshot {
                    snapshot: snapshot_file(&bytes, Some(&meta))?,
                    meta,
                })
            })
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use openraft::testing::{StoreBuilder, Suite};

    use super::*;

    struct MemBuilder;

    impl StoreBuilder<TypeConfig, MemLogStore, MemStateMachine, ()> for MemBuilder {
        async fn build(&self) -> StorageResult<((), MemLogStore, MemStateMachine)> {
            let (log, sm) = Arc::new(MemDisk::default()).open();
            Ok(((), log, sm))
        }
    }

    /// openraft's conformance suite against the in-memory stores, as against the sled ones.
    #[test]
    fn memory_store_passes_openraft_suite() -> StorageResult<()> {
        Suite::test_all(MemBuilder)
    }

    /// A crash loses the applied state and the committed index written since the last sync,
    /// never the log or the vote.
    #[tokio::test]
    async fn a_crash_loses_only_what_was_not_synced() {
        let disk = Arc::new(MemDisk::default());
        let (mut log, mut sm) = disk.open();
        let id = |i| LogId::new(openraft::CommittedLeaderId::new(1, 1), i);
        let blank = |i| Entry {
            log_id: id(i),
            payload: openraft::EntryPayload::Blank,
        };
        log.save_vote(&Vote::new(1, 1)).await.unwrap();
        log.save_committed(Some(id(1))).await.unwrap();
        sm.apply([blank(1)]).await.unwrap();
        disk.sync();
        log.save_committed(Some(id(2))).await.unwrap();
        sm.apply([blank(2)]).await.unwrap();
        disk.crash();
        let (mut log, mut sm) = disk.open();
        assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(1, 1)));
        assert_eq!(log.read_committed().await.unwrap(), Some(id(1)));
        assert_eq!(sm.applied_state().await.unwrap().0, Some(id(1)));
    }
}
