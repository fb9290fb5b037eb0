//! Impairment model: phy middleware that makes a perfect port behave like a WAN path.
//!
//! [`Impaired`] wraps any [`Phy`] and impairs the frames it *receives* (and, optionally, the
//! frames it sends: [`Impaired::with_egress`], for a lone port such as a TAP device). Wrapping
//! both ends of an in-memory [`wire`](crate::phy::wire) therefore impairs the two directions
//! independently, each with its own seed.
//!
//! Each frame that arrives on an impaired direction goes through, in order:
//!
//! 1. **loss**: dropped with probability `loss`;
//! 2. **bandwidth**: with a rate limit, it waits in a bounded FIFO (the bottleneck queue, at
//!    most `queue_bytes` bytes not yet serialized; tail drop when full) and then takes
//!    `len × 8 / rate` seconds to serialize, frame bytes only (no preamble, FCS or gap);
//! 3. **delay**: it then propagates for the one-way `delay`;
//! 4. **reordering**: with probability `reorder` it is held back an extra
//!    [`ImpairConfig::reorder_hold`] (`max(delay, 1 ms)`), so frames arriving within that
//!    time overtake it;
//! 5. **duplication**: with probability `dup` it is delivered twice (the copy right after the
//!    original);
//! 6. **corruption**: each delivered copy, with probability `corrupt`, has one random bit
//!    flipped, anywhere in the frame (headers included).
//!
//! Time is an argument, never read from a clock: a frame arriving at `now` becomes
//! deliverable at a computed instant, [`Phy::poll_at`] reports the earliest such instant so a
//! virtual-clock runtime jumps straight to it, and [`Phy::recv`] hands it out once `now` has
//! reached it. Randomness comes from a seeded SplitMix64 generator: the same seed and the same
//! sequence of calls give the same frames at the same instants.
//!
//! Memory is bounded: besides the bottleneck queue, everything an impaired direction holds
//! (frames propagating or held back) is capped at [`MAX_HELD_BYTES`]; frames beyond it are
//! tail-dropped and counted with the queue drops.

use std::cmp::Ordering as CmpOrdering;
use std::collections::{BinaryHeap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crossbeam_channel::Receiver;
use smoltcp::time::{Duration, Instant};

use crate::phy::{Frame, Phy};

/// Default bottleneck queue, in bytes (about 700 full 1500-byte frames).
pub const DEFAULT_QUEUE_BYTES: usize = 1 << 20;

/// Most bytes one impaired direction holds at once (queued, propagating, held back),
/// duplicates included. Frames beyond it are dropped and counted in
/// [`ImpairStats::dropped_queue`]: a delay line is never unbounded memory.
pub const MAX_HELD_BYTES: usize = 256 << 20;

/// Smallest extra hold of a reordered frame (see [`ImpairConfig::reorder_hold`]).
pub const MIN_REORDER_HOLD: Duration = Duration::from_millis(1);

/// What an impaired direction does to frames. `Default` is a perfect wire.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ImpairConfig {
    /// One-way propagation delay added to every frame (microsecond resolution).
    pub delay: Duration,
    /// Bandwidth limit in bits per second (frame bytes × 8); `None` for no limit (frames are
    /// not serialized and never queue).
    pub rate_bits_per_s: Option<u64>,
    /// Bottleneck queue in bytes: the most bytes waiting to be serialized when a rate is set.
    /// A frame that does not fit is dropped (tail drop); a frame always fits an empty queue.
    /// Must be > 0 when a rate is set; unused without a rate.
    pub queue_bytes: usize,
    /// Probability in `0..=1` that a frame is dropped.
    pub loss: f64,
    /// Probability in `0..=1` that a frame is held back so that later frames overtake it.
    pub reorder: f64,
    /// Probability in `0..=1` that a frame is delivered twice.
    pub dup: f64,
    /// Probability in `0..=1` that a delivered frame has one random bit flipped.
    pub corrupt: f64,
    /// Seed of the direction's random generator.
    pub seed: u64,
}

