//! The example agent configuration in deploy/ is valid: it parses, its rules compile and its
//! watch list resolves.

use std::path::Path;

use airlock_agent::{config::Config, policy::Policy, watch};

#[test]
fn example_agent_config_loads() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/agent.toml");
    let config = Config::load(&path).unwrap();
    assert_eq!(
        config.agent.decider.as_deref(),
        Some("https://airlock.internal:7443")
    );
    let policy = Policy::compile(&config.rules, &path).unwrap();
    assert_eq!(policy.rules.len(), 2);
    let tables = policy.kernel_tables();
    assert_eq!(
        tables.exec_files.len(),
        1,
        "the example's binary exists on this host"
    );
    assert!(!tables.nets.is_empty());
    let watch = watch::resolve(&config.watch, Path::new("/sys/fs/cgroup")).unwrap();
    assert_eq!(watch.uids, [0]);
}
