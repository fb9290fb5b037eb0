//! Two session machines against each other, frames carried by the test (in order, shuffled
//! as over several connections, or lost), on a clock the test moves.

use proptest::prelude::*;
use toe_msg::{Config, Event, Frame, MsgId, RefuseReason, SendError, Session, SessionError, State};

/// An opener `a` and an acceptor `b`, and what moves between them.
struct Pair {
    a: Session,
    b: Session,
    now: u64,
    /// Shuffle each batch of frames with this seed (frames of one pass in any order).
    shuffle: Option<u64>,
    /// Drop `a`'s Data frames (a connection that stopped carrying them).
    drop_a_data: bool,
    /// Messages `b`'s application took: (wire ID, data).
    got: Vec<(u64, Vec<u8>)>,
    events_a: Vec<Event>,
    events_b: Vec<Event>,
}

fn cfg() -> Config {
    Config {
        frame_bytes: 4096,
        ..Config::default()
    }
}

impl Pair {
    fn new(ca: Config, cb: Config) -> Pair {
        let mut a = Session::open(7, "store-1", ca);
        let sync = a.poll_transmit(0).unwrap();
        assert_eq!(a.state(), State::WaitingAck);
        let mut b = Session::incoming(&sync, cb).unwrap();
        assert_eq!(
            b.poll_event(),
            Some(Event::Incoming {
                principal: "store-1".into()
            })
        );
        b.accept();
        let mut p = Pair {
            a,
            b,
            now: 0,
            shuffle: None,
            drop_a_data: false,
            got: Vec::new(),
            events_a: Vec::new(),
            events_b: Vec::new(),
        };
        p.pump(true);
        assert_eq!(p.a.state(), State::Ready);
        assert!(p.events_a.contains(&Event::Created));
        assert!(p.events_b.contains(&Event::Accepted));
        p
    }

    /// Move frames both ways until nothing moves; `b`'s application reads if `read`.
    fn pump(&mut self, read: bool) {
        for round in 0u64.. {
            assert!(round < 1_000_000, "no end to the frames");
            let mut ab = Vec::new();
            while let Some(f) = self.a.poll_transmit(self.now) {
                if !(self.drop_a_data && matches!(f, Frame::Data { .. })) {
                    ab.push(f);
                }
            }
            let mut ba = Vec::new();
            while let Some(f) = self.b.poll_transmit(self.now) {
                ba.push(f);
            }
            if let Some(seed) = self.shuffle {
                shuffle(&mut ab, seed ^ round);
                shuffle(&mut ba, seed.rotate_left(7) ^ round);
            }
            let mut moved = !ab.is_empty() || !ba.is_empty();
            for f in ab {
                self.b.handle(f, self.now);
            }
            for f in ba {
                self.a.handle(f, self.now);
            }
            if read {
                while let Some(m) = self.b.recv(self.now) {
                    self.got.push(m);
                    moved = true;
                }
            }
            self.events_a
                .extend(std::iter::from_fn(|| self.a.poll_event()));
            self.events_b
                .extend(std::iter::from_fn(|| self.b.poll_event()));
            if !moved {
                return;
            }
        }
    }

    /// Move the clock to `t` µs and run both sides' timers.
    fn at(&mut self, t: u64, read: bool) {
        self.now = t;
        self.a.on_time(t);
        self.b.on_time(t);
        self.pump(read);
    }
}

