//! `toemu bench` / `cargo xtask bench`: every scenario side by side with its baselines in one
//! run, alternating runs so drifting machine load hits all of them alike, reporting medians
//! with min/max.
//!
//! - bulk throughput, one connection: every TOE mode, bare smoltcp on the same wire and MTU
//!   (single thread, virtual clock, like the TOE hosts), and kernel loopback TCP through std
//!   sockets (two threads: the kernel's own path);
//! - request/response latency (64 bytes, and 64 KiB where one-MSS hold-off shows) p50, p99,
//!   p99.9 for every mode and kernel loopback;
//! - host copies per byte and anonymous-buffer high water per mode;
//! - scale: 1, 100, 1,000, 10,000 concurrent offloaded connections: aggregate throughput,
//!   memory per connection, cost of one poll step.
//!
//! Every bulk run is integrity-checked end to end; the bench uses CRC32C by default (hardware
//! accelerated, the same work in every mode) so that ratios compare the transport paths, not
//! a hash; `--check sha256` measures with the demo's SHA-256.

use std::io;
use std::net::SocketAddrV4;
use std::time::Instant as WallInstant;

use serde::Serialize;
use toe_bus::ConnId;

use crate::bare::BarePair;
use crate::datagen::{Check, DataGen};
use crate::demo::{toe_bulk, toe_bulk_threaded, toe_rr_timed, DemoOptions, Mode, Receiver, Sender};
use crate::kernel::{kernel_bulk, kernel_rr, kernel_scale};
use crate::stats::{percentile, sorted};
use toe_host::config::Settings;
use toe_host::runtime::{test_nic, Host, Sim};

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Bytes per bulk run.
    pub bytes: u64,
    /// Alternating rounds of bulk runs.
    pub rounds: usize,
    /// Request/response exchanges per mode and size.
    pub rr_iters: usize,
    /// Points of the scale scenario.
    pub scale: Vec<ScalePoint>,
    /// Total bytes moved in each scale point.
    pub scale_bytes: u64,
    /// Before every scale point with more than one connection, measure a 1-connection point
    /// (its baseline, alternating); and measure the kernel's loopback TCP at every point.
    /// Off: each point alone (for profiling one point), ratios against the list's own
    /// 1-connection point.
    pub scale_baselines: bool,
    /// Run the bulk section.
    pub bulk: bool,
    /// Run the request/response section.
    pub rr: bool,
    /// Heap bytes currently allocated, if the binary counts them (a counting global
    /// allocator); used for memory per connection.
    pub heap_live: Option<fn() -> i64>,
    /// Host settings.
    pub settings: Settings,
    /// Seed.
    pub seed: u64,
    /// Integrity check of the bulk runs (CRC32C by default, so that the transports and not
    /// the hash set the pace; `--check sha256` for the demo's check).
    pub check: Check,
    /// Bus cost model of the request/response runs: one-way latency of every command and
    /// event, in µs (default 2, the order of a PCIe transaction), so that what a policy does
    /// on the bus shows in virtual-time latency.
    pub rr_bus_latency_us: u64,
}

impl BenchOptions {
    /// The full run (about 10 minutes on 2 cores).
    pub fn full(settings: Settings) -> Self {
        BenchOptions {
            bytes: 1 << 30,
            rounds: 5,
            rr_iters: 20_000,
            scale: [
                (1, 1),
                (100, 100),
                (1_000, 1_000),
                (10_000, 10_000),
                (10_000, 100),
            ]
            .map(|(conns, active)| ScalePoint { conns, active })
            .into(),
            scale_bytes: 1 << 30,
            scale_baselines: true,
            bulk: true,
            rr: true,
            heap_live: None,
            settings,
            seed: 1,
            check: Check::Crc32c,
            rr_bus_latency_us: 2,
        }
    }
    /// `--quick`: under 2 minutes.
    pub fn quick(settings: Settings) -> Self {
        BenchOptions {
            bytes: 128 << 20,
            rounds: 3,
            rr_iters: 3_000,
            scale: [1, 100, 1_000].map(ScalePoint::all_active).into(),
            scale_bytes: 64 << 20,
            scale_baselines: true,
            bulk: true,
            rr: true,
            heap_live: None,
            settings,
            seed: 1,
            check: Check::Crc32c,
            rr_bus_latency_us: 2,
        }
    }
}

/// One point of the scale scenario: `conns` connections open, `active` of them moving data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScalePoint {
    /// Connections open.
    pub conns: usize,
    /// Connections moving data (1..=conns), spread evenly over the open ones.
    pub active: usize,
}

impl ScalePoint {
    /// `conns` connections, all active.
    pub fn all_active(conns: usize) -> Self {
        ScalePoint {
            conns,
            active: conns,
        }
    }
}

impl std::str::FromStr for ScalePoint {
    type Err = String;
    /// `N` (N connections, all active) or `N/A` (N open, A active).
    fn from_str(s: &str) -> Result<Self, String> {
        let num = |t: &str| {
            t.trim()
                .replace('_', "")
                .parse::<usize>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| format!("scale point {s:?}: {t:?} is not a positive count"))
        };
        let p = match s.split_once('/') {
            Some((n, a)) => ScalePoint {
                conns: num(n)?,
                active: num(a)?,
            },
            None => ScalePoint::all_active(num(s)?),
        };
        if p.active > p.conns {
            return Err(format!(
                "scale point {s:?}: more active than open connections"
            ));
        }
        Ok(p)
    }
}

