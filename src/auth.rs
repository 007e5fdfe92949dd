//! Tokens: HS256 JWTs signed by the CRM platform with `auth.jwt_secret`.
//!
//! The algorithm is pinned: a token whose header names `none`, RS256 or any
//! other algorithm is rejected before its signature is looked at. `exp` is
//! required; `iss`/`aud` are checked when configured. A header with a
//! `crit` parameter is rejected: it names extensions that must be understood
//! (RFC 7515 §4.1.11), and this verifier understands none.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::{config::Config, ids, protocol::UserRef};

#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub exp: u64,
    /// Not before (checked when present).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// A string or a list of strings (RFC 7519); checked by the validation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<serde_json::Value>,
}

/// Why a token was refused; shown to the client (nothing secret in it).
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("token expired")]
    Expired,
    #[error("invalid token: {0}")]
    Invalid(String),
}

/// A verified token: who, and until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub user: UserRef,
    /// `exp`, seconds since the epoch.
    pub exp: u64,
}

pub struct Authenticator {
    decoding: DecodingKey,
    encoding: EncodingKey,
    validation: Validation,
    issuer: Option<String>,
    audience: Option<String>,
    dev_ttl_s: u64,
    max_ttl_s: u64,
}

/// Characters that reorder text around them (RLO and friends: "Trojan
/// Source"), removed from display names.
fn is_bidi_override(c: char) -> bool {
    matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// Display names are shown to other users: bounded and free of control and
/// bidirectional-override characters.
pub fn clean_name(name: Option<String>, id: &str) -> String {
    let name: String =
        name.unwrap_or_default().chars().filter(|c| !c.is_control() && !is_bidi_override(*c)).take(128).collect();
    let name = name.trim();
    if name.is_empty() { id.to_string() } else { name.to_string() }
}

impl Authenticator {
    pub fn new(cfg: &Config) -> Self {
        let secret = cfg.jwt_secret().as_bytes();
        let mut validation = Validation::new(Algorithm::HS256);
        validation.algorithms = vec![Algorithm::HS256];
        let mut required = vec!["exp", "sub"];
        required.extend(cfg.auth.issuer.as_ref().map(|_| "iss"));
        required.extend(cfg.auth.audience.as_ref().map(|_| "aud"));
        validation.set_required_spec_claims(&required);
        validation.leeway = 30;
        validation.validate_nbf = true;
        match &cfg.auth.issuer {
            Some(iss) => validation.set_issuer(&[iss]),
            None => validation.iss = None,
        }
        match &cfg.auth.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        Self {
            decoding: DecodingKey::from_secret(secret),
            encoding: EncodingKey::from_secret(secret),
            validation,
            issuer: cfg.auth.issuer.clone(),
            audience: cfg.auth.audience.clone(),
            dev_ttl_s: cfg.auth.dev_token_ttl_s,
            max_ttl_s: cfg.auth.max_token_ttl_s,
        }
    }

    /// Verifies a token and returns the user it names.
    pub fn verify(&self, token: &str) -> Result<UserRef, AuthError> {
        self.verify_token(token).map(|v| v.user)
    }

    /// Verifies a token: signature, algorithm, `exp` (and that it lies at
    /// most `auth.max_token_ttl_s` ahead), `nbf`, `iss`/`aud` when configured.
    pub fn verify_token(&self, token: &str) -> Result<Verified, AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token.trim(), &self.decoding, &self.validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::ImmatureSignature => AuthError::Invalid("token not valid yet (nbf)".into()),
                ErrorKind::InvalidAlgorithm => AuthError::Invalid("algorithm not accepted (HS256 only)".into()),
                ErrorKind::InvalidSignature => AuthError::Invalid("bad signature".into()),
                ErrorKind::InvalidIssuer => AuthError::Invalid("wrong issuer".into()),
                ErrorKind::InvalidAudience => AuthError::Invalid("wrong audience".into()),
                ErrorKind::MissingRequiredClaim(c) => AuthError::Invalid(format!("missing claim '{c}'")),
                _ => AuthError::Invalid("malformed token".into()),
            }
        })?;
        // jsonwebtoken parses `crit` but does not act on it: any extension it
        // names is one this verifier does not understand.
        if data.header.crit.is_some() {
            return Err(AuthError::Invalid("critical header extension not understood ('crit')".into()));
        }
        let c = data.claims;
        if !ids::valid_user_id(&c.sub) {
            return Err(AuthError::Invalid("'sub' must be 1-128 chars of [A-Za-z0-9_.@-]".into()));
        }
        let now = chrono::Utc::now().timestamp().max(0) as u64;
        if c.exp > now.saturating_add(self.max_ttl_s) {
            return Err(AuthError::Invalid(format!(
                "'exp' is more than {} s ahead (auth.max_token_ttl_s)",
                self.max_ttl_s
            )));
        }
        let name = clean_name(c.name, &c.sub);
        Ok(Verified { user: UserRef { id: c.sub, name }, exp: c.exp })
    }

    /// Signs a token (dev tokens, tests, the load tool).
    pub fn sign(&self, user: &str, name: Option<&str>, ttl_s: Option<u64>) -> String {
        let exp = chrono::Utc::now().timestamp().max(0) as u64 + ttl_s.unwrap_or(self.dev_ttl_s);
        let claims = Claims {
            sub: user.to_string(),
            name: name.map(str::to_string),
            exp,
            nbf: None,
            iss: self.issuer.clone(),
            aud: self.audience.clone().map(serde_json::Value::String),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 signing cannot fail")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    fn auth(f: impl FnOnce(&mut Config)) -> Authenticator {
        let mut cfg = Config::default();
        f(&mut cfg);
        Authenticator::new(&cfg)
    }

    fn now() -> u64 {
        chrono::Utc::now().timestamp() as u64
    }

    fn signed(claims: serde_json::Value) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(crate::config::LOCAL_DEV_JWT_SECRET.as_bytes()),
        )
        .unwrap()
    }

    #[test]
    fn nbf_max_ttl_and_name_cleaning() {
        let a = auth(|_| {});
        let later = signed(serde_json::json!({"sub":"alice","exp":now() + 7200,"nbf":now() + 3600}));
        assert!(matches!(a.verify(&later), Err(AuthError::Invalid(m)) if m.contains("nbf")));
        let ok = signed(serde_json::json!({"sub":"alice","exp":now() + 7200,"nbf":now() - 10}));
        assert_eq!(a.verify_token(&ok).unwrap().exp, now() + 7200);
        let forever = signed(serde_json::json!({"sub":"alice","exp":now() + 86_400 * 30}));
        assert!(matches!(a.verify(&forever), Err(AuthError::Invalid(m)) if m.contains("max_token_ttl_s")));
        let spoof = signed(serde_json::json!({"sub":"alice","exp":now() + 60,"name":"Al\u{202E}ecil\u{2066}x\u{7}"}));
        assert_eq!(a.verify(&spoof).unwrap().name, "Alecilx");
    }

    #[test]
    fn roundtrip_and_name_default() {
        let a = auth(|_| {});
        let u = a.verify(&a.sign("alice", Some("Alice"), None)).unwrap();
        assert_eq!(u, UserRef { id: "alice".into(), name: "Alice".into() });
        let u = a.verify(&a.sign("bob", None, None)).unwrap();
        assert_eq!(u.name, "bob");
    }

    #[test]
    fn rejects_alg_none_wrong_secret_expired_and_bad_sub() {
        let a = auth(|_| {});
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let none = format!("{}.{}.", b64(r#"{"alg":"none","typ":"JWT"}"#), b64(r#"{"sub":"alice","exp":9999999999}"#));
        assert!(a.verify(&none).is_err());
        let other = auth(|c| c.auth.jwt_secret = Some(crate::config::Secret::new("another-secret")));
        assert!(matches!(a.verify(&other.sign("alice", None, None)), Err(AuthError::Invalid(_))));
        let old = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &Claims { sub: "alice".into(), name: None, exp: 1_000_000, nbf: None, iss: None, aud: None },
            &EncodingKey::from_secret(crate::config::LOCAL_DEV_JWT_SECRET.as_bytes()),
        )
        .unwrap();
        assert!(matches!(a.verify(&old), Err(AuthError::Expired)));
        assert!(a.verify(&a.sign("bad id", None, None)).is_err());
        let hs512 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS512),
            &Claims { sub: "alice".into(), name: None, exp: 9_999_999_999, nbf: None, iss: None, aud: None },
            &EncodingKey::from_secret(crate::config::LOCAL_DEV_JWT_SECRET.as_bytes()),
        )
        .unwrap();
        assert!(a.verify(&hs512).is_err());
    }

    #[test]
    fn a_critical_header_extension_is_rejected() {
        let a = auth(|_| {});
        let claims = serde_json::json!({"sub":"alice","exp":now() + 3600});
        let key = EncodingKey::from_secret(crate::config::LOCAL_DEV_JWT_SECRET.as_bytes());
        let mut h = Header::new(Algorithm::HS256);
        h.crit = Some(vec!["exp-ext".into()]);
        h.extras.insert("exp-ext".into(), "1".into());
        let crit = jsonwebtoken::encode(&h, &claims, &key).unwrap();
        assert!(matches!(a.verify(&crit), Err(AuthError::Invalid(m)) if m.contains("crit")));
        h.crit = Some(Vec::new());
        assert!(a.verify(&jsonwebtoken::encode(&h, &claims, &key).unwrap()).is_err(), "an empty 'crit' is invalid too");
        // The same header without `crit` passes: unknown non-critical
        // parameters are ignored.
        h.crit = None;
        assert!(a.verify(&jsonwebtoken::encode(&h, &claims, &key).unwrap()).is_ok());
    }

    #[test]
    fn issuer_and_audience_when_configured() {
        let plain = auth(|_| {});
        let strict = auth(|c| {
            c.auth.issuer = Some("crm".into());
            c.auth.audience = Some("chat".into());
        });
        assert!(strict.verify(&plain.sign("alice", None, None)).is_err());
        assert!(strict.verify(&strict.sign("alice", None, None)).is_ok());
        // A token with iss/aud is fine where nothing is required.
        assert!(plain.verify(&strict.sign("alice", None, None)).is_ok());
        // `aud` may be a list.
        let listed = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({"sub":"alice","exp":now() + 3600,"iss":"crm","aud":["other","chat"]}),
            &EncodingKey::from_secret(crate::config::LOCAL_DEV_JWT_SECRET.as_bytes()),
        )
        .unwrap();
        assert!(strict.verify(&listed).is_ok());
        assert!(plain.verify(&listed).is_ok());
    }
}
