//! `toemu demo`: two emulated TOE hosts on the in-memory wire, one bulk transfer with an
//! end-to-end SHA-256 check and a 64-byte request/response phase per receive mode, plus the
//! bare-smoltcp baseline on the same wire and MTU, all in one run on the virtual clock.
//!
//! Modes: `named-buffer` (indicate-window policy, the application keeps named buffers larger
//! than W posted: direct placement), `indicate-window` (no named buffers: the application
//! accepts indicated data in place), `mss-holdoff` and `unbounded-copy` (prior art), and
//! `smoltcp-bare`.
//!
//! Every wire is built through [`DemoOptions::wire`] ([`WireOptions`]): perfect by default, or
//! impaired (delay, rate, loss, reordering, duplication, corruption) and captured to pcap. On
//! the virtual clock a delayed wire costs no wall time: the simulation jumps to the instant
//! the next held frame is due.

use std::io;
use std::time::Instant as WallInstant;

use serde::Serialize;
use toe_bus::{ConnId, HostBuf, RxPolicy};
use toe_driver::Driver;
use toe_nic::impair::ImpairStats;

use crate::bare::BarePair;
use crate::datagen::{Check, Checker, DataGen};
use toe_host::config::Settings;
use toe_host::pair::connected_pair_traced;
use toe_host::wire_opts::{wire_stats, WireOptions};
use toemu_apps::{ConnIo, RxMode};

/// A receive mode of the demo.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Indicate window, application posts named buffers larger than W.
    NamedBuffer,
    /// Indicate window, application accepts indicated data in place.
    IndicateWindow,
    /// Chimney-style one-MSS hold-off.
    MssHoldoff,
    /// Traditional copy into the driver's socket buffer.
    UnboundedCopy,
    /// Bare smoltcp, no offload layers.
    SmoltcpBare,
}

impl Mode {
    /// Every mode, in report order.
    pub const ALL: [Mode; 5] = [
        Mode::NamedBuffer,
        Mode::IndicateWindow,
        Mode::MssHoldoff,
        Mode::UnboundedCopy,
        Mode::SmoltcpBare,
    ];

    /// The mode's name in reports and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Mode::NamedBuffer => "named-buffer",
            Mode::IndicateWindow => "indicate-window",
            Mode::MssHoldoff => "mss-holdoff",
            Mode::UnboundedCopy => "unbounded-copy",
            Mode::SmoltcpBare => "smoltcp-bare",
        }
    }

    fn policy(self) -> Option<RxPolicy> {
        match self {
            Mode::NamedBuffer | Mode::IndicateWindow => Some(RxPolicy::IndicateWindow),
            Mode::MssHoldoff => Some(RxPolicy::MssHoldoff),
            Mode::UnboundedCopy => Some(RxPolicy::UnboundedCopy),
            Mode::SmoltcpBare => None,
        }
    }
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Mode::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| format!("unknown mode {s:?}"))
    }
}

/// Demo parameters.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Bytes per bulk transfer.
    pub bytes: u64,
    /// Request/response exchanges per mode.
    pub rr_iters: usize,
    /// Request and response size, in bytes.
    pub rr_bytes: usize,
    /// Host settings (W, pools, MTU...); the policy is set per mode.
    pub settings: Settings,
    /// Seed of the payload and the stacks.
    pub seed: u64,
    /// Size of each named buffer the receiver keeps posted, in bytes (must exceed W for
    /// direct placement).
    pub named_buf_bytes: usize,
    /// Named buffers kept posted.
    pub named_bufs: usize,
    /// Size of each send buffer, in bytes.
    pub send_buf_bytes: usize,
    /// Send buffers in flight.
    pub send_bufs: usize,
    /// Modes to run.
    pub modes: Vec<Mode>,
    /// Bulk runs per mode (alternating between modes); the median run is reported.
    pub repeat: usize,
    /// The wire between the two hosts (impairment, capture); default: perfect, no capture.
    pub wire: WireOptions,
    /// Record both drivers' bus traffic as JSON lines here (host names `MODE/PHASE/a|b`).
    pub trace: Option<toe_host::trace::SharedWriter>,
    /// End-to-end integrity check of bulk transfers (the demo reports SHA-256).
    pub check: Check,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            bytes: 1 << 30,
            rr_iters: 10_000,
            rr_bytes: 64,
            settings: Settings::default(),
            seed: 1,
            named_buf_bytes: 512 << 10,
            named_bufs: 4,
            send_buf_bytes: 1 << 20,
            send_bufs: 4,
            modes: Mode::ALL.to_vec(),
            repeat: 3,
            wire: WireOptions::default(),
            trace: None,
            check: Check::Sha256,
        }
    }
}

