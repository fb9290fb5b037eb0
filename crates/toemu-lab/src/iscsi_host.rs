//! iSCSI on an emulated TOE host: the target ([`TargetApp`]) and the `perf` initiator
//! ([`PerfApp`]) as poll-style apps ([`toemu_apps::App`]) over the host driver, so the same
//! machines that run on std TCP ([`TargetConn`], [`PerfMachine`]) run on a TAP device (real
//! Linux peers in a namespace) and on the in-memory wire on the virtual clock.
//!
//! Two data paths ([`Offload`]), the session code the same on both
//! ([`toe_iscsi::offload::Offloaded`] under the machines):
//!
//! - `engine` (the default): after the software login the connection is offloaded to the
//!   NIC's iSCSI engine, which checks and computes the digests, places Data-In, Data-Out and
//!   R2T-solicited data straight into the task's buffer, and cuts a read's or a write's data
//!   into PDUs itself. The host copies each data byte once, between its application buffer
//!   and host memory.
//! - `software`: the driver indicates the received stream, the app copies it into the
//!   machine, digests are computed on the host, and what the machine emits is copied into
//!   send buffers.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddrV4;
use std::sync::{Arc, Mutex};

use toe_bus::time::Instant;
use toe_bus::ConnId;
use toe_driver::{ConnState, Driver, UlpNote};
use toe_iscsi::initiator::{InitiatorConn, InitiatorEvent};
use toe_iscsi::login::TargetConfig;
use toe_iscsi::offload::{NicOp, Offloaded};
use toe_iscsi::scsi::Disk;
use toe_iscsi::target::TargetConn;
use toemu_apps::{App, ConnIo, RxMode};

use crate::iscsi::{initiator_conn_with, IscsiUrl, Totals};
use crate::iscsi_perf::{PerfMachine, PerfOptions, PerfReport};

/// The data path of an emulated host's iSCSI connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Offload {
    /// The NIC's iSCSI engine after the software login.
    #[default]
    Engine,
    /// Host software throughout.
    Software,
}

impl Offload {
    /// The transport of a new connection on a host with memory `mem`.
    fn transport(self, mem: Arc<toe_bus::HostMemory>) -> Offloaded {
        match self {
            Offload::Engine => Offloaded::engine(mem),
            Offload::Software => Offloaded::software(mem),
        }
    }

    /// The name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Offload::Engine => "engine",
            Offload::Software => "software",
        }
    }
}

impl std::str::FromStr for Offload {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "engine" => Ok(Offload::Engine),
            "software" => Ok(Offload::Software),
            _ => Err(format!("{s}: the data path is engine or software")),
        }
    }
}

/// How a connection's data path went, for the log.
fn data_path(t: &Offloaded) -> String {
    let s = t.stats();
    if s.offloads == 0 {
        return "data path software".into();
    }
    format!(
        "data path engine ({} offload requests, {} buffers registered, {} returned, {} recalled, {} send requests)",
        s.offloads, s.registered, s.returned, s.recalls, s.requests
    )
}

/// Carry the NIC's side of connection `conn`'s transport `t`: the slot's notes in, then
/// (unless `plain_first`: plain bytes the machine emitted before them still wait to be
/// handed to the driver) its requests out. Returns whether anything happened.
fn nic_exchange(
    t: &mut Offloaded,
    d: &mut Driver,
    conn: ConnId,
    plain_first: bool,
) -> io::Result<bool> {
    let err = |e: toe_driver::DriverError| io::Error::other(e.to_string());
    let mut any = false;
    while let Some(n) = d.take_ulp(conn).map_err(err)? {
        any = true;
        match n {
            UlpNote::Started { stream_offset } => t.started(stream_offset),
            UlpNote::Refused {
                position,
                stale,
                error,
            } => t.refused(position, stale, &error),
            UlpNote::Released { tag, buf, .. } => {
                if let Some(b) = t.released(tag, buf) {
                    d.free(b);
                }
            }
            UlpNote::Error(e) => t.engine_error(&e),
        }
    }
    if plain_first {
        return Ok(any);
    }
    for op in t.take_ops() {
        any = true;
        let done = match op {
            NicOp::Offload { params, carry } => d
                .ulp_offload(conn, toe_iscsi::engine::ENGINE_NAME, params, carry)
                .map(|_| ()),
            NicOp::Register { tag, buf } => d.ulp_register(conn, tag, buf).map_err(|r| {
                d.free(r.buf);
                r.error
            }),
            NicOp::Release { tag } => d.ulp_release(conn, tag),
            NicOp::Send(request) => d.ulp_send(conn, request),
        };
        if let Err(e) = done {
            t.engine_error(&e.to_string());
        }
    }
    Ok(any)
}

/// Output a connection may have waiting before the app stops reading its input (the
/// machine answers a read with its whole data: this bounds the host memory one initiator
/// can pin), bytes.
pub const MAX_PENDING_OUT: usize = 4 << 20;

/// Largest single send buffer, bytes.
const SEND_CHUNK: usize = 256 << 10;

struct Session {
    io: ConnIo,
    conn: TargetConn<Offloaded>,
    out: Vec<u8>,
    sent: usize,
    /// The ACK hold the NIC was last asked for (write acceleration).
    ack_hold: Option<u32>,
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

    /// The NIC's side of the connection (see [`nic_exchange`]), and records that waited
    /// for a buffer, or a failure of the engine, to the machine.
    fn exchange(&mut self, d: &mut Driver) -> io::Result<bool> {
        let plain_first = !self.out.is_empty();
        let mut any = nic_exchange(self.conn.transport_mut(), d, self.io.conn, plain_first)?;
        if self.conn.ended().is_none() && self.conn.transport().needs_delivery() {
            self.conn.on_bytes(&[], &mut self.out);
            any = true;
        }
        Ok(any)
    }
}

