//! End-to-end tests of the emulated TOE core over the in-memory wire: bulk integrity per
//! policy, push mode, small named buffers, suspension at W, close and reset, bad input,
//! determinism and the threaded real-time runtime.

use std::io::{Read, Write};

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;

use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use toe_bus::time::Duration;
use toe_bus::{ConnId, ReturnReason, RxPolicy};
use toe_driver::{ConnState, DriverError, NamedCompletion};
use toe_host::config::Settings;
use toe_host::pair::connected_pair;
use toe_host::runtime::{test_nic, Host, Sim, Threaded};
use toe_nic::{wire, Frame};
use toemu_lab::datagen::DataGen;
use toemu_lab::demo::{toe_bulk, toe_bulk_threaded, DemoOptions, Mode};
use toemu_tests::{pair_on, pair_traced, send_bytes, strip_psh, Middle};

const MIB: u64 = 1 << 20;

fn settings(w: u32) -> Settings {
    let mut s = Settings::default();
    s.apply_override("indicate_window_bytes", &w.to_string())
        .unwrap();
    s.validate().unwrap();
    s
}

fn wait_completion(sim: &Sim, host: usize, conn: ConnId, max_steps: u64) -> NamedCompletion {
    let d = sim.driver(host);
    let mut got = None;
    sim.run_until(max_steps, || {
        got = d.lock().take_completion(conn).unwrap();
        got.is_some()
    })
    .expect("named buffer never came back");
    got.unwrap()
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    DataGen::new(seed).fill(&mut v);
    v
}

#[test]
fn bulk_256mib_per_policy_is_intact() {
    let bytes = 256 * MIB;
    let expected = DataGen::digest(3, bytes);
    for mode in [
        Mode::NamedBuffer,
        Mode::IndicateWindow,
        Mode::MssHoldoff,
        Mode::UnboundedCopy,
    ] {
        let o = DemoOptions {
            bytes,
            seed: 3,
            ..DemoOptions::default()
        };
        let b = toe_bulk(mode, &o).unwrap_or_else(|e| panic!("{}: {e}", mode.name()));
        assert_eq!(b.digest, expected, "{}: SHA-256 mismatch", mode.name());
        match mode {
            Mode::NamedBuffer => {
                assert!(
                    (b.copies - 1.0).abs() < 0.01,
                    "named buffers: one copy per byte, got {}",
                    b.copies
                );
                assert!(b.placed > bytes * 9 / 10, "most bytes placed directly");
            }
            Mode::IndicateWindow | Mode::MssHoldoff => {
                assert!(b.copies <= 2.0 && b.copies >= 1.0, "{}", b.copies);
                assert!(b.stalls > 0 && b.acks > 0, "the window must have been used");
            }
            Mode::UnboundedCopy => {
                assert!(
                    (b.copies - 2.0).abs() < 0.01,
                    "DMA + driver copy: {}",
                    b.copies
                );
                assert_eq!(b.stalls, 0, "prior art never holds off");
                assert!(b.copy_high > 0);
            }
            Mode::SmoltcpBare => unreachable!(),
        }
    }
}

#[test]
fn push_mode_returns_partly_filled_buffer_on_psh() {
    let s = settings(64 * 1024);
    let (sim, ca, cb) = connected_pair(&s, 5, 7000).unwrap();
    let db = sim.driver(1);
    // Larger than W: held by the NIC, placed directly.
    let big = db.lock().alloc(1 << 20).unwrap();
    db.lock().post_named(sim.now(), cb, big, true).unwrap();
    let t0 = sim.now();
    let msg = pattern(1000, 9);
    send_bytes(&sim, 0, ca, &msg);
    let c = wait_completion(&sim, 1, cb, 10_000);
    assert_eq!(c.why, ReturnReason::Push);
    assert_eq!(c.filled, 1000);
    assert_eq!(&db.lock().memory().slice(&c.buf)[..1000], &msg[..]);
    assert!(
        sim.now() - t0 < Duration::from_millis(100),
        "returned at once, not by the timer"
    );
    // Smaller than W: held by the driver, filled by copy, returned on PSH too.
    let small = db.lock().alloc(4096).unwrap();
    db.lock().post_named(sim.now(), cb, small, true).unwrap();
    send_bytes(&sim, 0, ca, &msg[..300]);
    let c = wait_completion(&sim, 1, cb, 10_000);
    assert_eq!((c.why, c.filled), (ReturnReason::Push, 300));
    assert_eq!(&db.lock().memory().slice(&c.buf)[..300], &msg[..300]);
}

