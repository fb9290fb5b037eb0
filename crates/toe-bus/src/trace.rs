//! Tracing of bus traffic: every command and event can be handed to a [`TraceSink`] as a
//! [`TraceRecord`] (time, direction, kind, connection, numeric fields). The driver records
//! what it sends and what it receives; formatting (JSON lines) is the caller's business.
//! On the virtual clock the record stream is deterministic, so two runs with the same seed
//! produce identical traces.

use crate::ring::{Command, ConnId, Event, ReturnReason};

/// Direction of a traced message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Host -> NIC.
    Command,
    /// NIC -> host.
    Event,
}

impl Dir {
    /// `"cmd"` or `"evt"`.
    pub fn name(self) -> &'static str {
        match self {
            Dir::Command => "cmd",
            Dir::Event => "evt",
        }
    }
}

/// One traced message.
#[derive(Debug, Clone, Copy)]
pub struct TraceRecord<'a> {
    /// Time in microseconds of the clock the driver runs on.
    pub t_us: i64,
    /// Direction.
    pub dir: Dir,
    /// Message kind, e.g. `"IndicateData"`.
    pub kind: &'static str,
    /// Connection, if the message names one.
    pub conn: Option<ConnId>,
    /// Numeric fields (`len`, `bytes`, `offset`, `psh`, ...), in a fixed order per kind.
    pub fields: &'a [(&'static str, u64)],
    /// Reason text for returns and errors, if any.
    pub why: Option<&'static str>,
}

/// Receives trace records.
pub trait TraceSink: Send {
    /// Take one record.
    fn record(&mut self, rec: &TraceRecord<'_>);
}

/// The name of a return reason.
pub fn reason_name(why: ReturnReason) -> &'static str {
    match why {
        ReturnReason::Full => "full",
        ReturnReason::Push => "push",
        ReturnReason::PushTimer => "push-timer",
        ReturnReason::Eof => "eof",
        ReturnReason::Cancelled => "cancelled",
        ReturnReason::Reset => "reset",
        ReturnReason::Stale => "stale",
    }
}

