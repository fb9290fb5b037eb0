//! Wire options shared by every command that builds a wire: the impairment model
//! ([`toe_nic::impair`]) and pcap capture ([`toe_nic::pcap`]).
//!
//! [`WireOptions`] is the validated form (the `toemu` command line builds it from its flags),
//! which wraps ports: [`WireOptions::wrap`] for each end of an in-memory
//! wire (each end impairs what it receives, so the two directions are impaired independently,
//! each with its own seed derived from the wire seed), [`WireOptions::wrap_single`] for a lone
//! port such as a TAP device (both directions impaired by the one wrapper).
//!
//! The capture point is side 0's port: the file holds what host 0 sends (before the wire
//! impairs it) and what host 0 receives (after), as tcpdump on host 0's interface would see
//! it. Every port wrapped with the same options appends to the same file; a port whose clock
//! starts again at zero (the next run of a demo) continues after the latest record.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, BufWriter};
use std::path::{Path, PathBuf};

use toe_bus::time::Duration;
use toe_nic::impair::{ImpairConfig, ImpairMonitor, ImpairStats, Impaired};
use toe_nic::pcap::{Pcap, PcapWriter, SharedPcap};
use toe_nic::Phy;

use crate::runtime::BoxPhy;

/// Wire seed used when none is given.
pub const DEFAULT_WIRE_SEED: u64 = 1;

/// Parses a probability: a number in `0..=1`, or a percentage such as `1%` or `0.1%`.
pub fn parse_probability(s: &str) -> Result<f64, String> {
    let t = s.trim();
    let (num, scale) = match t.strip_suffix('%') {
        Some(n) => (n.trim_end(), 100.0),
        None => (t, 1.0),
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("{t:?} is not a probability (expected e.g. 0.01 or 1%)"))?;
    let p = v / scale;
    if !(0.0..=1.0).contains(&p) {
        return Err(format!(
            "{t:?} is not a probability in 0 ..= 1 (or 0% ..= 100%)"
        ));
    }
    Ok(p)
}

/// An open capture file that several ports (and clones of [`WireOptions`]) share.
#[derive(Clone)]
pub struct PcapTarget {
    path: PathBuf,
    sink: SharedPcap<BufWriter<File>>,
}

impl std::fmt::Debug for PcapTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PcapTarget")
            .field("path", &self.path)
            .finish()
    }
}

impl PcapTarget {
    /// Creates (truncates) `path` and writes the pcap header.
    pub fn create(path: impl Into<PathBuf>) -> io::Result<PcapTarget> {
        let path = path.into();
        let file = File::create(&path)?;
        let sink = PcapWriter::new(BufWriter::with_capacity(1 << 20, file))?.shared();
        Ok(PcapTarget { path, sink })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The shared writer.
    pub fn sink(&self) -> &SharedPcap<BufWriter<File>> {
        &self.sink
    }

    /// Frames written so far.
    pub fn records(&self) -> u64 {
        self.sink
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .records()
    }

    /// Writes buffered records to the file; reports the first write error of the capture.
    /// (Ports flush when they are dropped, too.)
    pub fn flush(&self) -> io::Result<()> {
        let mut g = self.sink.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = g.error() {
            return Err(io::Error::other(format!(
                "pcap {}: {e}",
                self.path.display()
            )));
        }
        g.flush()
    }
}

/// What a wire does: impairment of each direction and capture. `Default` is a perfect wire
/// without capture.
#[derive(Clone, Debug, Default)]
pub struct WireOptions {
    /// The impairment of each direction. Its `seed` is the wire seed: side `s` uses
    /// [`WireOptions::side_seed`]`(s)`.
    pub impair: ImpairConfig,
    /// Where side 0's frames are captured, if anywhere.
    pub pcap: Option<PcapTarget>,
}

/// The impairment counters of the two directions of a wrapped wire, indexed by the side that
/// receives (entry 1 is the 0 → 1 direction). `None` where the direction is not impaired.
pub type WireMonitors = [Option<ImpairMonitor>; 2];

/// Snapshot of [`WireMonitors`]: zeros where a direction is not impaired.
pub fn wire_stats(m: &WireMonitors) -> [ImpairStats; 2] {
    [0, 1].map(|i| m[i].as_ref().map(ImpairMonitor::stats).unwrap_or_default())
}

/// The command-line spelling of an [`ImpairConfig`] field (for error messages).
pub fn flag(option: &str) -> &'static str {
    match option {
        "delay" => "--delay-ms",
        "rate_bits_per_s" => "--rate-mbit",
        "queue_bytes" => "--queue-bytes",
        "loss" => "--loss",
        "reorder" => "--reorder",
        "dup" => "--dup",
        "corrupt" => "--corrupt",
        _ => "--wire-seed",
    }
}

