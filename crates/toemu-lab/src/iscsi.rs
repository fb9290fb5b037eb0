//! The iSCSI target on std TCP: a thin shell around [`toe_iscsi::target::TargetConn`], one
//! thread per connection, so ordinary initiators (libiscsi's tools) reach it on loopback.
//! The protocol lives in `toe-iscsi`; this only moves bytes and supplies randomness.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use toe_iscsi::login::TargetConfig;
use toe_iscsi::scsi::{BlockStore, Disk};
use toe_iscsi::target::ConnStats;
use toe_iscsi::target::{KeepAlive, TargetConn};

/// Random bytes from the kernel (CHAP challenges and identifiers, ISIDs).
pub fn random_bytes<const N: usize>() -> io::Result<[u8; N]> {
    let mut b = [0u8; N];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b)
}

/// A running target; dropping it stops accepting (connections in progress end with their
/// initiators).
#[derive(Debug)]
pub struct TcpTarget {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    totals: Arc<Mutex<Totals>>,
    closing: Arc<Closing>,
}

/// A graceful stop, shared with the connection threads.
#[derive(Debug, Default)]
struct Closing {
    /// Ask every session to log out ...
    now: AtomicBool,
    /// ... within this many seconds.
    within_s: AtomicU16,
    /// Connections being served.
    active: std::sync::atomic::AtomicUsize,
}

impl TcpTarget {
    /// Serve `cfg` on `listener`, with `disk` as LUN 0 of normal sessions (without one,
    /// only discovery and logins work).
    pub fn start(
        listener: TcpListener,
        cfg: TargetConfig,
        disk: Option<Arc<Mutex<Disk>>>,
    ) -> io::Result<TcpTarget> {
        TcpTarget::start_with(listener, cfg, disk, None)
    }

    /// [`TcpTarget::start`], with the NOP-In keep-alive `keepalive` on every connection
    /// (timed by the wall clock).
    pub fn start_with(
        listener: TcpListener,
        cfg: TargetConfig,
        disk: Option<Arc<Mutex<Disk>>>,
        keepalive: Option<KeepAlive>,
    ) -> io::Result<TcpTarget> {
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let portal = format!("{addr},{}", cfg.portal_group_tag);
        let targets = vec![(cfg.target_name.clone(), portal)];
        let tsih = Arc::new(AtomicU16::new(1));
        let totals = Arc::new(Mutex::new(Totals::default()));
        let totals2 = totals.clone();
        let closing = Arc::new(Closing::default());
        let closing2 = closing.clone();
        let thread = std::thread::Builder::new()
            .name("iscsi-accept".into())
            .spawn(move || {
                while !stop2.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((s, _)) => {
                            let (cfg, targets, disk, totals) =
                                (cfg.clone(), targets.clone(), disk.clone(), totals2.clone());
                            let closing = closing2.clone();
                            let t = tsih.fetch_add(1, Ordering::Relaxed).max(1);
                            closing.active.fetch_add(1, Ordering::SeqCst);
                            let _ = std::thread::Builder::new().name("iscsi-conn".into()).spawn(
                                move || {
                                    let (r, st) =
                                        serve_conn(s, cfg, targets, disk, t, keepalive, &closing);
                                    if let Err(e) = r {
                                        eprintln!("iscsi: connection ended: {e}");
                                    }
                                    if let Ok(mut t) = totals.lock() {
                                        t.connections += 1;
                                        t.stats += st;
                                    }
                                    // Counted in the totals before it stops counting as open.
                                    closing.active.fetch_sub(1, Ordering::SeqCst);
                                },
                            );
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        Err(e) => {
                            eprintln!("iscsi: accept failed: {e}");
                            std::thread::sleep(Duration::from_millis(50));
                        }
                    }
                }
            })?;
        Ok(TcpTarget {
            addr,
            stop,
            thread: Some(thread),
            totals,
            closing,
        })
    }

    /// Stop gracefully: no new connection is accepted, every normal session is asked to log
    /// out within `within` (an Async Message), and this returns when all connections have
    /// ended or `within` has passed. Returns the connections still open then.
    pub fn stop_gracefully(&mut self, within: Duration) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let secs = within.as_secs().clamp(1, u64::from(u16::MAX)) as u16;
        self.closing.within_s.store(secs, Ordering::SeqCst);
        self.closing.now.store(true, Ordering::SeqCst);
        let t0 = std::time::Instant::now();
        while self.closing.active.load(Ordering::SeqCst) > 0 && t0.elapsed() < within {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.closing.active.load(Ordering::SeqCst)
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Counters of the connections served so far.
    pub fn totals(&self) -> Totals {
        self.totals.lock().map(|t| *t).unwrap_or_default()
    }
}