fn shuffle<T>(v: &mut [T], mut x: u64) {
    for i in (1..v.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
}

fn message(i: usize, len: usize) -> Vec<u8> {
    (0..len).map(|k| (k * 31 + i * 7) as u8).collect()
}

proptest! {
    /// Messages of any size arrive whole, once and in order, their frames shuffled as over
    /// many connections; every one is acknowledged and the output queue drains.
    #[test]
    fn messages_arrive_whole_once_and_in_order(
        sizes in proptest::collection::vec(0usize..40_000, 1..24),
        seed in any::<u64>(),
    ) {
        let mut p = Pair::new(cfg(), Config { in_slots: 4, in_queue_bytes: 64 << 10, ..cfg() });
        p.shuffle = Some(seed | 1);
        let mut want = Vec::new();
        for (i, &n) in sizes.iter().enumerate() {
            let m = message(i, n);
            loop {
                match p.a.send(m.clone(), p.now) {
                    Ok(_) => break,
                    Err(SendError::QueueFull { .. }) => p.pump(true),
                    Err(e) => panic!("{e}"),
                }
            }
            want.push(m);
            p.pump(true);
        }
        p.pump(true);
        let got: Vec<Vec<u8>> = p.got.iter().map(|(_, d)| d.clone()).collect();
        prop_assert!(got == want, "{} of {} messages, in order and intact?", got.len(), want.len());
        let ids: Vec<u64> = p.got.iter().map(|(id, _)| *id).collect();
        prop_assert_eq!(ids, (1..=want.len() as u64).collect::<Vec<_>>());
        let acked = p.events_a.iter().filter(|e| matches!(e, Event::Acked { .. })).count();
        prop_assert_eq!(acked, want.len());
        prop_assert_eq!(p.a.out_pending(), 0);
    }
}

#[test]
fn a_full_output_queue_refuses_at_once_and_takes_the_message_after_an_ack() {
    let mut p = Pair::new(
        Config {
            out_queue_bytes: 1 << 20,
            ..cfg()
        },
        cfg(),
    );
    let m = message(0, 600 << 10);
    let first = p.a.send(m.clone(), 0).unwrap();
    assert_eq!(
        p.a.send(m.clone(), 0),
        Err(SendError::QueueFull { free: 424 << 10 })
    );
    assert_eq!(
        p.a.send(vec![0; 2 << 20], 0),
        Err(SendError::TooLarge {
            len: 2 << 20,
            queue: 1 << 20
        })
    );
    p.pump(true);
    assert!(p
        .events_a
        .iter()
        .any(|e| matches!(e, Event::Acked { id, attempts: 1, .. } if *id == first)));
    let second = p.a.send(m.clone(), 0).unwrap();
    assert_eq!(second, MsgId(2));
    p.pump(true);
    assert_eq!(p.got.len(), 2);
    assert!(p.got.iter().all(|(_, d)| *d == m));
}

#[test]
fn wndsize_zero_stalls_the_sender_and_the_next_ack_resumes_it() {
    let mut p = Pair::new(
        cfg(),
        Config {
            in_slots: 2,
            ..cfg()
        },
    );
    for i in 0..4 {
        p.a.send(message(i, 10_000), 0).unwrap();
    }
    // The receiving application does not read: two messages fill its input queue.
    p.pump(false);
    let received = |p: &Pair| {
        p.events_b
            .iter()
            .filter(|e| matches!(e, Event::Received { .. }))
            .count()
    };
    assert_eq!(received(&p), 2);
    assert!(p.events_a.contains(&Event::Stalled), "{:?}", p.events_a);
    assert!(!p.events_a.contains(&Event::Resumed));
    assert_eq!(p.a.out_pending(), 2, "two wait for the window");
    // It takes one: the window update carries WndSize 1 and the third message goes.
    let (id, _) = p.b.recv(0).unwrap();
    assert_eq!(id, 1);
    p.pump(false);
    assert!(p.events_a.contains(&Event::Resumed));
    assert_eq!(received(&p), 3);
    assert!(p.events_a.iter().any(|e| matches!(
        e,
        Event::Delivered { msg: 1, peer_delivered_us, .. } if *peer_delivered_us > 0
    )));
    p.pump(true);
    assert_eq!(p.got.len(), 3);
    assert_eq!(p.a.out_pending(), 0);
    assert_eq!(received(&p), 4);
}

#[test]
fn a_receiver_that_stops_reading_gets_messages_retried_then_retired() {
    let mut p = Pair::new(
        Config {
            retries: 2,
            timeout_us: 60_000_000,
            ..cfg()
        },
        Config {
            in_slots: 1,
            ..cfg()
        },
    );
    let ids: Vec<MsgId> = (0..3)
        .map(|i| p.a.send(message(i, 5000), 0).unwrap())
        .collect();
    p.pump(false);
    assert_eq!(p.a.next_deadline(), Some(60_000_000));
    for t in [60, 120] {
        p.at(t * 1_000_000, false);
        assert!(!p.events_a.iter().any(|e| matches!(e, Event::Failed { .. })));
    }
    p.at(180_000_000, false);
    // The first was acknowledged (it sits in the input queue); the other two failed after
    // their two retries: each message is accounted for, none lost silently.
    for id in &ids {
        let acked = p
            .events_a
            .iter()
            .any(|e| matches!(e, Event::Acked { id: i, .. } if i == id));
        let failed = p
            .events_a
            .iter()
            .any(|e| matches!(e, Event::Failed { id: i, attempts: 3 } if i == id));
        assert!(acked ^ failed, "{id:?}: {:?}", p.events_a);
        assert_eq!(acked, *id == ids[0]);
    }
    assert_eq!(p.a.out_pending(), 0);
    assert_eq!(p.a.out_free(), cfg().out_queue_bytes);
    // The application reads again: the one message comes, and a new one goes through.
    p.pump(true);
    assert_eq!(p.got.len(), 1);
    p.a.send(message(9, 100), p.now).unwrap();
    p.pump(true);
    assert_eq!(p.got.len(), 2);
    assert_eq!(p.got[1].1, message(9, 100));
}

#[test]
fn a_message_retired_half_sent_is_dropped_by_the_peer_and_its_credit_comes_back() {
    let mut p = Pair::new(
        Config {
            retries: 1,
            ..cfg()
        },
        Config {
            in_slots: 1,
            in_queue_bytes: 64 << 10,
            ..cfg()
        },
    );
    p.a.send(message(0, 50_000), 0).unwrap();
    // The first frame gets through, then the connection stops carrying data.
    let f = p.a.poll_transmit(0).unwrap();
    p.b.handle(f, 0);
    p.drop_a_data = true;
    p.pump(true);
    p.at(60_000_000, true);
    p.at(120_000_000, true);
    assert!(p
        .events_a
        .iter()
        .any(|e| matches!(e, Event::Failed { attempts: 2, .. })));
    assert!(p.got.is_empty(), "nothing half delivered");
    // The peer dropped the part and gave the slot and the bytes back: the next message
    // (the whole input queue's size) goes.
    p.drop_a_data = false;
    p.a.send(message(1, 64 << 10), p.now).unwrap();
    p.pump(true);
    assert_eq!(p.got.len(), 1);
    assert_eq!(p.got[0], (2, message(1, 64 << 10)));
}

#[test]
fn a_peer_sending_past_the_window_ends_the_session() {
    let mut p = Pair::new(
        cfg(),
        Config {
            in_slots: 2,
            ..cfg()
        },
    );
    p.b.handle(
        Frame::Data {
            session: 7,
            msg: 3,
            offset: 0,
            total: 10,
            sent_us: 0,
            payload: vec![0; 10],
        },
        0,
    );
    assert_eq!(p.b.state(), State::Closed);
    assert_eq!(
        std::iter::from_fn(|| p.b.poll_event()).last(),
        Some(Event::Error(SessionError::Window { msg: 3 }))
    );
    // A frame that does not fit its message.
    let mut q = Pair::new(cfg(), cfg());
    q.b.handle(
        Frame::Data {
            session: 7,
            msg: 1,
            offset: 8,
            total: 10,
            sent_us: 0,
            payload: vec![0; 4],
        },
        0,
    );
    assert!(std::iter::from_fn(|| q.b.poll_event())
        .any(|e| e == Event::Error(SessionError::BadFrame { msg: 1 })));
}

#[test]
fn refused_and_closed_sessions_say_so() {
    let mut a = Session::open(1, "store", cfg());
    let sync = a.poll_transmit(0).unwrap();
    let mut b = Session::incoming(&sync, cfg()).unwrap();
    b.refuse(RefuseReason::WrongPrincipal);
    a.handle(b.poll_transmit(0).unwrap(), 0);
    assert_eq!(a.state(), State::Closed);
    assert_eq!(
        std::iter::from_fn(|| a.poll_event()).last(),
        Some(Event::Refused(RefuseReason::WrongPrincipal))
    );
    // Closing waits for the queue, then FIN and FIN-ACK close both ends.
    let mut p = Pair::new(cfg(), cfg());
    p.a.send(message(0, 9000), 0).unwrap();
    p.a.close();
    assert_eq!(p.a.send(vec![1], 0), Err(SendError::NotReady));
    p.pump(true);
    assert_eq!(p.got.len(), 1);
    assert_eq!((p.a.state(), p.b.state()), (State::Closed, State::Closed));
    assert!(p.events_a.contains(&Event::Closed) && p.events_b.contains(&Event::Closed));
    // An opener whose SYNC nobody answers gives up at the timeout.
    let mut lone = Session::open(2, "nobody", cfg());
    lone.poll_transmit(0).unwrap();
    lone.on_time(cfg().timeout_us);
    assert_eq!(lone.state(), State::Closed);
    assert_eq!(lone.poll_event(), Some(Event::Error(SessionError::Timeout)));
}

#[test]
fn deliveries_after_the_fin_still_reach_the_opener_before_it_closes() {
    // Seed 003 #3's receiver timestamps: the application takes its last messages after
    // the peer's FIN; their acknowledgements (with when each was taken) go before the
    // FIN-ACK, so the opener's latency log is complete when it is closed.
    let mut p = Pair::new(cfg(), cfg());
    for i in 0..3 {
        p.a.send(message(i, 9000), 0).unwrap();
    }
    p.a.close();
    p.pump(false); // all acknowledged as received, none taken; the FIN arrives
    assert_eq!(p.a.out_pending(), 0);
    assert_eq!(
        p.a.state(),
        State::SendingFin,
        "the FIN-ACK waits for the application"
    );
    assert_eq!(p.b.state(), State::Closed);
    let delivered = |p: &Pair| {
        p.events_a
            .iter()
            .filter(|e| matches!(e, Event::Delivered { peer_delivered_us, .. } if *peer_delivered_us > 0))
            .count()
    };
    assert_eq!(delivered(&p), 0);
    p.now = 5_000;
    p.pump(true);
    assert_eq!(p.got.len(), 3);
    assert_eq!(delivered(&p), 3, "{:?}", p.events_a);
    assert_eq!(p.a.state(), State::Closed);
    let closed_at = p.events_a.iter().position(|e| *e == Event::Closed).unwrap();
    let last_delivery = p
        .events_a
        .iter()
        .rposition(|e| matches!(e, Event::Delivered { .. }))
        .unwrap();
    assert!(last_delivery < closed_at, "{:?}", p.events_a);
}

fn hostile_frame() -> impl Strategy<Value = Frame> {
    let w = (0u64..200, 0u64..1 << 24)
        .prop_map(|(max_msg, max_bytes)| toe_msg::Window { max_msg, max_bytes });
    prop_oneof![
        (
            0u64..12,
            0u64..70_000,
            0u64..70_000,
            proptest::collection::vec(any::<u8>(), 0..3000)
        )
            .prop_map(|(msg, offset, total, payload)| Frame::Data {
                session: 7,
                msg,
                offset,
                total,
                sent_us: 0,
                payload,
            }),
        (0u64..12, w).prop_map(|(msg, window)| Frame::Ack {
            session: 7,
            msg,
            window,
            sent_us: 5,
            received_us: 6,
            delivered_us: 7,
        }),
        (0u64..12, 0u64..1 << 40).prop_map(|(msg, total)| Frame::Abort {
            session: 7,
            msg,
            total
        }),
        Just(Frame::Fin { session: 7 }),
        Just(Frame::FinAck { session: 7 }),
        Just(Frame::Prime { len: 3 }),
        Just(Frame::Accept {
            session: 7,
            window: toe_msg::Window::default()
        }),
    ]
}

proptest! {
    /// Any sequence of frames from a hostile peer: the session never panics, never holds
    /// more than its input queue, and either goes on or ends with an error (and then takes
    /// nothing more).
    #[test]
    fn arbitrary_frames_never_panic_a_session(frames in proptest::collection::vec(hostile_frame(), 1..40)) {
        let limit = 64usize << 10;
        let mut p = Pair::new(cfg(), Config { in_slots: 4, in_queue_bytes: limit, ..cfg() });
        p.a.send(message(0, 10_000), 0).unwrap();
        for f in frames {
            p.b.handle(f, 1);
            prop_assert!(p.b.in_queue_used() <= limit as u64);
            while p.b.poll_transmit(1).is_some() {}
            while let Some((_, d)) = p.b.recv(1) {
                prop_assert!(d.len() <= limit);
            }
            prop_assert!(p.b.in_queue_used() <= limit as u64);
            while let Some(e) = p.b.poll_event() {
                if let Event::Error(_) = e {
                    prop_assert_eq!(p.b.state(), State::Closed);
                }
            }
        }
        // The opener's side takes the same abuse.
        p.a.on_time(u64::MAX);
        while p.a.poll_transmit(2).is_some() {}
    }
}

/// Over several connections the acceptor's first message may overtake its ACK: the opener
/// takes it while it waits, then the ACK.
#[test]
fn an_acceptors_message_may_overtake_its_ack() {
    let mut a = Session::open(3, "store", cfg());
    let sync = a.poll_transmit(0).unwrap();
    let mut b = Session::incoming(&sync, cfg()).unwrap();
    b.accept();
    b.send(message(1, 10_000), 0).unwrap();
    let frames: Vec<Frame> = std::iter::from_fn(|| b.poll_transmit(0)).collect();
    assert!(matches!(frames[0], Frame::Accept { .. }));
    for f in frames[1..].iter().chain(&frames[..1]) {
        a.handle(f.clone(), 0);
    }
    assert_eq!(a.state(), State::Ready);
    assert_eq!(a.recv(0).map(|(_, d)| d), Some(message(1, 10_000)));
}