impl Default for ImpairConfig {
    fn default() -> Self {
        ImpairConfig {
            delay: Duration::ZERO,
            rate_bits_per_s: None,
            queue_bytes: DEFAULT_QUEUE_BYTES,
            loss: 0.0,
            reorder: 0.0,
            dup: 0.0,
            corrupt: 0.0,
            seed: 0,
        }
    }
}

/// An invalid [`ImpairConfig`]: which option, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImpairError {
    /// The offending [`ImpairConfig`] field (`"loss"`, `"queue_bytes"`, ...).
    pub option: &'static str,
    /// What is wrong with its value.
    pub message: String,
}

impl fmt::Display for ImpairError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "impairment option `{}`: {}", self.option, self.message)
    }
}

impl std::error::Error for ImpairError {}

impl ImpairConfig {
    /// Checks every field: probabilities finite and within `0..=1`, a rate (if any) above
    /// zero, and a non-empty queue when a rate is set. The error names the field.
    pub fn validate(&self) -> Result<(), ImpairError> {
        for (option, p) in [
            ("loss", self.loss),
            ("reorder", self.reorder),
            ("dup", self.dup),
            ("corrupt", self.corrupt),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(ImpairError {
                    option,
                    message: format!(
                        "{p} is not a probability (expected 0 ..= 1, e.g. 0.01 for 1%)"
                    ),
                });
            }
        }
        if let Some(rate) = self.rate_bits_per_s {
            if rate == 0 {
                return Err(ImpairError {
                    option: "rate_bits_per_s",
                    message: "a rate limit must be above 0 bits/s (leave it unset for no limit)"
                        .into(),
                });
            }
            if self.queue_bytes == 0 {
                return Err(ImpairError {
                    option: "queue_bytes",
                    message: "the queue must hold at least 1 byte when a rate limit is set".into(),
                });
            }
        }
        Ok(())
    }

    /// True if this configuration leaves frames untouched (no delay, rate, loss, reordering,
    /// duplication or corruption): wrapping a port in it is pointless.
    pub fn is_perfect(&self) -> bool {
        self.delay == Duration::ZERO
            && self.rate_bits_per_s.is_none()
            && self.loss == 0.0
            && self.reorder == 0.0
            && self.dup == 0.0
            && self.corrupt == 0.0
    }

    /// Extra time a reordered frame is held back: `max(delay, 1 ms)`.
    pub fn reorder_hold(&self) -> Duration {
        if self.delay > MIN_REORDER_HOLD {
            self.delay
        } else {
            MIN_REORDER_HOLD
        }
    }
}

/// What an impaired direction did. Counts only grow.
///
/// Invariant: `frames_in + duplicated == frames_out + dropped_loss + dropped_queue + held`,
/// where `held` is the number of frames still inside.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ImpairStats {
    /// Frames that entered.
    pub frames_in: u64,
    /// Bytes that entered.
    pub bytes_in: u64,
    /// Frames delivered (duplicates included).
    pub frames_out: u64,
    /// Bytes delivered (duplicates included).
    pub bytes_out: u64,
    /// Frames dropped by the loss model.
    pub dropped_loss: u64,
    /// Frames dropped because the bottleneck queue (or [`MAX_HELD_BYTES`]) was full.
    pub dropped_queue: u64,
    /// Extra copies made by the duplication model.
    pub duplicated: u64,
    /// Frames held back by the reordering model.
    pub reordered: u64,
    /// Delivered copies with a bit flipped.
    pub corrupted: u64,
    /// Frames that became deliverable later than they arrived (delay, serialization or
    /// reordering).
    pub delayed: u64,
    /// Most bytes the bottleneck queue held at once (waiting for serialization).
    pub queue_high_water_bytes: u64,
    /// Most bytes held at once in all (queued, propagating, held back; duplicates included).
    pub held_high_water_bytes: u64,
}

