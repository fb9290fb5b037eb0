//! `cargo xtask msg-tap-bench`: issue 12's TAP comparison. On one impaired TAP wire (25 ms
//! each way, 1 Gbit/s, 0.01% loss, MTU 1500, the impairment model's default queue), in
//! alternating rounds:
//!
//! - `linux-bbr`: one Linux TCP stream with BBR (socat in the namespace) into the emulated
//!   host's sink app;
//! - `bulk-24`: toemu's bulk transfer from an emulated TOE host (primed, paced, in
//!   sub-transfers, TLS 1.3) over 24 connections without reserves to `toemu msg serve` on
//!   Linux TCP in the namespace;
//! - `bulk-16r4`, `bulk-40r8`: the same over 16 and 40 connections, 4 and 8 of them
//!   reserves (the planner drops stragglers and brings reserves in).
//!
//! Every run's bytes are checked (the sink's SHA-256 against `toemu gen`'s; every session's
//! SHA-256 on both ends of the bulk transfer). Medians and the ratio to BBR go to a table and
//! `target/msg-tap-bench.json`.

use super::{
    field_after, mb_per_s_of, median, need_root, prepare, read_log, sha256_of_gen, wait_line,
    Netns, HOST_IP, LINUX_IP,
};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// The emulated host's TAP port: the same impaired wire for every mode.
const WIRE: &[&str] = &[
    "--delay-ms",
    "25",
    "--rate-mbit",
    "1000",
    "--loss",
    "0.0001",
];

/// Host settings of the emulated host in every mode (before the subcommand).
const HOST: &[&str] = &["--set", "congestion=cubic", "--set", "mtu=1500"];

/// The namespace's TCP: BBR, and send/receive buffers that reach a 50 ms, 1 Gbit/s path
/// (Linux's default 4 MiB `tcp_wmem` maximum caps one stream near 80 MB/s).
const LINUX_TCP: &str = "sysctl -qw net.ipv4.tcp_congestion_control=bbr \
    net.ipv4.tcp_wmem='4096 16384 33554432' net.ipv4.tcp_rmem='4096 131072 33554432'";

/// One mode of the comparison.
struct Mode {
    name: &'static str,
    /// `None`: one Linux BBR stream; `Some((connections, reserves))`: the bulk transfer.
    bulk: Option<(u32, u32)>,
}

const MODES: &[Mode] = &[
    Mode {
        name: "linux-bbr",
        bulk: None,
    },
    Mode {
        name: "bulk-24",
        bulk: Some((24, 0)),
    },
    Mode {
        name: "bulk-16r4",
        bulk: Some((16, 4)),
    },
    Mode {
        name: "bulk-40r8",
        bulk: Some((40, 8)),
    },
];

/// One run's result.
struct Sample {
    mb_per_s: f64,
    /// Bytes the bulk transfer sent twice (0 for BBR).
    resent: u64,
}

