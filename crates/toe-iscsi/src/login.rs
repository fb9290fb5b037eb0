//! The login phase (RFC 7143 §6.3, §12): the target's and the initiator's state machines,
//! pure — a Login Request or Response goes in, the answer comes out; randomness (CHAP
//! challenges) is an argument.
//!
//! - Security stage (CSG 0): `AuthMethod` (`None` or `CHAP`), then CHAP with MD5
//!   (`CHAP_A=5`), one-way (the target authenticates the initiator) or mutual (the initiator
//!   also sends `CHAP_I`/`CHAP_C` and checks the target's answer). A reflected challenge is
//!   refused (RFC 7143 §12.1.3).
//! - Operational stage (CSG 1): every key the initiator offers is answered with
//!   [`text::respond`]; the target declares its `MaxRecvDataSegmentLength`.
//! - Declarations of the leading login: `InitiatorName`, `TargetName`, `SessionType`
//!   (`Normal` or `Discovery`), and the target's `TargetPortalGroupTag` in its first answer.
//! - Text that continues over several PDUs (the C bit) is gathered, each piece answered with
//!   an empty response, up to [`MAX_LOGIN_TEXT`] bytes.
//!
//! The result is a [`Negotiated`] set of session and connection parameters, or a login
//! failure with the Status-Class and Status-Detail the target sent.

use md5::{Digest, Md5};

use crate::text::{self, Answer};
use crate::wire::Login;

/// Most text one side may send in one login stage, bytes (gathered continuations included).
pub const MAX_LOGIN_TEXT: usize = 64 * 1024;

/// Status-Class and Status-Detail of a Login Response (RFC 7143 §11.13.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginStatus {
    /// 0 success, 1 redirection, 2 initiator error, 3 target error.
    pub class: u8,
    /// The detail within the class.
    pub detail: u8,
}

impl LoginStatus {
    /// Success.
    pub const SUCCESS: LoginStatus = LoginStatus::new(0, 0);
    /// Initiator error, miscellaneous (malformed text, a key that may not be negotiated).
    pub const INITIATOR_ERROR: LoginStatus = LoginStatus::new(2, 0);
    /// Authentication failed.
    pub const AUTH_FAILED: LoginStatus = LoginStatus::new(2, 1);
    /// The initiator may not access this target.
    pub const FORBIDDEN: LoginStatus = LoginStatus::new(2, 2);
    /// No such target.
    pub const NOT_FOUND: LoginStatus = LoginStatus::new(2, 3);
    /// Unsupported version.
    pub const UNSUPPORTED_VERSION: LoginStatus = LoginStatus::new(2, 5);
    /// A required parameter (InitiatorName, TargetName) is missing.
    pub const MISSING_PARAMETER: LoginStatus = LoginStatus::new(2, 7);
    /// A request that is not valid at this point of the login.
    pub const INVALID_REQUEST: LoginStatus = LoginStatus::new(2, 0x0b);

    const fn new(class: u8, detail: u8) -> Self {
        LoginStatus { class, detail }
    }
}

/// A name and secret for CHAP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// CHAP_N.
    pub user: String,
    /// The shared secret (RFC 7143 §12.1.3 asks for at least 12 bytes; not enforced).
    pub secret: Vec<u8>,
}

/// What one side asks of the operational parameters (its offers, or its limits as a
/// responder).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpParams {
    /// Header digests acceptable, in preference order (`"CRC32C,None"`, `"None"`, ...).
    pub header_digest: String,
    /// Data digests acceptable, in preference order.
    pub data_digest: String,
    /// The most data this side accepts in one PDU, bytes (declared).
    pub max_recv_data_segment_length: u32,
    /// MaxBurstLength, bytes.
    pub max_burst_length: u32,
    /// FirstBurstLength, bytes.
    pub first_burst_length: u32,
    /// InitialR2T wish.
    pub initial_r2t: bool,
    /// ImmediateData wish.
    pub immediate_data: bool,
    /// MaxOutstandingR2T.
    pub max_outstanding_r2t: u32,
    /// ErrorRecoveryLevel (toemu implements 0).
    pub error_recovery_level: u32,
    /// Offer (initiator) or accept (target) toemu's write acceleration, the private key
    /// [`crate::accel::WRITE_ACCELERATION_KEY`]. An initiator that is not asked to sends
    /// no private key at all.
    pub write_acceleration: bool,
}

impl Default for OpParams {
    /// RFC 7143's defaults, digests off, 256 KiB segments and bursts.
    fn default() -> Self {
        OpParams {
            header_digest: "None".into(),
            data_digest: "None".into(),
            max_recv_data_segment_length: 262_144,
            max_burst_length: 262_144,
            first_burst_length: 65_536,
            initial_r2t: true,
            immediate_data: true,
            max_outstanding_r2t: 1,
            error_recovery_level: 0,
            write_acceleration: false,
        }
    }
}

/// Discovery or normal session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionType {
    /// SendTargets only.
    Discovery,
    /// SCSI commands.
    Normal,
}

/// The parameters a login settled (defaults where a key was not negotiated).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// Discovery or normal.
    pub session_type: SessionType,
    /// The initiator's name.
    pub initiator_name: String,
    /// The target's name (empty in a discovery session that named none).
    pub target_name: String,
    /// Header digests on.
    pub header_digest: bool,
    /// Data digests on.
    pub data_digest: bool,
    /// The most data the target accepts in one PDU (the initiator's send limit), bytes.
    pub target_max_recv: u32,
    /// The most data the initiator accepts in one PDU (the target's send limit), bytes.
    pub initiator_max_recv: u32,
    /// MaxBurstLength, bytes.
    pub max_burst_length: u32,
    /// FirstBurstLength, bytes.
    pub first_burst_length: u32,
    /// InitialR2T.
    pub initial_r2t: bool,
    /// ImmediateData.
    pub immediate_data: bool,
    /// MaxOutstandingR2T.
    pub max_outstanding_r2t: u32,
    /// DataPDUInOrder.
    pub data_pdu_in_order: bool,
    /// DataSequenceInOrder.
    pub data_sequence_in_order: bool,
    /// ErrorRecoveryLevel.
    pub error_recovery_level: u32,
    /// DefaultTime2Wait, seconds.
    pub default_time2wait: u32,
    /// DefaultTime2Retain, seconds.
    pub default_time2retain: u32,
    /// MaxConnections.
    pub max_connections: u32,
    /// The initiator's session ID.
    pub isid: [u8; 6],
    /// The target's session handle.
    pub tsih: u16,
    /// Both sides agreed to toemu's write acceleration (see [`crate::accel`]).
    pub write_acceleration: bool,
}

