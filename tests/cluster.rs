//! Proxy I/O in a target cluster (seed 001) on the virtual clock: data written through
//! the primary lands on the members the LBA map names and reads back through the primary;
//! a member that goes down fails its commands with CHECK CONDITION in bounded time while
//! the session and the other extents go on.

use toe_host::config::Settings;
use toemu_lab::cluster::{front_addr, Cluster, ClusterConfig, VOLUME_IQN, VOLUME_PORT};
use toemu_lab::iscsi::IscsiUrl;
use toemu_lab::iscsi_host::{PerfApp, ScriptApp, ScriptStep};
use toemu_lab::iscsi_perf::{pattern, PerfOptions};

fn config(member_mib: u64) -> ClusterConfig {
    ClusterConfig {
        members: 3,
        block_bytes: 512,
        member_blocks: member_mib << 11,
        stripe_blocks: 2048,
        extents: None,
        member_timeout_ms: 2000,
    }
}

fn volume_url(digests: bool) -> IscsiUrl {
    let q = if digests {
        "?header_digest=crc32c&data_digest=crc32c"
    } else {
        ""
    };
    format!("iscsi://{}:{VOLUME_PORT}/{VOLUME_IQN}/0{q}", front_addr(0))
        .parse()
        .unwrap()
}

/// Our initiator writes seeded data through the primary and reads it back through it;
/// every member's own LUN holds, extent by extent, the blocks the map gives it.
#[test]
fn data_written_through_the_primary_lands_on_the_members_and_reads_back() {
    let cfg = config(96);
    let mut c = Cluster::new(&Settings::default(), &cfg, true, 7).unwrap();
    assert!(c.wait_ready(5_000_000).unwrap(), "back sessions up");
    let bytes = 256u64 << 20;
    let o = PerfOptions {
        io_bytes: 128 << 10,
        depth: 16,
        bytes: Some(bytes),
        write: true,
        verify: true,
        seed: 99,
        ..PerfOptions::default()
    };
    let mut perf = PerfApp::new(&volume_url(true), o, [5; 23]).unwrap();
    let log = c.run(&mut perf, u64::MAX).unwrap();
    let r = perf.report().unwrap_or_else(|e| panic!("{e}; {log:#?}"));
    assert!(r.ok() && r.mismatches == Some(0), "{r:?}");
    let map = cfg.map().unwrap();
    let mut checked = 0;
    for e in map.extents() {
        let written = bytes / 512;
        if e.lba >= written {
            continue;
        }
        let n = e.blocks.min(written - e.lba) as usize;
        let mut want = vec![0u8; n * 512];
        pattern(99, e.lba, 512, &mut want);
        let mut cdb = [0u8; 16];
        cdb[0] = 0x88;
        cdb[2..10].copy_from_slice(&e.member_lba.to_be_bytes());
        cdb[10..14].copy_from_slice(&(n as u32).to_be_bytes());
        let got = c.servers.disks[e.member]
            .lock()
            .unwrap()
            .execute(&cdb, &[])
            .data_in;
        assert!(got == want, "extent at {} on member {}", e.lba, e.member);
        checked += 1;
    }
    assert!(checked >= 6, "{checked} extents");
    let s = c.proxy_stats();
    assert!(s.local_pieces > 0 && s.member_pieces > 0, "{s:?}");
}

fn rw16(write: bool, lba: u64, blocks: u32) -> Vec<u8> {
    let mut c = vec![0u8; 16];
    c[0] = if write { 0x8a } else { 0x88 };
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&blocks.to_be_bytes());
    c
}

fn write(lba: u64) -> ScriptStep {
    let mut data = vec![0u8; 64 << 10];
    pattern(3, lba, 512, &mut data);
    ScriptStep::Command {
        cdb: rw16(true, lba, 128),
        read_len: 0,
        write: data,
    }
}

fn read(lba: u64) -> ScriptStep {
    ScriptStep::Command {
        cdb: rw16(false, lba, 128),
        read_len: 64 << 10,
        write: Vec::new(),
    }
}

fn expected(lba: u64) -> Vec<u8> {
    let mut data = vec![0u8; 64 << 10];
    pattern(3, lba, 512, &mut data);
    data
}

