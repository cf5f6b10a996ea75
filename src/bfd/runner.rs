//! The one BFD task of a daemon: owns every BFD session and every BFD socket, drives the Sans-IO
//! [`Session`]s with the clock and the sockets, and reports Up/Down to its owner.
//!
//! Sockets (RFC 5881 4, RFC 5883 2):
//! - receive: one UDP socket per family and port (3784 single hop, 4784 multihop), bound to the wildcard
//!   address when the first session of that kind appears, with IP_RECVTTL / IPV6_RECVHOPLIMIT so the
//!   single-hop GTSM check (received TTL must be 255, RFC 5881 5 / RFC 5082) can be made;
//! - send: one UDP socket per session, connected to the peer's control port, from a source port in
//!   49152-65535 unique per session, TTL / hop limit 255.
//!
//! It never touches BGP: a Down is an event on the owner's channel.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Instant, SystemTime};

use nix::sys::socket::{
    self as sock, setsockopt, sockopt, AddressFamily, ControlMessageOwned, MsgFlags, SockFlag,
    SockType, SockaddrIn, SockaddrIn6, SockaddrStorage,
};
use tokio::io::Interest;
use tokio::sync::{mpsc, oneshot};

use super::packet::{ControlPacket, Diag, State};
use super::session::{Output, Session, Timers};

/// RFC 5881 4: single-hop control packets go to UDP 3784.
pub const SINGLE_HOP_PORT: u16 = 3784;
/// RFC 5883 2: multihop control packets go to UDP 4784.
pub const MULTIHOP_PORT: u16 = 4784;
/// RFC 5881 4: the source port is in 49152-65535.
const SOURCE_PORTS: std::ops::RangeInclusive<u16> = 49152..=65535;
/// RFC 5881 5: sent with TTL / hop limit 255; single-hop packets received with less are dropped.
const TTL: u8 = 255;

/// One BFD session the owner wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BfdPeer {
    pub peer: IpAddr,
    /// Our address on the path to the peer (the BGP session's source); None: the kernel chooses.
    pub local: Option<IpAddr>,
    /// RFC 5883 multihop (port 4784, no TTL check) rather than RFC 5881 single hop.
    pub multihop: bool,
    pub timers: Timers,
}

/// A session change the owner acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BfdEvent {
    Up {
        peer: IpAddr,
    },
    /// An Up session failed: detection time expired or the peer said Down. Not sent when the peer or we
    /// took the session down administratively (RFC 5882 3.2).
    Down {
        peer: IpAddr,
        diag: Diag,
    },
}

/// One session as `margay status` and `/metrics` show it.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BfdReport {
    pub peer: String,
    pub multihop: bool,
    /// AdminDown, Down, Init, Up.
    pub state: String,
    pub remote_state: String,
    /// The local diagnostic in words ("control detection time expired").
    pub diag: String,
    pub local_discriminator: u32,
    pub remote_discriminator: u32,
    /// Configured (asked for) intervals and multiplier.
    pub desired_min_tx_ms: u64,
    pub required_min_rx_ms: u64,
    pub detect_multiplier: u8,
    /// Negotiated transmit interval (before jitter), RFC 5880 6.8.7; 0 while the peer asks for none.
    pub tx_interval_ms: u64,
    /// Negotiated detection time, RFC 5880 6.8.4; 0 until the peer has been heard.
    pub detect_time_ms: u64,
    /// Times the session went from Up to Down.
    pub down_count: u64,
    /// When the session entered its current state, seconds since the Unix epoch.
    pub since_unix_secs: u64,
    /// A socket problem in plain words, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Errors talking to the BFD task.
#[derive(Debug, thiserror::Error)]
pub enum BfdError {
    #[error("the BFD task has stopped")]
    Gone,
}

enum Command {
    Apply(Vec<BfdPeer>, oneshot::Sender<()>),
    Status(oneshot::Sender<Vec<BfdReport>>),
    /// Send AdminDown on every session (RFC 5880 6.8.16) and stop: peers' clients must not react
    /// (RFC 5882 3.2), so BGP graceful restart survives our restart.
    Shutdown(oneshot::Sender<()>),
}

