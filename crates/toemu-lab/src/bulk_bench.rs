//! `toemu bulk-bench`: the message transport's bulk transfer over an emulated WAN, on the
//! virtual clock, against one TCP stream on the same wire in the same run.
//!
//! Two emulated TOE hosts on the in-memory wire, each direction impaired alike (rate,
//! half the RTT, random loss: the [`WanLink`] model of `wan-bench`, here symmetric, with
//! a bottleneck queue of half a bandwidth-delay product by default), TCP with CUBIC on
//! both hosts. Host
//! 0 runs toemu's sender ([`MsgSendApp`]), host 1 the storage server ([`MsgServerApp`]),
//! which hashes every session; a run is intact when both ends' per-session SHA-256 agree
//! and every byte was acknowledged.
//!
//! Modes:
//! - `one-stream`: one connection, one session (the prior art: one TCP stream);
//! - `bulk`: many connections, primed, with reserves, in sub-transfers
//!   ([`toe_msg::bulk`]; data frames a slow connection holds too long go out again on
//!   the others), paced from the delivery-rate estimate ([`toe_msg::pace`]);
//! - `bulk-unpaced`: the same, as fast as the connections take data;
//! - `pipe-10` and `pipe-1000`: 100 sessions of 1–8 MiB messages over 10 and 1,000
//!   connections (check 1's pipe), unpaced; the wall time per byte compares their cost.

use std::io;

use serde::Serialize;
use toe_msg::{BulkConfig, Config, PacingConfig, PipeConfig};
use toe_nic::impair::Impaired;

use crate::msg::{Payload, Security, SendOptions};
use crate::msg_toe::{MsgSendApp, MsgServerApp};
use crate::plot::{write_svg, Axis, Chart, Scale, Series, Ticks};
use crate::wan::WanLink;

/// The emulated link, as the JSON reports it.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct BulkLink {
    /// Bandwidth of each direction, bytes per second of frame bytes.
    pub bytes_per_s: f64,
    /// Round-trip propagation delay, ms.
    pub rtt_ms: f64,
    /// Probability that a frame is lost, each direction.
    pub loss: f64,
    /// IP MTU, bytes.
    pub mtu: u32,
    /// The bottleneck queue of each direction, bytes.
    pub queue_bytes: usize,
}

impl Default for BulkLink {
    /// The link: 1 Gbit/s, 50 ms, 0.01% loss, MTU 1500, a bottleneck queue of
    /// half a bandwidth-delay product (about 3 MB).
    fn default() -> Self {
        let mut l = BulkLink {
            bytes_per_s: 125e6,
            rtt_ms: 50.0,
            loss: 1e-4,
            mtu: 1500,
            queue_bytes: 0,
        };
        l.queue_bytes = l.bdp_bytes() / 2;
        l
    }
}

impl BulkLink {
    /// The bandwidth-delay product, bytes.
    pub fn bdp_bytes(&self) -> usize {
        (self.bytes_per_s * self.rtt_ms / 1e3) as usize
    }

    /// The impairment of one direction, seeded `seed`.
    fn direction(&self, seed: u64) -> toe_nic::impair::ImpairConfig {
        toe_nic::impair::ImpairConfig {
            queue_bytes: self.queue_bytes.max(64 << 10),
            ..self.wan().direction(self.bytes_per_s, seed)
        }
    }

    fn wan(&self) -> WanLink {
        WanLink {
            forward_bytes_per_s: self.bytes_per_s,
            reverse_bytes_per_s: self.bytes_per_s,
            rtt_ms: self.rtt_ms,
            loss: self.loss,
            mtu: self.mtu,
        }
    }
}

/// A mode of the bench.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BulkMode {
    /// One connection, one session.
    OneStream,
    /// Many connections, paced.
    Bulk,
    /// Many connections, unpaced.
    BulkUnpaced,
    /// 100 sessions over 10 connections.
    Pipe10,
    /// 100 sessions over 1,000 connections.
    Pipe1000,
}

impl BulkMode {
    /// Every mode, in table order.
    pub const ALL: [BulkMode; 5] = [
        BulkMode::OneStream,
        BulkMode::Bulk,
        BulkMode::BulkUnpaced,
        BulkMode::Pipe10,
        BulkMode::Pipe1000,
    ];

    /// Its name in reports and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            BulkMode::OneStream => "one-stream",
            BulkMode::Bulk => "bulk",
            BulkMode::BulkUnpaced => "bulk-unpaced",
            BulkMode::Pipe10 => "pipe-10",
            BulkMode::Pipe1000 => "pipe-1000",
        }
    }
}