impl ImpairStats {
    /// Field-by-field sum (high-water marks take the larger), e.g. of the two directions.
    pub fn merged(&self, o: &ImpairStats) -> ImpairStats {
        ImpairStats {
            frames_in: self.frames_in + o.frames_in,
            bytes_in: self.bytes_in + o.bytes_in,
            frames_out: self.frames_out + o.frames_out,
            bytes_out: self.bytes_out + o.bytes_out,
            dropped_loss: self.dropped_loss + o.dropped_loss,
            dropped_queue: self.dropped_queue + o.dropped_queue,
            duplicated: self.duplicated + o.duplicated,
            reordered: self.reordered + o.reordered,
            corrupted: self.corrupted + o.corrupted,
            delayed: self.delayed + o.delayed,
            queue_high_water_bytes: self.queue_high_water_bytes.max(o.queue_high_water_bytes),
            held_high_water_bytes: self.held_high_water_bytes.max(o.held_high_water_bytes),
        }
    }
}

/// Live counters of one direction, shared with [`ImpairMonitor`]s.
#[derive(Debug, Default)]
struct Counters {
    frames_in: AtomicU64,
    bytes_in: AtomicU64,
    frames_out: AtomicU64,
    bytes_out: AtomicU64,
    dropped_loss: AtomicU64,
    dropped_queue: AtomicU64,
    duplicated: AtomicU64,
    reordered: AtomicU64,
    corrupted: AtomicU64,
    delayed: AtomicU64,
    queue_high: AtomicU64,
    held_high: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Reads the counters of one impaired direction from anywhere (another thread, after the
/// port was boxed into a NIC). Cheap to clone.
#[derive(Debug, Clone)]
pub struct ImpairMonitor(Arc<Counters>);

impl ImpairMonitor {
    /// A snapshot of the counters.
    pub fn stats(&self) -> ImpairStats {
        let c = &*self.0;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ImpairStats {
            frames_in: g(&c.frames_in),
            bytes_in: g(&c.bytes_in),
            frames_out: g(&c.frames_out),
            bytes_out: g(&c.bytes_out),
            dropped_loss: g(&c.dropped_loss),
            dropped_queue: g(&c.dropped_queue),
            duplicated: g(&c.duplicated),
            reordered: g(&c.reordered),
            corrupted: g(&c.corrupted),
            delayed: g(&c.delayed),
            queue_high_water_bytes: g(&c.queue_high),
            held_high_water_bytes: g(&c.held_high),
        }
    }
}

/// SplitMix64 (Steele, Lea, Flood 2014): tiny, fast, and good enough for impairment draws.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)` with 53 bits.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// True with probability `p`; draws nothing when `p` is 0.
    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.next_f64() < p
    }

    /// Uniform in `0..n` (`n` > 0), by multiply-shift.
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

/// A frame inside the model, ordered by when it becomes deliverable, then by arrival order.
#[derive(Debug)]
struct Held {
    due: Instant,
    seq: u64,
    frame: Frame,
}

impl PartialEq for Held {
    fn eq(&self, o: &Self) -> bool {
        self.due == o.due && self.seq == o.seq
    }
}
impl Eq for Held {}
impl PartialOrd for Held {
    fn partial_cmp(&self, o: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(o))
    }
}
impl Ord for Held {
    /// Reversed, so that `BinaryHeap` (a max-heap) pops the earliest frame first.
    fn cmp(&self, o: &Self) -> CmpOrdering {
        (o.due, o.seq).cmp(&(self.due, self.seq))
    }
}

fn ns(t: Instant) -> i128 {
    i128::from(t.total_micros()) * 1000
}

/// Rounds nanoseconds up to a microsecond instant.
fn instant_ceil(ns: i128) -> Instant {
    let us = ns.div_euclid(1000) + i128::from(ns.rem_euclid(1000) != 0);
    Instant::from_micros(us.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64)
}

/// One impaired direction: the whole model, independent of any port.
#[derive(Debug)]
struct Line {
    cfg: ImpairConfig,
    rng: SplitMix64,
    held: BinaryHeap<Held>,
    held_bytes: usize,
    seq: u64,
    /// Frames accepted by the bottleneck but not yet serialized: (end of serialization in ns,
    /// length).
    backlog: VecDeque<(i128, usize)>,
    backlog_bytes: usize,
    /// When the link finishes serializing what it accepted, in ns.
    link_free_ns: i128,
    counters: Arc<Counters>,
}