impl Drop for TcpTarget {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve_conn(
    s: TcpStream,
    cfg: TargetConfig,
    targets: Vec<(String, String)>,
    disk: Option<Arc<Mutex<Disk>>>,
    tsih: u16,
    keepalive: Option<KeepAlive>,
    closing: &Closing,
) -> (io::Result<()>, ConnStats) {
    let r: [u8; 17] = match random_bytes() {
        Ok(r) => r,
        Err(e) => return (Err(e), ConnStats::default()),
    };
    let mut challenge = [0u8; 16];
    challenge.copy_from_slice(&r[..16]);
    let mut conn = TargetConn::new(cfg, targets, challenge, r[16], tsih);
    if let Some(d) = disk {
        conn = conn.with_disk(d);
    }
    if let Some(k) = keepalive {
        conn = conn.with_keepalive(k);
    }
    let res = pump(s, &mut conn, closing);
    (res, conn.stats())
}

/// Move bytes between the socket and the connection machine until either ends; the
/// machine's keep-alive is polled with the wall clock, and a graceful stop asks the session
/// to log out (reads wait at most until the keep-alive's next deadline, and 200 ms).
fn pump(mut s: TcpStream, conn: &mut TargetConn, closing: &Closing) -> io::Result<()> {
    s.set_nodelay(true)?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut out = Vec::new();
    let t0 = std::time::Instant::now();
    let now = || t0.elapsed().as_micros() as u64;
    let mut asked = false;
    loop {
        out.clear();
        conn.poll(now(), &mut out);
        if !asked && closing.now.load(Ordering::SeqCst) {
            let within = closing.within_s.load(Ordering::SeqCst);
            asked = conn.request_logout(within, &mut out);
        }
        let wait = conn
            .next_deadline()
            .map_or(200_000, |d| d.saturating_sub(now()).clamp(1_000, 200_000));
        s.set_read_timeout(Some(Duration::from_micros(wait)))?;
        let n = match s.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                0
            }
            Err(e) => return Err(e),
        };
        conn.on_bytes(&buf[..n], &mut out);
        s.write_all(&out)?;
        if let Some(why) = conn.ended() {
            let _ = s.shutdown(std::net::Shutdown::Both);
            return match why {
                toe_iscsi::target::Ended::LoggedOut => Ok(()),
                other => Err(io::Error::other(format!("{other:?}"))),
            };
        }
    }
}

/// A LUN in a file: positional reads and writes; `flush` is `fdatasync`, so FUA writes and
/// SYNCHRONIZE CACHE reach stable storage.
#[derive(Debug)]
pub struct FileStore {
    file: std::fs::File,
    len: u64,
}

impl FileStore {
    /// Open (or create) `path` as a LUN of `len` bytes (extending it with zeros if shorter;
    /// `None`: the file's own size).
    pub fn open(path: &std::path::Path, len: Option<u64>) -> io::Result<FileStore> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let have = file.metadata()?.len();
        let len = match len {
            Some(l) => {
                if have < l {
                    file.set_len(l)?;
                }
                l
            }
            None => have,
        };
        if len == 0 {
            return Err(io::Error::other(format!(
                "{}: an empty LUN (give --size)",
                path.display()
            )));
        }
        Ok(FileStore { file, len })
    }
}

