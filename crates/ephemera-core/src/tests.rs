//! Table-style tests of the state machine over the in-memory store.

use crate::audit::{ChainError, ChainVerifier};
use crate::command::*;
use crate::crypto::{unseal_private_key, Kek};
use crate::error::Error;
use crate::kind::{jwt, ssh, x509_svid, KindRequest, RoleSpec};
use crate::kv::{KvRead, MemKv, Overlay};
use crate::policy::{PolicyGovernance, PolicyStamp};
use crate::state::{self, LeaseFilter};
use crate::types::*;

/// Deterministic entropy for tests: a counter-based stream.
struct Counter(u64);
impl Entropy for Counter {
    fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            *b = (self.0 >> 33) as u8;
        }
    }
}

struct World {
    kv: MemKv,
    rng: Counter,
    kek: Kek,
    now: u64,
    log: Vec<Command>,
}

const T0: u64 = 1_700_000_000_000;

impl World {
    fn new() -> Self {
        let mut w = World {
            kv: MemKv::default(),
            rng: Counter(1),
            kek: Kek::from_bytes([5; 32]),
            now: T0,
            log: Vec::new(),
        };
        w.propose_ok(Principal::system(), Intent::RotateKey);
        w.put_role("web", 60, 300);
        w
    }

    /// Proposes as the node would: Issue and Renew carry a permitting decision under the active
    /// policy version (`propose_raw` sends the intent as it is).
    fn propose(&mut self, actor: Principal, mut intent: Intent) -> ApplyResult {
        let decided = Some(self.permit(&actor));
        match &mut intent {
            Intent::Issue(i) if i.policy.is_none() => i.policy = decided,
            Intent::Renew(r) if r.policy.is_none() => r.policy = decided,
            Intent::Exchange(x) if x.issue.policy.is_none() => x.issue.policy = decided,
            _ => {}
        }
        self.propose_raw(actor, intent)
    }

    fn permit(&self, actor: &Principal) -> PolicyStamp {
        let id = if actor.auth_method == AuthMethod::BootstrapAdmin {
            PolicyStamp::BREAK_GLASS
        } else {
            "test-permit"
        };
        PolicyStamp {
            version: state::policy_version(&self.kv).unwrap(),
            determining: vec![id.into()],
            scopes: None,
            max_ttl_s: None,
        }
    }

    fn propose_raw(&mut self, actor: Principal, intent: Intent) -> ApplyResult {
        let cmd = stamp(
            Proposal { actor, intent },
            self.now,
            &mut self.rng,
            &self.kek,
        );
        self.log.push(cmd.clone());
        apply_to(&mut self.kv, &cmd)
    }

    fn propose_ok(&mut self, actor: Principal, intent: Intent) -> Outcome {
        self.propose(actor, intent).expect("command succeeds")
    }

    fn admin(&mut self, intent: Intent) -> ApplyResult {
        self.propose(Principal::bootstrap_admin(), intent)
    }

    fn put_role(&mut self, name: &str, ttl: u64, max: u64) {
        self.admin(Intent::PutRole(Role {
            name: name.into(),
            spec: RoleSpec::Jwt(jwt::Spec {
                audience: "api".into(),
                allowed_scopes: vec!["read".into(), "write".into()],
            }),
            default_ttl_s: ttl,
            max_ttl_s: max,
            environment: None,
            target: None,
            revoke_on_renewal_denied: false,
            issue_rate_per_identity: None,
            issue_rate: None,
            max_live_leases_per_identity: None,
            max_live_leases: None,
        }))
        .unwrap();
    }

    fn issue(&mut self, i: IssueIntent) -> Result<Lease, Error> {
        match self.admin(Intent::Issue(i))? {
            Outcome::Lease { lease, .. } => Ok(lease),
            o => panic!("unexpected {o:?}"),
        }
    }

    fn renew(&mut self, id: &str, inc: Option<u64>) -> Result<Lease, Error> {
        match self.admin(Intent::Renew(RenewIntent {
            lease_id: id.into(),
            increment_s: inc,
            context: RequestContext::default(),
            policy: None,
        }))? {
            Outcome::Lease { lease, .. } => Ok(lease),
            o => panic!("unexpected {o:?}"),
        }
    }

    fn lease(&self, id: &str) -> Lease {
        state::get_lease(&self.kv, id).unwrap().unwrap()
    }

    fn leases(&self) -> Vec<Lease> {
        state::list_leases(&self.kv, &LeaseFilter::default(), None, 1000)
            .unwrap()
            .0
    }

    /// Everything but the audit chain and the clock: a refusal is audited (and moves the
    /// state's time), and must change nothing else.
    fn all_but_audit(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.kv
            .range(b"", &[0xff], usize::MAX)
            .unwrap()
            .into_iter()
            .filter(|(k, _)| {
                !k.starts_with(b"audit/")
                    && k.as_slice() != b"meta/audit_head"
                    && k.as_slice() != b"meta/time"
            })
            .collect()
    }
}

impl World {
    /// The leader's expiry round at the current time.
    fn kv_apply_expire(&mut self) {
        let cmd = Command {
            now_ms: self.now,
            actor: Principal::system(),
            op: Op::Expire {
                up_to_ms: self.now,
                limit: 10_000,
            },
        };
        apply_to(&mut self.kv, &cmd).unwrap();
    }
}

fn apply_to(kv: &mut MemKv, cmd: &Command) -> ApplyResult {
    let (res, writes) = {
        let mut ov = Overlay::new(&*kv);
        let res = state::apply(&mut ov, cmd).unwrap();
        (res, ov.into_writes())
    };
    kv.commit(writes);
    res
}

fn jwt_req(scopes: &[&str], audience: Option<&str>) -> KindRequest {
    KindRequest::Jwt(jwt::Request {
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        audience: audience.map(str::to_string),
    })
}

fn web(ttl: Option<u64>) -> IssueIntent {
    IssueIntent {
        request_id: None,
        role: "web".into(),
        subject: Some("spiffe://example.org/web".into()),
        ttl_s: ttl,
        request: jwt_req(&["read"], None),
        join_token_hash: None,
        supersedes: None,
        purpose: Some("ci job 42".into()),
        context: RequestContext::default(),
        policy: None,
    }
}

#[test]
fn issue_defaults_to_role_ttl() {
    let mut w = World::new();
    let l = w.issue(web(None)).unwrap();
    assert_eq!(l.ttl_s, 60);
    assert_eq!(l.expires_at_ms, T0 + 60_000);
    assert_eq!(l.max_expires_at_ms, T0 + 300_000);
    assert_eq!(l.scopes(), ["read"]);
    assert_eq!(l.state, LeaseState::Active);
    assert!(l.renew_after_ms >= T0 + 30_000 && l.renew_after_ms <= T0 + 42_000);
    assert_eq!(state::next_deadline(&w.kv).unwrap(), Some(T0 + 60_000));
}

#[test]
fn retried_issue_with_same_request_id_creates_one_lease() {
    let mut w = World::new();
    let mut i = web(Some(30));
    i.request_id = Some("req-1".into());
    let a = w.issue(i.clone()).unwrap();
    w.now += 1000;
    let b = w.issue(i.clone()).unwrap();
    assert_eq!(a.id, b.id);
    assert_eq!(w.leases().len(), 1);
    // Same id, different parameters: a precise conflict, not a silent second lease.
    i.ttl_s = Some(40);
    assert_eq!(
        w.issue(i).unwrap_err(),
        Error::RequestIdConflict("req-1".into())
    );
    assert_eq!(w.leases().len(), 1);
}

#[test]
fn renew_never_passes_the_cap_nor_shortens() {
    let mut w = World::new();
    let l = w.issue(web(Some(60))).unwrap();
    w.now += 50_000;
    // Increment smaller than what is left: the lease is not shortened.
    let r = w.renew(&l.id, Some(1)).unwrap();
    assert_eq!(r.expires_at_ms, l.expires_at_ms);
    let mut refused_at_cap = false;
    for _ in 0..20 {
        match w.renew(&l.id, Some(120)) {
            Ok(r) => assert!(r.expires_at_ms <= l.max_expires_at_ms),
            Err(e) => {
                assert_eq!(e, Error::LeaseAtMaxLifetime(l.id.clone()));
                refused_at_cap = true;
                break;
            }
        }
        w.now += 50_000;
    }
    assert!(refused_at_cap);
    assert_eq!(w.lease(&l.id).expires_at_ms, l.max_expires_at_ms);
}

/// The refusals a receiving node decides before proposing are exactly `apply`'s, and the
/// sampled record of one changes nothing but the audit chain.
#[test]
fn renewal_refusals_decided_before_proposing_agree_with_apply() {
    let mut w = World::new();
    let live = w.issue(web(Some(10))).unwrap();
    let revoked = w.issue(web(Some(10))).unwrap();
    w.admin(Intent::Revoke(RevokeTarget::Lease(revoked.id.clone())))
        .unwrap();
    let stranger = Principal::svid(
        "spiffe://example.org/stranger".into(),
        "example.org".into(),
        false,
    );
    let glass = Principal::bootstrap_admin();
    let unknown = format!("l_{}", "0".repeat(32));
    let renew = |id: &str| {
        Intent::Renew(RenewIntent {
            lease_id: id.into(),
            increment_s: None,
            context: RequestContext::default(),
            policy: None,
        })
    };
    let check = |w: &mut World, id: &str, actor: &Principal, want: Option<&str>| {
        let early = state::renewal_refusal(&w.kv, actor, id, w.now).unwrap();
        assert_eq!(
            early.as_ref().map(|e| e.kind()),
            want,
            "{id} by {}",
            actor.id
        );
        if let Some(early) = early {
            assert_eq!(w.propose(actor.clone(), renew(id)).unwrap_err(), early);
        }
    };
    check(&mut w, &live.id, &glass, None);
    check(&mut w, &revoked.id, &glass, Some("lease_revoked"));
    check(&mut w, &unknown, &glass, Some("lease_not_found"));
    check(&mut w, &live.id, &stranger, Some("permission_denied"));
    w.now += 11_000;
    check(&mut w, &live.id, &glass, Some("lease_expired"));

    let leases = w.leases();
    let refusal = |error: Error| {
        Intent::RecordRefusal(crate::command::Refusal {
            action: crate::command::RefusedAction::Renew,
            lease_id: Some(revoked.id.clone()),
            error,
            unrecorded: 3,
            context: RequestContext::default(),
        })
    };
    let recorded = w
        .propose_raw(
            stranger.clone(),
            refusal(Error::LeaseRevoked(revoked.id.clone())),
        )
        .unwrap_err();
    assert_eq!(recorded, Error::LeaseRevoked(revoked.id.clone()));
    assert_eq!(w.leases(), leases, "a refusal record changed a lease");
    let records = state::audit_records(&w.kv, 1, 1000).unwrap();
    let last = records.last().unwrap();
    assert_eq!(
        (
            last.action.as_str(),
            last.outcome.as_str(),
            last.reason.as_deref()
        ),
        ("lease.renew", "denied", Some("lease_revoked"))
    );
    assert_eq!(last.role.as_deref(), Some("web"));
    assert_eq!(last.details["unrecorded_refusals"], "3");
    // A node cannot record any error it likes.
    assert!(matches!(
        w.propose_raw(stranger, refusal(Error::Internal("made up".into()))),
        Err(Error::InvalidArgument(_))
    ));
}

/// Retention forgets dead leases (once their credentials have expired too), idempotency
/// records and expired join tokens, in bounded pages, and never a live lease; replaying the log
/// gives the same state.
#[test]
fn compaction_forgets_only_what_retention_allows() {
    use crate::command::Retention;
    let mut w = World::new();
    let retention = Retention {
        dead_lease_s: 60,
        request_s: 60,
        join_token_s: 60,
        assertion_s: 60,
        proposal_s: 60,
    };
    let compact = |w: &mut World, limit: u32| {
        let cmd = Command {
            now_ms: w.now,
            actor: Principal::system(),
            op: Op::Compact { retention, limit },
        };
        w.log.push(cmd.clone());
        match apply_to(&mut w.kv, &cmd).unwrap() {
            Outcome::Compacted { count } => count,
            o => panic!("{o:?}"),
        }
    };
    let mut with_request = web(Some(10));
    with_request.request_id = Some("job-1".into());
    let requested = w.issue(with_request.clone()).unwrap();
    let dead: Vec<Lease> = (0..5).map(|_| w.issue(web(Some(10))).unwrap()).collect();
    let live = w.issue(web(Some(300))).unwrap();
    for l in dead.iter().chain([&requested]) {
        w.admin(Intent::Revoke(RevokeTarget::Lease(l.id.clone())))
            .unwrap();
    }
    w.admin(Intent::CreateJoinToken {
        token_hash: vec![3; 32],
        spiffe_id: "spiffe://example.org/joiner".into(),
        ttl_s: 10,
    })
    .unwrap();
    // Revoked, but their credentials are still valid: nothing may go yet.
    w.now += 30_000;
    assert!(!state::compaction_due(&w.kv, w.now, &retention).unwrap());
    assert_eq!(compact(&mut w, 100), 0);
    // Retention after the credentials expired: everything dead goes, in pages.
    w.now += 61_000;
    assert!(state::compaction_due(&w.kv, w.now, &retention).unwrap());
    assert_eq!(compact(&mut w, 4), 4);
    let rest = compact(&mut w, 100);
    assert_eq!(
        rest,
        6 + 6 + 1 + 1 - 4,
        "6 leases, their 6 revocation-log entries, 1 request record, 1 join token"
    );
    assert!(!state::compaction_due(&w.kv, w.now, &retention).unwrap());
    for l in dead.iter().chain([&requested]) {
        assert!(
            state::get_lease(&w.kv, &l.id).unwrap().is_none(),
            "{} kept",
            l.id
        );
    }
    assert_eq!(w.lease(&live.id), live, "a live lease was touched");
    let listed = state::list_leases(
        &w.kv,
        &LeaseFilter {
            subject: Some("spiffe://example.org/web".into()),
            ..Default::default()
        },
        None,
        100,
    )
    .unwrap()
    .0;
    assert_eq!(listed.iter().map(|l| &l.id).collect::<Vec<_>>(), [&live.id]);
    // The request record went with them: the same request id now issues afresh.
    let again = w.issue(with_request).unwrap();
    assert_ne!(again.id, requested.id);
    assert!(state::join_token(&w.kv, &[3; 32]).unwrap().is_none());
    // The audit chain keeps every record, the compaction's included.
    let records = state::audit_records(&w.kv, 1, 10_000).unwrap();
    let compactions: Vec<Option<u64>> = records
        .iter()
        .filter(|r| r.action == "state.compact")
        .map(|r| r.count)
        .collect();
    assert_eq!(compactions, [Some(0), Some(4), Some(10)]);
    let mut replayed = MemKv::default();
    for c in &w.log {
        apply_to(&mut replayed, c).ok();
    }
    assert_eq!(
        state::state_digest(&replayed).unwrap(),
        state::state_digest(&w.kv).unwrap()
    );
}

#[test]
fn renew_refused_after_revoke_and_after_expiry() {
    let mut w = World::new();
    let a = w.issue(web(Some(10))).unwrap();
    let b = w.issue(web(Some(10))).unwrap();
    w.admin(Intent::Revoke(RevokeTarget::Lease(a.id.clone())))
        .unwrap();
    assert_eq!(
        w.renew(&a.id, None).unwrap_err(),
        Error::LeaseRevoked(a.id.clone())
    );
    w.now += 10_000;
    // Past the deadline but before the leader's Expire entry: still refused.
    assert_eq!(
        w.renew(&b.id, None).unwrap_err(),
        Error::LeaseExpired(b.id.clone())
    );
    let out = w.propose_ok(
        Principal::system(),
        Intent::RecordAccess {
            action: "x".into(),
            target: String::new(),
        },
    );
    assert_eq!(out, Outcome::Done);
    let cmd = Command {
        now_ms: w.now,
        actor: Principal::system(),
        op: Op::Expire {
            up_to_ms: w.now,
            limit: 100,
        },
    };
    assert_eq!(
        apply_to(&mut w.kv, &cmd).unwrap(),
        Outcome::Expired { count: 1 }
    );
    assert!(matches!(w.lease(&b.id).state, LeaseState::Expired { .. }));
    assert_eq!(
        w.renew(&b.id, None).unwrap_err(),
        Error::LeaseExpired(b.id.clone())
    );
    assert_eq!(
        w.renew("l_nope", None).unwrap_err(),
        Error::LeaseNotFound("l_nope".into())
    );
    assert_eq!(state::next_deadline(&w.kv).unwrap(), None);
}

