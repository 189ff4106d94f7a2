//! The HTTP listener: JWKS, RFC 8414 metadata, RFC 7662 introspection, metrics and health.

use std::fmt::Write;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Extension, Form, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use ephemera_core::state;
use ephemera_core::{Error, ErrorCode};
use serde::Deserialize;
use serde_json::json;

use crate::conn::{Conn, ConnInfo};
use crate::node::{Node, KEY_PUBLISH_GRACE_MS};

/// Serves `router` on every accepted connection (plain or TLS) until `stop` resolves; each
/// request carries its connection's [`ConnInfo`] as an extension.
pub async fn serve(
    incoming: impl futures::Stream<Item = std::io::Result<Conn>>,
    limits: &crate::conn::ListenerLimits,
    router: Router,
    stop: impl std::future::Future<Output = ()>,
) {
    let header_timeout = Duration::from_millis(limits.http_header_timeout_ms);
    let idle_timeout = Duration::from_millis(limits.http_idle_timeout_ms);
    use futures::StreamExt;
    use tonic::transport::server::Connected;
    tokio::pin!(incoming);
    tokio::pin!(stop);
    loop {
        let conn = tokio::select! {
            c = incoming.next() => c,
            _ = &mut stop => return,
        };
        let Some(Ok(conn)) = conn else { return };
        let service = router.clone().layer(Extension(conn.connect_info()));
        let activity = conn.activity();
        tokio::spawn(async move {
            let service = hyper_util::service::TowerToHyperService::new(service);
            let mut builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            // A client that trickles its headers (or holds a keep-alive connection without
            // sending the next request) is disconnected after the header deadline.
            builder
                .http1()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout);
            let served = builder.serve_connection(hyper_util::rt::TokioIo::new(conn), service);
            tokio::select! {
                r = served => if let Err(e) = r {
                    tracing::debug!(error = %e, "http connection ended with an error");
                },
                _ = activity.idle_for(idle_timeout) => {
                    tracing::debug!("closed an idle http connection");
                }
            }
        });
    }
}

/// Introspection forms and everything else we accept are small.
pub const MAX_HTTP_BODY_BYTES: usize = 16 * 1024;

/// Every route the router serves, as the method table names them (a test checks each has a
/// row; a route without one is refused by the gate).
pub const ROUTES: &[&str] = &[
    "GET /.well-known/jwks.json",
    "GET /.well-known/oauth-authorization-server",
    "POST /oauth2/introspect",
    "POST /oauth2/token",
    "GET /v1/ssh/ca.pub",
    "GET /v1/ssh/krl",
    "GET /metrics",
    "GET /healthz",
    "GET /readyz",
];

pub fn router(node: Arc<Node>) -> Router {
    Router::new()
        .route("/.well-known/jwks.json", get(jwks))
        .route("/.well-known/oauth-authorization-server", get(metadata))
        .route("/oauth2/introspect", post(introspect))
        .route("/oauth2/token", post(token_exchange))
        .route("/v1/ssh/ca.pub", get(ssh_ca))
        .route("/v1/ssh/krl", get(ssh_krl))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        // The method table: every request is admitted by its route's row, or refused.
        .layer(axum::middleware::from_fn_with_state(
            node.clone(),
            crate::methods::http_gate,
        ))
        .layer(DefaultBodyLimit::max(MAX_HTTP_BODY_BYTES))
        .with_state(node)
}

