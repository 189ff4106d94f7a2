//! The PostgreSQL workload of a chaos run (`--postgres`): a real server on 127.0.0.1, logins
//! issued, renewed and revoked on it while the faults run, and, after healing, the database
//! itself checked against what the cluster acknowledged: every login whose lease the cluster
//! reports active exists, and once every lease has settled no login of the workload's role is
//! left (so every acknowledged revocation, and every expiry, was carried out).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ephemera_client::{pb, Client};
use ephemera_core::state::SslMode;
use ephemera_testkit::postgres::{PgServer, ADMIN_USER};
use rand::{Rng, SeedableRng};

use crate::checker::Violation;

pub const ROLE: &str = "chaos-pg";
const CONNECTION: &str = "chaos";
/// Usernames the role's default template gives (`eph_{{role}}_{{random}}`), as a LIKE pattern.
const USERNAME_PATTERN: &str = "eph\\_chaos-pg\\_%";
/// How long the leases may take to settle after healing: the role's cap, the drops' retry
/// backoff after a fault, and a new leader's hold-off.
const SETTLE_WITHIN: Duration = Duration::from_secs(120);

/// What the workload did, for the summary.
#[derive(Default)]
pub struct Stats {
    pub issued: AtomicU64,
    pub renewed: AtomicU64,
    pub revoked: AtomicU64,
    pub failed: AtomicU64,
    /// The first few distinct errors (for the summary).
    errors: Mutex<Vec<String>>,
}

impl Stats {
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "issued": self.issued.load(Ordering::Relaxed),
            "renewed": self.renewed.load(Ordering::Relaxed),
            "revocations_acknowledged": self.revoked.load(Ordering::Relaxed),
            "failed_or_unknown": self.failed.load(Ordering::Relaxed),
            "first_errors": *self.errors.lock().expect("errors"),
        })
    }
}

/// The database and what the workload was told.
pub struct PgWorkload {
    pub server: PgServer,
    pub stats: Stats,
    /// (lease, username) of every issued login, and of the revocations acknowledged.
    issued: Mutex<Vec<(String, String)>>,
    revoked: Mutex<Vec<(String, String)>>,
}

fn admin(server: &PgServer) -> ephemera_postgres::Connection {
    ephemera_postgres::Connection {
        host: "localhost".into(),
        port: server.port,
        database: "postgres".into(),
        user: ADMIN_USER.into(),
        password: server.admin_password.clone().into(),
        sslmode: SslMode::VerifyFull,
        ca_pem: Some(server.ca_pem.clone()),
    }
}

impl PgWorkload {
    /// Starts the server and configures the connection and the role through `admin_client`.
    pub async fn setup(
        dir: &std::path::Path,
        admin_client: &Client,
        ttl_s: u64,
        max_ttl_s: u64,
    ) -> Result<PgWorkload, String> {
        let server = PgServer::start(dir).map_err(|e| format!("starting PostgreSQL: {e}"))?;
        let req = pb::PutDbConnectionRequest {
            name: CONNECTION.into(),
            host: "localhost".into(),
            port: u32::from(server.port),
            database: "postgres".into(),
            user: ADMIN_USER.into(),
            password: server.admin_password.clone(),
            sslmode: "verify-full".into(),
            ca_pem: server.ca_pem.clone(),
        };
        admin_client
            .admin_call(req, |mut a, r| async move { a.put_db_connection(r).await })
            .await
            .map_err(|e| format!("putting the connection: {e}"))?;
        let role = pb::Role {
            name: ROLE.into(),
            kind: "postgres".into(),
            connection: CONNECTION.into(),
            creation_statements: vec![
                "CREATE ROLE {{name}} LOGIN PASSWORD {{password}} VALID UNTIL {{expiration}}"
                    .into(),
            ],
            default_ttl_s: ttl_s,
            max_ttl_s,
            ..Default::default()
        };
        admin_client
            .admin_call(
                pb::PutRoleRequest { role: Some(role) },
                |mut a, r| async move { a.put_role(r).await },
            )
            .await
            .map_err(|e| format!("putting the role: {e}"))?;
        Ok(PgWorkload {
            server,
            stats: Stats::default(),
            issued: Mutex::new(Vec::new()),
            revoked: Mutex::new(Vec::new()),
        })
    }

