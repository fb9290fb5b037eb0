//! The NIC's upper-layer engine slot composed with the rest: a real NIC, driver and
//! in-memory wire (impaired below TCP in some cases), with a toy engine that knows no real
//! protocol ("TLV": tagged frames whose data it places into registered buffers).
//!
//! Host 0 sends a software prefix (the "handshake"), then frames; host 1 reads the prefix
//! in software, offloads the connection at that exact stream position (retrying when the
//! offload is stale, with what was in flight as carry), reads the records through the
//! ordinary indicate path (reads or push-mode named buffers), and sends a buffer back
//! through the engine, releasing it at once.
//!
//! Invariants: every frame comes up as exactly one record, in order; placed data is where
//! the record says and nowhere else; a placement past a buffer is refused, never written;
//! every registered buffer comes back exactly once, with the count of bytes placed into it;
//! the engine's sends read the buffer before its release returns it; P <= W throughout.
//!
//! `TOEMU_PROPTEST_CASES` sets the case count (default 256, about a quarter of a second).

use std::collections::BTreeMap;

use proptest::prelude::*;
use toe_bus::time::Instant;
use toe_bus::ConnId;
use toe_driver::UlpNote;
use toe_host::config::Settings;
use toe_host::pair::connected_pair_on;
use toe_host::runtime::Sim;
use toe_host::wire_opts::WireOptions;
use toe_nic::{TagMemory, UlpEngine, UlpFactory};
use toemu_tests::impaired;

/// A frame's header: seq, tag, offset, len (u32 each), flags.
const HDR: usize = 17;
/// A record's header: seq, tag, offset, len, flags.
const REC: usize = 17;
const LAST: u8 = 1;
const PLACED: u8 = 2;
const REFUSED: u8 = 4;
/// The longest idle clock jump while the application is at work.
const TICK: toe_bus::time::Duration = toe_bus::time::Duration::from_millis(10);
/// The tag of the buffer host 1 sends back through the engine.
const SEND_TAG: u32 = 100;

