//! PostgreSQL logins end to end: a real server (started by the test kit on 127.0.0.1, run as
//! the `postgres` user, with TLS and SCRAM), a three-node cluster of real processes, and the
//! `ephemera` CLI. What the database itself says (can this password log in, what is
//! `rolvaliduntil`, does the role exist) is what the tests check. `tests/run.sh` installs the
//! server when it is missing.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use ephemera_core::state::SslMode;
use ephemera_postgres::Connection;
use ephemera_testkit::postgres::{PgServer, ADMIN_USER};

const CREATION: &str =
    "CREATE ROLE {{name}} LOGIN PASSWORD {{password}} VALID UNTIL {{expiration}};\n\
                        GRANT USAGE, CREATE ON SCHEMA public TO {{name}};";

/// A connection to the test server as `user`, checked with verify-full (the CA and the name
/// `localhost`), as a relying party's client connects.
fn as_user(pg: &PgServer, user: &str, password: &str) -> Connection {
    Connection {
        host: "localhost".into(),
        port: pg.port,
        database: "postgres".into(),
        user: user.into(),
        password: password.to_string().into(),
        sslmode: SslMode::VerifyFull,
        ca_pem: Some(pg.ca_pem.clone()),
    }
}

async fn login(
    pg: &PgServer,
    user: &str,
    password: &str,
) -> Result<tokio_postgres::Client, ephemera_postgres::Error> {
    ephemera_postgres::connect(&as_user(pg, user, password), Duration::from_secs(10)).await
}

/// `rolvaliduntil` of `name` in Unix ms, or `None` when the role does not exist.
async fn valid_until_ms(pg: &PgServer, name: &str) -> Option<i64> {
    let admin = login(pg, ADMIN_USER, &pg.admin_password)
        .await
        .expect("the admin connects");
    admin
        .query_opt(
            "SELECT (extract(epoch FROM rolvaliduntil) * 1000)::bigint FROM pg_roles \
             WHERE rolname = $1",
            &[&name],
        )
        .await
        .expect("query pg_roles")
        .map(|r| r.get::<_, Option<i64>>(0).unwrap_or(i64::MAX))
}

async fn role_exists(pg: &PgServer, name: &str) -> bool {
    valid_until_ms(pg, name).await.is_some()
}

