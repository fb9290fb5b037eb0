//! `toemu sweep`: latency, throughput, host copies and receive memory against the indicate
//! window W, for each receive mode, on the virtual clock.
//!
//! For every W and every mode, one bulk transfer ([`crate::demo::toe_bulk`]: throughput,
//! copies per byte, anonymous-pool and copy-buffer high water, stalls, acknowledgements) and
//! one request/response phase ([`crate::demo::toe_rr`]: p50/p99 round trip) run with
//! `indicate_window_bytes = W`. `mss-holdoff` ignores W and is the flat reference line;
//! `smoltcp-bare` (no offload layers, W meaningless) may be added as a baseline.
//!
//! Throughput and latency are wall-clock figures of the single-threaded simulation (like
//! `toemu demo`); copies and memory are counted, not estimated.

use std::io;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::bare::BarePair;
use crate::demo::{toe_bulk, toe_rr, DemoOptions, Mode};
use crate::plot::{format_bytes, write_svg, Axis, Chart, Scale, Series, Ticks};
use toe_host::config::{parse_size, Settings};

/// Sweep parameters.
#[derive(Debug, Clone)]
pub struct SweepOptions {
    /// The indicate windows W to measure, in bytes, in order.
    pub w_values: Vec<u32>,
    /// Receive modes, one line each in the plots.
    pub modes: Vec<Mode>,
    /// Bytes of the bulk transfer at each point.
    pub bytes: u64,
    /// Request/response exchanges (64 bytes each way) at each point.
    pub rr_iters: usize,
    /// Base host settings; W (`indicate_window_bytes`) is overridden per point, the policy
    /// per mode.
    pub settings: Settings,
    /// Seed of the payload and the stacks.
    pub seed: u64,
}

impl Default for SweepOptions {
    /// W = 1 KiB ..= 4 MiB in powers of two; `named-buffer`, `indicate-window`,
    /// `mss-holdoff`, `unbounded-copy`; 64 MiB bulk; 2000 exchanges; default settings; seed 1.
    fn default() -> Self {
        SweepOptions {
            w_values: parse_w_range("1KiB..4MiB").expect("valid default range"),
            modes: DEFAULT_MODES.to_vec(),
            bytes: 64 << 20,
            rr_iters: 2000,
            settings: Settings::default(),
            seed: 1,
        }
    }
}

/// The modes swept by default.
pub const DEFAULT_MODES: [Mode; 4] = [
    Mode::NamedBuffer,
    Mode::IndicateWindow,
    Mode::MssHoldoff,
    Mode::UnboundedCopy,
];

/// Size of the request and of the response in the latency phase, in bytes.
pub const RR_BYTES: usize = 64;

/// One measured point: one mode at one W.
#[derive(Debug, Clone, Serialize)]
pub struct SweepPoint {
    /// Mode name (`named-buffer`, `indicate-window`, ...).
    pub mode: &'static str,
    /// Indicate window W, in bytes.
    pub w_bytes: u32,
    /// Bulk transfer throughput, bytes per wall-clock second.
    pub throughput_bytes_per_s: f64,
    /// Median request/response round trip, wall-clock microseconds.
    pub rr_p50_us: f64,
    /// 99th-percentile request/response round trip, wall-clock microseconds.
    pub rr_p99_us: f64,
    /// Receiver's host copies per received byte (DMA writes + driver copies + copies out).
    pub host_copies_per_byte: f64,
    /// Most anonymous-buffer bytes the receiving driver held at once, in bytes.
    pub anon_pool_high_water_bytes: u64,
    /// Most bytes the `unbounded-copy` driver socket buffer held, in bytes.
    pub copy_buffer_high_water_bytes: u64,
    /// Times the receiving NIC suspended delivery at P == W.
    pub indicate_stalls: u64,
    /// IndicateAcknowledge commands the receiving driver sent.
    pub indicate_acks: u64,
}

impl SweepPoint {
    /// Receive-side buffer memory high water: anonymous pool plus copy buffer, in bytes.
    pub fn memory_high_water_bytes(&self) -> u64 {
        self.anon_pool_high_water_bytes + self.copy_buffer_high_water_bytes
    }
}