/// The iSCSI target app: LUN 0 of every normal session is `disk`; discovery offers the
/// target at `portal`. The caller makes the driver listen on `port`.
pub struct TargetApp {
    port: u16,
    cfg: TargetConfig,
    portal: String,
    disk: Arc<Mutex<Disk>>,
    offload: Offload,
    rng: u64,
    next_tsih: u16,
    sessions: Vec<Session>,
    keepalive: Option<toe_iscsi::target::KeepAlive>,
    log: Vec<String>,
    /// Asked to stop ([`App::stop`]): sessions were asked to log out, no new one is taken.
    stopping: bool,
    /// Counters of the connections that ended.
    pub totals: Totals,
    /// Host software work already charged to the host CPU (cost model).
    charged: HostWork,
    /// Write acceleration for sessions that negotiate it.
    accel: toe_iscsi::accel::AccelConfig,
    /// The write-back model's destage rate, bytes per second, if any.
    destage: Option<u64>,
    /// Proxy mode (the front of a cluster's primary): READs and WRITEs go to the hub.
    proxy: Option<crate::cluster::SharedHub>,
    /// Its connections' [`toe_iscsi::target::ConnStats::copy_bytes`], for readers on
    /// other threads (updated each pass).
    copies: Arc<std::sync::atomic::AtomicU64>,
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
            offload: Offload::default(),
            rng: seed | 1,
            next_tsih: 1,
            sessions: Vec::new(),
            keepalive: None,
            log: Vec::new(),
            stopping: false,
            totals: Totals::default(),
            charged: HostWork::default(),
            accel: toe_iscsi::accel::AccelConfig::default(),
            destage: None,
            proxy: None,
            copies: Arc::default(),
        }
    }

    /// The front of a cluster's primary: `disk` (given to [`TargetApp::new`]) is the
    /// volume's, and the blocks of READs and WRITEs are moved by the proxy behind `hub`
    /// (see [`toe_iscsi::target::TargetConn::with_proxy`]).
    pub fn with_proxy(mut self, hub: crate::cluster::SharedHub) -> Self {
        self.proxy = Some(hub);
        self
    }

    /// A write-back target whose store takes `bytes_per_s` (see
    /// [`TargetConn::with_destage`]).
    pub fn with_destage(mut self, bytes_per_s: u64) -> Self {
        self.destage = Some(bytes_per_s);
        self
    }

    /// The write-acceleration policy of sessions that negotiate it (the target accepts
    /// the key if its configuration's `write_acceleration` says so).
    pub fn with_accel(mut self, a: toe_iscsi::accel::AccelConfig) -> Self {
        self.accel = a;
        self
    }

    /// Connections whose iSCSI connection has not ended yet, or whose last PDUs the
    /// initiator has not acknowledged yet (their TCP close may still be under way).
    pub fn open_connections(&self) -> usize {
        self.sessions
            .iter()
            .filter(|s| s.conn.ended().is_none() || !s.out.is_empty() || s.io.outstanding() > 0)
            .count()
    }

    /// Data bytes its connections' transports copied in application memory so far
    /// ([`toe_iscsi::target::ConnStats::copy_bytes`]), readable while it runs elsewhere.
    pub fn copy_counter(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.copies.clone()
    }

    /// The data path of its connections (the NIC's engine by default).
    pub fn with_offload(mut self, o: Offload) -> Self {
        self.offload = o;
        self
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

    fn session(&mut self, conn: ConnId, mem: Arc<toe_bus::HostMemory>) -> Session {
        let mut challenge = [0u8; 16];
        challenge[..8].copy_from_slice(&self.random().to_le_bytes());
        challenge[8..].copy_from_slice(&self.random().to_le_bytes());
        let id = self.random() as u8;
        let tsih = self.next_tsih;
        self.next_tsih = self.next_tsih.wrapping_add(1).max(1);
        let targets = vec![(self.cfg.target_name.clone(), self.portal.clone())];
        let io = self.offload.transport(mem);
        let mut conn_machine = TargetConn::over(io, self.cfg.clone(), targets, challenge, id, tsih)
            .with_disk(self.disk.clone())
            .with_accel(self.accel);
        if let Some(rate) = self.destage {
            conn_machine = conn_machine.with_destage(rate);
        }
        if let Some(k) = self.keepalive {
            conn_machine = conn_machine.with_keepalive(k);
        }
        if self.proxy.is_some() {
            conn_machine = conn_machine.with_proxy();
        }
        Session {
            io: ConnIo::new(conn, RxMode::InPlace),
            conn: conn_machine,
            out: Vec::new(),
            sent: 0,
            ack_hold: None,
        }
    }
}

impl TargetApp {
    /// One pass over the listener and every session.
    fn serve(&mut self, d: &mut Driver, now: Instant) -> io::Result<bool> {
        let mut busy = false;
        while let Some(c) = (!self.stopping).then(|| d.accept(self.port)).flatten() {
            let s = self.session(c, d.memory().clone());
            self.sessions.push(s);
            busy = true;
        }
        let mut i = 0;
        while i < self.sessions.len() {
            let s = &mut self.sessions[i];
            s.io.reap(d)?;
            busy |= s.exchange(d)?;
            s.conn.poll(now.total_micros() as u64, &mut s.out);
            busy |= s.flush(d)?;
            if s.out.len() - s.sent < MAX_PENDING_OUT
                && s.conn.ended().is_none()
                && s.conn.transport().wants_input()
            {
                let Session { io, conn, out, .. } = s;
                let took = io.recv(d, now, |data| {
                    // In place: the transport counts what it copies out of host memory.
                    conn.on_bytes(data, out);
                    data.len()
                })?;
                busy |= took > 0;
                busy |= s.flush(d)?;
            }
            if let Some(hub) = &self.proxy {
                // Requests to the proxy, its answers back (their Data-In goes out now).
                let id = u64::from(s.io.conn.0);
                let mut h = hub.lock().expect("hub lock");
                h.from_front(id, &mut s.conn);
                for a in h.take_answers(id) {
                    busy = true;
                    let Some((buf, len)) = a.host else {
                        s.conn.proxy_done(a.itt, a.outcome, &mut s.out);
                        continue;
                    };
                    // A read's data in host memory goes out from there.
                    if let Err((b, mut o)) =
                        s.conn
                            .proxy_done_host(a.itt, a.outcome, (buf, len), &mut s.out)
                    {
                        o.data_in = crate::cluster::copy_out(d.memory(), b, len);
                        s.conn.proxy_done(a.itt, o, &mut s.out);
                    }
                }
            }
            busy |= s.exchange(d)?;
            busy |= s.flush(d)?;
            // Write acceleration: the NIC holds pure ACKs while the session wants it.
            let hold = s.conn.ack_hold_us();
            if hold != s.ack_hold && s.conn.ended().is_none() {
                s.ack_hold = hold;
                let h = hold.map(|window_us| toe_bus::AckHold { window_us });
                d.set_ack_hold(s.io.conn, h)
                    .map_err(|e| io::Error::other(e.to_string()))?;
            }
            let drained = s.out.is_empty() && s.io.outstanding() == 0;
            if (s.conn.ended().is_some() || s.io.eof(d)) && drained {
                s.io.close(d)?;
            }
            if s.io.try_release(d) {
                let s = self.sessions.swap_remove(i);
                if let Some(hub) = &self.proxy {
                    hub.lock()
                        .expect("hub lock")
                        .front_ended(u64::from(s.io.conn.0));
                }
                self.totals.connections += 1;
                self.totals.stats += s.conn.stats();
                self.log.push(format!(
                    "iscsi-target: connection {} done ({}), {} bytes in, {} bytes out, {}",
                    s.io.conn,
                    match s.conn.ended() {
                        Some(e) => format!("{e:?}"),
                        None => "closed by the initiator".into(),
                    },
                    s.io.rx_bytes,
                    s.io.tx_bytes,
                    data_path(s.conn.transport())
                ));
                busy = true;
                continue;
            }
            i += 1;
        }
        Ok(busy)
    }
}

