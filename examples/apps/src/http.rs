//! `http`: an HTTP/1.1 server (GET and HEAD, keep-alive, Content-Length) serving `/bytes/N`
//! (the first N bytes of the stream of seed 0, see [`crate::datagen`]) and files from a
//! directory; malformed requests get 400, unknown paths 404, other methods 405. Port 80 by
//! default.
//!
//! Also the `get` client: one GET of an `http://IPv4[:port]/path` URL, reporting the status,
//! body length and SHA-256.

use std::fs::File;
use std::io::{self, Read};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};
use toe_bus::time::Instant;
use toe_driver::{ConnState, Driver};

use crate::datagen::DataGen;
use crate::io::{ConnIo, RxMode};
use crate::App;

/// Longest request head (request line and headers) accepted, in bytes.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Largest `/bytes/N` served.
pub const MAX_GENERATED_BYTES: u64 = 1 << 40;
const CHUNK: usize = 256 * 1024;

enum Body {
    Empty,
    Gen { gen: Box<DataGen>, left: u64 },
    File { file: File, left: u64 },
}

enum Phase {
    Reading,
    Responding { body: Body, keep_alive: bool },
    Closing,
}

struct HttpConn {
    io: ConnIo,
    inbuf: Vec<u8>,
    discard: u64,
    phase: Phase,
    requests: u64,
}

/// A parsed request head.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    /// Method, e.g. `GET`.
    pub method: String,
    /// Request target, e.g. `/bytes/10`.
    pub target: String,
    /// HTTP/1.1 (true) or HTTP/1.0.
    pub http11: bool,
    /// Connection should stay open after the response.
    pub keep_alive: bool,
    /// Content-Length of a request body, 0 if none.
    pub body_len: u64,
}

/// Parse a request head (without the final blank line). Errors carry the reason for a 400.
pub fn parse_request(head: &[u8]) -> Result<Request, String> {
    let text = std::str::from_utf8(head).map_err(|_| "request head is not UTF-8".to_string())?;
    let mut lines = text.split("\r\n");
    let line = lines.next().unwrap_or("");
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(format!("malformed request line {line:?}"));
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(format!("malformed method {method:?}"));
    }
    if !target.starts_with('/') {
        return Err(format!("unsupported request target {target:?}"));
    }
    let http11 = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        v => return Err(format!("unsupported version {v:?}")),
    };
    let mut keep_alive = http11;
    let mut body_len = 0;
    for h in lines {
        let Some((name, value)) = h.split_once(':') else {
            return Err(format!("malformed header {h:?}"));
        };
        if name.is_empty() || name.contains(' ') {
            return Err(format!("malformed header name {name:?}"));
        }
        let value = value.trim();
        if name.eq_ignore_ascii_case("connection") {
            if value.eq_ignore_ascii_case("close") {
                keep_alive = false;
            } else if value.eq_ignore_ascii_case("keep-alive") {
                keep_alive = true;
            }
        } else if name.eq_ignore_ascii_case("content-length") {
            body_len = value
                .parse()
                .map_err(|_| format!("bad Content-Length {value:?}"))?;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err("request bodies with Transfer-Encoding are not supported".into());
        }
    }
    Ok(Request {
        method: method.to_string(),
        target: target.to_string(),
        http11,
        keep_alive,
        body_len,
    })
}

/// The HTTP server.
pub struct Http {
    port: u16,
    mode: RxMode,
    dir: Option<PathBuf>,
    conns: Vec<HttpConn>,
    log: Vec<String>,
    /// Responses sent, by status: 200, 400, 404, 405.
    pub responses: [u64; 4],
}

impl std::fmt::Debug for Http {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Http").field("port", &self.port).finish()
    }
}

impl Http {
    /// A server on `port`, serving files from `dir` if given.
    pub fn new(port: u16, mode: RxMode, dir: Option<PathBuf>) -> Self {
        Http {
            port,
            mode,
            dir,
            conns: Vec::new(),
            log: Vec::new(),
            responses: [0; 4],
        }
    }

