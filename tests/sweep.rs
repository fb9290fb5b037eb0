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
        ..SweepOptions::default()
    };
    let mut lines = Vec::new();
    let points = run_sweep(&o, |l| lines.push(l.to_string())).unwrap();
    assert_eq!(points.len(), w_values.len() * modes.len());
    assert_eq!(lines.len(), points.len());
    for p in &points {
        assert!(p.modeled_throughput_bytes_per_s > 0.0, "{p:?}");
        assert!(p.wall_throughput_bytes_per_s > 0.0, "{p:?}");
        assert!(
            p.modeled_rr_64b_p50_us > 0.0 && p.modeled_rr_64b_p99_us >= p.modeled_rr_64b_p50_us,
            "{p:?}"
        );
        assert!(
            p.modeled_rr_64k_p50_us > p.modeled_rr_64b_p50_us,
            "64 KiB takes longer than 64 B: {p:?}"
        );
        assert!(p.host_copies_per_byte >= 1.0, "{p:?}");
        assert!(p.modeled_host_cpu_ns_per_byte > 0.0, "{p:?}");
        assert_eq!(p.config, "base");
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
            p.anon_pool_high_water_bytes <= u64::from(p.w) + anon_buf,
            "{p:?}"
        );
        assert!(p.anon_pool_high_water_bytes > 0, "{p:?}");
    }
    // At 16 KiB the window binds (the NIC stalls at P == W and waits for the bus round
    // trip); at 256 KiB the 25 Gbit/s wire binds and the receiver keeps up, never stalling.
    assert!(iw[0].indicate_stalls > 0, "{iw:?}");
    assert_eq!(iw[1].indicate_stalls, 0, "{iw:?}");
    assert!(
        iw[1].modeled_throughput_bytes_per_s > iw[0].modeled_throughput_bytes_per_s,
        "{iw:?}"
    );

    let table = sweep_table(&points);
    eprintln!("{table}");
    // A header, a row per point, a knee per line.
    assert_eq!(table.lines().count(), 1 + points.len() + modes.len());
    assert!(table.contains("indicate-window") && table.contains("mss-holdoff"));

    let dir = scratch("sweep");
    let files = write_sweep(&dir, &o, &points).unwrap();
    assert_eq!(files.len(), 6);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&files[0]).unwrap()).unwrap();
    let arr = json["points"].as_array().unwrap();
    assert_eq!(arr.len(), points.len());
    for (j, p) in arr.iter().zip(&points) {
        assert_eq!(j["mode"], p.mode);
        assert_eq!(j["w"], p.w);
        for key in [
            "modeled_throughput_bytes_per_s",
            "modeled_rr_64b_p50_us",
            "modeled_rr_64b_p99_us",
            "modeled_rr_64k_p50_us",
            "modeled_rr_64k_p99_us",
            "modeled_host_cpu_ns_per_byte",
            "wall_throughput_bytes_per_s",
            "host_copies_per_byte",
            "anon_pool_high_water_bytes",
            "copy_buffer_high_water_bytes",
            "indicate_stalls",
            "indicate_acks",
        ] {
            assert!(j[key].is_number(), "{key} missing in {j}");
        }
    }
    assert_eq!(json["machine"]["wire_rate_mbit"], 25_000);
    assert_eq!(json["machine"]["cost_model"]["base"]["bus_latency_us"], 1);
    assert_eq!(json["knees"].as_array().unwrap().len(), modes.len());
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
    let p = toemu_lab::sweep::measure_point(&o, "base", &o.settings, Mode::SmoltcpBare, 64 << 10)
        .unwrap();
    assert_eq!(p.mode, "smoltcp-bare");
    assert!(
        p.modeled_throughput_bytes_per_s > 0.0 && p.wall_rr_64b_p50_us > 0.0,
        "{p:?}"
    );
    // The stack alone on the modeled 25 Gbit/s wire: wire-bound.
    assert!(p.modeled_throughput_bytes_per_s > 2.9e9, "{p:?}");
    assert_eq!(p.memory_high_water_bytes(), 0);
    assert_eq!(p.modeled_host_cpu_ns_per_byte, 0.0);
}