#[test]
fn push_timer_returns_buffer_after_500ms_without_psh() {
    let s = settings(64 * 1024);
    let (pa, pb) = wire(1024);
    let (sim, ca, cb) = pair_on(
        &s,
        5,
        7001,
        Box::new(pa),
        Box::new(Middle::new(pb, strip_psh)),
    )
    .unwrap();
    let db = sim.driver(1);
    for (len, held_by) in [(1usize << 20, "NIC"), (4096, "driver")] {
        let buf = db.lock().alloc(len).unwrap();
        db.lock().post_named(sim.now(), cb, buf, true).unwrap();
        let t0 = sim.now();
        send_bytes(&sim, 0, ca, &pattern(700, 1));
        let c = wait_completion(&sim, 1, cb, 100_000);
        let waited = sim.now() - t0;
        assert_eq!(c.why, ReturnReason::PushTimer, "held by the {held_by}");
        assert_eq!(c.filled, 700);
        assert!(
            waited >= Duration::from_millis(500) && waited < Duration::from_millis(600),
            "timer fired after {waited} (held by the {held_by})"
        );
        db.lock().free(c.buf);
    }
    // Without push mode nothing comes back early, PSH or not.
    let buf = db.lock().alloc(1 << 20).unwrap();
    db.lock().post_named(sim.now(), cb, buf, false).unwrap();
    send_bytes(&sim, 0, ca, &pattern(700, 1));
    sim.advance(Duration::from_secs(3)).unwrap();
    assert!(db.lock().take_completion(cb).unwrap().is_none());
}

#[test]
fn small_named_buffer_is_filled_and_says_more_data() {
    let s = settings(64 * 1024);
    let (sim, ca, cb) = connected_pair(&s, 6, 7002).unwrap();
    let db = sim.driver(1);
    let msg = pattern(10_000, 4);
    send_bytes(&sim, 0, ca, &msg);
    sim.run_until(10_000, || db.lock().queued_bytes(cb).unwrap() == 10_000)
        .unwrap();
    let buf = db.lock().alloc(4096).unwrap();
    db.lock().post_named(sim.now(), cb, buf, false).unwrap();
    let c = db
        .lock()
        .take_completion(cb)
        .unwrap()
        .expect("filled at once");
    assert_eq!(
        (c.why, c.filled, c.more_data),
        (ReturnReason::Full, 4096, true)
    );
    let mut got = db.lock().memory().slice(&c.buf)[..4096].to_vec();
    let mut rest = vec![0u8; 10_000];
    let n = db.lock().read(sim.now(), cb, &mut rest).unwrap();
    got.extend_from_slice(&rest[..n]);
    assert_eq!(
        got, msg,
        "order kept across the named buffer and the in-place read"
    );
}

