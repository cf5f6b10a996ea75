//! BGP wire codec: pure functions over bytes. No I/O, no tokio, no globals; what a session negotiated
//! (4-octet AS, ADD-PATH, extended messages) travels in the decode/encode context.
//!
//! It owns the byte layout of every BGP message (RFC 4271 4), OPEN capabilities (RFC 5492, 4760, 6793,
//! 2918, 4724, 7911, 8654, 8950, RFC 9072 extended optional parameters), path attributes and NLRI. It must
//! never do I/O, keep state between calls, or decide policy (eBGP/iBGP checks, next-hop sanity beyond
//! syntax and AS loop detection belong to the session and the RIB).
//!
//! # Using it
//! - A session reads bytes into a buffer and calls [`DecodeCtx::peek_len`] (or [`decode_from`], which
//!   does the framing) until a whole message is there, then [`decode`] / [`decode_full`] on exactly one
//!   message. Before the OPEN exchange use `DecodeCtx::default()`; afterwards [`contexts`] derives both
//!   contexts from the two OPENs.
//! - Outgoing single messages go through [`encode`]; the RIB's bulk path is [`encode_updates`] (many
//!   prefixes sharing one attribute set, packed into as few UPDATEs as the maximum size allows) and
//!   [`encode_withdrawals`].
//!
//! # How RFC 7606 outcomes reach the session
//! - **Session reset**: `decode` returns `Err(e)` with `e.action() == SessionReset`; the session sends
//!   `e.notification()` and closes.
//! - **Treat-as-withdraw**: `decode` returns `Err(DecodeError::TreatAsWithdraw { cause, withdraw })`.
//!   `withdraw` holds every prefix the UPDATE carried (IPv4 body withdrawn + NLRI, MP_UNREACH and MP_REACH),
//!   grouped by family; the session logs `cause` and hands `withdraw` to the RIB as withdrawals.
//! - **Attribute discard**: `decode` returns `Ok(Message::Update(u))` with the bad attribute removed.
//!   [`decode_full`] returns the same message plus [`Decoded::discarded`], one error per dropped
//!   attribute (each with action `AttributeDiscard`) for the session to log or count.
//!
//! # 2-octet AS peers (RFC 6793)
//! In memory AS numbers are always 4 octets. With `four_octet_as == false`, decode reads the 2-octet
//! AS_PATH / AGGREGATOR and merges AS4_PATH / AS4_AGGREGATOR into them (RFC 6793 4.2.3); encode writes
//! AS_TRANS for ASes above 65535 and adds AS4_PATH / AS4_AGGREGATOR when needed (RFC 6793 4.2.2). From a
//! 4-octet peer, AS4_PATH and AS4_AGGREGATOR are ignored as RFC 6793 4.1 requires.
//!
//! # Unknown attributes
//! Unrecognised optional transitive attributes land in `PathAttributes::unknown` and are re-encoded with
//! the Partial bit set (RFC 4271 5 / 9). Unrecognised optional non-transitive attributes are dropped on
//! decode (RFC 4271 9). An unrecognised well-known attribute is a session reset (RFC 4271 6.3).
//!
//! # The peer relationship
//! With [`DecodeCtx::ebgp_peer_as`] set (an external peer), LOCAL_PREF, ORIGINATOR_ID and CLUSTER_LIST are
//! attribute-discard whatever their content (RFC 7606 7.5, 7.9, 7.10), an AS_PATH whose leftmost AS is not
//! the peer's or that carries confederation segments is treat-as-withdraw (RFC 4271 6.3, RFC 7606 7.2,
//! RFC 5065 5: margay has no confederations).
//!
//! # RFC 7606 5.2: nothing to withdraw
//! An UPDATE that carries path attributes but announces nothing (no NLRI field, no MP_REACH NLRI) and hits
//! an error whose approach is not attribute-discard is a session reset: treat-as-withdraw would silently
//! accept it. [`DecodeError::NothingToWithdraw`] wraps the cause and sends its NOTIFICATION.
//!
//! # Left to the session (it knows what the codec does not)
//! A missing LOCAL_PREF from an iBGP peer (RFC 7606 3 (d)); NEXT_HOP semantics (own address, martians);
//! NLRI of a family that was not negotiated (RFC 4760 7); the negotiated maximum message length while
//! framing the byte stream ([`DecodeCtx::peek_len`]: RFC 4271 6.1, answered at once, before the body).
//! MP_REACH / MP_UNREACH of families other than IPv4 / IPv6 unicast are dropped on decode. Prefix host
//! bits beyond the prefix length are cleared on decode and encode.

