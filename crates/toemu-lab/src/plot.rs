//! SVG charts (plotters' SVG backend): the line charts of `toemu sweep` and the P/I timeline of
//! one connection.
//!
//! - [`Chart`] / [`write_svg`]: one or more named line series against a linear or log2 axis,
//!   with a legend, axis labels and optional horizontal reference lines.
//! - [`sample_timeline`]: records the NIC's counter P and the driver's counter I of one
//!   connection as they change on the virtual clock; [`timeline_svg`] draws them;
//!   [`timeline_demo`] runs a transfer with a slow receiver and does both.

use std::io;
use std::path::Path;

use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint};
use plotters::prelude::*;
use toe_bus::time::Instant as SmolInstant;
use toe_bus::ConnId;

use crate::demo::Sender;
use toe_host::config::Settings;
use toe_host::runtime::Sim;

/// How an axis maps values to positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    /// Proportional; ticks at round numbers.
    Linear,
    /// Logarithmic, base 2; ticks at powers of two. Values <= 0 are drawn at the axis floor.
    Log2,
}

/// How tick labels are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ticks {
    /// The number itself (`12`, `0.5`, `3500`).
    Plain,
    /// A byte count with a binary unit (`512 B`, `64 KiB`, `4 MiB`).
    Bytes,
}

/// One axis of a [`Chart`].
#[derive(Debug, Clone)]
pub struct Axis {
    /// Axis description, with its unit, e.g. `"W (bytes, log2)"`.
    pub label: String,
    /// Linear or log2.
    pub scale: Scale,
    /// Tick label format.
    pub ticks: Ticks,
}

impl Axis {
    /// An axis labelled `label` with `scale` and `ticks`.
    pub fn new(label: impl Into<String>, scale: Scale, ticks: Ticks) -> Self {
        Axis {
            label: label.into(),
            scale,
            ticks,
        }
    }
}

/// How a [`Series`] is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// Straight segments between the points, each point marked.
    Line,
    /// Step line: each value holds until the next point; no markers.
    Steps,
    /// Dashed straight segments, no markers (reference lines).
    Dashed,
}

/// One named line of a [`Chart`].
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend text.
    pub name: String,
    /// (x, y) points in the axes' units, in drawing order.
    pub points: Vec<(f64, f64)>,
    /// How the points are joined.
    pub style: Style,
    /// Stroke width, in pixels.
    pub width: u32,
}

impl Series {
    /// A straight-segment series with point markers, 2 pixels wide.
    pub fn line(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Series {
            name: name.into(),
            points,
            style: Style::Line,
            width: 2,
        }
    }

    /// A step series (value held until the next point), 2 pixels wide.
    pub fn steps(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Series {
            style: Style::Steps,
            ..Series::line(name, points)
        }
    }

    /// A dashed reference series, 1 pixel wide.
    pub fn dashed(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Series {
            style: Style::Dashed,
            width: 1,
            ..Series::line(name, points)
        }
    }

    /// The same series with stroke width `px` pixels.
    pub fn with_width(mut self, px: u32) -> Self {
        self.width = px;
        self
    }
}

/// A line chart: title, two axes, series and horizontal reference lines.
#[derive(Debug, Clone)]
pub struct Chart {
    /// Caption above the plot.
    pub title: String,
    /// Horizontal axis.
    pub x: Axis,
    /// Vertical axis.
    pub y: Axis,
    /// Lines, one legend entry each.
    pub series: Vec<Series>,
    /// Horizontal dashed reference lines: (legend text, y in the y axis' units).
    pub hlines: Vec<(String, f64)>,
    /// Size of the SVG, in pixels (width, height).
    pub size: (u32, u32),
}

impl Chart {
    /// An empty 960 × 600 pixel chart.
    pub fn new(title: impl Into<String>, x: Axis, y: Axis) -> Self {
        Chart {
            title: title.into(),
            x,
            y,
            series: Vec::new(),
            hlines: Vec::new(),
            size: (960, 600),
        }
    }
}

