//! The method table: one row for every public gRPC method and HTTP route, saying how it
//! authenticates, how it is audited, which ingress limits and whether the clock check apply.
//! One layer applies it ([`GrpcGate`] for gRPC, [`http_gate`] for HTTP) before any handler
//! runs, and a method without a row is refused: a method added to the proto and forgotten here
//! fails closed (a test checks that every method in the proto has a row).
//!
//! Handlers take the caller from the [`Gated`] extension the layer leaves on the request; they
//! never authenticate on their own. What a handler still decides is what depends on the
//! request's content: policy on a particular lease or role, bulk revocation being an
//! administrator's.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use ephemera_core::types::{AuthMethod, Principal};
use ephemera_core::Error;
use ephemera_policy::{Action, AdminAction};

use crate::authz::CallerContext;
use crate::conn::ConnInfo;
use crate::node::Node;

/// How a method authenticates its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    /// No credential: public information (JWKS, metadata, CA keys, the KRL), probes.
    Anonymous,
    /// An authenticated caller (an X.509-SVID, a JWT assertion, the break-glass credential);
    /// policy on the resource the request names decides the rest (the workload action).
    Workload(Action),
    /// As `Workload`, and a one-time join token is accepted too (it redeems an SVID).
    WorkloadOrJoinToken(Action),
    /// The credential travels in the request body (IssueSvid's join token); the handler puts
    /// it through the same authentication.
    InBody(Action),
    /// An administrator the active policy permits this action.
    Admin(AdminAction),
    /// Proof of control of this node: its init secret, or an administrator's certificate
    /// (`cluster init`, before any policy exists). See [`crate::bootstrap`].
    LocalControl,
}

/// How a method is audited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audit {
    /// It changes state: the command's own record in the audit chain (refusals included).
    Write,
    /// It reads state: recorded in the chain when the break-glass credential reads (under the
    /// method's action name), a read barrier otherwise.
    Read,
    /// An operational probe: authenticated or public, never written to the chain, so that
    /// monitoring does not grow the replicated state.
    Probe,
    /// Public data anyone may fetch (keys, metadata, revocation lists).
    Public,
}

/// Which ingress limits apply (see [`crate::guard`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ingress {
    /// Per source address before authentication, per identity after.
    SourceAndIdentity,
    /// Per source address (an anonymous method that costs the node work).
    Source,
    /// None: static public data and probes.
    Unlimited,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Method {
    /// `/ephemera.v1.Issuer/Issue`, or `GET /v1/ssh/krl`.
    pub path: &'static str,
    pub auth: Auth,
    pub audit: Audit,
    pub ingress: Ingress,
    /// Refused while this node's clock is off the leader's (it would mint wrong times).
    pub clock_check: bool,
}

impl Method {
    /// The action's name: the Cedar action, and the name of its read-audit records (one
    /// vocabulary for both).
    pub fn action(&self) -> &'static str {
        match self.auth {
            Auth::Admin(a) => a.name(),
            Auth::Workload(a) | Auth::WorkloadOrJoinToken(a) | Auth::InBody(a) => a.name(),
            Auth::Anonymous => "public",
            Auth::LocalControl => "cluster.init",
        }
    }
}

const fn row(
    path: &'static str,
    auth: Auth,
    audit: Audit,
    ingress: Ingress,
    clock_check: bool,
) -> Method {
    Method {
        path,
        auth,
        audit,
        ingress,
        clock_check,
    }
}

use AdminAction as A;
use Audit::{Probe, Public, Read, Write};
use Auth::{Admin, Anonymous};
use Ingress::{Source, SourceAndIdentity as Limited, Unlimited};

