//! The BFD Control packet (RFC 5880 4.1): pure encode/decode over bytes, with the generic reception checks
//! of RFC 5880 6.8.6 that need no session (version, length, multiplier, multipoint, discriminator).
//! Authentication (the A bit) is not supported: such packets are refused, as RFC 5880 6.8.6 asks of a
//! session without authentication.

use std::time::Duration;

/// The mandatory section is 24 bytes (RFC 5880 4.1).
pub const CONTROL_LEN: usize = 24;

/// Session state as carried in the `Sta` field (RFC 5880 4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum State {
    AdminDown = 0,
    Down = 1,
    Init = 2,
    Up = 3,
}

impl State {
    pub(crate) fn from_bits(b: u8) -> State {
        match b & 3 {
            0 => State::AdminDown,
            1 => State::Down,
            2 => State::Init,
            _ => State::Up,
        }
    }

    /// Operator word (`margay status`, metrics labels).
    pub fn as_str(self) -> &'static str {
        match self {
            State::AdminDown => "AdminDown",
            State::Down => "Down",
            State::Init => "Init",
            State::Up => "Up",
        }
    }
}

/// Diagnostic codes (RFC 5880 4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Diag {
    None = 0,
    ControlDetectionTimeExpired = 1,
    EchoFailed = 2,
    NeighborSignaledDown = 3,
    ForwardingPlaneReset = 4,
    PathDown = 5,
    ConcatenatedPathDown = 6,
    AdministrativelyDown = 7,
    ReverseConcatenatedPathDown = 8,
    /// A value this implementation does not know (9..31 are reserved).
    Reserved = 31,
}

impl Diag {
    fn from_bits(b: u8) -> Diag {
        match b & 0x1f {
            0 => Diag::None,
            1 => Diag::ControlDetectionTimeExpired,
            2 => Diag::EchoFailed,
            3 => Diag::NeighborSignaledDown,
            4 => Diag::ForwardingPlaneReset,
            5 => Diag::PathDown,
            6 => Diag::ConcatenatedPathDown,
            7 => Diag::AdministrativelyDown,
            8 => Diag::ReverseConcatenatedPathDown,
            _ => Diag::Reserved,
        }
    }

    /// Operator words (`margay status`, the BGP session's last error).
    pub fn as_str(self) -> &'static str {
        match self {
            Diag::None => "none",
            Diag::ControlDetectionTimeExpired => "control detection time expired",
            Diag::EchoFailed => "echo function failed",
            Diag::NeighborSignaledDown => "neighbor signaled session down",
            Diag::ForwardingPlaneReset => "forwarding plane reset",
            Diag::PathDown => "path down",
            Diag::ConcatenatedPathDown => "concatenated path down",
            Diag::AdministrativelyDown => "administratively down",
            Diag::ReverseConcatenatedPathDown => "reverse concatenated path down",
            Diag::Reserved => "reserved diagnostic",
        }
    }
}

const FLAG_POLL: u8 = 0x20;
const FLAG_FINAL: u8 = 0x10;
const FLAG_CPI: u8 = 0x08;
const FLAG_AUTH: u8 = 0x04;
const FLAG_DEMAND: u8 = 0x02;
const FLAG_MULTIPOINT: u8 = 0x01;

/// One Control packet (RFC 5880 4.1). Intervals are in microseconds on the wire, [`Duration`] here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlPacket {
    pub diag: Diag,
    pub state: State,
    pub poll: bool,
    pub final_: bool,
    /// C: control plane independent. Always clear on send: margay's BFD shares fate with its BGP.
    pub cpi: bool,
    pub demand: bool,
    pub detect_mult: u8,
    pub my_disc: u32,
    pub your_disc: u32,
    pub desired_min_tx: Duration,
    pub required_min_rx: Duration,
    pub required_min_echo_rx: Duration,
}

/// Why a received packet was dropped (RFC 5880 6.8.6); counted, never answered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("packet of {0} bytes is shorter than the 24-byte control header")]
    Short(usize),
    #[error("version {0} is not 1")]
    Version(u8),
    #[error("length field {field} does not fit the {got}-byte packet")]
    Length { field: u8, got: usize },
    #[error("detect multiplier is 0")]
    ZeroMultiplier,
    #[error("multipoint bit set")]
    Multipoint,
    #[error("my discriminator is 0")]
    ZeroDiscriminator,
    #[error("authentication present but not configured")]
    Authentication,
}

fn us(d: Duration) -> u32 {
    d.as_micros().min(u128::from(u32::MAX)) as u32
}

impl ControlPacket {
    pub fn encode(&self) -> [u8; CONTROL_LEN] {
        let mut b = [0u8; CONTROL_LEN];
        b[0] = (1 << 5) | (self.diag as u8 & 0x1f);
        let mut flags = (self.state as u8) << 6;
        if self.poll {
            flags |= FLAG_POLL;
        }
        if self.final_ {
            flags |= FLAG_FINAL;
        }
        if self.cpi {
            flags |= FLAG_CPI;
        }
        if self.demand {
            flags |= FLAG_DEMAND;
        }
        b[1] = flags;
        b[2] = self.detect_mult;
        b[3] = CONTROL_LEN as u8;
        b[4..8].copy_from_slice(&self.my_disc.to_be_bytes());
        b[8..12].copy_from_slice(&self.your_disc.to_be_bytes());
        b[12..16].copy_from_slice(&us(self.desired_min_tx).to_be_bytes());
        b[16..20].copy_from_slice(&us(self.required_min_rx).to_be_bytes());
        b[20..24].copy_from_slice(&us(self.required_min_echo_rx).to_be_bytes());
        b
    }

