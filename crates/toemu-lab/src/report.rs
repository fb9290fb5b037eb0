//! `toemu sweep --report`: one self-contained HTML page of a sweep (the charts inline, the
//! table, the knees, the settings of every configuration and the machine it ran on), so a
//! run can be shared as a single file.

use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};

use crate::plot::format_bytes;
use crate::sweep::{
    knees, SweepOptions, SweepPoint, SWEEP_COLUMNS, SWEEP_FILES, SWEEP_TEXT_COLUMNS,
};

/// Escape `s` for HTML text and attribute values.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The civil date and time (UTC) of `secs` since the Unix epoch, `YYYY-MM-DD HH:MM:SS`.
fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// What the report says about the machine the emulator ran on.
fn machine_rows() -> Vec<(&'static str, String)> {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let kernel = read("/proc/sys/kernel/osrelease").trim().to_string();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    vec![
        ("generated (UTC)", utc(now)),
        ("toemu", env!("CARGO_PKG_VERSION").to_string()),
        ("CPU", format!("{cpu} ({cpus} available)")),
        (
            "Linux",
            if kernel.is_empty() {
                "unknown".into()
            } else {
                kernel
            },
        ),
    ]
}

/// The report of a sweep as one HTML document. `command` is the command line that ran it;
/// `svgs` are the charts' SVG documents, inlined in order.
pub fn sweep_report(
    o: &SweepOptions,
    points: &[SweepPoint],
    command: &str,
    svgs: &[String],
) -> String {
    let mut h = String::new();
    h.push_str("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n<title>toemu sweep</title>\n<style>\nbody{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}\ntable{border-collapse:collapse;font-size:13px;margin:1em 0}\nth,td{border:1px solid #ccc;padding:2px 6px;text-align:right}\nth{background:#f0f0f0}\ntd.l,th.l{text-align:left}\n.chart{margin:1em 0}\ncode{background:#f4f4f4;padding:1px 4px}\n</style></head><body>\n");
    h.push_str("<h1>toemu sweep: the indicate window W against the modeled machine</h1>\n");
    let _ = writeln!(h, "<p>Command: <code>{}</code></p>", esc(command));
    h.push_str("<p>Every figure but the last column is in <b>modeled time</b>: the virtual clock under the cost model below, on the modeled wire. <i>wall MB/s</i> is the emulator's own speed on this machine, not the modeled machine's. Copies and memory are counted.</p>\n");

    h.push_str("<h2>Charts</h2>\n");
    for svg in svgs {
        let body = svg.find("<svg").map_or(svg.as_str(), |i| &svg[i..]);
        let _ = writeln!(h, "<div class=\"chart\">{body}</div>");
    }

    h.push_str("<h2>Knees</h2>\n<table><tr><th class=\"l\">configuration</th><th class=\"l\">mode</th><th>W (90% of best)</th><th>best MB/s</th></tr>\n");
    for k in knees(points) {
        let _ = writeln!(
            h,
            "<tr><td class=\"l\">{}</td><td class=\"l\">{}</td><td>{}</td><td>{:.1}</td></tr>",
            esc(&k.config),
            k.mode,
            format_bytes(f64::from(k.w)),
            k.best_modeled_throughput_bytes_per_s / 1e6
        );
    }
    h.push_str("</table>\n");

    h.push_str("<h2>Points</h2>\n<table><tr>");
    let class = |i: usize| {
        if SWEEP_TEXT_COLUMNS.contains(&i) {
            " class=\"l\""
        } else {
            ""
        }
    };
    for (i, c) in SWEEP_COLUMNS.iter().enumerate() {
        let _ = write!(h, "<th{}>{}</th>", class(i), esc(c));
    }
    h.push_str("</tr>\n");
    for p in points {
        h.push_str("<tr>");
        for (i, c) in p.cells().iter().enumerate() {
            let _ = write!(h, "<td{}>{}</td>", class(i), esc(c));
        }
        h.push_str("</tr>\n");
    }
    h.push_str("</table>\n");

    h.push_str("<h2>Settings</h2>\n");
    let _ = writeln!(
        h,
        "<p>Modeled wire: {} Mbit/s each direction, no delay or loss. {} bytes per bulk transfer, {} request/response exchanges of 64 B and a tenth as many of 64 KiB per point, seed {}.</p>",
        o.wire_rate_mbit, o.bytes, o.rr_iters, o.seed
    );
    let mut configs = vec![("base".to_string(), &o.settings)];
    if let Some((label, s)) = &o.compare {
        configs.push((label.clone(), s));
    }
    h.push_str("<table><tr><th class=\"l\">setting</th>");
    for (label, _) in &configs {
        let _ = write!(
            h,
            "<th class=\"l\">{}</th><th class=\"l\">from</th>",
            esc(label)
        );
    }
    h.push_str("</tr>\n");
    let tables: Vec<_> = configs.iter().map(|(_, s)| s.table()).collect();
    for (i, (name, _, _)) in tables[0].iter().enumerate() {
        let _ = write!(h, "<tr><td class=\"l\">{name}</td>");
        for t in &tables {
            let _ = write!(
                h,
                "<td class=\"l\">{}</td><td class=\"l\">{}</td>",
                esc(&t[i].1),
                esc(&t[i].2)
            );
        }
        h.push_str("</tr>\n");
    }
    h.push_str("</table>\n<p>W (<code>indicate_window_bytes</code>) is set per point; the policy per mode.</p>\n");

    h.push_str("<h2>Machine the emulator ran on</h2>\n<table>\n");
    for (k, v) in machine_rows() {
        let _ = writeln!(
            h,
            "<tr><td class=\"l\">{k}</td><td class=\"l\">{}</td></tr>",
            esc(&v)
        );
    }
    h.push_str("</table>\n</body></html>\n");
    h
}

/// Write `report.html` into `dir` from a sweep whose charts [`crate::sweep::write_sweep`]
/// already wrote there. Returns its path.
///
/// # Errors
/// A chart cannot be read or the report cannot be written.
pub fn write_sweep_report(
    dir: &Path,
    o: &SweepOptions,
    points: &[SweepPoint],
    command: &str,
) -> io::Result<PathBuf> {
    let svgs = SWEEP_FILES[1..]
        .iter()
        .map(|f| std::fs::read_to_string(dir.join(f)))
        .collect::<io::Result<Vec<_>>>()?;
    let path = dir.join("report.html");
    std::fs::write(&path, sweep_report(o, points, command, &svgs))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_escapes() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(1_796_169_600 + 3661), "2026-12-02 01:01:01");
        assert_eq!(esc("<a & \"b\">"), "&lt;a &amp; &quot;b&quot;&gt;");
    }
}
