//! The workload: concurrent clients issuing, renewing, revoking and introspecting through the
//! public API, each operation recorded as a history event. Shared by the chaos harness (real
//! processes) and the simulation (`crates/ephemera-sim`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ephemera_client::{pb, Client, ClientError};
use rand::{Rng, SeedableRng};
use tonic::Code;

use crate::history::{Event, Op, OpResult, Outcome};

/// Role the workload issues from: short TTL and cap, so renewals hit the cap within a run.
pub const ROLE: &str = "chaos";
pub const ROLE_TTL_S: u64 = 4;
pub const ROLE_MAX_TTL_S: u64 = 10;

/// What an issuance or renewal answered.
fn granted(c: &pb::Credential) -> OpResult {
    OpResult {
        lease_id: Some(c.lease_id.clone()),
        expires_at_ms: Some(c.expires_at_ms),
        max_expires_at_ms: Some(c.max_expires_at_ms),
        active: None,
    }
}

/// The subject a client's leases are issued for.
fn subject(process: u32) -> String {
    format!("spiffe://chaos.test/client/{process}")
}

/// Creates the role the workload issues from.
pub async fn create_role(admin: &Client) -> Result<(), ClientError> {
    admin
        .admin_call(
            pb::PutRoleRequest {
                role: Some(pb::Role {
                    name: ROLE.into(),
                    kind: "jwt".into(),
                    audience: "chaos.test".into(),
                    allowed_scopes: vec!["read".into(), "write".into()],
                    default_ttl_s: ROLE_TTL_S,
                    max_ttl_s: ROLE_MAX_TTL_S,
                    ..Default::default()
                }),
            },
            |mut a, r| async move { a.put_role(r).await },
        )
        .await
        .map(|_| ())
}

#[derive(Default)]
struct Pool {
    /// Issued leases and their tokens.
    leases: Vec<(String, String)>,
    /// Leases whose revoke was acknowledged, most recent last.
    revoked: Vec<(String, String)>,
}

fn classify(e: &ClientError) -> Outcome {
    match e.code() {
        Some(
            Code::InvalidArgument
            | Code::NotFound
            | Code::AlreadyExists
            | Code::FailedPrecondition
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::OutOfRange,
        ) => Outcome::Fail {
            error: e.to_string(),
        },
        _ => Outcome::Unknown {
            error: e.to_string(),
        },
    }
}

/// What the workload clients share.
pub struct Workload {
    pool: Mutex<Pool>,
    /// The operations recorded so far, in completion order.
    pub history: Mutex<Vec<Event>>,
    /// Ids handed out so far: the operations started.
    pub next_id: AtomicU64,
    /// Set to stop the clients after their current operation.
    pub stop: AtomicBool,
    max_ops: u64,
    seed: u64,
    /// The clock events are stamped with (Unix ms): the harness's wall clock, or simulated time.
    now_ms: fn() -> u64,
    /// Each client's pause after each operation (zero: as fast as the cluster answers).
    pause: Duration,
}

impl Workload {
    /// A workload of at most `max_ops` operations, its choices drawn from `seed`.
    pub fn new(seed: u64, max_ops: u64, now_ms: fn() -> u64, pause: Duration) -> Self {
        Workload {
            pool: Mutex::new(Pool::default()),
            history: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            max_ops,
            seed,
            now_ms,
            pause,
        }
    }
}

