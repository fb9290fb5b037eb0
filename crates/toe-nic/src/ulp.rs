//! The ULP engine slot: an optional upper-layer-protocol engine per offload context (seed
//! 004's iSCSI module beside its TOE; `DESIGN.md`, "The ULP engine slot"). Pure: no I/O, no
//! clock (time comes in as an argument).
//!
//! The NIC crate names no protocol: a protocol crate implements [`UlpEngine`] (and a
//! [`UlpFactory`] that starts one from the parameters the host sends), and the NIC is built
//! with the factories it carries ([`crate::Nic::add_engine`]).
//!
//! # Contract
//! - **Offload at an exact stream position.** The host runs the protocol's handshake in
//!   software and then sends [`Command::UlpOffload`](toe_bus::Command::UlpOffload) with the
//!   offset of the first byte it has not received. The slot starts the engine only if the
//!   NIC's delivery position equals that offset; otherwise it refuses as stale and holds
//!   delivery at its position, so the retry (sent once the driver has the bytes that were in
//!   flight, with them as `carry`) finds the positions equal. Bytes the host received but did
//!   not consume are handed back as `carry` and taken by the engine before the stream.
//! - **Receive.** Once running, in-order stream bytes go to [`UlpEngine::receive`], which
//!   places data into registered buffers through [`TagMemory`] and appends whole *records* to
//!   its output. The records, not the stream, go up through the ordinary indicate path (under
//!   W, or into named buffers): the driver's stream offsets count records. The slot takes from
//!   the socket only while fewer than [`RECORD_HIGH`] record bytes wait, so a host that stops
//!   reading leaves the data in the socket and TCP's window closes, as without an engine.
//! - **Tags.** [`Command::UlpRegister`](toe_bus::Command::UlpRegister) hands the NIC a host
//!   buffer for a task tag. [`TagMemory::write`] refuses (and never performs) a write past its
//!   end. Every registered buffer comes back exactly once in
//!   [`Event::UlpReleased`]: on release, when the engine says its
//!   task's data is all in ([`TagMemory::finish`]), on a new registration of the same tag, or
//!   when the connection ends.
//! - **Transmit.** Send requests and releases are carried out in order; the engine's output is
//!   staged (at most [`WIRE_LOW`] bytes plus one request's output) and moved into the socket
//!   as its send buffer takes it. A release waits until every send before it was carried out,
//!   so a buffer is never returned while a request that reads it is pending.

use std::collections::{BTreeMap, VecDeque};

use smoltcp::time::Instant;
use toe_bus::{ConnId, Dma, Event, HostBuf};

/// Host buffers registered for task tags, as an engine reaches them (DMA).
pub trait TagMemory {
    /// Write `data` at byte `offset` of tag `tag`'s buffer. Returns false, and writes
    /// nothing, if the tag has no buffer or the range runs past its end.
    fn write(&mut self, tag: u32, offset: usize, data: &[u8]) -> bool;
    /// Fill `out` from byte `offset` of tag `tag`'s buffer. Returns false, and reads
    /// nothing, if the tag has no buffer or the range runs past its end.
    fn read(&self, tag: u32, offset: usize, out: &mut [u8]) -> bool;
    /// The length of tag `tag`'s buffer in bytes, if one is registered.
    fn len(&self, tag: u32) -> Option<usize>;
    /// The engine has placed all the data of tag `tag`'s task: the buffer goes back to the
    /// host (after the write that completed it; before the record that reports it).
    fn finish(&mut self, tag: u32);
}