impl std::str::FromStr for BulkMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        BulkMode::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                format!("{s}: expected one-stream, bulk, bulk-unpaced, pipe-10 or pipe-1000")
            })
    }
}

/// What the bench runs.
#[derive(Debug, Clone)]
pub struct BulkOptions {
    /// The link.
    pub link: BulkLink,
    /// Bytes per run.
    pub bytes: u64,
    /// Active connections of `bulk` and `bulk-unpaced`.
    pub connections: usize,
    /// Their reserve connections (primed, brought in for stragglers).
    pub reserves: usize,
    /// Priming bytes per connection (`None`: half its share of the bandwidth-delay
    /// product, reserves counted, within 64 KiB to 4 MiB).
    pub prime_bytes: Option<usize>,
    /// Sessions of `bulk` and `bulk-unpaced`.
    pub sessions: usize,
    /// Message size of `one-stream`, `bulk` and `bulk-unpaced`, bytes.
    pub message_bytes: usize,
    /// The modes, in order.
    pub modes: Vec<BulkMode>,
    /// Seeds the wire and the data.
    pub seed: u64,
}

impl Default for BulkOptions {
    fn default() -> Self {
        BulkOptions {
            link: BulkLink::default(),
            bytes: 1 << 30,
            connections: 32,
            reserves: 8,
            prime_bytes: None,
            sessions: 8,
            message_bytes: 256 << 10,
            modes: BulkMode::ALL.to_vec(),
            seed: 7,
        }
    }
}

/// One run.
#[derive(Debug, Clone, Serialize)]
pub struct BulkRun {
    /// The mode.
    pub mode: BulkMode,
    /// TCP connections of the pipe.
    pub connections: usize,
    /// Sessions.
    pub sessions: usize,
    /// Bytes acknowledged per second of virtual time, from the first connection to the
    /// last session closed.
    pub goodput_bytes_per_s: f64,
    /// Frames dropped at the bottleneck queue of the data direction.
    pub bottleneck_drops: u64,
    /// Frames lost at random, data direction.
    pub random_losses: u64,
    /// Data-frame bytes the sender sent again on another connection because theirs
    /// stalled (the transfer's own overhead above TCP's retransmissions).
    pub resent_bytes: u64,
    /// Every byte acknowledged and both ends' per-session SHA-256 agree.
    pub integrity_ok: bool,
    /// What went wrong, if anything.
    pub problem: Option<String>,
    /// Virtual seconds of the transfer.
    pub seconds: f64,
    /// Wall-clock seconds the emulation took.
    pub wall_seconds: f64,
    /// Wall-clock ns of emulation per byte moved (both hosts, the NICs and the wire: a
    /// comparison between modes, not a host CPU figure).
    pub wall_ns_per_byte: f64,
    /// Goodput over time: (s, bytes per second over the preceding interval), 50 points.
    pub goodput_over_time: Vec<(f64, f64)>,
    /// What the bulk planner did: priming, sub-transfers, stragglers, reserves (`bulk`
    /// and `bulk-unpaced`).
    pub planner: Option<toe_msg::BulkStats>,
    /// How soon the transfer sent at full rate, ms: from the first data (after priming)
    /// until one round trip's acknowledgements carried 90% of the link, less two round
    /// trips (that window's and its acknowledgements' way back). `None`: never.
    pub full_rate_after_ms: Option<f64>,
}

/// The report: the link and the runs.
#[derive(Debug, Clone, Serialize)]
pub struct BulkReport {
    /// The emulated link.
    pub link: BulkLink,
    /// Every run, in order.
    pub runs: Vec<BulkRun>,
}

