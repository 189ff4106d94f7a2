//! `ephemera dev`: a local cluster on loopback, one OS process per node, for development and tests.
//! Re-running it on the same directory restarts the same cluster with its data.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ephemera_client::{pb, Client};
use ephemera_testkit::{ClusterSpec, LocalCluster};

use crate::DevArgs;

/// Writes a file readable by its owner only (keys, tokens).
pub fn write_private(path: &Path, contents: &str) -> Result<()> {
    ephemera_testkit::files::write_private(path, contents)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Reads `KEY=value` (optionally `export KEY=value`) lines.
pub fn read_env_file(path: &Path) -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path)?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let l = l.trim().strip_prefix("export ").unwrap_or(l.trim());
            let (k, v) = l.split_once('=')?;
            Some((k.to_string(), v.trim_matches('\'').to_string()))
        })
        .collect())
}

/// The dev cluster's trust domain and its identities.
pub const TRUST_DOMAIN: &str = "ephemera.dev";
const ADMIN_ID: &str = "spiffe://ephemera.dev/admin";
/// A second administrator, so that policy changes can be approved by someone other than their
/// proposer (separation of duties).
const APPROVER_ID: &str = "spiffe://ephemera.dev/approver";
/// Policy version 1 of a dev cluster.
const DEV_POLICY: &str = include_str!("../../../deploy/policies/dev.cedar");
const DEMO_WORKLOAD_ID: &str = "spiffe://ephemera.dev/workload/demo";
/// Dev certificates live a year (the nodes' are bootstrap certificates: each node replaces
/// its own with a short-lived one from the cluster CA); workload SVIDs are short-lived.
const DEV_CERT_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// Creates the directory (KEK, cluster CA, the admin, approver and demo workload identities)
/// and configures `nodes` nodes in it.
fn create(dir: &Path, args: &DevArgs) -> Result<LocalCluster> {
    let mut spec = ClusterSpec::new(TRUST_DOMAIN);
    spec.key_algorithm = ephemera_pki::KeyAlgorithm::parse(&args.key_algorithm)?;
    spec.cert_ttl = DEV_CERT_TTL;
    spec.identities = [
        ("admin", ADMIN_ID),
        ("approver", APPROVER_ID),
        ("workload", DEMO_WORKLOAD_ID),
    ]
    .iter()
    .map(|(n, id)| (n.to_string(), id.to_string()))
    .collect();
    let mut cluster = LocalCluster::create(dir, &std::env::current_exe()?, &spec)?;
    // Settings for every dev node: `[[oidc_issuers]]` tables in DIR/oidc.toml, and any other
    // tables (e.g. `[guard]`) in DIR/node.toml.
    let mut overlays = Vec::new();
    for extra in ["oidc.toml", "node.toml"] {
        if let Ok(text) = std::fs::read_to_string(dir.join(extra)) {
            overlays.push((extra, text));
        }
    }
    for id in 1..=u64::from(args.nodes) {
        cluster.add_node(id, |c| {
            // Only node 1 is initialised; the others are added to its cluster.
            c.bootstrap.join = id > 1;
            if let Some(n) = args.snapshot_logs {
                c.raft.snapshot_logs_since_last = n;
                c.raft.max_in_snapshot_log_to_keep = 0;
            }
            if let Some(tls) = c.tls.as_mut() {
                tls.admin_ids = vec![ADMIN_ID.into(), APPROVER_ID.into()];
                tls.node_cert_ttl_s = args.node_cert_ttl_s;
            }
            for (name, text) in &overlays {
                *c = ephemera_testkit::overlay::apply(c, text).map_err(|e| {
                    ephemera_node::config::ConfigError::Invalid(format!(
                        "{}: {e}",
                        dir.join(name).display()
                    ))
                })?;
            }
            Ok(())
        })?;
    }
    Ok(cluster)
}

