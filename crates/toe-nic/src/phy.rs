//! Physical layer: frame ports, the in-memory wire, and the NIC's receive tap.
//!
//! A [`Phy`] moves whole Ethernet frames. [`wire`] makes two connected in-memory ports (bounded
//! queues, lossless: a full queue refuses the send and smoltcp retries later). [`NicDevice`]
//! adapts any `Phy` to smoltcp and, on the way in, validates every frame (lengths, IPv4 and TCP
//! checksums: the NIC's checksum offload), drops and counts bad ones, and records per flow
//! what smoltcp does not surface: the peer's initial sequence number, the end of every segment
//! that carried PSH, and the window the peer advertises.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::Ipv4Addr;

use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};
use smoltcp::phy::{self, Checksum, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use smoltcp::wire::{
    EthernetFrame, EthernetProtocol, IpAddress, IpProtocol, Ipv4Packet, TcpPacket,
};

/// One Ethernet frame.
pub type Frame = Vec<u8>;

thread_local! {
    /// Frames consumed on this thread, kept for the next transmit (see [`take_frame`]).
    static FRAME_POOL: std::cell::RefCell<Vec<Frame>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Most frames a thread keeps for reuse (about 9 MiB at a 9000-byte MTU).
pub const FRAME_POOL_MAX: usize = 1024;

/// A zeroed frame of `len` bytes, reusing one consumed earlier on this thread if there is one.
/// Reuse spares the allocator the churn of one allocation per frame, which at high frame
/// rates (many connections filling a wire) made the heap grow and shrink and every frame a
/// first touch of fresh pages.
pub fn take_frame(len: usize) -> Frame {
    match FRAME_POOL.with(|p| p.borrow_mut().pop()) {
        Some(mut f) => {
            f.clear();
            f.resize(len, 0);
            f
        }
        None => vec![0; len],
    }
}

/// Give a consumed frame back for reuse by [`take_frame`] (dropped if the pool is full).
pub fn recycle_frame(f: Frame) {
    FRAME_POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < FRAME_POOL_MAX {
            p.push(f);
        }
    });
}

/// A frame port. Time comes in as an argument (virtual or real), so that middleware such as
/// an impairment model can hold frames and release them later, reproducibly.
pub trait Phy {
    /// Next received frame due at `now`, if any.
    fn recv(&mut self, now: Instant) -> Option<Frame>;
    /// Send a frame at `now`; gives it back if the port cannot take it now.
    fn send(&mut self, now: Instant, frame: Frame) -> Result<(), Frame>;
    /// Whether a send would be accepted now.
    fn can_send(&self) -> bool;
    /// A channel that becomes ready when a frame arrives, for runtimes that sleep until
    /// there is work; `None` if the port cannot offer one (the runtime then polls).
    fn waitable(&self) -> Option<Receiver<Frame>> {
        None
    }
    /// The earliest time a frame this port holds becomes deliverable (middleware that delays
    /// frames); `None` if it holds none.
    fn poll_at(&self) -> Option<Instant> {
        None
    }
}

impl<P: Phy + ?Sized> Phy for Box<P> {
    fn recv(&mut self, now: Instant) -> Option<Frame> {
        (**self).recv(now)
    }
    fn send(&mut self, now: Instant, frame: Frame) -> Result<(), Frame> {
        (**self).send(now, frame)
    }
    fn poll_at(&self) -> Option<Instant> {
        (**self).poll_at()
    }
    fn can_send(&self) -> bool {
        (**self).can_send()
    }
    fn waitable(&self) -> Option<Receiver<Frame>> {
        (**self).waitable()
    }
}

/// One end of an in-memory wire.
#[derive(Debug, Clone)]
pub struct WirePort {
    tx: Sender<Frame>,
    rx: Receiver<Frame>,
}

impl WirePort {
    /// The receiver of this port, for runtimes that wait on it.
    pub fn receiver(&self) -> &Receiver<Frame> {
        &self.rx
    }
}

/// Two connected ports; each direction queues at most `depth` frames.
pub fn wire(depth: usize) -> (WirePort, WirePort) {
    let (a_tx, b_rx) = bounded(depth);
    let (b_tx, a_rx) = bounded(depth);
    (
        WirePort { tx: a_tx, rx: a_rx },
        WirePort { tx: b_tx, rx: b_rx },
    )
}

