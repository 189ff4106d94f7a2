//! Guardrail arithmetic: the renewal-storm detector and the per-identity anomaly detector.
//! Pure and deterministic: every call takes the time, so tests drive them along synthetic
//! timelines and the leader drives them with its clock.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

/// Exponentially weighted moving average and variance (West's incremental form).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Ewma {
    pub mean: f64,
    pub var: f64,
    /// Observations folded in so far (saturating); a baseline with few is not trusted yet.
    pub samples: u32,
}

impl Ewma {
    pub fn observe(&mut self, x: f64, alpha: f64) {
        if self.samples == 0 {
            self.mean = x;
            self.var = 0.0;
        } else {
            let diff = x - self.mean;
            let incr = alpha * diff;
            self.mean += incr;
            self.var = (1.0 - alpha) * (self.var + diff * incr);
        }
        self.samples = self.samples.saturating_add(1);
    }

    /// How many standard deviations `x` is above the mean (a floor on the deviation keeps a
    /// perfectly regular history from turning any change into an infinite score).
    pub fn z_score(&self, x: f64, min_std: f64) -> f64 {
        (x - self.mean) / self.var.sqrt().max(min_std)
    }
}

// ---- renewal storms ------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StormConfig {
    /// Length of one measurement bucket.
    pub bucket_ms: u64,
    /// Weight of a new bucket in the baseline (0.05 ≈ the last 20 buckets).
    pub baseline_alpha: f64,
    /// Buckets of history before the baseline is trusted.
    pub warmup_buckets: u32,
    /// A storm starts when the renewal rate reaches this multiple of the baseline...
    pub trigger_ratio: f64,
    /// ...or when at least this share of renewals is premature (before `renew_after`)...
    pub premature_share_trigger: f64,
    /// ...and in either case the rate is at least this (a few renewals are never a storm).
    pub min_storm_rate_per_s: f64,
    /// It ends when the rate is back under this multiple of the baseline.
    pub exit_ratio: f64,
    /// During a storm, a renewal of a lease with less than this share of its TTL left goes
    /// first; other premature renewals are deferred.
    pub near_expiry_share: f64,
    /// During a storm, new issuance is held to this share of the pre-storm write rate.
    pub issue_share: f64,
}