impl BlockStore for FileStore {
    fn len(&self) -> u64 {
        self.len
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        use std::os::unix::fs::FileExt;
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| e.to_string())
    }
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), String> {
        use std::os::unix::fs::FileExt;
        self.file
            .write_all_at(data, offset)
            .map_err(|e| e.to_string())
    }
    fn flush(&mut self) -> Result<(), String> {
        self.file.sync_data().map_err(|e| e.to_string())
    }
}

/// Counters summed over the connections that ended, and connections served.
#[derive(Debug, Clone, Copy, Default)]
pub struct Totals {
    /// Connections served to their end.
    pub connections: u64,
    /// Summed connection counters.
    pub stats: ConnStats,
}

/// An iSCSI URL as libiscsi writes them:
/// `iscsi://[user[%secret]@]host[:port][/target-iqn[/lun]][?header_digest=crc32c&data_digest=crc32c]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IscsiUrl {
    /// CHAP user and secret.
    pub chap: Option<(String, String)>,
    /// `host:port` (port 3260 when not given).
    pub portal: String,
    /// The target's IQN.
    pub target: Option<String>,
    /// The LUN.
    pub lun: Option<u16>,
    /// Header digests asked for.
    pub header_digest: bool,
    /// Data digests asked for.
    pub data_digest: bool,
}

impl std::str::FromStr for IscsiUrl {
    type Err = String;
    fn from_str(url: &str) -> Result<Self, String> {
        let rest = url
            .strip_prefix("iscsi://")
            .ok_or_else(|| format!("{url:?}: not an iscsi:// URL"))?;
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (auth, rest) = match rest.rsplit_once('@') {
            Some((a, r)) => (Some(a), r),
            None => (None, rest),
        };
        let chap = auth.map(|a| {
            let (u, s) = a.split_once('%').unwrap_or((a, ""));
            (u.to_string(), s.to_string())
        });
        let mut parts = rest.splitn(3, '/');
        let host = parts.next().unwrap_or_default();
        if host.is_empty() {
            return Err(format!("{url:?}: no host"));
        }
        let portal = if host.contains(':') {
            host.to_string()
        } else {
            format!("{host}:3260")
        };
        let target = parts.next().filter(|t| !t.is_empty()).map(str::to_string);
        let lun = match parts.next().filter(|l| !l.is_empty()) {
            Some(l) => Some(l.parse().map_err(|_| format!("{url:?}: LUN {l:?}"))?),
            None => None,
        };
        let mut u = IscsiUrl {
            chap,
            portal,
            target,
            lun,
            header_digest: false,
            data_digest: false,
        };
        for kv in query.split('&').filter(|s| !s.is_empty()) {
            match kv.split_once('=') {
                Some(("header_digest", v)) => u.header_digest = v.eq_ignore_ascii_case("crc32c"),
                Some(("data_digest", v)) => u.data_digest = v.eq_ignore_ascii_case("crc32c"),
                _ => return Err(format!("{url:?}: unknown option {kv:?}")),
            }
        }
        Ok(u)
    }
}

/// toemu's initiator machine for `url`: a normal session to `target`, or discovery with
/// `None`. `r` (random bytes) supplies the ISID, the first CmdSN and the mutual-CHAP challenge (from the
/// kernel's RNG, or seeded for replays). Call [`InitiatorConn::start`] for the first bytes.
///
/// [`InitiatorConn::start`]: toe_iscsi::initiator::InitiatorConn::start
pub fn initiator_conn(
    url: &IscsiUrl,
    target: Option<&str>,
    r: [u8; 23],
) -> toe_iscsi::initiator::InitiatorConn {
    initiator_conn_over(toe_iscsi::transport::Software::default(), url, target, r)
}

