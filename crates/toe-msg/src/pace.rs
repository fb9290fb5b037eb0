//! Pacing from an end-to-end bandwidth estimate (seed 003 #2): the sender estimates the
//! delivery rate from acknowledged bytes over time, max-filtered, and spaces what it hands
//! to its connections so the bottleneck's queue does not overflow.
//!
//! - [`DeliveryRate`]: each acknowledgement of a message gives a sample, the bytes
//!   acknowledged since the message started over the time since (the way BBR samples per
//!   packet, here per message); or, where the transport says what TCP acknowledged
//!   ([`DeliveryRate::on_acked`]), the bytes acknowledged over the last round trip; the
//!   estimate is the largest sample of a recent window.
//! - [`Pacer`]: a token bucket at a rate, with a burst.
//! - [`Pacing`]: the two with a gain that probes for more bandwidth, one round (the
//!   shortest message latency seen) at a time: a start-up at twice the estimate until it
//!   stops growing, then a cycle of rounds at 1.25×, 0.75× and six at 1× (BBR's ProbeBW).
//!   After priming ([`crate::bulk`]) there is no start-up: priming's last flight drains
//!   through the bottleneck back to back, so its acknowledgements measure the bottleneck
//!   ([`Pacing::on_priming`]), and the cycle starts from that rate.
//!
//! Pure: time is an argument, µs of the caller's clock.

use std::collections::VecDeque;

/// The delivery-rate estimate: the largest sample of the last `window_us`.
#[derive(Debug, Clone)]
pub struct DeliveryRate {
    window_us: u64,
    /// Bytes acknowledged in all.
    delivered: u64,
    /// (time, bytes acknowledged by then), one per acknowledgement, oldest first; bounded
    /// by [`HISTORY`].
    history: VecDeque<(u64, u64)>,
    /// (time, bytes per second), within the window, each larger than every later one (a
    /// monotonic queue: the front is the window's largest sample).
    samples: VecDeque<(u64, f64)>,
    min_latency_us: Option<u64>,
}

/// Acknowledgements the estimator remembers to look back from (older ones are dropped,
/// and a message started before the oldest gives no sample).
const HISTORY: usize = 4096;

impl DeliveryRate {
    /// An estimator whose max filter spans `window_us`.
    pub fn new(window_us: u64) -> Self {
        DeliveryRate {
            window_us: window_us.max(1),
            delivered: 0,
            history: VecDeque::new(),
            samples: VecDeque::new(),
            min_latency_us: None,
        }
    }

    /// `bytes` of a message acknowledged at `now_us`, `latency_us` after it started.
    /// Returns the sample it gave (bytes per second), if any.
    pub fn on_ack(&mut self, now_us: u64, bytes: u64, latency_us: u64) -> Option<f64> {
        let start = now_us.saturating_sub(latency_us);
        // Bytes acknowledged by the message's start: the last acknowledgement at or
        // before it (none at all yet: 0).
        let before = match self.history.iter().rposition(|&(t, _)| t <= start) {
            Some(i) => Some(self.history[i].1),
            None if self.history.len() < HISTORY => Some(0),
            None => None,
        };
        self.delivered += bytes;
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history.push_back((now_us, self.delivered));
        if latency_us > 0 {
            self.min_latency_us = Some(
                self.min_latency_us
                    .map_or(latency_us, |m| m.min(latency_us)),
            );
        }
        let sample = before
            .filter(|_| latency_us > 0)
            .map(|b| (self.delivered - b) as f64 * 1e6 / latency_us as f64);
        self.sample(now_us, sample);
        sample
    }