fn be(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn header(seq: u32, tag: u32, offset: u32, len: u32, flags: u8) -> [u8; HDR] {
    let mut h = [0u8; HDR];
    h[0..4].copy_from_slice(&seq.to_be_bytes());
    h[4..8].copy_from_slice(&tag.to_be_bytes());
    h[8..12].copy_from_slice(&offset.to_be_bytes());
    h[12..16].copy_from_slice(&len.to_be_bytes());
    h[16] = flags;
    h
}

struct Cur {
    h: [u8; HDR],
    got: usize,
    placed: bool,
    inline: Vec<u8>,
}

/// The toy engine: frames are `header + data`; data of a registered tag that fits is placed
/// at the frame's offset, the rest goes up inline; a frame flagged LAST finishes its tag.
#[derive(Default)]
struct Tlv {
    head: Vec<u8>,
    cur: Option<Cur>,
    failed: Option<String>,
    frames: u64,
}

impl UlpEngine for Tlv {
    fn receive(&mut self, _: Instant, mut bytes: &[u8], mem: &mut dyn TagMemory, up: &mut Vec<u8>) {
        while !bytes.is_empty() && self.failed.is_none() {
            let Some(c) = self.cur.as_mut() else {
                let n = (HDR - self.head.len()).min(bytes.len());
                self.head.extend_from_slice(&bytes[..n]);
                bytes = &bytes[n..];
                if self.head.len() == HDR {
                    let h: [u8; HDR] = std::mem::take(&mut self.head).try_into().unwrap();
                    let (tag, offset, len) = (be(&h, 4), be(&h, 8) as usize, be(&h, 12) as usize);
                    if len > 1 << 20 {
                        self.failed = Some(format!("frame of {len} bytes"));
                        break;
                    }
                    let fits = mem.len(tag).map(|l| offset + len <= l);
                    let mut h = h;
                    h[16] &= LAST;
                    if fits == Some(false) {
                        h[16] |= REFUSED;
                    }
                    self.cur = Some(Cur {
                        h,
                        got: 0,
                        placed: fits == Some(true) && len > 0,
                        inline: Vec::new(),
                    });
                    self.end(mem, up);
                }
                continue;
            };
            let len = be(&c.h, 12) as usize;
            let n = (len - c.got).min(bytes.len());
            if c.placed {
                let (tag, at) = (be(&c.h, 4), be(&c.h, 8) as usize + c.got);
                let ok = mem.write(tag, at, &bytes[..n]);
                assert!(
                    ok,
                    "a write the engine checked was refused: tag {tag} at {at} +{n} of {:?}",
                    mem.len(tag)
                );
            } else {
                c.inline.extend_from_slice(&bytes[..n]);
            }
            c.got += n;
            bytes = &bytes[n..];
            self.end(mem, up);
        }
    }

    fn send(
        &mut self,
        _: Instant,
        request: &[u8],
        mem: &dyn TagMemory,
        wire: &mut Vec<u8>,
    ) -> Result<(), String> {
        let (tag, offset, len) = (be(request, 0), be(request, 4), be(request, 8));
        let at = wire.len();
        wire.resize(at + len as usize, 0);
        if !mem.read(tag, offset as usize, &mut wire[at..]) {
            wire.truncate(at);
            return Err(format!("no {len} bytes at {offset} of tag {tag}"));
        }
        Ok(())
    }

    fn failed(&self) -> Option<String> {
        self.failed.clone()
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        vec![("frames", self.frames)]
    }
}

impl Tlv {
    /// The current frame, if whole, goes up as a record.
    fn end(&mut self, mem: &mut dyn TagMemory, up: &mut Vec<u8>) {
        let Some(c) = self.cur.as_ref() else { return };
        if c.got < be(&c.h, 12) as usize {
            return;
        }
        let c = self.cur.take().unwrap();
        let mut h = c.h;
        if c.placed {
            h[16] |= PLACED;
        }
        up.extend_from_slice(&h);
        up.extend_from_slice(&c.inline);
        self.frames += 1;
        if c.placed && h[16] & LAST != 0 {
            mem.finish(be(&h, 4));
        }
    }
}

struct TlvFactory;

impl UlpFactory for TlvFactory {
    fn name(&self) -> &'static str {
        "tlv"
    }
    fn start(&self, params: &[u8]) -> Result<Box<dyn UlpEngine>, String> {
        if params != b"tlv1" {
            return Err("unknown TLV version".into());
        }
        Ok(Box::<Tlv>::default())
    }
}

/// The bytes of frame `seq` (a function of seq and position, so they can be checked).
fn frame_data(seq: u32, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(31).wrapping_add(seq * 7) as u8)
        .collect()
}

#[derive(Debug, Clone)]
struct Case {
    window: u32,
    prefix: usize,
    /// Buffer sizes of tags 1, 2, ...
    tags: Vec<usize>,
    /// Frames: (tag index into `tags`, or none for an untagged frame; length; whether it
    /// runs past the tag's buffer).
    frames: Vec<(Option<usize>, usize, bool)>,
    /// Bytes host 1 sends back through the engine, in requests of these sizes.
    back: Vec<usize>,
    /// Read size per step (0: push-mode named buffers of 8 KiB instead).
    read: usize,
    /// Milliseconds (virtual) without reading, now and then (suspension at W).
    pause: u64,
    impair: bool,
    /// The bus's one-way latency, µs (commands then cross while the NIC goes on
    /// delivering: offloads go stale).
    bus_latency_us: u64,
    seed: u64,
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop_oneof![Just(4096u32), Just(16384), Just(65536)],
        0usize..3000,
        proptest::collection::vec(1usize..40_000, 1..4),
        proptest::collection::vec(
            (
                proptest::option::of(0usize..3),
                0usize..9000,
                proptest::bool::weighted(0.15),
            ),
            1..40,
        ),
        proptest::collection::vec(1usize..9000, 0..6),
        prop_oneof![Just(0usize), 1usize..70_000],
        0u64..400,
        proptest::bool::weighted(0.3),
        prop_oneof![Just(0u64), Just(2), Just(50)],
        any::<u64>(),
    )
        .prop_map(
            |(window, prefix, tags, frames, back, read, pause, impair, bus_latency_us, seed)| {
                Case {
                    window,
                    prefix,
                    tags,
                    frames,
                    back,
                    read,
                    pause,
                    impair,
                    bus_latency_us,
                    seed,
                }
            },
        )
}

