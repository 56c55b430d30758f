//! Logging in and out: local accounts (a form, checked against Argon2id hashes) and OIDC
//! (redirect to the issuer, then its callback).

use axum::{
    extract::{Query, State},
    http::StatusCode,
    response::{IntoResponse, Redirect, Response},
    Form,
};
use axum_extra::extract::cookie::{Cookie, CookieJar, SameSite};
use maud::html;
use serde::Deserialize;

use super::{page, session, session::Session, Web, WebError};
use crate::auth::{self, accounts};

/// Cookie that ties a login form, or an OIDC round trip, to the browser that started it.
const LOGIN_COOKIE: &str = "airlock_login";
/// How long an OIDC round trip may take.
const OIDC_PENDING_MS: i64 = 10 * 60_000;
/// Most OIDC round trips in flight at once (each is a small entry in memory).
const OIDC_PENDING_MAX: usize = 10_000;
/// Password checks running at once: Argon2id takes about 19 MiB and tens of ms each, so an
/// unbounded number would let anyone exhaust memory.
static VERIFYING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(4);
/// Failed logins for one name within [`FAIL_WINDOW_MS`] before it is locked for the rest of
/// the window.
const MAX_FAILURES: u32 = 5;
const FAIL_WINDOW_MS: i64 = 5 * 60_000;

/// Failed logins by name, to slow down password guessing.
#[derive(Default)]
pub struct Throttle {
    failures: std::sync::Mutex<std::collections::HashMap<String, (u32, i64)>>,
}

impl Throttle {
    fn map(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, (u32, i64)>> {
        self.failures.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `name` has failed too often within the window.
    pub fn locked(&self, name: &str) -> bool {
        let now = crate::types::now_ms();
        self.map()
            .get(name)
            .is_some_and(|(n, since)| *n >= MAX_FAILURES && now - since < FAIL_WINDOW_MS)
    }

    /// Counts a failure for `name`.
    pub fn failed(&self, name: &str) {
        let now = crate::types::now_ms();
        let mut map = self.map();
        // Names are checked (at most 64 characters) before they get here; old entries go.
        map.retain(|_, (_, since)| now - *since < FAIL_WINDOW_MS);
        let e = map.entry(name.to_owned()).or_insert((0, now));
        e.0 += 1;
    }

    /// Forgets `name`'s failures (after a good login).
    pub fn clear(&self, name: &str) {
        self.map().remove(name);
    }
}

#[derive(Deserialize)]
pub(super) struct Next {
    next: Option<String>,
}

/// Only same-site paths: never redirect a login to another host.
fn safe_next(next: Option<&str>) -> String {
    match next {
        // Browsers drop tabs and newlines inside URLs, so "/\t/evil" would become "//evil".
        Some(n)
            if n.starts_with('/')
                && !n.starts_with("//")
                && !n
                    .bytes()
                    .any(|b| b == b'\\' || b.is_ascii_control() || b == b' ') =>
        {
            n.into()
        }
        _ => "/".into(),
    }
}

fn login_cookie(value: String, secure: bool) -> Cookie<'static> {
    Cookie::build((LOGIN_COOKIE, value))
        .path("/")
        .http_only(true)
        .secure(secure)
        .same_site(SameSite::Lax)
        .max_age(time::Duration::minutes(10))
        .build()
}

fn render_login(web: &Web, token: &str, next: &str, error: Option<&str>) -> maud::Markup {
    page::bare(
        "Log in",
        html! {
            main.narrow #main {
                h1 { "Airlock" }
                p { "Log in to review held actions." }
                @if let Some(e) = error { p.error role="alert" { (e) } }
                @if web.settings.local_accounts {
                    form.stack method="post" action="/login" {
                        input type="hidden" name="login_csrf" value=(token);
                        input type="hidden" name="next" value=(next);
                        label for="name" { "Name" }
                        input #name name="name" autocomplete="username" required autofocus;
                        label for="password" { "Password" }
                        input #password name="password" type="password" autocomplete="current-password" required;
                        button.primary type="submit" { "Log in" }
                    }
                }
                @if let Some(o) = &web.oidc {
                    p { a.button href="/auth/oidc/start" { (o.label()) } }
                }
            }
        },
    )
}

