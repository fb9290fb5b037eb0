//! The host driver's per-connection receive state (seed 004, driver side). Pure: no threads,
//! channels or clock reads; time comes in as `now`, host memory as `&HostMemory`, and outputs
//! (commands for the NIC, anonymous buffers to recycle, application notes) are appended to an
//! [`Outputs`] the caller carries out.
//!
//! # Rules (DESIGN.md, "Driver side")
//! 1. I (`indicated`) grows by every IndicateData; anonymous buffers queue in stream order.
//! 2. A posted named buffer is first filled from queued indicated data (order always kept);
//!    drained anonymous buffers are released at once. A named buffer larger than W is handed
//!    to the NIC for the rest (`PostNamed` with the bytes already copied as `prefill`); a
//!    smaller one stays with the driver and is filled by copying.
//! 3. A named buffer smaller than the queued data is filled, returned, and the completion says
//!    more data is available.
//! 4. With no named buffer, the application is notified once; after it accepts data (in place)
//!    the driver releases those buffers and notifies again if more is queued.
//! 5. When I reaches W and all indicated data has been accepted or copied, I is reset to 0 and,
//!    if no named buffer is held by the NIC, IndicateAcknowledge{W} reopens the window. With
//!    [`AckPolicy::KeepOpen`] the driver also acknowledges while data is being accepted.
//!    The same holds for the connection's buffer share ([`toe_bus::buffer_share`]): the driver
//!    mirrors how many anonymous buffers the NIC has charged to the connection, and when the
//!    charge reaches the share (tiny segments, each in its own buffer) it acknowledges once
//!    every indicated byte is taken, carrying the drained buffers in `IndicateAck{bufs}`.
//! 6. Push mode: a copied chunk that ended with PSH returns the buffer now; otherwise the push
//!    timer starts (if not running) and returns the partly filled buffer when it fires.
//!    Returning a buffer stops its timer. Without push mode PSH is ignored.
//!
//! A named buffer held by the NIC resets the NIC's P to 0, and the driver mirrors that by
//! resetting I when it posts. While a post is held by the NIC, no acknowledgement is computed.
//! If the NIC bounces a post as stale (data was in flight), the saved I is restored, so P and
//! I agree again once the rings are quiet.

use std::collections::VecDeque;

use toe_bus::time::{Duration, Instant};
use toe_bus::{buffer_share, Command, ConnId, HostBuf, HostMemory, ReturnReason, RxPolicy};

/// When the driver acknowledges indicated data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckPolicy {
    /// Seed 004's base rule: acknowledge W once I == W and everything was accepted or copied.
    WindowFull,
    /// Also acknowledge while data is being accepted, whenever at least `min_bytes` accepted
    /// bytes are unacknowledged, so the window never fully closes under a steady reader.
    KeepOpen {
        /// Batch size of keep-open acknowledgements, in bytes (> 0).
        min_bytes: u32,
    },
}

/// Receive configuration of one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxConfig {
    /// Receive policy.
    pub policy: RxPolicy,
    /// W in bytes (> 0); the MSS under `MssHoldoff`.
    pub window: u32,
    /// Acknowledgement policy (forced to `WindowFull` under `MssHoldoff`).
    pub ack: AckPolicy,
    /// Push timer period.
    pub push_timeout: Duration,
    /// `UnboundedCopy` only: most bytes the driver's own socket buffer may hold. Beyond it the
    /// driver stops copying, anonymous buffers stay queued and the NIC runs out of them.
    pub copy_cap_bytes: usize,
}

/// Identifies one named buffer posted on one connection (application's handle).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NamedId(pub u64);

/// A named buffer handed back to the application.
#[derive(Debug)]
pub struct NamedCompletion {
    /// The id returned by the post.
    pub id: NamedId,
    /// The buffer; ownership returns to the application.
    pub buf: HostBuf,
    /// Valid bytes from the start of the buffer.
    pub filled: usize,
    /// Why it came back.
    pub why: ReturnReason,
    /// More received data is already queued behind it.
    pub more_data: bool,
}