impl Phy for WirePort {
    fn recv(&mut self, _now: Instant) -> Option<Frame> {
        self.rx.try_recv().ok()
    }
    fn send(&mut self, _now: Instant, frame: Frame) -> Result<(), Frame> {
        match self.tx.try_send(frame) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(f)) => Err(f),
            // The far end is gone: the frame is lost, as on a cut cable.
            Err(TrySendError::Disconnected(_)) => Ok(()),
        }
    }
    fn can_send(&self) -> bool {
        !self.tx.is_full()
    }
    fn waitable(&self) -> Option<Receiver<Frame>> {
        Some(self.rx.clone())
    }
}

/// An in-memory Ethernet switch of `ports` ports, each egress queue holding at most
/// `depth` frames: a frame goes to the port its destination MAC was last seen on (learned
/// from source addresses), or to every other port (broadcast, or not learned yet). Like
/// [`wire`] it is lossless for unicast: a port reports it cannot send while any other
/// port's queue is full. Flooded frames that find a queue full are lost there. The
/// [`SwitchControl`] cuts a port's cable and mends it.
pub fn switch(ports: usize, depth: usize) -> (Vec<SwitchPort>, SwitchControl) {
    let (txs, rxs): (Vec<_>, Vec<_>) = (0..ports).map(|_| bounded(depth)).unzip();
    let core = std::sync::Arc::new(std::sync::Mutex::new(SwitchCore {
        txs,
        macs: BTreeMap::new(),
        cut: vec![false; ports],
    }));
    let ports = rxs
        .into_iter()
        .enumerate()
        .map(|(i, rx)| SwitchPort {
            index: i,
            rx,
            core: core.clone(),
        })
        .collect();
    (ports, SwitchControl { core })
}

#[derive(Debug)]
struct SwitchCore {
    txs: Vec<Sender<Frame>>,
    macs: BTreeMap<[u8; 6], usize>,
    cut: Vec<bool>,
}

/// One port of a [`switch`].
#[derive(Debug)]
pub struct SwitchPort {
    index: usize,
    rx: Receiver<Frame>,
    core: std::sync::Arc<std::sync::Mutex<SwitchCore>>,
}

/// Cuts and mends the cables of a [`switch`]'s ports.
#[derive(Debug, Clone)]
pub struct SwitchControl {
    core: std::sync::Arc<std::sync::Mutex<SwitchCore>>,
}

impl SwitchControl {
    /// Cut (`true`) or mend port `port`'s cable: while cut, nothing it sends and nothing
    /// sent to it is delivered (as a host that died or was unplugged).
    pub fn set_cut(&self, port: usize, cut: bool) {
        if let Some(c) = self.core.lock().expect("switch lock").cut.get_mut(port) {
            *c = cut;
        }
    }
}

impl Phy for SwitchPort {
    fn recv(&mut self, _now: Instant) -> Option<Frame> {
        loop {
            let f = self.rx.try_recv().ok()?;
            // Frames queued before the cable was cut are lost with it.
            if !self.core.lock().expect("switch lock").cut[self.index] {
                return Some(f);
            }
        }
    }

    fn send(&mut self, _now: Instant, frame: Frame) -> Result<(), Frame> {
        let mut core = self.core.lock().expect("switch lock");
        if core.cut[self.index] || frame.len() < 14 {
            return Ok(()); // lost on the cut cable (or a runt)
        }
        let dst: [u8; 6] = frame[..6].try_into().expect("6 bytes");
        let src: [u8; 6] = frame[6..12].try_into().expect("6 bytes");
        if src[0] & 1 == 0 {
            core.macs.insert(src, self.index);
        }
        match core.macs.get(&dst).copied() {
            Some(to) if dst[0] & 1 == 0 => {
                if to == self.index || core.cut[to] {
                    return Ok(());
                }
                match core.txs[to].try_send(frame) {
                    Ok(()) | Err(TrySendError::Disconnected(_)) => Ok(()),
                    Err(TrySendError::Full(f)) => Err(f),
                }
            }
            _ => {
                for (i, tx) in core.txs.iter().enumerate() {
                    if i != self.index && !core.cut[i] {
                        let _ = tx.try_send(frame.clone());
                    }
                }
                Ok(())
            }
        }
    }

    fn can_send(&self) -> bool {
        let core = self.core.lock().expect("switch lock");
        core.txs
            .iter()
            .enumerate()
            .all(|(i, tx)| i == self.index || !tx.is_full())
    }

