//! The chaos run: start real node processes behind fault proxies, drive a concurrent workload
//! through the public API while the nemesis plan runs, heal, check recovery and convergence,
//! collect the final state, check the history, and write the report.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ephemera_client::{pb, Client};
use ephemera_core::audit::{AuditRecord, ChainVerifier};
use ephemera_node::config::PeerAddr;
use ephemera_testkit::{ClusterSpec, LocalCluster};

use crate::checker::{check, CheckConfig, Violation};
use crate::history::{FaultRecord, FinalLease, FinalState, NodeDigest, Outcome};
use crate::proxy::{self, Link};
use crate::schedule::{plan, Fault, Step, MAX_CLOCK_OFFSET_MS};
use crate::workload::{client_loop, Workload, ROLE, ROLE_MAX_TTL_S, ROLE_TTL_S};

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ChaosError(pub String);

fn err(e: impl std::fmt::Display) -> ChaosError {
    ChaosError(e.to_string())
}

#[derive(Debug, Clone)]
pub struct ChaosOptions {
    pub nodes: u64,
    pub seed: u64,
    /// How long faults are injected; healing, recovery and checks come after.
    pub duration: Duration,
    pub clients: u32,
    /// Upper bound on workload operations, whatever the duration.
    pub max_ops: u64,
    pub out_dir: PathBuf,
    /// The `ephemera` binary that runs the nodes.
    pub ephemera_bin: PathBuf,
    /// Also run the PostgreSQL workload against a real server (see [`crate::postgres`]).
    pub postgres: bool,
}

pub struct Report {
    pub summary: serde_json::Value,
    pub violations: Vec<Violation>,
}

const RECOVERY_BOUND_MS: u64 = 15_000;
/// The most leases the final check reads from one node (a run's operations are bounded far
/// below this).
pub(crate) const MAX_LEASES_READ: usize = 1_000_000;

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

struct Cluster {
    /// The node processes, their configurations and certificates.
    procs: LocalCluster,
    /// (from, to) → the proxy `from` dials to reach `to`.
    links: HashMap<(u64, u64), Link>,
    token: String,
    /// The cluster CA, for the clients (which authenticate with the break-glass credential).
    tls: ephemera_client::TlsFiles,
}

/// The chaos cluster's trust domain. Node-to-node links are mutual TLS (the fault proxies
/// forward the TLS bytes unchanged), so mTLS is exercised under every fault.
const TRUST_DOMAIN: &str = "chaos.ephemera.test";

impl Cluster {
    fn size(&self) -> u64 {
        self.procs.ids().len() as u64
    }

    /// Starts node `id` with its wall clock shifted by `clock_offset_ms`.
    fn start(&mut self, id: u64, clock_offset_ms: i64) -> Result<(), ChaosError> {
        self.procs
            .update_config(id, |c| c.test_clock_offset_ms = clock_offset_ms)
            .map_err(err)?;
        self.procs.spawn(id).map_err(err)?;
        Ok(())
    }

    fn kill9(&mut self, id: u64) {
        if let Err(e) = self.procs.kill9(id) {
            eprintln!("chaos: {e}");
        }
    }

    async fn stop(&mut self, id: u64) {
        if let Err(e) = self.procs.stop_async(id).await {
            eprintln!("chaos: {e}");
        }
    }

    fn client(&self, id: u64, timeout: Duration) -> Result<Client, ChaosError> {
        Ok(Client::with_tls(
            &self.procs.config(id).api_addr.to_string(),
            Some(self.token.clone()),
            Some(&self.tls),
        )
        .map_err(err)?
        .with_timeout(timeout))
    }

    async fn wait_answers(&self, id: u64, within: Duration) -> Result<(), ChaosError> {
        self.procs
            .wait_answers(id, &self.tls, within)
            .await
            .map_err(err)
    }