/// An upper-layer engine for one offloaded connection. Pure: time is an argument; host
/// memory is behind [`TagMemory`].
pub trait UlpEngine: Send {
    /// Take in-order received stream bytes (all of them): place data through `mem`, append
    /// whole records for the host to `up`. After [`UlpEngine::failed`] says so, bytes are
    /// taken and dropped.
    fn receive(&mut self, now: Instant, bytes: &[u8], mem: &mut dyn TagMemory, up: &mut Vec<u8>);
    /// Carry out one send request from the host: append the bytes to transmit to `wire`.
    /// `Err` refuses it (nothing appended); the host is told.
    fn send(
        &mut self,
        now: Instant,
        request: &[u8],
        mem: &dyn TagMemory,
        wire: &mut Vec<u8>,
    ) -> Result<(), String>;
    /// Why the received stream cannot go on, once it cannot (reported to the host once).
    fn failed(&self) -> Option<String>;
    /// The engine's counters, as (name, value) pairs.
    fn counters(&self) -> Vec<(&'static str, u64)>;
}

/// Starts engines of one protocol on the NIC.
pub trait UlpFactory: Send + Sync {
    /// The name hosts ask for in [`Command::UlpOffload`](toe_bus::Command::UlpOffload).
    fn name(&self) -> &'static str;
    /// An engine started with the host's `params` (the protocol's encoding).
    fn start(&self, params: &[u8]) -> Result<Box<dyn UlpEngine>, String>;
}

/// The slot takes stream bytes only while fewer record bytes than this wait for delivery.
pub const RECORD_HIGH: usize = 64 * 1024;
/// Most stream bytes handed to the engine in one call.
pub const FEED_CHUNK: usize = 16 * 1024;
/// The slot carries out the next send request only while fewer staged bytes than this wait
/// for the socket.
pub const WIRE_LOW: usize = 64 * 1024;

/// Counters of one connection's slot. Counts only grow.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UlpStats {
    /// Offload commands refused as stale.
    pub stale_offloads: u64,
    /// Stream bytes the engine took (the carry included).
    pub stream_bytes: u64,
    /// Record bytes the engine produced.
    pub record_bytes: u64,
    /// Data bytes written into registered buffers.
    pub placed_bytes: u64,
    /// Writes refused because they ran past a buffer or named no registered tag.
    pub writes_refused: u64,
    /// Tags registered.
    pub tags_registered: u64,
    /// Registered buffers returned.
    pub tags_returned: u64,
    /// Send requests carried out.
    pub requests: u64,
    /// Send requests refused.
    pub requests_refused: u64,
    /// Bytes the engine emitted for the wire.
    pub wire_bytes: u64,
}

#[derive(Debug)]
struct Tag {
    buf: HostBuf,
    placed: u32,
}

impl Tag {
    /// Whether `len` bytes at byte `offset` lie inside the buffer.
    fn fits(&self, offset: usize, len: usize) -> bool {
        offset.checked_add(len).is_some_and(|e| e <= self.buf.len())
    }
}

#[derive(Debug)]
enum Request {
    Send(Vec<u8>),
    Release(u32),
}

/// The registered buffers as an engine reaches them.
struct Tags<'a> {
    tags: &'a mut BTreeMap<u32, Tag>,
    dma: &'a Dma,
    /// Buffers the engine finished, out of `tags` at once (so nothing more is placed into
    /// them), given back after the engine's call.
    finished: &'a mut Vec<(u32, Tag)>,
    stats: &'a mut UlpStats,
}

impl TagMemory for Tags<'_> {
    fn write(&mut self, tag: u32, offset: usize, data: &[u8]) -> bool {
        match self.tags.get_mut(&tag) {
            Some(t) if t.fits(offset, data.len()) => {
                self.dma.write(&mut t.buf, offset, data);
                t.placed = t.placed.saturating_add(data.len() as u32);
                self.stats.placed_bytes += data.len() as u64;
                true
            }
            _ => {
                self.stats.writes_refused += 1;
                false
            }
        }
    }
    fn read(&self, tag: u32, offset: usize, out: &mut [u8]) -> bool {
        match self.tags.get(&tag) {
            Some(t) if t.fits(offset, out.len()) => {
                self.dma.read(&t.buf, offset, out);
                true
            }
            _ => false,
        }
    }
    fn len(&self, tag: u32) -> Option<usize> {
        self.tags.get(&tag).map(|t| t.buf.len())
    }
    fn finish(&mut self, tag: u32) {
        if let Some(t) = self.tags.remove(&tag) {
            self.finished.push((tag, t));
        }
    }
}

/// One connection's ULP slot, NIC side: the engine (once started), the registered buffers,
/// the records waiting for delivery, the send requests and the bytes staged for the socket.
#[derive(Default)]
pub struct UlpConn {
    engine: Option<Box<dyn UlpEngine>>,
    /// Delivery held at this position after a stale offload.
    frozen: Option<u64>,
    failure_reported: bool,
    tags: BTreeMap<u32, Tag>,
    up: Vec<u8>,
    up_at: usize,
    requests: VecDeque<Request>,
    wire: Vec<u8>,
    wire_at: usize,
    finished: Vec<(u32, Tag)>,
    stats: UlpStats,
}

