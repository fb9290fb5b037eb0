//! The simulated NIC: a smoltcp interface, its TCP sockets, one [`OffloadCtx`] per offloaded
//! connection, the anonymous buffers the driver gave it, and the DMA engine.
//!
//! # Contract
//! [`Nic::poll`] is the only entry point: it takes commands from the bus, runs smoltcp at
//! `now`, moves received payload into host memory under each connection's offload rules,
//! moves queued transmit buffers into the stack, and raises events. It does a bounded amount
//! of work (what the rings, the phy and the socket buffers hold) and never blocks.
//! [`Nic::poll_at`] says when it must be called again at the latest.

use std::collections::{BTreeMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;

use smoltcp::iface::{Config, Interface};
use smoltcp::socket::tcp;
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, IpEndpoint};

use toe_bus::cost::{Busy, NicCost};
use toe_bus::{
    Command, ConnId, Dma, Event, HostBuf, HostMemory, NicEnd, OffloadParams, ReturnReason, RxPolicy,
};

use crate::offload::{OffloadCtx, OffloadStats, Plan};
use crate::phy::{FlowKey, Ingress, NicDevice, Phy, PhyStats};
use crate::shape::Shaper;
use crate::sockets::{Owner, SockId, Sockets, SynAck};
use crate::ulp::{UlpConn, UlpFactory, UlpStats};

/// NIC configuration.
#[derive(Debug, Clone)]
pub struct NicConfig {
    /// Ethernet address.
    pub mac: [u8; 6],
    /// IPv4 address.
    pub ip: Ipv4Addr,
    /// Prefix length of the local network.
    pub prefix_len: u8,
    /// Default gateway, if any.
    pub gateway: Option<Ipv4Addr>,
    /// IP MTU in bytes (the Ethernet frame adds 14).
    pub mtu: usize,
    /// Per-socket receive buffer (the TCP receive window), in bytes.
    pub socket_rx_bytes: usize,
    /// Per-socket send buffer, in bytes.
    pub socket_tx_bytes: usize,
    /// Most offloaded connections (connecting or open contexts; the anonymous pool holds one
    /// buffer share per connection). Listener sockets (their backlogs) come on top. At the
    /// limit an active open fails at once, and handshakes completed on a listener wait in its
    /// backlog (SYNs beyond the backlog are refused with RST) until a connection is released.
    pub max_conns: usize,
    /// Seed for smoltcp's ISNs and the ephemeral port sequence.
    pub seed: u64,
    /// Delayed-ACK time of the stack; `None` acknowledges every segment at once.
    pub ack_delay: Option<Duration>,
    /// Keep-alive interval of open connections: an idle connection sends a keep-alive probe
    /// this often; `None`: no probes.
    pub keepalive: Option<Duration>,
    /// An open connection whose peer sends nothing for this long while an answer is due
    /// (unacknowledged data, a keep-alive probe) is reset and its buffers come back; `None`:
    /// wait forever. With keep-alive on, this bounds how long a vanished peer holds resources.
    pub idle_timeout: Option<Duration>,
    /// A handshake (SYN-RECEIVED on a listener, SYN-SENT of an active open) that does not
    /// complete within this time is abandoned; `None`: never (not recommended).
    pub syn_timeout: Option<Duration>,
    /// What the NIC's work costs in virtual time (frames processed, DMA bytes moved); while
    /// busy the NIC does not poll, and its events leave when the work is done. Default free.
    pub cost: NicCost,
    /// The congestion control of every connection's sender. Default [`Congestion::None`].
    pub congestion: Congestion,
}

/// A TCP sender's congestion control (smoltcp's controllers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Congestion {
    /// None: the sender sends what the peer's window allows (smoltcp's default; on a
    /// lossless wire of known rate the fastest, on a lossy or shared bottleneck it overruns
    /// the queue).
    #[default]
    None,
    /// Reno (RFC 5681): slow start, then additive increase, halving on loss.
    Reno,
    /// CUBIC (RFC 9438): window growth as a cubic function of the time since the last loss.
    Cubic,
}

impl Congestion {
    /// The config spelling: `none`, `reno` or `cubic`.
    pub fn name(self) -> &'static str {
        match self {
            Congestion::None => "none",
            Congestion::Reno => "reno",
            Congestion::Cubic => "cubic",
        }
    }
}

impl std::str::FromStr for Congestion {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Congestion::None),
            "reno" => Ok(Congestion::Reno),
            "cubic" => Ok(Congestion::Cubic),
            _ => Err(format!(
                "unknown congestion control {s:?} (expected none, reno or cubic)"
            )),
        }
    }
}

impl From<Congestion> for tcp::CongestionControl {
    fn from(c: Congestion) -> Self {
        match c {
            Congestion::None => tcp::CongestionControl::None,
            Congestion::Reno => tcp::CongestionControl::Reno,
            Congestion::Cubic => tcp::CongestionControl::Cubic,
        }
    }
}

impl Default for NicConfig {
    fn default() -> Self {
        NicConfig {
            mac: [0x02, 0, 0, 0, 0, 1],
            ip: Ipv4Addr::new(10, 0, 0, 1),
            prefix_len: 24,
            gateway: None,
            mtu: 9000,
            socket_rx_bytes: 512 * 1024,
            socket_tx_bytes: 512 * 1024,
            max_conns: 1024,
            seed: 1,
            ack_delay: Some(Duration::from_millis(10)),
            keepalive: Some(Duration::from_secs(60)),
            idle_timeout: Some(Duration::from_secs(180)),
            syn_timeout: Some(Duration::from_secs(30)),
            cost: NicCost::FREE,
            congestion: Congestion::None,
        }
    }
}

/// NIC-wide counters. Counts only grow.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NicStats {
    /// Commands processed.
    pub commands: u64,
    /// Commands refused (unknown connection, bad state).
    pub command_errors: u64,
    /// Times a connection had data and window room but no anonymous buffer was free.
    pub anon_starved: u64,
    /// Connections established.
    pub established: u64,
    /// Connections that ended with a reset.
    pub resets: u64,
    /// Active opens refused because `max_conns` was reached.
    pub conn_limit_hits: u64,
    /// Half-open (SYN-RECEIVED) listener sockets recycled because a new SYN found no
    /// listening socket: first those whose SYN-ACK never went out, then those that sent it
    /// [`SYN_ACK_GRACE`] or longer ago, oldest first (a SYN flood cannot lock clients out,
    /// and a client's handshake in progress is not cut).
    pub syn_evictions: u64,
    /// Socket services (a socket was touched by a frame, a command or a due timer, and its
    /// owner ran). With every connection idle, polls add nothing here.
    pub sockets_serviced: u64,
    /// Connection requests (SYN) refused with RST because every socket of the listener's
    /// backlog had a completed handshake (none listening, none half-open to recycle).
    pub syn_refused: u64,
    /// Connection requests (SYN) dropped unanswered because no backlog socket was free and
    /// every half-open one was in a handshake still in progress: its SYN-ACK sent less than
    /// [`SYN_ACK_GRACE`] ago (the sender retries). A socket sends its SYN-ACK as soon as it
    /// takes a SYN, so the later SYNs of the same batch see whether it went out.
    pub syn_deferred: u64,
    /// TCP segments of no known flow (and not a connection request), answered with RST: the
    /// peer of a recycled half-open socket, or a stray segment.
    pub segments_without_flow: u64,
    /// ARP frames received: each one re-examines every socket, since a socket waiting for
    /// that neighbour may go on before its deadline.
    pub arp_rescans: u64,
    /// PSH marks dropped because they lay outside the connection's receive window.
    pub psh_out_of_window: u64,
    /// Passive connection ids skipped because they were still in use (after a wrap).
    pub ids_skipped: u64,
    /// Times a paced connection had a segment to send and waited for the egress shaper
    /// ([`Command::Shape`]).
    pub shaper_waits: u64,
    /// ACKs owed for received data and held back (the stack's delayed ACK, or a longer
    /// [`Command::AckHold`]).
    pub acks_delayed: u64,
    /// Held ACKs that a data segment of ours carried (superseded: no pure ACK sent).
    pub acks_carried: u64,
    /// Held ACKs sent as pure ACKs when their delay (or acknowledgement window) expired.
    pub acks_expired: u64,
    /// Held ACKs sent as pure ACKs early: more than one MSS unacknowledged, or under
    /// [`Command::AckHold`] more than half the receive window.
    pub acks_forced: u64,
    /// Duplicate ACKs not sent under [`Command::AckHold`]: after the first three for one
    /// hole, the rest of the duplicates carry no news for the sender.
    pub acks_thinned: u64,
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Phase {
    Connecting,
    Open,
}

