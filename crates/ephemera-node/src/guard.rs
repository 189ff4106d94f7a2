//! Guardrails on the request path. Ingress limits run on every node, before authentication and
//! policy work; cluster-wide limits, the renewal-storm detector and the anomaly detector run on
//! the leader, where every write is sequenced, so a limit holds across all nodes. The detectors'
//! arithmetic is pure (`ephemera_core::guard`); this module feeds them and acts on what they say.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

use ephemera_core::command::{GuardEvent, Intent};
use ephemera_core::guard::{
    AnomalyConfig, AnomalyDetector, AnomalyKind, RenewalAdmission, StormConfig, StormDetector,
    StormEvent,
};
use ephemera_core::state;
use ephemera_core::types::{Principal, Role};
use ephemera_core::Error;
use governor::clock::Clock as _;
use governor::Quota;
use serde::{Deserialize, Serialize};

/// `[guard]` in the node configuration. Every node should carry the same values: the leader's
/// apply to cluster-wide limits, each node's to its own ingress.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuardConfig {
    /// Requests per second one source address may send to this node (burst: the same).
    pub ingress_per_ip_per_s: u32,
    /// Requests per second one authenticated identity may send to this node.
    pub ingress_per_identity_per_s: u32,
    /// Issuances per second per identity and role, cluster-wide, for roles that set none.
    pub issue_rate_per_identity: u32,
    /// Issuances per second of the whole cluster.
    pub issue_rate_global: u32,
    /// Anomaly kinds that quarantine the identity (`rate_spike`, `first_seen_role`,
    /// `denial_burst`, `widest_grant`); the others are only recorded.
    pub quarantine_on: Vec<String>,
    /// Also revoke a quarantined identity's live leases.
    pub quarantine_revokes_leases: bool,
    /// A node whose clock is further than this from the leader's stops issuing.
    pub max_clock_skew_ms: u64,
    pub storm: StormConfig,
    pub anomaly: AnomalyConfig,
}

impl Default for GuardConfig {
    fn default() -> Self {
        GuardConfig {
            ingress_per_ip_per_s: 10_000,
            ingress_per_identity_per_s: 5_000,
            issue_rate_per_identity: 1_000,
            issue_rate_global: 50_000,
            quarantine_on: vec!["rate_spike".into()],
            quarantine_revokes_leases: false,
            max_clock_skew_ms: 1000,
            storm: StormConfig::default(),
            anomaly: AnomalyConfig::default(),
        }
    }
}

impl GuardConfig {
    pub fn validate(&self) -> Result<(), String> {
        for (what, v) in [
            ("guard.ingress_per_ip_per_s", self.ingress_per_ip_per_s),
            (
                "guard.ingress_per_identity_per_s",
                self.ingress_per_identity_per_s,
            ),
            (
                "guard.issue_rate_per_identity",
                self.issue_rate_per_identity,
            ),
            ("guard.issue_rate_global", self.issue_rate_global),
        ] {
            if v == 0 {
                return Err(format!("{what} must be at least 1"));
            }
        }
        if let Some(k) = self
            .quarantine_on
            .iter()
            .find(|k| AnomalyKind::parse(k).is_none())
        {
            return Err(format!(
                "guard.quarantine_on: unknown anomaly kind {k:?} (rate_spike, first_seen_role, denial_burst, widest_grant)"
            ));
        }
        if self.storm.bucket_ms == 0 || self.anomaly.bucket_ms == 0 {
            return Err(
                "guard.storm.bucket_ms and guard.anomaly.bucket_ms must be positive".into(),
            );
        }
        Ok(())
    }
}

fn quota(per_s: u32) -> Quota {
    Quota::per_second(NonZeroU32::new(per_s.max(1)).expect("at least 1"))
}

fn limited(limit: String, wait: std::time::Duration) -> Error {
    Error::RateLimited {
        limit,
        retry_after_ms: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1),
    }
}

/// governor's clock on tokio's time: the monotonic clock in production, simulated time under
/// the simulation, where the default clock (the CPU's) would make a limit depend on how fast
/// the machine runs the simulation. Instants are the time since the clock was made.
#[derive(Clone, Copy, Debug)]
pub struct TokioClock {
    start: tokio::time::Instant,
}

