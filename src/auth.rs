//! Who may do what: the backend's api key, and listener tokens.
//!
//! The api key guards `/api/v1`; it is compared in constant time so its bytes cannot be
//! guessed by timing. Listener tokens are HS256 JWTs: `sub` is the uid, `exp` is
//! checked with [`LEEWAY_SECONDS`] of clock skew, and an optional `tracks` claim
//! connects the listener to those tracks when it opens its stream. A `disconnect` of
//! the whole listener revokes the tokens issued before it ([`check_revocation`]).

use axum::http::HeaderMap;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::error::{ApiError, ErrorCode};

/// Clock skew tolerated on `exp`, as the spec promises.
pub(crate) const LEEWAY_SECONDS: u64 = 60;
/// Longest lifetime `POST /api/v1/tokens` will sign: long-lived tokens are keys that
/// cannot be revoked, so a week is the most we hand out.
pub(crate) const MAX_TOKEN_TTL_SECONDS: u64 = 7 * 24 * 3600;
/// How long the revocation of a listener's tokens (`disconnect` of the whole listener)
/// is kept: the longest a token accepted here can live after its `iat` — the 7-day cap,
/// the leeway on that cap, and the leeway on `exp` — so every token it revokes has
/// expired before it is dropped.
pub(crate) const REVOCATION_TTL: std::time::Duration =
    std::time::Duration::from_secs(MAX_TOKEN_TTL_SECONDS + 2 * LEEWAY_SECONDS);
/// Lifetime of a token when the caller does not say.
pub(crate) const DEFAULT_TOKEN_TTL_SECONDS: u64 = 3600;

/// Checks `Authorization: Bearer <key>` against `key`.
pub(crate) fn check_api_key(key: &str, headers: &HeaderMap) -> Result<(), ApiError> {
    check_api_key_value(key, headers.get(axum::http::header::AUTHORIZATION))
}

/// [`check_api_key`] on the `Authorization` header's value, if one was sent.
pub(crate) fn check_api_key_value(
    key: &str,
    value: Option<&axum::http::HeaderValue>,
) -> Result<(), ApiError> {
    let Some(value) = value else {
        return Err(ApiError::unauthorized(
            ErrorCode::MissingApiKey,
            "send the api key as 'Authorization: Bearer <key>'",
        ));
    };
    let given = value
        .to_str()
        .ok()
        .and_then(|v| {
            // The scheme is case-insensitive (RFC 9110 §11.1): `BEARER`, `bearer`, …
            let (scheme, rest) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then_some(rest)
        })
        .unwrap_or("")
        .trim();
    if bool::from(given.as_bytes().ct_eq(key.as_bytes())) {
        Ok(())
    } else {
        Err(ApiError::unauthorized(
            ErrorCode::WrongApiKey,
            "the api key is wrong",
        ))
    }
}

/// A listener token's claims.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// The listener's uid.
    pub sub: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// When it was issued, seconds since the Unix epoch (every token Dolores or its
    /// clients mint has it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// Not valid before, seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Tracks the listener is connected to when it opens its stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracks: Option<Vec<String>>,
}

/// Signs and checks listener tokens with the server's token secret.
#[derive(Clone)]
pub struct Tokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tokens(<secret>)")
    }
}

impl Tokens {
    /// Tokens signed with `secret`.
    pub fn new(secret: &str) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = LEEWAY_SECONDS;
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.validate_nbf = true;
        Self {
            encoding: EncodingKey::from_secret(secret.as_bytes()),
            decoding: DecodingKey::from_secret(secret.as_bytes()),
            validation,
        }
    }

    /// A token for `uid`, valid `ttl_seconds` from now.
    pub fn mint(
        &self,
        uid: &str,
        tracks: Option<Vec<String>>,
        ttl_seconds: u64,
    ) -> Result<String, jsonwebtoken::errors::Error> {
        let now = crate::engine::now_ms() / 1000;
        let claims = Claims {
            sub: uid.to_owned(),
            exp: now + ttl_seconds,
            iat: Some(now),
            nbf: None,
            tracks,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
    }

    /// Checks `token` and that it was given to `uid`.
    pub fn verify(&self, token: &str, uid: &str) -> Result<Claims, ApiError> {
        let claims = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => ApiError::unauthorized(
                    ErrorCode::TokenExpired,
                    "the listener token has expired",
                ),
                ErrorKind::ImmatureSignature => ApiError::unauthorized(
                    ErrorCode::TokenNotYetValid,
                    "the listener token is not valid yet (nbf)",
                ),
                _ => ApiError::unauthorized(
                    ErrorCode::BadToken,
                    format!("the listener token is not valid here: {e}"),
                ),
            })?
            .claims;
        // A token that lives longer than a week is a key that cannot be taken back:
        // refused whoever signed it (measured from `iat`, or from now without one).
        let issued = claims.iat.unwrap_or_else(|| crate::engine::now_ms() / 1000);
        if claims.exp > issued + MAX_TOKEN_TTL_SECONDS + LEEWAY_SECONDS {
            return Err(ApiError::unauthorized(
                ErrorCode::TokenTooLong,
                "the listener token lives longer than 7 days; mint shorter ones",
            ));
        }
        if claims.sub != uid {
            return Err(ApiError::unauthorized(
                ErrorCode::TokenWrongListener,
                "the listener token was given to another uid",
            ));
        }
        Ok(claims)
    }
}