    fn waitable(&self) -> Option<Receiver<Frame>> {
        Some(self.rx.clone())
    }
}

/// Identifies a TCP flow as seen from this host: (peer address, peer port, local port).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FlowKey {
    /// Peer IPv4 address.
    pub remote_ip: Ipv4Addr,
    /// Peer TCP port.
    pub remote_port: u16,
    /// Local TCP port.
    pub local_port: u16,
}

/// What the receive tap learned about one flow.
#[derive(Debug, Default, Clone)]
pub struct FlowInfo {
    /// The peer's initial sequence number (from its SYN).
    pub isn: Option<u32>,
    /// Sequence numbers just past segments that carried PSH, not yet taken by the NIC.
    pub psh_ends: Vec<u32>,
    /// Last window field the peer advertised (unscaled).
    pub last_window: u16,
    /// Segments from the peer that advertised a zero window.
    pub zero_windows: u64,
    /// The NIC offloaded a connection on this flow ([`NicDevice::confirm`]); until then the
    /// flow is embryonic (a SYN seen, nothing more) and may be evicted.
    pub confirmed: bool,
}

/// What the receive tap saw in a frame: how the NIC demultiplexes it to a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ingress {
    /// A TCP segment addressed to this host, with its flags.
    Tcp {
        /// The flow.
        key: FlowKey,
        /// SYN set.
        syn: bool,
        /// ACK set.
        ack: bool,
    },
    /// ARP: it may resolve a neighbour that sockets are waiting for.
    Arp,
    /// Anything smoltcp handles without a TCP socket (ICMP, other protocols, other hosts).
    Other,
}

/// Receive-tap and validation counters. Counts only grow.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PhyStats {
    /// Frames received (valid or not).
    pub rx_frames: u64,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Frames sent.
    pub tx_frames: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Frames sent that were pure TCP ACKs: IPv4 TCP segments with no payload and no SYN,
    /// FIN or RST (window updates, keep-alive probes and duplicate ACKs included).
    pub tx_pure_acks: u64,
    /// Frames dropped as malformed (truncated, bad lengths, bad header fields).
    pub rx_malformed: u64,
    /// Frames dropped for a bad IPv4 or TCP checksum.
    pub rx_bad_checksum: u64,
    /// Sends refused because the port was full (smoltcp retries).
    pub tx_busy: u64,
    /// Embryonic flows (SYN seen, never offloaded) evicted, oldest first, to make room.
    pub flows_evicted: u64,
    /// PSH marks dropped because the flow already held [`MAX_PSH_PER_FLOW`] untaken marks.
    pub psh_dropped: u64,
    /// Frames sent with a DSCP mark of their connection ([`NicDevice::set_mark`]).
    pub tx_marked: u64,
    /// TCP payload bytes sent (retransmissions included; headers not): what the egress
    /// shaper counts.
    pub tx_payload_bytes: u64,
}

/// Most embryonic flows (a SYN seen, no offloaded connection yet) the tap tracks at once; a
/// new SYN beyond it evicts the oldest. Confirmed flows are bounded by the NIC's connection
/// limit and freed with their connection, so a SYN sweep cannot grow the table or push
/// real connections out of it.
pub const MAX_EMBRYONIC_FLOWS: usize = 4096;

/// Most PSH marks a flow holds between two NIC polls (the NIC takes them every poll and
/// checks each against the connection's receive window).
pub const MAX_PSH_PER_FLOW: usize = 4096;

/// A smoltcp device over a [`Phy`], with frame validation and the per-flow receive tap.
#[derive(Debug)]
pub struct NicDevice<P> {
    phy: P,
    mtu: usize,
    local_ip: Ipv4Addr,
    tap: bool,
    flows: BTreeMap<FlowKey, FlowInfo>,
    /// Embryonic flows in the order their SYN arrived (entries of flows since confirmed or
    /// forgotten are skipped when reached).
    embryonic: VecDeque<FlowKey>,
    embryonic_live: usize,
    psh_dirty: Vec<FlowKey>,
    /// A frame taken from the port and inspected, waiting for smoltcp ([`NicDevice::stage`]).
    staged: Option<(Frame, Ingress)>,
    stats: PhyStats,
    /// DSCP marks of flows that send marked (bounded by the flow table: a mark is set per
    /// offloaded connection, or reflected from a passive connection's SYN, and forgotten
    /// with its flow).
    marks: HashMap<FlowKey, u8>,
}