#[test]
fn suspension_at_w_closes_the_senders_window_and_ack_resumes() {
    let w = 16 * 1024;
    let s = settings(w);
    let (sim, ca, cb) = connected_pair(&s, 7, 7003).unwrap();
    let (da, db) = (sim.driver(0), sim.driver(1));
    let total = 2 * MIB as usize;
    let data = pattern(total, 8);
    send_bytes(&sim, 0, ca, &data);
    // The application does not accept: run until nothing moves.
    for _ in 0..100_000 {
        if !sim.step_or_idle().unwrap() && sim.now() > toe_bus::time::Instant::from_secs(5) {
            break;
        }
    }
    let (p, win, stats) = sim.with_host(1, |h| h.nic.offload_state(cb).unwrap());
    assert_eq!(p, w, "P stops exactly at W");
    assert_eq!(win, w);
    assert!(stats.stalls >= 1);
    assert_eq!(
        db.lock().queued_bytes(cb).unwrap(),
        w as usize,
        "only W bytes indicated"
    );
    let rxq = sim.with_host(1, |h| h.nic.socket_rx_queue(cb).unwrap());
    // The stack's receive buffer is full to within one window-scale unit.
    assert!(
        rxq + 1024 >= s.socket_buf_bytes as usize,
        "payload held in the stack: {rxq}"
    );
    let zero = sim.with_host(0, |h| {
        let key = toe_nic::phy::FlowKey {
            remote_ip: Ipv4Addr::new(10, 0, 0, 2),
            remote_port: 7003,
            local_port: h.nic.local_port(ca).unwrap(),
        };
        h.nic
            .device()
            .flow(&key)
            .map(|f| f.zero_windows)
            .unwrap_or(0)
    });
    assert!(zero > 0, "the sender saw a zero window");
    assert!(da.lock().conn_info(ca).unwrap().sends_outstanding == 1);
    // Accept everything: acknowledgements reopen the window and the rest flows.
    let mut got = Vec::with_capacity(total);
    sim.run_until(1_000_000, || {
        let mut buf = vec![0u8; 65536];
        let n = db.lock().read(sim.now(), cb, &mut buf).unwrap();
        got.extend_from_slice(&buf[..n]);
        got.len() == total
    })
    .unwrap();
    assert!(got == data, "content intact after suspension");
    assert!(db.lock().conn_info(cb).unwrap().rx.acks_sent > 0);
}

#[test]
fn close_and_reset_return_posted_buffers_with_their_reason() {
    let s = settings(64 * 1024);
    // Peer closes: the NIC-held buffer comes back at EOF with what it holds.
    let (sim, ca, cb) = connected_pair(&s, 8, 7004).unwrap();
    let db = sim.driver(1);
    let buf = db.lock().alloc(1 << 20).unwrap();
    db.lock().post_named(sim.now(), cb, buf, false).unwrap();
    send_bytes(&sim, 0, ca, &pattern(100, 2));
    sim.driver(0).lock().close(ca).unwrap();
    let c = wait_completion(&sim, 1, cb, 10_000);
    assert_eq!((c.why, c.filled), (ReturnReason::Eof, 100));
    assert_eq!(db.lock().state(cb).unwrap(), ConnState::PeerClosed);

    // Peer resets: posted buffers (NIC- and driver-held) come back Reset.
    let (sim, ca, cb) = connected_pair(&s, 9, 7005).unwrap();
    let db = sim.driver(1);
    for len in [1usize << 20, 2 << 20] {
        let buf = db.lock().alloc(len).unwrap();
        db.lock().post_named(sim.now(), cb, buf, false).unwrap();
    }
    sim.driver(0).lock().abort(ca).unwrap();
    let c1 = wait_completion(&sim, 1, cb, 10_000);
    let c2 = wait_completion(&sim, 1, cb, 10_000);
    assert_eq!((c1.why, c2.why), (ReturnReason::Reset, ReturnReason::Reset));
    sim.run_until(10_000, || db.lock().state(cb).unwrap() == ConnState::Reset)
        .unwrap();

    // Local abort: Cancelled.
    let (sim, _ca, cb) = connected_pair(&s, 10, 7006).unwrap();
    let db = sim.driver(1);
    let buf = db.lock().alloc(1 << 20).unwrap();
    db.lock().post_named(sim.now(), cb, buf, false).unwrap();
    db.lock().abort(cb).unwrap();
    let c = wait_completion(&sim, 1, cb, 10_000);
    assert_eq!(c.why, ReturnReason::Cancelled);
}

