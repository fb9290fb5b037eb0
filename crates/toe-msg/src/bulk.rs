//! Bulk transfer over primed connections (seed 003 #1): a transfer opens more connections
//! than it uses at once, primes each before data flows, keeps the spare ones in reserve,
//! and runs as a sequence of sub-transfers, each a set amount of data spread over a chosen
//! subset of the connections in proportion to their measured rates. After each
//! sub-transfer the planner drops the stragglers (a connection in loss recovery delivers
//! little) and brings in reserves, which are primed and so start at speed.
//!
//! [`Planner`] decides; the shell carries it out:
//! - [`Planner::add_conn`] when a connection joins the pipe (after TLS), then
//!   [`Planner::prime`] bytes of [`crate::Frame::Prime`] on it, reporting them with
//!   [`Planner::primed`] — priming fills the connection's congestion window through slow
//!   start and measures its round trip and rate before any data depends on it;
//! - [`Planner::on_progress`] with the bytes written on a connection and acknowledged by
//!   TCP so far;
//! - [`Planner::poll`] once per pass, then [`Planner::quota`]: the data bytes a connection
//!   may take now (0: it is priming, a reserve, or done with its share), and
//!   [`Planner::took`] for what it took.
//!
//! Units: bytes are the connection's stream bytes (what the shell wrote to the socket,
//! TLS records included), rates bytes per second, time µs of the caller's clock. Pure:
//! time is an argument.

use crate::pipe::ConnId;

/// How the planner runs a transfer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BulkConfig {
    /// Connections carrying data at once; the others are reserves.
    pub active: usize,
    /// Priming bytes per connection (about its share of the bandwidth-delay product, so
    /// its window has grown to carry that share when data starts).
    pub prime_bytes: usize,
    /// Data bytes of one sub-transfer, over all its connections.
    pub subtransfer_bytes: u64,
    /// A connection that delivered less than this fraction of the median of its
    /// sub-transfer's connections is a straggler: it goes back to the reserves.
    pub straggler: f64,
    /// A sub-transfer lasting this many times its expected time ends anyway (when its
    /// connections stopped taking data: all of them stalled).
    pub overrun: f64,
    /// Once the first connection is primed, data waits at most this many of its round
    /// trips for the others (a connection that never primes holds nothing up).
    pub prime_wait_rtts: u32,
}

impl Default for BulkConfig {
    /// 8 active connections, 256 KiB of priming each, 16 MiB sub-transfers, stragglers
    /// below half the median, sub-transfers cut at twice their expected time, priming
    /// waited for up to 4 round trips.
    fn default() -> Self {
        BulkConfig {
            active: 8,
            prime_bytes: 256 << 10,
            subtransfer_bytes: 16 << 20,
            straggler: 0.5,
            overrun: 2.0,
            prime_wait_rtts: 4,
        }
    }
}

/// What a connection is doing in the transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Sending its priming bytes, or waiting for them to be acknowledged.
    Priming,
    /// Primed, carrying no data now.
    Reserve,
    /// In the current sub-transfer's subset.
    Active,
    /// Gone.
    Down,
}

#[derive(Debug, Clone)]
struct Conn {
    role: Role,
    joined_us: u64,
    /// Stream bytes acknowledged when it joined (its TLS handshake and hello).
    acked_base: u64,
    acked: u64,
    /// Stream bytes written, in all.
    written: u64,
    prime_queued: usize,
    /// When priming bytes were first acknowledged, µs.
    rtt_us: Option<u64>,
    /// The last rate measured, bytes per second.
    rate: f64,
    /// Data bytes it may still take in this sub-transfer.
    quota: u64,
    /// `acked` when the sub-transfer began.
    acked_at_start: u64,
}

#[derive(Debug, Clone, Copy)]
struct Sub {
    started_us: u64,
    deadline_us: u64,
}

/// What the planner did, for reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct BulkStats {
    /// Connections that finished priming.
    pub primed: u64,
    /// Priming bytes queued, all connections.
    pub prime_bytes: u64,
    /// Sub-transfers begun.
    pub subtransfers: u64,
    /// Stragglers sent back to the reserves.
    pub stragglers_dropped: u64,
    /// Reserves brought into a later sub-transfer.
    pub reserves_promoted: u64,
    /// When the first data could go (the first sub-transfer began), µs.
    pub data_from_us: Option<u64>,
}

