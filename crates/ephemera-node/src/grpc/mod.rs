//! gRPC services: the public `Issuer` ([`issuer`]) and `Admin` ([`admin`]), the internal
//! `Cluster` service ([`cluster`]), and the mapping between domain types and the proto
//! ([`mapping`]). Authentication, ingress limits and the clock check happened at the method
//! table's gate ([`crate::methods`]) before any handler here runs.

mod admin;
mod cluster;
mod db;
mod issuer;
mod mapping;

pub(crate) use admin::{initialise, new_break_glass_credential};
pub use cluster::ClusterService;
pub use mapping::lease_to_pb;
use mapping::*;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ephemera_core::command::{
    validate_intent, Intent, Outcome, Proposal, RenewIntent, RevokeTarget,
};
use ephemera_core::crypto::hash_secret;
use ephemera_core::kind::{jwt, postgres, ssh, Grant, RoleSpec};
use ephemera_core::policy::{PolicyGovernance, PolicyProposal, PolicyVersion, ProposalState};
use ephemera_core::state::effects::LeaseStatus;
use ephemera_core::state::{self, LeaseFilter};
use ephemera_core::types::{
    AuthMethod, CredentialKind, Lease, LeaseState, Principal, Role, SVID_ROLE,
};
use ephemera_core::{Error, ErrorCode};
use ephemera_proto::internal as ipb;
use ephemera_proto::v1 as pb;
use ephemera_raft::network::{serve_append_entries, serve_install_snapshot, serve_vote};
use ephemera_raft::{decode, encode, NodeInfo};
use tonic::{Request, Response, Status};

use crate::authz::CallerContext;
use crate::conn::ConnInfo;
use crate::issue::{IssueInput, Issued, KindInput, Presented};
use crate::methods;
use crate::metrics::Metrics;
use crate::mint::Minted;
use crate::node::{Forwarded, Node, KEY_PUBLISH_GRACE_MS};
use ephemera_policy::{Action, AdminAction, PolicyBook};

/// The one place domain errors become gRPC statuses. Internal details are logged, not returned.
pub fn to_status(e: Error) -> Status {
    let code = match e.code() {
        ErrorCode::InvalidArgument => tonic::Code::InvalidArgument,
        ErrorCode::NotFound => tonic::Code::NotFound,
        ErrorCode::AlreadyExists => tonic::Code::AlreadyExists,
        ErrorCode::FailedPrecondition => tonic::Code::FailedPrecondition,
        ErrorCode::Unauthenticated => tonic::Code::Unauthenticated,
        ErrorCode::PermissionDenied => tonic::Code::PermissionDenied,
        ErrorCode::Unavailable => tonic::Code::Unavailable,
        // gRPC's code for "the operation may have completed".
        ErrorCode::OutcomeUnknown => tonic::Code::DeadlineExceeded,
        ErrorCode::ResourceExhausted => tonic::Code::ResourceExhausted,
        ErrorCode::Internal => tonic::Code::Internal,
        ErrorCode::Unimplemented => tonic::Code::Unimplemented,
    };
    if code == tonic::Code::Internal {
        tracing::error!(error = %e, "internal error");
        return Status::internal("internal error; see the node's log");
    }
    let mut status = Status::new(code, e.to_string());
    if let Some(ms) = e.retry_after_ms() {
        // Whole seconds, rounded up, as HTTP's Retry-After; clients may also read the message.
        if let Ok(v) = ms.div_ceil(1000).max(1).to_string().parse() {
            status.metadata_mut().insert("retry-after", v);
        }
    }
    status
}