/// Every public method. The order is the proto's, then the HTTP routes.
pub const METHODS: &[Method] = &[
    row(
        "/ephemera.v1.Issuer/Issue",
        Auth::WorkloadOrJoinToken(Action::Issue),
        Write,
        Limited,
        true,
    ),
    row(
        "/ephemera.v1.Issuer/Renew",
        Auth::Workload(Action::Renew),
        Write,
        Limited,
        true,
    ),
    row(
        "/ephemera.v1.Issuer/Revoke",
        Auth::Workload(Action::Revoke),
        Write,
        Limited,
        false,
    ),
    row(
        "/ephemera.v1.Issuer/Introspect",
        Auth::Workload(Action::Introspect),
        Read,
        Limited,
        false,
    ),
    row(
        "/ephemera.v1.Issuer/Exchange",
        Auth::Workload(Action::Exchange),
        Write,
        Limited,
        true,
    ),
    // Any authenticated caller (a verifier): the events carry lease ids and key ids only.
    row(
        "/ephemera.v1.Issuer/WatchRevocations",
        Auth::Workload(Action::Introspect),
        Probe,
        Limited,
        false,
    ),
    row(
        "/ephemera.v1.Issuer/ListLeases",
        Admin(A::LeaseList),
        Read,
        Limited,
        false,
    ),
    row(
        "/ephemera.v1.Issuer/IssueSvid",
        Auth::InBody(Action::Issue),
        Write,
        Limited,
        true,
    ),
    row(
        "/ephemera.v1.Admin/InitCluster",
        Auth::LocalControl,
        Write,
        Source,
        false,
    ),
    row(
        "/ephemera.v1.Admin/GetNodeInfo",
        Anonymous,
        Public,
        Source,
        false,
    ),
    row(
        "/ephemera.v1.Admin/AddNode",
        Admin(A::ClusterManage),
        Write,
        Limited,
        false,
    ),
    row(
        "/ephemera.v1.Admin/RemoveNode",
        Admin(A::ClusterManage),
        Write,
        Limited,
        false,
    ),
    row(
        "/ephemera.v1.Admin/GetClusterStatus",
        Admin(A::ClusterRead),
        Probe,
        Limited,
        false,
    ),
    row(
        "/ephemera.v1.Admin/PutRole",
        Admin(A::RoleWrite),
        Write,
        Limited,
        false,
    ),
    row(
        "/ephemera.v1.Admin/PutDbConnection",
        Admin(A::DbWrite),
        Write,
        Limited,
        false,
    ),
    row(
        "/ephemera.v1.Admin/GetDbConnection",
        Admin(A::DbRead),
        Read,
        Limited,
        false,
    ),
    row(
        "/ephemera.v1.Admin/ListDbConnections",
        Admin(A::DbRead),
        Read,
        Limited,
        false,
    ),
    row(
        "/ephemera.v1.Admin/DeleteDbConnection",
        Admin(A::DbWrite),
        Write,
        Limited,
        false,
    ),
    row(
        "/ephemera.v1.Admin/RotateDbRoot",
        Admin(A::DbWrite),
        Write,
        Limited,
        false,
    ),
    row(
        "/ephemera.v1.Admin/AbandonLease",
        Admin(A::LeaseAbandon),
        Write,
        Limited,
        false,
    ),
    row(
        "/ephemera.v1.Admin/GetRole",
        Admin(A::RoleRead),
        Read,
        Limited,
        false,
    ),
    row(
        "/ephemera.v1.Admin/ListRoles",
        Admin(A::RoleRead),
        Read,
        Limited,
        false,
    ),
    row(
        "/ephemera.v1.Admin/DeleteRole",
        Admin(A::RoleWrite),
        Write,
        Limited,
        false,
    ),
    row(
        "/ephemera.v1.Admin/ListKeys",
        Admin(A::KeyRead),
        Read,
        Limited,
        false,
    ),
    row(
        "/ephemera.v1.Admin/RotateKey",
        Admin(A::KeyRotate),
        Write,
        Limited,
        false,
    ),
    row(
        "/ephemera.v1.Admin/AuditTail",
        Admin(A::AuditRead),
        Read,
        Limited,
        false,
    ),
    row(
        "/ephemera.v1.Admin/ListAuditCheckpoints",
        Admin(A::AuditRead),
        Read,
        Limited,
        false,
    ),
    row(
        "/ephemera.v1.Admin/ProposePolicy",
        Admin(A::PolicyPropose),
        Write,
        Limited,
        false,
    ),
    row(
        "/ephemera.v1.Admin/ApprovePolicy",
        Admin(A::PolicyApprove),
        Write,
        Limited,
        false,
    ),
    row(
        "/ephemera.v1.Admin/RejectPolicy",
        Admin(A::PolicyReject),
        Write,
        Limited,
        false,
    ),
    row(
        "/ephemera.v1.Admin/GetPolicyProposal",
        Admin(A::PolicyRead),
        Read,
        Limited,
        false,
    ),
    row(
        "/ephemera.v1.Admin/ListPolicyProposals",
        Admin(A::PolicyRead),
        Read,
        Limited,
        false,
    ),
    row(
        "/ephemera.v1.Admin/GetPolicy",
        Admin(A::PolicyRead),
        Read,
        Limited,
        false,
    ),
    row(
        "/ephemera.v1.Admin/ListPolicyHistory",
        Admin(A::PolicyRead),
        Read,
        Limited,
        false,
    ),
    row(
        "/ephemera.v1.Admin/ListQuarantines",
        Admin(A::QuarantineRead),
        Read,
        Limited,
        false,
    ),
    row(
        "/ephemera.v1.Admin/ReleaseQuarantine",
        Admin(A::QuarantineRelease),
        Write,
        Limited,
        false,
    ),
    row(
        "/ephemera.v1.Admin/GetStateDigest",
        Admin(A::ClusterRead),
        Probe,
        Limited,
        false,
    ),
    row(
        "/ephemera.v1.Admin/CreateJoinToken",
        Admin(A::JoinTokenCreate),
        Write,
        Limited,
        false,
    ),
    row(
        "/ephemera.v1.Admin/RotateBreakGlass",
        Admin(A::ClusterManage),
        Write,
        Limited,
        false,
    ),
    row(
        "/ephemera.v1.Admin/DisableBreakGlass",
        Admin(A::ClusterManage),
        Write,
        Limited,
        false,
    ),
    row(
        "GET /.well-known/jwks.json",
        Anonymous,
        Public,
        Unlimited,
        false,
    ),
    row(
        "GET /.well-known/oauth-authorization-server",
        Anonymous,
        Public,
        Unlimited,
        false,
    ),
    row(
        "POST /oauth2/introspect",
        Auth::Workload(Action::Introspect),
        Read,
        Limited,
        false,
    ),
    row(
        "POST /oauth2/token",
        Auth::Workload(Action::Exchange),
        Write,
        Limited,
        true,
    ),
    row("GET /v1/ssh/ca.pub", Anonymous, Public, Unlimited, false),
    // Takes a read barrier: limited per source.
    row("GET /v1/ssh/krl", Anonymous, Public, Source, false),
    row("GET /metrics", Anonymous, Probe, Unlimited, false),
    row("GET /healthz", Anonymous, Probe, Unlimited, false),
    row("GET /readyz", Anonymous, Probe, Unlimited, false),
];

