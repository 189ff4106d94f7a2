//! gRPC services: the public `Issuer` and `Admin`, and the internal `Cluster` service.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ephemera_core::command::{
    validate_intent, Intent, Outcome, Proposal, RenewIntent, RevokeTarget,
};
use ephemera_core::crypto::hash_secret;
use ephemera_core::kind::{jwt, ssh, Grant, RoleSpec};
use ephemera_core::policy::{PolicyGovernance, PolicyProposal, PolicyVersion, ProposalState};
use ephemera_core::state::{self, LeaseFilter};
use ephemera_core::types::{
    AuthMethod, CredentialKind, Lease, LeaseState, Principal, Role, SVID_ROLE,
};
use ephemera_core::{Error, ErrorCode};
use ephemera_proto::internal as ipb;
use ephemera_proto::v1 as pb;
use ephemera_raft::network::{serve_append_entries, serve_install_snapshot, serve_vote};
use ephemera_raft::{decode, encode, NodeInfo};
use rand::RngCore;
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

fn bearer<T>(req: &Request<T>) -> Option<&str> {
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
    fn presented<T>(&self, req: &Request<T>, actor: &Principal) -> Presented {
        Presented {
            join_token: bearer(req)
                .filter(|_| actor.auth_method == AuthMethod::JoinToken)
                .map(str::to_string),
            svid_lease: self
                .node
                .presented_svid_lease(req.extensions().get::<ConnInfo>()),
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
fn caller<T>(req: &Request<T>) -> CallerContext {
    CallerContext::from_addr(req.extensions().get::<ConnInfo>().and_then(|c| c.remote))
}

pub fn lease_to_pb(l: Lease) -> pb::Lease {
    let (principals, serial) = match &l.grant {
        Grant::Ssh(g) => (g.principals.clone(), g.serial),
        Grant::Jwt(_) | Grant::X509Svid(_) => (Vec::new(), 0),
    };
    pb::Lease {
        state: l.state.name().to_string(),
        kind: l.kind().as_str().to_string(),
        audience: l.audience().to_string(),
        scopes: l.scopes().to_vec(),
        principals,
        serial,
        id: l.id,
        role: l.role,
        subject: l.subject,
        client_id: l.client_id,
        purpose: l.purpose.unwrap_or_default(),
        issued_at_ms: l.issued_at_ms,
        expires_at_ms: l.expires_at_ms,
        max_expires_at_ms: l.max_expires_at_ms,
        renew_after_ms: l.renew_after_ms,
        kid: l.kid,
        renewals: l.renewals,
        ttl_s: l.ttl_s,
    }
}

fn role_to_pb(r: Role) -> pb::Role {
    let kind = r.kind().as_str().to_string();
    let (audience, allowed_scopes) = match &r.spec {
        RoleSpec::Jwt(s) => (s.audience.clone(), s.allowed_scopes.clone()),
        _ => (String::new(), Vec::new()),
    };
    let ssh = match &r.spec {
        RoleSpec::Ssh(s) => s.clone(),
        _ => ssh::Spec {
            cert_type: ssh::CertType::User,
            principals: vec![],
            host_domains: vec![],
            allow_subdomains: false,
            extensions: vec![],
            critical_options: vec![],
        },
    };
    pb::Role {
        name: r.name,
        kind,
        audience,
        allowed_scopes,
        principals: ssh.principals,
        host_domains: ssh.host_domains,
        allow_subdomains: ssh.allow_subdomains,
        extensions: ssh.extensions,
        critical_options: ssh.critical_options,
        default_ttl_s: r.default_ttl_s,
        max_ttl_s: r.max_ttl_s,
        environment: r.environment,
        target: r.target,
        revoke_on_renewal_denied: r.revoke_on_renewal_denied,
        issue_rate_per_identity: r.issue_rate_per_identity,
        issue_rate: r.issue_rate,
        max_live_leases_per_identity: r.max_live_leases_per_identity,
        max_live_leases: r.max_live_leases,
    }
}

/// A role's kind-specific part from the wire: each kind takes its own fields, and a field of
/// another kind is refused rather than ignored.
fn spec_from_pb(r: &pb::Role) -> Result<RoleSpec, Error> {
    let kind = CredentialKind::parse(&r.kind).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "unknown credential kind {:?} (supported: {})",
            r.kind,
            CredentialKind::ALL.map(|k| k.as_str()).join(", ")
        ))
    })?;
    let set: [(&str, bool); 7] = [
        ("audience", !r.audience.is_empty()),
        ("scopes", !r.allowed_scopes.is_empty()),
        ("principals", !r.principals.is_empty()),
        ("host domains", !r.host_domains.is_empty()),
        ("allow subdomains", r.allow_subdomains),
        ("extensions", !r.extensions.is_empty()),
        ("critical options", !r.critical_options.is_empty()),
    ];
    let allowed: &[&str] = match kind {
        CredentialKind::Jwt => &["audience", "scopes"],
        CredentialKind::X509Svid => &[],
        CredentialKind::SshUser => &["principals", "extensions", "critical options"],
        CredentialKind::SshHost => &["host domains", "allow subdomains"],
    };
    if let Some((field, _)) = set.iter().find(|(f, on)| *on && !allowed.contains(f)) {
        return Err(Error::InvalidArgument(format!(
            "{field} do not apply to {kind} roles{}",
            if allowed.is_empty() {
                String::new()
            } else {
                format!(" (they take {})", allowed.join(", "))
            }
        )));
    }
    Ok(match kind {
        CredentialKind::Jwt => RoleSpec::Jwt(jwt::Spec {
            audience: r.audience.clone(),
            allowed_scopes: r.allowed_scopes.clone(),
        }),
        CredentialKind::X509Svid => RoleSpec::X509Svid(ephemera_core::kind::x509_svid::Spec {}),
        CredentialKind::SshUser | CredentialKind::SshHost => RoleSpec::Ssh(ssh::Spec {
            cert_type: if kind == CredentialKind::SshUser {
                ssh::CertType::User
            } else {
                ssh::CertType::Host
            },
            principals: r.principals.clone(),
            host_domains: r.host_domains.clone(),
            allow_subdomains: r.allow_subdomains,
            extensions: r.extensions.clone(),
            critical_options: r.critical_options.clone(),
        }),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyPurpose {
    Jwt,
    SshCa,
}

fn key_to_pb(
    k: ephemera_core::types::SigningKeyRecord,
    purpose: KeyPurpose,
    now: u64,
) -> pb::SigningKey {
    pb::SigningKey {
        status: k.status_at(now, KEY_PUBLISH_GRACE_MS).to_string(),
        published: k.is_published_at(now, KEY_PUBLISH_GRACE_MS),
        purpose: match purpose {
            KeyPurpose::Jwt => "jwt".into(),
            KeyPurpose::SshCa => "ssh-ca".into(),
        },
        public_key: match purpose {
            KeyPurpose::Jwt => String::new(),
            KeyPurpose::SshCa => ephemera_core::kind::ssh::ed25519_public_line(
                &k.public_key,
                &format!("ephemera-ssh-ca-{}", k.kid),
            ),
        },
        kid: k.kid,
        created_at_ms: k.created_at_ms,
        max_token_expiry_ms: k.max_token_expiry_ms,
    }
}

fn proposal_to_pb(
    p: PolicyProposal,
    now_ms: u64,
    governance: PolicyGovernance,
) -> pb::PolicyProposal {
    let status = p.status(now_ms).to_string();
    let (activated_version, rejected_by, reject_reason) = match p.state {
        ProposalState::Activated { version, .. } => (version, String::new(), String::new()),
        ProposalState::Rejected { by, reason, .. } => (0, by, reason),
        ProposalState::Pending => (0, String::new(), String::new()),
    };
    pb::PolicyProposal {
        id: p.id,
        text: p.text,
        sha256: p.sha256,
        base_version: p.base_version,
        proposer: p.proposer,
        comment: p.comment.unwrap_or_default(),
        created_at_ms: p.created_at_ms,
        expires_at_ms: p.expires_at_ms,
        approvals: p.approvals,
        status,
        approvals_required: governance.approvals_required,
        activated_version,
        rejected_by,
        reject_reason,
    }
}

fn policy_version_to_pb(v: PolicyVersion, active: u64, with_text: bool) -> pb::PolicyVersion {
    pb::PolicyVersion {
        active: v.version == active,
        version: v.version,
        text: if with_text { v.text } else { String::new() },
        sha256: v.sha256,
        activated_at_ms: v.activated_at_ms,
        proposal_id: v.proposal_id.unwrap_or_default(),
        proposer: v.proposer,
        approvers: v.approvers,
    }
}

/// Parses and validates a policy set the way every node will compile it.
fn validate_policy(text: &str) -> Result<(), Error> {
    PolicyBook::compile(text, 0)
        .map(|_| ())
        .map_err(|e| Error::InvalidArgument(e.to_string()))
}

#[tonic::async_trait]
impl pb::issuer_server::Issuer for Api {
    async fn issue_svid(
        &self,
        mut req: Request<pb::IssueSvidRequest>,
    ) -> Result<Response<pb::Svid>, Status> {
        // The compatibility path: the join token travels in the request body here; it is the
        // same credential as an `eph_jt_` bearer on Issue.
        if let Some(token) = req.get_ref().join_token.clone() {
            let value = format!("Bearer {token}")
                .parse()
                .map_err(|_| self.fail(Error::Unauthenticated("malformed join token".into())))?;
            req.metadata_mut().insert("authorization", value);
        }
        // `InBody` in the method table: authenticated here, by the same code as everywhere.
        let actor = self
            .node
            .authenticate(bearer(&req), req.extensions().get::<ConnInfo>())
            .await
            .map_err(|e| self.fail(e))?;
        let presented = self.presented(&req, &actor);
        let r = req.get_ref();
        let input = IssueInput {
            role: SVID_ROLE.into(),
            ttl_s: r.ttl_s,
            purpose: None,
            request_id: None,
            subject: None,
            kind: KindInput::X509Svid {
                csr_pem: r.csr_pem.clone(),
            },
        };
        let issued = self
            .node
            .issue_credential(&actor, &presented, &caller(&req), input)
            .await
            .map_err(|e| self.fail(e))?;
        Metrics::inc(&self.node.metrics.issued, 1);
        let (lease, credential) = (issued.lease, issued.credential);
        let Minted::X509Svid {
            cert_pem,
            bundle_pem,
        } = credential
        else {
            return Err(to_status(Error::Internal(
                "the SVID role minted something else".into(),
            )));
        };
        Ok(Response::new(pb::Svid {
            lease_id: lease.id,
            spiffe_id: lease.subject,
            cert_pem,
            bundle_pem,
            expires_at_ms: lease.expires_at_ms,
        }))
    }

    async fn issue(
        &self,
        req: Request<pb::IssueRequest>,
    ) -> Result<Response<pb::Credential>, Status> {
        let actor = self.caller_of(&req)?;
        let presented = self.presented(&req, &actor);
        let mut caller = caller(&req);
        let r = req.into_inner();
        caller.environment = r.environment;
        caller.job_id = r.job_id;
        let jwt_fields = !r.scopes.is_empty() || r.audience.is_some();
        let kind = match r.kind {
            None => KindInput::Jwt(jwt::Request {
                scopes: r.scopes,
                audience: r.audience,
            }),
            Some(_) if jwt_fields => {
                return Err(self.fail(Error::InvalidArgument(
                    "scopes and audience belong to JWT requests, not to this kind".into(),
                )))
            }
            Some(pb::issue_request::Kind::X509Svid(s)) => {
                KindInput::X509Svid { csr_pem: s.csr_pem }
            }
            Some(pb::issue_request::Kind::Ssh(s)) => KindInput::Ssh(ssh::Request {
                public_key: s.public_key,
                principals: s.principals,
                extensions: s.set_extensions.then_some(s.extensions),
                critical_options: s.critical_options.into_iter().collect(),
            }),
        };
        let input = IssueInput {
            role: r.role,
            ttl_s: r.ttl_s,
            purpose: r.purpose,
            request_id: r.request_id,
            subject: r.subject,
            kind,
        };
        let issued = self
            .node
            .issue_credential(&actor, &presented, &caller, input)
            .await
            .map_err(|e| self.fail(e))?;
        Metrics::inc(&self.node.metrics.issued, 1);
        Ok(Response::new(self.credential(issued)))
    }

    async fn renew(
        &self,
        req: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::Credential>, Status> {
        let actor = self.caller_of(&req)?;
        let mut caller = caller(&req);
        let r = req.into_inner();
        caller.environment = r.environment;
        caller.job_id = r.job_id;
        let intent = RenewIntent {
            lease_id: r.lease_id,
            increment_s: r.increment_s,
            context: caller.for_audit(),
            policy: None,
        };
        validate_intent(&Intent::Renew(intent.clone())).map_err(|e| self.fail(e))?;
        let (node, actor_ref, intent_ref, caller_ref) = (&self.node, &actor, &intent, &caller);
        let outcome = self
            .node
            .propose_decided(&actor, || async move {
                let lease = match self.lease(&intent_ref.lease_id).await? {
                    Some(lease) => lease,
                    None => return Err(Error::LeaseNotFound(intent_ref.lease_id.clone())),
                };
                // A revoked or expired lease is refused precisely by `apply`, not by policy.
                let policy = if lease.state == LeaseState::Active {
                    Some(
                        node.decide_on_lease(
                            actor_ref,
                            Action::Renew,
                            &lease,
                            intent_ref.increment_s,
                            caller_ref,
                        )
                        .await?,
                    )
                } else {
                    None
                };
                Ok(Intent::Renew(RenewIntent {
                    policy,
                    ..intent_ref.clone()
                }))
            })
            .await
            .map_err(|e| self.fail(e))?;
        let Outcome::Lease { lease, replayed } = outcome else {
            return Err(to_status(Error::Internal("renew returned no lease".into())));
        };
        let credential = self.node.credential_of(&lease).map_err(|e| self.fail(e))?;
        Metrics::inc(&self.node.metrics.renewed, 1);
        Ok(Response::new(self.credential(Issued {
            lease,
            replayed,
            credential,
        })))
    }

    async fn revoke(
        &self,
        req: Request<pb::RevokeRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        let actor = self.caller_of(&req)?;
        let caller = caller(&req);
        use pb::revoke_request::Target;
        let target = match req.into_inner().target {
            Some(Target::LeaseId(id)) => RevokeTarget::Lease(id),
            Some(Target::Subject(s)) => RevokeTarget::Subject(s),
            Some(Target::Role(r)) => RevokeTarget::Role(r),
            Some(Target::Kid(k)) => RevokeTarget::Key(k),
            None => {
                return Err(self.fail(Error::InvalidArgument(
                    "one of lease_id, subject, role or kid is required".into(),
                )))
            }
        };
        Metrics::inc(&self.node.metrics.revoke_calls, 1);
        validate_intent(&Intent::Revoke(target.clone())).map_err(|e| self.fail(e))?;
        match &target {
            // An unknown lease is refused by `apply`, which has the last word on existence.
            RevokeTarget::Lease(id) => {
                if let Some(lease) = self.lease(id).await.map_err(|e| self.fail(e))? {
                    self.node
                        .decide_on_lease(&actor, Action::Revoke, &lease, None, &caller)
                        .await
                        .map_err(|e| self.fail(e))?;
                }
            }
            _ => self
                .node
                .authorize_admin(&actor, AdminAction::LeaseRevokeBulk, &caller)
                .await
                .map_err(|e| self.fail(e))?,
        }
        match self.propose(actor, Intent::Revoke(target)).await? {
            Outcome::Revoked { count } => {
                Metrics::inc(&self.node.metrics.leases_revoked, count);
                Ok(Response::new(pb::RevokeResponse { revoked: count }))
            }
            _ => Err(to_status(Error::Internal(
                "revoke returned no count".into(),
            ))),
        }
    }

    async fn introspect(
        &self,
        req: Request<pb::IntrospectRequest>,
    ) -> Result<Response<pb::IntrospectResponse>, Status> {
        let actor = self.caller_of(&req)?;
        let caller = caller(&req);
        let token = req.into_inner().token;
        let claims = self
            .node
            .introspect(&actor, &caller, &token)
            .await
            .map_err(|e| self.fail(e))?;
        Ok(Response::new(match claims {
            None => pb::IntrospectResponse::default(),
            Some(c) => pb::IntrospectResponse {
                active: true,
                sub: c.sub,
                aud: c.aud,
                scope: c.scope,
                client_id: c.client_id,
                exp: c.exp,
                iat: c.iat,
                nbf: c.nbf,
                jti: c.jti,
                iss: c.iss,
                token_type: "Bearer".into(),
            },
        }))
    }

    async fn list_leases(
        &self,
        req: Request<pb::ListLeasesRequest>,
    ) -> Result<Response<pb::ListLeasesResponse>, Status> {
        let actor = self.caller_of(&req)?;
        let r = req.get_ref().clone();
        if let Some(s) = &r.state {
            if !matches!(s.as_str(), "active" | "revoked" | "expired") {
                return Err(self.fail(Error::InvalidArgument(format!(
                    "state {s:?} must be one of active, revoked, expired"
                ))));
            }
        }
        self.read_audit(&req, &actor, "").await?;
        let filter = LeaseFilter {
            subject: r.subject,
            role: r.role,
            state: r.state,
        };
        let page_size = if r.page_size == 0 {
            100
        } else {
            r.page_size as usize
        };
        let after = (!r.page_token.is_empty()).then_some(r.page_token.as_str());
        let (leases, next) = state::list_leases(&self.node.view, &filter, after, page_size)
            .map_err(|e| to_status(Error::Internal(e.to_string())))?;
        Ok(Response::new(pb::ListLeasesResponse {
            leases: leases.into_iter().map(lease_to_pb).collect(),
            next_page_token: next.unwrap_or_default(),
        }))
    }
}

fn node_info_from_pb(n: Option<pb::NodeInfo>, plaintext: bool) -> Result<(u64, NodeInfo), Error> {
    let n = n.ok_or_else(|| Error::InvalidArgument("node is required".into()))?;
    if n.id == 0 {
        return Err(Error::InvalidArgument("node id must be non-zero".into()));
    }
    for (what, addr) in [
        ("api_addr", &n.api_addr),
        ("http_addr", &n.http_addr),
        ("cluster_addr", &n.cluster_addr),
    ] {
        match addr.parse::<std::net::SocketAddr>() {
            Err(_) => {
                return Err(Error::InvalidArgument(format!(
                    "{what} {addr:?} is not host:port"
                )))
            }
            Ok(a) if plaintext && !a.ip().is_loopback() => {
                return Err(Error::InvalidArgument(format!(
                    "{what} {addr} is not a loopback address; this cluster runs without TLS"
                )))
            }
            Ok(_) => {}
        }
    }
    Ok((
        n.id,
        NodeInfo {
            api_addr: n.api_addr,
            http_addr: n.http_addr,
            cluster_addr: n.cluster_addr,
        },
    ))
}

impl Api {
    async fn status_pb(&self) -> pb::ClusterStatus {
        let v = self.node.cluster_status().await;
        pb::ClusterStatus {
            leader_id: v.leader_id.unwrap_or(0),
            term: v.term,
            nodes: v
                .nodes
                .into_iter()
                .map(|m| pb::NodeStatus {
                    id: m.id,
                    api_addr: m.info.api_addr,
                    http_addr: m.info.http_addr,
                    cluster_addr: m.info.cluster_addr,
                    role: if !m.voter && m.role != "unreachable" {
                        "learner".into()
                    } else {
                        m.role
                    },
                    applied_index: m.applied_index,
                    voter: m.voter,
                    clock_offset_ms: m.clock_offset_ms,
                })
                .collect(),
            renewal_storm: v.storm.0,
            renewal_rate_per_s: v.storm.1,
            renewal_baseline_per_s: v.storm.2,
            max_clock_skew_ms: self.node.guard.config.max_clock_skew_ms,
        }
    }

    async fn init_cluster(
        &self,
        r: pb::InitClusterRequest,
    ) -> Result<pb::InitClusterResponse, Error> {
        let pb::InitClusterRequest {
            issuer,
            ca_cert_pem,
            ca_key_pem,
            policy_text,
            policy_approvals,
            policy_proposal_ttl_s,
        } = r;
        let policy_text = if policy_text.is_empty() {
            ephemera_policy::DEFAULT_POLICY.to_string()
        } else {
            policy_text
        };
        validate_policy(&policy_text)?;
        let defaults = PolicyGovernance::default();
        let governance = PolicyGovernance {
            approvals_required: policy_approvals.unwrap_or(defaults.approvals_required),
            proposal_ttl_s: policy_proposal_ttl_s.unwrap_or(defaults.proposal_ttl_s),
        };
        ephemera_core::command::validate_governance(&governance)?;
        let node = &self.node;
        let initialized = node
            .raft
            .is_initialized()
            .await
            .map_err(|e| Error::Unavailable(e.to_string()))?;
        let bootstrapped = state::admin_credential_hash(&node.view)
            .map_err(|e| Error::Internal(e.to_string()))?
            .is_some();
        if bootstrapped {
            return Err(Error::AlreadyInitialized);
        }
        let issuer = if issuer.is_empty() {
            let scheme = if self.plaintext { "http" } else { "https" };
            format!("{scheme}://{}", node.info.http_addr)
        } else {
            issuer
        };
        // An earlier init may have initialised Raft and then failed before the bootstrap entry
        // committed: resume it. If the bootstrap did commit elsewhere, `apply` refuses this one.
        if !initialized {
            let members = BTreeMap::from([(node.id, node.info.clone())]);
            node.raft.initialize(members).await.map_err(|e| match e {
                ephemera_raft::RaftError::APIError(_) => Error::AlreadyInitialized,
                other => Error::Unavailable(other.to_string()),
            })?;
        }
        node.raft
            .wait(Some(Duration::from_secs(10)))
            .current_leader(node.id, "init: become leader")
            .await
            .map_err(|e| Error::Unavailable(format!("did not become leader: {e}")))?;
        let mut secret = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut secret);
        let admin_token = format!("eph_admin_{}", URL_SAFE_NO_PAD.encode(secret));
        node.route_system(Intent::Bootstrap {
            admin_credential_hash: hash_secret(&admin_token).to_vec(),
            issuer,
            policy_text,
            governance,
        })
        .await?;
        if !ca_cert_pem.is_empty() || !ca_key_pem.is_empty() {
            let trust_domain = node
                .tls_trust_domain()
                .ok_or_else(|| {
                    Error::InvalidArgument("a cluster CA needs a node configured with [tls]".into())
                })?
                .to_string();
            ephemera_pki::check_key_matches(&ca_cert_pem, &ca_key_pem)
                .map_err(|e| Error::InvalidArgument(format!("cluster CA: {e}")))?;
            let sealed_seed = node.seal_ca_key(&ca_key_pem)?;
            node.route_system(Intent::SetClusterCa {
                trust_domain,
                cert_pem: ca_cert_pem,
                sealed_seed,
            })
            .await?;
        }
        if state::active_kid(&node.view)
            .map_err(|e| Error::Internal(e.to_string()))?
            .is_none()
        {
            node.route_system(Intent::RotateKey).await?;
        }
        // The SSH CA is generated here too, so that a cluster answers SSH requests as soon as
        // init returns (the leader's tick only replaces a revoked one).
        if state::active_ssh_ca(&node.view)
            .map_err(|e| Error::Internal(e.to_string()))?
            .is_none()
        {
            node.route_system(Intent::RotateSshCa).await?;
        }
        tracing::info!(
            node_id = node.id,
            "cluster initialised; the admin credential was returned to the caller"
        );
        Ok(pb::InitClusterResponse {
            admin_token,
            node_id: node.id,
        })
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for Api {
    async fn create_join_token(
        &self,
        req: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<pb::JoinToken>, Status> {
        let actor = self.caller_of(&req)?;
        let r = req.into_inner();
        let id = ephemera_pki::SpiffeId::parse(&r.spiffe_id)
            .map_err(|e| self.fail(Error::InvalidArgument(e.to_string())))?;
        self.node
            .refuse_admin_identity(&id.to_string())
            .map_err(|e| self.fail(e))?;
        let ttl_s = if r.ttl_s == 0 { 600 } else { r.ttl_s };
        let mut secret = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut secret);
        let token = format!("eph_jt_{}", URL_SAFE_NO_PAD.encode(secret));
        self.propose(
            actor,
            Intent::CreateJoinToken {
                token_hash: hash_secret(&token).to_vec(),
                spiffe_id: id.to_string(),
                ttl_s,
            },
        )
        .await?;
        Ok(Response::new(pb::JoinToken {
            token,
            spiffe_id: id.to_string(),
            expires_at_ms: self.node.clock.now_ms() + ttl_s * 1000,
        }))
    }

    async fn init_cluster(
        &self,
        req: Request<pb::InitClusterRequest>,
    ) -> Result<Response<pb::InitClusterResponse>, Status> {
        Api::init_cluster(self, req.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| self.fail(e))
    }

    async fn get_node_info(
        &self,
        _: Request<pb::NodeInfoRequest>,
    ) -> Result<Response<pb::NodeInfo>, Status> {
        let i = &self.node.info;
        Ok(Response::new(pb::NodeInfo {
            id: self.node.id,
            api_addr: i.api_addr.clone(),
            http_addr: i.http_addr.clone(),
            cluster_addr: i.cluster_addr.clone(),
        }))
    }

    async fn add_node(
        &self,
        req: Request<pb::AddNodeRequest>,
    ) -> Result<Response<pb::ClusterStatus>, Status> {
        let actor = self.caller_of(&req)?;
        let (id, info) =
            node_info_from_pb(req.into_inner().node, self.plaintext).map_err(|e| self.fail(e))?;
        self.propose(
            actor,
            Intent::RecordAccess {
                action: "cluster.add_node".into(),
                target: format!("node:{id} {info}"),
            },
        )
        .await?;
        self.node
            .route(Forwarded::AddNode { id, info })
            .await
            .map_err(|e| self.fail(e))?;
        Ok(Response::new(self.status_pb().await))
    }

    async fn remove_node(
        &self,
        req: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::ClusterStatus>, Status> {
        let actor = self.caller_of(&req)?;
        let id = req.into_inner().id;
        self.propose(
            actor,
            Intent::RecordAccess {
                action: "cluster.remove_node".into(),
                target: format!("node:{id}"),
            },
        )
        .await?;
        self.node
            .route(Forwarded::RemoveNode { id })
            .await
            .map_err(|e| self.fail(e))?;
        Ok(Response::new(self.status_pb().await))
    }

    async fn get_cluster_status(
        &self,
        req: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatus>, Status> {
        // An operational probe: authenticated, but not written to the audit chain, so that
        // monitoring does not grow the replicated state.
        self.caller_of(&req)?;
        Ok(Response::new(self.status_pb().await))
    }

    async fn put_role(
        &self,
        req: Request<pb::PutRoleRequest>,
    ) -> Result<Response<pb::Role>, Status> {
        let actor = self.caller_of(&req)?;
        let r = req
            .into_inner()
            .role
            .ok_or_else(|| self.fail(Error::InvalidArgument("role is required".into())))?;
        let spec = spec_from_pb(&r).map_err(|e| self.fail(e))?;
        let role = Role {
            name: r.name,
            spec,
            default_ttl_s: r.default_ttl_s,
            max_ttl_s: r.max_ttl_s,
            environment: r.environment,
            target: r.target,
            revoke_on_renewal_denied: r.revoke_on_renewal_denied,
            issue_rate_per_identity: r.issue_rate_per_identity,
            issue_rate: r.issue_rate,
            max_live_leases_per_identity: r.max_live_leases_per_identity,
            max_live_leases: r.max_live_leases,
        };
        match self.propose(actor, Intent::PutRole(role)).await? {
            Outcome::Role(r) => Ok(Response::new(role_to_pb(r))),
            _ => Err(to_status(Error::Internal(
                "put role returned no role".into(),
            ))),
        }
    }

    async fn get_role(
        &self,
        req: Request<pb::GetRoleRequest>,
    ) -> Result<Response<pb::Role>, Status> {
        let actor = self.caller_of(&req)?;
        let name = req.get_ref().name.clone();
        self.read_audit(&req, &actor, &format!("role:{name}"))
            .await?;
        match state::get_role(&self.node.view, &name)
            .map_err(|e| to_status(Error::Internal(e.to_string())))?
        {
            Some(r) => Ok(Response::new(role_to_pb(r))),
            None => Err(self.fail(Error::UnknownRole(name))),
        }
    }

    async fn list_roles(
        &self,
        req: Request<pb::ListRolesRequest>,
    ) -> Result<Response<pb::ListRolesResponse>, Status> {
        let actor = self.caller_of(&req)?;
        self.read_audit(&req, &actor, "").await?;
        let roles = state::list_roles(&self.node.view)
            .map_err(|e| to_status(Error::Internal(e.to_string())))?;
        Ok(Response::new(pb::ListRolesResponse {
            roles: roles.into_iter().map(role_to_pb).collect(),
        }))
    }

    async fn delete_role(
        &self,
        req: Request<pb::DeleteRoleRequest>,
    ) -> Result<Response<pb::DeleteRoleResponse>, Status> {
        let actor = self.caller_of(&req)?;
        let name = req.into_inner().name;
        self.propose(actor, Intent::DeleteRole { name }).await?;
        Ok(Response::new(pb::DeleteRoleResponse {}))
    }

    async fn list_keys(
        &self,
        req: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        let actor = self.caller_of(&req)?;
        self.read_audit(&req, &actor, "").await?;
        let now = self.node.clock.now_ms();
        let internal = |e: ephemera_core::StorageError| to_status(Error::Internal(e.to_string()));
        let jwt_keys = state::list_keys(&self.node.view).map_err(internal)?;
        let ssh_cas = state::list_ssh_cas(&self.node.view).map_err(internal)?;
        Ok(Response::new(pb::ListKeysResponse {
            keys: jwt_keys
                .into_iter()
                .map(|k| key_to_pb(k, KeyPurpose::Jwt, now))
                .chain(
                    ssh_cas
                        .into_iter()
                        .map(|k| key_to_pb(k, KeyPurpose::SshCa, now)),
                )
                .collect(),
        }))
    }

    async fn rotate_key(
        &self,
        req: Request<pb::RotateKeyRequest>,
    ) -> Result<Response<pb::SigningKey>, Status> {
        let actor = self.caller_of(&req)?;
        let (purpose, intent) = match req.get_ref().key.as_str() {
            "" | "jwt" => (KeyPurpose::Jwt, Intent::RotateKey),
            "ssh-ca" => (KeyPurpose::SshCa, Intent::RotateSshCa),
            other => {
                return Err(self.fail(Error::InvalidArgument(format!(
                    "unknown key {other:?}: jwt or ssh-ca"
                ))))
            }
        };
        match self.propose(actor, intent).await? {
            Outcome::KeyAdded { kid } => {
                let rec = match purpose {
                    KeyPurpose::Jwt => state::get_key(&self.node.view, &kid),
                    KeyPurpose::SshCa => state::get_ssh_ca(&self.node.view, &kid),
                }
                .map_err(|e| to_status(Error::Internal(e.to_string())))?
                .ok_or_else(|| to_status(Error::KeyNotFound(kid.clone())))?;
                Ok(Response::new(key_to_pb(
                    rec,
                    purpose,
                    self.node.clock.now_ms(),
                )))
            }
            _ => Err(to_status(Error::Internal("rotate returned no key".into()))),
        }
    }

    async fn audit_tail(
        &self,
        req: Request<pb::AuditTailRequest>,
    ) -> Result<Response<pb::AuditTailResponse>, Status> {
        let actor = self.caller_of(&req)?;
        let r = *req.get_ref();
        self.read_audit(&req, &actor, "").await?;
        let limit = if r.limit == 0 { 20 } else { r.limit.min(1000) } as usize;
        let view = &self.node.view;
        let (head_seq, head_hash) =
            state::audit_head(view).map_err(|e| to_status(Error::Internal(e.to_string())))?;
        let from = if r.from_seq == 0 {
            head_seq.saturating_sub(limit as u64 - 1).max(1)
        } else {
            r.from_seq
        };
        let mut records = state::audit_records(view, from, limit)
            .map_err(|e| to_status(Error::Internal(e.to_string())))?;
        // Records appended after the head was read belong to the next page, so that the page
        // always ends at (or before) the head it reports.
        records.retain(|r| r.seq <= head_seq);
        Ok(Response::new(pb::AuditTailResponse {
            records: records
                .into_iter()
                .map(|a| pb::AuditRecord {
                    canonical_json: serde_json::to_string(&a).expect("audit records serialise"),
                    seq: a.seq,
                    time_ms: a.time_ms,
                    actor: a.actor,
                    auth_method: a.auth_method,
                    actor_issuer: a.actor_issuer,
                    actor_attributes: a.actor_attributes.into_iter().collect(),
                    action: a.action,
                    role: a.role,
                    lease_id: a.lease_id,
                    subject: a.subject,
                    ttl_s: a.ttl_s,
                    scopes: a.scopes,
                    audience: a.audience,
                    target: a.target,
                    count: a.count,
                    outcome: a.outcome,
                    reason: a.reason,
                    prev_hash: a.prev_hash,
                    hash: a.hash,
                    policy_version: a.policy_version,
                    policy_ids: a.policy_ids,
                    context: a.context.into_iter().collect(),
                    details: a.details.into_iter().collect(),
                    error_fields: a.error_fields.into_iter().collect(),
                })
                .collect(),
            head_seq,
            head_hash,
        }))
    }

    async fn propose_policy(
        &self,
        req: Request<pb::ProposePolicyRequest>,
    ) -> Result<Response<pb::PolicyProposal>, Status> {
        let actor = self.caller_of(&req)?;
        let r = req.into_inner();
        // Refused here with the validator's message; nothing reaches the log.
        validate_policy(&r.text).map_err(|e| self.fail(e))?;
        let intent = Intent::ProposePolicy {
            text: r.text,
            comment: r.comment.filter(|c| !c.is_empty()),
        };
        self.proposal_reply(self.propose(actor, intent).await?)
    }

    async fn approve_policy(
        &self,
        req: Request<pb::ApprovePolicyRequest>,
    ) -> Result<Response<pb::PolicyProposal>, Status> {
        let actor = self.caller_of(&req)?;
        let proposal_id = req.into_inner().proposal_id;
        let outcome = self
            .propose(actor, Intent::ApprovePolicy { proposal_id })
            .await?;
        self.proposal_reply(outcome)
    }

    async fn reject_policy(
        &self,
        req: Request<pb::RejectPolicyRequest>,
    ) -> Result<Response<pb::PolicyProposal>, Status> {
        let actor = self.caller_of(&req)?;
        let r = req.into_inner();
        let intent = Intent::RejectPolicy {
            proposal_id: r.proposal_id,
            reason: r.reason,
        };
        self.proposal_reply(self.propose(actor, intent).await?)
    }

    async fn get_policy_proposal(
        &self,
        req: Request<pb::GetPolicyProposalRequest>,
    ) -> Result<Response<pb::PolicyProposal>, Status> {
        let actor = self.caller_of(&req)?;
        let id = req.get_ref().proposal_id.clone();
        self.read_audit(&req, &actor, &format!("policy-proposal:{id}"))
            .await?;
        let view = &self.node.view;
        let proposal = state::policy_proposal(view, &id)
            .map_err(|e| to_status(Error::Internal(e.to_string())))?
            .ok_or_else(|| self.fail(Error::ProposalNotFound(id)))?;
        self.proposal_reply(Outcome::Proposal(proposal))
    }

    async fn list_policy_proposals(
        &self,
        req: Request<pb::ListPolicyProposalsRequest>,
    ) -> Result<Response<pb::ListPolicyProposalsResponse>, Status> {
        let actor = self.caller_of(&req)?;
        let include_closed = req.get_ref().include_closed;
        self.read_audit(&req, &actor, "policy-proposals").await?;
        let view = &self.node.view;
        let internal = |e: ephemera_core::StorageError| to_status(Error::Internal(e.to_string()));
        let governance = state::policy_governance(view).map_err(internal)?;
        let now = self.node.clock.now_ms();
        let proposals = state::policy_proposals(view)
            .map_err(internal)?
            .into_iter()
            .filter(|p| include_closed || p.status(now) == "pending")
            .map(|p| proposal_to_pb(p, now, governance))
            .collect();
        Ok(Response::new(pb::ListPolicyProposalsResponse { proposals }))
    }

    async fn get_policy(
        &self,
        req: Request<pb::GetPolicyRequest>,
    ) -> Result<Response<pb::PolicyVersion>, Status> {
        let actor = self.caller_of(&req)?;
        let wanted = req.get_ref().version;
        self.read_audit(&req, &actor, "policy").await?;
        let view = &self.node.view;
        let internal = |e: ephemera_core::StorageError| to_status(Error::Internal(e.to_string()));
        let active = state::policy_version(view).map_err(internal)?;
        let version = wanted.unwrap_or(active);
        let v = state::policy_at(view, version)
            .map_err(internal)?
            .ok_or_else(|| {
                self.fail(Error::InvalidArgument(format!(
                    "no policy version {version} (the active version is {active})"
                )))
            })?;
        Ok(Response::new(policy_version_to_pb(v, active, true)))
    }

    async fn list_policy_history(
        &self,
        req: Request<pb::ListPolicyHistoryRequest>,
    ) -> Result<Response<pb::ListPolicyHistoryResponse>, Status> {
        let actor = self.caller_of(&req)?;
        self.read_audit(&req, &actor, "policy-history").await?;
        let view = &self.node.view;
        let internal = |e: ephemera_core::StorageError| to_status(Error::Internal(e.to_string()));
        let active = state::policy_version(view).map_err(internal)?;
        let versions = state::policy_history(view)
            .map_err(internal)?
            .into_iter()
            .map(|v| policy_version_to_pb(v, active, false))
            .collect();
        Ok(Response::new(pb::ListPolicyHistoryResponse { versions }))
    }

    async fn list_quarantines(
        &self,
        req: Request<pb::ListQuarantinesRequest>,
    ) -> Result<Response<pb::ListQuarantinesResponse>, Status> {
        let actor = self.caller_of(&req)?;
        self.read_audit(&req, &actor, "").await?;
        let quarantines = state::quarantines(&self.node.view)
            .map_err(|e| to_status(Error::Internal(e.to_string())))?
            .into_iter()
            .map(|q| pb::Quarantine {
                identity: q.identity,
                since_ms: q.since_ms,
                reason: q.reason,
                detail: q.detail,
                revoked: q.revoked,
            })
            .collect();
        Ok(Response::new(pb::ListQuarantinesResponse { quarantines }))
    }

    async fn release_quarantine(
        &self,
        req: Request<pb::ReleaseQuarantineRequest>,
    ) -> Result<Response<pb::ReleaseQuarantineResponse>, Status> {
        let actor = self.caller_of(&req)?;
        let identity = req.into_inner().identity;
        self.propose(actor, Intent::ReleaseQuarantine { identity })
            .await?;
        Ok(Response::new(pb::ReleaseQuarantineResponse {}))
    }

    async fn get_state_digest(
        &self,
        req: Request<pb::StateDigestRequest>,
    ) -> Result<Response<pb::StateDigest>, Status> {
        // Operational probe of this node's own copy; not audited (see get_cluster_status).
        self.caller_of(&req)?;
        let node = self.node.clone();
        let digest = tokio::task::spawn_blocking(move || -> Result<pb::StateDigest, Error> {
            let view = &node.view;
            let (_, applied, _) = node.local_status();
            let err = |e: ephemera_core::StorageError| Error::Internal(e.to_string());
            let digest = state::state_digest(view).map_err(err)?;
            let (seq, hash) = state::audit_head(view).map_err(err)?;
            let lease_count =
                ephemera_core::kv::KvRead::range(view, b"lease/", b"lease0", usize::MAX)
                    .map_err(err)?
                    .len() as u64;
            Ok(pb::StateDigest {
                node_id: node.id,
                digest,
                applied_index: applied,
                audit_head_seq: seq,
                audit_head_hash: hash,
                lease_count,
            })
        })
        .await
        .map_err(|e| to_status(Error::Internal(e.to_string())))?
        .map_err(to_status)?;
        Ok(Response::new(digest))
    }
}

/// The internal service on the cluster listener.
#[derive(Clone)]
pub struct ClusterService {
    pub node: Arc<Node>,
}

#[tonic::async_trait]
impl ipb::cluster_server::Cluster for ClusterService {
    async fn append_entries(
        &self,
        req: Request<ipb::RaftPayload>,
    ) -> Result<Response<ipb::RaftPayload>, Status> {
        serve_append_entries(&self.node.raft, &req.into_inner().data)
            .await
            .map(Response::new)
    }

    async fn vote(
        &self,
        req: Request<ipb::RaftPayload>,
    ) -> Result<Response<ipb::RaftPayload>, Status> {
        serve_vote(&self.node.raft, &req.into_inner().data)
            .await
            .map(Response::new)
    }

    async fn install_snapshot(
        &self,
        req: Request<ipb::RaftPayload>,
    ) -> Result<Response<ipb::RaftPayload>, Status> {
        serve_install_snapshot(&self.node.raft, &req.into_inner().data)
            .await
            .map(Response::new)
    }

    async fn forward(
        &self,
        req: Request<ipb::ForwardRequest>,
    ) -> Result<Response<ipb::ForwardResponse>, Status> {
        let call: Forwarded = decode(&req.into_inner().proposal)
            .map_err(|e| Status::invalid_argument(format!("undecodable forwarded call: {e}")))?;
        let reply = self.node.handle_forwarded(call).await;
        Ok(Response::new(ipb::ForwardResponse {
            result: encode(&reply),
        }))
    }

    async fn read_index(
        &self,
        _: Request<ipb::ReadIndexRequest>,
    ) -> Result<Response<ipb::ReadIndexResponse>, Status> {
        self.node
            .read_index()
            .await
            .map(|index| Response::new(ipb::ReadIndexResponse { index }))
            .map_err(to_status)
    }

    async fn node_status(
        &self,
        _: Request<ipb::NodeStatusRequest>,
    ) -> Result<Response<ipb::NodeStatusResponse>, Status> {
        let (state, applied_index, leader) = self.node.local_status();
        let (renewal_storm, renewal_rate_per_s, renewal_baseline_per_s) =
            self.node.guard.storm_state();
        Ok(Response::new(ipb::NodeStatusResponse {
            id: self.node.id,
            state,
            applied_index,
            current_leader: leader.unwrap_or(0),
            now_ms: self.node.clock.now_ms(),
            clock_offset_ms: self.node.guard.clock_offset(),
            renewal_storm,
            renewal_rate_per_s,
            renewal_baseline_per_s,
        }))
    }
}
