//! OIDC login against a real (test) issuer over HTTP: the good path, PKCE, and every way an
//! issuer's answer must be refused.

#[path = "support/issuer.rs"]
mod issuer;

use std::collections::HashMap;

use airlock_control_plane::{
    auth::oidc::{pkce_challenge, Identity, Oidc, OidcError},
    config::Secret,
};
use issuer::{follow_authorize, ClientAuth, Fault, Issuer, TestUser, CLIENT_ID, CLIENT_SECRET};

fn redirect() -> url::Url {
    url::Url::parse("http://127.0.0.1:9/oidc/callback").unwrap()
}

async fn start() -> (Issuer, Oidc) {
    let issuer = Issuer::start(TestUser::new(
        "alice@example.com",
        &["okta-approvers", "eng"],
    ))
    .await;
    let oidc = Oidc::discover(
        &issuer.oidc_file(),
        Some(Secret::new(CLIENT_SECRET)),
        redirect(),
    )
    .await
    .unwrap();
    (issuer, oidc)
}

/// The whole flow, as the web UI drives it.
async fn login(oidc: &Oidc) -> Result<Identity, OidcError> {
    let (url, pending) = oidc.begin().unwrap();
    let (code, state) = follow_authorize(&url).await;
    oidc.finish(&pending, &code, &state).await
}

/// What a login fails with when the issuer gets `fault` wrong.
async fn refused(fault: Fault) -> OidcError {
    let (issuer, oidc) = start().await;
    issuer.set_fault(fault);
    let err = login(&oidc).await.unwrap_err();
    assert_eq!(
        issuer.tokens_issued(),
        1,
        "the code was redeemed before the token was judged"
    );
    err
}

#[tokio::test]
async fn login_gives_the_identity_with_mapped_groups() {
    let (issuer, oidc) = start().await;
    assert_eq!(oidc.label(), "Sign in with Test IdP");
    assert_eq!(oidc.issuer(), issuer.url());
    let id = login(&oidc).await.unwrap();
    assert_eq!(
        id,
        Identity {
            name: "alice@example.com".into(),
            groups: vec!["approvers".into()],
            subject: "00u-alice@example.com".into(),
        }
    );
}

#[tokio::test]
async fn authorize_url_asks_for_code_with_pkce_s256() {
    let (issuer, oidc) = start().await;
    let (url, pending) = oidc.begin().unwrap();
    assert!(url
        .as_str()
        .starts_with(&format!("{}/authorize?", issuer.url())));
    let q: HashMap<_, _> = url.query_pairs().into_owned().collect();
    assert_eq!(q["response_type"], "code");
    assert_eq!(q["client_id"], CLIENT_ID);
    assert_eq!(q["redirect_uri"], redirect().as_str());
    assert_eq!(q["scope"], "openid email profile");
    assert_eq!(q["state"], pending.state);
    assert_eq!(q["nonce"], pending.nonce);
    assert_eq!(q["code_challenge"], pkce_challenge(&pending.verifier));
    assert_eq!(q["code_challenge_method"], "S256");
    assert!(
        !url.as_str().contains(&pending.verifier),
        "only the challenge leaves"
    );
    let (_, second) = oidc.begin().unwrap();
    assert_ne!(pending.state, second.state);
    assert_ne!(pending.nonce, second.nonce);
    assert_ne!(pending.verifier, second.verifier);
}

#[tokio::test]
async fn issuer_checks_the_pkce_verifier() {
    let (_issuer, oidc) = start().await;
    let (url, mut pending) = oidc.begin().unwrap();
    let (code, state) = follow_authorize(&url).await;
    pending.verifier = "x".repeat(64);
    let err = oidc.finish(&pending, &code, &state).await.unwrap_err();
    assert!(
        matches!(&err, OidcError::TokenRefused(m) if m.contains("invalid_grant") && m.contains("PKCE")),
        "{err}"
    );
}

#[tokio::test]
async fn code_cannot_be_used_twice() {
    let (_issuer, oidc) = start().await;
    let (url, pending) = oidc.begin().unwrap();
    let (code, state) = follow_authorize(&url).await;
    oidc.finish(&pending, &code, &state).await.unwrap();
    let err = oidc.finish(&pending, &code, &state).await.unwrap_err();
    assert!(
        matches!(&err, OidcError::TokenRefused(m) if m.contains("invalid_grant")),
        "{err}"
    );
}