impl std::fmt::Debug for UlpConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UlpConn")
            .field("running", &self.running())
            .field("frozen", &self.frozen)
            .field("tags", &self.tags.len())
            .field("stats", &self.stats)
            .finish()
    }
}

impl UlpConn {
    /// Whether an engine runs the connection.
    pub fn running(&self) -> bool {
        self.engine.is_some()
    }

    /// The position delivery is held at after a stale offload, if it is.
    pub fn frozen(&self) -> Option<u64> {
        self.frozen
    }

    /// The counters.
    pub fn stats(&self) -> UlpStats {
        self.stats
    }

    /// The engine's counters (none before it starts).
    pub fn engine_counters(&self) -> Vec<(&'static str, u64)> {
        self.engine.as_ref().map_or_else(Vec::new, |e| e.counters())
    }

    /// Bytes the slot holds in NIC memory: records (delivered ones not yet dropped
    /// included) and bytes staged for the socket. At most `2 × RECORD_HIGH` plus what one
    /// feed and one request produce.
    pub fn held_bytes(&self) -> usize {
        self.up.len() + self.wire.len()
    }

    /// Tags registered now.
    pub fn registered(&self) -> usize {
        self.tags.len()
    }

    /// Handle an offload request for `conn` at `stream_offset` with the NIC's delivery
    /// position `position`; `factory` is the engine asked for, if the NIC has it. Events
    /// ([`Event::UlpStarted`] or [`Event::UlpRefused`], then what the carry produced) go to
    /// `out`. Returns whether the engine started.
    #[allow(clippy::too_many_arguments)]
    pub fn offload(
        &mut self,
        conn: ConnId,
        factory: Option<&dyn UlpFactory>,
        params: &[u8],
        stream_offset: u64,
        carry: &[u8],
        position: u64,
        now: Instant,
        dma: &Dma,
        out: &mut VecDeque<Event>,
    ) -> bool {
        let refuse = |out: &mut VecDeque<Event>, stale: bool, error: String| {
            out.push_back(Event::UlpRefused {
                conn,
                position,
                stale,
                error,
            });
        };
        if self.engine.is_some() {
            refuse(out, false, "an engine already runs the connection".into());
            return false;
        }
        if stream_offset > position {
            refuse(
                out,
                false,
                format!("offload at {stream_offset}: the NIC delivered only {position} bytes"),
            );
            return false;
        }
        if stream_offset < position {
            self.stats.stale_offloads += 1;
            self.frozen = Some(position);
            refuse(
                out,
                true,
                format!("offload at {stream_offset}: the NIC delivered up to {position}"),
            );
            return false;
        }
        let engine = match factory {
            None => Err("the NIC has no such engine".to_string()),
            Some(f) => f.start(params),
        };
        match engine {
            Err(e) => {
                refuse(out, false, e);
                false
            }
            Ok(e) => {
                self.engine = Some(e);
                self.frozen = None;
                out.push_back(Event::UlpStarted {
                    conn,
                    stream_offset,
                });
                if !carry.is_empty() {
                    self.feed(conn, now, carry, dma, out);
                }
                true
            }
        }
    }

    /// Register `buf` for `tag`; a buffer the tag had comes back to the host.
    pub fn register(&mut self, conn: ConnId, tag: u32, buf: HostBuf, out: &mut VecDeque<Event>) {
        self.stats.tags_registered += 1;
        if let Some(old) = self.tags.insert(tag, Tag { buf, placed: 0 }) {
            self.give_back(conn, tag, old, out);
        }
    }

    fn give_back(&mut self, conn: ConnId, tag: u32, t: Tag, out: &mut VecDeque<Event>) {
        self.stats.tags_returned += 1;
        out.push_back(Event::UlpReleased {
            conn,
            tag,
            buf: t.buf,
            placed: t.placed,
        });
    }

    /// Release `tag` once the send requests before it are carried out.
    pub fn release(&mut self, conn: ConnId, tag: u32, out: &mut VecDeque<Event>) {
        self.requests.push_back(Request::Release(tag));
        self.releases(conn, out);
    }

