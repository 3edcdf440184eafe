//! The forwarding database of a learning bridge: which port each (VLAN, MAC)
//! was last seen on, and when. Entries older than the ageing time are
//! treated as gone and removed by [`Fdb::age`]. Time comes from a [`Clock`],
//! so tests (and simulations) move it by hand.
//!
//! The table is bounded: a port without a configured MAC (an uplink) could
//! otherwise grow it without limit by sending from random source addresses.
//! When it is full, new stations are not learned and their frames are
//! flooded, as on a hardware switch whose table is full.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::time::{Duration, Instant};

/// Where the switch reads the time.
pub trait Clock: Send {
    /// Time since some fixed point; never goes backwards.
    fn now(&self) -> Duration;
}

/// The host's monotonic clock.
#[derive(Debug, Clone, Copy)]
pub struct MonotonicClock {
    start: Instant,
}

impl MonotonicClock {
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
        }
    }
}

impl Default for MonotonicClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for MonotonicClock {
    fn now(&self) -> Duration {
        self.start.elapsed()
    }
}

/// A hasher for the table's `u64` keys (VLAN and MAC packed together): one
/// multiply and a fold. The keys come from guests, but the table is bounded
/// ([`Fdb::new`]), so a guest that aims for collisions slows its own VLAN's
/// lookups at worst.
#[derive(Default)]
pub struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, key: u64) {
        let h = (self.0 ^ key).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        self.0 = h ^ (h >> 29);
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    port: usize,
    seen: Duration,
}

/// What learning a source address did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Learned {
    /// A new station, now on `port`.
    New,
    /// Known on this port already; its time was refreshed.
    Refreshed,
    /// The station moved here from another port.
    Moved { from: usize },
    /// The table is full; the station was not learned.
    Full,
}

/// The forwarding database.
#[derive(Debug)]
pub struct Fdb {
    entries: HashMap<u64, Entry, BuildHasherDefault<KeyHasher>>,
    ageing: Duration,
    capacity: usize,
}

fn key(vlan: u16, mac: u64) -> u64 {
    u64::from(vlan) << 48 | mac
}

impl Fdb {
    /// An empty table that forgets stations after `ageing` and holds at most
    /// `capacity` of them.
    pub fn new(ageing: Duration, capacity: usize) -> Self {
        Self {
            entries: HashMap::default(),
            ageing,
            capacity,
        }
    }

    fn fresh(&self, entry: &Entry, now: Duration) -> bool {
        now.saturating_sub(entry.seen) < self.ageing
    }

    /// Records that `mac` (as from [`crate::MacAddr::to_u64`]) on `vlan`
    /// sent from `port` at `now`.
    pub fn learn(&mut self, vlan: u16, mac: u64, port: usize, now: Duration) -> Learned {
        let full = self.entries.len() >= self.capacity;
        match self.entries.get_mut(&key(vlan, mac)) {
            Some(e) if e.port == port => {
                e.seen = now;
                Learned::Refreshed
            }
            Some(e) => {
                let from = e.port;
                *e = Entry { port, seen: now };
                Learned::Moved { from }
            }
            None if full => Learned::Full,
            None => {
                self.entries
                    .insert(key(vlan, mac), Entry { port, seen: now });
                Learned::New
            }
        }
    }

    /// The port `mac` on `vlan` was last seen on, unless it has aged out.
    pub fn lookup(&self, vlan: u16, mac: u64, now: Duration) -> Option<usize> {
        let entry = self.entries.get(&key(vlan, mac))?;
        self.fresh(entry, now).then_some(entry.port)
    }

    /// Removes the entries that have aged out; returns the ports they were
    /// on, one per entry.
    pub fn age(&mut self, now: Duration) -> Vec<usize> {
        let ageing = self.ageing;
        let mut gone = Vec::new();
        self.entries.retain(|_, e| {
            let keep = now.saturating_sub(e.seen) < ageing;
            if !keep {
                gone.push(e.port);
            }
            keep
        });
        gone
    }

    /// Forgets every station on `port` (the port went away); returns how many.
    pub fn flush_port(&mut self, port: usize) -> usize {
        let before = self.entries.len();
        self.entries.retain(|_, e| e.port != port);
        before - self.entries.len()
    }

    /// The number of stations in the table, aged or not.
    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn learns_refreshes_and_moves() {
        let mut fdb = Fdb::new(300 * S, 16);
        assert_eq!(fdb.learn(1, 0xa, 0, S), Learned::New);
        assert_eq!(fdb.learn(1, 0xa, 0, 2 * S), Learned::Refreshed);
        assert_eq!(fdb.lookup(1, 0xa, 3 * S), Some(0));
        assert_eq!(fdb.learn(1, 0xa, 3, 4 * S), Learned::Moved { from: 0 });
        assert_eq!(fdb.lookup(1, 0xa, 5 * S), Some(3));
        // The same MAC on another VLAN is another station.
        assert_eq!(fdb.lookup(2, 0xa, 5 * S), None);
    }

    #[test]
    fn entries_age_out_at_the_ageing_time() {
        let mut fdb = Fdb::new(10 * S, 16);
        fdb.learn(1, 0xa, 0, S);
        fdb.learn(1, 0xb, 1, 5 * S);
        assert_eq!(fdb.lookup(1, 0xa, 10 * S), Some(0));
        assert_eq!(fdb.lookup(1, 0xa, 11 * S), None);
        assert_eq!(fdb.age(11 * S), vec![0]);
        assert_eq!(fdb.len(), 1);
        assert_eq!(fdb.lookup(1, 0xb, 11 * S), Some(1));
    }

    #[test]
    fn a_full_table_learns_nothing_new_but_refreshes() {
        let mut fdb = Fdb::new(10 * S, 2);
        fdb.learn(1, 0xa, 0, S);
        fdb.learn(1, 0xb, 0, S);
        assert_eq!(fdb.learn(1, 0xc, 0, S), Learned::Full);
        assert_eq!(fdb.lookup(1, 0xc, S), None);
        assert_eq!(fdb.learn(1, 0xa, 0, 2 * S), Learned::Refreshed);
    }

    #[test]
    fn flushing_a_port_forgets_its_stations() {
        let mut fdb = Fdb::new(10 * S, 16);
        fdb.learn(1, 0xa, 0, S);
        fdb.learn(1, 0xb, 1, S);
        fdb.learn(2, 0xc, 1, S);
        assert_eq!(fdb.flush_port(1), 2);
        assert_eq!(fdb.lookup(1, 0xb, S), None);
        assert_eq!(fdb.lookup(1, 0xa, S), Some(0));
    }
}