pub use crate::stats::Latency;

/// One mode's results.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// Mode name.
    pub mode: &'static str,
    /// Bytes transferred.
    pub bytes: u64,
    /// Wall-clock seconds of the transfer.
    pub seconds: f64,
    /// bytes / seconds.
    pub throughput_bytes_per_s: f64,
    /// Receiver's host copies per received byte (DMA writes + driver copies + copies out).
    pub host_copies_per_byte: f64,
    /// Times the receiving NIC suspended delivery at P == W.
    pub indicate_stalls: u64,
    /// IndicateAcknowledge commands the receiving driver sent.
    pub indicate_acks: u64,
    /// Most anonymous-buffer bytes the receiving driver held at once.
    pub anon_pool_high_water_bytes: u64,
    /// Most bytes the `unbounded-copy` driver socket buffer held.
    pub copy_buffer_high_water_bytes: u64,
    /// Bytes placed directly into named buffers by the NIC.
    pub direct_placed_bytes: u64,
    /// Request/response round trip, wall-clock microseconds.
    pub rr_latency_us: Latency,
    /// Virtual seconds of the transfer (the modeled machine: cost model and wire).
    pub modeled_seconds: f64,
    /// bytes / modeled_seconds.
    pub modeled_throughput_bytes_per_s: f64,
    /// The receiving host's CPU time per received byte under the cost model, ns (0 for
    /// bare smoltcp, which has no host model).
    pub modeled_host_cpu_ns_per_byte: f64,
    /// Request/response round trip in virtual microseconds.
    pub modeled_rr_latency_us: Latency,
    /// The receiver's SHA-256 matched the sender's stream.
    pub integrity_ok: bool,
}

/// The JSON document `--json` writes.
#[derive(Debug, Serialize)]
pub struct DemoReport {
    /// One entry per mode.
    pub runs: Vec<RunReport>,
    /// Settings and machine description.
    pub setup: serde_json::Value,
}

pub(crate) use crate::stats::latency;

fn other(msg: impl Into<String>) -> io::Error {
    io::Error::other(msg.into())
}

fn settings_for(mode: Mode, base: &Settings) -> Settings {
    let mut s = base.clone();
    if let Some(p) = mode.policy() {
        s.policy = p;
    }
    s
}

/// What a receiving application does with its connection: the apps' [`ConnIo`] (named
/// buffers kept posted, or in-place accepts) feeding an integrity check.
pub struct Receiver {
    io: ConnIo,
    hasher: Checker,
    /// Bytes received so far.
    pub received: u64,
}

impl Receiver {
    /// A receiver for `conn`; in named-buffer mode it posts `bufs` buffers of `len` bytes at
    /// once (before any data arrives, so the NIC can place it directly).
    pub fn new(
        mode: Mode,
        d: &mut Driver,
        now: toe_bus::time::Instant,
        conn: ConnId,
        bufs: usize,
        len: usize,
        push: bool,
    ) -> io::Result<Self> {
        let rx = if mode == Mode::NamedBuffer {
            RxMode::Named {
                buf_bytes: len,
                bufs,
                push,
            }
        } else {
            RxMode::InPlace
        };
        let mut io = ConnIo::new(conn, rx);
        if mode == Mode::NamedBuffer {
            // the first `recv` posts the buffers; nothing has arrived yet to take
            io.recv(d, now, |_| 0)?;
        }
        Ok(Receiver {
            io,
            hasher: Checker::new(Check::Sha256),
            received: 0,
        })
    }

