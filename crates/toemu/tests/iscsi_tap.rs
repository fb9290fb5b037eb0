//! toemu's iSCSI target on an emulated TOE host on a TAP device, inside a network namespace
//! this test creates and deletes, against libiscsi's tools running in the namespace (real
//! Linux initiators): discovery with `iscsi-ls`, and the minimal disk profile of
//! `iscsi-test-cu` without and with header digests, also against the primary of a target
//! cluster.
//!
//! Needs root (namespaces and TAP devices): without it the test fails and says why.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TOEMU: &str = env!("CARGO_BIN_EXE_toemu");
const IQN: &str = "iqn.2026-12.org.toemu:disk";
const HOST: &str = "10.98.0.2";
const LINUX: &str = "10.98.0.1";

/// A network namespace with toemu's target on `tap0` in it; on drop the target is stopped by
/// PID and the namespace deleted.
struct Lab {
    ns: String,
    target: Option<Child>,
    dir: PathBuf,
}

impl Lab {
    /// A fresh namespace (loopback up), nothing in it yet.
    fn new(name: &str) -> Lab {
        let ns = format!("toemu-iscsi-{}-{name}", std::process::id());
        let made = Command::new("ip").args(["netns", "add", &ns]).output();
        match made {
            Ok(o) if o.status.success() => {}
            Ok(o) => panic!(
                "cannot create network namespace {ns} (this test needs root for namespaces and TAP devices): {}",
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => panic!("cannot run `ip` (Debian iproute2): {e}"),
        }
        let dir = std::env::temp_dir().join(&ns);
        std::fs::create_dir_all(&dir).unwrap();
        let lab = Lab {
            ns,
            target: None,
            dir,
        };
        lab.sh("ip link set lo up");
        lab
    }

    /// A namespace with toemu's target on `tap0`, answering on port 3260.
    fn start(name: &str) -> Lab {
        let mut lab = Lab::new(name);
        let lun = lab.dir.join("lun.img").display().to_string();
        let args = ["iscsi", "target", "--size", "64MiB", "--offload", "engine"];
        lab.spawn(&args, &["--lun", &lun], 3260);
        lab
    }

    /// Run `toemu ARGS --tap tap0 --ip HOST/24 MORE` in the namespace, its output to
    /// `target.log`; return once `tap0` is up and HOST answers on `port`.
    fn spawn(&mut self, args: &[&str], more: &[&str], port: u16) {
        let lab = self;
        let log = std::fs::File::create(lab.dir.join("target.log")).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &lab.ns, TOEMU])
            .args(args)
            .args(["--tap", "tap0", "--ip", &format!("{HOST}/24")])
            .args(more)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        lab.target = Some(child);
        let t0 = Instant::now();
        while !lab.try_sh("ip link show tap0") {
            lab.alive();
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "tap0 never appeared: {}",
                lab.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        lab.sh(&format!(
            "ip addr add {LINUX}/24 dev tap0 && ip link set tap0 up"
        ));
        let probe = format!(
            "python3 -c 'import socket; socket.create_connection((\"{HOST}\", {port}), 1).close()'"
        );
        while !lab.try_sh(&probe) {
            lab.alive();
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "the target does not answer on {HOST}:{port}: {}",
                lab.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Give the namespace a TAP device `tap0` with LINUX's address (an emulated host
    /// opens it later), then run `toemu ARGS` on Linux in the namespace, its output to
    /// `target.log`; return once LINUX answers on `port`.
    fn spawn_linux(&mut self, args: &[&str], port: u16) {
        self.sh(&format!(
            "ip tuntap add tap0 mode tap && ip addr add {LINUX}/24 dev tap0 && ip link set tap0 up"
        ));
        let log = std::fs::File::create(self.dir.join("target.log")).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns, TOEMU])
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.target = Some(child);
        let probe = format!(
            "python3 -c 'import socket; socket.create_connection((\"{LINUX}\", {port}), 1).close()'"
        );
        let t0 = Instant::now();
        while !self.try_sh(&probe) {
            self.alive();
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "nothing answers on {LINUX}:{port}: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Make `toemu msg certs` for `store` and `backup` in the lab's directory: the TLS
    /// options of either name.
    fn msg_certs(&self) -> impl Fn(&str) -> [String; 7] {
        let c = self.dir.join("certs").display().to_string();
        let (ok, out) = self.run(
            TOEMU,
            &["msg", "certs", "--dir", &c, "--names", "store,backup"],
        );
        assert!(ok, "{out}");
        move |who: &str| {
            [
                "--tls".to_string(),
                "--cert".into(),
                format!("{c}/{who}.pem"),
                "--key".into(),
                format!("{c}/{who}.key"),
                "--ca".into(),
                format!("{c}/ca.pem"),
            ]
        }
    }

    /// Stop toemu by PID (SIGTERM) and wait for it to exit: its status, and how long it
    /// took (more than `max` fails the test).
    fn stop(&mut self, max: Duration) -> (std::process::ExitStatus, Duration) {
        let mut c = self.target.take().expect("started");
        Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()
            .unwrap();
        let t0 = Instant::now();
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                return (s, t0.elapsed());
            }
            if t0.elapsed() > max {
                let _ = c.kill();
                panic!("still running {max:?} after SIGTERM: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn alive(&mut self) {
        if let Some(Ok(Some(s))) = self.target.as_mut().map(Child::try_wait) {
            panic!("toemu iscsi target exited ({s}): {}", self.log());
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("target.log")).unwrap_or_default()
    }

    fn try_sh(&self, script: &str) -> bool {
        Command::new("ip")
            .args(["netns", "exec", &self.ns, "sh", "-c", script])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    fn sh(&self, script: &str) {
        assert!(self.try_sh(script), "`{script}` failed in {}", self.ns);
    }

    /// Run `tool ARGS` in the namespace: its output and error output.
    fn run(&self, tool: &str, args: &[&str]) -> (bool, String) {
        let mut a = vec!["netns", "exec", &self.ns, tool];
        a.extend_from_slice(args);
        let o = toemu_tests::run_tool("ip", "iproute2", &a);
        (
            o.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        )
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(mut c) = self.target.take() {
            toemu_tests::stop_by_pid(&mut c, Duration::from_secs(5));
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// libiscsi must be installed (its missing-tool message names the package).
fn need_libiscsi() {
    toemu_tests::run_tool("iscsi-ls", "libiscsi-bin", &["--usage"]);
}

#[test]
fn libiscsi_discovers_the_target_on_an_emulated_toe_host() {
    need_libiscsi();
    let lab = Lab::start("ls");
    let (ok, out) = lab.run("iscsi-ls", &["-s", &format!("iscsi://{HOST}/")]);
    assert!(ok, "iscsi-ls failed:\n{out}\ntarget log:\n{}", lab.log());
    assert!(
        out.contains(&format!("Target:{IQN} Portal:{HOST}:3260,1")),
        "{out}"
    );
    assert!(
        out.contains("Lun:0") && out.contains("DIRECT_ACCESS"),
        "{out}"
    );
    // SIGTERM: no session is left to ask to log out, so the target flushes the disk,
    // prints its counters and exits at once (well within its 5 s grace).
    let mut lab = lab;
    let (status, _) = lab.stop(Duration::from_secs(4));
    assert!(status.success(), "{status}: {}", lab.log());
    assert!(lab.log().contains("stopped; flushed ok"), "{}", lab.log());
}

#[test]
fn iscsi_test_cu_minimal_disk_profile_passes_on_an_emulated_toe_host() {
    need_libiscsi();
    let lab = Lab::start("cu");
    for query in ["", "?header_digest=crc32c"] {
        let url = format!("iscsi://{HOST}/{IQN}/0{query}");
        toemu_tests::assert_minimal_profile_passes(&url, |args| lab.run("iscsi-test-cu", args).1);
    }
    // The connections ran on the engine: each read's and write's buffer went to the NIC.
    let log = lab.log();
    assert!(log.contains("offload engine"), "{log}");
    let registered = |l: &str| {
        let (_, rest) = l.split_once("offload requests, ")?;
        rest.split_once(' ')?.0.parse::<u64>().ok()
    };
    let total: u64 = log.lines().filter_map(registered).sum();
    assert!(total > 1000, "{total} buffers registered: {log}");
}

/// The primary of a three-member cluster on the TAP device (`toemu iscsi cluster --tap`,
/// the proxy I/O of seed 001), its volume striped over all three members: libiscsi's
/// minimal disk profile passes against the volume, and the proxy sent pieces to the other
/// members over its back NIC, none of them failed.
#[test]
fn iscsi_test_cu_minimal_disk_profile_passes_against_a_cluster_primary() {
    need_libiscsi();
    let mut lab = Lab::new("cluster");
    let config = lab.dir.join("cluster.toml");
    // 32 MiB per member, striped in 1 MiB stripes: every suite's I/O crosses members.
    std::fs::write(
        &config,
        "[cluster]\nmembers = 3\nmember_blocks = 65536\nstripe_blocks = 2048\n",
    )
    .unwrap();
    let config = config.display().to_string();
    lab.spawn(&["--config", &config, "iscsi", "cluster"], &[], 3261);
    let t0 = Instant::now();
    while !lab.log().contains("cluster ready: 3 members") {
        lab.alive();
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the primary's back sessions did not come up: {}",
            lab.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let url = format!("iscsi://{HOST}:3261/iqn.2026-12.org.toemu:volume/0");
    toemu_tests::assert_minimal_profile_passes(&url, |args| lab.run("iscsi-test-cu", args).1);
    let (status, _) = lab.stop(Duration::from_secs(10));
    let log = lab.log();
    assert!(status.success(), "{status}: {log}");
    let stats = log
        .lines()
        .find_map(|l| {
            l.split_once("toemu iscsi cluster: stopped; ")
                .map(|(_, s)| s)
        })
        .unwrap_or_else(|| panic!("no final counters: {log}"));
    let count = |key: &str| -> u64 {
        let (_, rest) = stats
            .split_once(&format!("{key}: "))
            .unwrap_or_else(|| panic!("{key} not in {stats}"));
        rest.split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(
        count("member_pieces") > 1000 && count("local_pieces") > 1000,
        "the volume's I/O went to all members: {stats}"
    );
    assert_eq!(count("member_failures"), 0, "{stats}");
}

/// Our initiator on an emulated TOE host (`toemu iscsi perf --tap`) against tgtd on the Linux
/// side of the TAP device, in the namespace: 64 MiB written with a pattern and read back
/// identical at QD1, QD16 and QD32, with header and data digests, and with CHAP; on the
/// NIC's iSCSI engine, and once on the software data path.
#[test]
fn our_initiator_on_an_emulated_toe_host_writes_and_reads_back_on_tgt() {
    let lab = Lab::new("tgt");
    lab.sh(&format!(
        "ip tuntap add dev tap0 mode tap && ip addr add {LINUX}/24 dev tap0 && ip link set tap0 up"
    ));
    let tgt = toemu_tests::tgt::Tgt::start("tap", Some(&lab.ns), &format!("{LINUX}:3260"));
    let ip = format!("{HOST}/24");
    let digests = "?header_digest=crc32c&data_digest=crc32c";
    for (auth, iqn, query, depth, block, offload) in [
        ("", toemu_tests::tgt::IQN, "", "1", "64KiB", "engine"),
        ("", toemu_tests::tgt::IQN, "", "32", "128KiB", "engine"),
        ("", toemu_tests::tgt::IQN, digests, "16", "128KiB", "engine"),
        (
            "",
            toemu_tests::tgt::IQN,
            digests,
            "32",
            "128KiB",
            "software",
        ),
        (
            "alice%secret-of-alice@",
            toemu_tests::tgt::CHAP_IQN,
            "",
            "32",
            "4KiB",
            "engine",
        ),
    ] {
        let url = format!("iscsi://{auth}{}/{iqn}/1{query}", tgt.portal);
        let args = [
            "netns",
            "exec",
            &lab.ns,
            TOEMU,
            "iscsi",
            "perf",
            &url,
            "--tap",
            "tap0",
            "--ip",
            &ip,
            "--verify",
            "--bytes",
            "64MiB",
            "--depth",
            depth,
            "--block",
            block,
            "--offload",
            offload,
        ];
        let o = Command::new("ip").args(args).output().unwrap();
        let out = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            o.status.success(),
            "{url} QD{depth} {block}: {out}\ntgtd log:\n{}",
            tgt.log()
        );
        assert!(out.contains("verify: 0 I/Os read back differ"), "{out}");
        let digests = if query.is_empty() {
            "header digest none, data digest none"
        } else {
            "header digest CRC32C, data digest CRC32C"
        };
        assert!(out.contains(digests), "{out}");
        assert!(out.contains("67108864 bytes"), "{out}");
        assert!(out.contains(&format!("data path {offload}")), "{out}");
        if offload == "engine" {
            assert!(out.contains("buffers registered"), "{out}");
        }
    }
}

/// The SHA-256 values of the lines of `text` that contain `marker`, sorted.
fn sha256_of(text: &str, marker: &str) -> Vec<String> {
    let mut v: Vec<String> = text
        .lines()
        .filter(|l| l.contains(marker))
        .filter_map(|l| l.split("sha256 ").nth(1))
        .map(|h| h.trim().to_string())
        .collect();
    v.sort();
    v
}

#[test]
fn the_message_server_on_an_emulated_toe_host_takes_a_linux_senders_pipe_over_tls() {
    // The storage server of the message transport on an emulated TOE host; toemu's sender
    // on Linux TCP in the namespace, with mutual TLS.
    let mut lab = Lab::new("msg");
    let tls = lab.msg_certs();
    let server_tls = tls("store");
    // The emulated host's TAP port is captured: what Linux sent, as the NIC received it.
    let pcap = lab.dir.join("msg.pcap").display().to_string();
    let latency_log = lab.dir.join("latency.jsonl").display().to_string();
    let mut more: Vec<&str> = vec!["--port", "7000", "--pcap", &pcap];
    more.extend(server_tls.iter().map(String::as_str));
    lab.spawn(&["msg", "serve"], &more, 7000);
    let client_tls = tls("backup");
    let mut args: Vec<&str> = vec![
        "msg",
        "send",
        "--to",
        "10.98.0.2:7000",
        "--bytes",
        "24MiB",
        "--connections",
        "8",
        "--sessions",
        "3",
        "--message",
        "1MiB",
        "--slo",
        "critical",
        "--latency-log",
        &latency_log,
    ];
    args.extend(client_tls.iter().map(String::as_str));
    let (ok, sent) = lab.run(TOEMU, &args);
    assert!(ok, "{sent}\nserver: {}", lab.log());
    assert!(sent.contains("TLS 1.3"), "{sent}");
    assert!(sent.contains("objective critical (DSCP 46)"), "{sent}");
    assert!(sent.contains("delay comes from"), "{sent}");
    // The latency log: one JSON line per message with both clocks' timestamps.
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&latency_log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 24, "{lines:?}");
    for l in &lines {
        let t = |k: &str| l[k].as_u64().unwrap_or_else(|| panic!("{k} in {l}"));
        assert!(t("queued_us") <= t("started_us") && t("started_us") <= t("acked_us"));
        assert_eq!(t("bytes"), 1 << 20, "{l}");
        assert!(l["peer_received_us"].is_u64(), "{l}");
    }
    let want = sha256_of(&sent, "toemu msg send: session");
    assert_eq!(want.len(), 3, "{sent}");
    let t0 = Instant::now();
    while sha256_of(&lab.log(), "closed:").len() < 3 {
        lab.alive();
        assert!(t0.elapsed() < Duration::from_secs(20), "{}", lab.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(sha256_of(&lab.log(), "closed:"), want, "{}", lab.log());
    let (status, took) = lab.stop(Duration::from_secs(10));
    assert!(status.success(), "{status} after {took:?}: {}", lab.log());
    // Check 7: Linux marked every packet of the pipe's connections (IP_TOS, set before
    // connect: the SYNs too) with EF. The only other flow to port 7000 is the test's
    // readiness probe, unmarked and without payload.
    let rows = toemu_tests::tshark(&[
        "-r",
        &pcap,
        "-Y",
        "tcp.port == 7000",
        "-T",
        "fields",
        "-e",
        "ip.src",
        "-e",
        "tcp.stream",
        "-e",
        "ip.dsfield.dscp",
        "-e",
        "tcp.len",
    ]);
    // Linux's packets by stream (marks, payload bytes), and the emulated server's marks.
    let mut streams: std::collections::BTreeMap<u64, (std::collections::BTreeSet<u8>, u64)> =
        Default::default();
    let mut answers: std::collections::BTreeMap<u64, std::collections::BTreeSet<u8>> =
        Default::default();
    for row in rows.lines() {
        let f: Vec<&str> = row.split('\t').collect();
        let (stream, dscp) = (f[1].parse().unwrap(), f[2].parse().unwrap());
        if f[0] == LINUX {
            let e = streams.entry(stream).or_default();
            e.0.insert(dscp);
            e.1 += f[3].parse::<u64>().unwrap();
        } else {
            answers.entry(stream).or_default().insert(dscp);
        }
    }
    let marked: Vec<u64> = streams
        .values()
        .filter(|(d, _)| d.iter().eq([&46]))
        .map(|(_, b)| *b)
        .collect();
    assert_eq!(marked.len(), 8, "eight EF connections: {streams:?}");
    assert!(marked.iter().sum::<u64>() > 24 << 20, "{streams:?}");
    let other: Vec<_> = streams
        .values()
        .filter(|(d, _)| !d.iter().eq([&46]))
        .collect();
    assert!(
        other.len() <= 1 && other.iter().all(|(d, b)| d.iter().eq([&0]) && *b == 0),
        "only the unmarked probe besides: {streams:?}"
    );
    // The emulated server answers in the class it was asked in: its NIC reflects each
    // connection's SYN mark onto the SYN-ACK and the ACKs (the probe stays unmarked).
    for (stream, (asked, _)) in &streams {
        assert_eq!(
            answers.get(stream),
            Some(asked),
            "stream {stream}: the server's packets carry the class of Linux's: {answers:?}"
        );
    }
}

#[test]
fn the_bulk_transfer_from_an_emulated_toe_host_reaches_a_linux_server_over_an_impaired_tap() {
    // Issue 12's TAP check, as a test: toemu's sender on an emulated TOE host, primed, in
    // sub-transfers, paced (per packet, in the NIC's shaper), over mutual TLS, through the
    // TAP port's impaired wire (25 ms each way, 0.1% loss: losses on every connection) to
    // toemu's storage server on Linux TCP in the namespace. Every session's SHA-256 agrees
    // on both ends; nothing failed.
    let mut lab = Lab::new("bulk");
    let tls = lab.msg_certs();
    let listen = format!("{LINUX}:7000");
    let mut server: Vec<String> = ["msg", "serve", "--listen", &listen]
        .map(String::from)
        .to_vec();
    server.extend(tls("store"));
    lab.spawn_linux(&server.iter().map(String::as_str).collect::<Vec<_>>(), 7000);
    let ip = format!("{HOST}/24");
    let mut args: Vec<String> = [
        "--set",
        "congestion=cubic",
        "--set",
        "mtu=1500",
        "msg",
        "send",
        "--tap",
        "tap0",
        "--ip",
        &ip,
        "--to",
        &listen,
        "--bytes",
        "48MiB",
        "--connections",
        "12",
        "--reserves",
        "2",
        "--sessions",
        "4",
        "--message",
        "256KiB",
        "--path-mbit",
        "1000",
        "--path-rtt-ms",
        "50",
        "--delay-ms",
        "25",
        "--rate-mbit",
        "1000",
        "--loss",
        "0.001",
    ]
    .map(String::from)
    .to_vec();
    args.extend(tls("backup"));
    let (ok, sent) = lab.run(TOEMU, &args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{sent}\nserver: {}", lab.log());
    assert!(
        sent.contains("msg-send on tap0"),
        "on the emulated host: {sent}"
    );
    assert!(sent.contains("TLS 1.3"), "{sent}");
    assert!(sent.contains("192 messages acknowledged"), "{sent}");
    assert!(sent.contains(", 0 failed"), "{sent}");
    assert!(
        sent.contains("12 connections primed"),
        "the planner primed every connection: {sent}"
    );
    let want = sha256_of(&sent, "toemu msg send: session");
    assert_eq!(want.len(), 4, "{sent}");
    let distinct: std::collections::BTreeSet<_> = want.iter().collect();
    assert_eq!(distinct.len(), 4, "each session its own bytes: {sent}");
    let t0 = Instant::now();
    while sha256_of(&lab.log(), "closed:").len() < 4 {
        lab.alive();
        assert!(t0.elapsed() < Duration::from_secs(20), "{}", lab.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(sha256_of(&lab.log(), "closed:"), want, "{}", lab.log());
    let (status, took) = lab.stop(Duration::from_secs(10));
    assert!(status.success(), "{status} after {took:?}: {}", lab.log());
}
