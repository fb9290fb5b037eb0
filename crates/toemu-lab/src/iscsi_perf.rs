//! `toemu iscsi perf`: toemu's initiator as a load generator against any iSCSI target (ours,
//! tgt, ...): READ(16) or WRITE(16) of one size at a queue depth, sequential or random, for a
//! time or a byte count; IOPS, MB/s and latency percentiles. With `verify`, the writes carry
//! a pattern seeded by (seed, LBA) and every I/O slot written is read back and compared.
//!
//! The protocol is `toe-iscsi`'s [`InitiatorConn`](toe_iscsi::initiator::InitiatorConn); this
//! shell only keeps the queue full, times the commands and checks the data.

use std::collections::HashMap;
use std::io;
use std::time::Instant;

use serde::Serialize;

use crate::datagen::DataGen;
use crate::demo::{latency, Latency};
use crate::iscsi::{IscsiUrl, TcpInitiator};
use toe_iscsi::initiator::{Completion, InitiatorEvent};

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
    /// Wall-clock seconds from the first command to the last completion.
    pub seconds: f64,
    /// `ios / seconds`.
    pub iops: f64,
    /// `bytes / seconds / 1e6`.
    pub mb_per_s: f64,
    /// Command latency (issue to completion), wall-clock microseconds.
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
fn pattern(seed: u64, lba: u64, block: usize, buf: &mut [u8]) {
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
    let sense = match c.sense.as_slice() {
        // fixed format: key in byte 2, ASC/ASCQ in 12/13; descriptor: key 1, ASC/ASCQ 2/3
        [0x70 | 0x71, _, k, _, _, _, _, _, _, _, _, _, a, q, ..] => {
            format!(", sense key {:#x} ASC/ASCQ {a:02x}h/{q:02x}h", k & 0x0f)
        }
        [0x72 | 0x73, k, a, q, ..] => {
            format!(", sense key {:#x} ASC/ASCQ {a:02x}h/{q:02x}h", k & 0x0f)
        }
        _ => String::new(),
    };
    format!("status {:#04x}, response {}{sense}", c.status, c.response)
}

/// Which I/O slots a phase visits.
enum Slots<'a> {
    Sequential {
        next: u64,
        of: u64,
    },
    Random {
        state: u64,
        of: u64,
    },
    /// The slots set in a bitmap, in order.
    Written {
        map: &'a [u64],
        next: u64,
    },
}

impl Slots<'_> {
    fn next(&mut self) -> Option<u64> {
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
            Slots::Written { map, next } => {
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

/// One phase: `write` or read the slots `slots` gives at `depth`, until `stop_bytes` are
/// issued or `deadline` passes; with `written`, mark the slots written; with `check`, compare
/// what is read with the pattern.
struct Phase<'a> {
    write: bool,
    slots: Slots<'a>,
    stop_bytes: Option<u64>,
    deadline: Option<Instant>,
}

struct Run<'a> {
    init: &'a mut TcpInitiator,
    lun: u16,
    block: u32,
    io: u32,
    depth: usize,
    seed: u64,
    fua: bool,
    first_problem: Option<String>,
}

