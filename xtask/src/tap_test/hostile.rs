//! The hostile-peer suite of `cargo xtask tap-test`: peers that open too many connections,
//! flood 1-byte PSH segments at an application that does not read, spoof SYNs, vanish
//! mid-transfer, or trickle one byte a second. Every scenario starts its own `toemu serve`,
//! checks that the host stays within its memory bound ([`memory_bound_kib`]) and that a
//! well-behaved client is served afterwards, and says what it checked. The scenarios run one
//! after another even when one fails; the suite fails at the end naming every failure.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use super::{check, first_word, read_log, wait_line, Netns, HOST_IP, LINUX_IP};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

/// Built-in settings the bound is computed from (README, Configuration).
const W: u64 = 256 * KIB;
const ANON_BUF: u64 = 16 * KIB;
const SOCKET_BUF: u64 = 512 * KIB;
/// `runtime::DEFAULT_APP_MEMORY_BYTES`: the host-memory region for application buffers,
/// mapped lazily (only touched pages count).
const APP_REGION: u64 = 512 * MIB;
/// The listen backlog of `toemu serve` (its sockets come on top of `max_conns`).
const BACKLOG: u64 = 64;
/// The process itself: code, heap, rings, smoltcp's state, the TAP thread.
const PROCESS_BASE: u64 = 64 * MIB;

/// The memory bound the host must keep (VmHWM, KiB), for `max_conns` connections with the
/// default W, anonymous buffer and socket buffer sizes:
///
/// - the anonymous pool, `max_conns × ceil(W / anon_buf) × anon_buf` (16 MiB at 64);
/// - the application memory region, 512 MiB (mapped lazily; counted whole);
/// - per NIC socket its send and receive buffers, `2 × socket_buf_bytes` (1 MiB), for every
///   socket the NIC may hold: `max_conns` offloaded connections plus the listener's backlog
///   of [`BACKLOG`] (`toemu serve` listens with 64), 128 MiB at 64;
/// - 64 MiB for the process itself.
///
/// 720 MiB with the defaults. A host that buffers per segment or per connection attempt
/// without limit breaks it.
fn memory_bound_kib(max_conns: u64) -> u64 {
    let pool = max_conns * W.div_ceil(ANON_BUF) * ANON_BUF;
    let sockets = max_conns + BACKLOG;
    (pool + APP_REGION + sockets * 2 * SOCKET_BUF + PROCESS_BASE) / KIB
}

/// How the bound is made up, for messages.
fn bound_text(max_conns: u64) -> String {
    format!(
        "bound {} MiB = anon pool {} KiB ({max_conns} conns x ceil(W/anon_buf) x 16 KiB) + app region 512 MiB + ({max_conns} conns + {BACKLOG} backlog) NIC sockets x 2 x 512 KiB + 64 MiB process",
        memory_bound_kib(max_conns) / 1024,
        max_conns * W.div_ceil(ANON_BUF) * ANON_BUF / KIB,
    )
}

/// A `/proc/<pid>/status` field in KiB (`VmHWM`, `VmRSS`).
fn proc_kib(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let l = s.lines().find(|l| l.starts_with(key))?;
    l.split_whitespace().nth(1)?.parse().ok()
}

/// The host process `h` is still running.
fn alive(ns: &mut Netns, h: usize, what: &str) -> Result<(), String> {
    match ns.children[h].try_wait() {
        Ok(None) => Ok(()),
        Ok(Some(s)) => Err(format!("{what}: toemu exited ({s}) during the scenario")),
        Err(e) => Err(format!("{what}: toemu: {e}")),
    }
}

/// The host's memory high-water mark (VmHWM) is within [`memory_bound_kib`].
fn check_memory(ns: &mut Netns, h: usize, what: &str, max_conns: u64) -> Result<(), String> {
    alive(ns, h, what)?;
    let pid = ns.children[h].id();
    let hwm = proc_kib(pid, "VmHWM:").ok_or_else(|| format!("{what}: no VmHWM for pid {pid}"))?;
    let bound = memory_bound_kib(max_conns);
    check(
        &format!(
            "{what}: host memory bounded (VmHWM {} MiB <= {} MiB)",
            hwm / 1024,
            bound / 1024
        ),
        hwm <= bound,
        format!(
            "VmHWM {hwm} KiB ({} MiB) exceeds the {}",
            hwm / 1024,
            bound_text(max_conns)
        ),
    )
}

