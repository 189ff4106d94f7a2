//! Rust client for Ephemera. It holds a list of endpoints and fails over to the next one when a
//! node is unreachable, so one dead node is not an error. Every call has a deadline.
//!
//! Writes (issue, renew, revoke, exchange) go to the leader when the client knows it: every
//! node names the leader's API address in the `ephemera-leader` response header, and a write
//! sent to a follower costs a forwarding hop (one more mTLS round trip and the follower's wait
//! to apply it). Reads stay on the endpoint that answered last, so they spread over the nodes.
//! A leader the client cannot reach is forgotten, and the next answer names the new one.

use std::sync::Mutex;
use std::time::Duration;

use ephemera_proto::v1::admin_client::AdminClient;
use ephemera_proto::v1::issuer_client::IssuerClient;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

mod guard;

pub use ephemera_proto::v1 as pb;
pub use guard::LeaseGuard;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no endpoints configured (set EPHEMERA_ADDR)")]
    NoEndpoints,
    #[error("invalid endpoint {0:?}: {1}")]
    BadEndpoint(String, String),
    #[error("no endpoint reachable; tried {tried}: {last}")]
    AllUnreachable { tried: String, last: String },
    #[error("{}", status_text(.0))]
    Status(Box<Status>),
}

/// The server's messages already say what went wrong; prefix the status class only when they
/// do not start with it.
fn status_text(s: &Status) -> String {
    let name = code_name(s.code());
    if s.message().starts_with(name) {
        s.message().to_string()
    } else {
        format!("{name}: {}", s.message())
    }
}

fn code_name(c: Code) -> &'static str {
    match c {
        Code::InvalidArgument => "invalid argument",
        Code::NotFound => "not found",
        Code::AlreadyExists => "already exists",
        Code::FailedPrecondition => "failed precondition",
        Code::Unauthenticated => "unauthenticated",
        Code::PermissionDenied => "permission denied",
        Code::Unavailable => "unavailable",
        Code::ResourceExhausted => "resource exhausted",
        Code::OutOfRange => "out of range",
        Code::DeadlineExceeded => "deadline exceeded",
        _ => "error",
    }
}

impl ClientError {
    pub fn code(&self) -> Option<Code> {
        match self {
            ClientError::Status(s) => Some(s.code()),
            _ => None,
        }
    }

    /// The server's `retry-after` hint on a RESOURCE_EXHAUSTED refusal (a rate limit, a
    /// deferred renewal).
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        let ClientError::Status(s) = self else {
            return None;
        };
        if s.code() != Code::ResourceExhausted {
            return None;
        }
        let secs: u64 = s
            .metadata()
            .get("retry-after")?
            .to_str()
            .ok()?
            .parse()
            .ok()?;
        Some(std::time::Duration::from_secs(secs))
    }
}

fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// How long until a credential should be renewed: until its `renew_after` (never negative).
pub fn renew_due_in(cred: &pb::Credential, now_ms: u64) -> std::time::Duration {
    std::time::Duration::from_millis(cred.renew_after_ms.saturating_sub(now_ms))
}

/// When a failed call may be sent to the next endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retry {
    /// The call is idempotent: fail over on any sign the endpoint is unavailable.
    Idempotent,
    /// Fail over only when the request certainly did not execute.
    ConnectOnly,
}

pub struct Client {
    endpoints: Vec<(String, Channel)>,
    tls: Option<TlsFiles>,
    token: Option<String>,
    /// Index of the endpoint that answered a read last; reads start there.
    preferred: Mutex<usize>,
    /// Index of the endpoint the nodes last named as the leader; writes start there.
    leader: Mutex<Option<usize>>,
    route_writes: bool,
    timeout: Duration,
}

/// The response header in which every node names the leader's API address (`host:port`).
pub const LEADER_HEADER: &str = "ephemera-leader";

/// `host:port` of an endpoint given as `host:port` or a URL, to match the leader header.
fn authority(addr: &str) -> &str {
    let rest = addr.split_once("://").map_or(addr, |(_, r)| r);
    rest.split('/').next().unwrap_or(rest)
}

/// Accepts `host:port` or a URL.
fn endpoint_url(addr: &str, tls: bool) -> String {
    if addr.contains("://") {
        addr.to_string()
    } else if tls {
        format!("https://{addr}")
    } else {
        format!("http://{addr}")
    }
}

