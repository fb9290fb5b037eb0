//! iSCSI (RFC 7143) for toemu, in pure layers that own no socket, thread or clock:
//!
//! 1. [`wire`]: PDU views and representations (the 48-byte BHS, AHS, header and data
//!    digests, padding), parse and emit, every length checked;
//! 2. [`text`]: text keys (`key=value` pairs) and their negotiation;
//! 3. [`login`]: the target's and the initiator's login machines (security stage with
//!    CHAP, operational negotiation, discovery and normal sessions);
//! 4. [`scsi`]: the disk's command set over a [`scsi::BlockStore`], with [`pr`], its
//!    persistent reservations;
//! 5. [`transport`]: what the connection machines exchange with the transport under them,
//!    PDU by PDU (received data inline or already placed in a task's buffer; PDUs to send
//!    from inline bytes or a task's buffer; the task buffers), and the software transport
//!    over a byte stream — the seam where the NIC's iSCSI engine plugs in;
//! 6. [`initiator`]: an initiator connection (login, commands at any queue depth within
//!    the CmdSN window, reads, writes with R2T, text, logout);
//! 7. [`target`]: a target connection (login, discovery, NOP keep-alive, Logout, Task
//!    Management, and SCSI commands on a [`scsi::Disk`]).
//!
//! 8. [`engine`]: the NIC's iSCSI engine for an offloaded connection (digests, placement
//!    by task tag, large PDU send);
//! 9. [`offload`]: the host side of a connection on a TOE (software login, then the
//!    engine; task buffers moving between application memory, host memory and the NIC).
//!
//! 10. [`accel`]: write acceleration over asymmetric WANs (seed 000): a private login
//!     key, dynamic R2T, combined SCSI/TCP acknowledgements, batched responses, back-off;
//! 11. [`proxy`]: proxy I/O in a target cluster (seed 001): the LBA map and the primary's
//!     command contexts by proxy task ID (the cluster's runtime is not built yet).
//!
//! See `DESIGN.md`, "iSCSI" and "The ULP engine slot".

pub mod accel;
pub mod engine;
pub mod initiator;
pub mod login;
pub mod offload;
pub mod pr;
pub mod proxy;
pub mod scsi;
pub mod target;
pub mod text;
pub mod transport;
pub mod wire;
