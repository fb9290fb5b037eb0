//! iSCSI PDUs on the wire (RFC 7143 §11), in the style of smoltcp's wire module: a PDU is
//! framed from a byte stream by [`Framing::parse`] (every length checked, digests verified),
//! and its 48-byte Basic Header Segment is read into a [`Repr`] (one variant per opcode) or
//! written from one by [`Framing::emit`].
//!
//! Layout of every PDU: BHS (48 bytes) · AHS (TotalAHSLength × 4 bytes) · header digest (4
//! bytes, if negotiated) · data segment (DataSegmentLength bytes, padded to a multiple of 4)
//! · data digest (4 bytes, if negotiated and the data segment is not empty). Digests are
//! CRC32C (RFC 7143 §12.1; the crc32c crate), stored little-endian as RFC 3385 puts them on
//! the wire.
//!
//! Multi-byte fields are big-endian. A data digest failure does not make the PDU unreadable
//! (its header is intact), so it is reported in [`Pdu::data_digest`] for the session to
//! answer as ERL 0 prescribes; a header digest failure is an error, since no length in that
//! header can be trusted.

use thiserror::Error;

/// Length of the Basic Header Segment, bytes.
pub const BHS_LEN: usize = 48;
/// Length of a digest, bytes.
pub const DIGEST_LEN: usize = 4;
/// Largest data segment the 24-bit DataSegmentLength field can describe, bytes.
pub const MAX_DATA_SEGMENT_LEN: usize = (1 << 24) - 1;
/// Largest AHS the 8-bit TotalAHSLength field (in 4-byte words) can describe, bytes.
pub const MAX_AHS_LEN: usize = 255 * 4;
/// The reserved Initiator Task Tag (no task: unsolicited NOP-In, Reject, Async Message).
pub const RESERVED_TAG: u32 = 0xffff_ffff;

/// Why bytes are not a valid PDU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum WireError {
    /// Fewer bytes than the structure needs.
    #[error("truncated: {need} bytes needed, {have} present")]
    Truncated {
        /// Bytes needed.
        need: usize,
        /// Bytes present.
        have: usize,
    },
    /// An opcode RFC 7143 does not define.
    #[error("unknown opcode {0:#04x}")]
    UnknownOpcode(u8),
    /// The header digest does not match the header: no field of it can be trusted.
    #[error("header digest mismatch: computed {computed:#010x}, received {received:#010x}")]
    HeaderDigest {
        /// CRC32C of the received header.
        computed: u32,
        /// The digest that came with it.
        received: u32,
    },
    /// A field holds a value the standard forbids.
    #[error("malformed PDU: {0}")]
    Malformed(&'static str),
    /// A segment longer than its length field can carry.
    #[error("{what} of {len} bytes exceeds the field's maximum")]
    TooLong {
        /// Which segment.
        what: &'static str,
        /// Its length, bytes.
        len: usize,
    },
}

/// The opcodes of RFC 7143 §11.1.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Opcode {
    /// NOP-Out (initiator).
    NopOut = 0x00,
    /// SCSI Command (initiator).
    ScsiCommand = 0x01,
    /// SCSI Task Management Function Request (initiator).
    TaskMgmtRequest = 0x02,
    /// Login Request (initiator).
    LoginRequest = 0x03,
    /// Text Request (initiator).
    TextRequest = 0x04,
    /// SCSI Data-Out (initiator).
    DataOut = 0x05,
    /// Logout Request (initiator).
    LogoutRequest = 0x06,
    /// SNACK Request (initiator).
    SnackRequest = 0x10,
    /// NOP-In (target).
    NopIn = 0x20,
    /// SCSI Response (target).
    ScsiResponse = 0x21,
    /// SCSI Task Management Function Response (target).
    TaskMgmtResponse = 0x22,
    /// Login Response (target).
    LoginResponse = 0x23,
    /// Text Response (target).
    TextResponse = 0x24,
    /// SCSI Data-In (target).
    DataIn = 0x25,
    /// Logout Response (target).
    LogoutResponse = 0x26,
    /// Ready To Transfer (target).
    R2t = 0x31,
    /// Asynchronous Message (target).
    AsyncMessage = 0x32,
    /// Reject (target).
    Reject = 0x3f,
}

impl Opcode {
    /// The opcode of a BHS's first byte (its low six bits), if RFC 7143 defines it.
    pub fn from_byte(b: u8) -> Result<Opcode, WireError> {
        use Opcode::*;
        Ok(match b & 0x3f {
            0x00 => NopOut,
            0x01 => ScsiCommand,
            0x02 => TaskMgmtRequest,
            0x03 => LoginRequest,
            0x04 => TextRequest,
            0x05 => DataOut,
            0x06 => LogoutRequest,
            0x10 => SnackRequest,
            0x20 => NopIn,
            0x21 => ScsiResponse,
            0x22 => TaskMgmtResponse,
            0x23 => LoginResponse,
            0x24 => TextResponse,
            0x25 => DataIn,
            0x26 => LogoutResponse,
            0x31 => R2t,
            0x32 => AsyncMessage,
            0x3f => Reject,
            other => return Err(WireError::UnknownOpcode(other)),
        })
    }

    /// True for opcodes an initiator sends.
    pub fn from_initiator(self) -> bool {
        (self as u8) < 0x20
    }
}

/// Which digests a connection negotiated (HeaderDigest, DataDigest = CRC32C).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Framing {
    /// A header digest follows the BHS and AHS.
    pub header_digest: bool,
    /// A data digest follows every non-empty data segment.
    pub data_digest: bool,
}

/// The data digest of a received PDU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DigestCheck {
    /// Not negotiated, or no data segment.
    None,
    /// Present and correct.
    Good,
    /// Present and wrong: the data must not be used (RFC 7143 §7.8).
    Bad {
        /// CRC32C of the received data and padding.
        computed: u32,
        /// The digest that came with it.
        received: u32,
    },
}

/// One framed PDU, borrowed from the receive buffer.
#[derive(Debug, Clone, Copy)]
pub struct Pdu<'a> {
    /// The Basic Header Segment.
    pub bhs: &'a [u8; BHS_LEN],
    /// The Additional Header Segments (may be empty).
    pub ahs: &'a [u8],
    /// The data segment, without padding.
    pub data: &'a [u8],
    /// The data digest's verdict.
    pub data_digest: DigestCheck,
    /// Bytes this PDU took in the stream (header, digests, data and padding).
    pub len: usize,
}

impl Pdu<'_> {
    /// The opcode.
    pub fn opcode(&self) -> Result<Opcode, WireError> {
        Opcode::from_byte(self.bhs[0])
    }
    /// The Initiator Task Tag.
    pub fn itt(&self) -> u32 {
        be32(self.bhs, 16)
    }
    /// The header fields.
    pub fn repr(&self) -> Result<Repr, WireError> {
        Repr::parse(self.bhs)
    }
}

