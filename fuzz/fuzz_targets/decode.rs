//! `decode_usage` over arbitrary payloads and headers in every codec path, then validation.
#![no_main]

libfuzzer_sys::fuzz_target!(|input: &[u8]| {
    tokenmeter::ingest::codec::fuzzing::decode(input);
});
