//! `toemu iscsi wan-bench`: backup-style writes over an emulated asymmetric WAN, on the
//! virtual clock, in three modes (seed 000's write acceleration against the RFC).
//!
//! toemu's initiator (host 0) writes a stream of sequential 256 KiB writes to toemu's
//! target (host 1) at a queue depth over the in-memory wire, impaired per direction: the
//! forward path (initiator → target) fast, the reverse path thin, both with the same
//! one-way delay and loss, and a bottleneck queue of two bandwidth-delay products each.
//! Both hosts run the emulated TOE with the NIC's iSCSI engine and the cost model; their
//! TCP sockets hold 16 MiB (room for the forward path's bandwidth-delay product).
//!
//! The modes differ only in what the initiator offers at login (the target is the same,
//! configured once, accepting everything):
//! - `classic`: RFC 7143's defaults (InitialR2T=Yes, ImmediateData=Yes, FirstBurstLength
//!   64 KiB, MaxOutstandingR2T=1): 64 KiB with the command, the rest on an R2T;
//! - `unsolicited`: InitialR2T=No, ImmediateData=Yes, FirstBurstLength = the write;
//! - `accelerated`: the same plus toemu's write acceleration ([`toe_iscsi::accel`]).

use std::io;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use toe_bus::time::Duration;
use toe_iscsi::accel::{AccelConfig, InitiatorAccel};
use toe_iscsi::login::{OpParams, TargetConfig};
use toe_iscsi::scsi::{Disk, MemStore};
use toe_nic::impair::{ImpairConfig, ImpairStats, Impaired};

use crate::iscsi::IscsiUrl;
use crate::iscsi_host::{iscsi_hosts, seeded_random, PerfApp, TargetApp};
use crate::iscsi_perf::PerfOptions;
use crate::plot::{write_svg, Axis, Chart, Scale, Series, Ticks};
use crate::stats::Latency;

/// The emulated WAN.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct WanLink {
    /// Forward (initiator → target) bandwidth, bytes per second of frame bytes.
    pub forward_bytes_per_s: f64,
    /// Reverse (target → initiator) bandwidth, bytes per second.
    pub reverse_bytes_per_s: f64,
    /// Round-trip time of the propagation delay, ms (half each way).
    pub rtt_ms: f64,
    /// Probability that a frame is lost, each direction.
    pub loss: f64,
    /// IP MTU, bytes.
    pub mtu: u32,
}

impl Default for WanLink {
    /// The link: 1 Gbit/s forward, 10 Mbit/s back, 50 ms, 0.01% loss, MTU 1500.
    fn default() -> Self {
        WanLink {
            forward_bytes_per_s: 125e6,
            reverse_bytes_per_s: 1.25e6,
            rtt_ms: 50.0,
            loss: 1e-4,
            mtu: 1500,
        }
    }
}

impl WanLink {
    /// The impairment of the direction with `bytes_per_s`, seeded `seed`: rate, half the
    /// RTT, loss, and a bottleneck queue of two bandwidth-delay products (100 ms of the
    /// link's rate at 50 ms RTT; at least 64 KiB).
    pub(crate) fn direction(&self, bytes_per_s: f64, seed: u64) -> ImpairConfig {
        let bdp = (2.0 * bytes_per_s * self.rtt_ms / 1e3) as usize;
        ImpairConfig {
            delay: Duration::from_micros((self.rtt_ms * 500.0) as u64),
            rate_bits_per_s: Some((bytes_per_s * 8.0) as u64),
            queue_bytes: bdp.max(64 << 10),
            loss: self.loss,
            seed,
            ..ImpairConfig::default()
        }
    }
}

/// What the initiator asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WanMode {
    /// RFC 7143 defaults.
    Classic,
    /// Unsolicited data with the command, no R2T.
    Unsolicited,
    /// Unsolicited data and toemu's write acceleration.
    Accelerated,
}

