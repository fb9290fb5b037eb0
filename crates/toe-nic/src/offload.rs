//! The NIC's per-connection TOE state (seed 004, adapter side). Pure: no I/O, no clock.
//!
//! # Contract
//! The NIC shell owns the TCP socket. On every poll it asks [`OffloadCtx::plan`] where the next
//! received bytes go, moves at most the planned number of bytes with the DMA engine, and reports
//! what it moved with [`OffloadCtx::placed_named`] or [`OffloadCtx::indicated`]. Commands from
//! the driver come in through the `on_*` methods. Outputs are bus [`Event`]s appended to the
//! caller's queue, in the order the driver must see them.
//!
//! # Rules (DESIGN.md, "NIC side")
//! - P (`pending`) counts bytes indicated into anonymous buffers since the window was last
//!   reset. A chunk is never larger than `W - P`; at `P == W` delivery is suspended and the
//!   payload stays in the stack's receive buffer, so TCP's advertised window closes.
//! - `IndicateAck{n}`: `P -= n`, never below 0. An accepted named-buffer post: `P = 0`.
//! - Buffer share: every indication takes one anonymous buffer from the pool all connections
//!   share, whatever its length. A connection holds at most
//!   [`buffer_share`]`(W, anon_len)` of them (W rounded up to whole buffers) until the driver
//!   acknowledges drained ones (`IndicateAck{bufs}`); at the share, delivery is suspended just
//!   as at `P == W`. So a peer sending 1-byte PSH segments takes no more of the pool than a
//!   bulk sender, and a pool of `max_conns` shares never runs dry.
//! - With a named buffer held, payload goes straight into it (one copy in total); it comes
//!   back when full, on PSH in push mode, at EOF, on reset, or when the driver asks.
//! - A placement into a named buffer never crosses a PSH boundary, so a push-mode buffer
//!   comes back exactly at it. An indication may span several PSH-bounded segments and
//!   carries where each ended (`psh_ends`), so tiny PSH segments that queued up share one
//!   anonymous buffer.
//!
//! # Posts that race with indications
//! The driver posts a named buffer with the stream offset it has received up to. If the NIC
//! has delivered past that offset (indications or returned named buffers still in flight on
//! the event ring), placing into the new buffer would reorder the stream, so the NIC returns it
//! untouched with [`ReturnReason::Stale`] and refuses every post of an older epoch; the driver
//! fills it from the in-flight data and posts again. Because indications stop at `P == W`, the
//! retry converges.

use std::collections::VecDeque;

use toe_bus::{buffer_share, ConnId, Event, HostBuf, ReturnReason, RxPolicy};

/// At most this many PSH boundaries are remembered per connection; older ones are dropped
/// (PSH is a hint: losing one only delays a push-mode return to its timer).
pub const MAX_PSH_MARKS: usize = 256;

/// Where the next received bytes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Into the head named buffer at byte `at`, at most `max` bytes.
    Named {
        /// Byte position in the buffer.
        at: usize,
        /// Upper bound on bytes to place.
        max: usize,
    },
    /// Into a fresh anonymous buffer, at most `max` bytes.
    Anonymous {
        /// Upper bound on bytes to indicate.
        max: usize,
    },
    /// Nothing to deliver now (no data, or the indicate window is full).
    Hold,
}

#[derive(Debug)]
struct NicNamed {
    buf: HostBuf,
    push: bool,
    epoch: u32,
    /// Stream offset of byte 0 of the buffer; set when the buffer becomes the head.
    start: u64,
    filled: u32,
    filling_reported: bool,
}

/// Counters of one offload context. All counts only grow except `pending_bytes`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct OffloadStats {
    /// Bytes indicated into anonymous buffers.
    pub indicated_bytes: u64,
    /// IndicateData events raised.
    pub indications: u64,
    /// Bytes placed directly into named buffers.
    pub placed_bytes: u64,
    /// Times delivery was suspended because P reached W with data waiting.
    pub stalls: u64,
    /// Times delivery waited, with P < W and data waiting, because the connection held its
    /// whole buffer share (see [`buffer_share`]).
    pub buffer_stalls: u64,
    /// IndicateAck commands received.
    pub acks: u64,
    /// Named buffers accepted for placement.
    pub named_posted: u64,
    /// Named buffer posts refused as stale.
    pub named_stale: u64,
    /// Largest P seen, in bytes.
    pub max_pending_bytes: u32,
    /// Most anonymous buffers charged to the connection at once.
    pub max_charged_buffers: u32,
}