impl Run<'_> {
    /// SYNCHRONIZE CACHE(16) of the whole LUN; a failure is the run's problem.
    fn sync(&mut self) -> io::Result<()> {
        let mut cdb = [0u8; 16];
        cdb[0] = 0x91;
        let c = self.init.command(self.lun, &cdb, 0, Vec::new())?;
        if c.status != 0 || c.response != 0 {
            self.first_problem
                .get_or_insert_with(|| format!("SYNCHRONIZE CACHE(16): {}", describe(&c)));
            return Err(io::Error::other(format!(
                "SYNCHRONIZE CACHE(16): {}",
                describe(&c)
            )));
        }
        Ok(())
    }

    fn phase(
        &mut self,
        mut p: Phase<'_>,
        mut written: Option<&mut [u64]>,
        mut mismatches: Option<&mut u64>,
    ) -> io::Result<PhaseReport> {
        let blocks = self.io / self.block;
        let mut inflight: HashMap<u32, (u64, Instant)> = HashMap::new();
        let mut lat = Vec::new();
        let (mut issued, mut ios, mut errors) = (0u64, 0u64, 0u64);
        let mut buf = vec![0u8; self.io as usize];
        let mut out = Vec::new();
        let mut done = false;
        let t0 = Instant::now();
        loop {
            while !done && inflight.len() < self.depth {
                let more = p.stop_bytes.is_none_or(|b| issued < b)
                    && p.deadline.is_none_or(|d| Instant::now() < d);
                let Some(slot) = more.then(|| p.slots.next()).flatten() else {
                    done = true;
                    break;
                };
                let lba = slot * u64::from(blocks);
                let cdb = rw16(p.write, self.fua, lba, blocks);
                let data = if p.write {
                    pattern(self.seed, lba, self.block as usize, &mut buf);
                    buf.clone()
                } else {
                    Vec::new()
                };
                let lun = toe_iscsi::wire::lun_field(self.lun);
                let tag = self.init.conn().command(lun, &cdb, self.io, data, &mut out);
                inflight.insert(tag, (slot, Instant::now()));
                issued += u64::from(self.io);
            }
            if !out.is_empty() {
                self.init.send(&out)?;
                out.clear();
            }
            if inflight.is_empty() {
                break;
            }
            let c = match self.init.next_event()? {
                InitiatorEvent::Done(c) => c,
                other => return Err(io::Error::other(format!("unexpected {other:?}"))),
            };
            let Some((slot, at)) = inflight.remove(&c.itt) else {
                return Err(io::Error::other(format!(
                    "completion of unknown tag {}",
                    c.itt
                )));
            };
            lat.push(at.elapsed().as_secs_f64() * 1e6);
            ios += 1;
            let lba = slot * u64::from(blocks);
            let short = !p.write && c.data.len() != self.io as usize;
            if c.status != 0 || c.response != 0 || short {
                errors += 1;
                self.first_problem.get_or_insert_with(|| {
                    format!(
                        "{} at LBA {lba}: {}{}",
                        if p.write { "WRITE(16)" } else { "READ(16)" },
                        describe(&c),
                        if short {
                            format!(", {} data bytes", c.data.len())
                        } else {
                            String::new()
                        }
                    )
                });
                continue;
            }
            if let Some(map) = written.as_deref_mut() {
                map[(slot / 64) as usize] |= 1 << (slot % 64);
            }
            if let Some(bad) = mismatches.as_deref_mut() {
                pattern(self.seed, lba, self.block as usize, &mut buf);
                if c.data != buf {
                    *bad += 1;
                    let at = c
                        .data
                        .iter()
                        .zip(&buf)
                        .position(|(a, b)| a != b)
                        .unwrap_or(0);
                    self.first_problem.get_or_insert_with(|| {
                        format!("read-back of LBA {lba}: byte {at} of the I/O differs from what was written")
                    });
                }
            }
        }
        let seconds = t0.elapsed().as_secs_f64();
        let bytes = ios * u64::from(self.io);
        Ok(PhaseReport {
            op: if p.write { "write" } else { "read" },
            ios,
            bytes,
            seconds,
            iops: ios as f64 / seconds.max(1e-9),
            mb_per_s: bytes as f64 / seconds.max(1e-9) / 1e6,
            latency_us: latency(lat),
            errors,
        })
    }
}

