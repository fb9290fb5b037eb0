//! Text keys (RFC 7143 §6 and §13): the `key=value` pairs of Login and Text PDUs, and the
//! negotiation of each key.
//!
//! A data segment of text is a sequence of `key=value` strings, each ended by a NUL byte.
//! Keys are at most 63 characters of letters, digits, `.`, `-`, `+`, `@` and `_`; values are
//! at most 255 bytes (8,192 for the few binary-ish ones a login carries, such as CHAP
//! challenges), UTF-8.
//!
//! Each key has a kind ([`Kind`]) that fixes how an offer and an answer combine (§6.2.1):
//! lists (the responder picks the first offered value it supports), numbers with a minimum or
//! maximum result function, booleans with AND or OR, and declarations (no negotiation). Keys
//! are session- or connection-wide, and session-wide ones are *leading only*: they may be
//! negotiated only on the session's first connection. A key the responder does not know is
//! answered `NotUnderstood`; a malformed or out-of-range value is answered `Reject`, and
//! private keys (`X-` and `X#` prefixes) are the protocol's extension point.

use thiserror::Error;

/// Longest key name, characters.
pub const MAX_KEY_LEN: usize = 63;
/// Longest ordinary value, bytes.
pub const MAX_VALUE_LEN: usize = 255;
/// Longest value of keys that carry large values (CHAP challenges and responses), bytes.
pub const MAX_LARGE_VALUE_LEN: usize = 8192;

/// Why a text segment is not a sequence of `key=value` pairs.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TextError {
    /// A pair without `=`.
    #[error("pair {0:?} has no '='")]
    NoEquals(String),
    /// A key name that is empty, too long or holds a character keys may not.
    #[error("invalid key name {0:?}")]
    BadKey(String),
    /// A value longer than its key allows.
    #[error("value of {key} is {len} bytes, over the limit")]
    ValueTooLong {
        /// The key.
        key: String,
        /// The value's length, bytes.
        len: usize,
    },
    /// Bytes that are not UTF-8.
    #[error("text is not UTF-8")]
    NotUtf8,
    /// The same key twice in one negotiation (RFC 7143 §6.1: a protocol error).
    #[error("key {0} appears twice")]
    Duplicate(String),
}

/// The pairs of a text data segment, in order; a key may appear once (negotiation). A
/// trailing segment without its final NUL is accepted (some initiators omit it); empty
/// strings between NULs are skipped.
pub fn parse_pairs(data: &[u8]) -> Result<Vec<(&str, &str)>, TextError> {
    let out = parse_listing(data)?;
    for (i, &(k, _)) in out.iter().enumerate() {
        if out[..i].iter().any(|&(o, _)| o == k) {
            return Err(TextError::Duplicate(k.into()));
        }
    }
    Ok(out)
}

/// The pairs of a text data segment in which keys repeat: a SendTargets answer (a
/// `TargetName`, then its `TargetAddress` keys, for each target; RFC 7143 §12.3). Each pair
/// is checked as in [`parse_pairs`].
pub fn parse_listing(data: &[u8]) -> Result<Vec<(&str, &str)>, TextError> {
    let mut out = Vec::new();
    for raw in data.split(|&b| b == 0).filter(|s| !s.is_empty()) {
        let s = std::str::from_utf8(raw).map_err(|_| TextError::NotUtf8)?;
        let (k, v) = s
            .split_once('=')
            .ok_or_else(|| TextError::NoEquals(s.chars().take(80).collect()))?;
        if !valid_key(k) {
            return Err(TextError::BadKey(k.chars().take(80).collect()));
        }
        let limit = if large_value(k) {
            MAX_LARGE_VALUE_LEN
        } else {
            MAX_VALUE_LEN
        };
        if v.len() > limit {
            return Err(TextError::ValueTooLong {
                key: k.into(),
                len: v.len(),
            });
        }
        out.push((k, v));
    }
    Ok(out)
}

/// Append `key=value\0` for every pair to `out`.
pub fn encode_pairs<K: AsRef<str>, V: AsRef<str>>(pairs: &[(K, V)], out: &mut Vec<u8>) {
    for (k, v) in pairs {
        out.extend_from_slice(k.as_ref().as_bytes());
        out.push(b'=');
        out.extend_from_slice(v.as_ref().as_bytes());
        out.push(0);
    }
}

fn valid_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= MAX_KEY_LEN
        && k.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b".-+@_".contains(&c))
}

