//! iSCSI on an emulated TOE host: the target ([`TargetApp`]) and the `perf` initiator
//! ([`PerfApp`]) as poll-style apps ([`toemu_apps::App`]) over the host driver, so the same
//! machines that run on std TCP ([`TargetConn`], [`PerfMachine`]) run on a TAP device (real
//! Linux peers in a namespace) and on the in-memory wire on the virtual clock.
//!
//! The data path is software (`--offload software`): the driver indicates the received
//! stream, the app copies it into the machine, digests are computed on the host, and what the
//! machine emits is copied into send buffers. The NIC's iSCSI engine (the next step) takes
//! digests and data placement off the host.

use std::io;
use std::net::SocketAddrV4;
use std::sync::{Arc, Mutex};

use toe_bus::time::Instant;
use toe_driver::ConnState;
use toe_driver::Driver;
use toe_iscsi::initiator::InitiatorConn;
use toe_iscsi::login::TargetConfig;
use toe_iscsi::scsi::Disk;
use toe_iscsi::target::TargetConn;
use toemu_apps::{App, ConnIo, RxMode};

use crate::iscsi::{initiator_conn, IscsiUrl, Totals};
use crate::iscsi_perf::{PerfMachine, PerfOptions, PerfReport};

/// Output a connection may have waiting before the app stops reading its input (the
/// machine answers a read with its whole data: this bounds the host memory one initiator
/// can pin), bytes.
pub const MAX_PENDING_OUT: usize = 4 << 20;

/// Largest single send buffer, bytes.
const SEND_CHUNK: usize = 256 << 10;

struct Session {
    io: ConnIo,
    conn: TargetConn,
    out: Vec<u8>,
    sent: usize,
}

/// Send what a machine emitted (`out` from `*sent` on), as far as the send budget of `io`
/// allows. Returns true if anything went.
fn flush(io: &mut ConnIo, d: &mut Driver, out: &mut Vec<u8>, sent: &mut usize) -> io::Result<bool> {
    let mut any = false;
    while *sent < out.len() {
        let end = (*sent + SEND_CHUNK).min(out.len());
        if !io.send_copy(d, &out[*sent..end])? {
            break;
        }
        *sent = end;
        any = true;
    }
    if *sent == out.len() {
        out.clear();
        *sent = 0;
    }
    Ok(any)
}

impl Session {
    fn flush(&mut self, d: &mut Driver) -> io::Result<bool> {
        flush(&mut self.io, d, &mut self.out, &mut self.sent)
    }
}

/// The iSCSI target app: LUN 0 of every normal session is `disk`; discovery offers the
/// target at `portal`. The caller makes the driver listen on `port`.
pub struct TargetApp {
    port: u16,
    cfg: TargetConfig,
    portal: String,
    disk: Arc<Mutex<Disk>>,
    rng: u64,
    next_tsih: u16,
    sessions: Vec<Session>,
    keepalive: Option<toe_iscsi::target::KeepAlive>,
    log: Vec<String>,
    /// Asked to stop ([`App::stop`]): sessions were asked to log out, no new one is taken.
    stopping: bool,
    /// Counters of the connections that ended.
    pub totals: Totals,
}

impl std::fmt::Debug for TargetApp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetApp")
            .field("port", &self.port)
            .field("sessions", &self.sessions.len())
            .field("totals", &self.totals)
            .finish()
    }
}

impl TargetApp {
    /// A target for `cfg` on `port`, announcing itself at `portal` (`ADDR:PORT`). `seed`
    /// seeds the CHAP challenges (from the kernel's RNG in real use, fixed for replays).
    pub fn new(
        port: u16,
        cfg: TargetConfig,
        portal: &str,
        disk: Arc<Mutex<Disk>>,
        seed: u64,
    ) -> Self {
        let portal = format!("{portal},{}", cfg.portal_group_tag);
        TargetApp {
            port,
            cfg,
            portal,
            disk,
            rng: seed | 1,
            next_tsih: 1,
            sessions: Vec::new(),
            keepalive: None,
            log: Vec::new(),
            stopping: false,
            totals: Totals::default(),
        }
    }

