//! One initiator-side connection as a pure machine over a [`Transport`]: the application
//! queues commands ([`InitiatorConn::submit`], [`InitiatorConn::send_text`]), received PDUs
//! go in ([`InitiatorConn::on_pdu`]; their data inline or already placed in a task's
//! buffer), PDUs to send and task buffers go out to the transport, and completions are taken
//! with [`InitiatorConn::poll_event`]. Over the software transport the machine takes and
//! gives bytes ([`InitiatorConn::command`], [`InitiatorConn::on_bytes`], ...).
//!
//! - Login with [`InitiatorLogin`] (None or CHAP), then full-feature phase.
//! - Tasks at any queue depth within the target's CmdSN window (commands past MaxCmdSN wait
//!   in order and go out as the window opens).
//! - Reads: Data-In gathered at its Buffer Offset (bounded by the task's expected length),
//!   status from the last Data-In or the SCSI Response.
//! - Writes: immediate data and unsolicited Data-Out up to FirstBurstLength as negotiated,
//!   then Data-Out answering each R2T, cut to the target's MaxRecvDataSegmentLength.

use std::collections::{HashMap, VecDeque};

use toe_bus::HostBuf;

use crate::accel::{FillMeter, InitiatorAccel};
use crate::login::{InitiatorConfig, InitiatorLogin, InitiatorStep, LoginError, Negotiated};
use crate::text;
use crate::transport::{
    DataOutBurst, FrameError, RxData, RxPdu, Software, Stream, Transport, TxData,
};
use crate::wire::{
    DigestCheck, LogoutRequest, Nop, Repr, ScsiCommand, TaskMgmtRequest, Text, RESERVED_TAG,
};

/// What the initiator connection reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InitiatorEvent {
    /// Full-feature phase: commands may go.
    LoggedIn(Negotiated),
    /// The login failed; the connection is over.
    LoginFailed(LoginError),
    /// A Text Response (final) for request `itt`.
    Text {
        /// The request's tag.
        itt: u32,
        /// Its pairs.
        pairs: Vec<(String, String)>,
    },
    /// A SCSI command completed.
    Done(Completion),
    /// The Logout Response came.
    LoggedOut,
    /// The answer to a Task Management Function Request
    /// ([`InitiatorConn::task_mgmt`]). The tasks it ended are gone without a completion.
    TaskMgmt {
        /// The request's tag.
        itt: u32,
        /// Its function.
        function: u8,
        /// The target's response (0 function complete, 1 task does not exist, 5 function
        /// not supported, ...; RFC 7143 §11.6.1).
        response: u8,
    },
    /// The connection ended on a protocol error.
    Failed(String),
}

/// The end of one SCSI command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// The command's tag.
    pub itt: u32,
    /// SCSI status (0 GOOD, 2 CHECK CONDITION, ...).
    pub status: u8,
    /// iSCSI service response (0: completed at the target).
    pub response: u8,
    /// Sense data (without its 2-byte length), with CHECK CONDITION.
    pub sense: Vec<u8>,
    /// Data-In received (reads); empty when it was handed over in host memory
    /// ([`InitiatorConn::hand_over_reads`]).
    pub data: Vec<u8>,
    /// Residual overflow (the command wanted more than expected).
    pub overflow: bool,
    /// Residual underflow.
    pub underflow: bool,
    /// Residual count, bytes.
    pub residual: u32,
}

/// A command in flight; its data (to write, or read so far) is in the transport's buffer
/// for its ITT.
struct Task {
    cmd: ScsiCommand,
    /// The end of the Data-In received so far (the read's length), bytes.
    read_end: usize,
    /// When it (last) went out, µs of [`InitiatorConn::on_time`]'s clock.
    sent_us: u64,
    /// Times it was refused with a back-off and sent again.
    resends: u8,
}

/// An initiator connection over transport `T` (by default the software one, over a byte
/// stream).
pub struct InitiatorConn<T: Transport = Software> {
    login: Option<InitiatorLogin>,
    neg: Option<Negotiated>,
    io: T,
    cmd_sn: u32,
    exp_stat_sn: u32,
    max_cmd_sn: u32,
    next_itt: u32,
    tasks: HashMap<u32, Task>,
    waiting: VecDeque<u32>,
    events: VecDeque<InitiatorEvent>,
    ended: bool,
    /// Text Response data gathered over PDUs with F = 0 (at most [`MAX_TEXT_RESPONSE`]).
    text_in: Vec<u8>,
    /// The target asked for a logout (Async Message, AsyncEvent 1): it goes out once no
    /// command is in flight.
    logout_asked: bool,
    /// A Logout Request went out.
    logging_out: bool,
    /// Write acceleration: its settings, and its state.
    accel: InitiatorAccel,
    /// The latest time given to [`InitiatorConn::on_time`], µs.
    now_us: u64,
    /// The target asked for R2Ts (dynamic R2T): writes go without unsolicited data.
    r2t_required: bool,
    /// The back-off the target asked for, ms beyond the round-trip time.
    backoff_ms: u16,
    /// Writes the target refused for lack of buffer, to go again at (µs, ITT).
    resend: Vec<(u64, u32)>,
    /// The shortest command round trip seen, µs (the round-trip time estimate).
    min_rtt_us: Option<u64>,
    /// The write buffer's fill meter (congestion reports).
    fill: FillMeter,
    /// Tags of our congestion reports, whose (empty) Text Responses are not events.
    reports: Vec<u32>,
    /// Counters of write acceleration.
    accel_stats: AccelStats,
    /// Task management requests awaiting their answer: tag → (function, referenced task).
    tmf: HashMap<u32, (u8, u32)>,
    /// Hand read data over in host memory ([`InitiatorConn::hand_over_reads`]).
    hand_over: bool,
    /// Reads completed with their data handed over: tag → (buffer, bytes read).
    host_reads: HashMap<u32, (HostBuf, usize)>,
}

/// Buffers handed over but never taken go back to the transport's memory.
impl<T: Transport> Drop for InitiatorConn<T> {
    fn drop(&mut self) {
        for (_, (b, _)) in self.host_reads.drain() {
            self.io.free_host(b);
        }
    }
}

/// What an initiator's write acceleration did. Counts only grow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AccelStats {
    /// Writes the target refused (TASK SET FULL) that went again after the back-off.
    pub resent: u64,
    /// Dynamic-R2T messages received.
    pub r2t_signals: u64,
    /// Congestion reports sent.
    pub congestion_reports: u64,
}

/// SCSI status TASK SET FULL.
const TASK_SET_FULL: u8 = 0x28;

/// Most times one write refused with a back-off is sent again before its refusal is
/// reported to the application.
pub const MAX_RESENDS: u8 = 16;

/// Most congestion reports awaiting their Text Response at once.
const MAX_OPEN_REPORTS: usize = 8;

/// The longest Text Response the initiator gathers (over continued PDUs), bytes; a target
/// that sends more ends the connection.
pub const MAX_TEXT_RESPONSE: usize = 1 << 20;

impl<T: Transport> std::fmt::Debug for InitiatorConn<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InitiatorConn")
            .field("tasks", &self.tasks.len())
            .field("ended", &self.ended)
            .finish()
    }
}

/// The negotiated parameters that shape a write's first burst.
#[derive(Clone, Copy)]
struct Burst {
    initial_r2t: bool,
    immediate_data: bool,
    first_burst_length: u32,
    target_max_recv: u32,
}

/// Serial-number comparison (RFC 1982) of 32-bit sequence numbers: `a` after `b`.
fn sn_gt(a: u32, b: u32) -> bool {
    a != b && a.wrapping_sub(b) < 1 << 31
}

impl InitiatorConn<Software> {
    /// A connection for `cfg` over the software transport; `challenge` and `chap_id`
    /// (random) serve mutual CHAP. Call [`InitiatorConn::start`] for the first bytes.
    pub fn new(cfg: InitiatorConfig, challenge: [u8; 16], chap_id: u8) -> Self {
        InitiatorConn::over(Software::default(), cfg, challenge, chap_id)
    }
}

impl<T: Stream> InitiatorConn<T> {
    /// Run `f` with what it sends appended to `out`.
    fn lent<R>(&mut self, out: &mut Vec<u8>, f: impl FnOnce(&mut Self) -> R) -> R {
        self.io.lend_output(out);
        let r = f(self);
        self.io.lend_output(out);
        r
    }

    /// [`InitiatorConn::begin`], the bytes to `out`.
    pub fn start(&mut self, out: &mut Vec<u8>) {
        self.lent(out, |c| c.begin())
    }

    /// [`InitiatorConn::send_text`], the bytes to `out`.
    pub fn text(&mut self, pairs: &[(&str, &str)], out: &mut Vec<u8>) -> u32 {
        self.lent(out, |c| c.send_text(pairs))
    }

    /// [`InitiatorConn::on_time`], the bytes to `out`.
    pub fn poll(&mut self, now_us: u64, out: &mut Vec<u8>) {
        self.lent(out, |c| c.on_time(now_us))
    }

    /// [`InitiatorConn::send_ping`], the bytes to `out`.
    pub fn ping(&mut self, out: &mut Vec<u8>) {
        self.lent(out, |c| c.send_ping())
    }

    /// [`InitiatorConn::submit`], the bytes to `out`.
    pub fn command(
        &mut self,
        lun: u64,
        cdb: &[u8],
        read_len: u32,
        write: Vec<u8>,
        out: &mut Vec<u8>,
    ) -> u32 {
        self.lent(out, |c| c.submit(lun, cdb, read_len, write))
    }

