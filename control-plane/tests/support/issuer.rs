//! A test OpenID Connect issuer on 127.0.0.1 that speaks the real protocol: discovery, JWKS
//! (EC P-256), `/authorize` (logs the configured user in at once and 302-redirects back, so a
//! browser can follow it too) and `/token` (client authentication, single-use codes, PKCE S256,
//! ES256 ID tokens). A [`Fault`] makes it mint a bad token or a bad discovery document.
//!
//! Use from a test crate with `#[path = "support/issuer.rs"] mod issuer;`.
#![allow(dead_code)] // each test crate uses a part

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use airlock_control_plane::{auth::random_hex, config::OidcFile};
use axum::{
    extract::{Query, State},
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    Form, Json, Router,
};
use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// The client registered at the issuer.
pub const CLIENT_ID: &str = "airlock-web";
/// Its secret.
pub const CLIENT_SECRET: &str = "test-client-secret";

/// The person who "logs in" at `/authorize`.
#[derive(Clone, Debug)]
pub struct TestUser {
    /// `sub`.
    pub sub: String,
    /// `email` (verified).
    pub email: String,
    /// `groups`.
    pub groups: Vec<String>,
}

impl TestUser {
    /// A user with `email`, a `sub` derived from it, and `groups`.
    pub fn new(email: &str, groups: &[&str]) -> Self {
        Self {
            sub: format!("00u-{email}"),
            email: email.into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
        }
    }
}

/// What the issuer gets wrong, on purpose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Nothing: a good issuer.
    None,
    /// ID token signed by another key under the published key's `kid`.
    OtherKey,
    /// ID token signed by a key the JWKS never lists, under a `kid` of its own.
    UnpublishedKey,
    /// `aud` is another client.
    WrongAudience,
    /// `aud` has our client and another, and there is no `azp`.
    ExtraAudience,
    /// `nonce` is not the one asked for.
    WrongNonce,
    /// `exp` ten minutes ago.
    Expired,
    /// `iat` ten minutes ahead.
    IssuedInFuture,
    /// `iss` is another issuer.
    WrongIssuer,
    /// `alg: none`, no signature.
    AlgNone,
    /// HS256 keyed with the client secret (algorithm confusion).
    Hs256,
    /// `email_verified: false`.
    EmailUnverified,
    /// No `email_verified` claim at all.
    EmailVerifiedMissing,
    /// Discovery names another issuer.
    DiscoveryIssuer,
}

/// How the token endpoint wants the client to authenticate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    /// `client_secret_basic` only.
    Basic,
    /// `client_secret_post` only.
    Post,
    /// A public client: no secret, PKCE alone.
    None,
}

struct SigningKey {
    kid: String,
    key: EncodingKey,
    jwk: Value,
}

impl SigningKey {
    fn generate(kid: &str) -> Self {
        let pair = rcgen::KeyPair::generate().expect("P-256 key");
        let raw = pair.public_key_raw(); // 04 || x || y
        Self {
            kid: kid.into(),
            key: EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).expect("PKCS#8 key"),
            jwk: json!({
                "kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256", "use": "sig",
                "x": URL_SAFE_NO_PAD.encode(&raw[1..33]),
                "y": URL_SAFE_NO_PAD.encode(&raw[33..65]),
            }),
        }
    }
}

struct Grant {
    client_id: String,
    redirect_uri: String,
    nonce: Option<String>,
    challenge: String,
}

struct Inner {
    base: String,
    user: TestUser,
    fault: Fault,
    auth: ClientAuth,
    key: SigningKey,
    generation: u32,
    codes: HashMap<String, Grant>,
    tokens_issued: u32,
    jwks_served: u32,
}

type Shared = Arc<Mutex<Inner>>;

/// A running test issuer; stops when dropped.
pub struct Issuer {
    inner: Shared,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Issuer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Issuer {
    /// Starts an issuer on 127.0.0.1 that logs `user` in.
    pub async fn start(user: TestUser) -> Issuer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let inner = Arc::new(Mutex::new(Inner {
            base,
            user,
            fault: Fault::None,
            auth: ClientAuth::Basic,
            key: SigningKey::generate("key-1"),
            generation: 1,
            codes: HashMap::new(),
            tokens_issued: 0,
            jwks_served: 0,
        }));
        let app = Router::new()
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/jwks", get(jwks))
            .route("/authorize", get(authorize))
            .route("/token", post(token))
            .with_state(inner.clone());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Issuer { inner, task }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap()
    }

    /// The issuer URL (`http://127.0.0.1:port`, no trailing slash).
    pub fn url(&self) -> String {
        self.lock().base.clone()
    }

    /// From now on, get `fault` wrong.
    pub fn set_fault(&self, fault: Fault) {
        self.lock().fault = fault;
    }