#[tokio::test]
async fn state_mismatch_is_refused_before_redeeming() {
    let (issuer, oidc) = start().await;
    let (url, pending) = oidc.begin().unwrap();
    let (code, _) = follow_authorize(&url).await;
    let (_, other) = oidc.begin().unwrap();
    let err = oidc
        .finish(&pending, &code, &other.state)
        .await
        .unwrap_err();
    assert!(matches!(err, OidcError::StateMismatch), "{err}");
    assert_eq!(err.to_string(), "state does not match");
    assert_eq!(issuer.tokens_issued(), 0);
}

#[tokio::test]
async fn stale_login_is_refused() {
    let (_issuer, oidc) = start().await;
    let (url, mut pending) = oidc.begin().unwrap();
    let (code, state) = follow_authorize(&url).await;
    pending.created_ms -= 11 * 60 * 1000;
    let err = oidc.finish(&pending, &code, &state).await.unwrap_err();
    assert!(matches!(err, OidcError::LoginExpired), "{err}");
}

#[tokio::test]
async fn wrong_signature_is_refused() {
    let err = refused(Fault::OtherKey).await;
    assert!(matches!(err, OidcError::BadSignature), "{err}");
    assert_eq!(err.to_string(), "ID token signature is not valid");
}

#[tokio::test]
async fn alg_none_is_refused() {
    let err = refused(Fault::AlgNone).await;
    assert!(
        matches!(&err, OidcError::Algorithm(a) if a == "none"),
        "{err}"
    );
}

#[tokio::test]
async fn hs256_keyed_with_the_client_secret_is_refused() {
    let err = refused(Fault::Hs256).await;
    assert!(
        matches!(&err, OidcError::Algorithm(a) if a == "HS256"),
        "{err}"
    );
}

#[tokio::test]
async fn wrong_audience_is_refused() {
    let err = refused(Fault::WrongAudience).await;
    assert!(
        matches!(&err, OidcError::Audience(c) if c == CLIENT_ID),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        format!("ID token audience does not include client {CLIENT_ID}")
    );
}

#[tokio::test]
async fn several_audiences_without_azp_are_refused() {
    let err = refused(Fault::ExtraAudience).await;
    assert!(matches!(err, OidcError::AuthorizedParty(_)), "{err}");
}

#[tokio::test]
async fn wrong_nonce_is_refused() {
    let err = refused(Fault::WrongNonce).await;
    assert!(matches!(err, OidcError::NonceMismatch), "{err}");
    assert_eq!(err.to_string(), "nonce does not match");
}

#[tokio::test]
async fn expired_token_is_refused() {
    let err = refused(Fault::Expired).await;
    assert!(matches!(err, OidcError::Expired), "{err}");
    assert_eq!(err.to_string(), "ID token expired");
}

#[tokio::test]
async fn token_issued_in_the_future_is_refused() {
    let err = refused(Fault::IssuedInFuture).await;
    assert!(matches!(err, OidcError::IssuedInFuture), "{err}");
}

#[tokio::test]
async fn wrong_issuer_is_refused() {
    let err = refused(Fault::WrongIssuer).await;
    assert!(
        matches!(&err, OidcError::WrongIssuer { found, .. } if found == "https://evil.example"),
        "{err}"
    );
}

#[tokio::test]
async fn unverified_email_is_refused() {
    let err = refused(Fault::EmailUnverified).await;
    assert!(matches!(err, OidcError::EmailNotVerified), "{err}");
}

#[tokio::test]
async fn email_without_email_verified_is_refused() {
    let err = refused(Fault::EmailVerifiedMissing).await;
    assert!(matches!(err, OidcError::EmailNotVerified), "{err}");
}

/// An issuer group that nobody mapped ("admins", "oncall" created by anyone with rights at the
/// issuer) must not give the admin pages or a vote.
#[tokio::test]
async fn unmapped_groups_do_not_count() {
    let (issuer, oidc) = start().await;
    issuer.set_user(TestUser::new("mallory@example.com", &["admins", "oncall"]));
    let id = login(&oidc).await.unwrap();
    assert_eq!(id.name, "mallory@example.com");
    assert!(id.groups.is_empty(), "{:?}", id.groups);
}