#[test]
fn calls_on_closed_connections_are_refused_and_lose_nothing() {
    let s = settings(64 * 1024);
    let (sim, ca, cb) = connected_pair(&s, 11, 7007).unwrap();
    let (da, db) = (sim.driver(0), sim.driver(1));
    da.lock().close(ca).unwrap();
    db.lock().close(cb).unwrap();
    sim.run_until(100_000, || {
        db.lock().state(cb).unwrap() == ConnState::Closed
            && da.lock().state(ca).unwrap() == ConnState::Closed
    })
    .unwrap();
    // send on a closed connection: refused, buffer handed back
    let buf = da.lock().alloc(100).unwrap();
    let r = da.lock().send(ca, buf, 100).unwrap_err();
    assert!(
        matches!(r.error, DriverError::BadState { .. }),
        "{:?}",
        r.error
    );
    assert_eq!(r.buf.len(), 100);
    da.lock().free(r.buf);
    // post on a closed connection: refused, buffer handed back
    let buf = db.lock().alloc(4096).unwrap();
    let r = db.lock().post_named(sim.now(), cb, buf, false).unwrap_err();
    assert!(matches!(r.error, DriverError::BadState { .. }));
    db.lock().free(r.buf);
    // after release the id is unknown
    db.lock().release(cb).unwrap();
    let mut out = [0u8; 10];
    assert_eq!(
        db.lock().read(sim.now(), cb, &mut out),
        Err(DriverError::UnknownConn(cb))
    );
    let buf = db.lock().alloc(4096).unwrap();
    let r = db.lock().post_named(sim.now(), cb, buf, false).unwrap_err();
    assert_eq!(r.error, DriverError::UnknownConn(cb));
    db.lock().free(r.buf);
    // a window larger than the anonymous pool is refused with the setting named
    let mut rx = s.rx_config();
    rx.window = 1 << 30;
    let err = da
        .lock()
        .connect(
            SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), 1),
            0,
            Some(rx),
        )
        .unwrap_err();
    assert!(err.to_string().contains("indicate_window_bytes"), "{err}");
}

#[test]
fn garbage_truncated_and_corrupt_frames_are_dropped_and_counted() {
    let s = settings(64 * 1024);
    let (pa, pb) = wire(1024);
    let mut nth = 0u64;
    // Corrupt one payload byte of every 97th TCP frame on the way in (checksum left stale).
    let corrupt = move |f: &mut Frame| {
        nth += 1;
        if nth % 97 == 0 && f.len() > 100 {
            let i = f.len() - 1;
            f[i] ^= 0x40;
        }
        true
    };
    let mb = Middle::new(pb, corrupt);
    let inject = mb.inject.clone();
    let (sim, ca, cb) = pair_on(&s, 12, 7008, Box::new(pa), Box::new(mb)).unwrap();
    // garbage of every kind
    let mut seeded = DataGen::new(99);
    let mut junk: Vec<Frame> = vec![vec![], vec![1, 2, 3], vec![0xff; 13]];
    for len in [14usize, 20, 34, 60, 200, 1500] {
        let mut f = vec![0u8; len];
        seeded.fill(&mut f);
        junk.push(f);
    }
    // a valid-looking Ethernet/IPv4 header with a bad checksum, truncated TCP
    let mut f = vec![0u8; 54];
    f[12] = 0x08;
    f[14] = 0x45;
    f[16] = 0;
    f[17] = 40;
    f[23] = 6;
    junk.push(f);
    let n_junk = junk.len() as u64;
    inject.lock().extend(junk);
    let bytes = 8 * MIB as usize;
    let data = pattern(bytes, 5);
    send_bytes(&sim, 0, ca, &data);
    let db = sim.driver(1);
    let mut h = Sha256::new();
    let mut got = 0;
    sim.run_until(2_000_000, || {
        let mut buf = vec![0u8; 65536];
        let n = db.lock().read(sim.now(), cb, &mut buf).unwrap();
        h.update(&buf[..n]);
        got += n;
        got == bytes
    })
    .unwrap();
    let want: [u8; 32] = Sha256::digest(&data).into();
    assert_eq!(<[u8; 32]>::from(h.finalize()), want);
    let st = sim.with_host(1, |h| h.nic.phy_stats());
    assert!(
        st.rx_malformed + st.rx_bad_checksum >= n_junk,
        "every junk frame counted: {st:?}"
    );
    assert!(st.rx_bad_checksum > 0, "corrupted frames counted: {st:?}");
}

