//! The host TOE driver: one per emulated host. It owns the anonymous buffer pool, the
//! per-connection receive machines ([`ConnRx`]), transmit bookkeeping and the host's end of
//! the bus, and offers the application calls experiments need.
//!
//! # Contract
//! The driver never reads a clock and never blocks: every call that can change timers takes
//! `now`. [`Driver::poll`] takes events from the NIC, runs due push timers and sends what the
//! connection machines produced; [`Driver::poll_at`] says when the next timer is due.
//! Application calls (`post_named`, `accept_in_place`, `send`, ...) act at once and queue their
//! commands; they reach the NIC on the next `poll` (or [`Driver::flush`]).
//!
//! Calls that hand the driver a buffer give it back inside the error if they are refused
//! ([`Refused`]), so a refused call loses nothing.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddrV4;
use std::sync::Arc;

use toe_bus::cost::{transfer_ps, Busy, HostCost};
use toe_bus::time::Instant;
use toe_bus::{
    AckHold, Command, ConnId, Event, HostBuf, HostEnd, HostMemory, MemError, OffloadParams,
    ReturnReason,
};

use toe_bus::trace::{describe_command, describe_event, Dir, TraceRecord, TraceSink};

use crate::conn::{ConnRx, ConnRxStats, NamedCompletion, NamedId, Note, Outputs, RxConfig};

/// Errors of driver calls.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DriverError {
    /// No such connection (never existed, or released).
    #[error("unknown connection {0}")]
    UnknownConn(ConnId),
    /// The connection is not in a state that allows the call.
    #[error("connection {conn} is {state:?}: {what} not allowed")]
    BadState {
        /// Connection.
        conn: ConnId,
        /// Its state.
        state: ConnState,
        /// The refused call.
        what: &'static str,
    },
    /// A configuration value is out of range.
    #[error("invalid {setting}: {value} ({limit})")]
    InvalidConfig {
        /// Setting name.
        setting: &'static str,
        /// Offending value.
        value: String,
        /// The limit it broke.
        limit: String,
    },
    /// Host memory is exhausted.
    #[error(transparent)]
    Memory(#[from] MemError),
    /// The port already has a listener.
    #[error("port {0} already has a listener")]
    PortInUse(u16),
}

/// A refused call that carried a buffer: the buffer comes back with the reason.
#[derive(Debug)]
pub struct Refused {
    /// Why.
    pub error: DriverError,
    /// The caller's buffer, untouched.
    pub buf: HostBuf,
}

/// Life cycle of a connection as the driver sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnState {
    /// Active open in progress.
    Connecting,
    /// Open in both directions.
    Established,
    /// The peer sent FIN; we may still send.
    PeerClosed,
    /// Closed; the NIC released its context.
    Closed,
    /// The peer reset the connection.
    Reset,
    /// The active open failed.
    Failed(String),
}

/// Something the application should look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppEvent {
    /// An active open completed.
    Connected,
    /// A passive open completed on `port`; take it with [`Driver::accept`].
    Incoming {
        /// Listener port.
        port: u16,
    },
    /// An active open failed.
    ConnectFailed(String),
    /// Received data is available (raised once until the application accepts some).
    DataAvailable,
    /// A named buffer completed.
    NamedComplete,
    /// A send buffer came back.
    SendDone,
    /// The peer closed its direction.
    PeerClosed,
    /// The peer reset the connection.
    Reset,
    /// The connection is closed and its NIC context released.
    Closed,
    /// The NIC refused a command.
    Error(String),
    /// The NIC's upper-layer engine slot reported something: take it with
    /// [`Driver::take_ulp`].
    Ulp,
}

/// What the NIC's upper-layer engine slot reported for a connection, in order
/// ([`Driver::take_ulp`]).
#[derive(Debug)]
pub enum UlpNote {
    /// The engine runs the connection from this stream offset on: what is indicated from
    /// there is its record stream.
    Started {
        /// The offset, bytes.
        stream_offset: u64,
    },
    /// The offload was refused. With `stale`, the NIC had delivered up to `position` and
    /// holds delivery there (its named buffers came back `Cancelled` first): take what was
    /// indicated and offload again at `position`.
    Refused {
        /// The NIC's delivery position, bytes.
        position: u64,
        /// A retry at `position` can succeed.
        stale: bool,
        /// Why.
        error: String,
    },
    /// A registered buffer came back (exactly once per registration).
    Released {
        /// The task tag.
        tag: u32,
        /// The buffer.
        buf: HostBuf,
        /// Data bytes the engine placed into it.
        placed: u32,
    },
    /// The engine refused a send request, or cannot go on with the received stream.
    Error(String),
}

/// Driver configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DriverConfig {
    /// Receive configuration of new connections (each may override it).
    pub rx: RxConfig,
    /// Size of one anonymous buffer, in bytes.
    pub anon_buf_bytes: usize,
    /// Total anonymous pool, in bytes (a whole number of buffers is allocated). Sized from W
    /// and the connection limit by the caller.
    pub anon_pool_bytes: usize,
    /// What the driver's work costs in virtual time (events handled, commands issued, host
    /// copies); while busy the driver does not poll, and its commands leave when the work is
    /// done. [`HostCost::FREE`] for none.
    pub cost: HostCost,
}