#[tokio::test]
async fn discovery_with_another_issuer_is_refused() {
    let issuer = Issuer::start(TestUser::new("alice@example.com", &[])).await;
    issuer.set_fault(Fault::DiscoveryIssuer);
    let err = Oidc::discover(&issuer.oidc_file(), None, redirect())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, OidcError::IssuerMismatch { found, .. } if found == "https://other-issuer.example"),
        "{err}"
    );
}

#[tokio::test]
async fn unreachable_issuer_is_reported() {
    let issuer = Issuer::start(TestUser::new("alice@example.com", &[])).await;
    let mut cfg = issuer.oidc_file();
    drop(issuer);
    cfg.issuer = "http://127.0.0.1:9".into(); // discard port: nothing listens
    let err = Oidc::discover(&cfg, None, redirect()).await.unwrap_err();
    assert!(matches!(err, OidcError::Unreachable(_)), "{err}");
    assert!(err.to_string().starts_with("issuer unreachable: "), "{err}");
}

#[tokio::test]
async fn rotated_key_is_fetched_once_unknown() {
    let (issuer, oidc) = start().await;
    assert_eq!(issuer.jwks_served(), 1, "discovery fetches the keys");
    login(&oidc).await.unwrap();
    assert_eq!(issuer.jwks_served(), 1, "a known key needs no fetch");
    issuer.rotate_key();
    let id = login(&oidc).await.unwrap();
    assert_eq!(id.name, "alice@example.com");
    assert_eq!(issuer.jwks_served(), 2, "the unknown kid costs one fetch");
    login(&oidc).await.unwrap();
    assert_eq!(issuer.jwks_served(), 2, "the new key is kept");

    // A kid that the fresh JWKS does not list either: refused after one fetch, not a loop.
    issuer.set_fault(Fault::UnpublishedKey);
    let err = login(&oidc).await.unwrap_err();
    assert!(
        matches!(&err, OidcError::UnknownKey(k) if k == "unpublished"),
        "{err}"
    );
    assert_eq!(issuer.jwks_served(), 3);
}

#[tokio::test]
async fn client_secret_post_and_public_clients_log_in() {
    let (issuer, _) = start().await;
    issuer.set_client_auth(ClientAuth::Post);
    let post = Oidc::discover(
        &issuer.oidc_file(),
        Some(Secret::new(CLIENT_SECRET)),
        redirect(),
    )
    .await
    .unwrap();
    login(&post).await.unwrap();

    issuer.set_client_auth(ClientAuth::None);
    let public = Oidc::discover(&issuer.oidc_file(), None, redirect())
        .await
        .unwrap();
    login(&public).await.unwrap();
}

#[tokio::test]
async fn wrong_client_secret_is_refused() {
    let (issuer, _) = start().await;
    let oidc = Oidc::discover(&issuer.oidc_file(), Some(Secret::new("wrong")), redirect())
        .await
        .unwrap();
    let err = login(&oidc).await.unwrap_err();
    assert!(
        matches!(&err, OidcError::TokenRefused(m) if m.starts_with("invalid_client")),
        "{err}"
    );
    assert!(
        !err.to_string().contains("wrong"),
        "the secret is not echoed"
    );
}

#[tokio::test]
async fn name_falls_back_and_groups_may_be_absent() {
    let (issuer, _) = start().await;
    let mut cfg = issuer.oidc_file();
    cfg.identity_claim = "upn".into(); // absent: falls back to sub (no preferred_username)
    cfg.groups_claim = "roles".into(); // absent: no groups
    let oidc = Oidc::discover(&cfg, Some(Secret::new(CLIENT_SECRET)), redirect())
        .await
        .unwrap();
    let id = login(&oidc).await.unwrap();
    assert_eq!(id.name, "00u-alice@example.com");
    assert!(id.groups.is_empty());
}

#[tokio::test]
async fn oidc_can_be_shared_by_web_handlers() {
    fn send_sync<T: Send + Sync>(_: &T) {}
    fn send<T: Send>(_: &T) {}
    let (issuer, oidc) = start().await;
    send_sync(&oidc);
    let (_, pending) = oidc.begin().unwrap();
    send(&oidc.finish(&pending, "code", "state"));
    send(&Oidc::discover(&issuer.oidc_file(), None, redirect()));
    assert!(!format!("{oidc:?}").contains(CLIENT_SECRET));
}
