//! Deterministic simulation of an Ephemera cluster: real nodes (the node's `serve`, with its
//! Raft type configuration, state machine, forwarding, read barriers, guards and gRPC
//! services) on [`turmoil`]'s simulated network and time, in one thread, with every random
//! choice drawn from the run's seed. One seed replays one history, bit for bit.
//!
//! What is simulated rather than real, each behind a seam of the node:
//! - storage: [`ephemera_raft::mem`] over the core's `MemKv` instead of sled (sled runs threads
//!   of its own), with sled's durability: a crash loses what was not yet flushed;
//! - the network: turmoil's TCP (through `conn::Listener` and `network::Dial`), in plaintext:
//!   rustls would run, but its handshakes draw from the operating system's randomness;
//! - time: turmoil's clock for tokio, the node's `Clock` and the rate limiters' clock;
//! - randomness: the node's `Entropy` seeded per node and start, tokio's scheduler seeded by
//!   turmoil (this needs `--cfg tokio_unstable`, set in `.cargo/config.toml`), and openraft's
//!   election timeouts fixed per node from the seed (`max = min + 1`).
//!
//! Not simulated: snapshots (their files go through `tokio::fs`, whose thread pool the
//! simulation cannot schedule; the log is never purged in a run), TLS, the HTTP listener's
//! clients, PostgreSQL.
//!
//! A run: three nodes form the cluster on their own (`[cluster] peers`, `bootstrap_expect`);
//! a client host creates the chaos role and runs the chaos harness's workload
//! ([`ephemera_chaos::workload`]) while the driver applies the chaos harness's fault plan for
//! the seed ([`ephemera_chaos::schedule::plan`]) through turmoil, with one crash in three on a
//! replaced, empty disk (a membership change: the leader removes the node and adds it again).
//! After healing, every node must take a write, and the driver reads each node's disk: the
//! history and final state go through the chaos checker, and invariants are checked along the
//! way (votes never go back, committed entries are never replaced, leaders are complete).
//!
//! One run per process: tokio numbers tasks process-wide, and the order in which a crashed
//! host's tasks are dropped (so the order its connections close in) follows those numbers; a
//! second run in the same process may take another path. The binary runs many seeds as child
//! processes.

#[cfg(not(tokio_unstable))]
compile_error!(
    "ephemera-sim needs `--cfg tokio_unstable` (set in .cargo/config.toml; RUSTFLAGS from the \
     environment replace it) to seed tokio's scheduler"
);

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use ephemera_chaos::checker::{check, CheckConfig, Violation};
use ephemera_chaos::history::{Event, FaultRecord, FinalLease, FinalState, NodeDigest};
use ephemera_chaos::schedule::{plan, Fault, MAX_CLOCK_OFFSET_MS};
use ephemera_chaos::workload::{self, Workload, ROLE, ROLE_MAX_TTL_S};
use ephemera_client::{pb, Client};
use ephemera_core::audit::ChainVerifier;
use ephemera_core::kv::KvRead;
use ephemera_core::state;
use ephemera_raft::mem::MemDisk;
use ephemera_raft::network::{BoxedStream, Dial};
use rand::{Rng, RngCore, SeedableRng};
use serde::Serialize;
use sha2::{Digest, Sha256};

pub const CLUSTER_PORT: u16 = 7400;
pub const API_PORT: u16 = 7401;
pub const HTTP_PORT: u16 = 7402;
/// How long after healing every node must take a write (as in the chaos harness).
const RECOVERY_BOUND_MS: u64 = 15_000;
/// How long the driver waits, after the workload, for the nodes' states to converge.
const SETTLE_LIMIT_MS: u64 = 30_000;
/// How often the driver checks the invariants that read every node's disk.
const CHECK_EVERY_MS: u64 = 50;
/// Each client's pause between operations: about 20 operations per second per client, so a
/// run's operations spread over its faults.
const WORKLOAD_PAUSE: Duration = Duration::from_millis(50);
/// sled flushes every 500 ms by default; the simulated disk is made durable as often.
const SYNC_EVERY: Duration = Duration::from_millis(500);