fn large_value(k: &str) -> bool {
    k.starts_with("CHAP_") || k.starts_with("SRP_") || k.starts_with("KRB_") || k == "SendTargets"
}

/// How a key's offer and answer combine (RFC 7143 §6.2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A list of values; the responder answers the first offered one it supports.
    List(&'static [&'static str]),
    /// A number in `lo..=hi`; the result is the smaller of offer and answer.
    Min(u32, u32),
    /// A number in `lo..=hi`; the result is the larger.
    Max(u32, u32),
    /// `Yes`/`No`; the result is `Yes` if either side says so.
    Or,
    /// `Yes`/`No`; the result is `Yes` only if both say so.
    And,
    /// A declaration: the sender states a value, the other side does not answer. A number
    /// in `lo..=hi` when given.
    Declarative(Option<(u32, u32)>),
}

/// Scope of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// One value per session; negotiated on the leading connection only.
    Session,
    /// One value per connection.
    Connection,
}

/// When a key may be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Only during login (its value is fixed for the connection afterwards).
    Login,
    /// During login or in Text requests of full-feature phase.
    Any,
}

/// One key of RFC 7143 §13.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyDef {
    /// Its name.
    pub name: &'static str,
    /// How it negotiates.
    pub kind: Kind,
    /// Session- or connection-wide.
    pub scope: Scope,
    /// When it may be sent.
    pub phase: Phase,
    /// Its value when not negotiated (empty: none).
    pub default: &'static str,
}

impl KeyDef {
    /// Negotiated only on a session's first connection.
    pub fn leading_only(&self) -> bool {
        self.scope == Scope::Session
    }
}

const fn key(name: &'static str, kind: Kind, scope: Scope, default: &'static str) -> KeyDef {
    KeyDef {
        name,
        kind,
        scope,
        phase: Phase::Login,
        default,
    }
}

const MAX24: u32 = (1 << 24) - 1;

/// Every key toemu knows (RFC 7143 §13 and RFC 7144's iSCSIProtocolLevel). The obsolete
/// marker keys (OFMarker, IFMarker, OFMarkInt, IFMarkInt) are not listed: they are answered
/// `NotUnderstood`, which RFC 7143 §13.25 allows.
pub const KEYS: &[KeyDef] = &[
    key(
        "AuthMethod",
        Kind::List(&["CHAP", "None"]),
        Scope::Connection,
        "None",
    ),
    key(
        "HeaderDigest",
        Kind::List(&["CRC32C", "None"]),
        Scope::Connection,
        "None",
    ),
    key(
        "DataDigest",
        Kind::List(&["CRC32C", "None"]),
        Scope::Connection,
        "None",
    ),
    key("MaxConnections", Kind::Min(1, 65535), Scope::Session, "1"),
    KeyDef {
        name: "SendTargets",
        kind: Kind::Declarative(None),
        scope: Scope::Session,
        phase: Phase::Any,
        default: "",
    },
    key("TargetName", Kind::Declarative(None), Scope::Session, ""),
    key("InitiatorName", Kind::Declarative(None), Scope::Session, ""),
    key("TargetAlias", Kind::Declarative(None), Scope::Session, ""),
    key(
        "InitiatorAlias",
        Kind::Declarative(None),
        Scope::Session,
        "",
    ),
    KeyDef {
        name: "TargetAddress",
        kind: Kind::Declarative(None),
        scope: Scope::Session,
        phase: Phase::Any,
        default: "",
    },
    key(
        "TargetPortalGroupTag",
        Kind::Declarative(Some((0, 65535))),
        Scope::Session,
        "",
    ),
    key("InitialR2T", Kind::Or, Scope::Session, "Yes"),
    key("ImmediateData", Kind::And, Scope::Session, "Yes"),
    KeyDef {
        name: "MaxRecvDataSegmentLength",
        kind: Kind::Declarative(Some((512, MAX24))),
        scope: Scope::Connection,
        phase: Phase::Any,
        default: "8192",
    },
    key(
        "MaxBurstLength",
        Kind::Min(512, MAX24),
        Scope::Session,
        "262144",
    ),
    key(
        "FirstBurstLength",
        Kind::Min(512, MAX24),
        Scope::Session,
        "65536",
    ),
    key("DefaultTime2Wait", Kind::Max(0, 3600), Scope::Session, "2"),
    key(
        "DefaultTime2Retain",
        Kind::Min(0, 3600),
        Scope::Session,
        "20",
    ),
    key(
        "MaxOutstandingR2T",
        Kind::Min(1, 65535),
        Scope::Session,
        "1",
    ),
    key("DataPDUInOrder", Kind::Or, Scope::Session, "Yes"),
    key("DataSequenceInOrder", Kind::Or, Scope::Session, "Yes"),
    key("ErrorRecoveryLevel", Kind::Min(0, 2), Scope::Session, "0"),
    key(
        "SessionType",
        Kind::Declarative(None),
        Scope::Session,
        "Normal",
    ),
    key("iSCSIProtocolLevel", Kind::Min(0, 31), Scope::Session, "0"),
    // toemu's private key (RFC 7143 §13.26: `X-` and the reversed domain): write
    // acceleration (seed 000; see `crate::accel`). Offered only by initiators that ask.
    key(
        crate::accel::WRITE_ACCELERATION_KEY,
        Kind::And,
        Scope::Session,
        "No",
    ),
    key(
        "TaskReporting",
        Kind::List(&["RFC3720", "ResponseFence", "FastAbort"]),
        Scope::Session,
        "RFC3720",
    ),
];