    /// Connections whose iSCSI connection has not ended yet, or whose last PDUs the
    /// initiator has not acknowledged yet (their TCP close may still be under way).
    pub fn open_connections(&self) -> usize {
        self.sessions
            .iter()
            .filter(|s| s.conn.ended().is_none() || !s.out.is_empty() || s.io.outstanding() > 0)
            .count()
    }

    /// The NOP-In keep-alive on every connection, timed by the host's clock.
    pub fn with_keepalive(mut self, k: toe_iscsi::target::KeepAlive) -> Self {
        self.keepalive = Some(k);
        self
    }

    /// Connections in progress.
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// Protocol counters of every connection, ended and in progress.
    pub fn stats(&self) -> toe_iscsi::target::ConnStats {
        let mut s = self.totals.stats;
        for x in &self.sessions {
            s += x.conn.stats();
        }
        s
    }

    fn random(&mut self) -> u64 {
        // xorshift64*
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn session(&mut self, conn: toe_bus::ConnId) -> Session {
        let mut challenge = [0u8; 16];
        challenge[..8].copy_from_slice(&self.random().to_le_bytes());
        challenge[8..].copy_from_slice(&self.random().to_le_bytes());
        let id = self.random() as u8;
        let tsih = self.next_tsih;
        self.next_tsih = self.next_tsih.wrapping_add(1).max(1);
        let targets = vec![(self.cfg.target_name.clone(), self.portal.clone())];
        let mut conn_machine = TargetConn::new(self.cfg.clone(), targets, challenge, id, tsih)
            .with_disk(self.disk.clone());
        if let Some(k) = self.keepalive {
            conn_machine = conn_machine.with_keepalive(k);
        }
        Session {
            io: ConnIo::new(conn, RxMode::InPlace),
            conn: conn_machine,
            out: Vec::new(),
            sent: 0,
        }
    }
}

impl App for TargetApp {
    fn name(&self) -> &'static str {
        "iscsi-target"
    }

    fn poll(&mut self, d: &mut Driver, now: Instant) -> io::Result<bool> {
        let mut busy = false;
        while let Some(c) = (!self.stopping).then(|| d.accept(self.port)).flatten() {
            let s = self.session(c);
            self.sessions.push(s);
            busy = true;
        }
        let mut i = 0;
        while i < self.sessions.len() {
            let s = &mut self.sessions[i];
            s.io.reap(d)?;
            s.conn.poll(now.total_micros() as u64, &mut s.out);
            busy |= s.flush(d)?;
            if s.out.len() - s.sent < MAX_PENDING_OUT && s.conn.ended().is_none() {
                let Session { io, conn, out, .. } = s;
                let mem = d.memory().clone();
                let took = io.recv(d, now, |data| {
                    // The machine gathers PDUs in its own buffer: a copy out of host memory.
                    mem.count_copy_out(data.len());
                    conn.on_bytes(data, out);
                    data.len()
                })?;
                busy |= took > 0;
                busy |= s.flush(d)?;
            }
            let drained = s.out.is_empty() && s.io.outstanding() == 0;
            if (s.conn.ended().is_some() || s.io.eof(d)) && drained {
                s.io.close(d)?;
            }
            if s.io.try_release(d) {
                let s = self.sessions.swap_remove(i);
                self.totals.connections += 1;
                self.totals.stats += s.conn.stats();
                self.log.push(format!(
                    "iscsi-target: connection {} done ({}), {} bytes in, {} bytes out",
                    s.io.conn,
                    match s.conn.ended() {
                        Some(e) => format!("{e:?}"),
                        None => "closed by the initiator".into(),
                    },
                    s.io.rx_bytes,
                    s.io.tx_bytes
                ));
                busy = true;
                continue;
            }
            i += 1;
        }
        Ok(busy)
    }

    fn take_log(&mut self) -> Vec<String> {
        std::mem::take(&mut self.log)
    }

    /// Once stopping, done when every iSCSI connection has ended and the initiator has
    /// everything sent to it.
    fn done(&self) -> bool {
        self.stopping && self.open_connections() == 0
    }

