//! The message transport on the emulated TOE: [`MsgServerApp`] (the storage server) and
//! [`MsgSendApp`] (the sender) are example apps over the host driver, so they run on the
//! virtual clock over the in-memory wire (with the impairment model, deterministic) or in
//! real time over TAP. They share their links, server and sender logic with the std-TCP
//! shells of [`crate::msg`]; only the byte stream differs: a driver connection
//! ([`ConnIo`], received data accepted in place, sent data copied into host memory).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;

use toe_bus::ring::ConnId;
use toe_bus::time::Instant;
use toe_driver::{AppEvent, ConnState, Driver};
use toemu_apps::{App, ConnIo, RxMode};

use crate::msg::{
    all_gone, pass, Link, Security, SendOptions, SendReport, Sender, Server, SessionResult, Sock,
    Visit,
};
use toe_msg::PipeConfig;

/// What a driver connection needs to move bytes: the driver and the time.
pub(crate) struct ToeCx<'a> {
    d: &'a mut Driver,
    now: Instant,
}

/// Bytes handed to the NIC per send, at most.
const SEND_CHUNK: usize = 64 << 10;

impl Sock<ToeCx<'_>> for ConnIo {
    // The driver's application events say which connections changed
    // ([`ToeLinks::wake`]).
    const NEWS: bool = true;

    fn recv(&mut self, cx: &mut ToeCx<'_>, raw: &mut Vec<u8>) -> io::Result<bool> {
        // The send buffers the NIC is done with free room for more.
        self.reap(cx.d)?;
        ConnIo::recv(self, cx.d, cx.now, |b| {
            raw.extend_from_slice(b);
            b.len()
        })?;
        Ok(!self.eof(cx.d))
    }

    fn send(&mut self, cx: &mut ToeCx<'_>, data: &[u8]) -> io::Result<usize> {
        let take = data.len().min(SEND_CHUNK);
        if take == 0 || !self.can_send(take) {
            return Ok(0);
        }
        Ok(if self.send_copy(cx.d, &data[..take])? {
            take
        } else {
            0
        })
    }

    fn unacked(&self, _cx: &ToeCx<'_>) -> Option<usize> {
        // Send buffers come back from the NIC when TCP acknowledged them.
        Some(self.outstanding())
    }

    fn can_take(&self, cx: &ToeCx<'_>) -> bool {
        matches!(
            cx.d.state(self.conn),
            Ok(ConnState::Established | ConnState::PeerClosed)
        ) && self.outstanding() < self.max_outstanding_bytes
    }
}

/// An app's links on the host driver, and which link each driver connection is: the
/// driver's application events wake theirs, so a pass reads only the connections that
/// changed (a pipe of 1,000 mostly idle connections costs little per pass).
#[derive(Default)]
struct ToeLinks {
    links: Vec<Link<ConnIo>>,
    /// Position in `links` by connection.
    index: HashMap<ConnId, usize>,
    /// Links came or went since the last [`ToeLinks::wake`]: the next pass visits all.
    changed: bool,
    /// When the opener's connections were opened, µs.
    opened_us: Option<u64>,
    /// The shortest time from opening a connection to its being connected, µs: the
    /// handshake's round trip, without queueing (on a host's first connections, the ARP
    /// exchange's too).
    round_us: Option<u64>,
}

impl ToeLinks {
    fn push(&mut self, l: Link<ConnIo>) {
        self.index.insert(l.sock.conn, self.links.len());
        self.links.push(l);
        self.changed = true;
    }

    fn len(&self) -> usize {
        self.links.len()
    }

    /// Take the driver's application events (this app owns the host's connections):
    /// each wakes its connection's link in `visit`; errors are logged.
    fn wake(&mut self, d: &mut Driver, now_us: u64, visit: &mut Visit, log: &mut Vec<String>) {
        visit.all |= std::mem::take(&mut self.changed);
        while let Some((c, e)) = d.take_event() {
            match &e {
                AppEvent::Error(why) => {
                    log.push(format!("toemu msg: the NIC reported for {c:?}: {why}"));
                }
                AppEvent::Connected => {
                    if let Some(t) = self.opened_us {
                        let rtt = now_us.saturating_sub(t).max(1);
                        self.round_us = Some(self.round_us.map_or(rtt, |r| r.min(rtt)));
                    }
                }
                _ => {}
            }
            if let Some(&i) = self.index.get(&c) {
                visit.wake(&mut self.links, i);
            }
        }
    }

