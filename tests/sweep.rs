//! `toemu_lab::sweep` and `toemu_lab::plot`: a small W sweep writes a well-formed table, JSON and SVG
//! charts; the P/I timeline of a slow receiver keeps P within W and is drawn.

use std::path::{Path, PathBuf};

use toe_host::config::Settings;
use toemu_lab::demo::Mode;
use toemu_lab::plot::{sample_timeline, timeline_demo, timeline_samples};
use toemu_lab::sweep::{parse_w_range, run_sweep, sweep_table, write_sweep, SweepOptions};

/// A fresh scratch directory under the target directory's tmp (removed first).
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn assert_svg(path: &Path) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(
        text.trim_start().starts_with("<svg"),
        "{}: not an SVG",
        path.display()
    );
    assert!(
        text.trim_end().ends_with("</svg>"),
        "{}: truncated",
        path.display()
    );
    assert!(
        text.contains("<polyline") || text.contains("<path"),
        "{}: no line drawn",
        path.display()
    );
}

#[test]
fn w_ranges_parse() {
    assert_eq!(
        parse_w_range("1KiB..4MiB").unwrap(),
        (10..=22).map(|e| 1u32 << e).collect::<Vec<_>>()
    );
    assert_eq!(parse_w_range("4KiB,64KiB").unwrap(), vec![4096, 65536]);
    assert_eq!(parse_w_range(" 16k ").unwrap(), vec![16384]);
    assert_eq!(parse_w_range("8KiB..8KiB").unwrap(), vec![8192]);
    assert_eq!(
        parse_w_range("1KiB..=4KiB").unwrap(),
        vec![1024, 2048, 4096]
    );
    for bad in [
        "",
        "0",
        "3KiB..4MiB",
        "4MiB..1KiB",
        "1KiB..",
        "2GiB",
        "4KiB,,8KiB",
        "x",
    ] {
        assert!(parse_w_range(bad).is_err(), "{bad:?} accepted");
    }
}

#[test]
fn small_sweep_writes_table_json_and_svgs() {
    let w_values = parse_w_range("16KiB,256KiB").unwrap();
    let modes = vec![Mode::IndicateWindow, Mode::MssHoldoff];
    let o = SweepOptions {
        w_values: w_values.clone(),
        modes: modes.clone(),
        bytes: 4 << 20,
        rr_iters: 200,
        settings: Settings::default(),
        seed: 7,
    };
    let mut lines = Vec::new();
    let points = run_sweep(&o, |l| lines.push(l.to_string())).unwrap();
    assert_eq!(points.len(), w_values.len() * modes.len());
    assert_eq!(lines.len(), points.len());
    for p in &points {
        assert!(p.throughput_bytes_per_s > 0.0, "{p:?}");
        assert!(p.rr_p50_us > 0.0 && p.rr_p99_us >= p.rr_p50_us, "{p:?}");
        assert!(p.host_copies_per_byte >= 1.0, "{p:?}");
    }
    // The indicate window bounds the anonymous memory: at most W, plus one partly used buffer.
    let anon_buf = u64::from(Settings::default().anon_buf_bytes);
    let iw: Vec<_> = points
        .iter()
        .filter(|p| p.mode == "indicate-window")
        .collect();
    assert_eq!(iw.len(), 2);
    for p in &iw {
        assert!(
            p.anon_pool_high_water_bytes <= u64::from(p.w_bytes) + anon_buf,
            "{p:?}"
        );
        assert!(p.anon_pool_high_water_bytes > 0, "{p:?}");
    }
    assert!(
        iw[1].anon_pool_high_water_bytes > iw[0].anon_pool_high_water_bytes,
        "anonymous high water does not grow with W: {iw:?}"
    );

    let table = sweep_table(&points);
    eprintln!("{table}");
    assert_eq!(table.lines().count(), points.len() + 1);
    assert!(table.contains("indicate-window") && table.contains("mss-holdoff"));

    let dir = scratch("sweep");
    let files = write_sweep(&dir, &points).unwrap();
    assert_eq!(files.len(), 4);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&files[0]).unwrap()).unwrap();
    let arr = json["points"].as_array().unwrap();
    assert_eq!(arr.len(), points.len());
    for (j, p) in arr.iter().zip(&points) {
        assert_eq!(j["mode"], p.mode);
        assert_eq!(j["w_bytes"], p.w_bytes);
        for key in [
            "throughput_bytes_per_s",
            "rr_p50_us",
            "rr_p99_us",
            "host_copies_per_byte",
            "anon_pool_high_water_bytes",
            "copy_buffer_high_water_bytes",
            "indicate_stalls",
            "indicate_acks",
        ] {
            assert!(j[key].is_number(), "{key} missing in {j}");
        }
    }
    for svg in &files[1..] {
        assert_svg(svg);
        let text = std::fs::read_to_string(svg).unwrap();
        // One line per mode, and a legend naming each.
        for m in &modes {
            assert!(
                text.contains(m.name()),
                "{}: no {}",
                svg.display(),
                m.name()
            );
        }
        assert!(text.contains("KiB"), "{}: W ticks", svg.display());
    }
}

