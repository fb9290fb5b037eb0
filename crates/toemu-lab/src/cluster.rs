//! Proxy I/O in a target cluster (seed 001) on emulated TOE hosts.
//!
//! Each member is one machine with two NICs on one host memory ([`Host::second_nic`]):
//! the front NIC faces initiators (seed 001's first I/O controller), the back NIC the other
//! members (the second). Front NICs share one in-memory switch with the initiator, back
//! NICs another. Every member serves its own LUN on both NICs (port 3260); the primary
//! (member 0) also serves the volume on its front NIC (port [`VOLUME_PORT`]), whose
//! extents the LBA map spreads over the members.
//!
//! The primary's front target runs in proxy mode ([`TargetApp::with_proxy`]): the READs
//! and WRITEs it admits go through the [`Hub`] to the [`ProxyApp`] on the back NIC, which
//! splits them by the map ([`Primary`]), runs the primary's own pieces on its disk, sends
//! the others over its back sessions (one per member, our initiator with the NIC's iSCSI
//! engine) under the proxy task IDs, and hands the merged answer back; the front target
//! sends the data as Data-In of the initiator's MaxRecvDataSegmentLength under the
//! initiator's ITT. A member that does not answer within the member timeout fails its
//! commands with CHECK CONDITION (and its back session is dropped and dialled again).
//!
//! Addresses: the initiator is 10.0.0.1, member `m`'s front NIC 10.0.0.(10 + m) and its
//! back NIC 10.0.0.(100 + m).

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::Ipv4Addr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use toe_bus::time::Instant;
use toe_bus::{HostBuf, HostMemory};
use toe_driver::{Driver, SharedDriver};
use toe_host::config::Settings;
use toe_host::runtime::{Host, Sim, Threaded};
use toe_iscsi::initiator::InitiatorEvent;
use toe_iscsi::login::TargetConfig;
use toe_iscsi::proxy::{BackTag, BackTask, Extent, FrontTag, LbaMap, Primary};
use toe_iscsi::scsi::{Disk, MemStore, Outcome, Sense, CHECK_CONDITION};
use toe_iscsi::target::{ProxyEvent, TargetConn};
use toe_iscsi::transport::Transport;
use toe_nic::SwitchControl;
use toemu_apps::App;

use crate::iscsi::IscsiUrl;
use crate::iscsi_host::{seeded_random, InitiatorLink, LinkState, TargetApp};

/// The port of the volume on the primary's front NIC (members' own LUNs are on 3260).
pub const VOLUME_PORT: u16 = 3261;

/// The volume's target name.
pub const VOLUME_IQN: &str = "iqn.2026-12.org.toemu:volume";

/// The target name of member `m`'s own LUN.
pub fn member_iqn(m: usize) -> String {
    format!("iqn.2026-12.org.toemu:member{m}")
}

/// A cluster's layout, as read from the `[cluster]` table of a TOML file (`toemu iscsi
/// cluster --config FILE`; the file's other keys are host settings).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Members, the primary (member 0) included (1 ..= 16).
    pub members: usize,
    /// Block size of every LUN, bytes.
    #[serde(default = "default_block")]
    pub block_bytes: u32,
    /// Size of each member's LUN, blocks.
    pub member_blocks: u64,
    /// The volume striped over all members in stripes of this many blocks (when
    /// `extents` is not given).
    #[serde(default = "default_stripe")]
    pub stripe_blocks: u64,
    /// The volume's extents, explicitly (they must tile it from block 0).
    #[serde(default)]
    pub extents: Option<Vec<Extent>>,
    /// A member that does not answer a proxied request within this time fails it with
    /// CHECK CONDITION, ms.
    #[serde(default = "default_timeout")]
    pub member_timeout_ms: u64,
}

fn default_block() -> u32 {
    512
}

fn default_stripe() -> u64 {
    2048
}

fn default_timeout() -> u64 {
    toe_iscsi::proxy::DEFAULT_MEMBER_TIMEOUT_US / 1000
}

