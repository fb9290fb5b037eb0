//! The host side of an iSCSI connection on a TOE: [`Offloaded`], the transport under the
//! connection machines when the NIC's iSCSI engine ([`crate::engine`]) may run the data path
//! (`DESIGN.md`, "The ULP engine slot").
//!
//! - **Login** is software ([`Software`]): a plain byte stream, no digests.
//! - **At full-feature phase** the transport asks the NIC to offload the connection to the
//!   engine ([`NicOp::Offload`]) at the first byte the software has not framed (the bytes
//!   it holds of a partial PDU go along as `carry`). Until the NIC answers, nothing else goes
//!   to it and nothing is read. A *stale* refusal (the NIC had delivered more) means: take
//!   what was delivered up to the NIC's position as more carry, then offload again there.
//! - **Then** the stream is the engine's records: PDU headers, with their data inline or
//!   already placed into the task's buffer, digests checked. Sends become engine requests
//!   ([`crate::engine::EngineCmd::encode`]): Data-In and Data-Out bursts are one request
//!   each (large PDU send), read by the NIC from the task's buffer.
//! - **Task buffers** live in application memory (a `Vec`) until the first PDU naming
//!   their task goes out (a command, an R2T, a burst); then they move into host memory (a
//!   [`HostBuf`]) and on to the NIC ([`NicOp::Register`]). The NIC hands a buffer back
//!   exactly once ([`Offloaded::released`]): when the engine has all of its data (it
//!   finished the task), on a release, or at teardown. Data that must be read or placed
//!   by the host while the NIC holds the buffer (a response for a short read, a Data-Out
//!   that arrived before the registration) holds the record stream: the transport releases
//!   the buffer and goes on once it is back, so the machines never see a buffer missing.
//! - **Copies** are the ones a TOE cannot avoid: application memory into host memory for
//!   data sent, host memory into application memory for data received, counted in the
//!   region's [`toe_bus::CopyStats`]; inline data placed by the host is counted by
//!   [`Transport::copy_bytes`].
//!
//! [`Offloaded::software`] never offloads: the same machines and shell, software data path.
//!
//! Pure: no sockets, threads or clock; the shell carries [`NicOp`]s to the driver and the
//! driver's notes back.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use toe_bus::{HostBuf, HostMemory};

use crate::engine::{parse_record, EngineCmd, EngineParams, Record, SendData};
use crate::transport::{
    DataInBurst, DataOutBurst, FrameError, RxData, RxPdu, Software, Stream, Transport, TxData,
};
use crate::wire::{Repr, BHS_LEN};

/// What the host side asks of the NIC, in order: the shell turns each into a driver call.
#[derive(Debug)]
pub enum NicOp {
    /// Offload the connection to the engine named [`crate::engine::ENGINE_NAME`] with
    /// these parameters ([`EngineParams::encode`]) at the first byte the driver has not
    /// received yet; `carry` are the bytes before it the host has not framed.
    Offload {
        /// The engine's parameters.
        params: Vec<u8>,
        /// Received bytes the engine takes first.
        carry: Vec<u8>,
    },
    /// Register `buf` (in host memory) for task `tag`: the NIC owns it until it comes
    /// back ([`Offloaded::released`]).
    Register {
        /// The task's ITT.
        tag: u32,
        /// The buffer.
        buf: HostBuf,
    },
    /// Release task `tag`'s buffer after the sends before it.
    Release {
        /// The task's ITT.
        tag: u32,
    },
    /// A send request for the engine ([`EngineCmd::encode`]).
    Send(Vec<u8>),
}

/// Where the engine stands on the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// Login (or never offloading): the software transport does everything.
    Software,
    /// The login ended: the offload goes with the next [`Offloaded::take_ops`].
    Offer(EngineParams),
    /// The offload was asked for; waiting for the NIC.
    Asked(EngineParams),
    /// Refused as stale: delivery up to `until` (a stream offset) is plain carry, then the
    /// offload is asked again.
    Carrying { params: EngineParams, until: u64 },
    /// The engine runs the connection.
    Running,
    /// The offload failed for good.
    Failed(String),
}

/// Where a task's buffer is.
#[derive(Debug)]
enum Store {
    /// In application memory, never registered (or host memory was short).
    Plain(Vec<u8>),
    /// In host memory, with the host.
    Host(HostBuf),
    /// At the NIC.
    Away,
}

#[derive(Debug)]
struct TaskBuf {
    store: Store,
    len: usize,
    /// A PDU was sent from it: it holds data to send, not data to receive.
    sent_from: bool,
    /// Register it with the next PDU naming its task (set when opened, and when it came
    /// back because the host needed it before its data was all in).
    register: bool,
    /// The host asked for it back to read or place into it; records wait for it.
    recalled: bool,
    /// The end of what the host placed into it (a buffer to receive into is opened
    /// zeroed).
    dirty: usize,
    /// Its first bytes, received before it went to the NIC, kept in application memory
    /// (the buffer in host memory has zeros there): the application buffer and how many
    /// of its bytes count. Closing the task puts the rest behind them.
    prefix: Option<(Vec<u8>, usize)>,
}