pub mod error;
mod nlri;
mod open;
pub mod types;
mod update;

use std::collections::BTreeSet;

use bytes::{BufMut, BytesMut};

pub use error::{attribute_action, DecodeError, EncodeError, Rfc7606Action};
pub use nlri::{decode_nlri, encode_nlri, nlri_len};
pub use open::contexts;
pub use types::*;
pub use update::{encode_updates, encode_withdrawals};

/// Length of the fixed message header (RFC 4271 4.1).
pub const HEADER_LEN: usize = 19;
/// Maximum message size without extended messages (RFC 4271 4).
pub const MAX_MESSAGE_LEN: usize = 4096;
/// Maximum message size with extended messages negotiated (RFC 8654).
pub const MAX_EXTENDED_MESSAGE_LEN: usize = 65535;

/// Message type codes (RFC 4271 4.1, RFC 2918).
pub mod msg_type {
    pub const OPEN: u8 = 1;
    pub const UPDATE: u8 = 2;
    pub const NOTIFICATION: u8 = 3;
    pub const KEEPALIVE: u8 = 4;
    pub const ROUTE_REFRESH: u8 = 5;
}

/// NOTIFICATION error codes (RFC 4271 4.5, RFC 7313 5) and the Cease subcodes (RFC 4486) sessions send.
pub mod notif {
    pub const HEADER: u8 = 1;
    pub const OPEN: u8 = 2;
    pub const UPDATE: u8 = 3;
    pub const HOLD_TIMER_EXPIRED: u8 = 4;
    pub const FSM: u8 = 5;
    pub const CEASE: u8 = 6;
    pub const ROUTE_REFRESH: u8 = 7;
    /// OPEN subcodes (RFC 4271 6.2, RFC 5492).
    pub const OPEN_BAD_PEER_AS: u8 = 2;
    pub const OPEN_BAD_BGP_ID: u8 = 3;
    pub const OPEN_UNACCEPTABLE_HOLD_TIME: u8 = 6;
    pub const OPEN_UNSUPPORTED_CAPABILITY: u8 = 7;
    /// Cease subcodes (RFC 4486 4).
    pub const CEASE_MAX_PREFIXES: u8 = 1;
    pub const CEASE_ADMIN_SHUTDOWN: u8 = 2;
    pub const CEASE_PEER_DECONFIGURED: u8 = 3;
    pub const CEASE_ADMIN_RESET: u8 = 4;
    pub const CEASE_CONNECTION_REJECTED: u8 = 5;
    pub const CEASE_OTHER_CONFIG_CHANGE: u8 = 6;
    pub const CEASE_COLLISION_RESOLUTION: u8 = 7;
    pub const CEASE_OUT_OF_RESOURCES: u8 = 8;
    /// RFC 8538 3.
    pub const CEASE_HARD_RESET: u8 = 9;
}

/// Path attribute type codes (IANA "BGP Path Attributes").
pub mod attr {
    pub const ORIGIN: u8 = 1;
    pub const AS_PATH: u8 = 2;
    pub const NEXT_HOP: u8 = 3;
    pub const MULTI_EXIT_DISC: u8 = 4;
    pub const LOCAL_PREF: u8 = 5;
    pub const ATOMIC_AGGREGATE: u8 = 6;
    pub const AGGREGATOR: u8 = 7;
    pub const COMMUNITIES: u8 = 8;
    pub const ORIGINATOR_ID: u8 = 9;
    pub const CLUSTER_LIST: u8 = 10;
    pub const MP_REACH_NLRI: u8 = 14;
    pub const MP_UNREACH_NLRI: u8 = 15;
    pub const EXTENDED_COMMUNITIES: u8 = 16;
    pub const AS4_PATH: u8 = 17;
    pub const AS4_AGGREGATOR: u8 = 18;
    pub const LARGE_COMMUNITIES: u8 = 32;

