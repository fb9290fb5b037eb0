//! The message transport's shell on std TCP (`toemu msg serve` and `toemu msg send`): the
//! pure pipe and sessions of [`toe_msg`] over non-blocking sockets (mio), each connection
//! TLS 1.3 unless plaintext is asked for, so two real machines can run it across a real
//! network. One thread; the sockets are polled, the pipe does the rest.
//!
//! Each connection opens with the pipe hello ([`toe_msg::hello`]) after its handshake; the
//! server keeps one pipe per pipe ID. The server writes each session's messages to
//! `DIR/PIPE-SESSION/NNNNNN` (or only hashes them) and reports per session: messages,
//! bytes and the SHA-256 of their concatenation.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use sha2::{Digest, Sha256};
use toe_msg::{
    hello, parse_hello, Event, Identity, Pipe, PipeConfig, PipeEvent, RefuseReason, SendError, Tls,
    HELLO_LEN,
};

/// How connections are protected.
#[derive(Debug)]
pub enum Security {
    /// Plaintext (only when asked for; said so in the output).
    Plain,
    /// TLS 1.3 with this identity (mutual certificates).
    Tls(Identity),
}

impl Security {
    /// Plaintext or TLS, for the output.
    pub fn describe(&self) -> String {
        match self {
            Security::Plain => "PLAINTEXT (no TLS: anyone on the path reads and changes it)".into(),
            Security::Tls(id) => format!("TLS 1.3, mutual certificates, this side {}", id.name),
        }
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// One TCP connection of a pipe.
struct Link {
    sock: TcpStream,
    tls: Option<Tls>,
    /// Bytes to write to the socket.
    out: Vec<u8>,
    /// Plaintext received before the hello was complete.
    hello: Vec<u8>,
    /// (pipe ID, connection number in it) once it joined.
    joined: Option<(u64, usize)>,
    /// The opener's end: the pipe it joins once its handshake is over (an acceptor's
    /// learns its pipe from the hello).
    join_to: Option<u64>,
    /// Plaintext the TLS layer did not take yet.
    pending: Vec<u8>,
    dead: bool,
    /// Why it died, if it failed.
    error: Option<String>,
}

impl Link {
    fn new(sock: TcpStream, tls: Option<Tls>) -> Link {
        Link {
            sock,
            tls,
            out: Vec::new(),
            hello: Vec::new(),
            joined: None,
            join_to: None,
            pending: Vec::new(),
            dead: false,
            error: None,
        }
    }

    fn ready(&self) -> bool {
        self.tls.as_ref().is_none_or(|t| !t.is_handshaking())
    }

    /// Read what the socket has: the plaintext.
    fn read(&mut self) -> io::Result<Vec<u8>> {
        let mut plain = Vec::new();
        let mut buf = [0u8; 64 << 10];
        loop {
            match self.sock.read(&mut buf) {
                Ok(0) => {
                    self.dead = true;
                    break;
                }
                Ok(n) => match &mut self.tls {
                    Some(t) => t
                        .receive(&buf[..n], &mut plain)
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?,
                    None => plain.extend_from_slice(&buf[..n]),
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(plain)
    }

    /// Queue plaintext (through TLS, if any) and write what the socket takes.
    fn write(&mut self, plain: &[u8]) -> io::Result<()> {
        match &mut self.tls {
            Some(t) => {
                self.pending.extend_from_slice(plain);
                let n = t.send(&self.pending);
                self.pending.drain(..n);
                t.transmit(&mut self.out);
            }
            None => self.out.extend_from_slice(plain),
        }
        while !self.out.is_empty() {
            match self.sock.write(&self.out) {
                Ok(0) => break,
                Ok(n) => {
                    self.out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Room for more frames: little waits to be written.
    fn has_room(&self) -> bool {
        self.out.len() + self.pending.len() < 256 << 10
    }
}

/// One pass over `links`: bytes in go to their pipes, frames out go to the connections
/// with room. Returns whether anything moved; log lines go to `log`.
fn pass(
    links: &mut [Link],
    pipes: &mut HashMap<u64, Pipe>,
    cfg: PipeConfig,
    now_us: u64,
    log: &mut impl FnMut(String),
) -> bool {
    let mut moved = false;
    for l in links.iter_mut().filter(|l| !l.dead) {
        let plain = match l.read() {
            Ok(p) => p,
            Err(e) => {
                log(format!(
                    "toemu msg: connection {:?} dropped: {e}",
                    l.sock.peer_addr().ok()
                ));
                l.dead = true;
                l.error = Some(e.to_string());
                continue;
            }
        };
        moved |= !plain.is_empty();
        let mut plain = &plain[..];
        if let (None, Some(id), true) = (l.joined, l.join_to, l.ready()) {
            // Authenticated: it joins the pipe.
            let p = pipes.entry(id).or_insert_with(|| Pipe::new(cfg));
            l.joined = Some((id, p.add_conn()));
        }
        if l.joined.is_none() && l.ready() {
            let take = (HELLO_LEN - l.hello.len()).min(plain.len());
            l.hello.extend_from_slice(&plain[..take]);
            plain = &plain[take..];
            if let Ok(h) = <[u8; HELLO_LEN]>::try_from(&l.hello[..]) {
                match parse_hello(&h) {
                    Some(id) => {
                        let p = pipes.entry(id).or_insert_with(|| Pipe::new(cfg));
                        l.joined = Some((id, p.add_conn()));
                    }
                    None => {
                        log("toemu msg: a connection without the pipe hello, dropped".into());
                        l.dead = true;
                        continue;
                    }
                }
            }
        }
        if let Some((id, c)) = l.joined {
            if let Some(p) = pipes.get_mut(&id) {
                p.on_bytes(c, plain, now_us);
            }
        }
        let mut frames = Vec::new();
        if let (Some((id, c)), true) = (l.joined, l.has_room()) {
            if let Some(p) = pipes.get_mut(&id) {
                p.fill(c, &mut frames, 64 << 10, now_us);
            }
        }
        moved |= !frames.is_empty();
        if let Err(e) = l.write(&frames) {
            log(format!("toemu msg: write failed: {e}"));
            l.dead = true;
            l.error = Some(e.to_string());
        }
    }
    for l in links.iter_mut().filter(|l| l.dead) {
        if let Some((id, c)) = l.joined.take() {
            if let Some(p) = pipes.get_mut(&id) {
                p.conn_down(c);
            }
        }
    }
    for p in pipes.values_mut() {
        p.on_time(now_us);
    }
    moved
}

/// What `toemu msg serve` reports per session.
#[derive(Debug, Default, Clone)]
struct Received {
    messages: u64,
    bytes: u64,
    sha: Sha256,
}

/// `toemu msg serve --listen ADDR`: accept pipes until `stop`; each session's messages go
/// to `dir` (or are only hashed). With TLS, sessions must ask for the principal the
/// server's certificate names (others are refused); plaintext accepts any.
pub fn serve(
    listen: SocketAddr,
    dir: Option<PathBuf>,
    security: Security,
    stop: &AtomicBool,
    mut log: impl FnMut(String),
) -> io::Result<()> {
    let mut listener = TcpListener::bind(listen)?;
    let mut poll = mio::Poll::new()?;
    poll.registry()
        .register(&mut listener, mio::Token(0), mio::Interest::READABLE)?;
    log(format!(
        "toemu msg serve: listening on {}, {}",
        listener.local_addr()?,
        security.describe()
    ));
    let name = match &security {
        Security::Tls(id) => Some(id.name.clone()),
        Security::Plain => None,
    };
    let cfg = PipeConfig::default();
    let mut links: Vec<Link> = Vec::new();
    let mut pipes: HashMap<u64, Pipe> = HashMap::new();
    let mut got: HashMap<(u64, u32), Received> = HashMap::new();
    let started = Instant::now();
    let mut events = mio::Events::with_capacity(256);
    while !stop.load(Ordering::Relaxed) {
        loop {
            match listener.accept() {
                Ok((sock, _)) => {
                    sock.set_nodelay(true)?;
                    let tls = match &security {
                        Security::Tls(id) => Some(
                            Tls::server(id, unix_now())
                                .map_err(|e| io::Error::other(e.to_string()))?,
                        ),
                        Security::Plain => None,
                    };
                    links.push(Link::new(sock, tls));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        let now_us = started.elapsed().as_micros() as u64;
        let moved = pass(&mut links, &mut pipes, cfg, now_us, &mut log);
        links.retain(|l| !l.dead);
        for (&pid, p) in pipes.iter_mut() {
            while let Some(e) = p.poll_event() {
                match e {
                    PipeEvent::Session {
                        id,
                        event: Event::Incoming { principal },
                    } => {
                        let s = p.session(id).expect("incoming");
                        if name.as_ref().is_some_and(|n| *n != principal) {
                            log(format!("toemu msg serve: session {pid:x}/{id} asks for {principal:?}: refused"));
                            s.refuse(RefuseReason::WrongPrincipal);
                        } else {
                            s.accept();
                        }
                    }
                    PipeEvent::Session {
                        id,
                        event: Event::Received { .. },
                    } => {
                        let Some((_, data)) = p.session(id).and_then(|s| s.recv(now_us)) else {
                            continue;
                        };
                        let r = got.entry((pid, id)).or_default();
                        r.messages += 1;
                        r.bytes += data.len() as u64;
                        r.sha.update(&data);
                        if let Some(d) = &dir {
                            let d = d.join(format!("{pid:016x}-{id}"));
                            std::fs::create_dir_all(&d)?;
                            std::fs::write(d.join(format!("{:06}", r.messages)), &data)?;
                        }
                    }
                    PipeEvent::Session {
                        id,
                        event: Event::Closed,
                    } => {
                        if let Some(r) = got.remove(&(pid, id)) {
                            log(format!(
                                "toemu msg serve: session {pid:016x}/{id} closed: {} messages, {} bytes, sha256 {}",
                                r.messages,
                                r.bytes,
                                hex(&r.sha.finalize())
                            ));
                        }
                    }
                    PipeEvent::Session {
                        id,
                        event: Event::Error(e),
                    } => log(format!("toemu msg serve: session {pid:016x}/{id}: {e}")),
                    PipeEvent::ConnBroken { conn, error } => log(format!(
                        "toemu msg serve: pipe {pid:016x} connection {conn}: {error}"
                    )),
                    PipeEvent::Session { .. } => {}
                }
            }
        }
        pipes.retain(|_, p| p.sessions() > 0 || p.conns_up() > 0);
        if !moved {
            wait(&mut poll, &mut events)?;
        }
    }
    Ok(())
}

/// Sleep up to 1 ms for socket readiness (a signal, SIGTERM say, only cuts it short).
fn wait(poll: &mut mio::Poll, events: &mut mio::Events) -> io::Result<()> {
    match poll.poll(events, Some(Duration::from_millis(1))) {
        Err(e) if e.kind() != io::ErrorKind::Interrupted => Err(e),
        _ => Ok(()),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// What `toemu msg send` does.
#[derive(Debug)]
pub struct SendOptions {
    /// The server.
    pub to: SocketAddr,
    /// The principal sessions ask for (with TLS: the server certificate's name).
    pub principal: String,
    /// The data.
    pub data: Vec<u8>,
    /// TCP connections in the pipe.
    pub connections: usize,
    /// Sessions the data is spread over.
    pub sessions: usize,
    /// Bytes per message.
    pub message_bytes: usize,
}

/// What `toemu msg send` measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SendReport {
    /// Bytes sent and acknowledged.
    pub bytes: u64,
    /// Messages acknowledged.
    pub messages: u64,
    /// Messages that failed.
    pub failed: u64,
    /// Seconds from the first connection to the last session closed.
    pub seconds: f64,
    /// Per session: (messages, SHA-256 of their concatenation) as the server should report.
    pub sessions: Vec<(u64, String)>,
}

/// `toemu msg send`: one pipe of `connections` connections to `to`, the data cut into
/// messages dealt round robin to `sessions` sessions; `progress(acked_bytes)` is called
/// as acknowledgements come.
pub fn send(
    o: &SendOptions,
    security: &Security,
    mut progress: impl FnMut(u64),
    mut log: impl FnMut(String),
) -> io::Result<SendReport> {
    let started = Instant::now();
    let pipe_id = u64::from_le_bytes(crate::iscsi::random_bytes().map_err(io::Error::other)?);
    let cfg = PipeConfig::default();
    let mut links = Vec::new();
    for _ in 0..o.connections.max(1) {
        let std = std::net::TcpStream::connect(o.to)?;
        std.set_nodelay(true)?;
        std.set_nonblocking(true)?;
        let tls = match security {
            Security::Tls(id) => Some(
                Tls::client(id, &o.principal, unix_now())
                    .map_err(|e| io::Error::other(e.to_string()))?,
            ),
            Security::Plain => None,
        };
        let mut l = Link::new(TcpStream::from_std(std), tls);
        l.join_to = Some(pipe_id);
        l.write(&hello(pipe_id))?;
        links.push(l);
    }
    let mut pipes: HashMap<u64, Pipe> = HashMap::new();
    pipes.insert(pipe_id, Pipe::new(cfg));
    let ids: Vec<u32> = {
        let p = pipes.get_mut(&pipe_id).expect("pipe");
        (0..o.sessions.max(1))
            .map(|_| p.open(&o.principal))
            .collect()
    };
    let chunks: Vec<&[u8]> = o.data.chunks(o.message_bytes.max(1)).collect();
    // Per session: the indexes of its messages, the next to queue, and its hash.
    let n = ids.len();
    let mut next: Vec<usize> = (0..n).collect();
    let mut sha: Vec<Sha256> = vec![Sha256::new(); n];
    let mut counts = vec![0u64; n];
    let mut ready = vec![false; n];
    let mut closed = 0;
    let (mut acked, mut messages, mut failed) = (0u64, 0u64, 0u64);
    let mut sizes: HashMap<(u32, u64), usize> = HashMap::new();
    let mut poll = mio::Poll::new()?;
    let mut events = mio::Events::with_capacity(64);
    let mut last_ready = Instant::now();
    while closed < n {
        let now_us = started.elapsed().as_micros() as u64;
        let p = pipes.get_mut(&pipe_id).expect("pipe");
        for (k, &id) in ids.iter().enumerate() {
            if !ready[k] {
                continue;
            }
            let Some(s) = p.session(id) else { continue };
            while next[k] < chunks.len() {
                match s.send(chunks[next[k]].to_vec(), now_us) {
                    Ok(m) => {
                        sizes.insert((id, m.0), chunks[next[k]].len());
                        sha[k].update(chunks[next[k]]);
                        counts[k] += 1;
                        next[k] += n;
                    }
                    Err(SendError::QueueFull { .. }) => break,
                    Err(e) => return Err(io::Error::other(format!("session {id}: {e}"))),
                }
            }
            if next[k] >= chunks.len() {
                s.close();
                ready[k] = false;
            }
        }
        let moved = pass(&mut links, &mut pipes, cfg, now_us, &mut log);
        let p = pipes.get_mut(&pipe_id).expect("pipe");
        while let Some(e) = p.poll_event() {
            let PipeEvent::Session { id, event } = e else {
                log(format!("toemu msg send: {e:?}"));
                continue;
            };
            let k = ids.iter().position(|&i| i == id).unwrap_or(0);
            match event {
                Event::Created => ready[k] = true,
                Event::Acked { id: m, .. } => {
                    messages += 1;
                    acked += sizes.remove(&(id, m.0)).unwrap_or(0) as u64;
                    progress(acked);
                }
                Event::Failed { .. } => failed += 1,
                Event::Refused(r) => {
                    return Err(io::Error::other(format!(
                        "the server refused the session: {r:?}"
                    )))
                }
                Event::Error(e) => return Err(io::Error::other(format!("session {id}: {e}"))),
                Event::Closed => closed += 1,
                _ => {}
            }
        }
        if links.iter().all(|l| l.dead) {
            let why = links.iter().find_map(|l| l.error.clone());
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                format!(
                    "every connection of the pipe is gone ({})",
                    why.as_deref().unwrap_or("closed by the server")
                ),
            ));
        }
        if moved {
            last_ready = Instant::now();
        } else {
            if last_ready.elapsed() > Duration::from_secs(120) {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no progress for 120 s",
                ));
            }
            wait(&mut poll, &mut events)?;
        }
    }
    Ok(SendReport {
        bytes: acked,
        messages,
        failed,
        seconds: started.elapsed().as_secs_f64(),
        sessions: counts
            .into_iter()
            .zip(sha)
            .map(|(c, s)| (c, hex(&s.finalize())))
            .collect(),
    })
}
