//! toemu's initiator against tgt (Debian `tgt`, 1.0.85), a target nobody here wrote, on
//! 127.0.0.1: discovery and LUN listing, CHAP with the right and a wrong secret, and 64 MiB
//! written with a seeded pattern and read back identical at queue depth 1 and 32, with and
//! without header and data digests.
//!
//! Each test starts its own `tgtd` in the foreground (its own control port and portal),
//! configures it with `tgtadm`, and stops it by PID. tgtd needs root (its control socket is
//! under /var/run/tgtd); without it the test fails saying so.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

use toemu_lab::iscsi::{IscsiUrl, TcpInitiator};
use toemu_lab::iscsi_perf::{perf, PerfOptions};

const IQN: &str = "iqn.2026-12.org.toemu:tgt-disk";
const CHAP_IQN: &str = "iqn.2026-12.org.toemu:tgt-chap";

/// A tgtd of this test: two targets, each with a 96 MiB file disk at LUN 1 (tgt's LUN 0 is
/// its controller); the second requires CHAP (alice / secret-of-alice).
struct Tgt {
    child: Child,
    control: String,
    portal: String,
    dir: PathBuf,
}

impl Tgt {
    fn start(name: &str) -> Tgt {
        let dir = std::env::temp_dir().join(format!("toemu-tgt-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        if let Err(e) = std::fs::create_dir_all("/var/run/tgtd") {
            panic!("tgtd keeps its control socket in /var/run/tgtd, which cannot be made ({e}): run the tests as root");
        }
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        // The control port only names tgtd's control socket: unique per test process and test.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let k = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // tgtd takes numbers below 32768.
        let control = format!("{}", 1_000 + (std::process::id() % 1_500) * 16 + k % 16);
        let portal = format!("127.0.0.1:{port}");
        let child = toemu_tests::spawn_tool(
            "tgtd",
            "tgt",
            &["-f", "-C", &control, "--iscsi", &format!("portal={portal}")],
            &dir.join("tgtd.log"),
        );
        let mut t = Tgt {
            child,
            control,
            portal,
            dir,
        };
        let t0 = Instant::now();
        while !t.adm(&["--op", "show", "--mode", "target"]).0 {
            if let Ok(Some(status)) = t.child.try_wait() {
                panic!("tgtd exited ({status}): {}", t.log());
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "tgtd does not answer tgtadm: {}",
                t.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        for (tid, iqn) in [("1", IQN), ("2", CHAP_IQN)] {
            let img = t.dir.join(format!("lun{tid}.img"));
            std::fs::File::create(&img)
                .unwrap()
                .set_len(96 << 20)
                .unwrap();
            t.ok(&["--op", "new", "--mode", "target", "--tid", tid, "-T", iqn]);
            t.ok(&[
                "--op",
                "new",
                "--mode",
                "logicalunit",
                "--tid",
                tid,
                "--lun",
                "1",
                "-b",
                img.to_str().unwrap(),
            ]);
            t.ok(&[
                "--op", "bind", "--mode", "target", "--tid", tid, "-I", "ALL",
            ]);
            for key in ["HeaderDigest", "DataDigest"] {
                t.ok(&[
                    "--op",
                    "update",
                    "--mode",
                    "target",
                    "--tid",
                    tid,
                    "-n",
                    key,
                    "-v",
                    "CRC32C,None",
                ]);
            }
        }
        t.ok(&[
            "--op",
            "new",
            "--mode",
            "account",
            "--user",
            "alice",
            "--password",
            "secret-of-alice",
        ]);
        t.ok(&[
            "--op", "bind", "--mode", "account", "--tid", "2", "--user", "alice",
        ]);
        t
    }

    /// Runs tgtadm on this tgtd: (success, output).
    fn adm(&self, args: &[&str]) -> (bool, String) {
        let mut a = vec!["-C", &self.control, "--lld", "iscsi"];
        a.extend_from_slice(args);
        let out = toemu_tests::run_tool("tgtadm", "tgt", &a);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    fn ok(&self, args: &[&str]) {
        let (ok, out) = self.adm(args);
        assert!(ok, "tgtadm {args:?}: {out}\ntgtd log: {}", self.log());
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("tgtd.log")).unwrap_or_default()
    }

    fn url(&self, auth: &str, iqn: &str, query: &str) -> IscsiUrl {
        format!("iscsi://{auth}{}/{iqn}/1{query}", self.portal)
            .parse()
            .unwrap()
    }
}

impl Drop for Tgt {
    fn drop(&mut self) {
        // SIGTERM, by PID; tgtd exits at once (nothing is left to flush: its file LUNs are
        // written through).
        let pid = self.child.id().to_string();
        let _ = std::process::Command::new("kill").arg(&pid).status();
        let t0 = Instant::now();
        while self.child.try_wait().ok().flatten().is_none()
            && t0.elapsed() < Duration::from_secs(5)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
        for f in ["", ".lock"] {
            let _ = std::fs::remove_file(format!("/var/run/tgtd/socket.{}{f}", self.control));
        }
    }
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
    let t = Tgt::start("ls");
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
    let t = Tgt::start("rw");
    let url = t.url("", IQN, "");
    write_and_read_back(&t, &url, 1, 64 << 10);
    write_and_read_back(&t, &url, 32, 128 << 10);
    write_and_read_back(&t, &url, 32, 4096);
}

#[test]
fn our_initiator_uses_header_and_data_digests_with_tgt() {
    let t = Tgt::start("digest");
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
    let t = Tgt::start("chap");
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