/// How a bulk row ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Runner {
    /// A TOE mode, both hosts on one thread, virtual clock.
    Toe(Mode),
    /// Bare smoltcp, one thread, virtual clock.
    Bare,
    /// Kernel loopback TCP, sender and receiver threads.
    Kernel,
    /// A TOE mode on the threaded runtime in real time.
    Threaded(Mode),
}

impl Runner {
    fn name(&self) -> String {
        match self {
            Runner::Toe(m) => m.name().into(),
            Runner::Bare => "smoltcp-bare".into(),
            Runner::Kernel => "kernel-loopback".into(),
            Runner::Threaded(m) => format!("{}/threaded", m.name()),
        }
    }
    fn runtime(&self) -> &'static str {
        match self {
            Runner::Toe(_) | Runner::Bare => "one thread, virtual clock",
            Runner::Kernel => "two threads (sender, receiver), real time",
            Runner::Threaded(_) => {
                "three threads (adapter with both NICs, sender, receiver), real time"
            }
        }
    }
}

/// One bulk row.
#[derive(Debug, Clone, Serialize)]
pub struct BulkRow {
    /// Mode (a demo mode, `smoltcp-bare` or `kernel-loopback`; `MODE/threaded` for a TOE
    /// mode on the threaded runtime).
    pub mode: String,
    /// Threads and clock of the run.
    pub runtime: String,
    /// Median throughput, bytes per second.
    pub median_bytes_per_s: f64,
    /// Slowest run.
    pub min_bytes_per_s: f64,
    /// Fastest run.
    pub max_bytes_per_s: f64,
    /// Median / kernel loopback median.
    pub vs_kernel: f64,
    /// Median / bare smoltcp median.
    pub vs_bare: f64,
    /// Receiver host copies per byte (TOE modes).
    pub host_copies_per_byte: Option<f64>,
    /// Anonymous-buffer high water of the receiving driver, bytes (TOE modes).
    pub anon_high_water_bytes: Option<u64>,
    /// `unbounded-copy` socket-buffer high water, bytes.
    pub copy_buffer_high_water_bytes: Option<u64>,
    /// Every run, bytes per second.
    pub samples: Vec<f64>,
    /// Throughput in modeled time (the virtual clock under the cost model, on the bench's
    /// perfect wire, so the NIC, bus and host costs bound it), bytes per second; `None` for
    /// the real-time runners and for bare smoltcp (no costs and no wire rate: no virtual
    /// time passes).
    pub modeled_bytes_per_s: Option<f64>,
    /// The receiving host's CPU per byte under the cost model, ns (TOE modes, virtual clock).
    pub modeled_host_cpu_ns_per_byte: Option<f64>,
}

/// One request/response row.
#[derive(Debug, Clone, Serialize)]
pub struct RrRow {
    /// Mode.
    pub mode: String,
    /// Request and response size, bytes.
    pub size: usize,
    /// Median round trip, microseconds.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Median round trip in modeled time (the virtual clock under the cost model, the bus at
    /// [`BenchOptions::rr_bus_latency_us`]), µs; `None` for kernel loopback (real time) and
    /// where no virtual time passes (bare smoltcp on the bench's perfect wire).
    pub modeled_p50_us: Option<f64>,
    /// 99th percentile in modeled time, µs.
    pub modeled_p99_us: Option<f64>,
    /// Threads the run used: 2 for kernel loopback (client and server), 1 for the
    /// emulated pairs and bare smoltcp (both hosts stepped by one thread).
    pub threads: u8,
}

/// Frames the in-memory wire of a scale point holds per direction.
pub const SCALE_WIRE_FRAMES: usize = 1024;

/// Socket buffer of every scale connection, each way, bytes (TOE hosts and the kernel
/// baseline alike).
pub const SCALE_SOCKET_BUF_BYTES: u32 = 64 * 1024;