#[derive(Debug, Clone)]
pub struct SimOptions {
    pub nodes: u64,
    /// How long faults are injected, from the moment the workload starts.
    pub run_ms: u64,
    pub clients: u32,
    /// Upper bound on workload operations.
    pub max_ops: u64,
    /// Partitions drop messages instead of holding them: black holes, which stall a
    /// connection for good (see [`cut`]) until a keep-alive or a deadline gives up on it.
    pub black_holes: bool,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            nodes: 3,
            run_ms: 20_000,
            clients: 3,
            max_ops: 1_000,
            black_holes: false,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SimReport {
    pub seed: u64,
    /// SHA-256 of the history and of every node's final digests: equal for equal runs.
    pub history_hash: String,
    pub operations: usize,
    pub acknowledged: usize,
    pub faults: Vec<FaultRecord>,
    pub violations: Vec<Violation>,
    /// Per node: applied index, state digest and audit head at the end.
    pub digests: Vec<(u64, Option<NodeDigest>)>,
    /// Simulated time the run took.
    pub simulated_ms: u64,
    /// The command that replays this run.
    pub replay: String,
    /// The recorded history (written by `--history`).
    #[serde(skip)]
    pub history: Vec<Event>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SimError(String);

fn sim_err(e: impl std::fmt::Display) -> SimError {
    SimError(e.to_string())
}

fn host(id: u64) -> String {
    format!("node-{id}")
}

/// Simulated wall time (Unix ms) on the current host.
fn sim_now_ms() -> u64 {
    turmoil::since_epoch().map_or(0, |d| d.as_millis() as u64)
}

/// The node's clock: simulated time, shifted by the fault plan's clock offset.
struct SimClock {
    offset_ms: Arc<AtomicI64>,
}

impl ephemera_core::Clock for SimClock {
    fn now_ms(&self) -> u64 {
        sim_now_ms().saturating_add_signed(self.offset_ms.load(Ordering::Relaxed))
    }
}

struct SeededEntropy(rand::rngs::StdRng);

impl ephemera_core::command::Entropy for SeededEntropy {
    fn fill(&mut self, buf: &mut [u8]) {
        self.0.fill_bytes(buf);
    }
}

/// turmoil's TCP, for peers and for the workload's clients.
struct SimDial;

impl Dial for SimDial {
    fn dial(&self, addr: String) -> Pin<Box<dyn Future<Output = io::Result<BoxedStream>> + Send>> {
        Box::pin(async move {
            let s = turmoil::net::TcpStream::connect(addr).await?;
            Ok(Box::new(s) as BoxedStream)
        })
    }
}

struct SimListener(turmoil::net::TcpListener);

impl ephemera_node::conn::Listener for SimListener {
    async fn accept(&mut self) -> io::Result<(BoxedStream, SocketAddr)> {
        let (s, peer) = self.0.accept().await?;
        Ok((Box::new(s), peer))
    }
}

/// A gRPC channel to `addr` over the simulated network.
fn channel(addr: &str) -> Result<tonic::transport::Channel, SimError> {
    let target = addr.to_string();
    Ok(
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(sim_err)?
            .connect_timeout(Duration::from_millis(1000))
            .connect_with_connector_lazy(tower::service_fn(move |_: tonic::transport::Uri| {
                let connecting = SimDial.dial(target.clone());
                async move { Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(connecting.await?)) }
            })),
    )
}

fn client(ids: &[u64], token: &str, timeout: Duration) -> Result<Client, SimError> {
    let list = ids
        .iter()
        .map(|id| {
            let addr = format!("{}:{API_PORT}", host(*id));
            Ok((addr.clone(), channel(&addr)?))
        })
        .collect::<Result<Vec<_>, SimError>>()?;
    Ok(Client::with_channels(list, Some(token.to_string()))
        .map_err(sim_err)?
        .with_timeout(timeout))
}

/// One node's configuration: it forms the cluster with its peers on its own.
fn node_config(
    id: u64,
    nodes: u64,
    data_dir: &std::path::Path,
    election_ms: u64,
) -> Result<ephemera_node::NodeConfig, SimError> {
    let peers: Vec<String> = (1..=nodes)
        .map(|p| format!("{{ id = {p}, addr = \"{}:{CLUSTER_PORT}\" }}", host(p)))
        .collect();
    let text = format!(
        r#"
node_id = {id}
data_dir = "{dir}"
cluster_addr = "0.0.0.0:{CLUSTER_PORT}"
api_addr = "0.0.0.0:{API_PORT}"
http_addr = "0.0.0.0:{HTTP_PORT}"
kek_file = "unused"
insecure_plaintext = true
expiry_interval_ms = 500
request_timeout_ms = 3000

[raft]
heartbeat_interval_ms = 100
election_timeout_min_ms = {election_ms}
election_timeout_max_ms = {election_max}
snapshot_logs_since_last = 1000000000

[cluster]
peers = [{peers}]
bootstrap_expect = {nodes}
issuer = "https://sim.ephemera.test"

[advertise]
cluster_addr = "{h}:{CLUSTER_PORT}"
api_addr = "{h}:{API_PORT}"
http_addr = "{h}:{HTTP_PORT}"
"#,
        dir = data_dir.display(),
        election_max = election_ms + 1,
        peers = peers.join(", "),
        h = host(id),
    );
    toml::from_str(&text).map_err(sim_err)
}

/// A node's disk, which a fault may replace with a new, empty one (a replaced volume), and
/// how many times it was replaced.
#[derive(Default)]
struct DiskBay(Mutex<(Arc<MemDisk>, u64)>);

impl DiskBay {
    fn current(&self) -> Arc<MemDisk> {
        self.0.lock().expect("disk bay").0.clone()
    }