impl ClusterConfig {
    /// Read and check the `[cluster]` table of a TOML file.
    pub fn from_file(path: &std::path::Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::from_toml(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parse and check the `[cluster]` table of TOML `text`.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        #[derive(serde::Deserialize)]
        struct File {
            cluster: Option<ClusterConfig>,
        }
        let f: File = toml::from_str(text).map_err(|e| e.to_string())?;
        let c = f.cluster.ok_or("no [cluster] table")?;
        c.map()?;
        Ok(c)
    }

    /// The volume's LBA map; checks the configuration.
    pub fn map(&self) -> Result<LbaMap, String> {
        if !(1..=16).contains(&self.members) {
            return Err(format!("members = {}: 1 ..= 16", self.members));
        }
        if self.block_bytes < 512 || !self.block_bytes.is_power_of_two() {
            return Err(format!(
                "block_bytes = {}: a power of two >= 512",
                self.block_bytes
            ));
        }
        let map = match &self.extents {
            Some(e) => LbaMap::new(e.clone(), self.members),
            None => LbaMap::striped(self.members, self.member_blocks, self.stripe_blocks),
        }
        .map_err(|e| e.to_string())?;
        for e in map.extents() {
            if e.member_lba + e.blocks > self.member_blocks {
                return Err(format!(
                    "the extent at volume block {} ends past member {}'s {} blocks",
                    e.lba, e.member, self.member_blocks
                ));
            }
        }
        Ok(map)
    }

    /// Bytes of one member's LUN.
    pub fn member_bytes(&self) -> usize {
        (self.member_blocks * u64::from(self.block_bytes)) as usize
    }
}

/// What passes between the primary's front target and its proxy (both sides lock it
/// briefly each pass). Bounded: the front connections bound their proxied commands.
///
/// Data in host memory passes through it as it is: a proxied write's data from the front
/// connection to the back session that sends it on, a one-piece read's data from the back
/// session that received it to the front connection. Front and back NICs share the
/// primary's host memory, so the buffer is handed over, not copied.
#[derive(Debug)]
pub struct Hub {
    primary: Primary,
    /// The proxy's counters (kept here, where both sides and the caller reach them).
    pub stats: ProxyStats,
    /// Back sessions logged in now.
    pub backs_up: usize,
    to_back: VecDeque<(u64, ProxyEvent)>,
    answers: HashMap<u64, Vec<Answer>>,
    ended: Vec<u64>,
    /// The primary's host memory (both its NICs').
    mem: Arc<HostMemory>,
    /// Proxied writes' data in host memory, from the front connection until a back
    /// session sends it (or the primary's own disk takes it).
    writes: HashMap<FrontTag, HostBuf>,
}

/// The answer to a proxied command, for its front connection.
#[derive(Debug)]
pub struct Answer {
    /// The initiator's task tag.
    pub itt: u32,
    /// Status, sense, and a read's data unless it is in `host`.
    pub outcome: Outcome,
    /// A read's data in host memory: the buffer and how many of its first bytes count.
    pub host: Option<(HostBuf, usize)>,
}

/// A [`Hub`] shared by the two apps.
pub type SharedHub = Arc<Mutex<Hub>>;

impl Hub {
    /// A hub for the primary's proxy `primary`, on the primary's host memory `mem`.
    pub fn new(primary: Primary, mem: Arc<HostMemory>) -> SharedHub {
        Arc::new(Mutex::new(Hub {
            primary,
            stats: ProxyStats::default(),
            backs_up: 0,
            to_back: VecDeque::new(),
            answers: HashMap::new(),
            ended: Vec::new(),
            mem,
            writes: HashMap::new(),
        }))
    }

    /// Requests of front connection `conn` (machine `c`) for the proxy, with the data of
    /// its writes that is in host memory.
    pub fn from_front<T: Transport>(&mut self, conn: u64, c: &mut TargetConn<T>) {
        let events: Vec<ProxyEvent> = c.take_proxy_events().collect();
        for e in events {
            if let ProxyEvent::Command(r) = &e {
                if let Some(b) = r.in_host.then(|| c.take_host_write(r.itt)).flatten() {
                    let front = FrontTag { conn, itt: r.itt };
                    if let Some(old) = self.writes.insert(front, b) {
                        self.mem.free(old);
                    }
                }
            }
            self.to_back.push_back((conn, e));
        }
    }

    /// The answers for front connection `conn`.
    pub fn take_answers(&mut self, conn: u64) -> Vec<Answer> {
        self.answers.remove(&conn).unwrap_or_default()
    }

    /// Whether answers wait for any front connection.
    pub fn has_answers(&self) -> bool {
        !self.answers.is_empty()
    }

    /// Front connection `conn` ended: its commands are forgotten.
    pub fn front_ended(&mut self, conn: u64) {
        self.ended.push(conn);
    }

    fn answer(&mut self, front: FrontTag, o: Outcome) {
        self.answer_host(front, o, None);
    }

    fn answer_host(&mut self, front: FrontTag, outcome: Outcome, host: Option<(HostBuf, usize)>) {
        self.answers.entry(front.conn).or_default().push(Answer {
            itt: front.itt,
            outcome,
            host,
        });
    }

    /// Drop the answers waiting for front connection `conn`, and its write data.
    fn forget(&mut self, conn: u64) {
        for a in self.answers.remove(&conn).unwrap_or_default() {
            if let Some((b, _)) = a.host {
                self.mem.free(b);
            }
        }
        let fronts: Vec<FrontTag> = self
            .writes
            .keys()
            .filter(|f| f.conn == conn)
            .copied()
            .collect();
        for f in fronts {
            self.drop_write(f);
        }
    }

    /// Free the write data of `front` in host memory, if any.
    fn drop_write(&mut self, front: FrontTag) {
        if let Some(b) = self.writes.remove(&front) {
            self.mem.free(b);
        }
    }

