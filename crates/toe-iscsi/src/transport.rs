//! What a connection machine ([`crate::target::TargetConn`],
//! [`crate::initiator::InitiatorConn`]) exchanges with the transport under it, PDU by PDU —
//! the seam where the NIC's iSCSI engine plugs in (`DESIGN.md`, "The ULP engine slot").
//!
//! - In: a received PDU ([`RxPdu`]) whose data segment is either inline bytes or already
//!   placed by the transport into the buffer of the PDU's task ([`RxData::Placed`]), with the
//!   verdict of its data digest.
//! - Out: PDUs to send ([`Transport::send`]) whose data is inline or a range of a task's
//!   buffer ([`TxData::Task`]), and the task buffers themselves: the machine opens a buffer
//!   for a task's data (to receive into, or to send from), reads it, and closes it when the
//!   task ends. A transport that places data does it into these buffers.
//! - Digests are computed where the transport says: [`Software`] frames PDUs over a plain
//!   byte stream and computes CRC32C in host code (and counts the bytes it ran through it);
//!   an engine does it in the NIC.
//!
//! Pure: no sockets, threads or clock.

use std::collections::HashMap;

use toe_bus::HostBuf;

use crate::wire::{DigestCheck, Framing, Repr, WireError, BHS_LEN};

/// The longest data segment a side receives during login, bytes (RFC 7143 §6.1, the
/// default MaxRecvDataSegmentLength); after it, what the side declared.
pub const LOGIN_MAX_DATA_SEGMENT: u32 = 8192;

/// The data segment of a received PDU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxData<'a> {
    /// The bytes themselves (software framing; or a PDU the engine had no buffer for).
    Inline(&'a [u8]),
    /// `len` bytes the transport already placed into the buffer of the PDU's task (its
    /// Initiator Task Tag) at byte `offset` of it: the machine only accounts for them.
    Placed {
        /// Where in the task's buffer, bytes.
        offset: u32,
        /// How many bytes.
        len: u32,
    },
}

/// A received PDU as a connection machine takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxPdu<'a> {
    /// The Basic Header Segment (its header digest, if any, already checked).
    pub bhs: &'a [u8; BHS_LEN],
    /// The data segment, without padding or digest.
    pub data: RxData<'a>,
    /// The data digest's verdict (the data must not be used when it is bad).
    pub data_digest: DigestCheck,
}

impl<'a> RxPdu<'a> {
    /// The header fields.
    pub fn repr(&self) -> Result<Repr, WireError> {
        Repr::parse(self.bhs)
    }

    /// The data segment's length, bytes (inline or placed).
    pub fn data_len(&self) -> usize {
        match self.data {
            RxData::Inline(d) => d.len(),
            RxData::Placed { len, .. } => len as usize,
        }
    }

    /// Whether the data was placed somewhere else than at `buffer_offset` (the PDU's Buffer
    /// Offset): a transport that does so is broken, and the PDU a protocol error.
    pub fn placed_elsewhere(&self, buffer_offset: u32) -> bool {
        matches!(self.data, RxData::Placed { offset, .. } if offset != buffer_offset)
    }

    /// The inline data; empty for placed data (which only task data can be: Data-In,
    /// Data-Out, immediate data).
    pub fn inline(&self) -> &'a [u8] {
        match self.data {
            RxData::Inline(d) => d,
            RxData::Placed { .. } => &[],
        }
    }
}

/// The data segment of a PDU to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxData<'a> {
    /// These bytes.
    Inline(&'a [u8]),
    /// `len` bytes at byte `offset` of task `itt`'s buffer (see [`Transport::open`]).
    Task {
        /// The task's Initiator Task Tag.
        itt: u32,
        /// Where in its buffer, bytes.
        offset: u32,
        /// How many bytes.
        len: u32,
    },
}