impl Line {
    fn new(cfg: ImpairConfig) -> Line {
        Line {
            cfg,
            rng: SplitMix64(cfg.seed),
            held: BinaryHeap::new(),
            held_bytes: 0,
            seq: 0,
            backlog: VecDeque::new(),
            backlog_bytes: 0,
            link_free_ns: i128::MIN,
            counters: Arc::new(Counters::default()),
        }
    }

    fn hold(&mut self, due: Instant, frame: Frame) {
        self.held_bytes += frame.len();
        self.seq += 1;
        self.held.push(Held {
            due,
            seq: self.seq,
            frame,
        });
        self.counters
            .held_high
            .fetch_max(self.held_bytes as u64, Ordering::Relaxed);
    }

    fn maybe_corrupt(&mut self, frame: &mut Frame) {
        if !frame.is_empty() && self.rng.chance(self.cfg.corrupt) {
            let bit = self.rng.below(frame.len() as u64 * 8);
            frame[(bit / 8) as usize] ^= 1 << (bit % 8);
            bump(&self.counters.corrupted, 1);
        }
    }

    /// A frame arrives at `now`.
    fn ingest(&mut self, now: Instant, mut frame: Frame) {
        let len = frame.len();
        let c = self.counters.clone();
        bump(&c.frames_in, 1);
        bump(&c.bytes_in, len as u64);
        if self.rng.chance(self.cfg.loss) {
            bump(&c.dropped_loss, 1);
            return;
        }
        let dup = self.rng.chance(self.cfg.dup);
        let copies = 1 + usize::from(dup);
        if self.held_bytes + copies * len > MAX_HELD_BYTES {
            bump(&c.dropped_queue, 1);
            return;
        }
        let now_ns = ns(now);
        let mut due_ns = now_ns;
        if let Some(rate) = self.cfg.rate_bits_per_s {
            while let Some(&(end, l)) = self.backlog.front() {
                if end > now_ns {
                    break;
                }
                self.backlog.pop_front();
                self.backlog_bytes -= l;
            }
            if !self.backlog.is_empty() && self.backlog_bytes + len > self.cfg.queue_bytes {
                bump(&c.dropped_queue, 1);
                return;
            }
            let bits = len as u128 * 8 * 1_000_000_000;
            let tx_ns = bits.div_ceil(u128::from(rate)) as i128;
            let end = self.link_free_ns.max(now_ns) + tx_ns;
            self.link_free_ns = end;
            self.backlog.push_back((end, len));
            self.backlog_bytes += len;
            c.queue_high
                .fetch_max(self.backlog_bytes as u64, Ordering::Relaxed);
            due_ns = end;
        }
        due_ns += i128::from(self.cfg.delay.total_micros()) * 1000;
        if self.rng.chance(self.cfg.reorder) {
            due_ns += i128::from(self.cfg.reorder_hold().total_micros()) * 1000;
            bump(&c.reordered, 1);
        }
        let due = instant_ceil(due_ns);
        if due > now {
            bump(&c.delayed, 1);
        }
        if dup {
            bump(&c.duplicated, 1);
            let mut copy = frame.clone();
            self.maybe_corrupt(&mut frame);
            self.maybe_corrupt(&mut copy);
            self.hold(due, frame);
            self.hold(due, copy);
        } else {
            self.maybe_corrupt(&mut frame);
            self.hold(due, frame);
        }
    }

    fn next_due(&self) -> Option<Instant> {
        self.held.peek().map(|h| h.due)
    }

    /// The next frame deliverable at `now`.
    fn pop_due(&mut self, now: Instant) -> Option<Frame> {
        if self.held.peek()?.due > now {
            return None;
        }
        let h = self.held.pop()?;
        self.held_bytes -= h.frame.len();
        bump(&self.counters.frames_out, 1);
        bump(&self.counters.bytes_out, h.frame.len() as u64);
        Some(h.frame)
    }

