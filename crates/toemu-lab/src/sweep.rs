//! `toemu sweep`: throughput, latency, host copies and CPU, and receive memory against the
//! indicate window W, for each receive mode, on the virtual clock of the modeled machine.
//!
//! For every W and every mode, one bulk transfer ([`crate::demo::toe_bulk`]: throughput,
//! copies per byte, host CPU per byte, anonymous-pool and copy-buffer high water, stalls,
//! acknowledgements) and two request/response phases ([`crate::demo::toe_rr_timed`]: p50/p99
//! round trip at [`RR_BYTES`] and at [`RR_LARGE_BYTES`]) run with `indicate_window_bytes =
//! W`. `mss-holdoff` ignores W and is the flat reference line; `smoltcp-bare` (no offload
//! layers, W meaningless) may be added as a baseline.
//!
//! Every figure is first in modeled time: the virtual clock under the cost model (the
//! settings' bus latency, DMA and copy bandwidths, per-event, per-command and per-frame costs)
//! on a wire of [`SweepOptions::wire_rate_mbit`] (25 Gbit/s by default). The emulator's
//! wall-clock speed is reported apart (`wall_*`). Copies and memory are counted, not
//! estimated. [`SweepOptions::compare`] runs every point a second time under another
//! configuration, so the charts overlay the two.

use std::io;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::bare::BarePair;
use crate::demo::{rr_any, toe_bulk, DemoOptions, Mode};
use crate::plot::{format_bytes, write_svg, Axis, Chart, Scale, Series, Ticks};
use crate::stats::latency;
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
    /// Request/response exchanges of [`RR_BYTES`] at each point; a tenth as many (at least
    /// 20) of [`RR_LARGE_BYTES`].
    pub rr_iters: usize,
    /// Base host settings (cost model included); W (`indicate_window_bytes`) is overridden
    /// per point, the policy per mode.
    pub settings: Settings,
    /// Seed of the payload and the stacks.
    pub seed: u64,
    /// Rate of the modeled wire, each direction, in Mbit/s.
    pub wire_rate_mbit: u64,
    /// A second configuration measured at every point beside the base one: its label and
    /// its settings.
    pub compare: Option<(String, Settings)>,
}

