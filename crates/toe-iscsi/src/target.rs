//! One target-side connection as a pure byte-stream machine: bytes from the initiator go in
//! ([`TargetConn::on_bytes`]), bytes to send come out, and the caller (a std-TCP or emulated
//! TOE shell) only moves them.
//!
//! Implemented so far: login (see [`crate::login`]), then full-feature phase with Text
//! `SendTargets` (discovery), NOP-Out pings, and Logout. SCSI commands in a normal session
//! are answered with Reject, reason "command not supported", until the SCSI layer lands.
//! A PDU that cannot be framed (a header digest mismatch, an unknown opcode) ends the
//! connection, as ERL 0 prescribes; the counters say why.

use crate::login::{Negotiated, SessionType, TargetConfig, TargetLogin};
use crate::text;
use crate::wire::{
    Framing, LogoutResponse, Nop, Pdu, Reject, Repr, Text, WireError, BHS_LEN, RESERVED_TAG,
};

/// Reject reasons (RFC 7143 §11.17.1).
pub mod reject_reason {
    /// Data (payload) digest error.
    pub const DATA_DIGEST: u8 = 0x02;
    /// Protocol error.
    pub const PROTOCOL_ERROR: u8 = 0x04;
    /// Command not supported.
    pub const NOT_SUPPORTED: u8 = 0x05;
    /// Invalid PDU field.
    pub const INVALID_FIELD: u8 = 0x09;
}

/// Most bytes of one PDU the connection buffers (a larger one ends the connection: its
/// DataSegmentLength exceeds anything negotiated).
pub const MAX_PDU_BYTES: usize = (1 << 24) + 4096;

/// Why a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// The initiator logged out.
    LoggedOut,
    /// The login failed (the status was sent).
    LoginFailed(crate::login::LoginStatus),
    /// A PDU could not be framed.
    Wire(WireError),
    /// A PDU longer than allowed.
    Oversized(usize),
}

/// Counters of one connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnStats {
    /// PDUs received.
    pub pdus_in: u64,
    /// PDUs sent.
    pub pdus_out: u64,
    /// Rejects sent.
    pub rejects: u64,
    /// Data digest failures.
    pub data_digest_errors: u64,
}

enum Phase {
    Login(Box<TargetLogin>),
    FullFeature(Box<Negotiated>),
    Closed(Ended),
}

/// A target-side connection.
pub struct TargetConn {
    cfg: TargetConfig,
    /// Every target this portal offers to discovery: (TargetName, TargetAddress).
    targets: Vec<(String, String)>,
    phase: Phase,
    framing: Framing,
    inbuf: Vec<u8>,
    stat_sn: u32,
    exp_cmd_sn: u32,
    stats: ConnStats,
}

impl std::fmt::Debug for TargetConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetConn")
            .field("stats", &self.stats)
            .field("ended", &self.ended())
            .finish()
    }
}

impl TargetConn {
    /// A connection for `cfg`, offering `targets` (name, `ADDR:PORT,TPGT`) to discovery.
    /// `challenge` and `chap_id` are random (the caller's RNG), `tsih` the session handle a
    /// login gets.
    pub fn new(
        cfg: TargetConfig,
        targets: Vec<(String, String)>,
        challenge: [u8; 16],
        chap_id: u8,
        tsih: u16,
    ) -> Self {
        let login = TargetLogin::new(cfg.clone(), challenge, chap_id, 1, tsih);
        TargetConn {
            cfg,
            targets,
            phase: Phase::Login(Box::new(login)),
            framing: Framing::default(),
            inbuf: Vec::new(),
            stat_sn: 1,
            exp_cmd_sn: 0,
            stats: ConnStats::default(),
        }
    }

    /// Why the connection ended, once it has: the shell then closes the socket after
    /// sending what [`TargetConn::on_bytes`] returned.
    pub fn ended(&self) -> Option<&Ended> {
        match &self.phase {
            Phase::Closed(e) => Some(e),
            _ => None,
        }
    }