/// Per-connection TOE module state.
#[derive(Debug)]
pub struct OffloadCtx {
    conn: ConnId,
    policy: RxPolicy,
    window: u32,
    pending: u32,
    charged: u32,
    pos: u64,
    named: VecDeque<NicNamed>,
    min_epoch: u32,
    psh_marks: VecDeque<u64>,
    suspended: bool,
    stats: OffloadStats,
}

impl OffloadCtx {
    /// A context for `conn` with effective window `window` bytes (> 0). P starts at 0.
    pub fn new(conn: ConnId, policy: RxPolicy, window: u32) -> Self {
        OffloadCtx {
            conn,
            policy,
            window: window.max(1),
            pending: 0,
            charged: 0,
            pos: 0,
            named: VecDeque::new(),
            min_epoch: 0,
            psh_marks: VecDeque::new(),
            suspended: false,
            stats: OffloadStats::default(),
        }
    }

    /// P: bytes indicated and not yet acknowledged (or reset by a named buffer).
    pub fn pending(&self) -> u32 {
        self.pending
    }
    /// W in bytes.
    pub fn window(&self) -> u32 {
        self.window
    }
    /// Anonymous buffers indicated and not yet acknowledged as drained (at most
    /// [`buffer_share`]`(W, anon_len)`).
    pub fn charged(&self) -> u32 {
        self.charged
    }
    /// Set W (bytes, > 0) once the connection is established and its MSS is known. Named
    /// buffers posted during the handshake stay posted; nothing has been indicated yet.
    pub fn set_window(&mut self, window: u32) {
        self.window = window.max(1);
    }
    /// Stream offset of the next byte to deliver.
    pub fn position(&self) -> u64 {
        self.pos
    }
    /// Named buffers held.
    pub fn named_held(&self) -> usize {
        self.named.len()
    }
    /// Delivery is suspended at `P == W`.
    pub fn suspended(&self) -> bool {
        self.suspended
    }
    /// Counters.
    pub fn stats(&self) -> OffloadStats {
        let mut s = self.stats;
        s.max_pending_bytes = s.max_pending_bytes.max(self.pending);
        s
    }

    /// The head named buffer, where [`Plan::Named`] places bytes.
    pub fn head_named_mut(&mut self) -> Option<&mut HostBuf> {
        self.named.front_mut().map(|n| &mut n.buf)
    }

    /// Record that the byte before stream offset `end` closed a segment carrying PSH.
    pub fn add_psh_mark(&mut self, end: u64) {
        if end <= self.pos {
            return;
        }
        let i = self.psh_marks.partition_point(|&m| m < end);
        if self.psh_marks.get(i) == Some(&end) {
            return;
        }
        self.psh_marks.insert(i, end);
        if self.psh_marks.len() > MAX_PSH_MARKS {
            self.psh_marks.pop_back();
        }
    }

    /// Forget every PSH boundary not reached yet (the delivered stream changes meaning: an
    /// upper-layer engine takes it over).
    pub fn clear_psh_marks(&mut self) {
        self.psh_marks.clear();
    }

    fn psh_limit(&self) -> usize {
        match self.psh_marks.front() {
            Some(&m) => usize::try_from(m - self.pos).unwrap_or(usize::MAX),
            None => usize::MAX,
        }
    }

    /// Decide where up to `avail` received bytes go; anonymous buffers hold `anon_len` bytes.
    pub fn plan(&mut self, avail: usize, anon_len: usize) -> Plan {
        if avail == 0 {
            return Plan::Hold;
        }
        if let Some(head) = self.named.front() {
            let at = (self.pos - head.start) as usize;
            return Plan::Named {
                at,
                max: avail.min(self.psh_limit()).min(head.buf.len() - at),
            };
        }
        let room = match self.policy {
            RxPolicy::UnboundedCopy => usize::MAX,
            RxPolicy::IndicateWindow | RxPolicy::MssHoldoff => {
                (self.window - self.pending) as usize
            }
        };
        let share_full = self.charged >= buffer_share(self.window, anon_len);
        if room == 0 || share_full {
            if !self.suspended {
                self.suspended = true;
                if room == 0 {
                    self.stats.stalls += 1;
                } else {
                    self.stats.buffer_stalls += 1;
                }
            }
            return Plan::Hold;
        }
        self.suspended = false;
        Plan::Anonymous {
            max: avail.min(room).min(anon_len),
        }
    }