impl App for TargetApp {
    fn name(&self) -> &'static str {
        "iscsi-target"
    }

    fn poll(&mut self, d: &mut Driver, now: Instant) -> io::Result<bool> {
        let r = self.serve(d, now);
        let st = self.stats();
        self.charged.charge(d, now, st.digest_bytes, st.copy_bytes);
        self.copies
            .store(st.copy_bytes, std::sync::atomic::Ordering::Relaxed);
        r
    }

    fn take_log(&mut self) -> Vec<String> {
        std::mem::take(&mut self.log)
    }

    fn poll_at(&self) -> Option<Instant> {
        // The proxy's answers go out at once.
        if let Some(hub) = &self.proxy {
            if hub.lock().expect("hub lock").has_answers() {
                return Some(Instant::from_micros(0));
            }
        }
        let t = self
            .sessions
            .iter()
            .filter_map(|s| s.conn.next_deadline())
            .min()?;
        Some(Instant::from_micros(t as i64))
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
    link: InitiatorLink,
    machine: PerfMachine,
    finished: bool,
    log: Vec<String>,
    /// Why the run could not complete, if it could not.
    pub error: Option<String>,
    /// Host software work already charged to the host CPU (cost model).
    charged: HostWork,
}

/// One initiator connection of an emulated host to a portal: connects, logs in (the
/// software login), offloads to the NIC's engine if asked, and moves the bytes between
/// the machine and the driver.
pub(crate) struct InitiatorLink {
    url: IscsiUrl,
    pub(crate) to: SocketAddrV4,
    random: [u8; 23],
    offload: Offload,
    io: Option<ConnIo>,
    pub(crate) init: Option<InitiatorConn<Offloaded>>,
    out: Vec<u8>,
    sent: usize,
    /// What the initiator offers at login, if not toemu's usual offer.
    params: Option<toe_iscsi::login::OpParams>,
    /// The initiator's write-acceleration settings.
    accel: toe_iscsi::accel::InitiatorAccel,
}

/// Where an [`InitiatorLink`]'s connection stands after a pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LinkState {
    /// The TCP handshake is under way.
    Connecting,
    /// The TCP connection failed or was reset.
    Broken,
    /// Connected; the machine runs.
    Up,
}

impl InitiatorLink {
    /// A link to `url`'s portal (an IPv4 `ADDR:PORT`), logging in to `target`.
    pub(crate) fn new(url: &IscsiUrl, random: [u8; 23]) -> Result<Self, String> {
        let to: SocketAddrV4 = url.portal.parse().map_err(|_| {
            format!(
                "{}: an emulated host needs an IPv4 ADDR:PORT portal",
                url.portal
            )
        })?;
        Ok(InitiatorLink {
            url: url.clone(),
            to,
            random,
            offload: Offload::default(),
            io: None,
            init: None,
            out: Vec::new(),
            sent: 0,
            params: None,
            accel: toe_iscsi::accel::InitiatorAccel::default(),
        })
    }

    /// One pass: connect (first), start the login once connected, then move bytes, with
    /// `drive` called in the middle to handle the machine's events and feed it (it is
    /// given the machine, the time in µs and the output buffer).
    pub(crate) fn pump(
        &mut self,
        d: &mut Driver,
        now: Instant,
        drive: impl FnOnce(&mut InitiatorConn<Offloaded>, u64, &mut Vec<u8>),
    ) -> io::Result<(LinkState, bool)> {
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
            Ok(ConnState::Connecting) => return Ok((LinkState::Connecting, false)),
            Ok(ConnState::Reset | ConnState::Failed(_)) | Err(_) => {
                return Ok((LinkState::Broken, false))
            }
            _ => {}
        }
        let mut busy = false;
        let init = match &mut self.init {
            Some(i) => i,
            None => {
                let t = self.offload.transport(d.memory().clone());
                let target = self.url.target.as_deref();
                let mut i =
                    initiator_conn_with(t, &self.url, target, self.random, self.params.clone())
                        .with_accel(self.accel);
                i.start(&mut self.out);
                busy = true;
                self.init.insert(i)
            }
        };
        io.reap(d)?;
        init.poll(us, &mut self.out);
        let out = &mut self.out;
        let conn = io.conn;
        let exchange = move |init: &mut InitiatorConn<Offloaded>,
                             d: &mut Driver,
                             out: &mut Vec<u8>|
              -> io::Result<bool> {
            let mut any = nic_exchange(init.transport_mut(), d, conn, !out.is_empty())?;
            if !init.ended() && init.transport().needs_delivery() {
                init.on_bytes(&[], out);
                any = true;
            }
            Ok(any)
        };
        busy |= exchange(init, d, out)?;
        if init.transport().wants_input() {
            busy |= io.recv(d, now, |data| {
                // In place: the transport counts what it copies out of host memory.
                init.on_bytes(data, out);
                data.len()
            })? > 0;
        }
        drive(init, us, &mut self.out);
        busy |= flush(io, d, &mut self.out, &mut self.sent)?;
        busy |= exchange(init, d, &mut self.out)?;
        busy |= flush(io, d, &mut self.out, &mut self.sent)?;
        Ok((LinkState::Up, busy))
    }

    /// Close the connection once everything sent was acknowledged; true once it is
    /// released (the link is over).
    pub(crate) fn close(&mut self, d: &mut Driver) -> io::Result<bool> {
        let Some(io) = &mut self.io else {
            return Ok(true);
        };
        if !self.out.is_empty() || io.outstanding() > 0 {
            return Ok(false);
        }
        io.close(d)?;
        Ok(io.try_release(d))
    }

    /// Drop the connection at once (a reset to the peer); what was in flight is gone.
    pub(crate) fn abort(&self, d: &mut Driver) {
        if let Some(io) = &self.io {
            let _ = d.abort(io.conn);
        }
    }

    /// Release a broken connection's resources; true once released.
    pub(crate) fn release(&mut self, d: &mut Driver) -> bool {
        self.io.as_mut().is_none_or(|io| io.try_release(d))
    }

    /// Bytes out and in, and the data path, for the log.
    pub(crate) fn summary(&self) -> String {
        let (tx, rx) = self
            .io
            .as_ref()
            .map_or((0, 0), |io| (io.tx_bytes, io.rx_bytes));
        let path = self
            .init
            .as_ref()
            .map_or_else(|| "no session".into(), |i| data_path(i.transport()));
        format!("{tx} bytes out, {rx} bytes in, {path}")
    }
}