    /// Consume whatever arrived; returns true at end of stream.
    pub fn service(&mut self, d: &mut Driver, now: toe_bus::time::Instant) -> io::Result<bool> {
        let h = &mut self.hasher;
        let n = self.io.recv(d, now, |data| {
            h.update(data);
            data.len()
        })?;
        self.received += n as u64;
        Ok(self.io.eof(d))
    }

    /// Use integrity check `c` instead of SHA-256 (before any data arrives).
    pub fn with_check(mut self, c: Check) -> Self {
        self.hasher = Checker::new(c);
        self
    }

    /// The digest of everything received (SHA-256 unless [`Receiver::with_check`]).
    pub fn digest(self) -> [u8; 32] {
        self.hasher.finish()
    }
}

/// Sends a seeded stream with a fixed set of host buffers.
pub struct Sender {
    conn: ConnId,
    gen: DataGen,
    total: u64,
    /// Bytes handed to the NIC so far.
    pub queued: u64,
    free: Vec<HostBuf>,
    outstanding: usize,
    closed: bool,
    /// Close after the last byte (see [`Sender::hold_open`]).
    close_at_end: bool,
}

impl Sender {
    /// Do not close after the last byte: [`Sender::extend`] may add more.
    pub fn hold_open(mut self) -> Self {
        self.close_at_end = false;
        self
    }

    /// Send `more` bytes of the stream after the current total, then close.
    pub fn extend(&mut self, more: u64) {
        self.total += more;
        self.close_at_end = true;
    }

    /// A sender of `total` bytes on `conn` with `bufs` buffers of `len` bytes.
    pub fn new(
        d: &Driver,
        conn: ConnId,
        seed: u64,
        total: u64,
        bufs: usize,
        len: usize,
    ) -> io::Result<Self> {
        let mut free = (0..bufs)
            .map(|_| d.alloc(len).map_err(|e| other(e.to_string())))
            .collect::<io::Result<Vec<_>>>()?;
        // Touch the buffers now: their first-touch page faults belong to setting up, not
        // to a timed transfer.
        let mem = d.memory().clone();
        for b in free.iter_mut() {
            mem.slice_mut(b).fill(0);
        }
        Ok(Sender {
            conn,
            gen: DataGen::new(seed),
            total,
            queued: 0,
            free,
            outstanding: 0,
            closed: false,
            close_at_end: true,
        })
    }

    /// Refill and send freed buffers; close after the last byte. True once everything was
    /// acknowledged.
    pub fn service(&mut self, d: &mut Driver) -> io::Result<bool> {
        while let Some((buf, ok)) = d
            .take_send_done(self.conn)
            .map_err(|e| other(e.to_string()))?
        {
            if !ok {
                return Err(other("send failed: connection ended early"));
            }
            self.outstanding -= 1;
            self.free.push(buf);
        }
        while self.queued < self.total {
            let Some(mut buf) = self.free.pop() else {
                break;
            };
            let n = (buf.len() as u64).min(self.total - self.queued) as usize;
            let mem = d.memory().clone();
            self.gen.fill(&mut mem.slice_mut(&mut buf)[..n]);
            d.send(self.conn, buf, n)
                .map_err(|r| other(r.error.to_string()))?;
            self.outstanding += 1;
            self.queued += n as u64;
        }
        if self.queued == self.total && !self.closed && self.close_at_end {
            d.close(self.conn).map_err(|e| other(e.to_string()))?;
            self.closed = true;
        }
        Ok(self.closed && self.outstanding == 0)
    }

    /// Free the buffers.
    pub fn finish(self, d: &Driver) {
        for b in self.free {
            d.free(b);
        }
    }
}

/// A run's figures in modeled time: the emulated machine's virtual clock under the cost model
/// (`toe_host::config::Settings`' cost settings and the wire's rate and delay).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Modeled {
    /// Virtual seconds from the first byte offered to the receiver's end of stream.
    pub seconds: f64,
    /// The receiving host's CPU time charged by the cost model (driver events and
    /// commands, copies) per received byte, in nanoseconds.
    pub host_cpu_ns_per_byte: f64,
}