pub async fn run(args: &DevArgs) -> Result<()> {
    if args.nodes == 0 || args.nodes > 9 {
        bail!("--nodes must be between 1 and 9");
    }
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("cannot create {}", args.dir.display()))?;
    let dir = args.dir.canonicalize()?;
    let env_path = dir.join("dev.env");
    let fresh = !dir.join("node-1").join("config.toml").exists();
    let mut cluster = if fresh {
        create(&dir, args)?
    } else {
        let cluster = LocalCluster::open(&dir, &std::env::current_exe()?, TRUST_DOMAIN)?;
        let want: Vec<u64> = (1..=u64::from(args.nodes)).collect();
        if cluster.ids() != want {
            bail!(
                "{} holds nodes {:?}, not 1 to {}; use the same --nodes or a fresh --dir",
                dir.display(),
                cluster.ids(),
                args.nodes
            );
        }
        cluster
    };
    let mut started = Ok(());
    for id in cluster.ids() {
        if let Err(e) = cluster.spawn(id) {
            started = Err(e);
            break;
        }
    }
    let result = match started {
        Ok(()) => {
            setup(
                &cluster,
                fresh,
                &env_path,
                args.ssh_ca_key.as_deref(),
                args.node_cert_ttl_s > 0,
                args.postgres,
            )
            .await
        }
        Err(e) => Err(e.into()),
    };
    let _postgres = match result {
        Ok(pg) => pg,
        Err(e) => {
            let _ = cluster.stop_all_async().await;
            return Err(e.context(format!("see the node logs in {}", dir.display())));
        }
    };
    eprintln!(
        "ephemera dev: {} node(s) running; Ctrl-C stops them",
        args.nodes
    );
    crate::util::shutdown_signal().await;
    eprintln!("ephemera dev: stopping");
    cluster.stop_all_async().await?;
    Ok(())
}