/// [`initiator_conn`] over transport `io`.
pub fn initiator_conn_over<T: toe_iscsi::transport::Transport>(
    io: T,
    url: &IscsiUrl,
    target: Option<&str>,
    r: [u8; 23],
) -> toe_iscsi::initiator::InitiatorConn<T> {
    initiator_conn_with(io, url, target, r, None)
}

/// [`initiator_conn_over`] offering `params` at login in place of toemu's usual offer
/// (the URL's digests replace its digest offers).
pub fn initiator_conn_with<T: toe_iscsi::transport::Transport>(
    io: T,
    url: &IscsiUrl,
    target: Option<&str>,
    r: [u8; 23],
    params: Option<toe_iscsi::login::OpParams>,
) -> toe_iscsi::initiator::InitiatorConn<T> {
    use toe_iscsi::login::{Credentials, InitiatorConfig, OpParams};
    let mut isid = [0x80, 0, 0, 0, 0, 0];
    isid[2..6].copy_from_slice(&r[17..21]);
    let digest = |on: bool| if on { "CRC32C" } else { "None" }.to_string();
    let cfg = InitiatorConfig {
        initiator_name: "iqn.2026-12.org.toemu:initiator".into(),
        target_name: target.map(str::to_string),
        chap: url.chap.as_ref().map(|(u, s)| Credentials {
            user: u.clone(),
            secret: s.clone().into_bytes(),
        }),
        mutual: None,
        params: match params {
            Some(p) => OpParams {
                header_digest: digest(url.header_digest),
                data_digest: digest(url.data_digest),
                ..p
            },
            None => OpParams {
                header_digest: digest(url.header_digest),
                data_digest: digest(url.data_digest),
                initial_r2t: false,
                max_outstanding_r2t: 8,
                max_burst_length: 1 << 20,
                first_burst_length: 256 << 10,
                ..OpParams::default()
            },
        },
        isid,
        cmd_sn: u32::from_be_bytes([r[21], r[22], 0, 1]),
    };
    let mut challenge = [0u8; 16];
    challenge.copy_from_slice(&r[..16]);
    toe_iscsi::initiator::InitiatorConn::over(io, cfg, challenge, r[16])
}

/// toemu's initiator on std TCP: one connection, calls that block until their answer.
pub struct TcpInitiator {
    s: TcpStream,
    conn: toe_iscsi::initiator::InitiatorConn,
    buf: Vec<u8>,
}

impl std::fmt::Debug for TcpInitiator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpInitiator")
            .field("conn", &self.conn)
            .finish()
    }
}