/// What host 0 sends, and what each frame must come up as: (seq, tag, offset, data,
/// flags expected in its record).
type Expect = (u32, u32, u32, Vec<u8>, u8);

fn plan(c: &Case) -> (Vec<u8>, Vec<Expect>) {
    let mut stream: Vec<u8> = (0..c.prefix).map(|i| (i % 251) as u8).collect();
    let mut cursor = vec![0usize; c.tags.len()];
    let mut finished = vec![false; c.tags.len()];
    let mut expect = Vec::new();
    for (seq, &(t, len, overflow)) in c.frames.iter().enumerate() {
        let seq = seq as u32;
        let (tag, offset, len, flags) = match t.filter(|&t| t < c.tags.len()) {
            None => (0, 0, len, 0),
            Some(t) => {
                let size = c.tags[t];
                let tag = t as u32 + 1;
                if finished[t] {
                    // The buffer went back: this frame's data comes up inline.
                    (tag, 0, len.min(size), 0)
                } else if overflow || len == 0 {
                    // Past the end: refused, never written (an empty frame just comes up).
                    let off = size.saturating_sub(len / 2);
                    let refused = off + len > size;
                    (tag, off, len, if refused { REFUSED } else { 0 })
                } else {
                    let off = cursor[t];
                    let n = len.min(size - off);
                    cursor[t] += n;
                    let last = cursor[t] == size;
                    finished[t] = last;
                    (tag, off, n, PLACED | if last { LAST } else { 0 })
                }
            }
        };
        let data = frame_data(seq, len);
        let wire_flags = flags & LAST;
        stream.extend_from_slice(&header(seq, tag, offset as u32, len as u32, wire_flags));
        stream.extend_from_slice(&data);
        // An empty placed frame is not "placed" (nothing to place).
        let flags = if len == 0 { flags & !PLACED } else { flags };
        expect.push((seq, tag, offset as u32, data, flags));
    }
    (stream, expect)
}

fn settings(w: u32, bus_latency_us: u64) -> Settings {
    let mut s = Settings::default();
    s.apply_override("indicate_window_bytes", &w.to_string())
        .unwrap();
    s.apply_override("bus_latency_us", &bus_latency_us.to_string())
        .unwrap();
    s.validate().unwrap();
    s
}

fn p_within_w(sim: &Sim, conn: ConnId) {
    if let Some((p, w, _)) = sim.with_host(1, |h| h.nic.offload_state(conn)) {
        assert!(p <= w, "P {p} > W {w}");
    }
}