    /// Carry out the releases at the head of the requests.
    fn releases(&mut self, conn: ConnId, out: &mut VecDeque<Event>) {
        while let Some(&Request::Release(tag)) = self.requests.front() {
            self.requests.pop_front();
            if let Some(t) = self.tags.remove(&tag) {
                self.give_back(conn, tag, t, out);
            }
        }
    }

    /// Queue a send request.
    pub fn send(&mut self, request: Vec<u8>) {
        self.requests.push_back(Request::Send(request));
    }

    /// Stream bytes the slot takes now (0 while enough records wait, or before the engine
    /// runs).
    pub fn room(&self) -> usize {
        if self.engine.is_none() || self.available() >= RECORD_HIGH {
            0
        } else {
            FEED_CHUNK
        }
    }

    /// Give the engine in-order stream bytes (all of `bytes` are taken). Buffers whose
    /// task the engine finished come back, and a failure is reported once, through `out`.
    /// Returns whether records were produced (the record stream then ends on a record
    /// boundary: the caller may mark a push there).
    pub fn feed(
        &mut self,
        conn: ConnId,
        now: Instant,
        bytes: &[u8],
        dma: &Dma,
        out: &mut VecDeque<Event>,
    ) -> bool {
        let Some(engine) = self.engine.as_mut() else {
            return false;
        };
        // Drop the delivered records once they are at least half the buffer: the buffer
        // stays within twice what waits, and each byte moves at most once more on average.
        if self.up_at > 0 && self.up_at >= self.up.len() / 2 {
            self.up.drain(..self.up_at);
            self.up_at = 0;
        }
        let before = self.up.len();
        let mut mem = Tags {
            tags: &mut self.tags,
            dma,
            finished: &mut self.finished,
            stats: &mut self.stats,
        };
        engine.receive(now, bytes, &mut mem, &mut self.up);
        self.stats.stream_bytes += bytes.len() as u64;
        let produced = self.up.len() - before;
        self.stats.record_bytes += produced as u64;
        if !self.failure_reported {
            if let Some(error) = engine.failed() {
                self.failure_reported = true;
                out.push_back(Event::UlpError { conn, error });
            }
        }
        for (tag, t) in std::mem::take(&mut self.finished) {
            self.give_back(conn, tag, t, out);
        }
        produced > 0
    }

    /// Record bytes waiting for delivery.
    pub fn available(&self) -> usize {
        self.up.len() - self.up_at
    }

    /// Move up to `max` waiting record bytes into `buf` at byte `at` by DMA; returns how
    /// many.
    pub fn deliver(&mut self, dma: &Dma, buf: &mut HostBuf, at: usize, max: usize) -> usize {
        let n = self.available().min(max).min(buf.len().saturating_sub(at));
        if n > 0 {
            dma.write(buf, at, &self.up[self.up_at..self.up_at + n]);
            self.up_at += n;
        }
        n
    }

    /// Carry out requests in order while fewer than [`WIRE_LOW`] staged bytes wait.
    /// Releases and refusals go to `out`.
    pub fn pump(&mut self, conn: ConnId, now: Instant, dma: &Dma, out: &mut VecDeque<Event>) {
        loop {
            self.releases(conn, out);
            if self.requests.is_empty() || self.wire_pending().len() >= WIRE_LOW {
                break;
            }
            let Some(engine) = self.engine.as_mut() else {
                break;
            };
            let Some(Request::Send(request)) = self.requests.pop_front() else {
                break;
            };
            if self.wire_at > 0 {
                self.wire.drain(..self.wire_at);
                self.wire_at = 0;
            }
            let before = self.wire.len();
            // Read-only to the engine: `send` takes the memory shared.
            let mem = Tags {
                tags: &mut self.tags,
                dma,
                finished: &mut self.finished,
                stats: &mut self.stats,
            };
            match engine.send(now, &request, &mem, &mut self.wire) {
                Ok(()) => {
                    self.stats.requests += 1;
                    self.stats.wire_bytes += (self.wire.len() - before) as u64;
                }
                Err(error) => {
                    self.wire.truncate(before);
                    self.stats.requests_refused += 1;
                    out.push_back(Event::UlpError { conn, error });
                }
            }
        }
    }

