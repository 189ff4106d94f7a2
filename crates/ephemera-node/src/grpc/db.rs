//! The Admin service's database methods: connections and abandoning a lease's effects. The
//! node does the work (`crate::db`); this maps the wire to it and back.

use super::*;
use crate::db::ConnectionInput;
use ephemera_core::state::{DbConnection, SslMode};

fn connection_to_pb(c: DbConnection, live_leases: u64) -> pb::DbConnection {
    pb::DbConnection {
        root_rotation_pending: c.pending_sealed_password.is_some(),
        name: c.name,
        host: c.host,
        port: u32::from(c.port),
        database: c.database,
        user: c.user,
        sslmode: c.sslmode.as_str().to_string(),
        ca_pem: c.ca_pem.unwrap_or_default(),
        updated_at_ms: c.updated_ms,
        live_leases,
    }
}

impl Api {
    fn connection_pb(&self, c: DbConnection) -> Result<pb::DbConnection, Status> {
        let live = state::effects::holders(&self.node.view, &postgres::target_of(&c.name))
            .map_err(|e| to_status(Error::Internal(e.to_string())))?
            .len() as u64;
        Ok(connection_to_pb(c, live))
    }

    pub(super) async fn db_put(
        &self,
        req: Request<pb::PutDbConnectionRequest>,
    ) -> Result<Response<pb::DbConnection>, Status> {
        let actor = self.caller_of(&req)?;
        let r = req.into_inner();
        let bad = |m: String| self.fail(Error::InvalidArgument(m));
        let port = u16::try_from(r.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| bad(format!("port {} is not a TCP port", r.port)))?;
        let sslmode = if r.sslmode.is_empty() {
            SslMode::VerifyFull
        } else {
            SslMode::parse(&r.sslmode).ok_or_else(|| {
                bad(format!(
                    "sslmode {:?} must be verify-full, require or disable",
                    r.sslmode
                ))
            })?
        };
        let input = ConnectionInput {
            name: r.name,
            target: ephemera_postgres::Connection {
                host: r.host,
                port,
                database: r.database,
                user: r.user,
                password: zeroize::Zeroizing::new(r.password),
                sslmode,
                ca_pem: (!r.ca_pem.is_empty()).then_some(r.ca_pem),
            },
        };
        let c = self
            .node
            .put_db_connection(&actor, input)
            .await
            .map_err(|e| self.fail(e))?;
        Ok(Response::new(self.connection_pb(c)?))
    }

    pub(super) async fn db_get(
        &self,
        req: Request<pb::GetDbConnectionRequest>,
    ) -> Result<Response<pb::DbConnection>, Status> {
        let actor = self.caller_of(&req)?;
        let name = req.get_ref().name.clone();
        self.read_audit(&req, &actor, &format!("db:{name}")).await?;
        let c = self
            .node
            .db_connection_now(&name)
            .map_err(|e| self.fail(e))?;
        Ok(Response::new(self.connection_pb(c)?))
    }

    pub(super) async fn db_list(
        &self,
        req: Request<pb::ListDbConnectionsRequest>,
    ) -> Result<Response<pb::ListDbConnectionsResponse>, Status> {
        let actor = self.caller_of(&req)?;
        self.read_audit(&req, &actor, "").await?;
        let connections = state::db_connections(&self.node.view)
            .map_err(|e| to_status(Error::Internal(e.to_string())))?
            .into_iter()
            .map(|c| self.connection_pb(c))
            .collect::<Result<_, _>>()?;
        Ok(Response::new(pb::ListDbConnectionsResponse { connections }))
    }

    pub(super) async fn db_delete(
        &self,
        req: Request<pb::DeleteDbConnectionRequest>,
    ) -> Result<Response<pb::DeleteDbConnectionResponse>, Status> {
        let actor = self.caller_of(&req)?;
        let r = req.into_inner();
        self.propose(
            actor,
            Intent::DeleteDbConnection {
                name: r.name,
                force: r.force,
            },
        )
        .await?;
        Ok(Response::new(pb::DeleteDbConnectionResponse {}))
    }

    pub(super) async fn db_rotate_root(
        &self,
        req: Request<pb::RotateDbRootRequest>,
    ) -> Result<Response<pb::DbConnection>, Status> {
        let actor = self.caller_of(&req)?;
        let name = req.into_inner().name;
        let c = self
            .node
            .rotate_db_root(&actor, &name)
            .await
            .map_err(|e| self.fail(e))?;
        Ok(Response::new(self.connection_pb(c)?))
    }

    pub(super) async fn lease_abandon(
        &self,
        req: Request<pb::AbandonLeaseRequest>,
    ) -> Result<Response<pb::AbandonLeaseResponse>, Status> {
        let actor = self.caller_of(&req)?;
        let r = req.into_inner();
        self.propose(
            actor,
            Intent::AbandonLease {
                lease_id: r.lease_id,
                reason: r.reason,
            },
        )
        .await?;
        Ok(Response::new(pb::AbandonLeaseResponse {}))
    }
}
