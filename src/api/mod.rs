//! The local HTTP endpoint of `margay node` and `margay reflector`: `/healthz`, `/readyz`, `/metrics`
//! (Prometheus text) and `/status` (the JSON that `margay status` prints), plus the small blocking client the
//! CLI uses to read it.
//!
//! The API owns no state: every request asks the running parts through the [`StatusSource`] they registered,
//! so what `margay status` shows is the speaker's real state, never a cached copy.

mod client;
pub mod metrics;
mod status;
pub mod table;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures::future::BoxFuture;
use prometheus_client::registry::Registry;

use crate::task::Health;

pub use client::{fetch_status, ApiError};
pub use status::{
    render_status_table, DataplaneSummary, DatastoreSummary, FibSummary, GatewaySummary,
    IpamSummary, PeerStatus, ReadyState, StatusReport,
};

/// Default address of the local status endpoint (loopback only: it is for the node's own operators).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9190";

/// What the HTTP server asks the running daemon: the full status report and readiness.
pub trait StatusSource: Send + Sync + 'static {
    fn status(&self) -> BoxFuture<'static, StatusReport>;
}

impl<F> StatusSource for F
where
    F: Fn() -> BoxFuture<'static, StatusReport> + Send + Sync + 'static,
{
    fn status(&self) -> BoxFuture<'static, StatusReport> {
        self()
    }
}

struct Shared {
    source: Box<dyn StatusSource>,
    registry: Arc<Registry>,
    /// The supervisor's verdict on the daemon's tasks; without one `/healthz` only says the endpoint runs.
    health: Option<Health>,
}

/// Serve the endpoint on `listen` until the future is dropped. Binding errors come back at once, with the
/// address, so a port clash is reported instead of a silently missing endpoint.
pub async fn serve(
    listen: SocketAddr,
    source: impl StatusSource,
    registry: Arc<Registry>,
) -> Result<(), ApiError> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| ApiError::Bind {
            addr: listen,
            source: e,
        })?;
    serve_on(listener, source, registry).await
}

/// Serve on an already bound listener (tests bind port 0 and read the address back).
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    source: impl StatusSource,
    registry: Arc<Registry>,
) -> Result<(), ApiError> {
    serve_supervised(listener, source, registry, None).await
}

/// [`serve_on`] with `/healthz` answering from the daemon's task supervisor: 503 naming the task and why
/// when a supervised task ended or does not answer its heartbeat (see [`crate::task`]).
pub async fn serve_supervised(
    listener: tokio::net::TcpListener,
    source: impl StatusSource,
    registry: Arc<Registry>,
    health: Option<Health>,
) -> Result<(), ApiError> {
    let shared = Arc::new(Shared {
        source: Box::new(source),
        registry,
        health,
    });
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .with_state(shared);
    let addr = listener.local_addr().ok();
    axum::serve(listener, app)
        .await
        .map_err(|e| ApiError::Serve { addr, source: e })
}

async fn status(State(s): State<Arc<Shared>>) -> Json<StatusReport> {
    Json(s.source.status().await)
}

async fn healthz(State(s): State<Arc<Shared>>) -> Response {
    match s.health.as_ref().map_or(Ok(()), Health::check) {
        Ok(()) => (StatusCode::OK, "ok\n".to_string()).into_response(),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("unhealthy: {why}\n"),
        )
            .into_response(),
    }
}

async fn readyz(State(s): State<Arc<Shared>>) -> Response {
    let report = s.source.status().await;
    match report.ready {
        ReadyState { ready: true, .. } => (StatusCode::OK, "ready\n".to_string()).into_response(),
        ReadyState { reason, .. } => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "not ready: {}\n",
                reason.unwrap_or_else(|| "starting".into())
            ),
        )
            .into_response(),
    }
}

async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    let report = s.source.status().await;
    match metrics::encode(&s.registry, &report) {
        Ok(out) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            out,
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding metrics: {e}\n"),
        )
            .into_response(),
    }
}
