//! Protobuf `UsageEvent` bytes through the validation (and normalization) the gRPC path runs.
#![no_main]

libfuzzer_sys::fuzz_target!(|input: &[u8]| {
    tokenmeter::ingest::codec::fuzzing::validate_protobuf(input);
});
