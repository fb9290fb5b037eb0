//! The NIC's iSCSI engine for one offloaded connection (seed 004's iSCSI module), pure: what
//! the adapter does beside its TOE once the host hands it a connection after the software
//! login (`DESIGN.md`, "The ULP engine slot").
//!
//! - **Receive** ([`Engine::receive`]): the in-order TCP byte stream goes in; PDUs are framed,
//!   their header and data digests checked (and stripped), and the data segment of a Data-In
//!   or Data-Out (or a command's immediate data) whose task tag has a registered buffer is
//!   placed straight into that buffer at its Buffer Offset ([`TagMemory`], DMA in the NIC).
//!   What goes up to the host is a stream of *records* ([`parse_record`]): each PDU's header,
//!   with where its data went and the digest verdicts, and its data inline only when it was
//!   not placed. A placement that would run past the registered buffer is never made: the
//!   record says so and carries the data inline. A PDU that cannot be framed (a header digest
//!   mismatch, a data segment longer than this side receives) ends the stream with a fatal
//!   record.
//! - **Transmit** ([`Engine::transmit`]): a PDU header from the host with its data inline or
//!   as a range of a registered buffer; the engine computes the digests and emits the PDU.
//! - **Counters** ([`EngineStats`]): PDUs framed, bytes placed, digests checked and failed,
//!   tags registered and released.
//!
//! - **Buffers come back** when their task's data is all in: a placement that reaches the
//!   end of the registered buffer, or a Data-In carrying status, finishes the tag
//!   ([`TagMemory::finish`]).
//!
//! On the emulated NIC it sits in the ULP slot of `toe-nic` ([`IscsiEngineFactory`], name
//! [`ENGINE_NAME`]): the host sends [`EngineCmd`]s as bus commands (offload parameters with
//! [`EngineParams::encode`], send requests with [`EngineCmd::encode`]).
//!
//! Pure: no sockets, threads or clock; host memory is behind [`TagMemory`] (whose owner
//! keeps the registrations).

use crate::transport::{RxData, RxPdu};
use crate::wire::{crc32c, padded, DigestCheck, Framing, BHS_LEN, DIGEST_LEN};

pub use toe_nic::TagMemory;

/// The engine's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// PDUs framed from the received stream.
    pub pdus_framed: u64,
    /// PDUs emitted.
    pub pdus_sent: u64,
    /// Data bytes placed into registered buffers.
    pub bytes_placed: u64,
    /// Data bytes that went up inline (no buffer registered, or a refused placement).
    pub bytes_inline: u64,
    /// Header and data digests checked on receive.
    pub digests_checked: u64,
    /// Digests that did not match (a header digest mismatch also ends the stream).
    pub digests_failed: u64,
    /// Digests computed on transmit.
    pub digests_computed: u64,
    /// Placements refused because they ran past the registered buffer.
    pub placements_refused: u64,
    /// Tags registered.
    pub tags_registered: u64,
    /// Tags released.
    pub tags_released: u64,
}

/// Why the engine stopped framing the stream (the connection cannot go on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fatal {
    /// A header digest did not match.
    HeaderDigest,
    /// A data segment longer than this side receives.
    Oversized,
    /// An opcode RFC 7143 does not define.
    Opcode,
}

/// A record starts with this byte: a PDU.
const RECORD_PDU: u8 = b'R';
/// A record starts with this byte: the stream ended on a fatal error.
const RECORD_FATAL: u8 = b'F';
/// Bytes of a record's own header, before the PDU's BHS.
pub const RECORD_HEADER_LEN: usize = 16;

/// Record flags.
mod flag {
    pub const HEADER_DIGEST_CHECKED: u8 = 0x01;
    pub const DATA_DIGEST_CHECKED: u8 = 0x02;
    pub const DATA_DIGEST_BAD: u8 = 0x04;
    pub const PLACED: u8 = 0x08;
    pub const PLACEMENT_REFUSED: u8 = 0x10;
}

/// A PDU being received: its header is in, its data is coming.
struct Incoming {
    header: Vec<u8>,
    data_len: usize,
    /// Data (and padding, and digest) bytes taken so far.
    got: usize,
    crc: u32,
    /// Where the data goes: (tag, offset of the PDU's first data byte in the buffer).
    place: Option<(u32, usize)>,
    refused: bool,
    inline: Vec<u8>,
    digest: [u8; DIGEST_LEN],
}

/// One offloaded connection's engine.
#[derive(Default)]
pub struct Engine {
    /// Digests as negotiated.
    framing: Framing,
    max_recv: u32,
    /// Header bytes gathered (BHS, AHS, header digest) while no PDU is incoming.
    head: Vec<u8>,
    incoming: Option<Incoming>,
    fatal: Option<Fatal>,
    stats: EngineStats,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("stats", &self.stats)
            .field("fatal", &self.fatal)
            .finish()
    }
}

impl Engine {
    /// An engine for a connection offloaded with header and data digests as negotiated,
    /// receiving data segments of at most `max_recv` bytes (the MaxRecvDataSegmentLength
    /// this side declared).
    pub fn new(header_digest: bool, data_digest: bool, max_recv: u32) -> Engine {
        Engine {
            framing: Framing {
                header_digest,
                data_digest,
            },
            max_recv,
            ..Engine::default()
        }
    }