    /// Close the dead links' connections (if `any` died); they are released by
    /// [`release_closing`].
    fn retire_dead(&mut self, any: bool, closing: &mut Vec<ConnIo>, d: &mut Driver) {
        if !any {
            return;
        }
        self.changed = true;
        let mut i = 0;
        while i < self.links.len() {
            if self.links[i].dead {
                let mut l = self.links.swap_remove(i);
                self.index.remove(&l.sock.conn);
                if let Some(moved) = self.links.get(i) {
                    self.index.insert(moved.sock.conn, i);
                }
                // A connection the NIC already dropped has nothing to close.
                let _ = l.sock.close(d);
                closing.push(l.sock);
            } else {
                i += 1;
            }
        }
    }
}

/// Release the closing connections the NIC is done with.
fn release_closing(closing: &mut Vec<ConnIo>, d: &mut Driver) {
    closing.retain_mut(|c| !c.try_release(d));
}

/// The earliest of two timers (µs), as an instant of the host's clock.
fn earliest(t: [Option<u64>; 2]) -> Option<Instant> {
    t.into_iter()
        .flatten()
        .min()
        .map(|t| Instant::from_micros(t as i64))
}

fn micros(t: Instant) -> u64 {
    t.total_micros().max(0) as u64
}

/// The storage server (`toemu msg serve`) as an app on an emulated host: it listens on a
/// port, takes pipes of any number of connections, and accepts the sessions that ask for
/// its principal (any, in plaintext).
pub struct MsgServerApp {
    port: u16,
    security: Security,
    server: Server,
    links: ToeLinks,
    closing: Vec<ConnIo>,
    listening: bool,
    /// Seconds since 1970 that certificates are checked against.
    unix_s: u64,
    /// The last poll's time, µs.
    now_us: u64,
    log: Vec<String>,
}

impl std::fmt::Debug for MsgServerApp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MsgServerApp")
            .field("port", &self.port)
            .field("links", &self.links.len())
            .field("sessions_closed", &self.server.results.len())
            .finish()
    }
}

impl MsgServerApp {
    /// A server on `port` with `security`, each session's messages hashed (and written
    /// under `dir` if given), with the limits of `cfg`.
    pub fn new(
        port: u16,
        security: Security,
        dir: Option<std::path::PathBuf>,
        cfg: PipeConfig,
    ) -> Self {
        MsgServerApp {
            port,
            server: Server::new(&security, dir, cfg),
            security,
            links: ToeLinks::default(),
            closing: Vec::new(),
            listening: false,
            unix_s: crate::msg::unix_now(),
            now_us: 0,
            log: Vec::new(),
        }
    }

    /// A slow application: it takes messages at `bytes_per_s` (they wait in the input
    /// queue meanwhile; the window the acknowledgements carry shrinks).
    pub fn with_app_rate(mut self, bytes_per_s: f64) -> Self {
        self.server = self.server.with_app_rate(bytes_per_s);
        self
    }

    /// The sessions that closed, in order.
    pub fn results(&self) -> &[SessionResult] {
        &self.server.results
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.links.len()
    }
}