/// Counters of an [`Offloaded`] transport.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct OffloadStats {
    /// Offload requests sent (a stale refusal makes two).
    pub offloads: u64,
    /// Buffers registered with the NIC.
    pub registered: u64,
    /// Buffers the NIC handed back.
    pub returned: u64,
    /// Times the record stream waited for a buffer the host needed back.
    pub recalls: u64,
    /// Buffers kept in application memory because host memory was short.
    pub host_memory_short: u64,
    /// Send requests given to the engine.
    pub requests: u64,
}

/// The transport of an iSCSI connection on a TOE host: software through the login, then
/// the NIC's engine (see the module documentation). The NIC's side of the exchange goes
/// out as [`NicOp`]s ([`Offloaded::take_ops`]) and comes back through
/// [`Offloaded::started`], [`Offloaded::refused`], [`Offloaded::released`] and
/// [`Offloaded::engine_error`].
pub struct Offloaded {
    sw: Software,
    mem: Arc<HostMemory>,
    engine: bool,
    phase: Phase,
    ops: VecDeque<NicOp>,
    tasks: HashMap<u32, TaskBuf>,
    /// Releases whose buffers have not come back yet, per tag (they come back first).
    retiring: HashMap<u32, u32>,
    /// Record bytes not delivered yet.
    records: Vec<u8>,
    /// Plain bytes received after a stale refusal, for the next offload.
    carry: Vec<u8>,
    /// Stream bytes received so far (plain and records), the stream offset of the next.
    received: u64,
    /// The records wait for this task's buffer to come back.
    waiting: Option<u32>,
    copy_bytes: u64,
    stats: OffloadStats,
}

impl std::fmt::Debug for Offloaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Offloaded")
            .field("engine", &self.engine)
            .field("phase", &self.phase)
            .field("tasks", &self.tasks.len())
            .field("waiting", &self.waiting)
            .field("stats", &self.stats)
            .finish()
    }
}

impl Drop for Offloaded {
    fn drop(&mut self) {
        for (_, t) in self.tasks.drain() {
            if let Store::Host(b) = t.store {
                self.mem.free(b);
            }
        }
        for op in self.ops.drain(..) {
            if let NicOp::Register { buf, .. } = op {
                self.mem.free(buf);
            }
        }
    }
}

/// Whether `bhs` is a SCSI Command that writes (opcode 01h, W bit).
fn is_write_command(bhs: &[u8; BHS_LEN]) -> bool {
    bhs[0] & 0x3f == 0x01 && bhs[1] & 0x20 != 0
}

/// Whether a record for a task whose buffer is at the NIC makes the machine read or take
/// the buffer: the end of a read (a SCSI Response, a Data-In with status) on a buffer that
/// receives, or of a sequence of write data (a Data-Out with F).
fn ends_receiving(bhs: &[u8; BHS_LEN]) -> bool {
    match bhs[0] & 0x3f {
        0x21 => true,
        0x25 => bhs[1] & 0x01 != 0,
        0x05 => bhs[1] & 0x80 != 0,
        _ => false,
    }
}

impl Offloaded {
    /// The transport of a connection whose data path the NIC's engine takes at
    /// full-feature phase; task buffers go into `mem` (the driver's host memory) when they
    /// are registered.
    pub fn engine(mem: Arc<HostMemory>) -> Self {
        Offloaded::new(mem, true)
    }

    /// The same machines and shell with the software data path throughout (the
    /// comparison run): it never asks for an offload.
    pub fn software(mem: Arc<HostMemory>) -> Self {
        Offloaded::new(mem, false)
    }

    fn new(mem: Arc<HostMemory>, engine: bool) -> Self {
        Offloaded {
            sw: Software::default(),
            mem,
            engine,
            phase: Phase::Software,
            ops: VecDeque::new(),
            tasks: HashMap::new(),
            retiring: HashMap::new(),
            records: Vec::new(),
            carry: Vec::new(),
            received: 0,
            waiting: None,
            copy_bytes: 0,
            stats: OffloadStats::default(),
        }
    }

    /// Whether the engine runs the data path now.
    pub fn offloaded(&self) -> bool {
        self.phase == Phase::Running
    }

    /// Why the offload failed, if it did (the connection cannot go on).
    pub fn failure(&self) -> Option<&str> {
        match &self.phase {
            Phase::Failed(e) => Some(e),
            _ => None,
        }
    }

    /// The counters.
    pub fn stats(&self) -> OffloadStats {
        self.stats
    }

    /// Whether the shell should read received bytes now: not while the NIC's answer to an
    /// offload is awaited, nor while the records wait for a buffer to come back (what is
    /// received then stays with the driver and TCP's window closes).
    pub fn wants_input(&self) -> bool {
        match self.phase {
            Phase::Software | Phase::Carrying { .. } => true,
            Phase::Running => self.waiting.is_none(),
            Phase::Offer(_) | Phase::Asked(_) | Phase::Failed(_) => false,
        }
    }

    /// Whether [`Stream::receive`] has something to do without new bytes: records that
    /// waited for a buffer can go on, or a failure must reach the machine.
    pub fn needs_delivery(&self) -> bool {
        match self.phase {
            Phase::Running => self.waiting.is_none() && !self.records.is_empty(),
            Phase::Failed(_) => true,
            _ => false,
        }
    }

