//! A small synchronous rtnetlink client over `netlink-sys`, with messages built by `netlink-packet-route`.
//!
//! It exists because the FIB must write many requests per `sendmsg` (the kernel processes every message in
//! one write, then queues one ack per message) and check each ack by sequence number; a
//! one-request-one-await client cannot reach kernel speed. Sockets are opened inside a network namespace
//! (see `netns`) and stay bound to it. Nothing here knows about routes' meaning: that is `fib` and `pod`.

use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket};

use super::error::{ns_label, DataplaneError, NlError};
use super::netns::in_netns;

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_DUMP_INTR: u16 = 16;
const NLM_F_CAPPED: u16 = 0x100;
const NLM_F_ACK_TLVS: u16 = 0x200;
const NLMSGERR_ATTR_MSG: u16 = 1;
const NLMSG_HDRLEN: usize = 16;
/// Receive buffer for one datagram: dumps and ack bursts fit easily.
const RX_BUF: usize = 1 << 20;
/// Socket receive queue: room for the acks of several thousand requests written at once.
const SOCK_RCVBUF: i32 = 32 << 20;

/// A netlink route socket bound to one network namespace.
pub(crate) struct NlSocket {
    sock: Socket,
    seq: u32,
    portid: u32,
    rx: Vec<u8>,
    tx: Vec<u8>,
    pending: usize,
    /// "netns /var/run/netns/x" for messages.
    pub(crate) netns: String,
}

