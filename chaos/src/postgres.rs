//! The PostgreSQL workload of a chaos run (`--postgres`): a real server on 127.0.0.1, logins
//! issued, renewed and revoked on it while the faults run, and, after healing, the database
//! itself checked against what the cluster acknowledged: every login whose lease the cluster
//! reports active exists, takes the password it was issued with, and is valid at least until
//! the last expiry the cluster acknowledged and never past the lease's; and once every lease
//! has settled no login of the workload's role is left (so every acknowledged revocation, and
//! every expiry, was carried out).

use std::collections::HashMap;
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
/// Logins whose password the check tries (each is a TLS and SCRAM handshake).
const PASSWORDS_TRIED: usize = 50;
/// The most leases of the role the check reads.
const MAX_LEASES: usize = 100_000;

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

/// A login as the cluster handed it out.
struct Issued {
    username: String,
    password: zeroize::Zeroizing<String>,
    /// The latest expiry an issue or renew reply acknowledged.
    acked_expires_at_ms: u64,
}

/// The database and what the workload was told.
pub struct PgWorkload {
    pub server: PgServer,
    pub stats: Stats,
    /// Every issued login by lease id, with the order they were issued in (renew and revoke
    /// pick recent ones).
    issued: Mutex<(HashMap<String, Issued>, Vec<String>)>,
    /// (lease, username) of the revocations acknowledged.
    revoked: Mutex<Vec<(String, String)>>,
}

/// A session to `server` as `user` (verify-full, as a relying party connects).
fn as_user(server: &PgServer, user: &str, password: &str) -> ephemera_postgres::Connection {
    ephemera_postgres::Connection {
        host: "localhost".into(),
        port: server.port,
        database: "postgres".into(),
        user: user.into(),
        password: password.to_string().into(),
        sslmode: SslMode::VerifyFull,
        ca_pem: Some(server.ca_pem.clone()),
    }
}

