//! toemu's initiator against tgt (Debian `tgt`, 1.0.85), a target nobody here wrote, on
//! 127.0.0.1: discovery and LUN listing, CHAP with the right and a wrong secret, and 64 MiB
//! written with a seeded pattern and read back identical at queue depth 1 and 32, with and
//! without header and data digests.
//!
//! Each test starts its own `tgtd` in the foreground (its own control port and portal),
//! configures it with `tgtadm`, and stops it by PID. tgtd needs root (its control socket is
//! under /var/run/tgtd); without it the test fails saying so.

use std::net::TcpListener;

use toemu_lab::iscsi::{IscsiUrl, TcpInitiator};
use toemu_lab::iscsi_perf::{perf, PerfOptions};
use toemu_tests::tgt::{Tgt, CHAP_IQN, IQN};

/// A tgtd for this test on a free port of 127.0.0.1.
fn tgt(name: &str) -> Tgt {
    Tgt::start_on_loopback(name)
}

/// 64 MiB written with the pattern at `depth` in `io`-byte I/Os and read back: every command
/// good, every block identical.
fn write_and_read_back(t: &Tgt, url: &IscsiUrl, depth: usize, io: u32) {
    let o = PerfOptions {
        io_bytes: io,
        depth,
        bytes: Some(64 << 20),
        verify: true,
        seed: u64::from(io) * 31 + depth as u64,
        ..PerfOptions::default()
    };
    let r = perf(url, &o).unwrap_or_else(|e| panic!("{url:?}: {e}\ntgtd log:\n{}", t.log()));
    assert!(r.ok(), "{r:#?}\ntgtd log:\n{}", t.log());
    assert_eq!(r.phases.len(), 2);
    for p in &r.phases {
        assert_eq!(p.bytes, 64 << 20, "{r:#?}");
    }
    assert_eq!(r.mismatches, Some(0));
    assert_eq!(r.header_digest, url.header_digest);
    assert_eq!(r.data_digest, url.data_digest);
}

#[test]
fn our_initiator_lists_tgts_targets_and_luns() {
    let t = tgt("ls");
    let url: IscsiUrl = format!("iscsi://{}/", t.portal).parse().unwrap();
    let out = toemu_lab::iscsi::ls(&url, false).unwrap();
    for iqn in [IQN, CHAP_IQN] {
        assert!(
            out.contains(&format!("Target:{iqn} Portal:{},1", t.portal)),
            "our discovery printed {out:?}"
        );
    }
    let one: IscsiUrl = format!("iscsi://{}/{IQN}", t.portal).parse().unwrap();
    let mut s = TcpInitiator::login(&one, Some(IQN)).unwrap();
    // REPORT LUNS: the controller at 0 and the disk at 1
    let c = s
        .command(
            0,
            &[0xa0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0],
            4096,
            Vec::new(),
        )
        .unwrap();
    assert_eq!(
        (
            c.status,
            u32::from_be_bytes(c.data[..4].try_into().unwrap())
        ),
        (0, 16),
        "{c:?}"
    );
    // READ CAPACITY(16) of LUN 1 (tgt's first command gets UNIT ATTENTION; `command` retries)
    let mut cdb = [0u8; 16];
    cdb[0] = 0x9e;
    cdb[1] = 0x10;
    cdb[13] = 32;
    let rc = s.command(1, &cdb, 32, Vec::new()).unwrap();
    assert_eq!(rc.status, 0, "{rc:?}");
    let last = u64::from_be_bytes(rc.data[..8].try_into().unwrap());
    let block = u32::from_be_bytes(rc.data[8..12].try_into().unwrap());
    assert_eq!((last + 1) * u64::from(block), 96 << 20);
    s.logout().unwrap();
}

#[test]
fn our_initiator_writes_and_reads_back_64_mib_on_tgt_at_qd1_and_qd32() {
    let t = tgt("rw");
    let url = t.url("", IQN, "");
    write_and_read_back(&t, &url, 1, 64 << 10);
    write_and_read_back(&t, &url, 32, 128 << 10);
    write_and_read_back(&t, &url, 32, 4096);
}

#[test]
fn our_initiator_uses_header_and_data_digests_with_tgt() {
    let t = tgt("digest");
    write_and_read_back(&t, &t.url("", IQN, "?header_digest=crc32c"), 32, 128 << 10);
    write_and_read_back(
        &t,
        &t.url("", IQN, "?header_digest=crc32c&data_digest=crc32c"),
        32,
        128 << 10,
    );
    write_and_read_back(
        &t,
        &t.url("", IQN, "?header_digest=crc32c&data_digest=crc32c"),
        1,
        64 << 10,
    );
}

#[test]
fn our_initiator_logs_in_to_tgt_with_chap_and_a_wrong_secret_is_refused() {
    let t = tgt("chap");
    write_and_read_back(
        &t,
        &t.url("alice%secret-of-alice@", CHAP_IQN, ""),
        32,
        128 << 10,
    );
    let e = TcpInitiator::login(&t.url("alice%guess@", CHAP_IQN, ""), Some(CHAP_IQN)).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
    let e = TcpInitiator::login(&t.url("", CHAP_IQN, ""), Some(CHAP_IQN)).unwrap_err();
    assert_eq!(
        e.kind(),
        std::io::ErrorKind::PermissionDenied,
        "without credentials: {e}"
    );
}

/// libiscsi's whole conformance run (`iscsi-test-cu -d -t ALL`) against toemu's target and
/// against tgt, in the same run, on LUNs of the same size: toemu passes at least as many tests
/// as tgt, with at most 3 failures (skips counted apart from CUnit's passes).
#[test]
fn iscsi_test_cu_all_passes_at_least_as_many_tests_as_tgt() {
    use std::sync::{Arc, Mutex};
    use toe_iscsi::login::TargetConfig;
    use toe_iscsi::scsi::{Disk, MemStore};
    let iqn = "iqn.2026-12.org.toemu:disk";
    let ours = toemu_lab::iscsi::TcpTarget::start(
        TcpListener::bind("127.0.0.1:0").unwrap(),
        TargetConfig::offering_digests(iqn),
        Some(Arc::new(Mutex::new(Disk::new(
            Box::new(MemStore::new(96 << 20)),
            512,
            "TOEMU0001",
        )))),
    )
    .unwrap();
    let theirs = tgt("all");
    // The URL twice: two paths to the same logical unit, for the MultipathIO suite.
    let run = |url: &str| {
        let out = toemu_tests::run_tool(
            "iscsi-test-cu",
            "libiscsi-bin",
            &["-d", "-v", "-t", "ALL", url, url],
        );
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        toemu_tests::cunit_verdicts(&text)
    };
    let (p, s, f) = run(&format!("iscsi://{}/{iqn}/0", ours.addr()));
    let (tp, ts, tf) = run(&format!("iscsi://{}/{IQN}/1", theirs.portal));
    eprintln!(
        "iscsi-test-cu ALL: toemu {} passed, {} skipped, {} failed {f:?}; tgt {} passed, {} skipped, {} failed {tf:?}",
        p.len(),
        s.len(),
        f.len(),
        tp.len(),
        ts.len(),
        tf.len()
    );
    assert!(
        tp.len() > 100,
        "tgt ran too few tests: {tp:?} {ts:?} {tf:?}"
    );
    assert!(
        p.len() >= tp.len(),
        "toemu passes {} tests, tgt {}; toemu failed {f:?}",
        p.len(),
        tp.len()
    );
    assert!(f.len() <= 3, "toemu failed {f:?}");
}
