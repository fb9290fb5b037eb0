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
use toe_iscsi::target::TargetConn;

/// Random bytes from the kernel (CHAP challenges and identifiers).
fn random_bytes<const N: usize>() -> io::Result<[u8; N]> {
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
}

impl TcpTarget {
    /// Serve `cfg` on `listener`, with `disk` as LUN 0 of normal sessions (without one,
    /// only discovery and logins work).
    pub fn start(
        listener: TcpListener,
        cfg: TargetConfig,
        disk: Option<Arc<Mutex<Disk>>>,
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
        let thread = std::thread::Builder::new()
            .name("iscsi-accept".into())
            .spawn(move || {
                while !stop2.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((s, _)) => {
                            let (cfg, targets, disk, totals) =
                                (cfg.clone(), targets.clone(), disk.clone(), totals2.clone());
                            let t = tsih.fetch_add(1, Ordering::Relaxed).max(1);
                            let _ = std::thread::Builder::new().name("iscsi-conn".into()).spawn(
                                move || {
                                    let (r, st) = serve_conn(s, cfg, targets, disk, t);
                                    if let Err(e) = r {
                                        eprintln!("iscsi: connection ended: {e}");
                                    }
                                    if let Ok(mut t) = totals.lock() {
                                        t.connections += 1;
                                        let a = &mut t.stats;
                                        a.pdus_in += st.pdus_in;
                                        a.pdus_out += st.pdus_out;
                                        a.rejects += st.rejects;
                                        a.data_digest_errors += st.data_digest_errors;
                                        a.data_sequence_errors += st.data_sequence_errors;
                                    }
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
        })
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
    let res = pump(s, &mut conn);
    (res, conn.stats())
}

/// Move bytes between the socket and the connection machine until either ends.
fn pump(mut s: TcpStream, conn: &mut TargetConn) -> io::Result<()> {
    s.set_nodelay(true)?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut out = Vec::new();
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        out.clear();
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
