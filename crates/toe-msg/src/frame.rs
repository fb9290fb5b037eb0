//! The wire format of toe-msg: frames on a byte stream (a TCP connection, plain or TLS).
//!
//! Every frame is a 12-byte header and a body, big-endian:
//!
//! ```text
//! 0   magic "TM" (2)      2  version (1)     3  kind (1)
//! 4   session id (4)      8  body length, bytes (4)
//! 12  body
//! ```
//!
//! Kinds and bodies:
//!
//! | kind | frame      | body                                                                |
//! |------|------------|---------------------------------------------------------------------|
//! | 1    | `Sync`     | out queue (4), in queue (4), in slots (4), principal length (2), principal (UTF-8) |
//! | 2    | `Accept`   | window: last message ID (8), byte limit (8)                         |
//! | 3    | `Refuse`   | reason (1)                                                          |
//! | 4    | `Data`     | message (8), offset (8), total (8), sent µs (8), payload            |
//! | 5    | `Ack`      | message (8), window (16), sent µs (8), received µs (8), delivered µs (8) |
//! | 6    | `Abort`    | message (8), its length (8): the sender retired it; drop what came  |
//! | 7    | `Fin`      | (none)                                                              |
//! | 8    | `FinAck`   | (none)                                                              |
//! | 9    | `Prime`    | zeros (any length): priming a new connection, session 0, dropped     |
//!
//! A message is cut into `Data` frames; `offset` and `total` place each in the message, which
//! the receiver reassembles (the frames of one message may come over several connections,
//! in any order). The window is a credit: the sender may start the messages whose IDs are
//! at most `max_msg`, while the bytes of every message it started stay within `max_bytes`
//! (both counted from the session's start), so it holds up under reordering; seed 002's
//! WndSize is `max_msg` less the last message started (0: the sender holds). An `Ack`
//! repeating a message ID is a window update. [`decode`] never panics: malformed input is an error naming what was wrong,
//! and a body longer than the caller's limit is refused before it is buffered.

use thiserror::Error;

/// Bytes of a frame header.
pub const HEADER_LEN: usize = 12;

/// The magic at the start of every frame.
pub const MAGIC: [u8; 2] = *b"TM";

/// The format's version.
pub const VERSION: u8 = 1;

/// Longest principal name, bytes.
pub const MAX_PRINCIPAL: usize = 255;

/// Why a peer refused a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefuseReason {
    /// The application refused it.
    Refused,
    /// The principal named is not the peer's authenticated identity.
    WrongPrincipal,
    /// No room for another session.
    Busy,
    /// A reason this version does not know (its code).
    Other(u8),
}

impl RefuseReason {
    fn code(self) -> u8 {
        match self {
            RefuseReason::Refused => 1,
            RefuseReason::WrongPrincipal => 2,
            RefuseReason::Busy => 3,
            RefuseReason::Other(c) => c,
        }
    }

    fn from_code(c: u8) -> Self {
        match c {
            1 => RefuseReason::Refused,
            2 => RefuseReason::WrongPrincipal,
            3 => RefuseReason::Busy,
            c => RefuseReason::Other(c),
        }
    }
}

/// A receiver's window, as each `Accept` and `Ack` carries it: a credit counted from the
/// session's start (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Window {
    /// The sender may start messages with IDs up to this one.
    pub max_msg: u64,
    /// ... while the lengths of all messages it started add up to at most this, bytes.
    pub max_bytes: u64,
}