/// Bytes `n` rounds up to with padding to a 4-byte boundary.
pub fn padded(n: usize) -> usize {
    (n + 3) & !3
}

/// CRC32C of `parts` as one byte string (RFC 7143 §12.1).
pub fn crc32c(parts: &[&[u8]]) -> u32 {
    parts.iter().fold(0, |c, p| crc32c::crc32c_append(c, p))
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be24(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([0, b[at], b[at + 1], b[at + 2]])
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn be64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}
fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}
fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}
fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

impl Framing {
    /// Total stream length of the PDU whose BHS starts `buf` (at least 48 bytes).
    pub fn pdu_len(&self, bhs: &[u8]) -> Result<usize, WireError> {
        if bhs.len() < BHS_LEN {
            return Err(WireError::Truncated {
                need: BHS_LEN,
                have: bhs.len(),
            });
        }
        let ahs = usize::from(bhs[4]) * 4;
        let data = be24(bhs, 5) as usize;
        let hd = if self.header_digest { DIGEST_LEN } else { 0 };
        let dd = if self.data_digest && data > 0 {
            DIGEST_LEN
        } else {
            0
        };
        Ok(BHS_LEN + ahs + hd + padded(data) + dd)
    }

    /// Frame the PDU at the start of `buf`. `Ok(None)`: `buf` holds only part of it (read
    /// more; [`Framing::pdu_len`] says how much once 48 bytes are in). The opcode and header
    /// digest are checked; the data digest is reported in [`Pdu::data_digest`].
    pub fn parse<'a>(&self, buf: &'a [u8]) -> Result<Option<Pdu<'a>>, WireError> {
        if buf.len() < BHS_LEN {
            return Ok(None);
        }
        let len = self.pdu_len(buf)?;
        if buf.len() < len {
            return Ok(None);
        }
        let bhs: &[u8; BHS_LEN] = buf[..BHS_LEN].try_into().expect("48 bytes");
        let ahs_len = usize::from(bhs[4]) * 4;
        let ahs = &buf[BHS_LEN..BHS_LEN + ahs_len];
        let mut at = BHS_LEN + ahs_len;
        if self.header_digest {
            let received = u32::from_le_bytes(buf[at..at + 4].try_into().expect("4 bytes"));
            let computed = crc32c(&[bhs, ahs]);
            if computed != received {
                return Err(WireError::HeaderDigest { computed, received });
            }
            at += DIGEST_LEN;
        }
        Opcode::from_byte(bhs[0])?;
        let data_len = be24(bhs, 5) as usize;
        let data = &buf[at..at + data_len];
        let with_pad = &buf[at..at + padded(data_len)];
        at += padded(data_len);
        let data_digest = if self.data_digest && data_len > 0 {
            let received = u32::from_le_bytes(buf[at..at + 4].try_into().expect("4 bytes"));
            let computed = crc32c(&[with_pad]);
            if computed == received {
                DigestCheck::Good
            } else {
                DigestCheck::Bad { computed, received }
            }
        } else {
            DigestCheck::None
        };
        Ok(Some(Pdu {
            bhs,
            ahs,
            data,
            data_digest,
            len,
        }))
    }

    /// Bytes a PDU with `ahs` and `data` bytes of AHS and data runs through CRC32C under
    /// this framing: the header (BHS and AHS) with header digests, the padded data segment
    /// with data digests. The host's digest work, when the host computes them.
    pub fn digested_len(&self, ahs: usize, data: usize) -> u64 {
        let h = if self.header_digest { BHS_LEN + ahs } else { 0 };
        let d = if self.data_digest {
            data.div_ceil(4) * 4
        } else {
            0
        };
        (h + d) as u64
    }

    /// [`Framing::emit`] without AHS, adding the bytes digested to `*digested`.
    pub fn emit_counted(
        &self,
        repr: &Repr,
        data: &[u8],
        out: &mut Vec<u8>,
        digested: &mut u64,
    ) -> Result<usize, WireError> {
        let n = self.emit(repr, &[], data, out)?;
        *digested += self.digested_len(0, data.len());
        Ok(n)
    }

    /// Append the PDU of `repr` with `ahs` (a multiple of 4 bytes) and `data` to `out`:
    /// header, digests and padding as negotiated. Returns the bytes appended.
    pub fn emit(
        &self,
        repr: &Repr,
        ahs: &[u8],
        data: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<usize, WireError> {
        let mut bhs = [0u8; BHS_LEN];
        repr.emit(&mut bhs);
        self.emit_bhs(bhs, ahs, data, out)
    }

    /// [`Framing::emit`] of a BHS already in bytes (its TotalAHSLength and
    /// DataSegmentLength are set here, from `ahs` and `data`).
    pub fn emit_bhs(
        &self,
        bhs: [u8; BHS_LEN],
        ahs: &[u8],
        data: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<usize, WireError> {
        self.emit_filled(bhs, ahs, data.len(), out, |dst| {
            dst.copy_from_slice(data);
            true
        })
        .map(|n| n.expect("a copy always fills"))
    }

    /// [`Framing::emit_bhs`] of a data segment of `len` bytes that `fill` writes straight
    /// into `out` (a DMA read from host memory, with no staging copy). `Ok(None)`, and
    /// nothing appended, if `fill` says it could not.
    pub fn emit_filled(
        &self,
        mut bhs: [u8; BHS_LEN],
        ahs: &[u8],
        len: usize,
        out: &mut Vec<u8>,
        fill: impl FnOnce(&mut [u8]) -> bool,
    ) -> Result<Option<usize>, WireError> {
        if ahs.len() % 4 != 0 {
            return Err(WireError::Malformed("AHS length not a multiple of 4"));
        }
        if ahs.len() > MAX_AHS_LEN {
            return Err(WireError::TooLong {
                what: "AHS",
                len: ahs.len(),
            });
        }
        if len > MAX_DATA_SEGMENT_LEN {
            return Err(WireError::TooLong {
                what: "data segment",
                len,
            });
        }
        let start = out.len();
        bhs[4] = (ahs.len() / 4) as u8;
        let dl = (len as u32).to_be_bytes();
        bhs[5..8].copy_from_slice(&dl[1..]);
        out.extend_from_slice(&bhs);
        out.extend_from_slice(ahs);
        if self.header_digest {
            out.extend_from_slice(&crc32c(&[&bhs, ahs]).to_le_bytes());
        }
        if len > 0 {
            let at = out.len();
            // Padding bytes are zero.
            out.resize(at + padded(len), 0);
            if !fill(&mut out[at..at + len]) {
                out.truncate(start);
                return Ok(None);
            }
            if self.data_digest {
                let digest = crc32c(&[&out[at..]]);
                out.extend_from_slice(&digest.to_le_bytes());
            }
        }
        Ok(Some(out.len() - start))
    }
}

/// SCSI Command (§11.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScsiCommand {
    /// Immediate delivery (the I bit).
    pub immediate: bool,
    /// No unsolicited Data-Out PDUs follow (the F bit).
    pub final_: bool,
    /// Data flows to the initiator (R).
    pub read: bool,
    /// Data flows to the target (W).
    pub write: bool,
    /// Task attribute (0 untagged, 1 simple, 2 ordered, 3 head of queue, 4 ACA).
    pub attr: u8,
    /// Logical unit number, as its 8 bytes.
    pub lun: u64,
    /// Initiator Task Tag.
    pub itt: u32,
    /// Expected Data Transfer Length, bytes.
    pub expected_len: u32,
    /// CmdSN.
    pub cmd_sn: u32,
    /// ExpStatSN.
    pub exp_stat_sn: u32,
    /// The CDB's first 16 bytes (longer CDBs continue in an Extended CDB AHS).
    pub cdb: [u8; 16],
}

