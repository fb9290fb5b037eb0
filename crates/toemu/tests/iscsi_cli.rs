//! The toemu binary's iSCSI commands end to end: `toemu iscsi target` on a file LUN and
//! `toemu iscsi perf` against it. Durability: writes acknowledged with FUA, or followed by
//! SYNCHRONIZE CACHE, are read back intact after the target is killed with SIGKILL and
//! started again on the same file.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TOEMU: &str = env!("CARGO_BIN_EXE_toemu");
const IQN: &str = "iqn.2026-12.org.toemu:disk";

/// `toemu iscsi target` on `lun`, on a port of 127.0.0.1 the target picks itself (no race
/// with other tests for a free port), answering: (the child, its portal). The caller stops it
/// by PID.
fn target(lun: &Path, log: &Path) -> (Child, String) {
    target_with(lun, log, &[])
}

/// [`target`] with more options.
fn target_with(lun: &Path, log: &Path, more: &[&str]) -> (Child, String) {
    let out = std::fs::File::create(log).unwrap();
    let mut c = Command::new(TOEMU)
        .args([
            "iscsi",
            "target",
            "--size",
            "64MiB",
            "--listen",
            "127.0.0.1:0",
        ])
        .args(more)
        .arg("--lun")
        .arg(lun)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        // "toemu iscsi target: portal 127.0.0.1:PORT, IQN, ..."
        let portal = text
            .split("portal ")
            .nth(1)
            .and_then(|r| r.split(',').next())
            .map(str::to_string);
        if let Some(p) = portal.filter(|p| TcpStream::connect(p).is_ok()) {
            return (c, p);
        }
        if let Ok(Some(s)) = c.try_wait() {
            panic!("toemu iscsi target exited ({s}): {text}");
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the target does not answer: {text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `toemu iscsi perf URL ARGS`: (success, output).
fn perf(url: &str, args: &[&str]) -> (bool, String) {
    let o = Command::new(TOEMU)
        .args(["iscsi", "perf", url])
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success(), text)
}

/// Run `toemu ARGS`, assert it succeeded: its standard output.
fn toemu_ok(args: &[std::ffi::OsString]) -> String {
    let out = Command::new(TOEMU).args(args).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "toemu {args:?}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("toemu-iscsi-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn writes_with_fua_or_synchronize_cache_survive_a_kill_9_of_the_target() {
    let dir = scratch("durable");
    let lun = dir.join("lun.img");
    for (how, seed) in [("--fua", "11"), ("--sync", "12")] {
        let io = [
            "--bytes", "8MiB", "--block", "64KiB", "--random", "--seed", seed,
        ];
        let (mut t, portal) = target(&lun, &dir.join("target-1.log"));
        let url = format!("iscsi://{portal}/{IQN}/0");
        let (ok, out) = perf(&url, &[&["--write", how][..], &io].concat());
        assert!(ok, "{how}: the writes failed:\n{out}");
        // SIGKILL, by PID: no flush, no exit handler.
        t.kill().unwrap();
        t.wait().unwrap();
        let (mut t, portal) = target(&lun, &dir.join("target-2.log"));
        let url = format!("iscsi://{portal}/{IQN}/0");
        let (ok, out) = perf(&url, &[&["--check"][..], &io].concat());
        assert!(ok, "{how}: after kill -9 the data differs:\n{out}");
        assert!(out.contains("verify: 0 I/Os read back differ"), "{out}");
        // The check can fail: another seed's pattern is not on the disk.
        let other = [
            "--bytes", "8MiB", "--block", "64KiB", "--random", "--seed", "99",
        ];
        let (ok, out) = perf(&url, &[&["--check"][..], &other].concat());
        assert!(!ok, "a check of data never written passed:\n{out}");
        assert!(out.contains("differs from what was written"), "{out}");
        t.kill().unwrap();
        t.wait().unwrap();
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn perf_reports_figures_as_json_and_refuses_a_bad_block_size() {
    let dir = scratch("json");
    let (mut t, portal) = target(&dir.join("lun.img"), &dir.join("target.log"));
    let url = format!("iscsi://{portal}/{IQN}/0");
    let json = dir.join("perf.json");
    let (ok, out) = perf(
        &url,
        &[
            "--verify",
            "--bytes",
            "4MiB",
            "--depth",
            "8",
            "--json",
            json.to_str().unwrap(),
        ],
    );
    assert!(ok, "{out}");
    let text = std::fs::read_to_string(&json).unwrap();
    for key in [
        "\"iops\"",
        "\"mb_per_s\"",
        "\"p99\"",
        "\"mismatches\": 0",
        "\"op\": \"write\"",
        "\"op\": \"read\"",
    ] {
        assert!(text.contains(key), "{key} missing from {text}");
    }
    let (ok, out) = perf(&url, &["--block", "1000", "--seconds", "1"]);
    assert!(!ok && out.contains("not a multiple"), "{out}");
    t.kill().unwrap();
    t.wait().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The target's NOP-In keep-alive: an initiator that answers the ping (toemu's, when it next
/// reads) keeps its session; one that never reads is dropped after the timeout.
#[test]
fn the_target_keeps_an_answering_initiator_and_drops_a_silent_one() {
    use toemu_lab::iscsi::{IscsiUrl, TcpInitiator};
    let dir = scratch("nop");
    let (mut t, portal) = target_with(
        &dir.join("lun.img"),
        &dir.join("target.log"),
        &["--nop-interval", "0.5", "--nop-timeout", "5"],
    );
    let url: IscsiUrl = format!("iscsi://{portal}/{IQN}/0").parse().unwrap();
    let tur = [0u8; 6];
    let mut answering = TcpInitiator::login(&url, Some(IQN)).unwrap();
    let mut silent = TcpInitiator::login(&url, Some(IQN)).unwrap();
    // Both pinged at 0.5 s; the answering one reads (and answers) at 1.2 s, is pinged again
    // at about 1.7 s and answers at 5 s, within the timeout.
    std::thread::sleep(Duration::from_millis(1200));
    let c = answering.command(0, &tur, 0, Vec::new()).unwrap();
    assert_eq!(c.status, 0, "{c:?}");
    std::thread::sleep(Duration::from_millis(3800));
    let c = answering.command(0, &tur, 0, Vec::new()).unwrap();
    assert_eq!(
        c.status, 0,
        "the answering initiator keeps its session: {c:?}"
    );
    // The silent one's first ping times out at 5.5 s.
    std::thread::sleep(Duration::from_millis(2000));
    let gone = silent.command(0, &tur, 0, Vec::new());
    assert!(
        gone.is_err(),
        "the silent initiator's connection is still open: {gone:?}"
    );
    t.kill().unwrap();
    t.wait().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// SIGTERM stops the target gracefully: each session is asked to log out (an Async Message,
/// AsyncEvent 1), toemu's initiator does, and the target exits having flushed the disk,
/// with no connection left behind.
#[test]
fn sigterm_asks_every_session_to_log_out() {
    use toe_iscsi::initiator::InitiatorEvent;
    use toemu_lab::iscsi::{IscsiUrl, TcpInitiator};
    let dir = scratch("async");
    let log = dir.join("target.log");
    let (mut t, portal) = target(&dir.join("lun.img"), &log);
    let url: IscsiUrl = format!("iscsi://{portal}/{IQN}/0").parse().unwrap();
    let mut init = TcpInitiator::login(&url, Some(IQN)).unwrap();
    let c = init.command(0, &[0u8; 6], 0, Vec::new()).unwrap();
    assert_eq!(c.status, 0);
    let term = Command::new("kill")
        .arg(t.id().to_string())
        .status()
        .unwrap();
    assert!(term.success());
    let e = init.next_event().unwrap();
    assert_eq!(
        e,
        InitiatorEvent::LoggedOut,
        "the initiator logged out when asked"
    );
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = t.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the target did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{status}: {out}");
    // (the readiness probe is a connection too)
    assert!(out.contains("stopped; flushed ok; connections 2"), "{out}");
    assert!(!out.contains("did not log out"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `toemu iscsi wan-bench --quick`: the JSON has the link and, for every mode at every
/// depth, the figures the issue names, each run's data checked; the chart is an SVG.
#[test]
fn wan_bench_writes_its_json_and_chart() {
    let d = scratch("wan");
    let (json, svg) = (d.join("wan.json"), d.join("wan.svg"));
    let mut args: Vec<std::ffi::OsString> = ["iscsi", "wan-bench", "--quick", "--depth", "1,8"]
        .map(Into::into)
        .to_vec();
    args.extend([
        "--json".into(),
        json.clone().into(),
        "--svg".into(),
        svg.clone().into(),
    ]);
    let text = toemu_ok(&args);
    assert!(
        text.contains("accelerated") && text.contains("latency p50"),
        "{text}"
    );
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    for k in [
        "forward_bytes_per_s",
        "reverse_bytes_per_s",
        "rtt_ms",
        "loss",
    ] {
        assert!(v["link"][k].is_number(), "link.{k}: {v}");
    }
    let runs = v["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 6, "3 modes × 2 depths");
    for r in runs {
        for k in [
            "depth",
            "throughput_bytes_per_s",
            "reverse_packets_per_mib",
            "reverse_bytes_per_mib",
            "r2t_sent",
        ] {
            assert!(r[k].is_number(), "{k}: {r}");
        }
        assert!(
            r["write_latency_us"]["p50"].is_number() && r["write_latency_us"]["p99"].is_number()
        );
        assert_eq!(r["integrity_ok"], true, "{r}");
        assert!(["classic", "unsolicited", "accelerated"].contains(&r["mode"].as_str().unwrap()));
    }
    let chart = std::fs::read_to_string(&svg).unwrap();
    assert!(chart.contains("<svg"), "not an SVG");
    assert!(chart.contains("accelerated") && chart.contains("classic"));
    std::fs::remove_dir_all(&d).unwrap();
}

/// `toemu iscsi cluster-bench`: the JSON has a write and a read for each mode of each
/// round, direct first in round 0 and proxy first in round 1, every run's data checked;
/// the copies are counted (the proxy's are the primary's: fewer than the member's own).
#[test]
fn cluster_bench_writes_its_json() {
    let d = scratch("cluster-bench");
    let json = d.join("cluster.json");
    let mut args: Vec<std::ffi::OsString> = ["iscsi", "cluster-bench", "--bytes", "8MiB"]
        .map(Into::into)
        .to_vec();
    args.extend(["--json".into(), json.clone().into()]);
    let text = toemu_ok(&args);
    assert!(text.contains("proxy / direct: read"), "{text}");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let runs = v["runs"].as_array().unwrap();
    let order: Vec<(&str, &str)> = runs
        .iter()
        .map(|r| (r["mode"].as_str().unwrap(), r["op"].as_str().unwrap()))
        .collect();
    let (dw, dr, pw, pr) = (
        ("direct", "write"),
        ("direct", "read"),
        ("proxy", "write"),
        ("proxy", "read"),
    );
    assert_eq!(
        order,
        [dw, dr, pw, pr, pw, pr, dw, dr],
        "alternating rounds"
    );
    for r in runs {
        assert!(r["throughput_bytes_per_s"].as_f64().unwrap() > 0.0, "{r}");
        assert_eq!(r["bytes"], 8 << 20, "{r}");
        assert_eq!(r["integrity_ok"], true, "{r}");
    }
    let copies = |mode: &str, op: &str| {
        runs.iter()
            .find(|r| r["mode"] == mode && r["op"] == op)
            .unwrap()["host_copies_per_proxied_byte"]
            .as_f64()
            .unwrap()
    };
    // A member's target copies each byte it reads once, out of its disk into host
    // memory; the primary hands a member's data from the back NIC to the front NIC in
    // host memory, and copies only its own third (tests/cluster.rs has the figures).
    assert!((copies("direct", "read") - 1.0).abs() < 0.01, "{v}");
    assert!(copies("proxy", "read") < copies("direct", "read"), "{v}");
    std::fs::remove_dir_all(&d).unwrap();
}

/// `toemu --config FILE iscsi cluster` on the in-memory wire: the `[cluster]` table lays
/// it out, the file's `[host]` table sets the hosts; toemu's initiator writes through the
/// primary and reads the data back intact. A file without `[cluster]` is refused.
#[test]
fn the_cluster_command_runs_a_layout_from_toml() {
    let d = scratch("cluster");
    let cfg = d.join("cluster.toml");
    std::fs::write(
        &cfg,
        "[cluster]\nmembers = 2\nmember_blocks = 16384\nstripe_blocks = 256\n\n[host]\nmtu = 9000\n",
    )
    .unwrap();
    let mut args: Vec<std::ffi::OsString> = vec!["--config".into(), cfg.clone().into()];
    args.extend(["iscsi", "cluster", "--bytes", "4MiB"].map(Into::into));
    let text = toemu_ok(&args);
    assert!(text.contains("2 members"), "{text}");
    assert!(
        text.contains("read ") && text.contains("errors 0"),
        "{text}"
    );
    assert!(!text.contains("member_pieces: 0,"), "{text}");
    std::fs::write(&cfg, "[host]\nmtu = 9000\n").unwrap();
    let out = Command::new(TOEMU)
        .arg("--config")
        .arg(&cfg)
        .args(["iscsi", "cluster"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no [cluster] table"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_dir_all(&d).unwrap();
}
