//! toemu's initiator against toemu's target on two emulated TOE hosts on the in-memory wire,
//! on the virtual clock (the `--offload software` data path): written data reads back
//! identical at queue depths 1 and 32, with and without header and data digests, over a
//! clean wire and through the impairment matrix (delay, loss, reordering, duplication and
//! bit flips that TCP's checksum catches); every run ends (no hang) with no error.

use toe_bus::time::Duration;
use toe_host::config::Settings;
use toe_host::wire_opts::WireOptions;
use toe_nic::impair::ImpairConfig;
use toemu_lab::iscsi_host::{run_on_wire, Offload, WireSpec};
use toemu_lab::iscsi_perf::PerfOptions;

fn verify(bytes: u64, io: u32, depth: usize, seed: u64) -> PerfOptions {
    PerfOptions {
        io_bytes: io,
        depth,
        bytes: Some(bytes),
        verify: true,
        random: true,
        seed,
        ..PerfOptions::default()
    }
}

fn check(
    what: &str,
    wire: &WireOptions,
    digests: (bool, bool),
    offload: Offload,
    o: PerfOptions,
) -> [toe_nic::impair::ImpairStats; 2] {
    let spec = WireSpec {
        digests,
        offload,
        ..WireSpec::default()
    };
    let what = &format!("{what}, {}", offload.name());
    let r = run_on_wire(&Settings::default(), wire, spec, o.clone())
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let rep = &r.report;
    assert!(rep.ok(), "{what}: {rep:#?}");
    assert_eq!((rep.header_digest, rep.data_digest), digests, "{what}");
    assert_eq!(rep.mismatches, Some(0), "{what}");
    let written = rep.phases[0].bytes;
    assert!(written >= o.bytes.unwrap(), "{what}: {rep:#?}");
    assert_eq!(rep.phases[1].errors, 0, "{what}");
    assert_eq!(r.target.data_digest_errors, 0, "{what}");
    assert_eq!(r.target.rejects, 0, "{what}");
    // Digests are the NIC's work with the engine, the host's without.
    let host_digests = r.target.digest_bytes + r.initiator_digest_bytes;
    match offload {
        Offload::Engine => assert_eq!(host_digests, 0, "{what}"),
        Offload::Software => assert_eq!(host_digests > 0, digests != (false, false), "{what}"),
    }
    // Virtual time moved, and the figures are the virtual clock's.
    assert!(
        rep.phases.iter().all(|p| p.seconds > 0.0 && p.iops > 0.0),
        "{what}: {rep:#?}"
    );
    r.wire
}

/// A clean wire of 10 Gbit/s with 10 µs one way (time passes on the virtual clock).
fn clean() -> WireOptions {
    WireOptions {
        impair: ImpairConfig {
            delay: Duration::from_micros(10),
            rate_bits_per_s: Some(10_000_000_000),
            ..ImpairConfig::default()
        },
        pcap: None,
    }
}

#[test]
fn written_data_reads_back_on_a_clean_wire_with_and_without_digests() {
    for offload in [Offload::Engine, Offload::Software] {
        for digests in [(false, false), (true, false), (true, true)] {
            for (io, depth) in [(4096, 32), (64 << 10, 1), (128 << 10, 32)] {
                let what = format!("{io} B at QD{depth}, digests {digests:?}");
                let o = verify(4 << 20, io, depth, io as u64);
                check(&what, &clean(), digests, offload, o);
            }
        }
    }
}

#[test]
fn written_data_reads_back_through_the_impairment_matrix() {
    let cells = [
        ("loss 1%", 0.01, 0.0, 0.0, 0.0),
        ("reorder 2%", 0.0, 0.02, 0.0, 0.0),
        ("dup 2%", 0.0, 0.0, 0.02, 0.0),
        ("corrupt 1%", 0.0, 0.0, 0.0, 0.01),
        ("all", 0.005, 0.01, 0.01, 0.005),
    ];
    for (name, loss, reorder, dup, corrupt) in cells {
        let wire = toemu_tests::impaired(loss, reorder, dup, corrupt, 3);
        for (digests, offload) in [
            ((false, false), Offload::Software),
            ((true, true), Offload::Software),
            ((true, true), Offload::Engine),
        ] {
            let what = format!("{name}, digests {digests:?}");
            let o = verify(2 << 20, 64 << 10, 8, 5);
            let w = check(&what, &wire, digests, offload, o);
            // The impairments happened (both directions summed).
            let sum = |f: fn(&toe_nic::impair::ImpairStats) -> u64| f(&w[0]) + f(&w[1]);
            for (p, n, kind) in [
                (loss, sum(|s| s.dropped_loss), "lost"),
                (reorder, sum(|s| s.reordered), "reordered"),
                (dup, sum(|s| s.duplicated), "duplicated"),
                (corrupt, sum(|s| s.corrupted), "corrupted"),
            ] {
                assert_eq!(p > 0.0, n > 0, "{what}: {n} frames {kind}");
            }
        }
    }
}