impl Default for TokioClock {
    fn default() -> Self {
        TokioClock {
            start: tokio::time::Instant::now(),
        }
    }
}

impl governor::clock::Clock for TokioClock {
    type Instant = std::time::Duration;

    fn now(&self) -> std::time::Duration {
        self.start.elapsed()
    }
}

pub type DirectLimiter = governor::RateLimiter<
    governor::state::NotKeyed,
    governor::state::InMemoryState,
    TokioClock,
    governor::middleware::NoOpMiddleware<std::time::Duration>,
>;
pub type KeyedLimiter<K> = governor::RateLimiter<
    K,
    governor::state::keyed::DefaultKeyedStateStore<K>,
    TokioClock,
    governor::middleware::NoOpMiddleware<std::time::Duration>,
>;

pub fn direct_limiter(quota: Quota, clock: TokioClock) -> DirectLimiter {
    governor::RateLimiter::direct_with_clock(quota, clock)
}

pub fn keyed_limiter<K: std::hash::Hash + Eq + Clone>(
    quota: Quota,
    clock: TokioClock,
) -> KeyedLimiter<K> {
    governor::RateLimiter::new(quota, Default::default(), clock)
}

/// Limiters per role, each with the rate it was built for (rebuilt when a role's limit changes).
type PerRole<L> = Mutex<HashMap<String, (u32, Arc<L>)>>;

fn limiter_for<L>(map: &PerRole<L>, role: &str, rate: u32, build: impl Fn(Quota) -> L) -> Arc<L> {
    let mut map = map.lock().expect("guard lock");
    match map.get(role) {
        Some((built_for, limiter)) if *built_for == rate => limiter.clone(),
        _ => {
            let limiter = Arc::new(build(quota(rate)));
            map.insert(role.to_string(), (rate, limiter.clone()));
            limiter
        }
    }
}

/// What the leader's detectors want written to the log (drained by the leader's tick).
const MAX_PENDING_EVENTS: usize = 1000;

pub struct Guard {
    pub config: GuardConfig,
    clock: TokioClock,
    ingress_ip: KeyedLimiter<IpAddr>,
    ingress_identity: KeyedLimiter<String>,
    /// Per role, keyed by identity.
    issue_per_identity: PerRole<KeyedLimiter<String>>,
    issue_per_role: PerRole<DirectLimiter>,
    issue_global: DirectLimiter,
    storm: Mutex<StormDetector>,
    anomaly: Mutex<AnomalyDetector>,
    pending: Mutex<Vec<GuardEvent>>,
    /// Identities flagged for quarantine whose quarantine is not yet committed: the leader
    /// refuses them meanwhile, so a burst stops at once rather than at the next tick.
    quarantining: Mutex<std::collections::HashSet<String>>,
    /// This node's clock minus the leader's, as last measured (0 on the leader).
    pub clock_offset_ms: std::sync::atomic::AtomicI64,
    /// Anomalies flagged on this node (while it led), by kind.
    anomalies: Mutex<std::collections::BTreeMap<&'static str, u64>>,
}

impl Guard {
    pub fn new(config: GuardConfig, now_ms: u64) -> Self {
        let clock = TokioClock::default();
        Guard {
            clock,
            ingress_ip: keyed_limiter(quota(config.ingress_per_ip_per_s), clock),
            ingress_identity: keyed_limiter(quota(config.ingress_per_identity_per_s), clock),
            issue_per_identity: Mutex::new(HashMap::new()),
            issue_per_role: Mutex::new(HashMap::new()),
            issue_global: direct_limiter(quota(config.issue_rate_global), clock),
            storm: Mutex::new(StormDetector::new(config.storm, now_ms)),
            anomaly: Mutex::new(AnomalyDetector::new(config.anomaly)),
            pending: Mutex::new(Vec::new()),
            quarantining: Mutex::new(std::collections::HashSet::new()),
            clock_offset_ms: std::sync::atomic::AtomicI64::new(0),
            anomalies: Mutex::new(std::collections::BTreeMap::new()),
            config,
        }
    }