/// A `Write` into shared memory (pcap capture in tests).
#[derive(Clone)]
struct MemWriter(Arc<Mutex<Vec<u8>>>);

impl Write for MemWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One 1 MiB transfer on the virtual clock over a delayed, lossy, reordering wire: (frames
/// seen by host 1, SHA-256 of those frames, the JSON-lines bus trace of both drivers, the
/// pcap capture of host 0's port).
fn frame_log(seed: u64) -> (u64, Vec<u8>, Vec<u8>, Vec<u8>) {
    let s = settings(32 * 1024);
    let (pa, pb) = wire(1024);
    let impair = toe_host::wire_opts::WireOptions {
        impair: toe_nic::impair::ImpairConfig {
            delay: Duration::from_millis(1),
            loss: 0.01,
            reorder: 0.01,
            seed,
            ..Default::default()
        },
        pcap: None,
    };
    let capture = MemWriter(Arc::new(Mutex::new(Vec::new())));
    let sink = toe_nic::pcap::PcapWriter::new(capture.clone())
        .unwrap()
        .shared();
    let pa = toe_nic::pcap::Pcap::new(impair.wrap(pa, 0), sink.clone());
    let pb = impair.wrap(pb, 1);
    let log = Arc::new(Mutex::new(Sha256::new()));
    let count = Arc::new(Mutex::new(0u64));
    let (l2, c2) = (log.clone(), count.clone());
    let rec = move |f: &mut Frame| {
        l2.lock().update((f.len() as u32).to_le_bytes());
        l2.lock().update(&f[..]);
        *c2.lock() += 1;
        true
    };
    let (trace, trace_bytes) = toe_host::trace::memory_writer();
    let (sim, ca, cb) = pair_traced(
        &s,
        seed,
        7009,
        Box::new(pa),
        Box::new(Middle::new(pb, rec)),
        Some(trace),
    )
    .unwrap();
    send_bytes(&sim, 0, ca, &pattern(MIB as usize, seed));
    let db = sim.driver(1);
    let mut got = 0;
    sim.run_until(1_000_000, || {
        let mut buf = vec![0u8; 7000];
        got += db.lock().read(sim.now(), cb, &mut buf).unwrap();
        got == MIB as usize
    })
    .unwrap();
    let n = *count.lock();
    let digest = log.lock().clone().finalize().to_vec();
    let t = trace_bytes.lock().clone();
    drop(sim);
    let p = capture.0.lock().clone();
    (n, digest, t, p)
}

#[test]
fn virtual_clock_runs_are_reproducible() {
    let a = frame_log(21);
    let b = frame_log(21);
    assert!(a.2.len() > 10_000, "the trace recorded the transfer");
    assert!(
        String::from_utf8_lossy(&a.2).contains("\"kind\":\"IndicateData\""),
        "trace has indications"
    );
    assert_eq!(
        (a.0, &a.1),
        (b.0, &b.1),
        "same seed, same frames in the same order"
    );
    assert!(a.2 == b.2, "same seed, byte-identical bus trace");
    assert!(a.3.len() > 1 << 20, "the capture holds the transfer");
    assert!(a.3 == b.3, "same seed, byte-identical pcap");
    let c = frame_log(22);
    assert_ne!(a.1, c.1, "another seed changes the run");
}

#[test]
fn threaded_bulk_per_policy_is_intact_in_real_time() {
    // The bench's `MODE/threaded` rows: both NICs on the adapter thread, sender and receiver
    // on their own threads, in real time.
    let bytes = 32 * MIB;
    let expected = DataGen::digest(4, bytes);
    for mode in [
        Mode::NamedBuffer,
        Mode::IndicateWindow,
        Mode::MssHoldoff,
        Mode::UnboundedCopy,
    ] {
        let o = DemoOptions {
            bytes,
            seed: 4,
            ..DemoOptions::default()
        };
        let b = toe_bulk_threaded(mode, &o).unwrap_or_else(|e| panic!("{}: {e}", mode.name()));
        assert_eq!(b.digest, expected, "{}: SHA-256 mismatch", mode.name());
        let rx = b.driver_counters.expect("driver counters");
        match mode {
            // In real time the NIC may run ahead of the reposting application, so some
            // bytes arrive anonymous; most are placed.
            Mode::NamedBuffer => assert!(b.placed > bytes / 2, "{}", b.placed),
            Mode::IndicateWindow | Mode::MssHoldoff => {
                assert!(b.acks > 0 && rx.indicated_bytes > 0, "{rx:?}")
            }
            Mode::UnboundedCopy => {
                assert!(
                    (b.copies - 2.0).abs() < 0.01,
                    "DMA + driver copy: {}",
                    b.copies
                )
            }
            Mode::SmoltcpBare => unreachable!(),
        }
    }
}

#[test]
fn threaded_real_time_echo_through_read_and_write() {
    let s = settings(64 * 1024);
    let (pa, pb) = wire(1024);
    let now = toe_bus::time::Instant::from_micros(0);
    let a = Host::new("a", &s, test_nic(0, 1), Box::new(pa), now).unwrap();
    let b = Host::new("b", &s, test_nic(1, 1), Box::new(pb), now).unwrap();
    let rt = Threaded::start(vec![a, b]);
    let db = rt.driver(1);
    db.lock().listen(7, 4, None).unwrap();
    let wb = rt.waiter(1);
    let server = std::thread::spawn(move || {
        let mut s = toe_driver::Stream::accept(db, 7, wb).unwrap();
        let mut buf = vec![0u8; 32 * 1024];
        let mut total = 0;
        loop {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            s.write_all(&buf[..n]).unwrap();
            total += n;
        }
        s.flush().unwrap();
        s.close().unwrap();
        total
    });
    let da = rt.driver(0);
    let ca = da
        .lock()
        .connect(SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), 7), 0, None)
        .unwrap();
    let mut cli = toe_driver::Stream::connected(da.clone(), ca, rt.waiter(0)).unwrap();
    let data = pattern(4 * MIB as usize, 77);
    let mut back = Vec::with_capacity(data.len());
    let writer = {
        let mut w = cli.clone();
        let data = data.clone();
        std::thread::spawn(move || {
            w.write_all(&data).unwrap();
            w.flush().unwrap();
            w.close().unwrap();
        })
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = cli.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        back.extend_from_slice(&buf[..n]);
    }
    writer.join().unwrap();
    assert_eq!(server.join().unwrap(), data.len());
    assert!(back == data, "echo intact in real time");
    cli.wait_closed().unwrap();
    drop(rt);
}

