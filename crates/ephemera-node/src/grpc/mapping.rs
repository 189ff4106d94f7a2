//! Domain types to and from their proto messages.

use super::*;

/// A lease on the wire, with its state as operators see it (`status`, from the state's
/// `effects::lease_status`).
pub fn lease_to_pb(l: Lease, status: LeaseStatus) -> pb::Lease {
    let (principals, serial) = match &l.grant {
        Grant::Ssh(g) => (g.principals.clone(), g.serial),
        Grant::Jwt(_) | Grant::X509Svid(_) | Grant::Postgres(_) => (Vec::new(), 0),
    };
    let (connection, username) = match &l.grant {
        Grant::Postgres(g) => (g.connection.clone(), g.username.clone()),
        _ => (String::new(), String::new()),
    };
    pb::Lease {
        state: status.state.to_string(),
        attempts: status.attempts,
        last_error: status.last_error.unwrap_or_default(),
        connection,
        username,
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
    let pg = match &r.spec {
        RoleSpec::Postgres(s) => Some(s.clone()),
        _ => None,
    };
    pb::Role {
        connection: pg
            .as_ref()
            .map(|s| s.connection.clone())
            .unwrap_or_default(),
        creation_statements: pg
            .as_ref()
            .map(|s| s.creation_statements.clone())
            .unwrap_or_default(),
        revocation_statements: pg
            .as_ref()
            .map(|s| s.revocation_statements.clone())
            .unwrap_or_default(),
        renew_statements: pg
            .as_ref()
            .map(|s| s.renew_statements.clone())
            .unwrap_or_default(),
        username_template: pg
            .as_ref()
            .map(|s| s.username_template.clone())
            .unwrap_or_default(),
        terminate_sessions: pg.as_ref().map(|s| s.terminate_sessions),
        password_length: pg.as_ref().map(|s| u32::from(s.password.length)),
        password_classes: pg
            .as_ref()
            .map(|s| {
                s.password
                    .classes
                    .iter()
                    .map(|c| c.as_str().to_string())
                    .collect()
            })
            .unwrap_or_default(),
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
    let set: [(&str, bool); 15] = [
        ("audience", !r.audience.is_empty()),
        ("scopes", !r.allowed_scopes.is_empty()),
        ("principals", !r.principals.is_empty()),
        ("host domains", !r.host_domains.is_empty()),
        ("allow subdomains", r.allow_subdomains),
        ("extensions", !r.extensions.is_empty()),
        ("critical options", !r.critical_options.is_empty()),
        ("a connection", !r.connection.is_empty()),
        ("creation statements", !r.creation_statements.is_empty()),
        ("revocation statements", !r.revocation_statements.is_empty()),
        ("renew statements", !r.renew_statements.is_empty()),
        ("a username template", !r.username_template.is_empty()),
        ("terminate sessions", r.terminate_sessions.is_some()),
        ("a password length", r.password_length.is_some()),
        ("password classes", !r.password_classes.is_empty()),
    ];
    const POSTGRES: &[&str] = &[
        "a connection",
        "creation statements",
        "revocation statements",
        "renew statements",
        "a username template",
        "terminate sessions",
        "a password length",
        "password classes",
    ];
    let allowed: &[&str] = match kind {
        CredentialKind::Jwt => &["audience", "scopes"],
        CredentialKind::X509Svid => &[],
        CredentialKind::SshUser => &["principals", "extensions", "critical options"],
        CredentialKind::SshHost => &["host domains", "allow subdomains"],
        CredentialKind::Postgres => POSTGRES,
    };
    if let Some((field, _)) = set.iter().find(|(f, on)| *on && !allowed.contains(f)) {
        return Err(Error::InvalidArgument(format!(
            "{field} {} not apply to {kind} roles{}",
            if field.ends_with('s') { "do" } else { "does" },
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
        CredentialKind::Postgres => RoleSpec::Postgres(postgres_spec_from_pb(r)?),
    })
}

fn postgres_spec_from_pb(r: &pb::Role) -> Result<postgres::Spec, Error> {
    let defaults = postgres::PasswordPolicy::default();
    let length = match r.password_length {
        None => defaults.length,
        Some(n) => u16::try_from(n).map_err(|_| {
            Error::InvalidArgument(format!("a password length of {n} is out of range"))
        })?,
    };
    let classes = if r.password_classes.is_empty() {
        defaults.classes
    } else {
        r.password_classes
            .iter()
            .map(|c| {
                postgres::CharClass::parse(c).ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "unknown password character class {c:?} (classes: {})",
                        postgres::CharClass::ALL.map(|c| c.as_str()).join(", ")
                    ))
                })
            })
            .collect::<Result<_, _>>()?
    };
    Ok(postgres::Spec {
        connection: r.connection.clone(),
        creation_statements: r.creation_statements.clone(),
        revocation_statements: r.revocation_statements.clone(),
        renew_statements: r.renew_statements.clone(),
        username_template: if r.username_template.is_empty() {
            postgres::DEFAULT_USERNAME_TEMPLATE.to_string()
        } else {
            r.username_template.clone()
        },
        terminate_sessions: r.terminate_sessions.unwrap_or(true),
        password: postgres::PasswordPolicy { length, classes },
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