    /// The parameters in force, once in full-feature phase.
    pub fn negotiated(&self) -> Option<&Negotiated> {
        match &self.phase {
            Phase::FullFeature(n) => Some(n),
            _ => None,
        }
    }

    /// Counters.
    pub fn stats(&self) -> ConnStats {
        self.stats
    }

    /// Take bytes received from the initiator; append what to send to `out`.
    pub fn on_bytes(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        if self.ended().is_some() {
            return;
        }
        self.inbuf.extend_from_slice(bytes);
        let mut at = 0;
        while self.ended().is_none() {
            let buf = &self.inbuf[at..];
            if buf.len() >= BHS_LEN {
                match self.framing.pdu_len(buf) {
                    Ok(n) if n > MAX_PDU_BYTES => {
                        self.phase = Phase::Closed(Ended::Oversized(n));
                        break;
                    }
                    _ => {}
                }
            }
            let pdu = match self.framing.parse(buf) {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(e) => {
                    self.phase = Phase::Closed(Ended::Wire(e));
                    break;
                }
            };
            let len = pdu.len;
            // Copy what the PDU needs: the buffer is borrowed.
            let bhs = *pdu.bhs;
            let data = pdu.data.to_vec();
            let digest = pdu.data_digest;
            at += len;
            self.stats.pdus_in += 1;
            let owned = Pdu {
                bhs: &bhs,
                ahs: &[],
                data: &data,
                data_digest: digest,
                len,
            };
            self.on_pdu(&owned, out);
        }
        self.inbuf.drain(..at);
    }

    fn send(&mut self, repr: &Repr, data: &[u8], out: &mut Vec<u8>) {
        self.stats.pdus_out += 1;
        // A Repr is always well formed and data within limits here.
        let _ = self.framing.emit(repr, &[], data, out);
    }

    fn max_cmd_sn(&self) -> u32 {
        self.exp_cmd_sn.wrapping_add(self.cfg.cmd_window.max(1) - 1)
    }

    fn next_stat_sn(&mut self) -> u32 {
        let s = self.stat_sn;
        self.stat_sn = self.stat_sn.wrapping_add(1);
        s
    }

    fn reject(&mut self, pdu: &Pdu<'_>, reason: u8, out: &mut Vec<u8>) {
        self.stats.rejects += 1;
        let r = Repr::Reject(Reject {
            reason,
            stat_sn: self.next_stat_sn(),
            exp_cmd_sn: self.exp_cmd_sn,
            max_cmd_sn: self.max_cmd_sn(),
            data_sn: 0,
        });
        let bhs = *pdu.bhs;
        self.send(&r, &bhs, out);
    }

