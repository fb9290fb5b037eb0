//! Property tests of the composed receive path: the NIC's offload context
//! ([`toe_nic::OffloadCtx`]) and the driver's connection state ([`toe_driver::ConnRx`]), joined
//! by command and event queues that deliver in order but with arbitrary delays, under random
//! segment arrivals (sizes, PSH), application accepts, named-buffer posts (sizes, push mode),
//! cancels and time advances.
//!
//! The connection starts in its handshake (posts are allowed, no data arrives) and is
//! established at a random point, with W set then (`OffloadCtx::set_window`, as the NIC does
//! once it knows the MSS): named buffers posted before, during and after the handshake must
//! all work.
//!
//! Invariants (DESIGN.md): nothing lost, duplicated or reordered; P <= W at all times; P == I
//! whenever both rings are empty; the connection never holds more anonymous buffers than its
//! share (`buffer_share(W, anon_len)`), and the NIC's charge equals the driver's whenever the
//! rings are empty; every anonymous buffer returns to the pool exactly once; every named
//! buffer comes back exactly once; pool usage never exceeds its size.
//!
//! `TOEMU_PROPTEST_CASES` raises the case count (default 2,000).

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;

use proptest::prelude::*;
use toe_bus::time::{Duration, Instant};
use toe_bus::{
    buffer_share, Command, ConnId, Dma, Event, HostBuf, HostMemory, ReturnReason, RxPolicy,
};
use toe_driver::{AckPolicy, ConnRx, Outputs, RxConfig};
use toe_nic::{OffloadCtx, Plan};

const ANON_LEN: usize = 4096;
const SOCKET_CAP: u64 = 96 * 1024;

fn byte_at(off: u64) -> u8 {
    let x = off.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (x >> 56) as u8 ^ (off as u8)
}

#[derive(Debug, Clone)]
enum Op {
    Arrive { len: usize, psh: bool },
    NicPoll,
    Cmds(usize),
    Evts(usize),
    Post { len: usize, push: bool },
    Accept(usize),
    Cancel,
    Advance(u64),
    Establish,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1usize..20_000, any::<bool>()).prop_map(|(len, psh)| Op::Arrive { len, psh }),
        4 => Just(Op::NicPoll),
        3 => (1usize..6).prop_map(Op::Cmds),
        3 => (1usize..6).prop_map(Op::Evts),
        2 => (1usize..40_000, any::<bool>()).prop_map(|(len, push)| Op::Post { len, push }),
        3 => (1usize..30_000).prop_map(Op::Accept),
        1 => Just(Op::Cancel),
        1 => (0u64..700).prop_map(Op::Advance),
        1 => Just(Op::Establish),
    ]
}

struct Harness {
    mem: Arc<HostMemory>,
    dma: Dma,
    policy: RxPolicy,
    window: u32,
    nic: OffloadCtx,
    anon_at_nic: Vec<HostBuf>,
    pool_size: usize,
    arrived_end: u64,
    cmds: VecDeque<Command>,
    evts: VecDeque<Event>,
    drv: ConnRx,
    now: Instant,
    received: u64,
    posted: u64,
    completed: BTreeSet<u64>,
    named_live: usize,
    /// Stream offsets just past segments that carried PSH.
    psh_at: BTreeSet<u64>,
    /// W once established (the handshake runs with `handshake_window`).
    established_window: u32,
    established: bool,
}

impl Harness {
    /// A connection in its handshake; [`Op::Establish`] sets W to `window`.
    fn new(policy: RxPolicy, window: u32, ack: AckPolicy) -> Self {
        // During the handshake both sides know only the configured W; under the one-MSS
        // hold-off the NIC learns the negotiated MSS at establishment (here: W itself).
        let handshake_window = if policy == RxPolicy::MssHoldoff {
            8960
        } else {
            window
        };
        let mut h = Self::connecting(policy, handshake_window, ack);
        h.established_window = window;
        h
    }

    fn connecting(policy: RxPolicy, window: u32, ack: AckPolicy) -> Self {
        let mem = Arc::new(HostMemory::anonymous(64 << 20).unwrap());
        let pool_size = (window as usize).div_ceil(ANON_LEN) + 2;
        let anon_at_nic = (0..pool_size)
            .map(|_| mem.alloc(ANON_LEN).unwrap())
            .collect();
        let conn = ConnId(7);
        Harness {
            dma: Dma::new(mem.clone()),
            mem,
            policy,
            window,
            nic: OffloadCtx::new(conn, policy, window),
            established_window: window,
            established: false,
            anon_at_nic,
            pool_size,
            arrived_end: 0,
            cmds: VecDeque::new(),
            evts: VecDeque::new(),
            drv: ConnRx::new(
                conn,
                RxConfig {
                    policy,
                    window,
                    ack,
                    push_timeout: Duration::from_millis(500),
                    copy_cap_bytes: 256 * 1024,
                },
                ANON_LEN,
            ),
            now: Instant::from_millis(0),
            received: 0,
            posted: 0,
            completed: BTreeSet::new(),
            named_live: 0,
            psh_at: BTreeSet::new(),
        }
    }

