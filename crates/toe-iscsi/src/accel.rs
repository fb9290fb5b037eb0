//! Write acceleration over asymmetric WANs (seed 000): the target's and the initiator's
//! policies, pure (time comes in as µs of the caller's clock).
//!
//! Backups push writes one way over links whose return path is thin. RFC 7143 already lets
//! a write carry its data (ImmediateData=Yes, InitialR2T=No, FirstBurstLength up to the
//! write: standard keys, leading-only). On top of that, toemu's private key
//! [`WRITE_ACCELERATION_KEY`] (negotiated with AND semantics, so an initiator that does not
//! offer it — libiscsi, the Linux initiator — gets plain RFC behaviour) turns on, per
//! session, each switchable in [`AccelConfig`]:
//!
//! - **dynamic R2T**: the target watches the bytes its writes in progress hold against its
//!   write buffer; above [`AccelConfig::r2t_high_pct`] it tells the initiator (a
//!   vendor-specific Async Message, [`vcode::R2T_REQUIRED`]) to send writes without data
//!   and wait for R2Ts, and at or below [`AccelConfig::r2t_low_pct`] it lets unsolicited
//!   data flow again ([`vcode::UNSOLICITED_OK`]);
//! - **the combined SCSI/TCP acknowledgement**: the target's NIC holds the pure TCP ACKs
//!   of the connection (the bus command `AckHold`) so that the SCSI Response carries them,
//!   bounded by the acknowledgement window [`AccelConfig::ack_window_us`];
//! - **delayed, batched responses**: a write's SCSI Response waits while other writes of
//!   the session are in progress, up to [`AccelConfig::batch_max`] responses or
//!   [`AccelConfig::batch_delay_us`], and the batch goes out together (one segment);
//! - **back-off**: a write the target has no buffer for is answered TASK SET FULL with a
//!   [`vcode::BACK_OFF`] message whose Parameter1 is the extra delay in ms; the initiator
//!   resends it after its round-trip time plus that delay, without the application seeing
//!   the refusal;
//! - **congestion**: the initiator reports how full its write buffer is and how fast it
//!   fills (a Text Request with [`CONGESTION_KEY`]); while it reports congestion the target
//!   neither holds ACKs nor delays responses.

/// toemu's private login key for write acceleration (RFC 7143 §13.26 `X-` + reversed
/// domain), `Yes` or `No`, AND semantics, default `No`.
pub const WRITE_ACCELERATION_KEY: &str = "X-org.toemu.WriteAcceleration";

/// toemu's private Text key by which an accelerated initiator reports its write buffer:
/// `Yes,<bytes held>,<fill rate in bytes/s>` while congested, `No,<bytes held>,<rate>`
/// when it no longer is.
pub const CONGESTION_KEY: &str = "X-org.toemu.Congestion";

/// AsyncEvent of vendor-specific Async Messages (RFC 7143 §11.9.1).
pub const ASYNC_VENDOR: u8 = 255;

/// AsyncVCode values of toemu's vendor-specific Async Messages.
pub mod vcode {
    /// The target's write buffer is above its threshold: send writes without unsolicited
    /// data and wait for R2Ts.
    pub const R2T_REQUIRED: u8 = 1;
    /// Unsolicited data may flow again (as negotiated).
    pub const UNSOLICITED_OK: u8 = 2;
    /// Delay resending refused writes by the round-trip time plus Parameter1 ms.
    pub const BACK_OFF: u8 = 3;
}

