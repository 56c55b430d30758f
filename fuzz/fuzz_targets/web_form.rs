//! A web form body or query string.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| airlock_control_plane::fuzzing::web_form(data));