#[test]
fn unbounded_copy_stays_within_its_cap_under_a_slow_reader() {
    let mut s = settings(64 * 1024);
    s.policy = RxPolicy::UnboundedCopy;
    s.apply_override("copy_cap_bytes", "1MiB").unwrap();
    let (sim, ca, cb) = connected_pair(&s, 13, 7010).unwrap();
    send_bytes(&sim, 0, ca, &pattern(4 * MIB as usize, 3));
    for _ in 0..200_000 {
        if !sim.step_or_idle().unwrap() && sim.now() > toe_bus::time::Instant::from_secs(5) {
            break;
        }
    }
    let info = sim.driver(1).lock().conn_info(cb).unwrap();
    assert!(info.rx.copy_buffer_high_water_bytes <= MIB, "{info:?}");
    assert!(info.rx.copy_buffer_high_water_bytes > MIB / 2);
}

#[test]
fn bus_cost_model_shows_the_one_mss_holdoff_in_virtual_latency() {
    let mut s = settings(256 * 1024);
    s.apply_override("bus_latency_us", "2").unwrap();
    let o = DemoOptions {
        rr_iters: 20,
        rr_bytes: 64 * 1024,
        settings: s.clone(),
        ..DemoOptions::default()
    };
    let (_, iw) = toemu_lab::demo::toe_rr_timed(Mode::IndicateWindow, &o).unwrap();
    let (_, mh) = toemu_lab::demo::toe_rr_timed(Mode::MssHoldoff, &o).unwrap();
    let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    // four bus crossings per exchange: request Send, IndicateData, response Send, IndicateData
    assert!(iw.iter().all(|&t| t >= 8.0), "{iw:?}");
    // one MSS per indication, each waiting for the application's acknowledgement
    assert!(
        max(&mh) > 3.0 * max(&iw),
        "mss-holdoff {mh:?} vs indicate-window {iw:?}"
    );
}