/// TLS settings: the CA that signed the nodes' certificates, and optionally this client's own
/// X.509-SVID (certificate and key, PEM) for mTLS authentication.
#[derive(Clone)]
pub struct TlsFiles {
    pub ca_pem: String,
    pub identity: Option<(String, String)>,
}

impl std::fmt::Debug for TlsFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsFiles")
            .field("client_identity", &self.identity.is_some())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// `endpoints` in the `EPHEMERA_ADDR` format: comma-separated `host:port` or URLs.
    pub fn new(endpoints: &str, token: Option<String>) -> Result<Self, ClientError> {
        Self::with_tls(endpoints, token, None)
    }

    /// Like [`Client::new`], over TLS when `tls` is given (the server is verified against the
    /// CA; the client presents its certificate if it has one).
    pub fn with_tls(
        endpoints: &str,
        token: Option<String>,
        tls: Option<&TlsFiles>,
    ) -> Result<Self, ClientError> {
        let mut list = Vec::new();
        for addr in endpoints
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            let bad = |e: tonic::transport::Error| {
                ClientError::BadEndpoint(addr.to_string(), e.to_string())
            };
            let mut endpoint = Endpoint::from_shared(endpoint_url(addr, tls.is_some()))
                .map_err(bad)?
                .connect_timeout(Duration::from_millis(1000))
                .tcp_nodelay(true);
            if let Some(t) = tls {
                let mut cfg = tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(&t.ca_pem));
                if let Some((cert, key)) = &t.identity {
                    cfg = cfg.identity(tonic::transport::Identity::from_pem(cert, key));
                }
                endpoint = endpoint.tls_config(cfg).map_err(bad)?;
            }
            let ch = endpoint.connect_lazy();
            list.push((addr.to_string(), ch));
        }
        let mut client = Self::with_channels(list, token)?;
        client.tls = tls.cloned();
        Ok(client)
    }

    /// A client over channels the caller connected (`(address, channel)`, the address as the
    /// nodes name it in the leader header): for a custom transport such as the simulation's.
    pub fn with_channels(
        list: Vec<(String, Channel)>,
        token: Option<String>,
    ) -> Result<Self, ClientError> {
        if list.is_empty() {
            return Err(ClientError::NoEndpoints);
        }
        Ok(Client {
            endpoints: list,
            tls: None,
            token,
            preferred: Mutex::new(0),
            leader: Mutex::new(None),
            route_writes: true,
            timeout: Duration::from_secs(30),
        })
    }

    /// Whether writes go to the leader the nodes name (the default), or start where reads do.
    pub fn with_leader_routing(mut self, on: bool) -> Self {
        self.route_writes = on;
        self
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    fn request<T>(&self, msg: T) -> Request<T> {
        let mut req = self.authorized(msg);
        req.set_timeout(self.timeout);
        req
    }

    /// A request carrying the bearer token, if any, and no deadline (see [`Self::open_stream`]).
    fn authorized<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        if let Some(t) = &self.token {
            if let Ok(v) = MetadataValue::try_from(format!("Bearer {t}")) {
                req.metadata_mut().insert("authorization", v);
            }
        }
        req
    }

    /// Whether the next endpoint may be tried after this failure.
    fn may_fail_over(s: &Status, retry: Retry) -> bool {
        // Certainly not executed: the connection could not be made, or the server said so
        // (our servers answer UNAVAILABLE only for requests they did not execute).
        let not_executed = s.code() == Code::Unavailable
            && (s.message().contains("connect") || s.message().starts_with("unavailable:"));
        match retry {
            Retry::ConnectOnly => not_executed,
            // Transport failures mid-call (reset, broken stream) may follow execution, which
            // is harmless for idempotent calls.
            Retry::Idempotent => {
                not_executed
                    || s.code() == Code::Unavailable
                    || (s.code() == Code::Unknown && s.message().contains("transport"))
            }
        }
    }

    /// Calls `f` against each endpoint in turn, starting with the last one that answered.
    /// Only for idempotent calls; see [`Client::call_with`].
    pub async fn call<T, F, Fut>(&self, f: F) -> Result<T, ClientError>
    where
        F: Fn(Channel) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        self.call_with(Retry::Idempotent, f).await
    }

    /// Calls `f` against each endpoint in turn while `retry` allows it.
    pub async fn call_with<T, F, Fut>(&self, retry: Retry, f: F) -> Result<T, ClientError>
    where
        F: Fn(Channel) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let start = *self.preferred.lock().expect("client lock");
        let (idx, result) = self.each_endpoint(retry, start, f).await;
        if result.is_ok() {
            *self.preferred.lock().expect("client lock") = idx;
        }
        result
    }

    /// A write: like [`Client::call_with`], but starting at the leader when the nodes have
    /// named it, and learning the leader from the reply (or the refusal).
    pub async fn write_with<T, F, Fut>(&self, retry: Retry, f: F) -> Result<T, ClientError>
    where
        F: Fn(Channel) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let known = *self.leader.lock().expect("client lock");
        let start = known.unwrap_or_else(|| *self.preferred.lock().expect("client lock"));
        let (_, result) = self
            .each_endpoint(retry, start, |ch| {
                let call = f(ch);
                async move {
                    match call.await {
                        Ok(resp) => {
                            self.learn_leader(resp.metadata());
                            Ok(resp.into_inner())
                        }
                        Err(s) => {
                            self.learn_leader(s.metadata());
                            Err(s)
                        }
                    }
                }
            })
            .await;
        result
    }

    /// Records the leader a node named, if it is one of this client's endpoints (a node
    /// behind another name, a load balancer say, is simply not used for routing).
    fn learn_leader(&self, headers: &tonic::metadata::MetadataMap) {
        if !self.route_writes {
            return;
        }
        let Some(named) = headers.get(LEADER_HEADER).and_then(|v| v.to_str().ok()) else {
            return;
        };
        if let Some(idx) = self
            .endpoints
            .iter()
            .position(|(addr, _)| authority(addr) == named)
        {
            *self.leader.lock().expect("client lock") = Some(idx);
        }
    }

    /// The endpoint `leader` was named and could not be reached: forget it, so that writes
    /// do not keep starting at a dead node; the next reply names the new leader.
    fn forget_leader(&self, idx: usize) {
        let mut leader = self.leader.lock().expect("client lock");
        if *leader == Some(idx) {
            *leader = None;
        }
    }

    /// Tries the endpoints in turn from `start`; returns the index of the last one tried.
    async fn each_endpoint<T, F, Fut>(
        &self,
        retry: Retry,
        start: usize,
        f: F,
    ) -> (usize, Result<T, ClientError>)
    where
        F: Fn(Channel) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let n = self.endpoints.len();
        let mut last = String::new();
        for i in 0..n {
            let idx = (start + i) % n;
            let (addr, ch) = &self.endpoints[idx];
            match f(ch.clone()).await {
                Ok(v) => return (idx, Ok(v)),
                Err(s) if Self::may_fail_over(&s, retry) => {
                    self.forget_leader(idx);
                    last = format!("{addr}: {}", s.message())
                }
                Err(s) => return (idx, Err(ClientError::Status(Box::new(s)))),
            }
        }
        let tried = self
            .endpoints
            .iter()
            .map(|(a, _)| a.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        (start, Err(ClientError::AllUnreachable { tried, last }))
    }

    pub fn issuer(ch: Channel) -> IssuerClient<Channel> {
        IssuerClient::new(ch)
    }

    pub fn admin(ch: Channel) -> AdminClient<Channel> {
        AdminClient::new(ch)
    }

    /// Issue with a request id, so a retry after a lost reply returns the same lease.
    pub async fn issue(&self, mut req: pb::IssueRequest) -> Result<pb::Credential, ClientError> {
        if req.request_id.is_none() {
            req.request_id = Some(new_request_id());
        }
        self.write_with(Retry::Idempotent, |ch| {
            let r = self.request(req.clone());
            async move { Self::issuer(ch).issue(r).await }
        })
        .await
    }

    /// Not idempotent (a repeat extends again): fails over only when the request certainly
    /// did not execute.
    pub async fn renew(&self, req: pb::RenewRequest) -> Result<pb::Credential, ClientError> {
        self.write_with(Retry::ConnectOnly, |ch| {
            let r = self.request(req.clone());
            async move { Self::issuer(ch).renew(r).await }
        })
        .await
    }

    /// Renews a credential when the server says it is due (its `renew_after`, which the
    /// cluster spreads over 50-70% of the TTL so that a fleet does not renew in lockstep), and
    /// waits out a deferral (during a renewal storm, or a rate limit) as the server asks, at
    /// most `max_deferrals` times.
    pub async fn renew_when_due(
        &self,
        cred: &pb::Credential,
        max_deferrals: u32,
    ) -> Result<pb::Credential, ClientError> {
        tokio::time::sleep(renew_due_in(cred, unix_now_ms())).await;
        let mut deferrals = 0;
        loop {
            let req = pb::RenewRequest {
                lease_id: cred.lease_id.clone(),
                ..Default::default()
            };
            match self.renew(req).await {
                Err(e) if deferrals < max_deferrals => match e.retry_after() {
                    Some(wait) => {
                        deferrals += 1;
                        tokio::time::sleep(wait).await;
                    }
                    None => return Err(e),
                },
                result => return result,
            }
        }
    }

    pub async fn revoke(&self, req: pb::RevokeRequest) -> Result<pb::RevokeResponse, ClientError> {
        self.write_with(Retry::Idempotent, |ch| {
            let r = self.request(req.clone());
            async move { Self::issuer(ch).revoke(r).await }
        })
        .await
    }

    /// Not idempotent (a join token is consumed), so it fails over only when the request
    /// certainly did not execute.
    pub async fn issue_svid(&self, req: pb::IssueSvidRequest) -> Result<pb::Svid, ClientError> {
        self.write_with(Retry::ConnectOnly, |ch| {
            let r = self.request(req.clone());
            async move { Self::issuer(ch).issue_svid(r).await }
        })
        .await
    }

    pub async fn introspect(&self, token: &str) -> Result<pb::IntrospectResponse, ClientError> {
        let req = pb::IntrospectRequest {
            token: token.to_string(),
        };
        self.call(|ch| {
            let r = self.request(req.clone());
            async move { Ok(Self::issuer(ch).introspect(r).await?.into_inner()) }
        })
        .await
    }

    pub async fn list_leases(
        &self,
        req: pb::ListLeasesRequest,
    ) -> Result<pb::ListLeasesResponse, ClientError> {
        self.call(|ch| {
            let r = self.request(req.clone());
            async move { Ok(Self::issuer(ch).list_leases(r).await?.into_inner()) }
        })
        .await
    }

    /// RFC 8693 token exchange over gRPC. Not retried on another node unless the request
    /// certainly did not reach one (each exchange is a new lease).
    pub async fn exchange(
        &self,
        req: pb::ExchangeRequest,
    ) -> Result<pb::ExchangeResponse, ClientError> {
        self.write_with(Retry::ConnectOnly, |ch| {
            let r = self.request(req.clone());
            async move { Self::issuer(ch).exchange(r).await }
        })
        .await
    }

    /// The revocations after `from_seq`, then each new one as the node applies it (see
    /// `WatchRevocations`). The stream ends with `RESOURCE_EXHAUSTED` naming the sequence to
    /// resume from when the reader falls too far behind; resume on any node.
    pub async fn watch_revocations(
        &self,
        from_seq: u64,
    ) -> Result<tonic::Streaming<pb::RevocationEvent>, ClientError> {
        let req = pb::WatchRevocationsRequest { from_seq };
        self.open_stream(
            |ch, r| async move { Self::issuer(ch).watch_revocations(r).await },
            req,
        )
        .await
    }

    /// Opens a server stream on the first node that takes it. Opening it (the connection,
    /// authorisation and the response headers) is bounded by the call timeout, as every call
    /// is; the stream itself then lives as long as its reader wants it, which a per-call
    /// deadline would cut short.
    pub async fn open_stream<M, T, F, Fut>(
        &self,
        open: F,
        msg: M,
    ) -> Result<tonic::Streaming<T>, ClientError>
    where
        M: Clone,
        F: Fn(Channel, Request<M>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<tonic::Streaming<T>>, Status>>,
    {
        let deadline = self.timeout;
        self.call_with(Retry::ConnectOnly, |ch| {
            let opening = open(ch, self.authorized(msg.clone()));
            async move {
                match tokio::time::timeout(deadline, opening).await {
                    Ok(opened) => Ok(opened?.into_inner()),
                    Err(_) => Err(Status::deadline_exceeded(format!(
                        "the stream did not open within {deadline:?}"
                    ))),
                }
            }
        })
        .await
    }

    /// Every lease `filter` selects, page by page (its `page_token` is ignored), with at most
    /// `max` leases read (a bound on memory; the caller says how many it can hold).
    pub async fn list_all_leases(
        &self,
        filter: pb::ListLeasesRequest,
        max: usize,
    ) -> Result<Vec<pb::Lease>, ClientError> {
        let mut out = Vec::new();
        let mut req = pb::ListLeasesRequest {
            page_size: if filter.page_size == 0 {
                1000
            } else {
                filter.page_size
            },
            page_token: String::new(),
            ..filter
        };
        loop {
            let page = self.list_leases(req.clone()).await?;
            out.extend(page.leases);
            if page.next_page_token.is_empty() || out.len() >= max {
                out.truncate(max);
                return Ok(out);
            }
            req.page_token = page.next_page_token;
        }
    }

    /// Runs an admin call with failover; `f` receives a ready client and an authenticated request.
    /// Admin calls include non-idempotent ones (key rotation, membership), so they fail over
    /// only when the request certainly did not execute.
    pub async fn admin_call<M, T, F, Fut>(&self, msg: M, f: F) -> Result<T, ClientError>
    where
        M: Clone,
        F: Fn(AdminClient<Channel>, Request<M>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.call_with(Retry::ConnectOnly, |ch| {
            let r = self.request(msg.clone());
            let fut = f(Self::admin(ch), r);
            async move { Ok(fut.await?.into_inner()) }
        })
        .await
    }

    /// Adds a running, uninitialised node to the cluster: asks the node (unauthenticated) who it
    /// is, then asks the cluster to add it as a learner, let it catch up and promote it.
    pub async fn add_node(&self, node_api_addr: &str) -> Result<pb::ClusterStatus, ClientError> {
        let info = Client::with_tls(node_api_addr, None, self.tls.as_ref())?
            .admin_call(pb::NodeInfoRequest {}, |mut a, r| async move {
                a.get_node_info(r).await
            })
            .await?;
        // The cluster answers once the node has caught up: copying a large state takes
        // minutes, not the default 30 s (the node allows up to 300 s).
        let timeout = self.timeout.max(Duration::from_secs(330));
        self.admin_call(
            pb::AddNodeRequest { node: Some(info) },
            move |mut a, mut r| async move {
                r.set_timeout(timeout);
                a.add_node(r).await
            },
        )
        .await
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.endpoints.iter().map(|(a, _)| a.clone()).collect()
    }
}