    /// The counters.
    pub fn stats(&self) -> EngineStats {
        self.stats
    }

    /// Why the stream ended, if it did.
    pub fn fatal(&self) -> Option<Fatal> {
        self.fatal
    }

    fn header_len(&self, bhs: &[u8]) -> usize {
        BHS_LEN
            + usize::from(bhs[4]) * 4
            + if self.framing.header_digest {
                DIGEST_LEN
            } else {
                0
            }
    }

    /// Take in-order bytes of the received stream: data is placed through `mem`, and the
    /// records for the host are appended to `up`. After a fatal record nothing more is
    /// taken.
    pub fn receive(&mut self, mut bytes: &[u8], mem: &mut dyn TagMemory, up: &mut Vec<u8>) {
        while !bytes.is_empty() && self.fatal.is_none() {
            if self.incoming.is_none() {
                // The header: the BHS first (it says how long the rest is).
                let want = if self.head.len() < BHS_LEN {
                    BHS_LEN
                } else {
                    self.header_len(&self.head)
                };
                let n = (want - self.head.len()).min(bytes.len());
                self.head.extend_from_slice(&bytes[..n]);
                bytes = &bytes[n..];
                if self.head.len() >= BHS_LEN && self.head.len() == self.header_len(&self.head) {
                    self.start_pdu(mem, up);
                }
                continue;
            }
            let n = self.take_data(bytes, mem);
            bytes = &bytes[n..];
            if self
                .incoming
                .as_ref()
                .is_some_and(|i| i.got == self.data_total(i))
            {
                self.end_pdu(mem, up);
            }
        }
    }

    /// Bytes after the header: data, padding and the data digest.
    fn data_total(&self, i: &Incoming) -> usize {
        if i.data_len == 0 {
            0
        } else {
            padded(i.data_len)
                + if self.framing.data_digest {
                    DIGEST_LEN
                } else {
                    0
                }
        }
    }

    /// The header is in: check its digest, decide where the data goes.
    fn start_pdu(&mut self, mem: &mut dyn TagMemory, up: &mut Vec<u8>) {
        let header = std::mem::take(&mut self.head);
        let ahs_end = header.len()
            - if self.framing.header_digest {
                DIGEST_LEN
            } else {
                0
            };
        if self.framing.header_digest {
            self.stats.digests_checked += 1;
            let received = u32::from_le_bytes(header[ahs_end..].try_into().expect("4 bytes"));
            if crc32c(&[&header[..ahs_end]]) != received {
                self.stats.digests_failed += 1;
                return self.fail(Fatal::HeaderDigest, up);
            }
        }
        if crate::wire::Opcode::from_byte(header[0]).is_err() {
            return self.fail(Fatal::Opcode, up);
        }
        let data_len = u32::from_be_bytes([0, header[5], header[6], header[7]]);
        if data_len > self.max_recv {
            return self.fail(Fatal::Oversized, up);
        }
        let data_len = data_len as usize;
        let tag = u32::from_be_bytes(header[16..20].try_into().expect("4 bytes"));
        let offset = match header[0] & 0x3f {
            // Data-Out (at a target), Data-In (at an initiator): at their Buffer Offset.
            0x05 | 0x25 => Some(u32::from_be_bytes(header[40..44].try_into().expect("4")) as usize),
            // A SCSI Command's immediate data: the start of the write.
            0x01 => Some(0),
            _ => None,
        };
        let (mut place, mut refused) = (None, false);
        if let (Some(offset), Some(len), true) = (offset, mem.len(tag), data_len > 0) {
            if offset + data_len <= len {
                place = Some((tag, offset));
            } else {
                refused = true;
                self.stats.placements_refused += 1;
            }
        }
        self.stats.pdus_framed += 1;
        self.incoming = Some(Incoming {
            header: header[..ahs_end].to_vec(),
            data_len,
            got: 0,
            crc: 0,
            place,
            refused,
            inline: Vec::new(),
            digest: [0; DIGEST_LEN],
        });
        if data_len == 0 {
            self.end_pdu(mem, up);
        }
    }

    /// Take what of `bytes` belongs to the incoming PDU's data, padding and digest.
    fn take_data(&mut self, bytes: &[u8], mem: &mut dyn TagMemory) -> usize {
        let total = self.incoming.as_ref().map_or(0, |i| self.data_total(i));
        let data_digest = self.framing.data_digest;
        let Some(i) = self.incoming.as_mut() else {
            return 0;
        };
        let n = (total - i.got).min(bytes.len());
        let chunk = &bytes[..n];
        let padded_len = padded(i.data_len);
        // The part of `chunk` that is data, then padding, then digest.
        let data_end = i.data_len.saturating_sub(i.got).min(n);
        let pad_end = padded_len.saturating_sub(i.got).min(n);
        let data = &chunk[..data_end];
        if !data.is_empty() {
            match i.place {
                Some((tag, base)) => {
                    // Checked against the buffer's length when the header came in.
                    if mem.write(tag, base + i.got, data) {
                        self.stats.bytes_placed += data.len() as u64;
                    }
                }
                None => {
                    i.inline.extend_from_slice(data);
                    self.stats.bytes_inline += data.len() as u64;
                }
            }
        }
        if data_digest {
            i.crc = crc32c::crc32c_append(i.crc, &chunk[..pad_end]);
            for (k, b) in chunk[pad_end..].iter().enumerate() {
                i.digest[i.got + pad_end + k - padded_len] = *b;
            }
        }
        i.got += n;
        n
    }