/// Issue 7, item 6: news is coalesced per connection, so nothing that wakes an application
/// is dropped however many events pile up. On the old bounded event queue, 5,000 SendDone
/// events pushed the one DataAvailable out and an event-driven application waited forever.
#[test]
fn application_news_is_coalesced_and_never_lost() {
    let s = settings(64 * 1024);
    let (sim, ca, cb) = connected_pair(&s, 14, 7011).unwrap();
    let da = sim.driver(0);
    // news for host 0: data is available on ca ...
    send_bytes(&sim, 1, cb, &[7u8; 64]);
    sim.run_until(10_000, || da.lock().queued_bytes(ca).unwrap() == 64)
        .unwrap();
    // ... then 5,000 sends come back on the same connection
    let n = 5000;
    let mut done = 0;
    for i in 0..n {
        send_bytes(&sim, 0, ca, &[i as u8; 16]);
        if i % 64 == 63 {
            sim.run_until(100_000, || {
                let mut d = da.lock();
                while let Some((b, ok)) = d.take_send_done(ca).unwrap() {
                    assert!(ok);
                    d.free(b);
                    done += 1;
                }
                done == i + 1
            })
            .unwrap();
        }
    }
    let mut events = Vec::new();
    while let Some(e) = da.lock().take_event() {
        events.push(e);
    }
    assert!(
        events.contains(&(ca, toe_driver::AppEvent::DataAvailable)),
        "{events:?}"
    );
    assert!(events.contains(&(ca, toe_driver::AppEvent::SendDone)));
    assert!(events.len() <= 4, "one entry per kind: {events:?}");
    assert_eq!(da.lock().stats().errors_dropped, 0);
}

