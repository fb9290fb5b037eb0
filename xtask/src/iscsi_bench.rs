//! `cargo xtask iscsi-bench [SECONDS] [ROUNDS]`: libiscsi's `iscsi-perf` against toemu's
//! std-TCP target and against tgt (Debian `tgt`), both on 127.0.0.1 with a file LUN of the
//! same size in the same directory, in alternating runs; then toemu's own initiator
//! (`toemu iscsi perf`) against both. Medians of each case and the ratio toemu / tgt, written
//! to `target/iscsi-bench.json`. Both daemons are started here and stopped by PID.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The packages this benchmark runs.
const TOOLS: &[(&str, &str)] = &[("iscsi-perf", "libiscsi-bin"), ("tgtd", "tgt")];

/// LUN size, bytes (both targets).
const LUN_BYTES: u64 = 1 << 30;

/// One measured case: I/O size in 512-byte blocks, queue depth, URL query.
struct Case {
    name: &'static str,
    blocks: u32,
    depth: u32,
    query: &'static str,
}

const CASES: &[Case] = &[
    Case {
        name: "4KiB QD32 read",
        blocks: 8,
        depth: 32,
        query: "",
    },
    Case {
        name: "128KiB QD32 read",
        blocks: 256,
        depth: 32,
        query: "",
    },
    Case {
        name: "4KiB QD32 read, header digest",
        blocks: 8,
        depth: 32,
        query: "?header_digest=crc32c",
    },
];

/// A daemon we started; stopped (SIGTERM, then SIGKILL) by PID on drop, and the files it
/// leaves behind (tgtd's control socket) removed.
struct Daemon(Child, Vec<PathBuf>);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        let t0 = Instant::now();
        while self.0.try_wait().ok().flatten().is_none() && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
        for f in &self.1 {
            let _ = std::fs::remove_file(f);
        }
    }
}

fn spawn(cmd: &mut Command, log: &Path) -> Result<Daemon, String> {
    let out = std::fs::File::create(log).map_err(|e| e.to_string())?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map(|c| Daemon(c, Vec::new()))
        .map_err(|e| format!("{cmd:?}: {e}"))
}

/// Run `cmd`: (whether it succeeded, its output and error output).
fn output(cmd: &mut Command) -> Result<(bool, String), String> {
    let o = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    Ok((o.status.success(), text))
}

/// Run `cmd`, which must succeed; its output.
fn run(cmd: &mut Command) -> Result<String, String> {
    match output(cmd)? {
        (true, text) => Ok(text),
        (false, text) => Err(format!("{cmd:?} failed: {text}")),
    }
}