    /// [`InitiatorConn::send_logout`], the bytes to `out`.
    pub fn logout(&mut self, out: &mut Vec<u8>) {
        self.lent(out, |c| c.send_logout())
    }

    /// Take bytes from the target; append what to send to `out`.
    pub fn on_bytes(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        if self.ended {
            return;
        }
        let framed = self.lent(out, |c| {
            T::receive(
                c,
                |c| &mut c.io,
                bytes,
                |c, pdu| {
                    c.on_pdu(pdu);
                    !c.ended
                },
            )
        });
        match framed {
            Ok(()) => {}
            Err(FrameError::Oversized(n)) => self.fail(format!(
                "a PDU from the target with {n} bytes of data, more than this side receives"
            )),
            Err(FrameError::Wire(e)) => self.fail(format!("bad PDU from the target: {e}")),
            Err(FrameError::Engine(e)) => self.fail(format!("the NIC's engine: {e}")),
        }
    }
}

impl<T: Transport> InitiatorConn<T> {
    /// A connection over transport `io`; see [`InitiatorConn::new`].
    pub fn over(io: T, cfg: InitiatorConfig, challenge: [u8; 16], chap_id: u8) -> Self {
        let cmd_sn = cfg.cmd_sn;
        InitiatorConn {
            login: Some(InitiatorLogin::new(cfg, challenge, chap_id)),
            neg: None,
            io,
            cmd_sn,
            exp_stat_sn: 0,
            max_cmd_sn: cmd_sn,
            next_itt: 1,
            tasks: HashMap::new(),
            waiting: VecDeque::new(),
            events: VecDeque::new(),
            ended: false,
            text_in: Vec::new(),
            logout_asked: false,
            logging_out: false,
            accel: InitiatorAccel::default(),
            now_us: 0,
            r2t_required: false,
            backoff_ms: 0,
            resend: Vec::new(),
            min_rtt_us: None,
            fill: FillMeter::default(),
            reports: Vec::new(),
            accel_stats: AccelStats::default(),
            tmf: HashMap::new(),
            hand_over: false,
            host_reads: HashMap::new(),
        }
    }

    /// With `on`, a read that completes leaves its data where the transport placed it, in
    /// host memory, when the transport can hand it over ([`Transport::take_host`]): its
    /// [`Completion::data`] is then empty and the buffer waits for
    /// [`InitiatorConn::take_host_read`]. A proxy uses it to send the data on from
    /// another connection of the same host without copying it. Off by default.
    pub fn hand_over_reads(&mut self, on: bool) {
        self.hand_over = on;
    }

    /// The data of read `itt`, handed over in host memory (see
    /// [`InitiatorConn::hand_over_reads`]): the buffer and how many of its first bytes
    /// the target sent. Each is taken once; the caller frees it (or hands it on).
    pub fn take_host_read(&mut self, itt: u32) -> Option<(HostBuf, usize)> {
        self.host_reads.remove(&itt)
    }

    /// [`InitiatorConn::submit`] of a write whose data is `write`, all of it, already in
    /// the transport's host memory ([`Transport::open_host`]): the transport sends from it
    /// without copying and frees it when done. `Err(write)`, and nothing submitted, if the
    /// transport has no host memory.
    pub fn submit_host(&mut self, lun: u64, cdb: &[u8], write: HostBuf) -> Result<u32, HostBuf> {
        let len = write.len() as u32;
        let itt = self.tag();
        self.io.open_host(itt, write)?;
        Ok(self.queue(itt, lun, cdb, 0, len))
    }

    /// Send a Task Management Function Request (immediate) for `lun`: ABORT TASK (1) of
    /// task `ref_itt`, or a function of the whole task set or logical unit (2 ABORT TASK
    /// SET, 3 CLEAR TASK SET, 5 LOGICAL UNIT RESET, 6 TARGET WARM RESET; `ref_itt` is
    /// then ignored). Returns its tag; the answer comes as [`InitiatorEvent::TaskMgmt`],
    /// and with it the tasks it ended go (without completions). A task not sent yet (the
    /// CmdSN window was closed) is dropped at once.
    pub fn task_mgmt(&mut self, function: u8, lun: u64, ref_itt: u32) -> u32 {
        let itt = self.tag();
        if function == 1 && self.waiting.contains(&ref_itt) {
            self.waiting.retain(|&w| w != ref_itt);
            self.finish_task(ref_itt, false);
        }
        let ref_cmd_sn = match self.tasks.get(&ref_itt) {
            Some(t) if function == 1 => t.cmd.cmd_sn,
            _ => self.cmd_sn,
        };
        self.tmf.insert(itt, (function, ref_itt));
        let r = Repr::TaskMgmtRequest(TaskMgmtRequest {
            immediate: true,
            function,
            lun,
            itt,
            ref_task_tag: if function == 1 { ref_itt } else { RESERVED_TAG },
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
            ref_cmd_sn,
            exp_data_sn: 0,
        });
        self.io.send(&r, TxData::Inline(&[]));
        itt
    }

    /// The initiator's write-acceleration settings (used once a session negotiated it:
    /// offer it with [`crate::login::OpParams`]'s `write_acceleration`).
    pub fn with_accel(mut self, a: InitiatorAccel) -> Self {
        self.accel = a;
        self
    }

    /// Whether this session runs with write acceleration.
    pub fn accelerated(&self) -> bool {
        self.neg.as_ref().is_some_and(|n| n.write_acceleration)
    }

    /// Counters of write acceleration.
    pub fn accel_stats(&self) -> AccelStats {
        self.accel_stats
    }

    /// Time passes (`now_us`, µs of the caller's clock; it never goes back): refused writes
    /// go again once their back-off is over, and an accelerated session reports its write
    /// buffer's congestion.
    pub fn on_time(&mut self, now_us: u64) {
        self.now_us = self.now_us.max(now_us);
        if self.ended || self.neg.is_none() {
            return;
        }
        let now = self.now_us;
        let mut due = Vec::new();
        self.resend.retain(|&(t, itt)| {
            if t <= now {
                due.push(itt);
            }
            t > now
        });
        if !due.is_empty() {
            self.accel_stats.resent += due.len() as u64;
            self.waiting.extend(due);
            self.flush_waiting();
        }
        if self.accelerated() && self.fill.due(&self.accel, now) {
            let held: u64 = self
                .tasks
                .values()
                .filter(|t| t.cmd.write)
                .map(|t| u64::from(t.cmd.expected_len))
                .sum();
            if let Some(v) = self.fill.sample(&self.accel, now, held) {
                self.accel_stats.congestion_reports += 1;
                let itt = self.tag();
                let mut data = Vec::new();
                text::encode_pairs(&[(crate::accel::CONGESTION_KEY, v.as_str())], &mut data);
                // Answers normally come at once; a target that never answers cannot make
                // the list grow past a few entries.
                if self.reports.len() >= MAX_OPEN_REPORTS {
                    self.reports.remove(0);
                }
                self.reports.push(itt);
                self.text_request(itt, RESERVED_TAG, &data);
            }
        }
    }

    /// When [`InitiatorConn::on_time`] has something to do next (a refused write to send
    /// again, a fill sample), µs.
    pub fn next_deadline(&self) -> Option<u64> {
        let resend = self.resend.iter().map(|r| r.0).min();
        let sample = (self.accelerated() && !self.tasks.is_empty())
            .then(|| self.now_us + self.accel.sample_us);
        resend.into_iter().chain(sample).min()
    }

    /// Send the first Login Request.
    pub fn begin(&mut self) {
        if let Some(l) = self.login.as_mut() {
            if let InitiatorStep::Send(h, d) = l.start() {
                self.io.send(&Repr::LoginRequest(h), TxData::Inline(&d));
            }
        }
    }

    /// The transport.
    pub fn transport(&self) -> &T {
        &self.io
    }

    /// The transport, to deliver what it received ([`InitiatorConn::on_pdu`]).
    pub fn transport_mut(&mut self) -> &mut T {
        &mut self.io
    }

    /// The parameters in force, once logged in.
    pub fn negotiated(&self) -> Option<&Negotiated> {
        self.neg.as_ref()
    }

    /// Whether the connection is over (logged out, failed).
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// Commands not completed yet (sent or waiting for the window).
    pub fn in_flight(&self) -> usize {
        self.tasks.len()
    }

    /// Bytes the host ran through CRC32C for digests so far, sent and received (see
    /// [`Transport::digest_bytes`]).
    pub fn digest_bytes(&self) -> u64 {
        self.io.digest_bytes()
    }

    /// Data bytes the transport copied within application memory so far (see
    /// [`Transport::copy_bytes`]).
    pub fn copy_bytes(&self) -> u64 {
        self.io.copy_bytes()
    }

    /// The next completion or other event.
    pub fn poll_event(&mut self) -> Option<InitiatorEvent> {
        self.events.pop_front()
    }

    fn tag(&mut self) -> u32 {
        let t = self.next_itt;
        self.next_itt = self.next_itt.wrapping_add(1);
        if self.next_itt == RESERVED_TAG {
            self.next_itt = 1;
        }
        t
    }

    fn fail(&mut self, why: String) {
        if !self.ended {
            self.ended = true;
            self.events.push_back(InitiatorEvent::Failed(why));
        }
    }

