//! Proxy I/O in a target cluster (seed 001), the pure layers: the virtualization layer's
//! LBA map, which spreads a volume's extents over the cluster's members, and the primary's
//! command contexts, which split a command over the members holding its blocks, index each
//! piece by its proxy task ID (the back session's own ITT) and merge the pieces' outcomes
//! into the one answer the initiator gets.
//!
//! A read's pieces land in the front command's buffer at their offsets, in whatever order
//! the members answer; once all are in, the front connection sends the buffer as Data-In
//! PDUs of the initiator's MaxRecvDataSegmentLength with continuous DataSN (the ordinary
//! [`crate::transport::DataInBurst`]), the status in the last. A write's data is cut the
//! same way into the members' pieces. The status is the worst of the pieces' (CHECK
//! CONDITION with the first piece's sense data, over any other non-GOOD status, over
//! GOOD); residuals add up. A piece whose member does not answer by its deadline ends the
//! command with CHECK CONDITION (so a member that is down never hangs the initiator).
//!
//! [`Primary`] puts these together for the primary's shell: a front connection's
//! [`crate::target::ProxyRequest`] becomes back tasks (READ (16) or WRITE (16) at the
//! member's blocks, one per piece), their completions become the front command's one
//! answer. The cluster's runtime (two NICs per member, the proxy initiator's sessions)
//! is not here: this module decides, the shells move bytes.

use std::collections::HashMap;

use crate::scsi::{Outcome, RwRange, Sense, CHECK_CONDITION, GOOD};

/// One extent of the volume: `blocks` blocks from volume block `lba`, held by member
/// `member` from its block `member_lba`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct Extent {
    /// First volume block.
    pub lba: u64,
    /// Length in blocks (> 0).
    pub blocks: u64,
    /// The member holding it (an index into the cluster's members; 0 is the primary).
    pub member: usize,
    /// Where it starts on the member's LUN, in blocks.
    pub member_lba: u64,
}

/// What is wrong with an LBA map or a request against it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    /// The extents leave a gap or overlap at this volume block (they must tile the volume
    /// from block 0).
    #[error("the extents do not tile the volume at block {0}")]
    NotContiguous(u64),
    /// An extent of zero blocks.
    #[error("an extent of zero blocks at volume block {0}")]
    Empty(u64),
    /// An extent names a member the cluster does not have.
    #[error("extent at volume block {lba} names member {member}, the cluster has {members}")]
    NoMember {
        /// The extent's first block.
        lba: u64,
        /// The member it names.
        member: usize,
        /// Members in the cluster.
        members: usize,
    },
    /// A request past the end of the volume.
    #[error("blocks {lba}..{end} are past the volume's {blocks} blocks")]
    OutOfRange {
        /// First block asked for.
        lba: u64,
        /// One past the last.
        end: u64,
        /// The volume's size in blocks.
        blocks: u64,
    },
}

/// The virtualization layer's map: extents tiling the volume from block 0, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LbaMap {
    extents: Vec<Extent>,
    members: usize,
}

/// A part of a request that one member serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// The member.
    pub member: usize,
    /// Its first block on the member's LUN.
    pub member_lba: u64,
    /// Its length in blocks.
    pub blocks: u64,
    /// Where its data starts in the request's data, in blocks from the request's start.
    pub offset_blocks: u64,
}

impl LbaMap {
    /// A map of `extents` (any order) over a cluster of `members` members.
    pub fn new(mut extents: Vec<Extent>, members: usize) -> Result<LbaMap, MapError> {
        extents.sort_by_key(|e| e.lba);
        let mut next = 0;
        for e in &extents {
            if e.blocks == 0 {
                return Err(MapError::Empty(e.lba));
            }
            if e.lba != next {
                return Err(MapError::NotContiguous(next.min(e.lba)));
            }
            if e.member >= members {
                return Err(MapError::NoMember {
                    lba: e.lba,
                    member: e.member,
                    members,
                });
            }
            next = e.lba + e.blocks;
        }
        Ok(LbaMap { extents, members })
    }

