//! Login through an OpenID Connect issuer: authorization code flow with PKCE.
//!
//! The server calls [`Oidc::begin`] to send a person to the issuer, keeps the [`Pending`] it
//! returns (e.g. in a short-lived cookie-bound table), and on the callback calls
//! [`Oidc::finish`], which redeems the code and validates the ID token into an [`Identity`].
//! Works with any issuer that publishes discovery (Okta, Azure AD v2.0 tenant endpoints, Keycloak,
//! Google, ...). Tokens and the client secret are never logged nor put into errors.

use std::{
    collections::BTreeMap,
    fmt,
    sync::{Arc, RwLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use jsonwebtoken::{
    errors::ErrorKind,
    jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse},
    Algorithm, DecodingKey, Validation,
};
use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use url::Url;

use crate::config::{OidcFile, Secret};

/// Allowed clock skew between us and the issuer, seconds.
const LEEWAY_S: f64 = 60.0;
/// Every request to the issuer gives up after this.
const TIMEOUT: Duration = Duration::from_secs(10);
/// A login must come back from the issuer within this.
const PENDING_TTL_MS: i64 = 10 * 60 * 1000;
/// Largest answer read from the issuer (discovery, JWKS, token response).
const MAX_BODY: usize = 1 << 20;

/// Why a login through the issuer failed; each message is one line fit to show the person.
#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    /// The issuer could not be reached or answered with an HTTP error.
    #[error("issuer unreachable: {0}")]
    Unreachable(String),
    /// The discovery document or the JWKS is unusable.
    #[error("issuer discovery failed: {0}")]
    Discovery(String),
    /// The discovery document names another issuer than the configured one.
    #[error("issuer mismatch: configured {configured} but the issuer calls itself {found}")]
    IssuerMismatch {
        /// `issuer` in the configuration.
        configured: String,
        /// `issuer` in the discovery document.
        found: String,
    },
    /// No randomness for state, nonce or verifier.
    #[error("cannot generate random values: {0}")]
    Random(String),
    /// The callback's state is not the one we sent (forged or crossed logins).
    #[error("state does not match")]
    StateMismatch,
    /// The person took too long at the issuer.
    #[error("the login took too long; start again")]
    LoginExpired,
    /// The token endpoint refused to redeem the code.
    #[error("the issuer refused the login: {0}")]
    TokenRefused(String),
    /// The token endpoint's answer is unusable.
    #[error("token endpoint answered badly: {0}")]
    TokenResponse(String),
    /// The ID token cannot be parsed.
    #[error("ID token is malformed: {0}")]
    Malformed(String),
    /// The ID token's `alg` is not one its key allows (e.g. `none`, `HS256`).
    #[error("ID token algorithm {0} is not allowed")]
    Algorithm(String),
    /// No key of the issuer has the token's `kid`, even after refetching the JWKS.
    #[error("ID token is signed by an unknown key {0:?}")]
    UnknownKey(String),
    /// The signature does not verify.
    #[error("ID token signature is not valid")]
    BadSignature,
    /// `iss` is not the issuer.
    #[error("ID token issuer {found:?} is not {expected}")]
    WrongIssuer {
        /// The discovered issuer.
        expected: String,
        /// `iss` in the token.
        found: String,
    },
    /// `aud` does not include our client id.
    #[error("ID token audience does not include client {0}")]
    Audience(String),
    /// `azp` is missing (several audiences) or names another client.
    #[error("ID token authorized party is not client {0}")]
    AuthorizedParty(String),
    /// `exp` has passed.
    #[error("ID token expired")]
    Expired,
    /// `iat` is in the future.
    #[error("ID token issued in the future (clocks out of step?)")]
    IssuedInFuture,
    /// `nonce` is not the one we sent (replayed token).
    #[error("nonce does not match")]
    NonceMismatch,
    /// A required claim is absent or of the wrong type.
    #[error("ID token claim {0}")]
    Claim(String),
    /// The identity claim is an email the issuer does not say is verified.
    #[error("the issuer does not say the email address is verified (email_verified is not true); set identity_claim = \"sub\" if it never sends it")]
    EmailNotVerified,
}

/// A person logged in through the issuer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// Their name in Airlock: the configured identity claim, else `sub`.
    pub name: String,
    /// Their approver groups: the values of the groups claim that `group_map` maps (others are
    /// dropped).
    pub groups: Vec<String>,
    /// The issuer's stable id for them (`sub`).
    pub subject: String,
}