    /// Before any authentication work: one source address's share of this node.
    pub fn ingress_source(&self, ip: Option<IpAddr>) -> Result<(), Error> {
        let Some(ip) = ip else { return Ok(()) };
        self.ingress_ip.check_key(&ip).map_err(|not_until| {
            limited(
                format!(
                    "{} requests/s from one address to this node",
                    self.config.ingress_per_ip_per_s
                ),
                not_until.wait_time_from(self.clock.now()),
            )
        })
    }

    /// After authentication: one identity's share of this node.
    pub fn ingress_identity(&self, identity: &str) -> Result<(), Error> {
        self.ingress_identity
            .check_key(&identity.to_string())
            .map_err(|not_until| {
                limited(
                    format!(
                        "{} requests/s from one identity to this node",
                        self.config.ingress_per_identity_per_s
                    ),
                    not_until.wait_time_from(self.clock.now()),
                )
            })
    }

    /// On the leader, before an Issue is stamped: the cluster-wide limits (identity within the
    /// role, the role, the cluster), storm mitigation, and the anomaly detector's view.
    pub fn admit_issue(
        &self,
        now_ms: u64,
        actor: &Principal,
        role: Option<&Role>,
        request: &ephemera_core::kind::KindRequest,
        requested_ttl_s: Option<u64>,
    ) -> Result<(), Error> {
        self.refuse_if_quarantining(&actor.id)?;
        if let Some(role) = role {
            let per_identity = role
                .issue_rate_per_identity
                .unwrap_or(self.config.issue_rate_per_identity);
            let limiter = limiter_for(&self.issue_per_identity, &role.name, per_identity, |q| {
                keyed_limiter(q, self.clock)
            });
            limiter.check_key(&actor.id).map_err(|n| {
                limited(
                    format!(
                        "{per_identity} issuances/s of role {} per identity",
                        role.name
                    ),
                    n.wait_time_from(self.clock.now()),
                )
            })?;
            if let Some(per_role) = role.issue_rate {
                let limiter = limiter_for(&self.issue_per_role, &role.name, per_role, |q| {
                    direct_limiter(q, self.clock)
                });
                limiter.check().map_err(|n| {
                    limited(
                        format!("{per_role} issuances/s of role {}", role.name),
                        n.wait_time_from(self.clock.now()),
                    )
                })?;
            }
        }
        self.issue_global.check().map_err(|n| {
            limited(
                format!(
                    "{} issuances/s in the cluster",
                    self.config.issue_rate_global
                ),
                n.wait_time_from(self.clock.now()),
            )
        })?;
        {
            let mut storm = self.storm.lock().expect("guard lock");
            if !storm.admit_issue(now_ms) {
                return Err(Error::RateLimited {
                    limit: "new issuance is held back during a renewal storm".into(),
                    retry_after_ms: storm.bucket_ends_in_ms(now_ms).max(1),
                });
            }
        }
        if let Some(role) = role {
            let widest = ephemera_core::guard::is_widest_request(request, requested_ttl_s, role);
            let found = self
                .anomaly
                .lock()
                .expect("guard lock")
                .observe_issue(now_ms, &actor.id, &role.name, widest);
            for a in found {
                self.anomaly_found(a);
            }
            self.refuse_if_quarantining(&actor.id)?;
        }
        Ok(())
    }

    fn refuse_if_quarantining(&self, identity: &str) -> Result<(), Error> {
        if self
            .quarantining
            .lock()
            .expect("guard lock")
            .contains(identity)
        {
            return Err(Error::Quarantined(identity.to_string()));
        }
        Ok(())
    }

    /// These identities' quarantines have been written (or failed to be, and were logged):
    /// from now on the replicated state decides.
    pub fn quarantines_settled(&self, identities: &[String]) {
        let mut q = self.quarantining.lock().expect("guard lock");
        for id in identities {
            q.remove(id);
        }
    }

    /// On the leader, before a Renew is stamped: storm mitigation.
    pub fn admit_renewal(
        &self,
        now_ms: u64,
        view: &ephemera_raft::store::StateView,
        actor: &Principal,
        lease_id: &str,
    ) -> Result<(), Error> {
        self.refuse_if_quarantining(&actor.id)?;
        let Ok(Some(lease)) = state::get_lease(view, lease_id) else {
            return Ok(()); // `apply` refuses precisely
        };
        let admission = self.storm.lock().expect("guard lock").admit_renewal(
            now_ms,
            lease.renew_after_ms,
            lease.expires_at_ms,
            lease.expires_at_ms.saturating_sub(lease.minted_at_ms),
        );
        match admission {
            RenewalAdmission::Admit => Ok(()),
            RenewalAdmission::Defer { retry_after_ms } => {
                Err(Error::RenewalDeferred { retry_after_ms })
            }
        }
    }

