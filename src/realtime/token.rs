//! Realtime subscription tokens: HS256 JSON Web Tokens with Inngest's
//! claims (`iss` `rt.inngest.com`, `exp`, `iat`, `jti`, `env`, `topics`,
//! `publish`), so a token looks and verifies as Inngest's do. The SDK never
//! reads them; it passes them back as `?token=`.
//!
//! In production the HMAC key is derived from the signing key (and the
//! fallback key is accepted while keys rotate), so every process of a
//! split deployment signs and verifies alike. `baton dev` uses the fixed
//! key of Inngest's dev server, as it does: dev tokens are not secrets.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::clock::Timestamp;

/// The issuer Inngest's tokens carry, checked on every token.
pub const ISSUER: &str = "rt.inngest.com";
/// The HMAC key of Inngest's dev server, used by `baton dev`.
pub const DEV_SECRET: &[u8] = b"dev-mode-is-not-secret";
/// The account and environment ids the claims name (Baton has one of each;
/// the values are those of Inngest's dev server).
pub const ACCOUNT_ID: &str = "00000000-0000-4000-a000-000000000000";
pub const ENV_ID: &str = "00000000-0000-4000-b000-000000000000";
/// The longest token read; anything longer is refused unread.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Most topics one token may name.
pub const MAX_TOPICS: usize = 64;
/// A token issued this far in the future is still taken (clocks of the
/// processes of a split deployment differ a little).
const CLOCK_SKEW_SECS: i64 = 60;

/// A topic a token subscribes to: a topic name within a channel.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Topic {
    /// Inngest's topic kind; Baton serves `run` topics (data published by
    /// functions and apps).
    #[serde(default = "run_kind")]
    pub kind: String,
    #[serde(default)]
    pub env_id: String,
    pub channel: String,
    pub name: String,
}

fn run_kind() -> String {
    "run".into()
}

impl Topic {
    pub fn new(channel: &str, name: &str) -> Topic {
        Topic {
            kind: run_kind(),
            env_id: ENV_ID.into(),
            channel: channel.into(),
            name: name.into(),
        }
    }
}

/// The claims of a token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub sub: String,
    /// Expiry, Unix seconds.
    pub exp: i64,
    /// Issue time, Unix seconds.
    pub iat: i64,
    pub jti: String,
    #[serde(default)]
    pub env: String,
    #[serde(default)]
    pub topics: Vec<Topic>,
    /// Whether the token may publish (Baton issues none that may).
    #[serde(default)]
    pub publish: bool,
}

/// Why a token was refused; the text is the client's error message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("no realtime token: pass it as ?token=<jwt> or Authorization: Bearer <jwt>")]
    Missing,
    #[error("the realtime token is malformed: {0}")]
    Malformed(String),
    #[error("the realtime token's signature is not valid for this server")]
    BadSignature,
    #[error("the realtime token expired at {0}; ask for a new one (POST /v1/realtime/token)")]
    Expired(String),
    #[error("the realtime token is not valid yet (issued at {0})")]
    NotYetValid(String),
    #[error("the realtime token was not issued for realtime (issuer {0:?})")]
    WrongIssuer(String),
    #[error("the realtime token names {0} topics; the most is {MAX_TOPICS}")]
    TooManyTopics(usize),
}

/// The keys tokens are signed and checked with.
#[derive(Clone)]
pub struct TokenKeys {
    /// New tokens are signed with the first; any verifies.
    keys: Vec<Vec<u8>>,
}

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenKeys({} keys)", self.keys.len())
    }
}

impl TokenKeys {
    /// `baton dev`: Inngest's dev server key.
    pub fn dev() -> TokenKeys {
        TokenKeys {
            keys: vec![DEV_SECRET.to_vec()],
        }
    }