    /// Decode and apply the session-independent checks of RFC 5880 6.8.6.
    pub fn decode(b: &[u8]) -> Result<ControlPacket, PacketError> {
        if b.len() < CONTROL_LEN {
            return Err(PacketError::Short(b.len()));
        }
        let version = b[0] >> 5;
        if version != 1 {
            return Err(PacketError::Version(version));
        }
        let flags = b[1];
        let len = b[3];
        // RFC 5880 6.8.6: the Length field must be at least 24 (26 with A) and no more than the payload.
        let min = if flags & FLAG_AUTH != 0 { 26 } else { 24 };
        if usize::from(len) < min || usize::from(len) > b.len() {
            return Err(PacketError::Length {
                field: len,
                got: b.len(),
            });
        }
        if b[2] == 0 {
            return Err(PacketError::ZeroMultiplier);
        }
        if flags & FLAG_MULTIPOINT != 0 {
            return Err(PacketError::Multipoint);
        }
        let word = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let my_disc = word(4);
        if my_disc == 0 {
            return Err(PacketError::ZeroDiscriminator);
        }
        if flags & FLAG_AUTH != 0 {
            return Err(PacketError::Authentication);
        }
        Ok(ControlPacket {
            diag: Diag::from_bits(b[0]),
            state: State::from_bits(flags >> 6),
            poll: flags & FLAG_POLL != 0,
            final_: flags & FLAG_FINAL != 0,
            cpi: flags & FLAG_CPI != 0,
            demand: flags & FLAG_DEMAND != 0,
            detect_mult: b[2],
            my_disc,
            your_disc: word(8),
            desired_min_tx: Duration::from_micros(u64::from(word(12))),
            required_min_rx: Duration::from_micros(u64::from(word(16))),
            required_min_echo_rx: Duration::from_micros(u64::from(word(20))),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A packet as BIRD sends it in Init (hand-assembled from RFC 5880 4.1).
    const BIRD_INIT: [u8; 24] = [
        0x20, 0x80, 0x05, 0x18, // v1 diag 0, Init, mult 5, len 24
        0x11, 0x22, 0x33, 0x44, // my disc
        0x00, 0x00, 0x00, 0x07, // your disc
        0x00, 0x0f, 0x42, 0x40, // desired min tx 1 s
        0x00, 0x00, 0x27, 0x10, // required min rx 10 ms
        0x00, 0x00, 0x00, 0x00, // no echo
    ];

    #[test]
    fn decodes_and_reencodes_a_known_packet() {
        let p = ControlPacket::decode(&BIRD_INIT).unwrap();
        assert_eq!(p.state, State::Init);
        assert_eq!(p.diag, Diag::None);
        assert_eq!(p.detect_mult, 5);
        assert_eq!(p.my_disc, 0x1122_3344);
        assert_eq!(p.your_disc, 7);
        assert_eq!(p.desired_min_tx, Duration::from_secs(1));
        assert_eq!(p.required_min_rx, Duration::from_millis(10));
        assert!(!p.poll && !p.final_);
        assert_eq!(p.encode(), BIRD_INIT);
    }

    #[test]
    fn flags_and_diag_round_trip() {
        let p = ControlPacket {
            diag: Diag::NeighborSignaledDown,
            state: State::Up,
            poll: true,
            final_: false,
            cpi: false,
            demand: false,
            detect_mult: 3,
            my_disc: 1,
            your_disc: 2,
            desired_min_tx: Duration::from_millis(100),
            required_min_rx: Duration::from_millis(300),
            required_min_echo_rx: Duration::ZERO,
        };
        let b = p.encode();
        assert_eq!(b[0], 0x23);
        assert_eq!(b[1], 0xc0 | 0x20);
        assert_eq!(ControlPacket::decode(&b).unwrap(), p);
    }

    // RFC 5880 6.8.6: each generic discard rule.
    #[test]
    fn refuses_what_6_8_6_discards() {
        let mut b = BIRD_INIT;
        assert_eq!(ControlPacket::decode(&b[..23]), Err(PacketError::Short(23)));
        b[0] = 0x40;
        assert_eq!(ControlPacket::decode(&b), Err(PacketError::Version(2)));
        b = BIRD_INIT;
        b[3] = 23;
        assert!(matches!(
            ControlPacket::decode(&b),
            Err(PacketError::Length { .. })
        ));
        b[3] = 25; // longer than the datagram
        assert!(matches!(
            ControlPacket::decode(&b),
            Err(PacketError::Length { .. })
        ));
        b = BIRD_INIT;
        b[2] = 0;
        assert_eq!(ControlPacket::decode(&b), Err(PacketError::ZeroMultiplier));
        b = BIRD_INIT;
        b[1] |= FLAG_MULTIPOINT;
        assert_eq!(ControlPacket::decode(&b), Err(PacketError::Multipoint));
        b = BIRD_INIT;
        b[4..8].copy_from_slice(&[0; 4]);
        assert_eq!(
            ControlPacket::decode(&b),
            Err(PacketError::ZeroDiscriminator)
        );
        let mut long = BIRD_INIT.to_vec();
        long.extend_from_slice(&[1, 2]);
        long[1] |= FLAG_AUTH;
        long[3] = 26;
        assert_eq!(
            ControlPacket::decode(&long),
            Err(PacketError::Authentication)
        );
    }

    #[test]
    fn decode_never_panics_on_short_or_random_input() {
        let mut x: u32 = 12345;
        for n in 0..2000 {
            let len = n % 40;
            let v: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            let _ = ControlPacket::decode(&v);
        }
    }
}