/// The bulk-transfer planner of one sending pipe.
#[derive(Debug, Clone)]
pub struct Planner {
    cfg: BulkConfig,
    /// By the pipe's connection number.
    conns: Vec<Option<Conn>>,
    sub: Option<Sub>,
    /// Data bytes of the current sub-transfer not taken yet: the sum of the active
    /// connections' quotas.
    untaken: u64,
    /// When the first connection finished priming, and its round trip, µs.
    first_primed: Option<(u64, u64)>,
    stats: BulkStats,
}

impl Planner {
    /// A planner per `cfg` with no connections yet.
    pub fn new(cfg: BulkConfig) -> Planner {
        Planner {
            cfg: BulkConfig {
                active: cfg.active.max(1),
                ..cfg
            },
            conns: Vec::new(),
            sub: None,
            untaken: 0,
            first_primed: None,
            stats: BulkStats::default(),
        }
    }

    /// Connection `id` joined at `now_us`, `acked` stream bytes acknowledged so far.
    pub fn add_conn(&mut self, id: ConnId, acked: u64, now_us: u64) {
        if self.conns.len() <= id {
            self.conns.resize(id + 1, None);
        }
        self.conns[id] = Some(Conn {
            role: if self.cfg.prime_bytes == 0 {
                Role::Reserve
            } else {
                Role::Priming
            },
            joined_us: now_us,
            acked_base: acked,
            acked,
            written: acked,
            prime_queued: 0,
            rtt_us: None,
            rate: 0.0,
            quota: 0,
            acked_at_start: acked,
        });
        if self.cfg.prime_bytes == 0 {
            self.stats.primed += 1;
        }
    }

    /// Connection `id` is gone; what it did not take goes to the next sub-transfer.
    pub fn conn_down(&mut self, id: ConnId) {
        if let Some(c) = self.conns.get_mut(id).and_then(Option::as_mut) {
            if c.role == Role::Active {
                self.untaken -= c.quota;
            }
            c.role = Role::Down;
            c.quota = 0;
        }
    }

    fn conn_mut(&mut self, id: ConnId) -> Option<&mut Conn> {
        self.conns.get_mut(id).and_then(Option::as_mut)
    }

    /// The role of connection `id` (`None`: never added).
    pub fn role(&self, id: ConnId) -> Option<Role> {
        self.conns.get(id).and_then(Option::as_ref).map(|c| c.role)
    }

    /// Priming bytes connection `id` is still to send.
    pub fn prime(&self, id: ConnId) -> usize {
        self.conns
            .get(id)
            .and_then(Option::as_ref)
            .filter(|c| c.role == Role::Priming)
            .map_or(0, |c| self.cfg.prime_bytes.saturating_sub(c.prime_queued))
    }

    /// `n` priming bytes were queued on connection `id`.
    pub fn primed(&mut self, id: ConnId, n: usize) {
        if let Some(c) = self.conn_mut(id) {
            c.prime_queued += n;
            self.stats.prime_bytes += n as u64;
        }
    }

    /// By `now_us` connection `id` wrote `written` stream bytes and TCP acknowledged
    /// `acked` of them (running totals).
    pub fn on_progress(&mut self, id: ConnId, written: u64, acked: u64, now_us: u64) {
        let prime_bytes = self.cfg.prime_bytes;
        let Some(c) = self.conn_mut(id) else {
            return;
        };
        c.acked = c.acked.max(acked);
        c.written = c.written.max(written).max(c.acked);
        let since = c.acked - c.acked_base;
        if since > 0 && c.rtt_us.is_none() {
            c.rtt_us = Some(now_us.saturating_sub(c.joined_us).max(1));
        }
        if c.role == Role::Priming && c.prime_queued >= prime_bytes && since >= prime_bytes as u64 {
            c.role = Role::Reserve;
            let took = now_us.saturating_sub(c.joined_us).max(1);
            c.rate = since as f64 * 1e6 / took as f64;
            let rtt = c.rtt_us.unwrap_or(took);
            self.stats.primed += 1;
            self.first_primed.get_or_insert((now_us, rtt));
        }
    }