    /// The PDU is whole: its record goes up, and a tag whose data is all in is finished.
    fn end_pdu(&mut self, mem: &mut dyn TagMemory, up: &mut Vec<u8>) {
        let Some(i) = self.incoming.take() else {
            return;
        };
        let mut flags = 0;
        if self.framing.header_digest {
            flags |= flag::HEADER_DIGEST_CHECKED;
        }
        if self.framing.data_digest && i.data_len > 0 {
            flags |= flag::DATA_DIGEST_CHECKED;
            self.stats.digests_checked += 1;
            if u32::from_le_bytes(i.digest) != i.crc {
                flags |= flag::DATA_DIGEST_BAD;
                self.stats.digests_failed += 1;
            }
        }
        if i.place.is_some() {
            flags |= flag::PLACED;
        }
        if i.refused {
            flags |= flag::PLACEMENT_REFUSED;
        }
        let offset = i.place.map_or(0, |(_, o)| o) as u32;
        up.extend_from_slice(&[RECORD_PDU, flags, 0, 0]);
        up.extend_from_slice(&(i.data_len as u32).to_be_bytes());
        up.extend_from_slice(&offset.to_be_bytes());
        up.extend_from_slice(&(i.inline.len() as u32).to_be_bytes());
        up.extend_from_slice(&i.header);
        up.extend_from_slice(&i.inline);
        if let Some((tag, base)) = i.place {
            // The buffer is full, or a Data-In carries the status: the task's data is in.
            let status = i.header[0] & 0x3f == 0x25 && i.header[1] & 0x01 != 0;
            if status || mem.len(tag) == Some(base + i.data_len) {
                mem.finish(tag);
            }
        }
    }

    fn fail(&mut self, why: Fatal, up: &mut Vec<u8>) {
        self.fatal = Some(why);
        let mut r = [0u8; RECORD_HEADER_LEN];
        r[0] = RECORD_FATAL;
        r[1] = why as u8;
        up.extend_from_slice(&r);
    }

    /// Emit the PDU of header `bhs` (its DataSegmentLength set here) with `data`: inline
    /// bytes, or `len` bytes at `offset` of registered tag `tag`'s buffer read through
    /// `mem`. Digests and padding as negotiated, appended to `wire`. Returns false (nothing
    /// emitted) for a range outside the buffer or a data segment over the iSCSI limit.
    pub fn transmit(
        &mut self,
        bhs: &[u8; BHS_LEN],
        data: TxRef<'_>,
        mem: &dyn TagMemory,
        wire: &mut Vec<u8>,
    ) -> bool {
        let (len, emitted) = match data {
            TxRef::Inline(d) => (d.len(), self.framing.emit_bhs(*bhs, &[], d, wire).is_ok()),
            // Read from host memory (DMA) straight into the PDU being framed.
            TxRef::Tag { tag, offset, len } => {
                let fill = |dst: &mut [u8]| mem.read(tag, offset, dst);
                let framed = self.framing.emit_filled(*bhs, &[], len, wire, fill);
                (len, matches!(framed, Ok(Some(_))))
            }
        };
        if !emitted {
            return false;
        }
        self.stats.digests_computed +=
            u64::from(self.framing.header_digest) + u64::from(self.framing.data_digest && len > 0);
        self.stats.pdus_sent += 1;
        true
    }
}

/// The data of a PDU the engine sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxRef<'a> {
    /// These bytes (from the host's command).
    Inline(&'a [u8]),
    /// `len` bytes at `offset` of a registered tag's buffer (read from host memory by DMA).
    Tag {
        /// The task tag.
        tag: u32,
        /// Where in its buffer.
        offset: usize,
        /// How many bytes.
        len: usize,
    },
}

/// A record parsed from the engine's stream to the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record<'a> {
    /// A PDU, as its machine takes it.
    Pdu {
        /// The PDU (its data inline or placed).
        pdu: RxPdu<'a>,
        /// The engine did not place its data because it ran past the registered buffer.
        placement_refused: bool,
    },
    /// The stream ended on this error.
    Fatal(Fatal),
}

