//! The datastore against a real etcd: CAS semantics, list/watch with revisions, failover around a dead
//! endpoint, the "etcd unreachable" error, and mutual TLS (connects with client certificates, refused without).

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use common::etcd::{etcd_available, Etcd};
use margay::datastore::{
    Datastore, DatastoreConfig, Guard, TlsFiles, TxnOutcome, WatchEventKind, WatchMessage, Write,
};

fn ds(endpoints: &[String]) -> Arc<Datastore> {
    let mut cfg = DatastoreConfig::new(endpoints);
    cfg.retry_for = Duration::from_millis(600);
    cfg.connect_timeout = Duration::from_millis(500);
    Arc::new(Datastore::new(cfg).expect("datastore config"))
}

#[tokio::test]
#[ignore = "needs etcd: scripts/test.sh runs it (--include-ignored)"]
async fn cas_list_and_watch() {
    if !etcd_available("cas_list_and_watch") {
        return;
    }
    let etcd = Etcd::start();
    let ds = ds(&[etcd.endpoint()]);

    let r1 = ds
        .create("/t/a", b"1".to_vec())
        .await
        .unwrap()
        .expect("created");
    assert_eq!(
        ds.create("/t/a", b"x".to_vec()).await.unwrap(),
        None,
        "create of an existing key must fail"
    );
    let kv = ds.get("/t/a").await.unwrap().unwrap();
    assert_eq!(
        (kv.value.as_slice(), kv.mod_revision, kv.version),
        (&b"1"[..], r1, 1)
    );
    assert_eq!(
        ds.update("/t/a", b"2".to_vec(), r1 - 1).await.unwrap(),
        None,
        "stale revision must fail"
    );
    let r2 = ds
        .update("/t/a", b"2".to_vec(), r1)
        .await
        .unwrap()
        .expect("updated");
    assert!(r2 > r1);
    assert_eq!(ds.delete("/t/a", r1).await.unwrap(), None);

    // A multi-key transaction: both guards must hold; on failure the guarded keys come back.
    ds.create("/t/b", b"b".to_vec()).await.unwrap().unwrap();
    let out = ds
        .txn(
            &[
                Guard::ModRevision("/t/a".into(), r2),
                Guard::Absent("/t/b".into()),
            ],
            &[Write::Put("/t/c".into(), b"c".to_vec())],
        )
        .await
        .unwrap();
    let TxnOutcome::Conflict { current, .. } = out else {
        panic!("must conflict: /t/b exists")
    };
    assert_eq!(current[0].1.as_ref().unwrap().value, b"2");
    assert_eq!(current[1].1.as_ref().unwrap().value, b"b");
    assert!(
        ds.get("/t/c").await.unwrap().is_none(),
        "nothing written on conflict"
    );

    let (kvs, rev) = ds.list("/t/").await.unwrap();
    assert_eq!(
        kvs.iter().map(|k| k.key.as_str()).collect::<Vec<_>>(),
        ["/t/a", "/t/b"]
    );

    // Watch from the list revision sees exactly the later changes, in order.
    let mut w = ds.watch("/t/", rev + 1);
    ds.delete("/t/a", r2).await.unwrap().expect("deleted");
    ds.create("/t/d", b"d".to_vec()).await.unwrap().unwrap();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        match tokio::time::timeout(Duration::from_secs(10), w.recv()).await {
            Ok(Some(WatchMessage::Events(evs))) => seen.extend(evs),
            other => panic!("watch: {other:?}"),
        }
    }
    assert_eq!(
        (seen[0].kind, seen[0].key.as_str()),
        (WatchEventKind::Delete, "/t/a")
    );
    assert_eq!(
        (seen[1].kind, seen[1].key.as_str()),
        (WatchEventKind::Put, "/t/d")
    );

    let before = ds.stats();
    ds.get("/t/d").await.unwrap();
    assert_eq!(ds.stats().round_trips - before.round_trips, 1);
}

#[tokio::test]
#[ignore = "needs etcd: scripts/test.sh runs it (--include-ignored)"]
async fn fails_over_around_a_dead_endpoint_and_names_what_it_tried() {
    if !etcd_available("fails_over_around_a_dead_endpoint_and_names_what_it_tried") {
        return;
    }
    let mut etcd = Etcd::start();
    let dead = format!("127.0.0.1:{}", common::free_port());
    let ds = ds(&[dead.clone(), etcd.endpoint()]);
    // etcd-client's own balancing fails a share of these calls; ours must fail none.
    for i in 0..60 {
        ds.create(&format!("/f/{i}"), b"v".to_vec())
            .await
            .expect("call with one dead endpoint")
            .unwrap();
    }
    etcd.kill9();
    let err = ds.get("/f/1").await.expect_err("etcd is down");
    let msg = err.to_string();
    assert!(err.is_unreachable(), "{msg}");
    assert!(msg.starts_with("etcd unreachable: tried "), "{msg}");
    assert!(
        msg.contains(&format!("{dead} (connection refused)")),
        "{msg}"
    );
    assert!(msg.contains(&format!("{} (", etcd.endpoint())), "{msg}");
    assert!(msg.contains("check --etcd-endpoints"), "{msg}");
    // Back after a restart, through the same Datastore.
    etcd.restart();
    assert!(ds.get("/f/1").await.expect("etcd is back").is_some());
}

#[tokio::test]
#[ignore = "needs etcd: scripts/test.sh runs it (--include-ignored)"]
async fn tls_client_certificates_required() {
    if !etcd_available("tls_client_certificates_required")
        || !common::require(
            common::have("openssl"),
            "tls_client_certificates_required",
            "openssl not installed",
        )
    {
        return;
    }
    let etcd = Etcd::start_tls();
    let certs = etcd.certs.as_ref().unwrap();
    let cfg = |cert: bool| {
        let mut c = DatastoreConfig::new(&[etcd.endpoint()]);
        c.retry_for = Duration::from_millis(500);
        c.tls = Some(TlsFiles {
            ca: certs.ca.clone(),
            cert: cert.then(|| certs.client_cert.clone()),
            key: cert.then(|| certs.client_key.clone()),
        });
        Datastore::new(c).unwrap()
    };
    let with = cfg(true);
    with.create("/tls/k", b"v".to_vec())
        .await
        .expect("TLS with client certificate")
        .unwrap();
    assert_eq!(with.get("/tls/k").await.unwrap().unwrap().value, b"v");

    let without = cfg(false);
    let err = without
        .get("/tls/k")
        .await
        .expect_err("no client certificate must be refused");
    eprintln!("refused as expected: {err}");
    assert!(err.to_string().contains(&etcd.endpoint()), "{err}");
    assert!(err.to_string().contains("client certificate"), "{err}");

    // Plain HTTP against the TLS port is refused as well.
    let plain = Datastore::new({
        let mut c = DatastoreConfig::new(&[etcd.endpoint()]);
        c.retry_for = Duration::from_millis(300);
        c
    })
    .unwrap();
    assert!(plain.get("/tls/k").await.is_err());
}