/// What the server keeps between the redirect to the issuer and the callback.
#[derive(Clone, Debug)]
pub struct Pending {
    /// Sent as `state`; the callback must bring it back.
    pub state: String,
    /// Sent as `nonce`; the ID token must carry it.
    pub nonce: String,
    /// PKCE code verifier; only its S256 challenge is sent.
    pub verifier: String,
    /// When the login began, Unix ms.
    pub created_ms: i64,
}

/// One verification key from the issuer's JWKS.
#[derive(Clone)]
struct Key {
    kid: Option<String>,
    algs: Vec<Algorithm>,
    key: DecodingKey,
}

/// The relying party for one issuer.
pub struct Oidc {
    issuer: String,
    client_id: String,
    secret: Option<Secret>,
    /// Send the secret in HTTP Basic (default) or in the form (`client_secret_post`).
    secret_in_body: bool,
    redirect_uri: Url,
    scopes: String,
    identity_claim: String,
    groups_claim: String,
    group_map: BTreeMap<String, String>,
    label: String,
    authorization_endpoint: Url,
    token_endpoint: Url,
    jwks_uri: Url,
    keys: RwLock<Arc<[Key]>>,
    http: reqwest::Client,
}

impl fmt::Debug for Oidc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Oidc")
            .field("issuer", &self.issuer)
            .field("client_id", &self.client_id)
            .field("redirect_uri", &self.redirect_uri.as_str())
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct Discovery {
    issuer: String,
    authorization_endpoint: String,
    token_endpoint: String,
    jwks_uri: String,
    #[serde(default)]
    token_endpoint_auth_methods_supported: Option<Vec<String>>,
    #[serde(default)]
    code_challenge_methods_supported: Option<Vec<String>>,
}

impl Oidc {
    /// Fetches `{issuer}/.well-known/openid-configuration` and the issuer's keys. The document
    /// must name the configured issuer (a trailing `/` aside), and its endpoints must be https
    /// (plain http is accepted on loopback only, for tests and local issuers).
    pub async fn discover(
        cfg: &OidcFile,
        client_secret: Option<Secret>,
        redirect_uri: Url,
    ) -> Result<Self, OidcError> {
        let http = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .connect_timeout(TIMEOUT)
            // A redirect could carry the code, verifier or secret to another host.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| OidcError::Unreachable(e.to_string()))?;
        let configured = cfg.issuer.trim_end_matches('/');
        let doc_url = format!("{configured}/.well-known/openid-configuration");
        let doc: Discovery = serde_json::from_slice(&get(&http, &doc_url).await?)
            .map_err(|e| OidcError::Discovery(format!("{doc_url}: {e}")))?;
        if doc.issuer.trim_end_matches('/') != configured {
            return Err(OidcError::IssuerMismatch {
                configured: cfg.issuer.clone(),
                found: doc.issuer,
            });
        }
        let authorization_endpoint =
            endpoint("authorization_endpoint", &doc.authorization_endpoint)?;
        let token_endpoint = endpoint("token_endpoint", &doc.token_endpoint)?;
        let jwks_uri = endpoint("jwks_uri", &doc.jwks_uri)?;
        if let Some(m) = &doc.code_challenge_methods_supported {
            if !m.iter().any(|m| m == "S256") {
                // Some issuers (Azure AD) support S256 without advertising it: try anyway.
                tracing::warn!(issuer = %doc.issuer, "issuer does not advertise PKCE S256");
            }
        }
        // RFC 8414: Basic is the default; use the form only when Basic is not offered.
        let secret_in_body = doc.token_endpoint_auth_methods_supported.is_some_and(|m| {
            !m.iter().any(|m| m == "client_secret_basic")
                && m.iter().any(|m| m == "client_secret_post")
        });
        let oidc = Self {
            issuer: doc.issuer,
            client_id: cfg.client_id.clone(),
            secret: client_secret,
            secret_in_body,
            redirect_uri,
            scopes: cfg.scopes.join(" "),
            identity_claim: cfg.identity_claim.clone(),
            groups_claim: cfg.groups_claim.clone(),
            group_map: cfg.group_map.clone(),
            label: cfg.label.clone(),
            authorization_endpoint,
            token_endpoint,
            jwks_uri,
            keys: RwLock::new(Arc::from(Vec::new())),
            http,
        };
        oidc.refresh_keys().await?;
        tracing::info!(issuer = %oidc.issuer, client_id = %oidc.client_id, "OIDC issuer discovered");
        Ok(oidc)
    }

