//! A tiny blocking HTTP/1.1 GET client for `margay status`: one request to the local endpoint, no runtime.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

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
}

/// GET `/status` from a running daemon.
pub fn fetch_status(addr: SocketAddr, timeout: Duration) -> Result<StatusReport, ApiError> {
    let body = get(addr, "/status", timeout)?;
    serde_json::from_slice(&body).map_err(|e| ApiError::BadAnswer {
        addr,
        reason: format!("status JSON: {e}"),
    })
}

fn get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<Vec<u8>, ApiError> {
    let connect = |e| ApiError::Connect { addr, source: e };
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(connect)?;
    s.set_read_timeout(Some(timeout)).map_err(connect)?;
    s.set_write_timeout(Some(timeout)).map_err(connect)?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAccept: application/json\r\n\r\n"
    )
    .map_err(connect)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(connect)?;
    let bad = |reason: &str| ApiError::BadAnswer {
        addr,
        reason: reason.to_string(),
    };
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no HTTP header"))?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status_line = head.lines().next().unwrap_or_default();
    if !status_line.contains(" 200 ") {
        return Err(bad(&format!("HTTP status {status_line:?}")));
    }
    let mut body = raw[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body).ok_or_else(|| bad("bad chunked encoding"))?;
    }
    Ok(body)
}

fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = b.windows(2).position(|w| w == b"\r\n")?;
        let size_str = std::str::from_utf8(&b[..eol]).ok()?;
        let size = usize::from_str_radix(size_str.split(';').next()?.trim(), 16).ok()?;
        b = &b[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(b.get(..size)?);
        b = b.get(size + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{serve_on, ReadyState};
    use futures::FutureExt;
    use prometheus_client::registry::Registry;
    use std::sync::Arc;

    #[test]
    fn dechunk_reassembles() {
        assert_eq!(
            dechunk(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n").unwrap(),
            b"abcde"
        );
        assert!(dechunk(b"zz\r\n").is_none());
    }

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
        let ready =
            tokio::task::spawn_blocking(move || get(addr, "/readyz", Duration::from_secs(5)))
                .await
                .unwrap();
        match ready {
            Err(ApiError::BadAnswer { reason, .. }) => assert!(reason.contains("503"), "{reason}"),
            other => panic!("readyz should be 503, got {other:?}"),
        }
        server.abort();
        // Nobody listening: the error names the address and suggests the fix.
        let err = fetch_status(addr, Duration::from_millis(500))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&addr.to_string()) && err.contains("is margay running"),
            "{err}"
        );
    }
}
