//! The server's config, the approval policy, and the agent's config and server-sent rules.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    airlock_control_plane::fuzzing::config_toml(text);
    let _ = agent_rules::config::Config::parse(text, std::path::Path::new("agent.toml"));
    let _ = agent_rules::server_rules::parse(text);
});
