//! Helpers shared by the integration tests: host pairs with custom phys, and phy middleware
//! that rewrites, injects or corrupts frames.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddrV4;
use std::sync::Arc;

use parking_lot::Mutex;
use smoltcp::time::Instant;
use smoltcp::wire::{
    EthernetFrame, EthernetProtocol, IpAddress, IpProtocol, Ipv4Packet, TcpPacket,
};
use toe_bus::ConnId;
use toe_host::config::Settings;
use toe_host::runtime::{BoxPhy, Sim};
use toe_nic::{Frame, Phy};

/// Two hosts (10.0.0.1 and 10.0.0.2) on the given phys, host 1 listening on `port` and host 0
/// connected to it: (sim, client conn on host 0, server conn on host 1).
pub fn pair_on(
    settings: &Settings,
    seed: u64,
    port: u16,
    pa: BoxPhy,
    pb: BoxPhy,
) -> io::Result<(Sim, ConnId, ConnId)> {
    pair_traced(settings, seed, port, pa, pb, None)
}

/// [`pair_on`] with both drivers tracing bus traffic as JSON lines into `trace` (hosts
/// named `a` and `b`).
pub fn pair_traced(
    settings: &Settings,
    seed: u64,
    port: u16,
    pa: BoxPhy,
    pb: BoxPhy,
    trace: Option<toe_host::trace::SharedWriter>,
) -> io::Result<(Sim, ConnId, ConnId)> {
    let trace = trace.as_ref().map(|w| (w, ""));
    toe_host::pair::connected_pair_with(settings, settings, seed, port, pa, pb, trace)
}

/// Apply `f` to the TCP header of an IPv4/TCP frame and fix the checksum.
pub fn rewrite_tcp(frame: &mut [u8], f: impl FnOnce(&mut TcpPacket<&mut [u8]>)) -> bool {
    let Ok(mut eth) = EthernetFrame::new_checked(&mut frame[..]) else {
        return false;
    };
    if eth.ethertype() != EthernetProtocol::Ipv4 {
        return false;
    }
    let Ok(mut ip) = Ipv4Packet::new_checked(eth.payload_mut()) else {
        return false;
    };
    if ip.next_header() != IpProtocol::Tcp {
        return false;
    }
    let (src, dst) = (ip.src_addr(), ip.dst_addr());
    let Ok(mut tcp) = TcpPacket::new_checked(ip.payload_mut()) else {
        return false;
    };
    f(&mut tcp);
    tcp.fill_checksum(&IpAddress::Ipv4(src), &IpAddress::Ipv4(dst));
    true
}

/// Phy middleware: frames are rewritten by `on_rx` on the way in; frames queued in `inject`
/// are received before the port's own.
pub struct Middle<P> {
    /// The wrapped port.
    pub inner: P,
    /// Frames to receive next (shared with the test).
    pub inject: Arc<Mutex<VecDeque<Frame>>>,
    /// Received-frame rewriter: returns false to drop the frame.
    pub on_rx: Box<dyn FnMut(&mut Frame) -> bool + Send>,
}

impl<P: Phy> Middle<P> {
    /// Wrap `inner` with a receive rewriter.
    pub fn new(inner: P, on_rx: impl FnMut(&mut Frame) -> bool + Send + 'static) -> Self {
        Middle {
            inner,
            inject: Arc::new(Mutex::new(VecDeque::new())),
            on_rx: Box::new(on_rx),
        }
    }
}

impl<P: Phy> Phy for Middle<P> {
    fn recv(&mut self, now: Instant) -> Option<Frame> {
        if let Some(f) = self.inject.lock().pop_front() {
            return Some(f);
        }
        loop {
            let mut f = self.inner.recv(now)?;
            if (self.on_rx)(&mut f) {
                return Some(f);
            }
        }
    }
    fn send(&mut self, now: Instant, frame: Frame) -> Result<(), Frame> {
        self.inner.send(now, frame)
    }
    fn poll_at(&self) -> Option<Instant> {
        self.inner.poll_at()
    }
    fn can_send(&self) -> bool {
        self.inner.can_send()
    }
}

