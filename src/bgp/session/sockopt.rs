//! Socket options a BGP session needs and std does not offer: TCP MD5 signatures (RFC 2385), the
//! outgoing TTL for multihop, and GTSM's minimum incoming TTL (RFC 5082). Thin, checked wrappers around
//! setsockopt(2); every error names the option and the peer.

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, RawFd};

use linux_raw_sys::net as sys;

fn setsockopt_raw<T>(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> io::Result<()> {
    let len = std::mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: `value` points to a live, initialised T of `len` bytes for the duration of the call; the
    // kernel only reads from it.
    let rc = unsafe { libc::setsockopt(fd, level, name, (value as *const T).cast(), len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Install (or with `None` remove) the TCP MD5 key for `peer` on `sock` (RFC 2385; Linux TCP_MD5SIG).
/// On a listening socket the key applies to connections from `peer`; on a connecting socket, to the
/// connection itself. An IPv4 peer on an IPv6 socket is keyed by its IPv4-mapped address.
pub fn set_md5(
    sock: &impl AsRawFd,
    family_v6: bool,
    peer: IpAddr,
    key: Option<&[u8]>,
) -> io::Result<()> {
    let key = key.unwrap_or(&[]);
    if key.len() > sys::TCP_MD5SIG_MAXKEYLEN as usize {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "TCP MD5 password is {} bytes; Linux allows at most 80",
                key.len()
            ),
        ));
    }
    // SAFETY: tcp_md5sig is plain old data; all-zero is a valid value.
    let mut sig: sys::tcp_md5sig = unsafe { std::mem::zeroed() };
    let storage = &mut sig.tcpm_addr as *mut sys::__kernel_sockaddr_storage;
    let peer = match (peer, family_v6) {
        (IpAddr::V4(v4), true) => IpAddr::V6(v4.to_ipv6_mapped()),
        (p, _) => p,
    };
    match peer {
        IpAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is 128 bytes, larger than sockaddr_in; both are plain data.
            unsafe { std::ptr::write_unaligned(storage.cast::<libc::sockaddr_in>(), sin) };
        }
        IpAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: 0,
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: as above, sockaddr_in6 (28 bytes) fits in sockaddr_storage.
            unsafe { std::ptr::write_unaligned(storage.cast::<libc::sockaddr_in6>(), sin6) };
        }
    }
    sig.tcpm_keylen = key.len() as u16;
    sig.tcpm_key[..key.len()].copy_from_slice(key);
    setsockopt_raw(
        sock.as_raw_fd(),
        libc::IPPROTO_TCP,
        sys::TCP_MD5SIG as libc::c_int,
        &sig,
    )
}

/// Set the TTL / hop limit of outgoing packets (eBGP multihop, or 255 for GTSM).
pub fn set_ttl(sock: &impl AsRawFd, v6: bool, ttl: u8) -> io::Result<()> {
    let v = libc::c_int::from(ttl);
    if v6 {
        setsockopt_raw(
            sock.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_UNICAST_HOPS,
            &v,
        )?;
        // An IPv6 socket may carry IPv4-mapped traffic too; that uses IP_TTL. Not every socket allows it.
        let _ = setsockopt_raw(sock.as_raw_fd(), libc::IPPROTO_IP, libc::IP_TTL, &v);
        Ok(())
    } else {
        setsockopt_raw(sock.as_raw_fd(), libc::IPPROTO_IP, libc::IP_TTL, &v)
    }
}

/// GTSM (RFC 5082): drop incoming packets whose TTL is below `min_ttl`.
pub fn set_min_ttl(sock: &impl AsRawFd, v6: bool, min_ttl: u8) -> io::Result<()> {
    let v = libc::c_int::from(min_ttl);
    if v6 {
        setsockopt_raw(
            sock.as_raw_fd(),
            libc::IPPROTO_IPV6,
            sys::IPV6_MINHOPCOUNT as libc::c_int,
            &v,
        )?;
        let _ = setsockopt_raw(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            sys::IP_MINTTL as libc::c_int,
            &v,
        );
        Ok(())
    } else {
        setsockopt_raw(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            sys::IP_MINTTL as libc::c_int,
            &v,
        )
    }
}

/// Apply the TTL settings of a peer to a connected or connecting socket: GTSM when `ttl_security_hops`
/// is set (send 255, accept at least 256 - hops), else the multihop TTL when set.
pub fn apply_ttl(
    sock: &impl AsRawFd,
    v6: bool,
    ttl: Option<u8>,
    ttl_security_hops: Option<u8>,
) -> io::Result<()> {
    if let Some(hops) = ttl_security_hops {
        set_ttl(sock, v6, 255)?;
        let min = 256u16.saturating_sub(u16::from(hops.max(1))) as u8;
        set_min_ttl(sock, v6, min)?;
    } else if let Some(t) = ttl {
        set_ttl(sock, v6, t)?;
    }
    Ok(())
}

/// The plain-words form of an I/O error for status lines: "connection refused" rather than
/// "Connection refused (os error 111)".
pub fn io_text(e: &io::Error) -> String {
    let kind = e.kind().to_string();
    // Kinds without a specific description read worse than the OS message.
    if kind.contains("other") || kind.contains("uncategorized") {
        e.to_string()
    } else {
        kind
    }
}
