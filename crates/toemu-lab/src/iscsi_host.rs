//! iSCSI on an emulated TOE host: the target as a poll-style app ([`toemu_apps::App`]) over
//! the host driver, so the same [`TargetConn`] machine that serves std TCP serves a TAP device
//! (real Linux initiators in a namespace) and the in-memory wire on the virtual clock.
//!
//! The data path is software (`--offload software`): the driver indicates the received
//! stream, the app copies it into the machine, digests are computed on the host, and what the
//! machine emits is copied into send buffers. The NIC's iSCSI engine (the next step) takes
//! digests and data placement off the host.

use std::io;
use std::sync::{Arc, Mutex};

use toe_bus::time::Instant;
use toe_driver::Driver;
use toe_iscsi::login::TargetConfig;
use toe_iscsi::scsi::Disk;
use toe_iscsi::target::TargetConn;
use toemu_apps::{App, ConnIo, RxMode};

use crate::iscsi::Totals;

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

impl Session {
    /// Send what the machine emitted, as far as the send budget allows. Returns true if
    /// anything went.
    fn flush(&mut self, d: &mut Driver) -> io::Result<bool> {
        let mut any = false;
        while self.sent < self.out.len() {
            let end = (self.sent + SEND_CHUNK).min(self.out.len());
            if !self.io.send_copy(d, &self.out[self.sent..end])? {
                break;
            }
            self.sent = end;
            any = true;
        }
        if self.sent == self.out.len() {
            self.out.clear();
            self.sent = 0;
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