/// Log in to `url` (target and LUN from the URL, LUN 0 by default), read the capacity, and
/// run what `o` says. The session is logged out at the end.
pub fn perf(url: &IscsiUrl, o: &PerfOptions) -> io::Result<PerfReport> {
    let bad = |m: String| io::Error::new(io::ErrorKind::InvalidInput, m);
    let target = url
        .target
        .clone()
        .ok_or_else(|| bad("the URL names no target (iscsi://host[:port]/IQN/LUN)".into()))?;
    let lun = url.lun.unwrap_or(0);
    let mut init = TcpInitiator::login(url, Some(&target))?;
    let mut cdb = [0u8; 16];
    cdb[0] = 0x9e;
    cdb[1] = 0x10;
    cdb[13] = 32;
    let rc = init.command(lun, &cdb, 32, Vec::new())?;
    if rc.status != 0 || rc.data.len() < 12 {
        return Err(io::Error::other(format!(
            "READ CAPACITY(16): {}",
            describe(&rc)
        )));
    }
    let last = u64::from_be_bytes(rc.data[..8].try_into().expect("8 bytes"));
    let block = u32::from_be_bytes(rc.data[8..12].try_into().expect("4 bytes"));
    let capacity = (last + 1) * u64::from(block);
    if o.io_bytes == 0 || o.io_bytes % block != 0 {
        return Err(bad(format!(
            "--block {}: not a multiple of the LUN's {block}-byte blocks",
            o.io_bytes
        )));
    }
    let of = capacity / u64::from(o.io_bytes);
    if of == 0 {
        return Err(bad(format!(
            "the LUN ({capacity} bytes) is smaller than one I/O"
        )));
    }
    let (header_digest, data_digest) = init
        .conn()
        .negotiated()
        .map(|n| (n.header_digest, n.data_digest))
        .unwrap_or_default();
    let mut run = Run {
        init: &mut init,
        lun,
        block,
        io: o.io_bytes,
        depth: o.depth.max(1),
        seed: o.seed,
        fua: o.fua,
        first_problem: None,
    };
    let slots = if o.random {
        Slots::Random {
            state: o.seed | 1,
            of,
        }
    } else {
        Slots::Sequential { next: 0, of }
    };
    let timed = Phase {
        write: (o.write || o.verify) && !o.check_only,
        slots,
        stop_bytes: o.bytes,
        deadline: o
            .bytes
            .is_none()
            .then(|| Instant::now() + std::time::Duration::from_secs_f64(o.seconds)),
    };
    let mut phases = Vec::new();
    let mut mismatches = None;
    if o.verify || o.check_only {
        let mut map = vec![0u64; of.div_ceil(64) as usize];
        if o.check_only {
            // The slots the write run visited: the same sequence, as many I/Os as it issued.
            let bytes = o.bytes.ok_or_else(|| bad("--check needs --bytes".into()))?;
            let mut slots = timed.slots;
            for _ in 0..bytes.div_ceil(u64::from(o.io_bytes)) {
                let s = slots.next().expect("write slots never run out");
                map[(s / 64) as usize] |= 1 << (s % 64);
            }
        } else {
            phases.push(run.phase(timed, Some(&mut map), None)?);
            if o.sync {
                run.sync()?;
            }
        }
        let mut bad = 0;
        let back = Phase {
            write: false,
            slots: Slots::Written { map: &map, next: 0 },
            stop_bytes: None,
            deadline: None,
        };
        phases.push(run.phase(back, None, Some(&mut bad))?);
        mismatches = Some(bad);
    } else {
        let write = timed.write;
        phases.push(run.phase(timed, None, None)?);
        if write && o.sync {
            run.sync()?;
        }
    }
    let first_problem = run.first_problem.take();
    init.logout()?;
    Ok(PerfReport {
        target,
        lun,
        capacity_bytes: capacity,
        block_bytes: block,
        io_bytes: o.io_bytes,
        depth: o.depth.max(1),
        random: o.random,
        header_digest,
        data_digest,
        phases,
        mismatches,
        first_problem,
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
        let mut s = Slots::Written { map: &map, next: 0 };
        let got: Vec<u64> = std::iter::from_fn(|| s.next()).collect();
        assert_eq!(got, [0, 5, 7, 127]);
    }

    #[test]
    fn random_slots_stay_within_the_lun() {
        let mut s = Slots::Random { state: 3, of: 10 };
        let mut seen = [false; 10];
        for _ in 0..1000 {
            seen[s.next().unwrap() as usize] = true;
        }
        assert!(seen.iter().all(|&b| b), "{seen:?}");
    }
}
