//! A minimal client of the Docker Engine API over its unix socket, for the network sync: inspect, list,
//! create and remove networks. HTTP/1.0 (one request per connection; the reply body runs to the close, so
//! it is never chunked). API version 1.41 (Docker 20.10); newer daemons serve it too.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const API: &str = "/v1.41";
/// Docker answers network calls after asking the plugins, which answer at once; a minute is generous.
const TIMEOUT: Duration = Duration::from_secs(60);
/// The largest reply we read (a network list of a busy host is a few hundred kB).
const MAX_REPLY: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("Docker API at {socket}: {source}; is dockerd running (--docker-host)?")]
    Io { socket: PathBuf, source: io::Error },
    #[error("Docker API {method} {path}: timed out after {TIMEOUT:?}")]
    Timeout { method: String, path: String },
    #[error("Docker API {method} {path}: HTTP {status}: {message}")]
    Status {
        method: String,
        path: String,
        status: u16,
        message: String,
    },
    #[error("Docker API {method} {path}: unreadable reply: {reason}")]
    BadReply {
        method: String,
        path: String,
        reason: String,
    },
}

/// A network as `GET /networks/{id}` shows it (the fields the sync needs).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct NetworkInfo {
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "Id")]
    pub id: String,
    #[serde(rename = "Driver")]
    pub driver: String,
    #[serde(rename = "EnableIPv6")]
    pub enable_ipv6: bool,
    #[serde(rename = "IPAM")]
    pub ipam: IpamInfo,
    #[serde(rename = "Options")]
    pub options: Option<BTreeMap<String, String>>,
    #[serde(rename = "Labels")]
    pub labels: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct IpamInfo {
    #[serde(rename = "Driver")]
    pub driver: String,
    #[serde(rename = "Options")]
    pub options: Option<BTreeMap<String, String>>,
    #[serde(rename = "Config")]
    pub config: Option<Vec<IpamConfig>>,
}

/// One `--subnet` (with what Docker recorded beside it).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct IpamConfig {
    #[serde(rename = "Subnet")]
    pub subnet: String,
}

/// The Docker daemon at a unix socket.
#[derive(Debug, Clone)]
pub struct Engine {
    socket: PathBuf,
}

/// Percent-encode a path segment or query value (network names are `[a-zA-Z0-9][a-zA-Z0-9_.-]`, ids hex;
/// anything else is encoded anyway).
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Split an HTTP/1.x reply into status and body.
fn parse_reply(raw: &[u8]) -> Result<(u16, &[u8]), String> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no end of headers")?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|e| e.to_string())?;
    let status_line = head.lines().next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    Ok((status, &raw[end + 4..]))
}

impl Engine {
    /// `unix:///path` or a plain path.
    pub fn new(host: &str) -> Engine {
        Engine {
            socket: PathBuf::from(host.strip_prefix("unix://").unwrap_or(host)),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Vec<u8>), EngineError> {
        let io_err = |source| EngineError::Io {
            socket: self.socket.clone(),
            source,
        };
        let work = async {
            let mut s = UnixStream::connect(&self.socket).await.map_err(io_err)?;
            let body = body.map(|b| b.to_string()).unwrap_or_default();
            let req = format!(
                "{method} {API}{path} HTTP/1.0\r\nHost: docker\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            s.write_all(req.as_bytes()).await.map_err(io_err)?;
            let mut raw = Vec::new();
            (&mut s)
                .take(MAX_REPLY)
                .read_to_end(&mut raw)
                .await
                .map_err(io_err)?;
            let (status, body) = parse_reply(&raw).map_err(|reason| EngineError::BadReply {
                method: method.into(),
                path: path.into(),
                reason,
            })?;
            Ok((status, body.to_vec()))
        };
        tokio::time::timeout(TIMEOUT, work)
            .await
            .map_err(|_| EngineError::Timeout {
                method: method.into(),
                path: path.into(),
            })?
    }

    fn status_error(method: &str, path: &str, status: u16, body: &[u8]) -> EngineError {
        let message = serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|v| v["message"].as_str().map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_string());
        EngineError::Status {
            method: method.into(),
            path: path.into(),
            status,
            message,
        }
    }

    fn decode<T: serde::de::DeserializeOwned>(
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Result<T, EngineError> {
        serde_json::from_slice(body).map_err(|e| EngineError::BadReply {
            method: method.into(),
            path: path.into(),
            reason: e.to_string(),
        })
    }

    /// `GET /networks/{id or name}`; None when Docker has no such network.
    pub async fn network(&self, id: &str) -> Result<Option<NetworkInfo>, EngineError> {
        let path = format!("/networks/{}", encode(id));
        match self.call("GET", &path, None).await? {
            (200, body) => Ok(Some(Self::decode("GET", &path, &body)?)),
            (404, _) => Ok(None),
            (status, body) => Err(Self::status_error("GET", &path, status, &body)),
        }
    }

    /// `GET /networks`: every network of the daemon.
    pub async fn networks(&self) -> Result<Vec<NetworkInfo>, EngineError> {
        let path = "/networks";
        match self.call("GET", path, None).await? {
            (200, body) => Self::decode("GET", path, &body),
            (status, body) => Err(Self::status_error("GET", path, status, &body)),
        }
    }

    /// `POST /networks/create`; Ok(false) when a network of that name exists already.
    pub async fn create_network(&self, spec: &Value) -> Result<bool, EngineError> {
        let path = "/networks/create";
        match self.call("POST", path, Some(spec)).await? {
            (200 | 201, _) => Ok(true),
            (409, _) => Ok(false),
            (status, body) => Err(Self::status_error("POST", path, status, &body)),
        }
    }

    /// `DELETE /networks/{name}`; Ok(false) when it was already gone.
    pub async fn remove_network(&self, name: &str) -> Result<bool, EngineError> {
        let path = format!("/networks/{}", encode(name));
        match self.call("DELETE", &path, None).await? {
            (200 | 204, _) => Ok(true),
            (404, _) => Ok(false),
            (status, body) => Err(Self::status_error("DELETE", &path, status, &body)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_and_encoding() {
        let (s, b) =
            parse_reply(b"HTTP/1.0 404 Not Found\r\nA: b\r\n\r\n{\"message\":\"x\"}").unwrap();
        assert_eq!((s, b), (404, &b"{\"message\":\"x\"}"[..]));
        assert!(parse_reply(b"HTTP/1.0 200 OK\r\n").is_err());
        assert_eq!(encode("net 1/x"), "net%201%2Fx");
        let e = Engine::status_error("GET", "/x", 500, br#"{"message":"boom"}"#);
        assert!(e.to_string().contains("HTTP 500: boom"));
    }
}