/// A read's data as one request (large PDU send): the first `len` bytes of task `itt`'s
/// buffer, as Data-In PDUs of at most `max_segment` bytes (the initiator's
/// MaxRecvDataSegmentLength) in sequences of at most `max_burst` bytes (MaxBurstLength:
/// the F bit ends each), with DataSN from 0 and Buffer Offsets in order, and the status
/// in the last PDU (phase collapse).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataInBurst {
    /// Logical unit.
    pub lun: u64,
    /// The task's Initiator Task Tag.
    pub itt: u32,
    /// Bytes to send (> 0).
    pub len: u32,
    /// Most data in one PDU, bytes (> 0).
    pub max_segment: u32,
    /// Most data in one sequence, bytes (> 0).
    pub max_burst: u32,
    /// StatSN (the last PDU takes it with the status).
    pub stat_sn: u32,
    /// ExpCmdSN.
    pub exp_cmd_sn: u32,
    /// MaxCmdSN.
    pub max_cmd_sn: u32,
    /// SCSI status, in the last PDU.
    pub status: u8,
    /// Residual overflow, underflow and count, in the last PDU.
    pub residual: (bool, bool, u32),
}

impl DataInBurst {
    /// The PDUs: each Data-In header with the (offset, length) of its data in the buffer.
    pub fn pdus(&self) -> impl Iterator<Item = (Repr, u32, u32)> + '_ {
        let (seg, burst, total) = (self.max_segment.max(1), self.max_burst.max(1), self.len);
        let mut offset = 0u32;
        let mut data_sn = 0u32;
        std::iter::from_fn(move || {
            if offset >= total {
                return None;
            }
            let len = seg.min(total - offset).min(burst - offset % burst);
            let last = offset + len == total;
            let (o, u, count) = self.residual;
            let di = crate::wire::DataIn {
                final_: last || (offset + len) % burst == 0,
                ack: false,
                overflow: last && o,
                underflow: last && u,
                status: last.then_some(self.status),
                lun: self.lun,
                itt: self.itt,
                ttt: crate::wire::RESERVED_TAG,
                stat_sn: self.stat_sn,
                exp_cmd_sn: self.exp_cmd_sn,
                max_cmd_sn: self.max_cmd_sn,
                data_sn,
                buffer_offset: offset,
                residual: if last && (o || u) { count } else { 0 },
            };
            let at = offset;
            offset += len;
            data_sn += 1;
            Some((Repr::DataIn(di), at, len))
        })
    }
}

/// A write's data as one request (large PDU send): bytes `from..to` of task `itt`'s
/// buffer, as the Data-Out PDUs of one sequence (for the R2T with `ttt`, or unsolicited with
/// the reserved tag) of at most `max_segment` bytes (the target's
/// MaxRecvDataSegmentLength), DataSN from 0, F on the last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataOutBurst {
    /// Logical unit.
    pub lun: u64,
    /// The task's Initiator Task Tag.
    pub itt: u32,
    /// The Target Transfer Tag of the R2T answered (the reserved tag for unsolicited data).
    pub ttt: u32,
    /// ExpStatSN.
    pub exp_stat_sn: u32,
    /// First byte of the buffer to send.
    pub from: u32,
    /// End (exclusive) of the bytes to send.
    pub to: u32,
    /// Most data in one PDU, bytes (> 0).
    pub max_segment: u32,
}

impl DataOutBurst {
    /// The PDUs: each Data-Out header with the (offset, length) of its data in the buffer.
    pub fn pdus(&self) -> impl Iterator<Item = (Repr, u32, u32)> + '_ {
        let seg = self.max_segment.max(1);
        let mut at = self.from;
        let mut data_sn = 0u32;
        std::iter::from_fn(move || {
            if at >= self.to {
                return None;
            }
            let n = seg.min(self.to - at);
            let d = crate::wire::DataOut {
                final_: at + n == self.to,
                lun: self.lun,
                itt: self.itt,
                ttt: self.ttt,
                exp_stat_sn: self.exp_stat_sn,
                data_sn,
                buffer_offset: at,
            };
            let start = at;
            at += n;
            data_sn += 1;
            Some((Repr::DataOut(d), start, n))
        })
    }
}

/// The transport of one connection, as its machine sees it.
pub trait Transport {
    /// The login is over: from the next PDU on, header and data digests as negotiated, and
    /// received data segments of at most `max_recv` bytes (the MaxRecvDataSegmentLength
    /// this side declared).
    fn full_feature(&mut self, header_digest: bool, data_digest: bool, max_recv: u32);