impl Negotiated {
    fn defaults() -> Self {
        Negotiated {
            session_type: SessionType::Normal,
            initiator_name: String::new(),
            target_name: String::new(),
            header_digest: false,
            data_digest: false,
            target_max_recv: 8192,
            initiator_max_recv: 8192,
            max_burst_length: 262_144,
            first_burst_length: 65_536,
            initial_r2t: true,
            immediate_data: true,
            max_outstanding_r2t: 1,
            data_pdu_in_order: true,
            data_sequence_in_order: true,
            error_recovery_level: 0,
            default_time2wait: 2,
            default_time2retain: 20,
            max_connections: 1,
            isid: [0; 6],
            tsih: 0,
            write_acceleration: false,
        }
    }

    /// Record the settled value of key `k` (a value [`text::outcome`] or
    /// [`text::respond`] produced, so it parses).
    fn set(&mut self, k: &str, v: &str) {
        let num = || text::parse_number(v).unwrap_or(0).min(u64::from(u32::MAX)) as u32;
        let yes = v == "Yes";
        match k {
            "HeaderDigest" => self.header_digest = v == "CRC32C",
            "DataDigest" => self.data_digest = v == "CRC32C",
            "MaxBurstLength" => self.max_burst_length = num(),
            "FirstBurstLength" => self.first_burst_length = num(),
            "InitialR2T" => self.initial_r2t = yes,
            "ImmediateData" => self.immediate_data = yes,
            "MaxOutstandingR2T" => self.max_outstanding_r2t = num(),
            "DataPDUInOrder" => self.data_pdu_in_order = yes,
            "DataSequenceInOrder" => self.data_sequence_in_order = yes,
            "ErrorRecoveryLevel" => self.error_recovery_level = num(),
            "DefaultTime2Wait" => self.default_time2wait = num(),
            "DefaultTime2Retain" => self.default_time2retain = num(),
            "MaxConnections" => self.max_connections = num(),
            crate::accel::WRITE_ACCELERATION_KEY => self.write_acceleration = yes,
            _ => {}
        }
    }

    /// FirstBurstLength may not exceed MaxBurstLength (RFC 7143 §13.14).
    fn settle(&mut self) {
        self.first_burst_length = self.first_burst_length.min(self.max_burst_length);
    }
}

/// CHAP algorithm 5: MD5 over identifier, secret and challenge (RFC 1994).
pub fn chap_md5(id: u8, secret: &[u8], challenge: &[u8]) -> [u8; 16] {
    let mut h = Md5::new();
    h.update([id]);
    h.update(secret);
    h.update(challenge);
    h.finalize().into()
}

/// `0x`-prefixed hexadecimal, as CHAP values travel.
pub fn hex_value(bytes: &[u8]) -> String {
    format!("0x{}", hex::encode(bytes))
}

/// The bytes of a CHAP binary value: `0x` hexadecimal (an odd digit count is padded on the
/// left) or `0b` base64 is not supported.
pub fn parse_hex_value(v: &str) -> Option<Vec<u8>> {
    let h = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X"))?;
    if h.is_empty() {
        return None;
    }
    if h.len() % 2 == 1 {
        hex::decode(format!("0{h}")).ok()
    } else {
        hex::decode(h).ok()
    }
}

/// The target's configuration for logins.
#[derive(Debug, Clone)]
pub struct TargetConfig {
    /// The target's IQN.
    pub target_name: String,
    /// TargetAlias, if any.
    pub alias: Option<String>,
    /// TargetPortalGroupTag of the portal.
    pub portal_group_tag: u16,
    /// Initiators must authenticate with these (CHAP); `None`: AuthMethod=None accepted.
    pub chap: Option<Credentials>,
    /// The target's own credentials for mutual CHAP; without them a mutual request fails.
    pub mutual: Option<Credentials>,
    /// The target's limits and wishes.
    pub params: OpParams,
    /// Commands the target lets one session queue (MaxCmdSN − ExpCmdSN + 1).
    pub cmd_window: u32,
}

impl TargetConfig {
    /// toemu's target `target_name` as it serves by default: alias `toemu`, portal group 1,
    /// no authentication, header and data digests offered (`CRC32C,None`), write
    /// acceleration accepted from initiators that offer it, the other keys at their
    /// defaults, a command window of 32.
    pub fn offering_digests(target_name: &str) -> TargetConfig {
        TargetConfig {
            target_name: target_name.into(),
            alias: Some("toemu".into()),
            portal_group_tag: 1,
            chap: None,
            mutual: None,
            params: OpParams {
                header_digest: "CRC32C,None".into(),
                data_digest: "CRC32C,None".into(),
                // Accepted when offered; initiators that do not offer it are unaffected.
                write_acceleration: true,
                ..OpParams::default()
            },
            cmd_window: 32,
        }
    }
}

/// What the target answers to one Login Request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetReply {
    /// The Login Response header.
    pub header: Login,
    /// Its text.
    pub data: Vec<u8>,
    /// Set on the last answer: the login ended, in full-feature phase or failed.
    pub done: Option<Result<Negotiated, LoginStatus>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChapStep {
    /// AuthMethod not settled yet.
    Start,
    /// AuthMethod=CHAP agreed; waiting for CHAP_A.
    WantAlgorithm,
    /// Challenge sent; waiting for CHAP_N and CHAP_R.
    WantResponse,
    /// Authenticated (or AuthMethod=None).
    Done,
}

