//! Runtimes: emulated hosts (NIC + bus + driver) and the two ways to run them.
//!
//! - [`Sim`]: every host on ONE thread with a virtual clock. A step polls every NIC and
//!   driver at the current virtual time; when nothing moved, the clock jumps to the earliest
//!   deadline (smoltcp timers, push timers). Same seed and configuration, same event sequence.
//! - [`Threaded`]: the NICs run on one adapter thread in real time (sleeping on their command
//!   rings and wires when idle); applications run on their own threads with [`Stream`]s whose
//!   waiter sleeps on the host's event ring. On a 2-core machine this is the split that
//!   measures best: one core for the "adapter", one for the host.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Select};
use parking_lot::Mutex;
use toe_bus::time::{Duration, Instant};
use toe_bus::{bus_with_latency, HostMemory};
use toe_driver::{Driver, DriverConfig, SharedDriver, Stream, Waiter};
use toe_nic::{Nic, NicConfig, Phy};

use crate::config::Settings;

/// A boxed frame port that can move to the adapter thread.
pub type BoxPhy = Box<dyn Phy + Send>;

/// One emulated TOE host: a NIC and its driver, joined by a bus, sharing one host memory.
pub struct Host {
    /// Name for reports.
    pub name: String,
    /// The NIC.
    pub nic: Nic<BoxPhy>,
    /// The driver, shared with application handles.
    pub driver: SharedDriver,
    /// The host memory.
    pub mem: Arc<HostMemory>,
    /// Wall-clock time spent in the driver's polls by [`Host::poll`] (host CPU, measured:
    /// the NIC's work is not in it), if measuring was asked for (set it to `Some(ZERO)`;
    /// `None`, the default, reads no clock).
    pub driver_cpu: Option<std::time::Duration>,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host").field("name", &self.name).finish()
    }
}