    /// Attribute flag bits (RFC 4271 4.3).
    pub const FLAG_OPTIONAL: u8 = 0x80;
    pub const FLAG_TRANSITIVE: u8 = 0x40;
    pub const FLAG_PARTIAL: u8 = 0x20;
    pub const FLAG_EXTENDED_LENGTH: u8 = 0x10;

    /// The name an operator knows, for error messages.
    pub fn name(type_code: u8) -> &'static str {
        match type_code {
            ORIGIN => "ORIGIN",
            AS_PATH => "AS_PATH",
            NEXT_HOP => "NEXT_HOP",
            MULTI_EXIT_DISC => "MULTI_EXIT_DISC",
            LOCAL_PREF => "LOCAL_PREF",
            ATOMIC_AGGREGATE => "ATOMIC_AGGREGATE",
            AGGREGATOR => "AGGREGATOR",
            COMMUNITIES => "COMMUNITIES",
            ORIGINATOR_ID => "ORIGINATOR_ID",
            CLUSTER_LIST => "CLUSTER_LIST",
            MP_REACH_NLRI => "MP_REACH_NLRI",
            MP_UNREACH_NLRI => "MP_UNREACH_NLRI",
            EXTENDED_COMMUNITIES => "EXTENDED_COMMUNITIES",
            AS4_PATH => "AS4_PATH",
            AS4_AGGREGATOR => "AS4_AGGREGATOR",
            LARGE_COMMUNITIES => "LARGE_COMMUNITIES",
            _ => "unknown attribute",
        }
    }
}

/// What the decoder needs to know about the session (negotiated in OPEN). `Default` is a fresh session
/// before OPEN negotiation: 2-octet AS, no ADD-PATH, 4096-byte messages.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DecodeCtx {
    /// Both sides sent the 4-octet AS capability (RFC 6793 3): AS_PATH and AGGREGATOR carry 4-octet ASes.
    pub four_octet_as: bool,
    /// Families for which the peer sends ADD-PATH path identifiers to us (RFC 7911 4).
    pub add_path_rx: BTreeSet<Family>,
    /// Both sides sent the extended message capability (RFC 8654): messages up to 65535 bytes.
    pub extended_message: bool,
    /// The peer's AS when the peer is external (eBGP); `None` for an internal peer. RFC 7606 7.5, 7.9 and
    /// 7.10 discard LOCAL_PREF, ORIGINATOR_ID and CLUSTER_LIST from an external peer (well-formed or not),
    /// and RFC 4271 6.3 / RFC 7606 7.2 want its AS leftmost in the AS_PATH.
    pub ebgp_peer_as: Option<u32>,
}

impl DecodeCtx {
    /// Largest message accepted for `msg_type` (RFC 8654 4: OPEN and KEEPALIVE stay at 4096).
    pub fn max_message_len(&self, msg_type: u8) -> usize {
        if self.extended_message && msg_type != msg_type::OPEN && msg_type != msg_type::KEEPALIVE {
            MAX_EXTENDED_MESSAGE_LEN
        } else {
            MAX_MESSAGE_LEN
        }
    }

    /// Like [`peek_len`], but the length is checked against this session's maximum message size.
    pub fn peek_len(&self, buf: &[u8]) -> Result<Option<usize>, DecodeError> {
        peek_len_max(buf, |t| self.max_message_len(t))
    }
}

