//! The NIC's socket table: one smoltcp [`SocketSet`] per TCP socket, so that no stack call
//! walks more than one socket.
//!
//! smoltcp's `Interface` takes the socket set as an argument of every call, and each call
//! walks the whole set: ingress looks for the socket that accepts a segment by trying each in
//! turn, egress visits every socket, `poll_at` asks every socket. With 10,000 offloaded
//! connections that is 10,000 visits per frame and per poll. Here every socket lives in a set
//! of its own ("shards of one"), and the NIC decides which set a call gets:
//!
//! - ingress: the receive tap has already parsed the frame, so its flow picks the socket
//!   (a flow table kept here; a SYN without a flow goes to a listening socket of its port;
//!   anything else goes to an empty set, where smoltcp answers as for no socket: RST);
//! - egress and service: only sockets marked dirty (a frame, a command, a due timer);
//! - deadlines: each socket's `poll_at` is recomputed when it was touched and kept in a heap.
//!   A deadline that moves later does not touch the heap: the socket's earlier entry stays
//!   and, when it comes up, is pushed again at the real deadline (a TCP retransmission timer
//!   restarts on every ACK, so this saves a push per ACK). A deadline that moves earlier
//!   pushes a new entry and the old one goes stale; stale entries are skipped, and the heap
//!   is rebuilt when they could outnumber the live ones, so it stays within a small factor
//!   of the socket count.
//!
//! No smoltcp change is needed; every walk becomes a walk over one socket.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use smoltcp::iface::{Interface, PollResult, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use toe_bus::ConnId;

use crate::phy::FlowKey;

/// Index of a socket in the table (reused after removal).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct SockId(u32);

#[cfg(test)]
impl SockId {
    /// The ID of slot `i` (tests of other modules).
    pub(crate) fn from_raw(i: u32) -> Self {
        SockId(i)
    }
}

/// Who a socket belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Owner {
    /// An offloaded connection (connecting or open).
    Conn(ConnId),
    /// The backlog of the listener on this port (listening, half-open, or established and
    /// waiting for a connection slot).
    Backlog(u16),
}

/// The SYN-ACK of a half-open socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SynAck {
    /// No egress since the socket took its SYN.
    NotTried,
    /// Egress ran and nothing went out: the peer's address does not resolve (yet).
    Unresolved,
    /// It went out at this time.
    Sent(Instant),
}

struct Slot {
    set: SocketSet<'static>,
    handle: SocketHandle,
    owner: Owner,
    flow: Option<FlowKey>,
    /// The socket's next deadline, if any.
    deadline: Option<Instant>,
    /// The heap entry that stands for this socket, if any. Invariant: when `deadline` is
    /// set, `queued` is set and not later than it.
    queued: Option<Instant>,
    /// Whether this socket's SYN-ACK went out (only meaningful in SYN-RECEIVED).
    syn_ack: SynAck,
    dirty: bool,
    /// Under the NIC's egress shaper ([`crate::shape`]).
    paced: bool,
    /// In the shaper's queue (its entry there is live).
    waiting: bool,
    /// Stamp order (lower: older): set when the socket is made and again by
    /// [`Sockets::stamp`]; the NIC stamps a backlog socket when it takes a SYN, so the
    /// oldest half-open one is the one with the lowest stamp.
    seq: u64,
}

/// The socket table. See the module documentation.
pub(crate) struct Sockets {
    slots: Vec<Option<Slot>>,
    free: Vec<u32>,
    live: usize,
    dirty: Vec<SockId>,
    heap: BinaryHeap<Reverse<(Instant, u32)>>,
    by_flow: HashMap<FlowKey, SockId>,
    /// The set that segments of no socket are processed against (smoltcp answers RST).
    empty: SocketSet<'static>,
    seq: u64,
}

impl Sockets {
    pub(crate) fn new() -> Self {
        Sockets {
            slots: Vec::new(),
            free: Vec::new(),
            live: 0,
            dirty: Vec::new(),
            heap: BinaryHeap::new(),
            by_flow: HashMap::new(),
            empty: SocketSet::new(Vec::new()),
            seq: 0,
        }
    }

    /// Sockets in the table.
    pub(crate) fn len(&self) -> usize {
        self.live
    }

