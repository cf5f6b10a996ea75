//! A real etcd member for a test: free loopback ports, a temporary data dir, killed by PID on drop (also on
//! panic). It can be SIGKILLed and restarted on the same ports and data (fault tests), and run with mutual
//! TLS using certificates made by openssl for the test.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, have, require, sh};

/// Client TLS material made for one test.
pub struct Certs {
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl Certs {
    /// A CA, a server certificate for IP 127.0.0.1 and a client certificate (clientAuth), EC P-256.
    pub fn make(dir: &Path) -> Certs {
        let d = dir.display();
        let ext = |name: &str, body: &str| {
            std::fs::write(dir.join(name), body).expect("write openssl extension file");
        };
        ext(
            "server.ext",
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        );
        ext("client.ext", "extendedKeyUsage=clientAuth\n");
        sh(&format!(
            "set -e; cd {d}
             openssl ecparam -name prime256v1 -genkey -noout -out ca-key.pem 2>/dev/null
             openssl req -x509 -new -key ca-key.pem -subj /CN=margay-test-ca -days 2 -out ca.pem 2>/dev/null
             for n in server client; do
               openssl ecparam -name prime256v1 -genkey -noout -out $n-key.pem 2>/dev/null
               openssl req -new -key $n-key.pem -subj /CN=$n -out $n.csr 2>/dev/null
               openssl x509 -req -in $n.csr -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days 2 \
                 -extfile $n.ext -out $n.pem 2>/dev/null
             done"
        ));
        Certs {
            dir: dir.to_path_buf(),
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server-key.pem"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client-key.pem"),
        }
    }
}

/// One etcd member.
pub struct Etcd {
    pub client_port: u16,
    pub peer_port: u16,
    pub dir: tempfile::TempDir,
    pub certs: Option<Certs>,
    child: Option<Child>,
}

/// True when etcd and etcdctl are installed; otherwise skips (or fails under CI).
pub fn etcd_available(test: &str) -> bool {
    require(
        have("etcd") && have("etcdctl"),
        test,
        "etcd and etcdctl not installed (apt-get install etcd-server etcd-client)",
    )
}

impl Etcd {
    /// Start a plain-HTTP member and wait until it is healthy.
    pub fn start() -> Etcd {
        Etcd::launch(false)
    }

    /// Start a member that requires client certificates (`--client-cert-auth`).
    pub fn start_tls() -> Etcd {
        Etcd::launch(true)
    }

    fn launch(tls: bool) -> Etcd {
        let dir = tempfile::Builder::new()
            .prefix("margay-etcd-")
            .tempdir()
            .expect("temp dir");
        let certs = if tls {
            let cdir = dir.path().join("certs");
            std::fs::create_dir_all(&cdir).expect("certs dir");
            Some(Certs::make(&cdir))
        } else {
            None
        };
        let mut e = Etcd {
            client_port: free_port(),
            peer_port: free_port(),
            dir,
            certs,
            child: None,
        };
        e.spawn();
        e
    }

    fn scheme(&self) -> &str {
        if self.certs.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// `127.0.0.1:PORT` (the datastore adds the scheme).
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// The PID of the running member.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    fn spawn(&mut self) {
        let s = self.scheme().to_string();
        let (c, p) = (self.client_port, self.peer_port);
        let mut cmd = Command::new("etcd");
        cmd.args(["--name", "t", "--data-dir"])
            .arg(self.dir.path().join("data"))
            .arg(format!("--listen-client-urls={s}://127.0.0.1:{c}"))
            .arg(format!("--advertise-client-urls={s}://127.0.0.1:{c}"))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{p}"))
            .arg(format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{p}"
            ))
            .arg(format!("--initial-cluster=t=http://127.0.0.1:{p}"))
            .args(["--initial-cluster-state", "new", "--log-level", "error"])
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(self.dir.path().join("etcd.log")).expect("etcd log file"),
            ));
        if let Some(certs) = &self.certs {
            cmd.arg("--client-cert-auth")
                .arg(format!("--trusted-ca-file={}", certs.ca.display()))
                .arg(format!("--cert-file={}", certs.server_cert.display()))
                .arg(format!("--key-file={}", certs.server_key.display()));
        }
        self.child = Some(cmd.spawn().expect("spawn etcd"));
        self.wait_healthy();
    }

    fn health_cmd(&self) -> Command {
        let mut cmd = Command::new("etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .arg(format!(
                "--endpoints={}://{}",
                self.scheme(),
                self.endpoint()
            ))
            .args(["--dial-timeout=1s", "--command-timeout=1s"]);
        if let Some(c) = &self.certs {
            cmd.arg(format!("--cacert={}", c.ca.display()))
                .arg(format!("--cert={}", c.client_cert.display()))
                .arg(format!("--key={}", c.client_key.display()));
        }
        cmd.args(["endpoint", "health"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        cmd
    }

    fn wait_healthy(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                let log =
                    std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default();
                panic!("etcd exited ({status}) while starting:\n{log}");
            }
            if self
                .health_cmd()
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
            {
                return;
            }
            if Instant::now() > deadline {
                let log =
                    std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default();
                panic!(
                    "etcd on port {} not healthy after 20 s:\n{log}",
                    self.client_port
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL the member (a crash: no clean shutdown) and reap it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = c.wait();
        }
    }

    /// Start the same member again (same ports, same data) and wait until it is healthy.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill9();
    }
}