/// Things the application should hear about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Note {
    /// Data is available (raised once until the application accepts something).
    DataAvailable,
    /// A named buffer completed; take it with `take_completion`.
    NamedComplete,
}

/// What a call produced, for the caller to carry out.
#[derive(Debug, Default)]
pub struct Outputs {
    /// Commands for the NIC, in order.
    pub commands: Vec<Command>,
    /// Anonymous buffers drained: back to the pool (and to the NIC).
    pub released: Vec<HostBuf>,
    /// Application notes.
    pub notes: Vec<(ConnId, Note)>,
}

/// Driver-side counters of one connection (bytes and counts only grow, except `indicated`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ConnRxStats {
    /// Bytes received through IndicateData.
    pub indicated_bytes: u64,
    /// Bytes received directly in named buffers placed by the NIC.
    pub placed_bytes: u64,
    /// Bytes the driver copied from indicated data into named buffers (or its socket buffer).
    pub copied_bytes: u64,
    /// Bytes the application accepted in place.
    pub accepted_bytes: u64,
    /// IndicateAcknowledge commands sent.
    pub acks_sent: u64,
    /// Bytes acknowledged.
    pub acked_bytes: u64,
    /// DataAvailable notes raised.
    pub notifications: u64,
    /// Named buffers returned, by reason: Full, Push, PushTimer, Eof, Cancelled, Reset.
    pub returned: [u64; 6],
    /// Stale posts bounced by the NIC and re-posted.
    pub stale_bounces: u64,
    /// Most bytes ever queued in anonymous buffers / the driver's socket buffer.
    pub queued_high_water_bytes: u64,
    /// Most bytes the `UnboundedCopy` socket buffer ever held.
    pub copy_buffer_high_water_bytes: u64,
    /// Protocol violations by the NIC (out-of-order data, unknown buffer); should stay 0.
    pub protocol_errors: u64,
}

fn reason_index(why: ReturnReason) -> usize {
    match why {
        ReturnReason::Full => 0,
        ReturnReason::Push => 1,
        ReturnReason::PushTimer => 2,
        ReturnReason::Eof => 3,
        ReturnReason::Cancelled | ReturnReason::Stale => 4,
        ReturnReason::Reset => 5,
    }
}

#[derive(Debug)]
enum ChunkData {
    Anon(HostBuf),
    Heap(Vec<u8>),
}

#[derive(Debug)]
struct Chunk {
    data: ChunkData,
    len: usize,
    consumed: usize,
    /// Where PSH segments ended, as offsets from the chunk's start (ascending, 1..=len).
    psh_ends: Vec<u32>,
}

impl Chunk {
    /// The next PSH boundary after the consumed bytes, as a count of unconsumed bytes.
    fn bytes_to_psh(&self) -> Option<usize> {
        let at = self.consumed as u32;
        self.psh_ends
            .iter()
            .find(|&&e| e > at)
            .map(|&e| (e - at) as usize)
    }

