//! Proxy I/O in a target cluster (seed 001) on the virtual clock: data written through
//! the primary lands on the members the LBA map names and reads back through the primary;
//! a member that goes down fails its commands with CHECK CONDITION in bounded time while
//! the session and the other extents go on.

use toe_host::config::Settings;
use toemu_lab::cluster::{front_addr, Cluster, ClusterConfig, VOLUME_IQN, VOLUME_PORT};
use toemu_lab::iscsi::IscsiUrl;
use toemu_lab::iscsi_host::PerfApp;
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
    format!(
        "iscsi://{}:{VOLUME_PORT}/{VOLUME_IQN}/0{q}",
        front_addr(0)
    )
    .parse()
    .unwrap()
}

/// Our initiator writes seeded data through the primary and reads it back through it;
/// every member's own LUN holds, extent by extent, the blocks the map gives it.
#[test]
fn data_written_through_the_primary_lands_on_the_members_and_reads_back() {
    let cfg = config(96);
    let mut c = Cluster::new(&Settings::default(), &cfg, true, 7).unwrap();
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
        let got = c.disks[e.member].lock().unwrap().execute(&cdb, &[]).data_in;
        assert!(got == want, "extent at {} on member {}", e.lba, e.member);
        checked += 1;
    }
    assert!(checked >= 6, "{checked} extents");
    let s = c.proxy_stats();
    assert!(s.local_pieces > 0 && s.member_pieces > 0, "{s:?}");
}