/// Driver-wide counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DriverStats {
    /// Anonymous buffers in the pool.
    pub anon_buffers: usize,
    /// Anonymous buffers currently held by the driver (indicated, not yet drained).
    pub anon_in_driver: usize,
    /// Most anonymous buffers the driver ever held at once.
    pub anon_high_water: usize,
    /// Events processed.
    pub events: u64,
    /// Commands the NIC refused.
    pub nic_errors: u64,
    /// Events for connections the driver no longer knows.
    pub stray_events: u64,
    /// Host-wide error messages (not tied to a connection) dropped, oldest first, because
    /// nobody took them and [`MAX_HOST_ERRORS`] were waiting. Connection news is never
    /// dropped: it is coalesced (see [`Driver::take_event`]).
    pub errors_dropped: u64,
    /// Connection ids skipped because the id was still in use (after a wrap).
    pub ids_skipped: u64,
}

/// Most host-wide error messages kept for [`Driver::take_event`].
pub const MAX_HOST_ERRORS: usize = 64;

/// News of one connection, coalesced: one bit per [`AppEvent`] kind, taken in bit order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct News(u16);

impl News {
    const CONNECTED: u16 = 1 << 0;
    const INCOMING: u16 = 1 << 1;
    const CONNECT_FAILED: u16 = 1 << 2;
    const DATA: u16 = 1 << 3;
    const NAMED: u16 = 1 << 4;
    const SEND_DONE: u16 = 1 << 5;
    const PEER_CLOSED: u16 = 1 << 6;
    const RESET: u16 = 1 << 7;
    const ULP: u16 = 1 << 8;
    const ERROR: u16 = 1 << 9;
    const CLOSED: u16 = 1 << 10;

    fn bit(e: &AppEvent) -> u16 {
        match e {
            AppEvent::Connected => Self::CONNECTED,
            AppEvent::Incoming { .. } => Self::INCOMING,
            AppEvent::ConnectFailed(_) => Self::CONNECT_FAILED,
            AppEvent::DataAvailable => Self::DATA,
            AppEvent::NamedComplete => Self::NAMED,
            AppEvent::SendDone => Self::SEND_DONE,
            AppEvent::PeerClosed => Self::PEER_CLOSED,
            AppEvent::Reset => Self::RESET,
            AppEvent::Ulp => Self::ULP,
            AppEvent::Error(_) => Self::ERROR,
            AppEvent::Closed => Self::CLOSED,
        }
    }
}

#[derive(Debug)]
struct DConn {
    rx: ConnRx,
    state: ConnState,
    local: Option<SocketAddrV4>,
    remote: Option<SocketAddrV4>,
    send_done: VecDeque<(HostBuf, bool)>,
    sends_outstanding: usize,
    send_bytes_outstanding: usize,
    close_sent: bool,
    nic_gone: bool,
    /// The deadline this connection has in `Driver::timers`.
    timer: Option<Instant>,
    /// The listener port of a passive connection.
    listener: Option<u16>,
    /// Reports of the NIC's engine slot not taken yet (as many as the commands and
    /// registrations that caused them).
    ulp: VecDeque<UlpNote>,
    /// Coalesced news not yet taken by the application.
    news: News,
    /// The latest refused command's message (for [`AppEvent::Error`]).
    last_error: Option<String>,
}

/// A snapshot of one connection for the application or a report.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// State.
    pub state: ConnState,
    /// Local address (once established).
    pub local: Option<SocketAddrV4>,
    /// Peer address.
    pub remote: Option<SocketAddrV4>,
    /// Receive configuration in force (W is the effective one).
    pub rx_config: RxConfig,
    /// I, in bytes.
    pub indicated: u32,
    /// Received bytes not yet accepted or copied.
    pub queued_bytes: usize,
    /// Receive counters.
    pub rx: ConnRxStats,
    /// Send buffers not yet acknowledged by the peer.
    pub sends_outstanding: usize,
    /// Bytes in those buffers.
    pub send_bytes_outstanding: usize,
}

/// The host TOE driver.
pub struct Driver {
    mem: Arc<HostMemory>,
    bus: HostEnd,
    cfg: DriverConfig,
    /// Boxed: a B-tree node holds 11 entries and is often half full, so large values would
    /// waste hundreds of bytes per connection in slack.
    conns: BTreeMap<ConnId, Box<DConn>>,
    listeners: BTreeMap<u16, (RxConfig, VecDeque<ConnId>)>,
    next_conn: u32,
    released: Vec<HostBuf>,
    /// Connections with news, each at most once while its news is non-empty (a released
    /// connection's entry is skipped when reached, or dropped when they pile up); at most
    /// `2 × connections + 17` entries.
    news_queue: VecDeque<ConnId>,
    /// Host-wide errors, at most [`MAX_HOST_ERRORS`].
    host_errors: VecDeque<String>,
    stats: DriverStats,
    trace: Option<Box<dyn TraceSink>>,
    timers: BTreeSet<(Instant, ConnId)>,
    last_now: Instant,
    scratch: Vec<(&'static str, u64)>,
    /// The host CPU's timeline under the cost model.
    cpu: Busy,
    /// Copy bytes of host memory already charged to `cpu`.
    copies_charged: u64,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("conns", &self.conns.len())
            .field("stats", &self.stats)
            .finish()
    }
}