/// One scale point.
#[derive(Debug, Clone, Serialize)]
pub struct ScaleRow {
    /// Concurrent connections (open for the whole point).
    pub conns: usize,
    /// Connections that move data (the others stay open and idle).
    pub active: usize,
    /// Aggregate throughput of the active connections after their warm-up, bytes per second
    /// (wall clock: the emulator's speed).
    pub aggregate_bytes_per_s: f64,
    /// The same in modeled time (the virtual clock under the cost model, on the scale
    /// point's perfect wire), bytes per second; `None` if no virtual time passed.
    pub modeled_aggregate_bytes_per_s: Option<f64>,
    /// Aggregate / a 1-connection point measured right before this one (alternating, so
    /// drifting load hits both); for a partly active point this is also one connection's
    /// cost per delivered byte over this point's.
    pub vs_one_connection: f64,
    /// Resident memory added per connection (both endpoints) once all are open, bytes
    /// (socket buffers are allocated but mostly not yet touched).
    pub rss_per_conn_bytes: f64,
    /// Heap bytes allocated per additional connection (both endpoints: sockets with their
    /// buffers, NIC and driver state; measured past the first 256 connections so that the
    /// listener's backlog is not counted), when the binary counts allocations (`toemu bench`
    /// does).
    pub heap_per_conn_bytes: Option<f64>,
    /// Socket buffers configured per connection (both endpoints, rx + tx), bytes.
    pub socket_buffers_per_conn_bytes: u64,
    /// Wall-clock cost of one step of both hosts with every connection open and idle, µs.
    pub idle_step_us: f64,
    /// Minor page faults per MiB delivered in the timed part (first touches of memory: on a
    /// virtual machine each costs microseconds).
    pub timed_faults_per_mib: f64,
    /// The kernel's loopback TCP at the same point, measured right after it (the same
    /// connections open and active, the same socket buffer size, the same bytes and check;
    /// a sender and a receiver thread on epoll): aggregate bytes per second.
    pub kernel_bytes_per_s: Option<f64>,
    /// The kernel's aggregate here / its own 1-connection point measured right before this
    /// one: how much of the fall with N
    /// comes from the machine (caches, memory) rather than from the emulator.
    pub kernel_vs_one_connection: Option<f64>,
    /// Why the kernel was not measured at this point (for example the open-file limit).
    pub kernel_skipped: Option<String>,
}

