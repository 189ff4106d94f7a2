//! Node configuration (TOML).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Unique, stable, non-zero id of this node in the cluster.
    pub node_id: u64,
    pub data_dir: PathBuf,
    /// gRPC API listener (`ephemera.v1`).
    pub api_addr: SocketAddr,
    /// HTTP listener (JWKS, metadata, introspection, metrics, health).
    pub http_addr: SocketAddr,
    /// Cluster listener (Raft and forwarding between nodes).
    pub cluster_addr: SocketAddr,
    /// File holding the cluster key-encryption key (64 hex characters), the same on every node.
    pub kek_file: PathBuf,
    /// TLS on every listener and mutual TLS between nodes. Required unless
    /// `insecure_plaintext` is set.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Serve without TLS. Development and tests only; every address must then be loopback.
    #[serde(default)]
    pub insecure_plaintext: bool,
    #[serde(default)]
    pub raft: RaftTuning,
    /// How often the leader looks for leases past their deadline.
    #[serde(default = "default_expiry_interval_ms")]
    pub expiry_interval_ms: u64,
    /// Deadline for one client request inside the cluster (forwarding, waiting for apply).
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// Dial these addresses instead of the peers' advertised cluster addresses (NAT, or a fault
    /// proxy in chaos tests). The membership keeps the advertised address.
    #[serde(default)]
    pub peer_cluster_addrs: Vec<PeerAddr>,
    /// OIDC issuers whose JWT assertions authenticate workloads.
    #[serde(default)]
    pub oidc_issuers: Vec<crate::oidc::IssuerConfig>,
    /// TEST ONLY: shift this node's wall clock, to test clock skew. Never set in production.
    #[serde(default)]
    pub test_clock_offset_ms: i64,
    /// Rate limits, renewal-storm and anomaly detection, quarantine, clock-skew bound.
    #[serde(default)]
    pub guard: crate::guard::GuardConfig,
    /// How this node may become part of a cluster: `cluster init` (with proof of local
    /// control) or only by being added to an existing one.
    #[serde(default)]
    pub bootstrap: BootstrapConfig,
    /// Forming and keeping the cluster from a list of its nodes, with no `cluster init` or
    /// `cluster join` by hand.
    #[serde(default)]
    pub cluster: ClusterConfig,
    /// The addresses the other nodes and clients use to reach this one, when they differ from
    /// the listen addresses (listening on 0.0.0.0 in a pod, say).
    #[serde(default)]
    pub advertise: AdvertiseConfig,
    /// Restrictions on the break-glass credential.
    #[serde(default)]
    pub break_glass: BreakGlassConfig,
    /// Connection limits and deadlines before authentication.
    #[serde(default)]
    pub listeners: crate::conn::ListenerLimits,
    /// How long the state keeps dead leases, idempotency records, join tokens, consumed
    /// assertion ids and policy proposals (the leader's values apply cluster-wide).
    #[serde(default)]
    pub retention: ephemera_core::command::Retention,
    #[serde(default)]
    pub audit: AuditConfig,
    /// The most exchanges (RFC 8693) between a token the cluster issued directly and one
    /// derived from it; a deeper exchange is refused (`invalid_grant`). 1 to 16.
    #[serde(default = "default_max_delegation_depth")]
    pub max_delegation_depth: u32,
}

fn default_max_delegation_depth() -> u32 {
    5
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// How often the leader signs the audit head (when records were added since the last
    /// checkpoint).
    pub checkpoint_interval_s: u64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            checkpoint_interval_s: 60,
        }
    }
}

/// `cluster init` hands out the break-glass credential and sets the policy, so it needs proof
/// of control of the node: the one-time init secret in `init_secret_file` (only someone who can
/// read the node's files has it), or an administrator's certificate (`tls.admin_ids`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BootstrapConfig {
    /// The init secret's file. When the node starts uninitialised and the file does not exist,
    /// the node writes a fresh secret there (mode 0600). It is deleted once the cluster is
    /// initialised. Default: `<data_dir>/init.secret`.
    pub init_secret_file: Option<PathBuf>,
    /// This node only ever joins an existing cluster (`cluster join` from a member): it refuses
    /// `cluster init` and writes no init secret.
    pub join: bool,
}

