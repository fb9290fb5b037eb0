//! The SCSI target's disk (SPC-4 / SBC-3 subset), pure: a CDB and its Data-Out bytes go in,
//! a status, Data-In bytes and sense data come out. The blocks live behind [`BlockStore`]
//! (memory here; a file in the shell).
//!
//! Commands: TEST UNIT READY, REQUEST SENSE, INQUIRY (standard data with version
//! descriptors; VPD pages 00h, 80h, 83h, B0h, B1h, B2h), READ CAPACITY (10) and (16), READ
//! and WRITE (6, 10, 12, 16; DPO and FUA), WRITE AND VERIFY (10, 12, 16), VERIFY (10, 12, 16;
//! BYTCHK 0, 1 and 3), WRITE SAME (10, 16; UNMAP, NDOB), COMPARE AND WRITE, ORWRITE (16),
//! PRE-FETCH (10, 16), SYNCHRONIZE CACHE (10, 16), READ DEFECT DATA (10, 12), MODE SENSE
//! and MODE SELECT (6, 10) with the Caching (08h) and Control (0Ah) pages, UNMAP and GET LBA
//! STATUS (thin provisioning), RESERVE and RELEASE (6, 10) per I_T nexus, PERSISTENT
//! RESERVE IN and OUT (see [`crate::pr`]), REPORT LUNS, REPORT SUPPORTED OPERATION CODES,
//! START STOP UNIT. Anything else is CHECK CONDITION, ILLEGAL REQUEST, INVALID COMMAND
//! OPERATION CODE (20h/00h); an LBA range past the end (64-bit wrap included) is LOGICAL
//! BLOCK ADDRESS OUT OF RANGE (21h/00h); a reserved or unsupported field is INVALID FIELD
//! IN CDB (24h/00h). A unit attention pending for a nexus (a persistent reservation another
//! nexus changed, a reset) is reported before its next command but INQUIRY and REPORT
//! LUNS, or as the data of its REQUEST SENSE.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use crate::pr::{Access, Refusal, Reservations};

/// SCSI status GOOD.
pub const GOOD: u8 = 0x00;
/// SCSI status CHECK CONDITION.
pub const CHECK_CONDITION: u8 = 0x02;
/// SCSI status RESERVATION CONFLICT.
pub const RESERVATION_CONFLICT: u8 = 0x18;

/// The I_T nexus a command comes from, as reservations and unit attentions know it: the
/// initiator port, named as SPC-4's iSCSI TransportID names it (`InitiatorName,i,0xISID`),
/// or [`Nexus::LOCAL`]. (One target port, so the initiator port is the whole nexus.)
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Nexus(Option<Arc<str>>);

impl Nexus {
    /// The nexus of [`Disk::execute`]: a caller on the target's own host (flushing at exit,
    /// a test), not an initiator.
    pub const LOCAL: Nexus = Nexus(None);

    /// The nexus of the iSCSI initiator port `initiator` (its iSCSI name) with session
    /// identifier `isid`.
    pub fn iscsi(initiator: &str, isid: [u8; 6]) -> Nexus {
        let hex: String = isid.iter().map(|b| format!("{b:02x}")).collect();
        Nexus(Some(format!("{initiator},i,0x{hex}").into()))
    }

    /// The initiator port's name; `None` for [`Nexus::LOCAL`].
    pub fn port_name(&self) -> Option<&str> {
        self.0.as_deref()
    }
}

/// Most unit attentions kept for one nexus; older ones give way (SPC-4 §5.14 lets a
/// device server report only the latest).
const ATTENTIONS_KEPT: usize = 8;

/// Sense keys.
pub mod key {
    /// NO SENSE.
    pub const NO_SENSE: u8 = 0x0;
    /// MEDIUM ERROR.
    pub const MEDIUM_ERROR: u8 = 0x3;
    /// ILLEGAL REQUEST.
    pub const ILLEGAL_REQUEST: u8 = 0x5;
    /// DATA PROTECT.
    pub const DATA_PROTECT: u8 = 0x7;
    /// UNIT ATTENTION.
    pub const UNIT_ATTENTION: u8 = 0x6;
    /// ABORTED COMMAND.
    pub const ABORTED_COMMAND: u8 = 0xb;
    /// MISCOMPARE.
    pub const MISCOMPARE: u8 = 0xe;
}

/// Sense data: key, additional sense code and qualifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    /// Sense key.
    pub key: u8,
    /// Additional sense code.
    pub asc: u8,
    /// Additional sense code qualifier.
    pub ascq: u8,
    /// The field in error, for ILLEGAL REQUEST (SPC-4 §4.5.2.4.2, the sense-key specific
    /// field pointer).
    pub field: Option<FieldPointer>,
    /// The INFORMATION field (SPC-4 §4.5.2.2, §4.5.3): for a COMPARE AND WRITE miscompare,
    /// the offset of the first byte that differed.
    pub information: Option<u32>,
}

/// Where an invalid field is: in the CDB or in the parameter list, at `byte`, and at
/// `bit` (0..=7) of it if given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldPointer {
    /// In the CDB (C/D = 1), else in the parameter list.
    pub in_cdb: bool,
    /// Byte of the field (its most significant byte).
    pub byte: u16,
    /// Bit of the field (its most significant bit), if the field is not the whole byte.
    pub bit: Option<u8>,
}

impl FieldPointer {
    /// The three bytes of the sense-key specific field (SKSV set).
    fn bytes(&self) -> [u8; 3] {
        let bpv = self.bit.map_or(0, |b| 0x08 | (b & 0x07));
        let [hi, lo] = self.byte.to_be_bytes();
        [0x80 | u8::from(self.in_cdb) << 6 | bpv, hi, lo]
    }
}

impl Sense {
    /// NO SENSE: nothing to report.
    pub const NO_SENSE: Sense = Sense {
        key: key::NO_SENSE,
        asc: 0,
        ascq: 0,
        field: None,
        information: None,
    };
    /// INVALID COMMAND OPERATION CODE.
    pub const INVALID_OPCODE: Sense = Sense::illegal(0x20, 0x00);
    /// LOGICAL BLOCK ADDRESS OUT OF RANGE.
    pub const LBA_OUT_OF_RANGE: Sense = Sense::illegal(0x21, 0x00);
    /// INVALID FIELD IN CDB.
    pub const INVALID_FIELD_IN_CDB: Sense = Sense::illegal(0x24, 0x00);
    /// INVALID FIELD IN PARAMETER LIST.
    pub const INVALID_FIELD_IN_PARAMETER_LIST: Sense = Sense::illegal(0x26, 0x00);
    /// PARAMETER LIST LENGTH ERROR.
    pub const PARAMETER_LIST_LENGTH_ERROR: Sense = Sense::illegal(0x1a, 0x00);
    /// LOGICAL UNIT NOT SUPPORTED.
    pub const LUN_NOT_SUPPORTED: Sense = Sense::illegal(0x25, 0x00);
    /// ABORTED COMMAND, DATA PHASE ERROR.
    pub const DATA_PHASE_ERROR: Sense = Sense {
        key: key::ABORTED_COMMAND,
        asc: 0x4b,
        ascq: 0x00,
        ..Sense::NO_SENSE
    };
    /// ABORTED COMMAND, PROTOCOL SERVICE CRC ERROR: the command's data arrived with a bad
    /// data digest and, at ERL 0, is not recovered (RFC 7143 §7.8, §11.4.7.2).
    pub const PROTOCOL_CRC_ERROR: Sense = Sense {
        key: key::ABORTED_COMMAND,
        asc: 0x47,
        ascq: 0x05,
        ..Sense::NO_SENSE
    };
    /// ABORTED COMMAND, LOGICAL UNIT COMMUNICATION FAILURE (08h/00h): a cluster member
    /// holding part of the command's blocks did not answer in time (proxy I/O).
    pub const MEMBER_UNREACHABLE: Sense = Sense {
        key: key::ABORTED_COMMAND,
        asc: 0x08,
        ascq: 0x00,
        ..Sense::NO_SENSE
    };
    /// MISCOMPARE DURING VERIFY OPERATION.
    pub const MISCOMPARE: Sense = Sense {
        key: key::MISCOMPARE,
        asc: 0x1d,
        ascq: 0x00,
        ..Sense::NO_SENSE
    };
    /// UNIT ATTENTION, BUS DEVICE RESET FUNCTION OCCURRED (29h/03h): after a LOGICAL
    /// UNIT RESET.
    pub const LUN_RESET_OCCURRED: Sense = Sense::attention(0x29, 0x03);
    /// UNIT ATTENTION, POWER ON, RESET, OR BUS DEVICE RESET OCCURRED (29h/00h): after a
    /// TARGET WARM RESET.
    pub const RESET_OCCURRED: Sense = Sense::attention(0x29, 0x00);
    /// MEDIUM ERROR, WRITE ERROR (0Ch/00h): the store refused a write or a flush.
    pub const WRITE_ERROR: Sense = Sense {
        key: key::MEDIUM_ERROR,
        asc: 0x0c,
        ascq: 0x00,
        field: None,
        information: None,
    };
    /// MEDIUM ERROR, UNRECOVERED READ ERROR (11h/00h): the store refused a read.
    pub const READ_ERROR: Sense = Sense {
        key: key::MEDIUM_ERROR,
        asc: 0x11,
        ascq: 0x00,
        field: None,
        information: None,
    };
    /// WRITE PROTECTED.
    pub const WRITE_PROTECTED: Sense = Sense {
        key: key::DATA_PROTECT,
        asc: 0x27,
        ascq: 0x00,
        ..Sense::NO_SENSE
    };

    pub(crate) const fn illegal(asc: u8, ascq: u8) -> Sense {
        Sense {
            key: key::ILLEGAL_REQUEST,
            asc,
            ascq,
            field: None,
            information: None,
        }
    }

    pub(crate) const fn attention(asc: u8, ascq: u8) -> Sense {
        Sense {
            key: key::UNIT_ATTENTION,
            asc,
            ascq,
            field: None,
            information: None,
        }
    }

    /// This sense with `field` as the field in error.
    pub const fn at(self, field: FieldPointer) -> Sense {
        Sense {
            field: Some(field),
            ..self
        }
    }

    /// Fixed-format sense data (response code 70h, 18 bytes; VALID with an INFORMATION
    /// field).
    pub fn fixed(&self) -> [u8; 18] {
        let mut s = [0u8; 18];
        s[0] = 0x70;
        if let Some(i) = self.information {
            s[0] |= 0x80;
            s[3..7].copy_from_slice(&i.to_be_bytes());
        }
        s[2] = self.key & 0x0f;
        s[7] = 10;
        s[12] = self.asc;
        s[13] = self.ascq;
        if let Some(f) = self.field {
            s[15..18].copy_from_slice(&f.bytes());
        }
        s
    }

    /// Descriptor-format sense data (response code 72h): the 8-byte header, then an
    /// Information descriptor and a Sense key specific descriptor if there is something
    /// to put in them.
    pub fn descriptor(&self) -> Vec<u8> {
        let mut s = vec![0x72, self.key & 0x0f, self.asc, self.ascq, 0, 0, 0, 0];
        if let Some(i) = self.information {
            s.extend_from_slice(&[0x00, 0x0a, 0x80, 0]);
            s.extend_from_slice(&u64::from(i).to_be_bytes());
        }
        if let Some(f) = self.field {
            s.extend_from_slice(&[0x02, 0x06, 0, 0]);
            s.extend_from_slice(&f.bytes());
            s.push(0);
        }
        s[7] = (s.len() - 8) as u8;
        s
    }

    /// Sense data in descriptor format if `descriptor`, else fixed.
    pub fn bytes(&self, descriptor: bool) -> Vec<u8> {
        if descriptor {
            self.descriptor()
        } else {
            self.fixed().to_vec()
        }
    }

    /// Read sense data another device sent, fixed (70h, 71h) or descriptor (72h, 73h)
    /// format: key, codes, the INFORMATION field (if it fits 32 bits) and an ILLEGAL
    /// REQUEST field pointer, as [`Sense::bytes`] writes them. `None` for anything else
    /// or too short.
    pub fn parse(b: &[u8]) -> Option<Sense> {
        let field = |k: &[u8]| {
            (k[0] & 0x80 != 0).then(|| FieldPointer {
                in_cdb: k[0] & 0x40 != 0,
                byte: u16::from_be_bytes([k[1], k[2]]),
                bit: (k[0] & 0x08 != 0).then_some(k[0] & 0x07),
            })
        };
        match b.first()? & 0x7f {
            0x70 | 0x71 if b.len() >= 14 => Some(Sense {
                key: b[2] & 0x0f,
                asc: b[12],
                ascq: b[13],
                field: b.get(15..18).and_then(field),
                information: (b[0] & 0x80 != 0)
                    .then(|| u32::from_be_bytes([b[3], b[4], b[5], b[6]])),
            }),
            0x72 | 0x73 if b.len() >= 8 => {
                let mut s = Sense {
                    key: b[1] & 0x0f,
                    asc: b[2],
                    ascq: b[3],
                    field: None,
                    information: None,
                };
                let end = (8 + usize::from(b[7])).min(b.len());
                let mut d = &b[8..end];
                while d.len() >= 2 {
                    let n = (2 + usize::from(d[1])).min(d.len());
                    match d[0] {
                        0x00 if n >= 12 => {
                            let v = u64::from_be_bytes(d[4..12].try_into().expect("8 bytes"));
                            s.information = u32::try_from(v).ok();
                        }
                        0x02 if n >= 7 => s.field = field(&d[4..7]),
                        _ => {}
                    }
                    d = &d[n..];
                }
                Some(s)
            }
            _ => None,
        }
    }
}

/// Ranges of blocks, `[start, end)`, disjoint and merged: the deallocated (unmapped) blocks
/// of a thin-provisioned disk. Memory grows with the number of separate ranges (which the
/// disk caps), never with the disk's size.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Extents(std::collections::BTreeMap<u64, u64>);

impl Extents {
    /// Take `[start, end)` out of the set.
    pub fn remove(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        // The ranges that overlap [start, end): the one before start (if it reaches into it)
        // and those starting inside it.
        let mut hit: Vec<(u64, u64)> = Vec::new();
        if let Some((&s, &e)) = self.0.range(..start).next_back() {
            if e > start {
                hit.push((s, e));
            }
        }
        hit.extend(self.0.range(start..end).map(|(&s, &e)| (s, e)));
        for (s, e) in hit {
            self.0.remove(&s);
            if s < start {
                self.0.insert(s, start);
            }
            if e > end {
                self.0.insert(end, e);
            }
        }
    }

