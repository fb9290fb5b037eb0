//! `toemu iscsi perf`: toemu's initiator as a load generator against any iSCSI target (ours,
//! tgt, ...): READ(16) or WRITE(16) of one size at a queue depth, sequential or random, for a
//! time or a byte count; IOPS, MB/s and latency percentiles. With `verify`, the writes carry
//! a pattern seeded by (seed, LBA) and every I/O slot written is read back and compared.
//!
//! The load is [`PerfMachine`], sans I/O: it takes the initiator's events and the time (in
//! microseconds of any clock: the wall clock on std TCP, the virtual clock on an emulated
//! host) and queues commands on `toe-iscsi`'s
//! [`InitiatorConn`]. [`perf`] runs it on std TCP; the
//! emulated host runs it as an app ([`crate::iscsi_host::PerfApp`]).

use std::collections::HashMap;
use std::io;

use serde::Serialize;

use crate::datagen::DataGen;
use crate::demo::{latency, Latency};
use crate::iscsi::{capacity16, read_capacity16, IscsiUrl, TcpInitiator};
use toe_iscsi::initiator::{Completion, InitiatorConn, InitiatorEvent};
use toe_iscsi::login::Negotiated;
use toe_iscsi::transport::Stream;

/// What `perf` does.
#[derive(Debug, Clone)]
pub struct PerfOptions {
    /// Bytes per I/O (a multiple of the LUN's block size).
    pub io_bytes: u32,
    /// Commands kept in flight (at least 1).
    pub depth: usize,
    /// How long the timed phase runs, seconds (unless `bytes` is given).
    pub seconds: f64,
    /// Stop after this many bytes instead of after `seconds`.
    pub bytes: Option<u64>,
    /// WRITE(16) instead of READ(16).
    pub write: bool,
    /// Write the pattern (the timed phase writes, whatever `write` says), then read back and
    /// compare every I/O slot written.
    pub verify: bool,
    /// Random I/O slots (uniform over the LUN) instead of sequential ones.
    pub random: bool,
    /// Seed of the pattern and of the random slots.
    pub seed: u64,
    /// Writes with FUA (each reaches stable storage before it completes).
    pub fua: bool,
    /// SYNCHRONIZE CACHE(16) after the writes (its status checked).
    pub sync: bool,
    /// No writes: read back and compare what a `write` run with the same `bytes`, `io_bytes`,
    /// `random` and `seed` wrote (a check after a restart, for example). Needs `bytes`.
    pub check_only: bool,
}

impl Default for PerfOptions {
    fn default() -> Self {
        PerfOptions {
            io_bytes: 4096,
            depth: 32,
            seconds: 10.0,
            bytes: None,
            write: false,
            verify: false,
            random: false,
            seed: 1,
            fua: false,
            sync: false,
            check_only: false,
        }
    }
}

/// The figures of one phase (the timed run, or the read-back of `verify`).
#[derive(Debug, Clone, Serialize)]
pub struct PhaseReport {
    /// `read` or `write`.
    pub op: &'static str,
    /// Commands completed.
    pub ios: u64,
    /// Data bytes moved.
    pub bytes: u64,
    /// Seconds from the first command to the last completion (of the caller's clock: wall
    /// on std TCP, virtual on the in-memory wire).
    pub seconds: f64,
    /// `ios / seconds`.
    pub iops: f64,
    /// `bytes / seconds / 1e6`.
    pub mb_per_s: f64,
    /// Command latency (issue to completion), microseconds of the same clock.
    pub latency_us: Latency,
    /// Commands that ended with a status other than GOOD, or no data when data was due.
    pub errors: u64,
}

/// What `perf` measured.
#[derive(Debug, Clone, Serialize)]
pub struct PerfReport {
    /// The target's IQN.
    pub target: String,
    /// The LUN.
    pub lun: u16,
    /// LUN capacity, bytes.
    pub capacity_bytes: u64,
    /// LUN logical block size, bytes.
    pub block_bytes: u32,
    /// Bytes per I/O.
    pub io_bytes: u32,
    /// Queue depth.
    pub depth: usize,
    /// Random slots.
    pub random: bool,
    /// Header digests in use (negotiated).
    pub header_digest: bool,
    /// Data digests in use (negotiated).
    pub data_digest: bool,
    /// The timed phase, then with `verify` the read-back.
    pub phases: Vec<PhaseReport>,
    /// With `verify`: I/O slots read back whose data differed from what was written.
    pub mismatches: Option<u64>,
    /// The first error or mismatch, described.
    pub first_problem: Option<String>,
}

