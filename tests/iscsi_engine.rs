//! The iSCSI engine in the NIC's ULP slot, on a real emulated TOE host: the peer (host 0)
//! frames PDUs in software, host 1 offloads its connection to the engine after a software
//! phase and sees what the engine made of the stream through its driver (records, placed
//! data, returned buffers), and sends a read's data with one request.

use toe_bus::ConnId;
use toe_driver::UlpNote;
use toe_host::config::Settings;
use toe_host::pair::{connected_pair, connected_pair_on};
use toe_host::runtime::Sim;
use toe_host::wire_opts::WireOptions;
use toe_iscsi::engine::{
    parse_record, EngineCmd, EngineParams, Fatal, IscsiEngineFactory, Record, ENGINE_NAME,
};
use toe_iscsi::transport::{DataInBurst, RxData};
use toe_iscsi::wire::{DataIn, DigestCheck, Framing, Nop, Repr, RESERVED_TAG};
use toemu_tests::{impaired, recv_exact, send_bytes};

const DIGESTS: Framing = Framing {
    header_digest: true,
    data_digest: true,
};

fn data_in(itt: u32, offset: u32, sn: u32, status: Option<u8>) -> Repr {
    Repr::DataIn(DataIn {
        final_: status.is_some(),
        status,
        itt,
        data_sn: sn,
        buffer_offset: offset,
        ..Default::default()
    })
}

fn nop_in() -> Repr {
    Repr::NopIn(Nop {
        immediate: false,
        lun: 0,
        itt: RESERVED_TAG,
        ttt: 3,
        sn: 1,
        exp_sn: 1,
        max_cmd_sn: 1,
    })
}

fn pattern(n: usize, k: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(7) ^ k).collect()
}

/// Host 1 reads records until `want` came (or the stream ended on a fatal record), and
/// collects the engine slot's notes.
fn records(sim: &Sim, cb: ConnId, want: usize, notes: &mut Vec<UlpNote>) -> Vec<u8> {
    let db = sim.driver(1);
    let mut up = Vec::new();
    sim.run_until(2_000_000, || {
        let mut buf = vec![0u8; 1 << 16];
        let n = db.lock().read(sim.now(), cb, &mut buf).unwrap();
        up.extend_from_slice(&buf[..n]);
        loop {
            let note = db.lock().take_ulp(cb).unwrap();
            let Some(n) = note else { break };
            notes.push(n);
        }
        let mut at = 0;
        let mut count = 0;
        while let Ok(Some((r, n))) = parse_record(&up[at..]) {
            at += n;
            count += 1;
            if matches!(r, Record::Fatal(_)) {
                return true;
            }
        }
        count >= want
    })
    .unwrap();
    up
}

/// Data-In of a registered task is placed at its offsets and its buffer comes back when
/// the status arrives; an unregistered PDU and a bad data digest come up inline with the
/// verdict; a bad header digest ends the stream. The host digests and copies nothing of
/// the placed data. On a perfect wire and on one that loses, reorders and duplicates
/// frames below TCP: the engine sees TCP's in-order stream, so placement is the same.
#[test]
fn engine_places_by_task_tag_checks_digests_and_ends_on_a_bad_header() {
    placement_case(&WireOptions::default(), 21);
    let (mut lost, mut reordered, mut duplicated) = (0, 0, 0);
    for seed in [1, 2, 3] {
        let w = placement_case(&impaired(0.05, 0.05, 0.05, 0.0, seed), 21 + seed);
        (lost, reordered, duplicated) = (
            lost + w.dropped_loss,
            reordered + w.reordered,
            duplicated + w.duplicated,
        );
    }
    assert!(
        lost > 0 && reordered > 0 && duplicated > 0,
        "the wire impaired the stream: {lost} lost, {reordered} reordered, {duplicated} duplicated"
    );
}