impl WanMode {
    /// Every mode, in table order.
    pub const ALL: [WanMode; 3] = [WanMode::Classic, WanMode::Unsolicited, WanMode::Accelerated];

    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            WanMode::Classic => "classic",
            WanMode::Unsolicited => "unsolicited",
            WanMode::Accelerated => "accelerated",
        }
    }

    /// What the initiator offers at login for writes of `io_bytes`.
    pub fn params(self, io_bytes: u32) -> OpParams {
        match self {
            WanMode::Classic => OpParams::default(),
            WanMode::Unsolicited | WanMode::Accelerated => OpParams {
                initial_r2t: false,
                immediate_data: true,
                first_burst_length: io_bytes,
                max_burst_length: io_bytes.max(262_144),
                write_acceleration: self == WanMode::Accelerated,
                ..OpParams::default()
            },
        }
    }
}

/// One run of the bench.
#[derive(Debug, Clone, Serialize)]
pub struct WanRun {
    /// The mode.
    pub mode: WanMode,
    /// Queue depth.
    pub depth: usize,
    /// Bytes per write.
    pub io_bytes: u32,
    /// Data bytes written per second of modeled time.
    pub throughput_bytes_per_s: f64,
    /// Write latency (issue to SCSI Response), µs of modeled time.
    pub write_latency_us: Latency,
    /// Frames the target sent onto the reverse path per MiB written.
    pub reverse_packets_per_mib: f64,
    /// Frame bytes on the reverse path per MiB written.
    pub reverse_bytes_per_mib: f64,
    /// R2Ts the target sent.
    pub r2t_sent: u64,
    /// Pure TCP ACKs the target's NIC sent.
    pub pure_acks_sent: u64,
    /// ACKs the target's NIC held back (delayed ACK or write acceleration's hold).
    pub acks_held: u64,
    /// Held ACKs a data segment (a response) carried: superseded.
    pub acks_superseded: u64,
    /// Duplicate ACKs the target's NIC thinned out (write acceleration).
    pub acks_thinned: u64,
    /// Write responses that went out in batches, and the batches.
    pub responses_batched: u64,
    /// Batches of write responses.
    pub response_batches: u64,
    /// Writes refused with a back-off.
    pub backoffs: u64,
    /// Dynamic-R2T messages the target sent (R2T required, unsolicited allowed again).
    pub r2t_signals: u64,
    /// Congestion reports the target received from the initiator.
    pub congestion_reports: u64,
    /// Frames lost or dropped on the reverse path (loss and queue).
    pub reverse_drops: u64,
    /// Frames dropped at the forward bottleneck queue.
    pub forward_queue_drops: u64,
    /// Every write completed GOOD and the target's disk holds exactly the pattern written.
    pub integrity_ok: bool,
    /// What went wrong, if anything did.
    pub problem: Option<String>,
    /// Modeled seconds of the write phase.
    pub seconds: f64,
    /// Wall-clock seconds the emulation took.
    pub wall_seconds: f64,
}

/// How much the bench writes.
#[derive(Debug, Clone)]
pub struct WanOptions {
    /// The link.
    pub link: WanLink,
    /// Queue depths.
    pub depths: Vec<usize>,
    /// Bytes per write.
    pub io_bytes: u32,
    /// Writes per run at depth `d`: `writes_per_depth × d`, at least `min_writes`.
    pub writes_per_depth: u64,
    /// The fewest writes of a run.
    pub min_writes: u64,
    /// The target's write-acceleration policy.
    pub accel: AccelConfig,
    /// The initiator's side of write acceleration (its write buffer's congestion reports).
    pub initiator: InitiatorAccel,
    /// A write-back target whose store takes this many bytes per second (see
    /// `TargetConn::with_destage`); `None`: the store keeps up.
    pub destage_bytes_per_s: Option<u64>,
    /// Seeds the wire and the data.
    pub seed: u64,
}