    /// The leader as some reachable node sees it.
    async fn leader(&self) -> Option<u64> {
        self.procs
            .leader(Some(&self.token), &self.tls, Duration::ZERO)
            .await
            .ok()
    }

    fn block(&self, from: u64, to: u64, blocked: bool) {
        if let Some(l) = self.links.get(&(from, to)) {
            l.set(|s| s.blocked = blocked);
        }
    }

    fn heal_links(&self) {
        for l in self.links.values() {
            l.set(|s| *s = proxy::LinkState::default());
        }
    }
}

/// Applies one fault; returns what it did (for the record) and how to undo it.
async fn inject(c: &mut Cluster, fault: &Fault) -> (String, Vec<u64>) {
    let n = c.size();
    match fault {
        Fault::KillLeader | Fault::KillNode { .. } => {
            let target = match fault {
                Fault::KillNode { node } => Some(*node),
                _ => c.leader().await,
            };
            let Some(t) = target else {
                return ("no leader to kill".into(), vec![]);
            };
            c.kill9(t);
            (format!("kill -9 node {t}"), vec![t])
        }
        Fault::Pause { node } => {
            c.procs.pause(*node);
            (format!("SIGSTOP node {node}"), vec![*node])
        }
        Fault::Partition { minority } => {
            for a in minority {
                for b in (1..=n).filter(|b| !minority.contains(b)) {
                    c.block(*a, b, true);
                    c.block(b, *a, true);
                }
            }
            (
                format!("partition {minority:?} from the rest"),
                minority.clone(),
            )
        }
        Fault::IsolateLeader => {
            let Some(l) = c.leader().await else {
                return ("no leader to isolate".into(), vec![]);
            };
            for b in (1..=n).filter(|b| *b != l) {
                c.block(l, b, true);
                c.block(b, l, true);
            }
            (format!("isolate leader {l}"), vec![l])
        }
        Fault::OneWay { from, to } => {
            c.block(*from, *to, true);
            (format!("node {from} cannot reach node {to}"), vec![*from])
        }
        Fault::SlowLinks { delay_ms } => {
            for l in c.links.values() {
                l.set(|s| s.delay_ms = *delay_ms);
            }
            (
                format!("every link delayed {delay_ms} ms per chunk"),
                (1..=n).collect(),
            )
        }
        Fault::FlakyLink {
            from,
            to,
            drop_permille,
        } => {
            if let Some(l) = c.links.get(&(*from, *to)) {
                l.set(|s| s.drop_permille = *drop_permille);
            }
            (
                format!(
                    "link {from} -> {to} drops {}% of chunks",
                    f64::from(*drop_permille) / 10.0
                ),
                vec![*from],
            )
        }
        Fault::ClockOffset { node, offset_ms } => {
            c.stop(*node).await;
            let _ = c.start(*node, *offset_ms);
            (
                format!("node {node} restarted with clock offset {offset_ms} ms"),
                vec![*node],
            )
        }
        Fault::RollingRestart => {
            for id in 1..=n {
                c.stop(id).await;
                let _ = c.start(id, 0);
                let _ = c.wait_answers(id, Duration::from_secs(10)).await;
            }
            ("rolling restart of every node".into(), (1..=n).collect())
        }
    }
}

/// Undoes every fault: links healed, paused nodes continued, dead or shifted nodes restarted.
async fn heal(c: &mut Cluster, restart_ids: &[u64]) {
    c.heal_links();
    for id in 1..=c.size() {
        if c.procs.is_paused(id) {
            c.procs.resume(id);
        }
    }
    for id in restart_ids {
        c.stop(*id).await;
    }
    for id in 1..=c.size() {
        if !c.procs.is_running(id) {
            let _ = c.start(id, 0);
        }
    }
}