    fn copy_out(&self, b: HostBuf, len: usize) -> Vec<u8> {
        copy_out(&self.mem, b, len)
    }
}

/// The first `len` bytes of `b` (all of it if shorter) copied out of host memory `mem`
/// (counted), the buffer freed: where data handed over in host memory must go the
/// ordinary way.
pub(crate) fn copy_out(mem: &HostMemory, b: HostBuf, len: usize) -> Vec<u8> {
    let v = mem.slice(&b)[..len.min(b.len())].to_vec();
    mem.count_copy_out(v.len());
    mem.free(b);
    v
}

/// Answers dropped with the hub give their buffers back.
impl Drop for Hub {
    fn drop(&mut self) {
        let conns: Vec<u64> = self.answers.keys().copied().collect();
        for c in conns {
            self.forget(c);
        }
        for (_, b) in self.writes.drain() {
            self.mem.free(b);
        }
    }
}

/// How a back session stands.
enum Back {
    /// Connecting or logged in.
    Link(Box<InitiatorLink>),
    /// Dropped after the member failed to answer; dialled again at this time, µs.
    Down(u64),
}

/// The primary's back side: the proxy initiator's sessions to the other members, and the
/// primary's own pieces run on its disk.
pub struct ProxyApp {
    hub: SharedHub,
    disk: Arc<Mutex<Disk>>,
    me: usize,
    /// Per member (`None` for the primary itself): its back session.
    backs: Vec<Option<Back>>,
    /// Per member: back tasks waiting to be sent (the session is logging in).
    pending: Vec<VecDeque<BackTask>>,
    /// Per member: task management to send (function, referenced back ITT).
    tmf: Vec<Vec<(u8, u32)>>,
    urls: Vec<Option<IscsiUrl>>,
    seed: u64,
    local_itt: u32,
    /// Copies counted by back sessions that were dropped.
    retired_copy_bytes: u64,
    /// Counters (copied to the hub after each pass).
    stats: ProxyStats,
    log: Vec<String>,
}

/// What the proxy did. Counts only grow.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct ProxyStats {
    /// Front commands proxied.
    pub commands: u64,
    /// Pieces run on the primary's own disk.
    pub local_pieces: u64,
    /// Pieces sent to members.
    pub member_pieces: u64,
    /// Bytes members sent the primary for reads.
    pub member_read_bytes: u64,
    /// Pieces failed because their member did not answer (timeout, broken session).
    pub member_failures: u64,
    /// Task management requests forwarded.
    pub tmf_forwarded: u64,
    /// Back sessions dropped and dialled again.
    pub redials: u64,
    /// Data bytes the proxy copied in application memory: its back sessions' transports
    /// ([`toe_iscsi::transport::Transport::copy_bytes`]) and [`Primary::copy_bytes`].
    /// Copies into and out of host memory are the memory's own count.
    pub copy_bytes: u64,
}

impl ProxyApp {
    /// The proxy of member `me`, with its own LUN `disk`, dialling each other member's
    /// back address (`backs[m]`, port 3260) with our initiator.
    pub fn new(
        hub: SharedHub,
        disk: Arc<Mutex<Disk>>,
        me: usize,
        backs: &[Ipv4Addr],
        digests: bool,
        seed: u64,
    ) -> Result<Self, String> {
        let q = if digests {
            "?header_digest=crc32c&data_digest=crc32c"
        } else {
            ""
        };
        let urls = backs
            .iter()
            .enumerate()
            .map(|(m, a)| {
                (m != me)
                    .then(|| format!("iscsi://{a}:3260/{}/0{q}", member_iqn(m)).parse())
                    .transpose()
            })
            .collect::<Result<Vec<Option<IscsiUrl>>, String>>()?;
        let n = backs.len();
        let mut p = ProxyApp {
            hub,
            disk,
            me,
            backs: (0..n).map(|_| None).collect(),
            pending: vec![VecDeque::new(); n],
            tmf: vec![Vec::new(); n],
            urls,
            seed,
            local_itt: 0,
            retired_copy_bytes: 0,
            stats: ProxyStats::default(),
            log: Vec::new(),
        };
        for m in 0..n {
            p.dial(m)?;
        }
        Ok(p)
    }

    fn dial(&mut self, m: usize) -> Result<(), String> {
        if let Some(url) = &self.urls[m] {
            let random = seeded_random(self.seed ^ (m as u64 + 1) << 20 ^ self.stats.redials);
            self.backs[m] = Some(Back::Link(Box::new(InitiatorLink::new(url, random)?)));
        }
        Ok(())
    }

    /// Member `m` is down: what waits for it fails now, its session goes, and it is
    /// dialled again in a second.
    fn member_down(&mut self, m: usize, d: &mut Driver, now_us: u64, hub: &mut Hub) {
        self.fail_waiting(m, hub);
        if let Some(Back::Link(l)) = self.backs[m].take() {
            self.retired_copy_bytes += l.init.as_ref().map_or(0, |i| i.copy_bytes());
            l.abort(d);
            self.log.push(format!(
                "iscsi-proxy: member {m} does not answer; its session is dropped ({})",
                l.summary()
            ));
        }
        self.stats.redials += 1;
        self.backs[m] = Some(Back::Down(now_us + 1_000_000));
    }