/// Bulk-transfer outcome of one TOE mode.
#[derive(Debug, Clone)]
pub struct Bulk {
    /// The transfer in modeled (virtual) time; zeros on the real-time runtime.
    pub modeled: Modeled,
    /// Wall-clock seconds from the first byte offered to the receiver's end of stream.
    pub seconds: f64,
    /// SHA-256 the receiver computed.
    pub digest: [u8; 32],
    /// Receiver's host copies per received byte.
    pub copies: f64,
    /// NIC suspensions at P == W.
    pub stalls: u64,
    /// IndicateAcknowledge commands sent by the receiving driver.
    pub acks: u64,
    /// Anonymous-buffer high water of the receiving driver, in bytes.
    pub anon_high: u64,
    /// `unbounded-copy` socket-buffer high water, in bytes.
    pub copy_high: u64,
    /// Bytes the NIC placed directly into named buffers.
    pub placed: u64,
    /// What the wire's impairment did, per direction, indexed by the receiving host (entry 1
    /// is the data direction); zeros on a perfect wire.
    pub wire: [ImpairStats; 2],
    /// The receiving NIC's offload counters at end of stream (TOE modes).
    pub nic_counters: Option<toe_nic::OffloadStats>,
    /// The receiving driver's connection counters at end of stream (TOE modes).
    pub driver_counters: Option<toe_driver::ConnRxStats>,
}

/// One bulk transfer of `o.bytes` from host 0 to host 1 in `mode` (not `smoltcp-bare`), on
/// the virtual clock. Errors if the transfer stalls or loses bytes.
pub fn toe_bulk(mode: Mode, o: &DemoOptions) -> io::Result<Bulk> {
    let settings = settings_for(mode, &o.settings);
    let label = format!("{}/bulk", mode.name());
    let trace = o.trace.as_ref().map(|w| (w, label.as_str()));
    let (sim, ca, cb, monitors) = connected_pair_traced(&settings, o.seed, 5001, &o.wire, trace)?;
    let (da, db) = (sim.driver(0), sim.driver(1));
    let (mut tx, mut rx) = bulk_ends(mode, o, (&da, ca), (&db, cb), sim.now())?;
    let mem_b = sim.with_host(1, |h| h.mem.clone());
    let before = mem_b.stats().snapshot();
    let cpu0 = db.lock().cpu().total_ps();
    let v0 = sim.now();
    let t0 = WallInstant::now();
    let mut idle = 0u64;
    // The sender offers its first bytes before the first step: a step of an idle world
    // jumps the clock to its next timer, which must not count as transfer time.
    loop {
        tx.service(&mut da.lock())?;
        if rx.service(&mut db.lock(), sim.now())? {
            break;
        }
        let moved = sim.step_or_idle()?;
        idle = if moved { 0 } else { idle + 1 };
        if idle > 100_000 {
            return Err(other(format!(
                "{} bulk transfer stalled at {} bytes",
                mode.name(),
                rx.received
            )));
        }
    }
    let seconds = t0.elapsed().as_secs_f64();
    let modeled = Modeled {
        seconds: (sim.now() - v0).total_micros() as f64 / 1e6,
        host_cpu_ns_per_byte: (db.lock().cpu().total_ps() - cpu0) as f64
            / 1000.0
            / rx.received.max(1) as f64,
    };
    let nic_counters = sim.with_host(1, |h| h.nic.offload_state(cb).map(|(_, _, s)| s));
    let (copies, info, anon_high) = receiver_figures(&db, cb, &mem_b, &before, rx.received)?;
    // finish the exchange cleanly: both sides closed, every send acknowledged
    db.lock().close(cb).map_err(|e| other(e.to_string()))?;
    sim.run_until(1_000_000, || tx.service(&mut da.lock()).unwrap_or(true))?;
    tx.finish(&da.lock());
    Bulk::of(
        mode.name(),
        o.bytes,
        seconds,
        modeled,
        rx,
        copies,
        info,
        anon_high,
        nic_counters,
        &monitors,
    )
}