    /// Text of the login button.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The issuer's URL as it names itself.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// Starts a login: the URL to send the person's browser to, and what to keep until the
    /// callback.
    pub fn begin(&self) -> Result<(Url, Pending), OidcError> {
        let rand =
            |n| crate::credential::random_hex(n).map_err(|e| OidcError::Random(e.to_string()));
        let pending = Pending {
            state: rand(16)?,
            nonce: rand(16)?,
            // 64 hex characters: within RFC 7636's 43..=128 unreserved characters, 256 bits.
            verifier: rand(32)?,
            created_ms: crate::types::now_ms(),
        };
        let mut url = self.authorization_endpoint.clone();
        url.query_pairs_mut()
            .append_pair("response_type", "code")
            .append_pair("client_id", &self.client_id)
            .append_pair("redirect_uri", self.redirect_uri.as_str())
            .append_pair("scope", &self.scopes)
            .append_pair("state", &pending.state)
            .append_pair("nonce", &pending.nonce)
            .append_pair("code_challenge", &pkce_challenge(&pending.verifier))
            .append_pair("code_challenge_method", "S256");
        Ok((url, pending))
    }

    /// Completes a login from the callback's `code` and `state`: redeems the code and validates
    /// the ID token.
    pub async fn finish(
        &self,
        pending: &Pending,
        code: &str,
        returned_state: &str,
    ) -> Result<Identity, OidcError> {
        if !constant_time_eq(pending.state.as_bytes(), returned_state.as_bytes()) {
            return Err(OidcError::StateMismatch);
        }
        if crate::types::now_ms() - pending.created_ms > PENDING_TTL_MS {
            return Err(OidcError::LoginExpired);
        }
        let id_token = self.redeem(code, &pending.verifier).await?;
        let claims = self.verify(&id_token).await?;
        self.check_claims(&claims, &pending.nonce, now_s())?;
        let identity = self.identity(&claims)?;
        tracing::info!(issuer = %self.issuer, name = %identity.name, groups = ?identity.groups, "OIDC login");
        Ok(identity)
    }

    /// POSTs the code to the token endpoint; returns the ID token.
    async fn redeem(&self, code: &str, verifier: &str) -> Result<String, OidcError> {
        let mut form = vec![
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", self.redirect_uri.as_str()),
            ("code_verifier", verifier),
            ("client_id", &self.client_id),
        ];
        let mut req = self.http.post(self.token_endpoint.clone());
        match &self.secret {
            Some(s) if self.secret_in_body => form.push(("client_secret", s.expose())),
            // RFC 6749 2.3.1: both halves are form-encoded before Basic.
            Some(s) => {
                req = req.basic_auth(form_encode(&self.client_id), Some(form_encode(s.expose())))
            }
            None => {}
        }
        let resp = req
            .header("accept", "application/json")
            .form(&form)
            .send()
            .await
            .map_err(|e| OidcError::Unreachable(without_url(e)))?;
        let status = resp.status();
        let body = read_capped(resp).await?;
        if !status.is_success() {
            // RFC 6749 5.2: {"error": "...", "error_description": "..."}; never echo the body.
            #[derive(Deserialize)]
            struct Refusal {
                error: String,
                error_description: Option<String>,
            }
            return Err(OidcError::TokenRefused(
                match serde_json::from_slice::<Refusal>(&body) {
                    Ok(r) => match r.error_description {
                        Some(d) => format!("{}: {}", r.error, one_line(&d)),
                        None => r.error,
                    },
                    Err(_) => format!("HTTP {status}"),
                },
            ));
        }
        #[derive(Deserialize)]
        struct Tokens {
            id_token: Option<String>,
        }
        serde_json::from_slice::<Tokens>(&body)
            .map_err(|_| OidcError::TokenResponse("not a JSON token response".into()))?
            .id_token
            .ok_or_else(|| {
                OidcError::TokenResponse("no id_token (is the openid scope asked for?)".into())
            })
    }