/// Receive rewriter that clears TCP PSH on every segment (a sender that never pushes).
pub fn strip_psh(frame: &mut Frame) -> bool {
    rewrite_tcp(frame, |t| t.set_psh(false));
    true
}

pub use toe_host::pair::hosts as hosts_with;

/// Send `data` from connection `conn` of host `host` (one send buffer).
pub fn send_bytes(sim: &Sim, host: usize, conn: ConnId, data: &[u8]) {
    let d = sim.driver(host);
    let mut d = d.lock();
    let mut b = d.alloc(data.len()).unwrap();
    d.memory().clone().slice_mut(&mut b).copy_from_slice(data);
    d.send(conn, b, data.len()).unwrap();
}

/// Read exactly `n` bytes from connection `conn` of host `host`, stepping the world as
/// needed (at most `max_steps` steps; panics if they do not come).
pub fn recv_exact(sim: &Sim, host: usize, conn: ConnId, n: usize, max_steps: u64) -> Vec<u8> {
    let d = sim.driver(host);
    let mut out = vec![0u8; n];
    let mut got = 0;
    sim.run_until(max_steps, || {
        got += d.lock().read(sim.now(), conn, &mut out[got..]).unwrap();
        got == n
    })
    .unwrap();
    out
}

/// The Ethernet address of host `i` (0-based) of [`toe_host::runtime::test_nic`].
pub fn host_mac(i: u8) -> [u8; 6] {
    [0x02, 0, 0, 0, 0, i + 1]
}

/// A TCP segment in an Ethernet frame with correct checksums, as a peer (or an attacker)
/// would put it on the wire: from `src` to `dst` (address, port), Ethernet destination
/// `dst_mac`.
#[allow(clippy::too_many_arguments)]
pub fn tcp_frame(
    src: SocketAddrV4,
    dst: SocketAddrV4,
    dst_mac: [u8; 6],
    control: smoltcp::wire::TcpControl,
    seq: u32,
    ack: Option<u32>,
    payload: &[u8],
) -> Frame {
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{
        EthernetAddress, EthernetRepr, Ipv4Address, Ipv4Repr, TcpRepr, TcpSeqNumber,
    };
    let tcp = TcpRepr {
        src_port: src.port(),
        dst_port: dst.port(),
        control,
        seq_number: TcpSeqNumber(seq as i32),
        ack_number: ack.map(|a| TcpSeqNumber(a as i32)),
        window_len: 65535,
        window_scale: None,
        max_seg_size: (control == smoltcp::wire::TcpControl::Syn).then_some(1460),
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload,
    };
    let (s, d): (Ipv4Address, Ipv4Address) = (*src.ip(), *dst.ip());
    let ip = Ipv4Repr {
        src_addr: s,
        dst_addr: d,
        next_header: IpProtocol::Tcp,
        payload_len: tcp.buffer_len(),
        hop_limit: 64,
    };
    let eth = EthernetRepr {
        src_addr: EthernetAddress([0x02, 0xee, 0, 0, 0, 1]),
        dst_addr: EthernetAddress(dst_mac),
        ethertype: EthernetProtocol::Ipv4,
    };
    let mut frame = vec![0u8; 14 + 20 + tcp.buffer_len()];
    let caps = ChecksumCapabilities::default();
    let mut e = EthernetFrame::new_unchecked(&mut frame[..]);
    eth.emit(&mut e);
    let mut p = Ipv4Packet::new_unchecked(e.payload_mut());
    ip.emit(&mut p, &caps);
    let mut t = TcpPacket::new_unchecked(p.payload_mut());
    tcp.emit(&mut t, &IpAddress::Ipv4(s), &IpAddress::Ipv4(d), &caps);
    frame
}

/// Runs system tool `tool` (from Debian package `package`); a missing tool fails the test
/// and says how to install it.
pub fn run_tool(tool: &str, package: &str, args: &[&str]) -> std::process::Output {
    tool_result(
        tool,
        package,
        std::process::Command::new(tool).args(args).output(),
    )
}