/// The sender on `a` (host 0's connection) and the receiver on `b` (host 1's) of a bulk
/// transfer as `o` describes it.
fn bulk_ends(
    mode: Mode,
    o: &DemoOptions,
    a: (&toe_driver::SharedDriver, ConnId),
    b: (&toe_driver::SharedDriver, ConnId),
    now: toe_bus::time::Instant,
) -> io::Result<(Sender, Receiver)> {
    let tx = Sender::new(
        &a.0.lock(),
        a.1,
        o.seed,
        o.bytes,
        o.send_bufs,
        o.send_buf_bytes,
    )?;
    let rx = Receiver::new(
        mode,
        &mut b.0.lock(),
        now,
        b.1,
        o.named_bufs,
        o.named_buf_bytes,
        false,
    )?
    .with_check(o.check);
    Ok((tx, rx))
}

/// The receiving host's copies per byte since `before`, connection `cb`'s counters and the
/// anonymous-pool high water, read before the connection closes.
fn receiver_figures(
    db: &toe_driver::SharedDriver,
    cb: ConnId,
    mem: &toe_bus::HostMemory,
    before: &toe_bus::CopySnapshot,
    received: u64,
) -> io::Result<(f64, toe_driver::ConnInfo, u64)> {
    let copies = mem
        .stats()
        .snapshot()
        .since(before)
        .rx_copies_per_byte(received);
    let info = db.lock().conn_info(cb).map_err(|e| other(e.to_string()))?;
    let anon_high = db.lock().anon_high_water_bytes() as u64;
    Ok((copies, info, anon_high))
}

impl Bulk {
    /// The outcome of a transfer that delivered `rx.received` of `expected` bytes (an
    /// error if short).
    #[allow(clippy::too_many_arguments)]
    fn of(
        label: &str,
        expected: u64,
        seconds: f64,
        modeled: Modeled,
        rx: Receiver,
        copies: f64,
        info: toe_driver::ConnInfo,
        anon_high: u64,
        nic_counters: Option<toe_nic::OffloadStats>,
        monitors: &toe_host::wire_opts::WireMonitors,
    ) -> io::Result<Bulk> {
        if rx.received != expected {
            return Err(other(format!(
                "{label}: received {} of {expected} bytes",
                rx.received
            )));
        }
        let (stalls, placed_nic) = nic_counters
            .map(|s| (s.stalls, s.placed_bytes))
            .unwrap_or((0, 0));
        Ok(Bulk {
            seconds,
            modeled,
            digest: rx.digest(),
            copies,
            stalls,
            acks: info.rx.acks_sent,
            anon_high,
            copy_high: info.rx.copy_buffer_high_water_bytes,
            placed: placed_nic.max(info.rx.placed_bytes),
            wire: wire_stats(monitors),
            nic_counters,
            driver_counters: Some(info.rx),
        })
    }
}

/// [`toe_bulk`] in real time on the [`Threaded`](toe_host::runtime::Threaded) runtime: both NICs on the adapter thread,
/// the sending and the receiving application each on its own thread, sleeping on their
/// host's event ring when they have nothing to do (three threads in all; on a 2-core machine
/// they share the two cores). The wire is `o.wire` run on the real clock. `seconds` is wall
/// time from the first byte offered to the receiver's end of stream.
pub fn toe_bulk_threaded(mode: Mode, o: &DemoOptions) -> io::Result<Bulk> {
    let settings = settings_for(mode, &o.settings);
    let toe_host::pair::ThreadedPair {
        rt,
        client,
        server,
        mem,
        monitors,
    } = toe_host::pair::threaded_pair(&settings, o.seed, 5001, &o.wire)?;
    let (da, db) = (rt.driver(0), rt.driver(1));
    let (ca, cb) = (client.conn(), server.conn());
    let mem_b = mem[1].clone();
    let (mut tx, rx) = bulk_ends(mode, o, (&da, ca), (&db, cb), rt.clock().now())?;
    let before = mem_b.stats().snapshot();
    let t0 = WallInstant::now();
    let receiving = std::thread::Builder::new()
        .name("toemu-receiver".into())
        .spawn(move || -> io::Result<(Receiver, f64)> {
            let mut rx = rx;
            let w = server.waiter().clone();
            server.wait_until(|d| Ok(rx.service(d, w.now())?.then_some(())))?;
            Ok((rx, t0.elapsed().as_secs_f64()))
        })?;
    // The sender runs on this thread until every byte is acknowledged (the receiver has
    // closed its side by then, or closes right after).
    let sent = client.wait_until(|d| Ok(tx.service(d)?.then_some(())));
    let (rx, seconds) = receiving
        .join()
        .map_err(|_| other("receiver thread panicked"))??;
    sent?;
    let (copies, info, anon_high) = receiver_figures(&db, cb, &mem_b, &before, rx.received)?;
    db.lock().close(cb).map_err(|e| other(e.to_string()))?;
    tx.finish(&da.lock());
    let hosts = rt.stop();
    let nic_counters = hosts[1].nic.offload_state(cb).map(|(_, _, s)| s);
    let label = format!("{} (threaded)", mode.name());
    Bulk::of(
        &label,
        o.bytes,
        seconds,
        Modeled::default(),
        rx,
        copies,
        info,
        anon_high,
        nic_counters,
        &monitors,
    )
}

