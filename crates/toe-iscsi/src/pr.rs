//! Persistent reservations (SPC-4 §5.13): PERSISTENT RESERVE IN and OUT, pure.
//!
//! A nexus registers a reservation key, then a registered nexus may reserve the logical
//! unit with one of six types; the type says who else may read and write
//! ([`Reservations::conflicts`]). Registrations and the reservation outlive the nexus that
//! made them (that is what "persistent" means; this disk does not keep them through a power
//! loss, so APTPL is refused). Every state change a service action makes for other nexuses
//! comes back as unit attentions to queue for them.
//!
//! Supported: READ KEYS, READ RESERVATION, REPORT CAPABILITIES and READ FULL STATUS; REGISTER,
//! REGISTER AND IGNORE EXISTING KEY, RESERVE, RELEASE, CLEAR, PREEMPT and PREEMPT AND ABORT,
//! all at logical-unit scope. Not supported: REGISTER AND MOVE, SPEC_I_PT, ALL_TG_PT
//! (one target port) and APTPL.

use crate::scsi::{Nexus, Sense};

/// Most registrations the logical unit holds; one more is INSUFFICIENT REGISTRATION
/// RESOURCES, so a hostile initiator cannot grow the table.
pub const MAX_REGISTRATIONS: usize = 256;

/// A reservation type (SPC-4 Table 209), the TYPE field of PERSISTENT RESERVE OUT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Type {
    /// Write Exclusive (1): only the holder writes; anyone reads.
    WriteExclusive,
    /// Exclusive Access (3): only the holder reads or writes.
    ExclusiveAccess,
    /// Write Exclusive – Registrants Only (5): registered nexuses write; anyone reads.
    WriteExclusiveRegistrantsOnly,
    /// Exclusive Access – Registrants Only (6): only registered nexuses read or write.
    ExclusiveAccessRegistrantsOnly,
    /// Write Exclusive – All Registrants (7): every registrant holds it; anyone reads.
    WriteExclusiveAllRegistrants,
    /// Exclusive Access – All Registrants (8): every registrant holds it; only they access.
    ExclusiveAccessAllRegistrants,
}

impl Type {
    /// The type of TYPE code `code`, if it is one.
    pub fn from_code(code: u8) -> Option<Type> {
        Some(match code {
            1 => Type::WriteExclusive,
            3 => Type::ExclusiveAccess,
            5 => Type::WriteExclusiveRegistrantsOnly,
            6 => Type::ExclusiveAccessRegistrantsOnly,
            7 => Type::WriteExclusiveAllRegistrants,
            8 => Type::ExclusiveAccessAllRegistrants,
            _ => return None,
        })
    }

    /// The TYPE code.
    pub fn code(self) -> u8 {
        match self {
            Type::WriteExclusive => 1,
            Type::ExclusiveAccess => 3,
            Type::WriteExclusiveRegistrantsOnly => 5,
            Type::ExclusiveAccessRegistrantsOnly => 6,
            Type::WriteExclusiveAllRegistrants => 7,
            Type::ExclusiveAccessAllRegistrants => 8,
        }
    }

    /// Every registrant holds the reservation (the All Registrants types).
    pub fn all_registrants(self) -> bool {
        matches!(
            self,
            Type::WriteExclusiveAllRegistrants | Type::ExclusiveAccessAllRegistrants
        )
    }

    /// Registered nexuses have the holder's access (Registrants Only and All Registrants).
    fn registrants_access(self) -> bool {
        !matches!(self, Type::WriteExclusive | Type::ExclusiveAccess)
    }

    /// Nexuses without access may still read (the Write Exclusive types).
    fn others_read(self) -> bool {
        matches!(
            self,
            Type::WriteExclusive
                | Type::WriteExclusiveRegistrantsOnly
                | Type::WriteExclusiveAllRegistrants
        )
    }
}

/// What a command does to the medium, for the access rules of a reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Allowed under every reservation (INQUIRY, REPORT LUNS, TEST UNIT READY, ...).
    Always,
    /// Reads the medium or its state (READ, VERIFY, MODE SENSE, ...).
    Read,
    /// Everything else: writes, cache flushes, mode changes.
    Write,
}

/// Why a service action was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// RESERVATION CONFLICT status.
    Conflict,
    /// CHECK CONDITION with this sense.
    Check(Sense),
}