impl Driver {
    /// A driver for host memory `mem` on bus end `bus`. Allocates the anonymous pool and
    /// hands it to the NIC.
    pub fn new(mem: Arc<HostMemory>, bus: HostEnd, cfg: DriverConfig) -> Result<Self, DriverError> {
        if cfg.anon_buf_bytes == 0 {
            return Err(DriverError::InvalidConfig {
                setting: "anon_buf_bytes",
                value: "0".into(),
                limit: "must be > 0".into(),
            });
        }
        let count = cfg.anon_pool_bytes.div_ceil(cfg.anon_buf_bytes).max(1);
        let mut d = Driver {
            mem,
            bus,
            cfg,
            conns: BTreeMap::new(),
            listeners: BTreeMap::new(),
            next_conn: 1,
            released: Vec::new(),
            news_queue: VecDeque::new(),
            host_errors: VecDeque::new(),
            stats: DriverStats {
                anon_buffers: count,
                ..DriverStats::default()
            },
            trace: None,
            timers: BTreeSet::new(),
            last_now: Instant::from_micros(0),
            scratch: Vec::new(),
            cpu: Busy::default(),
            copies_charged: 0,
        };
        d.copies_charged = {
            let s = d.mem.stats().snapshot();
            s.host_copy_bytes + s.copy_out_bytes + s.copy_in_bytes
        };
        d.check_rx(&cfg.rx)?;
        let mut batch = Vec::new();
        for _ in 0..count {
            batch.push(d.mem.alloc(cfg.anon_buf_bytes)?);
            if batch.len() == 256 {
                d.send_cmd(Command::PostAnonymous {
                    bufs: std::mem::take(&mut batch),
                });
            }
        }
        if !batch.is_empty() {
            d.send_cmd(Command::PostAnonymous { bufs: batch });
        }
        Ok(d)
    }

    fn check_rx(&self, rx: &RxConfig) -> Result<(), DriverError> {
        let pool = self.stats.anon_buffers * self.cfg.anon_buf_bytes;
        if rx.window == 0 || rx.window as usize > pool {
            return Err(DriverError::InvalidConfig {
                setting: "indicate_window_bytes",
                value: rx.window.to_string(),
                limit: format!("must be between 1 and {pool} (the anonymous pool)"),
            });
        }
        Ok(())
    }

    /// A clone of the event ring's receiver, for runtimes that sleep until the NIC raises an
    /// event (never take events from it: [`Driver::poll`] does).
    pub fn event_waitable(&self) -> crossbeam_channel::Receiver<toe_bus::ring::Stamped<Event>> {
        self.bus.event_receiver().clone()
    }

    /// The host memory this driver's buffers live in.
    pub fn memory(&self) -> &Arc<HostMemory> {
        &self.mem
    }
    /// Configuration.
    pub fn config(&self) -> &DriverConfig {
        &self.cfg
    }
    /// Counters.
    pub fn stats(&self) -> DriverStats {
        self.stats
    }
    /// Most bytes of anonymous buffers the driver ever held at once.
    pub fn anon_high_water_bytes(&self) -> usize {
        self.stats.anon_high_water * self.cfg.anon_buf_bytes
    }
    /// Allocate a host buffer (for named buffers or sends).
    pub fn alloc(&self, len: usize) -> Result<HostBuf, DriverError> {
        Ok(self.mem.alloc(len)?)
    }
    /// Free a host buffer.
    pub fn free(&self, buf: HostBuf) {
        self.mem.free(buf)
    }

    fn params(rx: &RxConfig) -> OffloadParams {
        OffloadParams {
            indicate_window: rx.window,
            policy: rx.policy,
        }
    }

    /// Active open to `remote` from `local_port` (0: ephemeral), with `rx` overriding the
    /// default receive configuration.
    pub fn connect(
        &mut self,
        remote: SocketAddrV4,
        local_port: u16,
        rx: Option<RxConfig>,
    ) -> Result<ConnId, DriverError> {
        let rx = rx.unwrap_or(self.cfg.rx);
        self.check_rx(&rx)?;
        let conn = self.next_active_id();
        let c = self.new_conn(conn, rx, ConnState::Connecting);
        self.conns.insert(conn, Box::new(c));
        self.send_cmd(Command::Connect {
            conn,
            remote,
            local_port,
            params: Self::params(&rx),
        });
        Ok(conn)
    }

    /// The next active-open id: top bit clear, never 0, never one still in use (ids wrap
    /// after 2^31 opens; a live or unreleased connection keeps its id).
    fn next_active_id(&mut self) -> ConnId {
        loop {
            let id = ConnId(self.next_conn);
            self.next_conn = (self.next_conn.wrapping_add(1)) & !ConnId::PASSIVE_BIT;
            if id.0 != 0 && !self.conns.contains_key(&id) {
                return id;
            }
            self.stats.ids_skipped += 1;
        }
    }

    /// Let the next active open try id `next` (tests of id wrap-around).
    pub fn set_next_conn_id(&mut self, next: u32) {
        self.next_conn = next & !ConnId::PASSIVE_BIT;
    }

    fn new_conn(&self, conn: ConnId, rx: RxConfig, state: ConnState) -> DConn {
        DConn {
            rx: ConnRx::new(conn, rx, self.cfg.anon_buf_bytes),
            state,
            local: None,
            remote: None,
            send_done: VecDeque::new(),
            sends_outstanding: 0,
            send_bytes_outstanding: 0,
            close_sent: false,
            nic_gone: false,
            timer: None,
            listener: None,
            news: News::default(),
            last_error: None,
            ulp: VecDeque::new(),
        }
    }

    /// Listen on `port`; up to `backlog` handshakes may complete before [`Driver::accept`].
    pub fn listen(
        &mut self,
        port: u16,
        backlog: u16,
        rx: Option<RxConfig>,
    ) -> Result<(), DriverError> {
        let rx = rx.unwrap_or(self.cfg.rx);
        self.check_rx(&rx)?;
        if self.listeners.contains_key(&port) {
            return Err(DriverError::PortInUse(port));
        }
        self.listeners.insert(port, (rx, VecDeque::new()));
        self.send_cmd(Command::Listen {
            port,
            backlog,
            params: Self::params(&rx),
        });
        Ok(())
    }

    /// Take the next established passive connection on `port`.
    pub fn accept(&mut self, port: u16) -> Option<ConnId> {
        self.listeners.get_mut(&port)?.1.pop_front()
    }

