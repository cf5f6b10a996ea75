//! The shim <-> daemon protocol over the unix socket, and the blocking client the shim uses.
//!
//! One connection carries one exchange: the shim writes one JSON [`Request`] and shuts down its write half;
//! the daemon reads to end of file, answers with one JSON [`Response`] and closes. Both carry `protocol`
//! ([`PROTOCOL_VERSION`]) so a shim and a daemon from different releases (during a DaemonSet rollout the
//! install-cni container may not have replaced the binary yet) fail with a clear error, not a parse error.
//!
//! Like `types`, this file depends on `std`, `serde` and `serde_json` only: the shim links it.
//!
//! The DEL spool lives here too: when the daemon is not reachable, the shim records the DEL in a directory
//! next to the socket, and the daemon replays it when it starts (see `server`).

use std::fmt;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::types::{
    codes, CniArgs, CniError, CniResult, HostVethConf, NetConf, PoolRef, ValidAttachment,
};

/// Version of this protocol. Bump it when a field changes meaning; additions with serde defaults do not.
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest request or response either side reads.
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;
/// Name of the DEL spool directory, beside the socket.
pub const SPOOL_DIR_NAME: &str = "pending-del";

/// The CNI operations that reach the daemon (VERSION is answered by the shim alone).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Gc,
}

impl Command {
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Status => "STATUS",
            Command::Gc => "GC",
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the shim sends: the CNI environment and the parsed configuration, nothing left to re-parse.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub protocol: u32,
    pub command: Command,
    /// CNI_CONTAINERID (absent for STATUS and GC).
    #[serde(default)]
    pub container_id: Option<String>,
    /// CNI_NETNS (absent for STATUS, GC, and a DEL whose netns is gone).
    #[serde(default)]
    pub netns: Option<String>,
    /// CNI_IFNAME.
    #[serde(default)]
    pub ifname: Option<String>,
    /// CNI_ARGS.
    #[serde(default)]
    pub args: CniArgs,
    /// The network name from the configuration.
    pub network: String,
    #[serde(default)]
    pub mtu: Option<u32>,
    #[serde(default)]
    pub ipv4_pools: Vec<PoolRef>,
    #[serde(default)]
    pub ipv6_pools: Vec<PoolRef>,
    #[serde(default)]
    pub prev_result: Option<CniResult>,
    #[serde(default)]
    pub runtime_config: Option<Value>,
    /// GC: attachments the runtime still uses. `None` (the key was absent) is refused for GC: it must never
    /// read as "nothing is valid" and release every pod of the node.
    #[serde(default)]
    pub valid_attachments: Option<Vec<ValidAttachment>>,
    /// The chained host-veth mode and its settings (absent: the usual mode). An addition with a serde
    /// default, so the protocol version stays; a daemon older than the mode would read it as a primary ADD
    /// (and refuse it: a pod interface named CNI_IFNAME already exists).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_veth: Option<HostVethConf>,
}

impl Request {
    /// Build a request from what the shim parsed.
    pub fn new(
        command: Command,
        container_id: Option<String>,
        netns: Option<String>,
        ifname: Option<String>,
        args: CniArgs,
        conf: &NetConf,
    ) -> Request {
        Request {
            protocol: PROTOCOL_VERSION,
            command,
            container_id,
            netns,
            ifname,
            args,
            network: conf.name.clone(),
            mtu: conf.mtu,
            ipv4_pools: conf.ipv4_pools.clone(),
            ipv6_pools: conf.ipv6_pools.clone(),
            prev_result: conf.prev_result.clone(),
            runtime_config: conf.runtime_config.clone(),
            valid_attachments: conf.valid_attachments.clone(),
            host_veth: conf.host_veth.clone(),
        }
    }
}

/// The daemon's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub protocol: u32,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Success; ADD carries the result (already merged with any prevResult), the others none.
    Ok {
        result: Option<CniResult>,
    },
    Error(CniError),
}