/// A free port on 127.0.0.1 for a daemon to bind, below the kernel's ephemeral range
/// (32768 and up), so that no program binding port 0 takes it before the daemon does: from
/// 16 ports picked by PID, the next one that binds now.
fn free_port() -> Result<u16, String> {
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let base = 20_000 + (std::process::id() % 750) as u16 * 16;
    for _ in 0..16 {
        let port = base + NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(format!("no free port in {base}..{}", base + 16))
}

/// Wait until `addr` accepts TCP connections.
fn wait_port(addr: &str, what: &str) -> Result<(), String> {
    let t0 = Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        if t0.elapsed() > Duration::from_secs(10) {
            return Err(format!("{what} does not listen on {addr} after 10 s"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Start tgtd with one target (LUN 1: `img`), digests allowed. Returns the daemon and the
/// LUN's URL without query.
fn start_tgt(work: &Path, img: &Path) -> Result<(Daemon, String), String> {
    std::fs::create_dir_all("/var/run/tgtd").map_err(|e| format!("/var/run/tgtd: {e}"))?;
    let port = free_port()?;
    // tgtd takes control numbers below 32768.
    let control = format!("{}", 25_000 + std::process::id() % 7_000);
    let portal = format!("127.0.0.1:{port}");
    let mut d = spawn(
        Command::new("tgtd").args(["-f", "-C", &control, "--iscsi", &format!("portal={portal}")]),
        &work.join("tgtd.log"),
    )?;
    d.1 = ["", ".lock"]
        .iter()
        .map(|x| PathBuf::from(format!("/var/run/tgtd/socket.{control}{x}")))
        .collect();
    let adm = |args: &[&str]| {
        run(Command::new("tgtadm")
            .args(["-C", &control, "--lld", "iscsi"])
            .args(args))
    };
    let t0 = Instant::now();
    while adm(&["--op", "show", "--mode", "target"]).is_err() {
        if t0.elapsed() > Duration::from_secs(10) {
            return Err("tgtd does not answer tgtadm after 10 s".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let iqn = "iqn.2026-12.org.toemu:bench-tgt";
    let img = img.to_str().ok_or("non-UTF-8 path")?;
    adm(&["--op", "new", "--mode", "target", "--tid", "1", "-T", iqn])?;
    adm(&[
        "--op",
        "new",
        "--mode",
        "logicalunit",
        "--tid",
        "1",
        "--lun",
        "1",
        "-b",
        img,
    ])?;
    adm(&[
        "--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL",
    ])?;
    for key in ["HeaderDigest", "DataDigest"] {
        adm(&[
            "--op",
            "update",
            "--mode",
            "target",
            "--tid",
            "1",
            "-n",
            key,
            "-v",
            "CRC32C,None",
        ])?;
    }
    wait_port(&portal, "tgtd")?;
    Ok((d, format!("iscsi://{portal}/{iqn}/1")))
}

/// Start toemu's target on `img`. Returns the daemon and the LUN's URL without query.
fn start_toemu(toemu: &Path, work: &Path, img: &Path) -> Result<(Daemon, String), String> {
    let port = free_port()?;
    let portal = format!("127.0.0.1:{port}");
    let iqn = "iqn.2026-12.org.toemu:bench";
    let d = spawn(
        Command::new(toemu)
            .args([
                "iscsi", "target", "--iqn", iqn, "--listen", &portal, "--lun",
            ])
            .arg(img),
        &work.join("toemu-target.log"),
    )?;
    wait_port(&portal, "toemu iscsi target")?;
    Ok((d, format!("iscsi://{portal}/{iqn}/0")))
}

/// Run iscsi-perf on `url` for `seconds` (SIGINT ends it); its average IOPS.
fn iscsi_perf(url: &str, c: &Case, seconds: u32) -> Result<f64, String> {
    // iscsi-perf runs until interrupted, and then exits non-zero: its output is what counts.
    let (_, out) = output(Command::new("timeout").args([
        "-s",
        "INT",
        &seconds.to_string(),
        "iscsi-perf",
        "-m",
        &c.depth.to_string(),
        "-b",
        &c.blocks.to_string(),
        url,
    ]))?;
    let last = out
        .rsplit("iops average ")
        .next()
        .filter(|_| out.contains("iops average "))
        .ok_or_else(|| format!("iscsi-perf {url} printed no average: {out}"))?;
    last.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("cannot read IOPS from {last:?}"))
}

/// Run toemu's initiator on `url` for `seconds`; its IOPS.
fn toemu_perf(toemu: &Path, url: &str, c: &Case, seconds: u32, work: &Path) -> Result<f64, String> {
    let json = work.join("perf.json");
    run(Command::new(toemu)
        .args([
            "iscsi",
            "perf",
            url,
            "--block",
            &(c.blocks * 512).to_string(),
            "--depth",
            &c.depth.to_string(),
            "--seconds",
            &seconds.to_string(),
            "--json",
        ])
        .arg(&json))?;
    let text = std::fs::read_to_string(&json).map_err(|e| e.to_string())?;
    let at = text.find("\"iops\":").ok_or("no iops in perf.json")?;
    text[at + 7..]
        .trim_start()
        .split([',', '\n'])
        .next()
        .and_then(|n| n.trim().parse().ok())
        .ok_or_else(|| "cannot read iops from perf.json".into())
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[s.len() / 2]
}

/// The benchmark; see the module documentation.
pub fn bench(root: &Path, seconds: u32, rounds: usize) -> Result<(), String> {
    crate::ensure_tools("iscsi-bench", TOOLS)?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(cargo)
        .current_dir(root)
        .args(["build", "--release", "-p", "toemu"]))
    .map_err(|e| format!("building toemu: {e}"))?;
    let toemu: PathBuf = root.join("target/release/toemu");
    let work = std::env::temp_dir().join(format!("toemu-iscsi-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
    let (ours_img, tgt_img) = (work.join("toemu.img"), work.join("tgt.img"));
    for img in [&ours_img, &tgt_img] {
        // Written once, so that reads come from the page cache on both sides, not from holes.
        let f = std::fs::File::create(img).map_err(|e| e.to_string())?;
        let chunk = vec![0x5au8; 1 << 20];
        let mut w = std::io::BufWriter::new(f);
        for _ in 0..LUN_BYTES >> 20 {
            std::io::Write::write_all(&mut w, &chunk).map_err(|e| e.to_string())?;
        }
    }
    let (ours_daemon, ours_url) = start_toemu(&toemu, &work, &ours_img)?;
    let (tgt_daemon, tgt_url) = start_tgt(&work, &tgt_img)?;
    let mut rows = Vec::new();
    let mut json = format!(
        "{{\"seconds\": {seconds}, \"rounds\": {rounds}, \"lun_bytes\": {LUN_BYTES}, \"cases\": ["
    );
    for (k, c) in CASES.iter().enumerate() {
        for (initiator, by_us) in [("iscsi-perf", false), ("toemu iscsi perf", true)] {
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            for round in 0..rounds {
                // Alternate which target goes first.
                let order = if round % 2 == 0 {
                    [true, false]
                } else {
                    [false, true]
                };
                for us in order {
                    let url = format!("{}{}", if us { &ours_url } else { &tgt_url }, c.query);
                    let iops = if by_us {
                        toemu_perf(&toemu, &url, c, seconds, &work)?
                    } else {
                        iscsi_perf(&url, c, seconds)?
                    };
                    eprintln!(
                        "iscsi-bench: {:<32} {initiator:<17} round {} {:<6} {iops:>9.0} IOPS",
                        c.name,
                        round + 1,
                        if us { "toemu" } else { "tgt" }
                    );
                    if us { &mut ours } else { &mut theirs }.push(iops);
                }
            }
            let (m_ours, m_tgt) = (median(&ours), median(&theirs));
            let mb = |iops: f64| iops * f64::from(c.blocks) * 512.0 / 1e6;
            rows.push(format!(
                "{:<32} {initiator:<17} {m_ours:>10.0} {:>9.1} {m_tgt:>10.0} {:>9.1} {:>7.2}x",
                c.name,
                mb(m_ours),
                mb(m_tgt),
                m_ours / m_tgt
            ));
            json.push_str(&format!(
                "{}{{\"case\": \"{}\", \"initiator\": \"{initiator}\", \"io_bytes\": {}, \"depth\": {}, \"header_digest\": {}, \"toemu_iops\": {m_ours:.0}, \"tgt_iops\": {m_tgt:.0}, \"ratio\": {:.3}, \"toemu_samples\": {ours:?}, \"tgt_samples\": {theirs:?}}}",
                if k > 0 || by_us { ", " } else { "" },
                c.name,
                c.blocks * 512,
                c.depth,
                !c.query.is_empty(),
                m_ours / m_tgt
            ));
        }
    }
    json.push_str("]}\n");
    println!(
        "{:<32} {:<17} {:>10} {:>9} {:>10} {:>9} {:>8}",
        "case", "initiator", "toemu IOPS", "MB/s", "tgt IOPS", "MB/s", "ratio"
    );
    for r in rows {
        println!("{r}");
    }
    drop((ours_daemon, tgt_daemon));
    let out = root.join("target/iscsi-bench.json");
    std::fs::write(&out, json).map_err(|e| e.to_string())?;
    eprintln!("iscsi-bench: wrote {}", out.display());
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}