impl Default for WanOptions {
    fn default() -> Self {
        WanOptions {
            link: WanLink::default(),
            depths: vec![1, 8, 32],
            io_bytes: 256 << 10,
            writes_per_depth: 16,
            min_writes: 48,
            accel: AccelConfig::default(),
            destage_bytes_per_s: None,
            initiator: InitiatorAccel::default(),
            seed: 3,
        }
    }
}

/// The report: the link and the runs.
#[derive(Debug, Clone, Serialize)]
pub struct WanReport {
    /// The emulated link.
    pub link: WanLink,
    /// Every run, mode by mode, depth by depth.
    pub runs: Vec<WanRun>,
}

/// Host settings of the bench: the cost model's machine, MTU of the link, 16 MiB sockets.
fn settings(link: &WanLink) -> io::Result<toe_host::config::Settings> {
    let mut s = toe_host::config::Settings::default();
    s.mtu = link.mtu;
    s.socket_buf_bytes = 16 << 20;
    s.anon_buf_bytes = s
        .anon_buf_bytes
        .max(crate::iscsi_host::BENCH_ANON_BUF_BYTES);
    s.validate()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    Ok(s)
}

/// One run: `mode` at `depth`, `writes` writes.
pub fn wan_run(o: &WanOptions, mode: WanMode, depth: usize, writes: u64) -> io::Result<WanRun> {
    let link = o.link;
    let settings = settings(&link)?;
    let (pa, pb) = toe_nic::phy::wire(4096);
    // Side 0 (the initiator) receives the reverse path, side 1 the forward path.
    let rev = Impaired::new(
        pa,
        link.direction(link.reverse_bytes_per_s, o.seed ^ 0x5eed),
    )
    .map_err(|e| io::Error::other(e.to_string()))?;
    let fwd = Impaired::new(
        pb,
        link.direction(link.forward_bytes_per_s, o.seed ^ 0xf0f0),
    )
    .map_err(|e| io::Error::other(e.to_string()))?;
    let (mon_rev, mon_fwd) = (rev.monitor(), fwd.monitor());
    let sim = iscsi_hosts(&settings, [Box::new(rev), Box::new(fwd)], o.seed)?;
    let bytes = writes * u64::from(o.io_bytes);
    let lun_bytes = bytes as usize;
    let disk = Arc::new(Mutex::new(Disk::new(
        Box::new(MemStore::new(lun_bytes)),
        512,
        "TOEMUWAN1",
    )));
    let iqn = "iqn.2026-12.org.toemu:wan";
    // The target accepts every mode: unsolicited data, bursts of the write, acceleration.
    let mut cfg = TargetConfig::offering_digests(iqn);
    cfg.params.initial_r2t = false;
    cfg.params.first_burst_length = o.io_bytes.max(65_536);
    cfg.params.max_burst_length = o.io_bytes.max(262_144);
    cfg.params.write_acceleration = o.accel.enabled;
    let mut target =
        TargetApp::new(3260, cfg, "10.0.0.2:3260", disk.clone(), o.seed).with_accel(o.accel);
    if let Some(rate) = o.destage_bytes_per_s {
        target = target.with_destage(rate);
    }
    let url: IscsiUrl = format!("iscsi://10.0.0.2:3260/{iqn}/0")
        .parse()
        .map_err(io::Error::other)?;
    let po = PerfOptions {
        io_bytes: o.io_bytes,
        depth,
        bytes: Some(bytes),
        write: true,
        seed: o.seed,
        ..PerfOptions::default()
    };
    let mut perf = PerfApp::new(&url, po.clone(), seeded_random(o.seed))
        .map_err(io::Error::other)?
        .with_params(mode.params(o.io_bytes), o.initiator);
    let t0 = std::time::Instant::now();
    crate::serve::run_apps_sim(&sim, &mut perf, &mut target, u64::MAX)?;
    let wall_seconds = t0.elapsed().as_secs_f64();
    let report = perf.report().map_err(io::Error::other)?;
    let phase = report
        .phases
        .first()
        .ok_or_else(|| io::Error::other("no write phase"))?;
    let problem = if !report.ok() || phase.errors > 0 {
        Some(format!(
            "{} write(s) failed: {}",
            phase.errors,
            report.first_problem.clone().unwrap_or_default()
        ))
    } else if phase.bytes != bytes {
        Some(format!("{} bytes written, {bytes} asked", phase.bytes))
    } else {
        disk_problem(&disk, o.seed, bytes)?
    };
    let (nic, phy) = sim.with_host(1, |h| (h.nic.stats(), h.nic.phy_stats()));
    let st = target.stats();
    let (rev, fwd): (ImpairStats, ImpairStats) = (mon_rev.stats(), mon_fwd.stats());
    let mib = phase.bytes.max(1) as f64 / f64::from(1u32 << 20);
    Ok(WanRun {
        mode,
        depth,
        io_bytes: o.io_bytes,
        throughput_bytes_per_s: phase.mb_per_s * 1e6,
        write_latency_us: phase.latency_us,
        reverse_packets_per_mib: rev.frames_in as f64 / mib,
        reverse_bytes_per_mib: rev.bytes_in as f64 / mib,
        r2t_sent: st.r2t_sent,
        pure_acks_sent: phy.tx_pure_acks,
        acks_held: nic.acks_delayed,
        acks_superseded: nic.acks_carried,
        acks_thinned: nic.acks_thinned,
        responses_batched: st.responses_batched,
        response_batches: st.response_batches,
        backoffs: st.backoffs,
        r2t_signals: st.r2t_signals,
        congestion_reports: st.congestion_reports,
        reverse_drops: rev.dropped_loss + rev.dropped_queue,
        forward_queue_drops: fwd.dropped_queue,
        integrity_ok: problem.is_none(),
        problem,
        seconds: phase.seconds,
        wall_seconds,
    })
}