pub fn lookup(path: &str) -> Option<&'static Method> {
    METHODS.iter().find(|m| m.path == path)
}

/// What the gate leaves on a request for its handler: the method's row and the caller (`None`
/// for anonymous methods and for `InBody` ones, which authenticate in the handler).
#[derive(Debug, Clone)]
pub struct Gated {
    pub method: &'static Method,
    pub principal: Option<Principal>,
}

/// Applies `method`'s row to a request: authentication (with its ingress limits), the admin
/// decision, the clock check. The principal, if the row authenticates here.
pub async fn admit(
    node: &Node,
    method: &'static Method,
    bearer: Option<&str>,
    conn: Option<&ConnInfo>,
) -> Result<Option<Principal>, Error> {
    let principal = match method.auth {
        Auth::Anonymous | Auth::InBody(_) => {
            if method.ingress == Ingress::Source {
                node.guard
                    .ingress_source(conn.and_then(|c| c.remote).map(|a| a.ip()))?;
            }
            None
        }
        Auth::LocalControl => {
            node.guard
                .ingress_source(conn.and_then(|c| c.remote).map(|a| a.ip()))?;
            node.authenticate_init(bearer, conn)?;
            None
        }
        Auth::Workload(_) | Auth::WorkloadOrJoinToken(_) | Auth::Admin(_) => {
            let p = node.authenticate(bearer, conn).await?;
            if p.auth_method == AuthMethod::JoinToken
                && !matches!(method.auth, Auth::WorkloadOrJoinToken(_))
            {
                return Err(Error::Unauthenticated(
                    "a join token is redeemed only for an X.509-SVID (`ephemera svid fetch`)"
                        .into(),
                ));
            }
            if let Auth::Admin(action) = method.auth {
                let caller = CallerContext::from_addr(conn.and_then(|c| c.remote));
                node.authorize_admin(&p, action, &caller).await?;
            }
            Some(p)
        }
    };
    if method.clock_check {
        node.check_clock()?;
    }
    Ok(principal)
}

