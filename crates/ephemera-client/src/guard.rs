//! A lease tied to a scope, as `ephemera exec` ties one to a process: revoked when the scope
//! ends.
//!
//! `release().await` revokes and reports the outcome; that is the way to end a task. Dropping
//! the guard instead (an early return, a panic unwinding) spawns the revocation on the current
//! Tokio runtime: best effort, since a runtime that is shutting down may not run it, and then
//! the credential's TTL is what bounds it, as for a `kill -9` of `ephemera exec`.

use std::sync::Arc;

use crate::{pb, Client, ClientError};

/// Revokes its lease when released or dropped.
pub struct LeaseGuard {
    client: Arc<Client>,
    lease_id: String,
    released: bool,
}

impl LeaseGuard {
    pub fn new(client: Arc<Client>, lease_id: String) -> Self {
        LeaseGuard {
            client,
            lease_id,
            released: false,
        }
    }

    pub fn lease_id(&self) -> &str {
        &self.lease_id
    }

    /// Revokes the lease now.
    /// Revokes the lease now. If this future is dropped before it finishes, or the revocation
    /// fails, the guard's drop tries again.
    pub async fn release(mut self) -> Result<(), ClientError> {
        let result = self
            .client
            .revoke(revoke_request(&self.lease_id))
            .await
            .map(|_| ());
        self.released = result.is_ok();
        result
    }
}

fn revoke_request(lease_id: &str) -> pb::RevokeRequest {
    pb::RevokeRequest {
        target: Some(pb::revoke_request::Target::LeaseId(lease_id.to_string())),
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let client = self.client.clone();
        let req = revoke_request(&self.lease_id);
        runtime.spawn(async move {
            let _ = client.revoke(req).await;
        });
    }
}

impl Client {
    /// Issues a credential whose lease ends with the returned guard.
    pub async fn issue_guarded(
        self: &Arc<Self>,
        req: pb::IssueRequest,
    ) -> Result<(pb::Credential, LeaseGuard), ClientError> {
        let cred = self.issue(req).await?;
        let guard = LeaseGuard::new(self.clone(), cred.lease_id.clone());
        Ok((cred, guard))
    }
}
