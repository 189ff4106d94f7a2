//! A running node: the request path shared by the gRPC and HTTP front ends.
//!
//! Writes: authenticate → validate → route to the leader (locally, or one forwarding hop) → the
//! leader stamps time, ids and key material and proposes → wait until this node has applied the
//! entry → sign the credential here. Reads that must be linearizable go through a read barrier:
//! the leader confirms leadership and names a log index, and this node waits until it has applied
//! it before reading its own state.

use crate::coalesce::Coalescer;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    Propose(Proposal),
    AddNode { id: NodeId, info: NodeInfo },
    RemoveNode { id: NodeId },
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
    tls: Option<NodeTls>,
    oidc: crate::oidc::Verifier,
    /// Refused authentications are audited through Raft; under a flood only this many per
    /// second are, so unauthenticated traffic cannot be turned into unbounded Raft writes.
    denial_audits: governor::DefaultDirectRateLimiter,
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
    /// Client certificates whose chain has been verified: leaf DER → (SPIFFE ID, valid until,
    /// ms). Saves a chain verification per request; revocation is still checked every time.
    verified_svids: Mutex<HashMap<Vec<u8>, (ephemera_pki::SpiffeId, u64)>>,
}

/// How long a verified client-certificate chain is trusted without verifying it again (never
/// beyond the certificate's own expiry).
const SVID_VERIFICATION_CACHE_MS: u64 = 60_000;
/// Bound on the cache of verified client certificates (cleared when full).
const SVID_VERIFICATION_CACHE_ENTRIES: usize = 10_000;

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
        request_timeout: Duration,
        tls: Option<NodeTls>,
        oidc: crate::oidc::Verifier,
        guard: crate::guard::GuardConfig,
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
            tls,
            oidc,
            denial_audits: governor::RateLimiter::direct(
                governor::Quota::per_second(
                    std::num::NonZeroU32::new(DENIAL_AUDITS_PER_S).expect("non-zero"),
                )
                .allow_burst(std::num::NonZeroU32::new(DENIAL_AUDIT_BURST).expect("non-zero")),
            ),
            denials_unrecorded: std::sync::atomic::AtomicU64::new(0),
            policy_cache: Mutex::new(None),
            guard,
            barriers: std::sync::OnceLock::new(),
            read_indexes: std::sync::OnceLock::new(),
            verified_svids: Mutex::new(HashMap::new()),
        }
    }

    /// Starts the tasks that coalesce read barriers. They hold the node weakly and stop with it.
    pub fn start_coalescing(self: &Arc<Self>) {
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

    // ---- authentication ------------------------------------------------------------------

    /// Authenticates a caller: by the X.509-SVID it presented over mTLS, else by a bearer
    /// credential (the break-glass admin credential). A refused certificate is audited.
    pub async fn authenticate(
        &self,
        bearer: Option<&str>,
        conn: Option<&ConnInfo>,
    ) -> Result<Principal, Error> {
        // A flood from one address is shed before any certificate or signature work.
        let source = conn.and_then(|c| c.remote).map(|a| a.ip());
        if let Err(e) = self.guard.ingress_source(source) {
            let who = source.map_or_else(|| "unknown address".to_string(), |ip| ip.to_string());
            self.audit_ingress_refusal(who, &e).await;
            return Err(e);
        }
        let principal = self.authenticate_caller(bearer, conn).await?;
        if let Err(e) = self.guard.ingress_identity(&principal.id) {
            self.audit_ingress_refusal(principal.id.clone(), &e).await;
            return Err(e);
        }
        Ok(principal)
    }

    /// Records an ingress refusal, sampled like every refusal (the count of the unrecorded ones
    /// goes into the next record).
    async fn audit_ingress_refusal(&self, who: String, e: &Error) {
        let Some(note) = self.refusal_audit_slot() else {
            return;
        };
        let event = ephemera_core::command::GuardEvent {
            kind: "refused".into(),
            identity: Some(who),
            detail: format!("{e}{note}"),
            quarantine: false,
            revoke_leases: false,
        };
        if let Err(e) = self.route_system(Intent::GuardEvent(event)).await {
            tracing::warn!(error = %e, "could not audit a refusal");
        }
    }

    async fn authenticate_caller(
        &self,
        bearer: Option<&str>,
        conn: Option<&ConnInfo>,
    ) -> Result<Principal, Error> {
        if let Some(certs) = conn
            .and_then(|c| c.peer_certs.as_ref())
            .filter(|c| !c.is_empty())
        {
            return self.authenticate_svid(certs).await;
        }
        let Some(presented) = bearer.filter(|b| !b.is_empty()) else {
            Metrics::inc(&self.metrics.auth_failures, 1);
            return Err(Error::Unauthenticated(
                "present a client certificate (X.509-SVID) or a bearer credential".into(),
            ));
        };
        if presented.starts_with(JOIN_TOKEN_PREFIX) {
            return self.authenticate_join_token(presented);
        }
        if !presented.starts_with(BREAK_GLASS_PREFIX) {
            return self.authenticate_assertion(presented).await;
        }
        let stored = state::admin_credential_hash(&self.view).map_err(internal)?;
        let Some(stored) = stored else {
            return Err(Error::NotInitialized);
        };
        if verify_secret(presented, &stored) {
            Ok(Principal::bootstrap_admin())
        } else {
            Metrics::inc(&self.metrics.auth_failures, 1);
            Err(Error::Unauthenticated("invalid credential".into()))
        }
    }

    /// A one-time join token authenticates the identity it was created for, for the one
    /// request that redeems it. Unknown, used and expired tokens are refused here, without a
    /// Raft write, so a stream of bogus tokens cannot grow the log; `apply` consumes the token.
    fn authenticate_join_token(&self, token: &str) -> Result<Principal, Error> {
        let hash = ephemera_core::crypto::hash_secret(token);
        let usable = state::join_token(&self.view, &hash)
            .map_err(internal)?
            .filter(|t| t.used_at_ms.is_none() && self.clock.now_ms() < t.expires_at_ms);
        let Some(t) = usable else {
            Metrics::inc(&self.metrics.auth_failures, 1);
            return Err(Error::Unauthenticated(
                "join token unknown, already used or expired".into(),
            ));
        };
        Ok(Principal {
            issuer: self.tls.as_ref().map(|tls| tls.trust_domain.clone()),
            id: t.spiffe_id,
            auth_method: AuthMethod::JoinToken,
            attributes: Default::default(),
            admin: false,
        })
    }

    /// The lease of the cluster-issued X.509-SVID a connection presented, if any.
    pub fn presented_svid_lease(&self, conn: Option<&ConnInfo>) -> Option<String> {
        let leaf = conn?.peer_certs.as_ref()?.first()?;
        ephemera_pki::serial_of(leaf)
            .ok()
            .and_then(|s| svid_lease_id(&s))
    }

    async fn authenticate_svid(
        &self,
        certs: &[rustls::pki_types::CertificateDer<'static>],
    ) -> Result<Principal, Error> {
        let Some(tls) = &self.tls else {
            return Err(Error::Unauthenticated(
                "this node does not accept client certificates".into(),
            ));
        };
        match self.verify_svid_cached(tls, certs) {
            Ok(id) if self.svid_revoked(&certs[0]) => {
                Metrics::inc(&self.metrics.auth_failures, 1);
                let reason =
                    "client certificate refused: its X.509-SVID has been revoked or has expired"
                        .to_string();
                self.audit_denial(id.to_string(), reason.clone()).await;
                Err(Error::Unauthenticated(reason))
            }
            Ok(id) => {
                let admin = tls.admin_ids.contains(&id.to_string());
                Ok(Principal::svid(id.to_string(), id.trust_domain, admin))
            }
            Err(e) => {
                Metrics::inc(&self.metrics.auth_failures, 1);
                let presented = ephemera_pki::spiffe_id_of(&certs[0])
                    .map(|id| id.to_string())
                    .unwrap_or_else(|_| "a certificate without a valid SPIFFE ID".into());
                let reason = format!("client certificate refused: {e}");
                self.audit_denial(presented, reason.clone()).await;
                Err(Error::Unauthenticated(reason))
            }
        }
    }

    /// The chain check of `verify_svid`, remembered per leaf certificate for a short while.
    fn verify_svid_cached(
        &self,
        tls: &NodeTls,
        certs: &[rustls::pki_types::CertificateDer<'static>],
    ) -> Result<ephemera_pki::SpiffeId, ephemera_pki::PkiError> {
        let now_ms = self.clock.now_ms();
        let leaf = certs[0].as_ref();
        if let Some((id, until)) = self
            .verified_svids
            .lock()
            .expect("svid cache lock")
            .get(leaf)
        {
            if now_ms < *until {
                return Ok(id.clone());
            }
        }
        let now = rustls::pki_types::UnixTime::since_unix_epoch(Duration::from_millis(now_ms));
        let id = tls
            .bundles
            .verify_svid(certs, ephemera_pki::Usage::Client, now)?;
        let not_after_ms = ephemera_pki::not_after_unix_s(&certs[0])?.saturating_mul(1000);
        let mut cache = self.verified_svids.lock().expect("svid cache lock");
        if cache.len() >= SVID_VERIFICATION_CACHE_ENTRIES {
            cache.clear();
        }
        cache.insert(
            leaf.to_vec(),
            (
                id.clone(),
                not_after_ms.min(now_ms + SVID_VERIFICATION_CACHE_MS),
            ),
        );
        Ok(id)
    }

    async fn authenticate_assertion(&self, token: &str) -> Result<Principal, Error> {
        if self.oidc.is_empty() {
            Metrics::inc(&self.metrics.auth_failures, 1);
            return Err(Error::Unauthenticated("invalid credential".into()));
        }
        let verified = match self.oidc.verify(token, self.clock.now_ms() / 1000).await {
            Ok(v) => v,
            Err(e) => {
                Metrics::inc(&self.metrics.auth_failures, 1);
                self.audit_denial("a JWT assertion".into(), e.to_string())
                    .await;
                return Err(e);
            }
        };
        if let Some((jti, exp_s)) = verified.jti {
            // Consumed through Raft, so a replay is refused on every node.
            self.propose(Proposal {
                actor: verified.principal.clone(),
                intent: Intent::ConsumeAssertion {
                    issuer: verified.principal.issuer.clone().unwrap_or_default(),
                    jti,
                    expires_at_ms: exp_s.saturating_mul(1000),
                },
            })
            .await?;
        }
        Ok(verified.principal)
    }

    /// Takes a slot of the node's refusal-audit rate limit: `None` when the refusal is only
    /// counted, else a note on how many earlier refusals went unrecorded (for its record).
    fn refusal_audit_slot(&self) -> Option<String> {
        use std::sync::atomic::Ordering;
        if self.denial_audits.check().is_err() {
            self.denials_unrecorded.fetch_add(1, Ordering::Relaxed);
            Metrics::inc(&self.metrics.denials_unaudited, 1);
            return None;
        }
        Some(match self.denials_unrecorded.swap(0, Ordering::Relaxed) {
            0 => String::new(),
            skipped => {
                format!(" ({skipped} earlier refusals on this node were not recorded: rate limit)")
            }
        })
    }

    /// Records a refused authentication. The refusal stands whether or not the record lands.
    async fn audit_denial(&self, presented: String, mut reason: String) {
        let Some(note) = self.refusal_audit_slot() else {
            return;
        };
        reason.push_str(&note);
        let audit = self.propose(Proposal {
            actor: Principal::unauthenticated(AuthMethod::X509Svid),
            intent: Intent::RecordDenial { presented, reason },
        });
        if let Err(Error::Unavailable(e) | Error::OutcomeUnknown(e)) = audit.await {
            tracing::warn!(error = %e, "could not audit a refused authentication");
        }
    }

    /// Records a policy refusal (under the rate limit unless `always`). The refusal stands
    /// whether or not the record lands; the outcome is the record's, when it landed.
    pub(crate) async fn audit_refusal(
        &self,
        actor: Principal,
        mut denial: ephemera_core::command::PolicyDenial,
        always: bool,
    ) -> Option<Outcome> {
        if !always {
            denial.reason.push_str(&self.refusal_audit_slot()?);
        }
        // Keep the record within the log's limits rather than lose it.
        let max = ephemera_core::command::MAX_PURPOSE_LEN;
        if denial.reason.len() > max {
            let mut cut = max - 3;
            while !denial.reason.is_char_boundary(cut) {
                cut -= 1;
            }
            denial.reason.truncate(cut);
            denial.reason.push_str("...");
        }
        denial
            .determining
            .truncate(ephemera_core::command::MAX_SCOPES);
        match self
            .propose(Proposal {
                actor,
                intent: Intent::PolicyDenied(denial),
            })
            .await
        {
            Ok((outcome, _)) => Some(outcome),
            Err(e) => {
                tracing::warn!(error = %e, "could not audit a policy refusal");
                None
            }
        }
    }

    /// Whether a certificate is an X.509-SVID this cluster issued whose lease is no longer
    /// active. (Certificates issued outside the cluster, like `dev`'s, have no lease.)
    fn svid_revoked(&self, leaf: &rustls::pki_types::CertificateDer<'_>) -> bool {
        let Some(lease_id) = ephemera_pki::serial_of(leaf)
            .ok()
            .and_then(|s| svid_lease_id(&s))
        else {
            return false;
        };
        match state::get_lease(&self.view, &lease_id) {
            Ok(Some(lease)) => !lease.is_active_at(self.clock.now_ms()),
            Ok(None) => false,
            // Fail closed: a certificate we cannot check is not accepted.
            Err(_) => true,
        }
    }

    /// Administrators' identities are never minted by the cluster CA (through a join token or
    /// an SVID request): otherwise one administrator could mint a second and approve their own
    /// policy change.
    pub fn refuse_admin_identity(&self, spiffe_id: &str) -> Result<(), Error> {
        if self
            .tls
            .as_ref()
            .is_some_and(|t| t.admin_ids.contains(spiffe_id))
        {
            return Err(Error::PermissionDenied(format!(
                "{spiffe_id} is an administrator identity; the cluster does not issue those"
            )));
        }
        Ok(())
    }

    /// Seals the cluster CA's key under the KEK for replication.
    pub fn seal_ca_key(&self, key_pem: &str) -> Result<Vec<u8>, Error> {
        let seed = zeroize::Zeroizing::new(
            ephemera_pki::ed25519_seed(key_pem)
                .map_err(|e| Error::InvalidArgument(format!("CA key: {e}")))?,
        );
        let mut nonce = [0u8; ephemera_core::crypto::NONCE_LEN];
        self.entropy.lock().expect("entropy lock").fill(&mut nonce);
        Ok(ephemera_core::crypto::seal_private_key(
            &self.kek,
            ephemera_core::types::CLUSTER_CA_KEY_ID,
            &seed,
            nonce,
        ))
    }

    pub fn tls_trust_domain(&self) -> Option<&str> {
        self.tls.as_ref().map(|t| t.trust_domain.as_str())
    }

    /// Guards a read. A break-glass read is recorded in the audit chain first; that committed
    /// write, applied here, also serves as the read barrier. Other reads take a plain barrier.
    pub async fn read_access(
        &self,
        principal: &Principal,
        action: &str,
        target: &str,
    ) -> Result<(), Error> {
        if principal.auth_method == AuthMethod::BootstrapAdmin {
            self.propose(Proposal {
                actor: principal.clone(),
                intent: Intent::RecordAccess {
                    action: action.to_string(),
                    target: target.to_string(),
                },
            })
            .await?;
            Ok(())
        } else {
            self.read_barrier().await
        }
    }

    // ---- leadership and routing -----------------------------------------------------------

    pub fn current_leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader
    }

    pub fn is_leader(&self) -> bool {
        let m = self.raft.metrics().borrow().clone();
        m.current_leader == Some(self.id) && m.state == ServerState::Leader
    }

    fn member_info(&self, id: NodeId) -> Option<NodeInfo> {
        self.raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&id)
            .cloned()
    }

    /// The time the leader stamps: its clock, but never behind what is already applied.
    fn stamp_time(&self) -> u64 {
        let applied = state::last_time(&self.view).unwrap_or(0);
        self.clock.now_ms().max(applied)
    }

    /// Proposes on behalf of a caller from any node and waits until this node has applied it.
    pub async fn propose(&self, proposal: Proposal) -> Result<(Outcome, u64), Error> {
        validate_intent(&proposal.intent)?;
        match self.route(Forwarded::Propose(proposal)).await? {
            ForwardReply::Applied { result, log_index } => {
                // Committed, with a known result; this node must apply it before it can sign or
                // serve reads that include it.
                self.wait_applied(log_index).await.map_err(|_| {
                    Error::OutcomeUnknown(
                        "the write was committed but this node has not applied it yet".into(),
                    )
                })?;
                Ok((result?, log_index))
            }
            ForwardReply::MembershipChanged | ForwardReply::NotLeader => {
                Err(internal("unexpected reply to a proposal"))
            }
        }
    }

    /// Sends a call to the leader: executed here if this node leads, otherwise forwarded once.
    /// A forward is retried only when it certainly did not execute (not the leader, or the
    /// connection was refused); any other failure is reported, since the write may have landed.
    pub async fn route(&self, call: Forwarded) -> Result<ForwardReply, Error> {
        let budget = match call {
            // A join returns once the new node has caught up, which takes as long as copying
            // the state to it.
            Forwarded::AddNode { .. } => CATCH_UP_LIMIT + self.request_timeout,
            _ => self.request_timeout,
        };
        let deadline = Instant::now() + budget;
        loop {
            match self.current_leader() {
                Some(leader) if leader == self.id => {
                    match self.execute_as_leader(call.clone()).await {
                        LeaderAttempt::Done(r) => return r,
                        LeaderAttempt::NotLeader => {}
                    }
                }
                Some(leader) => {
                    if let Some(info) = self.member_info(leader) {
                        match self.forward(leader, &info, &call, deadline).await {
                            Ok(Some(reply)) => {
                                Metrics::inc(&self.metrics.forwarded, 1);
                                return reply;
                            }
                            Ok(None) => {}
                            Err(e) => return Err(e),
                        }
                    }
                }
                None => {}
            }
            if Instant::now() >= deadline {
                return Err(Error::Unavailable(
                    "no leader reachable within the request deadline; retry".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `Ok(None)` means "did not execute, try again".
    async fn forward(
        &self,
        leader: NodeId,
        info: &NodeInfo,
        call: &Forwarded,
        deadline: Instant,
    ) -> Result<Option<Result<ForwardReply, Error>>, Error> {
        let mut client = self
            .peers
            .client(leader, &info.cluster_addr)
            .map_err(internal)?;
        let remaining = deadline.saturating_duration_since(Instant::now());
        let req = ForwardRequest {
            proposal: encode(call),
        };
        match tokio::time::timeout(remaining, client.forward(req)).await {
            Err(_) => Err(Error::OutcomeUnknown(
                "the leader did not answer in time".into(),
            )),
            // Only a failure to connect proves the request was never sent.
            Ok(Err(status)) if is_connect_failure(&status) => Ok(None),
            Ok(Err(status)) => Err(Error::OutcomeUnknown(format!(
                "forwarding to the leader failed: {}",
                status.message()
            ))),
            Ok(Ok(resp)) => {
                let reply: Result<ForwardReply, Error> =
                    decode(&resp.into_inner().result).map_err(internal)?;
                match reply {
                    Ok(ForwardReply::NotLeader) => Ok(None),
                    other => Ok(Some(other)),
                }
            }
        }
    }

    /// Executes a call if this node is the leader. Used for local calls and for forwarded ones
    /// (which are never forwarded again: the hop budget is one).
    pub async fn handle_forwarded(&self, call: Forwarded) -> Result<ForwardReply, Error> {
        match self.execute_as_leader(call).await {
            LeaderAttempt::Done(r) => r,
            LeaderAttempt::NotLeader => Ok(ForwardReply::NotLeader),
        }
    }

    async fn execute_as_leader(&self, call: Forwarded) -> LeaderAttempt {
        match call {
            Forwarded::Propose(p) => {
                if !self.is_leader() {
                    return LeaderAttempt::NotLeader;
                }
                if let Err(e) = self.leader_guard(&p) {
                    return LeaderAttempt::Done(Err(e));
                }
                let cmd = {
                    let mut entropy = self.entropy.lock().expect("entropy lock");
                    stamp(p, self.stamp_time(), entropy.as_mut(), &self.kek)
                };
                self.write_as_leader(cmd).await
            }
            Forwarded::AddNode { id, info } => self.add_node(id, info).await,
            Forwarded::RemoveNode { id } => self.remove_node(id).await,
        }
    }

    async fn write_as_leader(&self, cmd: Command) -> LeaderAttempt {
        match self.raft.client_write(cmd).await {
            Ok(resp) => LeaderAttempt::Done(Ok(ForwardReply::Applied {
                result: resp.data,
                log_index: resp.log_id.index,
            })),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                LeaderAttempt::NotLeader
            }
            // The entry may have been appended before the failure.
            Err(e) => LeaderAttempt::Done(Err(Error::OutcomeUnknown(format!("raft: {e}")))),
        }
    }

    async fn add_node(&self, id: NodeId, info: NodeInfo) -> LeaderAttempt {
        let fail = |e: String| LeaderAttempt::Done(Err(Error::Unavailable(e)));
        if !self.is_leader() {
            return LeaderAttempt::NotLeader;
        }
        // Refuse before touching the membership unless the address answers as node `id`: over
        // mTLS the peer must prove that identity, so a node holding another id's certificate is
        // never added and never receives Raft traffic.
        let probe = async {
            let mut client = self
                .peers
                .client(id, &info.cluster_addr)
                .map_err(|e| e.to_string())?;
            client
                .node_status(NodeStatusRequest {})
                .await
                .map_err(|s| s.message().to_string())
        };
        match tokio::time::timeout(Duration::from_secs(5), probe).await {
            Ok(Ok(r)) if r.get_ref().id == id => {}
            Ok(Ok(r)) => {
                return LeaderAttempt::Done(Err(Error::InvalidArgument(format!(
                    "the node at {} says it is node {}, not {id}",
                    info.cluster_addr,
                    r.get_ref().id
                ))))
            }
            Ok(Err(e)) => {
                return LeaderAttempt::Done(Err(Error::InvalidArgument(format!(
                    "cannot reach node {id} at {} with its expected identity: {e}",
                    info.cluster_addr
                ))))
            }
            Err(_) => {
                return LeaderAttempt::Done(Err(Error::InvalidArgument(format!(
                    "node {id} at {} did not answer within 5 s",
                    info.cluster_addr
                ))))
            }
        }
        // Catch-up (from the log or a snapshot) happens here, before it may vote.
        match tokio::time::timeout(CATCH_UP_LIMIT, self.raft.add_learner(id, info, true)).await {
            Err(_) => {
                return fail(format!(
                    "node {id} did not catch up within {} s",
                    CATCH_UP_LIMIT.as_secs()
                ))
            }
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => {
                return LeaderAttempt::NotLeader
            }
            Ok(Err(e)) => return fail(format!("adding node {id}: {e}")),
            Ok(Ok(_)) => {}
        }
        let mut voters: BTreeSet<NodeId> = self
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect();
        voters.insert(id);
        match self.raft.change_membership(voters, false).await {
            Ok(_) => LeaderAttempt::Done(Ok(ForwardReply::MembershipChanged)),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                LeaderAttempt::NotLeader
            }
            Err(e) => fail(format!("promoting node {id}: {e}")),
        }
    }

    async fn remove_node(&self, id: NodeId) -> LeaderAttempt {
        if !self.is_leader() {
            return LeaderAttempt::NotLeader;
        }
        let membership = self
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .clone();
        if membership.get_node(&id).is_none() {
            return LeaderAttempt::Done(Err(Error::InvalidArgument(format!(
                "node {id} is not a member"
            ))));
        }
        let voters: BTreeSet<NodeId> = membership.voter_ids().filter(|v| *v != id).collect();
        if voters.is_empty() {
            return LeaderAttempt::Done(Err(Error::InvalidArgument(
                "cannot remove the last voter".into(),
            )));
        }
        match self.raft.change_membership(voters, false).await {
            Ok(_) => LeaderAttempt::Done(Ok(ForwardReply::MembershipChanged)),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                LeaderAttempt::NotLeader
            }
            Err(e) => {
                LeaderAttempt::Done(Err(Error::Unavailable(format!("removing node {id}: {e}"))))
            }
        }
    }

    /// Waits until this node has applied `index`.
    pub async fn wait_applied(&self, index: u64) -> Result<(), Error> {
        self.raft
            .wait(Some(self.request_timeout))
            .applied_index_at_least(Some(index), "wait for local apply")
            .await
            .map(|_| ())
            .map_err(|e| Error::Unavailable(format!("this node is behind the leader: {e}")))
    }

    /// Linearizable read barrier: after it returns, this node's state reflects every write that
    /// was acknowledged (by any node) before the barrier started.
    /// Waits until this node has applied everything committed before the call: a
    /// linearizable read follows. Concurrent callers share rounds.
    pub async fn read_barrier(&self) -> Result<(), Error> {
        match self.barriers.get() {
            Some(c) => c
                .next_round()
                .await
                .unwrap_or_else(|| Err(Error::Unavailable("node stopping".into()))),
            None => self.read_barrier_round().await,
        }
    }

    async fn read_barrier_round(&self) -> Result<(), Error> {
        let deadline = Instant::now() + self.request_timeout;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match self.current_leader() {
                Some(leader) if leader == self.id => {
                    match tokio::time::timeout(remaining, self.raft.ensure_linearizable()).await {
                        Ok(Ok(_)) => return Ok(()),
                        Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(_)))) => {}
                        Ok(Err(e)) => return Err(Error::Unavailable(format!("read barrier: {e}"))),
                        Err(_) => return Err(Error::Unavailable("read barrier timed out".into())),
                    }
                }
                Some(leader) => {
                    if let Some(info) = self.member_info(leader) {
                        let mut client = self
                            .peers
                            .client(leader, &info.cluster_addr)
                            .map_err(internal)?;
                        match tokio::time::timeout(
                            remaining,
                            client.read_index(ReadIndexRequest {}),
                        )
                        .await
                        {
                            Ok(Ok(r)) => return self.wait_applied(r.into_inner().index).await,
                            Ok(Err(s)) if s.code() == tonic::Code::Unavailable => {}
                            Ok(Err(s)) => {
                                return Err(Error::Unavailable(format!(
                                    "read barrier: {}",
                                    s.message()
                                )))
                            }
                            Err(_) => {
                                return Err(Error::Unavailable("read barrier timed out".into()))
                            }
                        }
                    }
                }
                None => {}
            }
            if Instant::now() >= deadline {
                return Err(Error::Unavailable(
                    "no leader reachable for a linearizable read".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Leader side of a follower's read barrier (concurrent requests share rounds).
    pub async fn read_index(&self) -> Result<u64, Error> {
        match self.read_indexes.get() {
            Some(c) => c
                .next_round()
                .await
                .unwrap_or_else(|| Err(Error::Unavailable("node stopping".into()))),
            None => self.read_index_round().await,
        }
    }

    async fn read_index_round(&self) -> Result<u64, Error> {
        match tokio::time::timeout(self.request_timeout, self.raft.get_read_log_id()).await {
            Ok(Ok((read_log_id, _applied))) => Ok(read_log_id.map_or(0, |l| l.index)),
            Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(_)))) => {
                Err(Error::Unavailable("not the leader".into()))
            }
            Ok(Err(e)) => Err(Error::Unavailable(format!("read index: {e}"))),
            Err(_) => Err(Error::Unavailable("read index timed out".into())),
        }
    }

    // ---- credentials ----------------------------------------------------------------------

    pub fn issuer(&self) -> Result<String, Error> {
        state::issuer(&self.view)
            .map_err(internal)?
            .ok_or(Error::NotInitialized)
    }

    /// RFC 7662 semantics: `Ok(Some(claims))` for an active token, `Ok(None)` for any token that
    /// is not (unknown key, bad signature, revoked, expired). Malformed input is an error.
    pub async fn introspect(
        &self,
        principal: &Principal,
        caller: &crate::authz::CallerContext,
        token_text: &str,
    ) -> Result<Option<Claims>, Error> {
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
        let Some(key) = state::get_key(&self.view, &parsed.header.kid).map_err(internal)? else {
            return Ok(None);
        };
        if !key.is_published_at(now, KEY_PUBLISH_GRACE_MS)
            || parsed.verify(&key.public_key).is_err()
        {
            return Ok(None);
        }
        if parsed.claims.iss != self.issuer()? {
            return Ok(None);
        }
        let Some(lease) = state::get_lease(&self.view, &parsed.claims.jti).map_err(internal)?
        else {
            return Ok(None);
        };
        let now_s = now / 1000;
        if !lease.is_active_at(now) || parsed.claims.exp <= now_s || parsed.claims.nbf > now_s {
            return Ok(None);
        }
        // Who may learn that a token is active is policy too (a resource server, its holder).
        self.decide_on_lease(
            principal,
            ephemera_policy::Action::Introspect,
            &lease,
            None,
            caller,
        )
        .await?;
        Ok(Some(parsed.claims))
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

    // ---- leader workers -------------------------------------------------------------------

    /// One round of the leader's housekeeping: create a signing key if none is active, and
    /// expire leases whose deadline has passed (reading only the head of the deadline index).
    pub async fn leader_tick(&self) {
        if !self.is_leader() {
            return;
        }
        let bootstrapped = matches!(state::admin_credential_hash(&self.view), Ok(Some(_)));
        if bootstrapped && matches!(state::active_kid(&self.view), Ok(None)) {
            if let Err(e) = self.route_system(Intent::RotateKey).await {
                tracing::warn!(error = %e, "creating a signing key failed");
            }
        }
        // Every cluster has an SSH CA (init creates it); a revoked one is replaced at once, and
        // a cluster initialised before SSH certificates existed gets its first here.
        if bootstrapped && matches!(state::active_ssh_ca(&self.view), Ok(None)) {
            if let Err(e) = self.route_system(Intent::RotateSshCa).await {
                tracing::warn!(error = %e, "creating the SSH CA key failed");
            }
        }
        let mut settled = Vec::new();
        for intent in self.guard.tick(self.clock.now_ms()) {
            if let Intent::GuardEvent(e) = &intent {
                settled.extend(e.identity.clone().filter(|_| e.quarantine));
            }
            if let Err(e) = self.route_system(intent).await {
                tracing::warn!(error = %e, "recording a guardrail event failed");
            }
        }
        self.guard.quarantines_settled(&settled);
        let now = self.stamp_time();
        if let Ok(Some(deadline)) = state::next_deadline(&self.view) {
            if deadline <= now {
                let cmd = Command {
                    now_ms: now,
                    actor: Principal::system(),
                    op: Op::Expire {
                        up_to_ms: now,
                        limit: 10_000,
                    },
                };
                if let LeaderAttempt::Done(Err(e)) = self.write_as_leader(cmd).await {
                    tracing::warn!(error = %e, "expiry round failed");
                }
            }
        }
    }

    /// Measures this node's clock against the leader's (half the round trip is the error bar).
    pub async fn measure_clock_offset(&self) {
        use std::sync::atomic::Ordering;
        if self.is_leader() {
            self.guard.clock_offset_ms.store(0, Ordering::Relaxed);
            return;
        }
        let Some(leader) = self.current_leader() else {
            return;
        };
        let Some(info) = self.member_info(leader) else {
            return;
        };
        let Ok(mut client) = self.peers.client(leader, &info.cluster_addr) else {
            return;
        };
        let sent = self.clock.now_ms();
        let reply = tokio::time::timeout(
            Duration::from_millis(500),
            client.node_status(NodeStatusRequest {}),
        )
        .await;
        let received = self.clock.now_ms();
        if let Ok(Ok(r)) = reply {
            let leader_now = r.into_inner().now_ms;
            if leader_now > 0 && received >= sent {
                let local_mid = (sent + received) / 2;
                let offset = local_mid as i64 - leader_now as i64;
                self.guard.clock_offset_ms.store(offset, Ordering::Relaxed);
            }
        }
    }

    /// Refuses to issue while this node's clock is further from the leader's than the bound:
    /// its tokens' `iat`/`nbf` and its policy decisions' time would be wrong.
    pub fn check_clock(&self) -> Result<(), Error> {
        let offset_ms = self.guard.clock_offset();
        let bound_ms = self.guard.config.max_clock_skew_ms;
        if offset_ms.unsigned_abs() > bound_ms {
            return Err(Error::ClockSkew {
                offset_ms,
                bound_ms,
            });
        }
        Ok(())
    }

    /// The leader's guardrails for one proposal: cluster-wide limits and storm mitigation for
    /// issuance and renewal, and what the anomaly detector learns from it.
    fn leader_guard(&self, p: &Proposal) -> Result<(), Error> {
        // The cluster's own work and the break-glass credential are not workloads to throttle.
        if matches!(
            p.actor.auth_method,
            AuthMethod::System | AuthMethod::BootstrapAdmin
        ) {
            return Ok(());
        }
        let now = self.clock.now_ms();
        let refused = match &p.intent {
            Intent::Issue(i) => {
                let role = state::get_role(&self.view, &i.role).map_err(internal)?;
                self.guard
                    .admit_issue(now, &p.actor, role.as_ref(), &i.request, i.ttl_s)
            }
            Intent::Renew(r) => self
                .guard
                .admit_renewal(now, &self.view, &p.actor, &r.lease_id),
            Intent::PolicyDenied(_) => {
                self.guard.observe_denial(now, &p.actor.id);
                Ok(())
            }
            _ => Ok(()),
        };
        if let Err(e) = &refused {
            Metrics::inc(&self.metrics.guard_refusals, 1);
            if let Some(note) = self.refusal_audit_slot() {
                self.guard.record_refusal(&p.actor.id, format!("{e}{note}"));
            }
        }
        refused
    }

    pub async fn route_system(&self, intent: Intent) -> Result<Outcome, Error> {
        Ok(self
            .propose(Proposal {
                actor: Principal::system(),
                intent,
            })
            .await?
            .0)
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