impl WireOptions {
    /// Checks the impairment configuration (as [`ImpairConfig::validate`]).
    pub fn validate(&self) -> Result<(), String> {
        self.impair
            .validate()
            .map_err(|e| format!("{}: {}", flag(e.option), e.message))
    }

    /// The seed of the direction that side `side` receives: distinct per side, and a function
    /// of the wire seed only.
    pub fn side_seed(&self, side: usize) -> u64 {
        self.impair.seed ^ 0x9E37_79B9_7F4A_7C15u64.wrapping_mul(side as u64 + 1)
    }

    fn side_config(&self, side: usize) -> ImpairConfig {
        ImpairConfig {
            seed: self.side_seed(side),
            ..self.impair
        }
    }

    fn capture(&self, phy: BoxPhy, side: usize) -> BoxPhy {
        match (&self.pcap, side) {
            (Some(t), 0) => Box::new(Pcap::following(phy, t.sink.clone())),
            _ => phy,
        }
    }

    /// Wraps one end (`side` 0 or 1) of an in-memory wire: the frames it receives are
    /// impaired with the seed of `side`, and side 0 is captured if a pcap file is set. A
    /// perfect wire without capture returns the port as it is (boxed).
    ///
    /// # Panics
    /// If the impairment configuration does not validate (see [`WireOptions::validate`];
    /// options built from the command line always are).
    pub fn wrap<P: Phy + Send + 'static>(&self, port: P, side: usize) -> BoxPhy {
        self.wrap_observed(port, side).0
    }

    /// Like [`WireOptions::wrap`], also returning the counters of the impaired direction.
    ///
    /// # Panics
    /// As [`WireOptions::wrap`].
    pub fn wrap_observed<P: Phy + Send + 'static>(
        &self,
        port: P,
        side: usize,
    ) -> (BoxPhy, Option<ImpairMonitor>) {
        let (phy, mon): (BoxPhy, _) = if self.impair.is_perfect() {
            (Box::new(port), None)
        } else {
            let p = Impaired::new(port, self.side_config(side))
                .unwrap_or_else(|e| panic!("invalid wire options: {e}"));
            let m = p.monitor();
            (Box::new(p), Some(m))
        };
        (self.capture(phy, side), mon)
    }

    /// Wraps a lone port (a TAP device: the far end is not ours): both the frames it receives
    /// (seed of side 0) and the frames it sends (seed of side 1) are impaired, and the port is
    /// captured if a pcap file is set. Returns the port and the counters of (received, sent)
    /// frames.
    ///
    /// # Panics
    /// As [`WireOptions::wrap`].
    pub fn wrap_single<P: Phy + Send + 'static>(&self, port: P) -> (BoxPhy, WireMonitors) {
        let (phy, mons): (BoxPhy, WireMonitors) = if self.impair.is_perfect() {
            (Box::new(port), [None, None])
        } else {
            let p = Impaired::with_egress(port, self.side_config(0), self.side_config(1))
                .unwrap_or_else(|e| panic!("invalid wire options: {e}"));
            let m = [Some(p.monitor()), p.egress_monitor()];
            (Box::new(p), m)
        };
        (self.capture(phy, 0), mons)
    }

    /// One line for reports: `"perfect wire"` or the impairments, then the capture file.
    pub fn describe(&self) -> String {
        let c = &self.impair;
        let mut s = String::new();
        if c.is_perfect() {
            s.push_str("perfect wire");
        } else {
            let mut parts = Vec::new();
            if c.delay > Duration::ZERO {
                parts.push(format!(
                    "delay {} ms",
                    c.delay.total_micros() as f64 / 1000.0
                ));
            }
            if let Some(r) = c.rate_bits_per_s {
                parts.push(format!(
                    "rate {} Mbit/s, queue {} bytes",
                    r as f64 / 1e6,
                    c.queue_bytes
                ));
            }
            for (name, p) in [
                ("loss", c.loss),
                ("reorder", c.reorder),
                ("dup", c.dup),
                ("corrupt", c.corrupt),
            ] {
                if p > 0.0 {
                    parts.push(format!("{name} {}%", p * 100.0));
                }
            }
            let _ = write!(
                s,
                "impaired wire, each direction: {}; wire seed {}",
                parts.join(", "),
                c.seed
            );
        }
        if let Some(t) = &self.pcap {
            let _ = write!(s, "; pcap {} (host 0's port)", t.path.display());
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrapping_a_perfect_wire_is_transparent() {
        let (a, mut b) = toe_nic::wire(4);
        let (mut pa, mon) = WireOptions::default().wrap_observed(a, 0);
        assert!(mon.is_none());
        b.send(toe_bus::time::Instant::ZERO, vec![7u8; 60]).unwrap();
        assert_eq!(pa.recv(toe_bus::time::Instant::ZERO), Some(vec![7u8; 60]));
    }
}