/// Ports the task listens on and sends to: the RFC's everywhere but in tests, where two tasks share
/// one loopback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BfdPorts {
    pub listen_single_hop: u16,
    pub listen_multihop: u16,
    pub peer_single_hop: u16,
    pub peer_multihop: u16,
}

impl Default for BfdPorts {
    fn default() -> BfdPorts {
        BfdPorts {
            listen_single_hop: SINGLE_HOP_PORT,
            listen_multihop: MULTIHOP_PORT,
            peer_single_hop: SINGLE_HOP_PORT,
            peer_multihop: MULTIHOP_PORT,
        }
    }
}

/// The owner's handle; dropping it aborts the task.
pub struct BfdHandle {
    tx: mpsc::Sender<Command>,
    task: crate::task::Task<()>,
}

impl BfdHandle {
    /// Make the running sessions equal to `peers` (keyed by peer address and hop mode); unchanged
    /// sessions are not touched, changed timers go through a Poll Sequence.
    pub async fn apply(&self, peers: Vec<BfdPeer>) -> Result<(), BfdError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Apply(peers, tx))
            .await
            .map_err(|_| BfdError::Gone)?;
        rx.await.map_err(|_| BfdError::Gone)
    }

    pub async fn status(&self) -> Result<Vec<BfdReport>, BfdError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Status(tx))
            .await
            .map_err(|_| BfdError::Gone)?;
        rx.await.map_err(|_| BfdError::Gone)
    }

    /// Tell every peer AdminDown and stop.
    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::Shutdown(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    pub fn watch(&self) -> crate::task::TaskWatch {
        self.task.watch()
    }
}

/// Start the BFD task. Sockets are opened when the first session needs them.
pub fn spawn(ports: BfdPorts, events: mpsc::Sender<BfdEvent>) -> BfdHandle {
    let (tx, rx) = mpsc::channel(16);
    let seed = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0x9e37_79b9)
        ^ u64::from(std::process::id()) << 32;
    let runner = Runner {
        ports,
        events,
        sessions: HashMap::new(),
        by_peer: BTreeMap::new(),
        deadlines: BTreeSet::new(),
        rx: Receivers::default(),
        rng: seed | 1,
    };
    BfdHandle {
        tx,
        task: crate::task::spawn("bfd", runner.run(rx)),
    }
}

struct Entry {
    want: BfdPeer,
    /// The peer's control port (3784 or 4784).
    peer_port: u16,
    session: Session,
    socket: Option<UdpSocket>,
    deadline: Option<Instant>,
    error: Option<String>,
    down_count: u64,
    since: SystemTime,
}

#[derive(Default)]
struct Receivers {
    /// Index: [v4 single, v6 single, v4 multihop, v6 multihop].
    socks: [Option<tokio::net::UdpSocket>; 4],
    errors: [Option<String>; 4],
}

struct Datagram {
    from: SocketAddr,
    ttl: Option<u8>,
    multihop: bool,
    len: usize,
    buf: [u8; 64],
}

enum Wake {
    Cmd(Option<Command>),
    Rx(io::Result<Datagram>),
    Timer,
}

struct Runner {
    ports: BfdPorts,
    events: mpsc::Sender<BfdEvent>,
    sessions: HashMap<u32, Entry>,
    by_peer: BTreeMap<(IpAddr, bool), u32>,
    deadlines: BTreeSet<(Instant, u32)>,
    rx: Receivers,
    rng: u64,
}

fn rx_index(v6: bool, multihop: bool) -> usize {
    usize::from(v6) + 2 * usize::from(multihop)
}

async fn recv_on(s: &Option<tokio::net::UdpSocket>, multihop: bool) -> io::Result<Datagram> {
    let Some(s) = s else {
        return std::future::pending().await;
    };
    loop {
        s.readable().await?;
        match s.try_io(Interest::READABLE, || {
            recv_datagram(s.as_raw_fd(), multihop)
        }) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            r => return r,
        }
    }
}