impl<P: Phy> NicDevice<P> {
    /// Wrap `phy`; `mtu` is the IP MTU in bytes. With `tap` false the device is a plain
    /// adapter (no validation, no flow table) and smoltcp verifies checksums itself: that is
    /// the bare-smoltcp baseline.
    pub fn new(phy: P, mtu: usize, local_ip: Ipv4Addr, tap: bool) -> Self {
        NicDevice {
            phy,
            mtu,
            local_ip,
            tap,
            flows: BTreeMap::new(),
            embryonic: VecDeque::new(),
            embryonic_live: 0,
            psh_dirty: Vec::new(),
            staged: None,
            marks: HashMap::new(),
            stats: PhyStats::default(),
        }
    }

    /// TCP payload bytes sent so far ([`PhyStats::tx_payload_bytes`]).
    pub fn tx_payload_bytes(&self) -> u64 {
        self.stats.tx_payload_bytes
    }

    /// Counters.
    pub fn stats(&self) -> PhyStats {
        self.stats
    }
    /// The wrapped port.
    pub fn phy(&self) -> &P {
        &self.phy
    }
    /// The wrapped port, mutably.
    pub fn phy_mut(&mut self) -> &mut P {
        &mut self.phy
    }
    /// What the tap knows about `key`.
    pub fn flow(&self, key: &FlowKey) -> Option<&FlowInfo> {
        self.flows.get(key)
    }
    /// Take the PSH marks recorded for `key` (and its ISN).
    pub fn take_psh(&mut self, key: &FlowKey) -> Option<(u32, Vec<u32>)> {
        let f = self.flows.get_mut(key)?;
        let isn = f.isn?;
        if f.psh_ends.is_empty() {
            return None;
        }
        Some((isn, std::mem::take(&mut f.psh_ends)))
    }
    /// Flows that received PSH marks since the last call (each at most once), so the NIC
    /// visits only those instead of every connection.
    pub fn take_psh_dirty(&mut self, into: &mut Vec<FlowKey>) {
        into.append(&mut self.psh_dirty);
    }

    /// Flows tracked (confirmed and embryonic).
    pub fn flow_count(&self) -> usize {
        self.flows.len()
    }

    /// Embryonic flows tracked (at most [`MAX_EMBRYONIC_FLOWS`]).
    pub fn embryonic_count(&self) -> usize {
        self.embryonic_live
    }

    /// Take the next valid frame from the port (malformed ones are dropped and counted) and
    /// hold it for smoltcp's next `receive`; returns what it is, so the caller can choose the
    /// socket set it is processed against. A frame already held is reported again.
    pub fn stage(&mut self, now: Instant) -> Option<Ingress> {
        if let Some((_, what)) = &self.staged {
            return Some(*what);
        }
        loop {
            let frame = self.phy.recv(now)?;
            self.stats.rx_frames += 1;
            self.stats.rx_bytes += frame.len() as u64;
            let what = if self.tap {
                self.inspect(&frame)
            } else {
                Some(Ingress::Other)
            };
            if let Some(what) = what {
                self.staged = Some((frame, what));
                return Some(what);
            }
        }
    }

    /// Drop the frame held by [`NicDevice::stage`] unprocessed (a connection request the NIC
    /// defers).
    pub fn drop_staged(&mut self) {
        if let Some((frame, _)) = self.staged.take() {
            recycle_frame(frame);
        }
    }

    /// The NIC offloaded a connection on `key`: keep the flow until [`NicDevice::forget`].
    pub fn confirm(&mut self, key: &FlowKey) {
        if let Some(f) = self.flows.get_mut(key) {
            if !f.confirmed {
                f.confirmed = true;
                self.embryonic_live -= 1;
            }
        }
    }

    /// Send the flow's IPv4 packets with DSCP `dscp` (0..=63; 0: unmarked) from now on.
    /// smoltcp has no per-socket TOS, so the device rewrites the TOS byte of each outgoing
    /// frame of the flow and fixes the header checksum (the TCP checksum does not cover it).
    pub fn set_mark(&mut self, key: FlowKey, dscp: u8) {
        debug_assert!(dscp < 64, "DSCP {dscp}");
        if dscp == 0 {
            self.marks.remove(&key);
        } else {
            self.marks.insert(key, dscp & 0x3f);
        }
    }