/// The check: on the modeled 25 Gbit/s wire with a 2 µs bus and `window-full`
/// acknowledgements, the indicate window at 4 KiB is bus-bound (at most half of what 1 MiB
/// reaches, which is wire-bound), and the one-MSS hold-off is bus-bound at every W. A
/// comparison with a slower bus is measured beside it and is slower where the bus binds.
#[test]
fn the_sweep_shows_the_bus_bound_knee_and_compares_a_second_bus() {
    let mut base = Settings::default();
    base.apply_override("ack", "window-full").unwrap();
    base.apply_override("bus_latency_us", "2").unwrap();
    let mut slow = base.clone();
    slow.apply_override("bus_latency_us", "8").unwrap();
    let o = SweepOptions {
        w_values: parse_w_range("4KiB,64KiB,1MiB").unwrap(),
        modes: vec![Mode::IndicateWindow, Mode::MssHoldoff],
        bytes: 16 << 20,
        rr_iters: 40,
        settings: base,
        compare: Some(("bus_latency_us=8".into(), slow)),
        ..SweepOptions::default()
    };
    let points = run_sweep(&o, |_| {}).unwrap();
    assert_eq!(points.len(), 3 * 2 * 2);
    let at = |config: &str, mode: &str, w: u32| {
        points
            .iter()
            .find(|p| p.config == config && p.mode == mode && p.w == w)
            .unwrap()
            .modeled_throughput_bytes_per_s
    };
    let wire = 25e9 / 8.0;
    let iw_small = at("base", "indicate-window", 4 << 10);
    let iw_large = at("base", "indicate-window", 1 << 20);
    assert!(iw_small <= 0.5 * iw_large, "{iw_small} vs {iw_large}");
    assert!(iw_large > 0.9 * wire, "1 MiB is wire-bound: {iw_large}");
    for w in [4 << 10, 64 << 10, 1 << 20] {
        let m = at("base", "mss-holdoff", w);
        // One MSS (8960 B at MTU 9000) per bus round trip of 4 µs and costs: bus-bound.
        assert!(
            m < 0.8 * wire && m < 8960.0 / 4e-6,
            "mss-holdoff at {w}: {m}"
        );
        assert!(at("bus_latency_us=8", "mss-holdoff", w) < 0.5 * m);
    }
    assert!(at("bus_latency_us=8", "indicate-window", 4 << 10) < 0.5 * iw_small);
    let ks = toemu_lab::sweep::knees(&points);
    let knee = |config: &str| {
        ks.iter()
            .find(|k| k.config == config && k.mode == "indicate-window")
            .unwrap()
            .w
    };
    assert!(knee("base") > 4 << 10, "{ks:?}");
    assert!(knee("bus_latency_us=8") >= knee("base"), "{ks:?}");
    let dir = scratch("sweep-compare");
    let files = write_sweep(&dir, &o, &points).unwrap();
    let svg = std::fs::read_to_string(&files[1]).unwrap();
    assert!(
        svg.contains("indicate-window (bus_latency_us=8)"),
        "overlay drawn"
    );
    // The report: one file with every chart inline, both configurations' settings and
    // every point.
    let report = toemu_lab::report::write_sweep_report(&dir, &o, &points, "toemu sweep").unwrap();
    let html = std::fs::read_to_string(report).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>") && html.trim_end().ends_with("</html>"));
    assert_eq!(
        html.matches("<svg").count(),
        files.len() - 1,
        "every chart inline"
    );
    assert!(
        !html.contains("<img") && !html.contains("href=\"sweep"),
        "self-contained"
    );
    assert!(html.contains("<td class=\"l\">bus_latency_us</td><td class=\"l\">2</td>"));
    assert!(
        html.contains("<td class=\"l\">8</td>"),
        "the comparison's bus latency"
    );
    // A row per base point and a knee per base line.
    assert_eq!(html.matches("<tr><td class=\"l\">base</td>").count(), 6 + 2);
}