/// Polls until `name` no longer exists at the server (the executor dropped it).
async fn await_dropped(pg: &PgServer, name: &str, within: Duration) {
    let deadline = Instant::now() + within;
    while role_exists(pg, name).await {
        assert!(
            Instant::now() < deadline,
            "the login {name} still exists after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// The cluster with the connection `orders` (verify-full) and a role `app` on it.
struct Setup {
    cluster: DevCluster,
    pg: PgServer,
    /// Outside the cluster's directory, which is searched for secrets.
    files: tempfile::TempDir,
}

fn setup() -> Setup {
    let files = tempfile::tempdir().unwrap();
    let pg = PgServer::start(&files.path().join("pg")).expect("PostgreSQL starts");
    let cluster = DevCluster::start(3, &[]);
    let password_file = write(
        files.path(),
        "admin-password",
        &format!("{}\n", pg.admin_password),
    );
    let ca_file = write(files.path(), "pg-ca.pem", &pg.ca_pem);
    let url = format!("postgres://{ADMIN_USER}@localhost:{}/postgres", pg.port);
    let conn = cluster.cli_json(&[
        "db",
        "connection",
        "put",
        "orders",
        "--url",
        &url,
        "--password-file",
        &password_file,
        "--ca-file",
        &ca_file,
    ]);
    assert_eq!(conn["sslmode"], "verify-full");
    assert_eq!(conn["live_leases"], 0);
    let creation = write(files.path(), "creation.sql", CREATION);
    cluster.cli_json(&[
        "role",
        "put",
        "app",
        "--kind",
        "postgres",
        "--connection",
        "orders",
        "--creation-statements",
        &creation,
        "--ttl",
        "10m",
        "--max-ttl",
        "1h",
    ]);
    Setup { cluster, pg, files }
}

fn cli_err(cluster: &DevCluster, args: &[&str]) -> String {
    let out = cluster.cli(args);
    assert!(!out.status.success(), "ephemera {args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn lease<'a>(leases: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    leases["leases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["lease_id"] == id)
        .unwrap_or_else(|| panic!("lease {id} not listed in {leases}"))
}

/// Every file under `dir`, searched for each secret (as bytes: the logs and sled's files).
fn assert_nowhere(dir: &Path, secrets: &[(&str, &str)]) {
    let mut stack = vec![dir.to_path_buf()];
    let mut files = 0;
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let Ok(bytes) = std::fs::read(&path) else {
                continue;
            };
            files += 1;
            for (what, secret) in secrets {
                assert!(
                    !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                    "{what} found in {}",
                    path.display()
                );
            }
        }
    }
    assert!(
        files > 10,
        "only {files} files searched under {}",
        dir.display()
    );
}

#[test]
fn logins_work_at_the_database_move_with_renewal_and_end_with_revocation_and_expiry() {
    let Setup { cluster, pg, files } = setup();
    let rt = rt();
    let issued = cluster.cli_json(&["issue", "--role", "app"]);
    assert_eq!(issued["kind"], "postgres");
    let id = issued["lease_id"].as_str().unwrap().to_string();
    let user = issued["username"].as_str().unwrap().to_string();
    let password = issued["password"].as_str().unwrap().to_string();
    assert!(user.starts_with("eph_app_"), "{user}");
    assert_eq!(password.len(), 32);
    for field in ["expires_at", "renew_after"] {
        assert!(issued[field].is_string(), "{field} missing: {issued}");
    }
    rt.block_on(async {
        // The login works, over TLS checked with verify-full, and its validity is the lease's.
        let session = login(&pg, &user, &password)
            .await
            .expect("the issued login works");
        let one: i32 = session.query_one("SELECT 1", &[]).await.unwrap().get(0);
        assert_eq!(one, 1);
        let expires = issued["expires_at_ms"].as_i64().unwrap();
        assert_eq!(valid_until_ms(&pg, &user).await, Some(expires));

        // Renewal moves VALID UNTIL, never past the cap.
        let renewed = cluster.cli_json(&["renew", &id, "--increment", "20m"]);
        let moved = renewed["expires_at_ms"].as_i64().unwrap();
        assert!(moved > expires);
        assert_eq!(valid_until_ms(&pg, &user).await, Some(moved));
        let capped = cluster.cli_json(&["renew", &id, "--increment", "5h"]);
        let cap = capped["max_expires_at_ms"].as_i64().unwrap();
        assert_eq!(capped["expires_at_ms"].as_i64().unwrap(), cap);
        assert_eq!(valid_until_ms(&pg, &user).await, Some(cap));

        // Revocation: at once inactive in the cluster; then the login is gone, and the session
        // opened before it fails its next query.
        cluster.cli_json(&["revoke", &id]);
        let listed = cluster.cli_json(&["leases", "list", "--role", "app"]);
        let state = lease(&listed, &id)["state"].as_str().unwrap().to_string();
        assert!(["revoking", "revoked"].contains(&state.as_str()), "{state}");
        await_dropped(&pg, &user, Duration::from_secs(15)).await;
        assert!(session.query_one("SELECT 1", &[]).await.is_err());
        let refused = login(&pg, &user, &password).await;
        assert!(refused.is_err(), "the revoked login still logs in");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let listed = cluster.cli_json(&["leases", "list", "--role", "app"]);
            if lease(&listed, &id)["state"] == "revoked" {
                break;
            }
            assert!(Instant::now() < deadline, "never settled: {listed}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        // Expiry drops the login as revocation does.
        let short = cluster.cli_json(&["issue", "--role", "app", "--ttl", "2s"]);
        let short_user = short["username"].as_str().unwrap().to_string();
        let short_password = short["password"].as_str().unwrap().to_string();
        assert!(role_exists(&pg, &short_user).await);
        await_dropped(&pg, &short_user, Duration::from_secs(20)).await;
        assert!(login(&pg, &short_user, &short_password).await.is_err());
        let listed = cluster.cli_json(&["leases", "list", "--state", "expired"]);
        assert_eq!(
            lease(&listed, short["lease_id"].as_str().unwrap())["state"],
            "expired"
        );

        // No password, the admin's or an issued one, anywhere in the cluster's files (data,
        // Raft logs, snapshots, node logs) or the database server's log.
        let audit = cluster.cli(&["audit", "tail", "-n", "500"]);
        assert!(audit.status.success());
        let audit = String::from_utf8_lossy(&audit.stdout).into_owned();
        assert!(audit.contains("db.connection.put"), "{audit}");
        let secrets = [
            ("the admin password", pg.admin_password.as_str()),
            ("an issued password", password.as_str()),
            ("an issued password", short_password.as_str()),
        ];
        assert_nowhere(cluster.dir.path(), &secrets);
        for (what, s) in secrets {
            assert!(!audit.contains(s), "{what} in an audit record");
        }
        let log = pg.log();
        for (what, s) in secrets {
            assert!(!log.contains(s), "{what} in the PostgreSQL log");
        }
    });
    drop(files);
}

#[test]
fn bad_input_gets_a_precise_error_and_changes_nothing() {
    let Setup { cluster, pg, files } = setup();
    let dir = files.path();
    let before = cluster.cli_json(&["db", "connection", "list"]);
    let password_file = write(dir, "pw", &pg.admin_password);
    let ca_file = write(dir, "ca.pem", &pg.ca_pem);
    let wrong = write(dir, "wrong", "not-the-password");
    let dead_port = ephemera_testkit::ports::free_loopback_port().unwrap();
    let dead = format!("postgres://{ADMIN_USER}@localhost:{dead_port}/postgres");
    let url = format!("postgres://{ADMIN_USER}@localhost:{}/postgres", pg.port);
    let with_ca: &[&str] = &["--ca-file", &ca_file];
    // (name, url, password file, extra flags, what the error says); none may echo a password.
    type Case<'a> = (&'a str, &'a str, &'a str, &'a [&'a str], &'a [&'a str]);
    let connections: [Case; 4] = [
        // A server that is not there.
        (
            "gone",
            &dead,
            &password_file,
            with_ca,
            &["does not work", "cannot connect"],
        ),
        // A wrong admin password.
        (
            "bad",
            &url,
            &wrong,
            with_ca,
            &["refused the connection's credentials"],
        ),
        // verify-full without a CA.
        ("noca", &url, &password_file, &[], &["needs the CA"]),
        // A password in the URL.
        (
            "x",
            "postgres://u:pw@h/d",
            &password_file,
            &[],
            &["--password-file"],
        ),
    ];
    for (name, url, password, extra, expect) in connections {
        let mut args = vec!["db", "connection", "put", name, "--url", url];
        args.extend(["--password-file", password]);
        args.extend(extra);
        let e = cli_err(&cluster, &args);
        for part in expect {
            assert!(e.contains(part), "{name}: {part}: {e}");
        }
        assert!(
            !e.contains("not-the-password") && !e.contains(&pg.admin_password),
            "{name}: {e}"
        );
    }
    assert_eq!(cluster.cli_json(&["db", "connection", "list"]), before);

    // Roles: an unknown connection, a template without {{name}}, an unknown placeholder, a
    // flag of another kind (refused rather than ignored).
    let creation = write(dir, "creation.sql", CREATION);
    let no_name = write(
        dir,
        "no-name.sql",
        "CREATE ROLE x LOGIN PASSWORD {{password}}",
    );
    let unknown = write(dir, "unknown.sql", &format!("{CREATION} -- {{{{user}}}}"));
    let roles: [(&str, &str, &[&str], &str); 4] = [
        (&creation, "nope", &[], "unknown database connection"),
        (&no_name, "orders", &[], "{{name}}"),
        (&unknown, "orders", &[], "{{user}}"),
        (
            &creation,
            "orders",
            &["--audience", "x"],
            "audience does not apply to postgres roles",
        ),
    ];
    for (file, connection, extra, expect) in roles {
        let mut args = vec!["role", "put", "bad", "--kind", "postgres"];
        args.extend(["--connection", connection, "--creation-statements", file]);
        args.extend(extra);
        args.extend(["--ttl", "10m", "--max-ttl", "1h"]);
        let e = cli_err(&cluster, &args);
        assert!(e.contains(expect), "{expect}: {e}");
    }
    assert!(cluster.cli(&["role", "get", "bad"]).status.code() != Some(0));

    // A TTL over the cap: refused, and no login is created.
    let e = cli_err(&cluster, &["issue", "--role", "app", "--ttl", "2h"]);
    assert!(e.contains("max"), "{e}");
    let leases = cluster.cli_json(&["leases", "list", "--role", "app"]);
    assert_eq!(leases["leases"].as_array().unwrap().len(), 0, "{leases}");
    let e = cli_err(&cluster, &["leases", "list", "--state", "bogus"]);
    assert!(e.contains("must be one of"), "{e}");

    // A connection with logins on it is not deleted without --force; with it, they are
    // abandoned (revoked, audited) and the connection goes.
    let issued = cluster.cli_json(&["issue", "--role", "app"]);
    let e = cli_err(&cluster, &["db", "connection", "delete", "orders"]);
    assert!(e.contains("--force"), "{e}");
    cluster.cli_json(&["db", "connection", "delete", "orders", "--force"]);
    let listed = cluster.cli_json(&["leases", "list", "--role", "app"]);
    assert_eq!(
        lease(&listed, issued["lease_id"].as_str().unwrap())["state"],
        "abandoned"
    );
}