    /// Ask every session in full-feature phase to log out within 5 s (an Async Message);
    /// the target then winds down as they do.
    fn stop(&mut self) -> bool {
        if !std::mem::replace(&mut self.stopping, true) {
            for s in &mut self.sessions {
                s.conn.request_logout(5, &mut s.out);
            }
        }
        true
    }
}

/// `toemu iscsi perf` on an emulated host: connects to the URL's portal, logs in, runs a
/// [`PerfMachine`] timed by the host's clock (virtual on the in-memory wire), logs out.
pub struct PerfApp {
    url: IscsiUrl,
    to: SocketAddrV4,
    random: [u8; 23],
    machine: PerfMachine,
    io: Option<ConnIo>,
    init: Option<InitiatorConn>,
    out: Vec<u8>,
    sent: usize,
    finished: bool,
    log: Vec<String>,
    /// Why the run could not complete, if it could not.
    pub error: Option<String>,
}

impl std::fmt::Debug for PerfApp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PerfApp")
            .field("to", &self.to)
            .field("finished", &self.finished)
            .field("error", &self.error)
            .finish()
    }
}

impl PerfApp {
    /// The load `o` against `url` (which names the target; the portal must be an IPv4
    /// `ADDR:PORT`). `random` supplies the ISID and CHAP challenge (seeded for replays).
    pub fn new(url: &IscsiUrl, o: PerfOptions, random: [u8; 23]) -> Result<Self, String> {
        let to: SocketAddrV4 = url.portal.parse().map_err(|_| {
            format!(
                "{}: an emulated host needs an IPv4 ADDR:PORT portal",
                url.portal
            )
        })?;
        let target = url
            .target
            .clone()
            .ok_or("the URL names no target (iscsi://host[:port]/IQN/LUN)")?;
        Ok(PerfApp {
            url: url.clone(),
            to,
            random,
            machine: PerfMachine::new(o, target, url.lun.unwrap_or(0)),
            io: None,
            init: None,
            out: Vec::new(),
            sent: 0,
            finished: false,
            log: Vec::new(),
            error: None,
        })
    }

    /// Bytes the initiator ran through CRC32C for digests (host software).
    pub fn digest_bytes(&self) -> u64 {
        self.init.as_ref().map_or(0, InitiatorConn::digest_bytes)
    }

    /// The figures (once done).
    pub fn report(&self) -> Result<PerfReport, String> {
        match &self.error {
            Some(e) => Err(e.clone()),
            None => self.machine.report(),
        }
    }
}

impl App for PerfApp {
    fn name(&self) -> &'static str {
        "iscsi-perf"
    }

    fn poll(&mut self, d: &mut Driver, now: Instant) -> io::Result<bool> {
        if self.finished {
            return Ok(false);
        }
        let us = now.total_micros() as u64;
        let io = match &mut self.io {
            Some(io) => io,
            None => {
                let c = d
                    .connect(self.to, 0, None)
                    .map_err(|e| io::Error::other(format!("connect {}: {e}", self.to)))?;
                self.io.insert(ConnIo::new(c, RxMode::InPlace))
            }
        };
        match d.state(io.conn) {
            Ok(ConnState::Connecting) => return Ok(false),
            Ok(ConnState::Reset | ConnState::Failed(_)) | Err(_) if !self.machine.done() => {
                self.error = Some(format!("the connection to {} failed or was reset", self.to));
                self.finished = io.try_release(d);
                return Ok(true);
            }
            _ => {}
        }
        let mut busy = false;
        let init = match &mut self.init {
            Some(i) => i,
            None => {
                let mut i = initiator_conn(&self.url, self.url.target.as_deref(), self.random);
                i.start(&mut self.out);
                busy = true;
                self.init.insert(i)
            }
        };
        io.reap(d)?;
        let out = &mut self.out;
        let mem = d.memory().clone();
        busy |= io.recv(d, now, |data| {
            // The machine gathers PDUs in its own buffer: a copy out of host memory.
            mem.count_copy_out(data.len());
            init.on_bytes(data, out);
            data.len()
        })? > 0;
        while let Some(e) = init.poll_event() {
            self.machine.on_event(e, init, us, &mut self.out);
            busy = true;
        }
        self.machine.poll(init, us, &mut self.out);
        busy |= flush(io, d, &mut self.out, &mut self.sent)?;
        if self.machine.done() && self.out.is_empty() && io.outstanding() == 0 {
            io.close(d)?;
            if io.try_release(d) {
                self.finished = true;
                self.log.push(format!(
                    "iscsi-perf: done, {} bytes out, {} bytes in",
                    io.tx_bytes, io.rx_bytes
                ));
                busy = true;
            }
        }
        Ok(busy)
    }

    fn take_log(&mut self) -> Vec<String> {
        std::mem::take(&mut self.log)
    }

    fn done(&self) -> bool {
        self.finished
    }
}