    /// Puts back a frame `pop_due` gave out (the port refused it): it stays first in line.
    fn unpop(&mut self, due: Instant, frame: Frame) {
        self.counters.frames_out.fetch_sub(1, Ordering::Relaxed);
        self.counters
            .bytes_out
            .fetch_sub(frame.len() as u64, Ordering::Relaxed);
        self.held_bytes += frame.len();
        // seq 0 sorts before every frame held with the same due time
        self.held.push(Held { due, seq: 0, frame });
    }
}

/// A [`Phy`] whose received frames (and optionally sent frames) go through the impairment
/// model described in the [module documentation](self).
#[derive(Debug)]
pub struct Impaired<P> {
    inner: P,
    rx: Line,
    tx: Option<Line>,
}

impl<P: Phy> Impaired<P> {
    /// Impair the frames `inner` receives with `cfg`; frames sent pass straight through.
    /// Errors if `cfg` does not [validate](ImpairConfig::validate).
    pub fn new(inner: P, cfg: ImpairConfig) -> Result<Self, ImpairError> {
        cfg.validate()?;
        Ok(Impaired {
            inner,
            rx: Line::new(cfg),
            tx: None,
        })
    }

    /// Impair both directions of a lone port (e.g. a TAP device, whose far side is not ours
    /// to wrap): received frames with `rx`, sent frames with `tx` (give the two different
    /// seeds). Sent frames are held inside and handed to `inner` when due, on the next
    /// [`Phy::recv`] call at or after that instant ([`Phy::poll_at`] reports it).
    pub fn with_egress(inner: P, rx: ImpairConfig, tx: ImpairConfig) -> Result<Self, ImpairError> {
        rx.validate()?;
        tx.validate()?;
        Ok(Impaired {
            inner,
            rx: Line::new(rx),
            tx: Some(Line::new(tx)),
        })
    }

    /// Counters of the receive direction so far.
    pub fn stats(&self) -> ImpairStats {
        self.monitor().stats()
    }

    /// A handle on the receive direction's counters that outlives boxing the port.
    pub fn monitor(&self) -> ImpairMonitor {
        ImpairMonitor(self.rx.counters.clone())
    }

    /// A handle on the send direction's counters, if sends are impaired.
    pub fn egress_monitor(&self) -> Option<ImpairMonitor> {
        self.tx.as_ref().map(|l| ImpairMonitor(l.counters.clone()))
    }

    /// The wrapped port.
    pub fn inner(&self) -> &P {
        &self.inner
    }

    /// The wrapped port, mutably.
    pub fn inner_mut(&mut self) -> &mut P {
        &mut self.inner
    }

    /// Frames held in the receive direction (queued, propagating or held back).
    pub fn held_frames(&self) -> usize {
        self.rx.held.len()
    }

    /// Hands due sent frames to the port, in order, until it refuses one.
    fn flush_egress(&mut self, now: Instant) {
        let Some(tx) = self.tx.as_mut() else {
            return;
        };
        while let Some(due) = tx.next_due() {
            let Some(frame) = tx.pop_due(now) else {
                break;
            };
            if let Err(frame) = self.inner.send(now, frame) {
                tx.unpop(due, frame);
                break;
            }
        }
    }
}

impl<P: Phy> Phy for Impaired<P> {
    fn recv(&mut self, now: Instant) -> Option<Frame> {
        self.flush_egress(now);
        while let Some(f) = self.inner.recv(now) {
            self.rx.ingest(now, f);
        }
        self.rx.pop_due(now)
    }

    fn send(&mut self, now: Instant, frame: Frame) -> Result<(), Frame> {
        match self.tx.as_mut() {
            None => self.inner.send(now, frame),
            Some(tx) => {
                tx.ingest(now, frame);
                self.flush_egress(now);
                Ok(())
            }
        }
    }

    fn can_send(&self) -> bool {
        // An impaired egress takes every frame (it drops what does not fit, and counts it).
        self.tx.is_some() || self.inner.can_send()
    }

    fn waitable(&self) -> Option<Receiver<Frame>> {
        self.inner.waitable()
    }