#[derive(Debug)]
struct TxBuf {
    buf: HostBuf,
    len: usize,
    sent: usize,
}

#[derive(Debug)]
struct NicConn {
    handle: SockId,
    params: OffloadParams,
    listener: Option<u16>,
    phase: Phase,
    ctx: OffloadCtx,
    tx_queue: VecDeque<TxBuf>,
    tx_enqueued: u64,
    /// Sends copied into the stack: (stream end offset, buffer, length).
    tx_wait: VecDeque<(u64, HostBuf, usize)>,
    close_requested: bool,
    closed_local: bool,
    aborted: bool,
    eof_sent: bool,
    fin_seen: bool,
    /// Waiting in [`Nic`]'s starved list for an anonymous buffer.
    starved: bool,
    /// The upper-layer engine slot, once the host registered a tag or asked for an engine.
    ulp: Option<Box<UlpConn>>,
    /// The socket's delayed-ACK counters already added to [`NicStats`].
    acks_seen: tcp::AckStats,
}

/// Add what `now` (a socket's delayed-ACK counters) grew by since `seen` to `stats`.
fn harvest_acks(stats: &mut NicStats, seen: &mut tcp::AckStats, now: tcp::AckStats) {
    stats.acks_delayed += now.delayed - seen.delayed;
    stats.acks_carried += now.carried - seen.carried;
    stats.acks_expired += now.expired - seen.expired;
    stats.acks_forced += now.forced - seen.forced;
    stats.acks_thinned += now.thinned - seen.thinned;
    *seen = now;
}

impl NicConn {
    /// Whether an engine runs the connection, or delivery is held for one.
    fn ulp_active(&self) -> bool {
        self.ulp
            .as_ref()
            .is_some_and(|u| u.running() || u.frozen().is_some())
    }
}

/// How long a half-open socket whose SYN-ACK went out is safe from recycling: RFC 6298's
/// initial retransmission timeout, the time a client allows a SYN before it retries.
pub const SYN_ACK_GRACE: Duration = Duration::from_secs(1);

/// Where [`Nic::route`] sends a segment.
enum Route {
    /// Process it against this socket (`true`: a listening socket, just taken from the idle
    /// ones).
    To(SockId, bool),
    /// Process it against no socket: smoltcp answers with RST.
    NoSocket,
    /// Drop it unanswered (a SYN that finds the backlog's half-open sockets all in
    /// handshakes still in progress).
    Defer,
}

#[derive(Debug)]
struct Listener {
    params: OffloadParams,
    /// The backlog: every socket of this listener (listening, half-open, or established
    /// and held at the connection limit).
    members: Vec<SockId>,
    /// The members in LISTEN, ready for the next SYN.
    idle: Vec<SockId>,
}

/// The simulated NIC.
pub struct Nic<P: Phy> {
    cfg: NicConfig,
    iface: Interface,
    socks: Sockets,
    dev: NicDevice<P>,
    bus: NicEnd,
    dma: Dma,
    /// Boxed: a B-tree node holds 11 entries and is often half full, so large values would
    /// waste hundreds of bytes per connection in slack.
    conns: BTreeMap<ConnId, Box<NicConn>>,
    listeners: BTreeMap<u16, Listener>,
    anon: Vec<HostBuf>,
    anon_len: usize,
    out: VecDeque<Event>,
    next_passive: u32,
    next_port: u16,
    stats: NicStats,
    /// Backlog sockets with a completed handshake, waiting for a connection slot (oldest
    /// first).
    held: VecDeque<SockId>,
    /// Connections that found no anonymous buffer; serviced again when buffers come.
    starved: Vec<ConnId>,
    /// Connections finished in this round, released after its egress.
    finished: Vec<ConnId>,
    scratch_socks: Vec<SockId>,
    scratch_flows: Vec<FlowKey>,
    /// The upper-layer engines this NIC carries.
    engines: Vec<Arc<dyn UlpFactory>>,
    /// The time of the poll in progress.
    now: Instant,
    /// The NIC's timeline under the cost model.
    busy: Busy,
    /// The egress shaper of the paced connections ([`Command::Shape`]).
    shaper: Shaper,
}

impl<P: Phy> std::fmt::Debug for Nic<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nic")
            .field("ip", &self.cfg.ip)
            .field("conns", &self.conns.len())
            .finish()
    }
}

/// Build a smoltcp interface for `cfg` on `dev` (shared with the bare-smoltcp baseline).
pub fn make_interface<D: smoltcp::phy::Device>(
    mac: [u8; 6],
    ip: Ipv4Addr,
    prefix_len: u8,
    gateway: Option<Ipv4Addr>,
    seed: u64,
    dev: &mut D,
    now: Instant,
) -> Interface {
    let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(mac)));
    config.random_seed = seed;
    let mut iface = Interface::new(config, dev, now);
    iface.update_ip_addrs(|addrs| {
        let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(ip), prefix_len));
    });
    if let Some(gw) = gateway {
        let _ = iface.routes_mut().add_default_ipv4_route(gw);
    }
    iface
}

/// A TCP socket with toemu's settings (Nagle off: latency-sensitive request/response traffic
/// must not wait for the delayed ACK of the previous segment) and congestion control
/// `congestion` (always set: smoltcp's own default is the strongest controller compiled in).
pub fn make_socket(
    rx_bytes: usize,
    tx_bytes: usize,
    ack_delay: Option<Duration>,
    congestion: Congestion,
) -> tcp::Socket<'static> {
    let mut s = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; rx_bytes]),
        tcp::SocketBuffer::new(vec![0; tx_bytes]),
    );
    s.set_nagle_enabled(false);
    s.set_ack_delay(ack_delay);
    s.set_congestion_control(congestion.into());
    s
}

fn v4(ep: IpEndpoint) -> SocketAddrV4 {
    match ep.addr {
        IpAddress::Ipv4(a) => SocketAddrV4::new(a, ep.port),
    }
}

/// W of a connection on a link of `mtu` whose peer announced `remote_mss`: under `MssHoldoff`
/// one negotiated MSS (the smaller of the peer's MSS and ours, the MTU minus IPv4 and TCP
/// headers), the offload parameter otherwise.
fn effective_window(mtu: usize, remote_mss: usize, params: &OffloadParams) -> u32 {
    match params.policy {
        RxPolicy::MssHoldoff => (mtu - 40).min(remote_mss).max(1) as u32,
        _ => params.indicate_window.max(1),
    }
}

/// The next free id after `next` among ids with `mask` bits set, skipping 0 and every id in
/// use. `next` is updated. ids wrap after 2^31; an id is never reused while it is live.
fn next_free_id(next: &mut u32, mask: u32, in_use: impl Fn(ConnId) -> bool) -> (ConnId, u64) {
    let mut skipped = 0;
    loop {
        *next = next.wrapping_add(1) & !ConnId::PASSIVE_BIT;
        let id = ConnId(*next | mask);
        if *next != 0 && !in_use(id) {
            return (id, skipped);
        }
        skipped += 1;
    }
}