/// The one place domain errors become HTTP responses (OAuth-style error bodies).
pub fn error_response(e: Error) -> Response {
    let (status, oauth_error) = match e.code() {
        ErrorCode::InvalidArgument => (StatusCode::BAD_REQUEST, "invalid_request"),
        ErrorCode::NotFound => (StatusCode::NOT_FOUND, "not_found"),
        ErrorCode::AlreadyExists => (StatusCode::CONFLICT, "conflict"),
        ErrorCode::FailedPrecondition => (StatusCode::CONFLICT, "failed_precondition"),
        ErrorCode::Unauthenticated => (StatusCode::UNAUTHORIZED, "invalid_token"),
        ErrorCode::PermissionDenied => (StatusCode::FORBIDDEN, "insufficient_scope"),
        ErrorCode::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable"),
        ErrorCode::OutcomeUnknown => (StatusCode::GATEWAY_TIMEOUT, "temporarily_unavailable"),
        ErrorCode::ResourceExhausted => (StatusCode::TOO_MANY_REQUESTS, "slow_down"),
        ErrorCode::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "server_error"),
        ErrorCode::Unimplemented => (StatusCode::NOT_FOUND, "not_found"),
    };
    let description = if status == StatusCode::INTERNAL_SERVER_ERROR {
        tracing::error!(error = %e, "internal error");
        "internal error; see the node's log".to_string()
    } else {
        e.to_string()
    };
    let retry_after_s = e.retry_after_ms().map(|ms| ms.div_ceil(1000).max(1));
    let mut resp = (
        status,
        Json(json!({"error": oauth_error, "error_description": description})),
    )
        .into_response();
    if let Some(s) = retry_after_s {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from(s));
    }
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
    }
    resp
}

async fn jwks(State(node): State<Arc<Node>>) -> Response {
    let now = node.clock.now_ms();
    match state::list_keys(&node.view) {
        Ok(keys) => {
            let keys: Vec<_> = keys
                .iter()
                .filter(|k| k.is_published_at(now, KEY_PUBLISH_GRACE_MS))
                .map(|k| ephemera_core::token::jwk(&k.kid, &k.public_key))
                .collect();
            // Short cache: a revoked key must leave verifiers' caches quickly.
            (
                [(header::CACHE_CONTROL, "max-age=30")],
                Json(json!({ "keys": keys })),
            )
                .into_response()
        }
        Err(e) => error_response(Error::Internal(e.to_string())),
    }
}

async fn metadata(State(node): State<Arc<Node>>) -> Response {
    match node.issuer() {
        Ok(issuer) => {
            let base = issuer.trim_end_matches('/');
            Json(json!({
                "issuer": issuer,
                "jwks_uri": format!("{base}/.well-known/jwks.json"),
                "introspection_endpoint": format!("{base}/oauth2/introspect"),
                "introspection_endpoint_auth_methods_supported": ["tls_client_auth", "bearer"],
                "token_endpoint": format!("{base}/oauth2/token"),
                "token_endpoint_auth_methods_supported": ["tls_client_auth", "bearer"],
                "grant_types_supported": [crate::exchange::GRANT_TYPE],
                "token_endpoint_auth_signing_alg_values_supported": ["EdDSA"],
                "response_types_supported": [],
            }))
            .into_response()
        }
        Err(e) => error_response(e),
    }
}

#[derive(Deserialize)]
struct IntrospectForm {
    token: String,
    #[allow(dead_code)]
    token_type_hint: Option<String>,
}

async fn introspect(
    State(node): State<Arc<Node>>,
    Extension(conn): Extension<ConnInfo>,
    Extension(gated): Extension<crate::methods::Gated>,
    form: Option<Form<IntrospectForm>>,
) -> Response {
    // The method table's gate authenticated the caller.
    let Some(principal) = gated.principal else {
        return error_response(Error::Internal(
            "introspection was not authenticated".into(),
        ));
    };
    let Some(Form(form)) = form else {
        return error_response(Error::InvalidArgument(
            "expected an application/x-www-form-urlencoded body with a `token` field".into(),
        ));
    };
    let caller = crate::authz::CallerContext::from_addr(conn.remote);
    match node.introspect(&principal, &caller, &form.token).await {
        Ok(Some((c, lease))) => {
            let mut body = json!({
                "active": true,
                "iss": c.iss, "sub": c.sub, "aud": c.aud, "exp": c.exp, "iat": c.iat, "nbf": c.nbf,
                "jti": c.jti, "scope": c.scope, "client_id": c.client_id, "token_type": "Bearer",
            });
            // An exchanged token: `act` exactly as the token carries it, and where it came from.
            if let Some(act) = &c.act {
                body["act"] = json!(act);
            }
            if let Some(parent) = &lease.parent {
                body["parent_lease_id"] = json!(parent);
            }
            Json(body).into_response()
        }
        // RFC 7662 §2.2: a token that is malformed, unknown or dead is simply not active.
        Ok(None) | Err(Error::InvalidArgument(_)) => Json(json!({"active": false})).into_response(),
        Err(e) => error_response(e),
    }
}