/// Parse the record at the start of `buf`: it and the bytes it took, or `None` while
/// `buf` holds only part of one. Malformed records (which only a broken engine makes) are
/// `Err`.
pub fn parse_record(buf: &[u8]) -> Result<Option<(Record<'_>, usize)>, &'static str> {
    if buf.len() < RECORD_HEADER_LEN {
        return Ok(None);
    }
    match buf[0] {
        RECORD_FATAL => {
            let why = match buf[1] {
                0 => Fatal::HeaderDigest,
                1 => Fatal::Oversized,
                2 => Fatal::Opcode,
                _ => return Err("unknown fatal record"),
            };
            return Ok(Some((Record::Fatal(why), RECORD_HEADER_LEN)));
        }
        RECORD_PDU => {}
        _ => return Err("not a record"),
    }
    let be = |at: usize| u32::from_be_bytes(buf[at..at + 4].try_into().expect("4 bytes"));
    let flags = buf[1];
    let (data_len, offset, inline_len) = (be(4), be(8), be(12) as usize);
    if buf.len() < RECORD_HEADER_LEN + BHS_LEN {
        return Ok(None);
    }
    let bhs: &[u8; BHS_LEN] = buf[RECORD_HEADER_LEN..RECORD_HEADER_LEN + BHS_LEN]
        .try_into()
        .expect("48 bytes");
    let ahs = usize::from(bhs[4]) * 4;
    let total = RECORD_HEADER_LEN + BHS_LEN + ahs + inline_len;
    if buf.len() < total {
        return Ok(None);
    }
    let placed = flags & flag::PLACED != 0;
    let consistent = if placed {
        inline_len == 0
    } else {
        inline_len == data_len as usize
    };
    if !consistent {
        return Err("a record's data is neither placed nor inline");
    }
    let data = if placed {
        RxData::Placed {
            offset,
            len: data_len,
        }
    } else {
        RxData::Inline(&buf[total - inline_len..total])
    };
    let data_digest = match (
        flags & flag::DATA_DIGEST_CHECKED != 0,
        flags & flag::DATA_DIGEST_BAD != 0,
    ) {
        (false, _) => DigestCheck::None,
        (true, false) => DigestCheck::Good,
        (true, true) => DigestCheck::Bad {
            computed: 0,
            received: 1,
        },
    };
    let pdu = RxPdu {
        bhs,
        data,
        data_digest,
    };
    Ok(Some((
        Record::Pdu {
            pdu,
            placement_refused: flags & flag::PLACEMENT_REFUSED != 0,
        },
        total,
    )))
}

/// What the host side of an offloaded connection asks of its engine, in order (bus
/// commands, in the NIC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineCmd {
    /// Take the connection over from here: digests as negotiated, received data segments
    /// of at most `max_recv` bytes. Before it, the stream passes through untouched.
    Offload {
        /// Header digests.
        header_digest: bool,
        /// Data digests.
        data_digest: bool,
        /// The MaxRecvDataSegmentLength this side declared, bytes.
        max_recv: u32,
    },
    /// Register task `tag`'s buffer, `len` bytes.
    Register {
        /// The task's ITT.
        tag: u32,
        /// The buffer's length, bytes.
        len: usize,
    },
    /// Release task `tag`'s buffer.
    Release {
        /// The task's ITT.
        tag: u32,
    },
    /// Send a PDU.
    Send {
        /// Its BHS (DataSegmentLength is the engine's to set).
        bhs: [u8; BHS_LEN],
        /// Its data.
        data: SendData,
    },
    /// Send a read's data: the engine cuts the Data-In PDUs itself (large PDU send).
    SendDataIn(crate::transport::DataInBurst),
    /// Send a write's data: the engine cuts the Data-Out PDUs itself (large PDU send).
    SendDataOut(crate::transport::DataOutBurst),
}

/// The data of an [`EngineCmd::Send`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendData {
    /// These bytes, carried by the command.
    Inline(Vec<u8>),
    /// A range of a registered buffer, which the engine reads from host memory.
    Tag {
        /// The task's ITT.
        tag: u32,
        /// Where in its buffer.
        offset: usize,
        /// How many bytes.
        len: usize,
    },
}

impl Engine {
    /// Carry out `cmd` for the host: PDUs to send (appended to `wire`, their tag data read
    /// through `mem`); registrations and releases are counted (the memory's owner keeps
    /// them). [`EngineCmd::Offload`] starts an engine and is not for one that runs (it
    /// returns false).
    pub fn command(&mut self, cmd: &EngineCmd, mem: &dyn TagMemory, wire: &mut Vec<u8>) -> bool {
        match cmd {
            EngineCmd::Offload { .. } => false,
            EngineCmd::Register { .. } => {
                self.stats.tags_registered += 1;
                true
            }
            EngineCmd::Release { .. } => {
                self.stats.tags_released += 1;
                true
            }
            EngineCmd::Send { bhs, data } => {
                let data = match data {
                    SendData::Inline(d) => TxRef::Inline(d),
                    SendData::Tag { tag, offset, len } => TxRef::Tag {
                        tag: *tag,
                        offset: *offset,
                        len: *len,
                    },
                };
                self.transmit(bhs, data, mem, wire)
            }
            EngineCmd::SendDataIn(b) => self.transmit_burst(b.itt, b.pdus(), mem, wire),
            EngineCmd::SendDataOut(b) => self.transmit_burst(b.itt, b.pdus(), mem, wire),
        }
    }