/// Waits until every node keeps a renewed certificate (`data/tls/node.pem`).
async fn wait_renewed(cluster: &LocalCluster, deadline: Instant) -> Result<()> {
    for id in cluster.ids() {
        let renewed = cluster.config(id).renewed_cert_dir().join("node.pem");
        while !renewed.exists() {
            if Instant::now() >= deadline {
                bail!(
                    "node {id} did not renew its certificate; see {}",
                    cluster.layout().node_log(id).display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

async fn setup(
    cluster: &LocalCluster,
    fresh: bool,
    env_path: &Path,
    ssh_ca_key: Option<&Path>,
    renews: bool,
    postgres: bool,
) -> Result<Option<ephemera_testkit::postgres::PgServer>> {
    let within = Duration::from_secs(20);
    let tls = cluster.tls(Some("admin"))?;
    for id in cluster.ids() {
        cluster.wait_answers(id, &tls, within).await?;
    }
    let layout = cluster.layout();
    let token = if fresh {
        let init = cluster
            .init(
                1,
                pb::InitClusterRequest {
                    issuer: String::new(),
                    ca_cert_pem: std::fs::read_to_string(layout.ca_cert())?,
                    ca_key_pem: std::fs::read_to_string(layout.ca_key())?,
                    policy_text: DEV_POLICY.to_string(),
                    policy_approvals: Some(1),
                    policy_proposal_ttl_s: None,
                    ssh_ca_key: match ssh_ca_key {
                        Some(p) => std::fs::read_to_string(p)
                            .with_context(|| format!("cannot read {}", p.display()))?,
                        None => String::new(),
                    },
                },
                &tls,
            )
            .await
            .context("cluster init")?;
        let first = Client::with_tls(&cluster.config(1).api_addr.to_string(), None, Some(&tls))?;
        for id in cluster.ids().into_iter().skip(1) {
            cluster
                .join(&first, id)
                .await
                .with_context(|| format!("joining node {id}"))?;
        }
        // Each node replaces its year-long bootstrap certificate with a short-lived one as soon
        // as it is a member; wait for those renewals so that the cluster handed over is quiet.
        if renews {
            wait_renewed(cluster, Instant::now() + Duration::from_secs(30)).await?;
        }
        init.admin_token
    } else {
        read_env_file(env_path)
            .ok()
            .and_then(|vars| vars.into_iter().find(|(k, _)| k == "EPHEMERA_TOKEN").map(|(_, v)| v))
            .context("this directory holds a cluster but no dev.env with its EPHEMERA_TOKEN; use a fresh --dir")?
    };
    cluster.leader(None, &tls, within).await?;
    let all_api = cluster.api_addrs();
    let pids: Vec<String> = cluster
        .ids()
        .into_iter()
        .map(|id| cluster.pid(id).map(|p| p.to_string()).unwrap_or_default())
        .collect();
    let env = format!(
        "export EPHEMERA_ADDR={}\nexport EPHEMERA_HTTP={}\nexport EPHEMERA_PIDS={}\n\
         # mTLS identity of the cluster administrator:\n\
         export EPHEMERA_CA={pki}/ca.crt\nexport EPHEMERA_CERT={pki}/admin.crt\nexport EPHEMERA_KEY={pki}/admin.key\n\
         # a second administrator, to approve policy changes (`EPHEMERA_CERT=$EPHEMERA_APPROVER_CERT ...`):\n\
         export EPHEMERA_APPROVER_CERT={pki}/approver.crt\nexport EPHEMERA_APPROVER_KEY={pki}/approver.key\n\
         # break-glass credential (every use is audited):\nexport EPHEMERA_TOKEN={}\nexport EPHEMERA_DEV_DIR={}\n",
        all_api.join(","),
        cluster
            .ids()
            .into_iter()
            .map(|id| format!("https://{}", cluster.config(id).http_addr))
            .collect::<Vec<_>>()
            .join(","),
        pids.join(","),
        token,
        layout.root().display(),
        pki = layout.root().join("pki").display(),
    );
    // Before dev.env exists (its presence means "ready").
    let postgres = match postgres {
        true => Some(start_postgres(cluster, layout.root()).await?),
        false => None,
    };
    write_private(env_path, &env)?;
    println!("# written to {}\n{env}", env_path.display());
    Ok(postgres)
}

/// The PostgreSQL tour's connection and role.
const DEV_CONNECTION: &str = "dev-postgres";
const DEV_DB_ROLE: &str = "dev-db";

/// Starts a fresh PostgreSQL server in `DIR/postgres` (TLS, SCRAM, 127.0.0.1 only) and points
/// the connection `dev-postgres` and the role `dev-db` at it. The server lives as long as
/// `ephemera dev`; logins issued against an earlier run's server fail their effects, which the
/// cluster keeps retrying (revoke or abandon them).
async fn start_postgres(
    cluster: &LocalCluster,
    dir: &Path,
) -> Result<ephemera_testkit::postgres::PgServer> {
    use ephemera_testkit::postgres::PgServer;
    let pg_dir = dir.join("postgres");
    if pg_dir.exists() {
        std::fs::remove_dir_all(&pg_dir)
            .with_context(|| format!("cannot remove {}", pg_dir.display()))?;
    }
    let server = PgServer::start(&pg_dir).context("starting PostgreSQL")?;
    let ca_path = dir.join("postgres-ca.pem");
    std::fs::write(&ca_path, &server.ca_pem)?;
    let tls = cluster.tls(Some("admin"))?;
    let admin = Client::with_tls(&cluster.api_addrs().join(","), None, Some(&tls))?;
    // The previous run's server is gone, and its logins with it: abandon them (audited) rather
    // than retry their drops against a server that never had them.
    let forget = pb::DeleteDbConnectionRequest {
        name: DEV_CONNECTION.into(),
        force: true,
    };
    match admin
        .admin_call(
            forget,
            |mut a, r| async move { a.delete_db_connection(r).await },
        )
        .await
    {
        Ok(_) => {}
        Err(e) if e.code() == Some(tonic::Code::NotFound) => {}
        Err(e) => return Err(anyhow::Error::new(e).context("forgetting the previous dev-postgres")),
    }
    let role = pb::Role {
        name: DEV_DB_ROLE.into(),
        creation_statements: vec![
            "CREATE ROLE {{name}} LOGIN PASSWORD {{password}} VALID UNTIL {{expiration}};\n\
             GRANT pg_read_all_data TO {{name}};"
                .into(),
        ],
        default_ttl_s: 600,
        max_ttl_s: 3600,
        ..Default::default()
    };
    server
        .configure(&admin, DEV_CONNECTION, role)
        .await
        .context("configuring the connection dev-postgres and the role dev-db")?;
    println!(
        "# PostgreSQL on 127.0.0.1:{port} (TLS; its CA is {ca}); the role {DEV_DB_ROLE} issues \
         logins on it:\n#   ephemera issue --role {DEV_DB_ROLE} --output json\n#   psql \
         \"host=localhost port={port} dbname=postgres user=USERNAME sslmode=verify-full \
         sslrootcert={ca}\"",
        port = server.port,
        ca = ca_path.display(),
    );
    Ok(server)
}