    /// A volume of `members` × `per_member` blocks striped over the members in stripes of
    /// `stripe` blocks (the last stripe of each member may be shorter).
    pub fn striped(members: usize, per_member: u64, stripe: u64) -> Result<LbaMap, MapError> {
        let stripe = stripe.max(1);
        let mut extents = Vec::new();
        let mut lba = 0;
        let mut done = vec![0u64; members];
        'outer: loop {
            for (m, d) in done.iter_mut().enumerate() {
                let n = stripe.min(per_member - *d);
                if n == 0 {
                    break 'outer;
                }
                extents.push(Extent {
                    lba,
                    blocks: n,
                    member: m,
                    member_lba: *d,
                });
                *d += n;
                lba += n;
            }
        }
        LbaMap::new(extents, members)
    }

    /// The extents, in volume order.
    pub fn extents(&self) -> &[Extent] {
        &self.extents
    }

    /// Members of the cluster.
    pub fn members(&self) -> usize {
        self.members
    }

    /// The volume's size in blocks.
    pub fn blocks(&self) -> u64 {
        self.extents.last().map_or(0, |e| e.lba + e.blocks)
    }

    /// The pieces of `blocks` blocks from volume block `lba`, in volume order, each within
    /// one extent (adjacent extents of one member stay separate pieces).
    pub fn split(&self, lba: u64, blocks: u64) -> Result<Vec<Piece>, MapError> {
        let end = lba.saturating_add(blocks);
        if end > self.blocks() {
            return Err(MapError::OutOfRange {
                lba,
                end,
                blocks: self.blocks(),
            });
        }
        let first = self.extents.partition_point(|e| e.lba + e.blocks <= lba);
        let mut out = Vec::new();
        for e in &self.extents[first..] {
            if e.lba >= end {
                break;
            }
            let from = lba.max(e.lba);
            let to = end.min(e.lba + e.blocks);
            out.push(Piece {
                member: e.member,
                member_lba: e.member_lba + (from - e.lba),
                blocks: to - from,
                offset_blocks: from - lba,
            });
        }
        Ok(out)
    }
}

/// How one piece ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PieceOutcome {
    /// SCSI status.
    pub status: u8,
    /// Sense data with CHECK CONDITION (fixed or descriptor format, as the member sent it).
    pub sense: Vec<u8>,
    /// Bytes of the piece not transferred (the member's residual underflow).
    pub residual: u32,
}

/// The merged answer of a proxied command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Merged {
    /// The worst status of the pieces.
    pub status: u8,
    /// The sense data of the first piece (in volume order) with CHECK CONDITION.
    pub sense: Vec<u8>,
    /// The pieces' residuals, summed, bytes.
    pub residual: u64,
}

/// Rank of a status for "worst of": GOOD lowest, CHECK CONDITION highest.
fn rank(status: u8) -> u8 {
    match status {
        GOOD => 0,
        CHECK_CONDITION => 2,
        _ => 1,
    }
}

/// A front command: the front connection (a number the shell gives each) and the
/// initiator's task tag on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontTag {
    /// The front connection.
    pub conn: u64,
    /// The initiator's task tag.
    pub itt: u32,
}

/// A back task, the proxy task ID: the member whose back session carries it and that
/// session's own task tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackTag {
    /// The member.
    pub member: usize,
    /// The back session's task tag.
    pub itt: u32,
}

/// One proxied command on the primary: its pieces, which of them are still out (and
/// until when), and their outcomes so far.
#[derive(Debug, Clone)]
pub struct ProxyCmd {
    /// The front command.
    pub front: FrontTag,
    /// The pieces, in volume order.
    pub pieces: Vec<Piece>,
    outcomes: Vec<Option<PieceOutcome>>,
    deadlines: Vec<u64>,
}

impl ProxyCmd {
    /// Command `front` split into `pieces`, each to be answered by `deadline_us`.
    pub fn new(front: FrontTag, pieces: Vec<Piece>, deadline_us: u64) -> ProxyCmd {
        let n = pieces.len();
        ProxyCmd {
            front,
            pieces,
            outcomes: vec![None; n],
            deadlines: vec![deadline_us; n],
        }
    }

    /// Record how piece `i` ended (the first answer counts; later ones are ignored).
    /// Returns false for an unknown or already answered piece.
    pub fn answer(&mut self, i: usize, o: PieceOutcome) -> bool {
        match self.outcomes.get_mut(i) {
            Some(slot @ None) => {
                *slot = Some(o);
                true
            }
            _ => false,
        }
    }