/// One run on `wire`; returns the impairment of the direction into the engine.
fn placement_case(wire: &WireOptions, seed: u64) -> toe_nic::ImpairStats {
    let mut settings = Settings::default();
    // Standard frames: more of them for the impairment to hit.
    settings.apply_override("mtu", "1500").unwrap();
    let (sim, ca, cb, monitors) = connected_pair_on(&settings, seed, 7500, wire).unwrap();
    sim.with_host(1, |h| {
        h.nic.add_engine(std::sync::Arc::new(IscsiEngineFactory))
    });
    let db = sim.driver(1);
    // The software phase (the login, here a plain NOP-In without digests).
    let mut login = Vec::new();
    Framing::default()
        .emit(&nop_in(), &[], &[], &mut login)
        .unwrap();
    send_bytes(&sim, 0, ca, &login);
    assert_eq!(recv_exact(&sim, 1, cb, login.len(), 100_000), login);
    let len = 65_536;
    let buf = db.lock().alloc(len).unwrap();
    db.lock().ulp_register(cb, 5, buf).unwrap();
    let params = EngineParams {
        header_digest: true,
        data_digest: true,
        max_recv: 8192,
    };
    let at = db
        .lock()
        .ulp_offload(cb, ENGINE_NAME, params.encode(), Vec::new())
        .unwrap();
    assert_eq!(at, login.len() as u64);
    // The full-feature phase: a read's Data-In, then PDUs the engine does not place.
    let data = pattern(len, 1);
    let mut s = Vec::new();
    for (k, chunk) in data.chunks(8192).enumerate() {
        let last = (k + 1) * 8192 >= len;
        let status = last.then_some(0);
        let pdu = data_in(5, (k * 8192) as u32, k as u32, status);
        DIGESTS.emit(&pdu, &[], chunk, &mut s).unwrap();
    }
    DIGESTS.emit(&nop_in(), &[], &[], &mut s).unwrap();
    DIGESTS
        .emit(&data_in(6, 0, 0, None), &[], &pattern(100, 2), &mut s)
        .unwrap();
    let mut bad = Vec::new();
    DIGESTS
        .emit(&data_in(6, 100, 1, None), &[], &pattern(60, 3), &mut bad)
        .unwrap();
    let last = bad.len() - 1;
    bad[last] ^= 0x40;
    s.extend_from_slice(&bad);
    let mut broken = Vec::new();
    DIGESTS
        .emit(&data_in(6, 160, 2, None), &[], &pattern(10, 4), &mut broken)
        .unwrap();
    broken[50] ^= 1;
    s.extend_from_slice(&broken);
    let copies_before = sim.with_host(1, |h| h.mem.stats().snapshot());
    send_bytes(&sim, 0, ca, &s);
    let mut notes = Vec::new();
    let up = records(&sim, cb, 12, &mut notes);
    let mut rs = Vec::new();
    let mut at = 0;
    while let Some((r, n)) = parse_record(&up[at..]).unwrap() {
        rs.push(r);
        at += n;
    }
    assert_eq!(at, up.len(), "whole records only");
    assert_eq!(
        rs.len(),
        12,
        "8 Data-In, the NOP-In, two inline Data-In, the fatal end"
    );
    for (k, r) in rs[..8].iter().enumerate() {
        let Record::Pdu { pdu, .. } = r else {
            panic!("{r:?}")
        };
        let offset = (k * 8192) as u32;
        assert_eq!(pdu.data, RxData::Placed { offset, len: 8192 });
        assert_eq!(pdu.data_digest, DigestCheck::Good);
    }
    let Record::Pdu { pdu, .. } = &rs[8] else {
        panic!()
    };
    assert!(matches!(pdu.repr().unwrap(), Repr::NopIn(_)));
    let Record::Pdu { pdu, .. } = &rs[9] else {
        panic!()
    };
    assert_eq!(pdu.inline(), &pattern(100, 2)[..], "no buffer: inline");
    assert_eq!(pdu.data_digest, DigestCheck::Good);
    let Record::Pdu { pdu, .. } = &rs[10] else {
        panic!()
    };
    assert!(
        matches!(pdu.data_digest, DigestCheck::Bad { .. }),
        "a bad data digest is reported, never passed as good"
    );
    assert_eq!(rs[11], Record::Fatal(Fatal::HeaderDigest));
    // The buffer came back once, full, finished by the status; the engine's error once.
    let mut released = 0;
    let mut errors = 0;
    for n in notes {
        match n {
            UlpNote::Started { stream_offset } => assert_eq!(stream_offset, login.len() as u64),
            UlpNote::Released { tag, buf, placed } => {
                assert_eq!((tag, placed), (5, len as u32));
                let m = db.lock().memory().clone();
                assert!(m.slice(&buf) == &data[..], "placed at the Buffer Offsets");
                db.lock().free(buf);
                released += 1;
            }
            UlpNote::Error(e) => {
                assert!(e.contains("HeaderDigest"), "{e}");
                errors += 1;
            }
            n => panic!("{n:?}"),
        }
    }
    assert_eq!((released, errors), (1, 1));
    let copies = sim
        .with_host(1, |h| h.mem.stats().snapshot())
        .since(&copies_before);
    assert_eq!(copies.host_copy_bytes, 0, "the driver copied nothing");
    assert!(
        copies.copy_out_bytes < 4096,
        "only records were read out ({} bytes), not the placed data",
        copies.copy_out_bytes
    );
    let counters = sim.with_host(1, |h| h.nic.ulp_state(cb)).unwrap().1;
    let get = |k: &str| counters.iter().find(|(n, _)| *n == k).unwrap().1;
    assert_eq!(get("bytes_placed"), len as u64);
    assert_eq!(get("digests_failed"), 2);
    assert_eq!(get("pdus_framed"), 11);
    toe_host::wire_opts::wire_stats(&monitors)[1]
}

