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

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, IpEndpoint};

use toe_bus::{
    Command, ConnId, Dma, Event, HostBuf, HostMemory, NicEnd, OffloadParams, ReturnReason, RxPolicy,
};

use crate::offload::{OffloadCtx, OffloadStats, Plan};
use crate::phy::{FlowKey, NicDevice, Phy, PhyStats};

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
            syn_timeout: Some(Duration::from_secs(5)),
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
    /// Half-open (SYN-RECEIVED) listener sockets recycled, oldest first, so that a new SYN
    /// finds a listening socket (a SYN flood cannot lock clients out).
    pub syn_evictions: u64,
    /// PSH marks dropped because they lay outside the connection's receive window.
    pub psh_out_of_window: u64,
    /// Passive connection ids skipped because they were still in use (after a wrap).
    pub ids_skipped: u64,
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
    handle: SocketHandle,
    params: OffloadParams,
    listener: Option<u16>,
    phase: Phase,
    ctx: OffloadCtx,
    flow: Option<FlowKey>,
    tx_queue: VecDeque<TxBuf>,
    tx_enqueued: u64,
    /// Sends copied into the stack: (stream end offset, buffer, length).
    tx_wait: VecDeque<(u64, HostBuf, usize)>,
    close_requested: bool,
    closed_local: bool,
    aborted: bool,
    eof_sent: bool,
    fin_seen: bool,
}

#[derive(Debug)]
struct Listener {
    params: OffloadParams,
    /// The backlog: (socket, arming sequence number; lower = armed earlier).
    sockets: Vec<(SocketHandle, u64)>,
}