impl PerfReport {
    /// Whether every command succeeded and (with `verify`) every slot read back intact.
    pub fn ok(&self) -> bool {
        self.phases.iter().all(|p| p.errors == 0) && self.mismatches.unwrap_or(0) == 0
    }
}

/// Fill `buf` (which starts at logical block `lba`) with the pattern: each block of
/// `block` bytes is the [`DataGen`] stream of `seed` mixed with its LBA, so a block's content
/// does not depend on the I/O that wrote it.
pub fn pattern(seed: u64, lba: u64, block: usize, buf: &mut [u8]) {
    for (i, b) in buf.chunks_mut(block).enumerate() {
        let l = lba + i as u64;
        DataGen::new(seed ^ l.wrapping_mul(0x2545_F491_4F6C_DD1D)).fill(b);
    }
}

/// READ(16) or WRITE(16) (with FUA if `fua`) of `blocks` blocks at `lba`.
fn rw16(write: bool, fua: bool, lba: u64, blocks: u32) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = if write { 0x8a } else { 0x88 };
    if write && fua {
        c[1] = 0x08;
    }
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&blocks.to_be_bytes());
    c
}

/// A command's outcome, for the problem report.
fn describe(c: &Completion) -> String {
    let sense = crate::iscsi::sense_of(c).map_or(String::new(), |(k, a, q)| {
        format!(", sense key {k:#x} ASC/ASCQ {a:02x}h/{q:02x}h")
    });
    format!("status {:#04x}, response {}{sense}", c.status, c.response)
}

/// Which I/O slots a phase visits.
#[derive(Debug, Clone)]
enum Slots {
    Sequential {
        next: u64,
        of: u64,
    },
    Random {
        state: u64,
        of: u64,
    },
    /// The slots set in the written map, in order.
    Written {
        next: u64,
    },
}

impl Slots {
    fn next(&mut self, map: &[u64]) -> Option<u64> {
        match self {
            Slots::Sequential { next, of } => {
                let s = *next;
                *next = (*next + 1) % *of;
                Some(s)
            }
            Slots::Random { state, of } => {
                // xorshift64*
                let mut x = *state;
                x ^= x >> 12;
                x ^= x << 25;
                x ^= x >> 27;
                *state = x;
                Some(x.wrapping_mul(0x2545_F491_4F6C_DD1D) % *of)
            }
            Slots::Written { next } => {
                let n = map.len() as u64 * 64;
                while *next < n {
                    let s = *next;
                    *next += 1;
                    if map[(s / 64) as usize] & (1 << (s % 64)) != 0 {
                        return Some(s);
                    }
                }
                None
            }
        }
    }
}

/// One phase to run: `write` or read the slots `slots` gives, until `stop_bytes` are issued
/// or `seconds` pass; `mark` records the slots written, `check` compares what is read with
/// the pattern.
#[derive(Debug, Clone)]
struct Plan {
    write: bool,
    slots: Slots,
    stop_bytes: Option<u64>,
    seconds: Option<f64>,
    mark: bool,
    check: bool,
}

/// A phase in progress.
#[derive(Debug)]
struct Running {
    plan: Plan,
    t0: u64,
    deadline: Option<u64>,
    issuing: bool,
    issued: u64,
    ios: u64,
    errors: u64,
    lat: Vec<f64>,
    /// tag → (slot, issue time)
    inflight: HashMap<u32, (u64, u64)>,
}

#[derive(Debug)]
enum Stage {
    /// Waiting for the login.
    Login,
    /// READ CAPACITY(16) in flight (tries so far: UNIT ATTENTION is retried).
    Capacity { tag: u32, tries: u32 },
    /// The phases.
    Io,
    /// SYNCHRONIZE CACHE(16) in flight, then the remaining phases.
    Sync { tag: u32 },
    /// Logout sent.
    Logout,
    /// Logged out, or failed.
    Done,
}