/// RFC 8693 token exchange. Refusals are RFC 6749 §5.2 error bodies (400, `no-store`); an
/// error of the cluster itself (unavailable, rate limited) is mapped as on every route.
async fn token_exchange(
    State(node): State<Arc<Node>>,
    Extension(conn): Extension<ConnInfo>,
    Extension(gated): Extension<crate::methods::Gated>,
    form: Result<Form<crate::exchange::ExchangeRequest>, axum::extract::rejection::FormRejection>,
) -> Response {
    use crate::exchange::ExchangeError;
    let Some(principal) = gated.principal else {
        return error_response(Error::Internal("the exchange was not authenticated".into()));
    };
    let no_store = || [(header::CACHE_CONTROL, "no-store")];
    let refuse = |e: ExchangeError| match e.oauth_code() {
        Some(code) => (
            StatusCode::BAD_REQUEST,
            no_store(),
            Json(json!({"error": code, "error_description": e.to_string()})),
        )
            .into_response(),
        None => match e {
            ExchangeError::Other(e) => error_response(e),
            _ => unreachable!("every other refusal has an RFC code"),
        },
    };
    let form = match form {
        Ok(Form(f)) => f,
        Err(e) => {
            return refuse(ExchangeError::InvalidRequest(format!(
                "expected an application/x-www-form-urlencoded body with the RFC 8693 \
                 parameters: {e}"
            )))
        }
    };
    let caller = crate::authz::CallerContext::from_addr(conn.remote);
    match node.exchange_token(&principal, &caller, form).await {
        Ok(x) => (
            no_store(),
            Json(json!({
                "access_token": x.access_token,
                "issued_token_type": x.issued_token_type,
                "token_type": "Bearer",
                "expires_in": x.expires_in,
                "scope": x.scope,
            })),
        )
            .into_response(),
        Err(e) => refuse(e),
    }
}

/// The SSH CA public keys `sshd` should trust (`TrustedUserCAKeys`, `@cert-authority`): the
/// active key and retired ones whose certificates are still valid. Public; no authentication.
async fn ssh_ca(State(node): State<Arc<Node>>) -> Response {
    match state::published_ssh_cas(&node.view) {
        Ok(keys) if keys.is_empty() => error_response(Error::Unavailable(
            "the cluster has no SSH CA yet; retry shortly".into(),
        )),
        Ok(keys) => (
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            crate::mint::ssh_ca_lines(&keys),
        )
            .into_response(),
        Err(e) => error_response(Error::Internal(e.to_string())),
    }
}

/// The OpenSSH KRL for `RevokedKeys`. Linearizable: after a read barrier, so a revocation
/// acknowledged by any node is in every KRL fetched afterwards; the bytes are a function of the
/// applied state, the same on every node. Public, like the CA keys.
async fn ssh_krl(State(node): State<Arc<Node>>) -> Response {
    if let Err(e) = node.read_barrier().await {
        return error_response(e);
    }
    match state::ssh_krl(&node.view) {
        Ok(krl) => (
            [
                (header::CONTENT_TYPE, "application/octet-stream".to_string()),
                (
                    header::HeaderName::from_static("x-ephemera-krl-version"),
                    krl.version.to_string(),
                ),
            ],
            krl.encode(),
        )
            .into_response(),
        Err(e) => error_response(Error::Internal(e.to_string())),
    }
}

