//! The login operations against a real PostgreSQL server started on 127.0.0.1, over TLS
//! checked with `verify-full`: what the database itself says is what counts.

use std::time::Duration;

use ephemera_core::state::SslMode;
use ephemera_postgres::{create_login, drop_login, extend_login, Connection, Statements};
use ephemera_testkit::postgres::{PgServer, ADMIN_USER};
use tokio_postgres::Client;

const DEADLINE: Duration = Duration::from_secs(20);

fn admin(pg: &PgServer, sslmode: SslMode) -> Connection {
    Connection {
        host: "localhost".into(),
        port: pg.port,
        database: "postgres".into(),
        user: ADMIN_USER.into(),
        password: pg.admin_password.clone().into(),
        sslmode,
        ca_pem: Some(pg.ca_pem.clone()),
    }
}

async fn login_as(
    pg: &PgServer,
    user: &str,
    password: &str,
) -> Result<Client, tokio_postgres::Error> {
    let c = Connection {
        user: user.into(),
        password: password.to_string().into(),
        ..admin(pg, SslMode::VerifyFull)
    };
    let mut cfg = tokio_postgres::Config::new();
    cfg.host(&c.host)
        .port(c.port)
        .dbname(&c.database)
        .user(&c.user)
        .password(c.password.as_bytes())
        .connect_timeout(DEADLINE);
    let (client, conn) = cfg.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

async fn admin_client(pg: &PgServer) -> Client {
    login_as(pg, ADMIN_USER, &pg.admin_password)
        .await
        .expect("admin connects")
}

async fn valid_until(admin: &Client, name: &str) -> Option<String> {
    admin
        .query_opt(
            "SELECT to_char(rolvaliduntil AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.MS') \
             FROM pg_roles WHERE rolname = $1",
            &[&name],
        )
        .await
        .unwrap()
        .map(|r| r.get(0))
}

fn creation() -> Vec<String> {
    vec![
        "CREATE ROLE {{name}} LOGIN PASSWORD {{password}} VALID UNTIL {{expiration}}".into(),
        "GRANT USAGE, CREATE ON SCHEMA public TO {{name}}".into(),
        "GRANT USAGE ON SEQUENCE ids TO {{name}}".into(),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_are_created_extended_and_dropped_on_a_real_server() {
    let dir = tempfile::tempdir().unwrap();
    let pg = PgServer::start(&dir.path().join("pg")).expect("PostgreSQL starts");
    let root = admin_client(&pg).await;
    root.batch_execute("CREATE SEQUENCE ids").await.unwrap();
    let conn = admin(&pg, SslMode::VerifyFull);
    let creation = creation();
    let st = Statements {
        creation: &creation,
        revocation: &[],
        renew: &[],
        terminate_sessions: true,
    };
    // A name with a quote in it is quoted, not concatenated.
    let name = "eph_o'brien\"x_0011";
    let password = "Pw-0123456789abcdefXYZ";
    let t0 = 4_102_444_800_000u64; // 2100-01-01
    create_login(&conn, &st, name, password, t0, DEADLINE)
        .await
        .unwrap();
    assert_eq!(
        valid_until(&root, name).await.as_deref(),
        Some("2100-01-01 00:00:00.000")
    );
    // Created twice (an outcome that was lost) is the same login.
    create_login(&conn, &st, name, password, t0, DEADLINE)
        .await
        .unwrap();

    let session = login_as(&pg, name, password)
        .await
        .expect("the login logs in");
    // It owns something and holds a sequence privilege: the drop must still succeed.
    session
        .batch_execute("CREATE TABLE owned_by_login (id int); SELECT nextval('ids')")
        .await
        .unwrap();
    assert!(login_as(&pg, name, "wrong-password").await.is_err());

    extend_login(&conn, &st, name, t0 + 3_600_000, DEADLINE)
        .await
        .unwrap();
    assert_eq!(
        valid_until(&root, name).await.as_deref(),
        Some("2100-01-01 01:00:00.000")
    );

    drop_login(&conn, &st, name, DEADLINE).await.unwrap();
    assert_eq!(valid_until(&root, name).await, None, "the role is gone");
    // The session opened before the drop is over.
    assert!(session.simple_query("SELECT 1").await.is_err());
    assert!(login_as(&pg, name, password).await.is_err());
    // The table it owned went to the connection's user.
    let owner: String = root
        .query_one(
            "SELECT tableowner FROM pg_tables WHERE tablename = 'owned_by_login'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(owner, ADMIN_USER);
    // Dropping what is gone is success; extending it is not.
    drop_login(&conn, &st, name, DEADLINE).await.unwrap();
    let err = extend_login(&conn, &st, name, t0, DEADLINE)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_is_checked_and_errors_never_carry_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let mut pg = PgServer::start(&dir.path().join("pg")).expect("PostgreSQL starts");
    // verify-full against another CA is refused before any password is sent.
    let other = ephemera_pki::Ca::generate(
        "other.test",
        std::time::SystemTime::now(),
        Duration::from_secs(3600),
    )
    .unwrap();
    let wrong_ca = Connection {
        ca_pem: Some(other.cert_pem().to_string()),
        ..admin(&pg, SslMode::VerifyFull)
    };
    let creation = creation();
    let st = Statements {
        creation: &creation,
        revocation: &[],
        renew: &[],
        terminate_sessions: true,
    };
    let err = drop_login(&wrong_ca, &st, "eph_x", DEADLINE)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("cannot connect"), "{err}");
    // `require` encrypts without checking, as libpq's does.
    ephemera_postgres::check(&admin(&pg, SslMode::Require), DEADLINE)
        .await
        .unwrap();
    ephemera_postgres::check(&admin(&pg, SslMode::VerifyFull), DEADLINE)
        .await
        .unwrap();

    // A statement the server rejects, at the password: the error names the statement, and
    // the password is scrubbed from whatever the server echoed.
    let password = "Secret-Pw-5551234";
    let broken = vec!["CREATE ROLE {{name}} LOGIN PASSWORD {{password}} {{password}}".to_string()];
    let st_broken = Statements {
        creation: &broken,
        ..st
    };
    let err = create_login(
        &admin(&pg, SslMode::VerifyFull),
        &st_broken,
        "eph_y",
        password,
        0,
        DEADLINE,
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(err.contains("creation statement 1"), "{err}");
    assert!(!err.contains(password), "{err}");
    // The server logged the failing statement (and, with `log_statement=all`, every other):
    // it saw the password's verifier, never the password.
    let log = pg.log();
    assert!(
        log.contains("SCRAM-SHA-256$4096:"),
        "the statement is logged"
    );
    assert!(
        !log.contains(password),
        "the server's log holds the password"
    );
    let root = admin_client(&pg).await;
    assert_eq!(
        valid_until(&root, "eph_y").await,
        None,
        "one transaction: nothing was created"
    );
    drop(root);

    // The server down: a precise, retryable error within the deadline.
    pg.stop().unwrap();
    let err = drop_login(&admin(&pg, SslMode::VerifyFull), &st, "eph_x", DEADLINE)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("cannot connect"), "{err}");
    assert!(!err.to_string().contains(&pg.admin_password), "{err}");
}

/// The commit fence is the server's, not this process's timer: a creation whose statements are
/// still running when the attempt's deadline passes (as when the leader was stopped halfway,
/// and its own timer could not fire) is refused at `COMMIT`, and nothing is created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_refuses_a_creation_that_commits_after_its_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let pg = PgServer::start(&dir.path().join("pg")).expect("PostgreSQL starts");
    let root = admin_client(&pg).await;
    let conn = admin(&pg, SslMode::VerifyFull);
    let slow = vec![
        "CREATE ROLE {{name}} LOGIN PASSWORD {{password}} VALID UNTIL {{expiration}}".to_string(),
        "SELECT pg_sleep(1.5)".to_string(),
    ];
    let st = Statements {
        creation: &slow,
        revocation: &[],
        renew: &[],
        terminate_sessions: true,
    };
    let until = 4_102_444_800_000;
    // The fence passes during the sleep; the client's own deadline is far away.
    let fence = std::time::Instant::now() + Duration::from_millis(800);
    let e = ephemera_postgres::create_login_fenced(
        &conn,
        &st,
        ("late_login", "pw-late-123", until),
        fence,
        DEADLINE,
    )
    .await
    .unwrap_err();
    assert!(
        e.to_string().contains("deadline passed before its commit"),
        "{e}"
    );
    assert_eq!(
        valid_until(&root, "late_login").await,
        None,
        "the login was created"
    );
    // The same creation within its deadline commits.
    let fence = std::time::Instant::now() + Duration::from_secs(15);
    ephemera_postgres::create_login_fenced(
        &conn,
        &st,
        ("timely_login", "pw-timely-123", until),
        fence,
        DEADLINE,
    )
    .await
    .unwrap();
    assert!(valid_until(&root, "timely_login").await.is_some());
}