    fn resolve(&self, target: &str) -> Result<(Body, u64), u16> {
        let path = target.split('?').next().unwrap_or("");
        if let Some(n) = path.strip_prefix("/bytes/") {
            let n: u64 = n.parse().map_err(|_| 404u16)?;
            if n > MAX_GENERATED_BYTES {
                return Err(404);
            }
            return Ok((
                Body::Gen {
                    gen: Box::new(DataGen::new(0)),
                    left: n,
                },
                n,
            ));
        }
        let Some(dir) = &self.dir else {
            return Err(404);
        };
        let rel = Path::new(path.trim_start_matches('/'));
        if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
            return Err(404);
        }
        let full = dir.join(rel);
        let file = File::open(&full).map_err(|_| 404u16)?;
        let meta = file.metadata().map_err(|_| 404u16)?;
        if !meta.is_file() {
            return Err(404);
        }
        Ok((
            Body::File {
                file,
                left: meta.len(),
            },
            meta.len(),
        ))
    }

    fn status_index(code: u16) -> usize {
        match code {
            200 => 0,
            400 => 1,
            404 => 2,
            _ => 3,
        }
    }

    /// Handle the request heads waiting in `c.inbuf`; returns true if a response started.
    fn start_response(&mut self, i: usize, d: &mut Driver) -> io::Result<bool> {
        let c = &mut self.conns[i];
        let Some(end) = c.inbuf.windows(4).position(|w| w == b"\r\n\r\n") else {
            if c.inbuf.len() > MAX_HEAD_BYTES {
                let msg = b"request head too large\n".to_vec();
                return self.respond_error(i, d, 400, &msg);
            }
            return Ok(false);
        };
        let head: Vec<u8> = c.inbuf.drain(..end + 4).collect();
        let req = match parse_request(&head[..end]) {
            Ok(r) => r,
            Err(e) => return self.respond_error(i, d, 400, format!("{e}\n").as_bytes()),
        };
        self.conns[i].discard = req.body_len;
        self.conns[i].requests += 1;
        let head_only = req.method == "HEAD";
        if req.method != "GET" && !head_only {
            return self.respond_error(i, d, 405, b"only GET and HEAD\n");
        }
        let (body, len) = match self.resolve(&req.target) {
            Ok(x) => x,
            Err(code) => {
                let msg = format!("{} not found\n", req.target);
                let keep = req.keep_alive;
                self.respond(i, d, code, msg.as_bytes(), keep)?;
                return Ok(true);
            }
        };
        self.responses[0] += 1;
        let head = format!(
            "HTTP/1.1 200 OK\r\nServer: toemu\r\nContent-Type: application/octet-stream\r\nContent-Length: {len}\r\nConnection: {}\r\n\r\n",
            if req.keep_alive { "keep-alive" } else { "close" }
        );
        let c = &mut self.conns[i];
        c.io.send_copy(d, head.as_bytes())?;
        c.phase = Phase::Responding {
            body: if head_only { Body::Empty } else { body },
            keep_alive: req.keep_alive,
        };
        Ok(true)
    }

    fn respond(
        &mut self,
        i: usize,
        d: &mut Driver,
        code: u16,
        body: &[u8],
        keep_alive: bool,
    ) -> io::Result<()> {
        self.responses[Self::status_index(code)] += 1;
        let reason = match code {
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            _ => "Error",
        };
        let allow = if code == 405 {
            "Allow: GET, HEAD\r\n"
        } else {
            ""
        };
        let mut msg = format!(
            "HTTP/1.1 {code} {reason}\r\nServer: toemu\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{allow}Connection: {}\r\n\r\n",
            body.len(),
            if keep_alive { "keep-alive" } else { "close" }
        )
        .into_bytes();
        msg.extend_from_slice(body);
        let c = &mut self.conns[i];
        c.io.send_copy(d, &msg)?;
        c.phase = if keep_alive {
            Phase::Reading
        } else {
            Phase::Closing
        };
        Ok(())
    }

    fn respond_error(
        &mut self,
        i: usize,
        d: &mut Driver,
        code: u16,
        body: &[u8],
    ) -> io::Result<bool> {
        // After a malformed request the stream cannot be trusted: answer and close.
        self.conns[i].inbuf.clear();
        self.respond(i, d, code, body, false)?;
        Ok(true)
    }

    fn pump_body(c: &mut HttpConn, d: &mut Driver) -> io::Result<bool> {
        let Phase::Responding { body, keep_alive } = &mut c.phase else {
            return Ok(false);
        };
        let mut busy = false;
        loop {
            let done = match body {
                Body::Empty => true,
                Body::Gen { gen, left } => {
                    if *left == 0 {
                        true
                    } else {
                        let n = (*left).min(CHUNK as u64) as usize;
                        if !c.io.send_with(d, n, |b| gen.fill(b))? {
                            return Ok(busy);
                        }
                        *left -= n as u64;
                        busy = true;
                        false
                    }
                }
                Body::File { file, left } => {
                    if *left == 0 {
                        true
                    } else {
                        let n = (*left).min(CHUNK as u64) as usize;
                        let mut failed = None;
                        let ok = c.io.send_with(d, n, |b| {
                            if let Err(e) = file.read_exact(b) {
                                failed = Some(e);
                            }
                        })?;
                        if let Some(e) = failed {
                            // The file changed under us: the response cannot be completed.
                            c.phase = Phase::Closing;
                            return Err(e);
                        }
                        if !ok {
                            return Ok(busy);
                        }
                        *left -= n as u64;
                        busy = true;
                        false
                    }
                }
            };
            if done {
                c.phase = if *keep_alive {
                    Phase::Reading
                } else {
                    Phase::Closing
                };
                return Ok(true);
            }
        }
    }
}