/// Errors building a host.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// Host memory could not be mapped or the pool allocated.
    #[error("host memory: {0}")]
    Memory(#[from] toe_bus::MemError),
    /// The driver refused its configuration.
    #[error("driver: {0}")]
    Driver(#[from] toe_driver::DriverError),
}

/// Extra host memory beyond the anonymous pool, for named and send buffers (mapped lazily).
pub const DEFAULT_APP_MEMORY_BYTES: usize = 512 << 20;

impl Host {
    /// Build a host from `settings` with NIC identity `nic` on `phy` at time `now`.
    pub fn new(
        name: &str,
        settings: &Settings,
        nic: NicConfig,
        phy: BoxPhy,
        now: Instant,
    ) -> Result<Host, HostError> {
        let pool = settings.anon_pool_bytes() as usize;
        let mem = Arc::new(HostMemory::anonymous(pool + DEFAULT_APP_MEMORY_BYTES)?);
        Host::on_memory(name, settings, nic, phy, now, mem)
    }

    /// Another NIC of the machine whose host memory is `self`'s: its own driver and pools,
    /// the same memory (so an application may move data between the two NICs' connections
    /// within one memory). The memory must have room for a second anonymous pool.
    pub fn second_nic(
        &self,
        name: &str,
        settings: &Settings,
        nic: NicConfig,
        phy: BoxPhy,
        now: Instant,
    ) -> Result<Host, HostError> {
        Host::on_memory(name, settings, nic, phy, now, self.mem.clone())
    }

    fn on_memory(
        name: &str,
        settings: &Settings,
        mut nic: NicConfig,
        phy: BoxPhy,
        now: Instant,
        mem: Arc<HostMemory>,
    ) -> Result<Host, HostError> {
        nic.mtu = settings.mtu as usize;
        nic.socket_rx_bytes = settings.socket_buf_bytes as usize;
        nic.socket_tx_bytes = settings.socket_buf_bytes as usize;
        // Exactly the connections the anonymous pool has a buffer share for.
        nic.max_conns = settings.max_conns as usize;
        (nic.keepalive, nic.idle_timeout, nic.syn_timeout) = settings.timers();
        nic.cost = settings.nic_cost();
        nic.congestion = settings.congestion;
        let pool = settings.anon_pool_bytes() as usize;
        let (host_end, nic_end) = bus_with_latency(
            settings.ring_depth as usize,
            Duration::from_micros(settings.bus_latency_us),
        );
        let driver = Driver::new(
            mem.clone(),
            host_end,
            DriverConfig {
                rx: settings.rx_config(),
                anon_buf_bytes: settings.anon_buf_bytes as usize,
                anon_pool_bytes: pool,
                cost: settings.host_cost(),
            },
        )?;
        let nic = Nic::new(nic, phy, nic_end, mem.clone(), now);
        Ok(Host {
            name: name.to_string(),
            nic,
            driver: Arc::new(Mutex::new(driver)),
            mem,
            driver_cpu: None,
        })
    }

    /// Poll NIC then driver at `now`; true if anything moved.
    pub fn poll(&mut self, now: Instant) -> bool {
        let a = self.nic.poll(now);
        let t0 = self.driver_cpu.is_some().then(std::time::Instant::now);
        let b = self.driver.lock().poll(now);
        if let (Some(t0), Some(cpu)) = (t0, self.driver_cpu.as_mut()) {
            *cpu += t0.elapsed();
        }
        // Commands the driver just queued reach the NIC in the same step.
        let c = b && self.nic.poll(now);
        a || b || c
    }

    /// When the later of NIC and host CPU is free of work charged by the cost model, if
    /// either is still busy at `now`.
    pub fn busy_until(&self, now: Instant) -> Option<Instant> {
        let t = self
            .nic
            .busy()
            .free_at()
            .max(self.driver.lock().cpu().free_at());
        (t > now).then_some(t)
    }

    /// Earliest deadline of NIC or driver.
    pub fn poll_at(&mut self, now: Instant) -> Option<Instant> {
        let d = self.driver.lock().poll_at();
        match (self.nic.poll_at(now), d) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// The NIC configuration of host number `i` (0-based) on the 10.0.0.0/24 test network.
pub fn test_nic(i: u8, seed: u64) -> NicConfig {
    NicConfig {
        mac: [0x02, 0, 0, 0, 0, i + 1],
        ip: std::net::Ipv4Addr::new(10, 0, 0, i + 1),
        seed: seed.wrapping_mul(31).wrapping_add(i as u64),
        ..NicConfig::default()
    }
}

struct SimInner {
    hosts: Vec<Host>,
    steps: u64,
    jumps: u64,
    step_limit: u64,
}

/// All hosts on one thread with a virtual clock. Cheap to clone (shared).
#[derive(Clone)]
pub struct Sim {
    inner: Arc<Mutex<SimInner>>,
    now_us: Arc<AtomicI64>,
}

impl std::fmt::Debug for Sim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sim").field("now", &self.now()).finish()
    }
}

impl Sim {
    /// A simulation of `hosts`, its clock at 0.
    pub fn new(hosts: Vec<Host>) -> Self {
        Sim {
            inner: Arc::new(Mutex::new(SimInner {
                hosts,
                steps: 0,
                jumps: 0,
                step_limit: u64::MAX,
            })),
            now_us: Arc::new(AtomicI64::new(0)),
        }
    }

    /// Fail instead of looping forever: at most `limit` steps from now on.
    pub fn set_step_limit(&self, limit: u64) {
        let mut g = self.inner.lock();
        g.step_limit = g.steps.saturating_add(limit);
    }

    /// Virtual time.
    pub fn now(&self) -> Instant {
        Instant::from_micros(self.now_us.load(Ordering::Relaxed))
    }

    /// Steps taken and idle clock jumps.
    pub fn counters(&self) -> (u64, u64) {
        let g = self.inner.lock();
        (g.steps, g.jumps)
    }

    /// Driver of host `i`.
    pub fn driver(&self, i: usize) -> SharedDriver {
        self.inner.lock().hosts[i].driver.clone()
    }

    /// Run `f` on host `i` (its NIC, counters...).
    pub fn with_host<T>(&self, i: usize, f: impl FnOnce(&mut Host) -> T) -> T {
        f(&mut self.inner.lock().hosts[i])
    }

    /// One step: poll everything at the current time; if nothing moved, jump the clock to the
    /// next deadline. Returns whether anything moved; a jump to the instant a busy processor
    /// of the cost model finishes its work counts as moving (the world is working, not idle). An error means nothing can ever move
    /// again (no work and no deadline) or the step limit was hit.
    pub fn step(&self) -> io::Result<bool> {
        self.step_bounded(None)
    }

    /// [`Sim::step`] whose idle clock jump stops at `limit` (if given): the clock never passes
    /// it, and an idle world with no deadline jumps to it instead of failing.
    pub fn step_bounded(&self, limit: Option<Instant>) -> io::Result<bool> {
        let mut g = self.inner.lock();
        g.steps += 1;
        if g.steps > g.step_limit {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("simulation step limit reached at {}", self.now()),
            ));
        }
        let now = self.now();
        let mut progress = false;
        for h in g.hosts.iter_mut() {
            progress |= h.poll(now);
        }
        if progress {
            return Ok(true);
        }
        let mut next = g.hosts.iter_mut().filter_map(|h| h.poll_at(now)).min();
        if let Some(l) = limit.filter(|l| *l > now) {
            next = Some(next.map_or(l, |t| t.min(l)));
        }
        match next {
            None => Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!("simulation idle at {now}: no work and no timer pending"),
            )),
            Some(t) => {
                let t = if t > now {
                    t
                } else {
                    now + Duration::from_millis(1)
                };
                g.jumps += 1;
                let working = g.hosts.iter().any(|h| h.busy_until(now) == Some(t));
                self.now_us.store(t.total_micros(), Ordering::Relaxed);
                Ok(working)
            }
        }
    }

    /// Poll every host once at the current time without moving the clock, and ask each for
    /// its next deadline, as a step does; returns whether anything moved. For measuring the
    /// cost of a step itself (with nothing due, it is the emulator's fixed cost per poll).
    pub fn poll_in_place(&self) -> bool {
        let mut g = self.inner.lock();
        let now = self.now();
        let mut progress = false;
        for h in g.hosts.iter_mut() {
            progress |= h.poll(now);
        }
        for h in g.hosts.iter_mut() {
            let _ = h.poll_at(now);
        }
        progress
    }

    /// Like [`Sim::step`], but an idle world is not an error (an application driven from
    /// outside the simulation may be about to act): returns `Ok(false)` then.
    pub fn step_or_idle(&self) -> io::Result<bool> {
        self.step_or_idle_bounded(None)
    }

    /// [`Sim::step_or_idle`] whose clock jump stops at `limit`, as [`Sim::step_bounded`].
    pub fn step_or_idle_bounded(&self, limit: Option<Instant>) -> io::Result<bool> {
        match self.step_bounded(limit) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            r => r,
        }
    }

    /// Step until `done()` holds, at most `max_steps` steps.
    /// `done` may act as an application (read, post, send): an idle world is tolerated while
    /// it does, and reported as an error after 1,000 idle steps in a row.
    pub fn run_until(&self, max_steps: u64, mut done: impl FnMut() -> bool) -> io::Result<()> {
        let mut idle = 0;
        for _ in 0..max_steps {
            if done() {
                return Ok(());
            }
            match self.step() {
                Ok(_) => idle = 0,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && idle < 1000 => idle += 1,
                Err(e) => return Err(e),
            }
        }
        if done() {
            return Ok(());
        }
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "condition not reached within {max_steps} steps (virtual time {})",
                self.now()
            ),
        ))
    }

    /// Advance virtual time by exactly `d`, stepping as needed (timers in between fire in
    /// order; the clock never jumps past the end).
    pub fn advance(&self, d: Duration) -> io::Result<()> {
        let end = self.now() + d;
        while self.now() < end {
            self.step_bounded(Some(end))?;
        }
        Ok(())
    }

    /// A waiter for blocking handles: waiting runs the world one step.
    pub fn waiter(&self) -> Arc<dyn Waiter> {
        Arc::new(self.clone())
    }

    /// A blocking stream handle for `conn` of host `i`.
    pub fn stream(&self, i: usize, conn: toe_bus::ConnId) -> Stream {
        Stream::new(self.driver(i), conn, self.waiter())
    }
}

