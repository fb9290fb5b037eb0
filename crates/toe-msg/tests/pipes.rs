//! Two pipes joined by many connections (byte queues the test moves in random order and
//! random chunks, so frames of one message arrive over different connections out of
//! order and cut anywhere).

use std::collections::{BTreeMap, VecDeque};

use toe_msg::{Config, Event, Pipe, PipeConfig, PipeEvent, RefuseReason, SendError};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// `a` (the opener) and `b`, with `conns` connections; bytes in flight per direction.
struct Net {
    a: Pipe,
    b: Pipe,
    ab: Vec<VecDeque<u8>>,
    ba: Vec<VecDeque<u8>>,
    rng: Rng,
    /// Every this many fills of `a`, its data frames are handed back to be carried again
    /// (as a shell does for a stalled connection), and a priming frame goes first.
    resend_every: Option<u64>,
    fills: u64,
}

impl Net {
    fn new(conns: usize, cfg: PipeConfig, seed: u64) -> Net {
        let (mut a, mut b) = (Pipe::new(cfg), Pipe::new(cfg));
        for _ in 0..conns {
            assert_eq!(a.add_conn(), b.add_conn());
        }
        Net {
            a,
            b,
            ab: vec![VecDeque::new(); conns],
            ba: vec![VecDeque::new(); conns],
            rng: Rng(seed | 1),
            resend_every: None,
            fills: 0,
        }
    }

    /// One pass: every connection with room takes frames (one frame's worth), then some
    /// connections, in random order, deliver a random part of what they carry. True if
    /// anything moved.
    fn pass(&mut self, now: u64) -> bool {
        let n = self.ab.len();
        let mut moved = false;
        let mut out = Vec::new();
        for c in 0..n {
            if self.ab[c].len() < 16 << 10 {
                out.clear();
                moved |= self.a.fill(c, &mut out, 8 << 10, now) > 0;
                self.fills += 1;
                if self.resend_every.is_some_and(|k| self.fills % k == 0) {
                    let again: Vec<u8> = self
                        .a
                        .data_spans()
                        .iter()
                        .flat_map(|r| out[r.clone()].to_vec())
                        .collect();
                    if !again.is_empty() {
                        self.a.resend(again);
                        let mut prime = Vec::new();
                        toe_msg::Frame::Prime { len: 100 }.encode(&mut prime);
                        self.ab[c].extend(&prime);
                    }
                }
                self.ab[c].extend(&out);
            }
            if self.ba[c].len() < 16 << 10 {
                out.clear();
                moved |= self.b.fill(c, &mut out, 8 << 10, now) > 0;
                self.ba[c].extend(&out);
            }
        }
        for _ in 0..n {
            let c = self.rng.below(n as u64) as usize;
            for (q, to) in [
                (&mut self.ab[c], &mut self.b),
                (&mut self.ba[c], &mut self.a),
            ] {
                if q.is_empty() {
                    continue;
                }
                let k = 1 + self.rng.below(q.len() as u64) as usize;
                let bytes: Vec<u8> = q.drain(..k).collect();
                to.on_bytes(c, &bytes, now);
                moved = true;
            }
        }
        moved
    }
}

fn payload(session: u32, i: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|k| (k as u32 ^ session.wrapping_mul(2654435761) ^ (i as u32 * 97)) as u8)
        .collect()
}

fn cfg() -> PipeConfig {
    PipeConfig {
        session: Config {
            out_queue_bytes: 24 << 10,
            in_queue_bytes: 32 << 10,
            in_slots: 4,
            frame_bytes: 2048,
            ..Config::default()
        },
        max_sessions: 128,
    }
}

/// A thousand connections, a hundred sessions each sending twenty messages of 1–8 KiB:
/// every message arrives once, whole and in order per session; full output queues refuse
/// at once and the senders retry; every session closes.
#[test]
fn a_pipe_of_1000_connections_carries_100_sessions_intact() {
    let mut net = Net::new(1000, cfg(), 0x5eed);
    let queue_full = exchange(&mut net, 100);
    assert!(queue_full > 0, "queue-full refusals were seen and retried");
}

/// Data frames carried twice (a shell resending what a stalled connection holds) and
/// priming frames between them: every message still arrives once, whole, in order.
#[test]
fn frames_carried_again_and_priming_frames_change_no_message() {
    let mut net = Net::new(10, cfg(), 0xbee);
    net.resend_every = Some(3);
    exchange(&mut net, 10);
    assert!(net.a.resent_bytes() > 0);
    assert!(net.b.prime_received() >= 100, "{}", net.b.prime_received());
}