    /// Checks the ID token's signature against the issuer's keys; returns its claims unchecked.
    async fn verify(&self, token: &str) -> Result<Value, OidcError> {
        #[derive(Deserialize)]
        struct Header {
            alg: String,
            kid: Option<String>,
        }
        let header = token
            .split('.')
            .next()
            .and_then(|h| URL_SAFE_NO_PAD.decode(h).ok())
            .and_then(|h| serde_json::from_slice::<Header>(&h).ok())
            .ok_or_else(|| OidcError::Malformed("bad header".into()))?;
        // Parsing refuses `none`; the key's own algorithms refuse HS* and other confusions.
        let alg: Algorithm = header
            .alg
            .parse()
            .map_err(|_| OidcError::Algorithm(header.alg.clone()))?;
        let mut keys = self.keys_for(header.kid.as_deref());
        if keys.is_empty() {
            if let Some(kid) = &header.kid {
                // An unknown kid usually means the issuer rotated its keys: refetch once.
                tracing::info!(issuer = %self.issuer, kid = %kid, "unknown signing key, refetching JWKS");
                self.refresh_keys().await?;
                keys = self.keys_for(Some(kid));
                if keys.is_empty() {
                    return Err(OidcError::UnknownKey(kid.clone()));
                }
            }
        }
        let keys: Vec<_> = keys.into_iter().filter(|k| k.algs.contains(&alg)).collect();
        if keys.is_empty() {
            return Err(OidcError::Algorithm(header.alg));
        }
        let mut v = Validation::new(alg);
        // Claims are checked by `check_claims`, with messages of our own.
        v.required_spec_claims.clear();
        v.validate_exp = false;
        v.validate_aud = false;
        let mut last = OidcError::BadSignature;
        for k in keys {
            match jsonwebtoken::decode::<Value>(token, &k.key, &v) {
                Ok(data) => return Ok(data.claims),
                Err(e) => {
                    last = match e.kind() {
                        ErrorKind::InvalidSignature => OidcError::BadSignature,
                        ErrorKind::InvalidAlgorithm => OidcError::Algorithm(header.alg.clone()),
                        _ => OidcError::Malformed(e.to_string()),
                    }
                }
            }
        }
        Err(last)
    }

    /// Keys with `kid`, or every key when the token names none.
    fn keys_for(&self, kid: Option<&str>) -> Vec<Key> {
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner()).clone();
        keys.iter()
            .filter(|k| kid.is_none() || k.kid.as_deref() == kid)
            .cloned()
            .collect()
    }

    /// Fetches the JWKS and keeps its signature keys.
    async fn refresh_keys(&self) -> Result<(), OidcError> {
        let body = get(&self.http, self.jwks_uri.as_str()).await?;
        let keys = keys_from_jwks(&body)
            .map_err(|e| OidcError::Discovery(format!("JWKS {}: {e}", self.jwks_uri)))?;
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::from(keys);
        Ok(())
    }

    /// OIDC Core 3.1.3.7: iss, aud, azp, exp, iat, nonce.
    fn check_claims(&self, c: &Value, nonce: &str, now: f64) -> Result<(), OidcError> {
        let iss = c.get("iss").and_then(Value::as_str).unwrap_or_default();
        if iss != self.issuer {
            return Err(OidcError::WrongIssuer {
                expected: self.issuer.clone(),
                found: iss.into(),
            });
        }
        let aud: Vec<&str> = match c.get("aud") {
            Some(Value::String(s)) => vec![s],
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
            _ => vec![],
        };
        if !aud.contains(&self.client_id.as_str()) {
            return Err(OidcError::Audience(self.client_id.clone()));
        }
        let azp = c.get("azp").and_then(Value::as_str);
        if azp.is_some_and(|a| a != self.client_id) || (aud.len() > 1 && azp.is_none()) {
            return Err(OidcError::AuthorizedParty(self.client_id.clone()));
        }
        let time = |name: &str| {
            c.get(name)
                .and_then(Value::as_f64)
                .ok_or_else(|| OidcError::Claim(format!("{name} is missing")))
        };
        if time("exp")? + LEEWAY_S < now {
            return Err(OidcError::Expired);
        }
        if time("iat")? > now + LEEWAY_S {
            return Err(OidcError::IssuedInFuture);
        }
        let got = c.get("nonce").and_then(Value::as_str).unwrap_or_default();
        if !constant_time_eq(got.as_bytes(), nonce.as_bytes()) {
            return Err(OidcError::NonceMismatch);
        }
        Ok(())
    }

    /// Who the validated claims name, and their mapped groups.
    fn identity(&self, c: &Value) -> Result<Identity, OidcError> {
        let text = |name: &str| {
            c.get(name)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
        };
        let subject = text("sub").ok_or_else(|| OidcError::Claim("sub is missing".into()))?;
        // An email counts only when the issuer vouches for it: a missing `email_verified` is
        // as good as false (anyone can type an address into a profile at some issuers).
        if self.identity_claim == "email"
            && text("email").is_some()
            && c.get("email_verified").and_then(Value::as_bool) != Some(true)
        {
            return Err(OidcError::EmailNotVerified);
        }
        // Without the configured claim the person is named by the subject, which the issuer
        // assigns and the person cannot choose (unlike `preferred_username` at some issuers).
        let name = text(&self.identity_claim).unwrap_or(subject);
        let raw: Vec<&str> = match c.get(&self.groups_claim) {
            None | Some(Value::Null) => {
                if c.pointer(&format!("/_claim_names/{}", self.groups_claim))
                    .is_some()
                {
                    // Azure AD leaves out groups past ~200 ("overage"): say why none are seen.
                    tracing::warn!(name = %name, "issuer omitted the groups claim (too many groups); map fewer groups into the token");
                }
                vec![]
            }
            Some(Value::String(s)) => vec![s],
            Some(Value::Array(a)) => a
                .iter()
                .map(Value::as_str)
                .collect::<Option<_>>()
                .ok_or_else(|| {
                    OidcError::Claim(format!("{} is not a list of strings", self.groups_claim))
                })?,
            Some(_) => {
                return Err(OidcError::Claim(format!(
                    "{} is not a list of strings",
                    self.groups_claim
                )))
            }
        };
        let mut groups: Vec<String> = Vec::new();
        // Only mapped groups count: an issuer group that happens to be called "admins" or
        // "oncall" must not grant the admin pages or a vote unless the operator said so.
        for g in raw.into_iter().filter_map(|g| self.group_map.get(g)) {
            if !groups.iter().any(|x| x == g) {
                groups.push(g.to_string());
            }
        }
        Ok(Identity {
            name: name.into(),
            groups,
            subject: subject.into(),
        })
    }
}