/// Proxied data crosses the primary with at most one host copy per byte (seed 001 with
/// the NIC's iSCSI engine). With 1 MiB stripes each 128 KiB I/O is one piece: a read's
/// data stays in the host buffer the back NIC placed it in and the front NIC sends it from
/// there, so only the primary's own third is copied (out of its disk into host memory); a
/// write's data stays where the front NIC placed it and the back NIC (or the primary's
/// disk) takes it from there, so only the immediate data is copied (its inline record
/// framed, then placed: the first 64 KiB twice). Cut into four pieces (32 KiB stripes),
/// the data goes the ordinary way and still arrives intact.
#[test]
fn proxied_data_crosses_the_primary_with_at_most_one_host_copy_per_byte() {
    use toemu_lab::cluster_bench::{run, BenchOptions};
    let copies = |stripe_blocks: u64| {
        let o = BenchOptions {
            bytes: 8 << 20,
            rounds: 1,
            stripe_blocks,
            ..BenchOptions::default()
        };
        let r = run(&Settings::default(), &o).unwrap();
        assert!(r.integrity_ok(), "{r:?}");
        let of = |mode: &str, op: &str| {
            let run = r
                .runs
                .iter()
                .find(|x| x.mode == mode && x.op == op)
                .unwrap();
            run.host_copies_per_proxied_byte
        };
        [
            of("proxy", "read"),
            of("proxy", "write"),
            of("direct", "read"),
        ]
    };
    let [read, write, direct_read] = copies(2048);
    assert!((0.3..0.4).contains(&read), "read: {read} copies per byte");
    assert!(
        (0.99..1.01).contains(&write),
        "write: {write} copies per byte"
    );
    assert!(
        (0.99..1.01).contains(&direct_read),
        "direct read: {direct_read}"
    );
    let [read, write, _] = copies(64);
    assert!(read > 1.0 && write > 1.0, "cut into pieces: {read} {write}");
}

/// Member 1 dies while a read of its extent is in flight: the read ends with CHECK
/// CONDITION within 5 s (virtual), the session survives, reads of the other members'
/// extents go on, and a LUN RESET through the primary still gets its answer.
#[test]
fn a_member_killed_during_a_read_fails_it_in_bounded_time_and_the_rest_goes_on() {
    let cfg = config(4);
    let mut c = Cluster::new(&Settings::default(), &cfg, false, 11).unwrap();
    // Stripes of 2048 blocks: volume block 2048 k is on member k % 3.
    let on = |k: u64| k * 2048;
    let tur = ScriptStep::Command {
        cdb: vec![0; 6],
        read_len: 0,
        write: Vec::new(),
    };
    let script = vec![
        (0..6).map(|k| write(on(k))).collect(),
        vec![read(on(0)), read(on(1)), read(on(2))],
        vec![read(on(4))],
        vec![read(on(3)), read(on(5)), tur.clone()],
        vec![ScriptStep::TaskMgmt {
            function: 5,
            aborts: None,
        }],
        vec![read(on(3)), read(on(7))],
    ];
    let mut app = ScriptApp::new(&volume_url(false), script, [9; 23]).unwrap();
    let results = app.results();
    let mut cut = false;
    let log = c
        .run_with(&mut app, 2_000_000, |cl, _now| {
            if !cut && results.lock().unwrap().len() == 9 {
                cl.set_member_down(1, true);
                cut = true;
            }
        })
        .unwrap();
    assert!(app.error.is_none(), "{:?}; {log:#?}", app.error);
    let r = results.lock().unwrap().clone();
    let of = |batch: usize| -> Vec<_> {
        let mut v: Vec<_> = r.iter().filter(|x| x.batch == batch).cloned().collect();
        v.sort_by_key(|x| x.index);
        v
    };
    assert!(of(0).iter().all(|x| x.status == 0), "{:?}", of(0));
    for (x, k) in of(1).iter().zip([0, 1, 2]) {
        assert_eq!(x.status, 0);
        assert!(x.data == expected(on(k)), "read of stripe {k}");
    }
    let dead = &of(2)[0];
    assert_eq!(dead.status, 2, "CHECK CONDITION");
    assert_eq!(
        toe_iscsi::scsi::Sense::parse(&dead.sense).map(|s| (s.key, s.asc, s.ascq)),
        Some((0x0b, 0x08, 0x00)),
        "ABORTED COMMAND, LOGICAL UNIT COMMUNICATION FAILURE"
    );
    let took = dead.done_us - dead.sent_us;
    assert!(took <= 5_000_000, "took {took} µs");
    let after = of(3);
    assert_eq!(after.len(), 3);
    for (x, k) in after.iter().zip([3, 5]) {
        assert_eq!(x.status, 0, "stripe {k}");
        assert!(x.data == expected(on(k)), "read of stripe {k}");
    }
    assert_eq!(after[2].status, 0, "TEST UNIT READY: the session lives");
    assert_eq!(of(4)[0].status, 0, "LUN RESET: function complete");
    let last = of(5);
    // After the reset, a unit attention may come first; stripe 7 is on the dead member.
    assert!(
        last.iter().all(|x| x.status == 2 || x.status == 0),
        "{last:?}"
    );
    assert_eq!(last[1].status, 2, "still down");
    let s = c.proxy_stats();
    assert!(s.member_failures >= 2 && s.redials >= 1, "{s:?}");
    assert!(
        s.tmf_forwarded >= 1,
        "the LUN RESET went to the live members: {s:?}"
    );
}