    /// Data bytes connection `id` may take now: its share of the sub-transfer, and once
    /// that is taken, what the subset's other connections have not taken yet (a fast
    /// connection does not wait for a slow one; the sub-transfer still moves its set
    /// amount). 0 for a connection not in the subset.
    pub fn quota(&self, id: ConnId) -> usize {
        let Some(c) = self
            .conns
            .get(id)
            .and_then(Option::as_ref)
            .filter(|c| c.role == Role::Active)
        else {
            return 0;
        };
        let q = if c.quota > 0 { c.quota } else { self.untaken };
        q.min(usize::MAX as u64) as usize
    }

    /// Connection `id` took `n` data bytes: from its share, and past it from the largest
    /// share left.
    pub fn took(&mut self, id: ConnId, n: usize) {
        let Some(c) = self.conn_mut(id) else {
            return;
        };
        if c.role != Role::Active {
            return;
        }
        let own = c.quota.min(n as u64);
        c.quota -= own;
        self.untaken -= own;
        let mut left = n as u64 - own;
        while left > 0 {
            let Some(o) = self
                .conns
                .iter_mut()
                .flatten()
                .filter(|c| c.role == Role::Active && c.quota > 0)
                .max_by_key(|c| c.quota)
            else {
                break;
            };
            let t = o.quota.min(left);
            o.quota -= t;
            self.untaken -= t;
            left -= t;
        }
    }

    /// Run the plan at `now_us`: begin the first sub-transfer once enough connections
    /// are primed, the next once the current one's bytes were all taken (or it overran).
    /// Returns whether a sub-transfer began.
    pub fn poll(&mut self, now_us: u64) -> bool {
        match self.sub {
            None => {
                let (primed, priming) = self.count();
                let waited = self.first_primed.is_some_and(|(t, rtt)| {
                    now_us >= t + rtt.saturating_mul(self.cfg.prime_wait_rtts as u64)
                });
                if primed > 0 && (primed >= self.cfg.active || priming == 0 || waited) {
                    self.stats.data_from_us = Some(now_us);
                    self.begin(now_us);
                    return true;
                }
                false
            }
            Some(s) => {
                if self.untaken == 0 || now_us >= s.deadline_us {
                    self.measure(now_us, s);
                    self.begin(now_us);
                    return true;
                }
                false
            }
        }
    }

    /// (primed and up, still priming).
    fn count(&self) -> (usize, usize) {
        let live = self.conns.iter().flatten();
        let primed = live
            .clone()
            .filter(|c| matches!(c.role, Role::Reserve | Role::Active))
            .count();
        (primed, live.filter(|c| c.role == Role::Priming).count())
    }

    /// The rates of the sub-transfer that ends at `now_us`; stragglers go to the
    /// reserves.
    fn measure(&mut self, now_us: u64, s: Sub) {
        let took = now_us.saturating_sub(s.started_us).max(1) as f64 / 1e6;
        let mut rates = Vec::new();
        for c in self.conns.iter_mut().flatten() {
            if c.role == Role::Active {
                c.rate = (c.acked - c.acked_at_start) as f64 / took;
                rates.push(c.rate);
            }
        }
        rates.sort_by(f64::total_cmp);
        let Some(&median) = rates.get(rates.len() / 2) else {
            return;
        };
        // A straggler delivered little of what it holds: it is slow, not starved (a
        // connection the pacer or the sessions gave little to is no straggler).
        let rtt = self.min_rtt_us().unwrap_or(0) as f64 / 1e6;
        let backlog = median * rtt / 2.0;
        for c in self.conns.iter_mut().flatten() {
            if c.role == Role::Active
                && c.rate < self.cfg.straggler * median
                && (c.written - c.acked) as f64 >= backlog
            {
                self.untaken -= c.quota;
                c.quota = 0;
                c.role = Role::Reserve;
                self.stats.stragglers_dropped += 1;
            }
        }
    }