/// What [`run_on_wire`] measured.
#[derive(Debug, Clone)]
pub struct WireRun {
    /// The initiator's figures, in virtual time.
    pub report: PerfReport,
    /// Host memory traffic of the initiator's host over the run.
    pub initiator_copies: toe_bus::CopySnapshot,
    /// Host memory traffic of the target's host over the run.
    pub target_copies: toe_bus::CopySnapshot,
    /// The target's protocol counters (with its digest bytes).
    pub target: toe_iscsi::target::ConnStats,
    /// Bytes the initiator ran through CRC32C for digests.
    pub initiator_digest_bytes: u64,
    /// The wire's impairment counters, per receiving side (entry 1: initiator → target).
    pub wire: [toe_nic::impair::ImpairStats; 2],
    /// Wall-clock seconds the emulation took.
    pub wall_seconds: f64,
    /// The target's connections still open at the end (see
    /// [`TargetApp::open_connections`]; 0 once every session ended).
    pub target_open: usize,
}

/// [`App`] `inner`, asked to stop ([`App::stop`]) once the host's clock reaches `at`.
struct StopAt<'a> {
    inner: &'a mut dyn App,
    at: Option<Instant>,
}

impl App for StopAt<'_> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn poll(&mut self, d: &mut Driver, now: Instant) -> io::Result<bool> {
        if self.at.is_some_and(|at| now >= at) {
            self.at = None;
            self.inner.stop();
        }
        self.inner.poll(d, now)
    }
    fn take_log(&mut self) -> Vec<String> {
        self.inner.take_log()
    }
    fn done(&self) -> bool {
        self.inner.done()
    }
}

/// toemu's initiator on host 0 (10.0.0.1) against toemu's target on host 1 (10.0.0.2, port
/// 3260, LUN 0 a memory disk of `lun_bytes`) on the in-memory wire `wire`, on the virtual
/// clock: the load `o`, with header and data digests as `digests` says. Deterministic for a
/// given `seed`.
pub fn run_on_wire(
    settings: &toe_host::config::Settings,
    wire: &toe_host::wire_opts::WireOptions,
    seed: u64,
    lun_bytes: usize,
    digests: (bool, bool),
    o: PerfOptions,
) -> io::Result<WireRun> {
    run_on_wire_stopping(settings, wire, seed, lun_bytes, digests, o, None)
}