/// The target side of one connection's login.
#[derive(Debug, Clone)]
pub struct TargetLogin {
    cfg: TargetConfig,
    challenge: [u8; 16],
    chap_id: u8,
    chap: ChapStep,
    neg: Negotiated,
    /// Text of a request continued over several PDUs (C bit).
    pending: Vec<u8>,
    first: bool,
    stat_sn: u32,
    tsih: u16,
    names_seen: bool,
}

impl TargetLogin {
    /// A login for `cfg`. `challenge` and `chap_id` must be random (the caller's RNG);
    /// `stat_sn` is the connection's first StatSN; `tsih` the handle the session gets.
    pub fn new(
        cfg: TargetConfig,
        challenge: [u8; 16],
        chap_id: u8,
        stat_sn: u32,
        tsih: u16,
    ) -> Self {
        TargetLogin {
            cfg,
            challenge,
            chap_id,
            chap: ChapStep::Start,
            neg: Negotiated::defaults(),
            pending: Vec::new(),
            first: true,
            stat_sn,
            tsih,
            names_seen: false,
        }
    }

    /// The StatSN the next response carries.
    pub fn stat_sn(&self) -> u32 {
        self.stat_sn
    }

    /// Answer one Login Request (`req` with text `data`).
    pub fn on_request(&mut self, req: &Login, data: &[u8]) -> TargetReply {
        let first = std::mem::replace(&mut self.first, false);
        if first {
            self.neg.isid = req.isid;
            if req.version > 0 {
                return self.fail(req, LoginStatus::UNSUPPORTED_VERSION);
            }
            if req.tsih != 0 {
                // Adding a connection to an existing session (MC/S) is not supported.
                return self.fail(req, LoginStatus::new(2, 0x0a));
            }
        }
        if self.pending.len() + data.len() > MAX_LOGIN_TEXT {
            return self.fail(req, LoginStatus::INITIATOR_ERROR);
        }
        self.pending.extend_from_slice(data);
        if req.cont {
            // RFC 7143 §6.3: each continued PDU is answered with an empty response.
            let header = self.header(req, false, req.csg, req.nsg, LoginStatus::SUCCESS);
            return TargetReply {
                header,
                data: Vec::new(),
                done: None,
            };
        }
        let text = std::mem::take(&mut self.pending);
        let pairs = match text::parse_pairs(&text) {
            Ok(p) => p,
            Err(_) => return self.fail(req, LoginStatus::INITIATOR_ERROR),
        };
        let mut out: Vec<(String, String)> = Vec::new();
        // Declarations of the leading login, in any stage.
        for &(k, v) in &pairs {
            match k {
                "InitiatorName" => self.neg.initiator_name = v.into(),
                "TargetName" => self.neg.target_name = v.into(),
                "SessionType" => {
                    self.neg.session_type = match v {
                        "Discovery" => SessionType::Discovery,
                        "Normal" => SessionType::Normal,
                        _ => return self.fail(req, LoginStatus::INITIATOR_ERROR),
                    }
                }
                _ => {}
            }
        }
        if !self.names_seen {
            self.names_seen = true;
            if self.neg.initiator_name.is_empty() {
                return self.fail(req, LoginStatus::MISSING_PARAMETER);
            }
            if self.neg.session_type == SessionType::Normal {
                if self.neg.target_name.is_empty() {
                    return self.fail(req, LoginStatus::MISSING_PARAMETER);
                }
                if self.neg.target_name != self.cfg.target_name {
                    return self.fail(req, LoginStatus::NOT_FOUND);
                }
            }
            out.push((
                "TargetPortalGroupTag".into(),
                self.cfg.portal_group_tag.to_string(),
            ));
            if let Some(a) = &self.cfg.alias {
                out.push(("TargetAlias".into(), a.clone()));
            }
        }
        let status = match req.csg {
            0 => self.security(&pairs, &mut out),
            1 => {
                if self.chap != ChapStep::Done && !self.security_optional() {
                    Err(LoginStatus::AUTH_FAILED)
                } else {
                    self.chap = ChapStep::Done;
                    self.operational(&pairs, &mut out)
                }
            }
            _ => Err(LoginStatus::INVALID_REQUEST),
        };
        if let Err(s) = status {
            return self.fail(req, s);
        }
        // Transit when the initiator asks and this stage is complete.
        let can_transit = req.transit && (req.csg == 1 || self.chap == ChapStep::Done);
        let (csg, nsg) = (req.csg, if can_transit { req.nsg } else { 0 });
        let header = self.header(req, can_transit, csg, nsg, LoginStatus::SUCCESS);
        let mut data = Vec::new();
        text::encode_pairs(&out, &mut data);
        let done = (can_transit && nsg == 3).then(|| {
            self.neg.tsih = self.tsih;
            self.neg.settle();
            Ok(self.neg.clone())
        });
        TargetReply { header, data, done }
    }

    fn security_optional(&self) -> bool {
        self.cfg.chap.is_none()
    }

