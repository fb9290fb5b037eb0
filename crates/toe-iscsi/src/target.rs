//! One target-side connection as a pure machine over a [`Transport`]: received PDUs go in
//! ([`TargetConn::on_pdu`]; their data inline or already placed in a task's buffer), PDUs to
//! send and task buffers go out to the transport. Over the software transport the machine
//! takes and gives bytes ([`TargetConn::on_bytes`]), and the caller (a std-TCP or emulated
//! TOE shell) only moves them.
//!
//! Commands run in CmdSN order (one ahead of ExpCmdSN waits for those before it; one
//! outside the window is dropped silently).
//!
//! Implemented: login (see [`crate::login`]), then full-feature phase with Text
//! `SendTargets` (discovery), NOP-Out pings, Logout, Task Management, and in a normal
//! session SCSI commands on LUN 0's [`Disk`]: reads answered with Data-In PDUs of the
//! initiator's MaxRecvDataSegmentLength (status in the last one), writes gathered from
//! immediate data, unsolicited Data-Out and R2Ts (MaxBurstLength each, at most
//! MaxOutstandingR2T outstanding), residuals with the O/U bits, sense data with CHECK
//! CONDITION.
//! A PDU that cannot be framed (a header digest mismatch, an unknown opcode) ends the
//! connection, as ERL 0 prescribes; the counters say why.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use toe_bus::HostBuf;

use crate::accel::AccelConfig;
use crate::login::{Negotiated, SessionType, TargetConfig, TargetLogin};
use crate::scsi::{Disk, Nexus, Outcome, RwRange, Sense, Transfer, CHECK_CONDITION, GOOD};
use crate::text;
use crate::transport::{
    DataInBurst, FrameError, RxData, RxPdu, Software, Stream, Transport, TxData,
};
use crate::wire::{
    lun_index, AsyncMessage, DataOut, LogoutResponse, Nop, R2t, Reject, Repr, ScsiCommand,
    ScsiResponse, TaskMgmtRequest, TaskMgmtResponse, Text, WireError, RESERVED_TAG,
};

/// Largest write one command may carry, bytes (the gathering buffer's bound).
pub const MAX_WRITE_BYTES: u32 = 16 << 20;

/// Most bytes all of one connection's writes may gather at once; a write beyond it gets
/// TASK SET FULL (the initiator retries), so a peer that announces writes and sends no data
/// cannot make the target's memory grow.
pub const MAX_GATHER_BYTES_PER_CONN: u64 = 64 << 20;

/// SCSI status TASK SET FULL.
const TASK_SET_FULL: u8 = 0x28;

/// Most proxied commands one connection has waiting for their members at once; one more
/// gets TASK SET FULL (the initiator retries), so members that answer slowly cannot make
/// the primary's memory grow.
pub const MAX_PROXIED_PER_CONN: usize = 256;

/// A READ or WRITE a connection in proxy mode ([`TargetConn::with_proxy`]) hands to the
/// primary instead of running it on its disk: admitted by the volume's [`Disk`] (unit
/// attention, reservations, range, limits), its blocks still to be moved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyRequest {
    /// The initiator's task tag.
    pub itt: u32,
    /// The command as the initiator sent it.
    pub cdb: [u8; 16],
    /// Its blocks.
    pub range: RwRange,
    /// A write's data (at most `range.blocks` blocks; fewer if the initiator sent fewer
    /// whole blocks); empty for a read, and for a write whose data is in host memory.
    pub data: Vec<u8>,
    /// The write's data is in host memory, all `range.blocks` blocks of it, where the
    /// transport received it: [`TargetConn::take_host_write`] hands it over.
    pub in_host: bool,
}

/// What a connection in proxy mode asks of the primary ([`TargetConn::take_proxy_events`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyEvent {
    /// Move this command's blocks; answer with [`TargetConn::proxy_done`].
    Command(ProxyRequest),
    /// The initiator aborted task `itt` (ABORT TASK, or its whole task set): forget it, and
    /// abort what went to members for it. The connection has answered the initiator.
    Abort {
        /// The aborted task's tag.
        itt: u32,
    },
    /// A LOGICAL UNIT RESET (function 5) or TARGET WARM RESET (6) the members should see
    /// too; every proxied command of the connection was aborted first ([`ProxyEvent::Abort`]).
    Reset {
        /// The task management function.
        function: u8,
    },
}

/// Whether `op` is a medium-access command a proxy-mode connection does not run: its
/// blocks are on members, and only READ, WRITE and WRITE AND VERIFY are proxied (the
/// others would act on the volume's placeholder medium).
fn proxy_refuses(op: u8) -> bool {
    matches!(
        op,
        0x04 | 0x2f | 0xaf | 0x8f | 0x41 | 0x93 | 0x42 | 0x89 | 0x8b | 0x34 | 0x90
    )
}

/// A write gathering its data (into the transport's buffer for its ITT).
struct WriteTask {
    cmd: ScsiCommand,
    received: u32,
    /// Unsolicited Data-Out may still come (F not seen yet).
    unsolicited: bool,
    /// Offset the next R2T asks from.
    next_offset: u32,
    outstanding_r2t: u32,
    r2t_sn: u32,
    /// The DataSN each open sequence expects next, by Target Transfer Tag (the reserved
    /// tag for unsolicited data).
    data_sn: HashMap<u32, u32>,
}

/// What a proxied write's answer needs: the bytes its CDB asked for (for the residual)
/// and the R2Ts it took (the response's ExpDataSN).
type WriteDone = (Option<u64>, u32);

/// Reject reasons (RFC 7143 §11.17.1).
pub mod reject_reason {
    /// Data (payload) digest error.
    pub const DATA_DIGEST: u8 = 0x02;
    /// Protocol error.
    pub const PROTOCOL_ERROR: u8 = 0x04;
    /// Command not supported.
    pub const NOT_SUPPORTED: u8 = 0x05;
    /// Invalid PDU field.
    pub const INVALID_FIELD: u8 = 0x09;
}

/// Why a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// The initiator logged out.
    LoggedOut,
    /// The login failed (the status was sent).
    LoginFailed(crate::login::LoginStatus),
    /// A PDU could not be framed.
    Wire(WireError),
    /// A PDU whose data segment (this many bytes) is longer than the target's
    /// MaxRecvDataSegmentLength.
    Oversized(usize),
    /// The NIC's engine ended the received stream (see
    /// [`crate::transport::FrameError::Engine`]).
    Engine(String),
    /// The initiator left a NOP-In ping unanswered for the keep-alive timeout (its host or
    /// the path is gone).
    PeerSilent,
}

/// The target's NOP-In keep-alive: after `interval_us` without a PDU from the initiator, a
/// NOP-In ping (with a Target Transfer Tag, which the initiator must answer with a NOP-Out);
/// no answer within `timeout_us` ends the connection. Microseconds of the caller's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepAlive {
    /// Idle time before a ping, µs.
    pub interval_us: u64,
    /// Time a ping may go unanswered, µs.
    pub timeout_us: u64,
}

/// Counters of one connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnStats {
    /// PDUs received.
    pub pdus_in: u64,
    /// PDUs sent.
    pub pdus_out: u64,
    /// Rejects sent.
    pub rejects: u64,
    /// Data digest failures.
    pub data_digest_errors: u64,
    /// Writes ended because a Data-Out broke its sequence's DataSN order.
    pub data_sequence_errors: u64,
    /// Bytes run through CRC32C for digests, sent and received (see
    /// [`Framing::digested_len`](crate::wire::Framing::digested_len)).
    pub digest_bytes: u64,
    /// Data bytes the transport copied within application memory (see
    /// [`Transport::copy_bytes`]).
    pub copy_bytes: u64,
    /// R2Ts sent.
    pub r2t_sent: u64,
    /// Write responses that were held and went out in a batch of two or more.
    pub responses_batched: u64,
    /// Batches of held write responses sent.
    pub response_batches: u64,
    /// Writes refused for lack of buffer room with a back-off message (write acceleration).
    pub backoffs: u64,
    /// Dynamic-R2T messages sent (R2T required, or unsolicited data allowed again).
    pub r2t_signals: u64,
    /// Congestion reports received from the initiator.
    pub congestion_reports: u64,
}

impl std::ops::AddAssign for ConnStats {
    /// Sum counters (of several connections).
    fn add_assign(&mut self, o: ConnStats) {
        self.pdus_in += o.pdus_in;
        self.pdus_out += o.pdus_out;
        self.rejects += o.rejects;
        self.data_digest_errors += o.data_digest_errors;
        self.data_sequence_errors += o.data_sequence_errors;
        self.digest_bytes += o.digest_bytes;
        self.copy_bytes += o.copy_bytes;
        self.r2t_sent += o.r2t_sent;
        self.responses_batched += o.responses_batched;
        self.response_batches += o.response_batches;
        self.backoffs += o.backoffs;
        self.r2t_signals += o.r2t_signals;
        self.congestion_reports += o.congestion_reports;
    }
}

enum Phase {
    Login(Box<TargetLogin>),
    FullFeature(Box<Negotiated>),
    Closed(Ended),
}