    /// Every piece out on member `m` or waiting for it fails now with CHECK CONDITION.
    fn fail_waiting(&mut self, m: usize, hub: &mut Hub) {
        let mut failed = hub.primary.fail_member(m);
        let sense = Sense::MEMBER_UNREACHABLE.bytes(false);
        for t in self.pending[m].drain(..) {
            hub.drop_write(t.front);
            // Not sent yet: answered as a back task of its own.
            self.local_itt = self.local_itt.wrapping_add(1);
            let tag = BackTag {
                member: m,
                itt: self.local_itt | 1 << 31,
            };
            hub.primary.bind(tag, t.front, t.piece);
            failed.extend(
                hub.primary
                    .answer(tag, CHECK_CONDITION, sense.clone(), Vec::new(), 0),
            );
        }
        self.tmf[m].clear();
        self.stats.member_failures += failed.len() as u64;
        for (f, o) in failed {
            hub.answer(f, o);
        }
    }

    /// Take the front's requests: pieces to members queue, the primary's own run now.
    fn take_requests(&mut self, hub: &mut Hub, now_us: u64) {
        while let Some((conn, e)) = hub.to_back.pop_front() {
            match e {
                ProxyEvent::Command(r) => {
                    let front = FrontTag { conn, itt: r.itt };
                    self.stats.commands += 1;
                    let mut data = r.data;
                    if r.in_host {
                        let Some(b) = hub.writes.remove(&front) else {
                            // Said to be in host memory but not handed over: not written.
                            hub.answer(front, Outcome::check(Sense::WRITE_ERROR));
                            continue;
                        };
                        let one = hub
                            .primary
                            .map()
                            .split(r.range.lba, r.range.blocks)
                            .is_ok_and(|p| p.len() == 1);
                        if one {
                            // One piece: the buffer goes to the member (or the disk) as is.
                            hub.writes.insert(front, b);
                        } else {
                            // Cut into pieces by the primary: out of host memory first.
                            data = hub.copy_out(b, usize::MAX);
                        }
                    }
                    match hub.primary.start(front, r.range, data, now_us) {
                        Err(o) => {
                            hub.drop_write(front);
                            hub.answer(front, o)
                        }
                        Ok(tasks) => {
                            for t in tasks {
                                if t.member == self.me {
                                    self.run_local(hub, t);
                                } else {
                                    self.stats.member_pieces += 1;
                                    self.pending[t.member].push_back(t);
                                }
                            }
                        }
                    }
                }
                ProxyEvent::Abort { itt } => {
                    hub.drop_write(FrontTag { conn, itt });
                    for b in hub.primary.abort(FrontTag { conn, itt }) {
                        self.tmf[b.member].push((1, b.itt));
                    }
                }
                ProxyEvent::Reset { function } => {
                    for t in self.tmf.iter_mut() {
                        t.push((function, 0));
                    }
                }
            }
        }
        for conn in std::mem::take(&mut hub.ended) {
            hub.forget(conn);
            for b in hub.primary.forget_conn(conn) {
                self.tmf[b.member].push((1, b.itt));
            }
        }
    }

    /// A piece on the primary's own disk, run at once.
    fn run_local(&mut self, hub: &mut Hub, t: BackTask) {
        self.stats.local_pieces += 1;
        self.local_itt = self.local_itt.wrapping_add(1);
        let tag = BackTag {
            member: self.me,
            itt: self.local_itt,
        };
        hub.primary.bind(tag, t.front, t.piece);
        // A write's data in host memory goes to the disk from there.
        let held = hub.writes.remove(&t.front);
        let data = held.as_ref().map_or(&t.data[..], |b| hub.mem.slice(b));
        let o = self.disk.lock().expect("disk lock").execute(&t.cdb, data);
        if let Some(b) = held {
            hub.mem.free(b);
        }
        let sense = o.sense.map(|s| s.bytes(false)).unwrap_or_default();
        if let Some((f, o)) = hub.primary.answer(tag, o.status, sense, o.data_in, 0) {
            hub.answer(f, o);
        }
    }