    /// What to ask of the NIC now, in order. Nothing but the offload goes before the NIC
    /// has started the engine.
    pub fn take_ops(&mut self) -> Vec<NicOp> {
        if let Phase::Offer(params) = self.phase {
            let mut carry = std::mem::take(&mut self.carry);
            carry.extend_from_slice(&self.sw.take_input());
            self.stats.offloads += 1;
            self.phase = Phase::Asked(params);
            return vec![NicOp::Offload {
                params: params.encode(),
                carry,
            }];
        }
        if self.phase != Phase::Running {
            return Vec::new();
        }
        self.ops.drain(..).collect()
    }

    /// The NIC started the engine at `stream_offset`: what it delivers from there is
    /// records.
    pub fn started(&mut self, stream_offset: u64) {
        if !matches!(self.phase, Phase::Asked(_)) {
            return self.fail("the NIC started an engine nobody asked for".into());
        }
        if stream_offset != self.received {
            return self.fail(format!(
                "the engine started at stream offset {stream_offset}, the host is at {}",
                self.received
            ));
        }
        self.phase = Phase::Running;
    }

    /// The NIC refused the offload: with `stale`, it delivered up to `position` and
    /// holds there (those bytes are taken as carry, then the offload goes again);
    /// otherwise the connection cannot go on.
    pub fn refused(&mut self, position: u64, stale: bool, error: &str) {
        let Phase::Asked(params) = self.phase else {
            return self.fail(format!("a refusal of no offload: {error}"));
        };
        if !stale || position < self.received {
            return self.fail(format!("the NIC refused the engine: {error}"));
        }
        self.phase = Phase::Carrying {
            params,
            until: position,
        };
        self.carried();
    }

    /// The NIC reports that the engine failed, or that it refused a request: the
    /// connection cannot go on.
    pub fn engine_error(&mut self, error: &str) {
        self.fail(format!("the NIC's engine: {error}"));
    }

    fn fail(&mut self, why: String) {
        if !matches!(self.phase, Phase::Failed(_)) {
            self.phase = Phase::Failed(why);
        }
    }

    /// The carry is complete: offload again.
    fn carried(&mut self) {
        if let Phase::Carrying { params, until } = self.phase {
            if self.received >= until {
                self.phase = Phase::Offer(params);
            }
        }
    }

    /// The NIC handed back task `tag`'s buffer `buf`. Returns the buffer if the transport
    /// has no use for it (the caller frees it); a buffer of a closed task is freed here.
    pub fn released(&mut self, tag: u32, buf: HostBuf) -> Option<HostBuf> {
        self.stats.returned += 1;
        if let Some(n) = self.retiring.get_mut(&tag) {
            *n -= 1;
            if *n == 0 {
                self.retiring.remove(&tag);
            }
            self.mem.free(buf);
            return None;
        }
        match self.tasks.get_mut(&tag) {
            Some(t) if matches!(t.store, Store::Away) => {
                t.store = Store::Host(buf);
                // Taken back before its data was all in: it goes again with the next PDU
                // naming the task, if any. Finished by the engine: its data is all in.
                t.register = std::mem::take(&mut t.recalled) && !t.sent_from;
                if self.waiting == Some(tag) {
                    self.waiting = None;
                }
                None
            }
            _ => Some(buf),
        }
    }

    /// Move every buffer of task `itt` that should go to the NIC with the next PDU naming
    /// it; `sending` says whether that PDU sends from it.
    fn register(&mut self, itt: u32, sending: bool) {
        let Some(t) = self.tasks.get_mut(&itt) else {
            return;
        };
        t.sent_from |= sending;
        if !t.register || t.len == 0 {
            return;
        }
        t.register = false;
        let buf = match std::mem::replace(&mut t.store, Store::Away) {
            // Already at the NIC.
            Store::Away => return,
            Store::Host(b) => b,
            Store::Plain(v) => match self.mem.alloc(v.len()) {
                Ok(mut b) => {
                    let dst = self.mem.slice_mut(&mut b);
                    if t.sent_from {
                        // Data to send: into host memory, where the NIC reads it.
                        dst.copy_from_slice(&v);
                        self.mem.count_copy_in(v.len());
                    } else {
                        // Room to receive into, zeroed (never stale host memory); what the
                        // host placed so far stays where it is and is joined with the rest
                        // at the end.
                        dst.fill(0);
                        if t.dirty > 0 {
                            t.prefix = Some((v, t.dirty));
                        }
                    }
                    b
                }
                Err(_) => {
                    self.stats.host_memory_short += 1;
                    t.store = Store::Plain(v);
                    return;
                }
            },
        };
        self.stats.registered += 1;
        self.ops.push_back(NicOp::Register { tag: itt, buf });
    }