    fn security(
        &mut self,
        pairs: &[(&str, &str)],
        out: &mut Vec<(String, String)>,
    ) -> Result<(), LoginStatus> {
        let get = |k: &str| pairs.iter().find(|p| p.0 == k).map(|p| p.1);
        if let Some(offered) = get("AuthMethod") {
            let ours = if self.cfg.chap.is_some() {
                "CHAP"
            } else {
                "None"
            };
            let def = text::key_def("AuthMethod").expect("known key");
            match text::respond(def, offered, ours) {
                Answer::Value(v) => {
                    self.chap = if v == "CHAP" {
                        ChapStep::WantAlgorithm
                    } else {
                        ChapStep::Done
                    };
                    out.push(("AuthMethod".into(), v));
                }
                _ => return Err(LoginStatus::AUTH_FAILED),
            }
        }
        match self.chap {
            ChapStep::Start => {
                if self.cfg.chap.is_some() {
                    // No AuthMethod offered yet: nothing to answer; transit is refused.
                } else {
                    self.chap = ChapStep::Done;
                }
            }
            ChapStep::WantAlgorithm => {
                if let Some(a) = get("CHAP_A") {
                    if !a.split(',').any(|x| x == "5") {
                        out.push(("CHAP_A".into(), "Reject".into()));
                        return Err(LoginStatus::AUTH_FAILED);
                    }
                    out.push(("CHAP_A".into(), "5".into()));
                    out.push(("CHAP_I".into(), self.chap_id.to_string()));
                    out.push(("CHAP_C".into(), hex_value(&self.challenge)));
                    self.chap = ChapStep::WantResponse;
                }
            }
            ChapStep::WantResponse => {
                let (Some(n), Some(r)) = (get("CHAP_N"), get("CHAP_R")) else {
                    return Err(LoginStatus::AUTH_FAILED);
                };
                let creds = self.cfg.chap.as_ref().ok_or(LoginStatus::AUTH_FAILED)?;
                let want = chap_md5(self.chap_id, &creds.secret, &self.challenge);
                if n != creds.user || parse_hex_value(r).as_deref() != Some(&want[..]) {
                    return Err(LoginStatus::AUTH_FAILED);
                }
                // Mutual: the initiator challenges the target.
                match (get("CHAP_I"), get("CHAP_C")) {
                    (None, None) => {}
                    (Some(i), Some(c)) => {
                        let mutual = self.cfg.mutual.as_ref().ok_or(LoginStatus::AUTH_FAILED)?;
                        let id = text::parse_number(i)
                            .filter(|&x| x <= 255)
                            .ok_or(LoginStatus::AUTH_FAILED)?
                            as u8;
                        let c = parse_hex_value(c).ok_or(LoginStatus::AUTH_FAILED)?;
                        if c == self.challenge || c.is_empty() {
                            // a reflected challenge (RFC 7143 §12.1.3)
                            return Err(LoginStatus::AUTH_FAILED);
                        }
                        out.push(("CHAP_N".into(), mutual.user.clone()));
                        out.push((
                            "CHAP_R".into(),
                            hex_value(&chap_md5(id, &mutual.secret, &c)),
                        ));
                    }
                    _ => return Err(LoginStatus::AUTH_FAILED),
                }
                self.chap = ChapStep::Done;
            }
            ChapStep::Done => {}
        }
        // Operational keys may come in the security stage too; answer them.
        self.operational(pairs, out)
    }

    fn operational(
        &mut self,
        pairs: &[(&str, &str)],
        out: &mut Vec<(String, String)>,
    ) -> Result<(), LoginStatus> {
        let p = &self.cfg.params;
        let mut declared_mrdsl = false;
        for &(k, v) in pairs {
            if k.starts_with("CHAP_")
                || matches!(
                    k,
                    "AuthMethod"
                        | "InitiatorName"
                        | "TargetName"
                        | "SessionType"
                        | "InitiatorAlias"
                )
            {
                continue;
            }
            if k == "MaxRecvDataSegmentLength" {
                let def = text::key_def(k).expect("known key");
                if text::respond(def, v, "") != Answer::Declared {
                    out.push((k.into(), "Reject".into()));
                    continue;
                }
                self.neg.initiator_max_recv = text::parse_number(v).unwrap_or(8192) as u32;
                declared_mrdsl = true;
                continue;
            }
            let Some(def) = text::key_def(k) else {
                out.push((k.into(), "NotUnderstood".into()));
                continue;
            };
            let ours: String = match k {
                "HeaderDigest" => p.header_digest.clone(),
                "DataDigest" => p.data_digest.clone(),
                "MaxBurstLength" => p.max_burst_length.to_string(),
                "FirstBurstLength" => p.first_burst_length.to_string(),
                "InitialR2T" => yes_no(p.initial_r2t).into(),
                "ImmediateData" => yes_no(p.immediate_data).into(),
                "MaxOutstandingR2T" => p.max_outstanding_r2t.to_string(),
                "ErrorRecoveryLevel" => p.error_recovery_level.to_string(),
                "MaxConnections" => "1".into(),
                "DataPDUInOrder" | "DataSequenceInOrder" => "Yes".into(),
                crate::accel::WRITE_ACCELERATION_KEY => yes_no(p.write_acceleration).into(),
                _ => def.default.into(),
            };
            let a = text::respond(def, v, &ours);
            if let Answer::Value(val) = &a {
                self.neg.set(k, val);
            }
            if let Some(w) = a.wire_value() {
                out.push((k.into(), w.into()));
            }
        }
        if declared_mrdsl {
            // The target declares its own receive limit in answer (libiscsi reads it there;
            // without a declaration each side assumes 8,192 bytes of the other).
            out.push((
                "MaxRecvDataSegmentLength".into(),
                p.max_recv_data_segment_length.to_string(),
            ));
            self.neg.target_max_recv = p.max_recv_data_segment_length;
        }
        Ok(())
    }

    fn header(&mut self, req: &Login, transit: bool, csg: u8, nsg: u8, s: LoginStatus) -> Login {
        let stat_sn = self.stat_sn;
        self.stat_sn = self.stat_sn.wrapping_add(1);
        Login {
            transit,
            cont: false,
            csg,
            nsg,
            version_max: 0,
            version: 0,
            isid: req.isid,
            tsih: if transit && nsg == 3 { self.tsih } else { 0 },
            itt: req.itt,
            cid: 0,
            sn: stat_sn,
            // A Login Request is immediate: CmdSN does not advance.
            exp_sn: req.sn,
            max_cmd_sn: req.sn.wrapping_add(self.cfg.cmd_window.max(1) - 1),
            status_class: s.class,
            status_detail: s.detail,
        }
    }