    /// Emit the PDUs of a burst, each header with its range of tag `tag`'s buffer.
    fn transmit_burst(
        &mut self,
        tag: u32,
        pdus: impl Iterator<Item = (crate::wire::Repr, u32, u32)>,
        mem: &dyn TagMemory,
        wire: &mut Vec<u8>,
    ) -> bool {
        for (repr, offset, len) in pdus {
            let mut bhs = [0u8; BHS_LEN];
            repr.emit(&mut bhs);
            let data = TxRef::Tag {
                tag,
                offset: offset as usize,
                len: len as usize,
            };
            if !self.transmit(&bhs, data, mem, wire) {
                return false;
            }
        }
        true
    }
}

/// The name of the iSCSI engine in the NIC's ULP slot.
pub const ENGINE_NAME: &str = "iscsi";

/// The parameters an offload starts the engine with (the bus encoding of
/// [`EngineCmd::Offload`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineParams {
    /// Header digests (CRC32C).
    pub header_digest: bool,
    /// Data digests (CRC32C).
    pub data_digest: bool,
    /// The MaxRecvDataSegmentLength this side declared, bytes.
    pub max_recv: u32,
}

impl EngineParams {
    /// Six bytes: header digest, data digest (0 or 1), MaxRecvDataSegmentLength (big-endian).
    pub fn encode(&self) -> Vec<u8> {
        let mut v = vec![u8::from(self.header_digest), u8::from(self.data_digest)];
        v.extend_from_slice(&self.max_recv.to_be_bytes());
        v
    }

    /// The parameters of [`EngineParams::encode`]'s bytes.
    pub fn decode(b: &[u8]) -> Result<EngineParams, String> {
        match *b {
            [hd @ (0 | 1), dd @ (0 | 1), a, b2, c, d] => Ok(EngineParams {
                header_digest: hd == 1,
                data_digest: dd == 1,
                max_recv: u32::from_be_bytes([a, b2, c, d]),
            }),
            _ => Err(format!("bad iSCSI offload parameters {b:02x?}")),
        }
    }
}

/// Starts [`Engine`]s in the NIC's ULP slot.
#[derive(Debug, Default, Clone, Copy)]
pub struct IscsiEngineFactory;

impl toe_nic::UlpFactory for IscsiEngineFactory {
    fn name(&self) -> &'static str {
        ENGINE_NAME
    }

    fn start(&self, params: &[u8]) -> Result<Box<dyn toe_nic::UlpEngine>, String> {
        let p = EngineParams::decode(params)?;
        if p.max_recv == 0 || p.max_recv as usize > crate::wire::MAX_DATA_SEGMENT_LEN {
            return Err(format!(
                "MaxRecvDataSegmentLength {} out of range",
                p.max_recv
            ));
        }
        Ok(Box::new(Engine::new(
            p.header_digest,
            p.data_digest,
            p.max_recv,
        )))
    }
}

/// Send requests on the bus: a tag byte, then the fields big-endian.
mod request {
    pub const SEND_INLINE: u8 = 1;
    pub const SEND_TAG: u8 = 2;
    pub const DATA_IN: u8 = 3;
    pub const DATA_OUT: u8 = 4;
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], String> {
        if self.0.len() < N {
            return Err("a truncated engine request".into());
        }
        let (a, rest) = self.0.split_at(N);
        self.0 = rest;
        Ok(a.try_into().expect("N bytes"))
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take::<1>()?[0])
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_be_bytes(self.take()?))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_be_bytes(self.take()?))
    }
}

impl EngineCmd {
    /// The bus encoding of a send request ([`EngineCmd::Send`], [`EngineCmd::SendDataIn`],
    /// [`EngineCmd::SendDataOut`]); `None` for the others, which are bus commands of their
    /// own (offload, register, release).
    pub fn encode(&self) -> Option<Vec<u8>> {
        let mut v = Vec::new();
        let put32 = |v: &mut Vec<u8>, x: u32| v.extend_from_slice(&x.to_be_bytes());
        match self {
            EngineCmd::Send { bhs, data } => match data {
                SendData::Inline(d) => {
                    v.push(request::SEND_INLINE);
                    v.extend_from_slice(bhs);
                    v.extend_from_slice(d);
                }
                SendData::Tag { tag, offset, len } => {
                    v.push(request::SEND_TAG);
                    v.extend_from_slice(bhs);
                    for x in [*tag, *offset as u32, *len as u32] {
                        put32(&mut v, x);
                    }
                }
            },
            EngineCmd::SendDataIn(b) => {
                v.push(request::DATA_IN);
                v.extend_from_slice(&b.lun.to_be_bytes());
                for x in [
                    b.itt,
                    b.len,
                    b.max_segment,
                    b.max_burst,
                    b.stat_sn,
                    b.exp_cmd_sn,
                    b.max_cmd_sn,
                ] {
                    put32(&mut v, x);
                }
                let (over, under, count) = b.residual;
                v.extend_from_slice(&[b.status, u8::from(over), u8::from(under)]);
                put32(&mut v, count);
            }
            EngineCmd::SendDataOut(b) => {
                v.push(request::DATA_OUT);
                v.extend_from_slice(&b.lun.to_be_bytes());
                for x in [b.itt, b.ttt, b.exp_stat_sn, b.from, b.to, b.max_segment] {
                    put32(&mut v, x);
                }
            }
            EngineCmd::Offload { .. } | EngineCmd::Register { .. } | EngineCmd::Release { .. } => {
                return None
            }
        }
        Some(v)
    }