#[test]
fn timeline_keeps_p_within_w() {
    let mut s = Settings::default();
    s.apply_override("indicate_window_bytes", "64KiB").unwrap();
    s.validate().unwrap();
    let w = u64::from(s.indicate_window_bytes);
    let samples = timeline_samples(&s, 2 << 20, 3).unwrap();
    assert!(samples.len() > 10, "{} samples", samples.len());
    assert!(samples.iter().all(|&(_, p, _)| p <= w), "P above W");
    assert!(samples.iter().all(|&(_, _, i)| i <= w), "I above W");
    // The slow receiver lets the window fill: P reaches W, or comes within one anonymous
    // buffer of it when the connection's buffer share (W / anon_buf_bytes buffers) is used up
    // first because PSH boundaries cut some chunks short.
    let anon = u64::from(s.anon_buf_bytes);
    assert!(
        samples.iter().any(|&(_, p, _)| p + anon > w),
        "the slow receiver never let P reach W"
    );
    assert!(
        samples.windows(2).all(|v| v[0].0 <= v[1].0),
        "time runs backwards"
    );
    assert!(
        samples
            .windows(2)
            .all(|v| (v[0].1, v[0].2) != (v[1].1, v[1].2)),
        "a sample without a change"
    );
    // Slow receiver: W/2 per millisecond of virtual time, so 2 MiB takes at least 64 ms.
    let end = samples.last().unwrap().0;
    assert!(end >= 60.0, "transfer over at {end} ms");

    let dir = scratch("timeline");
    let path = dir.join("timeline.svg");
    let n = timeline_demo(&s, 2 << 20, 3, &path).unwrap();
    assert_eq!(n, samples.len(), "same seed, same samples");
    assert_svg(&path);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("W = 64 KiB"));
}

#[test]
fn sampler_records_only_changes() {
    let s = Settings::default();
    let (sim, _ca, cb) = toe_host::pair::connected_pair(&s, 1, 5010).unwrap();
    let mut samples = Vec::new();
    for _ in 0..5 {
        sample_timeline(&sim, 1, cb, &mut samples);
    }
    assert_eq!(
        samples,
        vec![(sim.now().total_micros() as f64 / 1000.0, 0, 0)]
    );
}

#[test]
fn bare_baseline_point_has_no_offload_counters() {
    let o = SweepOptions {
        bytes: 1 << 20,
        rr_iters: 50,
        ..SweepOptions::default()
    };
    let p = toemu_lab::sweep::measure_point(&o, Mode::SmoltcpBare, 64 << 10).unwrap();
    assert_eq!(p.mode, "smoltcp-bare");
    assert!(p.throughput_bytes_per_s > 0.0 && p.rr_p50_us > 0.0, "{p:?}");
    assert_eq!(p.memory_high_water_bytes(), 0);
}
