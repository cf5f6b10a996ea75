//! The socket options a session sets, read back from the kernel: GTSM (send TTL 255, minimum TTL
//! 256 - hops), multihop TTL, and TCP MD5 keys on listening sockets (set and removed).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;

use margay::bgp::session::sockopt::{apply_ttl, set_md5};

fn getsockopt_int(fd: i32, level: i32, name: i32) -> i32 {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: v and len are valid for the call.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            level,
            name,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "getsockopt: {}", std::io::Error::last_os_error());
    v
}

const IP_MINTTL: i32 = 21;
const IPV6_MINHOPCOUNT: i32 = 73;

#[test]
fn gtsm_sets_ttl_255_and_min_ttl() {
    // TCP sockets take the same IP-level options; a TCP socket before connect is what the peer uses.
    let t = tokio::net::TcpSocket::new_v4().expect("tcp socket");
    apply_ttl(&t, false, Some(10), Some(2)).expect("apply GTSM");
    assert_eq!(
        getsockopt_int(t.as_raw_fd(), libc::IPPROTO_IP, libc::IP_TTL),
        255
    );
    assert_eq!(
        getsockopt_int(t.as_raw_fd(), libc::IPPROTO_IP, IP_MINTTL),
        254
    );

    let t = tokio::net::TcpSocket::new_v4().expect("tcp socket");
    apply_ttl(&t, false, Some(10), None).expect("apply multihop TTL");
    assert_eq!(
        getsockopt_int(t.as_raw_fd(), libc::IPPROTO_IP, libc::IP_TTL),
        10
    );
    assert_eq!(
        getsockopt_int(t.as_raw_fd(), libc::IPPROTO_IP, IP_MINTTL),
        0
    );

    if let Ok(t6) = tokio::net::TcpSocket::new_v6() {
        apply_ttl(&t6, true, None, Some(1)).expect("apply GTSM v6");
        assert_eq!(
            getsockopt_int(t6.as_raw_fd(), libc::IPPROTO_IPV6, libc::IPV6_UNICAST_HOPS),
            255
        );
        assert_eq!(
            getsockopt_int(t6.as_raw_fd(), libc::IPPROTO_IPV6, IPV6_MINHOPCOUNT),
            255
        );
    }
}

#[test]
fn md5_keys_on_a_listening_socket() {
    let t = tokio::net::TcpSocket::new_v4().expect("tcp socket");
    let peer = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));
    set_md5(&t, false, peer, Some(b"secret")).expect("set key");
    // Removing it works once; a second removal finds no key.
    set_md5(&t, false, peer, None).expect("remove key");
    let e = set_md5(&t, false, peer, None).expect_err("no key left to remove");
    assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
    let long = [b'x'; 81];
    let e = set_md5(&t, false, peer, Some(&long)).expect_err("too long");
    assert!(e.to_string().contains("at most 80"), "{e}");

    if let Ok(t6) = tokio::net::TcpSocket::new_v6() {
        // IPv4 peers on an IPv6 socket are keyed by their mapped address.
        set_md5(&t6, true, peer, Some(b"k")).expect("v4-mapped key");
        set_md5(&t6, true, IpAddr::V6(Ipv6Addr::LOCALHOST), Some(b"k")).expect("v6 key");
    }
}