    /// Send the PDU of `repr` with `data` (digests and padding as the transport does them).
    /// A [`TxData::Task`] range outside its buffer sends nothing.
    fn send(&mut self, repr: &Repr, data: TxData<'_>);

    /// Send a read's data as Data-In PDUs ([`DataInBurst::pdus`]), from the task's open
    /// buffer; a transport with an engine hands the engine the one request.
    fn send_data_in(&mut self, burst: &DataInBurst) {
        send_from_task(self, burst.itt, burst.pdus());
    }

    /// Send a write's data as Data-Out PDUs ([`DataOutBurst::pdus`]), from the task's open
    /// buffer; a transport with an engine hands the engine the one request.
    fn send_data_out(&mut self, burst: &DataOutBurst) {
        send_from_task(self, burst.itt, burst.pdus());
    }

    /// Open task `itt`'s buffer: `buf` is the data to send from, or zeros to receive into
    /// (a transport may then place the peer's data for the task there itself). A buffer
    /// already open for `itt` is replaced.
    fn open(&mut self, itt: u32, buf: Vec<u8>);

    /// Open task `itt`'s buffer as `len` zero bytes to receive into (the peer's data, placed
    /// by the transport or with [`Transport::place`]); a transport with host memory may
    /// put it there at once, where a NIC can place into it and the data can be handed over
    /// ([`Transport::take_host`]). The default is [`Transport::open`] of zeros.
    fn open_receive(&mut self, itt: u32, len: usize) {
        self.open(itt, vec![0; len]);
    }

    /// Task `itt`'s buffer, if open.
    fn buffer(&self, itt: u32) -> Option<&[u8]>;

    /// Copy inline `data` into task `itt`'s buffer at byte `offset`; false (and nothing
    /// copied) without a buffer or past its end.
    fn place(&mut self, itt: u32, offset: usize, data: &[u8]) -> bool;

    /// Close task `itt`'s buffer and take it back: `None` without one, or while the
    /// transport still sends from it (it frees the buffer itself once it has; see
    /// [`crate::offload::Offloaded`]). The machines only take back what a task read.
    fn close(&mut self, itt: u32) -> Option<Vec<u8>>;

    /// Close task `itt`'s buffer without taking its data back (the machine read what it
    /// needed through [`Transport::buffer`]). The default is [`Transport::close`].
    fn discard(&mut self, itt: u32) {
        self.close(itt);
    }

    /// Close every task buffer (a task set was aborted).
    fn close_all(&mut self);

    /// Close task `itt`'s buffer and hand it over as it lies in host memory, without a
    /// copy, for another connection on the same host to send from (a proxy's read data,
    /// a proxied write): `None`, and the task left as it was, if the transport keeps it
    /// elsewhere, still sends from it, or has no host memory (then [`Transport::close`]).
    fn take_host(&mut self, itt: u32) -> Option<HostBuf> {
        let _ = itt;
        None
    }

    /// Open task `itt`'s buffer on `buf`, already in this transport's host memory: the
    /// data to send from (its first bytes, as many as the PDUs ask for), as with
    /// [`Transport::open`]. `Err(buf)`, and nothing opened, if the transport has no host
    /// memory (the caller copies it out and opens that).
    fn open_host(&mut self, itt: u32, buf: HostBuf) -> Result<(), HostBuf> {
        let _ = itt;
        Err(buf)
    }

    /// Give back a buffer taken with [`Transport::take_host`] that nobody will use (its
    /// command went away). Without host memory there is none to give back.
    fn free_host(&mut self, buf: HostBuf) {
        let _ = buf;
    }

    /// Bytes the host ran through CRC32C for digests so far, sent and received (0 where
    /// the NIC computes them).
    fn digest_bytes(&self) -> u64;

    /// Data bytes the transport copied between buffers of the application's own memory so
    /// far (a task's data into or out of a PDU, into a task's buffer). Copies into or out of
    /// the driver's host memory are not here: that region counts them itself
    /// ([`toe_bus::CopyStats`]).
    fn copy_bytes(&self) -> u64 {
        0
    }
}

/// A transport under the byte-level entry points of the machines (`on_bytes`, and the calls
/// that append what they send to an output buffer): what the shell receives goes in
/// through [`Stream::receive`], and the plain bytes to send come out of the buffer it lends
/// ([`Stream::lend_output`]).
pub trait Stream: Transport + Sized {
    /// Swap `out` with the buffer of plain bytes to send: what is sent as bytes from now on
    /// is appended to the caller's buffer, until the next swap gives it back.
    fn lend_output(&mut self, out: &mut Vec<u8>);

