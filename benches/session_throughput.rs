//! Session-layer throughput: how fast one BGP session takes in a full table, against BIRD 2 doing the
//! same job in the same run with the same bytes.
//!
//! ```text
//!   netns mgbench<pid> (loopback only)
//!   generator 127.0.0.2 ──(1M IPv4 /24s, pre-encoded UPDATEs, then End-of-RIB)──► margay peer task 127.0.0.1:<port>
//!   generator 127.0.0.2 ──(the same bytes)──────────────────────────────────────► BIRD 2 127.0.0.1:<port2>
//! ```
//! margay: time from the first UPDATE byte written until the peer task has delivered every prefix
//! (decoded, as `SessionEvent::Updates`) and the End-of-RIB. BIRD: time until `birdc show protocols all` counts
//! every prefix imported. Also peak RSS (VmHWM) of each side.
//!
//! Run: `cargo bench --bench session_throughput` (root; BIRD 2 installed). `PREFIXES=100000` changes the
//! table size.

#![allow(clippy::unwrap_used)] // bench code: a panic is the failure report

use std::fs;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use ipnetwork::IpNetwork;
use margay::bgp::session::{spawn_peer, Listener, PeerConfig, SessionEvent};
use margay::bgp::wire::{
    decode, encode, encode_updates, peek_len, AsPath, AsSegment, Capability, DecodeCtx, EncodeCtx,
    Family, Message, Nlri, Open, Origin, PathAttributes, Update,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;

const GEN: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const GEN_AS: u32 = 65002;
const LOCAL_AS: u32 = 65001;

fn table(n: u32) -> BytesMut {
    let attrs = PathAttributes {
        origin: Some(Origin::Igp),
        as_path: Some(AsPath {
            segments: vec![AsSegment::Sequence(vec![GEN_AS])],
        }),
        next_hop: Some(GEN),
        ..Default::default()
    };
    // 1M distinct /24s from 16.0.0.0 up.
    let nlri: Vec<Nlri> = (0..n)
        .map(|i| Nlri {
            prefix: IpNetwork::new(IpAddr::V4(Ipv4Addr::from(0x1000_0000u32 + (i << 8))), 24)
                .expect("prefix"),
            path_id: 0,
        })
        .collect();
    let ctx = EncodeCtx {
        four_octet_as: true,
        ..Default::default()
    };
    let mut buf = BytesMut::with_capacity(n as usize * 5);
    encode_updates(&attrs, Family::IPV4_UNICAST, &nlri, &ctx, &mut buf).expect("encode table");
    encode(
        &Message::Update(Update::end_of_rib_for(Family::IPV4_UNICAST)),
        &ctx,
        &mut buf,
    )
    .expect("EoR");
    buf
}

/// Connect as the generator, run the OPEN exchange, return the stream once Established.
async fn generator_session(to: SocketAddr) -> TcpStream {
    let sock = TcpSocket::new_v4().expect("socket");
    sock.bind(SocketAddr::new(IpAddr::V4(GEN), 0))
        .expect("bind 127.0.0.2");
    let mut s = sock.connect(to).await.expect("connect");
    s.set_nodelay(true).expect("nodelay");
    let open = Open {
        version: 4,
        my_as: GEN_AS as u16,
        hold_time: 240,
        bgp_id: GEN,
        capabilities: vec![
            Capability::Multiprotocol(Family::IPV4_UNICAST),
            Capability::FourOctetAs(GEN_AS),
        ],
    };
    let mut out = BytesMut::new();
    encode(&Message::Open(open), &EncodeCtx::default(), &mut out).expect("open");
    encode(&Message::Keepalive, &EncodeCtx::default(), &mut out).expect("keepalive");
    s.write_all(&out).await.expect("write open");
    // Wait for the peer's OPEN and KEEPALIVE.
    let mut buf = BytesMut::new();
    let mut keepalive = false;
    while !keepalive {
        while let Ok(Some(len)) = peek_len(&buf) {
            if buf.len() < len {
                break;
            }
            let frame = buf.split_to(len);
            match decode(&frame, &DecodeCtx::default()) {
                Ok(Message::Keepalive) => keepalive = true,
                Ok(Message::Open(_)) => {}
                other => panic!("unexpected from the speaker: {other:?}"),
            }
        }
        if !keepalive && s.read_buf(&mut buf).await.expect("read") == 0 {
            panic!("the speaker closed the connection during the OPEN exchange");
        }
    }
    s
}

fn vm_hwm_kb(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

async fn run_margay(blob: &[u8], n: u32) -> (Duration, u64) {
    let listener = Listener::bind(&[SocketAddr::from(([127, 0, 0, 1], 0))])
        .await
        .expect("listener");
    let addr = listener.local_addrs()[0];
    let (tx, mut rx) = mpsc::channel(4096);
    let mut cfg = PeerConfig::new(
        IpAddr::V4(GEN),
        GEN_AS,
        LOCAL_AS,
        Ipv4Addr::new(127, 0, 0, 1),
    );
    cfg.passive = true;
    cfg.families = vec![Family::IPV4_UNICAST];
    let peer = spawn_peer(cfg, Some(listener.handle()), tx);
    let mut s = generator_session(addr).await;
    loop {
        if let Some(SessionEvent::Established { .. }) = rx.recv().await {
            break;
        }
    }
    let start = Instant::now();
    let writer = {
        let blob = blob.to_vec();
        tokio::spawn(async move {
            s.write_all(&blob).await.expect("write table");
            s
        })
    };
    let mut prefixes = 0u64;
    loop {
        match rx.recv().await.expect("events") {
            SessionEvent::Updates { updates, .. } => {
                prefixes += updates.iter().map(|u| u.nlri.len() as u64).sum::<u64>();
            }
            SessionEvent::EndOfRib { .. } => break,
            SessionEvent::Down { reason, .. } => panic!("session went down: {reason}"),
            _ => {}
        }
    }
    let took = start.elapsed();
    assert_eq!(prefixes, u64::from(n), "every prefix delivered once");
    let _s = writer.await.expect("writer");
    peer.shutdown().await;
    (took, vm_hwm_kb(std::process::id()))
}

async fn run_bird(blob: &[u8], n: u32, ns: &str) -> Option<(Duration, u64)> {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let conf = format!(
        "router id 127.0.0.1;\nprotocol device {{ }}\nprotocol bgp gen {{\n  local 127.0.0.1 port {port} as {LOCAL_AS};\n  neighbor 127.0.0.2 as {GEN_AS};\n  passive on; multihop;\n  ipv4 {{ import all; export none; }};\n}}\n"
    );
    let confp = dir.path().join("bird.conf");
    let ctl = dir.path().join("bird.ctl");
    fs::write(&confp, conf).expect("bird.conf");
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "bird", "-f", "-c"])
        .arg(&confp)
        .arg("-s")
        .arg(&ctl)
        .arg("-P")
        .arg(dir.path().join("bird.pid"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let birdc = |cmd: &str| -> String {
        Command::new("birdc")
            .arg("-s")
            .arg(&ctl)
            .args(cmd.split(' '))
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    let t0 = Instant::now();
    while !birdc("show status").contains("BIRD") {
        if t0.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut s = generator_session(SocketAddr::from(([127, 0, 0, 1], port))).await;
    let start = Instant::now();
    let blob = blob.to_vec();
    let writer = tokio::spawn(async move {
        s.write_all(&blob).await.expect("write table");
        s
    });
    // The protocol's import counter is O(1) to read; `show route count` walks the table and would slow
    // BIRD down while we poll.
    let want = format!("{n} imported");
    loop {
        if birdc("show protocols all gen").contains(&want) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let took = start.elapsed();
    let rss = vm_hwm_kb(child.id());
    let _s = writer.await;
    let _ = child.kill();
    let _ = child.wait();
    Some((took, rss))
}

fn main() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("session_throughput: needs root (network namespace); skipped");
        return;
    }
    let n: u32 = std::env::var("PREFIXES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let ns = format!("mgbench{}", std::process::id());
    let ok = Command::new("ip")
        .args(["netns", "add", &ns])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
        && Command::new("ip")
            .args(["-n", &ns, "link", "set", "lo", "up"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
    if !ok {
        eprintln!("session_throughput: cannot create a network namespace; skipped");
        return;
    }
    struct DelNs(String);
    impl Drop for DelNs {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }
    let _guard = DelNs(ns.clone());
    let blob = table(n);
    let blob_len = blob.len();
    let ns2 = ns.clone();
    let result = std::thread::spawn(move || {
        let f = fs::File::open(format!("/run/netns/{ns2}")).expect("netns");
        nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let bird = run_bird(&blob, n, &ns2).await;
            let margay = run_margay(&blob, n).await;
            (margay, bird)
        })
    })
    .join()
    .expect("bench thread");
    let ((m_t, m_rss), bird) = result;
    println!(
        "session_throughput: {n} IPv4 /24 prefixes in {} bytes of UPDATEs, one session",
        blob_len
    );
    println!(
        "  margay peer task: {:>8.3} s  {:>10.0} prefixes/s  peak RSS {} MB (whole bench process, incl. the generator's table)",
        m_t.as_secs_f64(),
        f64::from(n) / m_t.as_secs_f64(),
        m_rss / 1024
    );
    match bird {
        Some((b_t, b_rss)) => {
            println!(
                "  BIRD 2:           {:>8.3} s  {:>10.0} prefixes/s  peak RSS {} MB",
                b_t.as_secs_f64(),
                f64::from(n) / b_t.as_secs_f64(),
                b_rss / 1024
            );
            println!(
                "  margay / BIRD prefixes per second: {:.2}x",
                b_t.as_secs_f64() / m_t.as_secs_f64()
            );
        }
        None => println!("  BIRD 2: not available (install bird2)"),
    }
}