    /// Production: keys derived from the signing key and its fallback.
    /// Without a signing key (production always has one) the dev key.
    pub fn from_signing_keys(signing_key: Option<&str>, fallback: Option<&str>) -> TokenKeys {
        let keys: Vec<Vec<u8>> = [signing_key, fallback]
            .into_iter()
            .flatten()
            .map(derive_key)
            .collect();
        if keys.is_empty() {
            return TokenKeys::dev();
        }
        TokenKeys { keys }
    }

    /// A signed token for `topics`, valid for `ttl` from `now`.
    pub fn mint(&self, topics: Vec<Topic>, now: Timestamp, ttl: std::time::Duration) -> String {
        let iat = now.millis().div_euclid(1000);
        let claims = Claims {
            iss: ISSUER.into(),
            sub: ACCOUNT_ID.into(),
            exp: iat.saturating_add(ttl.as_secs().max(1).min(i64::MAX as u64) as i64),
            iat,
            jti: ulid::Ulid::new().to_string(),
            env: ENV_ID.into(),
            topics,
            publish: false,
        };
        sign(&self.keys[0], &claims)
    }

    /// The claims of a valid token, or why it is not valid at `now`.
    pub fn verify(&self, token: &str, now: Timestamp) -> Result<Claims, TokenError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(TokenError::Missing);
        }
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::Malformed(format!(
                "longer than {MAX_TOKEN_BYTES} bytes"
            )));
        }
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed(
                "not three dot-separated parts".into(),
            ));
        };
        let signed = &token[..header.len() + 1 + payload.len()];
        let header: Header = decode_part(header, "header")?;
        if header.alg != "HS256" {
            return Err(TokenError::Malformed(format!(
                "algorithm {:?}; only HS256 is taken",
                header.alg
            )));
        }
        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| TokenError::Malformed("the signature is not base64url".into()))?;
        let valid = self.keys.iter().fold(false, |found, key| {
            let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
            mac.update(signed.as_bytes());
            found | mac.verify_slice(&signature).is_ok()
        });
        if !valid {
            return Err(TokenError::BadSignature);
        }
        let claims: Claims = decode_part(payload, "claims")?;
        if claims.iss != ISSUER {
            return Err(TokenError::WrongIssuer(claims.iss));
        }
        let now_secs = now.millis().div_euclid(1000);
        if now_secs >= claims.exp {
            return Err(TokenError::Expired(
                Timestamp(claims.exp.saturating_mul(1000)).to_rfc3339(),
            ));
        }
        if claims.iat > now_secs.saturating_add(CLOCK_SKEW_SECS) {
            return Err(TokenError::NotYetValid(
                Timestamp(claims.iat.saturating_mul(1000)).to_rfc3339(),
            ));
        }
        if claims.topics.len() > MAX_TOPICS {
            return Err(TokenError::TooManyTopics(claims.topics.len()));
        }
        Ok(claims)
    }
}

/// The HMAC key for realtime tokens of a signing key: an HMAC of a fixed
/// label under the key, so the token key is not the signing key itself.
fn derive_key(signing_key: &str) -> Vec<u8> {
    let key = crate::sdk::strip_key_prefix(signing_key.trim()).to_ascii_lowercase();
    let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).expect("any key length");
    mac.update(b"baton realtime subscription tokens v1");
    mac.finalize().into_bytes().to_vec()
}

#[derive(Serialize, Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    typ: Option<String>,
}

fn decode_part<T: serde::de::DeserializeOwned>(part: &str, what: &str) -> Result<T, TokenError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| TokenError::Malformed(format!("the {what} is not base64url")))?;
    serde_json::from_slice(&bytes)
        .map_err(|err| TokenError::Malformed(format!("the {what} is not valid: {err}")))
}

/// Signs `claims` with `key` (HS256). Public for tests that need tokens of
/// their own making (expired ones, say).
pub fn sign(key: &[u8], claims: &Claims) -> String {
    let header = Header {
        alg: "HS256".into(),
        typ: Some("JWT".into()),
    };
    let header = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header).unwrap_or_default());
    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap_or_default());
    let signed = format!("{header}.{payload}");
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(signed.as_bytes());
    let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{signed}.{signature}")
}

