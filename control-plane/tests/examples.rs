//! The example policy in deploy/ is valid, and the agent rules it gives a prod host are valid
//! agent rules.

use std::path::Path;

use airlock_control_plane::policy::Policy;

#[test]
fn example_policy_loads_and_its_agent_rules_parse() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/policy.toml");
    let policy = Policy::load(&path).unwrap();
    let prod = [("env".to_owned(), "prod".to_owned())].into();
    let route = policy.route("terraform-apply", &prod, "ci", "");
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

/// The example server configuration loads, says what its comments say, names every secret by a
/// file under /etc/airlock/, and with those files present builds every notification channel.
#[test]
fn example_server_config_loads_with_the_documented_values() {
    use airlock_control_plane::{config::ServerConfig, notify, web::Settings};

    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/server.toml");
    let cfg = ServerConfig::load(&path).unwrap();

    assert_eq!(
        cfg.web.public_url.as_deref(),
        Some("https://airlock.example.com")
    );
    assert_eq!(cfg.web.session_hours, 12);
    assert!(cfg.web.local_accounts);
    let public_url = url::Url::parse(cfg.web.public_url.as_deref().unwrap()).unwrap();
    let settings = Settings::new(public_url.clone(), &cfg.web);
    assert!(
        settings.secure_cookies,
        "an https public_url must give Secure cookies"
    );
    assert_eq!(
        settings.link("/auth/oidc/callback"),
        "https://airlock.example.com/auth/oidc/callback",
        "the redirect URI the comments tell operators to register"
    );

    let oidc = cfg.oidc.as_ref().expect("[oidc]");
    assert_eq!(oidc.issuer, "https://example.okta.com/oauth2/default");
    assert_eq!(oidc.client_id, "0oa1b2c3d4");
    assert_eq!(oidc.scopes, ["openid", "email", "profile"]);
    assert_eq!(oidc.identity_claim, "email");
    assert_eq!(oidc.groups_claim, "groups");
    assert_eq!(oidc.label, "Sign in with Okta");
    assert_eq!(
        oidc.group_map
            .get("00000000-aaaa-bbbb-cccc-000000000001")
            .map(String::as_str),
        Some("oncall")
    );
    assert_eq!(
        oidc.group_map.get("Airlock DBAs").map(String::as_str),
        Some("dba")
    );

    let slack = cfg.slack.as_ref().expect("[slack]");
    assert_eq!(slack.channel, "C0123456789");
    assert_eq!(slack.api_url, "https://slack.com/api");
    assert_eq!(
        slack.users.get("U0123ABCD").map(String::as_str),
        Some("alice@example.com")
    );
    assert_eq!(slack.users.len(), 2);

    assert_eq!(cfg.webhooks.len(), 1);
    let siem = &cfg.webhooks[0];
    assert_eq!(siem.name, "siem");
    assert_eq!(siem.url, "https://siem.example.com/airlock");
    assert_eq!(
        siem.events,
        ["request.received", "request.decided", "audit.checkpoint"]
    );
    assert_eq!(
        (siem.max_attempts, siem.backoff_ms, siem.timeout_secs),
        (5, 1000, 10)
    );

    // Every secret is a file under /etc/airlock/, never a value in the file itself.
    let teams = cfg.teams.as_ref().expect("[teams]");
    let secret_files = [
        (
            "oidc.client_secret_file",
            oidc.client_secret_file.clone().unwrap_or_default(),
        ),
        ("slack.bot_token_file", slack.bot_token_file.clone()),
        (
            "slack.signing_secret_file",
            slack.signing_secret_file.clone(),
        ),
        ("teams.webhook_url_file", teams.webhook_url_file.clone()),
        ("webhook.secret_file", siem.secret_file.clone()),
    ];
    for (key, file) in &secret_files {
        assert!(file.starts_with("/etc/airlock/"), "{key} = {file:?}");
    }
    let text = std::fs::read_to_string(&path).unwrap();

    // With the secret files in place (here under a temporary directory), the server builds
    // every channel from it, as it would at start.
    let dir = tempfile::tempdir().unwrap();
    let secrets = [
        ("oidc-client-secret", "client-secret"),
        ("slack-bot-token", "xoxb-test"),
        ("slack-signing-secret", "signing-secret"),
        (
            "teams-webhook-url",
            "https://example.webhook.office.com/webhookb2/key",
        ),
        ("siem-hmac-key", "hmac-key"),
    ];
    for (name, value) in secrets {
        std::fs::write(dir.path().join(name), format!("{value}\n")).unwrap();
    }
    let moved = text.replace("/etc/airlock/", &format!("{}/", dir.path().display()));
    let cfg = ServerConfig::parse(&moved, "server.toml").unwrap();
    let channels = notify::channels_from_config(&cfg, &public_url).unwrap();
    assert!(channels.slack.is_some() && channels.teams.is_some());
    assert_eq!(channels.webhooks.len(), 1);
    assert_eq!(channels.webhooks[0].secret.expose(), "hmac-key");
    assert_eq!(
        channels.webhooks[0].events,
        ["request.received", "request.decided", "audit.checkpoint"]
    );
    let secret = airlock_control_plane::config::read_secret(
        cfg.oidc
            .as_ref()
            .unwrap()
            .client_secret_file
            .as_deref()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(secret.expose(), "client-secret");
}

/// As shipped, a Slack press must be able to count: every identity `[slack.users]` maps to is a
/// member of one of the policy's groups (a press by anyone else is refused).
#[test]
fn example_slack_users_are_policy_members() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let policy = Policy::load(&dir.join("policy.toml")).unwrap();
    let cfg = airlock_control_plane::config::ServerConfig::load(&dir.join("server.toml")).unwrap();
    let slack = cfg.slack.expect("[slack]");
    for who in slack.users.values() {
        assert!(
            policy.groups.values().any(|members| members.contains(who)),
            "{who} (a Slack user) is in no policy group"
        );
    }
    assert!(policy.unix_accounts.contains_key("alice@example.com"));
}