/// Refuses with 401 `token_revoked` a token issued no later than the second its
/// listener was revoked (`revoked_at_ms`, from `Engine::revoked_at`), or without `iat`
/// while a revocation is kept. `iat` counts whole seconds, so a token of the very
/// second of the revocation may have been minted before it: it is refused too. That
/// errs on the side of refusing — a client minted in that second asks once more,
/// a second later — rather than let a revoked token through.
pub(crate) fn check_revocation(
    claims: &Claims,
    revoked_at_ms: Option<u64>,
) -> Result<(), ApiError> {
    let Some(revoked_at_ms) = revoked_at_ms else {
        return Ok(());
    };
    let revoked_second = revoked_at_ms / 1000;
    if claims.iat.is_some_and(|iat| iat > revoked_second) {
        return Ok(());
    }
    Err(ApiError::unauthorized(
        ErrorCode::TokenRevoked,
        "the listener was disconnected after this token was issued; ask the app for a new one",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minted_token_verifies_for_its_uid_only() {
        let tokens = Tokens::new("s3cret");
        let token = tokens
            .mint("listener-1", Some(vec![":data".into()]), 60)
            .expect("mint");
        let claims = tokens.verify(&token, "listener-1").expect("valid");
        assert_eq!(claims.tracks, Some(vec![":data".to_owned()]));
        assert_eq!(
            tokens.verify(&token, "listener-2").unwrap_err().code,
            "token_wrong_listener"
        );
        assert_eq!(
            Tokens::new("other")
                .verify(&token, "listener-1")
                .unwrap_err()
                .code,
            "bad_token"
        );
        assert_eq!(
            tokens.verify("garbage", "listener-1").unwrap_err().code,
            "bad_token"
        );
    }

    #[test]
    fn a_token_of_the_revoked_second_or_before_or_without_iat_is_revoked() {
        let claims = |iat| Claims {
            sub: "listener-1".into(),
            exp: 2_000_000_000,
            iat,
            nbf: None,
            tracks: None,
        };
        let revoked_at_ms = Some(1_700_000_000_500);
        let refused = |iat| {
            check_revocation(&claims(iat), revoked_at_ms)
                .err()
                .map(|e| e.code)
        };
        assert_eq!(
            refused(Some(1_699_999_999)).map(|c| c.as_str()),
            Some("token_revoked")
        );
        assert_eq!(
            refused(Some(1_700_000_000)).map(|c| c.as_str()),
            Some("token_revoked")
        );
        assert_eq!(refused(None).map(|c| c.as_str()), Some("token_revoked"));
        assert_eq!(refused(Some(1_700_000_001)), None);
        assert!(check_revocation(&claims(None), None).is_ok());
    }

    #[test]
    fn api_keys_must_match_exactly() {
        let mut headers = HeaderMap::new();
        assert_eq!(
            check_api_key("k", &headers).unwrap_err().code,
            "missing_api_key"
        );
        headers.insert("authorization", "Bearer kk".parse().expect("header"));
        assert_eq!(
            check_api_key("k", &headers).unwrap_err().code,
            "wrong_api_key"
        );
        headers.insert("authorization", "Bearer k".parse().expect("header"));
        assert!(check_api_key("k", &headers).is_ok());
    }

    proptest::proptest! {
        /// Whatever comes as `?token=`: no panic, and never accepted without the secret.
        #[test]
        fn any_token_text_is_refused_without_panic(token in "\\PC{0,200}|[A-Za-z0-9_\\-]{1,40}\\.[A-Za-z0-9_\\-]{1,80}\\.[A-Za-z0-9_\\-]{0,60}") {
            let tokens = Tokens::new("s3cret");
            proptest::prop_assert!(tokens.verify(&token, "listener-1").is_err());
        }
    }
}