/// GET /login.
pub(super) async fn login_page(
    State(web): State<Web>,
    jar: CookieJar,
    Query(q): Query<Next>,
) -> Result<Response, WebError> {
    let token = auth::random_hex(16)
        .map_err(|e| WebError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let next = safe_next(q.next.as_deref());
    let jar = jar.add(login_cookie(token.clone(), web.settings.secure_cookies));
    Ok((jar, render_login(&web, &token, &next, None)).into_response())
}

#[derive(Deserialize)]
pub(super) struct LoginForm {
    name: String,
    password: String,
    login_csrf: String,
    next: Option<String>,
}

/// POST /login: a local account.
pub(super) async fn login(
    State(web): State<Web>,
    jar: CookieJar,
    Form(f): Form<LoginForm>,
) -> Result<Response, WebError> {
    let next = safe_next(f.next.as_deref());
    let cookie_token = jar.get(LOGIN_COOKIE).map(|c| c.value().to_owned());
    let fresh = auth::random_hex(16)
        .map_err(|e| WebError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let again = |status: StatusCode, msg: &str| {
        let jar = jar
            .clone()
            .add(login_cookie(fresh.clone(), web.settings.secure_cookies));
        (status, jar, render_login(&web, &fresh, &next, Some(msg))).into_response()
    };
    if !web.settings.local_accounts {
        return Ok(again(
            StatusCode::FORBIDDEN,
            "Local accounts are turned off here; use single sign-on.",
        ));
    }
    if !cookie_token.is_some_and(|t| auth::constant_time_eq(t.as_bytes(), f.login_csrf.as_bytes()))
    {
        return Ok(again(
            StatusCode::FORBIDDEN,
            "The login form expired or did not come from this site; try again.",
        ));
    }
    let name = f.name.trim().to_owned();
    // Names that cannot exist are refused before any work, and never reach the audit trail.
    if accounts::check_name(&name).is_err() {
        return Ok(again(StatusCode::UNAUTHORIZED, "Wrong name or password."));
    }
    if web.login_failures.locked(&name) {
        tracing::warn!(name = %name, "login refused: too many failures");
        return Ok(again(
            StatusCode::TOO_MANY_REQUESTS,
            "Too many failed logins for this name; wait a few minutes.",
        ));
    }
    let _permit = VERIFYING.acquire().await.map_err(|_| {
        WebError(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is stopping".into(),
        )
    })?;
    let checked = accounts::verify(&web.plane.store, &name, &f.password).await;
    let account = match checked {
        Ok(Some(a)) => a,
        Ok(None) => {
            web.login_failures.failed(&name);
            tracing::warn!(name = %name, "login refused: wrong name or password");
            let payload = serde_json::json!({ "via": "local" }).to_string();
            if let Err(e) = web
                .plane
                .store
                .audit_event(&name, "login.failed", &payload)
                .await
            {
                tracing::error!(error = %e, "auditing a failed login failed");
            }
            return Ok(again(StatusCode::UNAUTHORIZED, "Wrong name or password."));
        }
        Err(e) => {
            tracing::error!(error = %e, "checking a password failed");
            return Err(WebError(
                StatusCode::INTERNAL_SERVER_ERROR,
                "could not check the password".into(),
            ));
        }
    };
    web.login_failures.clear(&name);
    tracing::info!(name = %account.name, "logged in");
    signed_in(&web, jar, &account.name, &account.groups, "local", &next).await
}

/// Starts a session for `name`, swaps the login cookie for the session cookie and sends the
/// browser on to `next`.
async fn signed_in(
    web: &Web,
    jar: CookieJar,
    name: &str,
    groups: &[String],
    via: &str,
    next: &str,
) -> Result<Response, WebError> {
    let ttl = web.settings.session_ttl_ms;
    let (id, _) = session::create(&web.plane.store, name, groups, via, ttl).await?;
    let jar = jar
        .remove(Cookie::build(LOGIN_COOKIE).path("/").build())
        .add(session::cookie(id, web.settings.secure_cookies, ttl / 1000));
    Ok((jar, Redirect::to(next)).into_response())
}

#[derive(Deserialize)]
pub(super) struct CsrfForm {
    csrf: String,
}

/// POST /logout.
pub(super) async fn logout(
    State(web): State<Web>,
    s: Session,
    jar: CookieJar,
    Form(f): Form<CsrfForm>,
) -> Result<Response, WebError> {
    if !s.csrf_ok(&f.csrf) {
        return Err(WebError(
            StatusCode::FORBIDDEN,
            "missing or wrong CSRF token".into(),
        ));
    }
    if let Some(c) = jar.get(session::COOKIE) {
        session::end(&web.plane.store, c.value(), &s.name).await?;
    }
    let jar = jar.remove(Cookie::build(session::COOKIE).path("/").build());
    Ok((jar, Redirect::to("/login")).into_response())
}

/// GET /auth/oidc/start: off to the issuer.
pub(super) async fn oidc_start(
    State(web): State<Web>,
    jar: CookieJar,
) -> Result<Response, WebError> {
    let oidc = web.oidc.clone().ok_or_else(|| {
        WebError(
            StatusCode::NOT_FOUND,
            "single sign-on is not configured".into(),
        )
    })?;
    let issuer = oidc.get().await.map_err(|e| {
        tracing::error!(error = %e, "OIDC issuer not usable");
        WebError(
            StatusCode::BAD_GATEWAY,
            format!("single sign-on is unavailable: {e}"),
        )
    })?;
    let (url, pending) = issuer
        .begin()
        .map_err(|e| WebError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let key = auth::random_hex(16)
        .map_err(|e| WebError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    {
        let mut map = web.pending_oidc.lock().unwrap_or_else(|p| p.into_inner());
        let now = crate::types::now_ms();
        map.retain(|_, p| now - p.created_ms < OIDC_PENDING_MS);
        if map.len() >= OIDC_PENDING_MAX {
            return Err(WebError(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many logins in progress; try again in a minute".into(),
            ));
        }
        map.insert(key.clone(), pending);
    }
    let jar = jar.add(login_cookie(key, web.settings.secure_cookies));
    Ok((jar, Redirect::to(url.as_str())).into_response())
}

#[derive(Deserialize)]
pub(super) struct Callback {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

/// GET /auth/oidc/callback: the issuer sends the browser back with a code.
pub(super) async fn oidc_callback(
    State(web): State<Web>,
    jar: CookieJar,
    Query(cb): Query<Callback>,
) -> Result<Response, WebError> {
    let refuse = |msg: String| {
        tracing::warn!(reason = %msg, "OIDC login refused");
        WebError(
            StatusCode::FORBIDDEN,
            format!("Single sign-on failed: {msg}"),
        )
    };
    let oidc = web.oidc.clone().ok_or_else(|| {
        WebError(
            StatusCode::NOT_FOUND,
            "single sign-on is not configured".into(),
        )
    })?;
    if let Some(e) = cb.error {
        // Shown as the issuer's words, cut short: anyone can put text in this URL.
        let said: String = format!("{e}: {}", cb.error_description.unwrap_or_default())
            .chars()
            .filter(|c| !c.is_control())
            .take(200)
            .collect();
        return Err(refuse(format!("the issuer answered \"{said}\"")));
    }
    let pending = jar
        .get(LOGIN_COOKIE)
        .and_then(|c| {
            web.pending_oidc
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(c.value())
        })
        .filter(|p| crate::types::now_ms() - p.created_ms < OIDC_PENDING_MS)
        .ok_or_else(|| refuse("this login was not started here, or took too long".into()))?;
    let (code, state) = match (cb.code, cb.state) {
        (Some(c), Some(s)) => (c, s),
        _ => return Err(refuse("the callback has no code or state".into())),
    };
    let issuer = oidc.get().await.map_err(|e| {
        WebError(
            StatusCode::BAD_GATEWAY,
            format!("single sign-on is unavailable: {e}"),
        )
    })?;
    let who = issuer
        .finish(&pending, &code, &state)
        .await
        .map_err(|e| refuse(e.to_string()))?;
    if !oidc.admits(&who.groups) {
        return Err(refuse(format!(
            "{} is in none of the groups allowed to log in here",
            who.name
        )));
    }
    tracing::info!(name = %who.name, groups = ?who.groups, "logged in through OIDC");
    signed_in(&web, jar, &who.name, &who.groups, "oidc", "/").await
}

#[cfg(test)]
mod tests {
    use super::{safe_next, Throttle, MAX_FAILURES};

    #[test]
    fn a_name_locks_after_repeated_failures_and_a_good_login_clears_it() {
        let t = Throttle::default();
        for _ in 0..MAX_FAILURES {
            assert!(!t.locked("alice"));
            t.failed("alice");
        }
        assert!(t.locked("alice"));
        assert!(!t.locked("bob"));
        t.clear("alice");
        assert!(!t.locked("alice"));
    }

    #[test]
    fn next_stays_on_this_site() {
        assert_eq!(safe_next(Some("/requests/r1")), "/requests/r1");
        assert_eq!(safe_next(Some("//evil.example")), "/");
        assert_eq!(safe_next(Some("https://evil.example")), "/");
        assert_eq!(safe_next(Some("/\\evil.example")), "/");
        assert_eq!(safe_next(Some("/\t/evil.example")), "/");
        assert_eq!(safe_next(Some("/\n/evil.example")), "/");
        assert_eq!(safe_next(None), "/");
    }
}