/// Automatic forming and joining. Every node lists the cluster's nodes (itself included or
/// not); the leader adds each listed node that is up and new, and removes and re-adds one
/// that came back with an empty data directory. With `bootstrap_expect`, the listed node with
/// the lowest id forms the cluster once that many listed nodes are up and new.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// The cluster's nodes: id and cluster address (`host:port`; a DNS name is resolved at
    /// each connection). Empty: membership changes only by `cluster join` / `cluster remove`.
    pub peers: Vec<PeerAddr>,
    /// Form a new cluster once this many listed nodes, this one included, are up and have no
    /// data. 0: never form one automatically (a listed node still joins an existing cluster).
    pub bootstrap_expect: usize,
    /// Where the node that forms the cluster writes the break-glass credential (mode 0600).
    /// Read it, store it safely and delete the file. Default: `<data_dir>/admin.credential`.
    pub admin_credential_file: Option<PathBuf>,
    /// The cluster CA's private key (PEM) to import when forming the cluster, with
    /// `tls.ca_file` as its certificate, as `cluster init --ca-cert --ca-key` does. It lets the
    /// cluster renew node certificates and issue X.509-SVIDs.
    pub ca_key_file: Option<PathBuf>,
    /// The `iss` of the cluster's tokens. Default: `https://` and the advertised HTTP address
    /// of the node that forms the cluster.
    pub issuer: Option<String>,
}

/// Advertised addresses (`host:port`); each defaults to its listen address.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdvertiseConfig {
    pub api_addr: Option<String>,
    pub http_addr: Option<String>,
    pub cluster_addr: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakGlassConfig {
    /// When set, the break-glass credential is accepted only from these source networks
    /// (`"10.0.0.0/8"`, `"127.0.0.1"`, `"::1/128"`); from anywhere else it is refused and
    /// the attempt audited.
    pub allowed_sources: Vec<String>,
}

/// An IP network: an address and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: std::net::IpAddr,
    prefix: u8,
}

impl IpNet {
    pub fn parse(text: &str) -> Result<Self, String> {
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let addr: std::net::IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("{text:?} is not an IP address or network (a.b.c.d/n)"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{text:?}: the prefix length must be 0..={max}"))?,
        };
        Ok(IpNet { addr, prefix })
    }

    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        // An IPv4 client on a dual-stack listener arrives as ::ffff:a.b.c.d.
        let ip = match ip {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, std::net::IpAddr::V4),
            v4 => v4,
        };
        // Both sides as 128-bit numbers, IPv4 in the top 32 bits, so one mask serves.
        let (net, ip) = match (self.addr, ip) {
            (std::net::IpAddr::V4(n), std::net::IpAddr::V4(i)) => (
                u128::from(u32::from(n)) << 96,
                u128::from(u32::from(i)) << 96,
            ),
            (std::net::IpAddr::V6(n), std::net::IpAddr::V6(i)) => (u128::from(n), u128::from(i)),
            _ => return false,
        };
        let mask = if self.prefix == 0 {
            0
        } else {
            u128::MAX << (128 - u32::from(self.prefix))
        };
        net & mask == ip & mask
    }
}