    /// Send a Text Request (immediate) with `pairs` (for example `SendTargets=All`);
    /// returns its tag.
    pub fn send_text(&mut self, pairs: &[(&str, &str)]) -> u32 {
        let itt = self.tag();
        let mut data = Vec::new();
        text::encode_pairs(pairs, &mut data);
        self.text_request(itt, RESERVED_TAG, &data);
        itt
    }

    /// A final, immediate Text Request for `itt` with `data`: a new exchange (`ttt`
    /// reserved), or the empty request that asks for the rest of a continued answer.
    fn text_request(&mut self, itt: u32, ttt: u32, data: &[u8]) {
        let r = Repr::TextRequest(Text {
            immediate: true,
            final_: true,
            cont: false,
            lun: 0,
            itt,
            ttt,
            sn: self.cmd_sn,
            exp_sn: self.exp_stat_sn,
            max_cmd_sn: 0,
        });
        self.io.send(&r, TxData::Inline(data));
    }

    /// Send a NOP-Out ping (immediate); the NOP-In answer only updates sequence numbers.
    pub fn send_ping(&mut self) {
        let itt = self.tag();
        self.nop_out(0, itt, RESERVED_TAG, &[]);
    }

    /// An immediate NOP-Out: a ping of ours (`itt`), or the answer to the target's
    /// (`ttt`, echoing its `data`).
    fn nop_out(&mut self, lun: u64, itt: u32, ttt: u32, data: &[u8]) {
        let r = Repr::NopOut(Nop {
            immediate: true,
            lun,
            itt,
            ttt,
            sn: self.cmd_sn,
            exp_sn: self.exp_stat_sn,
            max_cmd_sn: 0,
        });
        self.io.send(&r, TxData::Inline(data));
    }

    /// Queue SCSI command `cdb` (at most 16 bytes) for `lun`, reading up to `read_len`
    /// bytes, or writing `write` (then `read_len` is ignored); returns its tag. It goes out
    /// at once if the CmdSN window allows, otherwise when it opens.
    pub fn submit(&mut self, lun: u64, cdb: &[u8], read_len: u32, write: Vec<u8>) -> u32 {
        let itt = self.tag();
        let write_len = write.len() as u32;
        // The task's buffer: the data to write, or room for what it reads (which the
        // transport may place there itself).
        if write_len > 0 {
            self.io.open(itt, write);
        } else if read_len > 0 {
            self.io.open_receive(itt, read_len as usize);
        }
        self.queue(itt, lun, cdb, read_len, write_len)
    }

    /// Queue command `cdb` as task `itt`, whose buffer is open: a write of `write_len`
    /// bytes, or a read of up to `read_len`.
    fn queue(&mut self, itt: u32, lun: u64, cdb: &[u8], read_len: u32, write_len: u32) -> u32 {
        let mut c = [0u8; 16];
        let n = cdb.len().min(16);
        c[..n].copy_from_slice(&cdb[..n]);
        let writing = write_len > 0;
        let cmd = ScsiCommand {
            immediate: false,
            final_: true,
            read: !writing && read_len > 0,
            write: writing,
            attr: 1,
            lun,
            itt,
            expected_len: if writing { write_len } else { read_len },
            cmd_sn: 0,
            exp_stat_sn: 0,
            cdb: c,
        };
        self.tasks.insert(
            itt,
            Task {
                cmd,
                read_end: 0,
                sent_us: self.now_us,
                resends: 0,
            },
        );
        self.waiting.push_back(itt);
        self.flush_waiting();
        itt
    }

    /// Ask to close the session (Logout, reason 0).
    pub fn send_logout(&mut self) {
        if std::mem::replace(&mut self.logging_out, true) {
            return; // one Logout per connection
        }
        let itt = self.tag();
        let r = Repr::LogoutRequest(LogoutRequest {
            immediate: true,
            reason: 0,
            itt,
            cid: 0,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
        });
        self.io.send(&r, TxData::Inline(&[]));
    }

    /// Send the waiting commands the window allows.
    fn flush_waiting(&mut self) {
        // The four parameters it needs (not a clone of the whole negotiation per call).
        let Some(neg) = self.neg.as_ref().map(|n| Burst {
            initial_r2t: n.initial_r2t,
            immediate_data: n.immediate_data,
            first_burst_length: n.first_burst_length,
            target_max_recv: n.target_max_recv,
        }) else {
            return;
        };
        while let Some(&itt) = self.waiting.front() {
            if sn_gt(self.cmd_sn, self.max_cmd_sn) {
                break; // the window is closed
            }
            self.waiting.pop_front();
            let Some(t) = self.tasks.get_mut(&itt) else {
                continue;
            };
            t.cmd.cmd_sn = self.cmd_sn;
            t.cmd.exp_stat_sn = self.exp_stat_sn;
            t.sent_us = self.now_us;
            self.cmd_sn = self.cmd_sn.wrapping_add(1);
            let len = if t.cmd.write {
                t.cmd.expected_len as usize
            } else {
                0
            };
            let first_burst = if (neg.initial_r2t && !neg.immediate_data) || self.r2t_required {
                0
            } else {
                (neg.first_burst_length as usize).min(len)
            };
            let imm = if neg.immediate_data {
                first_burst.min(neg.target_max_recv as usize)
            } else {
                0
            };
            // F: no unsolicited Data-Out follows the command.
            let unsolicited_end = if neg.initial_r2t || self.r2t_required {
                imm
            } else {
                first_burst
            };
            t.cmd.final_ = unsolicited_end == imm;
            let cmd = t.cmd;
            let data = if imm > 0 {
                TxData::Task {
                    itt,
                    offset: 0,
                    len: imm as u32,
                }
            } else {
                TxData::Inline(&[])
            };
            self.io.send(&Repr::ScsiCommand(cmd), data);
            if unsolicited_end > imm {
                self.send_data_out(itt, RESERVED_TAG, imm, unsolicited_end);
            }
        }
    }

    /// Data-Out PDUs for `itt`, bytes `from..to`, for transfer tag `ttt`, DataSN from 0.
    fn send_data_out(&mut self, itt: u32, ttt: u32, from: usize, to: usize) {
        let seg = self
            .neg
            .as_ref()
            .map_or(8192, |n| n.target_max_recv.max(512) as usize);
        let Some(t) = self.tasks.get(&itt) else {
            return;
        };
        let to = to.min(if t.cmd.write {
            t.cmd.expected_len as usize
        } else {
            0
        });
        if from >= to {
            return;
        }
        let burst = DataOutBurst {
            lun: t.cmd.lun,
            itt,
            ttt,
            exp_stat_sn: self.exp_stat_sn,
            from: from as u32,
            to: to as u32,
            max_segment: seg as u32,
        };
        self.io.send_data_out(&burst);
    }

    fn update_sns(&mut self, stat_sn: Option<u32>, exp_cmd_sn: u32, max_cmd_sn: u32) {
        if let Some(s) = stat_sn {
            if !sn_gt(self.exp_stat_sn, s.wrapping_add(1)) {
                self.exp_stat_sn = s.wrapping_add(1);
            }
        }
        // MaxCmdSN only counts when it is not behind ExpCmdSN - 1 (RFC 7143 §4.2.2.1).
        if !sn_gt(exp_cmd_sn.wrapping_sub(1), max_cmd_sn) && sn_gt(max_cmd_sn, self.max_cmd_sn) {
            self.max_cmd_sn = max_cmd_sn;
        }
    }