    fn poll_at(&self) -> Option<Instant> {
        let ours = [
            self.rx.next_due(),
            self.tx.as_ref().and_then(Line::next_due),
            self.inner.poll_at(),
        ];
        ours.into_iter().flatten().min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::phy::{wire, WirePort};

    const T0: Instant = Instant::ZERO;

    fn frame(i: u32, len: usize) -> Frame {
        let mut f = vec![0u8; len.max(4)];
        f[..4].copy_from_slice(&i.to_be_bytes());
        f
    }

    fn id(f: &[u8]) -> u32 {
        u32::from_be_bytes([f[0], f[1], f[2], f[3]])
    }

    /// Sends `n` frames of `len` bytes into an impaired port at `T0`, then drains it on a
    /// virtual clock that jumps to `poll_at`. Returns (delivery time, frame) and the stats.
    fn run(cfg: ImpairConfig, n: u32, len: usize) -> (Vec<(Instant, Frame)>, ImpairStats) {
        let (mut far, near): (WirePort, WirePort) = wire(n as usize + 1);
        for i in 0..n {
            far.send(T0, frame(i, len)).unwrap();
        }
        let mut port = Impaired::new(near, cfg).unwrap();
        let mut now = T0;
        let mut out = Vec::new();
        loop {
            while let Some(f) = port.recv(now) {
                out.push((now, f));
            }
            match port.poll_at() {
                Some(t) => {
                    assert!(t > now, "poll_at must report a future instant");
                    now = t;
                }
                None => break,
            }
        }
        assert_eq!(port.held_frames(), 0);
        (out, port.stats())
    }

    fn noisy(seed: u64) -> ImpairConfig {
        ImpairConfig {
            delay: Duration::from_millis(2),
            rate_bits_per_s: Some(100_000_000),
            queue_bytes: 64 << 10,
            loss: 0.05,
            reorder: 0.05,
            dup: 0.05,
            corrupt: 0.05,
            seed,
        }
    }

    #[test]
    fn same_seed_same_output_other_seed_other_output() {
        let a = run(noisy(7), 2000, 1000);
        let b = run(noisy(7), 2000, 1000);
        assert_eq!(a.0, b.0);
        assert_eq!(a.1, b.1);
        let c = run(noisy(8), 2000, 1000);
        assert_ne!(a.0, c.0, "another seed must impair differently");
    }

    #[test]
    fn perfect_config_delivers_everything_in_order_at_once() {
        let cfg = ImpairConfig::default();
        assert!(cfg.is_perfect());
        let (out, s) = run(cfg, 500, 100);
        assert_eq!(out.len(), 500);
        for (i, (t, f)) in out.iter().enumerate() {
            assert_eq!(*t, T0);
            assert_eq!(id(f), i as u32);
        }
        assert_eq!(s.frames_out, 500);
        assert_eq!(s.delayed, 0);
    }

    #[test]
    fn delay_is_exact_and_reported_by_poll_at() {
        let cfg = ImpairConfig {
            delay: Duration::from_micros(1500),
            ..ImpairConfig::default()
        };
        let (out, s) = run(cfg, 10, 100);
        assert_eq!(out.len(), 10);
        assert!(out
            .iter()
            .all(|(t, _)| *t == T0 + Duration::from_micros(1500)));
        assert_eq!(s.delayed, 10);
    }

    #[test]
    fn rate_limit_serializes_in_virtual_time() {
        // 1000 frames of 1250 bytes at 10 Mbit/s: 1 ms each, 1 s in all, plus 5 ms delay.
        let cfg = ImpairConfig {
            delay: Duration::from_millis(5),
            rate_bits_per_s: Some(10_000_000),
            queue_bytes: 2 << 20,
            ..ImpairConfig::default()
        };
        let (out, s) = run(cfg, 1000, 1250);
        assert_eq!(out.len(), 1000);
        for (i, (t, f)) in out.iter().enumerate() {
            assert_eq!(id(f), i as u32, "a FIFO bottleneck keeps order");
            let want = (i as i64 + 1) * 1000 + 5000;
            assert_eq!(t.total_micros(), want, "frame {i}");
        }
        let secs = out.last().unwrap().0.total_micros() as f64 / 1e6;
        let rate = 1000.0 * 1250.0 * 8.0 / (secs - 0.005);
        assert!((rate - 10e6).abs() < 10e6 * 0.01, "achieved {rate} bit/s");
        assert_eq!(s.dropped_queue, 0);
        assert_eq!(s.queue_high_water_bytes, 1000 * 1250);
    }

    #[test]
    fn tail_drop_bounds_the_queue() {
        // 10 000 frames of 1000 bytes at once into a 16 KiB queue on a 1 Mbit/s link.
        let cfg = ImpairConfig {
            rate_bits_per_s: Some(1_000_000),
            queue_bytes: 16 << 10,
            ..ImpairConfig::default()
        };
        let (out, s) = run(cfg, 10_000, 1000);
        assert_eq!(out.len(), 16, "only what fits the queue gets through");
        assert_eq!(s.dropped_queue, 10_000 - 16);
        assert!(s.queue_high_water_bytes <= 16 << 10);
        assert!(s.held_high_water_bytes <= 16 << 10);
        // the survivors are the head of the burst, in order
        assert!(out.iter().enumerate().all(|(i, (_, f))| id(f) == i as u32));
    }

    #[test]
    fn queue_drains_so_a_paced_sender_loses_nothing() {
        // A sender pacing at exactly the link rate never fills even a two-frame queue.
        let cfg = ImpairConfig {
            rate_bits_per_s: Some(8_000_000),
            queue_bytes: 2000,
            ..ImpairConfig::default()
        };
        let (mut far, near) = wire(16);
        let mut port = Impaired::new(near, cfg).unwrap();
        let mut got = 0;
        for i in 0..1000u32 {
            let now = Instant::from_micros(i64::from(i) * 1000); // 1000 B per ms = 8 Mbit/s
            far.send(now, frame(i, 1000)).unwrap();
            while port.recv(now).is_some() {
                got += 1;
            }
        }
        let end = port.poll_at().unwrap();
        while port.recv(end).is_some() {
            got += 1;
        }
        assert_eq!(got, 1000);
        assert_eq!(port.stats().dropped_queue, 0);
    }

    #[test]
    fn memory_is_bounded_without_a_rate() {
        let cfg = ImpairConfig {
            delay: Duration::from_secs(10),
            ..ImpairConfig::default()
        };
        let (mut far, near) = wire(64);
        let mut port = Impaired::new(near, cfg).unwrap();
        let n = MAX_HELD_BYTES / 65536 + 100;
        for i in 0..n {
            far.send(T0, frame(i as u32, 65536)).unwrap();
            assert!(port.recv(T0).is_none());
        }
        let s = port.stats();
        assert_eq!(s.dropped_queue, 100);
        assert!(s.held_high_water_bytes as usize <= MAX_HELD_BYTES);
    }

    fn each(cfg: ImpairConfig) -> (Vec<(Instant, Frame)>, ImpairStats) {
        let (out, s) = run(cfg, 20_000, 200);
        // conservation: everything that went in came out or was dropped
        assert_eq!(
            s.frames_in + s.duplicated,
            s.frames_out + s.dropped_loss + s.dropped_queue
        );
        assert_eq!(s.frames_out as usize, out.len());
        assert_eq!(s.frames_in, 20_000);
        (out, s)
    }

    fn near(count: u64, expect: f64) -> bool {
        (count as f64 - expect).abs() < expect * 0.1
    }

    #[test]
    fn loss_drops_and_counts() {
        let (out, s) = each(ImpairConfig {
            loss: 0.1,
            seed: 1,
            ..ImpairConfig::default()
        });
        assert!(near(s.dropped_loss, 2000.0), "{s:?}");
        assert_eq!(out.len() as u64, 20_000 - s.dropped_loss);
        assert!(out.windows(2).all(|w| id(&w[0].1) < id(&w[1].1)));
    }

    #[test]
    fn duplication_delivers_twice_and_counts() {
        let (out, s) = each(ImpairConfig {
            dup: 0.1,
            seed: 2,
            ..ImpairConfig::default()
        });
        assert!(near(s.duplicated, 2000.0), "{s:?}");
        assert_eq!(out.len() as u64, 20_000 + s.duplicated);
        let twins = out.windows(2).filter(|w| w[0].1 == w[1].1).count() as u64;
        assert_eq!(twins, s.duplicated, "each copy follows its original");
    }

    #[test]
    fn reordering_lets_later_frames_overtake_and_counts() {
        let cfg = ImpairConfig {
            reorder: 0.1,
            seed: 3,
            ..ImpairConfig::default()
        };
        let (out, s) = each(cfg);
        assert!(near(s.reordered, 2000.0), "{s:?}");
        assert_eq!(s.delayed, s.reordered);
        let late = out
            .iter()
            .filter(|(t, _)| *t == T0 + cfg.reorder_hold())
            .count() as u64;
        assert_eq!(late, s.reordered);
        let inversions = out.windows(2).filter(|w| id(&w[0].1) > id(&w[1].1)).count();
        assert!(inversions > 0, "held frames arrive after later ones");
        let mut ids: Vec<u32> = out.iter().map(|(_, f)| id(f)).collect();
        ids.sort_unstable();
        assert!(ids.iter().enumerate().all(|(i, &x)| x == i as u32));
    }

    #[test]
    fn corruption_flips_exactly_one_bit_and_counts() {
        let (out, s) = each(ImpairConfig {
            corrupt: 0.1,
            seed: 4,
            ..ImpairConfig::default()
        });
        assert!(near(s.corrupted, 2000.0), "{s:?}");
        let mut flipped = 0u64;
        let mut positions = std::collections::HashSet::new();
        for (i, (_, f)) in out.iter().enumerate() {
            let orig = frame(i as u32, 200);
            let bits: u32 = f.iter().zip(&orig).map(|(a, b)| (a ^ b).count_ones()).sum();
            assert!(bits <= 1);
            if bits == 1 {
                flipped += 1;
                positions.insert(f.iter().zip(&orig).position(|(a, b)| a != b).unwrap());
            }
        }
        assert_eq!(flipped, s.corrupted);
        assert!(positions.len() > 150, "flips land anywhere in the frame");
    }

    #[test]
    fn egress_impairment_holds_sent_frames_until_due() {
        let (near, mut far) = wire(16);
        let tx = ImpairConfig {
            delay: Duration::from_millis(3),
            seed: 9,
            ..ImpairConfig::default()
        };
        let mut port = Impaired::with_egress(near, ImpairConfig::default(), tx).unwrap();
        assert!(port.can_send());
        port.send(T0, frame(1, 60)).unwrap();
        assert!(far.recv(T0).is_none());
        let due = port.poll_at().unwrap();
        assert_eq!(due, T0 + Duration::from_millis(3));
        assert!(port.recv(due).is_none());
        assert_eq!(id(&far.recv(due).unwrap()), 1);
        assert_eq!(port.poll_at(), None);
        assert_eq!(port.egress_monitor().unwrap().stats().frames_out, 1);
    }

    #[test]
    fn invalid_options_are_named() {
        let bad = |f: fn(&mut ImpairConfig)| {
            let mut c = ImpairConfig::default();
            f(&mut c);
            c.validate().unwrap_err().option
        };
        assert_eq!(bad(|c| c.loss = 1.5), "loss");
        assert_eq!(bad(|c| c.reorder = -0.1), "reorder");
        assert_eq!(bad(|c| c.dup = f64::NAN), "dup");
        assert_eq!(bad(|c| c.corrupt = 2.0), "corrupt");
        assert_eq!(bad(|c| c.rate_bits_per_s = Some(0)), "rate_bits_per_s");
        assert_eq!(
            bad(|c| {
                c.rate_bits_per_s = Some(1000);
                c.queue_bytes = 0;
            }),
            "queue_bytes"
        );
        let e = Impaired::new(
            wire(1).0,
            ImpairConfig {
                loss: 7.0,
                ..ImpairConfig::default()
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("loss"), "{e}");
        // queue 0 is fine without a rate
        ImpairConfig {
            queue_bytes: 0,
            ..ImpairConfig::default()
        }
        .validate()
        .unwrap();
    }
}
