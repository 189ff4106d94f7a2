//! A running node: the request path shared by the gRPC and HTTP front ends. Authentication is
//! in [`authn`], leadership, forwarding and read barriers in [`routing`], the leader's
//! housekeeping in [`workers`]; minting and authorization are their own modules
//! ([`crate::mint`], [`crate::authz`]).
//!
//! Writes: authenticate → validate → route to the leader (locally, or one forwarding hop) → the
//! leader stamps time, ids and key material and proposes → wait until this node has applied the
//! entry → sign the credential here. Reads that must be linearizable go through a read barrier:
//! the leader confirms leadership and names a log index, and this node waits until it has applied
//! it before reading its own state.

mod authn;
mod certs;
pub mod effects;
mod routing;
mod workers;

pub use certs::{renewal_due, RenewedCertificate};

use crate::coalesce::Coalescer;
use crate::group_commit::{self, GroupCommit};
use crate::verified::Verified;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
// tokio's clock, not std's: deadlines follow simulated time under the simulation.
use tokio::time::Instant;

use ed25519_dalek::SigningKey;
use ephemera_core::command::{
    stamp, validate_intent, ApplyResult, Command, Entropy, Intent, Op, Outcome, Proposal,
};
use ephemera_core::crypto::{verify_secret, Kek};
use ephemera_core::state;
use ephemera_core::token::{self, Claims};
use ephemera_core::types::{AuthMethod, Principal};
use ephemera_core::{Clock, Error};
use ephemera_proto::internal::{ForwardRequest, NodeStatusRequest, ReadIndexRequest};
use ephemera_raft::network::Peers;
use ephemera_raft::store::StateView;
use ephemera_raft::{decode, encode, ClientWriteError, NodeId, NodeInfo, Raft, RaftError};
use openraft::error::CheckIsLeaderError;
use openraft::ServerState;
use rand::RngCore;
use serde::{Deserialize, Serialize};

use crate::conn::ConnInfo;
use crate::metrics::Metrics;

/// Log entries the leader has in flight at once: one being written while the one before
/// commits, so the fsync and the replication round overlap.
const GROUP_COMMIT_IN_FLIGHT: usize = 2;
/// The most encoded bytes of commands in one batch entry. With the entries per replication
/// message bounded in `raft_config`, an append stays well under the cluster's message limit.
pub const MAX_BATCH_BYTES: usize = 512 * 1024;

/// The lease of an X.509-SVID this cluster issued: its serial is 0x01 followed by the lease
/// id's 16 bytes.
fn svid_lease_id(serial: &[u8]) -> Option<String> {
    match serial {
        [0x01, rest @ ..] if rest.len() == 16 => Some(format!("l_{}", hex::encode(rest))),
        _ => None,
    }
}

/// Wall clock, optionally shifted (a test-only knob for clock-skew testing).
pub struct SystemClock {
    pub offset_ms: i64,
}

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        now.saturating_add_signed(self.offset_ms)
    }
}

/// The operating system's CSPRNG.
pub struct OsEntropy;

impl Entropy for OsEntropy {
    fn fill(&mut self, buf: &mut [u8]) {
        rand::rngs::OsRng.fill_bytes(buf);
    }
}

/// How long a joining node may take to catch up (install a snapshot of the whole state and the
/// log after it) before the join is refused. A million leases took 110 s on a 2-core machine.
pub const CATCH_UP_LIMIT: Duration = Duration::from_secs(300);

/// What a follower hands to the leader over the cluster listener. Built once per request and
/// serialised at once, so the size of the largest variant costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Forwarded {
    /// A proposal, with the break-glass credential when its actor is the break-glass
    /// administrator: the leader checks that credential itself rather than trust the sender.
    Propose {
        proposal: Proposal,
        credential: ephemera_core::types::PresentedSecret,
    },
    AddNode {
        id: NodeId,
        info: NodeInfo,
    },
    RemoveNode {
        id: NodeId,
    },
    /// A member asks for a renewed certificate for this public key (DER SubjectPublicKeyInfo).
    /// Who asks is the certificate the request came with, never a field of the request.
    RenewNodeCertificate {
        public_key_der: Vec<u8>,
        ttl_s: u64,
    },
}