/// SCSI Response (§11.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ScsiResponse {
    /// Bidirectional Read Residual Overflow (o).
    pub bidi_overflow: bool,
    /// Bidirectional Read Residual Underflow (u).
    pub bidi_underflow: bool,
    /// Residual Overflow (O): the command wanted more than Expected Data Transfer Length.
    pub overflow: bool,
    /// Residual Underflow (U): less moved than Expected Data Transfer Length.
    pub underflow: bool,
    /// iSCSI service response (0: command completed at target).
    pub response: u8,
    /// SCSI status (0 GOOD, 2 CHECK CONDITION, ...).
    pub status: u8,
    /// Initiator Task Tag.
    pub itt: u32,
    /// SNACK Tag.
    pub snack_tag: u32,
    /// StatSN.
    pub stat_sn: u32,
    /// ExpCmdSN.
    pub exp_cmd_sn: u32,
    /// MaxCmdSN.
    pub max_cmd_sn: u32,
    /// ExpDataSN: Data-In PDUs sent for the command (or R2Ts, for writes).
    pub exp_data_sn: u32,
    /// Bidirectional Read Residual Count, bytes.
    pub bidi_residual: u32,
    /// Residual Count, bytes.
    pub residual: u32,
}

/// Task Management Function Request (§11.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskMgmtRequest {
    /// Immediate delivery.
    pub immediate: bool,
    /// Function (1 ABORT TASK, 2 ABORT TASK SET, 5 LOGICAL UNIT RESET, 6 TARGET WARM
    /// RESET, ...).
    pub function: u8,
    /// Logical unit.
    pub lun: u64,
    /// Initiator Task Tag of this request.
    pub itt: u32,
    /// Referenced Task Tag (ABORT TASK).
    pub ref_task_tag: u32,
    /// CmdSN.
    pub cmd_sn: u32,
    /// ExpStatSN.
    pub exp_stat_sn: u32,
    /// RefCmdSN (ABORT TASK).
    pub ref_cmd_sn: u32,
    /// ExpDataSN.
    pub exp_data_sn: u32,
}

/// Task Management Function Response (§11.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskMgmtResponse {
    /// Response (0 function complete, 1 task does not exist, 2 LUN does not exist, 5
    /// function not supported, ...).
    pub response: u8,
    /// Initiator Task Tag of the request.
    pub itt: u32,
    /// StatSN.
    pub stat_sn: u32,
    /// ExpCmdSN.
    pub exp_cmd_sn: u32,
    /// MaxCmdSN.
    pub max_cmd_sn: u32,
}

/// SCSI Data-Out (§11.7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataOut {
    /// Last PDU of the sequence (F).
    pub final_: bool,
    /// Logical unit.
    pub lun: u64,
    /// Initiator Task Tag.
    pub itt: u32,
    /// Target Transfer Tag (of the R2T; reserved tag for unsolicited data).
    pub ttt: u32,
    /// ExpStatSN.
    pub exp_stat_sn: u32,
    /// DataSN within the sequence.
    pub data_sn: u32,
    /// Buffer Offset of the data segment, bytes.
    pub buffer_offset: u32,
}

/// SCSI Data-In (§11.7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DataIn {
    /// Last PDU of the sequence (F).
    pub final_: bool,
    /// Acknowledge requested (A, ERL > 0).
    pub ack: bool,
    /// Residual Overflow (with status).
    pub overflow: bool,
    /// Residual Underflow (with status).
    pub underflow: bool,
    /// SCSI status carried by this PDU (the S bit; only with F).
    pub status: Option<u8>,
    /// Logical unit.
    pub lun: u64,
    /// Initiator Task Tag.
    pub itt: u32,
    /// Target Transfer Tag.
    pub ttt: u32,
    /// StatSN (valid with status).
    pub stat_sn: u32,
    /// ExpCmdSN.
    pub exp_cmd_sn: u32,
    /// MaxCmdSN.
    pub max_cmd_sn: u32,
    /// DataSN.
    pub data_sn: u32,
    /// Buffer Offset of the data segment, bytes.
    pub buffer_offset: u32,
    /// Residual Count (valid with status), bytes.
    pub residual: u32,
}

/// Ready To Transfer (§11.8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct R2t {
    /// Logical unit.
    pub lun: u64,
    /// Initiator Task Tag.
    pub itt: u32,
    /// Target Transfer Tag the Data-Out PDUs must carry.
    pub ttt: u32,
    /// StatSN.
    pub stat_sn: u32,
    /// ExpCmdSN.
    pub exp_cmd_sn: u32,
    /// MaxCmdSN.
    pub max_cmd_sn: u32,
    /// R2TSN.
    pub r2t_sn: u32,
    /// Buffer Offset of the requested data, bytes.
    pub buffer_offset: u32,
    /// Desired Data Transfer Length, bytes.
    pub desired_len: u32,
}

/// Asynchronous Message (§11.9).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AsyncMessage {
    /// Logical unit (for SCSI asynchronous events).
    pub lun: u64,
    /// StatSN.
    pub stat_sn: u32,
    /// ExpCmdSN.
    pub exp_cmd_sn: u32,
    /// MaxCmdSN.
    pub max_cmd_sn: u32,
    /// AsyncEvent (0 SCSI event, 1 logout request, ..., 255 vendor specific).
    pub event: u8,
    /// AsyncVCode.
    pub vcode: u8,
    /// Parameter1.
    pub param1: u16,
    /// Parameter2.
    pub param2: u16,
    /// Parameter3.
    pub param3: u16,
}

/// Text Request (§11.10) or Text Response (§11.11).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Text {
    /// Immediate delivery (requests only).
    pub immediate: bool,
    /// Last PDU of the exchange from this side (F).
    pub final_: bool,
    /// The text continues in the next PDU (C).
    pub cont: bool,
    /// Logical unit (reserved: 0).
    pub lun: u64,
    /// Initiator Task Tag.
    pub itt: u32,
    /// Target Transfer Tag (continuations).
    pub ttt: u32,
    /// CmdSN (request) or StatSN (response).
    pub sn: u32,
    /// ExpStatSN (request) or ExpCmdSN (response).
    pub exp_sn: u32,
    /// MaxCmdSN (responses; 0 in requests).
    pub max_cmd_sn: u32,
}