/// `sessions` sessions of `net.a` send twenty messages of 1–8 KiB each to `net.b`:
/// checks every message arrived once, whole and in order per session and every session
/// closed; returns the queue-full refusals seen (and retried).
fn exchange(net: &mut Net, sessions: u32) -> u64 {
    let mut rng = Rng(77);
    let ids: Vec<u32> = (0..sessions)
        .map(|i| net.a.open(&format!("store-{i}")))
        .collect();
    let plan: BTreeMap<u32, Vec<Vec<u8>>> = ids
        .iter()
        .map(|&s| {
            let msgs = (0..20)
                .map(|i| payload(s, i, 1024 + rng.below(7 * 1024) as usize))
                .collect();
            (s, msgs)
        })
        .collect();
    let mut next: BTreeMap<u32, usize> = ids.iter().map(|&s| (s, 0)).collect();
    let mut ready: Vec<u32> = Vec::new();
    let mut got: BTreeMap<u32, Vec<Vec<u8>>> = BTreeMap::new();
    let mut queue_full = 0;
    let mut closed = 0;
    let mut now = 0u64;
    for pass in 0.. {
        assert!(pass < 200_000, "stuck: {} sessions closed", closed);
        now += 10;
        // Senders queue what fits; a full queue says so at once.
        for &s in &ready {
            let i = next[&s];
            if i == 20 {
                continue;
            }
            let sess = net.a.session(s).unwrap();
            match sess.send(plan[&s][i].clone(), now) {
                Ok(_) => {
                    *next.get_mut(&s).unwrap() += 1;
                    if i == 19 {
                        sess.close();
                    }
                }
                Err(SendError::QueueFull { .. }) => queue_full += 1,
                Err(e) => panic!("session {s}: {e}"),
            }
        }
        let moved = net.pass(now);
        while let Some(e) = net.b.poll_event() {
            match e {
                PipeEvent::Session {
                    id,
                    event: Event::Incoming { principal },
                } => {
                    assert_eq!(principal, format!("store-{}", id - 1));
                    net.b.session(id).unwrap().accept();
                }
                PipeEvent::Session {
                    id,
                    event: Event::Received { .. },
                } => {
                    let (_, m) = net.b.session(id).unwrap().recv(now).unwrap();
                    got.entry(id).or_default().push(m);
                }
                PipeEvent::Session {
                    event: Event::Accepted | Event::Closed,
                    ..
                } => {}
                e => panic!("acceptor: {e:?}"),
            }
        }
        while let Some(e) = net.a.poll_event() {
            match e {
                PipeEvent::Session {
                    id,
                    event: Event::Created,
                } => ready.push(id),
                PipeEvent::Session {
                    event: Event::Closed,
                    ..
                } => closed += 1,
                PipeEvent::Session {
                    event:
                        Event::Departed { .. }
                        | Event::Acked { .. }
                        | Event::Delivered { .. }
                        | Event::Stalled
                        | Event::Resumed,
                    ..
                } => {}
                e => panic!("opener: {e:?}"),
            }
        }
        if closed == sessions && !moved {
            break;
        }
    }
    assert!(
        got == plan,
        "every message once, whole, in order per session"
    );
    assert_eq!(net.a.sessions(), 0);
    assert_eq!(net.b.sessions(), 0);
    queue_full
}

/// Bytes that are not frames break only their connection; the sessions go on over the
/// others. An acceptor with no room for another session refuses it as busy.
#[test]
fn garbage_breaks_one_connection_and_a_full_pipe_refuses_sessions() {
    let cfg = PipeConfig {
        max_sessions: 1,
        ..PipeConfig::default()
    };
    let mut net = Net::new(3, cfg, 9);
    net.b.on_bytes(1, b"GET / HTTP/1.1\r\n\r\n", 0);
    assert!(matches!(
        net.b.poll_event(),
        Some(PipeEvent::ConnBroken { conn: 1, .. })
    ));
    // The shell closes it: the other end sees it go.
    net.a.conn_down(1);
    assert_eq!(net.a.conns_up(), 2);
    let first = net.a.open("store");
    let second = net.a.open("store");
    let mut refused = false;
    let mut msgs = 0;
    for _ in 0..1000 {
        net.pass(0);
        while let Some(e) = net.b.poll_event() {
            match e {
                PipeEvent::Session {
                    id,
                    event: Event::Incoming { .. },
                } => net.b.session(id).unwrap().accept(),
                PipeEvent::Session {
                    id,
                    event: Event::Received { .. },
                } => {
                    net.b.session(id).unwrap().recv(0).unwrap();
                    msgs += 1;
                }
                _ => {}
            }
        }
        while let Some(e) = net.a.poll_event() {
            match e {
                PipeEvent::Session {
                    id,
                    event: Event::Refused(RefuseReason::Busy),
                } => {
                    assert_eq!(id, second);
                    refused = true;
                }
                PipeEvent::Session {
                    id,
                    event: Event::Created,
                } => {
                    assert_eq!(id, first);
                    net.a
                        .session(id)
                        .unwrap()
                        .send(vec![5; 300_000], 0)
                        .unwrap();
                }
                _ => {}
            }
        }
    }
    assert!(refused);
    assert_eq!(msgs, 1, "the message went over the two connections left");
    assert_eq!(net.b.conns_up(), 2);
}
