//! Typed codec errors. A [`DecodeError`] knows the NOTIFICATION it maps to (RFC 4271 section 6) and the
//! RFC 7606 action a session takes for it, so no caller re-derives RFC codes; an [`EncodeError`] says
//! why a message we built cannot go on the wire.
//!
//! # Audit: RFC 4271 6.1-6.3 and RFC 7606, rule by rule
//!
//! Each rule, what margay does, and the test that proves it (`wv::` = `tests/wire_vectors.rs`, byte
//! vectors; `sm::` = `tests/session_malformed.rs`, a live session over loopback against a scripted peer;
//! `rm::` = `tests/reflector_malformed.rs`, the reflector binary with BIRD beside the crafted peer).
//! TaW = treat-as-withdraw, discard = attribute discard, reset = NOTIFICATION and close.
//!
//! | rule | margay | proved by |
//! |---|---|---|
//! | 4271 6.1 marker not all ones | reset 1/1 | `wv::header_errors_map_to_rfc4271_6_1` |
//! | 4271 6.1 length < 19, > 4096 (65535 with RFC 8654 for UPDATE only), or wrong for the type | reset 1/2, the length as data, from the 19 header octets alone | `wv::header_errors_map_to_rfc4271_6_1`, `wv::rfc4271_6_1_header_length_over_the_negotiated_maximum`, `sm::rfc7606_and_rfc4271_samples_over_a_live_session` |
//! | 4271 6.1 unknown type | reset 1/3, the type as data | `wv::header_errors_map_to_rfc4271_6_1` |
//! | 4271 6.2 version not 4 | reset 2/1, data = 4 (2 octets) | `wv::open_errors_map_to_rfc4271_6_2` |
//! | 4271 6.2 bad peer AS | reset 2/2 (session FSM, against the configured AS) | `tests/session_fsm.rs`, `reflector_interop::wrong_as_and_wrong_password_keep_sessions_down` |
//! | 4271 6.2 BGP identifier 0 (RFC 6286) | reset 2/3 | `wv::open_errors_map_to_rfc4271_6_2` |
//! | 4271 6.2 unsupported optional parameter | reset 2/4 | `wv::open_errors_map_to_rfc4271_6_2` |
//! | 4271 6.2 hold time 1 or 2 | reset 2/6 | `wv::open_errors_map_to_rfc4271_6_2` |
//! | 4271 6.2 malformed parameters / capabilities | reset 2/0 | `wv::open_errors_map_to_rfc4271_6_2` |
//! | 4271 6.3 / 7606 3 (a) a reset in an UPDATE uses code 3 (UPDATE Message Error) | every UPDATE reset maps to 3/x | `wv::rfc7606_per_attribute_actions`, `wv::rfc7606_audit_remaining_rules` |
//! | 7606 3 (b) withdrawn length + attribute length + 23 > message length | reset 3/1 | `wv::rfc7606_session_reset_for_bad_nlri_and_lengths` |
//! | 7606 3 (c) optional/transitive flags wrong | TaW 3/4 (discard for ATOMIC_AGGREGATE, AGGREGATOR, AS4_*: 3 (f); reset for MP_*: 5.3) | `wv::rfc7606_per_attribute_actions`, `wv::rfc7606_audit_remaining_rules`, `sm::malformed_updates_get_rfc7606_treatment_and_other_sessions_are_untouched` |
//! | 7606 3 (d) well-known mandatory missing (NEXT_HOP only with IPv4 NLRI, RFC 4760 3) | TaW 3/3 | `wv::rfc7606_per_attribute_actions` |
//! | 7606 3 (e) reset cases of ORIGIN, AS_PATH, NEXT_HOP, MED, LOCAL_PREF | TaW | 7.1-7.5 rows |
//! | 7606 3 (f) reset cases of ATOMIC_AGGREGATE, AGGREGATOR | discard | 7.6, 7.7 rows, `wv::rfc7606_audit_remaining_rules` (flags) |
//! | 7606 3 (g) MP_REACH or MP_UNREACH twice | reset 3/1 | `wv::rfc7606_per_attribute_actions` |
//! | 7606 3 (g) any other attribute twice | later copies discarded | `wv::rfc7606_per_attribute_actions` |
//! | 7606 3 (h) several errors: the strongest action | a reset ends decoding at once; TaW beats discard | `wv::rfc7606_audit_remaining_rules` |
//! | 7606 3 (i) withdrawn routes checked like NLRI | reset 3/10 | `wv::rfc7606_audit_remaining_rules` |
//! | 7606 3 (j) NLRI not parseable | reset (3/10 IPv4 field, 3/9 inside MP_*) | `wv::rfc7606_session_reset_for_bad_nlri_and_lengths`, `wv::rfc7606_per_attribute_actions` (7.11) |
//! | 7606 4 attribute length past the attribute section, or < 3 (4) octets left | TaW 3/1; the total attribute length still locates the NLRI | `wv::rfc7606_per_attribute_actions` |
//! | 7606 4 zero length (all but AS_PATH, ATOMIC_AGGREGATE) | malformed: the attribute's own action | `wv::rfc7606_audit_remaining_rules` |
//! | 7606 5.1 send: MP_* first, one NLRI-bearing field per UPDATE | `encode_updates` / `encode_withdrawals` (what sessions send) | `wv::rfc7606_audit_remaining_rules` |
//! | 7606 5.1 receive: any position or combination | accepted | `wv::rfc7606_treat_as_withdraw_lists_every_prefix`, `wv::rfc7606_audit_remaining_rules` |
//! | 7606 5.2 attributes but no NLRI, error other than discard | reset with the cause's NOTIFICATION | `wv::rfc7606_5_2_no_nlri_means_session_reset_unless_discard`, `sm::rfc7606_and_rfc4271_samples_over_a_live_session` |
//! | 7606 5.3 prefix length > 32 / 128, last prefix overruns | reset 3/10 (3/9 inside MP_*) | `wv::rfc7606_session_reset_for_bad_nlri_and_lengths` |
//! | 7606 5.3 MP_REACH < 5 or MP_UNREACH < 3 octets, wrong flags | reset 3/9, 3/4 | `wv::rfc7606_audit_remaining_rules` |
//! | 7606 5.4 typed NLRI | not applicable: unicast only; other AFI/SAFIs are ignored (RFC 4760 7) | - |
//! | 7606 6 log the NLRI and the whole UPDATE | warn with the prefixes and the UPDATE in hex (session) | `session::peer` (`log_malformed`) |
//! | 7606 7.1 ORIGIN length not 1 or undefined value | TaW 3/5, 3/6 | `wv::rfc7606_treat_as_withdraw_lists_every_prefix`, `sm::malformed_updates_get_rfc7606_treatment_and_other_sessions_are_untouched` |
//! | 7606 7.2 AS_PATH bad segment type, overrun, underrun, zero segment length | TaW 3/11 | `wv::rfc7606_per_attribute_actions`, `wv::as_path_segment_types_and_long_sequences` |
//! | 7606 7.2 / 4271 6.3 leftmost AS not the external peer's (and no confederation segment, RFC 5065 5) | TaW 3/11 | `wv::rfc4271_6_3_rfc7606_7_2_external_as_path` |
//! | 7606 7.3 NEXT_HOP length not 4 | TaW 3/5 | `wv::rfc7606_per_attribute_actions` |
//! | 4271 6.3 NEXT_HOP syntax: not a host address (0/8, 224/3; loopback is let through for one-host tests) | TaW 3/8 | `wv::rfc7606_audit_remaining_rules`, `sm::next_hop_semantics_over_a_live_session` |
//! | 4271 6.3 NEXT_HOP semantics: the receiving speaker's own address | routes ignored (withdrawn), logged, no NOTIFICATION | `sm::next_hop_semantics_over_a_live_session` |
//! | 4271 6.3 NEXT_HOP semantics: eBGP one hop, not on a shared subnet | not checked: next hops are resolved recursively through the kernel (Calico's BIRD has `gateway recursive`); an unresolvable one is not installed | - |
//! | 7606 7.4 MED length not 4 | TaW 3/5 | `wv::rfc7606_per_attribute_actions` |
//! | 7606 7.5 LOCAL_PREF from eBGP | discard, well-formed or not | `wv::rfc7606_7_5_7_9_7_10_discarded_from_an_external_peer`, `sm::rfc7606_and_rfc4271_samples_over_a_live_session` |
//! | 7606 7.5 LOCAL_PREF from iBGP, length not 4 | TaW 3/5 | `wv::rfc7606_per_attribute_actions` |
//! | 7606 7.6 ATOMIC_AGGREGATE length not 0 | discard | `wv::rfc7606_per_attribute_actions`, `wv::rfc7606_discard_keeps_the_route` |
//! | 7606 7.7 AGGREGATOR length not 6 (2-octet) / 8 (4-octet session) | discard | `wv::rfc7606_per_attribute_actions` |
//! | 7606 7.8 COMMUNITIES not a non-zero multiple of 4 | TaW 3/5 | `wv::rfc7606_per_attribute_actions` |
//! | 7606 7.9 / 7.10 ORIGINATOR_ID, CLUSTER_LIST from eBGP | discard | `wv::rfc7606_7_5_7_9_7_10_discarded_from_an_external_peer` |
//! | 7606 7.9 / 7.10 from iBGP: length not 4 / not a non-zero multiple of 4 | TaW 3/5 | `wv::rfc7606_per_attribute_actions` |
//! | 7606 7.11 MP_REACH next-hop length does not fit the AFI | reset 3/9 | `wv::rfc7606_per_attribute_actions` |
//! | 7606 7.12-7.16 (tunnel encapsulation, TE, extended and IPv6 extended communities, ATTR_SET) | not interpreted: optional transitive ones are passed on unchanged, others ignored (RFC 4271 9) | `wv::update_remaining_attributes_and_unknown_ones` |
//! | 8092 6 LARGE_COMMUNITY not a non-zero multiple of 12 | TaW 3/5 | `wv::rfc7606_per_attribute_actions` |
//! | 4271 6.3 unrecognised well-known attribute | reset 3/2 | `wv::rfc7606_per_attribute_actions` |