/// [`run_on_wire`], with the target asked to stop ([`App::stop`]: it asks its sessions to
/// log out) when the virtual clock reaches `stop_target_at`, if given.
pub fn run_on_wire_stopping(
    settings: &toe_host::config::Settings,
    wire: &toe_host::wire_opts::WireOptions,
    seed: u64,
    lun_bytes: usize,
    digests: (bool, bool),
    o: PerfOptions,
    stop_target_at: Option<Instant>,
) -> io::Result<WireRun> {
    let ([pa, pb], monitors) = toe_host::pair::wire_ports(wire)?;
    let sim = toe_host::pair::hosts(settings, settings, seed, pa, pb)?;
    sim.driver(1)
        .lock()
        .listen(3260, 16, None)
        .map_err(|e| io::Error::other(e.to_string()))?;
    let iqn = "iqn.2026-12.org.toemu:disk";
    let cfg = TargetConfig::offering_digests(iqn);
    let disk = Arc::new(Mutex::new(Disk::new(
        Box::new(toe_iscsi::scsi::MemStore::new(lun_bytes)),
        512,
        "TOEMU0001",
    )));
    let mut target = TargetApp::new(3260, cfg, "10.0.0.2:3260", disk, seed ^ 0x7a);
    let query = match digests {
        (false, false) => "",
        (true, false) => "?header_digest=crc32c",
        (false, true) => "?data_digest=crc32c",
        (true, true) => "?header_digest=crc32c&data_digest=crc32c",
    };
    let url: IscsiUrl = format!("iscsi://10.0.0.2:3260/{iqn}/0{query}")
        .parse()
        .map_err(io::Error::other)?;
    let mut random = [0u8; 23];
    for (i, b) in random.iter_mut().enumerate() {
        *b = (seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (i % 8 * 8)) as u8 ^ i as u8;
    }
    let mut perf = PerfApp::new(&url, o, random).map_err(io::Error::other)?;
    let mem = |i: usize| sim.with_host(i, |h| h.mem.clone());
    let (mi, mt) = (mem(0), mem(1));
    let (bi, bt) = (mi.stats().snapshot(), mt.stats().snapshot());
    let t0 = std::time::Instant::now();
    let mut stopping = StopAt {
        inner: &mut target,
        at: stop_target_at,
    };
    crate::serve::run_apps_sim(&sim, &mut perf, &mut stopping, u64::MAX)?;
    let wall_seconds = t0.elapsed().as_secs_f64();
    let report = perf.report().map_err(io::Error::other)?;
    Ok(WireRun {
        report,
        initiator_copies: mi.stats().snapshot().since(&bi),
        target_copies: mt.stats().snapshot().since(&bt),
        target: target.stats(),
        initiator_digest_bytes: perf.digest_bytes(),
        wire: toe_host::wire_opts::wire_stats(&monitors),
        wall_seconds,
        target_open: target.open_connections(),
    })
}

/// One row of `toemu iscsi bench`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchRow {
    /// `read` or `write`.
    pub op: &'static str,
    /// Bytes per I/O.
    pub io_bytes: u32,
    /// Queue depth.
    pub depth: usize,
    /// Header and data digests (CRC32C) on.
    pub digests: bool,
    /// Commands completed.
    pub ios: u64,
    /// Commands per second of modeled (virtual) time.
    pub modeled_iops: f64,
    /// Data megabytes (10^6) per second of modeled time.
    pub modeled_mb_per_s: f64,
    /// Command latency in modeled time, µs.
    pub modeled_latency_us: crate::demo::Latency,
    /// Host memory traffic of the initiator's host per data byte: DMA into and out of host
    /// memory, driver copies, and copies between host buffers and the iSCSI machine.
    pub initiator_copies_per_byte: f64,
    /// The same on the target's host.
    pub target_copies_per_byte: f64,
    /// Bytes the initiator's host ran through CRC32C per data byte.
    pub initiator_digest_bytes_per_byte: f64,
    /// The same on the target's host.
    pub target_digest_bytes_per_byte: f64,
    /// Wall-clock seconds the emulation took (the emulator's speed, not the model's).
    pub wall_seconds: f64,
}

/// What the bench models: the machine its figures describe.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchModel {
    /// Wire rate, bits per second.
    pub wire_bits_per_s: u64,
    /// One-way wire delay, µs.
    pub wire_delay_us: u64,
    /// One-way bus latency of commands and events, µs.
    pub bus_latency_us: u64,
    /// What the model leaves out.
    pub not_modeled: &'static str,
}