impl std::fmt::Debug for PerfApp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PerfApp")
            .field("to", &self.link.to)
            .field("finished", &self.finished)
            .field("error", &self.error)
            .finish()
    }
}

impl PerfApp {
    /// The load `o` against `url` (which names the target; the portal must be an IPv4
    /// `ADDR:PORT`). `random` supplies the ISID and CHAP challenge (seeded for replays).
    pub fn new(url: &IscsiUrl, o: PerfOptions, random: [u8; 23]) -> Result<Self, String> {
        let link = InitiatorLink::new(url, random)?;
        let target = url
            .target
            .clone()
            .ok_or("the URL names no target (iscsi://host[:port]/IQN/LUN)")?;
        Ok(PerfApp {
            link,
            machine: PerfMachine::new(o, target, url.lun.unwrap_or(0)),
            finished: false,
            log: Vec::new(),
            error: None,
            charged: HostWork::default(),
        })
    }

    /// Offer `p` at login in place of toemu's usual offer (the URL's digests still
    /// apply); with `p.write_acceleration`, `a` sets the initiator's side of it.
    pub fn with_params(
        mut self,
        p: toe_iscsi::login::OpParams,
        a: toe_iscsi::accel::InitiatorAccel,
    ) -> Self {
        self.link.params = Some(p);
        self.link.accel = a;
        self
    }

    /// The initiator's write-acceleration counters.
    pub fn accel_stats(&self) -> toe_iscsi::initiator::AccelStats {
        self.link
            .init
            .as_ref()
            .map(InitiatorConn::accel_stats)
            .unwrap_or_default()
    }

    /// The data path (the NIC's engine by default).
    pub fn with_offload(mut self, o: Offload) -> Self {
        self.link.offload = o;
        self
    }

    /// Bytes the initiator ran through CRC32C for digests (host software).
    pub fn digest_bytes(&self) -> u64 {
        self.link
            .init
            .as_ref()
            .map_or(0, InitiatorConn::digest_bytes)
    }

    /// Data bytes the initiator's transport copied within application memory.
    pub fn copy_bytes(&self) -> u64 {
        self.link.init.as_ref().map_or(0, InitiatorConn::copy_bytes)
    }

    /// The figures (once done).
    pub fn report(&self) -> Result<PerfReport, String> {
        match &self.error {
            Some(e) => Err(e.clone()),
            None => self.machine.report(),
        }
    }
}

impl PerfApp {
    /// One pass: connect, log in, run the machine, log out.
    fn run(&mut self, d: &mut Driver, now: Instant) -> io::Result<bool> {
        if self.finished {
            return Ok(false);
        }
        let machine = &mut self.machine;
        let (state, mut busy) = self.link.pump(d, now, |init, us, out| {
            while let Some(e) = init.poll_event() {
                machine.on_event(e, init, us, out);
            }
            machine.poll(init, us, out);
        })?;
        match state {
            LinkState::Connecting => return Ok(false),
            LinkState::Broken => {
                if !self.machine.done() {
                    self.error = Some(format!(
                        "the connection to {} failed or was reset",
                        self.link.to
                    ));
                }
                self.finished = self.link.release(d);
                return Ok(true);
            }
            _ => {}
        }
        if self.machine.done() && self.link.close(d)? {
            self.finished = true;
            self.log
                .push(format!("iscsi-perf: done, {}", self.link.summary()));
            busy = true;
        }
        Ok(busy)
    }
}

impl App for PerfApp {
    fn name(&self) -> &'static str {
        "iscsi-perf"
    }

    fn poll_at(&self) -> Option<Instant> {
        let init = self
            .link
            .init
            .as_ref()
            .and_then(InitiatorConn::next_deadline);
        let t = [init, self.machine.deadline()]
            .into_iter()
            .flatten()
            .min()?;
        Some(Instant::from_micros(t as i64))
    }

    fn poll(&mut self, d: &mut Driver, now: Instant) -> io::Result<bool> {
        let r = self.run(d, now);
        let (crc, copy) = (self.digest_bytes(), self.copy_bytes());
        self.charged.charge(d, now, crc, copy);
        r
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
    /// Work charged by the cost model over the whole run (login included), µs: per host
    /// (initiator, target), its host CPU and its NIC.
    pub modeled_busy_us: [[f64; 2]; 2],
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
    /// Data bytes the initiator's transport copied within application memory (the
    /// target's are in [`WireRun::target`]).
    pub initiator_copy_bytes: u64,
    /// The wire's impairment counters, per receiving side (entry 1: initiator → target).
    pub wire: [toe_nic::impair::ImpairStats; 2],
    /// Wall-clock seconds the emulation took.
    pub wall_seconds: f64,
    /// Wall-clock seconds each host spent in its driver and its application (initiator,
    /// target): host CPU, measured; the NICs' and the wire's emulation is not in it.
    pub host_cpu_seconds: [f64; 2],
    /// The target's connections still open at the end (see
    /// [`TargetApp::open_connections`]; 0 once every session ended).
    pub target_open: usize,
}