/// Login Request (§11.12) or Login Response (§11.13).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Login {
    /// Transit to the next stage (T).
    pub transit: bool,
    /// The text continues in the next PDU (C).
    pub cont: bool,
    /// Current stage (0 security, 1 operational, 3 full feature).
    pub csg: u8,
    /// Next stage (meaningful with T).
    pub nsg: u8,
    /// Version-max.
    pub version_max: u8,
    /// Version-min (request) or Version-active (response).
    pub version: u8,
    /// Initiator Session ID, 6 bytes.
    pub isid: [u8; 6],
    /// Target Session Identifying Handle (0 for a new session).
    pub tsih: u16,
    /// Initiator Task Tag.
    pub itt: u32,
    /// Connection ID (requests).
    pub cid: u16,
    /// CmdSN (request) or StatSN (response).
    pub sn: u32,
    /// ExpStatSN (request) or ExpCmdSN (response).
    pub exp_sn: u32,
    /// MaxCmdSN (responses).
    pub max_cmd_sn: u32,
    /// Status-Class (responses: 0 success, 1 redirection, 2 initiator error, 3 target
    /// error).
    pub status_class: u8,
    /// Status-Detail (responses).
    pub status_detail: u8,
}

/// Logout Request (§11.14).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogoutRequest {
    /// Immediate delivery.
    pub immediate: bool,
    /// Reason (0 close the session, 1 close the connection, 2 remove it for recovery).
    pub reason: u8,
    /// Initiator Task Tag.
    pub itt: u32,
    /// Connection ID (reasons 1 and 2).
    pub cid: u16,
    /// CmdSN.
    pub cmd_sn: u32,
    /// ExpStatSN.
    pub exp_stat_sn: u32,
}

/// Logout Response (§11.15).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogoutResponse {
    /// Response (0 closed successfully, 1 CID not found, ...).
    pub response: u8,
    /// Initiator Task Tag of the request.
    pub itt: u32,
    /// StatSN.
    pub stat_sn: u32,
    /// ExpCmdSN.
    pub exp_cmd_sn: u32,
    /// MaxCmdSN.
    pub max_cmd_sn: u32,
    /// Time2Wait, seconds.
    pub time2wait: u16,
    /// Time2Retain, seconds.
    pub time2retain: u16,
}

/// SNACK Request (§11.16).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snack {
    /// Type (0 Data/R2T, 1 status, 2 DataACK, 3 R-Data).
    pub kind: u8,
    /// Logical unit.
    pub lun: u64,
    /// Initiator Task Tag.
    pub itt: u32,
    /// Target Transfer Tag or SNACK Tag.
    pub ttt: u32,
    /// ExpStatSN.
    pub exp_stat_sn: u32,
    /// BegRun.
    pub beg_run: u32,
    /// RunLength.
    pub run_length: u32,
}

/// Reject (§11.17). Its data segment is the rejected PDU's BHS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reject {
    /// Reason (2 data digest error, 4 protocol error, 5 command not supported, 9 invalid
    /// PDU field, ...).
    pub reason: u8,
    /// StatSN.
    pub stat_sn: u32,
    /// ExpCmdSN.
    pub exp_cmd_sn: u32,
    /// MaxCmdSN.
    pub max_cmd_sn: u32,
    /// DataSN/R2TSN (for a rejected SNACK).
    pub data_sn: u32,
}

/// NOP-Out (§11.18) or NOP-In (§11.19).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nop {
    /// Immediate delivery (NOP-Out only).
    pub immediate: bool,
    /// Logical unit.
    pub lun: u64,
    /// Initiator Task Tag ([`RESERVED_TAG`] when no answer is asked for, or for a
    /// target-initiated NOP-In).
    pub itt: u32,
    /// Target Transfer Tag ([`RESERVED_TAG`] unless answering a NOP-In's ping).
    pub ttt: u32,
    /// CmdSN (NOP-Out) or StatSN (NOP-In).
    pub sn: u32,
    /// ExpStatSN (NOP-Out) or ExpCmdSN (NOP-In).
    pub exp_sn: u32,
    /// MaxCmdSN (NOP-In).
    pub max_cmd_sn: u32,
}

/// The header of a PDU, one variant per opcode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repr {
    /// NOP-Out.
    NopOut(Nop),
    /// SCSI Command.
    ScsiCommand(ScsiCommand),
    /// Task Management Function Request.
    TaskMgmtRequest(TaskMgmtRequest),
    /// Login Request.
    LoginRequest(Login),
    /// Text Request.
    TextRequest(Text),
    /// SCSI Data-Out.
    DataOut(DataOut),
    /// Logout Request.
    LogoutRequest(LogoutRequest),
    /// SNACK Request.
    Snack(Snack),
    /// NOP-In.
    NopIn(Nop),
    /// SCSI Response.
    ScsiResponse(ScsiResponse),
    /// Task Management Function Response.
    TaskMgmtResponse(TaskMgmtResponse),
    /// Login Response.
    LoginResponse(Login),
    /// Text Response.
    TextResponse(Text),
    /// SCSI Data-In.
    DataIn(DataIn),
    /// Logout Response.
    LogoutResponse(LogoutResponse),
    /// Ready To Transfer.
    R2t(R2t),
    /// Asynchronous Message.
    AsyncMessage(AsyncMessage),
    /// Reject.
    Reject(Reject),
}

const F: u8 = 0x80;

impl Repr {
    /// The opcode.
    pub fn opcode(&self) -> Opcode {
        match self {
            Repr::NopOut(_) => Opcode::NopOut,
            Repr::ScsiCommand(_) => Opcode::ScsiCommand,
            Repr::TaskMgmtRequest(_) => Opcode::TaskMgmtRequest,
            Repr::LoginRequest(_) => Opcode::LoginRequest,
            Repr::TextRequest(_) => Opcode::TextRequest,
            Repr::DataOut(_) => Opcode::DataOut,
            Repr::LogoutRequest(_) => Opcode::LogoutRequest,
            Repr::Snack(_) => Opcode::SnackRequest,
            Repr::NopIn(_) => Opcode::NopIn,
            Repr::ScsiResponse(_) => Opcode::ScsiResponse,
            Repr::TaskMgmtResponse(_) => Opcode::TaskMgmtResponse,
            Repr::LoginResponse(_) => Opcode::LoginResponse,
            Repr::TextResponse(_) => Opcode::TextResponse,
            Repr::DataIn(_) => Opcode::DataIn,
            Repr::LogoutResponse(_) => Opcode::LogoutResponse,
            Repr::R2t(_) => Opcode::R2t,
            Repr::AsyncMessage(_) => Opcode::AsyncMessage,
            Repr::Reject(_) => Opcode::Reject,
        }
    }

