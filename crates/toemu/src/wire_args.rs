//! The command-line form of a wire's options ([`WireArgs`], flattened into clap commands) and
//! its validation into the host library's [`WireOptions`].

use std::path::PathBuf;

use toe_bus::time::Duration;
use toe_host::config::parse_size;
use toe_host::wire_opts::{flag, parse_probability, PcapTarget, WireOptions, DEFAULT_WIRE_SEED};
use toe_nic::impair::ImpairConfig;

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

/// Validates `a` and opens the capture file, if any. Errors name the option.
pub fn wire_options(a: &WireArgs) -> Result<WireOptions, String> {
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
        wire_options(&cli.wire)
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
}