    /// By `now_us` the transport acknowledged `bytes` more (from TCP's acknowledgements,
    /// 0 if none): the sample is what it acknowledged over the last `interval_us` or more
    /// (a round trip: shorter spans see ACK bunching, not the bottleneck), taken at most
    /// 32 times per interval. Returns the sample, if one was taken.
    pub fn on_acked(&mut self, now_us: u64, bytes: u64, interval_us: u64) -> Option<f64> {
        let interval_us = interval_us.max(1);
        let total = self.delivered + bytes;
        // (No sample before the history spans a whole interval.)
        let then = now_us.checked_sub(interval_us).and_then(|from| {
            let i = self.history.iter().rposition(|&(t, _)| t <= from)?;
            Some(self.history[i])
        });
        self.delivered = total;
        // Points at least 1/32 of the interval apart: a round trip of history in 32
        // points, whatever the call rate. Samples are taken at those points too, so the
        // max filter holds at most 32 per interval of its window.
        let spaced = self
            .history
            .back()
            .is_none_or(|&(t, _)| now_us >= t + (interval_us / 32).max(1));
        if !spaced {
            return None;
        }
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history.push_back((now_us, total));
        let sample = then
            .filter(|&(t, _)| now_us > t)
            .map(|(t, b)| (total - b) as f64 * 1e6 / (now_us - t) as f64);
        self.sample(now_us, sample);
        sample
    }

    /// Keep `sample` (if any) in the max filter and forget what left the window.
    fn sample(&mut self, now_us: u64, sample: Option<f64>) {
        if let Some(r) = sample {
            while self.samples.back().is_some_and(|&(_, b)| b <= r) {
                self.samples.pop_back();
            }
            self.samples.push_back((now_us, r));
        }
        while self
            .samples
            .front()
            .is_some_and(|&(t, _)| t + self.window_us < now_us)
        {
            self.samples.pop_front();
        }
    }

    /// The estimate, bytes per second: the largest sample of the window (`None` before
    /// the first).
    pub fn rate(&self) -> Option<f64> {
        self.samples.front().map(|&(_, r)| r)
    }

    /// The shortest message latency seen, µs (a round trip plus a message's
    /// serialization; `None` with [`DeliveryRate::on_acked`] only).
    pub fn min_latency_us(&self) -> Option<u64> {
        self.min_latency_us
    }

    /// Bytes acknowledged in all.
    pub fn delivered(&self) -> u64 {
        self.delivered
    }
}

/// A token bucket: `rate` bytes per second, at most `burst` bytes at once. Tokens may go
/// negative (a grant larger than the tokens is paid back before the next).
#[derive(Debug, Clone)]
pub struct Pacer {
    rate: f64,
    burst: f64,
    tokens: f64,
    last_us: u64,
}

impl Pacer {
    /// A bucket at `rate` bytes per second holding at most `burst` bytes, full.
    pub fn new(rate: f64, burst: usize) -> Self {
        Pacer {
            rate: rate.max(1.0),
            burst: burst.max(1) as f64,
            tokens: burst.max(1) as f64,
            last_us: 0,
        }
    }

    /// The tokens at `now_us` (what accrued since the last refill, up to the burst).
    fn tokens_at(&self, now_us: u64) -> f64 {
        let dt = now_us.saturating_sub(self.last_us) as f64 / 1e6;
        (self.tokens + dt * self.rate).min(self.burst)
    }

    fn refill(&mut self, now_us: u64) {
        if now_us > self.last_us {
            self.tokens = self.tokens_at(now_us);
            self.last_us = now_us;
        }
    }

    /// Change the rate at `now_us` (what accrued so far at the old rate is kept).
    pub fn set_rate(&mut self, now_us: u64, rate: f64) {
        self.refill(now_us);
        self.rate = rate.max(1.0);
    }

    /// The rate, bytes per second.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Bytes that may go at `now_us` (0 while in debt).
    pub fn allowance(&mut self, now_us: u64) -> usize {
        self.refill(now_us);
        self.tokens.max(0.0) as usize
    }

    /// `n` bytes went.
    pub fn consume(&mut self, n: usize) {
        self.tokens -= n as f64;
    }

    /// When `bytes` may go (now if they may), µs.
    pub fn ready_at(&self, now_us: u64, bytes: usize) -> u64 {
        let want = (bytes as f64).min(self.burst);
        let now_tokens = self.tokens_at(now_us);
        if now_tokens >= want {
            now_us
        } else {
            now_us + ((want - now_tokens) / self.rate * 1e6).ceil() as u64
        }
    }
}

/// How [`Pacing`] paces.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PacingConfig {
    /// The rate before the first estimate, bytes per second (a guess, or what priming
    /// measured).
    pub initial_bytes_per_s: f64,
    /// The bucket's burst, bytes: the most handed to the connections at once.
    pub burst_bytes: usize,
    /// The max filter's window, µs.
    pub window_us: u64,
    /// The start-up's gain over the estimate.
    pub startup_gain: f64,
    /// Rounds without a quarter's growth of the estimate that end the start-up.
    pub startup_flat_rounds: u32,
}

