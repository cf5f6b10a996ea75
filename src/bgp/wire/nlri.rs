//! NLRI encoding (RFC 4271 4.3, RFC 4760 5, RFC 7911 3): a length in bits, then only the significant
//! octets of the prefix, optionally preceded by a 4-octet ADD-PATH path identifier. These loops are the
//! hot path of a full-table transfer, so they push into one pre-sized `Vec` and allocate nothing per prefix.

use std::net::{Ipv4Addr, Ipv6Addr};

use bytes::{BufMut, BytesMut};
use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};

use super::error::{DecodeError, EncodeError};
use super::types::{Afi, Family, Nlri};

/// Decode a run of prefixes of `family` (IPv4 or IPv6) from `b`, appending to `out`. Host bits beyond
/// the prefix length are cleared so that prefixes compare equal however the peer padded them.
pub fn decode_nlri(
    b: &[u8],
    family: Family,
    add_path: bool,
    out: &mut Vec<Nlri>,
) -> Result<(), DecodeError> {
    match family.afi {
        Afi::Ipv4 => decode_v4(b, family, add_path, out),
        Afi::Ipv6 => decode_v6(b, family, add_path, out),
        Afi::Other(_) => Err(DecodeError::InvalidNetworkField {
            family,
            reason: "unsupported address family",
        }),
    }
}

#[inline]
fn path_id(b: &[u8], i: &mut usize, family: Family) -> Result<u32, DecodeError> {
    let Some(p) = b.get(*i..*i + 4) else {
        return Err(DecodeError::InvalidNetworkField {
            family,
            reason: "truncated ADD-PATH path identifier",
        });
    };
    *i += 4;
    Ok(u32::from_be_bytes([p[0], p[1], p[2], p[3]]))
}

fn decode_v4(
    b: &[u8],
    family: Family,
    add_path: bool,
    out: &mut Vec<Nlri>,
) -> Result<(), DecodeError> {
    // Typical full-table prefixes are /24: 4 octets each (8 with ADD-PATH).
    out.reserve(b.len() / if add_path { 8 } else { 4 });
    let mut i = 0;
    while i < b.len() {
        let path_id = if add_path {
            path_id(b, &mut i, family)?
        } else {
            0
        };
        let Some(&len) = b.get(i) else {
            return Err(DecodeError::InvalidNetworkField {
                family,
                reason: "truncated prefix",
            });
        };
        if len > 32 {
            return Err(DecodeError::InvalidNetworkField {
                family,
                reason: "IPv4 prefix length above 32",
            });
        }
        let n = (len as usize).div_ceil(8);
        let Some(p) = b.get(i + 1..i + 1 + n) else {
            return Err(DecodeError::InvalidNetworkField {
                family,
                reason: "prefix runs past the end of the NLRI",
            });
        };
        let mut oct = [0u8; 4];
        oct[..n].copy_from_slice(p);
        let mask = if len == 0 {
            0
        } else {
            u32::MAX << (32 - len as u32)
        };
        let addr = Ipv4Addr::from(u32::from_be_bytes(oct) & mask);
        let Some(net) = Ipv4Network::new_checked(addr, len) else {
            return Err(DecodeError::InvalidNetworkField {
                family,
                reason: "IPv4 prefix length above 32",
            });
        };
        out.push(Nlri {
            prefix: IpNetwork::V4(net),
            path_id,
        });
        i += 1 + n;
    }
    Ok(())
}

fn decode_v6(
    b: &[u8],
    family: Family,
    add_path: bool,
    out: &mut Vec<Nlri>,
) -> Result<(), DecodeError> {
    out.reserve(b.len() / if add_path { 10 } else { 6 });
    let mut i = 0;
    while i < b.len() {
        let path_id = if add_path {
            path_id(b, &mut i, family)?
        } else {
            0
        };
        let Some(&len) = b.get(i) else {
            return Err(DecodeError::InvalidNetworkField {
                family,
                reason: "truncated prefix",
            });
        };
        if len > 128 {
            return Err(DecodeError::InvalidNetworkField {
                family,
                reason: "IPv6 prefix length above 128",
            });
        }
        let n = (len as usize).div_ceil(8);
        let Some(p) = b.get(i + 1..i + 1 + n) else {
            return Err(DecodeError::InvalidNetworkField {
                family,
                reason: "prefix runs past the end of the NLRI",
            });
        };
        let mut oct = [0u8; 16];
        oct[..n].copy_from_slice(p);
        let mask = if len == 0 {
            0
        } else {
            u128::MAX << (128 - len as u32)
        };
        let addr = Ipv6Addr::from(u128::from_be_bytes(oct) & mask);
        let Some(net) = Ipv6Network::new_checked(addr, len) else {
            return Err(DecodeError::InvalidNetworkField {
                family,
                reason: "IPv6 prefix length above 128",
            });
        };
        out.push(Nlri {
            prefix: IpNetwork::V6(net),
            path_id,
        });
        i += 1 + n;
    }
    Ok(())
}

