//! Command and event rings: the only way the host driver and the NIC talk.
//!
//! Commands flow host -> NIC, events NIC -> host, each through a bounded crossbeam channel of
//! `depth` entries. Neither side ever blocks on a ring: each end stages what does not fit in a
//! local queue and retries on its next poll ([`HostEnd::flush`], [`NicEnd::flush`]). That
//! removes the classic driver deadlock in which both rings are full and both sides wait, and it
//! keeps memory bounded, because what either side can produce is itself bounded by the buffers
//! it owns (the NIC raises a data event only with a host buffer in hand).
//!
//! Buffers cross the bus as [`HostBuf`] tokens inside commands and events, so ownership of the
//! bytes moves with the message.

use std::collections::VecDeque;
use std::fmt;
use std::net::SocketAddrV4;

use crossbeam_channel::{bounded, Receiver, Sender, TryRecvError, TrySendError};

use crate::mem::HostBuf;
use crate::time::{Duration, Instant};

/// Identifies one offloaded TCP connection on one host. Active opens get ids chosen by the
/// driver (top bit clear); connections accepted by the NIC get ids chosen by the NIC (top bit
/// set), so the two never collide.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnId(pub u32);

impl ConnId {
    /// The bit that marks ids allocated by the NIC for passive opens.
    pub const PASSIVE_BIT: u32 = 1 << 31;
}

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 & Self::PASSIVE_BIT != 0 {
            write!(f, "p{}", self.0 & !Self::PASSIVE_BIT)
        } else {
            write!(f, "a{}", self.0)
        }
    }
}

/// Receive policy of a connection: the patent's indicate window, or one of the prior-art
/// behaviours kept for comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum RxPolicy {
    /// Seed 004: at most W bytes indicated into anonymous buffers, then suspend until the
    /// driver acknowledges or a named buffer is posted.
    #[default]
    IndicateWindow,
    /// Chimney-style: indicate at most one MSS, then hold until the application accepts it.
    MssHoldoff,
    /// Traditional stack: the NIC never holds off; the driver copies everything into its own
    /// socket buffer (bounded only by a large safety cap).
    UnboundedCopy,
}

impl RxPolicy {
    /// All policies, in the order reports list them.
    pub const ALL: [RxPolicy; 3] = [
        RxPolicy::IndicateWindow,
        RxPolicy::MssHoldoff,
        RxPolicy::UnboundedCopy,
    ];

    /// The policy's command-line / config name.
    pub fn name(self) -> &'static str {
        match self {
            RxPolicy::IndicateWindow => "indicate-window",
            RxPolicy::MssHoldoff => "mss-holdoff",
            RxPolicy::UnboundedCopy => "unbounded-copy",
        }
    }
}

impl std::str::FromStr for RxPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        RxPolicy::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                format!("unknown receive policy {s:?} (expected indicate-window, mss-holdoff or unbounded-copy)")
            })
    }
}

impl fmt::Display for RxPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Per-connection offload parameters, fixed when the connection is offloaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OffloadParams {
    /// indicateWindowSize W in bytes (> 0). Ignored by `UnboundedCopy`; replaced by the MSS
    /// under `MssHoldoff`.
    pub indicate_window: u32,
    /// Receive policy.
    pub policy: RxPolicy,
}

/// The most anonymous buffers one connection may hold at once: its window `window` (bytes)
/// rounded up to whole buffers of `anon_len` bytes, at least 1. The NIC never indicates into
/// more buffers than this for one connection until the driver acknowledges drained ones, so a
/// peer that sends tiny segments cannot take more of the shared pool than a bulk sender (the
/// pool holds `max_conns` shares). NIC and driver both compute it with this function.
pub fn buffer_share(window: u32, anon_len: usize) -> u32 {
    let anon = anon_len.max(1) as u64;
    u32::try_from(u64::from(window).div_ceil(anon))
        .unwrap_or(u32::MAX)
        .max(1)
}

/// How a connection's pure ACKs are held ([`Command::AckHold`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckHold {
    /// The acknowledgement window: the longest an owed ACK waits, µs (> 0).
    pub window_us: u32,
}