    /// Feed `bytes` received on the connection to machine `m`, whose transport `io(m)`
    /// is: each whole PDU goes to `on_pdu(m, pdu)` until it returns false or the bytes run
    /// out (a partial PDU waits for more). An error ends the connection.
    fn receive<M>(
        m: &mut M,
        io: impl Fn(&mut M) -> &mut Self,
        bytes: &[u8],
        on_pdu: impl FnMut(&mut M, RxPdu<'_>) -> bool,
    ) -> Result<(), FrameError>;
}

/// Send each (header, offset, length) of `pdus` with that range of task `itt`'s buffer.
fn send_from_task<T: Transport + ?Sized>(
    io: &mut T,
    itt: u32,
    pdus: impl Iterator<Item = (Repr, u32, u32)>,
) {
    for (repr, offset, len) in pdus {
        io.send(&repr, TxData::Task { itt, offset, len });
    }
}

/// Task buffers in host memory, by ITT: where a transport keeps what [`Transport::open`]
/// gives it, and what an engine places into ([`crate::engine::TagMemory`]).
#[derive(Debug, Default)]
pub struct HostBuffers(HashMap<u32, Vec<u8>>);

impl HostBuffers {
    /// Keep `buf` for task `itt` (replacing one kept before).
    pub fn insert(&mut self, itt: u32, buf: Vec<u8>) {
        self.0.insert(itt, buf);
    }

    /// Task `itt`'s buffer.
    pub fn get(&self, itt: u32) -> Option<&[u8]> {
        self.0.get(&itt).map(Vec::as_slice)
    }

    /// Copy `data` into task `itt`'s buffer at byte `offset`; false (and nothing copied)
    /// without a buffer or past its end.
    pub fn copy_in(&mut self, itt: u32, offset: usize, data: &[u8]) -> bool {
        let Some(b) = self.0.get_mut(&itt) else {
            return false;
        };
        match b.get_mut(offset..offset + data.len()) {
            Some(dst) => {
                dst.copy_from_slice(data);
                true
            }
            None => false,
        }
    }

    /// Take task `itt`'s buffer back.
    pub fn remove(&mut self, itt: u32) -> Option<Vec<u8>> {
        self.0.remove(&itt)
    }

    /// The tasks with a buffer.
    pub fn tags(&self) -> Vec<u32> {
        self.0.keys().copied().collect()
    }

    /// Drop every buffer.
    pub fn clear(&mut self) {
        self.0.clear();
    }

    /// Bytes in all buffers.
    pub fn bytes(&self) -> usize {
        self.0.values().map(Vec::len).sum()
    }
}

/// Every buffer kept is registered (the engine stand-ins of the tests place into them);
/// finishing a tag changes nothing (the buffer stays until the machine closes it).
impl crate::engine::TagMemory for HostBuffers {
    fn write(&mut self, tag: u32, offset: usize, data: &[u8]) -> bool {
        self.copy_in(tag, offset, data)
    }

    fn read(&self, tag: u32, offset: usize, out: &mut [u8]) -> bool {
        let end = offset.checked_add(out.len());
        match self
            .get(tag)
            .zip(end)
            .and_then(|(b, end)| b.get(offset..end))
        {
            Some(src) => {
                out.copy_from_slice(src);
                true
            }
            None => false,
        }
    }

    fn len(&self, tag: u32) -> Option<usize> {
        self.get(tag).map(<[u8]>::len)
    }

    fn finish(&mut self, _: u32) {}
}

/// Why [`receive`] (or [`Software::frame`]) stopped framing: the connection cannot go on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// A PDU whose data segment (this many bytes) is longer than this side receives (RFC
    /// 7143 §13.12: a protocol error); nothing of it was buffered beyond its header.
    Oversized(usize),
    /// The bytes are not a PDU (or its header digest is wrong).
    Wire(WireError),
    /// The NIC's engine ended the stream (a header digest it found wrong, a data segment
    /// too long), or broke its record format: the reason.
    Engine(String),
}

/// The software transport: PDUs framed over a plain byte stream, digests computed in host
/// code, task buffers in host memory. Received bytes come in through [`receive`]; the
/// bytes to send collect in an output buffer the caller lends ([`Software::lend_output`]).
#[derive(Debug)]
pub struct Software {
    framing: Framing,
    /// The longest data segment received, bytes.
    max_recv: u32,
    out: Vec<u8>,
    inbuf: Vec<u8>,
    buffers: HostBuffers,
    digest_bytes: u64,
    copy_bytes: u64,
}

impl Default for Software {
    fn default() -> Self {
        Software {
            framing: Framing::default(),
            max_recv: LOGIN_MAX_DATA_SEGMENT,
            out: Vec::new(),
            inbuf: Vec::new(),
            buffers: HostBuffers::default(),
            digest_bytes: 0,
            copy_bytes: 0,
        }
    }
}

impl Software {
    /// Bytes in open task buffers (the memory the connection's tasks hold).
    pub fn buffered_bytes(&self) -> usize {
        self.buffers.bytes()
    }

