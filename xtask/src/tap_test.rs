//! `cargo xtask tap-test`: the emulated TOE host on a TAP device, driven by real Linux
//! programs, inside a network namespace this task creates and always deletes.
//!
//! Needs root (TAP devices and namespaces); without it the task fails and says why. Installs
//! the client programs it needs from Debian's packages if they are missing.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod hostile;
pub mod msg_bench;

const HOST_IP: &str = "10.99.0.2";
const LINUX_IP: &str = "10.99.0.1";

/// A network namespace deleted on drop, with the processes started inside it (killed on drop).
struct Netns {
    name: String,
    children: Vec<Child>,
}

impl Netns {
    fn create() -> Result<Netns, String> {
        Netns::create_named("")
    }

    /// A namespace `toemu-tap-<pid>` or, with a `suffix`, `toemu-tap-<pid>-<suffix>`.
    fn create_named(suffix: &str) -> Result<Netns, String> {
        let name = if suffix.is_empty() {
            format!("toemu-tap-{}", std::process::id())
        } else {
            format!("toemu-tap-{}-{suffix}", std::process::id())
        };
        status(Command::new("ip").args(["netns", "add", &name]))
            .map_err(|e| format!("cannot create network namespace {name}: {e} (root needed)"))?;
        let ns = Netns {
            name,
            children: Vec::new(),
        };
        ns.sh("ip link set lo up")?;
        Ok(ns)
    }

    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Run a shell command inside the namespace; its stdout on success.
    fn sh(&self, script: &str) -> Result<String, String> {
        let out = self
            .cmd("sh")
            .args(["-c", script])
            .output()
            .map_err(|e| format!("{script}: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "`{script}` failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Start `toemu ARGS` (which opens TAP device `tap0`) inside the namespace with stdout
    /// captured to `log`, then give the Linux side of `tap0` its address.
    fn toemu(&mut self, toemu: &Path, args: &[&str], log: &Path) -> Result<usize, String> {
        let f = std::fs::File::create(log).map_err(|e| e.to_string())?;
        let child = self
            .cmd(toemu.to_str().ok_or("non-UTF-8 path")?)
            .args(args)
            .stdout(Stdio::from(f))
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("spawn toemu: {e}"))?;
        self.children.push(child);
        self.configure_tap("tap0", LINUX_IP)?;
        Ok(self.children.len() - 1)
    }

    /// Wait for TAP device `dev` to appear, then give the Linux side its address.
    fn configure_tap(&self, dev: &str, linux_ip: &str) -> Result<(), String> {
        let t0 = Instant::now();
        while self.sh(&format!("ip link show {dev}")).is_err() {
            if t0.elapsed() > Duration::from_secs(10) {
                return Err(format!("TAP device {dev} never appeared"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.sh(&format!(
            "ip addr add {linux_ip}/24 dev {dev} && ip link set {dev} up"
        ))?;
        Ok(())
    }

    /// Stop child `i` (SIGTERM, then wait).
    fn stop(&mut self, i: usize) {
        let c = &mut self.children[i];
        let _ = Command::new("kill").arg(c.id().to_string()).status();
        let _ = c.wait();
    }

    /// Stop every child from index `first` on that is still running.
    fn stop_from(&mut self, first: usize) {
        for i in first..self.children.len() {
            if self.children[i].try_wait().ok().flatten().is_none() {
                self.stop(i);
            }
        }
    }

    /// Wait up to `max` for child `i` to exit by itself.
    fn wait_exit(&mut self, i: usize, max: Duration) -> Result<(), String> {
        let t0 = Instant::now();
        loop {
            if let Some(s) = self.children[i].try_wait().map_err(|e| e.to_string())? {
                return if s.success() {
                    Ok(())
                } else {
                    Err(format!("toemu exited with {s}"))
                };
            }
            if t0.elapsed() > max {
                self.stop(i);
                return Err(format!("toemu did not finish within {max:?}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for c in &mut self.children {
            if c.try_wait().ok().flatten().is_none() {
                let _ = Command::new("kill").arg(c.id().to_string()).status();
                let _ = c.wait();
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn status(c: &mut Command) -> Result<(), String> {
    let s = c.status().map_err(|e| e.to_string())?;
    if s.success() {
        Ok(())
    } else {
        Err(format!("exit {s}"))
    }
}

fn need_root() -> Result<(), String> {
    if !crate::is_root() {
        return Err("tap-test needs root: it creates a network namespace and a TAP device".into());
    }
    if !Path::new("/dev/net/tun").exists() {
        return Err("tap-test needs /dev/net/tun (the kernel's TUN/TAP driver)".into());
    }
    Ok(())
}

/// The client programs the scenarios run, as (command, Debian package).
const TAP_TOOLS: &[(&str, &str)] = &[
    ("curl", "curl"),
    ("socat", "socat"),
    ("nc", "netcat-openbsd"),
    ("ping", "iputils-ping"),
    ("python3", "python3"),
    ("ip", "iproute2"),
];

fn sha256_of_gen(toemu: &Path, bytes: u64, seed: u64) -> Result<String, String> {
    let out = Command::new("sh")
        .args([
            "-c",
            &format!(
                "{} gen --bytes {bytes} --seed {seed} | sha256sum",
                toemu.display()
            ),
        ])
        .output()
        .map_err(|e| e.to_string())?;
    first_word(&String::from_utf8_lossy(&out.stdout))
}

fn first_word(s: &str) -> Result<String, String> {
    s.split_whitespace()
        .next()
        .map(str::to_string)
        .ok_or_else(|| format!("no output: {s:?}"))
}

fn check(what: &str, ok: bool, detail: impl std::fmt::Display) -> Result<(), String> {
    if ok {
        eprintln!("tap-test: ok   {what}");
        Ok(())
    } else {
        Err(format!("{what}: {detail}"))
    }
}

fn read_log(p: &Path) -> String {
    let mut s = String::new();
    if let Ok(mut f) = std::fs::File::open(p) {
        let _ = f.read_to_string(&mut s);
    }
    s
}

/// Wait until `log` contains a line with `needle`; returns that line.
fn wait_line(log: &Path, needle: &str, max: Duration) -> Result<String, String> {
    let t0 = Instant::now();
    loop {
        if let Some(l) = read_log(log).lines().find(|l| l.contains(needle)) {
            return Ok(l.to_string());
        }
        if t0.elapsed() > max {
            return Err(format!(
                "no line with {needle:?} in {} within {max:?}:\n{}",
                log.display(),
                read_log(log)
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The median of `v` (the upper one of an even count); `v` must not be empty.
fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[s.len() / 2]
}

/// The number before ` MB/s` in a line such as `... in 1.2 s (81.1 MB/s), 0 failed`.
fn mb_per_s_of(line: &str) -> Result<f64, String> {
    line.find(" MB/s")
        .and_then(|i| line[..i].rsplit(['(', ' ']).next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("cannot read throughput from {line:?}"))
}

fn field_after(line: &str, key: &str) -> Option<String> {
    let mut it = line.split_whitespace();
    while let Some(w) = it.next() {
        if w == key {
            return it.next().map(str::to_string);
        }
    }
    None
}

/// Check root and tools, build toemu; the path of the binary.
fn prepare(root: &Path) -> Result<PathBuf, String> {
    need_root()?;
    crate::ensure_tools("tap-test", TAP_TOOLS)?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    status(
        Command::new(cargo)
            .current_dir(root)
            .args(["build", "--release", "-p", "toemu"]),
    )
    .map_err(|e| format!("building toemu: {e}"))?;
    Ok(root.join("target/release/toemu"))
}

/// Which scenarios `cargo xtask tap-test` runs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Suite {
    /// Real programs against the apps: `tap-test basic`.
    Basic,
    /// The hostile-peer suite: `tap-test hostile`.
    Hostile,
    /// Both (the default).
    All,
}

/// Run the scenarios of `suite`; the namespaces are deleted on every exit path (Drop). The
/// hostile-peer suite runs even when a basic scenario failed; both failures are reported.
/// `only` names hostile-peer scenarios to run (all if empty).
pub fn run(root: &Path, suite: Suite, only: &[String]) -> Result<(), String> {
    let toemu = prepare(root)?;
    let work = std::env::temp_dir().join(format!("toemu-tap-test-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    let mut failed = Vec::new();
    if suite != Suite::Hostile {
        if let Err(e) = scenarios(&toemu, &work) {
            eprintln!("tap-test: FAIL {e}");
            failed.push(e);
        }
    }
    if suite != Suite::Basic {
        if let Err(e) = hostile::run(&toemu, &work, only) {
            failed.push(e);
        }
    }
    let _ = std::fs::remove_dir_all(&work);
    let secs = t0.elapsed().as_secs_f64();
    if failed.is_empty() {
        eprintln!("tap-test: all scenarios passed in {secs:.1} s");
        Ok(())
    } else {
        Err(format!(
            "tap-test FAILED after {secs:.1} s:\n{}",
            failed.join("\n")
        ))
    }
}

fn scenarios(toemu: &Path, work: &Path) -> Result<(), String> {
    let mut ns = Netns::create()?;
    let ip = format!("{HOST_IP}/24");
    let log = |name: &str| -> PathBuf { work.join(format!("{name}.log")) };

    // ---- http: ping, curl 256 MiB, 404, 400, keep-alive, a file from --dir
    let dir = work.join("www");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let mut file = vec![0u8; 3_000_000];
    for (i, b) in file.iter_mut().enumerate() {
        *b = (i * 7 % 251) as u8;
    }
    std::fs::File::create(dir.join("f.bin"))
        .and_then(|mut f| f.write_all(&file))
        .map_err(|e| e.to_string())?;
    let dir_s = dir.to_str().ok_or("non-UTF-8 temp dir")?;
    let h = ns.toemu(
        toemu,
        &[
            "serve", "--tap", "tap0", "--ip", &ip, "--app", "http", "--dir", dir_s,
        ],
        &log("http"),
    )?;
    let ping = ns.sh(&format!("ping -c 3 -i 0.2 -W 2 {HOST_IP}"));
    check(
        "ICMP echo (ping) answered",
        ping.is_ok(),
        format!("{ping:?}"),
    )?;
    let bytes = 268_435_456u64;
    let t0 = Instant::now();
    let got = ns.sh(&format!(
        "curl -sS --max-time 120 http://{HOST_IP}/bytes/{bytes} | sha256sum"
    ))?;
    let secs = t0.elapsed().as_secs_f64();
    let want = sha256_of_gen(toemu, bytes, 0)?;
    check(
        &format!(
            "curl /bytes/{bytes}: SHA-256 matches ({:.0} MB/s)",
            bytes as f64 / secs / 1e6
        ),
        first_word(&got)? == want,
        format!("got {got}, want {want}"),
    )?;
    let code = ns.sh(&format!(
        "curl -s -o /dev/null -w '%{{http_code}}' http://{HOST_IP}/no/such/file"
    ))?;
    check("404 for an unknown path", code == "404", &code)?;
    let bad = ns.sh(&format!(
        "printf 'NONSENSE\\r\\n\\r\\n' | nc -w 5 {HOST_IP} 80 | head -1"
    ))?;
    check(
        "400 for a malformed request",
        bad.starts_with("HTTP/1.1 400"),
        &bad,
    )?;
    let two = ns.sh(&format!(
        "curl -sS -w '%{{num_connects}} %{{http_code}}\\n' -o /dev/null -o /dev/null http://{HOST_IP}/bytes/1000 http://{HOST_IP}/bytes/2000"
    ))?;
    check(
        "keep-alive: two requests on one connection",
        two.lines().map(|l| l.trim()).collect::<Vec<_>>() == ["1 200", "0 200"],
        &two,
    )?;
    let fsum = ns.sh(&format!("curl -sS http://{HOST_IP}/f.bin | sha256sum"))?;
    let fwant = ns.sh(&format!("sha256sum {}", dir.join("f.bin").display()))?;
    check(
        "file served from --dir",
        first_word(&fsum)? == first_word(&fwant)?,
        format!("{fsum} vs {fwant}"),
    )?;
    // garbage frames onto the TAP from the Linux side: dropped and counted, service continues
    let garbage = r#"
import os, socket
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("tap0", 0))
mac = bytes([0x02, 0x54, 10, 99, 0, 2])
me = bytes([0x02, 0, 0, 0, 0, 0x99])
sent = 0
for i in range(200):
    body = os.urandom(i % 90)
    s.send(mac + me + b"\x08\x00" + body)       # IPv4 ethertype, random or truncated header
    sent += 1
hdr = bytes([0x45, 0, 0x05, 0xdc, 0, 0, 0, 0, 64, 6, 0, 0, 10, 99, 0, 1, 10, 99, 0, 2])
for i in range(50):
    s.send(mac + me + b"\x08\x00" + hdr + os.urandom(i))  # bad checksum, truncated TCP
    sent += 1
print(sent)
"#;
    std::fs::write(work.join("garbage.py"), garbage).map_err(|e| e.to_string())?;
    let sent = ns.sh(&format!("python3 {}", work.join("garbage.py").display()));
    let sent = sent.map_err(|e| format!("writing garbage frames: {e}"))?;
    let code = ns.sh(&format!(
        "curl -s -o /dev/null -w '%{{http_code}}' http://{HOST_IP}/bytes/100000"
    ))?;
    check(
        &format!("still serving after {} garbage frames", sent.trim()),
        code == "200",
        &code,
    )?;
    ns.stop(h);
    let stats = wait_line(&log("http"), "stats:", Duration::from_secs(10))?;
    let dropped: u64 = ["rx_malformed", "rx_bad_checksum"]
        .iter()
        .filter_map(|k| field_after(&stats, k)?.parse::<u64>().ok())
        .sum();
    let sent: u64 = sent.trim().parse().unwrap_or(u64::MAX);
    check(
        &format!("garbage frames dropped and counted ({dropped} of {sent})"),
        dropped >= sent,
        &stats,
    )?;

    // ---- the impairment model on the TAP port: a Linux client through loss and reordering
    let pcap = work.join("impaired.pcap");
    let pcap_s = pcap.to_str().ok_or("non-UTF-8 temp dir")?;
    let h = ns.toemu(
        toemu,
        &[
            "serve",
            "--tap",
            "tap0",
            "--ip",
            &ip,
            "--app",
            "http",
            "--delay-ms",
            "2",
            "--loss",
            "0.5%",
            "--reorder",
            "0.5%",
            "--pcap",
            pcap_s,
        ],
        &log("impaired"),
    )?;
    let bytes = 32u64 << 20;
    let got = ns.sh(&format!(
        "curl -sS --max-time 120 http://{HOST_IP}/bytes/{bytes} | sha256sum"
    ))?;
    let want = sha256_of_gen(toemu, bytes, 0)?;
    check(
        "curl through a TAP with 2 ms delay, 0.5% loss and 0.5% reordering: SHA-256 matches",
        first_word(&got)? == want,
        format!("got {got}, want {want}"),
    )?;
    ns.stop(h);
    let size = std::fs::metadata(&pcap).map(|m| m.len()).unwrap_or(0);
    check(
        &format!(
            "--pcap on the TAP port wrote a capture ({} MiB)",
            size >> 20
        ),
        size > bytes,
        size,
    )?;

    // ---- echo: concurrent round trips through socat, and nc
    let h = ns.toemu(
        toemu,
        &["serve", "--tap", "tap0", "--ip", &ip, "--app", "echo"],
        &log("echo"),
    )?;
    let script = format!(
        "set -e; for i in 1 2 3 4 5 6 7 8; do head -c $((i*300000)) /dev/urandom > {w}/in$i; done; \
         for i in 1 2 3 4 5 6 7 8; do socat -t 10 - TCP:{HOST_IP}:7,shut-down < {w}/in$i > {w}/out$i & done; wait; \
         for i in 1 2 3 4 5 6 7 8; do cmp {w}/in$i {w}/out$i; done; echo same",
        w = work.display()
    );
    let same = ns.sh(&script)?;
    check(
        "8 concurrent echo connections (socat) round-trip intact",
        same.trim() == "same",
        &same,
    )?;
    let reply = ns.sh(&format!("printf 'hello toemu' | nc -N -w 5 {HOST_IP} 7"))?;
    check("nc echo round trip", reply == "hello toemu", &reply)?;
    ns.stop(h);

    // ---- sink: 1 GiB upload with socat, hash compared
    let h = ns.toemu(
        toemu,
        &["serve", "--tap", "tap0", "--ip", &ip, "--app", "sink"],
        &log("sink"),
    )?;
    let gib = 1u64 << 30;
    let t0 = Instant::now();
    ns.sh(&format!(
        "{} gen --bytes {gib} --seed 5 | socat -u - TCP:{HOST_IP}:9",
        toemu.display()
    ))?;
    let line = wait_line(&log("sink"), "sink: connection", Duration::from_secs(60))?;
    let secs = t0.elapsed().as_secs_f64();
    let want = sha256_of_gen(toemu, gib, 5)?;
    check(
        &format!(
            "1 GiB upload to sink: bytes and SHA-256 match ({:.0} MB/s)",
            gib as f64 / secs / 1e6
        ),
        field_after(&line, "connection").is_some()
            && line.contains(&format!(" {gib} bytes "))
            && field_after(&line, "sha256") == Some(want.clone()),
        format!("{line} (want {want})"),
    )?;
    ns.stop(h);

    // ---- backpressure: W = 4 KiB and a slow sink (8 MiB/s): the Linux sender is throttled
    let h = ns.toemu(
        toemu,
        &[
            "--indicate-window",
            "4KiB",
            "serve",
            "--tap",
            "tap0",
            "--ip",
            &ip,
            "--app",
            "sink",
            "--rate",
            "8MiB",
        ],
        &log("slow"),
    )?;
    let pid = ns.children[h].id();
    let bytes = 32u64 << 20;
    let t0 = Instant::now();
    let mut sender = ns
        .cmd("sh")
        .args([
            "-c",
            &format!(
                "{} gen --bytes {bytes} --seed 6 | socat -u - TCP:{HOST_IP}:9",
                toemu.display()
            ),
        ])
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut max_rss_kib = 0u64;
    while sender.try_wait().map_err(|e| e.to_string())?.is_none() {
        if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            if let Some(v) = s.lines().find(|l| l.starts_with("VmRSS:")) {
                let kib: u64 = v
                    .split_whitespace()
                    .nth(1)
                    .and_then(|x| x.parse().ok())
                    .unwrap_or(0);
                max_rss_kib = max_rss_kib.max(kib);
            }
        }
        if t0.elapsed() > Duration::from_secs(60) {
            let _ = sender.kill();
            return Err("backpressure: sender still running after 60 s".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let line = wait_line(&log("slow"), "sink: connection", Duration::from_secs(30))?;
    let secs = t0.elapsed().as_secs_f64();
    let want = sha256_of_gen(toemu, bytes, 6)?;
    check(
        "backpressure: transfer intact",
        field_after(&line, "sha256") == Some(want.clone()),
        format!("{line} (want {want})"),
    )?;
    let floor = bytes as f64 / (8u64 << 20) as f64 * 0.8;
    check(
        &format!(
            "backpressure: sender throttled to the sink's pace ({secs:.1} s for 32 MiB at 8 MiB/s)"
        ),
        secs >= floor,
        format!("took {secs:.2} s, expected at least {floor:.2} s"),
    )?;
    check(
        &format!(
            "backpressure: emulated host memory bounded (max RSS {} MiB)",
            max_rss_kib / 1024
        ),
        max_rss_kib < 400 * 1024,
        format!("{max_rss_kib} KiB"),
    )?;
    ns.stop(h);

    // ---- outbound: toemu get from python3 -m http.server, toemu send to socat
    let out_dir = work.join("pub");
    std::fs::create_dir_all(&out_dir).map_err(|e| e.to_string())?;
    let mut blob = vec![0u8; 8 << 20];
    for (i, b) in blob.iter_mut().enumerate() {
        *b = (i.wrapping_mul(2654435761) >> 13) as u8;
    }
    std::fs::write(out_dir.join("blob"), &blob).map_err(|e| e.to_string())?;
    let srv = ns
        .cmd("python3")
        .args([
            "-m",
            "http.server",
            "8000",
            "--bind",
            "0.0.0.0",
            "--directory",
        ])
        .arg(&out_dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    ns.children.push(srv);
    let g = ns.toemu(
        toemu,
        &[
            "get",
            "--tap",
            "tap0",
            "--ip",
            &ip,
            "--max-seconds",
            "60",
            &format!("http://{LINUX_IP}:8000/blob"),
        ],
        &log("get"),
    )?;
    ns.wait_exit(g, Duration::from_secs(90))?;
    let line = wait_line(&log("get"), "get:", Duration::from_secs(1))?;
    let want = ns.sh(&format!("sha256sum {}", out_dir.join("blob").display()))?;
    check(
        "toemu get from python3 -m http.server: status 200, SHA-256 matches",
        line.contains("status 200") && field_after(&line, "sha256") == Some(first_word(&want)?),
        &line,
    )?;
    let recv = ns
        .cmd("sh")
        .args([
            "-c",
            &format!(
                "socat -u TCP-LISTEN:9000,reuseaddr - | sha256sum > {}/recv.sum",
                work.display()
            ),
        ])
        .spawn()
        .map_err(|e| e.to_string())?;
    ns.children.push(recv);
    let r = ns.children.len() - 1;
    let bytes = 64u64 << 20;
    let s = ns.toemu(
        toemu,
        &[
            "send",
            "--tap",
            "tap0",
            "--ip",
            &ip,
            "--max-seconds",
            "60",
            "--to",
            &format!("{LINUX_IP}:9000"),
            "--bytes",
            &bytes.to_string(),
            "--seed",
            "7",
        ],
        &log("send"),
    )?;
    ns.wait_exit(s, Duration::from_secs(90))?;
    let _ = ns.children[r].wait();
    let got = std::fs::read_to_string(work.join("recv.sum")).map_err(|e| e.to_string())?;
    let want = sha256_of_gen(toemu, bytes, 7)?;
    check(
        "toemu send 64 MiB to socat: SHA-256 matches",
        first_word(&got)? == want,
        format!("{got} vs {want}"),
    )?;
    eprintln!(
        "tap-test: all basic scenarios passed; namespace {} removed",
        ns.name
    );
    Ok(())
}

/// One sink variant of the TAP benchmark.
struct Variant {
    name: &'static str,
    args: &'static [&'static str],
}

const VARIANTS: &[Variant] = &[
    Variant {
        name: "toe-sink",
        args: &["serve", "--app", "sink"],
    },
    Variant {
        name: "toe-sink-named",
        args: &[
            "serve",
            "--app",
            "sink",
            "--named-buf",
            "1MiB",
            "--named-bufs",
            "2",
        ],
    },
    Variant {
        name: "smoltcp-bare-sink",
        args: &["bare-sink"],
    },
];

/// `cargo xtask tap-bench [BYTES] [ROUNDS]`: a Linux sender (socat) into the TOE sink and into
/// a bare-smoltcp sink on the same TAP, alternating, medians reported as ratios to bare.
pub fn bench(root: &Path, bytes: u64, rounds: usize) -> Result<(), String> {
    let toemu = prepare(root)?;
    let work = std::env::temp_dir().join(format!("toemu-tap-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
    let mut ns = Netns::create()?;
    let ip = format!("{HOST_IP}/24");
    let want = sha256_of_gen(&toemu, bytes, 9)?;
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); VARIANTS.len()];
    for round in 0..rounds {
        for (i, v) in VARIANTS.iter().enumerate() {
            let log = work.join(format!("{}-{round}.log", v.name));
            let mut args: Vec<&str> = v.args.to_vec();
            args.extend(["--tap", "tap0", "--ip", &ip]);
            let h = ns.toemu(&toemu, &args, &log)?;
            std::thread::sleep(Duration::from_millis(100));
            ns.sh(&format!(
                "{} gen --bytes {bytes} --seed 9 | socat -u - TCP:{HOST_IP}:9",
                toemu.display()
            ))?;
            let line = wait_line(&log, "sink: connection", Duration::from_secs(120))?;
            ns.stop(h);
            if field_after(&line, "sha256") != Some(want.clone()) {
                return Err(format!("{}: integrity check failed: {line}", v.name));
            }
            let mbps = mb_per_s_of(&line)?;
            eprintln!(
                "tap-bench: round {} {:<18} {mbps:>8.1} MB/s",
                round + 1,
                v.name
            );
            results[i].push(mbps);
        }
    }
    let medians: Vec<f64> = results.iter().map(|v| median(v)).collect();
    for r in &mut results {
        r.sort_by(|a, b| a.total_cmp(b));
    }
    let bare = medians[VARIANTS.len() - 1];
    let mut json = String::from("{\"bytes\": ");
    json.push_str(&format!("{bytes}, \"rounds\": {rounds}, \"runs\": ["));
    println!(
        "{:<18} {:>10} {:>9} {:>10} {:>10}",
        "sink", "MB/s", "vs bare", "min", "max"
    );
    for (i, v) in VARIANTS.iter().enumerate() {
        let r = &results[i];
        println!(
            "{:<18} {:>10.1} {:>8.2}x {:>10.1} {:>10.1}",
            v.name,
            medians[i],
            medians[i] / bare,
            r[0],
            r[r.len() - 1]
        );
        json.push_str(&format!(
            "{}{{\"sink\": \"{}\", \"median_mb_per_s\": {:.1}, \"ratio_to_bare\": {:.3}, \"samples_mb_per_s\": {:?}}}",
            if i > 0 { ", " } else { "" },
            v.name,
            medians[i],
            medians[i] / bare,
            r
        ));
    }
    json.push_str("]}\n");
    let out = root.join("target/tap-bench.json");
    std::fs::write(&out, json).map_err(|e| e.to_string())?;
    eprintln!("tap-bench: wrote {}", out.display());
    drop(ns);
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

/// `cargo xtask iscsi-tap-bench [SECONDS] [ROUNDS]`: libiscsi's `iscsi-perf` in the namespace
/// reading 128 KiB at QD32 from toemu's target on an emulated TOE host on the TAP, with the
/// NIC's iSCSI engine and with the software data path, beside the TAP's ceiling (`curl` of
/// `/bytes/N` from the http app on the same TAP), alternating in each round; medians,
/// `target/iscsi-tap-bench.json`.
pub fn iscsi_bench(root: &Path, seconds: u32, rounds: usize) -> Result<(), String> {
    let toemu = prepare(root)?;
    crate::ensure_tools("iscsi-tap-bench", &[("iscsi-perf", "libiscsi-bin")])?;
    let work = std::env::temp_dir().join(format!("toemu-iscsi-tap-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
    let mut ns = Netns::create_named("iscsi")?;
    let ip = format!("{HOST_IP}/24");
    let img = work.join("lun.img");
    let img_s = img.to_str().ok_or("non-UTF-8 path")?.to_string();
    let iqn = "iqn.2026-12.org.toemu:disk";
    let url = format!("iscsi://{HOST_IP}/{iqn}/0");
    let probe = format!(
        "python3 -c 'import socket; socket.create_connection((\"{HOST_IP}\", 3260), 1).close()'"
    );
    let names = ["iscsi engine", "iscsi software", "http (TAP ceiling)"];
    let mut mbps: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    for round in 0..rounds {
        // Which goes first alternates.
        let mut order = [0usize, 1, 2];
        if round % 2 == 1 {
            order.reverse();
        }
        for which in order {
            let log = work.join(format!("{which}-{round}.log"));
            let v = if which < 2 {
                let offload = if which == 0 { "engine" } else { "software" };
                let args = [
                    "iscsi",
                    "target",
                    "--tap",
                    "tap0",
                    "--ip",
                    &ip,
                    "--size",
                    "256MiB",
                    "--iqn",
                    iqn,
                    "--offload",
                    offload,
                    "--lun",
                    &img_s,
                ];
                let h = ns.toemu(&toemu, &args, &log)?;
                let t0 = Instant::now();
                while ns.sh(&probe).is_err() {
                    if t0.elapsed() > Duration::from_secs(20) {
                        return Err(format!("the target never answered: {}", read_log(&log)));
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                // iscsi-perf runs until interrupted (and then exits non-zero): its output
                // is what counts. 256 blocks of 512 bytes: 128 KiB.
                let out = ns
                    .cmd("timeout")
                    .args(["-s", "INT", &seconds.to_string(), "iscsi-perf", "-m", "32"])
                    .args(["-b", "256", &url])
                    .output()
                    .map_err(|e| format!("iscsi-perf: {e}"))?;
                ns.stop(h);
                let out = String::from_utf8_lossy(&out.stdout).into_owned();
                let iops: f64 = out
                    .rsplit("iops average ")
                    .next()
                    .filter(|_| out.contains("iops average "))
                    .and_then(|s| s.split_whitespace().next())
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(|| format!("iscsi-perf printed no average: {out}"))?;
                iops * 131_072.0 / 1e6
            } else {
                let args = ["serve", "--tap", "tap0", "--ip", &ip, "--app", "http"];
                let h = ns.toemu(&toemu, &args, &log)?;
                std::thread::sleep(Duration::from_millis(200));
                let bytes: u64 = 1 << 30;
                let out = ns.sh(&format!(
                    "curl -sS --max-time 300 -o /dev/null -w '%{{speed_download}}' http://{HOST_IP}/bytes/{bytes}"
                ))?;
                ns.stop(h);
                out.trim()
                    .parse::<f64>()
                    .map_err(|_| format!("curl printed {out:?}"))?
                    / 1e6
            };
            eprintln!(
                "iscsi-tap-bench: round {} {:<20} {v:>8.1} MB/s",
                round + 1,
                names[which]
            );
            mbps[which].push(v);
        }
    }
    let m: Vec<f64> = mbps.iter().map(|v| median(v)).collect();
    println!(
        "iscsi-perf 128 KiB QD32 reads over TAP, {seconds} s per run, {rounds} rounds (medians)"
    );
    println!("{:<20} {:>10} {:>14}", "", "MB/s", "vs TAP ceiling");
    let mut runs = Vec::new();
    for (i, n) in names.iter().enumerate() {
        println!("{n:<20} {:>10.1} {:>13.2}x", m[i], m[i] / m[2]);
        runs.push(format!(
            "{{\"run\": \"{n}\", \"median_mb_per_s\": {:.1}, \"ratio_to_tap_ceiling\": {:.3}, \"samples_mb_per_s\": {:?}}}",
            m[i],
            m[i] / m[2],
            mbps[i]
        ));
    }
    let json = format!(
        "{{\"seconds\": {seconds}, \"rounds\": {rounds}, \"io_bytes\": 131072, \"depth\": 32, \"runs\": [{}]}}\n",
        runs.join(", ")
    );
    let out = root.join("target/iscsi-tap-bench.json");
    std::fs::write(&out, json).map_err(|e| e.to_string())?;
    eprintln!("iscsi-tap-bench: wrote {}", out.display());
    drop(ns);
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}