impl Default for StormConfig {
    fn default() -> Self {
        StormConfig {
            bucket_ms: 1000,
            baseline_alpha: 0.05,
            warmup_buckets: 10,
            trigger_ratio: 5.0,
            premature_share_trigger: 0.5,
            min_storm_rate_per_s: 20.0,
            exit_ratio: 1.5,
            near_expiry_share: 0.3,
            issue_share: 0.2,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum StormEvent {
    Started {
        at_ms: u64,
        rate_per_s: f64,
        baseline_per_s: f64,
        premature_share: f64,
    },
    Ended {
        at_ms: u64,
        lasted_ms: u64,
        deferred: u64,
    },
}

/// What to do with a renewal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RenewalAdmission {
    Admit,
    /// Come back after this long (the lease's own `renew_after`).
    Defer {
        retry_after_ms: u64,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Bucket {
    start_ms: u64,
    renewals: u64,
    premature: u64,
    issues: u64,
    issues_admitted: u64,
}

/// The leader's renewal-storm detector. Feed it every renewal and issuance it sees, and ask it
/// before executing one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StormDetector {
    cfg: StormConfig,
    bucket: Bucket,
    renew_baseline: Ewma,
    issue_baseline: Ewma,
    storm_since_ms: Option<u64>,
    deferred_in_storm: u64,
    last_rate_per_s: f64,
    last_premature_share: f64,
    /// Events from buckets closed by an observation, until the next `tick` hands them out.
    events: Vec<StormEvent>,
}

impl StormDetector {
    pub fn new(cfg: StormConfig, now_ms: u64) -> Self {
        StormDetector {
            cfg,
            bucket: Bucket {
                start_ms: now_ms,
                ..Default::default()
            },
            renew_baseline: Ewma::default(),
            issue_baseline: Ewma::default(),
            storm_since_ms: None,
            deferred_in_storm: 0,
            last_rate_per_s: 0.0,
            last_premature_share: 0.0,
            events: Vec::new(),
        }
    }

    pub fn in_storm(&self) -> bool {
        self.storm_since_ms.is_some()
    }

    /// Renewals per second over the last closed bucket, and its baseline.
    pub fn rates(&self) -> (f64, f64) {
        (self.last_rate_per_s, self.renew_baseline.mean)
    }

    fn per_s(&self, count: u64) -> f64 {
        count as f64 * 1000.0 / self.cfg.bucket_ms as f64
    }

    /// Closes every bucket that ended by `now_ms` and hands out the events since the last call.
    pub fn tick(&mut self, now_ms: u64) -> Vec<StormEvent> {
        self.roll(now_ms);
        std::mem::take(&mut self.events)
    }

    /// Closes every bucket that ended by `now_ms`, updating the baseline and the storm state.
    /// Every observation rolls first, so a bucket holds exactly its own interval's traffic.
    fn roll(&mut self, now_ms: u64) {
        let mut events = std::mem::take(&mut self.events);
        // After a long idle stretch, account the idle buckets in one step.
        let idle_buckets = now_ms.saturating_sub(self.bucket.start_ms) / self.cfg.bucket_ms;
        if idle_buckets > 1000 {
            self.bucket.start_ms += (idle_buckets - 1000) * self.cfg.bucket_ms;
        }
        while now_ms >= self.bucket.start_ms + self.cfg.bucket_ms {
            let b = std::mem::take(&mut self.bucket);
            self.bucket.start_ms = b.start_ms + self.cfg.bucket_ms;
            let rate = self.per_s(b.renewals);
            let premature_share = if b.renewals == 0 {
                0.0
            } else {
                b.premature as f64 / b.renewals as f64
            };
            self.last_rate_per_s = rate;
            self.last_premature_share = premature_share;
            let end = self.bucket.start_ms;
            let trusted = self.renew_baseline.samples >= self.cfg.warmup_buckets;
            let baseline = self.renew_baseline.mean;
            match self.storm_since_ms {
                None => {
                    let loud = rate >= self.cfg.min_storm_rate_per_s;
                    let spike = trusted && rate >= self.cfg.trigger_ratio * baseline;
                    let premature = premature_share >= self.cfg.premature_share_trigger;
                    if loud && (spike || (trusted && premature)) {
                        self.storm_since_ms = Some(end);
                        self.deferred_in_storm = 0;
                        events.push(StormEvent::Started {
                            at_ms: end,
                            rate_per_s: rate,
                            baseline_per_s: baseline,
                            premature_share,
                        });
                    } else {
                        // The baseline learns only from normal traffic, never from a storm.
                        self.renew_baseline.observe(rate, self.cfg.baseline_alpha);
                        self.issue_baseline
                            .observe(self.per_s(b.issues), self.cfg.baseline_alpha);
                    }
                }
                Some(since) => {
                    // Below the storm floor it is over, premature or not; above it, only
                    // once the rate is near the baseline and renewals are mostly due.
                    let quiet = rate < self.cfg.min_storm_rate_per_s;
                    let normal = rate <= self.cfg.exit_ratio * baseline.max(1.0)
                        && premature_share < self.cfg.premature_share_trigger;
                    if quiet || normal {
                        self.storm_since_ms = None;
                        events.push(StormEvent::Ended {
                            at_ms: end,
                            lasted_ms: end - since,
                            deferred: self.deferred_in_storm,
                        });
                    }
                }
            }
        }
        self.events = events;
    }

    /// Decides a renewal of a lease (`renew_after_ms`, `expires_at_ms`, `ttl_ms` as committed)
    /// and counts it.
    pub fn admit_renewal(
        &mut self,
        now_ms: u64,
        renew_after_ms: u64,
        expires_at_ms: u64,
        ttl_ms: u64,
    ) -> RenewalAdmission {
        self.roll(now_ms);
        let premature = now_ms < renew_after_ms;
        self.bucket.renewals += 1;
        if premature {
            self.bucket.premature += 1;
        }
        if !self.in_storm() || !premature {
            return RenewalAdmission::Admit;
        }
        let left = expires_at_ms.saturating_sub(now_ms) as f64;
        if left < self.cfg.near_expiry_share * ttl_ms as f64 {
            return RenewalAdmission::Admit;
        }
        self.deferred_in_storm += 1;
        RenewalAdmission::Defer {
            retry_after_ms: renew_after_ms - now_ms,
        }
    }

    /// Decides a new issuance and counts it: during a storm, issuance is held to a share of the
    /// pre-storm write rate (at least one per bucket).
    pub fn admit_issue(&mut self, now_ms: u64) -> bool {
        self.roll(now_ms);
        self.bucket.issues += 1;
        if !self.in_storm() {
            self.bucket.issues_admitted += 1;
            return true;
        }
        let normal_writes = self.renew_baseline.mean + self.issue_baseline.mean;
        let allowed = (self.cfg.issue_share * normal_writes * self.cfg.bucket_ms as f64 / 1000.0)
            .floor()
            .max(1.0) as u64;
        if self.bucket.issues_admitted < allowed {
            self.bucket.issues_admitted += 1;
            true
        } else {
            false
        }
    }

    /// When the current bucket ends (a deferred issuance can retry then).
    pub fn bucket_ends_in_ms(&self, now_ms: u64) -> u64 {
        (self.bucket.start_ms + self.cfg.bucket_ms).saturating_sub(now_ms)
    }
}

// ---- anomalies ----------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AnomalyConfig {
    pub bucket_ms: u64,
    pub baseline_alpha: f64,
    /// Buckets of an identity's history before its rate baseline is trusted.
    pub warmup_buckets: u32,
    /// Flag an issuance rate this many deviations above the identity's habit...
    pub rate_z: f64,
    /// ...and at least this many times its mean (and `min_burst` in the bucket).
    pub rate_ratio: f64,
    pub min_burst: u64,
    /// Deviation floor, in issuances per bucket.
    pub min_std: f64,
    /// Refused requests of one identity within one bucket that count as probing.
    pub denial_burst: u64,
    /// Identities tracked at most (the least recently seen are forgotten first).
    pub max_identities: usize,
}

impl Default for AnomalyConfig {
    fn default() -> Self {
        AnomalyConfig {
            bucket_ms: 10_000,
            baseline_alpha: 0.1,
            warmup_buckets: 6,
            rate_z: 6.0,
            rate_ratio: 10.0,
            min_burst: 20,
            min_std: 1.0,
            denial_burst: 20,
            max_identities: 100_000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum AnomalyKind {
    /// Issuance far above the identity's own baseline.
    RateSpike,
    /// An (identity, role) pair never seen before, after the identity has a history.
    FirstSeenRole,
    /// Many refused requests in a short time (probing).
    DenialBurst,
    /// A request for every scope of a role or its maximum TTL, unlike the identity's habit.
    WidestGrant,
}

impl AnomalyKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            AnomalyKind::RateSpike => "rate_spike",
            AnomalyKind::FirstSeenRole => "first_seen_role",
            AnomalyKind::DenialBurst => "denial_burst",
            AnomalyKind::WidestGrant => "widest_grant",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            AnomalyKind::RateSpike,
            AnomalyKind::FirstSeenRole,
            AnomalyKind::DenialBurst,
            AnomalyKind::WidestGrant,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Anomaly {
    pub kind: AnomalyKind,
    pub identity: String,
    pub at_ms: u64,
    pub detail: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct IdentityHistory {
    bucket_start_ms: u64,
    issues_in_bucket: u64,
    denials_in_bucket: u64,
    rate: Ewma,
    roles: BTreeSet<String>,
    issues_total: u64,
    widest_total: u64,
    flagged_in_bucket: BTreeSet<AnomalyKind>,
    last_seen_ms: u64,
}

/// Per-identity behaviour against its own habits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnomalyDetector {
    cfg: AnomalyConfig,
    identities: BTreeMap<String, IdentityHistory>,
    /// Identities by last sighting, oldest first, to bound memory.
    order: VecDeque<(u64, String)>,
}

impl AnomalyDetector {
    pub fn new(cfg: AnomalyConfig) -> Self {
        AnomalyDetector {
            cfg,
            identities: BTreeMap::new(),
            order: VecDeque::new(),
        }
    }

    fn history(&mut self, identity: &str, now_ms: u64) -> &mut IdentityHistory {
        if !self.identities.contains_key(identity) {
            while self.identities.len() >= self.cfg.max_identities {
                match self.order.pop_front() {
                    Some((seen, id)) => {
                        if self
                            .identities
                            .get(&id)
                            .is_some_and(|h| h.last_seen_ms == seen)
                        {
                            self.identities.remove(&id);
                        }
                    }
                    None => break,
                }
            }
            self.identities.insert(
                identity.to_string(),
                IdentityHistory {
                    bucket_start_ms: now_ms - now_ms % self.cfg.bucket_ms,
                    ..Default::default()
                },
            );
        }
        let cfg = self.cfg;
        let h = self.identities.get_mut(identity).expect("inserted above");
        // Close the buckets that ended (idle ones count as zero, at most a few).
        let mut closed = 0;
        while now_ms >= h.bucket_start_ms + cfg.bucket_ms {
            let n = if closed == 0 { h.issues_in_bucket } else { 0 };
            h.rate.observe(n as f64, cfg.baseline_alpha);
            h.issues_in_bucket = 0;
            h.denials_in_bucket = 0;
            h.flagged_in_bucket.clear();
            h.bucket_start_ms += cfg.bucket_ms;
            closed += 1;
            if closed >= 64 {
                h.bucket_start_ms = now_ms - now_ms % cfg.bucket_ms;
            }
        }
        if h.last_seen_ms != now_ms {
            h.last_seen_ms = now_ms;
            self.order.push_back((now_ms, identity.to_string()));
        }
        h
    }

    /// Records an issuance (or a request for one) and returns what is anomalous about it.
    /// `widest` says the request asked for every scope of the role or its maximum TTL.
    pub fn observe_issue(
        &mut self,
        now_ms: u64,
        identity: &str,
        role: &str,
        widest: bool,
    ) -> Vec<Anomaly> {
        let cfg = self.cfg;
        let h = self.history(identity, now_ms);
        let mut found = Vec::new();
        let mut flag = |h: &mut IdentityHistory, kind: AnomalyKind, detail: String| {
            if h.flagged_in_bucket.insert(kind) {
                found.push(Anomaly {
                    kind,
                    identity: identity.to_string(),
                    at_ms: now_ms,
                    detail,
                });
            }
        };
        let experienced = h.issues_total > 0;
        h.issues_in_bucket += 1;
        h.issues_total += 1;
        if h.roles.insert(role.to_string()) && experienced {
            flag(
                h,
                AnomalyKind::FirstSeenRole,
                format!("first request for role {role}"),
            );
        }
        if h.rate.samples >= cfg.warmup_buckets {
            let n = h.issues_in_bucket as f64;
            let z = h.rate.z_score(n, cfg.min_std);
            if h.issues_in_bucket >= cfg.min_burst
                && z >= cfg.rate_z
                && n >= cfg.rate_ratio * h.rate.mean.max(1.0 / cfg.rate_ratio)
            {
                flag(
                    h,
                    AnomalyKind::RateSpike,
                    format!(
                        "{} issuances in {} s against a habit of {:.1} (z = {z:.1})",
                        h.issues_in_bucket,
                        cfg.bucket_ms / 1000,
                        h.rate.mean
                    ),
                );
            }
        }
        if widest {
            // Unusual only for an identity that mostly asks for less.
            let habit = h.widest_total as f64 / h.issues_total.max(1) as f64;
            if h.issues_total >= 10 && habit < 0.1 {
                flag(
                    h,
                    AnomalyKind::WidestGrant,
                    format!("asked for the widest grant of role {role}, unlike its habit"),
                );
            }
            h.widest_total += 1;
        }
        found
    }

    /// Records a refused request (authentication or policy).
    pub fn observe_denial(&mut self, now_ms: u64, identity: &str) -> Option<Anomaly> {
        let cfg = self.cfg;
        let h = self.history(identity, now_ms);
        h.denials_in_bucket += 1;
        if h.denials_in_bucket >= cfg.denial_burst
            && h.flagged_in_bucket.insert(AnomalyKind::DenialBurst)
        {
            return Some(Anomaly {
                kind: AnomalyKind::DenialBurst,
                identity: identity.to_string(),
                at_ms: now_ms,
                detail: format!(
                    "{} refused requests within {} s",
                    h.denials_in_bucket,
                    cfg.bucket_ms / 1000
                ),
            });
        }
        None
    }

    pub fn tracked(&self) -> usize {
        self.identities.len()
    }
}

/// Whether a request asks for the most a role gives: everything it grants (all of a JWT
/// role's scopes, all of an SSH role's principals), or its maximum TTL.
pub fn is_widest_request(
    request: &crate::kind::KindRequest,
    requested_ttl_s: Option<u64>,
    role: &crate::types::Role,
) -> bool {
    let (allowed, asked) = (role.spec.cedar(), role.spec.cedar_request(request));
    let all_of = |allowed: &[String], asked: &[String]| {
        !allowed.is_empty() && allowed.iter().all(|s| asked.contains(s))
    };
    all_of(allowed.scopes, asked.scopes)
        || all_of(allowed.principals, asked.principals)
        || requested_ttl_s == Some(role.max_ttl_s)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_800_000_000_000;

    /// Drives `per_s` renewals per second for `secs` seconds, spread over each second; every
    /// renewal is premature when `premature` (renew_after in the future), else due.
    fn renewals(
        d: &mut StormDetector,
        start_ms: u64,
        secs: u64,
        per_s: u64,
        premature: bool,
        events: &mut Vec<StormEvent>,
    ) -> (u64, u64) {
        let (mut admitted, mut deferred) = (0, 0);
        for s in 0..secs {
            for i in 0..per_s {
                let now = start_ms + s * 1000 + i * 1000 / per_s;
                events.extend(d.tick(now));
                let renew_after = if premature { now + 30_000 } else { now - 1 };
                match d.admit_renewal(now, renew_after, now + 50_000, 100_000) {
                    RenewalAdmission::Admit => admitted += 1,
                    RenewalAdmission::Defer { retry_after_ms } => {
                        assert_eq!(retry_after_ms, 30_000);
                        deferred += 1
                    }
                }
            }
        }
        events.extend(d.tick(start_ms + secs * 1000));
        (admitted, deferred)
    }

    #[test]
    fn a_tenfold_renewal_spike_is_a_storm_that_ends_when_the_rate_returns() {
        let mut d = StormDetector::new(StormConfig::default(), T0);
        let mut events = Vec::new();
        // Baseline: 10 due renewals a second for a minute.
        renewals(&mut d, T0, 60, 10, false, &mut events);
        assert!(events.is_empty() && !d.in_storm());
        assert!((d.rates().1 - 10.0).abs() < 0.5);
        // Storm: 10x for 5 s, mostly premature.
        let t = T0 + 60_000;
        let (admitted, deferred) = renewals(&mut d, t, 5, 100, true, &mut events);
        assert!(d.in_storm());
        assert!(
            matches!(events[0], StormEvent::Started { .. }),
            "{events:?}"
        );
        // The first bucket is measured before the storm is declared; after it, premature
        // renewals are deferred.
        assert!(deferred >= 350, "deferred {deferred}");
        assert!(admitted >= 100);
        // Renewals near expiry still go through during the storm.
        let now = t + 5_000;
        assert_eq!(
            d.admit_renewal(now, now + 10_000, now + 10_000, 100_000),
            RenewalAdmission::Admit
        );
        // The baseline did not learn from the storm.
        assert!(d.rates().1 < 11.0);
        // Back to normal: the storm ends within a bucket or two.
        renewals(&mut d, t + 5_000, 3, 10, false, &mut events);
        assert!(!d.in_storm());
        match events.last().unwrap() {
            StormEvent::Ended { deferred: n, .. } => assert_eq!(*n, deferred),
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn a_storm_ends_when_the_rate_drops_even_if_what_remains_is_premature() {
        let mut d = StormDetector::new(StormConfig::default(), T0);
        let mut events = Vec::new();
        renewals(&mut d, T0, 30, 10, false, &mut events);
        renewals(&mut d, T0 + 30_000, 3, 150, true, &mut events);
        assert!(d.in_storm());
        renewals(&mut d, T0 + 33_000, 3, 4, true, &mut events);
        assert!(!d.in_storm(), "{events:?}");
    }

    #[test]
    fn slow_growth_and_small_numbers_are_not_storms() {
        let mut d = StormDetector::new(StormConfig::default(), T0);
        let mut events = Vec::new();
        // A fleet that grows steadily moves its baseline along.
        for step in 0..20 {
            renewals(
                &mut d,
                T0 + step * 10_000,
                10,
                10 + step,
                false,
                &mut events,
            );
        }
        assert!(events.is_empty(), "{events:?}");
        // Premature renewals at a trickle are not a storm either.
        let mut quiet = StormDetector::new(StormConfig::default(), T0);
        renewals(&mut quiet, T0, 30, 1, false, &mut events);
        renewals(&mut quiet, T0 + 30_000, 10, 5, true, &mut events);
        assert!(events.is_empty() && !quiet.in_storm());
    }

    #[test]
    fn issuance_is_held_to_a_share_during_a_storm() {
        let mut d = StormDetector::new(StormConfig::default(), T0);
        let mut events = Vec::new();
        renewals(&mut d, T0, 30, 10, false, &mut events);
        assert!((0..50).all(|_| d.admit_issue(T0 + 30_000)));
        renewals(&mut d, T0 + 30_000, 2, 200, true, &mut events);
        assert!(d.in_storm());
        // 20% of the normal ~10 writes/s: two issuances in this bucket.
        let admitted = (0..50).filter(|_| d.admit_issue(T0 + 32_000)).count();
        assert_eq!(admitted, 2);
        assert!(d.bucket_ends_in_ms(T0 + 32_000) <= 1000);
    }

    #[test]
    fn a_twentyfold_jump_in_an_identitys_issuance_is_flagged_once_per_bucket() {
        let mut a = AnomalyDetector::new(AnomalyConfig::default());
        let mut found = Vec::new();
        // Habit: 2 issuances every 10 s, for 10 minutes.
        for b in 0..60u64 {
            for i in 0..2 {
                found.extend(a.observe_issue(T0 + b * 10_000 + i * 1000, "ci", "build", false));
            }
        }
        assert!(found.is_empty(), "{found:?}");
        // 40 in the next 10 s.
        let t = T0 + 600_000;
        for i in 0..40 {
            found.extend(a.observe_issue(t + i * 200, "ci", "build", false));
        }
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].kind, AnomalyKind::RateSpike);
        assert_eq!(found[0].identity, "ci");
        // Another identity's habit is its own.
        for i in 0..40 {
            assert!(a
                .observe_issue(t + i * 200, "batch", "build", false)
                .is_empty());
        }
    }

    #[test]
    fn new_roles_widest_grants_and_probing_are_flagged() {
        let mut a = AnomalyDetector::new(AnomalyConfig::default());
        assert!(a.observe_issue(T0, "svc", "read", false).is_empty());
        for i in 1..20 {
            assert!(a
                .observe_issue(T0 + i * 30_000, "svc", "read", false)
                .is_empty());
        }
        let t = T0 + 600_000;
        let found = a.observe_issue(t, "svc", "admin", true);
        let kinds: Vec<AnomalyKind> = found.iter().map(|f| f.kind).collect();
        assert_eq!(
            kinds,
            vec![AnomalyKind::FirstSeenRole, AnomalyKind::WidestGrant]
        );
        let probes: Vec<Anomaly> = (0..25)
            .filter_map(|i| a.observe_denial(t + 1000 + i * 10, "prober"))
            .collect();
        assert_eq!(probes.len(), 1);
        assert_eq!(probes[0].kind, AnomalyKind::DenialBurst);
    }

    #[test]
    fn the_detector_forgets_the_least_recently_seen_identities_first() {
        let mut a = AnomalyDetector::new(AnomalyConfig {
            max_identities: 3,
            ..Default::default()
        });
        for (i, id) in ["a", "b", "c", "a", "d"].iter().enumerate() {
            a.observe_issue(T0 + i as u64, id, "r", false);
        }
        assert_eq!(a.tracked(), 3);
        assert!(a.identities.contains_key("a") && a.identities.contains_key("d"));
        assert!(!a.identities.contains_key("b"));
    }

    #[test]
    fn ewma_tracks_mean_and_spread() {
        let mut e = Ewma::default();
        for i in 0..200 {
            e.observe(if i % 2 == 0 { 9.0 } else { 11.0 }, 0.1);
        }
        assert!((e.mean - 10.0).abs() < 0.2);
        assert!((e.var.sqrt() - 1.0).abs() < 0.2);
        assert!(e.z_score(20.0, 0.5) > 8.0);
    }
}
