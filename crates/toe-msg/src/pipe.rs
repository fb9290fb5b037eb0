//! A pipe (seed 002): many sessions multiplexed over many connections to one peer. The
//! dispatcher here is the pipe's [`Pipe::fill`]: whichever connection has room carries the
//! next frame of the next session with something to send (round robin over sessions), so
//! one large message goes out over every free connection at once and the receiving session
//! reassembles it (see [`crate::session`]).
//!
//! Pure: the shell hands each connection's received bytes to [`Pipe::on_bytes`] and asks
//! [`Pipe::fill`] for bytes to write when a connection can take more. Connections are
//! numbered by the pipe ([`Pipe::add_conn`]); the shell says when one is gone
//! ([`Pipe::conn_down`]). TLS, when used, sits between the shell and the pipe.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::frame::{decode, Frame, FrameError, RefuseReason, HEADER_LEN};
use crate::session::{Config, Event, Session};

/// Bytes of the hello that opens each connection of a pipe (after TLS, if any): the
/// magic `TMPIPE`, the version, a reserved byte, and the pipe's ID (8 bytes, big-endian),
/// so an acceptor with many peers knows which pipe a connection joins.
pub const HELLO_LEN: usize = 16;

/// The hello for pipe `pipe`.
pub fn hello(pipe: u64) -> [u8; HELLO_LEN] {
    let mut h = [0u8; HELLO_LEN];
    h[..6].copy_from_slice(b"TMPIPE");
    h[6] = crate::frame::VERSION;
    h[8..].copy_from_slice(&pipe.to_be_bytes());
    h
}

/// The pipe ID of a hello; `None` if the bytes are not one.
pub fn parse_hello(b: &[u8; HELLO_LEN]) -> Option<u64> {
    (b[..6] == *b"TMPIPE" && b[6] == crate::frame::VERSION && b[7] == 0)
        .then(|| u64::from_be_bytes(b[8..].try_into().expect("8 bytes")))
}

/// A pipe's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PipeConfig {
    /// Every session's settings.
    pub session: Config,
    /// Sessions a pipe holds at once (an acceptor refuses more with
    /// [`RefuseReason::Busy`]).
    pub max_sessions: usize,
}

impl Default for PipeConfig {
    fn default() -> Self {
        PipeConfig {
            session: Config::default(),
            max_sessions: 1024,
        }
    }
}

/// A connection of the pipe, by number.
pub type ConnId = usize;

/// What the pipe reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PipeEvent {
    /// A session's completion notification.
    Session {
        /// The session.
        id: u32,
        /// What happened.
        event: Event,
    },
    /// Connection `conn` carried bytes that are not frames of this protocol: it is
    /// dropped from the pipe (the shell closes it); the sessions go on over the others.
    ConnBroken {
        /// The connection.
        conn: ConnId,
        /// What was wrong.
        error: FrameError,
    },
}

#[derive(Debug, Default)]
struct Conn {
    /// Received bytes not yet framed (at most one frame's worth).
    inbuf: Vec<u8>,
    up: bool,
}

/// Sessions over connections, one end.
#[derive(Debug)]
pub struct Pipe {
    cfg: PipeConfig,
    conns: Vec<Conn>,
    sessions: BTreeMap<u32, Session>,
    /// Sessions in the order they take turns sending.
    turn: VecDeque<u32>,
    events: VecDeque<PipeEvent>,
    next_id: u32,
    /// Frames bigger than this are refused by [`decode`].
    max_body: u32,
    /// Priming bytes received (frame bodies), dropped.
    prime_received: u64,
    /// Data frames to carry again (encoded): a connection that stalled or went down held
    /// them. The receiver takes a frame twice without harm.
    resend: VecDeque<Vec<u8>>,
    /// Frames resent, bytes.
    resent_bytes: u64,
    /// Where the last [`Pipe::fill`] put Data frames in its `out`.
    data_spans: Vec<std::ops::Range<usize>>,
    /// A fill found no session with a frame to send, and nothing that could give one
    /// a frame happened since (bytes in, a timer, the application's hand on a session):
    /// fills return at once, so an idle pipe of many connections costs no scan of its
    /// sessions per connection.
    quiet: bool,
    /// The sessions' next timers, (µs, session), earliest first: of every session
    /// but those in `dirty`. A pass asks for them without a scan of the sessions.
    timers: BTreeSet<(u64, u32)>,
    /// Each session's entry in `timers`.
    timer_of: BTreeMap<u32, u64>,
    /// Sessions the application had in hand ([`Pipe::session`]) since: their timers and
    /// notifications are looked at again before they count.
    dirty: BTreeSet<u32>,
}