    /// Move the delivery position on by `n` bytes; PSH marks passed are dropped, and those
    /// within the `n` bytes are appended to `ends` as offsets from the old position. Returns
    /// whether the last byte ended a PSH segment.
    fn advance(&mut self, n: usize, mut ends: Option<&mut Vec<u32>>) -> bool {
        let start = self.pos;
        self.pos += n as u64;
        let mut psh = false;
        while let Some(&m) = self.psh_marks.front() {
            if m > self.pos {
                break;
            }
            if m > start {
                if let Some(e) = ends.as_deref_mut() {
                    e.push((m - start) as u32);
                }
            }
            psh |= m == self.pos;
            self.psh_marks.pop_front();
        }
        psh
    }

    /// `n` bytes were placed into the head named buffer (as planned).
    pub fn placed_named(&mut self, n: usize, out: &mut VecDeque<Event>) {
        let psh = self.advance(n, None);
        self.stats.placed_bytes += n as u64;
        let Some(head) = self.named.front_mut() else {
            return;
        };
        head.filled += n as u32;
        if head.filled as usize == head.buf.len() {
            self.return_head(ReturnReason::Full, out);
        } else if head.push && psh {
            self.return_head(ReturnReason::Push, out);
        } else if head.push && !head.filling_reported && n > 0 {
            head.filling_reported = true;
            out.push_back(Event::NamedFilling { conn: self.conn });
        }
    }

    /// `n` bytes were written at the start of anonymous buffer `buf`: raise IndicateData.
    pub fn indicated(&mut self, buf: HostBuf, n: usize, out: &mut VecDeque<Event>) {
        let stream_offset = self.pos;
        let mut psh_ends = Vec::new();
        self.advance(n, Some(&mut psh_ends));
        self.pending += n as u32;
        self.charged += 1;
        self.stats.max_pending_bytes = self.stats.max_pending_bytes.max(self.pending);
        self.stats.max_charged_buffers = self.stats.max_charged_buffers.max(self.charged);
        self.stats.indicated_bytes += n as u64;
        self.stats.indications += 1;
        out.push_back(Event::IndicateData {
            conn: self.conn,
            buf,
            len: n as u32,
            stream_offset,
            psh_ends,
        });
    }

    fn return_head(&mut self, why: ReturnReason, out: &mut VecDeque<Event>) {
        let Some(head) = self.named.pop_front() else {
            return;
        };
        out.push_back(Event::NamedDone {
            conn: self.conn,
            end_offset: head.start + head.filled as u64,
            filled: head.filled,
            buf: head.buf,
            why,
            epoch: head.epoch,
        });
        if let Some(next) = self.named.front_mut() {
            next.start = self.pos;
        }
    }

    /// IndicateAcknowledge: `P -= bytes` and the buffer charge `-= bufs`, never below 0.
    pub fn on_ack(&mut self, bytes: u32, bufs: u32) {
        self.stats.acks += 1;
        self.pending = self.pending.saturating_sub(bytes);
        self.charged = self.charged.saturating_sub(bufs);
    }

    /// PostNamedBuffer (see the module docs for `prefill`, `stream_offset` and `epoch`).
    pub fn on_post_named(
        &mut self,
        buf: HostBuf,
        push: bool,
        prefill: u32,
        stream_offset: u64,
        epoch: u32,
        out: &mut VecDeque<Event>,
    ) {
        let conn = self.conn;
        let bounce = |buf: HostBuf, out: &mut VecDeque<Event>| {
            out.push_back(Event::NamedDone {
                conn,
                buf,
                filled: prefill,
                end_offset: stream_offset,
                why: ReturnReason::Stale,
                epoch,
            });
        };
        let fits = (prefill as usize) < buf.len();
        if epoch < self.min_epoch || !fits {
            self.stats.named_stale += 1;
            self.min_epoch = self.min_epoch.max(epoch + 1);
            bounce(buf, out);
            return;
        }
        if !self.named.is_empty() {
            if prefill != 0 {
                self.stats.named_stale += 1;
                self.min_epoch = epoch + 1;
                bounce(buf, out);
                return;
            }
            self.stats.named_posted += 1;
            self.named.push_back(NicNamed {
                buf,
                push,
                epoch,
                start: 0,
                filled: 0,
                filling_reported: false,
            });
            return;
        }
        if stream_offset != self.pos {
            self.stats.named_stale += 1;
            self.min_epoch = epoch + 1;
            bounce(buf, out);
            return;
        }
        self.stats.named_posted += 1;
        // The driver posts only once it drained every indicated buffer into the named one.
        self.pending = 0;
        self.charged = 0;
        self.suspended = false;
        self.named.push_back(NicNamed {
            buf,
            push,
            epoch,
            start: self.pos - prefill as u64,
            filled: prefill,
            filling_reported: prefill > 0,
        });
    }