impl Default for PacingConfig {
    /// 10 MB/s at first, 64 KiB bursts, a 2 s window, start-up at 2× until three rounds
    /// without growth.
    fn default() -> Self {
        PacingConfig {
            initial_bytes_per_s: 10e6,
            burst_bytes: 64 << 10,
            window_us: 2_000_000,
            startup_gain: 2.0,
            startup_flat_rounds: 3,
        }
    }
}

/// The gains of the cruising cycle, one per round.
const CYCLE: [f64; 8] = [1.25, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0];

/// Where [`Pacing`] is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Phase {
    /// Growing: the estimate rose by a quarter within the last three rounds.
    Startup,
    /// Cruising at the estimate, probing one round in eight (the gain cycle's index).
    Cruise(usize),
}

/// Pacing from the delivery-rate estimate, with the gain cycle.
#[derive(Debug, Clone)]
pub struct Pacing {
    cfg: PacingConfig,
    est: DeliveryRate,
    /// Priming's acknowledgement train, over short spans ([`Pacing::on_priming`]).
    train: DeliveryRate,
    pacer: Pacer,
    phase: Phase,
    round_start_us: u64,
    /// Start-up: the best estimate and the rounds since it grew by a quarter.
    best: f64,
    flat_rounds: u32,
}

impl Pacing {
    /// Pacing per `cfg`, starting at its initial rate.
    pub fn new(cfg: PacingConfig) -> Self {
        Pacing {
            cfg,
            est: DeliveryRate::new(cfg.window_us),
            train: DeliveryRate::new(cfg.window_us),
            pacer: Pacer::new(cfg.initial_bytes_per_s * cfg.startup_gain, cfg.burst_bytes),
            phase: Phase::Startup,
            round_start_us: 0,
            best: 0.0,
            flat_rounds: 0,
        }
    }

    /// A message of `bytes` was acknowledged at `now_us`, `latency_us` after it started.
    pub fn on_ack(&mut self, now_us: u64, bytes: u64, latency_us: u64) {
        self.est.on_ack(now_us, bytes, latency_us);
        let round = self.est.min_latency_us().unwrap_or(latency_us).max(1);
        self.advance(now_us, round);
    }

    /// By `now_us` TCP acknowledged `bytes` more of the paced connections (0 if none);
    /// `round_us` is the round trip (what priming measured): the samples span it, and so
    /// do the gain cycle's rounds. For transports that say what TCP acknowledged; use it
    /// or [`Pacing::on_ack`], not both.
    pub fn on_delivered(&mut self, now_us: u64, bytes: u64, round_us: u64) {
        let round = round_us.max(1);
        self.est.on_acked(now_us, bytes, round);
        self.advance(now_us, round);
    }

    /// Before the data: priming's acknowledgements, `bytes` more by `now_us`, sampled over
    /// spans of `span_us` (a fraction of a round trip). Priming's last flight leaves in a
    /// burst and drains through the bottleneck back to back, so its acknowledgements come
    /// at the bottleneck's rate: the fastest span measures it.
    pub fn on_priming(&mut self, now_us: u64, bytes: u64, span_us: u64) {
        self.train.on_acked(now_us, bytes, span_us.max(1));
    }

    /// The data starts at `now_us`: if priming's train measured a rate, cruise from it,
    /// beginning with the cycle's probing round (1.25×): the start-up's search is what
    /// priming did. Otherwise start up as usual.
    pub fn start_from_priming(&mut self, now_us: u64) {
        if let Some(r) = self.train.rate() {
            // The train's rate is the estimate's first sample: the max filter keeps it
            // while the data's own samples (a round trip late) catch up.
            self.est.sample(now_us, Some(r));
            self.pacer.set_rate(now_us, CYCLE[0] * r);
            self.phase = Phase::Cruise(0);
            self.round_start_us = now_us;
        }
    }