/// The definition of `name`, if it is one of [`KEYS`].
pub fn key_def(name: &str) -> Option<&'static KeyDef> {
    KEYS.iter().find(|k| k.name == name)
}

/// A private or public extension key (`X-...`, `X#...`): RFC 7143 §6.1 and §13.
pub fn is_extension(name: &str) -> bool {
    name.starts_with("X-") || name.starts_with("X#")
}

/// Parse a numerical value: decimal, or hexadecimal with `0x` (RFC 7143 §5.1).
pub fn parse_number(v: &str) -> Option<u64> {
    if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        if h.is_empty() || h.len() > 16 {
            return None;
        }
        u64::from_str_radix(h, 16).ok()
    } else if !v.is_empty() && v.len() <= 20 && v.bytes().all(|c| c.is_ascii_digit()) {
        v.parse().ok()
    } else {
        None
    }
}

fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    }
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "Yes"
    } else {
        "No"
    }
}

/// A responder's answer to one offered key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Send `key=value` back; the negotiated value is `value`.
    Value(String),
    /// A declaration: nothing is sent back; the declared value holds.
    Declared,
    /// `key=Reject`: a malformed or unacceptable offer; the key keeps its default.
    Reject,
    /// `key=Irrelevant`: the key has no meaning now (for example FirstBurstLength when
    /// InitialR2T=Yes and ImmediateData=No).
    Irrelevant,
    /// `key=NotUnderstood`: an unknown key.
    NotUnderstood,
}

impl Answer {
    /// The value to send back for the key, if any.
    pub fn wire_value(&self) -> Option<&str> {
        match self {
            Answer::Value(v) => Some(v),
            Answer::Declared => None,
            Answer::Reject => Some("Reject"),
            Answer::Irrelevant => Some("Irrelevant"),
            Answer::NotUnderstood => Some("NotUnderstood"),
        }
    }
}

/// The responder's answer to `offered` for key `def`, given what the responder itself
/// supports or wants (`ours`: for a list, its supported values in preference order, comma
/// separated; for a number, its limit; for a boolean, its wish).
pub fn respond(def: &KeyDef, offered: &str, ours: &str) -> Answer {
    match def.kind {
        Kind::List(known) => {
            for v in offered.split(',') {
                if v.is_empty() || v.len() > MAX_VALUE_LEN {
                    return Answer::Reject;
                }
                if known.contains(&v) && ours.split(',').any(|o| o == v) {
                    return Answer::Value(v.into());
                }
            }
            // No common value: RFC 7143 §6.2 answers Reject.
            Answer::Reject
        }
        Kind::Min(lo, hi) | Kind::Max(lo, hi) => {
            let (Some(o), Some(m)) = (parse_number(offered), parse_number(ours)) else {
                return Answer::Reject;
            };
            if o < u64::from(lo) || o > u64::from(hi) {
                return Answer::Reject;
            }
            let r = if matches!(def.kind, Kind::Min(..)) {
                o.min(m)
            } else {
                o.max(m)
            };
            Answer::Value(r.to_string())
        }
        Kind::Or | Kind::And => {
            let (Some(o), Some(m)) = (parse_bool(offered), parse_bool(ours)) else {
                return Answer::Reject;
            };
            let r = if def.kind == Kind::Or { o || m } else { o && m };
            Answer::Value(yes_no(r).into())
        }
        Kind::Declarative(range) => match range {
            Some((lo, hi)) => match parse_number(offered) {
                Some(n) if n >= u64::from(lo) && n <= u64::from(hi) => Answer::Declared,
                _ => Answer::Reject,
            },
            None if offered.is_empty() => Answer::Reject,
            None => Answer::Declared,
        },
    }
}