async fn setup(opts: &ChaosOptions, root: &Path) -> Result<Cluster, ChaosError> {
    let mut procs = LocalCluster::create(root, &opts.ephemera_bin, &ClusterSpec::new(TRUST_DOMAIN))
        .map_err(err)?;
    for id in 1..=opts.nodes {
        procs
            .add_node(id, |c| {
                c.expiry_interval_ms = 500;
                c.request_timeout_ms = 3000;
                c.raft.snapshot_logs_since_last = 500;
                c.raft.max_in_snapshot_log_to_keep = 100;
                Ok(())
            })
            .map_err(err)?;
    }
    // Every node dials each peer through its own proxy for that link.
    let mut links = HashMap::new();
    for a in 1..=opts.nodes {
        let mut peers = Vec::new();
        for b in (1..=opts.nodes).filter(|b| *b != a) {
            let (addr, link, _task) = proxy::start(procs.config(b).cluster_addr)
                .await
                .map_err(err)?;
            links.insert((a, b), link);
            peers.push(PeerAddr {
                id: b,
                addr: addr.to_string(),
            });
        }
        procs
            .update_config(a, |c| c.peer_cluster_addrs = peers)
            .map_err(err)?;
    }
    let tls = procs.tls(None).map_err(err)?;
    let mut c = Cluster {
        procs,
        links,
        token: String::new(),
        tls,
    };
    for id in 1..=opts.nodes {
        c.start(id, 0)?;
    }
    for id in 1..=opts.nodes {
        c.wait_answers(id, Duration::from_secs(20)).await?;
    }
    let init = c
        .procs
        .init(
            1,
            pb::InitClusterRequest {
                issuer: "https://chaos.ephemera.test".into(),
                ..Default::default()
            },
            &c.tls,
        )
        .await
        .map_err(err)?;
    c.token = init.admin_token;
    let admin = c.client(1, Duration::from_secs(30))?;
    for id in 2..=opts.nodes {
        c.procs.join(&admin, id).await.map_err(err)?;
    }
    crate::workload::create_role(&admin).await.map_err(err)?;
    Ok(c)
}