    /// Choose the subset and the shares of a new sub-transfer.
    fn begin(&mut self, now_us: u64) {
        let mut active: Vec<f64> = self
            .conns
            .iter()
            .flatten()
            .filter(|c| c.role == Role::Active)
            .map(|c| c.rate)
            .collect();
        active.sort_by(f64::total_cmp);
        // A reserve comes in at the subset's median (its priming rate was measured in
        // slow start, and a straggler's is old): its share is then measured.
        let entry_rate = active.get(active.len() / 2).copied();
        let first = self.stats.subtransfers == 0;
        while active.len() < self.cfg.active {
            let best = self
                .conns
                .iter_mut()
                .flatten()
                .filter(|c| c.role == Role::Reserve)
                .max_by(|a, b| a.rate.total_cmp(&b.rate));
            let Some(c) = best else {
                break;
            };
            c.role = Role::Active;
            if let Some(r) = entry_rate {
                c.rate = r;
            }
            if !first {
                self.stats.reserves_promoted += 1;
            }
            active.push(c.rate);
        }
        let sum: f64 = active.iter().sum();
        let n = active.len().max(1) as f64;
        let total = self.cfg.subtransfer_bytes as f64;
        self.untaken = 0;
        for c in self.conns.iter_mut().flatten() {
            if c.role == Role::Active {
                let share = if sum > 0.0 { c.rate / sum } else { 1.0 / n };
                c.quota = (total * share).ceil().max(1.0) as u64;
                c.acked_at_start = c.acked;
                self.untaken += c.quota;
            }
        }
        let expected_us = if sum > 0.0 { total / sum * 1e6 } else { 1e6 };
        let rtt = self.first_primed.map_or(0, |(_, r)| r);
        let span = (expected_us * self.cfg.overrun).max(2.0 * rtt as f64) as u64;
        self.sub = Some(Sub {
            started_us: now_us,
            deadline_us: now_us.saturating_add(span.max(1)),
        });
        self.stats.subtransfers += 1;
    }

    /// When [`Planner::poll`] has something to do without any acknowledgement coming:
    /// the end of the wait for priming, or the current sub-transfer's deadline, µs.
    pub fn next_deadline(&self) -> Option<u64> {
        match self.sub {
            Some(s) => Some(s.deadline_us),
            None => self
                .first_primed
                .map(|(t, rtt)| t + rtt.saturating_mul(self.cfg.prime_wait_rtts as u64)),
        }
    }

    /// The sum of the active connections' measured rates, bytes per second (what the
    /// transfer expects to move; after priming, their slow-start rates).
    pub fn expected_rate(&self) -> f64 {
        self.conns
            .iter()
            .flatten()
            .filter(|c| c.role == Role::Active)
            .map(|c| c.rate)
            .sum()
    }

    /// The shortest round trip priming measured, µs.
    pub fn min_rtt_us(&self) -> Option<u64> {
        self.conns.iter().flatten().filter_map(|c| c.rtt_us).min()
    }

    /// What it did so far.
    pub fn stats(&self) -> BulkStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BulkConfig {
        BulkConfig {
            active: 3,
            prime_bytes: 1000,
            subtransfer_bytes: 30_000,
            ..BulkConfig::default()
        }
    }

    /// Five connections joined at 0 and primed at 50 ms (a 10 ms round trip).
    fn primed_planner() -> Planner {
        let mut p = Planner::new(cfg());
        for id in 0..5 {
            p.add_conn(id, 100, 0);
            assert_eq!(p.prime(id), 1000);
            p.primed(id, 600);
            assert_eq!(p.prime(id), 400);
            p.primed(id, 400);
            assert_eq!(p.prime(id), 0);
            p.on_progress(id, 1100, 150, 10_000);
        }
        assert!(!p.poll(10_000), "no data before priming is acknowledged");
        for id in 0..5 {
            // Connection 4 primes slowest: the others go first.
            p.on_progress(id, 1100, 1100, if id == 4 { 80_000 } else { 50_000 });
        }
        p
    }

    #[test]
    fn data_waits_for_priming_then_the_fastest_primed_connections_carry_it() {
        let mut p = primed_planner();
        assert_eq!(p.min_rtt_us(), Some(10_000));
        assert_eq!(p.stats().primed, 5);
        assert!(p.poll(80_000));
        let roles: Vec<_> = (0..5).map(|i| p.role(i).unwrap()).collect();
        assert_eq!(roles.iter().filter(|r| **r == Role::Active).count(), 3);
        assert_eq!(roles[4], Role::Reserve, "the slowest primer is a reserve");
        // Equal rates: equal shares of the sub-transfer.
        let q: Vec<_> = (0..5).map(|i| p.quota(i)).collect();
        assert_eq!(q.iter().sum::<usize>(), 30_000);
        assert_eq!(q[4], 0);
        assert_eq!(p.stats().data_from_us, Some(80_000));
    }

