//! The message transport's shells: the pure pipe and sessions of [`toe_msg`] over byte
//! streams, each connection TLS 1.3 unless plaintext is asked for.
//!
//! - On std TCP (`toemu msg serve --listen`, `toemu msg send`): non-blocking sockets (mio),
//!   one thread, so two real machines can run it across a real network.
//! - On the emulated TOE ([`crate::msg_toe`]): the same links and the same server and
//!   sender logic as example apps over the host driver (in-memory wire on the virtual
//!   clock, or TAP in real time).
//!
//! Each connection opens with the pipe hello ([`toe_msg::hello`]) after its handshake; the
//! server keeps one pipe per pipe ID. The server writes each session's messages to
//! `DIR/PIPE-SESSION/NNNNNN` (or only hashes them) and reports per session: messages,
//! bytes and the SHA-256 of their concatenation.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use sha2::{Digest, Sha256};
use toe_msg::{
    hello, parse_hello, BulkConfig, BulkStats, Event, Frame, Identity, Pacer, Pacing, PacingConfig,
    Pipe, PipeConfig, PipeEvent, Planner, RefuseReason, Slo, Tls, HELLO_LEN,
};
use toemu_apps::datagen::DataGen;

/// How connections are protected.
#[derive(Debug)]
pub enum Security {
    /// Plaintext (only when asked for; said so in the output).
    Plain,
    /// TLS 1.3 with this identity (mutual certificates).
    Tls(Identity),
}

impl Security {
    /// Plaintext or TLS, for the output.
    pub fn describe(&self) -> String {
        match self {
            Security::Plain => "PLAINTEXT (no TLS: anyone on the path reads and changes it)".into(),
            Security::Tls(id) => format!("TLS 1.3, mutual certificates, this side {}", id.name),
        }
    }

    /// The TLS end of an accepted connection (`None` for plaintext); `unix_s` is the
    /// time certificates are checked against.
    pub(crate) fn server(&self, unix_s: u64) -> io::Result<Option<Tls>> {
        match self {
            Security::Tls(id) => Tls::server(id, unix_s)
                .map(Some)
                .map_err(|e| io::Error::other(e.to_string())),
            Security::Plain => Ok(None),
        }
    }

    /// The TLS end of an opened connection to a server named `principal`.
    pub(crate) fn client(&self, principal: &str, unix_s: u64) -> io::Result<Option<Tls>> {
        match self {
            Security::Tls(id) => Tls::client(id, principal, unix_s)
                .map(Some)
                .map_err(|e| io::Error::other(e.to_string())),
            Security::Plain => Ok(None),
        }
    }

    /// The principal a server accepts sessions for (its certificate's name); `None`:
    /// plaintext accepts any.
    fn principal(&self) -> Option<String> {
        match self {
            Security::Tls(id) => Some(id.name.clone()),
            Security::Plain => None,
        }
    }
}