impl BreakGlassConfig {
    pub fn networks(&self) -> Result<Vec<IpNet>, ConfigError> {
        self.allowed_sources
            .iter()
            .map(|s| {
                IpNet::parse(s)
                    .map_err(|e| ConfigError::Invalid(format!("break_glass.allowed_sources: {e}")))
            })
            .collect()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The cluster's SPIFFE trust domain; node identities are
    /// `spiffe://<trust_domain>/ephemera/node/<node_id>`.
    pub trust_domain: String,
    /// The cluster CA certificate: the trust bundle of `trust_domain`.
    pub ca_file: PathBuf,
    /// This node's certificate (its SPIFFE X.509-SVID) and key.
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// SPIFFE IDs allowed to administer the cluster.
    #[serde(default)]
    pub admin_ids: Vec<String>,
    /// Further trust domains whose workloads may authenticate (e.g. a SPIRE bundle).
    #[serde(default)]
    pub trust_bundles: Vec<BundleFile>,
    /// Lifetime of the certificates this node obtains for itself from the cluster CA, renewed
    /// at half-life (`cert_file` is the bootstrap certificate, used until the first renewal and
    /// whenever the renewed one has expired). 0 turns renewal off. The leader caps the
    /// lifetime at its own setting.
    #[serde(default = "default_node_cert_ttl_s")]
    pub node_cert_ttl_s: u64,
}

impl TlsConfig {
    /// TLS for a node of `trust_domain`, with the defaults for the rest.
    pub fn new(
        trust_domain: &str,
        ca_file: PathBuf,
        cert_file: PathBuf,
        key_file: PathBuf,
    ) -> Self {
        TlsConfig {
            trust_domain: trust_domain.to_string(),
            ca_file,
            cert_file,
            key_file,
            admin_ids: Vec::new(),
            trust_bundles: Vec::new(),
            node_cert_ttl_s: default_node_cert_ttl_s(),
        }
    }
}

fn default_node_cert_ttl_s() -> u64 {
    24 * 3600
}

/// Bounds of `tls.node_cert_ttl_s` (besides 0).
pub const NODE_CERT_TTL_RANGE_S: std::ops::RangeInclusive<u64> = 10..=30 * 24 * 3600;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleFile {
    pub trust_domain: String,
    pub bundle_file: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerAddr {
    pub id: u64,
    pub addr: String,
}

fn default_expiry_interval_ms() -> u64 {
    1000
}
fn default_request_timeout_ms() -> u64 {
    5000
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftTuning {
    pub heartbeat_interval_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Build a snapshot once this many commands, or log entries, were applied since the last
    /// one. Nodes take turns: the first threshold after start is longer by up to 4/5 of this,
    /// by node id, so that they do not all build at once (see `snapshot_schedule`).
    pub snapshot_logs_since_last: u64,
    /// Entries kept in the log behind the snapshot, for lagging followers.
    pub max_in_snapshot_log_to_keep: u64,
    /// Commands the leader writes in one log entry at most (group commit: the writes that
    /// arrive while earlier ones are in flight share an entry, its fsync and its replication
    /// round). 1 writes each command on its own.
    pub max_batch: usize,
}

impl Default for RaftTuning {
    fn default() -> Self {
        // openraft lets a follower start an election only after the leader's lease
        // (election_timeout_max) plus a random election timeout (min..max) without a
        // heartbeat: 600-800 ms here, so failover (detection, one vote round, the new leader's
        // first commit) stays under 1 s on a LAN or loopback. Append-entries RPCs time out
        // after one heartbeat interval, so that interval is kept above loaded round trips.
        RaftTuning {
            heartbeat_interval_ms: 100,
            election_timeout_min_ms: 200,
            election_timeout_max_ms: 400,
            // A snapshot copies the whole state: at one every 10,000 entries, building them
            // took a fifth of a follower's CPU under sustained issuance (perf, issue 6). Log
            // entries are well under 1 KiB, so the log stays under ~100 MiB.
            snapshot_logs_since_last: 100_000,
            max_in_snapshot_log_to_keep: 1_000,
            max_batch: 64,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl NodeConfig {
    /// A configuration with the given identity, listeners, data and KEK, and the defaults for
    /// everything else (no TLS yet: set `tls`, or `insecure_plaintext` on loopback). What
    /// `load` gives for a file naming only these keys.
    pub fn new(
        node_id: u64,
        data_dir: PathBuf,
        [api_addr, http_addr, cluster_addr]: [SocketAddr; 3],
        kek_file: PathBuf,
    ) -> Self {
        NodeConfig {
            node_id,
            data_dir,
            api_addr,
            http_addr,
            cluster_addr,
            kek_file,
            tls: None,
            insecure_plaintext: false,
            raft: RaftTuning::default(),
            expiry_interval_ms: default_expiry_interval_ms(),
            request_timeout_ms: default_request_timeout_ms(),
            peer_cluster_addrs: Vec::new(),
            oidc_issuers: Vec::new(),
            test_clock_offset_ms: 0,
            guard: Default::default(),
            bootstrap: Default::default(),
            cluster: Default::default(),
            advertise: Default::default(),
            break_glass: Default::default(),
            listeners: Default::default(),
            retention: Default::default(),
            audit: Default::default(),
            max_delegation_depth: default_max_delegation_depth(),
        }
    }

    /// The configuration as a TOML file that `load` reads back unchanged.
    pub fn to_toml(&self) -> Result<String, ConfigError> {
        toml::to_string(self).map_err(|e| ConfigError::Invalid(format!("cannot write TOML: {e}")))
    }

    /// Validates the configuration and writes it to `path` (written whole, then renamed, so a
    /// node never reads half a file).
    pub fn save(&self, path: &Path) -> Result<(), ConfigError> {
        self.validate()?;
        let text = self.to_toml()?;
        let write = |p: &Path| std::fs::write(p, &text);
        let tmp = path.with_extension("toml.tmp");
        write(&tmp)
            .and_then(|_| std::fs::rename(&tmp, path))
            .map_err(|source| ConfigError::Read {
                path: path.to_path_buf(),
                source,
            })
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let cfg: NodeConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Where the node keeps the certificate it renewed for itself (`node.pem`).
    pub fn renewed_cert_dir(&self) -> PathBuf {
        self.data_dir.join("tls")
    }

    /// Where the init secret lives (see [`BootstrapConfig`]).
    pub fn init_secret_path(&self) -> PathBuf {
        self.bootstrap
            .init_secret_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("init.secret"))
    }

    /// Where the node that forms the cluster writes the break-glass credential.
    pub fn admin_credential_path(&self) -> PathBuf {
        self.cluster
            .admin_credential_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("admin.credential"))
    }

    /// The addresses this node is reached at: `[api, http, cluster]`.
    pub fn advertised(&self) -> [String; 3] {
        let a = &self.advertise;
        [
            (&a.api_addr, self.api_addr),
            (&a.http_addr, self.http_addr),
            (&a.cluster_addr, self.cluster_addr),
        ]
        .map(|(adv, listen)| adv.clone().unwrap_or_else(|| listen.to_string()))
    }

    /// The node that forms the cluster when `bootstrap_expect` is set: the lowest listed id.
    /// A fixed choice, so that two partitioned halves can never both form one.
    pub fn bootstrapper(&self) -> u64 {
        self.cluster
            .peers
            .iter()
            .map(|p| p.id)
            .chain([self.node_id])
            .min()
            .unwrap_or(self.node_id)
    }

    fn validate_cluster(&self) -> Result<(), ConfigError> {
        let c = &self.cluster;
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        let mut ids = std::collections::BTreeSet::from([self.node_id]);
        for p in &c.peers {
            if p.id == 0 {
                return invalid("cluster.peers: a node id must be non-zero".into());
            }
            if !is_host_port(&p.addr) {
                return invalid(format!(
                    "cluster.peers: {:?} for node {} is not host:port",
                    p.addr, p.id
                ));
            }
            if p.id == self.node_id {
                continue;
            }
            if !ids.insert(p.id) {
                return invalid(format!("cluster.peers: node {} is listed twice", p.id));
            }
        }
        if c.bootstrap_expect > ids.len() {
            return invalid(format!(
                "cluster.bootstrap_expect is {} but cluster.peers lists {} nodes (this one included)",
                c.bootstrap_expect,
                ids.len()
            ));
        }
        if c.bootstrap_expect > 0 && self.bootstrap.join && self.bootstrapper() == self.node_id {
            return invalid(format!(
                "node {} forms the cluster (the lowest id in cluster.peers, with \
                 cluster.bootstrap_expect set), so bootstrap.join cannot be true",
                self.node_id
            ));
        }
        if c.ca_key_file.is_some() && self.tls.is_none() {
            return invalid("cluster.ca_key_file needs a [tls] section".into());
        }
        for (name, addr) in [
            ("advertise.api_addr", &self.advertise.api_addr),
            ("advertise.http_addr", &self.advertise.http_addr),
            ("advertise.cluster_addr", &self.advertise.cluster_addr),
        ] {
            if let Some(a) = addr.as_deref().filter(|a| !is_host_port(a)) {
                return invalid(format!("{name}: {a:?} is not host:port"));
            }
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.node_id == 0 {
            return Err(ConfigError::Invalid("node_id must be non-zero".into()));
        }
        self.validate_cluster()?;
        self.break_glass.networks()?;
        self.listeners.validate().map_err(ConfigError::Invalid)?;
        let deepest = ephemera_core::state::MAX_DELEGATION_DEPTH;
        if !(1..=deepest).contains(&self.max_delegation_depth) {
            return Err(ConfigError::Invalid(format!(
                "max_delegation_depth must be 1 to {deepest}"
            )));
        }
        if self.audit.checkpoint_interval_s == 0 {
            return Err(ConfigError::Invalid(
                "audit.checkpoint_interval_s must be positive".into(),
            ));
        }
        if self.retention.request_s == 0 {
            return Err(ConfigError::Invalid(
                "retention.request_s must be positive: retries of a request are recognised for that long"
                    .into(),
            ));
        }
        self.guard.validate().map_err(ConfigError::Invalid)?;
        match (&self.tls, self.insecure_plaintext) {
            (Some(_), true) => {
                return Err(ConfigError::Invalid(
                    "set either a [tls] section or insecure_plaintext, not both".into(),
                ))
            }
            (None, false) => {
                return Err(ConfigError::Invalid(
                    "no [tls] section: configure TLS (see deploy/node.example.toml), or set \
                     `insecure_plaintext = true` for development on loopback"
                        .into(),
                ))
            }
            (Some(tls), false) => {
                let check = |what: &str, id: &str| {
                    ephemera_pki::SpiffeId::parse(id)
                        .map(|_| ())
                        .map_err(|e| ConfigError::Invalid(format!("{what}: {e}")))
                };
                check(
                    "tls.trust_domain",
                    &format!("spiffe://{}/x", tls.trust_domain),
                )?;
                if tls.node_cert_ttl_s != 0 && !NODE_CERT_TTL_RANGE_S.contains(&tls.node_cert_ttl_s)
                {
                    return Err(ConfigError::Invalid(format!(
                        "tls.node_cert_ttl_s must be 0 (no renewal) or {} to {} seconds",
                        NODE_CERT_TTL_RANGE_S.start(),
                        NODE_CERT_TTL_RANGE_S.end()
                    )));
                }
                for a in &tls.admin_ids {
                    check("tls.admin_ids", a)?;
                }
                let mut seen = std::collections::HashSet::new();
                for b in &tls.trust_bundles {
                    check(
                        "tls.trust_bundles",
                        &format!("spiffe://{}/x", b.trust_domain),
                    )?;
                    // Another CA for our own domain could mint our admin identities.
                    if b.trust_domain == tls.trust_domain || !seen.insert(&b.trust_domain) {
                        return Err(ConfigError::Invalid(format!(
                            "tls.trust_bundles: trust domain {:?} is the cluster's own or listed twice",
                            b.trust_domain
                        )));
                    }
                }
            }
            (None, true) => {
                for (name, addr) in [
                    ("api_addr", self.api_addr),
                    ("http_addr", self.http_addr),
                    ("cluster_addr", self.cluster_addr),
                ] {
                    if !addr.ip().is_loopback() {
                        return Err(ConfigError::Invalid(format!(
                            "{name} {addr} is not a loopback address; plaintext listeners are refused off loopback"
                        )));
                    }
                }
                let advertised = self.advertised().map(|a| PeerAddr {
                    id: self.node_id,
                    addr: a,
                });
                for p in self
                    .peer_cluster_addrs
                    .iter()
                    .chain(&self.cluster.peers)
                    .chain(&advertised)
                {
                    match p.addr.parse::<SocketAddr>() {
                        Ok(a) if a.ip().is_loopback() => {}
                        Ok(a) => {
                            return Err(ConfigError::Invalid(format!(
                                "{a} for node {} is not a loopback address; plaintext is refused off loopback",
                                p.id
                            )))
                        }
                        Err(_) => {
                            return Err(ConfigError::Invalid(format!(
                                "{:?} for node {} is not a loopback IP and port; plaintext is refused off loopback",
                                p.addr, p.id
                            )))
                        }
                    }
                }
            }
        }
        let r = &self.raft;
        if r.max_batch == 0 || r.max_batch > ephemera_core::command::MAX_BATCH {
            return Err(ConfigError::Invalid(format!(
                "raft.max_batch must be between 1 and {}",
                ephemera_core::command::MAX_BATCH
            )));
        }
        if r.heartbeat_interval_ms == 0 || r.election_timeout_min_ms <= r.heartbeat_interval_ms {
            return Err(ConfigError::Invalid(
                "raft.election_timeout_min_ms must exceed raft.heartbeat_interval_ms".into(),
            ));
        }
        if r.election_timeout_max_ms <= r.election_timeout_min_ms {
            return Err(ConfigError::Invalid(
                "raft.election_timeout_max_ms must exceed raft.election_timeout_min_ms".into(),
            ));
        }
        Ok(())
    }
}

/// `host:port` with a non-empty host and a port number: what a dial needs.
fn is_host_port(s: &str) -> bool {
    s.rsplit_once(':').is_some_and(|(host, port)| {
        !host.is_empty() && !host.contains(char::is_whitespace) && port.parse::<u16>().is_ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_in_deploy_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/node.example.toml");
        let cfg = NodeConfig::load(&path).expect("deploy/node.example.toml parses and validates");
        assert_eq!(
            cfg.raft.election_timeout_min_ms,
            RaftTuning::default().election_timeout_min_ms
        );
        assert_eq!(cfg.raft.max_batch, RaftTuning::default().max_batch);
    }

    #[test]
    fn plaintext_off_loopback_and_bad_timeouts_are_refused() {
        let base = "node_id = 1\ndata_dir = \"/tmp/x\"\napi_addr = \"127.0.0.1:1\"\nhttp_addr = \"127.0.0.1:2\"\n\
                    cluster_addr = \"127.0.0.1:3\"\nkek_file = \"/tmp/k\"\n";
        let parse = |extra: &str| -> Result<NodeConfig, ConfigError> {
            let cfg: NodeConfig = toml::from_str(&format!("{base}{extra}")).unwrap();
            cfg.validate().map(|_| cfg)
        };
        assert!(parse("insecure_plaintext = true\n").is_ok());
        let no_tls = parse("").unwrap_err().to_string();
        assert!(no_tls.contains("[tls]"), "{no_tls}");
        let both = parse("insecure_plaintext = true\n[tls]\ntrust_domain = \"td\"\nca_file = \"c\"\ncert_file = \"c\"\nkey_file = \"k\"\n");
        assert!(both.unwrap_err().to_string().contains("not both"));
        let bad_admin = parse("[tls]\ntrust_domain = \"td\"\nca_file = \"c\"\ncert_file = \"c\"\nkey_file = \"k\"\nadmin_ids = [\"admin\"]\n");
        assert!(bad_admin.unwrap_err().to_string().contains("tls.admin_ids"));
        let tls =
            "[tls]\ntrust_domain = \"td\"\nca_file = \"c\"\ncert_file = \"c\"\nkey_file = \"k\"\n";
        assert_eq!(parse(tls).unwrap().tls.unwrap().node_cert_ttl_s, 86_400);
        for ttl in [0, 10, 30 * 24 * 3600] {
            assert!(
                parse(&format!("{tls}node_cert_ttl_s = {ttl}\n")).is_ok(),
                "{ttl}"
            );
        }
        for ttl in [9, 30 * 24 * 3600 + 1] {
            let e = parse(&format!("{tls}node_cert_ttl_s = {ttl}\n")).unwrap_err();
            assert!(e.to_string().contains("tls.node_cert_ttl_s"), "{e}");
        }
        let own_domain = parse("[tls]\ntrust_domain = \"td\"\nca_file = \"c\"\ncert_file = \"c\"\nkey_file = \"k\"\n[[tls.trust_bundles]]\ntrust_domain = \"td\"\nbundle_file = \"b\"\n");
        assert!(own_domain
            .unwrap_err()
            .to_string()
            .contains("cluster's own"));
        let public: NodeConfig = toml::from_str(
            &format!("{base}insecure_plaintext = true\n").replace("127.0.0.1:1", "0.0.0.0:1"),
        )
        .unwrap();
        assert!(public
            .validate()
            .unwrap_err()
            .to_string()
            .contains("not a loopback address"));
        let timeouts =
            parse("insecure_plaintext = true\n[raft]\nelection_timeout_min_ms = 50\n").unwrap_err();
        assert!(timeouts.to_string().contains("election_timeout_min_ms"));
        for batch in [0, ephemera_core::command::MAX_BATCH + 1] {
            let e = parse(&format!(
                "insecure_plaintext = true\n[raft]\nmax_batch = {batch}\n"
            ));
            assert!(
                e.unwrap_err().to_string().contains("raft.max_batch"),
                "{batch}"
            );
        }
        assert!(toml::from_str::<NodeConfig>(&format!("{base}unknown_key = 1\n")).is_err());
        let bad_net = parse(
            "insecure_plaintext = true\n[break_glass]\nallowed_sources = [\"10.0.0.0/33\"]\n",
        );
        assert!(bad_net.unwrap_err().to_string().contains("prefix length"));
    }

    #[test]
    fn a_config_written_by_save_loads_back_equal() {
        let dir = tempfile::tempdir().unwrap();
        let addr = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        let mut cfg = NodeConfig::new(
            7,
            dir.path().join("data"),
            [addr(1), addr(2), addr(3)],
            dir.path().join("kek"),
        );
        let path = dir.path().join("config.toml");
        let unsecured = cfg.save(&path).unwrap_err().to_string();
        assert!(unsecured.contains("[tls]"), "{unsecured}");
        assert!(!path.exists(), "an invalid config was written");
        cfg.tls = Some(TlsConfig {
            trust_domain: "td.test".into(),
            ca_file: "ca.crt".into(),
            cert_file: "n.crt".into(),
            key_file: "n.key".into(),
            admin_ids: vec!["spiffe://td.test/admin".into()],
            trust_bundles: vec![],
            node_cert_ttl_s: 60,
        });
        cfg.bootstrap.join = true;
        cfg.raft.snapshot_logs_since_last = 500;
        cfg.peer_cluster_addrs.push(PeerAddr {
            id: 2,
            addr: "127.0.0.1:9".into(),
        });
        cfg.break_glass.allowed_sources.push("127.0.0.1".into());
        cfg.save(&path).unwrap();
        let back = NodeConfig::load(&path).unwrap();
        // Debug prints every field (no secrets live in a config): equal text, equal config.
        assert_eq!(format!("{back:?}"), format!("{cfg:?}"));
        let defaults: NodeConfig = toml::from_str(
            "node_id = 7\ndata_dir = \"d\"\napi_addr = \"127.0.0.1:1\"\nhttp_addr = \"127.0.0.1:2\"\n\
             cluster_addr = \"127.0.0.1:3\"\nkek_file = \"k\"\n",
        )
        .unwrap();
        let new = NodeConfig::new(7, "d".into(), [addr(1), addr(2), addr(3)], "k".into());
        assert_eq!(format!("{defaults:?}"), format!("{new:?}"));
    }

    #[test]
    fn networks_contain_what_they_should() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        let cases = [
            ("10.0.0.0/8", "10.200.3.4", true),
            ("10.0.0.0/8", "11.0.0.1", false),
            ("127.0.0.1", "127.0.0.1", true),
            ("127.0.0.1", "127.0.0.2", false),
            ("127.0.0.1", "::ffff:127.0.0.1", true),
            ("0.0.0.0/0", "192.0.2.1", true),
            ("0.0.0.0/0", "::1", false),
            ("::1/128", "::1", true),
            ("fd00::/8", "fd12::1", true),
            ("fd00::/8", "fe80::1", false),
        ];
        for (net, addr, want) in cases {
            let n = IpNet::parse(net).unwrap();
            assert_eq!(n.contains(ip(addr)), want, "{net} contains {addr}");
        }
        for bad in ["", "10.0.0.0/", "10.0.0/8", "::1/129", "host"] {
            assert!(IpNet::parse(bad).is_err(), "{bad:?} parses");
        }
    }

    #[test]
    fn cluster_peers_and_advertised_addresses_are_checked() {
        let base = "node_id = 2\ndata_dir = \"/tmp/x\"\napi_addr = \"0.0.0.0:1\"\nhttp_addr = \"0.0.0.0:2\"\n\
                    cluster_addr = \"0.0.0.0:3\"\nkek_file = \"/tmp/k\"\n\
                    [tls]\ntrust_domain = \"td\"\nca_file = \"c\"\ncert_file = \"c\"\nkey_file = \"k\"\n";
        let parse = |extra: &str| -> Result<NodeConfig, ConfigError> {
            let cfg: NodeConfig = toml::from_str(&format!("{base}{extra}")).unwrap();
            cfg.validate().map(|_| cfg)
        };
        let three = "[cluster]\nbootstrap_expect = 3\npeers = [{ id = 1, addr = \"n1.example:7301\" }, \
                     { id = 2, addr = \"n2.example:7301\" }, { id = 3, addr = \"10.0.0.3:7301\" }]\n";
        let ok = parse(three).unwrap();
        assert_eq!(ok.bootstrapper(), 1);
        assert_eq!(
            ok.admin_credential_path(),
            Path::new("/tmp/x/admin.credential")
        );
        // Listen addresses are advertised unless [advertise] says otherwise.
        assert_eq!(ok.advertised()[2], "0.0.0.0:3");
        let adv = parse(&format!(
            "{three}[advertise]\ncluster_addr = \"n2.example:7301\"\n"
        ))
        .unwrap();
        assert_eq!(
            adv.advertised(),
            ["0.0.0.0:1", "0.0.0.0:2", "n2.example:7301"].map(String::from)
        );
        let cases = [
            ("[cluster]\nbootstrap_expect = 2\n", "bootstrap_expect is 2"),
            (
                "[cluster]\npeers = [{ id = 0, addr = \"a:1\" }]\n",
                "non-zero",
            ),
            (
                "[cluster]\npeers = [{ id = 1, addr = \"a\" }]\n",
                "not host:port",
            ),
            (
                "[cluster]\npeers = [{ id = 1, addr = \":7301\" }]\n",
                "not host:port",
            ),
            (
                "[cluster]\npeers = [{ id = 1, addr = \"a:99999\" }]\n",
                "not host:port",
            ),
            (
                "[cluster]\npeers = [{ id = 1, addr = \"a:1\" }, { id = 1, addr = \"b:1\" }]\n",
                "listed twice",
            ),
            ("[advertise]\napi_addr = \"nohost\"\n", "advertise.api_addr"),
        ];
        for (extra, want) in cases {
            let e = parse(extra).unwrap_err().to_string();
            assert!(e.contains(want), "{extra}: {e}");
        }
        // The node that forms the cluster cannot be one that only joins.
        let joiner = three
            .replace("id = 1,", "id = 5,")
            .replace("bootstrap_expect = 3", "bootstrap_expect = 2");
        let e = parse(&format!("[bootstrap]\njoin = true\n{joiner}")).unwrap_err();
        assert!(e.to_string().contains("bootstrap.join"), "{e}");
        assert!(
            parse(&format!("[bootstrap]\njoin = true\n{three}")).is_ok(),
            "node 2 does not form"
        );
        // Plaintext: peers and advertised addresses must be loopback IPs.
        let plain = base
            .replace("0.0.0.0", "127.0.0.1")
            .split("[tls]")
            .next()
            .unwrap()
            .to_string()
            + "insecure_plaintext = true\n";
        let parse_plain = |extra: &str| -> Result<NodeConfig, ConfigError> {
            let cfg: NodeConfig = toml::from_str(&format!("{plain}{extra}")).unwrap();
            cfg.validate().map(|_| cfg)
        };
        assert!(
            parse_plain("[cluster]\npeers = [{ id = 1, addr = \"127.0.0.1:7301\" }]\n").is_ok()
        );
        for extra in [
            "[cluster]\npeers = [{ id = 1, addr = \"n1.example:7301\" }]\n",
            "[advertise]\ncluster_addr = \"10.0.0.2:7301\"\n",
        ] {
            let e = parse_plain(extra).unwrap_err().to_string();
            assert!(e.contains("loopback"), "{extra}: {e}");
        }
    }
}