    /// One client's loop until `stop` or `max_ops` operations: issue, renew and revoke logins
    /// through a node picked at random.
    pub async fn client_loop(
        self: Arc<Self>,
        clients: Vec<Client>,
        seed: u64,
        stop: Arc<AtomicBool>,
        max_ops: u64,
    ) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x7067);
        for n in 0..max_ops {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let client = &clients[rng.gen_range(0..clients.len())];
            let recent = {
                let issued = self.issued.lock().expect("issued");
                let len = issued.len();
                (len > 0).then(|| issued[len - 1 - rng.gen_range(0..len.min(20))].clone())
            };
            let pick = rng.gen_range(0..100);
            let result: Result<(), String> = match (pick, recent) {
                (0..=49, _) | (_, None) => {
                    let r = client
                        .issue(pb::IssueRequest {
                            role: ROLE.into(),
                            request_id: Some(format!("pg-{seed}-{n}")),
                            kind: Some(pb::issue_request::Kind::Postgres(
                                pb::PostgresLoginRequest {},
                            )),
                            ..Default::default()
                        })
                        .await;
                    match r {
                        Ok(c) => {
                            let user = match c.body {
                                Some(pb::credential::Body::Postgres(p)) => p.username,
                                _ => String::new(),
                            };
                            self.issued.lock().expect("issued").push((c.lease_id, user));
                            self.stats.issued.fetch_add(1, Ordering::Relaxed);
                            Ok(())
                        }
                        Err(e) => Err(format!("issue: {e}")),
                    }
                }
                (50..=69, Some((lease, _))) => {
                    let r = client
                        .renew(pb::RenewRequest {
                            lease_id: lease,
                            ..Default::default()
                        })
                        .await;
                    r.map(|_| {
                        self.stats.renewed.fetch_add(1, Ordering::Relaxed);
                    })
                    .map_err(|e| format!("renew: {e}"))
                }
                (_, Some((lease, user))) => {
                    let r = client
                        .revoke(pb::RevokeRequest {
                            target: Some(pb::revoke_request::Target::LeaseId(lease.clone())),
                        })
                        .await;
                    match r {
                        Ok(_) => {
                            self.revoked.lock().expect("revoked").push((lease, user));
                            self.stats.revoked.fetch_add(1, Ordering::Relaxed);
                            Ok(())
                        }
                        Err(e) => Err(format!("revoke: {e}")),
                    }
                }
            };
            if let Err(e) = result {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                {
                    let mut errors = self.stats.errors.lock().expect("errors");
                    if errors.len() < 5 && !errors.contains(&e) {
                        errors.push(e);
                    }
                }
                // A node that is down refuses at once; do not spin on it.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    async fn logins_at_server(&self) -> Result<Vec<String>, String> {
        let c = ephemera_postgres::connect(&admin(&self.server), Duration::from_secs(10))
            .await
            .map_err(|e| e.to_string())?;
        let rows = c
            .query(
                "SELECT rolname FROM pg_catalog.pg_roles WHERE rolname LIKE $1",
                &[&USERNAME_PATTERN],
            )
            .await
            .map_err(|e| e.to_string())?;
        Ok(rows.iter().map(|r| r.get::<_, String>(0)).collect())
    }

    /// After healing: the database against the cluster's answers.
    pub async fn check(&self, client: &Client) -> Vec<Violation> {
        let violation = |message: String| Violation {
            kind: "postgres",
            message,
            events: vec![],
        };
        let mut out = Vec::new();
        // 1. Every login the cluster reports active (created, and not about to expire) exists.
        let leases = match role_leases(client).await {
            Ok(l) => l,
            Err(e) => return vec![violation(format!("listing the leases failed: {e}"))],
        };
        let at_server = match self.logins_at_server().await {
            Ok(l) => l,
            Err(e) => return vec![violation(format!("reading pg_roles failed: {e}"))],
        };
        let soon = now_ms() + 1_000;
        for l in &leases {
            if l.state == "active" && l.expires_at_ms > soon && !at_server.contains(&l.username) {
                out.push(violation(format!(
                    "lease {} is active but its login {} does not exist",
                    l.id, l.username
                )));
            }
        }
        // 2. Once every lease has settled, no login of the role is left at the server.
        let deadline = Instant::now() + SETTLE_WITHIN;
        loop {
            let unsettled = match role_leases(client).await {
                Ok(l) => l
                    .into_iter()
                    .filter(|l| !matches!(l.state.as_str(), "revoked" | "expired" | "abandoned"))
                    .count(),
                Err(_) => usize::MAX,
            };
            if unsettled == 0 {
                break;
            }
            if Instant::now() > deadline {
                out.push(violation(format!(
                    "{unsettled} lease(s) had not settled {} s after healing",
                    SETTLE_WITHIN.as_secs()
                )));
                return out;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        match self.logins_at_server().await {
            Ok(left) => {
                let revoked = self.revoked.lock().expect("revoked").clone();
                for name in &left {
                    let acked = revoked.iter().find(|(_, u)| u == name);
                    out.push(violation(match acked {
                        Some((lease, _)) => format!(
                            "the revocation of lease {lease} was acknowledged, but its login \
                             {name} still exists"
                        ),
                        None => format!("login {name} outlived its settled lease"),
                    }));
                }
            }
            Err(e) => out.push(violation(format!("reading pg_roles failed: {e}"))),
        }
        out
    }
}

struct RoleLease {
    id: String,
    state: String,
    username: String,
    expires_at_ms: u64,
}

async fn role_leases(client: &Client) -> Result<Vec<RoleLease>, String> {
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let r = client
            .list_leases(pb::ListLeasesRequest {
                role: Some(ROLE.into()),
                page_size: 1000,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?;
        out.extend(r.leases.into_iter().map(|l| RoleLease {
            id: l.id,
            state: l.state,
            username: l.username,
            expires_at_ms: l.expires_at_ms,
        }));
        if r.next_page_token.is_empty() {
            return Ok(out);
        }
        token = r.next_page_token;
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
