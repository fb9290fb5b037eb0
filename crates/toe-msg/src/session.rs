//! One session of toe-msg (seed 002): the opener's and the acceptor's states, bounded output
//! and input queues, messages cut into frames and reassembled, per-message acknowledgements
//! carrying the receiver's window, message timeouts with retries and retirement, and the
//! completion events the application polls instead of watching packets.
//!
//! Pure: frames go in through [`Session::handle`] and come out of
//! [`Session::poll_transmit`], time is an argument (µs of the caller's clock), and
//! [`Session::next_deadline`] says when [`Session::on_time`] is due. A dispatcher carries the
//! frames over the connections of a pipe in any order: reassembly and the window (a credit
//! counted from the session's start, see [`crate::frame`]) do not depend on it.
//!
//! Memory: the output queue holds at most [`Config::out_queue_bytes`] of messages (a message
//! that does not fit is refused at once with [`SendError::QueueFull`]); the input queue, the
//! messages being reassembled and those waiting for the application, at most
//! [`Config::in_queue_bytes`] and [`Config::in_slots`] messages. A peer that sends past the
//! window the session granted ends the session with [`SessionError::Window`].

use std::collections::{BTreeMap, VecDeque};

use thiserror::Error;

use crate::frame::{Frame, RefuseReason, Window, MAX_PRINCIPAL};

/// A session's limits and timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Bytes of messages the output queue holds (queued, in flight, not yet acknowledged).
    pub out_queue_bytes: usize,
    /// Bytes of messages the input queue holds (arriving, or waiting for the application).
    pub in_queue_bytes: usize,
    /// Messages the input queue holds.
    pub in_slots: u32,
    /// Payload bytes per `Data` frame (> 0).
    pub frame_bytes: usize,
    /// A message not acknowledged this long after it was queued (or last retried) is
    /// retried, µs.
    pub timeout_us: u64,
    /// Retries before a message is retired with [`Event::Failed`].
    pub retries: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            out_queue_bytes: 2 << 20,
            in_queue_bytes: 4 << 20,
            in_slots: 64,
            frame_bytes: 64 << 10,
            timeout_us: 60_000_000,
            retries: 2,
        }
    }
}

/// Where a session stands (seed 002's session states).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// The opener has a SYNC to send.
    SendSync,
    /// The opener sent its SYNC and waits for the peer's ACK (`Accept`).
    WaitingAck,
    /// The acceptor got a SYNC and waits for its application to accept or refuse it.
    WaitingAccept,
    /// Messages flow both ways.
    Ready,
    /// A FIN is out; waiting for the peer's.
    SendingFin,
    /// Over.
    Closed,
}

/// The application's handle of a message it queued (from 1, +1 per message sent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MsgId(pub u64);

/// A completion notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The opener's session was accepted: it is ready.
    Created,
    /// A peer asks for a session to `principal`: [`Session::accept`] or
    /// [`Session::refuse`].
    Incoming {
        /// The principal it wants.
        principal: String,
    },
    /// The acceptor's application accepted: it is ready.
    Accepted,
    /// The peer refused the session.
    Refused(RefuseReason),
    /// The message's last frame went to the wire (it is not acknowledged yet).
    Departed {
        /// The message.
        id: MsgId,
    },
    /// The peer has the message whole: it left the output queue.
    Acked {
        /// The message.
        id: MsgId,
        /// Its ID on the wire.
        msg: u64,
        /// µs from when it was (last) started to this acknowledgement, this clock.
        latency_us: u64,
        /// When its last byte reached the peer, µs of the peer's clock.
        peer_received_us: u64,
        /// Attempts it took (1: no retry).
        attempts: u32,
    },
    /// The peer's application took message `msg` (a later acknowledgement says so).
    Delivered {
        /// Its ID on the wire.
        msg: u64,
        /// When it reached the peer, µs of the peer's clock.
        peer_received_us: u64,
        /// When the peer's application took it, µs of the peer's clock.
        peer_delivered_us: u64,
    },
    /// The peer's window is shut: queued messages wait (seed 002's WndSize 0).
    Stalled,
    /// A later acknowledgement opened the window again.
    Resumed,
    /// A message is waiting for [`Session::recv`] (in order).
    Received {
        /// Its ID on the wire.
        msg: u64,
        /// Its length, bytes.
        len: usize,
    },
    /// The message was not acknowledged within the timeout after every retry: it is
    /// retired (never delivered half: the peer drops what it had of it).
    Failed {
        /// The message.
        id: MsgId,
        /// Attempts made.
        attempts: u32,
    },
    /// The session ended.
    Closed,
    /// The session ended on an error.
    Error(SessionError),
}

