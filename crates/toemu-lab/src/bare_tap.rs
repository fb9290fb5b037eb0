//! The bare-smoltcp sink on a real phy (TAP): the baseline of the TAP benchmark. Same stack
//! settings as the emulated TOE host, no offload layers: the application hashes received data
//! in place in the socket buffer. Prints the same `sink: connection ...` line as the TOE sink.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration as StdDuration;

use sha2::{Digest, Sha256};
use smoltcp::iface::SocketSet;
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use toe_nic::nic::{make_interface, make_socket};
use toe_nic::{NicConfig, NicDevice, Phy};

use toe_host::config::Settings;
use toe_host::runtime::{BoxPhy, RealClock};

/// Serve a bare-smoltcp sink on `port` until `stop` is set or `max` passes; one connection
/// at a time (the listening socket is re-armed after each).
pub fn run_bare_sink(
    settings: &Settings,
    nic: &NicConfig,
    phy: BoxPhy,
    port: u16,
    max: Option<StdDuration>,
    stop: &AtomicBool,
) -> io::Result<()> {
    let waitable = phy.waitable();
    let mtu = settings.mtu as usize;
    let mut dev = NicDevice::new(phy, mtu, nic.ip, false);
    let clock = RealClock::start();
    let mut iface = make_interface(
        nic.mac,
        nic.ip,
        nic.prefix_len,
        nic.gateway,
        nic.seed,
        &mut dev,
        clock.now(),
    );
    let mut sockets = SocketSet::new(Vec::new());
    let buf = settings.socket_buf_bytes as usize;
    let mut sock = make_socket(buf, buf, nic.ack_delay, settings.congestion);
    sock.listen(port).map_err(io::Error::other)?;
    let h = sockets.add(sock);
    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    let mut started: Option<Instant> = None;
    let mut out = io::stdout();
    let t0 = std::time::Instant::now();
    while !stop.load(Ordering::Relaxed) && max.is_none_or(|m| t0.elapsed() < m) {
        let now = clock.now();
        iface.poll(now, &mut dev, &mut sockets);
        let s = sockets.get_mut::<tcp::Socket<'_>>(h);
        let mut moved = false;
        while s.can_recv() {
            if started.is_none() {
                started = Some(now);
            }
            let n = s
                .recv(|d| {
                    hasher.update(&*d);
                    (d.len(), d.len())
                })
                .map_err(io::Error::other)?;
            bytes += n as u64;
            moved |= n > 0;
        }
        let finished = matches!(s.recv(|_| (0, ())), Err(tcp::RecvError::Finished));
        if finished || (s.state() == tcp::State::Closed && started.is_some()) {
            s.close();
            iface.poll(now, &mut dev, &mut sockets);
            let secs = (now - started.unwrap_or(now)).total_micros().max(1) as f64 / 1e6;
            writeln!(
                out,
                "sink: connection bare {bytes} bytes sha256 {} in {secs:.3} s ({:.1} MB/s)",
                hex::encode(std::mem::take(&mut hasher).finalize()),
                bytes as f64 / secs / 1e6
            )?;
            out.flush()?;
            bytes = 0;
            started = None;
            let s = sockets.get_mut::<tcp::Socket<'_>>(h);
            s.abort();
            iface.poll(now, &mut dev, &mut sockets);
            let s = sockets.get_mut::<tcp::Socket<'_>>(h);
            let _ = s.listen(port);
            continue;
        }
        if moved {
            continue;
        }
        let delay = iface
            .poll_delay(now, &sockets)
            .map(|d| StdDuration::from_micros(d.total_micros()))
            .unwrap_or(StdDuration::from_millis(5))
            .min(StdDuration::from_millis(5));
        if let Some(w) = &waitable {
            let mut sel = crossbeam_channel::Select::new();
            sel.recv(w);
            let _ = sel.ready_timeout(delay);
        }
    }
    Ok(())
}
