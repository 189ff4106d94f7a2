//! Node-to-node transport over tonic: one lazily connected channel per peer, cached and shared by
//! Raft replication and by forwarding, and the server-side handlers for incoming Raft RPCs.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ephemera_proto::internal::cluster_client::ClusterClient;
use ephemera_proto::internal::RaftPayload;
use openraft::error::{InstallSnapshotError, NetworkError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use tonic::transport::{Channel, Endpoint};

use crate::{decode, encode, NodeId, NodeInfo, Raft, RaftError, RpcError, TypeConfig};

/// Raft messages carry snapshot chunks; allow well above openraft's chunk size.
pub const MAX_CLUSTER_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// A byte stream between nodes: a TCP stream, or under simulation a simulated one.
pub trait ByteStream:
    tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static
{
}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static> ByteStream for T {}
pub type BoxedStream = Box<dyn ByteStream>;

/// How a node opens a connection to an address (`host:port`): TCP, or a simulated network.
pub trait Dial: Send + Sync + 'static {
    fn dial(&self, addr: String) -> Pin<Box<dyn Future<Output = io::Result<BoxedStream>> + Send>>;
}

/// The operating system's TCP.
pub struct TcpDial;

impl Dial for TcpDial {
    fn dial(&self, addr: String) -> Pin<Box<dyn Future<Output = io::Result<BoxedStream>> + Send>> {
        Box::pin(async move {
            let tcp = tokio::net::TcpStream::connect(&addr).await?;
            tcp.set_nodelay(true)?;
            Ok(Box::new(tcp) as BoxedStream)
        })
    }
}

/// mTLS material for node-to-node channels.
pub struct PeerTls {
    pub identity: ephemera_pki::Identity,
    /// Our own trust domain's bundle only: peers are nodes of this cluster.
    pub bundles: Arc<ephemera_pki::TrustBundles>,
    pub trust_domain: String,
}

/// A peer's address, the channel to it, and the channel's number (see [`Peers::forget`]).
type CachedChannel = (String, Channel, u64);

/// The cache of channels to peers, keyed by node id and address (a member that moves gets a
/// fresh channel).
#[derive(Clone)]
pub struct Peers {
    channels: Arc<Mutex<HashMap<NodeId, CachedChannel>>>,
    /// Numbers channels.
    made: Arc<std::sync::atomic::AtomicU64>,
    /// Addresses to dial instead of a peer's advertised one (NAT, or a fault proxy in tests).
    overrides: Arc<HashMap<NodeId, String>>,
    tls: Option<Arc<PeerTls>>,
    dial: Arc<dyn Dial>,
}

impl Peers {
    pub fn new(overrides: HashMap<NodeId, String>, tls: Option<PeerTls>) -> Self {
        Self::with_dial(overrides, tls, Arc::new(TcpDial))
    }

    pub fn with_dial(
        overrides: HashMap<NodeId, String>,
        tls: Option<PeerTls>,
        dial: Arc<dyn Dial>,
    ) -> Self {
        Peers {
            channels: Arc::default(),
            made: Arc::default(),
            overrides: Arc::new(overrides),
            tls: tls.map(Arc::new),
            dial,
        }
    }

    pub fn channel(
        &self,
        id: NodeId,
        cluster_addr: &str,
    ) -> Result<Channel, tonic::transport::Error> {
        self.numbered_channel(id, cluster_addr).map(|(ch, _)| ch)
    }

    /// Drops the cached channel to `id` if it is still channel number `number`, so the next
    /// call connects afresh. For a connection that swallowed a request: a peer that vanished
    /// behind a middlebox, or a partition that dropped segments, can leave a TCP connection
    /// that is open but delivers nothing, for as long as the kernel keeps retransmitting;
    /// a new connection works as soon as the network does. (Another caller may already have
    /// replaced it: the number says whether it is still the one that failed.)
    pub fn forget(&self, id: NodeId, number: u64) {
        let mut map = self.channels.lock().expect("peer cache lock");
        if map.get(&id).is_some_and(|(_, _, n)| *n == number) {
            map.remove(&id);
        }
    }