    #[test]
    fn a_straggler_goes_back_to_the_reserves_and_a_reserve_comes_in() {
        let mut p = primed_planner();
        p.poll(80_000);
        let active: Vec<_> = (0..5)
            .filter(|&i| p.role(i) == Some(Role::Active))
            .collect();
        // All take their share; one delivers a tenth of the others in 100 ms.
        for &i in &active {
            let q = p.quota(i);
            p.took(i, q);
            let delivered = if i == active[0] { 1000 } else { 10_000 };
            p.on_progress(i, 1100 + q as u64, 1100 + delivered, 180_000);
        }
        assert!(p.poll(180_000), "every share taken: the next sub-transfer");
        assert_eq!(p.role(active[0]), Some(Role::Reserve));
        let s = p.stats();
        assert_eq!(
            (s.subtransfers, s.stragglers_dropped, s.reserves_promoted),
            (2, 1, 1)
        );
        // The subset is full again and shares follow the rates.
        let now: Vec<_> = (0..5)
            .filter(|&i| p.role(i) == Some(Role::Active))
            .collect();
        assert_eq!(now.len(), 3);
        assert!(!now.contains(&active[0]));
        // The best-primed reserve came in (connection 4 primed slowest).
        assert!(!now.contains(&4));
        let total: usize = now.iter().map(|&i| p.quota(i)).sum();
        assert!((30_000..30_003).contains(&total), "{total}");
    }

    #[test]
    fn a_sub_transfer_that_overruns_ends_and_a_connection_that_never_primes_holds_nothing_up() {
        let mut p = Planner::new(cfg());
        for id in 0..4 {
            p.add_conn(id, 0, 0);
            p.primed(id, 1000);
        }
        // Only connection 0 primes (10 ms round trip); after 4 of them data flows.
        p.on_progress(0, 1000, 10, 10_000);
        p.on_progress(0, 1000, 1000, 30_000);
        assert!(!p.poll(69_999));
        assert!(p.poll(70_000));
        assert_eq!(p.quota(0), 30_000);
        // It never takes its share: the sub-transfer ends at its deadline.
        let mut t = 70_000;
        while !p.poll(t) {
            t += 1000;
            assert!(t < 70_000 + 60_000_000, "never ended");
        }
        assert_eq!(p.stats().subtransfers, 2);
    }

    #[test]
    fn a_connection_that_goes_down_leaves_the_subset() {
        let mut p = primed_planner();
        p.poll(80_000);
        let a = (0..5).find(|&i| p.role(i) == Some(Role::Active)).unwrap();
        p.conn_down(a);
        assert_eq!(p.quota(a), 0);
        for i in 0..5 {
            let q = p.quota(i);
            p.took(i, q);
        }
        assert!(p.poll(90_000));
        assert_eq!(p.role(a), Some(Role::Down));
        assert_eq!(
            (0..5).filter(|&i| p.role(i) == Some(Role::Active)).count(),
            3,
            "a reserve took its place"
        );
    }

    #[test]
    fn a_connection_done_with_its_share_takes_what_the_others_did_not() {
        let mut p = primed_planner();
        p.poll(80_000);
        let a: Vec<_> = (0..5)
            .filter(|&i| p.role(i) == Some(Role::Active))
            .collect();
        assert_eq!(p.quota(a[0]), 10_000);
        p.took(a[0], 10_000);
        // Its share is done: the 20,000 bytes the other two have not taken.
        assert_eq!(p.quota(a[0]), 20_000);
        p.took(a[0], 15_000);
        assert_eq!(p.quota(a[0]), 5_000);
        assert!(!p.poll(90_000));
        p.took(a[1], 5_000);
        assert_eq!(p.quota(a[2]), 0);
        assert!(p.poll(90_000), "every byte taken: the next sub-transfer");
        // Reserves take nothing.
        let r = (0..5).find(|&i| p.role(i) == Some(Role::Reserve)).unwrap();
        assert_eq!(p.quota(r), 0);
    }
}