/// Plans a bulk transfer over `link` into `so`: `active` connections and `reserves`
/// (primed, brought in for stragglers), each primed with `prime_bytes` (`None`: half its
/// share of the bandwidth-delay product, reserves counted, within 64 KiB to 4 MiB),
/// sub-transfers of four bandwidth-delay products; with `paced`, paced from the
/// delivery-rate estimate (starting at a tenth of the link, a max filter of ten round
/// trips) and spaced per packet in the NIC.
pub fn plan_bulk(
    so: &mut SendOptions,
    link: &BulkLink,
    active: usize,
    reserves: usize,
    prime_bytes: Option<usize>,
    paced: bool,
) {
    let active = active.max(1);
    so.connections = active + reserves;
    so.bulk = Some(BulkConfig {
        active,
        prime_bytes: prime_bytes.unwrap_or_else(|| {
            // Half of each connection's share of the bandwidth-delay product, reserves
            // included: all of them in slow start at once overshoot their last round
            // about twice, and the pipe is then about full.
            (link.bdp_bytes() / (2 * so.connections)).clamp(64 << 10, 4 << 20)
        }),
        subtransfer_bytes: 4 * link.bdp_bytes() as u64,
        ..BulkConfig::default()
    });
    if paced {
        so.pacing = Some(PacingConfig {
            initial_bytes_per_s: link.bytes_per_s / 10.0,
            window_us: (link.rtt_ms * 10_000.0) as u64,
            startup_flat_rounds: 2,
            ..PacingConfig::default()
        });
        // Packets are spaced in the NIC (its egress shaper), from TCP's acknowledgements;
        // two flat rounds end the start-up (three let its queue overflow the bottleneck's
        // half a BDP).
        so.pace_packets = true;
    }
}

/// Each session's share of one second of `link`, bytes (4 to 64 MiB): what its queues
/// hold. While one connection recovers a loss (a retransmission timeout is 200 ms or
/// more), the frames of the message it holds up wait, and the others keep the link busy.
fn session_queue_bytes(link: &BulkLink, sessions: usize) -> usize {
    (link.bytes_per_s as usize / sessions.max(1)).clamp(4 << 20, 64 << 20)
}

/// The sender's session queues of `so` hold at least their share of one second of
/// `link`.
pub fn size_queues(so: &mut SendOptions, link: &BulkLink) {
    let q = session_queue_bytes(link, so.sessions);
    so.pipe.session.out_queue_bytes = so.pipe.session.out_queue_bytes.max(q);
}

/// The server's session queues hold at least their share of one second of `link` among
/// `sessions`, in 256 slots.
pub fn size_server_queues(server: &mut PipeConfig, link: &BulkLink, sessions: usize) {
    let q = session_queue_bytes(link, sessions);
    server.session.in_queue_bytes = server.session.in_queue_bytes.max(q);
    server.session.in_slots = 256;
}

/// The sending host's settings for `so` over `link`: room for its connections, and each
/// connection's socket buffers hold its share of twice the bandwidth-delay product (the
/// active connections' share, with a planner), 256 KiB to 16 MiB.
pub fn size_host(s: &mut toe_host::config::Settings, so: &SendOptions, link: &BulkLink) {
    s.max_conns = (so.connections as u32 + 16).max(s.max_conns);
    let carrying = so.bulk.map_or(so.connections, |b| b.active);
    s.socket_buf_bytes = (2 * link.bdp_bytes() / carrying.max(1)).clamp(256 << 10, 16 << 20) as u32;
}