    /// Read the header fields of `bhs`. Fields the standard reserves are ignored, as
    /// receivers must; values it forbids are [`WireError::Malformed`].
    pub fn parse(bhs: &[u8; BHS_LEN]) -> Result<Repr, WireError> {
        let b = &bhs[..];
        let op = Opcode::from_byte(b[0])?;
        // The I bit means something only in what an initiator sends.
        let immediate = b[0] & 0x40 != 0 && op.from_initiator();
        let fl = b[1];
        let fin = fl & F != 0;
        let lun = be64(b, 8);
        let itt = be32(b, 16);
        let (w20, w24, w28, w32, w36, w40, w44) = (
            be32(b, 20),
            be32(b, 24),
            be32(b, 28),
            be32(b, 32),
            be32(b, 36),
            be32(b, 40),
            be32(b, 44),
        );
        let nop = |max_cmd_sn| Nop {
            immediate,
            lun,
            itt,
            ttt: w20,
            sn: w24,
            exp_sn: w28,
            max_cmd_sn,
        };
        let text = |max_cmd_sn| Text {
            immediate,
            final_: fin,
            cont: fl & 0x40 != 0,
            lun,
            itt,
            ttt: w20,
            sn: w24,
            exp_sn: w28,
            max_cmd_sn,
        };
        let request = op == Opcode::LoginRequest;
        let login = || -> Result<Login, WireError> {
            let l = Login {
                transit: fin,
                cont: fl & 0x40 != 0,
                csg: (fl >> 2) & 3,
                nsg: fl & 3,
                version_max: b[2],
                version: b[3],
                isid: b[8..14].try_into().expect("6 bytes"),
                tsih: be16(b, 14),
                itt,
                cid: if request { be16(b, 20) } else { 0 },
                sn: w24,
                exp_sn: w28,
                max_cmd_sn: if request { 0 } else { w32 },
                status_class: if request { 0 } else { b[36] },
                status_detail: if request { 0 } else { b[37] },
            };
            if l.transit && l.cont {
                return Err(WireError::Malformed("login with both T and C set"));
            }
            if l.csg == 2 || (l.transit && l.nsg == 2) {
                return Err(WireError::Malformed("login stage 2 is reserved"));
            }
            Ok(l)
        };
        Ok(match op {
            Opcode::NopOut => Repr::NopOut(nop(0)),
            Opcode::NopIn => Repr::NopIn(nop(w32)),
            Opcode::ScsiCommand => {
                let c = ScsiCommand {
                    immediate,
                    final_: fin,
                    read: fl & 0x40 != 0,
                    write: fl & 0x20 != 0,
                    attr: fl & 0x07,
                    lun,
                    itt,
                    expected_len: w20,
                    cmd_sn: w24,
                    exp_stat_sn: w28,
                    cdb: b[32..48].try_into().expect("16 bytes"),
                };
                if !c.final_ && !c.write {
                    return Err(WireError::Malformed(
                        "SCSI command expecting Data-Out without W",
                    ));
                }
                Repr::ScsiCommand(c)
            }
            Opcode::ScsiResponse => Repr::ScsiResponse(ScsiResponse {
                bidi_overflow: fl & 0x10 != 0,
                bidi_underflow: fl & 0x08 != 0,
                overflow: fl & 0x04 != 0,
                underflow: fl & 0x02 != 0,
                response: b[2],
                status: b[3],
                itt,
                snack_tag: w20,
                stat_sn: w24,
                exp_cmd_sn: w28,
                max_cmd_sn: w32,
                exp_data_sn: w36,
                bidi_residual: w40,
                residual: w44,
            }),
            Opcode::TaskMgmtRequest => Repr::TaskMgmtRequest(TaskMgmtRequest {
                immediate,
                function: fl & 0x7f,
                lun,
                itt,
                ref_task_tag: w20,
                cmd_sn: w24,
                exp_stat_sn: w28,
                ref_cmd_sn: w32,
                exp_data_sn: w36,
            }),
            Opcode::TaskMgmtResponse => Repr::TaskMgmtResponse(TaskMgmtResponse {
                response: b[2],
                itt,
                stat_sn: w24,
                exp_cmd_sn: w28,
                max_cmd_sn: w32,
            }),
            Opcode::LoginRequest => Repr::LoginRequest(login()?),
            Opcode::LoginResponse => Repr::LoginResponse(login()?),
            Opcode::TextRequest => Repr::TextRequest(text(0)),
            Opcode::TextResponse => Repr::TextResponse(text(w32)),
            Opcode::DataOut => Repr::DataOut(DataOut {
                final_: fin,
                lun,
                itt,
                ttt: w20,
                exp_stat_sn: w28,
                data_sn: w36,
                buffer_offset: w40,
            }),
            Opcode::DataIn => {
                let s = fl & 0x01 != 0;
                if s && !fin {
                    return Err(WireError::Malformed("Data-In with status but without F"));
                }
                Repr::DataIn(DataIn {
                    final_: fin,
                    ack: fl & 0x40 != 0,
                    overflow: fl & 0x04 != 0,
                    underflow: fl & 0x02 != 0,
                    status: s.then_some(b[3]),
                    lun,
                    itt,
                    ttt: w20,
                    stat_sn: w24,
                    exp_cmd_sn: w28,
                    max_cmd_sn: w32,
                    data_sn: w36,
                    buffer_offset: w40,
                    residual: w44,
                })
            }
            Opcode::LogoutRequest => Repr::LogoutRequest(LogoutRequest {
                immediate,
                reason: fl & 0x7f,
                itt,
                cid: be16(b, 20),
                cmd_sn: w24,
                exp_stat_sn: w28,
            }),
            Opcode::LogoutResponse => Repr::LogoutResponse(LogoutResponse {
                response: b[2],
                itt,
                stat_sn: w24,
                exp_cmd_sn: w28,
                max_cmd_sn: w32,
                time2wait: be16(b, 40),
                time2retain: be16(b, 42),
            }),
            Opcode::SnackRequest => Repr::Snack(Snack {
                kind: fl & 0x0f,
                lun,
                itt,
                ttt: w20,
                exp_stat_sn: w28,
                beg_run: w40,
                run_length: w44,
            }),
            Opcode::R2t => Repr::R2t(R2t {
                lun,
                itt,
                ttt: w20,
                stat_sn: w24,
                exp_cmd_sn: w28,
                max_cmd_sn: w32,
                r2t_sn: w36,
                buffer_offset: w40,
                desired_len: w44,
            }),
            Opcode::AsyncMessage => Repr::AsyncMessage(AsyncMessage {
                lun,
                stat_sn: w24,
                exp_cmd_sn: w28,
                max_cmd_sn: w32,
                event: b[36],
                vcode: b[37],
                param1: be16(b, 38),
                param2: be16(b, 40),
                param3: be16(b, 42),
            }),
            Opcode::Reject => Repr::Reject(Reject {
                reason: b[2],
                stat_sn: w24,
                exp_cmd_sn: w28,
                max_cmd_sn: w32,
                data_sn: w36,
            }),
        })
    }

