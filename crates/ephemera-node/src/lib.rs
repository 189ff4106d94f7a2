//! An Ephemera node: `run(config, shutdown)` serves the gRPC API, the HTTP listener and the
//! cluster listener, and runs the leader's housekeeping until `shutdown` resolves.

// tonic's service traits return `Result<_, tonic::Status>`; its size is not ours to change.
#![allow(clippy::result_large_err)]

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ephemera_core::crypto::Kek;
use ephemera_pki::{ClientPolicy, Identity, SpiffeId, TrustBundles};
use ephemera_proto::internal::cluster_server::ClusterServer;
use ephemera_proto::v1::admin_server::AdminServer;
use ephemera_proto::v1::issuer_server::IssuerServer;
use ephemera_raft::network::PeerTls;
use ephemera_raft::network::{Peers, MAX_CLUSTER_MESSAGE_BYTES};
use ephemera_raft::{NodeInfo, Raft};
use tokio::net::TcpListener;
use tokio::sync::watch;

pub mod authz;
pub mod autojoin;
pub mod bootstrap;
pub mod coalesce;
pub mod config;
pub mod conn;
pub mod db;
pub mod exchange;
pub mod group_commit;
pub mod grpc;
pub mod guard;
pub mod http;
pub mod issue;
pub mod methods;
pub mod metrics;
pub mod mint;
pub mod node;
pub mod oidc;
pub mod revocation_watch;
pub mod secret_files;
pub mod snapshot_schedule;
pub mod verified;

pub use config::NodeConfig;
pub use node::Node;

/// How long in-flight requests may take to finish once shutdown starts.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// Largest request the public gRPC API accepts.
pub const MAX_API_MESSAGE_BYTES: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("cannot read the key-encryption key file {path}: {message}")]
    Kek { path: String, message: String },
    #[error("cannot open storage in {path}: {message}")]
    Storage { path: String, message: String },
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        addr: SocketAddr,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("raft: {0}")]
    Raft(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("bootstrap: {0}")]
    Bootstrap(String),
    #[error("OIDC: {0}")]
    Oidc(String),
    #[error("server failed: {0}")]
    Serve(String),
}

fn raft_config(cfg: &NodeConfig) -> Result<openraft::Config, NodeError> {
    let r = &cfg.raft;
    let c = openraft::Config {
        cluster_name: "ephemera".into(),
        heartbeat_interval: r.heartbeat_interval_ms,
        election_timeout_min: r.election_timeout_min_ms,
        election_timeout_max: r.election_timeout_max_ms,
        // The node decides (see `snapshot_schedule`): by commands as well as entries, and
        // staggered across nodes.
        snapshot_policy: openraft::SnapshotPolicy::Never,
        max_in_snapshot_log_to_keep: r.max_in_snapshot_log_to_keep,
        // Per snapshot chunk; the last one returns only once the follower has replaced its
        // state, which takes tens of seconds for a million leases.
        install_snapshot_timeout: 120_000,
        // An entry is at most one group-commit batch (`MAX_BATCH_BYTES`, and no single API
        // command comes near it), so an append of this many stays within half the message limit.
        max_payload_entries: (MAX_CLUSTER_MESSAGE_BYTES / (4 * node::MAX_BATCH_BYTES)) as u64,
        ..Default::default()
    };
    c.validate().map_err(|e| NodeError::Raft(e.to_string()))
}

/// TLS material loaded at start-up.
pub struct LoadedTls {
    trust_domain: String,
    identity: Identity,
    /// The cluster CA only: node-to-node trust.
    cluster_bundle: Arc<TrustBundles>,
    /// The cluster CA and every configured external bundle: who may call the API.
    all_bundles: Arc<TrustBundles>,
    admin_ids: std::collections::HashSet<String>,
    node_cert_ttl_s: u64,
}

