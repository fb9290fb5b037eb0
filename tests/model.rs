//! The cost model against closed forms: with every cost zero but the bus latency L and the
//! wire rate R, one connection, the `window-full` acknowledgement policy and an application
//! that accepts at once, the modeled bulk throughput is what the indicate window allows.
//!
//! The NIC indicates W bytes, then waits for the acknowledgement: the indications cross the
//! bus (L), the driver acknowledges at once, the command crosses back (L). Meanwhile the
//! NIC's TCP receive buffer keeps taking data from the wire, so the next W bytes are there
//! when the NIC resumes: serialization overlaps the acknowledgement round trip, and the
//! throughput is W per max(2L, W/G), i.e. `min(G, W / 2L)`, where G is the wire's TCP goodput
//! (R × MSS / frame bytes). (Without that overlap it would be W per 2L + W/R; the NIC's
//! buffer is what removes the serialization term.) The one-MSS hold-off indicates one MSS per
//! round trip whatever W is: `min(G, MSS / 2L)`.

use toe_host::config::Settings;
use toemu_lab::demo::{toe_bulk, DemoOptions, Mode};
use toemu_lab::sweep::{settings_with_window, sweep_wire};

/// `base` with every cost zero but the bus latency `l_us`, the `window-full` policy and MTU
/// `mtu`.
fn ideal(l_us: u64, mtu: u32) -> Settings {
    let mut s = Settings::default().without_costs();
    for (k, v) in [
        ("bus_latency_us", l_us.to_string()),
        ("ack", "window-full".to_string()),
        ("mtu", mtu.to_string()),
    ] {
        s.apply_override(k, &v).unwrap();
    }
    s
}

/// Modeled bulk throughput of `mode` at W `w` on a wire of `rate_mbit`, bytes per second.
fn modeled(mode: Mode, settings: &Settings, w: u32, rate_mbit: u64, bytes: u64) -> f64 {
    let o = DemoOptions {
        bytes,
        settings: settings_with_window(settings, w).unwrap(),
        seed: 3,
        named_buf_bytes: (2 * w as usize).max(512 << 10),
        modes: vec![mode],
        wire: sweep_wire(rate_mbit),
        ..DemoOptions::default()
    };
    let b = toe_bulk(mode, &o).unwrap();
    bytes as f64 / b.modeled.seconds
}

/// TCP goodput of a wire of `rate_mbit` at MTU `mtu`, bytes per second: the payload share
/// of an Ethernet frame (14 bytes of Ethernet header, 40 of IPv4 and TCP).
fn goodput(rate_mbit: u64, mtu: u32) -> f64 {
    let mss = f64::from(mtu - 40);
    rate_mbit as f64 * 1e6 / 8.0 * mss / (f64::from(mtu) + 14.0)
}

fn within(measured: f64, expected: f64, what: &str) {
    let ratio = measured / expected;
    assert!(
        (0.95..=1.05).contains(&ratio),
        "{what}: modeled {:.1} MB/s, closed form {:.1} MB/s (ratio {ratio:.3})",
        measured / 1e6,
        expected / 1e6
    );
}