    /// From now on, log `user` in.
    pub fn set_user(&self, user: TestUser) {
        self.lock().user = user;
    }

    /// From now on, require `auth` from the client (Basic by default).
    pub fn set_client_auth(&self, auth: ClientAuth) {
        self.lock().auth = auth;
    }

    /// Replaces the signing key by a new one with a new `kid` (the JWKS then lists only it).
    pub fn rotate_key(&self) {
        let mut s = self.lock();
        s.generation += 1;
        s.key = SigningKey::generate(&format!("key-{}", s.generation));
    }

    /// How many ID tokens the token endpoint has issued.
    pub fn tokens_issued(&self) -> u32 {
        self.lock().tokens_issued
    }

    /// How many times the JWKS was fetched.
    pub fn jwks_served(&self) -> u32 {
        self.lock().jwks_served
    }

    /// An `[oidc]` section for this issuer (the secret goes to `Oidc::discover` directly);
    /// `okta-approvers` maps to `approvers`.
    pub fn oidc_file(&self) -> OidcFile {
        OidcFile {
            issuer: self.url(),
            client_id: CLIENT_ID.into(),
            client_secret_file: None,
            scopes: ["openid", "email", "profile"].map(String::from).to_vec(),
            identity_claim: "email".into(),
            groups_claim: "groups".into(),
            group_map: BTreeMap::from([("okta-approvers".into(), "approvers".into())]),
            allowed_groups: vec!["approvers".into()],
            label: "Sign in with Test IdP".into(),
        }
    }
}

/// Follows an authorize URL as a browser would, without one: GET it, read the redirect's
/// `Location`, return its `(code, state)`. Panics when the issuer refuses.
pub async fn follow_authorize(authorize_url: &url::Url) -> (String, String) {
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let resp = client.get(authorize_url.clone()).send().await.unwrap();
    assert_eq!(
        resp.status(),
        StatusCode::FOUND,
        "authorize: {}",
        resp.text().await.unwrap_or_default()
    );
    let location = resp.headers()[header::LOCATION].to_str().unwrap();
    let location = url::Url::parse(location).unwrap();
    let q: HashMap<_, _> = location.query_pairs().into_owned().collect();
    assert!(!q.contains_key("error"), "issuer refused: {q:?}");
    (
        q["code"].clone(),
        q.get("state").cloned().unwrap_or_default(),
    )
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

async fn discovery(State(s): State<Shared>) -> Json<Value> {
    let s = s.lock().unwrap();
    let b = &s.base;
    let auth = match s.auth {
        ClientAuth::Basic => "client_secret_basic",
        ClientAuth::Post => "client_secret_post",
        ClientAuth::None => "none",
    };
    let issuer = if s.fault == Fault::DiscoveryIssuer {
        "https://other-issuer.example".into()
    } else {
        b.clone()
    };
    Json(json!({
        "issuer": issuer,
        "authorization_endpoint": format!("{b}/authorize"),
        "token_endpoint": format!("{b}/token"),
        "jwks_uri": format!("{b}/jwks"),
        "response_types_supported": ["code"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["ES256"],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": [auth],
        "scopes_supported": ["openid", "email", "profile", "groups"],
    }))
}

async fn jwks(State(s): State<Shared>) -> Json<Value> {
    let mut s = s.lock().unwrap();
    s.jwks_served += 1;
    Json(json!({ "keys": [s.key.jwk.clone()] }))
}

async fn authorize(State(s): State<Shared>, Query(q): Query<HashMap<String, String>>) -> Response {
    let bad = |m: &str| (StatusCode::BAD_REQUEST, m.to_string()).into_response();
    let param = |k: &str| q.get(k).map(String::as_str).unwrap_or_default();
    if param("client_id") != CLIENT_ID {
        return bad("unknown client_id");
    }
    let Ok(mut back) = url::Url::parse(param("redirect_uri")) else {
        return bad("bad redirect_uri");
    };
    if param("response_type") != "code" {
        return bad("response_type must be code");
    }
    if param("code_challenge_method") != "S256" || param("code_challenge").is_empty() {
        return bad("PKCE S256 is required");
    }
    if !param("scope").split(' ').any(|s| s == "openid") {
        return bad("scope must include openid");
    }
    let code = random_hex(16).unwrap();
    s.lock().unwrap().codes.insert(
        code.clone(),
        Grant {
            client_id: CLIENT_ID.into(),
            redirect_uri: back.to_string(),
            nonce: q.get("nonce").cloned(),
            challenge: param("code_challenge").into(),
        },
    );
    back.query_pairs_mut().append_pair("code", &code);
    if let Some(state) = q.get("state") {
        back.query_pairs_mut().append_pair("state", state);
    }
    (StatusCode::FOUND, [(header::LOCATION, back.to_string())]).into_response()
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    (
        status,
        Json(json!({ "error": error, "error_description": description })),
    )
        .into_response()
}

async fn token(
    State(s): State<Shared>,
    headers: HeaderMap,
    Form(f): Form<HashMap<String, String>>,
) -> Response {
    let param = |k: &str| f.get(k).map(String::as_str).unwrap_or_default();
    let mut s = s.lock().unwrap();
    if param("grant_type") != "authorization_code" {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "only authorization_code",
        );
    }
    // Client authentication, by the one method advertised.
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Basic "))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|b| {
            let (id, secret) = b.split_once(':')?;
            let dec = |x: &str| {
                url::form_urlencoded::parse(format!("x={x}").as_bytes())
                    .next()
                    .map(|(_, v)| v.into_owned())
            };
            Some((dec(id)?, dec(secret)?))
        });
    let client_ok = match s.auth {
        ClientAuth::Basic => {
            basic == Some((CLIENT_ID.into(), CLIENT_SECRET.into()))
                && !f.contains_key("client_secret")
        }
        ClientAuth::Post => {
            basic.is_none()
                && param("client_id") == CLIENT_ID
                && param("client_secret") == CLIENT_SECRET
        }
        ClientAuth::None => {
            basic.is_none() && param("client_id") == CLIENT_ID && !f.contains_key("client_secret")
        }
    };
    if !client_ok {
        return oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "client authentication failed",
        );
    }
    // Codes are single-use: taken out whether or not the rest checks out.
    let Some(grant) = s.codes.remove(param("code")) else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "code is unknown or already used",
        );
    };
    if grant.redirect_uri != param("redirect_uri")
        || f.get("client_id").is_some_and(|c| *c != grant.client_id)
    {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "redirect_uri or client_id differs from the authorization request",
        );
    }
    if URL_SAFE_NO_PAD.encode(Sha256::digest(param("code_verifier").as_bytes())) != grant.challenge
    {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "PKCE verification failed",
        );
    }
    let id_token = mint(&s, grant.nonce);
    s.tokens_issued += 1;
    Json(json!({
        "access_token": random_hex(16).unwrap(),
        "token_type": "Bearer",
        "expires_in": 300,
        "scope": "openid email profile",
        "id_token": id_token,
    }))
    .into_response()
}