impl Pipe {
    /// A pipe with no connections yet (the pipe exists before them).
    pub fn new(cfg: PipeConfig) -> Pipe {
        Pipe {
            cfg,
            conns: Vec::new(),
            sessions: BTreeMap::new(),
            turn: VecDeque::new(),
            events: VecDeque::new(),
            next_id: 1,
            // The largest body: a Data frame's, or a SYNC with the longest principal.
            max_body: (cfg.session.frame_bytes.max(crate::frame::MAX_PRINCIPAL) + 64)
                .min(u32::MAX as usize) as u32,
            prime_received: 0,
            resend: VecDeque::new(),
            resent_bytes: 0,
            data_spans: Vec::new(),
            quiet: false,
            timers: BTreeSet::new(),
            timer_of: BTreeMap::new(),
            dirty: BTreeSet::new(),
        }
    }

    /// Carry these encoded Data frames again, on whichever connection fills next (they
    /// go before the sessions' new frames). For a shell that keeps the Data frames a
    /// connection has not delivered ([`Pipe::data_spans`]) and finds the connection
    /// stalled or gone: their messages need not wait for its recovery or their timeout.
    pub fn resend(&mut self, frames: Vec<u8>) {
        if !frames.is_empty() {
            self.resend.push_back(frames);
        }
    }

    /// Bytes handed back by [`Pipe::resend`] so far.
    pub fn resent_bytes(&self) -> u64 {
        self.resent_bytes
    }

    /// The byte ranges of `out` where the last [`Pipe::fill`] put Data frames (resent
    /// ones included), in order.
    pub fn data_spans(&self) -> &[std::ops::Range<usize>] {
        &self.data_spans
    }

    /// Priming bytes received and dropped ([`Frame::Prime`] bodies).
    pub fn prime_received(&self) -> u64 {
        self.prime_received
    }

    /// The most bytes of one frame's body this pipe's peer takes (a Data frame's
    /// payload plus its fields): the largest [`Frame::Prime`] to send.
    pub fn max_frame_body(&self) -> usize {
        self.cfg.session.frame_bytes
    }

    /// A new connection joins (once the shell has it up, authenticated): its number.
    pub fn add_conn(&mut self) -> ConnId {
        self.conns.push(Conn {
            inbuf: Vec::new(),
            up: true,
        });
        self.conns.len() - 1
    }

    /// Connection `conn` is gone: it carries nothing more. Frames it had not delivered
    /// are the sessions' to recover (their message timeouts retry them).
    pub fn conn_down(&mut self, conn: ConnId) {
        if let Some(c) = self.conns.get_mut(conn) {
            c.up = false;
            c.inbuf = Vec::new();
        }
    }

    /// Connections up.
    pub fn conns_up(&self) -> usize {
        self.conns.iter().filter(|c| c.up).count()
    }