#[test]
fn revoke_by_role_over_10k_leases_is_one_command() {
    let mut w = World::new();
    w.put_role("other", 60, 300);
    for _ in 0..10_000 {
        w.issue(web(Some(60))).unwrap();
    }
    let keep = w
        .issue(IssueIntent {
            role: "other".into(),
            ..web(None)
        })
        .unwrap();
    let log_len = w.log.len();
    let out = w
        .admin(Intent::Revoke(RevokeTarget::Role("web".into())))
        .unwrap();
    assert_eq!(out, Outcome::Revoked { count: 10_000 });
    assert_eq!(w.log.len(), log_len + 1);
    let (active, _) = state::list_leases(
        &w.kv,
        &LeaseFilter {
            state: Some("active".into()),
            ..Default::default()
        },
        None,
        1000,
    )
    .unwrap();
    assert_eq!(
        active.iter().map(|l| &l.id).collect::<Vec<_>>(),
        vec![&keep.id]
    );
    // Idempotent: a second bulk revoke touches nothing.
    assert_eq!(
        w.admin(Intent::Revoke(RevokeTarget::Role("web".into())))
            .unwrap(),
        Outcome::Revoked { count: 0 }
    );
}

#[test]
fn revoke_by_subject_and_by_key() {
    let mut w = World::new();
    let a = w.issue(web(None)).unwrap();
    let mut other = web(None);
    other.subject = Some("spiffe://example.org/db".into());
    let b = w.issue(other).unwrap();
    let out = w
        .admin(Intent::Revoke(RevokeTarget::Subject(
            "spiffe://example.org/web".into(),
        )))
        .unwrap();
    assert_eq!(out, Outcome::Revoked { count: 1 });
    assert!(!w.lease(&a.id).is_active_at(w.now));
    assert!(w.lease(&b.id).is_active_at(w.now));

    // Rotate, issue under the new key, then revoke the old key: only its lease goes.
    w.propose_ok(Principal::system(), Intent::RotateKey);
    let c = w.issue(web(None)).unwrap();
    assert_ne!(c.kid, b.kid);
    let out = w
        .admin(Intent::Revoke(RevokeTarget::Key(b.kid.clone())))
        .unwrap();
    assert_eq!(out, Outcome::Revoked { count: 1 });
    assert!(!w.lease(&b.id).is_active_at(w.now));
    assert!(w.lease(&c.id).is_active_at(w.now));
    let keys = state::list_keys(&w.kv).unwrap();
    let old = keys.iter().find(|k| k.kid == b.kid).unwrap();
    assert!(!old.is_published_at(w.now, 0));
    assert_eq!(
        w.admin(Intent::Revoke(RevokeTarget::Key("nokey".into())))
            .unwrap_err(),
        Error::KeyNotFound("nokey".into())
    );
}

#[test]
fn rotated_key_stays_published_until_its_tokens_expire() {
    let mut w = World::new();
    let a = w.issue(web(Some(60))).unwrap();
    w.propose_ok(Principal::system(), Intent::RotateKey);
    let old = state::get_key(&w.kv, &a.kid).unwrap().unwrap();
    assert!(matches!(old.state, KeyState::Retiring { .. }));
    assert!(old.is_published_at(a.expires_at_ms, 0));
    assert!(!old.is_published_at(a.expires_at_ms + 1, 0));
    // Renewal moves the lease to the active key.
    let r = w.renew(&a.id, None).unwrap();
    assert_ne!(r.kid, a.kid);
}

#[test]
fn bad_input_is_refused_precisely_and_changes_no_lease_or_role() {
    let mut w = World::new();
    w.issue(web(None)).unwrap();
    let leases = w.leases();
    let roles = state::list_roles(&w.kv).unwrap();
    let cases: Vec<(IssueIntent, Error)> = vec![
        (
            IssueIntent {
                role: "ghost".into(),
                ..web(None)
            },
            Error::UnknownRole("ghost".into()),
        ),
        (
            web(Some(301)),
            Error::TtlAboveCap {
                requested_s: 301,
                max_s: 300,
                role: "web".into(),
            },
        ),
        (
            IssueIntent {
                request: jwt_req(&["admin"], None),
                ..web(None)
            },
            Error::NoScopeGranted {
                requested: "admin".into(),
                role: "web".into(),
            },
        ),
        (
            IssueIntent {
                request: jwt_req(&["read"], Some("other")),
                ..web(None)
            },
            Error::AudienceNotAllowed {
                requested: "other".into(),
                role: "web".into(),
                allowed: "api".into(),
            },
        ),
    ];
    for (intent, want) in cases {
        assert_eq!(w.issue(intent).unwrap_err(), want);
    }
    for bad in [
        IssueIntent {
            role: "bad role".into(),
            ..web(None)
        },
        IssueIntent {
            request: jwt_req(&["a b"], None),
            ..web(None)
        },
        IssueIntent {
            ttl_s: Some(0),
            ..web(None)
        },
        IssueIntent {
            purpose: Some("x".repeat(10_000)),
            ..web(None)
        },
        IssueIntent {
            subject: Some("a\nb".into()),
            ..web(None)
        },
    ] {
        assert!(matches!(
            w.issue(bad).unwrap_err(),
            Error::InvalidArgument(_)
        ));
    }
    assert_eq!(w.leases(), leases);
    assert_eq!(state::list_roles(&w.kv).unwrap(), roles);
    // Denials are audited, by kind and structured fields: no prose generated by `apply` is in
    // the chain, so a reworded message cannot fork the audit head in a rolling upgrade.
    let records = state::audit_records(&w.kv, 1, 1000).unwrap();
    let ttl = records
        .iter()
        .find(|r| r.outcome == "denied" && r.reason.as_deref() == Some("ttl_above_cap"))
        .expect("the TTL refusal is audited");
    assert_eq!(
        ttl.error_fields,
        [("max_s", "300"), ("requested_s", "301"), ("role", "web")]
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .into()
    );
    let json = serde_json::to_string(&records).unwrap();
    assert!(!json.contains("exceeds the maximum TTL"), "{json}");
}

#[test]
fn apply_is_deterministic_and_audit_chain_verifies() {
    let mut w = World::new();
    let mut ids = Vec::new();
    for i in 0..50 {
        let mut intent = web(Some(30 + i));
        intent.request_id = Some(format!("r{}", i % 40));
        if let Ok(l) = w.issue(intent) {
            ids.push(l.id);
        }
        w.now += 700;
    }
    for id in ids.iter().step_by(3) {
        w.renew(id, Some(45)).ok();
    }
    w.admin(Intent::Revoke(RevokeTarget::Lease(ids[1].clone())))
        .unwrap();
    assert!(w.issue(web(Some(100_000))).is_err());

    // Replay the same log into two fresh stores: one entry at a time, and in one batch.
    let mut one = MemKv::default();
    for c in &w.log {
        apply_to(&mut one, c).ok();
    }
    let mut batch = MemKv::default();
    let writes = {
        let mut ov = Overlay::new(&batch);
        for c in &w.log {
            state::apply(&mut ov, c).unwrap().ok();
        }
        ov.into_writes()
    };
    batch.commit(writes);
    let d = state::state_digest(&w.kv).unwrap();
    assert_eq!(state::state_digest(&one).unwrap(), d);
    assert_eq!(state::state_digest(&batch).unwrap(), d);
    assert_eq!(one, w.kv);

    let records = state::audit_records(&w.kv, 1, 10_000).unwrap();
    assert_eq!(records.len(), w.log.len());
    let mut v = ChainVerifier::default();
    for r in &records {
        v.push(r).unwrap();
    }
    assert_eq!(v.head(), state::audit_head(&w.kv).unwrap().1);

    // Tampering anywhere is detected.
    let mut tampered = records.clone();
    tampered[10].ttl_s = Some(999_999);
    let mut v = ChainVerifier::default();
    let err = tampered.iter().try_for_each(|r| v.push(r)).unwrap_err();
    assert_eq!(err, ChainError::BadHash { seq: 11 });
    let mut dropped = records.clone();
    dropped.remove(5);
    let mut v = ChainVerifier::default();
    assert!(dropped.iter().try_for_each(|r| v.push(r)).is_err());
}

#[test]
fn time_never_goes_backwards_across_leaders() {
    let mut w = World::new();
    w.now += 10_000;
    w.issue(web(None)).unwrap();
    // A new leader with a clock behind the last applied time.
    w.now -= 5_000;
    let l = w.issue(web(None)).unwrap();
    assert_eq!(l.issued_at_ms, T0 + 10_000);
    assert_eq!(state::last_time(&w.kv).unwrap(), T0 + 10_000);
}

#[test]
fn no_private_key_in_state_in_the_clear() {
    let w = World::new();
    let keys = state::list_keys(&w.kv).unwrap();
    let seed = unseal_private_key(&w.kek, &keys[0].kid, &keys[0].sealed_private_key).unwrap();
    let signing = ed25519_dalek::SigningKey::from_bytes(&seed);
    assert_eq!(signing.verifying_key().to_bytes(), keys[0].public_key);
    for (k, v) in w.kv.range(b"", &[0xff], usize::MAX).unwrap() {
        assert!(
            !v.windows(32).any(|x| x == &seed[..]),
            "private key in clear at {:?}",
            String::from_utf8_lossy(&k)
        );
    }
    for c in &w.log {
        let bytes = bincode::serialize(c).unwrap();
        assert!(!bytes.windows(32).any(|x| x == &seed[..]));
    }
    assert!(!format!("{keys:?}").contains("sealed"));
}

#[test]
fn bootstrap_only_once() {
    let mut w = World::new();
    let intent = Intent::Bootstrap {
        admin_credential_hash: vec![1; 32],
        issuer: "https://i".into(),
        policy_text: "// v1".into(),
        governance: PolicyGovernance::default(),
    };
    w.propose(Principal::system(), intent.clone()).unwrap();
    assert_eq!(
        w.propose(Principal::system(), intent).unwrap_err(),
        Error::AlreadyInitialized
    );
    assert_eq!(state::issuer(&w.kv).unwrap().as_deref(), Some("https://i"));
}

