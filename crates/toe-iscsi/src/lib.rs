//! iSCSI (RFC 7143) for toemu, in pure layers that own no socket, thread or clock:
//!
//! 1. [`wire`]: PDU views and representations (the 48-byte BHS, AHS, header and data
//!    digests, padding), parse and emit, every length checked;
//! 2. [`text`]: text keys (`key=value` pairs) and their negotiation;
//! 3. [`login`]: the target's and the initiator's login machines (security stage with
//!    CHAP, operational negotiation, discovery and normal sessions);
//! 4. [`scsi`]: the disk's command set over a [`scsi::BlockStore`], with [`pr`], its
//!    persistent reservations;
//! 5. [`initiator`]: an initiator connection as a byte-stream machine (login, commands
//!    at any queue depth within the CmdSN window, reads, writes with R2T, text, logout);
//! 6. [`target`]: a target connection as a byte-stream machine (login, then discovery,
//!    NOP and Logout in full-feature phase; the SCSI layer comes next).
//!
//! The session and connection machines, login, the SCSI target and initiator and the NIC
//! engine build on these (see `DESIGN.md`, "iSCSI").

pub mod initiator;
pub mod login;
pub mod pr;
pub mod scsi;
pub mod target;
pub mod text;
pub mod wire;