// One short-lived value per request; boxing the lease would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ForwardReply {
    Applied {
        result: ApplyResult,
        log_index: u64,
    },
    MembershipChanged,
    /// A renewed node certificate, PEM, signed by the cluster CA.
    NodeCertificate {
        cert_pem: String,
    },
    /// The receiving node is not the leader; nothing was executed.
    NotLeader,
}

/// Outcome of trying to act as leader.
#[allow(clippy::large_enum_variant)]
enum LeaderAttempt {
    Done(Result<ForwardReply, Error>),
    NotLeader,
}

/// How far past their expiry retired keys stay in the JWKS, for verifiers' clock skew.
pub use ephemera_core::state::KEY_PUBLISH_GRACE_MS;

/// Bearer credentials with this prefix are the break-glass credential, with [`JOIN_TOKEN_PREFIX`]
/// one-time join tokens; any other bearer is a JWT assertion.
pub const BREAK_GLASS_PREFIX: &str = "eph_admin_";
pub const JOIN_TOKEN_PREFIX: &str = "eph_jt_";

/// What the node needs to authenticate workloads by their X.509-SVIDs.
pub struct NodeTls {
    pub trust_domain: String,
    /// The cluster CA and every configured external trust bundle.
    pub bundles: Arc<ephemera_pki::TrustBundles>,
    /// SPIFFE IDs that administer the cluster.
    pub admin_ids: std::collections::HashSet<String>,
    /// This node's own certificate, shared with every listener and peer channel.
    pub identity: ephemera_pki::Identity,
    /// The cluster CA only: what a renewed node certificate must chain to.
    pub cluster_bundle: Arc<ephemera_pki::TrustBundles>,
    /// `tls.node_cert_ttl_s` (0: no renewal).
    pub node_cert_ttl_s: u64,
    /// Where the renewed certificate is kept.
    pub renewed_cert_dir: std::path::PathBuf,
}

/// Node-local access rules that are not policy: who may initialise this node, and where the
/// break-glass credential is accepted from.
#[derive(Debug, Default)]
pub struct LocalAccess {
    /// The init secret, until the cluster is initialised (see [`crate::bootstrap`]).
    pub init_secret: Mutex<Option<crate::bootstrap::InitSecret>>,
    /// `bootstrap.join`: this node refuses `cluster init`.
    pub join_only: bool,
    /// `break_glass.allowed_sources` (empty: anywhere).
    pub break_glass_sources: Vec<crate::config::IpNet>,
    /// A leader has admitted this node, which has no Raft state yet, to be added (see
    /// [`Node::accepts_raft`]). Kept in memory only: a node that restarts before it received
    /// any state is new again and must be admitted again.
    pub admitted: std::sync::atomic::AtomicBool,
}

pub struct Node {
    pub id: NodeId,
    pub info: NodeInfo,
    pub raft: Raft,
    pub view: StateView,
    pub peers: Peers,
    pub metrics: Metrics,
    pub clock: Arc<dyn Clock>,
    pub(crate) kek: Kek,
    entropy: Mutex<Box<dyn Entropy + Send>>,
    /// Unsealed signing keys (JWT keys and SSH CA keys), by key id.
    pub(crate) keys: Mutex<HashMap<String, Arc<SigningKey>>>,
    request_timeout: Duration,
    /// The deepest token exchange this node allows (`max_delegation_depth`).
    pub(crate) max_delegation_depth: u32,
    /// Places for open `WatchRevocations` streams.
    pub(crate) watchers: Arc<tokio::sync::Semaphore>,
    tls: Option<NodeTls>,
    pub(crate) oidc: crate::oidc::Verifier,
    /// Refused authentications are audited through Raft; under a flood only this many per
    /// second are, so unauthenticated traffic cannot be turned into unbounded Raft writes.
    denial_audits: crate::guard::DirectLimiter,
    /// Refusals not recorded since the last recorded one (stated in that next record).
    denials_unrecorded: std::sync::atomic::AtomicU64,
    /// The compiled policy set of the latest committed version this node has used.
    pub(crate) policy_cache: Mutex<Option<Arc<ephemera_policy::PolicyBook>>>,
    pub guard: crate::guard::Guard,
    /// Concurrent read barriers share rounds (see [`crate::coalesce`]); set by
    /// [`Node::start_coalescing`].
    barriers: std::sync::OnceLock<Coalescer<Result<(), Error>>>,
    /// Followers' read-index requests, on the leader, share leadership confirmations.
    read_indexes: std::sync::OnceLock<Coalescer<Result<u64, Error>>>,
    /// The leader's writes share log entries (see [`crate::group_commit`]).
    group_commit: std::sync::OnceLock<GroupCommit<Command, LeaderAttempt>>,
    /// Client certificates whose chain has been verified: leaf DER → (SPIFFE ID, valid until,
    /// ms). Saves a chain verification per request; revocation is still checked every time.
    verified_svids: Verified<Vec<u8>, (ephemera_pki::SpiffeId, u64)>,
    /// Tokens of this cluster whose signature verified: SHA-256 of the key and the token.
    verified_tokens: Verified<[u8; 32], ()>,
    pub local: LocalAccess,
    /// The leader's housekeeping settings.
    housekeeping: Housekeeping,
    /// The leader's executor of external effects (see [`effects`]).
    pub(crate) effects: effects::Executor,
}

