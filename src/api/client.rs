//! The HTTP/1.1 GET client of `margay status`: one request to the local endpoint over hyper's client
//! connection (hyper, hyper-util and http-body-util are built anyway, for axum and tonic).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{header, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::StatusReport;

/// Errors of the local API, server and client side, each naming the address and the likely fix.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("status endpoint: cannot listen on {addr}: {source} (is another margay running? set --http-listen)")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("status endpoint on {addr:?} stopped: {source}")]
    Serve {
        addr: Option<SocketAddr>,
        source: std::io::Error,
    },
    #[error("cannot reach the margay status endpoint at {addr}: {source}; is margay running on this host? (--endpoint to point elsewhere)")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("bad answer from the margay status endpoint at {addr}: {reason}")]
    BadAnswer { addr: SocketAddr, reason: String },
    #[error("cannot start the status client: {0}")]
    Runtime(std::io::Error),
}

/// GET `/status` from a running daemon (blocking: `margay status` has no runtime of its own).
pub fn fetch_status(addr: SocketAddr, timeout: Duration) -> Result<StatusReport, ApiError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ApiError::Runtime)?;
    let body = rt.block_on(get(addr, "/status", timeout))?;
    serde_json::from_slice(&body).map_err(|e| ApiError::BadAnswer {
        addr,
        reason: format!("status JSON: {e}"),
    })
}

/// One GET over a fresh HTTP/1.1 connection (hyper's client connection: no pool, nothing left behind).
async fn get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<Vec<u8>, ApiError> {
    let connect = |source| ApiError::Connect { addr, source };
    let hyper_err = |e: hyper::Error| connect(std::io::Error::other(e));
    let bad = |reason: String| ApiError::BadAnswer { addr, reason };
    let exchange = async {
        let stream = TcpStream::connect(addr).await.map_err(connect)?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(hyper_err)?;
        // The connection task ends with the exchange (Connection: close) or with our runtime.
        tokio::spawn(conn);
        let req = Request::get(path)
            .header(header::HOST, addr.to_string())
            .header(header::CONNECTION, "close")
            .header(header::ACCEPT, "application/json")
            .body(Empty::<Bytes>::new())
            .map_err(|e| bad(format!("request: {e}")))?;
        let resp = sender.send_request(req).await.map_err(hyper_err)?;
        if resp.status() != StatusCode::OK {
            return Err(bad(format!("HTTP status {:?}", resp.status().to_string())));
        }
        let body = resp.into_body().collect().await.map_err(hyper_err)?;
        Ok(body.to_bytes().to_vec())
    };
    tokio::time::timeout(timeout, exchange).await.map_err(|_| {
        connect(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer within {timeout:?}"),
        ))
    })?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{serve_on, ReadyState};
    use futures::FutureExt;
    use prometheus_client::registry::Registry;
    use std::sync::Arc;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn client_reads_what_server_serves() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let source = || {
            async {
                StatusReport {
                    role: "reflector".into(),
                    asn: 65000,
                    ready: ReadyState {
                        ready: false,
                        reason: Some("BGP initial convergence".into()),
                    },
                    ..Default::default()
                }
            }
            .boxed()
        };
        let server = tokio::spawn(serve_on(listener, source, Arc::new(Registry::default())));
        let report =
            tokio::task::spawn_blocking(move || fetch_status(addr, Duration::from_secs(5)))
                .await
                .unwrap()
                .unwrap();
        assert_eq!(report.asn, 65000);
        let ready = get(addr, "/readyz", Duration::from_secs(5)).await;
        match ready {
            Err(ApiError::BadAnswer { reason, .. }) => assert!(reason.contains("503"), "{reason}"),
            other => panic!("readyz should be 503, got {other:?}"),
        }
        server.abort();
        // Nobody listening: the error names the address and suggests the fix.
        let err =
            tokio::task::spawn_blocking(move || fetch_status(addr, Duration::from_millis(500)))
                .await
                .unwrap()
                .unwrap_err()
                .to_string();
        assert!(
            err.contains(&addr.to_string()) && err.contains("is margay running"),
            "{err}"
        );
    }
}