    fn fail(&mut self, req: &Login, s: LoginStatus) -> TargetReply {
        let header = self.header(req, false, req.csg, 0, s);
        TargetReply {
            header,
            data: Vec::new(),
            done: Some(Err(s)),
        }
    }
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "Yes"
    } else {
        "No"
    }
}

/// The initiator's configuration for a login.
#[derive(Debug, Clone)]
pub struct InitiatorConfig {
    /// InitiatorName.
    pub initiator_name: String,
    /// TargetName (normal sessions); `None` for a discovery session.
    pub target_name: Option<String>,
    /// CHAP credentials, if the target asks for them.
    pub chap: Option<Credentials>,
    /// The credentials the target must prove for mutual CHAP.
    pub mutual: Option<Credentials>,
    /// What the initiator offers.
    pub params: OpParams,
    /// The ISID.
    pub isid: [u8; 6],
    /// The first CmdSN.
    pub cmd_sn: u32,
}

/// Why an initiator's login failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoginError {
    /// The target refused with this status.
    #[error("target refused the login: status class {} detail {}", .0.class, .0.detail)]
    Refused(LoginStatus),
    /// The target's answer broke the protocol (an illegal negotiation outcome, a missing
    /// or wrong CHAP answer).
    #[error("login protocol error: {0}")]
    Protocol(String),
}

/// What the initiator does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InitiatorStep {
    /// Send this Login Request.
    Send(Login, Vec<u8>),
    /// Full-feature phase reached.
    Done(Negotiated),
}

/// The initiator side of one connection's login: security stage (None or CHAP), then the
/// operational stage offering `params`, then full-feature phase.
#[derive(Debug, Clone)]
pub struct InitiatorLogin {
    cfg: InitiatorConfig,
    challenge: [u8; 16],
    chap_id: u8,
    stage: u8,
    offered: Vec<(String, String)>,
    neg: Negotiated,
    exp_stat_sn: u32,
    chap_sent: bool,
}

impl InitiatorLogin {
    /// A login for `cfg`; `challenge` and `chap_id` (random) serve mutual CHAP.
    pub fn new(cfg: InitiatorConfig, challenge: [u8; 16], chap_id: u8) -> Self {
        let mut neg = Negotiated::defaults();
        neg.initiator_name = cfg.initiator_name.clone();
        neg.target_name = cfg.target_name.clone().unwrap_or_default();
        neg.session_type = if cfg.target_name.is_some() {
            SessionType::Normal
        } else {
            SessionType::Discovery
        };
        neg.isid = cfg.isid;
        InitiatorLogin {
            cfg,
            challenge,
            chap_id,
            stage: 0,
            offered: Vec::new(),
            neg,
            exp_stat_sn: 0,
            chap_sent: false,
        }
    }

    /// The first Login Request: names, and AuthMethod.
    pub fn start(&mut self) -> InitiatorStep {
        let mut pairs = vec![("InitiatorName".to_string(), self.cfg.initiator_name.clone())];
        match &self.cfg.target_name {
            Some(t) => {
                pairs.push(("TargetName".into(), t.clone()));
                pairs.push(("SessionType".into(), "Normal".into()));
            }
            None => pairs.push(("SessionType".into(), "Discovery".into())),
        }
        let auth = if self.cfg.chap.is_some() {
            "CHAP,None"
        } else {
            "None"
        };
        pairs.push(("AuthMethod".into(), auth.into()));
        // Without CHAP, go straight on to the operational stage.
        let transit = self.cfg.chap.is_none();
        self.request(0, transit, 1, pairs)
    }

    fn request(
        &mut self,
        csg: u8,
        transit: bool,
        nsg: u8,
        pairs: Vec<(String, String)>,
    ) -> InitiatorStep {
        let mut data = Vec::new();
        text::encode_pairs(&pairs, &mut data);
        let header = Login {
            transit,
            cont: false,
            csg,
            nsg: if transit { nsg } else { 0 },
            version_max: 0,
            version: 0,
            isid: self.cfg.isid,
            tsih: 0,
            itt: 0,
            cid: 0,
            sn: self.cfg.cmd_sn,
            exp_sn: self.exp_stat_sn,
            max_cmd_sn: 0,
            status_class: 0,
            status_detail: 0,
        };
        self.stage = csg;
        InitiatorStep::Send(header, data)
    }

    fn op_offers(&self) -> Vec<(String, String)> {
        let p = &self.cfg.params;
        let mut v: Vec<(String, String)> = vec![
            ("HeaderDigest".into(), p.header_digest.clone()),
            ("DataDigest".into(), p.data_digest.clone()),
            (
                "MaxRecvDataSegmentLength".into(),
                p.max_recv_data_segment_length.to_string(),
            ),
            ("DefaultTime2Wait".into(), "2".into()),
            ("DefaultTime2Retain".into(), "0".into()),
        ];
        if self.neg.session_type == SessionType::Normal {
            v.extend([
                ("InitialR2T".to_string(), yes_no(p.initial_r2t).to_string()),
                ("ImmediateData".into(), yes_no(p.immediate_data).into()),
                ("MaxBurstLength".into(), p.max_burst_length.to_string()),
                ("FirstBurstLength".into(), p.first_burst_length.to_string()),
                (
                    "MaxOutstandingR2T".into(),
                    p.max_outstanding_r2t.to_string(),
                ),
                ("MaxConnections".into(), "1".into()),
                ("DataPDUInOrder".into(), "Yes".into()),
                ("DataSequenceInOrder".into(), "Yes".into()),
                (
                    "ErrorRecoveryLevel".into(),
                    p.error_recovery_level.to_string(),
                ),
            ]);
            if p.write_acceleration {
                v.push((crate::accel::WRITE_ACCELERATION_KEY.into(), "Yes".into()));
            }
        }
        v
    }