impl App for Http {
    fn name(&self) -> &'static str {
        "http"
    }

    fn poll(&mut self, d: &mut Driver, now: Instant) -> io::Result<bool> {
        let mut busy = false;
        while let Some(conn) = d.accept(self.port) {
            self.conns.push(HttpConn {
                io: ConnIo::new(conn, self.mode),
                inbuf: Vec::new(),
                discard: 0,
                phase: Phase::Reading,
                requests: 0,
            });
            busy = true;
        }
        let mut i = 0;
        while i < self.conns.len() {
            {
                let c = &mut self.conns[i];
                c.io.reap(d)?;
                // read while a request head is being collected (bounded), or to discard a body
                let want = MAX_HEAD_BYTES + 4 - c.inbuf.len().min(MAX_HEAD_BYTES + 4);
                if matches!(c.phase, Phase::Reading) && want > 0 || c.discard > 0 {
                    let (inbuf, discard) = (&mut c.inbuf, &mut c.discard);
                    let n = c.io.recv(d, now, |data| {
                        let skip = (*discard).min(data.len() as u64) as usize;
                        *discard -= skip as u64;
                        let take = (data.len() - skip).min(want);
                        inbuf.extend_from_slice(&data[skip..skip + take]);
                        skip + take
                    })?;
                    busy |= n > 0;
                }
            }
            if matches!(self.conns[i].phase, Phase::Reading) && self.conns[i].discard == 0 {
                match self.start_response(i, d) {
                    Ok(b) => busy |= b,
                    Err(e) => self.log.push(format!("http: {e}")),
                }
            }
            let c = &mut self.conns[i];
            match Self::pump_body(c, d) {
                Ok(b) => busy |= b,
                Err(e) => self
                    .log
                    .push(format!("http: connection {}: {e}", c.io.conn)),
            }
            let peer_done = c.io.eof(d) && matches!(c.phase, Phase::Reading) && c.inbuf.is_empty();
            if (matches!(c.phase, Phase::Closing) || peer_done || c.io.was_reset(d))
                && c.io.outstanding() == 0
            {
                c.io.close(d)?;
            }
            if c.io.try_release(d) {
                self.log.push(format!(
                    "http: connection {} done, {} requests",
                    c.io.conn, c.requests
                ));
                self.conns.swap_remove(i);
                busy = true;
                continue;
            }
            i += 1;
        }
        Ok(busy)
    }

    fn take_log(&mut self) -> Vec<String> {
        std::mem::take(&mut self.log)
    }
}

/// Parse `http://A.B.C.D[:port]/path` (IPv4 literal; no DNS on an emulated host).
pub fn parse_url(url: &str) -> Result<(SocketAddrV4, String), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: only http:// URLs are supported"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .map_err(|_| format!("{url}: bad port {p:?}"))?,
        ),
        None => (authority, 80),
    };
    let ip: Ipv4Addr = host
        .parse()
        .map_err(|_| format!("{url}: host must be an IPv4 address"))?;
    Ok((SocketAddrV4::new(ip, port), path.to_string()))
}

/// The `get` client.
pub struct Get {
    to: SocketAddrV4,
    path: String,
    io: Option<ConnIo>,
    head: Vec<u8>,
    status: Option<u16>,
    content_length: Option<u64>,
    body: u64,
    hasher: Sha256,
    started: Option<Instant>,
    finished: bool,
    log: Vec<String>,
    /// Set when the request failed.
    pub error: Option<String>,
}

impl std::fmt::Debug for Get {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Get")
            .field("to", &self.to)
            .field("path", &self.path)
            .finish()
    }
}

impl Get {
    /// A GET of `path` from `to`.
    pub fn new(to: SocketAddrV4, path: String) -> Self {
        Get {
            to,
            path,
            io: None,
            head: Vec::new(),
            status: None,
            content_length: None,
            body: 0,
            hasher: Sha256::new(),
            started: None,
            finished: false,
            log: Vec::new(),
            error: None,
        }
    }

    fn fail(&mut self, msg: String) {
        self.log.push(format!("get: {msg}"));
        self.error = Some(msg);
        self.finished = true;
    }
}

