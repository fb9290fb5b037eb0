//! Write acceleration (seed 000) on the virtual clock: the wan-bench modes move identical
//! data on a perfect wire and on the asymmetric WAN, and each mechanism does what it says.

use toemu_lab::wan::{wan_run, WanLink, WanMode, WanOptions};

fn perfect() -> WanOptions {
    WanOptions {
        link: WanLink {
            forward_bytes_per_s: 1.25e9,
            reverse_bytes_per_s: 1.25e9,
            rtt_ms: 1.0,
            loss: 0.0,
            mtu: 1500,
        },
        ..WanOptions::default()
    }
}

#[test]
fn every_mode_writes_identical_data_on_a_perfect_wire() {
    let o = perfect();
    for mode in WanMode::ALL {
        for depth in [1, 8] {
            let r = wan_run(&o, mode, depth, 24).unwrap();
            assert!(r.integrity_ok, "{} QD{depth}: {:?}", mode.name(), r.problem);
        }
    }
}

#[test]
fn on_the_wan_the_accelerated_write_takes_one_round_trip_and_its_ack_rides_the_response() {
    let o = WanOptions::default();
    let classic = wan_run(&o, WanMode::Classic, 1, 6).unwrap();
    let acc = wan_run(&o, WanMode::Accelerated, 1, 6).unwrap();
    for r in [&classic, &acc] {
        assert!(r.integrity_ok, "{}: {:?}", r.mode.name(), r.problem);
    }
    // Classic: 64 KiB with the command, an R2T for the rest; accelerated: none.
    assert_eq!(classic.r2t_sent, 6);
    assert_eq!(acc.r2t_sent, 0);
    // Two round trips (about 100 ms at 50 ms RTT) against one.
    assert!(classic.write_latency_us.p50 > 100_000.0, "{classic:?}");
    let ratio = acc.write_latency_us.p50 / classic.write_latency_us.p50;
    assert!(ratio < 0.55, "latency ratio {ratio}");
    // The response carries the held ACK: few pure ACKs, few reverse packets.
    assert!(acc.acks_superseded >= 6, "{acc:?}");
    assert!(
        acc.pure_acks_sent * 10 < classic.pure_acks_sent,
        "{acc:?} {classic:?}"
    );
    assert!(acc.reverse_packets_per_mib * 5.0 < classic.reverse_packets_per_mib);
    // Unaccelerated sessions are untouched: no held ACK outlives the stack's own delay.
    assert_eq!(classic.acks_thinned, 0);
}

#[test]
fn dynamic_r2t_signals_a_full_buffer_and_loses_nothing() {
    // A write buffer of one write: each write takes it above 90% (the initiator is told to
    // wait for R2Ts) and its completion below 80% (unsolicited data may flow again). The
    // target executes writes as their data arrives, so on this wire the buffer never holds
    // a second write: the signals toggle per write, and every byte still arrives.
    let mut o = perfect();
    o.accel.buffer_bytes = 256 << 10;
    let r = wan_run(&o, WanMode::Accelerated, 8, 32).unwrap();
    assert!(r.integrity_ok, "{:?}", r.problem);
    assert!(r.r2t_signals >= 2, "{r:?}");
    // A session without the acceleration gets no vendor message.
    let plain = wan_run(&o, WanMode::Unsolicited, 8, 32).unwrap();
    assert!(plain.integrity_ok, "{:?}", plain.problem);
    assert_eq!((plain.r2t_signals, plain.backoffs), (0, 0));
}

#[test]
fn batched_responses_go_out_together_and_the_data_is_intact() {
    let mut o = perfect();
    o.accel.batch_responses = true;
    let r = wan_run(&o, WanMode::Accelerated, 8, 48).unwrap();
    assert!(r.integrity_ok, "{:?}", r.problem);
    assert!(
        r.response_batches > 0 && r.responses_batched >= 2 * r.response_batches,
        "{r:?}"
    );
}

#[test]
fn a_slow_store_turns_on_r2ts_and_back_off_and_nothing_is_lost() {
    // A write-back target whose store takes 40 MB/s behind a 4 MiB buffer, fed at 16
    // writes of 256 KiB in flight over a fast wire: the buffer fills, the initiator is told
    // to wait for R2Ts, writes without room are refused with a back-off and sent again
    // after it; the data all arrives, at about the store's rate.
    let mut o = perfect();
    o.accel.buffer_bytes = 4 << 20;
    o.destage_bytes_per_s = Some(40_000_000);
    let r = wan_run(&o, WanMode::Accelerated, 16, 96).unwrap();
    assert!(r.integrity_ok, "{:?}", r.problem);
    assert!(
        r.r2t_signals >= 2,
        "R2Ts required, then allowed again: {r:?}"
    );
    assert!(r.r2t_sent > 0, "writes waited for R2Ts: {r:?}");
    assert!(r.backoffs > 0, "writes refused with a back-off: {r:?}");
    assert!(
        r.throughput_bytes_per_s < 50e6,
        "bounded by the store: {r:?}"
    );
}

#[test]
fn a_congested_initiator_stops_the_target_holding_its_acks() {
    // The initiator's write buffer is 1 MiB and it keeps 8 writes of 256 KiB waiting: at
    // 75% and filling it reports congestion, and the target then sends its ACKs at once
    // (no hold), as the seed asks; the data is intact either way.
    let o = WanOptions::default();
    let calm = wan_run(&o, WanMode::Accelerated, 8, 32).unwrap();
    let mut o2 = WanOptions::default();
    o2.initiator.buffer_bytes = 1 << 20;
    let congested = wan_run(&o2, WanMode::Accelerated, 8, 32).unwrap();
    for r in [&calm, &congested] {
        assert!(r.integrity_ok, "{:?}", r.problem);
    }
    assert_eq!(calm.congestion_reports, 0, "{calm:?}");
    assert!(congested.congestion_reports >= 1, "{congested:?}");
    assert!(
        congested.pure_acks_sent > 10 * calm.pure_acks_sent.max(1),
        "no hold while congested: {} pure ACKs against {}",
        congested.pure_acks_sent,
        calm.pure_acks_sent
    );
}