impl TcpInitiator {
    /// Connect to `url`'s portal and log in: to `target` (a normal session), or, with
    /// `None`, a discovery session.
    pub fn login(url: &IscsiUrl, target: Option<&str>) -> io::Result<TcpInitiator> {
        let s = TcpStream::connect(&url.portal)?;
        s.set_nodelay(true)?;
        let conn = initiator_conn(url, target, random_bytes()?);
        let mut me = TcpInitiator {
            s,
            conn,
            buf: vec![0u8; 256 * 1024],
        };
        let mut out = Vec::new();
        me.conn.start(&mut out);
        me.s.write_all(&out)?;
        match me.next_event()? {
            toe_iscsi::initiator::InitiatorEvent::LoggedIn(_) => Ok(me),
            toe_iscsi::initiator::InitiatorEvent::LoginFailed(e) => Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                e.to_string(),
            )),
            other => Err(io::Error::other(format!("login: {other:?}"))),
        }
    }

    /// The machine, for queueing several commands before waiting (any queue depth).
    pub fn conn(&mut self) -> &mut toe_iscsi::initiator::InitiatorConn {
        &mut self.conn
    }

    /// Send `out` (what the machine produced).
    pub fn send(&mut self, out: &[u8]) -> io::Result<()> {
        self.s.write_all(out)
    }

    /// Send `out` (what the machine produced), then read until an event comes.
    pub fn send_and_wait(
        &mut self,
        out: &[u8],
    ) -> io::Result<toe_iscsi::initiator::InitiatorEvent> {
        self.s.write_all(out)?;
        self.next_event()
    }

    /// Read and feed the machine until it reports something.
    pub fn next_event(&mut self) -> io::Result<toe_iscsi::initiator::InitiatorEvent> {
        loop {
            if let Some(e) = self.conn.poll_event() {
                if let toe_iscsi::initiator::InitiatorEvent::Failed(why) = &e {
                    return Err(io::Error::other(why.clone()));
                }
                return Ok(e);
            }
            let n = self.s.read(&mut self.buf)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the target closed the connection",
                ));
            }
            let mut out = Vec::new();
            self.conn.on_bytes(&self.buf[..n], &mut out);
            if !out.is_empty() {
                self.s.write_all(&out)?;
            }
        }
    }

    /// Run one command and wait for it. A command answered with UNIT ATTENTION (the first
    /// one after a target's power-on or reset, as tgt sends it) is sent again, up to 3 times.
    pub fn command(
        &mut self,
        lun: u16,
        cdb: &[u8],
        read_len: u32,
        write: Vec<u8>,
    ) -> io::Result<toe_iscsi::initiator::Completion> {
        let mut tries = 0;
        loop {
            let c = self.command_once(lun, cdb, read_len, write.clone())?;
            tries += 1;
            if tries > 3 || !is_unit_attention(&c) {
                return Ok(c);
            }
        }
    }

    fn command_once(
        &mut self,
        lun: u16,
        cdb: &[u8],
        read_len: u32,
        write: Vec<u8>,
    ) -> io::Result<toe_iscsi::initiator::Completion> {
        let mut out = Vec::new();
        let tag = self.conn.command(
            toe_iscsi::wire::lun_field(lun),
            cdb,
            read_len,
            write,
            &mut out,
        );
        let mut e = self.send_and_wait(&out)?;
        loop {
            match e {
                toe_iscsi::initiator::InitiatorEvent::Done(c) if c.itt == tag => return Ok(c),
                _ => e = self.next_event()?,
            }
        }
    }

    /// Send a Text request and wait for its answer.
    pub fn text(&mut self, pairs: &[(&str, &str)]) -> io::Result<Vec<(String, String)>> {
        let mut out = Vec::new();
        let tag = self.conn.text(pairs, &mut out);
        let mut e = self.send_and_wait(&out)?;
        loop {
            match e {
                toe_iscsi::initiator::InitiatorEvent::Text { itt, pairs } if itt == tag => {
                    return Ok(pairs)
                }
                _ => e = self.next_event()?,
            }
        }
    }

    /// Log out and wait for the answer.
    pub fn logout(mut self) -> io::Result<()> {
        let mut out = Vec::new();
        self.conn.logout(&mut out);
        let mut e = self.send_and_wait(&out)?;
        loop {
            match e {
                toe_iscsi::initiator::InitiatorEvent::LoggedOut => return Ok(()),
                _ => e = self.next_event()?,
            }
        }
    }
}

/// (sense key, ASC, ASCQ) of a completion's sense data, fixed or descriptor format.
pub fn sense_of(c: &toe_iscsi::initiator::Completion) -> Option<(u8, u8, u8)> {
    match c.sense.as_slice() {
        // fixed format: key in byte 2, ASC/ASCQ in 12/13; descriptor: key 1, ASC/ASCQ 2/3
        [0x70 | 0x71, _, k, _, _, _, _, _, _, _, _, _, a, q, ..] | [0x72 | 0x73, k, a, q, ..] => {
            Some((k & 0x0f, *a, *q))
        }
        _ => None,
    }
}

/// Sense key of a CHECK CONDITION.
pub fn sense_key(c: &toe_iscsi::initiator::Completion) -> Option<u8> {
    (c.status == 2)
        .then(|| sense_of(c))
        .flatten()
        .map(|(k, _, _)| k)
}

/// The READ CAPACITY (16) CDB, allocation length 32.
pub fn read_capacity16() -> [u8; 16] {
    let mut cdb = [0u8; 16];
    cdb[0] = 0x9e;
    cdb[1] = 0x10;
    cdb[13] = 32;
    cdb
}

