//! Each provider usage object as arbitrary JSON through the decoder and the normalizer.
#![no_main]

libfuzzer_sys::fuzz_target!(|input: &[u8]| {
    tokenmeter::ingest::codec::fuzzing::normalize_json(input);
});