    fn serve(&mut self, d: &mut Driver, now: Instant) -> io::Result<bool> {
        let us = now.total_micros() as u64;
        let hub = self.hub.clone();
        let mut hub = hub.lock().expect("hub lock");
        let mut busy = !hub.to_back.is_empty();
        self.take_requests(&mut hub, us);
        for m in 0..self.backs.len() {
            match &mut self.backs[m] {
                None => continue,
                Some(Back::Down(at)) => {
                    if us >= *at {
                        self.dial(m).map_err(io::Error::other)?;
                        busy = true;
                    } else {
                        // Nothing is sent to a member that is down: it fails at once
                        // (and the redial stays due when it was).
                        if !self.pending[m].is_empty() {
                            self.fail_waiting(m, &mut hub);
                            busy = true;
                        }
                        continue;
                    }
                }
                Some(Back::Link(_)) => {}
            }
            let Some(Back::Link(link)) = &mut self.backs[m] else {
                continue;
            };
            let (pending, tmf, stats, log) = (
                &mut self.pending[m],
                &mut self.tmf[m],
                &mut self.stats,
                &mut self.log,
            );
            let h = &mut *hub;
            let mut broken = false;
            let (state, b) = link.pump(d, now, |init, _us, _out| {
                let up = init.negotiated().is_some();
                // Read data stays in host memory, for the front connection to send on.
                init.hand_over_reads(true);
                while let Some(e) = init.poll_event() {
                    match e {
                        InitiatorEvent::Done(c) => {
                            let tag = BackTag {
                                member: m,
                                itt: c.itt,
                            };
                            let mut held = init.take_host_read(c.itt);
                            stats.member_read_bytes +=
                                (c.data.len() + held.as_ref().map_or(0, |h| h.1)) as u64;
                            let residual = if c.underflow { c.residual } else { 0 };
                            let data = match held.take() {
                                // The whole answer: handed to the front as it is.
                                Some(hd) if h.primary.one_piece(tag) => {
                                    held = Some(hd);
                                    Vec::new()
                                }
                                // One of several pieces: gathered by the primary.
                                Some((b, n)) => h.copy_out(b, n),
                                None => c.data,
                            };
                            match h.primary.answer(tag, c.status, c.sense, data, residual) {
                                Some((f, o)) => h.answer_host(f, o, held),
                                None => {
                                    if let Some((b, _)) = held {
                                        h.mem.free(b);
                                    }
                                }
                            }
                        }
                        InitiatorEvent::LoggedIn(_) => {
                            log.push(format!("iscsi-proxy: back session to member {m} up"))
                        }
                        InitiatorEvent::LoginFailed(e) => {
                            log.push(format!("iscsi-proxy: login to member {m} failed: {e:?}"));
                            broken = true;
                        }
                        InitiatorEvent::Failed(e) => {
                            log.push(format!("iscsi-proxy: back session to member {m}: {e}"));
                            broken = true;
                        }
                        InitiatorEvent::TaskMgmt { .. }
                        | InitiatorEvent::Text { .. }
                        | InitiatorEvent::LoggedOut => {}
                    }
                }
                if !up {
                    return;
                }
                for (function, r) in tmf.drain(..) {
                    stats.tmf_forwarded += 1;
                    init.task_mgmt(function, 0, r);
                }
                while let Some(t) = pending.pop_front() {
                    if !h.primary.contains(t.front) {
                        h.drop_write(t.front);
                        continue; // aborted, or expired, while it waited
                    }
                    let itt = match h.writes.remove(&t.front) {
                        // A one-piece write's data, sent from host memory as it is.
                        Some(b) => match init.submit_host(0, &t.cdb, b) {
                            Ok(itt) => itt,
                            Err(b) => {
                                let v = h.copy_out(b, usize::MAX);
                                init.submit(0, &t.cdb, 0, v)
                            }
                        },
                        None => init.submit(0, &t.cdb, t.read_len, t.data),
                    };
                    h.primary.bind(BackTag { member: m, itt }, t.front, t.piece);
                }
            })?;
            busy |= b;
            if broken || state == LinkState::Broken {
                self.member_down(m, d, us, &mut hub);
                busy = true;
            }
        }
        let (expired, late) = hub.primary.expire(us);
        busy |= !expired.is_empty();
        self.stats.member_failures += expired.len() as u64;
        for (f, o) in expired {
            hub.answer(f, o);
        }
        for m in late {
            if m != self.me {
                self.member_down(m, d, us, &mut hub);
            }
        }
        let live: u64 = self
            .backs
            .iter()
            .flatten()
            .filter_map(|b| match b {
                Back::Link(l) => l.init.as_ref().map(|i| i.copy_bytes()),
                Back::Down(_) => None,
            })
            .sum();
        self.stats.copy_bytes = self.retired_copy_bytes + live + hub.primary.copy_bytes();
        hub.stats = self.stats;
        hub.backs_up = self
            .backs
            .iter()
            .flatten()
            .filter(|b| match b {
                Back::Link(l) => l.init.as_ref().is_some_and(|i| i.negotiated().is_some()),
                Back::Down(_) => false,
            })
            .count();
        Ok(busy)
    }
}

impl App for ProxyApp {
    fn name(&self) -> &'static str {
        "iscsi-proxy"
    }

    fn poll(&mut self, d: &mut Driver, now: Instant) -> io::Result<bool> {
        self.serve(d, now)
    }

    fn take_log(&mut self) -> Vec<String> {
        std::mem::take(&mut self.log)
    }

    fn poll_at(&self) -> Option<Instant> {
        let hub = self.hub.lock().expect("hub lock");
        let links = self.backs.iter().flatten().filter_map(|b| match b {
            Back::Link(l) => l.init.as_ref().and_then(|i| i.next_deadline()),
            Back::Down(at) => Some(*at),
        });
        let t = links.chain(hub.primary.next_deadline()).min()?;
        Some(Instant::from_micros(t as i64))
    }
}

