//! The RIB's output: one change log of prefixes shared by every session that reads it, and the cursor each
//! member reads it with. Nothing here knows attributes or peers: a log entry says only "the export of this
//! prefix may have changed since sequence number N, for members of these update groups"; the member's pump
//! (`output.rs`) looks at the table as it is when it reads the entry and sends that (an announcement, or a
//! withdrawal when there is nothing to send).
//!
//! Why a log and not a queue per member (FRR's update groups and BIRD's exports work the same way): a prefix
//! is in the log at most once (a later change moves it to the end), so the log never holds more entries than
//! there are prefixes, whatever a slow member does; a member that is behind only has an older cursor, and
//! when it reads again it gets each prefix once, as it is then (ten changes while it was stalled cost one
//! UPDATE). Entries every member has read are trimmed.
//!
//! Where a prefix's entry is (its sequence number) is kept in the prefix's own table entry (`Dest::log`),
//! passed in and out of [`ChangeLog::push`]: no map from prefix to position, which cost a table load a
//! million random writes and as many removals. A prefix that leaves the table while its entry is still in
//! the log has its position kept here ([`ChangeLog::gone`]) until the entry is trimmed or the prefix comes
//! back. One log serves every update group: each entry names the groups whose members it concerns.
//!
//! A member that joins (or asks for a route refresh) first walks the table in prefix order ([`Walk`]), then
//! reads the log from the position it took when the walk started: a change behind the walk's position is in
//! the log after that position, so nothing is missed, and a change ahead of it is seen by the walk itself.

use std::collections::{HashMap, VecDeque};

use ipnetwork::IpNetwork;

use super::FastHash;
use crate::bgp::wire::Family;

/// The change log. Sequence numbers start at 1; a cursor at `n` has read every entry up to and including
/// `n` (0: nothing read). A prefix's position is its entry's sequence number (0: none known).
///
/// The entries sit in sequence order in one deque: appending is a push at the back and trimming a pop at
/// the front (a table load appends and trims a million entries). A prefix that moves to the end leaves a
/// hole where it was; holes are dropped by trimming, or all at once when they outnumber the entries (a
/// member stalled behind a flapping prefix must not grow the log).
#[derive(Debug, Default)]
pub(super) struct ChangeLog {
    /// The sequence number of the last entry appended (0: none yet).
    head: u64,
    /// `head` when members last read ([`ChangeLog::expose`]): an entry after it has been read by nobody.
    exposed: u64,
    /// In sequence order.
    entries: VecDeque<Entry>,
    /// Holes in `entries`.
    holes: usize,
    /// The positions of prefixes that left the table while their entry was in the log.
    gone: HashMap<IpNetwork, u64, FastHash>,
}

/// One log entry: its sequence number, its prefix (None where the prefix moved on), the update groups it
/// concerns ([`group_bit`]) and the member the change did not concern ([`Quiet`]).
#[derive(Debug, Clone, Copy)]
pub(super) struct Entry {
    pub seq: u64,
    pub prefix: Option<IpNetwork>,
    pub groups: u32,
    pub quiet: Quiet,
}

/// The bit of update group `g` in [`Entry::groups`]. Groups from 31 on share the last bit: a member of one
/// of them may read an entry that did not concern it, and then sends the prefix's export as it is (a
/// repeat, or a withdrawal of a prefix it does not hold, which RFC 4271 3.1 allows). A RIB has as many
/// groups as distinct peer settings: a handful.
pub(super) fn group_bit(g: usize) -> u32 {
    1 << g.min(31)
}

/// The one member (its slot) whose export of the prefix was nothing before the change and is nothing
/// after it, typically the peer the route came from: it skips the entry, so it gets no withdrawal of a
/// prefix it was never sent. `NO_QUIET`: no such member known.
pub(super) type Quiet = u16;
pub(super) const NO_QUIET: Quiet = 0;

/// Holes are only compacted away beyond this many (and when they outnumber the entries).
const HOLES_KEPT: usize = 1024;

impl ChangeLog {
    /// The position a cursor has after reading everything there is now.
    pub fn head(&self) -> u64 {
        self.head
    }