/// UNIT ATTENTION, RESERVATIONS PREEMPTED (2Ah/03h).
pub const RESERVATIONS_PREEMPTED: Sense = Sense::attention(0x2a, 0x03);
/// UNIT ATTENTION, RESERVATIONS RELEASED (2Ah/04h).
pub const RESERVATIONS_RELEASED: Sense = Sense::attention(0x2a, 0x04);
/// UNIT ATTENTION, REGISTRATIONS PREEMPTED (2Ah/05h).
pub const REGISTRATIONS_PREEMPTED: Sense = Sense::attention(0x2a, 0x05);
/// ILLEGAL REQUEST, INVALID RELEASE OF PERSISTENT RESERVATION (26h/04h).
pub const INVALID_RELEASE: Sense = Sense::illegal(0x26, 0x04);
/// ILLEGAL REQUEST, INSUFFICIENT REGISTRATION RESOURCES (55h/04h).
pub const INSUFFICIENT_REGISTRATION_RESOURCES: Sense = Sense::illegal(0x55, 0x04);

/// The reservation in force.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Held {
    /// The nexus that made it (for the All Registrants types, one of the holders).
    holder: Nexus,
    kind: Type,
}

/// The persistent reservation state of one logical unit.
#[derive(Debug, Default, Clone)]
pub struct Reservations {
    /// PRgeneration: counts the service actions that changed the registrations (REGISTER,
    /// REGISTER AND IGNORE, CLEAR, PREEMPT), wrapping.
    generation: u32,
    /// Registered nexuses and their keys (never 0), oldest first; at most
    /// [`MAX_REGISTRATIONS`].
    registered: Vec<(Nexus, u64)>,
    held: Option<Held>,
}

/// Attentions to queue: (nexus, sense).
pub type Attentions = Vec<(Nexus, Sense)>;

impl Reservations {
    /// Whether any nexus is registered (RESERVE and RELEASE (6, 10) then conflict).
    pub fn any_registered(&self) -> bool {
        !self.registered.is_empty()
    }

    fn key_of(&self, n: &Nexus) -> Option<u64> {
        self.registered
            .iter()
            .find_map(|(m, k)| (m == n).then_some(*k))
    }

    fn is_holder(&self, n: &Nexus) -> bool {
        match &self.held {
            Some(h) if h.kind.all_registrants() => self.key_of(n).is_some(),
            Some(h) => h.holder == *n,
            None => false,
        }
    }

    /// Whether a command of `access` from `nexus` ends in RESERVATION CONFLICT under the
    /// reservation in force (SPC-4 Table 63 and SBC-3 Table 13, by class of command).
    pub fn conflicts(&self, nexus: &Nexus, access: Access) -> bool {
        let Some(h) = &self.held else {
            return false;
        };
        if access == Access::Always || self.is_holder(nexus) {
            return false;
        }
        if h.kind.registrants_access() && self.key_of(nexus).is_some() {
            return false;
        }
        !(access == Access::Read && h.kind.others_read())
    }

    /// Attentions for every registered nexus but `except`.
    fn others(&self, except: &Nexus, s: Sense) -> Attentions {
        self.registered
            .iter()
            .filter(|(n, _)| n != except)
            .map(|(n, _)| (n.clone(), s))
            .collect()
    }

    /// The registration of `nexus` ends; so does a reservation it alone held, with
    /// RESERVATIONS RELEASED for the other registrants if its type let them in.
    fn unregister(&mut self, nexus: &Nexus, out: &mut Attentions) {
        self.registered.retain(|(n, _)| n != nexus);
        let Some(h) = &self.held else {
            return;
        };
        let ends = if h.kind.all_registrants() {
            self.registered.is_empty()
        } else {
            h.holder == *nexus
        };
        if ends {
            if h.kind.registrants_access() {
                out.extend(self.others(nexus, RESERVATIONS_RELEASED));
            }
            self.held = None;
        } else if h.kind.all_registrants() && h.holder == *nexus {
            // Another registrant stands for the reservation now.
            let next = self.registered[0].0.clone();
            self.held.as_mut().expect("held").holder = next;
        }
    }

