//! Hostile initiators against toemu's std-TCP target while an honest one works: garbage
//! before login, an unknown opcode, a header announcing a data segment far past
//! MaxRecvDataSegmentLength, Data-Out for a task that does not exist, and a flood of
//! commands outside the CmdSN window. Each gets what RFC 7143 prescribes (the connection
//! dropped, or a Reject, or silence), none panics the target, and the honest session's
//! writes all read back.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use toe_iscsi::initiator::{InitiatorConn, InitiatorEvent};
use toe_iscsi::login::TargetConfig;
use toe_iscsi::scsi::{Disk, MemStore};
use toe_iscsi::wire::{DataOut, Framing, Nop, Repr, RESERVED_TAG};
use toemu_lab::iscsi::{initiator_conn, IscsiUrl, TcpTarget};
use toemu_lab::iscsi_perf::{perf, PerfOptions};

const IQN: &str = "iqn.2026-12.org.toemu:disk";

/// A logged-in session over a plain socket (reads time out after 5 s), for sending raw
/// PDUs.
struct Raw {
    s: TcpStream,
    conn: InitiatorConn,
}

impl Raw {
    fn login(url: &IscsiUrl, seed: u8) -> Raw {
        let s = TcpStream::connect(&url.portal).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut r = Raw {
            s,
            conn: initiator_conn(url, Some(IQN), [seed; 23]),
        };
        let mut out = Vec::new();
        r.conn.start(&mut out);
        r.s.write_all(&out).unwrap();
        match r.event() {
            Some(InitiatorEvent::LoggedIn(_)) => r,
            other => panic!("login: {other:?}"),
        }
    }

    /// The next event of the machine, or `None` once the target closed the connection.
    fn event(&mut self) -> Option<InitiatorEvent> {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            if let Some(e) = self.conn.poll_event() {
                return Some(e);
            }
            let n = self.s.read(&mut buf).expect("no answer within 5 s");
            if n == 0 {
                return None;
            }
            let mut out = Vec::new();
            self.conn.on_bytes(&buf[..n], &mut out);
            self.s.write_all(&out).unwrap();
        }
    }

    /// TEST UNIT READY, answered GOOD: the connection still serves.
    fn still_serves(&mut self) {
        let mut out = Vec::new();
        let tag = self.conn.command(0, &[0; 6], 0, Vec::new(), &mut out);
        self.s.write_all(&out).unwrap();
        match self.event() {
            Some(InitiatorEvent::Done(c)) if c.itt == tag => assert_eq!(c.status, 0, "{c:?}"),
            other => panic!("TEST UNIT READY: {other:?}"),
        }
    }

    /// The target drops the connection: reading comes to EOF (or a reset).
    fn dropped(mut self) {
        let mut buf = [0u8; 4096];
        loop {
            match self.s.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }
}

#[test]
fn hostile_sessions_do_not_disturb_an_honest_one() {
    let disk = Arc::new(Mutex::new(Disk::new(
        Box::new(MemStore::new(64 << 20)),
        512,
        "TOEMU0001",
    )));
    let target = TcpTarget::start(
        TcpListener::bind("127.0.0.1:0").unwrap(),
        TargetConfig::offering_digests(IQN),
        Some(disk),
    )
    .unwrap();
    let url: IscsiUrl = format!("iscsi://{}/{IQN}/0", target.addr())
        .parse()
        .unwrap();
    let honest = {
        let url = url.clone();
        std::thread::spawn(move || {
            let o = PerfOptions {
                io_bytes: 64 << 10,
                depth: 8,
                bytes: Some(96 << 20),
                verify: true,
                random: true,
                seed: 3,
                ..PerfOptions::default()
            };
            perf(&url, &o)
        })
    };
    let f = Framing::default();
    // Hostile rounds until the honest session is done (three at least), and at least one
    // while it runs.
    let mut overlapped = false;
    let mut round = 0u8;
    while round < 3 || !honest.is_finished() {
        overlapped |= !honest.is_finished();
        round = round.wrapping_add(1);
        // Garbage before login: not a Login Request, the connection ends.
        let mut s = TcpStream::connect(&url.portal).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let junk: Vec<u8> = (0..4096u32)
            .map(|i| (i * 7 + u32::from(round)) as u8)
            .collect();
        let _ = s.write_all(&junk);
        Raw {
            s,
            conn: initiator_conn(&url, Some(IQN), [0; 23]),
        }
        .dropped();

        // An unknown opcode in full-feature phase: the PDU cannot be framed, the
        // connection ends.
        let mut r = Raw::login(&url, round.wrapping_add(10));
        let mut bhs = [0u8; 48];
        bhs[0] = 0x1e; // vendor-specific: not defined
        r.s.write_all(&bhs).unwrap();
        r.dropped();

        // A header announcing 16 MiB of data (MaxRecvDataSegmentLength is 8 KiB): the
        // connection ends before any of it is buffered.
        let mut r = Raw::login(&url, round.wrapping_add(20));
        let mut bhs = [0u8; 48];
        bhs[0] = 0x01;
        bhs[5..8].copy_from_slice(&[0xff, 0xff, 0xff]);
        r.s.write_all(&bhs).unwrap();
        r.dropped();

        // Data-Out for a task that does not exist: a Reject, and the session goes on.
        let mut r = Raw::login(&url, round.wrapping_add(30));
        let mut out = Vec::new();
        let d = Repr::DataOut(DataOut {
            final_: true,
            lun: 0,
            itt: 0x5555,
            ttt: RESERVED_TAG,
            exp_stat_sn: 0,
            data_sn: 0,
            buffer_offset: 0,
        });
        f.emit(&d, &[], &[0xaa; 512], &mut out).unwrap();
        // A thousand NOP-Outs far outside the CmdSN window: dropped silently.
        for k in 0..1000u32 {
            let n = Repr::NopOut(Nop {
                immediate: false,
                lun: 0,
                itt: 0x7000 + k,
                ttt: RESERVED_TAG,
                sn: 0x4000_0000 + k,
                exp_sn: 0,
                max_cmd_sn: 0,
            });
            f.emit(&n, &[], &[], &mut out).unwrap();
        }
        r.s.write_all(&out).unwrap();
        r.still_serves();
        r.still_serves();
    }
    assert!(overlapped, "the hostile sessions ran after the honest one");
    let report = honest.join().unwrap().unwrap();
    assert!(report.ok(), "{report:#?}");
    assert_eq!(report.mismatches, Some(0));
    // The rejected Data-Out of each round was counted (once its connection ended).
    let t0 = std::time::Instant::now();
    while target.totals().stats.rejects < 3 {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "{:?}",
            target.totals()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