/// One well-behaved curl of `/bytes/100000` from `ns` within `max_s` seconds: 200 and every
/// byte. `what` says which curl, e.g. "burst: a curl after the burst is served".
fn curl_served(ns: &Netns, what: &str, max_s: f64) -> Result<(), String> {
    let t0 = Instant::now();
    let out = ns.sh(&format!(
        "curl -s -o /dev/null --max-time {max_s} -w '%{{http_code}} %{{size_download}} %{{time_connect}}' http://{HOST_IP}/bytes/100000; echo \" $?\""
    ))?;
    let secs = t0.elapsed().as_secs_f64();
    let words: Vec<&str> = out.split_whitespace().collect();
    let connect = words.get(2).copied().unwrap_or("?");
    check(
        &format!("{what} ({secs:.2} s, connected after {connect} s)"),
        matches!(words[..], ["200", "100000", _, "0"]),
        format!(
            "curl /bytes/100000 gave `{}` (http_code size_download time_connect curl_exit; want `200 100000 _ 0`) after {secs:.2} s",
            out.trim()
        ),
    )
}

/// Start `toemu ARGS` and wait until the host answers (a TCP connect to `port`).
fn start(
    ns: &mut Netns,
    toemu: &Path,
    args: &[&str],
    log: &Path,
    port: u16,
) -> Result<usize, String> {
    let h = ns.toemu(toemu, args, log)?;
    let t0 = Instant::now();
    loop {
        let probe = format!(
            "python3 -c 'import socket; socket.create_connection((\"{HOST_IP}\", {port}), 1).close()'"
        );
        if ns.sh(&probe).is_ok() {
            return Ok(h);
        }
        alive(ns, h, "starting toemu")?;
        if t0.elapsed() > Duration::from_secs(10) {
            return Err(format!(
                "toemu {args:?}: port {port} not reachable within 10 s"
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `toemu serve --app APP` on tap0 at the host address, logging to `work/NAME.log`, started
/// and answering on `port`. Returns (host, log path).
fn serve(
    ns: &mut Netns,
    toemu: &Path,
    work: &Path,
    name: &str,
    app: &str,
    port: u16,
) -> Result<(usize, PathBuf), String> {
    let log = work.join(format!("{name}.log"));
    let ip = format!("{HOST_IP}/24");
    let h = start(
        ns,
        toemu,
        &["serve", "--tap", "tap0", "--ip", &ip, "--app", app],
        &log,
        port,
    )?;
    Ok((h, log))
}

/// Run the Python `script` (written to `work/NAME.py`) with `args` in the lab namespace, its
/// standard output in `work/NAME.out`. Returns (child index, output path).
fn spawn_python(
    ns: &mut Netns,
    work: &Path,
    name: &str,
    script: &str,
    args: &[&str],
) -> Result<(usize, PathBuf), String> {
    let path = work.join(format!("{name}.py"));
    std::fs::write(&path, script).map_err(|e| e.to_string())?;
    let out = work.join(format!("{name}.out"));
    let f = std::fs::File::create(&out).map_err(|e| e.to_string())?;
    let child = ns
        .cmd("python3")
        .arg(&path)
        .args(args)
        .stdout(Stdio::from(f))
        .spawn()
        .map_err(|e| format!("{name}: {e}"))?;
    ns.children.push(child);
    Ok((ns.children.len() - 1, out))
}

/// Stop host `h` and print its final `stats:` line.
fn stop_with_stats(ns: &mut Netns, h: usize, log: &Path, what: &str) -> Result<String, String> {
    ns.stop(h);
    let line = wait_line(log, "stats:", Duration::from_secs(10))
        .map_err(|e| format!("{what}: no final stats line: {e}"))?;
    eprintln!("tap-test:      {what}: {line}");
    Ok(line)
}

/// The scenarios, by name (`cargo xtask tap-test hostile NAME...` runs some).
pub(super) const SCENARIOS: &[(&str, Scenario)] = &[
    ("burst", burst),
    ("psh-flood", psh_flood),
    ("syn-flood", syn_flood),
    ("vanishing-peer", vanishing_peer),
    ("slowloris", slowloris),
];

/// Runs the hostile-peer scenarios named in `only` (all if empty); every one runs, failures
/// are collected.
pub(super) fn run(toemu: &Path, work: &Path, only: &[String]) -> Result<(), String> {
    let scenarios: Vec<&(&str, Scenario)> = SCENARIOS
        .iter()
        .filter(|(n, _)| only.is_empty() || only.iter().any(|o| o == n))
        .collect();
    if let Some(bad) = only.iter().find(|o| !SCENARIOS.iter().any(|(n, _)| n == o)) {
        let names: Vec<&str> = SCENARIOS.iter().map(|(n, _)| *n).collect();
        return Err(format!(
            "no hostile-peer scenario {bad:?}; there are: {}",
            names.join(", ")
        ));
    }
    let mut ns = Netns::create()?;
    let mut failed = Vec::new();
    for (name, f) in scenarios.iter().copied() {
        eprintln!("tap-test: -- hostile peer: {name}");
        let t0 = Instant::now();
        let first_child = ns.children.len();
        let r = f(&mut ns, toemu, work);
        ns.stop_from(first_child);
        let secs = t0.elapsed().as_secs_f64();
        match r {
            Ok(()) => eprintln!("tap-test: ok   hostile peer: {name} ({secs:.1} s)"),
            Err(e) => {
                eprintln!("tap-test: FAIL hostile peer: {name} ({secs:.1} s): {e}");
                failed.push(format!("{name}: {e}"));
            }
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} of {} hostile-peer scenarios failed:\n  {}",
            failed.len(),
            scenarios.len(),
            failed.join("\n  ")
        ))
    }
}

/// A scenario: the lab namespace, the toemu binary, a scratch directory.
pub(super) type Scenario = fn(&mut Netns, &Path, &Path) -> Result<(), String>;

/// Results of `n` concurrent curls of `/bytes/size`: (complete, refused or reset, bad lines).
/// Clean refusals of a curl burst by curl exit code: 7 (connection refused), 52 (closed
/// before a response), 56 (connection reset).
#[derive(Debug, Default, Clone, Copy)]
struct Refusals {
    refused: usize,
    empty: usize,
    reset: usize,
}

impl Refusals {
    fn add(&mut self, code: &str) {
        match code {
            "7" => self.refused += 1,
            "52" => self.empty += 1,
            _ => self.reset += 1,
        }
    }
    fn total(&self) -> usize {
        self.refused + self.empty + self.reset
    }
    fn merge(&mut self, o: Refusals) {
        self.refused += o.refused;
        self.empty += o.empty;
        self.reset += o.reset;
    }
}

impl std::fmt::Display for Refusals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} refused/reset cleanly (exit 7: {}, 52: {}, 56: {})",
            self.total(),
            self.refused,
            self.empty,
            self.reset
        )
    }
}

