//! The web UI served by `airlock-server` on its HTTP address: login (local accounts, OIDC), the
//! live queue, request pages with the decision buttons, history, audit, agents and policy.
//! Everything it needs (CSS, JS) is compiled into the binary; no CDN.
//!
//! - [`session`]: cookies, sessions and CSRF tokens;
//! - [`login`]: the login and logout pages, and the OIDC redirect and callback;
//! - [`throttle`]: failed logins slowed per client address and per name;
//! - [`requests`]: queue, request page, decisions, and the live event stream;
//! - [`history`]: history and audit search, with JSON Lines and CSV export;
//! - [`admin`]: agents, policy and notification deliveries;
//! - [`page`]: the layout and formatting shared by every page;
//! - [`health`]: `/healthz`, `/readyz` and Prometheus `/metrics`.

pub mod admin;
pub mod health;
pub mod history;
pub mod insights;
pub mod login;
pub mod page;
pub mod requests;
pub mod session;
pub mod throttle;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use axum::{
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    Router,
};

use crate::{
    auth::oidc::{Oidc, OidcError},
    config::{OidcFile, Secret},
    decide::Decisions,
    ControlPlane,
};

/// The OIDC issuer, discovered at the first login that needs it (and again after a failure),
/// so an issuer outage never stops the control plane from starting.
pub struct OidcLogin {
    cfg: OidcFile,
    secret: Option<Secret>,
    redirect: url::Url,
    ready: tokio::sync::OnceCell<Arc<Oidc>>,
}

impl OidcLogin {
    /// Login through the issuer in `cfg`, coming back to `{public_url}/auth/oidc/callback`.
    pub fn new(
        cfg: OidcFile,
        secret: Option<Secret>,
        settings: &Settings,
    ) -> Result<Self, url::ParseError> {
        Ok(Self {
            redirect: url::Url::parse(&settings.link("/auth/oidc/callback"))?,
            cfg,
            secret,
            ready: tokio::sync::OnceCell::new(),
        })
    }

    /// The login button's text.
    pub fn label(&self) -> &str {
        &self.cfg.label
    }

    /// Whether someone with `groups` may log in (`allowed_groups`; an empty list, which the
    /// configuration refuses anyway, admits nobody).
    pub fn admits(&self, groups: &[String]) -> bool {
        self.cfg.allowed_groups.iter().any(|g| groups.contains(g))
    }

    /// The discovered issuer.
    pub async fn get(&self) -> Result<Arc<Oidc>, OidcError> {
        self.ready
            .get_or_try_init(|| async {
                Oidc::discover(&self.cfg, self.secret.clone(), self.redirect.clone())
                    .await
                    .map(Arc::new)
            })
            .await
            .cloned()
    }
}

/// How the web UI is reached and who may log in.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Base URL people use (links, OIDC redirect URI).
    pub public_url: url::Url,
    /// Mark cookies Secure (on unless the public URL is plain http).
    pub secure_cookies: bool,
    /// Session lifetime, ms.
    pub session_ttl_ms: i64,
    /// Whether local accounts may log in.
    pub local_accounts: bool,
    /// Members of this group see the admin pages (notification deliveries).
    pub admin_group: String,
}

impl Settings {
    /// Settings for a UI reached at `public_url`.
    pub fn new(public_url: url::Url, cfg: &crate::config::WebConfig) -> Self {
        Self {
            secure_cookies: public_url.scheme() != "http",
            public_url,
            session_ttl_ms: i64::from(cfg.session_hours.max(1)) * 3_600_000,
            local_accounts: cfg.local_accounts,
            admin_group: "admins".into(),
        }
    }

    /// The absolute URL of `path`.
    pub fn link(&self, path: &str) -> String {
        format!("{}{}", self.public_url.as_str().trim_end_matches('/'), path)
    }
}

/// State shared by the web handlers.
#[derive(Clone)]
pub struct Web {
    /// Store, agents, policy, metrics.
    pub plane: ControlPlane,
    /// The vote path.
    pub decisions: Decisions,
    /// Settings.
    pub settings: Arc<Settings>,
    /// Login through an OIDC issuer, when configured.
    pub oidc: Option<Arc<OidcLogin>>,
    /// Logins on their way through the issuer, by the login cookie's value.
    pending_oidc: Arc<Mutex<HashMap<String, (throttle::Client, crate::auth::oidc::Pending)>>>,
    /// Failed local logins by client address and by name.
    login_failures: Arc<throttle::Throttle>,
}

