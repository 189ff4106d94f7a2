//! Deployment: clusters that form and heal themselves from a peer list (real node processes on
//! loopback), readiness across a partition, and the systemd unit and Kubernetes manifests
//! checked by the tools their platforms use.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use ephemera_chaos::proxy;
use ephemera_client::{pb, Client, TlsFiles};
use ephemera_node::config::PeerAddr;
use ephemera_testkit::cluster::{ClusterSpec, LocalCluster};

const TRUST_DOMAIN: &str = "deploy.test";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A cluster directory with `n` nodes that list each other in `[cluster] peers` and form the
/// cluster once all `n` answer. Nothing started.
fn peer_listed(root: &Path, n: u64) -> LocalCluster {
    let mut c =
        LocalCluster::create(root, Path::new(BIN), &ClusterSpec::new(TRUST_DOMAIN)).unwrap();
    for id in 1..=n {
        c.add_node(id, |cfg| {
            cfg.request_timeout_ms = 3000;
            Ok(())
        })
        .unwrap();
    }
    let peers: Vec<PeerAddr> = (1..=n)
        .map(|id| PeerAddr {
            id,
            addr: c.config(id).cluster_addr.to_string(),
        })
        .collect();
    let ca_key = c.layout().ca_key();
    for id in 1..=n {
        c.update_config(id, |cfg| {
            cfg.cluster.peers = peers.clone();
            cfg.cluster.bootstrap_expect = n as usize;
            cfg.cluster.ca_key_file = Some(ca_key.clone());
        })
        .unwrap();
    }
    c
}

