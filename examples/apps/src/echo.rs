//! `echo`: echoes every byte on every connection (RFC 862 over TCP, port 7 by default).
//! Backpressure: an echo that cannot be sent (send budget used up) is not accepted, so the
//! data stays indicated and the client's TCP window closes.

use std::io;

use toe_bus::time::Instant;
use toe_driver::Driver;

use crate::io::{ConnIo, RxMode};
use crate::App;

/// The echo server.
#[derive(Debug)]
pub struct Echo {
    port: u16,
    mode: RxMode,
    conns: Vec<ConnIo>,
    log: Vec<String>,
    /// Bytes echoed in total.
    pub echoed: u64,
}

impl Echo {
    /// An echo server on `port` (the caller has made the driver listen there).
    pub fn new(port: u16, mode: RxMode) -> Self {
        Echo {
            port,
            mode,
            conns: Vec::new(),
            log: Vec::new(),
            echoed: 0,
        }
    }
}

impl App for Echo {
    fn name(&self) -> &'static str {
        "echo"
    }

    fn poll(&mut self, d: &mut Driver, now: Instant) -> io::Result<bool> {
        let mut busy = false;
        while let Some(conn) = d.accept(self.port) {
            self.conns.push(ConnIo::new(conn, self.mode));
            busy = true;
        }
        let mut i = 0;
        let mut staging = Vec::new();
        while i < self.conns.len() {
            let c = &mut self.conns[i];
            c.reap(d)?;
            let room = c.max_outstanding_bytes.saturating_sub(c.outstanding());
            staging.clear();
            if room > 0 {
                c.recv(d, now, |data| {
                    let n = data.len().min(room - staging.len());
                    staging.extend_from_slice(&data[..n]);
                    n
                })?;
            }
            if !staging.is_empty() {
                busy = true;
                for chunk in staging.chunks(256 * 1024) {
                    if !c.send_copy(d, chunk)? {
                        return Err(io::Error::other("echo: host memory exhausted"));
                    }
                }
                self.echoed += staging.len() as u64;
            }
            if c.eof(d) && c.outstanding() == 0 {
                c.close(d)?;
            }
            if c.try_release(d) {
                self.log.push(format!(
                    "echo: connection {} done, {} bytes echoed",
                    c.conn, c.rx_bytes
                ));
                self.conns.swap_remove(i);
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