async fn metrics(State(node): State<Arc<Node>>) -> Response {
    let m = node.raft.metrics().borrow().clone();
    let mut out = String::new();
    let gauges = [
        ("ephemera_raft_term", m.current_term, "Current Raft term"),
        (
            "ephemera_raft_last_log_index",
            m.last_log_index.unwrap_or(0),
            "Last log index",
        ),
        (
            "ephemera_raft_applied_index",
            m.last_applied.map_or(0, |l| l.index),
            "Last applied index",
        ),
        (
            "ephemera_raft_leader_id",
            m.current_leader.unwrap_or(0),
            "Current leader (0: none)",
        ),
        (
            "ephemera_raft_is_leader",
            u64::from(m.current_leader == Some(node.id)),
            "1 if this node leads",
        ),
        (
            "ephemera_raft_snapshot_index",
            m.snapshot.map_or(0, |l| l.index),
            "Index of the last snapshot",
        ),
        (
            "ephemera_raft_purged_index",
            m.purged.map_or(0, |l| l.index),
            "Log entries up to this index are compacted into the snapshot",
        ),
    ];
    for (name, v, help) in gauges {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
    }
    let (storm, rate, baseline) = node.guard.storm_state();
    let guard_gauges = [
        (
            "ephemera_clock_offset_ms",
            node.guard.clock_offset() as f64,
            "This node's clock minus the leader's, as last measured",
        ),
        (
            "ephemera_renewal_storm",
            f64::from(u8::from(storm)),
            "1 while the leader mitigates a renewal storm",
        ),
        (
            "ephemera_renewal_rate_per_s",
            rate,
            "Renewals per second seen by the leader (last second)",
        ),
        (
            "ephemera_renewal_baseline_per_s",
            baseline,
            "The leader's moving baseline of renewals per second",
        ),
    ];
    for (name, v, help) in guard_gauges {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
    }
    let _ = writeln!(
        out,
        "# HELP ephemera_anomalies_total Anomalies the detector flagged while this node led\n# TYPE ephemera_anomalies_total counter"
    );
    for (kind, n) in node.guard.anomaly_counts() {
        let _ = writeln!(out, "ephemera_anomalies_total{{kind=\"{kind}\"}} {n}");
    }
    node.metrics.render(&mut out);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

/// How long the readiness check waits for its read barrier.
const READY_DEADLINE: Duration = Duration::from_secs(2);

/// Ready: a member of an initialised cluster, clock within bound, and a read barrier completes
/// within [`READY_DEADLINE`]: a leader confirmed its leadership with a quorum, and this node has
/// applied everything committed before the check. So a node cut off from the leader, a leader
/// cut off from its quorum, and a node still catching up are not ready. (Liveness is
/// `/healthz`: the process answers.)
async fn readyz(State(node): State<Arc<Node>>) -> Response {
    let m = node.raft.metrics().borrow().clone();
    let reason = if node.issuer().is_err() {
        Some("not part of an initialised cluster".to_string())
    } else if m.current_leader.is_none() {
        Some("no leader".to_string())
    } else if m
        .membership_config
        .membership()
        .get_node(&node.id)
        .is_none()
    {
        Some("not a member".to_string())
    } else if let Err(e) = node.check_clock() {
        Some(e.to_string())
    } else {
        match tokio::time::timeout(READY_DEADLINE, node.read_barrier()).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("not caught up with a leader: {e}")),
            Err(_) => Some(format!(
                "no leader confirmed this node's state within {} s",
                READY_DEADLINE.as_secs()
            )),
        }
    };
    match reason {
        None => (StatusCode::OK, "ready\n").into_response(),
        Some(r) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {r}\n")).into_response(),
    }
}