/// The break-glass credential the forming node wrote, once it has.
async fn admin_credential(c: &LocalCluster, within: Duration) -> String {
    let path = c.config(1).admin_credential_path();
    let deadline = Instant::now() + within;
    loop {
        if let Ok(text) = std::fs::read_to_string(&path) {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "the credential file is private");
            return text.trim().to_string();
        }
        assert!(
            Instant::now() < deadline,
            "node 1 did not form the cluster within {within:?}; see {}",
            c.layout().node_log(1).display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn client(c: &LocalCluster, ids: &[u64], token: &str, tls: &TlsFiles) -> Client {
    let addrs: Vec<String> = ids
        .iter()
        .map(|id| c.config(*id).api_addr.to_string())
        .collect();
    Client::with_tls(&addrs.join(","), Some(token.to_string()), Some(tls))
        .unwrap()
        .with_timeout(Duration::from_secs(10))
}

/// Waits until `via` reports exactly `ids` as voters with one of them leading, every one of
/// them at the same applied index.
async fn wait_voters(via: &Client, ids: &[u64], within: Duration) -> pb::ClusterStatus {
    let deadline = Instant::now() + within;
    let mut last = None;
    loop {
        if let Ok(s) = via
            .admin_call(pb::ClusterStatusRequest {}, |mut a, r| async move {
                a.get_cluster_status(r).await
            })
            .await
        {
            let mut voters: Vec<u64> = s.nodes.iter().filter(|n| n.voter).map(|n| n.id).collect();
            voters.sort();
            let applied: Vec<u64> = s.nodes.iter().map(|n| n.applied_index).collect();
            if voters == ids
                && s.nodes.len() == ids.len()
                && ids.contains(&s.leader_id)
                && applied.windows(2).all(|w| w[0] == w[1])
            {
                return s;
            }
            last = Some(s);
        }
        assert!(
            Instant::now() < deadline,
            "voters never became {ids:?}; last status {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `GET /readyz` (or `/healthz`) on node `id`: the status code, or 0 when it did not answer.
async fn probe(c: &LocalCluster, id: u64, path: &str) -> u16 {
    let http = reqwest::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(
            reqwest::Certificate::from_pem(
                std::fs::read_to_string(c.layout().ca_cert())
                    .unwrap()
                    .as_bytes(),
            )
            .unwrap(),
        )
        .timeout(Duration::from_secs(4))
        .build()
        .unwrap();
    let url = format!("https://{}{path}", c.config(id).http_addr);
    match http.get(url).send().await {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    }
}

async fn wait_probe(c: &LocalCluster, id: u64, path: &str, want: u16, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let got = probe(c, id, path).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "node {id} {path} answered {got}, not {want}, for {within:?}; see {}",
            c.layout().node_log(id).display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One issuance. Right after a `kill -9` the survivors may still name the dead leader, and a
/// forward to it is answered "outcome unknown; retry with the same request id": the client's
/// contract, which this follows until the new leader answers.
async fn issue(via: &Client) -> pb::Credential {
    let mut req = issue_req("deploy");
    req.request_id = Some(ephemera_client::new_request_id());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match via.issue(req.clone()).await {
            Ok(c) => return c,
            Err(e) if Instant::now() < deadline => {
                eprintln!("issuance: {e}; retrying with the same request id");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("issuance: {e}"),
        }
    }
}

/// Three processes started with the same peer list form a cluster with no manual step; it
/// serves, survives `kill -9` of each node in turn (the restarted node rejoins by itself), and
/// a node whose data directory is replaced is removed and added again, never taken back in
/// place: here the node that formed the cluster, which must not form a second one.
#[test]
fn nodes_listing_each_other_form_a_cluster_and_heal_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = peer_listed(dir.path(), 3);
    let tls = c.tls(None).unwrap();
    for id in 1..=3 {
        c.spawn(id).unwrap();
    }
    rt().block_on(async {
        let token = admin_credential(&c, Duration::from_secs(60)).await;
        let all = client(&c, &[1, 2, 3], &token, &tls);
        wait_voters(&all, &[1, 2, 3], Duration::from_secs(60)).await;
        for id in 1..=3 {
            assert!(
                !c.config(id).init_secret_path().exists(),
                "node {id} wrote an init secret, yet it forms its cluster itself"
            );
        }
        put_role(&all, "deploy", 600, 3600).await;
        let first = issue(&all).await;

        for victim in 1..=3u64 {
            c.kill9(victim).unwrap();
            let survivors: Vec<u64> = (1..=3).filter(|i| *i != victim).collect();
            let via = client(&c, &survivors, &token, &tls);
            issue(&via).await;
            c.spawn(victim).unwrap();
            wait_voters(&via, &[1, 2, 3], Duration::from_secs(60)).await;
            wait_probe(&c, victim, "/readyz", 200, Duration::from_secs(30)).await;
        }

        // Node 1 comes back with an empty data directory.
        c.stop(1).unwrap();
        let data = c.config(1).data_dir.clone();
        std::fs::remove_dir_all(&data).unwrap();
        let log_before = std::fs::read_to_string(c.layout().node_log(1))
            .unwrap()
            .len();
        c.spawn(1).unwrap();
        let via = client(&c, &[2, 3], &token, &tls);
        wait_voters(&via, &[1, 2, 3], Duration::from_secs(90)).await;
        wait_probe(&c, 1, "/readyz", 200, Duration::from_secs(30)).await;
        let leader_log = [2, 3]
            .map(|id| std::fs::read_to_string(c.layout().node_log(id)).unwrap_or_default())
            .join("\n");
        assert!(
            leader_log.contains("removing it, to add it again"),
            "the leader did not remove the wiped node before adding it"
        );
        let node1_log = std::fs::read_to_string(c.layout().node_log(1)).unwrap();
        assert!(
            !node1_log[log_before..].contains("formed the cluster"),
            "the wiped node formed a cluster of its own"
        );
        // One cluster, one history: the lease issued at the start is on every node, and all
        // digests agree.
        let clients: Vec<Client> = (1..=3).map(|id| client(&c, &[id], &token, &tls)).collect();
        converged(&clients, Duration::from_secs(30)).await;
        let n1 = &clients[0];
        let leases = all_leases(n1).await;
        assert!(leases.iter().any(|l| l.id == first.lease_id));
    });
    c.stop_all().unwrap();
}

/// Readiness means "a leader confirmed its leadership and this node has applied what was
/// committed": a follower cut off from the others, and then the leader cut off from its
/// quorum, turn unready (while still live), the majority side is ready, and each is ready
/// again once the partition heals.
#[test]
fn readiness_is_lost_across_a_partition_and_regained_after() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = peer_listed(dir.path(), 3);
    rt().block_on(async {
        // Every node dials each peer through its own proxy for that link.
        let mut links = std::collections::HashMap::new();
        for a in 1..=3u64 {
            let mut overrides = Vec::new();
            for b in (1..=3u64).filter(|b| *b != a) {
                let (addr, link, _task) = proxy::start(c.config(b).cluster_addr).await.unwrap();
                links.insert((a, b), link);
                overrides.push(PeerAddr {
                    id: b,
                    addr: addr.to_string(),
                });
            }
            c.update_config(a, |cfg| cfg.peer_cluster_addrs = overrides)
                .unwrap();
        }
        for id in 1..=3 {
            c.spawn(id).unwrap();
        }
        let tls = c.tls(None).unwrap();
        let token = admin_credential(&c, Duration::from_secs(60)).await;
        let all = client(&c, &[1, 2, 3], &token, &tls);
        let status = wait_voters(&all, &[1, 2, 3], Duration::from_secs(60)).await;
        for id in 1..=3 {
            wait_probe(&c, id, "/readyz", 200, Duration::from_secs(30)).await;
        }
        // First a follower, then the leader: a leader cut off from its quorum still believes
        // it leads (openraft does not step down), and readiness must not.
        let follower = (1..=3u64).find(|id| *id != status.leader_id).unwrap();
        for cut in [follower, status.leader_id] {
            let block = |blocked: bool| {
                for ((a, b), link) in &links {
                    if *a == cut || *b == cut {
                        link.set(|s| s.blocked = blocked);
                    }
                }
            };
            block(true);
            wait_probe(&c, cut, "/readyz", 503, Duration::from_secs(20)).await;
            // And it stays unready while cut off (past its election timeout too), while live.
            let until = Instant::now() + Duration::from_secs(3);
            while Instant::now() < until {
                assert_eq!(
                    probe(&c, cut, "/readyz").await,
                    503,
                    "node {cut} turned ready"
                );
                assert_eq!(
                    probe(&c, cut, "/healthz").await,
                    200,
                    "node {cut} is still live"
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            // The majority side (with a new leader if the leader was cut) is ready.
            for id in (1..=3u64).filter(|id| *id != cut) {
                wait_probe(&c, id, "/readyz", 200, Duration::from_secs(20)).await;
            }
            block(false);
            wait_probe(&c, cut, "/readyz", 200, Duration::from_secs(30)).await;
        }
    });
    c.stop_all().unwrap();
}

/// Runs `cmd`, returning its exit status and everything it printed.
fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (tests/run.sh installs it)"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The unit passes `systemd-analyze verify` with no complaint at all (verify exits 0 on unknown
/// keys and bad values, so any output fails the test), with ExecStart pointed at the binary
/// under test; its exposure stays at most 2.0; and its example configuration is valid.
#[test]
fn the_systemd_unit_verifies_and_its_config_is_valid() {
    let unit = std::fs::read_to_string(repo().join("deploy/systemd/ephemera.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/ephemera server"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ephemera.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/ephemera", BIN)).unwrap();
    let (ok, out) = run(Command::new("systemd-analyze").arg("verify").arg(&path));
    assert!(ok && out.trim().is_empty(), "systemd-analyze verify: {out}");
    let (ok, out) = run(Command::new("systemd-analyze").args([
        "security",
        "--offline=true",
        "--threshold=20",
        path.to_str().unwrap(),
    ]));
    assert!(ok, "systemd-analyze security: exposure above 2.0\n{out}");

    let (ok, out) = run(Command::new(BIN).args([
        "server",
        "--config",
        repo().join("deploy/systemd/node.toml").to_str().unwrap(),
        "--check",
    ]));
    assert!(ok, "deploy/systemd/node.toml: {out}");
}

/// The manifests validate against the Kubernetes schemas (strict: unknown fields fail).
#[test]
fn the_kubernetes_manifests_validate() {
    let (ok, out) = run(Command::new("python3").args([
        "-m",
        "kubernetes_validate",
        "--strict",
        "--quiet",
        repo()
            .join("deploy/kubernetes/ephemera.yaml")
            .to_str()
            .unwrap(),
    ]));
    assert!(ok, "kubernetes-validate: {out}");
}

/// The pod start script, run as the pod runs it: for each ordinal it renders a configuration
/// the node accepts, whose id is the ordinal + 1 and whose advertised cluster address is the
/// one the peer list gives that id; the key files it copies are private. A pod name without an
/// ordinal is refused.
#[test]
fn the_pod_start_script_renders_a_valid_config_per_ordinal() {
    let dir = tempfile::tempdir().unwrap();
    let etc = dir.path().join("etc");
    // The ConfigMap's files, as Kubernetes mounts them.
    let (ok, out) = run(Command::new("python3").args([
        "-c",
        "import sys, yaml, os\n\
         docs = yaml.safe_load_all(open(sys.argv[1]))\n\
         cm = next(d for d in docs if d and d['kind'] == 'ConfigMap')\n\
         os.makedirs(sys.argv[2])\n\
         for name, text in cm['data'].items():\n\
         \x20   open(os.path.join(sys.argv[2], name), 'w').write(text)\n",
        repo()
            .join("deploy/kubernetes/ephemera.yaml")
            .to_str()
            .unwrap(),
        etc.join("config").to_str().unwrap(),
    ]));
    assert!(ok, "extracting the ConfigMap: {out}");
    for (sub, file) in [
        ("kek", "kek"),
        ("ca", "ca.key"),
        ("tls", "node-1.key"),
        ("tls", "node-2.key"),
        ("tls", "node-3.key"),
    ] {
        std::fs::create_dir_all(etc.join(sub)).unwrap();
        std::fs::write(etc.join(sub).join(file), "secret\n").unwrap();
    }
    for ordinal in 0..3u64 {
        let run_dir = dir.path().join(format!("run-{ordinal}"));
        std::fs::create_dir_all(&run_dir).unwrap();
        let pod = format!("ephemera-{ordinal}");
        let (ok, out) = run(Command::new("sh")
            .arg(etc.join("config/start.sh"))
            .arg("--check")
            .env("POD_NAME", &pod)
            .env("POD_NAMESPACE", "prod")
            .env("EPHEMERA_ETC", &etc)
            .env("EPHEMERA_RUN", &run_dir)
            .env("EPHEMERA_BIN", BIN));
        assert!(ok, "start.sh for {pod}: {out}");
        let cfg = ephemera_node::NodeConfig::load(&run_dir.join("node.toml")).unwrap();
        assert_eq!(cfg.node_id, ordinal + 1);
        let advertised = format!("{pod}.ephemera-peers.prod.svc:7301");
        assert_eq!(cfg.advertised()[2], advertised);
        let listed = cfg
            .cluster
            .peers
            .iter()
            .find(|p| p.id == cfg.node_id)
            .unwrap();
        assert_eq!(listed.addr, advertised);
        assert_eq!(cfg.cluster.bootstrap_expect, 3);
        use std::os::unix::fs::PermissionsExt;
        for f in ["kek", "node.key", "ca.key"] {
            let mode = std::fs::metadata(run_dir.join(f))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "{f} is readable by others: {mode:o}");
        }
    }
    let (ok, out) = run(Command::new("sh")
        .arg(etc.join("config/start.sh"))
        .arg("--check")
        .env("POD_NAME", "ephemera")
        .env("POD_NAMESPACE", "prod")
        .env("EPHEMERA_ETC", &etc)
        .env("EPHEMERA_RUN", dir.path())
        .env("EPHEMERA_BIN", BIN));
    assert!(!ok && out.contains("no StatefulSet ordinal"), "{out}");
}

/// `ephemera pki` makes what the deployment steps need: a CA, a node certificate that verifies
/// as `spiffe://<td>/ephemera/node/<id>` for server and client use, a client identity; keys
/// private; nothing overwritten; bad input refused.
#[test]
fn the_pki_commands_make_certificates_a_cluster_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pki");
    let pki = |args: &[&str]| {
        run(Command::new(BIN)
            .arg("pki")
            .args(args)
            .args(["--out", out.to_str().unwrap()]))
    };
    let ca = [
        "--ca",
        out.to_str().unwrap(),
        "--trust-domain",
        "example.org",
    ];
    assert!(pki(&["ca", "--trust-domain", "example.org"]).0);
    let (ok, text) = pki(&[
        &["node", "--id", "2", "--dns", "node-2.example.org"],
        &ca[..],
    ]
    .concat());
    assert!(ok, "{text}");
    let (ok, text) = pki(&[
        &[
            "client",
            "--spiffe-id",
            "spiffe://example.org/ops/admin",
            "--name",
            "admin",
        ],
        &ca[..],
    ]
    .concat());
    assert!(ok, "{text}");

    let read = |f: &str| std::fs::read_to_string(out.join(f)).unwrap();
    let mut bundles = ephemera_pki::TrustBundles::default();
    bundles.add("example.org", &read("ca.crt")).unwrap();
    let now = rustls::pki_types::UnixTime::now();
    let node = ephemera_pki::parse_certs(&read("node-2.crt")).unwrap();
    for usage in [ephemera_pki::Usage::Server, ephemera_pki::Usage::Client] {
        let id = bundles.verify_svid(&node, usage, now).unwrap();
        assert_eq!(id.node_id(), Some(2));
    }
    let admin = ephemera_pki::parse_certs(&read("admin.crt")).unwrap();
    let id = bundles
        .verify_svid(&admin, ephemera_pki::Usage::Client, now)
        .unwrap();
    assert_eq!(id.to_string(), "spiffe://example.org/ops/admin");
    use std::os::unix::fs::PermissionsExt;
    for key in ["ca.key", "node-2.key", "admin.key"] {
        let mode = std::fs::metadata(out.join(key))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{key}");
    }
    ephemera_pki::Identity::from_pem(&read("node-2.crt"), &read("node-2.key")).unwrap();

    let before = read("node-2.key");
    let (ok, text) = pki(&[&["node", "--id", "2"], &ca[..]].concat());
    assert!(!ok && text.contains("not replacing"), "{text}");
    assert_eq!(read("node-2.key"), before);
    let (ok, text) = pki(&[&["node", "--id", "0"], &ca[..]].concat());
    assert!(!ok && text.contains("non-zero"), "{text}");
    let (ok, text) = pki(&[
        "node",
        "--ca",
        "/nonexistent",
        "--trust-domain",
        "example.org",
        "--id",
        "3",
    ]);
    assert!(!ok && text.contains("/nonexistent"), "{text}");
}