    /// Take a PDU received from the target (its data inline, or already placed in the
    /// buffer of its task); what to send goes to the transport.
    pub fn on_pdu(&mut self, pdu: RxPdu<'_>) {
        if self.ended {
            return;
        }
        if matches!(pdu.data_digest, DigestCheck::Bad { .. }) {
            // ERL 0: the data cannot be trusted and is not recovered.
            return self.fail("data digest error from the target".into());
        }
        let repr = match pdu.repr() {
            Ok(r) => r,
            Err(e) => return self.fail(format!("bad PDU from the target: {e}")),
        };
        let data = pdu.inline();
        if let Some(login) = self.login.as_mut() {
            let Repr::LoginResponse(rsp) = repr else {
                return self.fail("a PDU other than a Login Response during login".into());
            };
            match login.on_response(&rsp, data) {
                Ok(InitiatorStep::Send(h, d)) => {
                    self.io.send(&Repr::LoginRequest(h), TxData::Inline(&d));
                }
                Ok(InitiatorStep::Done(neg)) => {
                    self.login = None;
                    self.exp_stat_sn = rsp.sn.wrapping_add(1);
                    self.max_cmd_sn = rsp.max_cmd_sn;
                    self.cmd_sn = rsp.exp_sn;
                    self.io.full_feature(
                        neg.header_digest,
                        neg.data_digest,
                        neg.initiator_max_recv,
                    );
                    self.neg = Some(neg.clone());
                    self.events.push_back(InitiatorEvent::LoggedIn(neg));
                    self.flush_waiting();
                }
                Err(e) => {
                    self.ended = true;
                    self.events.push_back(InitiatorEvent::LoginFailed(e));
                }
            }
            return;
        }
        match repr {
            Repr::DataIn(d) => {
                self.update_sns(d.status.map(|_| d.stat_sn), d.exp_cmd_sn, d.max_cmd_sn);
                let Some(t) = self.tasks.get_mut(&d.itt) else {
                    return self.fail(format!("Data-In for unknown task {:#x}", d.itt));
                };
                let at = d.buffer_offset as usize;
                let end = at + pdu.data_len();
                if end > t.cmd.expected_len as usize
                    || t.cmd.write
                    || pdu.placed_elsewhere(d.buffer_offset)
                {
                    return self.fail("Data-In past the expected length".into());
                }
                t.read_end = t.read_end.max(end);
                if let RxData::Inline(bytes) = pdu.data {
                    self.io.place(d.itt, at, bytes);
                }
                if let Some(status) = d.status {
                    let data = self.finish_task(d.itt, self.hand_over);
                    self.events.push_back(InitiatorEvent::Done(Completion {
                        itt: d.itt,
                        status,
                        response: 0,
                        sense: Vec::new(),
                        data,
                        overflow: d.overflow,
                        underflow: d.underflow,
                        residual: d.residual,
                    }));
                }
            }
            Repr::ScsiResponse(r) => {
                self.update_sns(Some(r.stat_sn), r.exp_cmd_sn, r.max_cmd_sn);
                let Some(t) = self.tasks.get_mut(&r.itt) else {
                    return self.fail(format!("SCSI Response for unknown task {:#x}", r.itt));
                };
                let rtt = self.now_us.saturating_sub(t.sent_us);
                if r.status == TASK_SET_FULL
                    && t.cmd.write
                    && self.backoff_ms > 0
                    && t.resends < MAX_RESENDS
                {
                    // Refused for lack of buffer, with a back-off: the write goes again
                    // after the round-trip time plus the back-off; its buffer stays. After
                    // MAX_RESENDS refusals the application sees the TASK SET FULL.
                    t.resends += 1;
                    let wait = self.min_rtt_us.unwrap_or(0) + u64::from(self.backoff_ms) * 1000;
                    self.resend.push((self.now_us + wait, r.itt));
                    self.flush_waiting();
                    return;
                }
                if r.status != TASK_SET_FULL {
                    self.min_rtt_us = Some(self.min_rtt_us.map_or(rtt, |m| m.min(rtt)));
                }
                let read = self.finish_task(r.itt, self.hand_over);
                let sense = if data.len() >= 2 {
                    let n = usize::from(u16::from_be_bytes([data[0], data[1]]));
                    data[2..(2 + n).min(data.len())].to_vec()
                } else {
                    Vec::new()
                };
                self.events.push_back(InitiatorEvent::Done(Completion {
                    itt: r.itt,
                    status: r.status,
                    response: r.response,
                    sense,
                    data: read,
                    overflow: r.overflow,
                    underflow: r.underflow,
                    residual: r.residual,
                }));
            }
            Repr::R2t(r) => {
                self.update_sns(None, r.exp_cmd_sn, r.max_cmd_sn);
                let from = r.buffer_offset as usize;
                self.send_data_out(r.itt, r.ttt, from, from + r.desired_len as usize);
            }
            Repr::TextResponse(t) if self.reports.contains(&t.itt) => {
                // The answer to a congestion report (a declaration: nothing in it).
                self.update_sns(Some(t.sn), t.exp_sn, t.max_cmd_sn);
                self.reports.retain(|&i| i != t.itt);
            }
            Repr::TextResponse(t) => {
                self.update_sns(Some(t.sn), t.exp_sn, t.max_cmd_sn);
                if self.text_in.len() + data.len() > MAX_TEXT_RESPONSE {
                    return self.fail(format!(
                        "Text Response longer than {MAX_TEXT_RESPONSE} bytes"
                    ));
                }
                self.text_in.extend_from_slice(data);
                if !t.final_ {
                    // More to come: an empty Text Request with the target's TTT asks for it
                    // (RFC 7143 §11.10.4).
                    self.text_request(t.itt, t.ttt, &[]);
                    return;
                }
                let bytes = std::mem::take(&mut self.text_in);
                let pairs = match text::parse_listing(&bytes) {
                    Ok(p) => p
                        .into_iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                    Err(e) => return self.fail(format!("Text Response: {e}")),
                };
                self.events
                    .push_back(InitiatorEvent::Text { itt: t.itt, pairs });
            }
            Repr::NopIn(n) => {
                self.update_sns(
                    (n.itt != RESERVED_TAG).then_some(n.sn),
                    n.exp_sn,
                    n.max_cmd_sn,
                );
                if n.ttt != RESERVED_TAG {
                    // The target pings: answer with its tag.
                    self.nop_out(n.lun, RESERVED_TAG, n.ttt, data);
                }
            }
            Repr::LogoutResponse(l) => {
                self.update_sns(Some(l.stat_sn), l.exp_cmd_sn, l.max_cmd_sn);
                self.ended = true;
                self.events.push_back(InitiatorEvent::LoggedOut);
            }
            Repr::Reject(r) => {
                self.update_sns(Some(r.stat_sn), r.exp_cmd_sn, r.max_cmd_sn);
                // The rejected header names the task (if any): it will not complete. Except
                // after a data digest error: the target then ends the task itself, with a
                // SCSI Response (or asks for the data again with an R2T; RFC 7143 §7.8).
                if data.len() >= 20 && r.reason != 0x02 {
                    let itt = u32::from_be_bytes([data[16], data[17], data[18], data[19]]);
                    if self.tasks.contains_key(&itt) {
                        let data = self.finish_task(itt, false);
                        self.events.push_back(InitiatorEvent::Done(Completion {
                            itt,
                            status: 0xff,
                            response: 1,
                            sense: Vec::new(),
                            data,
                            overflow: false,
                            underflow: false,
                            residual: 0,
                        }));
                    }
                }
            }
            Repr::AsyncMessage(a) => {
                self.update_sns(Some(a.stat_sn), a.exp_cmd_sn, a.max_cmd_sn);
                // AsyncEvent 1: the target requests a logout, which the initiator must send
                // within Parameter3 seconds (RFC 7143 §11.9.1): once its commands are done.
                if a.event == 1 {
                    self.logout_asked = true;
                }
                // Write acceleration's vendor messages, in a session that negotiated it.
                if a.event == crate::accel::ASYNC_VENDOR && self.accelerated() {
                    match a.vcode {
                        crate::accel::vcode::R2T_REQUIRED => {
                            self.accel_stats.r2t_signals += 1;
                            self.r2t_required = true;
                        }
                        crate::accel::vcode::UNSOLICITED_OK => {
                            self.accel_stats.r2t_signals += 1;
                            self.r2t_required = false;
                        }
                        crate::accel::vcode::BACK_OFF => self.backoff_ms = a.param1.max(1),
                        _ => {}
                    }
                }
            }
            Repr::TaskMgmtResponse(t) => {
                self.update_sns(Some(t.stat_sn), t.exp_cmd_sn, t.max_cmd_sn);
                if let Some((function, ref_itt)) = self.tmf.remove(&t.itt) {
                    // Function complete, or the task is not (no longer) at the target:
                    // no answer of the tasks it names will come.
                    if t.response <= 1 {
                        let ended: Vec<u32> = if function == 1 {
                            vec![ref_itt]
                        } else {
                            self.tasks.keys().copied().collect()
                        };
                        for itt in ended {
                            self.waiting.retain(|&w| w != itt);
                            self.finish_task(itt, false);
                        }
                    }
                    self.events.push_back(InitiatorEvent::TaskMgmt {
                        itt: t.itt,
                        function,
                        response: t.response,
                    });
                }
            }
            other => return self.fail(format!("unexpected {:?} from the target", other.opcode())),
        }
        self.flush_waiting();
        if self.logout_asked && self.tasks.is_empty() {
            self.send_logout();
        }
    }

    /// Task `itt` is over: its buffer is closed, and what it read comes back (nothing for
    /// a write) or, with `hand_over` and a transport that can, waits in host memory for
    /// [`InitiatorConn::take_host_read`].
    fn finish_task(&mut self, itt: u32, hand_over: bool) -> Vec<u8> {
        let Some(t) = self.tasks.remove(&itt) else {
            return Vec::new();
        };
        if hand_over && !t.cmd.write {
            if let Some(b) = self.io.take_host(itt) {
                let len = t.read_end.min(b.len());
                if let Some((old, _)) = self.host_reads.insert(itt, (b, len)) {
                    self.io.free_host(old);
                }
                return Vec::new();
            }
        }
        let mut data = self.io.close(itt).unwrap_or_default();
        if t.cmd.write {
            data.clear();
        }
        data.truncate(t.read_end);
        data
    }