fn bearer_of(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

/// The response header naming the leader's API address, on every admitted gRPC call.
pub const LEADER_HEADER: &str = "ephemera-leader";

/// The tower layer that applies the table to the gRPC API.
#[derive(Clone)]
pub struct GrpcGateLayer {
    pub node: Arc<Node>,
}

impl<S> tower::Layer<S> for GrpcGateLayer {
    type Service = GrpcGate<S>;
    fn layer(&self, inner: S) -> GrpcGate<S> {
        GrpcGate {
            node: self.node.clone(),
            inner,
        }
    }
}

#[derive(Clone)]
pub struct GrpcGate<S> {
    node: Arc<Node>,
    inner: S,
}

type GrpcRequest = axum::http::Request<tonic::body::BoxBody>;
type GrpcResponse = axum::http::Response<tonic::body::BoxBody>;

impl<S> tower::Service<GrpcRequest> for GrpcGate<S>
where
    S: tower::Service<GrpcRequest, Response = GrpcResponse> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = GrpcResponse;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<GrpcResponse, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: GrpcRequest) -> Self::Future {
        // The clone is ready to be called; `self.inner` takes its place (tower's idiom).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let node = self.node.clone();
        Box::pin(async move {
            let Some(method) = lookup(req.uri().path()) else {
                let e = Error::UnknownMethod(req.uri().path().to_string());
                return Ok(crate::grpc::to_status(e).into_http());
            };
            let admitted = admit(
                &node,
                method,
                bearer_of(req.headers()),
                req.extensions().get::<ConnInfo>(),
            )
            .await;
            match admitted {
                Ok(principal) => {
                    req.extensions_mut().insert(Gated { method, principal });
                    let mut response = inner.call(req).await?;
                    // Clients send their writes to the leader this names, saving the hop a
                    // follower would forward them over (`ephemera_client::LEADER_HEADER`).
                    if let Some(leader) = node
                        .leader_api_addr()
                        .and_then(|a| axum::http::HeaderValue::from_str(&a).ok())
                    {
                        response.headers_mut().insert(LEADER_HEADER, leader);
                    }
                    Ok(response)
                }
                Err(e) => {
                    node.metrics.error(e.kind());
                    Ok(crate::grpc::to_status(e).into_http())
                }
            }
        })
    }
}

/// The axum middleware that applies the table to the HTTP routes.
pub async fn http_gate(
    axum::extract::State(node): axum::extract::State<Arc<Node>>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let path = format!("{} {}", req.method(), req.uri().path());
    let Some(method) = lookup(&path) else {
        return crate::http::error_response(Error::UnknownMethod(path));
    };
    let conn = req.extensions().get::<ConnInfo>().cloned();
    match admit(&node, method, bearer_of(req.headers()), conn.as_ref()).await {
        Ok(principal) => {
            req.extensions_mut().insert(Gated { method, principal });
            next.run(req).await
        }
        Err(e) => crate::http::error_response(e),
    }
}

/// A handler's view of its gated request.
pub fn gated<T>(req: &tonic::Request<T>) -> Result<&Gated, Error> {
    req.extensions()
        .get::<Gated>()
        .ok_or_else(|| Error::Internal("the method table's gate did not run".into()))
}

/// The caller of a gated request that authenticates at the gate.
pub fn principal<T>(req: &tonic::Request<T>) -> Result<Principal, Error> {
    gated(req)?
        .principal
        .clone()
        .ok_or_else(|| Error::Internal("this method authenticates in its handler".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every method of the public proto has exactly one row; every row is a method of the proto
    /// or a route of the HTTP router.
    #[test]
    fn every_proto_method_has_one_row() {
        for m in ephemera_proto::PUBLIC_METHODS {
            let rows = METHODS.iter().filter(|r| r.path == *m).count();
            assert_eq!(rows, 1, "{m} has {rows} rows in the method table");
        }
        for r in METHODS {
            let http = r.path.starts_with("GET ") || r.path.starts_with("POST ");
            assert!(
                http || ephemera_proto::PUBLIC_METHODS.contains(&r.path),
                "{} is in the table but not in the proto",
                r.path
            );
        }
        for r in crate::http::ROUTES {
            assert!(lookup(r).is_some(), "HTTP route {r} has no row");
        }
    }

    /// The rows say what a security review expects: every write and read authenticates except
    /// the listed public ones; credential-minting methods check the clock.
    #[test]
    fn rows_are_closed_by_default() {
        let anonymous: Vec<&str> = METHODS
            .iter()
            .filter(|m| m.auth == Auth::Anonymous)
            .map(|m| m.path)
            .collect();
        assert_eq!(
            anonymous,
            [
                "/ephemera.v1.Admin/GetNodeInfo",
                "GET /.well-known/jwks.json",
                "GET /.well-known/oauth-authorization-server",
                "GET /v1/ssh/ca.pub",
                "GET /v1/ssh/krl",
                "GET /metrics",
                "GET /healthz",
                "GET /readyz",
            ]
        );
        for m in METHODS {
            let mints = m.path.ends_with("/Issue")
                || m.path.ends_with("/Renew")
                || m.path.ends_with("/IssueSvid")
                || m.path.ends_with("/Exchange")
                || m.path == "POST /oauth2/token";
            assert_eq!(m.clock_check, mints, "{}", m.path);
        }
        assert!(lookup("/ephemera.v1.Issuer/NotAMethod").is_none());
    }
}
