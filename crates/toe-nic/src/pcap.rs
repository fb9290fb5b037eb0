//! pcap capture: phy middleware that records every frame a port receives and sends, in the
//! classic libpcap file format (what tcpdump writes and Wireshark/tshark read).
//!
//! Format: a 24-byte global header (magic `0xa1b2c3d4` written little-endian, so microsecond
//! timestamps; version 2.4; snap length [`DEFAULT_SNAPLEN`]; link type
//! [`LINKTYPE_ETHERNET`]), then per frame a 16-byte record header (seconds, microseconds,
//! captured length, original length) and the frame bytes. Timestamps are the `now` the port
//! was called with (virtual or real time since the runtime's origin), plus an optional offset.
//!
//! A [`PcapWriter`] is shared behind [`SharedPcap`] (`Arc<Mutex<..>>`), so several ports (both
//! ends of a wire, or successive runs) can write one file. Write errors cannot travel through
//! [`Phy`]: the writer keeps the first one ([`PcapWriter::error`]) and stops writing.

use std::io::{self, Write};
use std::sync::{Arc, Mutex, MutexGuard};

use crossbeam_channel::Receiver;
use smoltcp::time::{Duration, Instant};

use crate::phy::{Frame, Phy};

/// pcap magic number for microsecond timestamps.
pub const PCAP_MAGIC_MICROS: u32 = 0xa1b2_c3d4;
/// Link type of Ethernet frames (LINKTYPE_ETHERNET).
pub const LINKTYPE_ETHERNET: u32 = 1;
/// Bytes of each frame kept in the file; longer frames are cut (their original length is
/// still recorded). Larger than any frame toemu makes (MTU ≤ 65 000 plus 14).
pub const DEFAULT_SNAPLEN: u32 = 262_144;
/// Size of the file's global header, in bytes.
pub const GLOBAL_HEADER_LEN: usize = 24;
/// Size of each record header, in bytes.
pub const RECORD_HEADER_LEN: usize = 16;

/// Writes a pcap stream to `W`.
#[derive(Debug)]
pub struct PcapWriter<W: Write> {
    out: W,
    records: u64,
    last: Option<Instant>,
    error: Option<io::ErrorKind>,
    error_text: Option<String>,
}

/// A writer shared by several ports.
pub type SharedPcap<W> = Arc<Mutex<PcapWriter<W>>>;

impl<W: Write> PcapWriter<W> {
    /// Starts a capture: writes the global header to `out`.
    pub fn new(mut out: W) -> io::Result<Self> {
        let mut h = [0u8; GLOBAL_HEADER_LEN];
        h[0..4].copy_from_slice(&PCAP_MAGIC_MICROS.to_le_bytes());
        h[4..6].copy_from_slice(&2u16.to_le_bytes());
        h[6..8].copy_from_slice(&4u16.to_le_bytes());
        // thiszone (8..12) and sigfigs (12..16) are zero
        h[16..20].copy_from_slice(&DEFAULT_SNAPLEN.to_le_bytes());
        h[20..24].copy_from_slice(&LINKTYPE_ETHERNET.to_le_bytes());
        out.write_all(&h)?;
        Ok(PcapWriter {
            out,
            records: 0,
            last: None,
            error: None,
            error_text: None,
        })
    }

    /// Wraps the writer for sharing between ports.
    pub fn shared(self) -> SharedPcap<W> {
        Arc::new(Mutex::new(self))
    }

    /// Appends one frame captured at `ts` (instants before the epoch are written as 0).
    /// After a write error nothing more is written and the error is returned again.
    pub fn write_frame(&mut self, ts: Instant, frame: &[u8]) -> io::Result<()> {
        if let Some(kind) = self.error {
            return Err(io::Error::new(kind, "an earlier pcap write failed"));
        }
        let us = ts.total_micros().max(0);
        let caplen = frame.len().min(DEFAULT_SNAPLEN as usize);
        let mut h = [0u8; RECORD_HEADER_LEN];
        h[0..4].copy_from_slice(&((us / 1_000_000) as u32).to_le_bytes());
        h[4..8].copy_from_slice(&((us % 1_000_000) as u32).to_le_bytes());
        h[8..12].copy_from_slice(&(caplen as u32).to_le_bytes());
        h[12..16].copy_from_slice(&(frame.len() as u32).to_le_bytes());
        let r = self
            .out
            .write_all(&h)
            .and_then(|()| self.out.write_all(&frame[..caplen]));
        match r {
            Ok(()) => {
                self.records += 1;
                self.last = Some(self.last.map_or(ts, |l| l.max(ts)));
                Ok(())
            }
            Err(e) => {
                self.error = Some(e.kind());
                self.error_text = Some(e.to_string());
                Err(e)
            }
        }
    }

