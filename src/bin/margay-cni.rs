//! `margay-cni`: the CNI plugin the container runtime executes (CNI spec 1.1.0; results also in 0.3.x, 0.4.0
//! and 1.0.0, answering in the configuration's version).
//!
//! It reads `CNI_COMMAND`, `CNI_CONTAINERID`, `CNI_NETNS`, `CNI_IFNAME`, `CNI_ARGS` and the network
//! configuration on stdin, validates them, sends one request over the margay daemon's unix socket, and prints
//! the CNI result (ADD) or nothing (DEL, CHECK, STATUS, GC), or a CNI error object with a non-zero exit.
//! VERSION is answered here without the daemon.
//!
//! It links only `margay::cni::{types, proto}` (std + serde + serde_json): no tokio, no etcd, no netlink; a
//! test checks the binary's symbols.
//!
//! DEL when the daemon is unreachable: the spec asks DEL to be best effort, and kubelet cannot finish
//! deleting a pod (or free its sandbox) until DEL succeeds. The pod's veth pair and host route vanish with
//! the pod's network namespace, which the runtime destroys right after DEL; what margay still holds is the
//! IPAM allocation. So the shim writes the DEL to `<socket dir>/pending-del/` and exits 0; the daemon
//! replays the spool before it serves anything else, and again every few seconds. If the spool cannot be
//! written either, DEL fails with code 11 and the runtime retries.