    /// Rounds of `round_us`: the phase moves on and the rate follows the estimate.
    fn advance(&mut self, now_us: u64, round: u64) {
        let Some(rate) = self.est.rate() else {
            return;
        };
        if now_us >= self.round_start_us + round {
            self.round_start_us = now_us;
            self.phase = match self.phase {
                Phase::Startup => {
                    if rate > self.best * 1.25 {
                        self.best = rate;
                        self.flat_rounds = 0;
                    } else if self.cfg.startup_gain * rate >= self.pacer.rate() {
                        // Flat only counts once the estimate drives the rate: below a
                        // seed it has not caught up with what is being sent yet.
                        self.flat_rounds += 1;
                    }
                    // Flat for long enough: cruise, draining the start-up's queue first.
                    if self.flat_rounds >= self.cfg.startup_flat_rounds.max(1) {
                        Phase::Cruise(1)
                    } else {
                        Phase::Startup
                    }
                }
                Phase::Cruise(i) => Phase::Cruise((i + 1) % CYCLE.len()),
            };
        }
        let next = match self.phase {
            // The start-up never slows down: its first samples span less than a round
            // of data (and the seed from priming may be above them).
            Phase::Startup => (self.cfg.startup_gain * rate).max(self.pacer.rate()),
            Phase::Cruise(i) => CYCLE[i] * rate,
        };
        self.pacer.set_rate(now_us, next);
    }

    /// Before the first estimate: start from `bytes_per_s` measured another way (what
    /// priming measured), at the start-up's gain, if it is above the configured guess.
    /// Once acknowledgements gave an estimate this does nothing.
    pub fn seed(&mut self, now_us: u64, bytes_per_s: f64) {
        if self.est.rate().is_none() && bytes_per_s > self.cfg.initial_bytes_per_s {
            self.pacer
                .set_rate(now_us, self.cfg.startup_gain * bytes_per_s);
        }
    }

    /// Bytes that may go at `now_us`.
    pub fn allowance(&mut self, now_us: u64) -> usize {
        self.pacer.allowance(now_us)
    }

    /// `n` bytes went.
    pub fn consume(&mut self, n: usize) {
        self.pacer.consume(n);
    }

    /// When `bytes` may go, µs.
    pub fn ready_at(&self, now_us: u64, bytes: usize) -> u64 {
        self.pacer.ready_at(now_us, bytes)
    }

    /// The pacing rate now, bytes per second.
    pub fn rate(&self) -> f64 {
        self.pacer.rate()
    }

    /// The delivery-rate estimate, bytes per second.
    pub fn estimate(&self) -> Option<f64> {
        self.est.rate()
    }