/// The target's write-acceleration policy. `Default` turns every part on with the seed's
/// figures (a 500 ms acknowledgement window, 90% buffer threshold, 500 ms back-off), except
/// response batching (off: see its field's default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccelConfig {
    /// Accept the initiator's offer of [`WRITE_ACCELERATION_KEY`] at all.
    pub enabled: bool,
    /// Hold pure TCP ACKs so that SCSI Responses carry them.
    pub combined_ack: bool,
    /// The acknowledgement window: the longest a held ACK waits, µs.
    pub ack_window_us: u32,
    /// Dynamic R2T.
    pub dynamic_r2t: bool,
    /// The write buffer whose use dynamic R2T and back-off watch: the most bytes the
    /// session's writes in progress may hold, bytes.
    pub buffer_bytes: u64,
    /// Above this percentage of `buffer_bytes` in use, R2Ts are required.
    pub r2t_high_pct: u8,
    /// At or below this percentage, unsolicited data may flow again (hysteresis).
    pub r2t_low_pct: u8,
    /// Delay and batch the responses of writes.
    pub batch_responses: bool,
    /// Most responses held for one batch.
    pub batch_max: usize,
    /// Longest a response is held, µs (at most the acknowledgement window).
    pub batch_delay_us: u64,
    /// Answer writes without buffer room with TASK SET FULL and a back-off message.
    pub backoff: bool,
    /// The delay added to the round-trip time for a resend, ms.
    pub backoff_extra_ms: u16,
}

impl Default for AccelConfig {
    fn default() -> Self {
        AccelConfig {
            enabled: true,
            combined_ack: true,
            ack_window_us: 500_000,
            dynamic_r2t: true,
            buffer_bytes: 32 << 20,
            r2t_high_pct: 90,
            r2t_low_pct: 80,
            // Off by default: measured to stall streams at depth 32 on a lossy WAN (see the
            // README); `toemu iscsi wan-bench --with batching` compares.
            batch_responses: false,
            batch_max: 4,
            batch_delay_us: 5_000,
            backoff: true,
            backoff_extra_ms: 500,
        }
    }
}

impl AccelConfig {
    /// Write acceleration refused: every session gets RFC behaviour.
    pub const OFF: AccelConfig = AccelConfig {
        enabled: false,
        combined_ack: false,
        ack_window_us: 500_000,
        dynamic_r2t: false,
        buffer_bytes: 32 << 20,
        r2t_high_pct: 90,
        r2t_low_pct: 80,
        batch_responses: false,
        batch_max: 1,
        batch_delay_us: 0,
        backoff: false,
        backoff_extra_ms: 500,
    };

    /// What the dynamic-R2T state should become with `used` bytes of the buffer held,
    /// given it is `required` now: `Some(new state)` on a change.
    pub fn r2t_change(&self, required: bool, used: u64) -> Option<bool> {
        if !self.dynamic_r2t {
            return None;
        }
        let cap = u128::from(self.buffer_bytes.max(1));
        let used = u128::from(used) * 100;
        if !required && used > u128::from(self.r2t_high_pct) * cap {
            Some(true)
        } else if required && used <= u128::from(self.r2t_low_pct) * cap {
            Some(false)
        } else {
            None
        }
    }
}

/// The initiator's side of write acceleration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitiatorAccel {
    /// The write buffer: the most bytes of writes the application keeps waiting for their
    /// responses, bytes (what the congestion report is relative to).
    pub buffer_bytes: u64,
    /// At or above this percentage of `buffer_bytes` held, and filling, report congestion.
    pub congestion_high_pct: u8,
    /// Below this percentage, report that congestion is over.
    pub congestion_low_pct: u8,
    /// Shortest interval between two fill-rate samples, µs.
    pub sample_us: u64,
}

impl Default for InitiatorAccel {
    fn default() -> Self {
        InitiatorAccel {
            buffer_bytes: 64 << 20,
            congestion_high_pct: 75,
            congestion_low_pct: 50,
            sample_us: 10_000,
        }
    }
}

/// The initiator's congestion detector: samples of its write buffer's fill, pure.
#[derive(Debug, Clone, Default)]
pub struct FillMeter {
    last: Option<(u64, u64)>,
    rate: i64,
    congested: bool,
}

impl FillMeter {
    /// Whether a sample at `now_us` would be taken (the sample interval has passed).
    pub fn due(&self, cfg: &InitiatorAccel, now_us: u64) -> bool {
        self.last
            .is_none_or(|(t, _)| now_us.saturating_sub(t) >= cfg.sample_us)
    }