/// recvmsg with the TTL / hop limit control message.
fn recv_datagram(fd: i32, multihop: bool) -> io::Result<Datagram> {
    let mut buf = [0u8; 64];
    let mut cmsg = nix::cmsg_space!(libc::c_int, libc::c_int);
    let (len, from, ttl) = {
        let mut iov = [io::IoSliceMut::new(&mut buf)];
        let msg =
            sock::recvmsg::<SockaddrStorage>(fd, &mut iov, Some(&mut cmsg), MsgFlags::empty())
                .map_err(io::Error::from)?;
        let mut ttl = None;
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                match c {
                    ControlMessageOwned::Ipv4Ttl(t) => ttl = u8::try_from(t).ok(),
                    ControlMessageOwned::Ipv6HopLimit(t) => ttl = u8::try_from(t).ok(),
                    _ => {}
                }
            }
        }
        let from = msg.address.and_then(|a: SockaddrStorage| {
            if let Some(v4) = a.as_sockaddr_in() {
                Some(SocketAddr::new(IpAddr::V4(v4.ip()), v4.port()))
            } else {
                a.as_sockaddr_in6()
                    .map(|v6| SocketAddr::new(IpAddr::V6(v6.ip()), v6.port()))
            }
        });
        (msg.bytes, from, ttl)
    };
    let from = from.ok_or_else(|| io::Error::other("datagram without a source address"))?;
    // A v4 peer reaching a v6 socket would be v4-mapped; our v6 sockets are V6ONLY, but be safe.
    let from = match from.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), from.port()),
            None => from,
        },
        IpAddr::V4(_) => from,
    };
    Ok(Datagram {
        from,
        ttl,
        multihop,
        len,
        buf,
    })
}