fn curl_burst(
    ns: &Netns,
    dir: &Path,
    n: usize,
    size: u64,
    max_s: u64,
) -> Result<(usize, Refusals, Vec<String>), String> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    ns.sh(&format!(
        "cd {d} && for i in $(seq {n}); do \
           (curl -s -o /dev/null --max-time {max_s} -w '%{{size_download}}' http://{HOST_IP}/bytes/{size} > r$i; echo \" $?\" >> r$i) & \
         done; wait",
        d = dir.display()
    ))?;
    let (mut complete, mut refused, mut bad) = (0, Refusals::default(), Vec::new());
    for i in 1..=n {
        let text = std::fs::read_to_string(dir.join(format!("r{i}"))).unwrap_or_default();
        let f: Vec<&str> = text.split_whitespace().collect();
        match f.as_slice() {
            [got, "0"] if got.parse::<u64>() == Ok(size) => complete += 1,
            // 7: connection refused; 52: empty reply (closed before a response);
            // 56: connection reset. Anything else (28 timed out, 18 partial body) is not clean.
            [_, code @ ("7" | "52" | "56")] => refused.add(code),
            _ => bad.push(format!("curl {i}: `{}`", text.trim())),
        }
    }
    Ok((complete, refused, bad))
}

/// 1. Burst: 200 concurrent 1 MiB downloads against max_conns 64, then 1,000 connections in
///    bursts of 300. Each curl either gets the whole body or is refused or reset cleanly (curl
///    exit 7, 52 or 56); nothing times out; the host serves afterwards.
fn burst(ns: &mut Netns, toemu: &Path, work: &Path) -> Result<(), String> {
    let (h, log) = serve(ns, toemu, work, "burst", "http", 80)?;
    let (ok, refused, bad) = curl_burst(ns, &work.join("burst200"), 200, MIB, 60)?;
    check(
        &format!(
            "burst: 200 concurrent curls of 1 MiB: {ok} complete, {refused}, none hung"
        ),
        bad.is_empty() && ok > 0,
        format!(
            "{ok} complete, {refused}, {} neither (want whole body, or curl exit 7/52/56 within 60 s): {}",
            bad.len(),
            bad.iter().take(8).cloned().collect::<Vec<_>>().join("; ")
        ),
    )?;
    alive(ns, h, "burst")?;
    curl_served(ns, "burst: a curl after the 200 is served", 10.0)?;
    let (mut ok, mut refused, mut bad) = (0, Refusals::default(), Vec::new());
    for (i, n) in [300usize, 300, 300, 100].into_iter().enumerate() {
        let (o, r, b) = curl_burst(ns, &work.join(format!("burst1000-{i}")), n, 100_000, 60)?;
        ok += o;
        refused.merge(r);
        bad.extend(b.into_iter().map(|l| format!("burst {}: {l}", i + 1)));
    }
    check(
        &format!(
            "burst: 1,000 connections in bursts of 300 (100 KB each): {ok} complete, {refused}"
        ),
        bad.is_empty() && ok > 0,
        format!(
            "{ok} complete, {refused}, {} neither: {}",
            bad.len(),
            bad.iter().take(8).cloned().collect::<Vec<_>>().join("; ")
        ),
    )?;
    curl_served(ns, "burst: a curl after the 1,000 is served", 10.0)?;
    check_memory(ns, h, "burst", 64)?;
    stop_with_stats(ns, h, &log, "burst")?;
    Ok(())
}