    /// The driver asks for the head named buffer (or all of them) back. A push-timer return of
    /// an empty head is ignored: the buffer that started the timer has already come back.
    pub fn on_return_named(&mut self, why: ReturnReason, all: bool, out: &mut VecDeque<Event>) {
        if why == ReturnReason::PushTimer && self.named.front().is_some_and(|h| h.filled == 0) {
            return;
        }
        self.return_head(why, out);
        if all {
            self.return_all(why, out);
        }
    }

    /// Return every held named buffer with `why` (EOF, reset, abort).
    pub fn return_all(&mut self, why: ReturnReason, out: &mut VecDeque<Event>) {
        while !self.named.is_empty() {
            self.return_head(why, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use toe_bus::HostMemory;

    fn ctx(w: u32) -> (OffloadCtx, HostMemory, VecDeque<Event>) {
        (
            OffloadCtx::new(ConnId(1), RxPolicy::IndicateWindow, w),
            HostMemory::anonymous(1 << 20).unwrap(),
            VecDeque::new(),
        )
    }

    #[test]
    fn never_indicates_past_w_and_ack_reopens() {
        let (mut c, mem, mut out) = ctx(1000);
        assert_eq!(c.plan(5000, 600), Plan::Anonymous { max: 600 });
        c.indicated(mem.alloc(600).unwrap(), 600, &mut out);
        assert_eq!(c.plan(4400, 600), Plan::Anonymous { max: 400 });
        c.indicated(mem.alloc(600).unwrap(), 400, &mut out);
        assert_eq!(c.pending(), 1000);
        assert_eq!(c.plan(4000, 600), Plan::Hold);
        assert_eq!(c.plan(4000, 600), Plan::Hold);
        assert_eq!(c.stats().stalls, 1, "one stall per suspension");
        c.on_ack(300, 1);
        assert_eq!(c.plan(4000, 600), Plan::Anonymous { max: 300 });
        c.on_ack(5000, 5);
        assert_eq!(c.pending(), 0, "never below zero");
    }

    #[test]
    fn named_post_resets_p_and_places_after_prefill() {
        let (mut c, mem, mut out) = ctx(1000);
        c.indicated(mem.alloc(1000).unwrap(), 1000, &mut out);
        out.clear();
        c.on_post_named(mem.alloc(4000).unwrap(), false, 1000, 1000, 0, &mut out);
        assert!(out.is_empty());
        assert_eq!(c.pending(), 0);
        assert_eq!(
            c.plan(10_000, 600),
            Plan::Named {
                at: 1000,
                max: 3000
            }
        );
        c.placed_named(3000, &mut out);
        match out.pop_front() {
            Some(Event::NamedDone {
                filled,
                end_offset,
                why,
                ..
            }) => assert_eq!((filled, end_offset, why), (4000, 4000, ReturnReason::Full)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn stale_post_bounces_with_all_older_epochs() {
        let (mut c, mem, mut out) = ctx(1000);
        c.indicated(mem.alloc(500).unwrap(), 500, &mut out);
        out.clear();
        // the driver has seen nothing yet (offset 0) but the NIC is at 500
        c.on_post_named(mem.alloc(4000).unwrap(), false, 0, 0, 0, &mut out);
        assert!(matches!(
            out.pop_front(),
            Some(Event::NamedDone {
                why: ReturnReason::Stale,
                ..
            })
        ));
        // a second post of the same epoch, even at the right offset, bounces too
        c.on_post_named(mem.alloc(4000).unwrap(), false, 0, 500, 0, &mut out);
        assert!(matches!(
            out.pop_front(),
            Some(Event::NamedDone {
                why: ReturnReason::Stale,
                ..
            })
        ));
        c.on_post_named(mem.alloc(4000).unwrap(), false, 0, 500, 1, &mut out);
        assert!(out.is_empty());
        assert_eq!(c.named_held(), 1);
    }

    #[test]
    fn psh_bounds_a_chunk_and_returns_push_buffer() {
        let (mut c, mem, mut out) = ctx(1000);
        c.on_post_named(mem.alloc(4000).unwrap(), true, 0, 0, 0, &mut out);
        c.add_psh_mark(100);
        assert_eq!(c.plan(300, 600), Plan::Named { at: 0, max: 100 });
        c.placed_named(100, &mut out);
        match out.pop_front() {
            Some(Event::NamedDone { filled, why, .. }) => {
                assert_eq!((filled, why), (100, ReturnReason::Push))
            }
            other => panic!("{other:?}"),
        }
        // without PSH, a push-mode buffer reports filling once so the driver starts its timer
        c.on_post_named(mem.alloc(4000).unwrap(), true, 0, 100, 0, &mut out);
        c.placed_named(50, &mut out);
        c.placed_named(50, &mut out);
        assert!(matches!(out.pop_front(), Some(Event::NamedFilling { .. })));
        assert!(out.is_empty());
        c.on_return_named(ReturnReason::PushTimer, false, &mut out);
        match out.pop_front() {
            Some(Event::NamedDone {
                filled,
                why,
                end_offset,
                ..
            }) => assert_eq!(
                (filled, why, end_offset),
                (100, ReturnReason::PushTimer, 200)
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unbounded_copy_ignores_w() {
        let mut c = OffloadCtx::new(ConnId(1), RxPolicy::UnboundedCopy, 10);
        let mem = HostMemory::anonymous(1 << 16).unwrap();
        let mut out = VecDeque::new();
        for _ in 0..10 {
            assert_eq!(c.plan(1 << 20, 1000), Plan::Anonymous { max: 1000 });
            c.indicated(mem.alloc(1000).unwrap(), 1000, &mut out);
            // the unbounded-copy driver copies at once and hands the buffer back
            c.on_ack(1000, 1);
        }
        assert_eq!(c.stats().stalls, 0);
        // ... but even without a window, a connection that keeps its buffers is held at its
        // share (here 1 buffer: W = 10 bytes)
        c.indicated(mem.alloc(1000).unwrap(), 1000, &mut out);
        assert_eq!(c.plan(1 << 20, 1000), Plan::Hold);
    }

    #[test]
    fn tiny_psh_segments_never_take_more_than_the_buffer_share() {
        // W = 64 KiB over 16 KiB buffers: a share of 4 buffers, whatever the segment sizes.
        let (mut c, mem, mut out) = ctx(64 * 1024);
        let mut indicated = 0;
        for end in 1..=100u64 {
            c.add_psh_mark(end);
        }
        // one segment per poll: one buffer each, until the share is used up
        while let Plan::Anonymous { max } = c.plan(1, 16 * 1024) {
            assert_eq!(max, 1);
            c.indicated(mem.alloc(16 * 1024).unwrap(), max, &mut out);
            indicated += 1;
        }
        assert_eq!(indicated, 4);
        assert_eq!(c.charged(), 4);
        assert!(c.suspended());
        assert_eq!((c.stats().stalls, c.stats().buffer_stalls), (0, 1));
        // the driver drained two of them: two more may be indicated, and segments that
        // queued up meanwhile share one buffer, which says where each PSH segment ended
        c.on_ack(0, 2);
        assert_eq!(c.plan(96, 16 * 1024), Plan::Anonymous { max: 96 });
        out.clear();
        c.indicated(mem.alloc(16 * 1024).unwrap(), 96, &mut out);
        match out.pop_front() {
            Some(Event::IndicateData { psh_ends, .. }) => {
                assert_eq!(psh_ends, (1..=96).collect::<Vec<u32>>())
            }
            other => panic!("{other:?}"),
        }
        // a named post (everything drained first) clears the charge
        c.on_post_named(mem.alloc(200).unwrap(), false, 0, 100, 0, &mut out);
        assert_eq!(c.charged(), 0);
    }
}
