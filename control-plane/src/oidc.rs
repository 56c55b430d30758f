//! Login through an OpenID Connect issuer: authorization code flow with PKCE.