/// A request id unique on this host: wall-clock nanoseconds, process id and a per-process counter.
pub fn new_request_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "c{:x}.{:x}.{:x}",
        nanos,
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    // A runtime, as the client's channels connect lazily from it.
    #[tokio::test]
    async fn the_leader_header_names_an_endpoint_however_it_was_written() {
        assert_eq!(authority("127.0.0.1:7401"), "127.0.0.1:7401");
        assert_eq!(authority("https://127.0.0.1:7401"), "127.0.0.1:7401");
        assert_eq!(
            authority("https://node-0.ephemera:7400/"),
            "node-0.ephemera:7400"
        );
        let c = Client::new("https://127.0.0.1:7401,127.0.0.1:7402", None).unwrap();
        let named = |addr: &str| {
            let mut md = tonic::metadata::MetadataMap::new();
            md.insert(LEADER_HEADER, addr.parse().unwrap());
            md
        };
        c.learn_leader(&named("127.0.0.1:7402"));
        assert_eq!(*c.leader.lock().unwrap(), Some(1));
        // A name that is none of the endpoints changes nothing.
        c.learn_leader(&named("10.0.0.9:7400"));
        assert_eq!(*c.leader.lock().unwrap(), Some(1));
        c.forget_leader(0);
        assert_eq!(*c.leader.lock().unwrap(), Some(1));
        c.forget_leader(1);
        assert_eq!(*c.leader.lock().unwrap(), None);
        c.learn_leader(&named("127.0.0.1:7401"));
        assert_eq!(*c.leader.lock().unwrap(), Some(0));
    }
}