impl Waiter for Sim {
    fn now(&self) -> Instant {
        Sim::now(self)
    }
    fn wait(&self, _deadline: Option<Instant>) -> io::Result<()> {
        self.step().map(|_| ())
    }
}

/// Real-time clock shared by the adapter thread and application waiters.
#[derive(Debug, Clone, Copy)]
pub struct RealClock {
    origin: std::time::Instant,
}

impl RealClock {
    /// A clock whose zero is now.
    pub fn start() -> Self {
        RealClock {
            origin: std::time::Instant::now(),
        }
    }
    /// Microseconds since the origin, as a toemu `Instant`.
    pub fn now(&self) -> Instant {
        Instant::from_micros(self.origin.elapsed().as_micros() as i64)
    }
}

/// Waiter of real-time hosts: sleeps on their event rings until a deadline (at most 5 ms).
struct RingWaiter {
    clock: RealClock,
    events: Vec<Receiver<toe_bus::ring::Stamped<toe_bus::Event>>>,
    stopped: Arc<AtomicBool>,
}

impl Waiter for RingWaiter {
    fn now(&self) -> Instant {
        self.clock.now()
    }
    fn wait(&self, deadline: Option<Instant>) -> io::Result<()> {
        if self.stopped.load(Ordering::Relaxed) {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "runtime stopped"));
        }
        let now = self.clock.now();
        let max = std::time::Duration::from_millis(5);
        let timeout = deadline
            .map(|d| std::time::Duration::from_micros((d - now.min(d)).total_micros()).min(max))
            .unwrap_or(max);
        let mut sel = Select::new();
        for e in &self.events {
            sel.recv(e);
        }
        let _ = sel.ready_timeout(timeout);
        Ok(())
    }
}

