//! The neighbor (ARP) table of one worker: (port, IPv4) → MAC, fixed capacity, allocated
//! once by [`NeighborTable::new`] and never grown.
//!
//! Layout: a set-associative cache of `WAYS`-slot buckets (like the conntrack affinity
//! cache). A key lives in one bucket; when the bucket is full, an incomplete entry or the
//! least recently used dynamic entry is replaced — never a static one. Nothing on the
//! per-packet path allocates.
//!
//! Life of an entry (a simplified Linux NUD):
//! * `Incomplete`: a frame needed this next hop and no MAC is known. [`NeighborTable::sweep`]
//!   emits an ARP request at most once per second while frames keep wanting it, and forgets
//!   the entry after `INCOMPLETE_GIVE_UP` without use.
//! * `Reachable`: learned from ARP. Once older than the neighbor timeout it is refreshed by
//!   a request (at most one per second) while in use, kept usable meanwhile (Linux STALE),
//!   and forgotten (back to incomplete) when nothing answered for `STALE_GRACE`. Unused
//!   aged entries are freed.
//! * `Static`: from the configuration; never aged, never replaced, never overwritten.

use std::net::Ipv4Addr;

use crate::conntrack::Tick;
use crate::maglev::fmix64;
use crate::wire::MacAddr;

const WAYS: usize = 8;
/// ARP requests for one next hop are at least this far apart (ms).
pub const REQUEST_INTERVAL: Tick = 1000;
/// An incomplete entry nobody asked for during this long is dropped (ms).
pub const INCOMPLETE_GIVE_UP: Tick = 5000;
/// An aged, in-use entry that did not answer a refresh during this long is forgotten (ms).
pub const STALE_GRACE: Tick = 5000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Empty,
    Incomplete,
    Reachable,
    Static,
}

#[derive(Clone, Copy, Debug)]
struct Slot {
    state: State,
    port: u16,
    addr: Ipv4Addr,
    mac: MacAddr,
    confirmed: Tick,
    used: Tick,
    requested: Option<Tick>,
}

const EMPTY: Slot = Slot {
    state: State::Empty,
    port: 0,
    addr: Ipv4Addr::UNSPECIFIED,
    mac: MacAddr::ZERO,
    confirmed: 0,
    used: 0,
    requested: None,
};

/// Next hops that became wanted since the last sweep: asked for first, so a held frame
/// waits one housekeeping call for its ARP request, not a full sweep.
const WANTED: usize = 32;

#[derive(Debug)]
pub struct NeighborTable {
    slots: Box<[Slot]>,
    mask: usize,
    cursor: usize,
    wanted: [(u16, Ipv4Addr); WANTED],
    wanted_len: usize,
    /// Counts changes of any slot's mapping or usability, so that a copy of a resolution
    /// (the pipeline's per-destination L2 cache) can tell whether it still holds.
    epoch: u64,
}

impl NeighborTable {
    /// Room for at least `capacity` neighbors.
    pub fn new(capacity: usize) -> NeighborTable {
        let buckets = capacity.div_ceil(WAYS).max(1).next_power_of_two();
        NeighborTable {
            slots: vec![EMPTY; buckets * WAYS].into_boxed_slice(),
            mask: buckets - 1,
            cursor: 0,
            wanted: [(0, Ipv4Addr::UNSPECIFIED); WANTED],
            wanted_len: 0,
            epoch: 1,
        }
    }

    fn bucket(&self, port: u16, addr: Ipv4Addr) -> std::ops::Range<usize> {
        let k = (u64::from(port) << 32) | u64::from(u32::from(addr));
        let b = (fmix64(k ^ 0x6e65_6967_6862_6f72) as usize & self.mask) * WAYS;
        b..b + WAYS
    }

    fn find(&self, port: u16, addr: Ipv4Addr) -> Option<usize> {
        let range = self.bucket(port, addr);
        let start = range.start;
        self.slots[range]
            .iter()
            .position(|s| s.state != State::Empty && s.port == port && s.addr == addr)
            .map(|i| start + i)
    }

    /// A slot for a new key: empty, else incomplete, else the least recently used
    /// reachable one; `None` when the bucket holds only static entries.
    fn victim(&self, port: u16, addr: Ipv4Addr) -> Option<usize> {
        let range = self.bucket(port, addr);
        let start = range.start;
        let ways = &self.slots[range];
        let pick = ways
            .iter()
            .position(|s| s.state == State::Empty)
            .or_else(|| ways.iter().position(|s| s.state == State::Incomplete))
            .or_else(|| {
                ways.iter()
                    .enumerate()
                    .filter(|(_, s)| s.state == State::Reachable)
                    .min_by_key(|(_, s)| s.used.max(s.confirmed))
                    .map(|(i, _)| i)
            })?;
        Some(start + pick)
    }

    /// The MAC of a resolved neighbor (reachable or static).
    pub fn get(&self, port: u16, addr: Ipv4Addr) -> Option<MacAddr> {
        let s = &self.slots[self.find(port, addr)?];
        matches!(s.state, State::Reachable | State::Static).then_some(s.mac)
    }

