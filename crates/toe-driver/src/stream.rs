//! Blocking stream handles over a shared [`Driver`]: `std::io::Read` and `std::io::Write` for
//! ordinary socket code, plus blocking named-buffer receives.
//!
//! A handle does not know how its host runs. It asks a [`Waiter`] for the time and to wait:
//! on the single-threaded virtual clock, waiting runs the whole simulated world one step; in
//! real time it blocks until the NIC raises an event or a timer is due. The driver lock is
//! never held while waiting.

use std::io;
use std::sync::Arc;

use parking_lot::Mutex;
use toe_bus::time::Instant;
use toe_bus::{ConnId, HostBuf};

use crate::conn::NamedCompletion;
use crate::driver::{ConnInfo, ConnState, Driver, DriverError};

/// A driver shared between the runtime and application handles.
pub type SharedDriver = Arc<Mutex<Driver>>;

/// How a blocking handle lets its host make progress.
pub trait Waiter: Send + Sync {
    /// The host's current time.
    fn now(&self) -> Instant;
    /// Let the host (or the whole simulated world) run until something may have changed for
    /// the driver, or until `deadline`. Called without the driver lock held. An error means no
    /// progress is possible any more (a simulation with nothing left to do, a stopped runtime).
    fn wait(&self, deadline: Option<Instant>) -> io::Result<()>;
}

fn io_err(e: DriverError) -> io::Error {
    match e {
        DriverError::UnknownConn(_) => io::Error::new(io::ErrorKind::NotConnected, e),
        DriverError::BadState {
            state: ConnState::Reset,
            ..
        } => io::Error::new(io::ErrorKind::ConnectionReset, e),
        DriverError::BadState { .. } => io::Error::new(io::ErrorKind::NotConnected, e),
        DriverError::Memory(_) => io::Error::new(io::ErrorKind::OutOfMemory, e),
        _ => io::Error::new(io::ErrorKind::InvalidInput, e),
    }
}

/// A connected TCP stream on an emulated TOE host.
#[derive(Clone)]
pub struct Stream {
    drv: SharedDriver,
    conn: ConnId,
    waiter: Arc<dyn Waiter>,
    /// Largest single send buffer, in bytes.
    pub write_chunk_bytes: usize,
    /// Most unacknowledged send bytes before `write` blocks.
    pub max_unacked_bytes: usize,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream").field("conn", &self.conn).finish()
    }
}

impl Stream {
    /// A handle for `conn` of `drv`.
    pub fn new(drv: SharedDriver, conn: ConnId, waiter: Arc<dyn Waiter>) -> Self {
        Stream {
            drv,
            conn,
            waiter,
            write_chunk_bytes: 256 * 1024,
            max_unacked_bytes: 2 * 1024 * 1024,
        }
    }

    /// Wait for an active open `conn` to complete (or fail).
    pub fn connected(drv: SharedDriver, conn: ConnId, waiter: Arc<dyn Waiter>) -> io::Result<Self> {
        let s = Stream::new(drv, conn, waiter);
        s.wait_until(|d| match d.state(s.conn).map_err(io_err)? {
            ConnState::Connecting => Ok(None),
            ConnState::Failed(e) => Err(io::Error::new(io::ErrorKind::ConnectionRefused, e)),
            _ => Ok(Some(())),
        })?;
        Ok(s)
    }

    /// Wait for the next connection accepted on listening `port` of `drv`.
    pub fn accept(drv: SharedDriver, port: u16, waiter: Arc<dyn Waiter>) -> io::Result<Self> {
        loop {
            let deadline = {
                let mut d = drv.lock();
                d.poll(waiter.now());
                if let Some(conn) = d.accept(port) {
                    drop(d);
                    return Ok(Stream::new(drv, conn, waiter));
                }
                d.poll_at()
            };
            waiter.wait(deadline)?;
        }
    }

    /// The connection id.
    pub fn conn(&self) -> ConnId {
        self.conn
    }
    /// The driver.
    pub fn driver(&self) -> &SharedDriver {
        &self.drv
    }
    /// The waiter.
    pub fn waiter(&self) -> &Arc<dyn Waiter> {
        &self.waiter
    }
    /// State and counters.
    pub fn info(&self) -> io::Result<ConnInfo> {
        self.drv.lock().conn_info(self.conn).map_err(io_err)
    }

    /// Run `f` on the polled driver until it yields a value, waiting in between.
    pub fn wait_until<T>(
        &self,
        mut f: impl FnMut(&mut Driver) -> io::Result<Option<T>>,
    ) -> io::Result<T> {
        loop {
            let deadline = {
                let mut d = self.drv.lock();
                d.poll(self.waiter.now());
                if let Some(v) = f(&mut d)? {
                    d.flush();
                    return Ok(v);
                }
                d.flush();
                d.poll_at()
            };
            self.waiter.wait(deadline)?;
        }
    }

    /// Post `buf` as a named buffer (push mode optional) and wait for it to come back.
    pub fn recv_named(&self, buf: HostBuf, push: bool) -> io::Result<NamedCompletion> {
        {
            let mut d = self.drv.lock();
            let now = self.waiter.now();
            d.post_named(now, self.conn, buf, push).map_err(|r| {
                d.free(r.buf);
                io_err(r.error)
            })?;
        }
        self.wait_until(|d| d.take_completion(self.conn).map_err(io_err))
    }

