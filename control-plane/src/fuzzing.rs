//! Entry points for the cargo-fuzz targets in `fuzz/` (feature `fuzzing`): each takes raw
//! bytes, as an attacker or a careless operator would hand them over, through the same code
//! the server runs. Any panic is a bug.

use std::sync::OnceLock;

use airlock_proto::v1::{agent_message::Msg, AgentMessage, Hello};
use prost::Message;

/// The server's and the policy's TOML files.
pub fn config_toml(text: &str) {
    let _ = crate::config::ServerConfig::parse(text, "fuzz.toml");
    if let Ok(p) = crate::policy::Policy::parse(text, "fuzz.toml") {
        let labels = [("env".to_owned(), "prod".to_owned())].into();
        let _ = p.rules_for(&labels);
        let _ = p.route("x", &labels, "ci", "");
    }
}

/// A store on SQLite in a directory of its own, and the runtime it runs on, made once.
fn store() -> &'static (tokio::runtime::Runtime, crate::store::Store) {
    static STORE: OnceLock<(tokio::runtime::Runtime, crate::store::Store)> = OnceLock::new();
    STORE.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime");
        let dir = std::env::temp_dir().join(format!("airlock-fuzz-{}", std::process::id()));
        let db = crate::store::Database::Sqlite(dir.join("airlock.db"));
        let store = runtime
            .block_on(crate::store::Store::open(&db))
            .expect("a store");
        (runtime, store)
    })
}

/// An agent's stream message, decoded, checked against the limits and (a request) stored,
/// then shown as every front end shows it.
pub fn agent_message(bytes: &[u8]) {
    let Ok(m) = AgentMessage::decode(bytes) else {
        return;
    };
    let limits = crate::config::Limits::default();
    let (runtime, store) = store();
    match m.msg {
        Some(Msg::Request(r)) => {
            if limits.check_request(&r).is_err() {
                return;
            }
            let host = Hello {
                host_id: "fuzz-host".into(),
                hostname: "fuzz".into(),
                ..Default::default()
            };
            let route = crate::types::Route::default();
            let _ = crate::display::action_line(r.action.as_ref());
            if let Ok((held, _)) = runtime.block_on(store.receive(&host, &route, r, &limits)) {
                let _ = crate::display::escape_control(&crate::web::page::what(&held));
                let _ = crate::display::teams_text(&crate::web::page::what(&held));
            }
        }
        Some(Msg::Outcome(o)) => {
            let _ = runtime.block_on(store.record_outcome(
                "fuzz-host",
                o,
                limits.max_outcomes_per_request,
            ));
        }
        _ => {}
    }
}

/// A Slack interaction body.
pub fn slack_interaction(body: &[u8]) {
    crate::notify::slack::fuzz_interaction(body);
}

/// A JWKS document and an ID token: the input is the JWKS, a NUL byte, then the token.
pub fn oidc(bytes: &[u8]) {
    let mut parts = bytes.splitn(2, |b| *b == 0);
    let (Some(jwks), Some(token)) = (parts.next(), parts.next()) else {
        return;
    };
    let Ok(token) = std::str::from_utf8(token) else {
        return;
    };
    crate::auth::oidc::fuzz_jwks_and_token(jwks, token);
}

/// A web form or query string.
pub fn web_form(body: &[u8]) {
    crate::web::fuzz_forms(body);
}
