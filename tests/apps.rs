//! The example apps (echo, http, sink, send, get) against each other on the virtual clock: the
//! same code `toemu serve` runs on a TAP device, checked without root.

use std::net::{Ipv4Addr, SocketAddrV4};

use toe_bus::ConnId;
use toe_host::config::Settings;
use toe_host::runtime::{test_nic, Host, Sim};
use toemu_apps::echo::Echo;
use toemu_apps::http::{Get, Http};
use toemu_apps::sink::{SendClient, Sink};
use toemu_apps::{App, RxMode};
use toemu_lab::datagen::DataGen;
use toemu_lab::serve::run_apps_sim;

fn hosts(listen: u16) -> Sim {
    let s = Settings::default();
    let (pa, pb) = toe_nic::wire(1024);
    let now = toe_bus::time::Instant::from_micros(0);
    let a = Host::new("client", &s, test_nic(0, 3), Box::new(pa), now).unwrap();
    let b = Host::new("server", &s, test_nic(1, 3), Box::new(pb), now).unwrap();
    let sim = Sim::new(vec![a, b]);
    sim.driver(1).lock().listen(listen, 16, None).unwrap();
    sim
}

fn server_addr(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), port)
}

fn hex_digest(seed: u64, len: u64) -> String {
    DataGen::digest(seed, len)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn http_get_bytes_and_404() {
    let sim = hosts(80);
    let mut srv = Http::new(80, RxMode::InPlace, None);
    let mut get = Get::new(server_addr(80), "/bytes/3000000".into());
    let log = run_apps_sim(&sim, &mut get, &mut srv, 2_000_000).unwrap();
    let line = log
        .iter()
        .find(|l| l.starts_with("get:"))
        .expect("get reported");
    assert!(line.contains("status 200"), "{line}");
    assert!(line.contains(&hex_digest(0, 3_000_000)), "{line}");
    assert!(get.error.is_none());
    let mut get = Get::new(server_addr(80), "/nothing/here".into());
    let log = run_apps_sim(&sim, &mut get, &mut srv, 2_000_000).unwrap();
    assert!(log.iter().any(|l| l.contains("status 404")), "{log:?}");
    assert_eq!(srv.responses[0], 1);
    assert_eq!(srv.responses[2], 1);
}

/// A raw client on host 0: send `request`, collect everything until the server closes.
fn raw_exchange(sim: &Sim, srv: &mut dyn App, request: &[u8]) -> Vec<u8> {
    let da = sim.driver(0);
    let conn: ConnId = da.lock().connect(server_addr(80), 0, None).unwrap();
    let mut sent = false;
    let mut got = Vec::new();
    for _ in 0..1_000_000 {
        sim.step_or_idle().unwrap();
        let now = sim.now();
        srv.poll(&mut sim.driver(1).lock(), now).unwrap();
        let mut d = da.lock();
        if !sent && d.state(conn).unwrap() == toe_driver::ConnState::Established {
            let mut b = d.alloc(request.len()).unwrap();
            d.memory()
                .clone()
                .slice_mut(&mut b)
                .copy_from_slice(request);
            d.send(conn, b, request.len()).unwrap();
            sent = true;
        }
        let mut buf = vec![0u8; 65536];
        let n = d.read(now, conn, &mut buf).unwrap_or(0);
        got.extend_from_slice(&buf[..n]);
        if d.at_eof(conn).unwrap_or(true) {
            let _ = d.close(conn);
            return got;
        }
    }
    panic!(
        "no end of response; got {:?}",
        String::from_utf8_lossy(&got)
    );
}

#[test]
fn http_pipelined_keep_alive_and_bad_requests() {
    let sim = hosts(80);
    let mut srv = Http::new(80, RxMode::InPlace, None);
    let two = raw_exchange(
        &sim,
        &mut srv,
        b"GET /bytes/10 HTTP/1.1\r\nHost: a\r\n\r\nGET /bytes/20 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    let text = String::from_utf8_lossy(&two);
    assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 2, "{text}");
    assert!(text.contains("Content-Length: 10\r\n") && text.contains("Content-Length: 20\r\n"));
    let mut body = vec![0u8; 20];
    DataGen::new(0).fill(&mut body);
    assert!(two.ends_with(&body), "second body is /bytes/20");
    let bad = raw_exchange(&sim, &mut srv, b"BLAH\r\n\r\n");
    assert!(
        bad.starts_with(b"HTTP/1.1 400 Bad Request\r\n"),
        "{:?}",
        String::from_utf8_lossy(&bad)
    );
    let post = raw_exchange(
        &sim,
        &mut srv,
        b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
    );
    assert!(
        post.starts_with(b"HTTP/1.1 405"),
        "{:?}",
        String::from_utf8_lossy(&post)
    );
}

#[test]
fn send_to_sink_in_place_and_with_named_buffers() {
    for mode in [
        RxMode::InPlace,
        RxMode::Named {
            buf_bytes: 1 << 20,
            bufs: 2,
            push: true,
        },
    ] {
        let sim = hosts(9);
        let mut sink = Sink::new(9, mode, None);
        let bytes = 8u64 << 20;
        let mut send = SendClient::new(server_addr(9), bytes, 4);
        let log = run_apps_sim(&sim, &mut send, &mut sink, 5_000_000).unwrap();
        assert!(send.error.is_none(), "{log:?}");
        let r = sink.results.first().expect("sink finished the connection");
        assert_eq!(r.bytes, bytes, "{mode:?}");
        assert_eq!(r.sha256, hex_digest(4, bytes), "{mode:?}");
        assert!(!r.reset);
    }
}

/// A client that writes `data` and reads the echo back.
struct EchoClient {
    data: Vec<u8>,
    conn: Option<ConnId>,
    sent: bool,
    back: Vec<u8>,
}

impl App for EchoClient {
    fn name(&self) -> &'static str {
        "echo-client"
    }
    fn poll(
        &mut self,
        d: &mut toe_driver::Driver,
        now: toe_bus::time::Instant,
    ) -> std::io::Result<bool> {
        let conn = *self
            .conn
            .get_or_insert_with(|| d.connect(server_addr(7), 0, None).unwrap());
        if d.state(conn).unwrap() != toe_driver::ConnState::Established {
            return Ok(false);
        }
        if !self.sent {
            let mut b = d.alloc(self.data.len()).unwrap();
            d.memory()
                .clone()
                .slice_mut(&mut b)
                .copy_from_slice(&self.data);
            d.send(conn, b, self.data.len()).unwrap();
            self.sent = true;
        }
        while let Some((b, _)) = d.take_send_done(conn).unwrap() {
            d.free(b);
        }
        let mut buf = vec![0u8; 65536];
        let n = d.read(now, conn, &mut buf).unwrap();
        self.back.extend_from_slice(&buf[..n]);
        if self.back.len() == self.data.len() {
            d.close(conn).unwrap();
        }
        Ok(n > 0)
    }
    fn done(&self) -> bool {
        self.back.len() == self.data.len()
    }
}

#[test]
fn echo_round_trip() {
    let sim = hosts(7);
    let mut echo = Echo::new(7, RxMode::InPlace);
    let mut data = vec![0u8; 3 << 20];
    DataGen::new(11).fill(&mut data);
    let mut cli = EchoClient {
        data: data.clone(),
        conn: None,
        sent: false,
        back: Vec::new(),
    };
    run_apps_sim(&sim, &mut cli, &mut echo, 5_000_000).unwrap();
    assert!(cli.back == data, "echo intact");
    assert_eq!(echo.echoed, data.len() as u64);
}
