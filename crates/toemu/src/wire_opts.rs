//! Wire options shared by every command that builds a wire: the impairment model
//! ([`toe_nic::impair`]) and pcap capture ([`toe_nic::pcap`]).
//!
//! [`WireArgs`] is the command-line form (flatten it into a clap command); [`WireOptions`] is
//! the validated form, which wraps ports: [`WireOptions::wrap`] for each end of an in-memory
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

use crate::config::parse_size;
use crate::runtime::BoxPhy;

/// Wire seed used when none is given.
pub const DEFAULT_WIRE_SEED: u64 = 1;

/// Command-line options of a wire. Every option is optional; none given means a perfect wire
/// without capture.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct WireArgs {
    /// One-way delay added to each direction, in milliseconds (fractions allowed, microsecond
    /// resolution).
    #[arg(long = "delay-ms", value_name = "MS")]
    pub delay_ms: Option<f64>,
    /// Bandwidth limit of each direction, in megabits per second (10^6 bit/s of frame bytes).
    #[arg(long = "rate-mbit", value_name = "MBIT")]
    pub rate_mbit: Option<f64>,
    /// Bottleneck queue of each direction with --rate-mbit: most bytes waiting to be sent,
    /// tail drop beyond (default 1MiB). Accepts units: 64KiB, 1MiB, 1500...
    #[arg(long = "queue-bytes", value_name = "SIZE", value_parser = parse_size)]
    pub queue_bytes: Option<u64>,
    /// Probability that a frame is lost, per direction: 0..1 or a percentage (0.01 = 1%).
    #[arg(long, value_name = "P", value_parser = parse_probability)]
    pub loss: Option<f64>,
    /// Probability that a frame is held back so later frames overtake it: 0..1 or a
    /// percentage.
    #[arg(long, value_name = "P", value_parser = parse_probability)]
    pub reorder: Option<f64>,
    /// Probability that a frame is delivered twice: 0..1 or a percentage.
    #[arg(long, value_name = "P", value_parser = parse_probability)]
    pub dup: Option<f64>,
    /// Probability that a frame has one random bit flipped: 0..1 or a percentage.
    #[arg(long, value_name = "P", value_parser = parse_probability)]
    pub corrupt: Option<f64>,
    /// Seed of the impairment model (each direction derives its own from it; default 1).
    #[arg(long = "wire-seed", value_name = "N")]
    pub wire_seed: Option<u64>,
    /// Write every frame of host 0's port to this file in libpcap format (for tshark or
    /// Wireshark).
    #[arg(long, value_name = "PATH")]
    pub pcap: Option<PathBuf>,
}

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