/// The signature keys of a JWKS document; keys of types or algorithms we do not know are
/// skipped, not fatal; none at all is an error.
fn keys_from_jwks(body: &[u8]) -> Result<Vec<Key>, String> {
    #[derive(Deserialize)]
    struct Set {
        keys: Vec<Value>,
    }
    let set: Set = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let keys: Vec<Key> = set
        .keys
        .into_iter()
        .filter_map(|v| serde_json::from_value::<Jwk>(v).ok())
        .filter_map(|jwk| {
            let algs = key_algs(&jwk);
            let key = DecodingKey::from_jwk(&jwk).ok()?;
            (!algs.is_empty()).then_some(Key {
                kid: jwk.common.key_id,
                algs,
                key,
            })
        })
        .collect();
    if keys.is_empty() {
        return Err("no usable signature key".into());
    }
    Ok(keys)
}

/// Fuzzing entry: a JWKS document and an ID token through the parsing and checks a login
/// uses (keys, header, signature, claims, identity), with an issuer that maps one group.
#[cfg(feature = "fuzzing")]
pub fn fuzz_jwks_and_token(jwks: &[u8], token: &str) {
    let Ok(keys) = keys_from_jwks(jwks) else {
        return;
    };
    let url = Url::parse("https://idp.example/").expect("a constant URL");
    let oidc = Oidc {
        issuer: "https://idp.example".into(),
        client_id: "airlock".into(),
        secret: None,
        secret_in_body: false,
        redirect_uri: url.clone(),
        scopes: "openid".into(),
        identity_claim: "email".into(),
        groups_claim: "groups".into(),
        group_map: BTreeMap::from([("g".to_owned(), "oncall".to_owned())]),
        label: String::new(),
        authorization_endpoint: url.clone(),
        token_endpoint: url.clone(),
        jwks_uri: url,
        keys: RwLock::new(Arc::from(keys)),
        http: reqwest::Client::new(),
    };
    // Only tokens naming a kid we hold, or none: `verify` never reaches the network then.
    let kid = token
        .split('.')
        .next()
        .and_then(|h| URL_SAFE_NO_PAD.decode(h).ok())
        .and_then(|h| serde_json::from_slice::<Value>(&h).ok())
        .and_then(|v| v.get("kid").and_then(Value::as_str).map(str::to_owned));
    if kid.is_some() && oidc.keys_for(kid.as_deref()).is_empty() {
        return;
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    if let Ok(claims) = runtime.block_on(oidc.verify(token)) {
        let _ = oidc.check_claims(&claims, "nonce", now_s());
        let _ = oidc.identity(&claims);
    }
}

/// RFC 7636 S256: BASE64URL(SHA256(verifier)), unpadded.
pub fn pkce_challenge(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

/// The signature algorithms a JWK may verify: its `alg` when given (signature algorithms of the
/// key's own type only), else those of its type and curve. Symmetric and encryption keys: none.
fn key_algs(jwk: &Jwk) -> Vec<Algorithm> {
    use Algorithm::*;
    if jwk.common.public_key_use == Some(PublicKeyUse::Encryption) {
        return vec![];
    }
    let by_type = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => vec![RS256, RS384, RS512, PS256, PS384, PS512],
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => vec![ES256],
            EllipticCurve::P384 => vec![ES384],
            _ => vec![],
        },
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => vec![EdDSA],
        _ => vec![],
    };
    match jwk.common.key_algorithm {
        None => by_type,
        Some(a) => {
            let a = match a {
                KeyAlgorithm::RS256 => RS256,
                KeyAlgorithm::RS384 => RS384,
                KeyAlgorithm::RS512 => RS512,
                KeyAlgorithm::PS256 => PS256,
                KeyAlgorithm::PS384 => PS384,
                KeyAlgorithm::PS512 => PS512,
                KeyAlgorithm::ES256 => ES256,
                KeyAlgorithm::ES384 => ES384,
                KeyAlgorithm::EdDSA => EdDSA,
                _ => return vec![],
            };
            by_type.into_iter().filter(|b| *b == a).collect()
        }
    }
}