/// Why a message was not queued. Nothing was taken: retry later.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum SendError {
    /// The output queue has `free` bytes, fewer than the message's.
    #[error("the output queue is full ({free} bytes free)")]
    QueueFull {
        /// Bytes free.
        free: usize,
    },
    /// The message is larger than the whole output queue (it never fits).
    #[error("a {len}-byte message is larger than the {queue}-byte output queue")]
    TooLarge {
        /// The message's length.
        len: usize,
        /// The output queue's size.
        queue: usize,
    },
    /// The session is not ready (or is closing).
    #[error("the session is not ready")]
    NotReady,
}

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SessionError {
    /// The peer sent past the window this side granted.
    #[error("the peer sent message {msg} past the window")]
    Window {
        /// The message.
        msg: u64,
    },
    /// A frame that does not fit the message it names (offset, length).
    #[error("a frame of message {msg} does not fit it")]
    BadFrame {
        /// The message.
        msg: u64,
    },
    /// A frame that makes no sense in this state.
    #[error("unexpected {0} frame")]
    Unexpected(&'static str),
    /// The peer did not answer the SYNC or the FIN in time.
    #[error("the peer did not answer in time")]
    Timeout,
}

/// A message in the output queue.
#[derive(Debug)]
struct Out {
    id: MsgId,
    /// Its wire ID, once started (IDs go to messages as the window lets them start).
    wire: Option<u64>,
    data: Vec<u8>,
    /// Bytes framed in this attempt.
    next: usize,
    /// When this attempt started.
    sent_us: u64,
    deadline_us: u64,
    /// Timeouts so far.
    timeouts: u32,
    departed: bool,
}

/// A message arriving.
#[derive(Debug)]
struct In {
    data: Vec<u8>,
    /// Byte ranges received, sorted and merged.
    have: Vec<(u64, u64)>,
    sent_us: u64,
}

impl In {
    fn covered(&self) -> u64 {
        self.have.iter().map(|(a, b)| b - a).sum()
    }

    fn add(&mut self, a: u64, b: u64) {
        if a == b {
            return;
        }
        self.have.push((a, b));
        self.have.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(self.have.len());
        for &(s, e) in &self.have {
            match merged.last_mut() {
                Some(m) if s <= m.1 => m.1 = m.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        self.have = merged;
    }
}

/// What became of a message the receiver saw (or was told of).
#[derive(Debug)]
enum Resolved {
    /// Whole: (data, received at).
    Whole(Vec<u8>, u64),
    /// Retired by the sender: its length.
    Aborted(u64),
}

/// One session (either end).
#[derive(Debug)]
pub struct Session {
    id: u32,
    cfg: Config,
    state: State,
    principal: String,
    events: VecDeque<Event>,
    ctrl: VecDeque<Frame>,
    /// When the SYNC or FIN waits for an answer until, µs.
    ctrl_deadline: Option<u64>,
    closing: bool,
    /// The peer's FIN came while messages waited for the application: the FIN-ACK goes
    /// once it took the last of them, after their acknowledgements (which tell the peer
    /// when each was taken).
    fin_ack_owed: bool,
    // --- sending
    out: VecDeque<Out>,
    out_bytes: usize,
    next_handle: u64,
    last_wire: u64,
    started_bytes: u64,
    peer: Window,
    stalled: bool,
    // --- receiving
    arriving: BTreeMap<u64, In>,
    resolved: BTreeMap<u64, Resolved>,
    ready: VecDeque<(u64, Vec<u8>, u64)>,
    /// Messages released in order (taken by the application, or retired): IDs up to it.
    freed: u64,
    freed_bytes: u64,
    /// Bytes held by arriving, resolved and ready messages.
    in_use: u64,
}

impl Session {
    fn new(id: u32, cfg: Config, state: State, principal: String, peer: Window) -> Session {
        Session {
            id,
            cfg,
            state,
            principal,
            events: VecDeque::new(),
            ctrl: VecDeque::new(),
            ctrl_deadline: None,
            closing: false,
            fin_ack_owed: false,
            out: VecDeque::new(),
            out_bytes: 0,
            next_handle: 1,
            last_wire: 0,
            started_bytes: 0,
            peer,
            stalled: false,
            arriving: BTreeMap::new(),
            resolved: BTreeMap::new(),
            ready: VecDeque::new(),
            freed: 0,
            freed_bytes: 0,
            in_use: 0,
        }
    }

    /// Open session `id` to `principal` (at most [`MAX_PRINCIPAL`] bytes; longer is cut):
    /// the SYNC goes with the next [`Session::poll_transmit`].
    pub fn open(id: u32, principal: &str, cfg: Config) -> Session {
        let mut p = principal.to_string();
        while p.len() > MAX_PRINCIPAL {
            p.pop();
        }
        let mut s = Session::new(id, cfg, State::SendSync, p, Window::default());
        s.ctrl.push_back(Frame::Sync {
            session: id,
            out_queue: clamp32(cfg.out_queue_bytes as u64),
            in_queue: clamp32(cfg.in_queue_bytes as u64),
            in_slots: cfg.in_slots,
            principal: s.principal.clone(),
        });
        s
    }

    /// The acceptor's session for the peer's `Sync` frame (anything else is `None`):
    /// [`Event::Incoming`] is pending; the application answers with [`Session::accept`]
    /// or [`Session::refuse`]. The peer's window is what its SYNC declared.
    pub fn incoming(sync: &Frame, cfg: Config) -> Option<Session> {
        let Frame::Sync {
            session,
            in_queue,
            in_slots,
            principal,
            ..
        } = sync
        else {
            return None;
        };
        let peer = Window {
            max_msg: u64::from(*in_slots),
            max_bytes: u64::from(*in_queue),
        };
        let mut s = Session::new(*session, cfg, State::WaitingAccept, principal.clone(), peer);
        s.events.push_back(Event::Incoming {
            principal: principal.clone(),
        });
        Some(s)
    }

    /// The session's ID.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Its state.
    pub fn state(&self) -> State {
        self.state
    }

    /// Closed, with nothing left to send or to hand the application: it may go.
    pub fn finished(&self) -> bool {
        self.state == State::Closed && self.ctrl.is_empty() && self.ready.is_empty()
    }

    /// The principal named in the SYNC.
    pub fn principal(&self) -> &str {
        &self.principal
    }

    /// The application accepts the incoming session: it is ready, and the ACK carrying
    /// this side's window goes next.
    pub fn accept(&mut self) {
        if self.state == State::WaitingAccept {
            self.ctrl.push_back(Frame::Accept {
                session: self.id,
                window: self.window(),
            });
            self.state = State::Ready;
            self.events.push_back(Event::Accepted);
        }
    }

    /// The application (or the pipe, for a principal the peer may not use) refuses the
    /// incoming session: the refusal goes next and the session is closed.
    pub fn refuse(&mut self, reason: RefuseReason) {
        if self.state == State::WaitingAccept {
            self.ctrl.push_back(Frame::Refuse {
                session: self.id,
                reason,
            });
            self.state = State::Closed;
            self.events.push_back(Event::Closed);
        }
    }

    /// Queue message `data` at `now_us`. Never blocks: a message that does not fit the
    /// output queue now is refused ([`SendError::QueueFull`]) and the application tries
    /// again later (after an [`Event::Acked`] or [`Event::Failed`] freed room).
    pub fn send(&mut self, data: Vec<u8>, now_us: u64) -> Result<MsgId, SendError> {
        if self.state != State::Ready || self.closing {
            return Err(SendError::NotReady);
        }
        if data.len() > self.cfg.out_queue_bytes {
            return Err(SendError::TooLarge {
                len: data.len(),
                queue: self.cfg.out_queue_bytes,
            });
        }
        let free = self.cfg.out_queue_bytes - self.out_bytes;
        if data.len() > free {
            return Err(SendError::QueueFull { free });
        }
        let id = MsgId(self.next_handle);
        self.next_handle += 1;
        self.out_bytes += data.len();
        self.out.push_back(Out {
            id,
            wire: None,
            data,
            next: 0,
            sent_us: now_us,
            deadline_us: now_us.saturating_add(self.cfg.timeout_us),
            timeouts: 0,
            departed: false,
        });
        Ok(id)
    }

    /// Bytes free in the output queue.
    pub fn out_free(&self) -> usize {
        self.cfg.out_queue_bytes - self.out_bytes
    }

    /// Bytes the input queue holds now (messages arriving or waiting for
    /// [`Session::recv`]); never more than [`Config::in_queue_bytes`].
    pub fn in_queue_used(&self) -> u64 {
        self.in_use
    }

    /// Messages queued and not yet acknowledged or retired.
    pub fn out_pending(&self) -> usize {
        self.out.len()
    }

    /// Close once every queued message is acknowledged or retired: then the FIN goes.
    pub fn close(&mut self) {
        match self.state {
            State::Ready => self.closing = true,
            State::SendSync | State::WaitingAck | State::WaitingAccept => {
                self.state = State::Closed;
                self.ctrl.clear();
                self.events.push_back(Event::Closed);
            }
            State::SendingFin | State::Closed => {}
        }
    }

    /// The next completion notification.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The next message for the application, in order: (wire ID, data). Taking it frees
    /// its room in the input queue, and the window update goes to the peer (with when the
    /// application took it, `now_us`).
    pub fn recv(&mut self, now_us: u64) -> Option<(u64, Vec<u8>)> {
        let (msg, data, received_us) = self.ready.pop_front()?;
        self.in_use -= data.len() as u64;
        self.freed += 1;
        self.freed_bytes += data.len() as u64;
        // A retired message waiting behind it is released now.
        self.deliver();
        self.ack(msg, 0, received_us, now_us.max(1));
        if self.fin_ack_owed && self.ready.is_empty() {
            self.fin_ack_owed = false;
            self.ctrl.push_back(Frame::FinAck { session: self.id });
        }
        Some((msg, data))
    }

    /// This side's window for the peer.
    fn window(&self) -> Window {
        Window {
            max_msg: self.freed + u64::from(self.cfg.in_slots),
            max_bytes: self.freed_bytes + self.cfg.in_queue_bytes as u64,
        }
    }

    /// The next frame to send at `now_us`, if any: control frames first, then the next
    /// frame of the message in progress, or of the next message if the peer's window lets
    /// it start.
    pub fn poll_transmit(&mut self, now_us: u64) -> Option<Frame> {
        if let Some(f) = self.ctrl.pop_front() {
            match (&f, self.state) {
                (Frame::Sync { .. }, State::SendSync) => {
                    self.state = State::WaitingAck;
                    self.ctrl_deadline = Some(now_us.saturating_add(self.cfg.timeout_us));
                }
                (Frame::Fin { .. }, _) => {
                    self.ctrl_deadline = Some(now_us.saturating_add(self.cfg.timeout_us));
                }
                _ => {}
            }
            return Some(f);
        }
        if self.state != State::Ready {
            return None;
        }
        if let Some(f) = self.next_data(now_us) {
            return Some(f);
        }
        if self.closing && self.out.is_empty() {
            self.closing = false;
            self.state = State::SendingFin;
            self.ctrl_deadline = Some(now_us.saturating_add(self.cfg.timeout_us));
            return Some(Frame::Fin { session: self.id });
        }
        None
    }

    fn next_data(&mut self, now_us: u64) -> Option<Frame> {
        // A started message with bytes left (messages start in order, so the first).
        let i = match self
            .out
            .iter()
            .position(|o| o.wire.is_some() && !o.departed)
        {
            Some(i) => i,
            None => {
                let i = self.out.iter().position(|o| o.wire.is_none())?;
                let o = &self.out[i];
                let wire = self.last_wire + 1;
                let len = o.data.len() as u64;
                if wire > self.peer.max_msg || self.started_bytes + len > self.peer.max_bytes {
                    if !self.stalled {
                        self.stalled = true;
                        self.events.push_back(Event::Stalled);
                    }
                    return None;
                }
                self.last_wire = wire;
                self.started_bytes += len;
                let o = &mut self.out[i];
                o.wire = Some(wire);
                o.sent_us = now_us;
                i
            }
        };
        let frame_bytes = self.cfg.frame_bytes.max(1);
        let o = &mut self.out[i];
        let end = (o.next + frame_bytes).min(o.data.len());
        let f = Frame::Data {
            session: self.id,
            msg: o.wire.expect("started"),
            offset: o.next as u64,
            total: o.data.len() as u64,
            sent_us: o.sent_us,
            payload: o.data[o.next..end].to_vec(),
        };
        o.next = end;
        if end == o.data.len() {
            o.departed = true;
            if o.timeouts == 0 {
                let id = o.id;
                self.events.push_back(Event::Departed { id });
            }
        }
        Some(f)
    }

    /// When [`Session::on_time`] must run next, µs.
    pub fn next_deadline(&self) -> Option<u64> {
        let msgs = self.out.iter().map(|o| o.deadline_us).min();
        [msgs, self.ctrl_deadline].into_iter().flatten().min()
    }

    /// Run the timers at `now_us`: a message past its deadline is retried (sent again
    /// from its start, if it had started) or, after [`Config::retries`] retries, retired
    /// with [`Event::Failed`] (the peer is told to drop what it had of it); a SYNC or FIN
    /// not answered in time ends the session.
    pub fn on_time(&mut self, now_us: u64) {
        if self.ctrl_deadline.is_some_and(|d| {
            now_us >= d && matches!(self.state, State::WaitingAck | State::SendingFin)
        }) {
            return self.fail(SessionError::Timeout);
        }
        let mut i = 0;
        while i < self.out.len() {
            if now_us < self.out[i].deadline_us {
                i += 1;
                continue;
            }
            let o = &mut self.out[i];
            o.timeouts += 1;
            if o.timeouts > self.cfg.retries {
                let o = self.out.remove(i).expect("present");
                self.out_bytes -= o.data.len();
                if let Some(msg) = o.wire {
                    self.ctrl.push_back(Frame::Abort {
                        session: self.id,
                        msg,
                        total: o.data.len() as u64,
                    });
                }
                self.events.push_back(Event::Failed {
                    id: o.id,
                    attempts: o.timeouts,
                });
                continue;
            }
            o.deadline_us = now_us.saturating_add(self.cfg.timeout_us);
            if o.wire.is_some() {
                o.next = 0;
                o.departed = false;
                o.sent_us = now_us;
            }
            i += 1;
        }
    }

    fn fail(&mut self, e: SessionError) {
        if self.state == State::Closed {
            return;
        }
        self.state = State::Closed;
        self.ctrl.clear();
        self.ctrl_deadline = None;
        for o in self.out.drain(..) {
            self.events.push_back(Event::Failed {
                id: o.id,
                attempts: o.timeouts + 1,
            });
        }
        self.out_bytes = 0;
        self.events.push_back(Event::Error(e));
    }

    /// Handle a frame of this session from the peer at `now_us`. A frame the session
    /// cannot take (past the window, not fitting its message, out of place) ends it with
    /// [`Event::Error`]; nothing panics.
    pub fn handle(&mut self, frame: Frame, now_us: u64) {
        if frame.session() != self.id || self.state == State::Closed {
            return;
        }
        match frame {
            Frame::Accept { window, .. } if self.state == State::WaitingAck => {
                self.peer = window;
                self.state = State::Ready;
                self.ctrl_deadline = None;
                self.events.push_back(Event::Created);
            }
            Frame::Refuse { reason, .. } if self.state == State::WaitingAck => {
                self.state = State::Closed;
                self.ctrl_deadline = None;
                self.events.push_back(Event::Refused(reason));
            }
            Frame::Data {
                msg,
                offset,
                total,
                sent_us,
                payload,
                ..
            } if self.receiving() => {
                if let Err(e) = self.on_data(msg, offset, total, sent_us, &payload, now_us) {
                    self.fail(e);
                }
            }
            Frame::Ack {
                msg,
                window,
                received_us,
                delivered_us,
                ..
            } if self.receiving() => self.on_ack(msg, window, received_us, delivered_us, now_us),
            Frame::Abort { msg, total, .. } if self.receiving() => {
                if let Err(e) = self.on_abort(msg, total) {
                    self.fail(e);
                }
            }
            Frame::Fin { .. } if matches!(self.state, State::Ready | State::SendingFin) => {
                if self.ready.is_empty() {
                    self.ctrl.push_back(Frame::FinAck { session: self.id });
                } else {
                    self.fin_ack_owed = true;
                }
                if self.state == State::Ready {
                    // The peer closed first: what it will not take fails here.
                    self.state = State::Closed;
                    for o in self.out.drain(..) {
                        self.events.push_back(Event::Failed {
                            id: o.id,
                            attempts: o.timeouts + 1,
                        });
                    }
                    self.out_bytes = 0;
                    self.events.push_back(Event::Closed);
                }
            }
            Frame::FinAck { .. } if self.state == State::SendingFin => {
                self.state = State::Closed;
                self.ctrl_deadline = None;
                self.events.push_back(Event::Closed);
            }
            f => self.fail(SessionError::Unexpected(f.name())),
        }
    }

    /// Whether message frames are taken: once ready, while closing, and while the opener
    /// waits for the ACK (over several connections the acceptor's first messages may
    /// overtake its ACK; this side's window is the one its SYNC declared).
    fn receiving(&self) -> bool {
        matches!(
            self.state,
            State::Ready | State::SendingFin | State::WaitingAck
        )
    }

    fn on_data(
        &mut self,
        msg: u64,
        offset: u64,
        total: u64,
        sent_us: u64,
        payload: &[u8],
        now_us: u64,
    ) -> Result<(), SessionError> {
        let end = offset
            .checked_add(payload.len() as u64)
            .filter(|&e| e <= total)
            .ok_or(SessionError::BadFrame { msg })?;
        // Whole messages waiting for the application: the IDs right after `freed`.
        let ready = msg
            .checked_sub(self.freed + 1)
            .and_then(|i| self.ready.get(i as usize))
            .map(|r| r.2);
        if msg == 0 || msg <= self.freed || ready.is_some() || self.resolved.contains_key(&msg) {
            // A retry of a message this side has whole (or dropped), or a frame carried
            // twice: acknowledged again on its first frame.
            if offset == 0 {
                match (self.resolved.get(&msg), ready) {
                    (Some(Resolved::Whole(_, at)), _) => {
                        let at = *at;
                        self.ack(msg, sent_us, at, 0);
                    }
                    (Some(Resolved::Aborted(_)), _) => {}
                    (None, Some(at)) => self.ack(msg, sent_us, at, 0),
                    (None, None) => self.ack(msg, sent_us, now_us, 0),
                }
            }
            return Ok(());
        }
        if msg > self.window().max_msg {
            return Err(SessionError::Window { msg });
        }
        if !self.arriving.contains_key(&msg) {
            if total > self.cfg.in_queue_bytes as u64 - self.in_use {
                return Err(SessionError::Window { msg });
            }
            self.in_use += total;
            self.arriving.insert(
                msg,
                In {
                    data: vec![0; total as usize],
                    have: Vec::new(),
                    sent_us,
                },
            );
        }
        let m = self.arriving.get_mut(&msg).expect("present");
        if m.data.len() as u64 != total {
            return Err(SessionError::BadFrame { msg });
        }
        m.data[offset as usize..end as usize].copy_from_slice(payload);
        m.add(offset, end);
        m.sent_us = sent_us;
        if m.covered() == total {
            let m = self.arriving.remove(&msg).expect("present");
            self.ack(msg, m.sent_us, now_us, 0);
            self.resolved.insert(msg, Resolved::Whole(m.data, now_us));
            self.deliver();
        }
        Ok(())
    }

    /// Queue an acknowledgement of `msg` (or, repeated, a window update) with this side's
    /// window now; `delivered_us` 0 while the application has not taken it.
    fn ack(&mut self, msg: u64, sent_us: u64, received_us: u64, delivered_us: u64) {
        self.ctrl.push_back(Frame::Ack {
            session: self.id,
            msg,
            window: self.window(),
            sent_us,
            received_us,
            delivered_us,
        });
    }

    /// Move resolved messages, in order, to the application (or release retired ones).
    fn deliver(&mut self) {
        let mut next = self.freed + self.ready.len() as u64 + 1;
        while let Some(r) = self.resolved.remove(&next) {
            match r {
                Resolved::Whole(data, at) => {
                    self.events.push_back(Event::Received {
                        msg: next,
                        len: data.len(),
                    });
                    self.ready.push_back((next, data, at));
                }
                Resolved::Aborted(total) => {
                    // Only at the head: a retired message behind one the application has
                    // not taken keeps its place until then.
                    if !self.ready.is_empty() {
                        self.resolved.insert(next, Resolved::Aborted(total));
                        break;
                    }
                    self.freed += 1;
                    self.freed_bytes += total;
                }
            }
            next += 1;
        }
    }

    fn on_abort(&mut self, msg: u64, total: u64) -> Result<(), SessionError> {
        if msg == 0 || msg <= self.freed || msg > self.window().max_msg {
            return Ok(()); // resolved before, or never granted: nothing to drop
        }
        if let Some(m) = self.arriving.remove(&msg) {
            self.in_use -= m.data.len() as u64;
        } else if self.resolved.contains_key(&msg) || self.ready.iter().any(|(m, ..)| *m == msg) {
            // Whole already: the abort crossed its acknowledgement (the application gets
            // it, the sender reported it failed).
            return Ok(());
        }
        self.resolved.insert(msg, Resolved::Aborted(total));
        self.deliver();
        // The credit it held is back.
        self.ack(msg, 0, 0, 0);
        Ok(())
    }

    fn on_ack(
        &mut self,
        msg: u64,
        window: Window,
        received_us: u64,
        delivered_us: u64,
        now_us: u64,
    ) {
        if self.state == State::SendingFin && self.ctrl_deadline.is_some() {
            // The peer is alive and still handing messages to its application: its
            // FIN-ACK follows the last of them, so the wait for it starts again.
            self.ctrl_deadline = Some(now_us.saturating_add(self.cfg.timeout_us));
        }
        // Credits only grow: an older acknowledgement that arrives late changes nothing.
        self.peer.max_msg = self.peer.max_msg.max(window.max_msg);
        self.peer.max_bytes = self.peer.max_bytes.max(window.max_bytes);
        if let Some(i) = self.out.iter().position(|o| o.wire == Some(msg)) {
            let o = self.out.remove(i).expect("present");
            self.out_bytes -= o.data.len();
            self.events.push_back(Event::Acked {
                id: o.id,
                msg,
                latency_us: now_us.saturating_sub(o.sent_us),
                peer_received_us: received_us,
                attempts: o.timeouts + 1,
            });
        }
        if delivered_us != 0 {
            self.events.push_back(Event::Delivered {
                msg,
                peer_received_us: received_us,
                peer_delivered_us: delivered_us,
            });
        }
        if self.stalled {
            let next = self.out.iter().find(|o| o.wire.is_none());
            let opens = next.is_none_or(|o| {
                self.last_wire < self.peer.max_msg
                    && self.started_bytes + o.data.len() as u64 <= self.peer.max_bytes
            });
            if opens {
                self.stalled = false;
                self.events.push_back(Event::Resumed);
            }
        }
    }
}

fn clamp32(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}