/// A cluster on the virtual clock: the initiator's host and every member's two NICs.
pub struct Cluster {
    /// The hosts: 0 the initiator, then each member's front NIC, then each back NIC.
    pub sim: Sim,
    /// What runs on them.
    pub servers: Servers,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("config", &self.servers.config)
            .finish()
    }
}

/// Member `m`'s front address.
pub fn front_addr(m: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 0, 10 + m as u8)
}

/// Member `m`'s back address.
pub fn back_addr(m: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 0, 100 + m as u8)
}

fn nic(i: u8, ip: Ipv4Addr, seed: u64) -> toe_nic::NicConfig {
    toe_nic::NicConfig {
        mac: [0x02, 0, 0, 0, 1, i],
        ip,
        seed: seed.wrapping_mul(31).wrapping_add(u64::from(i)),
        ..toe_nic::NicConfig::default()
    }
}

/// The parts of a cluster before a runtime takes its hosts: [`Cluster::new`] puts them on
/// the virtual clock, [`run_realtime`] in real time.
pub struct Parts {
    /// The hosts: 0 the initiator, then each member's front NIC, then each back NIC.
    pub hosts: Vec<Host>,
    /// What runs on them.
    pub servers: Servers,
}

/// A cluster's layout, disks, cables and server apps (whichever runtime has its hosts).
pub struct Servers {
    /// The layout.
    pub config: ClusterConfig,
    /// Each member's own LUN.
    pub disks: Vec<Arc<Mutex<Disk>>>,
    /// The cables of the front switch (port 0 the initiator, `1 + m` member `m`).
    pub front: SwitchControl,
    /// The cables of the back switch (port `m` member `m`).
    pub back: SwitchControl,
    /// The servers: (host index, app).
    pub apps: Vec<(usize, Box<dyn App>)>,
    /// The hub between the primary's front target and its proxy.
    pub hub: SharedHub,
    /// The copy counters ([`TargetApp::copy_counter`]) of each member's own-LUN target
    /// on its front NIC, then of the volume's target.
    pub copies: Vec<Arc<AtomicU64>>,
}

/// The primary's front NIC on a port of its own (a TAP device for real clients) instead
/// of the in-memory front switch.
pub struct FrontPort {
    /// Its identity (address, prefix, gateway).
    pub nic: toe_nic::NicConfig,
    /// The port.
    pub phy: toe_host::runtime::BoxPhy,
}