    /// End every piece still out whose deadline has passed at `now_us` with CHECK
    /// CONDITION (the member did not answer in time); returns the pieces ended.
    pub fn expire(&mut self, now_us: u64, block_bytes: u32) -> Vec<usize> {
        let mut ended = Vec::new();
        for i in 0..self.pieces.len() {
            if self.outcomes[i].is_none() && now_us >= self.deadlines[i] {
                let bytes = self.pieces[i].blocks * u64::from(block_bytes);
                self.outcomes[i] = Some(PieceOutcome {
                    status: CHECK_CONDITION,
                    sense: Sense::MEMBER_UNREACHABLE.bytes(false),
                    residual: bytes.min(u64::from(u32::MAX)) as u32,
                });
                ended.push(i);
            }
        }
        ended
    }

    /// The earliest deadline of a piece still out.
    pub fn next_deadline(&self) -> Option<u64> {
        (0..self.pieces.len())
            .filter(|&i| self.outcomes[i].is_none())
            .map(|i| self.deadlines[i])
            .min()
    }

    /// Whether every piece has ended.
    pub fn done(&self) -> bool {
        self.outcomes.iter().all(Option::is_some)
    }

    /// The merged answer, once every piece has ended.
    pub fn merged(&self) -> Option<Merged> {
        if !self.done() {
            return None;
        }
        let mut m = Merged {
            status: GOOD,
            sense: Vec::new(),
            residual: 0,
        };
        for o in self.outcomes.iter().flatten() {
            if rank(o.status) > rank(m.status) {
                m.status = o.status;
            }
            if o.status == CHECK_CONDITION && m.sense.is_empty() {
                m.sense = o.sense.clone();
            }
            m.residual += u64::from(o.residual);
        }
        Some(m)
    }
}

/// The primary's command contexts, indexed by proxy task ID: each back task it sends
/// names (front command, piece).
#[derive(Debug, Default)]
pub struct Contexts {
    by_proxy: HashMap<BackTag, (FrontTag, usize)>,
    cmds: HashMap<FrontTag, ProxyCmd>,
}

impl Contexts {
    /// Track command `c`.
    pub fn insert(&mut self, c: ProxyCmd) {
        self.cmds.insert(c.front, c);
    }

    /// Piece `piece` of front command `front` went to a member as back task `back`.
    pub fn bind(&mut self, back: BackTag, front: FrontTag, piece: usize) {
        self.by_proxy.insert(back, (front, piece));
    }

    /// The (front command, piece) of back task `back`.
    pub fn lookup(&self, back: BackTag) -> Option<(FrontTag, usize)> {
        self.by_proxy.get(&back).copied()
    }

    /// The command `front`, if in progress.
    pub fn get_mut(&mut self, front: FrontTag) -> Option<&mut ProxyCmd> {
        self.cmds.get_mut(&front)
    }

    /// Back task `back` ended with `o`: its context is dropped, and the front command is
    /// returned once all its pieces have ended (it leaves the table).
    pub fn answer(&mut self, back: BackTag, o: PieceOutcome) -> Option<ProxyCmd> {
        let (front, piece) = self.by_proxy.remove(&back)?;
        let c = self.cmds.get_mut(&front)?;
        c.answer(piece, o);
        if c.done() {
            return self.cmds.remove(&front);
        }
        None
    }

    /// Forget front command `front` (aborted): returns the back tasks still out for it.
    pub fn remove(&mut self, front: FrontTag) -> Vec<BackTag> {
        self.cmds.remove(&front);
        let mut out: Vec<BackTag> = self
            .by_proxy
            .iter()
            .filter(|(_, (f, _))| *f == front)
            .map(|(b, _)| *b)
            .collect();
        out.sort_unstable();
        self.by_proxy.retain(|_, (f, _)| *f != front);
        out
    }

    /// End the pieces whose deadline passed: returns the front commands now complete
    /// (their contexts dropped; late answers to them are ignored).
    pub fn expire(&mut self, now_us: u64, block_bytes: u32) -> Vec<ProxyCmd> {
        let mut done = Vec::new();
        for c in self.cmds.values_mut() {
            c.expire(now_us, block_bytes);
            if c.done() {
                done.push(c.front);
            }
        }
        done.sort_unstable();
        let out: Vec<ProxyCmd> = done.iter().filter_map(|f| self.cmds.remove(f)).collect();
        self.by_proxy.retain(|_, (f, _)| !done.contains(f));
        out
    }

    /// The earliest deadline of any piece still out.
    pub fn next_deadline(&self) -> Option<u64> {
        self.cmds.values().filter_map(ProxyCmd::next_deadline).min()
    }

    /// Front commands in progress.
    pub fn len(&self) -> usize {
        self.cmds.len()
    }

    /// No command in progress.
    pub fn is_empty(&self) -> bool {
        self.cmds.is_empty()
    }
}

