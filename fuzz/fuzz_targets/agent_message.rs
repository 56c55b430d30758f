//! An agent's stream message (protobuf), through the limits, the store and the displays.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| airlock_control_plane::fuzzing::agent_message(data));