    /// Forget a flow (its connection is released, or its handshake abandoned).
    pub fn forget(&mut self, key: &FlowKey) {
        self.marks.remove(key);
        if let Some(f) = self.flows.remove(key) {
            if !f.confirmed {
                self.embryonic_live -= 1;
            }
        }
    }

    /// Make room for one more embryonic flow: evict the oldest while the table is full.
    fn evict_embryonic(&mut self) {
        while self.embryonic_live >= MAX_EMBRYONIC_FLOWS {
            let Some(old) = self.embryonic.pop_front() else {
                break;
            };
            if self.flows.get(&old).is_some_and(|f| !f.confirmed) {
                self.flows.remove(&old);
                self.marks.remove(&old);
                self.embryonic_live -= 1;
                self.stats.flows_evicted += 1;
            }
        }
        // Drop queue entries of flows confirmed or forgotten since, so the queue stays
        // within a small factor of the live embryonic count.
        if self.embryonic.len() > 2 * MAX_EMBRYONIC_FLOWS {
            let flows = &self.flows;
            self.embryonic
                .retain(|k| flows.get(k).is_some_and(|f| !f.confirmed));
        }
    }

    /// Validate `frame` and record what the tap needs. `None` means: drop it.
    fn inspect(&mut self, frame: &[u8]) -> Option<Ingress> {
        let Ok(eth) = EthernetFrame::new_checked(frame) else {
            self.stats.rx_malformed += 1;
            return None;
        };
        match eth.ethertype() {
            EthernetProtocol::Ipv4 => {}
            // smoltcp parses these (and drops what it does not know).
            EthernetProtocol::Arp => return Some(Ingress::Arp),
            _ => return Some(Ingress::Other),
        }
        let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else {
            self.stats.rx_malformed += 1;
            return None;
        };
        if !ip.verify_checksum() {
            self.stats.rx_bad_checksum += 1;
            return None;
        }
        if ip.next_header() != IpProtocol::Tcp || ip.more_frags() || ip.frag_offset() != 0 {
            return Some(Ingress::Other);
        }
        let (src, dst) = (ip.src_addr(), ip.dst_addr());
        let Ok(tcp) = TcpPacket::new_checked(ip.payload()) else {
            self.stats.rx_malformed += 1;
            return None;
        };
        if !tcp.verify_checksum(&IpAddress::Ipv4(src), &IpAddress::Ipv4(dst)) {
            self.stats.rx_bad_checksum += 1;
            return None;
        }
        if dst != self.local_ip {
            return Some(Ingress::Other);
        }
        let key = FlowKey {
            remote_ip: src,
            remote_port: tcp.src_port(),
            local_port: tcp.dst_port(),
        };
        let what = Ingress::Tcp {
            key,
            syn: tcp.syn(),
            ack: tcp.ack(),
        };
        if !self.flows.contains_key(&key) {
            if !tcp.syn() || tcp.rst() {
                return Some(what);
            }
            self.evict_embryonic();
            self.embryonic.push_back(key);
            self.embryonic_live += 1;
            // A passive connection answers in the class it was asked in (Linux's
            // `tcp_reflect_tos`): its SYN's DSCP marks what it sends, the SYN-ACK and the
            // ACKs of a marked transfer included, unless its own mark is set.
            if ip.dscp() != 0 {
                self.marks.entry(key).or_insert(ip.dscp());
            }
        }
        let f = self.flows.entry(key).or_default();
        if tcp.syn() && f.isn.is_none() {
            // The first SYN of a flow fixes its ISN: a later (spoofed or stray) SYN on the
            // same 4-tuple cannot shift every PSH mark of a live connection.
            f.isn = Some(tcp.seq_number().0 as u32);
        }
        f.last_window = tcp.window_len();
        if tcp.window_len() == 0 && !tcp.syn() {
            f.zero_windows += 1;
        }
        let payload_len = tcp.payload().len() as u32;
        if tcp.psh() && payload_len > 0 {
            if f.psh_ends.len() >= MAX_PSH_PER_FLOW {
                self.stats.psh_dropped += 1;
                return Some(what);
            }
            let seq = (tcp.seq_number().0 as u32).wrapping_add(u32::from(tcp.syn()));
            if f.psh_ends.is_empty() {
                self.psh_dirty.push(key);
            }
            f.psh_ends.push(seq.wrapping_add(payload_len));
        }
        Some(what)
    }
}