    /// On the leader: a refusal of `identity` (probing shows as bursts of these).
    pub fn observe_denial(&self, now_ms: u64, identity: &str) {
        let found = self
            .anomaly
            .lock()
            .expect("guard lock")
            .observe_denial(now_ms, identity);
        if let Some(a) = found {
            self.anomaly_found(a);
        }
    }

    fn anomaly_found(&self, a: ephemera_core::guard::Anomaly) {
        let quarantine = self
            .config
            .quarantine_on
            .iter()
            .any(|k| k == a.kind.as_str());
        tracing::warn!(identity = %a.identity, kind = a.kind.as_str(), detail = %a.detail, quarantine, "anomaly");
        *self
            .anomalies
            .lock()
            .expect("guard lock")
            .entry(a.kind.as_str())
            .or_default() += 1;
        if quarantine {
            self.quarantining
                .lock()
                .expect("guard lock")
                .insert(a.identity.clone());
        }
        self.push(GuardEvent {
            kind: a.kind.as_str().to_string(),
            identity: Some(a.identity),
            detail: a.detail,
            quarantine,
            revoke_leases: quarantine && self.config.quarantine_revokes_leases,
        });
    }

    /// Queues the audit record of a refusal by a limit or by storm mitigation (the caller has
    /// taken a slot of the node's refusal-audit rate).
    pub fn record_refusal(&self, identity: &str, detail: String) {
        self.push(GuardEvent {
            kind: "refused".into(),
            identity: Some(identity.to_string()),
            detail,
            quarantine: false,
            revoke_leases: false,
        });
    }

    fn push(&self, event: GuardEvent) {
        let mut pending = self.pending.lock().expect("guard lock");
        if pending.len() < MAX_PENDING_EVENTS {
            pending.push(event);
        }
    }

    /// The leader's periodic work: close detector buckets, and hand back the events to write.
    pub fn tick(&self, now_ms: u64) -> Vec<Intent> {
        for e in self.storm.lock().expect("guard lock").tick(now_ms) {
            let (kind, detail) = match e {
                StormEvent::Started {
                    rate_per_s,
                    baseline_per_s,
                    premature_share,
                    ..
                } => (
                    "storm_started",
                    format!(
                        "{rate_per_s:.0} renewals/s against a baseline of {baseline_per_s:.1}, {:.0}% premature; deferring premature renewals and holding back new issuance",
                        premature_share * 100.0
                    ),
                ),
                StormEvent::Ended {
                    lasted_ms, deferred, ..
                } => (
                    "storm_ended",
                    format!("after {lasted_ms} ms; {deferred} premature renewals deferred"),
                ),
            };
            tracing::warn!(kind, detail = %detail, "renewal storm");
            self.push(GuardEvent {
                kind: kind.into(),
                identity: None,
                detail,
                quarantine: false,
                revoke_leases: false,
            });
        }
        self.ingress_ip.retain_recent();
        self.ingress_identity.retain_recent();
        for (_, limiter) in self.issue_per_identity.lock().expect("guard lock").values() {
            limiter.retain_recent();
        }
        std::mem::take(&mut *self.pending.lock().expect("guard lock"))
            .into_iter()
            .map(Intent::GuardEvent)
            .collect()
    }

    /// Anomalies flagged so far, by kind (for `/metrics`).
    pub fn anomaly_counts(&self) -> Vec<(&'static str, u64)> {
        self.anomalies
            .lock()
            .expect("guard lock")
            .iter()
            .map(|(k, n)| (*k, *n))
            .collect()
    }

    pub fn clock_offset(&self) -> i64 {
        self.clock_offset_ms
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether a renewal storm is being mitigated, and the renewal rate against its baseline.
    pub fn storm_state(&self) -> (bool, f64, f64) {
        let s = self.storm.lock().expect("guard lock");
        let (rate, baseline) = s.rates();
        (s.in_storm(), rate, baseline)
    }
}