/// What the leader's housekeeping does besides expiry: compaction and audit checkpoints.
#[derive(Debug, Clone, Copy)]
pub struct Housekeeping {
    /// `[retention]`: what compaction forgets, and after how long.
    pub retention: ephemera_core::command::Retention,
    /// `audit.checkpoint_interval_s`, in ms.
    pub checkpoint_interval_ms: u64,
}

/// How long a verified client-certificate chain is trusted without verifying it again (never
/// beyond the certificate's own expiry).
const SVID_VERIFICATION_CACHE_MS: u64 = 60_000;
/// Bound on the cache of verified client certificates.
const SVID_VERIFICATION_CACHE_ENTRIES: usize = 10_000;
/// Bound on the cache of verified token signatures (about 100 bytes an entry).
const TOKEN_VERIFICATION_CACHE_ENTRIES: usize = 100_000;

/// Audit records of refused authentications per second and node, and the burst allowed.
const DENIAL_AUDITS_PER_S: u32 = 20;
const DENIAL_AUDIT_BURST: u32 = 100;

/// Whether a gRPC failure happened while connecting, before the request could be sent.
pub fn is_connect_failure(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Unavailable && status.message().contains("connect")
}

fn internal(e: impl std::fmt::Display) -> Error {
    Error::Internal(e.to_string())
}

