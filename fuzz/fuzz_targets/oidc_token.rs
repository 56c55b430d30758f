//! A JWKS document, a NUL byte, then an ID token.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| airlock_control_plane::fuzzing::oidc(data));
