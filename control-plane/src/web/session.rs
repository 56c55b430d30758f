//! The session cookie (a random id; Secure, HTTP-only, SameSite=Lax) and the extractor that
//! turns it into the logged-in person. Sessions themselves are in [`crate::auth::sessions`].

use axum::{
    extract::FromRequestParts,
    http::request::Parts,
    response::{IntoResponse, Redirect, Response},
};
use axum_extra::extract::cookie::{Cookie, CookieJar, SameSite};

use super::Web;
pub use crate::auth::sessions::{create, end, lookup, Session};

/// Name of the session cookie.
pub const COOKIE: &str = "airlock_session";

/// The session cookie for `id`.
pub fn cookie(id: String, secure: bool, max_age_secs: i64) -> Cookie<'static> {
    Cookie::build((COOKIE, id))
        .path("/")
        .http_only(true)
        .secure(secure)
        .same_site(SameSite::Lax)
        .max_age(time::Duration::seconds(max_age_secs))
        .build()
}

/// Extracts the logged-in person; without a session, pages redirect to the login page and
/// everything else gets 401.
impl FromRequestParts<Web> for Session {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, web: &Web) -> Result<Self, Self::Rejection> {
        let jar = CookieJar::from_headers(&parts.headers);
        let found = match jar.get(COOKIE) {
            Some(c) => lookup(&web.plane.store, c.value()).await.map_err(|e| {
                tracing::error!(error = %e, "session lookup failed");
                (
                    axum::http::StatusCode::SERVICE_UNAVAILABLE,
                    "could not read the session database; try again",
                )
                    .into_response()
            })?,
            None => None,
        };
        match found {
            Some(s) => Ok(s),
            None if parts.method == axum::http::Method::GET => {
                let next = parts
                    .uri
                    .path_and_query()
                    .map_or("/", |p| p.as_str())
                    .to_owned();
                let to = format!(
                    "/login?{}",
                    serde_urlencoded::to_string([("next", next)]).unwrap_or_default()
                );
                Err(Redirect::to(&to).into_response())
            }
            None => Err((
                axum::http::StatusCode::UNAUTHORIZED,
                "log in first: no valid session",
            )
                .into_response()),
        }
    }
}
