//! A user-space model of the kernel's lookup (`ebpf/src/verdict.rs`) over the
//! compiled tables: the same entries, the same precedence. Used by tests and
//! by offline questions ("would A reach B, and why?").
use palisade_common::{IpcacheValue, identity};

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

/// `None`: the local identity is not selected in `direction`. `peer` is
/// the peer address's ipcache entry: its identity, and its block identity
/// for rules that name blocks.
pub fn decide(
    c: &CompiledPolicy,
    direction: u8,
    protocol: u8,
    local: u32,
    peer: IpcacheValue,
    port: u16,
) -> Option<Decision> {
    let enforcement = c.enforced.get(&(direction, local))?;
    let block = peer.cidr_identity;
    let by_block = if block == identity::ANY || block == peer.identity {
        (0, 0)
    } else {
        longest(c, direction, protocol, local, block, port)
    };
    let (verdict, rule_id) = palisade_common::resolve(
        longest(c, direction, protocol, local, peer.identity, port),
        by_block,
        longest(c, direction, protocol, local, identity::ANY, port),
        enforcement.flags,
    );
    Some(Decision {
        verdict,
        rule_id,
        policy_rule_id: enforcement.policy_rule_id,
    })
}