/// Extend a 32-bit stream offset to the 64-bit offset nearest `base`.
fn extend_offset(base: u64, low: u32) -> u64 {
    let cand = (base & !0xFFFF_FFFF) | low as u64;
    let span = 1u64 << 32;
    [cand.wrapping_sub(span), cand, cand + span]
        .into_iter()
        .filter(|c| *c <= cand + span)
        .min_by_key(|c| c.abs_diff(base))
        .unwrap_or(cand)
}

impl<P: Phy> Nic<P> {
    /// A NIC on `phy`, talking to its driver over `bus` and writing host memory through `dma`.
    pub fn new(cfg: NicConfig, phy: P, bus: NicEnd, mem: Arc<HostMemory>, now: Instant) -> Self {
        let mut dev = NicDevice::new(phy, cfg.mtu, cfg.ip, true);
        let iface = make_interface(
            cfg.mac,
            cfg.ip,
            cfg.prefix_len,
            cfg.gateway,
            cfg.seed,
            &mut dev,
            now,
        );
        Nic {
            next_port: 49152 + (cfg.seed % 8192) as u16,
            cfg,
            iface,
            socks: Sockets::new(),
            dev,
            bus,
            dma: Dma::new(mem),
            conns: BTreeMap::new(),
            listeners: BTreeMap::new(),
            anon: Vec::new(),
            anon_len: 0,
            out: VecDeque::new(),
            next_passive: 0,
            stats: NicStats::default(),
            held: VecDeque::new(),
            starved: Vec::new(),
            finished: Vec::new(),
            scratch_socks: Vec::new(),
            scratch_flows: Vec::new(),
            engines: Vec::new(),
            now,
            busy: Busy::default(),
            shaper: Shaper::new(),
        }
    }

    /// Carry the upper-layer engine `factory` makes: hosts ask for it by its name in
    /// [`Command::UlpOffload`]. A factory of the same name is replaced.
    pub fn add_engine(&mut self, factory: Arc<dyn UlpFactory>) {
        self.engines.retain(|f| f.name() != factory.name());
        self.engines.push(factory);
    }