    fn absorb(&mut self, out: Outputs) {
        self.cmds.extend(out.commands);
        if !out.released.is_empty() {
            self.cmds
                .push_back(Command::PostAnonymous { bufs: out.released });
        }
        self.take_completions();
    }

    fn take_completions(&mut self) {
        while let Some(c) = self.drv.take_completion() {
            assert_ne!(
                c.why,
                ReturnReason::Stale,
                "stale returns never reach the app"
            );
            assert!(
                self.completed.insert(c.id.0),
                "named buffer {:?} returned twice",
                c.id
            );
            let data = self.mem.slice(&c.buf)[..c.filled].to_vec();
            if c.why == ReturnReason::Push {
                let end = self.received + c.filled as u64;
                assert!(
                    self.psh_at.contains(&end),
                    "push-mode buffer returned at {end}, not at a PSH boundary"
                );
            }
            self.check_data(&data);
            self.mem.free(c.buf);
            self.named_live -= 1;
        }
    }

    fn check_data(&mut self, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            let off = self.received + i as u64;
            assert_eq!(
                *b,
                byte_at(off),
                "byte at stream offset {off} wrong (lost/reordered)"
            );
        }
        self.received += data.len() as u64;
    }

    fn nic_poll(&mut self) {
        let mut out = VecDeque::new();
        loop {
            let avail = (self.arrived_end - self.nic.position()) as usize;
            match self.nic.plan(avail, ANON_LEN) {
                Plan::Hold => break,
                Plan::Named { at, max } => {
                    let pos = self.nic.position();
                    let data: Vec<u8> = (0..max as u64).map(|i| byte_at(pos + i)).collect();
                    let buf = self.nic.head_named_mut().unwrap();
                    self.dma.write(buf, at, &data);
                    self.nic.placed_named(max, &mut out);
                }
                Plan::Anonymous { max } => {
                    let Some(mut buf) = self.anon_at_nic.pop() else {
                        break;
                    };
                    let pos = self.nic.position();
                    let data: Vec<u8> = (0..max as u64).map(|i| byte_at(pos + i)).collect();
                    self.dma.write(&mut buf, 0, &data);
                    self.nic.indicated(buf, max, &mut out);
                }
            }
            if self.policy != RxPolicy::UnboundedCopy {
                assert!(self.nic.pending() <= self.window, "P exceeded W");
            }
            assert!(
                self.nic.charged() <= buffer_share(self.window, ANON_LEN),
                "the connection holds more than its buffer share"
            );
        }
        self.evts.extend(out);
    }

    fn deliver_cmds(&mut self, n: usize) {
        let mut out = VecDeque::new();
        for _ in 0..n {
            let Some(c) = self.cmds.pop_front() else {
                break;
            };
            match c {
                Command::PostAnonymous { bufs } => self.anon_at_nic.extend(bufs),
                Command::IndicateAck { bytes, bufs, .. } => self.nic.on_ack(bytes, bufs),
                Command::PostNamed {
                    buf,
                    push,
                    prefill,
                    stream_offset,
                    epoch,
                    ..
                } => self
                    .nic
                    .on_post_named(buf, push, prefill, stream_offset, epoch, &mut out),
                Command::ReturnNamed { why, all, .. } => {
                    self.nic.on_return_named(why, all, &mut out)
                }
                other => panic!("unexpected command {other:?}"),
            }
        }
        self.evts.extend(out);
    }

    fn deliver_evts(&mut self, n: usize) {
        for _ in 0..n {
            let Some(e) = self.evts.pop_front() else {
                break;
            };
            let mut out = Outputs::default();
            match e {
                Event::IndicateData {
                    buf,
                    len,
                    stream_offset,
                    psh_ends,
                    ..
                } => {
                    assert!(
                        psh_ends.windows(2).all(|w| w[0] < w[1])
                            && psh_ends.iter().all(|&e| e >= 1 && e <= len),
                        "PSH ends {psh_ends:?} outside a chunk of {len}"
                    );
                    self.drv.on_indicate(
                        &self.mem,
                        self.now,
                        buf,
                        len as usize,
                        stream_offset,
                        psh_ends,
                        &mut out,
                    )
                }
                Event::NamedFilling { .. } => self.drv.on_named_filling(self.now),
                Event::NamedDone {
                    buf,
                    filled,
                    end_offset,
                    why,
                    epoch,
                    ..
                } => self.drv.on_named_done(
                    &self.mem,
                    self.now,
                    buf,
                    filled as usize,
                    end_offset,
                    why,
                    epoch,
                    &mut out,
                ),
                other => panic!("unexpected event {other:?}"),
            }
            self.absorb(out);
        }
    }

    fn accept(&mut self, max: usize) {
        let mut out = Outputs::default();
        let mut got = Vec::new();
        self.drv.accept_in_place(
            &self.mem,
            self.now,
            |d| {
                let n = d.len().min(max - got.len());
                got.extend_from_slice(&d[..n]);
                n
            },
            &mut out,
        );
        self.check_data(&got);
        self.absorb(out);
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Arrive { .. } if !self.established => {}
            Op::Arrive { len, psh } => {
                let room = SOCKET_CAP - (self.arrived_end - self.nic.position());
                let len = (len as u64).min(room);
                if len > 0 {
                    self.arrived_end += len;
                    if psh {
                        self.psh_at.insert(self.arrived_end);
                        self.nic.add_psh_mark(self.arrived_end);
                    }
                }
            }
            Op::NicPoll => self.nic_poll(),
            Op::Cmds(n) => self.deliver_cmds(n),
            Op::Evts(n) => self.deliver_evts(n),
            Op::Post { len, push } => {
                if self.named_live < 8 {
                    let buf = self.mem.alloc(len).unwrap();
                    let mut out = Outputs::default();
                    self.drv
                        .post_named(&self.mem, self.now, buf, push, &mut out);
                    self.posted += 1;
                    self.named_live += 1;
                    self.absorb(out);
                }
            }
            Op::Accept(max) => self.accept(max),
            Op::Cancel => {
                let mut out = Outputs::default();
                self.drv.cancel_named(&self.mem, self.now, &mut out);
                self.absorb(out);
            }
            Op::Establish if !self.established => {
                self.established = true;
                self.window = self.established_window;
                self.nic.set_window(self.window);
                self.drv.set_window(self.window);
            }
            Op::Establish => {}
            Op::Advance(ms) => {
                self.now += Duration::from_millis(ms);
                let mut out = Outputs::default();
                self.drv.on_timer(self.now, &mut out);
                self.absorb(out);
            }
        }
        if self.cmds.is_empty() && self.evts.is_empty() {
            assert_eq!(
                self.nic.pending(),
                self.drv.indicated(),
                "P and I disagree with quiet rings"
            );
            assert_eq!(
                self.nic.charged(),
                self.drv.charged(),
                "buffer charges disagree with quiet rings"
            );
        }
        assert_eq!(self.drv.stats().protocol_errors, 0);
    }

    /// Deliver everything and consume the whole stream, then return all named buffers.
    fn finish(&mut self) {
        self.apply(&Op::Establish);
        for round in 0..10_000 {
            self.nic_poll();
            self.deliver_cmds(usize::MAX);
            self.deliver_evts(usize::MAX);
            self.accept(usize::MAX);
            if round % 3 == 2 {
                self.apply(&Op::Advance(600));
            }
            if round % 5 == 4 && self.named_live > 0 {
                self.apply(&Op::Cancel);
            }
            self.apply(&Op::Evts(0));
            let quiet = self.cmds.is_empty() && self.evts.is_empty();
            if quiet && self.received == self.arrived_end && self.named_live == 0 {
                break;
            }
        }
        assert_eq!(
            self.received, self.arrived_end,
            "stream not fully delivered"
        );
        assert_eq!(self.named_live, 0, "named buffers never returned");
        assert_eq!(self.completed.len() as u64, self.posted);
        assert_eq!(
            self.anon_at_nic.len(),
            self.pool_size,
            "anonymous buffers lost or duplicated"
        );
        assert_eq!(self.drv.queued_bytes(), 0);
        // pool usage: exactly the anonymous pool is still allocated
        assert_eq!(
            self.mem.used_bytes(),
            self.pool_size * ANON_LEN.div_ceil(64) * 64
        );
    }
}

