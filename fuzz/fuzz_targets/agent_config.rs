//! Fuzz target `agent_config`: see `palisade::fuzzing::agent_config`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| palisade::fuzzing::agent_config(data));