/// The `perf` load as a machine: see the module documentation. Feed it every
/// [`InitiatorEvent`] of its connection with [`PerfMachine::on_event`], and call
/// [`PerfMachine::poll`] when time passes (a timed phase ends by the clock); both queue
/// commands on the connection (their bytes in `out`).
#[derive(Debug)]
pub struct PerfMachine {
    o: PerfOptions,
    target: String,
    lun: u16,
    stage: Stage,
    capacity: u64,
    block: u32,
    plans: std::collections::VecDeque<Plan>,
    sync_after_first: bool,
    cur: Option<Running>,
    map: Vec<u64>,
    phases: Vec<PhaseReport>,
    mismatches: Option<u64>,
    first_problem: Option<String>,
    failed: Option<String>,
    digests: (bool, bool),
    buf: Vec<u8>,
}

/// Most I/O slots `verify` and `check` track (a bitmap of 256 MiB at most).
const MAX_VERIFY_SLOTS: u64 = 1 << 31;

impl PerfMachine {
    /// The load `o` on LUN `lun` of `target`, to start once the connection is logged in.
    pub fn new(o: PerfOptions, target: String, lun: u16) -> Self {
        PerfMachine {
            o,
            target,
            lun,
            stage: Stage::Login,
            capacity: 0,
            block: 512,
            plans: Default::default(),
            sync_after_first: false,
            cur: None,
            map: Vec::new(),
            phases: Vec::new(),
            mismatches: None,
            first_problem: None,
            failed: None,
            digests: (false, false),
            buf: Vec::new(),
        }
    }

    /// Whether the run is over (logged out, or failed).
    pub fn done(&self) -> bool {
        matches!(self.stage, Stage::Done)
    }

    /// The latest time (same clock as `now`) at which [`PerfMachine::poll`] must be called:
    /// the end of a timed phase.
    pub fn deadline(&self) -> Option<u64> {
        self.cur
            .as_ref()
            .filter(|r| r.issuing)
            .and_then(|r| r.deadline)
    }

    fn fail<T: Stream>(&mut self, why: String, conn: &mut InitiatorConn<T>, out: &mut Vec<u8>) {
        self.failed.get_or_insert(why);
        self.cur = None;
        if !conn.ended() && !matches!(self.stage, Stage::Logout | Stage::Done | Stage::Login) {
            conn.logout(out);
            self.stage = Stage::Logout;
        } else {
            self.stage = Stage::Done;
        }
    }

    /// One event of the connection, at `now` (µs).
    pub fn on_event<T: Stream>(
        &mut self,
        e: InitiatorEvent,
        conn: &mut InitiatorConn<T>,
        now: u64,
        out: &mut Vec<u8>,
    ) {
        match (&mut self.stage, e) {
            (_, InitiatorEvent::Failed(why)) => {
                self.failed.get_or_insert(why);
                self.cur = None;
                self.stage = Stage::Done;
            }
            (_, InitiatorEvent::LoginFailed(e)) => {
                self.failed.get_or_insert(format!("login: {e}"));
                self.stage = Stage::Done;
            }
            (Stage::Login, InitiatorEvent::LoggedIn(n)) => self.logged_in(&n, conn, out),
            (Stage::Capacity { tag, tries }, InitiatorEvent::Done(c)) if c.itt == *tag => {
                if crate::iscsi::sense_key(&c) == Some(6) && *tries < 3 {
                    *tries += 1;
                    *tag = conn.command(lun_of(self.lun), &read_capacity16(), 32, Vec::new(), out);
                    return;
                }
                self.capacity_known(&c, conn, now, out);
            }
            (Stage::Sync { tag }, InitiatorEvent::Done(c)) if c.itt == *tag => {
                if c.status != 0 || c.response != 0 {
                    let why = format!("SYNCHRONIZE CACHE(16): {}", describe(&c));
                    self.first_problem.get_or_insert(why.clone());
                    return self.fail(why, conn, out);
                }
                self.stage = Stage::Io;
                self.next_phase(conn, now, out);
            }
            (Stage::Io, InitiatorEvent::Done(c)) => {
                self.completed(c, now);
                self.poll(conn, now, out);
            }
            (Stage::Logout, InitiatorEvent::LoggedOut) => self.stage = Stage::Done,
            (_, other) => {
                let why = format!("unexpected {other:?}");
                self.fail(why, conn, out)
            }
        }
    }

