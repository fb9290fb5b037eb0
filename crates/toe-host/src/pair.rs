//! Two emulated hosts joined by an in-memory wire and one connection between them: the
//! starting point of most experiments and tests.

use std::io;
use std::net::SocketAddrV4;

use std::sync::Arc;

use toe_bus::{ConnId, HostMemory};
use toe_driver::Stream;
use toe_nic::wire;

use crate::config::Settings;
use crate::runtime::{BoxPhy, Host, Sim, Threaded};
use crate::wire_opts::{WireMonitors, WireOptions};

fn other(e: impl ToString) -> io::Error {
    io::Error::other(e.to_string())
}

/// Two hosts on a perfect wire, host 1 listening on `port`, host 0 connected to it.
/// Returns (sim, client conn on host 0, server conn on host 1).
pub fn connected_pair(
    settings: &Settings,
    seed: u64,
    port: u16,
) -> io::Result<(Sim, ConnId, ConnId)> {
    connected_pair_on(settings, seed, port, &WireOptions::default()).map(|(s, a, b, _)| (s, a, b))
}

/// Like [`connected_pair`], on a wire built by `wire` (host `i` is side `i`). Also returns
/// the impairment counters of the two directions.
pub fn connected_pair_on(
    settings: &Settings,
    seed: u64,
    port: u16,
    wire_opts: &WireOptions,
) -> io::Result<(Sim, ConnId, ConnId, WireMonitors)> {
    connected_pair_traced(settings, seed, port, wire_opts, None)
}

/// Like [`connected_pair_on`], with both drivers tracing bus traffic from the start into
/// `trace` (writer, host-name prefix).
pub fn connected_pair_traced(
    settings: &Settings,
    seed: u64,
    port: u16,
    wire_opts: &WireOptions,
    trace: Option<(&crate::trace::SharedWriter, &str)>,
) -> io::Result<(Sim, ConnId, ConnId, WireMonitors)> {
    let ([pa, pb], monitors) = wire_ports(wire_opts)?;
    let (sim, ca, cb) = connected_pair_with(settings, settings, seed, port, pa, pb, trace)?;
    Ok((sim, ca, cb, monitors))
}

/// The two ports of an in-memory wire built by `wire_opts` (side `i` for host `i`), and the
/// impairment counters of the two directions.
pub fn wire_ports(wire_opts: &WireOptions) -> io::Result<([BoxPhy; 2], WireMonitors)> {
    wire_opts.validate().map_err(other)?;
    let (pa, pb) = wire(4096);
    let (pa, ma) = wire_opts.wrap_observed(pa, 0);
    let (pb, mb) = wire_opts.wrap_observed(pb, 1);
    Ok(([pa, pb], [ma, mb]))
}

/// Two hosts on the given ports: host 0 (10.0.0.1) with `sa`, host 1 (10.0.0.2) with `sb`,
/// nothing connected yet.
pub fn hosts(sa: &Settings, sb: &Settings, seed: u64, pa: BoxPhy, pb: BoxPhy) -> io::Result<Sim> {
    host_pair(sa, sb, seed, pa, pb).map(|h| Sim::new(h.into()))
}

fn host_pair(
    sa: &Settings,
    sb: &Settings,
    seed: u64,
    pa: BoxPhy,
    pb: BoxPhy,
) -> io::Result<[Host; 2]> {
    let now = toe_bus::time::Instant::from_micros(0);
    let a = Host::new("a", sa, crate::runtime::test_nic(0, seed), pa, now).map_err(other)?;
    let b = Host::new("b", sb, crate::runtime::test_nic(1, seed), pb, now).map_err(other)?;
    Ok([a, b])
}

/// Two hosts as in [`connected_pair_on`], run in real time on the [`Threaded`] runtime (both
/// NICs on its adapter thread): host 1 listens on `port`, host 0 connects to it. Returns the
/// runtime, the established client stream of host 0 and the accepted server stream of host
/// 1 (move either to its own thread), the host memories (for copy counters) and the wire's
/// impairment counters.
pub fn threaded_pair(
    settings: &Settings,
    seed: u64,
    port: u16,
    wire_opts: &WireOptions,
) -> io::Result<ThreadedPair> {
    let ([pa, pb], monitors) = wire_ports(wire_opts)?;
    // Real time is the real machine's speed: the cost model is for the virtual clock.
    let settings = &settings.clone().without_costs();
    let hosts = host_pair(settings, settings, seed, pa, pb)?;
    let mem = [hosts[0].mem.clone(), hosts[1].mem.clone()];
    let rt = Threaded::start(hosts.into());
    let (da, db) = (rt.driver(0), rt.driver(1));
    db.lock().listen(port, 4, None).map_err(other)?;
    let remote = SocketAddrV4::new(std::net::Ipv4Addr::new(10, 0, 0, 2), port);
    let ca = da.lock().connect(remote, 0, None).map_err(other)?;
    let client = Stream::connected(da, ca, rt.waiter(0))?;
    let server = Stream::accept(db, port, rt.waiter(1))?;
    Ok(ThreadedPair {
        rt,
        client,
        server,
        mem,
        monitors,
    })
}

/// What [`threaded_pair`] returns.
#[derive(Debug)]
pub struct ThreadedPair {
    /// The runtime; [`Threaded::stop`] gives the hosts back.
    pub rt: Threaded,
    /// Host 0's connection.
    pub client: Stream,
    /// Host 1's connection.
    pub server: Stream,
    /// Host memories of hosts 0 and 1.
    pub mem: [Arc<HostMemory>; 2],
    /// Impairment counters of the wire's two directions.
    pub monitors: WireMonitors,
}

/// [`hosts`], then host 1 listens on `port` and host 0 connects to it, both drivers tracing
/// bus traffic from the start into `trace` if given (writer, host-name prefix: hosts are
/// named `PREFIX/a` and `PREFIX/b`, or `a` and `b` with an empty prefix). Returns (sim,
/// client conn on host 0, server conn on host 1).
pub fn connected_pair_with(
    sa: &Settings,
    sb: &Settings,
    seed: u64,
    port: u16,
    pa: BoxPhy,
    pb: BoxPhy,
    trace: Option<(&crate::trace::SharedWriter, &str)>,
) -> io::Result<(Sim, ConnId, ConnId)> {
    let sim = hosts(sa, sb, seed, pa, pb)?;
    let (da, db) = (sim.driver(0), sim.driver(1));
    if let Some((w, prefix)) = trace {
        for (d, h) in [(&da, "a"), (&db, "b")] {
            let name = if prefix.is_empty() {
                h.to_string()
            } else {
                format!("{prefix}/{h}")
            };
            d.lock()
                .set_trace(Box::new(crate::trace::JsonlTrace::new(&name, w.clone())));
        }
    }
    db.lock().listen(port, 4, None).map_err(other)?;
    let remote = SocketAddrV4::new(std::net::Ipv4Addr::new(10, 0, 0, 2), port);
    let ca = da.lock().connect(remote, 0, None).map_err(other)?;
    let mut cb = None;
    sim.run_until(1_000_000, || {
        if cb.is_none() {
            cb = db.lock().accept(port);
        }
        cb.is_some() && da.lock().state(ca).ok() == Some(toe_driver::ConnState::Established)
    })?;
    Ok((sim, ca, cb.expect("accepted")))
}