async fn final_state(c: &Cluster, heal_ms: u64) -> FinalState {
    let n = c.size();
    let mut fin = FinalState {
        role_max_ttl_s: ROLE_MAX_TTL_S,
        ..Default::default()
    };
    // Recovery: a write through every node.
    for id in 1..=n {
        let deadline = Instant::now() + Duration::from_millis(RECOVERY_BOUND_MS + 5_000);
        let mut took = None;
        if let Ok(client) = c.client(id, Duration::from_secs(3)) {
            while Instant::now() < deadline {
                if client
                    .issue(pb::IssueRequest {
                        role: ROLE.into(),
                        ..Default::default()
                    })
                    .await
                    .is_ok()
                {
                    took = Some(now_ms().saturating_sub(heal_ms));
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        fin.recovery_ms.push((id, took));
    }
    // Convergence: poll until every node reports the same applied index and digest.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut ds = Vec::new();
        for id in 1..=n {
            let d = match c.client(id, Duration::from_secs(5)) {
                Ok(cl) => cl
                    .admin_call(pb::StateDigestRequest {}, |mut a, r| async move {
                        a.get_state_digest(r).await
                    })
                    .await
                    .ok()
                    .map(|d| NodeDigest {
                        applied_index: d.applied_index,
                        state_digest: d.digest,
                        audit_head: d.audit_head_hash,
                    }),
                Err(_) => None,
            };
            ds.push((id, d));
        }
        let settled = ds.iter().all(|(_, d)| d.is_some())
            && ds.windows(2).all(|w| {
                w[0].1.as_ref().map(|d| (d.applied_index, &d.state_digest))
                    == w[1].1.as_ref().map(|d| (d.applied_index, &d.state_digest))
            });
        if settled || Instant::now() > deadline {
            fin.digests = ds;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The audit chain, recomputed from node 1.
    fin.audit_chain = async {
        let client = c
            .client(1, Duration::from_secs(10))
            .map_err(|e| e.to_string())?;
        let mut verifier = ChainVerifier::default();
        loop {
            let page = client
                .admin_call(
                    pb::AuditTailRequest {
                        from_seq: verifier.count() + 1,
                        limit: 1000,
                    },
                    |mut a, r| async move { a.audit_tail(r).await },
                )
                .await
                .map_err(|e| e.to_string())?;
            let len = page.records.len();
            for r in page.records {
                let rec: AuditRecord =
                    serde_json::from_str(&r.canonical_json).map_err(|e| e.to_string())?;
                verifier.push(&rec).map_err(|e| e.to_string())?;
            }
            if len == 0 || verifier.count() >= page.head_seq {
                return if verifier.head() == page.head_hash {
                    Ok(verifier.count())
                } else {
                    Err(format!(
                        "recomputed head {} differs from the node's {}",
                        verifier.head(),
                        page.head_hash
                    ))
                };
            }
        }
    }
    .await;
    // Every node's leases.
    for id in 1..=n {
        let leases = async {
            let client = c.client(id, Duration::from_secs(10)).ok()?;
            let all = client
                .list_all_leases(pb::ListLeasesRequest::default(), MAX_LEASES_READ)
                .await
                .ok()?;
            Some(
                all.into_iter()
                    .map(|l| FinalLease {
                        id: l.id,
                        state: l.state,
                        issued_at_ms: l.issued_at_ms,
                        expires_at_ms: l.expires_at_ms,
                        max_expires_at_ms: l.max_expires_at_ms,
                    })
                    .collect::<Vec<_>>(),
            )
        }
        .await;
        fin.leases.push((id, leases));
    }
    fin
}

pub async fn run(opts: ChaosOptions) -> Result<Report, ChaosError> {
    std::fs::create_dir_all(&opts.out_dir).map_err(err)?;
    let root = opts.out_dir.join("cluster");
    let _ = std::fs::remove_dir_all(&root);
    let steps = plan(opts.seed, opts.nodes, opts.duration.as_millis() as u64);
    let mut cluster = setup(&opts, &root).await?;

    let workload = Arc::new(Workload::new(
        opts.seed,
        opts.max_ops,
        now_ms,
        Duration::ZERO,
    ));
    let pg = match opts.postgres {
        false => None,
        true => {
            let admin = cluster.client(1, Duration::from_secs(30))?;
            let pg = crate::postgres::PgWorkload::setup(
                &opts.out_dir.join("postgres"),
                &admin,
                ROLE_TTL_S,
                ROLE_MAX_TTL_S,
            )
            .await
            .map_err(ChaosError)?;
            Some(Arc::new(pg))
        }
    };
    let pg_stop = Arc::new(AtomicBool::new(false));
    let start_ms = now_ms();
    let mut workers = Vec::new();
    if let Some(pg) = &pg {
        let clients = (1..=opts.nodes)
            .map(|id| cluster.client(id, Duration::from_secs(4)))
            .collect::<Result<Vec<_>, _>>()?;
        workers.push(tokio::spawn(pg.clone().client_loop(
            clients,
            opts.seed,
            pg_stop.clone(),
            opts.max_ops,
        )));
    }
    for p in 0..opts.clients {
        let clients = (1..=opts.nodes)
            .map(|id| cluster.client(id, Duration::from_secs(4)))
            .collect::<Result<Vec<_>, _>>()?;
        workers.push(tokio::spawn(client_loop(p, clients, workload.clone())));
    }

    let mut faults = Vec::new();
    let started = Instant::now();
    for Step {
        at_ms,
        duration_ms,
        fault,
    } in &steps
    {
        let at = Duration::from_millis(*at_ms);
        if let Some(wait) = at.checked_sub(started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
        let begin = now_ms();
        let (detail, nodes) = inject(&mut cluster, fault).await;
        eprintln!("chaos: +{:>6} ms {detail}", begin - start_ms);
        tokio::time::sleep(Duration::from_millis(*duration_ms)).await;
        let restart: Vec<u64> = match fault {
            Fault::ClockOffset { node, .. } => vec![*node],
            _ => vec![],
        };
        heal(&mut cluster, &restart).await;
        faults.push(FaultRecord {
            kind: fault.kind().to_string(),
            detail,
            nodes,
            start_ms: begin,
            end_ms: now_ms(),
        });
    }
    if let Some(rest) = opts.duration.checked_sub(started.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    heal(&mut cluster, &[]).await;
    let heal_ms = now_ms();
    // The workload stops before the final state is read, so that state is final.
    workload.stop.store(true, Ordering::Relaxed);
    pg_stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.await;
    }
    let end_ms = now_ms();
    eprintln!(
        "chaos: faults stopped at +{} ms; checking recovery and convergence",
        heal_ms - start_ms
    );
    let fin_recovery_and_state = final_state(&cluster, heal_ms).await;
    let pg_violations = match &pg {
        Some(pg) => pg.check(&cluster.client(1, Duration::from_secs(10))?).await,
        None => Vec::new(),
    };
    for id in 1..=opts.nodes {
        cluster.stop(id).await;
    }

    let mut events = workload.history.lock().expect("history").clone();
    events.sort_by_key(|e| e.id);
    let cfg = CheckConfig {
        clock_tolerance_ms: MAX_CLOCK_OFFSET_MS as u64 + 1_000,
        recovery_bound_ms: RECOVERY_BOUND_MS,
    };
    let mut violations = check(&events, &fin_recovery_and_state, &cfg);
    violations.extend(pg_violations);

    // Outputs: history as JSON lines, the timeline, and the summary.
    let mut jsonl = String::new();
    for e in &events {
        jsonl.push_str(&serde_json::to_string(e).map_err(err)?);
        jsonl.push('\n');
    }
    std::fs::write(opts.out_dir.join("history.jsonl"), jsonl).map_err(err)?;
    std::fs::write(
        opts.out_dir.join("timeline.svg"),
        crate::svg::render(&events, &faults, opts.nodes, start_ms, end_ms),
    )
    .map_err(err)?;
    let mut by_outcome: BTreeMap<String, BTreeMap<&str, u64>> = BTreeMap::new();
    for e in &events {
        let o = match e.outcome {
            Outcome::Ok => "ok",
            Outcome::Fail { .. } => "fail",
            Outcome::Unknown { .. } => "unknown",
        };
        *by_outcome
            .entry(e.op.name().to_string())
            .or_default()
            .entry(o)
            .or_default() += 1;
    }
    let mut fault_counts: BTreeMap<&str, u64> = BTreeMap::new();
    for f in &faults {
        *fault_counts.entry(f.kind.as_str()).or_default() += 1;
    }
    let summary = serde_json::json!({
        "seed": opts.seed,
        "nodes": opts.nodes,
        "duration_s": opts.duration.as_secs_f64(),
        "clients": opts.clients,
        "operations": events.len(),
        "operations_by_outcome": by_outcome,
        "faults": fault_counts,
        "fault_log": faults,
        "recovery_ms": fin_recovery_and_state.recovery_ms,
        "audit_records_verified": fin_recovery_and_state.audit_chain.as_ref().ok(),
        "postgres": pg.as_ref().map(|p| p.stats.json()),
        "violations": violations,
        "replay": format!("ephemera chaos --nodes {} --seed {} --duration {}s --clients {}{}", opts.nodes, opts.seed, opts.duration.as_secs(), opts.clients, if opts.postgres { " --postgres" } else { "" }),
    });
    std::fs::write(
        opts.out_dir.join("summary.json"),
        serde_json::to_string_pretty(&summary).map_err(err)?,
    )
    .map_err(err)?;
    Ok(Report {
        summary,
        violations,
    })
}