impl Default for SweepOptions {
    /// W = 1 KiB ..= 4 MiB in powers of two; `named-buffer`, `indicate-window`,
    /// `mss-holdoff`, `unbounded-copy`; 64 MiB bulk; 2000 exchanges; default settings; seed 1;
    /// the default machine's 25 Gbit/s wire; no comparison.
    fn default() -> Self {
        SweepOptions {
            w_values: parse_w_range("1KiB..4MiB").expect("valid default range"),
            modes: DEFAULT_MODES.to_vec(),
            bytes: 64 << 20,
            rr_iters: 2000,
            settings: Settings::default(),
            seed: 1,
            wire_rate_mbit: toe_host::config::DEFAULT_WIRE_RATE_MBIT,
            compare: None,
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

/// Size of the request and of the response in the small latency phase, in bytes.
pub const RR_BYTES: usize = 64;

/// Size of the request and of the response in the large latency phase, in bytes.
pub const RR_LARGE_BYTES: usize = 64 << 10;

/// The label of the base configuration's points.
pub const BASE: &str = "base";

/// One measured point: one mode at one W under one configuration.
#[derive(Debug, Clone, Serialize)]
pub struct SweepPoint {
    /// Configuration: [`BASE`], or the label of [`SweepOptions::compare`].
    pub config: String,
    /// Mode name (`named-buffer`, `indicate-window`, ...).
    pub mode: &'static str,
    /// Indicate window W, in bytes.
    pub w: u32,
    /// Bulk transfer throughput, bytes per second of modeled time.
    pub modeled_throughput_bytes_per_s: f64,
    /// Median round trip of [`RR_BYTES`] each way, modeled µs.
    pub modeled_rr_64b_p50_us: f64,
    /// 99th-percentile round trip of [`RR_BYTES`] each way, modeled µs.
    pub modeled_rr_64b_p99_us: f64,
    /// Median round trip of [`RR_LARGE_BYTES`] each way, modeled µs.
    pub modeled_rr_64k_p50_us: f64,
    /// 99th-percentile round trip of [`RR_LARGE_BYTES`] each way, modeled µs.
    pub modeled_rr_64k_p99_us: f64,
    /// The receiving host's CPU time under the cost model per received byte, ns (0 for
    /// bare smoltcp, which has no host model).
    pub modeled_host_cpu_ns_per_byte: f64,
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
    /// The emulator's speed: bulk bytes per wall-clock second.
    pub wall_throughput_bytes_per_s: f64,
    /// The emulator's speed: median [`RR_BYTES`] round trip, wall-clock µs.
    pub wall_rr_64b_p50_us: f64,
}

impl SweepPoint {
    /// Receive-side buffer memory high water: anonymous pool plus copy buffer, in bytes.
    pub fn memory_high_water_bytes(&self) -> u64 {
        self.anon_pool_high_water_bytes + self.copy_buffer_high_water_bytes
    }
}

/// Where one line of the sweep reaches its plateau: the smallest W whose modeled throughput
/// is within 10% of the line's best.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Knee {
    /// Configuration label.
    pub config: String,
    /// Mode name.
    pub mode: &'static str,
    /// The knee's W, in bytes.
    pub w: u32,
    /// The line's best modeled throughput, bytes per second.
    pub best_modeled_throughput_bytes_per_s: f64,
}

/// The knee of every (configuration, mode) line of `points` with more than one W, in
/// first-seen order.
pub fn knees(points: &[SweepPoint]) -> Vec<Knee> {
    let mut out: Vec<Knee> = Vec::new();
    for p in points {
        if out.iter().any(|k| k.config == p.config && k.mode == p.mode) {
            continue;
        }
        let mut line: Vec<&SweepPoint> = points
            .iter()
            .filter(|q| q.config == p.config && q.mode == p.mode)
            .collect();
        if line.len() < 2 {
            continue;
        }
        line.sort_by_key(|q| q.w);
        let best = line
            .iter()
            .map(|q| q.modeled_throughput_bytes_per_s)
            .fold(0.0, f64::max);
        if let Some(k) = line
            .iter()
            .find(|q| q.modeled_throughput_bytes_per_s >= 0.9 * best)
        {
            out.push(Knee {
                config: p.config.clone(),
                mode: p.mode,
                w: k.w,
                best_modeled_throughput_bytes_per_s: best,
            });
        }
    }
    out
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

/// The modeled wire of a sweep: `rate_mbit` each direction, no delay or loss.
pub fn sweep_wire(rate_mbit: u64) -> toe_host::wire_opts::WireOptions {
    toe_host::wire_opts::WireOptions {
        impair: toe_nic::impair::ImpairConfig {
            rate_bits_per_s: Some(rate_mbit.saturating_mul(1_000_000).max(1)),
            ..toe_nic::impair::ImpairConfig::default()
        },
        pcap: None,
    }
}

/// Measure one mode at one W under `settings` (labelled `config`).
///
/// # Errors
/// Invalid settings for this W, or a transfer that stalls or loses bytes.
pub fn measure_point(
    o: &SweepOptions,
    config: &str,
    settings: &Settings,
    mode: Mode,
    w: u32,
) -> io::Result<SweepPoint> {
    let settings = settings_with_window(settings, w)?;
    let mut demo = DemoOptions {
        bytes: o.bytes,
        rr_iters: o.rr_iters,
        rr_bytes: RR_BYTES,
        settings,
        seed: o.seed,
        // Named buffers must exceed W for direct placement.
        named_buf_bytes: (2 * w as usize).max(512 << 10),
        modes: vec![mode],
        repeat: 1,
        wire: sweep_wire(o.wire_rate_mbit),
        ..DemoOptions::default()
    };
    let mut p = SweepPoint {
        config: config.to_string(),
        mode: mode.name(),
        w,
        modeled_throughput_bytes_per_s: 0.0,
        modeled_rr_64b_p50_us: 0.0,
        modeled_rr_64b_p99_us: 0.0,
        modeled_rr_64k_p50_us: 0.0,
        modeled_rr_64k_p99_us: 0.0,
        modeled_host_cpu_ns_per_byte: 0.0,
        host_copies_per_byte: 0.0,
        anon_pool_high_water_bytes: 0,
        copy_buffer_high_water_bytes: 0,
        indicate_stalls: 0,
        indicate_acks: 0,
        wall_throughput_bytes_per_s: 0.0,
        wall_rr_64b_p50_us: 0.0,
    };
    if mode == Mode::SmoltcpBare {
        let mut pair = BarePair::with_wire(&demo.settings, o.seed, &demo.wire)?;
        let (elapsed, _) = pair.bulk(o.bytes, o.seed)?;
        p.wall_throughput_bytes_per_s = o.bytes as f64 / elapsed.as_secs_f64().max(1e-9);
        p.modeled_throughput_bytes_per_s = o.bytes as f64 / pair.modeled_seconds.max(1e-9);
    } else {
        let b = toe_bulk(mode, &demo)?;
        p.wall_throughput_bytes_per_s = o.bytes as f64 / b.seconds.max(1e-9);
        p.modeled_throughput_bytes_per_s = o.bytes as f64 / b.modeled.seconds.max(1e-9);
        p.modeled_host_cpu_ns_per_byte = b.modeled.host_cpu_ns_per_byte;
        p.host_copies_per_byte = b.copies;
        p.anon_pool_high_water_bytes = b.anon_high;
        p.copy_buffer_high_water_bytes = b.copy_high;
        p.indicate_stalls = b.stalls;
        p.indicate_acks = b.acks;
    }
    let (wall, modeled) = rr_any(mode, &demo)?;
    let (l, v) = (latency(wall), latency(modeled));
    p.wall_rr_64b_p50_us = l.p50;
    (p.modeled_rr_64b_p50_us, p.modeled_rr_64b_p99_us) = (v.p50, v.p99);
    demo.rr_bytes = RR_LARGE_BYTES;
    demo.rr_iters = (o.rr_iters / 10).max(20);
    let (_, modeled) = rr_any(mode, &demo)?;
    let v = latency(modeled);
    (p.modeled_rr_64k_p50_us, p.modeled_rr_64k_p99_us) = (v.p50, v.p99);
    Ok(p)
}

/// Run the sweep: for each W (outer loop, in order) each mode, then (if asked) the same under
/// the comparison configuration, one [`measure_point`] each. `progress` hears one line per
/// point. Returns `w_values.len() × modes.len()` points per configuration, W-major.
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
    let mut configs = vec![(BASE, &o.settings)];
    if let Some((label, s)) = &o.compare {
        configs.push((label.as_str(), s));
    }
    let total = o.w_values.len() * o.modes.len() * configs.len();
    let mut points = Vec::with_capacity(total);
    for &w in &o.w_values {
        for &mode in &o.modes {
            for &(config, settings) in &configs {
                let p = measure_point(o, config, settings, mode, w)?;
                progress(&format!(
                    "[{}/{}] {config} W {:>9} {:<16} modeled {:>8.1} MB/s rr64 p99 {:>6.1} us rr64K p99 {:>7.1} us cpu {:.3} ns/B  copies/B {:.2}  mem-hw {}  (wall {:.1} MB/s)",
                    points.len() + 1,
                    total,
                    format_bytes(f64::from(w)),
                    p.mode,
                    p.modeled_throughput_bytes_per_s / 1e6,
                    p.modeled_rr_64b_p99_us,
                    p.modeled_rr_64k_p99_us,
                    p.modeled_host_cpu_ns_per_byte,
                    p.host_copies_per_byte,
                    format_bytes(p.memory_high_water_bytes() as f64),
                    p.wall_throughput_bytes_per_s / 1e6,
                ));
                points.push(p);
            }
        }
    }
    Ok(points)
}

/// The columns of a sweep's table (text and HTML): modeled figures first, the emulator's
/// wall-clock speed last.
pub const SWEEP_COLUMNS: [&str; 15] = [
    "config",
    "W",
    "mode",
    "MB/s",
    "rr64 p50 us",
    "rr64 p99 us",
    "rr64K p50 us",
    "rr64K p99 us",
    "cpu ns/B",
    "copies/B",
    "anon-hw",
    "copy-hw",
    "stalls",
    "acks",
    "wall MB/s",
];

/// The columns of [`SWEEP_COLUMNS`] that hold text (left-aligned).
pub const SWEEP_TEXT_COLUMNS: [usize; 2] = [0, 2];

impl SweepPoint {
    /// This point's cells under [`SWEEP_COLUMNS`].
    pub fn cells(&self) -> [String; 15] {
        [
            self.config.clone(),
            format_bytes(f64::from(self.w)),
            self.mode.to_string(),
            format!("{:.1}", self.modeled_throughput_bytes_per_s / 1e6),
            format!("{:.1}", self.modeled_rr_64b_p50_us),
            format!("{:.1}", self.modeled_rr_64b_p99_us),
            format!("{:.1}", self.modeled_rr_64k_p50_us),
            format!("{:.1}", self.modeled_rr_64k_p99_us),
            format!("{:.3}", self.modeled_host_cpu_ns_per_byte),
            format!("{:.2}", self.host_copies_per_byte),
            format_bytes(self.anon_pool_high_water_bytes as f64),
            format_bytes(self.copy_buffer_high_water_bytes as f64),
            self.indicate_stalls.to_string(),
            self.indicate_acks.to_string(),
            format!("{:.1}", self.wall_throughput_bytes_per_s / 1e6),
        ]
    }
}

/// A readable table of `points`, one row per point in the given order ([`SWEEP_COLUMNS`]);
/// then the knee of each line.
pub fn sweep_table(points: &[SweepPoint]) -> String {
    let rows: Vec<[String; 15]> = points.iter().map(SweepPoint::cells).collect();
    let mut width = SWEEP_COLUMNS.map(str::len);
    for r in &rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i > 0 {
                l.push(' ');
            }
            if SWEEP_TEXT_COLUMNS.contains(&i) {
                l.push_str(&format!("{c:<w$}", w = width[i]));
            } else {
                l.push_str(&format!("{c:>w$}", w = width[i]));
            }
        }
        l.trim_end().to_string() + "\n"
    };
    let mut s = line(&SWEEP_COLUMNS.map(String::from));
    for r in &rows {
        s.push_str(&line(r));
    }
    for k in knees(points) {
        s.push_str(&format!(
            "knee: {} {} at W = {} (90% of its best, {:.1} MB/s modeled)\n",
            k.config,
            k.mode,
            format_bytes(f64::from(k.w)),
            k.best_modeled_throughput_bytes_per_s / 1e6
        ));
    }
    s
}