/// A back task the primary's shell is to run: piece `piece` of front command `front`,
/// on member `member` (the primary itself when it is [`Primary::me`]: the shell runs it on
/// its own disk and answers at once).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackTask {
    /// The front command.
    pub front: FrontTag,
    /// Which of its pieces.
    pub piece: usize,
    /// The member that holds the blocks.
    pub member: usize,
    /// READ (16) or WRITE (16) of the piece's blocks on the member (FUA as the front
    /// command had it).
    pub cdb: [u8; 16],
    /// Bytes a read moves (0 for a write).
    pub read_len: u32,
    /// A write's data for the piece (empty for a read).
    pub data: Vec<u8>,
}

/// The primary's proxy: splits front commands over the members by the LBA map, tracks
/// them by proxy task ID, gathers a read's pieces into one buffer and merges the answers.
/// Bounded: one context per proxied front command (each front connection holds at most
/// [`crate::target::MAX_PROXIED_PER_CONN`]).
#[derive(Debug)]
pub struct Primary {
    map: LbaMap,
    me: usize,
    block: u32,
    timeout_us: u64,
    contexts: Contexts,
    /// The read buffers of front commands in progress (the whole read long), from the
    /// first piece that brought data.
    reads: HashMap<FrontTag, Vec<u8>>,
    /// Data bytes copied between buffers so far (see [`Primary::copy_bytes`]).
    copied: u64,
}

/// The default bound on a member's answer, µs: a piece not answered within it ends the
/// command with CHECK CONDITION (the member is taken to be down).
pub const DEFAULT_MEMBER_TIMEOUT_US: u64 = 2_000_000;

impl Primary {
    /// The proxy of member `me` for a volume mapped by `map`, of `block`-byte blocks;
    /// members answer within `timeout_us` or their piece fails.
    pub fn new(map: LbaMap, me: usize, block: u32, timeout_us: u64) -> Primary {
        Primary {
            map,
            me,
            block,
            timeout_us,
            contexts: Contexts::default(),
            reads: HashMap::new(),
            copied: 0,
        }
    }

    /// Data bytes this proxy copied so far: a write's data cut into the pieces of
    /// several members, and the pieces of a read gathered into one answer. A command
    /// that is one piece moves its buffer and copies nothing.
    pub fn copy_bytes(&self) -> u64 {
        self.copied
    }

    /// The member this proxy runs on.
    pub fn me(&self) -> usize {
        self.me
    }

    /// The LBA map.
    pub fn map(&self) -> &LbaMap {
        &self.map
    }

    /// Front commands in progress.
    pub fn in_flight(&self) -> usize {
        self.contexts.len()
    }