/// The 1-byte flooder: `n` connections with TCP_NODELAY, one byte per send() (a PSH segment
/// each while the window is open), never reading, for `seconds`; prints bytes sent.
const FLOODER: &str = r#"
import socket, sys, time
host, port, n, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
socks = []
for _ in range(n):
    s = socket.create_connection((host, port), 5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.setblocking(False)
    socks.append(s)
sent = blocked = 0
end = time.time() + seconds
while time.time() < end:
    now_blocked = 0
    for s in socks:
        try:
            sent += s.send(b"x")
        except BlockingIOError:
            now_blocked += 1
    blocked += now_blocked
    if now_blocked == len(socks):
        time.sleep(0.001)  # every window is closed: do not spin
print(sent, blocked, flush=True)
for s in socks:
    s.close()
"#;

/// 2. 1-byte PSH flood beside well-behaved transfers, all on one host (`serve --app echo`).
///    The flooders never read what the echo app sends back, so once the echo app's
///    outstanding sends are full it stops reading their data: to the host they are peers
///    pushing 1-byte segments at an application that does not read (what `sink --rate 1`
///    would be, but `--rate` applies to every connection of a sink, which would throttle the
///    well-behaved uploads too). Beside 4 flooders, 4 socat clients send 16 MiB each through
///    the same echo host and must get every byte back (SHA-256), within 60 s.
fn psh_flood(ns: &mut Netns, toemu: &Path, work: &Path) -> Result<(), String> {
    let (h, log) = serve(ns, toemu, work, "psh-flood", "echo", 7)?;
    let flood_s = 20;
    let (fl, out) = spawn_python(
        ns,
        work,
        "flooder",
        FLOODER,
        &[HOST_IP, "7", "4", &flood_s.to_string()],
    )?;
    std::thread::sleep(Duration::from_secs(2));
    let t0 = Instant::now();
    let same = ns.sh(&format!(
        "set -e; cd {w}; for i in 1 2 3 4; do head -c 16777216 /dev/urandom > up$i; done; \
         for i in 1 2 3 4; do timeout 60 socat -t 30 - TCP:{HOST_IP}:7,shut-down < up$i > back$i & done; wait; \
         for i in 1 2 3 4; do a=$(sha256sum < up$i); b=$(sha256sum < back$i); \
           [ \"$a\" = \"$b\" ] && echo same || echo \"conn $i: $(stat -c %s back$i) of 16777216 bytes back, sha256 differs\"; done",
        w = work.display()
    ));
    let secs = t0.elapsed().as_secs_f64();
    let same = same.unwrap_or_else(|e| e);
    let flooding = ns.children[fl].try_wait().ok().flatten().is_none();
    check(
        &format!(
            "psh-flood: 4 x 16 MiB echo transfers beside 4 flooders intact ({secs:.1} s, flooders still sending: {flooding})"
        ),
        same.lines().filter(|l| l.trim() == "same").count() == 4,
        format!("after {secs:.1} s: {}", same.trim()),
    )?;
    alive(ns, h, "psh-flood")?;
    let reply = ns.sh(&format!("printf 'hello toemu' | nc -N -w 5 {HOST_IP} 7"))?;
    check(
        "psh-flood: a new echo connection is served during the flood",
        reply == "hello toemu",
        format!("nc got {reply:?}"),
    )?;
    let t0 = Instant::now();
    while ns.children[fl].try_wait().ok().flatten().is_none() {
        if t0.elapsed() > Duration::from_secs(flood_s + 15) {
            return Err("psh-flood: the flooder did not finish".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let counts = read_log(&out);
    let sent: u64 = first_word(&counts)
        .ok()
        .and_then(|w| w.parse().ok())
        .unwrap_or(0);
    check(
        &format!(
            "psh-flood: the flooders pushed {sent} 1-byte sends ({} would-block)",
            counts.split_whitespace().nth(1).unwrap_or("?")
        ),
        sent >= 1000,
        format!("flooder output {counts:?}: fewer than 1000 bytes sent, the flood did not happen"),
    )?;
    check_memory(ns, h, "psh-flood", 64)?;
    stop_with_stats(ns, h, &log, "psh-flood")?;
    Ok(())
}

/// Spoofed SYNs from a raw socket: random sources in 10.99.0.3..254, random ports.
const SYN_FLOOD: &str = r#"
import random, socket, struct, sys
dst, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def csum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xffff) + (s >> 16)
    return ~s & 0xffff
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
d = socket.inet_aton(dst)
for i in range(n):
    src = socket.inet_aton("10.99.0.%d" % random.randint(3, 254))
    sport = random.randint(1024, 65535)
    # SYN with an MSS option
    tcp = struct.pack("!HHIIBBHHH", sport, port, random.getrandbits(32), 0, 6 << 4, 0x02, 64240, 0, 0)
    tcp += struct.pack("!BBH", 2, 4, 1460)
    c = csum(src + d + struct.pack("!BBH", 0, 6, len(tcp)) + tcp)
    tcp = tcp[:16] + struct.pack("!H", c) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), random.getrandbits(16), 0, 64, 6, 0, src, d)
    s.sendto(ip + tcp, (dst, 0))
print(n)
"#;

/// 3. 3,000 spoofed SYNs (raw socket, random sources in the subnet, random ports) at the http
///    port; then a curl must be served within one second.
fn syn_flood(ns: &mut Netns, toemu: &Path, work: &Path) -> Result<(), String> {
    let (h, log) = serve(ns, toemu, work, "syn-flood", "http", 80)?;
    let script = work.join("synflood.py");
    std::fs::write(&script, SYN_FLOOD).map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    let sent = ns.sh(&format!("python3 {} {HOST_IP} 80 3000", script.display()))?;
    eprintln!(
        "tap-test:      syn-flood: {} spoofed SYNs sent in {:.2} s",
        sent.trim(),
        t0.elapsed().as_secs_f64()
    );
    let checks = |ns: &mut Netns| {
        alive(ns, h, "syn-flood")?;
        curl_served(
            ns,
            "syn-flood: a curl right after 3,000 spoofed SYNs is served within 1 s",
            1.0,
        )?;
        std::thread::sleep(Duration::from_secs(2));
        curl_served(ns, "syn-flood: a curl 2 s later is served within 1 s", 1.0)?;
        check_memory(ns, h, "syn-flood", 64)
    };
    // The stats (SYNs recycled, deferred, refused) are printed whether the checks pass or not.
    let result = checks(ns);
    stop_with_stats(ns, h, &log, "syn-flood")?;
    result
}

/// 4. A peer that vanishes mid-transfer. The client runs in a second namespace behind a veth
///    pair (lab side 10.99.2.1, client 10.99.2.2; the lab namespace forwards, toemu's gateway
///    is the lab side of tap0). toemu runs with `max_conns=2`, `keepalive_ms=500` and
///    `idle_timeout_ms=3000`; the client holds both connections: a slow download
///    (`curl --limit-rate`, data in flight) and an idle connection (nothing to send: only
///    keep-alive can notice). Then the veth is deleted. Both connections must end by timeout
///    within 10 s (the http app logs `http: connection N done` when it releases one), the
///    host's memory stays bounded, two concurrent curls from the lab namespace are served,
///    and the final `stats:` line shows no connection left and every anonymous buffer back
///    at the NIC (`anon_in_driver 0`, `anon_at_nic` = `anon_pool`).
fn vanishing_peer(ns: &mut Netns, toemu: &Path, work: &Path) -> Result<(), String> {
    const CLIENT_IP: &str = "10.99.2.2";
    let timers = ["--set", "keepalive_ms=500", "--set", "idle_timeout_ms=3000"];
    let probe = std::process::Command::new(toemu)
        .args(timers)
        .args(["gen", "--bytes", "1"])
        .stdout(Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    if !probe.status.success() {
        return Err(format!(
            "toemu does not accept {}: {}",
            timers.join(" "),
            String::from_utf8_lossy(&probe.stderr).trim()
        ));
    }
    let mut client = Netns::create_named("c")?;
    ns.sh(&format!(
        "ip link add vl type veth peer name vc netns {c} && ip addr add 10.99.2.1/24 dev vl && \
         ip link set vl up && sysctl -qw net.ipv4.ip_forward=1",
        c = client.name
    ))?;
    client.sh(&format!(
        "ip addr add {CLIENT_IP}/24 dev vc && ip link set vc up && ip route add default via 10.99.2.1"
    ))?;
    let log = work.join("vanish.log");
    let ip = format!("{HOST_IP}/24");
    let mut args = vec!["--set", "max_conns=2"];
    args.extend(timers);
    args.extend([
        "serve",
        "--tap",
        "tap0",
        "--ip",
        &ip,
        "--gateway",
        LINUX_IP,
        "--app",
        "http",
    ]);
    let h = start(ns, toemu, &args, &log, 80)?;
    let routed = client.sh(&format!(
        "curl -s -o /dev/null --max-time 5 -w '%{{http_code}}' http://{HOST_IP}/bytes/1000"
    ));
    check(
        "vanishing-peer: the client namespace reaches the host through the lab namespace",
        routed.as_deref() == Ok("200"),
        format!("{routed:?}"),
    )?;
    let slow = client
        .cmd("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "--limit-rate",
            "100k",
            "--max-time",
            "120",
            &format!("http://{HOST_IP}/bytes/1073741824"),
        ])
        .spawn()
        .map_err(|e| e.to_string())?;
    client.children.push(slow);
    let idle = client
        .cmd("python3")
        .args([
            "-c",
            &format!(
                "import socket, time; s = socket.create_connection(('{HOST_IP}', 80), 5); time.sleep(120)"
            ),
        ])
        .spawn()
        .map_err(|e| e.to_string())?;
    client.children.push(idle);
    std::thread::sleep(Duration::from_millis(1500));
    let est = client.sh(&format!("ss -Htn state established dst {HOST_IP} | wc -l"))?;
    check(
        "vanishing-peer: the client holds 2 connections (slow download, idle)",
        est.trim() == "2",
        format!("{} established", est.trim()),
    )?;
    // The http app logs "http: connection N done" when it releases a connection.
    let done = |log: &Path| {
        read_log(log)
            .lines()
            .filter(|l| l.starts_with("http: connection") && l.contains(" done"))
            .count()
    };
    let before = done(&log);
    ns.sh("ip link del vl")?;
    eprintln!("tap-test:      vanishing-peer: veth deleted, the client is gone");
    let t0 = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(200));
        alive(ns, h, "vanishing-peer")?;
        let ended = done(&log) - before;
        if ended >= 2 {
            check(
                &format!(
                    "vanishing-peer: both connections of the vanished peer ended {:.1} s after the link went away (keepalive 500 ms, idle timeout 3 s)",
                    t0.elapsed().as_secs_f64()
                ),
                true,
                "",
            )?;
            break;
        }
        if t0.elapsed() > Duration::from_secs(10) {
            return Err(format!(
                "{ended} of the vanished peer's 2 connections (a slow download, an idle one) ended within 10 s after the link went away (keepalive_ms=500, idle_timeout_ms=3000); the host still holds the rest (counted by the http app's `http: connection N done` lines)"
            ));
        }
    }
    let two = ns.sh(&format!(
        "for i in 1 2; do curl -s -o /dev/null --max-time 5 -w '%{{http_code}}\\n' http://{HOST_IP}/bytes/100000 & done; wait"
    ))?;
    check(
        "vanishing-peer: two concurrent curls are served afterwards",
        two.lines().filter(|l| l.trim() == "200").count() == 2,
        format!(
            "http codes {:?}",
            two.split_whitespace().collect::<Vec<_>>()
        ),
    )?;
    check_memory(ns, h, "vanishing-peer", 2)?;
    // Let the follow-up connections finish closing, then the final counters: no connection
    // left, every anonymous buffer back in the pool (posted to the NIC, none in the driver).
    std::thread::sleep(Duration::from_millis(500));
    let stats = stop_with_stats(ns, h, &log, "vanishing-peer")?;
    let field = |k: &str| super::field_after(&stats, k);
    check(
        &format!(
            "vanishing-peer: at the end no connection is left and every anonymous buffer is back (conns {}, anon_in_driver {}, anon_at_nic {} of anon_pool {})",
            field("conns").unwrap_or_default(),
            field("anon_in_driver").unwrap_or_default(),
            field("anon_at_nic").unwrap_or_default(),
            field("anon_pool").unwrap_or_default()
        ),
        field("conns").as_deref() == Some("0")
            && field("anon_in_driver").as_deref() == Some("0")
            && field("anon_at_nic").is_some()
            && field("anon_at_nic") == field("anon_pool"),
        format!("want conns 0, anon_in_driver 0 and anon_at_nic == anon_pool in the final `{stats}`"),
    )?;
    drop(client);
    Ok(())
}