/// File names [`write_sweep`] writes, in order.
pub const SWEEP_FILES: [&str; 6] = [
    "sweep.json",
    "sweep-throughput.svg",
    "sweep-rr-p99.svg",
    "sweep-copies.svg",
    "sweep-cpu.svg",
    "sweep-memory.svg",
];

/// One line per (configuration, mode) (in first-seen order) of `f(point)` against W;
/// the comparison configuration's lines dashed.
fn per_mode(points: &[SweepPoint], f: impl Fn(&SweepPoint) -> f64) -> Vec<Series> {
    let name = |p: &SweepPoint| {
        if p.config == BASE {
            p.mode.to_string()
        } else {
            format!("{} ({})", p.mode, p.config)
        }
    };
    let mut out: Vec<Series> = Vec::new();
    for p in points {
        let xy = (f64::from(p.w), f(p));
        let n = name(p);
        match out.iter_mut().find(|s| s.name == n) {
            Some(s) => s.points.push(xy),
            None if p.config == BASE => out.push(Series::line(n, vec![xy])),
            None => out.push(Series::dashed(n, vec![xy])),
        }
    }
    for s in &mut out {
        s.points.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    out
}

/// The sweep's charts: (file name, chart), in [`SWEEP_FILES`] order after the JSON.
pub fn sweep_charts(points: &[SweepPoint]) -> Vec<(&'static str, Chart)> {
    let w_axis = || {
        Axis::new(
            "indicate window W (bytes, log2 scale)",
            Scale::Log2,
            Ticks::Bytes,
        )
    };
    let mut charts = Vec::new();
    let mut c = Chart::new(
        "Bulk throughput against W (modeled time; dotted: knees)",
        w_axis(),
        Axis::new("throughput (MB/s, modeled)", Scale::Linear, Ticks::Plain),
    );
    c.series = per_mode(points, |p| p.modeled_throughput_bytes_per_s / 1e6);
    for k in knees(points) {
        let top = k.best_modeled_throughput_bytes_per_s / 1e6;
        c.series.push(Series::dashed(
            format!(
                "knee {} ({}): {}",
                k.mode,
                k.config,
                format_bytes(f64::from(k.w))
            ),
            vec![(f64::from(k.w), 0.0), (f64::from(k.w), top)],
        ));
    }
    charts.push((SWEEP_FILES[1], c));

    let mut c = Chart::new(
        format!(
            "Request/response p99 against W ({RR_BYTES} B and {} each way; modeled)",
            format_bytes(RR_LARGE_BYTES as f64)
        ),
        w_axis(),
        Axis::new("round trip p99 (µs, modeled)", Scale::Linear, Ticks::Plain),
    );
    let mut small = per_mode(points, |p| p.modeled_rr_64b_p99_us);
    for s in &mut small {
        s.name = format!("{} {RR_BYTES} B", s.name);
    }
    let mut large = per_mode(points, |p| p.modeled_rr_64k_p99_us);
    for s in &mut large {
        s.name = format!("{} 64 KiB", s.name);
    }
    c.series = small.into_iter().chain(large).collect();
    charts.push((SWEEP_FILES[2], c));

    let mut c = Chart::new(
        "Host copies per received byte against W",
        w_axis(),
        Axis::new("copies per byte (counted)", Scale::Linear, Ticks::Plain),
    );
    c.series = per_mode(points, |p| p.host_copies_per_byte);
    charts.push((SWEEP_FILES[3], c));

    let mut c = Chart::new(
        "Receiving host's CPU per byte against W (cost model)",
        w_axis(),
        Axis::new(
            "host CPU (ns per byte, modeled)",
            Scale::Linear,
            Ticks::Plain,
        ),
    );
    c.series = per_mode(points, |p| p.modeled_host_cpu_ns_per_byte);
    charts.push((SWEEP_FILES[4], c));

    let mut c = Chart::new(
        "Receive buffer memory high water against W",
        w_axis(),
        Axis::new(
            "anonymous pool + copy buffer high water (bytes, log2 scale)",
            Scale::Log2,
            Ticks::Bytes,
        ),
    );
    c.series = per_mode(points, |p| p.memory_high_water_bytes().max(1) as f64);
    let mut ws: Vec<f64> = points.iter().map(|p| f64::from(p.w)).collect();
    ws.sort_by(f64::total_cmp);
    ws.dedup();
    c.series.push(Series::dashed(
        "= W (reference)",
        ws.into_iter().map(|w| (w, w)).collect(),
    ));
    charts.push((SWEEP_FILES[5], c));
    charts
}

/// The JSON document of a sweep: units, the machine (cost model and wire), the points and
/// the knees.
pub fn sweep_json(o: &SweepOptions, points: &[SweepPoint]) -> serde_json::Value {
    let mut configs = serde_json::Map::new();
    configs.insert(BASE.into(), o.settings.cost_model_json());
    if let Some((label, s)) = &o.compare {
        configs.insert(label.clone(), s.cost_model_json());
    }
    serde_json::json!({
        "units": {
            "w": "bytes",
            "modeled_throughput_bytes_per_s": "bytes per second of modeled (virtual) time",
            "modeled_rr_64b_p50_us": "modeled microseconds",
            "modeled_rr_64b_p99_us": "modeled microseconds",
            "modeled_rr_64k_p50_us": "modeled microseconds",
            "modeled_rr_64k_p99_us": "modeled microseconds",
            "modeled_host_cpu_ns_per_byte": "modeled host CPU nanoseconds per received byte",
            "host_copies_per_byte": "host copies per received byte (counted)",
            "anon_pool_high_water_bytes": "bytes",
            "copy_buffer_high_water_bytes": "bytes",
            "wall_throughput_bytes_per_s": "the emulator's speed: bytes per wall-clock second",
            "wall_rr_64b_p50_us": "the emulator's speed: wall-clock microseconds",
        },
        "machine": {
            "wire_rate_mbit": o.wire_rate_mbit,
            "cost_model": configs,
        },
        "points": points,
        "knees": knees(points),
    })
}

/// Write a sweep into directory `dir` (created if missing): `sweep.json` ([`sweep_json`])
/// and the SVG charts of [`sweep_charts`]. Returns the paths written, in [`SWEEP_FILES`]
/// order.
///
/// # Errors
/// The directory or a file cannot be written.
pub fn write_sweep(
    dir: &Path,
    o: &SweepOptions,
    points: &[SweepPoint],
) -> io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut paths = vec![dir.join(SWEEP_FILES[0])];
    let text = serde_json::to_string_pretty(&sweep_json(o, points)).map_err(io::Error::other)?;
    std::fs::write(&paths[0], text + "\n")?;
    for (name, chart) in sweep_charts(points) {
        let path = dir.join(name);
        write_svg(&path, &chart)?;
        paths.push(path);
    }
    Ok(paths)
}
