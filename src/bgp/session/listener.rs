//! The shared BGP listener: binds the listen addresses once, owns the per-peer TCP MD5 keys on the
//! listening sockets (RFC 2385), and hands each accepted connection to the peer task registered for
//! its source address. Connections from addresses nobody registered get a NOTIFICATION (Cease /
//! connection rejected, RFC 4486) and are closed.
//!
//! One task owns the registrations; peers talk to it through [`ListenerHandle`]. Accept loops run as
//! child tasks and die with it.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use crate::bgp::wire::{encode, EncodeCtx, Message, Notification};

use super::config::Password;
use super::open::code;
use super::sockopt;

/// Listener failures, with the address and what to check.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    #[error("listen on {addr}: {source} (is another BGP daemon using the port, or is the address not configured here?)")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("set the TCP MD5 password for peer {peer} on listening socket {addr}: {source}")]
    Md5 {
        peer: IpAddr,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("peer {peer} is already registered on the listener")]
    Duplicate { peer: IpAddr },
    #[error("the listener task has stopped")]
    Gone,
}

/// Where the listener hands a registered peer's connections: the peer task's own inbox. A peer task
/// takes its connections in the channel it already reads its connection events from, so a session costs
/// no channel of its own for the rare accepted connection.
pub trait ConnInbox: Send + Sync + 'static {
    /// Hand `stream` over; `Err` names why it could not be (the peer task is gone or cannot take it).
    fn deliver(&self, stream: TcpStream) -> Result<(), String>;
    /// The peer task is gone: its registration is stale.
    fn is_closed(&self) -> bool;
}

enum Request {
    Register {
        peer: IpAddr,
        password: Option<Password>,
        conns: Box<dyn ConnInbox>,
        reply: oneshot::Sender<Result<(), ListenerError>>,
    },
    Unregister {
        peer: IpAddr,
    },
}

/// A cheap, clonable way for peer tasks to register with the listener.
#[derive(Clone)]
pub struct ListenerHandle {
    tx: mpsc::Sender<Request>,
}

impl ListenerHandle {
    /// Route connections from `peer` to `conns`, and install its MD5 key on the listening sockets.
    pub async fn register(
        &self,
        peer: IpAddr,
        password: Option<Password>,
        conns: impl ConnInbox,
    ) -> Result<(), ListenerError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request::Register {
                peer,
                password,
                conns: Box::new(conns),
                reply,
            })
            .await
            .map_err(|_| ListenerError::Gone)?;
        rx.await.map_err(|_| ListenerError::Gone)?
    }

    /// Queue the registration without waiting: connections accepted after this call returns are
    /// already routed to `conns` (the listener handles requests before connections). The receiver
    /// yields the outcome. `None` when the request queue is full; use [`register`](Self::register).
    pub fn register_now(
        &self,
        peer: IpAddr,
        password: Option<Password>,
        conns: impl ConnInbox,
    ) -> Option<oneshot::Receiver<Result<(), ListenerError>>> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .try_send(Request::Register {
                peer,
                password,
                conns: Box::new(conns),
                reply,
            })
            .ok()?;
        Some(rx)
    }

    /// Forget `peer` (its MD5 key is removed from the listening sockets).
    pub fn unregister(&self, peer: IpAddr) {
        // A full or closed queue means the listener is busy or gone; either way the registration dies
        // with the peer's receiver, which the listener notices on the next connection.
        let _ = self.tx.try_send(Request::Unregister { peer });
    }
}

/// The listening sockets and the task that dispatches their connections. Dropping it stops listening.
pub struct Listener {
    handle: ListenerHandle,
    addrs: Vec<SocketAddr>,
    _task: crate::task::AbortOnDrop,
}

impl Listener {
    /// Bind every address in `addrs` (e.g. `0.0.0.0:179`, or a node address with `listenPort`).
    /// Port 0 picks a free port; [`Listener::local_addrs`] tells which.
    pub async fn bind(addrs: &[SocketAddr]) -> Result<Listener, ListenerError> {
        let mut listeners = Vec::new();
        let mut bound = Vec::new();
        let v6only = addrs.iter().any(SocketAddr::is_ipv4);
        for &addr in addrs {
            let l =
                bind_one(addr, v6only).map_err(|source| ListenerError::Bind { addr, source })?;
            bound.push(
                l.local_addr()
                    .map_err(|source| ListenerError::Bind { addr, source })?,
            );
            listeners.push(Arc::new(l));
        }
        let (tx, rx) = mpsc::channel(64);
        let task = tokio::spawn(run(listeners, rx));
        Ok(Listener {
            handle: ListenerHandle { tx },
            addrs: bound,
            _task: crate::task::AbortOnDrop(task),
        })
    }