/// Host software work (bytes through CRC32C, bytes copied within application memory) that
/// was charged to the host CPU of the cost model; [`HostWork::charge`] charges the growth.
#[derive(Debug, Default, Clone, Copy)]
struct HostWork {
    crc_bytes: u64,
    copy_bytes: u64,
}

impl HostWork {
    /// Charge what the totals `crc_bytes` and `copy_bytes` grew by since the last call.
    fn charge(&mut self, d: &mut Driver, now: Instant, crc_bytes: u64, copy_bytes: u64) {
        let crc = crc_bytes.saturating_sub(self.crc_bytes);
        let copy = copy_bytes.saturating_sub(self.copy_bytes);
        if crc + copy > 0 {
            d.charge_app(now, crc, copy);
        }
        *self = HostWork {
            crc_bytes,
            copy_bytes,
        };
    }
}

/// [`App`] `inner`, asked to stop ([`App::stop`]) once the host's clock reaches `at`, with
/// the wall-clock time its polls take added up in `cpu` (host CPU, measured).
struct Measured<'a> {
    inner: &'a mut dyn App,
    at: Option<Instant>,
    cpu: std::time::Duration,
}

impl App for Measured<'_> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn poll(&mut self, d: &mut Driver, now: Instant) -> io::Result<bool> {
        if self.at.is_some_and(|at| now >= at) {
            self.at = None;
            self.inner.stop();
        }
        let t0 = std::time::Instant::now();
        let r = self.inner.poll(d, now);
        self.cpu += t0.elapsed();
        r
    }
    fn take_log(&mut self) -> Vec<String> {
        self.inner.take_log()
    }
    fn done(&self) -> bool {
        self.inner.done()
    }
    fn poll_at(&self) -> Option<Instant> {
        [self.inner.poll_at(), self.at].into_iter().flatten().min()
    }
}

/// How [`run_on_wire`] sets the two hosts up.
#[derive(Debug, Clone, Copy)]
pub struct WireSpec {
    /// Seeds everything random (deterministic runs).
    pub seed: u64,
    /// LUN 0's size, bytes (a memory disk).
    pub lun_bytes: usize,
    /// Header and data digests (CRC32C) asked for.
    pub digests: (bool, bool),
    /// The data path of both ends.
    pub offload: Offload,
    /// Ask the target to stop ([`App::stop`]: it asks its sessions to log out) when the
    /// virtual clock reaches this.
    pub stop_target_at: Option<Instant>,
}

impl Default for WireSpec {
    fn default() -> Self {
        WireSpec {
            seed: 7,
            lun_bytes: 32 << 20,
            digests: (false, false),
            offload: Offload::default(),
            stop_target_at: None,
        }
    }
}

/// Two hosts on `ports` for an iSCSI run on the virtual clock: host 0 (10.0.0.1) for the
/// initiator, host 1 (10.0.0.2) listening on port 3260 for the target, both NICs carrying
/// the iSCSI engine, both measuring their driver's wall-clock CPU time.
pub fn iscsi_hosts(
    settings: &toe_host::config::Settings,
    [pa, pb]: [toe_host::runtime::BoxPhy; 2],
    seed: u64,
) -> io::Result<toe_host::runtime::Sim> {
    let sim = toe_host::pair::hosts(settings, settings, seed, pa, pb)?;
    for i in 0..2 {
        sim.with_host(i, |h| {
            h.nic
                .add_engine(Arc::new(toe_iscsi::engine::IscsiEngineFactory));
            h.driver_cpu = Some(std::time::Duration::ZERO);
        });
    }
    sim.driver(1)
        .lock()
        .listen(3260, 16, None)
        .map_err(|e| io::Error::other(e.to_string()))?;
    Ok(sim)
}

/// The 23 random bytes an initiator needs (ISID, first CmdSN, CHAP challenge), derived
/// from `seed` for replays.
pub fn seeded_random(seed: u64) -> [u8; 23] {
    let mut random = [0u8; 23];
    for (i, b) in random.iter_mut().enumerate() {
        *b = (seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (i % 8 * 8)) as u8 ^ i as u8;
    }
    random
}