/// Line colours, in series order (then repeated).
const PALETTE: [RGBColor; 8] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0xe3, 0x77, 0xc2),
    RGBColor(0x17, 0xbe, 0xcf),
];

/// `n` bytes with a binary unit: `512 B`, `64 KiB`, `1.5 MiB`, `4 GiB`.
pub fn format_bytes(n: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n;
    let mut u = 0;
    while v.abs() >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if (v - v.round()).abs() < 1e-9 {
        format!("{} {}", v.round() as i64, UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn format_plain(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        trim_zeros(format!("{v:.1}"))
    } else if a >= 0.01 {
        trim_zeros(format!("{v:.2}"))
    } else {
        format!("{v:.1e}")
    }
}

fn trim_zeros(s: String) -> String {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// Axis range and ticks in drawing space (log2 of the value for a log2 axis).
struct Span {
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
    /// Value drawn for y <= 0 on a log2 axis (drawing space).
    floor: f64,
}

/// A "nice" tick step (1, 2 or 5 × 10^k) giving about `want` intervals over `range`.
fn nice_step(range: f64, want: f64) -> f64 {
    let raw = (range / want).max(f64::MIN_POSITIVE);
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let m = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    m * mag
}

/// `headroom`: leave about a quarter of the axis above the largest value (room for the legend).
fn span(axis: &Axis, values: &[f64], headroom: bool) -> Span {
    match axis.scale {
        Scale::Linear => {
            let mut lo = values.iter().copied().fold(f64::INFINITY, f64::min);
            let mut hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            if !lo.is_finite() || !hi.is_finite() {
                (lo, hi) = (0.0, 1.0);
            }
            // Quantities here are non-negative: start at zero so lines compare by height.
            lo = lo.min(0.0);
            if hi <= lo {
                hi = lo + 1.0;
            }
            if headroom {
                hi += (hi - lo) / 3.0;
            }
            let step = match axis.ticks {
                Ticks::Plain => nice_step(hi - lo, 8.0),
                // Powers of two: ticks at round binary sizes.
                Ticks::Bytes => ((hi - lo) / 8.0).max(1.0).log2().ceil().exp2(),
            };
            let lo = (lo / step).floor() * step;
            let hi = (hi / step).ceil() * step;
            let hi = if hi <= lo { lo + step } else { hi };
            let n = ((hi - lo) / step).round() as usize;
            let ticks = (0..=n).map(|i| lo + i as f64 * step).collect();
            Span {
                lo,
                hi: hi + step * 0.02,
                ticks,
                floor: lo,
            }
        }
        Scale::Log2 => {
            let pos: Vec<f64> = values
                .iter()
                .copied()
                .filter(|v| *v > 0.0 && v.is_finite())
                .map(f64::log2)
                .collect();
            let (mut lo, mut hi) = if pos.is_empty() {
                (0.0, 1.0)
            } else {
                (
                    pos.iter().copied().fold(f64::INFINITY, f64::min).floor(),
                    pos.iter().copied().fold(f64::NEG_INFINITY, f64::max).ceil(),
                )
            };
            // Zero values get a row of their own, one step below the smallest positive one.
            let has_zero = values.iter().any(|v| *v <= 0.0);
            if has_zero {
                lo -= 1.0;
            }
            if hi <= lo {
                hi = lo + 1.0;
            }
            if headroom {
                hi += ((hi - lo) / 4.0).ceil();
            }
            let stride = ((hi - lo) / 12.0).ceil().max(1.0) as i64;
            let ticks = (lo as i64..=hi as i64)
                .filter(|e| (e - lo as i64) % stride == 0)
                .map(|e| e as f64)
                .collect();
            Span {
                lo: lo - 0.25,
                hi: hi + 0.25,
                ticks,
                floor: lo,
            }
        }
    }
}

/// A linear coordinate with exactly the given tick positions (plotters' own f64 ranges choose
/// their ticks themselves).
struct TickedAxis {
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
}

impl From<&Span> for TickedAxis {
    fn from(s: &Span) -> Self {
        TickedAxis {
            lo: s.lo,
            hi: s.hi,
            ticks: s.ticks.clone(),
        }
    }
}

impl Ranged for TickedAxis {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, v: &f64, limit: (i32, i32)) -> i32 {
        let frac = (v - self.lo) / (self.hi - self.lo);
        let len = f64::from(limit.1 - limit.0);
        limit.0 + (len * frac).round() as i32
    }

    fn key_points<H: KeyPointHint>(&self, hint: H) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            return Vec::new();
        }
        let max = hint.max_num_points().max(2);
        let stride = self.ticks.len().div_ceil(max).max(1);
        self.ticks.iter().copied().step_by(stride).collect()
    }

    fn range(&self) -> std::ops::Range<f64> {
        self.lo..self.hi
    }
}