#[test]
fn drops_survive_a_stopped_database_and_a_killed_leader() {
    let Setup {
        mut cluster,
        mut pg,
        files: _files,
    } = setup();
    let rt = rt();
    let a = cluster.cli_json(&["issue", "--role", "app"]);
    let b = cluster.cli_json(&["issue", "--role", "app"]);
    let logins: Vec<(String, String)> = [&a, &b]
        .iter()
        .map(|l| {
            (
                l["lease_id"].as_str().unwrap().to_string(),
                l["username"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    pg.stop().unwrap();
    for (id, _) in &logins {
        cluster.cli_json(&["revoke", id]);
    }
    // Inactive in the cluster at once; revoking, with the database's error, while it is down.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let listed = cluster.cli_json(&["leases", "list", "--state", "revoking"]);
        let waiting = listed["leases"].as_array().unwrap();
        let failing = waiting
            .iter()
            .filter(|l| l["attempts"].as_u64().unwrap_or(0) >= 1)
            .count();
        if failing == 2 {
            let error = waiting[0]["last_error"].as_str().unwrap();
            assert!(error.contains("cannot connect"), "{error}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the drops never failed: {listed}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The leader dies with the drops pending; the database comes back; the new leader
    // finishes them without any operator action.
    let leader = rt.block_on(async { status(&cluster.client()).await.leader_id });
    cluster.kill9(leader);
    pg.resume().unwrap();
    rt.block_on(async {
        for (_, user) in &logins {
            await_dropped(&pg, user, Duration::from_secs(90)).await;
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let listed = cluster.cli_json(&["leases", "list", "--role", "app"]);
        if logins
            .iter()
            .all(|(id, _)| lease(&listed, id)["state"] == "revoked")
        {
            break;
        }
        assert!(Instant::now() < deadline, "not settled: {listed}");
        std::thread::sleep(Duration::from_millis(200));
    }
    cluster.restart(leader);
}

#[test]
fn rotate_root_leaves_the_admin_password_known_to_the_cluster_alone() {
    let Setup {
        cluster,
        pg,
        files: _files,
    } = setup();
    let rt = rt();
    let before = cluster.cli_json(&["issue", "--role", "app"]);
    let rotated = cluster.cli_json(&["db", "connection", "rotate-root", "orders"]);
    assert_eq!(rotated["root_rotation_pending"], false);
    let after = cluster.cli_json(&["issue", "--role", "app"]);
    rt.block_on(async {
        assert!(
            login(&pg, ADMIN_USER, &pg.admin_password).await.is_err(),
            "the old admin password still logs in"
        );
        for l in [&before, &after] {
            let (user, password) = (
                l["username"].as_str().unwrap(),
                l["password"].as_str().unwrap(),
            );
            login(&pg, user, password).await.expect("the login works");
        }
    });
    // Revoking the connection revokes every login on it, and the executor (with the rotated
    // password) drops them.
    let revoked = cluster.cli_json(&["revoke", "--connection", "orders"]);
    assert_eq!(revoked["revoked"], 2);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let listed = cluster.cli_json(&["leases", "list", "--role", "app"]);
        let states: Vec<&str> = [&before, &after]
            .iter()
            .map(|l| {
                lease(&listed, l["lease_id"].as_str().unwrap())["state"]
                    .as_str()
                    .unwrap()
            })
            .collect();
        if states == ["revoked", "revoked"] {
            break;
        }
        assert!(Instant::now() < deadline, "not dropped: {listed}");
        std::thread::sleep(Duration::from_millis(100));
    }
    rt.block_on(async {
        for l in [&before, &after] {
            let (user, password) = (
                l["username"].as_str().unwrap(),
                l["password"].as_str().unwrap(),
            );
            assert!(
                login(&pg, user, password).await.is_err(),
                "{user} still logs in"
            );
        }
    });
    let listed = cluster.cli_json(&["db", "connection", "get", "orders"]);
    assert_eq!(listed["live_leases"], 0);
}

/// The README's tour: `ephemera dev --postgres` starts a server and configures the role
/// `dev-db`; the login it issues works in `psql` with `sslmode=verify-full`, exactly as the
/// printed instructions say.
#[test]
fn dev_postgres_tour_issues_a_login_that_psql_accepts() {
    let cluster = DevCluster::start(1, &["--postgres"]);
    let log = std::fs::read_to_string(cluster.dir.path().join("dev.log")).unwrap();
    let instructions = log
        .lines()
        .find(|l| l.contains("psql \"host=localhost"))
        .unwrap_or_else(|| panic!("no psql instructions in {log}"));
    let conninfo = instructions
        .split('"')
        .nth(1)
        .expect("a quoted conninfo")
        .to_string();
    let issued = cluster.cli_json(&["issue", "--role", "dev-db"]);
    let user = issued["username"].as_str().unwrap();
    let psql = ephemera_testkit::postgres::find_bin()
        .expect("PostgreSQL is installed")
        .join("psql");
    let out = std::process::Command::new(psql)
        .arg(conninfo.replace("USERNAME", user))
        .args([
            "-At",
            "-c",
            "SELECT current_user, ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        ])
        .env("PGPASSWORD", issued["password"].as_str().unwrap())
        .output()
        .expect("run psql");
    assert!(
        out.status.success(),
        "psql: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("{user}|t")
    );
}
