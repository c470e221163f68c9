//! Fuzz target `audit_record`: see `palisade::fuzzing::audit_record`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| palisade::fuzzing::audit_record(data));