/// One frame. Times are µs of the sender's (for `sent_us`) or the receiver's clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Open a session: the opener's queue sizes, and the principal it wants to reach.
    Sync {
        /// Session ID (chosen by the opener, unique on its pipe).
        session: u32,
        /// The opener's output queue, bytes.
        out_queue: u32,
        /// The opener's input queue, bytes.
        in_queue: u32,
        /// The opener's input slots (messages).
        in_slots: u32,
        /// The principal the opener wants (checked against the peer's certificate).
        principal: String,
    },
    /// The application accepted the session; the acceptor's window.
    Accept {
        /// Session ID.
        session: u32,
        /// The acceptor's window.
        window: Window,
    },
    /// The session is refused.
    Refuse {
        /// Session ID.
        session: u32,
        /// Why.
        reason: RefuseReason,
    },
    /// Part of a message.
    Data {
        /// Session ID.
        session: u32,
        /// Message ID (from 1, +1 per message of the session).
        msg: u64,
        /// Where the payload goes in the message, bytes.
        offset: u64,
        /// The message's length, bytes.
        total: u64,
        /// When the sender (re)started sending the message, µs of its clock.
        sent_us: u64,
        /// The bytes.
        payload: Vec<u8>,
    },
    /// Message `msg` arrived whole (or, repeated, a window update).
    Ack {
        /// Session ID.
        session: u32,
        /// Message ID.
        msg: u64,
        /// The receiver's window after it.
        window: Window,
        /// The message's `sent_us`, echoed.
        sent_us: u64,
        /// When its last byte arrived, µs of the receiver's clock.
        received_us: u64,
        /// When the application took it (0: not yet), µs of the receiver's clock.
        delivered_us: u64,
    },
    /// The sender retired message `msg` (timed out): what arrived of it is dropped.
    Abort {
        /// Session ID.
        session: u32,
        /// Message ID.
        msg: u64,
        /// Its length, bytes (the receiver gives the credit back).
        total: u64,
    },
    /// Close the session.
    Fin {
        /// Session ID.
        session: u32,
    },
    /// The close is acknowledged.
    FinAck {
        /// Session ID.
        session: u32,
    },
    /// Priming (seed 003 #1): `len` bytes of padding that grow a new connection's
    /// congestion window and measure it before data depends on it. It belongs to no
    /// session (its session field is 0) and the receiver drops it.
    Prime {
        /// Padding bytes.
        len: u32,
    },
}

impl Frame {
    /// The session it belongs to.
    pub fn session(&self) -> u32 {
        match self {
            Frame::Sync { session, .. }
            | Frame::Accept { session, .. }
            | Frame::Refuse { session, .. }
            | Frame::Data { session, .. }
            | Frame::Ack { session, .. }
            | Frame::Abort { session, .. }
            | Frame::Fin { session }
            | Frame::FinAck { session } => *session,
            Frame::Prime { .. } => 0,
        }
    }

    /// The frame kind's name (`Sync`, `Data`, ...), for errors.
    pub fn name(&self) -> &'static str {
        match self {
            Frame::Sync { .. } => "Sync",
            Frame::Accept { .. } => "Accept",
            Frame::Refuse { .. } => "Refuse",
            Frame::Data { .. } => "Data",
            Frame::Ack { .. } => "Ack",
            Frame::Abort { .. } => "Abort",
            Frame::Fin { .. } => "Fin",
            Frame::FinAck { .. } => "FinAck",
            Frame::Prime { .. } => "Prime",
        }
    }

    /// Bytes it takes on the wire.
    pub fn wire_len(&self) -> usize {
        HEADER_LEN
            + match self {
                Frame::Sync { principal, .. } => 14 + principal.len(),
                Frame::Accept { .. } => 16,
                Frame::Refuse { .. } => 1,
                Frame::Data { payload, .. } => 32 + payload.len(),
                Frame::Ack { .. } => 48,
                Frame::Abort { .. } => 16,
                Frame::Fin { .. } | Frame::FinAck { .. } => 0,
                Frame::Prime { len } => *len as usize,
            }
    }

    /// Append the frame's bytes to `out`.
    ///
    /// # Panics
    /// If a `Sync` principal is longer than [`MAX_PRINCIPAL`] or a body longer than
    /// `u32::MAX` (API misuse: the session machine never builds either).
    pub fn encode(&self, out: &mut Vec<u8>) {
        let body = (self.wire_len() - HEADER_LEN) as u32;
        out.reserve(self.wire_len());
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.push(self.kind());
        out.extend_from_slice(&self.session().to_be_bytes());
        out.extend_from_slice(&body.to_be_bytes());
        let window = |out: &mut Vec<u8>, w: &Window| {
            out.extend_from_slice(&w.max_msg.to_be_bytes());
            out.extend_from_slice(&w.max_bytes.to_be_bytes());
        };
        match self {
            Frame::Sync {
                out_queue,
                in_queue,
                in_slots,
                principal,
                ..
            } => {
                assert!(principal.len() <= MAX_PRINCIPAL, "principal too long");
                for v in [out_queue, in_queue, in_slots] {
                    out.extend_from_slice(&v.to_be_bytes());
                }
                out.extend_from_slice(&(principal.len() as u16).to_be_bytes());
                out.extend_from_slice(principal.as_bytes());
            }
            Frame::Accept { window: w, .. } => window(out, w),
            Frame::Refuse { reason, .. } => out.push(reason.code()),
            Frame::Data {
                msg,
                offset,
                total,
                sent_us,
                payload,
                ..
            } => {
                for v in [msg, offset, total, sent_us] {
                    out.extend_from_slice(&v.to_be_bytes());
                }
                out.extend_from_slice(payload);
            }
            Frame::Ack {
                msg,
                window: w,
                sent_us,
                received_us,
                delivered_us,
                ..
            } => {
                out.extend_from_slice(&msg.to_be_bytes());
                window(out, w);
                for v in [sent_us, received_us, delivered_us] {
                    out.extend_from_slice(&v.to_be_bytes());
                }
            }
            Frame::Abort { msg, total, .. } => {
                out.extend_from_slice(&msg.to_be_bytes());
                out.extend_from_slice(&total.to_be_bytes());
            }
            Frame::Fin { .. } | Frame::FinAck { .. } => {}
            Frame::Prime { len } => out.resize(out.len() + *len as usize, 0),
        }
    }

    fn kind(&self) -> u8 {
        match self {
            Frame::Sync { .. } => 1,
            Frame::Accept { .. } => 2,
            Frame::Refuse { .. } => 3,
            Frame::Data { .. } => 4,
            Frame::Ack { .. } => 5,
            Frame::Abort { .. } => 6,
            Frame::Fin { .. } => 7,
            Frame::FinAck { .. } => 8,
            Frame::Prime { .. } => 9,
        }
    }
}