/// Parses the W values of a sweep: either a range `FROM..TO` (every power of two from FROM to
/// TO inclusive; FROM and TO must be powers of two) or a comma-separated list (`4KiB,64KiB`),
/// sizes as in [`parse_size`]. Each W must be between 1 byte and 1 GiB. Returns the values in
/// bytes, in the given order (ascending for a range).
///
/// # Errors
/// A message naming the malformed part.
pub fn parse_w_range(s: &str) -> Result<Vec<u32>, String> {
    let one = |t: &str| -> Result<u32, String> {
        let v = parse_size(t)?;
        if v == 0 || v > toe_host::config::MAX_INDICATE_WINDOW_BYTES {
            return Err(format!("W = {} must be between 1 byte and 1 GiB", t.trim()));
        }
        u32::try_from(v).map_err(|_| format!("W = {} is too large", t.trim()))
    };
    let s = s.trim();
    if let Some((from, to)) = s.split_once("..") {
        let to = to.strip_prefix('=').unwrap_or(to);
        let (a, b) = (one(from)?, one(to)?);
        for (t, v) in [(from, a), (to, b)] {
            if !v.is_power_of_two() {
                return Err(format!(
                    "range bound {} = {v} bytes is not a power of two (use a comma list for other values)",
                    t.trim()
                ));
            }
        }
        if a > b {
            return Err(format!("empty range {s:?}: {a} > {b} bytes"));
        }
        let mut out = Vec::new();
        let mut w = a;
        loop {
            out.push(w);
            if w >= b {
                break;
            }
            w *= 2;
        }
        Ok(out)
    } else {
        let out = s.split(',').map(one).collect::<Result<Vec<_>, _>>()?;
        if out.is_empty() {
            return Err("no W values".into());
        }
        Ok(out)
    }
}

/// The settings of one point: `base` with W set (as a command-line override) and validated.
///
/// # Errors
/// `InvalidInput` if W is refused (e.g. an explicit keep-open batch larger than W).
pub fn settings_with_window(base: &Settings, w: u32) -> io::Result<Settings> {
    let mut s = base.clone();
    s.apply_override("indicate_window_bytes", &w.to_string())
        .and_then(|()| s.validate())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    Ok(s)
}

/// Measure one mode at one W.
///
/// # Errors
/// Invalid settings for this W, or a transfer that stalls or loses bytes.
pub fn measure_point(o: &SweepOptions, mode: Mode, w: u32) -> io::Result<SweepPoint> {
    let settings = settings_with_window(&o.settings, w)?;
    let demo = DemoOptions {
        bytes: o.bytes,
        rr_iters: o.rr_iters,
        rr_bytes: RR_BYTES,
        settings,
        seed: o.seed,
        // Named buffers must exceed W for direct placement.
        named_buf_bytes: (2 * w as usize).max(512 << 10),
        modes: vec![mode],
        repeat: 1,
        ..DemoOptions::default()
    };
    let mut p = SweepPoint {
        mode: mode.name(),
        w_bytes: w,
        throughput_bytes_per_s: 0.0,
        rr_p50_us: 0.0,
        rr_p99_us: 0.0,
        host_copies_per_byte: 0.0,
        anon_pool_high_water_bytes: 0,
        copy_buffer_high_water_bytes: 0,
        indicate_stalls: 0,
        indicate_acks: 0,
    };
    let lat = if mode == Mode::SmoltcpBare {
        let mut pair = BarePair::new(&demo.settings, o.seed);
        let (elapsed, _) = pair.bulk(o.bytes, o.seed)?;
        p.throughput_bytes_per_s = o.bytes as f64 / elapsed.as_secs_f64().max(1e-9);
        BarePair::new(&demo.settings, o.seed).request_response(o.rr_iters, RR_BYTES)?
    } else {
        let b = toe_bulk(mode, &demo)?;
        p.throughput_bytes_per_s = o.bytes as f64 / b.seconds.max(1e-9);
        p.host_copies_per_byte = b.copies;
        p.anon_pool_high_water_bytes = b.anon_high;
        p.copy_buffer_high_water_bytes = b.copy_high;
        p.indicate_stalls = b.stalls;
        p.indicate_acks = b.acks;
        toe_rr(mode, &demo)?
    };
    let l = crate::stats::latency(lat);
    (p.rr_p50_us, p.rr_p99_us) = (l.p50, l.p99);
    Ok(p)
}

/// Run the sweep: for each W (outer loop, in order) each mode (inner loop), one
/// [`measure_point`]. `progress` hears one line per point. Returns `w_values.len() ×
/// modes.len()` points, W-major.
///
/// # Errors
/// `InvalidInput` for no W values or no modes, else the first failing point.
pub fn run_sweep(o: &SweepOptions, mut progress: impl FnMut(&str)) -> io::Result<Vec<SweepPoint>> {
    if o.w_values.is_empty() || o.modes.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a sweep needs at least one W value and one mode",
        ));
    }
    let total = o.w_values.len() * o.modes.len();
    let mut points = Vec::with_capacity(total);
    for &w in &o.w_values {
        for &mode in &o.modes {
            let p = measure_point(o, mode, w)?;
            progress(&format!(
                "[{}/{}] W {:>9} {:<16} {:>8.1} MB/s  rr p50 {:>7.1} us p99 {:>7.1} us  copies/B {:.2}  mem-hw {}",
                points.len() + 1,
                total,
                format_bytes(f64::from(w)),
                p.mode,
                p.throughput_bytes_per_s / 1e6,
                p.rr_p50_us,
                p.rr_p99_us,
                p.host_copies_per_byte,
                format_bytes(p.memory_high_water_bytes() as f64),
            ));
            points.push(p);
        }
    }
    Ok(points)
}

