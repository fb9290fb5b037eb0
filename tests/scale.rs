//! Many offloaded connections cost what the busy ones do: a poll services only the sockets a
//! frame, a command or a due timer touched, whatever the number of open connections.

use std::net::{Ipv4Addr, SocketAddrV4};

use toe_bus::time::Duration;
use toe_bus::ConnId;
use toe_driver::AppEvent;
use toe_host::config::Settings;
use toe_host::pair::hosts;
use toe_host::runtime::Sim;
use toe_nic::wire;
use toemu_tests::{recv_exact, send_bytes};

const CONNS: usize = 600;

fn many(conns: usize) -> (Sim, Vec<ConnId>, Vec<ConnId>) {
    let mut s = Settings::default();
    for (k, v) in [
        ("max_conns", conns.to_string()),
        ("mtu", "1500".to_string()),
        ("socket_buf_bytes", "16KiB".to_string()),
        ("indicate_window_bytes", "16KiB".to_string()),
    ] {
        s.apply_override(k, &v).unwrap();
    }
    s.validate().unwrap();
    let (pa, pb) = wire(4096);
    let sim = hosts(&s, &s, 3, Box::new(pa), Box::new(pb)).unwrap();
    let (da, db) = (sim.driver(0), sim.driver(1));
    db.lock().listen(80, 128, None).unwrap();
    let to = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), 80);
    // In bursts no larger than the backlog (a bigger burst has its oldest half-open
    // handshakes recycled, as under a SYN flood).
    let mut clients = Vec::new();
    let mut servers = Vec::new();
    let mut up = 0;
    while clients.len() < conns {
        for _ in 0..100.min(conns - clients.len()) {
            clients.push(da.lock().connect(to, 0, None).unwrap());
        }
        sim.run_until(200_000, || {
            while let Some(c) = db.lock().accept(80) {
                servers.push(c);
            }
            while let Some((_, e)) = da.lock().take_event() {
                up += usize::from(e == AppEvent::Connected);
            }
            servers.len() == clients.len() && up == clients.len()
        })
        .unwrap();
    }
    sim.advance(Duration::from_millis(200)).unwrap();
    // Pair each server connection with its client (accepts need not come in connect order:
    // handshakes take bus and NIC time).
    let remote = |d: &toe_driver::SharedDriver, c: ConnId| {
        let info = d.lock().conn_info(c).unwrap();
        (info.local, info.remote)
    };
    let mut by_client: std::collections::BTreeMap<_, ConnId> = servers
        .iter()
        .map(|&s| {
            let (local, remote) = remote(&db, s);
            ((remote, local), s)
        })
        .collect();
    let servers = clients
        .iter()
        .map(|&c| by_client.remove(&remote(&da, c)).expect("accepted"))
        .collect();
    (sim, clients, servers)
}

fn serviced(sim: &Sim) -> u64 {
    (0..2)
        .map(|i| sim.with_host(i, |h| h.nic.stats().sockets_serviced))
        .sum()
}

#[test]
fn idle_connections_cost_nothing_per_poll_and_one_busy_connection_costs_itself() {
    let (sim, clients, servers) = many(CONNS);
    assert_eq!(sim.with_host(0, |h| h.nic.conn_count()), CONNS);
    // Idle: polls at the same instant touch no socket at all.
    let before = serviced(&sim);
    for _ in 0..1000 {
        assert!(!sim.poll_in_place(), "an idle world has nothing to do");
    }
    assert_eq!(serviced(&sim), before, "idle polls serviced sockets");
    // One busy connection: a few services per exchange on each side, not one per
    // connection (the old NIC visited all 2 x 600 per poll).
    let (c, s) = (clients[CONNS / 2], servers[CONNS / 2]);
    let before = serviced(&sim);
    send_bytes(&sim, 0, c, &[7u8; 4000]);
    recv_exact(&sim, 1, s, 4000, 100_000);
    sim.advance(Duration::from_millis(100)).unwrap();
    let spent = serviced(&sim) - before;
    assert!(
        spent < 100,
        "{spent} socket services for one 4000-byte exchange among {CONNS} connections"
    );
    // Every other connection is untouched and still works.
    let (c2, s2) = (clients[0], servers[0]);
    send_bytes(&sim, 0, c2, b"still here");
    assert_eq!(recv_exact(&sim, 1, s2, 10, 100_000), b"still here");
}

#[test]
fn deadlines_of_idle_connections_still_fire() {
    // Keep-alive probes of idle connections come from the deadline heap (no poll walks
    // them): after two keep-alive intervals every connection is still open, and each side
    // serviced its sockets about once per probe, not once per poll.
    let (sim, clients, _) = many(100);
    let before = serviced(&sim);
    sim.advance(Duration::from_secs(125)).unwrap();
    let da = sim.driver(0);
    for c in &clients {
        assert_eq!(
            da.lock().state(*c).unwrap(),
            toe_driver::ConnState::Established
        );
    }
    let spent = serviced(&sim) - before;
    // 100 connections x 2 sides x 2 probes, with their answers: a few hundred to a few
    // thousand services, never zero (the timers fired) and far below one per step.
    assert!(spent >= 400, "keep-alive timers did not fire: {spent}");
    assert!(spent < 10_000, "{spent} services for 400 probes");
}