/// `renewed_dir`: where the node keeps the certificate it renewed for itself, preferred to the
/// bootstrap certificate (`tls.cert_file`) while it is valid.
fn load_tls(
    node_id: u64,
    t: &config::TlsConfig,
    renewed_dir: &std::path::Path,
) -> Result<LoadedTls, NodeError> {
    let read = |what: &str, p: &std::path::Path| {
        std::fs::read_to_string(p)
            .map_err(|e| NodeError::Tls(format!("cannot read {what} {}: {e}", p.display())))
    };
    let pki = |e: ephemera_pki::PkiError| NodeError::Tls(e.to_string());
    let key_pem = zeroize::Zeroizing::new(
        secret_files::read_private(&t.key_file)
            .map_err(|e| NodeError::Tls(format!("tls.key_file: {e}")))?,
    );
    let identity =
        Identity::from_pem(&read("tls.cert_file", &t.cert_file)?, &key_pem).map_err(pki)?;
    let expected = SpiffeId::node(&t.trust_domain, node_id);
    let actual = identity.spiffe_id().map_err(pki)?;
    if actual != expected {
        return Err(NodeError::Tls(format!(
            "tls.cert_file is for {actual}, but this node is {expected}"
        )));
    }
    let ca = read("tls.ca_file", &t.ca_file)?;
    let mut cluster = TrustBundles::default();
    cluster.add(&t.trust_domain, &ca).map_err(pki)?;
    match node::RenewedCertificate::load(renewed_dir, &expected, &cluster) {
        Ok(Some(renewed)) => {
            identity
                .replace(&renewed.cert_pem, &renewed.key_pem)
                .map_err(pki)?;
            tracing::info!("presenting the certificate this node renewed");
        }
        Ok(None) => {}
        Err(why) => tracing::warn!(
            reason = %why,
            "not using the renewed node certificate; presenting tls.cert_file"
        ),
    }
    let mut all = cluster.clone();
    for b in &t.trust_bundles {
        all.add(
            &b.trust_domain,
            &read("tls.trust_bundles.bundle_file", &b.bundle_file)?,
        )
        .map_err(pki)?;
    }
    Ok(LoadedTls {
        trust_domain: t.trust_domain.clone(),
        identity,
        cluster_bundle: Arc::new(cluster),
        all_bundles: Arc::new(all),
        admin_ids: t.admin_ids.iter().cloned().collect(),
        node_cert_ttl_s: t.node_cert_ttl_s,
    })
}

/// Checks every second whether this node's certificate is due for renewal (a local check of
/// its validity dates), so a node renews as soon as it has joined a cluster with a CA. After a
/// failed attempt (no leader, a partition) it waits a tenth of the lifetime (1 to 60 s) before
/// asking the leader again: retried long before the certificate expires, without hammering
/// the leader. Each attempt is bounded by the request timeout.
fn spawn_certificate_renewal(
    node: Arc<node::Node>,
    ttl_s: u64,
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let backoff = Duration::from_secs((ttl_s / 10).clamp(1, 60));
    tokio::spawn(async move {
        let mut wait = Duration::ZERO;
        loop {
            tokio::select! {
                _ = async { let _ = stop.wait_for(|s| *s).await; } => break,
                _ = tokio::time::sleep(wait) => {
                    wait = match node.renew_own_certificate_if_due().await {
                        Ok(_) => Duration::from_secs(1),
                        Err(e) => {
                            tracing::warn!(error = %e, retry_in_s = backoff.as_secs(), "renewing this node's certificate failed");
                            backoff
                        }
                    };
                }
            }
        }
    })
}