/// What the encoder needs to know about the session (negotiated in OPEN). `Default` is a fresh session
/// before OPEN negotiation: 2-octet AS, no ADD-PATH, 4096-byte messages.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EncodeCtx {
    /// Both sides sent the 4-octet AS capability (RFC 6793 3).
    pub four_octet_as: bool,
    /// Families for which we send ADD-PATH path identifiers to the peer (RFC 7911 4).
    pub add_path_tx: BTreeSet<Family>,
    /// Both sides sent the extended message capability (RFC 8654).
    pub extended_message: bool,
}

impl EncodeCtx {
    /// Largest message we may send of `msg_type` (RFC 8654 4).
    pub fn max_message_len(&self, msg_type: u8) -> usize {
        if self.extended_message && msg_type != msg_type::OPEN && msg_type != msg_type::KEEPALIVE {
            MAX_EXTENDED_MESSAGE_LEN
        } else {
            MAX_MESSAGE_LEN
        }
    }
}

/// A decoded message plus the attributes that RFC 7606 attribute-discard removed from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    pub message: Message,
    /// One error per discarded attribute; each has `action() == AttributeDiscard`.
    pub discarded: Vec<DecodeError>,
}

/// Once the 19 header bytes are in `buf`, validate the marker, type and length (RFC 4271 6.1) and return
/// the whole message length; `Ok(None)` while fewer than 19 bytes are present. Lengths are checked
/// against the largest size any session may use (65535, RFC 8654); use [`DecodeCtx::peek_len`] to check
/// against the negotiated maximum.
pub fn peek_len(buf: &[u8]) -> Result<Option<usize>, DecodeError> {
    peek_len_max(buf, |t| {
        if t == msg_type::OPEN || t == msg_type::KEEPALIVE {
            MAX_MESSAGE_LEN
        } else {
            MAX_EXTENDED_MESSAGE_LEN
        }
    })
}

fn peek_len_max(buf: &[u8], max_for: impl Fn(u8) -> usize) -> Result<Option<usize>, DecodeError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    if buf[..16].iter().any(|&b| b != 0xff) {
        return Err(DecodeError::BadMarker);
    }
    let length = u16::from_be_bytes([buf[16], buf[17]]);
    let t = buf[18];
    let (min, max) = match t {
        msg_type::OPEN => (29, max_for(t)),
        msg_type::UPDATE => (23, max_for(t)),
        msg_type::NOTIFICATION => (21, max_for(t)),
        msg_type::KEEPALIVE => (19, 19),
        msg_type::ROUTE_REFRESH => {
            // RFC 7313 5: a ROUTE-REFRESH of the wrong length has its own NOTIFICATION.
            if length != 23 {
                return Err(DecodeError::BadRouteRefreshLength(length));
            }
            (23, 23)
        }
        other => return Err(DecodeError::BadType(other)),
    };
    let l = length as usize;
    if l < min || l > max {
        return Err(DecodeError::BadLength {
            length,
            msg_type: t,
            min,
            max,
        });
    }
    Ok(Some(l))
}

/// Decode exactly one message (`buf` holds it whole, nothing more). Attribute-discard outcomes are
/// dropped silently; use [`decode_full`] to see them.
pub fn decode(buf: &[u8], ctx: &DecodeCtx) -> Result<Message, DecodeError> {
    decode_full(buf, ctx).map(|d| d.message)
}

/// Decode exactly one message and report the attributes RFC 7606 attribute-discard removed.
pub fn decode_full(buf: &[u8], ctx: &DecodeCtx) -> Result<Decoded, DecodeError> {
    let len = match ctx.peek_len(buf)? {
        Some(l) => l,
        None => {
            return Err(DecodeError::LengthMismatch {
                declared: HEADER_LEN,
                actual: buf.len(),
            })
        }
    };
    if len != buf.len() {
        return Err(DecodeError::LengthMismatch {
            declared: len,
            actual: buf.len(),
        });
    }
    let body = &buf[HEADER_LEN..];
    let mut discarded = Vec::new();
    let message = match buf[18] {
        msg_type::OPEN => Message::Open(open::decode_open(body)?),
        msg_type::UPDATE => Message::Update(update::decode_update(body, ctx, &mut discarded)?),
        msg_type::NOTIFICATION => Message::Notification(Notification {
            code: body[0],
            subcode: body[1],
            data: body[2..].to_vec(),
        }),
        msg_type::KEEPALIVE => Message::Keepalive,
        // Length is exactly 23 (checked in the header): AFI, subtype (RFC 7313), SAFI.
        _ => Message::RouteRefresh(RouteRefresh {
            family: Family {
                afi: Afi::from_code(u16::from_be_bytes([body[0], body[1]])),
                safi: Safi::from_code(body[3]),
            },
            subtype: body[2],
        }),
    };
    Ok(Decoded { message, discarded })
}