impl Response {
    pub fn ok(result: Option<CniResult>) -> Response {
        Response {
            protocol: PROTOCOL_VERSION,
            outcome: Outcome::Ok { result },
        }
    }
    pub fn error(e: CniError) -> Response {
        Response {
            protocol: PROTOCOL_VERSION,
            outcome: Outcome::Error(e),
        }
    }
}

/// Why the shim got no answer from the daemon.
#[derive(Debug)]
pub enum ClientError {
    /// connect() failed: the daemon is not running (no socket, or a stale one) or we may not use it.
    Unreachable { socket: PathBuf, source: io::Error },
    /// Connected, but no full answer before the deadline.
    Timeout { socket: PathBuf, after: Duration },
    /// The exchange broke half way.
    Io { socket: PathBuf, source: io::Error },
    /// The daemon closed the connection without a word (it was stopping, or aborted the request).
    NoAnswer { socket: PathBuf },
    /// The answer was not a response we understand.
    BadResponse { socket: PathBuf, detail: String },
}

/// `connection refused` rather than `Connection refused (os error 111)`: the message is read by people.
fn short_io(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::NotFound => "no such file or directory".into(),
        io::ErrorKind::ConnectionRefused => "connection refused".into(),
        io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ => e.to_string(),
    }
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Unreachable { socket, source } => write!(
                f,
                "margay daemon not reachable at {}: {}; is the margay pod running on this node?",
                socket.display(),
                short_io(source)
            ),
            ClientError::Timeout { socket, after } => write!(
                f,
                "margay daemon at {} did not answer within {:.1}s",
                socket.display(),
                after.as_secs_f64()
            ),
            ClientError::Io { socket, source } => write!(
                f,
                "talking to the margay daemon at {} failed: {}",
                socket.display(),
                short_io(source)
            ),
            ClientError::NoAnswer { socket } => write!(
                f,
                "the margay daemon at {} closed the connection without answering; is it restarting?",
                socket.display()
            ),
            ClientError::BadResponse { socket, detail } => write!(
                f,
                "the margay daemon at {} sent an answer margay-cni cannot read: {detail}",
                socket.display()
            ),
        }
    }
}

impl std::error::Error for ClientError {}

impl ClientError {
    /// The CNI error the shim prints. Unreachable and timeouts are "try again later" (11): kubelet retries
    /// and the daemon may be restarting; a bad answer means mismatched releases.
    pub fn to_cni(&self) -> CniError {
        match self {
            ClientError::Unreachable { .. } => CniError::try_again(
                self.to_string(),
                "check `kubectl -n kube-system get pods -l k8s-app=margay-node -o wide` for this node",
            ),
            ClientError::Timeout { .. } | ClientError::Io { .. } | ClientError::NoAnswer { .. } => {
                CniError::try_again(self.to_string(), "")
            }
            ClientError::BadResponse { .. } => CniError::new(
                codes::PROTOCOL_MISMATCH,
                self.to_string(),
                "margay-cni and the daemon may come from different releases; the install-cni container \
                 copies the matching binary when the margay pod restarts",
            ),
        }
    }

    /// True when the daemon was never reached: nothing can have happened on its side.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, ClientError::Unreachable { .. })
    }
}