/// A readable table of `points`, one row per point in the given order.
pub fn sweep_table(points: &[SweepPoint]) -> String {
    let mut s = format!(
        "{:>9} {:<16} {:>10} {:>9} {:>9} {:>9} {:>12} {:>12} {:>8} {:>8}\n",
        "W",
        "mode",
        "MB/s",
        "rr p50us",
        "rr p99us",
        "copies/B",
        "anon-hw KiB",
        "copy-hw KiB",
        "stalls",
        "acks"
    );
    for p in points {
        s.push_str(&format!(
            "{:>9} {:<16} {:>10.1} {:>9.1} {:>9.1} {:>9.2} {:>12} {:>12} {:>8} {:>8}\n",
            format_bytes(f64::from(p.w_bytes)),
            p.mode,
            p.throughput_bytes_per_s / 1e6,
            p.rr_p50_us,
            p.rr_p99_us,
            p.host_copies_per_byte,
            p.anon_pool_high_water_bytes / 1024,
            p.copy_buffer_high_water_bytes / 1024,
            p.indicate_stalls,
            p.indicate_acks,
        ));
    }
    s
}

/// File names [`write_sweep`] writes, in order.
pub const SWEEP_FILES: [&str; 4] = [
    "sweep.json",
    "sweep-throughput.svg",
    "sweep-rr-p99.svg",
    "sweep-memory.svg",
];

/// One line per mode (in first-seen order) of `f(point)` against W.
fn per_mode(points: &[SweepPoint], f: impl Fn(&SweepPoint) -> f64) -> Vec<Series> {
    let mut out: Vec<Series> = Vec::new();
    for p in points {
        let xy = (f64::from(p.w_bytes), f(p));
        match out.iter_mut().find(|s| s.name == p.mode) {
            Some(s) => s.points.push(xy),
            None => out.push(Series::line(p.mode, vec![xy])),
        }
    }
    for s in &mut out {
        s.points.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    out
}

/// Write `points` into directory `dir` (created if missing): `sweep.json` (an object with
/// the points) and three SVG charts against W on a log2 axis, one line per mode: throughput
/// (MB/s), request/response p99 (µs) and receive memory high water (anonymous pool + copy
/// buffer, bytes, log2). Returns the paths written, in [`SWEEP_FILES`] order.
///
/// # Errors
/// The directory or a file cannot be written.
pub fn write_sweep(dir: &Path, points: &[SweepPoint]) -> io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let paths: Vec<PathBuf> = SWEEP_FILES.iter().map(|f| dir.join(f)).collect();
    let json = serde_json::json!({
        "units": {
            "w_bytes": "bytes",
            "throughput_bytes_per_s": "bytes per wall-clock second",
            "rr_p50_us": "wall-clock microseconds",
            "rr_p99_us": "wall-clock microseconds",
            "host_copies_per_byte": "host copies per received byte",
            "anon_pool_high_water_bytes": "bytes",
            "copy_buffer_high_water_bytes": "bytes",
        },
        "points": points,
    });
    let text = serde_json::to_string_pretty(&json).map_err(io::Error::other)?;
    std::fs::write(&paths[0], text + "\n")?;

    let w_axis = || {
        Axis::new(
            "indicate window W (bytes, log2 scale)",
            Scale::Log2,
            Ticks::Bytes,
        )
    };
    let mut c = Chart::new(
        "Bulk throughput against W",
        w_axis(),
        Axis::new("throughput (MB/s, wall clock)", Scale::Linear, Ticks::Plain),
    );
    c.series = per_mode(points, |p| p.throughput_bytes_per_s / 1e6);
    write_svg(&paths[1], &c)?;

    let mut c = Chart::new(
        format!("Request/response p99 against W ({RR_BYTES} B each way)"),
        w_axis(),
        Axis::new(
            "round trip p99 (µs, wall clock)",
            Scale::Linear,
            Ticks::Plain,
        ),
    );
    c.series = per_mode(points, |p| p.rr_p99_us);
    write_svg(&paths[2], &c)?;

    let mut c = Chart::new(
        "Receive buffer memory high water against W",
        w_axis(),
        Axis::new(
            "anonymous pool + copy buffer high water (bytes, log2 scale)",
            Scale::Log2,
            Ticks::Bytes,
        ),
    );
    c.series = per_mode(points, |p| p.memory_high_water_bytes() as f64);
    let mut ws: Vec<f64> = points.iter().map(|p| f64::from(p.w_bytes)).collect();
    ws.sort_by(f64::total_cmp);
    ws.dedup();
    c.series.push(Series::dashed(
        "= W (reference)",
        ws.into_iter().map(|w| (w, w)).collect(),
    ));
    write_svg(&paths[3], &c)?;
    Ok(paths)
}