/// One request sends a read's data as Data-In PDUs of the peer's segment size, with
/// offsets, DataSN, the F bit per burst, the status in the last one and both digests; the
/// buffer comes back after the release that follows it.
#[test]
fn engine_cuts_a_large_send_into_digested_data_in() {
    let (sim, ca, cb) = connected_pair(&Settings::default(), 22, 7501).unwrap();
    sim.with_host(1, |h| {
        h.nic.add_engine(std::sync::Arc::new(IscsiEngineFactory))
    });
    let db = sim.driver(1);
    let params = EngineParams {
        header_digest: true,
        data_digest: true,
        max_recv: 8192,
    };
    db.lock()
        .ulp_offload(cb, ENGINE_NAME, params.encode(), Vec::new())
        .unwrap();
    let len = 100_000;
    let data = pattern(len, 9);
    {
        let mut d = db.lock();
        let mut b = d.alloc(len).unwrap();
        d.memory().clone().slice_mut(&mut b).copy_from_slice(&data);
        d.ulp_register(cb, 9, b).unwrap();
        let burst = DataInBurst {
            lun: 0,
            itt: 9,
            len: len as u32,
            max_segment: 8192,
            max_burst: 32_768,
            stat_sn: 5,
            exp_cmd_sn: 6,
            max_cmd_sn: 70,
            status: 0,
            residual: (false, false, 0),
        };
        d.ulp_send(cb, EngineCmd::SendDataIn(burst).encode().unwrap())
            .unwrap();
        d.ulp_release(cb, 9).unwrap();
    }
    let pdus = len.div_ceil(8192);
    let wire_len = pdus * (48 + 4 + 4) + len.next_multiple_of(4);
    let got = recv_exact(&sim, 0, ca, wire_len, 1_000_000);
    let mut at = 0;
    let mut placed = vec![0u8; len];
    let mut sn = 0;
    while at < got.len() {
        let p = DIGESTS.parse(&got[at..]).unwrap().expect("whole PDUs");
        assert_eq!(p.data_digest, DigestCheck::Good);
        let Repr::DataIn(d) = p.repr().unwrap() else {
            panic!("{:?}", p.repr())
        };
        assert_eq!((d.itt, d.data_sn), (9, sn));
        let off = d.buffer_offset as usize;
        placed[off..off + p.data.len()].copy_from_slice(p.data);
        let end = off + p.data.len();
        assert_eq!(
            d.final_,
            end == len || end % 32_768 == 0,
            "F ends each burst"
        );
        assert_eq!(
            d.status.is_some(),
            end == len,
            "status in the last PDU only"
        );
        sn += 1;
        at += p.len;
    }
    assert_eq!(sn as usize, pdus);
    assert!(placed == data);
    let mut back = None;
    sim.run_until(100_000, || {
        while let Some(n) = db.lock().take_ulp(cb).unwrap() {
            if let UlpNote::Released { tag, buf, .. } = n {
                back = Some((tag, buf));
            }
        }
        back.is_some()
    })
    .unwrap();
    let (tag, buf) = back.unwrap();
    assert_eq!(tag, 9);
    db.lock().free(buf);
    // Once the engine runs, the stream is its own: a plain send is refused, not mixed in.
    send_bytes(&sim, 1, cb, b"stray");
    let mut done = None;
    sim.run_until(100_000, || {
        done = db.lock().take_send_done(cb).unwrap();
        done.is_some()
    })
    .unwrap();
    let (buf, ok) = done.unwrap();
    assert!(!ok, "refused");
    db.lock().free(buf);
    let (stats, counters) = sim.with_host(1, |h| h.nic.ulp_state(cb)).unwrap();
    assert_eq!((stats.requests, stats.requests_refused), (1, 0));
    let get = |k: &str| counters.iter().find(|(n, _)| *n == k).unwrap().1;
    assert_eq!(get("pdus_sent"), pdus as u64);
    assert_eq!(get("digests_computed"), 2 * pdus as u64);
}