fn admin(server: &PgServer) -> ephemera_postgres::Connection {
    as_user(server, ADMIN_USER, &server.admin_password)
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
        let role = pb::Role {
            name: ROLE.into(),
            creation_statements: vec![
                "CREATE ROLE {{name}} LOGIN PASSWORD {{password}} VALID UNTIL {{expiration}}"
                    .into(),
            ],
            default_ttl_s: ttl_s,
            max_ttl_s,
            ..Default::default()
        };
        server
            .configure(admin_client, CONNECTION, role)
            .await
            .map_err(|e| format!("configuring the connection and the role: {e}"))?;
        Ok(PgWorkload {
            server,
            stats: Stats::default(),
            issued: Mutex::default(),
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
                let order = &issued.1;
                let len = order.len();
                (len > 0).then(|| {
                    let lease = order[len - 1 - rng.gen_range(0..len.min(20))].clone();
                    let user = issued.0[&lease].username.clone();
                    (lease, user)
                })
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
                            let (username, password) = match c.body {
                                Some(pb::credential::Body::Postgres(p)) => (p.username, p.password),
                                _ => Default::default(),
                            };
                            let login = Issued {
                                username,
                                password: password.into(),
                                acked_expires_at_ms: c.expires_at_ms,
                            };
                            let mut issued = self.issued.lock().expect("issued");
                            // A retried request_id answers with the same lease.
                            if issued.0.insert(c.lease_id.clone(), login).is_none() {
                                issued.1.push(c.lease_id);
                            }
                            self.stats.issued.fetch_add(1, Ordering::Relaxed);
                            Ok(())
                        }
                        Err(e) => Err(format!("issue: {e}")),
                    }
                }
                (50..=69, Some((lease, _))) => {
                    let r = client
                        .renew(pb::RenewRequest {
                            lease_id: lease.clone(),
                            ..Default::default()
                        })
                        .await;
                    r.map(|c| {
                        let mut issued = self.issued.lock().expect("issued");
                        if let Some(login) = issued.0.get_mut(&lease) {
                            login.acked_expires_at_ms =
                                login.acked_expires_at_ms.max(c.expires_at_ms);
                        }
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

    /// The workload's logins at the server, with their `VALID UNTIL` (ms).
    async fn logins_at_server(&self) -> Result<HashMap<String, Option<u64>>, String> {
        let c = ephemera_postgres::connect(&admin(&self.server), Duration::from_secs(10))
            .await
            .map_err(|e| e.to_string())?;
        let rows = c
            .query(
                "SELECT rolname, (extract(epoch FROM rolvaliduntil) * 1000)::bigint \
                 FROM pg_catalog.pg_roles WHERE rolname LIKE $1",
                &[&USERNAME_PATTERN],
            )
            .await
            .map_err(|e| e.to_string())?;
        Ok(rows
            .iter()
            .map(|r| {
                let until: Option<i64> = r.get(1);
                (r.get::<_, String>(0), until.map(|ms| ms.max(0) as u64))
            })
            .collect())
    }

    /// An active lease's login against what the cluster acknowledged: it exists, is valid at
    /// least until the last acknowledged expiry and never past the lease's, and (for the first
    /// few) takes its password.
    async fn check_active(
        &self,
        l: &pb::Lease,
        at_server: &HashMap<String, Option<u64>>,
        try_password: bool,
    ) -> Option<String> {
        let Some(until) = at_server.get(&l.username) else {
            return Some(format!(
                "lease {} is active but its login {} does not exist",
                l.id, l.username
            ));
        };
        let (acked, password) = {
            let issued = self.issued.lock().expect("issued");
            match issued.0.get(&l.id) {
                Some(i) => (i.acked_expires_at_ms, Some(i.password.clone())),
                None => (0, None),
            }
        };
        match *until {
            Some(ms) if ms < acked => {
                return Some(format!(
                    "the login {} is valid until {ms}, before the expiry {acked} the cluster \
                     acknowledged",
                    l.username
                ))
            }
            Some(ms) if ms > l.expires_at_ms => {
                return Some(format!(
                    "the login {} is valid until {ms}, past its lease's expiry {}",
                    l.username, l.expires_at_ms
                ))
            }
            Some(_) => {}
            None => return Some(format!("the login {} has no VALID UNTIL", l.username)),
        }
        let password = password.filter(|_| try_password)?;
        let session = as_user(&self.server, &l.username, &password);
        match ephemera_postgres::connect(&session, Duration::from_secs(10)).await {
            Ok(_) => None,
            Err(e) => Some(format!(
                "the login {} does not take the password it was issued with: {e}",
                l.username
            )),
        }
    }

    /// After healing: the database against the cluster's answers.
    pub async fn check(&self, client: &Client) -> Vec<Violation> {
        let violation = |message: String| Violation {
            kind: "postgres",
            message,
            events: vec![],
        };
        let mut out = Vec::new();
        // 1. Every login the cluster reports active (created, and not about to expire) exists,
        //    with the validity and the password the cluster acknowledged.
        let leases = match role_leases(client).await {
            Ok(l) => l,
            Err(e) => return vec![violation(format!("listing the role's leases failed: {e}"))],
        };
        let at_server = match self.logins_at_server().await {
            Ok(l) => l,
            Err(e) => return vec![violation(format!("reading pg_roles failed: {e}"))],
        };
        let soon = now_ms() + 1_000;
        let active = leases
            .iter()
            .filter(|l| l.state == "active" && l.expires_at_ms > soon);
        for (i, l) in active.enumerate() {
            if let Some(v) = self.check_active(l, &at_server, i < PASSWORDS_TRIED).await {
                out.push(violation(v));
            }
        }
        // 2. Once every lease has settled, no login of the role is left at the server.
        let deadline = Instant::now() + SETTLE_WITHIN;
        loop {
            let unsettled = role_leases(client).await.map(|l| {
                l.into_iter()
                    .filter(|l| !matches!(l.state.as_str(), "revoked" | "expired" | "abandoned"))
                    .count()
            });
            if unsettled == Ok(0) {
                break;
            }
            if Instant::now() > deadline {
                out.push(violation(match unsettled {
                    Ok(n) => format!(
                        "{n} lease(s) had not settled {} s after healing",
                        SETTLE_WITHIN.as_secs()
                    ),
                    Err(e) => format!(
                        "the role's leases could not be listed {} s after healing: {e}",
                        SETTLE_WITHIN.as_secs()
                    ),
                }));
                return out;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        match self.logins_at_server().await {
            Ok(left) => {
                let revoked = self.revoked.lock().expect("revoked").clone();
                for name in left.keys() {
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

async fn role_leases(client: &Client) -> Result<Vec<pb::Lease>, String> {
    let filter = pb::ListLeasesRequest {
        role: Some(ROLE.into()),
        ..Default::default()
    };
    client
        .list_all_leases(filter, MAX_LEASES)
        .await
        .map_err(|e| e.to_string())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