#[test]
fn list_leases_pages_and_filters() {
    let mut w = World::new();
    let mut all = Vec::new();
    for i in 0..25 {
        let mut intent = web(None);
        intent.subject = Some(format!("s{}", i % 2));
        all.push(w.issue(intent).unwrap().id);
    }
    all.sort();
    let mut got = Vec::new();
    let mut after = None;
    loop {
        let (page, next) =
            state::list_leases(&w.kv, &LeaseFilter::default(), after.as_deref(), 10).unwrap();
        got.extend(page.into_iter().map(|l| l.id));
        match next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    assert_eq!(got, all);
    let (s0, _) = state::list_leases(
        &w.kv,
        &LeaseFilter {
            subject: Some("s0".into()),
            ..Default::default()
        },
        None,
        100,
    )
    .unwrap();
    assert_eq!(s0.len(), 13);
    assert!(s0.iter().all(|l| l.subject == "s0"));
}

#[test]
fn a_workload_issues_and_revokes_only_for_itself() {
    let mut w = World::new();
    let me = Principal::svid(
        "spiffe://example.org/web".into(),
        "example.org".into(),
        false,
    );
    let other = Principal::svid(
        "spiffe://example.org/db".into(),
        "example.org".into(),
        false,
    );
    let own = IssueIntent {
        subject: None,
        ..web(None)
    };
    let lease = match w.propose(me.clone(), Intent::Issue(own.clone())).unwrap() {
        Outcome::Lease { lease, .. } => lease,
        o => panic!("{o:?}"),
    };
    assert_eq!(lease.subject, "spiffe://example.org/web");
    let for_someone_else = IssueIntent {
        subject: Some("spiffe://example.org/db".into()),
        ..own
    };
    assert!(matches!(
        w.propose(me.clone(), Intent::Issue(for_someone_else)),
        Err(Error::PermissionDenied(_))
    ));
    // Roles, bulk revocation and other workloads' leases are out of reach.
    assert!(matches!(
        w.propose(me.clone(), Intent::DeleteRole { name: "web".into() }),
        Err(Error::PermissionDenied(_))
    ));
    assert!(matches!(
        w.propose(me.clone(), Intent::Revoke(RevokeTarget::Role("web".into()))),
        Err(Error::PermissionDenied(_))
    ));
    assert!(matches!(
        w.propose(other, Intent::Revoke(RevokeTarget::Lease(lease.id.clone()))),
        Err(Error::PermissionDenied(_))
    ));
    assert!(w.lease(&lease.id).is_active_at(w.now));
    assert_eq!(
        w.propose(me, Intent::Revoke(RevokeTarget::Lease(lease.id.clone())))
            .unwrap(),
        Outcome::Revoked { count: 1 }
    );
    // A refused authentication is audited as a denial and changes nothing else.
    let before = w.leases();
    let denied = w.propose(
        Principal::unauthenticated(AuthMethod::X509Svid),
        Intent::RecordDenial {
            presented: "spiffe://evil.test/x".into(),
            reason: "untrusted".into(),
        },
    );
    assert!(matches!(denied, Err(Error::Unauthenticated(_))));
    assert_eq!(w.leases(), before);
    let last = state::audit_records(&w.kv, 1, 10_000)
        .unwrap()
        .pop()
        .unwrap();
    assert_eq!(
        (last.action.as_str(), last.outcome.as_str()),
        ("auth.denied", "denied")
    );
    assert_eq!(last.target.as_deref(), Some("spiffe://evil.test/x"));
}

fn svid_request(hash: Option<[u8; 32]>) -> IssueIntent {
    IssueIntent {
        request_id: None,
        role: SVID_ROLE.into(),
        subject: None,
        ttl_s: Some(600),
        purpose: None,
        request: KindRequest::X509Svid(x509_svid::Request {
            public_key_der: vec![0x30, 1, 2],
        }),
        join_token_hash: hash.map(|h| h.to_vec()),
        supersedes: None,
        context: RequestContext::default(),
        policy: None,
    }
}

/// The principal of a workload presenting a join token (the node resolved its SPIFFE ID).
fn joiner(spiffe_id: &str) -> Principal {
    Principal {
        id: spiffe_id.into(),
        auth_method: AuthMethod::JoinToken,
        issuer: Some("td".into()),
        attributes: Default::default(),
        admin: false,
        presented: Default::default(),
    }
}

fn lease_of(r: ApplyResult) -> Result<Lease, Error> {
    match r? {
        Outcome::Lease { lease, .. } => Ok(lease),
        o => panic!("unexpected {o:?}"),
    }
}

#[test]
fn join_tokens_are_single_use_and_expire() {
    let mut w = World::new();
    let h = crate::crypto::hash_secret("t1");
    w.admin(Intent::CreateJoinToken {
        token_hash: h.to_vec(),
        spiffe_id: "spiffe://td/w/1".into(),
        ttl_s: 60,
    })
    .unwrap();
    let redeem = |w: &mut World, who: &str, h: [u8; 32]| {
        lease_of(w.propose(joiner(who), Intent::Issue(svid_request(Some(h)))))
    };
    // No CA yet: SVIDs cannot be issued.
    assert!(matches!(
        redeem(&mut w, "spiffe://td/w/1", h),
        Err(Error::Unavailable(_))
    ));
    w.admin(Intent::SetClusterCa {
        trust_domain: "td".into(),
        cert_pem: "PEM".into(),
        sealed_seed: vec![0; 60],
    })
    .unwrap();
    // Presented as someone else's token: refused, and not consumed.
    assert_eq!(
        redeem(&mut w, "spiffe://td/w/2", h).unwrap_err(),
        Error::PermissionDenied("this join token is for spiffe://td/w/1".into())
    );
    // The failed attempts above did not consume the token (their writes were discarded).
    let lease = redeem(&mut w, "spiffe://td/w/1", h).unwrap();
    assert_eq!(lease.subject, "spiffe://td/w/1");
    assert_eq!(lease.role, SVID_ROLE);
    assert_eq!(lease.kind(), CredentialKind::X509Svid);
    assert_eq!(lease.max_expires_at_ms, lease.expires_at_ms);
    assert_eq!(
        lease.grant,
        crate::kind::Grant::X509Svid(x509_svid::Grant {
            public_key_der: vec![0x30, 1, 2]
        })
    );
    assert_eq!(
        redeem(&mut w, "spiffe://td/w/1", h).unwrap_err(),
        Error::Unauthenticated("join token already used".into())
    );
    assert_eq!(
        redeem(
            &mut w,
            "spiffe://td/w/1",
            crate::crypto::hash_secret("nope")
        )
        .unwrap_err(),
        Error::Unauthenticated("unknown join token".into())
    );
    // A join token bootstraps an SVID and nothing else.
    let h3 = crate::crypto::hash_secret("t3");
    w.admin(Intent::CreateJoinToken {
        token_hash: h3.to_vec(),
        spiffe_id: "spiffe://td/w/3".into(),
        ttl_s: 60,
    })
    .unwrap();
    assert!(matches!(
        w.propose(
            joiner("spiffe://td/w/3"),
            Intent::Issue(IssueIntent {
                join_token_hash: Some(h3.to_vec()),
                subject: None,
                ..web(None)
            })
        ),
        Err(Error::InvalidArgument(_))
    ));
    // Node identities cannot be minted through the API.
    assert!(matches!(
        w.admin(Intent::CreateJoinToken {
            token_hash: vec![9; 32],
            spiffe_id: "spiffe://td/ephemera/node/9".into(),
            ttl_s: 60
        }),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        lease_of(w.admin(Intent::Issue(IssueIntent {
            subject: Some("spiffe://td/ephemera/node/2".into()),
            ..svid_request(None)
        }))),
        Err(Error::InvalidArgument(_))
    ));
    let h2 = crate::crypto::hash_secret("t2");
    w.admin(Intent::CreateJoinToken {
        token_hash: h2.to_vec(),
        spiffe_id: "spiffe://td/w/2".into(),
        ttl_s: 60,
    })
    .unwrap();
    w.now += 60_000;
    assert_eq!(
        redeem(&mut w, "spiffe://td/w/2", h2).unwrap_err(),
        Error::Unauthenticated("join token expired".into())
    );
    // Only the hash is stored; the audit names the identity, never the token.
    let audit = serde_json::to_string(&state::audit_records(&w.kv, 1, 10_000).unwrap()).unwrap();
    assert!(!audit.contains(&hex::encode(h)));
}

#[test]
fn svids_are_rotated_not_renewed_and_go_through_the_pipeline() {
    let mut w = World::new();
    w.admin(Intent::SetClusterCa {
        trust_domain: "td".into(),
        cert_pem: "PEM".into(),
        sealed_seed: vec![0; 60],
    })
    .unwrap();
    let me = Principal::svid("spiffe://td/w/1".into(), "td".into(), false);
    let first = lease_of(w.propose(me.clone(), Intent::Issue(svid_request(None)))).unwrap();
    assert_eq!(first.subject, me.id);
    assert_eq!(
        w.renew(&first.id, None).unwrap_err(),
        Error::NotRenewable {
            lease: first.id.clone(),
            how: "an X.509-SVID is rotated by fetching a new one (`ephemera svid fetch`), not renewed"
                .into()
        }
    );
    // A workload obtains SVIDs only for itself.
    assert!(matches!(
        lease_of(w.propose(
            me.clone(),
            Intent::Issue(IssueIntent {
                subject: Some("spiffe://td/w/9".into()),
                ..svid_request(None)
            })
        )),
        Err(Error::PermissionDenied(_))
    ));
    // Rotation supersedes: the SVID it replaces is revoked in the same entry.
    let second = lease_of(w.propose(
        me.clone(),
        Intent::Issue(IssueIntent {
            supersedes: Some(first.id.clone()),
            ..svid_request(None)
        }),
    ))
    .unwrap();
    assert!(matches!(
        w.lease(&first.id).state,
        LeaseState::Revoked { .. }
    ));
    assert_eq!(w.lease(&second.id).state, LeaseState::Active);
    // Nobody supersedes another identity's SVID.
    let other = Principal::svid("spiffe://td/w/2".into(), "td".into(), false);
    assert!(matches!(
        lease_of(w.propose(
            other.clone(),
            Intent::Issue(IssueIntent {
                supersedes: Some(second.id.clone()),
                ..svid_request(None)
            })
        )),
        Err(Error::PermissionDenied(_))
    ));
    assert_eq!(w.lease(&second.id).state, LeaseState::Active);
    // Not for a principal without a SPIFFE ID, nor outside the CA's trust domain.
    assert!(matches!(
        lease_of(w.admin(Intent::Issue(svid_request(None)))),
        Err(Error::InvalidArgument(_))
    ));
    let e = lease_of(w.admin(Intent::Issue(IssueIntent {
        subject: Some("spiffe://elsewhere/w".into()),
        ..svid_request(None)
    })))
    .unwrap_err();
    assert!(e.to_string().contains("trust domain"), "{e}");
    // TTLs beyond the role's cap are refused precisely, not silently shortened.
    assert_eq!(
        lease_of(w.propose(
            me.clone(),
            Intent::Issue(IssueIntent {
                ttl_s: Some(SVID_MAX_TTL_S + 1),
                ..svid_request(None)
            })
        ))
        .unwrap_err(),
        Error::TtlAboveCap {
            requested_s: SVID_MAX_TTL_S + 1,
            max_s: SVID_MAX_TTL_S,
            role: SVID_ROLE.into()
        }
    );
    // A quarantined identity gets no SVID.
    w.propose_raw(
        Principal::system(),
        Intent::GuardEvent(GuardEvent {
            kind: "rate_spike".into(),
            identity: Some(me.id.clone()),
            detail: "test".into(),
            quarantine: true,
            revoke_leases: false,
        }),
    )
    .unwrap();
    assert_eq!(
        lease_of(w.propose(me.clone(), Intent::Issue(svid_request(None)))).unwrap_err(),
        Error::Quarantined(me.id.clone())
    );
    // The SVID role is a role like any other: its budget applies.
    let mut role = Role::builtin_svid();
    role.max_live_leases_per_identity = Some(1);
    w.admin(Intent::PutRole(role)).unwrap();
    lease_of(w.propose(other.clone(), Intent::Issue(svid_request(None)))).unwrap();
    assert!(matches!(
        lease_of(w.propose(other, Intent::Issue(svid_request(None)))),
        Err(Error::BudgetExceeded { .. })
    ));
    // Only the SVID role issues SVIDs, and it issues nothing else.
    let mut jwt_named_svid = Role::builtin_svid();
    jwt_named_svid.spec = RoleSpec::Jwt(jwt::Spec {
        audience: "a".into(),
        allowed_scopes: vec!["r".into()],
    });
    assert!(matches!(
        w.admin(Intent::PutRole(jwt_named_svid)),
        Err(Error::InvalidArgument(_))
    ));
}

// ---- SSH certificates ----

const SSH_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMwQ0bWm0vAi3C5Jpx5HqRAJdS9X3cZc7tEsbUWeeMwd me@host";

fn ssh_user_role(name: &str) -> Role {
    Role {
        name: name.into(),
        spec: RoleSpec::Ssh(ssh::Spec {
            cert_type: ssh::CertType::User,
            principals: vec!["deploy".into(), "alice".into()],
            host_domains: vec![],
            allow_subdomains: false,
            extensions: vec!["permit-pty".into()],
            critical_options: vec!["force-command".into()],
        }),
        default_ttl_s: 300,
        max_ttl_s: 3600,
        environment: None,
        target: None,
        revoke_on_renewal_denied: false,
        issue_rate_per_identity: None,
        issue_rate: None,
        max_live_leases_per_identity: None,
        max_live_leases: None,
    }
}

fn ssh_sign(role: &str, principals: &[&str]) -> IssueIntent {
    IssueIntent {
        role: role.into(),
        ttl_s: None,
        request: KindRequest::Ssh(ssh::Request {
            public_key: SSH_KEY.into(),
            principals: principals.iter().map(|p| p.to_string()).collect(),
            extensions: None,
            critical_options: Default::default(),
        }),
        ..web(None)
    }
}

fn ssh_grant(l: &Lease) -> &ssh::Grant {
    match &l.grant {
        crate::kind::Grant::Ssh(g) => g,
        g => panic!("not an SSH grant: {g:?}"),
    }
}

fn ssh_world() -> World {
    let mut w = World::new();
    w.propose_ok(Principal::system(), Intent::RotateSshCa);
    w.admin(Intent::PutRole(ssh_user_role("ops"))).unwrap();
    w
}

#[test]
fn ssh_user_certificates_carry_only_what_the_role_allows() {
    let mut w = ssh_world();
    let ca = state::active_ssh_ca(&w.kv).unwrap().unwrap();
    let a = w.issue(ssh_sign("ops", &["alice"])).unwrap();
    let g = ssh_grant(&a);
    assert_eq!(a.kind(), CredentialKind::SshUser);
    assert_eq!(a.kid, ca);
    assert_eq!(g.principals, ["alice"]);
    // Extensions default to the role's; the key keeps no comment.
    assert_eq!(g.extensions, ["permit-pty"]);
    assert_eq!(g.public_key, SSH_KEY.rsplit_once(' ').unwrap().0);
    assert_eq!(g.serial, 1);
    assert!(
        g.key_id.contains(&a.id) && g.key_id.contains(&a.subject),
        "{}",
        g.key_id
    );
    assert_eq!(g.valid_after, (w.now - 60_000) / 1000);
    assert_eq!(g.valid_before, a.expires_at_ms / 1000);
    assert_eq!(a.max_expires_at_ms, a.expires_at_ms);
    // Every principal of the role when none is asked for; serials count up.
    let b = w.issue(ssh_sign("ops", &[])).unwrap();
    assert_eq!(ssh_grant(&b).principals, ["alice", "deploy"]);
    assert_eq!(ssh_grant(&b).serial, 2);

    let leases = w.leases();
    let refused: Vec<(IssueIntent, &str)> = vec![
        (
            ssh_sign("ops", &["bob"]),
            "principal \"bob\" is not allowed",
        ),
        (
            {
                let mut i = ssh_sign("ops", &["alice"]);
                if let KindRequest::Ssh(r) = &mut i.request {
                    r.extensions = Some(vec!["permit-port-forwarding".into()]);
                }
                i
            },
            "extension \"permit-port-forwarding\" is not allowed",
        ),
        (
            {
                let mut i = ssh_sign("ops", &["alice"]);
                if let KindRequest::Ssh(r) = &mut i.request {
                    r.critical_options
                        .insert("source-address".into(), "10.0.0.0/8".into());
                }
                i
            },
            "critical option \"source-address\" is not allowed",
        ),
        (
            IssueIntent {
                ttl_s: Some(7200),
                ..ssh_sign("ops", &["alice"])
            },
            "exceeds the maximum TTL",
        ),
        (
            IssueIntent {
                role: "web".into(),
                ..ssh_sign("ops", &["alice"])
            },
            "role \"web\" issues jwt credentials, but the request is for ssh",
        ),
    ];
    for (intent, want) in refused {
        let e = w.issue(intent).unwrap_err();
        assert!(e.to_string().contains(want), "{e} does not say {want:?}");
    }
    for bad_key in [
        "",
        "ssh-ed25519",
        "ssh-dss AAAA",
        "ssh-ed25519 !!!",
        "ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAIMwQ0bWm0vAi3C5Jpx5HqRAJdS9X3cZc7tEsbUWeeMwd",
    ] {
        let mut i = ssh_sign("ops", &["alice"]);
        if let KindRequest::Ssh(r) = &mut i.request {
            r.public_key = bad_key.into();
        }
        assert!(
            matches!(w.issue(i), Err(Error::InvalidArgument(_))),
            "{bad_key:?} accepted"
        );
    }
    // Nothing was issued by the refusals, and no serial was used up.
    assert_eq!(w.leases(), leases);
    let c = w.issue(ssh_sign("ops", &["deploy"])).unwrap();
    assert_eq!(ssh_grant(&c).serial, 3);
    // A certificate is re-issued, never extended.
    let e = w.renew(&c.id, None).unwrap_err();
    assert!(e.to_string().contains("ssh sign"), "{e}");
    // The audit record names principals and serial.
    let rec = state::audit_records(&w.kv, 1, 10_000)
        .unwrap()
        .into_iter()
        .rfind(|r| r.action == "lease.issue" && r.outcome == "ok")
        .unwrap();
    assert_eq!(
        rec.details.get("principals").map(String::as_str),
        Some("deploy")
    );
    assert_eq!(rec.details.get("serial").map(String::as_str), Some("3"));
    assert_eq!(
        rec.details.get("kind").map(String::as_str),
        Some("ssh-user")
    );
    // A refusal names what was asked for; a revocation names the certificate's serial.
    let refused = state::audit_records(&w.kv, 1, 10_000)
        .unwrap()
        .into_iter()
        .find(|r| r.reason.as_deref() == Some("not_allowed_by_role"))
        .unwrap();
    assert_eq!(
        refused.details.get("principals").map(String::as_str),
        Some("bob")
    );
    assert_eq!(
        refused.error_fields.get("value").map(String::as_str),
        Some("bob")
    );
    w.admin(Intent::Revoke(RevokeTarget::Lease(c.id.clone())))
        .unwrap();
    let rec = state::audit_records(&w.kv, 1, 10_000)
        .unwrap()
        .pop()
        .unwrap();
    assert_eq!(
        (
            rec.action.as_str(),
            rec.details.get("serial").map(String::as_str)
        ),
        ("lease.revoke", Some("3"))
    );
}

#[test]
fn ssh_roles_are_validated_by_their_kind() {
    let mut w = ssh_world();
    let bad = |f: &dyn Fn(&mut ssh::Spec)| {
        let mut r = ssh_user_role("x");
        if let RoleSpec::Ssh(s) = &mut r.spec {
            f(s);
        }
        r
    };
    for (role, want) in [
        (
            bad(&|s| s.extensions.push("permit-everything".into())),
            "unknown extension",
        ),
        (
            bad(&|s| s.critical_options.push("no-such".into())),
            "unknown critical option",
        ),
        (
            bad(&|s| s.host_domains.push("example.internal".into())),
            "host domains belong",
        ),
        (
            bad(&|s| {
                s.cert_type = ssh::CertType::Host;
                s.principals.clear();
                s.extensions.clear();
                s.critical_options.clear();
            }),
            "needs at least one host domain",
        ),
        (
            bad(&|s| s.principals.push("a,b".into())),
            "must not contain ','",
        ),
    ] {
        let e = w.admin(Intent::PutRole(role)).unwrap_err();
        assert!(e.to_string().contains(want), "{e} does not say {want:?}");
    }
    // A role with no principals allows no one.
    w.admin(Intent::PutRole(bad(&|s| s.principals.clear())))
        .unwrap();
    let e = w.issue(ssh_sign("x", &[])).unwrap_err();
    assert!(e.to_string().contains("allows no principal"), "{e}");
}

#[test]
fn ssh_host_certificates_name_hosts_within_the_role_domains() {
    let mut w = ssh_world();
    let host_role = |subdomains: bool| Role {
        spec: RoleSpec::Ssh(ssh::Spec {
            cert_type: ssh::CertType::Host,
            principals: vec![],
            host_domains: vec!["example.internal".into()],
            allow_subdomains: subdomains,
            extensions: vec![],
            critical_options: vec![],
        }),
        ..ssh_user_role("hosts")
    };
    w.admin(Intent::PutRole(host_role(false))).unwrap();
    let e = w
        .issue(ssh_sign("hosts", &["web.example.internal"]))
        .unwrap_err();
    assert!(e.to_string().contains("subdomains not allowed"), "{e}");
    assert!(matches!(
        w.issue(ssh_sign("hosts", &[])),
        Err(Error::InvalidArgument(_))
    ));
    let h = w.issue(ssh_sign("hosts", &["example.internal"])).unwrap();
    assert_eq!(h.kind(), CredentialKind::SshHost);
    w.admin(Intent::PutRole(host_role(true))).unwrap();
    let h = w
        .issue(ssh_sign("hosts", &["web.example.internal"]))
        .unwrap();
    assert_eq!(ssh_grant(&h).principals, ["web.example.internal"]);
    assert!(w
        .issue(ssh_sign("hosts", &["web.example.internal.evil"]))
        .is_err());
}

#[test]
fn the_krl_lists_revoked_certificates_until_they_expire() {
    let mut w = ssh_world();
    let ca_kid = state::active_ssh_ca(&w.kv).unwrap().unwrap();
    let ca = state::get_ssh_ca(&w.kv, &ca_kid).unwrap().unwrap();
    let blob = ssh::ed25519_public_blob(&ca.public_key);
    let a = w.issue(ssh_sign("ops", &["alice"])).unwrap();
    let b = w
        .issue(IssueIntent {
            ttl_s: Some(600),
            ..ssh_sign("ops", &["alice"])
        })
        .unwrap();
    let empty = state::ssh_krl(&w.kv).unwrap();
    assert!(empty.certificates.is_empty() && empty.revoked_keys.is_empty());
    w.admin(Intent::Revoke(RevokeTarget::Lease(b.id.clone())))
        .unwrap();
    w.admin(Intent::Revoke(RevokeTarget::Lease(a.id.clone())))
        .unwrap();
    let krl = state::ssh_krl(&w.kv).unwrap();
    assert_eq!(krl.certificates, vec![(blob.clone(), vec![1, 2])]);
    assert!(krl.version > empty.version);
    // A pure function of the state: the same bytes from the same state, and they decode back.
    let bytes = krl.encode();
    assert_eq!(bytes, state::ssh_krl(&w.kv).unwrap().encode());
    assert_eq!(crate::kind::krl::Krl::decode(&bytes).unwrap(), krl);
    assert_eq!(&bytes[..8], b"SSHKRL\n\0");
    // Past a certificate's valid_before, the expiry round takes it out of the KRL.
    w.now = a.expires_at_ms + 1000;
    assert_eq!(
        state::next_deadline(&w.kv).unwrap(),
        Some((a.expires_at_ms / 1000 + 1) * 1000)
    );
    w.kv_apply_expire();
    let later = state::ssh_krl(&w.kv).unwrap();
    assert_eq!(later.certificates, vec![(blob.clone(), vec![2])]);
    assert!(later.version > krl.version);
    // Retiring the CA (revoking its key) lists the key itself, which revokes all it signed.
    let c = w.issue(ssh_sign("ops", &["alice"])).unwrap();
    let r = w
        .admin(Intent::Revoke(RevokeTarget::Key(ca_kid.clone())))
        .unwrap();
    assert_eq!(r, Outcome::Revoked { count: 1 });
    assert!(matches!(w.lease(&c.id).state, LeaseState::Revoked { .. }));
    let krl = state::ssh_krl(&w.kv).unwrap();
    assert_eq!(krl.revoked_keys, vec![blob]);
    assert!(krl.certificates.is_empty());
    assert!(state::published_ssh_cas(&w.kv).unwrap().is_empty());
    assert!(state::active_ssh_ca(&w.kv).unwrap().is_none());
    let e = w.issue(ssh_sign("ops", &["alice"])).unwrap_err();
    assert!(matches!(e, Error::Unavailable(_)), "{e}");
}

#[test]
fn a_rotated_ssh_ca_stays_published_until_its_certificates_expire() {
    let mut w = ssh_world();
    let old = state::active_ssh_ca(&w.kv).unwrap().unwrap();
    let cert = w.issue(ssh_sign("ops", &["alice"])).unwrap();
    w.propose_ok(Principal::system(), Intent::RotateSshCa);
    let new = state::active_ssh_ca(&w.kv).unwrap().unwrap();
    assert_ne!(old, new);
    let published = |w: &World| -> Vec<String> {
        state::published_ssh_cas(&w.kv)
            .unwrap()
            .into_iter()
            .map(|k| k.kid)
            .collect()
    };
    let mut both = vec![old.clone(), new.clone()];
    both.sort();
    assert_eq!(published(&w), both);
    assert_eq!(w.issue(ssh_sign("ops", &["alice"])).unwrap().kid, new);
    w.now = cert.expires_at_ms + state::KEY_PUBLISH_GRACE_MS + 1;
    w.propose_raw(
        Principal::system(),
        Intent::RecordAccess {
            action: "tick".into(),
            target: String::new(),
        },
    )
    .unwrap();
    assert_eq!(published(&w), vec![new]);
}

#[test]
fn a_store_written_by_the_first_layout_is_read_and_served() {
    let text = include_str!("../tests/fixtures/state-v1.kv");
    let mut kv = MemKv::default();
    for line in text.lines() {
        let (k, v) = line.split_once(' ').unwrap();
        kv.map
            .insert(hex::decode(k).unwrap(), hex::decode(v).unwrap());
    }
    let digest = state::state_digest(&kv).unwrap();
    let leases = state::list_leases(&kv, &LeaseFilter::default(), None, 100)
        .unwrap()
        .0;
    assert_eq!(leases.len(), 3);
    let by_state = |name: &str| leases.iter().filter(|l| l.state.name() == name).count();
    assert_eq!((by_state("active"), by_state("revoked")), (2, 1));
    let jwt = leases
        .iter()
        .find(|l| l.kind() == CredentialKind::Jwt && l.state == LeaseState::Active)
        .unwrap();
    assert_eq!(jwt.scopes(), ["read"]);
    assert_eq!(jwt.audience(), "api");
    assert_eq!(jwt.subject, "spiffe://example.org/web");
    let svid = leases
        .iter()
        .find(|l| l.kind() == CredentialKind::X509Svid)
        .unwrap();
    assert_eq!(svid.subject, "spiffe://td/w/1");
    let web_role = state::get_role(&kv, "web").unwrap().unwrap();
    assert_eq!(
        web_role.spec,
        RoleSpec::Jwt(jwt::Spec {
            audience: "api".into(),
            allowed_scopes: vec!["read".into(), "write".into()]
        })
    );
    // Reading changes nothing; the audit chain written by the old layout still verifies.
    assert_eq!(state::state_digest(&kv).unwrap(), digest);
    let mut v = ChainVerifier::default();
    for r in state::audit_records(&kv, 1, 100_000).unwrap() {
        v.push(&r).unwrap();
    }
    // The new code renews, revokes and issues on top of it.
    let mut w = World {
        kv,
        rng: Counter(77),
        kek: Kek::from_bytes([5; 32]),
        now: T0 + 10_000,
        log: Vec::new(),
    };
    let renewed = w.renew(&jwt.id, Some(30)).unwrap();
    assert_eq!(renewed.renewals, 1);
    assert_eq!(w.lease(&jwt.id), renewed);
    w.admin(Intent::Revoke(RevokeTarget::Lease(svid.id.clone())))
        .unwrap();
    w.issue(web(None)).unwrap();
    assert_eq!(w.leases().len(), 4);
}

// ---- policy: decisions in the log, downscoping, governance ----

fn admin_svid(name: &str) -> Principal {
    Principal::svid(
        format!("spiffe://example.org/admin/{name}"),
        "example.org".into(),
        true,
    )
}

fn workload() -> Principal {
    Principal::svid(
        "spiffe://example.org/web".into(),
        "example.org".into(),
        false,
    )
}

fn bootstrap(w: &mut World, approvals_required: u32) {
    w.propose_raw(
        Principal::system(),
        Intent::Bootstrap {
            admin_credential_hash: vec![1; 32],
            issuer: "https://i".into(),
            policy_text: "// version one".into(),
            governance: PolicyGovernance {
                approvals_required,
                proposal_ttl_s: 3600,
            },
        },
    )
    .unwrap();
}

fn propose_policy(w: &mut World, by: &Principal, text: &str) -> crate::policy::PolicyProposal {
    match w
        .propose(
            by.clone(),
            Intent::ProposePolicy {
                text: text.into(),
                comment: Some("tighten".into()),
            },
        )
        .unwrap()
    {
        Outcome::Proposal(p) => p,
        o => panic!("{o:?}"),
    }
}

fn approve(w: &mut World, by: &Principal, id: &str) -> ApplyResult {
    w.propose(
        by.clone(),
        Intent::ApprovePolicy {
            proposal_id: id.into(),
        },
    )
}

#[test]
fn a_proposal_takes_effect_only_after_another_admin_approves() {
    let mut w = World::new();
    bootstrap(&mut w, 1);
    assert_eq!(state::policy_version(&w.kv).unwrap(), 1);
    let (alice, bob) = (admin_svid("alice"), admin_svid("bob"));
    let p = propose_policy(&mut w, &alice, "// version two");
    assert_eq!(p.status(w.now), "pending");
    assert_eq!(state::policy_version(&w.kv).unwrap(), 1);
    // Self-approval is refused and changes nothing; so is a workload's approval.
    assert_eq!(
        approve(&mut w, &alice, &p.id).unwrap_err(),
        Error::SelfApproval {
            id: p.id.clone(),
            approver: alice.id.clone()
        }
    );
    assert!(matches!(
        approve(&mut w, &workload(), &p.id),
        Err(Error::PermissionDenied(_))
    ));
    assert!(matches!(
        approve(&mut w, &Principal::system(), &p.id),
        Err(Error::PermissionDenied(_))
    ));
    assert_eq!(state::policy_version(&w.kv).unwrap(), 1);
    assert!(state::policy_proposal(&w.kv, &p.id)
        .unwrap()
        .unwrap()
        .approvals
        .is_empty());
    // Another administrator's approval activates it.
    match approve(&mut w, &bob, &p.id).unwrap() {
        Outcome::Proposal(p) => assert_eq!(p.status(w.now), "activated"),
        o => panic!("{o:?}"),
    }
    assert_eq!(state::policy_version(&w.kv).unwrap(), 2);
    let v2 = state::policy_at(&w.kv, 2).unwrap().unwrap();
    assert_eq!(v2.text, "// version two");
    assert_eq!(v2.proposer, alice.id);
    assert_eq!(v2.approvers, vec![bob.id.clone()]);
    assert_eq!(state::policy_history(&w.kv).unwrap().len(), 2);
    assert!(matches!(
        approve(&mut w, &admin_svid("carol"), &p.id),
        Err(Error::ProposalNotPending { .. })
    ));
    // Every step is in the audit chain, with the versions.
    let records = state::audit_records(&w.kv, 1, 1000).unwrap();
    let steps: Vec<(&str, &str, Option<u64>)> = records
        .iter()
        .filter(|r| r.action.starts_with("policy."))
        .map(|r| (r.action.as_str(), r.outcome.as_str(), r.policy_version))
        .collect();
    assert_eq!(
        steps,
        vec![
            ("policy.propose", "ok", None),
            ("policy.approve", "denied", None),
            ("policy.approve", "denied", None),
            ("policy.approve", "denied", None),
            ("policy.approve", "ok", Some(2)),
            ("policy.approve", "denied", None),
        ]
    );
}

/// One person holding an administrator's certificate and the break-glass credential cannot
/// change policy alone: break-glass never approves, and its own proposals need one approval
/// more than an administrator's (its holder may be one of the approvers).
#[test]
fn break_glass_never_counts_toward_separation_of_duties() {
    let mut w = World::new();
    bootstrap(&mut w, 1);
    let (alice, bob) = (admin_svid("alice"), admin_svid("bob"));
    let glass = Principal::bootstrap_admin();
    let p = propose_policy(&mut w, &alice, "// alice alone");
    assert_eq!(
        approve(&mut w, &glass, &p.id).unwrap_err(),
        Error::BreakGlassApproval(p.id.clone())
    );
    assert!(state::policy_proposal(&w.kv, &p.id)
        .unwrap()
        .unwrap()
        .approvals
        .is_empty());
    let q = propose_policy(&mut w, &glass, "// break-glass");
    approve(&mut w, &alice, &q.id).unwrap();
    assert_eq!(
        state::policy_version(&w.kv).unwrap(),
        1,
        "one administrator's approval activated a break-glass proposal"
    );
    match approve(&mut w, &bob, &q.id).unwrap() {
        Outcome::Proposal(q) => assert_eq!(q.status(w.now), "activated"),
        o => panic!("{o:?}"),
    }
    assert_eq!(state::policy_version(&w.kv).unwrap(), 2);
    // With no approvals required there is no separation of duties to count.
    let mut solo = World::new();
    bootstrap(&mut solo, 0);
    propose_policy(&mut solo, &glass, "// emergency");
    assert_eq!(state::policy_version(&solo.kv).unwrap(), 2);
}

#[test]
fn approvals_must_come_from_distinct_admins_before_expiry_on_the_current_version() {
    let mut w = World::new();
    bootstrap(&mut w, 2);
    let (alice, bob, carol) = (admin_svid("alice"), admin_svid("bob"), admin_svid("carol"));
    let p = propose_policy(&mut w, &alice, "// two approvals");
    approve(&mut w, &bob, &p.id).unwrap();
    assert_eq!(
        approve(&mut w, &bob, &p.id).unwrap_err(),
        Error::AlreadyApproved {
            id: p.id.clone(),
            approver: bob.id.clone()
        }
    );
    assert_eq!(state::policy_version(&w.kv).unwrap(), 1);
    approve(&mut w, &carol, &p.id).unwrap();
    assert_eq!(state::policy_version(&w.kv).unwrap(), 2);

    // A proposal written against version 2 cannot activate over version 3.
    let stale = propose_policy(&mut w, &alice, "// stale");
    let fresh = propose_policy(&mut w, &bob, "// fresh");
    approve(&mut w, &alice, &fresh.id).unwrap();
    approve(&mut w, &carol, &fresh.id).unwrap();
    assert_eq!(state::policy_version(&w.kv).unwrap(), 3);
    assert_eq!(
        approve(&mut w, &bob, &stale.id).unwrap_err(),
        Error::ProposalStale {
            id: stale.id.clone(),
            base: 2,
            active: 3
        }
    );

    // Expired proposals cannot be approved; rejected ones neither.
    let late = propose_policy(&mut w, &alice, "// late");
    w.now += 3_600_000;
    assert_eq!(
        approve(&mut w, &bob, &late.id).unwrap_err(),
        Error::ProposalExpired(late.id.clone())
    );
    let rejected = propose_policy(&mut w, &alice, "// rejected");
    w.propose(
        carol.clone(),
        Intent::RejectPolicy {
            proposal_id: rejected.id.clone(),
            reason: "too broad".into(),
        },
    )
    .unwrap();
    assert!(matches!(
        approve(&mut w, &bob, &rejected.id),
        Err(Error::ProposalNotPending { .. })
    ));
    assert_eq!(state::policy_version(&w.kv).unwrap(), 3);
}

#[test]
fn a_request_runs_only_under_the_policy_version_that_decided_it() {
    let mut w = World::new();
    bootstrap(&mut w, 1);
    let own = IssueIntent {
        subject: None,
        ..web(None)
    };
    // No decision at all.
    assert!(matches!(
        w.propose_raw(workload(), Intent::Issue(own.clone())),
        Err(Error::PolicyDenied(_))
    ));
    // A decision of another version.
    let mut stale = w.permit(&workload());
    stale.version = 0;
    assert_eq!(
        w.propose_raw(
            workload(),
            Intent::Issue(IssueIntent {
                policy: Some(stale),
                ..own.clone()
            })
        )
        .unwrap_err(),
        Error::PolicyChanged {
            decided: 0,
            active: 1
        }
    );
    // Only the break-glass credential may carry a break-glass decision.
    let mut forged = w.permit(&workload());
    forged.determining = vec![PolicyStamp::BREAK_GLASS.into()];
    assert!(matches!(
        w.propose_raw(
            workload(),
            Intent::Issue(IssueIntent {
                policy: Some(forged),
                ..own.clone()
            })
        ),
        Err(Error::PolicyDenied(_))
    ));
    assert!(w.leases().is_empty());
    // A current decision issues, and the audit record names the version and the policies.
    w.propose(workload(), Intent::Issue(own)).unwrap();
    let records = state::audit_records(&w.kv, 1, 1000).unwrap();
    let issued = records.iter().rfind(|r| r.action == "lease.issue").unwrap();
    assert_eq!(issued.outcome, "ok");
    assert_eq!(issued.policy_version, Some(1));
    assert_eq!(issued.policy_ids, vec!["test-permit"]);
}

#[test]
fn issued_scopes_and_ttl_are_the_intersection_of_request_role_and_policy() {
    let mut w = World::new();
    let mut decided = w.permit(&workload());
    decided.scopes = Some(vec!["read".into(), "deploy".into()]);
    decided.max_ttl_s = Some(30);
    let lease = match w
        .propose_raw(
            workload(),
            Intent::Issue(IssueIntent {
                subject: None,
                request: jwt_req(&["read", "write", "admin"], None),
                ttl_s: Some(120),
                context: RequestContext {
                    source_ip: Some("10.0.0.7".into()),
                    environment: Some("prod".into()),
                    job_id: Some("run-9".into()),
                },
                policy: Some(decided.clone()),
                ..web(None)
            }),
        )
        .unwrap()
    {
        Outcome::Lease { lease, .. } => lease,
        o => panic!("{o:?}"),
    };
    // "write" is the role's but not the policy's; "admin" neither; "deploy" was not asked for.
    assert_eq!(lease.scopes(), ["read"]);
    assert_eq!(lease.ttl_s, 30);
    assert_eq!(lease.expires_at_ms, w.now + 30_000);
    let records = state::audit_records(&w.kv, 1, 1000).unwrap();
    let rec = records.last().unwrap();
    assert_eq!(rec.context.get("job_id").map(String::as_str), Some("run-9"));
    assert_eq!(
        rec.context.get("source_ip").map(String::as_str),
        Some("10.0.0.7")
    );
    // Renewal extensions are capped by the policy too.
    w.now += 10_000;
    let renewed = match w
        .propose_raw(
            workload(),
            Intent::Renew(RenewIntent {
                lease_id: lease.id.clone(),
                increment_s: Some(200),
                context: RequestContext::default(),
                policy: Some(decided),
            }),
        )
        .unwrap()
    {
        Outcome::Lease { lease, .. } => lease,
        o => panic!("{o:?}"),
    };
    assert_eq!(renewed.expires_at_ms, w.now + 30_000);
}

#[test]
fn a_renewal_refused_by_policy_revokes_the_lease_only_if_its_role_says_so() {
    let mut w = World::new();
    let mut revoking = state::get_role(&w.kv, "web").unwrap().unwrap();
    revoking.name = "strict".into();
    revoking.revoke_on_renewal_denied = true;
    w.admin(Intent::PutRole(revoking)).unwrap();
    let own = |role: &str| IssueIntent {
        subject: None,
        role: role.into(),
        ..web(None)
    };
    let lenient = match w.propose(workload(), Intent::Issue(own("web"))).unwrap() {
        Outcome::Lease { lease, .. } => lease,
        o => panic!("{o:?}"),
    };
    let strict = match w.propose(workload(), Intent::Issue(own("strict"))).unwrap() {
        Outcome::Lease { lease, .. } => lease,
        o => panic!("{o:?}"),
    };
    let denial = |lease: &Lease| {
        Intent::PolicyDenied(PolicyDenial {
            action: "renew".into(),
            role: Some(lease.role.clone()),
            lease_id: Some(lease.id.clone()),
            version: 0,
            determining: vec![],
            reason: "no policy permits this request".into(),
            context: RequestContext::default(),
        })
    };
    // Someone else's refused renewal never revokes a lease.
    let stranger = Principal::svid("spiffe://example.org/x".into(), "example.org".into(), false);
    assert_eq!(w.propose(stranger, denial(&strict)).unwrap(), Outcome::Done);
    assert!(w.lease(&strict.id).is_active_at(w.now));
    assert_eq!(
        w.propose(workload(), denial(&lenient)).unwrap(),
        Outcome::Done
    );
    assert!(w.lease(&lenient.id).is_active_at(w.now));
    assert_eq!(
        w.propose(workload(), denial(&strict)).unwrap(),
        Outcome::Revoked { count: 1 }
    );
    assert!(!w.lease(&strict.id).is_active_at(w.now));
    let records = state::audit_records(&w.kv, 1, 1000).unwrap();
    let last = records.last().unwrap();
    assert_eq!(
        (last.action.as_str(), last.outcome.as_str(), last.count),
        ("policy.denied", "denied", Some(1))
    );
}

/// An audit record whose text is too long is truncated at a character boundary, never dropped.
#[test]
fn over_long_audit_text_is_truncated_not_dropped() {
    let mut intent = Intent::RecordDenial {
        presented: "é".repeat(2000),
        reason: "certificate refused: ".to_string() + &"ü".repeat(3000),
    };
    assert!(validate_intent(&intent).is_err());
    crate::command::fit_audit_text(&mut intent);
    validate_intent(&intent).unwrap();
    let Intent::RecordDenial { presented, reason } = &intent else {
        unreachable!()
    };
    assert!(presented.len() <= crate::command::MAX_SUBJECT_LEN && presented.ends_with("..."));
    assert!(reason.starts_with("certificate refused: ") && reason.ends_with("..."));
    let mut w = World::new();
    assert!(matches!(
        w.propose_raw(Principal::system(), intent),
        Err(Error::Unauthenticated(_))
    ));
    let last = state::audit_records(&w.kv, 1, 1000).unwrap().pop().unwrap();
    assert_eq!(last.action, "auth.denied");
}

#[test]
fn node_certificates_are_issued_by_the_leader_only_with_a_ca_and_bounded_fields() {
    let mut w = World::new();
    let good = state::NodeCertificate {
        node_id: 2,
        public_key_der: vec![0x30, 1, 2],
        dns_names: vec!["localhost".into()],
        ips: vec!["127.0.0.1".into()],
        serial: vec![9; 16],
        not_before_ms: T0 - 60_000,
        not_after_ms: T0 + 86_400_000,
    };
    let issue = |w: &mut World, actor: Principal, cert: &state::NodeCertificate| {
        let cmd = Command {
            now_ms: w.now,
            actor,
            op: Op::IssueNodeCertificate(cert.clone()),
        };
        apply_to(&mut w.kv, &cmd)
    };
    // No CA yet.
    assert!(matches!(
        issue(&mut w, Principal::system(), &good),
        Err(Error::Unavailable(_))
    ));
    w.admin(Intent::SetClusterCa {
        trust_domain: "td".into(),
        cert_pem: "PEM".into(),
        sealed_seed: vec![0; 60],
    })
    .unwrap();
    // Not even an administrator may propose one: only the leader, for a member it checked.
    assert!(matches!(
        issue(&mut w, Principal::bootstrap_admin(), &good),
        Err(Error::PermissionDenied(_))
    ));
    let with = |f: &dyn Fn(&mut state::NodeCertificate)| {
        let mut c = good.clone();
        f(&mut c);
        c
    };
    for (bad, why) in [
        (with(&|c| c.public_key_der.clear()), "public key"),
        (with(&|c| c.public_key_der = vec![0; 4096]), "public key"),
        (
            with(&|c| c.dns_names = vec!["a b".into()]),
            "not a DNS name",
        ),
        (with(&|c| c.dns_names = vec!["x".into(); 17]), "at most 16"),
        (
            with(&|c| c.ips = vec!["300.1.1.1".into()]),
            "not an IP address",
        ),
        (with(&|c| c.serial = vec![1]), "16 bytes"),
        (with(&|c| c.not_after_ms = T0), "expired"),
    ] {
        match issue(&mut w, Principal::system(), &bad) {
            Err(Error::InvalidArgument(m)) => assert!(m.contains(why), "{m} / {why}"),
            other => panic!("{why}: {other:?}"),
        }
        assert_eq!(state::node_certificate(&w.kv, 2).unwrap(), None);
    }
    let head = state::audit_head(&w.kv).unwrap();
    assert_eq!(issue(&mut w, Principal::system(), &good), Ok(Outcome::Done));
    assert_eq!(state::node_certificate(&w.kv, 2).unwrap(), Some(good));
    let rec = state::audit_records(&w.kv, head.0 + 1, 1)
        .unwrap()
        .remove(0);
    assert_eq!(rec.action, "nodecert.issue");
    assert_eq!(rec.subject.as_deref(), Some("spiffe://td/ephemera/node/2"));
    assert_eq!(rec.details["serial"], hex::encode([9; 16]));
}

// ------------------------------------------------------------------------------------------
// External effects (state::effects)
// ------------------------------------------------------------------------------------------

mod effects {
    use super::*;
    use crate::state::effects::{self as fx, EffectAction, EffectStatus, FAILED_AFTER_ATTEMPTS};

    /// Records an effect as the lease logic will: inside an overlay, committed with its entry.
    fn record(w: &mut World, lease: &str, target: &str, action: EffectAction) -> u64 {
        let (seq, writes) = {
            let mut ov = Overlay::new(&w.kv);
            let seq = fx::record(&mut ov, w.now, lease, target, action).unwrap();
            (seq, ov.into_writes())
        };
        w.kv.commit(writes);
        seq
    }

    fn settle(w: &mut World, seq: u64, error: Option<&str>, jitter: u16) -> ApplyResult {
        let e = fx::effect(&w.kv, seq).unwrap().unwrap();
        let cmd = fx::settle_command(&e, error.map(String::from), w.now, jitter);
        apply_to(&mut w.kv, &cmd)
    }

    fn due(w: &World, target: &str) -> Vec<(String, &'static str)> {
        fx::due(&w.kv, target, w.now, 0, 100)
            .unwrap()
            .ready
            .into_iter()
            .map(|e| (e.lease_id, e.action.name()))
            .collect()
    }

    fn pair(lease: &str, action: &'static str) -> (String, &'static str) {
        (lease.to_string(), action)
    }

    #[test]
    fn due_effects_are_read_in_bounded_pages_that_say_when_to_look_again() {
        let mut w = World::new();
        let t = "postgres/orders";
        let until = EffectAction::Create {
            valid_until_ms: w.now + 60_000,
        };
        let a = record(&mut w, "l_a", t, until.clone());
        let b = record(&mut w, "l_b", t, until.clone());
        // An extend behind its lease's pending create waits for it.
        let later = EffectAction::Extend {
            valid_until_ms: w.now + 120_000,
        };
        let b_extend = record(&mut w, "l_b", t, later);
        settle(&mut w, a, Some("connection refused"), 0).unwrap();
        let retry_at = fx::effect(&w.kv, a).unwrap().unwrap().not_before_ms;
        let page = |after: u64| fx::due(&w.kv, t, w.now, after, 1).unwrap();
        let seqs = |p: &fx::DuePage| p.ready.iter().map(|e| e.seq).collect::<Vec<_>>();

        let first = page(0);
        assert_eq!((seqs(&first), first.next_ms), (vec![], Some(retry_at)));
        assert_eq!((first.last_seq, first.more), (Some(a), true));
        let second = page(a);
        assert_eq!((seqs(&second), second.last_seq), (vec![b], Some(b)));
        let third = page(b);
        assert_eq!((seqs(&third), third.last_seq), (vec![], Some(b_extend)));
        let end = page(b_extend);
        assert_eq!(end, fx::DuePage::default());
        // Once the create is done, its extend is the lease's oldest pending effect.
        settle(&mut w, b, None, 0).unwrap();
        assert_eq!(
            seqs(&fx::due(&w.kv, t, w.now, 0, 10).unwrap()),
            vec![b_extend]
        );
    }

    #[test]
    fn a_drop_supersedes_and_is_retried_with_backoff_until_it_is_done() {
        let mut w = World::new();
        let t = "postgres/orders";
        let now = w.now;
        let create = record(
            &mut w,
            "l_a",
            t,
            EffectAction::Create {
                valid_until_ms: now + 60_000,
            },
        );
        assert_eq!(due(&w, t), vec![pair("l_a", "create")]);
        let drop = record(&mut w, "l_a", t, EffectAction::Drop);
        let superseded = fx::effect(&w.kv, create).unwrap().unwrap();
        assert_eq!(superseded.status, EffectStatus::Superseded { by_seq: drop });
        assert_eq!(due(&w, t), vec![pair("l_a", "drop")]);

        // An outcome for an attempt the effect does not await settles nothing.
        let before = fx::effect(&w.kv, drop).unwrap().unwrap();
        let cmd = Command {
            now_ms: w.now,
            actor: Principal::system(),
            op: Op::SettleEffect {
                seq: drop,
                attempt: 2,
                error: None,
                retry_at_ms: 0,
            },
        };
        let stale = apply_to(&mut w.kv, &cmd).unwrap_err();
        assert!(
            matches!(stale, Error::EffectNotAwaiting { attempt: 2, .. }),
            "{stale}"
        );
        assert_eq!(fx::effect(&w.kv, drop).unwrap().unwrap(), before);
        // Only the leader reports outcomes.
        let forged = Command {
            actor: Principal::bootstrap_admin(),
            ..fx::settle_command(&before, None, w.now, 0)
        };
        assert!(matches!(
            apply_to(&mut w.kv, &forged),
            Err(Error::PermissionDenied(_))
        ));
        assert!(matches!(
            apply_to(
                &mut w.kv,
                &Command {
                    op: Op::SettleEffect {
                        seq: 999,
                        attempt: 1,
                        error: None,
                        retry_at_ms: 0
                    },
                    ..cmd.clone()
                }
            ),
            Err(Error::EffectNotFound { seq: 999 })
        ));

        // Failures: kept with their error, not due until the stamped retry time, "failed"
        // after FAILED_AFTER_ATTEMPTS and still retried.
        for attempt in 1..=FAILED_AFTER_ATTEMPTS {
            settle(&mut w, drop, Some("connection refused"), 1000).unwrap();
            let e = fx::effect(&w.kv, drop).unwrap().unwrap();
            assert_eq!(e.attempts, attempt);
            assert_eq!(e.last_error.as_deref(), Some("connection refused"));
            assert_eq!(
                e.not_before_ms,
                w.now + fx::retry_delay_ms(attempt - 1, 1000)
            );
            assert!(due(&w, t).is_empty(), "due before its retry time");
            w.now = e.not_before_ms;
            assert_eq!(due(&w, t), vec![pair("l_a", "drop")]);
        }
        let failed = fx::effect(&w.kv, drop).unwrap().unwrap();
        assert_eq!(failed.state_name(), "failed");
        assert!(fx::targets_with_pending(&w.kv).unwrap() == vec![t.to_string()]);

        settle(&mut w, drop, None, 0).unwrap();
        let done = fx::effect(&w.kv, drop).unwrap().unwrap();
        assert_eq!(done.status, EffectStatus::Done { at_ms: w.now });
        assert!(due(&w, t).is_empty());
        assert!(fx::targets_with_pending(&w.kv).unwrap().is_empty());
        // A duplicate report of the success (a retried proposal) settles nothing.
        let dup = fx::settle_command(&failed, None, w.now, 0);
        assert!(matches!(
            apply_to(&mut w.kv, &dup),
            Err(Error::EffectNotAwaiting { .. })
        ));
        assert_eq!(fx::effect(&w.kv, drop).unwrap().unwrap(), done);
        let history: Vec<_> = fx::effects_of_lease(&w.kv, "l_a")
            .unwrap()
            .iter()
            .map(|e| e.state_name())
            .collect();
        assert_eq!(history, ["superseded", "done"]);
    }

    #[test]
    fn targets_are_independent_and_a_lease_runs_its_effects_in_order() {
        let mut w = World::new();
        let (a, b) = ("postgres/a", "postgres/b");
        let now = w.now;
        let down = record(&mut w, "l_1", b, EffectAction::Drop);
        let create = record(
            &mut w,
            "l_2",
            a,
            EffectAction::Create {
                valid_until_ms: now + 1,
            },
        );
        let extend = record(
            &mut w,
            "l_2",
            a,
            EffectAction::Extend {
                valid_until_ms: now + 2,
            },
        );
        record(&mut w, "l_3", a, EffectAction::Drop);
        // A failing database holds back nothing at another.
        settle(&mut w, down, Some("timeout"), 500).unwrap();
        assert!(due(&w, b).is_empty());
        // The extend waits for its lease's create; another lease's effect does not.
        assert_eq!(due(&w, a), vec![pair("l_2", "create"), pair("l_3", "drop")]);
        settle(&mut w, create, None, 0).unwrap();
        assert_eq!(due(&w, a), vec![pair("l_2", "extend"), pair("l_3", "drop")]);
        // A newer extend supersedes the older one: only the latest validity matters.
        let newer = record(
            &mut w,
            "l_2",
            a,
            EffectAction::Extend {
                valid_until_ms: now + 3,
            },
        );
        assert_eq!(
            fx::effect(&w.kv, extend).unwrap().unwrap().status,
            EffectStatus::Superseded { by_seq: newer }
        );
        assert_eq!(
            fx::due(&w.kv, a, w.now, 0, 1).unwrap().ready.len(),
            1,
            "the limit holds"
        );
        assert_eq!(
            fx::targets_with_pending(&w.kv).unwrap(),
            vec![a.to_string(), b.to_string()]
        );

        // Abandoning stops every pending effect of the lease, recording who and why.
        let (gone, writes) = {
            let mut ov = Overlay::new(&w.kv);
            let gone = fx::abandon(
                &mut ov,
                w.now,
                "l_1",
                "spiffe://td/admin",
                "dropped by hand",
            )
            .unwrap();
            (gone, ov.into_writes())
        };
        w.kv.commit(writes);
        assert_eq!(gone.len(), 1);
        assert!(matches!(
            &fx::effect(&w.kv, down).unwrap().unwrap().status,
            EffectStatus::Abandoned { by, reason, .. } if by == "spiffe://td/admin" && reason == "dropped by hand"
        ));
        w.now += 3_600_000;
        assert!(due(&w, b).is_empty());
        assert_eq!(
            fx::targets_with_pending(&w.kv).unwrap(),
            vec![a.to_string()]
        );
        // Every key the effects wrote is domain state: in the digest, equal on every node.
        for (k, _) in w.kv.range(b"", &[0xff], usize::MAX).unwrap() {
            assert!(
                state::STATE_PREFIXES
                    .iter()
                    .any(|p| k.starts_with(p.as_bytes())),
                "{} is outside STATE_PREFIXES",
                String::from_utf8_lossy(&k)
            );
        }
    }

    #[test]
    fn retry_delays_double_to_a_cap_and_spread_with_jitter() {
        let cases = [
            (0, 0, 250),
            (0, 1000, 500),
            (1, 0, 500),
            (3, 500, 3_000),
            (7, 1000, 60_000),
            (40, 0, 30_000),
            (u32::MAX, 1000, 60_000),
        ];
        for (attempts, jitter, want) in cases {
            assert_eq!(
                fx::retry_delay_ms(attempts, jitter),
                want,
                "{attempts} {jitter}"
            );
        }
        for jitter in [0, 333, 1000] {
            let delays: Vec<u64> = (0..30).map(|a| fx::retry_delay_ms(a, jitter)).collect();
            assert!(delays.windows(2).all(|d| d[0] <= d[1]), "{delays:?}");
        }
        for name in ["postgres/orders", "a.b:c-d_e"] {
            assert!(fx::valid_target(name), "{name}");
        }
        for name in ["", "a\0b", "a b", &"x".repeat(fx::MAX_TARGET_LEN + 1)] {
            assert!(!fx::valid_target(name), "{name:?}");
        }
    }
}

mod postgres_kind {
    use super::*;
    use crate::kind::postgres::{
        self as pg, password_from_seed, CharClass, PasswordPolicy, MAX_USERNAME_LEN,
    };
    use crate::state::effects::{self as fx, EffectAction};
    use crate::state::{DbConnection, SslMode};

    const TARGET: &str = "postgres/orders";

    fn connection(name: &str) -> DbConnection {
        DbConnection {
            name: name.into(),
            host: "127.0.0.1".into(),
            port: 5432,
            database: "orders".into(),
            user: "ephemera_admin".into(),
            sslmode: SslMode::Require,
            ca_pem: None,
            sealed_password: vec![7; 60],
            pending_sealed_password: None,
            updated_ms: 0,
        }
    }

    fn spec(connection: &str) -> pg::Spec {
        pg::Spec {
            connection: connection.into(),
            creation_statements: vec![
                "CREATE ROLE {{name}} LOGIN PASSWORD {{password}} VALID UNTIL {{expiration}}"
                    .into(),
                "GRANT SELECT ON ALL TABLES IN SCHEMA public TO {{name}}".into(),
            ],
            revocation_statements: vec![],
            renew_statements: vec![],
            username_template: pg::DEFAULT_USERNAME_TEMPLATE.into(),
            terminate_sessions: true,
            password: PasswordPolicy::default(),
        }
    }

    fn role(name: &str, spec: pg::Spec) -> Role {
        Role {
            name: name.into(),
            spec: RoleSpec::Postgres(spec),
            default_ttl_s: 600,
            max_ttl_s: 3600,
            environment: None,
            target: None,
            revoke_on_renewal_denied: false,
            issue_rate_per_identity: None,
            issue_rate: None,
            max_live_leases_per_identity: None,
            max_live_leases: None,
        }
    }

    fn login(role: &str) -> IssueIntent {
        IssueIntent {
            role: role.into(),
            request: KindRequest::Postgres(pg::Request {}),
            purpose: None,
            ..web(None)
        }
    }

    /// A world with the `orders` connection and the `reporting` role on it.
    fn world() -> World {
        let mut w = World::new();
        w.admin(Intent::PutDbConnection(connection("orders")))
            .unwrap();
        w.admin(Intent::PutRole(role("reporting", spec("orders"))))
            .unwrap();
        w
    }

    fn state_of(w: &World, lease: &str) -> &'static str {
        let l = w.lease(lease);
        fx::lease_state(&l, &fx::effects_of_lease(&w.kv, lease).unwrap())
    }

    /// The leader's executor reporting one attempt at the oldest due effect of the target.
    fn run_once(w: &mut World, error: Option<&str>) -> (String, &'static str) {
        let due = fx::due(&w.kv, TARGET, w.now, 0, 100).unwrap().ready;
        let e = due.first().expect("an effect is due").clone();
        let cmd = fx::settle_command(&e, error.map(String::from), w.now, 500);
        apply_to(&mut w.kv, &cmd).unwrap();
        (e.lease_id, e.action.name())
    }

    #[test]
    fn role_specs_are_checked_precisely() {
        let mut no_name = spec("orders");
        no_name.creation_statements = vec!["CREATE ROLE x PASSWORD {{password}}".into()];
        let mut no_password = spec("orders");
        no_password.creation_statements = vec!["CREATE ROLE {{name}} LOGIN".into()];
        let mut unknown = spec("orders");
        unknown.creation_statements[0].push_str(" {{nmae}}");
        let mut unclosed = spec("orders");
        unclosed.creation_statements[0].push_str(" {{name");
        let mut no_statements = spec("orders");
        no_statements.creation_statements.clear();
        let mut revocation_without_name = spec("orders");
        revocation_without_name.revocation_statements = vec!["DROP ROLE x".into()];
        let mut renew_password = spec("orders");
        renew_password.renew_statements = vec!["ALTER ROLE {{name}} PASSWORD {{password}}".into()];
        let template = |t: &str| {
            let mut s = spec("orders");
            s.username_template = t.into();
            s
        };
        let mut short_password = spec("orders");
        short_password.password.length = 8;
        let mut no_classes = spec("orders");
        no_classes.password.classes.clear();
        let cases: Vec<(&str, pg::Spec, &str)> = vec![
            ("no {{name}}", no_name, "never name the login"),
            ("no {{password}}", no_password, "{{password}}"),
            (
                "unknown placeholder",
                unknown,
                "unknown placeholder {{nmae}}",
            ),
            ("unclosed placeholder", unclosed, "unclosed placeholder"),
            (
                "no creation statements",
                no_statements,
                "1 to 16 statements",
            ),
            (
                "revocation without name",
                revocation_without_name,
                "never name",
            ),
            (
                "password in renew",
                renew_password,
                "unknown placeholder {{password}}",
            ),
            (
                "no random",
                template("eph_{{role}}"),
                "{{random}} exactly once",
            ),
            (
                "two randoms",
                template("{{random}}{{random}}"),
                "exactly once",
            ),
            (
                "quote in template",
                template("eph\"_{{random}}"),
                "not '\"'",
            ),
            ("upper case", template("Eph_{{random}}"), "not 'E'"),
            (
                "too long",
                template(&format!("{}{{{{random}}}}", "a".repeat(32))),
                "64 bytes",
            ),
            ("bad connection name", spec("no/slash"), "connection name"),
            ("short password", short_password, "password length"),
            ("no classes", no_classes, "character class"),
        ];
        let mut w = world();
        for (what, s, needle) in cases {
            let before = w.all_but_audit();
            let err = w
                .admin(Intent::PutRole(role("bad", s)))
                .expect_err(what)
                .to_string();
            assert!(err.contains(needle), "{what}: {err}");
            assert_eq!(w.all_but_audit(), before, "{what} changed the state");
        }
        // A role on a connection that does not exist.
        let before = w.all_but_audit();
        let err = w
            .admin(Intent::PutRole(role("bad", spec("billing"))))
            .unwrap_err();
        assert!(
            matches!(err, Error::UnknownConnection(ref c) if c == "billing"),
            "{err}"
        );
        assert_eq!(w.all_but_audit(), before);
        // The widest template that fits, fits.
        let widest = format!("{}{{{{random}}}}", "a".repeat(MAX_USERNAME_LEN - 32));
        w.admin(Intent::PutRole(role("wide", {
            let mut s = spec("orders");
            s.username_template = widest;
            s
        })))
        .unwrap();
    }

    #[test]
    fn usernames_are_unique_valid_and_at_most_63_bytes() {
        let id = "l_00112233445566778899aabbccddeeff";
        let name = pg::username(pg::DEFAULT_USERNAME_TEMPLATE, "Reporting.EU", id, T0).unwrap();
        assert_eq!(name, "eph_reporting_eu_00112233445566778899aabbccddeeff");
        let long_role = "r".repeat(64);
        // One byte too many at the widest expansion is refused when the role is put.
        assert!(pg::validate_username_template("{{role}}-{{unix_time}}-{{random}}").is_err());
        let t = "{{role}}{{unix_time}}-{{random}}";
        pg::validate_username_template(t).unwrap();
        let name = pg::username(t, &long_role, id, T0).unwrap();
        assert_eq!(name.len(), MAX_USERNAME_LEN);
        assert!(name.starts_with(&format!("{}1700000000-", "r".repeat(20))));
        // A lease id that is not the leader's 128 random bits is refused, not truncated.
        assert!(pg::username(t, "r", "l_short", T0).is_err());

        let mut w = world();
        let a = w.issue(login("reporting")).unwrap();
        let b = w.issue(login("reporting")).unwrap();
        let (Grant::Postgres(ga), Grant::Postgres(gb)) = (&a.grant, &b.grant) else {
            panic!("postgres grants");
        };
        assert_ne!(ga.username, gb.username);
        assert!(ga.username.ends_with(a.id.strip_prefix("l_").unwrap()));
        assert_eq!(ga.connection, "orders");
    }

    use crate::kind::Grant;

    #[test]
    fn passwords_follow_the_policy_and_are_derived_not_stored() {
        let every = PasswordPolicy {
            length: 16,
            classes: CharClass::ALL.into_iter().collect(),
        };
        let digits = PasswordPolicy {
            length: 20,
            classes: [CharClass::Digit].into(),
        };
        for seed in 0..200u8 {
            let p = password_from_seed(&[seed; 32], &every);
            assert_eq!(p.len(), 16);
            assert!(p.bytes().any(|b| b.is_ascii_lowercase()), "{seed}");
            assert!(p.bytes().any(|b| b.is_ascii_uppercase()), "{seed}");
            assert!(p.bytes().any(|b| b.is_ascii_digit()), "{seed}");
            assert!(
                p.bytes().any(|b| pg::SYMBOLS.as_bytes().contains(&b)),
                "{seed}"
            );
            let d = password_from_seed(&[seed; 32], &digits);
            assert!(d.len() == 20 && d.bytes().all(|b| b.is_ascii_digit()));
        }
        // Deterministic per seed, different across seeds.
        assert_eq!(
            *password_from_seed(&[1; 32], &every),
            *password_from_seed(&[1; 32], &every)
        );
        assert_ne!(
            *password_from_seed(&[1; 32], &every),
            *password_from_seed(&[2; 32], &every)
        );
        // From the KEK and the lease id: another lease or another KEK, another password.
        let policy = PasswordPolicy::default();
        let k1 = Kek::from_bytes([1; 32]);
        let k2 = Kek::from_bytes([2; 32]);
        let p = pg::password(&k1, "l_a", &policy);
        assert_eq!(p.len(), 32);
        assert_eq!(*p, *pg::password(&k1, "l_a", &policy));
        assert_ne!(*p, *pg::password(&k1, "l_b", &policy));
        assert_ne!(*p, *pg::password(&k2, "l_a", &policy));

        // Nothing the state machine writes holds it, nor does the log.
        let mut w = world();
        let lease = w.issue(login("reporting")).unwrap();
        let Grant::Postgres(g) = &lease.grant else {
            panic!()
        };
        let password = pg::password(&w.kek, &lease.id, &g.password);
        let needle = password.as_bytes();
        for (k, v) in w.kv.range(b"", &[0xff], usize::MAX).unwrap() {
            assert!(
                !v.windows(needle.len()).any(|win| win == needle),
                "the password is in {}",
                String::from_utf8_lossy(&k)
            );
        }
        for cmd in &w.log {
            let bytes = bincode::serialize(cmd).unwrap();
            assert!(!bytes.windows(needle.len()).any(|win| win == needle));
        }
    }

    #[test]
    fn a_login_goes_pending_active_revoking_revoked_through_its_effects() {
        let mut w = world();
        let lease = w.issue(login("reporting")).unwrap();
        assert_eq!(lease.kid, "", "nothing signs a login");
        assert_eq!(state_of(&w, &lease.id), "pending");
        assert_eq!(fx::holders(&w.kv, TARGET).unwrap(), vec![lease.id.clone()]);
        assert_eq!(run_once(&mut w, None), (lease.id.clone(), "create"));
        assert_eq!(state_of(&w, &lease.id), "active");
        assert!(fx::due(&w.kv, TARGET, w.now, 0, 10)
            .unwrap()
            .ready
            .is_empty());

        // A renewal moves the login's validity.
        w.now += 60_000;
        let renewed = w.renew(&lease.id, Some(1200)).unwrap();
        assert_eq!(renewed.expires_at_ms, w.now + 1_200_000);
        let due = fx::due(&w.kv, TARGET, w.now, 0, 10).unwrap().ready;
        assert_eq!(
            due[0].action,
            EffectAction::Extend {
                valid_until_ms: renewed.expires_at_ms
            }
        );
        assert_eq!(state_of(&w, &lease.id), "active");

        // Revoked: inactive in the cluster at once, the drop replaces the pending extend.
        w.admin(Intent::Revoke(RevokeTarget::Lease(lease.id.clone())))
            .unwrap();
        assert!(!w.lease(&lease.id).is_active_at(w.now));
        assert_eq!(state_of(&w, &lease.id), "revoking");
        let due = fx::due(&w.kv, TARGET, w.now, 0, 10).unwrap().ready;
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].action, EffectAction::Drop);

        // The database is down: retried with backoff, failed after five attempts, never lost.
        for attempt in 1..=fx::FAILED_AFTER_ATTEMPTS {
            assert_eq!(
                run_once(&mut w, Some("connection refused")),
                (lease.id.clone(), "drop")
            );
            assert!(fx::due(&w.kv, TARGET, w.now, 0, 10)
                .unwrap()
                .ready
                .is_empty());
            let e = &fx::effects_of_lease(&w.kv, &lease.id).unwrap()[2];
            assert_eq!(e.attempts, attempt);
            assert_eq!(e.last_error.as_deref(), Some("connection refused"));
            w.now = e.not_before_ms;
        }
        assert_eq!(state_of(&w, &lease.id), "failed");
        assert_eq!(fx::holders(&w.kv, TARGET).unwrap(), vec![lease.id.clone()]);
        // The database is back: dropped, and the lease is revoked for good.
        assert_eq!(run_once(&mut w, None), (lease.id.clone(), "drop"));
        assert_eq!(state_of(&w, &lease.id), "revoked");
        assert!(fx::holders(&w.kv, TARGET).unwrap().is_empty());
        let actions: Vec<_> = fx::effects_of_lease(&w.kv, &lease.id)
            .unwrap()
            .into_iter()
            .map(|e| (e.action.name(), e.state_name()))
            .collect();
        assert_eq!(
            actions,
            [
                ("create", "done"),
                ("extend", "superseded"),
                ("drop", "done")
            ]
        );
    }

    #[test]
    fn an_expired_login_is_dropped_and_kept_until_it_is() {
        let mut w = world();
        let lease = w
            .issue(IssueIntent {
                ttl_s: Some(10),
                ..login("reporting")
            })
            .unwrap();
        run_once(&mut w, None);
        w.now += 11_000;
        w.kv_apply_expire();
        assert_eq!(state_of(&w, &lease.id), "revoking");
        assert_eq!(run_once(&mut w, Some("timeout")).1, "drop");
        // Retention does not forget a lease whose login may still exist.
        let retention = Retention {
            dead_lease_s: 1,
            ..Retention::default()
        };
        let compact = |w: &mut World| {
            let cmd = Command {
                now_ms: w.now,
                actor: Principal::system(),
                op: Op::Compact {
                    retention,
                    limit: 100,
                },
            };
            apply_to(&mut w.kv, &cmd).unwrap();
        };
        w.now += 5_000;
        compact(&mut w);
        assert_eq!(state_of(&w, &lease.id), "revoking");
        run_once(&mut w, None);
        assert_eq!(state_of(&w, &lease.id), "expired");
        // Once dropped, the lease and its effects go together after another period.
        w.now += 5_000;
        compact(&mut w);
        assert!(state::get_lease(&w.kv, &lease.id).unwrap().is_none());
        assert!(fx::effects_of_lease(&w.kv, &lease.id).unwrap().is_empty());
        assert!(w
            .kv
            .range(b"fx/e/", b"fx/e0", usize::MAX)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn connections_are_admin_only_validated_and_not_deleted_under_live_logins() {
        let mut w = world();
        // Only an administrator; bad connections change nothing.
        let before = w.all_but_audit();
        let stranger = Principal::svid(
            "spiffe://example.org/web".into(),
            "example.org".into(),
            false,
        );
        assert!(matches!(
            w.propose(stranger, Intent::PutDbConnection(connection("x"))),
            Err(Error::PermissionDenied(_))
        ));
        let cases: Vec<(&str, DbConnection, &str)> = vec![
            (
                "verify-full without a CA",
                DbConnection {
                    sslmode: SslMode::VerifyFull,
                    ..connection("x")
                },
                "--ca-file",
            ),
            (
                "a CA that is not PEM",
                DbConnection {
                    ca_pem: Some("junk".into()),
                    ..connection("x")
                },
                "PEM",
            ),
            (
                "port 0",
                DbConnection {
                    port: 0,
                    ..connection("x")
                },
                "port",
            ),
            (
                "a host with a space",
                DbConnection {
                    host: "a b".into(),
                    ..connection("x")
                },
                "host",
            ),
            (
                "no sealed password",
                DbConnection {
                    sealed_password: vec![],
                    ..connection("x")
                },
                "sealed password",
            ),
            (
                "a long user",
                DbConnection {
                    user: "u".repeat(64),
                    ..connection("x")
                },
                "user",
            ),
        ];
        for (what, c, needle) in cases {
            let err = w
                .admin(Intent::PutDbConnection(c))
                .expect_err(what)
                .to_string();
            assert!(err.contains(needle), "{what}: {err}");
        }
        assert_eq!(w.all_but_audit(), before);
        // The audit record names where it points, never the sealed password.
        let (_, head) = state::audit_head(&w.kv).unwrap();
        assert!(!head.is_empty());
        let records = state::audit_records(&w.kv, 0, 1000).unwrap();
        let put = records
            .iter()
            .find(|r| r.action == "db.connection.put")
            .expect("audited");
        assert_eq!(put.target.as_deref(), Some("db:orders"));
        assert_eq!(put.details["host"], "127.0.0.1");
        let dbg = format!("{:?}", state::db_connection(&w.kv, "orders").unwrap());
        assert!(dbg.contains("<sealed>") && !dbg.contains("[7, 7"), "{dbg}");

        // In use: a login exists (or may), so delete is refused and changes nothing.
        let lease = w.issue(login("reporting")).unwrap();
        let before = w.all_but_audit();
        let err = w
            .admin(Intent::DeleteDbConnection {
                name: "orders".into(),
                force: false,
            })
            .unwrap_err();
        assert!(
            matches!(err, Error::ConnectionInUse { leases: 1, .. }),
            "{err}"
        );
        assert_eq!(w.all_but_audit(), before);
        assert!(matches!(
            w.admin(Intent::DeleteDbConnection {
                name: "nope".into(),
                force: false
            }),
            Err(Error::UnknownConnection(_))
        ));
        // --force revokes the lease and abandons its effects, on the record.
        w.admin(Intent::DeleteDbConnection {
            name: "orders".into(),
            force: true,
        })
        .unwrap();
        assert!(state::db_connection(&w.kv, "orders").unwrap().is_none());
        assert!(!w.lease(&lease.id).is_active_at(w.now));
        assert_eq!(state_of(&w, &lease.id), "abandoned");
        assert!(fx::due(&w.kv, TARGET, w.now, 0, 10)
            .unwrap()
            .ready
            .is_empty());
        assert!(fx::holders(&w.kv, TARGET).unwrap().is_empty());
        // Issuing on a role whose connection is gone is refused precisely.
        let before = w.all_but_audit();
        assert!(matches!(
            w.issue(login("reporting")),
            Err(Error::UnknownConnection(_))
        ));
        assert_eq!(w.all_but_audit(), before);
    }

    #[test]
    fn an_administrator_abandons_a_drop_that_cannot_succeed() {
        let mut w = world();
        let lease = w.issue(login("reporting")).unwrap();
        let jwt = w.issue(web(None)).unwrap();
        run_once(&mut w, None);
        w.admin(Intent::Revoke(RevokeTarget::Lease(lease.id.clone())))
            .unwrap();
        run_once(&mut w, Some("permission denied to drop role"));
        let abandon = |w: &mut World, id: &str| {
            w.admin(Intent::AbandonLease {
                lease_id: id.into(),
                reason: "dropped by hand, ticket OPS-17".into(),
            })
        };
        // Nothing to abandon for a JWT, or an unknown lease.
        assert!(matches!(
            abandon(&mut w, &jwt.id),
            Err(Error::NothingToAbandon(_))
        ));
        assert!(matches!(
            abandon(&mut w, "l_nope"),
            Err(Error::LeaseNotFound(_))
        ));
        let stranger = Principal::svid(
            "spiffe://example.org/web".into(),
            "example.org".into(),
            false,
        );
        assert!(matches!(
            w.propose(
                stranger,
                Intent::AbandonLease {
                    lease_id: lease.id.clone(),
                    reason: "x".into()
                }
            ),
            Err(Error::PermissionDenied(_))
        ));
        abandon(&mut w, &lease.id).unwrap();
        assert_eq!(state_of(&w, &lease.id), "abandoned");
        let e = fx::effects_of_lease(&w.kv, &lease.id)
            .unwrap()
            .pop()
            .unwrap();
        assert_eq!(
            e.status,
            fx::EffectStatus::Abandoned {
                at_ms: w.now,
                by: Principal::bootstrap_admin().id,
                reason: "dropped by hand, ticket OPS-17".into()
            }
        );
        assert!(fx::due(&w.kv, TARGET, w.now + 3_600_000, 0, 10)
            .unwrap()
            .ready
            .is_empty());
        // Twice is refused: there is nothing left.
        assert!(matches!(
            abandon(&mut w, &lease.id),
            Err(Error::NothingToAbandon(_))
        ));
        let rec = state::audit_records(&w.kv, 0, 1000)
            .unwrap()
            .into_iter()
            .find(|r| r.action == "lease.abandon" && r.outcome == "ok")
            .expect("audited");
        assert_eq!(
            rec.reason.as_deref(),
            Some("dropped by hand, ticket OPS-17")
        );
        assert_eq!(rec.lease_id.as_deref(), Some(lease.id.as_str()));
    }

    #[test]
    fn a_root_rotation_is_staged_then_settled_once_and_never_overwritten() {
        let mut w = world();
        let stage = |w: &mut World, b: u8| {
            w.admin(Intent::StageRootPassword {
                name: "orders".into(),
                sealed_password: vec![b; 60],
            })
        };
        let settle = |w: &mut World, b: u8, promote: bool| {
            w.admin(Intent::SettleRootPassword {
                name: "orders".into(),
                pending: vec![b; 60],
                promote,
            })
        };
        let conn = |w: &World| state::db_connection(&w.kv, "orders").unwrap().unwrap();
        assert!(matches!(
            w.admin(Intent::StageRootPassword {
                name: "nope".into(),
                sealed_password: vec![1; 60]
            }),
            Err(Error::UnknownConnection(_))
        ));
        // Nothing pending: a settle changes nothing.
        let before = w.all_but_audit();
        assert!(matches!(
            settle(&mut w, 8, true),
            Err(Error::RootRotation { .. })
        ));
        assert_eq!(w.all_but_audit(), before);
        stage(&mut w, 8).unwrap();
        assert_eq!(conn(&w).pending_sealed_password, Some(vec![8; 60]));
        // A second rotation may not replace the pending password (it may be the only one
        // the database takes now).
        let before = w.all_but_audit();
        assert!(matches!(stage(&mut w, 9), Err(Error::RootRotation { .. })));
        // A settle for another password than the pending one changes nothing.
        assert!(matches!(
            settle(&mut w, 9, true),
            Err(Error::RootRotation { .. })
        ));
        assert_eq!(w.all_but_audit(), before);
        settle(&mut w, 8, true).unwrap();
        let c = conn(&w);
        assert_eq!(
            (c.sealed_password, c.pending_sealed_password),
            (vec![8; 60], None)
        );
        // Discarding keeps the old password.
        stage(&mut w, 10).unwrap();
        settle(&mut w, 10, false).unwrap();
        let c = conn(&w);
        assert_eq!(
            (c.sealed_password, c.pending_sealed_password),
            (vec![8; 60], None)
        );
        // Administrators only; the audit records name no password.
        let stranger = Principal::svid(
            "spiffe://example.org/web".into(),
            "example.org".into(),
            false,
        );
        assert!(matches!(
            w.propose(
                stranger,
                Intent::StageRootPassword {
                    name: "orders".into(),
                    sealed_password: vec![1; 60]
                }
            ),
            Err(Error::PermissionDenied(_))
        ));
        let stages = state::audit_records(&w.kv, 0, 1000)
            .unwrap()
            .into_iter()
            .filter(|r| r.action.starts_with("db.connection.rotate_root"))
            .count();
        assert!(stages >= 4);
    }

    #[test]
    fn a_connection_is_not_replaced_while_its_rotation_may_still_land() {
        let mut w = world();
        w.admin(Intent::StageRootPassword {
            name: "orders".into(),
            sealed_password: vec![8; 60],
        })
        .unwrap();
        let mut put = connection("orders");
        put.sealed_password = vec![7; 60];
        let before = w.all_but_audit();
        w.now += state::ROTATION_IN_FLIGHT_MS - 1;
        assert!(matches!(
            w.admin(Intent::PutDbConnection(put.clone())),
            Err(Error::RootRotation { .. })
        ));
        assert_eq!(w.all_but_audit(), before);
        // Once the rotation can no longer commit, the checked password replaces it.
        w.now += 1;
        w.admin(Intent::PutDbConnection(put)).unwrap();
        let c = state::db_connection(&w.kv, "orders").unwrap().unwrap();
        assert_eq!(
            (c.sealed_password, c.pending_sealed_password),
            (vec![7; 60], None)
        );
    }

    #[test]
    fn revoking_a_connection_revokes_its_logins_only() {
        let mut w = world();
        w.admin(Intent::PutDbConnection(connection("billing")))
            .unwrap();
        w.admin(Intent::PutRole(role("billing", spec("billing"))))
            .unwrap();
        let a = w.issue(login("reporting")).unwrap();
        let b = w.issue(login("reporting")).unwrap();
        let other = w.issue(login("billing")).unwrap();
        let jwt = w.issue(web(None)).unwrap();
        assert!(matches!(
            w.admin(Intent::Revoke(RevokeTarget::Connection("nope".into()))),
            Err(Error::UnknownConnection(_))
        ));
        let out = w
            .admin(Intent::Revoke(RevokeTarget::Connection("orders".into())))
            .unwrap();
        assert_eq!(out, Outcome::Revoked { count: 2 });
        for id in [&a.id, &b.id] {
            assert!(matches!(w.lease(id).state, LeaseState::Revoked { .. }));
        }
        assert_eq!(w.lease(&other.id).state, LeaseState::Active);
        assert_eq!(w.lease(&jwt.id).state, LeaseState::Active);
        // Again: nothing more to revoke (the drops are pending, not the leases).
        let out = w
            .admin(Intent::Revoke(RevokeTarget::Connection("orders".into())))
            .unwrap();
        assert_eq!(out, Outcome::Revoked { count: 0 });
    }

    #[test]
    fn a_connection_with_logins_is_not_pointed_at_another_database() {
        let mut w = world();
        w.issue(login("reporting")).unwrap();
        type Move = fn(&mut DbConnection);
        let moves: [(&str, Move); 4] = [
            ("host", |c| c.host = "10.0.0.9".into()),
            ("port", |c| c.port = 6543),
            ("database", |c| c.database = "elsewhere".into()),
            ("user", |c| c.user = "someone_else".into()),
        ];
        let before = w.all_but_audit();
        for (what, change) in moves {
            let mut moved = connection("orders");
            change(&mut moved);
            assert!(
                matches!(
                    w.admin(Intent::PutDbConnection(moved)),
                    Err(Error::ConnectionInUse { leases: 1, .. })
                ),
                "{what}"
            );
            assert_eq!(w.all_but_audit(), before, "{what}");
        }
        let mut moved = connection("orders");
        moved.host = "10.0.0.9".into();
        // A new password (or CA, or mode) for the same database is fine.
        let mut repassworded = connection("orders");
        repassworded.sealed_password = vec![9; 60];
        w.admin(Intent::PutDbConnection(repassworded)).unwrap();
        // Once the logins are gone, it may move.
        w.admin(Intent::Revoke(RevokeTarget::Connection("orders".into())))
            .unwrap();
        // The drop (which superseded the pending create) is done.
        run_once(&mut w, None);
        w.admin(Intent::PutDbConnection(moved)).unwrap();
    }
}

mod exchange {
    use super::*;

    const AGENT: &str = "spiffe://example.org/agent";
    const TOOL: &str = "spiffe://example.org/tool";

    fn caller(id: &str) -> Principal {
        Principal::svid(id.into(), "example.org".into(), false)
    }

    fn ask(parent: &str, actor: Option<&str>, scopes: &[&str], ttl: Option<u64>) -> Intent {
        Intent::Exchange(ExchangeIntent {
            issue: IssueIntent {
                subject: None,
                ttl_s: ttl,
                request: jwt_req(scopes, None),
                ..web(None)
            },
            subject: ExchangeSubject::Lease(parent.into()),
            actor: actor.map(str::to_string),
            max_depth: 5,
        })
    }

    /// An exchange presented by `actor` (or the tool when there is none).
    fn exchange(
        w: &mut World,
        parent: &str,
        actor: Option<&str>,
        scopes: &[&str],
    ) -> Result<Lease, Error> {
        let by = caller(actor.unwrap_or(TOOL));
        match w.propose(by, ask(parent, actor, scopes, None))? {
            Outcome::Lease { lease, .. } => Ok(lease),
            o => panic!("unexpected {o:?}"),
        }
    }

    fn root(w: &mut World) -> Lease {
        w.issue(IssueIntent {
            request: jwt_req(&["read", "write"], None),
            ..web(None)
        })
        .unwrap()
    }

    fn chain(w: &World, id: &str) -> (Vec<String>, u32) {
        let d = state::delegation(&w.kv, id).unwrap().expect("a delegation");
        (d.act, d.hops)
    }

    #[test]
    fn an_exchange_narrows_and_the_actor_chain_only_grows() {
        let mut w = World::new();
        let root = root(&mut w);
        let a = exchange(&mut w, &root.id, Some(AGENT), &["read"]).unwrap();
        assert_eq!(
            (a.subject.as_str(), a.parent.as_deref(), a.scopes()),
            (
                root.subject.as_str(),
                Some(root.id.as_str()),
                &["read".to_string()][..]
            )
        );
        assert_eq!(a.client_id, AGENT);
        assert!(a.expires_at_ms <= root.expires_at_ms);
        assert!(a.max_expires_at_ms <= root.expires_at_ms);
        assert_eq!(chain(&w, &a.id), (vec![AGENT.to_string()], 1));
        // The issue's audit record names where the token came from and who acts.
        let rec = state::audit_records(&w.kv, 0, 10_000)
            .unwrap()
            .into_iter()
            .rfind(|r| r.action == "lease.exchange")
            .unwrap();
        assert_eq!(rec.details.get("parent"), Some(&root.id));
        assert_eq!(rec.details.get("act").map(String::as_str), Some(AGENT));
        // RFC 8693 4.1: the new actor first, the previous chain nested inside.
        let b = exchange(&mut w, &a.id, Some(TOOL), &["read"]).unwrap();
        assert_eq!(chain(&w, &b.id), (vec![TOOL.into(), AGENT.into()], 2));
        // Without an actor the chain is carried on, never dropped.
        let c = exchange(&mut w, &b.id, None, &[]).unwrap();
        assert_eq!(chain(&w, &c.id), (vec![TOOL.into(), AGENT.into()], 3));
        assert!(state::delegation(&w.kv, &root.id).unwrap().is_none());

        // Refusals change nothing but the audit chain.
        let before = w.all_but_audit();
        type Expected = fn(&Error) -> bool;
        let cases: [(Intent, Expected); 5] = [
            // Wider than the subject token.
            (
                ask(&a.id, None, &["write"], None),
                |e| matches!(e, Error::ScopeNotInSubjectToken { scope } if scope == "write"),
            ),
            // An unknown subject token lease.
            (
                ask("l_00000000000000000000000000000000", None, &[], None),
                |e| matches!(e, Error::SubjectTokenRefused(_)),
            ),
            // Another subject than the subject token's.
            (
                Intent::Exchange(ExchangeIntent {
                    issue: IssueIntent {
                        subject: Some("spiffe://example.org/other".into()),
                        request: jwt_req(&[], None),
                        ..web(None)
                    },
                    subject: ExchangeSubject::Lease(a.id.clone()),
                    actor: None,
                    max_depth: 5,
                }),
                |e| matches!(e, Error::InvalidArgument(_)),
            ),
            // A TTL above the role's cap.
            (ask(&a.id, None, &[], Some(3600)), |e| {
                matches!(e, Error::TtlAboveCap { .. })
            }),
            // No policy decision.
            (
                match ask(&a.id, None, &[], None) {
                    Intent::Exchange(mut x) => {
                        x.issue.policy = Some(PolicyStamp {
                            version: 999,
                            determining: vec!["test-permit".into()],
                            scopes: None,
                            max_ttl_s: None,
                        });
                        Intent::Exchange(x)
                    }
                    _ => unreachable!(),
                },
                |e| matches!(e, Error::PolicyChanged { .. }),
            ),
        ];
        for (intent, expected) in cases {
            let err = w.propose(caller(TOOL), intent).unwrap_err();
            assert!(expected(&err), "{err}");
            assert_eq!(w.all_but_audit(), before, "{err}");
        }
    }

    #[test]
    fn a_chain_deeper_than_the_limit_is_refused() {
        let mut w = World::new();
        let mut parent = root(&mut w).id;
        for hop in 1..=5u32 {
            let l = exchange(&mut w, &parent, Some(AGENT), &["read"]).unwrap();
            assert_eq!(chain(&w, &l.id).1, hop);
            parent = l.id;
        }
        assert!(matches!(
            exchange(&mut w, &parent, Some(AGENT), &["read"]),
            Err(Error::DelegationTooDeep { depth: 6, max: 5 })
        ));
        // The limit cannot be raised past what apply holds.
        let mut too_deep = ask(&parent, None, &[], None);
        if let Intent::Exchange(x) = &mut too_deep {
            x.max_depth = state::MAX_DELEGATION_DEPTH + 1;
        }
        assert!(matches!(
            validate_intent(&too_deep),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn revoking_a_lease_revokes_every_descendant_in_the_same_entry() {
        let mut w = World::new();
        let root = root(&mut w);
        let a = exchange(&mut w, &root.id, Some(AGENT), &["read"]).unwrap();
        let b1 = exchange(&mut w, &a.id, Some(TOOL), &["read"]).unwrap();
        let b2 = exchange(&mut w, &a.id, None, &[]).unwrap();
        let c = exchange(&mut w, &root.id, None, &["write"]).unwrap();
        let other_root = root_other(&mut w);
        let d = exchange(&mut w, &other_root.id, None, &[]).unwrap();
        let entries = w.log.len();
        let out = w.admin(Intent::Revoke(RevokeTarget::Lease(root.id.clone())));
        assert_eq!(out, Ok(Outcome::Revoked { count: 5 }));
        assert_eq!(w.log.len(), entries + 1, "one entry");
        for id in [&root.id, &a.id, &b1.id, &b2.id, &c.id] {
            assert!(
                matches!(w.lease(id).state, LeaseState::Revoked { .. }),
                "{id}"
            );
        }
        assert_eq!(w.lease(&d.id).state, LeaseState::Active);
        assert_eq!(w.lease(&other_root.id).state, LeaseState::Active);
        // A revoked subject token exchanges into nothing; revoking again revokes nothing.
        assert!(matches!(
            exchange(&mut w, &a.id, None, &[]),
            Err(Error::SubjectTokenRefused(m)) if m.contains("revoked")
        ));
        assert_eq!(
            w.admin(Intent::Revoke(RevokeTarget::Lease(a.id.clone()))),
            Ok(Outcome::Revoked { count: 0 })
        );
        // Bulk revocation cascades too (the subject's other root, and its child).
        let out = w.admin(Intent::Revoke(RevokeTarget::Role("web".into())));
        assert_eq!(out, Ok(Outcome::Revoked { count: 2 }));
    }

    fn root_other(w: &mut World) -> Lease {
        w.issue(IssueIntent {
            request: jwt_req(&["read"], None),
            purpose: Some("another job".into()),
            ..web(None)
        })
        .unwrap()
    }

    #[test]
    fn an_exchanged_token_never_outlives_its_subject_token() {
        let mut w = World::new();
        let root = root(&mut w);
        w.now += 30_000;
        let by = caller(TOOL);
        let Outcome::Lease { lease, .. } = w
            .propose(by.clone(), ask(&root.id, None, &["read"], Some(300)))
            .unwrap()
        else {
            panic!("a lease")
        };
        assert_eq!(lease.expires_at_ms, root.expires_at_ms);
        assert_eq!(lease.max_expires_at_ms, root.expires_at_ms);
        assert!(lease.renew_after_ms > w.now && lease.renew_after_ms < lease.expires_at_ms);
        // Renewal cannot take it past its subject token's expiry either: it is at its cap.
        w.now += 10_000;
        assert!(matches!(
            w.renew(&lease.id, Some(300)),
            Err(Error::LeaseAtMaxLifetime(_))
        ));
        // Past the subject token's expiry, it cannot be exchanged.
        w.now = root.expires_at_ms;
        assert!(matches!(
            w.propose(by, ask(&root.id, None, &["read"], None)),
            Err(Error::SubjectTokenRefused(m)) if m.contains("expired")
        ));
    }

    const USER: &str = "https://idp.example.org#alice";

    fn from_assertion(w: &World, scopes: Option<&[&str]>, jti: Option<&str>) -> Intent {
        match ask(
            "l_00000000000000000000000000000000",
            Some(AGENT),
            &["read"],
            None,
        ) {
            Intent::Exchange(mut x) => {
                x.subject = ExchangeSubject::Assertion(SubjectAssertion {
                    subject: USER.into(),
                    expires_at_ms: w.now + 30_000,
                    scopes: scopes.map(|s| s.iter().map(|s| s.to_string()).collect()),
                    issuer: "https://idp.example.org".into(),
                    jti: jti.map(str::to_string),
                    replay_until_ms: w.now + 60_000,
                });
                Intent::Exchange(x)
            }
            _ => unreachable!(),
        }
    }

    #[test]
    fn an_assertion_is_exchanged_narrowed_once_and_without_a_parent() {
        let mut w = World::new();
        let agent = caller(AGENT);
        let Outcome::Lease { lease: a, .. } = w
            .propose(
                agent.clone(),
                from_assertion(&w, Some(&["read"]), Some("j1")),
            )
            .unwrap()
        else {
            panic!("a lease")
        };
        // The assertion's subject, no later than its expiry (the role's TTL is 60 s), no
        // parent, and the actor chain recorded.
        assert_eq!(
            (
                a.subject.as_str(),
                a.parent.as_deref(),
                a.client_id.as_str()
            ),
            (USER, None, AGENT)
        );
        assert_eq!(a.expires_at_ms, w.now + 30_000);
        assert_eq!(a.max_expires_at_ms, a.expires_at_ms);
        assert_eq!(chain(&w, &a.id), (vec![AGENT.to_string()], 1));
        let rec = state::audit_records(&w.kv, 0, 10_000)
            .unwrap()
            .into_iter()
            .rfind(|r| r.action == "lease.exchange")
            .unwrap();
        assert_eq!(
            rec.details.get("subject_assertion").map(String::as_str),
            Some(USER)
        );
        // It is a subject token in turn: its children die with it.
        let b = exchange(&mut w, &a.id, Some(TOOL), &["read"]).unwrap();
        assert_eq!(chain(&w, &b.id), (vec![TOOL.into(), AGENT.into()], 2));

        // Refusals change nothing but the audit chain; a refused exchange does not use up its
        // assertion.
        let before = w.all_but_audit();
        let expired = match from_assertion(&w, None, Some("j2")) {
            Intent::Exchange(mut x) => {
                if let ExchangeSubject::Assertion(s) = &mut x.subject {
                    s.expires_at_ms = w.now;
                }
                Intent::Exchange(x)
            }
            _ => unreachable!(),
        };
        type Expected = fn(&Error) -> bool;
        let cases: [(Intent, Expected); 3] = [
            // The same jti again: a replay.
            (
                from_assertion(&w, None, Some("j1")),
                |e| matches!(e, Error::SubjectTokenRefused(m) if m.contains("already used")),
            ),
            // Wider than the assertion's scope claim (j2 is not used up by it).
            (
                from_assertion(&w, Some(&["write"]), Some("j2")),
                |e| matches!(e, Error::ScopeNotInSubjectToken { scope } if scope == "read"),
            ),
            (
                expired,
                |e| matches!(e, Error::SubjectTokenRefused(m) if m.contains("expired")),
            ),
        ];
        for (intent, expected) in cases {
            let err = w.propose(agent.clone(), intent).unwrap_err();
            assert!(expected(&err), "{err}");
            assert_eq!(w.all_but_audit(), before, "{err}");
        }
        // An assertion without a scope claim bounds nothing beyond the role; j2 still serves.
        assert!(w
            .propose(agent.clone(), from_assertion(&w, None, Some("j2")))
            .is_ok());
        // Revoking the exchanged token revokes its child.
        let out = w.admin(Intent::Revoke(RevokeTarget::Lease(a.id.clone())));
        assert_eq!(out, Ok(Outcome::Revoked { count: 2 }));
    }

    #[test]
    fn retention_forgets_a_dead_derived_lease_with_its_delegation() {
        let mut w = World::new();
        let root = root(&mut w);
        let a = exchange(&mut w, &root.id, Some(AGENT), &["read"]).unwrap();
        w.admin(Intent::Revoke(RevokeTarget::Lease(root.id.clone())))
            .unwrap();
        w.now = a.expires_at_ms + 8 * 86_400_000;
        let cmd = Command {
            now_ms: w.now,
            actor: Principal::system(),
            op: Op::Compact {
                retention: Retention::default(),
                limit: 10_000,
            },
        };
        apply_to(&mut w.kv, &cmd).unwrap();
        assert!(state::get_lease(&w.kv, &a.id).unwrap().is_none());
        assert!(state::delegation(&w.kv, &a.id).unwrap().is_none());
        assert!(state::children(&w.kv, &root.id).unwrap().is_empty());
    }
}

/// Every revocation enters the log in commit order (a cascade's descendants, a bulk revoke's
/// leases, a key retired early), numbered from 1; retention forgets an entry once the
/// credential it revokes has expired.
#[test]
fn revocations_are_logged_in_commit_order_until_their_credentials_expire() {
    use crate::state::Revoked;
    let mut w = World::new();
    let a = w.issue(web(Some(60))).unwrap();
    let b = w.issue(web(Some(60))).unwrap();
    let c = w.issue(web(Some(120))).unwrap();
    assert_eq!(state::last_revocation_seq(&w.kv).unwrap(), 0);
    w.admin(Intent::Revoke(RevokeTarget::Lease(b.id.clone())))
        .unwrap();
    // Revoking it again logs nothing.
    w.admin(Intent::Revoke(RevokeTarget::Lease(b.id.clone())))
        .unwrap();
    let kid = a.kid.clone();
    w.admin(Intent::Revoke(RevokeTarget::Key(kid.clone())))
        .unwrap();
    let log = state::revocations_after(&w.kv, 0, 100).unwrap();
    let what: Vec<(u64, Revoked)> = log.iter().map(|r| (r.seq, r.what.clone())).collect();
    let lease = |l: &Lease| Revoked::Lease {
        id: l.id.clone(),
        expires_at_ms: l.expires_at_ms,
    };
    // The key's revocation revokes what it signed (a and c, in index order) after logging
    // itself.
    let mut signed = vec![lease(&a), lease(&c)];
    signed.sort_by_key(|r| match r {
        Revoked::Lease { id, .. } => id.clone(),
        Revoked::Key { .. } => String::new(),
    });
    let mut expected = vec![(1, lease(&b)), (2, Revoked::Key { kid })];
    expected.extend(signed.into_iter().zip(3..).map(|(r, s)| (s, r)));
    assert_eq!(what, expected);
    assert_eq!(state::last_revocation_seq(&w.kv).unwrap(), 4);
    // Resuming after seq 2 gives the rest.
    let rest: Vec<u64> = state::revocations_after(&w.kv, 2, 100)
        .unwrap()
        .iter()
        .map(|r| r.seq)
        .collect();
    assert_eq!(rest, [3, 4]);
    // Retention: once a and b have expired (and the retention passed), their entries go; c's
    // stays until it expires too.
    let retention = Retention {
        dead_lease_s: 1,
        ..Retention::default()
    };
    w.now = a.expires_at_ms + 2_000;
    let compact = Command {
        now_ms: w.now,
        actor: Principal::system(),
        op: Op::Compact {
            retention,
            limit: 10_000,
        },
    };
    apply_to(&mut w.kv, &compact).unwrap();
    let left: Vec<Revoked> = state::revocations_after(&w.kv, 0, 100)
        .unwrap()
        .into_iter()
        .map(|r| r.what)
        .collect();
    assert!(left.contains(&lease(&c)), "{left:?}");
    assert!(
        !left.contains(&lease(&a)) && !left.contains(&lease(&b)),
        "{left:?}"
    );
}

/// Group commit: the leader writes commands that arrive together as one `Op::Batch` entry.
/// The batch must leave exactly the state (audit chain included) that the same commands in
/// consecutive entries leave, and answer each command with the result it would have had alone:
/// a refusal among them changes nothing of the others, and a repeated request id inside one
/// batch still names one lease.
#[test]
fn a_batch_applies_as_its_commands_in_consecutive_entries() {
    let mut alone = World::new();
    let mut batched = World::new();
    let admin = Principal::bootstrap_admin();
    let first = alone.issue(web(Some(30))).unwrap();
    let mut twice = web(Some(40));
    twice.request_id = Some("req-7".into());
    let mut unknown_role = web(None);
    unknown_role.role = "nope".into();
    let mut too_long = web(Some(100_000));
    too_long.request_id = Some("req-8".into());
    let intents = vec![
        Intent::Issue(twice.clone()),
        Intent::Issue(unknown_role),
        Intent::Revoke(RevokeTarget::Lease(first.id.clone())),
        Intent::Issue(twice),
        Intent::Issue(too_long),
        Intent::Renew(RenewIntent {
            lease_id: first.id.clone(),
            increment_s: None,
            context: RequestContext::default(),
            policy: None,
        }),
    ];
    // The batched world gets the first lease from the same command, alone.
    apply_to(&mut batched.kv, alone.log.last().unwrap()).unwrap();
    let mut commands = Vec::new();
    let mut results = Vec::new();
    for (n, mut intent) in intents.into_iter().enumerate() {
        alone.now += 10 * n as u64;
        match &mut intent {
            Intent::Issue(i) => i.policy = Some(alone.permit(&admin)),
            Intent::Renew(r) => r.policy = Some(alone.permit(&admin)),
            _ => {}
        }
        let cmd = stamp(
            Proposal {
                actor: admin.clone(),
                intent,
            },
            alone.now,
            &mut alone.rng,
            &alone.kek,
        );
        results.push(apply_to(&mut alone.kv, &cmd));
        commands.push(cmd);
    }
    let batch = Command {
        now_ms: alone.now,
        actor: Principal::system(),
        op: Op::Batch(commands.clone()),
    };
    let answered = match apply_to(&mut batched.kv, &batch) {
        Ok(Outcome::Batch(answers)) => answers,
        other => panic!("a batch is answered command by command: {other:?}"),
    };
    assert_eq!(answered, results);
    let kinds: Vec<_> = results
        .iter()
        .map(|r| r.as_ref().map(|_| ()).map_err(|e| e.kind()))
        .collect();
    assert_eq!(
        kinds,
        [
            Ok(()),
            Err("unknown_role"),
            Ok(()),
            Ok(()),
            Err("ttl_above_cap"),
            Err("lease_revoked")
        ],
        "{results:?}"
    );
    match (&results[0], &results[3]) {
        (
            Ok(Outcome::Lease {
                lease: a,
                replayed: false,
            }),
            Ok(Outcome::Lease {
                lease: b,
                replayed: true,
            }),
        ) => assert_eq!(a.id, b.id, "a repeated request id names the same lease"),
        other => panic!("{other:?}"),
    }
    let everything = |w: &World| w.kv.range(b"", &[0xff], usize::MAX).unwrap();
    assert_eq!(
        everything(&batched),
        everything(&alone),
        "the same state, byte for byte"
    );

    // A batch that breaks the rules is refused whole and changes nothing, audit included.
    let before = everything(&batched);
    let nested = Command {
        now_ms: alone.now + 1,
        actor: Principal::system(),
        op: Op::Batch(vec![commands[0].clone(), batch.clone()]),
    };
    let oversized = Command {
        now_ms: alone.now + 1,
        actor: Principal::system(),
        op: Op::Batch(vec![commands[2].clone(); MAX_BATCH + 1]),
    };
    for bad in [nested, oversized] {
        let refused = apply_to(&mut batched.kv, &bad).unwrap_err();
        assert_eq!(refused.kind(), "invalid_argument");
        assert_eq!(everything(&batched), before);
    }
}