/// The TCP payload length and flags byte of IPv4 Ethernet frame `f`; `None` if it is not
/// an IPv4 TCP segment with consistent header lengths.
fn tcp_payload(f: &[u8]) -> Option<(usize, u8)> {
    const ETH: usize = 14;
    if f.len() < ETH + 20 || f[12..14] != [0x08, 0x00] || f[ETH + 9] != 6 {
        return None;
    }
    let ihl = usize::from(f[ETH] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([f[ETH + 2], f[ETH + 3]]));
    let tcp = ETH + ihl;
    if ihl < 20 || f.len() < tcp + 20 {
        return None;
    }
    let doff = usize::from(f[tcp + 12] >> 4) * 4;
    Some((total.checked_sub(ihl + doff)?, f[tcp + 13]))
}

/// Whether Ethernet frame `f` is a pure TCP ACK over IPv4: no payload, ACK set, none of
/// SYN, FIN and RST. Anything unparsable is not.
pub fn is_pure_ack(f: &[u8]) -> bool {
    tcp_payload(f).is_some_and(pure_ack)
}

/// Whether a segment of payload length and flags `(len, flags)` is a pure ACK.
fn pure_ack((len, flags): (usize, u8)) -> bool {
    let (fin, syn, rst, ack) = (0x01, 0x02, 0x04, 0x10);
    len == 0 && flags & ack != 0 && flags & (fin | syn | rst) == 0
}

/// The flow an outgoing IPv4 TCP frame belongs to, seen from its sender; `None` for any
/// other frame.
fn tx_flow(f: &[u8]) -> Option<FlowKey> {
    let eth = EthernetFrame::new_checked(f).ok()?;
    if eth.ethertype() != EthernetProtocol::Ipv4 {
        return None;
    }
    let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
    if ip.next_header() != IpProtocol::Tcp {
        return None;
    }
    let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
    Some(FlowKey {
        remote_ip: ip.dst_addr(),
        remote_port: tcp.dst_port(),
        local_port: tcp.src_port(),
    })
}

/// Set the DSCP of the IPv4 packet in Ethernet frame `f` to `dscp` (ECN bits kept) and
/// recompute the header checksum; false (and `f` untouched) if `f` is not IPv4.
pub fn set_dscp(f: &mut [u8], dscp: u8) -> bool {
    let Ok(mut eth) = EthernetFrame::new_checked(&mut f[..]) else {
        return false;
    };
    if eth.ethertype() != EthernetProtocol::Ipv4 {
        return false;
    }
    let Ok(mut ip) = Ipv4Packet::new_checked(eth.payload_mut()) else {
        return false;
    };
    ip.set_dscp(dscp & 0x3f);
    ip.fill_checksum();
    true
}

/// smoltcp receive token.
pub struct RxTok(Frame);
/// smoltcp transmit token.
pub struct TxTok<'a, P: Phy> {
    phy: &'a mut P,
    stats: &'a mut PhyStats,
    marks: &'a HashMap<FlowKey, u8>,
    now: Instant,
}

impl phy::RxToken for RxTok {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        let r = f(&self.0);
        recycle_frame(self.0);
        r
    }
}

impl<P: Phy> phy::TxToken for TxTok<'_, P> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = take_frame(len);
        let r = f(&mut frame);
        if !self.marks.is_empty() {
            if let Some(&dscp) = tx_flow(&frame).and_then(|k| self.marks.get(&k)) {
                self.stats.tx_marked += u64::from(set_dscp(&mut frame, dscp));
            }
        }
        self.stats.tx_frames += 1;
        self.stats.tx_bytes += len as u64;
        if let Some(seg) = tcp_payload(&frame) {
            self.stats.tx_pure_acks += u64::from(pure_ack(seg));
            self.stats.tx_payload_bytes += seg.0 as u64;
        }
        if self.phy.send(self.now, frame).is_err() {
            // `transmit` checked `can_send`; a port that still refuses loses the frame, as a
            // full hardware queue would. TCP retransmits.
            self.stats.tx_busy += 1;
        }
        r
    }
}

impl<P: Phy> phy::Device for NicDevice<P> {
    type RxToken<'a>
        = RxTok
    where
        Self: 'a;
    type TxToken<'a>
        = TxTok<'a, P>
    where
        Self: 'a;

