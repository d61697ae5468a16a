//! The signature grant: `sign = hex(HMAC(appSecret, appId + timestamp + nonce))`.

use hmac::{Hmac, Mac};

use crate::types::{Scope, SignAlg, TokenRequest};

/// The algorithm a configuration names (`HMAC-SM3`; anything else is `HMAC-SHA256`).
pub fn alg_named(name: &str) -> SignAlg {
    if name == "HMAC-SM3" {
        SignAlg::HmacSm3
    } else {
        SignAlg::HmacSha256
    }
}

/// A signature grant for `scope`, signed now-ish: the caller gives the clock and the nonce
/// (a nonce is never reused).
pub fn signature_grant(
    alg: SignAlg,
    app_id: &str,
    app_secret: &str,
    scope: Scope,
    timestamp_ms: i64,
    nonce: String,
) -> TokenRequest {
    let sign = sign(alg, app_secret, app_id, timestamp_ms, &nonce);
    TokenRequest::Signature {
        app_id: app_id.into(),
        timestamp: timestamp_ms,
        nonce,
        scope,
        sign_alg: alg,
        sign,
    }
}

pub fn sign(alg: SignAlg, app_secret: &str, app_id: &str, timestamp_ms: i64, nonce: &str) -> String {
    let message = format!("{app_id}{timestamp_ms}{nonce}");
    match alg {
        SignAlg::HmacSha256 => {
            let mut mac = Hmac::<sha2::Sha256>::new_from_slice(app_secret.as_bytes()).expect("any key length");
            mac.update(message.as_bytes());
            hex::encode(mac.finalize().into_bytes())
        }
        SignAlg::HmacSm3 => {
            let mut mac = Hmac::<sm3::Sm3>::new_from_slice(app_secret.as_bytes()).expect("any key length");
            mac.update(message.as_bytes());
            hex::encode(mac.finalize().into_bytes())
        }
    }
}

/// Compares a received signature in constant time.
pub fn verify(alg: SignAlg, app_secret: &str, app_id: &str, timestamp_ms: i64, nonce: &str, sign_hex: &str) -> bool {
    let expected = sign(alg, app_secret, app_id, timestamp_ms, nonce);
    expected.len() == sign_hex.len()
        && expected
            .bytes()
            .zip(sign_hex.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_sha256_known_answer() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        let s = sign(SignAlg::HmacSha256, "Jefe", "what do ya want ", 0, "for nothing?");
        assert_ne!(
            s,
            sign(SignAlg::HmacSha256, "Jefe", "what do ya want ", 1, "for nothing?")
        );
        let direct = {
            let mut mac = Hmac::<sha2::Sha256>::new_from_slice(b"Jefe").unwrap();
            mac.update(b"what do ya want 0for nothing?");
            hex::encode(mac.finalize().into_bytes())
        };
        assert_eq!(s, direct);
        assert!(verify(
            SignAlg::HmacSha256,
            "Jefe",
            "what do ya want ",
            0,
            "for nothing?",
            &s
        ));
    }

    #[test]
    fn sm3_differs_and_verifies() {
        let a = sign(SignAlg::HmacSm3, "k", "app", 1717200000000, "n1");
        assert_eq!(a.len(), 64);
        assert_ne!(a, sign(SignAlg::HmacSha256, "k", "app", 1717200000000, "n1"));
        assert!(verify(SignAlg::HmacSm3, "k", "app", 1717200000000, "n1", &a));
        assert!(!verify(SignAlg::HmacSm3, "k2", "app", 1717200000000, "n1", &a));
    }
}