pub(super) fn bearer<T>(req: &Request<T>) -> Option<&str> {
    req.metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

#[derive(Clone)]
pub struct Api {
    pub node: Arc<Node>,
    /// Running without TLS: member addresses must be loopback, URLs are http.
    pub plaintext: bool,
}

impl Api {
    /// The caller the method table's gate authenticated (see [`crate::methods`]).
    fn caller_of<T>(&self, req: &Request<T>) -> Result<Principal, Status> {
        methods::principal(req).map_err(|e| self.fail(e))
    }

    /// A read, audited under the method's action name (see [`Node::read_access`]).
    async fn read_audit<T>(
        &self,
        req: &Request<T>,
        actor: &Principal,
        target: &str,
    ) -> Result<(), Status> {
        let action = methods::gated(req)
            .map_err(|e| self.fail(e))?
            .method
            .action();
        self.node
            .read_access(actor, action, target)
            .await
            .map_err(|e| self.fail(e))
    }

    /// How the caller of an Issue authenticated, beyond its principal.
    /// The presented SVID's serial is parsed only for an SVID request (its rotation), not on
    /// every issuance.
    fn presented<T>(&self, req: &Request<T>, actor: &Principal, svid: bool) -> Presented {
        Presented {
            join_token: bearer(req)
                .filter(|_| actor.auth_method == AuthMethod::JoinToken)
                .map(str::to_string),
            svid_lease: svid
                .then(|| {
                    self.node
                        .presented_svid_lease(req.extensions().get::<ConnInfo>())
                })
                .flatten(),
        }
    }

    /// A lease by id from this node's state; if it is not here yet, after a read barrier.
    async fn lease(&self, id: &str) -> Result<Option<Lease>, Error> {
        let read =
            || state::get_lease(&self.node.view, id).map_err(|e| Error::Internal(e.to_string()));
        if let Some(lease) = read()? {
            return Ok(Some(lease));
        }
        self.node.read_barrier().await?;
        read()
    }

    fn fail(&self, e: Error) -> Status {
        self.node.metrics.error(e.kind());
        to_status(e)
    }

    fn credential(&self, issued: Issued) -> pb::Credential {
        let Issued {
            lease,
            replayed,
            credential,
        } = issued;
        let (token, body) = match credential {
            Minted::Jwt(token) => (token, None),
            Minted::X509Svid {
                cert_pem,
                bundle_pem,
            } => (
                String::new(),
                Some(pb::credential::Body::X509Svid(pb::SvidBody {
                    spiffe_id: lease.subject.clone(),
                    cert_pem,
                    bundle_pem,
                })),
            ),
            Minted::Postgres { username, password } => {
                let Grant::Postgres(g) = &lease.grant else {
                    unreachable!("a login is minted from a PostgreSQL grant")
                };
                // Where to log in, as the connection is now (it cannot be deleted while the
                // login exists).
                let conn = state::db_connection(&self.node.view, &g.connection)
                    .ok()
                    .flatten();
                (
                    String::new(),
                    Some(pb::credential::Body::Postgres(pb::PostgresLogin {
                        username,
                        password: password.expose().to_string(),
                        connection: g.connection.clone(),
                        host: conn.as_ref().map(|c| c.host.clone()).unwrap_or_default(),
                        port: conn.as_ref().map_or(0, |c| u32::from(c.port)),
                        database: conn.map(|c| c.database).unwrap_or_default(),
                    })),
                )
            }
            Minted::Ssh(certificate) => {
                let Grant::Ssh(g) = &lease.grant else {
                    unreachable!("an SSH certificate is minted from an SSH grant")
                };
                (
                    String::new(),
                    Some(pb::credential::Body::Ssh(pb::SshCertificate {
                        certificate,
                        serial: g.serial,
                        key_id: g.key_id.clone(),
                        principals: g.principals.clone(),
                        valid_after: g.valid_after,
                        valid_before: g.valid_before,
                        cert_type: match g.cert_type {
                            ssh::CertType::User => "user".into(),
                            ssh::CertType::Host => "host".into(),
                        },
                    })),
                )
            }
        };
        pb::Credential {
            lease_id: lease.id.clone(),
            token,
            expires_at_ms: lease.expires_at_ms,
            renew_after_ms: lease.renew_after_ms,
            issued_at_ms: lease.issued_at_ms,
            max_expires_at_ms: lease.max_expires_at_ms,
            kid: lease.kid.clone(),
            scopes: lease.scopes().to_vec(),
            audience: lease.audience().to_string(),
            subject: lease.subject.clone(),
            role: lease.role.clone(),
            replayed,
            kind: lease.kind().as_str().to_string(),
            body,
        }
    }

    fn proposal_reply(&self, outcome: Outcome) -> Result<Response<pb::PolicyProposal>, Status> {
        let Outcome::Proposal(p) = outcome else {
            return Err(to_status(Error::Internal(
                "policy operation returned no proposal".into(),
            )));
        };
        let governance = state::policy_governance(&self.node.view)
            .map_err(|e| to_status(Error::Internal(e.to_string())))?;
        Ok(Response::new(proposal_to_pb(
            p,
            self.node.clock.now_ms(),
            governance,
        )))
    }

    async fn propose(&self, actor: Principal, intent: Intent) -> Result<Outcome, Status> {
        self.node
            .propose(Proposal { actor, intent })
            .await
            .map(|(o, _)| o)
            .map_err(|e| self.fail(e))
    }
}

/// The caller's address as this node saw it.
pub(super) fn caller<T>(req: &Request<T>) -> CallerContext {
    CallerContext::from_addr(req.extensions().get::<ConnInfo>().and_then(|c| c.remote))
}