impl Web {
    /// The web UI of `plane`.
    pub fn new(plane: ControlPlane, settings: Settings, oidc: Option<Arc<OidcLogin>>) -> Self {
        Self {
            decisions: plane.decisions(),
            plane,
            settings: Arc::new(settings),
            oidc,
            pending_oidc: Arc::default(),
            login_failures: Arc::default(),
        }
    }

    /// The routes.
    pub fn router(self) -> Router {
        Router::new()
            .route("/", get(requests::queue))
            .route("/fragments/queue", get(requests::queue_fragment))
            .route("/events", get(requests::events))
            .route("/requests/{id}", get(requests::request_page))
            .route("/requests/{id}/decide", post(requests::decide))
            .route("/history", get(history::history))
            .route("/history/export", get(history::history_export))
            .route("/insights", get(insights::insights))
            .route("/audit", get(history::audit))
            .route("/audit/export", get(history::audit_export))
            .route("/agents", get(admin::agents))
            .route("/policy", get(admin::policy))
            .route("/admin/deliveries", get(admin::deliveries))
            .route("/login", get(login::login_page).post(login::login))
            .route("/logout", post(login::logout))
            .route("/auth/oidc/start", get(login::oidc_start))
            .route("/auth/oidc/callback", get(login::oidc_callback))
            .route("/static/app.css", get(css))
            .route("/static/app.js", get(js))
            .layer(axum::middleware::map_response_with_state(
                self.settings.secure_cookies,
                security_headers,
            ))
            // Forms are small; nothing here needs more.
            .layer(axum::extract::DefaultBodyLimit::max(64 * 1024))
            .with_state(self)
    }
}

/// An error page with a status.
pub struct WebError(pub StatusCode, pub String);

impl IntoResponse for WebError {
    fn into_response(self) -> Response {
        let body = page::bare(
            "Error",
            maud::html! {
                main.narrow {
                    h1 { (self.0.canonical_reason().unwrap_or("Error")) }
                    p.error role="alert" { (self.1) }
                    p { a href="/" { "Back to the queue" } }
                }
            },
        );
        (self.0, body).into_response()
    }
}

impl From<crate::store::StoreError> for WebError {
    fn from(e: crate::store::StoreError) -> Self {
        use crate::store::StoreError;
        match e {
            StoreError::NotFound(_) => WebError(StatusCode::NOT_FOUND, e.to_string()),
            StoreError::BadPageToken(_) => WebError(StatusCode::BAD_REQUEST, e.to_string()),
            e if e.is_transient() => {
                tracing::warn!(error = %e, "database unavailable");
                WebError(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the control plane's database is unavailable; try again in a moment".into(),
                )
            }
            _ => {
                tracing::error!(error = %e, "store failure");
                WebError(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the control plane could not read or write its database".into(),
                )
            }
        }
    }
}

/// No inline script, no framing, no other origins: the UI needs none of them.
async fn security_headers(
    axum::extract::State(https): axum::extract::State<bool>,
    mut r: Response,
) -> Response {
    let h = r.headers_mut();
    if https {
        h.insert(
            header::STRICT_TRANSPORT_SECURITY,
            header::HeaderValue::from_static("max-age=31536000"),
        );
    }
    // Pages carry request details and the CSRF token: keep them out of caches; the static
    // assets set their own.
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(
            header::CACHE_CONTROL,
            header::HeaderValue::from_static("no-store"),
        );
    }
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        header::HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        ),
    );
    h.insert(
        header::X_FRAME_OPTIONS,
        header::HeaderValue::from_static("DENY"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        header::HeaderValue::from_static("same-origin"),
    );
    r
}

async fn css() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        include_str!("assets/app.css"),
    )
}

async fn js() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        include_str!("assets/app.js"),
    )
}

/// Fuzzing entry: form and query bodies through the decoding and checks every web handler
/// applies before it touches the store (login, logout, decide, OIDC callback, the history and
/// audit filters, and where a login may send the browser next).
#[cfg(feature = "fuzzing")]
pub fn fuzz_forms(body: &[u8]) {
    use serde_urlencoded::from_bytes;
    let _ = from_bytes::<login::LoginForm>(body);
    let _ = from_bytes::<login::CsrfForm>(body);
    let _ = from_bytes::<login::Callback>(body);
    let _ = from_bytes::<requests::DecideForm>(body);
    if let Ok(n) = from_bytes::<login::Next>(body) {
        login::fuzz_next(n);
    }
    if let Ok(f) = from_bytes::<history::HistoryFilter>(body) {
        let _ = history::fuzz_history_filter(&f);
    }
    if let Ok(f) = from_bytes::<history::AuditFilter>(body) {
        let _ = history::fuzz_audit_filter(&f);
    }
    let _ = from_bytes::<history::Format>(body).map(|f| history::fuzz_format(&f));
}