/// Describe a command: (kind, connection, reason); numeric fields are appended to `f`.
pub fn describe_command(
    c: &Command,
    f: &mut Vec<(&'static str, u64)>,
) -> (&'static str, Option<ConnId>, Option<&'static str>) {
    match c {
        Command::Listen {
            port,
            backlog,
            params,
        } => {
            f.extend([
                ("port", *port as u64),
                ("backlog", *backlog as u64),
                ("window", params.indicate_window as u64),
            ]);
            ("Listen", None, Some(params.policy.name()))
        }
        Command::Unlisten { port } => {
            f.push(("port", *port as u64));
            ("Unlisten", None, None)
        }
        Command::Connect {
            conn,
            remote,
            params,
            ..
        } => {
            f.extend([
                ("port", remote.port() as u64),
                ("window", params.indicate_window as u64),
            ]);
            ("Connect", Some(*conn), Some(params.policy.name()))
        }
        Command::PostAnonymous { bufs } => {
            f.push(("buffers", bufs.len() as u64));
            ("PostAnonymous", None, None)
        }
        Command::PostNamed {
            conn,
            buf,
            push,
            prefill,
            stream_offset,
            epoch,
        } => {
            f.extend([
                ("len", buf.len() as u64),
                ("push", *push as u64),
                ("prefill", *prefill as u64),
                ("offset", *stream_offset),
                ("epoch", *epoch as u64),
            ]);
            ("PostNamed", Some(*conn), None)
        }
        Command::ReturnNamed { conn, why, all } => {
            f.push(("all", *all as u64));
            ("ReturnNamed", Some(*conn), Some(reason_name(*why)))
        }
        Command::IndicateAck { conn, bytes, bufs } => {
            f.extend([("bytes", *bytes as u64), ("bufs", *bufs as u64)]);
            ("IndicateAck", Some(*conn), None)
        }
        Command::Send { conn, len, .. } => {
            f.push(("len", *len as u64));
            ("Send", Some(*conn), None)
        }
        Command::Close { conn } => ("Close", Some(*conn), None),
        Command::Abort { conn } => ("Abort", Some(*conn), None),
        Command::UlpOffload {
            conn,
            engine,
            stream_offset,
            carry,
            ..
        } => {
            f.extend([("offset", *stream_offset), ("carry", carry.len() as u64)]);
            ("UlpOffload", Some(*conn), Some(*engine))
        }
        Command::UlpRegister { conn, tag, buf } => {
            f.extend([("tag", *tag as u64), ("len", buf.len() as u64)]);
            ("UlpRegister", Some(*conn), None)
        }
        Command::UlpRelease { conn, tag } => {
            f.push(("tag", *tag as u64));
            ("UlpRelease", Some(*conn), None)
        }
        Command::UlpSend { conn, request } => {
            f.push(("len", request.len() as u64));
            ("UlpSend", Some(*conn), None)
        }
        Command::Shape {
            bytes_per_s,
            burst_bytes,
        } => {
            f.push(("bytes_per_s", *bytes_per_s));
            f.push(("burst", u64::from(*burst_bytes)));
            ("Shape", None, None)
        }
        Command::Pace { conn, on } => {
            f.push(("on", u64::from(*on)));
            ("Pace", Some(*conn), None)
        }
        Command::Mark { conn, dscp } => {
            f.push(("dscp", u64::from(*dscp)));
            ("Mark", Some(*conn), None)
        }
        Command::AckHold { conn, hold } => {
            f.push(("window_us", hold.map_or(0, |h| u64::from(h.window_us))));
            ("AckHold", Some(*conn), None)
        }
    }
}

/// Describe an event: (kind, connection, reason); numeric fields are appended to `f`.
pub fn describe_event(
    e: &Event,
    f: &mut Vec<(&'static str, u64)>,
) -> (&'static str, Option<ConnId>, Option<&'static str>) {
    match e {
        Event::ListenFailed { port, .. } => {
            f.push(("port", *port as u64));
            ("ListenFailed", None, None)
        }
        Event::Established {
            conn,
            indicate_window,
            ..
        } => {
            f.push(("window", *indicate_window as u64));
            ("Established", Some(*conn), None)
        }
        Event::ConnectFailed { conn, .. } => ("ConnectFailed", Some(*conn), None),
        Event::IndicateData {
            conn,
            len,
            stream_offset,
            psh_ends,
            ..
        } => {
            f.extend([
                ("len", *len as u64),
                ("offset", *stream_offset),
                ("psh", psh_ends.len() as u64),
            ]);
            ("IndicateData", Some(*conn), None)
        }
        Event::NamedFilling { conn } => ("NamedFilling", Some(*conn), None),
        Event::NamedDone {
            conn,
            filled,
            end_offset,
            why,
            epoch,
            ..
        } => {
            f.extend([
                ("filled", *filled as u64),
                ("end", *end_offset),
                ("epoch", *epoch as u64),
            ]);
            ("NamedDone", Some(*conn), Some(reason_name(*why)))
        }
        Event::SendDone { conn, len, ok, .. } => {
            f.extend([("len", *len as u64), ("ok", *ok as u64)]);
            ("SendDone", Some(*conn), None)
        }
        Event::PeerClosed { conn } => ("PeerClosed", Some(*conn), None),
        Event::Reset { conn } => ("Reset", Some(*conn), None),
        Event::Closed { conn } => ("Closed", Some(*conn), None),
        Event::CommandError { conn, .. } => ("CommandError", *conn, None),
        Event::BuffersReturned { bufs } => {
            f.push(("buffers", bufs.len() as u64));
            ("BuffersReturned", None, None)
        }
        Event::UlpStarted {
            conn,
            stream_offset,
        } => {
            f.push(("offset", *stream_offset));
            ("UlpStarted", Some(*conn), None)
        }
        Event::UlpRefused {
            conn,
            position,
            stale,
            ..
        } => {
            f.extend([("position", *position), ("stale", *stale as u64)]);
            ("UlpRefused", Some(*conn), None)
        }
        Event::UlpReleased {
            conn, tag, placed, ..
        } => {
            f.extend([("tag", *tag as u64), ("placed", *placed as u64)]);
            ("UlpReleased", Some(*conn), None)
        }
        Event::UlpError { conn, .. } => ("UlpError", Some(*conn), None),
    }
}