/// `toemu iscsi bench`'s figures obey what they measure, and the NIC's engine takes the
/// data path off the host: for each case the engine's row and the software's within the
/// wire's rate, the engine ahead where the host's software digests bound the software path
/// (the cost model charges them); with the engine, no host digest work, each data byte
/// moved once by DMA and copied once by each host (1.0 per byte, 128 KiB writes'
/// immediate data too: the bench's indicate buffers hold a whole 64 KiB burst record) —
/// except on the target of a write, where the disk takes what the NIC placed from host
/// memory as it lies, so only the immediate data (the first 64 KiB) is copied; without
/// it, about one byte of digest work per data byte with digests, and two copies.
#[test]
fn the_bench_figures_are_bounded_by_the_model_and_the_engine_copies_once() {
    let opts = toemu_lab::iscsi_host::BenchOptions {
        small_bytes: 4 << 20,
        large_bytes: 64 << 20,
        without_digests: true,
    };
    let (model, rows) = toemu_lab::iscsi_host::bench(&Settings::default(), opts, |_| {}).unwrap();
    assert_eq!(rows.len(), 16);
    let wire_mb_per_s = model.wire_bits_per_s as f64 / 8.0 / 1e6;
    for r in &rows {
        let what = format!("{r:?}");
        assert!(r.ios > 0 && r.modeled_mb_per_s > 0.0, "{what}");
        assert!(
            r.modeled_mb_per_s <= wire_mb_per_s,
            "faster than the wire: {what}"
        );
        assert!(r.modeled_latency_us.p50 > 0.0, "{what}");
        let crc = [
            r.initiator_digest_bytes_per_byte,
            r.target_digest_bytes_per_byte,
        ];
        let copies = [r.initiator_copies_per_byte, r.target_copies_per_byte];
        for dma in [r.initiator_dma_per_byte, r.target_dma_per_byte] {
            assert!((1.0..1.05).contains(&dma), "{what}");
        }
        match r.offload {
            Offload::Engine => {
                assert_eq!(crc, [0.0, 0.0], "{what}");
                let immediate = f64::from(r.io_bytes.min(64 << 10)) / f64::from(r.io_bytes);
                let target = if r.op == "write" { immediate } else { 1.0 };
                for (c, want) in copies.into_iter().zip([1.0, target]) {
                    assert!((want..want + 0.01).contains(&c), "{what}");
                }
            }
            Offload::Software => {
                for c in crc {
                    if r.digests {
                        assert!((1.0..1.1).contains(&c), "{what}");
                    } else {
                        assert_eq!(c, 0.0, "{what}");
                    }
                }
                for c in copies {
                    assert!((2.0..2.1).contains(&c), "{what}");
                }
            }
        }
    }
    // Side by side: the same modeled machine, the same I/Os.
    for pair in rows.chunks(2) {
        assert_eq!(pair[0].offload, Offload::Engine);
        assert_eq!(pair[1].offload, Offload::Software);
        assert_eq!(
            (pair[0].op, pair[0].io_bytes),
            (pair[1].op, pair[1].io_bytes)
        );
        let ratio = pair[0].modeled_iops / pair[1].modeled_iops;
        for r in pair {
            assert!(
                r.initiator_modeled_cpu_us_per_io > 0.0 && r.target_modeled_nic_us_per_io > 0.0,
                "{r:?}"
            );
        }
        if pair[0].io_bytes > 64 << 10 {
            // At 128 KiB the engine takes the digests and a copy off each host: less modeled
            // host CPU per I/O at both ends.
            assert!(
                pair[0].initiator_modeled_cpu_us_per_io < pair[1].initiator_modeled_cpu_us_per_io
                    && pair[0].target_modeled_cpu_us_per_io < pair[1].target_modeled_cpu_us_per_io,
                "{pair:?}"
            );
        }
        if pair[0].digests && pair[0].io_bytes > 64 << 10 {
            // The cost model charges the host's software CRC32C: at a size where the wire
            // and the host's CPU are the bounds, the engine, which takes it off the host, wins.
            assert!(ratio > 1.0, "{pair:?}");
        } else {
            assert!((0.7..1.3).contains(&ratio), "{pair:?}");
        }
    }
    // Software digests cost modeled time: the same case without them is faster.
    let software = |digests: bool| {
        rows.iter()
            .find(|r| {
                r.offload == Offload::Software
                    && r.digests == digests
                    && r.op == "read"
                    && r.io_bytes > 64 << 10
            })
            .map(|r| r.modeled_iops)
            .unwrap()
    };
    assert!(software(false) > 1.01 * software(true));
}

/// A target asked to stop mid-run (the CLI's SIGTERM) asks its session to log out (an
/// Async Message): the initiator issues nothing more, finishes the commands in flight
/// without an error and logs out, and the target ends with no connection left.
#[test]
fn a_stopping_target_has_its_initiator_log_out_cleanly() {
    let o = PerfOptions {
        io_bytes: 64 << 10,
        depth: 8,
        write: true,
        bytes: Some(1 << 30),
        ..PerfOptions::default()
    };
    let at = toe_bus::time::Instant::from_micros(20_000);
    let spec = WireSpec {
        seed: 5,
        stop_target_at: Some(at),
        ..WireSpec::default()
    };
    let r = run_on_wire(&Settings::default(), &clean(), spec, o).unwrap();
    let rep = &r.report;
    assert_eq!(
        rep.first_problem.as_deref(),
        Some("the target asked for a logout mid-run"),
        "{rep:#?}"
    );
    let written = rep.phases[0].bytes;
    assert!(written > 0 && written < 1 << 30, "{rep:#?}");
    assert_eq!(rep.phases[0].errors, 0, "the commands in flight completed");
    assert_eq!(r.target.rejects, 0);
    assert_eq!(r.target_open, 0, "the target has no connection left");
}