impl App for Get {
    fn name(&self) -> &'static str {
        "get"
    }

    fn poll(&mut self, d: &mut Driver, now: Instant) -> io::Result<bool> {
        if self.finished {
            return Ok(false);
        }
        if self.io.is_none() {
            let conn = d
                .connect(self.to, 0, None)
                .map_err(|e| io::Error::other(e.to_string()))?;
            self.started = Some(now);
            self.io = Some(ConnIo::new(conn, RxMode::InPlace));
        }
        let io = self.io.as_mut().expect("set above");
        match d.state(io.conn) {
            Ok(ConnState::Connecting) => return Ok(false),
            Ok(ConnState::Failed(e)) => {
                let _ = io.try_release(d);
                self.fail(format!("connect to {}: {e}", self.to));
                return Ok(true);
            }
            _ => {}
        }
        io.reap(d)?;
        if io.tx_bytes == 0 {
            let req = format!(
                "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: toemu\r\nConnection: close\r\n\r\n",
                self.path, self.to
            );
            io.send_copy(d, req.as_bytes())?;
        }
        let (head, status, clen, body, hasher) = (
            &mut self.head,
            &mut self.status,
            &mut self.content_length,
            &mut self.body,
            &mut self.hasher,
        );
        let mut bad = None;
        let n = io.recv(d, now, |data| {
            let mut at = 0;
            if status.is_none() {
                while at < data.len() && status.is_none() {
                    head.push(data[at]);
                    at += 1;
                    if head.ends_with(b"\r\n\r\n") {
                        let text = String::from_utf8_lossy(head);
                        let code = text.split(' ').nth(1).and_then(|c| c.parse::<u16>().ok());
                        match code {
                            Some(c) => *status = Some(c),
                            None => bad = Some("malformed status line".to_string()),
                        }
                        for line in text.split("\r\n") {
                            if let Some((k, v)) = line.split_once(':') {
                                if k.eq_ignore_ascii_case("content-length") {
                                    *clen = v.trim().parse().ok();
                                }
                            }
                        }
                    } else if head.len() > MAX_HEAD_BYTES {
                        bad = Some("response head too large".into());
                        return at;
                    }
                }
            }
            let rest = &data[at..];
            hasher.update(rest);
            *body += rest.len() as u64;
            data.len()
        })?;
        if let Some(b) = bad {
            let _ = d.abort(io.conn);
            self.fail(b);
            return Ok(true);
        }
        let complete = self.content_length.is_some_and(|l| self.body >= l);
        if complete || io.eof(d) {
            io.close(d)?;
        }
        if (complete || io.eof(d)) && io.try_release(d) {
            let secs = (now - self.started.unwrap_or(now)).total_micros().max(1) as f64 / 1e6;
            match (self.status, self.content_length) {
                (Some(status), len) if len.is_none_or(|l| l == self.body) => {
                    self.log.push(format!(
                        "get: {} {} status {status} body {} bytes sha256 {} in {:.3} s ({:.1} MB/s)",
                        self.to,
                        self.path,
                        self.body,
                        hex::encode(self.hasher.clone().finalize()),
                        secs,
                        self.body as f64 / secs / 1e6
                    ));
                    self.finished = true;
                }
                (status, len) => self.fail(format!(
                    "incomplete response: status {status:?}, {} of {len:?} body bytes",
                    self.body
                )),
            }
            return Ok(true);
        }
        Ok(n > 0)
    }

    fn take_log(&mut self) -> Vec<String> {
        std::mem::take(&mut self.log)
    }

    fn done(&self) -> bool {
        self.finished
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_parsing() {
        let r = parse_request(b"GET /bytes/10 HTTP/1.1\r\nHost: x\r\nConnection: close").unwrap();
        assert_eq!(r.target, "/bytes/10");
        assert!(r.http11 && !r.keep_alive);
        let r = parse_request(b"HEAD / HTTP/1.0").unwrap();
        assert!(!r.keep_alive);
        assert!(parse_request(b"GET /x HTTP/2.0").is_err());
        assert!(parse_request(b"GET /x").is_err());
        assert!(parse_request(b"get /x HTTP/1.1").is_err());
        assert!(parse_request(b"GET x HTTP/1.1").is_err());
        assert!(parse_request(b"GET /x HTTP/1.1\r\nbroken").is_err());
        assert!(parse_request(b"GET /x HTTP/1.1\r\nContent-Length: z").is_err());
        assert!(parse_request(&[0xff, 0xfe]).is_err());
    }

    #[test]
    fn url_parsing() {
        let (a, p) = parse_url("http://10.0.0.2:8080/bytes/5").unwrap();
        assert_eq!(
            (a.to_string(), p.as_str()),
            ("10.0.0.2:8080".into(), "/bytes/5")
        );
        assert_eq!(parse_url("http://10.0.0.2").unwrap().1, "/");
        assert!(parse_url("https://10.0.0.2/").is_err());
        assert!(parse_url("http://example.com/").is_err());
    }
}