/// Starts system tool `tool` (a daemon, from Debian package `package`) with its output in
/// `log`; a missing tool fails the test as in [`run_tool`]. The caller stops it by PID.
pub fn spawn_tool(
    tool: &str,
    package: &str,
    args: &[&str],
    log: &std::path::Path,
) -> std::process::Child {
    let out = std::fs::File::create(log).expect("log file");
    let err = out.try_clone().expect("log file");
    let child = std::process::Command::new(tool)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn();
    tool_result(tool, package, child)
}

fn tool_result<T>(tool: &str, package: &str, r: std::io::Result<T>) -> T {
    match r {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "{tool} is not installed, and this test needs it: install it with `apt-get update && \
             DEBIAN_FRONTEND=noninteractive apt-get install -y {package}` (`cargo xtask test` \
             and `cargo xtask ci` do this before the tests)"
        ),
        Err(e) => panic!("cannot run {tool}: {e}"),
    }
}

/// Runs tshark (it must succeed); its standard output.
pub fn tshark(args: &[&str]) -> String {
    let out = run_tool("tshark", "tshark", args);
    assert!(
        out.status.success(),
        "tshark {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("tshark prints UTF-8")
}

/// The suites of the minimal disk profile (issue 9, check 1).
pub const MINIMAL_PROFILE: &[&str] = &[
    "SCSI.TestUnitReady",
    "SCSI.Inquiry",
    "SCSI.ReadCapacity10",
    "SCSI.ReadCapacity16",
    "SCSI.Read10",
    "SCSI.Read16",
    "SCSI.Write10",
    "SCSI.Write16",
    "SCSI.ModeSense6",
    "SCSI.Mandatory",
    "iSCSI.iSCSIcmdsn",
    "iSCSI.iSCSIdatasn",
    "iSCSI.iSCSIResiduals",
    "iSCSI.iSCSITMF",
];

/// Per-test verdicts of one `iscsi-test-cu -v` run: (passed, skipped, failed) test names.
/// CUnit counts a skip as a pass; libiscsi's tests log `[SKIPPED]` when they skip, so a
/// test whose lines hold that word before its verdict is counted apart.
pub fn cunit_verdicts(out: &str) -> (Vec<String>, Vec<String>, Vec<String>) {
    let (mut pass, mut skip, mut fail) = (Vec::new(), Vec::new(), Vec::new());
    let mut current: Option<(String, String)> = None;
    let mut close = |c: Option<(String, String)>| {
        if let Some((name, text)) = c {
            match cunit_verdict(&text) {
                Some((end, true)) if text[..end].contains("[SKIPPED]") => skip.push(name),
                Some((_, true)) => pass.push(name),
                Some((_, false)) => fail.push(name),
                None => fail.push(format!("{name} (no verdict)")),
            }
        }
    };
    for line in out.lines() {
        let line = line.trim_end();
        if let Some(rest) = line.trim_start().strip_prefix("Test: ") {
            close(current.take());
            let name = rest.split(" ...").next().unwrap_or(rest).to_string();
            current = Some((name, rest.to_string()));
        } else if line.contains("Run Summary") {
            close(current.take());
        } else if let Some((_, text)) = current.as_mut() {
            // Up to the verdict: what follows it is the suite's teardown (which sends
            // PERSISTENT RESERVE IN to clear reservations, and logs what that did).
            if cunit_verdict(text).is_none() {
                text.push('\n');
                text.push_str(line);
            }
        }
    }
    close(current);
    (pass, skip, fail)
}

/// CUnit's verdict in a test's lines: where it ends and whether the test passed. The
/// verdict is the first `passed`, or the first `FAILED` that is not libiscsi logging a
/// command that failed (`[FAILED] ...`, which a test may expect); teardown output can
/// follow it on the same line.
fn cunit_verdict(text: &str) -> Option<(usize, bool)> {
    let passed = text.find("passed").map(|i| (i + "passed".len(), true));
    let failed = text
        .match_indices("FAILED")
        .find(|(i, _)| !text[..*i].ends_with('['))
        .map(|(i, _)| (i + "FAILED".len(), false));
    match (passed, failed) {
        (Some(p), Some(f)) => Some(if p.0 < f.0 { p } else { f }),
        (p, f) => p.or(f),
    }
}

#[cfg(test)]
mod verdict_tests {
    use super::cunit_verdicts;

    /// The verdicts of lines as iscsi-test-cu 1.19.0 prints them: a skip, a pass whose
    /// expected command failures are logged, a failure, a pass followed on its line by
    /// the suite teardown's log, and a test cut off without a verdict.
    #[test]
    fn verdicts_are_read_up_to_cunits_word() {
        let out = "Suite: A
  Test: Skipped ...    [SKIPPED] EXTENDEDCOPY is not implemented.
passed
  Test: Expected ...    [FAILED] WRITE10 command failed with status 2
passed
  Test: Broken ...FAILED
    1. test_x.c:69  - CU_ASSERT_NOT_EQUAL(num_uas,0)
  Test: Teardown ...passed    [FAILED] PRIN command: failed with sense. [SKIPPED] x
Suite: B
  Test: Cut ...
Run Summary:";
        let (p, s, f) = cunit_verdicts(out);
        assert_eq!(p, ["Expected", "Teardown"]);
        assert_eq!(s, ["Skipped"]);
        assert_eq!(f, ["Broken", "Cut (no verdict)"]);
    }
}

/// Run libiscsi's minimal disk profile against `url` (every suite of [`MINIMAL_PROFILE`],
/// `iscsi-test-cu -d -v -t SUITE URL` through `run`, which returns the tool's output) and
/// assert 0 failures and at least 54 passes, skips counted apart.
pub fn assert_minimal_profile_passes(url: &str, run: impl Fn(&[&str]) -> String) {
    let (mut pass, mut skip, mut fail) = (Vec::new(), Vec::new(), Vec::new());
    for suite in MINIMAL_PROFILE {
        let out = run(&["-d", "-v", "-t", suite, url]);
        let (p, s, f) = cunit_verdicts(&out);
        assert!(
            !(p.is_empty() && s.is_empty() && f.is_empty()),
            "{suite}: no test ran:\n{out}"
        );
        pass.extend(p.into_iter().map(|n| format!("{suite}.{n}")));
        skip.extend(s.into_iter().map(|n| format!("{suite}.{n}")));
        fail.extend(f.into_iter().map(|n| format!("{suite}.{n}")));
    }
    eprintln!(
        "iscsi-test-cu minimal profile ({url}): {} passed, {} skipped, {} failed; skipped: {skip:?}",
        pass.len(),
        skip.len(),
        fail.len()
    );
    assert!(fail.is_empty(), "failed: {fail:?}");
    assert!(
        pass.len() >= 54,
        "only {} passed (skipped: {skip:?})",
        pass.len()
    );
}

/// Stop a process a test started: SIGTERM by its PID, up to `grace` to exit, then SIGKILL;
/// reaped either way.
pub fn stop_by_pid(child: &mut std::process::Child, grace: std::time::Duration) {
    let _ = std::process::Command::new("kill")
        .arg(child.id().to_string())
        .status();
    let t0 = std::time::Instant::now();
    while child.try_wait().ok().flatten().is_none() && t0.elapsed() < grace {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// tgt (Debian `tgt`), a target nobody here wrote, started by a test.
pub mod tgt {
    use std::path::PathBuf;
    use std::process::Child;
    use std::time::{Duration, Instant};

    /// The open target's name.
    pub const IQN: &str = "iqn.2026-12.org.toemu:tgt-disk";
    /// The name of the target that requires CHAP.
    pub const CHAP_IQN: &str = "iqn.2026-12.org.toemu:tgt-chap";

    /// A tgtd: two targets, each with a 96 MiB file disk at LUN 1 (tgt's LUN 0 is its
    /// controller); the second requires CHAP (alice / secret-of-alice). Stopped by PID on drop.
    pub struct Tgt {
        child: Child,
        control: String,
        /// Its portal, `ADDR:PORT`.
        pub portal: String,
        dir: PathBuf,
    }

    impl Tgt {
        /// Start tgtd (in network namespace `netns`, if given) with its portal at `portal`
        /// (`ADDR:PORT`), and configure it. Needs root: its control socket is under
        /// /var/run/tgtd.
        pub fn start(name: &str, netns: Option<&str>, portal: &str) -> Tgt {
            let dir = std::env::temp_dir().join(format!("toemu-tgt-{}-{name}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            if let Err(e) = std::fs::create_dir_all("/var/run/tgtd") {
                panic!("tgtd keeps its control socket in /var/run/tgtd, which cannot be made ({e}): run the tests as root");
            }
            // The control port only names tgtd's control socket: unique per test process and test.
            static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let k = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            // tgtd takes numbers below 32768.
            let control = format!("{}", 1_000 + (std::process::id() % 1_500) * 16 + k % 16);
            let portal_arg = format!("portal={portal}");
            let args = ["-f", "-C", &control, "--iscsi", &portal_arg];
            let log = dir.join("tgtd.log");
            let child = match netns {
                None => crate::spawn_tool("tgtd", "tgt", &args, &log),
                Some(ns) => {
                    // `ip netns exec` runs tgtd in place (same PID): check it is installed first.
                    crate::run_tool("tgtd", "tgt", &["--version"]);
                    let mut a = vec!["netns", "exec", ns, "tgtd"];
                    a.extend_from_slice(&args);
                    crate::spawn_tool("ip", "iproute2", &a, &log)
                }
            };
            let mut t = Tgt {
                child,
                control,
                portal: portal.to_string(),
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

        /// Start tgtd on 127.0.0.1 (see [`Tgt::start`]) at a port below the kernel's
        /// ephemeral range (32768 and up), so that no test binding port 0 takes it before
        /// tgtd does: from 16 ports picked by PID, the next one that binds now (one per
        /// call, so concurrent tests in one process get different ports).
        pub fn start_on_loopback(name: &str) -> Tgt {
            static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
            let base = 20_000 + (std::process::id() % 750) as u16 * 16;
            for _ in 0..16 {
                let port = base + NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 16;
                if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                    return Tgt::start(name, None, &format!("127.0.0.1:{port}"));
                }
            }
            panic!("no free port for tgtd in {base}..{}", base + 16);
        }

        /// Runs tgtadm on this tgtd: (success, output).
        pub fn adm(&self, args: &[&str]) -> (bool, String) {
            let mut a = vec!["-C", &self.control, "--lld", "iscsi"];
            a.extend_from_slice(args);
            let out = crate::run_tool("tgtadm", "tgt", &a);
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            (out.status.success(), text)
        }

        /// Runs tgtadm, which must succeed.
        pub fn ok(&self, args: &[&str]) {
            let (ok, out) = self.adm(args);
            assert!(ok, "tgtadm {args:?}: {out}\ntgtd log: {}", self.log());
        }

        /// tgtd's output so far.
        pub fn log(&self) -> String {
            std::fs::read_to_string(self.dir.join("tgtd.log")).unwrap_or_default()
        }

        /// The URL of LUN 1 of `iqn`, with `auth` (`user%secret@` or empty) and `query`.
        pub fn url(&self, auth: &str, iqn: &str, query: &str) -> toemu_lab::iscsi::IscsiUrl {
            format!("iscsi://{auth}{}/{iqn}/1{query}", self.portal)
                .parse()
                .unwrap()
        }
    }

    impl Drop for Tgt {
        fn drop(&mut self) {
            // SIGTERM, by PID; tgtd exits at once (nothing is left to flush: its file LUNs are
            // written through).
            super::stop_by_pid(&mut self.child, Duration::from_secs(5));
            let _ = std::fs::remove_dir_all(&self.dir);
            for f in ["", ".lock"] {
                let _ = std::fs::remove_file(format!("/var/run/tgtd/socket.{}{f}", self.control));
            }
        }
    }
}

/// A wire of 1 ms one way in each direction with these probabilities of loss, reordering,
/// duplication and corruption (one bit flipped), from wire seed `seed`.
pub fn impaired(
    loss: f64,
    reorder: f64,
    dup: f64,
    corrupt: f64,
    seed: u64,
) -> toe_host::wire_opts::WireOptions {
    toe_host::wire_opts::WireOptions {
        impair: toe_nic::impair::ImpairConfig {
            delay: toe_bus::time::Duration::from_millis(1),
            loss,
            reorder,
            dup,
            corrupt,
            seed,
            ..toe_nic::impair::ImpairConfig::default()
        },
        pcap: None,
    }
}