    /// Entries held (at most one per prefix).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len() - self.holes
    }

    /// The index of the first entry after `seq`.
    fn index_after(&self, seq: u64) -> usize {
        self.entries.partition_point(|e| e.seq <= seq)
    }

    /// The index of `prefix`'s entry at position `at`, if it is still in the log.
    fn index_of(&self, prefix: &IpNetwork, at: u64) -> Option<usize> {
        if at == 0 || self.entries.front().is_none_or(|e| e.seq > at) {
            return None;
        }
        let i = self.entries.partition_point(|e| e.seq < at);
        self.entries
            .get(i)
            .filter(|e| e.seq == at && e.prefix.as_ref() == Some(prefix))
            .map(|_| i)
    }

    /// Record that the export of `prefix` may have changed for the members of the groups in `groups`.
    /// `at` is the prefix's position (its table entry's, or [`ChangeLog::revive`]'s for a prefix coming
    /// back), updated here. The prefix goes to the end of the log, unless its entry is in the part nobody
    /// has read yet (several members, or several changes, between two reads): then that entry stands for
    /// this change too. `quiet`: the member this change did not concern ([`Quiet`]); an entry that stands
    /// for several changes keeps it only if they all agree.
    pub fn push(&mut self, prefix: IpNetwork, at: &mut u64, groups: u32, quiet: Quiet) {
        let mut quiet = quiet;
        let mut groups = groups;
        if let Some(i) = self.index_of(&prefix, *at) {
            let exposed = self.exposed;
            let e = &mut self.entries[i];
            let agreed = if e.quiet == quiet { quiet } else { NO_QUIET };
            if e.seq > exposed {
                // Nobody has read it: this change joins it where it is.
                e.quiet = agreed;
                e.groups |= groups;
                return;
            }
            // A member behind it reads the new entry at the end instead, whichever group it is in (one
            // of those groups that had read the old entry reads the prefix again: a repeat of its export).
            quiet = agreed;
            groups |= e.groups;
            e.prefix = None;
            self.holes += 1;
        }
        self.head += 1;
        *at = self.head;
        self.entries.push_back(Entry {
            seq: self.head,
            prefix: Some(prefix),
            groups,
            quiet,
        });
        if self.holes > HOLES_KEPT && self.holes * 2 > self.entries.len() {
            self.entries.retain(|e| e.prefix.is_some());
            self.holes = 0;
        }
    }

    /// `prefix` leaves the table, its entry (if any) at position `at`: keep the position until the entry
    /// is trimmed or the prefix comes back.
    pub fn forget(&mut self, prefix: IpNetwork, at: u64) {
        if self.index_of(&prefix, at).is_some() {
            self.gone.insert(prefix, at);
        }
    }

    /// The position of `prefix`, entering the table: its entry's if it left the table while its entry was
    /// in the log, else 0.
    pub fn revive(&mut self, prefix: &IpNetwork) -> u64 {
        if self.gone.is_empty() {
            return 0;
        }
        self.gone.remove(prefix).unwrap_or(0)
    }

    /// Members are about to read: every entry so far may be behind some cursor from now on, so a new
    /// change of its prefix must go to the end again.
    pub fn expose(&mut self) {
        self.exposed = self.head;
    }

    /// The first entry after `cursor`.
    #[cfg(test)]
    pub fn next_after(&self, cursor: u64) -> Option<Entry> {
        self.entries
            .range(self.index_after(cursor)..)
            .find(|e| e.prefix.is_some())
            .copied()
    }

    /// Up to `n` entries after `cursor`, in order, into `out` (cleared first): one search for the start,
    /// then a plain walk (a member reading a long log must not search once per entry).
    pub fn entries_after(&self, cursor: u64, n: usize, out: &mut Vec<Entry>) {
        out.clear();
        out.extend(
            self.entries
                .range(self.index_after(cursor)..)
                .filter(|e| e.prefix.is_some())
                .take(n),
        );
    }

    /// Drop every entry at or before `upto` (every member has read them).
    pub fn trim(&mut self, upto: u64) {
        while let Some(&e) = self.entries.front() {
            if e.seq > upto {
                break;
            }
            self.entries.pop_front();
            match e.prefix {
                Some(prefix) => {
                    if !self.gone.is_empty() && self.gone.get(&prefix) == Some(&e.seq) {
                        self.gone.remove(&prefix);
                    }
                }
                None => self.holes -= 1,
            }
        }
        if self.entries.is_empty() && self.entries.capacity() > HOLES_KEPT {
            // Give the memory back after a burst (a table load, a storm of restarts).
            self.entries = VecDeque::new();
            self.gone = HashMap::default();
        }
    }
}

/// A member's walk through the table: the families still to send, where the current one is, and the log
/// position to read on from once it is done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Walk {
    /// Families to walk, in order, each with whether End-of-RIB follows it (a session's initial table,
    /// RFC 4724 2) or not (a route refresh, RFC 2918 4).
    pub families: Vec<(Family, bool)>,
    /// The first prefix of `families[0]` not sent yet (None: from the start).
    pub next: Option<IpNetwork>,
    /// The log position the member continues from after the walk.
    pub from: u64,
    /// The table of `families[0]` has been walked to its end (its End-of-RIB, if any, is still due).
    pub done: bool,
}

