//! TAP backend (Linux, root): an emulated TOE host bound to a TAP device, so that ordinary
//! Linux programs on the other side of the device talk to it.
//!
//! The device is opened non-blocking. A reader thread waits for frames (with a short timeout so
//! it notices [`TapPhy`] being dropped) and queues them in a bounded channel, which is the
//! port's [`Phy::waitable`]: the adapter thread sleeps on it. Frames the NIC sends are written
//! straight to the device. A full receive queue drops the frame and counts it, as a NIC ring
//! would.

use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};
use smoltcp::time::Instant;
use toe_nic::{Frame, Phy};
use tun_tap::{Iface, Mode};

/// Counters of a TAP port. Counts only grow.
#[derive(Debug, Default)]
pub struct TapStats {
    /// Frames read from the device.
    pub rx_frames: AtomicU64,
    /// Frames dropped because the receive queue was full.
    pub rx_dropped: AtomicU64,
    /// Frames written to the device.
    pub tx_frames: AtomicU64,
    /// Writes the device refused.
    pub tx_errors: AtomicU64,
}

/// A TAP device as a frame port.
pub struct TapPhy {
    iface: Arc<Iface>,
    rx: Receiver<Frame>,
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
    stats: Arc<TapStats>,
}

impl std::fmt::Debug for TapPhy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TapPhy")
            .field("name", &self.iface.name())
            .finish()
    }
}

/// Largest frame read from the device, in bytes (jumbo frames included).
pub const MAX_FRAME_BYTES: usize = 65_536 + 14;

impl TapPhy {
    /// Open (or create) TAP device `name` in the current network namespace. `queue` bounds the
    /// frames waiting for the NIC.
    pub fn open(name: &str, queue: usize) -> io::Result<TapPhy> {
        let iface = Iface::without_packet_info(name, Mode::Tap).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot open TAP device {name:?} (needs root and /dev/net/tun): {e}"),
            )
        })?;
        iface.set_non_blocking()?;
        let iface = Arc::new(iface);
        let (tx, rx) = bounded(queue.max(16));
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(TapStats::default());
        let reader = {
            let (iface, stop, stats) = (iface.clone(), stop.clone(), stats.clone());
            std::thread::Builder::new()
                .name(format!("tap-{name}"))
                .spawn(move || read_loop(&iface, &tx, &stop, &stats))?
        };
        Ok(TapPhy {
            iface,
            rx,
            stop,
            reader: Some(reader),
            stats,
        })
    }

    /// The device name.
    pub fn name(&self) -> &str {
        self.iface.name()
    }

    /// Counters.
    pub fn stats(&self) -> &Arc<TapStats> {
        &self.stats
    }
}

fn read_loop(iface: &Iface, tx: &Sender<Frame>, stop: &AtomicBool, stats: &TapStats) {
    let fd = iface.as_raw_fd();
    let mut buf = vec![0u8; MAX_FRAME_BYTES];
    while !stop.load(Ordering::Relaxed) {
        match iface.recv(&mut buf) {
            Ok(n) => {
                stats.rx_frames.fetch_add(1, Ordering::Relaxed);
                match tx.try_send(buf[..n].to_vec()) {
                    Ok(()) => {}
                    Err(TrySendError::Full(_)) => {
                        stats.rx_dropped.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(TrySendError::Disconnected(_)) => return,
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let _ = smoltcp::phy::wait(fd, Some(smoltcp::time::Duration::from_millis(50)));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => {
                // The device went away (namespace deleted): stop reading.
                return;
            }
        }
    }
}

impl Drop for TapPhy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

impl Phy for TapPhy {
    fn recv(&mut self, _now: Instant) -> Option<Frame> {
        self.rx.try_recv().ok()
    }
    fn send(&mut self, _now: Instant, frame: Frame) -> Result<(), Frame> {
        match self.iface.send(&frame) {
            Ok(_) => {
                self.stats.tx_frames.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(frame),
            Err(_) => {
                // A frame the kernel refuses (e.g. interface down) is lost, as on a wire.
                self.stats.tx_errors.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
        }
    }
    fn can_send(&self) -> bool {
        true
    }
    fn waitable(&self) -> Option<Receiver<Frame>> {
        Some(self.rx.clone())
    }
}