/// NICs on one adapter thread in real time; drivers used from application threads.
pub struct Threaded {
    clock: RealClock,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<Host>>>,
    drivers: Vec<(
        SharedDriver,
        Receiver<toe_bus::ring::Stamped<toe_bus::Event>>,
    )>,
}

impl std::fmt::Debug for Threaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Threaded").finish()
    }
}

impl Threaded {
    /// Start the adapter thread for `hosts`.
    pub fn start(hosts: Vec<Host>) -> Self {
        let clock = RealClock::start();
        let stop = Arc::new(AtomicBool::new(false));
        let drivers = hosts
            .iter()
            .map(|h| {
                let rx = h.driver.lock().event_waitable();
                (h.driver.clone(), rx)
            })
            .collect();
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("toemu-adapter".into())
            .spawn(move || adapter_loop(hosts, clock, stop2))
            .expect("spawn adapter thread");
        Threaded {
            clock,
            stop,
            thread: Some(thread),
            drivers,
        }
    }

    /// The clock.
    pub fn clock(&self) -> RealClock {
        self.clock
    }

    /// Driver of host `i`.
    pub fn driver(&self, i: usize) -> SharedDriver {
        self.drivers[i].0.clone()
    }

    /// A waiter for application handles of host `i`.
    pub fn waiter(&self, i: usize) -> Arc<dyn Waiter> {
        Arc::new(RingWaiter {
            clock: self.clock,
            events: vec![self.drivers[i].1.clone()],
            stopped: self.stop.clone(),
        })
    }

    /// A waiter that wakes on an event of any host (for one thread serving apps on
    /// several hosts).
    pub fn waiter_any(&self) -> Arc<dyn Waiter> {
        Arc::new(RingWaiter {
            clock: self.clock,
            events: self.drivers.iter().map(|(_, e)| e.clone()).collect(),
            stopped: self.stop.clone(),
        })
    }

    /// A blocking stream handle for `conn` of host `i`.
    pub fn stream(&self, i: usize, conn: toe_bus::ConnId) -> Stream {
        Stream::new(self.driver(i), conn, self.waiter(i))
    }

    /// Stop the adapter thread and get the hosts back.
    pub fn stop(mut self) -> Vec<Host> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .map(|t| t.join().expect("adapter thread panicked"))
            .unwrap_or_default()
    }
}

impl Drop for Threaded {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn adapter_loop(mut hosts: Vec<Host>, clock: RealClock, stop: Arc<AtomicBool>) -> Vec<Host> {
    let mut waitables_cmd: Vec<_> = hosts.iter().map(|h| h.nic.command_waitable()).collect();
    let waitables_wire: Vec<_> = hosts
        .iter()
        .filter_map(|h| h.nic.device().phy().waitable())
        .collect();
    let poll_only = waitables_wire.len() < hosts.len();
    while !stop.load(Ordering::Relaxed) {
        let now = clock.now();
        let mut progress = false;
        for h in hosts.iter_mut() {
            progress |= h.nic.poll(now);
        }
        if progress {
            continue;
        }
        let next = hosts.iter_mut().filter_map(|h| h.nic.poll_at(now)).min();
        let max = if poll_only {
            std::time::Duration::from_micros(200)
        } else {
            std::time::Duration::from_millis(5)
        };
        let timeout = next
            .map(|t| std::time::Duration::from_micros((t - now.min(t)).total_micros()).min(max))
            .unwrap_or(max);
        if timeout.is_zero() {
            continue;
        }
        let mut sel = Select::new();
        for r in waitables_cmd.iter_mut() {
            sel.recv(r);
        }
        for r in waitables_wire.iter() {
            sel.recv(r);
        }
        let _ = sel.ready_timeout(timeout);
    }
    hosts
}
