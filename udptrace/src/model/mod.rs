//! The output contract (docs/json.md, docs/flows.md) as types: what `trace --json`,
//! `flows --json` and the agent's API write, and what `udptrace path` and stitching read
//! back. Types only: no code here produces them (that is `pipeline`), none prints them
//! (that is `output`).

pub mod flow;
pub mod owner;
pub mod path;

pub use flow::{FlowNat, FlowView};
pub use owner::{Owner, OwnerKind};
pub use path::{
    Conntrack, Endpoints, Fragment, FragmentAction, Gso, Hop, HopKind, Nat, NatKind, NfHook, Path,
    PathType, Process, Tunnel, TunnelKind, Verdict,
};

/// Timestamps as RFC 3339 with nanoseconds, UTC (`2026-11-26T12:33:01.123456789Z`).
pub(crate) mod rfc3339 {
    use std::time::SystemTime;

    use serde::{Deserialize as _, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_rfc3339_nanos(*t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let text = std::borrow::Cow::<str>::deserialize(d)?;
        humantime::parse_rfc3339_weak(&text).map_err(serde::de::Error::custom)
    }
}

/// A hook by its name ([`udptrace_common::Hook::name`]); a name this build does not know
/// reads as `unknown`.
pub(crate) mod hook_name {
    use serde::{Deserialize as _, Deserializer, Serializer};
    use udptrace_common::Hook;

    pub fn serialize<S: Serializer>(h: &Hook, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(h.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Hook, D::Error> {
        let text = std::borrow::Cow::<str>::deserialize(d)?;
        Ok(Hook::from_name(&text).unwrap_or(Hook::Unknown))
    }
}