    /// Whether the target asked this connection to log out (it does, once idle).
    pub fn logout_asked(&self) -> bool {
        self.logout_asked
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::login::{OpParams, TargetConfig};
    use crate::scsi::{Disk, MemStore};
    use crate::target::TargetConn;
    use std::sync::{Arc, Mutex};

    fn pair(digests: &str, initial_r2t: bool, window: u32) -> (InitiatorConn, TargetConn) {
        let targets = vec![("iqn.t".into(), "127.0.0.1:3260,1".into())];
        let (i, t, _) = pair_with(digests, initial_r2t, window, targets, Some("iqn.t"));
        (i, t)
    }

    /// A pair whose target offers `targets` to discovery; the initiator logs in to `name`
    /// (a discovery session with `None`).
    fn pair_with(
        digests: &str,
        initial_r2t: bool,
        window: u32,
        targets: Vec<(String, String)>,
        name: Option<&str>,
    ) -> (InitiatorConn, TargetConn, Arc<Mutex<Disk>>) {
        let (a, b) = (Software::default(), Software::default());
        pair_over(a, b, digests, initial_r2t, window, targets, name)
    }

    /// [`pair_with`] over transports `a` (the initiator's) and `b` (the target's).
    fn pair_over<A: Transport, B: Transport>(
        a: A,
        b: B,
        digests: &str,
        initial_r2t: bool,
        window: u32,
        targets: Vec<(String, String)>,
        name: Option<&str>,
    ) -> (InitiatorConn<A>, TargetConn<B>, Arc<Mutex<Disk>>) {
        let disk = Arc::new(Mutex::new(Disk::new(
            Box::new(MemStore::new(16 << 20)),
            512,
            "T",
        )));
        let t = TargetConn::over(
            b,
            TargetConfig {
                target_name: "iqn.t".into(),
                alias: None,
                portal_group_tag: 1,
                chap: None,
                mutual: None,
                params: OpParams {
                    header_digest: digests.into(),
                    data_digest: digests.into(),
                    max_burst_length: 65_536,
                    first_burst_length: 16_384,
                    initial_r2t,
                    max_outstanding_r2t: 4,
                    max_recv_data_segment_length: 8192,
                    ..OpParams::default()
                },
                cmd_window: window,
            },
            targets,
            [5; 16],
            3,
            1,
        )
        .with_disk(disk.clone());
        let i = InitiatorConn::over(
            a,
            InitiatorConfig {
                initiator_name: "iqn.i".into(),
                target_name: name.map(str::to_string),
                chap: None,
                mutual: None,
                params: OpParams {
                    header_digest: digests.into(),
                    data_digest: digests.into(),
                    max_recv_data_segment_length: 16_384,
                    initial_r2t,
                    max_outstanding_r2t: 4,
                    ..OpParams::default()
                },
                isid: [0x80, 0, 0, 0, 0, 9],
                cmd_sn: 100,
            },
            [6; 16],
            4,
        );
        (i, t, disk)
    }

    /// Move bytes both ways until neither side has anything to say.
    fn exchange(i: &mut InitiatorConn, t: &mut TargetConn, to_target: Vec<u8>) {
        exchange_tampering(i, t, to_target, |_, _, _| {});
    }

    /// [`exchange`], with `tamper(to_target, round, bytes)` seeing (and free to change) the
    /// bytes of each round in each direction before they arrive: corruption above TCP.
    fn exchange_tampering(
        i: &mut InitiatorConn,
        t: &mut TargetConn,
        mut to_target: Vec<u8>,
        mut tamper: impl FnMut(bool, usize, &mut Vec<u8>),
    ) {
        for round in 0..10_000 {
            if to_target.is_empty() {
                return;
            }
            tamper(true, round, &mut to_target);
            let mut to_init = Vec::new();
            t.on_bytes(&to_target, &mut to_init);
            tamper(false, round, &mut to_init);
            to_target = Vec::new();
            i.on_bytes(&to_init, &mut to_target);
        }
        panic!("the exchange did not settle");
    }

    /// Reads 64 KiB at LBA 0 through the pair; the data, or None if the command failed.
    fn read_back(i: &mut InitiatorConn, t: &mut TargetConn) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        let tag = i.command(0, &rw10(0x28, 0, 128), 65_536, Vec::new(), &mut out);
        exchange(i, t, out);
        match i.poll_event() {
            Some(InitiatorEvent::Done(c)) if c.itt == tag && c.status == 0 => Some(c.data),
            _ => None,
        }
    }

    /// A bit flipped above TCP (after the checksum, before the digest check) in write data,
    /// immediate or in a Data-Out PDU, is caught by the target's data digest: Reject (Data
    /// Digest Error), the write ends with CHECK CONDITION, ABORTED COMMAND, PROTOCOL SERVICE
    /// CRC ERROR (47h/05h), nothing of it reaches the disk, and the session goes on. In read
    /// data the initiator catches it and ends the connection: no corrupt read completes.
    #[test]
    fn a_data_digest_error_fails_the_command_and_is_never_accepted() {
        // (InitialR2T, the round whose bytes to the target are hit): the command with its
        // immediate data, or the Data-Out PDU answering the R2T.
        for (initial_r2t, round) in [(false, 0), (true, 1)] {
            let (mut i, mut t) = pair("CRC32C", initial_r2t, 8);
            login(&mut i, &mut t);
            let mut out = Vec::new();
            let tag = i.command(0, &rw10(0x2a, 0, 128), 0, vec![0xa5; 65_536], &mut out);
            let mut hit = false;
            exchange_tampering(&mut i, &mut t, out, |to_target, r, bytes| {
                if to_target && r == round && bytes.len() > 1000 {
                    bytes[48 + 4 + 500] ^= 0x10; // in the first data segment
                    hit = true;
                }
            });
            assert!(
                hit,
                "InitialR2T={initial_r2t}: no data went in round {round}"
            );
            let Some(InitiatorEvent::Done(c)) = i.poll_event() else {
                panic!("InitialR2T={initial_r2t}: the write did not complete")
            };
            assert_eq!(c.itt, tag);
            assert_eq!(c.status, 2, "CHECK CONDITION: {c:?}");
            assert_eq!(
                (c.sense[2] & 0x0f, c.sense[12], c.sense[13]),
                (0x0b, 0x47, 0x05),
                "{c:?}"
            );
            assert_eq!(t.stats().data_digest_errors, 1);
            assert_eq!(t.stats().rejects, 1);
            assert_eq!(
                read_back(&mut i, &mut t),
                Some(vec![0; 65_536]),
                "the disk is untouched"
            );
        }
        // Read data: the initiator's digest check fails and the connection ends.
        let (mut i, mut t) = pair("CRC32C", true, 8);
        login(&mut i, &mut t);
        let mut out = Vec::new();
        i.command(0, &rw10(0x28, 0, 128), 65_536, Vec::new(), &mut out);
        exchange_tampering(&mut i, &mut t, out, |to_target, _, bytes| {
            if !to_target && bytes.len() > 1000 {
                bytes[48 + 4 + 7] ^= 0x01;
            }
        });
        let events: Vec<InitiatorEvent> = std::iter::from_fn(|| i.poll_event()).collect();
        assert!(
            matches!(events.as_slice(), [InitiatorEvent::Failed(why)] if why.contains("digest")),
            "{events:?}"
        );
        assert!(i.ended());
    }

    fn rw10(op: u8, lba: u32, blocks: u16) -> [u8; 10] {
        let mut c = [0u8; 10];
        c[0] = op;
        c[2..6].copy_from_slice(&lba.to_be_bytes());
        c[7..9].copy_from_slice(&blocks.to_be_bytes());
        c
    }

    fn login(i: &mut InitiatorConn, t: &mut TargetConn) -> Negotiated {
        let mut out = Vec::new();
        i.start(&mut out);
        exchange(i, t, out);
        match i.poll_event() {
            Some(InitiatorEvent::LoggedIn(n)) => n,
            other => panic!("{other:?}"),
        }
    }

    /// A SendTargets answer longer than the initiator's MaxRecvDataSegmentLength (16 KiB)
    /// comes in continued Text Responses (F = 0, C = 1, a TTT), each one asked for with an
    /// empty Text Request; the keys repeat, one TargetName and TargetAddress per target.
    #[test]
    fn a_long_discovery_answer_is_continued_over_several_text_responses() {
        let targets: Vec<(String, String)> = (0..400)
            .map(|k| {
                (
                    format!("iqn.2026-12.org.toemu:disk-{k:04}"),
                    format!("10.0.{}.{}:3260,1", k / 250, k % 250),
                )
            })
            .collect();
        let (mut i, mut t, _) = pair_with("None", true, 8, targets.clone(), None);
        login(&mut i, &mut t);
        let before = t.stats().pdus_out;
        let mut out = Vec::new();
        let itt = i.text(&[("SendTargets", "All")], &mut out);
        exchange(&mut i, &mut t, out);
        let Some(InitiatorEvent::Text { itt: got, pairs }) = i.poll_event() else {
            panic!("no text answer")
        };
        assert_eq!(got, itt);
        let want: Vec<(String, String)> = targets
            .iter()
            .flat_map(|(n, a)| {
                [
                    ("TargetName".to_string(), n.clone()),
                    ("TargetAddress".to_string(), a.clone()),
                ]
            })
            .collect();
        assert_eq!(pairs, want);
        // about 40 bytes a pair, 800 pairs, at most 16 KiB a response
        let responses = t.stats().pdus_out - before;
        assert!((2..=4).contains(&responses), "{responses} Text Responses");
        assert_eq!(t.stats().rejects, 0);
        // A continuation with a stale TTT is rejected.
        let mut out = Vec::new();
        let r = Repr::TextRequest(Text {
            immediate: true,
            final_: true,
            cont: false,
            lun: 0,
            itt,
            ttt: 77,
            sn: i.cmd_sn,
            exp_sn: i.exp_stat_sn,
            max_cmd_sn: 0,
        });
        i.io.lend_output(&mut out);
        i.io.send(&r, TxData::Inline(&[]));
        i.io.lend_output(&mut out);
        let mut back = Vec::new();
        t.on_bytes(&out, &mut back);
        assert_eq!(t.stats().rejects, 1);
    }

