//! The one issuance pipeline, for every credential kind:
//!
//! authenticate, ingress limits, the clock check (the method table's gate did these) →
//! the kind's request prepared (a CSR's signature verified, an SSH key parsed) → validation →
//! the Cedar decision on the role, with the kind's attributes → (leader) cluster-wide limits
//! and anomaly detection → commit, where `apply` checks quarantine, budgets, TTL caps and the
//! kind's grant → mint after commit on this node → answer; every step's refusal is audited.

use ephemera_core::command::{validate_intent, Intent, IssueIntent, Outcome, Proposal};
use ephemera_core::crypto::hash_secret;
use ephemera_core::kind::{jwt, postgres, ssh, x509_svid, KindRequest};
use ephemera_core::types::{AuthMethod, Lease, LeaseState, Principal, SVID_ROLE};
use ephemera_core::Error;
use ephemera_policy::AdminAction;

use crate::authz::{CallerContext, POLICY_ATTEMPTS};
use crate::mint::Minted;
use crate::node::Node;

/// What a caller asks of a kind, as the transport received it.
#[derive(Debug, Clone)]
pub enum KindInput {
    Jwt(jwt::Request),
    /// A PKCS#10 CSR, PEM.
    X509Svid {
        csr_pem: String,
    },
    Ssh(ssh::Request),
    /// A PostgreSQL login (the role decides everything about it).
    Postgres,
}

/// An issuance request, as the transport received it.
#[derive(Debug, Clone)]
pub struct IssueInput {
    pub role: String,
    pub ttl_s: Option<u64>,
    pub purpose: Option<String>,
    pub request_id: Option<String>,
    pub subject: Option<String>,
    pub kind: KindInput,
}

/// How the caller authenticated, beyond its principal.
#[derive(Debug, Clone, Default)]
pub struct Presented {
    /// The join token the caller presented (its principal is the token's SPIFFE ID).
    pub join_token: Option<String>,
    /// The lease of the cluster-issued X.509-SVID the caller presented, if any: an SVID issued
    /// to the same identity supersedes it.
    pub svid_lease: Option<String>,
}

pub struct Issued {
    pub lease: Lease,
    pub replayed: bool,
    pub credential: Minted,
}

impl Node {
    /// Issues a credential of any kind through the one pipeline.
    pub async fn issue_credential(
        &self,
        actor: &Principal,
        presented: &Presented,
        caller: &CallerContext,
        input: IssueInput,
    ) -> Result<Issued, Error> {
        let (request, subject, supersedes) = self
            .prepare_request(actor, presented, caller, &input)
            .await?;
        // Without a caller's id, the node assigns one, so its own retries cannot double-issue.
        let request_id = input.request_id.or_else(|| {
            let mut b = [0u8; 16];
            self.fill_random(&mut b);
            Some(format!("srv-{}", hex::encode(b)))
        });
        let intent = IssueIntent {
            request_id,
            role: input.role,
            subject,
            ttl_s: input.ttl_s,
            purpose: input.purpose,
            request,
            join_token_hash: presented
                .join_token
                .as_deref()
                .map(|t| hash_secret(t).to_vec()),
            supersedes,
            context: caller.for_audit(),
            policy: None,
        };
        // Bad input is refused before any policy work.
        validate_intent(&Intent::Issue(intent.clone()))?;
        let outcome = self
            .propose_decided(actor, || async {
                let policy = self.decide_issue(actor, &intent, caller).await?;
                Ok(Intent::Issue(IssueIntent {
                    policy: Some(policy),
                    ..intent.clone()
                }))
            })
            .await?;
        let Outcome::Lease { lease, replayed } = outcome else {
            return Err(Error::Internal("issue did not return a lease".into()));
        };
        let credential = self.credential_of(&lease).await?;
        Ok(Issued {
            lease,
            replayed,
            credential,
        })
    }

