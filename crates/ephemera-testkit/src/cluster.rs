//! A cluster directory and its node processes.
//!
//! Layout (`Layout`): `kek` (0600), `pki/ca.crt`, `pki/ca.key` (0600), `pki/NAME.crt|.key`
//! for each client identity, and per node `node-N/{config.toml, node.log, tls.crt, tls.key,
//! data/}`. `ephemera dev`, the tests, the chaos and benchmark harnesses all use it, so a
//! directory one of them made can be opened by another (a test opens `ephemera dev`'s).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use ephemera_client::{pb, Client, TlsFiles};
use ephemera_node::config::TlsConfig;
use ephemera_node::NodeConfig;
use ephemera_pki::{Ca, KeyAlgorithm, LeafUse, SpiffeId};

use crate::files::{random_hex, write_private};
use crate::process::NodeProcess;
use crate::{io, Error, Result};

/// How long a graceful stop may take before `kill -9`.
pub const STOP_WITHIN: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Layout { root: root.into() }
    }
    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn kek(&self) -> PathBuf {
        self.root.join("kek")
    }
    pub fn pki(&self, file: &str) -> PathBuf {
        self.root.join("pki").join(file)
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.pki("ca.crt")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.pki("ca.key")
    }
    /// A client identity's certificate and key.
    pub fn identity(&self, name: &str) -> (PathBuf, PathBuf) {
        (
            self.pki(&format!("{name}.crt")),
            self.pki(&format!("{name}.key")),
        )
    }
    pub fn node_dir(&self, id: u64) -> PathBuf {
        self.root.join(format!("node-{id}"))
    }
    pub fn node_config(&self, id: u64) -> PathBuf {
        self.node_dir(id).join("config.toml")
    }
    pub fn node_log(&self, id: u64) -> PathBuf {
        self.node_dir(id).join("node.log")
    }
}

/// What a new cluster directory holds.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub trust_domain: String,
    pub key_algorithm: KeyAlgorithm,
    /// Lifetime of the CA, the client identities and the nodes' bootstrap certificates.
    pub cert_ttl: Duration,
    /// Client identities issued into `pki/`: (file name, SPIFFE ID).
    pub identities: Vec<(String, String)>,
}

impl ClusterSpec {
    pub fn new(trust_domain: &str) -> Self {
        ClusterSpec {
            trust_domain: trust_domain.to_string(),
            key_algorithm: KeyAlgorithm::default(),
            cert_ttl: Duration::from_secs(24 * 3600),
            identities: Vec::new(),
        }
    }
}

struct LocalNode {
    config: NodeConfig,
    process: Option<NodeProcess>,
}

pub struct LocalCluster {
    layout: Layout,
    bin: PathBuf,
    trust_domain: String,
    ca: Ca,
    cert_ttl: Duration,
    nodes: BTreeMap<u64, LocalNode>,
}

impl LocalCluster {
    /// Creates the directory: a fresh KEK, a CA and the client identities. No nodes yet.
    pub fn create(root: &Path, bin: &Path, spec: &ClusterSpec) -> Result<Self> {
        let layout = Layout::new(root);
        io(std::fs::create_dir_all(root.join("pki")), || {
            format!("cannot create {}", root.display())
        })?;
        let kek = io(random_hex(32), || "cannot read /dev/urandom".into())?;
        private(&layout.kek(), &format!("{kek}\n"))?;
        let now = SystemTime::now();
        let ca = Ca::generate_with(spec.key_algorithm, &spec.trust_domain, now, spec.cert_ttl)?;
        public(&layout.ca_cert(), ca.cert_pem())?;
        private(&layout.ca_key(), &ca.key_pem()?)?;
        for (name, id) in &spec.identities {
            let issued = ca.issue(
                &SpiffeId::parse(id)?,
                LeafUse::Client,
                &[],
                &[],
                now,
                spec.cert_ttl,
            )?;
            let (cert, key) = layout.identity(name);
            public(&cert, &issued.cert_pem)?;
            private(&key, &issued.key_pem)?;
        }
        Ok(LocalCluster {
            layout,
            bin: bin.to_path_buf(),
            trust_domain: spec.trust_domain.clone(),
            ca,
            cert_ttl: spec.cert_ttl,
            nodes: BTreeMap::new(),
        })
    }