    fn note(&mut self, conn: ConnId, e: AppEvent) {
        let Some(c) = self.conns.get_mut(&conn) else {
            if let AppEvent::Error(msg) = e {
                if self.host_errors.len() >= MAX_HOST_ERRORS {
                    self.host_errors.pop_front();
                    self.stats.errors_dropped += 1;
                }
                self.host_errors.push_back(msg);
            }
            return;
        };
        if let AppEvent::Error(msg) = e.clone() {
            c.last_error = Some(msg);
        }
        let first = c.news.0 == 0;
        c.news.0 |= News::bit(&e);
        if first {
            self.news_queue.push_back(conn);
            // Entries of released connections are skipped when reached; an application that
            // never takes events must not make them pile up: drop them once they could
            // outnumber the live connections.
            if self.news_queue.len() > 2 * self.conns.len() + 16 {
                let conns = &self.conns;
                self.news_queue
                    .retain(|id| conns.get(id).is_some_and(|c| c.news.0 != 0));
            }
        }
    }

    /// Entries waiting in the application event queue (connections with news, released ones
    /// not yet skipped, host-wide errors): at most `2 × connections + 17 + MAX_HOST_ERRORS`.
    pub fn events_queued(&self) -> usize {
        self.news_queue.len() + self.host_errors.len()
    }

    /// Next application event. Events are coalesced per connection: a connection has at most
    /// one pending event of each kind, and connections with news queue once each, in the
    /// order their news began. So nothing that should wake an application is ever dropped,
    /// and the queue is bounded by the number of connections (plus [`MAX_HOST_ERRORS`]
    /// host-wide errors, reported with connection id 0). Within one connection, kinds come
    /// in this order: `Connected`, `Incoming`, `ConnectFailed`, `DataAvailable`,
    /// `NamedComplete`, `SendDone`, `PeerClosed`, `Reset`, `Ulp`, `Error` (the latest
    /// message), `Closed`. An event is news, not a count: `SendDone` means "one or more sends came
    /// back", `DataAvailable` means "look at this connection's data".
    pub fn take_event(&mut self) -> Option<(ConnId, AppEvent)> {
        if let Some(msg) = self.host_errors.pop_front() {
            return Some((ConnId(0), AppEvent::Error(msg)));
        }
        loop {
            let conn = *self.news_queue.front()?;
            let Some(c) = self.conns.get_mut(&conn) else {
                self.news_queue.pop_front();
                continue;
            };
            if c.news.0 == 0 {
                self.news_queue.pop_front();
                continue;
            }
            let bit = c.news.0 & c.news.0.wrapping_neg();
            c.news.0 &= !bit;
            if c.news.0 == 0 {
                self.news_queue.pop_front();
            }
            let e = match bit {
                News::CONNECTED => AppEvent::Connected,
                News::INCOMING => AppEvent::Incoming {
                    port: c.listener.unwrap_or(0),
                },
                News::CONNECT_FAILED => AppEvent::ConnectFailed(match &c.state {
                    ConnState::Failed(why) => why.clone(),
                    _ => String::new(),
                }),
                News::DATA => AppEvent::DataAvailable,
                News::NAMED => AppEvent::NamedComplete,
                News::SEND_DONE => AppEvent::SendDone,
                News::PEER_CLOSED => AppEvent::PeerClosed,
                News::RESET => AppEvent::Reset,
                News::ULP => AppEvent::Ulp,
                News::ERROR => AppEvent::Error(c.last_error.clone().unwrap_or_default()),
                _ => AppEvent::Closed,
            };
            return Some((conn, e));
        }
    }

    fn conn(&self, conn: ConnId) -> Result<&DConn, DriverError> {
        self.conns
            .get(&conn)
            .map(|c| &**c)
            .ok_or(DriverError::UnknownConn(conn))
    }
    fn conn_mut(&mut self, conn: ConnId) -> Result<&mut DConn, DriverError> {
        self.conns
            .get_mut(&conn)
            .map(|c| &mut **c)
            .ok_or(DriverError::UnknownConn(conn))
    }

    /// State and counters of a connection.
    pub fn conn_info(&self, conn: ConnId) -> Result<ConnInfo, DriverError> {
        let c = self.conn(conn)?;
        Ok(ConnInfo {
            state: c.state.clone(),
            local: c.local,
            remote: c.remote,
            rx_config: *c.rx.config(),
            indicated: c.rx.indicated(),
            queued_bytes: c.rx.queued_bytes(),
            rx: c.rx.stats(),
            sends_outstanding: c.sends_outstanding,
            send_bytes_outstanding: c.send_bytes_outstanding,
        })
    }

    /// Connection state.
    pub fn state(&self, conn: ConnId) -> Result<ConnState, DriverError> {
        Ok(self.conn(conn)?.state.clone())
    }

    /// True when the peer's stream has ended (FIN or reset) and every byte was taken.
    pub fn at_eof(&self, conn: ConnId) -> Result<bool, DriverError> {
        Ok(self.conn(conn)?.rx.at_eof())
    }

    /// Bytes received and waiting (not accepted, not copied into a named buffer).
    pub fn queued_bytes(&self, conn: ConnId) -> Result<usize, DriverError> {
        Ok(self.conn(conn)?.rx.queued_bytes())
    }

    /// Record bus traffic from now on: every command sent and every event received goes to
    /// `sink`, stamped with the time of the driver's latest call.
    pub fn set_trace(&mut self, sink: Box<dyn TraceSink>) {
        self.trace = Some(sink);
    }

    /// Stop tracing and hand back the sink.
    pub fn take_trace(&mut self) -> Option<Box<dyn TraceSink>> {
        self.trace.take()
    }