    /// The ULP slot of a connection: its counters and its engine's, if it has a slot.
    pub fn ulp_state(&self, conn: ConnId) -> Option<(UlpStats, Vec<(&'static str, u64)>)> {
        let u = self.conns.get(&conn)?.ulp.as_ref()?;
        Some((u.stats(), u.engine_counters()))
    }

    /// Configuration.
    pub fn config(&self) -> &NicConfig {
        &self.cfg
    }
    /// NIC counters.
    pub fn stats(&self) -> NicStats {
        self.stats
    }
    /// Phy and tap counters.
    pub fn phy_stats(&self) -> PhyStats {
        self.dev.stats()
    }
    /// The phy device (flow table, port).
    pub fn device(&self) -> &NicDevice<P> {
        &self.dev
    }
    /// The phy device, mutably.
    pub fn device_mut(&mut self) -> &mut NicDevice<P> {
        &mut self.dev
    }
    /// Anonymous buffers currently held by the NIC.
    pub fn anon_free(&self) -> usize {
        self.anon.len()
    }
    /// Offload state of a connection: (P, W, stats), if it exists.
    pub fn offload_state(&self, conn: ConnId) -> Option<(u32, u32, OffloadStats)> {
        self.conns
            .get(&conn)
            .map(|c| (c.ctx.pending(), c.ctx.window(), c.ctx.stats()))
    }
    /// Receive-queue length of a connection's socket (payload held by the stack), in bytes.
    pub fn socket_rx_queue(&self, conn: ConnId) -> Option<usize> {
        self.conns
            .get(&conn)
            .map(|c| self.socks.get(c.handle).recv_queue())
    }
    /// A clone of the command ring's receiver, for runtimes that sleep until there is work.
    pub fn command_waitable(&self) -> crossbeam_channel::Receiver<toe_bus::ring::Stamped<Command>> {
        self.bus.command_receiver().clone()
    }
    /// Local TCP port of an established connection.
    pub fn local_port(&self, conn: ConnId) -> Option<u16> {
        let c = self.conns.get(&conn)?;
        if c.phase != Phase::Open {
            return None;
        }
        self.socks.flow(c.handle).map(|k| k.local_port)
    }
    /// Offloaded connections.
    pub fn conn_count(&self) -> usize {
        self.conns.len()
    }
    /// TCP sockets (offloaded connections and listener backlogs).
    pub fn socket_count(&self) -> usize {
        self.socks.len()
    }

    /// The latest time `poll` must run again (smoltcp timers); `None` if only new input can
    /// create work. O(1) amortized: the sockets' deadlines are kept in a heap.
    pub fn poll_at(&mut self, now: Instant) -> Option<Instant> {
        let free = self.busy.free_at();
        // Busy: whatever arrived meanwhile (frames, commands) is looked at when it is free.
        if free > now || !self.out.is_empty() || self.bus.staged() > 0 || self.socks.any_dirty() {
            return Some(now.max(free));
        }
        [
            self.socks.next_deadline(),
            self.dev.phy().poll_at(),
            self.bus.next_due(),
            self.shaper.has_waiting().then(|| self.shaper.ready_at(now)),
        ]
        .into_iter()
        .flatten()
        .min()
        .map(|t| t.max(free))
    }

    /// The NIC's timeline under the cost model: when it is free, and the work charged so far.
    pub fn busy(&self) -> Busy {
        self.busy
    }

    /// Run the NIC once at `now`. Returns true if anything happened. Work is proportional to
    /// what arrived (commands, frames) and to the sockets it touched or whose timers are due,
    /// not to the number of connections.
    pub fn poll(&mut self, now: Instant) -> bool {
        if self.busy.is_busy(now) {
            // Still paying for earlier work: commands that arrive start their bus latency.
            self.bus.pump(now);
            return self.bus.flush();
        }
        self.now = now;
        let metered = !self.cfg.cost.is_free();
        let before = metered.then(|| (self.dev.stats(), self.dma.memory().stats().snapshot()));
        let mut progress = self.bus.flush();
        while let Some(cmd) = self.bus.try_recv(now) {
            progress = true;
            self.stats.commands += 1;
            self.command(cmd, now);
        }
        self.iface.poll_maintenance(now);
        progress |= self.ingress(now);
        self.take_psh_marks();
        self.socks.mark_due(now);
        let mut work = std::mem::take(&mut self.scratch_socks);
        // Service (data to and from host memory, state changes), then egress, of the sockets
        // touched; egress that changes a socket's state (a timeout) services it again.
        for _ in 0..4 {
            if !self.socks.any_dirty() {
                break;
            }
            self.socks.take_dirty(&mut work);
            for &id in &work {
                if self.socks.contains(id) {
                    progress |= self.service_sock(id);
                }
            }
            for &id in &work {
                if !self.socks.contains(id) {
                    continue;
                }
                let before = self.socks.get(id).state();
                progress |= self.egress(id, now);
                if self.socks.get(id).state() != before {
                    self.socks.mark(id);
                }
            }
            // Finished connections go after their last egress (the ACK of the peer's FIN).
            for conn in std::mem::take(&mut self.finished) {
                self.release(conn);
            }
        }
        progress |= self.serve_shaper(now);
        self.scratch_socks = work;
        if let Some((phy0, mem0)) = before {
            let (phy, mem) = (self.dev.stats(), self.dma.memory().stats().snapshot());
            let frames = phy.rx_frames - phy0.rx_frames + phy.tx_frames - phy0.tx_frames;
            let dma = mem.dma_write_bytes - mem0.dma_write_bytes + mem.dma_read_bytes
                - mem0.dma_read_bytes;
            self.busy.charge(now, self.cfg.cost.work_ps(frames, dma));
        }
        let at = self.busy.departs(now);
        while let Some(e) = self.out.pop_front() {
            self.bus.send_at(e, at);
        }
        progress |= self.bus.flush();
        progress
    }

    /// Egress of socket `id` at `now`: as TCP lets it or, for a connection under the
    /// egress shaper, as the shaper lets it (when it must wait, it joins the shaper's queue
    /// with its data still in its send buffer). Returns true if a frame went out.
    fn egress(&mut self, id: SockId, now: Instant) -> bool {
        if !(self.shaper.on() && self.socks.paced(id)) {
            return self.socks.egress(&mut self.iface, &mut self.dev, now, id);
        }
        if self.socks.waiting(id) {
            return false; // its turn comes
        }
        if self.shaper.has_waiting() || !self.shaper.may_send(now) {
            if self.socks.wants_egress(&mut self.iface, now, id) {
                self.wait(id);
            } else {
                self.socks.settle(&mut self.iface, now, id);
            }
            return false;
        }
        self.paced_turn(id, now, usize::MAX)
    }

    /// Send up to `most` segments of paced socket `id` while the shaper has tokens; if it
    /// has more to send then, it waits for its next turn.
    fn paced_turn(&mut self, id: SockId, now: Instant, most: usize) -> bool {
        let mut sent = false;
        let mut stepped = 0;
        while stepped < most && self.shaper.may_send(now) {
            let before = self.dev.tx_payload_bytes();
            if !self
                .socks
                .egress_step(&mut self.iface, &mut self.dev, now, id)
            {
                // Nothing more to send (or it cannot: no neighbour yet).
                self.socks.settle(&mut self.iface, now, id);
                return sent;
            }
            sent = true;
            stepped += 1;
            self.shaper.spend(self.dev.tx_payload_bytes() - before);
        }
        if self.socks.wants_egress(&mut self.iface, now, id) {
            self.wait(id);
        } else {
            self.socks.settle(&mut self.iface, now, id);
        }
        sent
    }

    /// Paced socket `id` waits for the shaper, behind the others.
    fn wait(&mut self, id: SockId) {
        self.socks.set_waiting(id, true);
        self.shaper.push(id);
        self.stats.shaper_waits += 1;
    }

    /// Serve the shaper's queue while it has tokens: a segment per connection per turn.
    fn serve_shaper(&mut self, now: Instant) -> bool {
        let mut progress = false;
        while self.shaper.has_waiting() && self.shaper.may_send(now) {
            let Some(id) = self.shaper.pop() else {
                break;
            };
            if !self.socks.waiting(id) {
                continue; // gone, or taken out of the shaper
            }
            self.socks.set_waiting(id, false);
            let before = self.socks.get(id).state();
            progress |= self.paced_turn(id, now, 1);
            if self.socks.get(id).state() != before {
                self.socks.mark(id);
            }
        }
        progress
    }

    /// Let every connection waiting for the shaper go on as TCP lets it (the shaper was
    /// turned off, or `only` was taken out of it).
    fn release_waiting(&mut self, only: Option<SockId>) {
        match only {
            Some(id) => {
                if self.socks.waiting(id) {
                    self.socks.set_waiting(id, false);
                    self.socks.mark(id);
                }
            }
            None => {
                let ids: Vec<SockId> = self.shaper.drain().collect();
                for id in ids {
                    if self.socks.waiting(id) {
                        self.socks.set_waiting(id, false);
                        self.socks.mark(id);
                    }
                }
            }
        }
    }

    /// Every received frame, one at a time, each against the one socket it belongs to.
    /// Returns true if any frame was processed.
    fn ingress(&mut self, now: Instant) -> bool {
        let mut any = false;
        while let Some(what) = self.dev.stage(now) {
            any = true;
            let target = match what {
                Ingress::Tcp { key, syn, ack } => match self.route(key, syn && !ack, now) {
                    Route::To(id, from_idle) => Some((id, from_idle)),
                    Route::NoSocket => None,
                    Route::Defer => {
                        // No socket took it: the tap's new flow for it goes too.
                        self.dev.drop_staged();
                        self.dev.forget(&key);
                        continue;
                    }
                },
                Ingress::Arp => {
                    self.stats.arp_rescans += 1;
                    self.socks.mark_all();
                    None
                }
                Ingress::Other => None,
            };
            self.socks
                .ingress(&mut self.iface, &mut self.dev, now, target.map(|t| t.0));
            if let (Some((id, from_idle)), Ingress::Tcp { key, .. }) = (target, what) {
                self.socks.mark(id);
                if let Owner::Backlog(port) = self.socks.owner(id) {
                    self.after_backlog_frame(port, id, key, from_idle, now);
                }
            }
        }
        any
    }

    /// Where a segment of `key` goes: to the socket bound to the flow; for a connection
    /// request (`syn_only`) without one, to a listening socket of its port, flagged `true`.
    /// With none left, a half-open socket is recycled, in this order:
    ///
    /// 1. the oldest that could not send its SYN-ACK (its peer's address does not resolve:
    ///    a spoofed source, typically);
    /// 2. the oldest whose SYN-ACK went out [`SYN_ACK_GRACE`] or longer ago (a real peer
    ///    answers within a round trip);
    ///
    /// otherwise, if a half-open socket is left (its SYN-ACK recent), the request is
    /// deferred: dropped without an answer, so that its sender retransmits the SYN, by which
    /// time a handshake has completed or aged. If every backlog socket has a
    /// completed handshake it is refused (RST). Anything else without a flow gets an RST.
    fn route(&mut self, key: FlowKey, syn_only: bool, now: Instant) -> Route {
        if let Some(id) = self.socks.by_flow(&key) {
            return Route::To(id, false);
        }
        if !syn_only {
            self.stats.segments_without_flow += 1;
            return Route::NoSocket;
        }
        let port = key.local_port;
        let Some(l) = self.listeners.get_mut(&port) else {
            return Route::NoSocket;
        };
        if let Some(id) = l.idle.pop() {
            return Route::To(id, true);
        }
        let socks = &self.socks;
        let half_open = l
            .members
            .iter()
            .copied()
            .filter(|&id| socks.get(id).state() == tcp::State::SynReceived);
        let mut unanswered = None;
        let mut aged = None;
        let mut young = false;
        for id in half_open {
            let slot = match socks.syn_ack(id) {
                SynAck::Unresolved => &mut unanswered,
                SynAck::Sent(t) if now - t >= SYN_ACK_GRACE => &mut aged,
                // Recently sent (or, which `after_backlog_frame` rules out, not tried yet).
                SynAck::NotTried | SynAck::Sent(_) => {
                    young = true;
                    continue;
                }
            };
            if slot.is_none_or(|o| socks.seq(id) < socks.seq(o)) {
                *slot = Some(id);
            }
        }
        let Some(victim) = unanswered.or(aged) else {
            if young {
                self.stats.syn_deferred += 1;
                return Route::Defer;
            }
            self.stats.syn_refused += 1;
            return Route::NoSocket;
        };
        self.stats.syn_evictions += 1;
        self.rearm(port, victim);
        match self.listeners.get_mut(&port).and_then(|l| l.idle.pop()) {
            Some(id) => Route::To(id, true),
            None => Route::NoSocket,
        }
    }

    /// Backlog socket `id` of the listener on `port` processed a frame of `key`, at once (so
    /// that the next frame of the same batch finds the backlog as it now is):
    /// - taken from the idle ones for a SYN: if it took it (now half-open) the flow is routed
    ///   to it and its SYN-ACK is sent at once, so that the next SYN of the same batch finds
    ///   it sent or unresolved (recyclable), never untried; otherwise it is idle again;
    /// - a half-open one the peer reset: smoltcp sends it back to LISTEN, still bound to the
    ///   flow and not idle, so it is rearmed (unbound and idle again, or the backlog would
    ///   leak).
    fn after_backlog_frame(
        &mut self,
        port: u16,
        id: SockId,
        key: FlowKey,
        from_idle: bool,
        now: Instant,
    ) {
        match (self.socks.get(id).state(), from_idle) {
            (tcp::State::SynReceived, true) => {
                // Half-open from now: the oldest of these is the first recycled.
                self.socks.stamp(id);
                self.socks.bind_flow(id, key);
                self.socks.egress(&mut self.iface, &mut self.dev, now, id);
            }
            (tcp::State::Listen, true) => {
                if let Some(l) = self.listeners.get_mut(&port) {
                    l.idle.push(id);
                }
            }
            (tcp::State::Listen, false) => self.rearm(port, id),
            _ => {}
        }
    }

    /// PSH marks from the tap, converted to stream offsets: only flows that got some.
    fn take_psh_marks(&mut self) {
        let mut dirty = std::mem::take(&mut self.scratch_flows);
        self.dev.take_psh_dirty(&mut dirty);
        for key in dirty.drain(..) {
            let Some(id) = self.socks.by_flow(&key) else {
                continue;
            };
            let Owner::Conn(conn) = self.socks.owner(id) else {
                // Not offloaded yet: the marks wait in the tap and are taken when the
                // connection is established (in `service_conn`).
                continue;
            };
            let Some(c) = self.conns.get_mut(&conn) else {
                continue;
            };
            if c.phase == Phase::Connecting {
                continue;
            }
            if c.ulp_active() {
                // The engine's records are the delivered stream: the segments' PSH marks
                // do not apply to it (the slot marks record boundaries instead).
                self.dev.take_psh(&key);
                continue;
            }
            let span = self.cfg.socket_rx_bytes as u64;
            self.stats.psh_out_of_window += apply_psh(&mut c.ctx, self.dev.take_psh(&key), span);
            self.socks.mark(id);
        }
        self.scratch_flows = dirty;
    }

    fn refuse(&mut self, conn: Option<ConnId>, error: String) {
        self.stats.command_errors += 1;
        self.out.push_back(Event::CommandError { conn, error });
    }

    /// Mark the socket of `conn` for service; false if the connection is unknown.
    fn touch(&mut self, conn: ConnId) -> bool {
        match self.conns.get(&conn) {
            Some(c) => {
                self.socks.mark(c.handle);
                true
            }
            None => false,
        }
    }

    fn command(&mut self, cmd: Command, now: Instant) {
        let conn = match &cmd {
            Command::PostNamed { conn, .. }
            | Command::ReturnNamed { conn, .. }
            | Command::IndicateAck { conn, .. }
            | Command::Send { conn, .. }
            | Command::Close { conn }
            | Command::Abort { conn }
            | Command::UlpOffload { conn, .. }
            | Command::UlpRegister { conn, .. }
            | Command::UlpRelease { conn, .. }
            | Command::UlpSend { conn, .. }
            | Command::AckHold { conn, .. }
            | Command::Mark { conn, .. }
            | Command::Pace { conn, .. } => Some(*conn),
            _ => None,
        };
        if let Some(conn) = conn {
            self.touch(conn);
        }
        match cmd {
            Command::PostAnonymous { bufs } => {
                for b in bufs {
                    self.anon_len = self.anon_len.max(b.len());
                    self.anon.push(b);
                }
                for conn in std::mem::take(&mut self.starved) {
                    if let Some(c) = self.conns.get_mut(&conn) {
                        c.starved = false;
                        self.socks.mark(c.handle);
                    }
                }
            }
            Command::Listen {
                port,
                backlog,
                params,
            } => {
                if self.listeners.contains_key(&port) {
                    self.out.push_back(Event::ListenFailed {
                        port,
                        error: format!("port {port} is already listening"),
                    });
                    return;
                }
                let mut l = Listener {
                    params,
                    members: Vec::new(),
                    idle: Vec::new(),
                };
                for _ in 0..backlog.max(1) {
                    if let Some(id) = self.listen_socket(port) {
                        l.members.push(id);
                        l.idle.push(id);
                    }
                }
                self.listeners.insert(port, l);
            }
            Command::Unlisten { port } => {
                if let Some(l) = self.listeners.remove(&port) {
                    for id in l.members {
                        self.drop_backlog_socket(id);
                    }
                }
            }
            Command::Connect {
                conn,
                remote,
                local_port,
                params,
            } => self.connect(conn, remote, local_port, params),
            Command::PostNamed {
                conn,
                buf,
                push,
                prefill,
                stream_offset,
                epoch,
            } => match self.conns.get_mut(&conn) {
                Some(c) => {
                    c.ctx
                        .on_post_named(buf, push, prefill, stream_offset, epoch, &mut self.out)
                }
                None => {
                    self.out.push_back(Event::NamedDone {
                        conn,
                        buf,
                        filled: prefill,
                        end_offset: stream_offset,
                        why: ReturnReason::Cancelled,
                        epoch,
                    });
                    self.refuse(Some(conn), format!("PostNamed: unknown connection {conn}"));
                }
            },
            Command::ReturnNamed { conn, why, all } => match self.conns.get_mut(&conn) {
                Some(c) => c.ctx.on_return_named(why, all, &mut self.out),
                None => self.refuse(
                    Some(conn),
                    format!("ReturnNamed: unknown connection {conn}"),
                ),
            },
            Command::IndicateAck { conn, bytes, bufs } => match self.conns.get_mut(&conn) {
                Some(c) => c.ctx.on_ack(bytes, bufs),
                None => self.refuse(
                    Some(conn),
                    format!("IndicateAck: unknown connection {conn}"),
                ),
            },
            Command::Send { conn, buf, len } => match self.conns.get_mut(&conn) {
                Some(c)
                    if !c.close_requested
                        && !c.ulp.as_ref().is_some_and(|u| u.running())
                        && (len as usize) <= buf.len()
                        && len > 0 =>
                {
                    c.tx_queue.push_back(TxBuf {
                        buf,
                        len: len as usize,
                        sent: 0,
                    })
                }
                _ => {
                    self.out.push_back(Event::SendDone {
                        conn,
                        buf,
                        len,
                        ok: false,
                    });
                    self.refuse(
                        Some(conn),
                        format!(
                            "Send: connection {conn} unknown, closing, offloaded to an engine, \
                             or bad length {len}"
                        ),
                    );
                }
            },
            Command::Close { conn } => match self.conns.get_mut(&conn) {
                Some(c) => c.close_requested = true,
                None => self.refuse(Some(conn), format!("Close: unknown connection {conn}")),
            },
            Command::Abort { conn } => match self.conns.get_mut(&conn) {
                Some(c) => {
                    self.socks.get_mut(c.handle).abort();
                    c.close_requested = true;
                    c.closed_local = true;
                    c.aborted = true;
                    c.ctx.return_all(ReturnReason::Cancelled, &mut self.out);
                }
                None => self.refuse(Some(conn), format!("Abort: unknown connection {conn}")),
            },
            Command::UlpOffload {
                conn,
                engine,
                params,
                stream_offset,
                carry,
            } => {
                let factory = self.engines.iter().find(|f| f.name() == engine).cloned();
                match self.conns.get_mut(&conn) {
                    Some(c) if c.phase == Phase::Open && !c.close_requested => {
                        let position = c.ctx.position();
                        if stream_offset < position {
                            // Stale: what the held named buffers took goes to the driver
                            // first, so that the retry finds everything delivered there.
                            c.ctx.return_all(ReturnReason::Cancelled, &mut self.out);
                        }
                        let u = c.ulp.get_or_insert_with(Box::default);
                        let started = u.offload(
                            conn,
                            factory.as_deref(),
                            &params,
                            stream_offset,
                            &carry,
                            position,
                            now,
                            &self.dma,
                            &mut self.out,
                        );
                        if started {
                            // PSH marks of the raw stream mean nothing in the records.
                            c.ctx.clear_psh_marks();
                            mark_records_end(&mut c.ctx, u);
                        }
                    }
                    _ => self.out.push_back(Event::UlpRefused {
                        conn,
                        position: 0,
                        stale: false,
                        error: format!(
                            "UlpOffload: connection {conn} unknown, not open, or closing"
                        ),
                    }),
                }
            }
            Command::UlpRegister { conn, tag, buf } => match self.conns.get_mut(&conn) {
                Some(c) => {
                    c.ulp
                        .get_or_insert_with(Box::default)
                        .register(conn, tag, buf, &mut self.out)
                }
                None => {
                    self.out.push_back(Event::UlpReleased {
                        conn,
                        tag,
                        buf,
                        placed: 0,
                    });
                    self.refuse(
                        Some(conn),
                        format!("UlpRegister: unknown connection {conn}"),
                    );
                }
            },
            Command::UlpRelease { conn, tag } => {
                match self.conns.get_mut(&conn).and_then(|c| c.ulp.as_mut()) {
                    Some(u) => u.release(conn, tag, &mut self.out),
                    None => self.refuse(
                        Some(conn),
                        format!("UlpRelease: connection {conn} unknown or without tags"),
                    ),
                }
            }
            Command::AckHold { conn, hold } => match self.conns.get(&conn) {
                Some(c) => {
                    let s = self.socks.get_mut(c.handle);
                    match hold {
                        Some(h) => {
                            let us = u64::from(h.window_us.max(1));
                            s.set_ack_delay(Some(Duration::from_micros(us)));
                            s.set_ack_hold(Some(s.recv_capacity() / 2));
                        }
                        None => {
                            s.set_ack_delay(self.cfg.ack_delay);
                            s.set_ack_hold(None);
                        }
                    }
                }
                None => self.refuse(Some(conn), format!("AckHold: unknown connection {conn}")),
            },
            Command::Mark { conn, dscp } => {
                match self
                    .conns
                    .get(&conn)
                    .and_then(|c| self.socks.flow(c.handle))
                {
                    Some(_) if dscp > 63 => {
                        self.refuse(Some(conn), format!("Mark: DSCP {dscp} is not 0..=63"))
                    }
                    Some(k) => self.dev.set_mark(k, dscp),
                    None => self.refuse(Some(conn), format!("Mark: unknown connection {conn}")),
                }
            }
            Command::Shape {
                bytes_per_s,
                burst_bytes,
            } => {
                self.shaper.set(now, bytes_per_s, burst_bytes);
                if !self.shaper.on() {
                    self.release_waiting(None);
                }
            }
            Command::Pace { conn, on } => match self.conns.get(&conn).map(|c| c.handle) {
                Some(h) => {
                    self.socks.set_paced(h, on);
                    if !on {
                        self.release_waiting(Some(h));
                    }
                }
                None => self.refuse(Some(conn), format!("Pace: unknown connection {conn}")),
            },
            Command::UlpSend { conn, request } => {
                match self.conns.get_mut(&conn).and_then(|c| c.ulp.as_mut()) {
                    Some(u) if u.running() => u.send(request),
                    _ => self.refuse(
                        Some(conn),
                        format!("UlpSend: no engine runs connection {conn}"),
                    ),
                }
            }
        }
    }

    /// A fresh listening socket on `port`, owned by its backlog.
    fn listen_socket(&mut self, port: u16) -> Option<SockId> {
        let mut s = make_socket(
            self.cfg.socket_rx_bytes,
            self.cfg.socket_tx_bytes,
            self.cfg.ack_delay,
            self.cfg.congestion,
        );
        // The SYN-RECEIVED timeout: a half-open connection (a spoofed SYN) is abandoned.
        s.set_timeout(self.cfg.syn_timeout);
        // Keep-alive set before the handshake: smoltcp starts the interval when the handshake
        // completes (set later, it would send a first probe at once).
        s.set_keep_alive(self.cfg.keepalive);
        s.listen(port).ok()?;
        Some(self.socks.add(s, Owner::Backlog(port)))
    }

    /// Remove a backlog socket, forgetting its flow in the tap.
    fn drop_backlog_socket(&mut self, id: SockId) {
        if let Some(k) = self.socks.flow(id) {
            self.dev.forget(&k);
        }
        self.held.retain(|&h| h != id);
        self.socks.remove(id);
    }

    /// Put backlog socket `id` of the listener on `port` (a half-open handshake, recycled or
    /// reset by its peer) back to listening, idle, forgetting its flow; its buffers are kept
    /// ([`Sockets::relisten`]). If it cannot listen it is replaced by a fresh socket.
    fn rearm(&mut self, port: u16, id: SockId) {
        if let Some(k) = self.socks.flow(id) {
            self.dev.forget(&k);
        }
        self.held.retain(|&h| h != id);
        if !self.socks.relisten(id, port) {
            self.drop_backlog_socket(id);
            self.replace_member(port, id);
            return;
        }
        if let Some(l) = self.listeners.get_mut(&port) {
            // A half-open socket left the idle ones when it took its SYN.
            debug_assert!(!l.idle.contains(&id));
            l.idle.push(id);
        }
    }

    /// Take `old` out of the backlog of the listener on `port` (dropped, or promoted to a
    /// connection) and put a fresh listening socket in its place.
    fn replace_member(&mut self, port: u16, old: SockId) {
        let fresh = self.listen_socket(port);
        if let Some(l) = self.listeners.get_mut(&port) {
            l.members.retain(|&m| m != old);
            l.idle.retain(|&m| m != old);
            if let Some(id) = fresh {
                l.members.push(id);
                l.idle.push(id);
            }
        }
    }

    fn new_conn(&self, handle: SockId, conn: ConnId, params: OffloadParams) -> NicConn {
        NicConn {
            handle,
            params,
            listener: None,
            phase: Phase::Connecting,
            ctx: OffloadCtx::new(conn, params.policy, params.indicate_window),
            tx_queue: VecDeque::new(),
            tx_enqueued: 0,
            tx_wait: VecDeque::new(),
            close_requested: false,
            closed_local: false,
            aborted: false,
            eof_sent: false,
            fin_seen: false,
            starved: false,
            ulp: None,
            acks_seen: self.socks.get(handle).ack_stats(),
        }
    }

    fn connect(
        &mut self,
        conn: ConnId,
        remote: SocketAddrV4,
        local_port: u16,
        params: OffloadParams,
    ) {
        if self.conns.contains_key(&conn) || conn.0 & ConnId::PASSIVE_BIT != 0 {
            self.out.push_back(Event::ConnectFailed {
                conn,
                error: format!("connection id {conn} is in use or reserved"),
            });
            return;
        }
        if self.conns.len() >= self.cfg.max_conns {
            self.stats.conn_limit_hits += 1;
            self.out.push_back(Event::ConnectFailed {
                conn,
                error: format!("connection limit {} reached", self.cfg.max_conns),
            });
            return;
        }
        let key = |port| FlowKey {
            remote_ip: *remote.ip(),
            remote_port: remote.port(),
            local_port: port,
        };
        let port = if local_port != 0 {
            local_port
        } else {
            // The next ephemeral port whose flow to `remote` is free.
            let mut tries = 0;
            loop {
                self.next_port = if self.next_port == u16::MAX {
                    49152
                } else {
                    self.next_port + 1
                };
                tries += 1;
                if self.socks.by_flow(&key(self.next_port)).is_none() || tries > 16_384 {
                    break self.next_port;
                }
            }
        };
        if self.socks.by_flow(&key(port)).is_some() {
            self.out.push_back(Event::ConnectFailed {
                conn,
                error: format!("connect to {remote}: local port {port} is in use"),
            });
            return;
        }
        let mut s = make_socket(
            self.cfg.socket_rx_bytes,
            self.cfg.socket_tx_bytes,
            self.cfg.ack_delay,
            self.cfg.congestion,
        );
        s.set_timeout(self.cfg.syn_timeout);
        s.set_keep_alive(self.cfg.keepalive);
        let cx = self.iface.context();
        let remote_ep = IpEndpoint::new(IpAddress::Ipv4(*remote.ip()), remote.port());
        if let Err(e) = s.connect(cx, remote_ep, port) {
            self.out.push_back(Event::ConnectFailed {
                conn,
                error: format!("connect to {remote}: {e}"),
            });
            return;
        }
        let h = self.socks.add(s, Owner::Conn(conn));
        self.socks.bind_flow(h, key(port));
        let c = self.new_conn(h, conn, params);
        self.conns.insert(conn, Box::new(c));
    }

    /// Service socket `id` for its owner; returns true if anything moved.
    fn service_sock(&mut self, id: SockId) -> bool {
        self.stats.sockets_serviced += 1;
        match self.socks.owner(id) {
            Owner::Conn(conn) => {
                if !self.conns.contains_key(&conn) {
                    return false;
                }
                let (moved, finished) = self.service_conn(conn);
                if finished {
                    self.finished.push(conn);
                }
                moved
            }
            Owner::Backlog(port) => self.service_backlog(port, id),
        }
    }

    /// A backlog socket changed: a finished handshake is promoted to a connection
    /// (or held in the backlog at the connection limit: its data stays in the socket, the
    /// peer is throttled by TCP's window, and it is promoted as soon as a connection is
    /// released); a handshake that timed out or was reset is replaced by a fresh socket.
    fn service_backlog(&mut self, port: u16, id: SockId) -> bool {
        match self.socks.get(id).state() {
            tcp::State::Listen | tcp::State::SynReceived => false,
            tcp::State::Closed | tcp::State::TimeWait => {
                self.rearm(port, id);
                true
            }
            _ if self.conns.len() >= self.cfg.max_conns => {
                if !self.held.contains(&id) {
                    self.held.push_back(id);
                }
                false
            }
            _ => {
                let (conn, skipped) =
                    next_free_id(&mut self.next_passive, ConnId::PASSIVE_BIT, |id| {
                        self.conns.contains_key(&id)
                    });
                self.stats.ids_skipped += skipped;
                let Some(params) = self.listeners.get(&port).map(|l| l.params) else {
                    return false;
                };
                let mut c = self.new_conn(id, conn, params);
                c.listener = Some(port);
                self.conns.insert(conn, Box::new(c));
                self.socks.set_owner(id, Owner::Conn(conn));
                self.held.retain(|&h| h != id);
                self.replace_member(port, id);
                self.service_sock(id);
                true
            }
        }
    }

    /// Release a finished connection: its socket, its flow, its slot (a held backlog socket
    /// may take it).
    fn release(&mut self, conn: ConnId) {
        let Some(mut c) = self.conns.remove(&conn) else {
            return;
        };
        let acks = self.socks.get(c.handle).ack_stats();
        harvest_acks(&mut self.stats, &mut c.acks_seen, acks);
        if let Some(k) = self.socks.flow(c.handle) {
            self.dev.forget(&k);
        }
        self.socks.remove(c.handle);
        while self.conns.len() < self.cfg.max_conns {
            let Some(h) = self.held.pop_front() else {
                break;
            };
            if self.socks.contains(h) && matches!(self.socks.owner(h), Owner::Backlog(_)) {
                self.socks.mark(h);
                break;
            }
        }
    }

    /// Returns (progress, connection finished and must be released).
    fn service_conn(&mut self, id: ConnId) -> (bool, bool) {
        let c = self.conns.get_mut(&id).expect("id from keys");
        let sock = self.socks.get_mut(c.handle);
        harvest_acks(&mut self.stats, &mut c.acks_seen, sock.ack_stats());
        let mut moved = false;
        let state = sock.state();

        if c.phase == Phase::Connecting {
            match state {
                tcp::State::SynSent | tcp::State::SynReceived => return (false, false),
                tcp::State::Closed => {
                    // Named buffers posted during the handshake come back first.
                    c.ctx.return_all(ReturnReason::Cancelled, &mut self.out);
                    self.out.push_back(Event::ConnectFailed {
                        conn: id,
                        error: "connection refused or timed out".into(),
                    });
                    return (true, true);
                }
                _ => {
                    let (Some(local), Some(remote)) =
                        (sock.local_endpoint(), sock.remote_endpoint())
                    else {
                        return (false, false);
                    };
                    let (local, remote) = (v4(local), v4(remote));
                    c.phase = Phase::Open;
                    let win = effective_window(self.cfg.mtu, sock.remote_mss(), &c.params);
                    // Keep the context: named buffers posted during the handshake stay.
                    c.ctx.set_window(win);
                    // From the handshake timeout to the dead-peer timeout of an open connection
                    // (the keep-alive interval was set when the socket was made).
                    sock.set_timeout(self.cfg.idle_timeout);
                    let key = FlowKey {
                        remote_ip: *remote.ip(),
                        remote_port: remote.port(),
                        local_port: local.port(),
                    };
                    // Segments of the flow already reach this socket (bound at the SYN or
                    // the connect).
                    self.dev.confirm(&key);
                    let span = self.cfg.socket_rx_bytes as u64;
                    self.stats.psh_out_of_window +=
                        apply_psh(&mut c.ctx, self.dev.take_psh(&key), span);
                    self.stats.established += 1;
                    self.out.push_back(Event::Established {
                        conn: id,
                        local,
                        remote,
                        listener: c.listener,
                        indicate_window: win,
                    });
                    moved = true;
                }
            }
        }

        // Receive: stack -> host memory (through the engine, if one runs: stack -> engine
        // -> records -> host memory).
        let now = self.now;
        loop {
            let avail = match c.ulp.as_deref_mut() {
                Some(u) if u.running() => {
                    moved |= feed_engine(sock, u, &mut c.ctx, id, now, &self.dma, &mut self.out);
                    u.available()
                }
                Some(u) if u.frozen().is_some() => 0,
                _ => sock.recv_queue(),
            };
            let ulp = c.ulp.as_deref_mut().filter(|u| u.running());
            match c.ctx.plan(avail, self.anon_len) {
                Plan::Hold => break,
                Plan::Named { at, max } => {
                    let buf = c.ctx.head_named_mut().expect("plan said named");
                    let n = match ulp {
                        Some(u) => u.deliver(&self.dma, buf, at, max),
                        None => recv_into(sock, &self.dma, buf, at, max),
                    };
                    if n == 0 {
                        break;
                    }
                    c.ctx.placed_named(n, &mut self.out);
                    moved = true;
                }
                Plan::Anonymous { max } => {
                    let Some(mut buf) = self.anon.pop() else {
                        self.stats.anon_starved += 1;
                        if !c.starved {
                            c.starved = true;
                            self.starved.push(id);
                        }
                        break;
                    };
                    let max = max.min(buf.len());
                    let n = match ulp {
                        Some(u) => u.deliver(&self.dma, &mut buf, 0, max),
                        None => recv_into(sock, &self.dma, &mut buf, 0, max),
                    };
                    if n == 0 {
                        self.anon.push(buf);
                        break;
                    }
                    c.ctx.indicated(buf, n, &mut self.out);
                    moved = true;
                }
            }
        }

        // End of the peer's stream: everything before the FIN is delivered.
        let records_waiting = c.ulp.as_ref().is_some_and(|u| u.available() > 0);
        if !c.eof_sent
            && sock.recv_queue() == 0
            && !records_waiting
            && !sock.may_recv()
            && rx_finished(sock)
        {
            c.eof_sent = true;
            c.ctx.return_all(ReturnReason::Eof, &mut self.out);
            self.out.push_back(Event::PeerClosed { conn: id });
            moved = true;
        }

        // Transmit: host memory -> stack (the NIC segments large buffers).
        while let Some(front) = c.tx_queue.front_mut() {
            if !sock.can_send() {
                break;
            }
            let dma = &self.dma;
            let n = sock
                .send(|space| {
                    let k = space.len().min(front.len - front.sent);
                    dma.read(&front.buf, front.sent, &mut space[..k]);
                    (k, k)
                })
                .unwrap_or(0);
            if n == 0 {
                break;
            }
            moved = true;
            front.sent += n;
            c.tx_enqueued += n as u64;
            if front.sent == front.len {
                let t = c.tx_queue.pop_front().expect("front exists");
                c.tx_wait.push_back((c.tx_enqueued, t.buf, t.len));
            }
        }
        // The engine's output, once the host's own sends before the offload are in.
        if let (true, Some(u)) = (c.tx_queue.is_empty(), c.ulp.as_deref_mut()) {
            loop {
                u.pump(id, now, &self.dma, &mut self.out);
                let pending = u.wire_pending();
                if pending.is_empty() || !sock.can_send() {
                    break;
                }
                let n = sock.send_slice(pending).unwrap_or(0);
                if n == 0 {
                    break;
                }
                u.wire_sent(n);
                c.tx_enqueued += n as u64;
                moved = true;
            }
        }
        let acked = c.tx_enqueued - sock.send_queue() as u64;
        while c.tx_wait.front().is_some_and(|(end, _, _)| *end <= acked) {
            let (_, buf, len) = c.tx_wait.pop_front().expect("front exists");
            self.out.push_back(Event::SendDone {
                conn: id,
                buf,
                len: len as u32,
                ok: true,
            });
            moved = true;
        }
        if c.close_requested
            && !c.closed_local
            && c.tx_queue.is_empty()
            && c.ulp.as_ref().is_none_or(|u| u.tx_idle())
        {
            sock.close();
            c.closed_local = true;
            moved = true;
        }

        // Teardown. A peer that sent FIN may still have data of ours in the stack (delivery
        // suspended at W): the context lives until that data and the EOF are delivered. A
        // socket that closed without FIN was reset (or aborted): its data is discarded, as
        // TCP's RST semantics require.
        let state = sock.state();
        c.fin_seen |= matches!(
            state,
            tcp::State::CloseWait
                | tcp::State::LastAck
                | tcp::State::Closing
                | tcp::State::TimeWait
        );
        let finished = matches!(state, tcp::State::Closed | tcp::State::TimeWait)
            && (c.eof_sent || !c.fin_seen || c.aborted);
        if finished {
            let reset = !(c.aborted || (c.closed_local && c.eof_sent));
            let why = if reset {
                ReturnReason::Reset
            } else {
                ReturnReason::Cancelled
            };
            c.ctx.return_all(why, &mut self.out);
            if let Some(u) = c.ulp.as_mut() {
                u.teardown(id, &mut self.out);
            }
            for t in c.tx_queue.drain(..) {
                self.out.push_back(Event::SendDone {
                    conn: id,
                    buf: t.buf,
                    len: t.len as u32,
                    ok: false,
                });
            }
            for (_, buf, len) in c.tx_wait.drain(..) {
                self.out.push_back(Event::SendDone {
                    conn: id,
                    buf,
                    len: len as u32,
                    ok: false,
                });
            }
            if reset {
                self.stats.resets += 1;
                self.out.push_back(Event::Reset { conn: id });
            }
            self.out.push_back(Event::Closed { conn: id });
        }
        (moved || finished, finished)
    }
}

/// Hand the tap's PSH marks (peer ISN, sequence numbers just past PSH segments) to `ctx` as
/// stream offsets. A mark can only lie within `span` bytes (the socket's receive buffer, which
/// bounds the receive window) past the delivery position; others come from segments outside
/// the window, which TCP dropped, and are ignored. Returns how many were ignored.
fn apply_psh(ctx: &mut OffloadCtx, marks: Option<(u32, Vec<u32>)>, span: u64) -> u64 {
    let mut ignored = 0;
    if let Some((isn, ends)) = marks {
        for e in ends {
            let low = e.wrapping_sub(isn).wrapping_sub(1);
            let at = extend_offset(ctx.position(), low);
            if at > ctx.position() + span {
                ignored += 1;
                continue;
            }
            ctx.add_psh_mark(at);
        }
    }
    ignored
}

/// Give the engine of `u` what the socket holds, while the slot has room; a push is marked
/// at the end of the records each step produced (records are whole). Returns whether
/// anything was taken.
fn feed_engine(
    sock: &mut tcp::Socket<'_>,
    u: &mut UlpConn,
    ctx: &mut OffloadCtx,
    conn: ConnId,
    now: Instant,
    dma: &Dma,
    out: &mut VecDeque<Event>,
) -> bool {
    let mut any = false;
    loop {
        let room = u.room();
        if room == 0 {
            break;
        }
        let mut produced = false;
        let n = sock
            .recv(|data| {
                let k = data.len().min(room);
                if k > 0 {
                    produced = u.feed(conn, now, &data[..k], dma, out);
                }
                (k, k)
            })
            .unwrap_or(0);
        if produced {
            mark_records_end(ctx, u);
        }
        if n == 0 {
            break;
        }
        any = true;
    }
    any
}

/// Mark a push where the records waiting in `u` end (they are whole): a push-mode named
/// buffer comes back on a record boundary. Nothing to mark without records.
fn mark_records_end(ctx: &mut OffloadCtx, u: &UlpConn) {
    if u.available() > 0 {
        ctx.add_psh_mark(ctx.position() + u.available() as u64);
    }
}

fn rx_finished(sock: &mut tcp::Socket<'_>) -> bool {
    matches!(sock.recv(|_| (0, ())), Err(tcp::RecvError::Finished))
}

/// Move up to `max` bytes from the socket into `buf` at `at` with the DMA engine.
fn recv_into(
    sock: &mut tcp::Socket<'_>,
    dma: &Dma,
    buf: &mut HostBuf,
    at: usize,
    max: usize,
) -> usize {
    let mut n = 0;
    while n < max {
        let k = sock
            .recv(|data| {
                let k = data.len().min(max - n);
                if k > 0 {
                    dma.write(buf, at + n, &data[..k]);
                }
                (k, k)
            })
            .unwrap_or(0);
        if k == 0 {
            break;
        }
        n += k;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::{extend_offset, next_free_id};
    use toe_bus::ConnId;

    #[test]
    fn passive_ids_wrap_without_reusing_live_ones() {
        let live = [
            ConnId(ConnId::PASSIVE_BIT | 1),
            ConnId(ConnId::PASSIVE_BIT | 2),
        ];
        let mut next = ConnId::PASSIVE_BIT - 2;
        let in_use = |id| live.contains(&id);
        let (a, _) = next_free_id(&mut next, ConnId::PASSIVE_BIT, in_use);
        assert_eq!(a, ConnId(ConnId::PASSIVE_BIT | (ConnId::PASSIVE_BIT - 1)));
        // wraps: 0 is never an id, 1 and 2 are live
        let (b, skipped) = next_free_id(&mut next, ConnId::PASSIVE_BIT, in_use);
        assert_eq!((b, skipped), (ConnId(ConnId::PASSIVE_BIT | 3), 3));
    }

    #[test]
    fn offsets_extend_across_wraps() {
        assert_eq!(extend_offset(0, 100), 100);
        assert_eq!(extend_offset((1 << 32) - 10, 5), (1 << 32) + 5);
        assert_eq!(extend_offset((1 << 32) + 5, u32::MAX - 3), (1 << 32) - 4);
        assert_eq!(extend_offset(5 << 32, 7), (5 << 32) + 7);
    }
}