    /// The send request of [`EngineCmd::encode`]'s bytes.
    pub fn decode(b: &[u8]) -> Result<EngineCmd, String> {
        let mut r = Reader(b);
        let cmd = match r.u8()? {
            request::SEND_INLINE => EngineCmd::Send {
                bhs: r.take()?,
                data: SendData::Inline(std::mem::take(&mut r.0).to_vec()),
            },
            request::SEND_TAG => EngineCmd::Send {
                bhs: r.take()?,
                data: SendData::Tag {
                    tag: r.u32()?,
                    offset: r.u32()? as usize,
                    len: r.u32()? as usize,
                },
            },
            request::DATA_IN => EngineCmd::SendDataIn(crate::transport::DataInBurst {
                lun: r.u64()?,
                itt: r.u32()?,
                len: r.u32()?,
                max_segment: r.u32()?,
                max_burst: r.u32()?,
                stat_sn: r.u32()?,
                exp_cmd_sn: r.u32()?,
                max_cmd_sn: r.u32()?,
                status: r.u8()?,
                residual: (r.u8()? != 0, r.u8()? != 0, r.u32()?),
            }),
            request::DATA_OUT => EngineCmd::SendDataOut(crate::transport::DataOutBurst {
                lun: r.u64()?,
                itt: r.u32()?,
                ttt: r.u32()?,
                exp_stat_sn: r.u32()?,
                from: r.u32()?,
                to: r.u32()?,
                max_segment: r.u32()?,
            }),
            k => return Err(format!("unknown engine request kind {k}")),
        };
        if !r.0.is_empty() {
            return Err("trailing bytes after an engine request".into());
        }
        Ok(cmd)
    }
}

/// The engine in the NIC's ULP slot: the stream in, records up; send requests in the bus
/// encoding of [`EngineCmd::encode`].
impl toe_nic::UlpEngine for Engine {
    fn receive(
        &mut self,
        _now: toe_bus::time::Instant,
        bytes: &[u8],
        mem: &mut dyn TagMemory,
        up: &mut Vec<u8>,
    ) {
        Engine::receive(self, bytes, mem, up);
    }

    fn send(
        &mut self,
        _now: toe_bus::time::Instant,
        request: &[u8],
        mem: &dyn TagMemory,
        wire: &mut Vec<u8>,
    ) -> Result<(), String> {
        let cmd = EngineCmd::decode(request)?;
        if matches!(cmd, EngineCmd::Offload { .. }) {
            return Err("an offload is not a send request".into());
        }
        let before = wire.len();
        if self.command(&cmd, mem, wire) {
            Ok(())
        } else {
            wire.truncate(before);
            Err(format!("the engine cannot send {cmd:?}: a range outside the buffer, or a PDU over the limit"))
        }
    }