/// Seconds since 1970 on the real clock (certificates are checked against it).
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A byte stream under a [`Link`]; `C` is what it needs to move bytes (nothing for a std
/// socket, the host driver for an emulated TOE connection).
pub(crate) trait Sock<C: ?Sized> {
    /// The shell tells a pass which links have news ([`Link::wake`]: data in, sends
    /// acknowledged, connected, closed), so a pass reads only those and a pipe of many
    /// idle connections costs little per pass. Without news (`false`), every pass reads
    /// every link.
    const NEWS: bool = false;
    /// Append the bytes that have arrived to `raw`; `Ok(false)` once the peer ended its
    /// stream.
    fn recv(&mut self, cx: &mut C, raw: &mut Vec<u8>) -> io::Result<bool>;
    /// Write from the front of `data`: the bytes taken (0: no room now).
    fn send(&mut self, cx: &mut C, data: &[u8]) -> io::Result<usize>;
    /// Whether the stream takes more bytes now (connected, room in its send queue).
    fn can_take(&self, _cx: &C) -> bool {
        true
    }
    /// Bytes written that the peer's TCP has not acknowledged yet (`None`: the stream
    /// cannot tell; a std socket's kernel buffer hides it).
    fn unacked(&self, _cx: &C) -> Option<usize> {
        None
    }
}

impl Sock<()> for TcpStream {
    fn recv(&mut self, _: &mut (), raw: &mut Vec<u8>) -> io::Result<bool> {
        let mut buf = [0u8; 64 << 10];
        loop {
            match self.read(&mut buf) {
                Ok(0) => return Ok(false),
                Ok(n) => raw.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn send(&mut self, _: &mut (), data: &[u8]) -> io::Result<usize> {
        loop {
            match self.write(data) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// Plaintext a link holds before it stops asking the pipe for frames, bytes.
const LINK_ROOM: usize = 256 << 10;

/// One connection of a pipe. `repr(C)` with the fields a [`pass`] looks at first: a pass
/// that visits every link (std sockets, a planner, links that came or went) touches one
/// cache line of each (the socket and TLS state make a link over a kilobyte).
#[repr(C)]
pub(crate) struct Link<S> {
    pub(crate) dead: bool,
    /// The socket has news for the next [`pass`] (set by the shell when its sockets
    /// give news, [`Sock::NEWS`]; a new link starts with it).
    wake: bool,
    /// The socket took no more bytes ([`Sock::can_take`] was false): passes leave it
    /// alone until it has news. Only with [`Sock::NEWS`].
    blocked: bool,
    /// (pipe ID, connection number in it) once it joined.
    joined: Option<(u64, usize)>,
    /// Bytes to write to the socket.
    out: Vec<u8>,
    /// Plaintext the TLS layer did not take yet.
    pending: Vec<u8>,
    /// Data frames this link carries that TCP has not acknowledged yet, kept to resend
    /// elsewhere should they wait too long: (the stream offset their last byte ends at,
    /// when they were queued (µs), their plaintext). Bounded by the socket's
    /// unacknowledged bytes.
    held: std::collections::VecDeque<(u64, u64, Vec<u8>)>,
    /// (the most TCP acknowledged, when that last grew (µs)): whether the connection is
    /// moving, for [`Link::resend_stalled`].
    progress: (u64, u64),
    /// Bytes written to the socket, in all.
    written: u64,
    /// Of those, what TCP acknowledged by the last look (packet pacing counts it).
    acked_seen: u64,
    pub(crate) sock: S,
    /// Who is at the other end, for logs.
    label: String,
    tls: Option<Tls>,
    /// Plaintext received before the hello was complete.
    hello: Vec<u8>,
    /// The opener's end: the pipe it joins once its handshake is over (an acceptor's
    /// learns its pipe from the hello).
    join_to: Option<u64>,
    /// Why it died, if it failed.
    pub(crate) error: Option<String>,
}

impl<S> Link<S> {
    /// An acceptor's link.
    pub(crate) fn accepted(sock: S, label: String, tls: Option<Tls>) -> Link<S> {
        Link {
            sock,
            label,
            tls,
            out: Vec::new(),
            hello: Vec::new(),
            joined: None,
            join_to: None,
            pending: Vec::new(),
            dead: false,
            error: None,
            written: 0,
            acked_seen: 0,
            held: std::collections::VecDeque::new(),
            progress: (0, 0),
            wake: true,
            blocked: false,
        }
    }

    /// An opener's link to pipe `pipe`: its hello is queued (it goes out after the
    /// handshake).
    pub(crate) fn opened(sock: S, label: String, tls: Option<Tls>, pipe: u64) -> Link<S> {
        let mut l = Link::accepted(sock, label, tls);
        l.join_to = Some(pipe);
        l.queue(&hello(pipe));
        l
    }

    fn secured(&self) -> bool {
        self.tls.as_ref().is_none_or(|t| !t.is_handshaking())
    }

    /// Read what the socket has: the plaintext.
    fn read<C: ?Sized>(&mut self, cx: &mut C) -> io::Result<Vec<u8>>
    where
        S: Sock<C>,
    {
        let mut raw = Vec::new();
        if !self.sock.recv(cx, &mut raw)? {
            self.dead = true;
        }
        let Some(t) = &mut self.tls else {
            return Ok(raw);
        };
        let mut plain = Vec::new();
        for c in raw.chunks(64 << 10) {
            t.receive(c, &mut plain)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        }
        Ok(plain)
    }

    /// Queue plaintext (through TLS, if any).
    fn queue(&mut self, plain: &[u8]) {
        match &mut self.tls {
            Some(t) => {
                self.pending.extend_from_slice(plain);
                let n = t.send(&self.pending);
                self.pending.drain(..n);
                t.transmit(&mut self.out);
            }
            None => self.out.extend_from_slice(plain),
        }
    }

    /// Queue plaintext and write what the socket takes.
    fn write<C: ?Sized>(&mut self, cx: &mut C, plain: &[u8]) -> io::Result<()>
    where
        S: Sock<C>,
    {
        self.queue(plain);
        while !self.out.is_empty() {
            if !self.sock.can_take(cx) {
                self.blocked = S::NEWS;
                break;
            }
            let n = self.sock.send(cx, &self.out)?;
            if n == 0 {
                // Full for now: an acknowledgement of what it holds is news that frees
                // room (with nothing unacknowledged there may be none: it is tried again).
                self.blocked = S::NEWS && self.sock.unacked(cx).is_some_and(|u| u > 0);
                break;
            }
            self.written += n as u64;
            self.out.drain(..n);
        }
        Ok(())
    }

    /// Room for more frames: little waits to be written.
    fn has_room(&self) -> bool {
        self.out.len() + self.pending.len() < LINK_ROOM
    }

    /// Forget the held frames TCP acknowledged by `acked`, and hand `pipe` again those
    /// that waited `stall_us` before `now_us` while TCP acknowledged nothing on their
    /// connection (it is stalled: a loss it recovers from by timeout, say). A frame that
    /// waits behind others on a connection that keeps delivering stays: sending it again
    /// would only take the link from new data.
    fn resend_stalled(&mut self, acked: u64, now_us: u64, stall_us: u64, pipe: &mut Pipe) {
        if acked > self.progress.0 {
            self.progress = (acked, now_us);
        }
        let moved_us = self.progress.1;
        while let Some(&(end, at, _)) = self.held.front() {
            if end <= acked {
                self.held.pop_front();
            } else if at.max(moved_us) + stall_us <= now_us {
                let (_, _, f) = self.held.pop_front().expect("a front");
                pipe.resend(f);
            } else {
                break;
            }
        }
    }

    /// The stream offset the bytes queued so far end at (TLS records included).
    fn queued_end(&self) -> u64 {
        self.written + (self.out.len() + self.pending.len()) as u64
    }

    /// Stream bytes the peer's TCP acknowledged, as far as the socket tells (else all
    /// that were written).
    fn acked<C: ?Sized>(&self, cx: &C) -> u64
    where
        S: Sock<C>,
    {
        let unacked = self.sock.unacked(cx).unwrap_or(0) as u64;
        self.written.saturating_sub(unacked)
    }
}

/// How a sender hands frames to its connections: paced from the delivery-rate estimate,
/// and planned as primed sub-transfers (seed 003 #1, [`toe_msg::bulk`]); either may be
/// off.
#[derive(Debug, Default)]
pub(crate) struct Flow {
    pub(crate) pacing: Option<Pacing>,
    pub(crate) planner: Option<Planner>,
    /// The pacing rate spaces packets (the shell hands it to the NIC's egress shaper), not
    /// what goes to the connections: [`pass`] then fills them as fast as they take it.
    pub(crate) packets: bool,
    /// The round trip packet pacing's samples and rounds span, µs (the shortest time
    /// from opening a connection to its being connected); `None`: not known yet.
    pub(crate) round_us: Option<u64>,
}

/// With a planner, data frames waiting on a connection that TCP acknowledged nothing on
/// for this many of the shortest round trips (at least [`MIN_STALL_US`], and never before
/// the frames themselves waited that long) go out again on the others: their messages do
/// not wait for that connection's recovery.
const STALL_RTTS: u64 = 4;

/// The shortest stall, µs (about smoltcp's shortest retransmission timeout).
const MIN_STALL_US: u64 = 200_000;

/// Whether data flows: always without a planner, after priming with one.
fn data_flows(planner: Option<&Planner>) -> bool {
    planner.is_none_or(|b| b.stats().data_from_us.is_some())
}

/// Packet pacing before a handshake measured the round trip: the estimate's samples and
/// the gain cycle's rounds span this, µs.
const DEFAULT_ROUND_US: u64 = 100_000;

/// Priming's acknowledgement train is sampled over this fraction of a round trip.
const TRAIN_SPANS: u64 = 8;

impl Flow {
    /// The rate the NIC's egress shaper should pace at now, payload bytes per second:
    /// with packet pacing, once data flows (priming runs unpaced: it is what grows the
    /// windows); `None` otherwise.
    pub(crate) fn packet_rate(&self) -> Option<f64> {
        let p = self.pacing.as_ref().filter(|_| self.packets)?;
        data_flows(self.planner.as_ref()).then(|| p.rate())
    }

    /// When the pacer or the planner is due next, µs (`paced_until` from the last
    /// pass).
    pub(crate) fn next_deadline(&self, paced_until: Option<u64>) -> Option<u64> {
        [
            paced_until,
            self.planner.as_ref().and_then(Planner::next_deadline),
        ]
        .into_iter()
        .flatten()
        .min()
    }
}

/// The pipes of one end, by pipe ID, and the limits a new one gets.
pub(crate) struct Pipes {
    pub(crate) cfg: PipeConfig,
    /// A B-tree: lookups per link cost a compare or two (a pipe or a few), and
    /// iteration goes in ID order (replays are deterministic).
    pub(crate) map: BTreeMap<u64, Pipe>,
    /// The link the next [`pass`] serves first: passes take turns, so a pacer's
    /// allowance is not always spent by the same connections.
    pub(crate) first: usize,
    /// Which links the next pass visits, with sockets that give news ([`Sock::NEWS`]).
    pub(crate) visit: Visit,
}

/// The links a [`pass`] visits when the shell's sockets give news: those with news,
/// those with bytes waiting for their socket, and (while a pipe has frames to give) those
/// with room. A pass costs what moves, not the number of links. Indices into the
/// shell's links; a shell that removes or reorders links sets `all`.
#[derive(Debug, Default)]
pub(crate) struct Visit {
    /// The next pass visits every link (and sorts them into the sets again).
    pub(crate) all: bool,
    /// Links with news since the last pass (each also has [`Link::wake`]).
    woke: Vec<usize>,
    /// Links with bytes for a socket that was not known to be full.
    flushing: BTreeSet<usize>,
    /// Links with room for frames whose socket was not known to be full.
    ready: BTreeSet<usize>,
}

impl Visit {
    /// Link `i` has news.
    pub(crate) fn wake<S>(&mut self, links: &mut [Link<S>], i: usize) {
        if let Some(l) = links.get_mut(i) {
            l.wake = true;
            self.woke.push(i);
        }
    }

    /// Sort link `i` into the sets after a visit.
    fn sort<S>(&mut self, i: usize, l: &Link<S>) {
        let waiting = !l.out.is_empty() || !l.pending.is_empty();
        let open = !l.dead && !l.blocked;
        if open && waiting {
            self.flushing.insert(i);
        } else {
            self.flushing.remove(&i);
        }
        if open && !waiting && l.joined.is_some() {
            self.ready.insert(i);
        } else {
            self.ready.remove(&i);
        }
    }
}

impl Pipes {
    /// The earliest session timer of any pipe, µs.
    pub(crate) fn next_deadline(&self) -> Option<u64> {
        self.map.values().filter_map(Pipe::next_deadline).min()
    }
}

/// What one [`pass`] did.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Passed {
    /// Anything moved.
    pub(crate) moved: bool,
    /// A connection with room waited for the pacer: when it lets bytes go again, µs.
    pub(crate) paced_until: Option<u64>,
    /// A link died in this pass (the shell retires it).
    pub(crate) dropped: bool,
}

/// One pass over `links`: bytes in go to their pipes, frames out go to the connections
/// with room, as much as `pacing` (if any) lets go now. Log lines go to `log`. With
/// sockets that give news ([`Sock::NEWS`]) it visits only the links of
/// [`Pipes::visit`]; otherwise every link.
pub(crate) fn pass<C: ?Sized, S: Sock<C>>(
    links: &mut [Link<S>],
    cx: &mut C,
    pipes: &mut Pipes,
    now_us: u64,
    flow: Option<&mut Flow>,
    log: &mut impl FnMut(String),
) -> Passed {
    let n = links.len();
    let first = pipes.first % n.max(1);
    pipes.first = first + 1;
    let (packets, round_us, mut pacing, mut planner) = match flow {
        Some(f) => (f.packets, f.round_us, f.pacing.as_mut(), f.planner.as_mut()),
        None => (false, None, None, None),
    };
    if let Some(p) = planner.as_deref_mut() {
        let before_data = p.stats().subtransfers == 0;
        if p.poll(now_us) && before_data {
            // Priming measured the connections: pacing starts from their rate.
            if let Some(pc) = pacing.as_deref_mut() {
                pc.seed(now_us, p.expected_rate());
                if packets {
                    pc.start_from_priming(now_us);
                }
            }
        }
    }
    // Packet pacing spaces what the connections send; what they take is not paced, and
    // what TCP acknowledged is counted for its estimate.
    let (pacing, packet_pacing) = if packets {
        (None, pacing)
    } else {
        (pacing, None)
    };
    let visit = &mut pipes.visit;
    // A planner hears from every connection on every pass (few connections).
    let all = !S::NEWS || planner.is_some() || std::mem::take(&mut visit.all);
    let mut turn = Turn {
        cfg: pipes.cfg,
        pipes: &mut pipes.map,
        now_us,
        pacing,
        planner,
        moved: false,
        paced_until: None,
        count_acked: packet_pacing.is_some(),
        acked: 0,
        log,
    };
    // In turn from `first`.
    let rank = |i: usize| (i + n - first) % n.max(1);
    let mut visited: Vec<usize> = if all {
        visit.woke.clear();
        visit.flushing.clear();
        visit.ready.clear();
        (first..n).chain(0..first).collect()
    } else {
        let mut v: Vec<usize> = visit
            .woke
            .drain(..)
            .chain(visit.flushing.iter().copied())
            .filter(|&i| i < n)
            .collect();
        v.sort_unstable_by_key(|&i| rank(i));
        v.dedup();
        v
    };
    for &i in &visited {
        let l = &mut links[i];
        let woke = std::mem::take(&mut l.wake) || !S::NEWS;
        turn.serve(l, woke, cx);
        if S::NEWS {
            visit.sort(i, l);
        }
    }
    if !all {
        // The links with room, in turn, while a pipe has frames for them.
        let news_visited = visited.len();
        let mut at = first;
        let mut lap = 0;
        while turn.pacing.is_some() || turn.pipes.values().any(Pipe::has_frames) {
            let end = if lap == 0 { n } else { first };
            let Some(i) = visit.ready.range(at..end).next().copied() else {
                if lap == 1 {
                    break;
                }
                (lap, at) = (1, 0);
                continue;
            };
            at = i + 1;
            if visited[..news_visited]
                .binary_search_by_key(&rank(i), |&j| rank(j))
                .is_ok()
            {
                continue;
            }
            let l = &mut links[i];
            turn.serve(l, false, cx);
            visit.sort(i, l);
            visited.push(i);
        }
    }
    let Turn {
        pipes,
        mut planner,
        moved,
        paced_until,
        acked,
        ..
    } = turn;
    if let Some(p) = packet_pacing {
        // Once data flows (priming is not paced); before, priming's train.
        let round = round_us.unwrap_or(DEFAULT_ROUND_US);
        if data_flows(planner.as_deref()) {
            p.on_delivered(now_us, acked, round);
        } else {
            p.on_priming(now_us, acked, round / TRAIN_SPANS);
        }
    }
    let mut dropped = false;
    for &i in &visited {
        let l = &mut links[i];
        if !l.dead {
            continue;
        }
        dropped = true;
        if let Some((id, c)) = l.joined.take() {
            if let Some(p) = pipes.get_mut(&id) {
                p.conn_down(c);
                // What it did not deliver goes out on the others.
                for (_, _, f) in l.held.drain(..) {
                    p.resend(f);
                }
            }
            if let Some(b) = planner.as_deref_mut() {
                b.conn_down(c);
            }
        }
    }
    for p in pipes.values_mut() {
        p.on_time(now_us);
    }
    Passed {
        moved,
        paced_until,
        dropped,
    }
}

/// What a [`pass`] works with while it serves one link after another.
struct Turn<'a, L> {
    cfg: PipeConfig,
    pipes: &'a mut BTreeMap<u64, Pipe>,
    now_us: u64,
    pacing: Option<&'a mut Pacing>,
    planner: Option<&'a mut Planner>,
    moved: bool,
    paced_until: Option<u64>,
    /// Count what TCP acknowledged on the links served, into `acked` (bytes).
    count_acked: bool,
    acked: u64,
    log: &'a mut L,
}

impl<L: FnMut(String)> Turn<'_, L> {
    /// Serve one link: read it if `woke` (its socket has news), hand its pipe what it
    /// read, give it frames if it has room, and write.
    fn serve<C: ?Sized, S: Sock<C>>(&mut self, l: &mut Link<S>, woke: bool, cx: &mut C) {
        if l.dead {
            return;
        }
        if woke {
            l.blocked = false;
            let plain = match l.read(cx) {
                Ok(p) => p,
                Err(e) => {
                    (self.log)(format!("toemu msg: connection {} dropped: {e}", l.label));
                    l.dead = true;
                    l.error = Some(e.to_string());
                    return;
                }
            };
            self.moved |= !plain.is_empty();
            let mut plain = &plain[..];
            if let (None, Some(id), true) = (l.joined, l.join_to, l.secured()) {
                // Authenticated: it joins the pipe.
                let p = self.pipes.entry(id).or_insert_with(|| Pipe::new(self.cfg));
                let c = p.add_conn();
                l.joined = Some((id, c));
                if let Some(b) = self.planner.as_deref_mut() {
                    b.add_conn(c, l.acked(cx), self.now_us);
                }
            }
            if l.joined.is_none() && l.secured() {
                let take = (HELLO_LEN - l.hello.len()).min(plain.len());
                l.hello.extend_from_slice(&plain[..take]);
                plain = &plain[take..];
                if let Ok(h) = <[u8; HELLO_LEN]>::try_from(&l.hello[..]) {
                    match parse_hello(&h) {
                        Some(id) => {
                            let p = self.pipes.entry(id).or_insert_with(|| Pipe::new(self.cfg));
                            l.joined = Some((id, p.add_conn()));
                        }
                        None => {
                            (self.log)(format!(
                                "toemu msg: {} opened without the pipe hello, dropped",
                                l.label
                            ));
                            l.dead = true;
                            return;
                        }
                    }
                }
            }
            if let Some((id, c)) = l.joined {
                if let Some(p) = self.pipes.get_mut(&id) {
                    p.on_bytes(c, plain, self.now_us);
                }
            }
        }
        let mut frames = Vec::new();
        // What TCP acknowledged, asked once (a driver call) for pacing and planner.
        let acked = (self.count_acked || self.planner.is_some()).then(|| l.acked(cx));
        if let (true, Some(a)) = (self.count_acked, acked) {
            self.acked += a.saturating_sub(l.acked_seen);
            l.acked_seen = l.acked_seen.max(a);
        }
        if let (Some((id, c)), Some(b), Some(acked)) =
            (l.joined, self.planner.as_deref_mut(), acked)
        {
            b.on_progress(c, l.written, acked, self.now_us);
            let stall_us = b
                .min_rtt_us()
                .map_or(MIN_STALL_US, |r| (STALL_RTTS * r).max(MIN_STALL_US));
            if let Some(p) = self.pipes.get_mut(&id) {
                l.resend_stalled(acked, self.now_us, stall_us, p);
            }
        }
        let mut held = Vec::new();
        let priming = match (l.joined, self.planner.as_deref()) {
            (Some((_, c)), Some(b)) => b.prime(c),
            _ => 0,
        };
        // Whether the socket is worth asking (a driver call): there is something to give
        // it, or a pacer to tell when there will be.
        if let (Some((id, c)), true, false) = (l.joined, l.has_room(), l.blocked) {
            let wants = priming > 0
                || self.pacing.is_some()
                || self.pipes.get(&id).is_some_and(Pipe::has_frames);
            if !wants {
                // Nothing to give it now.
            } else if !l.sock.can_take(cx) {
                // Its news (connected, sends acknowledged) unblocks it.
                l.blocked = S::NEWS;
            } else {
                let quota = match self.planner.as_deref() {
                    Some(b) => b.quota(c),
                    None => usize::MAX,
                };
                let now_us = self.now_us;
                let room = self
                    .pacing
                    .as_deref_mut()
                    .map_or(FILL_BYTES, |p| p.allowance(now_us).min(FILL_BYTES))
                    .min(quota);
                match self.pipes.get_mut(&id) {
                    // Priming goes first, unpaced: it is what grows the window.
                    Some(p) if priming > 0 => {
                        let n = priming.min(FILL_BYTES);
                        let max = p.max_frame_body().max(1);
                        let mut left = n;
                        while left > 0 {
                            let len = left.min(max);
                            Frame::Prime { len: len as u32 }.encode(&mut frames);
                            left -= len;
                        }
                        if let Some(b) = self.planner.as_deref_mut() {
                            b.primed(c, n);
                        }
                    }
                    // A reserve, or a connection done with its share: it takes nothing.
                    Some(_) if quota == 0 => {}
                    Some(p) if room > 0 => {
                        let n = p.fill(c, &mut frames, room, self.now_us);
                        if let Some(p) = self.pacing.as_deref_mut() {
                            p.consume(n);
                        }
                        if let Some(b) = self.planner.as_deref_mut() {
                            b.took(c, n);
                            for r in p.data_spans() {
                                held.extend_from_slice(&frames[r.clone()]);
                            }
                        }
                    }
                    Some(_) => {
                        let at = self
                            .pacing
                            .as_deref()
                            .map_or(self.now_us, |p| p.ready_at(self.now_us, 1));
                        self.paced_until = Some(self.paced_until.map_or(at, |t: u64| t.min(at)));
                    }
                    None => {}
                }
            }
        }
        self.moved |= !frames.is_empty();
        // A link with bytes waiting for its socket, or new frames, writes; one whose
        // socket took nothing waits for its news.
        let to_write = woke || !frames.is_empty() || !l.out.is_empty() || !l.pending.is_empty();
        if to_write && !l.blocked {
            if let Err(e) = l.write(cx, &frames) {
                (self.log)(format!("toemu msg: write to {} failed: {e}", l.label));
                l.dead = true;
                l.error = Some(e.to_string());
            }
        }
        if !held.is_empty() {
            let end = l.queued_end();
            l.held.push_back((end, self.now_us, held));
        }
    }
}

/// Bytes of frames a connection takes per pass, at most.
const FILL_BYTES: usize = 64 << 10;

/// What the server received in one session.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SessionResult {
    /// The pipe.
    pub pipe: u64,
    /// The session.
    pub session: u32,
    /// Messages taken.
    pub messages: u64,
    /// Their bytes.
    pub bytes: u64,
    /// SHA-256 of their concatenation, hex.
    pub sha256: String,
}

/// A session being received.
#[derive(Debug, Default, Clone)]
struct Received {
    messages: u64,
    bytes: u64,
    sha: Sha256,
}

/// The storage server's logic, whatever carries its connections: it accepts sessions for
/// its principal, takes their messages in order (to a directory, or only hashed), and
/// reports each session when it closes.
pub(crate) struct Server {
    /// The principal sessions must ask for (`None`: any).
    name: Option<String>,
    dir: Option<PathBuf>,
    pub(crate) pipes: Pipes,
    got: HashMap<(u64, u32), Received>,
    /// Sessions closed, in order.
    pub(crate) results: Vec<SessionResult>,
    /// Messages waiting for the application, in arrival order: (pipe, session).
    waiting: std::collections::VecDeque<(u64, u32)>,
    /// Sessions that closed, reported once the application took all their messages.
    closed: Vec<(u64, u32)>,
    /// A slow application: it takes messages at this rate (`None`: at once).
    app_rate: Option<Pacer>,
}

impl Server {
    pub(crate) fn new(security: &Security, dir: Option<PathBuf>, cfg: PipeConfig) -> Server {
        Server {
            name: security.principal(),
            dir,
            pipes: Pipes {
                cfg,
                map: BTreeMap::new(),
                first: 0,
                visit: Visit::default(),
            },
            got: HashMap::new(),
            results: Vec::new(),
            waiting: std::collections::VecDeque::new(),
            closed: Vec::new(),
            app_rate: None,
        }
    }

    /// A slow application: it takes messages at `bytes_per_s` (a message's bytes wait in
    /// the input queue until the rate lets it through), for tests and demos of the
    /// latency diagnosis.
    pub(crate) fn with_app_rate(mut self, bytes_per_s: f64) -> Server {
        self.app_rate = Some(Pacer::new(bytes_per_s, 64 << 10));
        self
    }

    /// When a slow application takes its next message, µs (`None`: nothing waits).
    pub(crate) fn app_ready_at(&self, now_us: u64) -> Option<u64> {
        let p = self.app_rate.as_ref()?;
        (!self.waiting.is_empty()).then(|| p.ready_at(now_us, 1).max(now_us + 1))
    }

    /// The application takes the messages waiting (as many as its rate lets).
    fn take(&mut self, now_us: u64) -> io::Result<()> {
        while let Some(&(pid, id)) = self.waiting.front() {
            if let Some(p) = &mut self.app_rate {
                if p.allowance(now_us) == 0 {
                    break;
                }
            }
            self.waiting.pop_front();
            let Some((_, data)) = self
                .pipes
                .map
                .get_mut(&pid)
                .and_then(|p| p.session(id))
                .and_then(|s| s.recv(now_us))
            else {
                continue;
            };
            if let Some(p) = &mut self.app_rate {
                p.consume(data.len());
            }
            let r = self.got.entry((pid, id)).or_default();
            r.messages += 1;
            r.bytes += data.len() as u64;
            r.sha.update(&data);
            if let Some(d) = &self.dir {
                let d = d.join(format!("{pid:016x}-{id}"));
                std::fs::create_dir_all(&d)?;
                std::fs::write(d.join(format!("{:06}", r.messages)), &data)?;
            }
        }
        Ok(())
    }

    /// Answer the pipes' events at `now_us`: accept or refuse sessions, take messages,
    /// report closed sessions to `log`.
    pub(crate) fn handle(&mut self, now_us: u64, log: &mut impl FnMut(String)) -> io::Result<()> {
        self.events(log)?;
        self.take(now_us)?;
        self.report_closed(log);
        Ok(())
    }

    /// Report the closed sessions whose messages the application has all taken.
    fn report_closed(&mut self, log: &mut impl FnMut(String)) {
        let waiting = &self.waiting;
        let (done, open): (Vec<_>, Vec<_>) =
            self.closed.drain(..).partition(|k| !waiting.contains(k));
        self.closed = open;
        for (pid, id) in done {
            let r = self.got.remove(&(pid, id)).unwrap_or_default();
            let res = SessionResult {
                pipe: pid,
                session: id,
                messages: r.messages,
                bytes: r.bytes,
                sha256: hex(&r.sha.finalize()),
            };
            log(format!(
                "toemu msg serve: session {pid:016x}/{id} closed: {} messages, {} bytes, sha256 {}",
                res.messages, res.bytes, res.sha256
            ));
            self.results.push(res);
        }
    }

    fn events(&mut self, log: &mut impl FnMut(String)) -> io::Result<()> {
        for (&pid, p) in self.pipes.map.iter_mut() {
            while let Some(e) = p.poll_event() {
                match e {
                    PipeEvent::Session {
                        id,
                        event: Event::Incoming { principal },
                    } => {
                        let s = p.session(id).expect("incoming");
                        if self.name.as_ref().is_some_and(|n| *n != principal) {
                            log(format!("toemu msg serve: session {pid:016x}/{id} asks for {principal:?}: refused"));
                            s.refuse(RefuseReason::WrongPrincipal);
                        } else {
                            s.accept();
                        }
                    }
                    PipeEvent::Session {
                        id,
                        event: Event::Received { .. },
                    } => self.waiting.push_back((pid, id)),
                    PipeEvent::Session {
                        id,
                        event: Event::Closed,
                    } => self.closed.push((pid, id)),
                    PipeEvent::Session {
                        id,
                        event: Event::Error(e),
                    } => log(format!("toemu msg serve: session {pid:016x}/{id}: {e}")),
                    PipeEvent::ConnBroken { conn, error } => log(format!(
                        "toemu msg serve: pipe {pid:016x} connection {conn}: {error}"
                    )),
                    PipeEvent::Session { .. } => {}
                }
            }
        }
        let waiting = &self.waiting;
        self.pipes.map.retain(|id, p| {
            p.sessions() > 0 || p.conns_up() > 0 || waiting.iter().any(|w| w.0 == *id)
        });
        Ok(())
    }

    /// The earliest session timer, µs.
    pub(crate) fn next_deadline(&self) -> Option<u64> {
        self.pipes.next_deadline()
    }
}

/// `toemu msg serve --listen ADDR`: accept pipes until `stop`; each session's messages go
/// to `dir` (or are only hashed). With TLS, sessions must ask for the principal the
/// server's certificate names (others are refused); plaintext accepts any.
pub fn serve(
    listen: SocketAddr,
    dir: Option<PathBuf>,
    security: Security,
    stop: &AtomicBool,
    mut log: impl FnMut(String),
) -> io::Result<()> {
    let mut listener = TcpListener::bind(listen)?;
    let mut poll = mio::Poll::new()?;
    poll.registry()
        .register(&mut listener, mio::Token(0), mio::Interest::READABLE)?;
    log(format!(
        "toemu msg serve: listening on {}, {}",
        listener.local_addr()?,
        security.describe()
    ));
    let mut server = Server::new(&security, dir, PipeConfig::default());
    let mut links: Vec<Link<TcpStream>> = Vec::new();
    let started = Instant::now();
    let mut events = mio::Events::with_capacity(256);
    while !stop.load(Ordering::Relaxed) {
        loop {
            match listener.accept() {
                Ok((sock, peer)) => {
                    sock.set_nodelay(true)?;
                    let tls = security.server(unix_now())?;
                    links.push(Link::accepted(sock, peer.to_string(), tls));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        let now_us = started.elapsed().as_micros() as u64;
        let moved = pass(
            &mut links,
            &mut (),
            &mut server.pipes,
            now_us,
            None,
            &mut log,
        )
        .moved;
        links.retain(|l| !l.dead);
        server.handle(now_us, &mut log)?;
        if !moved {
            wait(&mut poll, &mut events)?;
        }
    }
    Ok(())
}

/// Sleep up to 1 ms for socket readiness (a signal, SIGTERM say, only cuts it short).
fn wait(poll: &mut mio::Poll, events: &mut mio::Events) -> io::Result<()> {
    match poll.poll(events, Some(Duration::from_millis(1))) {
        Err(e) if e.kind() != io::ErrorKind::Interrupted => Err(e),
        _ => Ok(()),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// What a sender sends.
#[derive(Debug, Clone)]
pub enum Payload {
    /// These bytes.
    Bytes(Vec<u8>),
    /// `len` bytes of a deterministic pattern (message `k` holds [`DataGen`] seeded
    /// `seed + k`), made as messages are queued: nothing of the size of the transfer is
    /// held.
    Pattern {
        /// Bytes in all.
        len: u64,
        /// The pattern's seed.
        seed: u64,
    },
}

impl Payload {
    /// Bytes in all.
    pub fn len(&self) -> u64 {
        match self {
            Payload::Bytes(b) => b.len() as u64,
            Payload::Pattern { len, .. } => *len,
        }
    }

    /// No bytes at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What `toemu msg send` does.
#[derive(Debug, Clone)]
pub struct SendOptions {
    /// The server.
    pub to: SocketAddr,
    /// The principal sessions ask for (with TLS: the server certificate's name).
    pub principal: String,
    /// The data.
    pub data: Payload,
    /// TCP connections in the pipe.
    pub connections: usize,
    /// Sessions the data is spread over (message `k` goes to session `k mod sessions`).
    pub sessions: usize,
    /// Bytes per message (the smallest, with `message_max_bytes`).
    pub message_bytes: usize,
    /// Messages of sizes spread evenly (by a hash of their number) from `message_bytes`
    /// to this many bytes; `None`: all `message_bytes`.
    pub message_max_bytes: Option<usize>,
    /// The pipe's and its sessions' limits (queues, frames, timeouts).
    pub pipe: PipeConfig,
    /// Pace what goes to the connections from the delivery-rate estimate (`None`: as
    /// fast as they take it).
    pub pacing: Option<PacingConfig>,
    /// With `pacing`, on the emulated TOE: space packets instead. The NIC's egress shaper
    /// paces the connections' TCP segments at the pacing rate, a segment each in turn, and
    /// messages go to the connections as fast as they take them. std TCP paces messages
    /// either way.
    pub pace_packets: bool,
    /// The transfer's service-level objective: its connections' packets carry its DSCP
    /// (`None`: unmarked).
    pub slo: Option<Slo>,
    /// Run the transfer as primed sub-transfers with reserve connections (seed 003 #1):
    /// `connections` is then the active connections plus the reserves (`None`: every
    /// connection takes data from the start, whichever is free).
    pub bulk: Option<BulkConfig>,
}

impl SendOptions {
    /// Sending `data` to `to` with the defaults: 8 connections, 1 session, 1 MiB messages.
    pub fn new(to: SocketAddr, data: Payload) -> SendOptions {
        SendOptions {
            to,
            principal: "store".into(),
            data,
            connections: 8,
            sessions: 1,
            message_bytes: 1 << 20,
            message_max_bytes: None,
            pipe: PipeConfig::default(),
            pacing: None,
            pace_packets: false,
            slo: None,
            bulk: None,
        }
    }

    /// Each message's (offset, length) in the data.
    fn plan(&self) -> Vec<(u64, usize)> {
        let (min, max) = (
            self.message_bytes.max(1),
            self.message_max_bytes.unwrap_or(0),
        );
        let mut plan = Vec::new();
        let (mut at, total) = (0u64, self.data.len());
        while at < total {
            let k = plan.len() as u64;
            let len = if max > min {
                min + (splitmix(k) % (max - min + 1) as u64) as usize
            } else {
                min
            };
            let len = len.min((total - at) as usize);
            plan.push((at, len));
            at += len as u64;
        }
        plan
    }
}

/// A 64-bit mix of `x` (splitmix64's finalizer).
fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// What `toemu msg send` measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SendReport {
    /// Bytes sent and acknowledged.
    pub bytes: u64,
    /// Messages acknowledged.
    pub messages: u64,
    /// Messages that failed.
    pub failed: u64,
    /// Seconds from the first connection to the last session closed (of the clock that
    /// ran it: real, or virtual on the emulated TOE).
    pub seconds: f64,
    /// Times a session's output queue was full and the message waited for a retry.
    pub queue_full: u64,
    /// Times a session found the peer's window shut, and times a later ACK opened it.
    pub stalls: u64,
    /// Times a later acknowledgement opened a shut window.
    pub resumes: u64,
    /// Where the messages' latency came from.
    pub latency: LatencySummary,
    /// Every acknowledged message's timestamps, in acknowledgement order: the latency log
    /// ([`write_latency_log`]).
    #[serde(skip)]
    pub times: Vec<MsgTimes>,
    /// Per session: (messages, SHA-256 of their concatenation) as the server should report.
    pub sessions: Vec<(u64, String)>,
    /// What the bulk planner did (`None`: not used).
    pub bulk: Option<BulkStats>,
    /// Data frames sent again on another connection because theirs held them too long,
    /// bytes.
    pub resent_bytes: u64,
}

/// One message's timestamps (seed 003 #3): when the application queued it, when its
/// first frame left, when its acknowledgement came (the sender's clock, µs), and when
/// its last byte reached the receiver and when the receiving application took it (the
/// receiver's clock, µs, carried by the acknowledgements). One line of the latency log.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MsgTimes {
    /// The session.
    pub session: u32,
    /// The message's ID on the wire.
    pub msg: u64,
    /// Its bytes.
    pub bytes: u64,
    /// Queued by the application.
    pub queued_us: u64,
    /// Its first frame taken by a connection (of its last attempt).
    pub started_us: u64,
    /// Acknowledged whole.
    pub acked_us: u64,
    /// Attempts (1: no retry).
    pub attempts: u32,
    /// Whole at the receiver (receiver's clock).
    pub peer_received_us: u64,
    /// Taken by the receiving application (receiver's clock), once a later
    /// acknowledgement said so.
    pub peer_delivered_us: Option<u64>,
}

impl MsgTimes {
    /// Time in the sender's output queue before its first frame left, µs.
    pub fn sender_queue_us(&self) -> u64 {
        self.started_us - self.queued_us
    }

    /// From its first frame to its acknowledgement, µs: the network's share (the
    /// connections' send buffers, the path, the way back).
    pub fn network_us(&self) -> u64 {
        self.acked_us - self.started_us
    }

    /// From whole at the receiver to taken by its application, µs.
    pub fn receiver_app_us(&self) -> Option<u64> {
        self.peer_delivered_us
            .map(|d| d.saturating_sub(self.peer_received_us))
    }
}

/// Which side holds messages up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Blame {
    /// Messages spend their time between the connections' first frame and the
    /// acknowledgement: the network.
    Network,
    /// Messages wait at the receiver for its application.
    ReceiverApplication,
    /// No component reaches 1 ms at the median.
    Nothing,
}

/// The latency log's summary: the median and 99th percentile of each component, µs, and
/// the verdict. Queueing at the sender follows whatever holds the messages up downstream
/// (a shut window or full connections), so it is reported but not blamed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LatencySummary {
    /// Messages with all their timestamps.
    pub messages: usize,
    /// Time in the sender's output queue.
    pub sender_queue_us: crate::stats::Latency,
    /// First frame to acknowledgement.
    pub network_us: crate::stats::Latency,
    /// Whole at the receiver to taken by its application.
    pub receiver_app_us: crate::stats::Latency,
    /// The verdict: the larger median of the network and the receiving application.
    pub blame: Blame,
}

/// The summary of `times` (messages without a delivery time are left out).
pub fn diagnose(times: &[MsgTimes]) -> LatencySummary {
    let whole: Vec<&MsgTimes> = times
        .iter()
        .filter(|t| t.peer_delivered_us.is_some())
        .collect();
    let lat = |f: &dyn Fn(&MsgTimes) -> u64| {
        if whole.is_empty() {
            return crate::stats::Latency::default();
        }
        crate::stats::latency(whole.iter().map(|t| f(t) as f64).collect())
    };
    let sender_queue_us = lat(&|t| t.sender_queue_us());
    let network_us = lat(&|t| t.network_us());
    let receiver_app_us = lat(&|t| t.receiver_app_us().unwrap_or(0));
    let blame = if network_us.p50.max(receiver_app_us.p50) < 1000.0 {
        Blame::Nothing
    } else if receiver_app_us.p50 >= network_us.p50 {
        Blame::ReceiverApplication
    } else {
        Blame::Network
    };
    LatencySummary {
        messages: whole.len(),
        sender_queue_us,
        network_us,
        receiver_app_us,
        blame,
    }
}

impl LatencySummary {
    /// One line for people.
    pub fn describe(&self) -> String {
        let who = match self.blame {
            Blame::Network => "the network",
            Blame::ReceiverApplication => "the receiving application",
            Blame::Nothing => "nothing (every median under 1 ms)",
        };
        format!(
            "latency of {} messages, median (p99) ms: sender queue {:.1} ({:.1}), network {:.1} ({:.1}), receiving application {:.1} ({:.1}); delay comes from {who}",
            self.messages,
            self.sender_queue_us.p50 / 1e3,
            self.sender_queue_us.p99 / 1e3,
            self.network_us.p50 / 1e3,
            self.network_us.p99 / 1e3,
            self.receiver_app_us.p50 / 1e3,
            self.receiver_app_us.p99 / 1e3,
        )
    }
}

/// Write `times` as JSON lines (one [`MsgTimes`] per line) to `path`.
pub fn write_latency_log(path: &std::path::Path, times: &[MsgTimes]) -> io::Result<()> {
    let mut w = io::BufWriter::new(std::fs::File::create(path)?);
    for t in times {
        serde_json::to_writer(&mut w, t)?;
        w.write_all(b"\n")?;
    }
    w.flush()
}

/// Whether the server received every session the sender sent: the same messages and
/// SHA-256 per session (sessions matched by their hashes, in any order).
pub fn sessions_agree(sent: &SendReport, received: &[SessionResult]) -> bool {
    let mut got: Vec<(u64, &str)> = received
        .iter()
        .map(|r| (r.messages, r.sha256.as_str()))
        .collect();
    let mut want: Vec<(u64, &str)> = sent
        .sessions
        .iter()
        .map(|(m, h)| (*m, h.as_str()))
        .collect();
    got.sort_unstable();
    want.sort_unstable();
    got == want
}

/// The sender's logic, whatever carries its connections: the data cut into messages
/// dealt round robin to the sessions of one pipe, each queued as soon as its session's
/// output queue has room.
pub(crate) struct Sender {
    pub(crate) pipe_id: u64,
    /// The pipe (one entry, for [`pass`]).
    pub(crate) pipes: Pipes,
    data: Payload,
    plan: Vec<(u64, usize)>,
    ids: Vec<u32>,
    /// Per session: the next message (index into `plan`), its hash, its messages.
    next: Vec<usize>,
    sha: Vec<Sha256>,
    counts: Vec<u64>,
    ready: Vec<bool>,
    /// Per session: its next message waits for room in the output queue.
    waiting: Vec<bool>,
    closed: usize,
    acked: u64,
    messages: u64,
    failed: u64,
    queue_full: u64,
    stalls: u64,
    resumes: u64,
    inflight: HashMap<(u32, u64), usize>,
    /// Pacing and the bulk planner, if asked for.
    pub(crate) flow: Flow,
    /// (µs, bytes acknowledged by then), one point per acknowledgement.
    pub(crate) progress: Vec<(u64, u64)>,
    /// When each message in flight was queued: (session, handle) → µs.
    queued_at: HashMap<(u32, u64), u64>,
    /// Every acknowledged message's timestamps, in acknowledgement order.
    pub(crate) times: Vec<MsgTimes>,
    /// (session, wire ID) → index in `times`, until its delivery is reported.
    undelivered: HashMap<(u32, u64), usize>,
}

impl Sender {
    pub(crate) fn new(o: &SendOptions, pipe_id: u64) -> Sender {
        let mut pipe = Pipe::new(o.pipe);
        let ids: Vec<u32> = (0..o.sessions.max(1))
            .map(|_| pipe.open(&o.principal))
            .collect();
        let n = ids.len();
        Sender {
            pipe_id,
            pipes: Pipes {
                cfg: o.pipe,
                map: BTreeMap::from([(pipe_id, pipe)]),
                first: 0,
                visit: Visit::default(),
            },
            data: o.data.clone(),
            plan: o.plan(),
            ids,
            next: (0..n).collect(),
            sha: vec![Sha256::new(); n],
            counts: vec![0; n],
            ready: vec![false; n],
            waiting: vec![false; n],
            closed: 0,
            acked: 0,
            messages: 0,
            failed: 0,
            queue_full: 0,
            stalls: 0,
            resumes: 0,
            inflight: HashMap::new(),
            flow: Flow {
                pacing: o.pacing.map(Pacing::new),
                planner: o.bulk.map(Planner::new),
                packets: false,
                round_us: None,
            },
            progress: Vec::new(),
            queued_at: HashMap::new(),
            times: Vec::new(),
            undelivered: HashMap::new(),
        }
    }

    fn message(&self, k: usize) -> Vec<u8> {
        let (at, len) = self.plan[k];
        match &self.data {
            Payload::Bytes(b) => b[at as usize..at as usize + len].to_vec(),
            Payload::Pattern { seed, .. } => {
                let mut v = vec![0u8; len];
                DataGen::new(seed.wrapping_add(k as u64)).fill(&mut v);
                v
            }
        }
    }

    /// Queue what the sessions' output queues take at `now_us`; close a session once
    /// its last message is queued.
    pub(crate) fn feed(&mut self, now_us: u64) -> io::Result<()> {
        let n = self.ids.len();
        for k in 0..n {
            if !self.ready[k] {
                continue;
            }
            let id = self.ids[k];
            while self.next[k] < self.plan.len() {
                let len = self.plan[self.next[k]].1;
                let Some(s) = self
                    .pipes
                    .map
                    .get_mut(&self.pipe_id)
                    .and_then(|p| p.session(id))
                else {
                    break;
                };
                // A message that does not fit waits (made only once it fits); each wait
                // counts once.
                if len > s.out_free() && len <= self.pipes.cfg.session.out_queue_bytes {
                    if !self.waiting[k] {
                        self.waiting[k] = true;
                        self.queue_full += 1;
                    }
                    break;
                }
                let m = self.message(self.next[k]);
                self.sha[k].update(&m);
                let s = self
                    .pipes
                    .map
                    .get_mut(&self.pipe_id)
                    .and_then(|p| p.session(id));
                match s.map(|s| s.send(m, now_us)) {
                    Some(Ok(h)) => {
                        self.inflight.insert((id, h.0), len);
                        self.queued_at.insert((id, h.0), now_us);
                        self.counts[k] += 1;
                        self.next[k] += n;
                        self.waiting[k] = false;
                    }
                    Some(Err(e)) => return Err(io::Error::other(format!("session {id}: {e}"))),
                    None => break,
                }
            }
            if self.next[k] >= self.plan.len() {
                if let Some(s) = self
                    .pipes
                    .map
                    .get_mut(&self.pipe_id)
                    .and_then(|p| p.session(id))
                {
                    s.close();
                }
                self.ready[k] = false;
            }
        }
        Ok(())
    }

    /// Take the pipe's events; `progress(acked_bytes)` as acknowledgements come.
    pub(crate) fn handle(
        &mut self,
        now_us: u64,
        progress: &mut impl FnMut(u64),
        log: &mut impl FnMut(String),
    ) -> io::Result<()> {
        let Some(p) = self.pipes.map.get_mut(&self.pipe_id) else {
            return Ok(());
        };
        while let Some(e) = p.poll_event() {
            let PipeEvent::Session { id, event } = e else {
                log(format!("toemu msg send: {e:?}"));
                continue;
            };
            let k = self.ids.iter().position(|&i| i == id).unwrap_or(0);
            match event {
                Event::Created => self.ready[k] = true,
                Event::Acked {
                    id: m,
                    msg,
                    latency_us,
                    peer_received_us,
                    attempts,
                } => {
                    self.messages += 1;
                    let len = self.inflight.remove(&(id, m.0)).unwrap_or(0) as u64;
                    let started_us = now_us.saturating_sub(latency_us);
                    self.undelivered.insert((id, msg), self.times.len());
                    self.times.push(MsgTimes {
                        session: id,
                        msg,
                        bytes: len,
                        queued_us: self
                            .queued_at
                            .remove(&(id, m.0))
                            .unwrap_or(started_us)
                            .min(started_us),
                        started_us,
                        acked_us: now_us,
                        attempts,
                        peer_received_us,
                        peer_delivered_us: None,
                    });
                    self.acked += len;
                    // (Packet pacing counts TCP's acknowledgements instead.)
                    if let Some(p) = self.flow.pacing.as_mut().filter(|_| !self.flow.packets) {
                        p.on_ack(now_us, len, latency_us);
                    }
                    self.progress.push((now_us, self.acked));
                    progress(self.acked);
                }
                Event::Delivered {
                    msg,
                    peer_delivered_us,
                    ..
                } => {
                    if let Some(i) = self.undelivered.remove(&(id, msg)) {
                        self.times[i].peer_delivered_us = Some(peer_delivered_us);
                    }
                }
                Event::Failed { id: m, .. } => {
                    self.failed += 1;
                    self.queued_at.remove(&(id, m.0));
                }
                Event::Stalled => self.stalls += 1,
                Event::Resumed => self.resumes += 1,
                Event::Refused(r) => {
                    return Err(io::Error::other(format!(
                        "the server refused the session: {r:?}"
                    )))
                }
                Event::Error(e) => return Err(io::Error::other(format!("session {id}: {e}"))),
                Event::Closed => self.closed += 1,
                _ => {}
            }
        }
        Ok(())
    }

    /// Every session closed.
    pub(crate) fn done(&self) -> bool {
        self.closed == self.ids.len()
    }

    /// The earliest session timer, µs.
    pub(crate) fn next_deadline(&self) -> Option<u64> {
        self.pipes.next_deadline()
    }

    pub(crate) fn report(&self, seconds: f64) -> SendReport {
        SendReport {
            bytes: self.acked,
            messages: self.messages,
            failed: self.failed,
            seconds,
            queue_full: self.queue_full,
            stalls: self.stalls,
            resumes: self.resumes,
            latency: diagnose(&self.times),
            times: self.times.clone(),
            sessions: self
                .counts
                .iter()
                .zip(&self.sha)
                .map(|(c, s)| (*c, hex(&s.clone().finalize())))
                .collect(),
            bulk: self.flow.planner.as_ref().map(Planner::stats),
            resent_bytes: self.pipes.map.values().map(Pipe::resent_bytes).sum(),
        }
    }
}

/// The error when every connection of a pipe is gone.
pub(crate) fn all_gone<S>(links: &[Link<S>]) -> io::Error {
    let why = links.iter().find_map(|l| l.error.clone());
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        format!(
            "every connection of the pipe is gone ({})",
            why.as_deref().unwrap_or("closed by the server")
        ),
    )
}

/// A std TCP connection to `to` whose packets, the SYN included, carry `slo`'s DSCP
/// (`IP_TOS`, or `IPV6_TCLASS` for an IPv6 peer).
fn connect_marked(to: SocketAddr, slo: Option<Slo>) -> io::Result<std::net::TcpStream> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(to), Type::STREAM, Some(Protocol::TCP))?;
    if let Some(slo) = slo {
        match to {
            SocketAddr::V4(_) => s.set_tos_v4(u32::from(slo.tos()))?,
            SocketAddr::V6(_) => s.set_tclass_v6(u32::from(slo.tos()))?,
        }
    }
    s.connect(&to.into())?;
    Ok(s.into())
}

/// `toemu msg send`: one pipe of `connections` connections to `to`, the data cut into
/// messages dealt round robin to `sessions` sessions; `progress(acked_bytes)` is called
/// as acknowledgements come.
pub fn send(
    o: &SendOptions,
    security: &Security,
    mut progress: impl FnMut(u64),
    mut log: impl FnMut(String),
) -> io::Result<SendReport> {
    let started = Instant::now();
    let pipe_id = u64::from_le_bytes(crate::iscsi::random_bytes().map_err(io::Error::other)?);
    let mut links = Vec::new();
    for _ in 0..o.connections.max(1) {
        let std = connect_marked(o.to, o.slo)?;
        std.set_nodelay(true)?;
        std.set_nonblocking(true)?;
        let tls = security.client(&o.principal, unix_now())?;
        links.push(Link::opened(
            TcpStream::from_std(std),
            o.to.to_string(),
            tls,
            pipe_id,
        ));
    }
    let mut sender = Sender::new(o, pipe_id);
    let mut poll = mio::Poll::new()?;
    let mut events = mio::Events::with_capacity(64);
    let mut last_moved = Instant::now();
    while !sender.done() {
        let now_us = started.elapsed().as_micros() as u64;
        sender.feed(now_us)?;
        let moved = pass(
            &mut links,
            &mut (),
            &mut sender.pipes,
            now_us,
            Some(&mut sender.flow),
            &mut log,
        )
        .moved;
        sender.handle(now_us, &mut progress, &mut log)?;
        if links.iter().all(|l| l.dead) {
            return Err(all_gone(&links));
        }
        if moved {
            last_moved = Instant::now();
        } else {
            if last_moved.elapsed() > Duration::from_secs(120) {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no progress for 120 s",
                ));
            }
            wait(&mut poll, &mut events)?;
        }
    }
    Ok(sender.report(started.elapsed().as_secs_f64()))
}
