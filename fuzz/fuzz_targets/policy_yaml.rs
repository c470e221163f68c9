//! Fuzz target `policy_yaml`: see `palisade::fuzzing::policy_yaml`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| palisade::fuzzing::policy_yaml(data));