    fn on_pdu(&mut self, pdu: &Pdu<'_>, out: &mut Vec<u8>) {
        let repr = match pdu.repr() {
            Ok(r) => r,
            Err(_) => return self.reject(pdu, reject_reason::INVALID_FIELD, out),
        };
        if matches!(pdu.data_digest, crate::wire::DigestCheck::Bad { .. }) {
            self.stats.data_digest_errors += 1;
            return self.reject(pdu, reject_reason::DATA_DIGEST, out);
        }
        if let Phase::Login(login) = &mut self.phase {
            let Repr::LoginRequest(req) = repr else {
                // Only Login Requests before full-feature phase: a protocol error.
                self.phase = Phase::Closed(Ended::Wire(WireError::Malformed(
                    "a PDU other than Login before full-feature phase",
                )));
                return;
            };
            let reply = login.on_request(&req, pdu.data);
            self.stat_sn = login.stat_sn();
            self.exp_cmd_sn = req.sn;
            self.send(&Repr::LoginResponse(reply.header), &reply.data, out);
            match reply.done {
                None => {}
                Some(Ok(neg)) => {
                    // Digests start with the first PDU after the final Login Response.
                    self.framing = Framing {
                        header_digest: neg.header_digest,
                        data_digest: neg.data_digest,
                    };
                    self.phase = Phase::FullFeature(Box::new(neg));
                }
                Some(Err(s)) => self.phase = Phase::Closed(Ended::LoginFailed(s)),
            }
            return;
        }
        let Phase::FullFeature(neg) = &self.phase else {
            return;
        };
        let discovery = neg.session_type == SessionType::Discovery;
        // The CmdSN window (RFC 7143 §3.2.2.1): non-immediate commands advance ExpCmdSN.
        let (immediate, cmd_sn) = match &repr {
            Repr::NopOut(n) => (n.immediate, Some(n.sn)),
            Repr::ScsiCommand(c) => (c.immediate, Some(c.cmd_sn)),
            Repr::TaskMgmtRequest(t) => (t.immediate, Some(t.cmd_sn)),
            Repr::TextRequest(t) => (t.immediate, Some(t.sn)),
            Repr::LogoutRequest(l) => (l.immediate, Some(l.cmd_sn)),
            _ => (true, None),
        };
        if let (false, Some(sn)) = (immediate, cmd_sn) {
            if sn != self.exp_cmd_sn {
                // Outside the window, or a gap: ERL 0 drops it silently.
                if sn.wrapping_sub(self.exp_cmd_sn) as i32 <= 0
                    || sn.wrapping_sub(self.max_cmd_sn()) as i32 > 0
                {
                    return;
                }
            }
            self.exp_cmd_sn = sn.wrapping_add(1);
        }
        match repr {
            Repr::TextRequest(t) => {
                let pairs = match text::parse_pairs(pdu.data) {
                    Ok(p) => p,
                    Err(_) => return self.reject(pdu, reject_reason::PROTOCOL_ERROR, out),
                };
                let mut answer: Vec<(String, String)> = Vec::new();
                for (k, v) in pairs {
                    if k == "SendTargets" {
                        for (name, addr) in &self.targets {
                            let wanted = match v {
                                "All" => discovery,
                                "" => !discovery && *name == self.cfg.target_name,
                                n => n == name,
                            };
                            if wanted {
                                answer.push(("TargetName".into(), name.clone()));
                                answer.push(("TargetAddress".into(), addr.clone()));
                            }
                        }
                    } else {
                        // Renegotiation in full-feature phase is not offered.
                        answer.push((k.into(), "NotUnderstood".into()));
                    }
                }
                let mut data = Vec::new();
                text::encode_pairs(&answer, &mut data);
                let r = Repr::TextResponse(Text {
                    immediate: false,
                    final_: true,
                    cont: false,
                    lun: 0,
                    itt: t.itt,
                    ttt: RESERVED_TAG,
                    sn: self.next_stat_sn(),
                    exp_sn: self.exp_cmd_sn,
                    max_cmd_sn: self.max_cmd_sn(),
                });
                self.send(&r, &data, out);
            }
            Repr::NopOut(n) => {
                if n.itt == RESERVED_TAG {
                    return; // no answer asked for
                }
                let r = Repr::NopIn(Nop {
                    immediate: false,
                    lun: n.lun,
                    itt: n.itt,
                    ttt: RESERVED_TAG,
                    sn: self.next_stat_sn(),
                    exp_sn: self.exp_cmd_sn,
                    max_cmd_sn: self.max_cmd_sn(),
                });
                // The ping data comes back.
                let data = pdu.data.to_vec();
                self.send(&r, &data, out);
            }
            Repr::LogoutRequest(l) => {
                let r = Repr::LogoutResponse(LogoutResponse {
                    response: 0,
                    itt: l.itt,
                    stat_sn: self.next_stat_sn(),
                    exp_cmd_sn: self.exp_cmd_sn,
                    max_cmd_sn: self.max_cmd_sn(),
                    time2wait: 0,
                    time2retain: 0,
                });
                self.send(&r, &[], out);
                self.phase = Phase::Closed(Ended::LoggedOut);
            }
            Repr::LoginRequest(_) => self.reject(pdu, reject_reason::PROTOCOL_ERROR, out),
            _ => self.reject(pdu, reject_reason::NOT_SUPPORTED, out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::login::{InitiatorConfig, InitiatorLogin, InitiatorStep, OpParams};
    use crate::wire::LogoutRequest;

    fn cfg() -> TargetConfig {
        TargetConfig {
            target_name: "iqn.2026-12.org.toemu:disk".into(),
            alias: None,
            portal_group_tag: 1,
            chap: None,
            mutual: None,
            params: OpParams {
                header_digest: "CRC32C,None".into(),
                ..OpParams::default()
            },
            cmd_window: 16,
        }
    }

    /// Drive a login through `conn` with our initiator; returns its negotiated parameters.
    fn login(conn: &mut TargetConn, discovery: bool) -> Negotiated {
        let mut i = InitiatorLogin::new(
            InitiatorConfig {
                initiator_name: "iqn.2026-12.org.toemu:i".into(),
                target_name: (!discovery).then(|| "iqn.2026-12.org.toemu:disk".into()),
                chap: None,
                mutual: None,
                params: OpParams {
                    header_digest: "CRC32C".into(),
                    ..OpParams::default()
                },
                isid: [0x80, 0, 0, 0, 0, 2],
                cmd_sn: 7,
            },
            [3; 16],
            1,
        );
        let mut step = i.start();
        loop {
            let InitiatorStep::Send(req, data) = step else {
                unreachable!()
            };
            let mut bytes = Vec::new();
            Framing::default()
                .emit(&Repr::LoginRequest(req), &[], &data, &mut bytes)
                .unwrap();
            let mut out = Vec::new();
            conn.on_bytes(&bytes, &mut out);
            let pdu = Framing::default().parse(&out).unwrap().unwrap();
            let Repr::LoginResponse(rsp) = pdu.repr().unwrap() else {
                panic!("not a login response")
            };
            match i.on_response(&rsp, pdu.data).unwrap() {
                InitiatorStep::Done(n) => return n,
                s => step = s,
            }
        }
    }

    #[test]
    fn discovery_lists_the_targets_then_logs_out() {
        let targets = vec![(
            "iqn.2026-12.org.toemu:disk".to_string(),
            "127.0.0.1:3260,1".to_string(),
        )];
        let mut c = TargetConn::new(cfg(), targets, [9; 16], 2, 1);
        let n = login(&mut c, true);
        assert!(n.header_digest, "digests on from here");
        let f = Framing {
            header_digest: true,
            data_digest: false,
        };
        let mut bytes = Vec::new();
        let mut q = Vec::new();
        text::encode_pairs(&[("SendTargets", "All")], &mut q);
        f.emit(
            &Repr::TextRequest(Text {
                immediate: true,
                final_: true,
                cont: false,
                lun: 0,
                itt: 5,
                ttt: RESERVED_TAG,
                sn: 7,
                exp_sn: 2,
                max_cmd_sn: 0,
            }),
            &[],
            &q,
            &mut bytes,
        )
        .unwrap();
        // byte by byte: framing copes with any split
        let mut out = Vec::new();
        for b in &bytes {
            c.on_bytes(std::slice::from_ref(b), &mut out);
        }
        let pdu = f.parse(&out).unwrap().unwrap();
        let Repr::TextResponse(t) = pdu.repr().unwrap() else {
            panic!()
        };
        assert_eq!((t.itt, t.final_), (5, true));
        assert_eq!(
            text::parse_pairs(pdu.data).unwrap(),
            vec![
                ("TargetName", "iqn.2026-12.org.toemu:disk"),
                ("TargetAddress", "127.0.0.1:3260,1")
            ]
        );
        let mut bytes = Vec::new();
        f.emit(
            &Repr::LogoutRequest(LogoutRequest {
                immediate: true,
                reason: 0,
                itt: 6,
                cid: 0,
                cmd_sn: 7,
                exp_stat_sn: 3,
            }),
            &[],
            &[],
            &mut bytes,
        )
        .unwrap();
        let mut out = Vec::new();
        c.on_bytes(&bytes, &mut out);
        assert!(matches!(
            f.parse(&out).unwrap().unwrap().repr().unwrap(),
            Repr::LogoutResponse(LogoutResponse {
                response: 0,
                itt: 6,
                ..
            })
        ));
        assert_eq!(c.ended(), Some(&Ended::LoggedOut));
    }

    #[test]
    fn commands_before_the_scsi_layer_are_rejected_and_bad_framing_ends_the_connection() {
        let mut c = TargetConn::new(cfg(), vec![], [9; 16], 2, 1);
        login(&mut c, false);
        let f = Framing {
            header_digest: true,
            data_digest: false,
        };
        let cmd = Repr::ScsiCommand(crate::wire::ScsiCommand {
            immediate: false,
            final_: true,
            read: true,
            write: false,
            attr: 1,
            lun: 0,
            itt: 9,
            expected_len: 36,
            cmd_sn: 7,
            exp_stat_sn: 3,
            cdb: [0x12, 0, 0, 0, 36, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        });
        let mut bytes = Vec::new();
        f.emit(&cmd, &[], &[], &mut bytes).unwrap();
        let mut out = Vec::new();
        c.on_bytes(&bytes, &mut out);
        let pdu = f.parse(&out).unwrap().unwrap();
        let Repr::Reject(r) = pdu.repr().unwrap() else {
            panic!()
        };
        assert_eq!(r.reason, reject_reason::NOT_SUPPORTED);
        assert_eq!(
            pdu.data,
            &bytes[..BHS_LEN],
            "the rejected header comes back"
        );
        assert_eq!(r.exp_cmd_sn, 8, "the command took its CmdSN");
        // The same CmdSN again is outside the window: dropped silently.
        let mut out = Vec::new();
        c.on_bytes(&bytes, &mut out);
        assert!(out.is_empty());
        // A flipped header bit: the header digest fails and the connection ends.
        let mut bad = bytes.clone();
        bad[24..28].copy_from_slice(&8u32.to_be_bytes());
        c.on_bytes(&bad, &mut out);
        assert!(matches!(
            c.ended(),
            Some(Ended::Wire(WireError::HeaderDigest { .. }))
        ));
        assert_eq!(c.stats().rejects, 1);
    }

    #[test]
    fn only_login_before_full_feature_phase() {
        let mut c = TargetConn::new(cfg(), vec![], [9; 16], 2, 1);
        let mut bytes = Vec::new();
        Framing::default()
            .emit(
                &Repr::NopOut(Nop {
                    immediate: true,
                    lun: 0,
                    itt: 1,
                    ttt: RESERVED_TAG,
                    sn: 0,
                    exp_sn: 0,
                    max_cmd_sn: 0,
                }),
                &[],
                &[],
                &mut bytes,
            )
            .unwrap();
        let mut out = Vec::new();
        c.on_bytes(&bytes, &mut out);
        assert!(out.is_empty());
        assert!(matches!(
            c.ended(),
            Some(Ended::Wire(WireError::Malformed(_)))
        ));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_streams_never_panic(
            chunks in proptest::collection::vec(
                proptest::collection::vec(proptest::num::u8::ANY, 0..200), 0..8),
        ) {
            let mut c = TargetConn::new(cfg(), vec![], [9; 16], 2, 1);
            let mut out = Vec::new();
            for ch in chunks {
                c.on_bytes(&ch, &mut out);
            }
        }
    }
}