/// `o.rr_iters` request/response exchanges of `o.rr_bytes` in `mode` (not `smoltcp-bare`) on
/// the virtual clock, returning each round trip both in wall-clock microseconds and in virtual
/// microseconds (what the round trip costs in the emulated system: bus latency, the stack's
/// timers; 0 on a free bus and a perfect wire).
pub fn toe_rr_timed(mode: Mode, o: &DemoOptions) -> io::Result<(Vec<f64>, Vec<f64>)> {
    let settings = settings_for(mode, &o.settings);
    let label = format!("{}/rr", mode.name());
    let trace = o.trace.as_ref().map(|w| (w, label.as_str()));
    let (sim, ca, cb, _) = connected_pair_traced(&settings, o.seed, 5002, &o.wire, trace)?;
    let (da, db) = (sim.driver(0), sim.driver(1));
    // Named buffers for request/response: push mode, larger than W so the NIC places them.
    let named_len = (settings.indicate_window_bytes as usize + 4096).max(o.named_buf_bytes / 4);
    let mut srv = Receiver::new(mode, &mut db.lock(), sim.now(), cb, 1, named_len, true)?;
    let mut cli = Receiver::new(mode, &mut da.lock(), sim.now(), ca, 1, named_len, true)?;
    let size = o.rr_bytes;
    let mut lat = Vec::with_capacity(o.rr_iters);
    let mut vlat = Vec::with_capacity(o.rr_iters);
    let send = |d: &mut Driver, conn: ConnId| -> io::Result<()> {
        while let Some((b, _)) = d.take_send_done(conn).map_err(|e| other(e.to_string()))? {
            d.free(b);
        }
        let mut b = d.alloc(size).map_err(|e| other(e.to_string()))?;
        d.memory().clone().slice_mut(&mut b).fill(0x5A);
        d.send(conn, b, size)
            .map_err(|r| other(r.error.to_string()))
    };
    for i in 0..o.rr_iters {
        let t = WallInstant::now();
        let vt = sim.now();
        send(&mut da.lock(), ca)?;
        let want = (i as u64 + 1) * size as u64;
        let mut answered = false;
        for _ in 0..1_000_000 {
            sim.step_or_idle()?;
            let now = sim.now();
            {
                let mut d = db.lock();
                let before = srv.received;
                srv.service(&mut d, now)?;
                if srv.received > before && srv.received >= want && !answered {
                    send(&mut d, cb)?;
                    answered = true;
                }
            }
            cli.service(&mut da.lock(), now)?;
            if cli.received >= want {
                break;
            }
        }
        if cli.received < want {
            return Err(other(format!(
                "{} request/response {i} stalled",
                mode.name()
            )));
        }
        lat.push(t.elapsed().as_secs_f64() * 1e6);
        vlat.push((sim.now() - vt).total_micros() as f64);
    }
    Ok((lat, vlat))
}

/// One bulk run of any mode: wall seconds, digest, modeled figures, TOE details (none for
/// bare smoltcp).
type BulkRun = (f64, [u8; 32], Modeled, Option<Bulk>);

