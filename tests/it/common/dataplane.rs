//! Helpers for the dataplane tests: namespace paths, a route-event counter built on `ip monitor route`,
//! polling, and running a closure inside a namespace.
#![allow(dead_code)]

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{sh, try_sh};

/// Path of a named namespace made by `ip netns add`.
pub fn ns_path(name: &str) -> PathBuf {
    PathBuf::from(format!("/var/run/netns/{name}"))
}

/// A multi-threaded tokio runtime for a test.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// `ip -n NS monitor route` running in the background, its output in a temp file. Markers (a static
/// blackhole route added and deleted) fence a window so a test can count exactly the route events that
/// happened between two points.
pub struct RouteMonitor {
    child: Child,
    file: tempfile::NamedTempFile,
    ns: String,
    markers: u32,
}

const MARKER: &str = "198.51.100.";

impl RouteMonitor {
    pub fn start(ns: &str) -> RouteMonitor {
        let file = tempfile::NamedTempFile::new().expect("temp file");
        let out = file.reopen().expect("reopen temp file");
        let child = Command::new("ip")
            .args(["-n", ns, "monitor", "route"])
            .stdout(Stdio::from(out))
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn ip monitor");
        let mut m = RouteMonitor {
            child,
            file,
            ns: ns.to_string(),
            markers: 0,
        };
        // The first marker proves the monitor is listening.
        assert!(
            super::eventually(Duration::from_secs(10), || {
                let n = m.markers;
                m.markers += 1;
                let (ok, _) = try_sh(&format!(
                    "ip -n {ns} route add blackhole {MARKER}{n}/32 proto static && ip -n {ns} route del blackhole {MARKER}{n}/32 proto static"
                ));
                ok && super::eventually(Duration::from_millis(300), || {
                    m.text().contains(&format!("{MARKER}{n}"))
                })
            }),
            "ip monitor route never saw a marker in {ns}"
        );
        m
    }

    fn text(&self) -> String {
        let mut s = String::new();
        let _ = std::fs::File::open(self.file.path()).and_then(|mut f| f.read_to_string(&mut s));
        s
    }

    /// Put a marker in the stream, wait until the monitor shows it, and return the event lines seen
    /// since the previous fence (markers excluded).
    pub fn fence(&mut self) -> Vec<String> {
        let n = self.markers;
        self.markers += 1;
        let ns = &self.ns;
        sh(&format!(
            "ip -n {ns} route add blackhole {MARKER}{n}/32 proto static && ip -n {ns} route del blackhole {MARKER}{n}/32 proto static"
        ));
        let tag = format!("Deleted blackhole {MARKER}{n} ");
        assert!(
            super::eventually(Duration::from_secs(10), || self.text().contains(&tag)),
            "marker {n} never arrived"
        );
        let text = self.text();
        // Lines after the previous fence's deletion line, up to this fence.
        let prev = if n == 0 {
            None
        } else {
            Some(format!("Deleted blackhole {MARKER}{} ", n - 1))
        };
        let mut out = Vec::new();
        let mut on = prev.is_none();
        for line in text.lines() {
            if let Some(p) = &prev {
                if line.starts_with(p.as_str()) {
                    on = true;
                    continue;
                }
            }
            if !on || line.contains(MARKER) {
                continue;
            }
            out.push(line.to_string());
        }
        out
    }
}

impl Drop for RouteMonitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