/// toemu's initiator on host 0 (10.0.0.1) against toemu's target on host 1 (10.0.0.2, port
/// 3260, LUN 0 a memory disk) on the in-memory wire `wire`, on the virtual clock: the load
/// `o`, set up as `spec` says (both NICs carry the iSCSI engine). Deterministic for a given
/// seed.
pub fn run_on_wire(
    settings: &toe_host::config::Settings,
    wire: &toe_host::wire_opts::WireOptions,
    spec: WireSpec,
    o: PerfOptions,
) -> io::Result<WireRun> {
    let WireSpec {
        seed,
        lun_bytes,
        digests,
        offload,
        stop_target_at,
    } = spec;
    let (ports, monitors) = toe_host::pair::wire_ports(wire)?;
    let sim = iscsi_hosts(settings, ports, seed)?;
    let iqn = "iqn.2026-12.org.toemu:disk";
    let cfg = TargetConfig::offering_digests(iqn);
    let disk = Arc::new(Mutex::new(Disk::new(
        Box::new(toe_iscsi::scsi::MemStore::new(lun_bytes)),
        512,
        "TOEMU0001",
    )));
    let mut target =
        TargetApp::new(3260, cfg, "10.0.0.2:3260", disk, seed ^ 0x7a).with_offload(offload);
    let query = match digests {
        (false, false) => "",
        (true, false) => "?header_digest=crc32c",
        (false, true) => "?data_digest=crc32c",
        (true, true) => "?header_digest=crc32c&data_digest=crc32c",
    };
    let url: IscsiUrl = format!("iscsi://10.0.0.2:3260/{iqn}/0{query}")
        .parse()
        .map_err(io::Error::other)?;
    let mut perf = PerfApp::new(&url, o, seeded_random(seed))
        .map_err(io::Error::other)?
        .with_offload(offload);
    let mem = |i: usize| sim.with_host(i, |h| h.mem.clone());
    let (mi, mt) = (mem(0), mem(1));
    let (bi, bt) = (mi.stats().snapshot(), mt.stats().snapshot());
    let t0 = std::time::Instant::now();
    let mut stopping = Measured {
        inner: &mut target,
        at: stop_target_at,
        cpu: std::time::Duration::ZERO,
    };
    let mut client = Measured {
        inner: &mut perf,
        at: None,
        cpu: std::time::Duration::ZERO,
    };
    crate::serve::run_apps_sim(&sim, &mut client, &mut stopping, u64::MAX)?;
    let wall_seconds = t0.elapsed().as_secs_f64();
    let host_cpu = |i: usize, app: std::time::Duration| {
        (app + sim.with_host(i, |h| h.driver_cpu.unwrap_or_default())).as_secs_f64()
    };
    let host_cpu_seconds = [host_cpu(0, client.cpu), host_cpu(1, stopping.cpu)];
    let busy = |i: usize| {
        sim.with_host(i, |h| {
            [h.driver.lock().cpu().total_us(), h.nic.busy().total_us()]
        })
    };
    let modeled_busy_us = [busy(0), busy(1)];
    let report = perf.report().map_err(io::Error::other)?;
    Ok(WireRun {
        report,
        initiator_copies: mi.stats().snapshot().since(&bi),
        target_copies: mt.stats().snapshot().since(&bt),
        target: target.stats(),
        initiator_digest_bytes: perf.digest_bytes(),
        initiator_copy_bytes: perf.copy_bytes(),
        wire: toe_host::wire_opts::wire_stats(&monitors),
        wall_seconds,
        host_cpu_seconds,
        modeled_busy_us,
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
    /// The data path of both ends.
    pub offload: Offload,
    /// Commands completed.
    pub ios: u64,
    /// Commands per second of modeled (virtual) time.
    pub modeled_iops: f64,
    /// Data megabytes (10^6) per second of modeled time.
    pub modeled_mb_per_s: f64,
    /// Command latency in modeled time, µs.
    pub modeled_latency_us: crate::stats::Latency,
    /// Bytes the initiator's host CPU copied per data byte: driver copies, copies between
    /// host memory and application memory, and the transport's copies within application
    /// memory (PDU headers included).
    pub initiator_copies_per_byte: f64,
    /// The same on the target's host.
    pub target_copies_per_byte: f64,
    /// Bytes the NIC moved into and out of the initiator's host memory by DMA per data
    /// byte (no host CPU).
    pub initiator_dma_per_byte: f64,
    /// The same on the target's host.
    pub target_dma_per_byte: f64,
    /// Bytes the initiator's host ran through CRC32C per data byte.
    pub initiator_digest_bytes_per_byte: f64,
    /// The same on the target's host.
    pub target_digest_bytes_per_byte: f64,
    /// Wall-clock seconds the emulation took (the emulator's speed, not the model's).
    pub wall_seconds: f64,
    /// Wall-clock µs of the emulation per I/O: both hosts, both NICs and the wire on one
    /// thread.
    pub wall_us_per_io: f64,
    /// Host CPU µs per I/O of the initiator's host (its driver and application, measured
    /// in wall-clock time; the NIC's work is not in it).
    pub initiator_cpu_us_per_io: f64,
    /// The same on the target's host.
    pub target_cpu_us_per_io: f64,
    /// The I/O rate one core of the busier host could sustain: 10^6 / the larger of the
    /// two CPU figures (measured, not modeled).
    pub cpu_bound_iops: f64,
    /// The initiator's host CPU per I/O charged by the cost model (driver events,
    /// commands, copies, software digests), modeled µs.
    pub initiator_modeled_cpu_us_per_io: f64,
    /// The target's host CPU per I/O charged by the cost model, modeled µs.
    pub target_modeled_cpu_us_per_io: f64,
    /// The initiator NIC's work per I/O (frames, DMA) charged by the cost model, µs.
    pub initiator_modeled_nic_us_per_io: f64,
    /// The target NIC's work per I/O charged by the cost model, µs.
    pub target_modeled_nic_us_per_io: f64,
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
    /// Each host's anonymous (indicate) buffer, bytes: large enough that a PDU record of a
    /// 64 KiB burst with its header arrives whole in one buffer (the NIC ends a buffer at
    /// each PSH, and senders push at each PDU's end), so the host parses it in place. With
    /// smaller buffers such records are reassembled: one more copy of their data.
    pub anon_buf_bytes: u32,
    /// What the model leaves out.
    pub not_modeled: &'static str,
}

/// How much `toemu iscsi bench` moves.
#[derive(Debug, Clone, Copy)]
pub struct BenchOptions {
    /// Bytes moved by each 4 KiB run.
    pub small_bytes: u64,
    /// Bytes moved by each 128 KiB run.
    pub large_bytes: u64,
    /// Also run without digests.
    pub without_digests: bool,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            small_bytes: 32 << 20,
            large_bytes: 256 << 20,
            without_digests: true,
        }
    }
}

/// The smallest anonymous buffer `toemu iscsi bench` gives its hosts, bytes (see
/// [`BenchModel::anon_buf_bytes`]).
pub const BENCH_ANON_BUF_BYTES: u32 = 128 << 10;

/// `toemu iscsi bench`: toemu's initiator against toemu's target on two emulated hosts on
/// the in-memory wire, on the virtual clock, the NIC's engine beside the software data
/// path (one after the other for each case, which goes first alternating): 4 KiB and 128
/// KiB at QD32, reads and writes, with header and data digests (and without, if asked).
/// `base` supplies the host settings (its bus latency is raised to the model's 2 µs and its
/// anonymous buffers to [`BENCH_ANON_BUF_BYTES`] if lower). `each` sees every row as it is
/// measured.
pub fn bench(
    base: &toe_host::config::Settings,
    opts: BenchOptions,
    mut each: impl FnMut(&BenchRow),
) -> io::Result<(BenchModel, Vec<BenchRow>)> {
    let model = BenchModel {
        wire_bits_per_s: 25_000_000_000,
        wire_delay_us: 2,
        bus_latency_us: base.bus_latency_us.max(2),
        anon_buf_bytes: base.anon_buf_bytes.max(BENCH_ANON_BUF_BYTES),
        not_modeled: "the host CPU is charged for driver events and commands, copies and \
                      software CRC32C (the cost model); its protocol processing per PDU is not",
    };
    let mut settings = base.clone();
    settings.bus_latency_us = model.bus_latency_us;
    settings.anon_buf_bytes = model.anon_buf_bytes;
    settings
        .validate()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    let wire = toe_host::wire_opts::WireOptions {
        impair: toe_nic::impair::ImpairConfig {
            delay: toe_bus::time::Duration::from_micros(model.wire_delay_us),
            rate_bits_per_s: Some(model.wire_bits_per_s),
            ..toe_nic::impair::ImpairConfig::default()
        },
        pcap: None,
    };
    let digest_cases: &[bool] = if opts.without_digests {
        &[true, false]
    } else {
        &[true]
    };
    let mut rows = Vec::new();
    let mut case = 0;
    for &digests in digest_cases {
        for (io, bytes) in [(4096u32, opts.small_bytes), (128 << 10, opts.large_bytes)] {
            for write in [false, true] {
                let mut order = [Offload::Engine, Offload::Software];
                if case % 2 == 1 {
                    order.reverse();
                }
                case += 1;
                let mut pair = Vec::new();
                for offload in order {
                    let o = PerfOptions {
                        io_bytes: io,
                        depth: 32,
                        bytes: Some(bytes),
                        write,
                        ..PerfOptions::default()
                    };
                    let spec = WireSpec {
                        seed: 11,
                        lun_bytes: 256 << 20,
                        digests: (digests, digests),
                        offload,
                        stop_target_at: None,
                    };
                    let r = run_on_wire(&settings, &wire, spec, o)?;
                    let row = bench_row(&r, io, digests, offload)?;
                    each(&row);
                    pair.push(row);
                }
                // The engine's row first in the table.
                pair.sort_by_key(|r| r.offload != Offload::Engine);
                rows.extend(pair);
            }
        }
    }
    Ok((model, rows))
}