    /// A burst of PDUs from task `itt`'s buffer: the one request `cmd` when the NIC holds
    /// the buffer, otherwise (host memory was short) PDU by PDU with the data inline.
    fn send_burst(
        &mut self,
        itt: u32,
        cmd: EngineCmd,
        pdus: impl Iterator<Item = (Repr, u32, u32)>,
    ) {
        self.register(itt, true);
        if matches!(self.tasks.get(&itt).map(|t| &t.store), Some(Store::Away)) {
            return self.request(cmd);
        }
        for (repr, offset, len) in pdus {
            self.send(&repr, TxData::Task { itt, offset, len });
        }
    }

    fn request(&mut self, cmd: EngineCmd) {
        if let Some(r) = cmd.encode() {
            self.stats.requests += 1;
            self.ops.push_back(NicOp::Send(r));
        }
    }

    /// Whether the software does everything (the login, or never offloading).
    fn soft(&self) -> bool {
        !self.engine || self.phase == Phase::Software
    }

    /// End task `itt`: its buffer is freed (a buffer the NIC holds, once it is back);
    /// with `take`, what it received comes back, copied out of host memory.
    fn end_task(&mut self, itt: u32, take: bool) -> Option<Vec<u8>> {
        let t = self.tasks.remove(&itt)?;
        if self.waiting == Some(itt) {
            // The machine has no more use for it: the records need not wait.
            self.waiting = None;
        }
        match t.store {
            Store::Plain(v) => (take && !t.sent_from).then_some(v),
            Store::Host(b) => {
                let out = (take && !t.sent_from).then(|| {
                    let host = self.mem.slice(&b);
                    match t.prefix {
                        Some((mut v, keep)) => {
                            v[keep..].copy_from_slice(&host[keep..]);
                            self.mem.count_copy_out(host.len() - keep);
                            v
                        }
                        None => {
                            self.mem.count_copy_out(host.len());
                            host.to_vec()
                        }
                    }
                });
                self.mem.free(b);
                out
            }
            Store::Away => {
                *self.retiring.entry(itt).or_default() += 1;
                if !t.recalled {
                    self.ops.push_back(NicOp::Release { tag: itt });
                }
                None
            }
        }
    }
}

impl Stream for Offloaded {
    fn lend_output(&mut self, out: &mut Vec<u8>) {
        self.sw.lend_output(out);
    }