/// Slowloris: `n` connections, each sends an unfinished request one byte a second.
const SLOWLORIS: &str = r#"
import socket, sys, time
host, port, n, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
socks = [socket.create_connection((host, port), 5) for _ in range(n)]
print("connected", len(socks), flush=True)
msg = b"GET /bytes/10 HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 10000
closed = 0
for t in range(seconds):
    for i, s in enumerate(socks):
        if s is None:
            continue
        try:
            s.send(msg[t:t + 1])
        except OSError:
            socks[i] = None
            closed += 1
    time.sleep(1)
print("closed_by_host", closed, flush=True)
"#;

/// 5. Slowloris: 60 connections (max_conns 64) each sending one byte a second for 12 s;
///    meanwhile 5 curls, one after another, are each served within 3 s.
fn slowloris(ns: &mut Netns, toemu: &Path, work: &Path) -> Result<(), String> {
    let (h, log) = serve(ns, toemu, work, "slowloris", "http", 80)?;
    let (l, out) = spawn_python(
        ns,
        work,
        "slowloris",
        SLOWLORIS,
        &[HOST_IP, "80", "60", "12"],
    )?;
    wait_line(&out, "connected", Duration::from_secs(15))
        .map_err(|e| format!("slowloris: the 60 connections did not open: {e}"))?;
    std::thread::sleep(Duration::from_secs(2));
    for i in 1..=5 {
        curl_served(
            ns,
            &format!("slowloris: curl {i} of 5 beside 60 slow connections is served within 3 s"),
            3.0,
        )?;
    }
    alive(ns, h, "slowloris")?;
    let t0 = Instant::now();
    while ns.children[l].try_wait().ok().flatten().is_none() {
        if t0.elapsed() > Duration::from_secs(30) {
            return Err("slowloris: the slow client did not finish".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let closed = wait_line(&out, "closed_by_host", Duration::from_secs(1))?;
    eprintln!("tap-test:      slowloris: slow connections the host closed: {closed}");
    curl_served(
        ns,
        "slowloris: a curl after the slow connections is served",
        3.0,
    )?;
    check_memory(ns, h, "slowloris", 64)?;
    stop_with_stats(ns, h, &log, "slowloris")?;
    Ok(())
}