    /// Write the header fields into `bhs` (every byte; TotalAHSLength and
    /// DataSegmentLength are left 0 for [`Framing::emit`] to fill in).
    pub fn emit(&self, bhs: &mut [u8; BHS_LEN]) {
        let b = &mut bhs[..];
        b.fill(0);
        b[0] = self.opcode() as u8;
        let imm = |i: bool| if i { 0x40 } else { 0 };
        let bit = |on: bool, m: u8| if on { m } else { 0 };
        match *self {
            Repr::NopOut(n) | Repr::NopIn(n) => {
                b[0] |= imm(n.immediate && matches!(self, Repr::NopOut(_)));
                b[1] = F;
                put64(b, 8, n.lun);
                put32(b, 16, n.itt);
                put32(b, 20, n.ttt);
                put32(b, 24, n.sn);
                put32(b, 28, n.exp_sn);
                if matches!(self, Repr::NopIn(_)) {
                    put32(b, 32, n.max_cmd_sn);
                }
            }
            Repr::ScsiCommand(c) => {
                b[0] |= imm(c.immediate);
                b[1] = bit(c.final_, F) | bit(c.read, 0x40) | bit(c.write, 0x20) | (c.attr & 7);
                put64(b, 8, c.lun);
                put32(b, 16, c.itt);
                put32(b, 20, c.expected_len);
                put32(b, 24, c.cmd_sn);
                put32(b, 28, c.exp_stat_sn);
                b[32..48].copy_from_slice(&c.cdb);
            }
            Repr::ScsiResponse(r) => {
                b[1] = F
                    | bit(r.bidi_overflow, 0x10)
                    | bit(r.bidi_underflow, 0x08)
                    | bit(r.overflow, 0x04)
                    | bit(r.underflow, 0x02);
                b[2] = r.response;
                b[3] = r.status;
                put32(b, 16, r.itt);
                put32(b, 20, r.snack_tag);
                put32(b, 24, r.stat_sn);
                put32(b, 28, r.exp_cmd_sn);
                put32(b, 32, r.max_cmd_sn);
                put32(b, 36, r.exp_data_sn);
                put32(b, 40, r.bidi_residual);
                put32(b, 44, r.residual);
            }
            Repr::TaskMgmtRequest(t) => {
                b[0] |= imm(t.immediate);
                b[1] = F | (t.function & 0x7f);
                put64(b, 8, t.lun);
                put32(b, 16, t.itt);
                put32(b, 20, t.ref_task_tag);
                put32(b, 24, t.cmd_sn);
                put32(b, 28, t.exp_stat_sn);
                put32(b, 32, t.ref_cmd_sn);
                put32(b, 36, t.exp_data_sn);
            }
            Repr::TaskMgmtResponse(t) => {
                b[1] = F;
                b[2] = t.response;
                put32(b, 16, t.itt);
                put32(b, 24, t.stat_sn);
                put32(b, 28, t.exp_cmd_sn);
                put32(b, 32, t.max_cmd_sn);
            }
            Repr::LoginRequest(l) | Repr::LoginResponse(l) => {
                let request = matches!(self, Repr::LoginRequest(_));
                b[0] |= imm(request); // a Login Request is always immediate
                b[1] = bit(l.transit, F) | bit(l.cont, 0x40) | ((l.csg & 3) << 2) | (l.nsg & 3);
                b[2] = l.version_max;
                b[3] = l.version;
                b[8..14].copy_from_slice(&l.isid);
                put16(b, 14, l.tsih);
                put32(b, 16, l.itt);
                if request {
                    put16(b, 20, l.cid);
                }
                put32(b, 24, l.sn);
                put32(b, 28, l.exp_sn);
                if !request {
                    put32(b, 32, l.max_cmd_sn);
                    b[36] = l.status_class;
                    b[37] = l.status_detail;
                }
            }
            Repr::TextRequest(t) | Repr::TextResponse(t) => {
                let request = matches!(self, Repr::TextRequest(_));
                b[0] |= imm(t.immediate && request);
                b[1] = bit(t.final_, F) | bit(t.cont, 0x40);
                put64(b, 8, t.lun);
                put32(b, 16, t.itt);
                put32(b, 20, t.ttt);
                put32(b, 24, t.sn);
                put32(b, 28, t.exp_sn);
                if !request {
                    put32(b, 32, t.max_cmd_sn);
                }
            }
            Repr::DataOut(d) => {
                b[1] = bit(d.final_, F);
                put64(b, 8, d.lun);
                put32(b, 16, d.itt);
                put32(b, 20, d.ttt);
                put32(b, 28, d.exp_stat_sn);
                put32(b, 36, d.data_sn);
                put32(b, 40, d.buffer_offset);
            }
            Repr::DataIn(d) => {
                // S implies F (RFC 7143 §11.7.1).
                let s = d.status.is_some();
                b[1] = bit(d.final_ || s, F)
                    | bit(d.ack, 0x40)
                    | bit(d.overflow, 0x04)
                    | bit(d.underflow, 0x02)
                    | bit(s, 0x01);
                b[3] = d.status.unwrap_or(0);
                put64(b, 8, d.lun);
                put32(b, 16, d.itt);
                put32(b, 20, d.ttt);
                put32(b, 24, d.stat_sn);
                put32(b, 28, d.exp_cmd_sn);
                put32(b, 32, d.max_cmd_sn);
                put32(b, 36, d.data_sn);
                put32(b, 40, d.buffer_offset);
                put32(b, 44, d.residual);
            }
            Repr::LogoutRequest(l) => {
                b[0] |= imm(l.immediate);
                b[1] = F | (l.reason & 0x7f);
                put32(b, 16, l.itt);
                put16(b, 20, l.cid);
                put32(b, 24, l.cmd_sn);
                put32(b, 28, l.exp_stat_sn);
            }
            Repr::LogoutResponse(l) => {
                b[1] = F;
                b[2] = l.response;
                put32(b, 16, l.itt);
                put32(b, 24, l.stat_sn);
                put32(b, 28, l.exp_cmd_sn);
                put32(b, 32, l.max_cmd_sn);
                put16(b, 40, l.time2wait);
                put16(b, 42, l.time2retain);
            }
            Repr::Snack(s) => {
                b[1] = F | (s.kind & 0x0f);
                put64(b, 8, s.lun);
                put32(b, 16, s.itt);
                put32(b, 20, s.ttt);
                put32(b, 28, s.exp_stat_sn);
                put32(b, 40, s.beg_run);
                put32(b, 44, s.run_length);
            }
            Repr::R2t(r) => {
                b[1] = F;
                put64(b, 8, r.lun);
                put32(b, 16, r.itt);
                put32(b, 20, r.ttt);
                put32(b, 24, r.stat_sn);
                put32(b, 28, r.exp_cmd_sn);
                put32(b, 32, r.max_cmd_sn);
                put32(b, 36, r.r2t_sn);
                put32(b, 40, r.buffer_offset);
                put32(b, 44, r.desired_len);
            }
            Repr::AsyncMessage(a) => {
                b[1] = F;
                put64(b, 8, a.lun);
                put32(b, 16, RESERVED_TAG);
                put32(b, 24, a.stat_sn);
                put32(b, 28, a.exp_cmd_sn);
                put32(b, 32, a.max_cmd_sn);
                b[36] = a.event;
                b[37] = a.vcode;
                put16(b, 38, a.param1);
                put16(b, 40, a.param2);
                put16(b, 42, a.param3);
            }
            Repr::Reject(r) => {
                b[1] = F;
                b[2] = r.reason;
                put32(b, 16, RESERVED_TAG);
                put32(b, 24, r.stat_sn);
                put32(b, 28, r.exp_cmd_sn);
                put32(b, 32, r.max_cmd_sn);
                put32(b, 36, r.data_sn);
            }
        }
    }
}