    /// Open a session to `principal`: its ID (its SYNC goes with the next fill).
    pub fn open(&mut self, principal: &str) -> u32 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        self.sessions
            .insert(id, Session::open(id, principal, self.cfg.session));
        self.turn.push_back(id);
        self.quiet = false;
        self.touched(id);
        id
    }

    /// Session `id`, to send, receive, accept or close.
    pub fn session(&mut self, id: u32) -> Option<&mut Session> {
        self.quiet = false;
        self.dirty.insert(id);
        self.sessions.get_mut(&id)
    }

    /// Sessions held (closed ones leave once their last frame went).
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// Bytes received on connection `conn` at `now_us`: each whole frame goes to its
    /// session (a SYNC for a new ID makes an incoming session: [`Event::Incoming`]).
    /// Bytes that are not frames break the connection ([`PipeEvent::ConnBroken`]).
    pub fn on_bytes(&mut self, conn: ConnId, bytes: &[u8], now_us: u64) {
        let Some(c) = self.conns.get_mut(conn).filter(|c| c.up) else {
            return;
        };
        let mut buf = std::mem::take(&mut c.inbuf);
        buf.extend_from_slice(bytes);
        let mut at = 0;
        loop {
            match decode(&buf[at..], self.max_body) {
                Ok(Some((f, n))) => {
                    at += n;
                    self.route(f, now_us);
                }
                Ok(None) => break,
                Err(error) => {
                    self.conns[conn].up = false;
                    self.events.push_back(PipeEvent::ConnBroken { conn, error });
                    return;
                }
            }
        }
        buf.drain(..at);
        self.conns[conn].inbuf = buf;
    }

    fn route(&mut self, f: Frame, now_us: u64) {
        self.quiet = false;
        if let Frame::Prime { len } = f {
            self.prime_received += len as u64;
            return;
        }
        let id = f.session();
        if let Some(s) = self.sessions.get_mut(&id) {
            s.handle(f, now_us);
        } else if let Frame::Sync { .. } = f {
            let Some(mut s) = Session::incoming(&f, self.cfg.session) else {
                return;
            };
            if self.sessions.len() >= self.cfg.max_sessions {
                s.refuse(RefuseReason::Busy);
                // Its Incoming and Closed notifications are not the application's.
                while s.poll_event().is_some() {}
            }
            self.sessions.insert(id, s);
            self.turn.push_back(id);
        }
        // Other frames of a session this side does not know (it ended) are dropped.
        self.touched(id);
    }

    /// Session `id` may have changed: take its notifications and its next timer.
    fn touched(&mut self, id: u32) {
        if let Some(old) = self.timer_of.remove(&id) {
            self.timers.remove(&(old, id));
        }
        let Some(s) = self.sessions.get_mut(&id) else {
            return;
        };
        while let Some(event) = s.poll_event() {
            self.events.push_back(PipeEvent::Session { id, event });
        }
        if let Some(at) = s.next_deadline() {
            self.timers.insert((at, id));
            self.timer_of.insert(id, at);
        }
    }

    /// Look again at the sessions the application had in hand.
    fn settle(&mut self) {
        for id in std::mem::take(&mut self.dirty) {
            self.touched(id);
        }
    }

    /// Whether a [`Pipe::fill`] may give frames now: `false` means it would give
    /// none (no frames to carry again, and no session had a frame since the last fill
    /// found none), so a shell need not ask its connections' sockets for room.
    pub fn has_frames(&self) -> bool {
        !self.quiet || !self.resend.is_empty()
    }

    /// Append to `out` the frames connection `conn` is to carry now, up to about
    /// `room` bytes (at least one frame if any is due, so `room` of one frame's size keeps
    /// each connection's queue short): the sessions take turns. Returns the bytes added.
    pub fn fill(&mut self, conn: ConnId, out: &mut Vec<u8>, room: usize, now_us: u64) -> usize {
        self.data_spans.clear();
        if !self.conns.get(conn).is_some_and(|c| c.up) {
            return 0;
        }
        let start = out.len();
        while out.len() - start < room.max(HEADER_LEN) {
            let Some(f) = self.resend.pop_front() else {
                break;
            };
            self.resent_bytes += f.len() as u64;
            self.data_spans.push(out.len()..out.len() + f.len());
            out.extend_from_slice(&f);
        }
        if self.quiet {
            return out.len() - start;
        }
        let mut idle = 0;
        while out.len() - start < room.max(HEADER_LEN) && idle < self.turn.len() {
            let Some(id) = self.turn.pop_front() else {
                break;
            };
            let Some(s) = self.sessions.get_mut(&id) else {
                continue;
            };
            let gave = match s.poll_transmit(now_us) {
                Some(f) => {
                    let at = out.len();
                    f.encode(out);
                    if let Frame::Data { .. } = f {
                        self.data_spans.push(at..out.len());
                    }
                    idle = 0;
                    true
                }
                None => {
                    idle += 1;
                    false
                }
            };
            let finished = s.finished();
            self.touched(id);
            if finished {
                self.sessions.remove(&id);
                self.touched(id);
                // It leaves the round: the idle count is of the sessions that stay.
                if !gave {
                    idle -= 1;
                }
            } else {
                self.turn.push_back(id);
            }
        }
        // A whole round of the sessions gave nothing (or there are none).
        self.quiet = idle >= self.turn.len();
        out.len() - start
    }

    /// Run every session's timers at `now_us`.
    pub fn on_time(&mut self, now_us: u64) {
        self.settle();
        let due: Vec<u32> = self
            .timers
            .iter()
            .take_while(|&&(at, _)| at <= now_us)
            .map(|&(_, id)| id)
            .collect();
        for id in due {
            if let Some(s) = self.sessions.get_mut(&id) {
                s.on_time(now_us);
                self.quiet = false;
            }
            self.touched(id);
        }
    }

    /// When [`Pipe::on_time`] is due next, µs.
    pub fn next_deadline(&self) -> Option<u64> {
        let held = self
            .dirty
            .iter()
            .filter_map(|id| self.sessions.get(id))
            .filter_map(Session::next_deadline);
        self.timers
            .first()
            .map(|&(at, _)| at)
            .into_iter()
            .chain(held)
            .min()
    }

    /// The next notification (of the sessions' too, whatever the application did to
    /// them since).
    pub fn poll_event(&mut self) -> Option<PipeEvent> {
        if self.events.is_empty() {
            self.settle();
        }
        self.events.pop_front()
    }
}