    /// Take a sample: `held` bytes of writes waiting at `now_us`. Returns `Some(report)`
    /// (the value of [`CONGESTION_KEY`] to send) when the congestion state changes.
    pub fn sample(&mut self, cfg: &InitiatorAccel, now_us: u64, held: u64) -> Option<String> {
        if !self.due(cfg, now_us) {
            return None;
        }
        if let Some((t, h)) = self.last {
            let dt = now_us.saturating_sub(t).max(1) as i128;
            let d = i128::from(held) - i128::from(h);
            self.rate = (d * 1_000_000 / dt).clamp(i64::MIN.into(), i64::MAX.into()) as i64;
        }
        self.last = Some((now_us, held));
        let cap = u128::from(cfg.buffer_bytes.max(1));
        let held100 = u128::from(held) * 100;
        let now = if self.congested {
            held100 >= u128::from(cfg.congestion_low_pct) * cap
        } else {
            held100 >= u128::from(cfg.congestion_high_pct) * cap && self.rate > 0
        };
        if now == self.congested {
            return None;
        }
        self.congested = now;
        let yes = if now { "Yes" } else { "No" };
        Some(format!("{yes},{held},{}", self.rate.max(0)))
    }

    /// Whether the last report said congested.
    pub fn congested(&self) -> bool {
        self.congested
    }
}

/// Parse a [`CONGESTION_KEY`] value: (congested, bytes held, fill rate in bytes/s).
pub fn parse_congestion(v: &str) -> Option<(bool, u64, u64)> {
    let mut it = v.split(',');
    let yes = match it.next()? {
        "Yes" => true,
        "No" => false,
        _ => return None,
    };
    let held = it.next()?.parse().ok()?;
    let rate = it.next()?.parse().ok()?;
    it.next().is_none().then_some((yes, held, rate))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamic_r2t_has_hysteresis() {
        let c = AccelConfig {
            buffer_bytes: 1000,
            ..AccelConfig::default()
        };
        assert_eq!(c.r2t_change(false, 900), None, "90% is not above 90%");
        assert_eq!(c.r2t_change(false, 901), Some(true));
        assert_eq!(
            c.r2t_change(true, 850),
            None,
            "between the thresholds: unchanged"
        );
        assert_eq!(c.r2t_change(true, 800), Some(false));
        assert_eq!(AccelConfig::OFF.r2t_change(false, 10_000), None);
    }

    #[test]
    fn congestion_is_reported_on_a_filling_buffer_and_cleared_below_the_low_mark() {
        let cfg = InitiatorAccel {
            buffer_bytes: 1000,
            sample_us: 10,
            ..InitiatorAccel::default()
        };
        let mut m = FillMeter::default();
        assert_eq!(m.sample(&cfg, 0, 100), None);
        assert_eq!(m.sample(&cfg, 5, 900), None, "within the sample interval");
        // 800 bytes in 20 µs: 40 MB/s, at 90%.
        let r = m.sample(&cfg, 20, 900).expect("congested");
        assert_eq!(parse_congestion(&r), Some((true, 900, 40_000_000)));
        assert!(m.congested());
        assert_eq!(
            m.sample(&cfg, 40, 600),
            None,
            "60%: still above the low mark"
        );
        let r = m.sample(&cfg, 60, 400).expect("cleared");
        assert_eq!(parse_congestion(&r).map(|p| p.0), Some(false));
        // Full but draining: not congestion.
        let mut m = FillMeter::default();
        m.sample(&cfg, 0, 1000);
        assert_eq!(m.sample(&cfg, 20, 990), None);
        assert_eq!(parse_congestion("Maybe,1,2"), None);
        assert_eq!(parse_congestion("Yes,1"), None);
        assert_eq!(parse_congestion("Yes,1,2,3"), None);
    }
}
