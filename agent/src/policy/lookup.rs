//! A user-space model of the kernel's lookup (`ebpf/src/verdict.rs`) over the
//! compiled tables: the same entries, the same precedence. Used by tests and
//! by offline questions ("would A reach B, and why?").
use palisade_common::{flags, identity, verdict};

use super::compile::{CompiledPolicy, EntryKey};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// `palisade_common::verdict::*`
    pub verdict: u8,
    /// Rule that decided, 0 for the default deny.
    pub rule_id: u32,
    /// The selecting policy's `default-deny` rule id.
    pub policy_rule_id: u32,
}

/// Longest-prefix match over entries with this (direction, protocol, local, peer).
fn longest(
    c: &CompiledPolicy,
    direction: u8,
    protocol: u8,
    local: u32,
    peer: u32,
    port: u16,
) -> (u32, u32) {
    let lo = EntryKey {
        direction,
        protocol,
        local,
        peer,
        port: 0,
        port_bits: 0,
    };
    let hi = EntryKey {
        direction,
        protocol,
        local,
        peer,
        port: u16::MAX,
        port_bits: u8::MAX,
    };
    c.entries
        .range(lo..=hi)
        .filter(|(k, _)| k.covers_port(port))
        .max_by_key(|(k, _)| k.port_bits)
        .map(|(_, v)| (v.flags, v.rule_id))
        .unwrap_or((0, 0))
}

/// `None`: the local identity is not selected in `direction`.
pub fn decide(
    c: &CompiledPolicy,
    direction: u8,
    protocol: u8,
    local: u32,
    peer: u32,
    port: u16,
) -> Option<Decision> {
    let enforcement = c.enforced.get(&(direction, local))?;
    let (exact_flags, exact_rule) = longest(c, direction, protocol, local, peer, port);
    let (any_flags, any_rule) = longest(c, direction, protocol, local, identity::ANY, port);
    let all = exact_flags | any_flags;
    let pick = |bit: u32| {
        if exact_flags & bit != 0 {
            exact_rule
        } else {
            any_rule
        }
    };
    let audit_only = enforcement.flags & flags::AUDIT_DENY != 0;
    let (v, rule_id) = if all & flags::DENY != 0 {
        (verdict::DENY, pick(flags::DENY))
    } else if all & flags::AUDIT_DENY != 0 && all & (flags::ALLOW | flags::AUDIT_ALLOW) != 0 {
        (verdict::WOULD_DENY, pick(flags::AUDIT_DENY))
    } else if all & flags::ALLOW != 0 {
        (verdict::ALLOW, pick(flags::ALLOW))
    } else if audit_only && all & flags::AUDIT_ALLOW != 0 {
        (verdict::ALLOW, pick(flags::AUDIT_ALLOW))
    } else if audit_only {
        (verdict::WOULD_DENY, pick(flags::AUDIT_DENY))
    } else {
        (verdict::DENY, 0)
    };
    Some(Decision {
        verdict: v,
        rule_id,
        policy_rule_id: enforcement.policy_rule_id,
    })
}