/// `cargo xtask msg-tap-bench [BYTES] [ROUNDS]`.
pub fn run(root: &Path, bytes: u64, rounds: usize) -> Result<(), String> {
    need_root()?;
    let avail = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_congestion_control")
        .unwrap_or_default();
    if !avail.split_whitespace().any(|c| c == "bbr") {
        return Err(format!(
            "msg-tap-bench needs the kernel's BBR (tcp_bbr); available: {avail:?}"
        ));
    }
    let toemu = prepare(root)?;
    let work = std::env::temp_dir().join(format!("toemu-msg-tap-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
    let mut ns = Netns::create_named("msg")?;
    // One persistent TAP device for every run: each emulated host opens it in turn.
    ns.sh(&format!(
        "ip tuntap add tap0 mode tap && ip addr add {LINUX_IP}/24 dev tap0 && ip link set tap0 up"
    ))?;
    ns.sh(LINUX_TCP)?;
    let certs = work.join("certs");
    let certs = certs.to_str().ok_or("non-UTF-8 temp dir")?;
    let out = std::process::Command::new(&toemu)
        .args(["msg", "certs", "--dir", certs, "--names", "store,backup"])
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "toemu msg certs: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let tls = |who: &str| {
        vec![
            "--tls".to_string(),
            "--cert".into(),
            format!("{certs}/{who}.pem"),
            "--key".into(),
            format!("{certs}/{who}.key"),
            "--ca".into(),
            format!("{certs}/ca.pem"),
        ]
    };
    let want = sha256_of_gen(&toemu, bytes, 9)?;
    let mut samples: Vec<Vec<Sample>> = MODES.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        // Which goes first alternates.
        let mut order: Vec<usize> = (0..MODES.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for i in order {
            let m = &MODES[i];
            let log = work.join(format!("{}-{round}.log", m.name));
            let s = match m.bulk {
                None => bbr(&mut ns, &toemu, bytes, &want, &log)?,
                Some((c, r)) => bulk(&mut ns, &toemu, bytes, c, r, &tls, &log)?,
            };
            eprintln!(
                "msg-tap-bench: round {} {:<10} {:>8.1} MB/s, {} bytes resent",
                round + 1,
                m.name,
                s.mb_per_s,
                s.resent
            );
            samples[i].push(s);
        }
    }
    let med: Vec<f64> = samples
        .iter()
        .map(|v| median(&v.iter().map(|s| s.mb_per_s).collect::<Vec<_>>()))
        .collect();
    let bbr_med = med[0];
    println!(
        "{bytes} bytes over TAP, 25 ms each way, 1 Gbit/s, 0.01% loss, MTU 1500, {rounds} rounds (medians)"
    );
    println!(
        "{:<10} {:>10} {:>8} {:>10} {:>10} {:>14}",
        "mode", "MB/s", "vs BBR", "min", "max", "resent (med)"
    );
    let mut runs = Vec::new();
    for (i, m) in MODES.iter().enumerate() {
        let v: Vec<f64> = samples[i].iter().map(|s| s.mb_per_s).collect();
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(0.0, f64::max);
        let resent = median(
            &samples[i]
                .iter()
                .map(|s| s.resent as f64)
                .collect::<Vec<_>>(),
        );
        println!(
            "{:<10} {:>10.1} {:>7.2}x {lo:>10.1} {hi:>10.1} {resent:>14.0}",
            m.name,
            med[i],
            med[i] / bbr_med
        );
        let (c, r) = m.bulk.unwrap_or((1, 0));
        // integrity_ok: every run reaching here was checked (a SHA-256 mismatch or a failed
        // message ends the bench with an error before any JSON is written).
        runs.push(format!(
            "{{\"mode\": \"{}\", \"connections\": {c}, \"reserves\": {r}, \"median_mb_per_s\": {:.1}, \"ratio_to_bbr\": {:.3}, \"median_resent_bytes\": {resent:.0}, \"samples_mb_per_s\": {v:?}, \"integrity_ok\": true}}",
            m.name,
            med[i],
            med[i] / bbr_med
        ));
    }
    let json = format!(
        "{{\"bytes\": {bytes}, \"rounds\": {rounds}, \"link\": {{\"bytes_per_s\": 125000000, \"rtt_ms\": 50, \"loss\": 0.0001, \"mtu\": 1500}}, \"runs\": [{}]}}\n",
        runs.join(", ")
    );
    let out = root.join("target/msg-tap-bench.json");
    std::fs::write(&out, json).map_err(|e| e.to_string())?;
    eprintln!("msg-tap-bench: wrote {}", out.display());
    drop(ns);
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

/// Start `program ARGS` in the namespace with stdout and stderr in `log`; its child index.
fn spawn(ns: &mut Netns, program: &str, args: &[String], log: &Path) -> Result<usize, String> {
    let f = std::fs::File::create(log).map_err(|e| e.to_string())?;
    let child = ns
        .cmd(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(f.try_clone().map_err(|e| e.to_string())?)
        .stderr(f)
        .spawn()
        .map_err(|e| format!("spawn {program}: {e}"))?;
    ns.children.push(child);
    Ok(ns.children.len() - 1)
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// One Linux BBR stream of `bytes` into the emulated host's sink; checks its SHA-256.
fn bbr(ns: &mut Netns, toemu: &Path, bytes: u64, want: &str, log: &Path) -> Result<Sample, String> {
    let toemu_s = toemu.to_str().ok_or("non-UTF-8 path")?;
    let ip = format!("{HOST_IP}/24");
    let mut args = strings(HOST);
    // The sink's socket buffer holds the path's bandwidth-delay product and more: the
    // default 512 KiB would cap the stream near 10 MB/s.
    args.extend(strings(&["--set", "socket_buf_bytes=16MiB", "serve"]));
    args.extend(strings(&["--app", "sink", "--tap", "tap0", "--ip", &ip]));
    args.extend(strings(WIRE));
    let h = spawn(ns, toemu_s, &args, log)?;
    wait_line(log, "on tap0 at", Duration::from_secs(20))?;
    ns.sh(&format!(
        "{toemu_s} gen --bytes {bytes} --seed 9 | socat -u - TCP:{HOST_IP}:9"
    ))?;
    let line = wait_line(log, "sink: connection", Duration::from_secs(120))?;
    ns.stop(h);
    if field_after(&line, "sha256").as_deref() != Some(want) {
        return Err(format!("linux-bbr: integrity check failed: {line}"));
    }
    Ok(Sample {
        mb_per_s: mb_per_s_of(&line)?,
        resent: 0,
    })
}

/// The lines of `text` containing `marker`, their SHA-256s, sorted.
fn sha256s(text: &str, marker: &str) -> Vec<String> {
    let mut v: Vec<String> = text
        .lines()
        .filter(|l| l.contains(marker))
        .filter_map(|l| l.split("sha256 ").nth(1))
        .map(|h| h.trim().to_string())
        .collect();
    v.sort();
    v
}

/// The bulk transfer of `bytes` from an emulated TOE host over `connections` (`reserves` of
/// them in reserve) to `toemu msg serve` on Linux; checks every session on both ends.
fn bulk(
    ns: &mut Netns,
    toemu: &Path,
    bytes: u64,
    connections: u32,
    reserves: u32,
    tls: &dyn Fn(&str) -> Vec<String>,
    log: &Path,
) -> Result<Sample, String> {
    let toemu_s = toemu.to_str().ok_or("non-UTF-8 path")?;
    let listen = format!("{LINUX_IP}:7000");
    let mut server = strings(&["msg", "serve", "--listen", &listen]);
    server.extend(tls("store"));
    let h = spawn(ns, toemu_s, &server, log)?;
    let probe = format!(
        "python3 -c 'import socket; socket.create_connection((\"{LINUX_IP}\", 7000), 1).close()'"
    );
    let t0 = Instant::now();
    while ns.sh(&probe).is_err() {
        if t0.elapsed() > Duration::from_secs(20) {
            return Err(format!("msg serve never answered: {}", read_log(log)));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let ip = format!("{HOST_IP}/24");
    let (c, r) = (connections.to_string(), reserves.to_string());
    let mut args = strings(HOST);
    args.extend(strings(&[
        "msg",
        "send",
        "--tap",
        "tap0",
        "--ip",
        &ip,
        "--to",
        &listen,
        "--bytes",
        &bytes.to_string(),
        "--connections",
        &c,
        "--reserves",
        &r,
        "--sessions",
        "8",
        "--message",
        "256KiB",
        "--path-mbit",
        "1000",
        "--path-rtt-ms",
        "50",
    ]));
    args.extend(strings(WIRE));
    args.extend(tls("backup"));
    let out = ns
        .cmd("timeout")
        .args(["300", toemu_s])
        .args(&args)
        .output()
        .map_err(|e| format!("msg send: {e}"))?;
    let sent = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(format!(
            "msg send ({connections} connections) failed ({}): {sent}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let want = sha256s(&sent, "toemu msg send: session");
    let t0 = Instant::now();
    while sha256s(&read_log(log), "closed:").len() < want.len() {
        if t0.elapsed() > Duration::from_secs(20) {
            return Err(format!(
                "msg serve did not close every session: {}",
                read_log(log)
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    ns.stop(h);
    let got = sha256s(&read_log(log), "closed:");
    if want.len() != 8 || got != want {
        return Err(format!(
            "bulk ({connections} connections): sessions differ: sent {want:?}, stored {got:?}"
        ));
    }
    let done = sent
        .lines()
        .find(|l| l.contains("messages acknowledged"))
        .ok_or_else(|| format!("msg send printed no result: {sent}"))?;
    if !done.ends_with(", 0 failed") {
        return Err(format!("bulk: messages failed: {done}"));
    }
    let resent = sent
        .lines()
        .find(|l| l.contains("bytes resent"))
        .and_then(|l| l.rsplit(", ").next())
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    Ok(Sample {
        mb_per_s: mb_per_s_of(done)?,
        resent,
    })
}