impl Walk {
    /// Add a family (a route refresh during a walk); one already waiting is walked once, from the start
    /// of its turn, which includes everything the refresh asks for.
    pub fn add(&mut self, family: Family, eor: bool) {
        match self.families.iter_mut().skip(1).find(|(f, _)| *f == family) {
            Some((_, e)) => *e |= eor,
            None => self.families.push((family, eor)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// A log with the prefixes' positions kept beside it (the table keeps them in the RIB).
    #[derive(Default)]
    struct Log {
        log: ChangeLog,
        at: HashMap<IpNetwork, u64>,
    }

    impl Log {
        fn push(&mut self, prefix: IpNetwork, quiet: Quiet) {
            let at = self.at.entry(prefix).or_default();
            self.log.push(prefix, at, 1, quiet);
        }
    }

    impl std::ops::Deref for Log {
        type Target = ChangeLog;
        fn deref(&self) -> &ChangeLog {
            &self.log
        }
    }

    impl std::ops::DerefMut for Log {
        fn deref_mut(&mut self) -> &mut ChangeLog {
            &mut self.log
        }
    }

    fn p(k: u8) -> IpNetwork {
        format!("10.0.{k}.0/24").parse().unwrap()
    }

    /// Read everything after `cursor`, returning the prefixes in log order and the new cursor.
    fn read(log: &ChangeLog, mut cursor: u64) -> (Vec<IpNetwork>, u64) {
        let mut out = Vec::new();
        while let Some(e) = log.next_after(cursor) {
            out.extend(e.prefix);
            cursor = e.seq;
        }
        (out, cursor)
    }

    #[test]
    fn a_prefix_is_in_the_log_once_at_its_last_change() {
        let mut log = Log::default();
        log.expose();
        log.push(p(1), NO_QUIET);
        log.push(p(2), NO_QUIET);
        log.expose();
        log.push(p(1), NO_QUIET);
        log.push(p(1), NO_QUIET);
        assert_eq!(log.len(), 2);
        assert_eq!(read(&log, 0).0, vec![p(2), p(1)]);
    }

    /// A change of a prefix whose entry a member has already read (it is the last entry, nothing came
    /// after) reaches that member: the entry moves past its cursor.
    #[test]
    fn a_change_after_a_read_is_read_again() {
        let mut log = Log::default();
        log.push(p(1), NO_QUIET);
        log.expose();
        let (got, cursor) = read(&log, 0);
        assert_eq!(got, vec![p(1)]);
        log.push(p(1), NO_QUIET);
        assert_eq!(read(&log, cursor).0, vec![p(1)]);
    }

    /// A member that never reads costs at most one entry per prefix however many changes it misses; a
    /// member that keeps up reads every change and is not held back.
    #[test]
    fn a_slow_member_is_bounded_by_the_prefixes_and_delays_nobody() {
        let mut log = Log::default();
        let slow = 0u64;
        let mut fast = 0u64;
        for round in 0..1000u32 {
            let k = (round % 50) as u8;
            log.push(p(k), NO_QUIET);
            log.expose();
            let (got, c) = read(&log, fast);
            assert_eq!(got, vec![p(k)], "the fast member sees each change at once");
            fast = c;
            log.trim(slow.min(fast));
            assert!(log.len() <= 50);
        }
        let (got, _) = read(&log, slow);
        assert_eq!(got.len(), 50, "the slow member gets each prefix once");
    }

    /// A member joining while changes go on: it walks a snapshot of the table position by position and
    /// then reads the log from where it stood when it began, so every change made during the walk reaches
    /// it, whether it fell behind or ahead of the walk's position.
    #[test]
    fn a_join_during_changes_sees_every_change() {
        let mut log = Log::default();
        let mut table: BTreeMap<IpNetwork, u32> = (0..20).map(|k| (p(k), 0)).collect();
        for k in 0..20 {
            log.push(p(k), NO_QUIET);
        }
        let walk = Walk {
            families: vec![(Family::IPV4_UNICAST, true)],
            next: None,
            from: log.head(),
            done: false,
        };
        let mut held: BTreeMap<IpNetwork, u32> = BTreeMap::new();
        let mut next = Some(p(0));
        let mut version = 1;
        while let Some(at) = next {
            // One prefix of the walk, then a change somewhere in the table (behind and ahead).
            let item = table.range(at..).next().map(|(k, v)| (*k, *v));
            let Some((k, v)) = item else { break };
            held.insert(k, v);
            next = table.range(k..).nth(1).map(|(k, _)| *k);
            let changed = p((version * 7 % 20) as u8);
            table.insert(changed, version);
            log.expose();
            log.push(changed, NO_QUIET);
            version += 1;
        }
        // A withdrawal during the walk too.
        table.remove(&p(3));
        log.push(p(3), NO_QUIET);
        let (got, _) = read(&log, walk.from);
        for prefix in got {
            match table.get(&prefix) {
                Some(v) => held.insert(prefix, *v),
                None => held.remove(&prefix),
            };
        }
        assert_eq!(held, table);
    }

    /// A prefix that keeps changing while a member is stalled (so nothing is trimmed) leaves holes
    /// behind; they are dropped before they outnumber the entries, and the stalled member still reads
    /// every prefix once, in the order of their last change.
    #[test]
    fn holes_of_a_flapping_prefix_do_not_grow_the_log() {
        let mut log = Log::default();
        for k in 0..10 {
            log.push(p(k), NO_QUIET);
        }
        for _ in 0..10_000 {
            log.expose();
            log.push(p(3), NO_QUIET);
        }
        assert!(
            log.entries.len() <= 2 * (HOLES_KEPT + 10),
            "{} entries held",
            log.entries.len()
        );
        let (got, cursor) = read(&log, 0);
        let mut want: Vec<IpNetwork> = (0..10).filter(|k| *k != 3).map(p).collect();
        want.push(p(3));
        assert_eq!(got, want);
        log.trim(cursor);
        assert_eq!(log.len(), 0);
    }

    /// Announce then withdraw before the member reads: it reads the prefix once and, the table holding
    /// nothing for it, sends one withdrawal (coalesced) instead of an announcement and a withdrawal.
    #[test]
    fn withdraw_after_announce_coalesces() {
        let mut log = Log::default();
        log.push(p(1), NO_QUIET);
        log.push(p(2), NO_QUIET);
        log.expose();
        log.push(p(1), NO_QUIET);
        let (got, c) = read(&log, 0);
        assert_eq!(got, vec![p(2), p(1)]);
        log.trim(c);
        assert_eq!(log.len(), 0);
        assert!(log.next_after(c).is_none());
    }

    /// A prefix that leaves the table while a member has not read its entry, and comes back: its position
    /// is kept by the log meanwhile, so it is still in the log once; once its entry is trimmed the log
    /// keeps nothing for it.
    #[test]
    fn a_prefix_that_leaves_and_comes_back_is_in_the_log_once() {
        let mut log = ChangeLog::default();
        let mut at = 0;
        log.push(p(1), &mut at, 1, NO_QUIET);
        log.expose();
        // Withdrawn: the table entry (and `at` with it) goes away.
        log.push(p(1), &mut at, 1, NO_QUIET);
        log.forget(p(1), at);
        log.expose();
        // Back: the position comes from the log.
        let mut back = log.revive(&p(1));
        assert_eq!(back, at);
        log.push(p(1), &mut back, 1, NO_QUIET);
        assert_eq!(log.len(), 1);
        let e = log.next_after(0).unwrap();
        assert_eq!((e.prefix, e.seq), (Some(p(1)), back));
        // Gone again, then trimmed: nothing is kept for it.
        log.forget(p(1), back);
        log.trim(log.head());
        assert_eq!(log.revive(&p(1)), 0);
        assert!(log.gone.is_empty());
    }

    /// Changes for different update groups between two reads share one entry naming both groups; a
    /// change after a read moves the entry to the end still naming the groups of the one it replaces (a
    /// member of either group may be behind it).
    #[test]
    fn an_entry_names_every_group_it_concerns() {
        let mut log = ChangeLog::default();
        let mut at = 0;
        log.push(p(1), &mut at, group_bit(1), NO_QUIET);
        log.push(p(1), &mut at, group_bit(2), NO_QUIET);
        assert_eq!(log.len(), 1);
        assert_eq!(
            log.next_after(0).unwrap().groups,
            group_bit(1) | group_bit(2)
        );
        log.expose();
        log.push(p(1), &mut at, group_bit(3), NO_QUIET);
        assert_eq!(log.len(), 1);
        let e = log.next_after(0).unwrap();
        assert_eq!(e.seq, at);
        assert_eq!(e.groups, group_bit(1) | group_bit(2) | group_bit(3));
        assert_eq!(group_bit(40), group_bit(31));
    }

    #[test]
    fn a_refresh_during_a_walk_is_walked_once() {
        let mut w = Walk {
            families: vec![(Family::IPV4_UNICAST, true), (Family::IPV6_UNICAST, true)],
            next: None,
            from: 0,
            done: false,
        };
        w.add(Family::IPV6_UNICAST, false);
        w.add(Family::IPV4_UNICAST, false);
        assert_eq!(
            w.families,
            vec![
                (Family::IPV4_UNICAST, true),
                (Family::IPV6_UNICAST, true),
                (Family::IPV4_UNICAST, false)
            ]
        );
    }
}