    /// PERSISTENT RESERVE OUT from `nexus`: `cdb` is the 10-byte CDB, `params` the
    /// parameter list. Returns the attentions to queue for other nexuses.
    pub fn out(&mut self, nexus: &Nexus, cdb: &[u8], params: &[u8]) -> Result<Attentions, Refusal> {
        let action = cdb[1] & 0x1f;
        let (scope, code) = (cdb[2] >> 4, cdb[2] & 0x0f);
        let len = u32::from_be_bytes([cdb[5], cdb[6], cdb[7], cdb[8]]);
        if action > 6 {
            // REGISTER AND MOVE (7) has another parameter list and is not supported.
            return Err(Refusal::Check(Sense::INVALID_FIELD_IN_CDB));
        }
        if len != 24 || params.len() < 24 {
            return Err(Refusal::Check(Sense::PARAMETER_LIST_LENGTH_ERROR));
        }
        let key = u64::from_be_bytes(params[0..8].try_into().expect("8 bytes"));
        let sa_key = u64::from_be_bytes(params[8..16].try_into().expect("8 bytes"));
        // SPEC_I_PT, ALL_TG_PT and APTPL: REPORT CAPABILITIES says none is supported.
        if params[20] & 0x0d != 0 {
            return Err(Refusal::Check(Sense::INVALID_FIELD_IN_PARAMETER_LIST));
        }
        let kind = match action {
            1 | 2 | 4 | 5 => {
                if scope != 0 {
                    return Err(Refusal::Check(Sense::INVALID_FIELD_IN_CDB));
                }
                let t = Type::from_code(code);
                Some(t.ok_or(Refusal::Check(Sense::INVALID_FIELD_IN_CDB))?)
            }
            _ => None,
        };
        let mine = self.key_of(nexus);
        let mut att = Attentions::new();
        match action {
            // REGISTER and REGISTER AND IGNORE EXISTING KEY.
            0 | 6 => {
                if action == 0 && mine.unwrap_or(0) != key {
                    return Err(Refusal::Conflict);
                }
                match (mine, sa_key) {
                    // Nothing to register or unregister: success without a change.
                    (None, 0) => return Ok(att),
                    (None, k) => {
                        if self.registered.len() >= MAX_REGISTRATIONS {
                            return Err(Refusal::Check(INSUFFICIENT_REGISTRATION_RESOURCES));
                        }
                        self.registered.push((nexus.clone(), k));
                    }
                    (Some(_), 0) => self.unregister(nexus, &mut att),
                    (Some(_), k) => {
                        for r in self.registered.iter_mut().filter(|(n, _)| n == nexus) {
                            r.1 = k;
                        }
                    }
                }
                self.generation = self.generation.wrapping_add(1);
                return Ok(att);
            }
            _ if mine != Some(key) => return Err(Refusal::Conflict),
            _ => {}
        }
        match (action, kind) {
            // RESERVE: a holder asking again for the same type changes nothing.
            (1, Some(t)) => match &self.held {
                None => {
                    self.held = Some(Held {
                        holder: nexus.clone(),
                        kind: t,
                    })
                }
                Some(h) if self.is_holder(nexus) && h.kind == t => {}
                Some(_) => return Err(Refusal::Conflict),
            },
            // RELEASE: only a holder's release of the type in force does anything.
            (2, Some(t)) => match &self.held {
                Some(h) if self.is_holder(nexus) => {
                    if h.kind != t {
                        return Err(Refusal::Check(INVALID_RELEASE));
                    }
                    if t.registrants_access() {
                        att = self.others(nexus, RESERVATIONS_RELEASED);
                    }
                    self.held = None;
                }
                _ => {}
            },
            // CLEAR: every registration and the reservation.
            (3, _) => {
                att = self.others(nexus, RESERVATIONS_PREEMPTED);
                self.registered.clear();
                self.held = None;
                self.generation = self.generation.wrapping_add(1);
            }
            // PREEMPT and PREEMPT AND ABORT (this disk runs one command at a time, so there
            // is nothing left to abort).
            (4 | 5, Some(t)) => {
                att = self.preempt(nexus, sa_key, t)?;
                self.generation = self.generation.wrapping_add(1);
            }
            _ => return Err(Refusal::Check(Sense::INVALID_FIELD_IN_CDB)),
        }
        Ok(att)
    }

