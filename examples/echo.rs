//! Echo over two emulated TOE hosts in real time: an ordinary `std::io::Read`/`Write` server
//! on host 10.0.0.2 and a client on 10.0.0.1, each on its own thread, the NICs on the
//! adapter thread.
//!
//! `cargo run --release -p toemu-examples --example echo [BYTES]`

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4};

use toe_driver::Stream;
use toe_host::config::Settings;
use toe_host::runtime::{test_nic, Host, Threaded};
use toe_nic::wire;

fn main() -> std::io::Result<()> {
    let bytes: usize = std::env::args()
        .nth(1)
        .map(|s| toe_host::config::parse_size(&s).expect("size") as usize)
        .unwrap_or(16 << 20);
    let settings = Settings::default();
    let (pa, pb) = wire(1024);
    let now = toe_bus::time::Instant::from_micros(0);
    let a = Host::new("client", &settings, test_nic(0, 1), Box::new(pa), now)
        .map_err(std::io::Error::other)?;
    let b = Host::new("server", &settings, test_nic(1, 1), Box::new(pb), now)
        .map_err(std::io::Error::other)?;
    let rt = Threaded::start(vec![a, b]);

    let server_driver = rt.driver(1);
    server_driver
        .lock()
        .listen(7, 8, None)
        .map_err(std::io::Error::other)?;
    let server_waiter = rt.waiter(1);
    let server = std::thread::spawn(move || -> std::io::Result<usize> {
        let mut s = Stream::accept(server_driver, 7, server_waiter)?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0;
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                break;
            }
            s.write_all(&buf[..n])?;
            total += n;
        }
        s.flush()?;
        s.close()?;
        Ok(total)
    });

    let d = rt.driver(0);
    let conn = d
        .lock()
        .connect(SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), 7), 0, None)
        .map_err(std::io::Error::other)?;
    let client = Stream::connected(d, conn, rt.waiter(0))?;
    let t0 = std::time::Instant::now();
    let mut writer = client.clone();
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        let chunk = vec![0xA5u8; 256 * 1024];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len());
            writer.write_all(&chunk[..n])?;
            left -= n;
        }
        writer.flush()?;
        writer.close()
    });
    let mut reader = client.clone();
    let mut buf = vec![0u8; 64 * 1024];
    let mut back = 0;
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        assert!(buf[..n].iter().all(|&b| b == 0xA5), "echo corrupted");
        back += n;
    }
    sender.join().expect("sender thread")?;
    let echoed = server.join().expect("server thread")?;
    let secs = t0.elapsed().as_secs_f64();
    let info = client.info()?;
    println!(
        "echoed {back} bytes (server saw {echoed}) in {secs:.3} s: {:.1} MB/s each way; client I = {}, acks sent {}",
        back as f64 / secs / 1e6,
        info.indicated,
        info.rx.acks_sent
    );
    client.wait_closed()?;
    drop(rt);
    Ok(())
}
