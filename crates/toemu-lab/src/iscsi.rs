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
use toe_iscsi::scsi::Disk;
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
        let thread = std::thread::Builder::new()
            .name("iscsi-accept".into())
            .spawn(move || {
                while !stop2.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((s, _)) => {
                            let (cfg, targets, disk) = (cfg.clone(), targets.clone(), disk.clone());
                            let t = tsih.fetch_add(1, Ordering::Relaxed).max(1);
                            let _ = std::thread::Builder::new().name("iscsi-conn".into()).spawn(
                                move || {
                                    if let Err(e) = serve_conn(s, cfg, targets, disk, t) {
                                        eprintln!("iscsi: connection ended: {e}");
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
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
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
    mut s: TcpStream,
    cfg: TargetConfig,
    targets: Vec<(String, String)>,
    disk: Option<Arc<Mutex<Disk>>>,
    tsih: u16,
) -> io::Result<()> {
    s.set_nodelay(true)?;
    let r: [u8; 17] = random_bytes()?;
    let mut challenge = [0u8; 16];
    challenge.copy_from_slice(&r[..16]);
    let mut conn = TargetConn::new(cfg, targets, challenge, r[16], tsih);
    if let Some(d) = disk {
        conn = conn.with_disk(d);
    }
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