/// Why bytes are not a frame. The connection carrying them is broken: the peer is not
/// speaking this protocol, or a different version of it.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FrameError {
    /// The first two bytes are not "TM".
    #[error("bad magic {0:02x?}")]
    BadMagic([u8; 2]),
    /// A version this one does not speak.
    #[error("version {0} (this is version {VERSION})")]
    Version(u8),
    /// An unknown frame kind.
    #[error("unknown frame kind {0}")]
    Kind(u8),
    /// The body is longer than the receiver takes.
    #[error("a body of {len} bytes, more than the {max} taken")]
    TooLong {
        /// The length the header names.
        len: u32,
        /// The receiver's limit.
        max: u32,
    },
    /// The body's length does not fit its kind.
    #[error("a {kind} body of {len} bytes")]
    BadLength {
        /// The frame kind.
        kind: &'static str,
        /// The body's length.
        len: usize,
    },
    /// The principal is not UTF-8.
    #[error("the principal is not UTF-8")]
    Principal,
}

/// The first frame in `bytes`, with the bytes it took: `Ok(None)` if `bytes` hold only part
/// of one (read more). A header naming a body longer than `max_body` is refused at once,
/// so a receiver never buffers more than `HEADER_LEN + max_body` for one frame.
pub fn decode(bytes: &[u8], max_body: u32) -> Result<Option<(Frame, usize)>, FrameError> {
    if bytes.len() >= 2 && bytes[..2] != MAGIC {
        return Err(FrameError::BadMagic([bytes[0], bytes[1]]));
    }
    if bytes.len() >= 3 && bytes[2] != VERSION {
        return Err(FrameError::Version(bytes[2]));
    }
    if bytes.len() >= 4 && !(1..=9).contains(&bytes[3]) {
        return Err(FrameError::Kind(bytes[3]));
    }
    if bytes.len() < HEADER_LEN {
        return Ok(None);
    }
    let session = u32::from_be_bytes(bytes[4..8].try_into().expect("4 bytes"));
    let len = u32::from_be_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if len > max_body {
        return Err(FrameError::TooLong { len, max: max_body });
    }
    let end = HEADER_LEN + len as usize;
    let Some(body) = bytes.get(HEADER_LEN..end) else {
        return Ok(None);
    };
    let mut r = Reader(body);
    let frame = match bytes[3] {
        1 => {
            let bad = || FrameError::BadLength {
                kind: "Sync",
                len: body.len(),
            };
            let (out_queue, in_queue, in_slots) = (r.u32(), r.u32(), r.u32());
            let n = r.u16().ok_or_else(bad)? as usize;
            let p = r.rest();
            if p.len() != n || n > MAX_PRINCIPAL {
                return Err(bad());
            }
            Frame::Sync {
                session,
                out_queue: out_queue.ok_or_else(bad)?,
                in_queue: in_queue.ok_or_else(bad)?,
                in_slots: in_slots.ok_or_else(bad)?,
                principal: std::str::from_utf8(p)
                    .map_err(|_| FrameError::Principal)?
                    .to_string(),
            }
        }
        2 => {
            exact(body, 16, "Accept")?;
            Frame::Accept {
                session,
                window: r.window().expect("16 bytes"),
            }
        }
        3 => {
            exact(body, 1, "Refuse")?;
            Frame::Refuse {
                session,
                reason: RefuseReason::from_code(body[0]),
            }
        }
        4 => {
            if body.len() < 32 {
                return Err(FrameError::BadLength {
                    kind: "Data",
                    len: body.len(),
                });
            }
            let v: Vec<u64> = (0..4).map(|_| r.u64().expect("32 bytes")).collect();
            Frame::Data {
                session,
                msg: v[0],
                offset: v[1],
                total: v[2],
                sent_us: v[3],
                payload: r.rest().to_vec(),
            }
        }
        5 => {
            exact(body, 48, "Ack")?;
            let msg = r.u64().expect("48 bytes");
            let window = r.window().expect("48 bytes");
            Frame::Ack {
                session,
                msg,
                window,
                sent_us: r.u64().expect("48 bytes"),
                received_us: r.u64().expect("48 bytes"),
                delivered_us: r.u64().expect("48 bytes"),
            }
        }
        6 => {
            exact(body, 16, "Abort")?;
            Frame::Abort {
                session,
                msg: r.u64().expect("16 bytes"),
                total: r.u64().expect("16 bytes"),
            }
        }
        7 => {
            exact(body, 0, "Fin")?;
            Frame::Fin { session }
        }
        8 => {
            exact(body, 0, "FinAck")?;
            Frame::FinAck { session }
        }
        _ => {
            // Padding is zeros in session 0: nothing else rides on a priming frame.
            if session != 0 || body.iter().any(|&b| b != 0) {
                return Err(FrameError::BadLength {
                    kind: "Prime",
                    len: body.len(),
                });
            }
            Frame::Prime { len }
        }
    };
    Ok(Some((frame, end)))
}