/// Build the cluster `config` on `settings`, with header and data digests on the back
/// sessions if `digests`. Host 0 is the initiator's (10.0.0.1), nothing running on it.
/// With `primary_front`, the primary's front NIC is on that port (its address there
/// serves the volume and member 0's own LUN); otherwise on the front switch at
/// [`front_addr`]`(0)`.
pub fn build(
    settings: &Settings,
    config: &ClusterConfig,
    digests: bool,
    seed: u64,
    primary_front: Option<FrontPort>,
) -> io::Result<Parts> {
    let map = config.map().map_err(io::Error::other)?;
    let n = config.members;
    let other = |e: toe_host::runtime::HostError| io::Error::other(e.to_string());
    let (mut fronts, front) = toe_nic::switch(n + 1, 4096);
    let (mut backs, back) = toe_nic::switch(n, 4096);
    let now = Instant::from_micros(0);
    let mut hosts = Vec::new();
    fronts.reverse();
    backs.reverse();
    let port = |p: toe_nic::SwitchPort| -> toe_host::runtime::BoxPhy { Box::new(p) };
    hosts.push(
        Host::new(
            "initiator",
            settings,
            nic(1, Ipv4Addr::new(10, 0, 0, 1), seed),
            port(fronts.pop().expect("port")),
            now,
        )
        .map_err(other)?,
    );
    let mut primary_front = primary_front;
    let primary_addr = primary_front.as_ref().map_or(front_addr(0), |f| f.nic.ip);
    for m in 0..n {
        let switch_port = fronts.pop().expect("port");
        let (cfg, phy) = match primary_front.take().filter(|_| m == 0) {
            // The switch's port stays unplugged (frames flooded to it are dropped).
            Some(f) => (f.nic, f.phy),
            None => (nic(10 + m as u8, front_addr(m), seed), port(switch_port)),
        };
        hosts.push(Host::new(&format!("m{m}-front"), settings, cfg, phy, now).map_err(other)?);
    }
    for m in 0..n {
        let h = hosts[1 + m]
            .second_nic(
                &format!("m{m}-back"),
                settings,
                nic(100 + m as u8, back_addr(m), seed),
                port(backs.pop().expect("port")),
                now,
            )
            .map_err(other)?;
        hosts.push(h);
    }
    for h in &mut hosts {
        h.nic
            .add_engine(Arc::new(toe_iscsi::engine::IscsiEngineFactory));
    }
    let disks: Vec<Arc<Mutex<Disk>>> = (0..n)
        .map(|m| {
            Arc::new(Mutex::new(Disk::new(
                Box::new(MemStore::new(config.member_bytes())),
                config.block_bytes,
                &format!("TOEMUM{m:03}"),
            )))
        })
        .collect();
    let listen = |hosts: &[Host], i: usize, port: u16| {
        hosts[i]
            .driver
            .lock()
            .listen(port, 16, None)
            .map_err(|e| io::Error::other(e.to_string()))
    };
    let mut apps: Vec<(usize, Box<dyn App>)> = Vec::new();
    let mut copies = Vec::new();
    for (m, disk) in disks.iter().enumerate() {
        let front = if m == 0 { primary_addr } else { front_addr(m) };
        for (host, addr) in [(1 + m, front), (1 + n + m, back_addr(m))] {
            listen(&hosts, host, 3260)?;
            let app = TargetApp::new(
                3260,
                TargetConfig::offering_digests(&member_iqn(m)),
                &format!("{addr}:3260"),
                disk.clone(),
                seed ^ (host as u64) << 8,
            );
            if host == 1 + m {
                copies.push(app.copy_counter());
            }
            apps.push((host, Box::new(app)));
        }
    }
    // The volume: its capacity, inquiry data and reservations on the primary; its
    // blocks on the members (the placeholder medium is never read or written).
    let volume = Arc::new(Mutex::new(Disk::new(
        Box::new(Placeholder(map.blocks() * u64::from(config.block_bytes))),
        config.block_bytes,
        "TOEMUVOL1",
    )));
    let primary = Primary::new(map, 0, config.block_bytes, config.member_timeout_ms * 1000);
    let hub = Hub::new(primary, hosts[1].driver.lock().memory().clone());
    listen(&hosts, 1, VOLUME_PORT)?;
    let front_app = TargetApp::new(
        VOLUME_PORT,
        TargetConfig::offering_digests(VOLUME_IQN),
        &format!("{primary_addr}:{VOLUME_PORT}"),
        volume,
        seed ^ 0x5151,
    )
    .with_proxy(hub.clone());
    copies.push(front_app.copy_counter());
    apps.push((1, Box::new(front_app)));
    let addrs: Vec<Ipv4Addr> = (0..n).map(back_addr).collect();
    let proxy = ProxyApp::new(hub.clone(), disks[0].clone(), 0, &addrs, digests, seed)
        .map_err(io::Error::other)?;
    apps.push((1 + n, Box::new(proxy)));
    Ok(Parts {
        hosts,
        servers: Servers {
            config: config.clone(),
            disks,
            front,
            back,
            apps,
            hub,
            copies,
        },
    })
}

/// Run the servers of `parts` in real time (the NICs on the adapter thread of
/// [`Threaded`], the apps on this one) until `stop` is set or `max` has passed. Each log
/// line goes to `log` at once; `cluster ready` is logged once the primary's back
/// sessions to every other member are up. Returns the hosts.
pub fn run_realtime(
    parts: Parts,
    max: Option<std::time::Duration>,
    stop: &std::sync::atomic::AtomicBool,
    mut log: impl FnMut(String),
) -> io::Result<Vec<Host>> {
    let Parts {
        hosts,
        servers:
            Servers {
                config,
                mut apps,
                hub,
                ..
            },
    } = parts;
    let rt = Threaded::start(hosts);
    let drivers: Vec<SharedDriver> = apps.iter().map(|(h, _)| rt.driver(*h)).collect();
    let waiter = rt.waiter_any();
    let started = std::time::Instant::now();
    let mut ready = false;
    while !stop.load(std::sync::atomic::Ordering::Relaxed)
        && max.is_none_or(|m| started.elapsed() < m)
    {
        let now = waiter.now();
        let mut busy = false;
        let mut next: Option<Instant> = None;
        for ((_, app), d) in apps.iter_mut().zip(&drivers) {
            let mut g = d.lock();
            g.poll(now);
            busy |= app.poll(&mut g, now)?;
            g.flush();
            next = [next, g.poll_at(), app.poll_at()]
                .into_iter()
                .flatten()
                .min();
            for line in app.take_log() {
                log(line);
            }
        }
        if !ready && hub.lock().expect("hub lock").backs_up + 1 >= config.members {
            ready = true;
            log(format!("cluster ready: {} members", config.members));
        }
        if !busy {
            waiter.wait(next)?;
        }
    }
    Ok(rt.stop())
}

impl Cluster {
    /// Build the cluster `config` on `settings` ([`build`], every NIC on the in-memory
    /// switches) on the virtual clock.
    pub fn new(
        settings: &Settings,
        config: &ClusterConfig,
        digests: bool,
        seed: u64,
    ) -> io::Result<Cluster> {
        let p = build(settings, config, digests, seed, None)?;
        Ok(Cluster {
            sim: Sim::new(p.hosts),
            servers: p.servers,
        })
    }