/// A target-side connection over transport `T` (by default the software one, over a byte
/// stream).
pub struct TargetConn<T: Transport = Software> {
    cfg: TargetConfig,
    /// Every target this portal offers to discovery: (TargetName, TargetAddress).
    targets: Vec<(String, String)>,
    phase: Phase,
    io: T,
    stat_sn: u32,
    exp_cmd_sn: u32,
    stats: ConnStats,
    disk: Option<Arc<Mutex<Disk>>>,
    writes: HashMap<u32, WriteTask>,
    next_ttt: u32,
    /// The rest of a Text Response longer than the initiator's MaxRecvDataSegmentLength:
    /// (its ITT, its TTT, the bytes not sent yet). Sent on the initiator's empty Text
    /// Request with that TTT (RFC 7143 §11.10.4).
    text_out: Option<(u32, u32, Vec<u8>)>,
    /// Writes this side ended before their data was all in (a digest or DataSN error), the
    /// latest [`ENDED_WRITES_KEPT`]: Data-Out PDUs still in flight for them are dropped
    /// without a Reject.
    ended_writes: VecDeque<u32>,
    /// This connection's I_T nexus, as the disk's reservations know it (its initiator
    /// port, from the login); [`Nexus::LOCAL`] until the login ends.
    nexus: Nexus,
    keepalive: Option<KeepAlive>,
    /// A PDU came since the last [`TargetConn::poll`].
    heard: bool,
    /// When the initiator was last heard from (µs, as of a poll).
    last_heard: Option<u64>,
    /// The ping awaiting its NOP-Out: (TTT, sent at µs).
    ping: Option<(u32, u64)>,
    /// Commands received ahead of ExpCmdSN, by CmdSN (within the window, so at most
    /// `cmd_window` of them, each at most a data segment long).
    held: std::collections::BTreeMap<u32, HeldPdu>,
    /// The write-acceleration policy (used once a session negotiated it).
    accel: AccelConfig,
    /// The latest time [`TargetConn::on_time`] was given, µs.
    now_us: u64,
    /// Dynamic R2T: the initiator was told to wait for R2Ts.
    r2t_required: bool,
    /// The initiator reports congestion: no held ACKs, no delayed responses.
    congested: bool,
    /// Write responses held for a batch (at most `accel.batch_max`), and when the first
    /// was held, µs.
    batch: Vec<(Repr, Vec<u8>)>,
    batch_since: u64,
    /// When the latest write completed, µs.
    last_write_done: Option<u64>,
    /// The write-back model: completed writes stay in the write buffer until the backing
    /// store takes them at this rate, bytes per second (`None`: at once).
    destage_rate: Option<u64>,
    /// Bytes of completed writes not destaged yet, and when that was last brought up to
    /// date (µs).
    destaging: u64,
    destaged_at: u64,
    /// Proxy mode: READs and WRITEs go to the primary ([`TargetConn::with_proxy`]).
    proxied: bool,
    /// What the primary has to do, oldest first (bounded: at most one event per proxied
    /// command, abort and reset, and [`MAX_PROXIED_PER_CONN`] commands).
    proxy_out: VecDeque<ProxyEvent>,
    /// Proxied commands awaiting [`TargetConn::proxy_done`]: the command, and for a write
    /// the bytes its CDB asked for and the R2Ts it took.
    deferred: HashMap<u32, (ScsiCommand, Option<WriteDone>)>,
    /// Proxied writes' data in host memory, until [`TargetConn::take_host_write`].
    host_writes: HashMap<u32, HostBuf>,
}

/// A command PDU that came ahead of its CmdSN's turn, kept until the ones before it come.
struct HeldPdu {
    bhs: [u8; crate::wire::BHS_LEN],
    inline: Vec<u8>,
    placed: Option<(u32, u32)>,
    data_digest: crate::wire::DigestCheck,
}

impl HeldPdu {
    fn of(p: &RxPdu<'_>) -> HeldPdu {
        HeldPdu {
            bhs: *p.bhs,
            inline: p.inline().to_vec(),
            placed: match p.data {
                RxData::Placed { offset, len } => Some((offset, len)),
                RxData::Inline(_) => None,
            },
            data_digest: p.data_digest,
        }
    }

    fn rx(&self) -> RxPdu<'_> {
        RxPdu {
            bhs: &self.bhs,
            data: match self.placed {
                Some((offset, len)) => RxData::Placed { offset, len },
                None => RxData::Inline(&self.inline),
            },
            data_digest: self.data_digest,
        }
    }
}

/// The block size of `disk`, bytes.
fn block_of(disk: &Arc<Mutex<Disk>>) -> u32 {
    disk.lock().expect("disk lock").block_size()
}

/// How many ended writes [`TargetConn`] remembers, to drop their late Data-Out quietly.
const ENDED_WRITES_KEPT: usize = 64;

/// The connection is gone, and with it (one connection per session) its I_T nexus: a
/// reservation it held ends.
impl<T: Transport> Drop for TargetConn<T> {
    fn drop(&mut self) {
        self.release_nexus();
        for (_, b) in self.host_writes.drain() {
            self.io.free_host(b);
        }
    }
}

impl<T: Transport> std::fmt::Debug for TargetConn<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetConn")
            .field("stats", &self.stats)
            .field("ended", &self.ended())
            .finish()
    }
}

impl TargetConn<Software> {
    /// A connection for `cfg` over the software transport, offering `targets` (name,
    /// `ADDR:PORT,TPGT`) to discovery. `challenge` and `chap_id` are random (the caller's
    /// RNG), `tsih` the session handle a login gets.
    pub fn new(
        cfg: TargetConfig,
        targets: Vec<(String, String)>,
        challenge: [u8; 16],
        chap_id: u8,
        tsih: u16,
    ) -> Self {
        TargetConn::over(Software::default(), cfg, targets, challenge, chap_id, tsih)
    }
}

impl<T: Stream> TargetConn<T> {
    /// Run `f` with what it sends appended to `out`.
    fn lent<R>(&mut self, out: &mut Vec<u8>, f: impl FnOnce(&mut Self) -> R) -> R {
        self.io.lend_output(out);
        let r = f(self);
        self.io.lend_output(out);
        r
    }

    /// Take bytes received from the initiator; append what to send to `out`.
    pub fn on_bytes(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        if self.ended().is_some() {
            return;
        }
        self.heard |= !bytes.is_empty();
        let framed = self.lent(out, |c| {
            T::receive(
                c,
                |c| &mut c.io,
                bytes,
                |c, pdu| {
                    c.on_pdu(pdu);
                    c.ended().is_none()
                },
            )
        });
        match framed {
            Ok(()) => {}
            Err(FrameError::Oversized(n)) => self.phase = Phase::Closed(Ended::Oversized(n)),
            Err(FrameError::Wire(e)) => self.phase = Phase::Closed(Ended::Wire(e)),
            Err(FrameError::Engine(e)) => self.phase = Phase::Closed(Ended::Engine(e)),
        }
    }

    /// [`TargetConn::on_time`], appending what to send to `out`.
    pub fn poll(&mut self, now_us: u64, out: &mut Vec<u8>) {
        self.lent(out, |c| c.on_time(now_us))
    }

    /// [`TargetConn::answer_proxied`] over a byte stream: what it sends is appended to
    /// `out`.
    pub fn proxy_done(&mut self, itt: u32, o: Outcome, out: &mut Vec<u8>) -> bool {
        self.lent(out, |m| m.answer_proxied(itt, o))
    }

    /// [`TargetConn::answer_proxied_host`] over a byte stream: what it sends is appended to
    /// `out`.
    pub fn proxy_done_host(
        &mut self,
        itt: u32,
        o: Outcome,
        data: (HostBuf, usize),
        out: &mut Vec<u8>,
    ) -> Result<bool, (HostBuf, Outcome)> {
        self.lent(out, |m| m.answer_proxied_host(itt, o, data))
    }

    /// [`TargetConn::ask_logout`], appending what to send to `out`.
    pub fn request_logout(&mut self, within_s: u16, out: &mut Vec<u8>) -> bool {
        self.lent(out, |c| c.ask_logout(within_s))
    }
}

impl<T: Transport> TargetConn<T> {
    /// A connection over transport `io`; see [`TargetConn::new`].
    pub fn over(
        io: T,
        cfg: TargetConfig,
        targets: Vec<(String, String)>,
        challenge: [u8; 16],
        chap_id: u8,
        tsih: u16,
    ) -> Self {
        let login = TargetLogin::new(cfg.clone(), challenge, chap_id, 1, tsih);
        TargetConn {
            cfg,
            targets,
            phase: Phase::Login(Box::new(login)),
            io,
            stat_sn: 1,
            exp_cmd_sn: 0,
            stats: ConnStats::default(),
            disk: None,
            writes: HashMap::new(),
            next_ttt: 1,
            text_out: None,
            ended_writes: VecDeque::new(),
            nexus: Nexus::LOCAL,
            keepalive: None,
            heard: false,
            last_heard: None,
            ping: None,
            held: std::collections::BTreeMap::new(),
            accel: AccelConfig::default(),
            now_us: 0,
            r2t_required: false,
            congested: false,
            batch: Vec::new(),
            batch_since: 0,
            last_write_done: None,
            destage_rate: None,
            destaging: 0,
            destaged_at: 0,
            proxied: false,
            proxy_out: VecDeque::new(),
            deferred: HashMap::new(),
            host_writes: HashMap::new(),
        }
    }

    /// Proxy mode, for the front connections of a cluster's primary: the disk given with
    /// [`TargetConn::with_disk`] is the volume's (its capacity, inquiry data, mode pages and
    /// reservations answer the initiator), but the blocks of READs and WRITEs are moved by
    /// the primary: each admitted one becomes a [`ProxyEvent::Command`], answered later
    /// with [`TargetConn::proxy_done`]. Other medium-access commands (WRITE SAME, UNMAP,
    /// VERIFY, COMPARE AND WRITE, PRE-FETCH, FORMAT UNIT, WRITE AND VERIFY) end in CHECK
    /// CONDITION, INVALID COMMAND OPERATION CODE.
    pub fn with_proxy(mut self) -> Self {
        self.proxied = true;
        self
    }