fn bulk_any(mode: Mode, o: &DemoOptions) -> io::Result<BulkRun> {
    if mode == Mode::SmoltcpBare {
        let mut pair = BarePair::with_wire(&o.settings, o.seed, &o.wire)?;
        let (elapsed, digest) = pair.bulk_checked(o.bytes, o.seed, o.check)?;
        let modeled = Modeled {
            seconds: pair.modeled_seconds,
            host_cpu_ns_per_byte: 0.0,
        };
        Ok((elapsed.as_secs_f64(), digest, modeled, None))
    } else {
        let b = toe_bulk(mode, o)?;
        Ok((b.seconds, b.digest, b.modeled, Some(b)))
    }
}

/// Request/response round trips of any mode: (wall µs, virtual µs) per exchange.
pub fn rr_any(mode: Mode, o: &DemoOptions) -> io::Result<(Vec<f64>, Vec<f64>)> {
    if mode == Mode::SmoltcpBare {
        let mut pair = BarePair::with_wire(&o.settings, o.seed, &o.wire)?;
        let wall = pair.request_response(o.rr_iters, o.rr_bytes)?;
        Ok((wall, std::mem::take(&mut pair.modeled_rr_us)))
    } else {
        toe_rr_timed(mode, o)
    }
}

/// Run the demo; `progress` hears a line per finished phase. Bulk transfers alternate between
/// the modes `repeat` times (so drifting machine load hits every mode alike) and each mode
/// reports its median run; the request/response phase follows, mode by mode.
pub fn run_demo(o: &DemoOptions, mut progress: impl FnMut(&str)) -> io::Result<Vec<RunReport>> {
    let expected = DataGen::digest_with(o.seed, o.bytes, o.check);
    let mut bulks: Vec<Vec<BulkRun>> = vec![Vec::new(); o.modes.len()];
    for round in 0..o.repeat.max(1) {
        for (i, &mode) in o.modes.iter().enumerate() {
            let r = bulk_any(mode, o)?;
            progress(&format!(
                "bulk {}/{} {:<16} modeled {:>8.1} MB/s  wall {:>8.1} MB/s  integrity {}",
                round + 1,
                o.repeat.max(1),
                mode.name(),
                o.bytes as f64 / r.2.seconds.max(1e-9) / 1e6,
                o.bytes as f64 / r.0 / 1e6,
                if r.1 == expected { "ok" } else { "FAILED" }
            ));
            bulks[i].push(r);
        }
    }
    let mut runs = Vec::new();
    for (i, &mode) in o.modes.iter().enumerate() {
        let mut all = std::mem::take(&mut bulks[i]);
        let integrity_ok = all.iter().all(|r| r.1 == expected);
        all.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (seconds, _, modeled, toe) = all.swap_remove(all.len() / 2);
        let (lat, vlat) = rr_any(mode, o)?;
        let b = toe.unwrap_or(Bulk {
            seconds,
            modeled,
            digest: expected,
            copies: 0.0,
            stalls: 0,
            acks: 0,
            anon_high: 0,
            copy_high: 0,
            placed: 0,
            wire: [ImpairStats::default(); 2],
            nic_counters: None,
            driver_counters: None,
        });
        let report = RunReport {
            mode: mode.name(),
            bytes: o.bytes,
            seconds,
            throughput_bytes_per_s: o.bytes as f64 / seconds,
            host_copies_per_byte: b.copies,
            indicate_stalls: b.stalls,
            indicate_acks: b.acks,
            anon_pool_high_water_bytes: b.anon_high,
            copy_buffer_high_water_bytes: b.copy_high,
            direct_placed_bytes: b.placed,
            rr_latency_us: latency(lat),
            modeled_seconds: modeled.seconds,
            // A perfect wire and no costs take no virtual time: no modeled rate then.
            modeled_throughput_bytes_per_s: if modeled.seconds > 0.0 {
                o.bytes as f64 / modeled.seconds
            } else {
                0.0
            },
            modeled_host_cpu_ns_per_byte: modeled.host_cpu_ns_per_byte,
            modeled_rr_latency_us: latency(vlat),
            integrity_ok,
        };
        progress(&format!(
            "rr   {:<16} modeled p50 {:.1} us p99 {:.1} us  wall p50 {:.1} us p99 {:.1} us",
            report.mode,
            report.modeled_rr_latency_us.p50,
            report.modeled_rr_latency_us.p99,
            report.rr_latency_us.p50,
            report.rr_latency_us.p99
        ));
        if let Some(line) = counters_line(mode, &b) {
            progress(&line);
        }
        runs.push(report);
    }
    Ok(runs)
}

