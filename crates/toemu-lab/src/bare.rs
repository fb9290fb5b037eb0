//! The bare-smoltcp baseline: two plain smoltcp interfaces on the same in-memory wire, MTU,
//! socket buffers and TCP settings as the emulated TOE hosts, with the applications working
//! directly on the sockets (the receiver hashes in place in the socket buffer: no copy at all).
//! Same single-thread virtual-clock discipline as [`toe_host::runtime::Sim`], and the same wire
//! options ([`BarePair::with_wire`]: impairment and capture).

use std::io;
use std::net::Ipv4Addr;

use smoltcp::iface::{Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{IpAddress, IpEndpoint};
use toe_nic::nic::{make_interface, make_socket};
use toe_nic::{wire, NicConfig, NicDevice, Phy};

use crate::datagen::{Check, Checker, DataGen};
use toe_host::config::Settings;
use toe_host::runtime::{test_nic, BoxPhy};
use toe_host::wire_opts::WireOptions;

struct BareHost {
    iface: Interface,
    sockets: SocketSet<'static>,
    dev: NicDevice<BoxPhy>,
    ip: Ipv4Addr,
}

impl BareHost {
    fn new(cfg: &NicConfig, port: BoxPhy, mtu: usize) -> Self {
        let mut dev = NicDevice::new(port, mtu, cfg.ip, false);
        let iface = make_interface(
            cfg.mac,
            cfg.ip,
            cfg.prefix_len,
            None,
            cfg.seed,
            &mut dev,
            Instant::from_micros(0),
        );
        BareHost {
            iface,
            sockets: SocketSet::new(Vec::new()),
            dev,
            ip: cfg.ip,
        }
    }
}

/// Two bare smoltcp hosts on a wire with a virtual clock.
pub struct BarePair {
    hosts: [BareHost; 2],
    now: Instant,
    socket_bytes: usize,
    ack_delay: Option<Duration>,
    /// Congestion control of its sockets (the hosts' setting).
    congestion: toe_nic::Congestion,
    /// Virtual seconds of the last bulk transfer (the stack alone on the modeled wire: no
    /// bus, no NIC or host costs).
    pub modeled_seconds: f64,
    /// Virtual microseconds of each round trip of the last request/response run.
    pub modeled_rr_us: Vec<f64>,
}

impl std::fmt::Debug for BarePair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BarePair").field("now", &self.now).finish()
    }
}

impl BarePair {
    /// Hosts 10.0.0.1 and 10.0.0.2 with `settings`' MTU and socket buffers, on a perfect
    /// wire.
    pub fn new(settings: &Settings, seed: u64) -> Self {
        Self::build(settings, seed, &WireOptions::default())
    }

    /// Like [`BarePair::new`], on a wire built by `wire_opts` (host `i` is side `i`). Errors if
    /// the wire options do not validate.
    pub fn with_wire(settings: &Settings, seed: u64, wire_opts: &WireOptions) -> io::Result<Self> {
        wire_opts.validate().map_err(io::Error::other)?;
        Ok(Self::build(settings, seed, wire_opts))
    }

    fn build(settings: &Settings, seed: u64, wire_opts: &WireOptions) -> Self {
        let (pa, pb) = wire(4096);
        let (pa, pb) = (wire_opts.wrap(pa, 0), wire_opts.wrap(pb, 1));
        let mtu = settings.mtu as usize;
        let (ca, cb) = (test_nic(0, seed), test_nic(1, seed));
        BarePair {
            ack_delay: ca.ack_delay,
            congestion: settings.congestion,
            hosts: [BareHost::new(&ca, pa, mtu), BareHost::new(&cb, pb, mtu)],
            now: Instant::from_micros(0),
            socket_bytes: settings.socket_buf_bytes as usize,
            modeled_seconds: 0.0,
            modeled_rr_us: Vec::new(),
        }
    }

    fn socket(&mut self, host: usize) -> SocketHandle {
        let s = make_socket(
            self.socket_bytes,
            self.socket_bytes,
            self.ack_delay,
            self.congestion,
        );
        self.hosts[host].sockets.add(s)
    }