/// Why a named buffer came back from the NIC or the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReturnReason {
    /// Completely filled.
    Full,
    /// Push mode, and a segment with TCP PSH was placed into it.
    Push,
    /// Push mode, and the push timer expired with the buffer partly filled.
    PushTimer,
    /// The peer closed its direction (FIN) and all data before it was delivered.
    Eof,
    /// The application cancelled it, or closed / aborted the connection.
    Cancelled,
    /// The peer reset the connection.
    Reset,
    /// Bus-internal: the NIC refused the post because data it had already indicated was still
    /// in flight to the driver; the driver fills the buffer from that data and posts it again.
    /// Never reported to an application.
    Stale,
}

/// Host -> NIC commands.
#[derive(Debug)]
pub enum Command {
    /// Open a passive listener on `port`; accepted connections use `params`.
    Listen {
        /// TCP port.
        port: u16,
        /// Connections the NIC may hold in SYN-RECEIVED/ESTABLISHED before the host accepts.
        backlog: u16,
        /// Offload parameters of accepted connections.
        params: OffloadParams,
    },
    /// Stop listening on `port`.
    Unlisten {
        /// TCP port.
        port: u16,
    },
    /// Active open to `remote`, offloaded with `params`.
    Connect {
        /// Driver-chosen id (top bit clear).
        conn: ConnId,
        /// Peer address.
        remote: SocketAddrV4,
        /// Local port, 0 for an ephemeral one.
        local_port: u16,
        /// Offload parameters.
        params: OffloadParams,
    },
    /// Give the NIC anonymous buffers for indications (shared by all connections).
    PostAnonymous {
        /// The buffers; ownership passes to the NIC.
        bufs: Vec<HostBuf>,
    },
    /// Post a named buffer for direct placement.
    PostNamed {
        /// Connection.
        conn: ConnId,
        /// The buffer; ownership passes to the NIC.
        buf: HostBuf,
        /// Return the buffer early on TCP PSH.
        push: bool,
        /// Bytes at the start of the buffer the driver already filled from indicated data.
        prefill: u32,
        /// Stream offset of the first byte the driver has NOT received (indicated or placed).
        /// The NIC places only if its own delivery position equals this and it holds no other
        /// named buffer; if it holds named buffers, the new one is queued behind them.
        stream_offset: u64,
        /// Post epoch: bumped by the driver after every `Stale` return, so that posts sent
        /// before the driver saw the bounce are bounced too (order is preserved).
        epoch: u32,
    },
    /// Return the head named buffer now (push timer expiry or cancel).
    ReturnNamed {
        /// Connection.
        conn: ConnId,
        /// Reason reported back (`PushTimer` or `Cancelled`).
        why: ReturnReason,
        /// Return every held named buffer instead of only the head.
        all: bool,
    },
    /// indicateAcknowledge: P -= bytes (never below 0), and the connection's charge of
    /// anonymous buffers drops by `bufs` (never below 0; see [`buffer_share`]).
    IndicateAck {
        /// Connection.
        conn: ConnId,
        /// AcknowledgedBytes.
        bytes: u32,
        /// Anonymous buffers of this connection the driver drained since its last
        /// acknowledgement (or named-buffer post).
        bufs: u32,
    },
    /// Transmit `len` bytes from the start of `buf`; the NIC segments it.
    Send {
        /// Connection.
        conn: ConnId,
        /// The buffer; returned with `SendDone` once the peer acknowledged every byte.
        buf: HostBuf,
        /// Bytes to send (<= buf.len()).
        len: u32,
    },
    /// Graceful close: FIN after all queued sends.
    Close {
        /// Connection.
        conn: ConnId,
    },
    /// Abortive close: RST now; queued sends and named buffers come back.
    Abort {
        /// Connection.
        conn: ConnId,
    },
    /// Hand the connection's data path to the NIC's upper-layer engine `engine` (a name the
    /// NIC was built with), started with the protocol's `params`, at stream offset
    /// `stream_offset`: the first byte the driver has NOT received. The NIC starts it only if
    /// its own delivery position equals that offset; otherwise it answers
    /// [`Event::UlpRefused`] with `stale: true` (after returning the named buffers it holds,
    /// `Cancelled`) and suspends delivery on the connection at its position, so that a retry
    /// with that position (once the driver has taken what was in flight) succeeds. `carry`: bytes the host received but its software did not
    /// consume (the start of the first PDU after the handshake); the engine takes them
    /// before the stream. After the start, what the driver is indicated is the engine's
    /// record stream, and the connection sends only through [`Command::UlpSend`].
    UlpOffload {
        /// Connection.
        conn: ConnId,
        /// The engine's name.
        engine: &'static str,
        /// The engine's start parameters (the protocol's encoding).
        params: Vec<u8>,
        /// Stream offset the engine starts at, bytes.
        stream_offset: u64,
        /// Received bytes the engine takes first.
        carry: Vec<u8>,
    },
    /// Register `buf` for task tag `tag`: the engine places the tag's data into it (and
    /// reads data to send from it). Ownership passes to the NIC until
    /// [`Event::UlpReleased`] gives it back, exactly once.
    UlpRegister {
        /// Connection.
        conn: ConnId,
        /// The task tag.
        tag: u32,
        /// The buffer (its whole length is the tag's).
        buf: HostBuf,
    },
    /// Release task tag `tag` once every [`Command::UlpSend`] before it has been carried
    /// out: its buffer comes back with [`Event::UlpReleased`] (if the NIC still holds it).
    UlpRelease {
        /// Connection.
        conn: ConnId,
        /// The task tag.
        tag: u32,
    },
    /// Hold (or stop holding) the pure TCP ACKs of `conn` (seed 000's combined
    /// acknowledgement): an ACK owed for received data waits up to `hold.window_us` for a
    /// data segment of ours (an upper-layer response) to carry it, and goes out as a pure
    /// ACK only when that time expires or once more than half the receive window is
    /// unacknowledged (the sender would stall on its window). ACKs for out-of-order
    /// segments are not held, but after three duplicates for one hole (what the sender's
    /// fast retransmit needs) the rest are thinned out. `None` restores the NIC's ordinary
    /// delayed ACK.
    AckHold {
        /// Connection.
        conn: ConnId,
        /// The hold, or `None` to stop holding.
        hold: Option<AckHold>,
    },
    /// Mark every IPv4 packet the connection sends from now on with `dscp` (the six
    /// Differentiated Services bits of the TOS byte, 0..=63; 0 sends unmarked), the ECN
    /// bits left as they are: how a transfer's service-level objective reaches the network
    /// (seed 003). A value above 63 is refused.
    Mark {
        /// Connection.
        conn: ConnId,
        /// Differentiated Services Code Point, 0..=63.
        dscp: u8,
    },
    /// Set the NIC's egress shaper (seed 003 #2, spacing packets): the connections it paces
    /// ([`Command::Pace`]) send at most `bytes_per_s` bytes of TCP payload per second
    /// between them, with bursts of at most `burst_bytes`; the NIC serves the ones waiting
    /// for the shaper in turn, a segment each, so no connection starves. A connection that
    /// waits keeps its data in its own send buffer (nothing is dropped, nothing queues in
    /// the NIC). `bytes_per_s` 0 turns the shaper off: every connection sends as TCP lets
    /// it.
    Shape {
        /// Payload bytes per second, shared by the paced connections; 0: off.
        bytes_per_s: u64,
        /// The most payload bytes sent at once after an idle spell, bytes.
        burst_bytes: u32,
    },
    /// Put the connection under the NIC's egress shaper ([`Command::Shape`]), or take it
    /// out.
    Pace {
        /// Connection.
        conn: ConnId,
        /// Paced from now on (true) or not (false).
        on: bool,
    },
    /// Ask the engine to send: `request` in the protocol's encoding (for iSCSI: a PDU
    /// header with inline data or a range of a registered buffer, or "this buffer as data
    /// PDUs"). Carried out in order, as the socket's send buffer takes the bytes.
    UlpSend {
        /// Connection.
        conn: ConnId,
        /// The request.
        request: Vec<u8>,
    },
}