    /// Post a named buffer without waiting.
    pub fn post_named(&self, buf: HostBuf, push: bool) -> io::Result<()> {
        let mut d = self.drv.lock();
        let now = self.waiter.now();
        d.post_named(now, self.conn, buf, push)
            .map(|_| ())
            .map_err(|r| {
                d.free(r.buf);
                io_err(r.error)
            })
    }

    /// Wait for the next completed named buffer.
    pub fn next_completion(&self) -> io::Result<NamedCompletion> {
        self.wait_until(|d| d.take_completion(self.conn).map_err(io_err))
    }

    /// Accept received data in place, waiting until some is available; `f` returns how many
    /// bytes of each slice it accepted. Returns 0 at end of stream.
    pub fn accept_in_place(&self, mut f: impl FnMut(&[u8]) -> usize) -> io::Result<usize> {
        self.wait_until(|d| {
            let now = self.waiter.now();
            let n = d.accept_in_place(now, self.conn, &mut f).map_err(io_err)?;
            if n > 0 {
                return Ok(Some(n));
            }
            if d.at_eof(self.conn).map_err(io_err)? {
                if d.state(self.conn).map_err(io_err)? == ConnState::Reset {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        format!("connection {} reset by peer", self.conn),
                    ));
                }
                return Ok(Some(0));
            }
            if let ConnState::Closed | ConnState::Failed(_) = d.state(self.conn).map_err(io_err)? {
                return Ok(Some(0));
            }
            Ok(None)
        })
    }

    /// Free send buffers the NIC has returned.
    fn reap_sends(d: &mut Driver, conn: ConnId) -> io::Result<bool> {
        let mut all_ok = true;
        while let Some((buf, ok)) = d.take_send_done(conn).map_err(io_err)? {
            all_ok &= ok;
            d.free(buf);
        }
        Ok(all_ok)
    }

    /// Graceful close after every queued byte was sent.
    pub fn close(&self) -> io::Result<()> {
        self.drv.lock().close(self.conn).map_err(io_err)
    }

    /// Abortive close (RST).
    pub fn abort(&self) -> io::Result<()> {
        self.drv.lock().abort(self.conn).map_err(io_err)
    }

    /// Wait until the NIC released the connection, then forget it.
    pub fn wait_closed(&self) -> io::Result<()> {
        self.wait_until(|d| {
            Self::reap_sends(d, self.conn)?;
            match d.state(self.conn).map_err(io_err)? {
                ConnState::Closed | ConnState::Failed(_) => Ok(d.release(self.conn).ok()),
                ConnState::Reset => Ok(d.release(self.conn).ok()),
                _ => Ok(None),
            }
        })
    }
}

impl io::Read for Stream {
    fn read(&mut self, dst: &mut [u8]) -> io::Result<usize> {
        if dst.is_empty() {
            return Ok(0);
        }
        let mut at = 0;
        let n = self.accept_in_place(|src| {
            let k = src.len().min(dst.len() - at);
            dst[at..at + k].copy_from_slice(&src[..k]);
            at += k;
            k
        })?;
        self.drv.lock().memory().count_copy_out(n);
        Ok(n)
    }
}

impl io::Write for Stream {
    fn write(&mut self, src: &[u8]) -> io::Result<usize> {
        if src.is_empty() {
            return Ok(0);
        }
        let chunk = src.len().min(self.write_chunk_bytes.max(1));
        let max_unacked = self.max_unacked_bytes;
        let conn = self.conn;
        self.wait_until(|d| {
            Self::reap_sends(d, conn)?;
            let info = d.conn_info(conn).map_err(io_err)?;
            match info.state {
                ConnState::Established | ConnState::PeerClosed => {}
                ConnState::Connecting => return Ok(None),
                ConnState::Reset => {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        "reset by peer",
                    ))
                }
                s => {
                    return Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        format!("connection {conn} is {s:?}"),
                    ))
                }
            }
            if info.send_bytes_outstanding > 0 && info.send_bytes_outstanding + chunk > max_unacked
            {
                return Ok(None);
            }
            let mut buf = match d.alloc(chunk) {
                Ok(b) => b,
                Err(_) if info.sends_outstanding > 0 => return Ok(None),
                Err(e) => return Err(io_err(e)),
            };
            let mem = d.memory().clone();
            mem.slice_mut(&mut buf).copy_from_slice(&src[..chunk]);
            mem.count_copy_in(chunk);
            d.send(conn, buf, chunk).map_err(|r| {
                d.free(r.buf);
                io_err(r.error)
            })?;
            Ok(Some(chunk))
        })
    }

    fn flush(&mut self) -> io::Result<()> {
        let conn = self.conn;
        self.wait_until(|d| {
            let ok = Self::reap_sends(d, conn)?;
            if !ok {
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "connection ended before the peer acknowledged every byte",
                ));
            }
            Ok((d.conn_info(conn).map_err(io_err)?.sends_outstanding == 0).then_some(()))
        })
    }
}