/// Parses an endpoint from discovery; https only, except on loopback.
fn endpoint(what: &str, s: &str) -> Result<Url, OidcError> {
    let url = Url::parse(s).map_err(|e| OidcError::Discovery(format!("{what} {s:?}: {e}")))?;
    let loopback = match url.host() {
        Some(url::Host::Domain(d)) => d == "localhost",
        Some(url::Host::Ipv4(a)) => a.is_loopback(),
        Some(url::Host::Ipv6(a)) => a.is_loopback(),
        None => false,
    };
    match url.scheme() {
        "https" => Ok(url),
        "http" if loopback => Ok(url),
        _ => Err(OidcError::Discovery(format!("{what} {s} is not https"))),
    }
}

/// GET `url`, expecting a 2xx answer.
async fn get(http: &reqwest::Client, url: &str) -> Result<Vec<u8>, OidcError> {
    let resp = http
        .get(url)
        .header("accept", "application/json")
        .send()
        .await
        .map_err(|e| OidcError::Unreachable(format!("{url}: {}", without_url(e))))?;
    if !resp.status().is_success() {
        return Err(OidcError::Unreachable(format!(
            "{url}: HTTP {}",
            resp.status()
        )));
    }
    read_capped(resp).await
}

/// The body, refusing more than [`MAX_BODY`].
async fn read_capped(mut resp: reqwest::Response) -> Result<Vec<u8>, OidcError> {
    let mut body = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| OidcError::Unreachable(without_url(e)))?
    {
        if body.len() + chunk.len() > MAX_BODY {
            return Err(OidcError::Unreachable("answer too large".into()));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// A reqwest error's text, with its source chain, but not its URL.
fn without_url(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut s = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(c) = src {
        s.push_str(&format!(": {c}"));
        src = c.source();
    }
    s
}

/// Collapses the issuer's text to one short line.
fn one_line(s: &str) -> String {
    s.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .take(200)
        .collect()
}

fn form_encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

fn now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Equality that takes as long whatever the first differing byte.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkce_rfc7636_appendix_b() {
        assert_eq!(
            pkce_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
    }

    #[test]
    fn pkce_challenge_is_url_safe_and_unpadded() {
        let c = pkce_challenge(&"a".repeat(64));
        assert_eq!(c.len(), 43);
        assert!(c
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
    }

    #[test]
    fn constant_time_eq_compares_whole_strings() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
    }

    #[test]
    fn symmetric_and_mismatched_keys_allow_no_algorithm() {
        let jwk = |v: Value| serde_json::from_value::<Jwk>(v).unwrap();
        let hs = jwk(serde_json::json!({"kty": "oct", "k": "c2VjcmV0", "alg": "HS256"}));
        assert!(key_algs(&hs).is_empty());
        let ec = serde_json::json!({"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"});
        assert_eq!(key_algs(&jwk(ec.clone())), vec![Algorithm::ES256]);
        let mut rs_on_ec = ec;
        rs_on_ec["alg"] = "RS256".into();
        assert!(key_algs(&jwk(rs_on_ec)).is_empty());
    }
}