/// One run of `mode`.
pub fn bulk_run(o: &BulkOptions, mode: BulkMode) -> io::Result<BulkRun> {
    let to = "10.0.0.2:7000".parse().expect("address");
    let mut so = SendOptions::new(
        to,
        Payload::Pattern {
            len: o.bytes,
            seed: o.seed,
        },
    );
    so.message_bytes = o.message_bytes;
    let mut server_cfg = PipeConfig::default();
    match mode {
        BulkMode::OneStream => {
            so.connections = 1;
            so.sessions = 1;
        }
        BulkMode::Bulk | BulkMode::BulkUnpaced => {
            so.sessions = o.sessions;
            plan_bulk(
                &mut so,
                &o.link,
                o.connections,
                o.reserves,
                o.prime_bytes,
                mode == BulkMode::Bulk,
            );
        }
        BulkMode::Pipe10 | BulkMode::Pipe1000 => {
            so.connections = if mode == BulkMode::Pipe10 { 10 } else { 1000 };
            so.sessions = 100;
            so.message_bytes = 1 << 20;
            so.message_max_bytes = Some(8 << 20);
            so.pipe.session.out_queue_bytes = 16 << 20;
            server_cfg.session = Config {
                in_queue_bytes: 16 << 20,
                ..Config::default()
            };
        }
    }
    size_queues(&mut so, &o.link);
    size_server_queues(&mut server_cfg, &o.link, so.sessions);
    let mut s = toe_host::config::Settings::default();
    s.mtu = o.link.mtu;
    s.congestion = toe_nic::Congestion::Cubic;
    size_host(&mut s, &so, &o.link);
    s.anon_buf_bytes = s
        .anon_buf_bytes
        .max(crate::iscsi_host::BENCH_ANON_BUF_BYTES);
    s.validate()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    let (pa, pb) = toe_nic::phy::wire(4096);
    let to_sender = Impaired::new(pa, o.link.direction(o.seed ^ 0x5eed))
        .map_err(|e| io::Error::other(e.to_string()))?;
    let to_server = Impaired::new(pb, o.link.direction(o.seed ^ 0xf0f0))
        .map_err(|e| io::Error::other(e.to_string()))?;
    let data_dir = to_server.monitor();
    let sim = toe_host::pair::hosts(&s, &s, o.seed, Box::new(to_sender), Box::new(to_server))?;
    let mut server = MsgServerApp::new(to.port(), Security::Plain, None, server_cfg);
    let (connections, sessions) = (so.connections, so.sessions);
    let mut sender = MsgSendApp::new(so, Security::Plain, o.seed)
        .with_conn_send_bytes(s.socket_buf_bytes as usize);
    let t0 = std::time::Instant::now();
    let ran = crate::serve::run_apps_sim(&sim, &mut sender, &mut server, u64::MAX);
    let wall_seconds = t0.elapsed().as_secs_f64();
    let stats = data_dir.stats();
    let mut run = BulkRun {
        mode,
        connections,
        sessions,
        goodput_bytes_per_s: 0.0,
        bottleneck_drops: stats.dropped_queue,
        random_losses: stats.dropped_loss,
        resent_bytes: 0,
        integrity_ok: false,
        problem: None,
        seconds: 0.0,
        wall_seconds,
        wall_ns_per_byte: wall_seconds * 1e9 / o.bytes.max(1) as f64,
        goodput_over_time: over_time(sender.progress(), 50),
        planner: None,
        full_rate_after_ms: None,
    };
    let report = match (ran, sender.report()) {
        (Err(e), _) => {
            run.problem = Some(e.to_string());
            return Ok(run);
        }
        (_, Err(e)) => {
            run.problem = Some(e);
            return Ok(run);
        }
        (Ok(_), Ok(r)) => r,
    };
    run.seconds = report.seconds;
    run.resent_bytes = report.resent_bytes;
    run.planner = report.bulk;
    let first_data = report
        .bulk
        .and_then(|b| b.data_from_us)
        .or(sender.progress().first().map(|_| 0));
    run.full_rate_after_ms = first_data.and_then(|t0| {
        full_rate_at(sender.progress(), o.link.bytes_per_s * 0.9, o.link.rtt_ms)
            .map(|t| (t.saturating_sub(t0) as f64 / 1e3 - 2.0 * o.link.rtt_ms).max(0.0))
    });
    run.goodput_bytes_per_s = report.bytes as f64 / report.seconds.max(1e-9);
    run.problem = if report.bytes != o.bytes {
        Some(format!(
            "{} bytes acknowledged of {}",
            report.bytes, o.bytes
        ))
    } else if report.failed > 0 {
        Some(format!("{} messages failed", report.failed))
    } else if !crate::msg::sessions_agree(&report, server.results()) {
        Some("the server's sessions differ from what was sent".into())
    } else {
        None
    };
    run.integrity_ok = run.problem.is_none();
    Ok(run)
}

/// The first time (µs) the acknowledgements of the preceding round trip (`rtt_ms`) carried
/// `bytes_per_s`, from (µs, bytes acknowledged) points.
fn full_rate_at(progress: &[(u64, u64)], bytes_per_s: f64, rtt_ms: f64) -> Option<u64> {
    let rtt_us = (rtt_ms * 1e3).max(1.0) as u64;
    let want = bytes_per_s * rtt_ms / 1e3;
    let mut back = 0;
    for &(t, acked) in progress {
        while progress[back].0 + rtt_us < t {
            back += 1;
        }
        if (acked - progress[back].1) as f64 >= want {
            return Some(t);
        }
    }
    None
}

/// Goodput over time from (µs, bytes acknowledged) points: `n` intervals of equal length,
/// each (end, s; bytes per second within it).
fn over_time(progress: &[(u64, u64)], n: usize) -> Vec<(f64, f64)> {
    let (Some(&(t0, _)), Some(&(t1, _))) = (progress.first(), progress.last()) else {
        return Vec::new();
    };
    let step = ((t1 - t0) / n.max(1) as u64).max(1);
    let mut out = Vec::new();
    let (mut at, mut prev) = (0usize, 0u64);
    for i in 1..=n as u64 {
        let end = t0 + i * step;
        while at + 1 < progress.len() && progress[at + 1].0 <= end {
            at += 1;
        }
        let bytes = progress[at].1;
        out.push((end as f64 / 1e6, (bytes - prev) as f64 * 1e6 / step as f64));
        prev = bytes;
    }
    out
}

