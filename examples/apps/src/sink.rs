//! `sink`: receives until EOF and reports bytes, SHA-256 and throughput per connection (the
//! discard service, port 9 by default). An optional consumption rate makes it a slow
//! application, to watch the indicate window throttle a fast sender.
//!
//! Also the `send` client: connects, sends N bytes of the seeded stream, closes, and reports
//! the SHA-256 of what it sent.

use std::io;
use std::net::SocketAddrV4;

use sha2::{Digest, Sha256};
use toe_bus::time::Instant;
use toe_bus::ConnId;
use toe_driver::{ConnState, Driver};

use crate::datagen::DataGen;
use crate::io::{ConnIo, RxMode};
use crate::App;

/// One finished sink connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkResult {
    /// Connection.
    pub conn: ConnId,
    /// Bytes received.
    pub bytes: u64,
    /// SHA-256 of them, hex.
    pub sha256: String,
    /// Microseconds from accept to EOF.
    pub micros: u64,
    /// The peer reset the connection instead of closing it.
    pub reset: bool,
}

struct SinkConn {
    io: ConnIo,
    hasher: Sha256,
    started: Instant,
    taken_at_rate: u64,
}

/// The sink server.
pub struct Sink {
    port: u16,
    mode: RxMode,
    rate_bytes_per_s: Option<u64>,
    conns: Vec<SinkConn>,
    log: Vec<String>,
    /// Results of finished connections, oldest first.
    pub results: Vec<SinkResult>,
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sink").field("port", &self.port).finish()
    }
}

impl Sink {
    /// A sink on `port`; with `rate_bytes_per_s` it consumes at most that many bytes per
    /// second of the host's clock.
    pub fn new(port: u16, mode: RxMode, rate_bytes_per_s: Option<u64>) -> Self {
        Sink {
            port,
            mode,
            rate_bytes_per_s,
            conns: Vec::new(),
            log: Vec::new(),
            results: Vec::new(),
        }
    }
}

impl App for Sink {
    fn name(&self) -> &'static str {
        "sink"
    }

    fn poll(&mut self, d: &mut Driver, now: Instant) -> io::Result<bool> {
        let mut busy = false;
        while let Some(conn) = d.accept(self.port) {
            self.conns.push(SinkConn {
                io: ConnIo::new(conn, self.mode),
                hasher: Sha256::new(),
                started: now,
                taken_at_rate: 0,
            });
            busy = true;
        }
        let mut i = 0;
        while i < self.conns.len() {
            let c = &mut self.conns[i];
            let budget = match self.rate_bytes_per_s {
                Some(rate) => {
                    let elapsed_us = (now - c.started.min(now)).total_micros();
                    let allowed = (rate as u128 * elapsed_us as u128 / 1_000_000) as u64;
                    allowed.saturating_sub(c.taken_at_rate) as usize
                }
                None => usize::MAX,
            };
            let mut left = budget;
            let h = &mut c.hasher;
            let n = c.io.recv(d, now, |data| {
                let n = data.len().min(left);
                h.update(&data[..n]);
                left -= n;
                n
            })?;
            c.taken_at_rate += n as u64;
            busy |= n > 0;
            let reset = c.io.was_reset(d);
            if c.io.eof(d) || reset {
                c.io.close(d)?;
                if c.io.try_release(d) {
                    let c = self.conns.swap_remove(i);
                    let r = SinkResult {
                        conn: c.io.conn,
                        bytes: c.io.rx_bytes,
                        sha256: hex::encode(c.hasher.finalize()),
                        micros: (now - c.started).total_micros(),
                        reset,
                    };
                    let secs = r.micros.max(1) as f64 / 1e6;
                    self.log.push(format!(
                        "sink: connection {} {} bytes sha256 {} in {:.3} s ({:.1} MB/s){}",
                        r.conn,
                        r.bytes,
                        r.sha256,
                        secs,
                        r.bytes as f64 / secs / 1e6,
                        if r.reset { " RESET" } else { "" }
                    ));
                    self.results.push(r);
                    busy = true;
                    continue;
                }
            }
            i += 1;
        }
        Ok(busy)
    }

    fn take_log(&mut self) -> Vec<String> {
        std::mem::take(&mut self.log)
    }
}

/// The `send` client: N bytes of the seeded stream to `to`, then close.
pub struct SendClient {
    to: SocketAddrV4,
    total: u64,
    gen: DataGen,
    hasher: Sha256,
    io: Option<ConnIo>,
    chunk: usize,
    started: Option<Instant>,
    finished: bool,
    log: Vec<String>,
    /// Set when the transfer failed.
    pub error: Option<String>,
}

impl std::fmt::Debug for SendClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendClient").field("to", &self.to).finish()
    }
}

impl SendClient {
    /// Send `total` bytes of the stream seeded with `seed` to `to`.
    pub fn new(to: SocketAddrV4, total: u64, seed: u64) -> Self {
        SendClient {
            to,
            total,
            gen: DataGen::new(seed),
            hasher: Sha256::new(),
            io: None,
            chunk: 256 * 1024,
            started: None,
            finished: false,
            log: Vec::new(),
            error: None,
        }
    }
}

impl App for SendClient {
    fn name(&self) -> &'static str {
        "send"
    }

    fn poll(&mut self, d: &mut Driver, now: Instant) -> io::Result<bool> {
        if self.finished {
            return Ok(false);
        }
        let io = match &mut self.io {
            Some(io) => io,
            None => {
                let conn = d
                    .connect(self.to, 0, None)
                    .map_err(|e| io::Error::other(e.to_string()))?;
                self.started = Some(now);
                self.io.insert(ConnIo::new(conn, RxMode::InPlace))
            }
        };
        match d.state(io.conn) {
            Ok(ConnState::Connecting) => return Ok(false),
            Ok(ConnState::Failed(e)) => {
                self.error = Some(format!("connect to {}: {e}", self.to));
                self.log
                    .push(format!("send: {}", self.error.as_deref().unwrap_or("")));
                self.finished = true;
                let _ = io.try_release(d);
                return Ok(true);
            }
            Ok(ConnState::Reset) => {
                self.error = Some("connection reset by peer".into());
                self.log.push("send: connection reset by peer".into());
                self.finished = true;
                return Ok(true);
            }
            _ => {}
        }
        io.reap(d)?;
        let mut busy = false;
        while io.tx_bytes < self.total {
            let n = (self.total - io.tx_bytes).min(self.chunk as u64) as usize;
            let (gen, hasher) = (&mut self.gen, &mut self.hasher);
            let sent = io.send_with(d, n, |b| {
                gen.fill(b);
                hasher.update(&*b);
            })?;
            if !sent {
                break;
            }
            busy = true;
        }
        // drain anything the peer sends back (a discard server sends nothing)
        io.recv(d, now, |data| data.len())?;
        if io.tx_bytes == self.total && io.outstanding() == 0 {
            io.close(d)?;
        }
        if io.tx_bytes == self.total && (io.eof(d) || io.was_reset(d)) && io.try_release(d) {
            let secs = (now - self.started.unwrap_or(now)).total_micros().max(1) as f64 / 1e6;
            self.log.push(format!(
                "send: {} bytes to {} sha256 {} in {:.3} s ({:.1} MB/s)",
                self.total,
                self.to,
                hex::encode(self.hasher.clone().finalize()),
                secs,
                self.total as f64 / secs / 1e6
            ));
            self.finished = true;
            busy = true;
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