    /// Opens a directory [`LocalCluster::create`] made, with every node configured in it
    /// (none running: spawn them, or adopt the processes that run them).
    pub fn open(root: &Path, bin: &Path, trust_domain: &str) -> Result<Self> {
        let layout = Layout::new(root);
        let ca = Ca::from_pem(
            trust_domain,
            &read(&layout.ca_cert())?,
            &read(&layout.ca_key())?,
        )?;
        let mut nodes = BTreeMap::new();
        let entries = io(std::fs::read_dir(root), || {
            format!("cannot read {}", root.display())
        })?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(id) = name
                .to_str()
                .and_then(|n| n.strip_prefix("node-"))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            let path = layout.node_config(id);
            if path.exists() {
                let config = NodeConfig::load(&path)?;
                nodes.insert(
                    id,
                    LocalNode {
                        config,
                        process: None,
                    },
                );
            }
        }
        Ok(LocalCluster {
            layout,
            bin: bin.to_path_buf(),
            trust_domain: trust_domain.to_string(),
            ca,
            cert_ttl: Duration::from_secs(24 * 3600),
            nodes,
        })
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }
    pub fn ca(&self) -> &Ca {
        &self.ca
    }
    /// The configured nodes' ids, ascending.
    pub fn ids(&self) -> Vec<u64> {
        self.nodes.keys().copied().collect()
    }

    fn node(&self, id: u64) -> &LocalNode {
        self.nodes
            .get(&id)
            .unwrap_or_else(|| panic!("no node {id} in this cluster"))
    }
    fn node_mut(&mut self, id: u64) -> &mut LocalNode {
        self.nodes
            .get_mut(&id)
            .unwrap_or_else(|| panic!("no node {id} in this cluster"))
    }

    pub fn config(&self, id: u64) -> &NodeConfig {
        &self.node(id).config
    }

    /// Every node's API address, in id order.
    pub fn api_addrs(&self) -> Vec<String> {
        self.nodes
            .values()
            .map(|n| n.config.api_addr.to_string())
            .collect()
    }

    /// Configures node `id`: a certificate from the cluster CA, loopback listeners on
    /// reserved ports, the cluster's KEK and CA; then `edit` shapes the rest. The
    /// configuration is validated and saved before the node exists here.
    pub fn add_node(
        &mut self,
        id: u64,
        edit: impl FnOnce(&mut NodeConfig) -> Result<()>,
    ) -> Result<&NodeConfig> {
        if self.nodes.contains_key(&id) || self.layout.node_config(id).exists() {
            return Err(Error::Refused(format!("node {id} is already configured")));
        }
        let dir = self.layout.node_dir(id);
        io(std::fs::create_dir_all(&dir), || {
            format!("cannot create {}", dir.display())
        })?;
        let issued = self.ca.issue(
            &SpiffeId::node(&self.trust_domain, id),
            LeafUse::Node,
            &["localhost"],
            &[IpAddr::from([127, 0, 0, 1])],
            SystemTime::now(),
            self.cert_ttl,
        )?;
        let (cert_file, key_file) = (dir.join("tls.crt"), dir.join("tls.key"));
        public(&cert_file, &issued.cert_pem)?;
        private(&key_file, &issued.key_pem)?;
        let port = || -> Result<SocketAddr> {
            let p = io(crate::ports::free_loopback_port(), || {
                "cannot reserve a loopback port".into()
            })?;
            Ok(SocketAddr::from(([127, 0, 0, 1], p)))
        };
        let mut config = NodeConfig::new(
            id,
            dir.join("data"),
            [port()?, port()?, port()?],
            self.layout.kek(),
        );
        config.tls = Some(TlsConfig::new(
            &self.trust_domain,
            self.layout.ca_cert(),
            cert_file,
            key_file,
        ));
        edit(&mut config)?;
        config.save(&self.layout.node_config(id))?;
        self.nodes.insert(
            id,
            LocalNode {
                config,
                process: None,
            },
        );
        Ok(self.config(id))
    }

    /// Changes node `id`'s configuration and saves it; it takes effect at the next start.
    pub fn update_config(&mut self, id: u64, edit: impl FnOnce(&mut NodeConfig)) -> Result<()> {
        let path = self.layout.node_config(id);
        let node = self.node_mut(id);
        let mut config = node.config.clone();
        edit(&mut config);
        config.save(&path)?;
        node.config = config;
        Ok(())
    }

    /// Whether node `id` has a process that is not gone.
    pub fn is_running(&mut self, id: u64) -> bool {
        self.node_mut(id)
            .process
            .as_mut()
            .is_some_and(|p| !p.is_gone())
    }

    pub fn is_paused(&self, id: u64) -> bool {
        self.node(id)
            .process
            .as_ref()
            .is_some_and(|p| p.is_paused())
    }

    pub fn pid(&self, id: u64) -> Option<u32> {
        self.node(id).process.as_ref().map(NodeProcess::pid)
    }

    /// Starts node `id`; refused while its previous process is not gone (it holds the
    /// storage lock).
    pub fn spawn(&mut self, id: u64) -> Result<u32> {
        if self.is_running(id) {
            return Err(Error::Refused(format!(
                "node {id} is still running; stop or kill it first"
            )));
        }
        let (bin, config, log) = (
            self.bin.clone(),
            self.layout.node_config(id),
            self.layout.node_log(id),
        );
        let p = NodeProcess::spawn(&bin, &config, &log)?;
        let pid = p.pid();
        self.node_mut(id).process = Some(p);
        Ok(pid)
    }

    /// Takes over a node process someone else started (see [`NodeProcess::adopt`]).
    pub fn adopt(&mut self, id: u64, pid: u32) {
        self.node_mut(id).process = Some(NodeProcess::adopt(pid));
    }

    /// `kill -9` node `id` and wait until it is gone (its storage lock released).
    pub fn kill9(&mut self, id: u64) -> Result<()> {
        match self.node_mut(id).process.as_mut() {
            Some(p) => p.kill9(),
            None => Ok(()),
        }
    }

    /// Stops node `id` gracefully (SIGTERM, `kill -9` after `STOP_WITHIN`).
    pub fn stop(&mut self, id: u64) -> Result<()> {
        match self.node_mut(id).process.as_mut() {
            Some(p) => p.terminate(STOP_WITHIN),
            None => Ok(()),
        }
    }

    pub async fn stop_async(&mut self, id: u64) -> Result<()> {
        match self.node_mut(id).process.as_mut() {
            Some(p) => p.terminate_async(STOP_WITHIN).await,
            None => Ok(()),
        }
    }

    /// Stops node `id` if it runs, then starts it again with its configuration and data.
    pub fn restart(&mut self, id: u64) -> Result<u32> {
        self.stop(id)?;
        self.spawn(id)
    }

    pub fn pause(&mut self, id: u64) {
        if let Some(p) = self.node_mut(id).process.as_mut() {
            p.pause();
        }
    }

    pub fn resume(&mut self, id: u64) {
        if let Some(p) = self.node_mut(id).process.as_mut() {
            p.resume();
        }
    }

    /// Stops every node this cluster started (adopted ones are left to their starter).
    pub fn stop_all(&mut self) -> Result<()> {
        let mut first_error = None;
        for n in self.nodes.values_mut() {
            if let Some(p) = n.process.as_mut().filter(|p| p.is_own()) {
                if let Err(e) = p.terminate(STOP_WITHIN) {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// [`LocalCluster::stop_all`] for async callers.
    pub async fn stop_all_async(&mut self) -> Result<()> {
        let mut first_error = None;
        for n in self.nodes.values_mut() {
            if let Some(p) = n.process.as_mut().filter(|p| p.is_own()) {
                if let Err(e) = p.terminate_async(STOP_WITHIN).await {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// TLS for a client: the cluster CA, and the named identity's certificate if any.
    pub fn tls(&self, identity: Option<&str>) -> Result<TlsFiles> {
        Ok(TlsFiles {
            ca_pem: read(&self.layout.ca_cert())?,
            identity: match identity {
                Some(name) => {
                    let (cert, key) = self.layout.identity(name);
                    Some((read(&cert)?, read(&key)?))
                }
                None => None,
            },
        })
    }

    /// Waits until node `id` answers `NodeInfo` (which needs no credential).
    pub async fn wait_answers(&self, id: u64, tls: &TlsFiles, within: Duration) -> Result<()> {
        let addr = self.config(id).api_addr.to_string();
        let client =
            Client::with_tls(&addr, None, Some(tls))?.with_timeout(Duration::from_millis(500));
        let deadline = Instant::now() + within;
        loop {
            let r = client
                .admin_call(pb::NodeInfoRequest {}, |mut a, r| async move {
                    a.get_node_info(r).await
                })
                .await;
            match r {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    return Err(Error::NotReady(format!(
                        "node {id} at {addr} does not answer after {} s ({e}); see {}",
                        within.as_secs(),
                        self.layout.node_log(id).display()
                    )))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// The leader, as the first running, unpaused node that knows one says, asked with
    /// `token` (or the TLS identity) until `within` has passed.
    pub async fn leader(
        &self,
        token: Option<&str>,
        tls: &TlsFiles,
        within: Duration,
    ) -> Result<u64> {
        let deadline = Instant::now() + within;
        loop {
            for n in self.nodes.values() {
                if n.process.as_ref().is_some_and(|p| p.is_paused()) {
                    continue;
                }
                let c = Client::with_tls(
                    &n.config.api_addr.to_string(),
                    token.map(String::from),
                    Some(tls),
                )?
                .with_timeout(Duration::from_millis(500));
                let status = c
                    .admin_call(pb::ClusterStatusRequest {}, |mut a, r| async move {
                        a.get_cluster_status(r).await
                    })
                    .await;
                if let Ok(s) = status {
                    if s.leader_id != 0 {
                        return Ok(s.leader_id);
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(Error::NotReady(format!(
                    "no node reports a leader after {} ms",
                    within.as_millis()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `cluster init` on node `id`, proving local control with the init secret the node
    /// wrote where its configuration says.
    pub async fn init(
        &self,
        id: u64,
        request: pb::InitClusterRequest,
        tls: &TlsFiles,
    ) -> Result<pb::InitClusterResponse> {
        let config = self.config(id);
        let path = config.init_secret_path();
        let secret = read(&path)?;
        let client = Client::with_tls(
            &config.api_addr.to_string(),
            Some(secret.trim().to_string()),
            Some(tls),
        )?
        .with_timeout(Duration::from_secs(30));
        Ok(client
            .admin_call(request, |mut a, r| async move { a.init_cluster(r).await })
            .await?)
    }

    /// Adds node `id` to the cluster through `admin` (a client of its members).
    pub async fn join(&self, admin: &Client, id: u64) -> Result<pb::ClusterStatus> {
        Ok(admin
            .add_node(&self.config(id).api_addr.to_string())
            .await?)
    }
}

impl Drop for LocalCluster {
    /// Nodes this cluster started stop with it, gracefully; a harness that fails half-way
    /// leaves no process behind.
    fn drop(&mut self) {
        let _ = self.stop_all();
    }
}

fn read(path: &Path) -> Result<String> {
    io(std::fs::read_to_string(path), || {
        format!("cannot read {}", path.display())
    })
}

fn public(path: &Path, contents: &str) -> Result<()> {
    io(std::fs::write(path, contents), || {
        format!("cannot write {}", path.display())
    })
}

fn private(path: &Path, contents: &str) -> Result<()> {
    io(write_private(path, contents), || {
        format!("cannot write {}", path.display())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_directory_holds_valid_configs_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        // No node starts here: `process` tests the process handling, the end-to-end tests the
        // real nodes.
        let bin = Path::new("/bin/sleep");
        let mut spec = ClusterSpec::new("kit.test");
        spec.identities = vec![("admin".into(), "spiffe://kit.test/admin".into())];
        let mut c = LocalCluster::create(dir.path(), bin, &spec).unwrap();
        for id in 1..=2 {
            c.add_node(id, |cfg| {
                cfg.bootstrap.join = id > 1;
                Ok(())
            })
            .unwrap();
        }
        let again = c.add_node(2, |_| Ok(())).err().unwrap().to_string();
        assert!(again.contains("already configured"), "{again}");
        let bad = c.add_node(3, |cfg| {
            cfg.raft.election_timeout_min_ms = 1;
            Ok(())
        });
        assert!(bad.is_err(), "an invalid config was accepted");
        let (a, b) = (c.config(1).clone(), c.config(2).clone());
        let ports = [
            a.api_addr,
            a.http_addr,
            a.cluster_addr,
            b.api_addr,
            b.http_addr,
            b.cluster_addr,
        ];
        let distinct: std::collections::HashSet<_> = ports.iter().map(|p| p.port()).collect();
        assert_eq!(distinct.len(), 6, "{ports:?}");
        // The node certificate names the node in the cluster's trust domain, and verifies.
        let cert = std::fs::read_to_string(&b.tls.as_ref().unwrap().cert_file).unwrap();
        assert_eq!(
            ephemera_pki::parse_certs(&cert).unwrap().len(),
            1,
            "one certificate"
        );
        assert!(c.tls(Some("admin")).unwrap().identity.is_some());

        c.update_config(2, |cfg| cfg.test_clock_offset_ms = 1500)
            .unwrap();
        let opened = LocalCluster::open(dir.path(), bin, "kit.test").unwrap();
        assert_eq!(opened.ids(), vec![1, 2]);
        assert_eq!(opened.config(2).test_clock_offset_ms, 1500);
        assert!(opened.config(2).bootstrap.join && !opened.config(1).bootstrap.join);
        assert_eq!(opened.api_addrs(), c.api_addrs());
        let kek = std::fs::metadata(dir.path().join("kek")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(kek.permissions().mode() & 0o777, 0o600);
    }
}