    fn current_with_generation(&self) -> (Arc<MemDisk>, u64) {
        self.0.lock().expect("disk bay").clone()
    }

    fn replace(&self) {
        let mut bay = self.0.lock().expect("disk bay");
        *bay = (Arc::default(), bay.1 + 1);
    }
}

/// What the driver and a node's host share.
struct NodeSlot {
    id: u64,
    disk: Arc<DiskBay>,
    clock_offset_ms: Arc<AtomicI64>,
    starts: Arc<AtomicU64>,
    cfg: ephemera_node::NodeConfig,
    kek: [u8; 32],
}

fn start_node(
    slot: &NodeSlot,
    seed: u64,
) -> impl Future<Output = Result<(), Box<dyn std::error::Error>>> + 'static {
    let (disk, offset, cfg) = (
        slot.disk.current(),
        slot.clock_offset_ms.clone(),
        slot.cfg.clone(),
    );
    let start = slot.starts.fetch_add(1, Ordering::Relaxed);
    let entropy_seed = seed ^ slot.id.rotate_left(48) ^ start.rotate_left(32);
    let kek = ephemera_core::crypto::Kek::from_bytes(slot.kek);
    async move {
        let bind = |port: u16| async move {
            turmoil::net::TcpListener::bind(("0.0.0.0", port))
                .await
                .map(SimListener)
        };
        let listeners = [
            bind(CLUSTER_PORT).await?,
            bind(API_PORT).await?,
            bind(HTTP_PORT).await?,
        ];
        let (log_store, sm) = disk.open();
        let syncing = disk.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(SYNC_EVERY).await;
                syncing.sync();
            }
        });
        let parts = ephemera_node::Parts {
            view: sm.view(),
            applied_commands: sm.commands_applied(),
            log_store,
            state_machine: sm,
            kek,
            local: ephemera_node::node::LocalAccess {
                join_only: true,
                ..Default::default()
            },
            tls: None,
            clock: Arc::new(SimClock { offset_ms: offset }),
            entropy: Box::new(SeededEntropy(rand::rngs::StdRng::seed_from_u64(
                entropy_seed,
            ))),
            dial: Arc::new(SimDial),
            listeners,
        };
        ephemera_node::serve(cfg, parts, std::future::pending()).await?;
        Ok(())
    }
}

/// What the workload's host reports to the driver.
#[derive(Default)]
struct ClientProgress {
    /// Simulated ms at which the workload started (0: not yet).
    started_at_ms: AtomicU64,
    /// Set by the driver once faults are over and healed: stop, then check recovery.
    healed: AtomicBool,
    recovery_ms: Mutex<Vec<(u64, Option<u64>)>>,
}

