//! Running poll-style apps ([`toemu_apps::App`]) on emulated hosts: in real time on any phy
//! (TAP for `toemu serve`, `send`, `get`), or on the virtual clock against each other.

use std::io;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::time::Duration as StdDuration;

use toe_nic::NicConfig;
use toemu_apps::App;

use toe_host::config::Settings;
use toe_host::runtime::{BoxPhy, Host, Sim, Threaded};

/// Parse `A.B.C.D/PREFIX`.
pub fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u8), String> {
    let (ip, prefix) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?}: expected ADDR/PREFIX, e.g. 10.99.0.2/24"))?;
    let ip: Ipv4Addr = ip.parse().map_err(|_| format!("{s:?}: bad IPv4 address"))?;
    let prefix: u8 = prefix
        .parse()
        .ok()
        .filter(|p| (1..=32).contains(p))
        .ok_or_else(|| format!("{s:?}: prefix must be 1..=32"))?;
    Ok((ip, prefix))
}

/// NIC identity for an emulated host at `ip/prefix`: a locally administered MAC derived from
/// the address (02:54:xx:xx:xx:xx), so several hosts on one segment never collide.
pub fn nic_for(ip: Ipv4Addr, prefix: u8, gateway: Option<Ipv4Addr>, seed: u64) -> NicConfig {
    let o = ip.octets();
    NicConfig {
        mac: [0x02, 0x54, o[0], o[1], o[2], o[3]],
        ip,
        prefix_len: prefix,
        gateway,
        seed,
        ..NicConfig::default()
    }
}

/// How long [`run_app_realtime`] lets an app that winds down ([`App::stop`]) take.
pub const STOP_GRACE: StdDuration = StdDuration::from_secs(5);

/// Run `app` on one host over `phy` in real time until it is done, `max` passes, `stop` is
/// set (e.g. by a SIGTERM handler), or an error. When `stop` is set, an app that winds down
/// ([`App::stop`] says so) gets up to [`STOP_GRACE`] to finish. Every log line the app
/// produces is printed to stdout at once (flushed), for scripts; a final `stats:` line
/// reports the NIC's counters.
pub fn run_app_realtime(
    settings: &Settings,
    nic: NicConfig,
    phy: BoxPhy,
    app: &mut dyn App,
    max: Option<StdDuration>,
    stop: &std::sync::atomic::AtomicBool,
) -> io::Result<()> {
    // Real time is the real machine's speed: the cost model is for the virtual clock.
    let host = Host::new(
        app.name(),
        &settings.clone().without_costs(),
        nic,
        phy,
        toe_bus::time::Instant::from_micros(0),
    )
    .map_err(|e| io::Error::other(e.to_string()))?;
    // The NIC's firmware carries the iSCSI engine (a connection uses it only if its host
    // asks: `--offload engine`).
    let mut host = host;
    host.nic
        .add_engine(std::sync::Arc::new(toe_iscsi::engine::IscsiEngineFactory));
    let rt = Threaded::start(vec![host]);
    let d = rt.driver(0);
    let w = rt.waiter(0);
    let started = std::time::Instant::now();
    let mut out = io::stdout();
    // Set once asked to stop, for an app that winds down: when its grace period ends.
    let mut winding_down: Option<std::time::Instant> = None;
    loop {
        let deadline = {
            let mut g = d.lock();
            let now = w.now();
            g.poll(now);
            let busy = app.poll(&mut g, now)?;
            g.flush();
            for line in app.take_log() {
                writeln!(out, "{line}")?;
            }
            out.flush()?;
            if app.done() {
                break;
            }
            if busy {
                continue;
            }
            g.poll_at()
        };
        if max.is_some_and(|m| started.elapsed() >= m) {
            break;
        }
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            match winding_down {
                None if app.stop() => {
                    winding_down = Some(std::time::Instant::now() + STOP_GRACE);
                    continue;
                }
                Some(end) if std::time::Instant::now() < end => {}
                _ => break,
            }
        }
        // While winding down, look again at least every 100 ms (the grace period ends).
        let deadline = match winding_down {
            Some(_) => {
                let soon = w.now() + toe_bus::time::Duration::from_millis(100);
                Some(deadline.map_or(soon, |d| d.min(soon)))
            }
            None => deadline,
        };
        w.wait(deadline)?;
    }
    let hosts = rt.stop();
    for h in &hosts {
        let p = h.nic.phy_stats();
        let n = h.nic.stats();
        let d = h.driver.lock().stats();
        writeln!(
            out,
            "stats: rx_frames {} rx_malformed {} rx_bad_checksum {} tx_frames {} established {} resets {} anon_starved {} \
             conns {} conn_limit_hits {} syn_evictions {} syn_refused {} syn_deferred {} segments_without_flow {} flows {} embryonic_flows {} flows_evicted {} psh_out_of_window {} \
             anon_pool {} anon_at_nic {} anon_in_driver {} anon_high_water {}",
            p.rx_frames, p.rx_malformed, p.rx_bad_checksum, p.tx_frames, n.established, n.resets, n.anon_starved,
            h.nic.conn_count(), n.conn_limit_hits, n.syn_evictions, n.syn_refused, n.syn_deferred, n.segments_without_flow, h.nic.device().flow_count(),
            h.nic.device().embryonic_count(), p.flows_evicted, n.psh_out_of_window,
            d.anon_buffers, h.nic.anon_free(), d.anon_in_driver, d.anon_high_water
        )?;
    }
    out.flush()?;
    Ok(())
}

/// Drive a client app on host 0 and a server app on host 1 of `sim` on the virtual clock
/// until the client is done (at most `max_steps` steps).
pub fn run_apps_sim(
    sim: &Sim,
    client: &mut dyn App,
    server: &mut dyn App,
    max_steps: u64,
) -> io::Result<Vec<String>> {
    let (da, db) = (sim.driver(0), sim.driver(1));
    let mut log = Vec::new();
    let mut idle = 0u32;
    for _ in 0..max_steps {
        // The clock does not jump past an app's own timer.
        let limit = [client.poll_at(), server.poll_at()]
            .into_iter()
            .flatten()
            .min();
        let moved = sim.step_or_idle_bounded(limit)?;
        let now = sim.now();
        let b = server.poll(&mut db.lock(), now)?;
        let a = client.poll(&mut da.lock(), now)?;
        log.extend(server.take_log());
        log.extend(client.take_log());
        if client.done() {
            // let the server see the end of the connection too
            for _ in 0..10_000 {
                let moved = sim.step_or_idle_bounded(server.poll_at())?;
                let busy = server.poll(&mut db.lock(), sim.now())?;
                log.extend(server.take_log());
                if !moved && !busy {
                    break;
                }
            }
            return Ok(log);
        }
        idle = if moved || a || b { 0 } else { idle + 1 };
        if idle > 10_000 {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("apps stalled at {}; log so far: {log:?}", sim.now()),
            ));
        }
    }
    Err(io::Error::new(
        io::ErrorKind::TimedOut,
        format!("client not done within {max_steps} steps; log: {log:?}"),
    ))
}