    /// Records written.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// The latest timestamp written so far.
    pub fn last_timestamp(&self) -> Option<Instant> {
        self.last
    }

    /// The first write error, if any (the capture stopped there).
    pub fn error(&self) -> Option<&str> {
        self.error_text.as_deref()
    }

    /// Flushes the underlying writer.
    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    /// The underlying writer.
    pub fn into_inner(self) -> W {
        self.out
    }
}

fn lock<W: Write>(s: &SharedPcap<W>) -> MutexGuard<'_, PcapWriter<W>> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// Gap left between the last record of a shared capture and the first record of a port made
/// with [`Pcap::following`].
pub const RUN_GAP: Duration = Duration::from_secs(1);

/// A [`Phy`] that records every frame it receives and every frame it sends to a pcap writer.
/// The writer is flushed when the port is dropped.
#[derive(Debug)]
pub struct Pcap<P, W: Write> {
    inner: P,
    sink: SharedPcap<W>,
    offset: Duration,
}

impl<P: Phy, W: Write> Pcap<P, W> {
    /// Capture `inner`'s frames into `sink`, timestamped with the `now` of each call.
    pub fn new(inner: P, sink: SharedPcap<W>) -> Self {
        Pcap {
            inner,
            sink,
            offset: Duration::ZERO,
        }
    }

    /// Like [`Pcap::new`], for a port whose clock starts again at zero (a new run appended to
    /// an existing capture): its timestamps are shifted to start [`RUN_GAP`] after the latest
    /// record already written, so the file's time keeps increasing.
    pub fn following(inner: P, sink: SharedPcap<W>) -> Self {
        let last = lock(&sink).last_timestamp();
        let offset = last.map_or(Duration::ZERO, |t| {
            Duration::from_micros(t.total_micros().max(0) as u64) + RUN_GAP
        });
        Pcap {
            inner,
            sink,
            offset,
        }
    }

    /// The shared writer.
    pub fn sink(&self) -> &SharedPcap<W> {
        &self.sink
    }

    /// The wrapped port.
    pub fn inner(&self) -> &P {
        &self.inner
    }

    fn record(&self, now: Instant, frame: &[u8]) {
        // Errors are kept by the writer (see `PcapWriter::error`): the port keeps working.
        let _ = lock(&self.sink).write_frame(now + self.offset, frame);
    }
}

impl<P: Phy, W: Write> Phy for Pcap<P, W> {
    fn recv(&mut self, now: Instant) -> Option<Frame> {
        let f = self.inner.recv(now)?;
        self.record(now, &f);
        Some(f)
    }

    fn send(&mut self, now: Instant, frame: Frame) -> Result<(), Frame> {
        // Record only what the port takes: a refused frame comes back to the caller.
        if !self.inner.can_send() {
            return Err(frame);
        }
        self.record(now, &frame);
        self.inner.send(now, frame)
    }

    fn can_send(&self) -> bool {
        self.inner.can_send()
    }

    fn waitable(&self) -> Option<Receiver<Frame>> {
        self.inner.waitable()
    }

    fn poll_at(&self) -> Option<Instant> {
        self.inner.poll_at()
    }
}