fn to_draw(scale: Scale, v: f64, floor: f64) -> f64 {
    match scale {
        Scale::Linear => v,
        Scale::Log2 if v > 0.0 => v.log2(),
        Scale::Log2 => floor,
    }
}

fn tick_label(axis: &Axis, v: f64, log_floor: Option<f64>) -> String {
    let value = match axis.scale {
        Scale::Linear => v,
        Scale::Log2 => {
            if log_floor.is_some_and(|f| (v - f).abs() < 1e-9) {
                return "0".into();
            }
            v.exp2()
        }
    };
    match axis.ticks {
        Ticks::Plain => format_plain(value),
        Ticks::Bytes => format_bytes(value),
    }
}

fn draw_err<E: std::error::Error + Send + Sync>(e: DrawingAreaErrorKind<E>) -> io::Error {
    io::Error::other(format!("drawing SVG: {e}"))
}

/// Draw `chart` into the SVG file `path` (created or replaced).
///
/// # Errors
/// The file cannot be written.
pub fn write_svg(path: &Path, chart: &Chart) -> io::Result<()> {
    let xs: Vec<f64> = chart
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .collect();
    let mut ys: Vec<f64> = chart
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .collect();
    ys.extend(chart.hlines.iter().map(|h| h.1));
    let xspan = span(&chart.x, &xs, false);
    let yspan = span(&chart.y, &ys, true);
    let x_zero =
        (chart.x.scale == Scale::Log2 && xs.iter().any(|v| *v <= 0.0)).then_some(xspan.floor);
    let y_zero =
        (chart.y.scale == Scale::Log2 && ys.iter().any(|v| *v <= 0.0)).then_some(yspan.floor);
    let (xscale, yscale) = (chart.x.scale, chart.y.scale);
    let (xfloor, yfloor) = (xspan.floor, yspan.floor);
    let pt = |(x, y): (f64, f64)| (to_draw(xscale, x, xfloor), to_draw(yscale, y, yfloor));

    let root = SVGBackend::new(path, chart.size).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err)?;
    let mut ctx = ChartBuilder::on(&root)
        .caption(&chart.title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(56)
        .y_label_area_size(90)
        .build_cartesian_2d(TickedAxis::from(&xspan), TickedAxis::from(&yspan))
        .map_err(draw_err)?;
    let xfmt = |v: &f64| tick_label(&chart.x, *v, x_zero);
    let yfmt = |v: &f64| tick_label(&chart.y, *v, y_zero);
    ctx.configure_mesh()
        .x_desc(chart.x.label.as_str())
        .y_desc(chart.y.label.as_str())
        .x_label_formatter(&xfmt)
        .y_label_formatter(&yfmt)
        .axis_desc_style(("sans-serif", 16))
        .label_style(("sans-serif", 13))
        .light_line_style(WHITE)
        .bold_line_style(BLACK.mix(0.12))
        .draw()
        .map_err(draw_err)?;

    for (i, s) in chart.series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let style = color.stroke_width(s.width);
        let mut pts: Vec<(f64, f64)> = Vec::with_capacity(s.points.len() * 2);
        for &p in &s.points {
            let p = pt(p);
            if s.style == Style::Steps {
                if let Some(&(_, prev_y)) = pts.last() {
                    pts.push((p.0, prev_y));
                }
            }
            pts.push(p);
        }
        let legend = move |(x, y): (i32, i32)| PathElement::new(vec![(x, y), (x + 24, y)], style);
        if s.style == Style::Dashed {
            ctx.draw_series(DashedLineSeries::new(pts, 8, 5, style))
                .map_err(draw_err)?
                .label(s.name.as_str())
                .legend(legend);
            continue;
        }
        ctx.draw_series(LineSeries::new(pts.clone(), style))
            .map_err(draw_err)?
            .label(s.name.as_str())
            .legend(legend);
        if s.style == Style::Line {
            ctx.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(draw_err)?;
        }
    }
    for (name, y) in &chart.hlines {
        let y = to_draw(yscale, *y, yfloor);
        let style = BLACK.mix(0.7).stroke_width(1);
        ctx.draw_series(DashedLineSeries::new(
            vec![(xspan.lo, y), (xspan.hi, y)],
            8,
            5,
            style,
        ))
        .map_err(draw_err)?
        .label(name.as_str())
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], style));
    }
    ctx.configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.5))
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(draw_err)?;
    root.present().map_err(draw_err)?;
    Ok(())
}