#[test]
fn the_egress_shaper_spaces_a_paced_connections_payload_at_its_rate() {
    // Seed 003 #2's packet pacing in the NIC: 2 MB/s of payload in 64 KiB bursts. The
    // same 1 MiB goes at once unpaced and in about half a second paced, the data waiting
    // in the connection's own send buffer.
    let mut s = Settings::default();
    s.socket_buf_bytes = 2 << 20;
    let (sim, ca, cb) = connected_pair(&s, 11, 7010).unwrap();
    let data = pattern(1 << 20, 3);
    let t0 = sim.now();
    send_bytes(&sim, 0, ca, &data);
    assert_eq!(
        toemu_tests::recv_exact(&sim, 1, cb, data.len(), 10_000_000),
        data
    );
    let unpaced = sim.now() - t0;
    {
        let d = sim.driver(0);
        let mut d = d.lock();
        d.set_shaper(2_000_000, 64 << 10);
        d.set_paced(ca, true).unwrap();
    }
    let t1 = sim.now();
    send_bytes(&sim, 0, ca, &data);
    assert_eq!(
        toemu_tests::recv_exact(&sim, 1, cb, data.len(), 10_000_000),
        data
    );
    let paced = sim.now() - t1;
    // At least (1 MiB - the burst) at 2 MB/s; a little more for the last round trip.
    assert!(
        paced >= Duration::from_millis(490) && paced <= Duration::from_millis(600),
        "paced: {paced:?}"
    );
    assert!(unpaced * 10 < paced, "unpaced {unpaced:?}, paced {paced:?}");
    eprintln!("1 MiB unpaced in {unpaced:?}, paced at 2 MB/s in {paced:?}");
    let waits = sim.with_host(0, |h| h.nic.stats().shaper_waits);
    assert!(waits > 0, "the connection waited for the shaper");
    // Off again: the next MiB goes as TCP lets it.
    sim.driver(0).lock().set_shaper(0, 0);
    let t2 = sim.now();
    send_bytes(&sim, 0, ca, &data);
    assert_eq!(
        toemu_tests::recv_exact(&sim, 1, cb, data.len(), 10_000_000),
        data
    );
    assert!(sim.now() - t2 < paced / 10, "{:?}", sim.now() - t2);
}

#[test]
fn paced_connections_share_the_shaper_in_turn() {
    // Two paced connections, 1 MiB each, under one 2 MB/s shaper: served a segment each
    // in turn, they finish together, in about a second, neither starved by the other.
    let mut s = Settings::default();
    s.socket_buf_bytes = 2 << 20;
    let (sim, ca, cb) = connected_pair(&s, 12, 7011).unwrap();
    let (da, db) = (sim.driver(0), sim.driver(1));
    let remote = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), 7011);
    let ca2 = da.lock().connect(remote, 0, None).unwrap();
    let mut cb2 = None;
    sim.run_until(1_000_000, || {
        if cb2.is_none() {
            cb2 = db.lock().accept(7011);
        }
        cb2.is_some() && da.lock().state(ca2).ok() == Some(ConnState::Established)
    })
    .unwrap();
    let cb2 = cb2.unwrap();
    {
        let mut d = da.lock();
        d.set_shaper(2_000_000, 16 << 10);
        d.set_paced(ca, true).unwrap();
        d.set_paced(ca2, true).unwrap();
    }
    let (one, two) = (pattern(1 << 20, 5), pattern(1 << 20, 6));
    let t0 = sim.now();
    send_bytes(&sim, 0, ca, &one);
    send_bytes(&sim, 0, ca2, &two);
    let mut got = [Vec::new(), Vec::new()];
    let mut done_at = [None, None];
    let mut buf = vec![0u8; 256 << 10];
    sim.run_until(50_000_000, || {
        for (i, c) in [cb, cb2].into_iter().enumerate() {
            let n = db.lock().read(sim.now(), c, &mut buf).unwrap();
            got[i].extend_from_slice(&buf[..n]);
            if got[i].len() == 1 << 20 && done_at[i].is_none() {
                done_at[i] = Some((sim.now() - t0, got[1 - i].len()));
            }
        }
        done_at.iter().all(Option::is_some)
    })
    .unwrap();
    assert_eq!((&got[0], &got[1]), (&one, &two));
    let (first, other_had) = done_at
        .iter()
        .flatten()
        .min_by_key(|d| d.0)
        .copied()
        .unwrap();
    let last = done_at.iter().flatten().map(|d| d.0).max().unwrap();
    eprintln!("first done in {first:?} (the other had {other_had} bytes), last in {last:?}");
    assert!(
        other_had >= (1 << 20) * 9 / 10,
        "the other had {other_had} bytes"
    );
    assert!(
        last >= Duration::from_millis(1030) && last <= Duration::from_millis(1150),
        "2 MiB at 2 MB/s: {last:?}"
    );
}
