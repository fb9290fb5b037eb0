//! The kernel's own TCP on loopback, the baselines of `toemu bench`: one bulk stream, request
//! and response, and many concurrent connections (the scale section's yardstick: what the
//! same machine's memory hierarchy and the kernel make of N connections against one).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Instant as WallInstant;

use crate::datagen::{Check, Checker, DataGen};

/// Kernel loopback TCP through std sockets: a sender thread writes `bytes` of the seeded
/// stream, the receiver hashes what it reads. Returns (seconds, digest).
pub fn kernel_bulk(bytes: u64, seed: u64, check: Check) -> io::Result<(f64, [u8; 32])> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let t0 = WallInstant::now();
    let tx = std::thread::spawn(move || -> io::Result<()> {
        let mut s = TcpStream::connect(addr)?;
        let mut g = DataGen::new(seed);
        let mut buf = vec![0u8; 256 * 1024];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            g.fill(&mut buf[..n]);
            s.write_all(&buf[..n])?;
            left -= n as u64;
        }
        Ok(())
    });
    let (mut r, _) = l.accept()?;
    let mut h = Checker::new(check);
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    tx.join()
        .map_err(|_| io::Error::other("sender thread panicked"))??;
    Ok((t0.elapsed().as_secs_f64(), h.finish()))
}

/// Kernel loopback request/response with TCP_NODELAY; round trips in microseconds.
pub fn kernel_rr(iters: usize, size: usize) -> io::Result<Vec<f64>> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let srv = std::thread::spawn(move || -> io::Result<()> {
        let (mut s, _) = l.accept()?;
        s.set_nodelay(true)?;
        let mut buf = vec![0u8; size];
        for _ in 0..iters {
            s.read_exact(&mut buf)?;
            s.write_all(&buf)?;
        }
        Ok(())
    });
    let mut c = TcpStream::connect(addr)?;
    c.set_nodelay(true)?;
    let req = vec![0x5Au8; size];
    let mut buf = vec![0u8; size];
    let mut lat = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = WallInstant::now();
        c.write_all(&req)?;
        c.read_exact(&mut buf)?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    srv.join()
        .map_err(|_| io::Error::other("server thread panicked"))??;
    Ok(lat)
}

/// Kernel loopback TCP with `conns` connections open and `active` of them (spread over all)
/// each moving `total / active` bytes of the seeded stream for `seed`, at once: a sender
/// thread and a receiver thread, each waiting on epoll (mio) for whichever connection is
/// ready, as the TOE scale harness waits on driver events. Socket buffers are
/// `sock_buf_bytes` each way (`SO_SNDBUF`/`SO_RCVBUF`), as the TOE hosts' are. Every
/// connection's stream is checked with `check`. Returns (bytes moved, seconds).
///
/// Fails where [`kernel_scale_fits`] does.
pub fn kernel_scale(
    conns: usize,
    active: usize,
    total: u64,
    seed: u64,
    check: Check,
    sock_buf_bytes: usize,
) -> io::Result<(u64, f64)> {
    use socket2::{Domain, Socket, Type};
    let conns = conns.max(1);
    let active = active.clamp(1, conns);
    kernel_scale_fits(conns).map_err(io::Error::other)?;
    let sized = |s: &Socket| -> io::Result<()> {
        s.set_send_buffer_size(sock_buf_bytes)?;
        s.set_recv_buffer_size(sock_buf_bytes)
    };
    let l = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    sized(&l)?; // inherited by accepted sockets
    l.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
    l.listen(1024)?;
    let l: TcpListener = l.into();
    let addr = l.local_addr()?;
    let mut clients = Vec::with_capacity(conns);
    let mut servers = Vec::with_capacity(conns);
    while clients.len() < conns {
        let n = 256.min(conns - clients.len());
        for _ in 0..n {
            let c = Socket::new(Domain::IPV4, Type::STREAM, None)?;
            sized(&c)?;
            c.connect(&addr.into())?;
            clients.push(TcpStream::from(c));
        }
        for _ in 0..n {
            servers.push(l.accept()?.0);
        }
    }
    let stride = conns / active;
    let per = (total / active as u64).max(1);
    // Every connection carries the same stream, so the pairing of accepted and connected
    // sockets does not matter to the check. The idle ones stay open until the end.
    let mut clients: Vec<Option<TcpStream>> = clients.into_iter().map(Some).collect();
    let mut servers: Vec<Option<TcpStream>> = servers.into_iter().map(Some).collect();
    let tx: Vec<TcpStream> = (0..active)
        .filter_map(|k| clients[k * stride].take())
        .collect();
    let rx: Vec<TcpStream> = (0..active)
        .filter_map(|k| servers[k * stride].take())
        .collect();
    let expected = DataGen::digest_with(seed, per, check);
    let t0 = WallInstant::now();
    let sending = std::thread::Builder::new()
        .name("kernel-scale-tx".into())
        .spawn(move || scale_send(tx, seed, per))?;
    let received = scale_receive(rx, check, expected);
    let sent = sending
        .join()
        .map_err(|_| io::Error::other("sender thread panicked"))?;
    let secs = t0.elapsed().as_secs_f64();
    sent?;
    let bytes = received?;
    drop((clients, servers));
    Ok((bytes, secs))
}