/// What is wrong with the first `bytes` of LUN 0 of `disk`, if they are not the pattern
/// `perf` writes with `seed`.
fn disk_problem(disk: &Arc<Mutex<Disk>>, seed: u64, bytes: u64) -> io::Result<Option<String>> {
    let mut d = disk
        .lock()
        .map_err(|_| io::Error::other("disk lock poisoned"))?;
    let mut want = vec![0u8; 64 << 10];
    let mut got = vec![0u8; 64 << 10];
    let mut off = 0u64;
    while off < bytes {
        let n = (bytes - off).min(want.len() as u64) as usize;
        crate::iscsi_perf::pattern(seed, off / 512, 512, &mut want[..n]);
        let mut cdb = [0u8; 16];
        cdb[0] = 0x88; // READ(16)
        cdb[2..10].copy_from_slice(&(off / 512).to_be_bytes());
        cdb[10..14].copy_from_slice(&((n / 512) as u32).to_be_bytes());
        let o = d.execute(&cdb, &[]);
        if o.status != toe_iscsi::scsi::GOOD || o.data_in.len() != n {
            return Ok(Some(format!(
                "reading the target's disk back at byte {off}: status {:#x}",
                o.status
            )));
        }
        got[..n].copy_from_slice(&o.data_in);
        if got[..n] != want[..n] {
            return Ok(Some(format!(
                "the target's disk differs from the data written near byte {off}"
            )));
        }
        off += n as u64;
    }
    Ok(None)
}

/// The bench: every mode at every depth, the modes of one depth one after another
/// (alternating which goes first). `each` sees every run as it is measured.
pub fn wan_bench(o: &WanOptions, mut each: impl FnMut(&WanRun)) -> io::Result<WanReport> {
    let mut runs = Vec::new();
    for (k, &depth) in o.depths.iter().enumerate() {
        let writes = (o.writes_per_depth * depth as u64).max(o.min_writes);
        let mut order = WanMode::ALL.to_vec();
        if k % 2 == 1 {
            order.reverse();
        }
        let mut these = Vec::new();
        for mode in order {
            let r = wan_run(o, mode, depth, writes)?;
            each(&r);
            these.push(r);
        }
        these.sort_by_key(|r| WanMode::ALL.iter().position(|m| *m == r.mode));
        runs.extend(these);
    }
    Ok(WanReport { link: o.link, runs })
}