/// Asks for a snapshot when [`snapshot_schedule::SnapshotSchedule`] says so (commands or
/// entries since the last snapshot, staggered by node id); openraft's own policy is off.
fn spawn_snapshot_schedule(
    raft: Raft,
    node_id: u64,
    applied: Arc<std::sync::atomic::AtomicU64>,
    every: u64,
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let count = move || applied.load(std::sync::atomic::Ordering::Relaxed);
    tokio::spawn(async move {
        let snapshot_index = |raft: &Raft| raft.metrics().borrow().snapshot.map(|l| l.index);
        let mut schedule = snapshot_schedule::SnapshotSchedule::new(
            every,
            node_id,
            count(),
            snapshot_index(&raft),
        );
        loop {
            tokio::select! {
                _ = async { let _ = stop.wait_for(|s| *s).await; } => break,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            let applied_index = raft.metrics().borrow().last_applied.map_or(0, |l| l.index);
            if schedule.due(count(), applied_index, snapshot_index(&raft)) {
                if let Err(e) = raft.trigger().snapshot().await {
                    tracing::warn!(error = %e, "triggering a snapshot");
                }
            }
        }
    })
}

async fn bind(addr: SocketAddr, what: &'static str) -> Result<TcpListener, NodeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| NodeError::Bind { addr, what, source })
}

/// Runs a node until `shutdown` resolves.
pub async fn run(
    cfg: NodeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), NodeError> {
    cfg.validate()?;
    // Refused when another local user could read it; the text is wiped once parsed.
    let kek_text =
        zeroize::Zeroizing::new(secret_files::read_private(&cfg.kek_file).map_err(|e| {
            NodeError::Kek {
                path: cfg.kek_file.display().to_string(),
                message: e.to_string(),
            }
        })?);
    let kek = Kek::parse(&kek_text).map_err(|e| NodeError::Kek {
        path: cfg.kek_file.display().to_string(),
        message: e.to_string(),
    })?;
    let opening = std::time::Instant::now();
    let (log_store, sm) =
        ephemera_raft::store::open(&cfg.data_dir).map_err(|e| NodeError::Storage {
            path: cfg.data_dir.display().to_string(),
            message: e.to_string(),
        })?;
    tracing::info!(
        elapsed_ms = opening.elapsed().as_millis() as u64,
        "storage opened"
    );
    let view = sm.view();
    let applied_commands = sm.commands_applied();
    let initialised = ephemera_core::state::admin_credential_hash(&view)
        .map_err(|e| NodeError::Storage {
            path: cfg.data_dir.display().to_string(),
            message: e.to_string(),
        })?
        .is_some();
    // A node that forms its cluster itself (`cluster.bootstrap_expect`) takes no `cluster init`.
    let refuses_init = cfg.bootstrap.join || cfg.cluster.bootstrap_expect > 0;
    let init_secret = if refuses_init {
        None
    } else {
        bootstrap::InitSecret::prepare(&cfg.init_secret_path(), initialised)
            .map_err(NodeError::Bootstrap)?
    };
    let local = node::LocalAccess {
        init_secret: std::sync::Mutex::new(init_secret),
        join_only: refuses_init,
        break_glass_sources: cfg.break_glass.networks()?,
        admitted: Default::default(),
    };
    let tls = cfg
        .tls
        .as_ref()
        .map(|t| load_tls(cfg.node_id, t, &cfg.renewed_cert_dir()))
        .transpose()?;
    let listeners = [
        bind(cfg.cluster_addr, "cluster").await?,
        bind(cfg.api_addr, "api").await?,
        bind(cfg.http_addr, "http").await?,
    ];
    let clock = Arc::new(node::SystemClock {
        offset_ms: cfg.test_clock_offset_ms,
    });
    let parts = Parts {
        log_store,
        state_machine: sm,
        view,
        applied_commands,
        kek,
        local,
        tls,
        clock,
        entropy: Box::new(node::OsEntropy),
        dial: Arc::new(ephemera_raft::network::TcpDial),
        listeners,
    };
    serve(cfg, parts, shutdown).await
}

/// What a node runs on, which [`run`] takes from the configuration, the disk and the operating
/// system, and the simulation (`crates/ephemera-sim`) from memory and a simulated network.
pub struct Parts<LS, SM, L> {
    pub log_store: LS,
    pub state_machine: SM,
    /// Reads of `state_machine`'s applied state.
    pub view: ephemera_raft::store::StateView,
    /// Commands `state_machine` has applied (what the snapshot schedule counts).
    pub applied_commands: Arc<std::sync::atomic::AtomicU64>,
    pub kek: Kek,
    pub local: node::LocalAccess,
    pub tls: Option<LoadedTls>,
    pub clock: Arc<dyn ephemera_core::Clock>,
    pub entropy: Box<dyn ephemera_core::command::Entropy + Send>,
    /// How to connect to peers.
    pub dial: Arc<dyn ephemera_raft::network::Dial>,
    /// The cluster, API and HTTP listeners, bound.
    pub listeners: [L; 3],
}

/// Runs a node on `parts` until `shutdown` resolves: Raft, the three listeners and the
/// background tasks.
pub async fn serve<LS, SM, L>(
    cfg: NodeConfig,
    parts: Parts<LS, SM, L>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), NodeError>
where
    LS: openraft::storage::RaftLogStorage<ephemera_raft::TypeConfig>,
    SM: openraft::storage::RaftStateMachine<ephemera_raft::TypeConfig>,
    L: conn::Listener,
{
    let Parts {
        log_store,
        state_machine: sm,
        view,
        applied_commands,
        kek,
        local,
        tls,
        clock,
        entropy,
        dial,
        listeners: [cluster_listener, api_listener, http_listener],
    } = parts;
    let opening = tokio::time::Instant::now();
    let oidc_verifier = oidc::Verifier::new(&cfg.oidc_issuers).map_err(NodeError::Oidc)?;
    let peers = Peers::with_dial(
        cfg.peer_cluster_addrs
            .iter()
            .map(|p| (p.id, p.addr.clone()))
            .collect(),
        tls.as_ref().map(|t| PeerTls {
            identity: t.identity.clone(),
            bundles: t.cluster_bundle.clone(),
            trust_domain: t.trust_domain.clone(),
        }),
        dial,
    );
    if cfg.test_clock_offset_ms != 0 {
        tracing::warn!(
            offset_ms = cfg.test_clock_offset_ms,
            "TEST ONLY: this node's clock is shifted"
        );
    }
    let raft = Raft::new(
        cfg.node_id,
        Arc::new(raft_config(&cfg)?),
        peers.clone(),
        log_store,
        sm,
    )
    .await
    .map_err(|e| NodeError::Raft(e.to_string()))?;
    tracing::info!(
        elapsed_ms = opening.elapsed().as_millis() as u64,
        "raft started"
    );
    let [api_addr, http_addr, cluster_addr] = cfg.advertised();
    let info = NodeInfo {
        api_addr,
        http_addr,
        cluster_addr,
    };
    let node = Arc::new(Node::new(
        cfg.node_id,
        info,
        raft.clone(),
        view,
        peers,
        kek,
        clock,
        entropy,
        (
            Duration::from_millis(cfg.request_timeout_ms),
            cfg.max_delegation_depth,
        ),
        tls.as_ref().map(|t| node::NodeTls {
            trust_domain: t.trust_domain.clone(),
            bundles: t.all_bundles.clone(),
            admin_ids: t.admin_ids.clone(),
            identity: t.identity.clone(),
            cluster_bundle: t.cluster_bundle.clone(),
            node_cert_ttl_s: t.node_cert_ttl_s,
            renewed_cert_dir: cfg.renewed_cert_dir(),
        }),
        oidc_verifier,
        cfg.guard.clone(),
        local,
        node::Housekeeping {
            retention: cfg.retention,
            checkpoint_interval_ms: cfg.audit.checkpoint_interval_s.saturating_mul(1000),
        },
    ));
    node.start_coalescing(cfg.raft.max_batch);

    if cfg.insecure_plaintext {
        tracing::warn!("INSECURE: listeners run without TLS (insecure_plaintext = true); development use on loopback only");
    }
    tracing::info!(
        node_id = cfg.node_id,
        api = %cfg.api_addr, http = %cfg.http_addr, cluster = %cfg.cluster_addr,
        "node started"
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    let acceptor = |policy: ClientPolicy, alpn: &[&[u8]], bundles: &Arc<TrustBundles>| {
        tls.as_ref()
            .map(|t| {
                ephemera_pki::server_config(&t.identity, bundles.clone(), policy, alpn)
                    .map(|c| tokio_rustls::TlsAcceptor::from(Arc::new(c)))
                    .map_err(|e| NodeError::Tls(e.to_string()))
            })
            .transpose()
    };
    let (cluster_tls, api_tls, http_tls) = match &tls {
        Some(t) => (
            acceptor(
                ClientPolicy::Nodes {
                    trust_domain: t.trust_domain.clone(),
                },
                &[b"h2"],
                &t.cluster_bundle,
            )?,
            acceptor(ClientPolicy::VerifyPerRequest, &[b"h2"], &t.all_bundles)?,
            acceptor(
                ClientPolicy::VerifyPerRequest,
                &[b"h2", b"http/1.1"],
                &t.all_bundles,
            )?,
        ),
        None => (None, None, None),
    };
    let cluster_server = tonic::transport::Server::builder()
        .add_service(
            ClusterServer::new(grpc::ClusterService { node: node.clone() })
                .max_decoding_message_size(MAX_CLUSTER_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_CLUSTER_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(
            conn::incoming(cluster_listener, cluster_tls, &cfg.listeners),
            stopped(stop_rx.clone()),
        );
    let api = grpc::Api {
        node: node.clone(),
        plaintext: cfg.insecure_plaintext,
    };
    let api_server = tonic::transport::Server::builder()
        // The backstop for every call; each has a tighter deadline of its own except a join,
        // which waits for the new node to catch up.
        .timeout(node::CATCH_UP_LIMIT + Duration::from_secs(30))
        // The method table: every call is admitted by its row, or refused.
        .layer(methods::GrpcGateLayer { node: node.clone() })
        .add_service(
            IssuerServer::new(api.clone()).max_decoding_message_size(MAX_API_MESSAGE_BYTES),
        )
        .add_service(AdminServer::new(api).max_decoding_message_size(MAX_API_MESSAGE_BYTES))
        .serve_with_incoming_shutdown(
            conn::incoming(api_listener, api_tls, &cfg.listeners),
            stopped(stop_rx.clone()),
        );
    let http_server = http::serve(
        conn::incoming(http_listener, http_tls, &cfg.listeners),
        &cfg.listeners,
        http::router(node.clone()),
        stopped(stop_rx.clone()),
    );

    let worker_node = node.clone();
    let mut worker_stop = stop_rx.clone();
    let interval = Duration::from_millis(cfg.expiry_interval_ms.max(50));
    let worker = tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = async { let _ = worker_stop.wait_for(|s| *s).await; } => break,
                _ = tick.tick() => {
                    worker_node.leader_tick().await;
                    worker_node.measure_clock_offset().await;
                }
            }
        }
    });
    let executor = node::effects::spawn(node.clone(), stop_rx.clone());
    let snapshotter = spawn_snapshot_schedule(
        raft.clone(),
        cfg.node_id,
        applied_commands,
        cfg.raft.snapshot_logs_since_last,
        stop_rx.clone(),
    );
    let joiner = autojoin::spawn(node.clone(), cfg.clone(), stop_rx.clone());
    let renewer = tls
        .as_ref()
        .filter(|t| t.node_cert_ttl_s > 0)
        .map(|t| spawn_certificate_renewal(node.clone(), t.node_cert_ttl_s, stop_rx.clone()));
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });

    // Graceful shutdown waits for connections to close, and clients keep HTTP/2 connections
    // open indefinitely: in-flight requests get a grace period, then the rest are dropped.
    let servers = async { tokio::join!(cluster_server, api_server, http_server) };
    let mut grace_rx = stop_rx.clone();
    let grace = async move {
        let _ = grace_rx.wait_for(|s| *s).await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    let served = tokio::select! {
        r = servers => Some(r),
        _ = grace => {
            tracing::info!("shutdown grace period over; closing the remaining connections");
            None
        }
    };
    let _ = worker.await;
    let _ = executor.await;
    let _ = snapshotter.await;
    if let Some(j) = joiner {
        let _ = j.await;
    }
    if let Some(r) = renewer {
        let _ = r.await;
    }
    if let Err(e) = raft.shutdown().await {
        tracing::warn!(error = %e, "raft shutdown");
    }
    tracing::info!("node stopped");
    if let Some((c, a, ())) = served {
        c.map_err(|e| NodeError::Serve(e.to_string()))?;
        a.map_err(|e| NodeError::Serve(e.to_string()))?;
    }
    Ok(())
}