impl<P, W: Write> Drop for Pcap<P, W> {
    fn drop(&mut self) {
        let mut g = self.sink.lock().unwrap_or_else(|p| p.into_inner());
        let _ = g.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::phy::wire;

    fn u32le(b: &[u8]) -> u32 {
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }

    /// One parsed record: (timestamp in microseconds, original length, captured bytes).
    type Record = (u64, u32, Vec<u8>);

    /// Parses a capture: (snaplen, linktype, records).
    fn parse(b: &[u8]) -> (u32, u32, Vec<Record>) {
        assert!(b.len() >= GLOBAL_HEADER_LEN);
        assert_eq!(u32le(&b[0..4]), PCAP_MAGIC_MICROS);
        assert_eq!(u16::from_le_bytes([b[4], b[5]]), 2);
        assert_eq!(u16::from_le_bytes([b[6], b[7]]), 4);
        let (snap, link) = (u32le(&b[16..20]), u32le(&b[20..24]));
        let mut recs = Vec::new();
        let mut at = GLOBAL_HEADER_LEN;
        while at < b.len() {
            let h = &b[at..at + RECORD_HEADER_LEN];
            let us = u64::from(u32le(&h[0..4])) * 1_000_000 + u64::from(u32le(&h[4..8]));
            let (incl, orig) = (u32le(&h[8..12]) as usize, u32le(&h[12..16]));
            at += RECORD_HEADER_LEN;
            recs.push((us, orig, b[at..at + incl].to_vec()));
            at += incl;
        }
        assert_eq!(at, b.len(), "no trailing bytes");
        (snap, link, recs)
    }

    #[test]
    fn captures_received_and_sent_frames_and_parses_back() {
        let sink = PcapWriter::new(Vec::new()).unwrap().shared();
        let (a, mut b) = wire(8);
        let mut port = Pcap::new(a, sink.clone());
        b.send(Instant::from_micros(0), vec![1u8; 60]).unwrap();
        let t1 = Instant::from_micros(2_500_123);
        assert_eq!(port.recv(t1).unwrap(), vec![1u8; 60]);
        let t2 = Instant::from_micros(3_000_000);
        port.send(t2, vec![2u8; 1514]).unwrap();
        assert!(port.recv(t2).is_none());
        drop(port);
        let w = Arc::try_unwrap(sink).unwrap().into_inner().unwrap();
        assert_eq!(w.records(), 2);
        let (snap, link, recs) = parse(&w.into_inner());
        assert_eq!((snap, link), (DEFAULT_SNAPLEN, LINKTYPE_ETHERNET));
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[0], (2_500_123, 60, vec![1u8; 60]));
        assert_eq!(recs[1], (3_000_000, 1514, vec![2u8; 1514]));
    }

    #[test]
    fn refused_sends_are_not_recorded_and_following_runs_continue_the_clock() {
        let sink = PcapWriter::new(Vec::new()).unwrap().shared();
        let (a, _b) = wire(1);
        let mut port = Pcap::new(a, sink.clone());
        let t = Instant::from_micros(10);
        port.send(t, vec![3u8; 42]).unwrap();
        assert_eq!(port.send(t, vec![4u8; 42]), Err(vec![4u8; 42]));
        drop(port);
        // a second run whose clock starts at zero again lands after the first
        let (c, mut d) = wire(1);
        let mut port = Pcap::following(c, sink.clone());
        d.send(Instant::from_micros(0), vec![5u8; 42]).unwrap();
        port.recv(Instant::from_micros(0)).unwrap();
        drop(port);
        let w = Arc::try_unwrap(sink).unwrap().into_inner().unwrap();
        let (_, _, recs) = parse(&w.into_inner());
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[0].2, vec![3u8; 42]);
        assert_eq!(recs[1].0, 10 + 1_000_000);
        assert_eq!(recs[1].2, vec![5u8; 42]);
    }

    #[test]
    fn a_failing_writer_stops_the_capture_not_the_port() {
        struct Full;
        impl Write for Full {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::new(io::ErrorKind::StorageFull, "disk full"))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        struct Header(Vec<u8>, bool);
        impl Write for Header {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                if self.1 {
                    return Full.write(b);
                }
                self.1 = true;
                self.0.extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let sink = PcapWriter::new(Header(Vec::new(), false)).unwrap().shared();
        let (a, mut b) = wire(4);
        let mut port = Pcap::new(a, sink.clone());
        port.send(Instant::from_micros(0), vec![0u8; 60]).unwrap();
        assert!(b.recv(Instant::from_micros(0)).is_some());
        let g = sink.lock().unwrap();
        assert_eq!(g.records(), 0);
        assert!(g.error().unwrap().contains("disk full"));
    }
}