    /// Start, if the connection is logged in already (`perf` on std TCP logs in first).
    pub fn logged_in<T: Stream>(
        &mut self,
        n: &Negotiated,
        conn: &mut InitiatorConn<T>,
        out: &mut Vec<u8>,
    ) {
        self.digests = (n.header_digest, n.data_digest);
        let tag = conn.command(lun_of(self.lun), &read_capacity16(), 32, Vec::new(), out);
        self.stage = Stage::Capacity { tag, tries: 0 };
    }

    fn capacity_known<T: Stream>(
        &mut self,
        rc: &Completion,
        conn: &mut InitiatorConn<T>,
        now: u64,
        out: &mut Vec<u8>,
    ) {
        let Some((capacity, block)) = capacity16(rc) else {
            return self.fail(format!("READ CAPACITY(16): {}", describe(rc)), conn, out);
        };
        self.block = block.max(1);
        self.capacity = capacity;
        let o = &self.o;
        if o.io_bytes == 0 || o.io_bytes % self.block != 0 {
            let why = format!(
                "--block {}: not a multiple of the LUN's {block}-byte blocks",
                o.io_bytes
            );
            return self.fail(why, conn, out);
        }
        let of = self.capacity / u64::from(o.io_bytes);
        if of == 0 {
            let why = format!("the LUN ({} bytes) is smaller than one I/O", self.capacity);
            return self.fail(why, conn, out);
        }
        let slots = if o.random {
            Slots::Random {
                state: o.seed | 1,
                of,
            }
        } else {
            Slots::Sequential { next: 0, of }
        };
        let first = Plan {
            write: (o.write || o.verify) && !o.check_only,
            slots,
            stop_bytes: o.bytes,
            seconds: o.bytes.is_none().then_some(o.seconds),
            mark: o.verify,
            check: false,
        };
        let back = Plan {
            write: false,
            slots: Slots::Written { next: 0 },
            stop_bytes: None,
            seconds: None,
            mark: false,
            check: true,
        };
        if (o.verify || o.check_only) && of > MAX_VERIFY_SLOTS {
            let why = format!(
                "--verify/--check track every I/O slot written: {of} slots of {} bytes is more than {MAX_VERIFY_SLOTS}; use a larger --block",
                o.io_bytes
            );
            return self.fail(why, conn, out);
        }
        if o.verify || o.check_only {
            self.map = vec![0u64; of.div_ceil(64) as usize];
        }
        if o.check_only {
            // The slots the write run visited: the same sequence, as many I/Os as it issued.
            let Some(bytes) = o.bytes else {
                return self.fail("--check needs --bytes".into(), conn, out);
            };
            let mut s = first.slots.clone();
            for _ in 0..bytes.div_ceil(u64::from(o.io_bytes)) {
                let k = s.next(&[]).expect("write slots never run out");
                self.map[(k / 64) as usize] |= 1 << (k % 64);
            }
            self.plans.push_back(back);
            self.mismatches = Some(0);
        } else {
            self.sync_after_first = o.sync && first.write;
            self.plans.push_back(first);
            if o.verify {
                self.plans.push_back(back);
                self.mismatches = Some(0);
            }
        }
        self.stage = Stage::Io;
        self.next_phase(conn, now, out);
    }

    fn next_phase<T: Stream>(&mut self, conn: &mut InitiatorConn<T>, now: u64, out: &mut Vec<u8>) {
        let Some(plan) = self.plans.pop_front() else {
            conn.logout(out);
            self.stage = Stage::Logout;
            return;
        };
        let deadline = plan.seconds.map(|s| now + (s * 1e6) as u64);
        self.cur = Some(Running {
            plan,
            t0: now,
            deadline,
            issuing: true,
            issued: 0,
            ios: 0,
            errors: 0,
            lat: Vec::new(),
            inflight: HashMap::new(),
        });
        self.poll(conn, now, out);
    }