/// Framing helper for a session's read buffer: when `buf` starts with a whole message, split it off and
/// decode it; `Ok(None)` when more bytes are needed. On an error the offending message has been removed
/// from `buf` (unless the header itself was bad, when the stream cannot be resynchronised anyway).
pub fn decode_from(buf: &mut BytesMut, ctx: &DecodeCtx) -> Result<Option<Decoded>, DecodeError> {
    match ctx.peek_len(buf)? {
        Some(len) if buf.len() >= len => {
            let msg = buf.split_to(len);
            decode_full(&msg, ctx).map(Some)
        }
        _ => Ok(None),
    }
}

/// Encode one message, appending it to `out`. On error `out` is left as it was.
pub fn encode(msg: &Message, ctx: &EncodeCtx, out: &mut BytesMut) -> Result<(), EncodeError> {
    let start = out.len();
    let r = encode_inner(msg, ctx, out);
    if r.is_err() {
        out.truncate(start);
    }
    r
}

fn encode_inner(msg: &Message, ctx: &EncodeCtx, out: &mut BytesMut) -> Result<(), EncodeError> {
    match msg {
        Message::Open(o) => {
            let start = begin_message(out, msg_type::OPEN);
            open::encode_open(o, out)?;
            finish_message(out, start, "OPEN", ctx.max_message_len(msg_type::OPEN))
        }
        Message::Update(u) => {
            let start = begin_message(out, msg_type::UPDATE);
            update::encode_update(u, ctx, out)?;
            finish_message(out, start, "UPDATE", ctx.max_message_len(msg_type::UPDATE))
        }
        Message::Notification(n) => {
            let start = begin_message(out, msg_type::NOTIFICATION);
            out.put_u8(n.code);
            out.put_u8(n.subcode);
            out.put_slice(&n.data);
            finish_message(
                out,
                start,
                "NOTIFICATION",
                ctx.max_message_len(msg_type::NOTIFICATION),
            )
        }
        Message::Keepalive => {
            let start = begin_message(out, msg_type::KEEPALIVE);
            finish_message(out, start, "KEEPALIVE", MAX_MESSAGE_LEN)
        }
        Message::RouteRefresh(r) => {
            let start = begin_message(out, msg_type::ROUTE_REFRESH);
            out.put_u16(r.family.afi.code());
            out.put_u8(r.subtype);
            out.put_u8(r.family.safi.code());
            finish_message(out, start, "ROUTE-REFRESH", MAX_MESSAGE_LEN)
        }
    }
}

/// Write the marker and type with a placeholder length; returns where the message starts.
pub(crate) fn begin_message(out: &mut BytesMut, t: u8) -> usize {
    let start = out.len();
    out.reserve(HEADER_LEN);
    out.put_slice(&[0xff; 16]);
    out.put_u16(0);
    out.put_u8(t);
    start
}

/// Fill in the length of the message that began at `start`, checking it against `max`.
pub(crate) fn finish_message(
    out: &mut BytesMut,
    start: usize,
    what: &'static str,
    max: usize,
) -> Result<(), EncodeError> {
    let length = out.len() - start;
    if length > max {
        return Err(EncodeError::MessageTooLarge { what, length, max });
    }
    out[start + 16..start + 18].copy_from_slice(&(length as u16).to_be_bytes());
    Ok(())
}