    /// What the primary has to do since the last call, oldest first (proxy mode).
    pub fn take_proxy_events(&mut self) -> impl Iterator<Item = ProxyEvent> + '_ {
        self.proxy_out.drain(..)
    }

    /// Proxied commands waiting for their answer.
    pub fn proxied_in_flight(&self) -> usize {
        self.deferred.len()
    }

    /// The answer to proxied command `itt`: a read's data in `o.data_in` (all of it, in
    /// order), the status and sense as merged from the members. Sent at once to the
    /// transport (a read's data as Data-In PDUs of the initiator's
    /// MaxRecvDataSegmentLength, the status in the last). False, and nothing sent, if no
    /// such command waits (it was aborted, or the connection ended). Over a byte stream,
    /// use [`TargetConn::proxy_done`].
    pub fn answer_proxied(&mut self, itt: u32, o: Outcome) -> bool {
        let Some((c, write)) = self.deferred.remove(&itt) else {
            return false;
        };
        if self.ended().is_some() {
            return false;
        }
        match write {
            Some((wanted, r2ts)) => self.finish_write(c, o, wanted, r2ts),
            None => self.finish(c, o),
        }
        true
    }

    /// [`TargetConn::answer_proxied`] of a read whose data is the first `data.1` bytes of
    /// `data.0`, in this connection's host memory ([`Transport::open_host`]); `o.data_in`
    /// is ignored. The transport sends the Data-In from that buffer, without a copy, and
    /// frees it. `Ok(false)` (the buffer freed) if no such command waits; `Err` with the
    /// buffer and the outcome, nothing done, if the transport has no host memory (copy the
    /// data out and use [`TargetConn::answer_proxied`]).
    pub fn answer_proxied_host(
        &mut self,
        itt: u32,
        o: Outcome,
        data: (HostBuf, usize),
    ) -> Result<bool, (HostBuf, Outcome)> {
        let (buf, len) = data;
        let mut o = o;
        o.data_in.clear();
        let waits = self.ended().is_none()
            && matches!(self.deferred.get(&itt), Some((_, None)))
            && o.status == GOOD
            && len > 0;
        if !waits {
            self.io.free_host(buf);
            return Ok(self.answer_proxied(itt, o));
        }
        if let Err(buf) = self.io.open_host(itt, buf) {
            return Err((buf, o));
        }
        let (c, _) = self.deferred.remove(&itt).expect("checked above");
        self.send_read(c, len);
        Ok(true)
    }

    /// A proxied write's data in host memory ([`ProxyRequest::in_host`]), taken once; the
    /// caller frees it or hands it on (to a back connection of the same host).
    pub fn take_host_write(&mut self, itt: u32) -> Option<HostBuf> {
        self.host_writes.remove(&itt)
    }

    /// Hand admitted command `c` (with a write's `data`) to the primary, or refuse it with
    /// TASK SET FULL while too many wait.
    fn defer(
        &mut self,
        c: ScsiCommand,
        range: RwRange,
        data: Vec<u8>,
        write: Option<(Option<u64>, u32)>,
    ) {
        if self.deferred.len() >= MAX_PROXIED_PER_CONN {
            if let Some(b) = self.host_writes.remove(&c.itt) {
                self.io.free_host(b);
            }
            let o = Outcome {
                status: TASK_SET_FULL,
                data_in: Vec::new(),
                sense: None,
            };
            return self.respond(c.itt, o, write.map_or(0, |w| w.1), (false, false, 0));
        }
        self.proxy_out.push_back(ProxyEvent::Command(ProxyRequest {
            itt: c.itt,
            cdb: c.cdb,
            range,
            data,
            in_host: self.host_writes.contains_key(&c.itt),
        }));
        self.deferred.insert(c.itt, (c, write));
    }

    /// Model a write-back target whose backing store is slower than the network: the data
    /// of each completed write (answered at once) stays in the write buffer and drains at
    /// `bytes_per_s`. Write acceleration's dynamic R2T and back-off watch that buffer. Only
    /// the accounting is modelled: the data is on the disk at once.
    pub fn with_destage(mut self, bytes_per_s: u64) -> Self {
        self.destage_rate = Some(bytes_per_s.max(1));
        self
    }

    /// The write-acceleration policy for sessions that negotiate it (see [`crate::accel`];
    /// whether the target accepts the key at all is [`crate::login::OpParams`]'s
    /// `write_acceleration`). Default: [`AccelConfig::default`].
    pub fn with_accel(mut self, a: AccelConfig) -> Self {
        self.accel = a;
        self
    }

    /// Whether this session runs with write acceleration (negotiated and enabled).
    pub fn accelerated(&self) -> bool {
        self.accel.enabled && self.negotiated().is_some_and(|n| n.write_acceleration)
    }

    /// The acknowledgement window in µs while the NIC should hold this connection's pure
    /// TCP ACKs for the SCSI Responses to carry (write acceleration with the combined
    /// acknowledgement, and no congestion reported); `None` while it should not. The shell
    /// applies changes to the NIC.
    pub fn ack_hold_us(&self) -> Option<u32> {
        (self.accelerated() && self.accel.combined_ack && !self.congested)
            .then_some(self.accel.ack_window_us.max(1))
    }

    /// The transport.
    pub fn transport(&self) -> &T {
        &self.io
    }

    /// The transport, to deliver what it received ([`TargetConn::on_pdu`]).
    pub fn transport_mut(&mut self) -> &mut T {
        &mut self.io
    }

    /// Ping an idle initiator and drop a silent one (see [`KeepAlive`]); call
    /// [`TargetConn::on_time`] with the time.
    pub fn with_keepalive(mut self, k: KeepAlive) -> Self {
        self.keepalive = Some(k);
        self
    }

    /// Time passes (`now_us`, µs of the caller's clock; it never goes back): the NOP-In
    /// keep-alive pings an idle initiator or ends the connection of one that did not
    /// answer. Nothing without [`TargetConn::with_keepalive`].
    pub fn on_time(&mut self, now_us: u64) {
        self.now_us = self.now_us.max(now_us);
        if let Some(rate) = self.destage_rate {
            let dt = self.now_us.saturating_sub(self.destaged_at);
            let drained = u128::from(rate) * u128::from(dt) / 1_000_000;
            // Less than a byte's worth of time keeps accruing (the close of a write into an
            // empty buffer restarts the clock).
            if drained > 0 {
                let drained = u64::try_from(drained).unwrap_or(u64::MAX);
                self.destaging = self.destaging.saturating_sub(drained);
                self.destaged_at = self.now_us;
            }
            self.check_buffer();
        }
        if !self.batch.is_empty()
            && self.now_us.saturating_sub(self.batch_since) >= self.accel.batch_delay_us
        {
            self.flush_batch();
        }
        let Some(k) = self.keepalive else {
            return;
        };
        if std::mem::take(&mut self.heard) || self.last_heard.is_none() {
            self.last_heard = Some(now_us);
        }
        if !matches!(self.phase, Phase::FullFeature(_)) {
            return;
        }
        let last = self.last_heard.unwrap_or(now_us);
        match self.ping {
            Some((_, sent)) if now_us.saturating_sub(sent) >= k.timeout_us => {
                self.phase = Phase::Closed(Ended::PeerSilent);
            }
            None if now_us.saturating_sub(last) >= k.interval_us => {
                let ttt = self.take_ttt();
                self.ping = Some((ttt, now_us));
                // A ping carries the current StatSN without taking one (RFC 7143 §11.19.2).
                let r = Repr::NopIn(Nop {
                    immediate: false,
                    lun: 0,
                    itt: RESERVED_TAG,
                    ttt,
                    sn: self.stat_sn,
                    exp_sn: self.exp_cmd_sn,
                    max_cmd_sn: self.max_cmd_sn(),
                });
                self.send(&r, TxData::Inline(&[]));
            }
            _ => {}
        }
    }

    /// Ask the initiator to log out within `within_s` seconds (an Async Message with
    /// AsyncEvent 1; the target is going away). Only a normal session in full-feature phase
    /// is asked; returns whether the message went out.
    pub fn ask_logout(&mut self, within_s: u16) -> bool {
        match &self.phase {
            Phase::FullFeature(n) if n.session_type != SessionType::Discovery => {}
            _ => return false,
        }
        let r = Repr::AsyncMessage(AsyncMessage {
            lun: 0,
            stat_sn: self.next_stat_sn(),
            exp_cmd_sn: self.exp_cmd_sn,
            max_cmd_sn: self.max_cmd_sn(),
            event: 1,
            vcode: 0,
            param1: 0,
            param2: 0,
            param3: within_s,
        });
        self.send(&r, TxData::Inline(&[]));
        true
    }

    /// When [`TargetConn::on_time`] has something to do next, in µs of the caller's clock (a
    /// ping, or the end of its wait); `None` without keep-alive or before the first poll.
    pub fn next_deadline(&self) -> Option<u64> {
        if !matches!(self.phase, Phase::FullFeature(_)) {
            return None;
        }
        let batch = (!self.batch.is_empty()).then(|| self.batch_since + self.accel.batch_delay_us);
        // While the buffer drains, its thresholds are looked at every millisecond.
        let destage = (self.destaging > 0).then(|| self.now_us + 1_000);
        let keepalive = self.keepalive.and_then(|k| match self.ping {
            Some((_, sent)) => Some(sent + k.timeout_us),
            None => self.last_heard.map(|t| t + k.interval_us),
        });
        batch.into_iter().chain(keepalive).chain(destage).min()
    }

    /// End this session's reservation on the disk, if it holds one (logout, or the
    /// connection's end).
    fn release_nexus(&mut self) {
        if self.nexus == Nexus::LOCAL {
            return;
        }
        if let Some(d) = &self.disk {
            if let Ok(mut d) = d.lock() {
                d.nexus_lost(&self.nexus);
            }
        }
    }

    /// Serve `disk` as LUN 0 of normal sessions (without one, SCSI commands are rejected).
    pub fn with_disk(mut self, disk: Arc<Mutex<Disk>>) -> Self {
        self.disk = Some(disk);
        self
    }

    /// Why the connection ended, once it has: the shell then closes the socket after
    /// sending what [`TargetConn::on_bytes`] returned.
    pub fn ended(&self) -> Option<&Ended> {
        match &self.phase {
            Phase::Closed(e) => Some(e),
            _ => None,
        }
    }

    /// The parameters in force, once in full-feature phase.
    pub fn negotiated(&self) -> Option<&Negotiated> {
        match &self.phase {
            Phase::FullFeature(n) => Some(n),
            _ => None,
        }
    }

    /// Counters.
    pub fn stats(&self) -> ConnStats {
        ConnStats {
            digest_bytes: self.io.digest_bytes(),
            copy_bytes: self.io.copy_bytes(),
            ..self.stats
        }
    }

    fn send(&mut self, repr: &Repr, data: TxData<'_>) {
        // Held write responses go first: StatSN order is kept on the wire.
        self.flush_batch();
        self.stats.pdus_out += 1;
        self.io.send(repr, data);
    }

    /// Send the held write responses, together.
    fn flush_batch(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.batch);
        if batch.len() > 1 {
            self.stats.responses_batched += batch.len() as u64;
            self.stats.response_batches += 1;
        }
        for (r, data) in batch {
            self.stats.pdus_out += 1;
            self.io.send(&r, TxData::Inline(&data));
        }
    }

    /// A vendor-specific Async Message of write acceleration (see [`crate::accel::vcode`]).
    fn send_vendor_async(&mut self, vcode: u8, param1: u16) {
        let r = Repr::AsyncMessage(AsyncMessage {
            lun: 0,
            stat_sn: self.next_stat_sn(),
            exp_cmd_sn: self.exp_cmd_sn,
            max_cmd_sn: self.max_cmd_sn(),
            event: crate::accel::ASYNC_VENDOR,
            vcode,
            param1,
            param2: 0,
            param3: 0,
        });
        self.send(&r, TxData::Inline(&[]));
    }

    /// Bytes the write buffer holds: the writes in progress (their whole lengths, as
    /// allocated) and, with [`TargetConn::with_destage`], completed writes not destaged yet.
    fn gathering(&self) -> u64 {
        let open: u64 = self
            .writes
            .values()
            .map(|t| u64::from(t.cmd.expected_len))
            .sum();
        open + self.destaging
    }

    /// Dynamic R2T: tell the initiator when the write buffer crosses a threshold.
    fn check_buffer(&mut self) {
        if !self.accelerated() {
            return;
        }
        if let Some(required) = self.accel.r2t_change(self.r2t_required, self.gathering()) {
            self.r2t_required = required;
            self.stats.r2t_signals += 1;
            let v = if required {
                crate::accel::vcode::R2T_REQUIRED
            } else {
                crate::accel::vcode::UNSOLICITED_OK
            };
            self.send_vendor_async(v, 0);
        }
    }

    fn max_cmd_sn(&self) -> u32 {
        self.exp_cmd_sn.wrapping_add(self.cfg.cmd_window.max(1) - 1)
    }

    fn next_stat_sn(&mut self) -> u32 {
        let s = self.stat_sn;
        self.stat_sn = self.stat_sn.wrapping_add(1);
        s
    }

    fn reject(&mut self, pdu: &RxPdu<'_>, reason: u8) {
        self.stats.rejects += 1;
        let r = Repr::Reject(Reject {
            reason,
            stat_sn: self.next_stat_sn(),
            exp_cmd_sn: self.exp_cmd_sn,
            max_cmd_sn: self.max_cmd_sn(),
            data_sn: 0,
        });
        let bhs = *pdu.bhs;
        self.send(&r, TxData::Inline(&bhs));
    }

    /// Take a PDU received from the initiator (its data inline, or already placed in the
    /// buffer of its task); what to send goes to the transport.
    pub fn on_pdu(&mut self, rx: RxPdu<'_>) {
        if self.ended().is_some() {
            return;
        }
        self.heard = true;
        self.stats.pdus_in += 1;
        self.take_pdu(&rx);
        // Commands that came ahead of their turn go once the ones before them have.
        while let Some(h) = self.held.remove(&self.exp_cmd_sn) {
            if self.ended().is_some() {
                break;
            }
            self.take_pdu(&h.rx());
        }
    }

    /// The CmdSN of a non-immediate command in `repr`.
    fn ordered_sn(repr: &Repr) -> Option<u32> {
        let (immediate, sn) = match repr {
            Repr::NopOut(n) => (n.immediate, n.sn),
            Repr::ScsiCommand(c) => (c.immediate, c.cmd_sn),
            Repr::TaskMgmtRequest(t) => (t.immediate, t.cmd_sn),
            Repr::TextRequest(t) => (t.immediate, t.sn),
            Repr::LogoutRequest(l) => (l.immediate, l.cmd_sn),
            _ => return None,
        };
        (!immediate).then_some(sn)
    }

    fn take_pdu(&mut self, pdu: &RxPdu<'_>) {
        let repr = match pdu.repr() {
            Ok(r) => r,
            Err(_) => return self.reject(pdu, reject_reason::INVALID_FIELD),
        };
        // The CmdSN window (RFC 7143 §3.2.2.1): a non-immediate command outside
        // [ExpCmdSN, MaxCmdSN] is dropped silently (ERL 0); one ahead of ExpCmdSN waits for
        // those before it, since commands are delivered in CmdSN order.
        if let (Phase::FullFeature(_), Some(sn)) = (&self.phase, Self::ordered_sn(&repr)) {
            if sn != self.exp_cmd_sn {
                let ahead = sn.wrapping_sub(self.exp_cmd_sn) as i32 > 0;
                if ahead && sn.wrapping_sub(self.max_cmd_sn()) as i32 <= 0 {
                    self.held.insert(sn, HeldPdu::of(pdu));
                }
                return;
            }
        }
        if matches!(pdu.data_digest, crate::wire::DigestCheck::Bad { .. }) {
            // The PDU is discarded with a Reject (RFC 7143 §7.8). Its header is sound (its
            // own digest, if any, passed), so the command it belongs to is ended at once with
            // CHECK CONDITION, PROTOCOL SERVICE CRC ERROR rather than left waiting for data
            // that, at ERL 0, never comes again: the write of a Data-Out, or a command whose
            // immediate data is bad (which goes on to `scsi_command`, in CmdSN order, and is
            // answered there without being executed).
            self.stats.data_digest_errors += 1;
            self.reject(pdu, reject_reason::DATA_DIGEST);
            match repr {
                Repr::DataOut(d) if matches!(self.phase, Phase::FullFeature(_)) => {
                    let sense = crate::scsi::Sense::PROTOCOL_CRC_ERROR;
                    return self.end_write(d.itt, sense);
                }
                Repr::ScsiCommand(_) if matches!(self.phase, Phase::FullFeature(_)) => {}
                _ => return,
            }
        }
        if let Phase::Login(login) = &mut self.phase {
            let Repr::LoginRequest(req) = repr else {
                // Only Login Requests before full-feature phase: a protocol error.
                self.phase = Phase::Closed(Ended::Wire(WireError::Malformed(
                    "a PDU other than Login before full-feature phase",
                )));
                return;
            };
            let reply = login.on_request(&req, pdu.inline());
            self.stat_sn = login.stat_sn();
            self.exp_cmd_sn = req.sn;
            self.send(
                &Repr::LoginResponse(reply.header),
                TxData::Inline(&reply.data),
            );
            match reply.done {
                None => {}
                Some(Ok(neg)) => {
                    // Digests start with the first PDU after the final Login Response.
                    self.io
                        .full_feature(neg.header_digest, neg.data_digest, neg.target_max_recv);
                    self.nexus = Nexus::iscsi(&neg.initiator_name, neg.isid);
                    if neg.session_type != SessionType::Discovery {
                        if let Some(d) = &self.disk {
                            d.lock().expect("disk lock").nexus_joined(&self.nexus);
                        }
                    }
                    self.phase = Phase::FullFeature(Box::new(neg));
                }
                Some(Err(s)) => self.phase = Phase::Closed(Ended::LoginFailed(s)),
            }
            return;
        }
        let Phase::FullFeature(neg) = &self.phase else {
            return;
        };
        let discovery = neg.session_type == SessionType::Discovery;
        // In order (checked above): the command advances ExpCmdSN.
        if Self::ordered_sn(&repr).is_some() {
            self.exp_cmd_sn = self.exp_cmd_sn.wrapping_add(1);
        }
        match repr {
            Repr::TextRequest(t) => {
                if t.ttt != RESERVED_TAG {
                    // The initiator asks for the rest of a long answer.
                    return match self.text_out.take() {
                        Some((itt, ttt, rest)) if itt == t.itt && ttt == t.ttt => {
                            self.send_text(itt, rest)
                        }
                        _ => self.reject(pdu, reject_reason::INVALID_FIELD),
                    };
                }
                // A new exchange ends one left unfinished.
                self.text_out = None;
                let pairs = match text::parse_pairs(pdu.inline()) {
                    Ok(p) => p,
                    Err(_) => return self.reject(pdu, reject_reason::PROTOCOL_ERROR),
                };
                let mut answer: Vec<(String, String)> = Vec::new();
                for (k, v) in pairs {
                    if k == "SendTargets" {
                        for (name, addr) in &self.targets {
                            let wanted = match v {
                                "All" => discovery,
                                "" => !discovery && *name == self.cfg.target_name,
                                n => n == name,
                            };
                            if wanted {
                                answer.push(("TargetName".into(), name.clone()));
                                answer.push(("TargetAddress".into(), addr.clone()));
                            }
                        }
                    } else if k == crate::accel::CONGESTION_KEY && self.accelerated() {
                        // A declaration: no answer. Malformed, it is ignored.
                        if let Some((congested, _, _)) = crate::accel::parse_congestion(v) {
                            self.stats.congestion_reports += 1;
                            self.congested = congested;
                            if congested {
                                self.flush_batch();
                            }
                        }
                    } else {
                        // Renegotiation in full-feature phase is not offered.
                        answer.push((k.into(), "NotUnderstood".into()));
                    }
                }
                let mut data = Vec::new();
                text::encode_pairs(&answer, &mut data);
                self.send_text(t.itt, data);
            }
            Repr::NopOut(n) => {
                if n.itt == RESERVED_TAG {
                    // No answer asked for; the answer to our ping, if its tag is the ping's.
                    if self.ping.is_some_and(|(ttt, _)| ttt == n.ttt) {
                        self.ping = None;
                    }
                    return;
                }
                let r = Repr::NopIn(Nop {
                    immediate: false,
                    lun: n.lun,
                    itt: n.itt,
                    ttt: RESERVED_TAG,
                    sn: self.next_stat_sn(),
                    exp_sn: self.exp_cmd_sn,
                    max_cmd_sn: self.max_cmd_sn(),
                });
                // The ping data comes back.
                let data = pdu.inline();
                self.send(&r, TxData::Inline(data));
            }
            Repr::LogoutRequest(l) => {
                self.release_nexus();
                let r = Repr::LogoutResponse(LogoutResponse {
                    response: 0,
                    itt: l.itt,
                    stat_sn: self.next_stat_sn(),
                    exp_cmd_sn: self.exp_cmd_sn,
                    max_cmd_sn: self.max_cmd_sn(),
                    time2wait: 0,
                    time2retain: 0,
                });
                self.send(&r, TxData::Inline(&[]));
                self.phase = Phase::Closed(Ended::LoggedOut);
            }
            Repr::ScsiCommand(c) if !discovery && self.disk.is_some() => self.scsi_command(pdu, c),
            Repr::DataOut(d) if !discovery && self.disk.is_some() => self.data_out(pdu, d),
            Repr::TaskMgmtRequest(t) if !discovery => self.task_mgmt(t),
            Repr::LoginRequest(_) => self.reject(pdu, reject_reason::PROTOCOL_ERROR),
            _ => self.reject(pdu, reject_reason::NOT_SUPPORTED),
        }
    }

    fn neg(&self) -> &Negotiated {
        match &self.phase {
            Phase::FullFeature(n) => n,
            _ => unreachable!("only called in full-feature phase"),
        }
    }

    fn scsi_command(&mut self, pdu: &RxPdu<'_>, c: ScsiCommand) {
        if matches!(pdu.data_digest, crate::wire::DigestCheck::Bad { .. }) {
            // Its unsolicited Data-Out PDUs may follow: they are dropped as the write's.
            self.remember_ended(c.itt);
            let o = Outcome::check(crate::scsi::Sense::PROTOCOL_CRC_ERROR);
            return self.respond(c.itt, o, 0, (false, false, 0));
        }
        let disk = self.disk.clone().expect("checked by the caller");
        let lun0 = lun_index(c.lun) == Some(0);
        if !lun0 && c.cdb[0] != 0xa0 && c.cdb[0] != 0x12 {
            return self.finish(c, Outcome::check(crate::scsi::Sense::LUN_NOT_SUPPORTED));
        }
        if self.proxied && proxy_refuses(c.cdb[0]) {
            // Its unsolicited Data-Out PDUs may follow: dropped as the command's.
            self.remember_ended(c.itt);
            let o = Outcome::check(Sense::INVALID_OPCODE);
            return self.respond(c.itt, o, 0, (false, false, 0));
        }
        let want = disk.lock().expect("disk lock").transfer(&c.cdb);
        if c.write || matches!(want, Transfer::Out(_)) {
            if c.expected_len > MAX_WRITE_BYTES {
                return self.finish(c, Outcome::check(crate::scsi::Sense::INVALID_FIELD_IN_CDB));
            }
            let gathering = self.gathering();
            let backoff = self.accelerated() && self.accel.backoff;
            let limit = if backoff {
                self.accel.buffer_bytes.min(MAX_GATHER_BYTES_PER_CONN)
            } else {
                MAX_GATHER_BYTES_PER_CONN
            };
            // A write always fits an empty buffer.
            if gathering > 0 && gathering + u64::from(c.expected_len) > limit {
                if backoff {
                    self.stats.backoffs += 1;
                    self.send_vendor_async(
                        crate::accel::vcode::BACK_OFF,
                        self.accel.backoff_extra_ms,
                    );
                    // Its unsolicited Data-Out PDUs may follow: dropped as the write's.
                    self.remember_ended(c.itt);
                }
                let o = Outcome {
                    status: TASK_SET_FULL,
                    data_in: Vec::new(),
                    sense: None,
                };
                return self.respond(c.itt, o, 0, (false, false, 0));
            }
            let neg = self.neg();
            let imm = pdu.data_len() as u32;
            if imm > c.expected_len
                || (imm > 0 && !neg.immediate_data)
                || imm > neg.first_burst_length
            {
                return self.reject(pdu, reject_reason::PROTOCOL_ERROR);
            }
            let unsolicited = !c.final_ && !neg.initial_r2t;
            let mut t = WriteTask {
                cmd: c,
                received: imm,
                unsolicited,
                next_offset: imm,
                outstanding_r2t: 0,
                r2t_sn: 0,
                data_sn: HashMap::new(),
            };
            if unsolicited {
                t.data_sn.insert(RESERVED_TAG, 0);
            }
            if !unsolicited && !c.final_ {
                // Unsolicited Data-Out announced (F=0) although InitialR2T=Yes.
                return self.reject(pdu, reject_reason::PROTOCOL_ERROR);
            }
            // The buffer the data gathers in: immediate data a transport placed is in the
            // buffer it had for the task (at offset 0, the whole write long); inline
            // immediate data is copied into a new one.
            match pdu.data {
                RxData::Placed { offset: 0, .. }
                    if self
                        .io
                        .buffer(c.itt)
                        .is_some_and(|b| b.len() == c.expected_len as usize) => {}
                RxData::Placed { .. } => return self.reject(pdu, reject_reason::PROTOCOL_ERROR),
                RxData::Inline(d) => {
                    self.io.open_receive(c.itt, c.expected_len as usize);
                    self.io.place(c.itt, 0, d);
                }
            }
            self.writes.insert(c.itt, t);
            self.check_buffer();
            return self.advance_write(c.itt);
        }
        if self.proxied {
            let admitted = disk
                .lock()
                .expect("disk lock")
                .admit_rw(&self.nexus, &c.cdb);
            match admitted {
                Ok(Some(r)) if r.blocks > 0 => return self.defer(c, r, Vec::new(), None),
                Ok(Some(_)) => return self.finish(c, Outcome::good(Vec::new())),
                Ok(None) => {}
                Err(o) => return self.finish(c, o),
            }
        }
        let mut o = disk
            .lock()
            .expect("disk lock")
            .execute_as(&self.nexus, &c.cdb, &[]);
        if !lun0 && c.cdb[0] == 0x12 && o.status == GOOD && !o.data_in.is_empty() {
            o.data_in[0] = 0x7f; // no logical unit here
        }
        self.finish(c, o)
    }

    /// Issue R2Ts for write `itt` or, with every byte in, execute it.
    fn advance_write(&mut self, itt: u32) {
        let (max_burst, max_r2t) = {
            let n = self.neg();
            (n.max_burst_length, n.max_outstanding_r2t.max(1))
        };
        let Some(t) = self.writes.get_mut(&itt) else {
            return;
        };
        if t.unsolicited {
            return;
        }
        let expected = t.cmd.expected_len;
        if t.received >= expected {
            let t = self.writes.remove(&itt).expect("present");
            let disk = self.disk.clone().expect("a disk");
            if self.proxied {
                let (admitted, want) = {
                    let mut d = disk.lock().expect("disk lock");
                    (d.admit_rw(&self.nexus, &t.cmd.cdb), d.transfer(&t.cmd.cdb))
                };
                let wanted = match want {
                    Transfer::Out(n) => Some(n),
                    _ => None,
                };
                let b = u64::from(block_of(&disk));
                match admitted {
                    // All the blocks the CDB names came: the data stays in host memory,
                    // where an engine placed it, for the primary to send on without a
                    // copy (when the transport can hand it over).
                    Ok(Some(r)) if r.blocks > 0 && u64::from(expected) == r.blocks * b => {
                        if let Some(buf) = self.io.take_host(itt) {
                            if let Some(old) = self.host_writes.insert(itt, buf) {
                                self.io.free_host(old);
                            }
                            return self.defer(t.cmd, r, Vec::new(), Some((wanted, t.r2t_sn)));
                        }
                        let data = self.io.close(itt).unwrap_or_default();
                        return self.defer(t.cmd, r, data, Some((wanted, t.r2t_sn)));
                    }
                    Ok(Some(r)) if r.blocks > 0 => {
                        // Fewer bytes than the CDB asks for: the whole blocks that came.
                        let mut data = self.io.close(itt).unwrap_or_default();
                        let whole = (data.len() as u64).min(r.blocks * b) / b * b;
                        data.truncate(whole as usize);
                        return self.defer(t.cmd, r, data, Some((wanted, t.r2t_sn)));
                    }
                    Ok(Some(_)) => {
                        self.io.close(itt);
                        return self.finish_write(
                            t.cmd,
                            Outcome::good(Vec::new()),
                            wanted,
                            t.r2t_sn,
                        );
                    }
                    Ok(None) => {}
                    Err(o) => {
                        self.io.close(itt);
                        return self.finish_write(t.cmd, o, wanted, t.r2t_sn);
                    }
                }
            }
            // The disk takes the data from the transport's buffer where it lies (in host
            // memory, where an engine placed it), or else from what the transport gives
            // back of it.
            let back = match self.io.buffer(itt) {
                Some(_) => None,
                None => Some(self.io.close(itt).unwrap_or_default()),
            };
            let data = match &back {
                Some(v) => &v[..],
                None => self.io.buffer(itt).unwrap_or_default(),
            };
            if self.destage_rate.is_some() {
                if self.destaging == 0 {
                    self.destaged_at = self.now_us;
                }
                self.destaging += data.len() as u64;
            }
            let (o, want) = {
                let mut d = disk.lock().expect("disk lock");
                (
                    d.execute_as(&self.nexus, &t.cmd.cdb, data),
                    d.transfer(&t.cmd.cdb),
                )
            };
            if back.is_none() {
                self.io.discard(itt);
            }
            let wanted = match want {
                Transfer::Out(n) => Some(n),
                _ => None,
            };
            self.check_buffer();
            return self.finish_write(t.cmd, o, wanted, t.r2t_sn);
        }
        let mut r2ts = Vec::new();
        while t.outstanding_r2t < max_r2t && t.next_offset < expected {
            let len = max_burst.min(expected - t.next_offset);
            r2ts.push((t.next_offset, len, t.r2t_sn));
            t.next_offset += len;
            t.outstanding_r2t += 1;
            t.r2t_sn += 1;
        }
        let lun = t.cmd.lun;
        for (offset, len, sn) in r2ts {
            let ttt = self.take_ttt();
            if let Some(t) = self.writes.get_mut(&itt) {
                t.data_sn.insert(ttt, 0);
            }
            self.stats.r2t_sent += 1;
            let r = Repr::R2t(R2t {
                lun,
                itt,
                ttt,
                stat_sn: self.stat_sn,
                exp_cmd_sn: self.exp_cmd_sn,
                max_cmd_sn: self.max_cmd_sn(),
                r2t_sn: sn,
                buffer_offset: offset,
                desired_len: len,
            });
            self.send(&r, TxData::Inline(&[]));
        }
    }

    /// End write `itt` before its data is all in, with CHECK CONDITION and `sense`; its
    /// late Data-Out PDUs are then dropped quietly. Nothing if no such write is open.
    fn end_write(&mut self, itt: u32, sense: crate::scsi::Sense) {
        let Some(t) = self.writes.remove(&itt) else {
            return;
        };
        self.io.close(itt);
        self.remember_ended(itt);
        self.respond(
            t.cmd.itt,
            Outcome::check(sense),
            t.r2t_sn,
            (false, false, 0),
        );
    }

    fn remember_ended(&mut self, itt: u32) {
        if self.ended_writes.len() == ENDED_WRITES_KEPT {
            self.ended_writes.pop_front();
        }
        self.ended_writes.push_back(itt);
    }

    fn data_out(&mut self, pdu: &RxPdu<'_>, d: DataOut) {
        let Some(t) = self.writes.get_mut(&d.itt) else {
            if self.ended_writes.contains(&d.itt) {
                return; // the rest of a write ended early
            }
            return self.reject(pdu, reject_reason::INVALID_FIELD);
        };
        // A Data-Out out of its sequence's DataSN order, or for a sequence that is not
        // open: at ERL 0 there is no recovery of the data, so the command ends with CHECK
        // CONDITION, ABORTED COMMAND, DATA PHASE ERROR (4Bh/00h) and the session goes on.
        match t.data_sn.get_mut(&d.ttt) {
            Some(next) if *next == d.data_sn => *next += 1,
            _ => {
                self.stats.data_sequence_errors += 1;
                return self.end_write(d.itt, crate::scsi::Sense::DATA_PHASE_ERROR);
            }
        }
        let len = pdu.data_len();
        let end = u64::from(d.buffer_offset) + len as u64;
        if end > u64::from(t.cmd.expected_len) || pdu.placed_elsewhere(d.buffer_offset) {
            return self.reject(pdu, reject_reason::PROTOCOL_ERROR);
        }
        t.received += len as u32;
        if let RxData::Inline(data) = pdu.data {
            self.io.place(d.itt, d.buffer_offset as usize, data);
        }
        let Some(t) = self.writes.get_mut(&d.itt) else {
            return;
        };
        if d.final_ {
            t.data_sn.remove(&d.ttt);
            if d.ttt == RESERVED_TAG {
                t.unsolicited = false;
                t.next_offset = t.next_offset.max(end as u32);
            } else {
                t.outstanding_r2t = t.outstanding_r2t.saturating_sub(1);
            }
        }
        self.advance_write(d.itt);
    }

    fn task_mgmt(&mut self, t: TaskMgmtRequest) {
        let response = match t.function {
            // ABORT TASK: function complete if the task was still open (a write gathering
            // data); reads complete at once, so any other task no longer exists.
            1 => {
                if self.writes.remove(&t.ref_task_tag).is_some() {
                    self.io.close(t.ref_task_tag);
                    0
                } else if self.deferred.remove(&t.ref_task_tag).is_some() {
                    self.proxy_out.push_back(ProxyEvent::Abort {
                        itt: t.ref_task_tag,
                    });
                    0
                } else {
                    1
                }
            }
            // ABORT TASK SET, CLEAR TASK SET, LOGICAL UNIT RESET, TARGET WARM RESET
            2 | 3 => {
                self.writes.clear();
                self.io.close_all();
                self.abort_deferred();
                0
            }
            // The resets also end the logical unit's RESERVE reservation and are reported
            // to every session as a unit attention.
            5 | 6 => {
                self.writes.clear();
                self.io.close_all();
                self.abort_deferred();
                if self.proxied {
                    self.proxy_out.push_back(ProxyEvent::Reset {
                        function: t.function,
                    });
                }
                if let Some(d) = &self.disk {
                    let why = if t.function == 5 {
                        Sense::LUN_RESET_OCCURRED
                    } else {
                        Sense::RESET_OCCURRED
                    };
                    d.lock().expect("disk lock").reset(why);
                }
                0
            }
            _ => 5, // function not supported
        };
        let r = Repr::TaskMgmtResponse(TaskMgmtResponse {
            response,
            itt: t.itt,
            stat_sn: self.next_stat_sn(),
            exp_cmd_sn: self.exp_cmd_sn,
            max_cmd_sn: self.max_cmd_sn(),
        });
        self.send(&r, TxData::Inline(&[]));
    }

    /// Every proxied command of this connection is aborted.
    fn abort_deferred(&mut self) {
        let mut itts: Vec<u32> = self.deferred.drain().map(|(itt, _)| itt).collect();
        itts.sort_unstable();
        self.proxy_out
            .extend(itts.into_iter().map(|itt| ProxyEvent::Abort { itt }));
    }

    /// Residual flags and count for `moved` bytes against `expected`.
    fn residual(expected: u32, moved: u64) -> (bool, bool, u32) {
        let e = u64::from(expected);
        if moved > e {
            (true, false, (moved - e).min(u64::from(u32::MAX)) as u32)
        } else {
            (false, moved < e, (e - moved) as u32)
        }
    }

    /// Answer a non-write command: Data-In PDUs with the status in the last one, or a SCSI
    /// A Target Transfer Tag for an R2T or a continued Text Response (never the reserved
    /// tag, never 0).
    fn take_ttt(&mut self) -> u32 {
        let t = self.next_ttt;
        self.next_ttt = match t.wrapping_add(1) {
            0 | RESERVED_TAG => 1,
            n => n,
        };
        t
    }

    /// Send Text Response data for `itt`: all of it if it fits the initiator's
    /// MaxRecvDataSegmentLength, otherwise one segment with F = 0 and C = 1 and a TTT, keeping
    /// the rest for the initiator's next (empty) Text Request.
    fn send_text(&mut self, itt: u32, mut data: Vec<u8>) {
        let seg = self.neg().initiator_max_recv.max(512) as usize;
        let more = data.len() > seg;
        let ttt = if more {
            let ttt = self.take_ttt();
            self.text_out = Some((itt, ttt, data.split_off(seg)));
            ttt
        } else {
            RESERVED_TAG
        };
        let r = Repr::TextResponse(Text {
            immediate: false,
            final_: !more,
            cont: more,
            lun: 0,
            itt,
            ttt,
            sn: self.next_stat_sn(),
            exp_sn: self.exp_cmd_sn,
            max_cmd_sn: self.max_cmd_sn(),
        });
        self.send(&r, TxData::Inline(&data));
    }

    /// Response. The residual compares what the command produced (before the cut to the
    /// Expected Data Transfer Length) with that length (RFC 7143 §11.4.5).
    fn finish(&mut self, c: ScsiCommand, mut o: Outcome) {
        if o.status != GOOD {
            return self.respond(c.itt, o, 0, (false, false, 0));
        }
        let produced = o.data_in.len();
        o.data_in.truncate(c.expected_len as usize);
        if o.data_in.is_empty() {
            let res = Self::residual(c.expected_len, produced as u64);
            return self.respond(c.itt, o, 0, res);
        }
        self.io.open(c.itt, std::mem::take(&mut o.data_in));
        self.send_read(c, produced);
    }

    /// Send the data of read `c`, which produced `produced` bytes, from its task buffer
    /// (open, at least the Expected Data Transfer Length or `produced` bytes long,
    /// whichever is less), the status in the last Data-In; the buffer is closed after.
    fn send_read(&mut self, c: ScsiCommand, produced: usize) {
        let res = Self::residual(c.expected_len, produced as u64);
        let len = produced.min(c.expected_len as usize);
        let (seg, burst) = {
            let n = self.neg();
            (n.initiator_max_recv.max(512), n.max_burst_length.max(512))
        };
        // The data goes out of the task's buffer, which the transport holds while the
        // Data-In PDUs go, in one request (an engine cuts them itself and sends them from
        // host memory without a copy).
        let burst = DataInBurst {
            lun: c.lun,
            itt: c.itt,
            len: len as u32,
            max_segment: seg,
            max_burst: burst,
            stat_sn: self.next_stat_sn(),
            exp_cmd_sn: self.exp_cmd_sn,
            max_cmd_sn: self.max_cmd_sn(),
            status: GOOD,
            residual: res,
        };
        // Held write responses first (StatSN order on the wire).
        self.flush_batch();
        self.stats.pdus_out += burst.pdus().count() as u64;
        self.io.send_data_in(&burst);
        self.io.close(c.itt);
    }

    fn finish_write(&mut self, c: ScsiCommand, o: Outcome, wanted: Option<u64>, r2ts: u32) {
        let res = match (o.status, wanted) {
            (GOOD, Some(w)) => Self::residual(c.expected_len, w),
            _ => (false, false, 0),
        };
        // Delayed and batched responses, for a stream of writes: a good write that completes
        // within the batch delay of the previous one waits for the next ones to join it, up
        // to a full batch or the delay. A lone write (queue depth 1) is answered at once.
        let streaming = self
            .last_write_done
            .is_some_and(|t| self.now_us.saturating_sub(t) < self.accel.batch_delay_us);
        self.last_write_done = Some(self.now_us);
        let batching = self.accelerated()
            && self.accel.batch_responses
            && !self.congested
            && o.status == GOOD
            && self.accel.batch_max > 1
            && (streaming || !self.batch.is_empty());
        if !batching {
            return self.respond(c.itt, o, r2ts, res);
        }
        let held = self.response(c.itt, o, r2ts, res);
        if self.batch.is_empty() {
            self.batch_since = self.now_us;
        }
        self.batch.push(held);
        let aged = self.now_us.saturating_sub(self.batch_since) >= self.accel.batch_delay_us;
        if self.batch.len() >= self.accel.batch_max || aged {
            self.flush_batch();
        }
    }

    fn respond(&mut self, itt: u32, o: Outcome, exp_data_sn: u32, res: (bool, bool, u32)) {
        let (r, data) = self.response(itt, o, exp_data_sn, res);
        self.send(&r, TxData::Inline(&data));
    }

    /// The SCSI Response for `itt` (taking the next StatSN) and its sense data.
    fn response(
        &mut self,
        itt: u32,
        o: Outcome,
        exp_data_sn: u32,
        res: (bool, bool, u32),
    ) -> (Repr, Vec<u8>) {
        let mut data = Vec::new();
        if o.status == CHECK_CONDITION {
            if let Some(s) = o.sense {
                let d_sense = self
                    .disk
                    .as_ref()
                    .is_some_and(|d| d.lock().expect("disk lock").descriptor_sense());
                let bytes = s.bytes(d_sense);
                data.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
                data.extend_from_slice(&bytes);
            }
        }
        let r = Repr::ScsiResponse(ScsiResponse {
            overflow: res.0,
            underflow: res.1,
            status: o.status,
            itt,
            stat_sn: self.next_stat_sn(),
            exp_cmd_sn: self.exp_cmd_sn,
            max_cmd_sn: self.max_cmd_sn(),
            exp_data_sn,
            residual: if res.0 || res.1 { res.2 } else { 0 },
            ..Default::default()
        });
        (r, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::login::{InitiatorConfig, InitiatorLogin, InitiatorStep, OpParams};
    use crate::wire::LogoutRequest;
    use crate::wire::{Framing, BHS_LEN};

    fn cfg() -> TargetConfig {
        TargetConfig {
            target_name: "iqn.2026-12.org.toemu:disk".into(),
            alias: None,
            portal_group_tag: 1,
            chap: None,
            mutual: None,
            params: OpParams {
                header_digest: "CRC32C,None".into(),
                ..OpParams::default()
            },
            cmd_window: 16,
        }
    }

    /// Drive a login through `conn` with our initiator; returns its negotiated parameters.
    fn login(conn: &mut TargetConn, discovery: bool) -> Negotiated {
        let mut i = InitiatorLogin::new(
            InitiatorConfig {
                initiator_name: "iqn.2026-12.org.toemu:i".into(),
                target_name: (!discovery).then(|| "iqn.2026-12.org.toemu:disk".into()),
                chap: None,
                mutual: None,
                params: OpParams {
                    header_digest: "CRC32C".into(),
                    max_outstanding_r2t: 4,
                    ..OpParams::default()
                },
                isid: [0x80, 0, 0, 0, 0, 2],
                cmd_sn: 7,
            },
            [3; 16],
            1,
        );
        let mut step = i.start();
        loop {
            let InitiatorStep::Send(req, data) = step else {
                unreachable!()
            };
            let mut bytes = Vec::new();
            Framing::default()
                .emit(&Repr::LoginRequest(req), &[], &data, &mut bytes)
                .unwrap();
            let mut out = Vec::new();
            conn.on_bytes(&bytes, &mut out);
            let pdu = Framing::default().parse(&out).unwrap().unwrap();
            let Repr::LoginResponse(rsp) = pdu.repr().unwrap() else {
                panic!("not a login response")
            };
            match i.on_response(&rsp, pdu.data).unwrap() {
                InitiatorStep::Done(n) => return n,
                s => step = s,
            }
        }
    }

    #[test]
    fn discovery_lists_the_targets_then_logs_out() {
        let targets = vec![(
            "iqn.2026-12.org.toemu:disk".to_string(),
            "127.0.0.1:3260,1".to_string(),
        )];
        let mut c = TargetConn::new(cfg(), targets, [9; 16], 2, 1);
        let n = login(&mut c, true);
        assert!(n.header_digest, "digests on from here");
        let f = Framing {
            header_digest: true,
            data_digest: false,
        };
        let mut bytes = Vec::new();
        let mut q = Vec::new();
        text::encode_pairs(&[("SendTargets", "All")], &mut q);
        f.emit(
            &Repr::TextRequest(Text {
                immediate: true,
                final_: true,
                cont: false,
                lun: 0,
                itt: 5,
                ttt: RESERVED_TAG,
                sn: 7,
                exp_sn: 2,
                max_cmd_sn: 0,
            }),
            &[],
            &q,
            &mut bytes,
        )
        .unwrap();
        // byte by byte: framing copes with any split
        let mut out = Vec::new();
        for b in &bytes {
            c.on_bytes(std::slice::from_ref(b), &mut out);
        }
        let pdu = f.parse(&out).unwrap().unwrap();
        let Repr::TextResponse(t) = pdu.repr().unwrap() else {
            panic!()
        };
        assert_eq!((t.itt, t.final_), (5, true));
        assert_eq!(
            text::parse_pairs(pdu.data).unwrap(),
            vec![
                ("TargetName", "iqn.2026-12.org.toemu:disk"),
                ("TargetAddress", "127.0.0.1:3260,1")
            ]
        );
        let mut bytes = Vec::new();
        f.emit(
            &Repr::LogoutRequest(LogoutRequest {
                immediate: true,
                reason: 0,
                itt: 6,
                cid: 0,
                cmd_sn: 7,
                exp_stat_sn: 3,
            }),
            &[],
            &[],
            &mut bytes,
        )
        .unwrap();
        let mut out = Vec::new();
        c.on_bytes(&bytes, &mut out);
        assert!(matches!(
            f.parse(&out).unwrap().unwrap().repr().unwrap(),
            Repr::LogoutResponse(LogoutResponse {
                response: 0,
                itt: 6,
                ..
            })
        ));
        assert_eq!(c.ended(), Some(&Ended::LoggedOut));
    }

    #[test]
    fn commands_before_the_scsi_layer_are_rejected_and_bad_framing_ends_the_connection() {
        let mut c = TargetConn::new(cfg(), vec![], [9; 16], 2, 1);
        login(&mut c, false);
        let f = Framing {
            header_digest: true,
            data_digest: false,
        };
        let cmd = Repr::ScsiCommand(crate::wire::ScsiCommand {
            immediate: false,
            final_: true,
            read: true,
            write: false,
            attr: 1,
            lun: 0,
            itt: 9,
            expected_len: 36,
            cmd_sn: 7,
            exp_stat_sn: 3,
            cdb: [0x12, 0, 0, 0, 36, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        });
        let mut bytes = Vec::new();
        f.emit(&cmd, &[], &[], &mut bytes).unwrap();
        let mut out = Vec::new();
        c.on_bytes(&bytes, &mut out);
        let pdu = f.parse(&out).unwrap().unwrap();
        let Repr::Reject(r) = pdu.repr().unwrap() else {
            panic!()
        };
        assert_eq!(r.reason, reject_reason::NOT_SUPPORTED);
        assert_eq!(
            pdu.data,
            &bytes[..BHS_LEN],
            "the rejected header comes back"
        );
        assert_eq!(r.exp_cmd_sn, 8, "the command took its CmdSN");
        // The same CmdSN again is outside the window: dropped silently.
        let mut out = Vec::new();
        c.on_bytes(&bytes, &mut out);
        assert!(out.is_empty());
        // A flipped header bit: the header digest fails and the connection ends.
        let mut bad = bytes.clone();
        bad[24..28].copy_from_slice(&8u32.to_be_bytes());
        c.on_bytes(&bad, &mut out);
        assert!(matches!(
            c.ended(),
            Some(Ended::Wire(WireError::HeaderDigest { .. }))
        ));
        assert_eq!(c.stats().rejects, 1);
    }

    #[test]
    fn only_login_before_full_feature_phase() {
        let mut c = TargetConn::new(cfg(), vec![], [9; 16], 2, 1);
        let mut bytes = Vec::new();
        Framing::default()
            .emit(
                &Repr::NopOut(Nop {
                    immediate: true,
                    lun: 0,
                    itt: 1,
                    ttt: RESERVED_TAG,
                    sn: 0,
                    exp_sn: 0,
                    max_cmd_sn: 0,
                }),
                &[],
                &[],
                &mut bytes,
            )
            .unwrap();
        let mut out = Vec::new();
        c.on_bytes(&bytes, &mut out);
        assert!(out.is_empty());
        assert!(matches!(
            c.ended(),
            Some(Ended::Wire(WireError::Malformed(_)))
        ));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_streams_never_panic(
            chunks in proptest::collection::vec(
                proptest::collection::vec(proptest::num::u8::ANY, 0..200), 0..8),
        ) {
            let mut c = TargetConn::new(cfg(), vec![], [9; 16], 2, 1);
            let mut out = Vec::new();
            for ch in chunks {
                c.on_bytes(&ch, &mut out);
            }
        }
    }

    pub(super) fn normal_session_with_disk() -> (TargetConn, Framing, Arc<Mutex<Disk>>) {
        let disk = Arc::new(Mutex::new(Disk::new(
            Box::new(crate::scsi::MemStore::new(8 << 20)),
            512,
            "T1",
        )));
        let mut c = cfg();
        c.params.max_burst_length = 8192;
        c.params.max_outstanding_r2t = 2;
        let mut conn = TargetConn::new(c, vec![], [9; 16], 2, 1).with_disk(disk.clone());
        login(&mut conn, false);
        let f = Framing {
            header_digest: true,
            data_digest: false,
        };
        (conn, f, disk)
    }

    pub(super) fn pdus(f: &Framing, mut out: &[u8]) -> Vec<(Repr, Vec<u8>)> {
        let mut v = Vec::new();
        while let Some(p) = f.parse(out).unwrap() {
            v.push((p.repr().unwrap(), p.data.to_vec()));
            out = &out[p.len..];
        }
        v
    }

    /// Commands are executed in CmdSN order: one that comes ahead of ExpCmdSN (within the
    /// window) waits for those before it; one outside the window is dropped silently.
    #[test]
    fn commands_run_in_cmdsn_order() {
        let (mut conn, f, _disk) = normal_session_with_disk();
        let tur = |itt: u32, cmd_sn: u32| {
            let mut bytes = Vec::new();
            let c = ScsiCommand {
                immediate: false,
                final_: true,
                read: false,
                write: false,
                attr: 1,
                lun: 0,
                itt,
                expected_len: 0,
                cmd_sn,
                exp_stat_sn: 3,
                cdb: [0; 16],
            };
            f.emit(&Repr::ScsiCommand(c), &[], &[], &mut bytes).unwrap();
            bytes
        };
        let answered = |out: &[u8]| -> Vec<u32> {
            pdus(&f, out)
                .into_iter()
                .map(|(r, _)| match r {
                    Repr::ScsiResponse(s) => s.itt,
                    other => panic!("{other:?}"),
                })
                .collect()
        };
        // ExpCmdSN is 7: 9 and 8 wait, 7 lets all three go, in order.
        let mut out = Vec::new();
        conn.on_bytes(&tur(0x19, 9), &mut out);
        conn.on_bytes(&tur(0x18, 8), &mut out);
        assert!(out.is_empty(), "nothing runs ahead of CmdSN 7");
        conn.on_bytes(&tur(0x17, 7), &mut out);
        assert_eq!(answered(&out), [0x17, 0x18, 0x19]);
        // Behind ExpCmdSN (a duplicate) or past MaxCmdSN: silently dropped.
        let mut out = Vec::new();
        conn.on_bytes(&tur(0x20, 9), &mut out);
        conn.on_bytes(&tur(0x21, 10 + 64), &mut out);
        assert!(out.is_empty());
        conn.on_bytes(&tur(0x22, 10), &mut out);
        assert_eq!(answered(&out), [0x22]);
    }

    #[test]
    fn a_write_is_gathered_through_r2ts_and_reads_back_in_data_in_pdus() {
        let (mut conn, f, _disk) = normal_session_with_disk();
        let n = conn.negotiated().unwrap().clone();
        assert!(n.initial_r2t && n.immediate_data);
        assert_eq!((n.max_burst_length, n.max_outstanding_r2t), (8192, 2));
        let len = 3 * 8192 + 1024; // 1 KiB immediate, then three bursts of 8 KiB
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let mut cdb = [0u8; 16];
        cdb[0] = 0x2a;
        cdb[2..6].copy_from_slice(&16u32.to_be_bytes());
        cdb[7..9].copy_from_slice(&((len / 512) as u16).to_be_bytes());
        let cmd = ScsiCommand {
            immediate: false,
            final_: true,
            read: false,
            write: true,
            attr: 1,
            lun: 0,
            itt: 0x40,
            expected_len: len as u32,
            cmd_sn: 7,
            exp_stat_sn: 3,
            cdb,
        };
        let mut bytes = Vec::new();
        f.emit(&Repr::ScsiCommand(cmd), &[], &data[..1024], &mut bytes)
            .unwrap();
        let mut out = Vec::new();
        conn.on_bytes(&bytes, &mut out);
        // MaxOutstandingR2T = 2: two R2Ts at once, after the 1 KiB of immediate data
        let r2ts: Vec<R2t> = pdus(&f, &out)
            .into_iter()
            .map(|(r, _)| match r {
                Repr::R2t(r) => r,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(r2ts.len(), 2);
        assert_eq!(
            (r2ts[0].buffer_offset, r2ts[0].desired_len, r2ts[0].r2t_sn),
            (1024, 8192, 0)
        );
        assert_eq!((r2ts[1].buffer_offset, r2ts[1].r2t_sn), (1024 + 8192, 1));
        let mut pending = r2ts;
        let mut response = None;
        while let Some(r) = pending.pop() {
            // answer each R2T with two Data-Out PDUs (DataSN 0, 1)
            let mut bytes = Vec::new();
            let (o, l) = (r.buffer_offset as usize, r.desired_len as usize);
            for (k, (a, b)) in [(o, o + l / 2), (o + l / 2, o + l)].into_iter().enumerate() {
                f.emit(
                    &Repr::DataOut(DataOut {
                        final_: k == 1,
                        lun: 0,
                        itt: 0x40,
                        ttt: r.ttt,
                        exp_stat_sn: 3,
                        data_sn: k as u32,
                        buffer_offset: a as u32,
                    }),
                    &[],
                    &data[a..b],
                    &mut bytes,
                )
                .unwrap();
            }
            let mut out = Vec::new();
            conn.on_bytes(&bytes, &mut out);
            for (p, _) in pdus(&f, &out) {
                match p {
                    Repr::R2t(r) => pending.push(r),
                    Repr::ScsiResponse(s) => response = Some(s),
                    other => panic!("{other:?}"),
                }
            }
        }
        let s = response.expect("the write completed");
        assert_eq!(
            (s.status, s.itt, s.exp_data_sn),
            (GOOD, 0x40, 3),
            "three R2Ts"
        );
        assert!(!s.overflow && !s.underflow);
        // READ(10) of the same blocks, cut into Data-In PDUs of the initiator's 256 KiB
        // limit capped by MaxBurstLength: 8 KiB each, status in the last
        let mut rd = cdb;
        rd[0] = 0x28;
        let read = ScsiCommand {
            read: true,
            write: false,
            itt: 0x41,
            cmd_sn: 8,
            cdb: rd,
            ..cmd
        };
        let mut bytes = Vec::new();
        f.emit(&Repr::ScsiCommand(read), &[], &[], &mut bytes)
            .unwrap();
        let mut out = Vec::new();
        conn.on_bytes(&bytes, &mut out);
        let ins = pdus(&f, &out);
        assert_eq!(ins.len(), 4);
        let mut back = Vec::new();
        for (k, (p, d)) in ins.iter().enumerate() {
            let Repr::DataIn(di) = p else { panic!("{p:?}") };
            assert_eq!(
                (di.data_sn, di.buffer_offset as usize),
                (k as u32, back.len())
            );
            assert_eq!(di.status.is_some(), k == 3, "status only in the last");
            back.extend_from_slice(d);
        }
        assert!(back == data, "the write reads back");
    }

    #[test]
    fn a_peer_announcing_writes_without_data_cannot_grow_the_gather_memory() {
        let (mut conn, f, _disk) = normal_session_with_disk();
        let mut statuses = Vec::new();
        for k in 0..8u32 {
            let mut cdb = [0u8; 16];
            cdb[0] = 0x8a;
            cdb[10..14].copy_from_slice(&(MAX_WRITE_BYTES / 512).to_be_bytes());
            let cmd = ScsiCommand {
                immediate: false,
                final_: true,
                read: false,
                write: true,
                attr: 1,
                lun: 0,
                itt: k,
                expected_len: MAX_WRITE_BYTES,
                cmd_sn: 7 + k,
                exp_stat_sn: 3,
                cdb,
            };
            let mut bytes = Vec::new();
            f.emit(&Repr::ScsiCommand(cmd), &[], &[], &mut bytes)
                .unwrap();
            let mut out = Vec::new();
            conn.on_bytes(&bytes, &mut out);
            for (p, _) in pdus(&f, &out) {
                if let Repr::ScsiResponse(s) = p {
                    statuses.push(s.status);
                }
            }
        }
        let gathering = conn.transport().buffered_bytes() as u64;
        assert!(gathering > 0, "the writes that fit are gathering");
        assert!(gathering <= MAX_GATHER_BYTES_PER_CONN);
        assert_eq!(
            statuses,
            vec![TASK_SET_FULL; 4],
            "the writes past 64 MiB are refused"
        );
    }
}

#[cfg(test)]
mod proxy_tests {
    use super::tests::{normal_session_with_disk, pdus};
    use super::*;
    use crate::wire::{DataIn, Framing};

    fn cmd(itt: u32, cmd_sn: u32, cdb: [u8; 16], write: bool, len: u32) -> ScsiCommand {
        ScsiCommand {
            immediate: false,
            final_: true,
            read: !write && len > 0,
            write,
            attr: 1,
            lun: 0,
            itt,
            expected_len: len,
            cmd_sn,
            exp_stat_sn: 3,
            cdb,
        }
    }

    fn rw10(op: u8, lba: u32, blocks: u16) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[0] = op;
        c[2..6].copy_from_slice(&lba.to_be_bytes());
        c[7..9].copy_from_slice(&blocks.to_be_bytes());
        c
    }

    fn send(
        conn: &mut TargetConn,
        f: &Framing,
        c: ScsiCommand,
        data: &[u8],
    ) -> Vec<(Repr, Vec<u8>)> {
        let mut bytes = Vec::new();
        f.emit(&Repr::ScsiCommand(c), &[], data, &mut bytes)
            .unwrap();
        let mut out = Vec::new();
        conn.on_bytes(&bytes, &mut out);
        pdus(f, &out)
    }

    /// A proxy-mode connection hands admitted READs and WRITEs to the primary, answers
    /// what the volume refuses at once, sends the primary's answer as Data-In of the
    /// initiator's MaxRecvDataSegmentLength with continuous DataSN, and forwards aborts
    /// and resets.
    #[test]
    fn proxy_mode_defers_reads_and_writes_and_forwards_task_management() {
        let (conn, f, _disk) = normal_session_with_disk();
        let mut conn = conn.with_proxy();
        // A read of 16 blocks: nothing sent yet, one request for the primary.
        let out = send(
            &mut conn,
            &f,
            cmd(0x10, 7, rw10(0x28, 8, 16), false, 8192),
            &[],
        );
        assert!(out.is_empty(), "{out:?}");
        let ev: Vec<ProxyEvent> = conn.take_proxy_events().collect();
        let [ProxyEvent::Command(r)] = &ev[..] else {
            panic!("{ev:?}")
        };
        assert_eq!(
            (r.itt, r.range.write, r.range.lba, r.range.blocks),
            (0x10, false, 8, 16)
        );
        assert_eq!(conn.proxied_in_flight(), 1);
        // Past the end of the volume (8 MiB = 16384 blocks): refused by the volume at once.
        let out = send(
            &mut conn,
            &f,
            cmd(0x11, 8, rw10(0x28, 16380, 8), false, 4096),
            &[],
        );
        let [(Repr::ScsiResponse(s), sense)] = &out[..] else {
            panic!("{out:?}")
        };
        assert_eq!((s.itt, s.status), (0x11, CHECK_CONDITION));
        assert_eq!(Sense::parse(&sense[2..]), Some(Sense::LBA_OUT_OF_RANGE));
        // WRITE SAME is not proxied: INVALID COMMAND OPERATION CODE.
        let mut ws = rw10(0x41, 0, 4);
        ws[0] = 0x41;
        let out = send(&mut conn, &f, cmd(0x12, 9, ws, true, 512), &[0; 512]);
        let [(Repr::ScsiResponse(s), sense)] = &out[..] else {
            panic!("{out:?}")
        };
        assert_eq!(s.itt, 0x12);
        assert_eq!(Sense::parse(&sense[2..]), Some(Sense::INVALID_OPCODE));
        assert_eq!(conn.take_proxy_events().count(), 0);
        // A write with all its data immediate: gathered, then handed over with its data.
        let data: Vec<u8> = (0..1024).map(|i| (i % 253) as u8).collect();
        let out = send(
            &mut conn,
            &f,
            cmd(0x13, 10, rw10(0x2a, 100, 2), true, 1024),
            &data,
        );
        assert!(out.is_empty(), "{out:?}");
        let ev: Vec<ProxyEvent> = conn.take_proxy_events().collect();
        let [ProxyEvent::Command(w)] = &ev[..] else {
            panic!("{ev:?}")
        };
        assert_eq!((w.range.write, w.range.lba, w.range.blocks), (true, 100, 2));
        assert!(!w.range.fua);
        assert_eq!(w.data, data);
        // The read's answer: 8 KiB in Data-In PDUs, status in the last.
        let read: Vec<u8> = (0..8192).map(|i| (i % 241) as u8).collect();
        let mut out = Vec::new();
        assert!(conn.proxy_done(0x10, Outcome::good(read.clone()), &mut out));
        let mut got = vec![0u8; 8192];
        let mut sns = Vec::new();
        let mut status = None;
        let seg = conn.negotiated().unwrap().initiator_max_recv as usize;
        for (r, d) in pdus(&f, &out) {
            let Repr::DataIn(DataIn {
                itt,
                data_sn,
                buffer_offset,
                status: st,
                ..
            }) = r
            else {
                panic!("{r:?}")
            };
            assert_eq!(itt, 0x10);
            assert!(d.len() <= seg);
            got[buffer_offset as usize..][..d.len()].copy_from_slice(&d);
            sns.push(data_sn);
            status = st;
        }
        assert!(got == read, "the read's data in place");
        assert_eq!(sns, (0..sns.len() as u32).collect::<Vec<_>>());
        assert_eq!(status, Some(GOOD));
        assert!(
            !conn.proxy_done(0x10, Outcome::good(read), &mut out),
            "answered once"
        );
        // ABORT TASK of the write: answered here, forwarded to the primary.
        let tmf = |itt: u32, function: u8, r: u32, cmd_sn: u32| {
            let mut b = Vec::new();
            f.emit(
                &Repr::TaskMgmtRequest(TaskMgmtRequest {
                    immediate: true,
                    function,
                    lun: 0,
                    itt,
                    ref_task_tag: r,
                    cmd_sn,
                    exp_stat_sn: 3,
                    ref_cmd_sn: 10,
                    exp_data_sn: 0,
                }),
                &[],
                &[],
                &mut b,
            )
            .unwrap();
            b
        };
        let mut out = Vec::new();
        conn.on_bytes(&tmf(0x20, 1, 0x13, 11), &mut out);
        let [(Repr::TaskMgmtResponse(t), _)] = &pdus(&f, &out)[..] else {
            panic!()
        };
        assert_eq!(t.response, 0, "function complete");
        assert_eq!(
            conn.take_proxy_events().collect::<Vec<_>>(),
            [ProxyEvent::Abort { itt: 0x13 }]
        );
        assert!(!conn.proxy_done(0x13, Outcome::good(Vec::new()), &mut out));
        // A LUN RESET aborts what waits and goes to the members.
        send(
            &mut conn,
            &f,
            cmd(0x14, 11, rw10(0x28, 0, 1), false, 512),
            &[],
        );
        let mut out = Vec::new();
        conn.on_bytes(&tmf(0x21, 5, 0, 12), &mut out);
        let ev: Vec<ProxyEvent> = conn.take_proxy_events().collect();
        assert!(matches!(ev[0], ProxyEvent::Command(_)));
        assert_eq!(
            ev[1..],
            [
                ProxyEvent::Abort { itt: 0x14 },
                ProxyEvent::Reset { function: 5 }
            ]
        );
        assert_eq!(conn.proxied_in_flight(), 0);
        // The reset's unit attention comes first (and nothing goes to the proxy) ...
        let out = send(
            &mut conn,
            &f,
            cmd(0x15, 12, rw10(0x2e, 200, 2), true, 1024),
            &data,
        );
        let [(Repr::ScsiResponse(s), sense)] = &out[..] else {
            panic!("{out:?}")
        };
        assert_eq!((s.itt, s.status), (0x15, CHECK_CONDITION));
        assert_eq!(sense[4], 0x06, "UNIT ATTENTION: {sense:?}");
        assert_eq!(conn.take_proxy_events().count(), 0);
        // ... then WRITE AND VERIFY (10) is proxied as a write that is durable before it
        // completes.
        let out = send(
            &mut conn,
            &f,
            cmd(0x15, 13, rw10(0x2e, 200, 2), true, 1024),
            &data,
        );
        assert!(out.is_empty(), "{out:?}");
        let ev: Vec<ProxyEvent> = conn.take_proxy_events().collect();
        let [ProxyEvent::Command(v)] = &ev[..] else {
            panic!("{ev:?}")
        };
        assert_eq!(
            (v.itt, v.range.write, v.range.lba, v.range.fua),
            (0x15, true, 200, true)
        );
        assert_eq!(v.data, data);
    }
}