/// `toemu iscsi bench`: toemu's initiator against toemu's target on two emulated hosts on
/// the in-memory wire, on the virtual clock, software data path: 4 KiB and 128 KiB at QD32,
/// reads and writes, without and with header and data digests. `base` supplies the host
/// settings (its bus latency is raised to the model's 2 µs if lower). `each` sees every row
/// as it is measured.
pub fn bench(
    base: &toe_host::config::Settings,
    mut each: impl FnMut(&BenchRow),
) -> io::Result<(BenchModel, Vec<BenchRow>)> {
    let model = BenchModel {
        wire_bits_per_s: 25_000_000_000,
        wire_delay_us: 2,
        bus_latency_us: base.bus_latency_us.max(2),
        not_modeled: "host CPU time (copies, digests, protocol processing) takes no virtual time: \
                      those costs are reported as bytes per data byte",
    };
    let mut settings = base.clone();
    settings.bus_latency_us = model.bus_latency_us;
    let wire = toe_host::wire_opts::WireOptions {
        impair: toe_nic::impair::ImpairConfig {
            delay: toe_bus::time::Duration::from_micros(model.wire_delay_us),
            rate_bits_per_s: Some(model.wire_bits_per_s),
            ..toe_nic::impair::ImpairConfig::default()
        },
        pcap: None,
    };
    let mut rows = Vec::new();
    for digests in [false, true] {
        for (io, bytes) in [(4096u32, 32u64 << 20), (128 << 10, 256 << 20)] {
            for write in [false, true] {
                let o = PerfOptions {
                    io_bytes: io,
                    depth: 32,
                    bytes: Some(bytes),
                    write,
                    ..PerfOptions::default()
                };
                let r = run_on_wire(&settings, &wire, 11, 256 << 20, (digests, digests), o)?;
                let p = r
                    .report
                    .phases
                    .first()
                    .ok_or_else(|| io::Error::other("no phase"))?;
                let data = p.bytes.max(1) as f64;
                let traffic = |c: &toe_bus::CopySnapshot| {
                    (c.dma_write_bytes
                        + c.dma_read_bytes
                        + c.host_copy_bytes
                        + c.copy_out_bytes
                        + c.copy_in_bytes) as f64
                        / data
                };
                let row = BenchRow {
                    op: p.op,
                    io_bytes: io,
                    depth: 32,
                    digests,
                    ios: p.ios,
                    modeled_iops: p.iops,
                    modeled_mb_per_s: p.mb_per_s,
                    modeled_latency_us: p.latency_us,
                    initiator_copies_per_byte: traffic(&r.initiator_copies),
                    target_copies_per_byte: traffic(&r.target_copies),
                    initiator_digest_bytes_per_byte: r.initiator_digest_bytes as f64 / data,
                    target_digest_bytes_per_byte: r.target.digest_bytes as f64 / data,
                    wall_seconds: r.wall_seconds,
                };
                each(&row);
                rows.push(row);
            }
        }
    }
    Ok((model, rows))
}

/// The bench's rows as a table.
pub fn bench_table(model: &BenchModel, rows: &[BenchRow]) -> String {
    let mut t = format!(
        "toemu iscsi bench: initiator and target on emulated TOE hosts, software data path; modeled: {} Gbit/s wire, {} us one way, bus {} us\n\
         ({})\n\n",
        model.wire_bits_per_s / 1_000_000_000,
        model.wire_delay_us,
        model.bus_latency_us,
        model.not_modeled
    );
    t.push_str(&format!(
        "{:<6} {:>7} {:>3} {:>8} {:>11} {:>10} {:>9} {:>9} {:>12} {:>12} {:>12} {:>12} {:>7}\n",
        "op",
        "I/O",
        "QD",
        "digests",
        "IOPS (mod)",
        "MB/s (mod)",
        "p50 us",
        "p99 us",
        "init copy/B",
        "tgt copy/B",
        "init crc/B",
        "tgt crc/B",
        "wall s"
    ));
    for r in rows {
        t.push_str(&format!(
            "{:<6} {:>7} {:>3} {:>8} {:>11.0} {:>10.1} {:>9.1} {:>9.1} {:>12.2} {:>12.2} {:>12.2} {:>12.2} {:>7.2}\n",
            r.op,
            if r.io_bytes >= 1024 { format!("{}K", r.io_bytes / 1024) } else { r.io_bytes.to_string() },
            r.depth,
            if r.digests { "hdr+data" } else { "none" },
            r.modeled_iops,
            r.modeled_mb_per_s,
            r.modeled_latency_us.p50,
            r.modeled_latency_us.p99,
            r.initiator_copies_per_byte,
            r.target_copies_per_byte,
            r.initiator_digest_bytes_per_byte,
            r.target_digest_bytes_per_byte,
            r.wall_seconds
        ));
    }
    t
}
