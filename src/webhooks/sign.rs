//! Standard Webhooks signatures: `webhook-signature` is `v1,` and the base64
//! HMAC-SHA256 of `<webhook-id>.<webhook-timestamp>.<body>` under the secret.

use base64::{Engine as _, engine::general_purpose::STANDARD};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The HMAC key of a `webhooks.secret`: `whsec_<base64>` (the Standard
/// Webhooks form, as its libraries generate and expect) is the decoded bytes;
/// any other value its UTF-8 bytes.
pub fn signing_key(secret: &str) -> Result<Vec<u8>, String> {
    match secret.strip_prefix("whsec_") {
        Some(b64) => STANDARD.decode(b64).map_err(|e| format!("whsec_ value is not base64: {e}")),
        None => Ok(secret.as_bytes().to_vec()),
    }
}

/// The `webhook-signature` header value.
pub fn sign(key: &[u8], id: &str, timestamp: i64, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_standard_webhooks_reference_vector() {
        // The test vector of the Standard Webhooks reference libraries
        // (github.com/standard-webhooks/standard-webhooks, libraries/*/tests).
        let key = signing_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let sig = sign(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, r#"{"test": 2432232314}"#);
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn a_plain_secret_is_its_bytes_and_a_bad_whsec_is_refused() {
        assert_eq!(signing_key("plain").unwrap(), b"plain");
        assert!(signing_key("whsec_not base64!").is_err());
    }
}