/// The ID token for the current user, as the fault would have it.
fn mint(s: &Inner, nonce: Option<String>) -> String {
    let now = now();
    let fault = s.fault;
    let mut claims = json!({
        "iss": if fault == Fault::WrongIssuer { "https://evil.example" } else { s.base.as_str() },
        "sub": s.user.sub,
        "aud": match fault {
            Fault::WrongAudience => json!("someone-else"),
            Fault::ExtraAudience => json!([CLIENT_ID, "someone-else"]),
            _ => json!(CLIENT_ID),
        },
        "exp": if fault == Fault::Expired { now - 600 } else { now + 300 },
        "iat": match fault { Fault::Expired => now - 900, Fault::IssuedInFuture => now + 600, _ => now },
        "auth_time": now,
        "email": s.user.email,
        "email_verified": fault != Fault::EmailUnverified,
        "groups": s.user.groups,
    });
    let nonce = if fault == Fault::WrongNonce {
        Some("not-the-nonce".into())
    } else {
        nonce
    };
    if let Some(n) = nonce {
        claims["nonce"] = n.into();
    }
    if fault == Fault::EmailVerifiedMissing {
        claims.as_object_mut().unwrap().remove("email_verified");
    }
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(s.key.kid.clone());
    match fault {
        Fault::AlgNone => {
            let enc = |v: Value| URL_SAFE_NO_PAD.encode(v.to_string());
            format!(
                "{}.{}.",
                enc(json!({"alg": "none", "typ": "JWT", "kid": s.key.kid})),
                enc(claims)
            )
        }
        Fault::Hs256 => {
            header.alg = Algorithm::HS256;
            jsonwebtoken::encode(
                &header,
                &claims,
                &EncodingKey::from_secret(CLIENT_SECRET.as_bytes()),
            )
            .unwrap()
        }
        Fault::OtherKey => {
            jsonwebtoken::encode(&header, &claims, &SigningKey::generate(&s.key.kid).key).unwrap()
        }
        Fault::UnpublishedKey => {
            header.kid = Some("unpublished".into());
            jsonwebtoken::encode(&header, &claims, &SigningKey::generate("unpublished").key)
                .unwrap()
        }
        _ => jsonwebtoken::encode(&header, &claims, &s.key.key).unwrap(),
    }
}