/// The value the originator of `offered` ends up with once the responder answered
/// `answered` (RFC 7143 §6.2.1): the answer for lists, numbers and booleans if it is a
/// legal outcome of the key's result function; `None` if the answer is not (a negotiation
/// failure the originator must end the login for) or the key was rejected, irrelevant or not
/// understood (the default holds).
pub fn outcome(def: &KeyDef, offered: &str, answered: &str) -> Option<String> {
    if matches!(answered, "Reject" | "Irrelevant" | "NotUnderstood") {
        return None;
    }
    match def.kind {
        Kind::List(_) => offered
            .split(',')
            .any(|v| v == answered)
            .then(|| answered.into()),
        Kind::Min(lo, hi) | Kind::Max(lo, hi) => {
            let (o, a) = (parse_number(offered)?, parse_number(answered)?);
            let legal = if matches!(def.kind, Kind::Min(..)) {
                a <= o
            } else {
                a >= o
            };
            (legal && a >= u64::from(lo) && a <= u64::from(hi)).then(|| a.to_string())
        }
        Kind::Or | Kind::And => {
            let (o, a) = (parse_bool(offered)?, parse_bool(answered)?);
            // OR: an offered Yes must stay Yes; AND: an offered No must stay No.
            let legal = if def.kind == Kind::Or {
                a || !o
            } else {
                !a || o
            };
            legal.then(|| yes_no(a).into())
        }
        Kind::Declarative(_) => Some(answered.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_parse_and_encode() {
        let mut data = Vec::new();
        encode_pairs(
            &[
                ("InitiatorName", "iqn.2026-12.example:x"),
                ("SessionType", "Normal"),
            ],
            &mut data,
        );
        assert_eq!(
            data,
            b"InitiatorName=iqn.2026-12.example:x\0SessionType=Normal\0".to_vec()
        );
        let p = parse_pairs(&data).unwrap();
        assert_eq!(
            p,
            vec![
                ("InitiatorName", "iqn.2026-12.example:x"),
                ("SessionType", "Normal")
            ]
        );
        // no final NUL, and an empty value
        assert_eq!(
            parse_pairs(b"A=1\0B=").unwrap(),
            vec![("A", "1"), ("B", "")]
        );
        // values may hold '='
        assert_eq!(parse_pairs(b"X-a=b=c\0").unwrap(), vec![("X-a", "b=c")]);
    }

    #[test]
    fn malformed_text_is_an_error() {
        assert!(matches!(
            parse_pairs(b"NoEquals\0"),
            Err(TextError::NoEquals(_))
        ));
        assert!(matches!(parse_pairs(b"=x\0"), Err(TextError::BadKey(_))));
        assert!(matches!(parse_pairs(b"a b=x\0"), Err(TextError::BadKey(_))));
        let long_key = format!("{}=1", "K".repeat(64));
        assert!(matches!(
            parse_pairs(long_key.as_bytes()),
            Err(TextError::BadKey(_))
        ));
        let long = format!("TargetAlias={}", "v".repeat(256));
        assert!(matches!(
            parse_pairs(long.as_bytes()),
            Err(TextError::ValueTooLong { .. })
        ));
        let chap = format!("CHAP_C=0x{}", "ab".repeat(1000));
        assert!(
            parse_pairs(chap.as_bytes()).is_ok(),
            "CHAP values may be long"
        );
        assert_eq!(
            parse_pairs(b"A=1\0A=2\0"),
            Err(TextError::Duplicate("A".into()))
        );
        assert_eq!(parse_pairs(&[b'A', b'=', 0xff]), Err(TextError::NotUtf8));
    }

    fn def(n: &str) -> &'static KeyDef {
        key_def(n).unwrap()
    }

    #[test]
    fn result_functions_of_rfc_7143() {
        // lists: the first offered value the responder supports
        assert_eq!(
            respond(def("HeaderDigest"), "CRC32C,None", "None,CRC32C"),
            Answer::Value("CRC32C".into())
        );
        assert_eq!(
            respond(def("HeaderDigest"), "CRC32C,None", "None"),
            Answer::Value("None".into())
        );
        assert_eq!(
            respond(def("HeaderDigest"), "MD5", "CRC32C,None"),
            Answer::Reject
        );
        // numbers: min and max
        assert_eq!(
            respond(def("MaxBurstLength"), "1048576", "262144"),
            Answer::Value("262144".into())
        );
        assert_eq!(
            respond(def("DefaultTime2Wait"), "0", "2"),
            Answer::Value("2".into())
        );
        assert_eq!(
            respond(def("MaxBurstLength"), "0x40000", "1048576"),
            Answer::Value("262144".into()),
            "hexadecimal offers"
        );
        assert_eq!(
            respond(def("MaxBurstLength"), "100", "262144"),
            Answer::Reject
        );
        assert_eq!(respond(def("ErrorRecoveryLevel"), "3", "0"), Answer::Reject);
        assert_eq!(
            respond(def("MaxBurstLength"), "12a", "262144"),
            Answer::Reject
        );
        // booleans: OR and AND
        assert_eq!(
            respond(def("InitialR2T"), "No", "Yes"),
            Answer::Value("Yes".into())
        );
        assert_eq!(
            respond(def("InitialR2T"), "No", "No"),
            Answer::Value("No".into())
        );
        assert_eq!(
            respond(def("ImmediateData"), "Yes", "No"),
            Answer::Value("No".into())
        );
        assert_eq!(respond(def("ImmediateData"), "yes", "Yes"), Answer::Reject);
        // declarations
        assert_eq!(
            respond(def("MaxRecvDataSegmentLength"), "262144", ""),
            Answer::Declared
        );
        assert_eq!(
            respond(def("MaxRecvDataSegmentLength"), "511", ""),
            Answer::Reject
        );
        assert_eq!(respond(def("InitiatorName"), "iqn.x", ""), Answer::Declared);
    }

    #[test]
    fn outcomes_check_the_answer_is_legal() {
        assert_eq!(
            outcome(def("MaxBurstLength"), "1048576", "262144"),
            Some("262144".into())
        );
        assert_eq!(
            outcome(def("MaxBurstLength"), "262144", "1048576"),
            None,
            "a min key cannot grow"
        );
        assert_eq!(
            outcome(def("InitialR2T"), "Yes", "No"),
            None,
            "OR cannot drop a Yes"
        );
        assert_eq!(
            outcome(def("ImmediateData"), "No", "Yes"),
            None,
            "AND cannot add a Yes"
        );
        assert_eq!(
            outcome(def("HeaderDigest"), "None", "CRC32C"),
            None,
            "not offered"
        );
        assert_eq!(outcome(def("HeaderDigest"), "CRC32C,None", "Reject"), None);
        assert_eq!(
            outcome(def("DataDigest"), "CRC32C,None", "CRC32C"),
            Some("CRC32C".into())
        );
    }

    #[test]
    fn leading_only_and_extension_keys() {
        assert!(def("MaxBurstLength").leading_only());
        assert!(def("InitialR2T").leading_only());
        assert!(!def("HeaderDigest").leading_only());
        assert!(!def("MaxRecvDataSegmentLength").leading_only());
        assert!(key_def("OFMarker").is_none(), "obsolete: NotUnderstood");
        assert!(is_extension("X-org.toemu.dynamic-r2t") && is_extension("X#NodeArchitecture"));
        assert!(!is_extension("Xyz"));
    }

    #[test]
    fn numbers_parse_in_decimal_and_hex() {
        assert_eq!(parse_number("8192"), Some(8192));
        assert_eq!(parse_number("0x2000"), Some(8192));
        assert_eq!(parse_number("0x"), None);
        assert_eq!(parse_number("-1"), None);
        assert_eq!(parse_number(""), None);
        assert_eq!(parse_number("99999999999999999999999"), None);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_text_never_panics(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600),
            offer in "[ -~]{0,40}",
        ) {
            if let Ok(pairs) = parse_pairs(&bytes) {
                let mut again = Vec::new();
                encode_pairs(&pairs, &mut again);
                proptest::prop_assert_eq!(parse_pairs(&again).unwrap(), pairs);
            }
            for d in KEYS {
                let a = respond(d, &offer, d.default);
                if let Answer::Value(v) = &a {
                    // what a responder answers is a legal outcome of its own offer
                    proptest::prop_assert!(outcome(d, &offer, v).is_some(), "{} {offer} {v}", d.name);
                }
            }
        }
    }
}