/// The 8-byte LUN field for LUN `n` < 16,384 in SAM's single-level format (peripheral
/// device addressing below 256, flat space addressing above), as targets report it.
pub fn lun_field(n: u16) -> u64 {
    if n < 256 {
        u64::from(n) << 48
    } else {
        (0x4000 | u64::from(n & 0x3fff)) << 48
    }
}

/// The LUN a single-level LUN field names (the inverse of [`lun_field`]); `None` for other
/// addressing methods or levels.
pub fn lun_index(field: u64) -> Option<u16> {
    if field & 0x0000_ffff_ffff_ffff != 0 {
        return None;
    }
    let top = (field >> 48) as u16;
    match top >> 14 {
        0 if top >> 8 == 0 => Some(top & 0xff),
        1 => Some(top & 0x3fff),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_repr() -> Vec<Repr> {
        let lun = lun_field(3);
        vec![
            Repr::NopOut(Nop {
                immediate: true,
                lun,
                itt: 7,
                ttt: RESERVED_TAG,
                sn: 10,
                exp_sn: 11,
                max_cmd_sn: 0,
            }),
            Repr::NopIn(Nop {
                immediate: false,
                lun,
                itt: RESERVED_TAG,
                ttt: 9,
                sn: 1,
                exp_sn: 2,
                max_cmd_sn: 33,
            }),
            Repr::ScsiCommand(ScsiCommand {
                immediate: false,
                final_: false,
                read: false,
                write: true,
                attr: 1,
                lun,
                itt: 0x0102_0304,
                expected_len: 65536,
                cmd_sn: 5,
                exp_stat_sn: 6,
                cdb: [0x2a, 0, 0, 0, 0, 8, 0, 0, 0x80, 0, 0, 0, 0, 0, 0, 0],
            }),
            Repr::ScsiResponse(ScsiResponse {
                underflow: true,
                status: 2,
                itt: 4,
                stat_sn: 8,
                exp_cmd_sn: 9,
                max_cmd_sn: 40,
                exp_data_sn: 3,
                residual: 512,
                ..Default::default()
            }),
            Repr::TaskMgmtRequest(TaskMgmtRequest {
                immediate: true,
                function: 1,
                lun,
                itt: 12,
                ref_task_tag: 4,
                cmd_sn: 13,
                exp_stat_sn: 14,
                ref_cmd_sn: 5,
                exp_data_sn: 0,
            }),
            Repr::TaskMgmtResponse(TaskMgmtResponse {
                response: 1,
                itt: 12,
                stat_sn: 15,
                exp_cmd_sn: 16,
                max_cmd_sn: 17,
            }),
            Repr::LoginRequest(Login {
                transit: true,
                cont: false,
                csg: 1,
                nsg: 3,
                version_max: 0,
                version: 0,
                isid: [0x80, 1, 2, 3, 4, 5],
                tsih: 0,
                itt: 0,
                cid: 1,
                sn: 100,
                exp_sn: 0,
                max_cmd_sn: 0,
                status_class: 0,
                status_detail: 0,
            }),
            Repr::LoginResponse(Login {
                transit: true,
                cont: false,
                csg: 1,
                nsg: 3,
                version_max: 0,
                version: 0,
                isid: [0x80, 1, 2, 3, 4, 5],
                tsih: 9,
                itt: 0,
                cid: 0,
                sn: 1,
                exp_sn: 100,
                max_cmd_sn: 131,
                status_class: 2,
                status_detail: 1,
            }),
            Repr::TextRequest(Text {
                immediate: true,
                final_: true,
                cont: false,
                lun: 0,
                itt: 3,
                ttt: RESERVED_TAG,
                sn: 4,
                exp_sn: 5,
                max_cmd_sn: 0,
            }),
            Repr::TextResponse(Text {
                immediate: false,
                final_: false,
                cont: true,
                lun: 0,
                itt: 3,
                ttt: 77,
                sn: 6,
                exp_sn: 7,
                max_cmd_sn: 8,
            }),
            Repr::DataOut(DataOut {
                final_: true,
                lun,
                itt: 4,
                ttt: 0x55,
                exp_stat_sn: 6,
                data_sn: 2,
                buffer_offset: 16384,
            }),
            Repr::DataIn(DataIn {
                final_: true,
                status: Some(0),
                underflow: true,
                lun,
                itt: 4,
                ttt: RESERVED_TAG,
                stat_sn: 9,
                exp_cmd_sn: 10,
                max_cmd_sn: 41,
                data_sn: 7,
                buffer_offset: 8192,
                residual: 100,
                ..Default::default()
            }),
            Repr::LogoutRequest(LogoutRequest {
                immediate: true,
                reason: 0,
                itt: 20,
                cid: 1,
                cmd_sn: 21,
                exp_stat_sn: 22,
            }),
            Repr::LogoutResponse(LogoutResponse {
                response: 0,
                itt: 20,
                stat_sn: 23,
                exp_cmd_sn: 24,
                max_cmd_sn: 25,
                time2wait: 2,
                time2retain: 20,
            }),
            Repr::Snack(Snack {
                kind: 1,
                lun,
                itt: 4,
                ttt: 0,
                exp_stat_sn: 9,
                beg_run: 3,
                run_length: 0,
            }),
            Repr::R2t(R2t {
                lun,
                itt: 4,
                ttt: 0x55,
                stat_sn: 9,
                exp_cmd_sn: 10,
                max_cmd_sn: 41,
                r2t_sn: 1,
                buffer_offset: 262_144,
                desired_len: 262_144,
            }),
            Repr::AsyncMessage(AsyncMessage {
                lun,
                stat_sn: 30,
                exp_cmd_sn: 31,
                max_cmd_sn: 32,
                event: 255,
                vcode: 1,
                param1: 2,
                param2: 3,
                param3: 4,
            }),
            Repr::Reject(Reject {
                reason: 9,
                stat_sn: 30,
                exp_cmd_sn: 31,
                max_cmd_sn: 32,
                data_sn: 0,
            }),
        ]
    }

    #[test]
    fn every_opcode_round_trips_with_and_without_digests() {
        for framing in [
            Framing::default(),
            Framing {
                header_digest: true,
                data_digest: true,
            },
        ] {
            for repr in every_repr() {
                for data in [&b""[..], b"a", b"InitiatorName=iqn.x"] {
                    let mut out = Vec::new();
                    let n = framing.emit(&repr, &[], data, &mut out).unwrap();
                    assert_eq!(n, out.len());
                    assert_eq!(framing.pdu_len(&out).unwrap(), out.len());
                    assert_eq!(out.len() % 4, 0, "padded to 4 bytes");
                    let pdu = framing.parse(&out).unwrap().expect("whole PDU");
                    assert_eq!(pdu.len, out.len());
                    assert_eq!(pdu.data, data);
                    assert_eq!(pdu.repr().unwrap(), repr, "{repr:?}");
                    let want = if framing.data_digest && !data.is_empty() {
                        DigestCheck::Good
                    } else {
                        DigestCheck::None
                    };
                    assert_eq!(pdu.data_digest, want);
                    // every proper prefix is incomplete, never an error
                    for cut in [0, 1, 47, 48, out.len() - 1].map(|c| c.min(out.len() - 1)) {
                        assert!(framing.parse(&out[..cut]).unwrap().is_none());
                    }
                }
            }
        }
    }

    #[test]
    fn the_bhs_layout_is_rfc_7143s() {
        // A Login Request as libiscsi sends its first one: byte 0 is 0x43 (I + opcode),
        // byte 1 T|CSG=1|NSG=3 = 0x87, ISID at 8, CID at 20, CmdSN at 24.
        let Repr::LoginRequest(l) = every_repr()[6] else {
            unreachable!()
        };
        let mut out = Vec::new();
        Framing::default()
            .emit(&Repr::LoginRequest(l), &[], b"AuthMethod=None\0", &mut out)
            .unwrap();
        assert_eq!(&out[..4], &[0x43, 0x87, 0, 0]);
        assert_eq!(&out[4..8], &[0, 0, 0, 16], "TotalAHSLength 0, DSL 16");
        assert_eq!(&out[8..14], &[0x80, 1, 2, 3, 4, 5]);
        assert_eq!(&out[20..22], &[0, 1]);
        assert_eq!(&out[24..28], &100u32.to_be_bytes());
        // A Data-In with status: F and S set, status in byte 3.
        let mut out = Vec::new();
        Framing::default()
            .emit(&every_repr()[11], &[], b"", &mut out)
            .unwrap();
        assert_eq!(out[0], 0x25);
        assert_eq!(out[1], 0x80 | 0x02 | 0x01);
        assert_eq!(&out[40..44], &8192u32.to_be_bytes());
    }

    #[test]
    fn digests_are_crc32c_and_catch_a_flipped_bit() {
        // RFC 3720 B.4: 32 bytes of zeros have CRC32C 0x8a9136aa.
        assert_eq!(crc32c(&[&[0u8; 32]]), 0x8a91_36aa);
        let f = Framing {
            header_digest: true,
            data_digest: true,
        };
        let mut out = Vec::new();
        f.emit(&every_repr()[10], &[], &[7u8; 1000], &mut out)
            .unwrap();
        let mut bad = out.clone();
        bad[60] ^= 1; // in the data segment
        let pdu = f.parse(&bad).unwrap().unwrap();
        assert!(matches!(pdu.data_digest, DigestCheck::Bad { .. }));
        assert_eq!(
            pdu.repr().unwrap(),
            every_repr()[10],
            "the header is intact"
        );
        let mut bad = out.clone();
        bad[20] ^= 1; // in the header
        assert!(matches!(f.parse(&bad), Err(WireError::HeaderDigest { .. })));
    }

    #[test]
    fn forbidden_values_and_unknown_opcodes_are_errors() {
        let mut bhs = [0u8; BHS_LEN];
        bhs[0] = 0x07;
        assert_eq!(Repr::parse(&bhs), Err(WireError::UnknownOpcode(7)));
        let mut bhs = [0u8; BHS_LEN];
        bhs[0] = 0x43;
        bhs[1] = 0xc0 | (1 << 2) | 3; // T and C
        assert!(matches!(Repr::parse(&bhs), Err(WireError::Malformed(_))));
        bhs[1] = 0x80 | (2 << 2) | 3; // CSG 2
        assert!(matches!(Repr::parse(&bhs), Err(WireError::Malformed(_))));
        let mut bhs = [0u8; BHS_LEN];
        bhs[0] = 0x25;
        bhs[1] = 0x01; // S without F
        assert!(matches!(Repr::parse(&bhs), Err(WireError::Malformed(_))));
        let f = Framing::default();
        let mut out = Vec::new();
        assert!(f.emit(&every_repr()[0], &[0; 3], b"", &mut out).is_err());
        assert!(out.is_empty(), "nothing emitted on error");
    }

    #[test]
    fn ahs_is_framed_and_counted_in_words() {
        let f = Framing {
            header_digest: true,
            data_digest: false,
        };
        let ahs = [
            0u8, 20, 1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 0, 0,
        ];
        let mut out = Vec::new();
        f.emit(&every_repr()[2], &ahs, b"x", &mut out).unwrap();
        assert_eq!(out[4], 6, "24 bytes of AHS = 6 words");
        let pdu = f.parse(&out).unwrap().unwrap();
        assert_eq!(pdu.ahs, &ahs);
        assert_eq!(pdu.data, b"x");
    }

    #[test]
    fn lun_fields_round_trip() {
        for n in [0u16, 1, 255, 256, 16_383] {
            assert_eq!(lun_index(lun_field(n)), Some(n));
        }
        assert_eq!(lun_field(0), 0);
        assert_eq!(lun_field(1), 0x0001_0000_0000_0000);
        assert_eq!(lun_index(0x0001_0000_0000_0001), None, "second level");
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..400),
            hd in proptest::bool::ANY,
            dd in proptest::bool::ANY,
        ) {
            let f = Framing { header_digest: hd, data_digest: dd };
            if let Ok(Some(pdu)) = f.parse(&bytes) {
                proptest::prop_assert!(pdu.len <= bytes.len());
                let _ = pdu.repr();
            }
            if bytes.len() >= BHS_LEN {
                let bhs: [u8; BHS_LEN] = bytes[..BHS_LEN].try_into().unwrap();
                if let Ok(r) = Repr::parse(&bhs) {
                    // what parses re-emits to a header that parses the same
                    let mut again = [0u8; BHS_LEN];
                    r.emit(&mut again);
                    proptest::prop_assert_eq!(Repr::parse(&again), Ok(r));
                }
            }
        }
    }
}