    pub fn handle(&self) -> ListenerHandle {
        self.handle.clone()
    }

    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }
}

/// `v6only`: the listener also binds IPv4 addresses, so an IPv6 wildcard must not claim IPv4 too (the
/// default `0.0.0.0:179` + `[::]:179` pair would otherwise fail with "address already in use").
fn bind_one(addr: SocketAddr, v6only: bool) -> io::Result<TcpListener> {
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if addr.is_ipv6() && v6only {
        use std::os::fd::AsRawFd;
        let one: libc::c_int = 1;
        // SAFETY: a valid socket fd and a c_int option of the right size.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::IPPROTO_IPV6,
                libc::IPV6_V6ONLY,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(128)
}

struct Registration {
    conns: Box<dyn ConnInbox>,
    has_password: bool,
}

/// Both spellings of an address: IPv4 peers arrive as IPv4-mapped IPv6 on dual-stack sockets.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

async fn run(listeners: Vec<Arc<TcpListener>>, mut requests: mpsc::Receiver<Request>) {
    let mut accepts = JoinSet::new();
    let (acc_tx, mut acc_rx) = mpsc::channel::<(TcpStream, SocketAddr)>(64);
    for l in &listeners {
        let l = l.clone();
        let tx = acc_tx.clone();
        accepts.spawn(async move {
            loop {
                match l.accept().await {
                    Ok((s, from)) => {
                        if tx.send((s, from)).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        // EMFILE and friends: back off a little instead of spinning.
                        tracing::warn!("BGP listener accept: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                }
            }
        });
    }
    drop(acc_tx);
    let mut peers: HashMap<IpAddr, Registration> = HashMap::new();
    loop {
        tokio::select! {
            // Registrations first, so a connection from a peer registered just before it arrived is
            // not rejected.
            biased;
            req = requests.recv() => match req {
                None => return,
                Some(Request::Register { peer, password, conns, reply }) => {
                    let peer = canonical(peer);
                    let r = if peers.get(&peer).is_some_and(|r| !r.conns.is_closed()) {
                        Err(ListenerError::Duplicate { peer })
                    } else {
                        set_md5_all(&listeners, peer, password.as_ref()).map(|()| {
                            peers.insert(peer, Registration { conns, has_password: password.is_some() });
                        })
                    };
                    // The registering peer task is gone if nobody takes the answer.
                    let _ = reply.send(r);
                }
                Some(Request::Unregister { peer }) => {
                    let peer = canonical(peer);
                    if let Some(r) = peers.remove(&peer) {
                        if r.has_password {
                            let _ = set_md5_all(&listeners, peer, None);
                        }
                    }
                }
            },
            acc = acc_rx.recv() => {
                let Some((stream, from)) = acc else { return };
                let ip = canonical(from.ip());
                match peers.get(&ip) {
                    Some(r) if !r.conns.is_closed() => {
                        if let Err(e) = r.conns.deliver(stream) {
                            tracing::warn!("BGP connection from {from}: closing, {e}");
                        }
                    }
                    _ => {
                        tracing::info!("BGP connection from {from}: not a configured peer, rejecting");
                        tokio::spawn(reject(stream));
                    }
                }
            }
        }
    }
}

fn set_md5_all(
    listeners: &[Arc<TcpListener>],
    peer: IpAddr,
    password: Option<&Password>,
) -> Result<(), ListenerError> {
    for l in listeners {
        let addr = l.local_addr().map_err(|source| ListenerError::Md5 {
            peer,
            addr: ([0, 0, 0, 0], 0).into(),
            source,
        })?;
        // An IPv4 socket cannot key an IPv6 peer and vice versa (unless dual-stack IPv6).
        if addr.is_ipv4() && peer.is_ipv6() {
            continue;
        }
        let key = password.map(|p| p.0.as_bytes());
        match sockopt::set_md5(l.as_ref(), addr.is_ipv6(), peer, key) {
            Ok(()) => {}
            // Removing a key that was never set is fine.
            Err(e) if key.is_none() && e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(source) => return Err(ListenerError::Md5 { peer, addr, source }),
        }
    }
    Ok(())
}

/// RFC 4486: tell an unknown speaker why before closing.
async fn reject(mut stream: TcpStream) {
    let mut buf = BytesMut::new();
    let n = Notification {
        code: code::CEASE,
        subcode: code::CEASE_CONNECTION_REJECTED,
        data: Vec::new(),
    };
    if encode(&Message::Notification(n), &EncodeCtx::default(), &mut buf).is_ok() {
        let _ =
            tokio::time::timeout(std::time::Duration::from_secs(2), stream.write_all(&buf)).await;
    }
    let _ = stream.shutdown().await;
}