    /// Keep `timers` in step with the connection's push-timer deadline (O(log n) per call,
    /// so polling costs nothing per idle connection).
    fn touch(&mut self, conn: ConnId) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let new = c.rx.poll_at();
        if new != c.timer {
            if let Some(t) = c.timer {
                self.timers.remove(&(t, conn));
            }
            if let Some(t) = new {
                self.timers.insert((t, conn));
            }
            c.timer = new;
        }
    }

    fn send_cmd(&mut self, c: Command) {
        if let Some(t) = self.trace.as_mut() {
            self.scratch.clear();
            let (kind, conn, why) = describe_command(&c, &mut self.scratch);
            t.record(&TraceRecord {
                t_us: self.last_now.total_micros(),
                dir: Dir::Command,
                kind,
                conn,
                fields: &self.scratch,
                why,
            });
        }
        if self.cfg.cost.is_free() {
            self.bus.send(c);
        } else {
            self.charge_copies();
            self.cpu
                .charge(self.last_now, u128::from(self.cfg.cost.command_ns) * 1000);
            self.bus.send_at(c, self.cpu.departs(self.last_now));
        }
    }

    /// Charge the host copies counted in host memory since the last charge (the driver's
    /// own, and those of application handles reading and writing through it).
    fn charge_copies(&mut self) {
        let s = self.mem.stats().snapshot();
        let total = s.host_copy_bytes + s.copy_out_bytes + s.copy_in_bytes;
        let new = total - self.copies_charged.min(total);
        self.copies_charged = total;
        self.cpu.charge(
            self.last_now,
            transfer_ps(new, self.cfg.cost.copy_bytes_per_s),
        );
    }

    /// The host CPU's timeline under the cost model: when it is free, and the work charged
    /// so far (events, commands, copies, and what applications charged).
    pub fn cpu(&self) -> Busy {
        self.cpu
    }

    /// Charge work an application did on the host CPU at `now` outside the driver:
    /// `crc_bytes` run through CRC32C in software and `copy_bytes` copied within
    /// application memory (host memory copies through the driver are charged already). The
    /// commands the driver sends next leave after it.
    pub fn charge_app(&mut self, now: Instant, crc_bytes: u64, copy_bytes: u64) {
        let c = self.cfg.cost;
        self.cpu.charge(
            now.max(self.last_now),
            transfer_ps(crc_bytes, c.crc_bytes_per_s) + transfer_ps(copy_bytes, c.copy_bytes_per_s),
        );
    }

    fn absorb(&mut self, out: Outputs) {
        for c in out.commands {
            self.send_cmd(c);
        }
        self.stats.anon_in_driver -= out.released.len();
        self.released.extend(out.released);
        for (conn, note) in out.notes {
            let e = match note {
                Note::DataAvailable => AppEvent::DataAvailable,
                Note::NamedComplete => AppEvent::NamedComplete,
            };
            self.note(conn, e);
        }
    }

    fn rx_open(c: &DConn, conn: ConnId, what: &'static str) -> Result<(), DriverError> {
        match c.state {
            ConnState::Connecting | ConnState::Established | ConnState::PeerClosed => Ok(()),
            ref s => Err(DriverError::BadState {
                conn,
                state: s.clone(),
                what,
            }),
        }
    }

    /// Post a named buffer (the whole of `buf`), optionally in push mode.
    pub fn post_named(
        &mut self,
        now: Instant,
        conn: ConnId,
        buf: HostBuf,
        push: bool,
    ) -> Result<NamedId, Refused> {
        let check = self
            .conn(conn)
            .and_then(|c| Self::rx_open(c, conn, "post_named"));
        if let Err(error) = check {
            return Err(Refused { error, buf });
        }
        let mut out = Outputs::default();
        let c = self.conns.get_mut(&conn).expect("checked");
        let id = c.rx.post_named(&self.mem, now, buf, push, &mut out);
        self.absorb(out);
        self.touch(conn);
        Ok(id)
    }

    /// Take the oldest completed named buffer of `conn`.
    pub fn take_completion(
        &mut self,
        conn: ConnId,
    ) -> Result<Option<NamedCompletion>, DriverError> {
        Ok(self.conn_mut(conn)?.rx.take_completion())
    }

    /// Cancel every posted named buffer of `conn` (they complete with `Cancelled`).
    pub fn cancel_named(&mut self, now: Instant, conn: ConnId) -> Result<(), DriverError> {
        let mut out = Outputs::default();
        let c = self
            .conns
            .get_mut(&conn)
            .ok_or(DriverError::UnknownConn(conn))?;
        c.rx.cancel_named(&self.mem, now, &mut out);
        self.absorb(out);
        self.touch(conn);
        Ok(())
    }

    /// Accept received data in place (see [`ConnRx::accept_in_place`]).
    pub fn accept_in_place(
        &mut self,
        now: Instant,
        conn: ConnId,
        f: impl FnMut(&[u8]) -> usize,
    ) -> Result<usize, DriverError> {
        let mut out = Outputs::default();
        let c = self
            .conns
            .get_mut(&conn)
            .ok_or(DriverError::UnknownConn(conn))?;
        let n = c.rx.accept_in_place(&self.mem, now, f, &mut out);
        self.absorb(out);
        self.touch(conn);
        Ok(n)
    }

    /// Copy received data out to `dst` (one counted copy on top of the receive path).
    pub fn read(
        &mut self,
        now: Instant,
        conn: ConnId,
        dst: &mut [u8],
    ) -> Result<usize, DriverError> {
        let mut at = 0;
        let n = self.accept_in_place(now, conn, |src| {
            let k = src.len().min(dst.len() - at);
            dst[at..at + k].copy_from_slice(&src[..k]);
            at += k;
            k
        })?;
        self.mem.count_copy_out(n);
        Ok(n)
    }

    /// Send the first `len` bytes of `buf`; it comes back through
    /// [`Driver::take_send_done`] once the peer acknowledged them.
    pub fn send(&mut self, conn: ConnId, buf: HostBuf, len: usize) -> Result<(), Refused> {
        let check = self.conn(conn).and_then(|c| match c.state {
            ConnState::Established | ConnState::PeerClosed if !c.close_sent => Ok(()),
            ref s => Err(DriverError::BadState {
                conn,
                state: s.clone(),
                what: "send",
            }),
        });
        let check = check.and_then(|_| {
            if len == 0 || len > buf.len() || len > u32::MAX as usize {
                Err(DriverError::InvalidConfig {
                    setting: "send length",
                    value: len.to_string(),
                    limit: format!("must be between 1 and the buffer length {}", buf.len()),
                })
            } else {
                Ok(())
            }
        });
        if let Err(error) = check {
            return Err(Refused { error, buf });
        }
        let c = self.conns.get_mut(&conn).expect("checked");
        c.sends_outstanding += 1;
        c.send_bytes_outstanding += len;
        self.send_cmd(Command::Send {
            conn,
            buf,
            len: len as u32,
        });
        Ok(())
    }

    /// Hand the connection's data path to the NIC's upper-layer engine `engine`, started
    /// with `params`, at the first byte not received yet; `carry` are bytes received but not
    /// consumed by the host's software (the engine takes them first). Received data must
    /// all have been taken (it belongs in `carry`), and so must the bytes of named buffers
    /// the driver fills itself (complete or cancel them first); named buffers at the NIC
    /// come back `Cancelled` with a stale refusal. Returns the stream offset of the
    /// offload; the answer comes as [`UlpNote::Started`] or [`UlpNote::Refused`].
    pub fn ulp_offload(
        &mut self,
        conn: ConnId,
        engine: &'static str,
        params: Vec<u8>,
        carry: Vec<u8>,
    ) -> Result<u64, DriverError> {
        let c = self.conn(conn)?;
        let open = matches!(c.state, ConnState::Established | ConnState::PeerClosed);
        if !open || c.close_sent || c.rx.queued_bytes() > 0 {
            return Err(DriverError::BadState {
                conn,
                state: c.state.clone(),
                what: "an engine offload (closing, or received data not taken: it goes in carry)",
            });
        }
        let stream_offset = c.rx.received_end();
        self.send_cmd(Command::UlpOffload {
            conn,
            engine,
            params,
            stream_offset,
            carry,
        });
        Ok(stream_offset)
    }

    /// Register `buf` for task tag `tag` with the connection's engine slot: it comes back
    /// as [`UlpNote::Released`], exactly once.
    pub fn ulp_register(&mut self, conn: ConnId, tag: u32, buf: HostBuf) -> Result<(), Refused> {
        if let Err(error) = self.conn(conn) {
            return Err(Refused { error, buf });
        }
        self.send_cmd(Command::UlpRegister { conn, tag, buf });
        Ok(())
    }

    /// Release task tag `tag` after the send requests already given.
    pub fn ulp_release(&mut self, conn: ConnId, tag: u32) -> Result<(), DriverError> {
        self.conn(conn)?;
        self.send_cmd(Command::UlpRelease { conn, tag });
        Ok(())
    }

    /// Ask the connection's engine to send `request` (the protocol's encoding).
    pub fn ulp_send(&mut self, conn: ConnId, request: Vec<u8>) -> Result<(), DriverError> {
        self.conn(conn)?;
        self.send_cmd(Command::UlpSend { conn, request });
        Ok(())
    }

    /// Hold the connection's pure TCP ACKs on the NIC for up to `hold`'s acknowledgement
    /// window so that a later segment of ours carries them (see [`Command::AckHold`]), or,
    /// with `None`, stop holding them.
    pub fn set_ack_hold(&mut self, conn: ConnId, hold: Option<AckHold>) -> Result<(), DriverError> {
        self.conn(conn)?;
        self.send_cmd(Command::AckHold { conn, hold });
        Ok(())
    }

    /// Mark the connection's outgoing IPv4 packets with `dscp` (0..=63; 0: unmarked) from
    /// now on (see [`Command::Mark`]). Sent right after [`Driver::connect`], the mark is on
    /// the SYN too.
    pub fn set_dscp(&mut self, conn: ConnId, dscp: u8) -> Result<(), DriverError> {
        self.conn(conn)?;
        if dscp > 63 {
            return Err(DriverError::InvalidConfig {
                setting: "dscp",
                value: dscp.to_string(),
                limit: "0..=63".into(),
            });
        }
        self.send_cmd(Command::Mark { conn, dscp });
        Ok(())
    }

    /// Set the NIC's egress shaper: the connections under it ([`Driver::set_paced`]) send
    /// at most `bytes_per_s` bytes of TCP payload per second between them, in bursts of at
    /// most `burst_bytes`, a segment each in turn; 0 turns it off (see
    /// [`Command::Shape`]).
    pub fn set_shaper(&mut self, bytes_per_s: u64, burst_bytes: u32) {
        self.send_cmd(Command::Shape {
            bytes_per_s,
            burst_bytes,
        });
    }

    /// Put the connection under the NIC's egress shaper, or take it out (see
    /// [`Command::Pace`]).
    pub fn set_paced(&mut self, conn: ConnId, on: bool) -> Result<(), DriverError> {
        self.conn(conn)?;
        self.send_cmd(Command::Pace { conn, on });
        Ok(())
    }

    /// The next report of the connection's engine slot.
    pub fn take_ulp(&mut self, conn: ConnId) -> Result<Option<UlpNote>, DriverError> {
        Ok(self.conn_mut(conn)?.ulp.pop_front())
    }

    /// Take a send buffer back: `(buffer, every byte acknowledged)`.
    pub fn take_send_done(&mut self, conn: ConnId) -> Result<Option<(HostBuf, bool)>, DriverError> {
        Ok(self.conn_mut(conn)?.send_done.pop_front())
    }

    /// Graceful close (FIN after queued sends).
    pub fn close(&mut self, conn: ConnId) -> Result<(), DriverError> {
        let c = self.conn_mut(conn)?;
        if c.close_sent
            || matches!(
                c.state,
                ConnState::Closed | ConnState::Reset | ConnState::Failed(_)
            )
        {
            return Ok(());
        }
        c.close_sent = true;
        self.send_cmd(Command::Close { conn });
        Ok(())
    }

    /// Abortive close (RST now); posted buffers come back `Cancelled`.
    pub fn abort(&mut self, conn: ConnId) -> Result<(), DriverError> {
        let c = self.conn_mut(conn)?;
        if matches!(
            c.state,
            ConnState::Closed | ConnState::Reset | ConnState::Failed(_)
        ) {
            return Ok(());
        }
        c.close_sent = true;
        self.send_cmd(Command::Abort { conn });
        Ok(())
    }

    /// Forget a finished connection (after [`AppEvent::Closed`] or a failed connect), freeing
    /// anything it still holds. Refused while the NIC still has its context.
    pub fn release(&mut self, conn: ConnId) -> Result<(), DriverError> {
        let c = self.conn(conn)?;
        if !c.nic_gone {
            return Err(DriverError::BadState {
                conn,
                state: c.state.clone(),
                what: "release",
            });
        }
        let mut c = self.conns.remove(&conn).expect("checked");
        if let Some(t) = c.timer {
            self.timers.remove(&(t, conn));
        }
        let mut out = Outputs::default();
        c.rx.release_all(ReturnReason::Cancelled, &mut out);
        while let Some(done) = c.rx.take_completion() {
            self.mem.free(done.buf);
        }
        for (b, _) in c.send_done.drain(..) {
            self.mem.free(b);
        }
        for note in c.ulp.drain(..) {
            if let UlpNote::Released { buf, .. } = note {
                self.mem.free(buf);
            }
        }
        out.notes.clear();
        self.absorb(out);
        Ok(())
    }

    /// When [`Driver::poll`] must run next for timers, if ever.
    pub fn poll_at(&self) -> Option<Instant> {
        let free = self.cpu.free_at();
        // Busy: what arrived meanwhile is looked at when the CPU is free.
        if self.bus.staged() > 0 || !self.released.is_empty() || free > self.last_now {
            return Some(free);
        }
        match (self.timers.first().map(|(t, _)| *t), self.bus.next_due()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
        .map(|t| t.max(free))
    }

    /// Send queued commands to the NIC (anonymous buffers drained since the last call
    /// included). Returns true if anything entered the ring.
    pub fn flush(&mut self) -> bool {
        if !self.released.is_empty() {
            let bufs = std::mem::take(&mut self.released);
            self.send_cmd(Command::PostAnonymous { bufs });
        }
        self.bus.flush()
    }

    /// Take and handle every event from the NIC, run due timers, flush commands. Returns
    /// true if anything happened.
    pub fn poll(&mut self, now: Instant) -> bool {
        self.last_now = self.last_now.max(now);
        let metered = !self.cfg.cost.is_free();
        if metered && self.cpu.is_busy(now) {
            // Still paying for earlier work: events that arrive start their bus latency.
            self.bus.pump(now);
            return self.flush();
        }
        let mut progress = self.bus.flush();
        while let Ok(Some(e)) = self.bus.try_recv(now) {
            progress = true;
            self.stats.events += 1;
            if metered {
                self.cpu
                    .charge(now, u128::from(self.cfg.cost.event_ns) * 1000);
            }
            if let Some(t) = self.trace.as_mut() {
                self.scratch.clear();
                let (kind, conn, why) = describe_event(&e, &mut self.scratch);
                t.record(&TraceRecord {
                    t_us: now.total_micros(),
                    dir: Dir::Event,
                    kind,
                    conn,
                    fields: &self.scratch,
                    why,
                });
            }
            self.event(now, e);
        }
        while let Some(&(t, id)) = self.timers.first() {
            if t > now {
                break;
            }
            self.timers.pop_first();
            let mut out = Outputs::default();
            if let Some(c) = self.conns.get_mut(&id) {
                c.timer = None;
                c.rx.on_timer(now, &mut out);
            }
            self.absorb(out);
            self.touch(id);
            progress = true;
        }
        progress |= self.flush();
        if metered {
            self.charge_copies();
        }
        progress
    }

    fn stray(&mut self, e: Event) {
        self.stats.stray_events += 1;
        match e {
            Event::IndicateData { buf, .. } => {
                self.stats.anon_in_driver += 1;
                self.absorb(Outputs {
                    released: vec![buf],
                    ..Outputs::default()
                });
            }
            Event::NamedDone { buf, .. }
            | Event::SendDone { buf, .. }
            | Event::UlpReleased { buf, .. } => self.mem.free(buf),
            _ => {}
        }
    }

    fn event(&mut self, now: Instant, e: Event) {
        let conn = match &e {
            Event::Established { conn, .. }
            | Event::ConnectFailed { conn, .. }
            | Event::IndicateData { conn, .. }
            | Event::NamedFilling { conn }
            | Event::NamedDone { conn, .. }
            | Event::SendDone { conn, .. }
            | Event::PeerClosed { conn }
            | Event::Reset { conn }
            | Event::Closed { conn }
            | Event::UlpStarted { conn, .. }
            | Event::UlpRefused { conn, .. }
            | Event::UlpReleased { conn, .. }
            | Event::UlpError { conn, .. } => Some(*conn),
            Event::CommandError { conn, .. } => *conn,
            Event::ListenFailed { .. } | Event::BuffersReturned { .. } => None,
        };
        if let Event::Established {
            conn,
            local,
            remote,
            listener: Some(port),
            indicate_window,
        } = e
        {
            let Some(rx) = self.listeners.get(&port).map(|(rx, _)| *rx) else {
                self.send_cmd(Command::Abort { conn });
                return;
            };
            if self.conns.contains_key(&conn) {
                // The NIC reused an id this driver still holds (the application never
                // released it): refuse the newcomer rather than overwrite the old one.
                self.stats.stray_events += 1;
                self.send_cmd(Command::Abort { conn });
                return;
            }
            let mut rx = rx;
            rx.window = indicate_window;
            let mut c = self.new_conn(conn, rx, ConnState::Established);
            c.local = Some(local);
            c.remote = Some(remote);
            c.listener = Some(port);
            self.conns.insert(conn, Box::new(c));
            if let Some((_, queue)) = self.listeners.get_mut(&port) {
                queue.push_back(conn);
            }
            self.note(conn, AppEvent::Incoming { port });
            return;
        }
        if let Event::ListenFailed { port, error } = e {
            self.listeners.remove(&port);
            self.note(
                ConnId(0),
                AppEvent::Error(format!("listen on {port}: {error}")),
            );
            return;
        }
        if let Event::BuffersReturned { bufs } = e {
            self.released.extend(bufs);
            return;
        }
        let Some(conn) = conn else {
            if let Event::CommandError { error, .. } = e {
                self.stats.nic_errors += 1;
                self.note(ConnId(0), AppEvent::Error(error));
            }
            return;
        };
        if !self.conns.contains_key(&conn) {
            self.stray(e);
            return;
        }
        let mut out = Outputs::default();
        let mem = self.mem.clone();
        let c = self.conns.get_mut(&conn).expect("checked");
        let app = match e {
            Event::Established {
                local,
                remote,
                indicate_window,
                ..
            } => {
                c.local = Some(local);
                c.remote = Some(remote);
                c.rx.set_window(indicate_window);
                c.state = ConnState::Established;
                Some(AppEvent::Connected)
            }
            Event::ConnectFailed { error, .. } => {
                c.nic_gone = true;
                c.state = ConnState::Failed(error.clone());
                Some(AppEvent::ConnectFailed(error))
            }
            Event::IndicateData {
                buf,
                len,
                stream_offset,
                psh_ends,
                ..
            } => {
                self.stats.anon_in_driver += 1;
                self.stats.anon_high_water =
                    self.stats.anon_high_water.max(self.stats.anon_in_driver);
                c.rx.on_indicate(
                    &mem,
                    now,
                    buf,
                    len as usize,
                    stream_offset,
                    psh_ends,
                    &mut out,
                );
                None
            }
            Event::NamedFilling { .. } => {
                c.rx.on_named_filling(now);
                None
            }
            Event::NamedDone {
                buf,
                filled,
                end_offset,
                why,
                epoch,
                ..
            } => {
                c.rx.on_named_done(
                    &mem,
                    now,
                    buf,
                    filled as usize,
                    end_offset,
                    why,
                    epoch,
                    &mut out,
                );
                None
            }
            Event::SendDone { buf, len, ok, .. } => {
                c.sends_outstanding = c.sends_outstanding.saturating_sub(1);
                c.send_bytes_outstanding = c.send_bytes_outstanding.saturating_sub(len as usize);
                c.send_done.push_back((buf, ok));
                Some(AppEvent::SendDone)
            }
            Event::PeerClosed { .. } => {
                c.rx.on_peer_closed(&mem, now, &mut out);
                if c.state == ConnState::Established {
                    c.state = ConnState::PeerClosed;
                }
                Some(AppEvent::PeerClosed)
            }
            Event::Reset { .. } => {
                c.rx.on_reset(&mut out);
                c.state = ConnState::Reset;
                Some(AppEvent::Reset)
            }
            Event::Closed { .. } => {
                c.nic_gone = true;
                if !c.rx.was_reset() {
                    // data still queued stays readable; buffers posted come back Cancelled
                    c.rx.release_named(ReturnReason::Cancelled, &mut out);
                }
                if !matches!(c.state, ConnState::Reset | ConnState::Failed(_)) {
                    c.state = ConnState::Closed;
                }
                Some(AppEvent::Closed)
            }
            Event::CommandError { error, .. } => {
                self.stats.nic_errors += 1;
                Some(AppEvent::Error(error))
            }
            Event::UlpStarted { stream_offset, .. } => {
                c.ulp.push_back(UlpNote::Started { stream_offset });
                Some(AppEvent::Ulp)
            }
            Event::UlpRefused {
                position,
                stale,
                error,
                ..
            } => {
                c.ulp.push_back(UlpNote::Refused {
                    position,
                    stale,
                    error,
                });
                Some(AppEvent::Ulp)
            }
            Event::UlpReleased {
                tag, buf, placed, ..
            } => {
                c.ulp.push_back(UlpNote::Released { tag, buf, placed });
                Some(AppEvent::Ulp)
            }
            Event::UlpError { error, .. } => {
                c.ulp.push_back(UlpNote::Error(error));
                Some(AppEvent::Ulp)
            }
            Event::ListenFailed { .. } | Event::BuffersReturned { .. } => None,
        };
        self.absorb(out);
        self.touch(conn);
        if let Some(a) = app {
            self.note(conn, a);
        }
    }
}