use std::net::Ipv4Addr;

use super::types::{Family, Nlri, Notification};
use super::{attr, msg_type, notif};

/// What a session does about a malformed UPDATE (RFC 7606 section 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rfc7606Action {
    /// Send the NOTIFICATION from [`DecodeError::notification`] and close the session.
    SessionReset,
    /// Keep the session; treat every prefix the UPDATE announced as withdrawn (RFC 7606 2).
    TreatAsWithdraw,
    /// Keep the session and the routes; the offending attribute was dropped (RFC 7606 2).
    AttributeDiscard,
}

/// A message that could not be decoded, or an UPDATE that decoded with an RFC 7606 outcome.
///
/// `data` fields hold the bytes RFC 4271 6.x says go into the NOTIFICATION's data: for attribute errors
/// the whole attribute as received (flags, type, length, value).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    // ---- message header (RFC 4271 6.1) ----
    #[error(
        "message header: marker is not 16 bytes of 0xff (RFC 4271 4.1); the stream is out of sync"
    )]
    BadMarker,
    #[error("message header: length {length} is not valid for message type {msg_type} (allowed {min}..={max})")]
    BadLength {
        length: u16,
        msg_type: u8,
        min: usize,
        max: usize,
    },
    #[error("message header: unknown message type {0}")]
    BadType(u8),
    #[error("message header says {declared} bytes but the buffer holds {actual}")]
    LengthMismatch { declared: usize, actual: usize },

    // ---- OPEN (RFC 4271 6.2) ----
    #[error("OPEN: unsupported BGP version {0}; margay speaks version 4")]
    UnsupportedVersion(u8),
    #[error("OPEN: hold time {0} s is not allowed (0 or at least 3, RFC 4271 4.2)")]
    UnacceptableHoldTime(u16),
    #[error("OPEN: BGP identifier {0} is not allowed (must be non-zero, RFC 6286)")]
    BadBgpId(Ipv4Addr),
    #[error("OPEN: unsupported optional parameter type {0}")]
    UnsupportedOptionalParameter(u8),
    #[error("OPEN: {0}")]
    MalformedOpen(&'static str),
    #[error("OPEN: capability {code} is malformed: {reason}")]
    MalformedCapability { code: u8, reason: &'static str },

    // ---- UPDATE (RFC 4271 6.3, RFC 7606) ----
    /// The withdrawn-routes or total-attribute length does not fit the message: the NLRI cannot be
    /// located, so this is a session reset (RFC 7606 3 (a)).
    #[error("UPDATE: {0}")]
    MalformedAttributeList(&'static str),
    /// An attribute header or length runs past the path attributes (RFC 7606 4).
    #[error("UPDATE: path attribute {type_code:?} runs past the end of the path attributes")]
    AttributeOverrun { type_code: Option<u8> },
    #[error("UPDATE: unrecognised well-known attribute type {type_code}")]
    UnrecognizedWellKnown { type_code: u8, data: Vec<u8> },
    #[error("UPDATE: missing well-known attribute {name} (type {0})", name = attr::name(*.0))]
    MissingWellKnown(u8),
    #[error("UPDATE: attribute {} (type {type_code}) has wrong optional/transitive flags", attr::name(*.type_code))]
    AttributeFlags { type_code: u8, data: Vec<u8> },
    #[error("UPDATE: attribute {} (type {type_code}) has invalid length {length}", attr::name(*.type_code))]
    AttributeLength {
        type_code: u8,
        length: usize,
        data: Vec<u8>,
    },
    #[error("UPDATE: ORIGIN has undefined value")]
    InvalidOrigin { data: Vec<u8> },
    #[error("UPDATE: invalid NEXT_HOP")]
    InvalidNextHop { data: Vec<u8> },
    #[error("UPDATE: attribute {} (type {type_code}) is malformed: {reason}", attr::name(*.type_code))]
    OptionalAttribute {
        type_code: u8,
        reason: &'static str,
        data: Vec<u8>,
    },
    #[error("UPDATE: {} is malformed: {reason}", attr::name(*.type_code))]
    MalformedAsPath {
        type_code: u8,
        reason: &'static str,
        data: Vec<u8>,
    },
    #[error("UPDATE: attribute {} (type {type_code}) appears more than once", attr::name(*.type_code))]
    DuplicateAttribute { type_code: u8 },
    #[error("UPDATE: {family} NLRI is malformed: {reason}")]
    InvalidNetworkField {
        family: Family,
        reason: &'static str,
    },

    /// LOCAL_PREF, ORIGINATOR_ID or CLUSTER_LIST from an external peer: discarded whatever its content
    /// (RFC 7606 7.5, 7.9, 7.10).
    #[error("UPDATE: attribute {} (type {type_code}) from an external (eBGP) peer is discarded", attr::name(*.type_code))]
    FromExternalPeer { type_code: u8, data: Vec<u8> },
    /// An error that would be treat-as-withdraw in an UPDATE that announces nothing (RFC 7606 5.2): the
    /// session resets with the cause's NOTIFICATION.
    #[error("{cause}; the UPDATE announces no prefix to treat as withdrawn, so the session resets (RFC 7606 5.2)")]
    NothingToWithdraw { cause: Box<DecodeError> },

    // ---- ROUTE-REFRESH (RFC 7313 5) ----
    #[error("ROUTE-REFRESH: invalid length {0}")]
    BadRouteRefreshLength(u16),

    /// The UPDATE is malformed in a way RFC 7606 handles by treat-as-withdraw. `withdraw` lists every
    /// prefix the UPDATE carried (withdrawn and announced, IPv4 body and MP attributes) per family: the
    /// session hands them to the RIB as withdrawals and keeps running.
    #[error("{cause}; treating the UPDATE's {} prefixes as withdrawn (RFC 7606)", withdraw.iter().map(|(_, v)| v.len()).sum::<usize>())]
    TreatAsWithdraw {
        cause: Box<DecodeError>,
        withdraw: Vec<(Family, Vec<Nlri>)>,
    },
}

impl DecodeError {
    /// The NOTIFICATION (error code, subcode, data) for this error per RFC 4271 6.x (RFC 7313 for
    /// ROUTE-REFRESH). Only sent when [`action`](Self::action) is `SessionReset`; for the other actions it
    /// says what would have been sent, which is useful in logs.
    pub fn notification(&self) -> (u8, u8, Vec<u8>) {
        use DecodeError::*;
        let (h, o, u) = (notif::HEADER, notif::OPEN, notif::UPDATE);
        match self {
            BadMarker => (h, 1, Vec::new()),
            BadLength { length, .. } => (h, 2, length.to_be_bytes().to_vec()),
            LengthMismatch { declared, .. } => (h, 2, (*declared as u16).to_be_bytes().to_vec()),
            BadType(t) => (h, 3, vec![*t]),
            // RFC 4271 6.2: data is the largest locally supported version number, 2 octets.
            UnsupportedVersion(_) => (o, 1, vec![0, 4]),
            BadBgpId(_) => (o, 3, Vec::new()),
            UnsupportedOptionalParameter(_) => (o, 4, Vec::new()),
            UnacceptableHoldTime(_) => (o, 6, Vec::new()),
            MalformedOpen(_) | MalformedCapability { .. } => (o, 0, Vec::new()),
            MalformedAttributeList(_) | AttributeOverrun { .. } | DuplicateAttribute { .. } => {
                (u, 1, Vec::new())
            }
            UnrecognizedWellKnown { data, .. } => (u, 2, data.clone()),
            MissingWellKnown(t) => (u, 3, vec![*t]),
            AttributeFlags { data, .. } => (u, 4, data.clone()),
            AttributeLength { data, .. } => (u, 5, data.clone()),
            InvalidOrigin { data } => (u, 6, data.clone()),
            InvalidNextHop { data } => (u, 8, data.clone()),
            OptionalAttribute { data, .. } => (u, 9, data.clone()),
            InvalidNetworkField { .. } => (u, 10, Vec::new()),
            MalformedAsPath { .. } => (u, 11, Vec::new()),
            BadRouteRefreshLength(len) => (notif::ROUTE_REFRESH, 1, len.to_be_bytes().to_vec()),
            TreatAsWithdraw { cause, .. } | NothingToWithdraw { cause } => cause.notification(),
            FromExternalPeer { data, .. } => (u, 9, data.clone()),
        }
    }

    /// The NOTIFICATION message to send for this error (see [`notification`](Self::notification)).
    pub fn to_notification(&self) -> Notification {
        let (code, subcode, data) = self.notification();
        Notification {
            code,
            subcode,
            data,
        }
    }

    /// What the session does about this error (RFC 7606 sections 3-7; errors outside UPDATE always reset).
    pub fn action(&self) -> Rfc7606Action {
        use Rfc7606Action::*;
        match self {
            // RFC 7606 4: the Total Attribute Length still locates the NLRI.
            DecodeError::AttributeOverrun { .. } => TreatAsWithdraw,
            // RFC 7606 3 (d).
            DecodeError::MissingWellKnown(_) => TreatAsWithdraw,
            // RFC 7606 3 (c): treat-as-withdraw, unless the attribute's own rules say otherwise:
            // 3 (f) and RFC 6793 6 (attribute discard for the aggregation and AS4 attributes) and 5.3 /
            // 3 (j) (MP_REACH / MP_UNREACH with wrong flags cannot be trusted to locate their NLRI).
            DecodeError::AttributeFlags { type_code, .. } => match attribute_action(*type_code) {
                AttributeDiscard => AttributeDiscard,
                SessionReset => SessionReset,
                TreatAsWithdraw => TreatAsWithdraw,
            },
            // RFC 7606 3 (c): all but the first are discarded; MP_REACH/MP_UNREACH twice is a reset.
            DecodeError::DuplicateAttribute { type_code } => match *type_code {
                attr::MP_REACH_NLRI | attr::MP_UNREACH_NLRI => SessionReset,
                _ => AttributeDiscard,
            },
            DecodeError::AttributeLength { type_code, .. }
            | DecodeError::OptionalAttribute { type_code, .. }
            | DecodeError::MalformedAsPath { type_code, .. } => attribute_action(*type_code),
            DecodeError::InvalidOrigin { .. } | DecodeError::InvalidNextHop { .. } => {
                TreatAsWithdraw
            }
            DecodeError::TreatAsWithdraw { .. } => TreatAsWithdraw,
            // RFC 7606 7.5, 7.9, 7.10.
            DecodeError::FromExternalPeer { .. } => AttributeDiscard,
            // RFC 7606 5.2.
            DecodeError::NothingToWithdraw { .. } => SessionReset,
            _ => SessionReset,
        }
    }

    /// For a treat-as-withdraw outcome: every prefix of the UPDATE, per family, to withdraw.
    pub fn withdrawals(&self) -> Option<&[(Family, Vec<Nlri>)]> {
        match self {
            DecodeError::TreatAsWithdraw { withdraw, .. } => Some(withdraw),
            _ => None,
        }
    }

    /// True for errors found in the message header (the byte stream itself cannot be trusted after them).
    pub fn is_header_error(&self) -> bool {
        matches!(
            self,
            DecodeError::BadMarker
                | DecodeError::BadLength { .. }
                | DecodeError::BadType(_)
                | DecodeError::LengthMismatch { .. }
        )
    }
}

/// The RFC 7606 section 7 action for a malformed attribute of this type.
pub fn attribute_action(type_code: u8) -> Rfc7606Action {
    use Rfc7606Action::*;
    match type_code {
        // 7.1 ORIGIN, 7.2 AS_PATH, 7.3 NEXT_HOP, 7.4 MED, 7.5 LOCAL_PREF, 7.8 COMMUNITIES,
        // 7.9 ORIGINATOR_ID, 7.10 CLUSTER_LIST, RFC 8092 6 LARGE_COMMUNITY.
        attr::ORIGIN
        | attr::AS_PATH
        | attr::NEXT_HOP
        | attr::MULTI_EXIT_DISC
        | attr::LOCAL_PREF
        | attr::COMMUNITIES
        | attr::ORIGINATOR_ID
        | attr::CLUSTER_LIST
        | attr::LARGE_COMMUNITIES => TreatAsWithdraw,
        // 7.6 ATOMIC_AGGREGATE, 7.7 AGGREGATOR (3 (f)), RFC 6793 6 AS4_PATH / AS4_AGGREGATOR.
        attr::ATOMIC_AGGREGATE | attr::AGGREGATOR | attr::AS4_PATH | attr::AS4_AGGREGATOR => {
            AttributeDiscard
        }
        // 7.11 / RFC 7606 3 (j): without the MP attributes the NLRI cannot be known.
        attr::MP_REACH_NLRI | attr::MP_UNREACH_NLRI => SessionReset,
        _ => AttributeDiscard,
    }
}

/// A message margay built that cannot be put on the wire.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("{what} would be {length} bytes, more than the {max}-byte maximum (extended messages, RFC 8654, raise it to 65535 when negotiated)")]
    MessageTooLarge {
        what: &'static str,
        length: usize,
        max: usize,
    },
    #[error("attribute {} (type {type_code}) would be {length} bytes, more than 65535", attr::name(*.type_code))]
    AttributeTooLong { type_code: u8, length: usize },
    #[error("OPEN: capability {code} value is {length} bytes, more than 255")]
    CapabilityTooLong { code: u8, length: usize },
    #[error("OPEN: optional parameters are {length} bytes, more than 65535")]
    OptionalParametersTooLong { length: usize },
    #[error("{family} routes need a next hop in attributes.mp_reach")]
    MissingNextHop { family: Family },
    #[error("next hop {next_hop} cannot be carried for {family}")]
    BadNextHop { family: Family, next_hop: String },
    #[error("prefix {prefix} is not of family {family}")]
    WrongFamily {
        family: Family,
        prefix: ipnetwork::IpNetwork,
    },
    #[error("family {family} has no wire encoding in margay (only IPv4 and IPv6 unicast)")]
    UnsupportedFamily { family: Family },
}

impl EncodeError {
    /// The message type the error concerns, for logs.
    pub fn message_type(&self) -> u8 {
        match self {
            EncodeError::CapabilityTooLong { .. }
            | EncodeError::OptionalParametersTooLong { .. } => msg_type::OPEN,
            _ => msg_type::UPDATE,
        }
    }
}