/// The receiving connection's counters of a bulk run, one line (TOE modes only).
pub fn counters_line(mode: Mode, b: &Bulk) -> Option<String> {
    let (n, d) = (b.nic_counters?, b.driver_counters?);
    Some(format!(
        "     {:<16} NIC: indicated {} B in {} indications, placed {} B, stalls {}, acks {}, \
         max P {} B, named posted {} (stale {}); driver: copied {} B, accepted {} B, \
         acks {} ({} B), notifications {}, returns full/push/timer/eof/cancel/reset {:?}, \
         queued high water {} B",
        mode.name(),
        n.indicated_bytes,
        n.indications,
        n.placed_bytes,
        n.stalls,
        n.acks,
        n.max_pending_bytes,
        n.named_posted,
        n.named_stale,
        d.copied_bytes,
        d.accepted_bytes,
        d.acks_sent,
        d.acked_bytes,
        d.notifications,
        d.returned,
        d.queued_high_water_bytes
    ))
}

/// A readable table of `runs`: the modeled machine's figures first (virtual time under the
/// cost model), then the emulator's own wall-clock speed, each throughput also as a ratio to
/// the bare-smoltcp run.
pub fn table(runs: &[RunReport]) -> String {
    let bare = runs.iter().find(|r| r.mode == Mode::SmoltcpBare.name());
    let ratio = |v: f64, b: Option<f64>| {
        b.filter(|b| *b > 0.0)
            .map(|b| format!("{:.2}x", v / b))
            .unwrap_or_else(|| "-".into())
    };
    let mut s = format!(
        "{:<16} | {:>10} {:>8} {:>8} {:>9} {:>9} | {:>9} {:>8} {:>9} {:>9} | {:>8} {:>6} {:>6} {:>8} {:>9}\n",
        "",
        "modeled",
        "vs bare",
        "cpu",
        "rr p50",
        "rr p99",
        "wall",
        "vs bare",
        "rr p50",
        "rr p99",
        "copies",
        "stalls",
        "acks",
        "anon-hw",
        ""
    );
    s.push_str(&format!(
        "{:<16} | {:>10} {:>8} {:>8} {:>9} {:>9} | {:>9} {:>8} {:>9} {:>9} | {:>8} {:>6} {:>6} {:>8} {:>9}\n",
        "mode", "MB/s", "", "ns/B", "us", "us", "MB/s", "", "us", "us", "/B", "", "", "KiB", "integrity"
    ));
    for r in runs {
        s.push_str(&format!(
            "{:<16} | {:>10.1} {:>8} {:>8.3} {:>9.1} {:>9.1} | {:>9.1} {:>8} {:>9.1} {:>9.1} | {:>8.2} {:>6} {:>6} {:>8} {:>9}\n",
            r.mode,
            r.modeled_throughput_bytes_per_s / 1e6,
            ratio(
                r.modeled_throughput_bytes_per_s,
                bare.map(|b| b.modeled_throughput_bytes_per_s)
            ),
            r.modeled_host_cpu_ns_per_byte,
            r.modeled_rr_latency_us.p50,
            r.modeled_rr_latency_us.p99,
            r.throughput_bytes_per_s / 1e6,
            ratio(r.throughput_bytes_per_s, bare.map(|b| b.throughput_bytes_per_s)),
            r.rr_latency_us.p50,
            r.rr_latency_us.p99,
            r.host_copies_per_byte,
            r.indicate_stalls,
            r.indicate_acks,
            r.anon_pool_high_water_bytes
                .max(r.copy_buffer_high_water_bytes)
                / 1024,
            if r.integrity_ok { "ok" } else { "FAILED" }
        ));
    }
    s
}
