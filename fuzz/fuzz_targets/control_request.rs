//! Fuzz target `control_request`: see `palisade::fuzzing::control_request`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| palisade::fuzzing::control_request(data));