/// Open files a [`kernel_scale`] point of `conns` connections needs: both ends of every
/// connection, the listener, two epoll instances and the process's own.
fn kernel_scale_files(conns: usize) -> u64 {
    2 * conns as u64 + 64
}

/// Whether this process can hold [`kernel_scale`]'s sockets for `conns` connections; raises
/// the open-file limit as far as needed and allowed (beyond the hard limit only with
/// CAP_SYS_RESOURCE). The error says what is missing.
pub fn kernel_scale_fits(conns: usize) -> Result<(), String> {
    let need = kernel_scale_files(conns);
    let mut got = rlimit::increase_nofile_limit(need).map_err(|e| e.to_string())?;
    if got < need && rlimit::Resource::NOFILE.set(need, need).is_ok() {
        got = need;
    }
    if got < need {
        return Err(format!(
            "{conns} kernel connections need {need} open files; the hard limit here is {got} \
             (raising it needs CAP_SYS_RESOURCE)"
        ));
    }
    Ok(())
}

/// Chunk of one write, bytes.
const SCALE_CHUNK: usize = 64 * 1024;

/// `streams`, non-blocking, registered with a new epoll instance for `interest` (token =
/// index).
fn registered(
    streams: Vec<TcpStream>,
    interest: mio::Interest,
) -> io::Result<(mio::Poll, Vec<mio::net::TcpStream>)> {
    let poll = mio::Poll::new()?;
    let mut out = Vec::with_capacity(streams.len());
    for (k, s) in streams.into_iter().enumerate() {
        s.set_nonblocking(true)?;
        let mut s = mio::net::TcpStream::from_std(s);
        poll.registry().register(&mut s, mio::Token(k), interest)?;
        out.push(s);
    }
    Ok((poll, out))
}

fn scale_send(streams: Vec<TcpStream>, seed: u64, per: u64) -> io::Result<()> {
    use mio::{net::TcpStream as MioStream, Events, Interest};
    struct Tx {
        s: MioStream,
        gen: DataGen,
        left: u64,
        /// Generated bytes the socket has not taken yet.
        carry: Vec<u8>,
        done: bool,
    }
    let (mut poll, streams) = registered(streams, Interest::WRITABLE)?;
    let mut conns: Vec<Tx> = streams
        .into_iter()
        .map(|s| Tx {
            s,
            gen: DataGen::new(seed),
            left: per,
            carry: Vec::new(),
            done: false,
        })
        .collect();
    let mut scratch = vec![0u8; SCALE_CHUNK];
    let mut left = conns.len();
    let mut events = Events::with_capacity(1024);
    while left > 0 {
        poll.poll(&mut events, None)?;
        for e in events.iter() {
            let c = &mut conns[e.token().0];
            if c.done {
                continue;
            }
            // Edge-triggered: write until the socket refuses.
            loop {
                let chunk: &[u8] = if !c.carry.is_empty() {
                    &c.carry
                } else if c.left > 0 {
                    let n = c.left.min(SCALE_CHUNK as u64) as usize;
                    c.gen.fill(&mut scratch[..n]);
                    c.left -= n as u64;
                    &scratch[..n]
                } else {
                    c.s.shutdown(std::net::Shutdown::Write)?;
                    poll.registry().deregister(&mut c.s)?;
                    c.done = true;
                    left -= 1;
                    break;
                };
                match c.s.write(chunk) {
                    Ok(m) if m == chunk.len() => c.carry.clear(),
                    Ok(m) => {
                        c.carry = chunk[m..].to_vec();
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        c.carry = chunk.to_vec();
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                        c.carry = chunk.to_vec();
                    }
                    Err(e) => return Err(e),
                }
            }
        }
    }
    Ok(())
}

fn scale_receive(streams: Vec<TcpStream>, check: Check, expected: [u8; 32]) -> io::Result<u64> {
    use mio::{Events, Interest};
    let (mut poll, streams) = registered(streams, Interest::READABLE)?;
    let mut conns: Vec<_> = streams
        .into_iter()
        .map(|s| Some((s, Checker::new(check))))
        .collect();
    let mut buf = vec![0u8; SCALE_CHUNK];
    let mut left = conns.len();
    let mut bytes = 0u64;
    let mut events = Events::with_capacity(1024);
    while left > 0 {
        poll.poll(&mut events, None)?;
        for e in events.iter() {
            let slot = &mut conns[e.token().0];
            let Some((s, h)) = slot.as_mut() else {
                continue;
            };
            let eof = loop {
                match s.read(&mut buf) {
                    Ok(0) => break true,
                    Ok(n) => {
                        h.update(&buf[..n]);
                        bytes += n as u64;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break false,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            };
            if eof {
                let (mut s, h) = slot.take().expect("open");
                poll.registry().deregister(&mut s)?;
                if h.finish() != expected {
                    return Err(io::Error::other(
                        "kernel scale baseline: integrity check failed",
                    ));
                }
                left -= 1;
            }
        }
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_scale_moves_every_active_connections_share_intact() {
        let (bytes, secs) = kernel_scale(40, 8, 8 << 20, 5, Check::Crc32c, 64 * 1024).unwrap();
        assert_eq!(bytes, 8 << 20, "8 active connections × 1 MiB each");
        assert!(secs > 0.0);
    }
}