/// One timeline sample: (virtual time in milliseconds, P in bytes, I in bytes).
pub type TimelineSample = (f64, u64, u64);

/// Draw the P and I step lines of `samples` (as [`sample_timeline`] records them) against
/// virtual time into the SVG file `path`, with a dashed horizontal line at the window
/// `window` (W, in bytes).
///
/// # Errors
/// The file cannot be written.
pub fn timeline_svg(
    path: &Path,
    title: &str,
    samples: &[TimelineSample],
    window: u64,
) -> io::Result<()> {
    let mut chart = Chart::new(
        title,
        Axis::new("virtual time (ms)", Scale::Linear, Ticks::Plain),
        Axis::new("bytes", Scale::Linear, Ticks::Bytes),
    );
    // P is drawn wide and underneath, so that it shows where I runs along it.
    chart.series.push(
        Series::steps(
            "P: bytes indicated, not yet acknowledged (NIC)",
            samples.iter().map(|s| (s.0, s.1 as f64)).collect(),
        )
        .with_width(6),
    );
    chart.series.push(Series::steps(
        "I: bytes indicated in this window (driver)",
        samples.iter().map(|s| (s.0, s.2 as f64)).collect(),
    ));
    chart.hlines.push((
        format!("W = {}", format_bytes(window as f64)),
        window as f64,
    ));
    write_svg(path, &chart)
}

/// P and I of connection `conn` on host `host` now: P from the NIC's offload state, I from
/// the driver's connection info (0 for a connection that is gone).
pub fn pending_and_indicated(sim: &Sim, host: usize, conn: ConnId) -> (u64, u64) {
    let p = sim.with_host(host, |h| {
        h.nic
            .offload_state(conn)
            .map(|(p, _, _)| u64::from(p))
            .unwrap_or(0)
    });
    let i = sim
        .driver(host)
        .lock()
        .conn_info(conn)
        .map(|c| u64::from(c.indicated))
        .unwrap_or(0);
    (p, i)
}

/// Append a sample (virtual time in ms, P, I) of connection `conn` on host `host` to
/// `samples` if P or I changed since the last sample (or `samples` is empty). Call it after
/// every simulation step.
pub fn sample_timeline(sim: &Sim, host: usize, conn: ConnId, samples: &mut Vec<TimelineSample>) {
    let (p, i) = pending_and_indicated(sim, host, conn);
    if samples.last().is_some_and(|s| s.1 == p && s.2 == i) {
        return;
    }
    let ms = sim.now().total_micros() as f64 / 1000.0;
    samples.push((ms, p, i));
}

/// How often the slow receiver of [`timeline_demo`] wakes, in virtual microseconds.
pub const TIMELINE_RECEIVER_TICK_US: u64 = 1000;

