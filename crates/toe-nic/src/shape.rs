//! The NIC's egress shaper: seed 003 #2's "space packets so the bottleneck queue does not
//! overflow", done where the packets are made.
//!
//! A token bucket over the TCP payload the paced connections send, and the queue of paced
//! connections waiting for it. A connection that finds the bucket empty (or others already
//! waiting) joins the queue with its data still in its own send buffer; when tokens come
//! back the NIC serves the queue in turn, one segment per connection per turn (a
//! round-robin with a quantum of one segment), so connections share the rate evenly and no
//! one starves, however many there are. Nothing is dropped and nothing queues in the NIC:
//! TCP's send buffers are the queue, as with Linux's TCP small queues over fq pacing.
//!
//! Pure: time is an argument.

use std::collections::VecDeque;

use smoltcp::time::{Duration, Instant};

use crate::sockets::SockId;

/// Bytes of tokens the shaper gathers before the NIC serves its waiting connections
/// again, bytes (about four full segments).
const SERVE_BYTES: f64 = 6000.0;

/// The shaper: rate, bucket and waiting queue. Invariant: `tokens <= burst`; a segment may
/// take more than the tokens left (they go negative and are paid back before the next).
#[derive(Debug)]
pub(crate) struct Shaper {
    /// Payload bytes per second; 0: off.
    rate: u64,
    /// The bucket's depth, bytes.
    burst: f64,
    /// Bytes that may go now (negative: in debt).
    tokens: f64,
    /// When `tokens` was last brought up to date.
    last: Instant,
    /// Paced connections waiting for tokens, served from the front (a connection's flag in
    /// the socket table says whether its entry is live).
    waiting: VecDeque<SockId>,
}

impl Shaper {
    /// A shaper that is off.
    pub(crate) fn new() -> Self {
        Shaper {
            rate: 0,
            burst: 1.0,
            tokens: 0.0,
            last: Instant::ZERO,
            waiting: VecDeque::new(),
        }
    }

    /// Whether it shapes.
    pub(crate) fn on(&self) -> bool {
        self.rate > 0
    }

    /// Shape at `rate` payload bytes per second (0: off) with bursts of `burst` bytes, from
    /// `now`. What accrued at the old rate is kept (up to the new burst).
    pub(crate) fn set(&mut self, now: Instant, rate: u64, burst: u32) {
        self.refill(now);
        if self.rate == 0 {
            // Turned on: a full bucket.
            self.tokens = f64::from(burst.max(1));
        }
        self.rate = rate;
        self.burst = f64::from(burst.max(1));
        self.tokens = self.tokens.min(self.burst);
    }

    fn refill(&mut self, now: Instant) {
        if now > self.last {
            let dt_us = (now - self.last).total_micros() as f64;
            self.tokens = (self.tokens + dt_us * self.rate as f64 / 1e6).min(self.burst);
            self.last = now;
        }
    }

    /// Whether a segment may go at `now` (the bucket is not empty).
    pub(crate) fn may_send(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens > 0.0
    }

    /// `bytes` of payload went.
    pub(crate) fn spend(&mut self, bytes: u64) {
        self.tokens -= bytes as f64;
    }

    /// When the waiting connections are next served (`now` if the bucket is not empty):
    /// once it holds [`SERVE_BYTES`] (or its burst, if smaller), so that the NIC wakes
    /// for a few segments at a time, not for each.
    pub(crate) fn ready_at(&self, now: Instant) -> Instant {
        let dt_us = now.total_micros().saturating_sub(self.last.total_micros()) as f64;
        let tokens = (self.tokens + dt_us * self.rate as f64 / 1e6).min(self.burst);
        if tokens > 0.0 || self.rate == 0 {
            return now;
        }
        let want = SERVE_BYTES.min(self.burst);
        let wait_us = ((want - tokens) * 1e6 / self.rate as f64).floor() as u64 + 1;
        now + Duration::from_micros(wait_us)
    }

    /// Whether connections wait.
    pub(crate) fn has_waiting(&self) -> bool {
        !self.waiting.is_empty()
    }

    /// `id` waits, behind those already waiting.
    pub(crate) fn push(&mut self, id: SockId) {
        self.waiting.push_back(id);
    }

    /// The connection whose turn it is.
    pub(crate) fn pop(&mut self) -> Option<SockId> {
        self.waiting.pop_front()
    }

    /// Every waiting connection, in turn order (the queue is left empty).
    pub(crate) fn drain(&mut self) -> impl Iterator<Item = SockId> + '_ {
        self.waiting.drain(..)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(us: u64) -> Instant {
        Instant::from_micros(us as i64)
    }

    #[test]
    fn the_bucket_lets_its_rate_through_and_says_when_it_refills() {
        let mut s = Shaper::new();
        assert!(!s.on());
        s.set(at(0), 1_000_000, 3000); // 1 MB/s: a byte per µs
        assert!(s.on() && s.may_send(at(0)));
        s.spend(1448);
        s.spend(1448);
        assert!(s.may_send(at(0)), "104 bytes left");
        s.spend(1448); // in debt: 1344 bytes
        assert!(!s.may_send(at(0)));
        assert!(!s.may_send(at(1344)) && s.may_send(at(1345)));
        // The NIC wakes when a few segments' worth gathered: 1344 + 3000 (the burst).
        assert_eq!(s.ready_at(at(0)), at(4345));
        // Idle time fills the bucket to its burst, no more.
        assert!(s.may_send(at(1_000_000)));
        s.spend(3000);
        assert!(!s.may_send(at(1_000_000)));
        // Over a second of back-to-back segments, the rate (and the one burst) goes.
        let (mut sent, mut t) = (0u64, 1_000_000u64);
        while t < 2_000_000 {
            if s.may_send(at(t)) {
                s.spend(1448);
                sent += 1448;
            } else {
                t = s.ready_at(at(t)).total_micros() as u64;
            }
        }
        assert!(
            (1_000_000 - 1448..=1_000_000 + 1448).contains(&sent),
            "{sent}"
        );
        // Off: never waits.
        s.set(at(t), 0, 3000);
        assert!(!s.on());
        assert_eq!(s.ready_at(at(t)), at(t));
    }

    #[test]
    fn waiting_connections_come_out_in_turn() {
        let mut s = Shaper::new();
        for i in [3, 1, 2] {
            s.push(SockId::from_raw(i));
        }
        assert!(s.has_waiting());
        assert_eq!(s.pop(), Some(SockId::from_raw(3)));
        let rest: Vec<_> = s.drain().collect();
        assert_eq!(rest, [SockId::from_raw(1), SockId::from_raw(2)]);
        assert!(!s.has_waiting() && s.pop().is_none());
    }
}
