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
//! The cluster's runtime (two NICs per member, the proxy initiator's sessions) is not
//! here: this module decides, the shells move bytes.

use std::collections::HashMap;

use crate::scsi::{Sense, CHECK_CONDITION, GOOD};

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

/// One proxied command on the primary: its pieces, which of them are still out (and
/// until when), and their outcomes so far.
#[derive(Debug, Clone)]
pub struct ProxyCmd {
    /// The front (initiator's) task tag.
    pub front_itt: u32,
    /// The pieces, in volume order.
    pub pieces: Vec<Piece>,
    outcomes: Vec<Option<PieceOutcome>>,
    deadlines: Vec<u64>,
}

impl ProxyCmd {
    /// Command `front_itt` split into `pieces`, each to be answered by `deadline_us`.
    pub fn new(front_itt: u32, pieces: Vec<Piece>, deadline_us: u64) -> ProxyCmd {
        let n = pieces.len();
        ProxyCmd {
            front_itt,
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

/// The primary's command contexts, indexed by proxy task ID: each back-session task it
/// sends names (front command, piece).
#[derive(Debug, Default)]
pub struct Contexts {
    by_proxy: HashMap<u32, (u32, usize)>,
    cmds: HashMap<u32, ProxyCmd>,
}

impl Contexts {
    /// Track command `c`.
    pub fn insert(&mut self, c: ProxyCmd) {
        self.cmds.insert(c.front_itt, c);
    }

    /// Piece `piece` of front command `front_itt` went to a member as back task
    /// `proxy_itt`.
    pub fn bind(&mut self, proxy_itt: u32, front_itt: u32, piece: usize) {
        self.by_proxy.insert(proxy_itt, (front_itt, piece));
    }

    /// The (front ITT, piece) of back task `proxy_itt`.
    pub fn lookup(&self, proxy_itt: u32) -> Option<(u32, usize)> {
        self.by_proxy.get(&proxy_itt).copied()
    }

    /// Back task `proxy_itt` ended with `o`: its context is dropped, and the front command
    /// is returned once all its pieces have ended (it leaves the table).
    pub fn answer(&mut self, proxy_itt: u32, o: PieceOutcome) -> Option<ProxyCmd> {
        let (front, piece) = self.by_proxy.remove(&proxy_itt)?;
        let c = self.cmds.get_mut(&front)?;
        c.answer(piece, o);
        if c.done() {
            return self.cmds.remove(&front);
        }
        None
    }

    /// End the pieces whose deadline passed: returns the front commands now complete
    /// (their contexts dropped; late answers to them are ignored).
    pub fn expire(&mut self, now_us: u64, block_bytes: u32) -> Vec<ProxyCmd> {
        let mut done = Vec::new();
        for c in self.cmds.values_mut() {
            c.expire(now_us, block_bytes);
            if c.done() {
                done.push(c.front_itt);
            }
        }
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
        let mut c = ProxyCmd::new(7, m.split(0, 30).unwrap(), 1_000);
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
        t.insert(ProxyCmd::new(9, m.split(5, 10).unwrap(), 5_000_000));
        t.bind(100, 9, 0);
        t.bind(101, 9, 1);
        assert_eq!(t.lookup(101), Some((9, 1)));
        assert!(t.answer(100, good()).is_none(), "piece 1 still out");
        assert_eq!(t.next_deadline(), Some(5_000_000));
        assert!(t.expire(4_999_999, 512).is_empty());
        let done = t.expire(5_000_000, 512);
        assert_eq!(done.len(), 1);
        let r = done[0].merged().unwrap();
        assert_eq!(r.status, CHECK_CONDITION);
        assert_eq!(r.residual, 5 * 512, "the silent piece moved nothing");
        assert!(t.is_empty() && t.lookup(101).is_none());
        assert!(t.answer(101, good()).is_none(), "a late answer is ignored");
    }
}