    fn receive(&mut self, ts: Instant) -> Option<(RxTok, TxTok<'_, P>)> {
        // Receive even when the port cannot send right now: a reply that does not fit is
        // dropped and counted (TCP recovers), whereas refusing to receive could leave two
        // hosts with both directions of a wire full, each waiting for the other.
        self.stage(ts)?;
        let (frame, _) = self.staged.take()?;
        Some((
            RxTok(frame),
            TxTok {
                phy: &mut self.phy,
                stats: &mut self.stats,
                marks: &self.marks,
                now: ts,
            },
        ))
    }

    fn transmit(&mut self, ts: Instant) -> Option<TxTok<'_, P>> {
        if !self.phy.can_send() {
            self.stats.tx_busy += 1;
            return None;
        }
        Some(TxTok {
            phy: &mut self.phy,
            stats: &mut self.stats,
            marks: &self.marks,
            now: ts,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = self.mtu + 14;
        caps.max_burst_size = None;
        if self.tap {
            // The tap verifies received checksums (and counts failures); smoltcp only computes
            // them on transmit.
            let mut c = ChecksumCapabilities::default();
            c.ipv4 = Checksum::Tx;
            c.tcp = Checksum::Tx;
            caps.checksum = c;
        }
        caps
    }
}

#[cfg(test)]
mod switch_tests {
    use super::*;