/// A goal of the issue, checked against this run.
#[derive(Debug, Clone, Serialize)]
pub struct Goal {
    /// What is measured.
    pub name: String,
    /// Measured value.
    pub value: f64,
    /// Target.
    pub target: f64,
    /// The value must be at most the target (otherwise at least).
    pub at_most: bool,
    /// Met?
    pub met: bool,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Machine and run description.
    pub machine: serde_json::Value,
    /// Bulk rows.
    pub bulk: Vec<BulkRow>,
    /// Request/response rows.
    pub rr: Vec<RrRow>,
    /// Scale rows.
    pub scale: Vec<ScaleRow>,
    /// Goals.
    pub goals: Vec<Goal>,
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s.get(s.len() / 2).copied().unwrap_or(0.0)
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

/// `conns` concurrent connections from host 0 to host 1, of which `active` (spread evenly
/// over them) move `total` bytes in all. Returns the scale row (`vs_one_connection` left at 0
/// for the caller).
///
/// The harness is event-driven, like an application on the driver's event queue: a step
/// services only the connections that have news, so its own cost does not grow with idle
/// connections. Each active connection first moves one socket buffer untimed (a warm-up that
/// touches its buffers for the first time, which on a virtual machine costs more than the
/// transfer), then the timed part.
pub fn scale_point(
    o: &BenchOptions,
    conns: usize,
    active: usize,
    total: u64,
) -> io::Result<ScaleRow> {
    let mut s = o.settings.clone();
    let seed = o.seed;
    let other = |e: String| io::Error::other(e);
    for (k, v) in [
        ("max_conns", conns.max(1).to_string()),
        ("indicate_window_bytes", "64KiB".into()),
        ("socket_buf_bytes", SCALE_SOCKET_BUF_BYTES.to_string()),
        ("mtu", "9000".into()),
    ] {
        s.apply_override(k, &v).map_err(|e| other(e.to_string()))?;
    }
    s.validate().map_err(|e| other(e.to_string()))?;
    let active = active.clamp(1, conns.max(1));
    let heap0 = o.heap_live.map(|f| f());
    let rss0 = rss_bytes();
    // A wire of 1,024 frames (a NIC transmit ring's worth): deeper queues hold every
    // connection's window in flight at once, and the bytes go through memory instead of
    // the caches (measured: 0.43x of one connection at 1,000 with 16,384 frames, 0.6x with
    // 1,024).
    let (pa, pb) = toe_nic::wire(SCALE_WIRE_FRAMES);
    let now = toe_bus::time::Instant::from_micros(0);
    let a = Host::new("a", &s, test_nic(0, seed), Box::new(pa), now)
        .map_err(|e| other(e.to_string()))?;
    let b = Host::new("b", &s, test_nic(1, seed), Box::new(pb), now)
        .map_err(|e| other(e.to_string()))?;
    let sim = Sim::new(vec![a, b]);
    let (da, db) = (sim.driver(0), sim.driver(1));
    let port = 6000;
    let batch = 256usize;
    db.lock()
        .listen(port, batch as u16, None)
        .map_err(|e| other(e.to_string()))?;
    let remote = SocketAddrV4::new(std::net::Ipv4Addr::new(10, 0, 0, 2), port);
    let mut clients: Vec<ConnId> = Vec::with_capacity(conns);
    let mut servers: Vec<ConnId> = Vec::with_capacity(conns);
    let mut up = 0usize;
    let mut heap_first = None;
    while clients.len() < conns {
        if clients.len() == batch {
            heap_first = o.heap_live.map(|f| f());
        }
        let n = batch.min(conns - clients.len());
        for _ in 0..n {
            clients.push(
                da.lock()
                    .connect(remote, 0, None)
                    .map_err(|e| other(e.to_string()))?,
            );
        }
        sim.run_until(1_000_000, || {
            while let Some(c) = db.lock().accept(port) {
                servers.push(c);
            }
            let mut d = da.lock();
            while let Some((_, e)) = d.take_event() {
                if e == toe_driver::AppEvent::Connected {
                    up += 1;
                }
            }
            servers.len() == clients.len() && up == clients.len()
        })?;
    }
    // Let the handshakes' delayed ACKs and events settle, then drop the events.
    sim.advance(toe_bus::time::Duration::from_millis(100))?;
    while da.lock().take_event().is_some() {}
    while db.lock().take_event().is_some() {}
    let rss1 = rss_bytes();
    let heap1 = o.heap_live.map(|f| f());
    // Cost of one poll step with every connection open and idle: both hosts polled at the
    // current time (nothing is due; keep-alive timers are a minute away).
    let steps = 10_000;
    let t = WallInstant::now();
    for _ in 0..steps {
        sim.poll_in_place();
    }
    let idle_step_us = t.elapsed().as_secs_f64() * 1e6 / steps as f64;
    // The active connections, spread over all of them.
    let stride = conns / active;
    let picked: Vec<usize> = (0..active).map(|k| k * stride).collect();
    let per = (total / active as u64).max(1);
    let warm = u64::from(s.socket_buf_bytes);
    let mut senders = Vec::with_capacity(active);
    let mut receivers = Vec::with_capacity(active);
    let mut by_client = std::collections::HashMap::with_capacity(active);
    let mut by_server = std::collections::HashMap::with_capacity(active);
    for (k, &i) in picked.iter().enumerate() {
        let (c, sv) = (clients[i], servers[i]);
        senders.push(
            Sender::new(
                &da.lock(),
                c,
                seed + i as u64,
                warm,
                // two buffers in flight, within the hosts' application memory
                2,
                (per as usize)
                    .clamp(1, 128 * 1024)
                    .min((200 << 20) / active),
            )?
            .hold_open(),
        );
        receivers.push(
            Receiver::new(
                Mode::IndicateWindow,
                &mut db.lock(),
                sim.now(),
                sv,
                0,
                0,
                false,
            )?
            .with_check(o.check),
        );
        by_client.insert(c, k);
        by_server.insert(sv, k);
    }
    {
        let mut d = da.lock();
        for s in senders.iter_mut() {
            s.service(&mut d)?;
        }
    }
    // Warm-up (each active connection moves `warm` bytes and stays open), then the timed
    // part: `per` more bytes each, to the last end of stream.
    let mut warming = active;
    let mut t0: Option<WallInstant> = None;
    let mut v0 = None;
    let mut faults0 = 0;
    let mut done = vec![false; active];
    let mut left = active;
    let mut idle = 0u32;
    let mut timed_bytes = 0u64;
    while left > 0 {
        let moved = sim.step_or_idle()?;
        let now = sim.now();
        {
            let mut d = da.lock();
            while let Some((c, _)) = d.take_event() {
                if let Some(&k) = by_client.get(&c) {
                    senders[k].service(&mut d)?;
                }
            }
        }
        let mut d = db.lock();
        let mut progress = false;
        while let Some((c, _)) = d.take_event() {
            let Some(&k) = by_server.get(&c) else {
                continue;
            };
            if done[k] {
                continue;
            }
            let r = &mut receivers[k];
            let before = r.received;
            let eof = r.service(&mut d, now)?;
            progress |= r.received != before;
            if t0.is_some() {
                timed_bytes += r.received - before;
            } else if before < warm && r.received >= warm {
                warming -= 1;
            }
            if eof {
                done[k] = true;
                left -= 1;
            }
        }
        drop(d);
        if warming == 0 && t0.is_none() {
            perf_control("enable");
            t0 = Some(WallInstant::now());
            v0 = Some(sim.now());
            faults0 = minor_faults();
            let mut d = da.lock();
            for s in senders.iter_mut() {
                s.extend(per);
                s.service(&mut d)?;
            }
        }
        idle = if moved || progress { 0 } else { idle + 1 };
        if idle > 100_000 {
            return Err(other(format!(
                "scale {conns}: stalled with {left} connections unfinished"
            )));
        }
    }
    let secs = t0.map_or(0.0, |t| t.elapsed().as_secs_f64());
    let modeled_secs = v0.map_or(0.0, |v| (sim.now() - v).total_micros() as f64 / 1e6);
    perf_control("disable");
    let faults = minor_faults().saturating_sub(faults0);
    // Marginal heap per connection: past the first batch, so that fixed costs (the
    // listener's backlog sockets, tables) are not spread over the connections.
    let heap = match (heap0, heap_first, heap1) {
        (_, Some(a), Some(b)) => Some((b - a) as f64 / (conns - batch) as f64),
        (Some(a), None, Some(b)) => Some((b - a) as f64 / conns as f64),
        _ => None,
    };
    Ok(ScaleRow {
        conns,
        active,
        aggregate_bytes_per_s: timed_bytes as f64 / secs.max(1e-9),
        modeled_aggregate_bytes_per_s: (modeled_secs > 0.0)
            .then(|| timed_bytes as f64 / modeled_secs),
        vs_one_connection: 0.0,
        rss_per_conn_bytes: rss1.saturating_sub(rss0) as f64 / conns as f64,
        heap_per_conn_bytes: heap,
        socket_buffers_per_conn_bytes: 4 * u64::from(s.socket_buf_bytes),
        idle_step_us,
        timed_faults_per_mib: faults as f64 / (timed_bytes as f64 / f64::from(1 << 20)).max(1e-9),
        kernel_bytes_per_s: None,
        kernel_vs_one_connection: None,
        kernel_skipped: None,
    })
}

/// Profile only the timed parts of the scale points: with `TOEMU_PERF_CTL=FIFO` set, the
/// bench writes `enable` to FIFO when a timed part starts and `disable` when it ends, the
/// commands of `perf record --control fifo:FIFO -D -1` (which starts with sampling off).
/// Without the variable, or if the FIFO cannot be opened, nothing happens.
fn perf_control(cmd: &str) {
    use std::io::Write;
    if let Some(path) = std::env::var_os("TOEMU_PERF_CTL") {
        if let Ok(mut f) = std::fs::OpenOptions::new().write(true).open(path) {
            let _ = writeln!(f, "{cmd}");
        }
    }
}

/// Minor page faults of this process so far (0 where /proc is not available).
fn minor_faults() -> u64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // fields after the command name (which may contain spaces) end at ')'
            let rest = s.rsplit_once(')')?.1;
            rest.split_whitespace().nth(7)?.parse().ok()
        })
        .unwrap_or(0)
}