#[test]
fn indicate_window_throughput_is_w_per_bus_round_trip_up_to_the_wire() {
    let mut checked = 0;
    for (l_us, rate_mbit) in [(1, 25_000), (2, 25_000), (5, 10_000), (2, 40_000)] {
        let s = ideal(l_us, 9000);
        for w in [2u32 << 10, 4 << 10, 16 << 10, 64 << 10, 256 << 10] {
            let g = goodput(rate_mbit, 9000);
            let bound = g.min(f64::from(w) / (2.0 * l_us as f64 * 1e-6));
            // Enough bytes for a thousand round trips or 8 MiB, whichever is more.
            let bytes = (u64::from(w) * 1000).max(8 << 20);
            let t = modeled(Mode::IndicateWindow, &s, w, rate_mbit, bytes);
            within(
                t,
                bound,
                &format!("indicate-window W {w} L {l_us} us R {rate_mbit} Mbit/s"),
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 20);
}

#[test]
fn one_mss_hold_off_is_bus_bound_whatever_w_is() {
    for (l_us, rate_mbit, mtu) in [(2, 25_000, 9000), (1, 25_000, 1500), (4, 40_000, 9000)] {
        let s = ideal(l_us, mtu);
        let mss = f64::from(mtu - 40);
        let bound = goodput(rate_mbit, mtu).min(mss / (2.0 * l_us as f64 * 1e-6));
        for w in [16u32 << 10, 1 << 20] {
            let t = modeled(Mode::MssHoldoff, &s, w, rate_mbit, 8 << 20);
            within(
                t,
                bound,
                &format!("mss-holdoff W {w} L {l_us} us R {rate_mbit} Mbit/s MTU {mtu}"),
            );
        }
    }
}

/// The DMA bandwidth of the model bounds what the NIC can place: with a DMA engine slower
/// than the wire, named-buffer placement runs at the DMA rate.
#[test]
fn dma_bandwidth_bounds_direct_placement() {
    let mut s = ideal(1, 9000);
    s.apply_override("dma_mb_per_s", "1000").unwrap();
    let t = modeled(Mode::NamedBuffer, &s, 256 << 10, 25_000, 16 << 20);
    within(t, 1e9, "named-buffer with 1000 MB/s DMA");
}

/// The host's copy bandwidth bounds a mode that copies: `unbounded-copy` copies every byte
/// once, into the driver's socket buffer (the application takes it in place there), so at
/// 1500 MB/s of copies it receives 1500 MB/s; `indicate-window`, which copies nothing on the
/// host, is not slowed.
#[test]
fn host_copy_bandwidth_bounds_a_copying_receiver() {
    let mut s = ideal(1, 9000);
    s.apply_override("host_copy_mb_per_s", "1500").unwrap();
    let t = modeled(Mode::UnboundedCopy, &s, 256 << 10, 25_000, 16 << 20);
    within(t, 1.5e9, "unbounded-copy with 1500 MB/s host copies");
    let t = modeled(Mode::IndicateWindow, &s, 256 << 10, 25_000, 16 << 20);
    within(
        t,
        goodput(25_000, 9000),
        "indicate-window with 1500 MB/s host copies",
    );
}

/// `toemu demo`'s report: every mode, bare smoltcp included, carries its figures in modeled
/// time and on the wall clock, and the JSON names them `modeled_*`.
#[test]
fn demo_reports_modeled_and_wall_clock_figures_for_every_mode() {
    let o = DemoOptions {
        bytes: 4 << 20,
        rr_iters: 50,
        repeat: 1,
        wire: sweep_wire(25_000),
        ..DemoOptions::default()
    };
    let runs = toemu_lab::demo::run_demo(&o, |_| {}).unwrap();
    assert_eq!(runs.len(), 5);
    for r in &runs {
        assert!(r.integrity_ok, "{r:?}");
        assert!(r.modeled_seconds > 0.0 && r.seconds > 0.0, "{r:?}");
        // Nothing outruns the 25 Gbit/s wire in modeled time.
        assert!(
            r.modeled_throughput_bytes_per_s > 0.0 && r.modeled_throughput_bytes_per_s < 3.2e9,
            "{r:?}"
        );
        assert!(r.modeled_rr_latency_us.p50 > 0.0, "{r:?}");
        assert!(r.rr_latency_us.p50 > 0.0, "{r:?}");
        let j = serde_json::to_value(r).unwrap();
        for key in [
            "modeled_seconds",
            "modeled_throughput_bytes_per_s",
            "modeled_host_cpu_ns_per_byte",
            "throughput_bytes_per_s",
            "seconds",
        ] {
            assert!(j[key].is_number(), "{key} missing in {j}");
        }
        assert!(j["modeled_rr_latency_us"]["p99"].is_number(), "{j}");
        if r.mode == "smoltcp-bare" {
            assert_eq!(r.modeled_host_cpu_ns_per_byte, 0.0);
        } else {
            assert!(r.modeled_host_cpu_ns_per_byte > 0.0, "{r:?}");
        }
    }
    // The one-MSS hold-off pays a bus round trip per MSS: slower than the window in
    // modeled time, whatever the emulator's own speed.
    let at = |m: &str| {
        runs.iter()
            .find(|r| r.mode == m)
            .unwrap()
            .modeled_throughput_bytes_per_s
    };
    assert!(at("mss-holdoff") < 0.8 * at("indicate-window"));
}

/// `toemu bench`'s report: the runners on the virtual clock (bulk, request/response, scale)
/// carry modeled figures beside the wall clock's; the real-time runners (kernel loopback,
/// threaded) carry none.
#[test]
fn bench_reports_modeled_figures_beside_the_wall_clock() {
    let mut o = toemu_lab::bench::BenchOptions::quick(Settings::default());
    o.bytes = 4 << 20;
    o.rounds = 1;
    o.rr_iters = 100;
    o.scale = vec![toemu_lab::bench::ScalePoint::all_active(4)];
    o.scale_bytes = 4 << 20;
    o.scale_baselines = false;
    let r = toemu_lab::bench::run_bench(&o, |_| {}).unwrap();
    assert_eq!(r.scale.len(), 1);
    assert!(
        r.scale[0]
            .modeled_aggregate_bytes_per_s
            .is_some_and(|v| v > 0.0),
        "{:?}",
        r.scale[0]
    );
    assert!(!r.bulk.is_empty() && !r.rr.is_empty());
    for b in &r.bulk {
        assert!(b.median_bytes_per_s > 0.0, "{b:?}");
        let toe_one_thread = b.runtime == "one thread, virtual clock" && b.mode != "smoltcp-bare";
        if toe_one_thread {
            assert!(b.modeled_bytes_per_s.is_some_and(|v| v > 0.0), "{b:?}");
            assert!(b.modeled_host_cpu_ns_per_byte.is_some(), "{b:?}");
        } else {
            assert_eq!(b.modeled_bytes_per_s, None, "{b:?}");
        }
    }
    for x in &r.rr {
        if x.mode == "kernel-loopback" || x.mode == "smoltcp-bare" {
            // Real time; and no costs on the bench's perfect wire (no virtual time passes).
            assert_eq!(x.modeled_p50_us, None, "{x:?}");
        } else {
            assert!(x.modeled_p50_us.is_some_and(|v| v > 0.0), "{x:?}");
        }
    }
    let j = serde_json::to_value(&r).unwrap();
    assert!(
        j["bulk"][0]["modeled_bytes_per_s"].is_number(),
        "{}",
        j["bulk"][0]
    );
    assert!(j["rr"][0]["modeled_p99_us"].is_number(), "{}", j["rr"][0]);
}