    /// Add `[start, end)` to the set, merging with its neighbours.
    pub fn insert(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        self.remove(start, end);
        let (mut s, mut e) = (start, end);
        if let Some((&ps, &pe)) = self.0.range(..s).next_back() {
            if pe == s {
                self.0.remove(&ps);
                s = ps;
            }
        }
        if let Some(&ne) = self.0.get(&e) {
            self.0.remove(&e);
            e = ne;
        }
        self.0.insert(s, e);
    }

    /// Whether `lba` is in the set, and where the run it belongs to (in or out) ends,
    /// before `limit`.
    pub fn run_at(&self, lba: u64, limit: u64) -> (bool, u64) {
        if let Some((_, &e)) = self.0.range(..=lba).next_back() {
            if e > lba {
                return (true, e.min(limit));
            }
        }
        let next = self.0.range(lba..).next().map_or(limit, |(&s, _)| s);
        (false, next.min(limit))
    }

    /// Forget ranges (the last ones) until at most `max` are held.
    pub fn cap(&mut self, max: usize) {
        while self.0.len() > max {
            self.0.pop_last();
        }
    }

    /// Separate ranges held.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether no block is in the set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Most separate unmapped ranges a disk records (about 48 bytes each).
const MAX_UNMAPPED_RANGES: usize = 1 << 20;

/// Most descriptors one UNMAP takes, and most blocks (the Block Limits page says so).
const MAX_UNMAP_DESCRIPTORS: u32 = 256;
const MAX_UNMAP_BLOCKS: u32 = 1 << 20;

/// Where a disk's blocks live. Offsets and lengths in bytes, always within [`len`].
///
/// [`len`]: BlockStore::len
pub trait BlockStore: Send {
    /// Capacity, bytes.
    fn len(&self) -> u64;
    /// Whether the capacity is zero.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Fill `buf` from byte `offset`.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), String>;
    /// Write `data` at byte `offset`.
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), String>;
    /// Make every completed write durable.
    fn flush(&mut self) -> Result<(), String>;
}

/// A disk in memory.
#[derive(Debug, Clone)]
pub struct MemStore(Vec<u8>);

impl MemStore {
    /// `len` bytes of zeros.
    pub fn new(len: usize) -> Self {
        MemStore(vec![0; len])
    }
}

impl BlockStore for MemStore {
    fn len(&self) -> u64 {
        self.0.len() as u64
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        let o = offset as usize;
        buf.copy_from_slice(&self.0[o..o + buf.len()]);
        Ok(())
    }
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), String> {
        let o = offset as usize;
        self.0[o..o + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn flush(&mut self) -> Result<(), String> {
        Ok(())
    }
}

/// What a command did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// SCSI status.
    pub status: u8,
    /// Data for the initiator (READ, INQUIRY, ...); already cut to the allocation length.
    pub data_in: Vec<u8>,
    /// Sense data with CHECK CONDITION.
    pub sense: Option<Sense>,
}

impl Outcome {
    /// GOOD with `data_in`.
    pub fn good(data_in: Vec<u8>) -> Self {
        Outcome {
            status: GOOD,
            data_in,
            sense: None,
        }
    }
    /// CHECK CONDITION with sense `s`.
    pub fn check(s: Sense) -> Self {
        Outcome {
            status: CHECK_CONDITION,
            data_in: Vec::new(),
            sense: Some(s),
        }
    }

    /// RESERVATION CONFLICT.
    pub fn conflict() -> Self {
        Outcome {
            status: RESERVATION_CONFLICT,
            data_in: Vec::new(),
            sense: None,
        }
    }
}

impl From<Refusal> for Outcome {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::Conflict => Outcome::conflict(),
            Refusal::Check(s) => Outcome::check(s),
        }
    }
}

/// The direction and length of a command's data, read from its CDB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transfer {
    /// No data.
    None,
    /// Data to the initiator, at most this many bytes.
    In(u64),
    /// Data from the initiator, this many bytes.
    Out(u64),
}

/// The blocks a READ or WRITE moves, as [`Disk::admit_rw`] admitted them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RwRange {
    /// A WRITE (otherwise a READ).
    pub write: bool,
    /// First block.
    pub lba: u64,
    /// Blocks (0: none moves).
    pub blocks: u64,
    /// Force Unit Access: the write is durable before it completes.
    pub fua: bool,
}

/// A disk logical unit.
pub struct Disk {
    store: Box<dyn BlockStore>,
    block: u32,
    serial: String,
    /// Write protection (the Control page's SWP bit).
    swp: bool,
    /// Descriptor-format sense (the Control page's D_SENSE bit).
    d_sense: bool,
    /// Most blocks one READ or WRITE may move (reported in VPD B0h).
    max_transfer_blocks: u32,
    /// The nexus holding the RESERVE(6)/(10) reservation, if any (SPC-2 §7.21).
    reserved_by: Option<Nexus>,
    /// Persistent reservations (PERSISTENT RESERVE OUT).
    pr: Reservations,
    /// Unit attentions not yet reported, per nexus, oldest first; at most
    /// [`ATTENTIONS_KEPT`] each, and only for nexuses that are connected or registered
    /// (so bounded by the sessions and [`crate::pr::MAX_REGISTRATIONS`]).
    attentions: HashMap<Nexus, VecDeque<Sense>>,
    /// The nexuses connected now ([`Disk::nexus_joined`], [`Disk::nexus_lost`]): a reset
    /// is reported to each.
    live: HashSet<Nexus>,
    /// Deallocated blocks (thin provisioning: UNMAP, WRITE SAME with UNMAP; they read as
    /// zeros, LBPRZ). Every block starts mapped.
    unmapped: Extents,
}

impl std::fmt::Debug for Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Disk")
            .field("bytes", &self.store.len())
            .field("block", &self.block)
            .finish()
    }
}

fn be16(b: &[u8], at: usize) -> u64 {
    u64::from(u16::from_be_bytes([b[at], b[at + 1]]))
}
fn be32(b: &[u8], at: usize) -> u64 {
    u64::from(u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]))
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The commands this disk serves, as REPORT SUPPORTED OPERATION CODES lists them:
/// (operation code, service action if the code has several, CDB usage data). The usage data
/// is the CDB with a 1 in every bit the disk looks at (SPC-4 §6.35.3); byte 0 is the
/// operation code. DPO and FUA (byte 1, 0x18) are in the usage of READ and WRITE, as the
/// DPOFUA bit of MODE SENSE says.
#[rustfmt::skip]
const SUPPORTED_OPCODES: &[(u8, Option<u16>, &[u8])] = &[
    (0x00, None, &[0x00, 0, 0, 0, 0, 0x00]),
    (0x03, None, &[0x03, 0x01, 0, 0, 0xff, 0x00]),
    (0x08, None, &[0x08, 0x1f, 0xff, 0xff, 0xff, 0x00]),
    (0x0a, None, &[0x0a, 0x1f, 0xff, 0xff, 0xff, 0x00]),
    (0x12, None, &[0x12, 0x01, 0xff, 0xff, 0xff, 0x00]),
    (0x15, None, &[0x15, 0x11, 0, 0, 0xff, 0x00]),
    (0x16, None, &[0x16, 0, 0, 0, 0, 0x00]),
    (0x17, None, &[0x17, 0, 0, 0, 0, 0x00]),
    (0x1a, None, &[0x1a, 0x08, 0xff, 0xff, 0xff, 0x00]),
    (0x1b, None, &[0x1b, 0x01, 0, 0x0f, 0xf7, 0x00]),
    (0x25, None, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0x00]),
    (0x28, None, &[0x28, 0x18, 0xff, 0xff, 0xff, 0xff, 0, 0xff, 0xff, 0x00]),
    (0x2a, None, &[0x2a, 0x18, 0xff, 0xff, 0xff, 0xff, 0, 0xff, 0xff, 0x00]),
    (0x2e, None, &[0x2e, 0x12, 0xff, 0xff, 0xff, 0xff, 0, 0xff, 0xff, 0x00]),
    (0x2f, None, &[0x2f, 0x16, 0xff, 0xff, 0xff, 0xff, 0, 0xff, 0xff, 0x00]),
    (0x34, None, &[0x34, 0x02, 0xff, 0xff, 0xff, 0xff, 0, 0xff, 0xff, 0x00]),
    (0x35, None, &[0x35, 0x02, 0xff, 0xff, 0xff, 0xff, 0, 0xff, 0xff, 0x00]),
    (0x37, None, &[0x37, 0, 0x1f, 0, 0, 0, 0, 0xff, 0xff, 0x00]),
    (0x41, None, &[0x41, 0x08, 0xff, 0xff, 0xff, 0xff, 0, 0xff, 0xff, 0x00]),
    (0x42, None, &[0x42, 0x00, 0, 0, 0, 0, 0, 0xff, 0xff, 0x00]),
    (0x55, None, &[0x55, 0x11, 0, 0, 0, 0, 0, 0xff, 0xff, 0x00]),
    (0x56, None, &[0x56, 0, 0, 0, 0, 0, 0, 0, 0, 0x00]),
    (0x57, None, &[0x57, 0, 0, 0, 0, 0, 0, 0, 0, 0x00]),
    (0x5a, None, &[0x5a, 0x18, 0xff, 0xff, 0, 0, 0, 0xff, 0xff, 0x00]),
    (0x5e, Some(0), &[0x5e, 0x00, 0, 0, 0, 0, 0, 0xff, 0xff, 0x00]),
    (0x5e, Some(1), &[0x5e, 0x01, 0, 0, 0, 0, 0, 0xff, 0xff, 0x00]),
    (0x5e, Some(2), &[0x5e, 0x02, 0, 0, 0, 0, 0, 0xff, 0xff, 0x00]),
    (0x5e, Some(3), &[0x5e, 0x03, 0, 0, 0, 0, 0, 0xff, 0xff, 0x00]),
    (0x5f, Some(0), &[0x5f, 0x00, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x00]),
    (0x5f, Some(1), &[0x5f, 0x01, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x00]),
    (0x5f, Some(2), &[0x5f, 0x02, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x00]),
    (0x5f, Some(3), &[0x5f, 0x03, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x00]),
    (0x5f, Some(4), &[0x5f, 0x04, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x00]),
    (0x5f, Some(5), &[0x5f, 0x05, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x00]),
    (0x5f, Some(6), &[0x5f, 0x06, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x00]),
    (0x88, None, &[0x88, 0x18, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0x00]),
    (0x89, None, &[0x89, 0x18, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0xff, 0, 0x00]),
    (0x8a, None, &[0x8a, 0x18, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0x00]),
    (0x8b, None, &[0x8b, 0x18, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0x00]),
    (0x8e, None, &[0x8e, 0x12, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0x00]),
    (0x8f, None, &[0x8f, 0x16, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0x00]),
    (0x90, None, &[0x90, 0x02, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0x00]),
    (0x91, None, &[0x91, 0x02, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0x00]),
    (0x93, None, &[0x93, 0x09, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0x00]),
    (0x9e, Some(0x12), &[0x9e, 0x12, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0x00]),
    (0x9e, Some(0x10), &[0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0x00]),
    (0xa0, None, &[0xa0, 0, 0xff, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0x00]),
    (0xa3, Some(0x0c), &[0xa3, 0x0c, 0x87, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0x00]),
    (0xa8, None, &[0xa8, 0x18, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0x00]),
    (0xaa, None, &[0xaa, 0x18, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0x00]),
    (0xae, None, &[0xae, 0x12, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0x00]),
    (0xaf, None, &[0xaf, 0x16, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0x00]),
    (0xb7, None, &[0xb7, 0x1f, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0x00]),
];

/// The bits of mode page `page` that MODE SELECT changes (a mask over the page, from its
/// byte 0): the Control page's D_SENSE (byte 2) and SWP (byte 4).
fn changeable(page: u8) -> &'static [u8] {
    match page & 0x3f {
        0x0a => &[0, 0, 0x04, 0, 0x08],
        _ => &[],
    }
}

/// Most blocks one COMPARE AND WRITE takes (the Block Limits page says so).
const MAX_COMPARE_AND_WRITE_BLOCKS: u64 = 255;

