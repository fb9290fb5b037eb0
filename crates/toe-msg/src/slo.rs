//! Service-level objectives and the DSCP marks they map to (seed 003 #4).
//!
//! A transfer says what it needs, not how the network should treat it; the transport
//! turns the objective into the Differentiated Services Code Point its connections carry,
//! so that routers that honour DiffServ queue backup traffic apart from what must not wait
//! behind it. The mapping follows the service classes of RFC 4594:
//!
//! | objective     | class (RFC 4594)        | PHB  | DSCP |
//! |---------------|-------------------------|------|-----:|
//! | `bulk`        | high-throughput data    | AF11 |   10 |
//! | `interactive` | low-latency data        | AF21 |   18 |
//! | `critical`    | expedited forwarding    | EF   |   46 |
//!
//! The TOS byte of an IPv4 header holds the DSCP in its upper six bits
//! ([`Slo::tos`]); the two ECN bits are the transport's own.

use std::fmt;
use std::str::FromStr;

/// What a transfer asks of the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Slo {
    /// Throughput matters, a delay of seconds does not: backups (AF11).
    Bulk,
    /// A person waits on it: restores of single files, listings (AF21).
    Interactive,
    /// Must get through first, with the least loss and delay (EF).
    Critical,
}

impl Slo {
    /// Every objective, in the order of the table above.
    pub const ALL: [Slo; 3] = [Slo::Bulk, Slo::Interactive, Slo::Critical];

    /// The Differentiated Services Code Point (0..=63) of the objective.
    pub fn dscp(self) -> u8 {
        match self {
            Slo::Bulk => 10,
            Slo::Interactive => 18,
            Slo::Critical => 46,
        }
    }

    /// The TOS byte (IPv4) or traffic class (IPv6) with the objective's DSCP and ECN 0.
    pub fn tos(self) -> u8 {
        self.dscp() << 2
    }

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Slo::Bulk => "bulk",
            Slo::Interactive => "interactive",
            Slo::Critical => "critical",
        }
    }
}

impl fmt::Display for Slo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (DSCP {})", self.name(), self.dscp())
    }
}

/// An objective name that is not one of [`Slo::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown service-level objective {0:?} (bulk, interactive or critical)")]
pub struct UnknownSlo(pub String);

impl FromStr for Slo {
    type Err = UnknownSlo;

    fn from_str(s: &str) -> Result<Slo, UnknownSlo> {
        Slo::ALL
            .into_iter()
            .find(|o| o.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| UnknownSlo(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objectives_map_to_rfc_4594_code_points_and_parse_back() {
        let got: Vec<(u8, u8)> = Slo::ALL.iter().map(|s| (s.dscp(), s.tos())).collect();
        assert_eq!(got, [(10, 40), (18, 72), (46, 184)]);
        for s in Slo::ALL {
            assert_eq!(s.name().parse::<Slo>(), Ok(s));
            assert_eq!(s.name().to_uppercase().parse::<Slo>(), Ok(s));
            assert!(s.dscp() < 64);
        }
        assert_eq!(
            "urgent".parse::<Slo>(),
            Err(UnknownSlo("urgent".to_string()))
        );
        assert_eq!(Slo::Critical.to_string(), "critical (DSCP 46)");
    }
}