    /// The per-packet lookup: the MAC if resolved, with the slot that holds it (for
    /// [`NeighborTable::touch`]); otherwise the next hop is remembered as wanted (the next
    /// sweep sends an ARP request) and `None` is returned.
    pub fn resolve(&mut self, port: u16, addr: Ipv4Addr, now: Tick) -> Option<(MacAddr, usize)> {
        if let Some(i) = self.find(port, addr) {
            let s = &mut self.slots[i];
            s.used = now;
            return matches!(s.state, State::Reachable | State::Static).then_some((s.mac, i));
        }
        if let Some(i) = self.victim(port, addr) {
            self.epoch += 1;
            self.slots[i] = Slot {
                state: State::Incomplete,
                port,
                addr,
                mac: MacAddr::ZERO,
                confirmed: 0,
                used: now,
                requested: None,
            };
            if self.wanted_len < WANTED {
                self.wanted[self.wanted_len] = (port, addr);
                self.wanted_len += 1;
            }
        }
        None
    }

    /// Marks the neighbor in `slot` (from [`NeighborTable::resolve`]) as used, as resolving
    /// it again would: valid while [`NeighborTable::epoch`] has not moved since.
    #[inline]
    pub fn touch(&mut self, slot: usize, now: Tick) {
        if let Some(s) = self.slots.get_mut(slot) {
            s.used = now;
        }
    }

    /// Moves whenever a resolution may have changed (a slot learned, replaced, aged or
    /// given up): a resolution copied at one epoch is still right while the epoch is the
    /// same.
    #[inline]
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Records `addr is at mac` on `port`. Creates an entry only when `create` (ARP replies,
    /// requests addressed to us, updates from other workers); otherwise only refreshes an
    /// existing one. Static entries are never changed. Returns true when the mapping is new
    /// or changed (worth telling the other workers).
    pub fn learn(
        &mut self,
        port: u16,
        addr: Ipv4Addr,
        mac: MacAddr,
        now: Tick,
        create: bool,
    ) -> bool {
        let i = match self.find(port, addr) {
            Some(i) => i,
            None if create => match self.victim(port, addr) {
                Some(i) => {
                    self.slots[i] = Slot {
                        port,
                        addr,
                        ..EMPTY
                    };
                    i
                }
                None => return false,
            },
            None => return false,
        };
        let s = &mut self.slots[i];
        if s.state == State::Static {
            return false;
        }
        let changed = s.state != State::Reachable || s.mac != mac;
        self.epoch += u64::from(changed);
        s.state = State::Reachable;
        s.mac = mac;
        s.confirmed = now;
        s.requested = None;
        changed
    }

    /// Makes `statics` the configured neighbors (a config reload): a static entry not in
    /// the list is forgotten (ARP resolves it again when it is needed), the others are set.
    /// False when one of them found no room.
    pub fn replace_statics(&mut self, statics: &[(u16, Ipv4Addr, MacAddr)]) -> bool {
        for slot in self.slots.iter_mut() {
            let kept = statics
                .iter()
                .any(|&(port, addr, _)| slot.port == port && slot.addr == addr);
            if slot.state == State::Static && !kept {
                *slot = EMPTY;
                self.epoch += 1;
            }
        }
        statics.iter().fold(true, |ok, &(port, addr, mac)| {
            self.add_static(port, addr, mac) && ok
        })
    }

    /// A configured neighbor: never aged nor replaced.
    pub fn add_static(&mut self, port: u16, addr: Ipv4Addr, mac: MacAddr) -> bool {
        let Some(i) = self.find(port, addr).or_else(|| self.victim(port, addr)) else {
            return false;
        };
        self.epoch += 1;
        self.slots[i] = Slot {
            state: State::Static,
            port,
            addr,
            mac,
            ..EMPTY
        };
        true
    }

    /// Ages at most `budget` slots from a sweeping cursor and calls `request(port, addr)`
    /// for each next hop that needs an ARP request now.
    pub fn sweep(
        &mut self,
        now: Tick,
        budget: usize,
        timeout: Tick,
        request: &mut dyn FnMut(u16, Ipv4Addr),
    ) {
        for k in 0..self.wanted_len {
            let (port, addr) = self.wanted[k];
            if let Some(i) = self.find(port, addr) {
                let s = &mut self.slots[i];
                if s.state == State::Incomplete && s.requested.is_none() {
                    s.requested = Some(now);
                    request(port, addr);
                }
            }
        }
        self.wanted_len = 0;
        let n = self.slots.len();
        for _ in 0..budget.min(n) {
            let i = self.cursor;
            self.cursor = (i + 1) % n;
            let s = &mut self.slots[i];
            let due = match s.requested {
                None => true,
                Some(t) => now.saturating_sub(t) >= REQUEST_INTERVAL,
            };
            match s.state {
                State::Empty | State::Static => {}
                State::Incomplete => {
                    if now.saturating_sub(s.used) > INCOMPLETE_GIVE_UP {
                        *s = EMPTY;
                        self.epoch += 1;
                    } else if due {
                        s.requested = Some(now);
                        request(s.port, s.addr);
                    }
                }
                State::Reachable => {
                    let age = now.saturating_sub(s.confirmed);
                    if age < timeout {
                        continue;
                    }
                    let in_use = now.saturating_sub(s.used) < timeout;
                    if !in_use {
                        *s = EMPTY;
                        self.epoch += 1;
                    } else if age >= timeout.saturating_add(STALE_GRACE) {
                        s.state = State::Incomplete;
                        s.mac = MacAddr::ZERO;
                        s.requested = Some(now);
                        request(s.port, s.addr);
                        self.epoch += 1;
                    } else if due {
                        s.requested = Some(now);
                        request(s.port, s.addr);
                    }
                }
            }
        }
    }
}