fn run(c: &Case) {
    let wire = if c.impair {
        impaired(0.02, 0.02, 0.02, 0.0, c.seed)
    } else {
        WireOptions::default()
    };
    let (sim, ca, cb, _) =
        connected_pair_on(&settings(c.window, c.bus_latency_us), c.seed, 7400, &wire).unwrap();
    sim.with_host(1, |h| h.nic.add_engine(std::sync::Arc::new(TlvFactory)));
    let (da, db) = (sim.driver(0), sim.driver(1));
    let (stream, expect) = plan(c);
    // Host 0 sends in pieces of varied size.
    let mut at = 0;
    let mut k = c.seed;
    while at < stream.len() {
        k = k
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let n = (((k >> 33) % 20_000) as usize + 1).min(stream.len() - at);
        toemu_tests::send_bytes(&sim, 0, ca, &stream[at..at + n]);
        at += n;
    }
    // Host 1 registers its tags before the offload (so placement is decided by the plan).
    let mut registered: BTreeMap<u32, usize> = BTreeMap::new();
    for (i, &size) in c.tags.iter().enumerate() {
        let buf = db.lock().alloc(size).unwrap();
        db.lock().ulp_register(cb, i as u32 + 1, buf).unwrap();
        registered.insert(i as u32 + 1, size);
    }
    // The software phase: read the prefix (and whatever comes with it).
    let mut soft = Vec::new();
    let read_all = |soft: &mut Vec<u8>| {
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = db.lock().read(sim.now(), cb, &mut buf).unwrap();
            if n == 0 {
                break;
            }
            soft.extend_from_slice(&buf[..n]);
        }
    };
    sim.run_until(2_000_000, || {
        read_all(&mut soft);
        soft.len() >= c.prefix
    })
    .unwrap();
    assert_eq!(soft[..c.prefix], stream[..c.prefix]);
    // Offload at the exact position, retrying while stale.
    let mut started = None;
    let mut notes = Vec::new();
    let mut offloads = 0;
    let mut waits = 0;
    while started.is_none() {
        read_all(&mut soft);
        if offloads == 0 && c.bus_latency_us > 0 && waits < 20 {
            waits += 1;
            // Offload while an indication is on its way up: stale, then retried.
            let until = sim.now() + toe_bus::time::Duration::from_millis(5);
            while sim.now() <= until {
                let nic = sim.with_host(1, |h| h.nic.offload_state(cb)).unwrap().2;
                let drv = db.lock().conn_info(cb).unwrap();
                let nic_ahead = nic.indicated_bytes + nic.placed_bytes
                    > drv.rx.indicated_bytes + drv.rx.placed_bytes;
                if nic_ahead || drv.queued_bytes > 0 {
                    break;
                }
                let _ = sim.step_bounded(Some(sim.now() + TICK));
            }
            if db.lock().queued_bytes(cb).unwrap() > 0 {
                continue;
            }
        }
        let carry = soft[c.prefix..].to_vec();
        let off = db
            .lock()
            .ulp_offload(cb, "tlv", b"tlv1".to_vec(), carry)
            .unwrap();
        assert_eq!(off, soft.len() as u64);
        offloads += 1;
        assert!(offloads < 5, "a stale offload must succeed when retried");
        let mut answer = None;
        sim.run_until(2_000_000, || {
            while let Some(n) = db.lock().take_ulp(cb).unwrap() {
                match n {
                    UlpNote::Started { stream_offset } => answer = Some(Ok(stream_offset)),
                    UlpNote::Refused {
                        position,
                        stale,
                        error,
                    } => {
                        assert!(stale, "refused: {error}");
                        answer = Some(Err(position));
                    }
                    other => notes.push(other),
                }
            }
            answer.is_some()
        })
        .unwrap();
        match answer.unwrap() {
            Ok(at) => started = Some(at),
            Err(position) => assert!(position > off),
        }
    }
    assert_eq!(started, Some(soft.len() as u64));
    // Host 1 sends a buffer back through the engine and releases it at once.
    let back_len: usize = c.back.iter().sum();
    let back: Vec<u8> = (0..back_len).map(|i| (i * 13 % 256) as u8).collect();
    if back_len > 0 {
        let mut d = db.lock();
        let mut b = d.alloc(back_len).unwrap();
        d.memory().clone().slice_mut(&mut b).copy_from_slice(&back);
        d.ulp_register(cb, SEND_TAG, b).unwrap();
        let mut off = 0u32;
        for &n in &c.back {
            let mut r = Vec::new();
            for v in [SEND_TAG, off, n as u32] {
                r.extend_from_slice(&v.to_be_bytes());
            }
            d.ulp_send(cb, r).unwrap();
            off += n as u32;
        }
        d.ulp_release(cb, SEND_TAG).unwrap();
        registered.insert(SEND_TAG, back_len);
    }
    // Records: the carry's and the stream's, through reads or named buffers.
    let total_records: usize = expect.iter().map(|e| REC + record_inline(e)).sum();
    // From the offload on, what comes up is records (the carry's first).
    let mut records = Vec::new();
    let mut got_back = Vec::new();
    let mut returned: BTreeMap<u32, (Vec<u8>, u32)> = BTreeMap::new();
    let mut steps = 0u64;
    let mut posted = false;
    let mut released = false;
    let mut next_read = sim.now();
    let mem1 = db.lock().memory().clone();
    for n in notes.drain(..) {
        absorb(n, &mem1, &mut returned, &db);
    }
    // The application acts between steps, so the clock never jumps further than 10 ms (or
    // to the end of a pause): an idle world would otherwise jump to its next timer, a
    // keep-alive a minute away, while delivery waits on the application.
    let mut finished = false;
    for _ in 0..20_000_000u64 {
        let done = {
            steps += 1;
            p_within_w(&sim, cb);
            let state = db.lock().state(cb).unwrap();
            if state != toe_driver::ConnState::Established {
                let nic = sim.with_host(1, |h| {
                    (
                        h.nic.offload_state(cb),
                        h.nic.socket_rx_queue(cb),
                        h.nic.ulp_state(cb),
                    )
                });
                panic!(
                    "connection {state:?} at {} after {steps} steps: {} of {total_records} record \
                     bytes, {} of {back_len} back; NIC {nic:?}; host 0 {:?}",
                    sim.now(),
                    records.len(),
                    got_back.len(),
                    da.lock().conn_info(ca)
                );
            }
            let reading = sim.now() >= next_read;
            if reading && c.pause > 0 && steps % 7 == 0 {
                next_read = sim.now() + toe_bus::time::Duration::from_millis(c.pause);
            }
            if reading {
                if c.read > 0 {
                    let mut buf = vec![0u8; c.read];
                    let n = db.lock().read(sim.now(), cb, &mut buf).unwrap();
                    records.extend_from_slice(&buf[..n]);
                } else {
                    let mut d = db.lock();
                    if !posted {
                        let b = d.alloc(8192).unwrap();
                        d.post_named(sim.now(), cb, b, true).unwrap();
                        posted = true;
                    }
                    if let Some(done) = d.take_completion(cb).unwrap() {
                        let m = d.memory().clone();
                        records.extend_from_slice(&m.slice(&done.buf)[..done.filled]);
                        d.free(done.buf);
                        posted = false;
                    }
                }
            }
            loop {
                let note = db.lock().take_ulp(cb).unwrap();
                let Some(n) = note else { break };
                absorb(n, &mem1, &mut returned, &db);
            }
            let mut buf = vec![0u8; 1 << 16];
            let n = da.lock().read(sim.now(), ca, &mut buf).unwrap();
            got_back.extend_from_slice(&buf[..n]);
            if records.len() >= total_records && got_back.len() >= back_len && !released {
                // Tags whose last frame never came go back on release (a finished one's
                // release finds nothing: harmless).
                for tag in registered.keys() {
                    if !returned.contains_key(tag) {
                        db.lock().ulp_release(cb, *tag).unwrap();
                    }
                }
                released = true;
            }
            released && returned.len() == registered.len()
        };
        if done {
            finished = true;
            break;
        }
        match sim.step_bounded(Some(next_read.max(sim.now() + TICK))) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            r => {
                r.unwrap();
            }
        }
    }
    assert!(
        finished,
        "stuck: {} of {total_records} record bytes, {} of {back_len} back, {} of {} \
         buffers returned",
        records.len(),
        got_back.len(),
        returned.len(),
        registered.len()
    );
    assert_eq!(
        records.len(),
        total_records,
        "no record bytes beyond the frames'"
    );
    assert!(
        got_back == back,
        "the engine sent the buffer's bytes, in order"
    );
    // Every frame, in order, as exactly one record.
    let mut at = 0;
    let mut placed: BTreeMap<u32, u32> = BTreeMap::new();
    for (seq, tag, offset, data, flags) in &expect {
        let r = &records[at..];
        assert_eq!(be(r, 0), *seq, "records in order, none lost or duplicated");
        assert_eq!((be(r, 4), be(r, 8)), (*tag, *offset));
        assert_eq!(be(r, 12) as usize, data.len());
        assert_eq!(
            r[16], *flags,
            "frame {seq}: placed, refused and last as planned"
        );
        at += REC;
        if flags & PLACED != 0 {
            let buf = &returned[tag].0;
            let o = *offset as usize;
            assert!(
                buf[o..o + data.len()] == data[..],
                "frame {seq} placed where it says"
            );
            *placed.entry(*tag).or_default() += data.len() as u32;
        } else {
            assert!(
                records[at..at + data.len()] == data[..],
                "frame {seq} inline intact"
            );
            at += data.len();
        }
    }
    // Each buffer came back once, with the bytes placed into it.
    for (tag, (_, n)) in &returned {
        if *tag != SEND_TAG {
            assert_eq!(*n, placed.get(tag).copied().unwrap_or(0), "tag {tag}");
        }
    }
    let (stats, _) = sim.with_host(1, |h| h.nic.ulp_state(cb)).unwrap();
    assert_eq!(stats.writes_refused, 0);
    assert_eq!(stats.tags_registered, stats.tags_returned);
    assert_eq!(stats.requests as usize, c.back.len());
}