/// Run everything; `progress` hears a line per finished measurement.
pub fn run_bench(o: &BenchOptions, mut progress: impl FnMut(&str)) -> io::Result<BenchReport> {
    let demo = DemoOptions {
        bytes: o.bytes,
        rr_iters: o.rr_iters,
        settings: o.settings.clone(),
        seed: o.seed,
        check: o.check,
        ..DemoOptions::default()
    };
    let expected = if o.bulk {
        DataGen::digest_with(o.seed, o.bytes, o.check)
    } else {
        [0; 32]
    };
    let toe_modes = [
        Mode::NamedBuffer,
        Mode::IndicateWindow,
        Mode::MssHoldoff,
        Mode::UnboundedCopy,
    ];
    // Bulk runners, in report order: every TOE mode on one thread and virtual clock, bare
    // smoltcp (the same), kernel loopback (two threads), then every TOE mode threaded in
    // real time (the adapter thread plus one thread per application) so that the comparison
    // with the kernel is also made on equal footing.
    let runners: Vec<Runner> = toe_modes
        .iter()
        .map(|&m| Runner::Toe(m))
        .chain([Runner::Bare, Runner::Kernel])
        .chain(toe_modes.iter().map(|&m| Runner::Threaded(m)))
        .collect();
    let names: Vec<String> = runners.iter().map(Runner::name).collect();
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    let mut details: Vec<Option<crate::demo::Bulk>> = vec![None; names.len()];
    let rounds = if o.bulk { o.rounds.max(1) } else { 0 };
    for round in 0..rounds {
        for (i, (runner, name)) in runners.iter().zip(&names).enumerate() {
            let (secs, digest) = match *runner {
                Runner::Toe(m) | Runner::Threaded(m) => {
                    let b = if matches!(runner, Runner::Toe(_)) {
                        toe_bulk(m, &demo)?
                    } else {
                        toe_bulk_threaded(m, &demo)?
                    };
                    let r = (b.seconds, b.digest);
                    details[i] = Some(b);
                    r
                }
                Runner::Bare => {
                    let (d, digest) = BarePair::new(&o.settings, o.seed)
                        .bulk_checked(o.bytes, o.seed, o.check)?;
                    (d.as_secs_f64(), digest)
                }
                Runner::Kernel => kernel_bulk(o.bytes, o.seed, o.check)?,
            };
            if digest != expected {
                return Err(io::Error::other(format!("{name}: integrity check failed")));
            }
            let tput = o.bytes as f64 / secs;
            progress(&format!(
                "bulk round {}/{} {name:<24} {:>8.1} MB/s",
                round + 1,
                o.rounds,
                tput / 1e6
            ));
            samples[i].push(tput);
        }
    }
    let medians: Vec<f64> = samples.iter().map(|s| median(s)).collect();
    let at = |r: Runner| runners.iter().position(|x| *x == r).map(|i| medians[i]);
    let kernel = at(Runner::Kernel).unwrap_or(f64::NAN);
    let bare = at(Runner::Bare).unwrap_or(f64::NAN);
    let bulk: Vec<BulkRow> = runners
        .iter()
        .zip(&names)
        .filter(|_| o.bulk)
        .enumerate()
        .map(|(i, (runner, name))| {
            let s = &samples[i];
            BulkRow {
                mode: name.clone(),
                runtime: runner.runtime().into(),
                median_bytes_per_s: medians[i],
                min_bytes_per_s: s.iter().copied().fold(f64::INFINITY, f64::min),
                max_bytes_per_s: s.iter().copied().fold(0.0, f64::max),
                vs_kernel: medians[i] / kernel,
                vs_bare: medians[i] / bare,
                host_copies_per_byte: details[i].as_ref().map(|b| b.copies),
                anon_high_water_bytes: details[i].as_ref().map(|b| b.anon_high),
                copy_buffer_high_water_bytes: details[i].as_ref().map(|b| b.copy_high),
                samples: s.clone(),
                modeled_bytes_per_s: details[i]
                    .as_ref()
                    .filter(|b| b.modeled.seconds > 0.0)
                    .map(|b| o.bytes as f64 / b.modeled.seconds),
                modeled_host_cpu_ns_per_byte: details[i]
                    .as_ref()
                    .filter(|b| b.modeled.seconds > 0.0)
                    .map(|b| b.modeled.host_cpu_ns_per_byte),
            }
        })
        .collect();

    let mut rr = Vec::new();
    /// Rounds the request/response exchanges of each size are split into, the modes
    /// taking turns.
    const RR_ROUNDS: usize = 5;
    for size in [64usize, 64 * 1024].into_iter().filter(|_| o.rr) {
        let iters = if size > 64 {
            (o.rr_iters / 10).max(100)
        } else {
            o.rr_iters
        };
        let mut rr_settings = o.settings.clone();
        rr_settings.bus_latency_us = o.rr_bus_latency_us;
        // (name, threads): the kernel's client and server are two threads, an emulated
        // pair or bare smoltcp one.
        let one_thread: Vec<(&String, u8)> = runners
            .iter()
            .zip(&names)
            .filter(|(r, _)| !matches!(r, Runner::Threaded(_)))
            .map(|(r, n)| (n, if matches!(r, Runner::Kernel) { 2 } else { 1 }))
            .collect();
        // The modes take turns, in RR_ROUNDS rounds of a share of the exchanges each (the
        // order reversed every other round), so that a noisy stretch of the shared machine
        // falls on every mode alike.
        let per_round = iters.div_ceil(RR_ROUNDS);
        let mut wall: Vec<Vec<f64>> = vec![Vec::new(); one_thread.len()];
        let mut virt: Vec<Option<Vec<f64>>> = vec![None; one_thread.len()];
        for round in 0..RR_ROUNDS {
            let mut order: Vec<usize> = (0..one_thread.len()).collect();
            if round % 2 == 1 {
                order.reverse();
            }
            for k in order {
                let name = one_thread[k].0;
                let (w, v) = if let Some(m) = toe_modes.iter().find(|m| m.name() == name) {
                    let (w, v) = toe_rr_timed(
                        *m,
                        &DemoOptions {
                            rr_iters: per_round,
                            rr_bytes: size,
                            settings: rr_settings.clone(),
                            ..demo.clone()
                        },
                    )?;
                    (w, Some(v))
                } else if name == "smoltcp-bare" {
                    let seed = o.seed.wrapping_add(round as u64);
                    let mut pair = BarePair::new(&o.settings, seed);
                    let w = pair.request_response(per_round, size)?;
                    // No costs on a perfect wire: no virtual time passes, nothing to report.
                    let v = std::mem::take(&mut pair.modeled_rr_us);
                    (w, v.iter().any(|t| *t > 0.0).then_some(v))
                } else {
                    (kernel_rr(per_round, size)?, None)
                };
                wall[k].extend(w);
                if let Some(v) = v {
                    virt[k].get_or_insert_with(Vec::new).extend(v);
                }
            }
        }
        for (k, &(name, threads)) in one_thread.iter().enumerate() {
            let lat = sorted(std::mem::take(&mut wall[k]));
            let vlat = virt[k].take().map(sorted);
            let row = RrRow {
                mode: name.clone(),
                size,
                p50_us: percentile(&lat, 0.5),
                p99_us: percentile(&lat, 0.99),
                p999_us: percentile(&lat, 0.999),
                modeled_p50_us: vlat.as_ref().map(|v| percentile(v, 0.5)),
                modeled_p99_us: vlat.as_ref().map(|v| percentile(v, 0.99)),
                threads,
            };
            progress(&format!(
                "rr {size:>6} B {name:<16} wall p50 {:.1} us p99 {:.1} us p99.9 {:.1} us (modeled p50 {:?} p99 {:?})",
                row.p50_us, row.p99_us, row.p999_us, row.modeled_p50_us, row.modeled_p99_us
            ));
            rr.push(row);
        }
    }

    let mut scale: Vec<ScaleRow> = Vec::new();
    // One point: the TOE hosts, then the kernel at the same point.
    let measure = |n: usize, act: usize| -> io::Result<ScaleRow> {
        let mut row = scale_point(o, n, act, o.scale_bytes)?;
        if o.scale_baselines {
            match crate::kernel::kernel_scale_fits(n) {
                Err(why) => row.kernel_skipped = Some(why),
                Ok(()) => {
                    let (bytes, secs) = kernel_scale(
                        n,
                        act,
                        o.scale_bytes,
                        o.seed,
                        o.check,
                        SCALE_SOCKET_BUF_BYTES as usize,
                    )?;
                    row.kernel_bytes_per_s = Some(bytes as f64 / secs.max(1e-9));
                }
            }
        }
        Ok(row)
    };
    for &ScalePoint {
        conns: n,
        active: act,
    } in &o.scale
    {
        // Every point is compared with a 1-connection point measured right before it, so
        // that drifting machine load hits both alike.
        let one = if n > 1 && o.scale_baselines {
            Some(measure(1, 1)?)
        } else {
            None
        };
        let mut row = measure(n, act)?;
        let first_one = scale.iter().find(|r| r.conns == 1);
        let (base, kernel_base) = one
            .as_ref()
            .or(first_one)
            .map_or((row.aggregate_bytes_per_s, row.kernel_bytes_per_s), |r| {
                (r.aggregate_bytes_per_s, r.kernel_bytes_per_s)
            });
        row.vs_one_connection = row.aggregate_bytes_per_s / base;
        row.kernel_vs_one_connection = row
            .kernel_bytes_per_s
            .zip(kernel_base)
            .map(|(k, k1)| k / k1);
        if let Some(why) = &row.kernel_skipped {
            progress(&format!("scale {n:>6}: no kernel baseline: {why}"));
        }
        progress(&format!(
            "scale {n:>6} conns {act:>6} active {:>8.1} MB/s ({:.2}x one; kernel {}) heap/conn {} KiB idle step {:.2} us, {:.1} page faults/MiB",
            row.aggregate_bytes_per_s / 1e6,
            row.vs_one_connection,
            row.kernel_vs_one_connection.map_or("-".into(), |k| format!("{k:.2}x one")),
            row.heap_per_conn_bytes.map_or("-".into(), |h| format!("{:.1}", h / 1024.0)),
            row.idle_step_us,
            row.timed_faults_per_mib
        ));
        scale.push(row);
    }

    let get = |m: &str| bulk.iter().find(|r| r.mode == m);
    let rr_p99 = |m: &str, size: usize| {
        rr.iter()
            .find(|r| r.mode == m && r.size == size)
            .and_then(|r| r.modeled_p99_us)
            .unwrap_or(0.0)
    };
    let mut goals = Vec::new();
    if let Some(n) = get("named-buffer") {
        goals.push(Goal {
            name: "named-buffer bulk vs kernel loopback".into(),
            value: n.vs_kernel,
            target: 2.0,
            at_most: false,
            met: n.vs_kernel >= 2.0,
        });
        goals.push(Goal {
            name: "named-buffer bulk vs bare smoltcp".into(),
            value: n.vs_bare,
            target: 0.9,
            at_most: false,
            met: n.vs_bare >= 0.9,
        });
    }
    for size in [64usize, 64 * 1024].into_iter().filter(|_| o.rr) {
        let v = rr_p99("indicate-window", size) / rr_p99("mss-holdoff", size).max(1e-9);
        goals.push(Goal {
            name: format!(
                "indicate-window / mss-holdoff rr p99, virtual, {} us bus ({size} B)",
                o.rr_bus_latency_us
            ),
            value: v,
            target: 0.5,
            at_most: true,
            met: v <= 0.5,
        });
    }
    let mut ratio_goal = |name: &str, row: Option<&ScaleRow>, target: f64| {
        if let Some(r) = row {
            goals.push(Goal {
                name: name.into(),
                value: r.vs_one_connection,
                target,
                at_most: false,
                met: r.vs_one_connection >= target,
            });
        }
    };
    let full = |n: usize| scale.iter().find(|r| r.conns == n && r.active == n);
    ratio_goal(
        "1,000 connections aggregate vs one connection",
        full(1_000),
        0.8,
    );
    ratio_goal(
        "10,000 connections aggregate vs one connection",
        full(10_000),
        0.5,
    );
    ratio_goal(
        "10,000 connections 1% active: one connection's cost/byte over this",
        scale
            .iter()
            .find(|r| r.conns == 10_000 && r.active < r.conns),
        1.0 / 1.5,
    );
    if let Some(r) = scale.iter().find(|r| r.conns == 10_000) {
        goals.push(Goal {
            name: "idle step at 10,000 idle connections, us".into(),
            value: r.idle_step_us,
            target: 5.0,
            at_most: true,
            met: r.idle_step_us <= 5.0,
        });
    }
    if let Some((r, h)) = scale
        .iter()
        .filter_map(|r| Some((r, r.heap_per_conn_bytes?)))
        .find(|(r, _)| r.conns == 10_000)
    {
        // Per offloaded connection on one host (the row counts both endpoints).
        let over = (h - r.socket_buffers_per_conn_bytes as f64) / 2.0 / 1024.0;
        goals.push(Goal {
            name: "heap per offloaded connection beyond its socket buffers, KiB".into(),
            value: over,
            target: 2.0,
            at_most: true,
            met: over <= 2.0,
        });
    }
    let machine = serde_json::json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "cpu_model": std::fs::read_to_string("/proc/cpuinfo").ok()
            .and_then(|s| s.lines().find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1)).map(|s| s.trim().to_string())),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").ok().map(|s| s.trim().to_string()),
        "bytes": o.bytes,
        "rounds": o.rounds,
        "rr_iters": o.rr_iters,
        "rr_bus_latency_us": o.rr_bus_latency_us,
        "indicate_window_bytes": o.settings.indicate_window_bytes,
        "mtu": o.settings.mtu,
        "check": format!("{:?}", o.check),
        "note": "TOE modes and bare smoltcp: one thread, virtual clock; kernel loopback: two threads; MODE/threaded: the threaded runtime (adapter thread with both NICs, a sender and a receiver thread), real time. Each bulk row says so in `runtime`. Throughput includes the receiver's integrity check of every byte.",
    });
    Ok(BenchReport {
        machine,
        bulk,
        rr,
        scale,
        goals,
    })
}

