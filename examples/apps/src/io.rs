//! Per-connection receive and send helpers shared by the apps.

use std::io;

use toe_bus::time::Instant;
use toe_bus::{ConnId, HostBuf, ReturnReason};
use toe_driver::{ConnState, Driver, DriverError};

/// How an app receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RxMode {
    /// Accept indicated data in place (no named buffers).
    #[default]
    InPlace,
    /// Keep `bufs` named buffers of `buf_bytes` posted, in push mode or not.
    Named {
        /// Size of each buffer in bytes (larger than W for direct placement by the NIC).
        buf_bytes: usize,
        /// Buffers kept posted.
        bufs: usize,
        /// Return buffers early on TCP PSH (and by the push timer).
        push: bool,
    },
}

fn err(e: DriverError) -> io::Error {
    io::Error::other(e.to_string())
}

/// One connection's I/O state.
#[derive(Debug)]
pub struct ConnIo {
    /// The connection.
    pub conn: ConnId,
    mode: RxMode,
    posted: bool,
    pending: Vec<u8>,
    pending_at: usize,
    send_outstanding_bytes: usize,
    /// Most unacknowledged send bytes before `can_send` says no, in bytes.
    pub max_outstanding_bytes: usize,
    /// Bytes delivered to the app.
    pub rx_bytes: u64,
    /// Bytes handed to the NIC.
    pub tx_bytes: u64,
    close_sent: bool,
}

impl ConnIo {
    /// I/O for `conn` in receive mode `mode`.
    pub fn new(conn: ConnId, mode: RxMode) -> Self {
        ConnIo {
            conn,
            mode,
            posted: false,
            pending: Vec::new(),
            pending_at: 0,
            send_outstanding_bytes: 0,
            max_outstanding_bytes: 4 << 20,
            rx_bytes: 0,
            tx_bytes: 0,
            close_sent: false,
        }
    }

    /// Offer received bytes to `f` in stream order; `f` returns how many it took (a short count
    /// stops the walk; the rest is offered again next time). Returns bytes taken.
    pub fn recv(
        &mut self,
        d: &mut Driver,
        now: Instant,
        mut f: impl FnMut(&[u8]) -> usize,
    ) -> io::Result<usize> {
        let mut total = 0;
        // leftovers of a named buffer the app did not take whole
        if self.pending_at < self.pending.len() {
            let n = f(&self.pending[self.pending_at..]);
            self.pending_at += n;
            total += n;
            if self.pending_at < self.pending.len() {
                self.rx_bytes += total as u64;
                return Ok(total);
            }
            self.pending.clear();
            self.pending_at = 0;
        }
        match self.mode {
            RxMode::InPlace => {
                total += d.accept_in_place(now, self.conn, &mut f).map_err(err)?;
            }
            RxMode::Named {
                buf_bytes,
                bufs,
                push,
            } => {
                if !self.posted {
                    self.posted = true;
                    for _ in 0..bufs.max(1) {
                        let b = d.alloc(buf_bytes.max(1)).map_err(err)?;
                        if let Err(r) = d.post_named(now, self.conn, b, push) {
                            d.free(r.buf);
                            return Err(err(r.error));
                        }
                    }
                }
                while let Some(c) = d.take_completion(self.conn).map_err(err)? {
                    let mem = d.memory().clone();
                    let data = &mem.slice(&c.buf)[..c.filled];
                    let n = f(data);
                    total += n;
                    if n < data.len() {
                        self.pending.extend_from_slice(&data[n..]);
                    }
                    self.recycle(d, now, c.buf, c.why, push);
                    if !self.pending.is_empty() {
                        break;
                    }
                }
            }
        }
        self.rx_bytes += total as u64;
        Ok(total)
    }

    fn recycle(
        &mut self,
        d: &mut Driver,
        now: Instant,
        buf: HostBuf,
        why: ReturnReason,
        push: bool,
    ) {
        // After the peer's end of stream a reposted buffer could only come back empty.
        let finished = matches!(
            why,
            ReturnReason::Eof | ReturnReason::Reset | ReturnReason::Cancelled
        ) || d.at_eof(self.conn).unwrap_or(true);
        if finished {
            d.free(buf);
        } else if let Err(r) = d.post_named(now, self.conn, buf, push) {
            d.free(r.buf);
        }
    }

    /// True when the peer's stream ended and everything was delivered.
    pub fn eof(&self, d: &Driver) -> bool {
        self.pending_at >= self.pending.len() && d.at_eof(self.conn).unwrap_or(true)
    }

    /// Free send buffers the NIC returned.
    pub fn reap(&mut self, d: &mut Driver) -> io::Result<()> {
        while let Some((buf, _ok)) = d.take_send_done(self.conn).map_err(err)? {
            self.send_outstanding_bytes = self.send_outstanding_bytes.saturating_sub(buf.len());
            d.free(buf);
        }
        Ok(())
    }

    /// Whether `len` more bytes may be queued now.
    pub fn can_send(&self, len: usize) -> bool {
        self.send_outstanding_bytes == 0
            || self.send_outstanding_bytes + len <= self.max_outstanding_bytes
    }

    /// Unacknowledged send bytes.
    pub fn outstanding(&self) -> usize {
        self.send_outstanding_bytes
    }

    /// Send `len` bytes that `fill` writes into a fresh host buffer (no copy for generated
    /// content). Returns false (and sends nothing) if the send budget or memory is exhausted.
    pub fn send_with(
        &mut self,
        d: &mut Driver,
        len: usize,
        fill: impl FnOnce(&mut [u8]),
    ) -> io::Result<bool> {
        if len == 0 {
            return Ok(true);
        }
        if !self.can_send(len) {
            return Ok(false);
        }
        let Ok(mut b) = d.alloc(len) else {
            return Ok(false);
        };
        let mem = d.memory().clone();
        fill(&mut mem.slice_mut(&mut b)[..len]);
        if let Err(r) = d.send(self.conn, b, len) {
            d.free(r.buf);
            return Err(err(r.error));
        }
        self.send_outstanding_bytes += len;
        self.tx_bytes += len as u64;
        Ok(true)
    }

    /// Send a copy of `data` (counted as a copy into host memory).
    pub fn send_copy(&mut self, d: &mut Driver, data: &[u8]) -> io::Result<bool> {
        let mem = d.memory().clone();
        let ok = self.send_with(d, data.len(), |b| b.copy_from_slice(data))?;
        if ok {
            mem.count_copy_in(data.len());
        }
        Ok(ok)
    }

    /// Graceful close (once).
    pub fn close(&mut self, d: &mut Driver) -> io::Result<()> {
        if !self.close_sent {
            self.close_sent = true;
            d.close(self.conn).map_err(err)?;
        }
        Ok(())
    }

    /// True once the NIC released the connection; then frees what is left and forgets it.
    pub fn try_release(&mut self, d: &mut Driver) -> bool {
        match d.state(self.conn) {
            Ok(ConnState::Closed | ConnState::Reset | ConnState::Failed(_)) => {
                let _ = self.reap(d);
                d.release(self.conn).is_ok()
            }
            Ok(_) => false,
            Err(_) => true,
        }
    }

    /// The connection was reset by the peer.
    pub fn was_reset(&self, d: &Driver) -> bool {
        matches!(d.state(self.conn), Ok(ConnState::Reset))
    }
}