/// NIC -> host events.
#[derive(Debug)]
pub enum Event {
    /// A `Listen` failed (port in use, no sockets).
    ListenFailed {
        /// TCP port.
        port: u16,
        /// Human-readable cause.
        error: String,
    },
    /// A connection reached ESTABLISHED and is offloaded.
    Established {
        /// Connection.
        conn: ConnId,
        /// Local address.
        local: SocketAddrV4,
        /// Peer address.
        remote: SocketAddrV4,
        /// Listener port for passive opens, `None` for active opens.
        listener: Option<u16>,
        /// Effective indicate window of the connection in bytes (MSS under `MssHoldoff`).
        indicate_window: u32,
    },
    /// An active open failed (refused, timed out, bad address).
    ConnectFailed {
        /// Connection.
        conn: ConnId,
        /// Human-readable cause.
        error: String,
    },
    /// IndicateData: `len` bytes placed at the start of anonymous buffer `buf`.
    IndicateData {
        /// Connection.
        conn: ConnId,
        /// The anonymous buffer; ownership passes to the driver.
        buf: HostBuf,
        /// Valid bytes.
        len: u32,
        /// Stream offset of the first byte.
        stream_offset: u64,
        /// Where TCP segments that carried PSH ended, as byte counts from the start of the
        /// chunk (ascending, each in `1..=len`). A chunk may span several PSH-bounded
        /// segments: packing them into one buffer keeps a peer that sends tiny PSH segments
        /// within its buffer share, and the driver still returns push-mode buffers exactly
        /// at each boundary.
        psh_ends: Vec<u32>,
    },
    /// First bytes were placed into a push-mode named buffer and no PSH came with them: the
    /// driver starts its push timer.
    NamedFilling {
        /// Connection.
        conn: ConnId,
    },
    /// A named buffer comes back.
    NamedDone {
        /// Connection.
        conn: ConnId,
        /// The buffer; ownership returns to the driver.
        buf: HostBuf,
        /// Valid bytes from the start of the buffer, prefill and in-flight gap included.
        filled: u32,
        /// Stream offset just past the last byte the NIC placed into it.
        end_offset: u64,
        /// Why it came back.
        why: ReturnReason,
        /// Epoch of the post this answers.
        epoch: u32,
    },
    /// Every byte of a `Send` buffer was acknowledged by the peer (or, with `ok == false`, the
    /// connection ended first).
    SendDone {
        /// Connection.
        conn: ConnId,
        /// The buffer; ownership returns to the driver.
        buf: HostBuf,
        /// Bytes the `Send` asked for.
        len: u32,
        /// All bytes acknowledged.
        ok: bool,
    },
    /// The peer sent FIN and every byte before it has been delivered.
    PeerClosed {
        /// Connection.
        conn: ConnId,
    },
    /// The peer reset the connection (all buffers already returned).
    Reset {
        /// Connection.
        conn: ConnId,
    },
    /// The connection is fully closed and its NIC context released (all buffers returned).
    Closed {
        /// Connection.
        conn: ConnId,
    },
    /// A command was refused (unknown connection, invalid state).
    CommandError {
        /// Connection, if the command named one.
        conn: Option<ConnId>,
        /// Human-readable cause.
        error: String,
    },
    /// Buffers the NIC hands back without data (anonymous buffers of a released context).
    BuffersReturned {
        /// The buffers.
        bufs: Vec<HostBuf>,
    },
    /// The engine runs the connection from `stream_offset` on.
    UlpStarted {
        /// Connection.
        conn: ConnId,
        /// The stream offset of the offload, bytes.
        stream_offset: u64,
    },
    /// A [`Command::UlpOffload`] was refused. With `stale`, the NIC had delivered up to
    /// `position` (past the offload's offset) and holds delivery there until the next
    /// offload command or the connection's end; otherwise (an unknown engine, bad
    /// parameters, an engine already running) nothing changed.
    UlpRefused {
        /// Connection.
        conn: ConnId,
        /// The NIC's delivery position, bytes.
        position: u64,
        /// Whether a retry at `position` can succeed.
        stale: bool,
        /// Human-readable cause.
        error: String,
    },
    /// A registered buffer comes back: released by the host, finished by the engine (its
    /// task's data is all in), replaced by a new registration of the same tag, or the
    /// connection ended. Each registered buffer comes back exactly once.
    UlpReleased {
        /// Connection.
        conn: ConnId,
        /// The task tag.
        tag: u32,
        /// The buffer; ownership returns to the driver.
        buf: HostBuf,
        /// Data bytes the engine placed into it while the NIC held it.
        placed: u32,
    },
    /// The engine refused a send request or an input it cannot go on from (the record
    /// stream says what the protocol saw): the host ends the connection or the task.
    UlpError {
        /// Connection.
        conn: ConnId,
        /// Human-readable cause.
        error: String,
    },
}