/// A readable rendering of `r`.
pub fn bench_table(r: &BenchReport) -> String {
    let mut s = String::new();
    if !r.bulk.is_empty() {
        s.push_str("bulk throughput: modeled (the virtual clock under the cost model on a perfect wire: NIC, bus and host bound it) and the emulator's wall-clock speed (median of alternating runs; TOE modes and smoltcp-bare on one thread and the virtual clock, kernel-loopback on two threads, MODE/threaded on three threads in real time)\n");
        s.push_str(&format!(
            "{:<24} {:>12} {:>9} | {:>9} {:>9} {:>9} {:>8} {:>8} {:>9} {:>12}\n",
            "mode",
            "modeled MB/s",
            "cpu ns/B",
            "wall MB/s",
            "min",
            "max",
            "vs kern",
            "vs bare",
            "copies/B",
            "anon-hw KiB"
        ));
        for b in &r.bulk {
            s.push_str(&format!(
                "{:<24} {:>12} {:>9} | {:>9.1} {:>9.1} {:>9.1} {:>7.2}x {:>7.2}x {:>9} {:>12}\n",
                b.mode,
                b.modeled_bytes_per_s
                    .map_or("-".into(), |v| format!("{:.1}", v / 1e6)),
                b.modeled_host_cpu_ns_per_byte
                    .map_or("-".into(), |v| format!("{v:.3}")),
                b.median_bytes_per_s / 1e6,
                b.min_bytes_per_s / 1e6,
                b.max_bytes_per_s / 1e6,
                b.vs_kernel,
                b.vs_bare,
                b.host_copies_per_byte
                    .map_or("-".into(), |c| format!("{c:.2}")),
                b.anon_high_water_bytes.map_or("-".into(), |a| (a
                    .max(b.copy_buffer_high_water_bytes.unwrap_or(0))
                    / 1024)
                    .to_string())
            ));
        }
    }
    if !r.rr.is_empty() {
        s.push_str("\nrequest/response round trip (µs; modeled: the virtual clock under the cost model; wall: the emulator; the modes take turns in 5 rounds)\n");
        s.push_str(&format!(
            "{:<16} {:>7} {:>7} {:>9} {:>9} {:>9} {:>12} {:>12}\n",
            "mode",
            "threads",
            "size",
            "wall p50",
            "wall p99",
            "p99.9",
            "modeled p50",
            "modeled p99"
        ));
        let opt = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.1}"));
        for x in &r.rr {
            s.push_str(&format!(
                "{:<16} {:>7} {:>7} {:>9.1} {:>9.1} {:>9.1} {:>12} {:>12}\n",
                x.mode,
                x.threads,
                x.size,
                x.p50_us,
                x.p99_us,
                x.p999_us,
                opt(x.modeled_p50_us),
                opt(x.modeled_p99_us)
            ));
        }
    }
    if !r.scale.is_empty() {
        s.push_str("\nscale (indicate-window, W 64 KiB, 64 KiB socket buffers; one thread, virtual clock; kernel: loopback TCP, same buffers, sender and receiver threads on epoll)\n");
        s.push_str(&format!(
            "{:>7} {:>7} {:>12} {:>10} {:>8} {:>11} {:>8} {:>13} {:>13} {:>12} {:>12}\n",
            "conns",
            "active",
            "modeled MB/s",
            "wall MB/s",
            "vs one",
            "kernel MB/s",
            "vs one",
            "heap/conn KiB",
            "rss/conn KiB",
            "sockbuf KiB",
            "idle step us"
        ));
        for x in &r.scale {
            s.push_str(&format!(
                "{:>7} {:>7} {:>12} {:>10.1} {:>7.2}x {:>11} {:>8} {:>13} {:>13.1} {:>12} {:>12.2}\n",
                x.conns,
                x.active,
                x.modeled_aggregate_bytes_per_s
                    .map_or("-".into(), |v| format!("{:.1}", v / 1e6)),
                x.aggregate_bytes_per_s / 1e6,
                x.vs_one_connection,
                x.kernel_bytes_per_s
                    .map_or("-".into(), |k| format!("{:.1}", k / 1e6)),
                x.kernel_vs_one_connection
                    .map_or("-".into(), |k| format!("{k:.2}x")),
                x.heap_per_conn_bytes
                    .map_or("-".into(), |h| format!("{:.1}", h / 1024.0)),
                x.rss_per_conn_bytes / 1024.0,
                x.socket_buffers_per_conn_bytes / 1024,
                x.idle_step_us
            ));
        }
    }
    s.push_str("\ngoals\n");
    for g in &r.goals {
        s.push_str(&format!(
            "{:<58} {:>7.2} (target {}{:.2}) {}\n",
            g.name,
            g.value,
            if g.at_most { "<= " } else { ">= " },
            g.target,
            if g.met { "met" } else { "MISSED" }
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_points_parse() {
        let p = |s: &str| s.parse::<ScalePoint>();
        assert_eq!(p("1000"), Ok(ScalePoint::all_active(1000)));
        assert_eq!(
            p("10_000/100"),
            Ok(ScalePoint {
                conns: 10_000,
                active: 100
            })
        );
        assert!(p("10/20").unwrap_err().contains("more active"));
        assert!(p("0").is_err() && p("x/1").is_err() && p("5/").is_err());
    }
}
