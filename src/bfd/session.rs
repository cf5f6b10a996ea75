//! One BFD session in asynchronous mode (RFC 5880), Sans-IO: packets and the clock go in, packets to send
//! and state changes come out. No sockets, no tokio, no wall clock: the caller passes `now` and owns the
//! timers ([`Session::next_deadline`]), so every RFC rule is a plain `#[test]`.
//!
//! It never decides what a state change means for BGP; the runner reports it and the owner acts.

use std::time::{Duration, Instant};

use super::packet::{ControlPacket, Diag, State};

/// RFC 5880 6.8.3: while the session is not Up, DesiredMinTxInterval is at least one second.
pub const SLOW_TX: Duration = Duration::from_secs(1);

/// The timers one side asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Timers {
    /// bfd.DesiredMinTxInterval once Up.
    pub desired_min_tx: Duration,
    /// bfd.RequiredMinRxInterval.
    pub required_min_rx: Duration,
    /// bfd.DetectMult (1..=255).
    pub detect_mult: u8,
}

impl Default for Timers {
    /// 300 ms x 3, as FRR's bfdd defaults: detection in under a second without flapping under load.
    fn default() -> Timers {
        Timers {
            desired_min_tx: Duration::from_millis(300),
            required_min_rx: Duration::from_millis(300),
            detect_mult: 3,
        }
    }
}

/// What the caller must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Send this packet to the peer now.
    Send(ControlPacket),
    /// The local state changed. `remote_admin_down`: the peer took the session down on purpose
    /// (RFC 5880 6.8.6 received AdminDown), which RFC 5882 3.2 says must not take its client down.
    StateChanged {
        from: State,
        to: State,
        diag: Diag,
        remote_admin_down: bool,
    },
}

/// The state variables of RFC 5880 6.8.1 plus our timers.
#[derive(Debug, Clone)]
pub struct Session {
    timers: Timers,
    state: State,
    remote_state: State,
    local_disc: u32,
    remote_disc: u32,
    local_diag: Diag,
    /// What we advertise in DesiredMinTx / RequiredMinRx.
    adv_tx: Duration,
    adv_rx: Duration,
    /// What our own timers use: differs from the advertised value while a Poll Sequence runs
    /// (RFC 5880 6.8.3: an increased TX interval or a decreased RX interval applies only after Final).
    eff_tx: Duration,
    eff_rx: Duration,
    /// bfd.RemoteMinRxInterval: 1 µs until the peer tells (RFC 5880 6.8.1).
    remote_min_rx: Duration,
    remote_desired_tx: Duration,
    remote_detect_mult: u8,
    /// A Poll Sequence is in progress: P set on every packet until a Final arrives (RFC 5880 6.5).
    polling: bool,
    next_tx: Option<Instant>,
    detect_at: Option<Instant>,
    /// Jitter source (xorshift): the caller seeds it, tests fix it.
    rng: u64,
}

impl Session {
    /// A new session in Down, sending at the slow rate (RFC 5880 6.8.1, 6.8.3). `local_disc` is non-zero
    /// and unique on this system; `seed` feeds the jitter.
    pub fn new(timers: Timers, local_disc: u32, seed: u64, now: Instant) -> Session {
        let mut s = Session {
            timers,
            state: State::Down,
            remote_state: State::Down,
            local_disc,
            remote_disc: 0,
            local_diag: Diag::None,
            adv_tx: timers.desired_min_tx.max(SLOW_TX),
            adv_rx: timers.required_min_rx,
            eff_tx: timers.desired_min_tx.max(SLOW_TX),
            eff_rx: timers.required_min_rx,
            remote_min_rx: Duration::from_micros(1),
            remote_desired_tx: Duration::ZERO,
            remote_detect_mult: 0,
            polling: false,
            next_tx: None,
            detect_at: None,
            rng: seed | 1,
        };
        // Both single-hop ends are Active (RFC 5881 3): start sending at once.
        s.next_tx = Some(now);
        s
    }

    pub fn state(&self) -> State {
        self.state
    }
    pub fn remote_state(&self) -> State {
        self.remote_state
    }
    pub fn local_disc(&self) -> u32 {
        self.local_disc
    }
    pub fn remote_disc(&self) -> u32 {
        self.remote_disc
    }
    pub fn local_diag(&self) -> Diag {
        self.local_diag
    }
    pub fn timers(&self) -> Timers {
        self.timers
    }
    pub fn polling(&self) -> bool {
        self.polling
    }

