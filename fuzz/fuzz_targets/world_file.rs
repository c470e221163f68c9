//! Fuzz target `world_file`: see `palisade::fuzzing::world_file`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| palisade::fuzzing::world_file(data));