    /// Plain bytes through the login (and as carry after a stale refusal); records once
    /// the engine runs, parsed where they are (`bytes` may be the driver's buffer in host
    /// memory): only a record cut at the end, or records held back, are copied. A record
    /// that needs a buffer the NIC holds stops delivery until the buffer is back. Bytes
    /// copied out of `bytes` are counted as copies out of host memory.
    fn receive<M>(
        m: &mut M,
        io: impl Fn(&mut M) -> &mut Self,
        bytes: &[u8],
        mut on_pdu: impl FnMut(&mut M, RxPdu<'_>) -> bool,
    ) -> Result<(), FrameError> {
        let o = io(m);
        o.received += bytes.len() as u64;
        match &o.phase {
            Phase::Software => {
                // The software frames in a buffer of its own.
                o.mem.count_copy_out(bytes.len());
                return crate::transport::receive(m, |m| &mut io(m).sw, bytes, on_pdu);
            }
            Phase::Carrying { .. } => {
                o.mem.count_copy_out(bytes.len());
                o.carry.extend_from_slice(bytes);
                o.carried();
                return Ok(());
            }
            Phase::Running => {}
            Phase::Failed(e) => return Err(FrameError::Engine(e.clone())),
            Phase::Offer(_) | Phase::Asked(_) => {
                return Err(FrameError::Engine(
                    "bytes received while the offload was being asked for".into(),
                ))
            }
        }
        if o.records.is_empty() {
            let (n, result) = deliver_records(m, &io, bytes, &mut on_pdu);
            let o = io(m);
            o.mem.count_copy_out(bytes.len() - n);
            o.records.extend_from_slice(&bytes[n..]);
            return result;
        }
        o.mem.count_copy_out(bytes.len());
        o.records.extend_from_slice(bytes);
        let mut records = std::mem::take(&mut o.records);
        let (n, result) = deliver_records(m, &io, &records, &mut on_pdu);
        records.drain(..n);
        io(m).records = records;
        result
    }
}

/// Deliver the records at the start of `buf` to machine `m` (transport `io(m)`) until one
/// needs a buffer the NIC holds (its release is asked for), `on_pdu` returns false, or the
/// bytes run out: the bytes taken, and the error that ends the stream, if any.
fn deliver_records<M>(
    m: &mut M,
    io: &impl Fn(&mut M) -> &mut Offloaded,
    buf: &[u8],
    on_pdu: &mut impl FnMut(&mut M, RxPdu<'_>) -> bool,
) -> (usize, Result<(), FrameError>) {
    let mut at = 0;
    while io(m).waiting.is_none() {
        let (pdu, len) = match parse_record(&buf[at..]) {
            Ok(Some((Record::Pdu { pdu, .. }, len))) => (pdu, len),
            Ok(Some((Record::Fatal(why), _))) => {
                let e = format!("the stream ended: {why:?}");
                return (at, Err(FrameError::Engine(e)));
            }
            Ok(None) => break,
            Err(e) => return (at, Err(FrameError::Engine(e.to_string()))),
        };
        let itt = u32::from_be_bytes(pdu.bhs[16..20].try_into().expect("4 bytes"));
        let o = io(m);
        if let Some(t) = o.tasks.get_mut(&itt) {
            let inline = matches!(pdu.data, RxData::Inline(d) if !d.is_empty());
            let needs_home = inline || (!t.sent_from && ends_receiving(pdu.bhs));
            if matches!(t.store, Store::Away) && needs_home {
                if !t.recalled {
                    t.recalled = true;
                    o.stats.recalls += 1;
                    o.ops.push_back(NicOp::Release { tag: itt });
                }
                o.waiting = Some(itt);
                break;
            }
        }
        at += len;
        if !on_pdu(m, pdu) {
            break;
        }
    }
    (at, Ok(()))
}

impl Transport for Offloaded {
    fn full_feature(&mut self, header_digest: bool, data_digest: bool, max_recv: u32) {
        self.sw.full_feature(header_digest, data_digest, max_recv);
        if self.engine && self.phase == Phase::Software {
            self.phase = Phase::Offer(EngineParams {
                header_digest,
                data_digest,
                max_recv,
            });
        }
    }

    fn send(&mut self, repr: &Repr, data: TxData<'_>) {
        if self.soft() {
            return self.sw.send(repr, data);
        }
        let mut bhs = [0u8; BHS_LEN];
        repr.emit(&mut bhs);
        let itt = u32::from_be_bytes(bhs[16..20].try_into().expect("4 bytes"));
        let data = match data {
            TxData::Inline(d) => {
                // A write command names a buffer to send from (its data goes in Data-Out
                // PDUs later); any other PDU naming a task, one to receive into.
                self.register(itt, is_write_command(&bhs));
                SendData::Inline(d.to_vec())
            }
            TxData::Task { itt, offset, len } => {
                self.register(itt, true);
                let (offset, len) = (offset as usize, len as usize);
                match self.tasks.get(&itt).map(|t| &t.store) {
                    Some(Store::Away) => SendData::Tag {
                        tag: itt,
                        offset,
                        len,
                    },
                    Some(Store::Plain(v)) => match v.get(offset..offset + len) {
                        Some(d) => {
                            self.copy_bytes += d.len() as u64;
                            SendData::Inline(d.to_vec())
                        }
                        None => return,
                    },
                    Some(Store::Host(b)) => match self.mem.slice(b).get(offset..offset + len) {
                        Some(d) => {
                            self.mem.count_copy_out(d.len());
                            SendData::Inline(d.to_vec())
                        }
                        None => return,
                    },
                    None => return,
                }
            }
        };
        self.request(EngineCmd::Send { bhs, data });
    }

    fn send_data_in(&mut self, burst: &DataInBurst) {
        if self.soft() {
            return self.sw.send_data_in(burst);
        }
        self.send_burst(burst.itt, EngineCmd::SendDataIn(*burst), burst.pdus());
    }

    fn send_data_out(&mut self, burst: &DataOutBurst) {
        if self.soft() {
            return self.sw.send_data_out(burst);
        }
        self.send_burst(burst.itt, EngineCmd::SendDataOut(*burst), burst.pdus());
    }

    /// The buffer stays in application memory until the first PDU naming the task goes
    /// out. A task whose buffer the NIC still holds gets a new one (the old comes back
    /// first and is freed).
    fn open(&mut self, itt: u32, buf: Vec<u8>) {
        if self.soft() {
            return self.sw.open(itt, buf);
        }
        self.close(itt);
        let len = buf.len();
        self.tasks.insert(
            itt,
            TaskBuf {
                store: Store::Plain(buf),
                len,
                sent_from: false,
                register: true,
                recalled: false,
                dirty: 0,
                prefix: None,
            },
        );
    }

    /// With the engine, straight into host memory (zeroed), where the NIC places the
    /// peer's data once it is registered with the next PDU naming the task and the host
    /// places what arrives inline; in application memory if host memory is short.
    fn open_receive(&mut self, itt: u32, len: usize) {
        if self.soft() || len == 0 {
            return self.open(itt, vec![0; len]);
        }
        match self.mem.alloc(len) {
            Ok(mut b) => {
                self.mem.slice_mut(&mut b).fill(0);
                if let Err(b) = self.open_host(itt, b) {
                    self.mem.free(b); // not reached: the engine's transport has memory
                }
            }
            Err(_) => {
                self.stats.host_memory_short += 1;
                self.open(itt, vec![0; len]);
            }
        }
    }

    fn buffer(&self, itt: u32) -> Option<&[u8]> {
        if self.soft() {
            return self.sw.buffer(itt);
        }
        let t = self.tasks.get(&itt)?;
        match &t.store {
            Store::Plain(v) => Some(v),
            // Whole only once closed when part of it is in application memory.
            Store::Host(b) if t.prefix.is_none() => Some(self.mem.slice(b)),
            Store::Host(_) | Store::Away => None,
        }
    }

    fn place(&mut self, itt: u32, offset: usize, data: &[u8]) -> bool {
        if self.soft() {
            return self.sw.place(itt, offset, data);
        }
        let Some(t) = self.tasks.get_mut(&itt) else {
            return false;
        };
        let Some(end) = offset.checked_add(data.len()).filter(|&e| e <= t.len) else {
            return false;
        };
        match &mut t.store {
            Store::Plain(v) => {
                v[offset..end].copy_from_slice(data);
                self.copy_bytes += data.len() as u64;
            }
            Store::Host(b) => {
                // Below the kept prefix into the application buffer, the rest into host
                // memory.
                let split = match &mut t.prefix {
                    Some((v, keep)) => {
                        let k = (*keep).clamp(offset, end);
                        v[offset..k].copy_from_slice(&data[..k - offset]);
                        self.copy_bytes += (k - offset) as u64;
                        k
                    }
                    None => offset,
                };
                self.mem.slice_mut(b)[split..end].copy_from_slice(&data[split - offset..]);
                self.mem.count_copy_in(end - split);
            }
            Store::Away => return false,
        }
        t.dirty = t.dirty.max(end);
        true
    }

    /// A buffer the NIC holds is released (after the sends before it) and freed when it
    /// comes back: `None`. A buffer that was sent from comes back only in software.
    /// Received data in host memory is copied out (the one copy of received data).
    fn close(&mut self, itt: u32) -> Option<Vec<u8>> {
        if self.soft() {
            return self.sw.close(itt);
        }
        self.end_task(itt, true)
    }

    /// As [`Offloaded::close`], without copying anything out of host memory.
    fn discard(&mut self, itt: u32) {
        if self.soft() {
            self.sw.close(itt);
        } else {
            self.end_task(itt, false);
        }
    }

    fn close_all(&mut self) {
        if self.soft() {
            return self.sw.close_all();
        }
        let tags: Vec<u32> = self.tasks.keys().copied().collect();
        for tag in tags {
            self.close(tag);
        }
    }

    /// A buffer the host has back (the engine finished it, or it was recalled) that
    /// received data: handed over as is. The first bytes it received before it went to
    /// the NIC (kept in application memory) are copied in first, counted.
    fn take_host(&mut self, itt: u32) -> Option<HostBuf> {
        if self.soft() {
            return None;
        }
        match self.tasks.get(&itt) {
            Some(t) if !t.sent_from && matches!(t.store, Store::Host(_)) => {}
            _ => return None,
        }
        let Some(TaskBuf {
            store: Store::Host(mut b),
            prefix,
            ..
        }) = self.tasks.remove(&itt)
        else {
            return None; // checked above
        };
        if self.waiting == Some(itt) {
            self.waiting = None;
        }
        if let Some((v, keep)) = prefix {
            self.mem.slice_mut(&mut b)[..keep].copy_from_slice(&v[..keep]);
            self.mem.count_copy_in(keep);
        }
        Some(b)
    }

    /// With the engine the buffer goes to the NIC with the first PDU that sends from it,
    /// as it is; in software its bytes are copied out of host memory (counted) and the
    /// buffer freed.
    fn open_host(&mut self, itt: u32, buf: HostBuf) -> Result<(), HostBuf> {
        if self.soft() {
            let v = self.mem.slice(&buf).to_vec();
            self.mem.count_copy_out(v.len());
            self.mem.free(buf);
            self.sw.open(itt, v);
            return Ok(());
        }
        self.close(itt);
        let len = buf.len();
        self.tasks.insert(
            itt,
            TaskBuf {
                store: Store::Host(buf),
                len,
                sent_from: false,
                register: true,
                recalled: false,
                dirty: len,
                prefix: None,
            },
        );
        Ok(())
    }

    fn free_host(&mut self, buf: HostBuf) {
        self.mem.free(buf);
    }

    /// Only the software's (the login, or everything when never offloading).
    fn digest_bytes(&self) -> u64 {
        self.sw.digest_bytes()
    }

    fn copy_bytes(&self) -> u64 {
        self.sw.copy_bytes() + self.copy_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Engine;
    use crate::transport::HostBuffers;
    use crate::wire::{DataOut, Framing, R2t, RESERVED_TAG};

    fn mem(bytes: usize) -> Arc<HostMemory> {
        Arc::new(HostMemory::anonymous(bytes).unwrap())
    }

    /// A transport whose engine runs (the login skipped).
    fn running(mem: Arc<HostMemory>) -> Offloaded {
        let mut o = Offloaded::engine(mem);
        o.full_feature(false, false, 8192);
        assert!(matches!(o.take_ops()[..], [NicOp::Offload { .. }]));
        o.started(0);
        assert!(o.offloaded());
        o
    }

    fn r2t(itt: u32, offset: u32, len: u32) -> Repr {
        Repr::R2t(R2t {
            lun: 0,
            itt,
            ttt: 9,
            stat_sn: 1,
            exp_cmd_sn: 1,
            max_cmd_sn: 1,
            r2t_sn: 0,
            buffer_offset: offset,
            desired_len: len,
        })
    }

    /// The engine's records of a Data-Out for `itt` carrying `data` at `offset` (F set),
    /// for a tag the engine has no buffer for: its data inline.
    fn data_out_record(itt: u32, offset: u32, data: &[u8]) -> Vec<u8> {
        let mut wire = Vec::new();
        let d = Repr::DataOut(DataOut {
            final_: true,
            lun: 0,
            itt,
            ttt: 9,
            exp_stat_sn: 1,
            data_sn: 0,
            buffer_offset: offset,
        });
        Framing::default().emit(&d, &[], data, &mut wire).unwrap();
        let mut up = Vec::new();
        Engine::new(false, false, 8192).receive(&wire, &mut HostBuffers::default(), &mut up);
        up
    }

    /// Take every PDU `o` delivers: (ITT, inline data).
    fn take(o: &mut Offloaded, bytes: &[u8]) -> Vec<(u32, Vec<u8>)> {
        let mut got = Vec::new();
        let mut m = (o, &mut got);
        Offloaded::receive(
            &mut m,
            |m| &mut *m.0,
            bytes,
            |m, p| {
                let itt = u32::from_be_bytes(p.bhs[16..20].try_into().unwrap());
                m.1.push((itt, p.inline().to_vec()));
                true
            },
        )
        .unwrap();
        got
    }

    /// A stale refusal: what the NIC delivered up to its position is carry, and the
    /// offload goes again with it, from where the software stopped; nothing else goes to
    /// the NIC before the engine runs.
    #[test]
    fn a_stale_offload_goes_again_with_what_was_delivered_as_carry() {
        let mut o = Offloaded::engine(mem(1 << 20));
        assert!(take(&mut o, b"").is_empty());
        o.full_feature(true, true, 8192);
        o.send(&r2t(3, 0, 10), TxData::Inline(&[]));
        let NicOp::Offload { carry, .. } = &o.take_ops()[0] else {
            panic!()
        };
        assert!(carry.is_empty());
        assert!(!o.wants_input() && o.take_ops().is_empty());
        o.refused(7, true, "delivered up to 7");
        assert!(o.wants_input());
        take(&mut o, b"abcd");
        assert!(o.take_ops().is_empty(), "4 of 7 bytes");
        take(&mut o, b"efg");
        let ops = o.take_ops();
        let [NicOp::Offload { carry, .. }] = &ops[..] else {
            panic!("{ops:?}")
        };
        assert_eq!(carry, b"abcdefg");
        o.started(7);
        assert!(o.offloaded());
        assert!(
            matches!(o.take_ops()[..], [NicOp::Send(_)]),
            "the R2T, held"
        );
        assert_eq!(o.stats().offloads, 2);
        // A refusal that is not stale, or an engine started elsewhere, ends it.
        let mut o = Offloaded::engine(mem(1 << 20));
        o.full_feature(false, false, 8192);
        o.take_ops();
        o.refused(0, false, "no such engine");
        assert!(o.failure().is_some_and(|e| e.contains("no such engine")));
        assert!(o.needs_delivery());
    }

    /// Data that arrives inline for a task whose buffer the NIC holds waits until the
    /// buffer is back (its release asked for), then is placed; bytes placed before the
    /// registration stay in application memory and are joined with the rest at close;
    /// the buffer in host memory is freed.
    #[test]
    fn inline_data_for_a_buffer_at_the_nic_waits_for_it() {
        let m = mem(1 << 20);
        let mut o = running(m.clone());
        o.open(5, vec![0; 100]);
        assert!(o.place(5, 0, b"immediate"));
        o.send(&r2t(5, 9, 91), TxData::Inline(&[]));
        let ops = o.take_ops();
        let [NicOp::Register { tag: 5, .. }, NicOp::Send(_)] = &ops[..] else {
            panic!("{ops:?}")
        };
        let Some(NicOp::Register { buf, .. }) = ops.into_iter().next() else {
            panic!()
        };
        assert!(m.slice(&buf).iter().all(|&b| b == 0), "zeroed, no copy");
        assert_eq!(o.buffer(5), None, "at the NIC");
        let rec = data_out_record(5, 50, b"late");
        assert!(take(&mut o, &rec).is_empty(), "held");
        assert!(!o.wants_input() && !o.needs_delivery());
        assert!(matches!(o.take_ops()[..], [NicOp::Release { tag: 5 }]));
        assert!(o.released(5, buf).is_none());
        assert!(o.needs_delivery());
        let got = take(&mut o, &[]);
        assert_eq!(got, vec![(5, b"late".to_vec())]);
        assert!(o.place(5, 50, b"late"));
        let v = o.close(5).unwrap();
        assert_eq!(&v[..9], b"immediate");
        assert_eq!(&v[50..54], b"late");
        assert_eq!(m.used_bytes(), 0);
        assert_eq!(o.stats().recalls, 1);
        // A stray buffer goes back to the caller; a closed task's is freed.
        o.open(6, vec![1; 10]);
        o.send_data_in(&data_in(6, 10));
        assert_eq!(o.close(6), None);
        let ops = o.take_ops();
        let [NicOp::Register { .. }, NicOp::Send(_), NicOp::Release { tag: 6 }] = &ops[..] else {
            panic!("{ops:?}")
        };
        let Some(NicOp::Register { buf, .. }) = ops.into_iter().next() else {
            panic!()
        };
        assert_eq!(m.slice(&buf), &[1; 10], "data to send is copied in");
        assert!(o.released(6, buf).is_none());
        assert_eq!(m.used_bytes(), 0);
        let stray = m.alloc(8).unwrap();
        let back = o.released(77, stray).unwrap();
        m.free(back);
    }

    /// Host memory short: the buffer stays in application memory, and what is sent from
    /// it goes to the engine inline, PDU by PDU.
    #[test]
    fn without_host_memory_a_task_is_sent_inline() {
        let mut o = running(mem(4096));
        o.open(8, (0..20_000u32).map(|x| x as u8).collect());
        o.send_data_out(&DataOutBurst {
            lun: 0,
            itt: 8,
            ttt: RESERVED_TAG,
            exp_stat_sn: 1,
            from: 0,
            to: 20_000,
            max_segment: 8192,
        });
        let ops = o.take_ops();
        assert_eq!(ops.len(), 3, "{ops:?}");
        let mut sent = Vec::new();
        for op in ops {
            let NicOp::Send(r) = op else { panic!() };
            let EngineCmd::Send {
                data: SendData::Inline(d),
                ..
            } = EngineCmd::decode(&r).unwrap()
            else {
                panic!()
            };
            sent.extend(d);
        }
        assert_eq!(sent, (0..20_000u32).map(|x| x as u8).collect::<Vec<_>>());
        assert_eq!(o.stats().host_memory_short, 1);
        assert_eq!(o.close(8), None, "sent from");
    }

    /// A Data-In burst of `len` bytes from task `itt`'s buffer.
    fn data_in(itt: u32, len: u32) -> DataInBurst {
        DataInBurst {
            lun: 0,
            itt,
            len,
            max_segment: 8192,
            max_burst: 8192,
            stat_sn: 1,
            exp_cmd_sn: 1,
            max_cmd_sn: 1,
            status: 0,
            residual: (false, false, 0),
        }
    }

    /// The proxy's path through one host: a buffer opened to receive is in host memory
    /// from the start (inline data placed there, copied once); once the NIC has filled it
    /// and handed it back, `take_host` hands it over as it lies, and another connection of
    /// the same host sends from it (`open_host`) with no copy — the NIC gets the very same
    /// buffer. A buffer sent from is not handed over; in software, `open_host` copies out
    /// (counted) and frees.
    #[test]
    fn a_received_buffer_is_handed_over_and_sent_on_from_host_memory_without_a_copy() {
        let m = mem(1 << 20);
        let copies = |m: &HostMemory| {
            let s = m.stats().snapshot();
            (s.copy_in_bytes, s.copy_out_bytes, s.host_copy_bytes)
        };
        let mut back = running(m.clone());
        back.open_receive(5, 100);
        assert_eq!(
            back.buffer(5),
            Some(&[0u8; 100][..]),
            "zeroed in host memory"
        );
        assert!(back.place(5, 0, b"immediate"));
        assert_eq!(copies(&m), (9, 0, 0), "the inline bytes, once");
        back.send(&r2t(5, 9, 91), TxData::Inline(&[]));
        let ops = back.take_ops();
        let Some(NicOp::Register { tag: 5, mut buf }) = ops.into_iter().next() else {
            panic!("registered first")
        };
        assert_eq!(&m.slice(&buf)[..9], b"immediate", "registered as it was");
        m.slice_mut(&mut buf)[9..].fill(7); // the NIC's placement (DMA)
        let at = buf.offset();
        assert!(back.released(5, buf).is_none(), "the task keeps it");
        let b = back.take_host(5).expect("handed over");
        assert_eq!(back.take_host(5), None, "once");
        assert_eq!(back.buffer(5), None, "the task is closed");
        assert_eq!((b.offset(), b.len()), (at, 100));
        assert_eq!(&m.slice(&b)[..9], b"immediate");
        assert!(m.slice(&b)[9..].iter().all(|&x| x == 7));
        let mut front = running(m.clone());
        front
            .open_host(7, b)
            .expect("the engine's transport has host memory");
        front.send_data_in(&data_in(7, 100));
        assert_eq!(front.take_host(7), None, "sent from");
        let ops = front.take_ops();
        let [NicOp::Register { tag: 7, buf }, NicOp::Send(_)] = &ops[..] else {
            panic!("{ops:?}")
        };
        assert_eq!(buf.offset(), at, "the same buffer goes to the NIC");
        assert_eq!(copies(&m), (9, 0, 0), "and nothing was copied on the way");
        assert_eq!(front.close(7), None);
        let Some(NicOp::Register { buf, .. }) = ops.into_iter().next() else {
            panic!()
        };
        assert!(front.released(7, buf).is_none());
        assert_eq!(m.used_bytes(), 0);
        // In software the data comes out of host memory, counted, and the buffer goes.
        let mut soft = Offloaded::software(m.clone());
        let mut b = m.alloc(10).unwrap();
        m.slice_mut(&mut b).fill(3);
        soft.open_host(1, b).unwrap();
        assert_eq!(soft.buffer(1), Some(&[3u8; 10][..]));
        assert_eq!(copies(&m), (9, 10, 0));
        assert_eq!(m.used_bytes(), 0);
    }
}
