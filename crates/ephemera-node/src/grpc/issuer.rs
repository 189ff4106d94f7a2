//! The `Issuer` service: credentials of every kind, through the one pipeline.

use super::*;

#[tonic::async_trait]
impl pb::issuer_server::Issuer for Api {
    type WatchRevocationsStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = crate::revocation_watch::Event> + Send>>;

    async fn exchange(
        &self,
        req: Request<pb::ExchangeRequest>,
    ) -> Result<Response<pb::ExchangeResponse>, Status> {
        use crate::exchange::{ExchangeError, ExchangeRequest, GRANT_TYPE};
        let actor = self.caller_of(&req)?;
        let caller = caller(&req);
        let r = req.into_inner();
        let form = ExchangeRequest {
            grant_type: GRANT_TYPE.into(),
            subject_token: r.subject_token,
            subject_token_type: r.subject_token_type,
            actor_token: r.actor_token,
            actor_token_type: r.actor_token_type,
            audience: r.audience,
            resource: r.resource,
            scope: r.scope,
            requested_token_type: r.requested_token_type,
            role: r.role,
        };
        match self.node.exchange_token(&actor, &caller, form).await {
            Ok(x) => Ok(Response::new(pb::ExchangeResponse {
                access_token: x.access_token,
                issued_token_type: x.issued_token_type.into(),
                token_type: "Bearer".into(),
                expires_in: x.expires_in,
                scope: x.scope,
                lease_id: x.lease.id,
            })),
            Err(ExchangeError::Other(e)) => Err(self.fail(e)),
            Err(e) => {
                let code = e.oauth_code().unwrap_or("invalid_request");
                let message = format!("{code}: {e}");
                Err(match e {
                    ExchangeError::InvalidGrant(_) | ExchangeError::UnauthorizedClient(_) => {
                        Status::permission_denied(message)
                    }
                    _ => Status::invalid_argument(message),
                })
            }
        }
    }

    async fn watch_revocations(
        &self,
        req: Request<pb::WatchRevocationsRequest>,
    ) -> Result<Response<Self::WatchRevocationsStream>, Status> {
        self.caller_of(&req)?;
        let from = req.into_inner().from_seq;
        let slot = self
            .node
            .watchers
            .clone()
            .try_acquire_owned()
            .map_err(|_| {
                self.fail(Error::Unavailable(format!(
                    "this node serves {} revocation watches already; try another",
                    crate::revocation_watch::MAX_WATCHERS
                )))
            })?;
        // A resume point the cluster has not reached is a mistake, not a wait.
        self.node.read_barrier().await.map_err(|e| self.fail(e))?;
        let last = state::last_revocation_seq(&self.node.view)
            .map_err(|e| self.fail(Error::Internal(e.to_string())))?;
        if from > last {
            return Err(self.fail(Error::InvalidArgument(format!(
                "from_seq {from} is ahead of the latest revocation ({last})"
            ))));
        }
        let (tx, mut rx) = crate::revocation_watch::channel();
        tokio::spawn(crate::revocation_watch::feed(
            crate::revocation_watch::NodeLog::new(self.node.clone()),
            from,
            tx,
            crate::revocation_watch::PACE,
            slot,
        ));
        let stream = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
        Ok(Response::new(Box::pin(stream)))
    }

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
        let presented = self.presented(&req, &actor, true);
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
        let presented = self.presented(
            &req,
            &actor,
            matches!(
                req.get_ref().kind,
                Some(pb::issue_request::Kind::X509Svid(_))
            ),
        );
        let mut caller = caller(&req);
        let r = req.into_inner();
        caller.environment = r.environment;
        caller.job_id = r.job_id;
        let jwt_fields = !r.scopes.is_empty() || r.audience.is_some();
        // Without a kind, a request for a postgres role that asks nothing of a JWT is for
        // its login (`apply` checks the role's kind again, on the committed role).
        let postgres_role = r.kind.is_none()
            && !jwt_fields
            && matches!(
                state::get_role(&self.node.view, &r.role),
                Ok(Some(Role {
                    spec: RoleSpec::Postgres(_),
                    ..
                }))
            );
        let kind = match r.kind {
            None if postgres_role => KindInput::Postgres,
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
            Some(pb::issue_request::Kind::Postgres(_)) => KindInput::Postgres,
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
        if let Some(refusal) = self
            .node
            .refuse_renewal_locally(&actor, &intent.lease_id, &intent.context)
            .await
            .map_err(|e| self.fail(e))?
        {
            return Err(self.fail(refusal));
        }
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
        let credential = self
            .node
            .credential_of(&lease)
            .await
            .map_err(|e| self.fail(e))?;
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
            Some(Target::Connection(c)) => RevokeTarget::Connection(c),
            None => {
                return Err(self.fail(Error::InvalidArgument(
                    "one of lease_id, subject, role, kid or connection is required".into(),
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
            Some((c, lease)) => pb::IntrospectResponse {
                active: true,
                act: c.act.as_ref().map(|a| a.chain()).unwrap_or_default(),
                parent_lease_id: lease.parent.unwrap_or_default(),
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
            if !state::effects::LEASE_STATES.contains(&s.as_str()) {
                return Err(self.fail(Error::InvalidArgument(format!(
                    "state {s:?} must be one of {}",
                    state::effects::LEASE_STATES.join(", ")
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
        let internal = |e: ephemera_core::StorageError| to_status(Error::Internal(e.to_string()));
        let (leases, next) =
            state::list_leases(&self.node.view, &filter, after, page_size).map_err(internal)?;
        let leases = leases
            .into_iter()
            .map(|l| {
                let status = state::effects::lease_status(&self.node.view, &l)?;
                Ok(lease_to_pb(l, status))
            })
            .collect::<Result<_, ephemera_core::StorageError>>()
            .map_err(internal)?;
        Ok(Response::new(pb::ListLeasesResponse {
            leases,
            next_page_token: next.unwrap_or_default(),
        }))
    }
}