    /// The target pings an idle initiator with a NOP-In; the answer (a NOP-Out with the
    /// ping's tag) keeps the connection, silence past the timeout ends it.
    #[test]
    fn the_target_pings_an_idle_initiator_and_drops_a_silent_one() {
        use crate::target::{Ended, KeepAlive};
        let (mut i, t) = pair("None", true, 8);
        let k = KeepAlive {
            interval_us: 1_000_000,
            timeout_us: 500_000,
        };
        let mut t = t.with_keepalive(k);
        login(&mut i, &mut t);
        let mut out = Vec::new();
        t.poll(0, &mut out);
        t.poll(999_999, &mut out);
        assert!(out.is_empty(), "no ping before the interval");
        assert_eq!(t.next_deadline(), Some(1_000_000));
        t.poll(1_000_000, &mut out);
        assert!(!out.is_empty(), "a ping after the interval");
        assert_eq!(t.next_deadline(), Some(1_500_000));
        // the initiator answers; the connection stays
        let mut back = Vec::new();
        i.on_bytes(&out, &mut back);
        assert!(!back.is_empty(), "the initiator answers the ping");
        let mut none = Vec::new();
        t.on_bytes(&back, &mut none);
        assert!(none.is_empty(), "a ping's answer is not answered");
        t.poll(1_600_000, &mut none);
        assert!(t.ended().is_none());
        assert!(none.is_empty());
        // silence: a ping, then the end of the connection
        t.poll(2_600_000, &mut none);
        assert!(!none.is_empty());
        t.poll(3_099_999, &mut none);
        assert!(t.ended().is_none());
        t.poll(3_100_000, &mut none);
        assert_eq!(t.ended(), Some(&Ended::PeerSilent));
    }

    /// The target asks for a logout (Async Message, AsyncEvent 1); the initiator sends it
    /// once its commands in flight are done, and the session ends.
    #[test]
    fn the_initiator_logs_out_when_the_target_asks() {
        let (mut i, mut t) = pair("None", true, 8);
        login(&mut i, &mut t);
        // a read in flight when the request comes
        let mut out = Vec::new();
        let tag = i.command(0, &rw10(0x28, 0, 8), 4096, Vec::new(), &mut out);
        let mut ask = Vec::new();
        assert!(t.request_logout(5, &mut ask));
        let mut back = Vec::new();
        i.on_bytes(&ask, &mut back);
        assert!(i.logout_asked());
        assert!(back.is_empty(), "no Logout while a command is in flight");
        exchange(&mut i, &mut t, out);
        let events: Vec<InitiatorEvent> = std::iter::from_fn(|| i.poll_event()).collect();
        assert!(
            matches!(&events[..], [InitiatorEvent::Done(c), InitiatorEvent::LoggedOut] if c.itt == tag && c.status == 0),
            "{events:?}"
        );
        assert_eq!(t.ended(), Some(&crate::target::Ended::LoggedOut));
        assert!(
            !t.request_logout(5, &mut Vec::new()),
            "nothing to ask after the logout"
        );
    }

    /// A session's reservation ends with its connection (I_T nexus loss at ERL 0), with
    /// its logout, and with a LOGICAL UNIT RESET.
    #[test]
    fn a_reservation_ends_with_its_session() {
        let targets = vec![("iqn.t".into(), "127.0.0.1:3260,1".into())];
        let (mut i, mut t, disk) = pair_with("None", true, 8, targets, Some("iqn.t"));
        login(&mut i, &mut t);
        let reserve = [0x16, 0, 0, 0, 0, 0];
        let mut out = Vec::new();
        i.command(0, &reserve, 0, Vec::new(), &mut out);
        exchange(&mut i, &mut t, out);
        assert!(matches!(i.poll_event(), Some(InitiatorEvent::Done(c)) if c.status == 0));
        let other = crate::scsi::Nexus::iscsi("iqn.other", [0x80, 0, 0, 0, 0, 2]);
        let tur = [0u8; 6];
        let held = disk.lock().unwrap().execute_as(&other, &tur, &[]).status;
        assert_eq!(held, crate::scsi::RESERVATION_CONFLICT);
        drop(t);
        let freed = disk.lock().unwrap().execute_as(&other, &tur, &[]).status;
        assert_eq!(freed, crate::scsi::GOOD);
    }

    #[test]
    fn writes_and_reads_at_queue_depth_32_through_a_window_of_8() {
        for (digests, initial_r2t) in [("None", true), ("CRC32C", false)] {
            let (mut i, mut t) = pair(digests, initial_r2t, 8);
            let n = login(&mut i, &mut t);
            assert_eq!(n.header_digest, digests == "CRC32C");
            assert_eq!(n.initial_r2t, initial_r2t);
            // 32 writes of 64 KiB (immediate, unsolicited and R2T data), queued at once
            let mut out = Vec::new();
            let block =
                |k: u32| -> Vec<u8> { (0..65_536u32).map(|x| (x ^ (k * 7)) as u8).collect() };
            for k in 0..32u32 {
                i.command(0, &rw10(0x2a, k * 128, 128), 0, block(k), &mut out);
            }
            assert_eq!(i.in_flight(), 32);
            exchange(&mut i, &mut t, out);
            let mut done = 0;
            while let Some(e) = i.poll_event() {
                let InitiatorEvent::Done(c) = e else {
                    panic!("{e:?}")
                };
                assert_eq!(
                    (c.status, c.overflow, c.underflow),
                    (0, false, false),
                    "{c:?}"
                );
                done += 1;
            }
            assert_eq!(done, 32, "every write completed through the window");
            let mut out = Vec::new();
            let tags: Vec<u32> = (0..32u32)
                .map(|k| i.command(0, &rw10(0x28, k * 128, 128), 65_536, Vec::new(), &mut out))
                .collect();
            exchange(&mut i, &mut t, out);
            let mut got = HashMap::new();
            while let Some(InitiatorEvent::Done(c)) = i.poll_event() {
                got.insert(c.itt, c.data);
            }
            for (k, tag) in tags.iter().enumerate() {
                assert!(got[tag] == block(k as u32), "block {k} reads back");
            }
            assert_eq!(t.stats().rejects, 0);
        }
    }

    /// A transport that places task data itself, as the NIC's iSCSI engine will: software
    /// framing, but the data of a Data-In or Data-Out whose task has a buffer open is copied
    /// into that buffer here, at its Buffer Offset, and reaches the machine only as
    /// [`RxData::Placed`].
    #[derive(Default)]
    struct Placing {
        sw: Software,
        /// Data bytes this transport placed.
        placed: u64,
        /// Task data bytes the machine got inline.
        inline: u64,
    }

    impl Transport for Placing {
        fn full_feature(&mut self, hd: bool, dd: bool, max_recv: u32) {
            self.sw.full_feature(hd, dd, max_recv)
        }
        fn send(&mut self, repr: &Repr, data: TxData<'_>) {
            self.sw.send(repr, data)
        }
        fn open(&mut self, itt: u32, buf: Vec<u8>) {
            self.sw.open(itt, buf)
        }
        fn buffer(&self, itt: u32) -> Option<&[u8]> {
            self.sw.buffer(itt)
        }
        fn place(&mut self, itt: u32, offset: usize, data: &[u8]) -> bool {
            self.sw.place(itt, offset, data)
        }
        fn close(&mut self, itt: u32) -> Option<Vec<u8>> {
            self.sw.close(itt)
        }
        fn close_all(&mut self) {
            self.sw.close_all()
        }
        fn digest_bytes(&self) -> u64 {
            self.sw.digest_bytes()
        }
    }

