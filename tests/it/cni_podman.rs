//! A real CNI runtime drives margay-cni: podman 4 with its CNI backend runs a busybox container on a network
//! whose conflist has margay first, alone and then chained with portmap, bandwidth and tuning. The server
//! runs here with a backend that plumbs the pod with `ip` (the node's real backend comes with `margay node`).
//!
//! ```text
//!   host mount ns ── /run/netns (shared) ◀── podman's cni-* netns bind mounts propagate back here
//!   │
//!   └─ unshare -m (tmpfs on /var/lib: podman and libcni's cache)
//!        └─ nsenter --net=node netns ── podman run ──▶ /usr/lib/cni + <tmp>/plugins/margay -> margay-cni
//!                                                          │ unix socket
//!   test process: CniServer(VethBackend) ◀─────────────────┘   veth node netns <-> /run/netns/cni-*
//! ```
//!
//! Not `ip netns exec` for podman: it makes the mounts slaves, and the container's netns, mounted by podman
//! under /run/netns, would stay invisible to the daemon that must plumb it.

use crate::cni_common;
use crate::common;

use std::path::Path;
use std::sync::Arc;

use cni_common::veth::VethBackend;
use common::podman::Podman;
use common::{have, require, try_sh, unique, Netns};
use margay::cni::{CniServer, ServerConfig};
use serde_json::json;

/// crun and libmount leave /run/crun and /run/mount behind: removed on drop (also on panic) when this test
/// created them.
struct RunDirs {
    crun_existed: bool,
    utab_existed: bool,
}

impl RunDirs {
    fn note() -> RunDirs {
        RunDirs {
            crun_existed: Path::new("/run/crun").exists(),
            utab_existed: Path::new("/run/mount").exists(),
        }
    }
}

impl Drop for RunDirs {
    fn drop(&mut self) {
        if !self.crun_existed {
            let _ = std::fs::remove_dir("/run/crun");
        }
        if !self.utab_existed {
            let _ = std::fs::remove_file("/run/mount/utab");
            let _ = std::fs::remove_dir("/run/mount");
        }
    }
}

fn cni_netns_count() -> usize {
    std::fs::read_dir("/run/netns")
        .map(|r| {
            r.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with("cni-"))
                .count()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: scripts/test.sh runs it (--include-ignored)"]
async fn podman_runs_containers_on_margay_alone_and_chained() {
    let test = "podman_runs_containers_on_margay_alone_and_chained";
    if !require(common::is_root(), test, "needs root") {
        return;
    }
    let ok = have("podman")
        && have("busybox")
        && have("nsenter")
        && have("unshare")
        && Path::new("/usr/lib/cni/portmap").exists();
    if !require(
        ok,
        test,
        "needs podman, busybox-static, util-linux and containernetworking-plugins",
    ) {
        return;
    }
    let _run_dirs = RunDirs::note();
    let node = unique("pn");
    let _ns = Netns::new(&[&node]);
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("cni.sock");
    let backend = Arc::new(VethBackend { node: node.clone() });
    let server = CniServer::bind(
        ServerConfig {
            socket: socket.clone(),
            ..Default::default()
        },
        backend,
    )
    .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    let netns_before = cni_netns_count();
    let margay = json!({"type": "margay", "socket": socket.to_string_lossy(), "timeout_seconds": 30,
                        "log_file": dir.path().join("cni.log").to_string_lossy()});

    // margay alone.
    let alone = Podman::new(
        &node,
        &json!({"cniVersion": "1.0.0", "name": "mgtnet", "plugins": [margay.clone()]}),
    );
    let (ok, out) = tokio::task::spawn_blocking(move || {
        let r =
            alone.run("run --rm --network mgtnet localhost/test-busybox ip -4 -o addr show eth0");
        drop(alone);
        r
    })
    .await
    .unwrap();
    assert!(ok, "podman run failed: {out}");
    assert!(out.contains("inet 10.78.0.1/32"), "pod address: {out}");

    // margay first, then portmap (with -p), bandwidth and tuning.
    let data = dir.path().join("tuning");
    let chained = Podman::new(
        &node,
        &json!({"cniVersion": "1.0.0", "name": "mgtnet", "plugins": [
            margay,
            {"type": "portmap", "snat": true, "capabilities": {"portMappings": true}},
            {"type": "bandwidth", "ingressRate": 8_000_000, "ingressBurst": 1_000_000,
             "egressRate": 8_000_000, "egressBurst": 1_000_000},
            {"type": "tuning", "sysctl": {"net.core.somaxconn": "1024"},
             "dataDir": data.to_string_lossy()}
        ]}),
    );
    let (ok, out) = tokio::task::spawn_blocking(move || {
        let r = chained.run(
            "run --rm --network mgtnet -p 18080:80 localhost/test-busybox \
             sh -c 'ip -4 -o addr show eth0; cat /proc/sys/net/core/somaxconn'",
        );
        drop(chained);
        r
    })
    .await
    .unwrap();
    assert!(ok, "podman run (chained) failed: {out}");
    assert!(out.contains("inet 10.78.0.1/32"), "pod address: {out}");
    assert!(out.contains("1024"), "tuning ran after margay: {out}");

    // Both containers are gone: DEL reached margay (the veth is gone), the netns mounts are gone, and
    // portmap's rules in the node are gone.
    let log = std::fs::read_to_string(dir.path().join("cni.log")).unwrap_or_default();
    assert_eq!(log.matches("ADD container=").count(), 2, "{log}");
    assert!(log.matches("DEL container=").count() >= 2, "{log}");
    let (_, links) = try_sh(&format!("ip -n {node} -o link show type veth"));
    assert!(links.trim().is_empty(), "veths left in the node: {links}");
    assert_eq!(
        cni_netns_count(),
        netns_before,
        "podman's netns left behind"
    );
    let (_, nat) = try_sh(&format!("ip netns exec {node} iptables -t nat -S"));
    assert!(!nat.contains("18080"), "portmap rules left: {nat}");

    let _ = stop.send(());
    task.await.unwrap().unwrap();
}