    /// The periodic transmit interval before jitter: max(our DesiredMinTx, the peer's RequiredMinRx)
    /// (RFC 5880 6.8.7). None while the peer asked for no periodic packets (RequiredMinRx 0).
    pub fn tx_interval(&self) -> Option<Duration> {
        if self.remote_min_rx.is_zero() {
            None
        } else {
            Some(self.eff_tx.max(self.remote_min_rx))
        }
    }

    /// Detection time in asynchronous mode: the peer's DetectMult x max(our RequiredMinRx, the peer's
    /// DesiredMinTx) (RFC 5880 6.8.4). None until the peer has been heard.
    pub fn detection_time(&self) -> Option<Duration> {
        if self.remote_detect_mult == 0 {
            return None;
        }
        Some(self.eff_rx.max(self.remote_desired_tx) * u32::from(self.remote_detect_mult))
    }

    /// The next instant [`Session::on_timer`] has work.
    pub fn next_deadline(&self) -> Option<Instant> {
        match (self.next_tx, self.detect_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Timers that fell due by `now`: detection time expiry (RFC 5880 6.8.4) and periodic transmission
    /// (RFC 5880 6.8.7).
    pub fn on_timer(&mut self, now: Instant) -> Vec<Output> {
        let mut out = Vec::new();
        if self.detect_at.is_some_and(|t| t <= now) {
            self.detect_at = None;
            if matches!(self.state, State::Init | State::Up) {
                self.go(
                    State::Down,
                    Diag::ControlDetectionTimeExpired,
                    false,
                    now,
                    &mut out,
                );
            }
            // RFC 5880 6.8.1: bfd.RemoteDiscr is zeroed when the detection time expires, so the next
            // packet from a restarted peer (Your Discriminator 0) is accepted.
            self.remote_disc = 0;
            self.remote_state = State::Down;
        }
        if self.next_tx.is_some_and(|t| t <= now) {
            out.push(Output::Send(self.packet(false)));
            self.schedule_tx(now);
        }
        out
    }

    /// A packet that passed the generic checks of RFC 5880 6.8.6 and was matched to this session (by Your
    /// Discriminator, or by address when that is 0).
    pub fn on_packet(&mut self, p: &ControlPacket, now: Instant) -> Vec<Output> {
        let mut out = Vec::new();
        // RFC 5880 6.8.6: Your Discriminator 0 is accepted only while Down or AdminDown; a non-zero one
        // must be ours.
        if p.your_disc == 0 && !matches!(self.state, State::Down | State::AdminDown) {
            return out;
        }
        if p.your_disc != 0 && p.your_disc != self.local_disc {
            return out;
        }
        self.remote_disc = p.my_disc;
        self.remote_state = p.state;
        self.remote_desired_tx = p.desired_min_tx;
        self.remote_detect_mult = p.detect_mult;
        let old_remote_rx = self.remote_min_rx;
        self.remote_min_rx = p.required_min_rx;
        // RFC 5880 6.5: a Final ends our Poll Sequence; the new timers now apply to our side too.
        if p.final_ && self.polling {
            self.polling = false;
            self.eff_tx = self.adv_tx;
            self.eff_rx = self.adv_rx;
        }
        if self.state == State::AdminDown {
            return out;
        }
        // RFC 5880 6.8.6 state table.
        if p.state == State::AdminDown {
            if self.state != State::Down {
                self.go(State::Down, Diag::NeighborSignaledDown, true, now, &mut out);
            }
        } else {
            match (self.state, p.state) {
                (State::Down, State::Down) => {
                    self.go(State::Init, Diag::None, false, now, &mut out)
                }
                (State::Down, State::Init) | (State::Init, State::Init | State::Up) => {
                    self.go(State::Up, Diag::None, false, now, &mut out)
                }
                (State::Up, State::Down) => self.go(
                    State::Down,
                    Diag::NeighborSignaledDown,
                    false,
                    now,
                    &mut out,
                ),
                _ => {}
            }
        }
        // RFC 5880 6.8.4: every accepted packet restarts detection, once the session is past Down.
        self.detect_at = match (self.state, self.detection_time()) {
            (State::Init | State::Up, Some(d)) => Some(now + d),
            _ => None,
        };
        // RFC 5880 6.8.6: a Poll is answered at once with a Final (and never with P set as well).
        if p.poll {
            out.push(Output::Send(self.packet(true)));
        }
        // RFC 5880 6.8.7: a larger interval asked by the peer applies from now; a sooner one too (the
        // peer wants packets faster than our current schedule gives them).
        if self.remote_min_rx != old_remote_rx {
            match self.tx_interval() {
                Some(_) => {
                    if self.next_tx.is_none_or(|t| t > now + self.jittered()) {
                        self.schedule_tx(now);
                    }
                }
                None => self.next_tx = None,
            }
        }
        out
    }

    /// New timers from the configuration, applied through a Poll Sequence (RFC 5880 6.8.3).
    pub fn set_timers(&mut self, timers: Timers, now: Instant) -> Vec<Output> {
        self.timers = timers;
        let tx = if self.state == State::Up {
            timers.desired_min_tx
        } else {
            timers.desired_min_tx.max(SLOW_TX)
        };
        self.change_timers(tx, timers.required_min_rx, now)
    }

    /// Stop the session on purpose (RFC 5880 6.8.16): one AdminDown packet tells the peer, whose client
    /// then must not react (RFC 5882 3.2).
    pub fn admin_down(&mut self, now: Instant) -> Vec<Output> {
        let mut out = Vec::new();
        if self.state != State::AdminDown {
            self.go(
                State::AdminDown,
                Diag::AdministrativelyDown,
                false,
                now,
                &mut out,
            );
        }
        out.push(Output::Send(self.packet(false)));
        self.next_tx = None;
        self.detect_at = None;
        out
    }

    fn go(
        &mut self,
        to: State,
        diag: Diag,
        remote_admin_down: bool,
        now: Instant,
        out: &mut Vec<Output>,
    ) {
        let from = self.state;
        self.state = to;
        self.local_diag = diag;
        out.push(Output::StateChanged {
            from,
            to,
            diag,
            remote_admin_down,
        });
        match to {
            // RFC 5880 6.8.3: the configured (fast) rate is allowed only once Up, reached by a Poll.
            State::Up => {
                out.extend(self.change_timers(
                    self.timers.desired_min_tx,
                    self.timers.required_min_rx,
                    now,
                ));
            }
            // Back to the slow rate at once: the peer is gone or going, nothing to negotiate with.
            _ if from == State::Up => {
                self.polling = false;
                self.adv_tx = self.timers.desired_min_tx.max(SLOW_TX);
                self.eff_tx = self.adv_tx;
                self.adv_rx = self.timers.required_min_rx;
                self.eff_rx = self.adv_rx;
                self.schedule_tx(now);
            }
            _ => {}
        }
        // Tell the peer of every change at once rather than at the next (possibly 1 s) tick: bring-up
        // takes one round trip per step instead of one slow interval.
        if to != State::AdminDown {
            out.push(Output::Send(self.packet(false)));
            self.schedule_tx(now);
        }
    }

    fn change_timers(&mut self, tx: Duration, rx: Duration, now: Instant) -> Vec<Output> {
        if tx == self.adv_tx && rx == self.adv_rx {
            return Vec::new();
        }
        self.adv_tx = tx;
        self.adv_rx = rx;
        // RFC 5880 6.8.3: a faster TX and a slower RX are safe at once; the others wait for the Final.
        if tx < self.eff_tx || self.state != State::Up {
            self.eff_tx = tx;
        }
        if rx > self.eff_rx || self.state != State::Up {
            self.eff_rx = rx;
        }
        if self.state == State::Up {
            self.polling = true;
            let p = self.packet(false);
            self.schedule_tx(now);
            vec![Output::Send(p)]
        } else {
            self.schedule_tx(now);
            Vec::new()
        }
    }

    fn packet(&self, final_: bool) -> ControlPacket {
        ControlPacket {
            diag: self.local_diag,
            state: self.state,
            poll: self.polling && !final_,
            final_,
            cpi: false,
            demand: false,
            detect_mult: self.timers.detect_mult,
            my_disc: self.local_disc,
            your_disc: self.remote_disc,
            desired_min_tx: self.adv_tx,
            required_min_rx: self.adv_rx,
            required_min_echo_rx: Duration::ZERO,
        }
    }

    /// The next periodic packet: the interval less 0-25% (10-25% with DetectMult 1) (RFC 5880 6.8.7).
    fn schedule_tx(&mut self, now: Instant) {
        self.next_tx = if self.state == State::AdminDown || self.tx_interval().is_none() {
            None
        } else {
            Some(now + self.jittered())
        };
    }

    fn jittered(&mut self) -> Duration {
        let Some(base) = self.tx_interval() else {
            return Duration::MAX;
        };
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        // Percent of the interval kept: 75..=100, or 75..=90 when DetectMult is 1.
        let span = if self.timers.detect_mult == 1 { 16 } else { 26 };
        let keep = 75 + (self.rng % span) as u32;
        base * keep / 100
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAST: Timers = Timers {
        desired_min_tx: Duration::from_millis(100),
        required_min_rx: Duration::from_millis(100),
        detect_mult: 3,
    };

    fn from_peer(state: State, your: u32) -> ControlPacket {
        ControlPacket {
            diag: Diag::None,
            state,
            poll: false,
            final_: false,
            cpi: false,
            demand: false,
            detect_mult: 3,
            my_disc: 77,
            your_disc: your,
            desired_min_tx: Duration::from_millis(100),
            required_min_rx: Duration::from_millis(100),
            required_min_echo_rx: Duration::ZERO,
        }
    }

    fn sent(out: &[Output]) -> Vec<&ControlPacket> {
        out.iter()
            .filter_map(|o| match o {
                Output::Send(p) => Some(p),
                _ => None,
            })
            .collect()
    }

    fn changes(out: &[Output]) -> Vec<(State, State)> {
        out.iter()
            .filter_map(|o| match o {
                Output::StateChanged { from, to, .. } => Some((*from, *to)),
                _ => None,
            })
            .collect()
    }

    /// Drive a session to Up through the three-way handshake and answer its Poll with a Final.
    fn up(now: Instant) -> Session {
        let mut s = Session::new(FAST, 5, 1, now);
        s.on_packet(&from_peer(State::Down, 0), now);
        s.on_packet(&from_peer(State::Up, 5), now);
        assert_eq!(s.state(), State::Up);
        let mut fin = from_peer(State::Up, 5);
        fin.final_ = true;
        s.on_packet(&fin, now);
        assert!(!s.polling());
        s
    }

    #[test]
    fn starts_down_sending_slowly_with_our_discriminator() {
        let t0 = Instant::now();
        let mut s = Session::new(FAST, 5, 1, t0);
        let out = s.on_timer(t0);
        let p = sent(&out)[0];
        assert_eq!(p.state, State::Down);
        assert_eq!(p.my_disc, 5);
        assert_eq!(p.your_disc, 0);
        // RFC 5880 6.8.3: at least 1 s while not Up, whatever is configured.
        assert_eq!(p.desired_min_tx, SLOW_TX);
        assert_eq!(p.required_min_rx, FAST.required_min_rx);
        // RFC 5880 6.8.1: RemoteMinRxInterval starts at 1 µs, so the slow rate is ours alone.
        assert_eq!(s.tx_interval(), Some(SLOW_TX));
        assert!(s.next_deadline().unwrap() <= t0 + SLOW_TX);
    }

    #[test]
    fn three_way_handshake_down_init_up() {
        let t0 = Instant::now();
        let mut s = Session::new(FAST, 5, 1, t0);
        // RFC 5880 6.8.6: Down + received Down -> Init.
        let out = s.on_packet(&from_peer(State::Down, 0), t0);
        assert_eq!(changes(&out), vec![(State::Down, State::Init)]);
        assert_eq!(s.remote_disc(), 77);
        assert_eq!(sent(&out).last().unwrap().your_disc, 77);
        // Init + received Up -> Up.
        let out = s.on_packet(&from_peer(State::Up, 5), t0);
        assert_eq!(changes(&out), vec![(State::Init, State::Up)]);
    }

    #[test]
    fn down_plus_init_goes_straight_up() {
        let t0 = Instant::now();
        let mut s = Session::new(FAST, 5, 1, t0);
        let out = s.on_packet(&from_peer(State::Init, 5), t0);
        assert_eq!(changes(&out), vec![(State::Down, State::Up)]);
    }

    #[test]
    fn down_ignores_up() {
        let t0 = Instant::now();
        let mut s = Session::new(FAST, 5, 1, t0);
        let out = s.on_packet(&from_peer(State::Up, 5), t0);
        assert!(changes(&out).is_empty());
        assert_eq!(s.state(), State::Down);
    }

    #[test]
    fn init_plus_admin_down_goes_down_with_diag_3() {
        let t0 = Instant::now();
        let mut s = Session::new(FAST, 5, 1, t0);
        s.on_packet(&from_peer(State::Down, 0), t0);
        let out = s.on_packet(&from_peer(State::AdminDown, 5), t0);
        assert_eq!(changes(&out), vec![(State::Init, State::Down)]);
        assert_eq!(s.local_diag(), Diag::NeighborSignaledDown);
        assert!(matches!(
            out[0],
            Output::StateChanged {
                remote_admin_down: true,
                ..
            }
        ));
    }

    #[test]
    fn up_plus_down_goes_down_with_diag_3_and_slow_rate() {
        let t0 = Instant::now();
        let mut s = up(t0);
        let out = s.on_packet(&from_peer(State::Down, 5), t0);
        assert_eq!(changes(&out), vec![(State::Up, State::Down)]);
        assert_eq!(s.local_diag(), Diag::NeighborSignaledDown);
        assert!(matches!(
            out[0],
            Output::StateChanged {
                remote_admin_down: false,
                ..
            }
        ));
        assert_eq!(sent(&out).last().unwrap().desired_min_tx, SLOW_TX);
    }

    #[test]
    fn zero_your_discriminator_is_dropped_once_past_down() {
        let t0 = Instant::now();
        let mut s = up(t0);
        let out = s.on_packet(&from_peer(State::Down, 0), t0);
        assert!(out.is_empty());
        assert_eq!(s.state(), State::Up);
        // A wrong non-zero discriminator too.
        assert!(s.on_packet(&from_peer(State::Down, 6), t0).is_empty());
    }

    #[test]
    fn going_up_polls_for_the_fast_rate_and_final_applies_it() {
        let t0 = Instant::now();
        let mut s = Session::new(FAST, 5, 1, t0);
        s.on_packet(&from_peer(State::Down, 0), t0);
        let out = s.on_packet(&from_peer(State::Up, 5), t0);
        // RFC 5880 6.8.3: DesiredMinTx changes on Up, so a Poll Sequence starts.
        assert!(s.polling());
        let p = sent(&out).into_iter().last().unwrap();
        assert!(p.poll && !p.final_);
        assert_eq!(p.desired_min_tx, FAST.desired_min_tx);
        // A decrease of TX applies at once (only an increase waits for the Final).
        assert_eq!(s.tx_interval(), Some(FAST.desired_min_tx));
        let mut fin = from_peer(State::Up, 5);
        fin.final_ = true;
        s.on_packet(&fin, t0);
        assert!(!s.polling());
        let out = s.on_timer(t0 + SLOW_TX);
        assert!(!sent(&out)[0].poll);
    }

    #[test]
    fn poll_is_answered_with_final_and_no_poll() {
        let t0 = Instant::now();
        let mut s = up(t0);
        let mut poll = from_peer(State::Up, 5);
        poll.poll = true;
        let out = s.on_packet(&poll, t0);
        let p = sent(&out)[0];
        assert!(p.final_ && !p.poll);
    }

    #[test]
    fn increased_tx_waits_for_final() {
        let t0 = Instant::now();
        let mut s = up(t0);
        let slower = Timers {
            desired_min_tx: Duration::from_millis(500),
            ..FAST
        };
        let out = s.set_timers(slower, t0);
        let p = sent(&out)[0];
        assert!(p.poll);
        assert_eq!(p.desired_min_tx, Duration::from_millis(500));
        assert_eq!(s.tx_interval(), Some(FAST.desired_min_tx));
        let mut fin = from_peer(State::Up, 5);
        fin.final_ = true;
        s.on_packet(&fin, t0);
        assert_eq!(s.tx_interval(), Some(Duration::from_millis(500)));
    }

    #[test]
    fn decreased_rx_keeps_the_old_detection_time_until_final() {
        let t0 = Instant::now();
        let mut s = Session::new(
            Timers {
                required_min_rx: Duration::from_millis(400),
                ..FAST
            },
            5,
            1,
            t0,
        );
        s.on_packet(&from_peer(State::Down, 0), t0);
        s.on_packet(&from_peer(State::Up, 5), t0);
        let mut fin = from_peer(State::Up, 5);
        fin.final_ = true;
        s.on_packet(&fin, t0);
        assert_eq!(s.detection_time(), Some(Duration::from_millis(1200)));
        s.set_timers(FAST, t0);
        assert_eq!(s.detection_time(), Some(Duration::from_millis(1200)));
        s.on_packet(&fin, t0);
        assert_eq!(s.detection_time(), Some(Duration::from_millis(300)));
    }

    #[test]
    fn negotiated_intervals_take_the_slower_side() {
        let t0 = Instant::now();
        let mut s = up(t0);
        let mut p = from_peer(State::Up, 5);
        p.required_min_rx = Duration::from_millis(250);
        p.desired_min_tx = Duration::from_millis(200);
        p.detect_mult = 4;
        s.on_packet(&p, t0);
        // RFC 5880 6.8.7: max(our DesiredMinTx 100, their RequiredMinRx 250).
        assert_eq!(s.tx_interval(), Some(Duration::from_millis(250)));
        // RFC 5880 6.8.4: their mult 4 x max(our RequiredMinRx 100, their DesiredMinTx 200).
        assert_eq!(s.detection_time(), Some(Duration::from_millis(800)));
    }

    #[test]
    fn detection_time_expiry_takes_up_down_with_diag_1() {
        let t0 = Instant::now();
        let mut s = up(t0);
        let d = s.detection_time().unwrap();
        // Just before: nothing but periodic packets.
        let mut t = t0;
        while t + Duration::from_millis(10) < t0 + d {
            t += Duration::from_millis(10);
            assert!(changes(&s.on_timer(t)).is_empty());
        }
        let out = s.on_timer(t0 + d);
        assert_eq!(changes(&out), vec![(State::Up, State::Down)]);
        assert_eq!(s.local_diag(), Diag::ControlDetectionTimeExpired);
        // RFC 5880 6.8.1: the remote discriminator is forgotten.
        assert_eq!(s.remote_disc(), 0);
        // A restarted peer (Your Discriminator 0) is accepted again.
        let out = s.on_packet(&from_peer(State::Down, 0), t0 + d);
        assert_eq!(changes(&out), vec![(State::Down, State::Init)]);
    }

    #[test]
    fn jitter_keeps_75_to_100_percent() {
        let t0 = Instant::now();
        let mut s = up(t0);
        for _ in 0..500 {
            let j = s.jittered();
            assert!(
                j >= Duration::from_millis(75) && j <= Duration::from_millis(100),
                "{j:?}"
            );
        }
        // RFC 5880 6.8.7: with DetectMult 1, at most 90%.
        s.timers.detect_mult = 1;
        for _ in 0..500 {
            let j = s.jittered();
            assert!(
                j >= Duration::from_millis(75) && j <= Duration::from_millis(90),
                "{j:?}"
            );
        }
    }

    #[test]
    fn remote_min_rx_zero_stops_periodic_packets() {
        let t0 = Instant::now();
        let mut s = up(t0);
        let mut p = from_peer(State::Up, 5);
        p.required_min_rx = Duration::ZERO;
        s.on_packet(&p, t0);
        assert_eq!(s.tx_interval(), None);
        assert!(sent(&s.on_timer(t0 + Duration::from_millis(250))).is_empty());
    }

    #[test]
    fn admin_down_sends_diag_7_and_ignores_the_peer() {
        let t0 = Instant::now();
        let mut s = up(t0);
        let out = s.admin_down(t0);
        let p = sent(&out)[0];
        assert_eq!(p.state, State::AdminDown);
        assert_eq!(p.diag, Diag::AdministrativelyDown);
        assert!(s.on_packet(&from_peer(State::Up, 5), t0).is_empty());
        assert_eq!(s.next_deadline(), None);
    }

    #[test]
    fn no_event_sequence_panics() {
        let t0 = Instant::now();
        let mut s = Session::new(FAST, 5, 9, t0);
        let mut x: u64 = 88172645463325252;
        let mut t = t0;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            t += Duration::from_millis(x % 400);
            match x % 5 {
                0 => {
                    s.on_timer(t);
                }
                1 => {
                    let mut p = from_peer(State::from_bits((x >> 8) as u8), (x >> 16) as u32 % 7);
                    p.poll = x & 0x100 != 0;
                    p.final_ = x & 0x200 != 0;
                    p.required_min_rx = Duration::from_micros((x >> 20) % 2_000_000);
                    p.detect_mult = ((x >> 40) % 255 + 1) as u8;
                    s.on_packet(&p, t);
                }
                2 => {
                    s.set_timers(
                        Timers {
                            desired_min_tx: Duration::from_millis(1 + (x >> 30) % 2000),
                            ..FAST
                        },
                        t,
                    );
                }
                _ => {
                    s.on_timer(t);
                }
            }
        }
    }
}