/// Every mode of `o`, in order; `each` sees every run as it ends.
pub fn bulk_bench(o: &BulkOptions, mut each: impl FnMut(&BulkRun)) -> io::Result<BulkReport> {
    let mut runs = Vec::new();
    for &m in &o.modes {
        let r = bulk_run(o, m)?;
        each(&r);
        runs.push(r);
    }
    Ok(BulkReport { link: o.link, runs })
}

/// The report as a table, with the ratios the goals name.
pub fn bulk_table(r: &BulkReport) -> String {
    use std::fmt::Write as _;
    let mut t = format!(
        "bulk-bench: {:.0} Mbit/s, {} ms RTT, loss {}, MTU {}, bottleneck queue {} KiB (virtual time)\n\
         {:<13} {:>5} {:>9} {:>7} {:>8} {:>8} {:>9} {:>8} {:>10} {:>8} {:>9} {}\n",
        r.link.bytes_per_s * 8.0 / 1e6,
        r.link.rtt_ms,
        r.link.loss,
        r.link.mtu,
        r.link.queue_bytes >> 10,
        "mode",
        "conns",
        "MB/s",
        "link%",
        "drops",
        "losses",
        "resent MB",
        "s",
        "wall ns/B",
        "full@ms",
        "subs/drop",
        "intact"
    );
    for x in &r.runs {
        let _ = writeln!(
            t,
            "{:<13} {:>5} {:>9.1} {:>6.1}% {:>8} {:>8} {:>9.1} {:>8.2} {:>10.1} {:>8} {:>9} {}",
            x.mode.name(),
            x.connections,
            x.goodput_bytes_per_s / 1e6,
            100.0 * x.goodput_bytes_per_s / r.link.bytes_per_s,
            x.bottleneck_drops,
            x.random_losses,
            x.resent_bytes as f64 / 1e6,
            x.seconds,
            x.wall_ns_per_byte,
            x.full_rate_after_ms
                .map_or_else(|| "-".into(), |m| format!("{m:.0}")),
            x.planner.map_or_else(
                || "-".into(),
                |b| format!("{}/{}", b.subtransfers, b.stragglers_dropped)
            ),
            if x.integrity_ok {
                "yes".to_string()
            } else {
                format!("NO: {}", x.problem.as_deref().unwrap_or("?"))
            }
        );
    }
    let find = |m: BulkMode| r.runs.iter().find(|x| x.mode == m);
    if let (Some(b), Some(one)) = (find(BulkMode::Bulk), find(BulkMode::OneStream)) {
        let _ = writeln!(
            t,
            "bulk against one stream: {:.1}x goodput",
            b.goodput_bytes_per_s / one.goodput_bytes_per_s.max(1.0)
        );
    }
    if let (Some(b), Some(u)) = (find(BulkMode::Bulk), find(BulkMode::BulkUnpaced)) {
        let _ = writeln!(
            t,
            "paced against unpaced: {:.2}x the bottleneck drops, {:.2}x the goodput",
            b.bottleneck_drops as f64 / u.bottleneck_drops.max(1) as f64,
            b.goodput_bytes_per_s / u.goodput_bytes_per_s.max(1.0)
        );
    }
    if let (Some(a), Some(b)) = (find(BulkMode::Pipe1000), find(BulkMode::Pipe10)) {
        let _ = writeln!(
            t,
            "1,000 connections against 10: {:.2}x the wall time per byte",
            a.wall_ns_per_byte / b.wall_ns_per_byte.max(1e-9)
        );
    }
    t
}

/// The chart of goodput over time per mode.
pub fn bulk_chart(r: &BulkReport, path: &std::path::Path) -> io::Result<()> {
    let mut c = Chart::new(
        "Bulk transfer over an emulated WAN: goodput over time",
        Axis::new("virtual time (s)", Scale::Linear, Ticks::Plain),
        Axis::new("goodput (MB/s)", Scale::Linear, Ticks::Plain),
    );
    for x in &r.runs {
        let pts = x
            .goodput_over_time
            .iter()
            .map(|&(t, g)| (t, g / 1e6))
            .collect();
        c.series.push(Series::line(x.mode.name(), pts));
    }
    c.hlines.push(("link".into(), r.link.bytes_per_s / 1e6));
    write_svg(path, &c)
}