fn set_int_opt(fd: i32, level: i32, opt: i32, value: i32) -> io::Result<()> {
    // SAFETY: setsockopt reads exactly size_of::<i32>() bytes from a valid local.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            &value as *const i32 as *const libc::c_void,
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Grow a socket's receive queue: SO_RCVBUFFORCE (root) first, the capped SO_RCVBUF otherwise.
pub(crate) fn grow_rcvbuf(fd: i32, bytes: i32) -> io::Result<()> {
    set_int_opt(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, bytes)
        .or_else(|_| set_int_opt(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, bytes))
}

/// recv(2) one datagram into `buf`, retrying on EINTR.
pub(crate) fn recv_into(fd: i32, buf: &mut [u8], flags: i32) -> io::Result<usize> {
    loop {
        // SAFETY: buf is a valid writable slice of buf.len() bytes.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), flags) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// The fixed netlink header fields of the message at `buf[off..]`: (len, type, flags, seq, pid).
pub(crate) fn header_at(buf: &[u8], off: usize) -> Option<(usize, u16, u16, u32, u32)> {
    let h = buf.get(off..off + NLMSG_HDRLEN)?;
    let len = u32::from_ne_bytes([h[0], h[1], h[2], h[3]]) as usize;
    let ty = u16::from_ne_bytes([h[4], h[5]]);
    let flags = u16::from_ne_bytes([h[6], h[7]]);
    let seq = u32::from_ne_bytes([h[8], h[9], h[10], h[11]]);
    let pid = u32::from_ne_bytes([h[12], h[13], h[14], h[15]]);
    if len < NLMSG_HDRLEN || off + len > buf.len() {
        return None;
    }
    Some((len, ty, flags, seq, pid))
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Decode an NLMSG_ERROR message (an ack when the code is 0) whose bytes are `msg`.
fn parse_ack(msg: &[u8], flags: u16) -> Option<NlError> {
    let code = i32::from_ne_bytes(msg.get(16..20)?.try_into().ok()?);
    if code == 0 {
        return None;
    }
    let mut err = NlError {
        errno: -code,
        message: None,
    };
    if flags & NLM_F_ACK_TLVS != 0 {
        // The echoed request is only its header when the kernel capped it (NETLINK_CAP_ACK).
        let echoed = if flags & NLM_F_CAPPED != 0 {
            NLMSG_HDRLEN
        } else {
            msg.get(20..24)
                .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize)
                .unwrap_or(NLMSG_HDRLEN)
        };
        let mut off = 20 + align4(echoed);
        while let Some(tlv) = msg.get(off..off + 4) {
            let len = u16::from_ne_bytes([tlv[0], tlv[1]]) as usize;
            let ty = u16::from_ne_bytes([tlv[2], tlv[3]]) & 0x3fff;
            if len < 4 || off + len > msg.len() {
                break;
            }
            if ty == NLMSGERR_ATTR_MSG {
                let raw = &msg[off + 4..off + len];
                let s = raw.split(|b| *b == 0).next().unwrap_or(raw);
                err.message = Some(String::from_utf8_lossy(s).into_owned());
            }
            off += align4(len);
        }
    }
    Some(err)
}

impl NlSocket {
    /// Open a route socket inside `netns` (`None`: the current namespace).
    pub(crate) fn open(netns: Option<&Path>) -> Result<NlSocket, DataplaneError> {
        let label = ns_label(netns);
        in_netns(netns, || {
            NlSocket::open_here(label.clone()).map_err(|source| DataplaneError::Socket {
                netns: label.clone(),
                source,
            })
        })
    }

    fn open_here(netns: String) -> io::Result<NlSocket> {
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        let addr = sock.bind_auto()?;
        // Extended acks carry the kernel's reason; capped acks keep a burst of acks small; strict
        // checking makes dumps filter in the kernel (by protocol and table).
        sock.set_ext_ack(true)?;
        sock.set_cap_ack(true)?;
        sock.set_netlink_get_strict_chk(true)?;
        grow_rcvbuf(sock.as_raw_fd(), SOCK_RCVBUF)?;
        let _ = set_int_opt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUFFORCE,
            8 << 20,
        );
        Ok(NlSocket {
            sock,
            seq: 1,
            portid: addr.port_number(),
            rx: vec![0u8; RX_BUF],
            tx: Vec::with_capacity(1 << 20),
            pending: 0,
            netns,
        })
    }

    /// This socket's netlink port id: the kernel stamps it on the notifications our own writes cause.
    pub(crate) fn portid(&self) -> u32 {
        self.portid
    }

    /// Queue one request (flags: NLM_F_CREATE / REPLACE / EXCL as needed; REQUEST and ACK are added) for
    /// the next [`NlSocket::write_batch`]. Returns its sequence number.
    pub(crate) fn queue(&mut self, msg: RouteNetlinkMessage, flags: u16) -> u32 {
        self.seq = self.seq.wrapping_add(1).max(1);
        encode_into(&mut self.tx, self.seq, msg, flags);
        self.pending += 1;
        self.seq
    }

    /// Write every queued request in one `sendmsg`, then read their acks; `on_ack(seq, error)` is called
    /// once per request. The kernel handles the messages in order and stops at none of them.
    pub(crate) fn write_batch(
        &mut self,
        on_ack: impl FnMut(u32, Option<NlError>),
    ) -> io::Result<()> {
        let count = std::mem::take(&mut self.pending);
        let tx = std::mem::take(&mut self.tx);
        let r = self.send_and_ack(&tx, count, on_ack);
        self.tx = tx;
        self.tx.clear();
        r
    }

    /// Write `count` already-encoded requests (`bytes`) in one `sendmsg` and read their `count` acks.
    pub(crate) fn send_and_ack(
        &mut self,
        bytes: &[u8],
        count: usize,
        mut on_ack: impl FnMut(u32, Option<NlError>),
    ) -> io::Result<()> {
        let mut remaining = count;
        if remaining == 0 {
            return Ok(());
        }
        self.sock.send(bytes, 0)?;
        let fd = self.sock.as_raw_fd();
        while remaining > 0 {
            let n = recv_into(fd, &mut self.rx, 0)?;
            let mut off = 0;
            while let Some((len, ty, flags, seq, _)) = header_at(&self.rx[..n], off) {
                if ty == NLMSG_ERROR {
                    on_ack(seq, parse_ack(&self.rx[off..off + len], flags));
                    remaining = remaining.saturating_sub(1);
                }
                off += align4(len);
            }
        }
        Ok(())
    }

    /// One request, acknowledged.
    pub(crate) fn request(&mut self, msg: RouteNetlinkMessage, flags: u16) -> Result<(), NlError> {
        if self.pending != 0 {
            // Never mix a synchronous request into a half-built batch.
            self.tx.clear();
            self.pending = 0;
        }
        let seq = self.queue(msg, flags);
        let mut result = Ok(());
        self.write_batch(|s, e| {
            if s == seq {
                if let Some(e) = e {
                    result = Err(e);
                }
            }
        })
        .map_err(|e| NlError::io(&e))?;
        result
    }

    /// A dump request; returns every message of the reply. Retries when the kernel says the dump was
    /// interrupted by a concurrent change (NLM_F_DUMP_INTR).
    pub(crate) fn dump(
        &mut self,
        msg: RouteNetlinkMessage,
    ) -> Result<Vec<RouteNetlinkMessage>, NlError> {
        for _ in 0..5 {
            match self.collect(msg.clone(), NLM_F_DUMP)? {
                (out, false) => return Ok(out),
                (_, true) => continue,
            }
        }
        Err(NlError {
            errno: libc::EAGAIN,
            message: Some("dump kept being interrupted by concurrent changes".into()),
        })
    }

    /// A get request (RTM_GETLINK by name, ...): the kernel's reply messages, then its ack.
    pub(crate) fn get(
        &mut self,
        msg: RouteNetlinkMessage,
    ) -> Result<Vec<RouteNetlinkMessage>, NlError> {
        self.collect(msg, NLM_F_ACK).map(|(out, _)| out)
    }

    /// Send one request and gather its reply messages until NLMSG_DONE or the ack.
    fn collect(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<(Vec<RouteNetlinkMessage>, bool), NlError> {
        self.tx.clear();
        self.pending = 0;
        self.seq = self.seq.wrapping_add(1).max(1);
        let seq = self.seq;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = seq;
        let mut nl = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        nl.finalize();
        let mut buf = vec![0u8; nl.buffer_len()];
        nl.serialize(&mut buf);
        self.sock.send(&buf, 0).map_err(|e| NlError::io(&e))?;
        let fd = self.sock.as_raw_fd();
        let mut out = Vec::new();
        let mut interrupted = false;
        loop {
            let n = recv_into(fd, &mut self.rx, 0).map_err(|e| NlError::io(&e))?;
            let mut off = 0;
            while let Some((len, ty, flags, mseq, _)) = header_at(&self.rx[..n], off) {
                let this = &self.rx[off..off + len];
                off += align4(len);
                if mseq != seq {
                    continue;
                }
                if flags & NLM_F_DUMP_INTR != 0 {
                    interrupted = true;
                }
                match ty {
                    NLMSG_DONE => return Ok((out, interrupted)),
                    NLMSG_ERROR => {
                        return match parse_ack(this, flags) {
                            Some(e) => Err(e),
                            None => Ok((out, interrupted)),
                        }
                    }
                    _ => {
                        match NetlinkMessage::<RouteNetlinkMessage>::deserialize(this) {
                            Ok(m) => {
                                if let NetlinkPayload::InnerMessage(inner) = m.payload {
                                    out.push(inner);
                                }
                            }
                            // A message this crate version cannot decode is not ours to judge: skip it.
                            Err(e) => {
                                tracing::debug!(netns = %self.netns, error = %e, "skipping undecodable netlink message")
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Append one request (REQUEST and ACK added to `flags`) with sequence number `seq` to `buf`.
pub(crate) fn encode_into(buf: &mut Vec<u8>, seq: u32, msg: RouteNetlinkMessage, flags: u16) {
    let mut header = NetlinkHeader::default();
    header.flags = flags | NLM_F_REQUEST | NLM_F_ACK;
    header.sequence_number = seq;
    let mut nl = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
    nl.finalize();
    let start = buf.len();
    buf.resize(start + nl.buffer_len(), 0);
    nl.serialize(&mut buf[start..]);
}

/// Decode one notification datagram's messages, with each message's sender port id.
pub(crate) fn decode_all(buf: &[u8]) -> Vec<(u32, RouteNetlinkMessage)> {
    let mut out = Vec::new();
    let mut off = 0;
    while let Some((len, _ty, _flags, _seq, pid)) = header_at(buf, off) {
        if let Ok(m) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[off..off + len]) {
            if let NetlinkPayload::InnerMessage(inner) = m.payload {
                out.push((pid, inner));
            }
        }
        off += align4(len);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_with_extended_message_is_decoded() {
        // nlmsghdr(16) + error(-17) + capped echoed header(16) + TLV MSG "boom\0"
        let mut m = Vec::new();
        let total = 16 + 4 + 16 + 4 + 8;
        m.extend_from_slice(&(total as u32).to_ne_bytes());
        m.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        m.extend_from_slice(&(NLM_F_CAPPED | NLM_F_ACK_TLVS).to_ne_bytes());
        m.extend_from_slice(&7u32.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&(-17i32).to_ne_bytes());
        m.extend_from_slice(&[0u8; 16]);
        m.extend_from_slice(&9u16.to_ne_bytes());
        m.extend_from_slice(&NLMSGERR_ATTR_MSG.to_ne_bytes());
        m.extend_from_slice(b"boom\0\0\0\0");
        let (len, ty, flags, seq, _) = header_at(&m, 0).expect("header");
        assert_eq!((len, ty, seq), (total, NLMSG_ERROR, 7));
        let e = parse_ack(&m, flags).expect("an error");
        assert_eq!(e.errno, libc::EEXIST);
        assert_eq!(e.message.as_deref(), Some("boom"));
    }

    #[test]
    fn success_ack_is_none() {
        let mut m = vec![0u8; 36];
        m[16..20].copy_from_slice(&0i32.to_ne_bytes());
        assert!(parse_ack(&m, NLM_F_CAPPED).is_none());
    }
}
