//! The cost model of the emulated machine, in virtual time.
//!
//! Two processors do the work of a host: the NIC (its protocol engine and its DMA engine) and
//! the host CPU (the driver and the copies the host makes). Each is a [`Busy`] timeline: an
//! operation charged at `now` starts when the processor is free (`max(now, busy_until)`) and
//! keeps it busy for its cost. A processor that is busy does not poll: the runtime's clock
//! jumps to the instant it is free, so costs take virtual time and cost no wall time. What
//! a processor sends (bus messages) leaves when the work that produced it is done, and then
//! crosses the bus in the bus latency.
//!
//! The model is serial per processor and batch-grained: the NIC charges the work of one poll
//! (frames, DMA bytes) after doing it, and polls again when the charge is paid. Costs are
//! kept in picoseconds, so that sub-microsecond charges (a 1500-byte frame's DMA at 7 GB/s
//! is 0.2 µs) add up exactly, and rounded up to the microsecond clock only when compared with
//! it.
//!
//! All-zero costs ([`NicCost::FREE`], [`HostCost::FREE`]) charge nothing: the timelines stay
//! at zero and nothing is ever held back.

use crate::time::Instant;

/// Picoseconds per second.
const PS_PER_S: u128 = 1_000_000_000_000;

/// Cost of moving `bytes` at `bytes_per_s`, in picoseconds (0 when the rate is 0, meaning
/// free).
pub fn transfer_ps(bytes: u64, bytes_per_s: u64) -> u128 {
    if bytes_per_s == 0 {
        return 0;
    }
    (u128::from(bytes) * PS_PER_S).div_ceil(u128::from(bytes_per_s))
}

/// What the NIC's work costs. Zero fields are free.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NicCost {
    /// DMA bandwidth between NIC and host memory, in bytes per second (both directions share
    /// it: received payload written, sent payload read). 0 = free.
    pub dma_bytes_per_s: u64,
    /// Protocol processing per frame received or sent, in nanoseconds.
    pub segment_ns: u64,
}

impl NicCost {
    /// Nothing costs anything.
    pub const FREE: NicCost = NicCost {
        dma_bytes_per_s: 0,
        segment_ns: 0,
    };

    /// Cost of one poll's work: `frames` frames in or out and `dma_bytes` moved, in
    /// picoseconds.
    pub fn work_ps(&self, frames: u64, dma_bytes: u64) -> u128 {
        u128::from(frames) * u128::from(self.segment_ns) * 1000
            + transfer_ps(dma_bytes, self.dma_bytes_per_s)
    }

    /// True if every cost is zero.
    pub fn is_free(&self) -> bool {
        *self == NicCost::FREE
    }
}

/// What the host CPU's work for the TOE costs. Zero fields are free.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HostCost {
    /// Host memory copy bandwidth, in bytes per second: the driver's copies between host
    /// buffers and the copies between host memory and an application's memory. 0 = free.
    pub copy_bytes_per_s: u64,
    /// Handling one bus event (interrupt share, completion processing), in nanoseconds.
    pub event_ns: u64,
    /// Issuing one bus command (descriptor write, doorbell share), in nanoseconds.
    pub command_ns: u64,
    /// CRC32C bandwidth of host software (iSCSI digests computed on the host), in bytes
    /// per second. 0 = free.
    pub crc_bytes_per_s: u64,
}

impl HostCost {
    /// Nothing costs anything.
    pub const FREE: HostCost = HostCost {
        copy_bytes_per_s: 0,
        event_ns: 0,
        command_ns: 0,
        crc_bytes_per_s: 0,
    };

    /// True if every cost is zero.
    pub fn is_free(&self) -> bool {
        *self == HostCost::FREE
    }
}

/// One processor's timeline: busy until an instant, and the total work charged. Time is
/// kept in picoseconds from the clock's origin.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Busy {
    until_ps: i128,
    total_ps: u128,
}

fn ps(t: Instant) -> i128 {
    i128::from(t.total_micros()) * 1_000_000
}

impl Busy {
    /// Charge `cost_ps` of work arriving at `now`: it starts when the processor is free.
    pub fn charge(&mut self, now: Instant, cost_ps: u128) {
        if cost_ps == 0 {
            return;
        }
        let cost = i128::try_from(cost_ps).unwrap_or(i128::MAX / 4);
        self.until_ps = self.until_ps.max(ps(now)) + cost;
        self.total_ps += cost_ps;
    }

    /// The first clock instant (µs, rounded up) at which the processor is free; the clock's
    /// origin if it was never charged.
    pub fn free_at(&self) -> Instant {
        Instant::from_micros(
            self.until_ps.div_euclid(1_000_000) as i64
                + i64::from(self.until_ps.rem_euclid(1_000_000) != 0),
        )
    }

    /// True if work charged earlier still runs at `now`.
    pub fn is_busy(&self, now: Instant) -> bool {
        self.free_at() > now
    }

    /// When something produced by work charged so far leaves: `now`, or later if the
    /// processor is still busy.
    pub fn departs(&self, now: Instant) -> Instant {
        self.free_at().max(now)
    }

    /// Total work charged so far, in picoseconds.
    pub fn total_ps(&self) -> u128 {
        self.total_ps
    }

    /// Total work charged so far, in (fractional) microseconds.
    pub fn total_us(&self) -> f64 {
        self.total_ps as f64 / 1e6
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_queues_behind_work_and_rounds_up_to_the_clock() {
        let mut b = Busy::default();
        let t = Instant::from_micros(10);
        assert!(!b.is_busy(t));
        b.charge(t, 400_000); // 0.4 µs
        assert_eq!(b.free_at(), Instant::from_micros(11));
        b.charge(t, 400_000); // queued: ends at 10.8 µs
        assert_eq!(b.free_at(), Instant::from_micros(11));
        b.charge(t, 400_000); // 11.2 µs
        assert_eq!(b.free_at(), Instant::from_micros(12));
        assert!(b.is_busy(Instant::from_micros(11)));
        assert!(!b.is_busy(Instant::from_micros(12)));
        // idle time is not work: a charge at 100 µs starts at 100 µs
        b.charge(Instant::from_micros(100), 1_000_000);
        assert_eq!(b.free_at(), Instant::from_micros(101));
        assert_eq!(b.total_ps(), 2_200_000);
        assert_eq!(
            b.departs(Instant::from_micros(50)),
            Instant::from_micros(101)
        );
        assert_eq!(
            b.departs(Instant::from_micros(200)),
            Instant::from_micros(200)
        );
    }

    #[test]
    fn transfer_cost_is_exact_in_picoseconds() {
        // 1500 bytes at 7.5 GB/s = 200 ns
        assert_eq!(transfer_ps(1500, 7_500_000_000), 200_000);
        assert_eq!(transfer_ps(1500, 0), 0, "rate 0 is free");
        let nic = NicCost {
            dma_bytes_per_s: 1_000_000_000,
            segment_ns: 100,
        };
        // 2 frames (200 ns) + 1000 bytes at 1 GB/s (1 µs)
        assert_eq!(nic.work_ps(2, 1000), 1_200_000);
        let mut b = Busy::default();
        b.charge(Instant::from_micros(0), NicCost::FREE.work_ps(10, 10_000));
        assert_eq!(b, Busy::default(), "free costs charge nothing");
    }
}
