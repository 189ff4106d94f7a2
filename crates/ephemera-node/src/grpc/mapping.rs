//! Domain types to and from their proto messages.

use super::*;

pub fn lease_to_pb(l: Lease) -> pb::Lease {
    let (principals, serial) = match &l.grant {
        Grant::Ssh(g) => (g.principals.clone(), g.serial),
        Grant::Jwt(_) | Grant::X509Svid(_) | Grant::Postgres(_) => (Vec::new(), 0),
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

pub(super) fn role_to_pb(r: Role) -> pb::Role {
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
pub(super) fn spec_from_pb(r: &pb::Role) -> Result<RoleSpec, Error> {
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
        // The state machine has the kind; the wire does not carry its fields yet, and a role
        // without its statements would be useless, so the API refuses it precisely.
        CredentialKind::Postgres => {
            return Err(Error::InvalidArgument(
                "postgres roles cannot be created through this API version yet".into(),
            ))
        }
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
        CredentialKind::Postgres => unreachable!("refused above"),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum KeyPurpose {
    Jwt,
    SshCa,
}

pub(super) fn key_to_pb(
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

pub(super) fn proposal_to_pb(
    p: PolicyProposal,
    now_ms: u64,
    governance: PolicyGovernance,
) -> pb::PolicyProposal {
    let status = p.status(now_ms).to_string();
    let approvals_required = p.approvals_needed(&governance);
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
        approvals_required,
        activated_version,
        rejected_by,
        reject_reason,
    }
}

pub(super) fn policy_version_to_pb(
    v: PolicyVersion,
    active: u64,
    with_text: bool,
) -> pb::PolicyVersion {
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
pub(super) fn validate_policy(text: &str) -> Result<(), Error> {
    PolicyBook::compile(text, 0)
        .map(|_| ())
        .map_err(|e| Error::InvalidArgument(e.to_string()))
}

pub(super) fn node_info_from_pb(
    n: Option<pb::NodeInfo>,
    plaintext: bool,
) -> Result<(u64, NodeInfo), Error> {
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