    fn numbered_channel(
        &self,
        id: NodeId,
        cluster_addr: &str,
    ) -> Result<(Channel, u64), tonic::transport::Error> {
        let cluster_addr = self.overrides.get(&id).map_or(cluster_addr, String::as_str);
        let mut map = self.channels.lock().expect("peer cache lock");
        if let Some((addr, ch, number)) = map.get(&id) {
            if addr == cluster_addr {
                return Ok((ch.clone(), *number));
            }
        }
        let endpoint = Endpoint::from_shared(format!("http://{cluster_addr}"))?
            .connect_timeout(Duration::from_millis(500))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5));
        // The peer must prove it is exactly node `id` of our trust domain.
        let tls = self
            .tls
            .as_ref()
            .map(|tls| {
                let expected = ephemera_pki::SpiffeId::node(&tls.trust_domain, id);
                ephemera_pki::peer_client_config(&tls.identity, tls.bundles.clone(), expected)
                    .map(|c| tokio_rustls::TlsConnector::from(Arc::new(c)))
            })
            .transpose()
            .expect("a rustls client config from a validated identity");
        let (dial, addr) = (self.dial.clone(), cluster_addr.to_string());
        let ch = endpoint.connect_with_connector_lazy(tower::service_fn(
            move |_: tonic::transport::Uri| {
                let (tls, connecting) = (tls.clone(), dial.dial(addr.clone()));
                async move {
                    let stream = connecting.await?;
                    let stream: BoxedStream = match tls {
                        None => stream,
                        Some(tls) => {
                            let name =
                                rustls::pki_types::ServerName::try_from("node.ephemera.invalid")
                                    .expect("a valid DNS name");
                            Box::new(tls.connect(name, stream).await?)
                        }
                    };
                    Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(stream))
                }
            },
        ));
        let number = self.made.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        map.insert(id, (cluster_addr.to_string(), ch.clone(), number));
        Ok((ch, number))
    }

    pub fn client(
        &self,
        id: NodeId,
        cluster_addr: &str,
    ) -> Result<ClusterClient<Channel>, tonic::transport::Error> {
        Ok(cluster_client(self.channel(id, cluster_addr)?))
    }

    /// Calls `rpc` on a client to `id` within `within`. A call that gets no answer in time
    /// drops the channel it used (see [`Peers::forget`]), so the next call connects afresh.
    pub async fn call_within<T, F, Fut>(
        &self,
        id: NodeId,
        cluster_addr: &str,
        within: Duration,
        rpc: F,
    ) -> Result<Result<T, tonic::Status>, PeerCallError>
    where
        F: FnOnce(ClusterClient<Channel>) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let (ch, number) = self
            .numbered_channel(id, cluster_addr)
            .map_err(|e| PeerCallError::Address(e.to_string()))?;
        match tokio::time::timeout(within, rpc(cluster_client(ch))).await {
            Ok(answer) => Ok(answer),
            Err(_) => {
                self.forget(id, number);
                Err(PeerCallError::TimedOut)
            }
        }
    }
}

/// Why [`Peers::call_within`] got no answer.
#[derive(Debug, thiserror::Error)]
pub enum PeerCallError {
    #[error("bad peer address: {0}")]
    Address(String),
    #[error("no answer in time")]
    TimedOut,
}

fn cluster_client(ch: Channel) -> ClusterClient<Channel> {
    ClusterClient::new(ch)
        .max_decoding_message_size(MAX_CLUSTER_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_CLUSTER_MESSAGE_BYTES)
}

impl RaftNetworkFactory<TypeConfig> for Peers {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: NodeId, node: &NodeInfo) -> Self::Network {
        PeerConnection {
            target,
            addr: node.cluster_addr.clone(),
            peers: self.clone(),
            current: None,
        }
    }
}