    fn failed(&self) -> Option<String> {
        self.fatal
            .map(|f| format!("the received stream cannot be framed: {f:?}"))
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let s = self.stats;
        vec![
            ("pdus_framed", s.pdus_framed),
            ("pdus_sent", s.pdus_sent),
            ("bytes_placed", s.bytes_placed),
            ("bytes_inline", s.bytes_inline),
            ("digests_checked", s.digests_checked),
            ("digests_failed", s.digests_failed),
            ("digests_computed", s.digests_computed),
            ("placements_refused", s.placements_refused),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::HostBuffers;
    use crate::wire::{DataIn, Framing, Nop, Repr, RESERVED_TAG};

    fn data_in(itt: u32, offset: u32) -> Repr {
        Repr::DataIn(DataIn {
            itt,
            buffer_offset: offset,
            ..Default::default()
        })
    }

    /// A stream of PDUs: Data-In for tag 5 at offsets 0 and 1000 (1000 and 600 bytes), one
    /// for tag 6 past its 100-byte buffer, one for unregistered tag 7, and a NOP-In.
    fn stream(f: &Framing) -> Vec<u8> {
        let mut s = Vec::new();
        let d = |n: usize, k: u8| -> Vec<u8> { (0..n).map(|x| (x as u8) ^ k).collect() };
        f.emit(&data_in(5, 0), &[], &d(1000, 1), &mut s).unwrap();
        f.emit(&data_in(5, 1000), &[], &d(600, 2), &mut s).unwrap();
        f.emit(&data_in(6, 50), &[], &d(51, 3), &mut s).unwrap();
        f.emit(&data_in(7, 0), &[], &d(10, 4), &mut s).unwrap();
        let nop = Repr::NopIn(Nop {
            immediate: false,
            lun: 0,
            itt: RESERVED_TAG,
            ttt: 9,
            sn: 1,
            exp_sn: 1,
            max_cmd_sn: 1,
        });
        f.emit(&nop, &[], &[], &mut s).unwrap();
        s
    }

    fn records(up: &[u8]) -> Vec<(Record<'_>, usize)> {
        let mut at = 0;
        let mut v = Vec::new();
        while let Some((r, n)) = parse_record(&up[at..]).unwrap() {
            v.push((r, at));
            at += n;
        }
        assert_eq!(at, up.len(), "whole records only");
        v
    }

    /// However the stream is cut, the engine places the same bytes and sends up the same
    /// records: data of registered tags placed at their Buffer Offset, a placement past
    /// the buffer refused (the data inline, the buffer untouched), data of an unknown tag
    /// inline, digests checked.
    #[test]
    fn placement_and_records_do_not_depend_on_how_the_stream_is_cut() {
        for (hd, dd) in [(false, false), (true, true)] {
            let f = Framing {
                header_digest: hd,
                data_digest: dd,
            };
            let s = stream(&f);
            let mut first: Option<(Vec<u8>, Vec<u8>, Vec<u8>)> = None;
            for cut in [1, 3, 47, 48, 52, 1000, s.len()] {
                let mut e = Engine::new(hd, dd, 8192);
                let mut mem = HostBuffers::default();
                mem.insert(5, vec![0; 1600]);
                mem.insert(6, vec![0xee; 100]);
                let mut up = Vec::new();
                for chunk in s.chunks(cut) {
                    e.receive(chunk, &mut mem, &mut up);
                }
                assert_eq!(e.fatal(), None);
                let st = e.stats();
                assert_eq!((st.pdus_framed, st.bytes_placed), (5, 1600), "cut {cut}");
                assert_eq!((st.bytes_inline, st.placements_refused), (61, 1));
                assert_eq!(st.digests_failed, 0);
                let got = (
                    up.clone(),
                    mem.get(5).unwrap().to_vec(),
                    mem.get(6).unwrap().to_vec(),
                );
                match &first {
                    None => first = Some(got),
                    Some(f) => assert!(*f == got, "cut {cut} changed the outcome"),
                }
            }
            let (up, five, six) = first.unwrap();
            let expect: Vec<u8> = (0..1000)
                .map(|x| (x as u8) ^ 1)
                .chain((0..600).map(|x| (x as u8) ^ 2))
                .collect();
            assert_eq!(five, expect);
            assert_eq!(six, vec![0xee; 100], "never written outside the buffer");
            let rs = records(&up);
            assert_eq!(rs.len(), 5);
            let Record::Pdu { pdu, .. } = rs[1].0 else {
                panic!()
            };
            assert_eq!(
                pdu.data,
                RxData::Placed {
                    offset: 1000,
                    len: 600
                }
            );
            let want = if dd {
                DigestCheck::Good
            } else {
                DigestCheck::None
            };
            assert_eq!(pdu.data_digest, want);
            let Record::Pdu {
                pdu,
                placement_refused,
            } = rs[2].0
            else {
                panic!()
            };
            assert!(placement_refused);
            assert_eq!(pdu.inline().len(), 51);
            let Record::Pdu { pdu, .. } = rs[3].0 else {
                panic!()
            };
            assert_eq!(
                pdu.inline(),
                (0..10).map(|x| (x as u8) ^ 4).collect::<Vec<_>>()
            );
        }
    }

    /// A wrong data digest is reported in the record (the data was placed: the host must
    /// not use it); a wrong header digest, a data segment past the limit and an unknown
    /// opcode each end the stream with a fatal record.
    #[test]
    fn bad_digests_and_unframable_pdus_are_reported() {
        let f = Framing {
            header_digest: true,
            data_digest: true,
        };
        let mut s = Vec::new();
        f.emit(&data_in(5, 0), &[], &[9; 100], &mut s).unwrap();
        let last = s.len() - 1;
        s[last] ^= 1;
        let mut e = Engine::new(true, true, 8192);
        let mut mem = HostBuffers::default();
        mem.insert(5, vec![0; 100]);
        let mut up = Vec::new();
        e.receive(&s, &mut mem, &mut up);
        let rs = records(&up);
        let Record::Pdu { pdu, .. } = rs[0].0 else {
            panic!()
        };
        assert!(matches!(pdu.data_digest, DigestCheck::Bad { .. }));
        assert_eq!(e.stats().digests_failed, 1);
        for (bytes, why) in [
            (
                {
                    let mut s = Vec::new();
                    f.emit(&data_in(5, 0), &[], &[1; 10], &mut s).unwrap();
                    s[3] ^= 1;
                    s
                },
                Fatal::HeaderDigest,
            ),
            (
                {
                    let mut s = Vec::new();
                    f.emit(&data_in(5, 0), &[], &[1; 9000], &mut s).unwrap();
                    s
                },
                Fatal::Oversized,
            ),
            (
                {
                    let mut s = Vec::new();
                    f.emit(&data_in(5, 0), &[], &[], &mut s).unwrap();
                    s[0] = 0x1e;
                    let digest = crc32c(&[&s[..48]]).to_le_bytes();
                    s[48..52].copy_from_slice(&digest);
                    s
                },
                Fatal::Opcode,
            ),
        ] {
            let mut e = Engine::new(true, true, 8192);
            let mut up = Vec::new();
            e.receive(&bytes, &mut mem, &mut up);
            assert_eq!(e.fatal(), Some(why));
            assert_eq!(records(&up)[0].0, Record::Fatal(why));
            // Nothing more is taken.
            e.receive(&bytes, &mut mem, &mut up);
            assert_eq!(records(&up).len(), 1);
        }
    }

    /// Send requests and offload parameters cross the bus and come back the same; broken
    /// ones are refused, never misread.
    #[test]
    fn bus_encodings_round_trip() {
        let mut bhs = [0u8; BHS_LEN];
        data_in(9, 4096).emit(&mut bhs);
        let cmds = [
            EngineCmd::Send {
                bhs,
                data: SendData::Inline(vec![1, 2, 3]),
            },
            EngineCmd::Send {
                bhs,
                data: SendData::Tag {
                    tag: 9,
                    offset: 4096,
                    len: 8192,
                },
            },
            EngineCmd::SendDataIn(crate::transport::DataInBurst {
                lun: 1 << 48,
                itt: 7,
                len: 131_072,
                max_segment: 8192,
                max_burst: 65_536,
                stat_sn: 11,
                exp_cmd_sn: 12,
                max_cmd_sn: 44,
                status: 2,
                residual: (false, true, 512),
            }),
            EngineCmd::SendDataOut(crate::transport::DataOutBurst {
                lun: 0,
                itt: 8,
                ttt: 99,
                exp_stat_sn: 3,
                from: 65_536,
                to: 131_072,
                max_segment: 262_144,
            }),
        ];
        for c in &cmds {
            let b = c.encode().expect("a send request");
            assert_eq!(&EngineCmd::decode(&b).unwrap(), c);
            assert!(EngineCmd::decode(&b[..b.len() - 1]).is_err() || b[0] == 1);
            let mut longer = b.clone();
            longer.push(0);
            assert!(EngineCmd::decode(&longer).is_err() || b[0] == 1);
        }
        assert!(EngineCmd::Release { tag: 1 }.encode().is_none());
        assert!(EngineCmd::decode(&[9]).is_err());
        let p = EngineParams {
            header_digest: true,
            data_digest: false,
            max_recv: 262_144,
        };
        assert_eq!(EngineParams::decode(&p.encode()), Ok(p));
        assert!(EngineParams::decode(&[2, 0, 0, 0, 0, 1]).is_err());
        use toe_nic::UlpFactory;
        assert!(IscsiEngineFactory.start(&p.encode()).is_ok());
        let zero = EngineParams { max_recv: 0, ..p };
        assert!(IscsiEngineFactory.start(&zero.encode()).is_err());
    }

    /// Host memory that checks every write stays inside the registered buffers.
    struct Checked(HostBuffers, Vec<(u32, usize)>);

    impl TagMemory for Checked {
        fn write(&mut self, tag: u32, offset: usize, data: &[u8]) -> bool {
            let len = self
                .1
                .iter()
                .find(|(t, _)| *t == tag)
                .expect("registered")
                .1;
            assert!(offset + data.len() <= len, "a write outside the buffer");
            self.0.write(tag, offset, data)
        }
        fn read(&self, tag: u32, offset: usize, out: &mut [u8]) -> bool {
            self.0.read(tag, offset, out)
        }
        fn len(&self, tag: u32) -> Option<usize> {
            self.0.len(tag)
        }
        fn finish(&mut self, tag: u32) {
            self.0.finish(tag)
        }
    }

    proptest::proptest! {
        /// Arbitrary bytes (often shaped like Data-In and Data-Out headers of registered
        /// tags) never panic the engine, never write outside a registered buffer, and
        /// every record it sends up parses.
        #[test]
        fn arbitrary_streams_never_escape_the_buffers(
            pdus in proptest::collection::vec(
                (proptest::bool::ANY, 0u32..4, 0u32..3000, 0usize..3000,
                 proptest::collection::vec(proptest::num::u8::ANY, 0..64)),
                0..12),
            digests in proptest::bool::ANY,
        ) {
            let f = Framing { header_digest: digests, data_digest: digests };
            let mut s = Vec::new();
            for (shaped, tag, offset, len, junk) in pdus {
                if shaped {
                    let d = vec![0x5a; len];
                    f.emit(&data_in(tag, offset), &[], &d, &mut s).unwrap();
                } else {
                    s.extend_from_slice(&junk);
                }
            }
            let mut e = Engine::new(digests, digests, 2048);
            let mut mem = Checked(HostBuffers::default(), vec![(1, 1000), (2, 10)]);
            for (t, n) in [(1u32, 1000usize), (2, 10)] {
                mem.0.insert(t, vec![0; n]);
            }
            let mut up = Vec::new();
            for chunk in s.chunks(37) {
                e.receive(chunk, &mut mem, &mut up);
            }
            let mut at = 0;
            while let Some((_, n)) = parse_record(&up[at..]).unwrap() {
                at += n;
            }
            proptest::prop_assert_eq!(at, up.len());
        }
    }
}