/// The simulated NIC.
pub struct Nic<P: Phy> {
    cfg: NicConfig,
    iface: Interface,
    sockets: SocketSet<'static>,
    dev: NicDevice<P>,
    bus: NicEnd,
    dma: Dma,
    conns: BTreeMap<ConnId, NicConn>,
    listeners: BTreeMap<u16, Listener>,
    anon: Vec<HostBuf>,
    anon_len: usize,
    out: VecDeque<Event>,
    next_passive: u32,
    next_port: u16,
    /// Sequence number for arming listener sockets (age order for SYN eviction).
    arm_seq: u64,
    stats: NicStats,
    scratch_ids: Vec<ConnId>,
    scratch_flows: Vec<FlowKey>,
    by_flow: BTreeMap<FlowKey, ConnId>,
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
/// must not wait for the delayed ACK of the previous segment).
pub fn make_socket(
    rx_bytes: usize,
    tx_bytes: usize,
    ack_delay: Option<Duration>,
) -> tcp::Socket<'static> {
    let mut s = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; rx_bytes]),
        tcp::SocketBuffer::new(vec![0; tx_bytes]),
    );
    s.set_nagle_enabled(false);
    s.set_ack_delay(ack_delay);
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
            sockets: SocketSet::new(Vec::new()),
            dev,
            bus,
            dma: Dma::new(mem),
            conns: BTreeMap::new(),
            listeners: BTreeMap::new(),
            anon: Vec::new(),
            anon_len: 0,
            out: VecDeque::new(),
            next_passive: 0,
            arm_seq: 0,
            stats: NicStats::default(),
            scratch_ids: Vec::new(),
            scratch_flows: Vec::new(),
            by_flow: BTreeMap::new(),
        }
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
            .map(|c| self.sockets.get::<tcp::Socket<'_>>(c.handle).recv_queue())
    }
    /// A clone of the command ring's receiver, for runtimes that sleep until there is work.
    pub fn command_waitable(&self) -> crossbeam_channel::Receiver<Command> {
        self.bus.command_receiver().clone()
    }
    /// Local TCP port of an established connection.
    pub fn local_port(&self, conn: ConnId) -> Option<u16> {
        self.conns.get(&conn)?.flow.map(|k| k.local_port)
    }
    /// Offloaded connections.
    pub fn conn_count(&self) -> usize {
        self.conns.len()
    }

    /// The latest time `poll` must run again (smoltcp timers); `None` if only new input can
    /// create work.
    pub fn poll_at(&mut self, now: Instant) -> Option<Instant> {
        if !self.out.is_empty() || self.bus.staged() > 0 {
            return Some(now);
        }
        [
            self.iface.poll_at(now, &self.sockets),
            self.dev.phy().poll_at(),
            self.bus.next_due(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Run the NIC once at `now`. Returns true if anything happened.
    pub fn poll(&mut self, now: Instant) -> bool {
        let mut progress = self.bus.flush();
        while let Some(cmd) = self.bus.try_recv(now) {
            progress = true;
            self.stats.commands += 1;
            self.command(cmd, now);
        }
        for _ in 0..4 {
            let changed = self.stack(now);
            let moved = self.service(now);
            progress |= changed || moved;
            if !moved {
                break;
            }
        }
        while let Some(e) = self.out.pop_front() {
            self.bus.send(e);
        }
        progress |= self.bus.flush();
        progress
    }

    /// Run smoltcp: every received frame, one at a time (after a connection request the
    /// listener is kept listening, see [`Nic::keep_listening`]), then egress.
    /// Returns true if a socket's state may have changed.
    fn stack(&mut self, now: Instant) -> bool {
        use smoltcp::iface::{PollIngressSingleResult, PollResult};
        let mut changed = false;
        self.iface.poll_maintenance(now);
        loop {
            match self
                .iface
                .poll_ingress_single(now, &mut self.dev, &mut self.sockets)
            {
                PollIngressSingleResult::None => break,
                PollIngressSingleResult::PacketProcessed => {}
                PollIngressSingleResult::SocketStateChanged => changed = true,
            }
            if let Some(port) = self.dev.take_syn_port() {
                self.keep_listening(port);
            }
        }
        while self
            .iface
            .poll_egress(now, &mut self.dev, &mut self.sockets)
            == PollResult::SocketStateChanged
        {
            changed = true;
        }
        changed
    }

    fn refuse(&mut self, conn: Option<ConnId>, error: String) {
        self.stats.command_errors += 1;
        self.out.push_back(Event::CommandError { conn, error });
    }

    fn command(&mut self, cmd: Command, _now: Instant) {
        match cmd {
            Command::PostAnonymous { bufs } => {
                for b in bufs {
                    self.anon_len = self.anon_len.max(b.len());
                    self.anon.push(b);
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
                    sockets: Vec::new(),
                };
                for _ in 0..backlog.max(1) {
                    if let Some(h) = self.listen_socket(port) {
                        self.arm_seq += 1;
                        l.sockets.push((h, self.arm_seq));
                    }
                }
                self.listeners.insert(port, l);
            }
            Command::Unlisten { port } => {
                if let Some(l) = self.listeners.remove(&port) {
                    for (h, _) in l.sockets {
                        self.sockets.remove(h);
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
                Some(c) if !c.close_requested && (len as usize) <= buf.len() && len > 0 => {
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
                        format!("Send: connection {conn} unknown, closing, or bad length {len}"),
                    );
                }
            },
            Command::Close { conn } => match self.conns.get_mut(&conn) {
                Some(c) => c.close_requested = true,
                None => self.refuse(Some(conn), format!("Close: unknown connection {conn}")),
            },
            Command::Abort { conn } => match self.conns.get_mut(&conn) {
                Some(c) => {
                    self.sockets.get_mut::<tcp::Socket<'_>>(c.handle).abort();
                    c.close_requested = true;
                    c.closed_local = true;
                    c.aborted = true;
                    c.ctx.return_all(ReturnReason::Cancelled, &mut self.out);
                }
                None => self.refuse(Some(conn), format!("Abort: unknown connection {conn}")),
            },
        }
    }

    fn listen_socket(&mut self, port: u16) -> Option<SocketHandle> {
        let mut s = make_socket(
            self.cfg.socket_rx_bytes,
            self.cfg.socket_tx_bytes,
            self.cfg.ack_delay,
        );
        // The SYN-RECEIVED timeout: a half-open connection (a spoofed SYN) is abandoned.
        s.set_timeout(self.cfg.syn_timeout);
        // Keep-alive set before the handshake: smoltcp starts the interval when the handshake
        // completes (set later, it would send a first probe at once).
        s.set_keep_alive(self.cfg.keepalive);
        s.listen(port).ok()?;
        Some(self.sockets.add(s))
    }

    /// After a connection request (SYN) to `port` was processed: if its listener has no
    /// socket left in LISTEN, it recycles its oldest half-open one, so the next SYN is not
    /// refused. A flood of spoofed SYNs then only churns the backlog; a real client's
    /// handshake completes in one round trip, long before the flood pushes it out (a burst of
    /// real clients larger than the backlog is served as their SYNs are retransmitted).
    fn keep_listening(&mut self, port: u16) {
        let Some(l) = self.listeners.get(&port) else {
            return;
        };
        let mut oldest: Option<(usize, u64)> = None;
        for (i, &(h, seq)) in l.sockets.iter().enumerate() {
            match self.sockets.get::<tcp::Socket<'_>>(h).state() {
                tcp::State::Listen => return,
                tcp::State::SynReceived if oldest.is_none_or(|(_, o)| seq < o) => {
                    oldest = Some((i, seq));
                }
                _ => {}
            }
        }
        if let Some((i, _)) = oldest {
            self.rearm(port, i);
            self.stats.syn_evictions += 1;
        }
    }

    /// Replace backlog socket `i` of the listener on `port` (a half-open or finished
    /// handshake) with a fresh listening socket, forgetting its flow. A fresh socket, not the
    /// old one listening again: smoltcp keeps per-socket egress state (a neighbour it is
    /// waiting to resolve holds the socket silent for a second), which must not delay the
    /// next client's SYN-ACK.
    fn rearm(&mut self, port: u16, i: usize) {
        let Some(old) = self.listeners.get(&port).map(|l| l.sockets[i].0) else {
            return;
        };
        if let Some(remote) = self.sockets.get::<tcp::Socket<'_>>(old).remote_endpoint() {
            self.dev.forget(&FlowKey {
                remote_ip: *v4(remote).ip(),
                remote_port: remote.port,
                local_port: port,
            });
        }
        self.sockets.remove(old);
        let fresh = self.listen_socket(port);
        self.arm_seq += 1;
        let seq = self.arm_seq;
        if let Some(l) = self.listeners.get_mut(&port) {
            match fresh {
                Some(h) => l.sockets[i] = (h, seq),
                None => {
                    l.sockets.remove(i);
                }
            }
        }
    }

    fn new_conn(&self, handle: SocketHandle, conn: ConnId, params: OffloadParams) -> NicConn {
        NicConn {
            handle,
            params,
            listener: None,
            phase: Phase::Connecting,
            ctx: OffloadCtx::new(conn, params.policy, params.indicate_window),
            flow: None,
            tx_queue: VecDeque::new(),
            tx_enqueued: 0,
            tx_wait: VecDeque::new(),
            close_requested: false,
            closed_local: false,
            aborted: false,
            eof_sent: false,
            fin_seen: false,
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
        let port = if local_port != 0 {
            local_port
        } else {
            self.next_port = if self.next_port == u16::MAX {
                49152
            } else {
                self.next_port + 1
            };
            self.next_port
        };
        let mut s = make_socket(
            self.cfg.socket_rx_bytes,
            self.cfg.socket_tx_bytes,
            self.cfg.ack_delay,
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
        let h = self.sockets.add(s);
        let c = self.new_conn(h, conn, params);
        self.conns.insert(conn, c);
    }

    /// Promote listener sockets that completed a handshake; returns true if any did. At the
    /// connection limit they wait in the backlog (their data stays in the socket, the peer is
    /// throttled by TCP's window) and are promoted as soon as a connection is released.
    fn accept_listeners(&mut self) -> bool {
        // Fast path (every poll): no socket needs anything. Sockets held in the backlog at
        // the connection limit need nothing until a connection is released.
        let sockets = &self.sockets;
        let at_limit = self.conns.len() >= self.cfg.max_conns;
        let any = self.listeners.values().any(|l| {
            l.sockets
                .iter()
                .any(|&(h, _)| match sockets.get::<tcp::Socket<'_>>(h).state() {
                    tcp::State::Listen | tcp::State::SynReceived => false,
                    tcp::State::Closed | tcp::State::TimeWait => true,
                    _ => !at_limit,
                })
        });
        if !any {
            return false;
        }
        let mut moved = false;
        let ports: Vec<u16> = self.listeners.keys().copied().collect();
        for port in ports {
            let handles = self.listeners[&port].sockets.clone();
            for (h, _) in handles {
                let state = self.sockets.get::<tcp::Socket<'_>>(h).state();
                match state {
                    tcp::State::Listen | tcp::State::SynReceived => {}
                    tcp::State::Closed | tcp::State::TimeWait => {
                        // A handshake timed out or was reset: forget its flow, listen again.
                        if let Some(i) = self.listeners[&port].sockets.iter().position(|x| x.0 == h)
                        {
                            self.rearm(port, i);
                        }
                    }
                    // Held in the backlog until a connection is released.
                    _ if self.conns.len() >= self.cfg.max_conns => {}
                    _ => {
                        moved = true;
                        let (conn, skipped) =
                            next_free_id(&mut self.next_passive, ConnId::PASSIVE_BIT, |id| {
                                self.conns.contains_key(&id)
                            });
                        self.stats.ids_skipped += skipped;
                        let params = self.listeners[&port].params;
                        let mut c = self.new_conn(h, conn, params);
                        c.listener = Some(port);
                        self.conns.insert(conn, c);
                        let nh = self.listen_socket(port);
                        self.arm_seq += 1;
                        let seq = self.arm_seq;
                        let l = self.listeners.get_mut(&port).expect("port from keys");
                        l.sockets.retain(|x| x.0 != h);
                        if let Some(nh) = nh {
                            l.sockets.push((nh, seq));
                        }
                    }
                }
            }
        }
        moved
    }

    /// Move data for every connection; returns true if bytes moved or states changed.
    fn service(&mut self, _now: Instant) -> bool {
        let mut moved = self.accept_listeners();
        // PSH marks from the tap, converted to stream offsets: only flows that got some.
        let mut dirty = std::mem::take(&mut self.scratch_flows);
        self.dev.take_psh_dirty(&mut dirty);
        for key in dirty.drain(..) {
            let Some(c) = self.by_flow.get(&key).and_then(|id| self.conns.get_mut(id)) else {
                // Not offloaded yet: the marks wait in the tap and are taken when the
                // connection is established (below, in `service_conn`).
                continue;
            };
            let span = self.cfg.socket_rx_bytes as u64;
            self.stats.psh_out_of_window += apply_psh(&mut c.ctx, self.dev.take_psh(&key), span);
        }
        self.scratch_flows = dirty;
        let mut ids = std::mem::take(&mut self.scratch_ids);
        ids.clear();
        ids.extend(self.conns.keys().copied());
        let mut gone = Vec::new();
        for &id in &ids {
            let (m, finished) = self.service_conn(id);
            moved |= m;
            if finished {
                gone.push(id);
            }
        }
        self.scratch_ids = ids;
        for id in gone {
            if let Some(c) = self.conns.remove(&id) {
                self.sockets.remove(c.handle);
                if let Some(k) = c.flow {
                    self.dev.forget(&k);
                    self.by_flow.remove(&k);
                }
            }
        }
        moved
    }

    /// Returns (progress, connection finished and must be released).
    fn service_conn(&mut self, id: ConnId) -> (bool, bool) {
        let c = self.conns.get_mut(&id).expect("id from keys");
        let sock = self.sockets.get_mut::<tcp::Socket<'static>>(c.handle);
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
                    c.flow = Some(key);
                    self.by_flow.insert(key, id);
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

        // Receive: stack -> host memory.
        loop {
            let avail = sock.recv_queue();
            match c.ctx.plan(avail, self.anon_len) {
                Plan::Hold => break,
                Plan::Named { at, max } => {
                    let buf = c.ctx.head_named_mut().expect("plan said named");
                    let n = recv_into(sock, &self.dma, buf, at, max);
                    if n == 0 {
                        break;
                    }
                    c.ctx.placed_named(n, &mut self.out);
                    moved = true;
                }
                Plan::Anonymous { max } => {
                    let Some(mut buf) = self.anon.pop() else {
                        self.stats.anon_starved += 1;
                        break;
                    };
                    let max = max.min(buf.len());
                    let n = recv_into(sock, &self.dma, &mut buf, 0, max);
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
        if !c.eof_sent && sock.recv_queue() == 0 && !sock.may_recv() && rx_finished(sock) {
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
        if c.close_requested && !c.closed_local && c.tx_queue.is_empty() {
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