    /// Start front command `front`, admitted for blocks `range` (a write's `data`, whole
    /// blocks, at most `range.blocks`), at `now_us`: the back tasks to run, one per piece,
    /// in volume order. `Err` with the front command's outcome if the range is not in the
    /// volume (the volume's disk admitted it, so only a map smaller than the disk).
    pub fn start(
        &mut self,
        front: FrontTag,
        range: RwRange,
        data: Vec<u8>,
        now_us: u64,
    ) -> Result<Vec<BackTask>, Outcome> {
        let pieces = self
            .map
            .split(range.lba, range.blocks)
            .map_err(|_| Outcome::check(Sense::LBA_OUT_OF_RANGE))?;
        let b = self.block as usize;
        let single = pieces.len() == 1;
        let mut data = Some(data);
        let mut copied = 0;
        let tasks = pieces
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let at = p.offset_blocks as usize * b;
                let len = p.blocks as usize * b;
                let mut cdb = [0u8; 16];
                cdb[0] = if range.write { 0x8a } else { 0x88 };
                if range.fua {
                    cdb[1] = 0x08;
                }
                cdb[2..10].copy_from_slice(&p.member_lba.to_be_bytes());
                cdb[10..14].copy_from_slice(&(p.blocks as u32).to_be_bytes());
                BackTask {
                    front,
                    piece: i,
                    member: p.member,
                    cdb,
                    read_len: if range.write { 0 } else { len as u32 },
                    data: match (range.write, single) {
                        (false, _) => Vec::new(),
                        // The one piece: the buffer moves.
                        (true, true) => data.take().unwrap_or_default(),
                        (true, false) => {
                            let d = data.as_deref().unwrap_or_default();
                            let part = d.get(at..(at + len).min(d.len())).unwrap_or_default();
                            copied += part.len() as u64;
                            part.to_vec()
                        }
                    },
                }
            })
            .collect();
        self.copied += copied;
        self.contexts
            .insert(ProxyCmd::new(front, pieces, now_us + self.timeout_us));
        Ok(tasks)
    }

    /// Piece `piece` of `front` went out as back task `back`.
    pub fn bind(&mut self, back: BackTag, front: FrontTag, piece: usize) {
        self.contexts.bind(back, front, piece);
    }

    /// Whether back task `back` is the one piece of its front command: its read data is
    /// then the whole answer, and the shell may keep it where it is (answering with no
    /// data; see [`Primary::answer`]).
    pub fn one_piece(&self, back: BackTag) -> bool {
        self.contexts
            .lookup(back)
            .and_then(|(front, _)| self.contexts.cmds.get(&front))
            .is_some_and(|c| c.pieces.len() == 1)
    }

    /// Back task `back` ended (status, sense bytes as the member sent them, what it read,
    /// its residual underflow in bytes). Returns the front command and its one outcome
    /// once every piece has ended; `None` for a piece of a command still waiting for
    /// others, or for an unknown back task (a late answer, an aborted command). A read's
    /// data is gathered at its piece's offset; the data of a one-piece read becomes the
    /// answer as it is (zeros make up what a member sent short of its residual). A read
    /// answered with no data has none in the outcome: a shell that keeps a one-piece
    /// read's data itself ([`Primary::one_piece`]) sends that.
    pub fn answer(
        &mut self,
        back: BackTag,
        status: u8,
        sense: Vec<u8>,
        data: Vec<u8>,
        residual: u32,
    ) -> Option<(FrontTag, Outcome)> {
        let (front, piece) = self.contexts.lookup(back)?;
        if let (false, Some(c)) = (data.is_empty(), self.contexts.get_mut(front)) {
            let b = self.block as usize;
            let full = c.pieces.iter().map(|p| p.blocks as usize).sum::<usize>() * b;
            if c.pieces.len() == 1 && data.len() <= full {
                // The whole read in one piece: its buffer is the answer.
                let mut data = data;
                data.resize(full, 0);
                self.reads.insert(front, data);
            } else {
                let buf = self.reads.entry(front).or_insert_with(|| vec![0; full]);
                let at = c.pieces[piece].offset_blocks as usize * b;
                let n = data.len().min(buf.len().saturating_sub(at));
                buf[at..at + n].copy_from_slice(&data[..n]);
                self.copied += n as u64;
            }
        }
        let done = self.contexts.answer(
            back,
            PieceOutcome {
                status,
                sense,
                residual,
            },
        )?;
        Some(self.outcome(done))
    }

    /// End the pieces whose member did not answer by `now_us`: the front commands now
    /// complete, with their outcomes (CHECK CONDITION), and the members that were late
    /// (the shell takes them to be down).
    pub fn expire(&mut self, now_us: u64) -> (Vec<(FrontTag, Outcome)>, Vec<usize>) {
        let mut late = std::collections::BTreeSet::new();
        for c in self.contexts.cmds.values() {
            for (i, p) in c.pieces.iter().enumerate() {
                if c.outcomes[i].is_none() && now_us >= c.deadlines[i] {
                    late.insert(p.member);
                }
            }
        }
        let done = self
            .contexts
            .expire(now_us, self.block)
            .into_iter()
            .map(|c| self.outcome(c))
            .collect();
        (done, late.into_iter().collect())
    }

    /// Member `member` is down (its back session broke): every piece out on it ends with
    /// CHECK CONDITION now; returns the front commands that completed.
    pub fn fail_member(&mut self, member: usize) -> Vec<(FrontTag, Outcome)> {
        let mut tags: Vec<BackTag> = self
            .contexts
            .by_proxy
            .keys()
            .filter(|b| b.member == member)
            .copied()
            .collect();
        tags.sort_unstable();
        let sense = Sense::MEMBER_UNREACHABLE.bytes(false);
        tags.into_iter()
            .filter_map(|b| self.answer(b, CHECK_CONDITION, sense.clone(), Vec::new(), 0))
            .collect()
    }

    /// Whether front command `front` is in progress (not answered, expired or aborted).
    pub fn contains(&self, front: FrontTag) -> bool {
        self.contexts.cmds.contains_key(&front)
    }

    /// Forget front command `front` (the initiator aborted it): the back tasks still out
    /// for it, for the shell to abort on their members.
    pub fn abort(&mut self, front: FrontTag) -> Vec<BackTag> {
        self.reads.remove(&front);
        self.contexts.remove(front)
    }

    /// Forget every command of front connection `conn` (it ended): the back tasks still
    /// out for them.
    pub fn forget_conn(&mut self, conn: u64) -> Vec<BackTag> {
        let fronts: Vec<FrontTag> = self
            .contexts
            .cmds
            .keys()
            .filter(|f| f.conn == conn)
            .copied()
            .collect();
        fronts.into_iter().flat_map(|f| self.abort(f)).collect()
    }

    /// The earliest member deadline of a command in progress, µs.
    pub fn next_deadline(&self) -> Option<u64> {
        self.contexts.next_deadline()
    }

    /// The one outcome of finished command `c`: the worst status (the first CHECK
    /// CONDITION's sense), a read's data less the pieces' summed residual.
    fn outcome(&mut self, c: ProxyCmd) -> (FrontTag, Outcome) {
        let m = c.merged().expect("done");
        let mut data = self.reads.remove(&c.front).unwrap_or_default();
        let o = if m.status == GOOD {
            let keep = (data.len() as u64).saturating_sub(m.residual) as usize;
            data.truncate(keep);
            Outcome::good(data)
        } else {
            Outcome {
                status: m.status,
                data_in: Vec::new(),
                sense: (m.status == CHECK_CONDITION)
                    .then(|| Sense::parse(&m.sense).unwrap_or(Sense::MEMBER_UNREACHABLE)),
            }
        };
        (c.front, o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn maps_must_tile_the_volume() {
        let e = |lba, blocks, member| Extent {
            lba,
            blocks,
            member,
            member_lba: 0,
        };
        assert!(LbaMap::new(vec![e(0, 8, 0), e(8, 8, 1)], 2).is_ok());
        assert_eq!(
            LbaMap::new(vec![e(0, 8, 0), e(9, 8, 1)], 2),
            Err(MapError::NotContiguous(8))
        );
        assert_eq!(
            LbaMap::new(vec![e(0, 8, 0), e(4, 8, 1)], 2),
            Err(MapError::NotContiguous(4))
        );
        assert_eq!(LbaMap::new(vec![e(0, 0, 0)], 1), Err(MapError::Empty(0)));
        assert!(matches!(
            LbaMap::new(vec![e(0, 8, 3)], 2),
            Err(MapError::NoMember { member: 3, .. })
        ));
    }

    #[test]
    fn a_request_splits_at_extent_boundaries() {
        let m = LbaMap::striped(3, 100, 40).unwrap();
        assert_eq!(m.blocks(), 300);
        // Stripes: [0,40) m0, [40,80) m1, [80,120) m2, [120,160) m0 at 40, ...
        let p = m.split(30, 60).unwrap();
        assert_eq!(
            p,
            vec![
                Piece {
                    member: 0,
                    member_lba: 30,
                    blocks: 10,
                    offset_blocks: 0
                },
                Piece {
                    member: 1,
                    member_lba: 0,
                    blocks: 40,
                    offset_blocks: 10
                },
                Piece {
                    member: 2,
                    member_lba: 0,
                    blocks: 10,
                    offset_blocks: 50
                },
            ]
        );
        assert!(matches!(
            m.split(290, 11),
            Err(MapError::OutOfRange { end: 301, .. })
        ));
        assert!(m.split(u64::MAX, 2).is_err(), "no overflow");
    }

    proptest! {
        /// Any request within the volume splits into pieces that cover it exactly, in
        /// order, each inside one extent and mapped to the right member blocks.
        #[test]
        fn pieces_cover_a_request_exactly(
            members in 1usize..5,
            per in 1u64..200,
            stripe in 1u64..64,
            a in 0u64..1000,
            n in 1u64..1000,
        ) {
            let m = LbaMap::striped(members, per, stripe).unwrap();
            let total = m.blocks();
            prop_assert_eq!(total, members as u64 * per);
            let lba = a % total;
            let blocks = 1 + n % (total - lba);
            let pieces = m.split(lba, blocks).unwrap();
            let mut at = 0;
            for p in &pieces {
                prop_assert_eq!(p.offset_blocks, at);
                let v = lba + p.offset_blocks;
                let e = m.extents().iter().find(|e| e.lba <= v && v < e.lba + e.blocks).unwrap();
                prop_assert_eq!(p.member, e.member);
                prop_assert_eq!(p.member_lba, e.member_lba + (v - e.lba));
                prop_assert!(v + p.blocks <= e.lba + e.blocks);
                at += p.blocks;
            }
            prop_assert_eq!(at, blocks);
        }
    }

    fn front(itt: u32) -> FrontTag {
        FrontTag { conn: 1, itt }
    }

    fn back(member: usize, itt: u32) -> BackTag {
        BackTag { member, itt }
    }

    fn good() -> PieceOutcome {
        PieceOutcome {
            status: GOOD,
            sense: Vec::new(),
            residual: 0,
        }
    }

    #[test]
    fn the_worst_status_wins_and_residuals_add_up() {
        let m = LbaMap::striped(3, 100, 10).unwrap();
        let mut c = ProxyCmd::new(front(7), m.split(0, 30).unwrap(), 1_000);
        assert!(c.answer(
            1,
            PieceOutcome {
                residual: 512,
                ..good()
            }
        ));
        assert!(!c.answer(1, good()), "a piece answers once");
        assert!(c.merged().is_none(), "not all pieces in");
        c.answer(
            2,
            PieceOutcome {
                status: CHECK_CONDITION,
                sense: vec![0x70, 0, 3],
                residual: 1024,
            },
        );
        c.answer(
            0,
            PieceOutcome {
                status: 0x08,
                ..good()
            },
        );
        let r = c.merged().unwrap();
        assert_eq!((r.status, r.residual), (CHECK_CONDITION, 1536));
        assert_eq!(r.sense, vec![0x70, 0, 3]);
    }

    #[test]
    fn a_silent_member_ends_the_command_by_its_deadline() {
        let m = LbaMap::striped(2, 100, 10).unwrap();
        let mut t = Contexts::default();
        t.insert(ProxyCmd::new(front(9), m.split(5, 10).unwrap(), 5_000_000));
        t.bind(back(0, 100), front(9), 0);
        // The same task tag on another member's session is another proxy task.
        t.bind(back(1, 100), front(9), 1);
        assert_eq!(t.lookup(back(1, 100)), Some((front(9), 1)));
        assert!(t.lookup(back(1, 101)).is_none());
        assert!(
            t.answer(back(0, 100), good()).is_none(),
            "piece 1 still out"
        );
        assert_eq!(t.next_deadline(), Some(5_000_000));
        assert!(t.expire(4_999_999, 512).is_empty());
        let done = t.expire(5_000_000, 512);
        assert_eq!(done.len(), 1);
        let r = done[0].merged().unwrap();
        assert_eq!(r.status, CHECK_CONDITION);
        assert_eq!(r.residual, 5 * 512, "the silent piece moved nothing");
        assert!(t.is_empty() && t.lookup(back(1, 100)).is_none());
        assert!(
            t.answer(back(1, 100), good()).is_none(),
            "a late answer is ignored"
        );
    }
    /// A write over three members becomes one WRITE (16) per piece at the member's
    /// blocks with its part of the data; a read's pieces, answered out of order, land at
    /// their offsets; a silent member fails its command with CHECK CONDITION by the
    /// deadline; an abort names the back tasks still out.
    #[test]
    fn the_primary_splits_gathers_and_fails_a_silent_member() {
        let map = LbaMap::striped(3, 100, 10).unwrap();
        let mut p = Primary::new(map, 0, 512, 1_000);
        let f = front(5);
        let range = |write, lba, blocks| RwRange {
            write,
            lba,
            blocks,
            fua: true,
        };
        let data: Vec<u8> = (0..25 * 512).map(|i| (i % 251) as u8).collect();
        let tasks = p.start(f, range(true, 5, 25), data.clone(), 0).unwrap();
        let got: Vec<(usize, u64, u32, usize)> = tasks
            .iter()
            .map(|t| {
                assert_eq!(t.cdb[0], 0x8a);
                assert_eq!(t.cdb[1], 0x08, "FUA kept");
                let lba = u64::from_be_bytes(t.cdb[2..10].try_into().unwrap());
                let n = u32::from_be_bytes(t.cdb[10..14].try_into().unwrap());
                (t.member, lba, n, t.data.len())
            })
            .collect();
        // [5,10) on m0 at 5, [10,20) m1 at 0, [20,30) m2 at 0
        assert_eq!(got, [(0, 5, 5, 2560), (1, 0, 10, 5120), (2, 0, 10, 5120)]);
        assert_eq!(tasks[1].data[..], data[2560..7680]);
        assert_eq!(p.copy_bytes(), 25 * 512, "the data cut into three pieces");
        for (i, t) in tasks.iter().enumerate() {
            p.bind(back(t.member, 40 + i as u32), f, t.piece);
        }
        assert!(p.answer(back(1, 41), GOOD, vec![], Vec::new(), 0).is_none());
        assert!(
            p.answer(back(1, 99), GOOD, vec![], Vec::new(), 0).is_none(),
            "unknown"
        );
        assert!(p.answer(back(0, 40), GOOD, vec![], Vec::new(), 0).is_none());
        let (done, o) = p.answer(back(2, 42), GOOD, vec![], Vec::new(), 0).unwrap();
        assert_eq!((done, o.status), (f, GOOD));
        assert_eq!(p.in_flight(), 0);
        // A read of the same blocks, answered last piece first.
        let g = front(6);
        let tasks = p.start(g, range(false, 5, 25), Vec::new(), 10).unwrap();
        for (i, t) in tasks.iter().enumerate().rev() {
            p.bind(back(t.member, 50 + i as u32), g, t.piece);
        }
        let at = [0usize, 2560, 7680];
        let mut answer = None;
        for (i, t) in tasks.iter().enumerate().rev() {
            let part = &data[at[i]..at[i] + t.read_len as usize];
            answer = p.answer(
                back(t.member, 50 + i as u32),
                GOOD,
                vec![],
                part.to_vec(),
                0,
            );
        }
        let (_, o) = answer.unwrap();
        assert!(o.data_in == data, "pieces at their offsets");
        assert_eq!(p.copy_bytes(), 2 * 25 * 512, "and gathered from three");
        // One piece: the buffer moves both ways, nothing is copied.
        let one = front(10);
        let tasks = p
            .start(one, range(true, 10, 10), data[..5120].to_vec(), 0)
            .unwrap();
        assert!(tasks.len() == 1 && tasks[0].data[..] == data[..5120]);
        p.bind(back(1, 90), one, 0);
        p.answer(back(1, 90), GOOD, vec![], Vec::new(), 0).unwrap();
        p.start(one, range(false, 10, 10), Vec::new(), 0).unwrap();
        p.bind(back(1, 91), one, 0);
        let (_, o) = p
            .answer(back(1, 91), GOOD, vec![], data[..5120].to_vec(), 0)
            .unwrap();
        assert!(o.data_in[..] == data[..5120]);
        assert_eq!(p.copy_bytes(), 2 * 25 * 512, "nothing copied for one piece");
        // A read whose member 2 stays silent: CHECK CONDITION at the deadline.
        let h = front(7);
        let tasks = p.start(h, range(false, 15, 10), Vec::new(), 100).unwrap();
        assert_eq!(tasks.len(), 2);
        p.bind(back(1, 60), h, 0);
        p.bind(back(2, 61), h, 1);
        p.answer(back(1, 60), GOOD, vec![], vec![0; 2560], 0);
        assert_eq!(p.next_deadline(), Some(1_100));
        assert!(p.expire(1_099).0.is_empty());
        let (ended, late) = p.expire(1_100);
        assert_eq!(late, [2]);
        assert_eq!(ended.len(), 1);
        assert_eq!(ended[0].1.status, CHECK_CONDITION);
        assert_eq!(ended[0].1.sense, Some(Sense::MEMBER_UNREACHABLE));
        // An aborted command names its back tasks still out.
        let k = front(8);
        p.start(k, range(false, 0, 30), Vec::new(), 0).unwrap();
        p.bind(back(0, 70), k, 0);
        p.bind(back(1, 71), k, 1);
        p.bind(back(2, 72), k, 2);
        p.answer(back(1, 71), GOOD, vec![], vec![0; 5120], 0);
        assert_eq!(p.abort(k), [back(0, 70), back(2, 72)]);
        assert_eq!(p.in_flight(), 0);
        assert!(p.answer(back(0, 70), GOOD, vec![], Vec::new(), 0).is_none());
        // A member's sense data comes through.
        let m = front(9);
        p.start(m, range(false, 0, 1), Vec::new(), 0).unwrap();
        p.bind(back(0, 80), m, 0);
        let sense = Sense::LBA_OUT_OF_RANGE.bytes(false);
        let (_, o) = p
            .answer(back(0, 80), CHECK_CONDITION, sense, Vec::new(), 512)
            .unwrap();
        assert_eq!(o.sense, Some(Sense::LBA_OUT_OF_RANGE));
    }
}
