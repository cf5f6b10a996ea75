//! `DataplaneError`: the one error type of the dataplane layer. Every variant names the object (netns,
//! interface, prefix, sysctl key) and, where it helps, the fix.

use std::fmt;
use std::path::PathBuf;

/// A netlink error reply from the kernel: the errno and the kernel's extended-ack message, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NlError {
    /// Positive errno (`libc::EEXIST`, ...).
    pub errno: i32,
    /// NLMSGERR_ATTR_MSG from the extended ack (kernel's own explanation), when it sent one.
    pub message: Option<String>,
}

impl NlError {
    pub(crate) fn io(e: &std::io::Error) -> NlError {
        NlError {
            errno: e.raw_os_error().unwrap_or(libc::EIO),
            message: Some(e.to_string()),
        }
    }
}

impl fmt::Display for NlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = std::io::Error::from_raw_os_error(self.errno);
        match &self.message {
            Some(m) if !m.is_empty() => write!(f, "{text}: {m}"),
            _ => write!(f, "{text}"),
        }
    }
}

impl std::error::Error for NlError {}

/// Errors of the dataplane: FIB, pod plumbing, NAT and sysctls.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("network namespace {path}: {source} (give a netns file such as /var/run/netns/NAME or /proc/PID/ns/net)")]
    Netns {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("netlink socket in {netns}: {source}")]
    Socket {
        netns: String,
        source: std::io::Error,
    },
    #[error("{op} {object} in {netns}: {source}")]
    Netlink {
        op: &'static str,
        object: String,
        netns: String,
        source: NlError,
    },
    #[error("invalid {what} {value:?}: {reason}")]
    Invalid {
        what: &'static str,
        value: String,
        reason: String,
    },
    #[error("interface {name} already exists in {netns} and is not margay's (remove it, or ask for another interface name)")]
    NameCollision { name: String, netns: String },
    #[error("device {name} not found in {netns}")]
    DeviceNotFound { name: String, netns: String },
    #[error("sysctl {key} in {netns}: {source}")]
    Sysctl {
        key: String,
        netns: String,
        source: std::io::Error,
    },
    #[error("nftables in {netns}: {detail} (is the nftables package installed and the kernel's nf_tables available?)")]
    Nft { netns: String, detail: String },
    #[error("pod {workload} ({host_ifname}) is not as ADD left it: {}", .diffs.join("; "))]
    CheckFailed {
        workload: String,
        host_ifname: String,
        diffs: Vec<String>,
    },
    #[error("FIB task for {netns} has stopped")]
    FibStopped { netns: String },
    #[error("unexpected kernel reply in {netns}: {detail}")]
    Decode { netns: String, detail: String },
}

/// How a namespace is shown in messages: its path, or "the current netns".
pub(crate) fn ns_label(path: Option<&std::path::Path>) -> String {
    match path {
        Some(p) => format!("netns {}", p.display()),
        None => "the current netns".to_string(),
    }
}