/// The report as a table, with the goals' ratios at the end.
pub fn wan_table(r: &WanReport) -> String {
    let l = &r.link;
    let mut s = format!(
        "link: forward {:.0} Mbit/s, reverse {:.1} Mbit/s, RTT {} ms, loss {}, MTU {}\n",
        l.forward_bytes_per_s * 8e-6,
        l.reverse_bytes_per_s * 8e-6,
        l.rtt_ms,
        l.loss,
        l.mtu
    );
    s += &format!(
        "{:<12} {:>5} {:>10} {:>10} {:>10} {:>9} {:>10} {:>6} {:>9} {:>8} {:>9} {:>6}\n",
        "mode",
        "depth",
        "MB/s",
        "lat p50ms",
        "lat p99ms",
        "rev pk/MiB",
        "rev B/MiB",
        "R2Ts",
        "pure ACKs",
        "held",
        "superseded",
        "ok"
    );
    for x in &r.runs {
        s += &format!(
            "{:<12} {:>5} {:>10.1} {:>10.1} {:>10.1} {:>9.1} {:>10.0} {:>6} {:>9} {:>8} {:>9} {:>6}\n",
            x.mode.name(),
            x.depth,
            x.throughput_bytes_per_s / 1e6,
            x.write_latency_us.p50 / 1e3,
            x.write_latency_us.p99 / 1e3,
            x.reverse_packets_per_mib,
            x.reverse_bytes_per_mib,
            x.r2t_sent,
            x.pure_acks_sent,
            x.acks_held,
            x.acks_superseded,
            x.integrity_ok
        );
    }
    let find = |m: WanMode, d: usize| r.runs.iter().find(|x| x.mode == m && x.depth == d);
    let lo = r.runs.iter().map(|x| x.depth).min().unwrap_or(1);
    let hi = r.runs.iter().map(|x| x.depth).max().unwrap_or(1);
    if let (Some(a), Some(c)) = (find(WanMode::Accelerated, lo), find(WanMode::Classic, lo)) {
        s += &format!(
            "depth {lo}: accelerated write latency p50 {:.2}x classic\n",
            a.write_latency_us.p50 / c.write_latency_us.p50.max(1e-9)
        );
    }
    if let (Some(a), Some(c)) = (find(WanMode::Accelerated, hi), find(WanMode::Classic, hi)) {
        s += &format!(
            "depth {hi}: accelerated reverse packets/MiB {:.3}x classic, throughput {:.2}x \
             classic and {:.0}% of the forward link\n",
            a.reverse_packets_per_mib / c.reverse_packets_per_mib.max(1e-9),
            a.throughput_bytes_per_s / c.throughput_bytes_per_s.max(1e-9),
            100.0 * a.throughput_bytes_per_s / l.forward_bytes_per_s
        );
    }
    s
}

/// Throughput against queue depth, one line per mode, with the forward link for reference.
pub fn wan_chart(r: &WanReport, path: &std::path::Path) -> io::Result<()> {
    let mut c = Chart::new(
        "iSCSI writes over an asymmetric WAN: throughput against queue depth",
        Axis::new("queue depth (log2)", Scale::Log2, Ticks::Plain),
        Axis::new("throughput (MB/s, modeled)", Scale::Linear, Ticks::Plain),
    );
    for m in WanMode::ALL {
        let pts = r
            .runs
            .iter()
            .filter(|x| x.mode == m)
            .map(|x| (x.depth as f64, x.throughput_bytes_per_s / 1e6))
            .collect();
        c.series.push(Series::line(m.name(), pts));
    }
    c.hlines
        .push(("forward link".into(), r.link.forward_bytes_per_s / 1e6));
    write_svg(path, &c)
}