/// The production token key of `signing_key`, for tests that make tokens.
pub fn key_of_signing_key(signing_key: &str) -> Vec<u8> {
    derive_key(signing_key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const KEY: &str = "signkey-prod-0123456789abcdef0123456789abcdef";

    #[test]
    fn minted_tokens_verify_until_they_expire() {
        let keys = TokenKeys::from_signing_keys(Some(KEY), None);
        let now = Timestamp(1_700_000_000_000);
        let token = keys.mint(vec![Topic::new("c", "t")], now, Duration::from_secs(60));
        let claims = keys.verify(&token, now).unwrap();
        assert_eq!(claims.topics, vec![Topic::new("c", "t")]);
        assert_eq!(claims.iss, ISSUER);
        assert!(!claims.publish);
        assert!(keys
            .verify(&token, now.plus(Duration::from_secs(59)))
            .is_ok());
        assert!(matches!(
            keys.verify(&token, now.plus(Duration::from_secs(60))),
            Err(TokenError::Expired(_))
        ));
    }

    #[test]
    fn other_keys_and_tampering_are_refused() {
        let now = Timestamp(1_700_000_000_000);
        let keys = TokenKeys::from_signing_keys(Some(KEY), None);
        let token = keys.mint(vec![Topic::new("c", "t")], now, Duration::from_secs(60));
        let dev = TokenKeys::dev();
        assert_eq!(dev.verify(&token, now), Err(TokenError::BadSignature));
        // The fallback key still verifies while keys rotate.
        let rotated = TokenKeys::from_signing_keys(Some("signkey-prod-ffff"), Some(KEY));
        assert!(rotated.verify(&token, now).is_ok());
        // Another channel in the claims breaks the signature.
        let parts: Vec<&str> = token.split('.').collect();
        let mut claims = keys.verify(&token, now).unwrap();
        claims.topics[0].channel = "other".into();
        let forged_payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap());
        let forged = format!("{}.{forged_payload}.{}", parts[0], parts[2]);
        assert_eq!(keys.verify(&forged, now), Err(TokenError::BadSignature));
        // alg "none" and junk.
        let none = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#),
            parts[1]
        );
        assert!(matches!(
            keys.verify(&none, now),
            Err(TokenError::Malformed(_))
        ));
        for junk in [
            "",
            "a",
            "a.b",
            "a.b.c.d",
            "....",
            &"x".repeat(MAX_TOKEN_BYTES + 1),
        ] {
            assert!(keys.verify(junk, now).is_err(), "{junk:?}");
        }
    }

    #[test]
    fn claims_are_checked() {
        let now = Timestamp(1_700_000_000_000);
        let key = key_of_signing_key(KEY);
        let keys = TokenKeys::from_signing_keys(Some(KEY), None);
        let claims = Claims {
            iss: ISSUER.into(),
            sub: ACCOUNT_ID.into(),
            exp: 1_700_000_060,
            iat: 1_700_000_000,
            jti: "x".into(),
            env: ENV_ID.into(),
            topics: vec![],
            publish: false,
        };
        assert!(keys.verify(&sign(&key, &claims), now).is_ok());
        let wrong_issuer = Claims {
            iss: "someone".into(),
            ..claims.clone()
        };
        assert!(matches!(
            keys.verify(&sign(&key, &wrong_issuer), now),
            Err(TokenError::WrongIssuer(_))
        ));
        let future = Claims {
            iat: 1_700_001_000,
            exp: 1_700_002_000,
            ..claims.clone()
        };
        assert!(matches!(
            keys.verify(&sign(&key, &future), now),
            Err(TokenError::NotYetValid(_))
        ));
        let many = Claims {
            topics: vec![Topic::new("c", "t"); MAX_TOPICS + 1],
            ..claims
        };
        assert_eq!(
            keys.verify(&sign(&key, &many), now),
            Err(TokenError::TooManyTopics(MAX_TOPICS + 1))
        );
    }
}