/// Bytes one prefix takes on the wire.
#[inline]
pub fn nlri_len(n: &Nlri, add_path: bool) -> usize {
    1 + (n.prefix.prefix() as usize).div_ceil(8) + if add_path { 4 } else { 0 }
}

/// Append one prefix of `family` to `out` (host bits beyond the length are cleared).
#[inline]
pub fn encode_nlri(
    n: &Nlri,
    family: Family,
    add_path: bool,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    if add_path {
        out.put_u32(n.path_id);
    }
    let len = n.prefix.prefix();
    let bytes = (len as usize).div_ceil(8);
    match (n.prefix, family.afi) {
        (IpNetwork::V4(p), Afi::Ipv4) => {
            let mask = if len == 0 {
                0
            } else {
                u32::MAX << (32 - len as u32)
            };
            let oct = (u32::from(p.ip()) & mask).to_be_bytes();
            out.put_u8(len);
            out.put_slice(&oct[..bytes]);
        }
        (IpNetwork::V6(p), Afi::Ipv6) => {
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - len as u32)
            };
            let oct = (u128::from(p.ip()) & mask).to_be_bytes();
            out.put_u8(len);
            out.put_slice(&oct[..bytes]);
        }
        (prefix, _) => return Err(EncodeError::WrongFamily { family, prefix }),
    }
    Ok(())
}

/// Longest encoding of one prefix: path id, length, 16 address octets.
const MAX_NLRI_LEN: usize = 4 + 1 + 16;

/// Append a run of prefixes. The hot path of a full-table transfer: the buffer is grown once and each
/// prefix is written as a fixed-size record that the next one partly overwrites, which compiles to a
/// few moves per prefix instead of a variable-length copy.
pub(crate) fn encode_nlris(
    nlri: &[Nlri],
    family: Family,
    add_path: bool,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    let size = nlri.iter().map(|n| nlri_len(n, add_path)).sum();
    encode_nlris_sized(nlri, family, add_path, size, out)
}

/// [`encode_nlris`] when the caller already knows the encoded size (the sum of [`nlri_len`]).
pub(crate) fn encode_nlris_sized(
    nlri: &[Nlri],
    family: Family,
    add_path: bool,
    size: usize,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    let start = out.len();
    out.resize(start + size + MAX_NLRI_LEN, 0);
    let buf = &mut out[start..];
    let mut pos = 0;
    for n in nlri {
        let mut rec = [0u8; MAX_NLRI_LEN];
        let mut k = 0;
        if add_path {
            rec[..4].copy_from_slice(&n.path_id.to_be_bytes());
            k = 4;
        }
        let len = n.prefix.prefix();
        let bytes = (len as usize).div_ceil(8);
        rec[k] = len;
        match (n.prefix, family.afi) {
            (IpNetwork::V4(p), Afi::Ipv4) => {
                let mask = if len == 0 {
                    0
                } else {
                    u32::MAX << (32 - len as u32)
                };
                rec[k + 1..k + 5].copy_from_slice(&(u32::from(p.ip()) & mask).to_be_bytes());
            }
            (IpNetwork::V6(p), Afi::Ipv6) => {
                let mask = if len == 0 {
                    0
                } else {
                    u128::MAX << (128 - len as u32)
                };
                rec[k + 1..k + 17].copy_from_slice(&(u128::from(p.ip()) & mask).to_be_bytes());
            }
            (prefix, _) => {
                out.truncate(start);
                return Err(EncodeError::WrongFamily { family, prefix });
            }
        }
        // `size` is the sum of the records' lengths, so a whole record always fits in the slack.
        buf[pos..pos + MAX_NLRI_LEN].copy_from_slice(&rec);
        pos += k + 1 + bytes;
    }
    out.truncate(start + pos);
    Ok(())
}