    fn bytes<'m>(&'m self, mem: &'m HostMemory) -> &'m [u8] {
        match &self.data {
            ChunkData::Anon(b) => &mem.slice(b)[self.consumed..self.len],
            ChunkData::Heap(v) => &v[self.consumed..self.len],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Where {
    Driver,
    Nic,
    /// Held by the NIC but a stale return is known to be coming.
    Bouncing,
}

#[derive(Debug)]
struct Named {
    id: NamedId,
    buf: Option<HostBuf>,
    len: usize,
    filled: usize,
    push: bool,
    psh_seen: bool,
    at: Where,
    /// I at the time of the post (restored if the post bounces).
    i_saved: u32,
    /// The buffer charge at the time of the post (restored if the post bounces).
    charged_saved: u32,
}

/// Per-connection driver receive state.
#[derive(Debug)]
pub struct ConnRx {
    conn: ConnId,
    cfg: RxConfig,
    indicated: u32,
    accepted_unacked: u32,
    /// Size of one anonymous buffer, in bytes (for the buffer share).
    anon_len: usize,
    /// Anonymous buffers indicated and not yet acknowledged as drained: the NIC's charge.
    charged: u32,
    /// Of those, buffers already drained (released to the pool).
    drained_unacked: u32,
    /// The application declined the data it was offered (accepted 0 bytes): no new
    /// notification until more data arrives.
    declined: bool,
    chunks: VecDeque<Chunk>,
    queued_bytes: usize,
    heap_bytes: usize,
    named: VecDeque<Named>,
    completions: VecDeque<NamedCompletion>,
    received_end: u64,
    epoch: u32,
    notified: bool,
    eof: bool,
    reset: bool,
    push_deadline: Option<Instant>,
    next_named: u64,
    stats: ConnRxStats,
}

impl ConnRx {
    /// A fresh connection: I = 0, nothing queued. Anonymous buffers are `anon_len` bytes.
    pub fn new(conn: ConnId, mut cfg: RxConfig, anon_len: usize) -> Self {
        cfg.window = cfg.window.max(1);
        if cfg.policy == RxPolicy::MssHoldoff {
            cfg.ack = AckPolicy::WindowFull;
        }
        ConnRx {
            conn,
            cfg,
            indicated: 0,
            accepted_unacked: 0,
            anon_len: anon_len.max(1),
            charged: 0,
            drained_unacked: 0,
            declined: false,
            chunks: VecDeque::new(),
            queued_bytes: 0,
            heap_bytes: 0,
            named: VecDeque::new(),
            completions: VecDeque::new(),
            received_end: 0,
            epoch: 0,
            notified: false,
            eof: false,
            reset: false,
            push_deadline: None,
            next_named: 0,
            stats: ConnRxStats::default(),
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &RxConfig {
        &self.cfg
    }
    /// I: bytes indicated since the window was last reset, in bytes.
    pub fn indicated(&self) -> u32 {
        self.indicated
    }
    /// Anonymous buffers the NIC has charged to this connection as the driver sees it: those
    /// indicated and not yet acknowledged as drained.
    pub fn charged(&self) -> u32 {
        self.charged
    }
    /// Bytes received and not yet accepted or copied into a named buffer.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }
    /// Stream offset just past the last byte received from the NIC.
    pub fn received_end(&self) -> u64 {
        self.received_end
    }
    /// Named buffers posted and not yet completed.
    pub fn named_outstanding(&self) -> usize {
        self.named.len()
    }
    /// True when a named buffer is held by the NIC.
    pub fn named_at_nic(&self) -> bool {
        self.named.iter().any(|n| n.at != Where::Driver)
    }
    /// The peer closed and every byte before the FIN has been accepted or copied.
    pub fn at_eof(&self) -> bool {
        (self.eof || self.reset) && self.chunks.is_empty()
    }
    /// The peer reset the connection.
    pub fn was_reset(&self) -> bool {
        self.reset
    }
    /// Counters.
    pub fn stats(&self) -> ConnRxStats {
        self.stats
    }
    /// When `on_timer` must next be called, if ever.
    pub fn poll_at(&self) -> Option<Instant> {
        self.push_deadline
    }
    /// Take the oldest completed named buffer.
    pub fn take_completion(&mut self) -> Option<NamedCompletion> {
        self.completions.pop_front()
    }
    /// Completed named buffers waiting to be taken.
    pub fn completions_ready(&self) -> usize {
        self.completions.len()
    }

    /// Change W (takes effect for the accounting of new data; the NIC learns it at offload).
    pub fn set_window(&mut self, window: u32) {
        self.cfg.window = window.max(1);
    }

    /// IndicateData: `len` bytes at the start of anonymous buffer `buf`, first byte at stream
    /// offset `offset`; PSH segments ended at `psh_ends` (offsets in the chunk, ascending).
    #[allow(clippy::too_many_arguments)]
    pub fn on_indicate(
        &mut self,
        mem: &HostMemory,
        now: Instant,
        buf: HostBuf,
        len: usize,
        offset: u64,
        psh_ends: Vec<u32>,
        out: &mut Outputs,
    ) {
        if offset != self.received_end || len == 0 || len > buf.len() {
            self.stats.protocol_errors += 1;
            // The NIC charged the buffer to us: count it, drained at once.
            self.charged += 1;
            self.drained_unacked += 1;
            out.released.push(buf);
            return;
        }
        self.received_end += len as u64;
        self.indicated += len as u32;
        self.charged += 1;
        if self.declined {
            // New data for an application that declined the old: tell it once more.
            self.declined = false;
            self.notified = false;
        }
        self.stats.indicated_bytes += len as u64;
        self.queued_bytes += len;
        self.chunks.push_back(Chunk {
            data: ChunkData::Anon(buf),
            len,
            consumed: 0,
            psh_ends,
        });
        self.stats.queued_high_water_bytes = self
            .stats
            .queued_high_water_bytes
            .max(self.queued_bytes as u64);
        self.drain(mem, now, out);
    }

    /// NamedFilling: the NIC started placing into a push-mode buffer without PSH.
    pub fn on_named_filling(&mut self, now: Instant) {
        if let Some(head) = self.named.front() {
            if head.at == Where::Nic && head.push && self.push_deadline.is_none() {
                self.push_deadline = Some(now + self.cfg.push_timeout);
            }
        }
    }

    /// NamedDone from the NIC.
    #[allow(clippy::too_many_arguments)]
    pub fn on_named_done(
        &mut self,
        mem: &HostMemory,
        now: Instant,
        buf: HostBuf,
        filled: usize,
        end_offset: u64,
        why: ReturnReason,
        epoch: u32,
        out: &mut Outputs,
    ) {
        let Some(idx) = self.named.iter().position(|n| n.at != Where::Driver) else {
            self.stats.protocol_errors += 1;
            // Unknown buffer: it cannot be the application's, keep memory bounded anyway.
            mem.free(buf);
            return;
        };
        if why == ReturnReason::Stale {
            self.stats.stale_bounces += 1;
            self.epoch = self.epoch.max(epoch + 1);
            for n in self.named.iter_mut().skip(idx + 1) {
                if n.at == Where::Nic {
                    n.at = Where::Bouncing;
                }
            }
            let n = &mut self.named[idx];
            n.at = Where::Driver;
            n.filled = filled.min(n.len);
            n.buf = Some(buf);
            self.indicated += n.i_saved;
            n.i_saved = 0;
            self.charged += n.charged_saved;
            self.drained_unacked += n.charged_saved;
            n.charged_saved = 0;
            if idx == 0 {
                self.push_deadline = None;
            }
            self.drain(mem, now, out);
            return;
        }
        if idx != 0 || end_offset < self.received_end || filled > buf.len() {
            self.stats.protocol_errors += 1;
        }
        let placed = end_offset.saturating_sub(self.received_end);
        self.stats.placed_bytes += placed;
        self.received_end = self.received_end.max(end_offset);
        let mut n = self.named.remove(idx).expect("index from position");
        n.buf = Some(buf);
        n.filled = filled;
        self.complete(n, why, out);
        self.drain(mem, now, out);
    }

    /// PeerClosed: the NIC delivered everything before the FIN (and returned its named
    /// buffers with `Eof`).
    pub fn on_peer_closed(&mut self, mem: &HostMemory, now: Instant, out: &mut Outputs) {
        self.eof = true;
        self.drain(mem, now, out);
    }

    /// Reset: the peer reset the connection. Queued data is dropped (TCP semantics), named
    /// buffers held by the driver come back with `Reset` (the NIC returned its own already).
    pub fn on_reset(&mut self, out: &mut Outputs) {
        self.reset = true;
        self.release_all(ReturnReason::Reset, out);
    }

    /// The connection is gone (closed or aborted locally): return everything still held by the
    /// driver with `why`.
    pub fn release_all(&mut self, why: ReturnReason, out: &mut Outputs) {
        while let Some(c) = self.chunks.pop_front() {
            if let ChunkData::Anon(b) = c.data {
                out.released.push(b);
            }
        }
        self.queued_bytes = 0;
        self.heap_bytes = 0;
        self.release_named(why, out);
    }

    /// Return every named buffer held by the driver with `why` (those held by the NIC come
    /// back through the NIC).
    pub fn release_named(&mut self, why: ReturnReason, out: &mut Outputs) {
        let mut keep = VecDeque::new();
        while let Some(n) = self.named.pop_front() {
            if n.at == Where::Driver {
                self.complete(n, why, out);
            } else {
                keep.push_back(n);
            }
        }
        self.named = keep;
        self.push_deadline = None;
    }

    /// Post a named buffer of `buf.len()` bytes, optionally in push mode. Returns its id.
    pub fn post_named(
        &mut self,
        mem: &HostMemory,
        now: Instant,
        buf: HostBuf,
        push: bool,
        out: &mut Outputs,
    ) -> NamedId {
        let id = NamedId(self.next_named);
        self.next_named += 1;
        self.named.push_back(Named {
            id,
            len: buf.len(),
            buf: Some(buf),
            filled: 0,
            push,
            psh_seen: false,
            at: Where::Driver,
            i_saved: 0,
            charged_saved: 0,
        });
        self.drain(mem, now, out);
        id
    }

    /// Cancel every posted named buffer: the driver's come back now with `Cancelled`, the NIC
    /// is asked to return its own.
    pub fn cancel_named(&mut self, mem: &HostMemory, now: Instant, out: &mut Outputs) {
        if self.named.iter().any(|n| n.at == Where::Nic) {
            out.commands.push(Command::ReturnNamed {
                conn: self.conn,
                why: ReturnReason::Cancelled,
                all: true,
            });
        }
        let mut keep = VecDeque::new();
        while let Some(n) = self.named.pop_front() {
            if n.at == Where::Driver {
                self.complete(n, ReturnReason::Cancelled, out);
            } else {
                keep.push_back(n);
            }
        }
        self.named = keep;
        self.drain(mem, now, out);
    }

    /// Accept indicated data in place: `f` sees the queued bytes in order, one contiguous
    /// slice at a time, and returns how many of them it accepted (its return code); a short
    /// count stops the walk. Returns the bytes accepted. Data is offered only while no named
    /// buffer is posted and no completed one waits to be taken: otherwise the application
    /// could see bytes out of stream order.
    pub fn accept_in_place(
        &mut self,
        mem: &HostMemory,
        now: Instant,
        mut f: impl FnMut(&[u8]) -> usize,
        out: &mut Outputs,
    ) -> usize {
        if !self.named.is_empty() || !self.completions.is_empty() {
            return 0;
        }
        let mut total = 0;
        while let Some(c) = self.chunks.front_mut() {
            let avail = c.len - c.consumed;
            let n = f(c.bytes(mem)).min(avail);
            c.consumed += n;
            total += n;
            if c.consumed < c.len {
                break;
            }
            self.pop_chunk(out);
        }
        self.queued_bytes -= total;
        self.stats.accepted_bytes += total as u64;
        self.consumed_indicated(total);
        if total > 0 {
            self.notified = false;
        } else if self.notified {
            // Rule 4: one notification until the application accepts data (or returns a
            // code); a decline waits for more data instead of being notified again at once.
            self.declined = true;
        }
        self.drain(mem, now, out);
        total
    }

    /// Push timer check: call at or after [`ConnRx::poll_at`].
    pub fn on_timer(&mut self, now: Instant, out: &mut Outputs) {
        let Some(deadline) = self.push_deadline else {
            return;
        };
        if now < deadline {
            return;
        }
        self.push_deadline = None;
        let Some(head) = self.named.front() else {
            return;
        };
        match head.at {
            Where::Driver if head.filled > 0 => {
                let n = self.named.pop_front().expect("head exists");
                self.complete(n, ReturnReason::PushTimer, out);
            }
            Where::Nic => out.commands.push(Command::ReturnNamed {
                conn: self.conn,
                why: ReturnReason::PushTimer,
                all: false,
            }),
            _ => {}
        }
    }

    fn complete(&mut self, mut n: Named, why: ReturnReason, out: &mut Outputs) {
        // Only the head named buffer can be partly filled, so the timer is always its own.
        self.push_deadline = None;
        self.stats.returned[reason_index(why)] += 1;
        self.completions.push_back(NamedCompletion {
            id: n.id,
            buf: n
                .buf
                .take()
                .expect("a completed named buffer is held by the driver"),
            filled: n.filled,
            why,
            more_data: !self.chunks.is_empty(),
        });
        out.notes.push((self.conn, Note::NamedComplete));
    }

    fn pop_chunk(&mut self, out: &mut Outputs) {
        let c = self.chunks.pop_front().expect("caller checked");
        match c.data {
            ChunkData::Anon(b) => {
                self.drained_unacked += 1;
                out.released.push(b);
            }
            ChunkData::Heap(_) => self.heap_bytes -= c.len,
        }
    }

    /// Indicated bytes left the queue (accepted or copied into a named buffer).
    fn consumed_indicated(&mut self, n: usize) {
        if self.cfg.policy != RxPolicy::UnboundedCopy {
            self.accepted_unacked = self.accepted_unacked.saturating_add(n as u32);
        }
    }

    fn drain(&mut self, mem: &HostMemory, now: Instant, out: &mut Outputs) {
        if self.cfg.policy == RxPolicy::UnboundedCopy {
            self.copy_to_socket_buffer(mem, out);
        }
        self.fill_driver_named(mem, now, out);
        self.post_to_nic(out);
        if !self.chunks.is_empty() && !self.notified && self.named.is_empty() {
            self.notified = true;
            self.stats.notifications += 1;
            out.notes.push((self.conn, Note::DataAvailable));
        }
        self.maybe_ack(out);
        if (self.eof || self.reset) && self.chunks.is_empty() {
            let why = if self.reset {
                ReturnReason::Reset
            } else {
                ReturnReason::Eof
            };
            while self.named.front().is_some_and(|n| n.at == Where::Driver) {
                let n = self.named.pop_front().expect("checked");
                self.complete(n, why, out);
            }
        }
    }

    /// `UnboundedCopy`: move indicated data out of anonymous buffers into the driver's own
    /// socket buffer at once (a counted copy) and acknowledge it, up to the safety cap.
    fn copy_to_socket_buffer(&mut self, mem: &HostMemory, out: &mut Outputs) {
        let mut acked = 0u32;
        for c in self.chunks.iter_mut() {
            let ChunkData::Anon(_) = &c.data else {
                continue;
            };
            if self.heap_bytes + c.len > self.cfg.copy_cap_bytes {
                break;
            }
            let v = c.bytes(mem).to_vec();
            mem.count_host_copy(v.len());
            self.stats.copied_bytes += v.len() as u64;
            let old = std::mem::replace(&mut c.data, ChunkData::Heap(v));
            if let ChunkData::Anon(b) = old {
                self.drained_unacked += 1;
                out.released.push(b);
            }
            self.heap_bytes += c.len;
            acked += c.len as u32;
        }
        self.stats.copy_buffer_high_water_bytes = self
            .stats
            .copy_buffer_high_water_bytes
            .max(self.heap_bytes as u64);
        if acked > 0 {
            self.indicated = self.indicated.saturating_sub(acked);
            self.send_ack(acked, out);
        }
    }

    fn fill_driver_named(&mut self, mem: &HostMemory, now: Instant, out: &mut Outputs) {
        while self.named.front().is_some_and(|h| h.at == Where::Driver) {
            let mut done = None;
            while let Some(c) = self.chunks.front_mut() {
                let head = &mut self.named[0];
                let mut n = (c.len - c.consumed).min(head.len - head.filled);
                // A push-mode buffer takes bytes up to the next PSH boundary, then returns.
                if head.push {
                    if let Some(to) = c.bytes_to_psh().filter(|&to| to <= n) {
                        n = to;
                        head.psh_seen = true;
                    }
                }
                let dst = head
                    .buf
                    .as_mut()
                    .expect("driver-held named buffer has its buffer");
                match &c.data {
                    ChunkData::Anon(src) => mem.copy(src, c.consumed, dst, head.filled, n),
                    ChunkData::Heap(v) => {
                        mem.slice_mut(dst)[head.filled..head.filled + n]
                            .copy_from_slice(&v[c.consumed..c.consumed + n]);
                        mem.count_host_copy(n);
                    }
                }
                c.consumed += n;
                head.filled += n;
                let chunk_done = c.consumed == c.len;
                self.queued_bytes -= n;
                self.stats.copied_bytes += n as u64;
                self.consumed_indicated(n);
                if chunk_done {
                    self.pop_chunk(out);
                }
                let head = &self.named[0];
                if head.filled == head.len {
                    done = Some(ReturnReason::Full);
                    break;
                }
                if head.push && head.psh_seen {
                    done = Some(ReturnReason::Push);
                    break;
                }
            }
            match done {
                Some(why) => {
                    let n = self.named.pop_front().expect("head exists");
                    self.complete(n, why, out);
                }
                None => {
                    let head = &self.named[0];
                    if head.push && head.filled > 0 && self.push_deadline.is_none() {
                        self.push_deadline = Some(now + self.cfg.push_timeout);
                    }
                    break;
                }
            }
        }
    }

    fn post_to_nic(&mut self, out: &mut Outputs) {
        if self.cfg.policy == RxPolicy::UnboundedCopy
            || !self.chunks.is_empty()
            || self.eof
            || self.reset
            || self.named.iter().any(|n| n.at == Where::Bouncing)
        {
            return;
        }
        let window = self.cfg.window as usize;
        let mut first = !self.named.iter().any(|n| n.at == Where::Nic);
        for n in self.named.iter_mut() {
            match n.at {
                Where::Nic => continue,
                Where::Bouncing => return,
                Where::Driver => {}
            }
            if n.len <= window || (!first && n.filled > 0) {
                return;
            }
            n.at = Where::Nic;
            if first {
                n.i_saved = self.indicated;
                self.indicated = 0;
                self.accepted_unacked = 0;
                // Every indicated buffer is drained (no chunk queued): the NIC clears its
                // charge when it takes the post.
                n.charged_saved = self.charged;
                self.charged = 0;
                self.drained_unacked = 0;
            }
            out.commands.push(Command::PostNamed {
                conn: self.conn,
                buf: n
                    .buf
                    .take()
                    .expect("driver-held named buffer has its buffer"),
                push: n.push,
                prefill: n.filled as u32,
                stream_offset: self.received_end,
                epoch: self.epoch,
            });
            first = false;
        }
    }

    fn maybe_ack(&mut self, out: &mut Outputs) {
        if self.cfg.policy == RxPolicy::UnboundedCopy || self.named_at_nic() {
            return;
        }
        let all_taken = self.chunks.is_empty();
        let share_full = self.charged >= buffer_share(self.cfg.window, self.anon_len);
        if all_taken && (self.indicated >= self.cfg.window || share_full) {
            let n = self.indicated;
            self.indicated = 0;
            self.accepted_unacked = 0;
            self.send_ack(n, out);
            return;
        }
        if let AckPolicy::KeepOpen { min_bytes } = self.cfg.ack {
            let n = self.accepted_unacked.min(self.indicated);
            if n >= min_bytes.max(1) || (share_full && self.drained_unacked > 0) {
                self.indicated -= n;
                self.accepted_unacked -= n;
                self.send_ack(n, out);
            }
        }
    }

    /// IndicateAcknowledge of `bytes`, carrying every buffer drained since the last one.
    fn send_ack(&mut self, bytes: u32, out: &mut Outputs) {
        let bufs = self.drained_unacked;
        self.charged -= bufs;
        self.drained_unacked = 0;
        self.stats.acks_sent += 1;
        self.stats.acked_bytes += bytes as u64;
        out.commands.push(Command::IndicateAck {
            conn: self.conn,
            bytes,
            bufs,
        });
    }
}