    /// Add `socket` for `owner`; it starts dirty (its first egress and deadline are due).
    pub(crate) fn add(&mut self, socket: tcp::Socket<'static>, owner: Owner) -> SockId {
        let mut set = SocketSet::new(Vec::with_capacity(1));
        let handle = set.add(socket);
        self.seq += 1;
        let slot = Slot {
            set,
            handle,
            owner,
            flow: None,
            deadline: None,
            queued: None,
            syn_ack: SynAck::NotTried,
            dirty: false,
            paced: false,
            waiting: false,
            seq: self.seq,
        };
        let id = match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = Some(slot);
                SockId(i)
            }
            None => {
                self.slots.push(Some(slot));
                SockId(self.slots.len() as u32 - 1)
            }
        };
        self.live += 1;
        self.mark(id);
        id
    }

    /// Remove a socket and its flow binding.
    pub(crate) fn remove(&mut self, id: SockId) {
        if let Some(slot) = self.slots.get_mut(id.0 as usize).and_then(Option::take) {
            if let Some(k) = slot.flow {
                if self.by_flow.get(&k) == Some(&id) {
                    self.by_flow.remove(&k);
                }
            }
            self.free.push(id.0);
            self.live -= 1;
        }
    }

    /// Put backlog socket `id` back to LISTEN on `port`, with the buffers it has (nothing is
    /// allocated: recycling a flood's half-open sockets must cost no more than dropping its
    /// SYNs). Its flow binding, stamp of SYN-ACK and deadline go; the socket leaves its set
    /// and comes back in, so smoltcp's per-socket egress state goes too (a neighbour the old
    /// peer's SYN-ACK was waiting for would otherwise hold the next SYN-ACK silent for up
    /// to a second). Returns false, leaving the socket closed, if it cannot listen.
    pub(crate) fn relisten(&mut self, id: SockId, port: u16) -> bool {
        let s = self.slot_mut(id);
        #[allow(unreachable_patterns)] // other socket kinds exist only with other features
        let mut socket = match s.set.remove(s.handle) {
            smoltcp::socket::Socket::Tcp(t) => t,
            _ => unreachable!("the toemu socket table holds TCP sockets only"),
        };
        socket.abort();
        let listening = socket.listen(port).is_ok();
        s.handle = s.set.add(socket);
        s.syn_ack = SynAck::NotTried;
        s.deadline = None;
        if let Some(k) = s.flow.take() {
            if self.by_flow.get(&k) == Some(&id) {
                self.by_flow.remove(&k);
            }
        }
        listening
    }

    fn slot(&self, id: SockId) -> &Slot {
        self.slots[id.0 as usize].as_ref().expect("live socket id")
    }
    fn slot_mut(&mut self, id: SockId) -> &mut Slot {
        self.slots[id.0 as usize].as_mut().expect("live socket id")
    }

    /// Whether `id` names a live socket.
    pub(crate) fn contains(&self, id: SockId) -> bool {
        self.slots.get(id.0 as usize).is_some_and(Option::is_some)
    }

    /// The TCP socket `id`.
    pub(crate) fn get(&self, id: SockId) -> &tcp::Socket<'static> {
        let s = self.slot(id);
        s.set.get::<tcp::Socket<'static>>(s.handle)
    }
    /// The TCP socket `id`, mutably.
    pub(crate) fn get_mut(&mut self, id: SockId) -> &mut tcp::Socket<'static> {
        let s = self.slot_mut(id);
        s.set.get_mut::<tcp::Socket<'static>>(s.handle)
    }

    /// Owner of `id`.
    pub(crate) fn owner(&self, id: SockId) -> Owner {
        self.slot(id).owner
    }
    /// Change the owner of `id` (a backlog socket promoted to a connection).
    pub(crate) fn set_owner(&mut self, id: SockId, owner: Owner) {
        self.slot_mut(id).owner = owner;
    }
    /// Stamp of `id` (lower: older).
    pub(crate) fn seq(&self, id: SockId) -> u64 {
        self.slot(id).seq
    }
    /// Whether half-open socket `id` sent its SYN-ACK (see [`Sockets::egress`]).
    pub(crate) fn syn_ack(&self, id: SockId) -> SynAck {
        self.slot(id).syn_ack
    }

    /// Give `id` the newest stamp.
    pub(crate) fn stamp(&mut self, id: SockId) {
        self.seq += 1;
        let seq = self.seq;
        self.slot_mut(id).seq = seq;
    }

    /// Route segments of `key` to `id` from now on.
    pub(crate) fn bind_flow(&mut self, id: SockId, key: FlowKey) {
        self.slot_mut(id).flow = Some(key);
        self.by_flow.insert(key, id);
    }
    /// The socket segments of `key` go to.
    pub(crate) fn by_flow(&self, key: &FlowKey) -> Option<SockId> {
        self.by_flow.get(key).copied()
    }
    /// The flow bound to `id`.
    pub(crate) fn flow(&self, id: SockId) -> Option<FlowKey> {
        self.slot(id).flow
    }

    /// `id` needs service and egress at the next round.
    pub(crate) fn mark(&mut self, id: SockId) {
        if let Some(s) = self.slots.get_mut(id.0 as usize).and_then(Option::as_mut) {
            if !s.dirty {
                s.dirty = true;
                self.dirty.push(id);
            }
        }
    }

    /// Mark every socket dirty (after an ARP frame: sockets waiting for a neighbour may go on
    /// earlier than their deadline says). O(sockets), and only on non-IP frames.
    pub(crate) fn mark_all(&mut self) {
        for i in 0..self.slots.len() as u32 {
            self.mark(SockId(i));
        }
    }

    /// Whether any socket is dirty.
    pub(crate) fn any_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// Mark every socket whose deadline is due at `now`.
    pub(crate) fn mark_due(&mut self, now: Instant) {
        while let Some(&Reverse((t, i))) = self.heap.peek() {
            if t > now {
                break;
            }
            self.heap.pop();
            let Some(s) = self.slots.get_mut(i as usize).and_then(Option::as_mut) else {
                continue;
            };
            if s.queued != Some(t) {
                continue; // stale
            }
            s.queued = None;
            match s.deadline {
                Some(d) if d <= now => {
                    s.deadline = None;
                    self.mark(SockId(i));
                }
                // The deadline moved later: the entry goes back in at it (past `now`, so
                // this loop does not meet it again).
                Some(d) => {
                    s.queued = Some(d);
                    self.heap.push(Reverse((d, i)));
                }
                None => {}
            }
        }
    }

    /// Take the dirty list (in the order sockets were marked); their marks are cleared.
    pub(crate) fn take_dirty(&mut self, into: &mut Vec<SockId>) {
        into.clear();
        std::mem::swap(into, &mut self.dirty);
        for &id in into.iter() {
            if let Some(s) = self.slots.get_mut(id.0 as usize).and_then(Option::as_mut) {
                s.dirty = false;
            }
        }
    }

    /// The earliest live deadline (stale heap entries are dropped on the way).
    pub(crate) fn next_deadline(&mut self) -> Option<Instant> {
        while let Some(&Reverse((t, i))) = self.heap.peek() {
            let Some(s) = self
                .slots
                .get_mut(i as usize)
                .and_then(Option::as_mut)
                .filter(|s| s.queued == Some(t))
            else {
                self.heap.pop(); // stale
                continue;
            };
            if s.deadline == Some(t) {
                return Some(t);
            }
            // The entry stands for a deadline that moved later or went away: put it where
            // it belongs, so that the answer is exact.
            self.heap.pop();
            s.queued = s.deadline;
            if let Some(d) = s.deadline {
                self.heap.push(Reverse((d, i)));
            }
        }
        None
    }

    /// Process the frame the device holds against socket `target` (or against no socket).
    pub(crate) fn ingress<D: smoltcp::phy::Device>(
        &mut self,
        iface: &mut Interface,
        dev: &mut D,
        now: Instant,
        target: Option<SockId>,
    ) {
        let set = match target {
            Some(id) => &mut self.slot_mut(id).set,
            None => &mut self.empty,
        };
        iface.poll_ingress_single(now, dev, set);
    }

    /// Whether `id` is under the egress shaper.
    pub(crate) fn paced(&self, id: SockId) -> bool {
        self.slot(id).paced
    }
    /// Put `id` under the egress shaper or take it out.
    pub(crate) fn set_paced(&mut self, id: SockId, on: bool) {
        self.slot_mut(id).paced = on;
    }
    /// Whether `id` waits in the shaper's queue.
    pub(crate) fn waiting(&self, id: SockId) -> bool {
        self.contains(id) && self.slot(id).waiting
    }
    /// Record that `id` waits in the shaper's queue (true) or left it (false). While it
    /// waits it has no deadline: its turn is when it is served (timers included).
    pub(crate) fn set_waiting(&mut self, id: SockId, on: bool) {
        if let Some(s) = self.slots.get_mut(id.0 as usize).and_then(Option::as_mut) {
            s.waiting = on;
        }
        if on {
            self.set_deadline(id, None);
        }
    }

    /// One egress step of socket `id` at `now` (at most one segment). Returns true if
    /// something went out. Call [`Sockets::settle`] after the last step.
    pub(crate) fn egress_step<D: smoltcp::phy::Device>(
        &mut self,
        iface: &mut Interface,
        dev: &mut D,
        now: Instant,
        id: SockId,
    ) -> bool {
        let s = self.slot_mut(id);
        iface.poll_egress(now, dev, &mut s.set) == PollResult::SocketStateChanged
    }

    /// Whether socket `id` has something to send at `now` (smoltcp would send it).
    pub(crate) fn wants_egress(&self, iface: &mut Interface, now: Instant, id: SockId) -> bool {
        iface
            .poll_at(now, &self.slot(id).set)
            .is_some_and(|t| t <= now)
    }

    /// Register socket `id`'s next deadline after egress.
    pub(crate) fn settle(&mut self, iface: &mut Interface, now: Instant, id: SockId) {
        let at = iface.poll_at(now, &self.slot(id).set);
        self.set_deadline(id, at);
    }

    /// Transmit what socket `id` has to send at `now`, then register its next deadline.
    /// Returns true if a frame went out. A half-open socket's SYN-ACK is tracked
    /// ([`Sockets::syn_ack`]).
    pub(crate) fn egress<D: smoltcp::phy::Device>(
        &mut self,
        iface: &mut Interface,
        dev: &mut D,
        now: Instant,
        id: SockId,
    ) -> bool {
        let mut sent = false;
        while self.egress_step(iface, dev, now, id) {
            sent = true;
        }
        let s = self.slot_mut(id);
        // Only backlog sockets are half-open; offloaded connections skip the state lookup.
        if matches!(s.owner, Owner::Backlog(_))
            && s.set.get::<tcp::Socket<'_>>(s.handle).state() == tcp::State::SynReceived
        {
            s.syn_ack = match (s.syn_ack, sent) {
                (SynAck::Sent(t), _) => SynAck::Sent(t),
                (_, true) => SynAck::Sent(now),
                (_, false) => SynAck::Unresolved,
            };
        }
        self.settle(iface, now, id);
        sent
    }

    /// Register `at` as the deadline of `id` (replacing its previous one, whose heap entry
    /// goes stale). The heap is rebuilt from the live deadlines when stale entries could
    /// outnumber them.
    fn set_deadline(&mut self, id: SockId, at: Option<Instant>) {
        let s = self.slot_mut(id);
        s.deadline = at;
        match (at, s.queued) {
            // The queued entry comes up first and is re-pushed then (or dropped if the
            // deadline went away).
            (None, _) => {}
            (Some(t), Some(q)) if q <= t => {}
            (Some(t), _) => {
                s.queued = Some(t);
                self.heap.push(Reverse((t, id.0)));
                if self.heap.len() > 2 * self.live + 64 {
                    self.rebuild_heap();
                }
            }
        }
    }

    fn rebuild_heap(&mut self) {
        let mut heap = Vec::with_capacity(self.live);
        for (i, s) in self.slots.iter_mut().enumerate() {
            if let Some(s) = s {
                s.queued = s.deadline;
                if let Some(d) = s.deadline {
                    heap.push(Reverse((d, i as u32)));
                }
            }
        }
        self.heap = heap.into();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nic::make_socket;

    fn sock() -> tcp::Socket<'static> {
        make_socket(1024, 1024, None, crate::nic::Congestion::None)
    }

    #[test]
    fn ids_are_reused_and_flows_unbound_on_removal() {
        let mut t = Sockets::new();
        let a = t.add(sock(), Owner::Backlog(80));
        let b = t.add(sock(), Owner::Backlog(80));
        let key = FlowKey {
            remote_ip: std::net::Ipv4Addr::new(10, 0, 0, 2),
            remote_port: 1234,
            local_port: 80,
        };
        t.bind_flow(a, key);
        assert_eq!(t.by_flow(&key), Some(a));
        t.remove(a);
        assert_eq!(t.by_flow(&key), None);
        assert!(!t.contains(a));
        let c = t.add(sock(), Owner::Conn(ConnId(7)));
        assert_eq!(c, a, "a freed slot is reused");
        assert_eq!(t.len(), 2);
        assert!(t.seq(c) > t.seq(b), "stamps follow creation");
        t.stamp(b);
        assert!(t.seq(b) > t.seq(c), "a new stamp is the newest");
    }

    #[test]
    fn marks_are_deduplicated_and_cleared_when_taken() {
        let mut t = Sockets::new();
        let a = t.add(sock(), Owner::Backlog(80));
        let b = t.add(sock(), Owner::Backlog(80));
        t.mark(a);
        t.mark(b);
        t.mark(a);
        let mut d = Vec::new();
        t.take_dirty(&mut d);
        assert_eq!(d, vec![a, b]);
        assert!(!t.any_dirty());
        t.mark(b);
        t.take_dirty(&mut d);
        assert_eq!(d, vec![b]);
    }

    #[test]
    fn stale_deadlines_are_skipped_and_the_heap_stays_bounded() {
        let mut t = Sockets::new();
        let a = t.add(sock(), Owner::Backlog(80));
        let mut d = Vec::new();
        t.take_dirty(&mut d);
        // Move a's deadline many times: only the latest counts, and stale entries are
        // compacted away.
        for k in 0..1000 {
            t.set_deadline(a, Some(Instant::from_millis(10_000 - k)));
        }
        assert!(t.heap.len() <= 2 * t.live + 64);
        assert_eq!(t.next_deadline(), Some(Instant::from_millis(9_001)));
        t.mark_due(Instant::from_millis(9_000));
        assert!(!t.any_dirty(), "not due yet");
        t.mark_due(Instant::from_millis(9_001));
        t.take_dirty(&mut d);
        assert_eq!(d, vec![a]);
        assert_eq!(t.next_deadline(), None, "a fired deadline is gone");
    }

    #[test]
    fn a_deadline_moved_later_fires_at_its_new_time_without_a_push_per_move() {
        let mut t = Sockets::new();
        let a = t.add(sock(), Owner::Backlog(80));
        let b = t.add(sock(), Owner::Backlog(80));
        let mut d = Vec::new();
        t.take_dirty(&mut d);
        t.set_deadline(b, Some(Instant::from_millis(50)));
        // A retransmission timer restarted on every ACK: later and later.
        for k in 0..100 {
            t.set_deadline(a, Some(Instant::from_millis(10 + k)));
        }
        assert_eq!(t.heap.len(), 2, "one entry per socket");
        // Exact even though a's entry still says 10 ms.
        assert_eq!(t.next_deadline(), Some(Instant::from_millis(50)));
        t.mark_due(Instant::from_millis(60));
        t.take_dirty(&mut d);
        assert_eq!(d, vec![b], "a is not due before 109 ms");
        assert_eq!(t.next_deadline(), Some(Instant::from_millis(109)));
        // Moved earlier again: a new entry, found first.
        t.set_deadline(a, Some(Instant::from_millis(70)));
        assert_eq!(t.next_deadline(), Some(Instant::from_millis(70)));
        // Cancelled: no deadline left, and due marks nothing.
        t.set_deadline(a, None);
        assert_eq!(t.next_deadline(), None);
        t.mark_due(Instant::from_millis(1_000));
        assert!(!t.any_dirty());
        // Set again after a cancel.
        t.set_deadline(a, Some(Instant::from_millis(1_500)));
        t.mark_due(Instant::from_millis(1_500));
        t.take_dirty(&mut d);
        assert_eq!(d, vec![a]);
    }
}