    /// Deliver whole PDUs in `bytes` to machine `m` through its [`Placing`] transport
    /// `io(m)`, with `on_pdu`; what it sends is appended to `out`.
    fn deliver<M>(
        m: &mut M,
        io: impl Fn(&mut M) -> &mut Placing,
        bytes: &[u8],
        out: &mut Vec<u8>,
        mut on_pdu: impl FnMut(&mut M, RxPdu<'_>),
    ) {
        io(m).sw.lend_output(out);
        let mut at = 0;
        while let Some((mut pdu, len)) = io(m).sw.frame(&bytes[at..]).unwrap() {
            at += len;
            let op = pdu.bhs[0] & 0x3f;
            let itt = u32::from_be_bytes(pdu.bhs[16..20].try_into().unwrap());
            let offset = u32::from_be_bytes(pdu.bhs[40..44].try_into().unwrap());
            let p = io(m);
            if let RxData::Inline(data) = pdu.data {
                let task_data = matches!(op, 0x05 | 0x25) && !data.is_empty();
                if task_data && !matches!(pdu.data_digest, DigestCheck::Bad { .. }) {
                    if p.place(itt, offset as usize, data) {
                        p.placed += data.len() as u64;
                        pdu.data = RxData::Placed {
                            offset,
                            len: data.len() as u32,
                        };
                    } else {
                        p.inline += data.len() as u64;
                    }
                } else if op == 0x01 {
                    p.inline += data.len() as u64; // immediate data: no buffer yet
                }
            }
            on_pdu(m, pdu);
        }
        assert_eq!(at, bytes.len(), "whole PDUs only");
        io(m).sw.lend_output(out);
    }

    /// The session machines over a transport that places task data (the seam of the NIC's
    /// iSCSI engine): writes with immediate data, unsolicited Data-Out and R2Ts, and reads,
    /// at queue depth 16, with and without digests. Data-Out lands in the target's buffer
    /// and Data-In in the initiator's without the machines copying it; the blocks read back
    /// as written; every task buffer is closed when its task ends.
    #[test]
    fn task_data_placed_by_the_transport_is_used_in_place() {
        for (digests, initial_r2t) in [("None", true), ("CRC32C", false)] {
            let targets = vec![("iqn.t".into(), "127.0.0.1:3260,1".into())];
            let (mut i, mut t, _) = pair_over(
                Placing::default(),
                Placing::default(),
                digests,
                initial_r2t,
                8,
                targets,
                Some("iqn.t"),
            );
            let settle = |i: &mut InitiatorConn<Placing>, t: &mut TargetConn<Placing>| {
                // What the initiator sent since the last exchange.
                let mut to_target = Vec::new();
                i.io.sw.lend_output(&mut to_target);
                for _ in 0..10_000 {
                    if to_target.is_empty() {
                        return;
                    }
                    let mut to_init = Vec::new();
                    deliver(
                        t,
                        |t| t.transport_mut(),
                        &to_target,
                        &mut to_init,
                        |t, p| t.on_pdu(p),
                    );
                    to_target.clear();
                    deliver(
                        i,
                        |i| &mut i.io,
                        &to_init,
                        &mut to_target,
                        |i, p| i.on_pdu(p),
                    );
                }
                panic!("the exchange did not settle");
            };
            i.begin();
            settle(&mut i, &mut t);
            assert!(matches!(i.poll_event(), Some(InitiatorEvent::LoggedIn(_))));
            // 16 writes of 24 KiB + 512 (not a multiple of any segment size), then reads.
            let len = 24_576 + 512;
            let block =
                |k: u32| -> Vec<u8> { (0..len as u32).map(|x| ((x * 31) ^ k) as u8).collect() };
            for k in 0..16u32 {
                i.submit(0, &rw10(0x2a, k * 64, (len / 512) as u16), 0, block(k));
            }
            settle(&mut i, &mut t);
            let mut done = 0;
            while let Some(InitiatorEvent::Done(c)) = i.poll_event() {
                assert_eq!(c.status, 0, "{c:?}");
                done += 1;
            }
            assert_eq!(done, 16);
            let tags: Vec<u32> = (0..16u32)
                .map(|k| {
                    i.submit(
                        0,
                        &rw10(0x28, k * 64, (len / 512) as u16),
                        len as u32,
                        Vec::new(),
                    )
                })
                .collect();
            settle(&mut i, &mut t);
            let mut got = HashMap::new();
            while let Some(InitiatorEvent::Done(c)) = i.poll_event() {
                got.insert(c.itt, c.data);
            }
            for (k, tag) in tags.iter().enumerate() {
                assert!(got[tag] == block(k as u32), "block {k} reads back");
            }
            // What the initiator sent as immediate data reached the target inline; every
            // other byte of write data was placed at the target, every read byte at the
            // initiator.
            let total = 16 * len as u64;
            // ImmediateData=Yes: the first 8 KiB (the target's MaxRecvDataSegmentLength) of
            // each write come with its command.
            let immediate = 16 * 8192;
            assert_eq!(t.transport().inline, immediate, "{digests}");
            assert_eq!(t.transport().placed, total - immediate, "{digests}");
            assert_eq!((i.io.placed, i.io.inline), (total, 0), "{digests}");
            assert_eq!(
                t.transport().sw.buffered_bytes(),
                0,
                "target buffers all closed"
            );
            assert_eq!(i.io.sw.buffered_bytes(), 0, "initiator buffers all closed");
            assert_eq!(t.stats().rejects, 0);
        }
    }

    /// A NIC's upper-layer slot with the iSCSI engine, for one connection: what the
    /// emulated NIC does with the host's ULP commands, without TCP.
    struct Nic {
        mem: Arc<toe_bus::HostMemory>,
        dma: toe_bus::Dma,
        ulp: toe_nic::UlpConn,
        /// Stream bytes delivered to the host.
        delivered: u64,
        /// Reads whose Data-In the engine cut itself (large PDU send).
        data_in_requests: u64,
        /// Data-Out sequences the engine cut itself.
        data_out_requests: u64,
    }

    use crate::offload::{NicOp, Offloaded};
    use crate::transport::Stream;
    use toe_bus::Event;
    use toe_nic::UlpFactory;

    const CONN: toe_bus::ConnId = toe_bus::ConnId(1);

    impl Nic {
        fn new() -> Nic {
            let mem = Arc::new(toe_bus::HostMemory::anonymous(64 << 20).unwrap());
            Nic {
                dma: toe_bus::Dma::new(mem.clone()),
                mem,
                ulp: toe_nic::UlpConn::default(),
                delivered: 0,
                data_in_requests: 0,
                data_out_requests: 0,
            }
        }

        /// A counter of the engine.
        fn counter(&self, name: &str) -> u64 {
            let c = self.ulp.engine_counters();
            c.iter().find(|(n, _)| *n == name).map_or(0, |(_, v)| *v)
        }

        /// The slot's reports, to the host side.
        fn notify(&self, io: &mut Offloaded, events: VecDeque<Event>) {
            for e in events {
                match e {
                    Event::UlpStarted { stream_offset, .. } => io.started(stream_offset),
                    Event::UlpRefused {
                        position,
                        stale,
                        error,
                        ..
                    } => io.refused(position, stale, &error),
                    Event::UlpReleased { tag, buf, .. } => {
                        if let Some(b) = io.released(tag, buf) {
                            self.mem.free(b);
                        }
                    }
                    Event::UlpError { error, .. } => io.engine_error(&error),
                    other => panic!("{other:?}"),
                }
            }
        }

        /// What the host sends: the plain stream of the login, then the engine's PDUs for
        /// its requests.
        fn wire_out(&mut self, io: &mut Offloaded) -> Vec<u8> {
            let now = toe_bus::time::Instant::ZERO;
            let mut wire = Vec::new();
            io.lend_output(&mut wire);
            let mut events = VecDeque::new();
            for op in io.take_ops() {
                match op {
                    NicOp::Offload { params, carry } => {
                        let f = crate::engine::IscsiEngineFactory;
                        let (d, dma) = (self.delivered, &self.dma);
                        let f: &dyn UlpFactory = &f;
                        self.ulp.offload(
                            CONN,
                            Some(f),
                            &params,
                            d,
                            &carry,
                            d,
                            now,
                            dma,
                            &mut events,
                        );
                    }
                    NicOp::Register { tag, buf } => self.ulp.register(CONN, tag, buf, &mut events),
                    NicOp::Release { tag } => self.ulp.release(CONN, tag, &mut events),
                    NicOp::Send(r) => {
                        match crate::engine::EngineCmd::decode(&r).unwrap() {
                            crate::engine::EngineCmd::SendDataIn(_) => self.data_in_requests += 1,
                            crate::engine::EngineCmd::SendDataOut(_) => self.data_out_requests += 1,
                            _ => {}
                        }
                        self.ulp.send(r);
                    }
                }
            }
            loop {
                self.ulp.pump(CONN, now, &self.dma, &mut events);
                let n = self.ulp.wire_pending().len();
                if n == 0 {
                    break;
                }
                wire.extend_from_slice(self.ulp.wire_pending());
                self.ulp.wire_sent(n);
            }
            self.notify(io, events);
            wire
        }
    }

    /// Deliver `bytes` from the wire to machine `m` through its NIC: plain during login,
    /// records from the engine after (the buffers the engine hands back reach the host
    /// before the records). An error ends the connection.
    fn wire_in<M>(
        nic: &mut Nic,
        m: &mut M,
        io: impl Fn(&mut M) -> &mut Offloaded,
        bytes: &[u8],
        mut on_pdu: impl FnMut(&mut M, RxPdu<'_>),
    ) -> Result<(), String> {
        let mut deliver = |m: &mut M, b: &[u8]| {
            Offloaded::receive(m, &io, b, |m, p| {
                on_pdu(m, p);
                true
            })
            .map_err(|e| format!("{e:?}"))
        };
        if !nic.ulp.running() {
            nic.delivered += bytes.len() as u64;
            return deliver(m, bytes);
        }
        let now = toe_bus::time::Instant::ZERO;
        let mut rest = bytes;
        loop {
            let mut events = VecDeque::new();
            let k = nic.ulp.room().min(rest.len());
            nic.ulp.feed(CONN, now, &rest[..k], &nic.dma, &mut events);
            rest = &rest[k..];
            nic.notify(io(m), events);
            let n = nic.ulp.available();
            let mut up = Vec::new();
            if n > 0 {
                let mut b = nic.mem.alloc(n).unwrap();
                nic.ulp.deliver(&nic.dma, &mut b, 0, n);
                up = nic.mem.slice(&b).to_vec();
                nic.mem.free(b);
            }
            nic.delivered += up.len() as u64;
            deliver(m, &up)?;
            // Records held for a buffer: the release goes to the NIC, the buffer comes
            // back, the records go on.
            while io(m).needs_delivery() || !io(m).wants_input() {
                let _ = nic.wire_out(io(m));
                if !io(m).needs_delivery() && !io(m).wants_input() {
                    return Err("the records wait for a buffer that does not come back".into());
                }
                deliver(m, &[])?;
            }
            if rest.is_empty() && nic.ulp.available() == 0 {
                return Ok(());
            }
        }
    }

    type Engined = (InitiatorConn<Offloaded>, Nic, TargetConn<Offloaded>, Nic);

    /// Both sides offloaded to engines after a software login; `tamper` sees each round's
    /// bytes on the wire towards the target.
    fn engined(digests: &str, initial_r2t: bool) -> Engined {
        let targets = vec![("iqn.t".into(), "127.0.0.1:3260,1".into())];
        let (ni, nt) = (Nic::new(), Nic::new());
        let (i, t, _) = pair_over(
            Offloaded::engine(ni.mem.clone()),
            Offloaded::engine(nt.mem.clone()),
            digests,
            initial_r2t,
            8,
            targets,
            Some("iqn.t"),
        );
        (i, ni, t, nt)
    }

    /// Move PDUs both ways until neither side has anything to send; `tamper` may change
    /// the bytes towards the target. The first error of a side ends the exchange with it.
    fn settle_engined(e: &mut Engined, mut tamper: impl FnMut(&mut Vec<u8>)) -> Result<(), String> {
        let (i, ni, t, nt) = e;
        for _ in 0..10_000 {
            let mut to_target = ni.wire_out(i.transport_mut());
            if to_target.is_empty() {
                return Ok(());
            }
            tamper(&mut to_target);
            wire_in(nt, t, |t| t.transport_mut(), &to_target, |t, p| t.on_pdu(p))?;
            let to_init = nt.wire_out(t.transport_mut());
            wire_in(ni, i, |i| i.transport_mut(), &to_init, |i, p| i.on_pdu(p))?;
        }
        panic!("the exchange did not settle");
    }

    /// Initiator and target each with an iSCSI engine after the software login, header
    /// and data digests on: writes (immediate data, then R2Ts) and reads at queue depth 16
    /// read back as written; the engines check and compute every digest (the hosts none)
    /// and place every Data-In and R2T-solicited Data-Out byte into the task's buffer; every
    /// registered tag is released when its task ends.
    #[test]
    fn the_engines_place_data_and_do_the_digests() {
        for (digests, initial_r2t) in [("CRC32C", true), ("CRC32C", false), ("None", true)] {
            let mut e = engined(digests, initial_r2t);
            e.0.begin();
            settle_engined(&mut e, |_| {}).unwrap();
            assert!(matches!(
                e.0.poll_event(),
                Some(InitiatorEvent::LoggedIn(_))
            ));
            assert!(e.0.transport().offloaded() && e.2.transport().offloaded());
            let len = 40_960 + 512;
            let block =
                |k: u32| -> Vec<u8> { (0..len as u32).map(|x| ((x * 13) ^ k) as u8).collect() };
            for k in 0..16u32 {
                e.0.submit(0, &rw10(0x2a, k * 128, (len / 512) as u16), 0, block(k));
            }
            settle_engined(&mut e, |_| {}).unwrap();
            let mut done = 0;
            while let Some(InitiatorEvent::Done(c)) = e.0.poll_event() {
                assert_eq!(c.status, 0, "{c:?}");
                done += 1;
            }
            assert_eq!(done, 16);
            let tags: Vec<u32> = (0..16u32)
                .map(|k| {
                    let cdb = rw10(0x28, k * 128, (len / 512) as u16);
                    e.0.submit(0, &cdb, len as u32, Vec::new())
                })
                .collect();
            settle_engined(&mut e, |_| {}).unwrap();
            let mut got = HashMap::new();
            while let Some(InitiatorEvent::Done(c)) = e.0.poll_event() {
                got.insert(c.itt, c.data);
            }
            for (k, tag) in tags.iter().enumerate() {
                assert!(
                    got[tag] == block(k as u32),
                    "{digests}: block {k} reads back"
                );
            }
            let (ni, nt) = (&e.1, &e.3);
            let total = 16 * len as u64;
            assert_eq!(ni.counter("bytes_placed"), total, "every read byte placed");
            // What the target placed: all but the immediate data and, without InitialR2T,
            // the unsolicited Data-Out that came before the buffer was registered.
            let immediate = 16 * 8192;
            let placed = nt.counter("bytes_placed");
            if initial_r2t {
                assert_eq!(placed, total - immediate, "{digests}");
            } else {
                assert!(placed < total - immediate, "{placed}");
            }
            assert_eq!(placed + nt.counter("bytes_inline"), total);
            assert_eq!(
                ni.counter("placements_refused") + nt.counter("placements_refused"),
                0
            );
            // Each read's data went to the engine as one request, which it cut into Data-In
            // PDUs of the initiator's 16 KiB limit (3 for each read).
            assert_eq!(e.3.data_in_requests, 16);
            assert!(nt.counter("pdus_sent") >= 16 * 3 + 16);
            // Each write's Data-Out sequences went as requests too (one per R2T, and one
            // for the unsolicited burst without InitialR2T), each cut into PDUs of the
            // target's 8 KiB limit.
            let sequences = if initial_r2t { 16 } else { 32 };
            assert_eq!(e.1.data_out_requests, sequences, "{digests}");
            assert!(ni.counter("pdus_sent") >= 16 * 5);
            if digests == "CRC32C" {
                assert!(ni.counter("digests_checked") > 0 && nt.counter("digests_computed") > 0);
            }
            assert_eq!(
                ni.counter("digests_failed") + nt.counter("digests_failed"),
                0
            );
            assert_eq!(
                e.0.digest_bytes(),
                0,
                "the initiator's host digested nothing"
            );
            assert_eq!(
                e.2.stats().digest_bytes,
                0,
                "the target's host digested nothing"
            );
            for nic in [ni, nt] {
                let s = nic.ulp.stats();
                assert!(s.tags_registered > 0);
                assert_eq!(s.tags_registered, s.tags_returned, "{s:?}");
                assert_eq!(nic.ulp.registered(), 0);
                assert_eq!(nic.mem.used_bytes(), 0, "every task buffer freed");
            }
        }
    }

    /// A bit flipped in a Data-Out's data above TCP: the target's engine catches the data
    /// digest, and the write ends in CHECK CONDITION (ABORTED COMMAND, 47h/05h), never
    /// accepted. A bit flipped in a header: the engine ends the stream, and the target host
    /// its connection.
    #[test]
    fn the_engine_catches_digest_errors() {
        let mut e = engined("CRC32C", true);
        e.0.begin();
        settle_engined(&mut e, |_| {}).unwrap();
        assert!(matches!(
            e.0.poll_event(),
            Some(InitiatorEvent::LoggedIn(_))
        ));
        let tag = e.0.submit(0, &rw10(0x2a, 0, 64), 0, vec![7u8; 32_768]);
        let mut flipped = false;
        settle_engined(&mut e, |b| {
            // The first Data-Out (opcode 0x05) with data: flip a bit of its data.
            if !flipped && b.len() > 48 + 4 + 100 && b[0] & 0x3f == 0x05 {
                b[48 + 4 + 100] ^= 0x10;
                flipped = true;
            }
        })
        .unwrap();
        assert!(flipped);
        let Some(InitiatorEvent::Done(c)) = e.0.poll_event() else {
            panic!("the write did not end")
        };
        assert_eq!((c.itt, c.status), (tag, 2), "{c:?}");
        assert_eq!(
            (c.sense[2] & 0x0f, c.sense[12], c.sense[13]),
            (0x0b, 0x47, 0x05)
        );
        assert_eq!(e.3.counter("digests_failed"), 1);
        // A header digest error ends the stream.
        e.0.submit(0, &[0; 6], 0, Vec::new());
        let r = settle_engined(&mut e, |b| b[10] ^= 1);
        assert!(
            r.as_ref().is_err_and(|why| why.contains("HeaderDigest")),
            "{r:?}"
        );
        assert!(e.3.ulp.stats().requests > 0);
    }

    #[test]
    fn check_condition_carries_its_sense_and_discovery_lists_targets() {
        let (mut i, mut t) = pair("None", true, 8);
        login(&mut i, &mut t);
        let mut out = Vec::new();
        let tag = i.command(0, &rw10(0x28, u32::MAX - 1, 8), 4096, Vec::new(), &mut out);
        exchange(&mut i, &mut t, out);
        let Some(InitiatorEvent::Done(c)) = i.poll_event() else {
            panic!()
        };
        assert_eq!((c.itt, c.status), (tag, 2));
        assert_eq!(
            (c.sense[2], c.sense[12]),
            (5, 0x21),
            "ILLEGAL REQUEST, LBA out of range"
        );
        let mut out = Vec::new();
        let tag = i.text(&[("SendTargets", "")], &mut out);
        exchange(&mut i, &mut t, out);
        assert_eq!(
            i.poll_event(),
            Some(InitiatorEvent::Text {
                itt: tag,
                pairs: vec![
                    ("TargetName".into(), "iqn.t".into()),
                    ("TargetAddress".into(), "127.0.0.1:3260,1".into())
                ]
            })
        );
        let mut out = Vec::new();
        i.logout(&mut out);
        exchange(&mut i, &mut t, out);
        assert_eq!(i.poll_event(), Some(InitiatorEvent::LoggedOut));
        assert!(i.ended() && t.ended().is_some());
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_target_bytes_never_panic(
            chunks in proptest::collection::vec(
                proptest::collection::vec(proptest::num::u8::ANY, 0..200), 0..8),
        ) {
            let (mut i, _) = pair("None", true, 8);
            let mut out = Vec::new();
            i.start(&mut out);
            for ch in chunks {
                i.on_bytes(&ch, &mut out);
            }
        }
    }
}
