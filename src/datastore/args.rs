//! The etcd flags every datastore user shares (`margay node run`, `margay reflector`, the CLI), and the
//! [`Datastore`] they describe.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::{Datastore, DatastoreConfig, DatastoreError, TlsFiles};

/// How to reach etcd (shared by every datastore command).
#[derive(Debug, Clone, clap::Args)]
pub struct EtcdArgs {
    /// etcd endpoints, comma separated (host:port or URL).
    #[arg(
        long,
        env = "ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "127.0.0.1:2379",
        global = true
    )]
    pub etcd_endpoints: Vec<String>,
    /// CA certificate (PEM) to verify etcd.
    #[arg(long, env = "ETCD_CA_CERT_FILE", global = true)]
    pub etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM) when etcd requires one.
    #[arg(long, env = "ETCD_CERT_FILE", global = true)]
    pub etcd_cert: Option<PathBuf>,
    /// Client key (PEM).
    #[arg(long, env = "ETCD_KEY_FILE", global = true)]
    pub etcd_key: Option<PathBuf>,
    /// Give up on etcd after this many seconds of retries.
    #[arg(long, default_value_t = 10, global = true)]
    pub etcd_timeout: u64,
}

impl EtcdArgs {
    /// Build the datastore these flags describe.
    pub fn datastore(&self) -> Result<Arc<Datastore>, DatastoreError> {
        let mut cfg = DatastoreConfig::new(&self.etcd_endpoints);
        cfg.retry_for = Duration::from_secs(self.etcd_timeout);
        if let Some(ca) = &self.etcd_ca {
            cfg.tls = Some(TlsFiles {
                ca: ca.clone(),
                cert: self.etcd_cert.clone(),
                key: self.etcd_key.clone(),
            });
        } else if self.etcd_cert.is_some() || self.etcd_key.is_some() {
            return Err(DatastoreError::Config(
                "--etcd-cert/--etcd-key need --etcd-ca".into(),
            ));
        }
        Ok(Arc::new(Datastore::new(cfg)?))
    }
}