/// Create a bus with rings of `depth` entries each: the host's end and the NIC's end.
pub fn bus(depth: usize) -> (HostEnd, NicEnd) {
    bus_with_latency(depth, Duration::ZERO)
}

/// A bus whose every transaction takes `latency` to cross (the cost model: a message taken
/// from its ring at time t is delivered at t + latency, in order). With the virtual clock this
/// makes bus round trips visible in latency figures without costing wall time.
pub fn bus_with_latency(depth: usize, latency: Duration) -> (HostEnd, NicEnd) {
    let (cmd_tx, cmd_rx) = bounded(depth);
    let (evt_tx, evt_rx) = bounded(depth);
    (
        HostEnd {
            tx: Staged::new(cmd_tx),
            rx: Delayed::new(evt_rx, latency),
        },
        NicEnd {
            tx: Staged::new(evt_tx),
            rx: Delayed::new(cmd_rx, latency),
        },
    )
}

/// A message on a ring with the instant it leaves its sender: `None` for "when the receiver
/// takes it", or the instant the sender's work that produced it is done (the cost model).
pub type Stamped<T> = (Option<Instant>, T);

/// A ring receiver that delivers each message `latency` after it left: after the later of
/// its departure stamp and the time it was taken from the ring.
#[derive(Debug)]
struct Delayed<T> {
    chan: Receiver<Stamped<T>>,
    latency: Duration,
    held: VecDeque<(Instant, T)>,
    gone: bool,
}