/// Send one request and wait for the answer, everything within `timeout`.
pub fn call(socket: &Path, req: &Request, timeout: Duration) -> Result<Response, ClientError> {
    let start = Instant::now();
    let mut stream = UnixStream::connect(socket).map_err(|source| ClientError::Unreachable {
        socket: socket.to_path_buf(),
        source,
    })?;
    let io_err = |source: io::Error| {
        if matches!(
            source.kind(),
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
        ) {
            ClientError::NoAnswer {
                socket: socket.to_path_buf(),
            }
        } else if matches!(
            source.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            ClientError::Timeout {
                socket: socket.to_path_buf(),
                after: timeout,
            }
        } else {
            ClientError::Io {
                socket: socket.to_path_buf(),
                source,
            }
        }
    };
    let remaining = || {
        timeout
            .checked_sub(start.elapsed())
            .filter(|d| !d.is_zero())
            .ok_or(ClientError::Timeout {
                socket: socket.to_path_buf(),
                after: timeout,
            })
    };
    let body = serde_json::to_vec(req).map_err(|e| ClientError::Io {
        socket: socket.to_path_buf(),
        source: io::Error::other(e),
    })?;
    stream
        .set_write_timeout(Some(remaining()?))
        .map_err(io_err)?;
    stream.write_all(&body).map_err(io_err)?;
    stream.shutdown(std::net::Shutdown::Write).map_err(io_err)?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        stream
            .set_read_timeout(Some(remaining()?))
            .map_err(io_err)?;
        let n = match stream.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err(e)),
        };
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_MESSAGE_BYTES {
            return Err(ClientError::BadResponse {
                socket: socket.to_path_buf(),
                detail: format!("answer longer than {MAX_MESSAGE_BYTES} bytes"),
            });
        }
    }
    if buf.is_empty() {
        return Err(ClientError::NoAnswer {
            socket: socket.to_path_buf(),
        });
    }
    serde_json::from_slice(&buf).map_err(|e| ClientError::BadResponse {
        socket: socket.to_path_buf(),
        detail: e.to_string(),
    })
}

/// The DEL spool directory for a socket.
pub fn spool_dir(socket: &Path) -> PathBuf {
    socket
        .parent()
        .unwrap_or_else(|| Path::new("/"))
        .join(SPOOL_DIR_NAME)
}

/// `<container id>+<ifname>.json`. Container ids are `[A-Za-z0-9_.-]` (checked by the shim), `+` cannot
/// occur in them, and the interface name is %-escaped outside that set, so names never collide or escape.
pub fn spool_file_name(container_id: &str, ifname: &str) -> String {
    let esc = |s: &str| {
        s.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-' {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect::<String>()
    };
    format!("{}+{}.json", esc(container_id), esc(ifname))
}

/// Record a DEL the daemon could not take: written to a temporary name and renamed, so the daemon never
/// reads half a file.
pub fn write_spool(socket: &Path, req: &Request) -> io::Result<PathBuf> {
    let dir = spool_dir(socket);
    std::fs::create_dir_all(&dir)?;
    let name = spool_file_name(
        req.container_id.as_deref().unwrap_or(""),
        req.ifname.as_deref().unwrap_or(""),
    );
    let path = dir.join(&name);
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let body = serde_json::to_vec(req).map_err(io::Error::other)?;
    std::fs::write(&tmp, body)?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spool_names_are_distinct_and_safe() {
        let a = spool_file_name("a_b", "c");
        let b = spool_file_name("a", "b_c");
        assert_ne!(a, b);
        assert_eq!(spool_file_name("abc", "eth/0"), "abc+eth%2F0.json");
        assert!(!spool_file_name("x", "../..").contains('/'));
    }

    #[test]
    fn response_wire_shape() {
        let ok = serde_json::to_value(Response::ok(None)).unwrap();
        assert_eq!(
            ok,
            serde_json::json!({"protocol": 1, "outcome": {"ok": {"result": null}}})
        );
        let err = serde_json::to_value(Response::error(CniError::new(11, "m", ""))).unwrap();
        assert_eq!(err["outcome"]["error"]["code"], 11);
    }

    #[test]
    fn unreachable_message_is_the_documented_one() {
        let e = ClientError::Unreachable {
            socket: PathBuf::from("/var/run/margay/cni.sock"),
            source: io::Error::from(io::ErrorKind::ConnectionRefused),
        };
        assert_eq!(
            e.to_string(),
            "margay daemon not reachable at /var/run/margay/cni.sock: connection refused; \
             is the margay pod running on this node?"
        );
        assert_eq!(e.to_cni().code, codes::TRY_AGAIN_LATER);
    }
}
