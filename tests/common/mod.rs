//! Harness for end-to-end tests: a real `ephemera dev` cluster of OS processes on loopback.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use ephemera_client::{pb, Client, TlsFiles};
use ephemera_testkit::{LocalCluster, NodeConfig};

pub const BIN: &str = env!("CARGO_BIN_EXE_ephemera");

pub struct DevCluster {
    pub dir: tempfile::TempDir,
    dev: Child,
    pub env: HashMap<String, String>,
    /// The nodes: `ephemera dev`'s (adopted), and those the test (re)started itself.
    pub nodes: LocalCluster,
    stopped: bool,
}

fn read_env(path: &Path) -> Option<HashMap<String, String>> {
    let text = std::fs::read_to_string(path).ok()?;
    let map: HashMap<String, String> = text
        .lines()
        .filter_map(|l| {
            let l = l.trim().strip_prefix("export ").unwrap_or(l.trim());
            let (k, v) = l.split_once('=')?;
            Some((k.to_string(), v.to_string()))
        })
        .collect();
    map.contains_key("EPHEMERA_TOKEN").then_some(map)
}

impl DevCluster {
    pub fn start(nodes: u16, extra_args: &[&str]) -> Self {
        Self::start_in(tempfile::tempdir().expect("tempdir"), nodes, extra_args)
    }