/// The command-line spelling of an [`ImpairConfig`] field.
fn flag(option: &str) -> &'static str {
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
    /// Validates `a` and opens the capture file, if any. Errors name the option.
    pub fn from_args(a: &WireArgs) -> Result<WireOptions, String> {
        let mut c = ImpairConfig {
            seed: a.wire_seed.unwrap_or(DEFAULT_WIRE_SEED),
            ..ImpairConfig::default()
        };
        if let Some(ms) = a.delay_ms {
            if !(0.0..=3_600_000.0).contains(&ms) {
                return Err(format!(
                    "--delay-ms: {ms} is not a delay (0 ..= 3600000 ms)"
                ));
            }
            c.delay = Duration::from_micros((ms * 1000.0).round() as u64);
        }
        if let Some(m) = a.rate_mbit {
            let bits = m * 1e6;
            if !bits.is_finite() || bits < 1.0 || bits > u64::MAX as f64 {
                return Err(format!(
                    "--rate-mbit: {m} is not a rate (at least 0.000001 Mbit/s)"
                ));
            }
            c.rate_bits_per_s = Some(bits.round() as u64);
        }
        if let Some(q) = a.queue_bytes {
            if c.rate_bits_per_s.is_none() {
                return Err(
                    "--queue-bytes: the queue is the rate limit's; give --rate-mbit too".into(),
                );
            }
            c.queue_bytes =
                usize::try_from(q).map_err(|_| format!("--queue-bytes: {q} is too large"))?;
        }
        for (v, dst) in [
            (a.loss, &mut c.loss),
            (a.reorder, &mut c.reorder),
            (a.dup, &mut c.dup),
            (a.corrupt, &mut c.corrupt),
        ] {
            if let Some(p) = v {
                *dst = p;
            }
        }
        c.validate()
            .map_err(|e| format!("{}: {}", flag(e.option), e.message))?;
        let pcap = match &a.pcap {
            None => None,
            Some(p) => Some(
                PcapTarget::create(p)
                    .map_err(|e| format!("--pcap {}: cannot create: {e}", p.display()))?,
            ),
        };
        Ok(WireOptions { impair: c, pcap })
    }

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
    /// [`WireOptions::from_args`] always returns a valid one).
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
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        wire: WireArgs,
    }

    fn parse(args: &[&str]) -> Result<WireOptions, String> {
        let cli = Cli::try_parse_from(std::iter::once("t").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        WireOptions::from_args(&cli.wire)
    }

    #[test]
    fn no_options_is_a_perfect_wire() {
        let w = parse(&[]).unwrap();
        assert!(w.impair.is_perfect());
        assert!(w.pcap.is_none());
        assert_eq!(w.describe(), "perfect wire");
        assert!(WireOptions::default().impair.is_perfect());
    }

    #[test]
    fn options_are_parsed_with_units_and_percentages() {
        let w = parse(&[
            "--delay-ms",
            "1.5",
            "--rate-mbit",
            "100",
            "--queue-bytes",
            "64KiB",
            "--loss",
            "1%",
            "--reorder",
            "0.02",
            "--dup",
            "0.5%",
            "--corrupt",
            "0.001",
            "--wire-seed",
            "9",
        ])
        .unwrap();
        let c = w.impair;
        assert_eq!(c.delay, Duration::from_micros(1500));
        assert_eq!(c.rate_bits_per_s, Some(100_000_000));
        assert_eq!(c.queue_bytes, 65536);
        assert_eq!(
            (c.loss, c.reorder, c.dup, c.corrupt),
            (0.01, 0.02, 0.005, 0.001)
        );
        assert_eq!(c.seed, 9);
        assert_ne!(w.side_seed(0), w.side_seed(1));
        let d = w.describe();
        assert!(d.contains("delay 1.5 ms") && d.contains("loss 1%"), "{d}");
    }

    #[test]
    fn bad_options_are_named() {
        let e = parse(&["--loss", "1.5"]).unwrap_err();
        assert!(e.contains("--loss"), "{e}");
        let e = parse(&["--corrupt", "200%"]).unwrap_err();
        assert!(e.contains("--corrupt"), "{e}");
        let e = parse(&["--rate-mbit", "0"]).unwrap_err();
        assert!(e.contains("--rate-mbit"), "{e}");
        let e = parse(&["--rate-mbit", "10", "--queue-bytes", "0"]).unwrap_err();
        assert!(e.contains("--queue-bytes"), "{e}");
        let e = parse(&["--queue-bytes", "1MiB"]).unwrap_err();
        assert!(e.contains("--rate-mbit"), "{e}");
        let e = parse(&["--delay-ms=-1"]).unwrap_err();
        assert!(e.contains("--delay-ms"), "{e}");
        let e = parse(&["--pcap", "/nonexistent-dir/x.pcap"]).unwrap_err();
        assert!(e.contains("--pcap"), "{e}");
    }

    #[test]
    fn wrapping_a_perfect_wire_is_transparent() {
        let (a, mut b) = toe_nic::wire(4);
        let (mut pa, mon) = WireOptions::default().wrap_observed(a, 0);
        assert!(mon.is_none());
        b.send(toe_bus::time::Instant::ZERO, vec![7u8; 60]).unwrap();
        assert_eq!(pa.recv(toe_bus::time::Instant::ZERO), Some(vec![7u8; 60]));
    }
}
