//! `ephemera dev`: a local cluster on loopback, one OS process per node, for development and tests.
//! Re-running it on the same directory restarts the same cluster with its data.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ephemera_client::{pb, Client, TlsFiles};
use tokio::process::{Child, Command};

use crate::DevArgs;

struct DevNode {
    id: u64,
    api: String,
    http: String,
    config: PathBuf,
}

fn free_port() -> Result<u16> {
    Ok(ephemera_chaos::ports::free_loopback_port()?)
}

/// Writes a file readable by its owner only (keys, tokens).
pub fn write_private(path: &Path, contents: &str) -> Result<()> {
    ephemera_chaos::files::write_private(path, contents)
        .with_context(|| format!("cannot write {}", path.display()))
}

fn random_hex(bytes: usize) -> Result<String> {
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
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

/// Creates the cluster CA, an admin identity and a demo workload identity under `dir/pki`.
fn create_pki(dir: &Path, alg: ephemera_pki::KeyAlgorithm) -> Result<ephemera_pki::Ca> {
    use ephemera_pki::{Ca, LeafUse, SpiffeId};
    let pki = dir.join("pki");
    std::fs::create_dir_all(&pki)?;
    let now = std::time::SystemTime::now();
    let ca = Ca::generate_with(alg, TRUST_DOMAIN, now, DEV_CERT_TTL)?;
    std::fs::write(pki.join("ca.crt"), ca.cert_pem())?;
    write_private(&pki.join("ca.key"), &ca.key_pem()?)?;
    for (name, id) in [
        ("admin", ADMIN_ID),
        ("approver", APPROVER_ID),
        ("workload", DEMO_WORKLOAD_ID),
    ] {
        let issued = ca.issue(
            &SpiffeId::parse(id)?,
            LeafUse::Client,
            &[],
            &[],
            now,
            DEV_CERT_TTL,
        )?;
        std::fs::write(pki.join(format!("{name}.crt")), &issued.cert_pem)?;
        write_private(&pki.join(format!("{name}.key")), &issued.key_pem)?;
    }
    Ok(ca)
}

fn admin_tls(dir: &Path) -> Result<TlsFiles> {
    let pki = dir.join("pki");
    Ok(TlsFiles {
        ca_pem: std::fs::read_to_string(pki.join("ca.crt"))?,
        identity: Some((
            std::fs::read_to_string(pki.join("admin.crt"))?,
            std::fs::read_to_string(pki.join("admin.key"))?,
        )),
    })
}

fn node_config(
    dir: &Path,
    id: u64,
    snapshot_logs: Option<u64>,
    node_cert_ttl_s: u64,
    ca: Option<&ephemera_pki::Ca>,
) -> Result<DevNode> {
    let node_dir = dir.join(format!("node-{id}"));
    let config = node_dir.join("config.toml");
    if !config.exists() {
        let ca =
            ca.context("this directory has node data but no configuration; use a fresh --dir")?;
        std::fs::create_dir_all(&node_dir)?;
        let issued = ca.issue(
            &ephemera_pki::SpiffeId::node(TRUST_DOMAIN, id),
            ephemera_pki::LeafUse::Node,
            &["localhost"],
            &[std::net::IpAddr::from([127, 0, 0, 1])],
            std::time::SystemTime::now(),
            DEV_CERT_TTL,
        )?;
        std::fs::write(node_dir.join("tls.crt"), &issued.cert_pem)?;
        write_private(&node_dir.join("tls.key"), &issued.key_pem)?;
        let (api, http, cluster) = (free_port()?, free_port()?, free_port()?);
        let mut text = format!(
            "# ephemera dev node {id}\nnode_id = {id}\ndata_dir = {data:?}\napi_addr = \"127.0.0.1:{api}\"\n\
             http_addr = \"127.0.0.1:{http}\"\ncluster_addr = \"127.0.0.1:{cluster}\"\nkek_file = {kek:?}\n",
            data = node_dir.join("data"),
            kek = dir.join("kek"),
        );
        if id > 1 {
            // Only node 1 is initialised; the others are added to its cluster.
            text.push_str("\n[bootstrap]\njoin = true\n");
        }
        if let Some(n) = snapshot_logs {
            text.push_str(&format!(
                "\n[raft]\nsnapshot_logs_since_last = {n}\nmax_in_snapshot_log_to_keep = 0\n"
            ));
        }
        text.push_str(&format!(
            "\n[tls]\ntrust_domain = \"{TRUST_DOMAIN}\"\nca_file = {ca:?}\ncert_file = {cert:?}\nkey_file = {key:?}\n\
             admin_ids = [\"{ADMIN_ID}\", \"{APPROVER_ID}\"]\nnode_cert_ttl_s = {node_cert_ttl_s}\n",
            ca = dir.join("pki").join("ca.crt"),
            cert = node_dir.join("tls.crt"),
            key = node_dir.join("tls.key"),
        ));
        // Settings for every dev node: `[[oidc_issuers]]` tables in DIR/oidc.toml, and any
        // other tables (e.g. `[guard]`) in DIR/node.toml.
        for extra in ["oidc.toml", "node.toml"] {
            if let Ok(more) = std::fs::read_to_string(dir.join(extra)) {
                text.push_str(&format!("\n# from {extra}\n"));
                text.push_str(&more);
            }
        }
        std::fs::write(&config, text)?;
    }
    let cfg = ephemera_node::NodeConfig::load(&config)?;
    Ok(DevNode {
        id,
        api: cfg.api_addr.to_string(),
        http: cfg.http_addr.to_string(),
        config,
    })
}

fn spawn_node(dir: &Path, node: &DevNode) -> Result<Child> {
    let log_path = dir.join(format!("node-{}", node.id)).join("node.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)?;
    Command::new(std::env::current_exe()?)
        .arg("server")
        .arg("--config")
        .arg(&node.config)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("cannot start node {}", node.id))
}

async fn wait_reachable(addr: &str, tls: &TlsFiles, deadline: Instant) -> Result<()> {
    let client = Client::with_tls(addr, None, Some(tls))?.with_timeout(Duration::from_millis(500));
    loop {
        let r = client
            .admin_call(pb::NodeInfoRequest {}, |mut a, r| async move {
                a.get_node_info(r).await
            })
            .await;
        match r {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => bail!("node at {addr} did not start: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

async fn wait_leader(client: &Client, deadline: Instant) -> Result<()> {
    loop {
        let r = client
            .admin_call(pb::ClusterStatusRequest {}, |mut a, r| async move {
                a.get_cluster_status(r).await
            })
            .await;
        match r {
            Ok(s) if s.leader_id != 0 => return Ok(()),
            Err(e) if Instant::now() > deadline => bail!("the cluster has no leader: {e}"),
            _ if Instant::now() > deadline => bail!("the cluster has no leader"),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

async fn stop_all(children: &mut [Child]) {
    for c in children.iter() {
        if let Some(pid) = c.id() {
            // SAFETY: sending a signal to a child process we spawned.
            unsafe {
                libc::kill(pid as i32, libc::SIGTERM);
            }
        }
    }
    for c in children.iter_mut() {
        if tokio::time::timeout(Duration::from_secs(10), c.wait())
            .await
            .is_err()
        {
            let _ = c.kill().await;
        }
    }
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
    let ca = if fresh {
        write_private(&dir.join("kek"), &format!("{}\n", random_hex(32)?))?;
        Some(create_pki(
            &dir,
            ephemera_pki::KeyAlgorithm::parse(&args.key_algorithm)?,
        )?)
    } else {
        None
    };
    let nodes: Vec<DevNode> = (1..=u64::from(args.nodes))
        .map(|id| {
            node_config(
                &dir,
                id,
                args.snapshot_logs,
                args.node_cert_ttl_s,
                ca.as_ref(),
            )
        })
        .collect::<Result<_>>()?;

    let mut children = Vec::new();
    for n in &nodes {
        match spawn_node(&dir, n) {
            Ok(c) => children.push(c),
            Err(e) => {
                stop_all(&mut children).await;
                return Err(e);
            }
        }
    }
    let result = setup(
        &dir,
        &nodes,
        fresh,
        &env_path,
        &children,
        args.ssh_ca_key.as_deref(),
        args.node_cert_ttl_s > 0,
    )
    .await;
    let token = match result {
        Ok(t) => t,
        Err(e) => {
            stop_all(&mut children).await;
            return Err(e.context(format!("see the node logs in {}", dir.display())));
        }
    };
    drop(token);
    eprintln!(
        "ephemera dev: {} node(s) running; Ctrl-C stops them",
        nodes.len()
    );
    crate::util::shutdown_signal().await;
    eprintln!("ephemera dev: stopping");
    stop_all(&mut children).await;
    Ok(())
}

/// Waits until every node keeps a renewed certificate (`data/tls/node.pem`).
async fn wait_renewed(dir: &Path, nodes: &[DevNode], deadline: Instant) -> Result<()> {
    for n in nodes {
        let renewed = dir.join(format!("node-{}/data/tls/node.pem", n.id));
        while !renewed.exists() {
            if Instant::now() >= deadline {
                bail!(
                    "node {} did not renew its certificate; see its log in {}",
                    n.id,
                    dir.join(format!("node-{}", n.id)).display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

async fn setup(
    dir: &Path,
    nodes: &[DevNode],
    fresh: bool,
    env_path: &Path,
    children: &[Child],
    ssh_ca_key: Option<&Path>,
    renews: bool,
) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let tls = admin_tls(dir)?;
    for n in nodes {
        wait_reachable(&n.api, &tls, deadline).await?;
    }
    let token = if fresh {
        // Init proves control of node 1 with the init secret it wrote in its data directory.
        let secret_file = dir.join("node-1").join("data").join("init.secret");
        let secret = std::fs::read_to_string(&secret_file).with_context(|| {
            format!("cannot read node 1's init secret {}", secret_file.display())
        })?;
        let first = Client::with_tls(&nodes[0].api, Some(secret.trim().to_string()), Some(&tls))?;
        let init = first
            .admin_call(
                pb::InitClusterRequest {
                    issuer: String::new(),
                    ca_cert_pem: std::fs::read_to_string(dir.join("pki/ca.crt"))?,
                    ca_key_pem: std::fs::read_to_string(dir.join("pki/ca.key"))?,
                    policy_text: DEV_POLICY.to_string(),
                    policy_approvals: Some(1),
                    policy_proposal_ttl_s: None,
                    ssh_ca_key: match ssh_ca_key {
                        Some(p) => std::fs::read_to_string(p)
                            .with_context(|| format!("cannot read {}", p.display()))?,
                        None => String::new(),
                    },
                },
                |mut a, r| async move { a.init_cluster(r).await },
            )
            .await
            .context("cluster init")?;
        let cluster = Client::with_tls(&nodes[0].api, None, Some(&tls))?;
        for n in &nodes[1..] {
            cluster
                .add_node(&n.api)
                .await
                .with_context(|| format!("joining node {}", n.id))?;
        }
        // Each node replaces its year-long bootstrap certificate with a short-lived one as soon
        // as it is a member; wait for those renewals so that the cluster handed over is quiet.
        if renews {
            wait_renewed(dir, nodes, Instant::now() + Duration::from_secs(30)).await?;
        }
        init.admin_token
    } else {
        read_env_file(env_path)
            .ok()
            .and_then(|vars| vars.into_iter().find(|(k, _)| k == "EPHEMERA_TOKEN").map(|(_, v)| v))
            .context("this directory holds a cluster but no dev.env with its EPHEMERA_TOKEN; use a fresh --dir")?
    };
    let all_api: Vec<&str> = nodes.iter().map(|n| n.api.as_str()).collect();
    wait_leader(
        &Client::with_tls(&all_api.join(","), None, Some(&tls))?,
        deadline,
    )
    .await?;
    let pids: Vec<String> = children
        .iter()
        .map(|c| c.id().map(|p| p.to_string()).unwrap_or_default())
        .collect();
    let env = format!(
        "export EPHEMERA_ADDR={}\nexport EPHEMERA_HTTP={}\nexport EPHEMERA_PIDS={}\n\
         # mTLS identity of the cluster administrator:\n\
         export EPHEMERA_CA={pki}/ca.crt\nexport EPHEMERA_CERT={pki}/admin.crt\nexport EPHEMERA_KEY={pki}/admin.key\n\
         # a second administrator, to approve policy changes (`EPHEMERA_CERT=$EPHEMERA_APPROVER_CERT ...`):\n\
         export EPHEMERA_APPROVER_CERT={pki}/approver.crt\nexport EPHEMERA_APPROVER_KEY={pki}/approver.key\n\
         # break-glass credential (every use is audited):\nexport EPHEMERA_TOKEN={}\nexport EPHEMERA_DEV_DIR={}\n",
        all_api.join(","),
        nodes.iter().map(|n| format!("https://{}", n.http)).collect::<Vec<_>>().join(","),
        pids.join(","),
        token,
        dir.display(),
        pki = dir.join("pki").display(),
    );
    write_private(env_path, &env)?;
    println!("# written to {}\n{env}", env_path.display());
    Ok(token)
}
