//! The CNI error object and the spec's error codes.

#[allow(unused_imports)]
use super::*;

/// The spec's well-known error codes (section "Error"), plus margay's own from 100 up.
pub mod codes {
    pub const INCOMPATIBLE_CNI_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENVIRONMENT: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODING_FAILURE: u32 = 6;
    pub const INVALID_NETWORK_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// STATUS: the plugin cannot serve ADD now (spec 1.1).
    pub const PLUGIN_NOT_AVAILABLE: u32 = 50;
    /// STATUS: not available, and existing containers may have limited connectivity (spec 1.1).
    pub const PLUGIN_NOT_AVAILABLE_LIMITED: u32 = 51;
    /// margay: an internal failure in the daemon (the message says which part).
    pub const INTERNAL: u32 = 100;
    /// margay: the shim and the daemon speak different socket protocol versions.
    pub const PROTOCOL_MISMATCH: u32 = 101;
    /// margay: CHECK found the pod's network different from what ADD made.
    pub const CHECK_FAILED: u32 = 102;
    /// margay: no address left in the pools this pod may use.
    pub const IPAM_EXHAUSTED: u32 = 103;
}

/// A CNI error object: what the plugin prints on stdout when it fails (spec section "Error").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> CniError {
        CniError {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// Code 7: the configuration is wrong; `msg` names the field and the value.
    pub fn invalid_config(msg: impl Into<String>) -> CniError {
        CniError::new(codes::INVALID_NETWORK_CONFIG, msg, "")
    }

    /// Code 4: a CNI_* variable is missing or wrong; `msg` names it.
    pub fn invalid_env(msg: impl Into<String>) -> CniError {
        CniError::new(codes::INVALID_ENVIRONMENT, msg, "")
    }

    /// Code 11: a transient condition; the runtime should retry.
    pub fn try_again(msg: impl Into<String>, details: impl Into<String>) -> CniError {
        CniError::new(codes::TRY_AGAIN_LATER, msg, details)
    }

    /// Code 100: the daemon failed; `msg` says where.
    pub fn internal(msg: impl Into<String>) -> CniError {
        CniError::new(codes::INTERNAL, msg, "")
    }

    /// The JSON object a plugin prints, `cniVersion` first.
    pub fn to_json(&self, version: &str) -> Value {
        let mut m = Map::new();
        m.insert("cniVersion".into(), Value::String(version.to_string()));
        m.insert("code".into(), Value::from(self.code));
        m.insert("msg".into(), Value::String(self.msg.clone()));
        if !self.details.is_empty() {
            m.insert("details".into(), Value::String(self.details.clone()));
        }
        Value::Object(m)
    }
}

impl fmt::Display for CniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CNI error {}: {}", self.code, self.msg)?;
        if !self.details.is_empty() {
            write!(f, " ({})", self.details)?;
        }
        Ok(())
    }
}

impl std::error::Error for CniError {}
