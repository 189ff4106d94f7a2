//! sled-backed storage. One database per node with three trees: `raft_log` (entries by index),
//! `raft_meta` (vote, committed, last purged) and `state` (the domain state plus the applied log
//! id and membership, committed in the same atomic batch as the entries they describe). The
//! current snapshot lives in `snapshot.bin` beside the database.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io::{Seek, Write};
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ephemera_core::command::{Op, Outcome};
use ephemera_core::kv::{KvPairs, KvRead, MemKv, Overlay};
use ephemera_core::state;
use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    EntryPayload, LogId, OptionalSend, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership, Vote,
};
use serde::{Deserialize, Serialize};

use crate::{decode, encode, Entry, NodeId, NodeInfo, Response, TypeConfig};

pub(crate) type StorageResult<T> = Result<T, StorageError<NodeId>>;
pub(crate) type Meta = SnapshotMeta<NodeId, NodeInfo>;
/// The last applied log id and the membership in force, as the state machine reports them.
pub type AppliedState = (Option<LogId<NodeId>>, StoredMembership<NodeId, NodeInfo>);

const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_LAST_PURGED: &[u8] = b"last_purged";
/// Raft bookkeeping in the state tree, outside the domain prefixes of `ephemera_core::state`.
pub(crate) const KEY_LAST_APPLIED: &[u8] = b"~raft/last_applied";
pub(crate) const KEY_MEMBERSHIP: &[u8] = b"~raft/membership";
const SNAPSHOT_FILE: &str = "snapshot.bin";

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct StoreError(pub(crate) String);

pub(crate) fn read_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageError::IO {
        source: StorageIOError::read_state_machine(&e),
    }
}
pub(crate) fn write_sm_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageError::IO {
        source: StorageIOError::write_state_machine(&e),
    }
}
pub(crate) fn read_logs_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageError::IO {
        source: StorageIOError::read_logs(&e),
    }
}
pub(crate) fn write_logs_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageError::IO {
        source: StorageIOError::write_logs(&e),
    }
}
pub(crate) fn snapshot_err(
    meta: Option<&SnapshotMeta<NodeId, NodeInfo>>,
    e: impl std::error::Error + 'static,
) -> StorageError<NodeId> {
    StorageError::IO {
        source: StorageIOError::write_snapshot(meta.map(|m| m.signature()), &e),
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct OpenError(String);

/// Opens (or creates) a node's storage in `dir`. If the snapshot file is ahead of the applied
/// state (a crash while installing a snapshot), the state is restored from it first.
pub fn open(dir: &Path) -> Result<(SledLogStore, SledStateMachine), OpenError> {
    let (log, sm) = open_trees(dir).map_err(|e| OpenError(e.to_string()))?;
    // Only the header: the file holds the whole state, and reading it all would add seconds to
    // every start of a node with a large state.
    let meta = read_snapshot_meta(&sm.snapshot_path())
        .map_err(|e| OpenError(format!("snapshot file: {e}")))?;
    if let Some(meta) = meta {
        let (applied, _) = sm
            .view
            .applied_state()
            .map_err(|e| OpenError(e.to_string()))?;
        if meta.last_log_id > applied {
            sm.restore_from(&sm.snapshot_path())
                .map_err(|e| OpenError(format!("restoring from the snapshot file: {e}")))?;
        }
        *sm.snapshots.current.lock().expect("snapshot lock") = meta.last_log_id;
    }
    Ok((log, sm))
}

fn open_trees(dir: &Path) -> Result<(SledLogStore, SledStateMachine), sled::Error> {
    std::fs::create_dir_all(dir)?;
    let db = sled::Config::new()
        .path(dir.join("db"))
        .mode(sled::Mode::HighThroughput)
        .open()?;
    let log = SledLogStore {
        db: db.clone(),
        log: db.open_tree("raft_log")?,
        meta: db.open_tree("raft_meta")?,
    };
    let tree = db.open_tree("state")?;
    let sm = SledStateMachine {
        view: StateView(Backend::Sled(tree.clone())),
        tree,
        db,
        copies: Arc::new(Copies::default()),
        snapshots: Arc::new(SnapshotSlot {
            path: dir.join(SNAPSHOT_FILE),
            current: Mutex::new(None),
            seq: Mutex::new(0),
        }),
        commands: Arc::default(),
    };
    Ok((log, sm))
}

// ------------------------------------------------------------------------------------------
// log store
// ------------------------------------------------------------------------------------------

#[derive(Clone)]
pub struct SledLogStore {
    db: sled::Db,
    log: sled::Tree,
    meta: sled::Tree,
}

impl SledLogStore {
    fn get_meta<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> StorageResult<Option<T>> {
        match self.meta.get(key).map_err(read_logs_err)? {
            Some(v) => Ok(Some(decode(&v).map_err(read_logs_err)?)),
            None => Ok(None),
        }
    }

    async fn put_meta<T: Serialize>(&self, key: &[u8], v: &T) -> StorageResult<()> {
        self.meta.insert(key, encode(v)).map_err(write_logs_err)?;
        self.db.flush_async().await.map_err(write_logs_err)?;
        Ok(())
    }
}

impl RaftLogReader<TypeConfig> for SledLogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry>> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i + 1,
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => Bound::Included(i.to_be_bytes()),
            Bound::Excluded(i) => Bound::Excluded(i.to_be_bytes()),
            Bound::Unbounded => Bound::Unbounded,
        };
        self.log
            .range((Bound::Included(start.to_be_bytes()), end))
            .map(|r| {
                let (_, v) = r.map_err(read_logs_err)?;
                decode::<Entry>(&v).map_err(read_logs_err)
            })
            .collect()
    }
}