impl Node {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: NodeId,
        info: NodeInfo,
        raft: Raft,
        view: StateView,
        peers: Peers,
        kek: Kek,
        clock: Arc<dyn Clock>,
        entropy: Box<dyn Entropy + Send>,
        (request_timeout, max_delegation_depth): (Duration, u32),
        tls: Option<NodeTls>,
        oidc: crate::oidc::Verifier,
        guard: crate::guard::GuardConfig,
        local: LocalAccess,
        housekeeping: Housekeeping,
    ) -> Self {
        let guard = crate::guard::Guard::new(guard, clock.now_ms());
        Node {
            id,
            info,
            raft,
            view,
            peers,
            metrics: Metrics::default(),
            clock,
            kek,
            entropy: Mutex::new(entropy),
            keys: Mutex::new(HashMap::new()),
            request_timeout,
            max_delegation_depth,
            watchers: Arc::new(tokio::sync::Semaphore::new(
                crate::revocation_watch::MAX_WATCHERS,
            )),
            tls,
            oidc,
            denial_audits: crate::guard::direct_limiter(
                governor::Quota::per_second(
                    std::num::NonZeroU32::new(DENIAL_AUDITS_PER_S).expect("non-zero"),
                )
                .allow_burst(std::num::NonZeroU32::new(DENIAL_AUDIT_BURST).expect("non-zero")),
                crate::guard::TokioClock::default(),
            ),
            denials_unrecorded: std::sync::atomic::AtomicU64::new(0),
            policy_cache: Mutex::new(None),
            guard,
            barriers: std::sync::OnceLock::new(),
            read_indexes: std::sync::OnceLock::new(),
            group_commit: std::sync::OnceLock::new(),
            verified_svids: Verified::new(SVID_VERIFICATION_CACHE_ENTRIES),
            verified_tokens: Verified::new(TOKEN_VERIFICATION_CACHE_ENTRIES),
            local,
            housekeeping,
            effects: effects::Executor::default(),
        }
    }

    /// Starts the tasks that coalesce read barriers and group writes (unless `max_batch` is 1).
    /// They hold the node weakly (or only its Raft handle) and stop with it.
    pub fn start_coalescing(self: &Arc<Self>, max_batch: usize) {
        if max_batch > 1 {
            self.start_group_commit(max_batch);
        }
        let node = Arc::downgrade(self);
        let _ = self.barriers.set(Coalescer::spawn(move || {
            let node = node.clone();
            async move {
                match node.upgrade() {
                    Some(n) => n.read_barrier_round().await,
                    None => Err(Error::Unavailable("node stopped".into())),
                }
            }
        }));
        let node = Arc::downgrade(self);
        let _ = self.read_indexes.set(Coalescer::spawn(move || {
            let node = node.clone();
            async move {
                match node.upgrade() {
                    Some(n) => n.read_index_round().await,
                    None => Err(Error::Unavailable("node stopped".into())),
                }
            }
        }));
    }

    /// Group commit (see [`crate::group_commit`]). Without it (`raft.max_batch = 1`) every
    /// write is its own entry and as many are outstanding as callers wait.
    fn start_group_commit(self: &Arc<Self>, max_batch: usize) {
        let raft = self.raft.clone();
        let limits = group_commit::Limits {
            max_batch: max_batch.min(ephemera_core::command::MAX_BATCH),
            max_bytes: MAX_BATCH_BYTES,
            in_flight: GROUP_COMMIT_IN_FLIGHT,
        };
        let node = Arc::downgrade(self);
        let _ = self
            .group_commit
            .set(GroupCommit::spawn(limits, move |commands| {
                if let Some(n) = node.upgrade() {
                    Metrics::inc(&n.metrics.leader_entries, 1);
                    Metrics::inc(&n.metrics.leader_commands, commands.len() as u64);
                }
                routing::write_entry(raft.clone(), commands)
            }));
    }

    /// Random bytes from this node's entropy source: the operating system's CSPRNG, or under
    /// simulation a generator seeded from the run's seed. Every random choice a node makes goes
    /// through here or through stamping.
    pub(crate) fn fill_random(&self, buf: &mut [u8]) {
        self.entropy.lock().expect("entropy lock").fill(buf);
    }

    // ---- credentials ----------------------------------------------------------------------

    pub fn issuer(&self) -> Result<String, Error> {
        state::issuer(&self.view)
            .map_err(internal)?
            .ok_or(Error::NotInitialized)
    }

    /// RFC 7662 semantics: `Ok(Some((claims, lease)))` for an active token, `Ok(None)` for any
    /// token that is not (unknown key, bad signature, revoked, expired). Malformed input is an
    /// error.
    pub async fn introspect(
        &self,
        principal: &Principal,
        caller: &crate::authz::CallerContext,
        token_text: &str,
    ) -> Result<Option<(Claims, ephemera_core::types::Lease)>, Error> {
        Metrics::inc(&self.metrics.introspections, 1);
        let parsed = token::parse(token_text)
            .map_err(|e| Error::InvalidArgument(format!("malformed token: {e}")))?;
        self.read_access(
            principal,
            "introspect",
            &format!("lease:{}", parsed.claims.jti),
        )
        .await?;
        let now = self.clock.now_ms();
        // First: is this a token the cluster issued (whatever its state now)? A forgery or a
        // foreign token is simply inactive; it says nothing about any lease.
        let Some(key) = state::get_key(&self.view, &parsed.header.kid).map_err(internal)? else {
            return Ok(None);
        };
        if !self.signature_verifies(&parsed, token_text, &key.public_key)
            || parsed.claims.iss != self.issuer()?
        {
            return Ok(None);
        }
        let Some(lease) = state::get_lease(&self.view, &parsed.claims.jti).map_err(internal)?
        else {
            return Ok(None);
        };
        // Then: may this caller learn about it? Decided before looking at whether it is live,
        // so that a refused caller gets the same answer for a live token and a dead one.
        self.decide_on_lease(
            principal,
            ephemera_policy::Action::Introspect,
            &lease,
            None,
            caller,
        )
        .await?;
        let now_s = now / 1000;
        let live = key.is_published_at(now, KEY_PUBLISH_GRACE_MS)
            && lease.is_active_at(now)
            && parsed.claims.exp > now_s
            && parsed.claims.nbf <= now_s;
        Ok(live.then_some((parsed.claims, lease)))
    }

    /// Whether `parsed` (whose text is `text`) carries a valid signature by `public_key`. A
    /// signature verified once is remembered (see [`crate::verified`]); the key is part of
    /// what is remembered, so the answer cannot outlive a change of key.
    pub(crate) fn signature_verifies(
        &self,
        parsed: &token::Unverified,
        text: &str,
        public_key: &[u8; 32],
    ) -> bool {
        use sha2::{Digest, Sha256};
        let seen: [u8; 32] = Sha256::new()
            .chain_update(b"ephemera-token-signature-v1:")
            .chain_update(public_key)
            .chain_update(text.as_bytes())
            .finalize()
            .into();
        if self.verified_tokens.get(&seen).is_some() {
            return true;
        }
        let valid = parsed.verify(public_key).is_ok();
        if valid {
            self.verified_tokens.insert(seen, ());
        }
        valid
    }

    // ---- cluster --------------------------------------------------------------------------

    /// This node's own state (for `cluster status` and the cluster listener).
    pub fn local_status(&self) -> (String, u64, Option<NodeId>) {
        let m = self.raft.metrics().borrow().clone();
        let state = match m.state {
            ServerState::Leader => "leader",
            ServerState::Follower => "follower",
            ServerState::Learner => "learner",
            ServerState::Candidate => "candidate",
            ServerState::Shutdown => "shutdown",
        };
        (
            state.to_string(),
            m.last_applied.map_or(0, |l| l.index),
            m.current_leader,
        )
    }

    /// Status of every member, asking each over the cluster listener (bounded by a short timeout).
    pub async fn cluster_status(&self) -> ClusterView {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership().clone();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let mut nodes = Vec::new();
        let probes = membership.nodes().map(|(id, info)| {
            let id = *id;
            let info = info.clone();
            async move {
                let status = if id == self.id {
                    let (s, applied, _) = self.local_status();
                    Some((
                        s,
                        applied,
                        self.guard.clock_offset(),
                        self.guard.storm_state(),
                    ))
                } else {
                    match self.peers.client(id, &info.cluster_addr) {
                        Ok(mut c) => tokio::time::timeout(
                            Duration::from_millis(500),
                            c.node_status(NodeStatusRequest {}),
                        )
                        .await
                        .ok()
                        .and_then(|r| r.ok())
                        .map(|r| {
                            let r = r.into_inner();
                            (
                                r.state,
                                r.applied_index,
                                r.clock_offset_ms,
                                (
                                    r.renewal_storm,
                                    r.renewal_rate_per_s,
                                    r.renewal_baseline_per_s,
                                ),
                            )
                        }),
                        Err(_) => None,
                    }
                };
                (id, info, status)
            }
        });
        let mut storm = (false, 0.0, 0.0);
        for (id, info, status) in futures::future::join_all(probes).await {
            let (role, applied, clock_offset_ms) = match status {
                Some((s, a, offset, node_storm)) => {
                    if Some(id) == m.current_leader {
                        storm = node_storm;
                    }
                    (s, a, offset)
                }
                None => ("unreachable".to_string(), 0, 0),
            };
            nodes.push(MemberView {
                id,
                info,
                role,
                applied_index: applied,
                voter: voters.contains(&id),
                clock_offset_ms,
            });
        }
        ClusterView {
            leader_id: m.current_leader,
            term: m.current_term,
            nodes,
            storm,
        }
    }
}

pub struct MemberView {
    pub id: NodeId,
    pub info: NodeInfo,
    pub role: String,
    pub applied_index: u64,
    pub voter: bool,
    pub clock_offset_ms: i64,
}

pub struct ClusterView {
    pub leader_id: Option<NodeId>,
    pub term: u64,
    pub nodes: Vec<MemberView>,
    /// The leader's renewal-storm state: (mitigating, renewals/s, baseline).
    pub storm: (bool, f64, f64),
}
