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
    log: Vec<String>,
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
            log: Vec::new(),
            totals: Totals::default(),
        }
    }

    /// Connections in progress.
    pub fn sessions(&self) -> usize {
        self.sessions.len()
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
        let conn_machine = TargetConn::new(self.cfg.clone(), targets, challenge, id, tsih)
            .with_disk(self.disk.clone());
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
        while let Some(c) = d.accept(self.port) {
            let s = self.session(c);
            self.sessions.push(s);
            busy = true;
        }
        let mut i = 0;
        while i < self.sessions.len() {
            let s = &mut self.sessions[i];
            s.io.reap(d)?;
            busy |= s.flush(d)?;
            if s.out.len() - s.sent < MAX_PENDING_OUT && s.conn.ended().is_none() {
                let Session { io, conn, out, .. } = s;
                let took = io.recv(d, now, |data| {
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
        busy |= io.recv(d, now, |data| {
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
    /// The target's protocol counters.
    pub target: toe_iscsi::target::ConnStats,
    /// The wire's impairment counters, per receiving side (entry 1: initiator → target).
    pub wire: [toe_nic::impair::ImpairStats; 2],
    /// Wall-clock seconds the emulation took.
    pub wall_seconds: f64,
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
    use toe_iscsi::login::OpParams;
    let ([pa, pb], monitors) = toe_host::pair::wire_ports(wire)?;
    let sim = toe_host::pair::hosts(settings, settings, seed, pa, pb)?;
    sim.driver(1)
        .lock()
        .listen(3260, 16, None)
        .map_err(|e| io::Error::other(e.to_string()))?;
    let iqn = "iqn.2026-12.org.toemu:disk";
    let cfg = TargetConfig {
        target_name: iqn.into(),
        alias: Some("toemu".into()),
        portal_group_tag: 1,
        chap: None,
        mutual: None,
        params: OpParams {
            header_digest: "CRC32C,None".into(),
            data_digest: "CRC32C,None".into(),
            ..OpParams::default()
        },
        cmd_window: 32,
    };
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
    crate::serve::run_apps_sim(&sim, &mut perf, &mut target, u64::MAX)?;
    let wall_seconds = t0.elapsed().as_secs_f64();
    let report = perf.report().map_err(io::Error::other)?;
    Ok(WireRun {
        report,
        initiator_copies: mi.stats().snapshot().since(&bi),
        target_copies: mt.stats().snapshot().since(&bt),
        target: target.totals.stats,
        wire: toe_host::wire_opts::wire_stats(&monitors),
        wall_seconds,
    })
}