impl RaftLogStorage<TypeConfig> for SledLogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let last_purged_log_id: Option<LogId<NodeId>> = self.get_meta(KEY_LAST_PURGED)?;
        let last = match self.log.last().map_err(read_logs_err)? {
            Some((_, v)) => Some(decode::<Entry>(&v).map_err(read_logs_err)?.log_id),
            None => last_purged_log_id,
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StorageResult<()> {
        self.put_meta(KEY_VOTE, vote).await
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<NodeId>>> {
        self.get_meta(KEY_VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StorageResult<()> {
        // Not flushed: losing it only means re-learning the commit index from the leader.
        self.meta
            .insert(KEY_COMMITTED, encode(&committed))
            .map_err(write_logs_err)?;
        Ok(())
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<NodeId>>> {
        Ok(self
            .get_meta::<Option<LogId<NodeId>>>(KEY_COMMITTED)?
            .flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = sled::Batch::default();
        for e in entries {
            batch.insert(&e.log_id.index.to_be_bytes(), encode(&e));
        }
        self.log.apply_batch(batch).map_err(write_logs_err)?;
        // Durable before acknowledging: an entry Raft counts towards a quorum must survive a crash.
        self.db.flush_async().await.map_err(write_logs_err)?;
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        let mut batch = sled::Batch::default();
        for k in self.log.range(log_id.index.to_be_bytes()..).keys() {
            batch.remove(k.map_err(write_logs_err)?);
        }
        self.log.apply_batch(batch).map_err(write_logs_err)?;
        self.db.flush_async().await.map_err(write_logs_err)?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        // Record the purge point first so a crash in between never loses track of it.
        self.put_meta(KEY_LAST_PURGED, &log_id).await?;
        let mut batch = sled::Batch::default();
        for k in self.log.range(..=log_id.index.to_be_bytes()).keys() {
            batch.remove(k.map_err(write_logs_err)?);
        }
        self.log.apply_batch(batch).map_err(write_logs_err)?;
        Ok(())
    }
}

// ------------------------------------------------------------------------------------------
// state machine
// ------------------------------------------------------------------------------------------

/// Read access to the applied state, shared with the node's query paths: the sled tree, or
/// (under simulation) the in-memory state of [`crate::mem`].
#[derive(Clone)]
pub struct StateView(Backend);

#[derive(Clone)]
enum Backend {
    Sled(sled::Tree),
    Memory(Arc<std::sync::RwLock<MemKv>>),
}

impl StateView {
    pub(crate) fn memory(state: Arc<std::sync::RwLock<MemKv>>) -> Self {
        StateView(Backend::Memory(state))
    }
}

impl KvRead for StateView {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, ephemera_core::StorageError> {
        match &self.0 {
            Backend::Sled(tree) => tree
                .get(key)
                .map(|v| v.map(|v| v.to_vec()))
                .map_err(|e| ephemera_core::StorageError(e.to_string())),
            Backend::Memory(state) => state.read().expect("state lock").get(key),
        }
    }

    fn range(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<KvPairs, ephemera_core::StorageError> {
        if start >= end {
            return Ok(Vec::new());
        }
        match &self.0 {
            Backend::Sled(tree) => tree
                .range(start..end)
                .take(limit)
                .map(|r| {
                    r.map(|(k, v)| (k.to_vec(), v.to_vec()))
                        .map_err(|e| ephemera_core::StorageError(e.to_string()))
                })
                .collect(),
            Backend::Memory(state) => state.read().expect("state lock").range(start, end, limit),
        }
    }
}

impl StateView {
    pub fn applied_state(&self) -> StorageResult<AppliedState> {
        applied_state(self)
    }
}

/// The applied log id and membership recorded in `state`.
pub(crate) fn applied_state(state: &(impl KvRead + ?Sized)) -> StorageResult<AppliedState> {
    let read = |e: ephemera_core::StorageError| read_err(StoreError(e.0));
    let applied = match state.get(KEY_LAST_APPLIED).map_err(read)? {
        Some(v) => decode(&v).map_err(read_err)?,
        None => None,
    };
    let membership = match state.get(KEY_MEMBERSHIP).map_err(read)? {
        Some(v) => decode(&v).map_err(read_err)?,
        None => StoredMembership::default(),
    };
    Ok((applied, membership))
}

pub struct SledStateMachine {
    view: StateView,
    tree: sled::Tree,
    db: sled::Db,
    copies: Arc<Copies>,
    snapshots: Arc<SnapshotSlot>,
    /// Commands applied since this process opened the store (a batch entry counts its
    /// commands): what the node's snapshot trigger counts, since entries undercount them.
    commands: Arc<AtomicU64>,
}

/// Keys written since a copy began, each with the value it had then (`None`: absent).
type PreImages = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

/// Lets a snapshot copy the state while apply goes on. sled has no point-in-time reads, and
/// stopping apply for the whole copy stalls every write for seconds once the state holds a
/// million leases (long enough for clients to time out). Instead, while a copy runs, every
/// write first records the value its key had when the copy began (the first write to a key
/// wins), and the copy puts those values back over what it read: the result is the state as of
/// the copy's start, however long the copy takes.
#[derive(Default)]
struct Copies {
    window: Mutex<CopyWindow>,
    /// One copy at a time: a window records for one copy.
    one_at_a_time: Mutex<()>,
}

#[derive(Default)]
struct CopyWindow {
    /// Some while a copy runs.
    before: Option<PreImages>,
    /// The whole state was replaced (a snapshot installed) while the copy ran: the copy is void.
    replaced: bool,
}

impl Copies {
    /// Opens the window and returns the applied state the copy will represent.
    fn begin(&self, view: &StateView) -> StorageResult<AppliedState> {
        let mut window = self.window.lock().expect("copy window");
        let applied = view.applied_state()?;
        window.before = Some(PreImages::new());
        window.replaced = false;
        Ok(applied)
    }

    /// Closes the window: the pre-images of every key written since it opened, or `None` if
    /// the state was replaced meanwhile.
    fn end(&self) -> Option<PreImages> {
        let mut window = self.window.lock().expect("copy window");
        let before = window.before.take().unwrap_or_default();
        (!std::mem::take(&mut window.replaced)).then_some(before)
    }

    /// Commits one batch of writes (`None` deletes), recording pre-images for an open copy.
    fn write(
        &self,
        tree: &sled::Tree,
        writes: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    ) -> Result<(), sled::Error> {
        let mut window = self.window.lock().expect("copy window");
        if let Some(before) = window.before.as_mut() {
            for (k, _) in &writes {
                if !before.contains_key(k) {
                    before.insert(k.clone(), tree.get(k)?.map(|v| v.to_vec()));
                }
            }
        }
        let mut batch = sled::Batch::default();
        for (k, v) in writes {
            match v {
                Some(v) => batch.insert(k, v),
                None => batch.remove(k),
            }
        }
        tree.apply_batch(batch)
    }
}

/// The state as of a copy's start: what the copy read (in key order), with every key written
/// since put back as it was then. Keeps key order.
fn as_of_start(read: KvPairs, before: PreImages) -> KvPairs {
    let mut out = Vec::with_capacity(read.len() + before.len());
    let mut before = before.into_iter().peekable();
    for (k, v) in read {
        // Keys that sort before this one and were deleted since the copy began.
        while let Some((bk, bv)) = before.next_if(|(bk, _)| *bk < k) {
            if let Some(bv) = bv {
                out.push((bk, bv));
            }
        }
        match before.next_if(|(bk, _)| *bk == k) {
            Some((_, Some(was))) => out.push((k, was)),
            // Created since the copy began.
            Some((_, None)) => {}
            None => out.push((k, v)),
        }
    }
    out.extend(before.filter_map(|(k, v)| v.map(|v| (k, v))));
    out
}

/// The one snapshot file. Builds and installs may run at once (openraft spawns builds), so
/// each writer works in its own temporary file, and an older snapshot never replaces a newer
/// one (`adopt` decides under `current`).
struct SnapshotSlot {
    path: PathBuf,
    current: Mutex<Option<LogId<NodeId>>>,
    /// Names temporary files (and numbers snapshot ids).
    seq: Mutex<u64>,
}

impl SnapshotSlot {
    /// A new temporary file beside the snapshot file, open for reading and writing.
    fn temp_file(&self, kind: &str) -> std::io::Result<(PathBuf, std::fs::File)> {
        let path = {
            let mut seq = self.seq.lock().expect("snapshot seq lock");
            *seq += 1;
            self.path.with_extension(format!("{}.{kind}", *seq))
        };
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        Ok((path, f))
    }

    /// Writes `file` durably and makes it the snapshot file if it is newer than the current one;
    /// returns whether it did, and the written file (open for reading, even if it was not
    /// kept).
    fn publish(&self, file: &SnapshotFile) -> std::io::Result<(bool, std::fs::File)> {
        let (tmp, written) = self.temp_file("tmp")?;
        {
            // Streamed: the state can be gigabytes, and a second in-memory copy of it is not
            // needed to write it.
            let mut w = std::io::BufWriter::new(&written);
            bincode::serialize_into(&mut w, file).map_err(std::io::Error::other)?;
            w.flush()?;
        }
        written.sync_all()?;
        let newer = self.adopt(&tmp, file.meta.last_log_id)?;
        if !newer {
            std::fs::remove_file(&tmp)?;
        }
        Ok((newer, written))
    }

    /// Makes the durable file at `tmp` the snapshot file if it covers more of the log than the
    /// current one; returns whether it did (if not, `tmp` is left in place).
    fn adopt(&self, tmp: &Path, last_log_id: Option<LogId<NodeId>>) -> std::io::Result<bool> {
        let mut current = self.current.lock().expect("snapshot lock");
        if *current >= last_log_id {
            return Ok(false);
        }
        std::fs::rename(tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        *current = last_log_id;
        Ok(true)
    }

    /// Copies a received snapshot file durably, checking that its header is `meta`, and adopts
    /// it if newer. Returns the path now holding it: the snapshot file, or a temporary file the
    /// caller removes.
    fn publish_received(
        &self,
        received: &mut std::fs::File,
        meta: &Meta,
    ) -> Result<PathBuf, String> {
        received
            .seek(std::io::SeekFrom::Start(0))
            .map_err(|e| e.to_string())?;
        let header = read_header(received)?;
        if header != *meta {
            return Err(format!(
                "the received snapshot file is {}, not the announced {}",
                header.snapshot_id, meta.snapshot_id
            ));
        }
        received
            .seek(std::io::SeekFrom::Start(0))
            .map_err(|e| e.to_string())?;
        let io = |e: std::io::Error| e.to_string();
        let (tmp, copy) = self.temp_file("tmp").map_err(io)?;
        {
            let mut w = std::io::BufWriter::with_capacity(1 << 20, &copy);
            std::io::copy(received, &mut w).map_err(io)?;
            w.flush().map_err(io)?;
        }
        copy.sync_all().map_err(io)?;
        if self.adopt(&tmp, meta.last_log_id).map_err(io)? {
            Ok(self.path.clone())
        } else {
            Ok(tmp)
        }
    }

    /// An anonymous file for a snapshot being received: its name is removed at once, so an
    /// interrupted transfer leaves nothing behind.
    fn receiving_file(&self) -> std::io::Result<std::fs::File> {
        let (path, f) = self.temp_file("recv")?;
        std::fs::remove_file(&path)?;
        Ok(f)
    }

    /// The current snapshot: its header and the file, from one open so that the two agree.
    fn current(&self) -> Result<Option<(Meta, std::fs::File)>, String> {
        let mut f = match std::fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.to_string()),
        };
        let meta = read_header(&f)?;
        f.seek(std::io::SeekFrom::Start(0))
            .map_err(|e| e.to_string())?;
        Ok(Some((meta, f)))
    }

    fn next_id(&self) -> u64 {
        *self.seq.lock().expect("snapshot seq lock") + 1
    }
}

impl SledStateMachine {
    pub fn view(&self) -> StateView {
        self.view.clone()
    }

    /// The count of commands applied since the store was opened.
    pub fn commands_applied(&self) -> Arc<AtomicU64> {
        self.commands.clone()
    }

    fn snapshot_path(&self) -> PathBuf {
        self.snapshots.path.clone()
    }

    /// Replaces the whole state with the snapshot in the file at `path`, streaming it in
    /// batches (a million leases do not fit in one batch's memory), and makes it durable. Not
    /// atomic, but safe: the applied log id is removed first and written last, so a crash in
    /// between leaves the state behind the snapshot file and `open` restores it again.
    fn restore_from(&self, path: &Path) -> StorageResult<()> {
        /// The snapshot file's layout (bincode): the meta, the length of the encoded state,
        /// then the state: a count of pairs and the pairs.
        #[derive(Deserialize)]
        struct Header {
            meta: Meta,
            _encoded_len: u64,
            pairs: u64,
        }
        const BATCH: usize = 10_000;
        let f = std::fs::File::open(path).map_err(|e| snapshot_err(None, e))?;
        let mut reader = std::io::BufReader::with_capacity(1 << 20, f);
        let header: Header =
            bincode::deserialize_from(&mut reader).map_err(|e| snapshot_err(None, e))?;
        let meta = header.meta;
        let failed =
            |e: &dyn std::fmt::Display| snapshot_err(Some(&meta), StoreError(e.to_string()));
        let tree = &self.tree;
        let mut window = self.copies.window.lock().expect("copy window");
        if window.before.is_some() {
            window.replaced = true;
        }
        tree.remove(KEY_LAST_APPLIED).map_err(|e| failed(&e))?;
        loop {
            let keys: Vec<sled::IVec> = tree
                .iter()
                .keys()
                .take(BATCH)
                .collect::<Result<_, _>>()
                .map_err(|e| failed(&e))?;
            if keys.is_empty() {
                break;
            }
            let mut batch = sled::Batch::default();
            for k in keys {
                batch.remove(k);
            }
            tree.apply_batch(batch).map_err(|e| failed(&e))?;
        }
        let mut batch = sled::Batch::default();
        let mut in_batch = 0;
        for _ in 0..header.pairs {
            let (k, v): (Vec<u8>, Vec<u8>) =
                bincode::deserialize_from(&mut reader).map_err(|e| failed(&e))?;
            // The snapshot's own bookkeeping goes in last.
            if k == KEY_LAST_APPLIED || k == KEY_MEMBERSHIP {
                continue;
            }
            batch.insert(k, v);
            in_batch += 1;
            if in_batch == BATCH {
                tree.apply_batch(std::mem::take(&mut batch))
                    .map_err(|e| failed(&e))?;
                in_batch = 0;
            }
        }
        tree.apply_batch(batch).map_err(|e| failed(&e))?;
        self.db.flush().map_err(|e| failed(&e))?;
        let mut last = sled::Batch::default();
        last.insert(KEY_LAST_APPLIED, encode(&meta.last_log_id));
        last.insert(KEY_MEMBERSHIP, encode(&meta.last_membership));
        tree.apply_batch(last).map_err(|e| failed(&e))?;
        drop(window);
        self.db.flush().map_err(|e| failed(&e))?;
        Ok(())
    }
}

/// The `meta` of a snapshot file, read without its data (bincode writes fields in order).
fn read_header(f: &std::fs::File) -> Result<Meta, String> {
    #[derive(Deserialize)]
    struct Header {
        meta: Meta,
    }
    bincode::deserialize_from::<_, Header>(std::io::BufReader::new(f))
        .map(|h| h.meta)
        .map_err(|e| e.to_string())
}

fn read_snapshot_meta(path: &Path) -> Result<Option<Meta>, String> {
    match std::fs::File::open(path) {
        Ok(f) => read_header(&f).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

#[derive(Serialize, Deserialize)]
struct SnapshotFile {
    meta: SnapshotMeta<NodeId, NodeInfo>,
    data: Vec<u8>,
}

pub struct SledSnapshotBuilder {
    db: sled::Db,
    view: StateView,
    tree: sled::Tree,
    copies: Arc<Copies>,
    snapshots: Arc<SnapshotSlot>,
}

impl RaftSnapshotBuilder<TypeConfig> for SledSnapshotBuilder {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let view = self.view.clone();
        let tree = self.tree.clone();
        let copies = self.copies.clone();
        let seq = self.snapshots.next_id();
        let snapshots = self.snapshots.clone();
        let db = self.db.clone();
        // Apply goes on while the state is copied (see `Copies`), and the build runs on a thread
        // of its own at background priority: copying, encoding and writing millions of keys
        // takes seconds of CPU, and on a busy machine it must not starve the heartbeats and
        // appends that keep the leader in office.
        let (done, result) = tokio::sync::oneshot::channel();
        let build = move || -> StorageResult<Snapshot<TypeConfig>> {
            lower_this_threads_priority();
            let _turn = copies.one_at_a_time.lock().expect("copy turn");
            let (pairs, (applied, membership)) = loop {
                let applied = copies.begin(&view)?;
                let read: Result<KvPairs, _> = tree
                    .iter()
                    .map(|r| r.map(|(k, v)| (k.to_vec(), v.to_vec())))
                    .collect();
                let before = copies.end();
                let read = read.map_err(read_err)?;
                if let Some(before) = before {
                    break (as_of_start(read, before), applied);
                }
                // A snapshot was installed under the copy; copy the new state instead.
            };
            // openraft purges the log up to the snapshot once it exists, so the applied state it
            // covers must be durable first; otherwise a crash could leave state behind the log.
            db.flush().map_err(write_sm_err)?;
            let snapshot_id = match &applied {
                Some(l) => format!("{}-{}-{seq}", l.leader_id, l.index),
                None => format!("none-{seq}"),
            };
            let meta = SnapshotMeta {
                last_log_id: applied,
                last_membership: membership,
                snapshot_id,
            };
            let data = encode(&pairs);
            drop(pairs);
            let file = SnapshotFile { meta, data };
            let (_, mut written) = snapshots
                .publish(&file)
                .map_err(|e| snapshot_err(Some(&file.meta), e))?;
            written
                .seek(std::io::SeekFrom::Start(0))
                .map_err(|e| snapshot_err(Some(&file.meta), e))?;
            Ok(Snapshot {
                meta: file.meta,
                snapshot: Box::new(tokio::fs::File::from_std(written)),
            })
        };
        std::thread::Builder::new()
            .name("snapshot-build".into())
            .spawn(move || done.send(build()))
            .map_err(read_err)?;
        result
            .await
            .map_err(|_| read_err(StoreError("the snapshot build thread died".into())))?
    }
}

/// Background priority (nice 10) for the calling thread, which must be one that ends with its
/// job: an unprivileged process cannot raise a thread's priority again.
fn lower_this_threads_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: gettid and setpriority take plain integers and touch no memory of ours.
    unsafe {
        let tid = libc::gettid();
        // Failure only leaves the build at normal priority.
        let _ = libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 10);
    }
}

/// What applying entries gives: the answers, the writes (`None`: delete) and the count of
/// commands.
pub(crate) type Applied = (Vec<Response>, Vec<(Vec<u8>, Option<Vec<u8>>)>, u64);

/// Applies `entries` over `state` without writing to it: the answers, every key written
/// (`None`: deleted) including the applied log id and membership, and the count of commands
/// (a batch entry counts its commands). Shared by the sled and in-memory state machines, so both
/// apply the log the same way.
pub(crate) fn apply_entries<I>(state: &(impl KvRead + ?Sized), entries: I) -> StorageResult<Applied>
where
    I: IntoIterator<Item = Entry>,
{
    let mut results = Vec::new();
    let mut last_applied = None;
    let mut membership = None;
    let mut commands = 0;
    let writes = {
        let mut overlay = Overlay::new(state);
        for entry in entries {
            last_applied = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => results.push(Ok(Outcome::Done)),
                EntryPayload::Normal(cmd) => {
                    commands += match &cmd.op {
                        Op::Batch(batch) => batch.len() as u64,
                        _ => 1,
                    };
                    results.push(state::apply(&mut overlay, &cmd).map_err(write_sm_err)?);
                }
                EntryPayload::Membership(m) => {
                    membership = Some(StoredMembership::new(Some(entry.log_id), m));
                    results.push(Ok(Outcome::Done));
                }
            }
        }
        overlay.into_writes()
    };
    let mut writes: Vec<(Vec<u8>, Option<Vec<u8>>)> = writes.into_iter().collect();
    if let Some(l) = last_applied {
        writes.push((KEY_LAST_APPLIED.to_vec(), Some(encode(&Some(l)))));
    }
    if let Some(m) = membership {
        writes.push((KEY_MEMBERSHIP.to_vec(), Some(encode(&m))));
    }
    Ok((results, writes, commands))
}

impl RaftStateMachine<TypeConfig> for SledStateMachine {
    type SnapshotBuilder = SledSnapshotBuilder;

    async fn applied_state(&mut self) -> StorageResult<AppliedState> {
        self.view.applied_state()
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<Response>>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let (results, writes, commands) = apply_entries(&self.view, entries)?;
        self.copies
            .write(&self.tree, writes)
            .map_err(write_sm_err)?;
        self.commands.fetch_add(commands, Ordering::Relaxed);
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SledSnapshotBuilder {
            db: self.db.clone(),
            view: self.view.clone(),
            tree: self.tree.clone(),
            copies: self.copies.clone(),
            snapshots: self.snapshots.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<tokio::fs::File>> {
        let f = self
            .snapshots
            .receiving_file()
            .map_err(|e| snapshot_err(None, e))?;
        Ok(Box::new(tokio::fs::File::from_std(f)))
    }

    async fn install_snapshot(
        &mut self,
        meta: &Meta,
        snapshot: Box<tokio::fs::File>,
    ) -> StorageResult<()> {
        // The data is a whole snapshot file, as the leader's `get_current_snapshot` sent it.
        // The file first: if we crash before the state is replaced, `open` restores the state
        // from the file, so the state never lags a log that openraft has purged.
        let mut received = snapshot.into_std().await;
        let snapshots = self.snapshots.clone();
        let owned_meta = meta.clone();
        let path = tokio::task::spawn_blocking(move || {
            snapshots.publish_received(&mut received, &owned_meta)
        })
        .await
        .map_err(|e| snapshot_err(Some(meta), e))?
        .map_err(|e| snapshot_err(Some(meta), StoreError(e)))?;
        let restored = self.restore_from(&path);
        if path != self.snapshot_path() {
            let _ = std::fs::remove_file(&path);
        }
        restored
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        // Only the header is read; the state streams from the file as it is sent.
        let current = self
            .snapshots
            .current()
            .map_err(|e| snapshot_err(None, StoreError(e)))?;
        Ok(current.map(|(meta, f)| Snapshot {
            meta,
            snapshot: Box::new(tokio::fs::File::from_std(f)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use openraft::testing::{StoreBuilder, Suite};
    use tempfile::TempDir;

    use super::*;

    struct SledBuilder;

    impl StoreBuilder<TypeConfig, SledLogStore, SledStateMachine, TempDir> for SledBuilder {
        async fn build(&self) -> StorageResult<(TempDir, SledLogStore, SledStateMachine)> {
            let dir = TempDir::new().expect("temp dir");
            let (log, sm) = open(dir.path()).expect("open sled");
            Ok((dir, log, sm))
        }
    }

    /// A crash after the snapshot file was written but before the state was replaced leaves the
    /// file ahead of the state: opening the store restores the state from the file.
    #[test]
    fn open_restores_state_from_a_snapshot_file_that_is_ahead() {
        let dir = TempDir::new().unwrap();
        let log_id = LogId::new(openraft::CommittedLeaderId::new(3, 1), 42);
        {
            let (_log, sm) = open(dir.path()).unwrap();
            let file = SnapshotFile {
                meta: SnapshotMeta {
                    last_log_id: Some(log_id),
                    last_membership: StoredMembership::default(),
                    snapshot_id: "3-42-1".into(),
                },
                data: encode(&vec![(b"role/web".to_vec(), b"v".to_vec())]),
            };
            assert!(sm.snapshots.publish(&file).unwrap().0);
            // An older snapshot never replaces a newer one.
            let mut older = SnapshotFile {
                meta: file.meta.clone(),
                data: encode(&KvPairs::new()),
            };
            older.meta.last_log_id = Some(LogId::new(openraft::CommittedLeaderId::new(3, 1), 41));
            assert!(!sm.snapshots.publish(&older).unwrap().0);
            assert_eq!(sm.view.applied_state().unwrap().0, None);
        }
        let (_log, sm) = open(dir.path()).unwrap();
        assert_eq!(sm.view.applied_state().unwrap().0, Some(log_id));
        assert_eq!(sm.view.get(b"role/web").unwrap(), Some(b"v".to_vec()));
    }

    fn pairs(items: &[(&str, &str)]) -> KvPairs {
        items
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect()
    }

    fn put(k: &str, v: &str) -> (Vec<u8>, Option<Vec<u8>>) {
        (k.as_bytes().to_vec(), Some(v.as_bytes().to_vec()))
    }

    fn del(k: &str) -> (Vec<u8>, Option<Vec<u8>>) {
        (k.as_bytes().to_vec(), None)
    }

    /// Writes that land while a snapshot copies the state, before and after the copy's cursor,
    /// including deletes and new keys, leave the copy equal to the state when it began.
    #[test]
    fn a_copy_taken_while_apply_goes_on_is_the_state_at_its_start() {
        let dir = TempDir::new().unwrap();
        let (_log, sm) = open(dir.path()).unwrap();
        let tree = &sm.tree;
        let start = pairs(&[("a", "1"), ("c", "3"), ("e", "5"), ("g", "7"), ("i", "9")]);
        sm.copies
            .write(
                tree,
                start
                    .iter()
                    .map(|(k, v)| (k.clone(), Some(v.clone())))
                    .collect(),
            )
            .unwrap();

        sm.copies.begin(&sm.view).unwrap();
        let mut cursor = tree.iter();
        let mut read = KvPairs::new();
        for _ in 0..2 {
            let (k, v) = cursor.next().unwrap().unwrap();
            read.push((k.to_vec(), v.to_vec()));
        }
        // Behind the cursor, ahead of it, new keys on both sides, deletes on both sides, and a
        // key written twice (its first pre-image must win).
        sm.copies
            .write(
                tree,
                vec![put("a", "x"), put("g", "x"), put("b", "new"), del("e")],
            )
            .unwrap();
        sm.copies
            .write(
                tree,
                vec![put("g", "y"), del("c"), put("z", "new"), del("i")],
            )
            .unwrap();
        for r in cursor {
            let (k, v) = r.unwrap();
            read.push((k.to_vec(), v.to_vec()));
        }
        let before = sm.copies.end().expect("not replaced");
        assert_eq!(as_of_start(read, before), start);

        // With the window closed, writes record nothing.
        sm.copies.write(tree, vec![put("q", "1")]).unwrap();
        assert!(sm.copies.window.lock().unwrap().before.is_none());
    }

    /// A snapshot installed while a copy runs voids the copy (the builder starts over).
    #[test]
    fn an_install_during_a_copy_voids_it() {
        let dir = TempDir::new().unwrap();
        let (_log, sm) = open(dir.path()).unwrap();
        sm.copies.write(&sm.tree, vec![put("old", "1")]).unwrap();
        sm.copies.begin(&sm.view).unwrap();
        let file = SnapshotFile {
            meta: SnapshotMeta {
                last_log_id: Some(LogId::new(openraft::CommittedLeaderId::new(1, 1), 7)),
                last_membership: StoredMembership::default(),
                snapshot_id: "1-7-1".into(),
            },
            data: encode(&vec![
                (b"role/web".to_vec(), b"v".to_vec()),
                (KEY_LAST_APPLIED.to_vec(), encode(&None::<LogId<NodeId>>)),
            ]),
        };
        let path = dir.path().join("incoming.bin");
        std::fs::write(&path, encode(&file)).unwrap();
        sm.restore_from(&path).unwrap();
        assert!(sm.copies.end().is_none());
        // The state is the snapshot's: the key written before is gone, and the applied log id
        // is the file's, not the stale one inside its pairs.
        assert_eq!(sm.view.get(b"old").unwrap(), None);
        assert_eq!(sm.view.get(b"role/web").unwrap(), Some(b"v".to_vec()));
        assert_eq!(sm.view.applied_state().unwrap().0, file.meta.last_log_id);
        sm.copies.begin(&sm.view).unwrap();
        assert_eq!(sm.copies.end(), Some(PreImages::new()));
    }

    #[test]
    fn as_of_start_merges_in_key_order() {
        let read = pairs(&[("b", "2"), ("d", "now"), ("f", "6")]);
        let mut before = PreImages::new();
        before.insert(b"a".to_vec(), Some(b"1".to_vec())); // deleted since
        before.insert(b"d".to_vec(), Some(b"4".to_vec())); // changed since
        before.insert(b"e".to_vec(), None); // created and deleted since
        before.insert(b"f".to_vec(), None); // created since
        before.insert(b"h".to_vec(), Some(b"8".to_vec())); // deleted since, after the last read
        assert_eq!(
            as_of_start(read, before),
            pairs(&[("a", "1"), ("b", "2"), ("d", "4"), ("h", "8")])
        );
    }

    /// openraft's conformance suite against the sled log store and state machine.
    #[test]
    fn sled_store_passes_openraft_suite() -> StorageResult<()> {
        Suite::test_all(SledBuilder)
    }
}