    /// Connected pair of sockets: (client on host 0, server on host 1).
    fn connect(&mut self, port: u16) -> io::Result<(SocketHandle, SocketHandle)> {
        let srv = self.socket(1);
        self.hosts[1]
            .sockets
            .get_mut::<tcp::Socket<'_>>(srv)
            .listen(port)
            .map_err(io::Error::other)?;
        let cli = self.socket(0);
        let remote = IpEndpoint::new(IpAddress::Ipv4(self.hosts[1].ip), port);
        let h0 = &mut self.hosts[0];
        h0.sockets
            .get_mut::<tcp::Socket<'_>>(cli)
            .connect(h0.iface.context(), remote, 40000 + port)
            .map_err(io::Error::other)?;
        for _ in 0..100_000 {
            let up = |h: &BareHost, s| {
                h.sockets.get::<tcp::Socket<'_>>(s).state() == tcp::State::Established
            };
            if up(&self.hosts[0], cli) && up(&self.hosts[1], srv) {
                return Ok((cli, srv));
            }
            self.step()?;
        }
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "bare smoltcp handshake",
        ))
    }

    /// Poll both hosts; jump the clock when idle.
    fn step(&mut self) -> io::Result<bool> {
        let mut progress = false;
        for h in self.hosts.iter_mut() {
            progress |= h.iface.poll(self.now, &mut h.dev, &mut h.sockets)
                == smoltcp::iface::PollResult::SocketStateChanged;
        }
        if progress {
            return Ok(true);
        }
        let now = self.now;
        let next = self
            .hosts
            .iter_mut()
            .filter_map(|h| {
                let phy = h.dev.phy().poll_at();
                match (h.iface.poll_at(now, &h.sockets), phy) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            })
            .min();
        match next {
            Some(t) => {
                self.now = if t > now {
                    t
                } else {
                    now + Duration::from_millis(1)
                };
                Ok(false)
            }
            // Idle: only the applications (driven by the caller) can create work.
            None => Ok(false),
        }
    }

    /// Transfer `bytes` of the seeded stream from host 0 to host 1. Returns the wall-clock
    /// time from the established connection to the receiver's end of stream, and the SHA-256
    /// the receiver computed.
    pub fn bulk(&mut self, bytes: u64, seed: u64) -> io::Result<(std::time::Duration, [u8; 32])> {
        self.bulk_checked(bytes, seed, Check::Sha256)
    }

    /// [`BarePair::bulk`] with integrity check `check`.
    pub fn bulk_checked(
        &mut self,
        bytes: u64,
        seed: u64,
        check: Check,
    ) -> io::Result<(std::time::Duration, [u8; 32])> {
        let (cli, srv) = self.connect(5001)?;
        let mut gen = DataGen::new(seed);
        let mut sent = 0u64;
        let mut closed = false;
        let mut hasher = Checker::new(check);
        let mut received = 0u64;
        let t0 = std::time::Instant::now();
        let v0 = self.now;
        let mut idle = 0u32;
        // The sender offers its first bytes before the first step (an idle step jumps the
        // clock, which must not count as transfer time).
        let mut moved = true;
        loop {
            let s = self.hosts[0].sockets.get_mut::<tcp::Socket<'_>>(cli);
            while sent < bytes && s.can_send() {
                let n = s
                    .send(|space| {
                        let k = (space.len() as u64).min(bytes - sent) as usize;
                        gen.fill(&mut space[..k]);
                        (k, k)
                    })
                    .map_err(io::Error::other)?;
                if n == 0 {
                    break;
                }
                sent += n as u64;
                moved = true;
            }
            if sent == bytes && !closed {
                s.close();
                closed = true;
            }
            let r = self.hosts[1].sockets.get_mut::<tcp::Socket<'_>>(srv);
            while r.can_recv() {
                let n = r
                    .recv(|d| {
                        hasher.update(&*d);
                        (d.len(), d.len())
                    })
                    .map_err(io::Error::other)?;
                received += n as u64;
                moved = true;
            }
            if received == bytes && matches!(r.recv(|_| (0, ())), Err(tcp::RecvError::Finished)) {
                break;
            }
            idle = if moved { 0 } else { idle + 1 };
            if idle > 1_000_000 {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "bare bulk stalled"));
            }
            moved = self.step()?;
        }
        self.modeled_seconds = (self.now - v0).total_micros() as f64 / 1e6;
        Ok((t0.elapsed(), hasher.finish()))
    }

    /// `iters` request/response exchanges of `size` bytes each way; returns each round
    /// trip in microseconds of wall-clock time. Each step, both sides take all the bytes
    /// their socket holds (as the emulated hosts' apps do), so a large response costs no
    /// more steps than TCP needs to carry it.
    pub fn request_response(&mut self, iters: usize, size: usize) -> io::Result<Vec<f64>> {
        let (cli, srv) = self.connect(5002)?;
        let req = vec![0x5Au8; size];
        let mut lat = Vec::with_capacity(iters);
        let mut buf = vec![0u8; size];
        let mut answer = vec![0u8; size];
        self.modeled_rr_us.clear();
        for _ in 0..iters {
            let t = std::time::Instant::now();
            let v = self.now;
            let mut sent = 0;
            while sent < size {
                sent += self.hosts[0]
                    .sockets
                    .get_mut::<tcp::Socket<'_>>(cli)
                    .send_slice(&req[sent..])
                    .map_err(io::Error::other)?;
                self.step()?;
            }
            // server: echo
            let mut got = 0;
            let mut echoed = 0;
            let mut back = 0;
            for _ in 0..1_000_000 {
                let s = self.hosts[1].sockets.get_mut::<tcp::Socket<'_>>(srv);
                // The socket buffers are rings: a slice call stops at the wrap, so take and
                // give until nothing moves.
                while got < size {
                    let n = s.recv_slice(&mut buf[got..]).map_err(io::Error::other)?;
                    if n == 0 {
                        break;
                    }
                    got += n;
                }
                while echoed < got {
                    let n = s.send_slice(&buf[echoed..got]).map_err(io::Error::other)?;
                    if n == 0 {
                        break;
                    }
                    echoed += n;
                }
                let c = self.hosts[0].sockets.get_mut::<tcp::Socket<'_>>(cli);
                while back < size {
                    let n = c
                        .recv_slice(&mut answer[back..])
                        .map_err(io::Error::other)?;
                    if n == 0 {
                        break;
                    }
                    back += n;
                }
                if back >= size {
                    break;
                }
                self.step()?;
            }
            if back < size {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "bare request/response stalled",
                ));
            }
            lat.push(t.elapsed().as_secs_f64() * 1e6);
            self.modeled_rr_us
                .push((self.now - v).total_micros() as f64);
        }
        Ok(lat)
    }
}