/// (capacity in bytes, block size in bytes) from a good READ CAPACITY (16) answer.
pub fn capacity16(c: &toe_iscsi::initiator::Completion) -> Option<(u64, u32)> {
    if c.status != 0 || c.data.len() < 12 {
        return None;
    }
    let last = u64::from_be_bytes(c.data[..8].try_into().expect("8 bytes"));
    let block = u32::from_be_bytes(c.data[8..12].try_into().expect("4 bytes"));
    Some((
        last.saturating_add(1).saturating_mul(u64::from(block)),
        block,
    ))
}

fn is_unit_attention(c: &toe_iscsi::initiator::Completion) -> bool {
    sense_key(c) == Some(6)
}

/// libiscsi's name of a SCSI peripheral device type (as `iscsi-ls -s` prints it).
fn device_type_name(t: u8) -> String {
    match t {
        0x00 => "DIRECT_ACCESS".into(),
        0x01 => "SEQUENTIAL_ACCESS".into(),
        0x05 => "MMC".into(),
        0x0c => "STORAGE_ARRAY_CONTROLLER".into(),
        0x0d => "SES".into(),
        t => format!("{t:#x}"),
    }
}

/// `toemu iscsi ls`: the targets a portal offers (discovery), and with `luns` each target's
/// LUNs with their type and size, in iscsi-ls's format.
pub fn ls(url: &IscsiUrl, luns: bool) -> io::Result<String> {
    let mut d = TcpInitiator::login(url, None)?;
    let pairs = d.text(&[("SendTargets", "All")])?;
    d.logout()?;
    let mut out = String::new();
    let mut current: Option<String> = None;
    let mut targets = Vec::new();
    for (k, v) in pairs {
        match k.as_str() {
            "TargetName" => current = Some(v),
            "TargetAddress" => {
                if let Some(t) = &current {
                    out.push_str(&format!("Target:{t} Portal:{v}\n"));
                    targets.push(t.clone());
                }
            }
            _ => {}
        }
    }
    if !luns {
        return Ok(out);
    }
    for t in targets {
        let mut s = TcpInitiator::login(url, Some(&t))?;
        let c = s.command(
            0,
            &[0xa0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0],
            4096,
            Vec::new(),
        )?;
        if c.status != 0 || c.data.len() < 8 {
            return Err(io::Error::other(format!("{t}: REPORT LUNS failed: {c:?}")));
        }
        let n = u32::from_be_bytes([c.data[0], c.data[1], c.data[2], c.data[3]]) as usize / 8;
        for k in 0..n.min((c.data.len() - 8) / 8) {
            let f = u64::from_be_bytes(c.data[8 + 8 * k..16 + 8 * k].try_into().expect("8 bytes"));
            let Some(lun) = toe_iscsi::wire::lun_index(f) else {
                continue;
            };
            let inq = s.command(lun, &[0x12, 0, 0, 0, 96, 0], 96, Vec::new())?;
            let Some(t) = inq
                .data
                .first()
                .map(|b| b & 0x1f)
                .filter(|_| inq.status == 0)
            else {
                out.push_str(&format!("Lun:{lun} Type:UNKNOWN\n"));
                continue;
            };
            let kind = device_type_name(t);
            if t != 0 {
                // Not a disk: no capacity to ask for.
                out.push_str(&format!("Lun:{lun} Type:{kind}\n"));
                continue;
            }
            let rc = s.command(lun, &read_capacity16(), 32, Vec::new())?;
            if let Some((bytes, bs)) = capacity16(&rc) {
                out.push_str(&format!(
                    "Lun:{lun} Type:{kind} (Size:{bytes} bytes, {bs}-byte blocks)\n"
                ));
            } else {
                out.push_str(&format!("Lun:{lun} Type:{kind}\n"));
            }
        }
        s.logout()?;
    }
    Ok(out)
}