impl<T> Delayed<T> {
    fn new(chan: Receiver<Stamped<T>>, latency: Duration) -> Self {
        Delayed {
            chan,
            latency,
            held: VecDeque::new(),
            gone: false,
        }
    }

    /// Take everything off the ring at `now` and hold it until due (in order).
    fn pump(&mut self, now: Instant) {
        loop {
            match self.chan.try_recv() {
                Ok((at, m)) => {
                    let left = at.map_or(now, |a| a.max(now));
                    self.held.push_back((left + self.latency, m));
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    self.gone = true;
                    break;
                }
            }
        }
    }

    /// The next message due at `now`. `Err(())` once the sender is gone and nothing is held.
    fn recv(&mut self, now: Instant) -> Result<Option<T>, ()> {
        if self.latency == Duration::ZERO && self.held.is_empty() {
            return match self.chan.try_recv() {
                Ok((at, m)) if at.is_none_or(|a| a <= now) => Ok(Some(m)),
                Ok((at, m)) => {
                    self.held.push_back((at.unwrap_or(now), m));
                    self.recv(now)
                }
                Err(TryRecvError::Empty) => Ok(None),
                Err(TryRecvError::Disconnected) => Err(()),
            };
        }
        self.pump(now);
        match self.held.front() {
            Some((due, _)) if *due <= now => Ok(self.held.pop_front().map(|(_, m)| m)),
            None if self.gone => Err(()),
            _ => Ok(None),
        }
    }

    fn next_due(&self) -> Option<Instant> {
        self.held.front().map(|(t, _)| *t)
    }
}

/// A sender that never blocks: what the ring cannot take waits in a local queue.
#[derive(Debug)]
struct Staged<T> {
    chan: Sender<Stamped<T>>,
    staged: VecDeque<Stamped<T>>,
    sent: u64,
    disconnected: bool,
}