fn exact(body: &[u8], n: usize, kind: &'static str) -> Result<(), FrameError> {
    if body.len() == n {
        Ok(())
    } else {
        Err(FrameError::BadLength {
            kind,
            len: body.len(),
        })
    }
}

/// Big-endian fields off the front of a body.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (a, b) = self.0.split_at_checked(N)?;
        self.0 = b;
        a.try_into().ok()
    }
    fn u16(&mut self) -> Option<u16> {
        self.take().map(u16::from_be_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take().map(u32::from_be_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take().map(u64::from_be_bytes)
    }
    fn window(&mut self) -> Option<Window> {
        Some(Window {
            max_msg: self.u64()?,
            max_bytes: self.u64()?,
        })
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn window() -> impl Strategy<Value = Window> {
        (any::<u64>(), any::<u64>()).prop_map(|(max_msg, max_bytes)| Window { max_msg, max_bytes })
    }

    fn frame() -> impl Strategy<Value = Frame> {
        let s = any::<u32>();
        prop_oneof![
            (
                s,
                any::<u32>(),
                any::<u32>(),
                any::<u32>(),
                "[a-zA-Z0-9.:_-]{0,64}"
            )
                .prop_map(|(session, out_queue, in_queue, in_slots, principal)| {
                    Frame::Sync {
                        session,
                        out_queue,
                        in_queue,
                        in_slots,
                        principal,
                    }
                }),
            (s, window()).prop_map(|(session, window)| Frame::Accept { session, window }),
            (s, any::<u8>()).prop_map(|(session, c)| Frame::Refuse {
                session,
                reason: RefuseReason::from_code(c),
            }),
            (
                s,
                any::<[u64; 4]>(),
                proptest::collection::vec(any::<u8>(), 0..300)
            )
                .prop_map(|(session, v, payload)| Frame::Data {
                    session,
                    msg: v[0],
                    offset: v[1],
                    total: v[2],
                    sent_us: v[3],
                    payload,
                }),
            (s, any::<[u64; 4]>(), window()).prop_map(|(session, v, window)| Frame::Ack {
                session,
                msg: v[0],
                window,
                sent_us: v[1],
                received_us: v[2],
                delivered_us: v[3],
            }),
            (s, any::<u64>(), any::<u64>()).prop_map(|(session, msg, total)| Frame::Abort {
                session,
                msg,
                total
            }),
            s.prop_map(|session| Frame::Fin { session }),
            s.prop_map(|session| Frame::FinAck { session }),
            (0u32..5000).prop_map(|len| Frame::Prime { len }),
        ]
    }

    proptest! {
        /// Every frame decodes to itself from its bytes, taking exactly them; any strict
        /// prefix asks for more.
        #[test]
        fn frames_round_trip(f in frame(), cut in any::<prop::sample::Index>()) {
            let mut b = Vec::new();
            f.encode(&mut b);
            prop_assert_eq!(b.len(), f.wire_len());
            let got = decode(&b, 1 << 20).unwrap();
            prop_assert_eq!(got, Some((f.clone(), b.len())));
            let at = cut.index(b.len());
            prop_assert_eq!(decode(&b[..at], 1 << 20).unwrap(), None);
        }

        /// Arbitrary bytes never panic the decoder; what it takes is within them and a
        /// frame it returns encodes back to exactly those bytes (nothing is invented).
        #[test]
        fn arbitrary_bytes_decode_or_fail_cleanly(mut b in proptest::collection::vec(any::<u8>(), 0..200), real in any::<bool>()) {
            if real && b.len() >= 4 {
                // Mostly-valid headers reach the body checks.
                b[..3].copy_from_slice(&[b'T', b'M', VERSION]);
                b[3] = 1 + b[3] % 9;
            }
            if let Ok(Some((f, n))) = decode(&b, 128) {
                prop_assert!(n <= b.len());
                let mut again = Vec::new();
                f.encode(&mut again);
                prop_assert_eq!(&again[..], &b[..n]);
            }
        }
    }

    #[test]
    fn malformed_headers_and_bodies_are_named() {
        assert_eq!(decode(b"XX", 10), Err(FrameError::BadMagic(*b"XX")));
        assert_eq!(decode(b"TM\x02", 10), Err(FrameError::Version(2)));
        // A priming frame carries zeros in session 0, nothing else.
        let mut p = Vec::new();
        Frame::Prime { len: 4 }.encode(&mut p);
        assert_eq!(decode(&p, 10), Ok(Some((Frame::Prime { len: 4 }, p.len()))));
        p[HEADER_LEN + 2] = 1;
        let bad = Err(FrameError::BadLength {
            kind: "Prime",
            len: 4,
        });
        assert_eq!(decode(&p, 10), bad);
        p[HEADER_LEN + 2] = 0;
        p[7] = 1; // session 1
        assert_eq!(decode(&p, 10), bad);
        assert_eq!(decode(b"TM\x01\x0a", 10), Err(FrameError::Kind(10)));
        let mut b = Vec::new();
        Frame::Data {
            session: 1,
            msg: 1,
            offset: 0,
            total: 100,
            sent_us: 0,
            payload: vec![7; 100],
        }
        .encode(&mut b);
        // Refused from the header alone: nothing of the body need be buffered.
        assert_eq!(
            decode(&b[..HEADER_LEN], 64),
            Err(FrameError::TooLong { len: 132, max: 64 })
        );
        let mut fin = Vec::new();
        Frame::Fin { session: 3 }.encode(&mut fin);
        fin[11] = 1;
        fin.push(0);
        assert_eq!(
            decode(&fin, 64),
            Err(FrameError::BadLength {
                kind: "Fin",
                len: 1
            })
        );
    }
}
