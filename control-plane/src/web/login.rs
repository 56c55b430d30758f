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

use super::{
    page, session,
    session::Session,
    throttle::{self, Admit, Client},
    Web, WebError,
};
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
/// OIDC round trips one client may have in flight: a login page, a few tabs, a retry.
const OIDC_PENDING_PER_CLIENT: usize = 20;

/// The client a request came from (see [`Client`]), from the socket's peer address.
fn client_of(ext: &axum::http::Extensions) -> Client {
    Client::of(
        ext.get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|c| c.0.ip()),
    )
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

/// Fuzzing: where a login with `n` would send the browser; it must stay on this site.
#[cfg(feature = "fuzzing")]
pub(super) fn fuzz_next(n: Next) {
    let next = safe_next(n.next.as_deref());
    assert!(next.starts_with('/') && !next.starts_with("//"), "{next:?}");
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
    ext: axum::http::Extensions,
    jar: CookieJar,
    Form(f): Form<LoginForm>,
) -> Result<Response, WebError> {
    let client = client_of(&ext);
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
    match web
        .login_failures
        .admit(client, &name, crate::types::now_ms())
    {
        Admit::RetryIn(wait) => {
            let secs = wait.as_secs().max(1);
            let mut r = again(
                StatusCode::TOO_MANY_REQUESTS,
                &format!("Too many failed logins from here; try again in {secs} s."),
            );
            if let Ok(v) = axum::http::HeaderValue::from_str(&secs.to_string()) {
                r.headers_mut().insert(axum::http::header::RETRY_AFTER, v);
            }
            return Ok(r);
        }
        // A name that keeps failing slows each of its logins a little, never locks it.
        Admit::After(wait) if !wait.is_zero() => tokio::time::sleep(wait).await,
        Admit::After(_) => {}
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
            let n = web
                .login_failures
                .failed(client, &name, crate::types::now_ms());
            tracing::warn!(name = %name, client = %client, failures = n, "login refused: wrong name or password");
            // Sampled per client (1st, 2nd, 4th... failure), so guessing cannot flood the trail.
            if throttle::audited(n) {
                let payload = serde_json::json!({
                    "via": "local", "client": client.to_string(), "failures_from_client": n,
                })
                .to_string();
                if let Err(e) = web
                    .plane
                    .store
                    .audit_event(&name, "login.failed", &payload)
                    .await
                {
                    tracing::error!(error = %e, "auditing a failed login failed");
                }
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
    web.login_failures.succeeded(&name);
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
    ext: axum::http::Extensions,
    jar: CookieJar,
) -> Result<Response, WebError> {
    let client = client_of(&ext);
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
        map.retain(|_, (_, p)| now - p.created_ms < OIDC_PENDING_MS);
        // Per client first: one address cannot fill the map and lock everyone out of SSO.
        if map.values().filter(|(c, _)| *c == client).count() >= OIDC_PENDING_PER_CLIENT {
            return Err(WebError(
                StatusCode::TOO_MANY_REQUESTS,
                "too many single sign-on logins started from here; finish one or wait ten minutes"
                    .into(),
            ));
        }
        if map.len() >= OIDC_PENDING_MAX {
            return Err(WebError(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many logins in progress; try again in a minute".into(),
            ));
        }
        map.insert(key.clone(), (client, pending));
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
                .map(|(_, p)| p)
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
    use super::safe_next;

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