    /// The bytes staged for the socket.
    pub fn wire_pending(&self) -> &[u8] {
        &self.wire[self.wire_at..]
    }

    /// `n` staged bytes went into the socket.
    pub fn wire_sent(&mut self, n: usize) {
        self.wire_at = (self.wire_at + n).min(self.wire.len());
        if self.wire_at == self.wire.len() {
            self.wire.clear();
            self.wire_at = 0;
        }
    }

    /// Nothing left to transmit: no request, nothing staged.
    pub fn tx_idle(&self) -> bool {
        self.requests.is_empty() && self.wire_pending().is_empty()
    }

    /// The connection ended: every registered buffer comes back.
    pub fn teardown(&mut self, conn: ConnId, out: &mut VecDeque<Event>) {
        self.requests.clear();
        self.wire.clear();
        self.wire_at = 0;
        for (tag, t) in std::mem::take(&mut self.tags) {
            self.give_back(conn, tag, t, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use toe_bus::HostMemory;

    /// Places every byte it gets at the next offset of tag 1, and finishes the tag when
    /// it is full; sends its request back verbatim.
    struct Fill(usize);

    impl UlpEngine for Fill {
        fn receive(&mut self, _: Instant, bytes: &[u8], mem: &mut dyn TagMemory, up: &mut Vec<u8>) {
            let room = mem
                .len(1)
                .map_or(bytes.len(), |l| l.saturating_sub(self.0))
                .min(bytes.len());
            if room > 0 && mem.write(1, self.0, &bytes[..room]) {
                self.0 += room;
                if mem.len(1) == Some(self.0) {
                    mem.finish(1);
                }
                up.extend_from_slice(&bytes[room..]);
            } else {
                up.extend_from_slice(bytes);
            }
        }
        fn send(
            &mut self,
            _: Instant,
            r: &[u8],
            _: &dyn TagMemory,
            w: &mut Vec<u8>,
        ) -> Result<(), String> {
            w.extend_from_slice(r);
            Ok(())
        }
        fn failed(&self) -> Option<String> {
            None
        }
        fn counters(&self) -> Vec<(&'static str, u64)> {
            Vec::new()
        }
    }

    struct FillFactory;

    impl UlpFactory for FillFactory {
        fn name(&self) -> &'static str {
            "fill"
        }
        fn start(&self, params: &[u8]) -> Result<Box<dyn UlpEngine>, String> {
            match params {
                [] => Ok(Box::new(Fill(0))),
                _ => Err("no parameters expected".into()),
            }
        }
    }

    /// A slot with the fill engine started at stream offset 0: its host memory, DMA
    /// engine and slot, and the events so far (cleared).
    fn started() -> (Arc<HostMemory>, Dma, UlpConn, VecDeque<Event>) {
        let mem = Arc::new(HostMemory::anonymous(1 << 20).unwrap());
        let dma = Dma::new(mem.clone());
        let mut u = UlpConn::default();
        let mut out = VecDeque::new();
        let t = Instant::ZERO;
        assert!(u.offload(
            ConnId(1),
            Some(&FillFactory),
            &[],
            0,
            &[],
            0,
            t,
            &dma,
            &mut out
        ));
        out.clear();
        (mem, dma, u, out)
    }

    fn refusal(out: &mut VecDeque<Event>) -> (u64, bool) {
        match out.pop_front() {
            Some(Event::UlpRefused {
                position, stale, ..
            }) => (position, stale),
            e => panic!("expected a refusal, got {e:?}"),
        }
    }

    /// Offloads that cannot start change nothing, except a stale one, which holds delivery
    /// at the NIC's position until the retry there starts the engine.
    #[test]
    fn offload_refusals_and_the_stale_retry() {
        let mem = Arc::new(HostMemory::anonymous(1 << 20).unwrap());
        let dma = Dma::new(mem.clone());
        let (conn, t) = (ConnId(1), Instant::ZERO);
        let mut u = UlpConn::default();
        let mut out = VecDeque::new();
        let f: &dyn UlpFactory = &FillFactory;
        assert!(!u.offload(conn, None, &[], 10, &[], 10, t, &dma, &mut out));
        assert_eq!(refusal(&mut out), (10, false), "no such engine");
        assert!(!u.offload(conn, Some(f), &[1], 10, &[], 10, t, &dma, &mut out));
        assert_eq!(refusal(&mut out), (10, false), "bad parameters");
        assert!(!u.offload(conn, Some(f), &[], 11, &[], 10, t, &dma, &mut out));
        assert_eq!(refusal(&mut out), (10, false), "ahead of the NIC");
        assert_eq!(u.frozen(), None);
        assert!(!u.offload(conn, Some(f), &[], 4, &[], 10, t, &dma, &mut out));
        assert_eq!(refusal(&mut out), (10, true), "stale");
        assert_eq!(u.frozen(), Some(10));
        assert_eq!(u.room(), 0, "nothing taken before the engine runs");
        // The retry at the position starts it; the carry goes first, into tag 1.
        u.register(conn, 1, mem.alloc(8).unwrap(), &mut out);
        assert!(u.offload(conn, Some(f), &[], 10, b"abc", 10, t, &dma, &mut out));
        assert!(matches!(
            out.pop_front(),
            Some(Event::UlpStarted {
                stream_offset: 10,
                ..
            })
        ));
        assert_eq!((u.frozen(), u.running()), (None, true));
        assert!(!u.offload(conn, Some(f), &[], 10, &[], 10, t, &dma, &mut out));
        assert_eq!(refusal(&mut out), (10, false), "already running");
        // Filling the buffer finishes it: it comes back once, with what was placed; the
        // bytes past it come up as records.
        assert!(u.feed(conn, t, b"defghi", &dma, &mut out));
        match out.pop_front() {
            Some(Event::UlpReleased {
                tag: 1,
                buf,
                placed: 8,
                ..
            }) => {
                assert_eq!(mem.slice(&buf), b"abcdefgh");
                mem.free(buf);
            }
            e => panic!("expected the buffer back, got {e:?}"),
        }
        assert_eq!(u.available(), 1, "the 9th byte is a record");
        u.release(conn, 1, &mut out);
        assert!(
            out.is_empty(),
            "a finished tag's release gives nothing back again"
        );
        // Nothing is written into a buffer the NIC gave back.
        u.feed(conn, t, b"j", &dma, &mut out);
        assert_eq!((u.stats().writes_refused, u.available()), (1, 2));
    }

    /// A host that never lets the records run dry (it takes a little less than comes in)
    /// does not make the record buffer grow with the stream.
    #[test]
    fn records_stay_bounded_when_never_fully_taken() {
        let (mem, dma, mut u, mut out) = started();
        let (conn, t) = (ConnId(1), Instant::ZERO);
        let mut host = mem.alloc(FEED_CHUNK).unwrap();
        let chunk = vec![7u8; FEED_CHUNK];
        let mut most = 0;
        for _ in 0..1000 {
            let room = u.room();
            if room > 0 {
                u.feed(conn, t, &chunk[..room], &dma, &mut out);
            }
            u.deliver(&dma, &mut host, 0, FEED_CHUNK - 1000);
            most = most.max(u.held_bytes());
        }
        assert!(u.available() > 0, "the records never ran dry");
        assert!(most <= 2 * RECORD_HIGH + FEED_CHUNK, "held {most} bytes");
    }

    /// A release waits for the sends before it; teardown returns what is still held.
    #[test]
    fn releases_follow_the_sends_before_them() {
        let (mem, dma, mut u, mut out) = started();
        let (conn, t) = (ConnId(1), Instant::ZERO);
        u.register(conn, 7, mem.alloc(4).unwrap(), &mut out);
        u.register(conn, 8, mem.alloc(4).unwrap(), &mut out);
        u.send(b"one".to_vec());
        u.release(conn, 7, &mut out);
        assert!(out.is_empty(), "held behind the send");
        u.pump(conn, t, &dma, &mut out);
        assert_eq!(u.wire_pending(), b"one");
        assert!(matches!(
            out.pop_front(),
            Some(Event::UlpReleased { tag: 7, .. })
        ));
        u.wire_sent(3);
        assert!(u.tx_idle());
        u.teardown(conn, &mut out);
        assert!(matches!(
            out.pop_front(),
            Some(Event::UlpReleased { tag: 8, .. })
        ));
        assert_eq!(u.stats().tags_registered, u.stats().tags_returned);
    }
}