    fn frame(dst: u8, src: u8) -> Frame {
        let mut f = vec![0u8; 60];
        f[..6].copy_from_slice(&[2, 0, 0, 0, 0, dst]);
        f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, src]);
        f
    }

    /// Unknown destinations flood, learned ones go to their port only, a full queue
    /// refuses unicast (lossless), and a cut cable loses both ways.
    #[test]
    fn the_switch_learns_floods_pushes_back_and_cuts() {
        let t = Instant::from_micros(0);
        let (mut p, ctl) = switch(3, 2);
        p[0].send(t, frame(2, 1)).unwrap(); // 2 not learned yet: to ports 1 and 2
        assert!(p[1].recv(t).is_some() && p[2].recv(t).is_some());
        p[2].send(t, frame(1, 3)).unwrap(); // learned: MAC 1 is on port 0
        assert!(p[0].recv(t).is_some());
        assert!(p[1].recv(t).is_none(), "not flooded once learned");
        for _ in 0..2 {
            p[0].send(t, frame(3, 1)).unwrap();
        }
        assert!(!p[0].can_send(), "port 2's queue is full");
        assert!(p[0].send(t, frame(3, 1)).is_err(), "refused, not lost");
        assert_eq!(
            (p[2].recv(t).is_some(), p[2].recv(t).is_some()),
            (true, true)
        );
        ctl.set_cut(2, true);
        p[0].send(t, frame(3, 1)).unwrap();
        p[2].send(t, frame(1, 3)).unwrap();
        assert!(p[2].recv(t).is_none() && p[0].recv(t).is_none());
        ctl.set_cut(2, false);
        p[0].send(t, frame(3, 1)).unwrap();
        assert!(p[2].recv(t).is_some(), "mended");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{
        EthernetAddress, EthernetRepr, Ipv4Address, Ipv4Repr, TcpControl, TcpRepr, TcpSeqNumber,
    };

    /// An Ethernet frame holding an IPv4 TCP segment from 10.0.0.1:40000 to 10.0.0.2:7000
    /// with `payload`, checksums filled.
    fn segment(payload: &[u8]) -> Vec<u8> {
        segment_with(payload, TcpControl::Psh, 40000)
    }

    /// As [`segment`], with `control` from source port `port`.
    fn segment_with(payload: &[u8], control: TcpControl, port: u16) -> Vec<u8> {
        let (src, dst) = (Ipv4Address::new(10, 0, 0, 1), Ipv4Address::new(10, 0, 0, 2));
        let tcp = TcpRepr {
            src_port: port,
            dst_port: 7000,
            control,
            seq_number: TcpSeqNumber(7),
            ack_number: Some(TcpSeqNumber(9)),
            window_len: 1000,
            window_scale: None,
            max_seg_size: None,
            sack_permitted: false,
            sack_ranges: [None; 3],
            timestamp: None,
            payload,
        };
        let ip = Ipv4Repr {
            src_addr: src,
            dst_addr: dst,
            next_header: IpProtocol::Tcp,
            payload_len: tcp.buffer_len(),
            hop_limit: 64,
        };
        let eth = EthernetRepr {
            src_addr: EthernetAddress([2, 0, 0, 0, 0, 1]),
            dst_addr: EthernetAddress([2, 0, 0, 0, 0, 2]),
            ethertype: EthernetProtocol::Ipv4,
        };
        let caps = ChecksumCapabilities::default();
        let mut f = vec![0u8; eth.buffer_len() + ip.buffer_len() + tcp.buffer_len()];
        let mut e = EthernetFrame::new_unchecked(&mut f[..]);
        eth.emit(&mut e);
        let mut p = Ipv4Packet::new_unchecked(e.payload_mut());
        ip.emit(&mut p, &caps);
        let mut t = TcpPacket::new_unchecked(p.payload_mut());
        tcp.emit(&mut t, &IpAddress::Ipv4(src), &IpAddress::Ipv4(dst), &caps);
        f
    }

    #[test]
    fn a_passive_flow_reflects_the_dscp_of_its_syn_and_forgets_it_with_the_flow() {
        let (port, _peer) = wire(16);
        let mut dev = NicDevice::new(port, 1500, Ipv4Addr::new(10, 0, 0, 2), true);
        let marked = |port: u16, dscp: u8| {
            let mut f = segment_with(b"", TcpControl::Syn, port);
            assert!(set_dscp(&mut f, dscp));
            f
        };
        let key = |port: u16| FlowKey {
            remote_ip: Ipv4Addr::new(10, 0, 0, 1),
            remote_port: port,
            local_port: 7000,
        };
        assert!(dev.inspect(&marked(40000, 46)).is_some());
        assert_eq!(dev.marks.get(&key(40000)), Some(&46), "EF reflected");
        // An unmarked SYN sets nothing; an explicit mark is not overridden.
        assert!(dev
            .inspect(&segment_with(b"", TcpControl::Syn, 40001))
            .is_some());
        assert!(!dev.marks.contains_key(&key(40001)));
        dev.set_mark(key(40002), 10);
        assert!(dev.inspect(&marked(40002, 46)).is_some());
        assert_eq!(dev.marks.get(&key(40002)), Some(&10));
        // Forgotten with its flow; and a SYN flood's evicted flows take their marks along.
        dev.forget(&key(40000));
        assert!(!dev.marks.contains_key(&key(40000)));
        for p in 0..(MAX_EMBRYONIC_FLOWS as u16 + 100) {
            dev.inspect(&marked(1 + p, 46));
        }
        assert!(
            dev.marks.len() <= MAX_EMBRYONIC_FLOWS + 1,
            "{}",
            dev.marks.len()
        );
    }

    #[test]
    fn a_dscp_mark_rewrites_only_the_tos_bits_and_keeps_both_checksums_valid() {
        let mut f = segment(b"marked payload");
        let before = f.clone();
        let ecn_set = f[15] | 0x01; // an ECN bit set by the stack is kept
        f[15] = ecn_set;
        Ipv4Packet::new_unchecked(&mut f[14..]).fill_checksum();
        assert_eq!(
            tx_flow(&f),
            Some(FlowKey {
                remote_ip: Ipv4Addr::new(10, 0, 0, 2),
                remote_port: 7000,
                local_port: 40000,
            })
        );
        assert!(set_dscp(&mut f, 46));
        let ip = Ipv4Packet::new_checked(&f[14..]).unwrap();
        assert_eq!((ip.dscp(), ip.ecn()), (46, 1));
        assert!(ip.verify_checksum(), "IPv4 header checksum recomputed");
        let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
        assert!(tcp.verify_checksum(
            &IpAddress::Ipv4(ip.src_addr()),
            &IpAddress::Ipv4(ip.dst_addr())
        ));
        assert_eq!(tcp.payload(), b"marked payload");
        // Nothing but the TOS byte and the header checksum changed.
        let changed: Vec<usize> = (0..f.len()).filter(|&i| f[i] != before[i]).collect();
        assert!(
            changed.iter().all(|i| [15, 24, 25].contains(i)),
            "{changed:?}"
        );
        // Not IPv4 (ARP): untouched.
        let mut arp = before.clone();
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        let copy = arp.clone();
        assert!(!set_dscp(&mut arp, 46));
        assert_eq!(arp, copy);
        assert_eq!(tx_flow(&arp), None);
        // Truncated: no panic, no flow.
        assert_eq!(tx_flow(&before[..30]), None);
        assert!(!set_dscp(&mut before.clone()[..20], 46));
    }
}