/// Run one `indicate-window` transfer of `bytes` (seeded with `seed`) from host 0 to host 1
/// with `settings` (its W, ack policy...; the policy is forced to `indicate-window`) and a
/// slow receiver that accepts at most W/2 bytes in place per wake-up, waking every
/// [`TIMELINE_RECEIVER_TICK_US`] of virtual time. P and I of the receiving connection are
/// sampled after every step and drawn into the SVG file `path` ([`timeline_svg`]).
/// Returns the number of samples drawn.
///
/// The hosts are [`toe_host::pair::connected_pair`]'s; the receiver's wake-up bounds every step
/// ([`Sim::step_bounded`]), so an idle clock jump lands on it, never past it.
///
/// # Errors
/// The hosts cannot be built, the transfer stalls or loses bytes, or the file cannot be
/// written.
pub fn timeline_demo(settings: &Settings, bytes: u64, seed: u64, path: &Path) -> io::Result<usize> {
    let samples = timeline_samples(settings, bytes, seed)?;
    let w = u64::from(settings.indicate_window_bytes);
    let title = format!(
        "P and I of one connection: {} at W = {}, receiver accepts W/2 per {} ms",
        format_bytes(bytes as f64),
        format_bytes(w as f64),
        TIMELINE_RECEIVER_TICK_US as f64 / 1000.0
    );
    timeline_svg(path, &title, &samples, w)?;
    Ok(samples.len())
}

/// The samples [`timeline_demo`] draws: (virtual ms, P bytes, I bytes) at every change, in
/// time order.
///
/// # Errors
/// As [`timeline_demo`], without the file.
pub fn timeline_samples(
    settings: &Settings,
    bytes: u64,
    seed: u64,
) -> io::Result<Vec<TimelineSample>> {
    let mut s = settings.clone();
    s.policy = toe_bus::RxPolicy::IndicateWindow;
    let per_wake = (s.indicate_window_bytes as usize / 2).max(1);
    let (sim, ca, cb) = toe_host::pair::connected_pair(&s, seed, 5003)?;
    let (da, db) = (sim.driver(0), sim.driver(1));
    let mut tx = Sender::new(&da.lock(), ca, seed, bytes, 4, 256 << 10)?;
    let tick = TIMELINE_RECEIVER_TICK_US as i64;
    let mut next_wake = sim.now().total_micros();
    let mut received = 0u64;
    let mut samples = Vec::new();
    sample_timeline(&sim, 1, cb, &mut samples);
    // Wake-ups in a row at which nothing arrived.
    let mut empty_wakes = 0u64;
    loop {
        let now = sim.now();
        if now.total_micros() >= next_wake {
            let mut budget = per_wake;
            let n = db
                .lock()
                .accept_in_place(now, cb, |data| {
                    let k = data.len().min(budget);
                    budget -= k;
                    k
                })
                .map_err(|e| io::Error::other(e.to_string()))?;
            received += n as u64;
            next_wake = now.total_micros() + tick;
            sample_timeline(&sim, 1, cb, &mut samples);
            if db.lock().at_eof(cb).unwrap_or(true) {
                break;
            }
            empty_wakes = if n > 0 { 0 } else { empty_wakes + 1 };
            if empty_wakes > 100_000 {
                return Err(io::Error::other(format!(
                    "timeline transfer stalled at {received} of {bytes} bytes"
                )));
            }
        }
        // The wake-up bounds the step: an idle clock jump lands on it, not past it.
        sim.step_bounded(Some(SmolInstant::from_micros(next_wake)))?;
        tx.service(&mut da.lock())?;
        sample_timeline(&sim, 1, cb, &mut samples);
    }
    db.lock()
        .close(cb)
        .map_err(|e| io::Error::other(e.to_string()))?;
    sim.run_until(1_000_000, || tx.service(&mut da.lock()).unwrap_or(true))?;
    tx.finish(&da.lock());
    if received != bytes {
        return Err(io::Error::other(format!(
            "timeline transfer received {received} of {bytes} bytes"
        )));
    }
    Ok(samples)
}