use std::fs::{File, OpenOptions};
use std::io::{self, IsTerminal, Read, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use margay::cni::proto::{self, Command, Outcome, Request};
use margay::cni::types::{
    codes, validate_container_id, validate_ifname, version_info, CniArgs, CniError, CniVersion,
    LogLevel, NetConf,
};
use serde_json::Value;

/// How long the shim waits for the daemon unless the configuration sets `timeout_seconds`. Above the
/// daemon's own request timeout (60 s), so the caller normally gets the daemon's clearer message.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(90);

fn main() -> ExitCode {
    let started = Instant::now();
    let mut shim = Shim {
        version: CniVersion::LATEST,
        log: Logger::default(),
        what: String::from("margay-cni"),
    };
    let outcome = shim.run();
    let took = started.elapsed().as_secs_f64() * 1000.0;
    match outcome {
        Ok(out) => {
            if let Some(v) = out {
                println!("{v}");
            }
            shim.log.write(
                LogLevel::Info,
                &format!("{}: ok in {took:.1} ms", shim.what),
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("{}", e.to_json(shim.version.as_str()));
            shim.log.write(
                LogLevel::Error,
                &format!("{}: failed in {took:.1} ms: {e}", shim.what),
            );
            ExitCode::FAILURE
        }
    }
}

struct Shim {
    /// The version errors and results are written in: the configuration's once known.
    version: CniVersion,
    log: Logger,
    /// "ADD container=... ifname=..." for the log line.
    what: String,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

impl Shim {
    fn run(&mut self) -> Result<Option<Value>, CniError> {
        let command = env("CNI_COMMAND").ok_or_else(|| {
            CniError::invalid_env(
                "CNI_COMMAND is not set: margay-cni is a CNI plugin, run by the container runtime",
            )
        })?;
        let stdin = io::stdin();
        let mut input = Vec::new();
        // VERSION may come without a configuration; never block on an interactive terminal.
        if !stdin.is_terminal() {
            stdin.lock().read_to_end(&mut input).map_err(|e| {
                CniError::new(
                    codes::IO_FAILURE,
                    format!("reading the network configuration from stdin: {e}"),
                    "",
                )
            })?;
        }
        // Errors are written in the configuration's version whenever it names one we know.
        if let Some(v) = serde_json::from_slice::<Value>(&input)
            .ok()
            .and_then(|v| v.get("cniVersion")?.as_str()?.parse::<CniVersion>().ok())
        {
            self.version = v;
        }
        let cmd = match command.as_str() {
            "VERSION" => return Ok(Some(self.version_answer(&input)?)),
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            other => {
                return Err(CniError::invalid_env(format!(
                    "unknown CNI_COMMAND {other:?}: margay-cni supports ADD, DEL, CHECK, VERSION, STATUS, GC"
                )))
            }
        };
        self.what = cmd.to_string();
        if input.is_empty() {
            return Err(CniError::new(
                codes::DECODING_FAILURE,
                format!("{cmd} needs the network configuration on stdin, and stdin was empty"),
                "",
            ));
        }
        let conf = NetConf::parse(&input)?;
        self.version = conf.cni_version;
        if let Some(path) = &conf.log_file {
            self.log = Logger::open(path, conf.log_level);
        }
        self.log.write(
            LogLevel::Debug,
            &format!("{cmd} config: {}", String::from_utf8_lossy(&input)),
        );
        let allowed = match cmd {
            Command::Check => conf.cni_version.has_check(),
            Command::Status | Command::Gc => conf.cni_version.has_status_and_gc(),
            _ => true,
        };
        if !allowed {
            return Err(CniError::new(
                codes::INCOMPATIBLE_CNI_VERSION,
                format!(
                    "configuration version {} does not allow {cmd}",
                    conf.cni_version
                ),
                "CHECK needs cniVersion 0.4.0 or newer; STATUS and GC need 1.1.0",
            ));
        }

        let container_id = env("CNI_CONTAINERID");
        let netns = env("CNI_NETNS");
        let ifname = env("CNI_IFNAME");
        let needs: &[(&str, &Option<String>)] = match cmd {
            Command::Add | Command::Check => &[
                ("CNI_CONTAINERID", &container_id),
                ("CNI_NETNS", &netns),
                ("CNI_IFNAME", &ifname),
            ],
            Command::Del => &[("CNI_CONTAINERID", &container_id), ("CNI_IFNAME", &ifname)],
            Command::Status | Command::Gc => &[],
        };
        let missing: Vec<&str> = needs
            .iter()
            .filter(|(_, v)| v.is_none())
            .map(|(n, _)| *n)
            .collect();
        if !missing.is_empty() {
            return Err(CniError::invalid_env(format!(
                "{cmd} needs {} (not set)",
                missing.join(", ")
            )));
        }
        if matches!(cmd, Command::Add | Command::Check | Command::Del) {
            if let Some(id) = &container_id {
                validate_container_id(id)?;
            }
            if let Some(i) = &ifname {
                validate_ifname(i)?;
            }
        }
        let args = CniArgs::parse(&std::env::var("CNI_ARGS").unwrap_or_default())?;
        self.what = format!(
            "{cmd} container={} ifname={} netns={} pod={}/{}",
            container_id.as_deref().unwrap_or("-"),
            ifname.as_deref().unwrap_or("-"),
            netns.as_deref().unwrap_or("-"),
            args.k8s_pod_namespace.as_deref().unwrap_or("-"),
            args.k8s_pod_name.as_deref().unwrap_or("-"),
        );

        let req = Request::new(cmd, container_id, netns, ifname, args, &conf);
        let socket = Path::new(&conf.socket);
        let timeout = conf
            .timeout_seconds
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_TIMEOUT);
        let resp = match proto::call(socket, &req, timeout) {
            Ok(r) => r,
            Err(e) if cmd == Command::Del && e.is_unreachable() => {
                return self.spool_del(socket, &req, e).map(|()| None)
            }
            // STATUS exists to ask "can you serve ADD?": a daemon that is down cannot (spec 1.1 code 50).
            Err(e) if cmd == Command::Status && e.is_unreachable() => {
                let mut err = e.to_cni();
                err.code = codes::PLUGIN_NOT_AVAILABLE;
                return Err(err);
            }
            Err(e) => return Err(e.to_cni()),
        };
        match resp.outcome {
            Outcome::Error(e) => Err(e),
            Outcome::Ok { result } => match (cmd, result) {
                (Command::Add, Some(r)) => {
                    let ips: Vec<String> = r.ips.iter().map(|i| i.address.to_string()).collect();
                    self.what.push_str(&format!(" ips={}", ips.join(",")));
                    Ok(Some(r.encode(conf.cni_version)))
                }
                (Command::Add, None) => Err(CniError::internal(
                    "the margay daemon answered ADD without a result",
                )),
                _ => Ok(None),
            },
        }
    }

    /// VERSION: answer in the requested version when we speak it (spec: "cniVersion" of the input).
    fn version_answer(&mut self, input: &[u8]) -> Result<Value, CniError> {
        self.what = "VERSION".into();
        if !input.iter().all(u8::is_ascii_whitespace) {
            let v: Value = serde_json::from_slice(input).map_err(|e| {
                CniError::new(
                    codes::DECODING_FAILURE,
                    format!("VERSION input is not JSON: {e}"),
                    "",
                )
            })?;
            if let Some(s) = v.get("cniVersion").and_then(Value::as_str) {
                // An unknown version still gets our list, so the runtime can pick one.
                if let Ok(ver) = s.parse::<CniVersion>() {
                    return Ok(version_info(ver));
                }
            }
        }
        Ok(version_info(CniVersion::LATEST))
    }

    /// The daemon is down: record the DEL for it and succeed (see the module doc). If the daemon came up
    /// meanwhile, hand it the DEL at once instead.
    fn spool_del(
        &mut self,
        socket: &Path,
        req: &Request,
        why: proto::ClientError,
    ) -> Result<(), CniError> {
        let file = proto::write_spool(socket, req).map_err(|e| {
            CniError::try_again(
                format!("{why}; and the DEL could not be recorded for later: {e}"),
                "the runtime will retry the DEL",
            )
        })?;
        self.log.write(
            LogLevel::Warn,
            &format!(
                "{}: {why}; recorded the DEL in {} for the daemon to replay",
                self.what,
                file.display()
            ),
        );
        if let Ok(resp) = proto::call(socket, req, Duration::from_secs(5)) {
            if matches!(resp.outcome, Outcome::Ok { .. }) {
                let _ = std::fs::remove_file(&file);
            }
        }
        Ok(())
    }
}

/// The optional log file: one line per call (more at debug). Logging must never fail the CNI operation,
/// so an unopenable file just means no log.
#[derive(Default)]
struct Logger {
    file: Option<File>,
    level: Option<LogLevel>,
}

impl Logger {
    fn open(path: &str, level: LogLevel) -> Logger {
        // The conflist points at /var/log/margay/cni.log; nothing else creates that directory on the host.
        if let Some(dir) = Path::new(path).parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let file = OpenOptions::new().create(true).append(true).open(path);
        if let Err(e) = &file {
            eprintln!("margay-cni: cannot open log_file {path}: {e}");
        }
        Logger {
            file: file.ok(),
            level: Some(level),
        }
    }

    fn write(&mut self, level: LogLevel, msg: &str) {
        let (Some(f), Some(max)) = (self.file.as_mut(), self.level) else {
            return;
        };
        if level > max {
            return;
        }
        let line = format!(
            "{} {} margay-cni[{}] {msg}\n",
            utc_now(),
            level.as_str(),
            std::process::id()
        );
        // One write per line, O_APPEND: lines of concurrent shims do not interleave.
        let _ = f.write_all(line.as_bytes());
    }
}

/// RFC 3339 UTC timestamp with milliseconds, without a date crate.
fn utc_now() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339(now)
}

fn rfc3339(now: Duration) -> String {
    let secs = now.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        now.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::rfc3339;
    use std::time::Duration;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(Duration::ZERO), "1970-01-01T00:00:00.000Z");
        // A century leap day, with milliseconds.
        assert_eq!(
            rfc3339(Duration::from_millis(951_827_696_789)),
            "2000-02-29T12:34:56.789Z"
        );
        assert_eq!(
            rfc3339(Duration::from_secs(1_795_319_297)),
            "2026-11-22T03:48:17.000Z"
        );
    }
}