    /// Run the servers alone until the primary's back sessions to every other member
    /// are logged in (the members answer ARP one after another: smoltcp sends at most one
    /// request a second, so the second member is reached a second later). At most
    /// `max_us` of virtual time; false if not all came up.
    pub fn wait_ready(&mut self, max_us: u64) -> io::Result<bool> {
        let want = self.servers.config.members - 1;
        let end = self.sim.now() + toe_bus::time::Duration::from_micros(max_us);
        let drivers = self.drivers();
        while self.servers.hub.lock().expect("hub lock").backs_up < want {
            if self.sim.now() >= end {
                return Ok(false);
            }
            self.step(&drivers, None)?;
        }
        Ok(true)
    }

    /// The driver of each server's host, in the order of [`Servers::apps`].
    fn drivers(&self) -> Vec<SharedDriver> {
        self.servers
            .apps
            .iter()
            .map(|(h, _)| self.sim.driver(*h))
            .collect()
    }

    /// One step of the virtual clock (not past any app's own timer), then `client` (with
    /// its host's driver) and every server (`drivers` from [`Cluster::drivers`]) polled
    /// until they settle: an answer the proxy hands the front goes out now, not after the
    /// clock moved on. Returns whether the hosts moved and whether an app did anything.
    fn step(
        &mut self,
        drivers: &[SharedDriver],
        mut client: Option<(&mut dyn App, &SharedDriver)>,
    ) -> io::Result<(bool, bool)> {
        let limit = self
            .servers
            .apps
            .iter()
            .filter_map(|(_, a)| a.poll_at())
            .chain(client.as_ref().and_then(|(c, _)| c.poll_at()))
            .min();
        let moved = self.sim.step_or_idle_bounded(limit)?;
        let now = self.sim.now();
        let mut any = false;
        for _ in 0..8 {
            let mut b = false;
            if let Some((c, d)) = client.as_mut() {
                b |= c.poll(&mut d.lock(), now)?;
            }
            for ((_, app), d) in self.servers.apps.iter_mut().zip(drivers) {
                b |= app.poll(&mut d.lock(), now)?;
            }
            any |= b;
            if !b {
                break;
            }
        }
        Ok((moved, any))
    }

    /// The proxy's counters.
    pub fn proxy_stats(&self) -> ProxyStats {
        self.servers.hub.lock().expect("hub lock").stats
    }

    /// Host index of member `m`'s front NIC.
    pub fn front_host(&self, m: usize) -> usize {
        1 + m
    }

    /// Host index of member `m`'s back NIC.
    pub fn back_host(&self, m: usize) -> usize {
        1 + self.servers.config.members + m
    }

    /// Take member `m` down (`true`: both its cables cut) or bring it back.
    pub fn set_member_down(&self, m: usize, down: bool) {
        self.servers.front.set_cut(1 + m, down);
        self.servers.back.set_cut(m, down);
    }

    /// Run `client` on the initiator's host (host 0) until it is done, with every server
    /// app polled beside it, for at most `max_steps` steps of the virtual clock. Returns
    /// the apps' log lines.
    pub fn run(&mut self, client: &mut dyn App, max_steps: u64) -> io::Result<Vec<String>> {
        self.run_with(client, max_steps, |_, _| {})
    }

    /// [`Cluster::run`], with `on_pass(cluster, now)` called after every pass (to take a
    /// member down, say).
    pub fn run_with(
        &mut self,
        client: &mut dyn App,
        max_steps: u64,
        mut on_pass: impl FnMut(&Cluster, Instant),
    ) -> io::Result<Vec<String>> {
        let mut log = Vec::new();
        let mut idle = 0u32;
        let d0 = self.sim.driver(0);
        let drivers = self.drivers();
        for _ in 0..max_steps {
            let (moved, any) = self.step(&drivers, Some((&mut *client, &d0)))?;
            let now = self.sim.now();
            log.extend(client.take_log());
            for (_, app) in &mut self.servers.apps {
                log.extend(app.take_log());
            }
            on_pass(self, now);
            if client.done() {
                return Ok(log);
            }
            idle = if moved || any { 0 } else { idle + 1 };
            if idle > 10_000 {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the cluster stalled at {now}; log so far: {log:?}"),
                ));
            }
        }
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("client not done within {max_steps} steps; log: {log:?}"),
        ))
    }
}

/// The volume's medium on the primary: only its size is real (its blocks are on the
/// members, and the proxy-mode target reads and writes none of them here).
struct Placeholder(u64);

impl toe_iscsi::scsi::BlockStore for Placeholder {
    fn len(&self) -> u64 {
        self.0
    }
    fn read_at(&mut self, _offset: u64, _buf: &mut [u8]) -> Result<(), String> {
        Err("the volume's blocks are on the members".into())
    }
    fn write_at(&mut self, _offset: u64, _data: &[u8]) -> Result<(), String> {
        Err("the volume's blocks are on the members".into())
    }
    fn flush(&mut self) -> Result<(), String> {
        Ok(())
    }
}