    /// Take the target's Login Response (`rsp` with text `data`).
    pub fn on_response(&mut self, rsp: &Login, data: &[u8]) -> Result<InitiatorStep, LoginError> {
        if rsp.status_class != 0 {
            return Err(LoginError::Refused(LoginStatus::new(
                rsp.status_class,
                rsp.status_detail,
            )));
        }
        self.exp_stat_sn = rsp.sn.wrapping_add(1);
        let pairs = text::parse_pairs(data).map_err(|e| LoginError::Protocol(e.to_string()))?;
        let get = |k: &str| pairs.iter().find(|p| p.0 == k).map(|p| p.1);
        // Outcomes of what we offered.
        for (k, offered) in std::mem::take(&mut self.offered) {
            let Some(ans) = get(&k) else { continue };
            if k == "MaxRecvDataSegmentLength" {
                continue;
            }
            let def = text::key_def(&k).expect("we offer known keys");
            match text::outcome(def, &offered, ans) {
                Some(v) => self.neg.set(&k, &v),
                None if matches!(ans, "Reject" | "Irrelevant" | "NotUnderstood") => {}
                None => {
                    return Err(LoginError::Protocol(format!(
                        "{k}: answer {ans:?} is not a legal outcome of {offered:?}"
                    )))
                }
            }
        }
        if let Some(v) = get("MaxRecvDataSegmentLength").and_then(text::parse_number) {
            self.neg.target_max_recv = v.clamp(512, (1 << 24) - 1) as u32;
        }
        if rsp.transit && rsp.nsg == 3 {
            if self.stage == 0 && self.cfg.chap.is_some() && !self.chap_done(&pairs)? {
                return Err(LoginError::Protocol("target skipped authentication".into()));
            }
            self.neg.tsih = rsp.tsih;
            self.neg.initiator_max_recv = self.cfg.params.max_recv_data_segment_length;
            self.neg.settle();
            return Ok(InitiatorStep::Done(self.neg.clone()));
        }
        match (rsp.csg, rsp.transit) {
            (0, false) => {
                // CHAP in progress.
                if get("AuthMethod") == Some("CHAP") && !self.chap_sent {
                    self.chap_sent = true;
                    return Ok(self.request(0, false, 0, vec![("CHAP_A".into(), "5".into())]));
                }
                if let (Some(a), Some(i), Some(c)) = (get("CHAP_A"), get("CHAP_I"), get("CHAP_C")) {
                    let creds = self
                        .cfg
                        .chap
                        .as_ref()
                        .ok_or_else(|| LoginError::Protocol("target asks for CHAP".into()))?;
                    if a != "5" {
                        return Err(LoginError::Protocol(format!("CHAP_A={a} is not MD5")));
                    }
                    let id = text::parse_number(i)
                        .filter(|&x| x <= 255)
                        .ok_or_else(|| LoginError::Protocol("bad CHAP_I".into()))?
                        as u8;
                    let c = parse_hex_value(c)
                        .ok_or_else(|| LoginError::Protocol("bad CHAP_C".into()))?;
                    let mut pairs = vec![
                        ("CHAP_N".to_string(), creds.user.clone()),
                        ("CHAP_R".into(), hex_value(&chap_md5(id, &creds.secret, &c))),
                    ];
                    if self.cfg.mutual.is_some() {
                        pairs.push(("CHAP_I".into(), self.chap_id.to_string()));
                        pairs.push(("CHAP_C".into(), hex_value(&self.challenge)));
                    }
                    return Ok(self.request(0, true, 1, pairs));
                }
                Err(LoginError::Protocol(
                    "unexpected security-stage answer".into(),
                ))
            }
            (0, true) => {
                if self.cfg.chap.is_some() && !self.chap_done(&pairs)? {
                    return Err(LoginError::Protocol("target skipped authentication".into()));
                }
                let offers = self.op_offers();
                self.offered = offers.clone();
                Ok(self.request(1, true, 3, offers))
            }
            (1, false) => {
                // The target wants another round: offer nothing new, ask to finish.
                Ok(self.request(1, true, 3, Vec::new()))
            }
            _ => Err(LoginError::Protocol(format!(
                "unexpected stage {} (T={})",
                rsp.csg, rsp.transit
            ))),
        }
    }