    /// Issue what the queue depth allows at `now`, and move on when a phase is over.
    pub fn poll<T: Stream>(&mut self, conn: &mut InitiatorConn<T>, now: u64, out: &mut Vec<u8>) {
        if !matches!(self.stage, Stage::Io) {
            return;
        }
        let (io, block, depth, seed, fua, lun) = (
            self.o.io_bytes,
            self.block,
            self.o.depth.max(1),
            self.o.seed,
            self.o.fua,
            self.lun,
        );
        let blocks = io / block;
        let Some(r) = self.cur.as_mut() else {
            return;
        };
        // A target that asks for a logout gets no new command (the connection logs out
        // once the ones in flight are done).
        if conn.logout_asked() && r.issuing {
            r.issuing = false;
            self.first_problem
                .get_or_insert_with(|| "the target asked for a logout mid-run".into());
        }
        while r.issuing && r.inflight.len() < depth {
            let more = r.plan.stop_bytes.is_none_or(|b| r.issued < b)
                && r.deadline.is_none_or(|d| now < d);
            let Some(slot) = more.then(|| r.plan.slots.next(&self.map)).flatten() else {
                r.issuing = false;
                break;
            };
            let lba = slot * u64::from(blocks);
            let cdb = rw16(r.plan.write, fua, lba, blocks);
            let data = if r.plan.write {
                let mut b = vec![0u8; io as usize];
                pattern(seed, lba, block as usize, &mut b);
                b
            } else {
                Vec::new()
            };
            let tag = conn.command(lun_of(lun), &cdb, io, data, out);
            r.inflight.insert(tag, (slot, now));
            r.issued += u64::from(io);
        }
        if r.issuing || !r.inflight.is_empty() {
            return;
        }
        let r = self.cur.take().expect("running");
        let seconds = now.saturating_sub(r.t0) as f64 / 1e6;
        let bytes = r.ios * u64::from(io);
        self.phases.push(PhaseReport {
            op: if r.plan.write { "write" } else { "read" },
            ios: r.ios,
            bytes,
            seconds,
            iops: r.ios as f64 / seconds.max(1e-9),
            mb_per_s: bytes as f64 / seconds.max(1e-9) / 1e6,
            latency_us: latency(r.lat),
            errors: r.errors,
        });
        if std::mem::take(&mut self.sync_after_first) {
            let mut cdb = [0u8; 16];
            cdb[0] = 0x91;
            let tag = conn.command(lun_of(lun), &cdb, 0, Vec::new(), out);
            self.stage = Stage::Sync { tag };
            return;
        }
        self.next_phase(conn, now, out);
    }

    fn completed(&mut self, c: Completion, now: u64) {
        let (io, block, seed) = (self.o.io_bytes, self.block, self.o.seed);
        let Some(r) = self.cur.as_mut() else {
            return;
        };
        let Some((slot, at)) = r.inflight.remove(&c.itt) else {
            self.first_problem
                .get_or_insert_with(|| format!("completion of unknown tag {}", c.itt));
            return;
        };
        r.lat.push(now.saturating_sub(at) as f64);
        r.ios += 1;
        let lba = slot * u64::from(io / block);
        let short = !r.plan.write && c.data.len() != io as usize;
        if c.status != 0 || c.response != 0 || short {
            r.errors += 1;
            let what = if r.plan.write {
                "WRITE(16)"
            } else {
                "READ(16)"
            };
            let extra = if short {
                format!(", {} data bytes", c.data.len())
            } else {
                String::new()
            };
            self.first_problem
                .get_or_insert_with(|| format!("{what} at LBA {lba}: {}{extra}", describe(&c)));
            return;
        }
        if r.plan.mark {
            self.map[(slot / 64) as usize] |= 1 << (slot % 64);
        }
        if r.plan.check {
            self.buf.resize(io as usize, 0);
            pattern(seed, lba, block as usize, &mut self.buf);
            if c.data != self.buf {
                *self.mismatches.get_or_insert(0) += 1;
                let at = c
                    .data
                    .iter()
                    .zip(&self.buf)
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
                self.first_problem.get_or_insert_with(|| {
                    format!("read-back of LBA {lba}: byte {at} of the I/O differs from what was written")
                });
            }
        }
    }