    /// Starts `ephemera dev` in a directory the test has prepared (e.g. with an oidc.toml).
    pub fn start_in(dir: tempfile::TempDir, nodes: u16, extra_args: &[&str]) -> Self {
        let log = std::fs::File::create(dir.path().join("dev.log")).unwrap();
        let mut dev = Command::new(BIN)
            .args(["dev", "--nodes", &nodes.to_string(), "--dir"])
            .arg(dir.path())
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn ephemera dev");
        let deadline = Instant::now() + Duration::from_secs(60);
        let env = loop {
            if let Some(env) = read_env(&dir.path().join("dev.env")) {
                break env;
            }
            // A dev that gave up says why in its log and the nodes' logs: report it at once.
            let exited = dev.try_wait().ok().flatten();
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "ephemera dev did not become ready ({}): {}",
                exited.map_or("still running after 60 s".to_string(), |s| format!(
                    "it exited: {s}"
                )),
                dev_logs(dir.path())
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut nodes = LocalCluster::open(dir.path(), Path::new(BIN), "ephemera.dev")
            .expect("open the dev cluster's directory");
        for (i, pid) in env["EPHEMERA_PIDS"].split(',').enumerate() {
            nodes.adopt(i as u64 + 1, pid.parse().expect("EPHEMERA_PIDS"));
        }
        DevCluster {
            dir,
            dev,
            env,
            nodes,
            stopped: false,
        }
    }

    pub fn apis(&self) -> Vec<String> {
        self.env["EPHEMERA_ADDR"]
            .split(',')
            .map(String::from)
            .collect()
    }

    pub fn http_urls(&self) -> Vec<String> {
        self.env["EPHEMERA_HTTP"]
            .split(',')
            .map(String::from)
            .collect()
    }

    pub fn token(&self) -> String {
        self.env["EPHEMERA_TOKEN"].clone()
    }

    pub fn pid(&self, node: u64) -> i32 {
        self.nodes.pid(node).expect("node has a process") as i32
    }

    pub fn pki(&self, file: &str) -> String {
        std::fs::read_to_string(self.dir.path().join("pki").join(file)).unwrap()
    }

    /// The path of a file of dev's `pki/` directory.
    pub fn pki_path(&self, file: &str) -> std::path::PathBuf {
        self.dir.path().join("pki").join(file)
    }

    /// TLS as the cluster administrator (its X.509-SVID).
    pub fn admin_tls(&self) -> TlsFiles {
        TlsFiles {
            ca_pem: self.pki("ca.crt"),
            identity: Some((self.pki("admin.crt"), self.pki("admin.key"))),
        }
    }

    /// TLS that verifies the nodes but presents no client certificate.
    pub fn anonymous_tls(&self) -> TlsFiles {
        TlsFiles {
            ca_pem: self.pki("ca.crt"),
            identity: None,
        }
    }

    /// The cluster CA, to issue test identities.
    pub fn ca(&self) -> ephemera_pki::Ca {
        ephemera_pki::Ca::from_pem("ephemera.dev", &self.pki("ca.crt"), &self.pki("ca.key"))
            .unwrap()
    }

    /// A client (as administrator, over mTLS) that talks to every node (failover).
    pub fn client(&self) -> Client {
        Client::with_tls(&self.env["EPHEMERA_ADDR"], None, Some(&self.admin_tls())).unwrap()
    }

    /// A client presenting one of dev's identities (`admin`, `approver`, `workload`), pinned to
    /// one node (1-based) or talking to all.
    pub fn client_as(&self, identity: &str, node: Option<u64>) -> Client {
        let addr = match node {
            Some(n) => self.apis()[n as usize - 1].clone(),
            None => self.env["EPHEMERA_ADDR"].clone(),
        };
        let tls = TlsFiles {
            ca_pem: self.pki("ca.crt"),
            identity: Some((
                self.pki(&format!("{identity}.crt")),
                self.pki(&format!("{identity}.key")),
            )),
        };
        Client::with_tls(&addr, None, Some(&tls))
            .unwrap()
            .with_timeout(Duration::from_secs(10))
    }

    /// A client pinned to one node (1-based).
    pub fn node_client(&self, node: u64) -> Client {
        Client::with_tls(
            &self.apis()[node as usize - 1],
            None,
            Some(&self.admin_tls()),
        )
        .unwrap()
        .with_timeout(Duration::from_secs(10))
    }

    /// An HTTPS client that trusts the cluster CA; with `identity`, it presents that SVID.
    pub fn https(&self, identity: Option<(&str, &str)>) -> reqwest::Client {
        let mut b = reqwest::Client::builder()
            .use_rustls_tls()
            .add_root_certificate(
                reqwest::Certificate::from_pem(self.pki("ca.crt").as_bytes()).unwrap(),
            );
        if let Some((cert, key)) = identity {
            b = b.identity(reqwest::Identity::from_pem(format!("{cert}{key}").as_bytes()).unwrap());
        }
        b.build().unwrap()
    }

    /// The Prometheus text a node serves at `{http_url}/metrics` (`http_url` as
    /// [`DevCluster::http_urls`] gives it).
    pub async fn metrics_at(&self, http_url: &str) -> String {
        self.https(None)
            .get(format!("{http_url}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub fn config(&self, node: u64) -> &NodeConfig {
        self.nodes.config(node)
    }

    /// Changes a node's configuration (it takes effect when the node starts again).
    pub fn update_config(&mut self, node: u64, edit: impl FnOnce(&mut NodeConfig)) {
        self.nodes.update_config(node, edit).expect("update config");
    }

    /// Runs the CLI against the cluster, as the administrator.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_as("admin", args)
    }

    /// Runs the CLI against the cluster as one of dev's identities (`admin`, `approver`, ...).
    pub fn cli_as(&self, identity: &str, args: &[&str]) -> Output {
        self.cli_command(identity, args)
            .output()
            .expect("run ephemera")
    }

    /// The CLI as one of dev's identities, not started yet (a test that signals it).
    pub fn cli_command(&self, identity: &str, args: &[&str]) -> Command {
        let pki = self.dir.path().join("pki");
        let mut c = Command::new(BIN);
        c.args(args)
            .env("EPHEMERA_ADDR", &self.env["EPHEMERA_ADDR"])
            .env("EPHEMERA_CA", &self.env["EPHEMERA_CA"])
            .env("EPHEMERA_CERT", pki.join(format!("{identity}.crt")))
            .env("EPHEMERA_KEY", pki.join(format!("{identity}.key")))
            .env_remove("EPHEMERA_TOKEN");
        c
    }

    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.extend(["--output", "json"]);
        let out = self.cli(&all);
        assert!(
            out.status.success(),
            "ephemera {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("json output")
    }

    /// `kill -9`; returns once the process is gone (its storage lock free).
    pub fn kill9(&mut self, node: u64) {
        self.nodes.kill9(node).expect("kill -9");
    }

    /// Starts a stopped or killed node again with its configuration and data.
    pub fn restart(&mut self, node: u64) {
        self.nodes.spawn(node).expect("restart");
    }

    /// Starts an extra node with a fresh config and certificate next to the others; returns
    /// its API and HTTP addresses.
    pub fn start_new_node(&mut self, node: u64) -> (String, String) {
        self.start_new_node_with(node, "")
    }

    /// As [`DevCluster::start_new_node`], with a TOML overlay on its config.
    pub fn start_new_node_with(&mut self, node: u64, overlay: &str) -> (String, String) {
        let config = self
            .nodes
            .add_node(node, |c| {
                if let Some(tls) = c.tls.as_mut() {
                    tls.admin_ids = vec!["spiffe://ephemera.dev/admin".into()];
                }
                *c = ephemera_testkit::overlay::apply(c, overlay)?;
                Ok(())
            })
            .expect("configure the new node");
        let (api, http) = (config.api_addr.to_string(), config.http_addr.to_string());
        self.restart(node);
        // Ready once it accepts connections (a condition, polled).
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&api).is_err() {
            assert!(
                Instant::now() < deadline,
                "node {node} did not start listening on {api}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        (api, http)
    }

    pub fn stop(&mut self) {
        if std::mem::replace(&mut self.stopped, true) {
            return;
        }
        // The nodes the test started; then `ephemera dev` stops its own.
        let _ = self.nodes.stop_all();
        ephemera_testkit::process::signal(self.dev.id(), libc::SIGTERM);
        let _ = self.dev.wait();
    }
}

impl Drop for DevCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `dev.log` and every node's log, for a failure message.
fn dev_logs(dir: &Path) -> String {
    let mut out = std::fs::read_to_string(dir.join("dev.log")).unwrap_or_default();
    for n in 1..=9 {
        if let Ok(log) = std::fs::read_to_string(dir.join(format!("node-{n}/node.log"))) {
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            out.push_str(&format!("\n--- node-{n}/node.log (last 40 lines) ---\n"));
            for line in tail.iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

/// The wall clock, Unix seconds (assertions' `iat` and `exp`).
pub fn unix_now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs()
}

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

pub fn role(name: &str, ttl_s: u64, max_ttl_s: u64) -> pb::PutRoleRequest {
    pb::PutRoleRequest {
        role: Some(pb::Role {
            name: name.into(),
            kind: "jwt".into(),
            audience: "api.example".into(),
            allowed_scopes: vec!["read".into(), "write".into()],
            default_ttl_s: ttl_s,
            max_ttl_s,
            ..Default::default()
        }),
    }
}

pub async fn put_role(c: &Client, name: &str, ttl_s: u64, max_ttl_s: u64) {
    c.admin_call(role(name, ttl_s, max_ttl_s), |mut a, r| async move {
        a.put_role(r).await
    })
    .await
    .expect("put role");
}

pub fn issue_req(role: &str) -> pb::IssueRequest {
    pb::IssueRequest {
        role: role.into(),
        subject: Some("spiffe://example.org/ns/ci/sa/runner".into()),
        scopes: vec!["read".into(), "write".into()],
        ..Default::default()
    }
}

pub async fn status(c: &Client) -> pb::ClusterStatus {
    c.admin_call(pb::ClusterStatusRequest {}, |mut a, r| async move {
        a.get_cluster_status(r).await
    })
    .await
    .expect("cluster status")
}

pub async fn digest(c: &Client) -> pb::StateDigest {
    c.admin_call(pb::StateDigestRequest {}, |mut a, r| async move {
        a.get_state_digest(r).await
    })
    .await
    .expect("state digest")
}

/// Waits until every listed node reports the same applied index and state digest, and returns
/// the digests. Converging is a condition, polled, not a sleep.
pub async fn converged(clients: &[Client], within: Duration) -> Vec<pb::StateDigest> {
    let deadline = Instant::now() + within;
    loop {
        let mut ds = Vec::new();
        for c in clients {
            if let Ok(d) = c
                .admin_call(pb::StateDigestRequest {}, |mut a, r| async move {
                    a.get_state_digest(r).await
                })
                .await
            {
                ds.push(d);
            }
        }
        if ds.len() == clients.len()
            && ds
                .windows(2)
                .all(|w| w[0].applied_index == w[1].applied_index && w[0].digest == w[1].digest)
        {
            return ds;
        }
        assert!(Instant::now() < deadline, "nodes did not converge: {ds:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// All leases one node holds, paging through ListLeases on that node only.
pub async fn all_leases(c: &Client) -> Vec<pb::Lease> {
    c.list_all_leases(pb::ListLeasesRequest::default(), usize::MAX)
        .await
        .expect("list leases")
}

/// A test OIDC issuer `https://ci.example.test` (audience `ephemera`, key id `ci-1`): an Ed25519
/// key whose JWKS is written to `dir/jwks.json`, and a `dir/oidc.toml` that makes a dev cluster
/// started in `dir` trust it, mapping the given claims to principal attributes.
pub struct TestIssuer {
    pub key_pem: String,
    pub public_key: [u8; 32],
}

impl TestIssuer {
    pub const ISSUER: &'static str = "https://ci.example.test";

    pub fn configure(dir: &Path, attributes: &[&str]) -> Self {
        use base64::Engine;
        let key_pem = ephemera_pki::new_csr_with(ephemera_pki::KeyAlgorithm::Ed25519, None)
            .unwrap()
            .key_pem;
        let seed = ephemera_pki::ed25519_seed(&key_pem).unwrap();
        let public_key = ed25519_dalek::SigningKey::from_bytes(&seed)
            .verifying_key()
            .to_bytes();
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let jwks = serde_json::json!({"keys": [{"kty": "OKP", "crv": "Ed25519",
            "x": b64.encode(public_key), "kid": "ci-1", "alg": "EdDSA", "use": "sig"}]});
        std::fs::write(dir.join("jwks.json"), jwks.to_string()).unwrap();
        let attributes: String = attributes
            .iter()
            .map(|a| format!("{a} = \"/{a}\"\n"))
            .collect();
        std::fs::write(
            dir.join("oidc.toml"),
            format!(
                "[[oidc_issuers]]\nissuer = \"{}\"\naudience = \"ephemera\"\njwks_file = {:?}\n\
                 leeway_s = 30\nrefuse_replay = true\n[oidc_issuers.attributes]\n{attributes}",
                Self::ISSUER,
                dir.join("jwks.json")
            ),
        )
        .unwrap();
        TestIssuer {
            key_pem,
            public_key,
        }
    }

    /// Signs `claims` as an EdDSA JWT with key id `kid`.
    pub fn sign(&self, kid: &str, claims: &serde_json::Value) -> String {
        use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
        let mut h = Header::new(Algorithm::EdDSA);
        h.kid = Some(kid.into());
        encode(
            &h,
            claims,
            &EncodingKey::from_ed_pem(self.key_pem.as_bytes()).unwrap(),
        )
        .unwrap()
    }
}

/// A relying party of one node, as a real one verifies: the node's JWKS and issuer, fetched
/// once over HTTPS, and `jsonwebtoken` (not Ephemera's code) to check signatures and claims.
pub struct RelyingParty {
    jwks: jsonwebtoken::jwk::JwkSet,
    /// The node's RFC 8414 metadata document.
    pub metadata: serde_json::Value,
}

impl RelyingParty {
    /// Fetches the JWKS and metadata of `node` (1-based).
    pub async fn of(cluster: &DevCluster, node: usize) -> Self {
        let http = &cluster.http_urls()[node - 1];
        let get = |path: &str| {
            let req = cluster.https(None).get(format!("{http}{path}"));
            async move { req.send().await.unwrap().error_for_status().unwrap() }
        };
        RelyingParty {
            jwks: get("/.well-known/jwks.json").await.json().await.unwrap(),
            metadata: get("/.well-known/oauth-authorization-server")
                .await
                .json()
                .await
                .unwrap(),
        }
    }

    /// The claims of `token` if it is an EdDSA access token (`typ` `at+jwt`) signed by a key
    /// of the JWKS, for `audience`, from the node's issuer, and not expired.
    pub fn verify(
        &self,
        token: &str,
        audience: &str,
    ) -> Result<serde_json::Value, jsonwebtoken::errors::Error> {
        let header = jsonwebtoken::decode_header(token)?;
        assert_eq!(header.alg, jsonwebtoken::Algorithm::EdDSA);
        assert_eq!(header.typ.as_deref(), Some("at+jwt"));
        let jwk = self
            .jwks
            .find(header.kid.as_deref().expect("a kid"))
            .expect("the kid is in the JWKS");
        let key = jsonwebtoken::DecodingKey::from_jwk(jwk)?;
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::EdDSA);
        validation.set_audience(&[audience]);
        validation.set_issuer(&[self.metadata["issuer"].as_str().expect("an issuer")]);
        Ok(jsonwebtoken::decode::<serde_json::Value>(token, &key, &validation)?.claims)
    }
}

/// The newest `limit` audit records (as the administrator).
pub async fn audit_tail(c: &Client, limit: u32) -> pb::AuditTailResponse {
    c.admin_call(
        pb::AuditTailRequest { from_seq: 0, limit },
        |mut a, r| async move { a.audit_tail(r).await },
    )
    .await
    .expect("audit tail")
}

/// Policy governance over the API: propose a policy set, approve a proposal, the active version.
pub async fn propose(
    c: &Client,
    text: &str,
) -> Result<pb::PolicyProposal, ephemera_client::ClientError> {
    c.admin_call(
        pb::ProposePolicyRequest {
            text: text.into(),
            comment: Some("test".into()),
        },
        |mut a, r| async move { a.propose_policy(r).await },
    )
    .await
}

pub async fn approve(
    c: &Client,
    id: &str,
) -> Result<pb::PolicyProposal, ephemera_client::ClientError> {
    c.admin_call(
        pb::ApprovePolicyRequest {
            proposal_id: id.into(),
        },
        |mut a, r| async move { a.approve_policy(r).await },
    )
    .await
}

pub async fn active_policy(c: &Client) -> pb::PolicyVersion {
    c.admin_call(
        pb::GetPolicyRequest { version: None },
        |mut a, r| async move { a.get_policy(r).await },
    )
    .await
    .expect("get policy")
}
