//! A Slack interaction request body.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| airlock_control_plane::fuzzing::slack_interaction(data));
