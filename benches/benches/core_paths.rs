//! Micro-benchmarks of the hot pure paths on the request path, and the physical ceiling of this
//! machine: Ed25519 signatures per second on one core. Prints figures; asserts nothing.
//!
//! Run: `cargo bench -p ephemera-benches --bench core_paths`

use std::hint::black_box;
use std::time::Instant;

use criterion::Criterion;
use ephemera_core::audit::AuditRecord;
use ephemera_core::command::{stamp, Command, Entropy, Intent, IssueIntent, Proposal};
use ephemera_core::crypto::Kek;
use ephemera_core::kind::{jwt, Grant, KindRequest, RoleSpec};
use ephemera_core::kv::{MemKv, Overlay};
use ephemera_core::policy::PolicyStamp;
use ephemera_core::state;
use ephemera_core::token::{self, Claims};
use ephemera_core::types::{Lease, LeaseState, Principal, Role};

/// Deterministic entropy (a benchmark needs no real randomness).
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

const NOW: u64 = 1_795_429_800_000;

fn apply(kv: &mut MemKv, cmd: &Command) {
    let writes = {
        let mut overlay = Overlay::new(&*kv);
        state::apply(&mut overlay, cmd)
            .expect("storage")
            .expect("command succeeds");
        overlay.into_writes()
    };
    kv.commit(writes);
}

/// A state with a signing key and a role, and an Issue stamped against it.
fn issue_fixture() -> (MemKv, Command) {
    let (mut kv, mut rng, kek) = (MemKv::default(), Counter(7), Kek::from_bytes([3; 32]));
    let mut run = |kv: &mut MemKv, actor: Principal, intent: Intent| {
        let cmd = stamp(Proposal { actor, intent }, NOW, &mut rng, &kek);
        apply(kv, &cmd);
    };
    run(&mut kv, Principal::system(), Intent::RotateKey);
    run(
        &mut kv,
        Principal::bootstrap_admin(),
        Intent::PutRole(Role {
            name: "web".into(),
            spec: RoleSpec::Jwt(jwt::Spec {
                audience: "api".into(),
                allowed_scopes: vec!["read".into(), "write".into()],
            }),
            default_ttl_s: 600,
            max_ttl_s: 3600,
            environment: None,
            target: None,
            revoke_on_renewal_denied: false,
            issue_rate_per_identity: None,
            issue_rate: None,
            max_live_leases_per_identity: None,
            max_live_leases: None,
        }),
    );
    let workload = Principal::svid(
        "spiffe://example.org/ns/prod/sa/web".into(),
        "example.org".into(),
        false,
    );
    let issue = Intent::Issue(IssueIntent {
        request_id: Some("bench-1".into()),
        role: "web".into(),
        subject: None,
        ttl_s: Some(600),
        request: KindRequest::Jwt(jwt::Request {
            scopes: vec!["read".into()],
            audience: None,
        }),
        join_token_hash: None,
        supersedes: None,
        purpose: None,
        context: Default::default(),
        policy: Some(PolicyStamp {
            version: 0,
            determining: vec!["bench".into()],
            scopes: None,
            max_ttl_s: None,
        }),
    });
    let cmd = stamp(
        Proposal {
            actor: workload,
            intent: issue,
        },
        NOW,
        &mut rng,
        &kek,
    );
    (kv, cmd)
}

fn lease() -> Lease {
    Lease {
        id: "l_0123456789abcdef0123456789abcdef".into(),
        role: "web".into(),
        subject: "spiffe://example.org/ns/prod/sa/web".into(),
        client_id: "spiffe://example.org/ns/prod/sa/web".into(),
        purpose: None,
        parent: None,
        ttl_s: 600,
        issued_at_ms: NOW,
        minted_at_ms: NOW,
        expires_at_ms: NOW + 600_000,
        max_expires_at_ms: NOW + 3_600_000,
        renew_after_ms: NOW + 360_000,
        kid: "k1".into(),
        renewals: 0,
        state: LeaseState::Active,
        grant: Grant::Jwt(jwt::Grant {
            audience: "api".into(),
            scopes: vec!["read".into()],
        }),
    }
}

/// The ceiling: Ed25519 signatures of a token-sized message per second, one core.
fn print_signature_ceiling(key: &ed25519_dalek::SigningKey) {
    use ed25519_dalek::Signer;
    let message = [7u8; 400];
    let n = 20_000;
    let start = Instant::now();
    for _ in 0..n {
        black_box(key.sign(black_box(&message)));
    }
    let per_s = n as f64 / start.elapsed().as_secs_f64();
    println!("ceiling: {per_s:.0} Ed25519 signatures/s on one core (400-byte messages)");
}

fn main() {
    let key = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
    print_signature_ceiling(&key);

    let mut c = Criterion::default().configure_from_args();
    let (kv, cmd) = issue_fixture();
    c.bench_function("apply/issue", |b| {
        b.iter(|| {
            // Applied to an overlay that is then dropped: the same issue each time.
            let mut overlay = Overlay::new(&kv);
            black_box(state::apply(&mut overlay, black_box(&cmd)).unwrap())
        })
    });
    let claims = Claims::for_lease(&lease(), "https://ephemera.example");
    c.bench_function("token/sign_jwt", |b| {
        b.iter(|| token::sign(black_box(&claims), "k1", &key))
    });
    let record = AuditRecord {
        seq: 42,
        time_ms: NOW,
        actor: "spiffe://example.org/ns/prod/sa/web".into(),
        auth_method: "x509_svid".into(),
        action: "lease.issue".into(),
        role: Some("web".into()),
        lease_id: Some(lease().id),
        scopes: vec!["read".into()],
        outcome: "ok".into(),
        prev_hash: "ab".repeat(32),
        policy_version: Some(3),
        policy_ids: vec!["svc-web".into()],
        ..Default::default()
    };
    c.bench_function("audit/hash_record", |b| {
        b.iter(|| black_box(&record).compute_hash())
    });
    c.final_summary();
}