fn bind_rx(v6: bool, port: u16) -> io::Result<tokio::net::UdpSocket> {
    let fam = if v6 {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    let fd: OwnedFd = sock::socket(
        fam,
        SockType::Datagram,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    if v6 {
        setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
        setsockopt(&fd, sockopt::Ipv6RecvHopLimit, &true)?;
        sock::bind(
            fd.as_raw_fd(),
            &SockaddrIn6::from(std::net::SocketAddrV6::new(
                Ipv6Addr::UNSPECIFIED,
                port,
                0,
                0,
            )),
        )?;
    } else {
        setsockopt(&fd, sockopt::Ipv4RecvTtl, &true)?;
        sock::bind(
            fd.as_raw_fd(),
            &SockaddrIn::from(std::net::SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)),
        )?;
    }
    tokio::net::UdpSocket::from_std(UdpSocket::from(fd))
}

/// The sending socket of one session: bound to `local` (or the wildcard) and a free port in
/// 49152-65535 (RFC 5881 4), connected to the peer's control port, TTL 255 (RFC 5881 5).
fn bind_tx(local: Option<IpAddr>, peer: SocketAddr, next_port: &mut u16) -> io::Result<UdpSocket> {
    let v6 = peer.is_ipv6();
    let local = local.unwrap_or(if v6 {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    } else {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    });
    let span = u32::from(*SOURCE_PORTS.end() - *SOURCE_PORTS.start()) + 1;
    let mut last = io::Error::other("no source port free in 49152-65535");
    for _ in 0..span {
        let port = *next_port;
        *next_port = if port == *SOURCE_PORTS.end() {
            *SOURCE_PORTS.start()
        } else {
            port + 1
        };
        match UdpSocket::bind(SocketAddr::new(local, port)) {
            Ok(s) => {
                if v6 {
                    setsockopt(&s, sockopt::Ipv6Ttl, &i32::from(TTL))?;
                } else {
                    s.set_ttl(u32::from(TTL))?;
                }
                s.set_nonblocking(true)?;
                s.connect(peer)?;
                return Ok(s);
            }
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => last = e,
            Err(e) => return Err(e),
        }
    }
    Err(last)
}

impl Runner {
    async fn run(mut self, mut cmds: mpsc::Receiver<Command>) {
        loop {
            let first = self.deadlines.first().map(|(t, _)| *t);
            let wake = {
                let r = &self.rx.socks;
                tokio::select! {
                    c = cmds.recv() => Wake::Cmd(c),
                    d = recv_on(&r[0], false) => Wake::Rx(d),
                    d = recv_on(&r[1], false) => Wake::Rx(d),
                    d = recv_on(&r[2], true) => Wake::Rx(d),
                    d = recv_on(&r[3], true) => Wake::Rx(d),
                    _ = async {
                        match first {
                            Some(t) => tokio::time::sleep_until(t.into()).await,
                            None => std::future::pending().await,
                        }
                    } => Wake::Timer,
                }
            };
            match wake {
                Wake::Cmd(None) => return,
                Wake::Cmd(Some(Command::Apply(peers, reply))) => {
                    self.apply(peers).await;
                    let _ = reply.send(());
                }
                Wake::Cmd(Some(Command::Status(reply))) => {
                    let _ = reply.send(self.status());
                }
                Wake::Cmd(Some(Command::Shutdown(reply))) => {
                    self.apply(Vec::new()).await;
                    let _ = reply.send(());
                    return;
                }
                Wake::Rx(Ok(d)) => self.on_datagram(d).await,
                Wake::Rx(Err(e)) => {
                    tracing::debug!("BFD receive: {e}");
                }
                Wake::Timer => self.on_timers().await,
            }
        }
    }

    fn fresh_disc(&mut self) -> u32 {
        loop {
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            let d = self.rng as u32;
            if d != 0 && !self.sessions.contains_key(&d) {
                return d;
            }
        }
    }

    fn ensure_rx(&mut self, v6: bool, multihop: bool) {
        let i = rx_index(v6, multihop);
        if self.rx.socks[i].is_some() {
            return;
        }
        let port = if multihop {
            self.ports.listen_multihop
        } else {
            self.ports.listen_single_hop
        };
        match bind_rx(v6, port) {
            Ok(s) => {
                self.rx.socks[i] = Some(s);
                self.rx.errors[i] = None;
            }
            Err(e) => {
                let fam = if v6 { "IPv6" } else { "IPv4" };
                let msg = format!("cannot listen on UDP {port} ({fam}): {e}");
                if self.rx.errors[i].as_deref() != Some(&msg) {
                    tracing::warn!("BFD: {msg}");
                }
                self.rx.errors[i] = Some(msg);
            }
        }
    }

    async fn apply(&mut self, peers: Vec<BfdPeer>) {
        let now = Instant::now();
        let mut want: BTreeMap<(IpAddr, bool), BfdPeer> = peers
            .into_iter()
            .map(|p| ((p.peer, p.multihop), p))
            .collect();
        let existing: Vec<((IpAddr, bool), u32)> =
            self.by_peer.iter().map(|(k, d)| (*k, *d)).collect();
        for (key, disc) in existing {
            match want.remove(&key) {
                None => {
                    self.by_peer.remove(&key);
                    if let Some(mut e) = self.sessions.remove(&disc) {
                        if let Some(t) = e.deadline {
                            self.deadlines.remove(&(t, disc));
                        }
                        let out = e.session.admin_down(now);
                        Self::send_all(&mut e, &out);
                    }
                }
                Some(p) => {
                    let Some(e) = self.sessions.get_mut(&disc) else {
                        continue;
                    };
                    if e.want.local != p.local {
                        e.socket = None;
                    }
                    let timers_changed = e.want.timers != p.timers;
                    e.want = p;
                    if timers_changed {
                        let out = e.session.set_timers(e.want.timers, now);
                        self.process(disc, out, now).await;
                    }
                }
            }
        }
        for (key, p) in want {
            self.ensure_rx(p.peer.is_ipv6(), p.multihop);
            let disc = self.fresh_disc();
            let seed = self.rng;
            let session = Session::new(p.timers, disc, seed, now);
            let peer_port = if p.multihop {
                self.ports.peer_multihop
            } else {
                self.ports.peer_single_hop
            };
            self.sessions.insert(
                disc,
                Entry {
                    peer_port,
                    want: p,
                    session,
                    socket: None,
                    deadline: None,
                    error: None,
                    down_count: 0,
                    since: SystemTime::now(),
                },
            );
            self.by_peer.insert(key, disc);
            self.reschedule(disc);
        }
    }

    fn reschedule(&mut self, disc: u32) {
        let Some(e) = self.sessions.get_mut(&disc) else {
            return;
        };
        let next = e.session.next_deadline();
        if next != e.deadline {
            if let Some(t) = e.deadline {
                self.deadlines.remove(&(t, disc));
            }
            if let Some(t) = next {
                self.deadlines.insert((t, disc));
            }
            e.deadline = next;
        }
    }

    async fn on_timers(&mut self) {
        let now = Instant::now();
        while let Some(&(t, disc)) = self.deadlines.first() {
            if t > now {
                break;
            }
            self.deadlines.pop_first();
            let Some(e) = self.sessions.get_mut(&disc) else {
                continue;
            };
            e.deadline = None;
            let out = e.session.on_timer(now);
            self.process(disc, out, now).await;
        }
    }

    async fn on_datagram(&mut self, d: Datagram) {
        // RFC 5881 5: single hop is GTSM-protected; anything that crossed a router is not our neighbour.
        if !d.multihop && d.ttl != Some(TTL) {
            tracing::debug!(from = %d.from, ttl = ?d.ttl, "BFD: dropped single-hop packet with TTL below 255");
            return;
        }
        let p = match ControlPacket::decode(&d.buf[..d.len.min(d.buf.len())]) {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(from = %d.from, "BFD: dropped packet: {e}");
                return;
            }
        };
        // RFC 5880 6.8.6: by Your Discriminator, else by the source address (RFC 5881 3: one session
        // per peer address and hop mode). Any source port is accepted (BIRD's are out of range).
        let disc = if p.your_disc != 0 {
            p.your_disc
        } else {
            match self.by_peer.get(&(d.from.ip(), d.multihop)) {
                Some(disc) => *disc,
                None => return,
            }
        };
        let now = Instant::now();
        let Some(e) = self.sessions.get_mut(&disc) else {
            return;
        };
        if e.want.peer != d.from.ip() || e.want.multihop != d.multihop {
            return;
        }
        let out = e.session.on_packet(&p, now);
        self.process(disc, out, now).await;
    }

    fn send_all(e: &mut Entry, out: &[Output]) {
        for o in out {
            if let Output::Send(p) = o {
                Self::send(e, p);
            }
        }
    }

    fn send(e: &mut Entry, p: &ControlPacket) {
        if e.socket.is_none() {
            // Start the search for a free source port at a place given by the (random) discriminator,
            // so sessions spread over the range; a session keeps its port for its life.
            let mut next = *SOURCE_PORTS.start() + (e.session.local_disc() % 16384) as u16;
            match bind_tx(
                e.want.local,
                SocketAddr::new(e.want.peer, e.peer_port),
                &mut next,
            ) {
                Ok(s) => {
                    e.socket = Some(s);
                    e.error = None;
                }
                Err(err) => {
                    e.error = Some(format!("cannot open the sending socket: {err}"));
                    return;
                }
            }
        }
        if let Some(s) = &e.socket {
            // Losing a packet is what BFD is built to tolerate; a link that is down gives ENETUNREACH
            // here, which the detection time, not this error, turns into Down.
            if let Err(err) = s.send(&p.encode()) {
                tracing::trace!(peer = %e.want.peer, "BFD send: {err}");
            }
        }
    }

    async fn process(&mut self, disc: u32, out: Vec<Output>, now: Instant) {
        let _ = now;
        let mut events = Vec::new();
        if let Some(e) = self.sessions.get_mut(&disc) {
            for o in &out {
                match o {
                    Output::Send(p) => Self::send(e, p),
                    Output::StateChanged {
                        from,
                        to,
                        diag,
                        remote_admin_down,
                    } => {
                        e.since = SystemTime::now();
                        tracing::info!(
                            peer = %e.want.peer,
                            "BFD session {} -> {} ({})",
                            from.as_str(),
                            to.as_str(),
                            diag.as_str()
                        );
                        if *to == State::Up {
                            events.push(BfdEvent::Up { peer: e.want.peer });
                        } else if *from == State::Up {
                            e.down_count += 1;
                            if !remote_admin_down && *to == State::Down {
                                events.push(BfdEvent::Down {
                                    peer: e.want.peer,
                                    diag: *diag,
                                });
                            }
                        }
                    }
                }
            }
        }
        self.reschedule(disc);
        for ev in events {
            // The owner only forwards to the speaker: a full queue means it is briefly busy.
            if self.events.send(ev).await.is_err() {
                tracing::debug!("BFD: the owner stopped listening");
            }
        }
    }

    fn status(&self) -> Vec<BfdReport> {
        let mut out: Vec<BfdReport> = self
            .by_peer
            .values()
            .filter_map(|d| self.sessions.get(d))
            .map(|e| {
                let s = &e.session;
                let t = s.timers();
                let rx_err =
                    self.rx.errors[rx_index(e.want.peer.is_ipv6(), e.want.multihop)].clone();
                BfdReport {
                    peer: e.want.peer.to_string(),
                    multihop: e.want.multihop,
                    state: s.state().as_str().into(),
                    remote_state: s.remote_state().as_str().into(),
                    diag: s.local_diag().as_str().into(),
                    local_discriminator: s.local_disc(),
                    remote_discriminator: s.remote_disc(),
                    desired_min_tx_ms: t.desired_min_tx.as_millis() as u64,
                    required_min_rx_ms: t.required_min_rx.as_millis() as u64,
                    detect_multiplier: t.detect_mult,
                    tx_interval_ms: s.tx_interval().map_or(0, |d| d.as_millis() as u64),
                    detect_time_ms: s.detection_time().map_or(0, |d| d.as_millis() as u64),
                    down_count: e.down_count,
                    since_unix_secs: e
                        .since
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs()),
                    error: e.error.clone().or(rx_err),
                }
            })
            .collect();
        out.sort_by(|a, b| a.peer.cmp(&b.peer));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn next(
        rx: &mut mpsc::Receiver<BfdEvent>,
        secs: u64,
    ) -> Result<Option<BfdEvent>, tokio::time::error::Elapsed> {
        tokio::time::timeout(Duration::from_secs(secs), rx.recv()).await
    }

    fn free_udp_port() -> u16 {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap().port()
    }

    /// Two BFD tasks on one loopback, each listening on its own port and sending to the other's, with
    /// their event receivers, the loopback address and a 20 ms x 3 single-hop session to apply on both.
    #[allow(clippy::type_complexity)]
    fn two_tasks_on_loopback() -> (
        BfdHandle,
        mpsc::Receiver<BfdEvent>,
        BfdHandle,
        mpsc::Receiver<BfdEvent>,
        IpAddr,
        BfdPeer,
    ) {
        let (pa, pb) = (free_udp_port(), free_udp_port());
        let ports = |me: u16, peer: u16| BfdPorts {
            listen_single_hop: me,
            listen_multihop: free_udp_port(),
            peer_single_hop: peer,
            peer_multihop: 1,
        };
        let (ea_tx, ea) = mpsc::channel(16);
        let (eb_tx, eb) = mpsc::channel(16);
        let a = spawn(ports(pa, pb), ea_tx);
        let b = spawn(ports(pb, pa), eb_tx);
        let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let peer = BfdPeer {
            peer: lo,
            local: Some(lo),
            multihop: false,
            timers: Timers {
                desired_min_tx: Duration::from_millis(20),
                required_min_rx: Duration::from_millis(20),
                detect_mult: 3,
            },
        };
        (a, ea, b, eb, lo, peer)
    }

    /// Two BFD tasks on one loopback (each listening on its own port, sending to the other's): the
    /// session comes Up on both, both report it; one side removed sends AdminDown, which the other must
    /// not report as a failure (RFC 5882 3.2); a silent peer is Down after the detection time.
    #[tokio::test]
    async fn two_tasks_come_up_and_detect_a_silent_peer() {
        let (a, mut ea, b, mut eb, lo, peer) = two_tasks_on_loopback();
        a.apply(vec![peer.clone()]).await.unwrap();
        b.apply(vec![peer.clone()]).await.unwrap();
        assert_eq!(
            next(&mut ea, 10).await.unwrap(),
            Some(BfdEvent::Up { peer: lo })
        );
        assert_eq!(
            next(&mut eb, 10).await.unwrap(),
            Some(BfdEvent::Up { peer: lo })
        );
        // The poll for the fast rate settles; both report the negotiated figures.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let st = a.status().await.unwrap();
        assert_eq!(st[0].state, "Up");
        assert_eq!(st[0].remote_state, "Up");
        assert_eq!(st[0].tx_interval_ms, 20);
        assert_eq!(st[0].detect_time_ms, 60);
        // b goes away without a word (its task is aborted): a detects it.
        drop(b);
        let ev = next(&mut ea, 10).await.unwrap();
        assert_eq!(
            ev,
            Some(BfdEvent::Down {
                peer: lo,
                diag: Diag::ControlDetectionTimeExpired
            })
        );
        assert_eq!(a.status().await.unwrap()[0].down_count, 1);
    }

    /// RFC 5881 4 and 5: what a peer receives: TTL 255, a source port in 49152-65535, and (while Down)
    /// the slow rate with Your Discriminator 0.
    #[tokio::test]
    async fn sends_with_ttl_255_from_a_high_source_port() {
        let peer_sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        setsockopt(&peer_sock, sockopt::Ipv4RecvTtl, &true).unwrap();
        peer_sock
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let (tx, _rx) = mpsc::channel(16);
        let a = spawn(
            BfdPorts {
                listen_single_hop: free_udp_port(),
                listen_multihop: free_udp_port(),
                peer_single_hop: peer_sock.local_addr().unwrap().port(),
                peer_multihop: 1,
            },
            tx,
        );
        let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
        a.apply(vec![BfdPeer {
            peer: lo,
            local: Some(lo),
            multihop: false,
            timers: Timers::default(),
        }])
        .await
        .unwrap();
        let fd = peer_sock.as_raw_fd();
        let d = tokio::task::spawn_blocking(move || recv_datagram(fd, false))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(d.ttl, Some(255));
        assert!(SOURCE_PORTS.contains(&d.from.port()), "{}", d.from);
        let p = ControlPacket::decode(&d.buf[..d.len]).unwrap();
        assert_eq!(p.state, State::Down);
        assert_eq!(p.your_disc, 0);
        assert_eq!(p.desired_min_tx, Duration::from_secs(1));
        drop(peer_sock);
    }

    #[tokio::test]
    async fn admin_down_from_the_peer_is_not_a_failure() {
        let (a, mut ea, b, mut eb, _, peer) = two_tasks_on_loopback();
        a.apply(vec![peer.clone()]).await.unwrap();
        b.apply(vec![peer.clone()]).await.unwrap();
        assert!(next(&mut ea, 10).await.is_ok());
        assert!(next(&mut eb, 10).await.is_ok());
        b.shutdown().await;
        // a hears AdminDown: Down, but no failure event.
        assert!(
            next(&mut ea, 1).await.is_err(),
            "AdminDown reported as a failure"
        );
        let st = a.status().await.unwrap();
        assert_eq!(st[0].state, "Down");
        assert_eq!(st[0].remote_state, "AdminDown");
    }
}