impl<T> Staged<T> {
    fn new(chan: Sender<Stamped<T>>) -> Self {
        Staged {
            chan,
            staged: VecDeque::new(),
            sent: 0,
            disconnected: false,
        }
    }

    fn push(&mut self, item: Stamped<T>) {
        if self.staged.is_empty() {
            match self.chan.try_send(item) {
                Ok(()) => self.sent += 1,
                Err(TrySendError::Full(item)) => self.staged.push_back(item),
                Err(TrySendError::Disconnected(_)) => self.disconnected = true,
            }
        } else {
            self.staged.push_back(item);
        }
    }

    fn flush(&mut self) -> bool {
        let mut moved = false;
        while let Some(item) = self.staged.pop_front() {
            match self.chan.try_send(item) {
                Ok(()) => {
                    self.sent += 1;
                    moved = true;
                }
                Err(TrySendError::Full(item)) => {
                    self.staged.push_front(item);
                    break;
                }
                Err(TrySendError::Disconnected(_)) => {
                    self.disconnected = true;
                    self.staged.clear();
                    break;
                }
            }
        }
        moved
    }
}

/// The host driver's end of the bus.
#[derive(Debug)]
pub struct HostEnd {
    tx: Staged<Command>,
    rx: Delayed<Event>,
}

impl HostEnd {
    /// Queue a command (never blocks); it leaves when the NIC takes it.
    pub fn send(&mut self, cmd: Command) {
        self.tx.push((None, cmd));
    }
    /// Queue a command that leaves the host at `at` (the cost model: when the work that
    /// produced it is done); it reaches the NIC a bus latency later.
    pub fn send_at(&mut self, cmd: Command, at: Instant) {
        self.tx.push((Some(at), cmd));
    }
    /// Move staged commands into the ring; true if any moved.
    pub fn flush(&mut self) -> bool {
        self.tx.flush()
    }
    /// Commands waiting for ring space.
    pub fn staged(&self) -> usize {
        self.tx.staged.len()
    }
    /// Commands that entered the ring so far.
    pub fn commands_sent(&self) -> u64 {
        self.tx.sent
    }
    /// Next event due at `now`, if any. `Err(())` once the NIC end is gone.
    #[allow(clippy::result_unit_err)]
    pub fn try_recv(&mut self, now: Instant) -> Result<Option<Event>, ()> {
        self.rx.recv(now)
    }
    /// When the next event held by the latency model is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.rx.next_due()
    }
    /// Take arrived events off the ring at `now` without delivering any (a busy host does
    /// this, so that bus latency runs from arrival, not from when the host is free).
    pub fn pump(&mut self, now: Instant) {
        self.rx.pump(now);
    }
    /// The raw event receiver, for runtimes that wait on it (e.g. with `crossbeam::Select`).
    pub fn event_receiver(&self) -> &Receiver<Stamped<Event>> {
        &self.rx.chan
    }
}

/// The NIC's end of the bus.
#[derive(Debug)]
pub struct NicEnd {
    tx: Staged<Event>,
    rx: Delayed<Command>,
}