/// The command timeouts descriptor (SPC-4 §6.35.4): length 0Ah, no timeouts given.
const TIMEOUTS_DESCRIPTOR: [u8; 12] = [0, 0x0a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

/// The REPORTING OPTIONS field of REPORT SUPPORTED OPERATION CODES (byte 2, bits 2-0).
const REPORTING_OPTIONS: FieldPointer = FieldPointer {
    in_cdb: true,
    byte: 2,
    bit: Some(2),
};

/// REPORT SUPPORTED OPERATION CODES (MAINTENANCE IN, service action 0Ch; SPC-4 §6.35):
/// every command (reporting options 000b), or one, by operation code (001b; an error for a
/// code with service actions) or by code and service action (010b; an error for a code
/// without). RCTD adds a timeouts descriptor to each.
fn report_supported_opcodes(cdb: &[u8]) -> Outcome {
    let rctd = cdb[2] & 0x80 != 0;
    let (op, sa) = (cdb[3], u16::from_be_bytes([cdb[4], cdb[5]]));
    let mut d = Vec::new();
    match cdb[2] & 0x07 {
        0 => {
            d.extend_from_slice(&[0; 4]);
            for &(code, action, usage) in SUPPORTED_OPCODES {
                let flags = u8::from(rctd) << 1 | u8::from(action.is_some());
                d.extend_from_slice(&[code, 0]);
                d.extend_from_slice(&action.unwrap_or(0).to_be_bytes());
                d.extend_from_slice(&[0, flags]);
                d.extend_from_slice(&(usage.len() as u16).to_be_bytes());
                if rctd {
                    d.extend_from_slice(&TIMEOUTS_DESCRIPTOR);
                }
            }
            let n = (d.len() - 4) as u32;
            d[..4].copy_from_slice(&n.to_be_bytes());
        }
        opt @ (1 | 2) => {
            let by_action = opt == 2;
            let listed = SUPPORTED_OPCODES
                .iter()
                .find(|(code, action, _)| *code == op && (!by_action || *action == Some(sa)));
            // The code must be asked for the way it is listed: with a service action if and
            // only if it has them.
            let has_actions = SUPPORTED_OPCODES
                .iter()
                .any(|(code, action, _)| *code == op && action.is_some());
            let known = SUPPORTED_OPCODES.iter().any(|(code, _, _)| *code == op);
            if known && has_actions != by_action {
                return Outcome::check(Sense::INVALID_FIELD_IN_CDB.at(REPORTING_OPTIONS));
            }
            match listed {
                Some((_, _, usage)) => {
                    d.extend_from_slice(&[0, u8::from(rctd) << 7 | 0x03]);
                    d.extend_from_slice(&(usage.len() as u16).to_be_bytes());
                    d.extend_from_slice(usage);
                    if rctd {
                        d.extend_from_slice(&TIMEOUTS_DESCRIPTOR);
                    }
                }
                // SUPPORT 001b: not supported.
                None => d.extend_from_slice(&[0, 0x01, 0, 0]),
            }
        }
        _ => return Outcome::check(Sense::INVALID_FIELD_IN_CDB.at(REPORTING_OPTIONS)),
    }
    d.truncate(be32(cdb, 6) as usize);
    Outcome::good(d)
}

/// The length of a CDB of `opcode`'s group, bytes (SPC-4 §4.2.5.1), or `None` for the
/// vendor and reserved groups.
pub fn cdb_len(opcode: u8) -> Option<usize> {
    match opcode >> 5 {
        0 => Some(6),
        1 | 2 => Some(10),
        4 => Some(16),
        5 => Some(12),
        _ => None,
    }
}

impl Disk {
    /// A disk of `store`'s capacity in blocks of `block` bytes (512 or 4096), with `serial`.
    pub fn new(store: Box<dyn BlockStore>, block: u32, serial: &str) -> Self {
        Disk {
            store,
            block,
            serial: serial.into(),
            swp: false,
            d_sense: false,
            // 2 MiB: with a command window of 32 a connection holds at most 64 MiB of
            // read data it has produced and not yet sent.
            max_transfer_blocks: (2 << 20) / block,
            reserved_by: None,
            pr: Reservations::default(),
            attentions: HashMap::new(),
            live: HashSet::new(),
            unmapped: Extents::default(),
        }
    }

    /// Blocks on the disk.
    pub fn blocks(&self) -> u64 {
        self.store.len() / u64::from(self.block)
    }

    /// Block size, bytes.
    pub fn block_size(&self) -> u32 {
        self.block
    }

    /// Whether sense data goes out in descriptor format.
    pub fn descriptor_sense(&self) -> bool {
        self.d_sense
    }

    /// The data a command moves, from its CDB (for the session: how much Data-Out to
    /// collect). Commands the disk does not know move nothing.
    pub fn transfer(&self, cdb: &[u8]) -> Transfer {
        let b = u64::from(self.block);
        let Some(&op) = cdb.first() else {
            return Transfer::None;
        };
        if cdb.len() < cdb_len(op).unwrap_or(usize::MAX) {
            return Transfer::None;
        }
        match op {
            0x08 => Transfer::In(six_len(cdb) * b),
            0x28 => Transfer::In(be16(cdb, 7) * b),
            0xa8 => Transfer::In(be32(cdb, 6) * b),
            0x88 => Transfer::In(be32(cdb, 10) * b),
            0x0a => Transfer::Out(six_len(cdb) * b),
            0x2a | 0x2e => Transfer::Out(be16(cdb, 7) * b),
            0xaa | 0xae => Transfer::Out(be32(cdb, 6) * b),
            0x8a | 0x8e | 0x8b => Transfer::Out(be32(cdb, 10) * b),
            0x12 | 0x1a | 0x03 => Transfer::In(if op == 0x12 {
                be16(cdb, 3)
            } else {
                u64::from(cdb[4])
            }),
            0x5a => Transfer::In(be16(cdb, 7)),
            0x15 => Transfer::Out(u64::from(cdb[4])),
            0x55 => Transfer::Out(be16(cdb, 7)),
            0x25 => Transfer::In(8),
            0x9e => Transfer::In(be32(cdb, 10)),
            0x42 => Transfer::Out(be16(cdb, 7)),
            // WRITE SAME: one block of Data-Out (none with NDOB)
            0x41 => Transfer::Out(b),
            0x93 if cdb[1] & 0x01 == 0 => Transfer::Out(b),
            // COMPARE AND WRITE: the blocks to compare, then the blocks to write
            0x89 => Transfer::Out(2 * u64::from(cdb[13]) * b),
            // VERIFY with BYTCHK 1 compares every block with Data-Out, with 3 one block
            0x2f | 0xaf | 0x8f => match (cdb[1] >> 1) & 3 {
                1 => Transfer::Out(verify_range(cdb).1 * b),
                3 => Transfer::Out(b),
                _ => Transfer::None,
            },
            0xa0 => Transfer::In(be32(cdb, 6)),
            0x5e => Transfer::In(be16(cdb, 7)),
            0x37 => Transfer::In(be16(cdb, 7)),
            0xb7 => Transfer::In(be32(cdb, 6)),
            0x5f => Transfer::Out(be32(cdb, 5)),
            0xa3 if cdb[1] & 0x1f == 0x0c => Transfer::In(be32(cdb, 6)),
            _ => Transfer::None,
        }
    }

    /// Execute `cdb` on LUN 0 for the local caller ([`Nexus::LOCAL`]); see
    /// [`Disk::execute_as`].
    pub fn execute(&mut self, cdb: &[u8], data_out: &[u8]) -> Outcome {
        self.execute_as(&Nexus::LOCAL, cdb, data_out)
    }

    /// The checks every command passes before it runs (see [`Disk::execute_as`]): a CDB
    /// of its opcode's length, a pending unit attention of `nexus`, the reservations.
    /// Returns the opcode, or the outcome the command ends with instead.
    fn gate(&mut self, nexus: &Nexus, cdb: &[u8]) -> Result<u8, Outcome> {
        let Some(&op) = cdb.first() else {
            return Err(Outcome::check(Sense::INVALID_OPCODE));
        };
        match cdb_len(op) {
            Some(n) if cdb.len() >= n => {}
            _ => return Err(Outcome::check(Sense::INVALID_OPCODE)),
        }
        if !matches!(op, 0x12 | 0xa0) {
            if let Some(s) = self.take_attention(nexus) {
                return Err(if op == 0x03 {
                    self.request_sense(cdb, s)
                } else {
                    Outcome::check(s)
                });
            }
        }
        let conflict = self.reserved_by.as_ref().is_some_and(|h| h != nexus)
            && !matches!(op, 0x12 | 0xa0 | 0x03 | 0xa3 | 0x17 | 0x57);
        let reserve_or_release = matches!(op, 0x16 | 0x17 | 0x56 | 0x57);
        if conflict
            || self.pr.conflicts(nexus, access(op, cdb))
            || (reserve_or_release && self.pr.any_registered())
        {
            return Err(Outcome::conflict());
        }
        Ok(op)
    }

    /// A READ, WRITE (6, 10, 12 or 16) or WRITE AND VERIFY (10, 12, 16; a write that is
    /// durable before it completes, as [`Disk::execute_as`] runs it) of `nexus` admitted
    /// without touching the medium,
    /// for a caller that moves the blocks itself (the primary of a cluster, whose blocks
    /// live on other members): `Ok(Some(range))` once it passed every check
    /// [`Disk::execute_as`] would make (unit attention, reservations, protection field,
    /// LBA range, transfer limit, write protection); `Err(outcome)` with the outcome it
    /// gets instead; `Ok(None)`, with nothing checked or consumed, for any other command.
    pub fn admit_rw(&mut self, nexus: &Nexus, cdb: &[u8]) -> Result<Option<RwRange>, Outcome> {
        let write = match cdb.first() {
            Some(0x08 | 0x28 | 0xa8 | 0x88) => false,
            Some(0x0a | 0x2a | 0xaa | 0x8a | 0x2e | 0xae | 0x8e) => true,
            _ => return Ok(None),
        };
        let op = self.gate(nexus, cdb)?;
        if op != 0x08 && op != 0x0a && cdb[1] & 0xe0 != 0 {
            return Err(Outcome::check(Sense::INVALID_FIELD_IN_CDB));
        }
        let (lba, blocks) = rw_range(cdb);
        self.rw_check(lba, blocks, write).map_err(Outcome::check)?;
        let verify = matches!(op, 0x2e | 0xae | 0x8e);
        let fua = verify || (op != 0x08 && op != 0x0a && cdb[1] & 0x08 != 0);
        Ok(Some(RwRange {
            write,
            lba,
            blocks,
            fua,
        }))
    }

    /// Execute `cdb` on LUN 0 for `nexus`, with the Data-Out bytes `data_out` (as many as
    /// [`Disk::transfer`] asked for, or fewer if the initiator sent fewer).
    ///
    /// In order: a unit attention pending for `nexus` is reported (see the module doc);
    /// while another nexus holds a RESERVE reservation, every command but INQUIRY, REPORT
    /// LUNS, REQUEST SENSE, REPORT SUPPORTED OPERATION CODES and RELEASE ends in
    /// RESERVATION CONFLICT; a persistent reservation's type decides which commands of a
    /// nexus without access conflict ([`Reservations::conflicts`]); while any nexus is
    /// registered, RESERVE and RELEASE conflict.
    pub fn execute_as(&mut self, nexus: &Nexus, cdb: &[u8], data_out: &[u8]) -> Outcome {
        let op = match self.gate(nexus, cdb) {
            Ok(op) => op,
            Err(o) => return o,
        };
        match op {
            // RESERVE (6) and (10): the logical unit, for this nexus (again: no change).
            // The 10-byte form's third-party and LONGID fields are not supported.
            0x16 | 0x56 if op == 0x16 || cdb[1] & 0x12 == 0 => {
                self.reserved_by = Some(nexus.clone());
                Outcome::good(Vec::new())
            }
            // RELEASE (6) and (10): the holder's reservation ends; anyone else's release
            // does nothing, successfully.
            0x17 | 0x57 if op == 0x17 || cdb[1] & 0x12 == 0 => {
                if self.reserved_by.as_ref() == Some(nexus) {
                    self.reserved_by = None;
                }
                Outcome::good(Vec::new())
            }
            0x56 | 0x57 => Outcome::check(Sense::INVALID_FIELD_IN_CDB),
            0x5e => match self.pr.read(cdb) {
                Ok(d) => Outcome::good(d),
                Err(r) => r.into(),
            },
            0x5f => match self.pr.out(nexus, cdb, data_out) {
                Ok(attentions) => {
                    for (n, s) in attentions {
                        self.attend(n, s);
                    }
                    Outcome::good(Vec::new())
                }
                Err(r) => r.into(),
            },
            _ => self.run(op, cdb, data_out),
        }
    }

    /// Queue unit attention `s` for `nexus`.
    fn attend(&mut self, nexus: Nexus, s: Sense) {
        let q = self.attentions.entry(nexus).or_default();
        if q.len() == ATTENTIONS_KEPT {
            q.pop_front();
        }
        q.push_back(s);
    }

    /// The oldest unit attention pending for `nexus`, now reported.
    fn take_attention(&mut self, nexus: &Nexus) -> Option<Sense> {
        let q = self.attentions.get_mut(nexus)?;
        let s = q.pop_front();
        if q.is_empty() {
            self.attentions.remove(nexus);
        }
        s
    }

    /// REQUEST SENSE's parameter data: `s` in the format DESC asks for, truncated to the
    /// allocation length.
    fn request_sense(&self, cdb: &[u8], s: Sense) -> Outcome {
        let mut d = s.bytes(cdb[1] & 1 != 0);
        d.truncate(usize::from(cdb[4]));
        Outcome::good(d)
    }

    /// `nexus` is connected (a normal session's login ended): resets are reported to it.
    pub fn nexus_joined(&mut self, nexus: &Nexus) {
        self.live.insert(nexus.clone());
    }

    /// `nexus` is gone (its session logged out or lost its connection: I_T nexus loss):
    /// the RESERVE reservation it held ends and its unit attentions are dropped. Its
    /// persistent registrations and reservation stay.
    pub fn nexus_lost(&mut self, nexus: &Nexus) {
        if self.reserved_by.as_ref() == Some(nexus) {
            self.reserved_by = None;
        }
        self.attentions.remove(nexus);
        self.live.remove(nexus);
    }

    /// A reset (LOGICAL UNIT RESET, TARGET WARM RESET): every RESERVE reservation ends,
    /// persistent reservations stay (SPC-4 §5.13.1), and every connected nexus, the one
    /// that asked included, gets unit attention `why` ([`Sense::LUN_RESET_OCCURRED`] or
    /// [`Sense::RESET_OCCURRED`]).
    pub fn reset(&mut self, why: Sense) {
        self.reserved_by = None;
        let live: Vec<Nexus> = self.live.iter().cloned().collect();
        for n in live {
            self.attend(n, why);
        }
    }

    /// Every command but the reservations'; `cdb` is as long as its group says.
    fn run(&mut self, op: u8, cdb: &[u8], data_out: &[u8]) -> Outcome {
        match op {
            0x00 => Outcome::good(Vec::new()),
            0x03 => self.request_sense(cdb, Sense::NO_SENSE),
            0x12 => self.inquiry(cdb),
            0x25 => {
                let last = self.blocks().saturating_sub(1).min(0xffff_ffff) as u32;
                let mut d = last.to_be_bytes().to_vec();
                d.extend_from_slice(&self.block.to_be_bytes());
                Outcome::good(d)
            }
            0x9e if cdb[1] & 0x1f == 0x10 => {
                let mut d = vec![0u8; 32];
                d[..8].copy_from_slice(&self.blocks().saturating_sub(1).to_be_bytes());
                d[8..12].copy_from_slice(&self.block.to_be_bytes());
                d[14] = 0x80 | 0x40; // LBPME, LBPRZ: thin provisioned, unmapped reads zeros
                d.truncate(be32(cdb, 10) as usize);
                Outcome::good(d)
            }
            0x9e if cdb[1] & 0x1f == 0x12 => self.get_lba_status(cdb),
            // RDPROTECT/WRPROTECT/VRPROTECT (byte 1, bits 7-5) need protection
            // information, which this disk does not have (SBC-3 §5.15).
            0x28 | 0xa8 | 0x88 | 0x2a | 0xaa | 0x8a | 0x2e | 0xae | 0x8e | 0x2f | 0xaf | 0x8f
            | 0x89 | 0x8b
                if cdb[1] & 0xe0 != 0 =>
            {
                Outcome::check(Sense::INVALID_FIELD_IN_CDB)
            }
            0x08 | 0x28 | 0xa8 | 0x88 => {
                let (lba, n) = rw_range(cdb);
                self.read(lba, n)
            }
            0x0a | 0x2a | 0xaa | 0x8a => {
                let (lba, n) = rw_range(cdb);
                self.write(lba, n, data_out, op != 0x0a && cdb[1] & 0x08 != 0)
            }
            // WRITE AND VERIFY: the medium is verified by writing it durably; with BYTCHK
            // the comparison of the medium with the Data-Out is of the same bytes.
            0x2e | 0xae | 0x8e => {
                let (lba, n) = rw_range(cdb);
                self.write(lba, n, data_out, true)
            }
            0x2f | 0xaf | 0x8f => {
                let (lba, n) = verify_range(cdb);
                self.verify(lba, n, (cdb[1] >> 1) & 3, data_out)
            }
            0x35 | 0x91 => {
                let (lba, n) = if op == 0x35 {
                    (be32(cdb, 2), be16(cdb, 7))
                } else {
                    (be64(cdb, 2), be32(cdb, 10))
                };
                if let Err(s) = self.range(lba, n) {
                    return Outcome::check(s);
                }
                self.flush()
            }
            0x1a | 0x5a => self.mode_sense(cdb),
            // READ DEFECT DATA (10) and (12) (SBC-3 §5.10, §5.11): memory and files have no
            // defects: an empty list in the format asked for, PLISTV and GLISTV saying the
            // lists asked for are valid.
            0x37 => {
                let mut d = vec![0, cdb[2] & 0x1f, 0, 0];
                d.truncate(be16(cdb, 7) as usize);
                Outcome::good(d)
            }
            0xb7 => {
                let mut d = vec![0, cdb[1] & 0x1f, 0, 0, 0, 0, 0, 0];
                d.truncate(be32(cdb, 6) as usize);
                Outcome::good(d)
            }
            0x15 | 0x55 => self.mode_select(cdb, data_out),
            // PRE-FETCH (10) and (16): the blocks are in memory (or the page cache)
            // already; only the range is checked.
            0x34 | 0x90 => {
                let (lba, n) = if op == 0x34 {
                    (be32(cdb, 2), be16(cdb, 7))
                } else {
                    (be64(cdb, 2), be32(cdb, 10))
                };
                match self.range(lba, n) {
                    Ok(_) => Outcome::good(Vec::new()),
                    Err(s) => Outcome::check(s),
                }
            }
            0x41 | 0x93 => self.write_same(cdb, data_out),
            0x42 => self.unmap(cdb, data_out),
            // ORWRITE: only BMOP 000b (a plain OR); no ORWgeneration.
            0x8b if cdb[14] & 0x07 != 0 => Outcome::check(Sense::INVALID_FIELD_IN_CDB),
            0x8b => {
                let (lba, n) = rw_range(cdb);
                self.or_write(lba, n, data_out, cdb[1] & 0x08 != 0)
            }
            0x89 => {
                let n = u64::from(cdb[13]);
                self.compare_and_write(be64(cdb, 2), n, data_out, cdb[1] & 0x08 != 0)
            }
            0xa0 => {
                let mut d = vec![0u8; 16];
                d[3] = 8; // one LUN: LUN 0
                d.truncate(be32(cdb, 6) as usize);
                Outcome::good(d)
            }
            0x1b => Outcome::good(Vec::new()),
            0xa3 if cdb[1] & 0x1f == 0x0c => report_supported_opcodes(cdb),
            _ => Outcome::check(Sense::INVALID_OPCODE),
        }
    }

    /// Check `lba` + `n` blocks against the capacity (with 64-bit wrap).
    fn range(&self, lba: u64, n: u64) -> Result<(u64, u64), Sense> {
        match lba.checked_add(n) {
            Some(end) if end <= self.blocks() => Ok((lba, n)),
            _ => Err(Sense::LBA_OUT_OF_RANGE),
        }
    }

    /// WRITE SAME (10) and (16): one block (zeros with NDOB) written to every block of the
    /// range, a count of 0 meaning to the end of the medium. Without logical block
    /// provisioning, UNMAP and ANCHOR are invalid fields.
    fn write_same(&mut self, cdb: &[u8], data: &[u8]) -> Outcome {
        let (lba, n) = if cdb[0] == 0x41 {
            (be32(cdb, 2), be16(cdb, 7))
        } else {
            (be64(cdb, 2), be32(cdb, 10))
        };
        // WRPROTECT needs protection information; ANCHOR is not supported.
        if cdb[1] & 0xe0 != 0 || cdb[1] & 0x10 != 0 {
            return Outcome::check(Sense::INVALID_FIELD_IN_CDB);
        }
        let unmap = cdb[1] & 0x08 != 0;
        if let Err(s) = self.range(lba, n) {
            return Outcome::check(s);
        }
        // A count of 0 writes to the end of the medium (SBC-3 §5.45: WSNZ is 0 in the
        // Block Limits page); a count past MAXIMUM WRITE SAME LENGTH is refused.
        let n = if n == 0 { self.blocks() - lba } else { n };
        if n > u64::from(self.max_transfer_blocks) {
            return Outcome::check(Sense::INVALID_FIELD_IN_CDB);
        }
        if self.swp {
            return Outcome::check(Sense::WRITE_PROTECTED);
        }
        let b = self.block as usize;
        let ndob = cdb[0] == 0x93 && cdb[1] & 0x01 != 0;
        let block = if ndob {
            vec![0u8; b]
        } else if data.len() >= b {
            data[..b].to_vec()
        } else {
            return Outcome::check(Sense::INVALID_FIELD_IN_CDB);
        };
        // UNMAP deallocates the blocks (they read zeros: LBPRZ), whatever the data block
        // (SBC-3 §5.45 lets the device server unmap instead of writing).
        if unmap {
            return self.deallocate(lba, n);
        }
        self.map(lba, n);
        match self.fill(lba, n, &block) {
            Ok(()) => Outcome::good(Vec::new()),
            Err(s) => Outcome::check(s),
        }
    }

    /// Write `block` (one block long) to each of the `n` blocks at `lba` (in range), in
    /// runs of up to 1 MiB.
    fn fill(&mut self, lba: u64, n: u64, block: &[u8]) -> Result<(), Sense> {
        let b = block.len();
        let per = ((1 << 20) / b).max(1);
        let run: Vec<u8> = block.repeat(per.min(n as usize));
        let (mut at, end) = (lba, lba + n);
        while at < end {
            let k = (end - at).min(per as u64) as usize;
            self.store
                .write_at(at * b as u64, &run[..k * b])
                .map_err(|_| Sense::WRITE_ERROR)?;
            at += k as u64;
        }
        Ok(())
    }

    /// VERIFY: the range is checked; with BYTCHK 1 the blocks are compared with `data`,
    /// with 3 each block with `data`'s one block (MISCOMPARE 1Dh/00h on a difference).
    fn verify(&mut self, lba: u64, n: u64, bytchk: u8, data: &[u8]) -> Outcome {
        if let Err(s) = self.range(lba, n) {
            return Outcome::check(s);
        }
        if bytchk == 2 {
            return Outcome::check(Sense::INVALID_FIELD_IN_CDB);
        }
        if bytchk == 0 || n == 0 {
            return Outcome::good(Vec::new());
        }
        if n > u64::from(self.max_transfer_blocks) {
            return Outcome::check(Sense::INVALID_FIELD_IN_CDB);
        }
        let b = self.block as usize;
        let want = if bytchk == 1 { n as usize * b } else { b };
        if data.len() < want {
            return Outcome::check(Sense::INVALID_FIELD_IN_CDB);
        }
        let medium = self.read(lba, n);
        if medium.status != GOOD {
            return medium;
        }
        let same = if bytchk == 1 {
            medium.data_in[..] == data[..want]
        } else {
            medium.data_in.chunks(b).all(|blk| blk == &data[..b])
        };
        if same {
            Outcome::good(Vec::new())
        } else {
            Outcome::check(Sense::MISCOMPARE)
        }
    }

    /// `n` blocks at `lba` are written: mapped again. A write inside an unmapped range
    /// splits it; past MAX_UNMAPPED_RANGES the last ranges are forgotten (they report as
    /// mapped, and read zeros as they are).
    fn map(&mut self, lba: u64, n: u64) {
        self.unmapped.remove(lba, lba + n);
        self.unmapped.cap(MAX_UNMAPPED_RANGES);
    }

    /// Deallocate `n` blocks at `lba` (in range): they are zeroed in the store, since
    /// unmapped blocks read as zeros (LBPRZ), and recorded as unmapped.
    fn deallocate(&mut self, lba: u64, n: u64) -> Outcome {
        if let Err(s) = self.fill(lba, n, &vec![0u8; self.block as usize]) {
            return Outcome::check(s);
        }
        // Bounded memory: past MAX_UNMAPPED_RANGES separate ranges (a peer unmapping every
        // other block) the last ones are forgotten and report as mapped: the data (zeroed)
        // is right either way, the provisioning status conservative.
        self.unmapped.insert(lba, lba + n);
        self.unmapped.cap(MAX_UNMAPPED_RANGES);
        Outcome::good(Vec::new())
    }

    /// UNMAP (SBC-3 §5.28): every block descriptor (LBA, count) of the parameter list is
    /// checked first, then deallocated. ANCHOR is not supported.
    fn unmap(&mut self, cdb: &[u8], data: &[u8]) -> Outcome {
        if cdb[1] & 0x01 != 0 {
            return Outcome::check(Sense::INVALID_FIELD_IN_CDB);
        }
        let param_len = (be16(cdb, 7) as usize).min(data.len());
        if param_len == 0 {
            return Outcome::good(Vec::new());
        }
        if param_len < 8 {
            return Outcome::check(Sense::PARAMETER_LIST_LENGTH_ERROR);
        }
        let descriptors = (be16(data, 2) as usize).min(param_len - 8) / 16;
        if descriptors > MAX_UNMAP_DESCRIPTORS as usize {
            return Outcome::check(Sense::INVALID_FIELD_IN_PARAMETER_LIST);
        }
        let list: Vec<(u64, u64)> = data[8..8 + descriptors * 16]
            .chunks(16)
            .map(|d| (be64(d, 0), be32(d, 8)))
            .collect();
        for &(lba, n) in &list {
            if n > u64::from(MAX_UNMAP_BLOCKS) {
                return Outcome::check(Sense::INVALID_FIELD_IN_PARAMETER_LIST);
            }
            if let Err(s) = self.range(lba, n) {
                return Outcome::check(s);
            }
        }
        if self.swp {
            return Outcome::check(Sense::WRITE_PROTECTED);
        }
        for (lba, n) in list {
            let o = self.deallocate(lba, n);
            if o.status != GOOD {
                return o;
            }
        }
        Outcome::good(Vec::new())
    }

    /// GET LBA STATUS (SBC-3 §5.6): from the LBA asked for, the runs of mapped (0) and
    /// deallocated (1) blocks, as many as the allocation length holds (up to 64).
    fn get_lba_status(&self, cdb: &[u8]) -> Outcome {
        let lba = be64(cdb, 2);
        let alloc = be32(cdb, 10) as usize;
        let blocks = self.blocks();
        if lba >= blocks {
            return Outcome::check(Sense::LBA_OUT_OF_RANGE);
        }
        let want = (alloc.saturating_sub(8) / 16).clamp(1, 64);
        let mut d = vec![0u8; 8];
        let mut at = lba;
        while at < blocks && (d.len() - 8) / 16 < want {
            let (unmapped, end) = self.unmapped.run_at(at, blocks);
            let n = (end - at).min(u64::from(u32::MAX));
            d.extend_from_slice(&at.to_be_bytes());
            d.extend_from_slice(&(n as u32).to_be_bytes());
            d.extend_from_slice(&[u8::from(unmapped), 0, 0, 0]);
            at += n;
        }
        let len = (d.len() - 4) as u32;
        d[..4].copy_from_slice(&len.to_be_bytes());
        d.truncate(alloc);
        Outcome::good(d)
    }

    /// COMPARE AND WRITE (SBC-3 §5.2): `data` holds `n` blocks to compare with the medium at
    /// `lba`, then `n` blocks to write there if they all matched; on a difference nothing is
    /// written and the command ends with MISCOMPARE (1Dh/00h). Atomic: the disk is one
    /// caller's at a time.
    fn compare_and_write(&mut self, lba: u64, n: u64, data: &[u8], fua: bool) -> Outcome {
        if let Err(s) = self.range(lba, n) {
            return Outcome::check(s);
        }
        // Data-Out of any other size than the CDB's blocks twice is refused: a count of
        // 256 blocks, which the one-byte field cannot hold, reads as 0 with 256 blocks' data.
        let b = self.block as usize;
        if n > MAX_COMPARE_AND_WRITE_BLOCKS || data.len() != 2 * n as usize * b {
            return Outcome::check(Sense::INVALID_FIELD_IN_CDB);
        }
        if n == 0 {
            return Outcome::good(Vec::new());
        }
        let medium = self.read(lba, n);
        if medium.status != GOOD {
            return medium;
        }
        let (verify, write) = data.split_at(n as usize * b);
        if let Some(at) = medium.data_in.iter().zip(verify).position(|(m, v)| m != v) {
            return Outcome::check(Sense {
                information: Some(at as u32),
                ..Sense::MISCOMPARE
            });
        }
        self.write(lba, n, write, fua)
    }

    /// ORWRITE (16) (SBC-3 §5.7, the simple form without a BMOP change generation): each
    /// byte of the `n` blocks at `lba` becomes its OR with `data`'s.
    fn or_write(&mut self, lba: u64, n: u64, data: &[u8], fua: bool) -> Outcome {
        let medium = self.read(lba, n);
        if medium.status != GOOD || n == 0 {
            return medium;
        }
        let mut new = medium.data_in;
        for (m, d) in new.iter_mut().zip(data) {
            *m |= d;
        }
        self.write(lba, n, &new, fua)
    }

    /// The checks of a READ or WRITE of `n` blocks from `lba`: within the medium, within
    /// the transfer limit, and for a write, not write-protected.
    fn rw_check(&self, lba: u64, n: u64, write: bool) -> Result<(), Sense> {
        self.range(lba, n)?;
        if n > u64::from(self.max_transfer_blocks) {
            return Err(Sense::INVALID_FIELD_IN_CDB);
        }
        if write && self.swp {
            return Err(Sense::WRITE_PROTECTED);
        }
        Ok(())
    }

    fn read(&mut self, lba: u64, n: u64) -> Outcome {
        if let Err(s) = self.rw_check(lba, n, false) {
            return Outcome::check(s);
        }
        let b = u64::from(self.block);
        let mut d = vec![0u8; (n * b) as usize];
        match self.store.read_at(lba * b, &mut d) {
            Ok(()) => Outcome::good(d),
            Err(_) => Outcome::check(Sense::READ_ERROR),
        }
    }

    fn write(&mut self, lba: u64, n: u64, data: &[u8], fua: bool) -> Outcome {
        if let Err(s) = self.rw_check(lba, n, true) {
            return Outcome::check(s);
        }
        let b = u64::from(self.block);
        // Fewer bytes than the CDB asks for: write the whole blocks that came.
        let len = ((data.len() as u64).min(n * b) / b * b) as usize;
        self.map(lba, len as u64 / b);
        if self.store.write_at(lba * b, &data[..len]).is_err() {
            return Outcome::check(Sense::WRITE_ERROR);
        }
        if fua {
            return self.flush();
        }
        Outcome::good(Vec::new())
    }

    fn flush(&mut self) -> Outcome {
        match self.store.flush() {
            Ok(()) => Outcome::good(Vec::new()),
            Err(_) => Outcome::check(Sense::WRITE_ERROR),
        }
    }

    fn inquiry(&self, cdb: &[u8]) -> Outcome {
        let alloc = be16(cdb, 3) as usize;
        let evpd = cdb[1] & 1 != 0;
        let page = cdb[2];
        let mut d = if !evpd {
            if page != 0 {
                return Outcome::check(Sense::INVALID_FIELD_IN_CDB);
            }
            let mut d = vec![0u8; 66];
            d[0] = 0x00; // connected direct-access block device
            d[2] = 0x06; // SPC-4
            d[3] = 0x12; // HiSup, response data format 2
            d[4] = (d.len() - 5) as u8;
            d[7] = 0x02; // CmdQue
            d[8..16].copy_from_slice(b"TOEMU   ");
            d[16..32].copy_from_slice(b"VIRTUAL DISK    ");
            d[32..36].copy_from_slice(b"0001");
            // Version descriptors: SAM-5, iSCSI, SPC-4, SBC-3.
            for (i, v) in [0x00a0u16, 0x0960, 0x0460, 0x04c0].iter().enumerate() {
                d[58 + 2 * i..60 + 2 * i].copy_from_slice(&v.to_be_bytes());
            }
            d
        } else {
            match page {
                0x00 => vec![0x00, 0x00, 0x00, 6, 0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2],
                0x80 => {
                    let mut d = vec![0x00, 0x80, 0x00, self.serial.len() as u8];
                    d.extend_from_slice(self.serial.as_bytes());
                    d
                }
                0x83 => {
                    // T10 vendor ID designator (ASCII) and an NAA 6 designator (binary),
                    // both naming the logical unit.
                    let mut t10 = b"TOEMU   ".to_vec();
                    t10.extend_from_slice(self.serial.as_bytes());
                    let mut naa = [0u8; 16];
                    naa[0] = 0x60; // NAA 6, then an IEEE company ID of 0 (none)
                    let h = crate::wire::crc32c(&[self.serial.as_bytes()]).to_be_bytes();
                    naa[8..12].copy_from_slice(&h);
                    let mut body = vec![0x02, 0x01, 0x00, t10.len() as u8];
                    body.extend_from_slice(&t10);
                    body.extend_from_slice(&[0x01, 0x03, 0x00, 16]);
                    body.extend_from_slice(&naa);
                    let mut d = vec![0x00, 0x83];
                    d.extend_from_slice(&(body.len() as u16).to_be_bytes());
                    d.extend_from_slice(&body);
                    d
                }
                0xb0 => {
                    let mut d = vec![0u8; 64];
                    d[1] = 0xb0;
                    d[3] = 0x3c;
                    d[5] = MAX_COMPARE_AND_WRITE_BLOCKS as u8;
                    d[8..12].copy_from_slice(&self.max_transfer_blocks.to_be_bytes());
                    d[12..16].copy_from_slice(&(self.max_transfer_blocks / 8).to_be_bytes());
                    d[20..24].copy_from_slice(&MAX_UNMAP_BLOCKS.to_be_bytes());
                    d[24..28].copy_from_slice(&MAX_UNMAP_DESCRIPTORS.to_be_bytes());
                    d[28..32].copy_from_slice(&1u32.to_be_bytes()); // optimal granularity
                                                                    // MAXIMUM WRITE SAME LENGTH: as many blocks as one transfer
                    d[36..44].copy_from_slice(&u64::from(self.max_transfer_blocks).to_be_bytes());
                    d
                }
                // Logical Block Provisioning: UNMAP, WRITE SAME (16) and (10) with UNMAP,
                // unmapped blocks read zeros; thin provisioned.
                0xb2 => vec![
                    0x00,
                    0xb2,
                    0x00,
                    0x04,
                    0x00,
                    0x80 | 0x40 | 0x20 | 0x04,
                    0x02,
                    0x00,
                ],
                0xb1 => {
                    let mut d = vec![0u8; 64];
                    d[1] = 0xb1;
                    d[3] = 0x3c;
                    d[5] = 0x01; // non-rotating medium
                    d
                }
                _ => return Outcome::check(Sense::INVALID_FIELD_IN_CDB),
            }
        };
        d.truncate(alloc);
        Outcome::good(d)
    }

    fn mode_pages(&self, page: u8) -> Option<Vec<u8>> {
        let caching = {
            let mut p = vec![0u8; 20];
            p[0] = 0x08;
            p[1] = 0x12;
            p
        };
        let control = {
            let mut p = vec![0u8; 12];
            p[0] = 0x0a;
            p[1] = 0x0a;
            p[2] = if self.d_sense { 0x04 } else { 0 };
            p[4] = if self.swp { 0x08 } else { 0 };
            p
        };
        match page {
            0x08 => Some(caching),
            0x0a => Some(control),
            0x3f => Some([caching, control].concat()),
            _ => None,
        }
    }

    /// MODE SELECT (6) and (10) (SPC-4 §6.11, §6.12), page format, not saved: the Control
    /// page's SWP and D_SENSE are the fields that change; a page, or any other field, that
    /// differs from what MODE SENSE reports is INVALID FIELD IN PARAMETER LIST, and nothing
    /// changes unless the whole list is valid.
    fn mode_select(&mut self, cdb: &[u8], data: &[u8]) -> Outcome {
        let six = cdb[0] == 0x15;
        if cdb[1] & 0x10 == 0 || cdb[1] & 0x01 != 0 {
            return Outcome::check(Sense::INVALID_FIELD_IN_CDB); // PF = 0, or SP = 1
        }
        let len = if six {
            usize::from(cdb[4])
        } else {
            be16(cdb, 7) as usize
        }
        .min(data.len());
        if len == 0 {
            return Outcome::good(Vec::new());
        }
        let (header, descriptors) = match (six, len) {
            (true, 4..) => (4, usize::from(data[3])),
            (false, 8..) => (8, be16(data, 6) as usize),
            _ => return Outcome::check(Sense::PARAMETER_LIST_LENGTH_ERROR),
        };
        let mut at = header + descriptors;
        if at > len {
            return Outcome::check(Sense::PARAMETER_LIST_LENGTH_ERROR);
        }
        // A block descriptor may only restate the block length.
        for d in data[header..at].chunks(8) {
            let bl = d
                .get(5..8)
                .map_or(0, |b| u32::from_be_bytes([0, b[0], b[1], b[2]]));
            if d.len() != 8 || (bl != 0 && bl != self.block) {
                return Outcome::check(Sense::INVALID_FIELD_IN_PARAMETER_LIST);
            }
        }
        let (mut swp, mut d_sense) = (self.swp, self.d_sense);
        while at < len {
            let code = data[at];
            let Some(&plen) = data.get(at + 1) else {
                return Outcome::check(Sense::PARAMETER_LIST_LENGTH_ERROR);
            };
            let Some(page) = data
                .get(at..at + 2 + usize::from(plen))
                .filter(|_| at + 2 + usize::from(plen) <= len)
            else {
                return Outcome::check(Sense::PARAMETER_LIST_LENGTH_ERROR);
            };
            let current = match code & 0x3f {
                0x08 | 0x0a if code & 0x40 == 0 => self.mode_pages(code & 0x3f),
                _ => None,
            };
            let Some(current) = current.filter(|c| c.len() == page.len()) else {
                return Outcome::check(Sense::INVALID_FIELD_IN_PARAMETER_LIST);
            };
            let mask = changeable(code & 0x3f);
            let fixed_ok = page
                .iter()
                .zip(&current)
                .enumerate()
                .skip(2)
                .all(|(k, (n, c))| {
                    let m = mask.get(k).copied().unwrap_or(0);
                    n & !m == c & !m
                });
            if !fixed_ok {
                return Outcome::check(Sense::INVALID_FIELD_IN_PARAMETER_LIST);
            }
            if code & 0x3f == 0x0a {
                d_sense = page[2] & 0x04 != 0;
                swp = page[4] & 0x08 != 0;
            }
            at += page.len();
        }
        self.swp = swp;
        self.d_sense = d_sense;
        Outcome::good(Vec::new())
    }

    fn mode_sense(&self, cdb: &[u8]) -> Outcome {
        let six = cdb[0] == 0x1a;
        let dbd = cdb[1] & 0x08 != 0;
        let (pc, page) = (cdb[2] >> 6, cdb[2] & 0x3f);
        if cdb[3] != 0 && cdb[3] != 0xff {
            return Outcome::check(Sense::INVALID_FIELD_IN_CDB); // subpages
        }
        if pc == 3 {
            // saved values are not supported (SPC-4: SAVING PARAMETERS NOT SUPPORTED)
            return Outcome::check(Sense::illegal(0x39, 0x00));
        }
        let Some(mut pages) = self.mode_pages(page) else {
            return Outcome::check(Sense::INVALID_FIELD_IN_CDB);
        };
        if pc == 1 {
            // Changeable values: the bits MODE SELECT takes; each page keeps its code and
            // length.
            let mut at = 0;
            while at + 2 <= pages.len() {
                let len = usize::from(pages[at + 1]);
                let mask = changeable(pages[at]);
                for (k, b) in pages[at + 2..at + 2 + len].iter_mut().enumerate() {
                    *b = mask.get(k + 2).copied().unwrap_or(0);
                }
                at += 2 + len;
            }
        }
        let blocks = self.blocks();
        let dsp = if self.swp { 0x90 } else { 0x10 }; // DPOFUA, WP
        let alloc;
        let mut d = if six {
            alloc = usize::from(cdb[4]);
            let mut h = vec![0u8, 0, dsp, 0];
            if !dbd {
                h[3] = 8;
                let n = blocks.min(0xff_ffff) as u32;
                h.extend_from_slice(&[0, (n >> 16) as u8, (n >> 8) as u8, n as u8, 0]);
                h.extend_from_slice(&self.block.to_be_bytes()[1..]);
            }
            h
        } else {
            alloc = be16(cdb, 7) as usize;
            let mut h = vec![0u8, 0, 0, dsp, 0, 0, 0, 0];
            if !dbd {
                h[7] = 8;
                let n = blocks.min(0xffff_ffff) as u32;
                h.extend_from_slice(&n.to_be_bytes());
                h.extend_from_slice(&[0]);
                h.extend_from_slice(&self.block.to_be_bytes()[1..]);
            }
            h
        };
        d.extend_from_slice(&pages);
        if six {
            d[0] = (d.len() - 1) as u8;
        } else {
            let n = (d.len() - 2) as u16;
            d[..2].copy_from_slice(&n.to_be_bytes());
        }
        d.truncate(alloc);
        Outcome::good(d)
    }
}

/// What `op` (with `cdb`) does, for a persistent reservation's access rules (SPC-4
/// Table 63, SBC-3 Table 13): INQUIRY, REPORT LUNS, REQUEST SENSE, TEST UNIT READY, READ
/// CAPACITY, the MAINTENANCE IN reports and PERSISTENT RESERVE IN and OUT (which have rules
/// of their own) are always allowed; READ, VERIFY, MODE SENSE, PRE-FETCH and GET LBA STATUS
/// read; the rest writes.
fn access(op: u8, cdb: &[u8]) -> Access {
    match op {
        0x00 | 0x03 | 0x12 | 0x25 | 0x5e | 0x5f | 0xa0 | 0xa3 => Access::Always,
        0x9e if cdb[1] & 0x1f == 0x10 => Access::Always,
        0x08 | 0x28 | 0xa8 | 0x88 | 0x2f | 0xaf | 0x8f | 0x1a | 0x5a | 0x34 | 0x90 | 0x9e
        | 0x37 | 0xb7 => Access::Read,
        _ => Access::Write,
    }
}

fn six_len(cdb: &[u8]) -> u64 {
    // READ(6)/WRITE(6): a length of 0 means 256 blocks
    match cdb[4] {
        0 => 256,
        n => u64::from(n),
    }
}

/// LBA and block count of a VERIFY (10), (12) or (16) CDB.
fn verify_range(cdb: &[u8]) -> (u64, u64) {
    match cdb[0] {
        0x2f => (be32(cdb, 2), be16(cdb, 7)),
        0xaf => (be32(cdb, 2), be32(cdb, 6)),
        _ => (be64(cdb, 2), be32(cdb, 10)),
    }
}

/// LBA and block count of a READ, WRITE or WRITE AND VERIFY CDB.
fn rw_range(cdb: &[u8]) -> (u64, u64) {
    match cdb[0] {
        0x08 | 0x0a => (u64::from(cdb[1] & 0x1f) << 16 | be16(cdb, 2), six_len(cdb)),
        0x28 | 0x2a | 0x2e => (be32(cdb, 2), be16(cdb, 7)),
        0xa8 | 0xaa | 0xae => (be32(cdb, 2), be32(cdb, 6)),
        _ => (be64(cdb, 2), be32(cdb, 10)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sense_data_reads_back_in_both_formats() {
        let s = Sense {
            field: Some(FieldPointer {
                in_cdb: true,
                byte: 1,
                bit: Some(5),
            }),
            information: Some(77),
            ..Sense::INVALID_FIELD_IN_CDB
        };
        for d in [false, true] {
            assert_eq!(Sense::parse(&s.bytes(d)), Some(s), "descriptor {d}");
        }
        assert_eq!(
            Sense::parse(&Sense::LBA_OUT_OF_RANGE.bytes(true)),
            Some(Sense::LBA_OUT_OF_RANGE)
        );
        assert_eq!(Sense::parse(&[0x70, 0, 5]), None, "too short");
        assert_eq!(Sense::parse(&[0x00; 18]), None, "not sense data");
        // A descriptor whose length runs past the end is not read past it.
        assert!(Sense::parse(&[0x72, 5, 0x24, 0, 0, 0, 0, 9, 0x02, 0x20]).is_some());
    }

    fn nexus(name: &str) -> Nexus {
        Nexus::iscsi(name, [0x80, 0, 0, 0, 0, 1])
    }

    fn disk() -> Disk {
        Disk::new(Box::new(MemStore::new(1 << 20)), 512, "TOEMU0001")
    }

    fn cdb10(op: u8, lba: u32, n: u16) -> [u8; 10] {
        let mut c = [0u8; 10];
        c[0] = op;
        c[2..6].copy_from_slice(&lba.to_be_bytes());
        c[7..9].copy_from_slice(&n.to_be_bytes());
        c
    }

    fn cdb16(op: u8, lba: u64, n: u32) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[0] = op;
        c[2..10].copy_from_slice(&lba.to_be_bytes());
        c[10..14].copy_from_slice(&n.to_be_bytes());
        c
    }

    fn rsoc(rctd: bool, options: u8, op: u8, sa: u16) -> Outcome {
        let mut c = [0u8; 12];
        c[0] = 0xa3;
        c[1] = 0x0c;
        c[2] = u8::from(rctd) << 7 | options;
        c[3] = op;
        c[4..6].copy_from_slice(&sa.to_be_bytes());
        c[6..10].copy_from_slice(&65_535u32.to_be_bytes());
        disk().execute(&c, &[])
    }

    /// REPORT SUPPORTED OPERATION CODES lists every command the disk executes, and only
    /// those: each listed one runs (no INVALID COMMAND OPERATION CODE), each one-command
    /// answer starts its usage data with the code, and codes are asked for with a service
    /// action exactly when they have them.
    #[test]
    fn report_supported_opcodes_lists_what_the_disk_executes() {
        for rctd in [false, true] {
            let all = rsoc(rctd, 0, 0, 0);
            assert_eq!(all.status, GOOD);
            let d = &all.data_in;
            let len = u32::from_be_bytes(d[..4].try_into().unwrap()) as usize;
            assert_eq!(len + 4, d.len());
            let step = if rctd { 20 } else { 8 };
            assert_eq!(len, SUPPORTED_OPCODES.len() * step);
            for (k, desc) in d[4..].chunks(step).enumerate() {
                let (op, sa, flags) = (desc[0], u16::from_be_bytes([desc[2], desc[3]]), desc[5]);
                assert_eq!(flags & 0x02 != 0, rctd, "CTDP of {op:#x}");
                if rctd {
                    assert_eq!(&desc[8..10], &[0, 0x0a], "timeouts descriptor length");
                }
                let servactv = flags & 0x01 != 0;
                assert!(
                    servactv || sa == 0,
                    "{op:#x}: a service action without SERVACTV"
                );
                let (code, action, usage) = SUPPORTED_OPCODES[k];
                assert_eq!((op, action.is_some()), (code, servactv));
                let cdb_len = u16::from_be_bytes([desc[6], desc[7]]) as usize;
                assert_eq!(Some(cdb_len), super::cdb_len(op), "{op:#x}");
                assert_eq!(usage.len(), cdb_len);
                // asked the way it is listed: its usage data; the other way: an error
                let (right, wrong) = if servactv { (2, 1) } else { (1, 2) };
                let one = rsoc(false, right, op, sa);
                assert_eq!(one.status, GOOD, "{op:#x}");
                assert_eq!(one.data_in[1] & 0x07, 0x03, "{op:#x}: supported");
                assert_eq!(&one.data_in[4..], usage);
                assert_eq!(one.data_in[4], op);
                assert_eq!(
                    rsoc(false, wrong, op, sa).sense,
                    Some(Sense::INVALID_FIELD_IN_CDB.at(REPORTING_OPTIONS))
                );
                // and the disk executes it (whatever else it thinks of an all-zero CDB)
                let mut c = vec![0u8; cdb_len];
                c[0] = op;
                if servactv {
                    c[1] = sa as u8;
                }
                let r = disk().execute(&c, &[0u8; 512]);
                assert_ne!(
                    r.sense,
                    Some(Sense::INVALID_OPCODE),
                    "{op:#x} listed, not executed"
                );
            }
        }
        // READ(10) and WRITE(10) take DPO and FUA, as MODE SENSE's DPOFUA says.
        for op in [0x28, 0x2a, 0x88, 0x8a, 0xa8, 0xaa] {
            assert_eq!(rsoc(false, 1, op, 0).data_in[5] & 0x18, 0x18, "{op:#x}");
        }
        // A code the disk does not know: SUPPORT 001b.
        assert_eq!(rsoc(false, 1, 0x44, 0).data_in, [0, 0x01, 0, 0]);
        // The field in error is pointed at (libiscsi reads INVALID FIELD IN CDB without a
        // pointer, or pointing at byte 1, as "not implemented"): SKSV, C/D, BPV, bit 2 of
        // byte 2.
        let pointed = Sense::INVALID_FIELD_IN_CDB.at(REPORTING_OPTIONS);
        assert_eq!(&pointed.fixed()[15..], &[0xca, 0, 2]);
        assert_eq!(&pointed.descriptor()[8..], &[2, 6, 0, 0, 0xca, 0, 2, 0]);
        assert_eq!(
            rsoc(false, 5, 0, 0).sense,
            Some(Sense::INVALID_FIELD_IN_CDB.at(REPORTING_OPTIONS))
        );
    }

    /// RESERVE(6) holds the logical unit for one nexus: another gets RESERVATION CONFLICT
    /// for everything but the commands SPC-2 allows (INQUIRY, REPORT LUNS, ...), its RELEASE
    /// does nothing; the holder's RELEASE, its loss, or a reset end the reservation.
    #[test]
    fn a_reservation_holds_the_unit_for_one_nexus() {
        let mut d = disk();
        let (a, b) = (nexus("iqn.a"), nexus("iqn.b"));
        let reserve = [0x16, 0, 0, 0, 0, 0];
        let release = [0x17, 0, 0, 0, 0, 0];
        let sense6 = [0x1a, 0, 0x3f, 0, 255, 0];
        let inquiry = [0x12, 0, 0, 0, 96, 0];
        assert_eq!(d.execute_as(&a, &reserve, &[]).status, GOOD);
        assert_eq!(
            d.execute_as(&a, &reserve, &[]).status,
            GOOD,
            "again: no change"
        );
        assert_eq!(d.execute_as(&b, &reserve, &[]).status, RESERVATION_CONFLICT);
        assert_eq!(d.execute_as(&b, &sense6, &[]).status, RESERVATION_CONFLICT);
        assert_eq!(
            d.execute_as(&b, &cdb10(0x28, 0, 1), &[]).status,
            RESERVATION_CONFLICT
        );
        assert_eq!(d.execute_as(&b, &inquiry, &[]).status, GOOD);
        assert_eq!(d.execute_as(&b, &release, &[]).status, GOOD);
        assert_eq!(
            d.execute_as(&b, &sense6, &[]).status,
            RESERVATION_CONFLICT,
            "still A's"
        );
        assert_eq!(d.execute_as(&a, &sense6, &[]).status, GOOD);
        assert_eq!(d.execute_as(&a, &release, &[]).status, GOOD);
        assert_eq!(d.execute_as(&b, &reserve, &[]).status, GOOD);
        d.nexus_lost(&b);
        assert_eq!(d.execute_as(&a, &reserve, &[]).status, GOOD);
        d.nexus_joined(&b);
        d.reset(Sense::LUN_RESET_OCCURRED);
        let told = d.execute_as(&b, &sense6, &[]);
        assert_eq!(
            told.sense,
            Some(Sense::LUN_RESET_OCCURRED),
            "b is told once"
        );
        assert_eq!(d.execute_as(&b, &sense6, &[]).status, GOOD);
        assert_eq!(
            d.execute_as(&a, &sense6, &[]).status,
            GOOD,
            "a was not connected"
        );
        // RESERVE(10)'s third-party form is not supported
        let third_party = [0x56, 0x10, 0, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(
            d.execute_as(&a, &third_party, &[]).sense,
            Some(Sense::INVALID_FIELD_IN_CDB)
        );
    }

    #[test]
    fn extents_split_and_merge() {
        let mut e = Extents::default();
        e.insert(10, 20);
        e.insert(20, 30);
        assert_eq!(e.len(), 1, "adjacent ranges merge");
        e.insert(5, 12);
        assert_eq!(e.run_at(5, 100), (true, 30));
        e.remove(15, 16);
        assert_eq!(e.len(), 2);
        assert_eq!(e.run_at(14, 100), (true, 15));
        assert_eq!(e.run_at(15, 100), (false, 16));
        assert_eq!(e.run_at(16, 100), (true, 30));
        assert_eq!(e.run_at(30, 100), (false, 100));
        assert_eq!(e.run_at(0, 100), (false, 5));
        e.remove(0, 100);
        assert!(e.is_empty());
        e.insert(3, 3);
        assert!(e.is_empty(), "an empty range adds nothing");
        for k in 0..10 {
            e.insert(2 * k, 2 * k + 1);
        }
        e.cap(4);
        assert_eq!(e.len(), 4, "capped: the last ranges are forgotten");
        assert_eq!(e.run_at(6, 100), (true, 7));
        assert_eq!(e.run_at(8, 100), (false, 100));
    }

    fn unmap_list(list: &[(u64, u32)]) -> (Vec<u8>, [u8; 10]) {
        let mut p = vec![0u8; 8];
        for &(lba, n) in list {
            p.extend_from_slice(&lba.to_be_bytes());
            p.extend_from_slice(&n.to_be_bytes());
            p.extend_from_slice(&[0; 4]);
        }
        let bd = (p.len() - 8) as u16;
        let data_len = p.len() as u16 - 2;
        p[0..2].copy_from_slice(&data_len.to_be_bytes());
        p[2..4].copy_from_slice(&bd.to_be_bytes());
        let mut c = [0u8; 10];
        c[0] = 0x42;
        c[7..9].copy_from_slice(&(p.len() as u16).to_be_bytes());
        (p, c)
    }

    fn lba_status(d: &mut Disk, lba: u64) -> Vec<(u64, u32, u8)> {
        let mut c = [0u8; 16];
        c[0] = 0x9e;
        c[1] = 0x12;
        c[2..10].copy_from_slice(&lba.to_be_bytes());
        c[10..14].copy_from_slice(&1024u32.to_be_bytes());
        let r = d.execute(&c, &[]);
        assert_eq!(r.status, GOOD);
        r.data_in[8..]
            .chunks(16)
            .map(|x| (be64(x, 0), be32(x, 8) as u32, x[12]))
            .collect()
    }

    /// Thin provisioning: UNMAP and WRITE SAME with UNMAP deallocate (the blocks read as
    /// zeros), GET LBA STATUS reports the runs, a write maps blocks again; every descriptor
    /// is checked before any block is unmapped.
    #[test]
    fn unmapped_blocks_read_zeros_until_written() {
        let mut d = disk();
        assert_eq!(d.execute(&cdb10(0x2a, 0, 16), &[b'a'; 8192]).status, GOOD);
        let (p, c) = unmap_list(&[(2, 3), (10, 1)]);
        assert_eq!(d.transfer(&c), Transfer::Out(p.len() as u64));
        assert_eq!(d.execute(&c, &p).status, GOOD);
        let back = d.execute(&cdb10(0x28, 0, 16), &[]).data_in;
        for (blk, chunk) in back.chunks(512).enumerate() {
            let zero = (2..5).contains(&blk) || blk == 10;
            assert!(
                chunk.iter().all(|&x| x == if zero { 0 } else { b'a' }),
                "block {blk}"
            );
        }
        let blocks = d.blocks();
        assert_eq!(
            lba_status(&mut d, 0)[..5],
            [
                (0, 2, 0),
                (2, 3, 1),
                (5, 5, 0),
                (10, 1, 1),
                (11, blocks as u32 - 11, 0)
            ]
        );
        // a write maps a block again
        assert_eq!(d.execute(&cdb10(0x2a, 3, 1), &[b'b'; 512]).status, GOOD);
        assert_eq!(
            lba_status(&mut d, 2)[..3],
            [(2, 1, 1), (3, 1, 0), (4, 1, 1)]
        );
        // WRITE SAME(16) with UNMAP and a zero block deallocates
        let mut ws = cdb16(0x93, 20, 4);
        ws[1] = 0x08;
        assert_eq!(d.execute(&ws, &[0; 512]).status, GOOD);
        assert_eq!(lba_status(&mut d, 20)[0], (20, 4, 1));
        // one descriptor out of range: nothing is unmapped
        let (p, c) = unmap_list(&[(30, 1), (blocks, 1)]);
        assert_eq!(d.execute(&c, &p).sense, Some(Sense::LBA_OUT_OF_RANGE));
        assert_eq!(lba_status(&mut d, 30)[0].2, 0);
        // zero blocks, even at the end; an empty list
        let (p, c) = unmap_list(&[(blocks, 0)]);
        assert_eq!(d.execute(&c, &p).status, GOOD);
        let (p, c) = unmap_list(&[]);
        assert_eq!(d.execute(&c, &p).status, GOOD);
        // READ CAPACITY(16) says so: LBPME, LBPRZ
        let mut rc = [0u8; 16];
        rc[0] = 0x9e;
        rc[1] = 0x10;
        rc[13] = 32;
        assert_eq!(d.execute(&rc, &[]).data_in[14], 0xc0);
    }

    /// MODE SELECT turns SWP (and D_SENSE) on and off through the Control page, refuses a
    /// change to any other field, and MODE SENSE's changeable values say which bits move.
    #[test]
    fn mode_select_sets_software_write_protect() {
        let mut d = disk();
        let sense = |d: &mut Disk, pc: u8| {
            d.execute(&[0x1a, 0x08, pc << 6 | 0x0a, 0, 255, 0], &[])
                .data_in
        };
        let changeable = sense(&mut d, 1);
        assert_eq!(
            &changeable[4..],
            &[0x0a, 0x0a, 0x04, 0, 0x08, 0, 0, 0, 0, 0, 0, 0]
        );
        let mut page = sense(&mut d, 0)[4..].to_vec();
        page[4] |= 0x08; // SWP
        let list = [vec![0, 0, 0, 0], page.clone()].concat();
        let select = [0x15, 0x10, 0, 0, list.len() as u8, 0];
        assert_eq!(d.transfer(&select), Transfer::Out(list.len() as u64));
        assert_eq!(d.execute(&select, &list).status, GOOD);
        assert_eq!(
            d.execute(&cdb10(0x2a, 0, 1), &[1; 512]).sense,
            Some(Sense::WRITE_PROTECTED)
        );
        assert_eq!(sense(&mut d, 0)[2] & 0x80, 0x80, "WP in the header");
        // a field that does not change: refused, and SWP stays
        let mut bad = list.clone();
        bad[4 + 3] = 0x10;
        bad[4 + 4] &= !0x08;
        assert_eq!(
            d.execute(&select, &bad).sense,
            Some(Sense::INVALID_FIELD_IN_PARAMETER_LIST)
        );
        assert_eq!(
            d.execute(&cdb10(0x2a, 0, 1), &[1; 512]).sense,
            Some(Sense::WRITE_PROTECTED)
        );
        // SWP off again (MODE SELECT (10))
        page[4] &= !0x08;
        let list10 = [vec![0; 8], page].concat();
        let mut select10 = [0u8; 10];
        select10[0] = 0x55;
        select10[1] = 0x10;
        select10[8] = list10.len() as u8;
        assert_eq!(d.execute(&select10, &list10).status, GOOD);
        assert_eq!(d.execute(&cdb10(0x2a, 0, 1), &[1; 512]).status, GOOD);
        // saved pages (SP) are not supported
        assert_eq!(
            d.execute(&[0x15, 0x11, 0, 0, 0, 0], &[]).sense,
            Some(Sense::INVALID_FIELD_IN_CDB)
        );
    }

    /// ORWRITE ORs its data into the medium.
    #[test]
    fn orwrite_ors_into_the_medium() {
        let mut d = disk();
        assert_eq!(d.execute(&cdb10(0x2a, 0, 2), &[0u8; 1024]).status, GOOD);
        assert_eq!(d.transfer(&cdb16(0x8b, 0, 2)), Transfer::Out(1024));
        assert_eq!(d.execute(&cdb16(0x8b, 0, 2), &[0xa5; 1024]).status, GOOD);
        assert_eq!(d.execute(&cdb16(0x8b, 0, 2), &[0x5a; 1024]).status, GOOD);
        assert_eq!(d.execute(&cdb10(0x28, 0, 2), &[]).data_in, vec![0xff; 1024]);
        assert_eq!(
            d.execute(&cdb16(0x8b, 2047, 2), &[0; 1024]).sense,
            Some(Sense::LBA_OUT_OF_RANGE)
        );
        let mut protect = cdb16(0x8b, 0, 1);
        protect[1] = 0x20;
        assert_eq!(
            d.execute(&protect, &[0; 512]).sense,
            Some(Sense::INVALID_FIELD_IN_CDB)
        );
    }

    /// COMPARE AND WRITE writes only when the medium matches, all or nothing.
    #[test]
    fn compare_and_write_writes_only_on_a_match() {
        let mut d = disk();
        let caw = |lba: u64, n: u8| {
            let mut c = cdb16(0x89, lba, 0);
            c[10..14].fill(0);
            c[13] = n;
            c
        };
        let a = vec![b'A'; 1024];
        assert_eq!(d.execute(&cdb10(0x2a, 4, 2), &a).status, GOOD);
        assert_eq!(d.transfer(&caw(4, 2)), Transfer::Out(2048));
        // a difference in the last byte compared: nothing written
        let mut data = [a.clone(), vec![b'B'; 1024]].concat();
        data[1023] = b'C';
        let miscompare = d.execute(&caw(4, 2), &data).sense.expect("sense");
        assert_eq!((miscompare.key, miscompare.asc), (key::MISCOMPARE, 0x1d));
        assert_eq!(
            miscompare.information,
            Some(1023),
            "the first byte that differs"
        );
        assert_eq!(&miscompare.fixed()[..7], &[0xf0, 0, 0x0e, 0, 0, 0x03, 0xff]);
        let desc = miscompare.descriptor();
        assert_eq!(desc[7], 12, "one Information descriptor");
        assert_eq!(&desc[8..12], &[0, 0x0a, 0x80, 0]);
        assert_eq!(be64(&desc, 12), 1023);
        assert_eq!(d.execute(&cdb10(0x28, 4, 2), &[]).data_in, a);
        // a match: the second half is written
        data[1023] = b'A';
        assert_eq!(d.execute(&caw(4, 2), &data).status, GOOD);
        assert_eq!(d.execute(&cdb10(0x28, 4, 2), &[]).data_in, vec![b'B'; 1024]);
        // no blocks: nothing to do; Data-Out of the wrong size, or past the end: refused
        assert_eq!(d.execute(&caw(4, 0), &[]).status, GOOD);
        assert_eq!(
            d.execute(&caw(4, 0), &data).sense,
            Some(Sense::INVALID_FIELD_IN_CDB)
        );
        assert_eq!(
            d.execute(&caw(4, 2), &data[..1024]).sense,
            Some(Sense::INVALID_FIELD_IN_CDB)
        );
        assert_eq!(
            d.execute(&caw(2047, 2), &data).sense,
            Some(Sense::LBA_OUT_OF_RANGE)
        );
    }

    #[test]
    fn writes_read_back_through_every_cdb_size() {
        let mut d = disk();
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
        assert_eq!(d.transfer(&cdb10(0x2a, 8, 8)), Transfer::Out(4096));
        assert_eq!(d.execute(&cdb10(0x2a, 8, 8), &data).status, GOOD);
        assert_eq!(d.execute(&cdb10(0x28, 8, 8), &[]).data_in, data);
        assert_eq!(d.execute(&cdb16(0x88, 8, 8), &[]).data_in, data);
        let mut r12 = [0u8; 12];
        r12[0] = 0xa8;
        r12[2..6].copy_from_slice(&8u32.to_be_bytes());
        r12[6..10].copy_from_slice(&8u32.to_be_bytes());
        assert_eq!(d.execute(&r12, &[]).data_in, data);
        let r6 = [0x08, 0, 0, 8, 8, 0];
        assert_eq!(d.execute(&r6, &[]).data_in, data);
        assert_eq!(d.transfer(&[0x08, 0, 0, 0, 0, 0]), Transfer::In(256 * 512));
        // VERIFY(10) with BYTCHK 1 compares with Data-Out
        let mut v = cdb10(0x2f, 8, 8);
        v[1] = 0x02;
        assert_eq!(d.transfer(&v), Transfer::Out(4096));
        assert_eq!(d.execute(&v, &data).status, GOOD);
        let mut wrong = data.clone();
        wrong[100] ^= 1;
        assert_eq!(d.execute(&v, &wrong).sense, Some(Sense::MISCOMPARE));
        // WRITE SAME(16): one block over 4, and a count of 0 to the end
        let mut ws = cdb16(0x93, 100, 4);
        assert_eq!(d.transfer(&ws), Transfer::Out(512));
        assert_eq!(d.execute(&ws, &[0xab; 512]).status, GOOD);
        assert_eq!(
            d.execute(&cdb10(0x28, 100, 4), &[]).data_in,
            vec![0xab; 2048]
        );
        ws[10..14].copy_from_slice(&0u32.to_be_bytes());
        ws[2..10].copy_from_slice(&(d.blocks() - 2).to_be_bytes());
        assert_eq!(d.execute(&ws, &[0xcd; 512]).status, GOOD);
        let last = d.blocks() - 2;
        assert_eq!(
            d.execute(&cdb16(0x88, last, 2), &[]).data_in,
            vec![0xcd; 1024]
        );
        ws[1] = 0x10; // ANCHOR: not supported
        assert_eq!(
            d.execute(&ws, &[0; 512]).sense,
            Some(Sense::INVALID_FIELD_IN_CDB)
        );
        // WRITE AND VERIFY(16) writes too
        let back: Vec<u8> = data.iter().map(|b| !b).collect();
        assert_eq!(d.transfer(&cdb16(0x8e, 8, 8)), Transfer::Out(4096));
        assert_eq!(d.execute(&cdb16(0x8e, 8, 8), &back).status, GOOD);
        assert_eq!(d.execute(&cdb10(0x28, 8, 8), &[]).data_in, back);
    }

    #[test]
    fn out_of_range_unknown_and_invalid_fields_get_their_sense() {
        let mut d = disk();
        let blocks = d.blocks();
        assert_eq!(blocks, 2048);
        let r = d.execute(&cdb16(0x88, blocks - 1, 2), &[]);
        assert_eq!(
            (r.status, r.sense),
            (CHECK_CONDITION, Some(Sense::LBA_OUT_OF_RANGE))
        );
        let r = d.execute(&cdb16(0x88, u64::MAX, 2), &[]);
        assert_eq!(r.sense, Some(Sense::LBA_OUT_OF_RANGE), "64-bit wrap");
        assert_eq!(d.execute(&cdb16(0x88, blocks - 1, 1), &[]).status, GOOD);
        let r = d.execute(&[0xc0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]);
        assert_eq!(r.sense, Some(Sense::INVALID_OPCODE));
        let r = d.execute(&[0x12, 0, 0x80, 0, 36, 0], &[]);
        assert_eq!(
            r.sense,
            Some(Sense::INVALID_FIELD_IN_CDB),
            "page without EVPD"
        );
        let mut c = cdb10(0x28, 0, 1);
        c[1] = 0x20; // RDPROTECT 1
        assert_eq!(d.execute(&c, &[]).sense, Some(Sense::INVALID_FIELD_IN_CDB));
        assert_eq!(
            Sense::LBA_OUT_OF_RANGE.fixed(),
            [0x70, 0, 5, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x21, 0, 0, 0, 0, 0]
        );
    }

    #[test]
    fn capacity_inquiry_and_mode_pages() {
        let mut d = disk();
        let r = d.execute(&[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]);
        assert_eq!(r.data_in, [0, 0, 0x07, 0xff, 0, 0, 2, 0]);
        let mut c = [0u8; 16];
        c[0] = 0x9e;
        c[1] = 0x10;
        c[13] = 32;
        let r = d.execute(&c, &[]);
        assert_eq!(
            &r.data_in[..12],
            &[0, 0, 0, 0, 0, 0, 0x07, 0xff, 0, 0, 2, 0]
        );
        let r = d.execute(&[0x12, 0, 0, 0, 96, 0], &[]);
        assert_eq!(r.data_in.len(), 66);
        assert_eq!(r.data_in[2], 6, "SPC-4");
        assert_eq!(&r.data_in[8..16], b"TOEMU   ");
        let r = d.execute(&[0x12, 0, 0, 0, 5, 0], &[]);
        assert_eq!(r.data_in.len(), 5, "cut to the allocation length");
        let r = d.execute(&[0x12, 1, 0, 0, 255, 0], &[]);
        assert_eq!(&r.data_in[4..], &[0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2]);
        for page in [0x80u8, 0x83, 0xb0, 0xb1, 0xb2] {
            let r = d.execute(&[0x12, 1, page, 0, 255, 0], &[]);
            assert_eq!((r.status, r.data_in[1]), (GOOD, page));
            let len = u16::from_be_bytes([r.data_in[2], r.data_in[3]]) as usize;
            assert_eq!(r.data_in.len(), len + 4, "page {page:#x} length");
        }
        // MODE SENSE(6), all pages, with a block descriptor
        let r = d.execute(&[0x1a, 0, 0x3f, 0, 255, 0], &[]);
        assert_eq!(r.data_in[0] as usize, r.data_in.len() - 1);
        assert_eq!(r.data_in[3], 8);
        assert_eq!(r.data_in.len(), 4 + 8 + 20 + 12);
        assert_eq!(r.data_in[12], 0x08, "caching page first");
        assert_eq!(r.data_in[32], 0x0a, "then control");
        // MODE SENSE(10), control page, no block descriptor
        let r = d.execute(&[0x5a, 0x08, 0x0a, 0, 0, 0, 0, 0, 255, 0], &[]);
        assert_eq!(r.data_in.len(), 8 + 12);
        assert_eq!(&r.data_in[8..10], &[0x0a, 0x0a]);
        let r = d.execute(&[0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0], &[]);
        assert_eq!(r.data_in, [0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    }

    /// PERSISTENT RESERVE OUT from `n`: service action `sa`, TYPE `kind`, the reservation
    /// key `key` and the service action key `sa_key`.
    fn prout(d: &mut Disk, n: &Nexus, sa: u8, kind: u8, key: u64, sa_key: u64) -> Outcome {
        let cdb = [0x5f, sa, kind, 0, 0, 0, 0, 0, 24, 0];
        let mut p = [0u8; 24];
        p[..8].copy_from_slice(&key.to_be_bytes());
        p[8..16].copy_from_slice(&sa_key.to_be_bytes());
        d.execute_as(n, &cdb, &p)
    }

    /// PERSISTENT RESERVE IN from `n`, service action `sa`, allocation length `alloc`.
    fn prin(d: &mut Disk, n: &Nexus, sa: u8, alloc: u16) -> Outcome {
        let [hi, lo] = alloc.to_be_bytes();
        d.execute_as(n, &[0x5e, sa, 0, 0, 0, 0, 0, hi, lo, 0], &[])
    }

    /// READ KEYS: (PRgeneration, keys).
    fn keys(d: &mut Disk, n: &Nexus) -> (u32, Vec<u64>) {
        let r = prin(d, n, 0, 4096);
        assert_eq!(r.status, GOOD);
        let gen = be32(&r.data_in, 0) as u32;
        assert_eq!(be32(&r.data_in, 4) as usize, r.data_in.len() - 8);
        (gen, r.data_in[8..].chunks(8).map(|k| be64(k, 0)).collect())
    }

    /// READ RESERVATION: (key, type), if reserved.
    fn reservation(d: &mut Disk, n: &Nexus) -> Option<(u64, u8)> {
        let r = prin(d, n, 1, 4096);
        assert_eq!(r.status, GOOD);
        (be32(&r.data_in, 4) == 16).then(|| (be64(&r.data_in, 8), r.data_in[21]))
    }

    const REGISTER: u8 = 0;
    const RESERVE: u8 = 1;
    const RELEASE: u8 = 2;
    const CLEAR: u8 = 3;
    const PREEMPT: u8 = 4;
    const REGISTER_AND_IGNORE: u8 = 6;

    /// REGISTER needs the registered key (0 when unregistered); REGISTER AND IGNORE
    /// EXISTING KEY does not; each success bumps PRgeneration; READ KEYS truncates the list
    /// to the allocation length but not its ADDITIONAL LENGTH.
    #[test]
    fn registrations_follow_the_keys() {
        let mut d = disk();
        let (a, b) = (nexus("iqn.a"), nexus("iqn.b"));
        assert_eq!(keys(&mut d, &a), (0, vec![]));
        assert_eq!(
            prout(&mut d, &a, REGISTER, 0, 7, 0x11).status,
            RESERVATION_CONFLICT
        );
        assert_eq!(prout(&mut d, &a, REGISTER, 0, 0, 0x11).status, GOOD);
        assert_eq!(
            prout(&mut d, &b, REGISTER_AND_IGNORE, 0, 99, 0x22).status,
            GOOD
        );
        assert_eq!(keys(&mut d, &a), (2, vec![0x11, 0x22]));
        // A re-registration must name the key it replaces.
        assert_eq!(
            prout(&mut d, &a, REGISTER, 0, 0, 0x12).status,
            RESERVATION_CONFLICT
        );
        assert_eq!(prout(&mut d, &a, REGISTER, 0, 0x11, 0x12).status, GOOD);
        assert_eq!(prout(&mut d, &b, REGISTER_AND_IGNORE, 0, 0, 0).status, GOOD);
        assert_eq!(keys(&mut d, &b), (4, vec![0x12]));
        let short = prin(&mut d, &a, 0, 8);
        assert_eq!(short.data_in, [0, 0, 0, 4, 0, 0, 0, 8]);
        // Unregistered and asking for nothing: success, no change.
        assert_eq!(prout(&mut d, &b, REGISTER, 0, 0, 0).status, GOOD);
        assert_eq!(keys(&mut d, &a).0, 4);
        // While anyone is registered, RESERVE(6) and RELEASE(6) conflict.
        assert_eq!(
            d.execute_as(&b, &[0x16, 0, 0, 0, 0, 0], &[]).status,
            RESERVATION_CONFLICT
        );
        assert_eq!(prout(&mut d, &a, REGISTER, 0, 0x12, 0).status, GOOD);
        assert_eq!(d.execute_as(&b, &[0x16, 0, 0, 0, 0, 0], &[]).status, GOOD);
    }

    /// Who may read and write under each type, as libiscsi's ProutReserve.Access* tests
    /// expect: (type, registered other reads, writes, unregistered other reads, writes).
    #[test]
    fn each_reservation_type_lets_in_whom_it_should() {
        let table = [
            (3, false, false, false, false),
            (1, true, false, true, false),
            (6, true, true, false, false),
            (5, true, true, true, false),
            (8, true, true, false, false),
            (7, true, true, true, false),
        ];
        let read = cdb10(0x28, 1, 1);
        let write = cdb10(0x2a, 1, 1);
        let block = [0u8; 512];
        for (kind, reg_r, reg_w, unreg_r, unreg_w) in table {
            let mut d = disk();
            let (a, b) = (nexus("iqn.a"), nexus("iqn.b"));
            assert_eq!(
                prout(&mut d, &a, REGISTER_AND_IGNORE, 0, 0, 0xa).status,
                GOOD
            );
            assert_eq!(
                prout(&mut d, &b, REGISTER_AND_IGNORE, 0, 0, 0xb).status,
                GOOD
            );
            assert_eq!(prout(&mut d, &a, RESERVE, kind, 0xa, 0).status, GOOD);
            let key = if kind >= 7 { 0 } else { 0xa };
            assert_eq!(reservation(&mut d, &a), Some((key, kind)));
            assert_eq!(d.execute_as(&a, &read, &[]).status, GOOD);
            assert_eq!(d.execute_as(&a, &write, &block).status, GOOD);
            let ok = |o: Outcome| o.status == GOOD;
            assert_eq!(ok(d.execute_as(&b, &read, &[])), reg_r, "type {kind}");
            assert_eq!(ok(d.execute_as(&b, &write, &block)), reg_w, "type {kind}");
            assert_eq!(prout(&mut d, &b, REGISTER, 0, 0xb, 0).status, GOOD);
            assert_eq!(ok(d.execute_as(&b, &read, &[])), unreg_r, "type {kind}");
            assert_eq!(ok(d.execute_as(&b, &write, &block)), unreg_w, "type {kind}");
            // INQUIRY and TEST UNIT READY are always allowed.
            assert_eq!(d.execute_as(&b, &[0x12, 0, 0, 0, 36, 0], &[]).status, GOOD);
            assert_eq!(d.execute_as(&b, &[0; 6], &[]).status, GOOD);
            // Only a registered nexus may reserve; a holder's release of another type is
            // invalid; its release of the type ends the reservation.
            assert_eq!(
                prout(&mut d, &b, RESERVE, kind, 0, 0).status,
                RESERVATION_CONFLICT
            );
            let other = if kind == 1 { 3 } else { 1 };
            assert_eq!(
                prout(&mut d, &a, RELEASE, other, 0xa, 0).sense,
                Some(crate::pr::INVALID_RELEASE)
            );
            assert_eq!(prout(&mut d, &a, RELEASE, kind, 0xa, 0).status, GOOD);
            assert_eq!(reservation(&mut d, &a), None);
            assert_eq!(d.execute_as(&b, &write, &block).status, GOOD);
        }
    }

    /// The holder's unregistration ends a reservation it alone held (telling the other
    /// registrants of a Registrants Only one); an All Registrants reservation lasts while
    /// anyone is registered.
    #[test]
    fn a_reservation_outlives_its_holder_only_if_all_registrants_hold_it() {
        for (kind, shared) in [
            (1, false),
            (3, false),
            (5, false),
            (6, false),
            (7, true),
            (8, true),
        ] {
            let mut d = disk();
            let (a, b) = (nexus("iqn.a"), nexus("iqn.b"));
            prout(&mut d, &a, REGISTER_AND_IGNORE, 0, 0, 0xa);
            prout(&mut d, &b, REGISTER_AND_IGNORE, 0, 0, 0xb);
            assert_eq!(prout(&mut d, &a, RESERVE, kind, 0xa, 0).status, GOOD);
            assert_eq!(prout(&mut d, &a, REGISTER, 0, 0xa, 0).status, GOOD);
            let tur = [0u8; 6];
            if shared {
                assert_eq!(reservation(&mut d, &a), Some((0, kind)));
                assert_eq!(d.execute_as(&b, &tur, &[]).status, GOOD, "no attention");
                assert_eq!(prout(&mut d, &b, RELEASE, kind, 0xb, 0).status, GOOD);
            } else {
                assert_eq!(reservation(&mut d, &a), None, "type {kind}");
                let told = d.execute_as(&b, &tur, &[]);
                if kind == 5 || kind == 6 {
                    assert_eq!(told.sense, Some(crate::pr::RESERVATIONS_RELEASED));
                } else {
                    assert_eq!(told.status, GOOD, "type {kind}");
                }
            }
            assert_eq!(reservation(&mut d, &b), None);
            assert_eq!(d.execute_as(&b, &tur, &[]).status, GOOD);
        }
    }

    /// PREEMPT removes the registrations of a key (and takes over the reservation when it
    /// is the holder's), with REGISTRATIONS PREEMPTED for the preempted nexus, reported
    /// once; CLEAR removes everything; both bump PRgeneration.
    #[test]
    fn preempt_and_clear_remove_registrations() {
        let mut d = disk();
        let (a, b) = (nexus("iqn.a"), nexus("iqn.b"));
        prout(&mut d, &a, REGISTER_AND_IGNORE, 0, 0, 0xa);
        prout(&mut d, &b, REGISTER_AND_IGNORE, 0, 0, 0xb);
        assert_eq!(prout(&mut d, &a, RESERVE, 3, 0xa, 0).status, GOOD);
        // A key no one has: conflict; key 0 without an All Registrants reservation:
        // invalid.
        assert_eq!(
            prout(&mut d, &b, PREEMPT, 3, 0xb, 0x77).status,
            RESERVATION_CONFLICT
        );
        assert_eq!(
            prout(&mut d, &b, PREEMPT, 3, 0xb, 0).sense,
            Some(Sense::INVALID_FIELD_IN_PARAMETER_LIST)
        );
        let (gen, _) = keys(&mut d, &b);
        assert_eq!(prout(&mut d, &b, PREEMPT, 1, 0xb, 0xa).status, GOOD);
        assert_eq!(keys(&mut d, &b), (gen + 1, vec![0xb]));
        assert_eq!(reservation(&mut d, &b), Some((0xb, 1)));
        let inquiry = [0x12, 0, 0, 0, 36, 0];
        assert_eq!(
            d.execute_as(&a, &inquiry, &[]).status,
            GOOD,
            "INQUIRY first"
        );
        let sense = d.execute_as(&a, &[0x03, 0, 0, 0, 18, 0], &[]);
        assert_eq!(sense.status, GOOD);
        assert_eq!(
            (sense.data_in[2], sense.data_in[12], sense.data_in[13]),
            (key::UNIT_ATTENTION, 0x2a, 0x05)
        );
        assert_eq!(
            d.execute_as(&a, &[0u8; 6], &[]).status,
            GOOD,
            "reported once"
        );
        // A reads (Write Exclusive now) but cannot write.
        assert_eq!(d.execute_as(&a, &cdb10(0x28, 0, 1), &[]).status, GOOD);
        assert_eq!(
            d.execute_as(&a, &cdb10(0x2a, 0, 1), &[0; 512]).status,
            RESERVATION_CONFLICT
        );
        prout(&mut d, &a, REGISTER_AND_IGNORE, 0, 0, 0xa);
        assert_eq!(prout(&mut d, &a, CLEAR, 0, 0xa, 0).status, GOOD);
        assert_eq!(keys(&mut d, &a), (gen + 3, vec![]));
        assert_eq!(reservation(&mut d, &a), None);
        let told = d.execute_as(&b, &[0u8; 6], &[]);
        assert_eq!(told.sense, Some(crate::pr::RESERVATIONS_PREEMPTED));
    }

    /// The parameter list must be 24 bytes; SPEC_I_PT, ALL_TG_PT and APTPL are refused as
    /// REPORT CAPABILITIES says; READ FULL STATUS names each registrant's port; the table
    /// of registrations is bounded.
    #[test]
    fn persistent_reserve_limits_and_reports() {
        let mut d = disk();
        let a = nexus("iqn.a");
        let mut p = [0u8; 24];
        p[15] = 1;
        let short = d.execute_as(&a, &[0x5f, 6, 0, 0, 0, 0, 0, 0, 16, 0], &p[..16]);
        assert_eq!(short.sense, Some(Sense::PARAMETER_LIST_LENGTH_ERROR));
        for flag in [0x01, 0x04, 0x08] {
            p[20] = flag;
            let o = d.execute_as(&a, &[0x5f, 6, 0, 0, 0, 0, 0, 0, 24, 0], &p);
            assert_eq!(o.sense, Some(Sense::INVALID_FIELD_IN_PARAMETER_LIST));
        }
        assert_eq!(
            prout(&mut d, &a, RESERVE, 2, 0, 0).sense,
            Some(Sense::INVALID_FIELD_IN_CDB)
        );
        assert_eq!(
            prin(&mut d, &a, 4, 100).sense,
            Some(Sense::INVALID_FIELD_IN_CDB)
        );
        let caps = prin(&mut d, &a, 2, 100).data_in;
        assert_eq!(caps, [0, 8, 0, 0x80, 0xea, 0x01, 0, 0]);
        prout(&mut d, &a, REGISTER_AND_IGNORE, 0, 0, 0xa);
        prout(&mut d, &a, RESERVE, 3, 0xa, 0);
        let full = prin(&mut d, &a, 3, 4096).data_in;
        let name = b"iqn.a,i,0x800000000001\0\0";
        assert_eq!(be32(&full, 4) as usize, full.len() - 8);
        assert_eq!(be64(&full, 8), 0xa);
        assert_eq!((full[20], full[21]), (1, 3), "holder, type");
        assert_eq!(be32(&full, 28) as usize, 4 + name.len());
        assert_eq!(&full[32..36], &[0x45, 0, 0, name.len() as u8]);
        assert_eq!(&full[36..], name);
        for i in 1..crate::pr::MAX_REGISTRATIONS {
            let n = nexus(&format!("iqn.n{i}"));
            assert_eq!(prout(&mut d, &n, REGISTER_AND_IGNORE, 0, 0, 1).status, GOOD);
        }
        let one_more = prout(&mut d, &nexus("iqn.more"), REGISTER_AND_IGNORE, 0, 0, 1);
        assert_eq!(
            one_more.sense,
            Some(crate::pr::INSUFFICIENT_REGISTRATION_RESOURCES)
        );
    }

    /// READ DEFECT DATA (10) and (12): no defects, in the format asked for, the lists
    /// asked for valid; cut to the allocation length.
    #[test]
    fn the_defect_lists_are_empty() {
        let mut d = disk();
        let ten = d.execute(&[0x37, 0, 0x18 | 3, 0, 0, 0, 0, 0, 32, 0], &[]);
        assert_eq!((ten.status, ten.data_in), (GOOD, vec![0, 0x1b, 0, 0]));
        let twelve = [0xb7, 0x10 | 5, 0, 0, 0, 0, 0, 0, 0, 6, 0, 0];
        let r = d.execute(&twelve, &[]);
        assert_eq!((r.status, r.data_in), (GOOD, vec![0, 0x15, 0, 0, 0, 0]));
        assert_eq!(d.transfer(&twelve), Transfer::In(6));
    }

    proptest::proptest! {
        /// Arbitrary commands (an opcode the disk serves, or any byte; arbitrary CDB bytes,
        /// small LBAs often; arbitrary Data-Out) from three nexuses, persistent
        /// reservations included, never panic, and every outcome is well formed: a status
        /// the disk gives, sense with CHECK CONDITION and only then, and no more Data-In
        /// than the CDB lets the command move.
        #[test]
        fn arbitrary_commands_never_panic(
            cmds in proptest::collection::vec(
                (0usize..3, proptest::num::u8::ANY, proptest::bool::ANY,
                 proptest::collection::vec(proptest::num::u8::ANY, 16),
                 proptest::collection::vec(proptest::num::u8::ANY, 0..1100)),
                1..40),
        ) {
            let mut d = disk();
            let nexuses = [nexus("iqn.a"), nexus("iqn.b"), Nexus::LOCAL];
            for (who, pick, small_lba, mut cdb, data) in cmds {
                let listed = SUPPORTED_OPCODES[usize::from(pick) % SUPPORTED_OPCODES.len()];
                cdb[0] = if pick < 200 { listed.0 } else { pick };
                if let (true, Some(sa)) = (pick < 200, listed.1) {
                    cdb[1] = (cdb[1] & 0xe0) | sa as u8;
                }
                if small_lba {
                    cdb[2..6].fill(0);
                }
                let len = cdb_len(cdb[0]).unwrap_or(16);
                let cdb = &cdb[..len];
                let most = match d.transfer(cdb) {
                    Transfer::In(n) => n,
                    _ => 0,
                };
                let o = d.execute_as(&nexuses[who], cdb, &data);
                proptest::prop_assert!(
                    [GOOD, CHECK_CONDITION, RESERVATION_CONFLICT].contains(&o.status),
                    "{cdb:02x?}: status {:#x}", o.status
                );
                proptest::prop_assert_eq!(o.sense.is_some(), o.status == CHECK_CONDITION);
                proptest::prop_assert!(
                    o.data_in.len() as u64 <= most,
                    "{:02x?}: {} bytes of Data-In, the CDB allows {}", cdb, o.data_in.len(), most
                );
            }
        }
    }
}