impl App for MsgServerApp {
    fn name(&self) -> &'static str {
        "msg-serve"
    }

    fn poll(&mut self, d: &mut Driver, now: Instant) -> io::Result<bool> {
        if !self.listening {
            d.listen(self.port, 1024, None)
                .map_err(|e| io::Error::other(e.to_string()))?;
            self.listening = true;
            self.log.push(format!(
                "toemu msg serve: listening on port {}, {}",
                self.port,
                self.security.describe()
            ));
        }
        while let Some(c) = d.accept(self.port) {
            let label = d
                .conn_info(c)
                .ok()
                .and_then(|i| i.remote)
                .map_or_else(|| format!("{c:?}"), |r| r.to_string());
            let tls = self.security.server(self.unix_s)?;
            self.links
                .push(Link::accepted(ConnIo::new(c, RxMode::InPlace), label, tls));
        }
        let now_us = micros(now);
        self.links
            .wake(d, now_us, &mut self.server.pipes.visit, &mut self.log);
        self.now_us = now_us;
        let log = &mut self.log;
        let passed = pass(
            &mut self.links.links,
            &mut ToeCx { d, now },
            &mut self.server.pipes,
            now_us,
            None,
            &mut |l| log.push(l),
        );
        self.server.handle(now_us, &mut |l| log.push(l))?;
        self.links.retire_dead(passed.dropped, &mut self.closing, d);
        release_closing(&mut self.closing, d);
        Ok(passed.moved)
    }

    fn take_log(&mut self) -> Vec<String> {
        std::mem::take(&mut self.log)
    }

    fn poll_at(&self) -> Option<Instant> {
        earliest([
            self.server.next_deadline(),
            self.server.app_ready_at(self.now_us),
        ])
    }
}

/// The sender (`toemu msg send`) as an app on an emulated host: one pipe of
/// `connections` connections to the server; done when every session closed (or on an
/// error, see [`MsgSendApp::report`]).
pub struct MsgSendApp {
    opts: SendOptions,
    security: Security,
    sender: Sender,
    links: ToeLinks,
    closing: Vec<ConnIo>,
    unix_s: u64,
    started: Option<Instant>,
    finished: Option<Instant>,
    /// Every connection closed after the transfer (or [`CLOSE_LINGER`] passed).
    closed: bool,
    error: Option<String>,
    /// The pacer held a connection back until then, µs.
    paced_until: Option<u64>,
    /// The rate last given to the NIC's egress shaper, payload bytes per second (packet
    /// pacing).
    shaped: Option<u64>,
    /// Bytes a connection holds unacknowledged before it takes no more frames.
    conn_send_bytes: usize,
    log: Vec<String>,
}

impl std::fmt::Debug for MsgSendApp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MsgSendApp")
            .field("to", &self.opts.to)
            .field("links", &self.links.len())
            .field("error", &self.error)
            .finish()
    }
}

impl MsgSendApp {
    /// A sender of `opts` with `security`; `pipe_id` names its pipe (a seed, for
    /// deterministic replays).
    pub fn new(opts: SendOptions, security: Security, pipe_id: u64) -> Self {
        let mut sender = Sender::new(&opts, pipe_id);
        sender.flow.packets = opts.pace_packets && opts.pacing.is_some();
        MsgSendApp {
            sender,
            opts,
            security,
            links: ToeLinks::default(),
            closing: Vec::new(),
            unix_s: crate::msg::unix_now(),
            started: None,
            finished: None,
            closed: false,
            error: None,
            paced_until: None,
            shaped: None,
            conn_send_bytes: 4 << 20,
            log: Vec::new(),
        }
    }

    /// A connection takes no more frames while it holds `bytes` that TCP has not
    /// acknowledged (default 4 MiB): about its socket's send buffer, so that a connection
    /// slowed by a loss holds up only what it can carry, and the dispatcher gives the next
    /// frames to the others.
    pub fn with_conn_send_bytes(mut self, bytes: usize) -> Self {
        self.conn_send_bytes = bytes.max(1);
        self
    }

    /// (µs of the host's clock, bytes acknowledged by then), one point per
    /// acknowledgement: goodput over time.
    pub fn progress(&self) -> &[(u64, u64)] {
        &self.sender.progress
    }