impl NicEnd {
    /// Queue an event (never blocks); it leaves when the host takes it.
    pub fn send(&mut self, evt: Event) {
        self.tx.push((None, evt));
    }
    /// Queue an event that leaves the NIC at `at` (the cost model: when the work that
    /// produced it, its DMA included, is done); it reaches the host a bus latency later.
    pub fn send_at(&mut self, evt: Event, at: Instant) {
        self.tx.push((Some(at), evt));
    }
    /// Move staged events into the ring; true if any moved.
    pub fn flush(&mut self) -> bool {
        self.tx.flush()
    }
    /// Events waiting for ring space.
    pub fn staged(&self) -> usize {
        self.tx.staged.len()
    }
    /// Events that entered the ring so far.
    pub fn events_sent(&self) -> u64 {
        self.tx.sent
    }
    /// Next command due at `now`, if any.
    pub fn try_recv(&mut self, now: Instant) -> Option<Command> {
        self.rx.recv(now).ok().flatten()
    }
    /// When the next command held by the latency model is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.rx.next_due()
    }
    /// Take arrived commands off the ring at `now` without delivering any (a busy NIC does
    /// this, so that bus latency runs from arrival, not from when the NIC is free).
    pub fn pump(&mut self, now: Instant) {
        self.rx.pump(now);
    }
    /// The raw command receiver, for runtimes that wait on it.
    pub fn command_receiver(&self) -> &Receiver<Stamped<Command>> {
        &self.rx.chan
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_ring_stages_instead_of_blocking() {
        let (mut host, mut nic) = bus(2);
        let t = Instant::from_micros(0);
        for port in 0..5 {
            host.send(Command::Unlisten { port });
        }
        assert_eq!(host.staged(), 3);
        let mut got = vec![];
        while host.staged() > 0 || !got.is_empty() && got.len() < 5 {
            while let Some(Command::Unlisten { port }) = nic.try_recv(t) {
                got.push(port);
            }
            host.flush();
            if got.len() == 5 {
                break;
            }
        }
        while let Some(Command::Unlisten { port }) = nic.try_recv(t) {
            got.push(port);
        }
        assert_eq!(got, vec![0, 1, 2, 3, 4], "order preserved across staging");
        assert_eq!(host.commands_sent(), 5);
    }

    #[test]
    fn latency_model_delays_in_order() {
        let (mut host, mut nic) = bus_with_latency(8, Duration::from_micros(5));
        let t0 = Instant::from_micros(100);
        host.send(Command::Unlisten { port: 1 });
        assert!(nic.try_recv(t0).is_none(), "taken from the ring, held 5 us");
        assert_eq!(nic.next_due(), Some(Instant::from_micros(105)));
        host.send(Command::Unlisten { port: 2 });
        let t1 = Instant::from_micros(103);
        assert!(nic.try_recv(t1).is_none());
        let t2 = Instant::from_micros(105);
        assert!(matches!(
            nic.try_recv(t2),
            Some(Command::Unlisten { port: 1 })
        ));
        assert!(nic.try_recv(t2).is_none(), "the second is due at 108");
        let t3 = Instant::from_micros(108);
        assert!(matches!(
            nic.try_recv(t3),
            Some(Command::Unlisten { port: 2 })
        ));
        assert_eq!(nic.next_due(), None);
    }

    #[test]
    fn a_stamped_message_crosses_after_it_leaves() {
        // Latency 3 µs: a command that leaves at 110 µs (its sender was busy) and is taken
        // at 100 µs is due at 113 µs; one sent without a stamp and taken at 100 µs follows
        // it in order (FIFO), due at 103 µs but delivered after the first.
        let (mut host, mut nic) = bus_with_latency(8, Duration::from_micros(3));
        host.send_at(Command::Unlisten { port: 1 }, Instant::from_micros(110));
        host.send(Command::Unlisten { port: 2 });
        nic.pump(Instant::from_micros(100));
        assert_eq!(nic.next_due(), Some(Instant::from_micros(113)));
        assert!(nic.try_recv(Instant::from_micros(112)).is_none());
        assert!(matches!(
            nic.try_recv(Instant::from_micros(113)),
            Some(Command::Unlisten { port: 1 })
        ));
        assert!(matches!(
            nic.try_recv(Instant::from_micros(113)),
            Some(Command::Unlisten { port: 2 })
        ));
        // Without latency a future stamp is still held until it leaves.
        let (mut host, mut nic) = bus(8);
        host.send_at(Command::Unlisten { port: 3 }, Instant::from_micros(50));
        assert!(nic.try_recv(Instant::from_micros(49)).is_none());
        assert_eq!(nic.next_due(), Some(Instant::from_micros(50)));
        assert!(matches!(
            nic.try_recv(Instant::from_micros(50)),
            Some(Command::Unlisten { port: 3 })
        ));
    }

    #[test]
    fn policy_names_round_trip() {
        for p in RxPolicy::ALL {
            assert_eq!(p.name().parse::<RxPolicy>().unwrap(), p);
        }
        assert!("fast".parse::<RxPolicy>().unwrap_err().contains("fast"));
    }
}