fn cases() -> u32 {
    std::env::var("TOEMU_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

fn policy_strategy() -> impl Strategy<Value = (RxPolicy, u32, AckPolicy)> {
    (
        prop_oneof![
            Just(RxPolicy::IndicateWindow),
            Just(RxPolicy::MssHoldoff),
            Just(RxPolicy::UnboundedCopy)
        ],
        prop_oneof![Just(1460u32), Just(4096), Just(10_000), Just(65_536)],
        prop_oneof![
            Just(AckPolicy::WindowFull),
            (1u32..20_000).prop_map(|min_bytes| AckPolicy::KeepOpen { min_bytes })
        ],
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn window_accounting_invariants(
        (policy, window, ack) in policy_strategy(),
        ops in proptest::collection::vec(op(), 1..200),
    ) {
        let window = if policy == RxPolicy::MssHoldoff { 1460 } else { window };
        let mut h = Harness::new(policy, window, ack);
        for op in &ops {
            h.apply(op);
        }
        h.finish();
    }
}

/// A named buffer larger than W, posted before data arrives, is filled by the NIC directly:
/// no driver copy at all.
#[test]
fn large_named_buffer_is_zero_copy() {
    let mut h = Harness::new(RxPolicy::IndicateWindow, 8192, AckPolicy::WindowFull);
    h.apply(&Op::Establish);
    h.apply(&Op::Post {
        len: 50_000,
        push: false,
    });
    h.apply(&Op::Cmds(10));
    h.apply(&Op::Arrive {
        len: 50_000,
        psh: false,
    });
    h.apply(&Op::NicPoll);
    h.apply(&Op::Evts(10));
    assert_eq!(h.received, 50_000);
    let s = h.mem.stats().snapshot();
    assert_eq!(s.host_copy_bytes, 0);
    assert_eq!(s.dma_write_bytes, 50_000);
    h.finish();
}

/// Data indicated before the post is copied first, the rest is placed directly.
#[test]
fn indicated_data_is_copied_first_then_direct_placement() {
    let mut h = Harness::new(RxPolicy::IndicateWindow, 8192, AckPolicy::WindowFull);
    h.apply(&Op::Establish);
    h.apply(&Op::Arrive {
        len: 20_000,
        psh: false,
    });
    h.apply(&Op::NicPoll); // indicates W = 8192, then suspends
    assert!(h.nic.suspended());
    assert_eq!(h.nic.pending(), 8192);
    h.apply(&Op::Evts(10));
    h.apply(&Op::Post {
        len: 20_000,
        push: false,
    });
    h.apply(&Op::Cmds(10)); // anonymous buffers back, PostNamed with prefill 8192: P = 0
    assert_eq!(h.nic.pending(), 0);
    h.apply(&Op::NicPoll);
    h.apply(&Op::Evts(10));
    assert_eq!(h.received, 20_000);
    let s = h.mem.stats().snapshot();
    assert_eq!(s.host_copy_bytes, 8192);
    assert_eq!(s.dma_write_bytes, 20_000);
    h.finish();
}

/// A peer sending 1-byte PSH segments to an application that does not read: every
/// indication takes a whole anonymous buffer, and the connection stops at its share (here
/// W = 16 KiB over 4 KiB buffers: 4), not at W bytes. Once the application reads, one
/// acknowledgement hands the drained buffers back and delivery resumes, the segments that
/// queued up meanwhile packed into one buffer.
#[test]
fn tiny_psh_segments_stop_at_the_buffer_share_and_resume_on_read() {
    let mut h = Harness::new(RxPolicy::IndicateWindow, 16 * 1024, AckPolicy::WindowFull);
    h.apply(&Op::Establish);
    for _ in 0..100 {
        h.apply(&Op::Arrive { len: 1, psh: true });
        h.apply(&Op::NicPoll);
    }
    h.apply(&Op::Evts(usize::MAX));
    assert_eq!(h.nic.charged(), 4);
    assert_eq!(h.drv.charged(), 4);
    assert!(h.nic.suspended());
    assert_eq!(h.nic.pending(), 4, "4 bytes in 4 buffers");
    h.apply(&Op::Accept(usize::MAX));
    h.apply(&Op::Cmds(usize::MAX));
    assert_eq!(
        h.nic.charged(),
        0,
        "the acknowledgement carried the drained buffers"
    );
    assert_eq!(h.nic.pending(), 0);
    h.apply(&Op::NicPoll);
    assert_eq!(
        (h.nic.charged(), h.nic.pending()),
        (1, 96),
        "delivery resumed: the 96 segments that queued up share one buffer"
    );
    h.finish();
    assert_eq!(h.received, 100);
}

/// Named buffers posted during the handshake (before any data can arrive) survive the
/// establishment and receive the data directly.
#[test]
fn named_buffer_posted_during_the_handshake_is_filled() {
    let mut h = Harness::new(RxPolicy::IndicateWindow, 8192, AckPolicy::WindowFull);
    h.apply(&Op::Post {
        len: 30_000,
        push: false,
    });
    h.apply(&Op::Cmds(10));
    assert_eq!(h.nic.named_held(), 1);
    h.apply(&Op::Establish);
    assert_eq!(h.nic.named_held(), 1, "the post survives establishment");
    h.apply(&Op::Arrive {
        len: 30_000,
        psh: false,
    });
    h.apply(&Op::NicPoll);
    h.apply(&Op::Evts(10));
    assert_eq!(h.received, 30_000);
    assert_eq!(h.mem.stats().snapshot().host_copy_bytes, 0);
    h.finish();
}
