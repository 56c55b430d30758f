//! The example policy in deploy/ is valid, and the agent rules it gives a prod host are valid
//! agent rules.

use std::path::Path;

use airlock_control_plane::policy::Policy;

#[test]
fn example_policy_loads_and_its_agent_rules_parse() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/policy.toml");
    let policy = Policy::load(&path).unwrap();
    let prod = [("env".to_owned(), "prod".to_owned())].into();
    let route = policy.route("terraform-apply", &prod, "ci");
    assert_eq!((route.quorum, route.require_reason), (2, true));
    let (text, _) = policy.rules_for(&prod);
    let rules = airlock_agent::server_rules::parse(&text).unwrap();
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[0].name, "terraform-apply");
    let (staging, _) = policy.rules_for(&[("env".to_owned(), "staging".to_owned())].into());
    assert!(airlock_agent::server_rules::parse(&staging)
        .unwrap()
        .is_empty());
}