async fn run_client(
    nodes: u64,
    credential_file: std::path::PathBuf,
    w: Arc<Workload>,
    clients: u32,
    progress: Arc<ClientProgress>,
) -> Result<(), Box<dyn std::error::Error>> {
    // The first node writes the break-glass credential when it forms the cluster.
    let token = loop {
        if let Ok(t) = std::fs::read_to_string(&credential_file) {
            break t.trim().to_string();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let ids: Vec<u64> = (1..=nodes).collect();
    let admin = client(&ids, &token, Duration::from_secs(5))?;
    while let Err(e) = workload::create_role(&admin).await {
        tracing::debug!(error = %e, "creating the role");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    progress
        .started_at_ms
        .store(turmoil::elapsed().as_millis() as u64, Ordering::Relaxed);
    let mut loops = Vec::new();
    for p in 0..clients {
        let per_node = ids
            .iter()
            .map(|id| client(&[*id], &token, Duration::from_secs(4)))
            .collect::<Result<Vec<_>, _>>()?;
        loops.push(tokio::spawn(workload::client_loop(p, per_node, w.clone())));
    }
    while !progress.healed.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    w.stop.store(true, Ordering::Relaxed);
    for l in loops {
        l.await?;
    }
    // Recovery: a write through every node, within the bound.
    let healed_at = turmoil::elapsed();
    for id in ids {
        let c = client(&[id], &token, Duration::from_secs(3))?;
        let mut took = None;
        while turmoil::elapsed() - healed_at < Duration::from_millis(RECOVERY_BOUND_MS + 5_000) {
            let issued = c
                .issue(pb::IssueRequest {
                    role: ROLE.into(),
                    // The client's own ids come from the wall clock; the run's from the run.
                    request_id: Some(format!("recovery-{id}")),
                    ..Default::default()
                })
                .await;
            if issued.is_ok() {
                took = Some((turmoil::elapsed() - healed_at).as_millis() as u64);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        progress
            .recovery_ms
            .lock()
            .expect("recovery")
            .push((id, took));
    }
    Ok(())
}

/// The invariants checked on every node's disk while the run goes on.
///
/// openraft (as configured) identifies a leader by `(term, node id)`, not by the term alone: two
/// candidates may both win in one term, in turn, since the later id is the greater, and entries
/// carry the full leader id. So "at most one leader per term" is not the property to check;
/// what it protects is, and that is checked: a node's vote never goes back on one disk (so no
/// leader id is granted twice by a voter that forgot), an entry once committed is never
/// replaced, and a node that becomes leader holds every entry committed under an earlier
/// leader id.
#[derive(Default)]
struct Invariants {
    /// Per node: the disk's generation and the vote last seen on it.
    votes: BTreeMap<u64, (u64, openraft::Vote<u64>)>,
    /// Leaders (node, leader id) whose log has been checked for completeness.
    leaders_checked: std::collections::BTreeSet<(u64, openraft::LeaderId<u64>)>,
    /// index → the log id of the entry committed there.
    committed: BTreeMap<u64, openraft::LogId<u64>>,
    /// Per node: the disk's generation and the highest index already compared.
    checked: BTreeMap<u64, (u64, u64)>,
    violations: Vec<Violation>,
}

impl Invariants {
    fn observe(&mut self, id: u64, bay: &DiskBay) {
        let (disk, generation) = bay.current_with_generation();
        self.observe_parts(id, generation, disk.vote(), disk.committed(), |from, to| {
            disk.log_ids(from, to)
        });
    }

    fn violation(&mut self, kind: &'static str, message: String) {
        self.violations.push(Violation {
            kind,
            message,
            events: Vec::new(),
        });
    }

    /// `generation` tells disks of one node apart; `log_ids(from, to)`: the log ids of the
    /// node's entries with an index in `from..=to`.
    fn observe_parts(
        &mut self,
        id: u64,
        generation: u64,
        vote: Option<openraft::Vote<u64>>,
        committed: Option<openraft::LogId<u64>>,
        log_ids: impl Fn(u64, u64) -> Vec<openraft::LogId<u64>>,
    ) {
        if let Some(v) = vote {
            if let Some((g, before)) = self.votes.get(&id) {
                if *g == generation && v < *before {
                    self.violation(
                        "vote_went_back",
                        format!("node {id}: vote {v} after {before} on the same disk"),
                    );
                }
            }
            self.votes.insert(id, (generation, v));
            let leader = v.leader_id;
            if v.committed && leader.node_id == id && self.leaders_checked.insert((id, leader)) {
                let earlier: Vec<_> = self
                    .committed
                    .values()
                    .filter(|l| l.leader_id < leader)
                    .copied()
                    .collect();
                for l in earlier {
                    if !log_ids(l.index, l.index).contains(&l) {
                        self.violation(
                            "leader_incomplete",
                            format!("node {id} leads as {leader} without the committed {l}"),
                        );
                    }
                }
            }
        }
        let Some(committed) = committed else {
            return;
        };
        let from = match self.checked.get(&id) {
            Some((g, c)) if *g == generation => c + 1,
            _ => 1,
        };
        for log_id in log_ids(from, committed.index) {
            match self.committed.get(&log_id.index) {
                Some(known) if *known != log_id => {
                    let known = *known;
                    self.violation(
                        "committed_entry_replaced",
                        format!(
                            "index {}: committed as {known}, node {id} committed {log_id}",
                            log_id.index
                        ),
                    );
                }
                Some(_) => {}
                None => {
                    self.committed.insert(log_id.index, log_id);
                }
            }
        }
        self.checked
            .insert(id, (generation, committed.index.max(from - 1)));
    }
}

/// The leader by the disks: the node holding a committed vote for itself in the highest term.
fn leader(slots: &[NodeSlot]) -> Option<u64> {
    slots
        .iter()
        .filter_map(|s| {
            s.disk
                .current()
                .vote()
                .filter(|v| v.committed && v.leader_id.node_id == s.id)
                .map(|v| (v.leader_id.term, s.id))
        })
        .max()
        .map(|(_, id)| id)
}

/// A fault in progress: how to undo it.
enum Undo {
    Restart(Vec<u64>),
    Release(Vec<(String, String)>),
    Repair(Vec<(String, String)>),
    RepairOneWay(String, String),
    Latency,
    Clock(u64),
    Nothing,
}

const DEFAULT_MAX_LATENCY: Duration = Duration::from_millis(5);

fn others(nodes: u64, of: &[u64]) -> Vec<u64> {
    (1..=nodes).filter(|n| !of.contains(n)).collect()
}

fn pairs(a: &[u64], b: &[u64]) -> Vec<(String, String)> {
    a.iter()
        .flat_map(|x| b.iter().map(move |y| (host(*x), host(*y))))
        .collect()
}

/// Runs one seed.
pub fn run(seed: u64, opts: &SimOptions) -> Result<SimReport, SimError> {
    let dir = tempfile::tempdir().map_err(sim_err)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .enable_random_order()
        .epoch(UNIX_EPOCH + Duration::from_secs(1_800_000_000))
        .simulation_duration(Duration::from_millis(opts.run_ms + 300_000))
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(DEFAULT_MAX_LATENCY)
        .build();
    let n = opts.nodes;
    // One key-encryption key for the cluster, as an operator provisions it.
    let mut kek = [0u8; 32];
    rng.fill_bytes(&mut kek);
    let mut slots = Vec::new();
    for id in 1..=n {
        let data_dir = dir.path().join(host(id));
        std::fs::create_dir_all(&data_dir).map_err(sim_err)?;
        // Distinct fixed election timeouts: openraft's random draw has one value to choose.
        let election_ms = 400 + rng.gen_range(0..400);
        slots.push(NodeSlot {
            id,
            disk: Arc::default(),
            clock_offset_ms: Arc::default(),
            starts: Arc::default(),
            cfg: node_config(id, n, &data_dir, election_ms)?,
            kek,
        });
    }
    for slot in &slots {
        let slot = NodeSlot {
            id: slot.id,
            disk: slot.disk.clone(),
            clock_offset_ms: slot.clock_offset_ms.clone(),
            starts: slot.starts.clone(),
            cfg: slot.cfg.clone(),
            kek: slot.kek,
        };
        sim.host(host(slot.id), move || start_node(&slot, seed));
    }
    let workload = Arc::new(Workload::new(
        seed,
        opts.max_ops,
        sim_now_ms,
        WORKLOAD_PAUSE,
    ));
    let progress = Arc::new(ClientProgress::default());
    sim.client(
        "client",
        run_client(
            n,
            slots[0].cfg.admin_credential_path(),
            workload.clone(),
            opts.clients,
            progress.clone(),
        ),
    );

    let steps = plan(seed, n, opts.run_ms);
    let mut next_step = 0;
    let mut active: Vec<(u64, Undo, usize)> = Vec::new();
    let mut faults: Vec<FaultRecord> = Vec::new();
    let mut invariants = Invariants::default();
    let mut last_check = 0;
    let mut healed = false;
    loop {
        let finished = sim.step().map_err(sim_err)?;
        let now = sim.elapsed().as_millis() as u64;
        if now >= last_check + CHECK_EVERY_MS {
            last_check = now;
            for s in &slots {
                invariants.observe(s.id, &s.disk);
            }
        }
        if finished {
            break;
        }
        let started = progress.started_at_ms.load(Ordering::Relaxed);
        if started == 0 || healed {
            continue;
        }
        let t = now - started;
        // End the faults whose time is up.
        let mut i = 0;
        while i < active.len() {
            if t >= active[i].0 {
                let (_, undo, record) = active.remove(i);
                heal(&mut sim, &slots, undo);
                faults[record].end_ms = now;
            } else {
                i += 1;
            }
        }
        // Start the faults whose time has come.
        while next_step < steps.len() && t >= steps[next_step].at_ms {
            let step = &steps[next_step];
            next_step += 1;
            // One crash in three replaces the node's disk (drawn whatever the fault, so the
            // draws do not depend on the plan's kinds).
            let wipe = rng.gen_range(0..3) == 0 && all_caught_up(&slots);
            let (detail, nodes, undo) =
                inject(&mut sim, &slots, &step.fault, wipe, opts.black_holes);
            faults.push(FaultRecord {
                kind: step.fault.kind().to_string(),
                detail,
                nodes,
                start_ms: now,
                end_ms: now,
            });
            active.push((step.at_ms + step.duration_ms, undo, faults.len() - 1));
        }
        // Faults end by `run_ms`; the workload may run out of operations first.
        if t >= opts.run_ms || workload.next_id.load(Ordering::Relaxed) >= opts.max_ops {
            for (_, undo, record) in active.drain(..) {
                heal(&mut sim, &slots, undo);
                faults[record].end_ms = now;
            }
            healed = true;
            progress.healed.store(true, Ordering::Relaxed);
        }
    }
    // Convergence: run on until every node has applied the same log (or the limit passes).
    let settle_until = sim.elapsed() + Duration::from_millis(SETTLE_LIMIT_MS);
    while !converged(&slots) && sim.elapsed() < settle_until {
        sim.step().map_err(sim_err)?;
    }
    for s in &slots {
        invariants.observe(s.id, &s.disk);
    }
    let history = {
        let mut h = workload.history.lock().expect("history").clone();
        h.sort_by_key(|e| e.id);
        h
    };
    let fin = final_state(
        &slots,
        progress.recovery_ms.lock().expect("recovery").clone(),
    );
    let mut violations = check(
        &history,
        &fin,
        &CheckConfig {
            clock_tolerance_ms: MAX_CLOCK_OFFSET_MS as u64 + 1_000,
            recovery_bound_ms: RECOVERY_BOUND_MS,
        },
    );
    violations.append(&mut invariants.violations);
    violations.sort_by(|a, b| (a.kind, &a.message).cmp(&(b.kind, &b.message)));
    Ok(SimReport {
        seed,
        history_hash: history_hash(&history, &fin),
        operations: history.len(),
        acknowledged: history
            .iter()
            .filter(|e| e.outcome == ephemera_chaos::history::Outcome::Ok)
            .count(),
        faults,
        violations,
        simulated_ms: sim.elapsed().as_millis() as u64,
        digests: fin.digests.clone(),
        replay: replay_command(seed, opts),
        history,
    })
}

/// Applies `fault`; `wipe`: a crashed node also loses its disk.
fn inject(
    sim: &mut turmoil::Sim,
    slots: &[NodeSlot],
    fault: &Fault,
    wipe: bool,
    black_holes: bool,
) -> (String, Vec<u64>, Undo) {
    let n = slots.len() as u64;
    let crash = |sim: &mut turmoil::Sim, ids: &[u64]| {
        for id in ids {
            sim.crash(host(*id));
            slots[*id as usize - 1].disk.current().crash();
        }
    };
    match fault {
        Fault::KillLeader | Fault::IsolateLeader => {
            let Some(l) = leader(slots) else {
                return ("no leader".into(), vec![], Undo::Nothing);
            };
            if matches!(fault, Fault::KillLeader) {
                crash(sim, &[l]);
                (
                    format!("crashed leader {l}"),
                    vec![l],
                    Undo::Restart(vec![l]),
                )
            } else {
                let pairs_cut = pairs(&[l], &others(n, &[l]));
                let undo = cut(sim, pairs_cut, black_holes);
                (format!("isolated leader {l}"), vec![l], undo)
            }
        }
        Fault::KillNode { node } if wipe => {
            // The simulation's membership change: the node comes back on a new, empty disk
            // (a replaced volume, the same id); the leader must remove it and add it again.
            crash(sim, &[*node]);
            slots[*node as usize - 1].disk.replace();
            (
                format!("crashed {node} and replaced its disk"),
                vec![*node],
                Undo::Restart(vec![*node]),
            )
        }
        Fault::KillNode { node } => {
            crash(sim, &[*node]);
            (
                format!("crashed {node}"),
                vec![*node],
                Undo::Restart(vec![*node]),
            )
        }
        Fault::RollingRestart => {
            // The simulation's harsher form: every node at once (a power loss), each losing
            // what it had not synced, all restarted when the step ends.
            let all: Vec<u64> = (1..=n).collect();
            crash(sim, &all);
            ("crashed every node".into(), all.clone(), Undo::Restart(all))
        }
        Fault::Pause { node } => {
            let mut held = pairs(&[*node], &others(n, &[*node]));
            held.push((host(*node), "client".into()));
            hold(sim, &held);
            (
                format!("held every message to and from {node}"),
                vec![*node],
                Undo::Release(held),
            )
        }
        Fault::Partition { minority } => {
            let undo = cut(sim, pairs(minority, &others(n, minority)), black_holes);
            (format!("partitioned {minority:?}"), minority.clone(), undo)
        }
        Fault::OneWay { from, to } | Fault::FlakyLink { from, to, .. } => {
            // Over TCP a link that loses one direction stalls both (nothing is acknowledged),
            // until the loss ends and retransmission delivers; held messages are that.
            let (a, b) = (host(*from), host(*to));
            let undo = if black_holes {
                sim.partition_oneway(a.as_str(), b.as_str());
                Undo::RepairOneWay(a, b)
            } else {
                cut(sim, vec![(a, b)], false)
            };
            (format!("{from} cannot reach {to}"), vec![*from, *to], undo)
        }
        Fault::SlowLinks { delay_ms } => {
            sim.set_max_message_latency(Duration::from_millis(*delay_ms));
            (
                format!("messages take up to {delay_ms} ms"),
                (1..=n).collect(),
                Undo::Latency,
            )
        }
        Fault::ClockOffset { node, offset_ms } => {
            slots[*node as usize - 1]
                .clock_offset_ms
                .store(*offset_ms, Ordering::Relaxed);
            (
                format!("clock of {node} off by {offset_ms} ms"),
                vec![*node],
                Undo::Clock(*node),
            )
        }
    }
}

/// Holds every message between the pairs until they are released. Partitions are held
/// messages rather than dropped ones: turmoil's TCP does not retransmit, so a dropped segment
/// would stall its connection for good, which no real TCP connection does; a real partition
/// delays delivery until it heals (or until a keep-alive gives up, which the nodes' own
/// deadlines model).
fn hold(sim: &turmoil::Sim, pairs: &[(String, String)]) {
    for (a, b) in pairs {
        sim.hold(a.as_str(), b.as_str());
    }
}

/// Cuts the links between the pairs: held messages (see [`hold`]), or with `black_hole`
/// dropped ones, which leaves every connection that lost a segment stalled after the repair:
/// what a middlebox that silently drops an established flow does.
fn cut(sim: &turmoil::Sim, pairs: Vec<(String, String)>, black_hole: bool) -> Undo {
    if black_hole {
        for (a, b) in &pairs {
            sim.partition(a.as_str(), b.as_str());
        }
        Undo::Repair(pairs)
    } else {
        hold(sim, &pairs);
        Undo::Release(pairs)
    }
}

fn heal(sim: &mut turmoil::Sim, slots: &[NodeSlot], undo: Undo) {
    match undo {
        Undo::Restart(ids) => {
            for id in ids {
                sim.bounce(host(id));
            }
        }
        Undo::Repair(pairs) => {
            for (a, b) in pairs {
                sim.repair(a.as_str(), b.as_str());
            }
        }
        Undo::RepairOneWay(a, b) => sim.repair_oneway(a.as_str(), b.as_str()),
        Undo::Release(held) => {
            for (a, b) in held {
                sim.release(a.as_str(), b.as_str());
            }
        }
        Undo::Latency => sim.set_max_message_latency(DEFAULT_MAX_LATENCY),
        Undo::Clock(id) => slots[id as usize - 1]
            .clock_offset_ms
            .store(0, Ordering::Relaxed),
        Undo::Nothing => {}
    }
}

fn applied_index(disk: &MemDisk) -> Option<u64> {
    disk.view()
        .applied_state()
        .ok()
        .and_then(|(a, _)| a.map(|l| l.index))
}

/// Whether every node is a voter in every node's applied membership and within a few entries
/// of the most advanced: the only time the simulation replaces a disk. Losing a second disk
/// before the first replacement has caught up loses the data of a majority, which no Raft
/// cluster recovers from on its own (it stops, and an operator restores a backup); the run
/// would then only show that the cluster stopped.
fn all_caught_up(slots: &[NodeSlot]) -> bool {
    let states: Vec<_> = slots
        .iter()
        .map(|s| s.disk.current().view().applied_state().ok())
        .collect();
    let max = states
        .iter()
        .filter_map(|st| st.as_ref().and_then(|(a, _)| a.map(|l| l.index)))
        .max()
        .unwrap_or(0);
    states.iter().all(|st| match st {
        Some((Some(applied), membership)) => {
            let voters: Vec<u64> = membership.voter_ids().collect();
            applied.index + 20 >= max && slots.iter().all(|s| voters.contains(&s.id))
        }
        _ => false,
    })
}

fn converged(slots: &[NodeSlot]) -> bool {
    let states: Vec<_> = slots
        .iter()
        .map(|s| {
            let disk = s.disk.current();
            (applied_index(&disk), state::state_digest(&disk.view()).ok())
        })
        .collect();
    states.windows(2).all(|w| w[0] == w[1])
}

/// What each node holds at the end, read from its disk.
fn final_state(slots: &[NodeSlot], recovery_ms: Vec<(u64, Option<u64>)>) -> FinalState {
    let mut fin = FinalState {
        role_max_ttl_s: ROLE_MAX_TTL_S,
        recovery_ms,
        ..Default::default()
    };
    for s in slots {
        let disk = s.disk.current();
        let view = disk.view();
        let digest = (|| {
            let (seq_hash, digest) = (
                state::audit_head(&view).ok()?,
                state::state_digest(&view).ok()?,
            );
            Some(NodeDigest {
                applied_index: applied_index(&disk).unwrap_or(0),
                state_digest: digest,
                audit_head: seq_hash.1,
            })
        })();
        fin.digests.push((s.id, digest));
        fin.leases.push((s.id, leases(&view).ok()));
    }
    fin.audit_chain = audit_chain(&slots[0].disk.current().view());
    fin
}

fn leases(view: &impl KvRead) -> Result<Vec<FinalLease>, ephemera_core::StorageError> {
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let (page, next) = state::list_leases(view, &Default::default(), after.as_deref(), 1000)?;
        for l in page {
            let status = state::effects::lease_status(view, &l)?;
            out.push(FinalLease {
                id: l.id,
                state: status.state.to_string(),
                issued_at_ms: l.issued_at_ms,
                expires_at_ms: l.expires_at_ms,
                max_expires_at_ms: l.max_expires_at_ms,
            });
        }
        match next {
            Some(n) => after = Some(n),
            None => return Ok(out),
        }
    }
}

fn audit_chain(view: &impl KvRead) -> Result<u64, String> {
    let mut verifier = ChainVerifier::default();
    loop {
        let page =
            state::audit_records(view, verifier.count() + 1, 1000).map_err(|e| e.to_string())?;
        if page.is_empty() {
            break;
        }
        for r in &page {
            verifier.push(r).map_err(|e| e.to_string())?;
        }
    }
    let (seq, hash) = state::audit_head(view).map_err(|e| e.to_string())?;
    if verifier.count() != seq || verifier.head() != hash {
        return Err(format!(
            "recomputed head {} at {} differs from the stored {hash} at {seq}",
            verifier.head(),
            verifier.count()
        ));
    }
    Ok(seq)
}

/// The command that replays a run of `seed` with `opts`.
fn replay_command(seed: u64, opts: &SimOptions) -> String {
    let mut cmd = format!("cargo run --release -p ephemera-sim -- --seed {seed}");
    let default = SimOptions::default();
    if opts.run_ms != default.run_ms {
        cmd += &format!(" --run-ms {}", opts.run_ms);
    }
    if opts.max_ops != default.max_ops {
        cmd += &format!(" --max-ops {}", opts.max_ops);
    }
    if opts.black_holes {
        cmd += " --black-holes";
    }
    cmd
}

fn history_hash(history: &[Event], fin: &FinalState) -> String {
    let mut h = Sha256::new();
    for e in history {
        h.update(serde_json::to_vec(e).expect("events serialise"));
        h.update(b"\n");
    }
    h.update(serde_json::to_vec(&fin.digests).expect("digests serialise"));
    h.update(serde_json::to_vec(&fin.leases).expect("leases serialise"));
    hex::encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_id(term: u64, leader: u64, index: u64) -> openraft::LogId<u64> {
        openraft::LogId::new(openraft::CommittedLeaderId::new(term, leader), index)
    }

    fn committed_vote(term: u64, leader: u64) -> Option<openraft::Vote<u64>> {
        let mut v = openraft::Vote::new(term, leader);
        v.commit();
        Some(v)
    }

    /// What a broken Raft would leave on the disks: the checks must say so.
    #[test]
    fn the_invariants_catch_a_forgotten_vote_a_replaced_entry_and_an_incomplete_leader() {
        let entries = |leader| {
            move |from: u64, to: u64| {
                (from..=to)
                    .map(|i| log_id(3, leader, i))
                    .collect::<Vec<_>>()
            }
        };
        let mut inv = Invariants::default();
        inv.observe_parts(
            1,
            0,
            committed_vote(3, 1),
            Some(log_id(3, 1, 2)),
            entries(1),
        );
        inv.observe_parts(
            1,
            0,
            committed_vote(3, 1),
            Some(log_id(3, 1, 2)),
            entries(1),
        );
        // Two leaders in one term, in turn, is openraft's design: (3, 2) follows (3, 1).
        inv.observe_parts(2, 0, committed_vote(3, 2), None, entries(1));
        assert!(inv.violations.is_empty(), "{:?}", inv.violations);
        // Node 1 forgets its vote on the same disk; a new disk may start over.
        inv.observe_parts(1, 0, committed_vote(2, 1), None, entries(1));
        inv.observe_parts(1, 1, committed_vote(1, 1), None, entries(1));
        // Node 3 leads as (4, 3) without the entries committed under (3, 1), and commits
        // others at the same indexes.
        inv.observe_parts(
            3,
            0,
            committed_vote(4, 3),
            Some(log_id(4, 3, 2)),
            |from, to| (from..=to).map(|i| log_id(4, 3, i)).collect(),
        );
        let kinds: Vec<_> = inv.violations.iter().map(|v| v.kind).collect();
        assert_eq!(
            kinds,
            [
                "vote_went_back",
                "leader_incomplete",
                "leader_incomplete",
                "committed_entry_replaced",
                "committed_entry_replaced"
            ],
            "{:?}",
            inv.violations
        );
    }
}