    /// PREEMPT with service action key `sa_key` and type `t` (SPC-4 §5.13.11.4).
    fn preempt(&mut self, nexus: &Nexus, sa_key: u64, t: Type) -> Result<Attentions, Refusal> {
        let all_registrants = self.held.as_ref().is_some_and(|h| h.kind.all_registrants());
        let holder_key = match &self.held {
            Some(h) if !h.kind.all_registrants() => self.key_of(&h.holder),
            _ => None,
        };
        // Which registrations go: those with the key, or, under an All Registrants
        // reservation with key 0, every other one.
        let take_all = all_registrants && sa_key == 0;
        if sa_key == 0 && !take_all {
            return Err(Refusal::Check(Sense::INVALID_FIELD_IN_PARAMETER_LIST));
        }
        let gone: Vec<Nexus> = self
            .registered
            .iter()
            .filter(|(n, k)| if take_all { n != nexus } else { *k == sa_key })
            .map(|(n, _)| n.clone())
            .collect();
        if gone.is_empty() && !take_all && holder_key != Some(sa_key) {
            return Err(Refusal::Conflict);
        }
        let mut att: Attentions = gone
            .iter()
            .filter(|n| *n != nexus)
            .map(|n| (n.clone(), REGISTRATIONS_PREEMPTED))
            .collect();
        let takes_over = take_all || (holder_key.is_some() && holder_key == Some(sa_key));
        if takes_over {
            // The preempting nexus now holds the reservation, of the type it names; if the
            // type changed, the registrants that stay are told their reservation did.
            if self.held.as_ref().is_some_and(|h| h.kind != t) {
                let kept: Vec<Nexus> = self
                    .registered
                    .iter()
                    .filter(|(n, _)| n != nexus && !gone.contains(n))
                    .map(|(n, _)| n.clone())
                    .collect();
                att.extend(kept.into_iter().map(|n| (n, RESERVATIONS_RELEASED)));
            }
            self.held = Some(Held {
                holder: nexus.clone(),
                kind: t,
            });
        }
        // The preempting nexus keeps its own registration even when its key matched.
        self.registered
            .retain(|(n, _)| n == nexus || !gone.contains(n));
        if self.held.as_ref().is_some_and(|h| h.kind.all_registrants())
            && self.registered.is_empty()
        {
            self.held = None;
        }
        Ok(att)
    }

    /// PERSISTENT RESERVE IN: the parameter data of service action `cdb[1] & 1Fh`, truncated
    /// to the allocation length.
    pub fn read(&self, cdb: &[u8]) -> Result<Vec<u8>, Refusal> {
        let alloc = usize::from(u16::from_be_bytes([cdb[7], cdb[8]]));
        let mut d = self.generation.to_be_bytes().to_vec();
        match cdb[1] & 0x1f {
            // READ KEYS: the ADDITIONAL LENGTH is of every key, whatever the allocation.
            0 => {
                d.extend_from_slice(&((self.registered.len() * 8) as u32).to_be_bytes());
                for (_, k) in &self.registered {
                    d.extend_from_slice(&k.to_be_bytes());
                }
            }
            // READ RESERVATION: key 0 for the All Registrants types.
            1 => match &self.held {
                None => d.extend_from_slice(&0u32.to_be_bytes()),
                Some(h) => {
                    d.extend_from_slice(&16u32.to_be_bytes());
                    let key = if h.kind.all_registrants() {
                        0
                    } else {
                        self.key_of(&h.holder).unwrap_or(0)
                    };
                    d.extend_from_slice(&key.to_be_bytes());
                    d.extend_from_slice(&[0, 0, 0, 0, 0, h.kind.code(), 0, 0]);
                }
            },
            // REPORT CAPABILITIES: LENGTH 8; no CRH, SIP_C, ATP_C or PTPL_C; TMV with every
            // type in the mask.
            2 => {
                d = vec![0, 8, 0, 0x80, 0xe0 | 0x08 | 0x02, 0x01, 0, 0];
            }
            // READ FULL STATUS: a descriptor per registration with its iSCSI TransportID.
            3 => {
                let mut body = Vec::new();
                for (n, k) in &self.registered {
                    let holds = self.is_holder(n);
                    body.extend_from_slice(&k.to_be_bytes());
                    body.extend_from_slice(&[0; 4]);
                    body.push(u8::from(holds));
                    body.push(match (&self.held, holds) {
                        (Some(h), true) => h.kind.code(),
                        _ => 0,
                    });
                    body.extend_from_slice(&[0; 4]);
                    // Relative target port identifier: the one port, 1.
                    body.extend_from_slice(&1u16.to_be_bytes());
                    let tid = transport_id(n);
                    body.extend_from_slice(&(tid.len() as u32).to_be_bytes());
                    body.extend_from_slice(&tid);
                }
                d.extend_from_slice(&(body.len() as u32).to_be_bytes());
                d.extend_from_slice(&body);
            }
            _ => return Err(Refusal::Check(Sense::INVALID_FIELD_IN_CDB)),
        }
        d.truncate(alloc);
        Ok(d)
    }
}

/// The iSCSI TransportID of `n` (SPC-4 §7.6.4.6, format 01b: the initiator port's name
/// `InitiatorName,i,0xISID`, NUL-terminated, padded to a multiple of 4).
fn transport_id(n: &Nexus) -> Vec<u8> {
    let name = n.port_name().unwrap_or("");
    let mut padded = name.as_bytes().to_vec();
    padded.push(0);
    while padded.len() % 4 != 0 {
        padded.push(0);
    }
    let mut t = vec![0x40 | 0x05, 0];
    t.extend_from_slice(&(padded.len() as u16).to_be_bytes());
    t.extend_from_slice(&padded);
    t
}
