//! The real `margay-cni` binary, run as a runtime runs it, against the real socket server with an in-memory
//! backend:
//!
//! ```text
//!   test (as the runtime) ──env CNI_* + stdin──▶ margay-cni ──unix socket──▶ CniServer ──▶ TestBackend
//!                         ◀──stdout result/error, exit code──┘
//! ```

use crate::cni_common;
use crate::common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::sync::Arc;
use std::time::Duration;

use cni_common::{conf_for, env_for, shim, Harness, Hook, TestBackend};
use margay::cni::types::CniError;
use margay::cni::{CniMetrics, CniServer, ServerConfig, ServerError};
use serde_json::json;
use tokio::sync::{Barrier, Notify};

const NS: &str = "/var/run/netns/cni-test-pod";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn add_check_del_in_every_result_version() {
    let h = Harness::start().await;
    for (i, version) in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
        .iter()
        .enumerate()
    {
        let cid = format!("ctr{i}");
        let conf = h.conf(version, json!({"mtu": 1400}));
        let add = shim(&env_for("ADD", &cid, NS), &conf).await;
        let r = add.ok().json();
        assert_eq!(r["cniVersion"], *version);
        // Host veth first without a sandbox, the pod interface with one; ips point at the pod interface.
        assert!(r["interfaces"][0]["name"]
            .as_str()
            .unwrap()
            .starts_with("mg"));
        assert!(r["interfaces"][0].get("sandbox").is_none(), "{r}");
        assert_eq!(r["interfaces"][1]["name"], "eth0");
        assert_eq!(r["interfaces"][1]["sandbox"], NS);
        assert_eq!(r["ips"][0]["interface"], 1);
        assert!(r["ips"][0]["address"].as_str().unwrap().ends_with("/32"));
        assert_eq!(r["routes"][0]["gw"], "169.254.1.1");
        if version.starts_with("0.") {
            assert_eq!(r["ips"][0]["version"], "4", "{version}: {r}");
        } else {
            assert!(r["ips"][0].get("version").is_none(), "{version}: {r}");
        }
        if *version == "1.1.0" {
            assert_eq!(r["interfaces"][1]["mtu"], 1400);
        } else {
            assert!(r["interfaces"][1].get("mtu").is_none());
        }

        // ADD again (kubelet retry): same answer.
        let again = shim(&env_for("ADD", &cid, NS), &conf).await;
        assert_eq!(again.ok().json()["ips"], r["ips"]);

        // CHECK with the ADD's result as prevResult (0.4.0 and later).
        let check_conf = h.conf(version, json!({"prevResult": r.clone()}));
        let check = shim(&env_for("CHECK", &cid, NS), &check_conf).await;
        if version.starts_with("0.3") {
            assert_eq!(check.code(), 1, "CHECK is not in {version}");
        } else {
            assert!(check.ok().stdout.trim().is_empty());
        }

        let del = shim(&env_for("DEL", &cid, NS), &conf).await;
        assert!(del.ok().stdout.trim().is_empty());
        // DEL of something already gone succeeds.
        shim(&env_for("DEL", &cid, NS), &conf).await.ok();
    }
    let s = h.backend.state.lock().unwrap();
    assert!(s.allocs.is_empty(), "everything released: {:?}", s.allocs);
    // The request the backend saw carries the pod from CNI_ARGS and the MTU from the config.
    let add = &s.adds[0];
    let pod = add.pod.as_ref().expect("pod from CNI_ARGS");
    assert_eq!(
        (pod.namespace.as_str(), pod.name.as_str()),
        ("default", "web")
    );
    assert_eq!(add.mtu, Some(1400));
    assert_eq!(add.handle_id(), "k8s-pod-network.ctr0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_a_prev_result_that_differs() {
    let h = Harness::start().await;
    let conf = h.conf("1.0.0", json!({}));
    let r = shim(&env_for("ADD", "c1", NS), &conf).await.ok().json();
    let mut wrong = r.clone();
    wrong["ips"][0]["address"] = json!("10.99.99.99/32");
    let out = shim(
        &env_for("CHECK", "c1", NS),
        &h.conf("1.0.0", json!({"prevResult": wrong})),
    )
    .await;
    let e = out.error();
    assert_eq!(e["code"], 102);
    assert!(
        e["details"].as_str().unwrap().contains("10.99.99.99/32"),
        "{e}"
    );
    // CHECK of a container margay never saw: the backend's error comes through.
    let out = shim(
        &env_for("CHECK", "nope", NS),
        &h.conf("1.0.0", json!({"prevResult": r})),
    )
    .await;
    assert!(out.error()["msg"].as_str().unwrap().contains("nope"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_after_another_plugin_keeps_its_entries_first() {
    let h = Harness::start().await;
    let prev = json!({"cniVersion": "1.0.0", "interfaces": [{"name": "other0"}],
                      "ips": [{"address": "192.0.2.5/24", "interface": 0}]});
    let r = shim(
        &env_for("ADD", "c1", NS),
        &h.conf("1.0.0", json!({"prevResult": prev})),
    )
    .await
    .ok()
    .json();
    assert_eq!(r["interfaces"][0]["name"], "other0");
    assert_eq!(r["interfaces"][2]["name"], "eth0");
    assert_eq!(r["ips"][0]["interface"], 0);
    assert_eq!(r["ips"][1]["interface"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_command_lists_every_version() {
    for stdin in [
        "{\"cniVersion\":\"1.0.0\"}",
        "",
        "{\"cniVersion\":\"0.4.0\"}",
    ] {
        let out = shim(&[("CNI_COMMAND", "VERSION")], stdin).await;
        let v = out.ok().json();
        let want = if stdin.contains("0.4.0") {
            "0.4.0"
        } else if stdin.contains("1.0.0") {
            "1.0.0"
        } else {
            "1.1.0"
        };
        assert_eq!(v["cniVersion"], want);
        assert_eq!(
            v["supportedVersions"],
            json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
        );
    }
    // What podman sends: dummy netns/ifname/path.
    let out = shim(
        &[
            ("CNI_COMMAND", "VERSION"),
            ("CNI_NETNS", "dummy"),
            ("CNI_IFNAME", "dummy"),
            ("CNI_PATH", "dummy"),
        ],
        "{\"cniVersion\":\"1.0.0\"}",
    )
    .await;
    out.ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_gc_of_spec_1_1() {
    let h = Harness::start().await;
    let conf = h.conf("1.1.0", json!({}));
    let st = shim(&[("CNI_COMMAND", "STATUS")], &conf).await;
    assert!(st.ok().stdout.trim().is_empty());
    h.backend.state.lock().unwrap().status_error = Some(CniError::new(
        50,
        "margay: datastore not synced yet",
        "etcd 10.0.0.1:2379 unreachable",
    ));
    let st = shim(&[("CNI_COMMAND", "STATUS")], &conf).await;
    let e = st.error();
    assert_eq!(e["code"], 50);
    assert_eq!(e["cniVersion"], "1.1.0");
    // STATUS and GC do not exist before 1.1.0.
    let old = shim(&[("CNI_COMMAND", "STATUS")], &h.conf("1.0.0", json!({}))).await;
    assert_eq!(old.code(), 1);
    let old = shim(&[("CNI_COMMAND", "GC")], &h.conf("1.0.0", json!({}))).await;
    assert_eq!(old.code(), 1);

    for c in ["keep1", "keep2", "stale"] {
        shim(&env_for("ADD", c, NS), &conf).await.ok();
    }
    let gc_conf = h.conf(
        "1.1.0",
        json!({"cni.dev/valid-attachments": [
            {"containerID": "keep1", "ifname": "eth0"}, {"containerID": "keep2", "ifname": "eth0"}]}),
    );
    let gc = shim(
        &[("CNI_COMMAND", "GC"), ("CNI_PATH", "/usr/lib/cni")],
        &gc_conf,
    )
    .await;
    assert!(gc.ok().stdout.trim().is_empty());
    let s = h.backend.state.lock().unwrap();
    assert_eq!(s.gc_calls.len(), 1);
    assert_eq!(s.gc_calls[0].len(), 2);
    let mut left: Vec<_> = s.allocs.keys().map(|(c, _)| c.clone()).collect();
    left.sort();
    assert_eq!(left, vec!["keep1", "keep2"]);
}

/// 100 ADDs for 100 containers at once: all succeed, no address twice. Two of them meet at a barrier inside
/// the backend, which only works if the server runs them at the same time (serialized, it would deadlock
/// and the test would fail on the timeout error).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hundred_concurrent_adds_for_different_containers() {
    let h = Harness::start_with(|c| c.request_timeout = Duration::from_secs(30)).await;
    let barrier = Arc::new(Barrier::new(2));
    h.backend.hook("c0", Hook::Rendezvous(barrier.clone()));
    h.backend.hook("c99", Hook::Rendezvous(barrier));
    let conf = h.conf("1.0.0", json!({}));
    let ids: Vec<String> = (0..100).map(|i| format!("c{i}")).collect();
    let runs = ids.iter().map(|id| {
        let conf = conf.clone();
        async move { shim(&env_for("ADD", id, NS), &conf).await }
    });
    let outs = futures::future::join_all(runs).await;
    let mut ips = std::collections::HashSet::new();
    for o in &outs {
        let r = o.ok().json();
        let ip = r["ips"][0]["address"].as_str().unwrap().to_string();
        assert!(ips.insert(ip.clone()), "address {ip} handed out twice");
    }
    assert_eq!(ips.len(), 100);
}

/// Requests for one container never overlap in the backend, whatever arrives at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_for_one_container_are_serialized() {
    let h = Harness::start().await;
    h.backend
        .hook("same", Hook::Delay(Duration::from_millis(20)));
    let conf = h.conf("1.0.0", json!({}));
    let runs = (0..12).map(|i| {
        let conf = conf.clone();
        let cmd = if i % 3 == 2 { "DEL" } else { "ADD" };
        async move { shim(&env_for(cmd, "same", NS), &conf).await }
    });
    for o in futures::future::join_all(runs).await {
        o.ok();
    }
    let s = h.backend.state.lock().unwrap();
    assert_eq!(s.max_same_container, 1, "calls overlapped: {:?}", s.events);
    // Every ADD that started also finished before anything else ran for the container.
    for w in s.events.windows(2) {
        if w[0].starts_with("add-start") {
            assert!(w[1].starts_with("add-done"), "{:?}", s.events);
        }
    }
}

/// A hung backend: the caller gets error 11 at the deadline, the ADD goes on holding its container, a DEL
/// queued behind it runs after it; a backend call past `abandon_after` is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn per_request_timeout_and_abandon() {
    let h = Harness::start_with(|c| {
        c.request_timeout = Duration::from_secs(1);
        c.abandon_after = Duration::from_secs(600);
    })
    .await;
    let release = Arc::new(Notify::new());
    h.backend.hook("slow", Hook::Block(release.clone()));
    let conf = h.conf("1.0.0", json!({}));
    let out = shim(&env_for("ADD", "slow", NS), &conf).await;
    let e = out.error();
    assert_eq!(e["code"], 11);
    let msg = e["msg"].as_str().unwrap();
    assert!(
        msg.contains("timed out after 1.0s") && msg.contains("\"slow\""),
        "{msg}"
    );

    // Other containers are not held up.
    shim(&env_for("ADD", "fast", NS), &conf).await.ok();

    let del = {
        let conf = conf.clone();
        tokio::spawn(async move { shim(&env_for("DEL", "slow", NS), &conf).await })
    };
    release.notify_one();
    del.await.unwrap().ok();
    let ev: Vec<String> = h
        .backend
        .events()
        .into_iter()
        .filter(|e| e.ends_with(" slow"))
        .collect();
    assert_eq!(ev, vec!["add-start slow", "add-done slow", "del slow"]);
    drop(h);

    // abandon_after: the backend future is dropped, the container is free again.
    let h = Harness::start_with(|c| {
        c.request_timeout = Duration::from_secs(1);
        c.abandon_after = Duration::from_secs(1);
    })
    .await;
    h.backend.hook("hung", Hook::Block(Arc::new(Notify::new())));
    let conf = h.conf("1.0.0", json!({}));
    // The server answers at request_timeout or at abandon_after, whichever it reaches first: error 11.
    assert_eq!(shim(&env_for("ADD", "hung", NS), &conf).await.code(), 11);
    shim(&env_for("DEL", "hung", NS), &conf).await.ok();
    assert_eq!(h.backend.state.lock().unwrap().cancelled, vec!["hung"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_down_add_fails_clearly_del_is_spooled_and_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("run/margay/cni.sock");
    let conf = conf_for(&socket, "1.0.0", json!({}));

    // No socket at all.
    let out = shim(&env_for("ADD", "c1", NS), &conf).await;
    let e = out.error();
    assert_eq!(e["code"], 11);
    assert_eq!(
        e["msg"],
        format!(
            "margay daemon not reachable at {}: no such file or directory; is the margay pod running on this node?",
            socket.display()
        )
    );

    // A stale socket file (its daemon died).
    std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    let out = shim(&env_for("ADD", "c1", NS), &conf).await;
    assert_eq!(
        out.error()["msg"],
        format!(
            "margay daemon not reachable at {}: connection refused; is the margay pod running on this node?",
            socket.display()
        )
    );
    // STATUS says "not available" (50), which is what the runtime asks STATUS for.
    let st = shim(
        &[("CNI_COMMAND", "STATUS")],
        &conf_for(&socket, "1.1.0", json!({})),
    )
    .await;
    assert_eq!(st.code(), 50);

    // DEL is best effort: exit 0, recorded for the daemon.
    let del = shim(&env_for("DEL", "gone1", NS), &conf).await;
    assert!(del.ok().stdout.trim().is_empty());
    let spool = socket.parent().unwrap().join("pending-del/gone1+eth0.json");
    assert!(spool.exists(), "DEL spooled at {}", spool.display());

    // The daemon starts (replacing the stale socket) and replays the DEL before serving anything.
    let backend = Arc::new(TestBackend::default());
    let h = Harness::start_at(dir, socket.clone(), backend, |_| {}).await;
    shim(&env_for("ADD", "gone1", NS), &conf).await.ok();
    let ev = h.backend.events();
    assert_eq!(&ev[..2], &["del gone1", "add-start gone1"], "{ev:?}");
    assert!(!spool.exists(), "spool entry removed after replay");
    let d = &h.backend.state.lock().unwrap().dels[0];
    assert_eq!(d.pod.as_ref().unwrap().name, "web");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_sweep_picks_up_dels_recorded_while_running() {
    let h = Harness::start_with(|c| c.spool_sweep_interval = Duration::from_millis(100)).await;
    // As if a shim had found the daemon down a moment before it came up.
    let conf = h.conf("1.0.0", json!({}));
    let parsed = margay::cni::types::NetConf::parse(conf.as_bytes()).unwrap();
    let req = margay::cni::proto::Request::new(
        margay::cni::proto::Command::Del,
        Some("late".into()),
        None,
        Some("eth0".into()),
        Default::default(),
        &parsed,
    );
    let file = margay::cni::proto::write_spool(&h.socket, &req).unwrap();
    // A broken entry is set aside, not retried forever.
    let bad = file.with_file_name("junk+eth0.json");
    std::fs::write(&bad, b"{not json").unwrap();
    while file.exists() || bad.exists() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(h.backend.events().contains(&"del late".to_string()));
    assert!(bad.with_extension("bad").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_cni_errors() {
    let h = Harness::start().await;
    let good = h.conf("1.0.0", json!({}));
    // (environment, stdin, expected code, text the message or details must contain)
    type Case<'a> = (Vec<(&'a str, &'a str)>, String, u64, &'a str);
    let cases: Vec<Case> = vec![
        (env_for("ADD", "c1", NS), "{not json".into(), 6, "not JSON"),
        (
            env_for("ADD", "c1", NS),
            String::new(),
            6,
            "stdin was empty",
        ),
        (
            env_for("ADD", "c1", NS),
            h.conf("1.0.0", json!({"type": "bridge"})),
            7,
            "\"bridge\"",
        ),
        (
            env_for("ADD", "c1", NS),
            h.conf("9.9.9", json!({})),
            1,
            "9.9.9",
        ),
        (
            env_for("ADD", "c1", NS),
            h.conf("1.0.0", json!({"mtu": 10})),
            7,
            "mtu",
        ),
        (
            env_for("ADD", "c1", NS),
            h.conf("1.0.0", json!({"ipv4_pools": ["10.0.0.0/99"]})),
            7,
            "ipv4_pools",
        ),
        (
            env_for("FROB", "c1", NS),
            good.clone(),
            4,
            "unknown CNI_COMMAND \"FROB\"",
        ),
        (
            vec![("CNI_COMMAND", "ADD"), ("CNI_IFNAME", "eth0")],
            good.clone(),
            4,
            "CNI_CONTAINERID, CNI_NETNS",
        ),
        (
            vec![("CNI_COMMAND", "DEL"), ("CNI_CONTAINERID", "c1")],
            good.clone(),
            4,
            "CNI_IFNAME",
        ),
        (vec![], good.clone(), 4, "CNI_COMMAND is not set"),
        (
            vec![
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "bad/id"),
                ("CNI_NETNS", NS),
                ("CNI_IFNAME", "eth0"),
            ],
            good.clone(),
            4,
            "CNI_CONTAINERID",
        ),
        (
            vec![
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "c1"),
                ("CNI_NETNS", NS),
                ("CNI_IFNAME", "much-too-long-ifname"),
            ],
            good.clone(),
            4,
            "CNI_IFNAME",
        ),
    ];
    for (env, stdin, code, needle) in cases {
        let out = shim(&env, &stdin).await;
        let e = out.error();
        assert_eq!(e["code"], code, "{env:?} {stdin}: {e}");
        let text = format!(
            "{} {}",
            e["msg"].as_str().unwrap_or(""),
            e["details"].as_str().unwrap_or("")
        );
        assert!(text.contains(needle), "{e} lacks {needle:?}");
    }
    // Errors come in the configuration's version when it has a valid one.
    let out = shim(
        &env_for("ADD", "c1", NS),
        &h.conf("0.4.0", json!({"mtu": 10})),
    )
    .await;
    assert_eq!(out.error()["cniVersion"], "0.4.0");
    // Nothing reached the backend.
    assert!(h.backend.events().is_empty(), "{:?}", h.backend.events());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cni_args_ignore_unknown() {
    let h = Harness::start().await;
    let conf = h.conf("1.0.0", json!({}));
    let base = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "c1"),
        ("CNI_NETNS", NS),
        ("CNI_IFNAME", "eth0"),
    ];
    let with_args = |args: &'static str| {
        let mut e = base.to_vec();
        e.push(("CNI_ARGS", args));
        e
    };
    let out = shim(
        &with_args("K8S_POD_NAMESPACE=a;K8S_POD_NAME=b;FOO=1"),
        &conf,
    )
    .await;
    let e = out.error();
    assert_eq!(e["code"], 4);
    assert!(e["msg"].as_str().unwrap().contains("FOO"), "{e}");
    assert!(h.backend.events().is_empty());

    // containerd's and podman's form.
    shim(
        &with_args("IgnoreUnknown=1;K8S_POD_NAMESPACE=a;K8S_POD_NAME=b;K8S_POD_INFRA_CONTAINER_ID=c1;K8S_POD_UID=u;FOO=1"),
        &conf,
    )
    .await
    .ok();
    let s = h.backend.state.lock().unwrap();
    let pod = s.adds[0].pod.clone().unwrap();
    assert_eq!((pod.namespace.as_str(), pod.name.as_str()), ("a", "b"));
    assert_eq!(pod.uid.as_deref(), Some("u"));
    assert_eq!(pod.infra_container_id.as_deref(), Some("c1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_errors_and_log_file() {
    let h = Harness::start().await;
    h.backend.hook(
        "full",
        Hook::Fail(CniError::new(
            103,
            "pool 10.77.0.0/16 is exhausted",
            "40 blocks, 0 free",
        )),
    );
    // The directory does not exist yet: the shim creates it, as on a fresh node.
    let log = h.dir.path().join("log/margay/cni.log");
    let conf = h.conf(
        "0.4.0",
        json!({"log_file": log.to_string_lossy(), "log_level": "info"}),
    );
    let e = shim(&env_for("ADD", "full", NS), &conf).await.error();
    assert_eq!(
        e,
        json!({"cniVersion": "0.4.0", "code": 103, "msg": "pool 10.77.0.0/16 is exhausted",
               "details": "40 blocks, 0 free"})
    );
    shim(&env_for("ADD", "fine", NS), &conf).await.ok();
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines[0].contains("ERROR")
            && lines[0].contains("container=full")
            && lines[0].contains("exhausted")
    );
    assert!(
        lines[1].contains("INFO")
            && lines[1].contains("container=fine")
            && lines[1].contains("ok in")
    );
    assert!(lines[1].contains("pod=default/web") && lines[1].contains("ips=10.77."));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_is_0600_stale_replaced_live_not_stolen() {
    let h = Harness::start().await;
    let meta = std::fs::metadata(&h.socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    // A second daemon on the same socket is refused, and the first keeps serving.
    let again = CniServer::bind(
        ServerConfig {
            socket: h.socket.clone(),
            ..Default::default()
        },
        Arc::new(TestBackend::default()),
    );
    assert!(
        matches!(again, Err(ServerError::InUse { .. })),
        "{:?}",
        again.err()
    );
    shim(&env_for("ADD", "c1", NS), &h.conf("1.0.0", json!({})))
        .await
        .ok();

    // Stopping removes the socket; a regular file in its place is never deleted.
    let socket = h.socket.clone();
    let dir = h.stop().await;
    assert!(!socket.exists());
    std::fs::write(&socket, b"not a socket").unwrap();
    let r = CniServer::bind(
        ServerConfig {
            socket: socket.clone(),
            ..Default::default()
        },
        Arc::new(TestBackend::default()),
    );
    assert!(matches!(r, Err(ServerError::NotASocket { .. })));
    drop(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_by_command_and_code() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("cni.sock");
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = CniMetrics::register(&mut registry);
    let server = CniServer::bind(
        ServerConfig {
            socket: socket.clone(),
            ..Default::default()
        },
        Arc::new(TestBackend::default()),
    )
    .unwrap()
    .with_metrics(metrics);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async {
        let _ = rx.await;
    }));
    let conf = conf_for(&socket, "1.0.0", json!({}));
    shim(&env_for("ADD", "m1", NS), &conf).await.ok();
    shim(&env_for("DEL", "m1", NS), &conf).await.ok();
    let _ = tx.send(());
    task.await.unwrap().unwrap();
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains("margay_cni_request_duration_seconds_count{command=\"ADD\",code=\"0\"} 1"),
        "{text}"
    );
    assert!(text.contains("command=\"DEL\",code=\"0\"} 1"), "{text}");
}

/// The shim must stay small: nothing of tokio, etcd or netlink may be linked in.
#[test]
#[ignore = "needs root (network namespaces) and the daemons this test starts: scripts/test.sh runs it (--include-ignored)"]
fn shim_links_no_tokio_or_etcd() {
    if !common::require(
        common::have("nm"),
        "shim_links_no_tokio_or_etcd",
        "nm (binutils) missing",
    ) {
        return;
    }
    let bin = env!("CARGO_BIN_EXE_margay-cni");
    let out = std::process::Command::new("nm")
        .arg("-C")
        .arg(bin)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nm failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let syms = String::from_utf8_lossy(&out.stdout);
    assert!(
        syms.lines().count() > 100,
        "nm listed almost nothing: is the binary stripped?"
    );
    assert!(
        syms.contains("serde_json"),
        "sanity: the shim's own dependency is visible"
    );
    for forbidden in [
        "tokio",
        "etcd_client",
        "rtnetlink",
        "hyper",
        "axum",
        "tonic",
    ] {
        let n = syms.lines().filter(|l| l.contains(forbidden)).count();
        assert_eq!(n, 0, "margay-cni links {n} {forbidden} symbols");
    }
}

/// A shim from another release (other protocol number) or a client sending garbage gets a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_mismatch_and_garbage_are_answered() {
    use margay::cni::proto::{call, Command, Outcome, Request};
    let h = Harness::start().await;
    let conf = margay::cni::types::NetConf::parse(h.conf("1.0.0", json!({})).as_bytes()).unwrap();
    let mut req = Request::new(
        Command::Add,
        Some("c1".into()),
        Some(NS.into()),
        Some("eth0".into()),
        Default::default(),
        &conf,
    );
    req.protocol = 2;
    let socket = h.socket.clone();
    let resp = tokio::task::spawn_blocking(move || call(&socket, &req, Duration::from_secs(30)))
        .await
        .unwrap()
        .unwrap();
    match resp.outcome {
        Outcome::Error(e) => {
            assert_eq!(e.code, 101);
            assert!(e.msg.contains("protocol 2"), "{e}");
        }
        other => panic!("expected an error, got {other:?}"),
    }

    let socket = h.socket.clone();
    let raw = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        s.write_all(b"{\"hello\":").unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    })
    .await
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(v["outcome"]["error"]["code"], 6, "{v}");
    assert!(h.backend.events().is_empty());
}

/// etcd down during DEL (the backend says "try again", 11): the shim still succeeds, the server keeps the DEL
/// in the spool and its sweep finishes it; an ADD of the same container first runs the pending DEL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_del_failure_is_spooled_retried_and_ordered_before_a_new_add() {
    let h = Harness::start_with(|c| c.spool_sweep_interval = Duration::from_millis(100)).await;
    let conf = h.conf("1.0.0", json!({}));
    shim(&env_for("ADD", "d1", NS), &conf).await.ok();
    let etcd_down = CniError::try_again("etcd 10.0.0.1:2379 unreachable", "");
    h.backend.state.lock().unwrap().del_error = Some(etcd_down.clone());
    shim(&env_for("DEL", "d1", NS), &conf).await.ok();
    let spool = h.socket.parent().unwrap().join("pending-del/d1+eth0.json");
    assert!(spool.exists());
    h.backend.state.lock().unwrap().del_error = None;
    while spool.exists() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        h.backend.state.lock().unwrap().allocs.is_empty(),
        "released by the sweep"
    );

    // No sweep this time: the ADD itself runs the pending DEL first.
    let h = Harness::start_with(|c| c.spool_sweep_interval = Duration::from_secs(3600)).await;
    let conf = h.conf("1.0.0", json!({}));
    shim(&env_for("ADD", "d2", NS), &conf).await.ok();
    h.backend.state.lock().unwrap().del_error = Some(etcd_down);
    shim(&env_for("DEL", "d2", NS), &conf).await.ok();
    h.backend.state.lock().unwrap().del_error = None;
    shim(&env_for("ADD", "d2", NS), &conf).await.ok();
    let ev = h.backend.events();
    assert_eq!(
        ev,
        vec![
            "add-start d2",
            "add-done d2",
            "del-failed d2",
            "del d2",
            "add-start d2",
            "add-done d2"
        ]
    );
    assert!(!h
        .socket
        .parent()
        .unwrap()
        .join("pending-del/d2+eth0.json")
        .exists());

    // With spooling off the runtime sees the error.
    let h = Harness::start_with(|c| c.spool_transient_del_failures = false).await;
    let conf = h.conf("1.0.0", json!({}));
    h.backend.state.lock().unwrap().del_error = Some(CniError::try_again("etcd down", ""));
    assert_eq!(shim(&env_for("DEL", "d3", NS), &conf).await.code(), 11);
}

/// A daemon that hangs up without answering (stopping mid-request): "try again", not a version mismatch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_hanging_up_is_try_again() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("cni.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let rude = std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        drop(s);
    });
    let out = shim(
        &env_for("ADD", "c1", NS),
        &conf_for(&socket, "1.0.0", json!({})),
    )
    .await;
    rude.join().unwrap();
    let e = out.error();
    assert_eq!(e["code"], 11);
    assert!(
        e["msg"]
            .as_str()
            .unwrap()
            .contains("closed the connection without answering"),
        "{e}"
    );
}