    /// The figures, once [`PerfMachine::done`]; an error if the run could not happen (login,
    /// capacity, a failed connection).
    pub fn report(&self) -> Result<PerfReport, String> {
        if let Some(f) = &self.failed {
            return Err(f.clone());
        }
        Ok(PerfReport {
            target: self.target.clone(),
            lun: self.lun,
            capacity_bytes: self.capacity,
            block_bytes: self.block,
            io_bytes: self.o.io_bytes,
            depth: self.o.depth.max(1),
            random: self.o.random,
            header_digest: self.digests.0,
            data_digest: self.digests.1,
            phases: self.phases.clone(),
            mismatches: self.mismatches,
            first_problem: self.first_problem.clone(),
        })
    }
}

fn lun_of(lun: u16) -> u64 {
    toe_iscsi::wire::lun_field(lun)
}

/// Log in to `url` (target and LUN from the URL, LUN 0 by default) on std TCP and run what `o`
/// says, timed by the wall clock. The session is logged out at the end.
pub fn perf(url: &IscsiUrl, o: &PerfOptions) -> io::Result<PerfReport> {
    let target = url.target.clone().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "the URL names no target (iscsi://host[:port]/IQN/LUN)",
        )
    })?;
    let mut init = TcpInitiator::login(url, Some(&target))?;
    let mut m = PerfMachine::new(o.clone(), target, url.lun.unwrap_or(0));
    let t0 = std::time::Instant::now();
    let now = || t0.elapsed().as_micros() as u64;
    let mut out = Vec::new();
    let neg = init
        .conn()
        .negotiated()
        .cloned()
        .ok_or_else(|| io::Error::other("not logged in"))?;
    m.logged_in(&neg, init.conn(), &mut out);
    while !m.done() {
        if !out.is_empty() {
            init.send(&out)?;
            out.clear();
        }
        // Every phase has commands in flight until it ends, so a completion always comes.
        let e = match init.next_event() {
            Ok(e) => e,
            Err(e) => InitiatorEvent::Failed(e.to_string()),
        };
        m.on_event(e, init.conn(), now(), &mut out);
        m.poll(init.conn(), now(), &mut out);
    }
    if !out.is_empty() {
        let _ = init.send(&out);
    }
    m.report().map_err(|e| {
        let kind = if e.starts_with("--block")
            || e.contains("smaller than one I/O")
            || e.starts_with("--check")
        {
            io::ErrorKind::InvalidInput
        } else {
            io::ErrorKind::Other
        };
        io::Error::new(kind, e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pattern_of_a_block_does_not_depend_on_the_io_that_wrote_it() {
        let mut whole = vec![0u8; 4 * 512];
        pattern(7, 100, 512, &mut whole);
        let mut third = vec![0u8; 512];
        pattern(7, 102, 512, &mut third);
        assert_eq!(&whole[1024..1536], &third[..]);
        let mut other_seed = vec![0u8; 512];
        pattern(8, 102, 512, &mut other_seed);
        assert_ne!(third, other_seed);
    }

    #[test]
    fn written_slots_are_visited_once_in_order() {
        let map = [0b1010_0001u64, 1 << 63];
        let mut s = Slots::Written { next: 0 };
        let got: Vec<u64> = std::iter::from_fn(|| s.next(&map)).collect();
        assert_eq!(got, [0, 5, 7, 127]);
    }

    #[test]
    fn random_slots_stay_within_the_lun() {
        let mut s = Slots::Random { state: 3, of: 10 };
        let mut seen = [false; 10];
        for _ in 0..1000 {
            seen[s.next(&[]).unwrap() as usize] = true;
        }
        assert!(seen.iter().all(|&b| b), "{seen:?}");
    }
}