    /// The credential of a lease that was just issued or renewed (the pipeline's last step,
    /// after commit), once it works: for a kind with an external part, once the login is
    /// created or its validity moved (`await_login`). A replayed request id returns the lease as
    /// it is now; a dead lease gets no credential.
    pub async fn credential_of(&self, lease: &Lease) -> Result<Minted, Error> {
        match lease.state {
            LeaseState::Revoked { .. } => Err(Error::LeaseRevoked(lease.id.clone())),
            LeaseState::Expired { .. } => Err(Error::LeaseExpired(lease.id.clone())),
            LeaseState::Active => {
                self.await_login(lease).await?;
                self.mint(lease)
            }
        }
    }

    /// The kind's part of the request, checked here where the libraries that parse it live:
    /// `(request, subject, superseded lease)`.
    async fn prepare_request(
        &self,
        actor: &Principal,
        presented: &Presented,
        caller: &CallerContext,
        input: &IssueInput,
    ) -> Result<(KindRequest, Option<String>, Option<String>), Error> {
        let join = actor.auth_method == AuthMethod::JoinToken;
        if join && (input.role != SVID_ROLE || !matches!(input.kind, KindInput::X509Svid { .. })) {
            return Err(Error::PermissionDenied(
                "a join token is redeemed only for an X.509-SVID".into(),
            ));
        }
        Ok(match &input.kind {
            KindInput::Jwt(r) => (KindRequest::Jwt(r.clone()), input.subject.clone(), None),
            KindInput::Postgres => (
                KindRequest::Postgres(postgres::Request {}),
                input.subject.clone(),
                None,
            ),
            KindInput::Ssh(r) => {
                let public_key = crate::mint::parse_public_key(&r.public_key)?;
                (
                    KindRequest::Ssh(ssh::Request {
                        public_key,
                        ..r.clone()
                    }),
                    input.subject.clone(),
                    None,
                )
            }
            KindInput::X509Svid { csr_pem } => {
                let csr = ephemera_pki::parse_csr(csr_pem)
                    .map_err(|e| Error::InvalidArgument(format!("invalid CSR: {e}")))?;
                let asked = csr.spiffe_id.as_ref().map(|id| id.to_string());
                let subject = match (&input.subject, &asked) {
                    (Some(s), Some(a)) if s != a => {
                        return Err(Error::InvalidArgument(format!(
                            "the CSR asks for {a} but the request names {s}"
                        )))
                    }
                    (s, a) => s.clone().or_else(|| a.clone()),
                };
                // Only an administrator obtains an SVID for another identity.
                if !join && subject.as_ref().is_some_and(|s| *s != actor.id) {
                    self.authorize_admin(actor, AdminAction::SvidIssueFor, caller)
                        .await?;
                }
                if let Some(s) = &subject {
                    self.refuse_admin_identity(s)?;
                }
                let rotating = subject.as_ref().is_none_or(|s| *s == actor.id)
                    && actor.auth_method == AuthMethod::X509Svid;
                (
                    KindRequest::X509Svid(x509_svid::Request {
                        public_key_der: csr.spki_der,
                    }),
                    subject,
                    presented.svid_lease.clone().filter(|_| rotating),
                )
            }
        })
    }

    /// Proposes the intent `decide` builds under a policy decision. If the policy changed
    /// before the command committed, this node catches up and decides again.
    pub async fn propose_decided<F, Fut>(
        &self,
        actor: &Principal,
        decide: F,
    ) -> Result<Outcome, Error>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<Intent, Error>>,
    {
        let mut attempt = 1;
        loop {
            let intent = decide().await?;
            let proposal = Proposal {
                actor: actor.clone(),
                intent,
            };
            match self.propose(proposal).await {
                Err(Error::PolicyChanged { active, .. }) if attempt < POLICY_ATTEMPTS => {
                    self.catch_up_policy(active).await;
                    attempt += 1;
                }
                result => return result.map(|(o, _)| o),
            }
        }
    }
}