/// The row of run `r`.
fn bench_row(r: &WireRun, io: u32, digests: bool, offload: Offload) -> io::Result<BenchRow> {
    let p = r
        .report
        .phases
        .first()
        .ok_or_else(|| io::Error::other("no phase"))?;
    let data = p.bytes.max(1) as f64;
    let copies = |c: &toe_bus::CopySnapshot, own: u64| {
        (c.host_copy_bytes + c.copy_out_bytes + c.copy_in_bytes + own) as f64 / data
    };
    let dma = |c: &toe_bus::CopySnapshot| (c.dma_write_bytes + c.dma_read_bytes) as f64 / data;
    let ios = p.ios.max(1) as f64;
    let cpu = r.host_cpu_seconds.map(|s| s * 1e6 / ios);
    Ok(BenchRow {
        op: p.op,
        io_bytes: io,
        depth: 32,
        digests,
        offload,
        ios: p.ios,
        modeled_iops: p.iops,
        modeled_mb_per_s: p.mb_per_s,
        modeled_latency_us: p.latency_us,
        initiator_copies_per_byte: copies(&r.initiator_copies, r.initiator_copy_bytes),
        target_copies_per_byte: copies(&r.target_copies, r.target.copy_bytes),
        initiator_dma_per_byte: dma(&r.initiator_copies),
        target_dma_per_byte: dma(&r.target_copies),
        initiator_digest_bytes_per_byte: r.initiator_digest_bytes as f64 / data,
        target_digest_bytes_per_byte: r.target.digest_bytes as f64 / data,
        wall_seconds: r.wall_seconds,
        wall_us_per_io: r.wall_seconds * 1e6 / ios,
        initiator_cpu_us_per_io: cpu[0],
        target_cpu_us_per_io: cpu[1],
        cpu_bound_iops: 1e6 / cpu[0].max(cpu[1]).max(1e-9),
        initiator_modeled_cpu_us_per_io: r.modeled_busy_us[0][0] / ios,
        target_modeled_cpu_us_per_io: r.modeled_busy_us[1][0] / ios,
        initiator_modeled_nic_us_per_io: r.modeled_busy_us[0][1] / ios,
        target_modeled_nic_us_per_io: r.modeled_busy_us[1][1] / ios,
    })
}

/// The bench's rows as a table.
pub fn bench_table(model: &BenchModel, rows: &[BenchRow]) -> String {
    let mut t = format!(
        "toemu iscsi bench: initiator and target on emulated TOE hosts, the NIC's iSCSI engine beside the software data path; modeled: {} Gbit/s wire, {} us one way, bus {} us, {} KiB indicate buffers\n\
         ({}; copy/B is host CPU copies, DMA/B the NIC's, per data byte; mcpu and mnic us are each host's CPU and NIC work per I/O charged by the cost model (modeled); cpu us is each host's driver and application per I/O measured in wall-clock time on this machine, cpu IOPS what one core of the busier host sustains at that; wall us is the whole emulation per I/O)\n\n",
        model.wire_bits_per_s / 1_000_000_000,
        model.wire_delay_us,
        model.bus_latency_us,
        model.anon_buf_bytes / 1024,
        model.not_modeled
    );
    t.push_str(&format!(
        "{:<6} {:>5} {:>3} {:>8} {:>8} {:>10} {:>10} {:>8} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>9} {:>9} {:>9} {:>9} {:>10} {:>8}\n",
        "op",
        "I/O",
        "QD",
        "digests",
        "path",
        "IOPS (mod)",
        "MB/s (mod)",
        "p50 us",
        "p99 us",
        "i mcpu us",
        "t mcpu us",
        "i mnic us",
        "t mnic us",
        "i copy/B",
        "t copy/B",
        "i DMA/B",
        "t DMA/B",
        "i crc/B",
        "t crc/B",
        "i cpu us",
        "t cpu us",
        "cpu IOPS",
        "wall us"
    ));
    for r in rows {
        t.push_str(&format!(
            "{:<6} {:>5} {:>3} {:>8} {:>8} {:>10.0} {:>10.1} {:>8.1} {:>8.1} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>8.2} {:>8.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>10.0} {:>8.1}\n",
            r.op,
            if r.io_bytes >= 1024 { format!("{}K", r.io_bytes / 1024) } else { r.io_bytes.to_string() },
            r.depth,
            if r.digests { "hdr+data" } else { "none" },
            r.offload.name(),
            r.modeled_iops,
            r.modeled_mb_per_s,
            r.modeled_latency_us.p50,
            r.modeled_latency_us.p99,
            r.initiator_modeled_cpu_us_per_io,
            r.target_modeled_cpu_us_per_io,
            r.initiator_modeled_nic_us_per_io,
            r.target_modeled_nic_us_per_io,
            r.initiator_copies_per_byte,
            r.target_copies_per_byte,
            r.initiator_dma_per_byte,
            r.target_dma_per_byte,
            r.initiator_digest_bytes_per_byte,
            r.target_digest_bytes_per_byte,
            r.initiator_cpu_us_per_io,
            r.target_cpu_us_per_io,
            r.cpu_bound_iops,
            r.wall_us_per_io
        ));
    }
    t
}