/// Inline bytes of a frame's record.
fn record_inline(e: &Expect) -> usize {
    if e.4 & PLACED != 0 {
        0
    } else {
        e.3.len()
    }
}

fn absorb(
    n: UlpNote,
    mem: &std::sync::Arc<toe_bus::HostMemory>,
    returned: &mut BTreeMap<u32, (Vec<u8>, u32)>,
    d: &toe_driver::SharedDriver,
) {
    match n {
        UlpNote::Released { tag, buf, placed } => {
            let bytes = mem.slice(&buf).to_vec();
            d.lock().free(buf);
            assert!(
                returned.insert(tag, (bytes, placed)).is_none(),
                "tag {tag} came back twice"
            );
        }
        UlpNote::Error(e) => panic!("engine error: {e}"),
        other => panic!("unexpected {other:?}"),
    }
}

fn cases() -> u32 {
    std::env::var("TOEMU_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    /// See the module documentation.
    #[test]
    fn engine_slot_loses_duplicates_and_misplaces_nothing(c in case()) {
        run(&c);
    }
}

/// An offload that finds a named buffer holding data the driver has not received yet is
/// stale: the buffer comes back first (`Cancelled`, with the data), then the refusal; the
/// retry at the NIC's position starts the engine, and the stream goes on as records.
#[test]
fn stale_offload_returns_the_named_buffer_and_the_retry_starts_in_place() {
    let (sim, ca, cb, _) =
        connected_pair_on(&settings(16384, 0), 31, 7401, &WireOptions::default()).unwrap();
    sim.with_host(1, |h| h.nic.add_engine(std::sync::Arc::new(TlvFactory)));
    let db = sim.driver(1);
    let prefix: Vec<u8> = (0..1000).map(|i| (i % 253) as u8).collect();
    // Larger than W, so the driver posts it to the NIC rather than filling it itself.
    let b = db.lock().alloc(65536).unwrap();
    db.lock().post_named(sim.now(), cb, b, false).unwrap();
    toemu_tests::send_bytes(&sim, 0, ca, &prefix);
    let r = sim.run_until(10_000, || {
        sim.with_host(1, |h| h.nic.offload_state(cb))
            .unwrap()
            .2
            .placed_bytes
            == 1000
    });
    assert!(
        r.is_ok(),
        "{:?} {:?}",
        sim.with_host(1, |h| h.nic.offload_state(cb)),
        db.lock().conn_info(cb)
    );
    let off = db
        .lock()
        .ulp_offload(cb, "tlv", b"tlv1".to_vec(), Vec::new())
        .unwrap();
    assert_eq!(off, 0, "the driver has received nothing yet");
    let mut got = None;
    let mut refused = None;
    sim.run_until(100_000, || {
        let mut d = db.lock();
        if got.is_none() {
            got = d.take_completion(cb).unwrap();
            // The buffer comes back before the refusal.
            assert!(got.is_some() || d.take_ulp(cb).unwrap().is_none());
        } else if let Some(n) = d.take_ulp(cb).unwrap() {
            refused = Some(n);
        }
        refused.is_some()
    })
    .unwrap();
    let done = got.unwrap();
    assert_eq!(done.why, toe_bus::ReturnReason::Cancelled);
    assert_eq!(done.filled, 1000);
    let m = db.lock().memory().clone();
    assert!(m.slice(&done.buf)[..1000] == prefix[..]);
    db.lock().free(done.buf);
    match refused.unwrap() {
        UlpNote::Refused {
            position, stale, ..
        } => assert_eq!((position, stale), (1000, true)),
        n => panic!("{n:?}"),
    }
    // The retry at the NIC's position starts the engine; a frame comes up as its record.
    let off = db
        .lock()
        .ulp_offload(cb, "tlv", b"tlv1".to_vec(), Vec::new())
        .unwrap();
    assert_eq!(off, 1000);
    let mut frame = header(0, 0, 0, 5, 0).to_vec();
    frame.extend_from_slice(b"hello");
    toemu_tests::send_bytes(&sim, 0, ca, &frame);
    let mut started = false;
    let mut up = Vec::new();
    sim.run_until(100_000, || {
        if let Some(n) = db.lock().take_ulp(cb).unwrap() {
            assert!(
                matches!(
                    n,
                    UlpNote::Started {
                        stream_offset: 1000
                    }
                ),
                "{n:?}"
            );
            started = true;
        }
        let mut buf = [0u8; 64];
        let n = db.lock().read(sim.now(), cb, &mut buf).unwrap();
        up.extend_from_slice(&buf[..n]);
        started && up.len() == REC + 5
    })
    .unwrap();
    assert_eq!(&up[REC..], b"hello");
    let (stats, _) = sim.with_host(1, |h| h.nic.ulp_state(cb)).unwrap();
    assert_eq!(stats.stale_offloads, 1);
}

/// A handshake on the 2% impaired wire of the proptest above whose SYN-ACK is lost, then
/// the client's final ACK, then the SYN-ACK's first retransmission (wire seed found by the
/// proptest): it completes on a later retransmission instead of being abandoned by the
/// SYN-RECEIVED timeout (it was, while the timeout was 5 s and left room for two).
#[test]
fn a_handshake_losing_three_segments_in_a_row_still_completes() {
    let seed = 12377970383226030004;
    let wire = impaired(0.02, 0.02, 0.02, 0.0, seed);
    let (sim, ca, _, _) = connected_pair_on(&settings(4096, 0), seed, 7400, &wire).unwrap();
    assert!(
        sim.now() > toe_bus::time::Instant::from_secs(5),
        "the handshake lost no segment: the wire no longer draws this case ({:?})",
        sim.now()
    );
    let st = sim.driver(0).lock().state(ca).unwrap();
    assert_eq!(st, toe_driver::ConnState::Established);
}