pub async fn client_loop(process: u32, clients: Vec<Client>, w: Arc<Workload>) {
    let (pool, history, next_id, stop, max_ops, seed, now_ms) = (
        &w.pool, &w.history, &w.next_id, &w.stop, w.max_ops, w.seed, w.now_ms,
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ (u64::from(process) << 32));
    let mut counter = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let id = next_id.fetch_add(1, Ordering::Relaxed);
        if id >= max_ops {
            return;
        }
        let node = rng.gen_range(0..clients.len());
        let client = &clients[node];
        let pick = rng.gen_range(0..100);
        let (lease, token) = {
            let p = pool.lock().expect("pool");
            let from_revoked = pick >= 65 && rng.gen_bool(0.5) && !p.revoked.is_empty();
            let list = if from_revoked { &p.revoked } else { &p.leases };
            if list.is_empty() {
                (None, None)
            } else {
                // Prefer recent leases: they are the ones still alive.
                let len = list.len();
                let i = len - 1 - rng.gen_range(0..len.min(50));
                (Some(list[i].0.clone()), Some(list[i].1.clone()))
            }
        };
        let invoke_ms = now_ms();
        let (op, outcome, result) = match (pick, lease) {
            (0..=29, _) | (_, None) => {
                counter += 1;
                let request_id = format!("p{process}-{counter}");
                let op = Op::Issue {
                    request_id: request_id.clone(),
                    subject: Some(subject(process)),
                };
                let r = client
                    .issue(pb::IssueRequest {
                        role: ROLE.into(),
                        request_id: Some(request_id),
                        subject: Some(subject(process)),
                        ..Default::default()
                    })
                    .await;
                match r {
                    Ok(c) => {
                        let result = granted(&c);
                        pool.lock()
                            .expect("pool")
                            .leases
                            .push((c.lease_id, c.token));
                        (op, Outcome::Ok, result)
                    }
                    Err(e) => (op, classify(&e), OpResult::default()),
                }
            }
            (30..=49, Some(lease_id)) => {
                let r = client
                    .renew(pb::RenewRequest {
                        lease_id: lease_id.clone(),
                        ..Default::default()
                    })
                    .await;
                let op = Op::Renew { lease_id };
                match r {
                    Ok(c) => (op, Outcome::Ok, granted(&c)),
                    Err(e) => (op, classify(&e), OpResult::default()),
                }
            }
            (50..=64, Some(lease_id)) => {
                let r = client
                    .revoke(pb::RevokeRequest {
                        target: Some(pb::revoke_request::Target::LeaseId(lease_id.clone())),
                    })
                    .await;
                let op = Op::Revoke {
                    lease_id: lease_id.clone(),
                };
                match r {
                    Ok(_) => {
                        let token = token.clone().unwrap_or_default();
                        let mut p = pool.lock().expect("pool");
                        p.revoked.push((lease_id, token));
                        if p.revoked.len() > 500 {
                            p.revoked.remove(0);
                        }
                        (op, Outcome::Ok, OpResult::default())
                    }
                    Err(e) => (op, classify(&e), OpResult::default()),
                }
            }
            (65..=66, Some(_)) => {
                // Every lease this client has issued, at once.
                let r = client
                    .revoke(pb::RevokeRequest {
                        target: Some(pb::revoke_request::Target::Subject(subject(process))),
                    })
                    .await;
                let op = Op::RevokeSubject {
                    subject: subject(process),
                };
                match r {
                    Ok(_) => (op, Outcome::Ok, OpResult::default()),
                    Err(e) => (op, classify(&e), OpResult::default()),
                }
            }
            (_, Some(lease_id)) => {
                let r = client
                    .introspect(token.as_deref().unwrap_or_default())
                    .await;
                let op = Op::Introspect { lease_id };
                match r {
                    Ok(i) => (
                        op,
                        Outcome::Ok,
                        OpResult {
                            active: Some(i.active),
                            ..Default::default()
                        },
                    ),
                    Err(e) => (op, classify(&e), OpResult::default()),
                }
            }
        };
        let unknown = matches!(outcome, Outcome::Unknown { .. });
        history.lock().expect("history").push(Event {
            id,
            process,
            node: node as u64 + 1,
            op,
            invoke_ms,
            complete_ms: now_ms(),
            outcome,
            result,
        });
        if unknown {
            // A dead node refuses at once; back off instead of spinning on it.
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        if !w.pause.is_zero() {
            tokio::time::sleep(w.pause).await;
        }
    }
}