pub struct PeerConnection {
    target: NodeId,
    addr: String,
    peers: Peers,
    /// The client in use and its channel's number; none until the first call, and after a
    /// call that timed out (the next call connects afresh, see [`Peers::forget`]).
    current: Option<(ClusterClient<Channel>, u64)>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct TransportError(String);

impl PeerConnection {
    async fn call<Req, Resp, E, F, Fut>(
        &mut self,
        req: &Req,
        option: &RPCOption,
        rpc: F,
    ) -> Result<Resp, RpcError<E>>
    where
        Req: serde::Serialize,
        Resp: serde::de::DeserializeOwned,
        E: std::error::Error + serde::de::DeserializeOwned,
        F: FnOnce(ClusterClient<Channel>, RaftPayload) -> Fut,
        Fut: Future<Output = Result<tonic::Response<RaftPayload>, tonic::Status>>,
    {
        let client = match &self.current {
            Some((c, _)) => c.clone(),
            None => match self.peers.numbered_channel(self.target, &self.addr) {
                Ok((ch, number)) => {
                    let c = cluster_client(ch);
                    self.current = Some((c.clone(), number));
                    c
                }
                // An unparsable address, reported on every call.
                Err(e) => {
                    return Err(RpcError::Unreachable(Unreachable::new(&TransportError(
                        e.to_string(),
                    ))))
                }
            },
        };
        let payload = RaftPayload { data: encode(req) };
        let resp = match tokio::time::timeout(option.hard_ttl(), rpc(client, payload)).await {
            Err(_) => {
                if let Some((_, number)) = self.current.take() {
                    self.peers.forget(self.target, number);
                }
                return Err(RpcError::Network(NetworkError::new(&TransportError(
                    format!("rpc to node {} timed out", self.target),
                ))));
            }
            Ok(Err(status)) => {
                let e = TransportError(format!("node {}: {}", self.target, status.message()));
                return Err(match status.code() {
                    tonic::Code::Unavailable => RpcError::Unreachable(Unreachable::new(&e)),
                    _ => RpcError::Network(NetworkError::new(&e)),
                });
            }
            Ok(Ok(r)) => r.into_inner(),
        };
        let result: Result<Resp, RaftError<E>> = decode(&resp.data).map_err(|e| {
            RpcError::Network(NetworkError::new(&TransportError(format!(
                "bad reply: {e}"
            ))))
        })?;
        result.map_err(|e| RpcError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerConnection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcError> {
        self.call(&rpc, &option, |mut c, p| async move {
            c.append_entries(p).await
        })
        .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcError<InstallSnapshotError>> {
        self.call(&rpc, &option, |mut c, p| async move {
            c.install_snapshot(p).await
        })
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RpcError> {
        self.call(&rpc, &option, |mut c, p| async move { c.vote(p).await })
            .await
    }
}

fn bad_payload(e: bincode::Error) -> tonic::Status {
    tonic::Status::invalid_argument(format!("undecodable raft payload: {e}"))
}

/// Refuses a Raft message whose claimed sender (the leader or candidate in its vote) is not the
/// node whose certificate the connection presented: a member cannot speak for another.
/// `sender` is `None` on plaintext links, which carry no identity.
fn check_sender(
    sender: Option<NodeId>,
    vote: &openraft::Vote<NodeId>,
) -> Result<(), tonic::Status> {
    match (sender, vote.leader_id().voted_for()) {
        (None, _) => Ok(()),
        (Some(s), Some(claimed)) if s == claimed => Ok(()),
        (Some(s), claimed) => Err(tonic::Status::permission_denied(format!(
            "node {s} sent a Raft message in the name of node {}",
            claimed.map_or_else(|| "none".to_string(), |c| c.to_string())
        ))),
    }
}

/// Server side of the Raft RPCs: decode, check the sender, hand to the local Raft, encode the
/// result (including a Raft-level error, which the caller turns back into a `RemoteError`).
pub async fn serve_append_entries(
    raft: &Raft,
    sender: Option<NodeId>,
    data: &[u8],
) -> Result<RaftPayload, tonic::Status> {
    let req: AppendEntriesRequest<TypeConfig> = decode(data).map_err(bad_payload)?;
    check_sender(sender, &req.vote)?;
    Ok(RaftPayload {
        data: encode(&raft.append_entries(req).await),
    })
}

pub async fn serve_vote(
    raft: &Raft,
    sender: Option<NodeId>,
    data: &[u8],
) -> Result<RaftPayload, tonic::Status> {
    let req: VoteRequest<NodeId> = decode(data).map_err(bad_payload)?;
    check_sender(sender, &req.vote)?;
    Ok(RaftPayload {
        data: encode(&raft.vote(req).await),
    })
}

pub async fn serve_install_snapshot(
    raft: &Raft,
    sender: Option<NodeId>,
    data: &[u8],
) -> Result<RaftPayload, tonic::Status> {
    let req: InstallSnapshotRequest<TypeConfig> = decode(data).map_err(bad_payload)?;
    check_sender(sender, &req.vote)?;
    Ok(RaftPayload {
        data: encode(&raft.install_snapshot(req).await),
    })
}