    /// Received bytes not framed yet (the start of a PDU), taken: where the stream goes
    /// on from when another transport takes over.
    pub fn take_input(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.inbuf)
    }

    /// Frame the PDU at the start of `buf`: the PDU (its data inline) and the bytes it took,
    /// `Ok(None)` while `buf` holds only part of one, or the error that ends the connection.
    /// Counts the bytes its digests ran through.
    pub fn frame<'b>(&mut self, buf: &'b [u8]) -> Result<Option<(RxPdu<'b>, usize)>, FrameError> {
        if buf.len() >= BHS_LEN {
            let data = u32::from_be_bytes([0, buf[5], buf[6], buf[7]]);
            if data > self.max_recv {
                return Err(FrameError::Oversized(data as usize));
            }
        }
        let Some(pdu) = self.framing.parse(buf).map_err(FrameError::Wire)? else {
            return Ok(None);
        };
        self.digest_bytes += self.framing.digested_len(pdu.ahs.len(), pdu.data.len());
        let rx = RxPdu {
            bhs: pdu.bhs,
            data: RxData::Inline(pdu.data),
            data_digest: pdu.data_digest,
        };
        Ok(Some((rx, pdu.len)))
    }
}

/// [`Stream::receive`] of the software transport: each whole PDU is borrowed in place from
/// the receive buffer (no copy of its data). A framing error stops it for good.
pub fn receive<M>(
    m: &mut M,
    io: impl Fn(&mut M) -> &mut Software,
    bytes: &[u8],
    mut on_pdu: impl FnMut(&mut M, RxPdu<'_>) -> bool,
) -> Result<(), FrameError> {
    let mut inbuf = {
        let sw = io(m);
        sw.inbuf.extend_from_slice(bytes);
        std::mem::take(&mut sw.inbuf)
    };
    let mut at = 0;
    let mut result = Ok(());
    loop {
        match io(m).frame(&inbuf[at..]) {
            Ok(Some((pdu, len))) => {
                at += len;
                if !on_pdu(m, pdu) {
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    inbuf.drain(..at);
    io(m).inbuf = inbuf;
    result
}

impl Stream for Software {
    fn lend_output(&mut self, out: &mut Vec<u8>) {
        std::mem::swap(&mut self.out, out);
    }

    fn receive<M>(
        m: &mut M,
        io: impl Fn(&mut M) -> &mut Self,
        bytes: &[u8],
        on_pdu: impl FnMut(&mut M, RxPdu<'_>) -> bool,
    ) -> Result<(), FrameError> {
        receive(m, io, bytes, on_pdu)
    }
}

impl Transport for Software {
    fn full_feature(&mut self, header_digest: bool, data_digest: bool, max_recv: u32) {
        self.framing = Framing {
            header_digest,
            data_digest,
        };
        self.max_recv = max_recv;
    }

    fn send(&mut self, repr: &Repr, data: TxData<'_>) {
        let data = match data {
            TxData::Inline(d) => d,
            TxData::Task { itt, offset, len } => {
                let range = offset as usize..offset as usize + len as usize;
                match self.buffers.get(itt).and_then(|b| b.get(range)) {
                    Some(d) => {
                        self.copy_bytes += d.len() as u64;
                        d
                    }
                    None => return,
                }
            }
        };
        // A Repr is always well formed, and the machines keep data within limits.
        let _ = self
            .framing
            .emit_counted(repr, data, &mut self.out, &mut self.digest_bytes);
    }

    fn open(&mut self, itt: u32, buf: Vec<u8>) {
        self.buffers.insert(itt, buf);
    }

    fn buffer(&self, itt: u32) -> Option<&[u8]> {
        self.buffers.get(itt)
    }

    fn place(&mut self, itt: u32, offset: usize, data: &[u8]) -> bool {
        let placed = self.buffers.copy_in(itt, offset, data);
        if placed {
            self.copy_bytes += data.len() as u64;
        }
        placed
    }

    fn close(&mut self, itt: u32) -> Option<Vec<u8>> {
        self.buffers.remove(itt)
    }

    fn close_all(&mut self) {
        self.buffers.clear();
    }

    /// See [`Framing::digested_len`].
    fn digest_bytes(&self) -> u64 {
        self.digest_bytes
    }

    /// Task data framed into PDUs, and inline data placed into task buffers.
    fn copy_bytes(&self) -> u64 {
        self.copy_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{DataIn, Nop, RESERVED_TAG};

    fn nop(itt: u32) -> Repr {
        Repr::NopIn(Nop {
            immediate: false,
            lun: 0,
            itt,
            ttt: RESERVED_TAG,
            sn: 1,
            exp_sn: 1,
            max_cmd_sn: 1,
        })
    }

    /// What goes out is framed as negotiated; what comes in is cut into PDUs however the
    /// bytes arrive; a task's buffer is sent from by range, and a range past it sends
    /// nothing.
    #[test]
    fn software_frames_both_ways_and_sends_from_task_buffers() {
        let mut sw = Software::default();
        sw.full_feature(true, true, 8192);
        let mut out = Vec::new();
        sw.lend_output(&mut out);
        sw.send(&nop(7), TxData::Inline(b"ping"));
        sw.open(9, (0..100u8).collect());
        let di = Repr::DataIn(DataIn {
            itt: 9,
            buffer_offset: 10,
            ..Default::default()
        });
        sw.send(
            &di,
            TxData::Task {
                itt: 9,
                offset: 10,
                len: 20,
            },
        );
        sw.send(
            &di,
            TxData::Task {
                itt: 9,
                offset: 90,
                len: 20,
            },
        );
        sw.lend_output(&mut out);
        let mut rx = Software::default();
        rx.full_feature(true, true, 8192);
        let mut got = Vec::new();
        for chunk in out.chunks(7) {
            receive(
                &mut rx,
                |r| r,
                chunk,
                |_, p| {
                    got.push((p.repr().unwrap(), p.inline().to_vec(), p.data_digest));
                    true
                },
            )
            .unwrap();
        }
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].1, b"ping");
        assert_eq!(got[1].1, (10..30u8).collect::<Vec<_>>());
        assert!(got.iter().all(|g| g.2 == DigestCheck::Good));
        assert_eq!(sw.digest_bytes(), rx.digest_bytes());
        // Placement is bounded by the buffer.
        assert!(sw.place(9, 95, &[1; 5]));
        assert!(!sw.place(9, 96, &[1; 5]));
        assert!(!sw.place(8, 0, &[1]));
        assert_eq!(sw.close(9).map(|b| b[99]), Some(1));
        assert_eq!(sw.buffer(9), None);
    }

    /// A header announcing a data segment longer than the side receives ends framing
    /// before any of the data is buffered: 8 KiB during login, then what was declared.
    #[test]
    fn an_oversized_pdu_stops_framing() {
        let header = |len: u32| {
            let mut bhs = [0u8; BHS_LEN];
            bhs[0] = 0x21; // SCSI Response
            bhs[5..8].copy_from_slice(&len.to_be_bytes()[1..]);
            bhs
        };
        let mut rx = Software::default();
        let r = receive(&mut rx, |r| r, &header(8193), |_, _| true);
        assert_eq!(r, Err(FrameError::Oversized(8193)));
        let mut rx = Software::default();
        rx.full_feature(false, false, 65536);
        let mut seen = 0;
        let pdu = [&header(65536)[..], &vec![0; 65536]].concat();
        receive(
            &mut rx,
            |r| r,
            &pdu,
            |_, _| {
                seen += 1;
                true
            },
        )
        .unwrap();
        assert_eq!(seen, 1);
        let r = receive(&mut rx, |r| r, &header(65537), |_, _| true);
        assert_eq!(r, Err(FrameError::Oversized(65537)));
    }
}