    /// The phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_estimate_is_the_delivery_rate_of_a_steady_stream() {
        // 100 KB messages acknowledged every 1 ms, each 50 ms after it started: 100 MB/s.
        let mut d = DeliveryRate::new(1_000_000);
        for i in 0..500u64 {
            d.on_ack(60_000 + i * 1000, 100_000, 50_000);
        }
        let r = d.rate().unwrap();
        assert!((r - 100e6).abs() < 3e6, "{r}");
        assert_eq!(d.min_latency_us(), Some(50_000));
        assert_eq!(d.delivered(), 50_000_000);
    }

    #[test]
    fn the_max_filter_forgets_an_old_peak() {
        let mut d = DeliveryRate::new(100_000);
        for i in 0..100u64 {
            d.on_ack(10_000 + i * 1000, 100_000, 10_000); // 100 MB/s
        }
        for i in 0..400u64 {
            d.on_ack(110_000 + i * 2000, 100_000, 10_000); // 50 MB/s
        }
        let r = d.rate().unwrap();
        assert!((r - 50e6).abs() < 3e6, "{r}");
    }

    #[test]
    fn acknowledged_totals_give_the_rate_of_the_last_round_trip() {
        // 64 KiB acknowledged every 640 µs (about 102 MB/s), reported on every 160 µs pass
        // (most passes report nothing), with 50 ms round trips.
        let mut d = DeliveryRate::new(500_000);
        let mut first = None;
        for i in 0..2000u64 {
            let bytes = if i % 4 == 3 { 64 << 10 } else { 0 };
            let s = d.on_acked(i * 160, bytes, 50_000);
            if s.is_some() && first.is_none() {
                first = Some(i * 160);
            }
        }
        assert!(
            first.is_some_and(|t| t >= 50_000),
            "no sample before a round trip"
        );
        let r = d.rate().unwrap();
        assert!((r - 102.4e6).abs() < 3e6, "{r}");
        assert_eq!(d.delivered(), 500 * (64 << 10));
        // The rate halves: the max filter keeps the old peak for its window, then follows.
        let mut p = Pacing::new(PacingConfig {
            window_us: 500_000,
            ..PacingConfig::default()
        });
        for i in 0..2000u64 {
            p.on_delivered(i * 1000, if i < 1000 { 100_000 } else { 50_000 }, 50_000);
        }
        let e = p.estimate().unwrap();
        assert!((e - 50e6).abs() < 3e6, "{e}");
    }

    #[test]
    fn priming_s_acknowledgement_train_sets_the_first_rate() {
        let mut p = Pacing::new(PacingConfig {
            window_us: 500_000,
            ..PacingConfig::default()
        });
        // Slow start's early rounds (1 MB/s), then the last flight: 2 MB acknowledged
        // back to back over 16 ms, at the bottleneck's 125 MB/s; spans of 5 ms.
        let mut t = 0;
        while t < 150_000 {
            p.on_priming(t, 1000, 5000);
            t += 1000;
        }
        for _ in 0..16 {
            p.on_priming(t, 125_000, 5000);
            t += 1000;
        }
        assert_eq!(p.estimate(), None, "priming is not the data's estimate");
        p.start_from_priming(t);
        assert_eq!(p.phase(), Phase::Cruise(0));
        let e = p.estimate().unwrap();
        assert!((e - 125e6).abs() < 10e6, "{e}");
        assert!((p.rate() - 1.25 * e).abs() < 1.0, "{}", p.rate());
        // Without a train: the start-up, unchanged.
        let mut q = Pacing::new(PacingConfig::default());
        q.start_from_priming(0);
        assert_eq!((q.phase(), q.estimate()), (Phase::Startup, None));
    }

    #[test]
    fn the_bucket_spaces_bytes_at_its_rate() {
        let mut p = Pacer::new(1e6, 10_000);
        assert_eq!(p.allowance(0), 10_000);
        p.consume(10_000);
        assert_eq!(p.allowance(0), 0);
        assert_eq!(p.ready_at(0, 5000), 5000);
        assert_eq!(p.allowance(5000), 5000);
        p.consume(8000); // in debt: 3000 bytes
        assert_eq!(p.allowance(6000), 0);
        assert_eq!(p.allowance(13_000), 5000);
        // Over 1 s at most rate × 1 s + the burst goes.
        let (mut sent, mut t) = (0usize, 13_000u64);
        p.consume(5000);
        while t < 1_013_000 {
            let a = p.allowance(t);
            p.consume(a);
            sent += a;
            t += 100;
        }
        assert!((990_000..=1_010_000).contains(&sent), "{sent}");
    }

    #[test]
    fn pacing_starts_up_then_cruises_at_the_estimate() {
        let mut p = Pacing::new(PacingConfig::default());
        assert_eq!(p.phase(), Phase::Startup);
        assert_eq!(p.rate(), 20e6);
        // A link of 50 MB/s, 20 ms: messages of 250 KB acknowledged every 5 ms.
        for i in 0..400u64 {
            p.on_ack(20_000 + i * 5000, 250_000, 20_000 + 5000);
        }
        let Phase::Cruise(_) = p.phase() else {
            panic!("still {:?}", p.phase());
        };
        let e = p.estimate().unwrap();
        assert!((e - 50e6).abs() < 5e6, "{e}");
        assert!(p.rate() >= 0.75 * e && p.rate() <= 1.25 * e, "{}", p.rate());
        // A seed after the first estimate changes nothing.
        let before = p.rate();
        p.seed(10_000_000, 1e9);
        assert_eq!(p.rate(), before);
        let mut q = Pacing::new(PacingConfig::default());
        q.seed(0, 1e6); // below the guess: ignored
        assert_eq!(q.rate(), 20e6);
        q.seed(0, 40e6);
        assert_eq!(q.rate(), 80e6);
        // Over a whole cycle the gains average 1.
        assert!((CYCLE.iter().sum::<f64>() / CYCLE.len() as f64 - 1.0).abs() < 1e-9);
    }
}