    /// What it measured (seconds of the host's clock from the first connection to the
    /// last session closed); the error if it failed.
    pub fn report(&self) -> Result<SendReport, String> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        let (Some(a), Some(b)) = (self.started, self.finished) else {
            return Err("the sender has not finished".into());
        };
        Ok(self.sender.report((b - a).total_micros() as f64 / 1e6))
    }

    fn run(&mut self, d: &mut Driver, now: Instant) -> io::Result<bool> {
        let SocketAddr::V4(to) = self.opts.to else {
            return Err(io::Error::other("the emulated host speaks IPv4 only"));
        };
        if self.started.is_none() {
            self.started = Some(now);
            self.links.opened_us = Some(micros(now));
            for _ in 0..self.opts.connections.max(1) {
                let c = d
                    .connect(to, 0, None)
                    .map_err(|e| io::Error::other(e.to_string()))?;
                if let Some(slo) = self.opts.slo {
                    // Behind the Connect on the command ring: the SYN is marked too.
                    d.set_dscp(c, slo.dscp())
                        .map_err(|e| io::Error::other(e.to_string()))?;
                }
                if self.sender.flow.packets {
                    d.set_paced(c, true)
                        .map_err(|e| io::Error::other(e.to_string()))?;
                }
                let tls = self.security.client(&self.opts.principal, self.unix_s)?;
                let mut io = ConnIo::new(c, RxMode::InPlace);
                io.max_outstanding_bytes = self.conn_send_bytes;
                self.links
                    .push(Link::opened(io, to.to_string(), tls, self.sender.pipe_id));
            }
        }
        let now_us = micros(now);
        self.sender.feed(now_us)?;
        self.links
            .wake(d, now_us, &mut self.sender.pipes.visit, &mut self.log);
        self.sender.flow.round_us = self.links.round_us;
        let log = &mut self.log;
        let passed = pass(
            &mut self.links.links,
            &mut ToeCx { d, now },
            &mut self.sender.pipes,
            now_us,
            Some(&mut self.sender.flow),
            &mut |l| log.push(l),
        );
        self.paced_until = passed.paced_until;
        let moved = passed.moved;
        self.sender
            .handle(now_us, &mut |_| {}, &mut |l| log.push(l))?;
        self.shape(d);
        let done = self.sender.done();
        if done {
            for l in &mut self.links.links {
                l.dead = true;
            }
            self.finished = Some(now);
        } else if passed.dropped && self.links.links.iter().all(|l| l.dead) {
            return Err(all_gone(&self.links.links));
        }
        self.links
            .retire_dead(passed.dropped || done, &mut self.closing, d);
        release_closing(&mut self.closing, d);
        Ok(moved)
    }

    /// Packet pacing: give the NIC's egress shaper the pacing rate when it moved by more
    /// than [`SHAPE_STEP`] (a command per change, not per pass).
    fn shape(&mut self, d: &mut Driver) {
        let Some(rate) = self.sender.flow.packet_rate() else {
            return;
        };
        let rate = rate.max(1.0) as u64;
        let moved = self
            .shaped
            .is_none_or(|r| rate.abs_diff(r) as f64 > SHAPE_STEP * r as f64);
        if moved {
            let burst = self.opts.pacing.map_or(64 << 10, |p| p.burst_bytes);
            d.set_shaper(rate, burst.min(u32::MAX as usize) as u32);
            self.shaped = Some(rate);
        }
    }
}

/// How long a finished sender waits for its connections to close before it is done.
const CLOSE_LINGER: toe_bus::time::Duration = toe_bus::time::Duration::from_secs(1);

/// The relative change of the pacing rate that reaches the NIC's shaper.
const SHAPE_STEP: f64 = 0.01;

impl App for MsgSendApp {
    fn name(&self) -> &'static str {
        "msg-send"
    }

    fn poll(&mut self, d: &mut Driver, now: Instant) -> io::Result<bool> {
        if let Some(f) = self.finished {
            // The transfer is over: its connections close (FIN and the peer's), for at
            // most the linger.
            release_closing(&mut self.closing, d);
            self.closed = self.closing.is_empty() || now >= f + CLOSE_LINGER;
            return Ok(false);
        }
        if self.error.is_some() {
            release_closing(&mut self.closing, d);
            return Ok(false);
        }
        match self.run(d, now) {
            Ok(m) => Ok(m),
            Err(e) => {
                self.log.push(format!("toemu msg send: {e}"));
                self.error = Some(e.to_string());
                Ok(true)
            }
        }
    }

    fn take_log(&mut self) -> Vec<String> {
        std::mem::take(&mut self.log)
    }

    fn done(&self) -> bool {
        self.closed || self.error.is_some()
    }

    fn poll_at(&self) -> Option<Instant> {
        if let Some(f) = self.finished {
            return Some(f + CLOSE_LINGER);
        }
        earliest([
            self.sender.next_deadline(),
            self.sender.flow.next_deadline(self.paced_until),
        ])
    }
}