/// One step of a [`ScriptApp`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScriptStep {
    /// A SCSI command on LUN 0: its CDB, the bytes it reads (0 for none), the data it
    /// writes (empty for none).
    Command {
        /// The CDB (at most 16 bytes).
        cdb: Vec<u8>,
        /// Bytes to read.
        read_len: u32,
        /// Bytes to write.
        write: Vec<u8>,
    },
    /// A task management request on LUN 0: `function`, and for ABORT TASK the step (its
    /// index in the same batch) whose command it aborts.
    TaskMgmt {
        /// The function (1 ABORT TASK, 5 LOGICAL UNIT RESET, ...).
        function: u8,
        /// The aborted step, for ABORT TASK.
        aborts: Option<usize>,
    },
}

/// How one step of a [`ScriptApp`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptResult {
    /// Its batch (0 the first).
    pub batch: usize,
    /// Its index in the batch.
    pub index: usize,
    /// SCSI status (a command), or the task management response.
    pub status: u8,
    /// Sense data (without its length), with CHECK CONDITION.
    pub sense: Vec<u8>,
    /// What it read.
    pub data: Vec<u8>,
    /// When it was sent, µs of the host's clock.
    pub sent_us: u64,
    /// When it ended, µs of the host's clock.
    pub done_us: u64,
}

/// A scripted initiator for tests and experiments: logs in to a URL, runs batches of
/// steps (a batch goes once every step of the one before ended; the steps of a batch go
/// at once), records how each ended and when ([`ScriptApp::results`], shared so that a
/// runner's callback can watch the progress), then logs out. An aborted command records
/// nothing; the session ending early records why in [`ScriptApp::error`].
pub struct ScriptApp {
    link: InitiatorLink,
    batches: VecDeque<Vec<ScriptStep>>,
    batch: usize,
    /// Tag → (step index, sent at µs) of steps in flight.
    waiting: HashMap<u32, (usize, u64)>,
    results: Arc<Mutex<Vec<ScriptResult>>>,
    logging_out: bool,
    /// The session is over (logged out, failed): the connection closes.
    over: bool,
    finished: bool,
    /// Why the script could not complete, if it could not.
    pub error: Option<String>,
}

impl std::fmt::Debug for ScriptApp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScriptApp")
            .field("batch", &self.batch)
            .field("finished", &self.finished)
            .finish()
    }
}

impl ScriptApp {
    /// The script `batches` against `url`'s target; `random` as for [`PerfApp::new`].
    pub fn new(
        url: &IscsiUrl,
        batches: Vec<Vec<ScriptStep>>,
        random: [u8; 23],
    ) -> Result<Self, String> {
        Ok(ScriptApp {
            link: InitiatorLink::new(url, random)?,
            batches: batches.into(),
            batch: 0,
            waiting: HashMap::new(),
            results: Arc::new(Mutex::new(Vec::new())),
            logging_out: false,
            over: false,
            finished: false,
            error: None,
        })
    }

    /// How the steps ended so far, in the order they did.
    pub fn results(&self) -> Arc<Mutex<Vec<ScriptResult>>> {
        self.results.clone()
    }

    fn run(&mut self, d: &mut Driver, now: Instant) -> io::Result<bool> {
        if self.finished {
            return Ok(false);
        }
        let ScriptApp {
            batches,
            batch,
            waiting,
            results,
            logging_out,
            error,
            over,
            ..
        } = self;
        let (state, busy) = self.link.pump(d, now, |init, us, _out| {
            while let Some(e) = init.poll_event() {
                let (itt, status, sense, data) = match e {
                    InitiatorEvent::Done(c) => (c.itt, c.status, c.sense, c.data),
                    InitiatorEvent::TaskMgmt { itt, response, .. } => {
                        (itt, response, Vec::new(), Vec::new())
                    }
                    InitiatorEvent::LoggedOut => {
                        *over = true;
                        continue;
                    }
                    InitiatorEvent::LoginFailed(e) => {
                        *error = Some(format!("login failed: {e:?}"));
                        *over = true;
                        continue;
                    }
                    InitiatorEvent::Failed(e) => {
                        *error = Some(e);
                        *over = true;
                        continue;
                    }
                    InitiatorEvent::LoggedIn(_) | InitiatorEvent::Text { .. } => continue,
                };
                if let Some((index, sent_us)) = waiting.remove(&itt) {
                    results.lock().expect("results lock").push(ScriptResult {
                        batch: *batch - 1,
                        index,
                        status,
                        sense,
                        data,
                        sent_us,
                        done_us: us,
                    });
                }
            }
            if init.negotiated().is_none() || !waiting.is_empty() || *logging_out {
                return;
            }
            // Aborted commands end without an answer: the batch is over once every
            // task management request and every command not aborted has ended.
            let Some(steps) = batches.pop_front() else {
                *logging_out = true;
                init.send_logout();
                return;
            };
            *batch += 1;
            let mut tags = Vec::new();
            for (i, s) in steps.into_iter().enumerate() {
                let itt = match s {
                    ScriptStep::Command {
                        cdb,
                        read_len,
                        write,
                    } => init.submit(0, &cdb, read_len, write),
                    ScriptStep::TaskMgmt { function, aborts } => {
                        let r = aborts.and_then(|k| tags.get(k).copied()).unwrap_or(0);
                        if function == 1 {
                            waiting.remove(&r);
                        }
                        init.task_mgmt(function, 0, r)
                    }
                };
                tags.push(itt);
                waiting.insert(itt, (i, us));
            }
        })?;
        if state == LinkState::Broken && !self.over {
            self.error
                .get_or_insert_with(|| "the connection broke".into());
            self.over = true;
        }
        if self.over && self.link.close(d)? {
            self.finished = true;
        }
        Ok(busy || self.finished)
    }
}

impl App for ScriptApp {
    fn name(&self) -> &'static str {
        "iscsi-script"
    }

    fn poll(&mut self, d: &mut Driver, now: Instant) -> io::Result<bool> {
        self.run(d, now)
    }

    fn poll_at(&self) -> Option<Instant> {
        let t = self.link.init.as_ref()?.next_deadline()?;
        Some(Instant::from_micros(t as i64))
    }

    fn done(&self) -> bool {
        self.finished
    }
}