    /// Whether authentication is complete given the target's latest answer: AuthMethod=None
    /// agreed, or CHAP done (checking the target's mutual answer when asked for).
    fn chap_done(&self, pairs: &[(&str, &str)]) -> Result<bool, LoginError> {
        if pairs.contains(&("AuthMethod", "None")) {
            return Ok(true);
        }
        if !self.chap_sent {
            return Ok(false);
        }
        if let Some(m) = &self.cfg.mutual {
            let get = |k: &str| pairs.iter().find(|p| p.0 == k).map(|p| p.1);
            let want = chap_md5(self.chap_id, &m.secret, &self.challenge);
            if get("CHAP_N") != Some(m.user.as_str())
                || get("CHAP_R").and_then(parse_hex_value).as_deref() != Some(&want[..])
            {
                return Err(LoginError::Protocol(
                    "mutual CHAP: the target's answer is wrong".into(),
                ));
            }
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(user: &str, secret: &str) -> Credentials {
        Credentials {
            user: user.into(),
            secret: secret.as_bytes().to_vec(),
        }
    }

    fn target(chap: Option<Credentials>, mutual: Option<Credentials>) -> TargetLogin {
        let mut params = OpParams {
            header_digest: "CRC32C,None".into(),
            data_digest: "CRC32C,None".into(),
            ..OpParams::default()
        };
        params.max_burst_length = 1 << 20;
        params.first_burst_length = 1 << 20;
        params.initial_r2t = false;
        params.max_outstanding_r2t = 8;
        TargetLogin::new(
            TargetConfig {
                target_name: "iqn.2026-12.org.toemu:disk".into(),
                alias: Some("toemu".into()),
                portal_group_tag: 1,
                chap,
                mutual,
                params,
                cmd_window: 32,
            },
            [0x11; 16],
            7,
            100,
            5,
        )
    }

    fn initiator(chap: Option<Credentials>, mutual: Option<Credentials>) -> InitiatorLogin {
        InitiatorLogin::new(
            InitiatorConfig {
                initiator_name: "iqn.2026-12.org.toemu:init".into(),
                target_name: Some("iqn.2026-12.org.toemu:disk".into()),
                chap,
                mutual,
                params: OpParams {
                    header_digest: "CRC32C,None".into(),
                    data_digest: "None".into(),
                    max_recv_data_segment_length: 65_536,
                    max_burst_length: 262_144,
                    first_burst_length: 131_072,
                    initial_r2t: false,
                    immediate_data: true,
                    max_outstanding_r2t: 4,
                    error_recovery_level: 0,
                    write_acceleration: true,
                },
                isid: [0x80, 0, 0, 0, 0, 1],
                cmd_sn: 1,
            },
            [0x22; 16],
            9,
        )
    }

    /// Run both machines to the end; the target's and initiator's results.
    fn run(
        t: &mut TargetLogin,
        i: &mut InitiatorLogin,
    ) -> (
        Result<Negotiated, LoginStatus>,
        Result<Negotiated, LoginError>,
        usize,
    ) {
        let mut step = i.start();
        for round in 1..20 {
            let InitiatorStep::Send(req, data) = step else {
                unreachable!()
            };
            let reply = t.on_request(&req, &data);
            let got = i.on_response(&reply.header, &reply.data);
            if let Some(done) = reply.done {
                let ini = match got {
                    Ok(InitiatorStep::Done(n)) => Ok(n),
                    Ok(other) => panic!("target done, initiator goes on: {other:?}"),
                    Err(e) => Err(e),
                };
                return (done, ini, round);
            }
            step = got.expect("initiator goes on");
        }
        panic!("login did not end");
    }

    #[test]
    fn login_without_authentication_negotiates_both_ways_alike() {
        let (mut t, mut i) = (target(None, None), initiator(None, None));
        let (tn, inn, rounds) = run(&mut t, &mut i);
        let (tn, inn) = (tn.unwrap(), inn.unwrap());
        assert_eq!(rounds, 2, "security (None) then operational");
        assert_eq!(tn, inn, "both sides settle the same parameters");
        assert!(tn.header_digest && !tn.data_digest);
        assert_eq!(tn.max_burst_length, 262_144, "min of 1 MiB and 256 KiB");
        assert_eq!(tn.first_burst_length, 131_072);
        assert!(!tn.initial_r2t, "OR of No and No");
        assert!(tn.immediate_data);
        assert_eq!(tn.max_outstanding_r2t, 4);
        assert_eq!(tn.target_max_recv, 262_144, "the target's declaration");
        assert_eq!(tn.initiator_max_recv, 65_536, "the initiator's declaration");
        assert_eq!((tn.tsih, tn.session_type), (5, SessionType::Normal));
        assert_eq!(tn.initiator_name, "iqn.2026-12.org.toemu:init");
        assert_eq!(
            tn.write_acceleration, t.cfg.params.write_acceleration,
            "the private key is ANDed: offered by the initiator, the target's choice"
        );
    }

    #[test]
    fn write_acceleration_needs_both_sides() {
        for (offer, accept) in [(true, true), (true, false), (false, true)] {
            let mut t = target(None, None);
            t.cfg.params.write_acceleration = accept;
            let mut i = initiator(None, None);
            i.cfg.params.write_acceleration = offer;
            let (tn, inn, _) = run(&mut t, &mut i);
            let (tn, inn) = (tn.unwrap(), inn.unwrap());
            assert_eq!(tn, inn);
            assert_eq!(tn.write_acceleration, offer && accept, "{offer} {accept}");
        }
    }

    #[test]
    fn chap_one_way_and_mutual() {
        let c = creds("alice", "secret-of-alice");
        let m = creds("target", "secret-of-target");
        let (mut t, mut i) = (
            target(Some(c.clone()), None),
            initiator(Some(c.clone()), None),
        );
        let (tn, inn, rounds) = run(&mut t, &mut i);
        assert_eq!(tn.unwrap(), inn.unwrap());
        assert_eq!(rounds, 4, "AuthMethod, CHAP_A, CHAP_N/R, operational");
        let (mut t, mut i) = (
            target(Some(c.clone()), Some(m.clone())),
            initiator(Some(c.clone()), Some(m.clone())),
        );
        let (tn, inn, _) = run(&mut t, &mut i);
        assert_eq!(tn.unwrap(), inn.unwrap());
        // the target proves a wrong secret: the initiator refuses
        let (mut t, mut i) = (
            target(Some(c.clone()), Some(creds("target", "not-the-secret"))),
            initiator(Some(c.clone()), Some(m)),
        );
        let (tn, inn, _) = run_until_initiator_fails(&mut t, &mut i);
        assert!(tn.is_none_or(|r| r.is_ok()));
        assert!(matches!(inn, LoginError::Protocol(_)), "{inn:?}");
    }

    /// Like [`run`], for a login the initiator abandons.
    fn run_until_initiator_fails(
        t: &mut TargetLogin,
        i: &mut InitiatorLogin,
    ) -> (Option<Result<Negotiated, LoginStatus>>, LoginError, usize) {
        let mut step = i.start();
        for round in 1..20 {
            let InitiatorStep::Send(req, data) = step else {
                panic!("login succeeded")
            };
            let reply = t.on_request(&req, &data);
            match i.on_response(&reply.header, &reply.data) {
                Err(e) => return (reply.done, e, round),
                Ok(next) => step = next,
            }
        }
        panic!("login did not end");
    }

    #[test]
    fn wrong_secret_unknown_target_and_missing_name_are_refused() {
        let c = creds("alice", "secret-of-alice");
        let (mut t, mut i) = (
            target(Some(c.clone()), None),
            initiator(Some(creds("alice", "guess")), None),
        );
        let (tn, inn, _) = run_until_initiator_fails(&mut t, &mut i);
        assert_eq!(tn, Some(Err(LoginStatus::AUTH_FAILED)));
        assert_eq!(inn, LoginError::Refused(LoginStatus::AUTH_FAILED));
        // CHAP required, the initiator offers only None
        let (mut t, mut i) = (target(Some(c), None), initiator(None, None));
        let (_, inn, _) = run_until_initiator_fails(&mut t, &mut i);
        assert_eq!(inn, LoginError::Refused(LoginStatus::AUTH_FAILED));
        // unknown target
        let mut i = initiator(None, None);
        i.cfg.target_name = Some("iqn.nope".into());
        let (_, inn, _) = run_until_initiator_fails(&mut target(None, None), &mut i);
        assert_eq!(inn, LoginError::Refused(LoginStatus::NOT_FOUND));
        // no InitiatorName
        let mut t = target(None, None);
        let InitiatorStep::Send(req, _) = initiator(None, None).start() else {
            unreachable!()
        };
        let r = t.on_request(
            &req,
            b"TargetName=iqn.2026-12.org.toemu:disk\0AuthMethod=None\0",
        );
        assert_eq!(r.done, Some(Err(LoginStatus::MISSING_PARAMETER)));
        assert_eq!((r.header.status_class, r.header.status_detail), (2, 7));
        // malformed text
        let mut t = target(None, None);
        let r = t.on_request(&req, b"InitiatorName\0");
        assert_eq!(r.done, Some(Err(LoginStatus::INITIATOR_ERROR)));
    }

    #[test]
    fn a_reflected_challenge_is_refused() {
        let c = creds("alice", "secret-of-alice");
        let m = creds("target", "secret-of-target");
        let mut t = target(Some(c.clone()), Some(m.clone()));
        let mut i = initiator(Some(c), Some(m));
        i.challenge = [0x11; 16]; // the target's own challenge
        let (tn, inn, _) = run_until_initiator_fails(&mut t, &mut i);
        assert_eq!(tn, Some(Err(LoginStatus::AUTH_FAILED)));
        assert_eq!(inn, LoginError::Refused(LoginStatus::AUTH_FAILED));
    }

    #[test]
    fn discovery_sessions_need_no_target_name() {
        let mut i = initiator(None, None);
        i.cfg.target_name = None;
        i.neg.session_type = SessionType::Discovery;
        i.neg.target_name.clear();
        let (tn, inn, _) = run(&mut target(None, None), &mut i);
        let tn = tn.unwrap();
        assert_eq!(tn, inn.unwrap());
        assert_eq!(tn.session_type, SessionType::Discovery);
    }

    #[test]
    fn continued_text_is_gathered_and_each_piece_answered_empty() {
        let mut t = target(None, None);
        let InitiatorStep::Send(mut req, data) = initiator(None, None).start() else {
            unreachable!()
        };
        let (a, b) = data.split_at(10);
        let transit = req.transit;
        req.transit = false;
        req.cont = true;
        let r = t.on_request(&req, a);
        assert!(r.data.is_empty() && r.done.is_none() && !r.header.transit);
        req.cont = false;
        req.transit = transit;
        let r = t.on_request(&req, b);
        assert!(r.header.transit, "the gathered text logs in: {r:?}");
        assert!(text::parse_pairs(&r.data)
            .unwrap()
            .contains(&("AuthMethod", "None")));
        // StatSN advanced once per response
        assert_eq!(t.stat_sn(), 102);
    }

    #[test]
    fn unknown_and_obsolete_keys_are_not_understood_and_bad_values_rejected() {
        let mut t = target(None, None);
        let InitiatorStep::Send(req, data) = initiator(None, None).start() else {
            unreachable!()
        };
        t.on_request(&req, &data);
        let mut op = req;
        op.csg = 1;
        op.nsg = 3;
        let r = t.on_request(
            &op,
            b"IFMarker=No\0X-org.example.thing=1\0MaxBurstLength=100\0ErrorRecoveryLevel=0\0",
        );
        let p = text::parse_pairs(&r.data).unwrap();
        assert!(p.contains(&("IFMarker", "NotUnderstood")));
        assert!(p.contains(&("X-org.example.thing", "NotUnderstood")));
        assert!(p.contains(&("MaxBurstLength", "Reject")), "under 512");
        assert!(p.contains(&("ErrorRecoveryLevel", "0")));
        assert!(r.done.unwrap().is_ok());
    }

    #[test]
    fn chap_md5_is_rfc_1994s() {
        // MD5(0x01 || "abcdefghijklmnop" || 00..0f), computed with Python's hashlib
        let r = chap_md5(1, b"abcdefghijklmnop", &(0..16).collect::<Vec<u8>>());
        assert_eq!(hex::encode(r), "8b4dabf8b640fc8662d8ebee0c244c5e");
        assert_eq!(parse_hex_value("0x0102"), Some(vec![1, 2]));
        assert_eq!(parse_hex_value("0x102"), Some(vec![1, 2]));
        assert_eq!(parse_hex_value("0x"), None);
        assert_eq!(parse_hex_value("0bAQI="), None, "base64 not supported");
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_login_requests_never_panic(
            pdus in proptest::collection::vec(
                (proptest::collection::vec(proptest::num::u8::ANY, 48..=48),
                 proptest::collection::vec(proptest::num::u8::ANY, 0..300)),
                1..6,
            ),
        ) {
            let mut t = target(Some(creds("a", "b")), None);
            for (bhs, data) in pdus {
                let mut b = [0u8; 48];
                b.copy_from_slice(&bhs);
                b[0] = 0x43;
                if let Ok(crate::wire::Repr::LoginRequest(l)) = crate::wire::Repr::parse(&b) {
                    let r = t.on_request(&l, &data);
                    if r.done.is_some() {
                        break;
                    }
                }
            }
        }
    }
}
